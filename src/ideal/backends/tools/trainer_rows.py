"""What an external trainer would do to the mixture's rows that `ideal` does not: found before it
trains, from the rows and the tool's base config alone (no tool installed).

ideal's influence step measures every exported row, rendered with the model's chat template and, with
`max_length`, cut keeping the prompt's end. With the settings users' configs carry, the tools would
instead:

    llamafactory  drop a conversation whose turns do not alternate user, assistant, user, ... after
                  one optional leading system turn ("Skipping this abnormal example"): consecutive
                  user or assistant turns, a system turn further down. `ideal export --format
                  llamafactory` and `ideal check --config` refuse such a row, naming its file and
                  line (`ideal.data.export.llamafactory_problem`). Mending it would mean joining two turns' texts with
                  a separator the user never wrote, or moving a system turn: the row trained would
                  not be the row ideal measures, so the fix is the user's, in the data.
                  Rows longer than `cutoff_len` (default 2048) are cut, source and target in
                  proportion: a warning.
    axolotl       with `dataset_exact_deduplication: true`, keep one copy of each row: the copies are
                  how ideal's mixtures give a domain more weight, so that is an error whenever the
                  mixture repeats a row. Rows longer than `sequence_len` (default 512) are dropped
                  (`excess_length_strategy: drop`, its default) or cut at the end: a warning.
    trl-cli       rows longer than `max_length` (SFTConfig's default 1024) are cut: a warning.

Where a template writes a default system prompt into rows without one is `masking.py`'s; what the
tool really does with a round's rows is `parity.py`'s (the tool's own data pipeline).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ideal.errors import IdealError

# The tool's key for its longest row, its default, and what it does to a longer one.
LENGTH_KEYS: dict[str, tuple[str, int | None]] = {
    "llamafactory": ("cutoff_len", 2048),
    "axolotl": ("sequence_len", 512),
    "trl-cli": ("max_length", 1024),
}


def repeated_rows(examples: Iterable[Any]) -> tuple[int, str | None]:
    """(rows that repeat an earlier identical row, the source of the first such row)."""
    seen: set[tuple[tuple[str, str], ...]] = set()
    repeats, first = 0, None
    for example in examples:
        key = tuple((m["role"], m["content"]) for m in example.messages)
        if key in seen:
            repeats += 1
            first = first or example.source
        seen.add(key)
    return repeats, first


def check_deduplication(
    base: dict[str, Any], where: str, examples: Iterable[Any], what: str
) -> None:
    """axolotl's `dataset_exact_deduplication: true` over rows that repeat: an error naming why."""
    if not base.get("dataset_exact_deduplication"):
        return
    repeats, first = repeated_rows(examples)
    if repeats:
        raise IdealError(
            f"{where}: `dataset_exact_deduplication: true` would remove {repeats} repeated rows "
            f"of {what} (first: {first}), and the repeats are how ideal's mixtures weigh a domain: "
            "remove the key (deduplicate your data before ideal reads it instead)"
        )


def check_deduplication_setting(base: dict[str, Any], where: str, max_repeats: int) -> None:
    """Before a run: ideal's rounds repeat rows whenever update.max_repeats allows it."""
    if base.get("dataset_exact_deduplication") and max_repeats > 1:
        raise IdealError(
            f"{where}: `dataset_exact_deduplication: true` would remove the rows that ideal's "
            f"mixtures repeat to weigh a domain (update.max_repeats is {max_repeats}): remove the "
            "key (deduplicate your data before ideal reads it instead)"
        )


@dataclass(frozen=True)
class LongRows:
    """Rows longer than a tool's limit, per domain, and the longest one."""

    limit: int
    counts: dict[str, int]
    longest: int
    source: str


def long_rows(domains: dict[str, Sequence[Any]], tokenizer: Any, limit: int) -> LongRows | None:
    """The rows (Examples, per domain) whose rendering is longer than `limit` tokens, or None.

    The rendering is the model's chat template over the whole conversation (ideal's plain template
    without one): the ids ideal trains on, to a token or two where a tokenizer merges across a turn
    boundary. A row whose UTF-8 text has at most `limit - 2` bytes cannot exceed `limit` tokens
    (a token covers a byte at least, beside a template's added prefix), so only longer texts are
    tokenized."""
    from ideal.data.tokens import _encode, _render

    counts: dict[str, int] = {}
    longest, source = 0, ""
    for domain, examples in domains.items():
        for example in examples:
            text = _render(tokenizer, example.messages, False)
            if len(text.encode("utf-8")) + 2 <= limit:
                continue
            n = len(_encode(tokenizer, text))
            if n > limit:
                counts[domain] = counts.get(domain, 0) + 1
                if n > longest:
                    longest, source = n, example.source
    if not counts:
        return None
    return LongRows(limit, counts, longest, source)


def length_warning(
    backend: str, base: dict[str, Any], where: str, found: LongRows, max_length: int | None
) -> str:
    """The one line about rows longer than the tool's limit (`found`, from `long_rows`)."""
    key, default = LENGTH_KEYS[backend]
    set_by = "" if key in base else f" (its default, absent from {where})"
    per_domain = ", ".join(f"{d} {n}" for d, n in sorted(found.counts.items()))
    total = sum(found.counts.values())
    ours = (
        f"ideal cuts them to max_length {max_length} keeping the prompt's end"
        if max_length is not None
        else "ideal measures them whole (max_length unset)"
    )
    if backend == "axolotl":
        strategy = str(base.get("excess_length_strategy") or "drop").lower()
        does = {
            "drop": "drops them from the mixture",
            "truncate": "cuts them at the end",
            "raise": "stops with an error",
        }.get(strategy, f"handles them by `excess_length_strategy: {strategy}`")
    elif backend == "llamafactory":
        does = "cuts prompt and answer in proportion"
    else:
        does = "cuts them at the end"
    return (
        f"{where}: `{key}: {found.limit}`{set_by}: {total} rows are longer ({per_domain}; "
        f"longest {found.longest} tokens, {found.source}); the trainer {does}, {ours}: raise "
        f"`{key}` to {found.longest} or more"
    )


def tool_length_limit(backend: str, base: dict[str, Any]) -> int | None:
    """The tool's row limit under `base` (its default when absent), None when it has none."""
    if backend not in LENGTH_KEYS:
        return None
    key, default = LENGTH_KEYS[backend]
    value = base.get(key, default)
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def check_trainer_rows(config: Any, base: dict[str, Any] | None, where: str) -> list[str]:
    """Before a run whose `train.backend` is a preset: the training pool's rows against what the
    tool would do to them (module docstring). Raises for a row LLaMA-Factory drops and for axolotl's
    deduplication; returns the warnings about rows longer than the tool's limit."""
    backend = config.train.backend
    if backend not in LENGTH_KEYS or config.suite is not None or config.train_data is None:
        return []
    from ideal.data.export import check_llamafactory_rows
    from ideal.data.mixture_io import load_training_set
    from ideal.hf import load_tokenizer

    base = base or {}
    pool = load_training_set(config.train_data).pool
    examples = {name: domain.examples for name, domain in pool.items()}
    if backend == "llamafactory":
        for rows in examples.values():
            check_llamafactory_rows(rows)
    if backend == "axolotl":
        check_deduplication_setting(base, where, config.update.max_repeats)
        check_deduplication(
            base, where, (e for rows in examples.values() for e in rows), "the pool"
        )
    limit = tool_length_limit(backend, base)
    if limit is None or config.model is None:
        return []
    found = long_rows(examples, load_tokenizer(config.model), limit)
    return [] if found is None else [length_warning(backend, base, where, found, config.max_length)]
