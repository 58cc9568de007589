"""Rows -> messages -> token ids + labels, pinned exactly on the in-process character tokenizer."""

from __future__ import annotations

import pytest

from ideal.data.rows import (
    IGNORE_INDEX,
    PLAIN_TEMPLATE,
    Example,
    load_domains,
    read_jsonl,
    row_to_messages,
    tokenize_example,
    tokenize_examples,
)
from ideal.errors import IdealError
from ideal.tiny import char_tokenizer
from tests.helpers import write_jsonl

PAD, BOS, EOS, SYSTEM, USER, ASSISTANT = 0, 1, 2, 4, 5, 6
M = IGNORE_INDEX


def ids(text: str) -> list[int]:
    """The character tokenizer's ids, computed independently: '\\n' = 7, then ASCII 32.. from 8."""
    return [7 if c == "\n" else ord(c) - 24 for c in text]


def example(row: dict, fmt: str) -> Example:
    return Example(row_to_messages(row, fmt), row.get("answer"), "x.jsonl:1", "")


def targets(tokenized) -> list[int]:
    return [label for label in tokenized.labels if label != M]


def test_character_ids_match_the_independent_formula(tokenizer):
    text = "ab c\n~!09AZ"
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids(text)
    assert tokenizer.convert_tokens_to_ids(["<pad>", "<s>", "</s>", "<|user|>"]) == [0, 1, 2, 5]


def test_prompt_completion_tokens_and_labels(tokenizer):
    t = tokenize_example(
        example({"prompt": "ab", "completion": "c"}, "prompt_completion"), tokenizer
    )
    assert t.input_ids == [1, 5, 73, 74, 6, 75, 2]
    assert t.labels == [M, M, M, M, M, 75, 2]
    assert tokenizer.decode(targets(t)) == "c</s>"


def test_alpaca_tokens_and_labels(tokenizer):
    row = {"instruction": "a", "input": "b", "output": "cd"}
    t = tokenize_example(example(row, "alpaca"), tokenizer)
    assert t.input_ids == [BOS, USER, *ids("a\n\nb"), ASSISTANT, *ids("cd"), EOS]
    assert t.labels == [M] * 7 + [*ids("cd"), EOS]
    no_input = tokenize_example(example({"instruction": "a", "output": "c"}, "alpaca"), tokenizer)
    assert no_input.input_ids == [BOS, USER, *ids("a"), ASSISTANT, *ids("c"), EOS]


def test_multi_turn_messages_train_every_assistant_turn(tokenizer):
    row = {
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "x"},
            {"role": "user", "content": "v"},
            {"role": "assistant", "content": "yz"},
        ]
    }
    t = tokenize_example(example(row, "messages"), tokenizer)
    assert t.input_ids == [1, 4, 91, 5, 93, 6, 96, 2, 5, 94, 6, 97, 98, 2]
    assert t.labels == [M, M, M, M, M, M, 96, 2, M, M, M, 97, 98, 2]
    assert tokenizer.decode(targets(t)) == "x</s>yz</s>"
    assert t.num_targets == 5


def test_plain_template_when_the_tokenizer_has_none():
    tokenizer = char_tokenizer(chat_template=False)
    assert not tokenizer.chat_template
    t = tokenize_example(
        example({"prompt": "ab", "completion": "c"}, "prompt_completion"), tokenizer
    )
    prompt = ids("### User:\nab\n\n### Assistant:\n")
    assert t.input_ids == [BOS, *prompt, *ids("c"), EOS]
    assert t.labels == [M] * (1 + len(prompt)) + [*ids("c"), EOS]
    assert "### Assistant:" in PLAIN_TEMPLATE


@pytest.mark.parametrize(
    ("row", "fmt", "completion"),
    [
        ({"prompt": "what is 2+2?", "completion": " 4\n"}, "prompt_completion", " 4\n"),
        ({"instruction": "sort", "input": "3 1 2", "output": "1 2 3"}, "alpaca", "1 2 3"),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello!"},
                ]
            },
            "messages",
            "hello!",
        ),
    ],
)
def test_unmasked_tokens_decode_to_completion_plus_eos(tokenizer, row, fmt, completion):
    t = tokenize_example(example(row, fmt), tokenizer)
    assert tokenizer.decode(targets(t)) == completion + tokenizer.eos_token
    assert len(t.input_ids) == len(t.labels)


