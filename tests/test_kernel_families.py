"""Matern derivative kernels and compositions: blocks vs autograd, exact limits at r = 0, gradients."""

from __future__ import annotations

import math
import unittest

import gpytorch
import pytest
import torch
from gpytorch.kernels import AdditiveKernel, Matern52KernelGrad, RBFKernel, ScaleKernel
from gpytorch.test.base_kernel_test_case import BaseKernelTestCase
from torch import Tensor
from torch.func import jacrev

from gpderiv import DerivativeGP
from gpderiv.blocks import matern32_profile, matern52_profile, stationary_derivative_blocks
from gpderiv.blocks.stationary import _assemble
from gpderiv.kernels import DerivativeMatern32Kernel, DerivativeMatern52Kernel, DerivativeRBFKernel
from gpderiv.testing import assert_close

DTYPE = torch.float64
SQ5, SQ3 = math.sqrt(5.0), math.sqrt(3.0)


def matern52(r: Tensor) -> Tensor:
    return (1 + SQ5 * r + 5 * r * r / 3) * torch.exp(-SQ5 * r)


def matern32(r: Tensor) -> Tensor:
    return (1 + SQ3 * r) * torch.exp(-SQ3 * r)


FAMILIES = [
    (DerivativeMatern52Kernel, matern52, matern52_profile, 5.0 / 3.0),
    (DerivativeMatern32Kernel, matern32, matern32_profile, 3.0),
]


def plain(radial, lengthscale: Tensor):
    """The plain kernel of two points, written with a square root (autograd is NaN at r = 0)."""
    return lambda a, b: radial(torch.sqrt((((a - b) / lengthscale) ** 2).sum()))


@pytest.mark.parametrize(("kernel_cls", "radial", "profile", "limit"), FAMILIES)
@pytest.mark.parametrize(("n1", "n2", "d", "ard"), [(3, 4, 1, False), (4, 3, 3, True), (2, 5, 5, True)])
def test_matern_blocks_match_autograd_and_exact_limit_at_coincident_points(
    kernel_cls, radial, profile, limit, n1: int, n2: int, d: int, ard: bool
) -> None:
    gen = torch.Generator().manual_seed(n1 + 10 * d)
    x1 = torch.randn(n1, d, dtype=DTYPE, generator=gen)
    x2 = torch.randn(n2, d, dtype=DTYPE, generator=gen)
    x2[0] = x1[1]  # coincident pair (1, 0)
    ls = torch.rand(d if ard else 1, dtype=DTYPE, generator=gen) + 0.4
    kernel = kernel_cls(ard_num_dims=d if ard else None).to(DTYPE)
    kernel.lengthscale = ls
    K = kernel(x1, x2).to_dense().detach()
    k = plain(radial, ls)
    for i in range(n1):
        for j in range(n2):
            rows, cols = slice(n1 + i * d, n1 + (i + 1) * d), slice(n2 + j * d, n2 + (j + 1) * d)
            if (i, j) == (1, 0):
                # Exact limits: value 1, no value-gradient coupling, K_gg = -2 phi'(0) / l^2.
                assert K[i, j] == 1.0
                assert (K[i, cols] == 0).all() and (K[rows, j] == 0).all()
                assert_close(K[rows, cols], torch.diag(limit / ls.expand(d) ** 2))
                continue
            assert_close(K[i, j], k(x1[i], x2[j]))
            assert_close(K[i, cols], jacrev(k, 1)(x1[i], x2[j]))
            assert_close(K[rows, j], jacrev(k, 0)(x1[i], x2[j]))
            assert_close(K[rows, cols], jacrev(jacrev(k, 0), 1)(x1[i], x2[j]), scale=10)


def test_matern52_equals_gpytorch_matern52_kernel_grad() -> None:
    gen = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(4, 3, dtype=DTYPE, generator=gen), torch.randn(5, 3, dtype=DTYPE, generator=gen)
    x2[0] = x1[1]
    ours = DerivativeMatern52Kernel(ard_num_dims=3, layout="interleaved").to(DTYPE)
    theirs = Matern52KernelGrad(ard_num_dims=3).to(DTYPE)
    ours.lengthscale = theirs.lengthscale = torch.tensor([0.7, 1.2, 2.0], dtype=DTYPE)
    assert_close(ours(x1, x2).to_dense(), theirs(x1, x2).to_dense())


@pytest.mark.parametrize(("kernel_cls", "radial", "profile", "limit"), FAMILIES)
def test_matern_psd_with_duplicates_and_finite_gradients(kernel_cls, radial, profile, limit) -> None:
    gen = torch.Generator().manual_seed(1)
    X = torch.rand(8, 3, dtype=DTYPE, generator=gen)
    X[5] = X[2]
    X[6] = X[2] + 1e-9
    kernel = kernel_cls(ard_num_dims=3).to(DTYPE)
    K = kernel(X).to_dense()
    assert_close(K, K.T)
    eig = torch.linalg.eigvalsh(K.detach())
    assert eig.min() > -1e-9 * eig.max()
    K.sum().backward()
    assert torch.isfinite(kernel.raw_lengthscale.grad).all()
    Xr = X.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(kernel(Xr, X[:3]).to_dense().sum(), Xr)
    assert torch.isfinite(gx).all()


