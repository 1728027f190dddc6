"""predict(variance="local"): variances conditioned on the nearest training points only."""

from __future__ import annotations

import pytest
import torch
from gpytorch.kernels import ScaleKernel

from gpderiv import DerivativeGP, ProblemTooLargeError
from gpderiv.kernels import DerivativeMatern52Kernel

DTYPE = torch.float64


def partial_model(inference: str = "dense") -> DerivativeGP:
    """Values, gradients with missing entries and directional derivatives at 40 points in 3-D."""
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(40, 3, dtype=DTYPE, generator=gen)
    y, grad = torch.sin(3 * X).sum(-1), 3 * torch.cos(3 * X)
    grad[::3, 1] = float("nan")
    y[5] = float("nan")
    directional = (torch.tensor([1, 5]), torch.randn(2, 3, dtype=DTYPE, generator=gen), torch.tensor([0.3, -0.2]))
    model = DerivativeGP(X, y, grad, directional=directional, noise=1e-3, grad_noise=1e-2)
    model.covar_module.base_kernel.lengthscale = torch.tensor([0.2, 0.3, 0.4], dtype=DTYPE)
    return model


@pytest.mark.filterwarnings("ignore::gpderiv.NotFittedWarning")  # initial hyperparameters on purpose
def test_local_variances_with_every_point_are_the_exact_ones() -> None:
    model = partial_model()
    Xs = torch.rand(6, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    for noise in (False, True):
        exact = model.predict(Xs, observation_noise=noise)
        local = model.predict(Xs, observation_noise=noise, variance="local", neighbours=1000)
        for name in ("mean", "grad_mean", "variance", "grad_variance"):
            torch.testing.assert_close(getattr(local, name), getattr(exact, name), rtol=1e-9, atol=1e-12)


@pytest.mark.filterwarnings("ignore::gpderiv.NotFittedWarning")  # initial hyperparameters on purpose
def test_local_variances_are_upper_bounds_that_shrink_with_more_neighbours() -> None:
    model = partial_model()
    Xs = torch.rand(6, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(2))
    exact = model.predict(Xs)
    previous = None
    for k in (1, 3, 10, 25):  # nested neighbour sets: conditioning on more data never adds variance
        local = model.predict(Xs, variance="local", neighbours=k)
        current = torch.cat([local.variance.unsqueeze(-1), local.grad_variance], -1)
        assert (current >= torch.cat([exact.variance.unsqueeze(-1), exact.grad_variance], -1) * (1 - 1e-9)).all()
        if previous is not None:
            assert (current <= previous * (1 + 1e-9)).all()
            assert (current < previous * (1 - 1e-6)).any()  # and does shrink
        previous = current


@pytest.mark.filterwarnings("ignore::gpderiv.NotFittedWarning")  # initial hyperparameters on purpose
def test_neighbours_are_the_nearest_in_lengthscales() -> None:
    """Along a long lengthscale a far point is a near one: it is the one to condition on."""
    X = torch.tensor([[0.5, 0.0], [0.8, 0.5], [0.0, 1.0], [1.0, 0.0]], dtype=DTYPE)
    y, grad = torch.tensor([1.0, 0.0, -1.0, 0.5], dtype=DTYPE), torch.zeros(4, 2, dtype=DTYPE)
    model = DerivativeGP(X, y, grad, noise=1e-4, grad_noise=1e-4)
    model.covar_module.base_kernel.lengthscale = torch.tensor([0.05, 10.0], dtype=DTYPE)
    Xs = torch.tensor([[0.5, 0.5]], dtype=DTYPE)
    # Point 0 is 0.5 away in x2 (0.05 lengthscales); point 1 is 0.3 away in x1 (6 lengthscales).
    exact = model.predict(Xs)
    local = model.predict(Xs, variance="local", neighbours=1)
    prior = model.covar_module(model.scaling.x(Xs), diag=True)[0] * model.scaling.y_scale.square()
    assert exact.variance.item() < 1e-2 * prior.item()  # point 0 pins f down ...
    torch.testing.assert_close(local.variance, exact.variance, rtol=1e-3, atol=0.0)  # ... and is chosen


@pytest.mark.filterwarnings("ignore::gpderiv.NotFittedWarning")  # initial hyperparameters on purpose
def test_local_variances_of_the_iterative_engine_and_another_kernel() -> None:
    gen = torch.Generator().manual_seed(3)
    X = torch.rand(30, 2, dtype=DTYPE, generator=gen)
    y, grad = torch.sin(3 * X).sum(-1), 3 * torch.cos(3 * X)
    Xs = torch.rand(5, 2, dtype=DTYPE, generator=gen)
    iterative = DerivativeGP(X, y, grad, noise=0.05, grad_noise=0.5, inference="iterative")
    torch.testing.assert_close(
        iterative.predict(Xs, variance="local", neighbours=30).grad_variance,
        iterative.predict(Xs).grad_variance,
        rtol=1e-4,
        atol=1e-6,
    )
    matern = DerivativeGP(X, y, grad, kernel=ScaleKernel(DerivativeMatern52Kernel(ard_num_dims=2)), noise=0.05)
    exact, local = matern.predict(Xs), matern.predict(Xs, variance="local", neighbours=8)
    assert (local.grad_variance >= exact.grad_variance * (1 - 1e-9)).all()


@pytest.mark.filterwarnings("ignore::gpderiv.NotFittedWarning")  # initial hyperparameters on purpose
def test_too_many_neighbours_for_memory_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import gpderiv.inference.base as base

    monkeypatch.setattr(base, "available_memory", lambda device: 540_000)  # 3 matrices of 147 rows fit, of 160 not
    model = partial_model()
    model.predict(torch.rand(2, 3, dtype=DTYPE), variance="local", neighbours=5)  # 20 rows fit
    message = "neighbours: 40 are too many for local variances. The dense engine, for N = 160 rows, needs about"
    with pytest.raises(ProblemTooLargeError, match=message):
        model.predict(torch.rand(2, 3, dtype=DTYPE), variance="local", neighbours=40)


@pytest.mark.filterwarnings("ignore::gpderiv.NotFittedWarning")  # initial hyperparameters on purpose
@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"variance": "lokal"}, "variance: expected True, False or 'local', got 'lokal'"),
        ({"variance": "local", "neighbours": 0}, "neighbours: expected a positive integer, got 0"),
        ({"variance": "local", "neighbours": 2.5}, "neighbours: expected a positive integer, got 2.5"),
        ({"variance": "local", "full_cov": True}, "full_cov=True needs variance=True, got 'local'"),
    ],
)
def test_bad_local_variance_options_are_named(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        partial_model().predict(torch.rand(2, 3, dtype=DTYPE), **options)
