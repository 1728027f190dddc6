"""Derivatives of noisy data: a value-only GP against ``np.gradient``, with 95 % bands and curvature.

Part 1. ``y = sin(x) + noise`` (noise std 0.05, seeded) at n = 50 points of ``[0, 2 pi]``, once on
a uniform grid (``linspace``) and once on a non-uniform one (``x = 2 pi u^1.5`` with ``u``
evenly spaced in [0, 1]: spacing from 0.018 near 0 to 0.19 near 2 pi). A value-only ``DerivativeGP``
is fitted to each; its posterior mean and 95 % band (mean +- 1.96 std) of ``f'`` (``predict``)
and ``f''`` (``predict_hessian``) are compared with the truth ``cos x`` and ``-sin x`` and
with ``np.gradient(y, x)`` (second-order central differences, non-uniform aware, one-sided at
the two ends) applied once for ``f'`` and twice for ``f''``. For a like-for-like comparison the
RMSE and the band coverage (fraction of the truth inside the band) are taken at the data
points, where ``np.gradient`` is defined; the GP's are also given on a dense grid.

Part 2. The curvature ``kappa = (x' y'' - y' x'') / (x'^2 + y'^2)^(3/2)`` of the figure-eight
Lissajous curve ``(x, y) = (sin t, sin 2t)``, sampled at 40 uniform ``t`` in ``[0, 2 pi]``
with noise std 0.02 on each coordinate: one GP per coordinate in ``t``, pointwise 95 % bands
of kappa by Monte Carlo from the exact joint posterior of ``(f'(t), f''(t))`` (see
:func:`derivative_pair`), against kappa from ``np.gradient`` applied to the noisy samples.

Run::

    python examples/noisy_derivatives.py            # full run, writes examples/output/noisy_derivatives.png
    python examples/noisy_derivatives.py --smoke    # a few seconds
"""

from __future__ import annotations

import argparse
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from gpderiv import DerivativeGP  # noqa: E402
from gpderiv.plot import save_figure  # noqa: E402

DTYPE = torch.float64
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")
Z95 = 1.959963984540054  # two-sided 95 % normal quantile


# ------------------------------------------------------------------------------------ helpers
def rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(a - b))))


