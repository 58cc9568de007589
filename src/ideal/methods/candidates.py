"""How far to step: a few candidates along the IDEAL direction, trained, and the best kept by the
reference loss on rows that did not compute the direction (pure; the loop trains them).

The first-order prediction gets the direction right more often than not but not the size of the
change (realised about 0.34 of predicted on a toy suite, docs/results.md), so the size is measured:

    steps       update.candidates (m = 0.15, 0.4, 0.75), times the radius' scale (methods.trust),
                at most update.max_step
    held out    each capability's reference rows are split once per run (seeded): the direction
                rows compute the influence, the selection rows compare the candidates. A split
                rather than cross-fitting: cross-fitting would need candidates along a second
                direction, twice the trainings, while a split costs only the rows.
    objective   Q_sel = sum_j w_j mean over selection rows r of capability j of l(r)
    paired SE   of Q_sel(a) - Q_sel(b): the per-row differences l_a(r) - l_b(r), whose variance
                over the rows of capability j is s_j^2: SE^2 = sum_j w_j^2 s_j^2 / n_j
    ties        the candidates within one paired SE of the lowest Q_sel: `update.ties` keeps the
                lowest Q_sel whatever the SE (default), the smaller step, or the larger

Every candidate's table row is recorded (mixture.json's update), so a tie rule can be judged
afterwards on the candidates that were trained (benchmarks/step_ties.py).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ideal.errors import IdealError
from ideal.methods.settings import TIES


def candidate_steps(candidates: Sequence[float], scale: float, max_step: float) -> list[float]:
    """The steps trained at this update: each candidate m times the radius' scale, at most
    `max_step`, to 3 decimals, without repeats (two candidates pushed to the cap count once) and
    without a step rounded to 0, ascending."""
    if scale <= 0:
        raise IdealError(f"step scale must be > 0, got {scale}")
    # to 3 decimals: the steps name their candidates (m0.150), so two closer ones are one
    return sorted({round(min(m * scale, max_step), 3) for m in candidates} - {0.0})


def split_rows(counts: Mapping[str, int], fraction: float, seed: int) -> dict[str, list[int]]:
    """Each capability's selection rows (indices into its reference rows, sorted): `fraction` of
    them, at least one, and at least one row left for the direction; drawn once per run."""
    out: dict[str, list[int]] = {}
    for capability in sorted(counts):
        n = counts[capability]
        if fraction <= 0 or n < 2:
            out[capability] = []
            continue
        k = min(max(1, round(fraction * n)), n - 1)
        rng = random.Random(f"{seed}:{capability}:selection")
        out[capability] = sorted(rng.sample(range(n), k))
    return out


def objective(rows: Mapping[str, Sequence[float]], weights: Mapping[str, float]) -> float:
    """Q over the given rows: sum_j w_j mean_r l(r)."""
    return float(sum(weights[c] * float(np.mean(rows[c])) for c in weights))


def paired(
    a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]], weights: Mapping[str, float]
) -> tuple[float, float]:
    """Q(a) - Q(b) over the same rows, and its standard error from the per-row differences."""
    difference, variance = 0.0, 0.0
    for capability, w in weights.items():
        d = np.asarray(a[capability], dtype=np.float64) - np.asarray(b[capability], np.float64)
        if d.shape[0] == 0:
            raise IdealError(f"no selection rows for capability {capability!r}")
        difference += w * float(d.mean())
        if d.shape[0] > 1:
            variance += w**2 * float(d.var(ddof=1)) / d.shape[0]
    return difference, float(np.sqrt(variance))


@dataclass(frozen=True)
class Candidate:
    """A trained candidate: its name, its step m, how far it moved (max |beta realised|) and
    its per-row losses on the selection rows of each capability."""

    name: str
    step: float | None  # None: the surrogate's proposal
    moved: float
    rows: dict[str, list[float]] = field(repr=False)


def choose(
    candidates: Sequence[Candidate], weights: Mapping[str, float], ties: str
) -> tuple[int, list[dict[str, Any]]]:
    """The index of the candidate kept, and a row per candidate: its Q_sel, its paired
    difference from the lowest and that difference's SE, whether it ties with the lowest."""
    if ties not in TIES:
        raise IdealError(f"update.ties must be one of {', '.join(TIES)}, got {ties!r}")
    if not candidates:
        raise IdealError("no candidate to choose from")
    q = [objective(c.rows, weights) for c in candidates]
    best = int(np.argmin(q))
    table = []
    for i, c in enumerate(candidates):
        diff, se = paired(c.rows, candidates[best].rows, weights) if i != best else (0.0, 0.0)
        table.append({
            "name": c.name, "step": c.step, "moved": c.moved, "selection_loss": q[i],
            "minus_lowest": diff, "stderr": se, "tie": i == best or diff <= se,
        })  # fmt: skip
    tied = [i for i, row in enumerate(table) if row["tie"]]
    if ties == "smaller":
        chosen = min(tied, key=lambda i: (candidates[i].moved, q[i]))
    elif ties == "larger":
        chosen = max(tied, key=lambda i: (candidates[i].moved, -q[i]))
    else:
        chosen = best
    for i, row in enumerate(table):
        row["chosen"] = i == chosen
    return chosen, table
