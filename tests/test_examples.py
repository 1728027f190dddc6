"""Smoke tests of the example scripts and the benchmark (their --smoke / --quick modes)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]


def _load(relpath: str) -> ModuleType:
    path = ROOT / relpath
    name = "_gpderiv_script_" + path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up here
    spec.loader.exec_module(module)
    return module


def test_quickstart_1d_smoke(tmp_path):
    metrics = _load("examples/quickstart_1d.py").main(["--smoke", "--out", str(tmp_path)])
    assert (tmp_path / "quickstart_1d.png").is_file()
    assert metrics["png"] == str(tmp_path / "quickstart_1d.png")
    # The derivatives pin down the under-sampled function; the value-only GP cannot.
    assert metrics["rmse_f_grad"] < metrics["rmse_f_value"]
    assert metrics["rmse_df_grad"] < metrics["rmse_df_value"]
    assert metrics["rmse_f_grad"] < 0.05


def test_franke_2d_smoke(tmp_path):
    metrics = _load("examples/franke_2d.py").main(["--smoke", "--seeds", "0", "1", "--out", str(tmp_path)])
    assert (tmp_path / "franke_2d.png").is_file()
    rows = metrics["rows"]
    assert [(r["seed"], r["model"]) for r in rows] == [(0, "grad"), (0, "value"), (1, "grad"), (1, "value")]
    assert {r["N"] for r in rows if r["model"] == "grad"} == {75}
    assert {r["N"] for r in rows if r["model"] == "value"} == {25}
    for r in rows:
        assert math.isfinite(r["rmse_f"]) and math.isfinite(r["rmse_grad"])
        assert r["rmse_f"] < 0.5


def test_franke_function_gradient():
    torch = pytest.importorskip("torch")
    franke = _load("examples/franke_2d.py")
    X = franke.grid(4)
    _, grad = franke.franke_with_grad(X)
    h = 1e-6
    for a in range(2):
        e = torch.zeros(2, dtype=torch.float64)
        e[a] = h
        fd = (franke.franke_with_grad(X + e)[0] - franke.franke_with_grad(X - e)[0]) / (2 * h)
        torch.testing.assert_close(grad[:, a], fd, rtol=1e-6, atol=1e-6)


def test_bench_mll_quick():
    metrics = _load("benchmarks/bench_mll.py").main(["--quick", "--repeats", "1", "--skip-gpytorch"])
    assert metrics["N"] == 200 * 6
    assert metrics["ours_s"] > 0 and metrics["cholesky_s"] > 0
    assert math.isnan(metrics["gpytorch_s"])
    assert math.isfinite(metrics["ours_mll"])


def test_bench_mll_matches_gpytorch_tiny():
    """With GPyTorch set to our hyperparameters the two exact log marginal likelihoods agree."""
    metrics = _load("benchmarks/bench_mll.py").main(["--n", "40", "--d", "2", "--repeats", "1"])
    assert metrics["N"] == 40 * 3
    assert metrics["gpytorch_mll"] == pytest.approx(metrics["ours_mll"], rel=1e-8, abs=1e-8)


def test_bench_mll_sizes_smoke():
    metrics = _load("benchmarks/bench_mll.py").main(
        ["--sizes", "60", "90", "--d", "2", "--repeats", "1", "--skip-gpytorch"]
    )
    assert [r["N"] for r in metrics["sizes"]] == [60, 90]
    assert [r["n"] for r in metrics["sizes"]] == [20, 30]
    for r in metrics["sizes"]:
        assert r["ours_s"] > 0 and math.isfinite(r["ours_mll"])


def test_bench_predict_quick():
    metrics = _load("benchmarks/bench_predict.py").main(["--quick", "--repeats", "1", "--skip-gpytorch"])
    assert (metrics["N"], metrics["m"]) == (200 * 6, 200)
    assert metrics["ours_first_s"] > 0 and metrics["ours_second_s"] > 0
    assert math.isnan(metrics["gpytorch_first_s"]) and metrics["max_abs_diff"] == {}


def test_bench_inverse_smoke():
    """The blocked inverse is checked against cholesky_inverse inside the benchmark (it raises otherwise)."""
    rows = _load("benchmarks/bench_inverse.py").main(["--sizes", "70", "--blocks", "16", "--repeats", "1"])
    assert rows[0]["N"] == 70 and rows[0]["relative error"] < 1e-12
    assert rows[0]["blocked 16"] > 0 and rows[0]["cholesky"] > 0


def test_bench_predict_matches_gpytorch_tiny():
    """At the same hyperparameters our predicted means and variances are GPyTorch's."""
    metrics = _load("benchmarks/bench_predict.py").main(["--n", "40", "--d", "2", "--m", "10", "--repeats", "1"])
    assert metrics["gpytorch_matched"]
    assert set(metrics["max_abs_diff"]) == {"f mean", "grad mean", "f variance", "grad variance"}
    assert max(metrics["max_abs_diff"].values()) < 1e-8


