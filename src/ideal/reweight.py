"""One IDEAL update from an `influence.json`: new volumes, constraints, resampled data on disk.

This is the API behind `ideal reweight --train DIR --influence FILE --out DIR`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ideal.artifacts import check_new_output_dir, read_json, sha256_file
from ideal.data import OnInvalid
from ideal.errors import IdealError
from ideal.mixture import Constraints, Mixture, apply_constraints, resample_mixture
from ideal.mixture_io import TrainingSet, load_training_set, write_mixture_dir
from ideal.rules import IdealRule


@dataclass
class ReweightResult:
    before: dict[str, int]
    beta: dict[str, float]
    requested: dict[str, float]
    mixture: Mixture
    out: Path

    @property
    def after(self) -> dict[str, int]:
        return self.mixture.volumes


def read_influence(path: str | Path, training: TrainingSet) -> dict[str, Any]:
    """Read and check an influence.json against the training set it is applied to."""
    path = Path(path)
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise IdealError(f"{path}: expected a JSON object (influence.json, see SPEC.md)")
    domains = set(training.mixture.domains)
    for key in ("domains", "sensitivity", "volumes"):
        if key not in obj:
            raise IdealError(f"{path}: missing field '{key}'")
    if not isinstance(obj["domains"], list) or set(obj["domains"]) != domains:
        raise IdealError(
            f"{path}: field 'domains' is {obj['domains']}, the training data has {sorted(domains)}"
        )
    for key in ("sensitivity", "volumes"):
        field = obj[key]
        if not isinstance(field, dict) or set(field) != domains:
            raise IdealError(f"{path}: field '{key}' must map every domain to a number")
        for domain, value in field.items():
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not ok or not math.isfinite(value):
                raise IdealError(
                    f"{path}: {key}['{domain}'] must be a finite number, got {value!r}"
                )
    if obj["volumes"] != training.mixture.volumes:
        raise IdealError(
            f"{path}: computed for volumes {obj['volumes']}, but the training data has "
            f"{training.mixture.volumes} (stale influence file?)"
        )
    return obj


def reweight(
    train: str | Path,
    influence: str | Path,
    out: str | Path,
    step: float = 0.15,
    constraints: Constraints | None = None,
    seed: int | None = None,
    on_invalid: OnInvalid = "error",
) -> ReweightResult:
    """Apply the IDEAL step to the training set at `train` and write the next mixture to `out`."""
    constraints = constraints or Constraints()
    check_new_output_dir(out)  # fail before any work
    training = load_training_set(train, on_invalid)
    signals = read_influence(influence, training)
    before = training.mixture.volumes
    rule = IdealRule(step=step)
    requested = rule.propose(before, signals)
    beta = {d: requested[d] / before[d] - 1.0 if before[d] else 0.0 for d in before}
    sizes = {d: len(domain.examples) for d, domain in training.pool.items()}
    total = training.mixture.total if constraints.keep_total else None
    volumes, events = apply_constraints(requested, sizes, constraints, total)
    seed = training.mixture.seed if seed is None else seed
    mixture = resample_mixture(training.mixture, volumes, constraints.max_repeats, seed, events)
    write_mixture_dir(
        out,
        training,
        mixture,
        extra={
            "update": {
                "rule": rule.name,
                "step": step,
                "beta": beta,
                "requested": requested,
                "constraints": {
                    "min_examples": constraints.min_examples,
                    "max_repeats": constraints.max_repeats,
                    "keep_total": constraints.keep_total,
                },
                "influence": {
                    "path": str(Path(influence).resolve()),
                    "sha256": sha256_file(influence),
                },
                "previous_volumes": before,
            }
        },
    )
    return ReweightResult(before, beta, requested, mixture, Path(out))
