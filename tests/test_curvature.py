"""The curvature core against dense float64 references (pure tensors, no model)."""

from __future__ import annotations

import pytest
import torch

from ideal.influence.curvature import (
    Eigen,
    correction_sum,
    damping_value,
    dense_kronecker,
    inverse_hvp,
    kfac_eigen,
    layer_stats,
)

torch.manual_seed(0)


def random_psd(n: int, rank: int | None = None) -> torch.Tensor:
    x = torch.randn(n, rank or 2 * n, dtype=torch.float64)
    return x @ x.T / x.shape[1]


def random_orthogonal(n: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    return q


def relative_error(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm())


def test_kfac_eigen_form_is_the_kronecker_product():
    a, s = random_psd(5), random_psd(4)
    # row-major vec: vec(S V A) = (S (x) A) vec(V); A and S are symmetric
    assert relative_error(dense_kronecker(kfac_eigen(a, s)), torch.kron(s, a)) < 1e-12


def test_kfac_inverse_hvp_equals_a_dense_solve():
    a, s = (
        random_psd(6, rank=3),
        random_psd(5, rank=2),
    )  # singular factors: damping makes it solvable
    eigen, damping = kfac_eigen(a, s), 0.03
    v = torch.randn(5, 6, dtype=torch.float64)
    dense = torch.kron(s, a) + damping * torch.eye(30, dtype=torch.float64)
    expected = torch.linalg.solve(dense, v.reshape(-1)).reshape(5, 6)
    assert relative_error(inverse_hvp(v, eigen, damping), expected) < 1e-8


def test_ekfac_inverse_hvp_equals_a_dense_solve_of_the_eigen_form():
    q_a, q_s = random_orthogonal(6), random_orthogonal(4)
    eigenvalues = torch.rand(4, 6, dtype=torch.float64) ** 3  # spread over orders of magnitude
    damping = 1e-3
    # the dense matrix built term by term: sum_pq Lambda_pq vec(u_p w_q^T) vec(u_p w_q^T)^T
    dense = torch.zeros(24, 24, dtype=torch.float64)
    for p in range(4):
        for q in range(6):
            u = torch.outer(q_s[:, p], q_a[:, q]).reshape(-1)
            dense += eigenvalues[p, q] * torch.outer(u, u)
    v = torch.randn(3, 4, 6, dtype=torch.float64)  # a batch of vectors
    solve = torch.linalg.solve(
        dense + damping * torch.eye(24, dtype=torch.float64), v.reshape(3, -1).T
    )
    result = inverse_hvp(v, Eigen(q_a, q_s, eigenvalues), damping)
    assert relative_error(result.reshape(3, -1), solve.T) < 1e-8


def test_the_published_bug_multiplies_instead_of_inverting():
    """docs/method.md defect 1: dividing by 1/(Lambda + damping) is a curvature product, not an inverse."""
    q_a, q_s = random_orthogonal(6), random_orthogonal(4)
    eigen = Eigen(q_a, q_s, torch.rand(4, 6, dtype=torch.float64) + 0.1)
    v = torch.randn(4, 6, dtype=torch.float64)
    rotated = q_s @ v @ q_a.T  # their projection, too
    wrong = q_s @ (rotated / (1.0 / eigen.eigenvalues)) @ q_a.T
    right = inverse_hvp(v, eigen, 0.0)
    # applying the curvature to the right answer gives v back; to the wrong one it does not
    dense = dense_kronecker(eigen)
    assert relative_error((dense @ right.reshape(-1)).reshape(4, 6), v) < 1e-10
    assert relative_error((dense @ wrong.reshape(-1)).reshape(4, 6), v) > 0.5


def test_damping_is_relative_to_the_mean_eigenvalue_or_absolute():
    values = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    assert damping_value(values, 0.1, None) == 0.1 * 3.0
    assert damping_value(values, 0.1, 0.5) == 0.5


def masked_batch(b: int = 3, t: int = 5, d_in: int = 4, d_out: int = 3):
    a = torch.randn(b, t, d_in)
    g = torch.randn(b, t, d_out)
    mask = torch.ones(b, t)
    mask[0, t - 2 :] = 0  # padding
    mask[2, t - 1 :] = 0
    g = g * mask.unsqueeze(-1)
    targets = torch.tensor([2.0, 4.0, 1.0])
    weights = torch.tensor([1.0, 3.0, 2.0])
    return a, g, mask, targets, weights


def test_layer_stats_equal_explicit_per_token_outer_products():
    a, g, mask, targets, weights = masked_batch()
    stats = layer_stats(a, g, mask, targets, weights)
    a, g, weights, targets = a.double(), g.double(), weights.double(), targets.double()
    a_sum = torch.zeros(4, 4, dtype=torch.float64)
    s_sum = torch.zeros(3, 3, dtype=torch.float64)
    positions = 0.0
    for z in range(3):
        for t in range(5):
            if mask[z, t]:
                a_sum += weights[z] * torch.outer(a[z, t], a[z, t])
                s_sum += weights[z] / targets[z] * torch.outer(g[z, t], g[z, t])
                positions += float(weights[z])
    # running sums are float64 (see layer_stats), a batch's products float32
    assert stats.a_sum.dtype == torch.float64
    assert torch.allclose(stats.a_sum, a_sum, rtol=1e-6, atol=1e-6)
    assert torch.allclose(stats.s_sum, s_sum, rtol=1e-6, atol=1e-6)
    assert stats.positions == positions and stats.examples == 6.0


@pytest.mark.parametrize("tokens", [3, 5])  # 3: rotate then contract; 5: contract then rotate
def test_correction_equals_an_explicit_per_example_loop_in_any_chunk_size(tokens):
    a, g, mask, targets, weights = masked_batch(t=tokens)
    eigen = kfac_eigen(random_psd(4), random_psd(3))
    expected = torch.zeros(3, 4, dtype=torch.float64)
    for z in range(3):
        grad = sum(torch.outer(g[z, t], a[z, t]) for t in range(tokens) if mask[z, t]).double()
        expected += weights[z] / targets[z] * (eigen.q_s.T @ grad @ eigen.q_a) ** 2
    for chunk in (1, 2, 16):
        result = correction_sum(g, a, mask, targets, weights, eigen, chunk)
        assert relative_error(result, expected) < 1e-6
