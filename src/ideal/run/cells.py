"""One cell of a comparison: a run directory whose round 0 is shared, and the baselines that
train several mixtures and keep one (`random`: the best by reference loss, D0 among them;
`oracle-grid`: the best by test accuracy, an upper bound). ideal.run.compare runs the cells."""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ideal.artifacts import atomic_write_json, read_json
from ideal.errors import IdealError
from ideal.methods.rules import random_shares
from ideal.run.config import RunConfig
from ideal.run.loop import run_loop
from ideal.run.rundir import prepare_run

log = logging.getLogger("ideal")

GRID_LIMIT = 60  # mixtures per seed for oracle-grid


def share_round_zero(source: Path, target: Path) -> None:
    """Copy a finished round 0 (mixture, data, model, metrics) into a prepared run directory."""
    if (target / "round-0").exists() or not (source / "round-0" / "metrics.json").is_file():
        return
    destination = target / "round-0"
    tmp = target / ".round-0.copying"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    shutil.copy2(source / "round-0" / "mixture.json", tmp / "mixture.json")
    # the source run's decoding of D0 (eval.accuracy_rounds returned) is its own: not charged
    metrics = read_json(source / "round-0" / "metrics.json")
    decoded = metrics.pop("decode_seconds", 0.0) or 0.0
    metrics["seconds"] = (metrics.get("seconds") or 0.0) - decoded
    atomic_write_json(tmp / "metrics.json", metrics)
    for name in ("data", "model"):
        shutil.copytree(source / "round-0" / name, tmp / name)
    tmp.rename(destination)


def domains_of(config: RunConfig) -> list[str]:
    if config.suite is not None:
        return sorted(d.name for d in config.suite.domains)
    from ideal.data.rows import load_domains

    return sorted(load_domains(config.train_data or ""))


def run_seconds(summary: dict[str, Any], count_round_zero: bool = True) -> float:
    return float(sum(stage_seconds(summary, count_round_zero).values()))


def stage_seconds(summary: dict[str, Any], count_round_zero: bool = True) -> dict[str, float]:
    """A run's seconds by stage (train, fill, eval, influence, candidates, proxy) over its
    rounds, round 0 left out when another run paid for it."""
    rounds = summary["rounds"] if count_round_zero else summary["rounds"][1:]
    out: dict[str, float] = {}
    for r in rounds:
        for stage, seconds in r["seconds"].items():
            out[stage] = out.get(stage, 0.0) + (seconds or 0.0)
    return out


def run_one(
    config: RunConfig, run: Path, first: Path | None, features: Path, score_returned: bool = True
) -> dict[str, Any]:
    """One run directory, its round 0 copied from `first` when given; returns its summary. Every
    run of a compare shares one feature cache (train.top_layers), `features`. `score_returned`
    false: the returned round is left undecoded (eval.accuracy_rounds returned), for the caller
    to decode the one run it keeps among several."""
    if first is not None:
        prepare_run(config, run, resume=True, features=features)
        share_round_zero(first, run)
    return run_loop(
        config, run, resume=True, checked=True, features=features, score_returned=score_returned
    ).to_json()


def grid_shares(domains: list[str], resolution: int) -> list[dict[str, float]]:
    """Every share vector k / G with integer k_i >= 1 summing to G (`resolution`), in a fixed order."""
    count = len(domains)
    if resolution < count:
        raise IdealError(f"--grid-resolution must be >= the number of domains ({count})")
    points: list[dict[str, float]] = []

    def extend(prefix: list[int], left: int) -> None:
        if len(prefix) == count - 1:
            points.append(
                {d: k / resolution for d, k in zip(domains, [*prefix, left], strict=True)}
            )
            return
        for k in range(1, left - (count - len(prefix) - 1) + 1):
            extend([*prefix, k], left - k)

    extend([], resolution)
    return points


def oracle_candidates(
    config: RunConfig, d0: dict[str, int], resolution: int | None
) -> list[dict[str, float]]:
    """Uniform, then the grid; D0 itself is round 0 of every candidate (not trained again), so
    grid points equal to D0's shares or to uniform are dropped."""
    domains = domains_of(config)
    total = sum(d0.values())
    known = [{d: d0[d] / total for d in domains}]
    points: list[dict[str, float]] = []
    for p in [
        {d: 1.0 / len(domains) for d in domains},
        *grid_shares(domains, resolution or len(domains) + 2),
    ]:
        if all(max(abs(p[d] - q[d]) for d in domains) > 1e-9 for q in known):
            points.append(p)
            known.append(p)
    if len(points) > GRID_LIMIT:
        raise IdealError(
            f"oracle-grid: {len(points)} mixtures per seed for {len(domains)} domains (limit "
            f"{GRID_LIMIT}); lower --grid-resolution or compare on fewer domains"
        )
    return points


