"""Which tie rule keeps the best candidate? Judged after the fact on the candidates that were trained.

    python benchmarks/step_ties.py RUN_OR_COMPARE_DIR [...]

Every IDEAL update by candidate steps (update.candidates) records, per candidate and for the base
round it started from (step 0), its held-out reference loss, its paired difference from the
lowest with that difference's standard error, how far it moved, and its mean test loss
(RUN/step-K/choice.json). So each tie
rule (smaller, larger, lowest; and lowest-all, the lowest over every reference row) can be replayed on the same trained candidates at no cost: this
prints, over every update found under the given directories (runs, or `ideal compare` outputs),
the mean test loss of the candidate each rule keeps, and each rule minus `smaller` paired per
update with its standard error; then each rule, and each candidate step always taken, minus the
base round (what stepping gained). Lower is better. The test sets only measure here; no rule reads
them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

RULES = ("smaller", "larger", "lowest", "lowest-all")


def kept(table: list[dict], rule: str) -> dict:
    """The candidate `rule` keeps (ideal.methods.candidates.choose, replayed on its record)."""
    tied = [row for row in table if row["tie"]]
    if rule == "smaller":
        return min(tied, key=lambda r: (r["moved"], r["selection_loss"]))
    if rule == "larger":
        return max(tied, key=lambda r: (r["moved"], -r["selection_loss"]))
    if rule == "lowest":
        return min(table, key=lambda r: r["selection_loss"])
    # not a rule the loop has: the lowest mean reference loss over every reference row, those
    # that computed the direction included (twice the rows, but biased toward the longer steps)
    return min(table, key=lambda r: r["reference_loss_mean"])


def updates(roots: list[Path]) -> list[tuple[str, list[dict]]]:
    """Every update by candidate steps under `roots`: RUN/step-K/choice.json's table (the base
    round among them, step 0), whether a candidate or the base was kept."""
    found = []
    for root in roots:
        for choice in sorted(root.rglob("step-*/choice.json")):
            table = json.loads(choice.read_text()).get("candidates")
            if table and all(row.get("test_loss_mean") is not None for row in table):
                found.append((str(choice.parent), table))
    return found


def paired(a: np.ndarray, b: np.ndarray) -> str:
    """mean of a - b per update, +- its standard error."""
    d = a - b
    se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    return f"{d.mean():+.4f} +- {se:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dirs", nargs="+", type=Path)
    args = parser.parse_args()
    found = updates(args.dirs)
    if not found:
        raise SystemExit("no IDEAL update by candidate steps with test losses under those dirs")
    losses = {rule: np.array([kept(t, rule)["test_loss_mean"] for _, t in found]) for rule in RULES}
    print(f"{len(found)} updates by candidate steps")
    for rule in RULES:
        line = f"{rule:8s} mean test loss of the kept candidate {losses[rule].mean():.4f}"
        if rule != "smaller":
            line += f"   minus smaller {paired(losses[rule], losses['smaller'])}"
        print(line)
    ties = sum(sum(r["tie"] for r in t) > 1 for _, t in found)
    print(f"updates with a tie: {ties} of {len(found)}")
    # what stepping gained over staying at the base round: each rule's kept candidate, and each
    # candidate step always taken (the direction is right on average if these are negative)
    base = np.array([next(r for r in t if r["name"] == "base")["test_loss_mean"] for _, t in found])
    rows = {f"rule {rule}": losses[rule] for rule in RULES}
    for name in sorted({r["name"] for _, t in found for r in t} - {"base"}):
        taken = [next((r for r in t if r["name"] == name), None) for _, t in found]
        if all(r is not None for r in taken):
            rows[f"always {name}"] = np.array([r["test_loss_mean"] for r in taken])
    print("minus the base round (the step not taken):")
    for name, values in rows.items():
        print(f"  {name:14s} {paired(values, base)}")


if __name__ == "__main__":
    main()
