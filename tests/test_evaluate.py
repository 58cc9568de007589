"""Evaluation: hand-computed losses and accuracies on a stub model, left padding, generation from the
training ids' prompt part, scorers, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ideal.backends.evaluation.evaluate import (
    SCORERS,
    evaluate_capability,
    greedy_decode,
    register_scorer,
    score_contains,
    score_exact,
    score_number,
    summarise,
)
from ideal.data.rows import Example, load_domains, row_to_messages, tokenize_example
from ideal.data.rows import tokenize_examples as tokenize_all
from ideal.errors import IdealError
from ideal.tiny import byte_bpe_tokenizer, char_tokenizer, save_model_dir, tiny_causal_lm
from tests.helpers import make_data_dir
from tests.test_cli import assert_one_line_error

ASSISTANT, EOS = 6, 2


def tid(c: str) -> int:
    return ord(c) - 24  # the character tokenizer's id of a printable character


class StubConfig(PretrainedConfig):
    model_type = "ideal-bigram-stub"


class BigramStub(PreTrainedModel, GenerationMixin):
    """Next-token distribution depends only on the current token: after <|assistant|>, '4' (0.6) or
    '5' (0.4); after '4', '2' (0.9) or '3' (0.1); after '2' or '3', EOS (1.0); elsewhere uniform.

    A transformers model, so that `generate` drives it; it keeps no cache (generate then feeds it one
    new token per step, which is all a bigram needs). `calls` records the input ids of every forward.
    """

    config_class = StubConfig

    def __init__(self, vocab: int, table: torch.Tensor | None = None):
        super().__init__(StubConfig(vocab_size=vocab, num_hidden_layers=1, eos_token_id=EOS))
        if table is None:
            table = torch.full((vocab, vocab), 1.0 / vocab)
            table[ASSISTANT] = 0.0
            table[ASSISTANT, tid("4")], table[ASSISTANT, tid("5")] = 0.6, 0.4
            table[tid("4")] = 0.0
            table[tid("4"), tid("2")], table[tid("4"), tid("3")] = 0.9, 0.1
            for c in "23":
                table[tid(c)] = 0.0
                table[tid(c), EOS] = 1.0
        self.register_buffer("log_table", table.clamp_min(1e-30).log())
        self.anchor = nn.Parameter(torch.zeros(()))  # a parameter, so that .device works
        self.calls: list[list[list[int]]] = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, **_):
        self.calls.append(input_ids.tolist())
        return CausalLMOutputWithPast(logits=self.log_table[input_ids] + self.anchor)


@pytest.fixture
def capability(tmp_path):
    rows = [
        {"prompt": "q", "completion": "42", "answer": "42"},
        {"prompt": "longer question", "completion": "43", "answer": "43"},
        {"prompt": "mid q", "completion": "52", "answer": " 42 "},
    ]
    return load_domains(make_data_dir(tmp_path / "data", {"math": rows}))["math"]


def test_stub_losses_and_accuracy_by_hand(capability):
    tokenizer = char_tokenizer()
    stub = BigramStub(len(tokenizer))
    expected_losses = [
        -(math.log(0.6) + math.log(0.9) + math.log(1.0)) / 3,  # 4 2 EOS
        -(math.log(0.6) + math.log(0.1) + math.log(1.0)) / 3,  # 4 3 EOS
        -(math.log(0.4) + math.log(1 / len(tokenizer)) + math.log(1.0)) / 3,  # 5 (uniform) 2 EOS
    ]
    for batch_size in (1, 3):  # 3: prompts of different lengths, left padded together
        result = evaluate_capability(stub, tokenizer, capability, "exact", batch_size=batch_size)
        assert result.loss == pytest.approx(sum(expected_losses) / 3, rel=1e-6)
        assert [o["output"] for o in result.outputs] == [
            "42",
            "42",
            "42",
        ]  # greedy: 4 then 2 then EOS
        assert [o["correct"] for o in result.outputs] == [
            True,
            False,
            True,
        ]  # " 42 " after normalising
        assert result.accuracy == pytest.approx(2 / 3)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_left_padded_batches_decode_like_single_prompts(family):
    tokenizer = char_tokenizer()
    model = tiny_causal_lm(family, vocab_size=len(tokenizer), seed=4)
    rows = [{"prompt": text, "completion": "x"} for text in ("a", "hello there", "xyz 12")]
    prompts = [
        tokenize_example(Example(row_to_messages(r, "prompt_completion"), None, "x:1", ""), tokenizer).prompt_ids
        for r in rows
    ]  # fmt: skip
    assert prompts[0] == [1, 5, tid("a"), ASSISTANT]
    batched = greedy_decode(model, prompts, EOS, 0, max_new_tokens=10)
    alone = [greedy_decode(model, [p], EOS, 0, max_new_tokens=10)[0] for p in prompts]
    assert batched == alone
    assert all(len(ids) == 10 for ids in alone)  # a random model rarely says EOS: the limit holds


def test_generation_starts_from_the_prompt_ids_that_training_uses(tmp_path):
    """Rows whose answer begins with a blank line, under a byte-level BPE that merges "\n\n" into
    the prompt's last "\n": the loss is computed on exactly the ids training gets, and generation
    starts from exactly their prompt part, which is the chat template's generation prompt encoded."""
    tokenizer = byte_bpe_tokenizer()
    rows = [
        {"prompt": "Write a function.", "completion": "\n\ndef add(a, b):", "answer": "x"},
        {"prompt": "Answer two.", "completion": "\n\ntwo", "answer": "y"},
    ]
    domain = load_domains(make_data_dir(tmp_path / "d", {"code": rows}))["code"]
    trained, report = tokenize_all(domain.examples, tokenizer)  # what `ideal train` tokenizes
    assert report.retokenized == 2
    stub = BigramStub(len(tokenizer), torch.full((len(tokenizer),) * 2, 1.0 / len(tokenizer)))
    evaluate_capability(stub, tokenizer, domain, "exact", max_new_tokens=2, batch_size=1)
    loss_calls, generation_calls = stub.calls[:2], stub.calls[2:]
    assert loss_calls == [[item.input_ids] for item in trained]
    # greedy over a uniform table: token 0 then generate feeds one token (no cache) per step
    assert generation_calls == [[trained[0].prompt_ids], [[0]], [trained[1].prompt_ids], [[0]]]
    for item, row in zip(trained, rows, strict=True):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        assert item.prompt_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
        assert item.labels[: item.prompt_length] == [-100] * item.prompt_length
        assert item.labels[item.prompt_length] != -100  # the answer starts right after


