"""Data files on disk: which files a domain directory holds, and the rows of each, with locations.

A domain directory holds one or more of these, detected by name, each read whole:

    *.jsonl     one JSON object per line (blank lines skipped)          location  path:line (1-based)
    *.json      a JSON array of objects, as LLaMA-Factory keeps them    location  path[index] (0-based)
                (a .json file of one object per line, as `Dataset.to_json` writes, is read as JSON Lines)
    *.parquet   a table, read with pyarrow                               location  path[index]
    <name>/     a `datasets` directory (`Dataset.save_to_disk`, or a     location  path[index]
                `DatasetDict` of one split), read with `datasets.load_from_disk`

Names starting with '.' are hidden files, not data, and are passed over (`.DS_Store`,
`.gitattributes`, editor and notebook droppings). Any other file or directory is an error naming it,
never skipped: a `.csv` or `.txt` the user took for data must not silently drop out of the mixture,
and a dataset card (`README.md`) belongs beside the domain directories, not inside one.
pyarrow and datasets are optional: reading a parquet file or a datasets directory without them is a
one-line error saying how to install them.

Rows of a table (parquet, datasets) come from columns, so a row without a value holds a null there:
null values are dropped from those rows (a null `input` is no `input`). A JSON null stays a null and
is refused by the row checks, as in JSON Lines. Each row keeps its JSON text, one line (as read for
JSON Lines), which mixtures write back and scorers read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ideal.artifacts import sha256_file
from ideal.errors import IdealError, at

KINDS = ("jsonl", "json", "parquet", "datasets")
SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
#: The files that make a directory one that `datasets.load_from_disk` reads.
DATASETS_MARKERS = ("state.json", "dataset_dict.json")
BATCH = 1024  # rows converted to Python objects at a time, from a table


@dataclass(frozen=True)
class RawRow:
    """One row as read: its location, its parsed value (None when `error`), its JSON text."""

    location: str  # "path:line" (JSON Lines) or "path[index]"
    value: Any
    text: str
    error: str | None = None  # why the row could not be parsed (invalid JSON); the file goes on


def is_datasets_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in DATASETS_MARKERS)


def data_files(domain: Path) -> list[tuple[Path, str]]:
    """A domain directory's data files and datasets directories, sorted by name, with their kind.

    Raises IdealError for anything else in it (see the module docstring) and for a domain directory
    that is itself a datasets directory (it belongs one level down, beside other data files).
    """
    if is_datasets_dir(domain):
        raise IdealError(
            f"{domain}: a `datasets` directory (save_to_disk) must be a sub-directory of the domain "
            f"directory: move it to {domain}/<name>/"
        )
    found: list[tuple[Path, str]] = []
    for path in sorted(domain.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            if not is_datasets_dir(path):
                raise IdealError(
                    f"{path}: a directory that is not a `datasets` directory (no "
                    f"{' or '.join(DATASETS_MARKERS)}); a domain holds data files only"
                )
            found.append((path, "datasets"))
        elif path.suffix.lower() in SUFFIXES:
            found.append((path, SUFFIXES[path.suffix.lower()]))
        else:
            raise IdealError(
                f"{path}: not a data file (expected *.jsonl, *.json, *.parquet or a `datasets` "
                "directory)"
            )
    return found


def kind_of(path: Path) -> str:
    """The kind of one data file or datasets directory, by name (see KINDS)."""
    if is_datasets_dir(path):
        return "datasets"
    if path.suffix.lower() in SUFFIXES:
        return SUFFIXES[path.suffix.lower()]
    raise IdealError(f"{path}: not a data file (expected *.jsonl, *.json, *.parquet)")


def fingerprint(path: Path) -> str:
    """sha256 of a data file; of a datasets directory, of its files' names and sha256s (dotfiles
    skipped, as everywhere)."""
    if not path.is_dir():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        name = file.relative_to(path).as_posix()
        if file.is_file() and not any(part.startswith(".") for part in name.split("/")):
            digest.update(f"{name}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def read_rows(path: Path, kind: str | None = None) -> Iterator[RawRow]:
    """The rows of one data file or datasets directory, in order. Errors about the whole file
    (unreadable, not UTF-8, not an array) raise IdealError; a line of invalid JSON in JSON Lines is
    returned as a row with `error` set, so that the caller may skip it."""
    kind = kind or kind_of(path)
    if kind == "jsonl":
        return _jsonl(path, _text(path))
    if kind == "json":
        return _json(path)
    if kind == "parquet":
        return _table_rows(path, _parquet_batches(path))
    if kind == "datasets":
        return _table_rows(path, _datasets_batches(path))
    raise ValueError(f"unknown kind {kind!r} (one of {', '.join(KINDS)})")


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise at(path, None, f"not UTF-8 text ({err.reason} at byte {err.start})") from None


def _jsonl(path: Path, text: str) -> Iterator[RawRow]:
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            yield RawRow(f"{path}:{number}", json.loads(line), line)
        except json.JSONDecodeError as err:
            yield RawRow(
                f"{path}:{number}", None, line, f"invalid JSON ({err.msg}, column {err.colno})"
            )


def _json(path: Path) -> Iterator[RawRow]:
    text = _text(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and text.lstrip().startswith("{"):  # one object per line
            return _jsonl(path, text)
        raise at(path, err.lineno, f"invalid JSON ({err.msg}, column {err.colno})") from None
    if isinstance(value, dict):
        # One object: a JSON Lines file of one row, or not data at all (dataset_info.json).
        return _jsonl(path, json.dumps(value, ensure_ascii=False))
    if not isinstance(value, list):
        raise at(path, None, f"expected a JSON array of rows, got {type(value).__name__}")
    return (
        RawRow(f"{path}[{index}]", row, json.dumps(row, ensure_ascii=False))
        for index, row in enumerate(value)
    )


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _table_rows(path: Path, batches: Iterator[Any]) -> Iterator[RawRow]:
    index = 0
    for batch in batches:
        for row in batch.to_pylist():
            row = _without_nulls(row)
            # Values JSON has no type for (dates, bytes) are kept as their text.
            text = json.dumps(row, ensure_ascii=False, default=str)
            yield RawRow(f"{path}[{index}]", row, text)
            index += 1


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _parquet_batches(path: Path) -> Iterator[Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise IdealError(
            f"{path}: reading parquet needs pyarrow: pip install 'ideal-mix[formats]'"
        ) from None
    try:
        yield from pq.ParquetFile(path).iter_batches(batch_size=BATCH)
    except (pa.ArrowException, OSError) as err:
        raise at(path, None, f"cannot read as parquet ({_first_line(err)})") from None


def _datasets_batches(path: Path) -> Iterator[Any]:
    try:
        import datasets
    except ImportError:
        raise IdealError(
            f"{path}: reading a `datasets` directory needs the datasets package: "
            "pip install 'ideal-mix[formats]'"
        ) from None
    try:
        data = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as err:
        raise at(
            path, None, f"cannot load with datasets.load_from_disk ({_first_line(err)})"
        ) from None
    if isinstance(data, datasets.DatasetDict):
        if len(data) != 1:
            raise at(
                path,
                None,
                f"a DatasetDict of splits {', '.join(data)}; a domain reads one split: save it "
                "alone (dataset['train'].save_to_disk(...))",
            )
        (data,) = data.values()
    yield from data.with_format("arrow").iter(batch_size=BATCH)
