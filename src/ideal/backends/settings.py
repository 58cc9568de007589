"""The settings of who trains and who evaluates: `train:` and `eval:` of the run config, and the
options of `ideal train` / `ideal eval`, with their defaults, choices and help (ideal.settings).

No torch here: the command line reads these at start-up.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from ideal.artifacts import sha256_text
from ideal.errors import IdealError
from ideal.settings import LOSSES, check_choices, setting

TRAIN_BACKENDS = ("builtin", "trl", "command", "llamafactory", "axolotl", "trl-cli")
PRESETS = ("llamafactory", "axolotl", "trl-cli")  # external tools rendered over `command`
EVAL_BACKENDS = ("builtin", "lm-eval", "command")
EVAL_PARSERS = ("scores", "lm-eval", "opencompass")
EXPORT_FORMATS = ("llamafactory", "trl", "axolotl")
OPTIMIZERS = ("adamw", "sgd")
ACCURACY_ROUNDS = ("every", "returned")  # eval.accuracy_rounds
REFERENCE_ACCURACY = ("auto", "always", "never")
PARITY = ("auto", "on", "off")


@dataclass(frozen=True)
class TrainSettings:
    """The builtin trainer's recipe (`ideal train`; `train:` of the run config)."""

    epochs: float = setting(1.0, "Passes over the mixture (fractions allowed).")
    max_steps: int | None = setting(None, "Optimizer steps (overrides epochs).")
    lr: float = setting(2e-5, "Peak learning rate (warmup then cosine).")
    batch_size: int = setting(8, "Examples per micro-batch.")
    grad_accum: int = setting(1, "Micro-batches per optimizer step.")
    warmup_ratio: float = setting(0.03, "Fraction of steps of linear warmup.")
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    max_grad_norm: float = setting(1.0, "Gradient clipping (largest global norm).")
    loss_normalization: str = setting(
        "example",
        "example: mean of per-example mean NLL (docs/method.md's L_mix); token: mean over target "
        "tokens. Both over the whole optimizer step.",
        choices=LOSSES,
    )
    # Adam divides by sqrt(v), so a round-off difference in a near-zero gradient becomes a
    # full-size step; SGD keeps round-off at its size, which is what a check of "N processes
    # compute the same steps as 1" needs.
    optimizer: str = setting(
        "adamw",
        "adamw, or sgd (plain, no momentum: round-off stays at its size, for invariance checks).",
        choices=OPTIMIZERS,
    )
    max_length: int | None = setting(None, "Truncate examples to this many tokens.")
    seed: int = setting(0, "Data order and initialisation seed.")
    lora: bool = setting(False, "Train a LoRA adapter (peft) instead of every weight.")
    lora_r: int = setting(8, "LoRA rank.")
    lora_alpha: int = setting(16, "LoRA alpha (the update is scaled by alpha / r).")
    lora_dropout: float = setting(0.0, "Dropout on the LoRA path.")
    lora_targets: tuple[str, ...] = setting(
        ("all-linear",), "Module names the adapter wraps (comma-separated), or all-linear."
    )
    # Exact: the frozen bottom's output is the same whatever trains above it (ideal.backends.training.top_layers)
    top_layers: int = setting(
        0,
        "Train only the top K transformer blocks, fully or with LoRA (0: every block). Embeddings, "
        "the blocks below, the final norm and the head stay frozen. Llama, Qwen2 and Mistral.",
    )
    feature_cache: bool = setting(
        True,
        "With top_layers: compute the hidden states entering the trained blocks once per row and "
        "reuse them (on disk, keyed by the base weights, the row, max_length and K); "
        "--no-feature-cache recomputes them every step (the same numbers).",
    )
    checkpoint_every: int = setting(50, "Optimizer steps between checkpoints (0: none).")
    threads: int | None = setting(None, "CPU threads for torch (default: torch's own).")

    def __post_init__(self) -> None:
        check_choices(self, "train")
        for name in ("batch_size", "grad_accum", "lora_r"):
            if getattr(self, name) < 1:
                raise IdealError(
                    f"train.{name} (--{name.replace('_', '-')}) must be >= 1, "
                    f"got {getattr(self, name)}"
                )
        if self.top_layers < 0:
            raise IdealError(f"train.top_layers (--top-layers) must be >= 0, got {self.top_layers}")
        if not self.lr > 0:
            raise IdealError(f"train.lr (--lr) must be > 0, got {self.lr}")
        if self.max_steps is None and not self.epochs > 0:
            raise IdealError(f"train.epochs (--epochs) must be > 0, got {self.epochs}")

    @property
    def examples_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def total_steps(self, examples: int) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * examples / self.examples_per_step))

    def hash(self) -> str:
        values = asdict(self)
        if not self.top_layers:  # at their defaults, the hash of a run started before they existed
            del values["top_layers"], values["feature_cache"]
        return sha256_text(json.dumps(values, sort_keys=True))[:16]