def test_truncation_keeps_the_end_of_the_prompt(tokenizer):
    ex = example({"prompt": "abcdef", "completion": "g"}, "prompt_completion")
    full = tokenize_example(ex, tokenizer)
    assert full.input_ids == [BOS, USER, *ids("abcdef"), ASSISTANT, *ids("g"), EOS]
    six = tokenize_example(ex, tokenizer, max_length=6)
    assert six.input_ids == [*ids("def"), ASSISTANT, *ids("g"), EOS]
    assert six.labels == [M, M, M, M, *ids("g"), EOS]
    assert six.truncated and not six.answer_truncated
    # the answer alone does not fit: at least one prompt token stays, the answer's end is cut
    two = tokenize_example(ex, tokenizer, max_length=2)
    assert two.input_ids == [ASSISTANT, *ids("g")]
    assert two.answer_truncated and two.num_targets == 1
    with pytest.raises(ValueError, match="no target tokens after truncation to max_length=1"):
        tokenize_example(ex, tokenizer, max_length=1)


def test_tokenize_examples_reports_truncation_and_skips_only_when_asked(tokenizer):
    rows = [{"prompt": "abcdef", "completion": "g"}, {"prompt": "a", "completion": "b"}]
    examples = [
        Example(row_to_messages(r, "prompt_completion"), None, f"f.jsonl:{i + 1}", "")
        for i, r in enumerate(rows)
    ]
    items, report = tokenize_examples(examples, tokenizer, max_length=6)
    assert (report.examples, report.truncated, report.answer_truncated) == (2, 1, 0)
    assert report.tokens == 6 + 6 and report.target_tokens == 2 + 2
    with pytest.raises(IdealError, match=r"f.jsonl:1: no target tokens after truncation"):
        tokenize_examples(examples, tokenizer, max_length=1)
    items, report = tokenize_examples(examples, tokenizer, max_length=1, on_invalid="skip")
    assert items == [] and len(report.no_target) == 2


def test_prefix_check_rejects_a_template_whose_prompt_is_not_a_prefix():
    tokenizer = char_tokenizer(chat_template=False)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ':' + m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}assistant>{% endif %}"
    )
    ex = example({"prompt": "a", "completion": "b"}, "prompt_completion")
    with pytest.raises(ValueError, match="does not tokenize as a prefix"):
        tokenize_example(ex, tokenizer)


def test_formats_are_detected_per_file(tmp_path):
    write_jsonl(tmp_path / "math" / "a.jsonl", [{"prompt": "1+1", "completion": "2", "answer": 2}])
    write_jsonl(tmp_path / "math" / "b.jsonl", [{"instruction": "2+2", "output": "4"}, ""])
    write_jsonl(
        tmp_path / "chat" / "c.jsonl",
        [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
    )
    domains = load_domains(tmp_path)
    assert list(domains) == ["chat", "math"]
    assert domains["math"].formats == {"a.jsonl": "prompt_completion", "b.jsonl": "alpaca"}
    assert domains["chat"].formats == {"c.jsonl": "messages"}
    math = domains["math"].examples
    assert [e.answer for e in math] == ["2", None]
    assert math[1].source.endswith("b.jsonl:1") and math[1].completion == "4"


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"messages": []}, "field 'messages' must be a non-empty list"),
        ({"messages": [{"role": "user", "content": "q"}]}, "last message must be an assistant"),
        ({"messages": [{"role": "bot", "content": "q"}]}, "role must be one of"),
        ({"messages": ["hi"]}, "messages[0] must be an object"),
        (
            {"prompt": "q", "completion": "a", "answer": [1]},
            "field 'answer' must be a string or a number",
        ),
        (
            {"instruction": "q", "input": 3, "output": "a"},
            "field 'input' must be a string, got int",
        ),
    ],
)
def test_invalid_rows_name_file_line_and_reason(tmp_path, row, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(IdealError) as err:
        read_jsonl(path)
    assert str(err.value).startswith(f"{path}:1: ")
    assert reason in str(err.value)


def test_skip_mode_counts_bad_rows(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a"}, "{oops", {"prompt": "q"}]
    )
    examples, fmt, skipped = read_jsonl(path, on_invalid="skip")
    assert fmt == "prompt_completion" and len(examples) == 1
    assert [s.split(": ")[0] for s in skipped] == [f"{path}:2", f"{path}:3"]
