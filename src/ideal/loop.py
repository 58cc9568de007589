"""The closed IDEAL loop, resumable stage by stage.

    RUN/config.yaml            resolved config + its hash (a changed config on resume is an error)
    RUN/suite/                 the generated suite (data + base model), when the config names one
    RUN/round-K/mixture.json   the mixture of round K (rows under RUN/round-K/data/<domain>/)
    RUN/round-K/model/         the SFT model of round K, trained from the base model
    RUN/round-K/train.json     who trained it (train.backend), the loss it minimised (example|token);
                               an external trainer's command, exit code, seconds (+ train.log)
    RUN/round-K/metrics.json   reference loss, test loss and accuracy per capability; mean; worst
    RUN/round-K/influence.json influence of round K's model (+ .csv, .png); drives round K+1
    RUN/round-K/proxy.json     rules doremi/doge instead: the proxy run's domain weights (+ .png)
    RUN/summary.json           one entry per round (SPEC.md), predicted vs realised change
    RUN/report.html            plots and tables (ideal.report.run)

Round 0 trains on D0; each later round applies the update rule to the previous round's influence,
resamples, retrains from the base model and evaluates. Every stage writes its artifact atomically
and is skipped on --resume when present, so a killed run continues where it stopped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ideal.artifacts import atomic_write_json, atomic_write_text, read_json
from ideal.config import RunConfig, config_changes
from ideal.data.mixture import Constraints, Mixture, draw_mixture
from ideal.data.mixture_io import TrainingSet, load_training_set, write_mixture_dir
from ideal.errors import IdealError
from ideal.methods.reweight import update_mixture
from ideal.methods.rules import FixedRule, IdealRule, ProxyRule, Rule, TemperatureRule, UniformRule
from ideal.methods.select import select_round
from ideal.methods.trust import StepDecision, trust_step

log = logging.getLogger("ideal")


@dataclass(frozen=True)
class RunPaths:
    run: Path
    base: Path
    train: Path
    reference: Path
    test: Path | None  # None: an external evaluator brings its own test sets

    def round(self, k: int) -> Path:
        return self.run / f"round-{k}"


def prepare_run(config: RunConfig, run_dir: str | Path, resume: bool) -> RunPaths:
    """Check or write RUN/config.yaml, generate the suite if needed; returns the data paths."""
    run = Path(run_dir)
    stored = run / "config.yaml"
    if stored.is_file():
        if not resume:
            raise IdealError(
                f"{run}: a run is already here; add --resume to continue it, or choose another --out"
            )
        previous = yaml.safe_load(stored.read_text()) or {}
        if previous.get("hash") != config.hash():
            # options added to ideal since the run started, at their defaults, change nothing
            changes = config_changes(previous, config.to_dict())
            if changes:
                raise IdealError(
                    f"{stored}: the config changed since this run started ({', '.join(changes)});"
                    " use another --out"
                )
    elif run.exists() and any(run.iterdir()):
        raise IdealError(f"{run}: output directory exists and is not empty; choose another --out")
    else:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            stored, yaml.safe_dump({"hash": config.hash(), **config.to_dict()}, sort_keys=False)
        )
    if config.suite is not None:
        suite = run / "suite"
        if not suite.is_dir():
            from ideal.data.suite import generate_suite

            log.info("generating the suite into %s", suite)
            generate_suite(config.suite, suite)
        return RunPaths(run, suite / "base", suite / "train", suite / "reference", suite / "test")
    assert config.model and config.train_data and config.reference_data
    return RunPaths(
        run,
        Path(config.model),
        Path(config.train_data),
        Path(config.reference_data),
        Path(config.test_data) if config.test_data else None,
    )


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
        "ideal": IdealRule(
            step=config.update.step,
            min_z=config.update.min_z,
            geometry=config.update.geometry,
            keep_total=config.update.keep_total,
        ),
        "uniform": UniformRule(),
        "temperature": TemperatureRule(config.update.temperature),
        "fixed": FixedRule(tuple(sorted(config.update.shares.items()))),
        "doremi": ProxyRule("doremi"),
        "doge": ProxyRule("doge"),
    }
    if config.update.rule not in rules:
        raise IdealError(
            f"update.rule must be one of {', '.join(rules)}, got '{config.update.rule}'"
        )
    return rules[config.update.rule]


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


def step_decision(config: RunConfig, paths: RunPaths, k: int) -> StepDecision:
    """Where round K+1's update starts from and with which m: round K and `update.step`; after
    the uniform probe (`update.first_round`), the better of D0 and the probe by Q, with
    `update.step`; with `update.trust_region`, the trust region's decision after round K
    (`ideal.methods.trust`)."""
    update = config.update
    after_probe = k == 1 and update.first_round == "uniform"  # if round 1 was the probe
    if update.rule != "ideal" or k == 0 or not (update.trust_region or after_probe):
        return StepDecision(update.step, k, True)
    record = read_json(paths.round(k) / "mixture.json")["update"]
    probe = after_probe and record.get("rule") == "uniform"
    if not (update.trust_region or probe):  # D0 was already uniform: round 1 was an IDEAL step
        return StepDecision(update.step, k, True)
    base = record.get("from_round", k - 1)
    loss = read_json(paths.round(k) / "metrics.json")["reference_loss_mean"]
    base_loss = read_json(paths.round(base) / "metrics.json")["reference_loss_mean"]
    if probe:
        return StepDecision(update.step, k if loss < base_loss else base, loss < base_loss)
    return trust_step(record["step"], base, base_loss, k, loss, update.max_step)


def uniform_probe(
    config: RunConfig, paths: RunPaths, k: int
) -> tuple[TrainingSet, Mixture, dict[str, Any]] | None:
    """Round 1 under `update.first_round: uniform`: D0's pools at equal volumes and D0's total
    (constraints and resampling as for any update). None for any other round, with a single
    round (no IDEAL update would follow the probe), and when D0 is already uniform; the loop then
    takes METHOD.md's step."""
    update = config.update
    if k != 0 or config.rounds < 2 or update.rule != "ideal" or update.first_round != "uniform":
        return None
    training = load_training_set(paths.round(0))
    probe = replace(config, update=replace(update, rule="uniform"))
    mixture, record = next_mixture(probe, training, {})
    if max(abs(b) for b in record["beta_realised"].values()) < config.tolerance:
        return None
    return training, mixture, record


