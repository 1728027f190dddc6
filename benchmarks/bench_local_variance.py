"""Local variances (``predict(variance="local")``) against the exact ones of the dense engine.

For each number of neighbours k, the ratio of the local to the exact variance of f and of every
partial derivative at held-out points (at least 1: the local ones are upper bounds), the largest
ratio of standard deviations, and the time per test point. Data: the smooth random function of
:mod:`bench_large` (an RBF GP draw of lengthscale 0.3 in [0, 1]^d, noise std 0.01 on values and
gradients); hyperparameters from a dense fit of a subset of the points.

Run::

    python benchmarks/bench_local_variance.py                 # n = 1000 and 2000, d = 10 (about 10 min)
    python benchmarks/bench_local_variance.py --n 300 --k 25 100  # seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from gpderiv import DerivativeGP

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_large import data  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 2000])
    parser.add_argument("--d", type=int, default=10)
    parser.add_argument("--k", type=int, nargs="+", default=[50, 100, 200, 400], help="neighbours")
    parser.add_argument("--m", type=int, default=50, help="test points")
    parser.add_argument("--subset", type=int, default=300, help="points of the hyperparameter fit")
    args = parser.parse_args(argv)
    rows = []
    print(f"{torch.get_num_threads()} threads, d = {args.d}, {args.m} test points", flush=True)
    for n in args.n:
        X, y, g = data(n, args.d, 0)
        Xs = data(args.m, args.d, 1)[0]
        model = DerivativeGP(X, y, g, inference="dense", shared_grad_noise=True, noise_lower_bound=1e-4)
        model.fit(subset=min(n, args.subset), maxiter=50, seed=0, progress=False)
        t0 = time.perf_counter()
        exact = model.predict(Xs)
        seconds = time.perf_counter() - t0
        print(f"n = {n} (N = {n * (1 + args.d):,}): exact variances of all test points {seconds:.1f} s")
        exact_var = torch.cat([exact.variance.unsqueeze(-1), exact.grad_variance], -1)
        for k in args.k:
            if k > n:
                continue
            t0 = time.perf_counter()
            local = model.predict(Xs, variance="local", neighbours=k)
            per_point = (time.perf_counter() - t0) / args.m
            ratio = torch.cat([local.variance.unsqueeze(-1), local.grad_variance], -1) / exact_var
            row = {
                "n": n,
                "k": k,
                "f_median": ratio[:, 0].median().item(),
                "f_max": ratio[:, 0].max().item(),
                "grad_median": ratio[:, 1:].median().item(),
                "grad_max": ratio[:, 1:].max().item(),
                "min": ratio.min().item(),
                "std_max": ratio.max().sqrt().item(),
                "s_per_point": per_point,
            }
            rows.append(row)
            print(f"  k = {k:4d}: variance ratio f median {row['f_median']:.4f} max {row['f_max']:.4f}, "
                  f"grad median {row['grad_median']:.4f} max {row['grad_max']:.4f}, min {row['min']:.4f}; "
                  f"std ratio max {row['std_max']:.4f}; {per_point:.3f} s per test point", flush=True)
    return rows


if __name__ == "__main__":
    main()
