"""Scorers: multiple choice by log-likelihood against hand computations (a bigram stub with known
probabilities, and a tiny Llama scored token by token), and the instruction-following checks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ideal.backends.evaluation.evaluate import evaluate_capability, parse_scorers, summarise
from ideal.backends.evaluation.scorers import (
    check_ends_with,
    check_instructions,
    check_json,
    check_keywords,
    check_lowercase,
    check_no_commas,
    check_words,
    score_choices,
)
from ideal.data.rows import load_domains
from ideal.errors import IdealError
from ideal.tiny import char_tokenizer, tiny_causal_lm
from tests.helpers import make_data_dir
from tests.test_evaluate import BigramStub


def choice_domain(tmp_path, rows):
    return load_domains(make_data_dir(tmp_path / "data", {"mc": rows}))["mc"]


def test_choice_on_the_bigram_stub_by_hand(tmp_path):
    """After <|assistant|>: '4' 0.6, '5' 0.4; after '4': '2' 0.9, '3' 0.1; after '2'/'3': EOS 1.0;
    elsewhere uniform over V. Each option's log-likelihood includes the EOS that ends the turn."""
    tokenizer = char_tokenizer()
    v = len(tokenizer)
    stub = BigramStub(v)
    rows = [
        {"prompt": "q", "completion": "42", "choices": ["42", "43", "5"], "answer": 0},
        {"prompt": "qq", "completion": "43", "choices": ["42", "43"], "answer": "43"},
        {"prompt": "q", "completion": "5", "choices": ["5", "4"], "answer": 0},
    ]
    ll_42 = math.log(0.6) + math.log(0.9) + math.log(1.0)
    ll_43 = math.log(0.6) + math.log(0.1) + math.log(1.0)
    ll_5 = math.log(0.4) + math.log(1 / v)  # then EOS, uniform after '5'
    ll_4 = math.log(0.6) + math.log(1e-30)  # EOS right after '4' has probability 0 (clamped)
    expected = [[ll_42, ll_43, ll_5], [ll_42, ll_43], [ll_5, ll_4]]
    domain = choice_domain(tmp_path, rows)
    for batch_size in (1, 2, 7):  # the 7 options padded together, or one by one
        result = evaluate_capability(stub, tokenizer, domain, "choice", batch_size=batch_size)
        for output, want in zip(result.outputs, expected, strict=True):
            assert output["loglikelihoods"] == pytest.approx(want, rel=1e-6)
        # best: "42" (right), "42" (wrong: 43 was right), "5" (right)
        assert [o["output"] for o in result.outputs] == ["42", "42", "5"]
        assert result.accuracy == pytest.approx(2 / 3)
        # per character: 42 -> ll_42/2, 43 -> ll_43/2, 5 -> ll_5/1; row 1 still picks 42
        norm = [max(range(len(w)), key=lambda i: w[i] / len(rows[r]["choices"][i])) for r, w in
                enumerate(expected)]  # fmt: skip
        assert result.accuracy_norm == pytest.approx(
            sum(n == a for n, a in zip(norm, [0, 1, 0], strict=True)) / 3
        )
        assert result.scorer == "choice" and result.scored == 3
    summary = summarise([result])
    assert summary["capabilities"]["mc"]["accuracy_norm"] == result.accuracy_norm


def test_choice_on_a_tiny_llama_matches_token_by_token_log_softmax(tmp_path):
    tokenizer = char_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=3).eval()
    rows = [
        {"prompt": "2+2=", "completion": "4", "choices": ["4", "22", "five"], "answer": 0},
        {"prompt": "color of sky?", "completion": "blue", "choices": ["red", "blue"], "answer": 1},
    ]
    by_hand = []
    for row in rows:
        lls = []
        for option in row["choices"]:
            # "<s><|user|>" prompt "<|assistant|>" option "</s>": the character template, by hand
            tokens = ["<s>", "<|user|>", *row["prompt"], "<|assistant|>", *option, "</s>"]
            ids = torch.tensor([tokenizer.convert_tokens_to_ids(tokens)])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)  # (T, V)
            first = len(row["prompt"]) + 3  # index of the option's first token
            lls.append(sum(float(logp[t - 1, ids[0, t]]) for t in range(first, ids.shape[1])))
        by_hand.append(lls)
    result = score_choices(model, tokenizer, choice_domain(tmp_path, rows).examples, batch_size=5)
    for output, want in zip(result.outputs, by_hand, strict=True):
        # float32 logits of one forward, padded with shorter/longer rows: round-off ~1e-6 per token
        assert output["loglikelihoods"] == pytest.approx(want, abs=1e-4)
    hand_acc = sum(
        max(range(len(w)), key=w.__getitem__) == r["answer"]
        for r, w in zip(rows, by_hand, strict=True)
    )
    assert result.accuracy == hand_acc / 2


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "q", "completion": "a", "answer": 0}, "needs 'choices'"),
        ({"prompt": "q", "completion": "a", "choices": ["a"], "answer": 0}, "needs 'choices'"),
        ({"prompt": "q", "completion": "a", "choices": ["a", 3], "answer": 0}, "must be a string"),
        ({"prompt": "q", "completion": "a", "choices": ["a", "b"], "answer": 2}, "not an index"),
        ({"prompt": "q", "completion": "a", "choices": ["a", "b"], "answer": "c"}, "not one of"),
    ],
)
def test_choice_rows_are_validated_with_their_line(tmp_path, row, message):
    domain = choice_domain(tmp_path, [row])
    tokenizer = char_tokenizer()
    with pytest.raises(IdealError, match=message) as err:
        score_choices(BigramStub(len(tokenizer)), tokenizer, domain.examples)
    assert "data.jsonl:1" in str(err.value)