def test_bench_memory_quick():
    metrics = _load("benchmarks/bench_memory.py").main(["--quick", "--skip-gpytorch"])
    rows = {r["kind"]: r for r in metrics["rows"]}
    assert set(rows) == {"matrix", "ours-mll"}
    assert {r["N"] for r in rows.values()} == {600}
    # The check row measures one N x N matrix: the method reads what was allocated.
    assert 0.8 < rows["matrix"]["ratio"] < 1.5
    assert rows["ours-mll"]["peak_bytes"] > rows["matrix"]["peak_bytes"]


def test_bench_structured_quick():
    """Structured and dense engines measured in subprocesses agree on the log marginal likelihood."""
    rows = _load("benchmarks/bench_structured.py").main(["--quick", "--n", "6"])
    structured = {r["d"]: r for r in rows if r["engine"] == "structured"}
    dense = {r["d"]: r for r in rows if r["engine"] == "dense"}
    assert set(structured) == {50, 100} and set(dense) == {50}
    assert structured[50]["log_marginal_likelihood"] == pytest.approx(dense[50]["log_marginal_likelihood"], rel=1e-9)
    assert all(r["mll_seconds"] > 0 and r["predict_seconds"] > 0 for r in rows)


def test_bench_large_tiny():
    """The staged large-data benchmark runs end to end; its CG check reaches the exact variances."""
    bench = _load("benchmarks/bench_large.py")
    out = bench.main(["--n", "60", "--d", "3", "--subset", "30", "--steps", "1", "--m", "20", "--neighbours", "10",
                      "--check-points", "2", "--check-iterations", "20", "--check-neighbours", "5", "60"])
    assert out["N"] == 240 and math.isfinite(out["rmse_f"]) and math.isfinite(out["rmse_grad"])
    assert min(min(r) for r in out["check_ratio"].values()) >= 1 - 1e-9  # local variances bound the CG ones
    assert out["check_ratio"][60] == pytest.approx([1.0] * 8, rel=1e-8)  # every point: CG's exact variances
    assert 0 < out["cover_f"] <= 1 and out["z2_grad f"] > 0


def test_bench_large_cg_check_converges_to_the_dense_variances():
    torch = pytest.importorskip("torch")
    from gpderiv import DerivativeGP
    from gpderiv.observed_rows import ObservedRows

    bench = _load("benchmarks/bench_large.py")
    X, y, g = bench.data(80, 3, 0)
    Xs = bench.data(3, 3, 1)[0]
    iterative = DerivativeGP(X, y, g, inference="iterative", noise=1e-3, grad_noise=1e-2)
    dense = DerivativeGP(X, y, g, inference="dense", noise=1e-3, grad_noise=1e-2)
    path = list(bench.cg_variance_path(iterative, Xs, 12, every=4))
    assert [j for j, _ in path] == [4, 8, 12]
    with torch.no_grad():
        _, exact = dense.factor().posterior(ObservedRows.block(dense.scaling.x(Xs)), "var")
    torch.testing.assert_close(path[-1][1], exact, rtol=1e-8, atol=1e-12)


def test_bench_local_variance_tiny():
    rows = _load("benchmarks/bench_local_variance.py").main(
        ["--n", "60", "--d", "3", "--k", "10", "60", "--m", "5", "--subset", "30"]
    )
    assert [r["k"] for r in rows] == [10, 60]
    assert rows[0]["min"] >= 1 - 1e-9 and rows[0]["std_max"] > 1  # an upper bound, not the exact value
    assert rows[1]["std_max"] == pytest.approx(1.0, abs=1e-8)  # every point: exact
