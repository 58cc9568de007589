"""`ideal check --config`'s parity table: per domain, the mixture's rows against the rows the
trainer's own data pipeline keeps, and the target tokens of each (backends/tools/parity.py's record)."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def parity_table(document: dict[str, Any]) -> Table:
    """One row per domain of a parity record (`Parity.to_dict()`), and a total."""
    table = Table(title=f"parity with {document['tool']} (its data pipeline, {document['python']})")
    for column in ("domain", "rows", "kept", "dropped", "ids differ", "masks differ"):
        table.add_column(column, justify="left" if column == "domain" else "right")
    for column in ("target tokens ideal", "trainer", "change"):
        table.add_column(column, justify="right")
    totals = [0, 0, 0, 0, 0, 0, 0]
    for name, d in document["domains"].items():
        ours, theirs = d["target_tokens"]["ideal"], d["target_tokens"]["trainer"]
        values = [d["rows"], d["kept"], d["rows"] - d["kept"], d["ids_differ"], d["masks_differ"],
                  ours, theirs]  # fmt: skip
        totals = [t + v for t, v in zip(totals, values, strict=True)]
        table.add_row(name, *map(str, values), _change(ours, theirs))
    table.add_row("all", *map(str, totals), _change(totals[5], totals[6]), style="bold")
    return table


def _change(ours: int, theirs: int) -> str:
    return f"{(theirs - ours) / ours:+.1%}" if ours else "-"
