"""Any trainer or evaluator, run as a command: `train.backend: command`, `eval.backend: command`.

    train: {backend: command, command: "python my_sft.py --base {model} --data {data_dir} --out {output_dir}"}
    eval:  {backend: command, command: "python my_eval.py {model} {scores}"}

The command is a list of arguments, or a string split like a shell would (`shlex`), but it runs
WITHOUT a shell. Each argument is filled with `str.format` (`{{` for a literal brace):

    training   {model} base model   {data_dir} the round's export (`ideal export`: <domain>.jsonl + the
               tool's file)   {output_dir} where the model must be written   {round}   {run_dir}
               {config} the run's config.yaml (a preset: the tool's rendered YAML)
    evaluation {model} the round's model   {base_model} its base (an adapter's)   {scores} the JSON
               to write   {output_dir} RUN/round-K/eval   {data_dir} the test data   {round}
               {run_dir}   {config}

and the same values are exported as IDEAL_MODEL, IDEAL_DATA_DIR, ... (upper case), so a wrapper
script needs no templating. Under torchrun the group's variables (RANK, MASTER_PORT, ...) are removed,
so a command may launch its own `torchrun` / `accelerate launch`. Output goes to a log in the round
directory (train.log, eval.log); a timeout ends the command's whole process group. A non-zero exit
fails the round with the log's last lines; `ideal run --resume` runs the command again.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ideal.artifacts import atomic_write_json, read_json
from ideal.backends.protocol import (
    EvalJob,
    Score,
    TrainJob,
    collect_model,
    find_trained_model,
    read_scores,
)
from ideal.data.export import export_mixture
from ideal.errors import IdealError

log = logging.getLogger(__name__)

#: Variables of a torchrun / accelerate process group: a child launcher must not inherit them.
GROUP_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)
TAIL_LINES = 20


def split_command(command: str | tuple[str, ...] | list[str] | None, where: str) -> list[str]:
    if command is None or (isinstance(command, str) and not command.strip()):
        raise IdealError(f"{where}: give the command to run")
    argv = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
    if not argv:
        raise IdealError(f"{where}: give the command to run")
    return argv


def fill(argv: list[str], values: dict[str, str], where: str) -> list[str]:
    """Each argument through str.format(**values); an unknown placeholder is an error naming it."""
    out = []
    for arg in argv:
        try:
            out.append(arg.format(**values))
        except KeyError as err:
            raise IdealError(
                f"{where}: unknown placeholder {{{err.args[0]}}} in {arg!r} "
                f"(known: {', '.join('{' + k + '}' for k in values)}; write {{{{ for a brace)"
            ) from None
        except (ValueError, IndexError) as err:
            raise IdealError(f"{where}: cannot fill {arg!r} ({err})") from None
    return out


def child_environment(values: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in GROUP_VARIABLES}
    env = {k: v for k, v in env.items() if not k.startswith("TORCHELASTIC_")}
    env.update({f"IDEAL_{k.upper()}": v for k, v in values.items()})
    env.update({str(k): str(v) for k, v in extra.items()})
    return env


def log_tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", errors="replace") as handle:
        return [line.rstrip("\n") for line in deque(handle, maxlen=lines)]


@dataclass
class CommandResult:
    argv: list[str]
    exit_code: int | None  # None: killed at the timeout
    seconds: float
    log: Path
    timed_out: bool = False

    def record(self) -> dict[str, Any]:
        return {
            "command": self.argv,
            "exit_code": self.exit_code,
            "seconds": self.seconds,
            "timed_out": self.timed_out,
            "log": str(self.log),
        }


def run_command(
    argv: list[str],
    log_path: Path,
    env: dict[str, str],
    timeout: float | None,
    cwd: Path | None = None,
) -> CommandResult:
    """Run `argv` (no shell) with stdout+stderr appended to `log_path`; the timeout kills its group."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as handle:
        handle.write(f"=== ideal: {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(argv)}\n")
        handle.flush()
        start = time.perf_counter()
        try:
            process = subprocess.Popen(
                argv,
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,  # its own process group: the timeout ends all of it
            )
        except OSError as err:
            raise IdealError(f"cannot run {argv[0]!r}: {err.strerror or err}") from None
        timed_out = False
        try:
            code: int | None = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out, code = True, None
            _end_group(process)
        except BaseException:  # Ctrl-C, or our own process being stopped: take the child along
            _end_group(process)
            raise
        seconds = time.perf_counter() - start
        handle.write(
            f"=== ideal: {'timed out' if timed_out else f'exit code {code}'} "
            f"after {seconds:.1f} s\n"
        )
    return CommandResult(argv, code, seconds, log_path, timed_out)


