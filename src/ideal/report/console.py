"""The console's tables: pure functions from records to rich renderables (the CLI prints them).

Each function takes what a command computed (a RunSummary, compare.json's document, an
evaluation summary, ...) and returns tables and lines; none reads a file or computes a result.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from ideal.records import Compute, RoundRecord, RunSummary


def fmt(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def human(size: float) -> str:
    """A byte count in B, KiB, MiB, GiB or TiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} TiB"


def _table(title: str, columns: Iterable[str], left: Sequence[str] = ()) -> Table:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column in left else "right")
    return table


def run_tables(summary: RunSummary, run_dir: Path) -> list[Any]:
    """`ideal run` / `ideal demo`: scores and volumes per round, what each round was, the
    returned round with its shares, the final training (under a search recipe), the whole
    run's compute, and the next step."""
    rounds = summary.rounds
    searched = f"; rounds searched with {summary.search}" if summary.search else ""
    table = Table(
        title=f"test accuracy per capability (round 0 = the original mixture D0){searched}"
    )
    table.add_column("capability")
    for r in rounds:
        table.add_column(f"round {r.round}", justify="right")
    table.add_row("round was", *(r.describe() for r in rounds))
    for capability in rounds[0].test_accuracy:
        table.add_row(capability, *(fmt(r.test_accuracy.get(capability)) for r in rounds))
    table.add_row("mean", *(fmt(r.test_accuracy_mean) for r in rounds))
    table.add_row("worst", *(fmt(r.test_accuracy_worst) for r in rounds))
    table.add_row("mean reference loss", *(fmt(r.reference_loss_mean) for r in rounds))
    table.add_row("mean test loss", *(fmt(r.test_loss_mean) for r in rounds))
    for domain in rounds[0].volumes:
        table.add_row(f"volume {domain}", *(str(r.volumes.get(domain)) for r in rounds))
    out: list[Any] = [table]
    out += [step_table(r) for r in rounds if r.candidates or r.direction]
    if summary.stopped:
        out.append(f"the rounds stopped before `rounds`: {summary.stopped}")
    note = summary.probe_note()
    if note:
        out.append(note)
    selected = summary.selected
    if selected is not None:
        mixture = run_dir / f"round-{selected.round}" / "mixture.json"
        shares = ", ".join(
            f"{d} {selected.volumes[d]} ({100 * s:.0f} %)" for d, s in selected.shares.items()
        )
        out.append(
            f"returned: round {selected.round} ({selected.describe()}; select: "
            f"{summary.select}), its mixture: {mixture}"
        )
        out.append(f"volumes: {shares}")
        if summary.final is not None:
            out.append(final_line(summary.final, run_dir / "final"))
        out.append(
            f"export it: ideal export --run {run_dir} --format llamafactory --out mix   "
            "(or --format trl, axolotl)"
        )
    if summary.compute is not None:
        out.append(compute_line(summary.compute))
    out.append(f"report: {run_dir / 'report.html'}")
    return out


def step_table(r: RoundRecord) -> Table:
    """An IDEAL update: per domain its sensitivity, standard error, z and what the step used;
    with candidate steps, each candidate's held-out reference loss and whether it was kept."""
    rescored = (
        f" (every copy scored: at {r.rescored_from} a domain no sensitivity passed the noise)"
        if r.rescored_from is not None
        else ""
    )
    table = _table(
        f"round {r.round}: the IDEAL update from round {r.from_round}{rescored}",
        ("domain", "dQ/dbeta", "+- SE", "z", "used", "volume"),
        left=("domain",),
    )
    for domain, row in (r.direction or {}).items():
        table.add_row(domain, f"{row['sensitivity']:.4g}", fmt(row["stderr"], 4),
                      fmt(row["z"], 2), f"{row['used']:.4g}", str(r.volumes.get(domain)))  # fmt: skip
    if not r.candidates:
        return table
    grid = _table(
        f"round {r.round}: candidate steps (radius x{r.scale:g} -> x{r.scale_next:g}); kept "
        "(update.ties): the lowest held-out reference loss, or the smaller or larger step among "
        "its ties (within one paired SE of it)",
        ("candidate", "m", "moved", "held-out loss", "- lowest", "+- SE", "tie", "kept"),
        left=("candidate",),
    )
    for row in r.candidates:
        grid.add_row(
            row["name"], fmt(row["step"]), fmt(row["moved"]), fmt(row["selection_loss"], 4),
            f"{row['minus_lowest']:+.4f}", fmt(row["stderr"], 4), "yes" if row["tie"] else "",
            "kept" if row["chosen"] else "",
        )  # fmt: skip
    combined = Table.grid()
    combined.add_row(table)
    combined.add_row(grid)
    return combined


