"""Rows -> messages -> token ids + labels, pinned exactly on the in-process character tokenizer and,
for the prompt/answer boundary, on an in-process byte-level BPE with a ChatML template."""

from __future__ import annotations

import json

import numpy as np
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
from ideal.tiny import byte_bpe_tokenizer, char_tokenizer, save_model_dir, tiny_causal_lm
from tests.helpers import make_data_dir, write_jsonl

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


def test_a_generation_prompt_that_is_not_the_start_of_the_turn_is_an_error():
    tokenizer = char_tokenizer(chat_template=False)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ':' + m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}assistant>{% endif %}"
    )
    ex = example({"prompt": "a", "completion": "b"}, "prompt_completion")
    with pytest.raises(ValueError, match="generation prompt is not the start of its rendering"):
        tokenize_example(ex, tokenizer)


# ----------------------------------------------------------------------------- the prompt/answer boundary
# Token strings are byte-level: "Ċ" is "\n", "Ġ" a space. `byte_bpe_tokenizer` has merges for "\n\n",
# "\n" + spaces and runs of spaces, so an answer starting with a blank line or with indentation merges
# into the prompt's last "\n" when prompt+answer is encoded as one text.

USER_TURN = ["<|im_start|>", "user", "Ċ", "Write", "Ġa", "Ġfunction", ".", "<|im_end|>", "Ċ"]
GENERATION_PROMPT = ["<|im_start|>", "assistant", "Ċ"]
PROMPT = USER_TURN + GENERATION_PROMPT


@pytest.fixture(scope="module")
def bpe():
    return byte_bpe_tokenizer()


def pieces(tokenizer, tokenized) -> tuple[list[str], list[str | None]]:
    """(tokens, labels as tokens with None where no loss)."""
    tokens = tokenizer.convert_ids_to_tokens(tokenized.input_ids)
    labels = [None if x == M else tokenizer.convert_ids_to_tokens(x) for x in tokenized.labels]
    return tokens, labels


def chat(*turns: str) -> Example:
    roles = ["user", "assistant"] * len(turns)
    messages = tuple({"role": r, "content": c} for r, c in zip(roles, turns, strict=False))
    return Example(messages, None, "code/data.jsonl:1", "")


def encoded(tokenizer, messages, generation_prompt: bool) -> list[str]:
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation_prompt
    )
    return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_the_bpe_merges_across_the_boundary(bpe):
    """The premise of the tests below: encoded as one text, prompt+answer's tokens do not start with
    the prompt's (the trailing "\n" merges with the answer's start)."""
    for answer, merged in [("\n\ndef add(a, b):", "ĊĊ"), ("    return a + b", "ĊĠĠĠ")]:
        example = chat("Write a function.", answer)
        whole = encoded(bpe, example.messages, False)
        assert encoded(bpe, example.messages[:1], True) == PROMPT
        assert whole[: len(PROMPT)] != PROMPT and whole[len(PROMPT) - 1] == merged


def test_answer_starting_with_a_blank_line(bpe):
    t = tokenize_example(chat("Write a function.", "\n\ndef add(a, b):"), bpe)
    answer = ["Ċ", "Ċ", "def", "Ġadd", "(", "a", ",", "Ġb", "):", "<|im_end|>"]
    assert pieces(bpe, t) == (PROMPT + answer + ["Ċ"], [None] * 12 + answer + [None])
    assert t.retokenized and not t.rewritten
    assert t.prompt_length == 12 and bpe.convert_ids_to_tokens(t.prompt_ids) == PROMPT
    assert bpe.decode([x for x in t.labels if x != M]) == "\n\ndef add(a, b):<|im_end|>"


def test_answer_starting_with_spaces(bpe):
    t = tokenize_example(chat("Write a function.", "    return a + b"), bpe)
    answer = ["ĠĠĠ", "Ġreturn", "Ġa", "Ġ+", "Ġb", "<|im_end|>"]
    assert pieces(bpe, t) == (PROMPT + answer + ["Ċ"], [None] * 12 + answer + [None])
    assert t.retokenized and bpe.convert_ids_to_tokens(t.prompt_ids) == PROMPT


