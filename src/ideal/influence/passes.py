"""The passes over data of one influence computation (InfluenceEngine): reference gradients, the
curvature's covariances and eigenvalue correction, and the per-example contributions
v_j^T grad l(z) of every domain's sample; batching and the forward pass they share.

Each pass forms gradients of the selected layers only (ideal.influence.capture), accumulates in
float32/float64 whatever the model dtype, keeps its running sums where `settings.factors` says
(host by default), and sums them across processes. The LM head runs at the target positions only
(`ideal.lm.target_logits`), unless a selected layer is the head or lies in it: its inputs are
then needed at every position, as the covariances count them, and the logits are full.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from ideal.distributed import all_reduce_, all_reduce_float
from ideal.influence.capture import Capture, layer_shape
from ideal.influence.curvature import Eigen, LayerStats, correction_sum, layer_stats
from ideal.influence.results import WeightedSet
from ideal.influence.settings import InfluenceSettings
from ideal.lm import (
    Batch,
    TargetLogits,
    collate,
    loss_scales,
    position_ids,
    sample_target_labels,
    target_logits,
    touches_head,
)

T = TypeVar("T")
Progress = Callable[[Iterable[T], int, str], Iterable[T]]
# (model, batch, real_positions, full) -> the batch's target logits: `target_logits`, or a feature
# cache's (ideal.backends.training.top_layers), which runs only the top blocks from cached states
Forward = Callable[..., TargetLogits]


def no_progress(items: Iterable[T], total: int, description: str) -> Iterable[T]:
    return items


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
    """(B, T, V) logits at every position (the passes use `target_logits`)."""
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
        forward: Forward = target_logits,
    ):
        self.model, self.layers, self.settings, self.pad_id = model, layers, settings, pad_id
        self.progress, self.forward = progress, forward
        self.params = [p for m in layers.values() for p in m.parameters(recurse=False)]
        self.full_logits = touches_head(model, layers.values())
        self.device = next(model.parameters()).device
        # the running sums (covariances, gradient sums, corrections): on CPU by default, so the
        # device holds only the model and one batch; `factors="device"` avoids the transfers
        self.store = self.device if settings.factors == "device" else torch.device("cpu")

    def _forward(self, batch: Batch) -> TargetLogits:
        """The logits at the batch's target positions (all that the losses read)."""
        return self.forward(self.model, batch, real_positions=True, full=self.full_logits)

    def _fisher_labels(self, logits: TargetLogits, batch: Batch, draw: int) -> torch.Tensor:
        """Labels of the curvature's backward pass. Both passes draw the SAME labels per example
        (seeded by its key): the correction then lives in the span that the eigenbasis of S was
        estimated from. With fresh draws, rows of G_z fall in S's (arbitrary) null space when data
        are few, and the scores moved by up to 9 % with the batch size on a tiny model."""
        if self.settings.fisher == "empirical":
            return batch.labels
        seed = self.settings.seed + 7919 * draw
        return sample_target_labels(logits, batch.labels, batch.keys, seed)

    def _fisher_backwards(
        self, cap: Capture, logits: TargetLogits, batch: Batch
    ) -> Iterator[torch.Tensor]:
        """For every label draw of the batch (one, or --fisher-samples for the sampled Fisher):
        the backward of the SUMMED token loss of the drawn labels, whose output gradients' outer
        products / T_z are the Gauss-Newton's, left in `cap`; yields the examples' weights for
        that draw (the batch weights / draws). Both curvature passes use it: the same labels."""
        draws = self.settings.fisher_samples if self.settings.fisher == "sampled" else 1
        for draw in range(draws):
            nll = logits.nll(self._fisher_labels(logits, batch, draw))  # (B, T-1)
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
                logits = self._forward(batch)
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
        n_references = next(iter(on_device.values())).shape[1]
        chunk = self.settings.chunk
        with Capture(self.layers) as cap:
            for domain, ws in domains.items():
                keys = ws.keys if ws.keys is not None else list(range(len(ws.items)))
                position = {key: i for i, key in enumerate(keys)}
                values = np.zeros((len(ws.items), n_references))
                batches = make_batches(ws, self.settings.batch_size, self.pad_id)
                for batch in self.progress(batches, len(batches), f"domain {domain}"):
                    batch = batch.to(self.device)
                    losses = self._forward(batch).example_losses(batch.labels)
                    cap.backward(losses.sum())  # per example: the gradient of its own l(z)
                    total = torch.zeros(batch.input_ids.shape[0], n_references, dtype=torch.float64)
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
                logits = self._forward(batch)
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
                logits = self._forward(batch)
                if token:  # (B,) summed target NLL per example
                    losses_b = logits.nll(batch.labels).sum(1)
                else:  # (B,) mean target NLL per example
                    losses_b = logits.example_losses(batch.labels)
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
