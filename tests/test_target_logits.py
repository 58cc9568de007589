"""Logits only at target positions (`ideal.lm.target_logits`): the head sees sum_z T_z rows, and
every loss over targets (training, evaluation, choice scores, influence) equals the full-logit one.

The references are the full-logit computations as they were written before: `token_nll` and
`example_losses` on `model(...).logits`, and, inside the trainer and the influence passes, a model
whose head cannot be separated (`output_head` -> None: the logits at every position, gathered).

Tolerances. Every model is float64. The transformer body runs the same operations on the same
inputs along both paths, so its forward is bitwise identical; what differs is the head's matrix
product over N rows instead of B x T (BLAS may block it otherwise) and the reductions of the
cross-entropy, each a few float64 round-offs (eps = 2.2e-16) of quantities of size ~1 summed over
~100 terms: 1e-12 relative leaves a 100x margin. Llama's RMSNorm computes in float32 even in a
float64 model, but only on the body's identical activations forward; backward it rounds an
incoming gradient that differs by ~1e-16 relative to float32, which changes the rounding only for
a value within 1e-16 of a float32 midpoint. Gradients, a few SGD steps and influence scores
compound such round-offs through a handful of products and (EK-FAC) a float64 eigendecomposition
damped at 0.1 x the mean eigenvalue, so its inverse amplifies errors by at most ~10 x the layer
width (~1e3): 1e-10 relative.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

import ideal.lm
from ideal.backends.evaluation.evaluate import mean_losses
from ideal.backends.evaluation.scorers import sequence_logprobs
from ideal.backends.training import builtin as train_module
from ideal.backends.training.builtin import TrainSettings, train_model
from ideal.data.rows import IGNORE_INDEX, Tokenized
from ideal.influence.capture import select_layers
from ideal.influence.engine import domain_influence
from ideal.influence.passes import InfluenceEngine, no_progress
from ideal.influence.results import WeightedSet
from ideal.influence.settings import InfluenceSettings
from ideal.lm import (
    collate,
    example_losses,
    output_head,
    position_ids,
    sample_labels,
    sample_target_labels,
    target_logits,
    target_nll,
    token_nll,
    touches_head,
)
from ideal.tiny import byte_bpe_tokenizer, char_tokenizer, tiny_causal_lm
from tests.helpers import tokenize_pairs

PAIRS = [("1+2=", "3"), ("44+4=", "48"), ("ab>", "ba"), ("a long prompt?", "yes"),
         ("x", "a longer answer"), ("q", "7")]  # fmt: skip
#: answers that start with a newline, as instruct models' answers often do (BPE merges "\n\n")
NEWLINE_PAIRS = [("Question one.", "\n\nAnswer two."), ("Write a function.", "\ndef add(a, b):"),
                 ("if x:", "\n    y = 1"), ("ok", "\n7")]  # fmt: skip

SIZE = {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "intermediate_size": 24,
        "dtype": torch.float64}  # fmt: skip


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def char_model(family: str = "llama", seed: int = 0):
    tokenizer = char_tokenizer()
    model = tiny_causal_lm(family, vocab_size=len(tokenizer), seed=seed, **SIZE)
    return model, tokenizer


def bpe_model():
    """A Qwen2 (tied embeddings) on the byte-level BPE tokenizer with a ChatML template."""
    tokenizer = byte_bpe_tokenizer()
    model = tiny_causal_lm("qwen2", vocab_size=len(tokenizer), seed=0, **SIZE)
    return model, tokenizer


def bpe_lora_model():
    """The byte-level BPE / ChatML / LoRA stand-in, B non-zero."""
    model, tokenizer = bpe_model()
    config = LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0
    )
    model = get_peft_model(model, config)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a trained adapter: B is no longer zero
            param.data.normal_(0, 0.3)
    return model.eval(), tokenizer


def one_target_item() -> Tokenized:
    """A row whose answer is one token: its only target is the last position."""
    return Tokenized([1, 40, 41, 42, 43], [IGNORE_INDEX] * 4 + [43], "x:one")


def items_for(tokenizer, pairs=PAIRS) -> list[Tokenized]:
    return [*tokenize_pairs(tokenizer, pairs), one_target_item()]


def full_logits(model, batch, real_positions: bool):
    extra = {"position_ids": position_ids(batch.attention_mask)} if real_positions else {}
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 use_cache=False, **extra).logits  # fmt: skip


@pytest.fixture
def full_only(monkeypatch):
    """Every `target_logits` call as a model whose head cannot be separated: full logits."""
    monkeypatch.setattr(ideal.lm, "output_head", lambda model: None)


def count_head_rows(model) -> tuple[list[int], object]:
    rows: list[int] = []

    def hook(module, args, output):  # after the pre-hooks: what the head actually computed on
        rows.append(int(np.prod(args[0].shape[:-1])))

    return rows, output_head(model).register_forward_hook(hook)


# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
def test_target_only_losses_equal_full_logit_losses(family, left):
    model, tokenizer = char_model(family)
    items = items_for(tokenizer)
    batch = collate(items, tokenizer.pad_token_id, left=left)
    assert int(batch.targets.min()) == 1  # the one-token answer
    with torch.no_grad():
        full = full_logits(model, batch, real_positions=True)
        targets = target_logits(model, batch, real_positions=True)
    nll, mask = token_nll(full, batch.labels)
    assert targets.logits.shape == (int(batch.targets.sum()), full.shape[-1])
    assert torch.equal(targets.mask, mask)
    got = targets.nll(batch.labels)
    torch.testing.assert_close(got, nll, rtol=1e-12, atol=1e-12)
    # per example (l(z)) and token (summed NLL) objectives
    torch.testing.assert_close(
        targets.example_losses(batch.labels), example_losses(full, batch.labels), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(got.sum(1), nll.sum(1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("case", ["llama", "gpt2", "bpe-lora"])
def test_the_head_sees_exactly_the_target_rows(case):
    model, tokenizer = bpe_lora_model() if case == "bpe-lora" else char_model(case)
    pairs = NEWLINE_PAIRS if case == "bpe-lora" else PAIRS
    batch = collate(tokenize_pairs(tokenizer, pairs), tokenizer.pad_token_id)
    rows, handle = count_head_rows(model)
    try:
        with torch.no_grad():
            target_logits(model, batch)
            target_logits(model, batch, full=True)
    finally:
        handle.remove()
    assert rows == [int(batch.targets.sum()), batch.input_ids.numel()]
    assert int(batch.targets.sum()) < batch.input_ids.numel() / 2  # prompts and padding skipped


@pytest.mark.parametrize("loss", ["example", "token"])
@pytest.mark.parametrize("case", ["llama", "gpt2", "bpe-lora"])
def test_gradients_equal(case, loss):
    model, tokenizer = bpe_lora_model() if case == "bpe-lora" else char_model(case)
    items = items_for(tokenizer, NEWLINE_PAIRS if case == "bpe-lora" else PAIRS)
    batch = collate(items, tokenizer.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(nll, mask):
        total = nll.sum() if loss == "token" else (nll.sum(1) / mask.sum(1)).sum()
        return torch.autograd.grad(total, params)

    expected = grads(*token_nll(full_logits(model, batch, False), batch.labels))
    got = grads(*target_nll(model, batch))
    for g, e in zip(got, expected, strict=True):
        assert rel(g, e) < 1e-10


def test_answers_starting_with_a_newline_under_chatml_and_lora():
    model, tokenizer = bpe_lora_model()
    items = tokenize_pairs(tokenizer, NEWLINE_PAIRS)
    firsts = [next(t for t in item.labels if t != IGNORE_INDEX) for item in items]
    # the answers' first target is a newline ("Ċ" in byte-level BPE), alone or merged with spaces
    assert all(token.startswith("Ċ") for token in tokenizer.convert_ids_to_tokens(firsts))
    batch = collate(items, tokenizer.pad_token_id)
    with torch.no_grad():
        nll, _ = token_nll(full_logits(model, batch, True), batch.labels)
        got, _ = target_nll(model, batch, real_positions=True)
    torch.testing.assert_close(got, nll, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- training


def old_micro_batch_loss(model, items, pad_id, normaliser, settings):
    """The trainer's loss as it was: logits at every position, then `token_nll`."""
    batch = collate(items, pad_id).to(next(model.parameters()).device)
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).logits
    nll, mask = token_nll(logits, batch.labels)
    if settings.loss_normalization == "token":
        total = nll.sum()
    else:
        total = (nll.sum(1) / mask.sum(1).clamp_min(1)).sum()
    return total / normaliser, int(batch.attention_mask.sum())


