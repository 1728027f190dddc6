"""Tests of the derivative-aware kernels against autograd, GPyTorch and basic covariance properties.

Every block of ``[[K, K_fg], [K_gf, K_gg]]`` is compared with ``torch.func`` derivatives of the
plain squared-exponential kernel written out below, including the mixed (``a != b``) entries and
coincident / near-coincident points.  All tests run in float64 with explicit dtypes, except the
GPyTorch ``BaseKernelTestCase`` mixins, which check the kernel against the default dtype.
"""

from __future__ import annotations

import itertools
import unittest

import gpytorch
import pytest
import torch
from gpytorch.kernels import RBFKernelGrad, ScaleKernel
from gpytorch.test.base_kernel_test_case import BaseKernelTestCase
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.func import jacrev, vmap

from gpderiv.blocks import interleave_index, rbf_profile, stationary_derivative_blocks, stationary_derivative_diag
from gpderiv.kernels import DerivativeRBFKernel
from gpderiv.testing import assert_close

DTYPE = torch.float64
NO_BATCH = torch.Size([])


# ----------------------------------------------------------------------------------------------
# Reference: the plain kernel and its derivatives by autograd
# ----------------------------------------------------------------------------------------------


def plain_rbf(a: Tensor, b: Tensor, lengthscale: Tensor, outputscale: Tensor | float = 1.0) -> Tensor:
    """``s^2 exp(-1/2 sum_a (a_a - b_a)^2 / l_a^2)`` for single points ``a``, ``b`` (`d`)."""
    return outputscale * torch.exp(-0.5 * ((a - b) ** 2 / lengthscale**2).sum())


def sqrt_rbf(a: Tensor, b: Tensor, lengthscale: Tensor) -> Tensor:
    """The same kernel written through ``r = sqrt(u)``: its autograd derivatives are NaN at ``r = 0``."""
    r = torch.sqrt(((a - b) ** 2 / lengthscale**2).sum())
    return torch.exp(-0.5 * r**2)


