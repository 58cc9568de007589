"""`ideal influence --plan`: the sizes it announces are the sizes allocated; an 8B config plans
from its config alone."""

from __future__ import annotations

import json
import re
import resource
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import LlamaConfig

from ideal.influence.capture import select_layers
from ideal.influence.passes import InfluenceEngine, no_progress
from ideal.influence.plan import meta_model, plan_influence
from ideal.influence.results import WeightedSet
from ideal.influence.settings import InfluenceConfig, InfluenceJob, InfluenceSettings
from tests.helpers import make_data_dir, qa_rows, tokenize_pairs


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def test_plan_matches_what_the_influence_step_allocates(tmp_path):
    from ideal.influence.engine import spread_eigendecompositions
    from ideal.tiny import char_tokenizer, save_model_dir, tiny_causal_lm

    tokenizer = char_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=0)
    save_model_dir(tmp_path, model, tokenizer)
    sample = {
        "curvature": WeightedSet.uniform(
            tokenize_pairs(tokenizer, [(f"a{i}", "1") for i in range(6)])
        )
    }
    references = {
        r: WeightedSet.uniform(tokenize_pairs(tokenizer, [(f"{r}{i}", "2") for i in range(3)]))
        for r in ("x", "y")
    }
    layers = select_layers(model)
    settings = InfluenceSettings()
    engine = InfluenceEngine(model, layers, settings, 0, no_progress)
    for p in model.parameters():
        p.requires_grad_(p in set(engine.params))
    stats = engine.curvature_pass(sample)
    covariance_bytes = {n: nbytes(s.a_sum) + nbytes(s.s_sum) for n, s in stats.items()}
    eigens = spread_eigendecompositions(stats)
    assert not stats  # freed as they are decomposed
    corrected = engine.correction_pass(sample, eigens)
    ref_grads, _ = engine.reference_pass(references)
    plans = {p.name: p for p in plan_influence(meta_model(tmp_path), None, len(references))}
    assert list(plans) == list(layers)
    for name in layers:
        stacked = torch.stack([g[name] for g in ref_grads.values()])
        directions = stacked.float()  # what the preconditioning returns: (k, out, in) float32
        held = {
            "covariances": covariance_bytes[name],
            "eigenvectors": nbytes(eigens[name].q_a) + nbytes(eigens[name].q_s),
            "eigenvalues": nbytes(eigens[name].eigenvalues),
            "correction": nbytes(corrected[name]),
            "references": sum(nbytes(g[name]) for g in ref_grads.values()),
            "directions": nbytes(directions),
        }
        plan = plans[name]
        assert held == {k: getattr(plan, k) for k in held}


def test_an_8b_config_plans_within_70_gib(cli, tmp_path):
    config = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
    )  # fmt: skip
    (tmp_path / "llama8b").mkdir()
    (tmp_path / "llama8b" / "config.json").write_text(json.dumps(config.to_dict()))
    four = ("math", "code", "reasoning", "chat")
    make_data_dir(tmp_path / "train", {d: qa_rows(d, 2) for d in four})
    make_data_dir(tmp_path / "reference", {d: qa_rows(d, 2) for d in four})
    args = ["influence", "--model", tmp_path / "llama8b", "--train", tmp_path / "train",
            "--reference", tmp_path / "reference", "--plan"]  # fmt: skip
    result = cli(*args, "--memory", "70GiB")
    assert result.code == 0, result.err
    assert "8,030,261,248 parameters" in result.out  # Llama-3.1-8B, every MLP projection
    peak = re.search(r"^peak device memory: ([\d.]+) GiB", result.out, re.M)
    assert peak and float(peak.group(1)) <= 70
    assert re.search(r"^peak host memory: [\d.]+ GiB", result.out, re.M)
    assert re.search(
        r"^passes: (\d+) over references, (\d+) over curvature sample", result.out, re.M
    )
    # by hand: bf16 weights, then per layer the larger of eigenvectors + Lambda (float32) and four
    # float32 directions, in groups; one chunk of 16 float32 per-example gradients (x2) on top
    weights = 8_030_261_248 * 2
    layer = max((4096**2 + 14336**2) * 4 + 4096 * 14336 * 4, 4 * 4096 * 14336 * 4)
    transient = max(2 * 16 * 4096 * 14336 * 4, (2 * 4 * 4096 * 14336 + 4096**2 + 14336**2) * 8)
    fits = (70 * 2**30 - weights - transient) // layer  # layers per group, filled in model order
    assert f"{-(-96 // fits)} layer group(s)" in result.out
    assert float(peak.group(1)) == pytest.approx(
        (weights + transient + min(96, fits) * layer) / 2**30, abs=0.01
    )
    unbounded = cli(*args)
    assert unbounded.code == 0 and "1 layer group" in unbounded.out
    assert (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 4 * 2**20
    )  # KiB: far below 16 GB of weights
    assert cli(*args, "--memory", "lots").code == 1