def trained(case: str, settings: TrainSettings):
    if case == "bpe-lora":  # the trainer wraps the adapter
        model, tokenizer = bpe_model()
        items = items_for(tokenizer, NEWLINE_PAIRS)
    else:
        model, tokenizer = char_model(case)
        items = items_for(tokenizer)
    result = train_model(model, items, settings, tokenizer.pad_token_id)
    return {n: p.detach().clone() for n, p in result.model.named_parameters()}


@pytest.mark.parametrize(
    "case, loss",
    [
        ("llama", "example"),
        ("llama", "token"),
        ("gpt2", "example"),
        ("bpe-lora", "example"),
    ],
)
def test_sgd_steps_give_the_same_weights(case, loss, monkeypatch):
    settings = TrainSettings(
        max_steps=4,
        batch_size=3,
        grad_accum=2,
        lr=0.5,
        optimizer="sgd",
        warmup_ratio=0.0,
        loss_normalization=loss,
        checkpoint_every=0,
        lora=case == "bpe-lora",
        lora_r=2,
        lora_alpha=4,
        lora_targets=("q_proj", "v_proj", "up_proj"),
        seed=3,
    )
    got = trained(case, settings)
    monkeypatch.setattr(train_module, "micro_batch_loss", old_micro_batch_loss)
    expected = trained(case, settings)
    moved = 0
    for name, value in expected.items():
        assert rel(got[name], value) < 1e-10, name
        moved += "lora_B" in name and bool(value.abs().max() > 0)
    assert case != "bpe-lora" or moved  # the adapter trained