def final_line(final: RoundRecord, where: Path) -> str:
    """The final training's scores (RUN/final/), in one line."""
    return (
        f"final: {final.describe()}: mean test accuracy {fmt(final.test_accuracy_mean)}, worst "
        f"{fmt(final.test_accuracy_worst)}, mean reference loss {fmt(final.reference_loss_mean)}; "
        f"model: {where / 'model'}"
    )


def compute_line(compute: Compute) -> str:
    """The whole run's seconds by part, and in units of one SFT with the run's recipe."""
    stages = ", ".join(f"{k} {v:.1f}" for k, v in compute.rounds.items() if v)
    line = f"compute: rounds {sum(compute.rounds.values()):.1f} s ({stages})"
    if compute.final:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in compute.final.items())
        line += f", final {sum(compute.final.values()):.1f} s ({stages})"
    line += f"; whole run {compute.total:.1f} s"
    if compute.cost_in_sfts is not None:
        line += (
            f" = {compute.cost_in_sfts:.2f} x one SFT with the run's recipe ({compute.sft}, "
            f"{compute.sft_seconds:.1f} s)"
        )
    return line


def compare_tables(document: dict[str, Any], seeds: int, out_dir: Path) -> list[Any]:
    """`ideal compare`: the methods' returned rounds (mean +- sd) with their cost in SFTs, the
    paired differences against each baseline with their verdicts, the gap closure, and the
    transfer of ideal-search's mixture."""

    def cell(stat: dict) -> str:
        return "" if stat["mean"] is None else f"{stat['mean']:.3f} +- {stat['std']:.3f}"

    table = _table(
        f"methods over {seeds} seed(s): returned round, mean +- sd",
        ("method", "mean accuracy", "worst accuracy", "mean test loss", "mean reference loss",
         "trainings", "compute s", "cost in SFTs"),
        left=("method",),
    )  # fmt: skip
    for method, entry in document["methods"].items():
        cost = entry.get("cost_in_sfts") or {"mean": None}
        trainings = entry.get("trainings") or {"mean": None}
        table.add_row(
            method,
            cell(entry["test_accuracy_mean"]),
            cell(entry["test_accuracy_worst"]),
            cell(entry.get("test_loss_mean") or {"mean": None}),
            cell(entry["reference_loss_mean"]),
            "" if trainings["mean"] is None else f"{trainings['mean']:.1f}",
            f"{entry['seconds']['mean']:.0f}",
            cell(cost) if cost["mean"] is not None else "",
        )
    out: list[Any] = [table]
    seeds_note = "" if seeds > 1 else " (one seed: nothing separates)"
    for baseline, paired in document.get("paired", {}).items():
        against = _table(
            f"paired differences against {baseline}, per seed: method - {baseline}; "
            f"verdict at 2 standard errors{seeds_note}",
            ("method", "mean accuracy diff", "per seed", "verdict", "worst diff", "verdict",
             "mean test loss diff", "verdict"),
            left=("method",),
        )  # fmt: skip
        for method, entry in paired.items():
            mean, worst = entry["test_accuracy_mean"], entry["test_accuracy_worst"]
            loss = entry.get("test_loss_mean")
            per_seed = " ".join(f"{x:+.3f}" for x in mean["per_seed"])
            against.add_row(
                method, _diff(mean), per_seed, mean["verdict"], _diff(worst), worst["verdict"],
                _diff(loss) if loss else "", loss["verdict"] if loss else "",
            )  # fmt: skip
        out.append(against)
    for method, entry in (document.get("gap_closure") or {}).items():
        if entry["closure"] is not None:
            out.append(f"gap closure {method}: {100 * entry['closure']:.0f} % of oracle - original")
    if document.get("sft"):
        out.append(
            f"cost in SFTs: compute over one SFT with the full recipe ({document['sft']['of']})"
        )
    if document.get("transfer"):
        out.append(transfer_line(document["transfer"]))
    out.append(f"wrote {out_dir / 'compare.json'} and {out_dir / 'compare.html'}")
    return out


