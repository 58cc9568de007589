"""`ideal influence` on disk: files per SPEC.md, determinism, two model families, LoRA, user errors."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from peft import LoraConfig, get_peft_model

from ideal.errors import IdealError
from ideal.tiny import char_tokenizer, save_model_dir, tiny_causal_lm
from tests.helpers import make_data_dir, qa_rows
from tests.test_cli import assert_one_line_error


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("influence")
    tokenizer = char_tokenizer()
    for family in ("llama", "qwen2"):
        save_model_dir(
            root / family, tiny_causal_lm(family, vocab_size=len(tokenizer), seed=1), tokenizer
        )
    make_data_dir(
        root / "train",
        {"add": qa_rows("add", 9), "mul": qa_rows("mul", 7), "sub": qa_rows("sub", 5)},
    )
    make_data_dir(root / "reference", {"math": qa_rows("sum", 4), "chat": qa_rows("hello", 3)})
    return root


def run(cli, workspace, out, *extra, model="llama"):
    return cli(
        "influence", "--model", workspace / model, "--train", workspace / "train",
        "--reference", workspace / "reference", "--out", out, *extra,
    )  # fmt: skip


def test_influence_writes_json_csv_and_heatmap(cli, workspace, tmp_path):
    result = run(cli, workspace, tmp_path / "out")
    assert result.code == 0, result.err
    assert "dQ/dbeta" in result.out
    doc = json.loads((tmp_path / "out" / "influence.json").read_text())
    assert doc["domains"] == ["add", "mul", "sub"] and doc["references"] == ["chat", "math"]
    scores = np.array(doc["scores"])
    assert scores.shape == (2, 3) and np.isfinite(scores).all()
    assert doc["volumes"] == {"add": 9, "mul": 7, "sub": 5}
    assert doc["sampled_weight"] == {"add": 5.0, "mul": 4.0, "sub": 3.0}  # ceil(0.5 x volume)
    assert doc["curvature"] == "ekfac" and doc["fisher"] == "sampled"
    assert doc["damping"]["relative"] == 0.1 and len(doc["damping"]["per_layer"]) == 6
    assert all(".mlp." in name for name in doc["layers"]) and len(doc["layers"]) == 6
    # sensitivities and beta follow docs/method.md from the scores and volumes in the same file
    share = np.array([9, 7, 5]) / 21
    alpha = -share * scores.mean(0)
    assert [doc["sensitivity"][d] for d in doc["domains"]] == pytest.approx(alpha.tolist())
    # the CLI adds the beta of an IDEAL step at m = --step (0.15); the step is not the engine's
    assert max(abs(b) for b in doc["beta"].values()) == pytest.approx(0.15)
    assert "step" not in doc["objective"]
    assert set(doc["seconds"]) >= {
        "references",
        "curvature_covariances",
        "eigendecomposition",
        "curvature_eigenvalue_correction",
        "precondition",
        "domains",
        "total",
    }
    # every score with its standard error and the copies it used; the curvature sample (default
    # 128 copies) holds the whole 21-copy mixture here
    stderr = np.array(doc["stderr"])
    assert stderr.shape == (2, 3) and (stderr > 0).all()
    assert doc["examples"] == {"add": 5.0, "mul": 4.0, "sub": 3.0}
    assert doc["curvature_examples"] == 21.0 and doc["groups"] == [doc["layers"]]
    assert "+-" in result.out
    rows = list(csv.reader((tmp_path / "out" / "influence.csv").read_text().splitlines()))
    assert rows[0] == ["reference", "add", "mul", "sub"]
    assert [[float(x) for x in row[1:]] for row in rows[1:]] == doc["scores"]
    assert (tmp_path / "out" / "influence.png").read_bytes()[:4] == b"\x89PNG"

    assert run(cli, workspace, tmp_path / "again").code == 0
    assert (
        json.loads((tmp_path / "again" / "influence.json").read_text())["scores"] == doc["scores"]
    )

    # the file drives `ideal reweight` as it is
    reweighted = cli(
        "reweight",
        "--train",
        workspace / "train",
        "--influence",
        tmp_path / "out" / "influence.json",
        "--out",
        tmp_path / "mix",
        "--no-keep-total",
    )
    assert reweighted.code == 0, reweighted.err
    manifest = json.loads((tmp_path / "mix" / "mixture.json").read_text())
    for d, beta in doc["beta"].items():
        assert manifest["domains"][d]["volume"] == math.floor(doc["volumes"][d] * (1 + beta) + 0.5)


def test_options_change_what_they_say(cli, workspace, tmp_path):
    result = run(cli, workspace, tmp_path / "o", "--curvature", "kfac", "--fisher", "empirical", "--layers",
                 "*.down_proj", "--damping-abs", "0.01", "--sample", "1.0", "--objective", "worst", "--model", workspace / "qwen2")  # fmt: skip
    assert result.code == 0, result.err
    doc = json.loads((tmp_path / "o" / "influence.json").read_text())
    assert doc["layers"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert doc["damping"]["per_layer"] == {name: 0.01 for name in doc["layers"]}
    assert doc["sampled_weight"] == {"add": 9.0, "mul": 7.0, "sub": 5.0}
    worst = max(doc["reference_loss"], key=doc["reference_loss"].get)
    assert doc["objective"]["weights"][worst] == 1.0
    # where the sums live changes nothing in the result (on this CPU machine, the same memory)
    on_device = run(cli, workspace, tmp_path / "d", "--curvature", "kfac", "--fisher", "empirical", "--layers",
                    "*.down_proj", "--damping-abs", "0.01", "--sample", "1.0", "--objective", "worst",
                    "--model", workspace / "qwen2", "--factors", "device")  # fmt: skip
    assert on_device.code == 0, on_device.err
    moved = json.loads((tmp_path / "d" / "influence.json").read_text())
    assert moved["settings"]["factors"] == "device" and doc["settings"]["factors"] == "cpu"
    np.testing.assert_allclose(moved["scores"], doc["scores"], rtol=1e-12)


def test_lora_model_uses_the_adapter_weights(cli, workspace, tmp_path):
    tokenizer = char_tokenizer()
    base = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    peft_model = get_peft_model(base, config)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # a trained adapter: B is no longer zero
            param.data.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(workspace / "llama")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config))
    result = cli(
        "influence", "--model", tmp_path / "adapter", "--train", workspace / "train",
        "--reference", workspace / "reference", "--out", tmp_path / "o",
    )  # fmt: skip
    assert result.code == 0, result.err
    doc = json.loads((tmp_path / "o" / "influence.json").read_text())
    assert len(doc["layers"]) == 8 and all(
        ".lora_A." in n or ".lora_B." in n for n in doc["layers"]
    )
    assert np.isfinite(np.array(doc["scores"])).all() and np.abs(np.array(doc["scores"])).sum() > 0


def test_user_errors_are_one_line_and_write_nothing(cli, workspace, tmp_path):
    out = tmp_path / "o"
    assert_one_line_error(cli("influence", "--model", workspace / "llama", "--train", tmp_path / "nope",
                              "--reference", workspace / "reference", "--out", out), "nope: not a directory")  # fmt: skip
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    assert_one_line_error(
        run(cli, workspace, out, model=tmp_path / "vit"), "not a causal language model"
    )
    assert_one_line_error(
        run(cli, workspace, out, "--layers", "*.nothing_here"),
        "no linear layer (nn.Linear or Conv1D) matches",
    )
    assert_one_line_error(run(cli, workspace, out, "--curvature", "exact"), "above the limit")
    assert_one_line_error(run(cli, workspace, out, "--sample", "0"), "(--sample) must be in (0, 1]")
    usage = run(cli, workspace, out, "--factors", "gpu")  # a choice: the framework's usage error
    assert usage.code == 2 and "'gpu' is not one of 'cpu', 'device'" in usage.err
    assert not out.exists()


def test_default_bounded_scores_agree_with_the_full_computation_within_3_standard_errors(
    cli, workspace, tmp_path
):
    """Default: half of each domain (at most 64 copies), curvature on at most 128 copies (here all
    120); full: every copy. The difference is domain sampling alone, which the errors describe."""
    make_data_dir(
        tmp_path / "train",
        {d: [{"prompt": f"{d} {i} {i % 7}?", "completion": str((i * 7) % 10)} for i in range(40)]
         for d in ("add", "mul", "sub")},
    )  # fmt: skip
    common = ["influence", "--model", workspace / "llama", "--train", tmp_path / "train",
              "--reference", workspace / "reference"]  # fmt: skip
    assert cli(*common, "--out", tmp_path / "default").code == 0
    full = cli(*common, "--out", tmp_path / "full", "--sample", "1.0",
               "--curvature-examples", "all", "--max-examples", "all")  # fmt: skip
    assert full.code == 0, full.err
    bounded = json.loads((tmp_path / "default" / "influence.json").read_text())
    exact = json.loads((tmp_path / "full" / "influence.json").read_text())
    assert bounded["examples"] == {"add": 20.0, "mul": 20.0, "sub": 20.0}
    assert exact["examples"] == {"add": 40.0, "mul": 40.0, "sub": 40.0}
    assert bounded["curvature_examples"] == exact["curvature_examples"] == 120.0
    assert np.array(exact["stderr"]).max() == 0.0  # the whole population: no sampling error
    difference = np.abs(np.array(bounded["scores"]) - np.array(exact["scores"]))
    assert (difference <= 3 * np.array(bounded["stderr"])).all()
    assert (difference > 0).any()  # the samples really differ
    capped = cli(*common, "--out", tmp_path / "capped", "--max-examples", "10",
                 "--curvature-examples", "20")  # fmt: skip
    assert capped.code == 0, capped.err
    doc = json.loads((tmp_path / "capped" / "influence.json").read_text())
    assert doc["examples"] == {"add": 10.0, "mul": 10.0, "sub": 10.0}
    assert doc["curvature_examples"] == 20.0 and doc["curvature_sample"]["requested"] == 20
    bad = cli(*common, "--out", tmp_path / "bad", "--curvature-examples", "some")
    assert bad.code == 1 and "--curvature-examples" in bad.err


def bpe_lora_model(root):
    """A byte-level BPE with a ChatML template and a LoRA adapter on a tiny Llama."""
    from ideal.hf import load_causal_lm
    from ideal.tiny import byte_bpe_tokenizer

    tokenizer = byte_bpe_tokenizer()
    base = save_model_dir(root / "base", tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=1),
                          tokenizer)  # fmt: skip
    adapter = get_peft_model(load_causal_lm(base), LoraConfig(r=2, target_modules=["down_proj"]))
    adapter.save_pretrained(root / "lora")
    tokenizer.save_pretrained(root / "lora")
    return root / "lora"


@pytest.mark.parametrize("stand_in", ["char", "bpe-chatml-lora"])
def test_unseen_domain_rows_score_the_pool_rows_the_mixture_lacks(workspace, tmp_path, stand_in):
    """`domain_rows: unseen` scores a domain by its pool rows with no copy in the mixture, each
    once (the mixture's copies when it holds every row). With identity curvature a score is the
    reference gradient dotted with that mean gradient, so it equals the `mixture` score of a
    mixture made of exactly those rows once."""
    from ideal.data.mixture import Mixture
    from ideal.data.mixture_io import load_training_set, write_mixture_dir
    from ideal.influence.settings import InfluenceConfig, InfluenceJob
    from ideal.influence.step import compute_influence

    model, train_dir = workspace / "llama", workspace / "train"
    if stand_in != "char":  # answers that start with a newline, as real chat data has
        model = bpe_lora_model(tmp_path)
        rows = {d: [{"prompt": f"{d} {i}?", "completion": f"\n{i}"} for i in range(n)]
                for d, n in (("add", 9), ("mul", 7), ("sub", 5))}  # fmt: skip
        train_dir = make_data_dir(tmp_path / "train", rows)
    training = load_training_set(train_dir)
    sizes = {d: len(p.examples) for d, p in training.pool.items()}
    held = {"add": [3, 2, 1, 1, 0, 0, 0, 0, 0], "mul": [1] * 7, "sub": [0, 2, 0, 1, 0]}
    counts = {d: np.array(c, dtype=np.int64) for d, c in held.items()}
    assert {d: len(c) for d, c in counts.items()} == sizes
    write_mixture_dir(tmp_path / "d0", training, Mixture(counts))
    unseen = {d: (c == 0).astype(np.int64) if (c == 0).any() else c for d, c in counts.items()}
    write_mixture_dir(tmp_path / "fresh", training, Mixture(unseen))

    def scores(train, rows):
        config = InfluenceConfig(curvature="identity", batch_size=4, sample=1.0,
                                 max_examples=None, domain_rows=rows)  # fmt: skip
        _, doc = compute_influence(model, train, workspace / "reference", InfluenceJob(config))
        return doc

    ours, by_hand = scores(tmp_path / "d0", "unseen"), scores(tmp_path / "fresh", "mixture")
    assert ours["domain_rows"] == "unseen" and ours["volumes"] == {"add": 7, "mul": 7, "sub": 3}
    assert ours["sampled_weight"] == {"add": 5.0, "mul": 7.0, "sub": 3.0}  # rows not in D0, once
    # float32 per-example gradients, summed in other batch groupings: round-off ~1e-7 relative
    np.testing.assert_allclose(ours["scores"], by_hand["scores"], rtol=1e-5)
    plain = scores(tmp_path / "d0", "mixture")
    assert plain["sampled_weight"] == {"add": 7.0, "mul": 7.0, "sub": 3.0}
    assert not np.allclose(plain["scores"], ours["scores"], rtol=1e-3)  # other rows, other scores
    with pytest.raises(IdealError, match="influence.domain_rows must be one of mixture, unseen"):
        scores(tmp_path / "d0", "pool")


def test_domain_rows_option(cli, workspace, tmp_path):
    """`--domain-rows unseen` on plain data (every row once: nothing unseen) scores the mixture's
    copies, and says which rows it asked for."""
    for rows in ("mixture", "unseen"):
        result = run(cli, workspace, tmp_path / rows, "--domain-rows", rows, "--sample", "1.0")
        assert result.code == 0, result.err
    a, b = (
        json.loads((tmp_path / r / "influence.json").read_text()) for r in ("mixture", "unseen")
    )
    assert (a["domain_rows"], b["domain_rows"]) == ("mixture", "unseen")
    assert a["scores"] == b["scores"]
