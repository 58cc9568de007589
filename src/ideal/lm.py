"""Causal-LM batches: padding tokenized examples, and the per-example loss of METHOD.md.

l(z) = mean negative log-likelihood over z's target tokens (labels != -100, shifted by one).

A set's loss is one of two objectives (`influence.loss`, METHOD.md "Setting"), both written as

    L(S) = sum_z scale_z NLL_z / sum_z mass_z        NLL_z: the SUMMED target NLL of z (T_z tokens)

    example:  scale_z = w_z / T_z,  mass_z = w_z        the weighted mean of l(z)
    token:    scale_z = w_z,        mass_z = w_z T_z    the token mean over the set (TRL, ...)

with w_z the example's weight (copies). `loss_scales` gives both; every pass of the influence step
(gradients, curvature, Gauss-Newton products) weighs examples through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ideal.data.rows import IGNORE_INDEX, Tokenized
from ideal.settings import LOSSES

Tensor = torch.Tensor


@dataclass
class Batch:
    input_ids: Tensor  # (B, T)
    attention_mask: Tensor  # (B, T) 1 = real token
    labels: Tensor  # (B, T) -100 = no loss (prompt, padding)
    weights: Tensor  # (B,) example weights (copies in the mixture sample)
    keys: Tensor  # (B,) stable example ids (seed the per-example label sampling)

    @property
    def targets(self) -> Tensor:
        """(B,) number of target tokens T_z (labels after the first position)."""
        return (self.labels[:, 1:] != IGNORE_INDEX).sum(1)

    def to(self, device: torch.device | str) -> Batch:
        tensors = (self.input_ids, self.attention_mask, self.labels, self.weights, self.keys)
        return Batch(*(t.to(device) for t in tensors))


def collate(
    items: Sequence[Tokenized],
    pad_id: int,
    weights: Sequence[float] | None = None,
    left: bool = False,
    keys: Sequence[int] | None = None,
) -> Batch:
    """Pad to the longest example (right padding by default; `left` for generation)."""
    length = max(len(item.input_ids) for item in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        span = slice(length - n, length) if left else slice(0, n)
        ids[row, span] = torch.tensor(item.input_ids)
        mask[row, span] = 1
        labels[row, span] = torch.tensor(item.labels)
    w = (
        torch.ones(len(items))
        if weights is None
        else torch.tensor(list(weights), dtype=torch.float32)
    )
    k = torch.arange(len(items)) if keys is None else torch.tensor(list(keys), dtype=torch.long)
    return Batch(ids, mask, labels, w, k)


def loss_scales(weights: Tensor, targets: Tensor, loss: str = "example") -> tuple[Tensor, Tensor]:
    """(scale_z, mass_z) per example of the objective `loss` (module docstring), from the
    examples' weights w_z and target-token counts T_z (float tensors of shape (B,))."""
    if loss == "example":
        return weights / targets, weights
    if loss == "token":
        return weights, weights * targets
    raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions that count only real tokens, so left padding does not shift them."""
    return (attention_mask.cumsum(1) - 1).clamp_min(0)


def token_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token NLL (B, T-1) in float32 (or float64) with next-token shift, and its target mask (B, T-1)."""
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    logits = logits if logits.dtype == torch.float64 else logits.float()  # never below float32
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), shifted.clamp_min(0), reduction="none"
    )
    return nll * mask, mask


def example_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """(B,) mean target NLL per example: l(z) of METHOD.md."""
    nll, mask = token_nll(logits, labels)
    return nll.sum(1) / mask.sum(1).clamp_min(1)


def sample_labels(logits: Tensor, labels: Tensor, keys: Tensor, seed: int) -> Tensor:
    """Labels drawn from the model's own predictive distribution at the target positions (true Fisher).

    Each example draws from its own generator, seeded by (seed, key), and only at its target
    positions (Gumbel-max): the draws do not depend on batch size, batch order or padding.
    """
    sampled = labels.clone()
    for row in range(labels.shape[0]):
        positions = (
            (labels[row, 1:] != IGNORE_INDEX).nonzero().squeeze(1)
        )  # logits at t predict t+1
        if positions.numel() == 0:
            continue
        row_logits = logits[row, positions].detach().float()  # (n, V)
        generator = torch.Generator(device=row_logits.device)
        generator.manual_seed(seed * 1_000_003 + int(keys[row]))
        uniform = torch.rand(row_logits.shape, generator=generator, device=row_logits.device)
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
        sampled[row, positions + 1] = (row_logits + gumbel).argmax(-1)
    return sampled
