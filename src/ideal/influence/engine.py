"""Domain influence: how training more on each domain changes the loss on each reference set.

Sign convention (METHOD.md), used everywhere in `ideal` (files, plots, docs):

    s_ji = grad L(R_j)^T (G + lambda)^{-1} gbar_i
    s_ji > 0  <=>  training more on domain i is predicted to LOWER the loss on reference j.

Up-weighting domain i by epsilon moves the optimum by -epsilon (n_i/N) H^{-1} gbar_i, so the reference
loss changes by -epsilon (n_i/N) s_ji: a positive score means the loss goes down.

The objective differentiated is the one the model was trained with (`settings.loss`, METHOD.md
"Setting"; ideal.lm.loss_scales): `example`, a set's loss the mean of per-example mean NLLs, or
`token`, the sum of its token NLLs over its target-token count. Under `token`, gbar_i and g_Rj are
token-weighted means of the per-example gradients, the curvature is that of
L_mix = sum_i t_i L(D_i) / T (each example weighs by its target tokens), and the size factor n_i/N
becomes t_i/T, the domain's share of the mixture's target tokens (`result_summary`).

Organised around the k reference directions (METHOD.md, "Computing the scores at scale"):

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
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from ideal.data.rows import Tokenized
from ideal.distributed import all_reduce_, all_reduce_float, broadcast_, owners, rank, world_size
from ideal.errors import IdealError
from ideal.influence.capture import Capture, is_conv1d, layer_shape
from ideal.influence.curvature import (
    Eigen,
    LayerStats,
    correction_sum,
    covariances,
    damping_value,
    inverse_hvp,
    kfac_eigen,
    layer_stats,
)
from ideal.influence.refine import GaussNewton, Refinement, conjugate_gradient
from ideal.lm import (
    LOSSES,
    Batch,
    collate,
    example_losses,
    loss_scales,
    position_ids,
    sample_labels,
    token_nll,
)
from ideal.methods.rules import ideal_beta, sensitivities

CURVATURES = ("ekfac", "kfac", "identity", "exact")
EXACT_LIMIT = 8192  # parameters: the dense matrix has EXACT_LIMIT^2 float64 entries (0.5 GB)

T = TypeVar("T")
Progress = Callable[[Iterable[T], int, str], Iterable[T]]


def no_progress(items: Iterable[T], total: int, description: str) -> Iterable[T]:
    return items


@dataclass(frozen=True)
class InfluenceSettings:
    curvature: str = "ekfac"  # ekfac | kfac | identity | exact
    damping: float = 0.1  # relative: lambda_l = damping x mean eigenvalue of layer l
    damping_abs: float | None = None  # absolute lambda, same for every layer (overrides damping)
    fisher: str = "sampled"  # sampled (true Fisher, seeded) | empirical (the data's labels)
    batch_size: int = 8
    seed: int = 0
    chunk: int = 16  # examples per eigenvalue-correction chunk (bounds memory)
    fisher_samples: int = (
        1  # label draws per example for the sampled Fisher (less Monte Carlo noise)
    )
    factors: str = "cpu"  # where the running sums live: cpu (device memory for the model) | device
    refine: int = 0  # conjugate-gradient steps toward the exact Gauss-Newton solution (refine.py)
    loss: str = "example"  # the training objective differentiated: example | token (METHOD.md)

    def __post_init__(self) -> None:
        if self.curvature not in CURVATURES:
            raise IdealError(
                f"--curvature must be one of {', '.join(CURVATURES)}, got {self.curvature!r}"
            )
        if self.fisher not in ("sampled", "empirical"):
            raise IdealError(f"--fisher must be sampled or empirical, got {self.fisher!r}")
        if self.damping_abs is None and not self.damping > 0:
            raise IdealError(f"--damping must be > 0, got {self.damping}")
        if self.damping_abs is not None and self.damping_abs < 0:
            raise IdealError(f"--damping-abs must be >= 0, got {self.damping_abs}")
        if self.fisher_samples < 1:
            raise IdealError(f"--fisher-samples must be >= 1, got {self.fisher_samples}")
        if self.factors not in ("cpu", "device"):
            raise IdealError(f"--factors must be cpu or device, got {self.factors!r}")
        if self.batch_size < 1:
            raise IdealError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.refine < 0:
            raise IdealError(f"--refine must be >= 0, got {self.refine}")
        if self.loss not in LOSSES:
            raise IdealError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.refine and self.curvature not in ("ekfac", "kfac"):
            raise IdealError(
                f"--refine needs --curvature ekfac or kfac (its preconditioner), got {self.curvature}"
            )


@dataclass
class WeightedSet:
    """Tokenized examples with weights (copies in the mixture sample); a reference set has all 1."""

    items: list[Tokenized]
    weights: list[float]
    keys: list[int] | None = None  # stable ids that seed sampled labels (default: the positions)
    # copies the sample was drawn from without replacement (the domain's volume): its finite-
    # population correction; None = the sample is the whole set (no sampling error)
    population: float | None = None

    @classmethod
    def uniform(cls, items: list[Tokenized]) -> WeightedSet:
        return cls(items, [1.0] * len(items))

    def mass(self, loss: str) -> float:
        """sum_z mass_z (ideal.lm.loss_scales): the copies, or their target tokens for `token`."""
        if loss == "token":
            return float(
                sum(w * i.num_targets for w, i in zip(self.weights, self.items, strict=True))
            )
        return float(sum(self.weights))

    def shard(self, rank: int, world: int) -> WeightedSet:
        """Every world-th example from `rank`: disjoint shards that cover the set, keys kept."""
        keys = self.keys if self.keys is not None else list(range(len(self.items)))
        picked = range(rank, len(self.items), world)
        return WeightedSet(
            [self.items[i] for i in picked],
            [self.weights[i] for i in picked],
            [keys[i] for i in picked],
            self.population,
        )

    @classmethod
    def merged(cls, sets: dict[str, WeightedSet]) -> WeightedSet:
        """One set of every example of `sets` (for a curvature fitted on the domains' samples)."""
        items = [i for ws in sets.values() for i in ws.items]
        return cls(items, [w for ws in sets.values() for w in ws.weights], list(range(len(items))))


@dataclass
class InfluenceResult:
    domains: list[str]
    references: list[str]
    scores: np.ndarray  # (references, domains), METHOD.md sign convention
    reference_losses: dict[str, float]
    layers: list[str]
    damping: dict[str, float]  # lambda per layer (or the dense block for exact)
    seconds: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    loss: str = "example"  # the objective differentiated (InfluenceSettings.loss)
    stderr: np.ndarray | None = None  # (references, domains): standard error of each score
    covariance: np.ndarray | None = None  # (domains, references, references): of a domain's scores
    examples: dict[str, float] = field(default_factory=dict)  # copies used per domain
    curvature_examples: float = 0.0  # copies in the curvature sample
    groups: list[list[str]] = field(default_factory=list)  # layer groups, one set of passes each
    # --refine, per layer group: {"residuals": {reference: [start, step 1, ...]}, and per reference
    # "preconditioned_residual" (the EK-FAC solution's own) and "start_scale"} (refine.Refinement)
    refinement: list[dict[str, Any]] = field(default_factory=list)


def make_batches(
    data: WeightedSet, batch_size: int, pad_id: int, key_offset: int = 0
) -> list[Batch]:
    """Batches of similar length (less padding); results do not depend on the grouping.

    Example i gets the key `key_offset + keys[i]`, which seeds its sampled labels.
    """
    keys = data.keys if data.keys is not None else list(range(len(data.items)))
    order = sorted(range(len(data.items)), key=lambda i: len(data.items[i].input_ids))
    return [
        collate(
            [data.items[i] for i in chunk],
            pad_id,
            [data.weights[i] for i in chunk],
            keys=[key_offset + keys[i] for i in chunk],
        )
        for chunk in (order[s : s + batch_size] for s in range(0, len(order), batch_size))
    ]


def _keyed_batches(
    data: dict[str, WeightedSet], batch_size: int, pad_id: int
) -> list[tuple[str, Batch]]:
    """(name, batch) for every set, each example keyed uniquely across the sets (and processes)."""
    out, offset = [], 0
    for name, ws in data.items():
        out += [(name, b) for b in make_batches(ws, batch_size, pad_id, offset)]
        offset += 1_000_000_000  # keys of different sets never collide, whatever the sharding
    return out


def forward_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=position_ids(batch.attention_mask),
        use_cache=False,
    )
    return out.logits


