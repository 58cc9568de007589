"""Domains on disk -> validated rows -> chat messages -> token ids + loss labels.

A data directory holds one sub-directory per domain (or capability), each with one or more `*.jsonl`
files. Three row formats are accepted; the format is detected from a file's first row and every later
row of that file must follow it:

    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    {"prompt": str, "completion": str}                 -> one user turn, one assistant turn
    {"instruction": str, "input": str?, "output": str}  -> user turn "instruction\\n\\ninput", assistant turn

Any row may add `"answer"` (the expected final answer, for generative scoring).

Tokenisation goes in two steps (as in torchtune): row -> messages here at load time, then messages ->
token ids + labels in `tokenize_example`. Rendering uses the tokenizer's chat template, or
`PLAIN_TEMPLATE` when it has none. Only assistant tokens carry loss (labels != -100), and the
end-of-sequence token is trained on. An example's ids are what generation sees: the rendered
prompt's tokens, then the tokens of the answer's text. When a byte-level BPE merges across the
boundary (an answer that starts with "\n\n" or with indentation), the prompt's tokens are not a
prefix of prompt+answer's, and the answer's text is encoded on its own after them ("re-tokenized",
counted, never refused). Training, influence and evaluation all read these ids, and evaluation
generates from their prompt part (`Tokenized.prompt_ids`).
"""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ideal.errors import IdealError, at

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
FORMATS = ("messages", "prompt_completion", "alpaca")
OnInvalid = Literal["error", "skip"]

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
class Example:
    """One validated row: its conversation, optional answer, where it came from."""

    messages: tuple[dict[str, str], ...]
    answer: str | None
    source: str  # "path:line"
    raw: str  # the row's JSON text as read (one line), used to write mixtures back verbatim

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """The conversation up to (excluding) its last assistant turn: what generation conditions on."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return list(self.messages[:last])

    @property
    def completion(self) -> str:
        """The content of the last assistant turn."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "assistant")


@dataclass
class Domain:
    """A domain (or capability) directory: its files, their detected formats, its examples."""

    name: str
    path: Path
    files: list[Path]
    formats: dict[str, str]  # file name -> detected format
    examples: list[Example]
    skipped: list[str] = field(default_factory=list)  # "path:line: reason", with on_invalid="skip"


# ----------------------------------------------------------------------------- rows -> messages


def detect_format(row: dict[str, Any]) -> str | None:
    if "messages" in row:
        return "messages"
    if "prompt" in row or "completion" in row:
        return "prompt_completion"
    if "instruction" in row or "output" in row:
        return "alpaca"
    return None


def _string(row: dict[str, Any], key: str, *, required: bool = True) -> str | None:
    if key not in row:
        if required:
            raise ValueError(f"missing field '{key}'")
        return None
    value = row[key]
    if not isinstance(value, str):
        raise ValueError(f"field '{key}' must be a string, got {type(value).__name__}")
    return value


def row_to_messages(row: dict[str, Any], fmt: str) -> tuple[dict[str, str], ...]:
    """Validate one row of format `fmt` and return its conversation. Raises ValueError(reason)."""
    if fmt == "prompt_completion":
        prompt, completion = _string(row, "prompt"), _string(row, "completion")
        return ({"role": "user", "content": prompt}, {"role": "assistant", "content": completion})
    if fmt == "alpaca":
        instruction, output = _string(row, "instruction"), _string(row, "output")
        extra = _string(row, "input", required=False)
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        return ({"role": "user", "content": prompt}, {"role": "assistant", "content": output})
    messages = row.get("messages")
    if "messages" not in row:
        raise ValueError("missing field 'messages'")
    if not isinstance(messages, list) or not messages:
        raise ValueError("field 'messages' must be a non-empty list")
    out = []
    for k, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{k}] must be an object, got {type(message).__name__}")
        role = _string(message, "role")
        content = _string(message, "content")
        if role not in ROLES:
            raise ValueError(f"messages[{k}].role must be one of {', '.join(ROLES)}, got '{role}'")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "assistant":
        raise ValueError("the last message must be an assistant turn (the target)")
    return tuple(out)


def _answer(row: dict[str, Any]) -> str | None:
    if "answer" not in row:
        return None
    value = row["answer"]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"field 'answer' must be a string or a number, got {type(value).__name__}")
    return str(value)


def read_jsonl(path: Path, on_invalid: OnInvalid = "error") -> tuple[list[Example], str, list[str]]:
    """Read one JSONL file. Returns (examples, detected format, skipped rows as "path:line: reason").

    Blank lines are ignored. The format is detected from the first row; with on_invalid="skip", bad
    rows are skipped and returned in the third element instead of raising.
    """
    examples: list[Example] = []
    skipped: list[str] = []
    fmt: str | None = None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise at(path, None, f"not UTF-8 text ({err.reason} at byte {err.start})") from None
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            continue
        try:
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"invalid JSON ({err.msg}, column {err.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"a row must be a JSON object, got {type(row).__name__}")
            if fmt is None:
                fmt = detect_format(row)
                if fmt is None:
                    keys = ", ".join(sorted(row)) or "none"
                    raise ValueError(
                        "unknown row format: expected 'messages', 'prompt'/'completion' or "
                        f"'instruction'/'input'/'output' fields, found {keys}"
                    )
            messages = row_to_messages(row, fmt)
            answer = _answer(row)
        except ValueError as err:
            if on_invalid == "skip":
                skipped.append(f"{path}:{number}: {err}")
                continue
            raise at(path, number, str(err)) from None
        examples.append(Example(messages, answer, f"{path}:{number}", text))
    if fmt is None and not skipped:
        raise at(path, None, "empty file (no rows)")
    return examples, fmt or "unknown", skipped


def load_domains(root: str | Path, on_invalid: OnInvalid = "error") -> dict[str, Domain]:
    """Discover `<root>/<domain>/*.jsonl` and load every domain, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise IdealError(f"{root}: not a directory")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise IdealError(f"{root}: no domain directories (expected {root}/<domain>/*.jsonl)")
    seen: dict[str, Path] = {}
    for path in dirs:
        key = path.name.casefold()
        if key in seen:
            raise IdealError(
                f"{path}: duplicate domain name '{path.name}' (also {seen[key]}; names are "
                "compared without case)"
            )
        seen[key] = path
    domains: dict[str, Domain] = {}
    for path in dirs:
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise IdealError(f"{path}: empty domain (no *.jsonl files)")
        domain = Domain(path.name, path, files, {}, [])
        for file in files:
            examples, fmt, skipped = read_jsonl(file, on_invalid)
            domain.formats[file.name] = fmt
            domain.examples.extend(examples)
            domain.skipped.extend(skipped)
        if not domain.examples:
            raise IdealError(f"{path}: empty domain (every row was invalid and skipped)")
        if domain.skipped:
            log.warning(
                "%s: skipped %d invalid rows (first: %s)",
                path,
                len(domain.skipped),
                domain.skipped[0],
            )
        domains[path.name] = domain
    return domains


# ----------------------------------------------------------------------------- messages -> tokens


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


def _domain_of(source: str) -> str:
    """The domain directory of a row's "path:line" (rows are read from <root>/<domain>/*.jsonl)."""
    return Path(source.rsplit(":", 1)[0]).parent.name


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
