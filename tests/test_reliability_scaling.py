"""Reliability, round 2, category 5: overflow and underflow in the internal scaling (cases 150-159).

Extreme but finite data: values near the float64 maximum, tiny and subnormal values, huge
gradients over wide input ranges, known noises far from the data's scale, test points far from
the training inputs. Each case ends in finite results in the user's units or a ``ValueError``
naming the argument and the limit; never a silent NaN or Inf (docs/reliability.md, "Round 2:
scaling extremes and properties").
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import warnings

import numpy as np
import pytest
import torch
from torch import Tensor

from gpderiv import DerivativeGP
from gpderiv.cli import main
from gpderiv.scaling import scale_limits
from gpderiv.sklearn import DerivativeGPRegressor
from gpderiv.testing import names
from gpderiv.testing import sine_data as data

DTYPE = torch.float64
MAXITER = 3


def assert_all_finite(model: DerivativeGP, Xs: Tensor) -> None:
    """Fit, predictions (means, variances, gradients), mll and hyperparameters are finite."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(maxiter=MAXITER)
        pred = model.predict(Xs)
    assert math.isfinite(model.mll) and math.isfinite(model.log_marginal_likelihood())
    for name in ("mean", "variance", "grad_mean", "grad_variance"):
        assert torch.isfinite(getattr(pred, name)).all(), name
    for name, value in model.hyperparameters().items():
        assert torch.isfinite(value).all(), name


def test_scale_limits_are_the_square_roots_of_the_dtype_range_with_a_margin():
    lo, hi = scale_limits(torch.float64)
    assert 1e-151 < lo < 1e-149 and 1e149 < hi < 1e151
    assert math.isfinite(hi * hi * 1e7) and lo * lo / 1e7 > 0


# ---------------------------------------------------------------- 150. values whose spread overflows in variances
@pytest.mark.parametrize("scale", [1e160, 1e200, 1e307], ids=["1e160", "1e200", "1e307"])
def test_values_whose_variance_overflows_are_refused_naming_y(scale):
    X, y, g = data()
    with pytest.raises(ValueError, match=names("y")) as info:
        DerivativeGP(X, y * scale, g * scale)
    assert "overflow" in str(info.value) and "1.3e+150" in str(info.value)


def test_values_at_the_float64_maximum_with_a_spread_are_refused_naming_y():
    X, _, _ = data()
    y = torch.tensor([1.7e308, -1.7e308, 1e308, -1e308, 0.0, 5e307], dtype=DTYPE)
    with pytest.raises(ValueError, match=names("y")):
        DerivativeGP(X, y)
    with pytest.raises(ValueError, match=names("y")):
        DerivativeGP(X, 1e308 + torch.sin(X[:, 0]) * 1e307)


# ---------------------------------------------------------------- 151. values whose variance underflows
@pytest.mark.parametrize("scale", [1e-200, 1e-300, 1e-310], ids=["1e-200", "1e-300", "subnormal 1e-310"])
def test_values_whose_variance_underflows_are_refused_naming_y(scale):
    X, y, _ = data()
    with pytest.raises(ValueError, match=names("y")) as info:
        DerivativeGP(X, y * scale, noise=1e-10 * scale)
    assert "underflow" in str(info.value)


# ---------------------------------------------------------------- 152. neighbours inside the limits
@pytest.mark.parametrize("scale", [1e140, 1e-140], ids=["1e140", "1e-140"])
def test_values_just_inside_the_limits_are_accurate_and_finite(scale):
    X, y, g = data()
    model = DerivativeGP(X, y * scale, g * scale)
    assert_all_finite(model, X[:2])
    torch.testing.assert_close(model.predict(X[:2]).mean / scale, y[:2], atol=1e-2, rtol=0)