def make_trainer(config: RunConfig) -> Any:
    """The trainer `train.backend` names (ideal.backends; the protocol in backends/protocol.py)."""
    train = config.train
    if train.backend == "builtin":
        from ideal.backends.train import BuiltinTrainer

        return BuiltinTrainer(_train_settings(config))
    if train.backend == "trl":
        from ideal.backends.trl_sft import TrlTrainer

        return TrlTrainer(_train_settings(config), dict(train.trl_args))
    if train.backend == "command":
        from ideal.backends.command import CommandTrainer

        return CommandTrainer(train.command, train.export, dict(train.env), train.timeout)
    from ideal.backends.presets import preset_trainer

    return preset_trainer(
        train.backend, train.base_config, train.command, dict(train.env), train.timeout
    )


def make_evaluator(config: RunConfig) -> Any:
    """The external evaluator `eval.backend` names, or None for the builtin one."""
    spec = config.eval
    if spec.backend == "lm-eval":
        from ideal.backends.lmeval import LmEvalEvaluator

        return LmEvalEvaluator(
            dict(spec.tasks),
            spec.include_path,
            spec.limit,
            spec.batch_size,
            dict(spec.options),
            spec.include_defaults,
        )
    if spec.backend == "command":
        from ideal.backends.command import CommandEvaluator

        return CommandEvaluator(
            spec.command, spec.parse, dict(spec.tasks), dict(spec.env), spec.timeout
        )
    return None


def train_round(config: RunConfig, paths: RunPaths, k: int) -> None:
    """RUN/round-K/model and train.json, by the configured trainer (resumable: a failed or killed
    round is trained again by `--resume`; the builtin loop continues from its checkpoint)."""
    from ideal.artifacts import atomic_write_json
    from ideal.backends.protocol import TrainJob
    from ideal.distributed import barrier, is_main, world_size

    trainer = make_trainer(config)
    if not trainer.all_processes and world_size() > 1:
        raise IdealError(
            f"train.backend {trainer.name} launches its own processes: run `ideal run` as one "
            "process and put the launcher in the trainer's command (README: multi-GPU)"
        )
    here = paths.round(k)
    job = TrainJob(
        base_model=paths.base.resolve(),
        mixture_dir=here,
        output_dir=here / "model",
        round=k,
        run_dir=paths.run,
        config_file=paths.run / "config.yaml",
    )
    log.info("round %d: training (%s)", k, trainer.name)
    record = trainer.train(job)
    if is_main():
        atomic_write_json(here / "train.json", {"round": k, **record})
    barrier()


