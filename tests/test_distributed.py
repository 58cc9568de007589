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
def test_two_processes_give_the_same_refined_influence_as_one(tmp_path):
    """--refine: each process multiplies its shard of the curvature sample, the products are summed."""
    tiny_model_dir(tmp_path / "model")
    make_data_dir(tmp_path / "train", {"add": qa_rows("add", 13), "mul": qa_rows("mul", 7)})
    make_data_dir(tmp_path / "reference", {"math": qa_rows("sum", 5), "chat": qa_rows("hi", 3)})
    one_and_two_processes(tmp_path, ["influence", "--model", str(tmp_path / "model"), "--train", str(tmp_path / "train"),
                                     "--reference", str(tmp_path / "reference"), "--sample", "1.0", "--batch-size", "4",
                                     "--refine", "3"])  # fmt: skip
    a = json.loads((tmp_path / "one" / "influence.json").read_text())
    b = json.loads((tmp_path / "two" / "influence.json").read_text())
    assert (a["processes"], b["processes"]) == (1, 2)
    np.testing.assert_allclose(np.array(b["scores"]), np.array(a["scores"]), rtol=1e-5)
    (ra,), (rb,) = a["refine"]["residuals"], b["refine"]["residuals"]
    for reference, values in ra.items():  # CG lowers the error's A-norm, not always the residual
        assert len(values) == 4 and np.isfinite(values).all()
        np.testing.assert_allclose(rb[reference], values, rtol=1e-4)


def train_logs(one: Path, two: Path) -> tuple[list[dict], list[dict]]:
    return tuple(
        [json.loads(x) for x in (d / "train_log.jsonl").read_text().splitlines()]
        for d in (one, two)
    )


def adam_step_bound(t: int, beta1: float = 0.9, beta2: float = 0.999) -> float:
    """The largest |m_hat / sqrt(v_hat)| Adam's step t can take, whatever the gradients.

    m_t = (1-b1) sum_s b1^(t-s) g_s and v_t = (1-b2) sum_s b2^(t-s) g_s^2, so by Cauchy-Schwarz
    |m_t| <= (1-b1) sqrt(sum_k (b1^2/b2)^k) sqrt(v_t / (1-b2)); then the bias corrections."""
    geometric = sum((beta1**2 / beta2) ** k for k in range(t))
    return (1 - beta1) / (1 - beta1**t) * ((1 - beta2**t) / (1 - beta2)) ** 0.5 * geometric**0.5