def autograd_blocks(
    x1: Tensor, x2: Tensor, lengthscale: Tensor, outputscale: Tensor | float = 1.0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``K``, ``K_fg``, ``K_gf``, ``K_gg`` (block layout) from ``torch.func`` of :func:`plain_rbf`.

    ``lengthscale`` is a `d` (ARD) or `1` tensor; ``x1``, ``x2`` are `n1 x d`, `n2 x d`.
    """
    n1, d = x1.shape
    n2 = x2.shape[0]

    def k(a: Tensor, b: Tensor) -> Tensor:
        return plain_rbf(a, b, lengthscale, outputscale)

    def pairwise(fn):  # fn(a, b) -> result; gives n1 x n2 x ...
        return vmap(vmap(fn, in_dims=(None, 0)), in_dims=(0, None))(x1, x2)

    kk = pairwise(k)  # n1 x n2
    g2 = pairwise(jacrev(k, argnums=1))  # n1 x n2 x d: dk/db
    g1 = pairwise(jacrev(k, argnums=0))  # n1 x n2 x d: dk/da
    h = pairwise(jacrev(jacrev(k, argnums=0), argnums=1))  # n1 x n2 x d(a) x d(b)
    k_fg = g2.reshape(n1, n2 * d)  # [i, j*d + b]
    k_gf = g1.permute(0, 2, 1).reshape(n1 * d, n2)  # [i*d + a, j]
    k_gg = h.permute(0, 2, 1, 3).reshape(n1 * d, n2 * d)  # [i*d + a, j*d + b]
    return kk, k_fg, k_gf, k_gg


def autograd_full(x1: Tensor, x2: Tensor, lengthscale: Tensor, outputscale: Tensor | float = 1.0) -> Tensor:
    """The full block-layout matrix by autograd."""
    kk, k_fg, k_gf, k_gg = autograd_blocks(x1, x2, lengthscale, outputscale)
    return torch.cat([torch.cat([kk, k_fg], dim=-1), torch.cat([k_gf, k_gg], dim=-1)], dim=-2)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def make_kernel(
    d: int, lengthscale: Tensor, *, ard: bool = True, layout: str = "block", batch_shape: torch.Size = NO_BATCH
) -> DerivativeRBFKernel:
    """A float64 kernel with the given lengthscale (`batch x 1 x d` / `batch x 1 x 1` or broadcastable)."""
    kernel = DerivativeRBFKernel(layout=layout, ard_num_dims=d if ard else None, batch_shape=batch_shape).to(DTYPE)
    kernel.lengthscale = lengthscale
    return kernel


def dense(kernel: gpytorch.kernels.Kernel, x1: Tensor, x2: Tensor | None = None, **kwargs) -> Tensor:
    return kernel(x1, x2, **kwargs).to_dense()


def points_with_duplicates(n1: int, n2: int, d: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``x1`` (`n1 x d`) and ``x2`` (`n2 x d`) where ``x2`` holds exact copies of some ``x1`` rows and
    points 1e-9 away from others."""
    x1 = torch.randn(n1, d, generator=gen, dtype=DTYPE)
    x2 = torch.randn(n2, d, generator=gen, dtype=DTYPE)
    x2[0] = x1[0]  # coincident
    if n2 > 1:
        x2[1] = x1[-1] + 1e-9 * torch.randn(d, generator=gen, dtype=DTYPE)  # near-coincident
    if n2 > 2 and n1 > 1:
        x2[2] = x1[1]  # coincident
    if n2 > 3:
        x2[3] = x1[0] + 1e-9  # near-coincident in every coordinate
    return x1, x2


def random_lengthscale(d: int, ard: bool, gen: torch.Generator) -> Tensor:
    """`1 x d` (ARD) or `1 x 1` lengthscale in [0.3, 2.3)."""
    return 0.3 + 2.0 * torch.rand(1, d if ard else 1, generator=gen, dtype=DTYPE)


def split_blocks(full: Tensor, n1: int, n2: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return full[..., :n1, :n2], full[..., :n1, n2:], full[..., n1:, :n2], full[..., n1:, n2:]


def assert_psd(matrix: Tensor, rel: float = 1e-10) -> None:
    eig = torch.linalg.eigvalsh(matrix)
    assert eig.min() >= -rel * eig.max().abs(), f"min eigenvalue {eig.min().item()} vs max {eig.max().item()}"


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


SHAPES = [(1, 1, 1), (3, 4, 1), (4, 4, 2), (5, 3, 3), (2, 6, 4), (4, 5, 5), (3, 4, 6)]


# ----------------------------------------------------------------------------------------------
# 1. Every block against autograd
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ard", [True, False], ids=["ard", "iso"])
@pytest.mark.parametrize("n1,n2,d", SHAPES)
def test_blocks_match_autograd(n1: int, n2: int, d: int, ard: bool, gen: torch.Generator) -> None:
    x1, x2 = points_with_duplicates(n1, n2, d, gen)
    ls = random_lengthscale(d, ard, gen)
    kernel = make_kernel(d, ls, ard=ard)
    full = dense(kernel, x1, x2)
    assert full.shape == (n1 * (d + 1), n2 * (d + 1))
    assert torch.isfinite(full).all()

    ref = autograd_blocks(x1, x2, ls.reshape(-1))
    names = ("K", "K_fg", "K_gf", "K_gg")
    for name, got, expected in zip(names, split_blocks(full, n1, n2), ref, strict=True):
        assert_close(got, expected, msg=f"block {name} differs from autograd")


@pytest.mark.parametrize("n1,n2,d", [(3, 4, 1), (4, 5, 3), (3, 4, 6)])
def test_pure_block_function_matches_autograd(n1: int, n2: int, d: int, gen: torch.Generator) -> None:
    """The tensor-level function (no GPyTorch) with `1 x d` and `1 x 1` lengthscales."""
    x1, x2 = points_with_duplicates(n1, n2, d, gen)
    for ard in (True, False):
        ls = random_lengthscale(d, ard, gen)
        got = stationary_derivative_blocks(x1, x2, ls, rbf_profile)
        assert_close(got, autograd_full(x1, x2, ls.reshape(-1)))


def test_mixed_terms_at_known_point() -> None:
    """Hand-checked values of the DESIGN.md signs, mixed term included (r = x1 - x2)."""
    x1 = torch.tensor([[0.3, -0.2]], dtype=DTYPE)
    x2 = torch.tensor([[-0.1, 0.4]], dtype=DTYPE)
    ls = torch.tensor([[0.7, 1.3]], dtype=DTYPE)
    r = (x1 - x2)[0]
    l2 = ls[0] ** 2
    k = torch.exp(-0.5 * (r**2 / l2).sum())
    full = dense(make_kernel(2, ls), x1, x2)
    assert_close(full[0, 1:], k * r / l2)  # dk/dx2_b = +k r_b / l_b^2
    assert_close(full[1:, 0], -k * r / l2)  # dk/dx1_a = -k r_a / l_a^2
    expected_gg = k * (torch.diag(1 / l2) - torch.outer(r / l2, r / l2))
    assert_close(full[1:, 1:], expected_gg)
    assert expected_gg[0, 1].abs() > 1e-3  # the mixed term is not trivially zero here


def test_coincident_points_closed_form() -> None:
    """At x1 == x2: K = 1, K_fg = K_gf = 0, K_gg = diag(1 / l^2)."""
    x = torch.tensor([[0.5, -1.0, 2.0]], dtype=DTYPE)
    ls = torch.tensor([[0.5, 1.0, 2.0]], dtype=DTYPE)
    full = dense(make_kernel(3, ls), x, x.clone())
    expected = torch.zeros(4, 4, dtype=DTYPE)
    expected[0, 0] = 1.0
    expected[1:, 1:] = torch.diag(1 / ls[0] ** 2)
    assert_close(full, expected)


def test_sqrt_based_autograd_is_nan_at_coincident_points() -> None:
    """Why the closed forms avoid r = sqrt(u): autograd through sqrt gives NaN at r = 0."""
    a = torch.tensor([0.2, -0.4], dtype=DTYPE)
    ls = torch.tensor([0.8, 1.5], dtype=DTYPE)
    grad_sqrt = jacrev(sqrt_rbf, argnums=1)(a, a.clone(), ls)
    assert torch.isnan(grad_sqrt).all()
    hess_sqrt = jacrev(jacrev(sqrt_rbf, argnums=0), argnums=1)(a, a.clone(), ls)
    assert torch.isnan(hess_sqrt).any()

    ours = dense(make_kernel(2, ls.unsqueeze(0)), a.unsqueeze(0), a.unsqueeze(0).clone())
    assert torch.isfinite(ours).all()
    assert_close(ours[0, 1:], torch.zeros(2, dtype=DTYPE))
    assert_close(ours[1:, 1:], torch.diag(1 / ls**2))


def test_outputscale_via_scale_kernel(gen: torch.Generator) -> None:
    d = 3
    x1, x2 = points_with_duplicates(4, 5, d, gen)
    ls = random_lengthscale(d, True, gen)
    kernel = ScaleKernel(make_kernel(d, ls)).to(DTYPE)
    kernel.outputscale = torch.tensor(2.7, dtype=DTYPE)  # a Python float would pass through float32
    assert_close(dense(kernel, x1, x2), autograd_full(x1, x2, ls.reshape(-1), kernel.outputscale.detach()))


# ----------------------------------------------------------------------------------------------
# 2. Batches
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["block", "interleaved"])
@pytest.mark.parametrize("ard", [True, False], ids=["ard", "iso"])
def test_batched_kernel_matches_unbatched(layout: str, ard: bool, gen: torch.Generator) -> None:
    d, n1, n2 = 3, 4, 5
    ls = 0.3 + 2.0 * torch.rand(2, 1, d if ard else 1, generator=gen, dtype=DTYPE)
    kernel = make_kernel(d, ls, ard=ard, layout=layout, batch_shape=torch.Size([2]))
    x1 = torch.randn(2, n1, d, generator=gen, dtype=DTYPE)
    x2 = torch.randn(2, n2, d, generator=gen, dtype=DTYPE)
    x2[:, 0] = x1[:, 0]
    batched = dense(kernel, x1, x2)
    assert batched.shape == (2, n1 * (d + 1), n2 * (d + 1))
    for b in range(2):
        single = make_kernel(d, ls[b], ard=ard, layout=layout)
        assert_close(batched[b], dense(single, x1[b], x2[b]))
    # and against autograd, in block layout
    if layout == "block":
        for b in range(2):
            assert_close(batched[b], autograd_full(x1[b], x2[b], ls[b].reshape(-1)))


def test_x_batch_without_kernel_batch(gen: torch.Generator) -> None:
    d = 2
    ls = random_lengthscale(d, True, gen)
    kernel = make_kernel(d, ls)
    x1 = torch.randn(3, 4, d, generator=gen, dtype=DTYPE)
    x2 = torch.randn(3, 5, d, generator=gen, dtype=DTYPE)
    batched = dense(kernel, x1, x2)
    for b in range(3):
        assert_close(batched[b], dense(kernel, x1[b], x2[b]))


def test_x_batch_broadcasting(gen: torch.Generator) -> None:
    """x1 `2 x 1 x n1 x d` against x2 `3 x n2 x d` broadcasts to a `2 x 3` batch."""
    d, n1, n2 = 2, 3, 4
    ls = random_lengthscale(d, True, gen)
    kernel = make_kernel(d, ls)
    x1 = torch.randn(2, 1, n1, d, generator=gen, dtype=DTYPE)
    x2 = torch.randn(3, n2, d, generator=gen, dtype=DTYPE)
    out = dense(kernel, x1, x2)
    assert out.shape == (2, 3, n1 * (d + 1), n2 * (d + 1))
    for i, j in itertools.product(range(2), range(3)):
        assert_close(out[i, j], autograd_full(x1[i, 0], x2[j], ls.reshape(-1)))


# ----------------------------------------------------------------------------------------------
# 3. Symmetry and positive semi-definiteness
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["block", "interleaved"])
@pytest.mark.parametrize("d", [1, 2, 3, 4])
def test_symmetric_psd_with_duplicates(d: int, layout: str, gen: torch.Generator) -> None:
    x = torch.randn(7, d, generator=gen, dtype=DTYPE)
    x = torch.cat([x, x[:2], x[3:4] + 1e-9])  # exact and near duplicates
    for ard in (True, False):
        kernel = make_kernel(d, random_lengthscale(d, ard, gen), ard=ard, layout=layout)
        mat = dense(kernel, x)
        assert_close(mat, mat.mT)
        assert_psd(mat)