def _batch_gradient(capture: Capture, name: str) -> torch.Tensor:
    """sum_t g_t a_t^T over every example and token of the batch, float32 (out, in)."""
    a, g = capture.inputs[name].float(), capture.grads[name].float()
    return torch.einsum("bto,bti->oi", g, a)


class InfluenceEngine:
    """One influence computation over a fixed model and layer set."""

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, nn.Linear],
        settings: InfluenceSettings,
        pad_id: int,
        progress: Progress,
    ):
        self.model, self.layers, self.settings, self.pad_id = model, layers, settings, pad_id
        self.progress = progress
        self.params = [p for m in layers.values() for p in m.parameters(recurse=False)]
        self.device = next(model.parameters()).device
        # the running sums (covariances, gradient sums, corrections): on CPU by default, so the
        # device holds only the model and one batch; `factors="device"` avoids the transfers
        self.store = self.device if settings.factors == "device" else torch.device("cpu")

    def _fisher_labels(self, logits: torch.Tensor, batch: Batch, draw: int) -> torch.Tensor:
        """Labels of the curvature's backward pass. Both passes draw the SAME labels per example
        (seeded by its key): the correction then lives in the span that the eigenbasis of S was
        estimated from. With fresh draws, rows of G_z fall in S's (arbitrary) null space when data
        are few, and the scores moved by up to 9 % with the batch size on a tiny model."""
        if self.settings.fisher == "empirical":
            return batch.labels
        return sample_labels(logits, batch.labels, batch.keys, self.settings.seed + 7919 * draw)

    def _fisher_backwards(
        self, cap: Capture, logits: torch.Tensor, batch: Batch
    ) -> Iterator[torch.Tensor]:
        """For every label draw of the batch (one, or --fisher-samples for the sampled Fisher):
        the backward of the SUMMED token loss of the drawn labels, whose output gradients' outer
        products / T_z are the Gauss-Newton's, left in `cap`; yields the examples' weights for
        that draw (the batch weights / draws). Both curvature passes use it: the same labels."""
        draws = self.settings.fisher_samples if self.settings.fisher == "sampled" else 1
        for draw in range(draws):
            nll, _ = token_nll(logits, self._fisher_labels(logits, batch, draw))
            cap.backward(nll.sum(), retain_graph=draw < draws - 1)
            yield batch.weights / draws

    def curvature_pass(self, curvature: dict[str, WeightedSet]) -> dict[str, LayerStats]:
        """Pass 1 over the curvature sample: K-FAC covariance sums (kfac, ekfac)."""
        stats = {
            n: LayerStats.zeros(*reversed(layer_shape(m)), device=self.store)
            for n, m in self.layers.items()
        }
        batches = _keyed_batches(curvature, self.settings.batch_size, self.pad_id)
        with Capture(self.layers) as cap:
            for _, batch in self.progress(batches, len(batches), "curvature 1/2: covariances"):
                batch = batch.to(self.device)
                logits = forward_logits(self.model, batch)
                targets = batch.targets.float()
                for weights in self._fisher_backwards(cap, logits, batch):
                    for name in self.layers:
                        part = layer_stats(
                            cap.inputs[name],
                            cap.grads[name],
                            batch.attention_mask,
                            targets,
                            weights,
                            self.settings.loss,
                        )
                        stats[name].add(_moved(part, self.store))
        for layer in stats.values():
            all_reduce_(layer.a_sum)
            all_reduce_(layer.s_sum)
            layer.positions = all_reduce_float(layer.positions)
            layer.examples = all_reduce_float(layer.examples)
        return stats

    def contribution_pass(
        self, domains: dict[str, WeightedSet], directions: dict[str, torch.Tensor]
    ) -> dict[str, np.ndarray]:
        """Per example z of every domain: v_j^T grad l(z) over this engine's layers, (n, k) float64.

        `directions[name]` is (k, out, in): the k preconditioned reference gradients of a layer.
        Each example's gradient is formed `chunk` examples at a time and discarded."""
        out = {d: np.zeros((len(ws.items), 0)) for d, ws in domains.items()}
        # (k, out * in): the dot products are then one matrix product per chunk (a measured 5x
        # faster on CPU than einsum("boi,koi->bk"), which torch does not route to a matmul)
        on_device = {
            n: v.to(self.device, torch.float32).reshape(v.shape[0], -1).T.contiguous()
            for n, v in directions.items()
        }
        k = next(iter(on_device.values())).shape[1]
        chunk = self.settings.chunk
        with Capture(self.layers) as cap:
            for domain, ws in domains.items():
                keys = ws.keys if ws.keys is not None else list(range(len(ws.items)))
                position = {key: i for i, key in enumerate(keys)}
                values = np.zeros((len(ws.items), k))
                batches = make_batches(ws, self.settings.batch_size, self.pad_id)
                for batch in self.progress(batches, len(batches), f"domain {domain}"):
                    batch = batch.to(self.device)
                    losses = example_losses(forward_logits(self.model, batch), batch.labels)
                    cap.backward(losses.sum())  # per example: the gradient of its own l(z)
                    total = torch.zeros(batch.input_ids.shape[0], k, dtype=torch.float64)
                    for name in self.layers:
                        a, g = cap.inputs[name].float(), cap.grads[name].float()
                        for start in range(0, a.shape[0], chunk):
                            part = slice(start, start + chunk)
                            per_example = torch.bmm(g[part].transpose(1, 2), a[part])  # (b, o, i)
                            dots = per_example.reshape(per_example.shape[0], -1) @ on_device[name]
                            total[part] += dots.double().cpu()
                    rows = [position[int(key)] for key in batch.keys]
                    values[rows] = total.numpy()
                out[domain] = values
        return out

    def correction_pass(
        self, data: dict[str, WeightedSet], eigens: dict[str, Eigen]
    ) -> dict[str, torch.Tensor]:
        """Pass 2 (EK-FAC): eigenvalues of G in the K-FAC eigenbasis, from per-example gradients."""
        sums = {  # running sums in float64, whatever the eigenbasis dtype
            n: torch.zeros_like(e.eigenvalues, dtype=torch.float64, device=self.store)
            for n, e in eigens.items()
        }
        weight_total = 0.0
        batches = [b for _, b in _keyed_batches(data, self.settings.batch_size, self.pad_id)]
        on_device = {
            n: Eigen(e.q_a.to(self.device), e.q_s.to(self.device), e.eigenvalues.to(self.device))
            for n, e in eigens.items()
        }
        with Capture(self.layers) as cap:
            for batch in self.progress(batches, len(batches), "curvature 2/2: correction"):
                batch = batch.to(self.device)
                logits = forward_logits(self.model, batch)
                targets = batch.targets.float()
                for weights in self._fisher_backwards(cap, logits, batch):
                    for name in self.layers:
                        part = correction_sum(
                            cap.grads[name],
                            cap.inputs[name],
                            batch.attention_mask,
                            targets,
                            weights,
                            on_device[name],
                            self.settings.chunk,
                            self.settings.loss,
                        )
                        sums[name] += part.to(self.store)
                weight_total += float(
                    loss_scales(batch.weights, targets, self.settings.loss)[1].sum()
                )
        weight_total = all_reduce_float(weight_total)
        return {n: all_reduce_(s) / weight_total for n, s in sums.items()}

    def reference_pass(
        self, references: dict[str, WeightedSet]
    ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, float]]:
        """Gradient and loss L(R_j) of every reference set (true labels): under `example` the mean
        over its examples of l(z) and grad l(z); under `token` the sums of their token NLLs and
        of its gradients over the set's target-token count."""
        token = self.settings.loss == "token"
        grads, losses = {}, {}
        batches = _keyed_batches(references, self.settings.batch_size, self.pad_id)
        sums = {
            r: {n: torch.zeros(layer_shape(m), device=self.store) for n, m in self.layers.items()}
            for r in references
        }
        loss_sums = dict.fromkeys(references, 0.0)
        with Capture(self.layers) as cap:
            for ref, batch in self.progress(batches, len(batches), "reference gradients"):
                batch = batch.to(self.device)
                logits = forward_logits(self.model, batch)
                if token:  # (B,) summed target NLL per example
                    losses_b = token_nll(logits, batch.labels)[0].sum(1)
                else:  # (B,) mean target NLL per example
                    losses_b = example_losses(logits, batch.labels)
                cap.backward(losses_b.sum())
                loss_sums[ref] += float(losses_b.detach().sum())
                for name in self.layers:
                    sums[ref][name] += _batch_gradient(cap, name).to(self.store)
        for ref, ws in references.items():
            size = sum(i.num_targets for i in ws.items) if token else len(ws.items)
            count = all_reduce_float(float(size))
            grads[ref] = {n: all_reduce_(s) / count for n, s in sums[ref].items()}
            losses[ref] = all_reduce_float(loss_sums[ref]) / count
        return grads, losses


