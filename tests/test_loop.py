"""The closed loop on a tiny config: artifacts per SPEC.md, resume after a kill, report, demo."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ideal.run.config import load_config
from ideal.run.loop import run_loop

TINY = """
suite:
  domains:
    - {name: add, task: add, pool: 60, volume: 40}
    - {name: reverse, task: reverse, pool: 60, volume: 20}
    - {name: reverse_alt, task: reverse, pool: 60, volume: 40, conflict: true}
  capabilities: [add, reverse]
  reference_size: 8
  test_size: 8
  hidden_size: 16
  num_layers: 1
  num_heads: 2
  intermediate_size: 32
rounds: 2
# one thread: the resumed run must equal the uninterrupted one bit for bit, and with several
# threads a reduction's order (hence its last bit) may change between two processes
train: {max_steps: 30, lr: 0.003, batch_size: 8, checkpoint_every: 10, threads: 1}
influence: {batch_size: 16}
# round 1 is docs/method.md's step (not the default uniform probe nor the measured candidate
# steps, tests/test_step.py): these tests check that step, whole (no noise threshold)
update: {step: 0.3, first_round: ideal, candidates: [], min_z: 0.0}
eval: {max_new_tokens: 6}
"""


def json_without(path: Path, *keys: str) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in keys}


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="module")
def finished(tiny_config, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "whole"
    summary = run_loop(load_config(tiny_config), run).to_json()
    return run, summary


def test_run_directory_follows_the_spec(finished):
    run, summary = finished
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    for k in range(3):
        here = run / f"round-{k}"
        manifest = json.loads((here / "mixture.json").read_text())
        assert {"volume", "unique", "max_repeats"} <= set(manifest["domains"]["add"]) and manifest[
            "seed"
        ] == 0
        assert manifest["pool"]["files"] and (here / "data" / "add" / "data.jsonl").is_file()
        assert (here / "model" / "model.safetensors").is_file()
        metrics = json.loads((here / "metrics.json").read_text())
        assert set(metrics["capabilities"]["add"]) >= {
            "reference_loss",
            "test_loss",
            "test_accuracy",
        }
        # eval.reference_accuracy auto under select reference_loss: no decoding of the references
        assert "reference_accuracy" not in metrics["capabilities"]["add"]
        assert metrics["reference_accuracy_mean"] is None
        assert (here / "influence.json").is_file() == (k < 2)
    first, second = summary["rounds"][0], summary["rounds"][1]
    assert first["volumes"] == {"add": 40, "reverse": 20, "reverse_alt": 40}
    assert sum(second["volumes"].values()) == 100  # keep_total
    assert (
        first["predicted_reference_loss_change"] is None
        and second["predicted_reference_loss_change"] is not None
    )
    assert second["realised_reference_loss_change"] == pytest.approx(
        second["reference_loss_mean"] - first["reference_loss_mean"]
    )
    # the volumes follow the influence: beta of round 0's influence.json, after rounding
    influence = json.loads((run / "round-0" / "influence.json").read_text())
    assert influence["step"] == 0.3  # the run's m (update.step), not a fixed 0.15
    beta = influence["beta"]  # keep_total rescales (1 + beta): the order of the changes stays
    ratio = {d: second["volumes"][d] / first["volumes"][d] for d in beta}
    assert max(beta, key=beta.get) == max(ratio, key=ratio.get)
    assert min(beta, key=beta.get) == min(ratio, key=ratio.get)
    losses = [r["reference_loss_mean"] for r in summary["rounds"]]
    assert summary["select"] == "reference_loss"  # the default
    assert summary["selected_round"] == losses.index(min(losses))
    assert json.loads((run / "summary.json").read_text()) == summary
    html = (run / "report.html").read_text()
    assert f"Returned: <b>round {summary['selected_round']}</b>" in html
    # self-contained: every plot inline (the page survives being mailed alone), none by path
    for image in (
        "volumes.png",
        "accuracy.png",
        "reference_loss.png",
        "prediction.png",
        "round-0/influence.png",
    ):
        inline = base64.b64encode((run / image).read_bytes()).decode("ascii")
        assert f'src="data:image/png;base64,{inline}"' in html
    assert re.findall(r'src="(?!data:)', html) == []
    # the returned round is marked, with its shares and the next step
    selected = summary["rounds"][summary["selected_round"]]
    total = sum(selected["volumes"].values())
    for domain, volume in selected["volumes"].items():
        assert f"{domain} {volume} ({100 * volume / total:.0f} %)" in html
    assert html.count("<tr class=returned>") == 1 and f"ideal export --run {run}" in html
    assert "Predicted vs realised" in html
    assert not re.search(r"<td>-?\d+\.\d{4,}</td>", html)  # numbers rounded for reading


def test_a_changed_config_on_resume_is_an_error(finished, tiny_config, cli):
    run, _ = finished
    result = cli("run", tiny_config, "rounds=3", "--out", run, "--resume")
    assert result.code == 1 and "config changed" in result.err and "(rounds)" in result.err
    result = cli("run", tiny_config, "--out", run)
    assert result.code == 1 and "--resume" in result.err


def test_a_run_from_before_an_option_existed_resumes(finished, tiny_config, tmp_path):
    """A run started before `update.trust_region` and `select` existed (its config.yaml lacks
    them) resumes while they stay at their defaults, and refuses once one is set."""
    import shutil

    import yaml

    from ideal.errors import IdealError

    run = tmp_path / "older"
    shutil.copytree(finished[0], run)
    stored = yaml.safe_load((run / "config.yaml").read_text())
    del stored["select"], stored["update"]["trust_region"], stored["update"]["first_round"]
    stored["hash"] = "from-an-older-ideal"
    (run / "config.yaml").write_text(yaml.safe_dump(stored, sort_keys=False))
    assert run_loop(load_config(tiny_config), run, resume=True).to_json() == finished[1]
    with pytest.raises(IdealError, match=r"\(update.trust_region\)"):
        run_loop(load_config(tiny_config, ["update.trust_region=true"]), run, resume=True)
    # an option whose default changed what a run does: a run from before it took the old way
    # (first_round: ideal), so today's default (the uniform probe) is a change, named
    with pytest.raises(IdealError, match=r"\(update.first_round\)"):
        run_loop(load_config(tiny_config, ["update.first_round=uniform"]), run, resume=True)


def test_killed_after_the_first_training_resumes_to_the_same_artifacts(
    finished, tiny_config, tmp_path
):
    whole, _ = finished
    run = tmp_path / "killed"
    args = [sys.executable, "-m", "ideal", "run", str(tiny_config), "--out", str(run)]
    env = dict(os.environ)  # the suite's thread count (tests/conftest.py)
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while (
        not (run / "round-0" / "model").is_dir()
        and time.time() < deadline
        and process.poll() is None
    ):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (run / "round-0" / "model").is_dir() and not (run / "summary.json").exists()
    stamp = (run / "round-0" / "model" / "model.safetensors").stat().st_mtime_ns

    resumed = subprocess.run(
        [*args, "--resume"], env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert (
        run / "round-0" / "model" / "model.safetensors"
    ).stat().st_mtime_ns == stamp  # not retrained
    for k in range(3):
        a, b = whole / f"round-{k}", run / f"round-{k}"
        assert json_without(a / "mixture.json", "pool") == json_without(b / "mixture.json", "pool")
        assert json_without(a / "metrics.json", "seconds") == json_without(
            b / "metrics.json", "seconds"
        )
        assert (a / "model" / "model.safetensors").read_bytes() == (
            b / "model" / "model.safetensors"
        ).read_bytes()
    assert (
        json_without(whole / "round-0" / "influence.json", "seconds", "model", "train")["scores"]
        == (json_without(run / "round-0" / "influence.json", "seconds", "model", "train")["scores"])
    )


def test_report_command_rewrites_the_report(finished, cli):
    run, _ = finished
    (run / "report.html").unlink()
    result = cli("report", run)
    assert result.code == 0 and (run / "report.html").is_file()
    assert cli("report", run / "round-0").code == 1


@pytest.mark.slow
def test_demo_quick(cli, tmp_path):
    result = cli("demo", "--quick", "--out", tmp_path / "demo")
    assert result.code == 0, result.err
    assert "round 0" in result.out and "report:" in result.out
    assert "mean test loss" in result.out  # held out, beside accuracy, every round
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert len(summary["rounds"]) == 2 and summary["rounds"][0]["test_accuracy_mean"] is not None
    selected = summary["rounds"][summary["selected_round"]]
    kind = "D0" if selected["round"] == 0 else f"ideal step from round {selected['from_round']}"
    assert f"returned: round {selected['round']} ({kind}; select: reference_loss)" in result.out
    shares = ", ".join(
        f"{d} {v} ({100 * v / sum(selected['volumes'].values()):.0f} %)"
        for d, v in selected["volumes"].items()
    )
    assert f"volumes: {shares}" in result.out
    assert f"ideal export --run {tmp_path / 'demo'} --format" in result.out
