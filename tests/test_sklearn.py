"""gpderiv.sklearn.DerivativeGPRegressor: scikit-learn conventions, gradients, missing data, pipelines."""

from __future__ import annotations

import doctest
import importlib
import sys
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from sklearn.base import clone  # noqa: E402
from sklearn.exceptions import NotFittedError  # noqa: E402
from sklearn.model_selection import cross_val_score  # noqa: E402
from sklearn.pipeline import Pipeline, make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import gpderiv.sklearn as gsk  # noqa: E402
from gpderiv import DerivativeGP, InputWarning  # noqa: E402
from gpderiv.kernels import DerivativeMatern32Kernel, DerivativeMatern52Kernel, DerivativeRBFKernel  # noqa: E402
from gpderiv.sklearn import DerivativeGPRegressor  # noqa: E402

#: Checks of sklearn's check_estimator that cannot apply, with the reason (docs/sklearn.md
#: explains each). Empty: every check applies and passes on the value-only path.
EXPECTED_FAILED_CHECKS: dict[str, str] = {}

DEFAULTS = {
    "kernel": "rbf",
    "noise": None,
    "grad_noise": None,
    "noise_lower_bound": 1e-6,
    "noise_prior": False,
    "hyperparameter_uncertainty": "auto",
    "optimizer": None,
    "maxiter": None,
    "time_budget": None,
    "restarts": 0,
    "random_state": None,
    "progress": False,
    "inference": "auto",
    "inference_options": None,
}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """check_estimator fits ~60 small GPs; on 2 shared cores a second torch thread only adds contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def f2(X: np.ndarray) -> np.ndarray:
    return np.sin(3 * X[:, 0]) * np.cos(2 * X[:, 1]) + 0.5 * X[:, 0]


def f2_grad(X: np.ndarray) -> np.ndarray:
    return np.stack(
        [3 * np.cos(3 * X[:, 0]) * np.cos(2 * X[:, 1]) + 0.5, -2 * np.sin(3 * X[:, 0]) * np.sin(2 * X[:, 1])], axis=1
    )


def data2d(n: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    X = np.random.default_rng(seed).uniform(size=(n, 2))
    return X, f2(X), f2_grad(X)


def grid(k: int = 15) -> np.ndarray:
    g = np.linspace(0.05, 0.95, k)
    return np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)))


# ---------------------------------------------------------------------- scikit-learn's own checks
@parametrize_with_checks([DerivativeGPRegressor()], expected_failed_checks=lambda est: EXPECTED_FAILED_CHECKS)
def test_sklearn_check_estimator(estimator, check):
    check(estimator)


# ---------------------------------------------------------------------- parameters
def test_get_params_are_the_init_arguments_verbatim():
    assert DerivativeGPRegressor().get_params() == DEFAULTS
    odd = {"kernel": "no-such-kernel", "maxiter": -3, "restarts": "x", "noise": [1, 2]}
    reg = DerivativeGPRegressor(**odd)  # no validation in __init__ ...
    assert {k: reg.get_params()[k] for k in odd} == odd
    with pytest.raises(ValueError, match="kernel: expected one of"):  # ... but in fit
        reg.fit(*data2d()[:2])


def test_inference_engine_is_passed_to_the_model():
    X, y, grad = data2d()
    reg = DerivativeGPRegressor(inference="iterative", maxiter=2).fit(X, y, grad=grad)
    assert reg.model_.inference == "iterative"
    with pytest.raises(ValueError, match="inference: expected 'auto' or one of"):
        DerivativeGPRegressor(inference="cholesky").fit(X, y, grad=grad)


def test_set_params_and_clone():
    X, y, _ = data2d()
    reg = DerivativeGPRegressor().set_params(kernel="matern52", maxiter=50, random_state=3)
    assert reg.get_params()["kernel"] == "matern52" and reg.maxiter == 50
    reg.fit(X, y)
    twin = clone(reg)
    assert twin.get_params() == reg.get_params()
    assert not hasattr(twin, "model_")
    with pytest.raises(NotFittedError):
        twin.predict(X)


@pytest.mark.parametrize(
    "name, cls",
    [("rbf", DerivativeRBFKernel), ("matern52", DerivativeMatern52Kernel), ("matern32", DerivativeMatern32Kernel)],
)
def test_kernel_names_build_scaled_ard_kernels(name, cls):
    X, y, g = data2d(8)
    reg = DerivativeGPRegressor(kernel=name, maxiter=30).fit(X, y, grad=g)
    base = reg.model_.covar_module.base_kernel
    assert isinstance(base, cls) and base.lengthscale.numel() == 2
    assert reg.model_.train_X.dtype == torch.float64
    assert np.isfinite(reg.predict(X)).all()


def test_restarts_are_reproducible_with_random_state():
    X, y, _ = data2d(10)
    a = DerivativeGPRegressor(restarts=1, random_state=0, maxiter=30).fit(X, y).predict(X)
    b = DerivativeGPRegressor(restarts=1, random_state=0, maxiter=30).fit(X, y).predict(X)
    np.testing.assert_array_equal(a, b)
    rs = np.random.RandomState(0)
    DerivativeGPRegressor(restarts=1, random_state=rs, maxiter=10).fit(X, y)


# ---------------------------------------------------------------------- fit / predict
def test_known_noise_is_passed_in_user_units():
    X, y, g = data2d(10)
    reg = DerivativeGPRegressor(noise=1e-4, grad_noise=[1e-4, 1e-3], maxiter=20).fit(X, y, grad=g)
    hyper = reg.model_.hyperparameters()
    np.testing.assert_allclose(hyper["noise"].numpy(), [1e-4], rtol=1e-10)
    np.testing.assert_allclose(hyper["grad_noise"].numpy(), [1e-4, 1e-3], rtol=1e-10)


def test_gradients_improve_rmse_over_values_only():
    X, y, g = data2d(12)
    Xt = grid()
    value_only = DerivativeGPRegressor().fit(X, y)
    with_grad = DerivativeGPRegressor().fit(X, y, grad=g)
    err_value = rmse(value_only.predict(Xt), f2(Xt))
    err_grad = rmse(with_grad.predict(Xt), f2(Xt))
    assert err_grad < 0.5 * err_value
    assert err_grad < 0.05
    _, grad = with_grad.predict(Xt, return_grad=True)
    assert rmse(grad, f2_grad(Xt)) < 0.5 * rmse(value_only.predict(Xt, return_grad=True)[1], f2_grad(Xt))
    assert with_grad.score(Xt, f2(Xt)) > 0.99


def test_predict_return_tuple_order_and_shapes():
    X, y, g = data2d(10)
    reg = DerivativeGPRegressor(maxiter=50).fit(X, y, grad=g)
    Xt = grid(3)
    m = len(Xt)
    mean = reg.predict(Xt)
    assert isinstance(mean, np.ndarray) and mean.shape == (m,) and mean.dtype == np.float64
    mean2, std = reg.predict(Xt, return_std=True)
    mean3, grad = reg.predict(Xt, return_grad=True)
    out = reg.predict(Xt, return_std=True, return_grad=True)
    assert len(out) == 4
    assert [a.shape for a in out] == [(m,), (m,), (m, 2), (m, 2)]
    pred = reg.model_.predict(torch.from_numpy(Xt))
    for got, want in zip(out, [pred.mean, pred.std, pred.grad_mean, pred.grad_std], strict=True):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-12, atol=1e-12)
    for a in (mean2, mean3):
        np.testing.assert_allclose(a, mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(std, out[1], rtol=1e-12)
    np.testing.assert_allclose(grad, out[2], rtol=1e-12)
    assert (std >= 0).all() and (out[3] >= 0).all()


def test_one_feature_accepts_1d_grad():
    X = np.linspace(0, 3, 8).reshape(-1, 1)
    a = DerivativeGPRegressor(maxiter=50).fit(X, np.sin(X[:, 0]), grad=np.cos(X[:, 0]))
    b = DerivativeGPRegressor(maxiter=50).fit(X, np.sin(X[:, 0]), grad=np.cos(X))
    np.testing.assert_array_equal(a.predict(X), b.predict(X))


def test_log_marginal_likelihood_matches_model():
    X, y, g = data2d(10)
    reg = DerivativeGPRegressor(maxiter=50).fit(X, y, grad=g)
    assert isinstance(reg.log_marginal_likelihood_value_, float)
    assert reg.log_marginal_likelihood_value_ == reg.model_.mll
    assert reg.log_marginal_likelihood() == pytest.approx(reg.log_marginal_likelihood_value_, rel=1e-10)


def test_same_result_as_derivative_gp():
    X, y, g = data2d(10)
    reg = DerivativeGPRegressor(kernel="rbf", maxiter=40).fit(X, y, grad=g)
    model = DerivativeGP(torch.from_numpy(X), torch.from_numpy(y), torch.from_numpy(g)).fit(maxiter=40)
    np.testing.assert_allclose(reg.predict(X), model.predict(torch.from_numpy(X)).mean.numpy(), rtol=1e-10)


def test_float32_and_int_inputs_are_converted_without_warnings():
    X, y, _ = data2d(10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        reg = DerivativeGPRegressor(maxiter=20).fit(X.astype(np.float32), y.astype(np.float32))
        assert reg.model_.train_X.dtype == torch.float64
        assert reg.predict(X.astype(np.float32)).dtype == np.float64
        DerivativeGPRegressor(maxiter=20).fit((X * 10).astype(int), y)


# ---------------------------------------------------------------------- missing data (NaN)
def test_nan_in_grad_is_missing():
    X, y, g = data2d(12)
    g_missing = g.copy()
    g_missing[::2, 0] = np.nan
    g_missing[1::3, 1] = np.nan
    reg = DerivativeGPRegressor(maxiter=60).fit(X, y, grad=g_missing)
    assert reg.model_.num_observations == 12 + int(np.isfinite(g_missing).sum())
    Xt = grid(5)
    assert np.isfinite(np.concatenate([a.ravel() for a in reg.predict(Xt, True, True)])).all()
    value_only = DerivativeGPRegressor(maxiter=60).fit(X, y)
    assert rmse(reg.predict(Xt), f2(Xt)) < rmse(value_only.predict(Xt), f2(Xt))


def test_all_nan_grad_is_the_value_only_fit():
    X, y, g = data2d(10)
    a = DerivativeGPRegressor(maxiter=40).fit(X, y, grad=np.full_like(g, np.nan))
    b = DerivativeGPRegressor(maxiter=40).fit(X, y)
    np.testing.assert_array_equal(a.predict(X), b.predict(X))


def test_nan_in_y_is_missing():
    """NaN in y drops that value; with the same X range the fit equals the fit without those rows."""
    X, y, _ = data2d(14)
    inner = [i for i in range(14) if all(X[i] != X.min(0)) and all(X[i] != X.max(0))][:3]
    y_missing = y.copy()
    y_missing[inner] = np.nan
    keep = np.isfinite(y_missing)
    a = DerivativeGPRegressor(maxiter=60).fit(X, y_missing)
    b = DerivativeGPRegressor(maxiter=60).fit(X[keep], y[keep])
    assert a.model_.num_observations == keep.sum()
    np.testing.assert_allclose(a.predict(grid(4)), b.predict(grid(4)), rtol=1e-6, atol=1e-8)


def test_gradient_only_points():
    X, y, g = data2d(12)
    y_missing = y.copy()
    y_missing[4:] = np.nan
    reg = DerivativeGPRegressor(maxiter=60).fit(X, y_missing, grad=g)
    assert reg.model_.num_observations == 4 + 24
    assert np.isfinite(reg.predict(grid(4))).all()


@pytest.mark.parametrize(
    "kind, match",
    [
        ("X nan", "Input X contains NaN"),
        ("X inf", "Input X contains infinity"),
        ("y inf", "Input y contains infinity"),
        ("grad inf", "Input grad contains infinity"),
        ("all nan", "at least one observed"),
        ("grad shape", r"grad: expected shape \(12, 2\) to match X, got \(12, 3\)"),
        ("y length", "inconsistent numbers of samples"),
    ],
)
def test_bad_input_raises_value_error(kind, match):
    X, y, g = data2d(12)
    grad = None
    if kind == "X nan":
        X[3, 1] = np.nan
    elif kind == "X inf":
        X[3, 1] = np.inf
    elif kind == "y inf":
        y[2] = -np.inf
    elif kind == "grad inf":
        grad = g.copy()
        grad[0, 0] = np.inf
    elif kind == "all nan":
        y[:] = np.nan
    elif kind == "grad shape":
        grad = np.zeros((12, 3))
    elif kind == "y length":
        y = y[:-1]
    with pytest.raises(ValueError, match=match):
        DerivativeGPRegressor(maxiter=5).fit(X, y, grad=grad)


# ---------------------------------------------------------------------- fitted state
def test_not_fitted_error():
    reg = DerivativeGPRegressor()
    X = grid(2)
    with pytest.raises(NotFittedError):
        reg.predict(X)
    with pytest.raises(NotFittedError):
        reg.predict(X, return_std=True, return_grad=True)
    with pytest.raises(NotFittedError):
        reg.log_marginal_likelihood()


def test_wrong_number_of_features_at_predict():
    X, y, _ = data2d(8)
    reg = DerivativeGPRegressor(maxiter=20).fit(X, y)
    assert reg.n_features_in_ == 2
    with pytest.raises(ValueError, match="X has 3 features, but DerivativeGPRegressor is expecting 2 features"):
        reg.predict(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="Input X contains NaN"):
        reg.predict(np.array([[0.5, np.nan]]))


# ---------------------------------------------------------------------- composition
def test_pipeline_with_standard_scaler_value_only():
    """Value-only in a pipeline: the model scales X to the unit box itself, so a scaler changes nothing."""
    X, y, _ = data2d(20)
    X = X * [10.0, 0.1] + [5.0, -1.0]
    Xt = grid(5) * [10.0, 0.1] + [5.0, -1.0]
    pipe = make_pipeline(StandardScaler(), DerivativeGPRegressor()).fit(X, y)
    alone = DerivativeGPRegressor().fit(X, y)
    assert pipe.score(Xt, f2((Xt - [5.0, -1.0]) / [10.0, 0.1])) > 0.95
    np.testing.assert_allclose(pipe.predict(Xt), alone.predict(Xt), rtol=1e-5, atol=1e-6)
    # predict's keyword arguments pass through the pipeline
    mean, std = pipe.predict(Xt, return_std=True)
    assert mean.shape == std.shape == (len(Xt),)


def input_warnings(fit) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit()
    return [w for w in record if issubclass(w.category, InputWarning)]


def test_fit_with_grad_behind_a_scaler_warns_once_at_the_users_call():
    """Gradients routed through a Pipeline are not rescaled with X: fit warns, naming the step."""
    X, y, g = data2d(10)
    pipe = make_pipeline(StandardScaler(), DerivativeGPRegressor(maxiter=5))
    found = input_warnings(lambda: pipe.fit(X, y, derivativegpregressor__grad=g))
    assert len(found) == 1
    message = str(found[0].message)
    assert "'standardscaler'" in message and "unscaled inputs" in message and "grad * s" in message
    assert found[0].filename == __file__  # the line of pipe.fit, not scikit-learn's code
    # Nested pipelines: the outer step is found through the inner pipeline's final step.
    inner = Pipeline([("nothing", "passthrough"), ("reg", DerivativeGPRegressor(maxiter=5))])
    outer = Pipeline([("scale", StandardScaler()), ("model", inner)])
    found = input_warnings(lambda: outer.fit(X, y, model__reg__grad=g))
    assert len(found) == 1 and "'scale'" in str(found[0].message) and "nothing" not in str(found[0].message)
    # Cross-validation of the pipeline fits it per fold, each warning.
    found = input_warnings(lambda: cross_val_score(pipe, X, y, cv=2, params={"derivativegpregressor__grad": g}))
    assert len(found) == 2


def test_no_pipeline_warning_without_grad_or_without_a_transform():
    X, y, g = data2d(10)
    assert input_warnings(lambda: make_pipeline(StandardScaler(), DerivativeGPRegressor(maxiter=5)).fit(X, y)) == []
    assert input_warnings(lambda: DerivativeGPRegressor(maxiter=5).fit(X, y, grad=g)) == []
    plain = Pipeline([("skip", None), ("same", "passthrough"), ("reg", DerivativeGPRegressor(maxiter=5))])
    assert input_warnings(lambda: plain.fit(X, y, reg__grad=g)) == []
    # A pipeline fitted earlier does not make a later direct fit of its regressor warn.
    reg = DerivativeGPRegressor(maxiter=5)
    make_pipeline(StandardScaler(), reg).fit(X, y)
    assert input_warnings(lambda: reg.fit(X, y, grad=g)) == []


def test_check_pipeline_names_the_transforming_steps():
    scaled = make_pipeline(StandardScaler(), "passthrough", DerivativeGPRegressor())
    with pytest.warns(InputWarning, match="'standardscaler'"):
        assert gsk.check_pipeline(scaled) == ["standardscaler"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gsk.check_pipeline(make_pipeline(DerivativeGPRegressor())) == []
    with pytest.raises(TypeError, match="pipeline: expected a sklearn Pipeline whose final step is a DerivativeGPReg"):
        gsk.check_pipeline(make_pipeline(StandardScaler()))
    with pytest.raises(TypeError, match="got DerivativeGPRegressor ending in DerivativeGPRegressor"):
        gsk.check_pipeline(DerivativeGPRegressor())


def test_cross_validation_routes_grad_per_fold():
    X, y, g = data2d(15)
    scores = cross_val_score(DerivativeGPRegressor(maxiter=40), X, y, cv=3, params={"grad": g})
    assert scores.shape == (3,) and np.isfinite(scores).all()


# ---------------------------------------------------------------------- module
def test_docstring_example():
    result = doctest.testmod(gsk, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_clear_import_error_without_sklearn(monkeypatch):
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: the import fails
    monkeypatch.delitem(sys.modules, "gpderiv.sklearn")
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        importlib.import_module("gpderiv.sklearn")


def test_predict_return_cov_matches_return_std_and_excludes_it():
    X, y, grad = data2d()
    reg = DerivativeGPRegressor(maxiter=30).fit(X, y, grad=grad)
    Xs = grid(4)
    mean, std = reg.predict(Xs, return_std=True)
    mean_c, cov, g = reg.predict(Xs, return_cov=True, return_grad=True)
    np.testing.assert_allclose(mean_c, mean)
    assert cov.shape == (16, 16) and np.allclose(cov, cov.T)
    # Variances are differences of order-1 prior variances: equal up to rounding on that scale.
    np.testing.assert_allclose(np.diag(cov), std**2, rtol=0, atol=1e-10 * y.var())
    assert g.shape == (16, 2)
    with pytest.raises(ValueError, match="return_std, return_cov: expected at most one of them"):
        reg.predict(Xs, return_std=True, return_cov=True)


def test_sample_y_draws_from_the_posterior_reproducibly():
    X, y, grad = data2d()
    reg = DerivativeGPRegressor(maxiter=30).fit(X, y, grad=grad)
    Xs = grid(3)
    draws = reg.sample_y(Xs, n_samples=4000, random_state=1)
    assert draws.shape == (9, 4000)
    np.testing.assert_array_equal(draws, reg.sample_y(Xs, n_samples=4000, random_state=1))
    mean, cov = reg.predict(Xs, return_cov=True)
    std = np.sqrt(np.diag(cov))
    assert np.all(np.abs(draws.mean(1) - mean) < 5 * std / np.sqrt(4000) + 1e-12)  # 5 standard errors
    np.testing.assert_allclose(draws.std(1), std, rtol=0.1, atol=1e-9)
    assert reg.sample_y(Xs).shape == (9, 1)
    with pytest.raises(ValueError, match="n_samples: expected a positive integer, got 0"):
        reg.sample_y(Xs, n_samples=0)


def test_calibration_options_reach_the_model() -> None:
    X = np.linspace(0, 3, 8).reshape(-1, 1)
    plain = DerivativeGPRegressor(hyperparameter_uncertainty=False).fit(X, np.sin(X[:, 0]))
    assert not list(plain.model_.named_priors()) and not plain.model_._hyperparameters.applies(plain.model_)
    default = DerivativeGPRegressor().fit(X, np.sin(X[:, 0]))
    assert not list(default.model_.named_priors()) and default.model_._hyperparameters.applies(default.model_)
    prior = DerivativeGPRegressor(noise_prior=True).fit(X, np.sin(X[:, 0]))
    assert list(prior.model_.named_priors())
