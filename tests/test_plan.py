"""`ideal influence --plan`: the sizes it announces are the sizes allocated; an 8B config plans
from its config alone."""

from __future__ import annotations

import json
import re
import resource

import pytest
import torch
from transformers import LlamaConfig

from ideal.influence.capture import select_layers
from ideal.influence.curvature import covariances, kfac_eigen
from ideal.influence.engine import InfluenceEngine, InfluenceSettings, WeightedSet, no_progress
from ideal.influence.plan import meta_model, plan_influence
from tests.helpers import make_data_dir, qa_rows, tokenize_pairs


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def test_plan_matches_what_the_influence_step_allocates(tmp_path):
    from ideal.tiny import char_tokenizer, save_model_dir, tiny_causal_lm

    tokenizer = char_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=0)
    save_model_dir(tmp_path, model, tokenizer)
    domains = {
        d: WeightedSet.uniform(tokenize_pairs(tokenizer, [(f"{d}{i}", "1") for i in range(4)]))
        for d in ("a", "b", "c")
    }
    references = {
        r: WeightedSet.uniform(tokenize_pairs(tokenizer, [(f"{r}{i}", "2") for i in range(3)]))
        for r in ("x", "y")
    }
    layers = select_layers(model)
    engine = InfluenceEngine(model, layers, InfluenceSettings(), 0, no_progress)
    for p in model.parameters():
        p.requires_grad_(p in set(engine.params))
    grads, stats = engine.domain_pass(domains)
    ref_grads, _ = engine.reference_pass(references)
    plans = {
        p.name: p for p in plan_influence(meta_model(tmp_path), None, len(domains), len(references))
    }
    assert list(plans) == list(layers)
    for name in layers:
        eigen = kfac_eigen(*covariances(stats[name]))
        preconditioned = [
            torch.zeros_like(eigen.eigenvalues) for _ in references
        ]  # float64, one per reference
        held = {
            "covariances": nbytes(stats[name].a_sum) + nbytes(stats[name].s_sum),
            "eigenvectors": nbytes(eigen.q_a) + nbytes(eigen.q_s),
            "eigenvalues": nbytes(eigen.eigenvalues),
            "gradients": sum(nbytes(g[name]) for g in [*grads.values(), *ref_grads.values()])
            + sum(map(nbytes, preconditioned)),
        }
        plan = plans[name]
        assert held == {k: getattr(plan, k) for k in held}


def test_an_8b_config_plans_without_weights(cli, tmp_path):
    config = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
    )  # fmt: skip
    (tmp_path / "llama8b").mkdir()
    (tmp_path / "llama8b" / "config.json").write_text(json.dumps(config.to_dict()))
    make_data_dir(tmp_path / "train", {"math": qa_rows("m", 2), "code": qa_rows("c", 2)})
    make_data_dir(tmp_path / "reference", {"math": qa_rows("r", 2)})
    result = cli("influence", "--model", tmp_path / "llama8b", "--train", tmp_path / "train",
                 "--reference", tmp_path / "reference", "--plan", "--layers", "*.mlp.down_proj")  # fmt: skip
    assert result.code == 0, result.err
    assert "8,030,261,248 parameters" in result.out  # Llama-3.1-8B
    # 32 down_proj layers of 4096 x 14336: covariances and eigenvectors 2 x (4096^2 + 14336^2) x 8 B,
    # Lambda 4096 x 14336 x 8 B, gradients 4096 x 14336 x (3 x 4 + 1 x 8) B
    per_layer = 2 * (4096**2 + 14336**2) * 8 + 4096 * 14336 * 8 + 4096 * 14336 * 20
    total = re.search(r"statistics held: ([\d.]+) GiB", result.out)
    assert total and float(total.group(1)) == pytest.approx(32 * per_layer / 2**30, abs=0.05)
    assert (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 4 * 2**20
    )  # KiB: far below 16 GB of weights


def test_plan_with_weights_adds_a_time_estimate_from_a_probe(cli, tmp_path):
    from ideal.influence.command import probe_seconds
    from ideal.tiny import char_tokenizer, save_model_dir, tiny_causal_lm

    tokenizer = char_tokenizer()
    save_model_dir(tmp_path / "m", tiny_causal_lm("llama", vocab_size=len(tokenizer)), tokenizer)
    make_data_dir(tmp_path / "train", {"a": qa_rows("a", 12), "b": qa_rows("b", 12)})
    make_data_dir(tmp_path / "reference", {"r": qa_rows("r", 6)})
    probe = probe_seconds(tmp_path / "m", tmp_path / "train", tmp_path / "reference",
                          sample=1.0, per_set=2)  # fmt: skip
    assert probe["probe_examples"] == {"domains": 4, "references": 2}
    assert probe["examples"] == {"domains": 24, "references": 6}
    measured, estimate = probe["probe_seconds"], probe["estimate_seconds"]
    # passes over the data scale with the example count, the eigendecomposition does not
    for stage in ("pass1_factors_and_domain_gradients", "pass2_eigenvalue_correction"):
        assert estimate[stage] == pytest.approx(6 * measured[stage])
    assert estimate["references"] == pytest.approx(3 * measured["references"])
    assert estimate["eigendecomposition"] == measured["eigendecomposition"]
    assert probe["estimate_total"] == pytest.approx(sum(estimate.values()))
    # by default two batches of every set
    default = probe_seconds(tmp_path / "m", tmp_path / "train", tmp_path / "reference",
                            InfluenceSettings(batch_size=2), sample=1.0)  # fmt: skip
    assert default["probe_examples"] == {"domains": 8, "references": 4}
    result = cli("influence", "--model", tmp_path / "m", "--train", tmp_path / "train",
                 "--reference", tmp_path / "reference", "--plan")  # fmt: skip
    assert result.code == 0, result.err
    assert re.search(r"time: ~[\d.]+ s on this machine for 12 sampled and 6 reference", result.out)