def test_an_answer_without_a_merge_is_not_retokenized(bpe):
    t = tokenize_example(chat("Write a function.", "def add"), bpe)
    assert pieces(bpe, t) == (
        PROMPT + ["def", "Ġadd", "<|im_end|>", "Ċ"],
        [None] * 12 + ["def", "Ġadd", "<|im_end|>", None],
    )
    assert not t.retokenized


def test_two_turns_follow_the_rule_turn_by_turn(bpe):
    """Turn 1 has no merge (one text); turn 2's answer starts with spaces (encoded after its prompt)."""
    t = tokenize_example(chat("Write a function.", "def add", "Answer two.", "    indented"), bpe)
    turn1 = ["def", "Ġadd", "<|im_end|>"]
    user2 = ["<|im_start|>", "user", "Ċ", "Answer", "Ġtwo", ".", "<|im_end|>", "Ċ"]
    turn2 = ["ĠĠĠ", "Ġindented", "<|im_end|>"]
    tokens = PROMPT + turn1 + ["Ċ"] + user2 + GENERATION_PROMPT + turn2 + ["Ċ"]
    labels = [None] * 12 + turn1 + [None] * 12 + turn2 + [None]
    assert pieces(bpe, t) == (tokens, labels)
    assert t.retokenized and t.prompt_length == 27
    # the last turn's prompt is what the template renders for it, encoded as one text
    messages = chat("Write a function.", "def add", "Answer two.").messages
    assert bpe.convert_ids_to_tokens(t.prompt_ids) == encoded(bpe, messages, True)


#: Like some reasoning models' templates: an assistant turn before the last user turn is rendered
#: without its <think> block.
DROPS_EARLIER_THINKING = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages %}{% if m['role'] == 'user' %}{% set ns.last_user = loop.index0 %}"
    "{% endif %}{% endfor -%}"
    "{%- for m in messages -%}"
    "{%- set content = m['content'] -%}"
    "{%- if m['role'] == 'assistant' and loop.index0 < ns.last_user -%}"
    "{%- set content = content.split('</think>')[-1] -%}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}"
)


def test_a_template_that_rewrites_earlier_turns_keeps_each_turns_own_rendering():
    bpe = byte_bpe_tokenizer(chat_template=DROPS_EARLIER_THINKING)
    example = chat("Write a function.", "<think>Think first.</think>def add", "Answer two.", "two")
    # the premise: turn 2's prompt renders turn 1 without its reasoning
    second_prompt = bpe.apply_chat_template(
        list(example.messages[:3]), tokenize=False, add_generation_prompt=True
    )
    assert "Think" not in second_prompt and "def add" in second_prompt
    t = tokenize_example(example, bpe)
    turn1 = ["<", "think", ">", "Think", "Ġfirst", ".</", "think", ">", "def", "Ġadd", "<|im_end|>"]
    user2 = ["<|im_start|>", "user", "Ċ", "Answer", "Ġtwo", ".", "<|im_end|>", "Ċ"]
    turn2 = ["t", "wo", "<|im_end|>"]
    tokens = PROMPT + turn1 + ["Ċ"] + user2 + GENERATION_PROMPT + turn2 + ["Ċ"]
    labels = [None] * 12 + turn1 + [None] * 12 + turn2 + [None]
    assert pieces(bpe, t) == (tokens, labels)
    assert t.retokenized and t.rewritten and t.prompt_length == len(tokens) - 4


