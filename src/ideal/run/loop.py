"""The closed IDEAL loop: the rounds' state machine, resumable stage by stage.

    RUN/config.yaml            resolved config + its hash (ideal.run.rundir)
    RUN/round-K/mixture.json   the mixture of round K (rows under RUN/round-K/data/<domain>/), with
                               the update that made it (ideal.records.UpdateRecord)
    RUN/round-K/model/, train.json, metrics.json, proxy.json   the stages' work (ideal.run.stages)
    RUN/round-K/influence.json influence of round K's model (+ .csv, .png): an update from round K
    RUN/reference-split/, RUN/step-K/   an IDEAL update by candidate steps (ideal.run.step)
    RUN/round-K/search/        with `search.fraction` < 1: the nested subset round K trained on
    RUN/final/                 with `search:`: the returned mixture trained once with the run's
                               recipe (mixture.json, model/, train.json, metrics.json)
    RUN/summary.json           one entry per round, the final training, the compute (ideal.run.summary)
    RUN/report.html            plots and tables (ideal.report.run)

Round 0 trains on D0. Under `update.first_round: uniform` (the default) round 1 is the uniform
mixture at D0's total, a probe. Every later round is an IDEAL update from the best round so far
whose size is measured (`update.candidates`, ideal.run.step): candidate steps along the influence
direction are resampled, trained from the base model and evaluated, and the best on reference
rows held out from the direction becomes the round. With `update.candidates: []` a round applies
the update rule once to the influence of the round it starts from (the better of D0 and the probe
after the probe, the trust region's choice with `update.trust_region`, else the previous round).
Every stage writes its artifact atomically and is skipped on --resume when present, so a killed
run continues where it stopped.

With a search recipe (`search:`, ideal.run.search) the rounds train, evaluate and compute influence
with it, on a nested fraction of each round's volumes; the round they return is then trained once
with the run's own recipe (`train_final`), and the run reports both and the compute of each part.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from ideal.artifacts import atomic_write_json, read_json
from ideal.data.mixture import Constraints, Mixture, draw_mixture
from ideal.data.mixture_io import TrainingSet, load_training_set, write_mixture_dir
from ideal.errors import IdealError
from ideal.methods.reweight import update_mixture
from ideal.methods.rules import (
    FixedRule,
    IdealRule,
    ProxyRule,
    Rule,
    TemperatureRule,
    UniformRule,
)
from ideal.methods.trust import StepDecision, trust_step
from ideal.records import RunSummary, UpdateRecord
from ideal.run.config import RunConfig
from ideal.run.influence_round import influence_round
from ideal.run.preflight import preflight
from ideal.run.rundir import RunPaths, prepare_run, run_lock, search_paths
from ideal.run.stages import (
    FINAL_ROUND,
    evaluate_round,
    proxy_round,
    score_whole,
    search_rows,
    train_round,
    write_proxy_files,
)
from ideal.run.step import (
    CHOICE,
    adopt,
    best_round,
    candidate_round,
    next_scale,
    note_use,
    reference_split,
    step_dir,
    uses_candidates,
)
from ideal.run.summary import summarise_run

log = logging.getLogger("ideal")


def initial_mixture(config: RunConfig, training: TrainingSet) -> Mixture:
    """D0: the suite's starting volumes drawn from each pool (seeded), or every row of the data once."""
    if config.suite is None:
        return Mixture.full(
            {d: len(t.examples) for d, t in training.pool.items()}, seed=config.seed
        )
    volumes = {spec.name: spec.volume for spec in config.suite.domains}
    sizes = {d: len(t.examples) for d, t in training.pool.items()}
    return draw_mixture(
        sizes, {d: volumes[d] for d in sizes}, config.update.max_repeats, config.seed
    )


