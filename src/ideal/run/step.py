"""One IDEAL update whose size is measured: candidate steps along the direction, each trained and
evaluated, the best on held-out reference rows kept (update.candidates; ideal.methods.candidates).

    RUN/reference-split/      the reference rows split once per run (update.selection, seeded):
                              direction/<capability>/data.jsonl (the influence step reads these),
                              split.json (the selection rows' indices, per capability)
    RUN/step-K/<candidate>/   round K's candidates, each an ordinary round directory (mixture.json,
                              data/, model/, train.json, metrics.json): m0.150, m0.400, m0.750 and,
                              with update.surrogate, `surrogate`
    RUN/step-K/choice.json    what the update kept (the base round itself is a candidate of
                              step 0: a candidate must beat it by more than its paired SE), or
                              why no step was taken
    RUN/round-K/              the kept candidate: its mixture (with the whole choice in
                              mixture.json's update), its model and metrics moved in

Every candidate is resumable as a round is, and the choice is a pure function of their metrics,
so a run killed in the middle of the candidates continues where it stopped. The next update's
radius follows the ratio of the realised to the predicted change of the kept step
(ideal.methods.trust.radius_scale), and starts from the best round so far.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ideal.artifacts import atomic_dir, atomic_write_json, read_json
from ideal.data.mixture import Constraints
from ideal.data.mixture_io import load_training_set, write_mixture_dir
from ideal.errors import IdealError
from ideal.influence.objective import objective_weights
from ideal.methods.candidates import Candidate, candidate_steps, choose, split_rows
from ideal.methods.reweight import update_mixture
from ideal.methods.rules import IdealRule
from ideal.methods.surrogate import fit_quadratic, minimise
from ideal.methods.trust import radius_scale
from ideal.records import UpdateRecord
from ideal.run.config import RunConfig
from ideal.run.rundir import RunPaths

log = logging.getLogger("ideal")

SPLIT = "reference-split"
SURROGATE = "surrogate"
BASE = "base"  # the round the update starts from, a candidate of step 0
CHOICE = "choice.json"  # RUN/step-K/choice.json: what the update kept, or why none


def uses_candidates(config: RunConfig) -> bool:
    """Whether the run's IDEAL updates train candidate steps (update.candidates)."""
    return config.update.rule == "ideal" and bool(config.update.candidates)


@dataclass(frozen=True)
class ReferenceSplit:
    """The direction rows (a reference directory) and each capability's selection rows."""

    direction: Path
    selection: dict[str, list[int]]


def reference_split(config: RunConfig, paths: RunPaths, main: bool) -> ReferenceSplit | None:
    """RUN/reference-split/, written once (seeded by the run's seed): None with
    update.selection 0, where the candidates are compared on every reference row."""
    from ideal.data.rows import load_domains
    from ideal.distributed import barrier

    if config.update.selection <= 0 or not uses_candidates(config):
        return None
    root = paths.run / SPLIT
    if main and not (root / "split.json").is_file():
        domains = load_domains(paths.reference)
        counts = {c: len(d.examples) for c, d in domains.items()}
        chosen = split_rows(counts, config.update.selection, config.seed)
        for capability, rows in chosen.items():
            if not rows:
                log.warning(
                    "reference set '%s' has %d row(s): none held out to choose the step, its "
                    "candidates are compared on every row", capability, counts[capability],
                )  # fmt: skip
        with atomic_dir(root) as tmp:
            for capability, domain in domains.items():
                held = set(chosen[capability])
                rows = [e.raw for i, e in enumerate(domain.examples) if i not in held]
                (tmp / "direction" / capability).mkdir(parents=True)
                (tmp / "direction" / capability / "data.jsonl").write_text(
                    "".join(f"{r}\n" for r in rows), encoding="utf-8"
                )
            atomic_write_json(tmp / "split.json", {
                "fraction": config.update.selection, "seed": config.seed, "rows": counts,
                "selection": chosen,
            })  # fmt: skip
    barrier()
    split = read_json(root / "split.json")
    return ReferenceSplit(root / "direction", {c: list(v) for c, v in split["selection"].items()})


def step_dir(paths: RunPaths, round_: int) -> Path:
    return paths.run / f"step-{round_}"


def next_scale(paths: RunPaths, k: int) -> float:
    """The radius' scale of the update after round k: what the latest candidate step said
    (`scale_next` in its mixture.json), 1 before any."""
    for j in range(k, 0, -1):
        update = read_json(paths.round(j) / "mixture.json").get("update", {})
        if "scale_next" in update:
            return float(update["scale_next"])
    return 1.0


