"""Top-layer training (`train.top_layers`): only the top K blocks train, from cached features.

References: the whole model's forward with only the top blocks requiring a gradient (full logits),
and the same top-layer path with `feature_cache: false` (the bottom recomputed every step).

Tolerances. Every model is float64. The cached states are the bottom's output on the same ids; the
fill batches rows by length (other padding than a training micro-batch), which may change BLAS's
blocking, so they may differ from the whole-model forward by a few float64 round-offs (~1e-16
relative); the top then runs the same operations. A loss or gradient compounds such round-offs
through a few blocks' products of width ~16-64, and three SGD steps through three more: 1e-10
relative leaves a margin of over 1e4. (In practice they agree bitwise on these sizes.)
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import warnings
from dataclasses import asdict, replace

import pytest
import torch

from ideal.backends.settings import TrainConfig
from ideal.backends.training.builtin import (
    Checkpoint,
    TrainSettings,
    micro_batch_loss,
    step_loss_normaliser,
    train_model,
    wrap_lora,
)
from ideal.backends.training.top_layers import (
    FeatureCache,
    bottom_states,
    decoder_body,
    freeze_below,
    top_blocks,
)
from ideal.errors import IdealError
from ideal.lm import collate
from ideal.tiny import byte_bpe_tokenizer, char_tokenizer, save_model_dir, tiny_causal_lm
from tests.helpers import make_data_dir, tokenize_pairs
from tests.test_cli import assert_one_line_error
from tests.test_target_logits import NEWLINE_PAIRS, PAIRS

SIZE = {"hidden_size": 16, "num_layers": 4, "num_heads": 2, "intermediate_size": 24,
        "dtype": torch.float64}  # fmt: skip
RTOL = 1e-10


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def stand_in(kind: str):
    """(model, tokenizer, items): a Llama on characters, or a Qwen2 (tied embeddings) on the
    byte-level BPE with ChatML and newline-led answers."""
    if kind == "char":
        tokenizer, family, pairs = char_tokenizer(), "llama", PAIRS
    else:
        tokenizer, family, pairs = byte_bpe_tokenizer(), "qwen2", NEWLINE_PAIRS
    model = tiny_causal_lm(family, vocab_size=len(tokenizer), seed=0, **SIZE)
    return model, tokenizer, tokenize_pairs(tokenizer, pairs)


def perturb_lora(model: torch.nn.Module) -> None:
    """LoRA's B starts at zero; a random B makes the adapter's gradients all non-trivial."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_cached_features_give_the_whole_models_loss_and_gradients(kind, lora):
    base, tokenizer, items = stand_in(kind)
    settings = TrainSettings(lora=lora, top_layers=2)
    models = []
    for _ in range(3):  # whole model, top from the cache, top from the bottom run each step
        model = copy.deepcopy(base)
        if lora:
            model = wrap_lora(model, settings)
            perturb_lora(model)
        else:
            freeze_below(model, 2)
        model.train()
        models.append(model)
    for model in models[1:]:  # LoRA's A is drawn at random: the same adapter in all three
        model.load_state_dict(models[0].state_dict())
    names = set(trainable(models[0]))
    assert names and all(".layers.2." in n or ".layers.3." in n for n in names)
    if lora:  # the adapter wraps every linear layer of the top blocks, and nothing else
        assert len(names) == 2 * 7 * 2  # blocks x (q, k, v, o, gate, up, down) x (A, B)
    normaliser = step_loss_normaliser(items, settings)
    cache = FeatureCache(None, models[1], 2, None)
    cache.fill(models[1], items, tokenizer.pad_token_id, batch_size=4)
    whole_settings = replace(settings, top_layers=0)
    runs = [
        (models[0], whole_settings, None),
        (models[1], settings, cache),
        (models[2], settings, None),
    ]
    losses, grads = [], []
    for model, s, features in runs:
        loss, _ = micro_batch_loss(
            model, items, tokenizer.pad_token_id, normaliser, s, full_logits=features is None
            and s.top_layers == 0, features=features,
        )  # fmt: skip
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in trainable(model).items()})
        assert set(grads[-1]) == names
    for loss, grad in zip(losses[1:], grads[1:], strict=True):
        assert rel(loss, losses[0]) < RTOL
        for name in names:
            assert rel(grad[name], grads[0][name]) < RTOL, name


