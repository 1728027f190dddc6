"""Input validation of :class:`gpderiv.DerivativeGP`: clear errors for bad input, conversions for good input.

Project rule: bad input raises ``ValueError``/``TypeError`` whose message names the argument and the
expected and received shapes (or types) -- never a silent NaN and never a deep torch traceback --
and recoveries (float32 input, jitter) warn. Everything runs in float64 unless a test is about
dtypes; fits are a few iterations only.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from gpytorch.kernels import RBFKernel, ScaleKernel
from linear_operator.utils.errors import NotPSDError
from torch import Tensor

from gpderiv import DerivativeGP
from gpderiv.exceptions import CholeskyError, InputWarning, JitterWarning
from gpderiv.inference import cholesky_with_jitter
from gpderiv.kernels import DerivativeRBFKernel
from gpderiv.testing import contains_all, names

DTYPE = torch.float64
MAXITER = 5


def data(n: int = 5, d: int = 2, seed: int = 0, dtype: torch.dtype = DTYPE) -> tuple[Tensor, Tensor, Tensor]:
    """``X`` (`n x d`), ``y = sum sin(X)`` and its gradient ``cos(X)``."""
    generator = torch.Generator().manual_seed(seed)
    X = torch.rand(n, d, generator=generator, dtype=DTYPE)
    return X.to(dtype), torch.sin(X).sum(-1).to(dtype), torch.cos(X).to(dtype)


def assert_finite_prediction(pred, m: int, d: int, dtype: torch.dtype = DTYPE) -> None:
    assert pred.mean.shape == (m,) and pred.variance.shape == (m,)
    assert pred.grad_mean.shape == (m, d) and pred.grad_variance.shape == (m, d)
    for t in (pred.mean, pred.variance, pred.grad_mean, pred.grad_variance):
        assert t.dtype == dtype
        assert torch.isfinite(t).all()


# ----------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------


def test_n_mismatch_between_X_and_y():
    X, y, g = data(5, 2)
    with pytest.raises(ValueError, match=contains_all("(5, 2)", "(5,)", "(4,)")) as info:
        DerivativeGP(X, y[:4], g)
    assert re.search(names("y"), str(info.value))


def test_n_mismatch_between_X_and_grad():
    X, y, g = data(5, 2)
    with pytest.raises(ValueError, match=contains_all("grad", "(5, 2)", "(4, 2)")):
        DerivativeGP(X, y, g[:4])


def test_grad_of_the_wrong_width():
    X, y, _ = data(5, 2)
    grad = torch.zeros(5, 3, dtype=DTYPE)
    with pytest.raises(ValueError, match=contains_all("grad", "(5, 2)", "(5, 3)")):
        DerivativeGP(X, y, grad)


def test_y_with_two_columns():
    X, _, _ = data(5, 3)
    y = torch.zeros(5, 2, dtype=DTYPE)
    with pytest.raises(ValueError, match=contains_all("(5,)", "(5, 2)", "(5, 3)")) as info:
        DerivativeGP(X, y)
    assert re.search(names("y"), str(info.value))


def test_X_three_dimensional():
    X = torch.zeros(2, 3, 4, dtype=DTYPE)
    with pytest.raises(ValueError, match=contains_all("X", "(n, d)", "(2, 3, 4)")):
        DerivativeGP(X, torch.zeros(2, dtype=DTYPE))


def test_X_with_zero_rows():
    X = np.empty((0, 2))
    with pytest.raises(ValueError, match=contains_all("X", "(n, d)", "(0, 2)")):
        DerivativeGP(X, np.empty(0))


def test_X_with_zero_columns():
    X = torch.zeros(5, 0, dtype=DTYPE)
    with pytest.raises(ValueError, match=contains_all("X", "(n, d)", "(5, 0)")):
        DerivativeGP(X, torch.zeros(5, dtype=DTYPE))


def test_predict_with_the_wrong_dimension():
    X, y, g = data(5, 2)
    model = DerivativeGP(X, y, g)
    with pytest.raises(ValueError, match=contains_all("Xs", "(m, 2)", "(3, 3)")):
        model.predict(torch.zeros(3, 3, dtype=DTYPE))
    with pytest.raises(ValueError, match=contains_all("Xs", "(m, 2)", "(2,)")):
        model.predict(torch.zeros(2, dtype=DTYPE))  # 1-D Xs is n points only when d == 1


@pytest.mark.filterwarnings("ignore::gpderiv.NotFittedWarning")  # initial hyperparameters on purpose
def test_predict_with_zero_test_points():
    X, y, g = data(5, 2)
    model = DerivativeGP(X, y, g)
    try:
        pred = model.predict(torch.empty(0, 2, dtype=DTYPE))
    except ValueError as exc:  # a clear error naming Xs is acceptable too
        assert re.search(names("Xs"), str(exc)), str(exc)
    else:
        assert pred.mean.shape == (0,) and pred.grad_mean.shape == (0, 2)


# ----------------------------------------------------------------------------------------------
# Non-finite values
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_X(bad):
    X, y, g = data(5, 2)
    X[2, 1] = bad
    with pytest.raises(ValueError, match=names("X")):
        DerivativeGP(X, y, g)


@pytest.mark.parametrize("bad", [math.inf, -math.inf])
def test_infinite_y(bad):
    X, y, g = data(5, 2)
    y[1] = bad
    with pytest.raises(ValueError, match=names("y")):
        DerivativeGP(X, y, g)


@pytest.mark.parametrize("bad", [math.inf, -math.inf])
def test_infinite_grad(bad):
    X, y, g = data(5, 2)
    g[3, 0] = bad
    with pytest.raises(ValueError, match=names("grad")):
        DerivativeGP(X, y, g)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_Xs_at_predict(bad):
    X, y, g = data(5, 2)
    model = DerivativeGP(X, y, g)
    Xs = torch.rand(4, 2, dtype=DTYPE)
    Xs[1, 0] = bad
    with pytest.raises(ValueError, match=names("Xs")):
        model.predict(Xs)


def test_nothing_observed_value_only():
    X, _, _ = data(5, 2)
    with pytest.raises(ValueError, match=names("y")):
        DerivativeGP(X, torch.full((5,), math.nan, dtype=DTYPE))


def test_nothing_observed_values_and_gradients():
    X, _, _ = data(5, 2)
    with pytest.raises(ValueError, match=contains_all("y", "grad")):
        DerivativeGP(X, torch.full((5,), math.nan, dtype=DTYPE), torch.full((5, 2), math.nan, dtype=DTYPE))


# ----------------------------------------------------------------------------------------------
# Unsupported types and options
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["abc", {"x": [1.0, 2.0]}, None], ids=["str", "dict", "None"])
def test_X_of_unsupported_type(bad):
    with pytest.raises(TypeError, match=contains_all(type(bad).__name__)) as info:
        DerivativeGP(bad, [1.0, 2.0])
    assert re.search(names("X"), str(info.value))


@pytest.mark.parametrize("bad", ["abc", None, {"y": 1.0}], ids=["str", "None", "dict"])
def test_y_of_unsupported_type(bad):
    X, _, _ = data(5, 2)
    with pytest.raises(TypeError, match=contains_all(type(bad).__name__)) as info:
        DerivativeGP(X, bad)
    assert re.search(names("y"), str(info.value))


def test_grad_of_unsupported_type():
    X, y, _ = data(5, 2)
    with pytest.raises(TypeError, match=contains_all("grad", "str")):
        DerivativeGP(X, y, "abc")


def test_non_numeric_list_content():
    with pytest.raises(TypeError, match=names("X")):
        DerivativeGP([["a", "b"], ["c", "d"]], [1.0, 2.0])
    with pytest.raises(TypeError, match=names("y")):
        DerivativeGP([[0.0], [1.0]], [1.0, None])  # None is not "missing": NaN is


def test_bool_tensor_X_is_rejected():
    with pytest.raises(TypeError, match=contains_all("X", "bool")):
        DerivativeGP(torch.ones(5, 2, dtype=torch.bool), torch.zeros(5, dtype=DTYPE))


def test_bool_numpy_X_is_rejected_like_a_bool_tensor():
    with pytest.raises(TypeError, match=contains_all("X", "bool")):
        DerivativeGP(np.ones((5, 2), dtype=bool), np.zeros(5))


def test_bool_numpy_y_is_rejected():
    X, _, _ = data(5, 2)
    with pytest.raises(TypeError, match=contains_all("y", "bool")):
        DerivativeGP(X, np.ones(5, dtype=bool))


def test_kernel_not_a_kernel():
    X, y, g = data(5, 2)
    with pytest.raises(TypeError, match=contains_all("kernel", "str")):
        DerivativeGP(X, y, g, kernel="rbf")


def test_kernel_not_derivative_aware():
    X, y, g = data(5, 2)
    with pytest.raises(TypeError, match=contains_all("kernel", "RBFKernel")):
        DerivativeGP(X, y, g, kernel=RBFKernel())
    with pytest.raises(TypeError, match=names("kernel")):
        DerivativeGP(X, y, g, kernel=ScaleKernel(RBFKernel()))


def test_kernel_with_interleaved_layout():
    X, y, g = data(5, 2)
    with pytest.raises(ValueError, match=contains_all("kernel", "block", "interleaved")):
        DerivativeGP(X, y, g, kernel=ScaleKernel(DerivativeRBFKernel(layout="interleaved")))


def test_unknown_inference_engine():
    X, y, g = data(5, 2)
    with pytest.raises(ValueError, match=contains_all("inference", "'foo'", "dense")):
        DerivativeGP(X, y, g, inference="foo")


def test_unknown_optimizer():
    X, y, g = data(5, 2)
    model = DerivativeGP(X, y, g)
    with pytest.raises(ValueError, match=contains_all("optimizer", "'foo'", "lbfgs", "adam")):
        model.fit(optimizer="foo")


def test_negative_restarts():
    X, y, g = data(5, 2)
    with pytest.raises(ValueError, match=contains_all("restarts", "-1")):
        DerivativeGP(X, y, g).fit(restarts=-1, maxiter=MAXITER)


def test_non_integer_restarts():
    X, y, g = data(5, 2)
    with pytest.raises((TypeError, ValueError), match=names("restarts")):
        DerivativeGP(X, y, g).fit(restarts=1.5, maxiter=MAXITER)


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_negative_maxiter(optimizer):
    X, y, g = data(5, 2)
    with pytest.raises(ValueError, match=names("maxiter")):
        DerivativeGP(X, y, g).fit(optimizer=optimizer, maxiter=-1)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"noise": -0.1}, "noise"),
        ({"noise": math.nan}, "noise"),
        ({"noise": math.inf}, "noise"),
        ({"grad_noise": -0.1}, "grad_noise"),
        ({"grad_noise": [0.1, -0.1]}, "grad_noise"),
        ({"grad_noise": [0.1, 0.1, 0.1]}, "grad_noise"),  # d = 2
    ],
)
def test_invalid_known_noise(kwargs, argument):
    X, y, g = data(5, 2)
    with pytest.raises(ValueError, match=names(argument)):
        DerivativeGP(X, y, g, **kwargs)


def test_known_noise_of_unsupported_type():
    X, y, g = data(5, 2)
    with pytest.raises(TypeError, match=names("noise")):
        DerivativeGP(X, y, g, noise="abc")


@pytest.mark.parametrize("bound", [-1.0, math.nan])
def test_invalid_noise_lower_bound(bound):
    X, y, g = data(5, 2)
    with pytest.raises(ValueError, match=names("noise_lower_bound")):
        DerivativeGP(X, y, g, noise_lower_bound=bound)


# ----------------------------------------------------------------------------------------------
# Accepted inputs and conversions
# ----------------------------------------------------------------------------------------------


def test_numpy_arrays():
    X, y, g = data(6, 2)
    model = DerivativeGP(X.numpy(), y.numpy(), g.numpy()).fit(maxiter=MAXITER)
    assert model.train_X.dtype == DTYPE
    assert_finite_prediction(model.predict(X[:3].numpy()), 3, 2)


def test_python_lists():
    X, y, g = data(6, 2)
    model = DerivativeGP(X.tolist(), y.tolist(), g.tolist()).fit(maxiter=MAXITER)
    assert model.train_X.dtype == DTYPE
    assert_finite_prediction(model.predict(X[:3].tolist()), 3, 2)


def test_integer_arrays_become_float64():
    X = np.array([[0, 1], [1, 3], [2, 0], [3, 2], [4, 4]])
    y = [0, 2, 1, 3, 5]
    grad = torch.tensor([[1, 0], [1, 1], [0, 1], [1, 0], [0, 0]])
    model = DerivativeGP(X, y, grad).fit(maxiter=MAXITER)
    assert model.train_X.dtype == DTYPE and model.train_targets.dtype == DTYPE
    assert_finite_prediction(model.predict(np.array([[1, 1], [2, 2]])), 2, 2)
    # Integer tensors are converted the same way.
    model = DerivativeGP(torch.as_tensor(X), torch.tensor(y))
    assert model.train_X.dtype == DTYPE


def test_one_dimensional_X_is_n_points_in_one_dimension():
    X = torch.linspace(0, 3, 6, dtype=DTYPE)
    model = DerivativeGP(X, torch.sin(X), torch.cos(X)).fit(maxiter=MAXITER)  # grad (n,) with d == 1
    assert (model.n, model.d) == (6, 1)
    assert model.num_observations == 12
    pred = model.predict(torch.tensor([0.5, 1.5], dtype=DTYPE))  # 1-D Xs too, as d == 1
    assert_finite_prediction(pred, 2, 1)


@pytest.mark.filterwarnings("ignore::gpderiv.NotFittedWarning")  # initial hyperparameters on purpose
def test_y_as_a_column_and_grad_as_a_vector_in_one_dimension():
    X = torch.linspace(0, 3, 6, dtype=DTYPE).unsqueeze(-1)
    y, g = torch.sin(X), torch.cos(X[:, 0])
    model = DerivativeGP(X, y, g)  # y (n, 1), grad (n,)
    reference = DerivativeGP(X, y[:, 0], g.unsqueeze(-1))
    torch.testing.assert_close(model.train_targets, reference.train_targets)
    assert_finite_prediction(model.predict(X[:2]), 2, 1)


def test_y_as_a_column_in_two_dimensions():
    X, y, g = data(5, 2)
    model = DerivativeGP(X, y.unsqueeze(-1), g)
    assert model.num_observations == 15


def test_float32_tensors_warn_and_predict_in_float32():
    X, y, g = data(6, 2, dtype=torch.float32)
    with pytest.warns(InputWarning, match=contains_all("X", "float32")):
        model = DerivativeGP(X, y, g)
    model.fit(maxiter=MAXITER)
    assert model.train_X.dtype == torch.float32
    assert_finite_prediction(model.predict(X[:3]), 3, 2, dtype=torch.float32)
    # float64 test points follow the (float32) model.
    assert_finite_prediction(model.predict(X[:3].double()), 3, 2, dtype=torch.float32)


def test_float32_Xs_on_a_float64_model_is_converted():
    """Xs is converted to the dtype of the training X (float64 here); the result is float64 and equals
    the prediction at the same points given in float64 (the float32 values are exactly representable)."""
    X, y, g = data(6, 2)
    model = DerivativeGP(X, y, g).fit(maxiter=MAXITER)
    Xs = torch.rand(3, 2, dtype=torch.float32)
    pred = model.predict(Xs)
    assert_finite_prediction(pred, 3, 2, dtype=DTYPE)
    reference = model.predict(Xs.double())
    torch.testing.assert_close(pred.mean, reference.mean)
    torch.testing.assert_close(pred.grad_mean, reference.grad_mean)


def test_nan_means_missing():
    X, y, g = data(8, 2)
    y[[1, 4]] = math.nan
    g[0, 1] = math.nan
    g[3] = math.nan
    g[6, 0] = math.nan
    model = DerivativeGP(X, y, g)
    expected = int((~torch.isnan(y)).sum() + (~torch.isnan(g)).sum())
    assert expected == 6 + 12
    assert model.num_observations == expected
    model.fit(maxiter=MAXITER)
    assert math.isfinite(model.mll)
    assert_finite_prediction(model.predict(X), 8, 2)


def test_grad_all_nan_is_a_value_only_model():
    X, y, _ = data(6, 2)
    model = DerivativeGP(X, y, torch.full((6, 2), math.nan, dtype=DTYPE)).fit(maxiter=MAXITER)
    assert not model.has_grad
    assert model.num_observations == 6
    assert_finite_prediction(model.predict(X[:2]), 2, 2)


def test_gradients_only():
    X, _, g = data(6, 2)
    model = DerivativeGP(X, torch.full((6,), math.nan, dtype=DTYPE), g).fit(maxiter=MAXITER)
    assert model.num_observations == 12
    assert_finite_prediction(model.predict(X[:2]), 2, 2)


def test_known_noise_in_user_units_stays_fixed():
    X, y, g = data(6, 2)
    X = X * torch.tensor([10.0, 0.1], dtype=DTYPE)  # non-unit scales: user units differ from internal ones
    y = 5.0 * y
    model = DerivativeGP(X, y, g, noise=0.01, grad_noise=[0.01, 0.02])
    expected_grad_noise = torch.tensor([0.01, 0.02], dtype=DTYPE)
    for _ in range(2):
        hyper = model.hyperparameters()
        torch.testing.assert_close(hyper["noise"].reshape(()), torch.tensor(0.01, dtype=DTYPE))
        torch.testing.assert_close(hyper["grad_noise"], expected_grad_noise)
        model.fit(maxiter=MAXITER)


@pytest.mark.parametrize("grad_noise", [0.01, [0.01, 0.02]], ids=["scalar", "vector"])
def test_known_grad_noise_with_shared_grad_noise(grad_noise):
    X, y, g = data(6, 2)
    try:
        model = DerivativeGP(X, y, g, grad_noise=grad_noise, shared_grad_noise=True)
    except ValueError as exc:  # refusing a per-dimension known noise with a shared flag is acceptable
        assert not isinstance(grad_noise, float), f"a scalar known grad_noise must be accepted: {exc}"
        assert re.search(names("grad_noise"), str(exc)) or "shared_grad_noise" in str(exc), str(exc)
        return
    expected = torch.as_tensor(grad_noise, dtype=DTYPE).expand(2)
    torch.testing.assert_close(model.hyperparameters()["grad_noise"], expected)


def test_known_noise_tensor_requiring_grad_is_a_constant():
    X, y, g = data(6, 2)
    noise = torch.tensor(0.01, dtype=DTYPE, requires_grad=True)
    model = DerivativeGP(X, y, g, noise=noise).fit(maxiter=MAXITER)
    torch.testing.assert_close(model.hyperparameters()["noise"].reshape(()), torch.tensor(0.01, dtype=DTYPE))


# ----------------------------------------------------------------------------------------------
# Ill-conditioned systems: jitter warns, failure raises CholeskyError with a remedy
# ----------------------------------------------------------------------------------------------


def duplicated_data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Three distinct points, each repeated four times, with consistent values and gradients."""
    base = torch.tensor([[0.1, 0.2], [0.5, 0.9], [0.8, 0.4]], dtype=DTYPE)
    X = base.repeat(4, 1)
    return base, X, torch.sin(X).sum(-1), torch.cos(X)


