"""Refinement of the k reference directions toward the exact damped Gauss-Newton solution (`--refine K`).

EK-FAC's error is its Kronecker eigenbasis within each layer (docs/results.md), and IDEAL needs only
the k products v_j = (G + lambda)^{-1} g_Rj, so those k are refined: K steps of preconditioned
conjugate gradient (PCG) on

    (G_C + Lambda) v_j = g_Rj        for every reference j at once (one step size per reference)

    G_C = sum_z scale_z sum_t J_t^T (diag p_t - p_t p_t^T) J_t / sum_z mass_z

((scale, mass) = (w_z / T_z, w_z) for `influence.loss: example`, (w_z, w_z T_z) for `token`:
ideal.lm.loss_scales), the exact Gauss-Newton matrix of the mixture loss that the model was trained
with, over the curvature sample C (the weighted examples
the EK-FAC factors are fitted on; `exact.dense_gauss_newton` is its dense form), Lambda = lambda_l I
on layer l (the preconditioner's own damping), the EK-FAC inverse as preconditioner and its solution
as the start (scaled per reference to minimise the error's (G_C + Lambda)-norm: free, see
`conjugate_gradient`). G_C is used only through products G_C V, never formed:

    J V   forward mode: a dual forward pass in which every selected layer adds V_l [a | 1] to its
          output's tangent (a: the layer's input);
    H     per target token t: p_t * u - p_t (p_t^T u) with u = (J V)_t, scaled by scale_z;
    J^T   reverse mode from the logits: sum_t g_t [a_t | 1]^T per layer, as for a gradient.

The head runs at the target positions only (`ideal.lm.target_logits`: H is zero elsewhere), unless
a selected layer is the head or lies in it. The products run through the passes' `forward` (a
feature cache's, with `train.top_layers`: only the top blocks, from the states entering them, as
every other pass of the influence step).

Attention runs through the math SDPA kernel meanwhile: the fused kernels (flash, memory-efficient,
CPU flash) have neither forward-mode derivatives nor double backward (torch 2.13), so neither
`torch.func.jvp` nor the double-vjp trick gets through HF Llama, Qwen2 or GPT-2 with them; the math
kernel is made of differentiable ops (measured: one product costs 2.0-2.5x a forward+backward of
the same rows on CPU). A model loaded with another attention (flash_attention_2) is a clear error.

The k directions ride in one pass: the batch is repeated k times along the batch dimension and copy
j carries direction j's tangent; a forward holds max(1, B // k) examples x k rows (B: --batch-size),
about as many rows as the other passes.

Cost: K iterations take K + 1 products, each one dual forward and one backward over C repeated k
times (the start's scale and residual need one). Memory beside the directions: r, z, p and A p,
(k, out, in) float32 per layer. With several layer groups (`--memory`) each group is refined on
its own diagonal block of G_C: the cross-group blocks would need every group's directions at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as forward_ad
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ideal.distributed import all_reduce_
from ideal.errors import IdealError
from ideal.lm import Batch, TargetLogits, loss_scales, target_logits, touches_head

log = logging.getLogger(__name__)

Vectors = dict[str, torch.Tensor]  # layer name -> (k, out, in)


class GaussNewton:
    """V -> G_C V for k vectors per layer, over this process's batches of the curvature sample,
    summed across processes. `weight_total` is sum_z mass_z over the whole sample (every process):
    sum_z w_z for `loss` example, sum_z w_z T_z for token."""

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, nn.Module],
        batches: list[Batch],
        weight_total: float,
        progress: Callable[[Iterable[Batch], int, str], Iterable[Batch]] | None = None,
        loss: str = "example",
        forward: Callable[..., TargetLogits] = target_logits,
    ):
        self.model, self.layers, self.batches = model, layers, batches
        self.loss = loss
        self.forward = forward  # a batch's target logits (ideal.influence.passes.Forward)
        self.weight_total = weight_total
        self.progress = progress or (lambda items, total, description: items)
        self.device = next(model.parameters()).device
        self.full_logits = touches_head(model, layers.values())
        self.description = "refine: Gauss-Newton products"

    def __call__(self, vectors: Vectors) -> Vectors:
        """G_C V, in the vectors' dtype (float32 for the directions, float64 in the tests)."""
        out = {n: torch.zeros_like(v) for n, v in vectors.items()}
        for batch in self.progress(self.batches, len(self.batches), self.description):
            self.add_batch(batch.to(self.device), vectors, out)
        for name in out:
            all_reduce_(out[name]).div_(self.weight_total)
        return out

    def add_batch(self, batch: Batch, vectors: Vectors, out: Vectors) -> None:
        """out += sum_z scale_z sum_t J_t^T H_t J_t V over one batch, layer by layer."""
        k = next(iter(vectors.values())).shape[0]
        inputs: dict[str, torch.Tensor] = {}  # (k, b, T, in [+1]) primal inputs, one copy per j
        outputs: dict[str, torch.Tensor] = {}  # layer outputs, in the autograd graph
        handles = [
            module.register_forward_hook(_tangent_hook(name, vectors[name], k, inputs, outputs))
            for name, module in self.layers.items()
        ]
        rows = (batch.input_ids, batch.attention_mask, batch.labels)
        copies = Batch(
            *(t.repeat(k, 1) for t in rows), batch.weights.repeat(k), batch.keys.repeat(k),
            rows=batch.rows * k,  # copy j's rows, in the order of the repeated tensors
        )  # fmt: skip
        try:
            with sdpa_kernel([SDPBackend.MATH]), forward_ad.dual_level():
                logits = self.forward(
                    self.model, copies, real_positions=True, full=self.full_logits
                ).logits
                primal, tangent = forward_ad.unpack_dual(logits)  # (k N, V) each: target positions
        except (NotImplementedError, RuntimeError) as error:
            if "forward AD" not in str(error):
                raise
            raise IdealError(
                "--refine: the model's attention has no forward-mode derivative "
                f"({type(self.model).__name__}, attention '{_attention(self.model)}'); load it "
                "with attn_implementation='sdpa' or 'eager'"
            ) from error
        finally:
            for handle in handles:
                handle.remove()
        if tangent is None:  # no selected layer reached the logits: G_C V = 0
            return
        with torch.no_grad():
            cotangent = _softmax_hessian_product(primal, tangent, batch, k, self.loss)
        names = list(outputs)
        grads = torch.autograd.grad(primal, [outputs[n] for n in names], cotangent,
                                    allow_unused=True)  # fmt: skip
        for name, grad in zip(names, grads, strict=True):
            if grad is None:  # the layer does not reach the logits
                continue
            a = inputs.pop(name)
            work = torch.float64 if a.dtype == torch.float64 else torch.float32
            g = grad.reshape(*a.shape[:3], grad.shape[-1])  # (k, b, T, out)
            out[name] += torch.einsum("kbto,kbti->koi", g.to(work), a.to(work)).to(out[name].dtype)


