"""The influence step end to end (`ideal influence`, and each round of `ideal run`): model and data
from disk -> influence scores -> files. One InfluenceJob (settings.py) says what to compute.

Writes, atomically, into a new directory: `influence.json` (SPEC.md), `influence.csv` (references x
domains) and `influence.png` (heatmap with the sign convention written on it).

The objective differentiated (`job.loss`: example | token) is the one the model was trained
with. `ideal influence` takes `--loss`, or else what the model directory's trainer record says
(`recorded_loss`); `ideal run` resolves `influence.loss: auto` from `train.backend`. influence.json
records the value (`loss`) and where it came from (`loss_source`). Under `token` the size factor is
each domain's share of the mixture's target tokens, counted over the whole mixture (every unique
row with its copies, tokenized once more: cheap next to the passes).
"""

from __future__ import annotations

import csv
import io
import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ideal.artifacts import (
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    check_new_output_dir,
    read_json,
)
from ideal.data.mixture import sample_counts, sample_mixture
from ideal.data.mixture_io import load_training_set
from ideal.data.rows import OnInvalid, load_domains, tokenize_examples
from ideal.distributed import barrier, init_from_env, is_main, world_size
from ideal.errors import IdealError
from ideal.hf import load_causal_lm, load_tokenizer
from ideal.influence.capture import select_layers
from ideal.influence.engine import domain_influence
from ideal.influence.objective import result_summary
from ideal.influence.passes import Progress, no_progress
from ideal.influence.plan import layer_groups, parse_size
from ideal.influence.results import InfluenceResult, WeightedSet
from ideal.influence.settings import InfluenceJob
from ideal.lm import target_logits
from ideal.report.plots import influence_heatmap
from ideal.settings import LOSSES

log = logging.getLogger(__name__)


