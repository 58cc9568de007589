"""Proxy runs: domain weights learned online while a proxy model trains (DoReMi, DoGE), for SFT.

Both methods (Xie et al. 2023, DoReMi; Fan et al. 2024, DoGE) train a proxy model with per-domain
minibatches, move the domain weights alpha at every step (the updates are `ideal.methods.rules.doremi_step`
and `ideal.methods.rules.doge_step`) and return the weights averaged over the steps; the next round's
volumes are then proportional to them, at the same total. Where SFT forced a choice:

- the proxy is the base model fine-tuned with the round's recipe (optimizer, learning rate schedule,
  LoRA or not, number of steps unless `update.proxy_steps`), not a small model pre-trained from
  scratch; every domain gets ceil(batch_size / k) examples per step, drawn from its whole pool;
- losses are over completion tokens only (the SFT loss), never over prompts;
- DoReMi's reference model is the model trained on the round's mixture (round 0: D0, the mixture
  the user gave) instead of a model trained on uniform weights; the excess loss is per token,
  clipped at 0, averaged over the domain's target tokens (the paper's lambda), and the proxy
  minimises sum_i alpha_i x (domain i's mean token loss), eta = 1, c = 1e-3 as in the paper;
- DoGE's target is the reference sets (its out-of-domain variant: the capabilities we optimise are
  not training domains): W_i = lr_t <grad l_i, grad L_ref>, the first-order decrease of the mean
  reference loss from a step of size lr_t on domain i, with L_ref the mean over capabilities of
  their mean example loss; the proxy steps on sum_i alpha_i grad l_i. Per-domain gradients are
  whole-model gradients, held k at a time (as in the DoGE code).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ideal.data.rows import Tokenized
from ideal.errors import IdealError
from ideal.lm import collate, target_nll
from ideal.methods.rules import doge_step, doremi_step

METHODS = ("doremi", "doge")
StepHook = Callable[[int, int], None]


@dataclass(frozen=True)
class ProxySettings:
    method: str  # doremi | doge
    steps: int
    lr: float
    batch_size: int  # examples per step over all domains (ceil(batch_size / k) per domain)
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eta: float = 1.0  # step size of the weight update (DoReMi eta; DoGE 1 / mu)
    smoothing: float = 1e-3  # DoReMi's c (toward uniform)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise IdealError(
                f"proxy method must be one of {', '.join(METHODS)}, got {self.method!r}"
            )
        if self.steps < 1:
            raise IdealError(f"update.proxy_steps must be >= 1, got {self.steps}")
        if not self.eta > 0:
            raise IdealError(f"update.proxy_eta must be > 0, got {self.eta}")


@dataclass
class ProxyResult:
    domains: list[str]
    weights: np.ndarray  # average of alpha over the steps: the method's answer
    history: list[dict[str, Any]] = field(default_factory=list)  # every few steps
    seconds: float = 0.0


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _draw(items: list[Tokenized], count: int, rng: np.random.Generator) -> list[Tokenized]:
    return [items[i] for i in rng.integers(0, len(items), size=count)]


def _token_nll(
    model: nn.Module, items: list[Tokenized], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL (B, T-1), 0 off target, and the target mask, with the head applied at the
    target positions only (`ideal.lm.target_nll`)."""
    return target_nll(model, collate(items, pad_id).to(_device(model)))


