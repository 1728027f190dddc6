"""Reliability catalogue: hostile and degenerate inputs through every public entry point.

Each test is one case of the catalogue in docs/reliability.md (the table gives the case number, the
entry point, the expected behaviour and the test name). A case ends either in a typed error whose
message names the argument (or file, row and column) and says what was expected, or in a documented
recovery that is warned about: never a silent NaN, never a traceback from deep inside torch.

Entry points: the model (:class:`gpderiv.DerivativeGP`), the scikit-learn estimator
(:class:`gpderiv.sklearn.DerivativeGPRegressor`) and the command line (:func:`gpderiv.cli.main`).

tests/test_inputs.py checks many argument errors of the model line by line; this module does not
repeat it but covers each behaviour once per entry point and adds the cases listed in the issue.
Fits are tiny (maxiter <= 10).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import resource
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from linear_operator.utils.errors import NotPSDError
from sklearn.exceptions import NotFittedError
from torch import Tensor

from gpderiv import DerivativeGP
from gpderiv.cli import main
from gpderiv.exceptions import CholeskyError, InputWarning, JitterWarning, ProblemTooLargeError
from gpderiv.inference import available_memory
from gpderiv.sklearn import DerivativeGPRegressor
from gpderiv.testing import contains_all, names

DTYPE = torch.float64
MAXITER = 5


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def data(n: int = 6, d: int = 2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``X`` in the unit box, ``y = sum sin(X)`` and its gradient ``cos(X)``."""
    X = torch.rand(n, d, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    return X, torch.sin(X).sum(-1), torch.cos(X)


def assert_finite(pred, m: int, d: int, dtype: torch.dtype = DTYPE) -> None:
    """Shapes, dtype, no NaN/Inf, variances >= 0."""
    assert pred.mean.shape == (m,) and pred.grad_mean.shape == (m, d)
    for t in (pred.mean, pred.variance, pred.grad_mean, pred.grad_variance):
        assert t.dtype == dtype
        assert torch.isfinite(t).all(), t
    assert (pred.variance >= 0).all() and (pred.grad_variance >= 0).all()


def params_of(model: DerivativeGP) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def memory_available() -> int | None:
    return available_memory(torch.device("cpu"))


def too_large_or_skip(n: int, d: int) -> None:
    """Skip when this machine could actually hold the dense N x N float64 matrices."""
    N = n * (1 + d)
    have = memory_available()
    if have is None or 3 * N * N * 8 <= have:
        pytest.skip(f"needs a machine with less than {3 * N * N * 8 / 2**30:.0f} GiB available")


def run_cli(*argv: str) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``gpderiv <argv>`` run in-process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def assert_cli_error(result: tuple[int, str, str], *parts: str) -> None:
    """Exit code 2, nothing on stdout, one line on stderr naming every part, no traceback."""
    code, out, err = result
    assert code == 2, (code, out, err)
    assert out == ""
    assert err.startswith("gpderiv: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for part in parts:
        assert part in err, (part, err)


def no_leftovers(directory: Path, *expected: str) -> None:
    """Only the expected files are in ``directory`` (no output, no temporary file)."""
    assert sorted(os.listdir(directory)) == sorted(expected)


FIT_ARGS = ["--x", "x1,x2", "--y", "f", "--grad", "g1,g2", "--maxiter", "3"]
HEADER = "x1,x2,f,g1,g2\n"


def training_csv(path: Path, n: int = 8) -> None:
    X, y, g = data(n, 2)
    rows = [",".join(repr(float(v)) for v in (*X[i], y[i], *g[i])) for i in range(n)]
    path.write_text(HEADER + "\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory) -> Path:
    """A model saved by ``gpderiv fit`` (with its column-name sidecar)."""
    d = tmp_path_factory.mktemp("cli_model")
    training_csv(d / "train.csv")
    code, _, err = run_cli("fit", str(d / "train.csv"), *FIT_ARGS, "--save", str(d / "model.pt"))
    assert code == 0, err
    return d / "model.pt"


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> tuple[Path, Tensor]:
    """A model saved by :meth:`DerivativeGP.save` and test points."""
    d = tmp_path_factory.mktemp("saved")
    X, y, g = data(6, 2)
    DerivativeGP(X, y, g).fit(maxiter=MAXITER).save(d / "model.pt")
    return d / "model.pt", X[:3]


# ==============================================================================================
# Model (DerivativeGP)
# ==============================================================================================

# ---------------------------------------------------------------- 1. shape mismatches, every argument
X5, Y5, G5 = data(5, 2)
SHAPE_CASES = {
    # id: (constructor kwargs or a predict-time call, argument named, shape parts in the message)
    "y rows": (lambda: DerivativeGP(X5, Y5[:4], G5), "y", ["(5,)", "(4,)"]),
    "grad rows": (lambda: DerivativeGP(X5, Y5, G5[:3]), "grad", ["(5, 2)", "(3, 2)"]),
    "grad columns": (lambda: DerivativeGP(X5, Y5, torch.zeros(5, 3, dtype=DTYPE)), "grad", ["(5, 2)", "(5, 3)"]),
    "X 3-D": (lambda: DerivativeGP(torch.zeros(5, 2, 1, dtype=DTYPE), Y5), "X", ["(n, d)", "(5, 2, 1)"]),
    "directional index 2-D": (
        lambda: DerivativeGP(X5, Y5, directional=([[0, 1]], torch.ones(1, 2, dtype=DTYPE), [1.0])),
        "directional",
        ["(1, 2)"],
    ),
    "directional directions": (
        lambda: DerivativeGP(X5, Y5, directional=([0, 1], torch.ones(2, 3, dtype=DTYPE), [1.0, 2.0])),
        "directional directions",
        ["(2, 2)", "(2, 3)"],
    ),
    "directional values": (
        lambda: DerivativeGP(X5, Y5, directional=([0, 1], torch.ones(2, 2, dtype=DTYPE), [1.0, 2.0, 3.0])),
        "directional values",
        ["(2,)", "(3,)"],
    ),
    "directional index out of range": (
        lambda: DerivativeGP(X5, Y5, directional=([0, 7], torch.ones(2, 2, dtype=DTYPE), [1.0, 2.0])),
        "directional",
        ["[0, 5)", "7"],
    ),
    "hessian": (
        lambda: DerivativeGP(X5, Y5, hessian=torch.zeros(5, 2, 3, dtype=DTYPE)),
        "hessian",
        ["(5, 2, 2)", "(5, 2, 3)"],
    ),
    "grad_noise": (lambda: DerivativeGP(X5, Y5, G5, grad_noise=[0.1, 0.1, 0.1]), "grad_noise", ["2 values"]),
    "noise": (lambda: DerivativeGP(X5, Y5, G5, noise=[0.1, 0.1]), "noise", ["1 values"]),
    "Xs at predict": (lambda: DerivativeGP(X5, Y5, G5).predict(torch.zeros(3, 2, 2, dtype=DTYPE)), "Xs", ["(m, 2)"]),
    "V at predict_directional": (
        lambda: DerivativeGP(X5, Y5, G5).predict_directional(X5[:3], torch.ones(2, 2, dtype=DTYPE)),
        "V",
        ["(3, 2)", "(2, 2)"],
    ),
}


@pytest.mark.parametrize("case", list(SHAPE_CASES))
def test_shape_mismatch_of_every_argument(case):
    call, argument, parts = SHAPE_CASES[case]
    with pytest.raises((ValueError, TypeError), match=contains_all(*parts)) as info:
        call()
    assert re.search(names(argument), str(info.value)), str(info.value)


# ---------------------------------------------------------------- 2. NaN / Inf in X
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_X_is_refused_naming_the_rows(bad):
    X, y, g = data(6, 2)
    X[[1, 4], 0] = bad
    with pytest.raises(ValueError, match=contains_all("X:", "finite", "rows [1, 4]")):
        DerivativeGP(X, y, g)


# ---------------------------------------------------------------- 3. NaN / Inf in Xs (derivative predictions)
@pytest.mark.parametrize("method", ["predict", "predict_hessian", "laplacian", "predict_directional"])
def test_non_finite_Xs_is_refused_by_every_prediction_method(method):
    X, y, g = data(6, 2)
    model = DerivativeGP(X, y, g)
    Xs = X[:3].clone()
    Xs[2, 1] = math.nan
    args = (Xs, torch.tensor([1.0, 0.0], dtype=DTYPE)) if method == "predict_directional" else (Xs,)
    with pytest.raises(ValueError, match=contains_all("Xs:", "finite", "rows [2]")):
        getattr(model, method)(*args)


# ---------------------------------------------------------------- 4. NaN in y / grad = missing data
def test_nan_in_y_and_grad_is_missing_data():
    X, y, g = data(8, 2)
    y[[0, 5]] = math.nan
    g[1] = math.nan
    g[3, 1] = math.nan
    model = DerivativeGP(X, y, g)
    assert model.num_observations == 6 + 13
    model.fit(maxiter=MAXITER)
    assert math.isfinite(model.mll)
    pred = model.predict(X)
    assert_finite(pred, 8, 2)
    # The missing values are predicted from the rest (not taken as 0 or NaN).
    torch.testing.assert_close(pred.mean[[0, 5]], torch.sin(X[[0, 5]]).sum(-1), atol=0.1, rtol=0)


def test_infinite_y_is_not_missing_data():
    X, y, g = data(6, 2)
    y[2] = math.inf
    with pytest.raises(ValueError, match=contains_all("y:", "finite", "NaN (= not observed)", "Inf")):
        DerivativeGP(X, y, g)


# ---------------------------------------------------------------- 5. nothing observed
def test_nothing_observed():
    X, _, _ = data(6, 2)
    nan_y, nan_g = torch.full((6,), math.nan, dtype=DTYPE), torch.full((6, 2), math.nan, dtype=DTYPE)
    with pytest.raises(ValueError, match=contains_all("y, grad", "at least one observed")):
        DerivativeGP(X, nan_y, nan_g)
    # Directional derivatives that are all NaN do not count either.
    with pytest.raises(ValueError, match="at least one observed"):
        DerivativeGP(X, nan_y, directional=([0], torch.ones(1, 2, dtype=DTYPE), [math.nan]))


# ---------------------------------------------------------------- 6. n = 0
@pytest.mark.parametrize("kind", ["tensor", "numpy", "list"])
def test_no_points(kind):
    X, y = torch.empty(0, 2, dtype=DTYPE), torch.empty(0, dtype=DTYPE)
    if kind != "tensor":
        X, y = X.numpy(), y.numpy()
    if kind == "list":
        X, y = [], []
    with pytest.raises(ValueError, match=contains_all("X:", "n >= 1")):
        DerivativeGP(X, y)


# ---------------------------------------------------------------- 7. n = 1
@pytest.mark.parametrize("with_grad", [True, False], ids=["value+grad", "value only"])
def test_a_single_point(with_grad):
    X = torch.tensor([[0.3, 0.7]], dtype=DTYPE)
    y = torch.tensor([1.5], dtype=DTYPE)
    g = torch.tensor([[2.0, -1.0]], dtype=DTYPE) if with_grad else None
    model = DerivativeGP(X, y, g).fit(maxiter=MAXITER)
    assert math.isfinite(model.mll)
    pred = model.predict(torch.tensor([[0.3, 0.7], [0.4, 0.6], [5.0, -5.0]], dtype=DTYPE))
    assert_finite(pred, 3, 2)
    torch.testing.assert_close(pred.mean[0], y[0], atol=1e-3, rtol=0)
    if with_grad:
        torch.testing.assert_close(pred.grad_mean[0], g[0], atol=0.05, rtol=0)


# ---------------------------------------------------------------- 8. d = 1
def test_one_dimension_with_one_dimensional_arrays():
    x = np.linspace(0.0, 2.0, 7)
    model = DerivativeGP(x, np.sin(x), np.cos(x)).fit(maxiter=MAXITER)  # X (n,), grad (n,)
    assert (model.n, model.d, model.num_observations) == (7, 1, 14)
    pred = model.predict(np.array([0.5, 1.5]))  # Xs (m,) as well
    assert_finite(pred, 2, 1)
    torch.testing.assert_close(pred.mean, torch.sin(torch.tensor([0.5, 1.5], dtype=DTYPE)), atol=1e-3, rtol=0)


# ---------------------------------------------------------------- 9. d mismatch at predict
@pytest.mark.parametrize("method", ["predict", "predict_hessian", "laplacian", "predict_directional", "posterior"])
def test_dimension_mismatch_at_predict(method):
    X, y, g = data(6, 2)
    model = DerivativeGP(X, y, g)
    Xs = torch.rand(4, 3, dtype=DTYPE)
    args = (Xs, torch.tensor([1.0, 0.0], dtype=DTYPE)) if method == "predict_directional" else (Xs,)
    with pytest.raises(ValueError, match=contains_all("Xs:", "(m, 2)", "(4, 3)")):
        getattr(model, method)(*args)


# ---------------------------------------------------------------- 10. lists, numpy, ints
@pytest.mark.parametrize("kind", ["list", "numpy", "int numpy", "int tensor"])
def test_lists_numpy_and_integers_become_float64(kind):
    X, y, g = data(6, 2)
    convert = {
        "list": lambda t: t.tolist(),
        "numpy": lambda t: t.numpy(),
        "int numpy": lambda t: (10 * t).round().numpy().astype(np.int64),
        "int tensor": lambda t: (10 * t).round().to(torch.int64),
    }[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)  # float64 conversion is silent
        model = DerivativeGP(convert(X), convert(y), convert(g)).fit(maxiter=MAXITER)
        pred = model.predict(convert(X[:3]))
    assert model.train_X.dtype == DTYPE
    assert_finite(pred, 3, 2)


# ---------------------------------------------------------------- 11. float32 (warns, works)
def test_float32_warns_and_works():
    X, y, g = (t.float() for t in data(6, 2))
    with pytest.warns(InputWarning, match=contains_all("X:", "float32", "float64 is recommended")):
        model = DerivativeGP(X, y, g)
    model.fit(maxiter=MAXITER)
    pred = model.predict(X[:3])
    assert_finite(pred, 3, 2, dtype=torch.float32)
    torch.testing.assert_close(pred.mean, y[:3], atol=1e-2, rtol=0)


# ---------------------------------------------------------------- 12. float16 / bfloat16
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_refused_up_front_or_works(dtype):
    X, y, g = (t.to(dtype) for t in data(6, 2))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InputWarning)
            model = DerivativeGP(X, y, g)
            pred = model.fit(maxiter=MAXITER).predict(X[:2])
    except (TypeError, ValueError) as exc:
        assert re.search(names("X"), str(exc)) and str(dtype).split(".")[-1] in str(exc), str(exc)
    else:
        assert torch.isfinite(pred.mean).all() and torch.isfinite(pred.variance).all()


# ---------------------------------------------------------------- 13-15. exact duplicate points
def _duplicated(conflicting: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Three distinct 1-D points, each three times; with conflicting values the repeats differ by +-0.5."""
    base = torch.tensor([[0.1], [0.5], [0.9]], dtype=DTYPE)
    X = base.repeat(3, 1)
    y = torch.sin(3 * X[:, 0])
    if conflicting:
        y = y + torch.tensor([0.5] * 3 + [-0.5] * 3 + [0.0] * 3, dtype=DTYPE)
    return base, X, y, 3 * torch.cos(3 * X)


def test_exact_duplicates_with_consistent_data_and_learned_noise():
    base, X, y, g = _duplicated(conflicting=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", JitterWarning)  # learned noise keeps the system regular
        model = DerivativeGP(X, y, g).fit(maxiter=10)
        pred = model.predict(torch.cat([base, torch.tensor([[0.3], [0.7]], dtype=DTYPE)]))
    assert_finite(pred, 5, 1)
    truth = torch.sin(3 * torch.tensor([0.1, 0.5, 0.9, 0.3, 0.7], dtype=DTYPE))
    torch.testing.assert_close(pred.mean, truth, atol=1e-2, rtol=0)


def test_exact_duplicates_with_conflicting_data_raise_the_learned_noise():
    base, X, y, g = _duplicated(conflicting=True)
    model = DerivativeGP(X, y, g)
    noise_before = model.hyperparameters()["noise"].item()
    model.fit(maxiter=10)
    noise_after = model.hyperparameters()["noise"].item()
    assert noise_after > 10 * noise_before and noise_after > 0.01  # the conflict (+-0.5) is noise
    pred = model.predict(base)
    assert_finite(pred, 3, 1)
    assert (pred.mean - torch.sin(3 * base[:, 0])).abs().max() < 0.5  # between the conflicting values


@pytest.mark.filterwarnings("ignore::gpderiv.NotFittedWarning")  # initial hyperparameters on purpose
def test_exact_duplicates_with_known_zero_noise_are_rescued_by_jitter():
    base, X, y, g = _duplicated(conflicting=False)
    model = DerivativeGP(X, y, g, noise=0.0, grad_noise=0.0)
    with pytest.warns(JitterWarning, match=contains_all("18 x 18", "not numerically positive definite", "jitter")):
        pred = model.predict(base)
    assert model.factor().jitter > 0
    assert_finite(pred, 3, 1)
    torch.testing.assert_close(pred.mean, torch.sin(3 * base[:, 0]), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- 16. points 1e-12 apart
@pytest.mark.filterwarnings("ignore::gpderiv.NotFittedWarning")  # initial hyperparameters on purpose
@pytest.mark.parametrize("noise", [None, 0.0], ids=["learned noise", "zero noise"])
def test_points_1e_12_apart_with_gradients(noise):
    X = torch.tensor([[0.1, 0.2], [0.1 + 1e-12, 0.2], [0.5, 0.7], [0.9, 0.3], [0.4, 0.1]], dtype=DTYPE)
    y, g = torch.sin(X).sum(-1), torch.cos(X)
    kwargs = {} if noise is None else {"noise": noise, "grad_noise": noise}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", JitterWarning)  # allowed: the system is singular to rounding
        model = DerivativeGP(X, y, g, **kwargs)
        if noise is None:
            model.fit(maxiter=10)
        Xs = torch.cat([X[:2], torch.rand(4, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(1))])
        pred = model.predict(Xs)
    assert_finite(pred, 6, 2)
    torch.testing.assert_close(pred.mean[:2], y[:2], atol=1e-3, rtol=0)


# ---------------------------------------------------------------- 17. inputs / values on scales 1e6 and 1e-6
def _truth(U: Tensor) -> tuple[Tensor, Tensor]:
    f = torch.sin(3 * U[:, 0]) + torch.cos(2 * U[:, 1])
    return f, torch.stack([3 * torch.cos(3 * U[:, 0]), -2 * torch.sin(2 * U[:, 1])], -1)


@pytest.mark.parametrize(
    ("x_scale", "y_scale"),
    [((1e6, 1e6), 1.0), ((1e-6, 1e-6), 1.0), ((1e6, 1e-6), 1.0), ((1.0, 1.0), 1e6), ((1.0, 1.0), 1e-6)],
    ids=["X 1e6", "X 1e-6", "X 1e6 and 1e-6 per dimension", "y 1e6", "y 1e-6"],
)
def test_scales_1e6_and_1e_minus_6_are_accurate_in_user_units(x_scale, y_scale):
    gen = torch.Generator().manual_seed(1)
    U = torch.rand(15, 2, dtype=DTYPE, generator=gen)
    Us = 0.1 + 0.8 * torch.rand(10, 2, dtype=DTYPE, generator=gen)
    f, g = _truth(U)
    f_s, g_s = _truth(Us)
    s = torch.tensor(x_scale, dtype=DTYPE)
    model = DerivativeGP(U * s, y_scale * f, y_scale * g / s).fit(maxiter=10)
    pred = model.predict(Us * s)
    assert torch.isfinite(pred.variance).all() and (pred.variance >= 0).all()
    # In user units: values scale with y, gradients with y / x.
    assert (pred.mean / y_scale - f_s).abs().max() < 1e-2
    assert (pred.grad_mean * s / y_scale - g_s).abs().max() < 5e-2
    assert (pred.std / y_scale).max() < 0.1


# ---------------------------------------------------------------- 18-19. magnitudes near the float64 limits
@pytest.mark.parametrize(
    "y_scale",
    [
        1e200,
        1e-200,
    ],
)
def test_values_near_the_float64_limits_are_accurate_or_refused(y_scale):
    X, y, g = data(6, 2)
    try:
        model = DerivativeGP(X, y * y_scale, g * y_scale).fit(maxiter=MAXITER)
    except ValueError as exc:
        assert re.search(names("y"), str(exc)), str(exc)
        return
    pred = model.predict(X[:2])
    assert torch.isfinite(pred.mean).all() and math.isfinite(model.mll)
    torch.testing.assert_close(pred.mean / y_scale, y[:2], atol=1e-2, rtol=0)


def test_inputs_whose_range_overflows_are_refused_or_finite():
    X = torch.tensor([[-1e308], [0.0], [1e308]], dtype=DTYPE)
    y = torch.tensor([1.0, 2.0, 3.0], dtype=DTYPE)
    try:
        model = DerivativeGP(X, y).fit(maxiter=3)
    except ValueError as exc:
        assert re.search(names("X"), str(exc)), str(exc)
        return
    pred = model.predict(torch.tensor([[0.5]], dtype=DTYPE))
    assert torch.isfinite(pred.mean).all() and torch.isfinite(pred.variance).all()


# ---------------------------------------------------------------- 20. constant y
@pytest.mark.parametrize("with_grad", [False, True], ids=["values only", "with zero gradients"])
def test_constant_y(with_grad):
    X, _, _ = data(6, 2)
    y = torch.full((6,), 3.0, dtype=DTYPE)
    g = torch.zeros(6, 2, dtype=DTYPE) if with_grad else None
    model = DerivativeGP(X, y, g).fit(maxiter=10)
    assert math.isfinite(model.mll)
    pred = model.predict(torch.rand(4, 2, dtype=DTYPE))
    assert_finite(pred, 4, 2)
    torch.testing.assert_close(pred.mean, torch.full((4,), 3.0, dtype=DTYPE), atol=1e-6, rtol=0)
    torch.testing.assert_close(pred.grad_mean, torch.zeros(4, 2, dtype=DTYPE), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- 21. all-zero gradients
def test_all_zero_gradients_only():
    X, _, _ = data(6, 2)
    model = DerivativeGP(X, torch.full((6,), math.nan, dtype=DTYPE), torch.zeros(6, 2, dtype=DTYPE))
    model.fit(maxiter=10)
    assert math.isfinite(model.mll)
    pred = model.predict(torch.rand(4, 2, dtype=DTYPE))
    assert_finite(pred, 4, 2)
    torch.testing.assert_close(pred.grad_mean, torch.zeros(4, 2, dtype=DTYPE), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- 22-23. ill-conditioned systems
def _dense_1d_float32(n: int, lengthscale: float) -> DerivativeGP:
    """n points on [0, 1] with values and gradients, zero known noise, in float32: numerically singular."""
    x = torch.linspace(0, 1, n, dtype=DTYPE).unsqueeze(-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)
        model = DerivativeGP(
            x.float(), torch.sin(3 * x[:, 0]).float(), (3 * torch.cos(3 * x)).float(), noise=0.0, grad_noise=0.0
        )
    model.covar_module.base_kernel.lengthscale = lengthscale
    model.fitted = True  # hyperparameters set by hand: no NotFittedWarning
    return model


def test_ill_conditioned_system_escalates_jitter_with_a_warning():
    model = _dense_1d_float32(60, 2.0)
    with pytest.warns(JitterWarning, match=contains_all("120 x 120", "not numerically positive definite")) as record:
        pred = model.predict(torch.tensor([[0.25], [0.75]]))
    message = str(record[0].message)
    relative = float(re.search(r"\(([0-9.e+-]+) x mean diagonal\)", message).group(1))
    assert relative > 1e-10, message  # escalated beyond the first jitter level
    assert_finite(pred, 2, 1, dtype=torch.float32)


def test_ill_conditioned_system_beyond_jitter_fails_with_the_remedy():
    model = _dense_1d_float32(1000, 10.0)
    with pytest.raises(CholeskyError) as info:
        model.predict(torch.tensor([[0.5]]))
    message = str(info.value)
    assert "2000 x 2000" in message and "numerically singular" in message
    assert "noise_lower_bound" in message and "near-duplicate" in message  # what to do
    assert isinstance(info.value, NotPSDError)  # caught by code that catches GPyTorch's error
    with pytest.raises(CholeskyError, match="noise_lower_bound"):
        model.log_marginal_likelihood()


# ---------------------------------------------------------------- 24-27. a fit whose loss turns NaN
def _nan_loss_after(model: DerivativeGP, calls: int, monkeypatch) -> list[tuple[Tensor, float]]:
    """Make ``model.loss`` NaN from call ``calls + 1`` on; returns ``(parameters, loss)`` of every call."""
    original = model.loss
    seen: list[tuple[Tensor, float]] = []

    def loss(*args, **kwargs) -> Tensor:  # whatever the signature of loss
        value = original(*args, **kwargs)
        if len(seen) >= calls:
            value = value * math.nan
        seen.append((params_of(model), value.item()))
        return value

    monkeypatch.setattr(model, "loss", loss)
    return seen


def test_adam_fit_whose_loss_turns_nan_warns_and_ends_finite(monkeypatch):
    X, y, g = data(6, 2)
    model = DerivativeGP(X, y, g, hyperparameter_uncertainty=False)  # counts the optimiser's loss calls only
    seen = _nan_loss_after(model, 3, monkeypatch)
    with pytest.warns(RuntimeWarning, match=contains_all("non-finite", "kept the last point with a finite loss")):
        model.fit(optimizer="adam", maxiter=10)
    assert len(seen) == 4  # stopped at the first NaN
    assert torch.isfinite(params_of(model)).all()
    assert all(torch.isfinite(v).all() for v in model.hyperparameters().values())
    assert math.isfinite(model.mll) and len(model.mll_history) == 3
    assert all(math.isfinite(v) for v in model.mll_history)
    assert_finite(model.predict(X[:2]), 2, 2)


def test_adam_fit_whose_loss_turns_nan_keeps_the_last_finite_point(monkeypatch):
    X, y, g = data(6, 2)
    model = DerivativeGP(X, y, g)
    seen = _nan_loss_after(model, 3, monkeypatch)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        model.fit(optimizer="adam", maxiter=10)
    last_finite = [p for p, loss in seen if math.isfinite(loss)][-1]
    torch.testing.assert_close(params_of(model), last_finite, rtol=0, atol=0)


def test_lbfgs_fit_whose_loss_turns_nan_ends_at_a_finite_point(monkeypatch):
    """L-BFGS-B sees the NaN loss as +inf with a zero gradient: its line search steps back and it stops.

    The fit ends at a point where the loss was finite, with finite hyperparameters and mll.
    """
    X, y, g = data(6, 2)
    model = DerivativeGP(X, y, g)
    seen = _nan_loss_after(model, 3, monkeypatch)
    model.fit(maxiter=10)
    final = params_of(model)
    assert torch.isfinite(final).all()
    assert any(torch.equal(final, p) for p, loss in seen if math.isfinite(loss)), "not a finitely evaluated point"
    assert all(torch.isfinite(v).all() for v in model.hyperparameters().values())
    assert math.isfinite(model.mll)
    assert_finite(model.predict(X[:2]), 2, 2)


def test_lbfgs_fit_whose_loss_turns_nan_warns(monkeypatch):
    X, y, g = data(6, 2)
    model = DerivativeGP(X, y, g)
    _nan_loss_after(model, 3, monkeypatch)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        model.fit(maxiter=10)


def test_lbfgs_fit_whose_loss_turns_nan_keeps_a_finite_history(monkeypatch):
    X, y, g = data(6, 2)
    model = DerivativeGP(X, y, g)
    _nan_loss_after(model, 3, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model.fit(maxiter=10)
    assert all(math.isfinite(v) for v in model.mll_history), model.mll_history


# ---------------------------------------------------------------- 28-29. devices and dtypes of train/test tensors
def test_test_points_on_another_device_are_refused():
    X, y, g = data(6, 2)
    model = DerivativeGP(X, y, g)
    Xs = torch.rand(3, 2, dtype=DTYPE, device="meta")
    for call in (model.predict, model.predict_hessian, model.laplacian):
        with pytest.raises(ValueError, match=contains_all("Xs:", "cpu", "meta")):
            call(Xs)


def test_training_tensors_on_different_devices_are_refused():
    X, y, g = data(6, 2)
    with pytest.raises(ValueError, match=contains_all("y:", "cpu", "meta")):
        DerivativeGP(X, y.to("meta"), g)
    with pytest.raises(ValueError, match=contains_all("grad:", "cpu", "meta")):
        DerivativeGP(X, y, g.to("meta"))


@pytest.mark.filterwarnings("ignore::gpderiv.NotFittedWarning")  # initial hyperparameters on purpose
def test_test_points_of_another_dtype_are_converted():
    X, y, g = data(6, 2)
    model = DerivativeGP(X, y, g).fit(maxiter=MAXITER)
    Xs = torch.rand(3, 2, dtype=torch.float32)
    pred = model.predict(Xs)  # float32 on a float64 model: converted to float64
    assert_finite(pred, 3, 2, dtype=DTYPE)
    reference = model.predict(Xs.double())
    torch.testing.assert_close(pred.mean, reference.mean, rtol=0, atol=0)
    torch.testing.assert_close(pred.grad_mean, reference.grad_mean, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)
        model32 = DerivativeGP(X.float(), y.float(), g.float())
    assert_finite(model32.predict(Xs.double()), 3, 2, dtype=torch.float32)  # and float64 on a float32 model


# ---------------------------------------------------------------- 30. dense problem too large for memory
def test_problem_too_large_is_refused_before_allocating():
    n, d = 30000, 5
    too_large_or_skip(n, d)
    X = torch.rand(n, d, dtype=DTYPE)
    y, g = X.sum(-1), torch.ones(n, d, dtype=DTYPE)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ProblemTooLargeError) as info:
        DerivativeGP(X, y, g, inference="dense")
    rss_growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert isinstance(info.value, MemoryError)
    message = str(info.value)
    assert re.search(r"needs about [0-9.]+ GiB", message) and "N = 180000" in message
    assert re.search(r"cpu has [0-9.]+ GiB available", message)
    assert "fewer observations" in message  # what to do
    assert rss_growth_kib < 2**20  # < 1 GiB: no N x N matrix was allocated
    # "auto" takes the approximate variational engine there instead, and says so.
    with pytest.warns(UserWarning, match="approximate 'variational' engine"):
        assert DerivativeGP(X, y, g).inference == "variational"


# ---------------------------------------------------------------- 31-32. corrupt saved model
CORRUPTIONS = {
    "garbage bytes": lambda raw, payload: b"this is not a torch file",
    "empty file": lambda raw, payload: b"",
    "truncated": lambda raw, payload: raw[: len(raw) // 2],
    "not a model": lambda raw, payload: {"weights": [1, 2, 3]},
    "missing state_dict": lambda raw, payload: {k: v for k, v in payload.items() if k != "state_dict"},
    "newer format": lambda raw, payload: {**payload, "version": 99},
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_saved_model_is_refused_naming_the_file(corruption, saved_model, tmp_path):
    path, _ = saved_model
    raw = path.read_bytes()
    content = CORRUPTIONS[corruption](raw, torch.load(path, weights_only=False))
    bad = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        bad.write_bytes(content)
    else:
        torch.save(content, bad)
    with pytest.raises(ValueError, match=contains_all(str(bad), "gpderiv")):
        DerivativeGP.load(bad)


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=contains_all("no such file", "missing.pt")):
        DerivativeGP.load(tmp_path / "missing.pt")


def test_saved_model_with_nan_hyperparameters_is_refused(saved_model, tmp_path):
    path, Xs = saved_model
    payload = torch.load(path, weights_only=False)
    payload["state_dict"]["covar_module.base_kernel.raw_lengthscale"].fill_(math.nan)
    bad = tmp_path / "nan.pt"
    torch.save(payload, bad)
    with pytest.raises(ValueError, match=r"(?i)corrupt|finite|nan"):
        DerivativeGP.load(bad).predict(Xs)


# ==============================================================================================
# scikit-learn estimator (DerivativeGPRegressor)
# ==============================================================================================


def _xy(n: int = 6, d: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    X, y, g = data(n, d)
    return X.numpy(), y.numpy(), g.numpy()


@pytest.fixture(scope="module")
def fitted_estimator() -> DerivativeGPRegressor:
    X, y, g = _xy()
    return DerivativeGPRegressor(maxiter=MAXITER).fit(X, y, grad=g)


def test_estimator_wrong_number_of_features_at_predict(fitted_estimator):
    with pytest.raises(ValueError, match=contains_all("3 features", "expecting 2")):
        fitted_estimator.predict(np.zeros((2, 3)))


@pytest.mark.parametrize("where", ["fit", "predict"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_estimator_non_finite_X(where, bad, fitted_estimator):
    X, y, g = _xy()
    X[2, 1] = bad
    word = "NaN" if np.isnan(bad) else "infinity"
    with pytest.raises(ValueError, match=contains_all("X", word)):
        if where == "fit":
            DerivativeGPRegressor(maxiter=MAXITER).fit(X, y, grad=g)
        else:
            fitted_estimator.predict(X)


def test_estimator_fit_on_an_empty_array():
    with pytest.raises(ValueError, match=contains_all("0 sample(s)", "minimum of 1")):
        DerivativeGPRegressor(maxiter=MAXITER).fit(np.empty((0, 2)), np.empty(0))


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("y rows", "inconsistent numbers of samples: [6, 4]"),
        ("grad rows", "grad: expected shape (6, 2) to match X, got (4, 2)"),
        ("grad columns", "grad: expected shape (6, 2) to match X, got (6, 1)"),
        ("X 3-D", "dim 3"),
    ],
)
def test_estimator_shape_mismatches(case, match):
    X, y, g = _xy()
    args = {
        "y rows": (X, y[:4], g),
        "grad rows": (X, y, g[:4]),
        "grad columns": (X, y, g[:, :1]),
        "X 3-D": (X[:, :, None], y, None),
    }[case]
    with pytest.raises(ValueError, match=re.escape(match)):
        DerivativeGPRegressor(maxiter=MAXITER).fit(args[0], args[1], grad=args[2])


def test_estimator_nan_is_missing_and_nothing_observed_is_an_error():
    X, y, g = _xy(8)
    y[[1, 3]] = np.nan
    g[0] = np.nan
    reg = DerivativeGPRegressor(maxiter=MAXITER).fit(X, y, grad=g)
    assert reg.model_.num_observations == 6 + 14
    mean, std = reg.predict(X, return_std=True)
    assert np.isfinite(mean).all() and np.isfinite(std).all()
    with pytest.raises(ValueError, match="at least one observed"):
        DerivativeGPRegressor(maxiter=MAXITER).fit(X, np.full(8, np.nan))
    with pytest.raises(ValueError, match=contains_all("y", "infinity")):
        DerivativeGPRegressor(maxiter=MAXITER).fit(X, np.where(np.arange(8) == 2, np.inf, y))


@pytest.mark.parametrize("kind", ["list", "int", "float32"])
def test_estimator_lists_ints_and_float32_are_converted_silently(kind):
    X, y, g = _xy()
    convert = {
        "list": lambda a: a.tolist(),
        "int": lambda a: (10 * a).round().astype(np.int64),
        "float32": lambda a: a.astype(np.float32),
    }[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        reg = DerivativeGPRegressor(maxiter=MAXITER).fit(convert(X), convert(y), grad=convert(g))
        mean, std, grad, grad_std = reg.predict(convert(X), return_std=True, return_grad=True)
    assert mean.dtype == np.float64 and reg.model_.train_X.dtype == DTYPE
    for a in (mean, std, grad, grad_std):
        assert np.isfinite(a).all()


def test_estimator_single_sample_and_not_fitted():
    X, y, g = _xy()
    with pytest.raises(NotFittedError):
        DerivativeGPRegressor().predict(X)
    reg = DerivativeGPRegressor(maxiter=MAXITER).fit(X[:1], y[:1], grad=g[:1])
    assert np.isfinite(reg.predict(X)).all()


def test_estimator_problem_too_large():
    n, d = 30000, 5
    too_large_or_skip(n, d)
    X = np.random.default_rng(0).uniform(size=(n, d))
    with pytest.raises(ProblemTooLargeError, match=contains_all("GiB", "available")):
        DerivativeGPRegressor(inference="dense").fit(X, X.sum(1), grad=np.ones((n, d)))


# ==============================================================================================
# Command line (gpderiv.cli.main)
# ==============================================================================================


@pytest.mark.parametrize(
    ("case", "content", "parts"),
    [
        ("unclosed quote", HEADER + '0.1,0.2,"1,2,3\n', ["row 2", "malformed CSV"]),
        ("too few fields", HEADER + "0.1,0.2,1,2,3\n0.2,0.3,1\n", ["row 3", "column g1", "missing field"]),
        ("too many fields", HEADER + "0.1,0.2,1,2,3,4\n", ["row 2", "6 fields, the header has 5"]),
        ("empty file", "", ["row 1", "empty file"]),
        ("not UTF-8", None, ["not a UTF-8 text file"]),
    ],
)
def test_cli_malformed_csv(case, content, parts, tmp_path):
    path = tmp_path / "data.csv"
    if content is None:
        path.write_bytes(HEADER.encode() + b"0.1,0.2,\xff\xfe,2,3\n")
    else:
        path.write_text(content)
    assert_cli_error(run_cli("fit", str(path), *FIT_ARGS, "--save", str(tmp_path / "m.pt")), str(path), *parts)
    no_leftovers(tmp_path, "data.csv")


def test_cli_missing_column(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("x1,x2,f,g1\n0.1,0.2,1,2\n")
    result = run_cli("fit", str(path), *FIT_ARGS, "--save", str(tmp_path / "m.pt"))
    assert_cli_error(result, str(path), "row 1", "column g2", "no such column", "x1, x2, f, g1")
    no_leftovers(tmp_path, "data.csv")


@pytest.mark.parametrize(
    ("cell_row", "parts"),
    [
        ("abc,0.3,1,2,3", ["row 3", "column x1", "not a number: 'abc'"]),
        ("0.2,0.3,1.2.3,2,3", ["row 3", "column f", "not a number"]),
        ("nan,0.3,1,2,3", ["row 3", "column x1", "not a finite number"]),
        ("0.2,0.3,1,inf,3", ["row 3", "column g1", "not a finite number"]),
        ("0.2,,1,2,3", ["row 3", "column x2", "empty cell"]),
    ],
    ids=["text in X", "text in y", "nan in X", "inf in grad", "empty X"],
)
def test_cli_non_numeric_or_non_finite_cell(cell_row, parts, tmp_path):
    path = tmp_path / "data.csv"
    path.write_text(HEADER + "0.1,0.2,1,2,3\n" + cell_row + "\n")
    assert_cli_error(run_cli("fit", str(path), *FIT_ARGS, "--save", str(tmp_path / "m.pt")), str(path), *parts)
    no_leftovers(tmp_path, "data.csv")


@pytest.mark.parametrize("corruption", ["garbage", "truncated", "empty"])
def test_cli_corrupt_model_file(corruption, cli_model, tmp_path):
    raw = cli_model.read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes({"garbage": b"not a model", "truncated": raw[: len(raw) // 3], "empty": b""}[corruption])
    (tmp_path / "pts.csv").write_text("x1,x2\n0.5,0.5\n")
    out = tmp_path / "pred.csv"
    result = run_cli("predict", str(bad), str(tmp_path / "pts.csv"), "--out", str(out), "--x", "x1,x2")
    assert_cli_error(result, str(bad), "not a readable gpderiv model file")
    no_leftovers(tmp_path, "bad.pt", "pts.csv")


def test_cli_model_file_with_nan_hyperparameters(cli_model, tmp_path):
    payload = torch.load(cli_model, weights_only=False)
    payload["state_dict"]["covar_module.raw_outputscale"].fill_(math.nan)
    bad = tmp_path / "nan.pt"
    torch.save(payload, bad)
    (tmp_path / "pts.csv").write_text("x1,x2\n0.5,0.5\n")
    out = tmp_path / "pred.csv"
    result = run_cli("predict", str(bad), str(tmp_path / "pts.csv"), "--out", str(out), "--x", "x1,x2")
    assert_cli_error(result, str(bad))
    assert not out.exists()


def test_cli_dimension_mismatch_at_predict(cli_model, tmp_path):
    (tmp_path / "pts.csv").write_text("x1,x2,x3\n0.5,0.5,0.5\n")
    out = tmp_path / "pred.csv"
    result = run_cli("predict", str(cli_model), str(tmp_path / "pts.csv"), "--out", str(out), "--x", "x1,x2,x3")
    assert_cli_error(result, str(cli_model), "the model has d=2 inputs, got 3 x columns")
    no_leftovers(tmp_path, "pts.csv")


def test_cli_no_data_rows(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text(HEADER + "\n\n")
    assert_cli_error(run_cli("fit", str(path), *FIT_ARGS, "--save", str(tmp_path / "m.pt")), "no data rows")
    no_leftovers(tmp_path, "data.csv")


def test_cli_missing_cells_are_missing_data_and_nothing_observed_is_an_error(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text(HEADER + "0.1,0.2,,2,nan\n0.5,0.6,1.0,NaN,\n0.9,0.3,0.5,0.1,0.2\n")
    code, out, err = run_cli("fit", str(path), *FIT_ARGS, "--save", str(tmp_path / "m.pt"))
    assert code == 0, err
    assert "N=5 observed" in out
    (tmp_path / "none.csv").write_text("x1,f\n0.1,\n0.2,nan\n")
    result = run_cli("fit", str(tmp_path / "none.csv"), "--x", "x1", "--y", "f", "--save", str(tmp_path / "n.pt"))
    assert_cli_error(result, str(tmp_path / "none.csv"), "at least one observed")
    assert not (tmp_path / "n.pt").exists()


def test_cli_duplicate_rows_with_conflicting_values_fit(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("x,f\n0.5,1.0\n0.5,2.0\n0.7,1.0\n0.5,1.5\n")
    code, out, err = run_cli(
        "fit", str(path), "--x", "x", "--y", "f", "--maxiter", "5", "--save", str(tmp_path / "m.pt")
    )
    assert code == 0, err
    (tmp_path / "pts.csv").write_text("x\n0.5\n0.6\n")
    code, _, err = run_cli(
        "predict", str(tmp_path / "m.pt"), str(tmp_path / "pts.csv"), "--out", str(tmp_path / "p.csv")
    )
    assert code == 0, err
    values = np.loadtxt(tmp_path / "p.csv", delimiter=",", skiprows=1)
    assert np.isfinite(values).all()


def test_cli_problem_too_large(tmp_path):
    n, d = 30000, 5
    too_large_or_skip(n, d)
    X = np.random.default_rng(0).uniform(size=(n, d))
    table = np.hstack([X, X.sum(1, keepdims=True), np.cos(X)])
    path = tmp_path / "big.csv"
    np.savetxt(path, table, delimiter=",", header="a,b,c,d,e,f,ga,gb,gc,gd,ge", comments="")
    result = run_cli(
        "fit",
        str(path),
        "--x",
        "a,b,c,d,e",
        "--y",
        "f",
        "--grad",
        "ga,gb,gc,gd,ge",
        "--inference",
        "dense",  # "auto" would take the approximate variational engine
        "--save",
        str(tmp_path / "m.pt"),
    )
    assert_cli_error(result, str(path), "GiB", "available")
    no_leftovers(tmp_path, "big.csv")