def compute_influence(
    model_dir: str | Path,
    train: str | Path,
    reference: str | Path,
    job: InfluenceJob = InfluenceJob(),
    progress: Progress = no_progress,
    features: str | Path | None = None,
) -> tuple[InfluenceResult, dict[str, Any]]:
    """Influence of every training domain on every reference capability; returns (result, influence.json).

    Of `job.config`: `curvature_examples` copies of the mixture (None: all) fit the curvature;
    each domain's score uses `sample` of its copies, at most `max_examples`; `memory` (bytes or
    "70GiB") splits the layers into groups whose statistics fit it (one set of passes per group);
    `domain_rows` (settings.DOMAIN_ROWS) says whose gradient scores a domain: its copies in the
    mixture, or the pool rows not in it yet. An example the model has fitted many times says
    little about what fresh rows of its domain would do; fresh rows are what raising the volume
    adds. `job.loss` is the objective differentiated, `job.loss_source` says where it came from
    (recorded as given). With `job.top_layers` K > 0 the layers lie in the top K blocks, and with
    `job.feature_cache` every pass runs them from the states entering them, cached under
    `features` (ideal.backends.training.top_layers: the training's cache, found again)."""
    start = time.perf_counter()
    config, settings = job.config, job.settings
    model, tokenizer, selected, training, domains, refs, curvature = _inputs(
        model_dir, train, reference, job
    )
    groups = None
    if config.memory is not None:
        groups = layer_groups(model, selected, len(refs), parse_size(config.memory), settings)
    sets = (*domains.values(), *refs.values(), curvature)
    forward, filled = cached_forward(model, job, sets, tokenizer.pad_token_id, features)
    prepare = time.perf_counter() - start
    result = domain_influence(
        model, selected, domains, refs, settings, tokenizer.pad_token_id, progress, curvature,
        groups, forward,
    )  # fmt: skip
    # the feature cache's fill is its own item (part of `total`, as of load_and_tokenize)
    result.seconds = {"load_and_tokenize": prepare - filled, "fill": filled, **result.seconds}
    volumes = training.mixture.volumes
    sizes = {name: len(ws.items) for name, ws in refs.items()}
    target_tokens = None
    if settings.loss == "token":  # the size factor t_i/T: target tokens of the whole mixture
        target_tokens = mixture_target_tokens(training, tokenizer, job.max_length, job.on_invalid)
    summary = result_summary(
        result, target_tokens or volumes, job.objective, job.size_factor, sizes
    )
    recorded = recorded_loss(model_dir)
    trainer_targets = recorded_target_tokens(model_dir, target_tokens)
    if trainer_targets is not None and trainer_targets["differs"] and settings.loss == "token":
        log.warning(
            "influence: the trainer (%s) trained on other target tokens than the t_i/T weights "
            "count: %s",
            trainer_targets["tool"],
            trainer_targets["shift"],
        )
    if recorded is not None and recorded[0] != settings.loss:
        log.warning(
            "influence: differentiating the %s-normalised objective, but %s says the model was "
            "trained with %s normalisation",
            settings.loss,
            recorded[1],
            recorded[0],
        )
    document: dict[str, Any] = {
        "domains": result.domains,
        "references": result.references,
        "scores": result.scores.tolist(),
        "stderr": None if result.stderr is None else result.stderr.tolist(),
        "examples": result.examples,
        "sign_convention": "s_ji > 0: training more on domain i is predicted to lower the loss on reference j",
        "volumes": volumes,
        "loss": settings.loss,
        "loss_source": job.loss_source or "settings",
        "loss_recorded": None if recorded is None else {"loss": recorded[0], "file": recorded[1]},
        "target_tokens": target_tokens,
        "trainer_target_tokens": trainer_targets,
        **summary,
        "reference_loss": result.reference_losses,
        "curvature": settings.curvature,
        "damping": {
            "relative": None if settings.damping_abs is not None else settings.damping,
            "absolute": settings.damping_abs,
            "per_layer": result.damping,
        },
        "layers": result.layers,
        "fisher": settings.fisher,
        "sample": config.sample,
        "max_examples": config.max_examples,
        "domain_rows": config.domain_rows,
        "curvature_examples": result.curvature_examples,
        "curvature_sample": {
            "requested": config.curvature_examples,
            "unique": len(curvature.items),
        },
        "groups": result.groups,
        "refine": {  # per layer group (lists): each reference's relative residual, start then
            # every step; the EK-FAC solution's own residual and the scale the start gave it
            "iterations": settings.refine,
            **{
                key: [group[key] for group in result.refinement]
                for key in ("residuals", "preconditioned_residual", "start_scale")
            },
        },
        "memory": config.memory,
        "sampled_examples": {d: len(ws.items) for d, ws in domains.items()},
        "sampled_weight": {d: float(sum(ws.weights)) for d, ws in domains.items()},
        "retokenized": {  # sampled rows whose answer is encoded after the prompt's tokens
            "domains": {d: sum(i.retokenized for i in ws.items) for d, ws in domains.items()},
            "references": {r: sum(i.retokenized for i in ws.items) for r, ws in refs.items()},
        },
        "tokens": result.tokens,
        "settings": {**asdict(settings), "max_length": job.max_length, "layers": job.layers},
        "model": str(Path(model_dir).resolve()),
        "train": {"path": str(Path(train).resolve()), "files": training.files},
        "seconds": {**result.seconds, "total": time.perf_counter() - start},
    }
    return result, document


def cached_forward(
    model: Any, job: InfluenceJob, sets: Any, pad_id: int, root: str | Path | None
) -> tuple[Any, float]:
    """The passes' forward: `target_logits`, or with `job.top_layers` and `job.feature_cache` a
    feature cache's (under `root`, None: in memory), filled with every row of `sets` (the main
    process writes, the others read); and the seconds the fill computed."""
    if not (job.top_layers and job.feature_cache):
        return target_logits, 0.0
    from ideal.backends.training.top_layers import FeatureCache

    cache = FeatureCache(root, model, job.top_layers, job.max_length)
    rows = [item for ws in sets for item in ws.items]
    filled = cache.fill_shared(model, rows, pad_id, job.settings.batch_size)
    return cache.target_logits, filled


