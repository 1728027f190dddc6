"""The structured engine (inference="structured", n << d) against the dense engine; inference="auto"."""

from __future__ import annotations

import math

import pytest
import torch
from gpytorch.kernels import ScaleKernel

import gpderiv.inference.base as base
import gpderiv.inference.registry as registry
from gpderiv import DerivativeGP, ProblemTooLargeError
from gpderiv.inference import DenseCholesky, IsotropicRBFCovariance, StructuredWoodbury
from gpderiv.inference.structured import structured_nll
from gpderiv.kernels import DerivativeMatern52Kernel, DerivativeRBFKernel
from gpderiv.testing import assert_close, contains_all, train_covariance

DTYPE = torch.float64


def data(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(n, d, dtype=DTYPE, generator=gen) * 3 - 1
    y = torch.sin(2 * X).sum(-1) + X[:, 0] * X[:, -1]
    grad = 2 * torch.cos(2 * X)
    grad[:, 0] += X[:, -1]
    grad[:, -1] += X[:, 0]
    return X, y, grad


def isotropic(**kwargs: float) -> ScaleKernel:
    return ScaleKernel(DerivativeRBFKernel(), **kwargs)


def set_hypers(model: DerivativeGP, lengthscale: float, noise: float, grad_noise: float) -> None:
    """Internal-unit hyperparameters: lengthscale, output scale 1.7, constant mean 0.3, learned noises."""
    model.covar_module.base_kernel.lengthscale = lengthscale
    model.covar_module.outputscale = 1.7
    lik = model.likelihood
    for name, value in (("raw_value_noise", noise), ("raw_grad_noise", grad_noise)):
        raw, constraint = getattr(lik, name), getattr(lik, f"{name}_constraint")
        with torch.no_grad():
            raw.copy_(constraint.inverse_transform(torch.full_like(raw, value)))
    with torch.no_grad():
        model.mean_module.constant.fill_(0.3)


def pair(
    n: int, d: int, noise: float = 1e-2, grad_noise: float = 1e-3, relative_lengthscale: float = 0.4, seed: int = 0
) -> tuple[DerivativeGP, DerivativeGP]:
    """The same model with the dense and the structured engine, at the same hyperparameters."""
    X, y, grad = data(n, d, seed)
    models = []
    for engine in ("dense", "structured"):
        model = DerivativeGP(
            X, y, grad, kernel=isotropic(), shared_grad_noise=True, noise_lower_bound=1e-9, inference=engine
        )
        # Internal inputs fill the unit box: mean squared distance d / 6, so l ~ sqrt(d) correlates points.
        set_hypers(model, relative_lengthscale * math.sqrt(d), noise, grad_noise)
        models.append(model)
    return models[0], models[1]


def gradients(model: DerivativeGP) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = model.loss()
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named])
    return loss.detach(), {name: g for (name, _), g in zip(named, grads, strict=True)}


# ---------------------------------------------------------------------------------------- likelihood
@pytest.mark.parametrize(
    ("n", "d", "noise", "grad_noise"),
    [
        (5, 3, 1e-2, 1e-3),
        (5, 12, 1e-2, 1e-3),
        (5, 40, 1e-2, 1e-3),
        (5, 40, 1e-6, 1e-6),
        (6, 8, 0.3, 1e-5),
        (1, 7, 0.1, 0.1),
    ],
)
def test_marginal_likelihood_and_gradients_match_dense(n: int, d: int, noise: float, grad_noise: float) -> None:
    reference, model = pair(n, d, noise, grad_noise)
    loss_ref, grads_ref = gradients(reference)
    loss, grads = gradients(model)
    assert_close(loss, loss_ref, scale=10)
    assert grads.keys() == grads_ref.keys() and len(grads) == 5  # mean, scale, lengthscale, 2 noises
    for name, g in grads.items():
        assert_close(g, grads_ref[name], scale=10 * max(1.0, grads_ref[name].abs().max().item()), msg=name)
    assert math.isclose(model.log_marginal_likelihood(), reference.log_marginal_likelihood(), rel_tol=1e-10)


@pytest.mark.parametrize("relative_lengthscale", [0.1, 0.4, 3.0])
def test_lengthscale_regimes_match_dense(relative_lengthscale: float) -> None:
    """Almost independent points (K ~ I), the usual regime, and strongly correlated points."""
    reference, model = pair(6, 30, relative_lengthscale=relative_lengthscale, grad_noise=1e-4)
    loss_ref, grads_ref = gradients(reference)
    loss, grads = gradients(model)
    assert_close(loss, loss_ref, scale=100)
    for name, g in grads.items():
        assert_close(g, grads_ref[name], scale=1e3 * max(1.0, grads_ref[name].abs().max().item()), msg=name)