def coverage(truth: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    return float(np.mean((truth >= lo) & (truth <= hi)))


def col(x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(x, dtype=DTYPE).reshape(-1, 1)


def gp_derivatives(model: DerivativeGP, x: np.ndarray) -> dict[str, np.ndarray]:
    """Posterior mean and std of f, f' and f'' at the points ``x`` (numpy, 1-D)."""
    X = col(x)
    pred = model.predict(X)
    h_mean, h_var = model.predict_hessian(X)
    return {
        "f": pred.mean.numpy(),
        "f_std": pred.std.numpy(),
        "d1": pred.grad_mean[:, 0].numpy(),
        "d1_std": pred.grad_std[:, 0].numpy(),
        "d2": h_mean[:, 0, 0].numpy(),
        "d2_std": h_var[:, 0, 0].clamp_min(0.0).sqrt().numpy(),
    }


def derivative_pair(model: DerivativeGP, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact joint Gaussian posterior of ``(f'(t_i), f''(t_i))`` at each point ``t_i`` of ``t``.

    The means and variances come from ``predict`` (f') and ``predict_hessian`` (f''). The
    cross-covariance is not returned by either, but it follows from the variance of f': with
    ``C(s, t) = Cov(f'(s), f'(t))`` (symmetric), ``d/dt Var f'(t) = d/dt C(t, t) =
    2 Cov(f'(t), f''(t))``. ``predict`` is differentiable in its inputs, so autograd gives this
    derivative exactly; each ``grad_variance[i]`` depends on ``t_i`` only, so one backward pass of
    the sum gives all of them. (:func:`check_cross_covariance` compares it with central
    differences of the ``full_cov`` gradient covariance.)

    Returns:
        ``(mean, cov)``: `m x 2` means and `m x 2 x 2` covariances of ``(f', f'')``.
    """
    T = col(t).requires_grad_(True)
    pred = model.predict(T)
    var1 = pred.grad_variance[:, 0]
    (dvar1,) = torch.autograd.grad(var1.sum(), T)
    h_mean, h_var = model.predict_hessian(T.detach())
    mean = torch.stack([pred.grad_mean[:, 0].detach(), h_mean[:, 0, 0]], -1)
    c12 = 0.5 * dvar1[:, 0]
    cov = torch.stack(
        [torch.stack([var1.detach(), c12], -1), torch.stack([c12, h_var[:, 0, 0]], -1)],
        -2,
    )
    return mean.numpy(), cov.numpy()


def check_cross_covariance(model: DerivativeGP, t: np.ndarray, h: float = 1e-4) -> float:
    """Largest ``|autograd - central difference|`` of ``Cov(f', f'')`` over ``t``, relative to ``std f' std f''``.

    The central difference is ``(C(t, t + h) - C(t, t - h)) / 2h`` with ``C`` the gradient block of
    ``predict(..., full_cov=True).covariance`` (block layout: the `3m` values, then the `3m` f'); its
    error is O(h^2) (about 1e-8 relative at the default h), until rounding takes over below h ~ 1e-5.
    """
    m = len(t)
    _, cov = derivative_pair(model, t)
    Xs = col(np.concatenate([t - h, t, t + h]))
    C = model.predict(Xs, full_cov=True).covariance.numpy()[3 * m :, 3 * m :]
    i = np.arange(m)
    fd = (C[m + i, 2 * m + i] - C[m + i, i]) / (2 * h)
    scale = np.sqrt(cov[:, 0, 0] * cov[:, 1, 1])
    return float(np.max(np.abs(cov[:, 0, 1] - fd) / scale))


def curvature(dx: np.ndarray, ddx: np.ndarray, dy: np.ndarray, ddy: np.ndarray) -> np.ndarray:
    return (dx * ddy - dy * ddx) / (dx**2 + dy**2) ** 1.5


# ------------------------------------------------------------------------------------ part 1
def sine_part(name: str, x: np.ndarray, y: np.ndarray, xs: np.ndarray, maxiter: int | None) -> dict:
    """Fit a value-only GP to ``(x, y)`` and compare its f', f'' with np.gradient."""
    model = DerivativeGP(col(x), torch.as_tensor(y, dtype=DTYPE)).fit(maxiter=maxiter)
    at_data, dense = gp_derivatives(model, x), gp_derivatives(model, xs)
    truth = {"d1": np.cos(x), "d2": -np.sin(x)}
    truth_dense = {"d1": np.cos(xs), "d2": -np.sin(xs)}
    g1 = np.gradient(y, x)
    g2 = np.gradient(g1, x)
    rows = []
    for key, fd, fd_label in (("d1", g1, "np.gradient"), ("d2", g2, "np.gradient x2")):
        p, s = at_data[key], at_data[key + "_std"]
        pd, sd = dense[key], dense[key + "_std"]
        rows.append(
            {
                "grid": name,
                "quantity": "f'" if key == "d1" else "f''",
                "method": "GP",
                "rmse": rmse(p, truth[key]),
                "cover": coverage(truth[key], p - Z95 * s, p + Z95 * s),
                "rmse_dense": rmse(pd, truth_dense[key]),
                "cover_dense": coverage(truth_dense[key], pd - Z95 * sd, pd + Z95 * sd),
            }
        )
        rows.append(
            {
                "grid": name,
                "quantity": "f'" if key == "d1" else "f''",
                "method": fd_label,
                "rmse": rmse(fd, truth[key]),
                "cover": math.nan,
                "rmse_dense": math.nan,
                "cover_dense": math.nan,
            }
        )
    hp = model.hyperparameters()
    return {
        "name": name,
        "x": x,
        "y": y,
        "dense": dense,
        "g1": g1,
        "g2": g2,
        "rows": rows,
        "noise_std": float(hp["noise"].sqrt().reshape(-1)[0]),
        "lengthscale": float(hp["base_kernel.lengthscale"].reshape(-1)[0]),
    }


# ------------------------------------------------------------------------------------ part 2
def lissajous(t: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(x, x', x'', y, y', y'')`` of the figure eight ``(sin t, sin 2t)``."""
    return np.sin(t), np.cos(t), -np.sin(t), np.sin(2 * t), 2 * np.cos(2 * t), -4 * np.sin(2 * t)


def curve_part(
    t: np.ndarray, xy: tuple[np.ndarray, np.ndarray], ts: np.ndarray, samples: int, maxiter: int | None, seed: int
) -> dict:
    """Curvature of a noisy parametric curve: GP (Monte Carlo bands) against np.gradient."""
    rng = np.random.default_rng(seed)
    models = [DerivativeGP(col(t), torch.as_tensor(c, dtype=DTYPE)).fit(maxiter=maxiter) for c in xy]

    def gp_curvature(tt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # Pointwise bands need the distribution of kappa(t_i) at each t_i only, i.e. the joint
        # law of (x', x'', y', y'')(t_i). The two coordinate GPs are independent posteriors, and
        # each contributes its exact 2 x 2 Gaussian of (f', f'') at t_i; kappa is nonlinear in
        # them, so sample: `samples` draws per point, 2.5 / 97.5 % quantiles.
        draws, plug_in = [], []
        for model in models:
            mean, cov = derivative_pair(model, tt)
            L = np.linalg.cholesky(cov + 1e-12 * np.eye(2) * cov.trace(axis1=1, axis2=2)[:, None, None])
            z = rng.standard_normal((len(tt), samples, 2))
            draws.append(mean[:, None, :] + np.einsum("mab,msb->msa", L, z))
            plug_in.append(mean)
        (mx, my), (dx, dy) = plug_in, draws
        k_mean = curvature(mx[:, 0], mx[:, 1], my[:, 0], my[:, 1])
        k_draws = curvature(dx[..., 0], dx[..., 1], dy[..., 0], dy[..., 1])
        lo, hi = np.quantile(k_draws, [0.025, 0.975], axis=1)
        return k_mean, lo, hi

    k_true = curvature(*[lissajous(t)[i] for i in (1, 2, 4, 5)])
    k_true_dense = curvature(*[lissajous(ts)[i] for i in (1, 2, 4, 5)])
    k_gp, lo, hi = gp_curvature(t)
    k_gp_dense, lo_dense, hi_dense = gp_curvature(ts)
    gx, gy = np.gradient(xy[0], t), np.gradient(xy[1], t)
    k_fd = curvature(gx, np.gradient(gx, t), gy, np.gradient(gy, t))
    rows = [
        {
            "grid": "curve",
            "quantity": "kappa",
            "method": "GP (MC)",
            "rmse": rmse(k_gp, k_true),
            "cover": coverage(k_true, lo, hi),
            "rmse_dense": rmse(k_gp_dense, k_true_dense),
            "cover_dense": coverage(k_true_dense, lo_dense, hi_dense),
        },
        {
            "grid": "curve",
            "quantity": "kappa",
            "method": "np.gradient",
            "rmse": rmse(k_fd, k_true),
            "cover": math.nan,
            "rmse_dense": math.nan,
            "cover_dense": math.nan,
        },
    ]
    return {
        "t": t,
        "xy": xy,
        "ts": ts,
        "models": models,
        "k_fd": k_fd,
        "k_true_dense": k_true_dense,
        "k_gp_dense": k_gp_dense,
        "lo_dense": lo_dense,
        "hi_dense": hi_dense,
        "rows": rows,
        "cov_check": max(check_cross_covariance(m, t) for m in models),
    }


# ------------------------------------------------------------------------------------ figure
def _clip_to_view(
    ax: plt.Axes, truth: np.ndarray, lo: np.ndarray, hi: np.ndarray, fd: np.ndarray, top: float = 0.6
) -> int:
    """Limit the y range to the truth and the band (``top``: room for the legend); count np.gradient points outside."""
    ymin, ymax = min(truth.min(), lo.min()), max(truth.max(), hi.max())
    span = ymax - ymin
    ymin, ymax = ymin - 0.15 * span, ymax + top * span
    ax.set_ylim(ymin, ymax)
    return int(np.sum((fd < ymin) | (fd > ymax)))


def plot_sine(axes: list[plt.Axes], r: dict, xs: np.ndarray) -> None:
    """f' and f'' of one sine data set; the RMSEs go in the titles, the legend below the figure."""
    d = r["dense"]
    rows = {(row["quantity"], row["method"]): row for row in r["rows"]}
    for ax, key, truth, fd, fd_label, q in (
        (axes[0], "d1", np.cos(xs), r["g1"], "np.gradient", "f'"),
        (axes[1], "d2", -np.sin(xs), r["g2"], "np.gradient x2", "f''"),
    ):
        lo, hi = d[key] - Z95 * d[key + "_std"], d[key] + Z95 * d[key + "_std"]
        ax.fill_between(xs, lo, hi, color="C0", alpha=0.25, lw=0, label="GP 95 % band")
        ax.plot(xs, d[key], color="C0", lw=1.5, label="GP mean")
        ax.plot(xs, truth, "k--", lw=1, label="truth")
        off = _clip_to_view(ax, truth, lo, hi, fd, top=0.15)
        extra = f", {off} points off-scale" if off else ""
        ax.plot(r["x"], fd, "o", color="C3", ms=3, label="np.gradient of the data (applied twice for f'')")
        ax.plot(r["x"], np.full_like(r["x"], ax.get_ylim()[0]), "|", color="0.4", ms=6, label="data positions")
        ax.set_title(
            f"{r['name']} grid: {q}(x) of sin(x)\nRMSE: GP {rows[(q, 'GP')]['rmse']:.3f}, "
            f"{fd_label} {rows[(q, fd_label)]['rmse']:.3f}{extra}",
            fontsize=10,
        )
        ax.set_xlabel("x")
        ax.set_ylabel(f"{q}(x)")


def plot_curve(ax_xy: plt.Axes, ax_k: plt.Axes, c: dict) -> None:
    ts = c["ts"]
    xt, _, _, yt, _, _ = lissajous(ts)
    ax_xy.plot(xt, yt, "k--", lw=1, label="truth (sin t, sin 2t)")
    ax_xy.plot(c["xy"][0], c["xy"][1], "o", color="C3", ms=3, label=f"{len(c['t'])} noisy samples")
    mx = c["models"][0].predict(col(ts)).mean.numpy()
    my = c["models"][1].predict(col(ts)).mean.numpy()
    ax_xy.plot(mx, my, color="C0", lw=1.5, label="GP mean")
    ax_xy.set_aspect("equal")
    ax_xy.set_ylim(-1.2, 1.7)  # room for the legend above the curve
    ax_xy.set_title("parametric curve (x(t), y(t))", fontsize=10)
    ax_xy.set_xlabel("x(t)")
    ax_xy.set_ylabel("y(t)")
    ax_xy.legend(fontsize=8, loc="upper right")

    rows = {row["method"]: row for row in c["rows"]}
    ax_k.fill_between(ts, c["lo_dense"], c["hi_dense"], color="C0", alpha=0.25, lw=0, label="GP 95 % band (MC)")
    ax_k.plot(ts, c["k_gp_dense"], color="C0", lw=1.5, label=f"GP (RMSE {rows['GP (MC)']['rmse']:.3f})")
    ax_k.plot(ts, c["k_true_dense"], "k--", lw=1, label="truth")
    off = _clip_to_view(ax_k, c["k_true_dense"], c["lo_dense"], c["hi_dense"], c["k_fd"], top=0.15)
    extra = f", {off} off-scale" if off else ""
    ax_k.plot(
        c["t"], c["k_fd"], "o", color="C3", ms=3, label=f"np.gradient (RMSE {rows['np.gradient']['rmse']:.3f}{extra})"
    )
    ax_k.set_title(r"signed curvature $\kappa(t)$", fontsize=10)
    ax_k.set_xlabel("t")
    ax_k.set_ylabel(r"$\kappa(t)$")
    ax_k.legend(fontsize=8, loc="lower right")


# ------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50, help="points of each sine data set (default 50)")
    parser.add_argument("--n-curve", type=int, default=40, help="samples of the parametric curve (default 40)")
    parser.add_argument("--noise", type=float, default=0.05, help="noise std of the sine data (default 0.05)")
    parser.add_argument("--curve-noise", type=float, default=0.02, help="noise std of the curve (default 0.02)")
    parser.add_argument("--test", type=int, default=400, help="dense evaluation points (default 400)")
    parser.add_argument("--samples", type=int, default=4000, help="Monte Carlo draws per point (default 4000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise and the Monte Carlo (default 0)")
    parser.add_argument("--maxiter", type=int, default=None, help="L-BFGS iteration limit (default: the package's)")
    parser.add_argument("--smoke", action="store_true", help="quick run (100 dense points, 500 draws)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output directory for the PNG (default examples/output)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.smoke:
        args.test = min(args.test, 100)
        args.samples = min(args.samples, 500)
    rng = np.random.default_rng(args.seed)

    lo, hi = 0.0, 2 * math.pi
    xs = np.linspace(lo, hi, args.test)
    grids = {
        "uniform": np.linspace(lo, hi, args.n),
        "non-uniform": lo + (hi - lo) * np.linspace(0.0, 1.0, args.n) ** 1.5,
    }
    sine = [
        sine_part(name, x, np.sin(x) + args.noise * rng.standard_normal(args.n), xs, args.maxiter)
        for name, x in grids.items()
    ]
    t = np.linspace(0.0, 2 * math.pi, args.n_curve)
    x_true, _, _, y_true, _, _ = lissajous(t)
    xy = (
        x_true + args.curve_noise * rng.standard_normal(args.n_curve),
        y_true + args.curve_noise * rng.standard_normal(args.n_curve),
    )
    curve = curve_part(t, xy, np.linspace(0.0, 2 * math.pi, args.test), args.samples, args.maxiter, args.seed + 1)

    rows = [row for r in sine for row in r["rows"]] + curve["rows"]
    print(
        f"noisy_derivatives: sin(x) + N(0, {args.noise}^2) at n = {args.n} points of [0, 2 pi]; "
        f"curve (sin t, sin 2t) + N(0, {args.curve_noise}^2) at {args.n_curve} t; "
        f"RMSE and 95 % band coverage at the data points and at {args.test} dense points"
    )
    for r in sine:
        print(
            f"  {r['name']} fit: noise std {r['noise_std']:.4f} (true {args.noise}), lengthscale {r['lengthscale']:.3f}"
        )
    print(f"  curvature: |Cov(f', f'') autograd - finite difference| / (std f' std f'') <= {curve['cov_check']:.1e}")

    def fmt(v: float, spec: str) -> str:
        return "-" if math.isnan(v) else format(v, spec)

    header = ("grid", "quantity", "method", "RMSE@data", "cover@data", "RMSE dense", "cover dense")
    widths = ("<12", "<8", "<15", ">10", ">10", ">10", ">11")
    print(" ".join(format(h, w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print(
            f"{row['grid']:<12} {row['quantity']:<8} {row['method']:<15} {fmt(row['rmse'], '.4f'):>10} "
            f"{fmt(row['cover'], '.2f'):>10} {fmt(row['rmse_dense'], '.4f'):>10} {fmt(row['cover_dense'], '.2f'):>11}"
        )

    png = os.path.join(args.out, "noisy_derivatives.png")
    fig, axes = plt.subplots(2, 3, figsize=(16, 9), layout="constrained")
    plot_sine([axes[0, 0], axes[0, 1]], sine[0], xs)
    plot_sine([axes[1, 0], axes[1, 1]], sine[1], xs)
    plot_curve(axes[0, 2], axes[1, 2], curve)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=9)
    fig.suptitle(
        f"Value-only GP derivatives with 95 % bands vs np.gradient "
        f"(noise std {args.noise} on sin, {args.curve_noise} on the curve)"
    )
    save_figure(fig, png)
    plt.close(fig)
    print(f"wrote {png}")

    def key(row: dict) -> str:
        method = "gp" if row["method"].startswith("GP") else "fd"
        quantity = {"f'": "d1", "f''": "d2", "kappa": "kappa"}[row["quantity"]]
        return f"{row['grid'].replace('-', '_')}_{quantity}_{method}"

    metrics = {f"rmse_{key(row)}": row["rmse"] for row in rows}
    metrics.update({f"cover_{key(row)}": row["cover"] for row in rows if row["method"].startswith("GP")})
    metrics.update({"rows": rows, "cov_check": curve["cov_check"], "png": png})
    return metrics


if __name__ == "__main__":
    main()
