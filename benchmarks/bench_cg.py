"""CG iterations of the iterative engine: block-Jacobi against the two-level preconditioner.

Two measurements, each against the previous default (block-Jacobi over spatial clusters of at most
4,096 rows) in the same run:

* ``--table``: kernel products (CG iterations) and seconds of one solve to relative residual
  1e-6, for n points in d = 10 (uniform in the unit cube, noise 1e-4, output scale 1) over a grid
  of n and lengthscales; iterations capped at ``--cap``;
* ``--mll-n n``: one marginal-likelihood step (loss and gradient: CG solves with the probe vectors
  and stochastic Lanczos quadrature) of the ``benchmarks/bench_large.py`` problem at n points in
  d = 10 (N = 11 n rows), after that script's subset fit (500 points, noise floor 1e-4).

Run::

    python benchmarks/bench_cg.py --table                     # minutes on 2 cores
    python benchmarks/bench_cg.py --mll-n 10000               # N = 110,000: the issue-17 step
    python benchmarks/bench_cg.py --mll-n 10000 --device cuda # the same step on a GPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from gpderiv import DerivativeGP
from gpderiv.inference.iterative import PRECONDITIONERS, RBFDerivativeLinearOperator, noisy_operator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_large import data  # noqa: E402
from bench_mll import _sync  # noqa: E402


def counted(products: list[int]):  # noqa: ANN201
    """Count the columns of each product with the kernel operator (restore with the returned function)."""
    original = RBFDerivativeLinearOperator._matmul

    def counting(self: RBFDerivativeLinearOperator, rhs: torch.Tensor) -> torch.Tensor:
        products.append(rhs.shape[-1])
        return original(self, rhs)

    RBFDerivativeLinearOperator._matmul = counting
    return lambda: setattr(RBFDerivativeLinearOperator, "_matmul", original)


def table(ns: list[int], lengthscales: list[float], cap: int, d: int = 10) -> None:
    from linear_operator import settings

    head = " ".join(f"{p + ' its (setup + solve s)':>36}" for p in PRECONDITIONERS)
    print(f"{'n':>6} {'N':>7} {'lengthscale':>11} {head}")
    fast = settings.fast_computations(covar_root_decomposition=True, log_prob=True, solves=True)
    for n in ns:
        X = torch.rand(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        rhs = torch.randn(n * (1 + d), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        noise = torch.full_like(rhs, 1e-4)
        for ell in lengthscales:
            op = RBFDerivativeLinearOperator(X, torch.full((d,), ell, dtype=torch.float64), torch.tensor(1.0))
            cells = []
            for name in PRECONDITIONERS:
                A = noisy_operator(op, noise, preconditioner=name)
                t0 = time.perf_counter()
                A.preconditioner_override(None)  # built once, cached
                setup = time.perf_counter() - t0
                products: list[int] = []
                restore = counted(products)
                t0 = time.perf_counter()
                with fast, settings.max_cholesky_size(0), settings.max_cg_iterations(cap), settings.cg_tolerance(1e-6):
                    A.solve(rhs.unsqueeze(-1))
                restore()
                its = f"{len(products)}" if len(products) < cap else f">{cap}"
                cells.append(f"{its:>6} ({setup:6.1f} + {time.perf_counter() - t0:7.1f})")
            print(f"{n:>6} {n * (1 + d):>7} {ell:>11} " + " ".join(f"{c:>36}" for c in cells), flush=True)


def mll_step(n: int, preconditioner: str, d: int = 10, device: str = "cpu") -> None:
    X, y, g = (t.to(device) for t in data(n, d, 0))
    options = {"preconditioner": preconditioner}
    model = DerivativeGP(
        X, y, g, inference="iterative", inference_options=options, shared_grad_noise=True, noise_lower_bound=1e-4
    )
    model.fit(subset=500, maxiter=50, seed=0, progress=False)
    products: list[int] = []
    restore = counted(products)
    torch.manual_seed(0)
    _sync()
    t0 = time.perf_counter()
    loss = model.loss()
    loss.backward()
    _sync()
    seconds = time.perf_counter() - t0
    restore()
    print(
        f"{preconditioner}: n = {n}, N = {n * (1 + d):,}: one MLL + gradient {seconds:.1f} s, "
        f"{len(products)} kernel products ({sum(products)} columns); {torch.get_num_threads()} threads, {device}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--n", type=int, nargs="*", default=[500, 1000, 2000])
    parser.add_argument("--lengthscales", type=float, nargs="*", default=[0.3, 0.5, 1.0, 1.5])
    parser.add_argument("--cap", type=int, default=1000, help="most CG iterations per solve in the table")
    parser.add_argument("--mll-n", type=int, default=None)
    parser.add_argument("--preconditioner", choices=[*PRECONDITIONERS, "both"], default="both")
    parser.add_argument("--device", default="cpu", help="device of the --mll-n step (e.g. cuda)")
    args = parser.parse_args(argv)
    if args.table:
        table(args.n, args.lengthscales, args.cap)
    if args.mll_n:
        for name in PRECONDITIONERS if args.preconditioner == "both" else [args.preconditioner]:
            mll_step(args.mll_n, name, device=args.device)


if __name__ == "__main__":
    main()
