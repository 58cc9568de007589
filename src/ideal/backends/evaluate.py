"""Per-capability evaluation: reference/test loss and generative accuracy.

    ideal eval --model MODEL --data DIR [--out FILE] [--scorer CAP=NAME,...] [--max-new-tokens 64]

For each capability directory of DIR:
- loss: mean over examples of l(z), the mean target NLL (the reference loss of METHOD.md);
- accuracy, for rows that carry an `answer`: batched greedy decoding from the prompt (left padding with
  an explicit attention mask and positions that count only real tokens, stopping at EOS), scored by
  the capability's scorer: `exact` (after whitespace normalisation, default), `number` (the last
  number in the output), `contains`, or a Python callable registered with `register_scorer`.
Reported per capability with its number of examples, with the mean and the worst capability.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ideal.data.rows import Domain, Example, Tokenized, render_prompt_ids, tokenize_examples
from ideal.errors import IdealError
from ideal.lm import collate, example_losses, position_ids

Scorer = Callable[[str, str], bool]
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _last_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def score_exact(output: str, answer: str) -> bool:
    return _normalise(output) == _normalise(answer)


def score_number(output: str, answer: str) -> bool:
    got, want = _last_number(output), _last_number(answer)
    return got is not None and want is not None and got == want


def score_contains(output: str, answer: str) -> bool:
    return _normalise(answer) in _normalise(output)


SCORERS: dict[str, Scorer] = {
    "exact": score_exact,
    "number": score_number,
    "contains": score_contains,
}


def register_scorer(name: str, scorer: Scorer) -> None:
    """Make `scorer(output, answer) -> bool` available as `--scorer CAP=name`."""
    SCORERS[name] = scorer


@torch.no_grad()
def greedy_decode(
    model: nn.Module, prompts: Sequence[list[int]], eos_id: int, pad_id: int, max_new_tokens: int
) -> list[list[int]]:
    """Greedy continuation of each prompt (token ids), batched with left padding; stops at EOS.

    The returned ids exclude the prompt and the EOS token.
    """
    device = next(model.parameters()).device
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :] = torch.tensor(prompt, device=device)
        mask[row, length - len(prompt) :] = 1
    positions = position_ids(mask)
    # transformers >= 5.x calls the KV cache `cache` (earlier: `past_key_values`); stubs may have none
    cache_arg = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    )
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache = getattr(out, cache_arg, None)
    generated: list[list[int]] = [[] for _ in prompts]
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    next_pos = positions[:, -1:] + 1
    for _ in range(max_new_tokens):
        token = out.logits[:, -1].argmax(-1)  # (B,)
        for row in range(len(prompts)):
            if not finished[row] and int(token[row]) != eos_id:
                generated[row].append(int(token[row]))
        finished |= token == eos_id
        if bool(finished.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if cache is None:  # a model without a cache: feed the whole sequence again
            ids = torch.cat([ids, token[:, None]], dim=1)
            out = model(
                input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False
            )
        else:
            step = {"input_ids": token[:, None], "attention_mask": mask, "position_ids": next_pos}
            out = model(**step, **{cache_arg: cache}, use_cache=True)
            cache = getattr(out, cache_arg)
        next_pos = next_pos + 1
    return generated


@torch.no_grad()
def mean_losses(
    model: nn.Module, items: list[Tokenized], pad_id: int, batch_size: int
) -> np.ndarray:
    """l(z) for every example, batched (right padding)."""
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(items), batch_size):
        batch = collate(items[s : s + batch_size], pad_id).to(device)
        logits = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=position_ids(batch.attention_mask),
            use_cache=False,
        ).logits
        out.append(example_losses(logits, batch.labels).cpu().double())
    return torch.cat(out).numpy()


@dataclass
class CapabilityResult:
    name: str
    examples: int
    loss: float
    scored: int
    accuracy: float | None
    scorer: str | None
    outputs: list[dict[str, Any]]


def evaluate_capability(
    model: nn.Module,
    tokenizer: Any,
    domain: Domain,
    scorer: str | None,
    max_length: int | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    generate: bool = True,
) -> CapabilityResult:
    """Loss over every example; accuracy over the examples with an `answer` (all or none of them).

    With `generate=False` only the loss is computed (reference sets: the method needs no decoding).
    """
    items, _ = tokenize_examples(domain.examples, tokenizer, max_length)
    losses = mean_losses(model, items, tokenizer.pad_token_id, batch_size)
    with_answer = [e for e in domain.examples if e.answer is not None] if generate else []
    if scorer is not None and not with_answer:
        raise IdealError(f"{domain.path}: --scorer asks for accuracy, but no row has an 'answer'")
    if with_answer and len(with_answer) != len(domain.examples):
        missing = next(e for e in domain.examples if e.answer is None)
        raise IdealError(
            f"{missing.source}: row has no 'answer' while other rows of '{domain.name}' do"
        )
    accuracy, outputs, name = None, [], None
    if with_answer:
        name = scorer or "exact"
        if name not in SCORERS:
            raise IdealError(f"unknown scorer '{name}'; choose from {', '.join(sorted(SCORERS))}")
        correct = 0
        for s in range(0, len(with_answer), batch_size):
            part: list[Example] = with_answer[s : s + batch_size]
            prompts = [render_prompt_ids(tokenizer, e.prompt_messages) for e in part]
            generated = greedy_decode(
                model, prompts, tokenizer.eos_token_id, tokenizer.pad_token_id, max_new_tokens
            )
            for example, ids in zip(part, generated, strict=True):
                text = tokenizer.decode(ids, skip_special_tokens=True)
                ok = SCORERS[name](text, example.answer or "")
                correct += ok
                outputs.append(
                    {
                        "source": example.source,
                        "output": text,
                        "answer": example.answer,
                        "correct": ok,
                    }
                )
        accuracy = correct / len(with_answer)
    return CapabilityResult(
        domain.name, len(items), float(losses.mean()), len(with_answer), accuracy, name, outputs
    )


def summarise(results: list[CapabilityResult]) -> dict[str, Any]:
    """The metrics JSON: per capability, mean and worst (SPEC.md metrics.json)."""
    per = {
        r.name: {
            "examples": r.examples,
            "loss": r.loss,
            "scored": r.scored,
            "accuracy": r.accuracy,
            "scorer": r.scorer,
        }
        for r in results
    }
    accuracies = {r.name: r.accuracy for r in results if r.accuracy is not None}
    losses = {r.name: r.loss for r in results}
    summary: dict[str, Any] = {
        "capabilities": per,
        "loss_mean": float(np.mean(list(losses.values()))),
        "loss_worst": max(losses.values()),
        "loss_worst_capability": max(losses, key=losses.get),
    }
    if accuracies:
        worst = min(accuracies, key=accuracies.get)
        summary.update(
            accuracy_mean=float(np.mean(list(accuracies.values()))),
            accuracy_worst=accuracies[worst],
            accuracy_worst_capability=worst,
        )
    return summary


def parse_scorers(spec: str | None) -> dict[str, str]:
    """`math=number,code=exact` -> {"math": "number", "code": "exact"}."""
    out: dict[str, str] = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise IdealError(f"--scorer: expected CAPABILITY=SCORER, got '{part}'")
        capability, name = (x.strip() for x in part.split("=", 1))
        if name not in SCORERS:
            raise IdealError(
                f"--scorer: unknown scorer '{name}'; choose from {', '.join(sorted(SCORERS))}"
            )
        out[capability] = name
    return out


def run_eval(
    model_dir: str | Path,
    data: str | Path,
    out: str | Path | None = None,
    scorers: dict[str, str] | None = None,
    max_length: int | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
) -> dict[str, Any]:
    """`ideal eval`: every capability directory of `data`; writes the JSON to `out` when given."""
    from ideal.artifacts import atomic_write_json
    from ideal.data.rows import load_domains
    from ideal.hf import load_causal_lm, load_tokenizer

    domains = load_domains(data)
    scorers = scorers or {}
    unknown = sorted(set(scorers) - set(domains))
    if unknown:
        raise IdealError(
            f"--scorer names capabilities that {data} does not have: {', '.join(unknown)}"
        )
    model = load_causal_lm(model_dir)
    tokenizer = load_tokenizer(model_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    results = [
        evaluate_capability(
            model, tokenizer, d, scorers.get(name), max_length, max_new_tokens, batch_size
        )
        for name, d in domains.items()
    ]
    summary = summarise(results)
    summary["model"] = str(Path(model_dir).resolve())
    summary["data"] = str(Path(data).resolve())
    if out is not None:
        atomic_write_json(out, {**summary, "outputs": {r.name: r.outputs for r in results}})
    return summary
