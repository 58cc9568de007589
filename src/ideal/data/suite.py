"""The embedded multi-capability suite: toy SFT data and a tiny model, generated locally (no downloads).

Four tasks stand in for the capabilities a user balances:

    add      math           "37+8=" -> "45"                (difficulty-digit number plus one digit)
    reverse  code           "rev: hcfa" -> "afch"          (string reversal, letters a-h)
    sort     reasoning      "sort: 3814" -> "1348"         (digit sorting)
    recall   instructions   "b=4 g=7 d=1 ? g" -> "7"       (key-value recall, format following)

A training domain draws from one task, with its own pool size, starting volume, label-noise rate and
optionally a conflicting answer convention (`conflict: true`: the same prompts as the task, answered
with the input copied unchanged). Every capability gets a reference split (drives the method) and a
test split (only measures), disjoint from the training pools and from each other (prompts already drawn are skipped).
"""

from __future__ import annotations

import json
import random
import string
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ideal.artifacts import atomic_dir
from ideal.errors import IdealError

TASKS = ("add", "reverse", "sort", "recall")


LETTERS = "abcdefgh"  # a small alphabet keeps string tasks learnable by a tiny model


def _add(rng: random.Random, difficulty: int) -> tuple[str, str]:
    a, b = rng.randrange(10**difficulty), rng.randrange(10)
    return f"{a}+{b}=", str(a + b)


def _word(rng: random.Random, difficulty: int) -> str:
    return "".join(
        rng.choice(LETTERS) for _ in range(rng.randint(max(2, difficulty - 1), difficulty))
    )


def _reverse(rng: random.Random, difficulty: int) -> tuple[str, str]:
    word = _word(rng, difficulty)
    return f"rev: {word}", word[::-1]


def _sort(rng: random.Random, difficulty: int) -> tuple[str, str]:
    digits = "".join(rng.choice(string.digits) for _ in range(difficulty))
    return f"sort: {digits}", "".join(sorted(digits))


def _recall(rng: random.Random, difficulty: int) -> tuple[str, str]:
    keys = rng.sample(LETTERS, difficulty)
    values = [rng.choice(string.digits) for _ in keys]
    query = rng.randrange(len(keys))
    pairs = " ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))
    return f"{pairs} ? {keys[query]}", values[query]


GENERATORS: dict[str, Callable[[random.Random, int], tuple[str, str]]] = {
    "add": _add,
    "reverse": _reverse,
    "sort": _sort,
    "recall": _recall,
}


def _conflicting(prompt: str) -> str:
    """The conflicting convention: answer with the input copied unchanged."""
    return prompt.split(": ", 1)[-1].split("=")[0]


@dataclass(frozen=True)
class DomainSpec:
    name: str
    task: str
    pool: int = 400  # unique examples available
    volume: int = 200  # examples in the starting mixture D0
    noise: float = 0.0  # fraction of rows whose answer is replaced by another row's answer
    conflict: bool = False  # answer with the input unchanged instead of the task's answer

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise IdealError(
                f"suite: domain '{self.name}': unknown task '{self.task}' (one of {', '.join(TASKS)})"
            )
        if self.pool < 1 or self.volume < 1:
            raise IdealError(f"suite: domain '{self.name}': pool and volume must be >= 1")
        if not 0.0 <= self.noise <= 1.0:
            raise IdealError(f"suite: domain '{self.name}': noise must be in [0, 1]")


@dataclass(frozen=True)
class SuiteConfig:
    domains: tuple[DomainSpec, ...] = field(
        default_factory=lambda: (
            DomainSpec("add", "add"),
            DomainSpec("reverse", "reverse"),
            DomainSpec("sort", "sort"),
            DomainSpec("recall", "recall"),
        )
    )
    capabilities: tuple[str, ...] = TASKS
    difficulty: dict[str, int] = field(
        default_factory=lambda: {"add": 2, "reverse": 4, "sort": 4, "recall": 3}
    )
    reference_size: int = 32
    test_size: int = 64
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        names = [d.name for d in self.domains]
        if len(set(names)) != len(names):
            raise IdealError(f"suite: duplicate domain names in {names}")
        for capability in self.capabilities:
            if capability not in TASKS:
                raise IdealError(
                    f"suite: unknown capability '{capability}' (one of {', '.join(TASKS)})"
                )


def _rows(
    task: str,
    n: int,
    difficulty: int,
    seed: int,
    noise: float = 0.0,
    conflict: bool = False,
    exclude: set[str] | None = None,
) -> list[dict]:
    """n rows of a task; prompts in `exclude` are skipped (and the ones drawn are added to it)."""
    rng = random.Random(seed)
    pairs: list[tuple[str, str]] = []
    seen = exclude if exclude is not None else set()
    for _ in range(100 * n):
        if len(pairs) == n:
            break
        prompt, answer = GENERATORS[task](rng, difficulty)
        if exclude is not None and prompt in seen:
            continue
        seen.add(prompt)
        pairs.append((prompt, answer))
    if len(pairs) < n:
        raise IdealError(
            f"suite: task '{task}' at difficulty {difficulty} has too few distinct prompts for {n} rows"
        )
    rows = []
    for prompt, answer in pairs:
        if conflict:
            answer = _conflicting(prompt)
        elif noise and rng.random() < noise:
            answer = rng.choice(pairs)[1]
        rows.append({"prompt": prompt, "completion": answer, "answer": answer})
    return rows


def _write(path: Path, rows: list[dict]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _split_seed(seed: int, split: str, name: str) -> int:
    return zlib.crc32(f"{seed}/{split}/{name}".encode())


def generate_suite(config: SuiteConfig, out: str | Path) -> Path:
    """Write `out/{train,reference,test}/<name>/data.jsonl` and the base model `out/base`, atomically."""
    from ideal.tiny import char_tokenizer, save_model_dir, tiny_causal_lm

    with atomic_dir(out) as tmp:
        used: dict[str, set[str]] = {
            task: set() for task in TASKS
        }  # prompts drawn so far, per task
        for spec in config.domains:
            difficulty = config.difficulty.get(spec.task, 3)
            seed = _split_seed(config.seed, "train", spec.name)
            rows = _rows(spec.task, spec.pool, difficulty, seed, spec.noise, spec.conflict)
            used[spec.task].update(r["prompt"] for r in rows)
            _write(tmp / "train" / spec.name, rows)
        for capability in config.capabilities:  # disjoint from training and from each other
            difficulty = config.difficulty.get(capability, 3)
            for split, size in (("reference", config.reference_size), ("test", config.test_size)):
                seed = _split_seed(config.seed, split, capability)
                _write(
                    tmp / split / capability,
                    _rows(capability, size, difficulty, seed, exclude=used[capability]),
                )
        tokenizer = char_tokenizer()
        model = tiny_causal_lm(
            "llama",
            vocab_size=len(tokenizer),
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            intermediate_size=config.intermediate_size,
            seed=config.seed,
        )
        save_model_dir(tmp / "base", model, tokenizer)
    return Path(out)
