"""Calibration of DerivativeGP's error bars on small problems: 95 % coverage of f and grad f over many fits.

Each trial draws a problem, fits ``DerivativeGP(X, y, grad).fit()`` with the package defaults and
counts how often the latent truth lies in the 95 % band ``mean +- 1.96 std`` at ``m`` uniform test
points, separately for f and for the partial derivatives. Also reported: RMSE (relative to the
truth's standard deviation over the test points) and the mean standardised squared error
``z2 = mean((truth - mean)^2 / var)`` (1 for honest variances; above 1 = over-confident).

Problems (inputs in the unit box, ``n`` points drawn uniformly, seeded per trial):

* ``gp-d``: a sample of a GP with an RBF kernel (lengthscale drawn log-uniformly from [0.2, 0.6],
  variance 1) and its gradient, drawn jointly at train and test points; the well-specified case.
* ``branin``: Branin on [-5, 10] x [0, 15] (mapped from the unit box).
* ``franke``: Franke's function on [0, 1]^2.
* ``sines``: ``sum_a sin(3 x_a) + 0.3 x_a^2`` in d = 3 (as the package's benchmarks).
* ``hartmann3``: Hartmann 3-D on [0, 1]^3.

Methods: ``plugin`` (maximum likelihood, plug-in variances: the defaults before issue 18),
``default`` (the package's defaults: the hyperparameters' uncertainty added to the variances) and
``prior`` (the defaults plus BoTorch's noise prior, ``noise_prior=True``).

Values get Gaussian noise of standard deviation ``noise`` x the truth's standard deviation over
the test points, gradient entries the same relative noise (relative to the gradients' standard
deviation); a fraction ``--missing`` of gradient entries is missing (NaN). Trials are independent.

Run::

    python benchmarks/bench_calibration.py                  # 30 trials per problem, n in {15, 25, 40}
    python benchmarks/bench_calibration.py --trials 5       # a quick look
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch

from gpderiv import DerivativeGP, hyperparameter_uncertainty
from gpderiv.kernels import DerivativeRBFKernel

DTYPE = torch.float64
Z95 = 1.959963984540054


def _branin(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = 15 * x[..., 0] - 5, 15 * x[..., 1]
    b, c, t = 5.1 / (4 * math.pi**2), 5 / math.pi, 1 / (8 * math.pi)
    return (x2 - b * x1**2 + c * x1 - 6) ** 2 + 10 * (1 - t) * torch.cos(x1) + 10


def _franke(x: torch.Tensor) -> torch.Tensor:
    a, b = 9 * x[..., 0], 9 * x[..., 1]
    return (
        0.75 * torch.exp(-((a - 2) ** 2) / 4 - (b - 2) ** 2 / 4)
        + 0.75 * torch.exp(-((a + 1) ** 2) / 49 - (b + 1) / 10)
        + 0.5 * torch.exp(-((a - 7) ** 2) / 4 - (b - 3) ** 2 / 4)
        - 0.2 * torch.exp(-((a - 4) ** 2) - (b - 7) ** 2)
    )


def _sines(x: torch.Tensor) -> torch.Tensor:
    return (torch.sin(3 * x) + 0.3 * x**2).sum(-1)


_H_A = torch.tensor([[3.0, 10, 30], [0.1, 10, 35], [3.0, 10, 30], [0.1, 10, 35]], dtype=DTYPE)
_H_P = 1e-4 * torch.tensor([[3689, 1170, 2673], [4699, 4387, 7470], [1091, 8732, 5547], [381, 5743, 8828]], dtype=DTYPE)
_H_ALPHA = torch.tensor([1.0, 1.2, 3.0, 3.2], dtype=DTYPE)


def _hartmann3(x: torch.Tensor) -> torch.Tensor:
    inner = (_H_A * (x.unsqueeze(-2) - _H_P) ** 2).sum(-1)
    return -(_H_ALPHA * torch.exp(-inner)).sum(-1)


FUNCTIONS: dict[str, tuple[int, Callable[[torch.Tensor], torch.Tensor]]] = {
    "branin": (2, _branin),
    "franke": (2, _franke),
    "sines": (3, _sines),
    "hartmann3": (3, _hartmann3),
}


def _with_gradient(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = fn(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    return y.detach(), g.detach()


def _gp_sample(d: int, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A joint sample of ``f`` and ``grad f`` at the rows of ``x`` from GP(0, RBF), lengthscale in [0.2, 0.6]."""
    ell = math.exp(math.log(0.2) + (math.log(0.6) - math.log(0.2)) * torch.rand(1, generator=gen).item())
    kernel = DerivativeRBFKernel().double()
    kernel.lengthscale = ell
    with torch.no_grad():
        K = kernel(x, x).to_dense()
    K = K + 1e-8 * torch.eye(K.shape[0], dtype=DTYPE)
    sample = torch.linalg.cholesky(K) @ torch.randn(K.shape[0], generator=gen, dtype=DTYPE)
    m = x.shape[0]
    return sample[:m], sample[m:].reshape(m, d)