# ---------------------------------------------------------------- 153. constant values near the float64 maximum
@pytest.mark.parametrize("value", [1e308, 1.7e308], ids=["1e308", "1.7e308"])
@pytest.mark.parametrize("with_grad", [False, True], ids=["values only", "with gradients"])
def test_constant_values_near_the_float64_maximum_are_exact(value, with_grad):
    X, _, g = data()
    y = torch.full((6,), value, dtype=DTYPE)  # their sum overflows: the mean is computed on y / max|y|
    model = DerivativeGP(X, y, g if with_grad else None)
    assert model.scaling.y_offset.item() == value
    assert_all_finite(model, X[:2])
    torch.testing.assert_close(model.predict(X[:2]).mean, y[:2], rtol=1e-6, atol=0)


# ---------------------------------------------------------------- 154. gradients only, whose scale overflows
def test_gradients_only_whose_scale_overflows_are_refused_naming_grad():
    X, _, g = data()
    y = torch.full((6,), math.nan, dtype=DTYPE)
    with pytest.raises(ValueError, match=names("grad")) as info:
        DerivativeGP(X * 1e10, y, g * 1e300)  # RMS of grad x range = 1e310
    assert "overflow" in str(info.value)
    # Neighbour: gradients of 1e300 over a unit range (RMS representable, its square not).
    with pytest.raises(ValueError, match=names("grad")):
        DerivativeGP(X, y, g * 1e300)
    # Neighbour: gradients of 1e100 only: the scale is 1e100, inside the limits.
    assert_all_finite(DerivativeGP(X, y, g * 1e100), X[:2])


# ---------------------------------------------------------------- 155. gradients inconsistent with the values' scale
def test_gradients_that_overflow_in_internal_units_are_refused_naming_grad():
    X, y, g = data()
    with pytest.raises(ValueError, match=names("grad")) as info:
        DerivativeGP(X * 1e10, y, g * 1e300)  # internally 1e300 x 1e10 / std(y)
    assert "1.3e+150" in str(info.value)
    with pytest.raises(ValueError, match=names("grad")):
        DerivativeGP(X, y, g * 1e160)
    with pytest.raises(ValueError, match=names("directional")):
        DerivativeGP(X, y, directional=([0, 1], torch.ones(2, 2, dtype=DTYPE), [1e300, 1.0]))


# ---------------------------------------------------------------- 156. derivative scales that over/underflow
@pytest.mark.parametrize(
    ("x_scale", "g_scale", "word"),
    [(1e-300, 1.0, "overflow"), (1e-300, 1e300, "overflow"), (1e300, 1e-300, "underflow")],
    ids=["range 1e-300", "range 1e-300 with gradients 1e300", "range 1e300 with gradients 1e-300"],
)
def test_input_ranges_whose_derivative_scale_overflows_are_refused_naming_X(x_scale, g_scale, word):
    X, y, g = data()
    with pytest.raises(ValueError, match=names("X")) as info:
        DerivativeGP(X * x_scale, y, g * g_scale)
    assert word in str(info.value) and "column 0" in str(info.value)


def test_input_ranges_inside_the_limits_are_finite():
    X, y, g = data()
    assert_all_finite(DerivativeGP(X * 1e-100, y, g * 1e100), X[:2] * 1e-100)
    assert_all_finite(DerivativeGP(X + 1e300, y, g), X[:2] + 1e300)  # a huge offset, a unit range


# ---------------------------------------------------------------- 157. known noise far above the data's scale
def test_known_noise_that_overflows_in_internal_units_is_refused_naming_it():
    X, y, g = data()
    with pytest.raises(ValueError, match=names("noise")):
        DerivativeGP(X, y * 1e-140, noise=1e300)
    with pytest.raises(ValueError, match=names("grad_noise")):
        DerivativeGP(X * 1e5, y * 1e-140, g * 1e-145, grad_noise=1e300)
    # Neighbour: a large but representable known noise is finite throughout.
    assert_all_finite(DerivativeGP(X, y * 1e-140, noise=1e-200), X[:2])


