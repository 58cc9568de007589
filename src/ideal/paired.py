"""Statistics over seeds for `ideal compare` (compare.json), pure functions of its results.

    stats               mean and sd over seeds
    method_stats        one method's entry: scores, per capability, seconds and trainings over seeds
    paired_differences  each method minus a baseline, seed by seed, with a verdict at VERDICT_Z
                        standard errors of the paired difference (accuracy and held-out loss,
                        mean, worst and per capability)
    gap_closure         (method - original) / (oracle - original) of mean test accuracy
    cost_in_sfts        each run's compute in units of one SFT with the full recipe, same seed
    transfer            a searched mixture against the full search's, both trained with the full
                        recipe, paired per seed

Each method's entry holds its runs, one per seed: {"seed", "selected": the returned round's
record (summary.json), "seconds", "sft_seconds", ...}.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def stats(values: list[float | None]) -> dict[str, float | None]:
    """Mean and sd (ddof 1; 0 for one value) over seeds of the values that are not None."""
    clean = [v for v in values if v is not None]
    if not clean:
        return {"mean": None, "std": None}
    return {
        "mean": float(np.mean(clean)),
        "std": float(np.std(clean, ddof=1)) if len(clean) > 1 else 0.0,
    }


VERDICT_Z = 2.0  # standard errors of the paired difference that separate two methods


def verdict(mean: float, stderr: float | None, z: float = VERDICT_Z) -> str:
    """ "better" / "worse" when the mean paired difference is more than z standard errors from 0,
    else "not separable" (also with one seed, where the difference has no error)."""
    if stderr is None or not np.isfinite(stderr):
        return "not separable"
    if mean > z * stderr:
        return "better"
    if mean < -z * stderr:
        return "worse"
    return "not separable"


# the returned round's scores compared seed by seed: higher accuracy, lower held-out loss is better
HIGHER_IS_BETTER = ("test_accuracy_mean", "test_accuracy_worst")
LOWER_IS_BETTER = ("test_loss_mean", "test_loss_worst")


def paired_differences(results: dict[str, Any], baseline: str) -> dict[str, Any]:
    """Per method: its selected round's mean and worst test accuracy and test loss minus the
    baseline's, seed by seed (the same seeds, hence the same D0, split and base model), their
    mean, sd and standard error sd / sqrt(seeds), and a verdict at VERDICT_Z standard errors
    ("better" is higher accuracy, lower loss); and the same per capability."""

    def by_seed(method: str, key: str, capability: str | None = None) -> dict[int, Any]:
        out = {}
        for r in results[method]["runs"]:
            value = r["selected"].get(key)
            out[r["seed"]] = value.get(capability) if capability is not None and value else value
        return out

    out: dict[str, Any] = {}
    capabilities = _capabilities(results[baseline])
    for method in results:
        if method == baseline:
            continue
        entry = {
            key: paired_difference(by_seed(method, key), by_seed(baseline, key))
            for key in HIGHER_IS_BETTER
        }
        for key in LOWER_IS_BETTER:
            entry[key] = paired_difference(
                by_seed(method, key), by_seed(baseline, key), lower_is_better=True
            )
        entry["per_capability"] = {
            c: {
                "test_accuracy": paired_difference(
                    by_seed(method, "test_accuracy", c), by_seed(baseline, "test_accuracy", c)
                ),
                "test_loss": paired_difference(
                    by_seed(method, "test_loss", c), by_seed(baseline, "test_loss", c), True
                ),
            }
            for c in capabilities
        }
        out[method] = entry
    return out


def _capabilities(entry: dict[str, Any]) -> list[str]:
    first = entry["runs"][0]["selected"]
    return sorted({*(first.get("test_accuracy") or {}), *(first.get("test_loss") or {})})


def paired_difference(
    ours: dict[int, float | None], theirs: dict[int, float | None], lower_is_better: bool = False
) -> dict[str, Any]:
    """ours - theirs on the seeds both have a value for: per seed, mean, sd, standard error,
    and the verdict at VERDICT_Z standard errors (for a loss, `lower_is_better`: a negative
    difference is "better")."""
    seeds = sorted(s for s in set(ours) & set(theirs) if None not in (ours[s], theirs[s]))
    diffs = [ours[s] - theirs[s] for s in seeds]  # type: ignore[operator]
    mean = float(np.mean(diffs)) if diffs else float("nan")
    sd = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else None
    stderr = sd / np.sqrt(len(diffs)) if sd is not None else None
    sign = -1.0 if lower_is_better else 1.0
    return {"per_seed": diffs, "seeds": seeds, "mean": mean, "sd": sd, "stderr": stderr,
            "verdict": verdict(sign * mean, stderr)}  # fmt: skip


def method_stats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One method's entry of compare.json from its runs (one per seed): the returned round's
    scores as mean and sd over seeds, per capability, its compute and its trainings."""
    selected = [r["selected"] for r in runs]
    capabilities = sorted({c for s in selected for c in (s.get("test_accuracy") or {})})
    losses = sorted({c for s in selected for c in (s.get("test_loss") or {})})
    return {
        "runs": runs,
        **{
            key: stats([s.get(key) for s in selected])
            for key in (*HIGHER_IS_BETTER, *LOWER_IS_BETTER, "reference_loss_mean")
        },
        "per_capability": {
            c: stats([(s.get("test_accuracy") or {}).get(c) for s in selected])
            for c in capabilities
        },
        "per_capability_loss": {
            c: stats([(s.get("test_loss") or {}).get(c) for s in selected]) for c in losses
        },
        "seconds": stats([r["seconds"] for r in runs]),
        "trainings": stats([r.get("trainings") for r in runs]),
    }


