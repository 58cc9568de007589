"""The code's fingerprint: what ideal's training, scoring, influence and update rules compute on a
tiny fixed input, as short hashes (the results ledger keeps a cell while they hold).

A commit hash would be too strict (moving a file changes no number) and a version too loose, so
the fingerprint is the numbers themselves:

    suite       the rows the embedded suite generates (every task, a noisy and a conflicting
                domain, its splits)
    train       a micro run's training losses, full fine-tuning and top-1-block LoRA from cached
                features (rounded to 4 significant digits, so another machine's kernels agree)
    eval        that run's reference and test losses (per row), decoded outputs and accuracies
    loop        a whole micro run: the probe, an update by candidate steps on held-out rows,
                the returned round decoded; every round's and candidate's volumes, metrics,
                update records and the choice (its update settings pinned: a changed default
                changes the keys of the cells whose settings hold it, not this component)
    scorers     every scorer on fixed outputs, and `choice` likelihoods on the trained model
    influence   its EK-FAC, K-FAC and first-order scores (relative to the largest, 3 digits)
    rule:NAME   what the method NAME's update rule proposes on a fixed, hand-made input

A cell's key takes the components its method depends on (ideal.run.ledger.components): every
method is trained and scored; the IDEAL family also reads influence; each method its own rule. Computing all of it
takes a few seconds of one core.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def digest(value: Any) -> str:
    """A short hash of a JSON-able value, floats rounded to 4 significant digits."""
    return hashlib.sha256(json.dumps(_rounded(value), sort_keys=True).encode()).hexdigest()[:16]


def _rounded(value: Any, digits: int = 4) -> Any:
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {str(k): _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v, digits) for v in value]
    return value


def code_fingerprint(methods: list[str]) -> dict[str, str]:
    """Every component the methods depend on, computed once (ideal.run.ledger.components). The
    process's torch thread count is left as it was (the micro runs take one thread)."""
    import torch

    from ideal.run.ledger import components

    wanted = {c for m in methods for c in components(m)}
    out: dict[str, str] = {}
    threads = torch.get_num_threads()
    try:
        with tempfile.TemporaryDirectory(prefix="ideal-fingerprint-") as scratch:
            measured = _micro_runs(Path(scratch), "influence" in wanted)
    finally:
        torch.set_num_threads(threads)
    out.update({k: v for k, v in measured.items() if k in wanted})
    for method in methods:
        out[f"rule:{method}"] = digest(rule_output(method))
    return out


MICRO_SUITE = {
    "domains": [
        {"name": "add", "task": "add", "pool": 24, "volume": 16},
        {"name": "add_noisy", "task": "add", "pool": 24, "volume": 12, "noise": 0.5},
        {"name": "reverse", "task": "reverse", "pool": 24, "volume": 8},
        {"name": "reverse_alt", "task": "reverse", "pool": 24, "volume": 8, "conflict": True},
        {"name": "sort", "task": "sort", "pool": 24, "volume": 12},
        {"name": "recall", "task": "recall", "pool": 24, "volume": 6},
    ],
    "capabilities": ["add", "reverse", "sort", "recall"],
    "reference_size": 6,
    "test_size": 4,
    "hidden_size": 16,
    "num_layers": 2,
    "num_heads": 2,
    "intermediate_size": 32,
}


def micro_config(**sections: Any) -> Any:
    """The micro run: the embedded suite at its smallest (every task, a noisy and a conflicting
    domain), a few steps; `sections` override the config's sections."""
    from ideal.run.config import load_config

    base: dict[str, Any] = {
        "suite": MICRO_SUITE,
        "rounds": 0,
        "train": {"threads": 1, "max_steps": 6, "batch_size": 4, "lr": 0.01},
        "influence": {"curvature_examples": 16, "max_examples": 8, "batch_size": 8},
        "eval": {"max_new_tokens": 6, "batch_size": 8},
    }
    base.update(sections)
    return load_config(None, base=base)


def _stage_numbers(run: Path) -> dict[str, Any]:
    """What a run's stages computed, seconds left out: each round's and candidate's volumes and
    metrics, the training losses, every update record's numbers, the split, the choices."""
    from ideal.artifacts import read_json

    def metrics_of(directory: Path) -> dict[str, Any]:
        data = read_json(directory / "metrics.json")
        return {k: v for k, v in data.items() if "seconds" not in k}

    out: dict[str, Any] = {}
    for directory in sorted([*run.glob("round-*"), *run.glob("step-*/*")]):
        if not (directory / "metrics.json").is_file():
            continue
        mixture = read_json(directory / "mixture.json")
        update = mixture.get("update", {})
        name = str(directory.relative_to(run))
        out[name] = {
            "volumes": {d: e["volume"] for d, e in mixture["domains"].items()},
            "update": {k: v for k, v in update.items() if k not in ("constraints", "retokenized")},
            "metrics": metrics_of(directory),
        }
        log_file = directory / "model" / "train_log.jsonl"
        if log_file.is_file():
            out[name]["train"] = [
                json.loads(line)["loss"] for line in log_file.read_text().splitlines()
            ]
    for extra in (
        "reference-split/split.json",
        *[str(p.relative_to(run)) for p in run.glob("step-*/choice.json")],
    ):
        if (run / extra).is_file():
            out[extra] = read_json(run / extra)
    summary = read_json(run / "summary.json")
    out["selected_round"] = summary["selected_round"]
    return out


