"""Tiny models and a character-level tokenizer, built locally: for the demo suite and the tests.

Nothing here downloads anything. The tokenizers are real `PreTrainedTokenizerFast`s with a chat
template, so they save and load with `AutoTokenizer` like any Hugging Face tokenizer: one token per
character (`char_tokenizer`), or a byte-level BPE trained here on a few lines of text and code, whose
merges join "\n\n" and runs of spaces as real instruct models' do (`byte_bpe_tokenizer`, with a
ChatML template). The models are ordinary `transformers` causal LMs built from a config.

    tok = char_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tok))
    save_model_dir("out/base", model, tok)   # then AutoModelForCausalLM.from_pretrained("out/base")
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()  # no "Writing model shards" bars from save_pretrained

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
DEFAULT_ALPHABET = string.printable[:95] + "\n"  # digits, letters, punctuation, space, newline

#: Each turn is its role token then its content; assistant turns end with EOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def char_tokenizer(
    alphabet: str = DEFAULT_ALPHABET, chat_template: bool = True
) -> PreTrainedTokenizerFast:
    """One token per character of `alphabet`; ids 0-3 are <pad>, <s>, </s>, <unk>, then role tokens."""
    chars = sorted(set(alphabet))
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *ROLE_TOKENS, *chars))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=list(ROLE_TOKENS),
    )
    tokenizer.padding_side = "right"
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


#: ChatML, as Qwen's and many other instruct models' templates write it: every turn ends with
#: <|im_end|> (the EOS token) and a newline; the generation prompt is "<|im_start|>assistant\n".
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: What `byte_bpe_tokenizer` learns its merges from: chat words, prose with blank lines, indented
#: code, a reasoning block.
BPE_CORPUS = (
    "system\nuser\nassistant\nYou are a helpful assistant.\n",
    "Write a function.\n\nHere it is:\n\ndef add(a, b):\n    return a + b\n\n\n",
    "if x:\n        y = 1\n    else:\n        y = 2\n\n",
    "Question one.\n\nAnswer two.\n\n  indented  text\n\n",
    "<think>Think first.</think>Then answer.\n",
)


def byte_bpe_tokenizer(
    vocab_size: int = 400, chat_template: str = CHATML_TEMPLATE
) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 pre-tokenizer, no prefix space) trained on `BPE_CORPUS`.

    Ids 0-2 are <|endoftext|> (padding), <|im_start|> and <|im_end|> (EOS), then the 256 bytes, then
    the learned merges, among them "\n\n", "\n" + spaces and runs of spaces: the merges that make a
    rendered prompt's tokens differ from the start of prompt+answer's when the answer begins with a
    blank line or with indentation. Training is deterministic.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(BPE_CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.padding_side = "right"
    tokenizer.chat_template = chat_template
    return tokenizer


FAMILIES: dict[str, dict[str, Any]] = {
    # model_type -> config fields for a model of a few thousand to a few million parameters
    "llama": {"hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "qwen2": {"hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": True},
    "gpt2": {},
}


def tiny_causal_lm(
    family: str = "llama",
    vocab_size: int = 110,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_positions: int = 256,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """A randomly initialised causal LM of the given family, built from a config (no download)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {sorted(FAMILIES)}")
    intermediate_size = intermediate_size or 4 * hidden_size
    if family == "gpt2":
        config = AutoConfig.for_model(
            "gpt2",
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_inner=intermediate_size,
            n_positions=max_positions,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    else:
        config = AutoConfig.for_model(
            family,
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=max_positions,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            **FAMILIES[family],
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def save_model_dir(path: str | Path, model: PreTrainedModel, tokenizer: Any) -> Path:
    """Save model (safetensors) and tokenizer into one Hugging Face directory."""
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
