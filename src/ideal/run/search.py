"""The search recipe: `search:` of the run config. Search the mixture cheap, train it once.

    search:
      model: HuggingFaceTB/SmolLM2-135M-Instruct   # smaller, same tokenizer (default: the base)
      fraction: 0.25                               # of each round's volumes, shares kept
      train: {top_layers: 4, lora: true}           # overrides of train.*
      eval: {max_new_tokens: 16}                   # overrides of eval.*, merged with the
                                                   # default {test_accuracy: false}

With it, every round of the loop trains, evaluates and computes influence with this recipe, and
the round the run returns is then trained once with the run's own recipe (RUN/final/, ideal.run.loop).
Without it (absent), every round trains with the run's recipe, as before. `search: {}` (or an
empty `search:`) is the default recipe below. The overrides are validated against `train:` and
`eval:` by the run config (ideal.run.config), whose errors name the key (`search.train.epochs`).

No torch, no numpy: the command line reads this at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ideal.errors import IdealError
from ideal.settings import setting

# the default proxy of `ideal compare`'s ideal-search and of `search: {}`
DEFAULT_FRACTION = 0.25
# the search rounds skip decoding: what returns a round is its reference loss, and decoding was
# half of a real preset round (docs/results.md, 2026-12-03)
DEFAULT_EVAL = {"test_accuracy": False}


@dataclass(frozen=True)
class SearchSettings:
    """How the rounds search: a smaller model, a fraction of the data, other train/eval keys."""

    model: str | None = setting(
        None,
        "A smaller model that shares the base model's tokenizer (vocabulary and chat template, "
        "checked before training): a local Hugging Face directory or a cached hub id. None: "
        "the base model.",
    )
    fraction: float = setting(
        DEFAULT_FRACTION,
        "Each round trains on this fraction of the mixture's volumes, shares kept (and "
        "train.max_steps scaled by it, unless search.train sets max_steps). The rows are a "
        "prefix of a per-domain order drawn once per seed, so the rounds' subsets are nested "
        "(1: the round's whole mixture).",
    )
    train: dict[str, Any] = setting(
        factory=dict,
        help="Overrides of train.* for the search rounds (e.g. epochs, max_steps, lr, lora, "
        "top_layers, backend).",
    )
    eval: dict[str, Any] = setting(
        factory=lambda: dict(DEFAULT_EVAL),
        help="Overrides of eval.* for the search rounds, merged with the default test_accuracy "
        "false (the test sets' losses only: the rounds are chosen by the reference loss, and "
        "the final model is scored in full); e.g. max_new_tokens, or test_accuracy true.",
    )

    def __post_init__(self) -> None:
        # keys merge with the default: `search.eval.batch_size=4` keeps the loss-only evaluation
        object.__setattr__(self, "eval", {**DEFAULT_EVAL, **self.eval})
        if not 0.0 < self.fraction <= 1.0:
            raise IdealError(f"search.fraction must be in (0, 1], got {self.fraction}")

    def describe(self) -> str:
        """The recipe in a few words, for the console and the report."""
        parts = [f"fraction {self.fraction:g}"]
        if self.model:
            parts.append(f"model {self.model}")
        for section, overrides in (("train", self.train), ("eval", self.eval)):
            parts += [f"{section}.{k} {v}" for k, v in sorted(overrides.items())]
        return ", ".join(parts)
