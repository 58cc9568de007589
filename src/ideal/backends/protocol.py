"""What every trainer and evaluator backend is: one small protocol, and the checks around it.

    trainer.train(job: TrainJob) -> dict       a record for RUN/round-K/train.json; the model is
                                               left at job.output_dir (HF directory or peft adapter)
    evaluator.evaluate(job: EvalJob) -> {capability: Score}

A trainer says which objective it minimised (`loss`): "example" (the mean over examples of each
example's mean target NLL: our builtin loop's default, docs/method.md's L_mix) or "token" (the token mean
over the whole step: TRL, LLaMA-Factory, axolotl). The round's train.json records it, so that the
influence step can differentiate the same objective.

An external trainer may write anything; `find_trained_model` accepts a loadable Hugging Face model
directory (config.json + weights) or a peft adapter (adapter_config.json + adapter weights), at the
top of its output directory or in `merged/` (axolotl's `merge-lora`; preferred when both are
there), and refuses a sharded DeepSpeed or FSDP checkpoint with the one-line fix.
`collect_model` moves it to RUN/round-K/model.

The scores an external evaluator hands back (`read_scores`), documented in docs/reference.md:

    {"capabilities": {"math": {"score": 0.41, "metric": "exact_match", "higher_is_better": true,
                               "n": 500, "stderr": 0.02},
                      "code": 0.23}}                   # a bare number is {"score": 0.23}
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ideal.artifacts import read_json
from ideal.errors import IdealError

#: Files of a full model's weights (single file or the index of HF shards).
WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")

DEEPSPEED_FIX = (
    "set `stage3_gather_16bit_weights_on_model_save: true` in the DeepSpeed config (or run the "
    "zero_to_fp32.py it wrote next to the shards) so that a Hugging Face model directory is saved"
)
FSDP_FIX = (
    "set `fsdp_state_dict_type: FULL_STATE_DICT` (or run `accelerate merge-weights` on the shards) "
    "so that a Hugging Face model directory is saved"
)


@dataclass(frozen=True)
class TrainJob:
    """One round's training: what to train from, on what, and where the model must end up."""

    base_model: Path  # {model}: the base model directory (absolute)
    mixture_dir: Path  # the round directory: mixture.json and data/<domain>/data.jsonl
    output_dir: Path  # where the trained model must be: RUN/round-K/model
    round: int  # {round}
    run_dir: Path  # {run_dir}
    config_file: Path  # {config} for a plain command: the run's resolved config.yaml
    # train.top_layers' feature cache (the builtin trainer): RUN/features or a compare's shared one
    features: Path | None = None


class Trainer(Protocol):
    name: str
    loss: str  # "example" | "token": the objective it minimises (see the module docstring)
    all_processes: bool  # True: every process of a torchrun group calls train (DDP inside)

    def train(self, job: TrainJob) -> dict[str, Any]: ...


@dataclass(frozen=True)
class EvalJob:
    """One round's evaluation by an external evaluator."""

    model_dir: Path  # {model}: the round's model (a full model or an adapter)
    base_model: Path  # {base_model}: the adapter's base model, or model_dir itself
    work_dir: Path  # {output_dir}: RUN/round-K/eval, for the evaluator's own files
    round: int
    run_dir: Path
    config_file: Path
    test_data: Path | None  # {data_dir}: the run's test directory, when it has one


@dataclass(frozen=True)
class Score:
    """One capability's test score; higher is better (a metric where it is not is refused)."""

    score: float
    metric: str | None = None
    n: int | None = None
    stderr: float | None = None
    source: str = ""  # where it was read: file and key, for the record

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "metric": self.metric,
            "n": self.n,
            "stderr": self.stderr,
            "source": self.source,
        }


class Evaluator(Protocol):
    name: str

    def evaluate(self, job: EvalJob) -> dict[str, Score]: ...


@dataclass
class TrainedModel:
    path: Path
    kind: str  # "full" | "adapter"
    notes: list[str] = field(default_factory=list)


def model_kind(path: Path) -> str | None:
    """'full' (config.json + weights), 'adapter' (adapter_config.json + weights) or None."""
    if not path.is_dir():
        return None
    if (path / "config.json").is_file() and (
        any((path / w).is_file() for w in WEIGHTS) or any(path.glob("model-*.safetensors"))
    ):
        return "full"
    if (path / "adapter_config.json").is_file() and any(
        (path / w).is_file() for w in ADAPTER_WEIGHTS
    ):
        return "adapter"
    return None


