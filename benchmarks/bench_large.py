"""Exact GP on N = n (1 + d) >= 100k observations with the matrix-free engine: fit and predict.

The issue-5 target: n = 10,000 points with values and gradients in d = 10 (N = 110,000) fitted
by a few marginal-likelihood steps and predicted, on a 2-core machine with 24 GB. Stages, each
timed, with the peak resident memory (VmHWM) so far:

1. hyperparameters from a dense fit on a random subset of points (``fit(subset=...)``; ends with
   the full-data iterative factorisation);
2. a few Adam steps on the full-data iterative marginal likelihood (CG + stochastic Lanczos);
3. posterior means of f and grad f at ``m`` test points (one CG solve, cached);
4. variances of f and grad f at the same test points, each conditioned on the observations at its
   ``--neighbours`` nearest training points (``predict(variance="local")``: upper bounds on the
   exact variances, whose CG solves with ``1 + d`` right-hand sides per test point take minutes
   per point at full size), with the calibration of the held-out errors: the mean of
   ``error^2 / variance`` (1 if calibrated, below 1 if conservative) and the share of errors
   within 1.96 standard deviations (0.95 if calibrated);
5. a check of the local variances of ``--check-points`` test points against CG, whose variance
   estimates decrease monotonically to the exact ones (:func:`cg_variance_path`), for the
   default and the ``--check-neighbours`` neighbour counts.

Data: a smooth random function, an approximate GP draw with an RBF kernel of lengthscale 0.3
(500 random Fourier features), at uniform points in [0, 1]^d, noise std 0.01 on values and
gradients. CG converges fast or slowly depending on the lengthscale relative to the spread of
the points (docs/design.md), so the function is part of the benchmark.

Status (docs/benchmarks.md): at full size on the 2-core machine the subset fit took 62 s, one
full-data Adam step 591 s (308 kernel products of 11 columns), the factorisation and means at
1000 points 272 s and their local variances 65 s (peak RSS 7.5 GiB); the CG check put the local
variances (200 neighbours) about 20 % above the exact ones. ``--n 1000 --steps 1 --m 200
--subset 200`` (N = 11,000) takes a few minutes, most of it in the local variances' CG check.

Run::

    python benchmarks/bench_large.py                                          # n = 10,000, d = 10 (about 75 min)
    python benchmarks/bench_large.py --n 1000 --steps 1 --m 200 --subset 200  # minutes
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from gpderiv import DerivativeGP
from gpderiv.inference import RBFDerivativeLinearOperator
from gpderiv.inference.iterative import BlockJacobiPreconditioner
from gpderiv.local_variance import local_variance
from gpderiv.observed_rows import ObservedRows

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import _status_bytes  # noqa: E402


def data(n: int, d: int, seed: int, lengthscale: float = 0.3, features: int = 500) -> tuple[torch.Tensor, ...]:
    """Values and gradients of one smooth random function, plus noise (std 0.01) on both.

    The function is an approximate draw from a GP with an RBF kernel of the given lengthscale
    (random Fourier features, fixed by ``features`` frequencies drawn with seed 1234), so the
    model is well specified; the points are uniform in [0, 1]^d and drawn with ``seed``.
    """
    freq_gen = torch.Generator().manual_seed(1234)
    omega = torch.randn(features, d, generator=freq_gen, dtype=torch.float64) / lengthscale
    phase = 2 * math.pi * torch.rand(features, generator=freq_gen, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(n, d, generator=gen, dtype=torch.float64)
    Xg = X.clone().requires_grad_(True)
    f = math.sqrt(2 / features) * torch.cos(Xg @ omega.T + phase).sum(-1)
    (g,) = torch.autograd.grad(f.sum(), Xg)
    y = f.detach() + 0.01 * torch.randn(n, generator=gen, dtype=torch.float64)
    return X, y, g + 0.01 * torch.randn(n, d, generator=gen, dtype=torch.float64)


@torch.no_grad()
def cg_variance_path(model: DerivativeGP, Xs: torch.Tensor, iterations: int, every: int = 25) -> Iterator[tuple]:
    """Exact variances of ``[f, grad f](Xs)`` approached from above by preconditioned CG.

    CG on ``A x = k`` (one column per output, ``A`` the noisy training covariance, ``k`` the
    cross-covariance, preconditioned like the engine's solves) gives ``k^T x_j``, which increases
    to ``k^T A^-1 k``: ``prior - k^T x_j`` are upper bounds on the variances that decrease to them.

    Yields:
        ``(j, variances)`` after every ``every`` iterations and the last: internal units, block
        layout of the test points (as they come: one iteration costs seconds at full size).
    """
    xs = model.scaling.x(Xs)
    K_cross, scale = ObservedRows.block(xs).covariance(model.covar_module, model.data)
    b = (K_cross if scale is None else scale * K_cross).T
    noise, op = model.row_noise(), model.engine.operator(model.covar_module, model.data)
    P = BlockJacobiPreconditioner(op.X, op.lengthscale, op.outputscale, noise)
    prior = model.covar_module(xs, diag=True)
    x, r = torch.zeros_like(b), b.clone()
    z = P.solve(r)
    p, rz = z, (r * z).sum(0)
    for j in range(1, iterations + 1):
        Ap = op.matmul(p) + noise.unsqueeze(-1) * p
        pAp = (p * Ap).sum(0)
        alpha = torch.where(pAp > 0, rz / pAp, 0.0)  # 0: the column has converged exactly
        x, r = x + alpha * p, r - alpha * Ap
        if j % every == 0 or j == iterations:
            yield j, prior - (b * x).sum(0)
        z = P.solve(r)
        rz_next = (r * z).sum(0)
        p, rz = z + torch.where(rz > 0, rz_next / rz, 0.0) * p, rz_next


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--d", type=int, default=10)
    parser.add_argument("--subset", type=int, default=500, help="points of the dense subset fit")
    parser.add_argument("--steps", type=int, default=3, help="Adam steps on the full iterative likelihood")
    parser.add_argument("--m", type=int, default=1000, help="test points for the means")
    parser.add_argument("--neighbours", type=int, default=200, help="training points per local variance")
    parser.add_argument("--check-points", type=int, default=2, help="test points whose local variances CG checks")
    parser.add_argument("--check-iterations", type=int, default=150, help="CG iterations of that check")
    parser.add_argument("--check-neighbours", type=int, nargs="*", default=[], help="more neighbour counts to check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device of the data and the model (e.g. cuda)")
    parser.add_argument("--noise-floor", type=float, default=1e-4, help="noise_lower_bound of the model")
    args = parser.parse_args(argv)
    N = args.n * (1 + args.d)
    print(f"bench_large: n = {args.n}, d = {args.d}, N = {N:,}, dense matrix would be {8 * N * N / 2**30:.0f} GiB; "
          f"{torch.get_num_threads()} threads", flush=True)
    out: dict = {"N": N}
    start = time.perf_counter()

    products: list[int] = []  # columns of each product with the kernel operator (CG iterations)
    matmul = RBFDerivativeLinearOperator._matmul

    def counting(self: RBFDerivativeLinearOperator, rhs: torch.Tensor) -> torch.Tensor:
        products.append(rhs.shape[-1])
        return matmul(self, rhs)

    RBFDerivativeLinearOperator._matmul = counting
    try:
        return _stages(args, products, start, out)
    finally:
        RBFDerivativeLinearOperator._matmul = matmul


def _stages(args: argparse.Namespace, products: list[int], start: float, out: dict) -> dict:
    """The timed stages of :func:`main`; ``products`` collects the columns of each kernel product."""
    X, y, g = (t.to(args.device) for t in data(args.n, args.d, args.seed))
    Xs, ys, gs = (t.to(args.device) for t in data(args.m, args.d, args.seed + 1))

    def stage(name: str, t0: float) -> None:
        cuda = torch.device(args.device).type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = _status_bytes("VmHWM")
        out[name] = seconds
        gpu = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else ""
        print(f"{name:>24}: {seconds:8.1f} s (total {time.perf_counter() - start:7.1f} s), peak RSS "
              f"{(peak or 0) / 2**30:.2f} GiB{gpu}, {len(products)} kernel products ({sum(products)} columns)",
              flush=True)
        products.clear()

    t0 = time.perf_counter()
    # GPyTorch's default noise floor (1e-4 of Var(y)): a subset fit drives the value noise to the
    # floor (far-apart points in 10-D cannot separate it from the signal), and at 1e-6 CG needed
    # over 300 iterations per solve at N = 110,000 instead of about 100 (docs/benchmarks.md).
    model = DerivativeGP(X, y, g, inference="iterative", shared_grad_noise=True, noise_lower_bound=args.noise_floor)
    model.fit(subset=args.subset, maxiter=50, seed=args.seed, progress=False)
    stage("subset fit", t0)
    print(f"  hyperparameters: {model.hyperparameters()}\n  subset log ML {model.mll_history[-1]:.1f}", flush=True)
    if args.steps:
        t0 = time.perf_counter()
        model.fit(optimizer="adam", maxiter=args.steps, lr=0.05, progress=False)
        stage(f"{args.steps} full MLL steps", t0)
        print(f"  full-data log ML before each step {[round(v, 1) for v in model.mll_history]}", flush=True)
        print(f"  hyperparameters: {model.hyperparameters()}", flush=True)
    t0 = time.perf_counter()
    pred = model.predict(Xs, variance=False)
    stage(f"factor + means, {args.m} pts", t0)
    out["rmse_f"] = (pred.mean - ys).square().mean().sqrt().item()
    out["rmse_grad"] = (pred.grad_mean - gs).square().mean().sqrt().item()
    print(f"  RMSE f {out['rmse_f']:.4f} (noise 0.01), RMSE grad f {out['rmse_grad']:.4f}", flush=True)
    t0 = time.perf_counter()
    # observation_noise: the test targets are noisy measurements, like the training data.
    local = model.predict(Xs, variance="local", neighbours=args.neighbours, observation_noise=True)
    stage(f"local variances, {args.m} pts", t0)
    for name, err, var in (
        ("f", local.mean - ys, local.variance),
        ("grad f", local.grad_mean - gs, local.grad_variance),
    ):
        z2 = err.square() / var
        out[f"z2_{name}"], out[f"cover_{name}"] = z2.mean().item(), (z2 < 1.96**2).double().mean().item()
        print(f"  {name}: mean std {var.sqrt().mean():.4f}, mean error^2 / variance {z2.mean():.3f}, "
              f"within 1.96 std {100 * out[f'cover_{name}']:.1f} %", flush=True)
    if args.check_points:
        c = args.check_points
        xs = model.scaling.x(Xs[:c])
        system = (model.covar_module, model.data, model.row_noise(), model.residual())
        local = {k: local_variance(*system, xs, k) for k in sorted({args.neighbours, *args.check_neighbours})}
        t0 = time.perf_counter()
        for j, var in cg_variance_path(model, Xs[:c], args.check_iterations, every=10):
            print(f"  after {j:4d} CG iterations ({time.perf_counter() - t0:.0f} s), local / CG variance "
                  "median [min, max]: " + ", ".join(
                      f"k = {k}: {(v / var).median():.4f} [{(v / var).min():.4f}, {(v / var).max():.4f}]"
                      for k, v in local.items()), flush=True)
        stage(f"CG check, {c} pts", t0)
        out["check_ratio"] = {k: (v / var).tolist() for k, v in local.items()}
    out["peak_gib"] = (_status_bytes("VmHWM") or 0) / 2**30
    return out


if __name__ == "__main__":
    main()
