"""Methods side by side at the same budget: `ideal compare CONFIG.yaml --methods LIST --seeds K`.

Every method starts from the config's D0 with the same total volume and the same training recipe,
over K seeds; each (method, seed) is an ordinary run directory `OUT/<method>/seed-<s>/`, so every
run is resumable and has its own report. Round 0 (training on D0) is the same for every method of a
seed: it is trained once and copied into the others.

    original      D0 as given (round 0 only)
    uniform       one update to equal volumes per domain, then train
    temperature   one update to volumes ~ pool size ** (1 / T) (`update.temperature`), then train
    first-order   the IDEAL rule with identity curvature (plain gradient dot products), all rounds
    ideal         the IDEAL rule with EK-FAC, all rounds
    ideal-kfac    the IDEAL rule with K-FAC, all rounds
    random        K random mixtures on the simplex at the same total (`--random-candidates`), each
                  trained; the one with the best reference objective is kept (its compute counts all K)

Not yet here (issue 6): DoReMi, DoGE and the oracle grid.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ideal.artifacts import atomic_write_json
from ideal.config import RunConfig
from ideal.errors import IdealError
from ideal.loop import prepare_run, run_loop
from ideal.rules import random_shares

log = logging.getLogger("ideal")

METHODS: dict[str, dict[str, Any]] = {
    "original": {"rounds": 0},
    "uniform": {"rounds": 1, "rule": "uniform"},
    "temperature": {"rounds": 1, "rule": "temperature"},
    "first-order": {"rule": "ideal", "curvature": "identity"},
    "ideal": {"rule": "ideal", "curvature": "ekfac"},
    "ideal-kfac": {"rule": "ideal", "curvature": "kfac"},
    "random": {"rounds": 1, "rule": "fixed"},
}


def method_config(config: RunConfig, method: str, seed: int) -> RunConfig:
    """The config of one (method, seed): same data, recipe and total; the method's rule and rounds."""
    spec = METHODS[method]
    suite = replace(config.suite, seed=seed) if config.suite is not None else None
    return replace(
        config,
        suite=suite,
        seed=seed,
        rounds=spec.get("rounds", config.rounds),
        train=replace(config.train, seed=seed),
        update=replace(config.update, rule=spec.get("rule", config.update.rule)),
        influence=replace(
            config.influence, curvature=spec.get("curvature", config.influence.curvature)
        ),
    )


def _share_round_zero(source: Path, target: Path) -> None:
    """Copy a finished round 0 (mixture, data, model, metrics) into a prepared run directory."""
    if (target / "round-0").exists() or not (source / "round-0" / "metrics.json").is_file():
        return
    destination = target / "round-0"
    tmp = target / ".round-0.copying"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in ("mixture.json", "metrics.json"):
        shutil.copy2(source / "round-0" / name, tmp / name)
    for name in ("data", "model"):
        shutil.copytree(source / "round-0" / name, tmp / name)
    tmp.rename(destination)


def _stats(values: list[float | None]) -> dict[str, float | None]:
    clean = [v for v in values if v is not None]
    if not clean:
        return {"mean": None, "std": None}
    return {
        "mean": float(np.mean(clean)),
        "std": float(np.std(clean, ddof=1)) if len(clean) > 1 else 0.0,
    }


def _domains(config: RunConfig) -> list[str]:
    if config.suite is not None:
        return sorted(d.name for d in config.suite.domains)
    from ideal.data import load_domains

    return sorted(load_domains(config.train_data or ""))


def _seconds(summary: dict[str, Any], count_round_zero: bool = True) -> float:
    rounds = summary["rounds"] if count_round_zero else summary["rounds"][1:]
    return float(sum(v or 0.0 for r in rounds for v in r["seconds"].values()))


def _run_one(config: RunConfig, run: Path, first: Path | None) -> dict[str, Any]:
    """One run directory, its round 0 copied from `first` when given; returns its summary."""
    if first is not None:
        prepare_run(config, run, resume=True)
        _share_round_zero(first, run)
    return run_loop(config, run, resume=True)


def _random_run(
    config: RunConfig, seed: int, out: Path, first: Path | None, candidates: int
) -> tuple[dict[str, Any], float]:
    """K random mixtures, each trained; the best by final mean reference loss, and the total compute."""
    rng = np.random.default_rng([seed, 4242])
    best: dict[str, Any] | None = None
    seconds = 0.0
    for k in range(candidates):
        shares = dict(random_shares(_domains(config), rng))
        candidate = replace(config, update=replace(config.update, shares=shares))
        summary = _run_one(candidate, out / f"candidate-{k}", first)
        seconds += _seconds(summary, count_round_zero=k == 0)  # D0 is trained (or copied) once
        first = first or out / f"candidate-{k}"
        loss = summary["rounds"][-1]["reference_loss_mean"]
        if best is None or loss < best["rounds"][-1]["reference_loss_mean"]:
            best = {**summary, "candidate": k, "shares": shares}
    assert best is not None
    return best, seconds


def run_compare(
    config: RunConfig,
    methods: list[str],
    seeds: list[int],
    out: str | Path,
    random_candidates: int = 4,
) -> dict[str, Any]:
    """Run every (method, seed); write OUT/compare.json; returns it."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise IdealError(f"--methods: unknown '{unknown[0]}'; choose from {', '.join(METHODS)}")
    if not seeds:
        raise IdealError("--seeds must be at least 1")
    if random_candidates < 1:
        raise IdealError("--random-candidates must be at least 1")
    out = Path(out)
    results: dict[str, Any] = {}
    for method in methods:
        runs = []
        for seed in seeds:
            run = out / method / f"seed-{seed}"
            config_k = method_config(config, method, seed)
            first_run = out / methods[0] / f"seed-{seed}"  # round 0 is trained there, then shared
            first = None if method == methods[0] else first_run
            if first is not None and methods[0] == "random":
                first = first_run / "candidate-0"
            log.info("compare: %s, seed %d", method, seed)
            extra: dict[str, Any] = {}
            if method == "random":
                summary, seconds = _random_run(config_k, seed, run, first, random_candidates)
                extra = {"candidate": summary["candidate"], "shares": summary["shares"]}
            else:
                summary = _run_one(config_k, run, first)
                seconds = _seconds(summary)
            final = summary["rounds"][-1]
            runs.append(
                {
                    "seed": seed,
                    "rounds": len(summary["rounds"]) - 1,
                    "final": final,
                    "seconds": seconds,
                    **extra,
                }
            )
        capabilities = list(runs[0]["final"]["test_accuracy"])
        results[method] = {
            "runs": runs,
            "test_accuracy_mean": _stats([r["final"]["test_accuracy_mean"] for r in runs]),
            "test_accuracy_worst": _stats([r["final"]["test_accuracy_worst"] for r in runs]),
            "reference_loss_mean": _stats([r["final"]["reference_loss_mean"] for r in runs]),
            "per_capability": {
                c: _stats([r["final"]["test_accuracy"][c] for r in runs]) for c in capabilities
            },
            "seconds": _stats([r["seconds"] for r in runs]),
        }
    document = {"methods": results, "seeds": seeds, "config_hash": config.hash()}
    atomic_write_json(out / "compare.json", document)
    return document