def transfer_line(transfer: dict[str, Any]) -> str:
    """compare.json's transfer: the searched mixture against the full search's, both trained with
    the full recipe, paired per seed."""
    accuracy, loss = transfer["test_accuracy_mean"], transfer["reference_loss_mean"]
    distance = " ".join(f"{s['share_distance']:.2f}" for s in transfer["per_seed"])
    within = {True: "yes", False: "no", None: "one seed: no error"}[
        transfer["within_one_stderr_or_better"]
    ]
    return (
        f"transfer, {transfer['searched']} - {transfer['against']} (both mixtures trained with "
        f"the full recipe), per seed: mean accuracy {_diff(accuracy)} ({accuracy['verdict']}), "
        f"mean reference loss {_diff(loss)}; share distance per seed {distance}; within one "
        f"paired standard error or better: {within}"
    )


def _diff(d: dict) -> str:
    if d["mean"] != d["mean"]:  # nan: no seed has both values (e.g. accuracy not scored)
        return ""
    error = "" if d["stderr"] is None else f" +- {d['stderr']:.3f}"
    return f"{d['mean']:+.3f}{error}"


def reweight_table(result: Any, step: float, geometry: str) -> list[Any]:
    """`ideal reweight`: each domain's volume before, the step, the volume after."""
    table = _table(
        f"IDEAL update (m = {step}, {geometry})",
        ("domain", "before", "beta", "requested", "after", "unique", "max copies", "bound"),
        left=("domain", "bound"),
    )
    bound = {e["domain"]: e["constraint"] for e in result.mixture.events if e["domain"]}
    for domain, counts in result.mixture.counts.items():
        table.add_row(
            domain,
            str(result.before[domain]),
            f"{result.beta[domain]:+.3f}",
            f"{result.requested[domain]:.1f}",
            str(result.after[domain]),
            str(int((counts > 0).sum())),
            str(int(counts.max(initial=0))),
            bound.get(domain, ""),
        )
    total_before, total_after = sum(result.before.values()), result.mixture.total
    return [table, f"total {total_before} -> {total_after}; wrote {result.out}"]


def influence_table(document: dict[str, Any], out_dir: Path) -> list[Any]:
    """`ideal influence`: s_ji +- standard error, the sensitivities and the step's beta."""
    domains, references = document["domains"], document["references"]
    table = Table(
        title="influence s_ji +- standard error (> 0: more of the domain lowers the reference loss)"
    )
    table.add_column("reference \\ domain")
    for domain in domains:
        table.add_column(f"{domain} ({document['examples'][domain]:.0f})", justify="right")
    stderr = document["stderr"] or [[float("nan")] * len(domains) for _ in references]
    for j, reference in enumerate(references):
        table.add_row(
            reference,
            *(f"{x:.4g} +- {e:.2g}" for x, e in zip(document["scores"][j], stderr[j], strict=True)),
        )
    table.add_row("dQ/dbeta", *(f"{document['sensitivity'][d]:.4g}" for d in domains))
    if "beta" in document:
        table.add_row(
            f"beta (m={document['step']})", *(f"{document['beta'][d]:+.3f}" for d in domains)
        )
    return [table, f"{document['seconds']['total']:.1f} s; wrote {out_dir}"]