def cost_in_sfts(results: dict[str, Any], unit_method: str | None, what: str) -> dict[str, Any]:
    """Every run's compute in units of one SFT with the full recipe on the same seed: the
    round-0 (D0) training of `unit_method` (the method whose round 0 the others share), or,
    when only ideal-search ran, its final training (`what` says which). Adds `cost_in_sfts` to
    each run and, as stats over seeds, to each method; returns the unit per seed.

    `unit_method` None: each run's own SFT (its `sft_seconds`), for runs measured apart (the
    ledger's cells: another time, another load on the machine), whose seconds only their own
    training measures alike, or when no run shares its round 0 (ideal-search alone)."""
    unit = (
        {}
        if unit_method is None
        else {r["seed"]: r["sft_seconds"] for r in results[unit_method]["runs"]}
    )
    for entry in results.values():
        for r in entry["runs"]:
            seconds = r.get("sft_seconds") if unit_method is None else unit.get(r["seed"])
            r["cost_in_sfts"] = r["seconds"] / seconds if seconds else None
        entry["cost_in_sfts"] = stats([r["cost_in_sfts"] for r in entry["runs"]])
    if unit_method is None:
        return {"seconds": {}, "of": f"each cell's own {what}"}
    return {"seconds": {str(s): v for s, v in unit.items()}, "of": f"{unit_method}'s {what}"}


def transfer(results: dict[str, Any], searched: str, full: str) -> dict[str, Any]:
    """Does the searched mixture transfer? `searched`'s returned mixture and `full`'s (searched
    with the full recipe every round), both trained with the full recipe, paired per seed:
    accuracy differences with verdicts, the reference-loss difference (lower is better), how
    far apart the two mixtures' shares are (total variation), and whether the searched one is
    within one paired standard error of the full search, or better."""

    def by_seed(method: str, key: str) -> dict[int, Any]:
        return {r["seed"]: r["selected"][key] for r in results[method]["runs"]}

    def shares(volumes: dict[str, int]) -> dict[str, float]:
        total = sum(volumes.values())
        return {d: v / total for d, v in volumes.items()}

    def difference(key: str, seed: int) -> float | None:
        a, b = by_seed(searched, key)[seed], by_seed(full, key)[seed]
        return None if a is None or b is None else a - b

    ours, theirs = by_seed(searched, "volumes"), by_seed(full, "volumes")
    seeds = sorted(set(ours) & set(theirs))
    per_seed = []
    for seed in seeds:
        a, b = shares(ours[seed]), shares(theirs[seed])
        per_seed.append({
            "seed": seed,
            "shares": a,
            f"{full}_shares": b,
            "share_distance": 0.5 * sum(abs(a[d] - b.get(d, 0.0)) for d in a),
            "test_accuracy_mean": difference("test_accuracy_mean", seed),
            "reference_loss_mean": difference("reference_loss_mean", seed),
        })  # fmt: skip
    accuracy = paired_difference(
        by_seed(searched, "test_accuracy_mean"), by_seed(full, "test_accuracy_mean")
    )
    loss = paired_difference(
        by_seed(searched, "reference_loss_mean"), by_seed(full, "reference_loss_mean"), True
    )
    within = None
    if accuracy["stderr"] is not None:
        within = bool(accuracy["mean"] >= -accuracy["stderr"])
    return {
        "searched": searched,
        "against": full,
        "seeds": seeds,
        "per_seed": per_seed,
        "test_accuracy_mean": accuracy,
        "test_accuracy_worst": paired_difference(
            by_seed(searched, "test_accuracy_worst"), by_seed(full, "test_accuracy_worst")
        ),
        "reference_loss_mean": loss,
        "within_one_stderr_or_better": within,
        "cost_in_sfts": {m: results[m]["cost_in_sfts"] for m in (searched, full)},
    }


def gap_closure(results: dict[str, Any]) -> dict[str, Any] | None:
    """(method - original) / (oracle - original) of mean test accuracy, per seed then averaged.

    Needs `original` and `oracle-grid` in the comparison; None otherwise."""
    if "original" not in results or "oracle-grid" not in results:
        return None

    def by_seed(method: str) -> dict[int, float]:
        return {r["seed"]: r["selected"]["test_accuracy_mean"] for r in results[method]["runs"]}

    original, oracle = by_seed("original"), by_seed("oracle-grid")
    closure: dict[str, Any] = {}
    for method in results:
        if method in ("original", "oracle-grid"):
            continue
        values = by_seed(method)
        # the seeds on which every one of the three has an accuracy (an external evaluator may
        # score none)
        seeds = sorted(s for s in values if None not in (values[s], original.get(s), oracle.get(s)))
        if not seeds:
            closure[method] = {"closure": None, "oracle_minus_original": None}
            continue
        method_mean, base, top = (
            float(np.mean([d[s] for s in seeds])) for d in (values, original, oracle)
        )
        gap = top - base
        closure[method] = {
            "closure": (method_mean - base) / gap if gap > 0 else None,
            "oracle_minus_original": gap,
        }
    return closure
