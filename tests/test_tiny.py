"""The in-process tokenizer and tiny models: they save and load like any Hugging Face directory."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ideal.errors import IdealError
from ideal.hf import load_causal_lm, load_tokenizer
from ideal.tiny import char_tokenizer, save_model_dir, tiny_causal_lm


def test_tokenizer_round_trips_through_auto_tokenizer(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert (
        loaded.apply_chat_template(messages, tokenize=False) == "<s><|user|>2+2?<|assistant|>4</s>"
    )
    text = "any printable text ~ 123\n"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.decode(loaded(text, add_special_tokens=False)["input_ids"]) == text
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_tiny_models_save_and_load(tmp_path, tokenizer, family):
    model = tiny_causal_lm(family, vocab_size=len(tokenizer), seed=3)
    assert model.config.model_type == family
    assert sum(p.numel() for p in model.parameters()) < 100_000
    save_model_dir(tmp_path, model, tokenizer)
    loaded = load_causal_lm(tmp_path)
    assert isinstance(loaded, type(AutoModelForCausalLM.from_config(model.config)))
    ids = torch.tensor([[1, 5, 20, 30, 6]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert load_tokenizer(tmp_path).chat_template == tokenizer.chat_template


def test_same_seed_same_weights(tokenizer):
    a, b = (tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=5) for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_loading_errors_are_clear(tmp_path):
    with pytest.raises(IdealError, match="model directory not found"):
        load_causal_lm(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IdealError, match="no config.json"):
        load_causal_lm(tmp_path / "empty")
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(IdealError, match="'vit' is not a causal language model"):
        load_causal_lm(tmp_path / "vit")


def test_tokenizer_without_template():
    assert not char_tokenizer(chat_template=False).chat_template


def test_the_python_api_exports_resolve():
    import ideal

    for name in ideal.__all__:
        assert callable(getattr(ideal, name)) or isinstance(getattr(ideal, name), type), name
