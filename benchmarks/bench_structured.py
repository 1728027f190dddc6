"""Structured (n << d) vs dense engine: one marginal likelihood + gradient and a prediction, n = 20, d up to 10,000.

Data: X uniform in [0, 1]^d (seed 0), y = sum sin(3 x), exact gradients (every value and all n d partial
derivatives observed, N = n (1 + d) rows), float64; kernel ``ScaleKernel(DerivativeRBFKernel())`` (one
lengthscale, set to 0.5 sqrt(d) in internal units so that the points are correlated), one learned gradient
noise (``shared_grad_noise=True``); both engines at the same hyperparameters.

Each (engine, d) runs in a fresh subprocess with one thread (``torch.set_num_threads(1)``), which

1. builds the data and the model;
2. measures one ``loss = model.loss(); loss.backward()`` (seconds and peak resident memory above the
   baseline: ``VmHWM`` after resetting it with ``/proc/self/clear_refs``, as in ``bench_memory.py``);
3. measures the factorisation cached for prediction (``model.factor()``);
4. measures ``model.predict(Xs)`` (means and variances of f and grad f) at m test points, with its peak.

The dense engine is run where its `N x N` matrices fit (d <= 1000 here: N = 20,020, 3.2 GB per matrix);
its prediction with variances costs O(m d N^2) (triangular solves), so it is timed at ``--dense-predict-points``
points and scaled linearly to m (chunks of one point each: exact scaling). Beyond the largest measured N the
dense numbers are **extrapolated** as O(N^3) (time of the evaluation, of the factorisation and of the
prediction: m (1 + d) N^2 is cubic in d at fixed n and m) and O(N^2) (memory), and labelled so.

``--crossover`` times one evaluation of both engines at n = 10, 20, 40 and d = n, 2n, 4n (in process, best
of 3): the measurement behind ``inference="auto"``'s rule d >= 2 n.

``--ard-crossover`` and ``--ard-table`` measure DerivativeGP's default model instead (ARD kernel with
lengthscales from 0.3 sqrt(d) to 0.7 sqrt(d), one learned noise per derivative dimension: the structured
engine's ARD path), in process, one thread, the engines **interleaved** repeat by repeat (the machine is
shared) and the **median** of ``--repeats`` reported: the crossover over ``--points`` x ``--ratios`` (d / n),
and a table over ``--points`` x ``--dims`` of MLL + gradient and factor + prediction at ``--m`` points for
``--engine`` (structured, or iterative: means only) against dense up to ``--dense-max-rows`` rows.

Run::

    python benchmarks/bench_structured.py                      # the table of docs/benchmarks.md (~5 min)
    python benchmarks/bench_structured.py --crossover          # the crossover table (~1 min)
    python benchmarks/bench_structured.py --quick              # smoke run: d = 50, 100, dense at d = 50
    python benchmarks/bench_structured.py --ard-crossover --points 10 20 30 40 50 64 --ratios 1 1.5 2 3
    python benchmarks/bench_structured.py --ard-table --points 20 50 --dims 100 1000 --m 10
    python benchmarks/bench_structured.py --ard-table --engine iterative --points 100 200 --dims 1000 --repeats 1
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import gpytorch
import torch
from gpytorch.kernels import ScaleKernel

import gpderiv
from gpderiv import DerivativeGP
from gpderiv.kernels import DerivativeRBFKernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import _status_bytes  # noqa: E402  (one reader of /proc/self/status for all benchmarks)

DTYPE = torch.float64


def make_model(n: int, d: int, engine: str) -> DerivativeGP:
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(n, d, generator=gen, dtype=DTYPE)
    y, grad = torch.sin(3 * X).sum(-1), 3 * torch.cos(3 * X)
    model = DerivativeGP(
        X, y, grad, kernel=ScaleKernel(DerivativeRBFKernel()), shared_grad_noise=True, inference=engine
    )
    model.covar_module.base_kernel.lengthscale = 0.5 * math.sqrt(d)
    return model


def test_points(m: int, d: int) -> torch.Tensor:
    return torch.rand(m, d, generator=torch.Generator().manual_seed(1), dtype=DTYPE)


# ---------------------------------------------------------------------------------------------- child
def _measure(op) -> tuple[float, int | None, object]:
    """``(seconds, peak bytes above the baseline or None, result)`` of ``op()``."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        baseline = _status_bytes("VmRSS")
    except OSError:
        baseline = None
    start = time.perf_counter()
    result = op()
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    return seconds, None if baseline is None or peak is None else peak - baseline, result