def test_top_blocks_restores_the_model_and_its_layer_types():
    model, _, _ = stand_in("bpe")
    layers, types = model.model.layers, list(model.config.layer_types)
    with pytest.raises(RuntimeError), top_blocks(model, 2):
        assert len(model.model.layers) == 2 and model.config.layer_types == types[-2:]
        raise RuntimeError("inside")
    assert model.model.layers is layers and model.config.layer_types == types


@pytest.mark.parametrize("lora", [False, True])
def test_sgd_steps_from_the_cache_equal_recomputed_features_and_freeze_the_rest(lora):
    base, tokenizer, items = stand_in("bpe")
    settings = TrainSettings(
        lora=lora, top_layers=2, optimizer="sgd", lr=0.05, batch_size=2, grad_accum=2,
        max_steps=3, warmup_ratio=0.0, checkpoint_every=0,
    )  # fmt: skip
    results = {}
    for cached in (True, False):
        model = copy.deepcopy(base)
        s = replace(settings, feature_cache=cached)
        results[cached] = train_model(model, items, s, tokenizer.pad_token_id).model
    trained = {True: dict(results[True].named_parameters()),
               False: dict(results[False].named_parameters())}  # fmt: skip
    moved = 0
    for name, p in trained[True].items():
        assert rel(p.detach(), trained[False][name].detach()) < RTOL or torch.equal(
            p, trained[False][name]
        )
    original = dict(base.named_parameters())
    model = results[True].merge_and_unload() if lora else results[True]
    for name, p in model.named_parameters():
        top = ".layers.2." in name or ".layers.3." in name
        if not top:  # embeddings, blocks 0-1, final norm, head: bit-identical
            assert torch.equal(p, original[name]), name
        else:
            moved += not torch.equal(p, original[name])
    assert moved > 0


def test_the_cache_on_disk_is_found_again_and_invalidated_by_each_key(tmp_path, caplog):
    model, tokenizer, items = stand_in("char")
    pad = tokenizer.pad_token_id
    first = FeatureCache(tmp_path, model, 2, 64)
    with caplog.at_level(logging.INFO, logger="ideal.backends.training.top_layers"):
        assert first.fill(model, items, pad, 4) > 0
    # announced with its size: 6 rows of (T_row, 16) float64
    size = sum(len(item.input_ids) for item in items) * 16 * 8 / 2**20
    assert f"feature cache: 6 rows, {size:.1f} MiB into {first.dir}" in caplog.text
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len(files) == 1
    again = FeatureCache(tmp_path, model, 2, 64)
    assert again.fill(model, items, pad, 4) == 0.0  # nothing computed
    states = again.states(items, torch.device("cpu"))
    assert torch.equal(states, first.states(items, torch.device("cpu")))
    assert sorted(tmp_path.rglob("*.safetensors")) == files
    # each key changed: another directory (K, max length, weights) or another row
    other = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=1, **SIZE)
    keys = [
        FeatureCache(tmp_path, model, 1, 64).dir,
        FeatureCache(tmp_path, model, 2, 32).dir,
        FeatureCache(tmp_path, other, 2, 64).dir,
    ]
    assert len({first.dir, *keys}) == 4
    changed = tokenize_pairs(tokenizer, [*PAIRS[:-1], ("q", "8")])
    assert again.fill(model, changed, pad, 4) > 0
    assert len(list(first.dir.glob("fill-*.safetensors"))) == 2  # one new row, one new file
    with torch.no_grad():  # a change to a frozen weight below the top blocks: another key
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    assert FeatureCache(tmp_path, model, 2, 64).dir != first.dir
    # weights above the cut do not enter the key
    with torch.no_grad():
        other_top = copy.deepcopy(model)
        other_top.model.layers[3].mlp.up_proj.weight.mul_(2)
    assert FeatureCache(tmp_path, other_top, 2, 64).dir == FeatureCache(tmp_path, model, 2, 64).dir