def _end_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def failure(what: str, result: CommandResult) -> IdealError:
    """The round's error: what failed, how, and the last lines of its log."""
    how = (
        f"timed out after {result.seconds:.0f} s"
        if result.timed_out
        else f"exited with code {result.exit_code} after {result.seconds:.0f} s"
    )
    tail = "\n".join(f"    {line}" for line in log_tail(result.log))
    return IdealError(
        f"{what} {how}: {shlex.join(result.argv)}\n  last lines of {result.log}:\n{tail}"
    )


@dataclass
class CommandTrainer:
    """A trainer run as a command over the round's export; presets render `config_file` first."""

    command: str | tuple[str, ...] | list[str] | None
    export_format: str = "trl"  # which tool's file `ideal export` adds beside the jsonl files
    env: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None
    name: str = "command"
    loss: str = "token"  # what TRL, LLaMA-Factory and axolotl minimise
    all_processes: bool = False
    render: Any = None  # presets: (job, data_dir, output_dir, config_path) -> warnings
    check: Any = None  # presets: (job, Prepared) -> the parity record for train.json; may raise

    def prepare(self, job: TrainJob) -> Prepared:
        """The round's export, the tool's rendered config (presets) and the filled command with
        its environment: everything but running it."""
        here = job.mixture_dir
        data_dir, output_dir = here / "export", here / "trainer-output"
        if not data_dir.is_dir():
            export_mixture(here / "mixture.json", self.export_format, data_dir, absolute=True)
        config_file, warnings = job.config_file, []
        if self.render is not None:
            config_file = here / "trainer.yaml"
            warnings = self.render(job, data_dir, output_dir, config_file)
        values = {
            "model": str(job.base_model.resolve()),
            "data_dir": str(data_dir.resolve()),
            "output_dir": str(output_dir.resolve()),
            "round": str(job.round),
            "run_dir": str(job.run_dir.resolve()),
            "config": str(config_file.resolve()),
        }
        where = "train.command"
        argv = fill(split_command(self.command, where), values, where)
        env = child_environment(values, self.env)
        if self.render is not None:  # a preset: the tool's own directory first on PATH
            env = tool_path(argv, env)
        return Prepared(data_dir, output_dir, config_file, values, argv, env, warnings)

    def train(self, job: TrainJob) -> dict[str, Any]:
        here = job.mixture_dir
        prepared = self.prepare(job)
        values, argv = prepared.values, prepared.argv
        for warning in prepared.warnings:
            log.warning("round %d: %s", job.round, warning)
        attempts = _previous_attempts(here / "train.json")
        record: dict[str, Any] = {
            "backend": self.name,
            "loss": self.loss,
            "data_dir": values["data_dir"],
            "output_dir": values["output_dir"],
            "config": values["config"],
            "warnings": prepared.warnings,
        }
        if self.check is not None:  # a preset's parity check, before anything trains
            try:
                record["parity"] = self.check(job, prepared)
                # the report's trainer warnings: where the tool's rows and masks differ
                record["warnings"] += (record["parity"] or {}).get("warnings", [])
            except IdealError as err:
                record.update(command=argv, exit_code=None, error=str(err).splitlines()[0])
                atomic_write_json(here / "train.json", {**record, "attempts": [*attempts, record]})
                raise
        result = run_command(argv, here / "train.log", prepared.env, self.timeout)
        record.update(result.record())
        output_dir = prepared.output_dir
        try:
            if result.exit_code != 0:
                raise failure(f"round {job.round}: the trainer", result)
            found = find_trained_model(output_dir)
            collect_model(found, job.output_dir, job.base_model)
            note = keep_base_chat_template(job.output_dir, job.base_model)
            found.notes += [note] if note else []
        except IdealError as err:  # the failed attempt is kept in the round's record
            record["error"] = str(err).splitlines()[0]
            atomic_write_json(here / "train.json", {**record, "attempts": [*attempts, record]})
            raise
        record.update(model={"kind": found.kind, "from": str(found.path), "notes": found.notes})
        _write_settings(job.output_dir, record)
        return {**record, "attempts": [*attempts, record]}


@dataclass(frozen=True)
class Prepared:
    """A round of a command trainer, ready to run (CommandTrainer.prepare)."""

    data_dir: Path  # the round's export
    output_dir: Path  # where the tool writes
    config_file: Path  # {config}
    values: dict[str, str]  # the placeholders' values
    argv: list[str]  # the filled command
    env: dict[str, str]  # its environment
    warnings: list[str]  # the renderer's


class ToolNotFound(IdealError):
    """A preset's command names an executable that cannot be found."""


