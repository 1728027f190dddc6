"""The blocked inverse from a Cholesky factor (the dense engine's gradient on the GPU).

Compared with ``torch.linalg.inv`` in float64 at sizes below, at and across the recursion's leaf
size (odd splits included), batched and in float32; and the MLL gradient through it against the
``cholesky_inverse`` path it replaces on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from gpderiv import DerivativeGP
from gpderiv.inference import dense
from gpderiv.inference.spd_inverse import inverse_lower_blocked
from gpderiv.testing import assert_close, sine_data


def spd(n: int, batch: tuple[int, ...] = (), dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    B = torch.randn(*batch, n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return (B @ B.mT / n + 0.05 * torch.eye(n, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize(("n", "block"), [(1, 4), (4, 4), (5, 4), (9, 2), (37, 4), (64, 8), (100, 1), (300, 256)])
def test_blocked_inverse_is_the_lower_triangle_of_the_inverse(n, block) -> None:
    A = spd(n)
    L = torch.linalg.cholesky(A)
    before = L.clone()
    lower = inverse_lower_blocked(L, block)
    # The inverse's entries are up to ~1/0.05: tolerances scaled by the condition number.
    assert_close(lower, torch.linalg.inv(A).tril(), scale=1e3)
    assert (lower.triu(1) == 0).all()  # the gradient's G + G^T = 2 W needs a zero upper triangle
    assert torch.equal(L, before)  # the factor is the caller's


def test_blocked_inverse_batched_column_major_and_float32() -> None:
    A = spd(23, batch=(3,))
    L = torch.linalg.cholesky(A)
    assert_close(inverse_lower_blocked(L, 5), torch.linalg.inv(A).tril(), scale=1e3)
    column_major = L[0].mT.contiguous().mT  # the layout the engine's in-place Cholesky returns
    assert_close(inverse_lower_blocked(column_major, 4), torch.linalg.inv(A[0]).tril(), scale=1e3)
    A32 = spd(30, dtype=torch.float32, seed=1)
    lower = inverse_lower_blocked(torch.linalg.cholesky(A32), 8)
    assert lower.dtype == torch.float32
    assert_close(lower, torch.linalg.inv(A32.double()).tril().float(), scale=1e3)


def test_blocked_inverse_ignores_the_upper_triangle() -> None:
    A = spd(41)
    L = torch.linalg.cholesky(A)
    assert_close(inverse_lower_blocked(L + torch.ones_like(L).triu(1), 4), torch.linalg.inv(A).tril(), scale=1e3)


def test_blocked_inverse_rejects_a_bad_block() -> None:
    with pytest.raises(ValueError, match="block: expected a positive number of rows, got 0"):
        inverse_lower_blocked(torch.eye(3, dtype=torch.float64), 0)


def test_marginal_likelihood_gradient_through_the_blocked_inverse(monkeypatch) -> None:
    """The path CUDA takes, run on the CPU with small leaves, against ``cholesky_inverse``."""
    X, y, grad = sine_data(n=11, d=2)
    grad[3, 0] = float("nan")
    model = DerivativeGP(X, y, grad)

    def gradients() -> list[torch.Tensor]:
        model.zero_grad()
        (-1.5 * model.loss()).backward()
        return [p.grad.clone() for p in model.parameters()]

    calls = []
    monkeypatch.setattr(dense, "inverse_lower", lambda L: calls.append(L.shape) or inverse_lower_blocked(L, 4))
    blocked = gradients()
    assert calls == [(model.num_observations, model.num_observations)]
    monkeypatch.setattr(dense, "inverse_lower", lambda L: None)  # torch.cholesky_inverse
    for a, b in zip(blocked, gradients(), strict=True):
        assert_close(a, b, scale=10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("n", "batch"), [(37, ()), (101, ()), (29, (2,))])
def test_cuda_blocked_inverse_recursion(n, batch) -> None:
    """Small leaves, so that the halving (solves on strided views, in-place copies) runs on the GPU."""
    A = spd(n, batch)
    L, ok = dense.cholesky_in_place(A.cuda())  # the engine's column-major factor
    assert ok and (L.triu(1) == 0).all()
    lower = inverse_lower_blocked(L, 8)
    assert lower.is_cuda and (lower.triu(1) == 0).all()
    assert_close(lower.cpu(), torch.linalg.inv(A).tril(), scale=1e3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gradient_takes_the_blocked_inverse_and_matches_the_cpu() -> None:
    L = torch.linalg.cholesky(spd(50).cuda())
    assert dense.inverse_lower(L) is not None
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # TF32 products: the blocked inverse is not used
        assert dense.inverse_lower(L.float()) is None
    finally:
        torch.set_float32_matmul_precision(before)
    X, y, grad = sine_data(n=40, d=3)
    cpu = DerivativeGP(X, y, grad)
    gpu = DerivativeGP(X.cuda(), y.cuda(), grad.cuda())  # the same data: the same initial hyperparameters
    grads = []
    for model in (cpu, gpu):
        model.zero_grad()
        model.loss().backward()
        grads.append([p.grad.cpu() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        assert_close(b, a, scale=1e3)