def test_resume_with_the_cache_gives_the_same_weights(tmp_path):
    base, tokenizer, items = stand_in("char")
    settings = TrainSettings(
        lora=True, top_layers=2, optimizer="sgd", lr=0.05, batch_size=2, max_steps=4,
        warmup_ratio=0.0, checkpoint_every=2,
    )  # fmt: skip
    straight = train_model(copy.deepcopy(base), items, settings, tokenizer.pad_token_id)

    class Killed(Exception):
        pass

    def kill_at_3(record: dict[str, float]) -> None:
        if record["step"] == 3:
            raise Killed

    checkpoint = Checkpoint(tmp_path / "checkpoint")
    features = tmp_path / "features"
    with pytest.raises(Killed):
        train_model(copy.deepcopy(base), items, settings, tokenizer.pad_token_id, checkpoint,
                    kill_at_3, features)  # fmt: skip
    written = sorted(features.rglob("*.safetensors"))
    assert len(written) == 1
    saved = torch.load(checkpoint.file, map_location="cpu", weights_only=False)["seconds"]
    resumed = train_model(copy.deepcopy(base), items, settings, tokenizer.pad_token_id,
                          checkpoint, None, features)  # fmt: skip
    assert 0.0 < saved < resumed.seconds  # the steps before the kill count in the training's time
    assert sorted(features.rglob("*.safetensors")) == written  # read, not recomputed
    assert [r["step"] for r in resumed.log] == [3, 4]
    expected = dict(straight.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        assert torch.equal(p, expected[name]), name


def test_top_layers_zero_is_todays_path():
    settings = TrainSettings()
    values = asdict(settings)
    del values["top_layers"], values["feature_cache"]
    expected = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]
    assert settings.hash() == expected  # a run started before the option resumes
    assert TrainSettings(feature_cache=False).hash() == expected
    assert TrainSettings(top_layers=1).hash() != expected
    base, tokenizer, items = stand_in("char")
    model = copy.deepcopy(base)
    s = TrainSettings(optimizer="sgd", max_steps=1, checkpoint_every=0, lr=0.05)
    trained = train_model(model, items, s, tokenizer.pad_token_id).model
    assert all(p.requires_grad for p in trained.parameters())  # nothing frozen
    assert not torch.equal(trained.model.embed_tokens.weight, base.model.embed_tokens.weight)


