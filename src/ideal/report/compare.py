"""The comparison report: `compare.html` and `compare.png` (mean test accuracy vs compute).

Made from compare.json only. The table has, per method, each capability's final test accuracy
(mean +- sd over seeds), the mean, the worst capability, the mean reference loss, the compute in
seconds per seed (training, influence, proxy runs, evaluation; candidates of `random` and
`oracle-grid` all counted) and in SFTs with the full recipe (`cost_in_sfts`), IDEAL-style gap
closure against the oracle grid when both `original` and `oracle-grid` were run, and the transfer
of ideal-search's mixture against ideal's when both were run.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter  # noqa: E402

from ideal.artifacts import atomic_write_text  # noqa: E402
from ideal.report.plots import inline_image, save_figure  # noqa: E402


def _cell(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None:
        return ""
    return f"{stat['mean']:.3f} &plusmn; {stat['std']:.3f}"


def accuracy_vs_compute_plot(document: dict[str, Any], path: Path) -> Path:
    """One point per method: mean seconds per seed (x, log) vs mean test accuracy (y), +- sd bars."""
    fig, ax = plt.subplots(figsize=(7.6, 4.4))
    for method, entry in document["methods"].items():
        accuracy, seconds = entry["test_accuracy_mean"], entry["seconds"]
        if accuracy["mean"] is None:
            continue
        marker = "*" if method == "oracle-grid" else "o"
        ax.errorbar(
            seconds["mean"],
            accuracy["mean"],
            yerr=accuracy["std"],
            xerr=seconds["std"],
            fmt=marker,
            markersize=10 if marker == "*" else 6,
            capsize=3,
            label=method,
        )
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.set_xlabel("compute per seed (s, log scale)")
    ax.set_ylabel("mean test accuracy (final round)")
    ax.set_title(f"accuracy vs compute, {len(document['seeds'])} seed(s), mean +- sd", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")  # close points stay legible
    fig.tight_layout()
    return save_figure(fig, path)


def _paired_table(baseline: str, paired: dict[str, Any]) -> str:
    """Per-seed differences against a baseline, with the verdict at 2 standard errors: test
    accuracy (higher is better) and held-out loss (lower is better), mean and worst."""
    keys = ("test_accuracy_mean", "test_accuracy_worst", "test_loss_mean", "test_loss_worst")
    rows = []
    for method, entry in paired.items():
        cells = [html.escape(method)]
        for key in keys:
            d = entry.get(key)
            if d is None or d["mean"] != d["mean"]:  # absent, or nan: no seed with both values
                cells += ["", "", ""]
                continue
            error = "" if d["stderr"] is None else f" &plusmn; {d['stderr']:.3f}"
            cells += [f"{d['mean']:+.3f}{error}", " ".join(f"{x:+.3f}" for x in d["per_seed"]),
                      html.escape(d["verdict"])]  # fmt: skip
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    header = ["method"]
    for what in ("mean acc. diff", "worst acc. diff", "mean test loss diff", "worst loss diff"):
        header += [what, "per seed", "verdict"]
    head = "".join(f"<th>{h}</th>" for h in header)
    return (
        f"<h2>Against {html.escape(baseline)}: paired per seed (method - {html.escape(baseline)})</h2>"
        "<p>Same seeds, so the same D0, split and base model; better / worse only beyond 2 standard "
        "errors of the paired difference (higher accuracy, lower held-out loss).</p>"
        f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}'
        "</tbody></table></div>"
    )


def _transfer_html(transfer: dict[str, Any] | None) -> str:
    """The searched mixture against the full search's, both trained with the full recipe."""
    if not transfer:
        return ""
    searched, against = html.escape(transfer["searched"]), html.escape(transfer["against"])
    rows = []
    for s in transfer["per_seed"]:
        cells = [str(s["seed"])]
        cells += ["" if s[k] is None else f"{s[k]:+.3f}"
                  for k in ("test_accuracy_mean", "reference_loss_mean")]  # fmt: skip
        cells.append(f"{s['share_distance']:.3f}")
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = "".join(
        f"<th>{h}</th>" for h in ("seed", "mean acc. diff", "mean ref. loss diff", "share distance")
    )
    accuracy = transfer["test_accuracy_mean"]
    error = "" if accuracy["stderr"] is None else f" &plusmn; {accuracy['stderr']:.3f}"
    within = {True: "yes", False: "no", None: "(one seed: no error)"}[
        transfer["within_one_stderr_or_better"]
    ]
    return (
        f"<h2>Transfer: {searched}'s mixture against {against}'s</h2><p>Both mixtures trained with "
        f"the full recipe, paired per seed ({searched} - {against}). Mean accuracy difference "
        f"{accuracy['mean']:+.3f}{error} ({html.escape(accuracy['verdict'])}); within one paired "
        f"standard error or better: {within}. Share distance: total variation between the two "
        "mixtures' shares.</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def write_compare_report(out: str | Path, document: dict[str, Any]) -> Path:
    out = Path(out)
    plot = accuracy_vs_compute_plot(document, out / "compare.png")
    methods = document["methods"]
    capabilities = list(next(iter(methods.values()))["per_capability"]) if methods else []
    closure = document.get("gap_closure") or {}
    header = ["method", *capabilities, "mean", "worst", "mean test loss", "worst test loss",
              "mean ref. loss", "trainings", "compute s / seed", "cost in SFTs"]  # fmt: skip
    if closure:
        header.append("gap closure")
    rows = []
    for method, entry in methods.items():
        cells = [html.escape(method)]
        cells += [_cell(entry["per_capability"][c]) for c in capabilities]
        cells += [
            _cell(entry.get(k))
            for k in ("test_accuracy_mean", "test_accuracy_worst", "test_loss_mean",
                      "test_loss_worst", "reference_loss_mean")
        ]  # fmt: skip
        trainings = (entry.get("trainings") or {}).get("mean")
        cells.append("" if trainings is None else f"{trainings:.1f}")
        cells.append(f"{entry['seconds']['mean']:.0f}")
        cells.append(_cell(entry.get("cost_in_sfts")))
        if closure:
            value = (closure.get(method) or {}).get("closure")
            cells.append("" if value is None else f"{100 * value:.0f} %")
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    note = (
        "<p><b>oracle-grid</b> is not a method: it picks, per seed, the grid mixture with the best "
        "TEST accuracy, so it is an optimistic upper bound. Gap closure = (method - original) / "
        "(oracle - original) of mean test accuracy.</p>"
        if "oracle-grid" in methods
        else ""
    )
    paired_tables = "".join(_paired_table(b, p) for b, p in document.get("paired", {}).items())
    paired_tables += _transfer_html(document.get("transfer"))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>ideal compare</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 14px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child {{ text-align: left; }}
img {{ max-width: 640px; }} div.wide {{ overflow-x: auto; }}
</style></head><body>
<h1>Methods side by side</h1>
<p>The returned round of every method, test accuracy and held-out loss mean &plusmn; sd over seeds {html.escape(str(document["seeds"]))};
same total volume and training recipe for all; each (method, seed) is a run directory with its own
report under <code>&lt;method&gt;/seed-&lt;s&gt;/</code>.</p>
<table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>
{note}
{paired_tables}
<figure><img src="{inline_image(plot)}" alt="accuracy vs compute"></figure>
</body></html>
"""
    atomic_write_text(out / "compare.html", page)
    return out / "compare.html"