def make_rule(config: RunConfig) -> Rule:
    """The update rule a config names (`update.rule`)."""
    rules: dict[str, Rule] = {
        "ideal": IdealRule(config.update),
        "uniform": UniformRule(),
        "temperature": TemperatureRule(config.update.temperature),
        "fixed": FixedRule(tuple(sorted(config.update.shares.items()))),
        "doremi": ProxyRule("doremi"),
        "doge": ProxyRule("doge"),
    }
    return rules[config.update.rule]  # one of them: UpdateSettings checks its choices


def next_mixture(
    config: RunConfig, training: TrainingSet, influence: dict[str, Any], step: float | None = None
) -> tuple[Mixture, dict[str, Any]]:
    """Round K+1's mixture from round K's: the update rule, then constraints, then resampling.

    `step` replaces `update.step` (the trust region's m of this round)."""
    update = config.update if step is None else replace(config.update, step=step)
    rule = make_rule(replace(config, update=update))
    constraints = Constraints(update.min_examples, update.max_repeats, update.keep_total)
    mixture, record = update_mixture(training, rule, constraints, config.seed, influence)
    return mixture, {**record, "step": update.step}


def planned_trainings(config: RunConfig, d0: dict[str, int] | None = None) -> int:
    """How many models a run of this config trains, if no round stops early: D0, the probe
    (none when D0's volumes `d0` are already uniform: `uniform_probe`), every IDEAL update's
    candidates (one step each without them), the final training."""
    update = config.update
    probe = int(config.rounds >= 2 and update.rule == "ideal" and update.first_round == "uniform")
    if probe and d0:
        mean = sum(d0.values()) / len(d0)
        probe = int(max(abs(mean / v - 1.0) for v in d0.values() if v) >= config.tolerance)
    steps = config.rounds - probe
    per_step = 1
    if uses_candidates(config):
        per_step = len(update.candidates) + int(update.surrogate)
    final = int(config.search is not None)
    return 1 + probe + steps * per_step + final


def step_decision(config: RunConfig, paths: RunPaths, k: int) -> StepDecision:
    """Where round K+1's update starts from and with which m: round K and `update.step`; after
    the uniform probe (`update.first_round`), the better of D0 and the probe by Q, with
    `update.step`; with `update.trust_region`, the trust region's decision after round K
    (`ideal.methods.trust`)."""
    update = config.update
    if uses_candidates(config):  # from the best round so far; the radius is the step's
        return StepDecision(update.step, best_round(config, paths, k), True)
    after_probe = k == 1 and update.first_round == "uniform"  # if round 1 was the probe
    if update.rule != "ideal" or k == 0 or not (update.trust_region or after_probe):
        return StepDecision(update.step, k, True)
    record = UpdateRecord.from_json(read_json(paths.round(k) / "mixture.json")["update"], k)
    probe = after_probe and record.rule == "uniform"
    if not (update.trust_region or probe):  # D0 was already uniform: round 1 was an IDEAL step
        return StepDecision(update.step, k, True)
    base = record.from_round
    loss = read_json(paths.round(k) / "metrics.json")["reference_loss_mean"]
    base_loss = read_json(paths.round(base) / "metrics.json")["reference_loss_mean"]
    if probe:
        return StepDecision(update.step, k if loss < base_loss else base, loss < base_loss)
    return trust_step(record.step, base, base_loss, k, loss, update.max_step)


def uniform_probe(
    config: RunConfig, paths: RunPaths, k: int
) -> tuple[TrainingSet, Mixture, dict[str, Any]] | None:
    """Round 1 under `update.first_round: uniform`: D0's pools at equal volumes and D0's total
    (constraints and resampling as for any update). None for any other round, with a single
    round (no IDEAL update would follow the probe), and when D0 is already uniform; the loop then
    takes docs/method.md's step."""
    update = config.update
    if k != 0 or config.rounds < 2 or update.rule != "ideal" or update.first_round != "uniform":
        return None
    training = load_training_set(paths.round(0))
    probe = replace(config, update=replace(update, rule="uniform"))
    mixture, record = next_mixture(probe, training, {})
    if max(abs(b) for b in record["beta_realised"].values()) < config.tolerance:
        return None
    return training, mixture, record


