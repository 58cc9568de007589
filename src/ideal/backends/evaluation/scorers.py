"""Scorers beyond exact answers: multiple choice by log-likelihood, and instruction-following checks.

`choice` (no generation). A test row lists its options and the correct one:

    {"prompt": "Which is a mammal?", "completion": "whale", "choices": ["shark", "whale", "trout"],
     "answer": 1}                       # or "answer": "whale" (the option's text)

Each option is scored as lm-evaluation-harness's `acc` scores it: the sum of the log-probabilities
of the option's tokens given the prompt. The option is tokenized as training tokenizes an answer
(`ideal.data.rows.tokenize_example`): the row's prompt turns, then the option as the assistant turn,
so its tokens are the option's text and the EOS that ends the turn (EOS counts: an option that is a
prefix of another is not favoured for being shorter). `acc` is the fraction of rows whose best
option is the correct one; `acc_norm` divides each option's log-likelihood by its length in
characters first (lm-eval's `acc_norm`). All (row, option) pairs are scored in batches. The row's
`completion` is what the test loss is computed on (normally the correct option).

Instruction following (generative, in the spirit of IFEval's verifiable instructions). Each is a
scorer `(output, answer) -> bool` whose `answer` is the instruction's parameter:

    words       "MIN-MAX" (either side may be empty): the output's word count is within the bounds
    keywords    "k1|k2|...": every keyword occurs (case-insensitive)
    no_commas   (answer unused): no "," in the output
    lowercase   (answer unused): no upper-case letter
    ends_with   "PHRASE": the output ends with the phrase (case-insensitive, after stripping
                whitespace and quotes, as IFEval's EndChecker)
    json        (answer unused): the output (without a ``` fence) parses as JSON
    instructions  a JSON list of the above, e.g. '[{"check": "words", "value": "-50"},
                {"check": "no_commas"}]': every one must hold (IFEval's prompt-level strict accuracy)
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ideal.backends.settings import EvalConfig
from ideal.backends.training.top_layers import FeatureCache
from ideal.data.rows import Example, Tokenized, tokenize_example
from ideal.errors import IdealError
from ideal.lm import collate, target_logits
from ideal.settings import default_of

CHOICE = "choice"

# ----------------------------------------------------------------------------- multiple choice


@dataclass(frozen=True)
class ChoiceRow:
    choices: tuple[str, ...]
    answer: int  # index into choices


def choice_row(example: Example) -> ChoiceRow:
    """The options and the correct index of a `choice` row, validated (errors name file:line)."""
    try:
        row = json.loads(example.raw)
    except json.JSONDecodeError:
        row = {}
    choices = row.get("choices") if isinstance(row, dict) else None
    if not isinstance(choices, list) or len(choices) < 2:
        raise IdealError(
            f"{example.source}: scorer 'choice' needs 'choices', a list of >= 2 options"
        )
    if not all(isinstance(c, str) for c in choices):
        raise IdealError(f"{example.source}: every entry of 'choices' must be a string")
    answer = row.get("answer")
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(choices):
            raise IdealError(
                f"{example.source}: 'answer' {answer} is not an index of 'choices' "
                f"(0-{len(choices) - 1})"
            )
        return ChoiceRow(tuple(choices), answer)
    if isinstance(answer, str):
        if answer not in choices:
            raise IdealError(f"{example.source}: 'answer' {answer!r} is not one of 'choices'")
        return ChoiceRow(tuple(choices), choices.index(answer))
    raise IdealError(
        f"{example.source}: scorer 'choice' needs 'answer', the index or the text of the correct "
        "option"
    )


@torch.no_grad()
def sequence_logprobs(
    model: nn.Module,
    items: Sequence[Tokenized],
    pad_id: int,
    batch_size: int,
    full_logits: bool = False,
    features: FeatureCache | None = None,
) -> np.ndarray:
    """(N,) sum of the log-probabilities of each item's target tokens (labels != -100), batched with
    right padding; items are grouped by length so that a batch pads little. With `features` the
    frozen bottom's states come from that cache (filled here when missing)."""
    device = next(model.parameters()).device
    forward = target_logits
    if features is not None:
        features.fill(model, items, pad_id, batch_size)
        forward = features.target_logits
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    out = np.zeros(len(items), dtype=np.float64)
    for s in range(0, len(order), batch_size):
        index = order[s : s + batch_size]
        batch = collate([items[i] for i in index], pad_id).to(device)
        # the head at the target positions only; (B, T-1), 0 off target
        targets = forward(model, batch, real_positions=True, full=full_logits)
        out[index] = -targets.nll(batch.labels).double().sum(1).cpu().numpy()
    return out


