"""Running the parity check (parity.py compares): find the tool's own Python, run its probe over a
round's export, and check a preset's round before it trains (a run config before it starts:
ideal.run.preflight.config_parity).

    tool's executable   argv[0] of the preset's command on its PATH (a wrapper such as `sh -c`:
                        the preset's own executable on that PATH), and the Python of its `#!`
                        line: the tool's virtual environment
    probe               backends/tools/probes/<tool>_rows.py, run by that Python over the rendered config
                        (nothing of the run written: scratch output, datasets cache, offline)
    checks              `preset_parity`: each round of `ideal run` (`train.parity`)

`trl` needs no probe: it trains in this process on ideal's rows, and TRL's own collator over them
is compared (`trl_document`).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ideal.backends.tools.parity import (
    PROBES,
    TOOL_EXECUTABLES,
    TOOL_NAMES,
    Parity,
    compare_probe,
)
from ideal.data.rows import Tokenized
from ideal.errors import IdealError

log = logging.getLogger(__name__)


def tool_python(executable: Path) -> Path | None:
    """The Python interpreter of a tool's executable: the interpreter itself, or the one its
    `#!` line names (pip's console scripts), else a `python` beside the script; None for a
    binary."""
    name = executable.name
    if name.startswith("python"):
        return executable
    try:
        with open(executable, "rb") as handle:
            first = handle.readline(512).decode("utf-8", "replace").strip()
    except OSError:
        first = ""
    if not first.startswith("#!"):
        return None  # a binary (`sh`, `docker`): no Python of its own
    parts = first[2:].split()
    if parts and Path(parts[0]).name.startswith("python") and Path(parts[0]).is_file():
        return Path(parts[0])
    if len(parts) > 1 and Path(parts[0]).name == "env" and parts[1].startswith("python"):
        found = _which(parts[1], str(executable.parent))
        if found is not None:
            return found
    beside = executable.parent / "python"  # a script of a venv with a #! line of its own
    return beside if beside.is_file() else None


def _which(name: str, path: str) -> Path | None:
    import shutil

    found = shutil.which(name, path=path)
    return Path(found) if found else None


def run_probe(
    backend: str,
    config_file: Path,
    python: Path,
    env: dict[str, str] | None = None,
    timeout: float = 900.0,
) -> dict[str, Any]:
    """Run `backend`'s probe with the tool's `python` over its rendered `config_file`; its JSON."""
    probe = Path(__file__).parent / "probes" / PROBES[backend]
    child = dict(os.environ if env is None else env)
    child.setdefault("HF_HUB_OFFLINE", "1")
    child.setdefault("TRANSFORMERS_OFFLINE", "1")
    child.setdefault("HF_DATASETS_OFFLINE", "1")
    child.setdefault("LLAMAFACTORY_VERBOSITY", "ERROR")
    child.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="ideal-parity-") as scratch:
        child.setdefault("HF_DATASETS_CACHE", str(Path(scratch) / "datasets"))
        out = Path(scratch) / "rows.json"
        argv = [str(python), str(probe), str(config_file), str(out)]
        try:
            done = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                env=child,
                timeout=timeout,
                cwd=scratch,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise IdealError(
                f"parity: {TOOL_NAMES[backend]}'s data pipeline took over {timeout:.0f} s"
            ) from None
        except OSError as err:
            raise IdealError(f"parity: cannot run {python}: {err.strerror or err}") from None
        if done.returncode != 0 or not out.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-8:]
            raise IdealError(
                f"parity: {TOOL_NAMES[backend]}'s data pipeline failed (exit code "
                f"{done.returncode}) over {config_file}:\n" + "\n".join(f"    {t}" for t in tail)
            )
        return json.loads(out.read_text(encoding="utf-8"))


def tool_importable(backend: str, python: Path) -> str | None:
    """None when `python` imports the tool's package, else why not (one line)."""
    module = {"llamafactory": "llamafactory", "axolotl": "axolotl", "trl-cli": "trl"}[backend]
    try:
        done = subprocess.run(
            [
                str(python),
                "-c",
                f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)",
            ],
            capture_output=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"{python} does not run ({err})"
    if done.returncode != 0:
        return f"{module} is not installed for {python}"
    return None


def tokenize_export(
    export_dir: Path, domains: Sequence[str], tokenizer: Any, max_length: int | None
) -> dict[str, tuple[list[Any], list[Tokenized | None]]]:
    """ideal's rows of an export directory (<domain>.jsonl, `messages` rows), tokenized as the
    influence step tokenizes them."""
    from ideal.data.rows import read_jsonl, tokenize_example

    out = {}
    for domain in domains:
        examples, _, _ = read_jsonl(export_dir / f"{domain}.jsonl")
        items: list[Tokenized | None] = []
        for example in examples:
            try:
                items.append(tokenize_example(example, tokenizer, max_length))
            except ValueError:
                items.append(None)
        out[domain] = (examples, items)
    return out


def trl_document(
    exported: dict[str, tuple[list[Any], list[Tokenized | None]]], tokenizer: Any
) -> dict[str, Any]:
    """`train.backend: trl`: TRL's collator over the rows ideal hands it (in this process)."""
    import trl
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id or 0)
    datasets = []
    for domain, (_, items) in exported.items():
        kept = []
        for index, item in enumerate(items):
            if item is None:
                continue
            batch = collator([{"input_ids": item.input_ids, "labels": item.labels}])
            kept.append(
                {
                    "index": index,
                    "input_ids": batch["input_ids"][0].tolist(),
                    "labels": batch["labels"][0].tolist(),
                }
            )
        datasets.append(
            {"file": f"{domain}.jsonl", "rows": len(items), "kept": kept, "dropped": []}
        )
    return {"tool": "trl", "version": trl.__version__, "datasets": datasets, "trained": None}