def train_final(config: RunConfig, paths: RunPaths, selected: int) -> None:
    """RUN/final/: round `selected`'s mixture (the one the run returns) trained once with the
    run's own recipe, then evaluated. Each step is skipped when its artifact is there, so a
    resumed run neither copies nor trains it again."""
    from ideal.distributed import barrier, is_main

    final = paths.final
    if is_main() and not (final / "mixture.json").is_file():
        training = load_training_set(paths.round(selected))
        write_mixture_dir(
            final, training, training.mixture, extra={"final": {"from_round": selected}},
            data_subdir="data",
        )  # fmt: skip
    barrier()
    stored = read_json(final / "mixture.json")["final"]["from_round"]
    if stored != selected:  # a run's rounds are final once written: this is not the same run
        raise IdealError(
            f"{final}: holds round {stored}'s mixture, but the run returns round {selected}; "
            "move it away to train the returned mixture"
        )
    if not (final / "model").is_dir():
        train_round(config, paths, FINAL_ROUND, here=final)
    if is_main() and not (final / "metrics.json").is_file():
        log.info("final: evaluating round %d's mixture, trained with the run's recipe", selected)
        metrics = evaluate_round(config, paths, final / "model", FINAL_ROUND, decode=True)
        atomic_write_json(final / "metrics.json", metrics)
    barrier()


