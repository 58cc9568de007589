"""Causal-LM batches: padding tokenized examples, and the per-example loss of docs/method.md.

l(z) = mean negative log-likelihood over z's target tokens (labels != -100, shifted by one).

A set's loss is one of two objectives (`influence.loss`, docs/method.md "Setting"), both written as

    L(S) = sum_z scale_z NLL_z / sum_z mass_z        NLL_z: the SUMMED target NLL of z (T_z tokens)

    example:  scale_z = w_z / T_z,  mass_z = w_z        the weighted mean of l(z)
    token:    scale_z = w_z,        mass_z = w_z T_z    the token mean over the set (TRL, ...)

with w_z the example's weight (copies). `loss_scales` gives both; every pass of the influence step
(gradients, curvature, Gauss-Newton products) weighs examples through it.

Logits only where a loss needs them (`target_logits`): every loss over targets (training,
evaluation, choice scores, the influence passes) applies the LM head (vocab x hidden) only to the
hidden states at positions whose next token is a target, never to every position. The numbers are
those of the full logits up to float round-off; the head's cost and the (B, T, V) logits, most of
them at prompt and padding positions, are gone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ideal.data.rows import IGNORE_INDEX, Tokenized
from ideal.errors import IdealError
from ideal.settings import LOSSES

Tensor = torch.Tensor


@dataclass
class Batch:
    input_ids: Tensor  # (B, T)
    attention_mask: Tensor  # (B, T) 1 = real token
    labels: Tensor  # (B, T) -100 = no loss (prompt, padding)
    weights: Tensor  # (B,) example weights (copies in the mixture sample)
    keys: Tensor  # (B,) stable example ids (seed the per-example label sampling)
    # the rows, in order (what a feature cache looks them up by: ideal.backends.training.top_layers)
    rows: tuple[Tokenized, ...] = ()

    @property
    def targets(self) -> Tensor:
        """(B,) number of target tokens T_z (labels after the first position)."""
        return (self.labels[:, 1:] != IGNORE_INDEX).sum(1)

    def to(self, device: torch.device | str) -> Batch:
        tensors = (self.input_ids, self.attention_mask, self.labels, self.weights, self.keys)
        return Batch(*(t.to(device) for t in tensors), rows=self.rows)


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
    return Batch(ids, mask, labels, w, k, tuple(items))


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
    """(B,) mean target NLL per example: l(z) of docs/method.md."""
    nll, mask = token_nll(logits, labels)
    return nll.sum(1) / mask.sum(1).clamp_min(1)


def sample_labels(logits: Tensor, labels: Tensor, keys: Tensor, seed: int) -> Tensor:
    """Labels drawn from the model's own predictive distribution at the target positions (true Fisher).

    Each example draws from its own generator, seeded by (seed, key), and only at its target
    positions (Gumbel-max): the draws do not depend on batch size, batch order or padding.
    """
    mask = labels[:, 1:] != IGNORE_INDEX  # logits at t predict t+1
    return sample_target_labels(TargetLogits(logits[:, :-1][mask], mask), labels, keys, seed)


# ----------------------------------------------------------------------------- target-only logits


@dataclass
class TargetLogits:
    """A batch's logits at its target positions only: the rows of `logits` are the positions t with
    mask[z, t] (the token t+1 is a target), example by example, in position order."""

    logits: Tensor  # (N, V), N = sum_z T_z
    mask: Tensor  # (B, T-1) bool: labels[:, 1:] != IGNORE_INDEX

    def nll(self, labels: Tensor) -> Tensor:
        """(B, T-1) NLL of `labels` (B, T, shifted by one) at the target positions and 0 elsewhere,
        in float32 (or float64): `token_nll`'s first output, from the gathered logits."""
        logits = self.logits if self.logits.dtype == torch.float64 else self.logits.float()
        picked = labels[:, 1:][self.mask].clamp_min(0)  # (N,)
        nll = torch.nn.functional.cross_entropy(logits, picked, reduction="none")  # (N,)
        # laid back into (B, T-1) so that every per-example sum adds the same terms in the same
        # order as the full-logit path
        return nll.new_zeros(self.mask.shape).masked_scatter(self.mask, nll)

    def example_losses(self, labels: Tensor) -> Tensor:
        """(B,) mean target NLL per example: l(z) of docs/method.md, as `example_losses`."""
        return self.nll(labels).sum(1) / self.mask.sum(1).clamp_min(1)


def output_head(model: nn.Module) -> nn.Module | None:
    """The LM head of a causal LM: its output embeddings, through DDP, torch.compile and peft
    wrappers (peft's `get_base_model()`, the transformers model it adapts); None if it has none."""
    for _ in range(8):  # unwrap DDP (.module), torch.compile (._orig_mod), peft (get_base_model)
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel) or (
            not hasattr(model, "get_output_embeddings")
            and isinstance(getattr(model, "module", None), nn.Module)
        ):
            model = model.module
        else:
            break
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) else None


