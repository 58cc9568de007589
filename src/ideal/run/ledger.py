"""The results ledger: every measured cell of a comparison, one JSON line each, appended as soon as
the cell finishes (SPEC.md "Evidence: a results ledger").

    docs/ledger.jsonl       {"format": "ideal-ledger/1", "key": ..., "campaign": "real-defaults",
                             "suite": "real", "method": "ideal", "seed": 0,
                             "inputs": {"config": ..., "data": ..., "code": {...}},
                             "run": {compare.json's run entry: the returned round, seconds,
                                     trainings, ...},
                             "commit": ..., "machine": {...}, "date": ...}

A cell is (suite or preset, method, its settings, seed). Its key is the hash of everything that
decides its numbers: the method's config without paths, the content of the data and the base
model, and the code fingerprint (ideal.run.fingerprint: what a tiny fixed run and the methods'
rules compute, not a commit hash, so that moving a file keeps every cell). `ideal compare
--ledger FILE` skips the cells FILE holds for the same key and appends the others.

Appends take an exclusive lock on the file (several processes of a campaign share it) and write
one whole line; a line cut by a crash is skipped with a warning when the ledger is read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import subprocess
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ideal.errors import IdealError
from ideal.run.config import IDEAL_STEP_ONLY, takes_ideal_step

log = logging.getLogger(__name__)

LEDGER_FORMAT = "ideal-ledger/1"
# the code fingerprint's components every cell depends on (ideal.run.fingerprint)
BASE_COMPONENTS = ("suite", "train", "eval", "loop", "scorers")
INFLUENCE_METHODS = ("ideal", "first-order")  # and every method named ideal-...
# config keys that name where things are, not what they are: their content is hashed instead
PATH_KEYS = ("model", "train_data", "reference_data", "test_data")


@dataclass(frozen=True)
class Cell:
    """One measured (suite, method, settings, seed): its inputs and the run entry compare.json
    keeps for it (the returned round's scores, seconds by stage, trainings, shares)."""

    key: str
    campaign: str
    suite: str
    method: str
    seed: int
    inputs: dict[str, Any]
    run: dict[str, Any]
    commit: str = ""
    machine: dict[str, Any] = field(default_factory=dict)
    date: str = ""
    reused_from: str = ""  # a cell measured for another campaign with the same key: its campaign
    format: str = LEDGER_FORMAT

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Cell:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def read_ledger(path: str | Path) -> list[Cell]:
    """Every cell of the ledger, in the order written (a missing file is an empty ledger). A
    line cut short by a crash (invalid JSON that starts as a ledger line: `{"`) is skipped with a
    warning, wherever it is, so one crash cannot stop every later campaign; any other bad line
    is an error naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    cells: list[Cell] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            if line.startswith('{"'):  # a cell cut by a crash while it was appended
                log.warning("%s:%d: an unfinished line, skipped (%s)", path, number, err.msg)
                continue
            raise IdealError(f"{path}:{number}: invalid JSON ({err.msg})") from None
        if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
            raise IdealError(f"{path}:{number}: not a ledger line (format {LEDGER_FORMAT})")
        try:
            cells.append(Cell.from_json(data))
        except TypeError as err:
            raise IdealError(f"{path}:{number}: {err}") from None
    return cells


def append_cell(path: str | Path, cell: Cell) -> None:
    """One line at the end of the ledger, under an exclusive lock, flushed to disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(cell.to_json(), sort_keys=True) + "\n"
    with open(path, "a+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.seek(0, os.SEEK_END)
            if handle.tell() > 0:  # a line cut by a crash must not swallow this one
                handle.seek(handle.tell() - 1)
                if handle.read(1) != "\n":
                    line = "\n" + line
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def components(method: str) -> tuple[str, ...]:
    """The code fingerprint's components a method's cells depend on: every method is trained,
    scored and run by the loop; the IDEAL family also reads influence; each method has its own
    rule."""
    uses_influence = method.startswith(INFLUENCE_METHODS)
    return (*BASE_COMPONENTS, *(("influence",) if uses_influence else ()), f"rule:{method}")


@dataclass
class Book:
    """A ledger in use by a comparison: where it is, the campaign's name, the inputs every cell
    shares (the data's hash and the code fingerprint), and what measured them."""

    path: Path
    campaign: str
    suite: str
    data: str
    code: dict[str, str]
    commit: str = ""
    machine: dict[str, Any] = field(default_factory=dict)

    def key(self, method: str, seed: int, settings: dict[str, Any]) -> str:
        return cell_key(method, seed, settings, self.inputs(method))

    def inputs(self, method: str) -> dict[str, Any]:
        return {"data": self.data, "code": {c: self.code.get(c) for c in components(method)}}

    def lookup(self, key: str) -> Cell | None:
        """The cell with this key; one measured for another campaign is recorded again under this
        one (`reused_from`), so that each campaign's tables hold every cell it needs."""
        found = find(read_ledger(self.path), key)
        if found is None or found.campaign == self.campaign:
            return found
        mine = find((c for c in read_ledger(self.path) if c.campaign == self.campaign), key)
        if mine is not None:
            return mine
        copy = replace(found, campaign=self.campaign, reused_from=found.campaign)
        append_cell(self.path, copy)
        return copy

    def record(self, key: str, method: str, seed: int, run: dict[str, Any]) -> Cell:
        cell = Cell(
            key=key, campaign=self.campaign, suite=self.suite, method=method, seed=seed,
            inputs=self.inputs(method), run=run, commit=commit_of(Path(__file__).parent),
            machine=self.machine, date=now(),
        )  # fmt: skip
        append_cell(self.path, cell)
        return cell


def find(cells: Iterable[Cell], key: str) -> Cell | None:
    """The latest cell with this key."""
    found = None
    for cell in cells:
        if cell.key == key:
            found = cell
    return found


def cell_key(method: str, seed: int, settings: dict[str, Any], inputs: dict[str, Any]) -> str:
    """sha256 of a cell's inputs: the method, the seed, its settings (config without paths) and
    the hashes of data, model and code."""
    blob = json.dumps(
        {"method": method, "seed": seed, "settings": settings, "inputs": inputs}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


# settings added after cells were measured, at the value that does what the code did before them:
# left out of a cell's key there, so that adding a setting keeps every cell; and left out where
# the run takes no IDEAL step to read them (the original and uniform mixtures, random search;
# config.IDEAL_STEP_ONLY), so that a default's change re-measures the cells it can change and no
# others
ADDED_SETTINGS = {"update.rescore": False}


def settings_without_paths(tree: dict[str, Any]) -> dict[str, Any]:
    """A config's dictionary with the keys that name places (data and model directories, the
    search model) taken out: the content under them is hashed into the inputs instead; and the
    settings added since the ledger began where they keep the behaviour from before them or
    where the run takes no IDEAL step to read them (ADDED_SETTINGS, config.IDEAL_STEP_ONLY)."""
    out = {k: v for k, v in tree.items() if k not in PATH_KEYS}
    if isinstance(out.get("search"), dict):
        out["search"] = {k: v for k, v in out["search"].items() if k != "model"}
    steps = takes_ideal_step(out)
    for dotted, before in ADDED_SETTINGS.items():
        section, name = dotted.split(".")
        idle = dotted in IDEAL_STEP_ONLY and not steps
        if isinstance(out.get(section), dict) and (
            idle or out[section].get(name, before) == before
        ):
            out[section] = {k: v for k, v in out[section].items() if k != name}
    return out


def tree_hash(paths: Iterable[str | Path | None]) -> str:
    """sha256 over the files under each path (names relative to it, and contents), in order;
    None for an absent path. Hidden files and directories are left out."""
    digest = hashlib.sha256()
    for root in paths:
        if root is None:
            digest.update(b"<none>")
            continue
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            relative = path.relative_to(root) if path != root else Path(path.name)
            if any(part.startswith(".") for part in relative.parts):
                continue
            digest.update(str(relative).encode() + b"\0")
            with open(path, "rb") as handle:
                while chunk := handle.read(1 << 24):
                    digest.update(chunk)
    return digest.hexdigest()[:32]


def source_hash() -> str:
    """sha256 of the `ideal` package's own files (sources, configs, shipped data), whatever
    the commit: a campaign's workers check that they run the code its fingerprint measured."""
    root = Path(__file__).resolve().parent.parent  # the package: ideal/run/ledger.py's grandparent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if not path.is_file() or "__pycache__" in relative.parts or path.suffix == ".pyc":
            continue
        digest.update(str(relative).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:32]


def commit_of(where: Path) -> str:
    """The git commit of the checkout ideal runs from, with "+dirty" when it has changes; or
    "ideal <version>" outside a checkout."""
    from ideal.version import __version__

    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return f"ideal {__version__}"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where, capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return f"ideal {__version__}"


def machine() -> dict[str, Any]:
    """What measured the cell: host, processor, cores, torch threads, accelerator, versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