# ----------------------------------------------------------------------------------------------
# 4. diag
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["block", "interleaved"])
@pytest.mark.parametrize("ard", [True, False], ids=["ard", "iso"])
def test_diag_matches_full(layout: str, ard: bool, gen: torch.Generator) -> None:
    d, n = 3, 5
    kernel = make_kernel(d, random_lengthscale(d, ard, gen), ard=ard, layout=layout)
    x1 = torch.randn(n, d, generator=gen, dtype=DTYPE)
    x2 = torch.randn(n, d, generator=gen, dtype=DTYPE)
    x2[1] = x1[1]
    for a, b in [(x1, x1), (x1, x2)]:
        diag = kernel(a, b, diag=True)
        assert diag.shape == (n * (d + 1),)
        assert_close(diag, dense(kernel, a, b).diagonal(dim1=-2, dim2=-1))
    # batched diag
    xb = torch.randn(2, n, d, generator=gen, dtype=DTYPE)
    assert_close(kernel(xb, diag=True), dense(kernel, xb).diagonal(dim1=-2, dim2=-1))


def test_diag_function_matches_blocks(gen: torch.Generator) -> None:
    d, n = 4, 3
    x1 = torch.randn(n, d, generator=gen, dtype=DTYPE)
    x2 = torch.randn(n, d, generator=gen, dtype=DTYPE)
    ls = random_lengthscale(d, True, gen)
    diag = stationary_derivative_diag(x1, x2, ls, rbf_profile)
    assert_close(diag, stationary_derivative_blocks(x1, x2, ls, rbf_profile).diagonal())


