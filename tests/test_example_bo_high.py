"""Smoke test of examples/bo_high_dimensional.py (d = 100, 1 seed, a few evaluations, every method)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("botorch")
matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]


def _load_example():
    path = ROOT / "examples" / "bo_high_dimensional.py"
    spec = importlib.util.spec_from_file_location("_gpderiv_script_bo_high", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_bo_high_dimensional_smoke(tmp_path, capsys):
    module = _load_example()
    out = module.main(["--smoke", "--problems", "levy", "ackley", "--out", str(tmp_path)])
    assert Path(out["png"]).is_file()
    smoke = module.SMOKE
    d, n_init, n_evals = smoke["d"], smoke["n_init"], smoke["n_evals"]
    assert set(out["results"]) == {f"levy{d}", f"ackley{d}"}
    for name in ("levy", "ackley"):
        path = tmp_path / f"bo_high_{name}{d}.json"
        res = json.loads(path.read_text())
        assert (res["problem"], res["d"], res["n_init"], res["n_evals"]) == (name, d, n_init, n_evals)
        assert set(res["runs"]) == set(module.METHODS)
        initial = []
        for method in module.METHODS:
            (run,) = res["runs"][method]
            regret = run["regret"]
            assert len(regret) == n_evals
            assert all(math.isfinite(r) and r >= -1e-9 for r in regret)
            assert all(b <= a for a, b in zip(regret, regret[1:], strict=False)), f"{method}: regret increased"
            assert run["seconds_per_iteration"] > 0
            initial.append(run["initial_values"])
        # One initial design per seed, shared by every method.
        assert all(values == initial[0] for values in initial)
        assert len(initial[0]) == n_init
    table = capsys.readouterr().out
    for method in module.METHODS:
        assert f"| {method} | 1 |" in table
    # --report rebuilds the table and figure from the saved runs alone; a rerun resumes (nothing to do).
    again = module.main(["--report", "--out", str(tmp_path)])
    assert set(again["results"]) == set(out["results"])


def test_trust_region_rules():
    """TuRBO's resizing: halve after the failure tolerance, double after the success tolerance, flag a restart."""
    module = _load_example()
    state = module.TrustRegion(d=200)
    assert state.failure_tolerance == 200 and state.success_tolerance == 10
    state = module.TrustRegion(d=3, success_tolerance=2, failure_tolerance=2)
    state.update(1.0)
    state.update(2.0)  # two successes: doubled
    assert state.length == pytest.approx(1.6) and state.successes == 0
    state.update(2.0)
    state.update(2.0)  # two failures: halved
    assert state.length == pytest.approx(0.8) and state.failures == 0
    for _ in range(2 * 7):
        state.update(0.0)
    assert state.restart


def test_ackley_on_the_turbo_box(tmp_path):
    """The TuRBO tutorial's box [-5, 10]^d: the optimum x = 0 sits at a third of the cube, gradients in cube units."""
    module = _load_example()
    objective = module.Objective("ackley_turbo_box", 5)
    U = torch.full((1, 5), 1.0 / 3.0, dtype=torch.float64)
    assert objective(U).item() == pytest.approx(objective.optimum, abs=1e-12)
    U = torch.rand(3, 5, dtype=torch.float64)
    observed = objective.with_gradient(U)
    X = (-5.0 + 15.0 * U).requires_grad_(True)
    f = module.Ackley(dim=5).evaluate_true(X)
    (g,) = torch.autograd.grad(f.sum(), X)
    assert torch.allclose(observed, -torch.cat([f.detach().unsqueeze(-1), 15.0 * g], -1))
    # The loader keys runs by their recorded problem and ignores files of unknown problems.
    for problem in ("ackley_turbo_box", "ackley", "not_a_problem"):
        res = {"problem": problem, "d": 5, "n_init": 2, "n_evals": 3, "runs": {}}
        (tmp_path / f"bo_high_{problem}5.json").write_text(json.dumps(res))
    assert list(module.load_results(str(tmp_path))) == ["ackley5", "ackley_turbo_box5"]
