"""Domain influence: how training more on each domain changes the loss on each reference set.

Sign convention (docs/method.md), used everywhere in `ideal` (files, plots, docs):

    s_ji = grad L(R_j)^T (G + lambda)^{-1} gbar_i
    s_ji > 0  <=>  training more on domain i is predicted to LOWER the loss on reference j.

Up-weighting domain i by epsilon moves the optimum by -epsilon (n_i/N) H^{-1} gbar_i, so the reference
loss changes by -epsilon (n_i/N) s_ji: a positive score means the loss goes down.

The objective differentiated is the one the model was trained with (`settings.loss`, docs/method.md
"Setting"; ideal.lm.loss_scales): `example`, a set's loss the mean of per-example mean NLLs, or
`token`, the sum of its token NLLs over its target-token count. Under `token`, gbar_i and g_Rj are
token-weighted means of the per-example gradients, the curvature is that of
L_mix = sum_i t_i L(D_i) / T (each example weighs by its target tokens), and the size factor n_i/N
becomes t_i/T, the domain's share of the mixture's target tokens (`result_summary`).

Organised around the k reference directions (docs/method.md, "Computing the scores at scale"):

    1. reference gradients g_Rj: one pass over the reference sets;
    2. curvature from a bounded, seeded sample C of the mixture (covariances, float64
       eigendecomposition, for EK-FAC a second pass for the eigenvalue correction);
    3. v_j = (G + lambda)^{-1} g_Rj, float32: the only model-sized state that outlives the curvature;
       with `refine` K > 0, K conjugate-gradient steps toward the exact Gauss-Newton solution
       (refine.py; within each layer group when there are several);
    4. one pass per domain over its seeded sample: every example's gradient of the selected layers is
       dotted with every v_j (in chunks) and discarded. s_ji is the weighted mean of the
       contributions v_j^T grad l(z) (weights: copies, times T_z under `token`), and its standard
       error comes from their spread (`domain_means`).

No per-domain gradient sum and no per-example gradient beyond one chunk is ever stored. With layer
groups (`--memory`), steps 1-4 run once per group of layers and the contributions add up.

This file orchestrates (`domain_influence`) and builds the preconditioner; the passes over data are
passes.py, the dense curvature exact.py, the means and their errors statistics.py, the
sensitivities objective.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ideal.distributed import all_reduce_float, broadcast_, owners, rank, world_size
from ideal.errors import IdealError
from ideal.influence.capture import layer_shape
from ideal.influence.curvature import (
    Eigen,
    LayerStats,
    covariances,
    damping_value,
    inverse_hvp,
    kfac_eigen,
)
from ideal.influence.exact import EXACT_LIMIT, dense_gauss_newton, dense_preconditioner
from ideal.influence.passes import (
    Forward,
    InfluenceEngine,
    Progress,
    make_batches,
    no_progress,
)
from ideal.influence.refine import GaussNewton, Refinement, conjugate_gradient
from ideal.influence.results import InfluenceResult, WeightedSet
from ideal.influence.settings import InfluenceSettings
from ideal.influence.statistics import domain_means
from ideal.lm import target_logits


def domain_influence(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    domains: dict[str, WeightedSet],
    references: dict[str, WeightedSet],
    settings: InfluenceSettings,
    pad_id: int,
    progress: Progress = no_progress,
    curvature: WeightedSet | None = None,
    groups: list[list[str]] | None = None,
    forward: Forward = target_logits,
) -> InfluenceResult:
    """Influence scores (references x domains) of a trained model, with their standard errors.

    `curvature` is the sample the curvature is fitted on (default: every domain's sample together);
    `groups` splits the layers into groups that run one after the other (default: one group);
    `forward` computes a batch's target logits (`ideal.lm.target_logits`, or a feature cache's,
    which runs only the top blocks from the states entering them: every layer must lie there).
    """
    for name, ws in {**domains, **references}.items():
        if not ws.items:
            raise IdealError(f"'{name}': no examples to compute influence on")
    curvature = curvature if curvature is not None else WeightedSet.merged(domains)
    groups = groups or [list(layers)]
    if settings.curvature == "exact":
        count = sum(int(np.prod(layer_shape(m))) for m in layers.values())
        if count > EXACT_LIMIT:
            raise IdealError(
                f"--curvature exact: the selected layers have {count} parameters, above the limit of "
                f"{EXACT_LIMIT} for a dense matrix; use ekfac or select fewer layers with --layers"
            )
        groups = [list(layers)]  # one dense matrix couples every layer
    if world_size() > 1:  # each process a disjoint shard; every statistic is summed across them
        domains = {d: ws.shard(rank(), world_size()) for d, ws in domains.items()}
        references = {r: ws.shard(rank(), world_size()) for r, ws in references.items()}
        curvature = curvature.shard(rank(), world_size())
        progress = progress if rank() == 0 else no_progress
    model.eval()
    requires = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    seconds: dict[str, float] = {}
    contributions = {d: np.zeros((len(ws.items), len(references))) for d, ws in domains.items()}
    ref_losses: dict[str, float] = {}
    damping: dict[str, float] = {}
    refinement: list[dict[str, Any]] = []
    try:
        for group in groups:
            engine = InfluenceEngine(
                model, {n: layers[n] for n in group}, settings, pad_id, progress, forward
            )
            for p in engine.params:
                p.requires_grad_(True)
            start = time.perf_counter()
            ref_grads, losses = engine.reference_pass(references)
            ref_losses = ref_losses or losses
            _add(seconds, "references", start)
            precondition, group_damping = _preconditioner(engine, curvature, seconds)
            damping.update(group_damping)
            start = time.perf_counter()
            stacked = {n: torch.stack([ref_grads[r][n] for r in references]) for n in group}
            del ref_grads
            directions = precondition(stacked)  # (k, out, in) float32 per layer, on the device
            _add(seconds, "precondition", start)
            if settings.refine:
                start = time.perf_counter()
                directions, report = _refine(
                    engine, curvature, stacked, directions, precondition, group_damping
                )
                refinement.append(report.named(list(references)))
                _add(seconds, "refine", start)
            del stacked
            start = time.perf_counter()
            for d, values in engine.contribution_pass(domains, directions).items():
                contributions[d] += values
            _add(seconds, "domains", start)
            del directions
            for p in engine.params:
                p.requires_grad_(False)
    finally:
        for p, flag in requires.items():
            p.requires_grad_(flag)
    start = time.perf_counter()
    scores, stderr, covariance, used = domain_means(
        domains, contributions, len(references), settings.loss
    )
    seconds["scores"] = time.perf_counter() - start
    tokens = {
        d: int(all_reduce_float(sum(len(i.input_ids) for i in ws.items)))
        for d, ws in domains.items()
    }
    return InfluenceResult(
        list(domains),
        list(references),
        scores,
        ref_losses,
        list(layers),
        damping,
        seconds,
        tokens,
        loss=settings.loss,
        stderr=stderr,
        covariance=covariance,
        examples=used,
        curvature_examples=all_reduce_float(float(sum(curvature.weights))),
        groups=groups,
        refinement=refinement,
    )


def _refine(
    engine: InfluenceEngine,
    curvature: WeightedSet,
    gradients: dict[str, torch.Tensor],
    directions: dict[str, torch.Tensor],
    precondition: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    damping: dict[str, float],
) -> tuple[dict[str, torch.Tensor], Refinement]:
    """`settings.refine` PCG steps from the preconditioned directions on the exact damped
    Gauss-Newton matrix of the curvature sample (this process's shard; products summed across
    processes). Each forward carries k copies of max(1, batch_size // k) examples."""
    n_references = next(iter(directions.values())).shape[0]
    rows = max(1, engine.settings.batch_size // n_references)
    batches = make_batches(curvature, rows, engine.pad_id)
    loss = engine.settings.loss
    weight_total = all_reduce_float(curvature.mass(loss))
    product = GaussNewton(
        engine.model, engine.layers, batches, weight_total, engine.progress, loss=loss,
        forward=engine.forward,  # the passes' own: from the feature cache when there is one
    )  # fmt: skip
    return conjugate_gradient(
        product, precondition, damping, gradients, directions, engine.settings.refine
    )


def _add(seconds: dict[str, float], stage: str, start: float) -> None:
    seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start


def _preconditioner(
    engine: InfluenceEngine, curvature: WeightedSet, seconds: dict[str, float]
) -> tuple[Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], dict[str, float]]:
    """The damped inverse curvature of the engine's layers, fitted on the curvature sample, as a
    function on per-layer gradients, and lambda per layer. The covariances are freed once they
    are eigendecomposed."""
    settings = engine.settings
    device = engine.device
    if settings.curvature == "identity":  # G = I: plain gradient dot products, no damping
        return (lambda g: {n: v.to(device, torch.float32) for n, v in g.items()}), {}
    sample = {"curvature": curvature}
    if settings.curvature == "exact":
        start = time.perf_counter()
        dense = dense_gauss_newton(
            engine.model, engine.layers, sample, engine.pad_id, settings.loss
        )
        _add(seconds, "exact_gauss_newton", start)
        return dense_preconditioner(dense, engine.layers, settings)
    start = time.perf_counter()
    stats = engine.curvature_pass(sample)
    _add(seconds, "curvature_covariances", start)
    start = time.perf_counter()
    eigens = spread_eigendecompositions(stats)  # float32; frees the covariances one by one
    _add(seconds, "eigendecomposition", start)
    if settings.curvature == "ekfac":
        start = time.perf_counter()
        corrected = engine.correction_pass(sample, eigens)
        for name, values in corrected.items():
            eigens[name].eigenvalues = values.float()
        _add(seconds, "curvature_eigenvalue_correction", start)
    damping = {
        n: damping_value(e.eigenvalues, settings.damping, settings.damping_abs)
        for n, e in eigens.items()
    }

    def precondition(g: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """(k, out, in) -> (k, out, in): one layer at a time on the device, in float32."""
        out = {}
        for n, v in g.items():
            e = eigens[n]
            on_device = Eigen(e.q_a.to(device), e.q_s.to(device), e.eigenvalues.to(device))
            out[n] = inverse_hvp(v.to(device), on_device, damping[n]).float()
        return out

    return precondition, damping


def spread_eigendecompositions(stats: dict[str, LayerStats]) -> dict[str, Eigen]:
    """K-FAC eigenbases of every layer, decomposed in float64 and kept in float32; each layer's
    covariances are freed (popped from `stats`) once decomposed. Under several processes each
    process decomposes a share of the layers (balanced by d_in^3 + d_out^3) and broadcasts them,
    so every process ends with all."""
    names, world = list(stats), world_size()
    shapes = {n: (stats[n].s_sum.shape[0], stats[n].a_sum.shape[0]) for n in names}
    owner = owners([float(o**3 + i**3) for o, i in shapes.values()], world)
    eigens: dict[str, Eigen] = {}
    for name, source in zip(names, owner, strict=True):
        layer = stats.pop(name)
        d_out, d_in = shapes[name]
        if source == rank():  # contiguous: eigh returns column-major eigenvectors, and a
            # collective on a strided tensor would send its storage in the wrong order
            e = kfac_eigen(*covariances(layer))
            eigen = Eigen(e.q_a.float().contiguous(), e.q_s.float().contiguous(),
                          e.eigenvalues.float().contiguous())  # fmt: skip
        else:
            like = {"dtype": torch.float32, "device": layer.a_sum.device}
            eigen = Eigen(torch.empty(d_in, d_in, **like), torch.empty(d_out, d_out, **like),
                          torch.empty(d_out, d_in, **like))  # fmt: skip
        del layer
        if world > 1:
            for tensor in (eigen.q_a, eigen.q_s, eigen.eigenvalues):
                broadcast_(tensor, source)
        eigens[name] = eigen
    return eigens
