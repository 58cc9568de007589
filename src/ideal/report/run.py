"""The run report: PNG plots and `report.html` (opens offline), made from a run's artifacts only.

ideal report RUN_DIR
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ideal.artifacts import atomic_write_text, read_json  # noqa: E402
from ideal.errors import IdealError  # noqa: E402
from ideal.records import RunSummary  # noqa: E402
from ideal.report.plots import SIGN_CONVENTION, inline_image, save_figure  # noqa: E402


def _volumes_plot(rounds: list[dict[str, Any]], path: Path) -> Path:
    domains = list(rounds[0]["volumes"])
    fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(rounds), 3.6))
    bottom = np.zeros(len(rounds))
    for domain in domains:
        values = np.array([r["volumes"].get(domain, 0) for r in rounds], dtype=float)
        ax.bar([f"round {r['round']}" for r in rounds], values, bottom=bottom, label=domain)
        bottom += values
    ax.set_ylabel("examples")
    ax.set_title("volume per domain")
    ax.legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    return save_figure(fig, path)


def _gaps(values: list[float | None]) -> list[float]:
    """A round that did not measure this (say, accuracy decoded for the returned round only) is a
    gap in the line, not a zero."""
    return [np.nan if v is None else v for v in values]


def _per_capability_plot(
    rounds: list[dict[str, Any]], key: str, mean_key: str, title: str, path: Path
) -> Path | None:
    """One line per capability over the rounds, and the mean; None when no round measured any."""
    capabilities = [c for c in rounds[0][key] if any(r[key].get(c) is not None for r in rounds)]
    means = [r.get(mean_key) for r in rounds]
    if not capabilities and all(m is None for m in means):
        return None
    x = [r["round"] for r in rounds]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for capability in capabilities:
        ax.plot(x, _gaps([r[key].get(capability) for r in rounds]), marker="o", label=capability)
    if any(m is not None for m in means):
        ax.plot(x, _gaps(means), marker="s", color="black", linewidth=2, label="mean")
    ax.set_xticks(x)
    ax.set_xlabel("round")
    ax.set_title(title)
    ax.legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    return save_figure(fig, path)


def _prediction_plot(rounds: list[dict[str, Any]], path: Path) -> Path | None:
    pairs = [
        (r["round"], r["predicted_reference_loss_change"], r["realised_reference_loss_change"])
        for r in rounds[1:]
    ]
    pairs = [p for p in pairs if p[1] is not None]
    if not pairs:
        return None
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    x = np.arange(len(pairs))
    ax.bar(x - 0.2, [p[1] for p in pairs], width=0.4, label="predicted (first order)")
    ax.bar(x + 0.2, [p[2] for p in pairs], width=0.4, label="realised (retrained)")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, [f"round {p[0]}" for p in pairs])
    ax.set_ylabel("change of mean reference loss")
    ax.set_title("predicted vs realised change")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def _cell(value: Any) -> str:
    """Numbers as a person reads them: 3 decimals, or 2 significant digits for small values."""
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) >= 0.01 or value == 0 else f"{value:.1e}"
    return html.escape("" if value is None else str(value))


def _table(header: list[str], rows: list[list[Any]], mark: int | None = None) -> str:
    """An HTML table; row `mark` (an index) is highlighted as the returned round."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        f"<tr{' class=returned' if k == mark else ''}>"
        + "".join(f"<td>{_cell(v)}</td>" for v in row)
        + "</tr>"
        for k, row in enumerate(rows)
    )
    # a wide table scrolls on its own on a narrow screen instead of cutting the page
    return (
        f"<div class=wide><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"
    )


