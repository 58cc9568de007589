"""The exact curvature (`curvature: exact`): the dense damped Gauss-Newton matrix of the mixture
loss over the selected layers, and its solve as a preconditioner. Tiny models only (EXACT_LIMIT);
it exists to test the approximations (docs/method.md "Curvature G").
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ideal.distributed import all_reduce_, all_reduce_float
from ideal.influence.capture import is_conv1d, layer_shape
from ideal.influence.curvature import damping_value
from ideal.influence.results import WeightedSet
from ideal.influence.settings import InfluenceSettings
from ideal.lm import Batch, collate

EXACT_LIMIT = 8192  # parameters: the dense matrix has EXACT_LIMIT^2 float64 entries (0.5 GB)


def dense_preconditioner(
    dense: torch.Tensor, layers: dict[str, nn.Linear], settings: InfluenceSettings
) -> tuple[Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], dict[str, float]]:
    """The solve against the dense damped matrix as a function on per-layer gradients, and the
    damping per layer (relative to the mean of its block's diagonal: its mean eigenvalue)."""
    sizes = [int(np.prod(layer_shape(m))) for m in layers.values()]
    offsets = np.cumsum([0, *sizes])
    damping: dict[str, float] = {}
    diagonal = torch.zeros(dense.shape[0], dtype=torch.float64)
    for (name, _), lo, hi in zip(layers.items(), offsets[:-1], offsets[1:], strict=True):
        block = torch.diagonal(dense)[lo:hi]
        damping[name] = damping_value(
            block, settings.damping, settings.damping_abs
        )  # mean eigenvalue = trace/dim
        diagonal[lo:hi] = damping[name]
    system = dense + torch.diag(diagonal)

    def precondition(g: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """(k, out, in) per layer -> the same, solved against the dense damped matrix."""
        n_references = next(iter(g.values())).shape[0]
        flat = torch.cat(
            [g[n].double().cpu().reshape(n_references, -1) for n in layers], dim=1
        )  # (k, P)
        solved = torch.linalg.solve(system, flat.T).T
        device = next(iter(layers.values())).weight.device
        return {
            n: solved[:, lo:hi].reshape(n_references, *layer_shape(m)).to(device, torch.float32)
            for (n, m), lo, hi in zip(layers.items(), offsets[:-1], offsets[1:], strict=True)
        }

    return precondition, damping


def dense_gauss_newton(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    domains: dict[str, WeightedSet],
    pad_id: int,
    loss: str = "example",
) -> torch.Tensor:
    """The dense Gauss-Newton matrix of the mixture loss over the selected layers, float64.

    G = sum_z scale_z sum_t J_t^T (diag p_t - p_t p_t^T) J_t / sum_z mass_z, with J_t the Jacobian
    of the logits at target position t w.r.t. the layers' [W | b] (row-major) and (scale, mass)
    = (w_z / T_z, w_z) for `loss` example, (w_z, w_z T_z) for token. Tiny models only.
    """
    names = list(layers)
    params = {f"{n}.weight": layers[n].weight for n in names}
    params.update({f"{n}.bias": layers[n].bias for n in names if layers[n].bias is not None})
    device = next(model.parameters()).device
    size = sum(int(np.prod(layer_shape(layers[n]))) for n in names)
    total = torch.zeros(size, size, dtype=torch.float64)
    weight_total = 0.0
    for ws in domains.values():
        for item, weight in zip(ws.items, ws.weights, strict=True):
            batch = collate([item], pad_id).to(device)
            target = (batch.labels[0, 1:] != -100).nonzero().squeeze(1)  # logits at t predict t+1

            def logits_at_targets(
                p: dict[str, torch.Tensor], batch: Batch = batch, target: torch.Tensor = target
            ) -> torch.Tensor:
                out = torch.func.functional_call(
                    model, p, (), {"input_ids": batch.input_ids, "use_cache": False}
                )
                return out.logits[0, target].double()

            jac = torch.func.jacrev(logits_at_targets)(params)  # name -> (T, V, *shape)
            blocks = []
            for n in names:
                w = jac[f"{n}.weight"]
                if is_conv1d(layers[n]):  # stored (in, out): to the (out, in) of every layer
                    w = w.transpose(-1, -2)
                if layers[n].bias is not None:
                    w = torch.cat([w, jac[f"{n}.bias"].unsqueeze(-1)], dim=-1)
                blocks.append(w.reshape(w.shape[0], w.shape[1], -1))
            j = torch.cat(blocks, dim=-1).detach().double()  # (T, V, P)
            with torch.no_grad():
                probs = torch.softmax(logits_at_targets(params).double(), dim=-1)  # (T, V)
            weighted = j * probs.sqrt().unsqueeze(-1)  # diag(p)^(1/2) J
            mean = torch.einsum("tv,tvp->tp", probs, j)  # p^T J
            ggn = torch.einsum("tvp,tvq->pq", weighted, weighted) - mean.T @ mean
            if loss == "token":  # every target token of the mixture weighs the same
                total += weight * ggn.cpu()
                weight_total += weight * len(target)
            else:
                total += (weight / len(target)) * ggn.cpu()
                weight_total += weight
    return all_reduce_(total) / all_reduce_float(weight_total)
