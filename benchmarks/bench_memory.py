"""Peak memory of one exact log-marginal-likelihood + gradient evaluation (and more): gpderiv vs GPyTorch.

Each measurement runs in a fresh subprocess (``python bench_memory.py --child KIND --n n --d d``), which

1. imports torch, gpytorch and gpderiv and runs the measured code once at a tiny size (lazy imports,
   BLAS/OpenMP thread buffers: memory that any run pays once and that does not grow with N);
2. creates the data of ``bench_mll.py`` (X uniform in [0, 1]^d, seed 0, y = sum sin(3x), exact gradients,
   float64) and builds the model(s) (nothing `N x N` yet);
3. resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``) and reads the baseline
   ``VmRSS`` from ``/proc/self/status``;
4. runs the measured code and reads the peak ``VmHWM``.

The peak is ``VmHWM - baseline``: the extra resident memory the operation needed at its worst moment. Where
``clear_refs`` cannot be written the child falls back to ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (which
cannot be reset, so tiny sizes then read too low). Torch's CPU allocator has no cache and the glibc allocator
returns large blocks (over 32 MiB) to the system on free, so at these sizes RSS follows the live tensors. The
peak is also given as a ratio to one `N x N` float64 matrix (8 N^2 bytes).

Measurements (``KIND``):

* ``matrix``: ``torch.ones(N, N)`` -- a check of the method (ratio about 1.0).
* ``ours-mll``: ``loss = model.loss(); loss.backward()`` of ``DerivativeGP(X, y, grad)`` at its initial
  hyperparameters (one optimiser iteration).
* ``ours-fit``: ``model.fit(maxiter=2, progress=False)`` (L-BFGS; the cached factorisation for prediction
  is still alive at the end).
* ``ours-predict``: ``model.predict(Xs)`` at m = 1000 points (or m = n, if smaller), the first call after
  construction (includes the factorisation).
* ``gpytorch-mll``: ``loss = -mll(model(X), Y); loss.backward()`` of GPyTorch's tutorial model
  (``RBFKernelGrad``, ``MultitaskGaussianLikelihood``, ``ExactMarginalLogLikelihood``) under
  ``gpytorch.settings.max_cholesky_size(10**6)`` (exact Cholesky), at the same hyperparameters.

Run::

    python benchmarks/bench_memory.py                         # N = 3000 and 6000 (d = 5)
    python benchmarks/bench_memory.py --sizes 6000 --skip-gpytorch
    python benchmarks/bench_memory.py --quick --skip-gpytorch # N = 600: matrix and ours-mll, 2 at a time
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gpytorch
import torch

import gpderiv
from gpderiv import DerivativeGP

# The data and GPyTorch's model are shared with bench_mll.py (also when this file is loaded by path).
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mll import DTYPE, gpytorch_model, make_data  # noqa: E402

KINDS = ("matrix", "ours-mll", "ours-fit", "ours-predict", "gpytorch-mll")
QUICK_KINDS = ("matrix", "ours-mll", "gpytorch-mll")
LABELS = {
    "matrix": "check: torch.ones(N, N)",
    "ours-mll": "ours: loss() + backward",
    "ours-fit": "ours: fit(maxiter=2)",
    "ours-predict": "ours: first predict, m=1000",
    "gpytorch-mll": "gpytorch: -mll + backward",
}
#: Memory target of the issue: peak of ours at most this many `N x N` float64 matrices.
TARGET_MATRICES = 2.5


# ---------------------------------------------------------------------------------------------- child
def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes, None if unavailable."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_bytes("VmHWM") is not None


def _maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _prepare(kind: str, n: int, d: int):
    """Build what ``kind`` needs at size n (not measured) and return the operation to measure."""
    X, y, grad = make_data(n, d)
    N = n * (d + 1)
    if kind == "matrix":
        return lambda: torch.ones(N, N, dtype=DTYPE)
    model = DerivativeGP(X, y, grad, noise_prior=False, hyperparameter_uncertainty=False)  # a plain GP, as GPyTorch's
    if kind == "ours-mll":

        def run_ours_mll():
            loss = model.loss()
            loss.backward()

        return run_ours_mll
    if kind == "ours-fit":
        return lambda: model.fit(maxiter=2, progress=False)
    if kind == "ours-predict":
        Xs = torch.rand(min(n, 1000), d, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
        return lambda: model.predict(Xs)
    if kind == "gpytorch-mll":
        mll, gp, Y, _ = gpytorch_model(X, y, grad, model.hyperparameters())
        del model

        def run_gpytorch_mll():
            with gpytorch.settings.max_cholesky_size(10**6):
                loss = -mll(gp(gp.train_inputs[0]), Y)
                loss.backward()

        return run_gpytorch_mll
    raise ValueError(f"unknown kind {kind!r}")


def child(kind: str, n: int, d: int) -> dict:
    """Measure ``kind`` in this process; the result is printed as one JSON line."""
    _prepare(kind, 4, min(d, 2))()  # warm-up at a tiny size
    op = _prepare(kind, n, d)
    gc.collect()
    resettable = _reset_peak()
    baseline = _status_bytes("VmRSS") if resettable else _maxrss_bytes()
    t0 = time.perf_counter()
    result = op()
    seconds = time.perf_counter() - t0
    peak = _status_bytes("VmHWM") if resettable else _maxrss_bytes()
    del result
    return {
        "kind": kind,
        "n": n,
        "d": d,
        "N": n * (d + 1),
        "baseline_bytes": baseline,
        "peak_bytes": peak - baseline,
        "seconds": seconds,
        "method": "VmHWM after clear_refs" if resettable else "ru_maxrss",
        "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------- parent
def measure(kind: str, n: int, d: int) -> dict:
    """Run one measurement in a subprocess."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--n", str(n), "--d", str(d)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} at n = {n}, d = {d} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[3000, 6000],
        metavar="N",
        help="N = n (d + 1) values, n = N // (d + 1) (default 3000 6000)",
    )
    parser.add_argument("--d", type=int, default=5, help="input dimension (default 5)")
    parser.add_argument("--skip-gpytorch", action="store_true", help="do not measure GPyTorch")
    parser.add_argument("--skip-fit", action="store_true", help="do not measure ours-fit")
    parser.add_argument(
        "--jobs",
        type=int,
        help="subprocesses run at a time (default 1; 2 with --quick): each measures its own RSS, so running "
        "several at once changes only the seconds",
    )
    parser.add_argument(
        "--quick", action="store_true", help="N = 600, d = 5; matrix, ours-mll, gpytorch-mll (smoke run)"
    )
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child:
        result = child(args.child, args.n, args.d)
        print(json.dumps(result))
        return result
    if args.quick:
        args.sizes, args.d = [600], 5
    d = args.d
    kinds = [
        k
        for k in (QUICK_KINDS if args.quick else KINDS)
        if not (args.skip_gpytorch and k.startswith("gpytorch")) and not (args.skip_fit and k == "ours-fit")
    ]
    for size in args.sizes:
        if size < d + 1:
            raise SystemExit(f"--sizes: N = {size} is smaller than d + 1 = {d + 1}")
    jobs = args.jobs or (2 if args.quick else 1)
    tasks = [(kind, size // (d + 1), d) for size in args.sizes for kind in kinds]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        rows = list(pool.map(lambda task: measure(*task), tasks))
    for row in rows:
        row["matrix_bytes"] = 8 * row["N"] ** 2
        row["ratio"] = row["peak_bytes"] / row["matrix_bytes"]

    print(
        f"bench_memory: peak resident memory above the baseline, d = {d}, float64, one subprocess per row\n"
        f"torch {torch.__version__} ({rows[0]['threads']} threads), gpytorch {gpytorch.__version__}, "
        f"gpderiv {gpderiv.__version__}, python {platform.python_version()}, {platform.machine()}; "
        f"peak from {rows[0]['method']}"
    )
    print(f"{'N':>6}  {'measurement':<30} {'peak bytes':>13} {'MiB':>8} {'/ 8 N^2':>8} {'seconds':>8}")
    for r in rows:
        print(
            f"{r['N']:>6}  {LABELS[r['kind']]:<30} {r['peak_bytes']:>13,d} {r['peak_bytes'] / 2**20:>8.1f} "
            f"{r['ratio']:>8.2f} {r['seconds']:>8.2f}"
        )
    print(f"8 N^2 = bytes of one N x N float64 matrix; target for ours: <= {TARGET_MATRICES} x that")
    by = {(r["N"], r["kind"]): r for r in rows}
    for size in sorted({r["N"] for r in rows}):
        ours, gp = by.get((size, "ours-mll")), by.get((size, "gpytorch-mll"))
        if ours is not None and gp is not None:
            print(f"N = {size}: gpytorch / ours peak (MLL + gradient) = {gp['peak_bytes'] / ours['peak_bytes']:.2f}")
    return {"d": d, "rows": rows, "target_matrices": TARGET_MATRICES}


if __name__ == "__main__":
    main()
