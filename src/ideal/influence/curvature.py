"""Curvature of the mixture loss per linear layer, and its damped inverse-vector products.

Pure functions over tensors (no files, no model). Every curvature option approximates the SAME matrix,
the Gauss-Newton matrix of the mixture loss (docs/method.md) restricted to the selected layers. With the
training objective written as L = sum_z scale_z NLL_z / sum_z mass_z (ideal.lm.loss_scales: the
example mean, scale = w/T_z and mass = w, or the token mean, scale = w and mass = w T_z),

    G = sum_z scale_z sum over z's target tokens t of J_t^T H_t J_t  /  sum_z mass_z,

H_t the softmax Hessian of token t. For `influence.loss: example` that is E_z[(1/T_z) sum_t ...]; for
`token` every target token of the mixture counts the same, so an example weighs by its T_z. With
labels y sampled from the model, E_y[G_z G_z^T] = sum_t E_y[g_t g_t^T] for the per-example gradient
G_z of the SUMMED token loss (cross terms vanish), so G = sum_z scale_z vec(G_z) vec(G_z)^T /
sum_z mass_z. All four options share that scale, so an absolute damping means the same thing for
each (kronfluence's K-FAC is ~T times smaller than its EK-FAC; we avoid that trap by construction).

For one layer with weight W (out x in), the statistics (sums over examples z with weights w_z; batch
products in float32, running sums over batches in float64) are

    A      = sum_z w_z sum_{t in P_z} a_t a_t^T  /  sum_z w_z |P_z|      P_z: non-padding positions
    S      = sum_z scale_z sum_t g_t g_t^T  /  sum_z mass_z             g: output gradients
    K-FAC:  G_l = A (x) S,  i.e. eigenvalues s_p a_q in the eigenbases Q_S, Q_A
    EK-FAC: Lambda[p, q] = sum_z scale_z (Q_S^T G_z Q_A)[p, q]^2 / sum_z mass_z

(A weighs positions by w_z under both objectives: it is the input statistic of every position, as
docs/method.md defines it.) The damped inverse-HVP is  V -> Q_S [ (Q_S^T V Q_A) / (Lambda + lambda) ] Q_A^T.
Damping lambda is `damping * mean(Lambda)` per layer (relative, default 0.1), or an absolute value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ideal.lm import loss_scales

Tensor = torch.Tensor


@dataclass
class LayerStats:
    """Running sums for one layer, float64. Normalise with `covariances`."""

    a_sum: Tensor  # (in, in)   sum of w a a^T over non-padding positions
    s_sum: Tensor  # (out, out) sum of scale_z g g^T (w / T_z, or w with token normalisation)
    positions: float = 0.0  # sum of w |P_z|
    examples: float = 0.0  # sum of mass_z: S's normaliser (sum of w, or of w T_z for token)

    @classmethod
    def zeros(
        cls, d_in: int, d_out: int, dtype: torch.dtype = torch.float64, device: Any = None
    ) -> LayerStats:
        return cls(
            torch.zeros(d_in, d_in, dtype=dtype, device=device),
            torch.zeros(d_out, d_out, dtype=dtype, device=device),
        )

    def add(self, other: LayerStats) -> None:
        self.a_sum += other.a_sum
        self.s_sum += other.s_sum
        self.positions += other.positions
        self.examples += other.examples


def layer_stats(
    a: Tensor, g: Tensor, mask: Tensor, targets: Tensor, weights: Tensor, loss: str = "example"
) -> LayerStats:
    """Covariance sums of one batch for one layer: float32 products, returned in float64.

    The batch's products run in float32 (2.5x faster than float64 on CPU, and what accelerators
    do fast); the running sums over batches are float64. With float32 running sums, regrouping the
    same examples into other batches (or processes) moved EK-FAC scores by up to 6.5e-4 relative
    on a tiny trained model, because near-degenerate eigenvectors amplify round-off; with float64
    sums of float32 batch products, by under 1e-5 (docs/results.md).

    a: (B, T, in) inputs; g: (B, T, out) output gradients of the summed token loss; mask: (B, T)
    non-padding positions; targets: (B,) target-token counts T_z; weights: (B,) example weights;
    loss: the objective whose Gauss-Newton S estimates (example | token, ideal.lm.loss_scales).
    """
    m = mask.unsqueeze(-1).float()
    a = (a.float() * m).reshape(-1, a.shape[-1])  # (B*T, in), padding rows zeroed
    g = (g.float() * m).reshape(
        -1, g.shape[-1]
    )  # (B*T, out); zero at padding already, made explicit
    tokens = mask.shape[1]
    wa = a * weights.float().repeat_interleave(tokens).unsqueeze(-1)
    scale, mass = loss_scales(weights.float(), targets.float(), loss)
    wg = g * scale.repeat_interleave(tokens).unsqueeze(-1)
    a_sum = (wa.T @ a).double()
    s_sum = (wg.T @ g).double()
    positions = float((mask.float().sum(1) * weights.float()).sum())
    return LayerStats(a_sum, s_sum, positions, float(mass.sum()))


def covariances(stats: LayerStats) -> tuple[Tensor, Tensor]:
    """(A, S) from their running sums."""
    return stats.a_sum / stats.positions, stats.s_sum / stats.examples


@dataclass
class Eigen:
    """Eigenbases of A and S and the eigenvalues of G_l in that basis (out x in), float64."""

    q_a: Tensor  # (in, in)
    q_s: Tensor  # (out, out)
    eigenvalues: Tensor  # (out, in): s_p a_q for K-FAC, corrected for EK-FAC


def symmetric_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigendecomposition in float64 after symmetrising (round-off makes sums slightly asymmetric)."""
    m = matrix.double()
    values, vectors = torch.linalg.eigh(0.5 * (m + m.T))
    return values.clamp_min(0.0), vectors  # a covariance is PSD: negative values are round-off