def objective_value(config: RunConfig, metrics: dict[str, Any]) -> float:
    """Q of a round's reference losses under update.objective: their mean, pooled by rows, or
    the worst capability's (what the influence step differentiates)."""
    caps = {c: e for c, e in metrics["capabilities"].items() if "reference_loss" in e}
    losses = {c: e["reference_loss"] for c, e in caps.items()}
    if config.update.objective == "worst":
        return float(max(losses.values()))
    if config.update.objective == "pooled":
        sizes = {c: e["reference_examples"] for c, e in caps.items()}
        return float(sum(losses[c] * sizes[c] for c in caps) / sum(sizes.values()))
    return float(np.mean(list(losses.values())))


def best_round(config: RunConfig, paths: RunPaths, k: int) -> int:
    """The round among 0..k with the lowest Q (update.objective; the earliest on a tie)."""
    values = [
        objective_value(config, read_json(paths.round(j) / "metrics.json")) for j in range(k + 1)
    ]
    return min(range(k + 1), key=lambda j: (values[j], j))


def adopt(paths: RunPaths, k: int) -> None:
    """Round k made by a candidate step: move the kept candidate's model in, copy its
    metrics and train.json (idempotent: a run killed in between does the rest)."""
    here = paths.round(k)
    manifest = here / "mixture.json"
    if not manifest.is_file():
        return
    name = read_json(manifest).get("update", {}).get("candidate")
    if not name:
        return
    source = step_dir(paths, k) / name
    if not (here / "model").is_dir():
        if not (source / "model").is_dir():
            raise IdealError(f"{source}/model: the kept candidate's model is missing")
        os.replace(source / "model", here / "model")
    for artifact in ("train.json", "metrics.json"):
        if not (here / artifact).is_file() and (source / artifact).is_file():
            shutil.copy2(source / artifact, here / artifact)
    if (source / "search").is_dir() and not (here / "search").exists():
        shutil.copytree(source / "search", here / "search")


def _row_losses(
    metrics: dict[str, Any], rows: dict[str, list[int]] | None
) -> dict[str, list[float]]:
    """Each capability's per-row reference losses on its selection rows (every row without a
    split, or for a capability too small to hold any out)."""
    out = {}
    for capability, entry in metrics["capabilities"].items():
        losses = entry.get("reference_row_losses")
        if losses is None:
            continue
        held = (rows or {}).get(capability)
        out[capability] = [losses[i] for i in held] if held else list(losses)
    return out


def _weights(config: RunConfig, metrics: dict[str, Any]) -> dict[str, float]:
    caps = sorted(c for c, e in metrics["capabilities"].items() if "reference_loss" in e)
    sizes = {c: metrics["capabilities"][c]["reference_examples"] for c in caps}
    losses = {c: metrics["capabilities"][c]["reference_loss"] for c in caps}
    w = objective_weights(config.update.objective, caps, sizes, losses)
    return dict(zip(caps, w.tolist(), strict=True))


def objective_stderr(metrics: dict[str, Any], weights: dict[str, float]) -> float:
    """The standard error of a round's mean reference loss Q from its rows' spread."""
    variance = 0.0
    for capability, w in weights.items():
        rows = metrics["capabilities"][capability].get("reference_row_losses") or []
        if len(rows) > 1:
            variance += w**2 * float(np.var(rows, ddof=1)) / len(rows)
    return float(np.sqrt(variance))


class _Volumes:
    """A rule that asks for given volumes (the surrogate's proposal)."""

    name = SURROGATE
    signal = "none"

    def __init__(self, volumes: dict[str, float]) -> None:
        self.volumes = volumes

    def propose(self, volumes: Any, signals: Any) -> dict[str, float]:
        return dict(self.volumes)


def surrogate_volumes(
    config: RunConfig, paths: RunPaths, k: int, base: int, radius: float
) -> tuple[dict[str, float], dict[str, Any]]:
    """The surrogate's proposal for round k+1 (ideal.methods.surrogate): a quadratic in
    log-volumes through every mixture trained so far (rounds 0..k and every candidate, their Q
    with its standard error) and every influence step's sensitivities, minimised within
    `radius` of the base round."""
    trained = [paths.round(j) for j in range(k + 1)]
    # every other candidate evaluated so far (a kept one is its round: its model moved there)
    trained += sorted(
        p
        for p in paths.run.glob("step-*/*")
        if (p / "metrics.json").is_file() and (p / "model").is_dir()
    )
    base_mixture = read_json(paths.round(base) / "mixture.json")
    domains = sorted(base_mixture["domains"])

    def log_volumes(directory: Path) -> np.ndarray:
        volumes = read_json(directory / "mixture.json")["domains"]
        return np.log([max(volumes[d]["volume"], 1) for d in domains])

    weights = _weights(config, read_json(paths.round(base) / "metrics.json"))
    points, values, errors = [], [], []
    for directory in trained:
        metrics = read_json(directory / "metrics.json")
        points.append(log_volumes(directory))
        values.append(objective_value(config, metrics))
        errors.append(objective_stderr(metrics, weights))
    grad_points, gradients, gradient_errors = [], [], []
    for j in range(k + 1):
        influence = paths.round(j) / "influence.json"
        if influence.is_file():
            document = read_json(influence)
            errs = document.get("sensitivity_stderr") or {}
            grad_points.append(log_volumes(paths.round(j)))
            gradients.append([document["sensitivity"][d] for d in domains])
            gradient_errors.append([errs.get(d, 0.0) for d in domains])
    spread = float(np.ptp(values)) + float(np.mean(errors))
    scale = spread / np.log1p(radius) ** 2 if spread > 0 else 1.0
    x0 = log_volumes(paths.round(base))
    model = fit_quadratic(x0, points, values, errors, grad_points, gradients, gradient_errors,
                          curvature_scale=scale)  # fmt: skip
    x = minimise(model, radius, config.update.keep_total, seed=config.seed + k)
    volumes = dict(zip(domains, np.exp(x).tolist(), strict=True))
    record = {
        "observations": {"values": len(values), "gradients": len(gradients)},
        "predicted_reference_loss": float(model(x)[0]),
        "base_reference_loss": float(model(x0)[0]),
        "radius": radius,
    }
    return volumes, record


