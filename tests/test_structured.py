"""The structured engine (inference="structured", n << d, isotropic and ARD) against the dense engine; "auto"."""

from __future__ import annotations

import math

import pytest
import torch
from botorch.models.transforms import Normalize
from gpytorch.kernels import ScaleKernel

import gpderiv.inference.base as base
import gpderiv.inference.registry as registry
from gpderiv import DerivativeGP, ProblemTooLargeError
from gpderiv.botorch import DerivativeGPModel
from gpderiv.inference import DenseCholesky, IsotropicRBFCovariance, StructuredWoodbury
from gpderiv.inference.structured import structured_nll
from gpderiv.inference.structured_ard import ard_structured_nll
from gpderiv.kernels import DerivativeMatern52Kernel, DerivativeRBFKernel
from gpderiv.testing import assert_close, assert_same_predictions, contains_all, train_covariance

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


def set_raw(module: torch.nn.Module, name: str, value: torch.Tensor | float) -> None:
    """Set a constrained parameter exactly (not through the float32 rounding of GPyTorch's setters)."""
    raw, constraint = getattr(module, f"raw_{name}"), getattr(module, f"raw_{name}_constraint")
    with torch.no_grad():
        raw.copy_(constraint.inverse_transform(torch.as_tensor(value, dtype=raw.dtype).expand_as(raw)))


def set_hypers(model: DerivativeGP, lengthscale: float, noise: float, grad_noise: float | tuple[float, float]) -> None:
    """Internal-unit hyperparameters: lengthscale, output scale 1.7, constant mean 0.3, learned noises.

    With several lengthscales, they spread over ``[0.5, 2] lengthscale``; with a pair ``grad_noise``,
    the gradient noises are log-spaced between its ends: every dimension has its own values.
    """
    base, lik = model.covar_module.base_kernel, model.likelihood
    size = base.lengthscale.numel()
    set_raw(base, "lengthscale", lengthscale * (torch.linspace(0.5, 2.0, size, dtype=DTYPE) if size > 1 else 1.0))
    set_raw(model.covar_module, "outputscale", 1.7)
    set_raw(lik, "value_noise", noise)
    lo, hi = (grad_noise, grad_noise) if isinstance(grad_noise, float) else grad_noise
    set_raw(lik, "grad_noise", torch.logspace(math.log10(lo), math.log10(hi), lik.raw_grad_noise.numel(), dtype=DTYPE))
    with torch.no_grad():
        model.mean_module.constant.fill_(0.3)


def pair(
    n: int,
    d: int,
    noise: float = 1e-2,
    grad_noise: float | tuple[float, float] = 1e-3,
    relative_lengthscale: float = 0.4,
    seed: int = 0,
    X: torch.Tensor | None = None,
    **kwargs: object,
) -> tuple[DerivativeGP, DerivativeGP]:
    """The same model with the dense and the structured engine, at the same hyperparameters.

    By default the isotropic kernel with one gradient noise; ``kwargs`` go to DerivativeGP
    (``kernel=None, shared_grad_noise=False``: its defaults, ARD with one noise per dimension).
    """
    X0, y, grad = data(n, d, seed)
    X = X0 if X is None else X
    models = []
    for engine in ("dense", "structured"):
        options = {"kernel": isotropic(), "shared_grad_noise": True, **kwargs}  # a kernel per model
        model = DerivativeGP(X, y, grad, noise_lower_bound=1e-9, inference=engine, **options)
        # Internal inputs fill the unit box: mean squared distance d / 6, so l ~ sqrt(d) correlates points.
        set_hypers(model, relative_lengthscale * math.sqrt(d), noise, grad_noise)
        model.fitted = True
        models.append(model)
    return models[0], models[1]


#: DerivativeGP's defaults (ARD kernel, one learned noise per derivative dimension) with distinct values.
ARD = {"kernel": None, "shared_grad_noise": False, "grad_noise": (1e-4, 1e-2)}


def gradients(model: DerivativeGP) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = model.loss()
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named])
    return loss.detach(), {name: g for (name, _), g in zip(named, grads, strict=True)}


def assert_same_likelihood(reference: DerivativeGP, model: DerivativeGP, scale: float = 10) -> None:
    """Loss and its gradient in every parameter (scaled by the gradient's size) agree."""
    loss_ref, grads_ref = gradients(reference)
    loss, grads = gradients(model)
    assert_close(loss, loss_ref, scale=scale)
    assert grads.keys() == grads_ref.keys() and len(grads) == 5  # mean, scale, lengthscale, 2 noises
    for name, g in grads.items():
        assert_close(g, grads_ref[name], scale=scale * max(1.0, grads_ref[name].abs().max().item()), msg=name)


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
    assert model.engine.isotropic(model.covar_module)
    assert_same_likelihood(reference, model)
    assert math.isclose(model.log_marginal_likelihood(), reference.log_marginal_likelihood(), rel_tol=1e-10)


