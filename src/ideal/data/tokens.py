"""Chat messages -> token ids + loss labels: the second step of data preparation (as in torchtune);
the first, rows -> messages at load time, is `ideal.data.rows`, which re-exports the names here.

Rendering uses the tokenizer's chat template, or `PLAIN_TEMPLATE` when it has none. Only assistant
tokens carry loss (labels != -100), and the end-of-sequence token is trained on. An example's ids
are what generation sees: the rendered prompt's tokens, then the tokens of the answer's text. When
a byte-level BPE merges across the boundary (an answer that starts with "\n\n" or with
indentation), the prompt's tokens are not a prefix of prompt+answer's, and the answer's text is
encoded on its own after them ("re-tokenized", counted, never refused). Training, influence and
evaluation all read these ids, and evaluation generates from their prompt part
(`Tokenized.prompt_ids`).
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ideal.errors import IdealError

if TYPE_CHECKING:
    from ideal.data.examples import Example, OnInvalid

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

#: The documented template for tokenizers without a chat template (base models). Each assistant
#: turn ends with the EOS token; the prompt ends with "### Assistant:\n".
PLAIN_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '### Assistant:\\n' + message['content'] + eos_token }}"
    "{% else %}"
    "{{ '### ' + message['role'] | capitalize + ':\\n' + message['content'] + '\\n\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Tokenized:
    """Token ids and labels (-100 = no loss) of one example; labels are not shifted (HF convention)."""

    input_ids: list[int]
    labels: list[int]
    source: str
    truncated: bool = False  # tokens were cut to fit max_length
    answer_truncated: bool = False  # ... and some of them were answer tokens
    prompt_length: int = 0  # ids before the last assistant turn's tokens: what generation continues
    retokenized: bool = False  # some text after a prompt (or after a turn) was encoded on its own
    rewritten: bool = False  # the chat template rewrote earlier turns when a later one was added

    @property
    def num_targets(self) -> int:
        """Tokens that carry loss: labelled positions after the first (position 0 has no context)."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])

    @property
    def prompt_ids(self) -> list[int]:
        """The ids generation starts from: this example's own prompt part, as trained on."""
        if self.prompt_length > len(self.input_ids):
            raise ValueError(
                "truncation cut into the prompt of the last assistant turn, so there is no "
                "prompt to generate from (raise max_length)"
            )
        return self.input_ids[: self.prompt_length]


@dataclass
class TokenizeReport:
    examples: int = 0
    tokens: int = 0
    target_tokens: int = 0
    truncated: int = 0
    answer_truncated: int = 0
    retokenized: int = 0  # examples whose answer (or a later turn) was encoded after the prompt
    rewritten: int = 0  # ... of them, because the chat template rewrites earlier turns
    no_target: list[str] = field(default_factory=list)  # "path:line: reason", skipped


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], generation_prompt: bool) -> str:
    template = None if getattr(tokenizer, "chat_template", None) else PLAIN_TEMPLATE
    return tokenizer.apply_chat_template(
        list(messages),
        chat_template=template,
        tokenize=False,
        add_generation_prompt=generation_prompt,
    )


def _encode(tokenizer: Any, text: str) -> list[int]:
    # Templates write their own special tokens (BOS); the tokenizer must not add them again.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _after_earlier_turns(prompt: str, covered: str, eos: str | None, turn: int) -> str:
    """The part of assistant turn `turn`'s prompt that follows the earlier turns, for a chat template
    whose prompt renders those turns differently from their own rendering (`covered`: the text of
    the example so far). The earlier turns end with the EOS text and some glue after it (e.g. "\n"),
    so the new part starts after as many EOS texts as `covered` holds, and that glue."""
    start = -1
    count = covered.count(eos) if eos else 0
    if eos and count:
        glue = covered[covered.rfind(eos) + len(eos) :]
        position = -1
        for _ in range(count):
            position = prompt.find(eos, position + 1)
            if position < 0:
                break
        if position >= 0 and prompt.startswith(glue, position + len(eos)):
            start = position + len(eos) + len(glue)
    if start < 0:
        raise ValueError(
            f"the chat template renders the turns before assistant turn {turn} differently once "
            "that turn's prompt is added, and the prompt's new part cannot be located after the "
            "earlier turns' EOS tokens (their rendering must end with EOS)"
        )
    return prompt[start:]