def _micro_runs(scratch: Path, influence: bool) -> dict[str, str]:
    """The components from micro runs in `scratch`:

    suite      the generated rows;
    train      round 0's training losses, full fine-tuning and top-1-block LoRA from the cache;
    eval       round 0's metrics (losses per row, decoded accuracies);
    loop       a whole default run (rounds 2: the uniform probe, an update by candidate steps on
               held-out rows, decoding only the returned round): every round's and candidate's
               volumes, metrics and update records, the choice, the returned round;
    scorers    the scorers on fixed outputs, and `choice` likelihoods on the trained model;
    influence  EK-FAC, K-FAC and first-order scores, each relative to its largest."""
    from dataclasses import replace

    from ideal.run.loop import run_loop

    config = micro_config()
    lora = replace(config, train=replace(config.train, lora=True, lora_r=2, top_layers=1))
    numbers, scores = {}, {}
    for name, cfg in {"full": config, "top1-lora": lora}.items():
        run = scratch / name
        run_loop(cfg, run, checked=True)
        numbers[name] = _stage_numbers(run)
        if influence:
            scores[name] = _influence_scores(cfg, run)
    rows = sorted(p.read_text() for p in (scratch / "full" / "suite").rglob("*.jsonl"))
    # the update's settings pinned, so that a changed default changes the keys of the cells that
    # use it (their settings say so), not every method's code fingerprint
    whole = micro_config(
        rounds=2,
        update={
            "candidates": [0.3, 0.6],
            "min_z": 0.0,
            "ties": "lowest",
            "shrink": "soft",
            "selection": 0.5,
            "first_round": "uniform",
            "rescore": False,
        },  # fmt: skip
        eval={"max_new_tokens": 6, "batch_size": 8, "accuracy_rounds": "returned"},
    )
    run_loop(whole, scratch / "loop", checked=True)
    out = {
        "suite": digest(rows),
        "train": digest(
            {
                n: {k: v.get("train") for k, v in s.items() if k.startswith("round")}
                for n, s in numbers.items()
            }
        ),  # fmt: skip
        "eval": digest(
            {
                n: {k: v.get("metrics") for k, v in s.items() if k.startswith("round")}
                for n, s in numbers.items()
            }
        ),  # fmt: skip
        "loop": digest(_stage_numbers(scratch / "loop")),
        "scorers": digest(_scorer_outputs(scratch / "full")),
    }
    if influence:
        out["influence"] = hashlib.sha256(
            json.dumps(_rounded(scores, 3), sort_keys=True).encode()
        ).hexdigest()[:16]
    return out


# outputs and answers every generative scorer is asked about: each scorer's verdicts on them
SCORER_CASES = [
    ("47 + 38 = 85", "85"), ("85. Check: 85 - 38 = 47", "85"), ("the answer is 1,234.0", "1234"),
    ("  Paris \n", "Paris"), ("it is Paris, France", "Paris"), ("{\"answer\": 3}", "3"),
    ("the result is fine.", '[{"check": "lowercase"}]'),
    ("Done. Is there anything else I can help with?",
     '[{"check": "ends_with", "value": "Is there anything else I can help with?"}]'),
    ("one two three four five six seven eight nine ten eleven twelve",
     '[{"check": "words", "value": "12-"}]'),
    ("The calculation gives the result.", '[{"check": "keywords", "value": "result|calculation"}]'),
    ("{\"answer\": 85}", '[{"check": "json"}]'), ("a, b", '[{"check": "no_commas"}]'),
]  # fmt: skip
CHOICE_ROWS = [
    {"prompt": "Is 3 + 4 equal to 7?", "completion": "yes", "choices": ["yes", "no"], "answer": 0},
    {"prompt": "Sort: cab", "completion": "abc", "choices": ["abc", "cab", "bca"], "answer": 0},
    {"prompt": "Reverse: ab", "completion": "ba", "choices": ["ab", "ba"], "answer": 1},
]


