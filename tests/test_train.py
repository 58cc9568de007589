"""SFT: a tiny model learns, batch splitting does not matter, kill-and-resume, LoRA, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ideal.backends.evaluation.evaluate import evaluate_capability
from ideal.backends.training.builtin import (
    TrainSettings,
    micro_batch_loss,
    step_examples,
    step_loss_normaliser,
    train_model,
)
from ideal.data.rows import load_domains, tokenize_examples
from ideal.hf import load_causal_lm
from ideal.tiny import char_tokenizer, save_model_dir, tiny_causal_lm
from tests.helpers import make_data_dir, tokenize_pairs
from tests.test_cli import assert_one_line_error


def reversal_rows(n: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    words = ["".join(rng.choice("abcd") for _ in range(3)) for _ in range(n)]
    return [{"prompt": w, "completion": w[::-1], "answer": w[::-1]} for w in words]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    tokenizer = char_tokenizer()
    save_model_dir(
        root / "base", tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=0), tokenizer
    )
    make_data_dir(root / "train", {"rev": reversal_rows(400, 0)})
    make_data_dir(root / "test", {"rev": reversal_rows(40, 1)})
    return root


def test_a_tiny_model_learns_a_toy_task(workspace):
    tokenizer = char_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=0)
    examples = load_domains(workspace / "train")["rev"].examples
    items, _ = tokenize_examples(examples, tokenizer)
    settings = TrainSettings(epochs=8, lr=3e-3, batch_size=16, checkpoint_every=0)
    result = train_model(model, items, settings, tokenizer.pad_token_id)
    assert result.log[-1]["loss"] < 0.2 < result.log[0]["loss"]
    test = load_domains(workspace / "test")["rev"]
    scored = evaluate_capability(result.model, tokenizer, test, "exact")
    assert scored.accuracy >= 0.9  # chance: 1/64 (or less: outputs are not restricted to 3 letters)


@pytest.mark.parametrize("normalization", ["example", "token"])
def test_batch_of_8_equals_8_accumulated_micro_batches(normalization):
    """In float64: the splits pad to other lengths and sum in another order, so float32 would
    differ by round-off of ~1e-7 x the number of terms, a tolerance that depends on the kernels."""
    tokenizer = char_tokenizer()
    items = tokenize_pairs(
        tokenizer, [(f"q{i}" * (i % 3 + 1), "ab"[: i % 2 + 1]) for i in range(8)]
    )
    grads, losses = [], []
    for batch_size, accum in ((8, 1), (1, 8), (3, 3)):
        model = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=0).double()
        settings = TrainSettings(
            batch_size=batch_size, grad_accum=accum, loss_normalization=normalization
        )
        chosen = items[:8]
        normaliser = step_loss_normaliser(chosen, settings)
        total = 0.0
        for s in range(0, 8, batch_size):
            loss, _ = micro_batch_loss(model, chosen[s : s + batch_size], 0, normaliser, settings)
            loss.backward()
            total += float(loss.detach())
        losses.append(total)
        grads.append([p.grad.clone() for p in model.parameters()])
    for other_loss, other in zip(losses[1:], grads[1:], strict=True):
        assert other_loss == pytest.approx(losses[0], rel=1e-12)
        for a, b in zip(grads[0], other, strict=True):
            scale = float(a.abs().max())
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12 * scale)


def test_data_order_is_seeded_and_covers_every_example_each_epoch():
    settings = TrainSettings(batch_size=4, grad_accum=2, seed=3)
    seen = [i for step in range(5) for i in step_examples(step, 10, settings)]  # 40 = 4 epochs
    for epoch in range(4):
        assert sorted(seen[epoch * 10 : (epoch + 1) * 10]) == list(range(10))
    assert seen == [i for step in range(5) for i in step_examples(step, 10, settings)]
    assert seen != [
        i for step in range(5) for i in step_examples(step, 10, replace(settings, seed=4))
    ]


def run_train_cli(workspace: Path, out: Path, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "ideal", "train", "--model", str(workspace / "base"), "--train",
            str(workspace / "train"), "--out", str(out), "--max-steps", "400", "--batch-size", "4",
            "--lr", "1e-3", "--checkpoint-every", "10", "--threads", os.environ["OMP_NUM_THREADS"], *extra]  # fmt: skip
    env = dict(os.environ)  # the suite's thread count (tests/conftest.py)
    return subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_kill_and_resume_gives_the_same_weights(workspace, tmp_path):
    reference = run_train_cli(workspace, tmp_path / "whole")
    assert reference.wait(timeout=300) == 0, reference.stderr.read()

    killed = run_train_cli(workspace, tmp_path / "resumed")
    checkpoint = tmp_path / "resumed.partial" / "checkpoint" / "state.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and killed.poll() is None:
        time.sleep(0.02)
    # kill at once: on an idle machine the remaining steps can take well under a second
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "resumed").exists(), "the run finished before it could be killed"
    step = torch.load(checkpoint, weights_only=False)["step"]
    assert 10 <= step < 400

    refused = run_train_cli(workspace, tmp_path / "resumed")
    assert refused.wait(timeout=300) != 0 and "--resume" in refused.stderr.read()
    resumed = run_train_cli(workspace, tmp_path / "resumed", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert not (tmp_path / "resumed.partial").exists()

    a = load_file(tmp_path / "whole" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [
        json.loads(line)
        for line in (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in log] == list(range(1, 401))
    assert set(log[0]) == {"step", "loss", "lr", "grad_norm", "tokens_per_s"}


def test_lora_changes_only_adapter_weights_and_saves_a_loadable_adapter(cli, workspace, tmp_path):
    result = cli("train", "--model", workspace / "base", "--train", workspace / "train", "--out", tmp_path / "lora",
                 "--lora", "--lora-r", "4", "--max-steps", "20", "--lr", "1e-2", "--batch-size", "8")  # fmt: skip
    assert result.code == 0, result.err
    files = {p.name for p in (tmp_path / "lora").iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
    } <= files and "model.safetensors" not in files
    base = load_causal_lm(workspace / "base")
    tuned = load_causal_lm(tmp_path / "lora")
    merged = tuned.merge_and_unload()
    base_state, tuned_state = base.state_dict(), merged.state_dict()
    linear = [k for k in base_state if k.endswith("proj.weight")]
    assert any(
        not torch.equal(base_state[k], tuned_state[k]) for k in linear
    )  # the adapter did something
    others = [k for k in base_state if not k.endswith("proj.weight")]
    assert all(
        torch.equal(base_state[k], tuned_state[k]) for k in others
    )  # embeddings, norms, head untouched
    adapter = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)


def test_train_errors_are_one_line(cli, workspace, tmp_path):
    assert_one_line_error(
        cli(
            "train",
            "--model",
            tmp_path / "nope",
            "--train",
            workspace / "train",
            "--out",
            tmp_path / "o",
        ),
        "model directory not found",
    )
    (tmp_path / "exists").mkdir()
    assert_one_line_error(
        cli(
            "train",
            "--model",
            workspace / "base",
            "--train",
            workspace / "train",
            "--out",
            tmp_path / "exists",
        ),
        "already exists",
    )


@pytest.mark.parametrize(
    ("target", "message"),
    [
        # what torch.save and safetensors raise on a full disk: no OSError, no errno
        (
            "checkpoint",
            "[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed "
            "writing file data/0: file write failed",
        ),  # fmt: skip
        (
            "model",
            "Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
            '"No space left on device" })',
        ),  # fmt: skip
    ],
)
def test_a_full_disk_while_saving_is_one_line_and_leaves_no_half_file(
    cli, workspace, tmp_path, monkeypatch, target, message
):
    import transformers.modeling_utils

    def full(*args, **kwargs):
        raise RuntimeError(message)

    if target == "checkpoint":
        monkeypatch.setattr(torch, "save", full)
    else:  # transformers imported safetensors' save_file under this name
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    out = tmp_path / "m"
    result = cli("train", "--model", workspace / "base", "--train", workspace / "train",
                 "--out", out, "--max-steps", "3", "--checkpoint-every", "1")  # fmt: skip
    # progress lines come before it on stderr (no terminal); the error is one line, the last
    assert result.code == 1 and "Traceback" not in result.err
    last = result.err.strip().splitlines()[-1]
    assert last.startswith("ideal: error: ") and "cannot write" in last and "disk full" in last
    assert not out.exists()
    if target == "checkpoint":
        assert "state.pt" in last
        assert not list((tmp_path / "m.partial").rglob("*.tmp"))
    else:
        assert not (tmp_path / "m.partial" / "final").exists()