@pytest.mark.parametrize("profile", [matern52_profile, matern32_profile])
def test_closed_form_lengthscale_gradient_for_matern(profile) -> None:
    gen = torch.Generator().manual_seed(2)
    x1, x2 = torch.randn(4, 3, dtype=DTYPE, generator=gen), torch.randn(5, 3, dtype=DTYPE, generator=gen)
    x2[0] = x1[1]
    ls = (torch.rand(1, 3, dtype=DTYPE, generator=gen) + 0.5).requires_grad_(True)
    K = stationary_derivative_blocks(x1, x2, ls, profile)
    G = torch.randn(K.shape, dtype=DTYPE, generator=gen)
    (ours,) = torch.autograd.grad((K * G).sum(), ls)
    (reference,) = torch.autograd.grad((_assemble(x1, x2, ls, profile, True, True) * G).sum(), ls)
    assert_close(ours, reference, scale=1e2)
    assert torch.autograd.gradcheck(
        lambda lengthscale: stationary_derivative_blocks(x1, x2, lengthscale, profile), (ls,)
    )


class TestDerivativeMatern52KernelGPyTorchCase(unittest.TestCase, BaseKernelTestCase):
    def create_kernel_no_ard(self, **kwargs):
        return DerivativeMatern52Kernel(layout="interleaved", **kwargs)

    def create_kernel_ard(self, num_dims, **kwargs):
        return DerivativeMatern52Kernel(layout="interleaved", ard_num_dims=num_dims, **kwargs)


class TestDerivativeMatern32KernelGPyTorchCase(unittest.TestCase, BaseKernelTestCase):
    def create_kernel_no_ard(self, **kwargs):
        return DerivativeMatern32Kernel(**kwargs)

    def create_kernel_ard(self, num_dims, **kwargs):
        return DerivativeMatern32Kernel(ard_num_dims=num_dims, **kwargs)


# ----------------------------------------------------------------------------------------------
# Composition
# ----------------------------------------------------------------------------------------------


def test_sum_of_derivative_kernels_is_the_derivative_kernel_of_the_sum() -> None:
    gen = torch.Generator().manual_seed(4)
    X = torch.rand(5, 2, dtype=DTYPE, generator=gen)
    rbf, m52 = DerivativeRBFKernel(ard_num_dims=2).to(DTYPE), DerivativeMatern52Kernel(ard_num_dims=2).to(DTYPE)
    rbf.lengthscale = torch.tensor([0.3, 0.5], dtype=DTYPE)
    m52.lengthscale = torch.tensor([0.8, 0.6], dtype=DTYPE)
    total = AdditiveKernel(ScaleKernel(rbf), m52).to(DTYPE)
    total.kernels[0].outputscale = torch.tensor(2.0, dtype=DTYPE)
    with gpytorch.settings.lazily_evaluate_kernels(False):
        K = total(X).to_dense().detach()
        values_only = total(X, grad2=False).to_dense().detach()
    assert_close(K, 2.0 * rbf(X).to_dense().detach() + m52(X).to_dense().detach())
    assert_close(values_only, K[:, :5])


def test_product_of_derivative_kernels_is_refused() -> None:
    with pytest.raises(TypeError, match="product of derivative kernels"):
        DerivativeRBFKernel() * DerivativeMatern52Kernel()
    product = gpytorch.kernels.ProductKernel(DerivativeRBFKernel(), DerivativeMatern52Kernel())
    X = torch.rand(4, 2, dtype=DTYPE)
    with pytest.raises(ValueError, match="product of derivative kernels"):
        DerivativeGP(X, X.sum(-1), kernel=product)


def test_plain_kernel_mixed_into_a_sum_is_refused() -> None:
    X = torch.rand(4, 2, dtype=DTYPE)
    with pytest.raises(TypeError, match="kernel: expected a derivative-aware kernel"):
        DerivativeGP(X, X.sum(-1), kernel=AdditiveKernel(DerivativeRBFKernel(), RBFKernel()))


@pytest.mark.parametrize("kernel_cls", [DerivativeMatern52Kernel, DerivativeMatern32Kernel])
def test_model_with_matern_and_sum_kernels_fits_and_predicts_gradients(kernel_cls) -> None:
    gen = torch.Generator().manual_seed(5)
    X = torch.rand(15, 2, dtype=DTYPE, generator=gen)

    def f(X: Tensor) -> Tensor:
        return torch.sin(3 * X[:, 0]) + X[:, 1] ** 2

    grad = torch.stack([3 * torch.cos(3 * X[:, 0]), 2 * X[:, 1]], -1)
    for kernel in (
        ScaleKernel(kernel_cls(ard_num_dims=2)),
        AdditiveKernel(ScaleKernel(kernel_cls(ard_num_dims=2)), ScaleKernel(DerivativeRBFKernel(ard_num_dims=2))),
    ):
        model = DerivativeGP(X, f(X), grad, kernel=kernel).fit(maxiter=50)
        Xs = torch.rand(20, 2, dtype=DTYPE, generator=gen) * 0.8 + 0.1
        Xs.requires_grad_(True)
        pred = model.predict(Xs)
        assert (pred.mean - f(Xs)).abs().max() < 0.05
        (autograd,) = torch.autograd.grad(pred.mean.sum(), Xs)
        assert_close(pred.grad_mean.detach(), autograd, scale=1e3)