def test_lora_wraps_and_loads_without_peft_warnings(tmp_path):
    """peft reads a property transformers 5 deprecates; our users should not see that each round."""
    from ideal.hf import load_causal_lm

    tokenizer = char_tokenizer()
    save_model_dir(tmp_path / "base", tiny_causal_lm("llama", vocab_size=len(tokenizer)), tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapted = wrap_lora(load_causal_lm(tmp_path / "base"), TrainSettings(lora=True))
        adapted.save_pretrained(tmp_path / "adapter")
        load_causal_lm(tmp_path / "adapter")


def test_settings_and_models_that_top_layers_refuses():
    with pytest.raises(IdealError, match=r"train.top_layers \(--top-layers\) must be >= 0"):
        TrainSettings(top_layers=-1)
    with pytest.raises(IdealError, match="train.top_layers"):
        TrainConfig(top_layers=2, backend="trl")
    tokenizer = char_tokenizer()
    items = tokenize_pairs(tokenizer, PAIRS)
    llama = tiny_causal_lm("llama", vocab_size=len(tokenizer), **SIZE)
    gpt2 = tiny_causal_lm("gpt2", vocab_size=len(tokenizer), **SIZE)
    for model, needle in ((llama, "has 4 blocks"), (gpt2, "gpt2 models are not supported")):
        settings = TrainSettings(top_layers=5, max_steps=1)
        with pytest.raises(IdealError, match=needle) as error:
            train_model(model, items, settings, tokenizer.pad_token_id)
        assert "\n" not in str(error.value)


def test_ideal_train_top_layers_caches_beside_the_output(cli, tmp_path):
    tokenizer = char_tokenizer()
    save_model_dir(tmp_path / "base", tiny_causal_lm("llama", vocab_size=len(tokenizer)), tokenizer)
    make_data_dir(tmp_path / "train", {"qa": [{"prompt": p, "completion": c} for p, c in PAIRS]})
    args = ["train", "--model", tmp_path / "base", "--train", tmp_path / "train", "--max-steps",
            "2", "--batch-size", "2", "--lora"]  # fmt: skip
    result = cli(*args, "--top-layers", "1", "--out", tmp_path / "m")
    assert result.code == 0, result.err
    assert len(list((tmp_path / "m.features").rglob("fill-*.safetensors"))) == 1
    adapter = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert all(".layers.1." in name for name in adapter["target_modules"])
    assert_one_line_error(cli(*args, "--top-layers", "3", "--out", tmp_path / "n"),
                          "train.top_layers is 3", "2 blocks")  # fmt: skip


# ----------------------------------------------------------------------------- evaluation, influence


def trained_on_top(kind: str, lora: bool):
    """A stand-in whose top 2 blocks trained (a random LoRA B, or perturbed top weights): what a
    round's model is, its bottom still the base model's."""
    model, tokenizer, items = stand_in(kind)
    settings = TrainSettings(lora=lora, top_layers=2)
    if lora:
        model = wrap_lora(model, settings)
        perturb_lora(model)
    else:
        freeze_below(model, 2)
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in trainable(model).values():
                p.add_(0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    model.eval()
    return model, tokenizer, items


@pytest.mark.parametrize("kind, lora", [("char", False), ("bpe", True)])
def test_eval_losses_and_choice_likelihoods_from_the_cache_equal_the_whole_model(kind, lora):
    from ideal.backends.evaluation.evaluate import mean_losses
    from ideal.backends.evaluation.scorers import sequence_logprobs

    model, tokenizer, items = trained_on_top(kind, lora)
    pad = tokenizer.pad_token_id
    cache = FeatureCache(None, model, 2, None)  # filled by the first call that needs it
    cached = mean_losses(model, items, pad, 4, features=cache)
    whole = mean_losses(model, items, pad, 4)
    assert len(cache.rows) == len(items)
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(whole), rtol=RTOL, atol=0)
    cached = sequence_logprobs(model, items, pad, 3, features=cache)
    whole = sequence_logprobs(model, items, pad, 3)
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(whole), rtol=RTOL, atol=0)


@pytest.mark.parametrize(
    "kind, lora, curvature", [("char", False, "exact"), ("char", False, "ekfac"),
                              ("bpe", True, "ekfac")]
)  # fmt: skip
def test_influence_from_the_cache_equals_the_whole_model(kind, lora, curvature):
    from ideal.backends.training.top_layers import top_modules
    from ideal.influence.capture import select_layers
    from ideal.influence.engine import domain_influence
    from ideal.influence.results import WeightedSet
    from ideal.influence.settings import InfluenceSettings

    model, tokenizer, items = trained_on_top(kind, lora)
    layers = top_modules(model, 2, select_layers(model))
    if not lora:  # every MLP projection of the top blocks (the default restricted to them)
        assert sorted(layers) == [f"model.layers.{b}.mlp.{p}_proj" for b in (2, 3)
                                  for p in ("down", "gate", "up")]  # fmt: skip
    half = len(items) // 2
    weights = [1.0 + i % 2 for i in range(len(items))]  # copies: 1 or 2
    domains = {
        "a": WeightedSet(items[:half], weights[:half]),
        "b": WeightedSet(items[half:], weights[half:]),
    }
    references = {"r": WeightedSet.uniform(items[:2]), "s": WeightedSet.uniform(items[-2:])}
    settings = InfluenceSettings(curvature=curvature, batch_size=2, fisher_samples=2)
    cache = FeatureCache(None, model, 2, None)
    cache.fill(model, items, tokenizer.pad_token_id, 4)
    pad = tokenizer.pad_token_id
    got = domain_influence(model, layers, domains, references, settings, pad,
                           forward=cache.target_logits)  # fmt: skip
    expected = domain_influence(model, layers, domains, references, settings, pad)
    scale = abs(expected.scores).max()
    assert scale > 0
    torch.testing.assert_close(
        torch.tensor(got.scores), torch.tensor(expected.scores), rtol=0, atol=RTOL * scale
    )
    for name, value in expected.reference_losses.items():
        assert got.reference_losses[name] == pytest.approx(value, rel=RTOL)


