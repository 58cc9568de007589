"""Methods side by side at the same budget: `ideal compare CONFIG.yaml --methods LIST --seeds K`.

Every method starts from the config's D0 with the same total volume and the same training recipe,
over K seeds; each (method, seed) is an ordinary run directory `OUT/<method>/seed-<s>/`, so every
run is resumable and has its own report. Round 0 (training on D0) is the same for every method of a
seed: it is trained once and copied into the others (not into ideal-search, whose rounds train
with the search recipe). Its training time is the unit of every method's `cost_in_sfts` (with
`--ledger`, each cell's own full-recipe SFT: cells are measured apart); the statistics over
seeds (paired differences, gap closure, cost, transfer) are ideal.paired's.

    original      D0 as given (round 0 only)
    uniform       one update to equal volumes per domain, then train
    temperature   one update to volumes ~ pool size ** (1 / T) (`update.temperature`), then train
    first-order   the IDEAL rule with identity curvature (plain gradient dot products), all rounds
    ideal         the IDEAL rule with EK-FAC, all rounds
    ideal-kfac    the IDEAL rule with K-FAC, all rounds
    ideal-trust   the IDEAL rule with EK-FAC, one step per round steered by its trust region
                  (`update.trust_region`, no candidate steps), all rounds
    ideal-unseen  the IDEAL rule with EK-FAC, each domain scored by the pool rows the mixture does not
                  hold yet (`influence.domain_rows: unseen`), all rounds
    ideal-unseen-trust  both of the above
    ideal-additive      the IDEAL rule with EK-FAC, its step taken in volumes
                        (`update.geometry: additive`), all rounds
    ideal-unseen-additive  unseen domain rows and the step in volumes, all rounds
    ideal-unseen-additive-trust  unseen domain rows, the step in volumes and the trust region
    ideal-uniform-probe  the IDEAL rule with EK-FAC whose round 1 is the uniform mixture
                  (`update.first_round: uniform`, the default); the later rounds continue from the
                  better of D0 and uniform by the reference loss
    ideal-no-probe  the IDEAL rule with EK-FAC, round 1 docs/method.md's step from D0
                  (`update.first_round: ideal`)
    ideal-search  the IDEAL rule with EK-FAC, its rounds with the config's `search:` recipe (or,
                  without one, the default: a quarter of the data, ideal.run.search); the mixture
                  it returns is trained once with the full recipe, and that model is scored
    ideal-surrogate  the IDEAL rule with EK-FAC, each update with one more candidate: the
                  minimiser of the surrogate (`update.surrogate`)
    ideal-lowest  the IDEAL rule with EK-FAC whose update keeps the candidate of lowest held-out
                  reference loss, the base round among them, separated or not (`update.ties:
                  lowest`, the default since 2026-12-05: the same as ideal, named for the ledger)
    ideal-smaller  the same, among the candidates within a paired SE of the lowest the smaller
                  step, the base round the smallest (`update.ties: smaller`, the default before)
    ideal-rescore  the IDEAL rule with EK-FAC that scores every copy of the domains when its
                  capped sample moves nothing (`update.rescore: true`, the default since
                  2026-12-05: the same as ideal, named for the ledger)
    ideal-no-rescore  the same without it (`update.rescore: false`, the default before)
    ideal-single-step  docs/method.md's step after the probe: one step of `update.step`, every
                  sensitivity whole, no candidates (the step before `update.candidates`)
    random        random mixtures on the simplex at the same total, each trained: as many as ideal's
                  config plans to train, D0 among them (`--random-candidates` sets their number);
                  the one with the best reference objective is kept (its compute counts them all)
    doremi        DoReMi adapted to SFT (`ideal.methods.proxy`): a proxy run learns domain weights on the
                  clipped excess loss over the D0 model; one update to those weights, then train
    doge          DoGE adapted to SFT (`ideal.methods.proxy`): a proxy run learns domain weights from the
                  alignment of each domain's gradient with the reference gradient; same
    oracle-grid   NOT a method: a grid of mixtures (D0, uniform, and every share vector with entries
                  k_i / G, k_i >= 1, G = domains + 2 unless `--grid-resolution`), each trained and
                  scored on the TEST sets; the best is the attainable upper bound the others are
                  measured against (gap closure = (method - original) / (oracle - original))
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from ideal.artifacts import atomic_write_json
from ideal.errors import IdealError
from ideal.paired import cost_in_sfts, gap_closure, method_stats, paired_differences, transfer
from ideal.run.cells import (
    candidates_run,
    config_d0,
    d0_volumes,
    domains_of,
    oracle_candidates,
    random_mixtures,
    run_one,
    run_seconds,
    stage_seconds,
)
from ideal.run.config import RunConfig
from ideal.run.ledger import Book, settings_without_paths
from ideal.run.preflight import preflight
from ideal.run.search import SearchSettings

log = logging.getLogger("ideal")

METHODS: dict[str, dict[str, Any]] = {
    "original": {"rounds": 0},
    "uniform": {"rounds": 1, "rule": "uniform"},
    "temperature": {"rounds": 1, "rule": "temperature"},
    "first-order": {"rule": "ideal", "curvature": "identity"},
    "ideal": {"rule": "ideal", "curvature": "ekfac"},
    "ideal-kfac": {"rule": "ideal", "curvature": "kfac"},
    # the trust region steers one step per round: these variants take no candidate steps
    "ideal-trust": {
        "rule": "ideal",
        "curvature": "ekfac",
        "update": {"trust_region": True, "candidates": ()},
    },  # fmt: skip
    "ideal-unseen": {"rule": "ideal", "curvature": "ekfac", "influence": {"domain_rows": "unseen"}},
    "ideal-unseen-trust": {
        "rule": "ideal",
        "curvature": "ekfac",
        "influence": {"domain_rows": "unseen"},
        "update": {"trust_region": True, "candidates": ()},
    },
    "ideal-additive": {"rule": "ideal", "curvature": "ekfac", "update": {"geometry": "additive"}},
    "ideal-unseen-additive": {
        "rule": "ideal",
        "curvature": "ekfac",
        "influence": {"domain_rows": "unseen"},
        "update": {"geometry": "additive"},
    },
    "ideal-unseen-additive-trust": {
        "rule": "ideal",
        "curvature": "ekfac",
        "influence": {"domain_rows": "unseen"},
        "update": {"geometry": "additive", "trust_region": True, "candidates": ()},
    },
    "ideal-uniform-probe": {
        "rule": "ideal",
        "curvature": "ekfac",
        "update": {"first_round": "uniform"},
    },
    "ideal-no-probe": {"rule": "ideal", "curvature": "ekfac", "update": {"first_round": "ideal"}},
    "ideal-search": {"rule": "ideal", "curvature": "ekfac", "search": True},
    "ideal-surrogate": {"rule": "ideal", "curvature": "ekfac", "update": {"surrogate": True}},
    # the lowest held-out loss kept, the base round among the candidates (the default); or the
    # smaller step among those within a paired standard error of it (the default before)
    "ideal-lowest": {"rule": "ideal", "curvature": "ekfac", "update": {"ties": "lowest"}},
    "ideal-smaller": {"rule": "ideal", "curvature": "ekfac", "update": {"ties": "smaller"}},
    "ideal-rescore": {"rule": "ideal", "curvature": "ekfac", "update": {"rescore": True}},
    "ideal-no-rescore": {"rule": "ideal", "curvature": "ekfac", "update": {"rescore": False}},
    # docs/method.md's step (one step of update.step, every sensitivity whole), after the probe
    "ideal-single-step": {
        "rule": "ideal",
        "curvature": "ekfac",
        "update": {"candidates": (), "min_z": 0.0, "selection": 0.0},
    },  # fmt: skip
    "random": {"rounds": 1, "rule": "fixed"},
    "doremi": {"rounds": 1, "rule": "doremi"},
    "doge": {"rounds": 1, "rule": "doge"},
    "oracle-grid": {"rounds": 1, "rule": "fixed"},
}
CANDIDATE_METHODS = ("random", "oracle-grid")  # several trained mixtures per seed, one kept
SEARCH_METHODS = ("ideal-search",)  # rounds with the search recipe, then the final training


def method_config(config: RunConfig, method: str, seed: int) -> RunConfig:
    """The config of one (method, seed): same data, recipe and total; the method's rule and rounds."""
    spec = METHODS[method]
    curvature = spec.get("curvature", config.influence.curvature)
    refine = config.influence.refine if curvature in ("ekfac", "kfac") else 0  # needs factors
    suite = replace(config.suite, seed=seed) if config.suite is not None else None
    rule, rounds = spec.get("rule", config.update.rule), spec.get("rounds", config.rounds)
    iterative = rule == "ideal" and rounds > 0
    # only ideal-search searches: every other method trains each round with the full recipe
    search = (config.search or SearchSettings()) if spec.get("search") else None
    return replace(
        config,
        search=search,
        suite=suite,
        seed=seed,
        rounds=rounds,
        select=config.select if iterative else "last",  # a baseline returns its own mixture
        train=replace(config.train, seed=seed),
        # every method decodes its references or none does: round 0 is shared between them
        eval=replace(
            config.eval, reference_accuracy="always" if config.decode_references() else "never"
        ),
        update=replace(config.update, rule=rule, **spec.get("update", {})),
        influence=replace(
            config.influence, curvature=curvature, refine=refine, **spec.get("influence", {})
        ),
    )


