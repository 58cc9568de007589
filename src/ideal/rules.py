"""Update rules: signals about the current mixture -> requested volumes for the next round.

The IDEAL rule (METHOD.md "The update rule"), with the sign convention used everywhere in `ideal`:
s_ji > 0 means "training more on domain i is predicted to LOWER the loss on reference j".

    dQ/dbeta_i = -(n_i / N) * sum_j w_j s_ji          (sensitivities; the n_i/N factor is optional)
    beta       = -m * alpha / max_i |alpha_i|         (alpha = dQ/dbeta; the largest change is m)
    n_i       <- n_i * (1 + beta_i)                   (then constraints, in `ideal.mixture`)

A rule is a small object with a name, the signals it needs, and `propose`. Rules that need no
influence let the loop skip that step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ideal.errors import IdealError


def sensitivities(
    scores: np.ndarray,
    volumes: Sequence[float],
    weights: Sequence[float] | None = None,
    size_factor: bool = True,
) -> np.ndarray:
    """dQ/dbeta_i for every domain i, from influence scores (references x domains).

    `weights` w_j default to 1/k (every capability counts the same). With `size_factor`, the
    domain's share n_i/N multiplies its term (METHOD.md; the reference code drops it).
    """
    scores = np.asarray(scores, dtype=np.float64)
    k, n = scores.shape
    w = np.full(k, 1.0 / k) if weights is None else np.asarray(weights, dtype=np.float64)
    v = np.asarray(volumes, dtype=np.float64)
    if w.shape != (k,) or v.shape != (n,):
        raise IdealError(f"shapes: scores {scores.shape}, weights {w.shape}, volumes {v.shape}")
    share = v / v.sum() if size_factor else np.ones(n)
    return -share * (w @ scores)


def ideal_beta(sensitivity: Sequence[float], step: float = 0.15) -> np.ndarray:
    """beta = -m * alpha / max|alpha|: move against the gradient, the largest change being `step`.

    All-zero sensitivities (nothing to gain) give beta = 0.
    """
    if not 0.0 < step < 1.0:
        raise IdealError(f"step m must be in (0, 1), got {step}")
    alpha = np.asarray(sensitivity, dtype=np.float64)
    if not np.all(np.isfinite(alpha)):
        raise IdealError(f"sensitivities must be finite, got {alpha.tolist()}")
    largest = np.abs(alpha).max(initial=0.0)
    if largest == 0.0:
        return np.zeros_like(alpha)
    return -step * alpha / largest


class Rule(Protocol):
    """Requested (real-valued) volumes for the next round; constraints are applied afterwards."""

    name: str
    needs_influence: bool

    def propose(
        self, volumes: Mapping[str, int], signals: Mapping[str, Any]
    ) -> dict[str, float]: ...


@dataclass(frozen=True)
class IdealRule:
    """The IDEAL step from `signals["sensitivity"]` (domain -> dQ/dbeta_i)."""

    step: float = 0.15
    name: str = "ideal"
    needs_influence: bool = True

    def propose(self, volumes: Mapping[str, int], signals: Mapping[str, Any]) -> dict[str, float]:
        sensitivity = signals["sensitivity"]
        domains = list(volumes)
        beta = ideal_beta([sensitivity[d] for d in domains], self.step)
        return {d: volumes[d] * (1.0 + b) for d, b in zip(domains, beta, strict=True)}


@dataclass(frozen=True)
class UniformRule:
    """The same volume for every domain, at the same total."""

    name: str = "uniform"
    needs_influence: bool = False

    def propose(self, volumes: Mapping[str, int], signals: Mapping[str, Any]) -> dict[str, float]:
        total = sum(volumes.values())
        return {d: total / len(volumes) for d in volumes}


@dataclass(frozen=True)
class TemperatureRule:
    """Volumes proportional to pool size ** (1 / T), at the same total (T = 1: proportional)."""

    temperature: float = 2.0
    name: str = "temperature"
    needs_influence: bool = False

    def propose(self, volumes: Mapping[str, int], signals: Mapping[str, Any]) -> dict[str, float]:
        if not self.temperature > 0:
            raise IdealError(f"temperature must be > 0, got {self.temperature}")
        sizes = signals["pool_sizes"]
        weights = {d: float(sizes[d]) ** (1.0 / self.temperature) for d in volumes}
        total, norm = sum(volumes.values()), sum(weights.values())
        return {d: total * w / norm for d, w in weights.items()}


@dataclass(frozen=True)
class FixedRule:
    """Given volumes, rescaled to the current total (e.g. one random mixture on the simplex)."""

    shares: tuple[tuple[str, float], ...]  # (domain, share); shares need not sum to 1
    name: str = "fixed"
    needs_influence: bool = False

    def propose(self, volumes: Mapping[str, int], signals: Mapping[str, Any]) -> dict[str, float]:
        shares = dict(self.shares)
        if (
            set(shares) != set(volumes)
            or not all(v >= 0 for v in shares.values())
            or sum(shares.values()) <= 0
        ):
            raise IdealError(
                f"fixed mixture: shares {shares} do not match the domains {sorted(volumes)}"
            )
        total, norm = sum(volumes.values()), sum(shares.values())
        return {d: total * shares[d] / norm for d in volumes}


def random_shares(
    domains: Sequence[str], rng: np.random.Generator
) -> tuple[tuple[str, float], ...]:
    """A uniformly random point of the simplex over the domains (Dirichlet(1, ..., 1))."""
    return tuple(zip(domains, rng.dirichlet(np.ones(len(domains))).tolist(), strict=True))
