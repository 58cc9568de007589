"""What the influence step reads and returns: weighted sets of tokenized examples (a domain's
sample, a reference set, the curvature sample) and the scores with everything measured beside them.

No torch: plain records over ideal.data.rows.Tokenized and numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ideal.data.rows import Tokenized


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
    scores: np.ndarray  # (references, domains), docs/method.md sign convention
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