def _tangent_hook(
    name: str,
    vector: torch.Tensor,
    k: int,
    inputs: dict[str, torch.Tensor],
    outputs: dict[str, torch.Tensor],
):
    """Forward hook: record the layer's input and output, add V_j [a | 1] to copy j's tangent."""

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor):
        a = forward_ad.unpack_dual(args[0]).primal.detach()  # (k b, T, in)
        if module.bias is not None:
            a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
        rows, tokens = a.shape[:2]
        blocks = a.reshape(k, rows // k, tokens, a.shape[-1])  # copy j: rows j b .. (j+1) b - 1
        delta = torch.einsum("kbti,koi->kbto", blocks, vector.to(a.device, a.dtype))
        delta = delta.reshape(rows, tokens, -1).to(output.dtype)
        inputs[name], outputs[name] = blocks, output
        return output + forward_ad.make_dual(torch.zeros_like(delta), delta)

    return hook


def _softmax_hessian_product(
    logits: torch.Tensor, tangent: torch.Tensor, batch: Batch, k: int, loss: str = "example"
) -> torch.Tensor:
    """scale_z (diag p_t - p_t p_t^T) u_t at every target position t; `logits` and `tangent` are
    (k N, V), the rows of the k copies of `batch` at their target positions (copy by copy, example
    by example: `target_logits`), scale_z = w_z / T_z (example) or w_z (token); in the logits'
    dtype. The softmax is taken in float32 at least."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    p = torch.softmax(logits.to(dtype), dim=-1)  # (k N, V)
    u = tangent.to(dtype)
    hu = p * u - p * (p * u).sum(-1, keepdim=True)
    counts = batch.targets  # (b,) T_z
    weights = batch.weights.to(dtype)
    scale = loss_scales(weights, counts.to(dtype).clamp_min(1), loss)[0]  # (b,)
    per_row = scale.repeat(k).repeat_interleave(counts.repeat(k))  # (k N,)
    return (hu * per_row.unsqueeze(-1)).to(logits.dtype)


def _attention(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", "unknown"))


def _show(values: list[float]) -> str:
    return " ".join(f"{v:.3g}" for v in values)


def dot(x: Vectors, y: Vectors) -> torch.Tensor:
    """(k,) float64: sum over layers of <x_j, y_j>."""
    total = torch.zeros(next(iter(x.values())).shape[0], dtype=torch.float64)
    for n in x:
        total += (x[n].double() * y[n].double()).sum(dim=(1, 2)).cpu()
    return total


def _combine(x: Vectors, y: Vectors, scale: torch.Tensor) -> None:
    """x_j += scale_j y_j in place, scale (k,)."""
    for n in x:
        x[n] += scale.to(x[n].device, x[n].dtype).view(-1, 1, 1) * y[n]


@dataclass
class Refinement:
    """What the refinement did, per reference (in the order of the k directions)."""

    residuals: list[list[float]]  # the start's relative residual, then each step's
    preconditioned_residual: list[float]  # of the preconditioned solution as it is (unscaled)
    start_scale: list[float]  # the start = this x the preconditioned solution (1: right scale)

    def named(self, references: Sequence[str]) -> dict[str, dict[str, object]]:
        """{"residuals": {reference: [...]}, "preconditioned_residual": ..., "start_scale": ...}."""
        return {
            field: dict(zip(references, getattr(self, field), strict=True))
            for field in ("residuals", "preconditioned_residual", "start_scale")
        }


def conjugate_gradient(
    product: Callable[[Vectors], Vectors],
    precondition: Callable[[Vectors], Vectors],
    damping: dict[str, float],
    gradients: Vectors,
    start: Vectors,
    iterations: int,
) -> tuple[Vectors, Refinement]:
    """PCG on (G + Lambda) x_j = b_j for every reference j, from the preconditioned solution
    `start` = M^{-1} b (overwritten); returns the solution and, per reference, the relative
    residuals ||b_j - (G + Lambda) x_j|| / ||b_j|| of the start and of each of the `iterations`
    steps, with the preconditioned solution's own residual and the start's scale of it.

    The start is M^{-1} b_j scaled by the alpha_j that minimises the error in the
    (G + Lambda)-norm: PCG's first step from zero, whose direction M^{-1} b IS the preconditioned
    solution. The scale comes free with the product that the start's residual needs anyway, and
    the steps after it stay conjugate to it, so K steps search the whole span of
    {M^{-1} b, (M^{-1} A) M^{-1} b, ..., (M^{-1} A)^K M^{-1} b} at K + 1 products. Unscaled, a start
    whose residual was 530 (EK-FAC on a random 2-layer model) still had 46 after 3 steps.
    Residuals after the first follow the recurrence r <- r - alpha A p (equal to the true
    residual up to round-off over so few steps)."""

    def system(v: Vectors) -> Vectors:
        out = product(v)
        for n in out:
            out[n] += damping[n] * v[n]
        return out

    r = {n: gradients[n].to(v.device, v.dtype) for n, v in start.items()}  # b - A 0
    norm_b = dot(r, r).sqrt()
    safe_b = torch.where(norm_b > 0, norm_b, torch.ones_like(norm_b))
    x = {n: torch.zeros_like(v) for n, v in start.items()}
    p = start  # z = M^{-1} r: the preconditioned solution; consumed (updated in place)
    rz = dot(r, p)

    def advance(ap: Vectors) -> torch.Tensor:
        """x += alpha p, r -= alpha A p with PCG's step alpha (k,), returned."""
        curvature = dot(p, ap)
        alpha = torch.where(curvature > 0, rz / curvature, torch.zeros_like(rz))
        _combine(x, p, alpha)
        _combine(r, ap, -alpha)
        return alpha

    def relative() -> list[float]:
        return (dot(r, r).sqrt() / safe_b).tolist()

    ap = system(p)
    gap = {n: r[n] - ap[n] for n in r}  # b - A M^{-1} b: the preconditioned solution as it is
    unscaled = (dot(gap, gap).sqrt() / safe_b).tolist()
    del gap
    scale = advance(ap).tolist()
    del ap
    residuals = [relative()]
    log.info("refine: the preconditioned solution's relative residual %s; scaled by %s: %s",
             _show(unscaled), _show(scale), _show(residuals[-1]))  # fmt: skip
    for step in range(1, iterations + 1):
        z = precondition(r)
        rz_next = dot(r, z)
        beta = torch.where(rz > 0, rz_next / rz, torch.zeros_like(rz))
        for n in p:  # p <- z + beta p
            p[n].mul_(beta.to(p[n].device, p[n].dtype).view(-1, 1, 1)).add_(z[n])
        rz = rz_next
        del z
        ap = system(p)
        advance(ap)
        del ap
        residuals.append(relative())
        log.info("refine %d/%d: relative residual %s", step, iterations, _show(residuals[-1]))
    columns = [list(column) for column in zip(*residuals, strict=True)]
    return x, Refinement(columns, unscaled, scale)
