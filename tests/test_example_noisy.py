"""Smoke test of examples/noisy_derivatives.py (value-only GP derivatives against np.gradient)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]


def test_noisy_derivatives_smoke(tmp_path):
    path = ROOT / "examples" / "noisy_derivatives.py"
    name = "_gpderiv_script_noisy_derivatives"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)

    metrics = module.main(["--smoke", "--out", str(tmp_path)])

    assert (tmp_path / "noisy_derivatives.png").is_file()
    assert metrics["png"] == str(tmp_path / "noisy_derivatives.png")
    assert len(metrics["rows"]) == 10
    # On noisy data the GP's derivatives beat finite differences by a wide margin (over 20
    # seeds the ratio is over 4 for f' and over 10 for f''; a factor 2 leaves room for changes).
    for grid in ("uniform", "non_uniform"):
        for q in ("d1", "d2"):
            gp, fd = metrics[f"rmse_{grid}_{q}_gp"], metrics[f"rmse_{grid}_{q}_fd"]
            assert math.isfinite(gp) and 2 * gp < fd, (grid, q, gp, fd)
    assert metrics["rmse_curve_kappa_gp"] < metrics["rmse_curve_kappa_fd"]
    for key, value in metrics.items():
        if key.startswith("cover_"):
            assert 0.0 <= value <= 1.0, key
    # The autograd cross-covariance Cov(f', f'') agrees with central differences of full_cov.
    assert metrics["cov_check"] < 1e-5