def _mean_token_loss(nll: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return nll.sum() / mask.sum().clamp_min(1)


def learn_domain_weights(
    model: nn.Module,
    domains: dict[str, list[Tokenized]],
    settings: ProxySettings,
    pad_id: int,
    reference_model: nn.Module | None = None,
    references: dict[str, list[Tokenized]] | None = None,
    on_step: StepHook | None = None,
) -> ProxyResult:
    """Train `model` (the proxy, modified in place) and learn domain weights; see the module doc.

    DoReMi needs `reference_model`; DoGE needs `references` (capability -> examples).
    """
    from transformers import get_cosine_schedule_with_warmup

    names = list(domains)
    if any(not domains[d] for d in names):
        raise IdealError("proxy run: every domain needs at least one example")
    if settings.method == "doremi" and reference_model is None:
        raise IdealError("DoReMi needs a reference model")
    if settings.method == "doge" and not references:
        raise IdealError("DoGE needs reference sets")
    k = len(names)
    per_domain = math.ceil(settings.batch_size / k)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, round(settings.warmup_ratio * settings.steps), settings.steps
    )
    alpha = np.full(k, 1.0 / k)
    total = np.zeros(k)
    history: list[dict[str, Any]] = []
    every = max(1, settings.steps // 100)
    model.train()
    if reference_model is not None:
        reference_model.eval()
    start = time.perf_counter()
    for step in range(settings.steps):
        rng = np.random.default_rng([settings.seed, step, 6007])
        chosen = {d: _draw(domains[d], per_domain, rng) for d in names}
        lr = scheduler.get_last_lr()[0]
        if settings.method == "doremi":
            assert reference_model is not None
            alpha, signal, loss = _doremi_step(
                model, reference_model, chosen, alpha, settings, pad_id
            )
        else:
            assert references is not None
            picked = {r: _draw(items, per_domain, rng) for r, items in references.items()}
            alpha, signal, loss = _doge_step(
                model, params, chosen, picked, alpha, lr, settings, pad_id
            )
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        total += alpha
        if step % every == 0 or step == settings.steps - 1:
            history.append(
                {
                    "step": step + 1,
                    "alpha": dict(zip(names, alpha.tolist(), strict=True)),
                    "signal": dict(zip(names, signal.tolist(), strict=True)),
                    "loss": loss,
                }
            )
        if on_step is not None:
            on_step(step + 1, settings.steps)
    model.eval()
    return ProxyResult(names, total / settings.steps, history, time.perf_counter() - start)


def _doremi_step(
    model: nn.Module,
    reference_model: nn.Module,
    chosen: dict[str, list[Tokenized]],
    alpha: np.ndarray,
    settings: ProxySettings,
    pad_id: int,
) -> tuple[np.ndarray, np.ndarray, float]:
    """lambda_i = clipped per-token excess loss over the reference model; alpha update; backward."""
    losses, excess = [], []
    for items in chosen.values():
        nll, mask = _token_nll(model, items, pad_id)
        with torch.no_grad():
            ref_nll, _ = _token_nll(reference_model, items, pad_id)
        gap = ((nll.detach() - ref_nll).clamp_min(0.0) * mask).sum() / mask.sum().clamp_min(1)
        excess.append(float(gap))
        losses.append(_mean_token_loss(nll, mask))
    signal = np.array(excess)
    alpha = doremi_step(alpha, signal, settings.eta, settings.smoothing)
    loss = sum(float(a) * part for a, part in zip(alpha, losses, strict=True))
    loss.backward()
    return alpha, signal, float(loss.detach())


def _doge_step(
    model: nn.Module,
    params: list[torch.Tensor],
    chosen: dict[str, list[Tokenized]],
    references: dict[str, list[Tokenized]],
    alpha: np.ndarray,
    lr: float,
    settings: ProxySettings,
    pad_id: int,
) -> tuple[np.ndarray, np.ndarray, float]:
    """W_i = lr <grad l_i, grad L_ref>; alpha update; p.grad = sum_i alpha_i grad l_i."""

    def gradient(items: list[Tokenized]) -> tuple[list[torch.Tensor], float]:
        nll, mask = _token_nll(model, items, pad_id)
        loss = (nll.sum(1) / mask.sum(1).clamp_min(1)).mean()  # mean over examples of l(z)
        return list(torch.autograd.grad(loss, params, allow_unused=True)), float(loss.detach())

    def zero_if_none(grads: list[torch.Tensor | None]) -> list[torch.Tensor]:
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]

    domain_grads, domain_losses = [], []
    for items in chosen.values():
        grads, value = gradient(items)
        domain_grads.append(zero_if_none(grads))
        domain_losses.append(value)
    reference = [torch.zeros_like(p) for p in params]
    for items in references.values():
        grads, _ = gradient(items)
        for acc, g in zip(reference, zero_if_none(grads), strict=True):
            acc += g / len(references)
    signal = np.array(
        [
            lr * float(sum((g * r).sum() for g, r in zip(grads, reference, strict=True)))
            for grads in domain_grads
        ]
    )
    alpha = doge_step(alpha, signal, settings.eta)
    for i, p in enumerate(params):
        p.grad = sum(float(a) * grads[i] for a, grads in zip(alpha, domain_grads, strict=True))
    loss = float(np.dot(alpha, domain_losses))
    return alpha, signal, loss


def proxy_document(result: ProxyResult, settings: ProxySettings) -> dict[str, Any]:
    """proxy.json: the averaged weights (what the rule reads), the trajectory, settings, seconds."""
    return {
        "method": settings.method,
        "domains": result.domains,
        "weights": dict(zip(result.domains, result.weights.tolist(), strict=True)),
        "history": result.history,
        "settings": asdict(settings),
        "seconds": {"total": result.seconds},
    }