# ---------------------------------------------------------------- 158. test points far from the training inputs
def test_test_points_whose_offset_overflows_are_refused_naming_xs():
    X = torch.tensor([[0.0, -1.7e308], [1.0, -1.7e308], [0.5, -1.7e308]], dtype=DTYPE)  # column 1 constant
    model = DerivativeGP(X, torch.tensor([0.0, 1.0, 0.5], dtype=DTYPE))
    model.fitted = True
    with pytest.raises(ValueError, match=names("Xs")) as info:
        model.predict(torch.tensor([[0.5, 1.7e308]], dtype=DTYPE))
    assert "overflow" in str(info.value)
    with pytest.raises(ValueError, match=names("Xs")):  # finite offset, but 1e200 input ranges away
        model.predict(torch.tensor([[1e200, -1.7e308]], dtype=DTYPE))
    pred = model.predict(torch.tensor([[1e100, -1.7e308]], dtype=DTYPE))  # neighbour: 1e100 ranges away
    assert torch.isfinite(pred.mean).all() and torch.isfinite(pred.variance).all()


# ---------------------------------------------------------------- 159. the estimator and the command line
def test_estimator_refuses_values_whose_variance_overflows():
    X, y, _ = data()
    with pytest.raises(ValueError, match=names("y")):
        DerivativeGPRegressor(maxiter=MAXITER).fit(X.numpy(), y.numpy() * 1e200)
    reg = DerivativeGPRegressor(maxiter=MAXITER).fit(X.numpy(), y.numpy() * 1e140)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mean, std = reg.predict(X.numpy()[:2], return_std=True)
    assert np.isfinite(mean).all() and np.isfinite(std).all()


def test_cli_refuses_values_whose_variance_overflows(tmp_path):
    X, y, _ = data()
    path = tmp_path / "data.csv"
    rows = [f"{float(X[i, 0])!r},{float(X[i, 1])!r},{float(y[i]) * 1e200!r}" for i in range(6)]
    path.write_text("x1,x2,f\n" + "\n".join(rows) + "\n")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["fit", str(path), "--x", "x1,x2", "--y", "f", "--save", str(tmp_path / "m.pt")])
    assert code == 2 and "Traceback" not in err.getvalue()
    assert re.search(names("y"), err.getvalue()) and "overflow" in err.getvalue(), err.getvalue()
    assert not (tmp_path / "m.pt").exists()


# ---------------------------------------------------------------- 164-165. the BoTorch model's own standardisation


def test_botorch_model_huge_values_are_refused_and_huge_constants_are_exact():
    """Case 164: DerivativeStandardize's moments are overflow-safe; a std beyond the limit names train_Y."""
    botorch = pytest.importorskip("botorch")  # noqa: F841
    from gpderiv.botorch import DerivativeGPModel

    X = torch.rand(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    base = torch.cat([torch.sin(3 * X).sum(-1, keepdim=True), 3 * torch.cos(3 * X)], -1)
    Xs = torch.rand(3, 2, dtype=torch.float64)
    post = DerivativeGPModel(X, base * 1e100).posterior(Xs, output_indices=[0, 1, 2])  # neighbour: inside
    assert torch.isfinite(post.mean).all() and torch.isfinite(post.variance).all()
    for scale in (1e200, 1e307):
        with pytest.raises(ValueError, match="train_Y: expected observed values whose standard deviation is at most"):
            DerivativeGPModel(X, base * scale)
    constant = torch.zeros(8, 3, dtype=torch.float64)
    constant[:, 0] = 1.7e308  # was: the mean's sum overflowed
    post = DerivativeGPModel(X, constant).posterior(Xs)
    assert torch.allclose(post.mean, torch.full_like(post.mean, 1.7e308)) and torch.isfinite(post.variance).all()


def test_botorch_model_gradients_far_beyond_the_values_scale_are_refused():
    """Case 165: model-unit targets (standardised, chain-ruled) beyond the limit name train_Y."""
    pytest.importorskip("botorch")
    from gpderiv.botorch import DerivativeGPModel

    X = torch.rand(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    Y = torch.cat([torch.sin(3 * X).sum(-1, keepdim=True), 1e300 * torch.cos(3 * X)], -1)
    with pytest.raises(ValueError, match="train_Y: expected observations within .* of the prior mean"):
        DerivativeGPModel(X, Y)
