"""One IDEAL update from an `influence.json`: new volumes, constraints, resampled data on disk.

This is the API behind `ideal reweight --train DIR --influence FILE --out DIR`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ideal.artifacts import check_new_output_dir, read_json, sha256_file
from ideal.data.mixture import Constraints, Mixture, apply_constraints, resample_mixture
from ideal.data.mixture_io import TrainingSet, load_training_set, write_mixture_dir
from ideal.data.rows import OnInvalid
from ideal.errors import IdealError
from ideal.methods.rules import IdealRule, Rule, direction_table
from ideal.methods.settings import UpdateSettings


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


def update_mixture(
    training: TrainingSet, rule: Rule, constraints: Constraints, seed: int, signals: dict[str, Any]
) -> tuple[Mixture, dict[str, Any]]:
    """One update: the rule's requested volumes, then the constraints, then seeded resampling.

    Returns the next mixture and a record of the update (for its manifest): requested volumes,
    the requested and the realised beta, the constraints, the previous volumes and, from an
    influence.json, its count of re-tokenized rows.
    """
    before = training.mixture.volumes
    sizes = {d: len(domain.examples) for d, domain in training.pool.items()}
    requested = rule.propose(before, {**signals, "pool_sizes": sizes})
    total = training.mixture.total if constraints.keep_total else None
    volumes, events = apply_constraints(requested, sizes, constraints, total)
    mixture = resample_mixture(training.mixture, volumes, constraints.max_repeats, seed, events)

    def relative(new: dict[str, float]) -> dict[str, float]:
        return {d: new[d] / before[d] - 1.0 if before[d] else 0.0 for d in before}

    record = {
        "rule": rule.name,
        "requested": requested,
        "beta": relative(requested),
        "beta_realised": relative({d: float(v) for d, v in volumes.items()}),
        "constraints": asdict(constraints),
        "previous_volumes": before,
    }
    if isinstance(rule, IdealRule):
        record["geometry"] = rule.update.geometry
    if isinstance(rule, IdealRule) and signals.get("sensitivity"):
        record["step"] = rule.m
        record["direction"] = direction_table(signals, rule.update, list(before))
        if rule.update.min_z > 0:  # the noise, and whom it held
            record["min_z"], record["shrink"] = rule.update.min_z, rule.update.shrink
            record["held_by_noise"] = rule.held(signals)
    if "rescored" in signals:  # update.rescore: every copy scored, the first sample moved nothing
        record["rescored"] = {
            "from_max_examples": signals["rescored"]["max_examples"],
            "sampled_examples": signals.get("sampled_examples"),
        }
    if "retokenized" in signals:  # the influence step's count of re-tokenized rows, kept in view
        record["retokenized"] = signals["retokenized"]
    return mixture, record


def reweight(
    train: str | Path,
    influence: str | Path,
    out: str | Path,
    update: UpdateSettings = UpdateSettings(),
    seed: int | None = None,
    on_invalid: OnInvalid = "error",
) -> ReweightResult:
    """Apply the IDEAL step (`update`: step m, min_z and shrink, geometry and the constraints) to
    the training set at `train` and write the next mixture to `out`.

    Each sensitivity is judged by its standard error (influence.json's `sensitivity_stderr`,
    ideal.methods.rules.noise_aware). `geometry` "additive" takes the step in volumes
    (`ideal.methods.rules.additive_delta`), which needs influence.json's size factor. One step:
    the candidates of a run (update.candidates) need trainings, which `ideal run` does."""
    step, geometry = update.step, update.geometry
    constraints = Constraints(update.min_examples, update.max_repeats, update.keep_total)
    rule = IdealRule(update)
    check_new_output_dir(out)  # fail before any work
    training = load_training_set(train, on_invalid)
    signals = read_influence(influence, training)
    if geometry == "additive" and not signals.get("objective", {}).get("size_factor", True):
        raise IdealError(
            f"{influence}: computed without the size factor n_i/N; --geometry additive needs "
            "dQ/dn_i = alpha_i/n_i (recompute without --no-size-factor)"
        )
    seed = training.mixture.seed if seed is None else seed
    mixture, record = update_mixture(training, rule, constraints, seed, signals)
    record["step"] = step
    record["influence"] = {"path": str(Path(influence).resolve()), "sha256": sha256_file(influence)}
    write_mixture_dir(out, training, mixture, extra={"update": record})
    return ReweightResult(
        record["previous_volumes"], record["beta"], record["requested"], mixture, Path(out)
    )