def kfac_eigen(a_cov: Tensor, s_cov: Tensor) -> Eigen:
    a_values, q_a = symmetric_eigh(a_cov)
    s_values, q_s = symmetric_eigh(s_cov)
    return Eigen(q_a, q_s, torch.outer(s_values, a_values))


def rotated_squares(g: Tensor, a: Tensor, mask: Tensor, eigen: Eigen) -> Tensor:
    """(Q_S^T G_z Q_A)^2 per example, (B, out, in), with G_z = sum_t g_t a_t^T, in float32.

    Two contraction orders give the same result; the cheaper one is used: rotating a and g first
    costs T (in^2 + out^2 + out in) per example, forming G_z first costs T out in + out in (out + in).
    """
    a = a.float() * mask.unsqueeze(-1)
    g = g.float()
    q_a, q_s = eigen.q_a.float(), eigen.q_s.float()
    tokens, d_out, d_in = a.shape[1], g.shape[-1], a.shape[-1]
    if tokens * (d_in**2 + d_out**2) <= d_out * d_in * (d_out + d_in):
        grads = torch.einsum("bto,bti->boi", g @ q_s, a @ q_a)  # rotate, then contract over tokens
    else:
        grads = q_s.T @ torch.einsum("bto,bti->boi", g, a) @ q_a  # contract, then rotate
    return grads.square()


def correction_sum(
    g: Tensor,
    a: Tensor,
    mask: Tensor,
    targets: Tensor,
    weights: Tensor,
    eigen: Eigen,
    chunk: int,
    loss: str = "example",
) -> Tensor:
    """sum_z scale_z (Q_S^T G_z Q_A)^2 over a batch, `chunk` examples at a time (bounded memory);
    scale_z = w_z / T_z (example) or w_z (token), as ideal.lm.loss_scales.

    Per-example terms are float32; the batch sum is returned in float64.
    """
    total = torch.zeros_like(eigen.eigenvalues, dtype=torch.float64)
    scale = loss_scales(weights.float(), targets.float(), loss)[0].view(-1, 1, 1)
    for start in range(0, g.shape[0], chunk):
        part = slice(start, start + chunk)
        squares = rotated_squares(g[part], a[part], mask[part], eigen)
        total += (squares * scale[part]).sum(0).double()
    return total


def damping_value(eigenvalues: Tensor, damping: float | None, damping_abs: float | None) -> float:
    """lambda of one layer: absolute if given, else `damping` x the mean eigenvalue."""
    if damping_abs is not None:
        return float(damping_abs)
    return float(damping if damping is not None else 0.1) * float(eigenvalues.mean())


def inverse_hvp(v: Tensor, eigen: Eigen, damping: float) -> Tensor:
    """(G_l + damping I)^{-1} v for v of shape (..., out, in), in the eigenbasis of G_l."""
    if damping <= 0.0 and bool((eigen.eigenvalues <= 0).any()):
        raise ValueError("zero damping with a singular curvature: set a damping > 0")
    # in the wider of the two dtypes: float64 for float64 factors (the dense-reference tests),
    # float32 for the float32 eigenbases kept at scale (half the time; the directions are float32)
    dtype = torch.promote_types(v.dtype, eigen.q_s.dtype)
    q_a, q_s, values = (t.to(dtype) for t in (eigen.q_a, eigen.q_s, eigen.eigenvalues))
    rotated = q_s.T @ v.to(dtype) @ q_a
    return q_s @ (rotated / (values + damping)) @ q_a.T


def dense_kronecker(eigen: Eigen) -> Tensor:
    """The dense matrix that `inverse_hvp` inverts, for vec = row-major flattening of (out, in).

    For tests and the `exact` comparison only: (out*in)^2 entries.
    """
    basis = torch.kron(eigen.q_s, eigen.q_a)  # row-major vec(Q_S X Q_A^T) = (Q_S (x) Q_A) vec(X)
    return basis @ torch.diag(eigen.eigenvalues.reshape(-1)) @ basis.T
