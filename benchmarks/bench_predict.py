"""Prediction of f, grad f and their variances at m test points, N = n (d + 1): gpderiv vs GPyTorch.

Same data as ``bench_mll.py`` (X uniform in [0, 1]^d, seed 0, y = sum_a sin(3 x_a), exact gradients, float64)
and m test points uniform in [0, 1]^d (seeds 2 and 3 for the two calls). Both models sit at the same
hyperparameters: ours at its initial ones, GPyTorch's set to them as in ``bench_mll.py`` (its noise is a global
plus a per-task term, split so that their sum matches ours). Both predict the latent f (no observation noise).

Two numbers for each:

* first: the first prediction after the model is built, including the one-time work (our Cholesky
  factorisation and ``alpha``; GPyTorch's prediction strategy and its mean cache);
* second: a second prediction at m new points, which may reuse what the first call cached.

* ours: ``model.predict(Xs)`` (mean, variance, grad_mean, grad_variance). The first is repeated
  ``--repeats`` times by dropping the cached factorisation (``model.clear_cache()``), best reported;
  the second is the best of ``--repeats`` calls.
* gpytorch: the tutorial model (``ConstantMeanGrad``, ``ScaleKernel(RBFKernelGrad)``,
  ``MultitaskGaussianLikelihood``) in eval mode, ``out = model(Xs)`` then ``out.mean`` and ``out.variance``
  under ``torch.no_grad()``, ``gpytorch.settings.max_cholesky_size(10**6)`` (exact Cholesky, no CG/Lanczos)
  and ``gpytorch.settings.fast_pred_var(False)`` (exact variances, not LOVE). With ``fast_pred_var`` off
  GPyTorch solves the training covariance against the whole ``N x m (d + 1)`` cross-covariance on every call
  and forms the dense ``m (d + 1)`` square predictive covariance before taking its diagonal. One repeat by
  default (``--gpytorch-repeats``); ``model.train(); model.eval()`` drops its caches between repeats.

The predicted means and variances of the two are compared (max absolute difference; they agree to
rounding at the same hyperparameters). Timings on a shared machine are noisy.

Run::

    python benchmarks/bench_predict.py                  # n = 1000, d = 5 (N = 6000), m = 1000
    python benchmarks/bench_predict.py --quick          # n = 200, d = 5 (N = 1200), m = 200
    python benchmarks/bench_predict.py --skip-gpytorch
    python benchmarks/bench_predict.py --n 4000 --device cuda   # N = 24,000 on a GPU
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import gpytorch
import torch

import gpderiv
from gpderiv import DerivativeGP

# The data and GPyTorch's model are shared with bench_mll.py (also when this file is loaded by path).
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mll import DTYPE, GPModelWithDerivatives, _sync, gpytorch_model, make_data  # noqa: E402


def test_points(m: int, d: int, seed: int) -> torch.Tensor:
    """``m`` points uniform in [0, 1]^d."""
    return torch.rand(m, d, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def predict_ours(model: DerivativeGP, Xs: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Seconds, `m x (1 + d)` means and variances (columns f, df/dx_1, ...)."""
    _sync()
    t0 = time.perf_counter()
    pred = model.predict(Xs)
    _sync()
    t = time.perf_counter() - t0
    mean = torch.cat([pred.mean.unsqueeze(-1), pred.grad_mean], -1)
    var = torch.cat([pred.variance.unsqueeze(-1), pred.grad_variance], -1)
    return t, mean, var


