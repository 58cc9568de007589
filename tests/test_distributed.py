"""Several processes: `ideal influence` and `ideal train` under torchrun (2 CPU processes, gloo)
equal 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ideal.tiny import char_tokenizer, save_model_dir, tiny_causal_lm
from tests.helpers import make_data_dir, qa_rows


def one_and_two_processes(tmp_path: Path, args: list[str]) -> tuple[Path, Path]:
    """Run `ideal ARGS --out tmp/one` in one process and under torchrun with 2 (gloo) into tmp/two."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launchers = {
        "one": [sys.executable, "-m", "ideal"],
        "two": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "ideal",
        ],
    }
    for name, launcher in launchers.items():
        done = subprocess.run(
            [*launcher, *args, "--out", str(tmp_path / name)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
    return tmp_path / "one", tmp_path / "two"


def tiny_model_dir(path: Path) -> Path:
    tokenizer = char_tokenizer()
    return save_model_dir(
        path, tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=3), tokenizer
    )


@pytest.mark.slow
def test_two_processes_give_the_same_influence_as_one(tmp_path):
    tiny_model_dir(tmp_path / "model")
    # odd sizes: the two shards are uneven
    make_data_dir(
        tmp_path / "train",
        {"add": qa_rows("add", 13), "mul": qa_rows("mul", 7), "sub": qa_rows("sub", 3)},
    )
    make_data_dir(tmp_path / "reference", {"math": qa_rows("sum", 5), "chat": qa_rows("hi", 3)})
    one_and_two_processes(tmp_path, ["influence", "--model", str(tmp_path / "model"), "--train", str(tmp_path / "train"),
                                     "--reference", str(tmp_path / "reference"), "--sample", "1.0", "--batch-size", "2"])  # fmt: skip
    a = json.loads((tmp_path / "one" / "influence.json").read_text())
    b = json.loads((tmp_path / "two" / "influence.json").read_text())
    assert (a["processes"], b["processes"]) == (1, 2)
    np.testing.assert_allclose(np.array(b["scores"]), np.array(a["scores"]), rtol=1e-5)
    assert b["tokens"] == a["tokens"] and b["sampled_weight"] == a["sampled_weight"]
    for name, value in a["damping"]["per_layer"].items():
        assert b["damping"]["per_layer"][name] == pytest.approx(value, rel=1e-5)
    assert b["reference_loss"] == pytest.approx(a["reference_loss"], rel=1e-6)


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    tiny_model_dir(tmp_path / "model")
    make_data_dir(tmp_path / "train", {"add": qa_rows("add", 13), "mul": qa_rows("mul", 8)})
    # 5 examples per step: the two processes take 3 and 2 of them (uneven shares)
    one_and_two_processes(tmp_path, ["train", "--model", str(tmp_path / "model"), "--train", str(tmp_path / "train"),
                                     "--max-steps", "12", "--batch-size", "5", "--lr", "1e-3", "--checkpoint-every", "5"])  # fmt: skip
    log_one = [
        json.loads(x) for x in (tmp_path / "one" / "train_log.jsonl").read_text().splitlines()
    ]
    log_two = [
        json.loads(x) for x in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in log_two] == list(range(1, 13))
    for a, b in zip(log_one, log_two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    from safetensors.torch import load_file

    wa, wb = (
        load_file(tmp_path / "one" / "model.safetensors"),
        load_file(tmp_path / "two" / "model.safetensors"),
    )
    for name in wa:
        np.testing.assert_allclose(wb[name].numpy(), wa[name].numpy(), rtol=1e-4, atol=1e-5)


def test_eigendecompositions_are_spread_by_cost():
    from ideal.distributed import owners

    # largest first, each to the least loaded process
    assert owners([8.0, 1.0, 1.0, 1.0, 7.0], 2) == [0, 1, 0, 1, 1]  # loads 9 and 9
    assert owners([1.0, 1.0, 1.0], 1) == [0, 0, 0]
    assert sorted(owners([5.0] * 4, 4)) == [0, 1, 2, 3]


@pytest.mark.slow
def test_two_processes_run_the_loop_like_one(tmp_path):
    """`ideal run` under torchrun: training (DDP) and influence (shards) on both processes, files
    from the main one; the rounds equal those of one process."""
    from importlib.resources import files

    config = str(files("ideal") / "configs" / "demo-quick.yaml")
    overrides = ["train.max_steps=40", "train.checkpoint_every=0", "suite.hidden_size=16",
                 "suite.intermediate_size=32", "rounds=1", "update.step=0.3"]  # fmt: skip
    one, two = one_and_two_processes(tmp_path, ["run", config, *overrides])
    a = json.loads((one / "summary.json").read_text())["rounds"]
    b = json.loads((two / "summary.json").read_text())["rounds"]
    assert len(a) == len(b) == 2
    assert [r["volumes"] for r in b] == [r["volumes"] for r in a]
    assert a[1]["volumes"] != a[0]["volumes"]  # the influence step moved the mixture
    for x, y in zip(a, b, strict=True):
        assert y["reference_loss"] == pytest.approx(x["reference_loss"], rel=1e-3)
    sa = json.loads((one / "round-0" / "influence.json").read_text())
    sb = json.loads((two / "round-0" / "influence.json").read_text())
    np.testing.assert_allclose(sb["scores"], sa["scores"], rtol=1e-3)
    assert (two / "report.html").is_file() and not list(two.glob("**/*.partial"))
