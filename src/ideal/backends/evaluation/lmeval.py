"""lm-evaluation-harness as the evaluator: `eval.backend: lm-eval` (optional extra `ideal-mix[lm-eval]`).

    eval:
      backend: lm-eval
      tasks:                                   # capability -> lm-eval task and metric
        math: {task: gsm8k, metric: "exact_match,strict-match"}
        reasoning: {task: bbh, metric: exact_match}     # "metric" alone: its only filter
      include_path: my-tasks/                  # directory of local task YAMLs (optional)
      include_defaults: true                   # false: only include_path's tasks (faster start)
      limit: null                              # examples per task (lm-eval's --limit)
      options: {num_fewshot: 0}                # more keyword arguments of lm_eval.simple_evaluate

The round's model (a full model or a peft adapter) is loaded by ideal and handed to lm-eval's `HFLM`
in this process, through `lm_eval.simple_evaluate`; lm-eval's results are written as it writes them
(`RUN/round-K/eval/lm-eval/**/results_<time>.json`) and read back by `parse_results`, the same parser
that reads the results file of an `lm-eval` command run elsewhere (`eval.backend: command`,
`parse: lm-eval`). Scores are read from `results[task]` (or `groups[task]`) under the key
"<metric>,<filter>"; a lower-is-better metric is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ideal.artifacts import read_json
from ideal.backends.protocol import EvalJob, Score, score_from
from ideal.backends.settings import EvalConfig
from ideal.errors import IdealError
from ideal.settings import default_of

log = logging.getLogger(__name__)


def task_map(tasks: dict[str, Any], where: str = "eval.tasks") -> dict[str, tuple[str, str]]:
    """{capability: {task, metric}} (or "task/metric") -> {capability: (task, metric)}."""
    if not tasks:
        raise IdealError(f"{where}: map each capability to an lm-eval task and metric")
    out = {}
    for capability, entry in tasks.items():
        if isinstance(entry, str) and "/" in entry:
            task, metric = entry.split("/", 1)
        elif isinstance(entry, dict) and isinstance(entry.get("task"), str):
            task, metric = entry["task"], entry.get("metric", "acc")
        else:
            raise IdealError(
                f"{where}.{capability}: expected {{task: NAME, metric: METRIC}} or 'task/metric'"
            )
        out[capability] = (task, str(metric))
    return out


def _metric_key(entry: dict[str, Any], metric: str, where: str) -> str:
    if metric in entry:
        return metric
    keys = [k for k in entry if k.startswith(f"{metric},")]
    if len(keys) == 1:
        return keys[0]
    available = sorted(k for k in entry if "," in k and "_stderr," not in k)
    if not keys:
        raise IdealError(f"{where}: no metric {metric!r} (available: {', '.join(available)})")
    raise IdealError(f"{where}: metric {metric!r} has several filters; name one of {keys}")


def parse_results(
    results: dict[str, Any], tasks: dict[str, Any], source: str = "lm-eval"
) -> dict[str, Score]:
    """lm-eval's results (`simple_evaluate`'s dict, or a results_*.json) -> {capability: Score}."""
    if not isinstance(results, dict) or not isinstance(results.get("results"), dict):
        raise IdealError(f"{source}: not an lm-eval results file (no 'results')")
    tables = {**results.get("results", {}), **(results.get("groups") or {})}
    better = results.get("higher_is_better") or {}
    counts = results.get("n-samples") or {}
    out: dict[str, Score] = {}
    for capability, (task, metric) in task_map(tasks).items():
        where = f"{source}: capability {capability} (task {task})"
        if task not in tables:
            raise IdealError(f"{where}: task not in the results (has: {', '.join(sorted(tables))})")
        entry = tables[task]
        key = _metric_key(entry, metric, where)
        name, _, filt = key.partition(",")
        stderr_key = f"{name}_stderr,{filt}" if filt else f"{name}_stderr"
        n = counts.get(task, {}).get("effective") if isinstance(counts.get(task), dict) else None
        out[capability] = score_from(
            entry[key],
            where,
            metric=key,
            n=n,
            stderr=entry.get(stderr_key),
            higher_is_better=(better.get(task) or {}).get(name, True),
            source=f"{source}: {task} {key}",
        )
    return out


def newest_results(directory: Path) -> Path:
    """The newest results_*.json under `directory` (lm-eval names them by time)."""
    found = sorted(directory.rglob("results_*.json"), key=lambda p: (p.name, str(p)))
    if not found:
        raise IdealError(f"{directory}: no lm-eval results_*.json there")
    return found[-1]


@dataclass
class LmEvalEvaluator:
    """lm-eval in this process on the round's model; the results file is kept in the round."""

    tasks: dict[str, Any]
    include_path: str | None = None
    limit: float | None = None
    batch_size: int = default_of(EvalConfig, "batch_size")
    options: dict[str, Any] = field(default_factory=dict)
    include_defaults: bool = True  # also index lm-eval's shipped tasks (thousands of YAMLs)
    name: str = "lm-eval"

    def evaluate(self, job: EvalJob) -> dict[str, Score]:
        import torch

        try:
            import lm_eval
            from lm_eval.loggers import EvaluationTracker
            from lm_eval.models.huggingface import HFLM
            from lm_eval.tasks import TaskManager
        except ImportError:
            raise IdealError(
                "eval.backend lm-eval needs lm-evaluation-harness: pip install 'ideal-mix[lm-eval]'"
            ) from None
        from ideal.hf import load_causal_lm, load_tokenizer

        mapping = task_map(self.tasks)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_causal_lm(job.model_dir)
        if hasattr(model, "merge_and_unload"):  # a peft adapter: evaluate the merged weights
            model = model.merge_and_unload()
        model = model.to(device).eval()
        tokenizer = load_tokenizer(job.model_dir)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size, device=device)
        manager = TaskManager(
            include_path=self.include_path, include_defaults=self.include_defaults
        )
        options = {"log_samples": False, "bootstrap_iters": 0, **self.options}
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=sorted({task for task, _ in mapping.values()}),
            task_manager=manager,
            limit=self.limit,
            **options,
        )
        if results is None:  # a non-main process of a distributed lm-eval run
            raise IdealError("lm-eval returned no results (run the evaluation in one process)")
        out = job.work_dir / "lm-eval"
        EvaluationTracker(output_path=str(out)).save_results_aggregated(results=results)
        path = newest_results(out)
        return parse_results(read_json(path), self.tasks, str(path))