def child(engine: str, n: int, d: int, m: int, predict_points: int) -> dict:
    torch.set_num_threads(1)
    make_model(3, 4, engine).loss().backward()  # warm-up: lazy imports, allocator
    model = make_model(n, d, engine)

    def mll() -> float:
        loss = model.loss()
        loss.backward()
        return loss.item()

    mll_seconds, mll_peak, loss = _measure(mll)
    model.zero_grad(set_to_none=True)
    factor_seconds, _, _ = _measure(model.factor)
    Xs = test_points(predict_points, d)
    predict_seconds, predict_peak, pred = _measure(lambda: model.predict(Xs))
    return {
        "engine": engine,
        "n": n,
        "d": d,
        "N": model.num_observations,
        "mll_seconds": mll_seconds,
        "mll_peak": mll_peak,
        "factor_seconds": factor_seconds,
        "predict_points": predict_points,
        "predict_seconds": predict_seconds * m / predict_points,
        "predict_peak": predict_peak,
        "log_marginal_likelihood": -loss * model.num_observations - model.data.row_factor.log().sum().item(),
        "grad_variance_sum": pred.grad_variance.sum().item() * m / predict_points,
        "threads": torch.get_num_threads(),
    }


def measure(engine: str, n: int, d: int, m: int, predict_points: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", engine, "--n", str(n), "--dims", str(d)]
    cmd += ["--m", str(m), "--dense-predict-points", str(predict_points)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} at n = {n}, d = {d} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- tables
def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:.3f}"


def crossover() -> None:
    torch.set_num_threads(1)
    print("crossover: one marginal likelihood + gradient, seconds (best of 3, 1 thread)")
    print(f"{'n':>4} {'d':>5} {'N':>6} {'dense':>9} {'structured':>11} {'dense / structured':>19}")
    for n in (10, 20, 40):
        for d in (n, 2 * n, 4 * n):
            times = {}
            for engine in ("dense", "structured"):
                model = make_model(n, d, engine)
                best = math.inf
                for _ in range(3):
                    start = time.perf_counter()
                    model.loss().backward()
                    best = min(best, time.perf_counter() - start)
                times[engine] = best
            ratio = times["dense"] / times["structured"]
            print(f"{n:>4} {d:>5} {n * (d + 1):>6} {times['dense']:>9.4f} {times['structured']:>11.4f} {ratio:>19.2f}")


