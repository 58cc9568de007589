"""Test helpers reused across the suite: data directories on disk and CLI runs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