def _moved(stats: LayerStats, device: torch.device) -> LayerStats:
    return LayerStats(
        stats.a_sum.to(device), stats.s_sum.to(device), stats.positions, stats.examples
    )


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
) -> InfluenceResult:
    """Influence scores (references x domains) of a trained model, with their standard errors.

    `curvature` is the sample the curvature is fitted on (default: every domain's sample together);
    `groups` splits the layers into groups that run one after the other (default: one group).
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
                model, {n: layers[n] for n in group}, settings, pad_id, progress
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
    k = next(iter(directions.values())).shape[0]
    rows = max(1, engine.settings.batch_size // k)
    batches = make_batches(curvature, rows, engine.pad_id)
    loss = engine.settings.loss
    weight_total = all_reduce_float(curvature.mass(loss))
    product = GaussNewton(
        engine.model, engine.layers, batches, weight_total, engine.progress, loss=loss
    )
    return conjugate_gradient(
        product, precondition, damping, gradients, directions, engine.settings.refine
    )


def _add(seconds: dict[str, float], stage: str, start: float) -> None:
    seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start


def domain_means(
    domains: dict[str, WeightedSet],
    contributions: dict[str, np.ndarray],
    k: int,
    loss: str = "example",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
    """Scores (k, n) as the weighted means of the per-example contributions, their standard errors
    (k, n), the covariance of each domain's k scores (n, k, k) and the copies used per domain,
    summed over every process's shard.

    A domain's sample is m copies drawn without replacement from its V copies, an example drawn
    w times counting w times: the mean's covariance is (1 - m/V) C / m, C the sample covariance
    over the m copies (no correction without a population: the sample is all). The covariance
    gives the standard error of any combination over references (the sensitivities').

    Under `token` the score is v_j^T gbar_i with gbar_i = sum_z w_z grad NLL_z / sum_z w_z T_z,
    i.e. the ratio of two sample means, R = mean(y) / mean(x) with y_z = T_z c_z (the contribution
    of z's summed token NLL) and x_z = T_z: a ratio estimator, not a weighted mean with fixed
    weights, because the sample's token total is itself random (which examples were drawn decides
    it). Its covariance is the delta method's (1 - m/V) C_u / (m xbar^2), C_u the sample covariance
    of u_z = y_z - R x_z = T_z (c_z - R) over the copies and xbar = mean(x); with equal T_z it is
    the formula above."""
    if loss == "token":
        return _token_means(domains, contributions, k)
    n = len(domains)
    scores, covariance, used = np.zeros((k, n)), np.zeros((n, k, k)), {}
    for i, (domain, ws) in enumerate(domains.items()):
        w = np.asarray(ws.weights, dtype=np.float64)[:, None]  # (n_i, 1)
        c = contributions[domain]  # (n_i, k)
        sums = np.concatenate([[w.sum()], (w * c).sum(0), ((w * c).T @ c).ravel()])
        sums = all_reduce_(torch.from_numpy(sums)).numpy()
        m, first, second = sums[0], sums[1 : 1 + k], sums[1 + k :].reshape(k, k)
        mean = first / m
        sample_cov = (second - m * np.outer(mean, mean)) / max(m - 1.0, 1.0)
        fpc = 0.0 if ws.population is None else max(0.0, 1.0 - m / ws.population)
        scores[:, i], covariance[i], used[domain] = mean, fpc * sample_cov / m, float(m)
    stderr = np.sqrt(np.maximum(np.diagonal(covariance, axis1=1, axis2=2), 0.0)).T
    return scores, stderr, covariance, used


def _token_means(
    domains: dict[str, WeightedSet], contributions: dict[str, np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
    """`domain_means` under token normalisation: the ratio estimator and its delta-method
    covariance, from sums that add across processes (C_u expanded around R, known only after
    the reduction: sum w x^2 (c - R)(c - R)^T = Q - R P^T - P R^T + X2 R R^T)."""
    n = len(domains)
    scores, covariance, used = np.zeros((k, n)), np.zeros((n, k, k)), {}
    for i, (domain, ws) in enumerate(domains.items()):
        w = np.asarray(ws.weights, dtype=np.float64)[:, None]  # (n_i, 1) copies
        x = np.asarray([item.num_targets for item in ws.items], dtype=np.float64)[:, None]
        c = contributions[domain]  # (n_i, k): v_j^T grad l(z), l the mean NLL
        wx, wxx = w * x, w * x * x
        sums = np.concatenate(
            [[w.sum(), wx.sum(), wxx.sum()], (wx * c).sum(0), (wxx * c).sum(0),
             ((wxx * c).T @ c).ravel()]
        )  # fmt: skip
        sums = all_reduce_(torch.from_numpy(sums)).numpy()
        m, total, x2 = sums[0], sums[1], sums[2]
        y, p, q = sums[3 : 3 + k], sums[3 + k : 3 + 2 * k], sums[3 + 2 * k :].reshape(k, k)
        ratio = y / total if total > 0 else np.zeros(k)
        spread = q - np.outer(ratio, p) - np.outer(p, ratio) + x2 * np.outer(ratio, ratio)
        sample_cov = spread / max(m - 1.0, 1.0)  # of u_z = T_z (c_z - R), per copy
        xbar = total / m if m > 0 else 1.0
        fpc = 0.0 if ws.population is None else max(0.0, 1.0 - m / ws.population)
        scores[:, i] = ratio
        covariance[i] = fpc * sample_cov / (m * xbar**2) if total > 0 else 0.0
        used[domain] = float(m)
    stderr = np.sqrt(np.maximum(np.diagonal(covariance, axis1=1, axis2=2), 0.0)).T
    return scores, stderr, covariance, used


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
        return _dense_preconditioner(dense, engine.layers, settings)
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


def _dense_preconditioner(
    dense: torch.Tensor, layers: dict[str, nn.Linear], settings: InfluenceSettings
):
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
        k = next(iter(g.values())).shape[0]
        flat = torch.cat([g[n].double().cpu().reshape(k, -1) for n in layers], dim=1)  # (k, P)
        solved = torch.linalg.solve(system, flat.T).T
        device = next(iter(layers.values())).weight.device
        return {
            n: solved[:, lo:hi].reshape(k, *layer_shape(m)).to(device, torch.float32)
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


def objective_weights(
    kind: str, references: Sequence[str], sizes: dict[str, int], losses: dict[str, float]
) -> np.ndarray:
    """w_j of Q = sum_j w_j L(R_j): mean (1/k, default), pooled (by set size), worst (largest loss)."""
    if kind == "mean":
        return np.full(len(references), 1.0 / len(references))
    if kind == "pooled":
        counts = np.array([sizes[r] for r in references], dtype=np.float64)
        return counts / counts.sum()
    if kind == "worst":
        w = np.zeros(len(references))
        w[int(np.argmax([losses[r] for r in references]))] = 1.0
        return w
    raise IdealError(f"objective must be mean, pooled or worst, got {kind!r}")


def result_summary(
    result: InfluenceResult,
    volumes: dict[str, int],
    objective: str,
    size_factor: bool,
    sizes: dict[str, int],
    step: float = 0.15,
) -> dict[str, Any]:
    """sensitivities dQ/dbeta_i and the default beta, for influence.json.

    `volumes` are the sizes whose shares are the size factor: the copies n_i of each domain in the
    mixture under `influence.loss: example`, its target tokens t_i under `token` (a domain's weight
    in L_mix; the caller passes them, METHOD.md "Setting")."""
    weights = objective_weights(objective, result.references, sizes, result.reference_losses)
    counts = [volumes[d] for d in result.domains]
    alpha = sensitivities(result.scores, counts, weights, size_factor)
    beta = ideal_beta(alpha, step)
    extra: dict[str, Any] = {}
    if result.covariance is not None:  # alpha_i = -share_i w^T s_i: its error from s_i's covariance
        share = np.asarray(counts, float) / sum(counts) if size_factor else np.ones(len(counts))
        spread = np.sqrt(
            np.maximum(np.einsum("j,ijk,k->i", weights, result.covariance, weights), 0)
        )
        extra["sensitivity_stderr"] = dict(
            zip(result.domains, (np.abs(share) * spread).tolist(), strict=True)
        )
    return {
        "sensitivity": dict(zip(result.domains, alpha.tolist(), strict=True)),
        **extra,
        "beta": dict(zip(result.domains, beta.tolist(), strict=True)),
        "objective": {
            "kind": objective,
            "weights": dict(zip(result.references, weights.tolist(), strict=True)),
            "size_factor": size_factor,
            "size_factor_of": "target tokens" if result.loss == "token" else "volumes",
            "step": step,
        },
    }
