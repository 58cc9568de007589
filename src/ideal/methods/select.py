"""Which round a run returns (`select`): the last one, or the best one on the reference sets.

The loop trains D0, D1, ..., DR. What it returns is one of them:

    last                DR, the mixture the update rule arrived at (the paper's choice)
    reference_loss      the round with the lowest mean reference loss Q (the objective the rule
                        descends); the default: +0.014 +- 0.007 mean test accuracy over `last`
                        paired over 4 suites x 5 seeds, +0.049 +- 0.016 where rounds overshoot
    reference_accuracy  the round with the highest mean reference accuracy (the user's own scorer on the
                        reference sets), ties broken by the lower reference loss, then the earlier round

Selection is model selection on the reference sets, which drive the method anyway; it never reads
a test set (those only measure). Round 0 is a candidate, so a run whose updates did not help on the
reference sets returns D0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ideal.errors import IdealError

SELECTIONS = ("last", "reference_loss", "reference_accuracy")


def select_round(rounds: Sequence[Mapping[str, Any]], by: str) -> int:
    """The index into `rounds` (summary.json entries, round 0 first) of the round a run returns."""
    if by not in SELECTIONS:
        raise IdealError(f"select: unknown '{by}'; choose from {', '.join(SELECTIONS)}")
    if not rounds:
        raise IdealError("select: no finished round to choose from")
    if by == "last":
        return len(rounds) - 1
    if by == "reference_loss":
        return min(range(len(rounds)), key=lambda k: (rounds[k]["reference_loss_mean"], k))
    missing = [r["round"] for r in rounds if r.get("reference_accuracy_mean") is None]
    if missing:
        raise IdealError(
            f"select: reference_accuracy needs an 'answer' on every reference row (round "
            f"{missing[0]} has no reference accuracy); use select=reference_loss"
        )
    return min(
        range(len(rounds)),
        key=lambda k: (-rounds[k]["reference_accuracy_mean"], rounds[k]["reference_loss_mean"], k),
    )
