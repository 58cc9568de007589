"""OpenCompass's summary CSV as the round's scores (`eval.backend: command`, `parse: opencompass`).

    eval:
      backend: command
      command: opencompass --datasets gsm8k_gen bbh_gen --hf-type chat --hf-path {model} -w {output_dir}
      parse: opencompass
      tasks:                                   # capability -> dataset row (and metric, model column)
        math: {dataset: gsm8k, metric: accuracy}
        reasoning: {dataset: bbh}              # the dataset's only row
        # model: the model column when the summary has several; scale: 0.01 by default

OpenCompass writes `WORK/<time>/summary/summary_<time>.csv` with the header
`dataset,version,metric,mode,<model abbr>...`, one row per dataset and metric, values in percent
with two decimals and "-" where a result is missing. The newest summary under {output_dir} is read;
scores are multiplied by `scale` (0.01: percentages become fractions, like ideal's accuracies).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from ideal.backends.protocol import Score, score_from
from ideal.errors import IdealError

FIXED_COLUMNS = ("dataset", "version", "metric", "mode")


def newest_summary(directory: Path) -> Path:
    found = sorted(directory.rglob("summary_*.csv"), key=lambda p: (p.name, str(p)))
    if not found:
        raise IdealError(f"{directory}: no OpenCompass summary_*.csv there")
    return found[-1]


def parse_summary(path: Path, tasks: dict[str, Any]) -> dict[str, Score]:
    """{capability: {dataset, metric?, model?, scale?}} over an OpenCompass summary CSV."""
    if not tasks:
        raise IdealError("eval.tasks: map each capability to an OpenCompass dataset")
    with open(path, newline="", encoding="utf-8") as handle:
        table = [row for row in csv.reader(handle) if row]
    if not table or tuple(table[0][:4]) != FIXED_COLUMNS:
        raise IdealError(
            f"{path}: not an OpenCompass summary (header {','.join(FIXED_COLUMNS)},...)"
        )
    header = table[0]
    models = header[4:]
    rows = [row for row in table[1:] if row != header]
    out: dict[str, Score] = {}
    for capability, entry in tasks.items():
        where = f"{path}: capability {capability}"
        if isinstance(entry, str):
            entry = {"dataset": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("dataset"), str):
            raise IdealError(f"eval.tasks.{capability}: expected {{dataset: NAME, metric: ...}}")
        dataset, metric = entry["dataset"], entry.get("metric")
        model = entry.get("model")
        if model is None:
            if len(models) != 1:
                raise IdealError(f"{where}: several model columns ({', '.join(models)}); name one")
            model = models[0]
        if model not in models:
            raise IdealError(f"{where}: no model column {model!r} (has: {', '.join(models)})")
        matches = [
            r
            for r in rows
            if r[0] == dataset and (metric is None or r[2] == metric) and r[2] != "-"
        ]
        if not matches:
            raise IdealError(f"{where}: no row for dataset {dataset!r} metric {metric or 'any'}")
        if len(matches) > 1:
            raise IdealError(
                f"{where}: dataset {dataset!r} has several metrics "
                f"({', '.join(r[2] for r in matches)}); name one"
            )
        row = matches[0]
        raw = row[header.index(model)]
        try:
            value = float(raw)
        except ValueError:
            raise IdealError(f"{where}: no result for {dataset} ({raw!r})") from None
        out[capability] = score_from(
            value,
            where,
            metric=row[2],
            source=f"{path}: {dataset} {row[2]} {model}",
            scale=float(entry.get("scale", 0.01)),
        )
    return out
