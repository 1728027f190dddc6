"""Small problems, the Bayesian-optimisation case: a default fit at N = 60 and one MLL + gradient at N = 1500.

BO refits its model after every new point, so what matters there is the fixed cost of each loss
evaluation, not the `O(N^3)` part. Data as in ``bench_mll.py``: X uniform in [0, 1]^d (seed 0),
y = sum_a sin(3 x_a), exact gradients, float64.

* fit: ``DerivativeGP(X, y, grad).fit()`` at n = 20, d = 2 (N = 60 rows), construction included,
  then the first ``predict`` at 100 test points (it computes the hyperparameters' uncertainty:
  a finite-difference Hessian and `2P` perturbed factorisations) and a second one (cached).
* sklearn: ``GaussianProcessRegressor`` (``ConstantKernel * RBF`` with ARD + ``WhiteKernel``,
  ``normalize_y=True``) fitted to the values only, the reference a BO user compares with.
* mll: ``model.loss(); loss.backward()`` at n = 500, d = 2 (N = 1500) at the initial
  hyperparameters, against ``torch.linalg.cholesky`` of the model's own matrix (+ 1e-2 diagonal).

Variants are interleaved within one run (scikit-learn after them) and each time is the median of ``--repeats``; the
printed ratios are what docs/benchmarks.md records. Torch's thread setting is the caller's
(``--threads`` sets it first).

Run::

    python benchmarks/bench_small.py
    python benchmarks/bench_small.py --repeats 9 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from gpderiv import DerivativeGP
from gpderiv.observed_rows import ObservedRows
from gpderiv.testing import train_covariance

DTYPE = torch.float64


def make_data(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """X uniform in [0, 1]^d, y = sum sin(3 x), grad = dy/dX (closed form)."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(n, d, generator=gen, dtype=DTYPE)
    return X, torch.sin(3 * X).sum(-1), 3 * torch.cos(3 * X)


def seconds(fn) -> float:  # noqa: ANN001 - any zero-argument callable
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_fit(X: torch.Tensor, y: torch.Tensor, grad: torch.Tensor, Xs: torch.Tensor) -> tuple[float, float, float]:
    """Seconds of a default fit, of the first predict (hyperparameter uncertainty) and of a second predict."""
    holder: dict[str, DerivativeGP] = {}

    def fit() -> None:
        holder["model"] = DerivativeGP(X, y, grad).fit()

    t_fit = seconds(fit)
    model = holder["model"]
    t_first = seconds(lambda: model.predict(Xs))
    t_second = seconds(lambda: model.predict(Xs))
    return t_fit, t_first, t_second


def time_sklearn(X: torch.Tensor, y: torch.Tensor) -> float:
    """Seconds of scikit-learn's value-only GP fit on the same points."""
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

    kernel = ConstantKernel() * RBF(length_scale=[1.0] * X.shape[1]) + WhiteKernel(1e-2)
    Xn, yn = X.numpy(), y.numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings at the bounds
        return seconds(lambda: GaussianProcessRegressor(kernel, normalize_y=True).fit(Xn, yn))


def time_mll(model: DerivativeGP, K: torch.Tensor) -> tuple[float, float]:
    """Seconds of one loss + backward and of a bare Cholesky of the same matrix."""

    def step() -> None:
        model.zero_grad()
        model.loss().backward()

    return seconds(step), seconds(lambda: torch.linalg.cholesky(K))