def run_loop(
    config: RunConfig,
    run_dir: str | Path,
    resume: bool = False,
    checked: bool = False,
    features: Path | None = None,
    score_returned: bool = True,
    final: bool = True,
) -> RunSummary:
    """Run (or continue) the loop; returns its summary (summary.json). The whole run is checked
    first (ideal.run.preflight) unless the caller did (`checked`). `features`: a feature cache shared
    with other runs (train.top_layers), instead of RUN/features. Under eval.accuracy_rounds
    `returned` the returned round's test sets are decoded at the end (`score_returned`; a
    comparison that picks among runs decodes only the one it keeps). `final` false: a `search:`
    run stops after its rounds, without training the returned mixture with the run's recipe (a
    measurement of the search recipe alone: benchmarks/search_transfer.py --rank).

    Under `torchrun` / `accelerate launch` every process trains (DDP) and computes influence on its
    shard; the main process alone writes the run directory, evaluates and runs proxy runs, while
    the others wait. The run directory must be on a filesystem that every process sees.
    """
    from ideal.distributed import barrier, init_from_env, is_main

    init_from_env()
    warnings = [] if checked else preflight(config).warnings  # every process: before training
    for warning in warnings if is_main() else []:
        log.warning("warning: %s", warning)
    if config.train.threads:  # every stage, also those a resumed run does before any training
        import torch

        torch.set_num_threads(config.train.threads)
    main = is_main()
    if main:
        paths = prepare_run(config, run_dir, resume, features)
    barrier()
    if not main:  # reads what the main process wrote (and checks the config hash)
        paths = prepare_run(config, run_dir, resume=True, features=features)
    lock = run_lock(paths.run) if main else None  # one process runs a run directory
    try:
        first = paths.round(0)
        if main and not (first / "mixture.json").is_file():
            training = load_training_set(paths.train)
            write_mixture_dir(
                first, training, initial_mixture(config, training), data_subdir="data"
            )
        barrier()
        # With `search:`, the rounds below run with the search recipe (its model, train and eval
        # keys; `config` and `paths` are rebound to it) on a nested fraction of each mixture, and
        # the run's own recipe trains the returned mixture once after them (train_final).
        recipe, recipe_paths = config, paths
        fraction = config.search.fraction if config.search is not None else 1.0
        config, paths = config.search_config(), search_paths(config, paths)
        split = reference_split(config, paths, main)  # update.candidates: rows held out to choose
        k = 0
        while True:
            here = paths.round(k)
            model_dir = here / "model"
            if main:  # a candidate step's round: its kept candidate's model, metrics (idempotent)
                adopt(paths, k)
            barrier()
            if not model_dir.is_dir():
                train_round(config, paths, k, data=search_rows(here, fraction, main))
            if main and not (here / "metrics.json").is_file():
                log.info("round %d: evaluating", k)
                atomic_write_json(
                    here / "metrics.json", evaluate_round(config, paths, model_dir, k)
                )
            barrier()
            if k >= config.rounds:
                break
            probe = uniform_probe(config, paths, k)
            rule = UniformRule() if probe else make_rule(config)
            decision = step_decision(config, paths, k)
            if decision.base != k:
                log.info(
                    "round %d: reference loss not below round %d's; the next update starts again "
                    "from round %d with step %.3g",
                    k,
                    decision.base,
                    decision.base,
                    decision.step,
                )
            if main and rule.signal == "proxy" and not (here / "proxy.json").is_file():
                log.info("round %d: proxy run (%s)", k, rule.name)
                write_proxy_files(here, proxy_round(config, paths, here, model_dir))
            # the influence of the round the update starts from (a rejected round's is never used)
            source = paths.round(decision.base)
            stepping = probe is None and uses_candidates(config)
            if rule.signal == "influence":
                reference = split.direction if stepping and split is not None else paths.reference
                influence_round(
                    config, paths, decision.base, reference, decision.step, fraction, main
                )
            barrier()
            following = paths.round(k + 1)
            if stepping and not (following / "mixture.json").is_file():
                moved = candidate_round(
                    config, paths, k, decision.base, next_scale(paths, k), split, fraction, main
                )
                if not moved:  # RUN/step-(K+1)/choice.json says why
                    reason = read_json(step_dir(paths, k + 1) / CHOICE)["reason"]
                    log.info("round %d: %s; stopping", k + 1, reason)
                    break
            if not (following / "mixture.json").is_file():
                # every process computes the (deterministic) update, so all agree on stopping
                if probe:
                    training, mixture, update = probe
                else:
                    training = load_training_set(source)
                    # numbered (and its resampling seeded) as round K+1 even when it starts from an
                    # earlier base
                    training.mixture = replace(training.mixture, round=k)
                    signals = (
                        read_json(source / f"{rule.signal}.json") if rule.signal != "none" else {}
                    )
                    mixture, update = next_mixture(config, training, signals, decision.step)
                if config.update.trust_region and k > 0:
                    update["trust_region"] = {"accepted": decision.accepted, "after_round": k}
                record = UpdateRecord(
                    rule=update.pop("rule"),
                    from_round=decision.base,
                    step=update.pop("step"),
                    beta_realised=update.pop("beta_realised"),
                    probe=probe is not None,
                    details=update,
                )
                if max(abs(b) for b in record.beta_realised.values()) < config.tolerance:
                    log.info(
                        "round %d: largest volume change below tolerance %.3g; stopping",
                        k,
                        config.tolerance,
                    )
                    break
                if main:
                    write_mixture_dir(
                        following, training, mixture, extra={"update": record.to_json()},
                        data_subdir="data",
                    )  # fmt: skip
                    if rule.signal == "influence":  # which step this influence.json last served
                        note_use(source / "influence.json", k + 1, record.step,
                                 record.details.get("beta", {}))  # fmt: skip
            barrier()
            k += 1
        summary = summarise_run(paths.run)
        chosen = summary.selected_round
        # eval.accuracy_rounds returned: decode the returned round; with `search:` what is scored is
        # the final training, decoded in train_final, never the search round
        returned = score_returned and main and chosen is not None and recipe.search is None
        if returned and score_whole(config, paths, paths.round(chosen), chosen):
            summary = summarise_run(paths.run)
        barrier()
        if final and recipe.search is not None and summary.selected_round is not None:
            train_final(recipe, recipe_paths, summary.selected_round)
            summary = summarise_run(paths.run)
        if main:
            atomic_write_json(paths.run / "summary.json", summary.to_json())
            from ideal.report.run import write_report

            write_report(paths.run)
        barrier()
        return summary
    finally:
        if lock is not None:
            lock.close()
