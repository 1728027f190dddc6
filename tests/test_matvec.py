"""Matrix-free products with the RBF derivative block matrix against the dense blocks."""

from __future__ import annotations

import pytest
import torch

from gpderiv.blocks import rbf_derivative_matmul, rbf_profile, stationary_derivative_blocks
from gpderiv.testing import assert_close

DTYPE = torch.float64


@pytest.mark.parametrize(("n1", "n2", "d", "t", "ard"), [(4, 5, 3, 1, True), (7, 7, 1, 2, False), (6, 9, 5, 3, True)])
def test_matmul_equals_dense_blocks_including_coincident_points(n1: int, n2: int, d: int, t: int, ard: bool) -> None:
    gen = torch.Generator().manual_seed(n1 * 10 + d)
    x1 = torch.randn(n1, d, dtype=DTYPE, generator=gen)
    x2 = torch.randn(n2, d, dtype=DTYPE, generator=gen)
    x2[0] = x1[1]
    x2[1] = x1[0] + 1e-9
    ls = torch.rand(d if ard else 1, dtype=DTYPE, generator=gen) + 0.4
    K = stationary_derivative_blocks(x1, x2, ls.reshape(1, -1), rbf_profile)
    R = torch.randn(n2 * (1 + d), t, dtype=DTYPE, generator=gen)
    assert_close(rbf_derivative_matmul(x1, x2, ls, R), K @ R, scale=100)
    assert_close(rbf_derivative_matmul(x1, x2, ls, R, chunk_size=2), K @ R, scale=100)
    assert_close(rbf_derivative_matmul(x1, x2, ls, R[:, 0]), K @ R[:, 0], scale=100)


def test_matmul_gradients_match_the_dense_product() -> None:
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(6, 3, dtype=DTYPE, generator=gen)
    R = torch.randn(24, 2, dtype=DTYPE, generator=gen)
    G = torch.randn(24, 2, dtype=DTYPE, generator=gen)
    ls = torch.tensor([0.6, 0.9, 1.4], dtype=DTYPE, requires_grad=True)
    (ours,) = torch.autograd.grad((rbf_derivative_matmul(X, X, ls, R, chunk_size=4) * G).sum(), ls)
    dense = stationary_derivative_blocks(X, X, ls.reshape(1, -1), rbf_profile)
    (reference,) = torch.autograd.grad(((dense @ R) * G).sum(), ls)
    assert_close(ours, reference, scale=1e3)


def test_matmul_checks_the_right_hand_side() -> None:
    x = torch.randn(3, 2, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"rhs: expected 9 rows for n2 = 3, d = 2, got 8"):
        rbf_derivative_matmul(x, x, torch.ones(2, dtype=DTYPE), torch.ones(8, dtype=DTYPE))


def test_matmul_large_dimension_path_equals_dense() -> None:
    gen = torch.Generator().manual_seed(4)
    x1 = torch.randn(5, 40, dtype=DTYPE, generator=gen)
    x2 = torch.cat([x1[:2], torch.randn(4, 40, dtype=DTYPE, generator=gen)])
    ls = torch.rand(40, dtype=DTYPE, generator=gen) + 3.0
    K = stationary_derivative_blocks(x1, x2, ls.reshape(1, -1), rbf_profile)
    R = torch.randn(6 * 41, 2, dtype=DTYPE, generator=gen)
    assert_close(rbf_derivative_matmul(x1, x2, ls, R), K @ R, scale=100)


def test_matmul_with_no_rows_is_empty() -> None:
    """A torch.distributed rank whose share of the points is empty multiplies no rows."""
    x = torch.randn(3, 2, dtype=DTYPE)
    R = torch.randn(9, 4, dtype=DTYPE)
    assert rbf_derivative_matmul(x[:0], x, torch.ones(2, dtype=DTYPE), R).shape == (0, 4)
    assert rbf_derivative_matmul(x[:0], x, torch.ones(2, dtype=DTYPE), R[:, 0]).shape == (0,)
