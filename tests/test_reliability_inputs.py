"""Reliability catalogue, round 2: hyperparameter bounds and initial values, inputs with autograd graphs.

Cases 113-120 of docs/reliability.md, through :class:`gpderiv.DerivativeGP`:

* learned noises start inside their bounds (``noise_lower_bound`` above the default initial
  noise made it NaN, and the resulting Cholesky error advised a *larger* bound);
* a kernel hyperparameter that is zero, NaN or on its constraint's bound is refused naming it;
* training data that carries an autograd graph is detached (fitting backpropagates once per loss
  evaluation); ``predict`` stays differentiable in ``Xs``.

The BoTorch model's counterparts are cases 111 and 112 (tests/test_reliability_botorch.py).
Fits are a few iterations only.
"""

from __future__ import annotations

import math

import pytest
import torch
from gpytorch.kernels import PeriodicKernel, RBFKernel, ScaleKernel
from torch import Tensor

from gpderiv import DerivativeGP
from gpderiv.kernels import DerivativeKernel, DerivativeRBFKernel
from gpderiv.likelihoods import DerivativeGaussianNoise

DTYPE = torch.float64
MAXITER = 5


def data(n: int = 6, d: int = 2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``X`` in the unit box, ``y = sum sin(X)`` and its gradient ``cos(X)``."""
    X = torch.rand(n, d, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    return X, torch.sin(X).sum(-1), torch.cos(X)


def assert_finite_fit(model: DerivativeGP, Xs: Tensor) -> None:
    """A finite mll and finite predictions with non-negative variances."""
    assert math.isfinite(model.mll)
    pred = model.predict(Xs)
    for t in (pred.mean, pred.variance, pred.grad_mean, pred.grad_variance):
        assert torch.isfinite(t).all()
    assert (pred.variance >= 0).all()


# ----------------------------------------------------------------------------------------------
# Bounds and initial values
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bound", [5e-3, 1e-2, 0.5, 3.0])
def test_noise_lower_bound_above_the_initial_noise(bound):
    """Case 113 (was: the initial noise was NaN and fit failed advising "a larger noise_lower_bound")."""
    X, y, g = data()
    model = DerivativeGP(X, y, g, noise_lower_bound=bound)
    for noise in (model.likelihood.value_noise, model.likelihood.grad_noise):
        assert torch.isfinite(noise).all() and (noise > bound).all()
    model.fit(maxiter=MAXITER)
    assert (model.likelihood.value_noise >= bound).all()
    assert_finite_fit(model, X[:3] + 0.05)


def test_initial_noise_respects_the_bound_in_every_group():
    """Case 114: directional and Hessian noises and shared or per-dimension gradient noises start inside too."""
    for shared in (False, True):
        noise = DerivativeGaussianNoise(3, shared_grad_noise=shared, lower_bound=0.2, directional=True, hessian=True)
        groups = (noise.value_noise, noise.grad_noise, noise.extra_noise("directional"), noise.extra_noise("hessian"))
        for group in groups:
            torch.testing.assert_close(group, torch.full_like(group, 0.4))
    # Below the bound's double the initial value is kept.
    default = DerivativeGaussianNoise(2, lower_bound=1e-6).value_noise
    torch.testing.assert_close(default, torch.tensor([1e-2], dtype=DTYPE))


def rbf(lengthscale: float = 0.5) -> ScaleKernel:
    kernel = ScaleKernel(DerivativeRBFKernel(ard_num_dims=2))
    kernel.base_kernel.lengthscale = torch.tensor([[lengthscale, 0.5]])
    return kernel


def test_zero_lengthscale_is_refused_at_construction_naming_it():
    """Case 115 (was: a CholeskyError at fit or predict advising a larger noise bound)."""
    X, y, g = data()
    with pytest.raises(ValueError, match=r"^kernel\.base_kernel\.lengthscale: expected positive values, got 0\.0$"):
        DerivativeGP(X, y, g, kernel=rbf(0.0))


def test_nan_or_zero_hyperparameters_of_any_kernel_part_are_refused():
    """Case 116: NaN lengthscale, zero output scale, zero period of a wrapped plain kernel; refused naming them."""
    X, y, g = data()
    nan_kernel = rbf()
    nan_kernel.base_kernel.raw_lengthscale.data[0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"kernel\.base_kernel\.lengthscale: expected positive values, got nan"):
        DerivativeGP(X, y, g, kernel=nan_kernel)
    flat = rbf()
    flat.outputscale = 0.0
    with pytest.raises(ValueError, match=r"kernel\.outputscale: expected positive values, got 0\.0"):
        DerivativeGP(X, y, g, kernel=flat)
    periodic = PeriodicKernel()
    periodic.period_length = 0.0
    product = DerivativeKernel(RBFKernel() * periodic)
    with pytest.raises(ValueError, match=r"kernel\.base_kernel\.kernels\.1\.period_length: expected positive values"):
        DerivativeGP(X, y, g, kernel=product)


def test_zero_lengthscale_set_after_construction_is_named_at_predict():
    """Case 117: a lengthscale set to zero by hand before predict is named, not blamed on the noise."""
    X, y, g = data()
    model = DerivativeGP(X, y, g)
    model.covar_module.base_kernel.lengthscale = 0.0
    with pytest.raises(ValueError, match=r"kernel\.base_kernel\.lengthscale: expected positive values, got 0\.0"):
        model.predict(X[:2])


# ----------------------------------------------------------------------------------------------
# Inputs that carry autograd graphs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
@pytest.mark.parametrize("which", ["X", "y", "grad"])
def test_training_data_with_an_autograd_graph_is_detached(which, optimizer):
    """Case 118 (was: fit failed with "Trying to backward through the graph a second time")."""
    X, y, g = data()
    leaf = {"X": X, "y": y, "grad": g}[which].clone().requires_grad_(True)
    args = {"X": X, "y": y, "grad": g} | {which: leaf * 1.0}  # a non-leaf tensor with a graph
    model = DerivativeGP(args["X"], args["y"], args["grad"]).fit(optimizer=optimizer, maxiter=MAXITER)
    assert_finite_fit(model, X[:3] + 0.05)
    assert leaf.grad is None  # the caller's graph was never reached
    assert not any(t.requires_grad for t in model.training_data.values() if isinstance(t, Tensor))
    assert not model.data.X.requires_grad and not model.data.targets.requires_grad


def test_directional_and_hessian_values_with_an_autograd_graph_are_detached():
    """Case 119: the same for directional derivatives (index, directions, values) and Hessian values."""
    X, y, _ = data()
    V = torch.ones(3, 2, dtype=DTYPE, requires_grad=True)
    values = torch.zeros(3, dtype=DTYPE, requires_grad=True)
    model = DerivativeGP(X, y, directional=(torch.arange(3), V * 1.0, values * 1.0)).fit(maxiter=MAXITER)
    assert_finite_fit(model, X[:2])
    H = torch.zeros(6, 2, 2, dtype=DTYPE, requires_grad=True)
    model = DerivativeGP(X, y, hessian=H * 1.0).fit(maxiter=MAXITER)
    assert_finite_fit(model, X[:2])
    assert V.grad is None and H.grad is None


def test_predict_stays_differentiable_in_the_test_points():
    """Case 120: detaching the training data leaves ``predict``'s documented gradients in ``Xs``."""
    X, y, g = data()
    model = DerivativeGP(X.clone().requires_grad_(True), y, g).fit(maxiter=MAXITER)
    Xs = torch.tensor([[0.3, 0.4]], dtype=DTYPE, requires_grad=True)
    (dmean,) = torch.autograd.grad(model.predict(Xs).mean.sum(), Xs)
    torch.testing.assert_close(dmean, model.predict(Xs.detach()).grad_mean, rtol=1e-6, atol=1e-8)