def test_duplicates_without_noise_work_or_fail_clearly():
    base, X, y, g = duplicated_data()
    model = DerivativeGP(X, y, g, noise=0.0, grad_noise=0.0)
    try:
        with pytest.warns(JitterWarning):
            model.fit(maxiter=MAXITER)
            pred = model.predict(base)
    except CholeskyError as exc:
        assert "noise_lower_bound" in str(exc)
    else:
        assert_finite_prediction(pred, 3, 2)


@pytest.mark.filterwarnings("ignore::gpderiv.NotFittedWarning")  # initial hyperparameters on purpose
def test_exact_duplicates_are_rescued_by_jitter():
    """Exact duplicates give an exactly singular K (a zero pivot): Cholesky fails without jitter, always."""
    base, X, y, g = duplicated_data()
    model = DerivativeGP(X, y, g, noise=0.0, grad_noise=0.0)
    with pytest.warns(JitterWarning, match="jitter"):
        pred = model.predict(base)
    assert model.factor().jitter > 0
    assert_finite_prediction(pred, 3, 2)
    torch.testing.assert_close(pred.mean, torch.sin(base).sum(-1), rtol=1e-4, atol=1e-4)


class _NegatedRBFKernel(DerivativeRBFKernel):
    """Minus the RBF kernel: negative definite, so no jitter can make the covariance factorisable."""

    @staticmethod
    def profile(u: Tensor, order: int = 2) -> tuple[Tensor, ...]:
        return tuple(-t for t in DerivativeRBFKernel.profile(u, order))