def candidates_run(
    config: RunConfig,
    out: Path,
    first: Path | None,
    shares_list: list[dict[str, float]],
    score: str,
    features: Path,
) -> tuple[dict[str, Any], float, list[dict[str, Any]], dict[str, float]]:
    """Each candidate mixture trained (round 0 shared); the best by `score` of its final round.

    score "reference_loss": lowest mean reference loss (a method may look at that);
    score "test_accuracy": highest mean test accuracy (the oracle; never a method).
    Returns the best run's summary (+ candidate, shares), the total compute, every candidate,
    and the compute by stage.
    """
    best: dict[str, Any] | None = None
    seconds, table, stages = 0.0, [], {}
    for k, shares in enumerate(shares_list):
        candidate = candidate_config(config, shares)
        # the oracle needs every candidate's accuracy; a method decodes only the one it keeps
        summary = run_one(
            candidate, out / f"candidate-{k}", first, features, score == "test_accuracy"
        )
        seconds += run_seconds(summary, count_round_zero=k == 0)  # D0 is trained (or copied) once
        for stage, spent in stage_seconds(summary, count_round_zero=k == 0).items():
            stages[stage] = stages.get(stage, 0.0) + spent
        first = first or out / f"candidate-{k}"
        last = summary["rounds"][-1]
        table.append(
            {
                "candidate": k,
                "shares": shares,
                "test_accuracy_mean": last["test_accuracy_mean"],
                "reference_loss_mean": last["reference_loss_mean"],
            }
        )
        if best is None or _better(last, best["rounds"][-1], score):
            best = {**summary, "candidate": k, "shares": shares}
        if k == 0:  # round 0 (D0 itself) is a candidate too
            zero = summary["rounds"][0]
            if _better(zero, best["rounds"][-1], score):
                best = {
                    **summary,
                    "rounds": summary["rounds"][:1],
                    "selected_round": 0,
                    "candidate": "D0",
                    "shares": None,
                }
    assert best is not None
    if score == "reference_loss":  # decode the kept one only (eval.accuracy_rounds returned)
        kept = 0 if best["candidate"] == "D0" else best["candidate"]
        round_ = 0 if best["candidate"] == "D0" else best["selected_round"]
        whole, extra = decode_kept(
            candidate_config(config, shares_list[kept]), out / f"candidate-{kept}", round_,
            features,
        )  # fmt: skip
        seconds += extra
        stages["eval"] = stages.get("eval", 0.0) + extra
        rounds = whole["rounds"][:1] if best["candidate"] == "D0" else whole["rounds"]
        best = {**best, "rounds": rounds, "compute": whole.get("compute")}
    return best, seconds, table, stages


def decode_kept(
    config: RunConfig, run: Path, round_: int, features: Path
) -> tuple[dict[str, Any], float]:
    """Round `round_` of `run` scored whole (its test sets decoded when the rounds were not):
    the run's summary afterwards and the seconds it took."""
    from ideal.run.stages import score_whole
    from ideal.run.summary import summarise_run

    paths = prepare_run(config, run, resume=True, features=features)
    metrics = paths.round(round_) / "metrics.json"
    before = read_json(metrics).get("seconds") or 0.0
    extra = 0.0
    if score_whole(config, paths, paths.round(round_), round_):
        extra = (read_json(metrics).get("seconds") or 0.0) - before
    return summarise_run(run).to_json(), extra


def random_mixtures(domains: list[str], seed: int, count: int) -> list[dict[str, float]]:
    """`random`'s candidates: `count` points of the simplex over the domains, seeded per seed."""
    rng = np.random.default_rng([seed, 4242])
    return [dict(random_shares(domains, rng)) for _ in range(count)]


def candidate_config(config: RunConfig, shares: dict[str, float]) -> RunConfig:
    return replace(config, update=replace(config.update, shares=shares))


def _better(a: dict[str, Any], b: dict[str, Any], score: str) -> bool:
    if score == "reference_loss":
        return a["reference_loss_mean"] < b["reference_loss_mean"]
    return (a["test_accuracy_mean"] or 0.0) > (b["test_accuracy_mean"] or 0.0)


def d0_volumes(config: RunConfig, run: Path, first: Path | None) -> dict[str, int]:
    """D0's volumes (from round 0 of an earlier method's run, or computed as the loop would)."""
    source = first or run / "candidate-0"
    mixture = source / "round-0" / "mixture.json"
    if mixture.is_file():
        return {d: e["volume"] for d, e in read_json(mixture)["domains"].items()}
    return config_d0(config)


def config_d0(config: RunConfig) -> dict[str, int]:
    """D0's volumes as the config sets them: the suite's, or every row of the data once."""
    if config.suite is not None:
        return {spec.name: spec.volume for spec in config.suite.domains}
    from ideal.data.rows import load_domains

    return {d: len(p.examples) for d, p in load_domains(config.train_data or "").items()}