def _inputs(
    model_dir: str | Path, train: str | Path, reference: str | Path, job: InfluenceJob
) -> tuple[
    Any, Any, dict[str, Any], Any, dict[str, WeightedSet], dict[str, WeightedSet], WeightedSet
]:
    """Model on its device, tokenizer, selected layers, training set, every domain's sample, the
    reference sets and the curvature sample, as the influence step uses them. Only the sampled
    examples are tokenized."""
    config, max_length, on_invalid = job.config, job.max_length, job.on_invalid
    training = load_training_set(train, on_invalid)
    references = load_domains(reference, on_invalid)
    model = load_causal_lm(model_dir)
    tokenizer = load_tokenizer(model_dir)
    selected = select_layers(model, job.layers)
    if job.top_layers:  # the blocks below never change (and never run from cached features)
        from ideal.backends.training.top_layers import check_inside_top, top_modules

        if job.layers is None:
            selected = top_modules(model, job.top_layers, selected)
            if not selected:
                raise IdealError(
                    f"influence.layers: no MLP projection lies in the top {job.top_layers} "
                    "blocks that train; name the layers"
                )
        check_inside_top(model, job.top_layers, selected, "influence.layers")
    device = torch.device(
        f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    )
    model.to(device)

    def weighted(name: str, sampled: np.ndarray) -> tuple[list[Any], list[float]]:
        keep = np.flatnonzero(sampled)
        examples = [training.pool[name].examples[i] for i in keep]
        weight = {e.source: float(sampled[i]) for e, i in zip(examples, keep, strict=True)}
        items, _ = tokenize_examples(examples, tokenizer, max_length, on_invalid)
        return items, [weight[item.source] for item in items]

    domains: dict[str, WeightedSet] = {}
    for name, counts in training.mixture.counts.items():
        if config.domain_rows == "unseen" and np.any(counts == 0):
            counts = (np.asarray(counts) == 0).astype(np.int64)  # each row not yet drawn, once
        rng = np.random.default_rng([job.seed, zlib.crc32(name.encode()), 17])
        sampled = sample_counts(counts, config.sample, rng, config.max_examples)
        items, weights = weighted(name, sampled)
        domains[name] = WeightedSet(items, weights, population=float(np.sum(counts)))
    rng = np.random.default_rng([job.seed, 23])
    drawn = sample_mixture(training.mixture.counts, config.curvature_examples, rng)
    curvature_items: list[Any] = []
    curvature_weights: list[float] = []
    for name, sampled in drawn.items():
        items, weights = weighted(name, sampled)
        curvature_items += items
        curvature_weights += weights
    curvature = WeightedSet(curvature_items, curvature_weights, list(range(len(curvature_items))))
    refs = {
        name: WeightedSet.uniform(
            tokenize_examples(d.examples, tokenizer, max_length, on_invalid)[0]
        )
        for name, d in references.items()
    }
    return model, tokenizer, selected, training, domains, refs, curvature


def mixture_target_tokens(
    training: Any, tokenizer: Any, max_length: int | None, on_invalid: OnInvalid
) -> dict[str, int]:
    """t_i: target tokens of every domain's current multiset (each unique row x its copies)."""
    out = {}
    for name, counts in training.mixture.counts.items():
        keep = np.flatnonzero(counts)
        examples = [training.pool[name].examples[i] for i in keep]
        copies = {e.source: int(counts[i]) for e, i in zip(examples, keep, strict=True)}
        items, _ = tokenize_examples(examples, tokenizer, max_length, on_invalid)
        out[name] = sum(copies[item.source] * item.num_targets for item in items)
    return out