@pytest.mark.parametrize("kind, lora", [("char", False), ("bpe", True)])
def test_refinement_runs_from_the_cache_and_equals_the_whole_model(kind, lora):
    """`--refine`'s Gauss-Newton products run the top blocks from the cached states as every
    other pass does: the bottom never runs, and the refined scores and residuals are the whole
    model's. The same operations on the same inputs (float64; the fill's batching may move the
    states by a few round-offs, see the module docstring) through two CG steps, whose step sizes
    divide by products of the same round-off order: RTOL of the largest score."""
    from ideal.backends.training.top_layers import top_modules
    from ideal.influence.capture import select_layers
    from ideal.influence.engine import domain_influence
    from ideal.influence.results import WeightedSet
    from ideal.influence.settings import InfluenceSettings

    model, tokenizer, items = trained_on_top(kind, lora)
    layers = top_modules(model, 2, select_layers(model))
    half = len(items) // 2
    domains = {"a": WeightedSet.uniform(items[:half]), "b": WeightedSet.uniform(items[half:])}
    references = {"r": WeightedSet.uniform(items[:2]), "s": WeightedSet.uniform(items[-2:])}
    settings = InfluenceSettings(curvature="ekfac", batch_size=4, fisher_samples=1, refine=2)
    pad = tokenizer.pad_token_id
    cache = FeatureCache(None, model, 2, None)
    cache.fill(model, items, pad, 4)
    bottom_runs = []
    bottom = decoder_body(model).layers[0]
    handle = bottom.register_forward_hook(lambda *args: bottom_runs.append(1))
    try:
        got = domain_influence(model, layers, domains, references, settings, pad,
                               forward=cache.target_logits)  # fmt: skip
    finally:
        handle.remove()
    assert bottom_runs == []  # every pass, the refinement's included, from the cache
    expected = domain_influence(model, layers, domains, references, settings, pad)
    scale = abs(expected.scores).max()
    assert scale > 0 and got.refinement and expected.refinement
    torch.testing.assert_close(
        torch.tensor(got.scores), torch.tensor(expected.scores), rtol=0, atol=RTOL * scale
    )
    for mine, theirs in zip(got.refinement, expected.refinement, strict=True):
        for field, per_reference in theirs.items():
            for reference, values in per_reference.items():
                assert mine[field][reference] == pytest.approx(values, rel=RTOL), field


def test_influence_layers_below_the_trained_blocks_are_refused(tmp_path):
    from ideal.influence.settings import InfluenceConfig, InfluenceJob
    from ideal.influence.step import compute_influence

    tokenizer = char_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=0, num_layers=3)
    save_model_dir(tmp_path / "model", model, tokenizer)
    rows = {"add": [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(4)]}
    make_data_dir(tmp_path / "train", rows)
    make_data_dir(tmp_path / "reference", rows)
    job = InfluenceJob(InfluenceConfig(layers=("model.layers.0.mlp.*",)), top_layers=2)
    with pytest.raises(IdealError) as error:
        compute_influence(tmp_path / "model", tmp_path / "train", tmp_path / "reference", job)
    assert str(error.value) == (
        "influence.layers: model.layers.0.mlp.gate_proj lies outside the top 2 blocks (1..2) "
        "that train.top_layers 2 trains and runs from cached features; choose layers inside "
        "them (the default does)"
    )
    # the default: the MLP projections of the top 2 blocks only, from the cache on disk
    result, document = compute_influence(
        tmp_path / "model", tmp_path / "train", tmp_path / "reference",
        replace(job, config=InfluenceConfig(curvature="ekfac")), features=tmp_path / "features",
    )  # fmt: skip
    assert {name.split(".")[2] for name in document["layers"]} == {"1", "2"}
    assert len(list((tmp_path / "features").rglob("fill-*.safetensors"))) == 1
    # the timed probe makes the same passes, from features cached in memory (nothing written)
    from ideal.influence.step import probe_seconds

    probe = probe_seconds(
        tmp_path / "model", tmp_path / "train", tmp_path / "reference",
        replace(job, config=InfluenceConfig(curvature="ekfac")), per_set=2,
    )  # fmt: skip
    assert probe["probe_examples"]["references"] == 2 and probe["estimate_total"] > 0
    assert len(list((tmp_path / "features").rglob("fill-*.safetensors"))) == 1