def tool_path(argv: list[str], env: dict[str, str]) -> dict[str, str]:
    """`env` with the directory of the command's executable first on PATH: a tool's virtual
    environment (axolotl starts `accelerate` from PATH). The executable is found on `env`'s PATH
    (train.env's, or this process's), or is the path the command gives; unresolved symlinks keep
    a venv's bin directory (its python links elsewhere)."""
    found = shutil.which(argv[0], path=env.get("PATH", os.defpath))
    if found is None:
        where = (
            "does not exist or is not executable"
            if os.sep in argv[0]
            else f"is not on PATH ({env.get('PATH', '')})"
        )
        raise ToolNotFound(
            f"train.command: {argv[0]!r} {where}: give its full path in train.command (e.g. "
            ".venv-axolotl/bin/axolotl train {config}) or its directory in train.env.PATH "
            "(README: the trainers' virtual environments)"
        )
    bin_dir = os.path.dirname(os.path.abspath(found))
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir]
    return {**env, "PATH": os.pathsep.join([bin_dir, *path])}


def keep_base_chat_template(model_dir: Path, base_model: Path) -> str | None:
    """Put the base model's chat template back where a trainer saved its own with the model
    (LLaMA-Factory's `template: chatml` writes its ChatML). Every round's evaluation and influence
    step render rows with the round model's template, and they must render them as the base model's
    template does, as the parity check did. The vocabulary stays the trainer's. Returns the note
    for train.json, or None when there was nothing to put back."""
    if not (model_dir / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    from ideal.hf import load_tokenizer

    try:
        ours = load_tokenizer(base_model).chat_template
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (IdealError, OSError, ValueError):
        return None
    if tokenizer.chat_template == ours:
        return None
    for name in ("chat_template.jinja", "chat_template.json"):  # a template of none is no file
        (model_dir / name).unlink(missing_ok=True)
    tokenizer.chat_template = ours
    tokenizer.save_pretrained(model_dir)
    return (
        "the trainer saved its own chat template with the model; the base model's was put back, "
        "so that every round renders rows as the base model does"
    )


def _previous_attempts(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return list(read_json(path).get("attempts", []))


def _write_settings(model_dir: Path, record: dict[str, Any]) -> None:
    """model/train_settings.json, as the builtin trainer writes it: the summary reads `seconds`,
    the influence step `loss` and (after a parity check) each domain's target tokens in ideal's
    tokenisation and in the trainer's."""
    settings = {"backend": record["backend"], "loss": record["loss"], "seconds": record["seconds"]}
    parity = record.get("parity")
    if isinstance(parity, dict) and parity.get("domains"):
        settings["target_tokens"] = {
            side: {d: v["target_tokens"][side] for d, v in parity["domains"].items()}
            for side in ("ideal", "trainer")
        }
        settings["trainer_tool"] = parity.get("tool")
    atomic_write_json(model_dir / "train_settings.json", settings)


@dataclass
class CommandEvaluator:
    """An evaluator run as a command; its scores come from {scores}, or from the tool's own
    results under {output_dir} (`parse: lm-eval | opencompass`, with the `tasks` map)."""

    command: str | tuple[str, ...] | list[str] | None
    parse: str = "scores"  # scores | lm-eval | opencompass
    tasks: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None
    name: str = "command"

    def evaluate(self, job: EvalJob) -> dict[str, Score]:
        work = job.work_dir
        work.mkdir(parents=True, exist_ok=True)
        scores = work / "scores.json"
        scores.unlink(missing_ok=True)  # a retry must not read the last attempt's scores
        values = {
            "model": str(job.model_dir.resolve()),
            "base_model": str(job.base_model.resolve()),
            "scores": str(scores.resolve()),
            "output_dir": str(work.resolve()),
            "data_dir": str(job.test_data.resolve()) if job.test_data else "",
            "round": str(job.round),
            "run_dir": str(job.run_dir.resolve()),
            "config": str(job.config_file.resolve()),
        }
        where = "eval.command"
        argv = fill(split_command(self.command, where), values, where)
        result = run_command(
            argv, work.parent / "eval.log", child_environment(values, self.env), self.timeout
        )
        if result.exit_code != 0:
            raise failure(f"round {job.round}: the evaluator", result)
        if self.parse == "lm-eval":
            from ideal.backends.evaluation.lmeval import newest_results, parse_results

            path = newest_results(work)
            return parse_results(read_json(path), self.tasks, str(path))
        if self.parse == "opencompass":
            from ideal.backends.evaluation.opencompass import newest_summary, parse_summary

            return parse_summary(newest_summary(work), self.tasks)
        return read_scores(scores)