def recorded_loss(model_dir: str | Path) -> tuple[str, str] | None:
    """(loss, file) that the trainer of `model_dir` recorded, or None: `loss` of its
    train_settings.json (trl, command and presets write it) or train.json, else the builtin
    trainer's `settings.loss_normalization` in train_settings.json."""
    path = Path(model_dir)
    for name in ("train_settings.json", "train.json"):
        file = path / name
        if not file.is_file():
            continue
        try:
            record = read_json(file)
        except IdealError:  # an unreadable record says nothing about the loss
            continue
        if not isinstance(record, dict):
            continue
        value = record.get("loss")
        key = "loss"
        if value is None and isinstance(record.get("settings"), dict):
            value, key = record["settings"].get("loss_normalization"), "settings.loss_normalization"
        if value in LOSSES:
            return str(value), f"{file}: {key}"
    return None


def recorded_target_tokens(
    model_dir: str | Path, ours: dict[str, int] | None
) -> dict[str, Any] | None:
    """What the trainer of `model_dir` trained on, per domain, where its parity check counted it
    (train_settings.json `target_tokens`: a preset's rows through the tool's own data pipeline),
    against `ours` (the t_i of influence.loss token; else the check's own count of ideal's rows):
    {"tool", "ideal", "trainer", "share": {"ideal", "trainer"}, "relative_change", "differs",
    "shift"}; None without such a record. The scores differentiate ideal's rows; this says by how
    much the trainer's objective weighs each domain otherwise."""
    from ideal.backends.tools.parity import target_shift

    file = Path(model_dir) / "train_settings.json"
    try:
        record = read_json(file) if file.is_file() else None
    except IdealError:
        return None
    counted = record.get("target_tokens") if isinstance(record, dict) else None
    if not isinstance(counted, dict) or not isinstance(counted.get("trainer"), dict):
        return None
    trainer = {d: int(n) for d, n in counted["trainer"].items()}
    ideal = dict(ours) if ours is not None else {d: int(n) for d, n in counted["ideal"].items()}

    def shares(values: dict[str, int]) -> dict[str, float]:
        total = sum(values.values())
        return {d: n / total if total else 0.0 for d, n in values.items()}

    shift = target_shift({"ideal": ideal, "trainer": trainer})
    return {
        "tool": record.get("trainer_tool"),
        "ideal": ideal,
        "trainer": trainer,
        "share": {"ideal": shares(ideal), "trainer": shares(trainer)},
        "relative_change": {
            d: (trainer[d] - n) / n if n and d in trainer else None for d, n in ideal.items()
        },
        "differs": bool(shift),
        "shift": shift,
    }


