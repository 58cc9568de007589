"""Domain scores from per-example contributions: weighted means (or, under `token`, ratio
estimators), their standard errors and covariances, summed over every process's shard.
"""

from __future__ import annotations

import numpy as np
import torch

from ideal.distributed import all_reduce_
from ideal.influence.results import WeightedSet


def domain_means(
    domains: dict[str, WeightedSet],
    contributions: dict[str, np.ndarray],
    n_references: int,
    loss: str = "example",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
    """Scores (k, n) as the weighted means of the per-example contributions, their standard errors
    (k, n), the covariance of each domain's k scores (n, k, k) and the copies used per domain,
    summed over every process's shard (k = `n_references`).

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
    the formula above (x_z = 1: the weighted mean). The two are computed apart, each from its own
    sums, because they differ in round-off."""
    n = len(domains)
    scores = np.zeros((n_references, n))
    covariance, used = np.zeros((n, n_references, n_references)), {}
    for i, (domain, ws) in enumerate(domains.items()):
        w = np.asarray(ws.weights, dtype=np.float64)[:, None]  # (n_i, 1) copies
        c = contributions[domain]  # (n_i, k): v_j^T grad l(z), l the mean NLL
        if loss == "token":
            x = np.asarray([item.num_targets for item in ws.items], dtype=np.float64)[:, None]
            m, mean, sample_cov, scale = _ratio_moments(w, x, c, n_references)
        else:
            m, mean, sample_cov, scale = _mean_moments(w, c, n_references)
        fpc = 0.0 if ws.population is None else max(0.0, 1.0 - m / ws.population)
        scores[:, i] = mean
        covariance[i] = fpc * sample_cov / scale if scale is not None else 0.0
        used[domain] = float(m)
    stderr = np.sqrt(np.maximum(np.diagonal(covariance, axis1=1, axis2=2), 0.0)).T
    return scores, stderr, covariance, used


Moments = tuple[float, np.ndarray, np.ndarray, float | None]


def _mean_moments(w: np.ndarray, c: np.ndarray, n_references: int) -> Moments:
    """The copies m, the weighted mean of `c` (k,), its sample covariance C over the copies
    (k, k) and the divisor of C in the mean's covariance (m), from sums across processes."""
    sums = np.concatenate([[w.sum()], (w * c).sum(0), ((w * c).T @ c).ravel()])
    sums = all_reduce_(torch.from_numpy(sums)).numpy()
    m, (first, second) = sums[0], np.split(sums[1:], [n_references])
    second = second.reshape(n_references, n_references)
    mean = first / m
    sample_cov = (second - m * np.outer(mean, mean)) / max(m - 1.0, 1.0)
    return m, mean, sample_cov, m


def _ratio_moments(w: np.ndarray, x: np.ndarray, c: np.ndarray, n_references: int) -> Moments:
    """The copies m, the ratio estimator R = sum w x c / sum w x (k,), the sample covariance C_u
    of u_z = x_z (c_z - R) (k, k) and its divisor m xbar^2 (None without a target token: no
    covariance), from sums that add across processes (C_u expanded around R, known only after
    the reduction: sum w x^2 (c - R)(c - R)^T = Q - R P^T - P R^T + X2 R R^T)."""
    wx, wxx = w * x, w * x * x
    sums = np.concatenate(
        [[w.sum(), wx.sum(), wxx.sum()], (wx * c).sum(0), (wxx * c).sum(0),
         ((wxx * c).T @ c).ravel()]
    )  # fmt: skip
    sums = all_reduce_(torch.from_numpy(sums)).numpy()
    m, total, x2 = sums[0], sums[1], sums[2]
    y, p, q = np.split(sums[3:], [n_references, 2 * n_references])
    q = q.reshape(n_references, n_references)
    ratio = y / total if total > 0 else np.zeros(n_references)
    spread = q - np.outer(ratio, p) - np.outer(p, ratio) + x2 * np.outer(ratio, ratio)
    sample_cov = spread / max(m - 1.0, 1.0)  # of u_z = T_z (c_z - R), per copy
    xbar = total / m if m > 0 else 1.0
    return m, ratio, sample_cov, m * xbar**2 if total > 0 else None