def candidate_round(
    config: RunConfig,
    paths: RunPaths,
    k: int,
    base: int,
    scale: float,
    split: ReferenceSplit | None,
    fraction: float,
    main: bool,
) -> bool:
    """Round k+1 by candidate steps from round `base` (whose influence.json is written): train
    and evaluate each distinct candidate, keep one, make it round k+1 (`adopt`). False, with
    nothing trained, when no candidate moves the mixture."""
    from ideal.distributed import barrier
    from ideal.run.stages import evaluate_round, search_rows, train_round

    target = k + 1
    update = config.update
    source = paths.round(base)
    signals = read_json(source / "influence.json")
    training = load_training_set(source)
    # numbered (and its resampling seeded) as round k+1, even from an earlier base
    training.mixture = replace(training.mixture, round=k)
    steps = candidate_steps(update.candidates, scale, update.max_step)
    specs: list[tuple[str, float | None]] = [(f"m{m:.3f}", m) for m in steps]
    if update.surrogate and steps:
        specs.append((SURROGATE, None))
    here = step_dir(paths, target)
    constraints = Constraints(update.min_examples, update.max_repeats, update.keep_total)
    for name, m in specs:  # every candidate's mixture first: equal ones are trained once
        directory = here / name
        if main and not (directory / "mixture.json").is_file():
            surrogate: dict[str, Any] | None = None
            if m is None:
                volumes, surrogate = surrogate_volumes(config, paths, k, base, max(steps))
                rule: Any = _Volumes(volumes)
            else:
                rule = IdealRule(update, step=m)
            mixture, record = update_mixture(training, rule, constraints, config.seed, signals)
            record["step"] = m
            if surrogate is not None:
                record["surrogate"] = surrogate
            write_mixture_dir(directory, training, mixture, extra={"update": record},
                              data_subdir="data")  # fmt: skip
    barrier()
    specs = distinct(here, specs, training.mixture.volumes, config.tolerance)
    if not specs:
        if main:
            reason = (
                "no candidate step moves the mixture: every sensitivity within update.min_z "
                "standard errors of 0, or the steps too small at this radius"
            )
            if "rescored" in signals:
                reason += " (every copy scored: update.rescore)"
            atomic_write_json(here / CHOICE, {"kept": None, "from_round": base, "reason": reason})
        barrier()
        return False
    for n, (name, _) in enumerate(specs, 1):
        directory = here / name
        if not (directory / "model").is_dir():
            log.info("round %d: candidate %s (%d of %d)", target, name, n, len(specs))
            train_round(config, paths, target, here=directory,
                        data=search_rows(directory, fraction, main))  # fmt: skip
        if main and not (directory / "metrics.json").is_file():
            log.info("round %d: evaluating candidate %s", target, name)
            atomic_write_json(directory / "metrics.json",
                              evaluate_round(config, paths, directory / "model", target))  # fmt: skip
        barrier()
    if main:
        _keep(config, paths, target, base, scale, specs, split, signals)
        adopt(paths, target)
    barrier()
    return (paths.round(target) / "mixture.json").is_file()


def distinct(
    here: Path, specs: list[tuple[str, float | None]], base: dict[str, int], tolerance: float
) -> list[tuple[str, float | None]]:
    """The candidates worth training: those that move some domain's volume by at least
    `tolerance` (relative) from the base round's, and differ from every earlier candidate (two
    steps that the constraints and rounding bring to the same mixture are one training). Empty
    when the direction moves nothing (every sensitivity within its noise): no step is taken."""
    seen: list[dict[str, int]] = []
    kept = []
    for name, m in specs:
        volumes = {
            d: e["volume"] for d, e in read_json(here / name / "mixture.json")["domains"].items()
        }
        moved = max(abs(volumes[d] / base[d] - 1.0) if base[d] else 0.0 for d in base)
        if moved >= tolerance and volumes not in seen:
            seen.append(volumes)
            kept.append((name, m))
    return kept


