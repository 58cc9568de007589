"""Per-capability evaluation: reference/test loss and generative accuracy.

    ideal eval --model MODEL --data DIR [--out FILE] [--scorer CAP=NAME,...] [--max-new-tokens 64]

For each capability directory of DIR:
- loss: mean over examples of l(z), the mean target NLL (the reference loss of docs/method.md);
- accuracy, for rows that carry an `answer`: batched greedy decoding with transformers' `generate`
  (left padding with an explicit attention mask, stopping at EOS) from the row's own prompt ids, the
  prompt part of the very ids the loss is computed on (and training trains on), scored by the
  capability's scorer: `exact` (after whitespace normalisation, default), `number` (the last
  number in the output), `contains`, the instruction-following checks of `scorers.py` (`words`,
  `keywords`, `no_commas`, `lowercase`, `ends_with`, `json`, `instructions`), or a Python callable
  registered with `register_scorer`;
- or, with the scorer `choice`, multiple-choice accuracy without generation: the log-likelihood of
  each of the row's `choices` given its prompt (lm-eval's `acc`, and `acc_norm` as
  `accuracy_norm`; `scorers.py` documents the row format).
Reported per capability with its number of examples, with the mean and the worst capability.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import GenerationConfig

from ideal.backends.evaluation.scorers import CHOICE, INSTRUCTION_SCORERS, score_choices
from ideal.backends.settings import EvalConfig
from ideal.backends.training.top_layers import FeatureCache
from ideal.data.rows import Domain, Tokenized, tokenize_examples
from ideal.errors import IdealError
from ideal.lm import collate, target_logits
from ideal.settings import default_of

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
    **INSTRUCTION_SCORERS,
}


def scorer_names() -> list[str]:
    """Every scorer a capability may name: the generative ones and `choice`."""
    return sorted({*SCORERS, CHOICE})


def register_scorer(name: str, scorer: Scorer) -> None:
    """Make `scorer(output, answer) -> bool` available as `--scorer CAP=name`."""
    SCORERS[name] = scorer


@torch.no_grad()
def greedy_decode(
    model: nn.Module, prompts: Sequence[list[int]], eos_id: int, pad_id: int, max_new_tokens: int
) -> list[list[int]]:
    """Greedy continuation of each prompt (token ids) with `model.generate`, batched with left
    padding and an explicit attention mask (the model derives positions that count only real
    tokens, and keeps whatever cache its family uses); each row stops at EOS.

    The returned ids exclude the prompt and the EOS token.
    """
    device = next(model.parameters()).device
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long, device=device)  # (B, T)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :] = torch.tensor(prompt, device=device)
        mask[row, length - len(prompt) :] = 1
    # Every field that would otherwise come from the model's generation_config.json (sampling,
    # penalties) is set to its neutral value: decoding is plain argmax whatever the checkpoint says.
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        min_length=0,
        temperature=1.0,
        top_k=50,
        top_p=1.0,
        typical_p=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    generated = []
    for row in out[:, length:].tolist():  # (B, <= max_new_tokens); rows that ended early are padded
        generated.append(row[: row.index(eos_id)] if eos_id in row else row)
    return generated


@torch.no_grad()
def mean_losses(
    model: nn.Module,
    items: list[Tokenized],
    pad_id: int,
    batch_size: int,
    full_logits: bool = False,
    features: FeatureCache | None = None,
) -> np.ndarray:
    """l(z) for every example, batched (right padding); the head runs at target positions only.
    With `features` the frozen bottom's states of the rows come from that cache (filled here
    when missing) and only the top blocks run."""
    device = next(model.parameters()).device
    forward = target_logits
    if features is not None:
        features.fill(model, items, pad_id, batch_size)
        forward = features.target_logits
    out = []
    for s in range(0, len(items), batch_size):
        batch = collate(items[s : s + batch_size], pad_id).to(device)
        targets = forward(model, batch, real_positions=True, full=full_logits)
        out.append(targets.example_losses(batch.labels).cpu().double())
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
    accuracy_norm: float | None = None  # `choice`: acc_norm (length-normalised log-likelihood)
    row_losses: list[float] | None = None  # l(z) of every row, in the domain's order


def evaluate_capability(
    model: nn.Module,
    tokenizer: Any,
    domain: Domain,
    scorer: str | None,
    max_length: int | None = None,
    max_new_tokens: int = default_of(EvalConfig, "max_new_tokens"),
    batch_size: int = default_of(EvalConfig, "batch_size"),
    generate: bool = True,
    features: FeatureCache | None = None,
) -> CapabilityResult:
    """Loss over every example; accuracy over the examples with an `answer` (all or none of them).

    With `generate=False` only the loss is computed (reference sets: the method needs no decoding).
    `features`: the cached states of the frozen bottom (ideal.backends.training.top_layers) serve the loss
    and the `choice` scorer's likelihoods; generation runs the whole model.
    """
    items, _ = tokenize_examples(domain.examples, tokenizer, max_length)  # one per row, in order
    losses = mean_losses(model, items, tokenizer.pad_token_id, batch_size, features=features)
    with_answer = [e for e in domain.examples if e.answer is not None] if generate else []
    if scorer is not None and not with_answer:
        raise IdealError(f"{domain.path}: --scorer asks for accuracy, but no row has an 'answer'")
    if with_answer and len(with_answer) != len(domain.examples):
        missing = next(e for e in domain.examples if e.answer is None)
        raise IdealError(
            f"{missing.source}: row has no 'answer' while other rows of '{domain.name}' do"
        )
    accuracy, outputs, name = None, [], None
    if with_answer and scorer == CHOICE:
        chosen = score_choices(
            model, tokenizer, domain.examples, max_length, batch_size, features=features
        )
        return CapabilityResult(
            domain.name,
            len(items),
            float(losses.mean()),
            len(with_answer),
            chosen.accuracy,
            CHOICE,
            chosen.outputs,
            chosen.accuracy_norm,
            losses.tolist(),
        )
    if with_answer:
        name = scorer or "exact"
        if name not in SCORERS:
            raise IdealError(f"unknown scorer '{name}'; choose from {', '.join(scorer_names())}")
        correct = 0
        for s in range(0, len(items), batch_size):
            part = items[s : s + batch_size]
            examples = domain.examples[s : s + batch_size]
            prompts = []
            for item in part:
                try:  # the prompt part of the very ids the loss above was computed on
                    prompts.append(item.prompt_ids)
                except ValueError as err:
                    raise IdealError(f"{item.source}: {err}") from None
            generated = greedy_decode(
                model, prompts, tokenizer.eos_token_id, tokenizer.pad_token_id, max_new_tokens
            )
            for example, ids in zip(examples, generated, strict=True):
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
        domain.name, len(items), float(losses.mean()), len(with_answer), accuracy, name, outputs,
        row_losses=losses.tolist(),
    )  # fmt: skip


def summarise(results: list[CapabilityResult]) -> dict[str, Any]:
    """The metrics JSON: per capability, mean and worst (SPEC.md metrics.json)."""
    per = {
        r.name: {
            "examples": r.examples,
            "loss": r.loss,
            "scored": r.scored,
            "accuracy": r.accuracy,
            "scorer": r.scorer,
            **({"accuracy_norm": r.accuracy_norm} if r.accuracy_norm is not None else {}),
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
        if name not in scorer_names():
            raise IdealError(
                f"--scorer: unknown scorer '{name}'; choose from {', '.join(scorer_names())}"
            )
        out[capability] = name
    return out


def run_eval(
    model_dir: str | Path,
    data: str | Path,
    out: str | Path | None = None,
    scorers: dict[str, str] | None = None,
    max_length: int | None = None,
    max_new_tokens: int = default_of(EvalConfig, "max_new_tokens"),
    batch_size: int = default_of(EvalConfig, "batch_size"),
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
