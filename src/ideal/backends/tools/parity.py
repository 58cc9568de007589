"""Parity: what the external trainer really trains on, against what `ideal` measures, row by row.

    ideal check --config run.yaml        # train.backend: llamafactory | axolotl | trl-cli | trl

A mixture's export is loaded through the tool's own data pipeline, by the tool's own Python (the
interpreter of the command's executable: its virtual environment), with a probe script
(backends/tools/probes/) that writes each row's input ids and labels as the tool builds them. Each row
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

This module compares (pure: tested on fabricated tool output); parity_run.py finds the tool's
Python, runs the probe and checks a round or a run config.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ideal.data.rows import IGNORE_INDEX, Tokenized
from ideal.errors import IdealError

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


def drop_causes(
    backend: str,
    base: dict[str, Any],
    examples: Sequence[Any],
    ours: Sequence[Tokenized | None],
    indices: Sequence[int],
) -> dict[str, int]:
    """Why the tool dropped the rows at `indices` (a cause ideal knows, else "dropped by it")."""
    from ideal.backends.tools.trainer_rows import tool_length_limit
    from ideal.data.export import llamafactory_problem

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
