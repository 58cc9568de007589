"""The code's fingerprint: what ideal's training, scoring, influence and update rules compute on a
tiny fixed input, as short hashes (the results ledger keeps a cell while they hold).

A commit hash would be too strict (moving a file changes no number) and a version too loose, so
the fingerprint is the numbers themselves:

    suite       the rows the embedded suite generates (its tasks and splits)
    train       a micro run's training losses, full fine-tuning and top-1-block LoRA from cached
                features (rounded to 4 significant digits, so another machine's kernels agree)
    eval        that run's reference and test losses, decoded outputs and accuracies
    influence   its EK-FAC and first-order influence scores (relative to the largest, 3 digits)
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
    """Every component the methods depend on, computed once (`components`)."""
    from ideal.run.ledger import components

    wanted = {c for m in methods for c in components(m)}
    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="ideal-fingerprint-") as scratch:
        measured = _micro_run(Path(scratch), "influence" in wanted)
    out.update({k: v for k, v in measured.items() if k in wanted})
    for method in methods:
        out[f"rule:{method}"] = digest(rule_output(method))
    return out


def micro_config() -> Any:
    """The micro run: the embedded suite at its smallest, a few steps, every stage on."""
    from ideal.run.config import load_config

    suite = {
        "domains": [
            {"name": "add", "task": "add", "pool": 24, "volume": 16},
            {"name": "reverse", "task": "reverse", "pool": 24, "volume": 8},
            {"name": "sort", "task": "sort", "pool": 24, "volume": 12},
        ],
        "capabilities": ["add", "reverse", "sort"],
        "reference_size": 4,
        "test_size": 4,
        "hidden_size": 16,
        "num_layers": 2,
        "num_heads": 2,
        "intermediate_size": 32,
    }
    return load_config(
        None,
        base={
            "suite": suite,
            "rounds": 0,
            "train": {"threads": 1, "max_steps": 6, "batch_size": 4, "lr": 0.01},
            "influence": {"curvature_examples": 16, "max_examples": 8, "batch_size": 8},
            "eval": {"max_new_tokens": 6, "batch_size": 8},
        },
    )


def _micro_run(scratch: Path, influence: bool) -> dict[str, str]:
    """suite, train, eval (and influence) of the micro run, in `scratch`."""
    from dataclasses import replace

    from ideal.artifacts import read_json
    from ideal.run.loop import run_loop

    config = micro_config()
    lora = replace(config, train=replace(config.train, lora=True, lora_r=2, top_layers=1))
    runs = {"full": config, "top1-lora": lora}
    rows, losses, scores = {}, {}, {}
    for name, cfg in runs.items():
        run = scratch / name
        run_loop(cfg, run, checked=True)
        here = run / "round-0"
        rows[name] = sorted(
            p.read_text() for p in (run / "suite").rglob("*.jsonl")
        )  # the same suite for both
        log_file = here / "model" / "train_log.jsonl"
        steps = [json.loads(line)["loss"] for line in log_file.read_text().splitlines()]
        metrics = read_json(here / "metrics.json")
        losses[name] = {
            "train": steps,
            "capabilities": {
                c: {k: v for k, v in entry.items() if k != "seconds"}
                for c, entry in metrics["capabilities"].items()
            },
        }
        if influence:
            scores[name] = _influence_scores(cfg, run)
    out = {
        "suite": digest(rows["full"]),
        "train": digest({n: v["train"] for n, v in losses.items()}),
        "eval": digest({n: v["capabilities"] for n, v in losses.items()}),
    }
    if influence:
        out["influence"] = hashlib.sha256(
            json.dumps(_rounded(scores, 3), sort_keys=True).encode()
        ).hexdigest()[:16]
    return out


def _influence_scores(config: Any, run: Path) -> dict[str, Any]:
    """EK-FAC and first-order scores of the micro run's round 0, each relative to its largest."""
    from dataclasses import replace

    import numpy as np

    from ideal.influence.step import compute_influence

    out = {}
    for curvature in ("ekfac", "identity"):
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
    import numpy as np

    from ideal.methods.candidates import Candidate, candidate_steps, choose
    from ideal.methods.rules import IdealRule, random_shares
    from ideal.methods.surrogate import fit_quadratic, minimise
    from ideal.methods.trust import radius_scale
    from ideal.run.compare import METHODS, method_config
    from ideal.run.loop import make_rule
    from ideal.run.step import uses_candidates

    if method not in METHODS:
        return None
    if method == "random":
        rng = np.random.default_rng([0, 4242])
        return [dict(random_shares(sorted(RULE_VOLUMES), rng)) for _ in range(3)]
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