def test_a_template_that_rewrites_turns_not_ending_with_eos_is_an_error_naming_the_row():
    tokenizer = char_tokenizer(chat_template=False)
    tokenizer.chat_template = (  # earlier answers become "..."; no EOS anywhere
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
        "{{ '<|assistant|>...' }}{% else %}{{ '<|' + m['role'] + '|>' + m['content'] }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    one_turn = example({"prompt": "a", "completion": "b"}, "prompt_completion")
    assert tokenize_example(one_turn, tokenizer).num_targets == 2  # nothing earlier to rewrite
    two_turns = Example(chat("u", "x", "v", "y").messages, None, "chat.jsonl:7", "")
    with pytest.raises(
        IdealError, match=r"chat.jsonl:7: the chat template renders the turns before"
    ):
        tokenize_examples([one_turn, two_turns], tokenizer)


def test_retokenized_rows_are_counted_per_call_and_logged_once_per_domain(tmp_path, caplog):
    bpe = byte_bpe_tokenizer()
    rows = [{"prompt": f"Question {i}.", "completion": "\n\nAnswer two."} for i in range(3)]
    rows.append({"prompt": "Question one.", "completion": "Answer two."})
    examples = load_domains(make_data_dir(tmp_path, {"code": rows}))["code"].examples
    with caplog.at_level("INFO", logger="ideal.data.tokens"):
        items, report = tokenize_examples(examples, bpe)
        again, _ = tokenize_examples(examples[:2], bpe)  # the same command, a second sample
    assert (report.examples, report.retokenized, report.rewritten) == (4, 3, 0)
    assert [i.retokenized for i in items] == [True, True, True, False]
    lines = [r.getMessage() for r in caplog.records if "re-tokenized" in r.getMessage()]
    assert len(lines) == 1 and lines[0].endswith("kept): code 3 of 4")
    # what the row says is what is trained: the answer's tokens decode to its text, EOS included
    assert bpe.decode([x for x in items[0].labels if x != M]) == "\n\nAnswer two.<|im_end|>"


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


def test_train_influence_check_and_reweight_keep_a_domain_of_blank_line_answers(cli, tmp_path):
    """Every row of `code` merges at the boundary (kind a): nothing is refused, and the count is
    shown by `ideal check`, recorded in influence.json and carried into the next mixture.json."""
    bpe = byte_bpe_tokenizer()
    tiny = tiny_causal_lm("llama", vocab_size=len(bpe), hidden_size=16, num_layers=1, num_heads=2)
    base = save_model_dir(tmp_path / "base", tiny, bpe)
    blank = [{"prompt": f"Question {i}.", "completion": f"\n\nAnswer {i}."} for i in range(6)]
    plain = [{"prompt": f"Question {i}.", "completion": "Answer two."} for i in range(4)]
    train = make_data_dir(tmp_path / "train", {"code": blank, "prose": plain})
    reference = make_data_dir(tmp_path / "reference", {"code": blank[:3]})

    result = cli("check", train, "--model", base)
    assert result.code == 0, result.err
    cells = {
        c[0]: c for line in result.out.splitlines() if "│" in line
        for c in [[cell.strip() for cell in line.strip("│ ").split("│")]]
    }  # fmt: skip
    assert "┃ no target ┃ re-tokenized ┃" in result.out
    assert (cells["code"][-2:], cells["prose"][-2:]) == (
        ["0", "6"],
        ["0", "0"],
    )  # no target, re-tok.

    sft = tmp_path / "sft"
    result = cli("train", "--model", base, "--train", train, "--out", sft, "--max-steps", "2",
                 "--batch-size", "4")  # fmt: skip
    assert result.code == 0, result.err
    settings = json.loads((sft / "train_settings.json").read_text())
    assert settings["examples"] == 10 and settings["skipped_no_target"] == 0

    out = tmp_path / "influence"
    result = cli("influence", "--model", sft, "--train", train, "--reference", reference,
                 "--out", out)  # fmt: skip
    assert result.code == 0, result.err
    doc = json.loads((out / "influence.json").read_text())
    assert doc["retokenized"] == {
        "domains": {"code": doc["sampled_examples"]["code"], "prose": 0},
        "references": {"code": 3},
    }
    assert doc["sampled_examples"]["code"] >= 3 and np.isfinite(doc["scores"]).all()

    result = cli("reweight", "--train", train, "--influence", out / "influence.json", "--out",
                 tmp_path / "round-1")  # fmt: skip
    assert result.code == 0, result.err
    manifest = json.loads((tmp_path / "round-1" / "mixture.json").read_text())
    assert manifest["update"]["retokenized"] == doc["retokenized"]
