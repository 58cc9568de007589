"""The real entry point in a subprocess (`python -m ideal`, the `ideal` script, torchrun, accelerate
launch): usage errors in the framework's short form with exit code 2, Ctrl-C as one line with exit
code 130, and an interrupted `ideal run` that `--resume` continues."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

import pytest

IDEAL = [sys.executable, "-m", "ideal"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
QUICK = str(files("ideal") / "configs" / "demo-quick.yaml")


def ideal(cwd: Path, *args: str, launcher: list[str] = IDEAL) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*launcher, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300
    )


def assert_usage_error(done: subprocess.CompletedProcess, command: str, *needles: str) -> None:
    """click's short form: the usage line, the hint, then one line saying what is wrong."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 4, done.stderr
    assert lines[0].startswith(f"Usage: {command} [OPTIONS]")
    assert lines[1] == f"Try '{command} --help' for help."
    assert lines[2] == "" and lines[3].startswith("Error: ")
    for needle in needles:
        assert needle in lines[3], lines[3]


USAGE_ERRORS = {
    # unknown option, with the near-miss the framework suggests
    "unknown option": (["influence", "--modle", "m"], "ideal influence",
                       ["No such option: --modle", "--model"]),
    "missing option": (["train", "--model", "m", "--out", "o"], "ideal train",
                       ["Missing option '--train'"]),
    "bad type": (["train", "--model", "m", "--train", "t", "--out", "o", "--epochs", "abc"],
                 "ideal train", ["Invalid value for '--epochs'"]),
    "bad choice": (["influence", "--model", "m", "--train", "t", "--reference", "r",
                    "--curvature", "magic"], "ideal influence",
                   ["Invalid value for '--curvature'", "'magic' is not one of", "'ekfac'"]),
    "unknown command": (["trian"], "ideal", ["No such command 'trian'", "Did you mean 'train'?"]),
    "override syntax": (["run", QUICK, "rounds", "--out", "o"], "ideal run",
                        ["KEY=VALUE override", "'rounds' is not of the form key=value"]),
    "override key": (["run", QUICK, "bogus=3", "--out", "o"], "ideal run",
                     ["KEY=VALUE override", "unknown key 'bogus'"]),
    "override value": (["run", QUICK, "rounds=two", "--out", "o"], "ideal run",
                       ["KEY=VALUE override", "rounds: expected int, got 'two'"]),
}  # fmt: skip


@pytest.mark.parametrize("kind", USAGE_ERRORS)
def test_usage_errors_are_short_with_exit_code_2(tmp_path, kind):
    args, command, needles = USAGE_ERRORS[kind]
    assert_usage_error(ideal(tmp_path, *args), command, *needles)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the run directory


def test_a_fault_of_the_config_file_itself_stays_a_one_line_error(tmp_path):
    (tmp_path / "c.yaml").write_text("rounds: 1\nbogus: 2\n")
    done = ideal(tmp_path, "run", "c.yaml", "rounds=2", "--out", "o")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ideal: error: config: unknown key 'bogus'")


def test_the_console_script_gives_the_same_short_form(tmp_path):
    script = Path(sys.executable).with_name("ideal")
    assert script.is_file(), "the package is installed with its console script (pyproject.toml)"
    done = ideal(tmp_path, "train", "--modle", "m", launcher=[str(script)])
    assert_usage_error(done, "ideal train", "No such option: --modle", "--model")


LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", "2", "-m", "ideal"],
    # --quiet: from accelerate 1.16 the launcher's own traceback quotes the child's stderr tail,
    # which would count our message twice; the child's stderr still passes through unchanged
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--quiet",
                   "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                   "--dynamo_backend", "no", "-m", "ideal"],
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_under_a_launcher_only_the_main_process_prints_the_usage_error(tmp_path, launcher):
    done = ideal(tmp_path, "train", "--modle", "m", launcher=LAUNCHERS[launcher])
    # the launcher reports the failed child its own way (with its own traceback); ours is once
    assert done.returncode != 0
    assert done.stderr.count("Usage: ideal train [OPTIONS]") == 1, done.stderr
    assert done.stderr.count("Error: No such option: --modle") == 1, done.stderr
    assert "ideal/cli.py" not in done.stderr and "typer" not in done.stderr, done.stderr


MAX_STEPS = 40
SMALL = [f"train.max_steps={MAX_STEPS}", "train.checkpoint_every=5", "train.batch_size=8",
         "suite.hidden_size=16", "suite.intermediate_size=32", "suite.reference_size=8",
         "suite.test_size=8", "eval.max_new_tokens=4", "rounds=0"]  # fmt: skip


def default_sigint() -> None:
    # a child of a shell without job control inherits SIGINT ignored; Ctrl-C must reach it
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_ctrl_c_during_run_is_one_line_and_resume_continues(tmp_path):
    run = tmp_path / "run"
    args = [*IDEAL, "run", QUICK, *SMALL, "--out", str(run)]
    process = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=default_sigint)  # fmt: skip
    checkpoint = run / "round-0" / "model.partial" / "checkpoint" / "state.pt"
    deadline = time.time() + 180
    while not checkpoint.is_file() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before its first checkpoint"
    process.send_signal(signal.SIGINT)  # what Ctrl-C sends
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err + out
    assert err.splitlines()[-1] == "ideal: interrupted"
    assert err.count("interrupted") == 1
    # nothing half-written: no model of the round, no metrics, no temporary files
    assert not (run / "round-0" / "model").exists()
    assert not (run / "round-0" / "metrics.json").exists()
    assert not [p for p in run.rglob(".*") if p.name.endswith(".tmp")]

    resumed = subprocess.run([*args, "--resume"], env=ENV, capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step" in resumed.stderr  # from the checkpoint, not from scratch
    log = (run / "round-0" / "model" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == list(range(1, MAX_STEPS + 1))
    assert [r["round"] for r in json.loads((run / "summary.json").read_text())["rounds"]] == [0]
    assert not list(run.rglob("*.partial"))