def resolve_loss(model_dir: str | Path, loss: str | None) -> tuple[str, str]:
    """`ideal influence --loss`: (value, where it came from). Without the flag, the model
    directory's trainer record, else `example` (our trainer's default)."""
    if loss is not None:
        if loss not in LOSSES:
            raise IdealError(f"--loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        return loss, "--loss"
    recorded = recorded_loss(model_dir)
    if recorded is not None:
        return recorded
    return "example", f"default (no trainer record of the loss in {model_dir})"


def has_weights(model_dir: str | Path) -> bool:
    """Whether a model directory holds weights (or an adapter), not only a config."""
    path = Path(model_dir)
    return any(path.glob("*.safetensors")) or any(path.glob("*.bin"))


def probe_seconds(
    model_dir: str | Path,
    train: str | Path,
    reference: str | Path,
    job: InfluenceJob = InfluenceJob(),
    per_set: int | None = None,
) -> dict[str, Any]:
    """A short timed probe: the influence step on the first `per_set` examples (default: two
    batches) of every domain's sample, of every reference set and of the curvature sample,
    extrapolated per stage to the full sets (full batches, so per-example costs are those of the
    real run). The samples are those of `compute_influence` with the same job (its rows, its
    `on_invalid`, its `domain_rows`); the layers run as one group, whatever `memory` says.

    Passes over data scale with their example count; the eigendecomposition, the preconditioning
    and the scores do not (they depend on layer shapes only) and are taken as measured.
    """
    settings = job.settings
    model, tokenizer, selected, _, domains, refs, curvature = _inputs(
        model_dir, train, reference, job
    )
    size = per_set or 2 * settings.batch_size

    def head(ws: WeightedSet) -> WeightedSet:
        keys = ws.keys if ws.keys is not None else list(range(len(ws.items)))
        return WeightedSet(ws.items[:size], ws.weights[:size], keys[:size], ws.population)

    small_domains = {n: head(ws) for n, ws in domains.items()}
    small_refs = {n: head(ws) for n, ws in refs.items()}
    small_curvature = head(curvature)
    # the passes as the run makes them, from features cached in memory (the fill is untimed)
    sets = (*small_domains.values(), *small_refs.values(), small_curvature)
    forward, _ = cached_forward(model, job, sets, tokenizer.pad_token_id, None)
    result = domain_influence(
        model, selected, small_domains, small_refs, settings, tokenizer.pad_token_id,
        curvature=small_curvature, forward=forward,
    )  # fmt: skip
    count = {"domains": sum(len(ws.items) for ws in domains.values()),
             "references": sum(len(ws.items) for ws in refs.values()),
             "curvature": len(curvature.items)}  # fmt: skip
    probed = {"domains": sum(len(ws.items) for ws in small_domains.values()),
              "references": sum(len(ws.items) for ws in small_refs.values()),
              "curvature": len(small_curvature.items)}  # fmt: skip
    scale = {
        "curvature_covariances": count["curvature"] / probed["curvature"],
        "curvature_eigenvalue_correction": count["curvature"] / probed["curvature"],
        "exact_gauss_newton": count["curvature"] / probed["curvature"],
        "refine": count["curvature"] / probed["curvature"],
        "domains": count["domains"] / probed["domains"],
        "references": count["references"] / probed["references"],
    }
    estimate = {k: v * scale.get(k, 1.0) for k, v in result.seconds.items()}
    return {
        "probe_examples": probed,
        "examples": count,
        "probe_seconds": result.seconds,
        "estimate_seconds": estimate,
        "estimate_total": float(sum(estimate.values())),
    }


def scores_csv(result: InfluenceResult) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["reference", *result.domains])
    for j, reference in enumerate(result.references):
        writer.writerow([reference, *(repr(float(x)) for x in result.scores[j])])
    return buffer.getvalue()


def write_influence_files(
    directory: str | Path, result: InfluenceResult, document: dict[str, Any]
) -> None:
    """influence.json, influence.csv and influence.png into an existing directory, each atomically."""
    directory = Path(directory)
    atomic_write_json(directory / "influence.json", document)
    atomic_write_text(directory / "influence.csv", scores_csv(result))
    title = f"influence ({document['curvature']}, {document['fisher']} Fisher)"
    influence_heatmap(result.scores, result.domains, result.references,
                      directory / "influence.png", title, result.stderr)  # fmt: skip


def write_influence(out: str | Path, result: InfluenceResult, document: dict[str, Any]) -> Path:
    """The three files in a new directory `out`, which appears complete or not at all."""
    with atomic_dir(out) as tmp:
        write_influence_files(tmp, result, document)
    return Path(out)


def run_influence(
    out: str | Path,
    model_dir: str | Path,
    train: str | Path,
    reference: str | Path,
    job: InfluenceJob = InfluenceJob(),
    progress: Progress = no_progress,
    amend: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[InfluenceResult, dict[str, Any]]:
    """compute_influence, then write its files into the new directory `out` (the main process only).
    `amend`, if given, edits influence.json's content in place before it is written (the caller
    adds what is not the step's own, e.g. the beta of an update).

    Under `torchrun` / `accelerate launch` every process computes on its own shard and the
    statistics are summed across processes, so the files do not depend on the number of processes.
    """
    init_from_env()
    check_new_output_dir(out)  # fail before the heavy work
    result, document = compute_influence(model_dir, train, reference, job, progress)
    document["processes"] = world_size()
    if amend is not None:
        amend(document)
    if is_main():
        write_influence(out, result, document)
    barrier()
    return result, document
