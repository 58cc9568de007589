"""Proxy runs (DoReMi, DoGE) on a tiny model: the first step's signal and weights equal a direct
computation from the untouched model, with the same minibatches."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ideal.errors import IdealError
from ideal.lm import collate, example_losses, token_nll
from ideal.methods.proxy import ProxySettings, learn_domain_weights
from ideal.tiny import tiny_causal_lm
from tests.helpers import tokenize_pairs


def _domains(tokenizer):
    return {
        "a": tokenize_pairs(tokenizer, [("1+1=", "2"), ("2+2=", "4"), ("3+1=", "4")]),
        "b": tokenize_pairs(tokenizer, [("abc>", "cba"), ("xy>", "yx")]),
    }


def _settings(method, steps=1, **kwargs):
    return ProxySettings(
        method=method, steps=steps, lr=1e-2, batch_size=4, warmup_ratio=0.0, **kwargs
    )


def _first_step_batches(sets, per_set=2):
    """What the proxy run draws at step 0 (seed 0): domains first, then the reference sets."""
    rng = np.random.default_rng([0, 0, 6007])
    return [[items[i] for i in rng.integers(0, len(items), size=per_set)] for items in sets]


def test_doremi_first_step_equals_a_direct_computation(tokenizer):
    proxy = tiny_causal_lm(hidden_size=16, seed=0)
    reference = tiny_causal_lm(hidden_size=16, seed=1)
    untouched = copy.deepcopy(proxy)
    domains = _domains(tokenizer)
    settings = _settings("doremi", smoothing=0.1)
    result = learn_domain_weights(proxy, domains, settings, tokenizer.pad_token_id, reference)
    excess = []
    for chosen in _first_step_batches(domains.values()):
        batch = collate(chosen, tokenizer.pad_token_id)
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        with torch.no_grad():
            nll, mask = token_nll(untouched(**inputs).logits, batch.labels)
            ref, _ = token_nll(reference(**inputs).logits, batch.labels)
        excess.append(float(((nll - ref).clamp_min(0) * mask).sum() / mask.sum()))
    first = result.history[0]
    assert [first["signal"][d] for d in domains] == pytest.approx(excess, rel=1e-5)
    assert max(excess) > 0  # a non-trivial check: some domain is behind the reference
    grown = 0.5 * np.exp(excess)
    expected = 0.9 * grown / grown.sum() + 0.1 / 2
    assert [first["alpha"][d] for d in domains] == pytest.approx(expected, rel=1e-5)
    assert result.weights == pytest.approx(expected, rel=1e-5)  # one step: the average is it
    moved = [
        not torch.equal(a, b)
        for a, b in zip(proxy.parameters(), untouched.parameters(), strict=True)
    ]
    assert any(moved)  # the proxy trained


def test_doge_first_step_is_lr_times_gradient_alignment(tokenizer):
    proxy = tiny_causal_lm(hidden_size=16, seed=0)
    untouched = copy.deepcopy(proxy)
    domains = _domains(tokenizer)
    references = {
        "r1": tokenize_pairs(tokenizer, [("2+1=", "3"), ("5+1=", "6")]),
        "r2": tokenize_pairs(tokenizer, [("ab>", "ba")]),
    }
    result = learn_domain_weights(
        proxy, domains, _settings("doge", eta=3.0), tokenizer.pad_token_id, references=references
    )
    params = list(untouched.parameters())

    def gradient(items):
        batch = collate(items, tokenizer.pad_token_id)
        logits = untouched(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss = example_losses(logits, batch.labels).mean()
        return torch.autograd.grad(loss, params, allow_unused=True)

    batches = _first_step_batches([*domains.values(), *references.values()])
    grads = [gradient(b) for b in batches]
    ref = [
        sum((g[i] if g[i] is not None else 0) for g in grads[2:]) / 2 for i in range(len(params))
    ]

    def dot(g):
        return sum(float((a * b).sum()) for a, b in zip(g, ref, strict=True) if a is not None)

    alignment = np.array([1e-2 * dot(grads[0]), 1e-2 * dot(grads[1])])
    first = result.history[0]
    assert [first["signal"][d] for d in domains] == pytest.approx(alignment, rel=1e-4)
    assert np.abs(alignment).max() > 0
    grown = 0.5 * np.exp(3.0 * alignment)
    assert [first["alpha"][d] for d in domains] == pytest.approx(grown / grown.sum(), rel=1e-6)


def test_proxy_settings_and_missing_inputs_are_errors(tokenizer):
    model = tiny_causal_lm(hidden_size=16)
    with pytest.raises(IdealError, match="reference model"):
        learn_domain_weights(model, _domains(tokenizer), _settings("doremi"), 0)
    with pytest.raises(IdealError, match="reference sets"):
        learn_domain_weights(model, _domains(tokenizer), _settings("doge"), 0)
    with pytest.raises(IdealError, match="proxy method"):
        _settings("dro")
    with pytest.raises(IdealError, match="proxy_steps"):
        _settings("doge", steps=0)