def test_diag_with_scale_kernel(gen: torch.Generator) -> None:
    d, n = 2, 4
    kernel = ScaleKernel(make_kernel(d, random_lengthscale(d, True, gen), layout="interleaved")).to(DTYPE)
    kernel.outputscale = torch.tensor(0.6, dtype=DTYPE)
    x = torch.randn(n, d, generator=gen, dtype=DTYPE)
    assert_close(kernel(x, diag=True), dense(kernel, x).diagonal())


# ----------------------------------------------------------------------------------------------
# 5. Agreement with GPyTorch's RBFKernelGrad
# ----------------------------------------------------------------------------------------------


def _rbf_grad(d: int, ls: Tensor, ard: bool, batch_shape: torch.Size = NO_BATCH) -> RBFKernelGrad:
    ref = RBFKernelGrad(ard_num_dims=d if ard else None, batch_shape=batch_shape).to(DTYPE)
    ref.lengthscale = ls
    return ref


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scale_kernel"])
@pytest.mark.parametrize("ard", [True, False], ids=["ard", "iso"])
@pytest.mark.parametrize("n1,n2,d", [(3, 4, 1), (4, 3, 2), (5, 5, 3)])
def test_matches_gpytorch_rbf_kernel_grad(n1: int, n2: int, d: int, ard: bool, scaled: bool, gen) -> None:
    x1, x2 = points_with_duplicates(n1, n2, d, gen)
    ls = random_lengthscale(d, ard, gen)
    ref, inter, block = (
        _rbf_grad(d, ls, ard),
        make_kernel(d, ls, ard=ard, layout="interleaved"),
        make_kernel(d, ls, ard=ard),
    )
    if scaled:
        ref, inter, block = (ScaleKernel(k).to(DTYPE) for k in (ref, inter, block))
        for k in (ref, inter, block):
            k.outputscale = torch.tensor(1.7, dtype=DTYPE)
    expected = dense(ref, x1, x2)
    assert_close(dense(inter, x1, x2), expected)
    got_block = dense(block, x1, x2)
    assert_close(got_block[interleave_index(n1, d)][:, interleave_index(n2, d)], expected)
    # diagonal, square case
    assert_close(inter(x1, diag=True), ref(x1, diag=True))
    assert_close(block(x1, diag=True)[interleave_index(n1, d)], ref(x1, diag=True))


