"""The matrix-free engine (inference="iterative") against the dense engine on small problems."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from gpytorch.kernels import ScaleKernel

from gpderiv import DerivativeGP
from gpderiv.inference import IterativeCG, RBFDerivativeLinearOperator
from gpderiv.kernels import DerivativeMatern52Kernel

DTYPE = torch.float64


def pair(n: int = 25, d: int = 3, seed: int = 0) -> tuple[DerivativeGP, DerivativeGP]:
    """The same well-conditioned model with the dense and the iterative engine."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(n, d, dtype=DTYPE, generator=gen)
    y, grad = torch.sin(3 * X).sum(-1), 3 * torch.cos(3 * X)
    dense = DerivativeGP(X, y, grad, noise=0.05, grad_noise=0.5)
    iterative = DerivativeGP(X, y, grad, noise=0.05, grad_noise=0.5, inference="iterative")
    for model in (dense, iterative):
        model.covar_module.base_kernel.lengthscale = torch.tensor([0.3, 0.4, 0.5], dtype=DTYPE)
    return dense, iterative


def test_operator_products_and_diagonal_match_the_dense_matrix() -> None:
    dense, iterative = pair()
    K = dense._train_covariance().detach()
    op = iterative._operator()
    R = torch.randn(K.shape[0], 3, dtype=DTYPE)
    torch.testing.assert_close(op.matmul(R).detach(), K @ R, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(op.diagonal().detach(), K.diagonal(), rtol=1e-12, atol=1e-12)
    assert isinstance(op, RBFDerivativeLinearOperator) and op.shape == K.shape


def test_predictions_match_the_dense_engine_to_the_cg_tolerance() -> None:
    dense, iterative = pair()
    Xs = torch.rand(6, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    p, q = dense.predict(Xs), iterative.predict(Xs)
    for name in ("mean", "grad_mean", "variance", "grad_variance"):
        torch.testing.assert_close(getattr(q, name), getattr(p, name), rtol=1e-4, atol=1e-5)
    fast = iterative.predict(Xs, variance=False)  # matrix-free mean
    torch.testing.assert_close(fast.mean, p.mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.grad_mean, p.grad_mean, rtol=1e-4, atol=1e-5)


def test_stochastic_marginal_likelihood_and_gradient_are_close_to_exact() -> None:
    dense, iterative = pair(n=20)
    iterative.engine = IterativeCG(num_trace_samples=400)
    torch.manual_seed(0)
    exact, estimate = dense._loss(), iterative._loss()
    assert abs(estimate.item() - exact.item()) < 0.02 * abs(exact.item()) + 0.02
    params_d = [p for p in dense.parameters() if p.requires_grad]
    params_i = [p for p in iterative.parameters() if p.requires_grad]
    grads_d = torch.autograd.grad(exact, params_d)
    grads_i = torch.autograd.grad(estimate, params_i)
    for a, b in zip(grads_i, grads_d, strict=True):
        assert (a - b).abs().max() < 0.1 * b.abs().max() + 0.02


def test_subset_fit_then_iterative_factorisation() -> None:
    dense, iterative = pair(n=30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CG iteration notices on ill-conditioned trial points
        iterative.fit(subset=15, seed=0, maxiter=15)
    assert math.isfinite(iterative.mll)
    assert torch.isfinite(iterative.predict(torch.rand(4, 3, dtype=DTYPE), variance=False).mean).all()


def test_iterative_scope_is_checked() -> None:
    X = torch.rand(6, 2, dtype=DTYPE)
    y, grad = X.sum(-1), torch.ones(6, 2, dtype=DTYPE)
    partial = grad.clone()
    partial[0, 0] = math.nan
    with pytest.raises(ValueError, match="every value and every partial derivative"):
        DerivativeGP(X, y, partial, inference="iterative")
    with pytest.raises(ValueError, match="default kernel"):
        DerivativeGP(X, y, grad, kernel=ScaleKernel(DerivativeMatern52Kernel()), inference="iterative")