def touches_head(model: nn.Module, layers: Iterable[nn.Module]) -> bool:
    """Whether any of `layers` is the LM head or lies inside it (a LoRA adapter on the head): their
    input statistics are per position, so the passes that hook them keep the full logits."""
    head = output_head(model)
    if head is None:
        return False
    inside = {id(m) for m in head.modules()}
    return any(id(layer) in inside for layer in layers)


def target_logits(
    model: nn.Module,
    batch: Batch,
    real_positions: bool = False,
    full: bool = False,
    inputs_embeds: Tensor | None = None,
) -> TargetLogits:
    """Run the causal LM on `batch` and return its logits at the target positions only.

    The model's own forward runs (so DDP's gradient synchronisation, peft adapters, autocast and
    whatever the family does after its head, such as Gemma's elementwise logit soft-capping, stay
    as they are) with a forward pre-hook on its head (`output_head`) that hands the head only the
    hidden states at the target positions: the head sees N = sum_z T_z rows instead of B x T.
    `real_positions` passes `position_ids(attention_mask)` (positions that count only real tokens,
    for left padding), as the evaluation and influence passes do; without it the model derives its
    own, as training does.

    Fallback, exact either way: a model with no separable head (no `get_output_embeddings`, or a
    forward that does not call it as a module: the hook never runs), or `full=True`, computes the
    logits at every position and gathers them. A head called on anything but the (B, T, hidden)
    final hidden states, or more than once, is refused with one line.

    transformers >= 5 can do the same through `logits_to_keep=<(B, T) bool mask>`; the hook also
    serves the older versions this project supports.

    `inputs_embeds` (B, T, hidden), given, replaces `batch.input_ids` as the model's input (the
    cached states entering the trained blocks: ideal.backends.training.top_layers).
    """
    mask = batch.labels[:, 1:] != IGNORE_INDEX  # (B, T-1): logits at t predict t+1
    inputs: dict[str, Any] = {
        "attention_mask": batch.attention_mask,
        "use_cache": False,
    }
    if inputs_embeds is None:
        inputs["input_ids"] = batch.input_ids
    else:
        inputs["inputs_embeds"] = inputs_embeds
    if real_positions:
        inputs["position_ids"] = position_ids(batch.attention_mask)
    head = None if full else output_head(model)
    if head is None:
        logits = model(**inputs).logits  # (B, T, V)
        return TargetLogits(logits[:, :-1][mask], mask)
    rows, length = batch.input_ids.shape
    keep = torch.nn.functional.pad(mask, (0, 1))  # (B, T): hidden state t feeds a target logit
    calls = 0

    def gather(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        nonlocal calls
        hidden = args[0]
        calls += 1
        if calls > 1 or hidden.dim() != 3 or tuple(hidden.shape[:2]) != (rows, length):
            raise IdealError(
                f"target-only logits: {type(model).__name__}'s head was called on "
                f"{tuple(hidden.shape)}, not once on the (B={rows}, T={length}, hidden) states"
            )
        return (hidden[keep.to(hidden.device)].unsqueeze(0), *args[1:])  # (1, N, hidden)

    handle = head.register_forward_pre_hook(gather)
    try:
        logits = model(**inputs).logits
    finally:
        handle.remove()
    if calls == 0:  # the head is not a module call of the forward: full logits came back
        return TargetLogits(logits[:, :-1][mask], mask)
    return TargetLogits(logits.reshape(-1, logits.shape[-1]), mask)  # (N, V)


def target_nll(
    model: nn.Module,
    batch: Batch,
    real_positions: bool = False,
    full: bool = False,
    inputs_embeds: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`token_nll(model(batch).logits, batch.labels)` from the logits at the target positions only:
    the per-token NLL (B, T-1), 0 off target, and the target mask (B, T-1)."""
    targets = target_logits(model, batch, real_positions, full, inputs_embeds)
    return targets.nll(batch.labels), targets.mask


def sample_target_labels(targets: TargetLogits, labels: Tensor, keys: Tensor, seed: int) -> Tensor:
    """`sample_labels` from the logits at the target positions: (B, T) labels, drawn at the target
    positions from the model's predictive distribution; the same draws as from the full logits."""
    sampled = labels.clone()
    counts = targets.mask.sum(1).tolist()
    start = 0
    for row, count in enumerate(counts):
        if count == 0:
            continue
        positions = targets.mask[row].nonzero().squeeze(1)
        row_logits = targets.logits[start : start + count].detach().float()  # (n, V)
        start += count
        generator = torch.Generator(device=row_logits.device)
        generator.manual_seed(seed * 1_000_003 + int(keys[row]))
        uniform = torch.rand(row_logits.shape, generator=generator, device=row_logits.device)
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
        sampled[row, positions + 1] = (row_logits + gumbel).argmax(-1)
    return sampled