def _keep(
    config: RunConfig,
    paths: RunPaths,
    target: int,
    base: int,
    scale: float,
    specs: list[tuple[str, float | None]],
    split: ReferenceSplit | None,
    signals: dict[str, Any],
) -> None:
    """Choose among the base round and the evaluated candidates, and write round `target`'s
    mixture: the kept candidate's, with the choice in its update record. The base is a
    candidate of step 0: under `update.ties: lowest` (the default) it stays when its held-out
    loss is the lowest; under `smaller` when no candidate beats it by more than its paired
    standard error. Then no round is written and RUN/step-K/choice.json says why."""
    here = step_dir(paths, target)
    base_metrics = read_json(paths.round(base) / "metrics.json")
    weights = _weights(config, base_metrics)
    rows = split.selection if split is not None else None
    candidates = [Candidate(BASE, 0.0, 0.0, _row_losses(base_metrics, rows))]
    manifests, metrics = {}, {BASE: base_metrics}
    for name, m in specs:
        manifests[name] = read_json(here / name / "mixture.json")
        metrics[name] = read_json(here / name / "metrics.json")
        moved = max(abs(b) for b in manifests[name]["update"]["beta_realised"].values())
        candidates.append(Candidate(name, m, moved, _row_losses(metrics[name], rows)))
    chosen, table = choose(candidates, weights, config.update.ties)
    for row in table:
        row["reference_loss_mean"] = metrics[row["name"]]["reference_loss_mean"]
        row["test_loss_mean"] = metrics[row["name"]].get("test_loss_mean")
    held = {c: len(v) for c, v in (rows or {}).items()}
    selection = {"fraction": config.update.selection, "rows": held or "all"}
    if chosen == 0:
        reason = {
            "lowest": f"no candidate's held-out reference loss was below round {base}'s",
            "smaller": f"no candidate beat round {base} by more than its paired standard error",
            "larger": f"every candidate was above round {base} by more than its paired standard "
            "error",
        }[config.update.ties]
        log.info(
            "round %d: %s on the held-out reference rows (%s); round %d stays the best",
            target, reason, ", ".join(n for n, _ in specs), base,
        )  # fmt: skip
        atomic_write_json(here / CHOICE, {
            "kept": None, "from_round": base, "reason": reason, "candidates": table,
            "scale": scale, "selection": selection,
        })  # fmt: skip
        return
    kept, step = specs[chosen - 1]
    record = dict(manifests[kept]["update"])
    beta = record["beta_realised"]
    sensitivity = signals["sensitivity"]
    predicted = float(sum(sensitivity[d] * beta.get(d, 0.0) for d in sensitivity))
    realised = objective_value(config, metrics[kept]) - objective_value(config, base_metrics)
    largest = config.update.max_step / max(config.update.candidates)
    scale_next, rho = radius_scale(scale, realised, predicted, largest)
    record.update(
        rule="ideal", candidate=kept, candidates=table, scale=scale, scale_next=scale_next,
        rho=rho, predicted=predicted, realised=realised, selection=selection,
    )  # fmt: skip
    log.info(
        "round %d: kept candidate %s of %s (held-out reference loss %.4f); radius x%.3g -> x%.3g",
        target, kept, ", ".join(n for n, _ in specs), table[chosen]["selection_loss"], scale,
        scale_next,
    )  # fmt: skip
    atomic_write_json(here / CHOICE, {"kept": kept, "from_round": base, "candidates": table})
    update = UpdateRecord(
        rule="ideal", from_round=base, step=step, beta_realised=record.pop("beta_realised"),
        details={k: v for k, v in record.items() if k not in ("rule", "step", "from_round")},
    )  # fmt: skip
    kept_training = load_training_set(here / kept)
    write_mixture_dir(paths.round(target), kept_training, kept_training.mixture,
                      extra={"update": update.to_json()}, data_subdir="data")  # fmt: skip
    note_use(paths.round(base) / "influence.json", target, step, update.details.get("beta", {}))


def note_use(influence: Path, round_: int, step: float | None, beta: dict[str, float]) -> None:
    """influence.json says which rounds stepped from it and the step the latest took."""
    document = read_json(influence)
    used = [u for u in document.get("used_by", []) if u.get("round") != round_]
    used.append({"round": round_, "step": step, "beta": beta})
    document["used_by"] = used
    if step is not None:
        document["beta"], document["step"] = beta, step
    atomic_write_json(influence, document)