def evaluate_round(
    config: RunConfig, paths: RunPaths, model_dir: Path, k: int | None = None
) -> dict[str, Any]:
    """metrics.json of one round: reference loss (no decoding), test loss and accuracy.

    Reference (and, with test data, test) losses are always ideal's own; with an external
    `eval.backend` the test accuracy of each capability is the evaluator's score."""
    from ideal.backends.evaluate import evaluate_capability
    from ideal.data.rows import load_domains
    from ideal.hf import load_causal_lm, load_tokenizer

    start = time.perf_counter()
    model, tokenizer = load_causal_lm(model_dir), load_tokenizer(model_dir)
    model.eval()
    references = load_domains(paths.reference)
    tests = load_domains(paths.test) if paths.test is not None else {}
    evaluator = make_evaluator(config)
    capabilities: dict[str, dict[str, Any]] = {}
    for name, domain in references.items():
        # reference accuracy (decoding) when every reference row has an answer and the config asks
        # for it: `select: reference_accuracy` returns the round that scores best on the user's
        # own reference sets
        scored = config.decode_references() and all(e.answer is not None for e in domain.examples)
        result = evaluate_capability(
            model,
            tokenizer,
            domain,
            config.eval.scorers.get(name) if scored else None,
            config.max_length,
            config.eval.max_new_tokens,
            config.eval.batch_size,
            generate=scored,
        )
        capabilities[name] = {"reference_loss": result.loss, "reference_examples": result.examples}
        if result.accuracy is not None:
            capabilities[name]["reference_accuracy"] = result.accuracy
    for name, domain in tests.items():
        result = evaluate_capability(
            model,
            tokenizer,
            domain,
            config.eval.scorers.get(name) if evaluator is None else None,
            config.max_length,
            config.eval.max_new_tokens,
            config.eval.batch_size,
            generate=evaluator is None,
        )
        capabilities.setdefault(name, {}).update(
            test_loss=result.loss, test_examples=result.examples
        )
        if evaluator is None:
            capabilities[name].update(test_accuracy=result.accuracy, scorer=result.scorer)
            if result.accuracy_norm is not None:  # `choice`: lm-eval's acc_norm beside acc
                capabilities[name]["test_accuracy_norm"] = result.accuracy_norm
    if evaluator is not None:
        from ideal.backends.protocol import EvalJob

        del model  # the evaluator loads the model itself
        here = model_dir.parent
        job = EvalJob(
            model_dir=model_dir,
            base_model=_base_of(model_dir),
            work_dir=here / "eval",
            round=k if k is not None else -1,
            run_dir=paths.run,
            config_file=paths.run / "config.yaml",
            test_data=paths.test,
        )
        for name, score in evaluator.evaluate(job).items():
            capabilities.setdefault(name, {}).update(
                test_accuracy=score.score,
                test_metric=score.metric,
                test_stderr=score.stderr,
                test_scored=score.n,
                test_source=score.source,
                scorer=evaluator.name,
            )
    reference_losses = {
        c: v["reference_loss"] for c, v in capabilities.items() if "reference_loss" in v
    }
    accuracies = {
        c: v["test_accuracy"] for c, v in capabilities.items() if v.get("test_accuracy") is not None
    }
    reference_accuracies = [
        v["reference_accuracy"] for v in capabilities.values() if "reference_accuracy" in v
    ]
    test_losses = [v["test_loss"] for v in capabilities.values() if "test_loss" in v]
    metrics: dict[str, Any] = {
        "capabilities": capabilities,
        "reference_loss_mean": float(np.mean(list(reference_losses.values()))),
        "reference_accuracy_mean": float(np.mean(reference_accuracies))
        if len(reference_accuracies) == len(reference_losses)
        else None,
        "test_loss_mean": float(np.mean(test_losses)) if test_losses else None,
        "test_accuracy_mean": float(np.mean(list(accuracies.values()))) if accuracies else None,
        "test_accuracy_worst": min(accuracies.values()) if accuracies else None,
        "test_accuracy_worst_capability": min(accuracies, key=accuracies.get)
        if accuracies
        else None,
    }
    if evaluator is not None:
        metrics["evaluator"] = evaluator.name
    metrics["seconds"] = time.perf_counter() - start
    return metrics


def _base_of(model_dir: Path) -> Path:
    """An adapter's base model directory, or the model directory itself."""
    config = model_dir / "adapter_config.json"
    if config.is_file():
        base = read_json(config).get("base_model_name_or_path")
        if base:
            return Path(base)
    return model_dir


