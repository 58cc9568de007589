"""`--refine K`: Gauss-Newton-vector products against the dense matrix, and conjugate gradient that
reaches the exact damped Gauss-Newton scores from the EK-FAC ones."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from ideal.errors import IdealError
from ideal.influence.capture import layer_shape, select_layers
from ideal.influence.engine import domain_influence
from ideal.influence.exact import dense_gauss_newton
from ideal.influence.passes import make_batches
from ideal.influence.plan import layer_plan, memory_plan
from ideal.influence.refine import GaussNewton
from ideal.influence.results import WeightedSet
from ideal.influence.settings import InfluenceSettings
from ideal.tiny import char_tokenizer, save_model_dir, tiny_causal_lm
from tests.helpers import make_data_dir, qa_rows, tokenize_pairs, toy_influence_problem


def tiny(family: str):
    tokenizer = char_tokenizer()
    model = tiny_causal_lm(family, vocab_size=len(tokenizer), hidden_size=8, num_layers=1,
                           num_heads=2, intermediate_size=12, seed=0)  # fmt: skip
    return model, tokenizer


def lora(model):
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    adapted = get_peft_model(model, config)
    torch.manual_seed(1)
    for name, param in adapted.named_parameters():
        if "lora_B" in name:  # a trained adapter: B is no longer zero
            param.data.normal_(0, 0.3)
    return adapted.eval()


@pytest.mark.parametrize("case", ["llama", "gpt2", "lora"])
def test_gauss_newton_products_equal_the_dense_matrix_times_vectors(case):
    """llama: MLP projections, padded batches; gpt2: Conv1D weights (stored in x out) with a bias
    column; lora: the lora_A/lora_B linears of q_proj and v_proj, so the products go through the
    attention (the math SDPA kernel) and the sequence mixing."""
    model, tokenizer = tiny("gpt2" if case == "gpt2" else "llama")
    if case == "lora":
        model = lora(model)
    model = model.double()
    layers = select_layers(model)
    assert case != "lora" or all(".lora_A." in n or ".lora_B." in n for n in layers)
    for p in model.parameters():
        p.requires_grad_(any(p is q for m in layers.values() for q in m.parameters()))
    pairs = [("1+2=", "3"), ("44+4=", "48"), ("ab>", "ba"), ("a long prompt?", "yes"),
             ("x", "a longer answer")]  # fmt: skip
    sample = WeightedSet(tokenize_pairs(tokenizer, pairs), [1.0, 2.0, 1.0, 3.0, 1.0])
    batches = make_batches(sample, 3, tokenizer.pad_token_id)
    assert any(bool((b.attention_mask == 0).any()) for b in batches)  # padding inside a batch
    k = 3
    torch.manual_seed(0)
    vectors = {n: torch.randn(k, *layer_shape(m), dtype=torch.float64) for n, m in layers.items()}
    product = GaussNewton(model, layers, batches, float(sum(sample.weights)))(vectors)
    dense = dense_gauss_newton(model, layers, {"c": sample}, tokenizer.pad_token_id)
    flat = torch.cat([vectors[n].reshape(k, -1) for n in layers], dim=1)  # (k, P), row-major
    expected = (dense @ flat.T).T
    got = torch.cat([product[n].reshape(k, -1) for n in layers], dim=1)
    # Llama's RMSNorm computes in float32 even in a float64 model, so forward- and reverse-mode
    # derivatives through it differ by float32 round-off (5e-8 measured; 2e-16 for GPT-2, whose
    # LayerNorm runs in float64); a lost example weight moves the result by 0.4-0.5
    assert float((got - expected).norm() / expected.norm()) < 1e-6


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    return toy_influence_problem()


def test_refine_20_reaches_the_exact_gauss_newton_scores(problem):
    """The curvature sample is the whole mixture (domain_influence's default), so the refinement
    solves exactly the system `--curvature exact` solves, with the same absolute damping."""
    model, domains, references = problem
    layers = select_layers(model)

    def scores(**kwargs):
        settings = InfluenceSettings(batch_size=24, damping_abs=0.03, **kwargs)
        return domain_influence(model, layers, domains, references, settings, pad_id=0)

    exact = scores(curvature="exact").scores
    ekfac = scores().scores
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("ideal.influence.refine")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        refined = scores(refine=20)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)

    def error(s: np.ndarray) -> float:
        return float(np.linalg.norm(s - exact) / np.linalg.norm(exact))

    # Measured: EK-FAC 4.9 (its scores ~6x too large, Pearson 0.987), refine 10 3.5e-3, refine 20
    # 1.1e-4: the bound leaves 9x for round-off of the float32 products and iterates. With
    # --damping-abs 1e-3 (nearer the default relative damping's 2e-4 to 6e-4 here, a far worse
    # conditioned system) 20 steps reach 5.8e-3 only (docs/results.md, 2026-12-01).
    assert error(ekfac) > 1.0
    assert error(refined.scores) <= 1e-3
    (report,) = refined.refinement  # one layer group
    assert list(report["residuals"]) == list(references)
    for reference, values in report["residuals"].items():
        # the EK-FAC solution overshoots ~6x: its own residual ~6, scaled down it is ~0.1-0.2
        assert report["preconditioned_residual"][reference] > 1.0
        assert 0 < report["start_scale"][reference] < 0.5
        assert len(values) == 21 and values[0] < 1.0 and values[-1] < 1e-3
    assert len(messages) == 21 and messages[-1].startswith("refine 20/20: relative residual")


def test_refine_settings_are_checked():
    with pytest.raises(IdealError, match="--refine must be >= 0"):
        InfluenceSettings(refine=-1)
    for curvature in ("identity", "exact"):
        with pytest.raises(IdealError, match="--refine needs --curvature ekfac or kfac"):
            InfluenceSettings(curvature=curvature, refine=2)
    assert InfluenceSettings(curvature="kfac", refine=2).refine == 2


def test_plan_announces_the_products_and_the_four_vectors():
    plain = layer_plan("l", 6, 5, references=3, curvature="ekfac", chunk=16)
    refined = layer_plan("l", 6, 5, references=3, curvature="ekfac", chunk=16, refine=4)
    assert plain.refinement == 0 and refined.refinement == 4 * 3 * 6 * 5 * 4  # r, z, p, A p
    assert refined.device == max(plain.device, plain.directions + refined.refinement)
    model = tiny_causal_lm("llama", vocab_size=20, hidden_size=8, num_layers=2, num_heads=2)
    passes = memory_plan(model, None, 3, refine=4).passes
    assert passes["curvature sample"] == 2  # covariances, correction
    assert passes["the curvature sample x references (refinement)"] == 5  # K + 1 products
    assert len(passes) == 4 and len(memory_plan(model, None, 3).passes) == 3


def test_influence_json_records_the_residuals_with_a_lora_adapter(cli, tmp_path):
    model, tokenizer = tiny("llama")
    save_model_dir(tmp_path / "base", model, tokenizer)
    adapted = lora(model)
    adapted.save_pretrained(tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(tmp_path / "base")
    config_file.write_text(json.dumps(config))
    tokenizer.save_pretrained(tmp_path / "adapter")
    make_data_dir(tmp_path / "train", {"add": qa_rows("add", 6), "mul": qa_rows("mul", 5)})
    make_data_dir(tmp_path / "reference", {"math": qa_rows("sum", 4), "chat": qa_rows("hi", 3)})
    common = ["influence", "--model", tmp_path / "adapter", "--train", tmp_path / "train",
              "--reference", tmp_path / "reference", "--sample", "1.0", "--damping-abs", "0.01"]  # fmt: skip
    for out, extra in (("plain", []), ("refined", ["--refine", "3"])):
        result = cli(*common, "--out", tmp_path / out, *extra)
        assert result.code == 0, result.err
    plain, refined = (json.loads((tmp_path / d / "influence.json").read_text())
                      for d in ("plain", "refined"))  # fmt: skip
    assert all(".lora_A." in n or ".lora_B." in n for n in refined["layers"])
    assert plain["refine"] == {"iterations": 0, "residuals": [], "preconditioned_residual": [],
                               "start_scale": []}  # fmt: skip
    assert refined["refine"]["iterations"] == 3 and refined["settings"]["refine"] == 3
    (residuals,) = refined["refine"]["residuals"]
    assert sorted(residuals) == ["chat", "math"]
    for values in residuals.values():
        assert len(values) == 4 and values[-1] < values[0]
    assert "refine" in refined["seconds"] and "refine" not in plain["seconds"]
    assert np.isfinite(refined["scores"]).all() and refined["scores"] != plain["scores"]


def test_run_config_refine_reaches_the_settings_and_skips_methods_without_factors():
    from ideal.run.compare import method_config
    from ideal.run.config import load_config

    config = load_config(None, ["influence.refine=3"], base={"suite": {}})
    assert config.influence.settings(seed=0).refine == 3
    assert method_config(config, "ideal", 0).influence.settings(0).refine == 3
    assert method_config(config, "ideal-kfac", 0).influence.settings(0).refine == 3
    first_order = method_config(config, "first-order", 0).influence
    assert first_order.curvature == "identity" and first_order.settings(0).refine == 0