def test_engine_gradient_against_finite_differences() -> None:
    """gradcheck of the closed-form core backward (and everything else) in every differentiable input."""
    X = torch.rand(3, 5, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    resid = torch.randn(3 * 6, dtype=DTYPE, generator=torch.Generator().manual_seed(4), requires_grad=True)
    hypers = torch.tensor([1.2, 0.8, 0.05, 0.02], dtype=DTYPE, requires_grad=True)

    def nll(hypers: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        covariance = IsotropicRBFCovariance(X, hypers[0], hypers[1])
        return structured_nll(covariance, hypers[2:], resid)

    assert torch.autograd.gradcheck(nll, (hypers, resid), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::gpderiv.NotFittedWarning")  # initial hyperparameters on purpose
def test_high_dimension_matches_dense() -> None:
    """d >> n: N = 1503 rows from 3 points."""
    reference, model = pair(3, 500, grad_noise=1e-4)
    assert_close(model.loss().detach(), reference.loss().detach(), scale=100)
    Xs = data(4, 500, seed=1)[0]
    p, q = reference.predict(Xs), model.predict(Xs)
    for name in ("mean", "grad_mean", "variance", "grad_variance"):
        assert_close(getattr(q, name), getattr(p, name), scale=1e3, msg=name)


# ---------------------------------------------------------------------------------------- prediction
@pytest.mark.filterwarnings("ignore::gpderiv.NotFittedWarning")  # initial hyperparameters on purpose
@pytest.mark.parametrize(("n", "d"), [(5, 3), (7, 20), (4, 1)])
def test_predictions_match_dense(n: int, d: int) -> None:
    reference, model = pair(n, d)
    Xs = torch.cat([data(6, d, seed=2)[0], reference.training_data["X"][:2]])  # training points included
    for options in ({}, {"observation_noise": True}):
        p, q = reference.predict(Xs, **options), model.predict(Xs, **options)
        for name in ("mean", "grad_mean", "variance", "grad_variance"):
            assert_close(getattr(q, name), getattr(p, name), scale=100, msg=name)
    fast = model.predict(Xs, variance=False)
    assert fast.variance is None and fast.grad_variance is None
    assert_close(fast.mean, p.mean, scale=100)
    assert_close(fast.grad_mean, p.grad_mean, scale=100)
    # The general paths (dense cross-covariance, the factor's solve): joint covariance and Hessian.
    assert_close(model.predict(Xs[:3], full_cov=True).covariance, reference.predict(Xs[:3], full_cov=True).covariance)
    for a, b in zip(model.predict_hessian(Xs[:2]), reference.predict_hessian(Xs[:2]), strict=True):
        assert_close(a, b, scale=100)


def test_factor_solve_matches_dense() -> None:
    reference, model = pair(5, 9)
    A = train_covariance(reference).detach() + torch.diag(reference.row_noise().detach())
    rhs = torch.randn(A.shape[0], 3, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    factor = model.factor()
    assert_close(factor.solve(rhs), torch.linalg.solve(A, rhs), scale=100)
    assert_close(factor.solve(rhs[:, 0]), torch.linalg.solve(A, rhs[:, 0]), scale=100)
    assert_close(factor.alpha, torch.linalg.solve(A, reference.residual().detach()), scale=100)


@pytest.mark.filterwarnings("ignore::gpderiv.NotFittedWarning")  # initial hyperparameters on purpose
def test_prediction_is_differentiable_in_the_test_inputs() -> None:
    reference, model = pair(4, 6)
    Xs = data(3, 6, seed=5)[0].requires_grad_(True)
    grads = []
    for m in (reference, model):
        pred = m.predict(Xs)
        (g,) = torch.autograd.grad(pred.mean.sum() + pred.grad_variance.sum() + pred.variance.sum(), Xs)
        grads.append(g)
    assert_close(grads[1], grads[0], scale=100)


def test_fit_matches_dense_and_subset_fit_stays_structured() -> None:
    reference, model = pair(5, 12)
    reference.fit(maxiter=5)
    model.fit(maxiter=5)
    assert model.inference == "structured"
    assert math.isclose(model.mll, reference.mll, rel_tol=1e-6)
    model.fit(maxiter=3, subset=3, seed=0)
    reference.fit(maxiter=3, subset=3, seed=0)
    assert math.isclose(model.mll, reference.mll, rel_tol=1e-6)


def test_known_gradient_noise_equal_in_every_dimension() -> None:
    """A known scalar grad_noise is one variance in internal units when every input range is the same."""
    X, y, grad = data(5, 6)
    X[0], X[1] = -1.0, 2.0  # every column spans [-1, 2]
    models = [
        DerivativeGP(X, y, grad, kernel=isotropic(), noise=1e-3, grad_noise=1e-3, inference=engine)
        for engine in ("dense", "structured")
    ]
    for m in models:
        m.covar_module.base_kernel.lengthscale = 1.0
    assert_close(models[1].loss().detach(), models[0].loss().detach(), scale=10)


# ---------------------------------------------------------------------------------------- scope and auto
def test_scope_errors_name_the_argument_and_the_fix() -> None:
    X, y, grad = data(4, 3)
    partial = grad.clone()
    partial[0, 1] = math.nan
    cases = [
        ({"kernel": isotropic(), "shared_grad_noise": True, "grad": partial}, ("'structured'", "every partial")),
        ({"kernel": ScaleKernel(DerivativeRBFKernel(ard_num_dims=3)), "shared_grad_noise": True}, ("one lengthscale",)),
        ({"kernel": ScaleKernel(DerivativeMatern52Kernel()), "shared_grad_noise": True}, ("default kernel",)),
        ({"kernel": isotropic()}, ("one gradient-noise variance", "shared_grad_noise=True")),
        ({"kernel": isotropic(), "grad_noise": [1e-3, 2e-3, 3e-3]}, ("one gradient-noise variance",)),
    ]
    for kwargs, parts in cases:
        g = kwargs.pop("grad", grad)
        with pytest.raises(ValueError, match=contains_all("inference", *parts)):
            DerivativeGP(X, y, g, inference="structured", **kwargs)


def test_structured_memory_check_refuses_before_allocating(monkeypatch) -> None:
    monkeypatch.setattr(base, "available_memory", lambda device: 1000)
    X, y, grad = data(4, 3)
    with pytest.raises(ProblemTooLargeError, match=contains_all("structured engine", "n = 4", "bytes available")):
        DerivativeGP(X, y, grad, kernel=isotropic(), shared_grad_noise=True, inference="structured")


def test_auto_selection_rule(monkeypatch) -> None:
    def engine(n: int, d: int, **kwargs: object) -> str:
        X, y, grad = data(n, d)
        return DerivativeGP(X, y, grad, **kwargs).inference

    iso = {"kernel": isotropic(), "shared_grad_noise": True}
    assert engine(5, 2) == "dense"  # default: small problems unchanged
    assert engine(5, 300, **iso) == "structured"  # n << d, N = 1505
    assert engine(5, 150, **iso) == "dense"  # N = 755 < 1000
    assert engine(30, 50, **iso) == "dense"  # d < 2 n
    assert engine(30, 60, **iso) == "structured"  # d = 2 n, N = 1830
    assert engine(5, 300) == "dense"  # default ARD kernel: out of the structured scope
    assert engine(5, 300, kernel=isotropic()) == "dense"  # one noise per dimension: out of scope
    assert engine(5, 300, inference="dense", **iso) == "dense"  # explicit choice wins
    # Dense does not fit: iterative where it applies, otherwise the dense engine's error.
    monkeypatch.setattr(DenseCholesky, "memory_estimate", lambda self, data, dtype: 2**62)
    assert engine(6, 2) == "iterative"
    assert engine(5, 300, **iso) == "structured"
    with pytest.raises(ProblemTooLargeError, match=contains_all("dense engine", "fewer observations")):
        engine(6, 2, kernel=ScaleKernel(DerivativeMatern52Kernel()))
    monkeypatch.setattr(registry, "AUTO_ITERATIVE_MAX_ROWS", 10)
    with pytest.raises(ProblemTooLargeError, match=contains_all("dense engine", "inference='iterative'")):
        engine(6, 2)
    # The structured core does not fit either: dense's error.
    monkeypatch.setattr(StructuredWoodbury, "memory_estimate", lambda self, data, dtype: 2**62)
    with pytest.raises(ProblemTooLargeError, match="dense engine"):
        engine(5, 300, **iso)


@pytest.mark.filterwarnings("ignore::gpderiv.NotFittedWarning")  # initial hyperparameters on purpose
def test_saved_model_reloads_with_the_resolved_engine(tmp_path) -> None:
    X, y, grad = data(5, 300)
    model = DerivativeGP(X, y, grad, kernel=isotropic(), shared_grad_noise=True)
    model.covar_module.base_kernel.lengthscale = 5.0
    path = tmp_path / "model.pt"
    model.save(path)
    loaded = DerivativeGP.load(path)
    assert model.inference == loaded.inference == "structured"
    Xs = data(3, 300, seed=1)[0]
    before, after = model.predict(Xs), loaded.predict(Xs)
    for name in ("mean", "variance", "grad_mean", "grad_variance"):
        assert torch.equal(getattr(before, name), getattr(after, name)), name
