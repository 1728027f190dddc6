"""Smoke test of examples/bo_with_gradients.py (1 seed, a handful of evaluations per problem)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("botorch")
matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]


def test_bo_with_gradients_smoke(tmp_path, capsys):
    path = ROOT / "examples" / "bo_with_gradients.py"
    spec = importlib.util.spec_from_file_location("_gpderiv_script_bo", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)

    out = module.main(["--smoke", "--out", str(tmp_path)])
    assert Path(out["png"]).is_file()
    results = out["results"]
    assert set(results) == {"branin", "levy4", "hartmann6"}
    for name, res in results.items():
        n_init, n_evals = module.SMOKE_EVALS[name]
        assert (res["n_init"], res["n_evals"]) == (n_init, n_evals)
        assert (tmp_path / f"bo_{name}.json").is_file()
        for method in module.METHODS:
            (run,) = res["runs"][method]
            regret = run["regret"]
            assert len(regret) == n_evals
            assert all(math.isnan(r) for r in regret[: n_init - 1])
            assert all(math.isfinite(r) and r >= -1e-9 for r in regret[n_init - 1 :])
    table = capsys.readouterr().out
    assert "| d-KG |" in table and "| qLogEI values |" in table and "| qLogEI + grad |" in table
    # --report rebuilds the table and figure from the saved runs alone.
    again = module.main(["--report", "--out", str(tmp_path)])
    assert set(again["results"]) == set(results)