def crossover(sizes: list[int], repeats: int) -> None:
    """One MLL + gradient and one factorisation + predict at each N, one thread vs the default, interleaved.

    Calls the engine directly (below the model's own thread rule), so both settings are what they say.
    """
    default = torch.get_num_threads()
    d = 2
    Xs = make_data(100, d, seed=1)[0]
    print(f"crossover: N, then medians of {repeats} [ms]: mll 1 thread / {default} threads, factor + predict likewise")
    for N in sizes:
        X, y, grad = make_data(N // (1 + d), d)
        model = DerivativeGP(X, y, grad)
        test = model.scaling.x(Xs)

        def mll(model: DerivativeGP = model) -> None:
            model.zero_grad()
            noise, resid = model.row_noise(), model.residual()
            model.engine.negative_log_marginal(model.covar_module, model.data, noise, resid).backward()

        def predict(model: DerivativeGP = model, test: torch.Tensor = test) -> None:
            with torch.no_grad():
                factor = model.engine.factor(model.covar_module, model.data, model.row_noise(), model.residual())
                factor.posterior(ObservedRows.block(test), "var")

        times: dict[tuple[str, int], list[float]] = {}
        for _ in range(repeats + 1):
            for threads in (1, default):
                torch.set_num_threads(threads)
                for name, fn in (("mll", mll), ("predict", predict)):
                    times.setdefault((name, threads), []).append(seconds(fn))
        torch.set_num_threads(default)
        med = {k: 1e3 * statistics.median(v[1:]) for k, v in times.items()}  # the first round warms up
        print(f"  N = {model.num_observations:5d}: mll {med['mll', 1]:8.2f} / {med['mll', default]:8.2f}   "
              f"predict {med['predict', 1]:8.2f} / {med['predict', default]:8.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="repeats per variant (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads first (default: leave)")
    parser.add_argument("--n-fit", type=int, default=20, help="points of the fit problem (d = 2)")
    parser.add_argument("--n-mll", type=int, default=500, help="points of the MLL problem (d = 2)")
    parser.add_argument("--skip-sklearn", action="store_true")
    parser.add_argument("--crossover", type=int, nargs="*", default=None, help="only the thread crossover at these N")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.crossover is not None:
        crossover(args.crossover or [60, 150, 300, 600, 900, 1200, 1500, 2100, 3000], args.repeats)
        return
    d = 2
    X, y, grad = make_data(args.n_fit, d)
    Xs = make_data(100, d, seed=1)[0]
    Xm, ym, gm = make_data(args.n_mll, d)
    big = DerivativeGP(Xm, ym, gm)
    K = train_covariance(big).detach() + 1e-2 * torch.eye(big.num_observations, dtype=DTYPE)
    time_fit(X, y, grad, Xs)  # warm-up: imports, first-call dispatch
    time_mll(big, K)
    rows: dict[str, list[float]] = {k: [] for k in ("fit", "first", "second", "sklearn", "mll", "chol")}
    for _ in range(args.repeats):  # interleaved, so that load changes hit every variant alike
        t_fit, t_first, t_second = time_fit(X, y, grad, Xs)
        rows["fit"].append(t_fit)
        rows["first"].append(t_first)
        rows["second"].append(t_second)
        t_mll, t_chol = time_mll(big, K)
        rows["mll"].append(t_mll)
        rows["chol"].append(t_chol)
    # scikit-learn last, not interleaved: its OpenBLAS threads keep spinning after each call and
    # slowed the next one-thread MLL by a third (0.11 -> 0.13-0.17 s at N = 1500).
    for _ in range(0 if args.skip_sklearn else args.repeats):
        rows["sklearn"].append(time_sklearn(X, y))
    med = {k: statistics.median(v) for k, v in rows.items() if v}
    N = args.n_fit * (1 + d)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.repeats} repeats, medians")
    print(f"fit N = {N} (n = {args.n_fit}, d = {d}): fit {med['fit']:.3f} s, first predict (m = 100) "
          f"{med['first']:.3f} s, second predict {med['second']:.4f} s, fit + first predict "
          f"{med['fit'] + med['first']:.3f} s")
    if "sklearn" in med:
        ratio = med["fit"] / med["sklearn"]
        print(f"  sklearn value-only fit {med['sklearn']:.3f} s; ratio ours fit / sklearn {ratio:.1f}")
    N_big = big.num_observations
    print(f"MLL + gradient N = {N_big}: {med['mll']:.4f} s, bare Cholesky {med['chol']:.4f} s, "
          f"ratio {med['mll'] / med['chol']:.2f}")


if __name__ == "__main__":
    main()