def test_choice_is_a_known_scorer_name():
    assert parse_scorers("mc=choice,ifeval=instructions") == {
        "mc": "choice",
        "ifeval": "instructions",
    }
    with pytest.raises(IdealError, match="choice"):
        parse_scorers("mc=choise")


def test_word_count_bounds():
    assert check_words("one two three", "2-3")
    assert not check_words("one two three four", "2-3")
    assert check_words("one", "-3") and not check_words("one", "2-")
    assert check_words("it's fine, really.", "4-4")  # it, s, fine, really: \w+ words
    with pytest.raises(IdealError, match="MIN-MAX"):
        check_words("x", "ten")


def test_keywords_all_must_occur_case_insensitively():
    assert check_keywords("The Ocean is deep and BLUE", "ocean|blue")
    assert not check_keywords("The ocean is deep", "ocean|blue")
    with pytest.raises(IdealError):
        check_keywords("x", " | ")


def test_no_commas_lowercase_ends_with():
    assert check_no_commas("a b c", "") and not check_no_commas("a, b", "")
    assert check_lowercase("all small 123", "") and not check_lowercase("Not small", "")
    assert check_ends_with(
        'Done. Is there anything else I can help with?"\n',
        "is there anything else I can help with?",
    )
    assert not check_ends_with("Is there anything else I can help with? Bye", "help with?")  # fmt: skip


def test_json_format():
    assert check_json('{"a": 1}', "")
    assert check_json('```json\n{"a": [1, 2]}\n```', "")
    assert not check_json("{'a': 1}", "") and not check_json("here: {}", "")


def test_instructions_combine_checks_and_reject_unknown_ones():
    spec = json.dumps([{"check": "words", "value": "-5"}, {"check": "lowercase"}])
    assert check_instructions("short and small", spec)
    assert not check_instructions("Short and small", spec)
    assert not check_instructions("far too many words for this limit", spec)
    with pytest.raises(IdealError, match="unknown check"):
        check_instructions("x", json.dumps([{"check": "rhymes"}]))
    with pytest.raises(IdealError, match="JSON list"):
        check_instructions("x", "no_commas")


def test_instruction_scorer_in_a_generative_evaluation(tmp_path):
    """The stub answers '42' to every prompt: 'words 1-1' and 'no_commas' hold, 'keywords 43' not."""
    tokenizer = char_tokenizer()
    rows = [
        {"prompt": "a", "completion": "42", "answer": json.dumps([{"check": "words", "value": "1-1"}])},
        {"prompt": "b", "completion": "42", "answer": json.dumps([{"check": "no_commas"}])},
        {"prompt": "c", "completion": "43", "answer": json.dumps([{"check": "keywords", "value": "43"}])},
    ]  # fmt: skip
    domain = load_domains(make_data_dir(tmp_path / "d", {"ifeval": rows}))["ifeval"]
    result = evaluate_capability(BigramStub(len(tokenizer)), tokenizer, domain, "instructions")
    assert [o["correct"] for o in result.outputs] == [True, True, False]
    assert result.accuracy == pytest.approx(2 / 3)


def test_a_rounds_metrics_carry_acc_norm_and_the_reference_accuracy(tmp_path):
    """metrics.json of a round scored with `choice`: acc and acc_norm of the test set, and the
    reference set's accuracy with the same scorer (what `select: reference_accuracy` reads)."""
    from ideal.hf import load_causal_lm
    from ideal.run.config import EvalConfig, RunConfig
    from ideal.run.rundir import RunPaths
    from ideal.run.stages import evaluate_round
    from tests.test_distributed import tiny_model_dir

    model_dir = tiny_model_dir(tmp_path / "model")
    rows = [
        {"prompt": "2+2=", "completion": "4", "choices": ["4", "22", "five"], "answer": 0},
        {"prompt": "sky?", "completion": "blue", "choices": ["red", "blue"], "answer": 1},
        {"prompt": "1+1=", "completion": "2", "choices": ["2", "eleven"], "answer": 0},
    ]
    for split in ("reference", "test"):
        make_data_dir(tmp_path / split, {"mc": rows})
    config = RunConfig(model=str(model_dir), train_data=str(tmp_path / "reference"),
                       reference_data=str(tmp_path / "reference"), test_data=str(tmp_path / "test"),
                       eval=EvalConfig(scorers={"mc": "choice"}, reference_accuracy="always"))  # fmt: skip
    paths = RunPaths(tmp_path, model_dir, tmp_path, tmp_path / "reference", tmp_path / "test")
    metrics = evaluate_round(config, paths, model_dir)["capabilities"]["mc"]
    direct = evaluate_capability(
        load_causal_lm(model_dir).eval(), char_tokenizer(), choice_domain(tmp_path, rows), "choice"
    )
    assert metrics["test_accuracy"] == direct.accuracy
    assert metrics["test_accuracy_norm"] == direct.accuracy_norm
    assert metrics["reference_accuracy"] == direct.accuracy  # the same rows, the same scorer