@pytest.mark.parametrize(("n", "d"), [(5, 3), (5, 12), (6, 40), (1, 7), (4, 1), (8, 8)])
def test_ard_marginal_likelihood_and_gradients_match_dense(n: int, d: int) -> None:
    """Distinct lengthscales and gradient noises: one gradient per lengthscale and per noise."""
    reference, model = pair(n, d, **ARD)
    assert model.engine.isotropic(model.covar_module) == (d == 1)  # the ARD path (d = 1: one of each)
    assert_same_likelihood(reference, model)
    grads = gradients(reference)[1]
    assert grads["covar_module.base_kernel.raw_lengthscale"].numel() == grads["likelihood.raw_grad_noise"].numel() == d


@pytest.mark.parametrize("options", [{"grad_noise": 1e-4}, ARD], ids=["isotropic", "ard"])
@pytest.mark.parametrize("relative_lengthscale", [0.05, 0.4, 3.0])
def test_lengthscale_regimes_match_dense(relative_lengthscale: float, options: dict) -> None:
    """Almost independent points (E ~ I: eigenvalues cluster at 1), the usual regime, strongly correlated points."""
    reference, model = pair(6, 30, relative_lengthscale=relative_lengthscale, **options)
    assert_same_likelihood(reference, model, scale=100)


def test_repeated_eigenvalues_match_dense() -> None:
    """Points of a regular simplex: E = a I + b 1 1^T has one eigenvalue n - 1 times (eigenvectors not unique)."""
    n, d = 5, 9
    X = torch.zeros(n, d, dtype=DTYPE)
    X[:, :n] = torch.eye(n, dtype=DTYPE)  # pairwise distances all sqrt(2) in the first n coordinates
    reference, model = pair(n, d, X=X, **ARD)
    assert_same_likelihood(reference, model, scale=100)


@pytest.mark.parametrize(
    "options",
    [{**ARD, "shared_grad_noise": True, "grad_noise": 1e-3}, {"shared_grad_noise": False, "grad_noise": (1e-4, 1e-2)}],
    ids=["ard-shared-noise", "isotropic-noise-per-dimension"],
)
def test_ard_path_for_one_of_ard_and_noise_per_dimension(options: dict) -> None:
    reference, model = pair(5, 11, **options)
    assert not model.engine.isotropic(model.covar_module)
    assert_same_likelihood(reference, model)


