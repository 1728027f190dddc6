"""Franke function in 2-D with noisy values and gradients (after GPyTorch's 2-D derivative tutorial).

Training data: the 10 x 10 grid ``meshgrid(linspace(0, 1, 10))`` of [0, 1]^2; the value and both
partial derivatives at each point, each with independent Gaussian noise of std 0.05 (seeded).
The gradients of the Franke function come from ``torch.func`` (the function is written once, in
torch). Two GPs are fitted with the default L-BFGS fit: (a) on values and gradients (N = 300
observations), (b) on the values only (N = 100). Both are evaluated on a 50 x 50 grid: RMSE of f
and of grad f (over both components), fit time and predict time.

Run::

    python examples/franke_2d.py                  # seed 0, writes examples/output/franke_2d.png
    python examples/franke_2d.py --seeds 0 1 2    # one row per seed (the PNG shows the first)
    python examples/franke_2d.py --smoke          # a few seconds
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.ticker import MaxNLocator

from gpderiv import DerivativeGP, OptimizationWarning
from gpderiv.datasets import franke_with_grad
from gpderiv.plot import plot_2d, plot_map, save_figure

DTYPE = torch.float64
NOISE_STD = 0.05
Z95 = 1.959963984540054  # two-sided 95 % normal quantile
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")


def grid(k: int) -> torch.Tensor:
    """The `k^2 x 2` points of ``meshgrid(linspace(0, 1, k), linspace(0, 1, k))`` (ij indexing)."""
    u = torch.linspace(0, 1, k, dtype=DTYPE)
    xv, yv = torch.meshgrid(u, u, indexing="ij")
    return torch.stack([xv.reshape(-1), yv.reshape(-1)], dim=-1)


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).square().mean().sqrt().item()


def run_seed(seed: int, train_k: int, test_k: int, maxiter: int | None) -> dict:
    """Fit both GPs for one noise seed; return metrics and what the plot needs."""
    X = grid(train_k)
    f_clean, g_clean = franke_with_grad(X)
    gen = torch.Generator().manual_seed(seed)
    noise = NOISE_STD * torch.randn(X.shape[0], 3, generator=gen, dtype=DTYPE)
    y, g = f_clean + noise[:, 0], g_clean + noise[:, 1:]

    Xs = grid(test_k)
    f_true, g_true = franke_with_grad(Xs)
    out: dict = {"seed": seed, "X": X, "y": y, "g": g, "Xs": Xs, "f_true": f_true}
    for key, gr in (("grad", g), ("value", None)):
        t0 = time.perf_counter()
        model = DerivativeGP(X, y, gr).fit(maxiter=maxiter)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        with torch.no_grad():
            pred = model.predict(Xs)
        predict_s = time.perf_counter() - t0
        out[key] = {
            "N": model.num_observations,
            "rmse_f": rmse(pred.mean, f_true),
            "rmse_grad": rmse(pred.grad_mean, g_true),
            "fit_s": fit_s,
            "predict_s": predict_s,
            "mll": model.mll,
            "iters": len(model.mll_history),
            "mean": pred.mean,
            "std": pred.std,
            "model": model,
            "hyper": {k: v.tolist() for k, v in model.hyperparameters().items()},
        }
    return out


def plot(r: dict, test_k: int, png: str, arrows: int = 12) -> None:
    """Truth, data, both GPs' means with gradient fields and their stds (:func:`gpderiv.plot.plot_2d`), errors.

    Columns: truth / training data / calibration, then the GP with gradients, then the value-only
    GP; rows: mean, posterior std, signed error. Both GPs share every colour scale and the arrow
    scale, so the panels compare directly.
    """
    shape = (test_k, test_k)
    u = r["Xs"][:, 0].reshape(shape)[:, 0].numpy()  # the test grid is ij-indexed: rows follow x1
    truth = r["f_true"].reshape(shape).numpy().T  # rows follow x2 from here on
    means = {key: r[key]["mean"].reshape(shape).numpy().T for key in ("grad", "value")}
    stds = {key: r[key]["std"].reshape(shape).numpy().T for key in ("grad", "value")}
    errors = {key: means[key] - truth for key in means}
    limit = max(np.abs(e).max() for e in errors.values())
    lo = min(truth.min(), *(m.min() for m in means.values()))
    hi = max(truth.max(), *(m.max() for m in means.values()))
    levels = MaxNLocator(20).tick_values(lo, hi)
    std_levels = MaxNLocator(12).tick_values(0.0, max(s.max() for s in stds.values()))
    centres = (torch.arange(arrows, dtype=DTYPE) + 0.5) / arrows
    cu, cv = torch.meshgrid(centres, centres, indexing="xy")
    arrow_X = torch.stack([cu.reshape(-1), cv.reshape(-1)], dim=-1)
    true_grad = franke_with_grad(arrow_X)[1]
    arrow_scale = true_grad.norm(dim=-1).max().item() * arrows
    bounds = [[0.0, 0.0], [1.0, 1.0]]

    fig, axes = plt.subplots(3, 3, figsize=(16, 14.5), layout="constrained")
    ax = axes[0, 0]
    im = ax.contourf(u, u, truth, levels=levels, cmap="viridis")  # the levels cover the truth
    fig.colorbar(im, ax=ax, label="f (Franke function)")
    arrow_style = {"angles": "xy", "scale_units": "xy", "scale": arrow_scale}
    A, G = arrow_X.numpy(), true_grad.numpy()
    ax.quiver(
        A[:, 0], A[:, 1], G[:, 0], G[:, 1], color="white", edgecolor="k", linewidth=0.3, width=0.004, **arrow_style
    )
    ax.set_title("truth: f and its gradient (white arrows)", fontsize=10)
    for col, key, title in ((1, "grad", "with gradients"), (2, "value", "values only")):
        plot_2d(
            r[key]["model"], bounds=bounds, resolution=test_k, axes=axes[:2, col], arrows=arrows, levels=levels,
            std_levels=std_levels, arrow_scale=arrow_scale,
        )
        axes[0, col].set_title(f"GP {title}: mean and gradient (RMSE f {r[key]['rmse_f']:.2g})", fontsize=10)
        axes[1, col].set_title(f"GP {title}: posterior std of f", fontsize=10)
        plot_map(errors[key], u, u, ax=axes[2, col], label="error of f (GP mean − truth)", diverging=True, limit=limit)
        axes[2, col].set_title(f"GP {title}: error (RMSE of grad f {r[key]['rmse_grad']:.2g})", fontsize=10)
    ax = axes[1, 0]
    X, y, g = r["X"].numpy(), r["y"].numpy(), r["g"].numpy()
    sc = ax.scatter(X[:, 0], X[:, 1], c=y, cmap="viridis", vmin=lo, vmax=hi, s=30, edgecolor="k", linewidth=0.5)
    fig.colorbar(sc, ax=ax, label="observed f")
    ax.quiver(X[:, 0], X[:, 1], g[:, 0], g[:, 1], color="tab:red", width=0.005, zorder=3, **arrow_style)
    ax.set_title(f"training data: values and gradients (red), noise std {NOISE_STD}", fontsize=10)
    for ax in (axes[0, 0], axes[1, 0]):
        ax.set_aspect("equal")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="$x_1$", ylabel="$x_2$")
    calibration(axes[2, 0], errors, stds)
    k = round(len(X) ** 0.5)
    fig.suptitle(f"Franke function from noisy values and gradients on a {k} x {k} grid, seed {r['seed']}")
    save_figure(fig, png)
    plt.close(fig)


def calibration(ax: plt.Axes, errors: dict, stds: dict) -> None:
    """Histogram of the standardised errors ``(mean - truth) / std`` of both GPs against N(0, 1)."""
    bins = np.linspace(-5, 5, 41)
    for key, title, color in (("grad", "with gradients", "C0"), ("value", "values only", "C1")):
        z = (errors[key] / stds[key]).ravel()
        inside = np.mean(np.abs(z) <= Z95)
        ax.hist(np.clip(z, bins[0], bins[-1]), bins=bins, density=True, histtype="step", lw=1.5, color=color,
                label=f"{title}: {inside:.0%} within ±1.96 std")
    grid = np.linspace(bins[0], bins[-1], 200)
    ax.plot(grid, np.exp(-0.5 * grid**2) / np.sqrt(2 * np.pi), "k--", lw=1, label="N(0, 1): calibrated")
    ax.set_xlabel("standardised error (GP mean − truth) / std (clipped to ±5)")
    ax.set_ylabel("density over the test grid")
    ax.set_title("calibration of the posterior std", fontsize=10)
    ax.set_ylim(0, 1.3 * ax.get_ylim()[1])  # room for the legend
    ax.legend(fontsize=8, loc="upper left")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="several noise seeds, one row each")
    parser.add_argument("--maxiter", type=int, default=None, help="L-BFGS iteration limit (default: the package's)")
    parser.add_argument("--smoke", action="store_true", help="tiny run: 5 x 5 training grid, 20 x 20 test grid")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output directory for the PNG (default examples/output)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    seeds = args.seeds if args.seeds is not None else [args.seed]
    train_k, test_k = (5, 20) if args.smoke else (10, 50)
    maxiter = args.maxiter if args.maxiter is not None else (30 if args.smoke else None)

    # Warm-up: the first fit in a process pays one-time costs (lazy imports, allocator); keep them out of the timings.
    X0 = grid(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizationWarning)  # stopping at maxiter=2 is the point here
        DerivativeGP(X0, *franke_with_grad(X0)).fit(maxiter=2).predict(X0)
    results = [run_seed(seed, train_k, test_k, maxiter) for seed in seeds]

    print(
        f"franke_2d: {train_k} x {train_k} training grid, noise std {NOISE_STD} on values and gradients, "
        f"{test_k} x {test_k} test grid, torch threads {torch.get_num_threads()}"
    )
    header = (
        f"{'seed':>4} {'model':<12} {'N':>4} {'RMSE f':>9} {'RMSE grad':>10} {'log ML':>9} {'iters':>5} "
        f"{'fit [s]':>8} {'pred [s]':>9}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for r in results:
        for key, label in (("grad", "with grad"), ("value", "values only")):
            m = r[key]
            print(
                f"{r['seed']:>4d} {label:<12} {m['N']:>4d} {m['rmse_f']:>9.4f} {m['rmse_grad']:>10.4f} "
                f"{m['mll']:>9.1f} {m['iters']:>5d} {m['fit_s']:>8.2f} {m['predict_s']:>9.3f}"
            )
            rows.append(
                {"seed": r["seed"], "model": key, **{k: v for k, v in m.items() if k not in ("mean", "std", "model")}}
            )

    png = os.path.join(args.out, "franke_2d.png")
    plot(results[0], test_k, png)
    print(f"wrote {png}")
    return {"rows": rows, "png": png}


if __name__ == "__main__":
    main()
