"""Parity: what the external trainer really trains on, against what `ideal` measures, row by row.

    ideal check --config run.yaml        # train.backend: llamafactory | axolotl | trl-cli | trl

A mixture's export is loaded through the tool's own data pipeline, by the tool's own Python (the
interpreter of the command's executable: its virtual environment), with a probe script
(backends/probes/) that writes each row's input ids and labels as the tool builds them. Each row
is compared with ideal's tokenisation of the same row (the base model's tokenizer, its chat
template, `max_length`), per domain:

    volumes        rows the tool keeps, against the rows the mixture counts: a difference is an
                   error (the mixture trained would not be the one measured), with the cause of
                   each dropped row where ideal knows it
    input ids      rows whose ids differ, with the difference named (a system prompt written into
                   every row, the end cut): a warning
    trained tokens rows whose loss mask differs (the newline after the end-of-turn token that
                   LLaMA-Factory trains on), and the target tokens of each domain in ideal's
                   tokenisation and in the tool's: a warning, with the shift of each domain's share
                   of the mixture's target tokens (what `influence.loss: token` weighs domains by)

`trl` trains in this process on the rows ideal tokenized: its probe is TRL's own collator over
them, in this process. Every other backend has no data pipeline of its own to compare.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ideal.data.rows import IGNORE_INDEX, Tokenized
from ideal.errors import IdealError

log = logging.getLogger(__name__)

PROBES = {"llamafactory": "lf_rows.py", "axolotl": "axolotl_rows.py", "trl-cli": "trl_rows.py"}
BACKENDS = ("llamafactory", "axolotl", "trl-cli", "trl")
TOOL_NAMES = {"llamafactory": "LLaMA-Factory", "axolotl": "axolotl", "trl-cli": "TRL", "trl": "TRL"}
#: each preset's own executable: its Python runs the probe when the command is a wrapper
TOOL_EXECUTABLES = {"llamafactory": "llamafactory-cli", "axolotl": "axolotl", "trl-cli": "trl"}


@dataclass
class DomainParity:
    """One domain: the mixture's rows against the tool's."""

    domain: str
    rows: int  # the mixture's volume: rows in the export
    kept: int  # rows the tool trains on
    dropped: dict[str, int] = field(default_factory=dict)  # cause -> rows
    targets_ours: int = 0  # target tokens of every row, in ideal's tokenisation
    targets_theirs: int = 0  # target tokens of the rows the tool keeps, in its own
    ids_differ: int = 0  # kept rows whose input ids differ
    masks_differ: int = 0  # kept rows with the same ids whose trained tokens differ
    id_causes: Counter = field(default_factory=Counter)  # named difference -> rows
    mask_causes: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "kept": self.kept,
            "dropped": dict(self.dropped),
            "target_tokens": {"ideal": self.targets_ours, "trainer": self.targets_theirs},
            "ids_differ": self.ids_differ,
            "masks_differ": self.masks_differ,
            "id_causes": dict(self.id_causes),
            "mask_causes": dict(self.mask_causes),
        }


@dataclass
class Parity:
    """The whole comparison: per domain, and the lines to print (errors first)."""

    backend: str
    tool: str  # "LLaMA-Factory 0.9.5"
    domains: list[DomainParity]
    trained: int | None  # rows of the tool's whole training set (None: not reported)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    python: str = ""  # the interpreter that ran the probe
    seconds: float | None = (
        None  # the whole check: ideal's rows, the tool's pipeline, the comparison
    )

    @property
    def target_tokens(self) -> dict[str, dict[str, int]]:
        """{"ideal": {domain: t_i}, "trainer": {domain: t_i}}: what influence.json records."""
        return {
            "ideal": {d.domain: d.targets_ours for d in self.domains},
            "trainer": {d.domain: d.targets_theirs for d in self.domains},
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "tool": self.tool,
            "python": self.python,
            "seconds": self.seconds,
            "trained": self.trained,
            "domains": {d.domain: d.to_dict() for d in self.domains},
            "errors": self.errors,
            "warnings": self.warnings,
        }


# ----------------------------------------------------------------------------- comparing rows


def _targets(labels: Sequence[int]) -> int:
    """Trained tokens of a row: labelled positions after the first (Tokenized.num_targets)."""
    return sum(label != IGNORE_INDEX for label in labels[1:])


def _text(tokenizer: Any, ids: Sequence[int], limit: int = 60) -> str:
    text = tokenizer.decode(list(ids)) if tokenizer is not None else str(list(ids))
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def id_difference(ours: Sequence[int], theirs: Sequence[int], tokenizer: Any) -> str:
    """How the tool's ids of a row differ from ideal's, in a few words: each differing block
    (difflib's, at most two named) is text the tool inserts, leaves out, splits into other
    tokens, or renders otherwise."""
    import difflib

    blocks = [
        op
        for op in difflib.SequenceMatcher(
            None, list(ours), list(theirs), autojunk=False
        ).get_opcodes()
        if op[0] != "equal"
    ]
    named = []
    for tag, i1, i2, j1, j2 in blocks[:2]:
        mine, its = ours[i1:i2], theirs[j1:j2]
        where = "at the start" if i1 <= 1 else ("at the end" if i2 == len(ours) else "")
        if tag == "insert":
            named.append(f"inserts {_text(tokenizer, its)} {where}".rstrip())
        elif tag == "delete" and i2 == len(ours):
            named.append(f"cuts the row's last {len(mine)} tokens")
        elif tag == "delete" and i1 == 0:
            named.append(f"cuts the row's first {len(mine)} tokens")
        elif tag == "delete":
            named.append(f"leaves out {_text(tokenizer, mine)}")
        elif tokenizer is not None and tokenizer.decode(list(mine)) == tokenizer.decode(list(its)):
            named.append(f"splits {_text(tokenizer, mine)} into other tokens")
        else:
            named.append(
                f"renders {_text(tokenizer, mine)} as {_text(tokenizer, its)} {where}".rstrip()
            )
    more = f" (and {len(blocks) - 2} more)" if len(blocks) > 2 else ""
    return "the trainer " + "; ".join(named) + more


def mask_difference(
    ids: Sequence[int], ours: Sequence[int], theirs: Sequence[int], tokenizer: Any, eos: int | None
) -> list[str]:
    """The named differences of two loss masks over the same ids (labels unshifted)."""
    causes = []
    for k in range(1, len(ids)):
        a, b = ours[k] != IGNORE_INDEX, theirs[k] != IGNORE_INDEX
        if a == b:
            continue
        token = _text(tokenizer, [ids[k]], 20)
        if b and ids[k - 1] == eos and ours[k - 1] != IGNORE_INDEX:
            causes.append(f"the trainer also trains on {token} after the end-of-turn token")
        elif b:
            causes.append(f"the trainer also trains on {token}, a prompt token in ideal's rows")
        elif ids[k] == eos:
            causes.append("the trainer does not train on the end-of-turn token")
        else:
            causes.append(f"the trainer does not train on {token}")
    return sorted(set(causes))


def compare_domain(
    domain: str,
    ours: Sequence[Tokenized | None],
    kept: Sequence[dict[str, Any]],
    dropped: dict[str, int],
    tokenizer: Any,
) -> DomainParity:
    """One domain: `ours` per row of the export (None: a row ideal could not tokenize), `kept`
    the tool's rows ({"index", "input_ids", "labels"}), `dropped` the causes of the others."""
    eos = getattr(tokenizer, "eos_token_id", None)
    result = DomainParity(domain, len(ours), len(kept), dict(dropped))
    result.targets_ours = sum(item.num_targets for item in ours if item is not None)
    for row in kept:
        theirs_ids, theirs_labels = row["input_ids"], row["labels"]
        result.targets_theirs += _targets(theirs_labels)
        index = row["index"]
        mine = ours[index] if 0 <= index < len(ours) else None
        if mine is None:
            continue
        if list(mine.input_ids) != list(theirs_ids):
            result.ids_differ += 1
            result.id_causes[id_difference(mine.input_ids, theirs_ids, tokenizer)] += 1
            continue
        causes = mask_difference(mine.input_ids, mine.labels, theirs_labels, tokenizer, eos)
        if causes:
            result.masks_differ += 1
            for cause in causes:
                result.mask_causes[cause] += 1
    return result


def _share(values: dict[str, int], name: str) -> float:
    total = sum(values.values())
    return values[name] / total if total else 0.0


def summarise(parity: Parity) -> None:
    """Fill `parity.errors` and `parity.warnings` from its domains (one line each)."""
    tool = parity.tool
    changed = [d for d in parity.domains if d.kept != d.rows]
    if changed:
        what = "; ".join(
            f"{d.domain} {d.rows} -> {d.kept}"
            + (f" ({', '.join(f'{n} {c}' for c, n in d.dropped.items())})" if d.dropped else "")
            for d in changed
        )
        parity.errors.append(
            f"{tool} would not train the mixture's volumes: {what}. Fix the rows (or the setting "
            "named) so that every row is kept"
        )
    expected = sum(d.kept for d in parity.domains)
    if parity.trained is not None and parity.trained != expected and not changed:
        parity.errors.append(
            f"{tool} builds a training set of {parity.trained} rows from the whole config, not "
            f"the {expected} of the mixture (a held-out split or a sample cap in its config?)"
        )
    for d in parity.domains:
        if d.ids_differ:
            cause, n = d.id_causes.most_common(1)[0]
            others = f"; {len(d.id_causes) - 1} other differences" if len(d.id_causes) > 1 else ""
            parity.warnings.append(
                f"{d.domain}: {d.ids_differ} of {d.kept} rows have other input ids in {tool} than "
                f"in ideal's influence step: {cause} ({n} rows{others})"
            )
    for d in parity.domains:
        if d.masks_differ:
            cause, n = d.mask_causes.most_common(1)[0]
            parity.warnings.append(
                f"{d.domain}: {d.masks_differ} of {d.kept} rows are trained on other tokens in "
                f"{tool} than ideal's influence step counts: {cause} ({n} rows)"
            )
    shift = target_shift(parity.target_tokens)
    if shift:
        parity.warnings.append(
            f"target tokens per domain, ideal -> {tool}: {shift}; influence.loss token weighs "
            "domains by ideal's counts (influence.json records both)"
        )


def target_shift(target_tokens: dict[str, dict[str, int]]) -> str:
    """The domains whose target tokens differ between ideal's rows and the trainer's, with their
    change and their share of the mixture's target tokens; "" when none differ."""
    ours, theirs = target_tokens["ideal"], target_tokens["trainer"]
    parts = []
    for name in ours:
        if name not in theirs or ours[name] == theirs[name]:
            continue
        change = f"{(theirs[name] - ours[name]) / ours[name]:+.0%}, " if ours[name] else ""
        parts.append(
            f"{name} {ours[name]} -> {theirs[name]} ({change}share {_share(ours, name):.3f} -> "
            f"{_share(theirs, name):.3f})"
        )
    return ", ".join(parts)


# ----------------------------------------------------------------------------- running a probe


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


# ----------------------------------------------------------------------------- the whole check


def drop_causes(
    backend: str,
    base: dict[str, Any],
    examples: Sequence[Any],
    ours: Sequence[Tokenized | None],
    indices: Sequence[int],
) -> dict[str, int]:
    """Why the tool dropped the rows at `indices` (a cause ideal knows, else "dropped by it")."""
    from ideal.data.export import llamafactory_problem

    from .trainer_rows import tool_length_limit

    limit = tool_length_limit(backend, base)
    first: dict[tuple, int] = {}
    for k, example in enumerate(examples):
        first.setdefault(tuple((m["role"], m["content"]) for m in example.messages), k)
    causes: Counter = Counter()
    for index in indices:
        example = examples[index] if 0 <= index < len(examples) else None
        item = ours[index] if 0 <= index < len(ours) else None
        cause = "dropped by it"
        if example is not None and backend == "llamafactory":
            cause = llamafactory_problem(example.messages) or cause
        elif example is not None and backend == "axolotl":
            key = tuple((m["role"], m["content"]) for m in example.messages)
            if base.get("dataset_exact_deduplication") and first[key] != index:
                cause = "repeats removed by dataset_exact_deduplication"
            elif item is not None and limit is not None and len(item.input_ids) > limit:
                cause = f"longer than sequence_len {limit}"
        causes[cause] += 1
    return dict(causes)


def compare_probe(
    backend: str,
    document: dict[str, Any],
    exported: dict[str, tuple[list[Any], list[Tokenized | None]]],
    base: dict[str, Any],
    tokenizer: Any,
) -> Parity:
    """The probe's JSON against ideal's rows: `exported` maps each domain to (its Examples in the
    export's order, ideal's tokenisation of each, None where it failed). Pure: tested with
    fabricated probe output."""
    by_file = {Path(d["file"]).name: d for d in document.get("datasets", [])}
    domains = []
    for domain, (examples, ours) in exported.items():
        entry = by_file.get(f"{domain}.jsonl")
        if entry is None:
            raise IdealError(f"parity: the trainer's config does not read {domain}.jsonl")
        indices = [d["index"] if isinstance(d, dict) else int(d) for d in entry.get("dropped", [])]
        dropped = drop_causes(backend, base, examples, ours, indices) if indices else {}
        domains.append(compare_domain(domain, ours, entry["kept"], dropped, tokenizer))
    tool = f"{TOOL_NAMES[backend]} {document.get('version', '?')}"
    parity = Parity(backend, tool, domains, document.get("trained"))
    summarise(parity)
    return parity


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


def config_parity(config: Any, config_file: str | Path | None) -> tuple[Parity | None, str]:
    """`ideal check --config`: round 0's mixture (train_data, every row once) through the run's
    trainer, as its first round would export and render it. (parity, "") or (None, why not)."""
    from ideal.data.export import export_mixture
    from ideal.data.mixture_io import load_training_set, write_mixture_dir
    from ideal.hf import load_tokenizer, resolve_model_dir

    from .protocol import TrainJob

    backend = config.train.backend
    if backend not in BACKENDS:
        return None, f"train.backend {backend} has no data pipeline of its own"
    if config.suite is not None or config.train_data is None or config.model is None:
        return None, "the embedded suite is generated when the run starts"
    base_model = resolve_model_dir(config.model)
    training = load_training_set(config.train_data)
    with tempfile.TemporaryDirectory(prefix="ideal-parity-") as scratch:
        round_dir = Path(scratch) / "round-0"
        write_mixture_dir(round_dir, training, training.mixture, data_subdir="data")
        if backend == "trl":
            export_mixture(round_dir / "mixture.json", "trl", round_dir / "export", absolute=True)
            tokenizer = load_tokenizer(base_model)
            domains = training.mixture.domains
            exported = tokenize_export(round_dir / "export", domains, tokenizer, config.max_length)
            parity = compare_probe(
                "trl", trl_document(exported, tokenizer), exported, {}, tokenizer
            )
            parity.python = sys.executable
            return parity, ""
        from .external import ToolNotFound
        from .factory import make_trainer
        from .presets import load_base_config

        trainer = make_trainer(config.train)
        job = TrainJob(
            base_model, round_dir, round_dir / "model", 0, Path(scratch),
            Path(config_file or Path(scratch) / "config.yaml"),
        )  # fmt: skip
        try:
            prepared = trainer.prepare(job)
        except ToolNotFound as err:  # `ideal run` will stop there: said, the rest is checked
            return None, str(err)
        python, why = probe_python(prepared.argv, prepared.env, TOOL_EXECUTABLES[backend])
        if python is not None:
            why = tool_importable(backend, python) or ""
        if why:
            return None, why
        assert python is not None
        base = load_base_config(config.train.base_config, backend)
        parity = parity_of(
            backend, base, prepared.data_dir, prepared.config_file, base_model,
            config.max_length, python, prepared.env,
        )  # fmt: skip
        return parity, ""
