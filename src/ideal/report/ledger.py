"""docs/results.md's paired tables, rendered from a campaign of the results ledger (pure: the
document comes from ideal.run.campaign.ledger_document, compare.json's statistics)."""

from __future__ import annotations

import json
import re
from typing import Any

BASELINES = ("original", "uniform", "random")


def _stat(stat: dict[str, Any] | None, digits: int = 3) -> str:
    if not stat or stat.get("mean") is None:
        return ""
    return f"{stat['mean']:.{digits}f} +- {stat['std']:.{digits}f}"


def _diff(d: dict[str, Any]) -> str:
    if d["mean"] != d["mean"]:  # nan: no seed with both values
        return ""
    error = "" if d["stderr"] is None else f" +- {d['stderr']:.3f}"
    return f"{d['mean']:+.3f}{error} ({d['verdict']})"


def campaign_markdown(document: dict[str, Any]) -> str:
    """One campaign: the methods' returned rounds over seeds, per capability, and the paired
    differences against each baseline the campaign has."""
    methods = document["methods"]
    seeds = document["seeds"]
    stale = document.get("stale_cells") or 0
    left = f" ({stale} older cells of other inputs left out)" if stale else ""
    lines = [
        f"Campaign `{document['campaign']}` on `{document['suite']}`: {document['cells']} cells"
        f"{left}, seeds {', '.join(map(str, seeds))}. Rendered by `ideal ledger tables` from "
        "docs/ledger.jsonl; mean +- sd over seeds; paired differences are method - baseline "
        "per seed, +- their standard error, verdict at 2 standard errors (higher accuracy, "
        "lower held-out loss is better). Cost in SFTs: each cell's compute over its own "
        "full-recipe SFT, measured in the same run (D0's training; ideal-search's final "
        "training).",
        "",
        "| method | seeds | mean accuracy | worst accuracy | mean test loss | worst test loss "
        "| reference loss | trainings | compute s | cost in SFTs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in methods.items():
        cost = entry.get("cost_in_sfts")
        lines.append(
            f"| {name} | {len(entry['runs'])} | {_stat(entry['test_accuracy_mean'])} "
            f"| {_stat(entry['test_accuracy_worst'])} | {_stat(entry.get('test_loss_mean'))} "
            f"| {_stat(entry.get('test_loss_worst'))} | {_stat(entry['reference_loss_mean'])} "
            f"| {_stat(entry.get('trainings'), 1)} | {_stat(entry['seconds'], 0)} "
            f"| {_stat(cost, 2)} |"
        )
    capabilities = sorted({c for e in methods.values() for c in e.get("per_capability", {})}
                          | {c for e in methods.values() for c in e.get("per_capability_loss", {})})  # fmt: skip
    if capabilities:
        lines += [
            "",
            "Per capability, test accuracy / test loss (mean over seeds):",
            "",
            "| method | " + " | ".join(capabilities) + " |",
            "|---|" + "---|" * len(capabilities),
        ]
        for name, entry in methods.items():
            cells = []
            for c in capabilities:
                acc = (entry.get("per_capability", {}).get(c) or {}).get("mean")
                loss = (entry.get("per_capability_loss", {}).get(c) or {}).get("mean")
                cells.append(
                    f"{'' if acc is None else f'{acc:.3f}'} / {'' if loss is None else f'{loss:.3f}'}"
                )
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for baseline, paired in document.get("paired", {}).items():
        if not paired:
            continue
        lines += [
            "",
            f"Paired against `{baseline}`:",
            "",
            "| method | mean accuracy | worst accuracy | mean test loss | worst test loss "
            "| mean accuracy per seed |",
            "|---|---|---|---|---|---|",
        ]
        for name, entry in paired.items():
            per_seed = " ".join(f"{x:+.3f}" for x in entry["test_accuracy_mean"]["per_seed"])
            lines.append(
                f"| {name} | {_diff(entry['test_accuracy_mean'])} "
                f"| {_diff(entry['test_accuracy_worst'])} | {_diff(entry['test_loss_mean'])} "
                f"| {_diff(entry['test_loss_worst'])} | {per_seed} |"
            )
    machines = [json.loads(m) for m in document.get("machines", [])]
    if len(machines) > 1:
        lines += ["", "The cells come from more than one machine: seconds and cost in SFTs pair "
                  "cells measured apart."]  # fmt: skip
    if machines:
        where = "; ".join(
            f"{m.get('cpu')}, {m.get('cores')} cores, {m.get('threads')} thread(s), "
            f"{m.get('device')}, torch {m.get('torch')}"
            for m in machines
        )
        lines += ["", f"Measured on: {where}. Commits: {', '.join(document.get('commits', []))}."]
    return "\n".join(lines)


def replace_blocks(text: str, blocks: dict[str, str]) -> tuple[str, list[str]]:
    """`text` with each campaign's block between `<!-- ledger:NAME -->` and
    `<!-- /ledger:NAME -->` replaced; a campaign with no block gets one at the end. Returns the
    text and the campaigns that were appended."""
    missing = []
    for name, body in blocks.items():
        pattern = re.compile(  # the block's body may be empty: a new block is two lines
            rf"(<!-- ledger:{re.escape(name)} -->\n)(?:.*?\n)?(<!-- /ledger:{re.escape(name)} -->)",
            re.DOTALL,
        )
        if pattern.search(text):
            text = pattern.sub(lambda m, b=body: m.group(1) + b + "\n" + m.group(2), text)
        else:
            missing.append(name)
            text = (
                text.rstrip("\n") + f"\n\n<!-- ledger:{name} -->\n{body}\n<!-- /ledger:{name} -->\n"
            )
    return text, missing