def probe_python(
    command: Sequence[str], env: dict[str, str], tool: str | None = None
) -> tuple[Path | None, str]:
    """The Python of a filled command's executable (argv[0] on `env`'s PATH), or why none. A
    command that is no Python program (`sh -c "axolotl train ..."`) falls back on `tool`, the
    preset's own executable, found on the same PATH."""
    path = env.get("PATH", os.defpath)
    why = ""
    for first in (command[0], tool):
        if first is None:
            continue
        found = _which(first, path) if os.sep not in first else Path(first)
        if found is None or not found.exists():
            why = why or f"{first!r} is not on the command's PATH"
            continue
        python = tool_python(found)
        if python is not None:
            return python, ""
        why = why or f"{found} is not a Python program (no interpreter found for it)"
    return None, why


def parity_of(
    backend: str,
    base: dict[str, Any],
    data_dir: Path,
    config_file: Path,
    base_model: Path,
    max_length: int | None,
    python: Path,
    env: dict[str, str],
) -> Parity:
    """Run `backend`'s probe over an export (`data_dir`, its rendered `config_file`) and compare
    its rows with ideal's."""
    import time

    from ideal.hf import load_tokenizer

    start = time.perf_counter()
    tokenizer = load_tokenizer(base_model)
    domains = sorted(path.stem for path in data_dir.glob("*.jsonl"))
    exported = tokenize_export(data_dir, domains, tokenizer, max_length)
    document = run_probe(backend, config_file, python, env)
    parity = compare_probe(backend, document, exported, base, tokenizer)
    parity.python = str(python)
    parity.seconds = time.perf_counter() - start
    return parity


def preset_parity(
    backend: str,
    base: dict[str, Any],
    job: Any,
    prepared: Any,
    max_length: int | None,
    mode: str,
) -> dict[str, Any]:
    """Each round of a preset, before the tool trains (`train.parity`): the record for
    train.json; raises when the volumes differ, or (mode "on") when the tool cannot be probed."""
    python, why = probe_python(prepared.argv, prepared.env, TOOL_EXECUTABLES[backend])
    if python is not None:
        why = tool_importable(backend, python) or ""
    if why:
        if mode == "on":
            raise IdealError(f"train.parity on: the trainer's rows cannot be checked: {why}")
        log.warning("round %d: no parity check: %s", job.round, why)
        return {"skipped": why}
    assert python is not None
    try:
        parity = parity_of(
            backend, base, prepared.data_dir, prepared.config_file, job.base_model, max_length,
            python, prepared.env,
        )  # fmt: skip
    except IdealError as err:  # the probe itself failed: the tool may still train
        if mode == "on":
            raise
        why = str(err).splitlines()[0]
        log.warning("round %d: no parity check: %s", job.round, why)
        return {"skipped": why}
    for warning in parity.warnings:
        log.warning("round %d: %s", job.round, warning)
    if parity.errors:
        raise IdealError(f"round {job.round}: {parity.errors[0]}")
    return parity.to_dict()