def _sharded_checkpoint(path: Path) -> str | None:
    """The fix for a sharded DeepSpeed / FSDP checkpoint under `path`, or None."""
    deepspeed = (
        (path / "zero_to_fp32.py").is_file()
        or any(path.glob("global_step*/*model_states.pt"))
        or any(path.glob("checkpoint-*/global_step*/*model_states.pt"))
    )
    if deepspeed:
        return f"a sharded DeepSpeed ZeRO checkpoint, which ideal cannot load: {DEEPSPEED_FIX}"
    fsdp = any(path.glob("pytorch_model_fsdp*")) or any(path.glob("**/*.distcp"))
    if fsdp:
        return f"a sharded FSDP checkpoint, which ideal cannot load: {FSDP_FIX}"
    return None


def find_trained_model(output_dir: Path) -> TrainedModel:
    """What an external trainer produced: its `merged/` (axolotl merge-lora), or the directory."""
    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        raise IdealError(f"{output_dir}: the trainer exited with code 0 but wrote nothing there")
    for candidate in (output_dir / "merged", output_dir):  # a merge the user asked for first
        kind = model_kind(candidate)
        if kind is not None:
            return TrainedModel(candidate, kind)
    sharded = _sharded_checkpoint(output_dir)
    if sharded is not None:
        raise IdealError(f"{output_dir}: the trainer left {sharded}")
    raise IdealError(
        f"{output_dir}: no model there: expected config.json + *.safetensors (a Hugging Face "
        "model), adapter_config.json + adapter_model.safetensors (a peft adapter), or merged/"
    )


def collect_model(found: TrainedModel, target: Path, base_model: Path) -> None:
    """Move the model's files (top level only: checkpoints stay behind) to `target`, atomically.

    A full model without tokenizer files gets the base model's tokenizer; an adapter's
    `base_model_name_or_path` must name a local directory (the loaders check it).
    """
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for item in sorted(found.path.iterdir()):
        if item.is_file():
            os.replace(item, partial / item.name)
    if found.kind == "full" and not (partial / "tokenizer_config.json").is_file():
        from ideal.hf import load_tokenizer

        load_tokenizer(base_model).save_pretrained(partial)
        found.notes.append("no tokenizer in the trainer's output: the base model's was copied")
    os.replace(partial, target)


def read_scores(path: Path) -> dict[str, Score]:
    """The documented scores JSON (module docstring) -> {capability: Score}; errors name the file."""
    if not path.is_file():
        raise IdealError(f"{path}: the evaluator did not write its scores file")
    document = read_json(path)
    capabilities = document.get("capabilities") if isinstance(document, dict) else None
    if not isinstance(capabilities, dict) or not capabilities:
        raise IdealError(f'{path}: expected {{"capabilities": {{name: {{"score": x, ...}}}}}}')
    out: dict[str, Score] = {}
    for name, entry in capabilities.items():
        if isinstance(entry, int | float) and not isinstance(entry, bool):
            entry = {"score": entry}
        if not isinstance(entry, dict):
            raise IdealError(f"{path}: capabilities.{name}: expected a number or a mapping")
        out[name] = score_from(
            entry.get("score"),
            f"{path}: capabilities.{name}",
            metric=entry.get("metric"),
            n=entry.get("n"),
            stderr=entry.get("stderr"),
            higher_is_better=entry.get("higher_is_better", True),
            source=str(path),
        )
    return out


def score_from(
    value: Any,
    where: str,
    metric: str | None = None,
    n: Any = None,
    stderr: Any = None,
    higher_is_better: Any = True,
    source: str = "",
    scale: float = 1.0,
) -> Score:
    """A validated Score: a finite number, where higher is better."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise IdealError(f"{where}: score must be a finite number, got {value!r}")
    if higher_is_better is False:
        raise IdealError(
            f"{where}: metric {metric or '?'} is lower-is-better; ideal compares capabilities by a "
            "score where higher is better: choose another metric"
        )
    if stderr is not None and (isinstance(stderr, bool) or not isinstance(stderr, int | float)):
        stderr = None  # lm-eval writes "N/A" when it has none
    return Score(
        float(value) * scale,
        metric,
        int(n) if isinstance(n, int | float) and not isinstance(n, bool) else None,
        float(stderr) * scale if stderr is not None and math.isfinite(stderr) else None,
        source,
    )