@dataclass
class ChoiceResult:
    accuracy: float  # acc
    accuracy_norm: float  # acc_norm
    outputs: list[dict[str, Any]]


def score_choices(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    max_length: int | None = None,
    batch_size: int = default_of(EvalConfig, "batch_size"),
    features: FeatureCache | None = None,
) -> ChoiceResult:
    """Multiple-choice accuracy by the log-likelihood of each option (module docstring)."""
    rows = [choice_row(e) for e in examples]
    items: list[Tokenized] = []
    for example, row in zip(examples, rows, strict=True):
        prompt = tuple(example.prompt_messages)
        for option in row.choices:
            messages = (*prompt, {"role": "assistant", "content": option})
            try:
                items.append(
                    tokenize_example(
                        Example(messages, None, example.source, ""), tokenizer, max_length
                    )
                )
            except ValueError as err:
                raise IdealError(f"{example.source}: option {option!r}: {err}") from None
    logprobs = sequence_logprobs(
        model, items, tokenizer.pad_token_id, batch_size, features=features
    )
    correct = correct_norm = 0
    outputs = []
    start = 0
    for example, row in zip(examples, rows, strict=True):
        ll = logprobs[start : start + len(row.choices)]  # (C,)
        start += len(row.choices)
        lengths = np.array([max(len(c), 1) for c in row.choices], dtype=np.float64)
        best, best_norm = int(np.argmax(ll)), int(np.argmax(ll / lengths))
        correct += best == row.answer
        correct_norm += best_norm == row.answer
        outputs.append(
            {
                "source": example.source,
                "output": row.choices[best],
                "answer": row.choices[row.answer],
                "correct": best == row.answer,
                "correct_norm": best_norm == row.answer,
                "loglikelihoods": [float(x) for x in ll],
            }
        )
    return ChoiceResult(correct / len(rows), correct_norm / len(rows), outputs)


# ----------------------------------------------------------------------------- instruction following


def _bounds(spec: str) -> tuple[int | None, int | None]:
    low, sep, high = spec.partition("-")
    try:
        if not sep:
            raise ValueError
        return (int(low) if low.strip() else None, int(high) if high.strip() else None)
    except ValueError:
        raise IdealError(
            f"scorer 'words': expected 'MIN-MAX' (e.g. '10-50', '-50'), got {spec!r}"
        ) from None


def check_words(output: str, answer: str) -> bool:
    low, high = _bounds(answer)
    n = len(re.findall(r"\b\w+\b", output))  # IFEval counts words with nltk's \w+ tokenizer
    return (low is None or n >= low) and (high is None or n <= high)


def check_keywords(output: str, answer: str) -> bool:
    words = [k.strip() for k in answer.split("|") if k.strip()]
    if not words:
        raise IdealError("scorer 'keywords': expected 'k1|k2|...', got no keyword")
    return all(re.search(re.escape(k), output, flags=re.IGNORECASE) for k in words)


def check_no_commas(output: str, answer: str) -> bool:
    return "," not in output


def check_lowercase(output: str, answer: str) -> bool:
    return output == output.lower()


def check_ends_with(output: str, answer: str) -> bool:
    return output.strip().strip('"').lower().endswith(answer.strip().lower())


def check_json(output: str, answer: str) -> bool:
    text = output.strip()
    text = re.sub(r"^```(?:json|Json|JSON)?\s*", "", text)
    text = re.sub(r"\s*```$", "", text).strip()
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


CHECKS: dict[str, Callable[[str, str], bool]] = {
    "words": check_words,
    "keywords": check_keywords,
    "no_commas": check_no_commas,
    "lowercase": check_lowercase,
    "ends_with": check_ends_with,
    "json": check_json,
}


def check_instructions(output: str, answer: str) -> bool:
    """Every check of the JSON list `answer` holds on `output`."""
    try:
        checks = json.loads(answer)
    except ValueError:
        checks = None
    if not isinstance(checks, list) or not checks:
        raise IdealError(
            "scorer 'instructions': 'answer' must be a JSON list of checks, e.g. "
            '\'[{"check": "no_commas"}]\''
        )
    ok = True
    for check in checks:
        name = check.get("check") if isinstance(check, dict) else None
        if name not in CHECKS:
            raise IdealError(
                f"scorer 'instructions': unknown check {name!r}; choose from {', '.join(CHECKS)}"
            )
        ok &= CHECKS[name](output, str(check.get("value", "")))
    return ok


INSTRUCTION_SCORERS: dict[str, Callable[[str, str], bool]] = {
    **CHECKS,
    "instructions": check_instructions,
}
