"""The inverse behind the dense MLL gradient: torch's ``cholesky_inverse`` against the blocked inverse.

For an SPD matrix of N rows (``B B^T / N + 0.1 I``, B standard normal, seed 0, float64) and its
Cholesky factor, the median seconds of

* ``cholesky``: ``torch.linalg.cholesky`` (the unit of the ratios);
* ``cholesky_inverse``: ``torch.cholesky_inverse(L)`` (LAPACK ``potri`` plus a copy of the upper
  triangle on the CPU; a solve with the identity on CUDA);
* ``solve(I)``: ``torch.cholesky_solve(I, L)``, the algorithm of CUDA's ``cholesky_inverse``;
* ``engine``: :func:`gpderiv.inference.dense.inverse_lower`, what the engine takes (``potri`` on the
  CPU at one thread, the blocked inverse on CUDA; nan where it falls back to ``cholesky_inverse``);
* ``blocked <b>``: :func:`gpderiv.inference.spd_inverse.inverse_lower_blocked` with leaves of b rows;

and checks that the blocked inverse matches ``cholesky_inverse``.

Run::

    OMP_NUM_THREADS=1 python benchmarks/bench_inverse.py --sizes 1500 3000   # CPU: potri at one thread
    python benchmarks/bench_inverse.py --device cuda --sizes 6000 12000 24000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gpderiv.inference.dense import inverse_lower
from gpderiv.inference.spd_inverse import inverse_lower_blocked

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mll import _sync  # noqa: E402


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: workspace allocation, library loading
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_size(N: int, device: torch.device, blocks: list[int], repeats: int) -> dict[str, float]:
    B = torch.randn(N, N, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(device)
    A = B @ B.T / N + 0.1 * torch.eye(N, dtype=torch.float64, device=device)
    del B
    L = torch.linalg.cholesky(A)
    reference = torch.cholesky_inverse(L).tril_()
    error = (inverse_lower_blocked(L) - reference).abs().max().item() / reference.abs().max().item()
    if error > 1e-8:
        raise RuntimeError(f"blocked inverse differs from cholesky_inverse by {error:.1e} (relative) at N = {N}")
    eye = torch.eye(N, dtype=torch.float64, device=device)
    variants: dict[str, Callable[[], object]] = {
        "cholesky": lambda: torch.linalg.cholesky(A),
        "cholesky_inverse": lambda: torch.cholesky_inverse(L),
        "solve(I)": lambda: torch.cholesky_solve(eye, L),
    }
    if inverse_lower(L) is not None:
        variants["engine"] = lambda: inverse_lower(L)
    for b in blocks:
        variants[f"blocked {b}"] = lambda b=b: inverse_lower_blocked(L, b)
    seconds = {name: median_seconds(fn, repeats) for name, fn in variants.items()}
    seconds.setdefault("engine", float("nan"))
    return {"N": N, "relative error": error, **seconds}


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1500, 3000])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--blocks", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads; "
        f"median seconds (ratio to the Cholesky)"
    )
    rows = []
    for N in args.sizes:
        row = run_size(N, device, args.blocks, args.repeats)
        rows.append(row)
        cells = [
            f"{k} {v:.4f} ({v / row['cholesky']:.2f})"
            for k, v in row.items()
            if k not in ("N", "relative error", "cholesky")
        ]
        print(
            f"N = {N}: cholesky {row['cholesky']:.4f} s | "
            + " | ".join(cells)
            + f" | error {row['relative error']:.1e}",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