# ----------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("case", ["llama", "bpe-lora"])
def test_eval_losses_and_choice_scores_equal(case):
    model, tokenizer = bpe_lora_model() if case == "bpe-lora" else char_model("llama")
    items = items_for(tokenizer, NEWLINE_PAIRS if case == "bpe-lora" else PAIRS)
    losses = mean_losses(model, items, tokenizer.pad_token_id, batch_size=4)
    logprobs = sequence_logprobs(model, items, tokenizer.pad_token_id, batch_size=4)
    expected_losses, expected_logprobs = [], []
    with torch.no_grad():
        for item in items:  # one at a time: no padding at all
            batch = collate([item], tokenizer.pad_token_id)
            logits = full_logits(model, batch, True)
            expected_losses.append(float(example_losses(logits, batch.labels)[0]))
            expected_logprobs.append(-float(token_nll(logits, batch.labels)[0].sum()))
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-12)
    np.testing.assert_allclose(logprobs, expected_logprobs, rtol=1e-12)
    # the full-logit switch of the same functions (what benchmarks/train_cost.py times)
    np.testing.assert_allclose(
        mean_losses(model, items, tokenizer.pad_token_id, 4, full_logits=True), losses, rtol=1e-12
    )


# ----------------------------------------------------------------------------- influence


def test_sampled_fisher_draws_the_same_labels():
    model, tokenizer = char_model("llama")
    batch = collate(items_for(tokenizer), tokenizer.pad_token_id, keys=[5, 9, 2, 7, 1, 3, 4])
    with torch.no_grad():
        full = full_logits(model, batch, True)
        targets = target_logits(model, batch, real_positions=True)
    drawn = sample_labels(full, batch.labels, batch.keys, seed=11)
    assert torch.equal(sample_target_labels(targets, batch.labels, batch.keys, seed=11), drawn)
    assert torch.equal(drawn == IGNORE_INDEX, batch.labels == IGNORE_INDEX)  # targets only
    assert not torch.equal(drawn, batch.labels)


def influence_problem(case: str):
    if case == "bpe-lora":
        model, tokenizer = bpe_lora_model()
        pairs = NEWLINE_PAIRS * 2
    else:
        model, tokenizer = char_model("llama", seed=1)
        pairs = PAIRS
    items = tokenize_pairs(tokenizer, pairs)
    half = len(items) // 2
    weights = [1.0 + i % 2 for i in range(len(items))]  # copies: 1 or 2
    domains = {
        "a": WeightedSet(items[:half], weights[:half]),
        "b": WeightedSet(items[half:], weights[half:]),
    }
    references = {"r": WeightedSet.uniform(items[1:4])}
    return model, tokenizer, domains, references


@pytest.mark.parametrize(
    "case, curvature, loss",
    [
        ("llama", "exact", "example"),
        ("llama", "ekfac", "example"),
        ("llama", "ekfac", "token"),
        ("bpe-lora", "ekfac", "example"),
    ],
)
def test_influence_scores_equal(case, curvature, loss, monkeypatch):
    """Sampled Fisher with two draws: the labels drawn from the target logits are the same."""
    model, tokenizer, domains, references = influence_problem(case)
    settings = InfluenceSettings(curvature=curvature, loss=loss, batch_size=3, fisher_samples=2)

    def scores():
        return domain_influence(
            model, select_layers(model), domains, references, settings, tokenizer.pad_token_id
        )

    rows, handle = count_head_rows(model)
    try:
        got = scores()
    finally:
        handle.remove()
    if curvature == "ekfac":  # covariances, correction and contributions over the domains, and
        # the references' gradients: each pass at the target rows only
        rows_per_set = {name: sum(i.num_targets for i in ws.items) for name, ws in domains.items()}
        reference_rows = sum(i.num_targets for i in references["r"].items)
        assert sum(rows) == 3 * sum(rows_per_set.values()) + reference_rows
    monkeypatch.setattr(ideal.lm, "output_head", lambda model: None)
    expected = scores()
    scale = np.abs(expected.scores).max()
    assert scale > 0
    np.testing.assert_allclose(got.scores, expected.scores, rtol=0, atol=1e-10 * scale)
    for name, value in expected.reference_losses.items():
        assert got.reference_losses[name] == pytest.approx(value, rel=1e-12)


def test_a_selection_with_the_head_keeps_the_full_logits():
    """The head's input statistics count every position, so the passes keep the full logits."""
    model, tokenizer, domains, references = influence_problem("llama")
    layers = select_layers(model, ["lm_head", "*.mlp.down_proj"])
    assert touches_head(model, layers.values())
    assert not touches_head(model, select_layers(model).values())
    engine = InfluenceEngine(
        model, layers, InfluenceSettings(), tokenizer.pad_token_id, no_progress
    )
    assert engine.full_logits
    result = domain_influence(
        model, layers, domains, references, InfluenceSettings(batch_size=3), tokenizer.pad_token_id
    )
    assert np.isfinite(result.scores).all()
    adapted = get_peft_model(char_model("llama")[0], LoraConfig(r=2, target_modules=["lm_head"]))
    assert touches_head(adapted, select_layers(adapted).values())  # a LoRA adapter on the head