@pytest.mark.slow
def test_a_compare_computes_each_rows_features_once(cli, tmp_path, monkeypatch):
    """Rounds, methods and the evaluations of a compare share OUT/features: the frozen bottom runs
    once per distinct row (training rows, reference and test rows), whatever reads it."""
    from importlib.resources import files

    import ideal.backends.training.top_layers as top_layers

    computed: list[str] = []
    bottom = top_layers.bottom_states

    def counting(model, batch, k):
        computed.extend(top_layers.row_key(item) for item in batch.rows)
        return bottom(model, batch, k)

    monkeypatch.setattr(top_layers, "bottom_states", counting)
    config = str(files("ideal") / "configs" / "demo-quick.yaml")
    overrides = ["train.max_steps=10", "train.top_layers=1", "train.lora=true", "rounds=1",
                 "suite.hidden_size=16", "suite.intermediate_size=32", "influence.sample=0.2",
                 "train.checkpoint_every=0"]  # fmt: skip
    out = tmp_path / "c"
    result = cli("compare", config, *overrides, "--methods", "original,ideal", "--seeds", "1",
                 "--out", out)  # fmt: skip
    assert result.code == 0, result.err
    assert computed and len(computed) == len(set(computed))
    assert [p.name for p in out.rglob("features")] == ["features"]  # OUT/features alone
    ideal_run = out / "ideal" / "seed-0"
    influence = json.loads((ideal_run / "round-0" / "influence.json").read_text())
    assert influence["layers"] and all(".layers.1." in name for name in influence["layers"])
    # a resumed compare reads every row from the cache
    computed.clear()
    again = cli("compare", config, *overrides, "--methods", "original,ideal", "--seeds", "1",
                "--out", out)  # fmt: skip
    assert again.code == 0, again.err
    assert computed == []


# ----------------------------------------------------------------------------- precision