@pytest.mark.filterwarnings("ignore::gpderiv.NotFittedWarning")  # initial hyperparameters on purpose
def test_unfactorisable_covariance_raises_cholesky_error_with_a_remedy():
    X, y, g = data(5, 2)
    model = DerivativeGP(X, y, g, kernel=ScaleKernel(_NegatedRBFKernel(ard_num_dims=2)), noise=0.0, grad_noise=0.0)
    with pytest.raises(CholeskyError, match="noise_lower_bound"):
        model.predict(X[:2])
    with pytest.raises(CholeskyError, match="noise_lower_bound"):
        model.fit(maxiter=MAXITER)


def test_cholesky_with_jitter_error_text():
    K = torch.diag(torch.tensor([2.0, 2.0, -1.0], dtype=DTYPE))  # eigenvalue -1; mean diagonal 1
    with pytest.raises(CholeskyError) as info:
        cholesky_with_jitter(K, torch.zeros(3, dtype=DTYPE))
    message = str(info.value)
    assert message.startswith(
        "Cholesky factorisation of the 3 x 3 covariance failed even with jitter 1.0e-05 on the diagonal"
    )
    assert "noise_lower_bound" in message
    assert isinstance(info.value, NotPSDError)  # caught by code that catches GPyTorch's error


def test_cholesky_with_jitter_rescues_a_singular_matrix():
    K = torch.ones(4, 4, dtype=DTYPE)  # PSD, rank 1: the second pivot is exactly zero
    with pytest.warns(JitterWarning, match=contains_all("4 x 4", "jitter")):
        L, jitter = cholesky_with_jitter(K, torch.zeros(4, dtype=DTYPE))
    assert jitter > 0
    torch.testing.assert_close(L @ L.T, K + jitter * torch.eye(4, dtype=DTYPE))


def test_cholesky_with_jitter_no_jitter_needed():
    K = torch.eye(3, dtype=DTYPE)
    L, jitter = cholesky_with_jitter(K, torch.full((3,), 0.5, dtype=DTYPE))
    assert jitter == 0.0
    torch.testing.assert_close(L, math.sqrt(1.5) * torch.eye(3, dtype=DTYPE))


def test_cholesky_with_jitter_zero_matrix():
    with pytest.warns(JitterWarning):
        L, jitter = cholesky_with_jitter(torch.zeros(3, 3, dtype=DTYPE), torch.zeros(3, dtype=DTYPE))
    assert jitter > 0