def test_engine_gradient_against_finite_differences() -> None:
    """gradcheck of the closed-form core backward (and everything else) in every differentiable input."""
    X = torch.rand(3, 5, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    resid = torch.randn(3 * 6, dtype=DTYPE, generator=torch.Generator().manual_seed(4), requires_grad=True)
    hypers = torch.tensor([1.2, 0.8, 0.05, 0.02], dtype=DTYPE, requires_grad=True)

    def nll(hypers: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        covariance = IsotropicRBFCovariance(X, hypers[0], hypers[1])
        return structured_nll(covariance, hypers[2:], resid)

    assert torch.autograd.gradcheck(nll, (hypers, resid), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_ard_gradient_against_finite_differences() -> None:
    """gradcheck in every lengthscale, the scale, both noises (value and per dimension) and the residual."""
    n, d = 3, 4
    X = torch.rand(n, d, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    resid = torch.randn(n * (1 + d), dtype=DTYPE, generator=torch.Generator().manual_seed(4), requires_grad=True)
    lengthscale = torch.tensor([0.6, 0.9, 1.3, 2.0], dtype=DTYPE, requires_grad=True)
    scalars = torch.tensor([0.8, 0.05], dtype=DTYPE, requires_grad=True)  # scale, value noise
    grad_noise = torch.tensor([0.01, 0.02, 0.05, 0.003], dtype=DTYPE, requires_grad=True)

    def nll(lengthscale, scalars, grad_noise, resid):
        return ard_structured_nll(X, lengthscale, scalars[0], scalars[1], grad_noise, resid)

    assert torch.autograd.gradcheck(nll, (lengthscale, scalars, grad_noise, resid), eps=1e-6, atol=1e-6, rtol=1e-5)


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
@pytest.mark.parametrize("options", [{}, ARD], ids=["isotropic", "ard"])
@pytest.mark.parametrize(("n", "d"), [(5, 3), (7, 20), (4, 1)])
def test_predictions_match_dense(n: int, d: int, options: dict) -> None:
    reference, model = pair(n, d, **options)
    Xs = torch.cat([data(6, d, seed=2)[0], reference.training_data["X"][:2]])  # training points included
    assert_same_predictions(model, reference, Xs)


@pytest.mark.parametrize("options", [{}, ARD], ids=["isotropic", "ard"])
def test_factor_solve_matches_dense(options: dict) -> None:
    reference, model = pair(5, 9, **options)
    A = train_covariance(reference).detach() + torch.diag(reference.row_noise().detach())
    rhs = torch.randn(A.shape[0], 3, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    factor = model.factor()
    assert_close(factor.solve(rhs), torch.linalg.solve(A, rhs), scale=100)
    assert_close(factor.solve(rhs[:, 0]), torch.linalg.solve(A, rhs[:, 0]), scale=100)
    assert_close(factor.alpha, torch.linalg.solve(A, reference.residual().detach()), scale=100)


@pytest.mark.filterwarnings("ignore::gpderiv.NotFittedWarning")  # initial hyperparameters on purpose
@pytest.mark.parametrize("options", [{}, ARD], ids=["isotropic", "ard"])
def test_prediction_is_differentiable_in_the_test_inputs(options: dict) -> None:
    reference, model = pair(4, 6, **options)
    Xs = data(3, 6, seed=5)[0].requires_grad_(True)
    grads = []
    for m in (reference, model):
        pred = m.predict(Xs)
        (g,) = torch.autograd.grad(pred.mean.sum() + pred.grad_variance.sum() + pred.variance.sum(), Xs)
        grads.append(g)
    assert_close(grads[1], grads[0], scale=100)


@pytest.mark.parametrize("options", [{}, ARD], ids=["isotropic", "ard"])
def test_fit_matches_dense_and_subset_fit_stays_structured(options: dict) -> None:
    reference, model = pair(5, 12, **options)
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
        ({"kernel": ScaleKernel(DerivativeMatern52Kernel()), "shared_grad_noise": True}, ("default kernel",)),
    ]
    for kwargs, parts in cases:
        g = kwargs.pop("grad", grad)
        with pytest.raises(ValueError, match=contains_all("inference", *parts)):
            DerivativeGP(X, y, g, inference="structured", **kwargs)
    # In scope since ARD (tests/test_structured_ard.py): ARD lengthscales, one noise per dimension.
    for kwargs in ({}, {"kernel": isotropic()}, {"kernel": isotropic(), "grad_noise": [1e-3, 2e-3, 3e-3]}):
        assert DerivativeGP(X, y, grad, inference="structured", **kwargs).inference == "structured"


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
    assert engine(70, 64) == "iterative"  # n > 64, d >= 64: CG preconditioned by the block-diagonal part
    assert engine(70, 63) == "dense"  # d < 64: block-Jacobi CG, slower than dense while dense fits
    assert engine(30, 50, kernel=ScaleKernel(DerivativeMatern52Kernel())) == "dense"  # no iterative engine
    assert engine(5, 300) == "structured"  # the default ARD kernel and noise per dimension
    assert engine(30, 50) == "dense"  # d < 2 n
    assert engine(5, 300, kernel=isotropic()) == "structured"  # one lengthscale, one noise per dimension
    assert engine(5, 300, inference="dense", **iso) == "dense"  # explicit choice wins
    # Dense does not fit: iterative where it applies, otherwise the dense engine's error.
    monkeypatch.setattr(DenseCholesky, "memory_estimate", lambda self, data, dtype: 2**62)
    assert engine(6, 2) == "iterative"
    assert engine(5, 300, **iso) == "structured"
    # Where no exact engine applies: the approximate variational engine, with a warning.
    with pytest.warns(UserWarning, match="approximate 'variational'"):
        assert engine(6, 2, kernel=ScaleKernel(DerivativeMatern52Kernel())) == "variational"
    monkeypatch.setattr(registry, "AUTO_ITERATIVE_MAX_ROWS", 10)
    with pytest.warns(UserWarning, match="approximate 'variational'"):
        assert engine(6, 2) == "variational"
    # In d >= 64 dimensions the iterative engine's cap is n^2 d (its CG is preconditioned by the
    # block-diagonal part): n = 70 points (above the structured engine's 64) in d = 100.
    assert engine(70, 100) == "iterative"
    monkeypatch.setattr(registry, "AUTO_ITERATIVE_MAX_WORK", 70 * 70 * 100 - 1)
    with pytest.warns(UserWarning, match="approximate 'variational'"):
        assert engine(70, 100) == "variational"
    # The structured core does not fit either: the iterative engine (d >= 64), else dense's error.
    monkeypatch.setattr(StructuredWoodbury, "memory_estimate", lambda self, data, dtype: 2**62)
    assert engine(5, 300, **iso) == "iterative"
    monkeypatch.setattr(registry, "AUTO_ITERATIVE_MAX_WORK", 0)
    with pytest.warns(UserWarning, match="approximate 'variational'"):
        assert engine(5, 300, **iso) == "variational"
    # Without the variational engine registered: the dense engine's error, with what to do.
    monkeypatch.delitem(registry._ENGINES, "variational")
    with pytest.raises(ProblemTooLargeError, match=contains_all("dense engine", "n^2 d")):
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


# ---------------------------------------------------------------------------------------- BoTorch model
def botorch_pair(**kwargs: object) -> tuple[DerivativeGPModel, DerivativeGPModel]:
    """The BoTorch model's default kernel (ARD, interleaved layout, no ScaleKernel) with both engines."""
    X = torch.rand(5, 8, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    Y = torch.cat([torch.sin(3 * X).sum(-1, keepdim=True), 3 * torch.cos(3 * X)], -1)
    models = []
    for engine in ("structured", "dense"):
        model = DerivativeGPModel(X, Y, input_transform=Normalize(8), inference=engine, **kwargs)
        model.covar_module.lengthscale = torch.linspace(0.4, 1.6, 8, dtype=DTYPE)
        models.append(model.eval())
    return models[0], models[1]


@pytest.mark.parametrize("known", [False, True])
def test_botorch_default_kernel_runs_structured(known: bool) -> None:
    kwargs = {}
    if known:  # one known variance per derivative dimension, the same at every point: in scope
        Yvar = torch.full((5, 9), 1e-3, dtype=DTYPE)
        Yvar[:, 1:] = torch.logspace(-4, -2, 8, dtype=DTYPE)
        kwargs["train_Yvar"] = Yvar
    model, dense = botorch_pair(**kwargs)
    assert model.inference == "structured" and not model.engine.isotropic(model.covar_module)
    Xs = torch.rand(2, 3, 8, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    p, q = model.posterior(Xs, output_indices=[0, 1, 5]), dense.posterior(Xs, output_indices=[0, 1, 5])
    assert_close(p.mean, q.mean, scale=1e4)
    assert_close(p.distribution.covariance_matrix, q.distribution.covariance_matrix, scale=1e4)
    assert_close(model.log_marginal_likelihood().detach(), dense.log_marginal_likelihood().detach(), scale=1e3)


def test_botorch_noise_that_varies_between_points_is_refused() -> None:
    X = torch.rand(4, 6, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    Y = torch.cat([torch.sin(X).sum(-1, keepdim=True), torch.cos(X)], -1)
    Yvar = torch.full_like(Y, 1e-3)
    Yvar[0, 2] = 5e-3
    with pytest.raises(ValueError, match=contains_all("inference: 'structured'", "the same at every point")):
        DerivativeGPModel(X, Y, train_Yvar=Yvar, inference="structured")


# ---------------------------------------------------------------------------------------- auto, every front end
def test_auto_picks_structured_for_the_default_model_in_every_front_end(tmp_path) -> None:
    """n = 5 points in d = 200: N = 1005 rows, d >= 2 n (registry.select_engine)."""
    import contextlib
    import io

    import numpy as np

    from gpderiv.cli import main
    from gpderiv.sklearn import DerivativeGPRegressor

    n, d = 5, 200
    X, y, grad = data(n, d)
    assert DerivativeGP(X, y, grad).inference == "structured"
    with pytest.warns(Warning):  # maxiter reached
        estimator = DerivativeGPRegressor(maxiter=2).fit(X.numpy(), y.numpy(), grad=grad.numpy())
    assert estimator.model_.inference == "structured"
    columns = [f"x{a}" for a in range(d)] + ["f"] + [f"g{a}" for a in range(d)]
    table = np.concatenate([X.numpy(), y.numpy()[:, None], grad.numpy()], 1)
    np.savetxt(tmp_path / "data.csv", table, delimiter=",", header=",".join(columns), comments="")
    args = ["fit", str(tmp_path / "data.csv"), "--x", ",".join(columns[:d]), "--y", "f"]
    args += ["--grad", ",".join(columns[d + 1 :]), "--maxiter", "2", "--save", str(tmp_path / "m.pt")]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(args) == 0
    assert DerivativeGP.load(tmp_path / "m.pt").inference == "structured"
    Y = torch.cat([y.unsqueeze(-1), grad], -1)
    assert DerivativeGPModel(X, Y).inference == "structured"  # the BoTorch model's default kernel too