def test_a_fill_is_keyed_by_its_precision_and_computed_in_it(tmp_path):
    """The cache's directory names the weights' dtype and the autocast its fill runs under, and
    a fill is computed in the cache's own precision whatever autocast surrounds it: a float32
    pass never reads states a bf16 autocast made. float32 here, as training loads models."""
    model, tokenizer, items = stand_in("char")
    model = model.float()
    pad = tokenizer.pad_token_id
    batch = collate(items, pad)
    plain = FeatureCache(tmp_path, model, 2, None)
    mixed = FeatureCache(tmp_path, model, 2, None, autocast=torch.bfloat16)
    assert plain.dir.name.endswith("-float32") and mixed.dir.name.endswith(
        "-float32-autocast-bfloat16"
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as accelerate's bf16 mixed precision
        plain.fill(model, items, pad, len(items))  # one batch, as `batch`
        expected_mixed = bottom_states(model, batch, 2)
    mixed.fill(model, items, pad, len(items))  # no autocast around it: its own
    expected_plain = bottom_states(model, batch, 2)
    cpu = torch.device("cpu")
    mask = batch.attention_mask.bool()
    # the fill's one batch holds the same rows, padded to the same length, in another order:
    # the same numbers, up to a reordering of the batch rows that BLAS may block otherwise (a
    # few round-offs: float32's eps 6e-8 through two blocks of width <= 64, 1e-5 a wide
    # margin); bf16's 8-bit mantissa (eps 4e-3) on every matmul moves the states by ~1e-3
    # (the float32 embeddings that the residual carries dilute it a little): 1e-4 separates them
    got_plain, got_mixed = plain.states(items, cpu)[mask], mixed.states(items, cpu)[mask]
    assert rel(got_plain, expected_plain[mask]) < 1e-5
    assert rel(got_mixed, expected_mixed[mask].to(got_mixed.dtype)) < 1e-5
    assert rel(expected_mixed[mask].to(torch.float32), expected_plain[mask]) > 1e-4
    # each found again by a cache of its own precision only
    for cache in (
        FeatureCache(tmp_path, model, 2, None),
        FeatureCache(tmp_path, model, 2, None, autocast=torch.bfloat16),
    ):
        assert cache.fill(model, items, pad, 4) == 0.0
    assert rel(plain.states(items, cpu)[mask], mixed.states(items, cpu)[mask].float()) > 1e-4


def test_a_bf16_checkpoint_is_filled_once_for_training_and_influence(tmp_path, monkeypatch):
    """Training loads float32; the influence step (and evaluation) load the round's model in the
    same dtype, so a bf16 checkpoint's rows are filled once, not once per dtype."""
    import ideal.backends.training.top_layers as top_layers
    from ideal.backends.training.builtin import run_train
    from ideal.hf import load_causal_lm
    from ideal.influence.settings import InfluenceConfig, InfluenceJob
    from ideal.influence.step import compute_influence

    tokenizer = char_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), num_layers=2, dtype=torch.bfloat16)
    save_model_dir(tmp_path / "base", model, tokenizer)
    assert load_causal_lm(tmp_path / "base").dtype == torch.float32  # not the checkpoint's bf16
    rows = {"qa": [{"prompt": p, "completion": c} for p, c in PAIRS]}
    make_data_dir(tmp_path / "train", rows)
    make_data_dir(tmp_path / "reference", rows)
    computed: list[str] = []
    bottom = top_layers.bottom_states

    def counting(model, batch, k):
        computed.extend(top_layers.row_key(item) for item in batch.rows)
        return bottom(model, batch, k)

    monkeypatch.setattr(top_layers, "bottom_states", counting)
    settings = TrainSettings(lora=True, top_layers=1, max_steps=1, batch_size=2, threads=1)
    features = tmp_path / "features"
    run_train(tmp_path / "base", tmp_path / "train", tmp_path / "m", settings, progress=False,
              feature_dir=features)  # fmt: skip
    assert sorted(computed) == sorted({*computed})  # each training row once
    filled = len(computed)
    job = InfluenceJob(InfluenceConfig(curvature="ekfac"), top_layers=1)
    compute_influence(tmp_path / "m", tmp_path / "train", tmp_path / "reference", job,
                      features=features)  # fmt: skip
    assert len(computed) == filled  # the references are the training rows: nothing new
    assert len([p for p in features.iterdir() if p.is_dir()]) == 1  # one key


def test_a_batch_that_is_not_right_padded_is_refused_by_the_cache():
    """The cached states are laid out from position 0 of each row (right padding, as `collate`
    pads by default): a left-padded batch, or rows that are not the batch's, is one line."""
    model, tokenizer, items = stand_in("char")
    pad = tokenizer.pad_token_id
    cache = FeatureCache(None, model, 2, None)
    cache.fill(model, items, pad, 4)
    assert len({len(item.input_ids) for item in items}) > 1  # padding in every batch of them
    with pytest.raises(IdealError) as error:
        cache.target_logits(model, collate(items, pad, left=True))
    assert str(error.value) == (
        "feature cache: the batch is not right-padded (row 0 has padding before a real token); "
        "the cached states start at each row's first token: collate it with right padding"
    )
    shuffled = collate(items, pad)
    shuffled.rows = shuffled.rows[::-1]
    with pytest.raises(IdealError, match=r"^feature cache: row 0 of the batch holds \d+ tokens, "):
        cache.target_logits(model, shuffled)
    cache.target_logits(model, collate(items, pad))  # right-padded: fine


