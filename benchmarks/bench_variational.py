"""The variational engine against exact inference: accuracy, calibration, time and peak memory.

Cases (each runs in its own process, so that its peak memory is its own):

* ``synthetic``: n points with gradients of a smooth 3-D function (``--n``, default 20,000,
  N = 80,000 rows); the variational engine against an exact (dense) GP on the largest random
  subset of the training points that fits and predicts in the same time (sizes tried in turn);
* ``million``: the same function at n = 250,000 points (N = 1,000,000 rows), variational only;
* ``terrain``: Mount St Helens, random 50/50 split (as ``examples/terrain.py``), variational
  against the exact GP of the default ``fit()`` (hyperparameters on a compact window, one factorisation);
* ``iterative``: n = 10,000 points in d = 10 (N = 110,000 rows), variational against the
  iterative engine's default ``fit()`` (hyperparameters on a compact window, then CG on all the
  data), means and local variances (``predict(variance="local")``).

``--variational-only`` skips the exact and iterative comparisons.

Reported per model: RMSE of f and of grad f on held-out points, mean z^2 = error^2 / variance
(1 is calibrated) and 95 % coverage of f and grad f, fit and predict seconds, peak resident memory.

Run::

    python benchmarks/bench_variational.py --case synthetic            # minutes on 2 cores
    python benchmarks/bench_variational.py --case million --device cuda
    python benchmarks/bench_variational.py --case all --out results.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch
from torch.func import grad, vmap

from gpderiv import DerivativeGP

DTYPE = torch.float64


def target(x: torch.Tensor) -> torch.Tensor:
    """A smooth test function on [0, 1]^d (sines of different frequencies along mixed directions)."""
    d = x.shape[-1]
    w = torch.linspace(1.0, 3.0, d, dtype=x.dtype)
    return torch.sin(2 * x @ w) + 0.5 * torch.cos(3 * x[..., 0] - 2 * x[..., -1]) + 0.3 * (x**2).sum(-1)


def sample(n: int, d: int, seed: int, noise: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`n` uniform points with noisy values and gradients of :func:`target`."""
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, d, dtype=DTYPE, generator=g)
    y = vmap(target)(X) + noise * torch.randn(n, dtype=DTYPE, generator=g)
    G = vmap(grad(target))(X) + noise * torch.randn(n, d, dtype=DTYPE, generator=g)
    return X, y, G


def scores(
    model: DerivativeGP,
    Xs: torch.Tensor,
    ys: np.ndarray,
    Gs: np.ndarray | None,
    variance=True,
    grad_noise: torch.Tensor | None = None,
) -> dict:
    """RMSE, mean z^2 and 95 % coverage of f (and grad f when given) at test points.

    ``grad_noise``: `d` slope noise variances; also scores the slopes against the band with it
    added (``*_grad_obs``: for test slopes that are measurements).
    """
    start = time.perf_counter()
    pred = model.predict(Xs, variance=variance)
    out = {"predict_s": time.perf_counter() - start}
    pairs = [("f", pred.mean, pred.variance, ys)]
    if Gs is not None:
        pairs.append(("grad", pred.grad_mean, pred.grad_variance, Gs))
    if grad_noise is not None:
        pairs.append(("grad_obs", pred.grad_mean, pred.grad_variance + grad_noise, Gs))
    for name, mean, var, truth in pairs:
        err = mean.detach().numpy() - truth
        var = var.detach().numpy()
        out[f"rmse_{name}"] = float(np.sqrt(np.mean(err**2)))
        out[f"z2_{name}"] = float(np.mean(err**2 / var))
        out[f"cover_{name}"] = float(np.mean(np.abs(err) <= 1.96 * np.sqrt(var)))
    return out


def fitted(model: DerivativeGP, **fit_kwargs) -> tuple[DerivativeGP, float]:
    start = time.perf_counter()
    model.fit(**fit_kwargs)
    model.factor()
    return model, time.perf_counter() - start


def exact_in_time(X, y, G, Xs, ys, Gs, budget: float, seed: int) -> dict:
    """The exact GP on the largest random subset whose fit + predict took at most ``budget`` seconds."""
    best, size = None, 250
    order = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(seed))
    while size <= X.shape[0]:
        index = order[:size]
        model, fit_s = fitted(DerivativeGP(X[index], y[index], G[index], inference="dense"), seed=seed)
        row = {"model": f"exact, random {size} points", "fit_s": fit_s, **scores(model, Xs, ys, Gs)}
        if best is not None and fit_s + row["predict_s"] > budget:
            break
        best = row
        if fit_s + row["predict_s"] > budget / 2.5:  # the next size (1.6x the points) costs about 4x
            break
        size = int(size * 1.6)
    return best


def case_synthetic(args: argparse.Namespace, n: int, compare: bool) -> list[dict]:
    X, y, G = sample(n, 3, args.seed)
    Xs, ys, Gs = sample(2000, 3, args.seed + 1, noise=0.0)
    X, y, G, Xs = (t.to(args.device) for t in (X, y, G, Xs))
    model, fit_s = fitted(
        DerivativeGP(X, y, G, inference="variational"), seed=args.seed, progress=args.progress, maxiter=args.maxiter
    )
    state = model.engine_state
    row = {
        "model": f"variational, M = {state.Z.shape[0]}, p = {state.p}",
        "N": model.num_observations,
        "fit_s": fit_s,
        "steps": len(model.mll_history),
        **scores(model, Xs, ys.numpy(), Gs.numpy()),
    }
    rows = [row]
    if compare:
        rows.append(exact_in_time(X, y, G, Xs, ys.numpy(), Gs.numpy(), fit_s + row["predict_s"], args.seed))
    return rows