def test_generation_needs_the_whole_last_prompt(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "x"},
                          {"role": "user", "content": "v"}, {"role": "assistant", "content": "42"}],
             "answer": "42"}]  # fmt: skip
    domain = load_domains(make_data_dir(tmp_path / "d", {"chat": rows}))["chat"]
    tokenizer = char_tokenizer()
    stub = BigramStub(len(tokenizer))
    # 12 ids; max_length=5 keeps [<|assistant|>, x, EOS, <|user|>, v]: the last prompt lacks its end
    with pytest.raises(IdealError, match=r"chat/data.jsonl:1: truncation cut into the prompt"):
        evaluate_capability(stub, tokenizer, domain, "exact", max_length=5)


def test_scorers():
    assert score_exact("  the  answer\n", "the answer") and not score_exact(
        "the answers", "the answer"
    )
    assert score_number("so it is 1,234.", "1234") and score_number("x = -3.5", "-3.50")
    assert not score_number("no digits", "3") and not score_number("7 then 8", "7")
    assert score_contains("the result is 42, final", "42") and not score_contains("41", "42")
    register_scorer("first_char", lambda out, ans: out[:1] == ans[:1])
    assert SCORERS["first_char"]("apple", "avocado")


def test_summary_reports_mean_and_worst(capability):
    tokenizer = char_tokenizer()
    stub = BigramStub(len(tokenizer))
    result = evaluate_capability(stub, tokenizer, capability, "exact")
    other = evaluate_capability(stub, tokenizer, capability, "number")
    other.name = "code"
    summary = summarise([result, other])
    assert summary["capabilities"]["math"]["accuracy"] == pytest.approx(2 / 3)
    assert summary["capabilities"]["code"]["accuracy"] == pytest.approx(2 / 3)
    assert summary["accuracy_mean"] == pytest.approx(2 / 3) and summary[
        "accuracy_worst"
    ] == pytest.approx(2 / 3)
    assert summary["loss_mean"] == pytest.approx(result.loss)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = char_tokenizer()
    return save_model_dir(
        tmp_path_factory.mktemp("m"), tiny_causal_lm("llama", vocab_size=len(tokenizer)), tokenizer
    )


def test_eval_cli_writes_json(cli, tmp_path, model_dir):
    data = make_data_dir(tmp_path / "d", {"math": [{"prompt": "1+1", "completion": "2", "answer": "2"}],
                                          "chat": [{"prompt": "hi", "completion": "hello"}]})  # fmt: skip
    result = cli("eval", "--model", model_dir, "--data", data, "--out", tmp_path / "m.json", "--scorer",
                 "math=number", "--max-new-tokens", "4")  # fmt: skip
    assert result.code == 0, result.err
    doc = json.loads((tmp_path / "m.json").read_text())
    assert (
        doc["capabilities"]["math"]["scorer"] == "number"
        and doc["capabilities"]["math"]["scored"] == 1
    )
    assert doc["capabilities"]["chat"]["accuracy"] is None  # no answers: loss only
    assert len(doc["outputs"]["math"]) == 1 and "worst" in result.out


def test_eval_errors_are_one_line(cli, tmp_path, model_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(
        cli("eval", "--model", model_dir, "--data", empty), "no domain directories"
    )
    mixed = make_data_dir(tmp_path / "mixed", {"math": [{"prompt": "a", "completion": "b", "answer": "b"},
                                                        {"prompt": "c", "completion": "d"}]})  # fmt: skip
    assert_one_line_error(
        cli("eval", "--model", model_dir, "--data", mixed), "math/data.jsonl:2: row has no 'answer'"
    )
    plain = make_data_dir(tmp_path / "plain", {"chat": [{"prompt": "a", "completion": "b"}]})
    assert_one_line_error(
        cli("eval", "--model", model_dir, "--data", plain, "--scorer", "chat=exact"),
        "no row has an 'answer'",
    )
    assert_one_line_error(
        cli("eval", "--model", tmp_path / "nope", "--data", plain), "model directory not found"
    )
    assert_one_line_error(
        cli("eval", "--model", model_dir, "--data", plain, "--scorer", "chat=fuzzy"),
        "unknown scorer 'fuzzy'",
    )