def _scorer_outputs(run: Path) -> dict[str, Any]:
    """Every generative scorer on SCORER_CASES; `choice` on CHOICE_ROWS with the run's round-0
    model (its per-option log-likelihoods and accuracies)."""
    from ideal.backends.evaluation.evaluate import SCORERS
    from ideal.backends.evaluation.scorers import score_choices
    from ideal.data.rows import load_domains
    from ideal.hf import load_causal_lm, load_tokenizer

    verdicts = {}
    for name, scorer in sorted(SCORERS.items()):
        results = []
        for output, answer in SCORER_CASES:
            try:
                results.append(bool(scorer(output, answer)))
            except Exception as err:  # a scorer that refuses a case: its refusal is its answer
                results.append(type(err).__name__)
        verdicts[name] = results
    folder = run / "choice-rows" / "choice"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHOICE_ROWS))
    model_dir = run / "round-0" / "model"
    model, tokenizer = load_causal_lm(model_dir), load_tokenizer(model_dir)
    examples = load_domains(run / "choice-rows")["choice"].examples
    chosen = score_choices(model.eval(), tokenizer, examples, None, 8)
    outputs = [{k: v for k, v in o.items() if k != "source"} for o in chosen.outputs]  # no paths
    return {"scorers": verdicts, "choice": [chosen.accuracy, chosen.accuracy_norm, outputs]}


def _influence_scores(config: Any, run: Path) -> dict[str, Any]:
    """EK-FAC, K-FAC and first-order scores of a micro run's round 0, each relative to its
    largest."""
    from dataclasses import replace

    import numpy as np

    from ideal.influence.step import compute_influence

    out = {}
    for curvature in ("ekfac", "kfac", "identity"):
        cfg = replace(config, influence=replace(config.influence, curvature=curvature))
        result, _ = compute_influence(
            run / "round-0" / "model", run / "round-0", run / "suite" / "reference",
            cfg.influence_job(), features=run / "features",
        )  # fmt: skip
        scores = np.asarray(result.scores, dtype=np.float64)
        largest = float(np.abs(scores).max()) or 1.0
        out[curvature] = (scores / largest).tolist()
    return out


# a fixed input for the update rules: four domains, one harmful, one noisy
RULE_VOLUMES = {"a": 120, "b": 240, "c": 120, "d": 120}
RULE_SIGNALS = {
    "volumes": RULE_VOLUMES,
    "sensitivity": {"a": -30.0, "b": 90.0, "c": -500.0, "d": -10.0},
    "sensitivity_stderr": {"a": 8.0, "b": 14.0, "c": 490.0, "d": 20.0},
    "pool_sizes": {"a": 120, "b": 240, "c": 120, "d": 120},
}


def rule_output(method: str) -> Any:
    """What the method's update rule proposes on the fixed input (RULE_SIGNALS) with the
    method's settings: requested volumes; for the IDEAL family with candidate steps, every
    candidate's, a choice among fixed candidates and the radius after it; for `random` the
    shares it draws."""

    from ideal.methods.candidates import Candidate, candidate_steps, choose
    from ideal.methods.rules import IdealRule
    from ideal.methods.surrogate import fit_quadratic, minimise
    from ideal.methods.trust import radius_scale
    from ideal.run.cells import random_mixtures
    from ideal.run.compare import METHODS, method_config
    from ideal.run.loop import make_rule
    from ideal.run.step import uses_candidates

    if method not in METHODS:
        return None
    if method == "random":  # the very draw `ideal compare` makes
        return random_mixtures(sorted(RULE_VOLUMES), 0, 3)
    from dataclasses import replace

    config = method_config(replace(micro_config(), rounds=2), method, 0)
    if config.update.rule in ("doremi", "doge", "fixed") or config.rounds == 0:
        return config.update.rule
    if not uses_candidates(config):
        return make_rule(config).propose(RULE_VOLUMES, RULE_SIGNALS)
    update = config.update
    steps = candidate_steps(update.candidates, 1.0, update.max_step)
    proposals = [IdealRule(update, step=m).propose(RULE_VOLUMES, RULE_SIGNALS) for m in steps]
    rows = {"x": [1.0, 1.2, 0.9, 1.1], "y": [2.0, 1.9, 2.2, 2.1]}
    fixed = [
        Candidate(f"m{m}", m, m, {c: [v - 0.02 * i * (j % 2) for j, v in enumerate(r)]
                                  for c, r in rows.items()})
        for i, m in enumerate(steps)
    ]  # fmt: skip
    chosen, table = choose(fixed, {"x": 0.5, "y": 0.5}, update.ties)
    out: dict[str, Any] = {
        "proposals": proposals, "chosen": chosen, "table": table,
        "radius": [radius_scale(1.0, r, -1.0, 2.0) for r in (-0.9, -0.5, -0.1, 0.2)],
    }  # fmt: skip
    if update.surrogate:
        model = fit_quadratic([0.0, 0.0], [[0.0, 0.0], [0.2, -0.1], [-0.1, 0.3]],
                              [1.0, 0.9, 1.05], [0.01, 0.01, 0.01], [[0.0, 0.0]],
                              [[-0.5, 0.2]], [[0.1, 0.1]])  # fmt: skip
        out["surrogate"] = minimise(model, 0.5, keep_total=False).tolist()
    return out
