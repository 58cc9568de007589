"""From scores to the gradient the update follows (docs/method.md "The bilevel problem"): the weights
w_j of Q = sum_j w_j L(R_j), the sensitivities dQ/dbeta_i = -(n_i/N) sum_j w_j s_ji, and the
summary influence.json carries (with the sensitivities' standard errors).

The step taken from them (beta, its size m) belongs to the update rule (ideal.methods.rules),
not to influence.json.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ideal.errors import IdealError
from ideal.influence.results import InfluenceResult


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


def sensitivities(
    scores: np.ndarray,
    volumes: Sequence[float],
    weights: Sequence[float] | None = None,
    size_factor: bool = True,
) -> np.ndarray:
    """dQ/dbeta_i for every domain i, from influence scores (references x domains).

    `weights` w_j default to 1/k (every capability counts the same). With `size_factor`, the
    domain's share n_i/N multiplies its term (docs/method.md; the reference code drops it). Under
    `influence.loss: token` the caller passes target-token counts t_i as `volumes`: the share is
    then t_i/T, the domain's weight in the token-normalised L_mix.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n_references, n = scores.shape
    w = (
        np.full(n_references, 1.0 / n_references)
        if weights is None
        else np.asarray(weights, dtype=np.float64)
    )
    v = np.asarray(volumes, dtype=np.float64)
    if w.shape != (n_references,) or v.shape != (n,):
        raise IdealError(f"shapes: scores {scores.shape}, weights {w.shape}, volumes {v.shape}")
    share = v / v.sum() if size_factor else np.ones(n)
    return -share * (w @ scores)


def result_summary(
    result: InfluenceResult,
    volumes: dict[str, int],
    objective: str,
    size_factor: bool,
    sizes: dict[str, int],
) -> dict[str, Any]:
    """The sensitivities dQ/dbeta_i and their standard errors, and the objective they are of, for
    influence.json (the step beta is the update's: ideal.methods.rules.ideal_beta).

    `volumes` are the sizes whose shares are the size factor: the copies n_i of each domain in the
    mixture under `influence.loss: example`, its target tokens t_i under `token` (a domain's weight
    in L_mix; the caller passes them, docs/method.md "Setting")."""
    weights = objective_weights(objective, result.references, sizes, result.reference_losses)
    counts = [volumes[d] for d in result.domains]
    alpha = sensitivities(result.scores, counts, weights, size_factor)
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
        "objective": {
            "kind": objective,
            "weights": dict(zip(result.references, weights.tolist(), strict=True)),
            "size_factor": size_factor,
            "size_factor_of": "target tokens" if result.loss == "token" else "volumes",
        },
    }