@dataclass(frozen=True)
class TrainConfig(TrainSettings):
    """`train:` of the run config: the builtin loop's settings, and who trains (ideal.backends).

    The loop's fields (epochs, lr, batch_size, ...) drive `builtin` and map onto SFTConfig for
    `trl`; an external trainer (`command` and its presets) takes its recipe from its own config.
    `max_length` and `seed` have their home at the top of the run config (they also drive the
    influence step and the evaluation): RunConfig copies them here.
    """

    backend: str = setting("builtin", "Who trains each round.", choices=TRAIN_BACKENDS)
    command: str | tuple[str, ...] | None = setting(
        None, "command: the trainer's command template; presets have a default."
    )
    base_config: str | None = setting(
        None, "Presets: the tool's YAML that each round's config starts from."
    )
    export: str = setting(
        "trl",
        "command: the tool file `ideal export` writes beside the rows.",
        choices=EXPORT_FORMATS,
    )
    env: dict[str, str] = setting(factory=dict, help="More environment for the command.")
    timeout: float | None = setting(
        172800.0, "Seconds before the command's process group is ended."
    )
    trl_args: dict[str, Any] = setting(factory=dict, help="trl: more SFTConfig fields.")
    parity: str = setting(
        "auto",
        "Presets: before each round trains, load its export through the tool's own data "
        "pipeline and compare volumes, token ids and trained tokens with ideal's (an error when "
        "a row would be dropped). auto: when the tool imports in the command's environment; on: "
        "required; off: never.",
        choices=PARITY,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend == "command" and not self.command:
            raise IdealError("train.backend command: give train.command, the command to run")
        if self.backend in PRESETS and not self.base_config:
            raise IdealError(
                f"train.backend {self.backend}: give train.base_config, your {self.backend} YAML"
            )
        if self.timeout is not None and not self.timeout > 0:
            raise IdealError(f"train.timeout must be > 0 seconds, got {self.timeout}")
        if self.top_layers and self.backend != "builtin":
            raise IdealError(
                f"train.top_layers: only the builtin backend trains the top blocks alone, "
                f"not {self.backend}; use top_layers 0"
            )

    def settings(self) -> TrainSettings:
        """The builtin loop's settings alone (what `ideal train` takes and hashes)."""
        return TrainSettings(**{f.name: getattr(self, f.name) for f in fields(TrainSettings)})


@dataclass(frozen=True)
class EvalConfig:
    """`eval:` of the run config, and `ideal eval`'s options. Reference losses are always
    computed by ideal (the method needs them); `backend` says who scores the test capabilities."""

    scorers: dict[str, str] = setting(
        factory=dict,
        help="Per capability: the scorer (default exact; choice: multiple choice by "
        "log-likelihood, no generation).",
    )
    max_new_tokens: int = setting(32, "Generation limit per answer.")
    batch_size: int = setting(32, "Examples per evaluation batch.")
    # decoding is most of a real model's evaluation
    reference_accuracy: str = setting(
        "auto",
        "Decode the reference sets for their accuracy: auto (only when `select` needs it), "
        "always, never.",
        choices=REFERENCE_ACCURACY,
    )
    test_accuracy: bool = setting(
        True,
        "Score the test sets' accuracy (decoding, choice likelihoods or the evaluator); false: "
        "their losses only, which is all a search recipe's rounds need (search.eval).",
    )
    accuracy_rounds: str = setting(
        "every",
        "Whose test accuracy needs decoding: every round's, or only the round the run returns "
        "(the others get their test losses and their `choice` accuracies, which need no "
        "decoding).",
        choices=ACCURACY_ROUNDS,
    )
    backend: str = setting("builtin", "Who scores the test capabilities.", choices=EVAL_BACKENDS)
    command: str | tuple[str, ...] | None = setting(
        None, "command: the evaluator's command template."
    )
    parse: str = setting(
        "scores",
        "command: what it writes: {scores}, or the tool's results (lm-eval, opencompass).",
        choices=EVAL_PARSERS,
    )
    tasks: dict[str, Any] = setting(
        factory=dict, help="Capability -> the evaluator's task/dataset and metric."
    )
    include_path: str | None = setting(None, "lm-eval: directory of local task YAMLs.")
    include_defaults: bool = setting(
        True, "lm-eval: also its shipped tasks (false: include_path only)."
    )
    limit: float | None = setting(None, "lm-eval: examples per task.")
    options: dict[str, Any] = setting(factory=dict, help="lm-eval: more simple_evaluate arguments.")
    env: dict[str, str] = setting(factory=dict, help="More environment for the command.")
    timeout: float | None = setting(172800.0, "Seconds before the evaluator is ended.")

    def __post_init__(self) -> None:
        check_choices(self, "eval")
        if self.max_new_tokens < 1:
            raise IdealError(f"eval.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise IdealError(f"eval.batch_size must be >= 1, got {self.batch_size}")
        if self.backend == "command" and not self.command:
            raise IdealError("eval.backend command: give eval.command, the command to run")
        needs_tasks = self.backend == "lm-eval" or self.parse != "scores"
        if needs_tasks and not self.tasks:
            raise IdealError("eval.tasks: map each capability to the evaluator's task and metric")
