"""Property-based tests (hypothesis) of every derivative kernel, and of predictions on random well-posed problems.

For each kernel, over random sizes ``n1, n2 in 1..5``, ``d in 1..4``, ARD lengthscales in ``[0.1, 10]``
and random points that include an exact duplicate:

- ``K(X, X)`` is symmetric, positive semi-definite (``min eig >= -1e-8 * max diag``), finite, and its
  ``diag=True`` form equals its diagonal;
- every block of ``K(X1, X2)`` agrees with ``torch.func`` autograd of a plain reference kernel written
  here (without square roots where the family allows; the Matern references need ``sqrt``, so they are
  compared at non-coincident pairs only, where autograd of ``sqrt`` is finite), and the value block
  equals GPyTorch's own plain kernel (which validates the reference).

The last test draws small well-posed regression problems (smooth function, random NaN mask, noise on
or off) and checks that the fitted model never predicts NaN and never a negative variance.
See docs/reliability.md.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from gpytorch.kernels import Kernel, MaternKernel, PeriodicKernel, RBFKernel, RQKernel, ScaleKernel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.func import jacfwd, jacrev, vmap

from gpderiv import DerivativeGP
from gpderiv.kernels import (
    DerivativeKernel,
    DerivativeMatern32Kernel,
    DerivativeMatern52Kernel,
    DerivativeRBFKernel,
)

DTYPE = torch.float64
SQ3, SQ5 = math.sqrt(3.0), math.sqrt(5.0)
#: Fixed example budget and seed: the suite stays fast (2 CPU cores) and reproducible.
PROPERTY_SETTINGS = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

Reference = Callable[[Tensor, Tensor], Tensor]


# ----------------------------------------------------------------------------------------------
# Kernels under test and their plain references
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    """Hyperparameters drawn for one example (each list has ``d`` entries: ARD everywhere)."""

    lengthscale: list[float]
    lengthscale2: list[float]  # second factor of a product kernel (periodic lengthscale)
    period: list[float]
    alpha: float


def _t(values: list[float] | float) -> Tensor:
    return torch.as_tensor(values, dtype=DTYPE)


def _u(a: Tensor, b: Tensor, ls: Tensor) -> Tensor:
    """Squared scaled distance, no square root."""
    return ((a - b) / ls).square().sum()


def _rbf_ref(ls: Tensor) -> Reference:
    return lambda a, b: torch.exp(-0.5 * _u(a, b, ls))


def _matern_ref(ls: Tensor, nu: float) -> Reference:
    """Matern written with ``r = sqrt(u)``: autograd is NaN at coincident points (compared elsewhere only)."""

    def k(a: Tensor, b: Tensor) -> Tensor:
        r = torch.sqrt(_u(a, b, ls))
        if nu == 2.5:
            return (1 + SQ5 * r + 5 * r * r / 3) * torch.exp(-SQ5 * r)
        return (1 + SQ3 * r) * torch.exp(-SQ3 * r)

    return k


def _rq_ref(ls: Tensor, alpha: Tensor) -> Reference:
    return lambda a, b: (1 + _u(a, b, ls) / (2 * alpha)).pow(-alpha)


def _rbf_times_periodic_ref(ls: Tensor, ls_p: Tensor, period: Tensor) -> Reference:
    def k(a: Tensor, b: Tensor) -> Tensor:
        periodic = torch.exp(-2.0 * (torch.sin(math.pi * (a - b) / period).square() / ls_p).sum())
        return torch.exp(-0.5 * _u(a, b, ls)) * periodic

    return k


def _rbf_kernel(d: int, p: Params) -> tuple[Kernel, Reference, Kernel, bool]:
    kernel = DerivativeRBFKernel(ard_num_dims=d).to(DTYPE)
    kernel.lengthscale = _t(p.lengthscale)
    plain = RBFKernel(ard_num_dims=d).to(DTYPE)
    plain.lengthscale = _t(p.lengthscale)
    return kernel, _rbf_ref(_t(p.lengthscale)), plain, False


def _matern_kernel(cls: type, nu: float) -> Callable[[int, Params], tuple[Kernel, Reference, Kernel, bool]]:
    def make(d: int, p: Params) -> tuple[Kernel, Reference, Kernel, bool]:
        kernel = cls(ard_num_dims=d).to(DTYPE)
        kernel.lengthscale = _t(p.lengthscale)
        plain = MaternKernel(nu=nu, ard_num_dims=d).to(DTYPE)
        plain.lengthscale = _t(p.lengthscale)
        return kernel, _matern_ref(_t(p.lengthscale), nu), plain, True

    return make


def _autodiff_rbf(d: int, p: Params) -> tuple[Kernel, Reference, Kernel, bool]:
    base = RBFKernel(ard_num_dims=d).to(DTYPE)
    base.lengthscale = _t(p.lengthscale)
    return DerivativeKernel(base).to(DTYPE), _rbf_ref(_t(p.lengthscale)), base, False


def _autodiff_rq(d: int, p: Params) -> tuple[Kernel, Reference, Kernel, bool]:
    base = RQKernel(ard_num_dims=d).to(DTYPE)
    base.lengthscale = _t(p.lengthscale)
    base.alpha = _t(p.alpha)
    return DerivativeKernel(base).to(DTYPE), _rq_ref(_t(p.lengthscale), _t(p.alpha)), base, False


def _autodiff_rbf_times_periodic(d: int, p: Params) -> tuple[Kernel, Reference, Kernel, bool]:
    rbf = RBFKernel(ard_num_dims=d).to(DTYPE)
    periodic = PeriodicKernel(ard_num_dims=d).to(DTYPE)
    rbf.lengthscale = _t(p.lengthscale)
    periodic.lengthscale = _t(p.lengthscale2)
    periodic.period_length = _t(p.period)
    base = rbf * periodic
    reference = _rbf_times_periodic_ref(_t(p.lengthscale), _t(p.lengthscale2), _t(p.period))
    return DerivativeKernel(base).to(DTYPE), reference, base, False


KERNELS = {
    "DerivativeRBFKernel": _rbf_kernel,
    "DerivativeMatern52Kernel": _matern_kernel(DerivativeMatern52Kernel, 2.5),
    "DerivativeMatern32Kernel": _matern_kernel(DerivativeMatern32Kernel, 1.5),
    "DerivativeKernel(RBFKernel())": _autodiff_rbf,
    "DerivativeKernel(RQKernel())": _autodiff_rq,
    "DerivativeKernel(RBFKernel()*PeriodicKernel())": _autodiff_rbf_times_periodic,
}


# ----------------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------------

coordinates = st.floats(min_value=-2.0, max_value=2.0, allow_nan=False, allow_infinity=False)
positive = st.floats(min_value=0.1, max_value=10.0, allow_nan=False, allow_infinity=False)


def points(n: int, d: int) -> st.SearchStrategy[Tensor]:
    return st.lists(st.lists(coordinates, min_size=d, max_size=d), min_size=n, max_size=n).map(_t)


@st.composite
def problems(draw: st.DrawFn) -> tuple[int, Params, Tensor, Tensor]:
    """``(d, params, X1, X2)``: X1 holds an exact duplicate row, X2 a point of X1 (a coincident pair)."""
    d = draw(st.integers(1, 4))
    n1, n2 = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    params = Params(
        lengthscale=draw(st.lists(positive, min_size=d, max_size=d)),
        lengthscale2=draw(st.lists(positive, min_size=d, max_size=d)),
        period=draw(st.lists(st.floats(0.5, 5.0), min_size=d, max_size=d)),
        alpha=draw(positive),
    )
    X1 = draw(points(n1, d))
    X2 = draw(points(n2, d))
    X1 = torch.cat([X1, X1[-1:]])  # exact duplicate inside X1
    X2[0] = X1[0]  # coincident pair across X1, X2
    return d, params, X1, X2


# ----------------------------------------------------------------------------------------------
# Reference blocks by torch.func
# ----------------------------------------------------------------------------------------------


def reference_blocks(k: Reference, x1: Tensor, x2: Tensor) -> Tensor:
    """Block-layout joint covariance ``[[k, dk/dx2], [dk/dx1, d2k/dx1 dx2]]`` of the plain kernel ``k``."""
    (n1, d), n2 = x1.shape, x2.shape[0]
    a = x1.unsqueeze(1).expand(n1, n2, d).reshape(-1, d)
    b = x2.unsqueeze(0).expand(n1, n2, d).reshape(-1, d)
    value = vmap(k)(a, b).view(n1, n2)
    g1 = vmap(jacrev(k, 0))(a, b).view(n1, n2, d)  # dk / dx1_a
    g2 = vmap(jacrev(k, 1))(a, b).view(n1, n2, d)  # dk / dx2_b
    h = vmap(jacfwd(jacrev(k, 0), 1))(a, b).view(n1, n2, d, d)  # d2k / dx1_a dx2_b
    K = torch.empty(n1 * (1 + d), n2 * (1 + d), dtype=DTYPE)
    K[:n1, :n2] = value
    K[:n1, n2:] = g2.reshape(n1, n2 * d)
    K[n1:, :n2] = g1.permute(0, 2, 1).reshape(n1 * d, n2)
    K[n1:, n2:] = h.permute(0, 2, 1, 3).reshape(n1 * d, n2 * d)
    return K


def block_mask(pair_mask: Tensor, d: int) -> Tensor:
    """Expand an `n1 x n2` mask over point pairs to the block layout."""
    n1, n2 = pair_mask.shape
    rows = torch.cat([torch.arange(n1), torch.arange(n1).repeat_interleave(d)])
    cols = torch.cat([torch.arange(n2), torch.arange(n2).repeat_interleave(d)])
    return pair_mask[rows][:, cols]


def dense(kernel: Kernel, x1: Tensor, x2: Tensor | None = None, **kwargs) -> Tensor:
    with torch.no_grad():
        out = kernel(x1, x2, **kwargs)
        return (out.to_dense() if hasattr(out, "to_dense") else out).detach()


# ----------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(KERNELS))
@PROPERTY_SETTINGS
@given(problem=problems())
def test_symmetric_psd_and_finite(name, problem):
    d, params, X1, _ = problem
    kernel, _, _, _ = KERNELS[name](d, params)
    K = dense(kernel, X1)
    n = X1.shape[0]
    assert K.shape == (n * (1 + d), n * (1 + d))
    assert torch.isfinite(K).all()
    scale = K.diagonal().abs().max()
    torch.testing.assert_close(K, K.T, rtol=0.0, atol=1e-12 * float(scale))
    eigenvalues = torch.linalg.eigvalsh(0.5 * (K + K.T))
    assert eigenvalues.min() >= -1e-8 * scale, (eigenvalues.min().item(), scale.item())
    # diag=True gives the same numbers without building the matrix.
    torch.testing.assert_close(dense(kernel, X1, X1, diag=True), K.diagonal(), rtol=1e-10, atol=1e-12 * float(scale))


@pytest.mark.parametrize("name", list(KERNELS))
@PROPERTY_SETTINGS
@given(problem=problems())
def test_blocks_agree_with_autograd_of_the_plain_kernel(name, problem):
    d, params, X1, X2 = problem
    kernel, reference, plain, sqrt_based = KERNELS[name](d, params)
    K = dense(kernel, X1, X2)
    assert torch.isfinite(K).all()
    n1, n2 = X1.shape[0], X2.shape[0]
    # The reference's value is GPyTorch's own kernel (so the reference itself is right).
    torch.testing.assert_close(K[:n1, :n2], dense(plain, X1, X2), rtol=1e-7, atol=1e-12)
    expected = reference_blocks(reference, X1, X2)
    if sqrt_based:  # autograd of sqrt is NaN at r = 0 and inaccurate near it: compare elsewhere only
        ls = torch.tensor(params.lengthscale, dtype=DTYPE)
        r = torch.cdist(X1 / ls, X2 / ls)
        mask = block_mask(r > 1e-4, d)
    else:
        mask = torch.ones_like(K, dtype=torch.bool)
    assert torch.isfinite(expected[mask]).all()
    scale = max(1.0, float(expected[mask].abs().max())) if mask.any() else 1.0
    torch.testing.assert_close(K[mask], expected[mask], rtol=1e-6, atol=1e-9 * scale)


# ----------------------------------------------------------------------------------------------
# Predictions never contain NaN on well-posed problems
# ----------------------------------------------------------------------------------------------

FAMILIES = {"rbf": DerivativeRBFKernel, "matern52": DerivativeMatern52Kernel, "matern32": DerivativeMatern32Kernel}


def smooth_function(kind: str, d: int, gen: torch.Generator) -> Callable[[Tensor], Tensor]:
    """A smooth function of one `d` point, with random coefficients."""
    w = torch.randn(d, dtype=DTYPE, generator=gen) * 2
    c = torch.rand(d, dtype=DTYPE, generator=gen)
    A = torch.randn(d, d, dtype=DTYPE, generator=gen)
    if kind == "sine":
        return lambda x: torch.sin(x @ w + 1.0) + 0.5 * torch.cos(3 * x).sum()
    if kind == "quadratic":
        return lambda x: (x - c) @ (A @ A.T) @ (x - c) + x @ w
    return lambda x: torch.exp(-((x - c) / 0.4).square().sum()) * (1 + x @ w)  # bump


@pytest.mark.filterwarnings("ignore::gpderiv.exceptions.JitterWarning")
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 12),
    d=st.integers(1, 3),
    kind=st.sampled_from(["sine", "quadratic", "bump"]),
    family=st.sampled_from(list(FAMILIES)),
    with_grad=st.booleans(),
    observed_fraction=st.floats(0.1, 1.0),
    noise=st.sampled_from(["off", "noisy data", "known zero noise"]),
    log_scale=st.floats(-3.0, 3.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_predictions_never_nan_on_well_posed_problems(
    n, d, kind, family, with_grad, observed_fraction, noise, log_scale, seed
):
    gen = torch.Generator().manual_seed(seed)
    scale = 10.0**log_scale
    X = (torch.rand(n, d, dtype=DTYPE, generator=gen) - 0.3) * scale  # user units: any scale
    f = smooth_function(kind, d, gen)
    u = X / scale  # the function is smooth on the unit scale
    y = vmap(f)(u)
    grad = vmap(torch.func.grad(f))(u) / scale if with_grad else None
    if noise == "noisy data":
        y = y + 0.05 * torch.randn(n, dtype=DTYPE, generator=gen)
        if grad is not None:
            grad = grad + 0.05 / scale * torch.randn(n, d, dtype=DTYPE, generator=gen)
    y = torch.where(torch.rand(n, generator=gen, dtype=DTYPE) < observed_fraction, y, math.nan)
    if grad is not None:
        grad = torch.where(torch.rand(n, d, generator=gen, dtype=DTYPE) < observed_fraction, grad, math.nan)
    if torch.isnan(y).all() and (grad is None or torch.isnan(grad).all()):
        y[0] = f(u[0])  # at least one observation
    kwargs = {"noise": 0.0, "grad_noise": 0.0} if noise == "known zero noise" else {}
    kernel = ScaleKernel(FAMILIES[family](ard_num_dims=d))
    kernel.base_kernel.lengthscale = 0.3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # JitterWarning and fit notices are allowed
        model = DerivativeGP(X, y, grad, kernel=kernel, **kwargs).fit(maxiter=5)
        Xs = (torch.rand(7, d, dtype=DTYPE, generator=gen) * 1.6 - 0.6) * scale  # inside and outside the data
        Xs = torch.cat([Xs, X[:1]])  # and at a training point
        pred = model.predict(Xs)
    for field in ("mean", "variance", "grad_mean", "grad_variance"):
        value = getattr(pred, field)
        assert not torch.isnan(value).any(), (field, value)
        assert torch.isfinite(value).all(), (field, value)
    assert (pred.variance >= 0).all() and (pred.grad_variance >= 0).all()
    assert math.isfinite(model.mll)