def tokenize_example(example: Example, tokenizer: Any, max_length: int | None = None) -> Tokenized:
    """Messages -> (input_ids, labels). Raises ValueError(reason) for an untrainable example.

    Assistant turn k's prompt is the conversation before it with the generation prompt, its
    continuation the rest of the conversation's rendering up to and including turn k. The ids grow
    turn by turn: the prompt's new text, then the continuation's. Each piece is taken from the
    tokens of the whole text so far when those start with the ids already there (the tokenizer did
    not merge across the boundary); otherwise it is encoded on its own and appended, which is what
    generation sees after the prompt (`retokenized`). The continuation's tokens up to and including
    the first EOS are turn k's targets (what a template adds after EOS is glue). If the last turn's
    targets do not end with EOS, EOS is appended and trained on.

    A template that rewrites earlier turns once a later turn is added (some drop earlier reasoning
    blocks) keeps each turn's own rendering: the later prompt's new part is located after the
    earlier turns' EOS (`rewritten`). A template whose generation prompt is not the start of its
    rendering of the assistant turn has no continuation to train on: that is an error.

    Truncation to `max_length` keeps the end of the prompt: tokens are dropped from the start of the
    prompt (keeping at least its last token, so that the first answer token has context); if the
    answer alone is still too long, its end is cut (losing EOS).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise IdealError(
            "the tokenizer has no EOS token; set eos_token in its tokenizer_config.json"
        )
    ids: list[int] = []
    labels: list[int] = []
    covered = ""  # the text whose tokens are `ids`
    prompt_length = 0
    retokenized = rewritten = False
    turns = [k for k, m in enumerate(example.messages) if m["role"] == "assistant"]
    for turn, k in enumerate(turns, start=1):
        prompt = _render(tokenizer, example.messages[:k], True)
        full = _render(tokenizer, example.messages[: k + 1], False)
        if not full.startswith(prompt):
            raise ValueError(
                f"the chat template's generation prompt is not the start of its rendering of "
                f"assistant turn {turn}, so that turn's text cannot be told apart from its prompt"
            )
        fresh = prompt.startswith(covered)
        whole = _encode(tokenizer, prompt)
        if fresh and whole[: len(ids)] == ids:
            ids = whole
        else:
            piece = (
                prompt[len(covered) :]
                if fresh
                else _after_earlier_turns(prompt, covered, tokenizer.eos_token, turn)
            )
            ids = ids + _encode(tokenizer, piece)
            retokenized, rewritten = True, rewritten or not fresh
        labels += [IGNORE_INDEX] * (len(ids) - len(labels))
        prompt_length = len(ids)
        whole = _encode(tokenizer, full)
        if fresh and whole[: len(ids)] == ids:
            target = whole[len(ids) :]
        else:
            target = _encode(tokenizer, full[len(prompt) :])
            retokenized = True
        end = target.index(eos) + 1 if eos in target else len(target)
        labels += target[:end] + [IGNORE_INDEX] * (len(target) - end)
        ids = ids + target
        covered = full
    targets = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if not targets or labels[targets[-1]] != eos:
        cut = targets[-1] + 1 if targets else len(ids)
        ids = ids[:cut] + [eos] + ids[cut:]
        labels = labels[:cut] + [eos] + labels[cut:]

    truncated = answer_truncated = False
    if max_length is not None and len(ids) > max_length:
        truncated = True
        first_target = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        drop = min(len(ids) - max_length, max(first_target - 1, 0))
        ids, labels = ids[drop:], labels[drop:]
        prompt_length -= drop
        if len(ids) > max_length:
            answer_truncated = any(label != IGNORE_INDEX for label in labels[max_length:])
            ids, labels = ids[:max_length], labels[:max_length]
    result = Tokenized(
        ids,
        labels,
        example.source,
        truncated,
        answer_truncated,
        prompt_length,
        retokenized,
        rewritten,
    )
    if result.num_targets == 0:
        reason = "no target tokens"
        if truncated:
            reason += f" after truncation to max_length={max_length}"
        raise ValueError(reason)
    return result


_LOCATION = re.compile(r"(:\d+|\[\d+\])$")


def _domain_of(source: str) -> str:
    """The domain directory of a row's "path:line" or "path[index]" (rows are read from
    <root>/<domain>/<file>)."""
    return Path(_LOCATION.sub("", source)).parent.name


def tokenize_examples(
    examples: Iterable[Example],
    tokenizer: Any,
    max_length: int | None = None,
    on_invalid: OnInvalid = "error",
) -> tuple[list[Tokenized], TokenizeReport]:
    """Tokenize many examples; an example left without target tokens is an error, or is skipped
    and listed in the report with on_invalid="skip" (never silently kept or dropped)."""
    report = TokenizeReport()
    out: list[Tokenized] = []
    for example in examples:
        try:
            item = tokenize_example(example, tokenizer, max_length)
        except ValueError as err:
            if on_invalid == "skip":
                report.no_target.append(f"{example.source}: {err}")
                continue
            raise IdealError(f"{example.source}: {err}") from None
        out.append(item)
        report.examples += 1
        report.tokens += len(item.input_ids)
        report.target_tokens += item.num_targets
        report.truncated += item.truncated
        report.answer_truncated += item.answer_truncated
        report.retokenized += item.retokenized
        report.rewritten += item.rewritten
    if report.retokenized:
        _log_retokenized(out, tokenizer)
    if report.truncated:
        log.info(
            "%d of %d examples truncated to %s tokens (%d lost answer tokens)",
            report.truncated,
            report.examples,
            max_length,
            report.answer_truncated,
        )
    return out, report


# Tokenizer -> domains already reported. A command loads its tokenizer once and may tokenize a domain
# more than once (the influence step: its score sample, then its curvature sample), so a domain's
# re-tokenized rows are logged at the first call only: once per command.
_reported: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


def _log_retokenized(items: list[Tokenized], tokenizer: Any) -> None:
    """One line: per domain not yet reported with this tokenizer, how many distinct rows took the
    re-tokenized path."""
    try:
        reported = _reported.setdefault(tokenizer, set())
    except TypeError:  # a tokenizer that cannot be weakly referenced: report every call
        reported = set()
    rows: dict[str, set[str]] = {}
    retokenized: dict[str, set[str]] = {}
    rewritten: set[str] = set()
    for item in items:
        domain = _domain_of(item.source)
        rows.setdefault(domain, set()).add(item.source)
        if item.retokenized and domain not in reported:
            retokenized.setdefault(domain, set()).add(item.source)
            if item.rewritten:
                rewritten.add(item.source)
    if not retokenized:
        return
    reported.update(retokenized)
    counts = ", ".join(
        f"{d or 'rows'} {len(s)} of {len(rows[d])}" for d, s in sorted(retokenized.items())
    )
    log.info(
        "re-tokenized after the prompt (the tokenizer merges across the prompt/answer boundary; "
        "kept): %s%s",
        counts,
        f" ({len(rewritten)} with a chat template that rewrites earlier turns)"
        if rewritten
        else "",
    )