def eval_table(summary: Mapping[str, Any], model: Path) -> Table:
    """`ideal eval`: loss and accuracy per capability, the mean and the worst."""
    table = _table(
        f"evaluation of {model}",
        ("capability", "examples", "loss", "accuracy", "scorer"),
        left=("capability", "scorer"),
    )
    for name, entry in summary["capabilities"].items():
        accuracy = (
            "" if entry["accuracy"] is None else f"{entry['accuracy']:.3f} ({entry['scored']})"
        )
        table.add_row(
            name, str(entry["examples"]), f"{entry['loss']:.4f}", accuracy, entry["scorer"] or ""
        )
    table.add_row(
        "mean",
        "",
        f"{summary['loss_mean']:.4f}",
        f"{summary['accuracy_mean']:.3f}" if "accuracy_mean" in summary else "",
        "",
    )
    if "accuracy_worst" in summary:
        table.add_row(
            "worst",
            "",
            f"{summary['loss_worst']:.4f}",
            f"{summary['accuracy_worst']:.3f} ({summary['accuracy_worst_capability']})",
            "",
        )
    return table


def check_table(title: str, rows: list[dict[str, Any]], tokens: bool) -> Table:
    """`ideal check`: per domain its files, formats, rows and (with a tokenizer) token counts."""
    columns = ["domain", "files", "formats", "rows", "volume", "skipped"]
    if tokens:
        columns += ["tokens", "target tokens", "truncated", "no target", "re-tokenized"]
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row[c]) for c in columns))
    return table


def plan_tables(plan: Any, references: int, curvature: str, refine: int, parameters: int,
                probe: dict[str, Any] | None) -> list[Any]:  # fmt: skip
    """`ideal influence --plan`: memory per layer and group, passes, and the probe's time."""
    table = Table(
        title=f"influence step ({curvature}): {len(plan.layers)} layers, {references} "
        f"references, {len(plan.groups)} layer group(s)"
    )
    parts = ("covariances", "eigenvectors", "eigenvalues", "correction", "references", "directions")
    parts += ("refinement",) if refine else ()
    for column in ("layer", "out x in", "group", *parts, "device"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    group_of = {p.name: g for g, group in enumerate(plan.groups) for p in group}
    for p in plan.layers:
        sizes = (human(getattr(p, part)) for part in parts)
        table.add_row(
            p.name, f"{p.d_out} x {p.d_in}", str(group_of[p.name]), *sizes, human(p.device)
        )
    table.add_row("total", "", "", *(human(sum(getattr(p, k) for p in plan.layers)) for k in parts),
                  human(sum(p.device for p in plan.layers)))  # fmt: skip
    passes = ", ".join(f"{v} over {k}" for k, v in plan.passes.items())
    out: list[Any] = [
        table,
        f"model: {parameters:,} parameters, {human(plan.model)} of bf16 weights (sizes from the "
        "config alone)",
        f"passes: {passes}",
        f"peak host memory: {plan.peak_host / 2**30:.2f} GiB (statistics of one group)",
        f"peak device memory: {plan.peak_device / 2**30:.2f} GiB (weights, one group's "
        "statistics, one layer's transients; activations of one batch come on top)",
    ]
    if probe is None:
        out.append("time: no estimate (no weights in the model directory to run a probe on)")
        return out
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in probe["estimate_seconds"].items())
    examples, probed = probe["examples"], probe["probe_examples"]
    out.append(
        f"time: ~{probe['estimate_total']:.1f} s on this machine for {examples['domains']} "
        f"sampled, {examples['curvature']} curvature and {examples['references']} reference "
        f"examples, from a timed probe on {probed['domains']} + {probed['curvature']} + "
        f"{probed['references']} ({stages})"
    )
    return out


def rows_table(title: str, rows: Mapping[str, int]) -> Table:
    """`ideal suite prepare`: rows per split and domain."""
    table = Table(title=title)
    for column in ("split/domain", "rows"):
        table.add_column(column)
    for key, count in rows.items():
        table.add_row(key, str(count))
    return table