def make_ard_model(n: int, d: int, engine: str) -> DerivativeGP:
    """DerivativeGP's defaults (ARD kernel, one learned noise per derivative dimension), distinct lengthscales."""
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(n, d, generator=gen, dtype=DTYPE)
    model = DerivativeGP(X, torch.sin(3 * X).sum(-1), 3 * torch.cos(3 * X), inference=engine)
    # From 0.3 sqrt(d) to 0.7 sqrt(d) in internal units: every point correlated with the others.
    model.covar_module.base_kernel.lengthscale = torch.linspace(0.3, 0.7, d, dtype=DTYPE) * math.sqrt(d)
    return model


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if len(ordered) % 2 else 0.5 * sum(ordered[len(ordered) // 2 - 1 :][:2])


def ard_crossover(points: list[int], ratios: list[float], repeats: int) -> None:
    """MLL + gradient of the default ARD model, dense and structured interleaved, median of ``repeats``."""
    torch.set_num_threads(1)
    print(f"ARD crossover: one MLL + gradient of DerivativeGP's default model, median of {repeats}, 1 thread")
    print(f"{'n':>4} {'d':>6} {'N':>7} {'dense s':>9} {'structured s':>13} {'structured / dense':>19}")
    for n in points:
        for ratio in ratios:
            d = max(1, round(ratio * n))
            models = {engine: make_ard_model(n, d, engine) for engine in ("dense", "structured")}
            times: dict[str, list[float]] = {engine: [] for engine in models}
            for _ in range(repeats):
                for engine, model in models.items():  # interleaved: both see the same machine load
                    start = time.perf_counter()
                    model.loss().backward()
                    times[engine].append(time.perf_counter() - start)
            dense, structured = _median(times["dense"]), _median(times["structured"])
            print(f"{n:>4} {d:>6} {n * (d + 1):>7} {dense:>9.4f} {structured:>13.4f} {structured / dense:>19.3f}")


def ard_table(
    points: list[int], dims: list[int], repeats: int, m: int, dense_max_rows: int, engine: str = "structured"
) -> None:
    """MLL + gradient and factor + prediction (m points) of the default ARD model, ``engine`` against dense.

    The prediction has means and variances of f and grad f, except with the iterative engine
    (means only: its variances solve `1 + d` systems per test point).
    """
    torch.set_num_threads(1)
    variance = engine != "iterative"
    what = "means and variances of f and grad f" if variance else "means of f and grad f"
    print(
        f"ARD table, {engine} engine: DerivativeGP's default model, median of {repeats} MLL + gradient, one factor + "
        f"predict at m = {m} points ({what}), 1 thread; dense only up to N = {dense_max_rows}"
    )
    header = f"{'n':>4} {'d':>6} {'N':>7} | {'MLL+grad s':>10} {'dense s':>9} {'ratio':>7} | {'predict s':>9}"
    print(f"{header} {'dense s':>9}")
    for n in points:
        for d in dims:
            N = n * (d + 1)
            engines = ("dense", engine) if N <= dense_max_rows else (engine,)
            models = {name: make_ard_model(n, d, name) for name in engines}
            times: dict[str, list[float]] = {engine: [] for engine in models}
            for _ in range(repeats):
                for name, model in models.items():
                    start = time.perf_counter()
                    model.loss().backward()
                    times[name].append(time.perf_counter() - start)
            Xs = test_points(m, d)
            predict = {}
            for name, model in models.items():
                model.fitted = True
                start = time.perf_counter()
                model.predict(Xs, variance=variance)
                predict[name] = time.perf_counter() - start
            mll = {name: _median(t) for name, t in times.items()}
            dense = mll.get("dense")
            cells = ("-", "-", "-") if dense is None else (f"{dense:.4g}", f"{mll[engine] / dense:.3g}")
            dense_predict = f"{predict['dense']:.4g}" if "dense" in predict else "cannot"
            print(
                f"{n:>4} {d:>6} {N:>7} | {mll[engine]:>10.4g} {cells[0] if dense else 'cannot':>9} "
                f"{cells[1] if dense else '-':>7} | {predict[engine]:>9.4g} {dense_predict:>9}",
                flush=True,
            )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="points (default 20)")
    parser.add_argument("--dims", type=int, nargs="+", default=[1000, 2000, 5000, 10000], help="input dimensions")
    parser.add_argument("--dense-dims", type=int, nargs="*", default=[250, 500, 1000], help="dims run densely")
    parser.add_argument("--m", type=int, default=100, help="test points of the prediction (default 100)")
    parser.add_argument(
        "--dense-predict-points", type=int, default=2, help="test points timed for the dense prediction (scaled to m)"
    )
    parser.add_argument("--crossover", action="store_true", help="only the dense / structured crossover table")
    parser.add_argument("--quick", action="store_true", help="smoke run: d = 50, 100; dense at d = 50")
    parser.add_argument("--ard-crossover", action="store_true", help="crossover of the default ARD model")
    parser.add_argument("--ard-table", action="store_true", help="table of the default ARD model, n x d grid")
    parser.add_argument("--points", type=int, nargs="+", default=None, help="n of the ARD crossover / table")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0, 3.0], help="d / n (ARD)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the ARD measurements (median)")
    parser.add_argument("--dense-max-rows", type=int, default=12_000, help="largest N run densely (ARD table)")
    parser.add_argument("--engine", default="structured", help="engine of the ARD table (structured, iterative)")
    parser.add_argument("--child", choices=("dense", "structured"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ard_crossover:
        ard_crossover(args.points or [5, 10, 20, 30, 40], args.ratios, args.repeats)
        return []
    if args.ard_table:
        ard_table(args.points or [20, 50], args.dims, args.repeats, args.m, args.dense_max_rows, args.engine)
        return []
    if args.child:
        result = child(args.child, args.n, args.dims[0], args.m, args.dense_predict_points)
        print(json.dumps(result))
        return [result]
    if args.crossover:
        crossover()
        return []
    if args.quick:
        args.dims, args.dense_dims, args.m, args.dense_predict_points = [50, 100], [50], 10, 2
    n, m = args.n, args.m
    rows = [measure("structured", n, d, m, m) for d in args.dims]
    dense = [measure("dense", n, d, m, args.dense_predict_points) for d in args.dense_dims]
    print(
        f"bench_structured: n = {n} points with values and all gradients, m = {m} test points, float64, 1 thread\n"
        f"torch {torch.__version__}, gpytorch {gpytorch.__version__}, gpderiv {gpderiv.__version__}, "
        f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cores; peaks: VmHWM above "
        "the baseline"
    )
    print(f"\ndense engine, measured (prediction: timed at {args.dense_predict_points} points, scaled to m = {m}):")
    print(f"{'d':>6} {'N':>7} {'MLL+grad s':>11} {'factor s':>9} {'predict s':>10} {'MLL peak GiB':>13} {'log ML':>16}")
    for r in dense:
        print(
            f"{r['d']:>6} {r['N']:>7} {r['mll_seconds']:>11.2f} {r['factor_seconds']:>9.2f} "
            f"{r['predict_seconds']:>10.1f} {_gib(r['mll_peak']):>13} {r['log_marginal_likelihood']:>16.6f}"
        )
    by_d = {r["d"]: r for r in dense}
    reference = max(dense, key=lambda r: r["N"]) if dense else None
    print(f"\nstructured vs dense (dense beyond N = {reference['N'] if reference else '-'}: extrapolated O(N^3))")
    header = (
        f"{'d':>6} {'N':>7} | {'MLL+grad s':>10} {'dense s':>10} {'ratio':>8} | {'predict s':>9} {'dense s':>10} "
        f"{'ratio':>8} | {'MLL peak GiB':>12} {'dense GiB':>10} | dense"
    )
    print(header)
    for r in rows:
        dense_row = by_d.get(r["d"])
        if dense_row is not None:
            t_mll, t_pred, mem, label = (
                dense_row["mll_seconds"],
                dense_row["predict_seconds"],
                dense_row["mll_peak"],
                "measured",
            )
            agreement = abs(dense_row["log_marginal_likelihood"] - r["log_marginal_likelihood"])
            label += f" (|log ML difference| {agreement:.1e})"
        elif reference is not None:
            scale = r["N"] / reference["N"]
            t_mll, t_pred = reference["mll_seconds"] * scale**3, reference["predict_seconds"] * scale**3
            mem = None if reference["mll_peak"] is None else reference["mll_peak"] * scale**2
            label = f"extrapolated from N = {reference['N']}"
        else:
            t_mll = t_pred = mem = None
            label = "-"
        cells = [
            _num(t_mll, ".4g"),
            _num(None if t_mll is None else t_mll / r["mll_seconds"], ".3g"),
            _num(t_pred, ".4g"),
            _num(None if t_pred is None else t_pred / r["predict_seconds"], ".3g"),
        ]
        print(
            f"{r['d']:>6} {r['N']:>7} | {r['mll_seconds']:>10.4f} {cells[0]:>10} {cells[1]:>8} | "
            f"{r['predict_seconds']:>9.3f} {cells[2]:>10} {cells[3]:>8} | {_gib(r['mll_peak']):>12} "
            f"{_gib(mem):>10} | {label}"
        )
    print("\nstructured, details: factorisation for prediction (s), prediction peak (GiB), log marginal likelihood")
    for r in rows:
        print(
            f"d = {r['d']:>6}: factor {r['factor_seconds']:.4f} s, predict peak {_gib(r['predict_peak'])} GiB, "
            f"log ML {r['log_marginal_likelihood']:.6f}"
        )
    return rows + dense


if __name__ == "__main__":
    main()
