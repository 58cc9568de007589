"""Domains on disk -> validated rows -> chat messages (then `ideal.data.tokens`: token ids + labels).

A data directory holds one sub-directory per domain (or capability), each with one or more data
files: `*.jsonl`, `*.json` (an array of rows), `*.parquet`, or a `datasets` directory
(`save_to_disk`); `ideal.data.files` reads them and says which names are skipped. Four row formats
are accepted; the format is detected from a file's first row and every later row of that file must
follow it:

    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    {"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...], "system": str?}
                                                       -> ShareGPT: human = user, gpt = assistant
                                                          ("user"/"assistant" are accepted too)
    {"prompt": str, "completion": str}                 -> one user turn, one assistant turn
    {"instruction": str, "input": str?, "output": str}  -> user turn "instruction\\n\\ninput", assistant turn

Any row may add `"answer"` (the expected final answer, for generative scoring). A bad row is an
error naming its file, its line (JSON Lines) or index (`path[i]`, 0-based, other kinds) and the
reason; with on_invalid="skip" it is skipped and listed in `Domain.skipped` instead.

Messages -> token ids + loss labels is the next step, in `ideal.data.tokens` (its names are
re-exported here, where the rest of the package imports them from).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ideal.data.examples import Example, OnInvalid  # noqa: F401  (re-exported)
from ideal.data.files import data_files, read_rows
from ideal.data.tokens import (  # re-exported: the package imports them from here
    IGNORE_INDEX,
    PLAIN_TEMPLATE,
    Tokenized,
    TokenizeReport,
    tokenize_example,
    tokenize_examples,
)
from ideal.errors import IdealError, at

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
FORMATS = ("messages", "sharegpt", "prompt_completion", "alpaca")
#: ShareGPT's speakers -> roles ("user"/"assistant" as some ShareGPT exports write them).
SHAREGPT_ROLES = {
    "human": "user",
    "gpt": "assistant",
    "system": "system",
    "user": "user",
    "assistant": "assistant",
}


@dataclass
class Domain:
    """A domain (or capability) directory: its files, their detected formats, its examples."""

    name: str
    path: Path
    files: list[Path]  # data files and datasets directories
    formats: dict[str, str]  # file name -> detected row format (FORMATS)
    examples: list[Example]
    skipped: list[str] = field(default_factory=list)  # "location: reason", with on_invalid="skip"
    kinds: dict[str, str] = field(default_factory=dict)  # file name -> kind (files.KINDS)
    rows: dict[str, int] = field(default_factory=dict)  # file name -> examples read from it


# ----------------------------------------------------------------------------- rows -> messages


def detect_format(row: dict[str, Any]) -> str | None:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "prompt" in row or "completion" in row:
        return "prompt_completion"
    if "instruction" in row or "output" in row:
        return "alpaca"
    return None


def _string(row: dict[str, Any], key: str, *, required: bool = True) -> str | None:
    if key not in row:
        if required:
            raise ValueError(f"missing field '{key}'")
        return None
    value = row[key]
    if not isinstance(value, str):
        raise ValueError(f"field '{key}' must be a string, got {type(value).__name__}")
    return value


def _sharegpt(row: dict[str, Any]) -> tuple[dict[str, str], ...]:
    if "conversations" not in row:
        raise ValueError("missing field 'conversations'")
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        raise ValueError("field 'conversations' must be a non-empty list")
    system = _string(row, "system", required=False)
    out = [{"role": "system", "content": system}] if system else []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"conversations[{k}] must be an object, got {type(turn).__name__}")
        try:
            speaker, value = _string(turn, "from"), _string(turn, "value")
        except ValueError as err:
            raise ValueError(f"conversations[{k}]: {err}") from None
        if speaker not in SHAREGPT_ROLES:
            raise ValueError(
                f"conversations[{k}].from must be one of {', '.join(SHAREGPT_ROLES)}, got "
                f"'{speaker}'"
            )
        out.append({"role": SHAREGPT_ROLES[speaker], "content": value})
    if out[-1]["role"] != "assistant":
        raise ValueError("the last turn must be from 'gpt' (the target)")
    return tuple(out)


def row_to_messages(row: dict[str, Any], fmt: str) -> tuple[dict[str, str], ...]:
    """Validate one row of format `fmt` and return its conversation. Raises ValueError(reason)."""
    if fmt == "sharegpt":
        return _sharegpt(row)
    if fmt == "prompt_completion":
        prompt, completion = _string(row, "prompt"), _string(row, "completion")
        return ({"role": "user", "content": prompt}, {"role": "assistant", "content": completion})
    if fmt == "alpaca":
        instruction, output = _string(row, "instruction"), _string(row, "output")
        extra = _string(row, "input", required=False)
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        return ({"role": "user", "content": prompt}, {"role": "assistant", "content": output})
    messages = row.get("messages")
    if "messages" not in row:
        raise ValueError("missing field 'messages'")
    if not isinstance(messages, list) or not messages:
        raise ValueError("field 'messages' must be a non-empty list")
    out = []
    for k, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{k}] must be an object, got {type(message).__name__}")
        role = _string(message, "role")
        content = _string(message, "content")
        if role not in ROLES:
            raise ValueError(f"messages[{k}].role must be one of {', '.join(ROLES)}, got '{role}'")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "assistant":
        raise ValueError("the last message must be an assistant turn (the target)")
    return tuple(out)


def _answer(row: dict[str, Any]) -> str | None:
    if "answer" not in row:
        return None
    value = row["answer"]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"field 'answer' must be a string or a number, got {type(value).__name__}")
    return str(value)


def read_file(
    path: Path, on_invalid: OnInvalid = "error", kind: str | None = None
) -> tuple[list[Example], str, list[str]]:
    """Read one data file or datasets directory (`kind` as `ideal.data.files.KINDS`, by default from
    its name). Returns (examples, detected format, skipped rows as "location: reason").

    The format is detected from the first row; with on_invalid="skip", bad rows are skipped and
    returned in the third element instead of raising.
    """
    examples: list[Example] = []
    skipped: list[str] = []
    fmt: str | None = None
    for item in read_rows(path, kind):
        try:
            if item.error is not None:
                raise ValueError(item.error)
            row = item.value
            if not isinstance(row, dict):
                raise ValueError(f"a row must be a JSON object, got {type(row).__name__}")
            if fmt is None:
                fmt = detect_format(row)
                if fmt is None:
                    keys = ", ".join(sorted(row)) or "none"
                    raise ValueError(
                        "unknown row format: expected 'messages', 'conversations', "
                        f"'prompt'/'completion' or 'instruction'/'input'/'output' fields, found {keys}"
                    )
            messages = row_to_messages(row, fmt)
            answer = _answer(row)
        except ValueError as err:
            if on_invalid == "skip":
                skipped.append(f"{item.location}: {err}")
                continue
            raise IdealError(f"{item.location}: {err}") from None
        examples.append(Example(messages, answer, item.location, item.text))
    if fmt is None and not skipped:
        raise at(path, None, "empty file (no rows)")
    return examples, fmt or "unknown", skipped


def read_jsonl(path: Path, on_invalid: OnInvalid = "error") -> tuple[list[Example], str, list[str]]:
    """Read one JSON Lines file (blank lines are ignored): `read_file` of kind "jsonl"."""
    return read_file(path, on_invalid, "jsonl")


def load_domains(root: str | Path, on_invalid: OnInvalid = "error") -> dict[str, Domain]:
    """Discover `<root>/<domain>/<data files>` and load every domain, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise IdealError(f"{root}: not a directory")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise IdealError(
            f"{root}: no domain directories (expected {root}/<domain>/*.jsonl, or another data file)"
        )
    seen: dict[str, Path] = {}
    for path in dirs:
        key = path.name.casefold()
        if key in seen:
            raise IdealError(
                f"{path}: duplicate domain name '{path.name}' (also {seen[key]}; names are "
                "compared without case)"
            )
        seen[key] = path
    domains: dict[str, Domain] = {}
    for path in dirs:
        found = data_files(path)
        if not found:
            raise IdealError(
                f"{path}: empty domain (no data files: *.jsonl, *.json, *.parquet or a `datasets` "
                "directory)"
            )
        domain = Domain(path.name, path, [file for file, _ in found], {}, [])
        for file, kind in found:
            examples, fmt, skipped = read_file(file, on_invalid, kind)
            domain.formats[file.name] = fmt
            domain.kinds[file.name] = kind
            domain.rows[file.name] = len(examples)
            domain.examples.extend(examples)
            domain.skipped.extend(skipped)
        if not domain.examples:
            raise IdealError(f"{path}: empty domain (every row was invalid and skipped)")
        if domain.skipped:
            log.warning(
                "%s: skipped %d invalid rows (first: %s)",
                path,
                len(domain.skipped),
                domain.skipped[0],
            )
        domains[path.name] = domain
    return domains


__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "PLAIN_TEMPLATE",
    "ROLES",
    "SHAREGPT_ROLES",
    "Domain",
    "Example",
    "OnInvalid",
    "TokenizeReport",
    "Tokenized",
    "detect_format",
    "load_domains",
    "read_file",
    "read_jsonl",
    "row_to_messages",
    "tokenize_example",
    "tokenize_examples",
]