def case_terrain(args: argparse.Namespace) -> list[dict]:
    from gpderiv.datasets import mount_st_helens

    data = mount_st_helens()
    X, y, G = data.X, data.y, data.grad
    order = np.random.default_rng(args.seed).permutation(len(y))
    train, test = np.sort(order[: len(y) // 2]), np.sort(order[len(y) // 2 :])
    centre = y[train].mean().item()

    def error(model: DerivativeGP) -> dict:
        # The test slopes are measurements (noisy: they correlate about 0.8 with the elevation's own
        # slopes), so they are also scored against the band with the fitted slope noise added.
        one = X[test][:1]
        noise = model.predict(one, observation_noise=True).grad_variance - model.predict(one).grad_variance
        row = scores(model, X[test], y[test].numpy(), G[test].numpy(), grad_noise=noise)
        pred = model.predict(X[test], variance=False).mean.numpy()
        row["rel_error"] = float(np.linalg.norm(pred - y[test].numpy()) / np.linalg.norm(y[test].numpy() - centre))
        return row

    rows = []
    model, fit_s = fitted(
        DerivativeGP(X[train], y[train], G[train], inference="variational"),
        seed=args.seed,
        progress=args.progress,
        maxiter=args.maxiter,
    )
    state = model.engine_state
    rows.append({"model": f"variational, M = {state.Z.shape[0]}, p = {state.p}", "fit_s": fit_s, **error(model)})
    if args.variational_only:
        return rows
    exact, fit_s = fitted(DerivativeGP(X[train], y[train], G[train], inference="dense"), progress=False)
    rows.append({"model": "exact, default fit() (compact-window hyperparameters)", "fit_s": fit_s, **error(exact)})
    return rows


def case_iterative(args: argparse.Namespace) -> list[dict]:
    X, y, G = sample(10_000, 10, args.seed)
    Xs, ys, Gs = sample(1000, 10, args.seed + 1, noise=0.0)
    model, fit_s = fitted(
        DerivativeGP(X, y, G, inference="variational"), seed=args.seed, progress=args.progress, maxiter=args.maxiter
    )
    state = model.engine_state
    name = f"variational, M = {state.Z.shape[0]}, p = {state.p}"
    rows = [{"model": name, "fit_s": fit_s, **scores(model, Xs, ys.numpy(), Gs.numpy())}]
    if args.variational_only:
        return rows
    exact, fit_s = fitted(DerivativeGP(X, y, G, inference="iterative"), seed=args.seed, progress=args.progress)
    name = "iterative, default fit() (compact-window hyperparameters, CG), local variances"
    rows.append({"model": name, "fit_s": fit_s, **scores(exact, Xs, ys.numpy(), Gs.numpy(), variance="local")})
    return rows


def run_case(args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(args.seed)
    if args.case == "synthetic":
        rows = case_synthetic(args, args.n, compare=not args.variational_only)
    elif args.case == "million":
        rows = case_synthetic(args, 250_000, compare=False)
    elif args.case == "terrain":
        rows = case_terrain(args)
    else:
        rows = case_iterative(args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB
    if args.device == "cuda":
        peak_gpu = torch.cuda.max_memory_allocated() / 2**30
        for row in rows:
            row["peak_gpu_gib"] = peak_gpu
    for row in rows:
        row.update(case=args.case, peak_rss_gib=peak, device=args.device, threads=torch.get_num_threads())
    return rows


def print_rows(rows: list[dict]) -> None:
    keys = ("rmse_f", "rmse_grad", "z2_f", "z2_grad", "cover_f", "cover_grad", "z2_grad_obs", "cover_grad_obs")
    keys += ("rel_error", "fit_s", "predict_s")
    print(f"{'case':10s} {'model':58s} " + " ".join(f"{k:>10s}" for k in keys) + f" {'peak GiB':>9s}")
    for row in rows:
        values = " ".join(f"{row[k]:10.4g}" if isinstance(row.get(k), float) else f"{'':>10s}" for k in keys)
        print(f"{row['case']:10s} {row['model']:58s} {values} {row['peak_rss_gib']:9.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=["synthetic", "million", "terrain", "iterative", "all"], default="synthetic")
    parser.add_argument("--n", type=int, default=20_000, help="points of the synthetic case")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--maxiter", type=int, default=None, help="Adam steps (variational)")
    parser.add_argument("--variational-only", action="store_true", help="skip the exact comparisons")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_case(args)))
        return
    cases = ["synthetic", "terrain", "million", "iterative"] if args.case == "all" else [args.case]
    rows: list[dict] = []
    for case in cases:
        command = [sys.executable, __file__, "--worker", "--case", case, "--n", str(args.n), "--device", args.device]
        command += ["--seed", str(args.seed)] + (["--variational-only"] if args.variational_only else [])
        command += [] if args.maxiter is None else ["--maxiter", str(args.maxiter)]
        command += ["--progress"] if args.progress else []
        result = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
        rows += json.loads(result.stdout.strip().splitlines()[-1])
        print_rows(rows)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