@pytest.mark.parametrize("ard", [True, False], ids=["ard", "iso"])
def test_matches_gpytorch_rbf_kernel_grad_batched(ard: bool, gen: torch.Generator) -> None:
    d, n1, n2 = 2, 3, 4
    batch = torch.Size([2])
    ls = 0.3 + 2.0 * torch.rand(2, 1, d if ard else 1, generator=gen, dtype=DTYPE)
    ref = ScaleKernel(_rbf_grad(d, ls, ard, batch), batch_shape=batch).to(DTYPE)
    inter = ScaleKernel(make_kernel(d, ls, ard=ard, layout="interleaved", batch_shape=batch), batch_shape=batch)
    block = ScaleKernel(make_kernel(d, ls, ard=ard, batch_shape=batch), batch_shape=batch)
    outputscale = torch.tensor([0.5, 2.0], dtype=DTYPE)
    for k in (ref, inter, block):
        k.to(DTYPE)
        k.outputscale = outputscale
    x1 = torch.randn(2, n1, d, generator=gen, dtype=DTYPE)
    x2 = torch.randn(2, n2, d, generator=gen, dtype=DTYPE)
    expected = dense(ref, x1, x2)
    assert_close(dense(inter, x1, x2), expected)
    assert_close(dense(block, x1, x2)[..., interleave_index(n1, d), :][..., interleave_index(n2, d)], expected)


def test_interleave_index() -> None:
    idx = interleave_index(2, 3)
    assert idx.tolist() == [0, 2, 3, 4, 1, 5, 6, 7]
    assert sorted(interleave_index(5, 4).tolist()) == list(range(25))