def problem(name: str, n: int, m: int, noise: float, missing: float, seed: int) -> dict[str, torch.Tensor]:
    """Training data (noisy, with missing gradient entries) and the latent truth at ``m`` test points."""
    gen = torch.Generator().manual_seed(seed)
    if name.startswith("gp-"):
        d = int(name[3:])
        x = torch.rand(n + m, d, generator=gen, dtype=DTYPE)
        f, g = _gp_sample(d, x, gen)
    else:
        d, fn = FUNCTIONS[name]
        x = torch.rand(n + m, d, generator=gen, dtype=DTYPE)
        f, g = _with_gradient(fn, x)
    f_scale, g_scale = f[n:].std(), g[n:].std()
    y = f[:n] + noise * f_scale * torch.randn(n, generator=gen, dtype=DTYPE)
    grad = g[:n] + noise * g_scale * torch.randn(n, d, generator=gen, dtype=DTYPE)
    grad[torch.rand(n, d, generator=gen) < missing] = float("nan")
    return {
        "X": x[:n],
        "y": y,
        "grad": grad,
        "Xs": x[n:],
        "f": f[n:],
        "g": g[n:],
        "f_scale": f_scale,
        "g_scale": g_scale,
    }


def trial(data: dict[str, torch.Tensor], fit: Callable[[dict[str, torch.Tensor]], DerivativeGP]) -> dict[str, float]:
    """Coverage, z2 and relative RMSE of f and grad f for one fit."""
    t0 = time.perf_counter()
    model = fit(data)
    pred = model.predict(data["Xs"])
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds}
    for key, mean, var, truth, scale in (
        ("f", pred.mean, pred.variance, data["f"], data["f_scale"]),
        ("g", pred.grad_mean, pred.grad_variance, data["g"], data["g_scale"]),
    ):
        err = truth - mean
        out[f"cov_{key}"] = float((err.abs() <= Z95 * var.sqrt()).double().mean())
        out[f"z2_{key}"] = float((err**2 / var).mean())
        out[f"rmse_{key}"] = float(err.pow(2).mean().sqrt() / scale)
    return out


def default_fit(data: dict[str, torch.Tensor]) -> DerivativeGP:
    """The package's defaults (maximum likelihood; hyperparameter uncertainty in the variances of small problems)."""
    return DerivativeGP(data["X"], data["y"], data["grad"]).fit()


def plugin_fit(data: dict[str, torch.Tensor]) -> DerivativeGP:
    """Plain maximum likelihood and plug-in variances (the defaults before the calibration work of issue 18)."""
    return DerivativeGP(data["X"], data["y"], data["grad"], hyperparameter_uncertainty=False).fit()


def prior_fit(data: dict[str, torch.Tensor]) -> DerivativeGP:
    """The defaults plus BoTorch's noise prior (``noise_prior=True``)."""
    return DerivativeGP(data["X"], data["y"], data["grad"], noise_prior=True).fit()


METHODS: dict[str, Callable[[dict[str, torch.Tensor]], DerivativeGP]] = {
    "plugin": plugin_fit,
    "default": default_fit,
    "prior": prior_fit,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--problems", nargs="+", default=["gp-1", "gp-2", "gp-3", "branin", "franke", "sines", "hartmann3"]
    )
    parser.add_argument("--n", nargs="+", type=int, default=[15, 25, 40])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--m", type=int, default=200, help="test points per trial")
    parser.add_argument("--noise", type=float, default=0.05, help="noise std relative to the truth's std")
    parser.add_argument("--missing", type=float, default=0.3, help="fraction of missing gradient entries")
    parser.add_argument("--methods", nargs="+", default=["plugin", "default"], choices=sorted(METHODS))
    parser.add_argument(
        "--spread", type=float, default=None, help="override SPREAD of gpderiv.hyperparameter_uncertainty"
    )
    args = parser.parse_args()
    if args.spread is not None:
        hyperparameter_uncertainty.SPREAD = args.spread
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    print(
        f"{'method':>10} {'problem':>10} {'n':>3} | cov f  (min)  z2 f   rmse f | cov g  (min)  z2 g   rmse g | s/fit"
    )
    totals: dict[str, list[dict[str, float]]] = {m: [] for m in args.methods}
    for name in args.problems:
        for n in args.n:
            datas = [problem(name, n, args.m, args.noise, args.missing, 1000 * n + s) for s in range(args.trials)]
            for method in args.methods:
                rows = [trial(data, METHODS[method]) for data in datas]
                totals[method] += rows
                _print(method, name, n, rows)
    for method, rows in totals.items():
        _print(method, "all", 0, rows)


def _print(method: str, name: str, n: int, rows: list[dict[str, float]]) -> None:
    def col(key: str) -> np.ndarray:
        return np.array([r[key] for r in rows])

    print(
        f"{method:>10} {name:>10} {n:>3} | {col('cov_f').mean():.3f} ({col('cov_f').min():.2f}) "
        f"{np.median(col('z2_f')):5.2f} {np.median(col('rmse_f')):.4f} | {col('cov_g').mean():.3f} "
        f"({col('cov_g').min():.2f}) {np.median(col('z2_g')):5.2f} {np.median(col('rmse_g')):.4f} | "
        f"{col('seconds').mean():.2f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