def run_loop(config: RunConfig, run_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Run (or continue) the loop; returns summary.json's content.

    Under `torchrun` / `accelerate launch` every process trains (DDP) and computes influence on its
    shard; the main process alone writes the run directory, evaluates and runs proxy runs, while
    the others wait. The run directory must be on a filesystem that every process sees.
    """
    from ideal.distributed import barrier, init_from_env, is_main
    from ideal.influence.command import compute_influence, write_influence_files
    from ideal.progress import track

    init_from_env()
    if config.train.threads:  # every stage, also those a resumed run does before any training
        import torch

        torch.set_num_threads(config.train.threads)
    main = is_main()
    if main:
        paths = prepare_run(config, run_dir, resume)
    barrier()
    if not main:  # reads what the main process wrote (and checks the config hash)
        paths = prepare_run(config, run_dir, resume=True)
    first = paths.round(0)
    if main and not (first / "mixture.json").is_file():
        training = load_training_set(paths.train)
        write_mixture_dir(first, training, initial_mixture(config, training), data_subdir="data")
    barrier()
    k = 0
    while True:
        here = paths.round(k)
        model_dir = here / "model"
        if not model_dir.is_dir():
            train_round(config, paths, k)
        if main and not (here / "metrics.json").is_file():
            log.info("round %d: evaluating", k)
            atomic_write_json(here / "metrics.json", evaluate_round(config, paths, model_dir, k))
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
        if rule.signal == "influence" and not (source / "influence.json").is_file():
            log.info("round %d: influence", decision.base)
            result, document = compute_influence(
                source / "model",
                source,
                paths.reference,
                config.influence_settings(),  # influence.loss resolved from train.backend
                sample=config.influence.sample,
                max_examples=config.influence.max_examples,
                domain_rows=config.influence.domain_rows,
                curvature_examples=config.influence.curvature_examples,
                memory=config.influence.memory,
                layers=list(config.influence.layers) if config.influence.layers else None,
                max_length=config.max_length,
                objective=config.update.objective,
                size_factor=config.update.size_factor,
                progress=track,
                loss_source=config.influence_loss()[1],
            )
            if main:
                write_influence_files(source, result, document)
        barrier()
        following = paths.round(k + 1)
        if not (following / "mixture.json").is_file():
            # every process computes the (deterministic) update, so all agree on stopping
            if probe:
                training, mixture, update = probe
            else:
                training = load_training_set(source)
                # numbered (and its resampling seeded) as round K+1 even when it starts from an
                # earlier base
                training.mixture = replace(training.mixture, round=k)
                signals = read_json(source / f"{rule.signal}.json") if rule.signal != "none" else {}
                mixture, update = next_mixture(config, training, signals, decision.step)
            update["from_round"] = decision.base
            if config.update.trust_region and k > 0:
                update["trust_region"] = {"accepted": decision.accepted, "after_round": k}
            if max(abs(b) for b in update["beta_realised"].values()) < config.tolerance:
                log.info(
                    "round %d: largest volume change below tolerance %.3g; stopping",
                    k,
                    config.tolerance,
                )
                break
            if main:
                write_mixture_dir(
                    following, training, mixture, extra={"update": update}, data_subdir="data"
                )
        barrier()
        k += 1
    summary = summarise_run(paths.run)
    if main:
        atomic_write_json(paths.run / "summary.json", summary)
        from ideal.report.run import write_report

        write_report(paths.run)
    barrier()
    return summary


def proxy_round(config: RunConfig, paths: RunPaths, here: Path, model_dir: Path) -> dict[str, Any]:
    """proxy.json of round K for DoReMi / DoGE (`ideal.methods.proxy`): a proxy fine-tuned from the base
    model learns domain weights over the round's pools; DoReMi's reference model is round K's model."""
    import torch

    from ideal.backends.train import wrap_lora
    from ideal.data.rows import load_domains, tokenize_examples
    from ideal.hf import load_causal_lm, load_tokenizer
    from ideal.methods.proxy import ProxySettings, learn_domain_weights, proxy_document
    from ideal.progress import StepBar

    start = time.perf_counter()
    method = make_rule(config).name
    train = config.train
    training = load_training_set(here)
    tokenizer = load_tokenizer(paths.base)
    domains = {
        d: tokenize_examples(pool.examples, tokenizer, config.max_length)[0]
        for d, pool in training.pool.items()
    }
    volume = sum(training.mixture.volumes.values())
    settings = ProxySettings(
        method=method,
        steps=config.update.proxy_steps or train.total_steps(volume),
        lr=train.lr,
        batch_size=train.examples_per_step,
        warmup_ratio=train.warmup_ratio,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        eta=config.update.proxy_eta,
        smoothing=config.update.proxy_smoothing,
        seed=config.seed,
    )
    if train.threads:
        torch.set_num_threads(train.threads)
    torch.manual_seed(config.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_causal_lm(paths.base, dtype=torch.float32)
    if train.lora:
        model = wrap_lora(model, train)
    model.to(device)
    reference_model, references = None, None
    if method == "doremi":
        reference_model = load_causal_lm(model_dir, dtype=torch.float32).to(device)
    else:
        references = {
            c: tokenize_examples(d.examples, tokenizer, config.max_length)[0]
            for c, d in load_domains(paths.reference).items()
        }
    with StepBar(settings.steps, f"proxy run ({method})") as bar:
        result = learn_domain_weights(
            model,
            domains,
            settings,
            tokenizer.pad_token_id,
            reference_model,
            references,
            on_step=lambda step, _: bar.update(step),
        )
    document = proxy_document(result, settings)
    document["seconds"] = {"proxy_training": result.seconds, "total": time.perf_counter() - start}
    return document


def write_proxy_files(here: Path, document: dict[str, Any]) -> None:
    """proxy.json and proxy.png (domain weights along the proxy run)."""
    from ideal.report.plots import weights_plot

    history = document["history"]
    weights_plot(
        [h["step"] for h in history],
        {d: [h["alpha"][d] for h in history] for d in document["domains"]},
        here / "proxy.png",
        f"{document['method']}: domain weights along the proxy run (average is used)",
    )
    atomic_write_json(here / "proxy.json", document)


def _train_settings(config: RunConfig):
    from dataclasses import replace

    return replace(config.train.settings(), max_length=config.max_length)


def summarise_run(run: Path) -> dict[str, Any]:
    """summary.json from the round directories (SPEC.md), with predicted vs realised changes."""
    rounds = []
    k = 0
    while (run / f"round-{k}" / "metrics.json").is_file():
        here = run / f"round-{k}"
        mixture, metrics = read_json(here / "mixture.json"), read_json(here / "metrics.json")
        caps = metrics["capabilities"]
        train_settings = read_json(here / "model" / "train_settings.json")
        influence_seconds = None
        if (here / "influence.json").is_file():
            influence_seconds = read_json(here / "influence.json")["seconds"]["total"]
        extra_seconds = {}
        if (here / "proxy.json").is_file():  # DoReMi / DoGE: the proxy run is their signal's cost
            extra_seconds["proxy"] = read_json(here / "proxy.json")["seconds"]["total"]
        predicted = None
        origin = mixture.get("update", {}).get("from_round", k - 1)  # the update's base round
        previous = run / f"round-{origin}" / "influence.json"
        if k > 0 and previous.is_file():
            sensitivity = read_json(previous)["sensitivity"]
            beta = mixture.get("update", {}).get("beta_realised", {})
            predicted = float(sum(sensitivity[d] * beta.get(d, 0.0) for d in sensitivity))
        rounds.append(
            {
                "round": k,
                "volumes": {d: e["volume"] for d, e in mixture["domains"].items()},
                "test_accuracy": {c: v.get("test_accuracy") for c, v in caps.items()},
                "test_accuracy_mean": metrics["test_accuracy_mean"],
                "test_accuracy_worst": metrics["test_accuracy_worst"],
                "reference_loss": {c: v.get("reference_loss") for c, v in caps.items()},
                "reference_loss_mean": metrics["reference_loss_mean"],
                "reference_accuracy": {c: v.get("reference_accuracy") for c, v in caps.items()},
                "reference_accuracy_mean": metrics.get("reference_accuracy_mean"),
                "predicted_reference_loss_change": predicted,
                "realised_reference_loss_change": (
                    metrics["reference_loss_mean"] - rounds[origin]["reference_loss_mean"]
                    if rounds
                    else None
                ),
                "seconds": {
                    "train": train_settings.get("seconds"),
                    "influence": influence_seconds,
                    "eval": metrics["seconds"],
                    **extra_seconds,
                },
            }
        )
        k += 1
    stored = run / "config.yaml"
    select = (yaml.safe_load(stored.read_text()) or {}).get("select") if stored.is_file() else None
    select = select or RunConfig.select  # the default
    selected = select_round(rounds, select) if rounds else None
    return {"rounds": rounds, "select": select, "selected_round": selected}
