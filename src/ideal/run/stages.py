"""The work of one round's stages: train, evaluate, proxy runs (DoReMi / DoGE).

    RUN/round-K/model/         the SFT model of round K, trained from the base model
    RUN/round-K/train.json     who trained it (train.backend), the loss it minimised (example|token);
                               an external trainer's command, exit code, seconds (+ train.log)
    RUN/round-K/metrics.json   reference loss, test loss and accuracy per capability; mean; worst
    RUN/round-K/proxy.json     rules doremi/doge: the proxy run's domain weights (+ proxy.png)
    RUN/final/                 with `search:`: the returned mixture trained with the run's recipe

The influence step has its own part (ideal.influence); the loop (ideal.run.loop) orders the stages.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ideal.artifacts import atomic_write_json, read_json
from ideal.backends.factory import make_evaluator, make_trainer
from ideal.data.mixture import nested_subset
from ideal.data.mixture_io import load_training_set, write_mixture_dir
from ideal.errors import IdealError
from ideal.run.config import RunConfig
from ideal.run.rundir import RunPaths

log = logging.getLogger("ideal")


# the round number of the final training (`search:`): {round} of a command trainer, EvalJob.round
FINAL_ROUND = -1


def train_round(
    config: RunConfig,
    paths: RunPaths,
    round_: int,
    here: Path | None = None,
    data: Path | None = None,
) -> None:
    """RUN/round-K/model and train.json, by the configured trainer (resumable: a failed or killed
    round is trained again by `--resume`; the builtin loop continues from its checkpoint).
    `here` replaces RUN/round-K (RUN/final), `data` the mixture directory trained on (a search
    round's subset, RUN/round-K/search)."""
    from ideal.backends.protocol import TrainJob
    from ideal.distributed import barrier, is_main, world_size

    trainer = make_trainer(config.train)
    if not trainer.all_processes and world_size() > 1:
        raise IdealError(
            f"train.backend {trainer.name} launches its own processes: run `ideal run` as one "
            "process and put the launcher in the trainer's command (README: multi-GPU)"
        )
    here = here or paths.round(round_)
    job = TrainJob(
        base_model=paths.base.resolve(),
        mixture_dir=data or here,
        output_dir=here / "model",
        round=round_,
        run_dir=paths.run,
        config_file=paths.run / "config.yaml",
        features=paths.features,
    )
    log.info("%s: training (%s)", f"round {round_}" if round_ >= 0 else "final", trainer.name)
    record = trainer.train(job)
    if is_main():
        atomic_write_json(here / "train.json", {"round": round_, **record})
    barrier()


def evaluate_round(
    config: RunConfig,
    paths: RunPaths,
    model_dir: Path,
    round_: int | None = None,
    decode: bool | None = None,
) -> dict[str, Any]:
    """metrics.json of one round: reference loss (no decoding), test loss and accuracy.

    Reference (and, with test data, test) losses are always ideal's own; with an external
    `eval.backend` the test accuracy of each capability is the evaluator's score. `decode`
    false (default: eval.accuracy_rounds is `every`): the test sets' losses and their `choice`
    accuracies only, no decoding and no external evaluator; metrics.json says `decoded`
    false, and its means over accuracies are left empty until the round is scored whole."""
    from ideal.backends.evaluation.evaluate import evaluate_capability
    from ideal.backends.evaluation.scorers import CHOICE
    from ideal.data.rows import load_domains
    from ideal.hf import adapter_base, load_causal_lm, load_tokenizer

    start = time.perf_counter()
    import torch

    model, tokenizer = load_causal_lm(model_dir), load_tokenizer(model_dir)
    # the device `ideal eval` uses: a GPU when there is one (decoding is most of the evaluation)
    model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu")).eval()
    features = eval_features(config, paths, model)
    references = load_domains(paths.reference)
    tests = load_domains(paths.test) if paths.test is not None else {}
    if decode is None:
        decode = config.eval.accuracy_rounds == "every"
    # eval.test_accuracy false: the test sets' losses only (no decoding, no evaluator)
    scoring = config.eval.test_accuracy
    evaluator = make_evaluator(config.eval) if scoring and decode else None
    decode_tests = scoring and evaluator is None
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
            features=features,
        )
        capabilities[name] = {
            "reference_loss": result.loss,
            "reference_examples": result.examples,
            # per row, in the file's order: the candidates of a step are compared on rows held
            # out from the direction (ideal.methods.candidates)
            "reference_row_losses": result.row_losses,
        }
        if result.accuracy is not None:
            capabilities[name]["reference_accuracy"] = result.accuracy
    for name, domain in tests.items():
        scorer = config.eval.scorers.get(name)
        # without decoding, a `choice` capability is still scored: its likelihoods are cheap
        scored = decode_tests and (decode or scorer == CHOICE)
        result = evaluate_capability(
            model,
            tokenizer,
            domain,
            scorer if scored else None,
            config.max_length,
            config.eval.max_new_tokens,
            config.eval.batch_size,
            generate=scored,
            features=features,
        )
        capabilities.setdefault(name, {}).update(
            test_loss=result.loss, test_examples=result.examples
        )
        if scored:
            capabilities[name].update(test_accuracy=result.accuracy, scorer=result.scorer)
            if result.accuracy_norm is not None:  # `choice`: lm-eval's acc_norm beside acc
                capabilities[name]["test_accuracy_norm"] = result.accuracy_norm
    if evaluator is not None:
        from ideal.backends.protocol import EvalJob

        del model  # the evaluator loads the model itself
        here = model_dir.parent
        job = EvalJob(
            model_dir=model_dir,
            base_model=adapter_base(model_dir) or model_dir,
            work_dir=here / "eval",
            round=round_ if round_ is not None else -1,
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
    if not decode and len(accuracies) < len(tests):  # the generative ones wait for their decoding
        accuracies = {}
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
    metrics["decoded"] = bool(decode)
    metrics["seconds"] = time.perf_counter() - start
    # of which the feature cache's fill (its own item of a run's compute)
    metrics["fill_seconds"] = features.filled_seconds if features is not None else 0.0
    return metrics


def eval_features(config: RunConfig, paths: RunPaths, model: Any) -> Any:
    """The feature cache that serves the losses and choice likelihoods of an evaluation
    (train.top_layers with train.feature_cache), or None. Keyed by the evaluated model's own
    frozen bottom: the rounds' models (trained above it) share the base model's entries."""
    if not (config.train.top_layers and config.train.feature_cache):
        return None
    from ideal.backends.training.top_layers import FeatureCache

    return FeatureCache(paths.features, model, config.train.top_layers, config.max_length)


def proxy_round(config: RunConfig, paths: RunPaths, here: Path, model_dir: Path) -> dict[str, Any]:
    """proxy.json of round K for DoReMi / DoGE (`ideal.methods.proxy`): a proxy fine-tuned from the base
    model learns domain weights over the round's pools; DoReMi's reference model is round K's model."""
    import torch

    from ideal.backends.training.builtin import wrap_lora
    from ideal.data.rows import load_domains, tokenize_examples
    from ideal.hf import load_causal_lm, load_tokenizer
    from ideal.methods.proxy import ProxySettings, learn_domain_weights, proxy_document
    from ideal.progress import StepBar

    start = time.perf_counter()
    method = config.update.rule
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
    if train.top_layers:  # the proxy trains what the rounds train: the top K blocks
        from ideal.backends.training.top_layers import check_top_layers, freeze_below

        check_top_layers(model, train.top_layers)
        if not train.lora:
            freeze_below(model, train.top_layers)
    if train.lora:  # with top_layers, the adapter wraps only the top blocks (lora_config)
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


def search_rows(here: Path, fraction: float, main: bool) -> Path:
    """What round K's model trains on, and what its influence step scores: the round's mixture,
    or under `search.fraction` < 1 its nested subset (`nested_subset`), RUN/round-K/search/,
    written here on first use."""
    from ideal.distributed import barrier

    if fraction >= 1.0:
        return here
    subset = here / "search"
    if main and not (subset / "mixture.json").is_file():
        training = load_training_set(here)
        write_mixture_dir(
            subset, training, nested_subset(training.mixture, fraction),
            extra={"search": {"fraction": fraction, "of": str(here / "mixture.json")}},
            data_subdir="data",
        )  # fmt: skip
    barrier()
    return subset


def score_whole(config: RunConfig, paths: RunPaths, here: Path, round_: int) -> bool:
    """A round evaluated without decoding (eval.accuracy_rounds returned) scored whole: its
    metrics.json rewritten with every test accuracy, the two evaluations' seconds summed. False
    when there was nothing to do."""
    metrics_file = here / "metrics.json"
    if not metrics_file.is_file():
        return False
    before = read_json(metrics_file)
    if before.get("decoded", True) or not config.eval.test_accuracy:
        return False
    log.info("round %d: decoding the test sets of the returned round", round_)
    metrics = evaluate_round(config, paths, here / "model", round_, decode=True)
    metrics["decode_seconds"] = metrics["seconds"]  # this second pass, as its own part
    metrics["seconds"] += before.get("seconds") or 0.0
    metrics["fill_seconds"] = metrics.get("fill_seconds", 0.0) + (before.get("fill_seconds") or 0.0)
    atomic_write_json(metrics_file, metrics)
    return True