# ----------------------------------------------------------------------------------------------
# 6. Gradients with respect to hyperparameters and inputs at duplicate points
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ard", [True, False], ids=["ard", "iso"])
def test_hyperparameter_gradient_finite_and_correct_with_duplicates(ard: bool, gen: torch.Generator) -> None:
    d = 3
    x = torch.randn(5, d, generator=gen, dtype=DTYPE)
    x = torch.cat([x, x[:2], x[4:5] + 1e-9])
    kernel = make_kernel(d, random_lengthscale(d, ard, gen), ard=ard)
    mat = dense(kernel, x)
    weights = torch.randn(mat.shape, generator=gen, dtype=DTYPE)
    (mat * weights).sum().backward()
    grad = kernel.raw_lengthscale.grad
    assert grad is not None and torch.isfinite(grad).all()

    # the same gradient by autograd through the reference blocks
    raw = kernel.raw_lengthscale.detach().clone().requires_grad_(True)
    ls = kernel.raw_lengthscale_constraint.transform(raw)
    (autograd_full(x, x, ls.reshape(-1)) * weights).sum().backward()
    assert_close(grad, raw.grad)


def test_input_gradient_finite_at_coincident_points(gen: torch.Generator) -> None:
    d = 2
    kernel = make_kernel(d, random_lengthscale(d, True, gen))
    base = torch.randn(4, d, generator=gen, dtype=DTYPE)
    base = torch.cat([base, base[:2]])
    x1 = base.clone().requires_grad_(True)
    x2 = base.clone().requires_grad_(True)
    mat = dense(kernel, x1, x2)
    weights = torch.randn(mat.shape, generator=gen, dtype=DTYPE)
    (mat * weights).sum().backward()
    assert torch.isfinite(x1.grad).all() and torch.isfinite(x2.grad).all()

    r1 = base.clone().requires_grad_(True)
    r2 = base.clone().requires_grad_(True)
    ls = kernel.lengthscale.detach().reshape(-1)
    (autograd_full(r1, r2, ls) * weights).sum().backward()
    assert_close(x1.grad, r1.grad)
    assert_close(x2.grad, r2.grad)

    # K(X, X) with X passed once: both arguments share the graph
    x = base.clone().requires_grad_(True)
    (dense(kernel, x) * weights).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert_close(x.grad, r1.grad + r2.grad)


# ----------------------------------------------------------------------------------------------
# 7. grad1 / grad2
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["block", "interleaved"])
def test_grad_flags_give_sub_blocks(layout: str, gen: torch.Generator) -> None:
    d, n1, n2 = 3, 4, 5
    x1, x2 = points_with_duplicates(n1, n2, d, gen)
    kernel = make_kernel(d, random_lengthscale(d, True, gen), layout=layout)
    full = kernel.forward(x1, x2)
    if layout == "interleaved":  # value rows / columns are every (d+1)-th
        rows_f = torch.arange(n1) * (d + 1)
        cols_f = torch.arange(n2) * (d + 1)
    else:
        rows_f, cols_f = torch.arange(n1), torch.arange(n2)
    assert_close(kernel.forward(x1, x2, grad1=False), full[rows_f])
    assert_close(kernel.forward(x1, x2, grad2=False), full[:, cols_f])
    assert_close(kernel.forward(x1, x2, grad1=False, grad2=False), full[rows_f][:, cols_f])


def test_grad_flags_pure_function(gen: torch.Generator) -> None:
    d, n1, n2 = 2, 3, 4
    x1, x2 = points_with_duplicates(n1, n2, d, gen)
    ls = random_lengthscale(d, True, gen)
    full = stationary_derivative_blocks(x1, x2, ls, rbf_profile)
    k, k_fg, k_gf, _ = split_blocks(full, n1, n2)
    assert_close(stationary_derivative_blocks(x1, x2, ls, rbf_profile, grad1=False), full[:n1])
    assert_close(stationary_derivative_blocks(x1, x2, ls, rbf_profile, grad2=False), full[:, :n2])
    assert_close(stationary_derivative_blocks(x1, x2, ls, rbf_profile, grad1=False, grad2=False), k)
    # batched
    xb = torch.randn(2, n1, d, generator=gen, dtype=DTYPE)
    fullb = stationary_derivative_blocks(xb, x2, ls, rbf_profile)
    assert_close(stationary_derivative_blocks(xb, x2, ls, rbf_profile, grad2=False), fullb[..., :n2])