def parse_seeds(text: str | int) -> list[int]:
    """`--seeds`: a count K (seeds 0..K-1), a list `5,6`, a range `5-9`, or both `0-2,7`."""
    text = str(text).strip()
    if text.isdigit():
        count = int(text)
        if count < 1:
            raise IdealError("--seeds must be at least 1")
        return list(range(count))
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        low, dash, high = part.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise IdealError(
                f"--seeds: '{part}' is neither a seed, a range a-b, nor a count (e.g. 5, 5,6, 5-9)"
            )
        first, last = int(low), int(high) if dash else int(low)
        if last < first:
            raise IdealError(f"--seeds: the range '{part}' runs backwards")
        seeds += [s for s in range(first, last + 1) if s not in seeds]
    if not seeds:
        raise IdealError("--seeds names no seed")
    return seeds


def run_compare(
    config: RunConfig,
    methods: list[str],
    seeds: list[int],
    out: str | Path,
    random_candidates: int | None = None,
    grid_resolution: int | None = None,
    book: Book | None = None,
    features: Path | None = None,
    report: bool = True,
) -> dict[str, Any]:
    """Run every (method, seed); write OUT/compare.json and OUT/compare.html (unless `report` is
    false); returns the document.

    `random_candidates` None: `random` trains as many models as `ideal`'s config plans, D0
    among them. With a ledger
    (`book`, ideal.run.ledger) a cell whose key it holds is not run again: its record is used;
    every cell run is appended as soon as it finishes. `features`: the feature cache shared by
    every run (default OUT/features)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise IdealError(f"--methods: unknown '{unknown[0]}'; choose from {', '.join(METHODS)}")
    if not seeds:
        raise IdealError("--seeds must be at least 1")
    if random_candidates is not None and random_candidates < 1:
        raise IdealError("--random-candidates must be at least 1")
    for warning in preflight(config).warnings:  # the whole run, before anything trains
        log.warning("warning: %s", warning)
    for method in methods:  # each method's config is valid
        method_config(config, method, seeds[0])
    out = Path(out)
    features = features or out / "features"
    runs: dict[str, list[dict[str, Any]]] = {}
    # round 0 is trained by the first method with the full recipe, then shared
    sharing = next((m for m in methods if m not in SEARCH_METHODS), None)
    for method in methods:
        runs[method] = []
        for seed in seeds:
            config_k = method_config(config, method, seed)
            first_run = out / str(sharing) / f"seed-{seed}"
            first = None if method in (sharing, *SEARCH_METHODS) else first_run
            if first is not None and sharing in CANDIDATE_METHODS:
                first = first_run / "candidate-0"
            extra: dict[str, Any] = {}
            if method == "random":
                extra["candidates"] = random_candidates or random_count(config, seed)
            if method == "oracle-grid":
                extra["grid_resolution"] = grid_resolution
            key = None
            if book is not None:
                key = book.key(
                    method, seed, {**settings_without_paths(config_k.to_dict()), **extra}
                )
                found = book.lookup(key)
                if found is not None:
                    log.info("compare: %s, seed %d: in the ledger (%s)", method, seed, found.date)
                    runs[method].append(found.run)
                    continue
            log.info("compare: %s, seed %d", method, seed)
            run = out / method / f"seed-{seed}"
            entry = _run_cell(
                config, config_k, method, seed, run, first, extra, grid_resolution, features
            )
            if book is not None and key is not None:
                book.record(key, method, seed, entry)
            runs[method].append(entry)
    # with a ledger, cells may come from other runs (measured apart): each in its own units
    document = compare_document(runs, seeds, config.hash(), None if book is not None else sharing)
    if report:
        atomic_write_json(out / "compare.json", document)
        from ideal.report.compare import write_compare_report

        write_compare_report(out, document)
    return document


def random_count(config: RunConfig, seed: int) -> int:
    """Random mixtures `random` trains on a seed to match `ideal`'s budget of trainings, D0
    counted among them: what ideal's config plans (its probe and every candidate), so that the
    control's cells keep their key whatever ideal's runs did (a run that stops early trains
    fewer; compare.json reports every method's trainings)."""
    from ideal.run.loop import planned_trainings

    ideal = method_config(config, "ideal", seed)
    return max(1, planned_trainings(ideal, config_d0(ideal)) - 1)


def _run_cell(
    config: RunConfig,
    config_k: RunConfig,
    method: str,
    seed: int,
    run: Path,
    first: Path | None,
    extra: dict[str, Any],
    grid_resolution: int | None,
    features: Path,
) -> dict[str, Any]:
    """One (method, seed) run, its round 0 copied from `first`: compare.json's entry for it."""
    if method in CANDIDATE_METHODS:
        if method == "random":
            shares_list = random_mixtures(domains_of(config), seed, extra["candidates"])
        else:
            shares_list = oracle_candidates(
                config, d0_volumes(config_k, run, first), grid_resolution
            )
        score = "reference_loss" if method == "random" else "test_accuracy"
        summary, seconds, table, stages = candidates_run(
            config_k, run, first, shares_list, score, features
        )
        extra = {**extra, "candidate": summary["candidate"], "shares": summary["shares"]}
        if method == "oracle-grid":
            extra["grid"] = table
        trainings = 1 + len(shares_list)  # D0 once, then each candidate
    else:
        summary = run_one(config_k, run, first, features)
        seconds, stages = run_seconds(summary), stage_seconds(summary)
        trainings = summary["compute"]["trainings"] if summary.get("compute") else None
    chosen = summary.get("selected_round")
    selected = summary["rounds"][-1 if chosen is None else chosen]
    if method in SEARCH_METHODS:  # scored as trained with the full recipe: RUN/final/
        extra = {**extra, "search_selected": selected}
        selected, seconds = summary["final"], summary["compute"]["total"]
        stages = {**stages, **{f"final_{s}": v for s, v in summary["compute"]["final"].items()}}
    total = sum(selected["volumes"].values())
    return {
        "seed": seed,
        "rounds": len(summary["rounds"]) - 1,
        "selected": selected,
        "selected_round": selected["round"],
        "seconds": seconds,
        "stages": stages,  # the whole run's seconds by stage
        "trainings": trainings,
        "returned_shares": {d: v / total for d, v in selected["volumes"].items()},
        # one SFT with the full recipe: D0's (round 0), or the final training's
        "sft_seconds": selected["seconds"]["train"]
        if method in SEARCH_METHODS
        else summary["rounds"][0]["seconds"]["train"],
        **extra,
    }


def baselines(methods: list[str]) -> list[str]:
    """What the others are paired against: original, uniform and random where run, and ideal
    where a variant of it (`ideal-...`) runs beside it, which is what the variant is there for."""
    named = [b for b in ("original", "uniform", "random") if b in methods]
    variant = any(m.startswith("ideal-") for m in methods)
    return named + ["ideal"] if "ideal" in methods and variant else named


def compare_document(
    runs: dict[str, list[dict[str, Any]]], seeds: list[int], config_hash: str, unit: str | None
) -> dict[str, Any]:
    """compare.json from every method's runs (one entry per seed, as `_run_cell` or the ledger
    gives them): statistics, cost in SFTs, paired differences (`baselines`), gap closure,
    transfer. Cost is in units of the round-0 (D0) training of method `unit`, the one whose round
    0 the others share; None: of each run's own full-recipe SFT (D0's training, ideal-search's
    final training), for runs measured apart (the ledger's cells) or when only ideal-search ran."""
    methods = list(runs)
    results = {method: method_stats(entries) for method, entries in runs.items()}
    document: dict[str, Any] = {"methods": results, "seeds": seeds, "config_hash": config_hash}
    what = "round 0 (D0) training" if unit else "full-recipe SFT (D0's, or ideal-search's final)"
    document["sft"] = cost_in_sfts(results, unit, what)
    document["gap_closure"] = gap_closure(results)
    document["paired"] = {
        baseline: paired_differences(results, baseline) for baseline in baselines(methods)
    }
    if "ideal" in results and "ideal-search" in results:
        document["transfer"] = transfer(results, "ideal-search", "ideal")
    return document
