"""Round-level step control of the IDEAL rule (`update.trust_region`): a backtracking trust region.

The rule's step m bounds how far one round moves the volumes. A fixed m moves a badly skewed D0
slowly (at m = 0.3 a domain grows at most 2.2x in three rounds), while uniform mixing jumps at
once. The first-order prediction of a round's change in Q is 5-700x too large on our suites
(docs/results.md), so its ratio to the realised change cannot calibrate m; its sign can. After
round k the loop compares Q_k with Q of the round the update started from (its base):

    Q_k < Q_base   accepted: round k is the new base and m doubles, at most `max_step`
    otherwise      rejected: the next update starts again from the base (its mixture and its
                   influence scores) with m halved

The base is therefore always the round with the lowest Q so far. Pure: the loop reads Q from the
round directories and records each decision in the next round's mixture.json.
"""

from __future__ import annotations

from dataclasses import dataclass

from ideal.errors import IdealError


@dataclass(frozen=True)
class StepDecision:
    step: float  # m of the next update
    base: int  # the round the next update starts from
    accepted: bool  # whether the last round lowered Q below its base's


def trust_step(
    step: float, base: int, base_loss: float, round_: int, loss: float, max_step: float = 0.9
) -> StepDecision:
    """The next update's step and base after round `round_` (trained from `base` with `step`)."""
    if not 0.0 < step < 1.0 or not 0.0 < max_step < 1.0:
        raise IdealError(f"trust region: steps must be in (0, 1), got {step} and {max_step}")
    if loss < base_loss:
        return StepDecision(min(2.0 * step, max_step), round_, True)
    return StepDecision(step / 2.0, base, False)