def test_grad_flags_through_kernel_call(gen: torch.Generator) -> None:
    d, n1, n2 = 3, 4, 5
    x1, x2 = points_with_duplicates(n1, n2, d, gen)
    kernel = make_kernel(d, random_lengthscale(d, True, gen))
    out = kernel(x1, x2, grad1=False)
    assert out.shape == (n1, n2 * (d + 1))
    assert_close(out.to_dense(), kernel.forward(x1, x2)[:n1])
    # Through a wrapper the flags reach forward() when kernels are evaluated eagerly.
    scaled = ScaleKernel(kernel).to(DTYPE)
    with gpytorch.settings.lazily_evaluate_kernels(False):
        out = scaled(x1, x2, grad2=False).to_dense()
    assert_close(out, scaled.outputscale * kernel.forward(x1, x2)[..., :n2])


# ----------------------------------------------------------------------------------------------
# 9. Errors
# ----------------------------------------------------------------------------------------------


def test_invalid_layout_raises() -> None:
    with pytest.raises(ValueError, match="layout"):
        DerivativeRBFKernel(layout="kronecker")


@pytest.mark.filterwarnings("ignore:The last_dim_is_batch argument is deprecated:DeprecationWarning")
def test_last_dim_is_batch_raises() -> None:
    kernel = DerivativeRBFKernel().to(DTYPE)
    x = torch.randn(3, 2, dtype=DTYPE)
    with pytest.raises(ValueError, match="last_dim_is_batch"):
        kernel.forward(x, x, last_dim_is_batch=True)
    with pytest.raises(ValueError, match="last_dim_is_batch"):
        kernel(x, x, last_dim_is_batch=True).to_dense()


def test_diag_with_different_number_of_points_raises() -> None:
    kernel = DerivativeRBFKernel().to(DTYPE)
    x1 = torch.randn(3, 2, dtype=DTYPE)
    x2 = torch.randn(4, 2, dtype=DTYPE)
    with pytest.raises(ValueError, match="same number of points"):
        kernel(x1, x2, diag=True)
    with pytest.raises(ValueError):
        kernel.forward(x1, x2, diag=True)


# ----------------------------------------------------------------------------------------------
# 10. Property test
# ----------------------------------------------------------------------------------------------


@st.composite
def kernel_inputs(draw):
    n1 = draw(st.integers(1, 4))
    n2 = draw(st.integers(1, 4))
    d = draw(st.integers(1, 4))
    ard = draw(st.booleans())
    coord = st.floats(-3.0, 3.0, allow_nan=False, allow_infinity=False)
    ls = draw(st.lists(st.floats(0.1, 10.0), min_size=d if ard else 1, max_size=d if ard else 1))
    x1 = draw(st.lists(st.lists(coord, min_size=d, max_size=d), min_size=n1, max_size=n1))
    x2 = draw(st.lists(st.lists(coord, min_size=d, max_size=d), min_size=n2, max_size=n2))
    if draw(st.booleans()):  # a coincident pair
        x2[draw(st.integers(0, n2 - 1))] = list(x1[draw(st.integers(0, n1 - 1))])
    t = lambda v: torch.tensor(v, dtype=DTYPE)  # noqa: E731
    return t(x1), t(x2), t(ls).unsqueeze(0), ard


@settings(max_examples=25, deadline=None)
@given(kernel_inputs())
def test_property_symmetric_psd_and_autograd(inputs) -> None:
    x1, x2, ls, ard = inputs
    d = x1.shape[-1]
    kernel = make_kernel(d, ls, ard=ard)
    lmin = ls.min().item()
    scale = max(1.0, 1.0 / lmin**2)  # K_gg entries grow like 1 / l^2
    full = dense(kernel, x1, x2)
    assert torch.isfinite(full).all()
    assert_close(full, autograd_full(x1, x2, ls.reshape(-1)), scale=scale)
    x = torch.cat([x1, x2])
    sym = dense(kernel, x)
    assert_close(sym, sym.mT, scale=scale)
    assert_psd(sym)


# ----------------------------------------------------------------------------------------------
# 8. GPyTorch's kernel test mixin (default dtype, float32)
# ----------------------------------------------------------------------------------------------