def test_adam_step_bound_is_one_on_the_first_step_and_holds_for_adversarial_gradients():
    import torch

    assert adam_step_bound(1) == pytest.approx(1.0)
    # gradients growing as (b2/b1)^s reach the bound at the last step (Cauchy-Schwarz with equality)
    param = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.Adam([param], lr=1.0, eps=0.0)
    steps = []
    for s in range(1, 13):
        before = float(param.detach())
        param.grad = torch.tensor([-((0.999 / 0.9) ** s)], dtype=torch.float64).float()
        optimizer.step()
        steps.append(float(param.detach()) - before)
        assert 0 < steps[-1] <= adam_step_bound(s) * (1 + 1e-5)
    assert steps[-1] == pytest.approx(adam_step_bound(12), rel=1e-5)


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    """The invariance "2 processes compute the same steps as 1", asserted where round-off is not
    amplified.

    - SGD: the weights. A step moves a weight by lr x its gradient, so a round-off difference in a
      gradient (float32 sums in another order, ~1e-7 x the number of terms) stays at that size.
    - AdamW: each step's loss and gradient norm (aggregates over every weight), and the first step's
      tightly (the same weights on both sides). The weights only within Adam's own step bound:
      Adam divides by sqrt(v), so an element whose gradient is at round-off level can take a
      full-size step of either sign (issue 11: one element of 3296 moved by 3e-5 on another machine).
    """
    tiny_model_dir(tmp_path / "model")
    make_data_dir(tmp_path / "train", {"add": qa_rows("add", 13), "mul": qa_rows("mul", 8)})
    # 5 examples per step: the two processes take 3 and 2 of them (uneven shares)
    common = ["train", "--model", str(tmp_path / "model"), "--train", str(tmp_path / "train"),
              "--max-steps", "12", "--batch-size", "5", "--checkpoint-every", "5"]  # fmt: skip
    from safetensors.torch import load_file

    base = load_file(tmp_path / "model" / "model.safetensors")
    sgd = tmp_path / "sgd"
    one, two = one_and_two_processes(sgd, [*common, "--optimizer", "sgd", "--lr", "0.3"])
    wa, wb = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    moved = 0.0
    ulp = float(np.finfo(np.float32).eps)
    for name in wa:
        w0, w1, w2 = (x[name].double().numpy() for x in (base, wa, wb))
        scale = float(np.abs(w1 - w0).max())
        moved = max(moved, scale)
        # the updates agree to float32 round-off of the gradients (1e-5 of the update: ~1e-7 x
        # the terms summed), plus the rounding of each stored weight (an ulp of |w| per step)
        atol = 1e-5 * scale + 12 * ulp * float(np.abs(w0).max())
        np.testing.assert_allclose(w2 - w0, w1 - w0, rtol=1e-4, atol=atol)
    assert moved > 1e-3  # the check is about weights that trained

    adam = tmp_path / "adamw"
    one, two = one_and_two_processes(adam, [*common, "--lr", "1e-3"])
    log_one, log_two = train_logs(one, two)
    assert [r["step"] for r in log_two] == list(range(1, 13))
    first_a, first_b = log_one[0], log_two[0]
    assert first_b["loss"] == pytest.approx(first_a["loss"], rel=1e-5)
    assert first_b["grad_norm"] == pytest.approx(first_a["grad_norm"], rel=1e-5)
    for a, b in zip(log_one, log_two, strict=True):
        # a weight that flipped at round-off level changes the loss by |its gradient| x its step:
        # round-off x lr, far below these
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    bound = 2 * sum(r["lr"] * adam_step_bound(r["step"]) for r in log_one)
    wa, wb = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    for name in wa:
        assert float((wa[name] - wb[name]).abs().max()) <= bound


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
    # SGD: the loop's comparison of volumes and scores is not about Adam's round-off amplification
    # (test_two_processes_train_like_one checks AdamW's steps where they are comparable)
    overrides = ["train.max_steps=40", "train.optimizer=sgd", "train.lr=0.3",
                 "train.checkpoint_every=0", "suite.hidden_size=16",
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


@pytest.mark.slow
def test_two_processes_train_the_top_blocks_from_the_cache_like_one(tmp_path):
    """`ideal train --top-layers 1 --lora` under torchrun: the main process fills the feature cache
    beside the output, the other reads it; SGD steps give the same adapter as one process (the
    round-off argument of test_two_processes_train_like_one)."""
    from safetensors.torch import load_file

    tiny_model_dir(tmp_path / "model")
    make_data_dir(tmp_path / "train", {"add": qa_rows("add", 13), "mul": qa_rows("mul", 8)})
    args = ["train", "--model", str(tmp_path / "model"), "--train", str(tmp_path / "train"),
            "--max-steps", "6", "--batch-size", "5", "--top-layers", "1", "--lora",
            "--optimizer", "sgd", "--lr", "0.3"]  # fmt: skip
    one, two = one_and_two_processes(tmp_path, args)
    for out in (one, two):  # one fill, written once, beside each output
        assert len(list(out.with_name(out.name + ".features").rglob("fill-*.safetensors"))) == 1
    wa = load_file(one / "adapter_model.safetensors")
    wb = load_file(two / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(".layers.1." in name for name in wa)
    ulp = float(np.finfo(np.float32).eps)
    for name in wa:
        a, b = wa[name].double().numpy(), wb[name].double().numpy()
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max() + 12 * ulp)
