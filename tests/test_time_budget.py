"""``fit(time_budget=...)``: the optimiser stops when the budget is spent, keeps what it reached, and says so."""

from __future__ import annotations

import warnings

import pytest
import torch

from gpderiv import DerivativeGP, OptimizationWarning
from gpderiv.cli import main as cli_main
from gpderiv.sklearn import DerivativeGPRegressor

DTYPE = torch.float64


def _data(n: int = 30, d: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, d, dtype=DTYPE, generator=g)
    w = torch.linspace(1.0, 2.0, d, dtype=DTYPE)
    return X, torch.sin(X @ w), torch.cos(X @ w).unsqueeze(-1) * w


def test_a_spent_budget_stops_lbfgs_after_one_iteration_with_a_warning():
    X, y, grad = _data()
    model = DerivativeGP(X, y, grad)
    with pytest.warns(OptimizationWarning, match="time budget was spent after 1 iterations"):
        model.fit(time_budget=1e-9, restarts=2, seed=0)
    assert len(model.mll_history) == 1  # one iteration, and no restart began
    assert model.fitted and torch.isfinite(model.predict(X[:3]).mean).all()
    full = DerivativeGP(X, y, grad).fit()
    assert len(full.mll_history) > 1 and full.mll > model.mll


def test_an_ample_budget_changes_nothing():
    X, y, grad = _data(seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OptimizationWarning)
        budgeted = DerivativeGP(X, y, grad).fit(time_budget=3600)
    free = DerivativeGP(X, y, grad).fit()
    assert budgeted.mll == free.mll and budgeted.mll_history == free.mll_history


def test_the_budget_stops_adam_and_the_variational_warm_start():
    X, y, grad = _data(n=400, seed=2)
    model = DerivativeGP(X, y, grad, inference="variational", inference_options={"num_inducing": 8})
    with pytest.warns(OptimizationWarning, match="time budget"):
        model.fit(time_budget=1e-9, seed=0)
    assert len(model.mll_history) == 1
    assert torch.isfinite(model.predict(X[:3]).variance).all()


@pytest.mark.parametrize(
    ("value", "error"), [(0, ValueError), (-1.0, ValueError), (float("inf"), ValueError), ("5", TypeError)]
)
def test_bad_budgets_are_refused_by_name(value, error):
    X, y, grad = _data()
    with pytest.raises(error, match="time_budget"):
        DerivativeGP(X, y, grad).fit(time_budget=value)


def test_the_estimator_and_the_cli_pass_it_through(tmp_path, capsys):
    X, y, grad = _data(seed=3)
    estimator = DerivativeGPRegressor(time_budget=1e-9)
    assert estimator.get_params()["time_budget"] == 1e-9
    with pytest.warns(OptimizationWarning, match="time budget"):
        estimator.fit(X.numpy(), y.numpy(), grad.numpy())
    assert cli_main(["fit", "data.csv", "--time-budget", "-3"]) == 2
    assert "--time-budget: expected a positive finite number" in capsys.readouterr().err
    path = tmp_path / "data.csv"
    rows = ["x0,x1,y,g0,g1"] + [",".join(f"{v:.17g}" for v in (*x, v, *g)) for x, v, g in zip(X, y, grad, strict=True)]
    path.write_text("\n".join(rows) + "\n")
    command = ["fit", str(path), "--x", "x0,x1", "--y", "y", "--grad", "g0,g1", "--save", str(tmp_path / "m.pt")]
    assert cli_main([*command, "--time-budget", "1e-9"]) == 0
    assert "warning: fit: the time budget was spent after 1 iterations" in capsys.readouterr().err
