"""Test helpers reused across the suite: data directories on disk, CLI runs, optional extras."""

from __future__ import annotations

import importlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from ideal.cli import main


def write_jsonl(path: Path, rows: list[dict[str, Any] | str]) -> Path:
    """Rows as objects (dumped) or raw strings (written as they are, for malformed input)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def make_data_dir(root: Path, domains: dict[str, list[dict[str, Any] | str]]) -> Path:
    for name, rows in domains.items():
        write_jsonl(root / name / "data.jsonl", rows)
    return root


def qa_rows(prefix: str, n: int) -> list[dict[str, Any]]:
    return [{"prompt": f"{prefix} {i}?", "completion": f"{i}", "answer": str(i)} for i in range(n)]


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli(capsys: Any, *args: str) -> CliResult:
    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


def tokenize_pairs(tokenizer: Any, pairs: list[tuple[str, str]]) -> list[Any]:
    from ideal.data.rows import Example, row_to_messages, tokenize_example

    return [
        tokenize_example(
            Example(
                row_to_messages({"prompt": p, "completion": c}, "prompt_completion"),
                None,
                f"x:{k}",
                "",
            ),
            tokenizer,
        )
        for k, (p, c) in enumerate(pairs)
    ]


def toy_influence_problem(n: int = 40, steps: int = 50, seed: int = 0):
    """A tiny Llama (1 block, 1152 MLP weights) trained briefly on 3 toy domains, with 3 references.

    Returns (model, domains, references) with domains as WeightedSets (weights 1 or 2 = copies).
    """
    import numpy as np
    import torch

    from ideal.influence.results import WeightedSet
    from ideal.lm import collate, example_losses
    from ideal.tiny import char_tokenizer, tiny_causal_lm

    tokenizer = char_tokenizer()
    model = tiny_causal_lm(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        intermediate_size=24,
        seed=seed,
    )
    rng = np.random.default_rng(seed)
    rules = {
        "add": (lambda i: str(2 * i % 10), 0),
        "rev": (lambda i: str(9 - i % 10), 3),
        "const": (lambda i: "7", 5),
    }

    def weighted(pairs):
        return WeightedSet(
            tokenize_pairs(tokenizer, pairs), [float(rng.integers(1, 3)) for _ in pairs]
        )

    domains = {
        d: weighted([(f"{i + off}+{i}", f(i)) for i in range(n)]) for d, (f, off) in rules.items()
    }
    references = {
        f"r_{d}": WeightedSet.uniform(
            tokenize_pairs(tokenizer, [(f"{i + off + 20}+{i}", f(i)) for i in range(6)])
        )
        for d, (f, off) in rules.items()
    }
    items = [item for ws in domains.values() for item in ws.items]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = collate(items, tokenizer.pad_token_id)
    for _ in range(steps):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss = example_losses(logits, batch.labels).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), domains, references


#: the oldest Python each extra installs its package on (pyproject.toml's markers): TRL >= 1.16
#: has no release for Python 3.10
EXTRA_PYTHON = {"trl": (3, 11)}


def require_extra(module: str, extra: str) -> ModuleType:
    """`module` of the optional extra `extra`, for a test that needs it. Where the extra installs
    nothing (an older Python than its marker) the test skips saying so. Where `make test` or CI
    installed it (IDEAL_EXTRAS_REQUIRED, IDEAL_TOOLS_REQUIRED, CI=true) a missing module fails the
    test; elsewhere it skips with the reason (`pytest -ra` lists it)."""
    oldest = EXTRA_PYTHON.get(extra)
    if oldest is not None and tuple(sys.version_info[:2]) < oldest:
        pytest.skip(
            f"the '{extra}' extra needs Python >= {'.'.join(map(str, oldest))} (this is "
            f"{'.'.join(map(str, sys.version_info[:3]))}): it installs nothing here"
        )
    try:
        return importlib.import_module(module)
    except ImportError as err:
        why = f"{module} is not installed ({err}): pip install 'ideal-mix[{extra}]'"
        required = ("IDEAL_EXTRAS_REQUIRED", "IDEAL_TOOLS_REQUIRED")
        if any(os.environ.get(name) for name in required) or os.environ.get("CI") == "true":
            pytest.fail(f"{why}; `make test` installs it", pytrace=False)
        pytest.skip(why)