# ----------------------------------------------------------------------------- cost at scale


def test_rows_are_read_lazily_and_not_kept(tmp_path, monkeypatch):
    """A cache never loads whole fill files: it indexes them by their headers and reads a
    batch's rows when asked; rows it wrote are not kept in memory."""
    import safetensors.torch

    model, tokenizer, items = stand_in("char")
    pad = tokenizer.pad_token_id
    first = FeatureCache(tmp_path, model, 2, None)
    first.fill(model, items[:3], pad, 2)
    first.fill(model, items, pad, 2)  # a second fill file with the other rows
    assert len(list(first.dir.glob("fill-*.safetensors"))) == 2
    assert first.rows == {}  # written, not held
    expected = bottom_states(model, collate(items, pad), 2)

    def whole_file(*args, **kwargs):
        raise AssertionError("a whole fill file was read")

    monkeypatch.setattr(safetensors.torch, "load_file", whole_file)
    again = FeatureCache(tmp_path, model, 2, None)
    assert again.fill(model, items, pad, 2) == 0.0  # found by the headers alone
    mask = collate(items, pad).attention_mask.bool()
    for cache in (first, again):
        states = cache.states(items, torch.device("cpu"))
        assert rel(states[mask], expected[mask]) < RTOL  # float64: see the module docstring
        assert cache.rows == {}
    # in memory (no root, or a process that does not write): kept, as there is nowhere else
    memory = FeatureCache(None, model, 2, None)
    memory.fill(model, items, pad, 2)
    assert len(memory.rows) == len(items)


def test_the_bottom_is_hashed_once_per_model_directory(tmp_path, monkeypatch):
    """Making a cache hashes the frozen bottom once per model directory (its files' names, sizes
    and times): again in this process, or in another one through the cache root, the hash is
    found; a changed file, a model in memory only, or an adapter below the top blocks is hashed."""
    import os

    import ideal.backends.training.top_layers as top_layers
    from ideal.hf import load_causal_lm

    tokenizer = char_tokenizer()
    save_model_dir(tmp_path / "base", tiny_causal_lm("llama", vocab_size=len(tokenizer)), tokenizer)
    hashed: list[int] = []
    frozen = top_layers.frozen_hash

    def counting(model, k):
        hashed.append(k)
        return frozen(model, k)

    monkeypatch.setattr(top_layers, "frozen_hash", counting)
    monkeypatch.setattr(top_layers, "_BOTTOM_HASHES", {})
    model = load_causal_lm(tmp_path / "base")
    root = tmp_path / "features"
    key = FeatureCache(root, model, 1, None).dir
    assert len(hashed) == 1
    assert FeatureCache(root, model, 1, None).dir == key and len(hashed) == 1  # this process
    assert FeatureCache(root, load_causal_lm(tmp_path / "base"), 1, None).dir == key
    assert len(hashed) == 1
    monkeypatch.setattr(top_layers, "_BOTTOM_HASHES", {})  # another process: the root's file
    assert FeatureCache(root, model, 1, None).dir == key and len(hashed) == 1
    FeatureCache(root, model, 2, None)  # another K: another hash
    assert len(hashed) == 2
    weights = tmp_path / "base" / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # rewritten
    assert FeatureCache(root, model, 1, None).dir == key and len(hashed) == 3
    # nothing to key by: a model built in memory, or one whose bottom holds an adapter
    in_memory = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    FeatureCache(root, in_memory, 1, None)
    FeatureCache(root, in_memory, 1, None)
    assert len(hashed) == 5
    adapted = wrap_lora(load_causal_lm(tmp_path / "base"), TrainSettings(lora=True))
    FeatureCache(root, adapted, 1, None)
    FeatureCache(root, adapted, 1, None)
    assert len(hashed) == 7