def trainer_warnings(run: Path, rounds: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Each warning of the rounds' trainers (RUN/round-K/train.json `warnings`: where the trainer
    renders rows or masks the loss differently from ideal's influence step, or changes the
    volumes) -> the rounds it was raised in."""
    out: dict[str, list[int]] = {}
    for r in rounds:
        path = run / f"round-{r['round']}" / "train.json"
        if not path.is_file():
            continue
        record = read_json(path)
        warnings = record.get("warnings") if isinstance(record, dict) else None
        for warning in warnings or []:
            out.setdefault(str(warning), []).append(r["round"])
    return out


def _warnings_html(warnings: dict[str, list[int]]) -> str:
    if not warnings:
        return ""
    items = "".join(
        f"<li>{html.escape(w)} <small>(round {', '.join(map(str, ks))})</small></li>"
        for w, ks in warnings.items()
    )
    return (
        "<h2>Trainer warnings</h2><p>Where the trainer renders rows or masks the loss "
        "differently from how the influence step does (its scores then differentiate another "
        f"objective than the one trained), or changes the volumes:</p><ul>{items}</ul>"
    )


def _returned_html(summary: RunSummary, run: Path) -> str:
    """The round the run returns, its shares, and what to do with it next."""
    selected = summary.selected
    if selected is None:
        return ""
    how = {"last": "the last round", "reference_loss": "the lowest mean reference loss",
           "reference_accuracy": "the highest mean reference accuracy"}.get(summary.select, "")  # fmt: skip
    shares = ", ".join(
        f"{html.escape(d)} {selected.volumes[d]} ({100 * s:.0f} %)"
        for d, s in selected.shares.items()
    )
    return (
        f"<div class=next><p>Returned: <b>round {selected.round}</b> "
        f"({html.escape(selected.describe())}; chosen by {html.escape(how)}, "
        f"<code>select: {html.escape(summary.select)}</code>). Its mixture: {shares}; in "
        f"<code>round-{selected.round}/mixture.json</code>.</p>"
        "<p><b>Next step.</b> Export it for your trainer, then train on it:</p><pre>"
        f"ideal export --run {html.escape(str(run))} --format llamafactory --out mix\n"
        "llamafactory-cli train my_sft.yaml   # dataset: ideal_&lt;domain&gt;,..., "
        "dataset_dir: mix\n"
        f"ideal export --run {html.escape(str(run))} --format trl --out mix   "
        "# or: mixture.yaml for TRL\n"
        f"ideal export --run {html.escape(str(run))} --format axolotl --out mix   "
        "# or: datasets.yaml for axolotl</pre></div>"
    )


def _final_html(summary: RunSummary) -> str:
    """Under a search recipe: the rounds' recipe, and the returned mixture trained with the run's
    own recipe (RUN/final/) beside the round that chose it."""
    if summary.search is None:
        return ""
    text = (
        f"<h2>Search and final training</h2><p>The rounds searched with <code>search:</code> "
        f"({html.escape(summary.search)}): their scores below are the search recipe's. "
    )
    final, chosen = summary.final, summary.selected
    if final is None or chosen is None:
        return text + "The final training has not run yet (<code>--resume</code>).</p>"
    rows = [
        [f"round {chosen.round} (search)", chosen.test_accuracy_mean, chosen.test_accuracy_worst,
         chosen.reference_loss_mean],
        ["final (run's recipe)", final.test_accuracy_mean, final.test_accuracy_worst,
         final.reference_loss_mean],
    ]  # fmt: skip
    table = _table(["model", "mean accuracy", "worst accuracy", "mean reference loss"], rows, 1)
    return (
        text + f"The returned mixture, round {final.round}'s, was then trained once with the "
        "run's own recipe: <code>final/model</code>.</p>" + table
    )


def _steps_html(summary: RunSummary) -> str:
    """Each IDEAL update: the direction (per domain the sensitivity, its standard error, z and
    what the step used) and, with candidate steps, how each candidate fared on the held-out
    reference rows and which was kept."""
    parts = []
    for r in summary.rounds:
        if not (r.direction or r.candidates):
            continue
        parts.append(f"<h3>Round {r.round}: the update from round {r.from_round}</h3>")
        if r.rescored_from is not None:
            parts.append(
                f"<p>At {r.rescored_from} copies a domain no sensitivity was beyond "
                "<code>update.min_z</code> standard errors; every copy was scored "
                "(<code>update.rescore</code>), and the step below is that score's.</p>"
            )
        parts.append(_table(
            ["domain", "dQ/dbeta", "standard error", "z", "used by the step", "volume after"],
            [[d, row["sensitivity"], row["stderr"], row["z"], row["used"], r.volumes.get(d)]
             for d, row in (r.direction or {}).items()],
        ))  # fmt: skip
        if r.candidates:
            kept = next((k for k, row in enumerate(r.candidates) if row["chosen"]), None)
            parts.append(
                f"<p>Candidate steps at radius x{r.scale:g} (next: x{r.scale_next:g}), compared "
                "on the reference rows held out from the direction; the one kept has the lowest "
                "held-out loss, or is the smaller or larger step among its ties, the candidates "
                "within one paired standard error of it (<code>update.ties</code>).</p>"
            )
            parts.append(_table(
                ["candidate", "m", "moved", "held-out loss", "minus lowest", "paired SE", "tie",
                 "mean reference loss", "mean test loss"],
                [[row["name"], row["step"], row["moved"], row["selection_loss"],
                  row["minus_lowest"], row["stderr"], "yes" if row["tie"] else "",
                  row.get("reference_loss_mean"), row.get("test_loss_mean")]
                 for row in r.candidates],
                kept,
            ))  # fmt: skip
    if summary.stopped:
        parts.append(f"<p>The rounds stopped early: {html.escape(summary.stopped)}.</p>")
    if not parts:
        return ""
    return (
        "<h2>IDEAL updates</h2><p>Each sensitivity is judged by its standard error "
        "(<code>update.min_z</code>, <code>update.shrink</code>): within the threshold it moves "
        "nothing.</p>" + "".join(parts)
    )


def _compute_html(summary: RunSummary) -> str:
    """The whole run's seconds by part, and in units of one SFT with the run's recipe."""
    compute = summary.compute
    if compute is None:
        return ""
    rows = [[f"rounds: {k}", v] for k, v in compute.rounds.items()]
    rows += [[f"final: {k}", v] for k, v in compute.final.items()]
    rows.append(["whole run", compute.total])
    cost = (
        ""
        if compute.cost_in_sfts is None
        else f"<p>The whole run cost <b>{compute.cost_in_sfts:.2f}</b> SFTs with the run's recipe "
        f"(one SFT: the {html.escape(compute.sft)}, {compute.sft_seconds:.1f} s).</p>"
    )
    return "<h2>Compute</h2>" + _table(["part", "seconds"], rows) + cost


def _probe_html(summary: RunSummary) -> str:
    note = summary.probe_note()
    return f"<p>{html.escape(note[0].upper() + note[1:])}.</p>" if note else ""


_PREDICTION_NOTE = (
    "<p><b>Predicted vs realised.</b> The predicted change is the influence step's first-order "
    "estimate of how the mean reference loss moves for the volumes it asked for, around the "
    "model it was computed on. The realised change comes from retraining from the base model on "
    "the new mixture, with its own seed noise and everything beyond first order. On our suites "
    "it was about 1 % of the prediction, and the two correlated weakly (Pearson -0.30 to 0.45 "
    "over 15 rounds): the prediction sets the step's direction, it does not forecast the result, "
    "not even its sign. Judge a mixture by the realised column and the test scores.</p>"
)


def write_report(run_dir: str | Path) -> Path:
    """Plots and report.html from RUN/summary.json and the round directories. The page is one
    self-contained file: the plots are inlined, so it can be mailed alone."""
    run = Path(run_dir)
    if not (run / "summary.json").is_file():
        raise IdealError(f"{run}: no summary.json (not a finished `ideal run` directory)")
    summary = read_json(run / "summary.json")
    rounds = summary["rounds"]
    if not rounds:
        raise IdealError(f"{run}/summary.json: no rounds")
    record = RunSummary.from_json(summary)
    was = {r.round: r.describe() for r in record.rounds}
    mark = next((k for k, r in enumerate(rounds) if r["round"] == record.selected_round), None)
    plots = [
        _volumes_plot(rounds, run / "volumes.png"),
        _per_capability_plot(
            rounds, "test_accuracy", "test_accuracy_mean", "test accuracy", run / "accuracy.png"
        ),
        _per_capability_plot(
            rounds, "reference_loss", "reference_loss_mean", "reference loss",
            run / "reference_loss.png",
        ),
        _prediction_plot(rounds, run / "prediction.png"),
    ]  # fmt: skip
    images = [image for image in plots if image is not None]
    heatmaps = [
        (r["round"], run / f"round-{r['round']}" / "influence.png")
        for r in rounds
        if (run / f"round-{r['round']}" / "influence.png").is_file()
    ]
    capabilities = list(rounds[0]["test_accuracy"])
    overview = _table(
        ["round", "was", "mean accuracy", "worst accuracy", "mean reference loss", "predicted change", "realised change", "train s", "influence s", "eval s"],
        [
            [r["round"], was[r["round"]], r["test_accuracy_mean"], r["test_accuracy_worst"], r["reference_loss_mean"], r["predicted_reference_loss_change"],
             r["realised_reference_loss_change"], r["seconds"]["train"], r["seconds"]["influence"], r["seconds"]["eval"]]
            for r in rounds
        ],
        mark,
    )  # fmt: skip
    per_capability = _table(
        ["capability", *[f"round {r['round']} accuracy" for r in rounds],
         *[f"round {r['round']} ref. loss" for r in rounds]],
        [[c, *[r["test_accuracy"].get(c) for r in rounds],
          *[r["reference_loss"].get(c) for r in rounds]] for c in capabilities],
    )  # fmt: skip
    domains = list(rounds[0]["volumes"])
    volumes = _table(
        ["domain", *[f"round {r.round}" for r in record.rounds]],
        [[d, *[f"{r.volumes.get(d)} ({100 * r.shares.get(d, 0.0):.0f} %)" for r in record.rounds]]
         for d in domains],
    )  # fmt: skip
    figures = "".join(
        f'<figure><img src="{inline_image(p)}" alt="{html.escape(p.stem)}"></figure>'
        for p in images
    )
    maps = "".join(
        f'<figure><img src="{inline_image(path)}" alt="influence round {k}">'
        f"<figcaption>influence of round {k}</figcaption></figure>"
        for k, path in heatmaps
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>ideal run: {html.escape(run.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1100px; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 14px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child, td:nth-child(2) {{ text-align: left; }}
tr.returned td {{ background: #e8f4e8; font-weight: bold; }}
div.next {{ border: 2px solid #4a4; padding: 0.5em 1em; margin: 1em 0; background: #f6fbf6; }}
pre {{ white-space: pre-wrap; }} div.wide {{ overflow-x: auto; }}
figure {{ display: inline-block; margin: 0.5em; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>IDEAL run <code>{html.escape(str(run))}</code></h1>
<p>Round 0 is the original mixture D0. Under <code>update.first_round: uniform</code> (the
default) round 1 is the uniform mixture at D0's total, a probe; every later round applies the update
rule to the influence of the round it starts from (column "was") and retrains from the base model.
{html.escape(SIGN_CONVENTION)}.</p>{_probe_html(record)}
{_returned_html(record, run)}
{_final_html(record)}
{_warnings_html(trainer_warnings(run, rounds))}
<h2>Rounds</h2><p>The returned round is highlighted.</p>{overview}
{_PREDICTION_NOTE if (run / "prediction.png") in images else ""}
<h2>Per capability</h2>{per_capability}
<h2>Volumes and shares</h2>{volumes}
{_steps_html(record)}
{_compute_html(record)}
<h2>Plots</h2>{figures}
<h2>Influence</h2>{maps or "<p>(no influence step in this run)</p>"}
</body></html>
"""
    atomic_write_text(run / "report.html", page)
    return run / "report.html"
