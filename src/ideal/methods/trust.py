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

With candidate steps (update.candidates, ideal.methods.candidates) the size of each step is
measured, and what carries over from one update to the next is the radius: a factor on the
candidates that follows the ratio of the realised to the predicted change (`radius_scale`), the
classical ratio test. Each update starts from the best round so far.
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


# the classical trust-region ratio test (Nocedal & Wright, Algorithm 4.1; TuRBO does the same)
GROW_ABOVE = 0.75
SHRINK_BELOW = 0.25


def radius_scale(
    scale: float, realised: float | None, predicted: float | None, largest: float
) -> tuple[float, float | None]:
    """The next IDEAL update's radius (the factor on update.candidates) after a candidate step:
    rho = realised / predicted change of Q (both negative when Q was predicted to fall and
    fell). rho above GROW_ABOVE doubles the scale, at most `largest`; below SHRINK_BELOW (a rise,
    or a fall far smaller than predicted) halves it; between, it stays. No prediction of a fall
    (predicted >= 0 or missing) halves it. Returns (scale, rho)."""
    if scale <= 0 or largest <= 0:
        raise IdealError(f"radius: scales must be > 0, got {scale} and {largest}")
    if realised is None or predicted is None or predicted >= 0:
        return scale / 2.0, None
    rho = realised / predicted
    if rho > GROW_ABOVE:
        return min(2.0 * scale, largest), rho
    if rho < SHRINK_BELOW:
        return scale / 2.0, rho
    return scale, rho