def predict_gpytorch(model: GPModelWithDerivatives, Xs: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Seconds, `m x (1 + d)` means and variances of the latent f (interleaved: f, df/dx_1, ...)."""
    with (
        torch.no_grad(),
        gpytorch.settings.max_cholesky_size(10**6),
        gpytorch.settings.fast_pred_var(False),
    ):
        _sync()
        t0 = time.perf_counter()
        out = model(Xs)
        mean, var = out.mean, out.variance
        _sync()
        return time.perf_counter() - t0, mean, var


def ours_first(model: DerivativeGP, Xs: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    model.clear_cache()  # as after construction: the next predict factorises
    return predict_ours(model, Xs)


def gpytorch_first(model: GPModelWithDerivatives, Xs: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    model.train()  # drops the prediction strategy and its caches
    model.eval()
    return predict_gpytorch(model, Xs)


def warm_up(skip_gpytorch: bool, device: str = "cpu") -> None:
    """Run every timed code path once at a small size (lazy imports, allocator, BLAS thread start-up)."""
    X, y, grad = (t.to(device) for t in make_data(30, 3, seed=1))
    model = DerivativeGP(X, y, grad, noise_prior=False, hyperparameter_uncertainty=False)  # a plain GP, as GPyTorch's
    model.fitted = True  # the initial hyperparameters on purpose (the same as GPyTorch's): no NotFittedWarning
    Xs = test_points(7, 3, seed=4).to(device)
    ours_first(model, Xs)
    predict_ours(model, Xs)
    if not skip_gpytorch:
        _, gp, _, _ = gpytorch_model(X, y, grad, model.hyperparameters())
        gpytorch_first(gp, Xs)
        predict_gpytorch(gp, Xs)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="number of training points (default 1000)")
    parser.add_argument("--d", type=int, default=5, help="input dimension (default 5)")
    parser.add_argument("--m", type=int, default=1000, help="number of test points per call (default 1000)")
    parser.add_argument("--repeats", type=int, default=2, help="repeats of ours; best is reported")
    parser.add_argument("--gpytorch-repeats", type=int, default=1, help="repeats of GPyTorch (default 1: it is slow)")
    parser.add_argument("--skip-gpytorch", action="store_true", help="do not run GPyTorch")
    parser.add_argument("--quick", action="store_true", help="n = 200, d = 5, m = 200 (smoke run)")
    parser.add_argument("--device", default="cpu", help="torch device of the data and models (e.g. cuda)")
    return parser.parse_args(argv)


def _runs(times: list[float]) -> str:
    return f"best of {len(times)}: " + ", ".join(f"{t:.3f}" for t in times) if times else "skipped"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.n, args.d, args.m = 200, 5, 200
    n, d, m = args.n, args.d, args.m

    warm_up(args.skip_gpytorch, args.device)

    X, y, grad = (t.to(args.device) for t in make_data(n, d))
    Xs1, Xs2 = test_points(m, d, seed=2).to(args.device), test_points(m, d, seed=3).to(args.device)
    model = DerivativeGP(X, y, grad, noise_prior=False, hyperparameter_uncertainty=False)  # a plain GP, as GPyTorch's
    model.fitted = True  # timed at the initial hyperparameters, which GPyTorch's model is given too
    N = model.num_observations

    ours1_times, ours2_times = [], []
    for _ in range(args.repeats):
        t, ours_mean1, ours_var1 = ours_first(model, Xs1)
        ours1_times.append(t)
    for _ in range(args.repeats):
        t, ours_mean2, ours_var2 = predict_ours(model, Xs2)
        ours2_times.append(t)

    gp1_times: list[float] = []
    gp2_times: list[float] = []
    gp_matched = False
    diffs: dict[str, float] = {}
    if not args.skip_gpytorch:
        _, gp, _, gp_matched = gpytorch_model(X, y, grad, model.hyperparameters())
        for _ in range(args.gpytorch_repeats):
            t, gp_mean1, gp_var1 = gpytorch_first(gp, Xs1)
            gp1_times.append(t)
        for _ in range(args.gpytorch_repeats):
            t, gp_mean2, gp_var2 = predict_gpytorch(gp, Xs2)
            gp2_times.append(t)
        mean_ours, var_ours = torch.cat([ours_mean1, ours_mean2]), torch.cat([ours_var1, ours_var2])
        mean_gp, var_gp = torch.cat([gp_mean1, gp_mean2]), torch.cat([gp_var1, gp_var2])
        diffs = {
            "f mean": (mean_ours[:, 0] - mean_gp[:, 0]).abs().max().item(),
            "grad mean": (mean_ours[:, 1:] - mean_gp[:, 1:]).abs().max().item(),
            "f variance": (var_ours[:, 0] - var_gp[:, 0]).abs().max().item(),
            "grad variance": (var_ours[:, 1:] - var_gp[:, 1:]).abs().max().item(),
        }
        scales = {
            "f mean": mean_ours[:, 0].abs().max().item(),
            "grad mean": mean_ours[:, 1:].abs().max().item(),
            "f variance": var_ours[:, 0].abs().max().item(),
            "grad variance": var_ours[:, 1:].abs().max().item(),
        }
        del gp

    ours1, ours2 = min(ours1_times), min(ours2_times)
    gp1 = min(gp1_times) if gp1_times else math.nan
    gp2 = min(gp2_times) if gp2_times else math.nan
    print(
        f"bench_predict: mean and variance of f and grad f at m = {m} points, n = {n}, d = {d}, "
        f"N = n (d + 1) = {N}, float64, device {args.device}\n"
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), gpytorch {gpytorch.__version__}, "
        f"gpderiv {gpderiv.__version__}, python {platform.python_version()}, {platform.machine()}"
    )
    print(f"{'method':<30} {'first [s]':>10} {'second [s]':>11}  runs (first; second)")
    print(f"{'ours: predict(Xs)':<30} {ours1:>10.3f} {ours2:>11.3f}  {_runs(ours1_times)}; {_runs(ours2_times)}")
    print(f"{'gpytorch: model(Xs) mean, var':<30} {gp1:>10.3f} {gp2:>11.3f}  {_runs(gp1_times)}; {_runs(gp2_times)}")
    print(f"{'ratio gpytorch / ours':<30} {gp1 / ours1:>10.2f} {gp2 / ours2:>11.2f}")
    print("first = first call after construction (includes the factorisation); second = new points, cached")
    if diffs:
        note = "same hyperparameters" if gp_matched else "DIFFERENT hyperparameters (could not match the noise)"
        print(f"max |ours - gpytorch| over both calls ({2 * m} points; {note}):")
        for key, value in diffs.items():
            print(f"  {key:<14} {value:.2e}  (max |ours| {scales[key]:.3e})")
    return {
        "n": n,
        "d": d,
        "m": m,
        "N": N,
        "ours_first_s": ours1,
        "ours_second_s": ours2,
        "gpytorch_first_s": gp1,
        "gpytorch_second_s": gp2,
        "gpytorch_matched": gp_matched,
        "max_abs_diff": diffs,
        "threads": torch.get_num_threads(),
        "device": args.device,
    }


if __name__ == "__main__":
    main()