def test_plan_with_weights_adds_a_time_estimate_from_a_probe(cli, tmp_path):
    from ideal.influence.step import probe_seconds
    from ideal.tiny import char_tokenizer, save_model_dir, tiny_causal_lm

    tokenizer = char_tokenizer()
    save_model_dir(tmp_path / "m", tiny_causal_lm("llama", vocab_size=len(tokenizer)), tokenizer)
    make_data_dir(tmp_path / "train", {"a": qa_rows("a", 12), "b": qa_rows("b", 12)})
    make_data_dir(tmp_path / "reference", {"r": qa_rows("r", 6)})
    job = InfluenceJob(InfluenceConfig(sample=1.0, batch_size=8))
    probe = probe_seconds(tmp_path / "m", tmp_path / "train", tmp_path / "reference", job,
                          per_set=2)  # fmt: skip
    assert probe["probe_examples"] == {"domains": 4, "references": 2, "curvature": 2}
    assert probe["examples"] == {"domains": 24, "references": 6, "curvature": 24}
    measured, estimate = probe["probe_seconds"], probe["estimate_seconds"]
    # passes over the data scale with the example count, the eigendecomposition does not
    assert estimate["domains"] == pytest.approx(6 * measured["domains"])
    for stage in ("curvature_covariances", "curvature_eigenvalue_correction"):
        assert estimate[stage] == pytest.approx(12 * measured[stage])
    assert estimate["references"] == pytest.approx(3 * measured["references"])
    assert estimate["eigendecomposition"] == measured["eigendecomposition"]
    assert probe["estimate_total"] == pytest.approx(sum(estimate.values()))
    # by default two batches of every set
    default = probe_seconds(tmp_path / "m", tmp_path / "train", tmp_path / "reference",
                            InfluenceJob(InfluenceConfig(sample=1.0, batch_size=2)))  # fmt: skip
    assert default["probe_examples"] == {"domains": 8, "references": 4, "curvature": 4}
    result = cli("influence", "--model", tmp_path / "m", "--train", tmp_path / "train",
                 "--reference", tmp_path / "reference", "--plan")  # fmt: skip
    assert result.code == 0, result.err
    assert re.search(r"time: ~[\d.]+ s on this machine for 12 sampled, 24 curvature and 6 reference",
                     result.out)  # fmt: skip


def test_the_probe_reads_and_samples_the_data_as_the_step_does(cli, tmp_path):
    """The probe takes the step's job whole: `on_invalid: skip` passes a bad row (the probe once
    read with `error`, so `--on-invalid skip --plan` exited 1 where the run exited 0), and
    `domain_rows` decides which rows score a domain (the probe once sampled the mixture's)."""
    from ideal.data.mixture import Mixture
    from ideal.data.mixture_io import load_training_set, write_mixture_dir
    from ideal.errors import IdealError
    from ideal.influence.step import probe_seconds
    from ideal.tiny import char_tokenizer, save_model_dir, tiny_causal_lm

    tokenizer = char_tokenizer()
    save_model_dir(tmp_path / "m", tiny_causal_lm("llama", vocab_size=len(tokenizer)), tokenizer)
    make_data_dir(tmp_path / "bad", {"a": [*qa_rows("a", 5), "{not json"], "b": qa_rows("b", 4)})
    make_data_dir(tmp_path / "reference", {"r": qa_rows("r", 3)})
    args = (tmp_path / "m", tmp_path / "bad", tmp_path / "reference")
    config = InfluenceConfig(sample=1.0, max_examples=None, curvature="identity", batch_size=4)
    probe = probe_seconds(*args, InfluenceJob(config, on_invalid="skip"), per_set=2)
    assert probe["examples"]["domains"] == 9  # the 5 + 4 valid rows
    with pytest.raises(IdealError, match="invalid JSON"):
        probe_seconds(*args, InfluenceJob(config), per_set=2)
    plan = ("influence", "--model", args[0], "--train", args[1], "--reference", args[2], "--plan")
    assert cli(*plan).code == 1
    assert cli(*plan, "--on-invalid", "skip").code == 0

    # a mixture that holds 2 of a's 6 rows (3 copies) and every row of b: `unseen` scores a by
    # its 4 rows not in the mixture, each once, and b by its copies
    make_data_dir(tmp_path / "pool", {"a": qa_rows("a", 6), "b": qa_rows("b", 4)})
    training = load_training_set(tmp_path / "pool")
    counts = {"a": np.array([2, 1, 0, 0, 0, 0]), "b": np.array([1, 1, 1, 1])}
    write_mixture_dir(tmp_path / "d0", training, Mixture(counts))
    args = (tmp_path / "m", tmp_path / "d0", tmp_path / "reference")
    for rows, examples in (("mixture", 2 + 4), ("unseen", 4 + 4)):
        job = InfluenceJob(replace(config, domain_rows=rows))
        assert probe_seconds(*args, job, per_set=2)["examples"]["domains"] == examples