class TestDerivativeRBFKernelInterleaved(BaseKernelTestCase, unittest.TestCase):
    """GPyTorch's mixin compares the kernel dtype with the default dtype: pin float32 here, restored after."""

    layout = "interleaved"
    seed = 0

    def setUp(self) -> None:
        self._default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        super().setUp()

    def tearDown(self) -> None:
        super().tearDown()
        torch.set_default_dtype(self._default_dtype)

    def create_kernel_no_ard(self, **kwargs):
        return DerivativeRBFKernel(layout=self.layout, **kwargs)

    def create_kernel_ard(self, num_dims, **kwargs):
        return DerivativeRBFKernel(layout=self.layout, ard_num_dims=num_dims, **kwargs)


class TestDerivativeRBFKernelBlock(TestDerivativeRBFKernelInterleaved):
    layout = "block"


# ----------------------------------------------------------------------------------------------
# Closed-form lengthscale gradient of the assembly (the training path)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ls_shape", "x_batch"),
    [((1, 3), ()), ((1, 1), ()), ((2, 1, 3), (2,)), ((1, 3), (2,)), ((2, 1, 1), ())],
)
def test_closed_form_lengthscale_vjp_matches_autograd(ls_shape: tuple, x_batch: tuple) -> None:
    from gpderiv.blocks.stationary import _assemble

    gen = torch.Generator().manual_seed(11)
    x1 = torch.randn(*x_batch, 4, 3, dtype=DTYPE, generator=gen)
    x2 = torch.randn(*x_batch, 5, 3, dtype=DTYPE, generator=gen)
    x2[..., 0, :] = x1[..., 1, :]  # a coincident pair
    x2[..., 1, :] = x1[..., 2, :] + 1e-9
    ls = (torch.rand(*ls_shape, dtype=DTYPE, generator=gen) + 0.3).requires_grad_(True)
    K = stationary_derivative_blocks(x1, x2, ls, rbf_profile)
    assert K.grad_fn is not None and "LengthscaleVJP" in type(K.grad_fn).__name__
    G = torch.randn(K.shape, dtype=DTYPE, generator=gen)
    (ours,) = torch.autograd.grad((K * G).sum(), ls)
    (reference,) = torch.autograd.grad((_assemble(x1, x2, ls, rbf_profile, True, True) * G).sum(), ls)
    assert_close(ours, reference, scale=1e2)
    assert torch.autograd.gradcheck(
        lambda lengthscale: stationary_derivative_blocks(x1, x2, lengthscale, rbf_profile), (ls,)
    )


# ----------------------------------------------------------------------------------------------
# Drop-in replacement in GPyTorch's own derivative-GP recipe
# ----------------------------------------------------------------------------------------------


class _GPyTorchGradModel(gpytorch.models.ExactGP):
    """The model of GPyTorch's "GP regression with derivative information" tutorials."""

    def __init__(self, X: Tensor, Y: Tensor, likelihood, base_kernel) -> None:
        super().__init__(X, Y, likelihood)
        self.mean_module = gpytorch.means.ConstantMeanGrad()
        self.covar_module = ScaleKernel(base_kernel)

    def forward(self, x: Tensor):
        return gpytorch.distributions.MultitaskMultivariateNormal(self.mean_module(x), self.covar_module(x))


def test_drop_in_for_rbf_kernel_grad_in_gpytorch_model() -> None:
    gen = torch.Generator().manual_seed(3)
    X = torch.rand(15, 2, dtype=DTYPE, generator=gen)
    Y = torch.randn(15, 3, dtype=DTYPE, generator=gen)
    results = []
    for base in (RBFKernelGrad(ard_num_dims=2), DerivativeRBFKernel(ard_num_dims=2, layout="interleaved")):
        torch.manual_seed(0)
        likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=3)
        model = _GPyTorchGradModel(X, Y, likelihood, base).to(DTYPE)
        model.covar_module.base_kernel.lengthscale = torch.tensor([0.3, 0.5], dtype=DTYPE)
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
        with gpytorch.settings.max_cholesky_size(10**6):
            loss = -mll(model(X), Y)
            loss.backward()
            model.eval()
            pred = likelihood(model(X[:4] + 0.01))
        results.append((loss.detach(), model.covar_module.base_kernel.raw_lengthscale.grad, pred.mean.detach()))
    for a, b in zip(*results, strict=True):
        assert_close(a, b, scale=1e4)
