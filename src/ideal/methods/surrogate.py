"""A surrogate of the reference objective Q over log-volumes: every trained mixture's measured Q
(values) and the influence step's sensitivities (noisy derivatives) in one quadratic, and its
minimiser inside the trust region (pure, numpy).

With x_i = log n_i and d = x - x0 around the base mixture x0:

    f(d) = c + b^T d + 1/2 d^T A d                          (A symmetric)

The sensitivities are derivatives in exactly these coordinates: dQ/dbeta_i at beta = 0 is
dQ/dlog n_i, since n_i(beta) = (1 + beta_i) n_i. So a trained mixture m gives one equation
f(d_m) = Q_m with the standard error of Q_m, and an influence step at mixture g gives K equations
grad f(d_g) = alpha_g with their standard errors. The (K+1)(K+2)/2 coefficients are their
weighted least-squares fit under a ridge prior on A (scale `curvature_scale`: Q's observed spread
over the squared radius), so that a few mixtures and one gradient already give a usable model; b
and c are free. Four domains: 15 coefficients; three trained mixtures and one influence step give
3 + 4 equations, and the prior the rest.

`minimise` searches the box of the trust region around x0, |beta_i| <= radius in volume terms
(log(1 - r) <= d_i <= log(1 + r)), with the total kept when asked, by seeded random search then
two rounds of local refinement: K is small (the domains), and the quadratic is cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ideal.errors import IdealError


@dataclass(frozen=True)
class Quadratic:
    """f(x) = c + b^T (x - x0) + 1/2 (x - x0)^T A (x - x0), in log-volumes."""

    x0: np.ndarray
    c: float
    b: np.ndarray
    a: np.ndarray

    def __call__(self, x: np.ndarray) -> np.ndarray:
        d = np.atleast_2d(x) - self.x0  # (P, K)
        return self.c + d @ self.b + 0.5 * np.einsum("pi,ij,pj->p", d, self.a, d)

    def gradient(self, x: np.ndarray) -> np.ndarray:
        return self.b + self.a @ (np.asarray(x, dtype=np.float64) - self.x0)


def _pairs(k: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(k) for j in range(i, k)]


def _value_row(d: np.ndarray) -> np.ndarray:
    k = d.shape[0]
    quad = [0.5 * d[i] * d[i] if i == j else d[i] * d[j] for i, j in _pairs(k)]
    return np.concatenate([[1.0], d, quad])


def _gradient_rows(d: np.ndarray) -> np.ndarray:
    """Rows of d f / d d_k, k = 0..K-1, in the coefficients (c, b, A's upper triangle)."""
    k = d.shape[0]
    pairs = _pairs(k)
    rows = np.zeros((k, 1 + k + len(pairs)))
    for m in range(k):
        rows[m, 1 + m] = 1.0
        for p, (i, j) in enumerate(pairs):
            if i == j and i == m:
                rows[m, 1 + k + p] = d[i]
            elif i != j and m == i:
                rows[m, 1 + k + p] = d[j]
            elif i != j and m == j:
                rows[m, 1 + k + p] = d[i]
    return rows


def fit_quadratic(
    x0: Sequence[float],
    points: Sequence[Sequence[float]],
    values: Sequence[float],
    value_errors: Sequence[float],
    gradient_points: Sequence[Sequence[float]] = (),
    gradients: Sequence[Sequence[float]] = (),
    gradient_errors: Sequence[Sequence[float]] = (),
    curvature_scale: float = 1.0,
) -> Quadratic:
    """The weighted least-squares quadratic through the values and gradients (each equation
    divided by its standard error; a zero error is read as the smallest positive one of its
    kind given),
    with a ridge prior of standard deviation `curvature_scale` on every entry of A."""
    center = np.asarray(x0, dtype=np.float64)
    k = center.shape[0]
    rows, targets, scales = [], [], []
    # a zero error reads as the smallest positive one of its own kind: values and gradients
    # are in other units
    value_floor = _floor(value_errors)
    gradient_floor = _floor(np.ravel(np.asarray(gradient_errors, dtype=np.float64)).tolist())
    for x, value, error in zip(points, values, value_errors, strict=True):
        rows.append(_value_row(np.asarray(x, dtype=np.float64) - center))
        targets.append(float(value))
        scales.append(max(float(error), value_floor))
    for x, g, errors in zip(gradient_points, gradients, gradient_errors, strict=True):
        block = _gradient_rows(np.asarray(x, dtype=np.float64) - center)
        for m in range(k):
            rows.append(block[m])
            targets.append(float(g[m]))
            scales.append(max(float(errors[m]), gradient_floor))
    if not rows:
        raise IdealError("surrogate: no observation to fit")
    if curvature_scale <= 0:
        raise IdealError(f"surrogate: curvature_scale must be > 0, got {curvature_scale}")
    design = np.asarray(rows) / np.asarray(scales)[:, None]
    target = np.asarray(targets) / np.asarray(scales)
    n_quad = len(_pairs(k))
    prior = np.zeros((n_quad, 1 + k + n_quad))
    prior[:, 1 + k :] = np.eye(n_quad) / curvature_scale
    design = np.vstack([design, prior])
    target = np.concatenate([target, np.zeros(n_quad)])
    theta, *_ = np.linalg.lstsq(design, target, rcond=None)
    a = np.zeros((k, k))
    for p, (i, j) in enumerate(_pairs(k)):
        a[i, j] = a[j, i] = theta[1 + k + p]
    return Quadratic(center, float(theta[0]), theta[1 : 1 + k].copy(), a)


def _floor(errors: Sequence[float]) -> float:
    positive = [float(e) for e in errors if float(e) > 0 and np.isfinite(e)]
    return min(positive) if positive else 1.0


def minimise(
    model: Quadratic,
    radius: float,
    keep_total: bool = True,
    seed: int = 0,
    samples: int = 4096,
) -> np.ndarray:
    """The point of the trust region around x0 where the quadratic is lowest: log-volumes x with
    log(1 - radius) <= x_i - x0_i <= log(1 + radius) and, with `keep_total`, sum exp(x) equal
    to sum exp(x0). Seeded random search, then two rounds of search in a box a quarter the size
    around the best point so far; x0 itself is always a candidate."""
    if not 0 < radius < 1:
        raise IdealError(f"surrogate: radius must be in (0, 1), got {radius}")
    rng = np.random.default_rng(seed)
    low, high = np.log1p(-radius), np.log1p(radius)
    k = model.x0.shape[0]
    total = float(np.exp(model.x0).sum())

    def feasible(d: np.ndarray) -> np.ndarray:
        """Project onto the kept total, then keep the points still inside the box."""
        if keep_total:
            d = d - np.log(np.exp(model.x0 + d).sum(axis=1, keepdims=True) / total)
        inside = np.all((d >= low - 1e-12) & (d <= high + 1e-12), axis=1)
        return d[inside]

    best = np.zeros(k)
    best_value = float(model(model.x0)[0])
    lo, hi = np.full(k, low), np.full(k, high)
    for _ in range(3):
        d = feasible(rng.uniform(lo, hi, size=(samples, k)))
        if d.shape[0]:
            values = model(model.x0 + d)
            i = int(np.argmin(values))
            if values[i] < best_value:
                best, best_value = d[i], float(values[i])
        width = (hi - lo) / 4
        lo, hi = np.maximum(best - width, low), np.minimum(best + width, high)
    return model.x0 + best
