"""One exact log-marginal-likelihood + gradient evaluation at N = n (d + 1): gpderiv vs GPyTorch vs a bare Cholesky.

All three use the same data: X uniform in [0, 1]^d (seed 0), y = sum_a sin(3 x_a), grad y from autograd, in
float64.

* ours: ``model = DerivativeGP(X, y, grad)``, then ``loss = model.loss(); loss.backward()`` at the initial
  hyperparameters (the work of one optimiser iteration). Best of ``--repeats``.
* cholesky: ``torch.linalg.cholesky`` of the model's own N x N kernel matrix plus 1e-2 on the diagonal (the
  floor for any exact method). Best of ``--repeats``.
* gpytorch: the standard derivative model of GPyTorch's tutorials (``ExactGP`` with ``ConstantMeanGrad``,
  ``ScaleKernel(RBFKernelGrad(ard_num_dims=d))``, ``MultitaskGaussianLikelihood(num_tasks=d + 1)``,
  ``ExactMarginalLogLikelihood``), timing ``loss = -mll(model(X), Y); loss.backward()``. Inside
  ``gpytorch.settings.max_cholesky_size(10**6)`` GPyTorch takes its exact path: ``inv_quad_logdet`` factorises
  the dense covariance with a Cholesky (jitter is only added if that fails) instead of CG/Lanczos, so no other
  setting is needed for an exact computation. Backpropagation then goes through ``torch.linalg.cholesky``'s
  autograd, which dominates its time. One repeat by default (``--gpytorch-repeats``): at N = 6000 one
  evaluation takes tens of seconds on 2 cores.

The GPyTorch model is given the same hyperparameters as ours (converted to the user's units; its noise is a
global plus a per-task term, split so that their sum matches ours), so the two log marginal likelihoods printed
(user units, summed over the N observations) must agree. Ours is computed internally on scaled data
(``model.loss()`` is the negative log marginal likelihood per observation in internal units); GPyTorch's
``mll`` is divided by N. Timings on a shared machine are noisy.

Run::

    python benchmarks/bench_mll.py                  # n = 1000, d = 5: N = 6000
    python benchmarks/bench_mll.py --quick          # n = 200, d = 5: N = 1200
    python benchmarks/bench_mll.py --skip-gpytorch
    python benchmarks/bench_mll.py --sizes 3000 6000   # N = 3000 and 6000 with d = 5 (n = N / (d + 1)) + summary
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import gpytorch
import torch
from gpytorch.distributions import MultitaskMultivariateNormal

import gpderiv
from gpderiv import DerivativeGP
from gpderiv.testing import train_covariance

DTYPE = torch.float64
#: Diagonal added to the kernel matrix for the bare-Cholesky timing.
CHOLESKY_DIAG = 1e-2


def make_data(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """X uniform in [0, 1]^d, y = sum sin(3 x), grad = dy/dX by autograd."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(n, d, generator=gen, dtype=DTYPE).requires_grad_(True)
    y = torch.sin(3 * X).sum(-1)
    (grad,) = torch.autograd.grad(y.sum(), X)
    return X.detach(), y.detach(), grad


class GPModelWithDerivatives(gpytorch.models.ExactGP):
    """GPyTorch's tutorial model for values and gradients (interleaved layout)."""

    def __init__(self, train_x: torch.Tensor, train_y: torch.Tensor, likelihood: gpytorch.likelihoods.Likelihood):
        super().__init__(train_x, train_y, likelihood)
        self.mean_module = gpytorch.means.ConstantMeanGrad()
        self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernelGrad(ard_num_dims=train_x.shape[-1]))

    def forward(self, x: torch.Tensor) -> MultitaskMultivariateNormal:
        return MultitaskMultivariateNormal(self.mean_module(x), self.covar_module(x))


def gpytorch_model(
    X: torch.Tensor, y: torch.Tensor, grad: torch.Tensor, hyper: dict[str, torch.Tensor] | None
) -> tuple[gpytorch.mlls.ExactMarginalLogLikelihood, GPModelWithDerivatives, torch.Tensor, bool]:
    """The tutorial model on ``Y = [y, grad]`` (n x (d + 1)); set to ``hyper`` (ours, user units) if possible."""
    d = X.shape[1]
    Y = torch.cat([y.unsqueeze(-1), grad], dim=-1)
    likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=d + 1).to(X.device, DTYPE)
    model = GPModelWithDerivatives(X, Y, likelihood).to(X.device, DTYPE)
    matched = False
    if hyper is not None:
        noises = torch.cat([hyper["noise"].reshape(1), hyper["grad_noise"].reshape(-1).expand(d)])
        # Total noise of task t = global + task_noises[t]; both are constrained > 1e-4 in GPyTorch.
        global_noise = 0.5 * noises.min().item()
        if global_noise > 2e-4:
            likelihood.noise = global_noise
            likelihood.task_noises = noises - global_noise
            with torch.no_grad():
                model.mean_module.constant.fill_(hyper["mean"].item())
            model.covar_module.outputscale = hyper["outputscale"].reshape(()).to(X.device)
            model.covar_module.base_kernel.lengthscale = hyper["base_kernel.lengthscale"].reshape(1, d).to(X.device)
            matched = True
    model.train()
    likelihood.train()
    return gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model), model, Y, matched


def _sync() -> None:
    """Wait for queued GPU work, so that wall-clock times cover it."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_ours(model: DerivativeGP) -> tuple[float, float]:
    for p in model.parameters():
        p.grad = None
    _sync()
    t0 = time.perf_counter()
    loss = model.loss()
    loss.backward()
    _sync()
    return time.perf_counter() - t0, loss.item()


def time_cholesky(K: torch.Tensor) -> float:
    _sync()
    t0 = time.perf_counter()
    torch.linalg.cholesky(K)
    _sync()
    return time.perf_counter() - t0


def time_gpytorch(
    mll: gpytorch.mlls.ExactMarginalLogLikelihood, model: GPModelWithDerivatives, Y
) -> tuple[float, float]:
    model.zero_grad()
    X = model.train_inputs[0]
    with gpytorch.settings.max_cholesky_size(10**6):
        _sync()
        t0 = time.perf_counter()
        loss = -mll(model(X), Y)
        loss.backward()
        _sync()
        return time.perf_counter() - t0, loss.item()


def warm_up(skip_gpytorch: bool, device: str = "cpu") -> None:
    """Run every timed code path once at a small size (lazy imports, allocator, BLAS thread start-up)."""
    X, y, grad = (t.to(device) for t in make_data(30, 3, seed=1))
    model = DerivativeGP(X, y, grad, noise_prior=False, hyperparameter_uncertainty=False)  # a plain GP, as GPyTorch's
    time_ours(model)
    eye = torch.eye(model.num_observations, dtype=DTYPE, device=device)
    time_cholesky(train_covariance(model).detach() + CHOLESKY_DIAG * eye)
    if not skip_gpytorch:
        time_gpytorch(*gpytorch_model(X, y, grad, None)[:3])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="number of points (default 1000)")
    parser.add_argument("--d", type=int, default=5, help="input dimension (default 5)")
    parser.add_argument("--repeats", type=int, default=2, help="repeats of ours and the Cholesky; best is reported")
    parser.add_argument("--gpytorch-repeats", type=int, default=1, help="repeats of GPyTorch (default 1: it is slow)")
    parser.add_argument("--skip-gpytorch", action="store_true", help="do not run GPyTorch")
    parser.add_argument("--quick", action="store_true", help="n = 200, d = 5 (smoke run)")
    parser.add_argument("--device", default="cpu", help="torch device of the data and models (e.g. cuda)")
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        metavar="N",
        help="run each N = n (d + 1) in turn (n = N // (d + 1), d from --d) and print a summary table",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.n, args.d = 200, 5
    warm_up(args.skip_gpytorch, args.device)
    if not args.sizes:
        return run_size(args.n, args.d, args)
    d = args.d
    results = []
    for i, size in enumerate(args.sizes):
        if size < d + 1:
            raise SystemExit(f"--sizes: N = {size} is smaller than d + 1 = {d + 1}")
        if i:
            print()
        results.append(run_size(size // (d + 1), d, args))
    print_summary(results)
    return {"d": d, "sizes": results}


def print_summary(results: list[dict]) -> None:
    """One line per size: seconds and ratios of every method."""
    print(f"\nsummary (d = {results[0]['d']}, seconds; best of the runs above)")
    header = f"{'N':>6} {'n':>6} {'ours':>9} {'cholesky':>9} {'gpytorch':>9} {'ours/chol':>10} {'gpyt/ours':>10}"
    print(header)
    for r in results:
        print(
            f"{r['N']:>6} {r['n']:>6} {r['ours_s']:>9.3f} {r['cholesky_s']:>9.3f} {r['gpytorch_s']:>9.3f} "
            f"{r['ours_s'] / r['cholesky_s']:>10.2f} {r['gpytorch_s'] / r['ours_s']:>10.2f}"
        )


def run_size(n: int, d: int, args: argparse.Namespace) -> dict:
    """Time ours, the bare Cholesky and GPyTorch at one size, print the table and return the numbers."""
    X, y, grad = (t.to(args.device) for t in make_data(n, d))
    model = DerivativeGP(X, y, grad, noise_prior=False, hyperparameter_uncertainty=False)  # a plain GP, as GPyTorch's
    N = model.num_observations
    ours_times, ours_loss = [], math.nan
    for _ in range(args.repeats):
        t, ours_loss = time_ours(model)
        ours_times.append(t)
    ours_mll = model.log_marginal_likelihood()

    K = train_covariance(model).detach()
    K.diagonal().add_(CHOLESKY_DIAG)
    chol_times = [time_cholesky(K) for _ in range(args.repeats)]
    del K

    gp_times: list[float] = []
    gp_loss, gp_matched = math.nan, False
    if not args.skip_gpytorch:
        mll, gp, Y, gp_matched = gpytorch_model(X, y, grad, model.hyperparameters())
        for _ in range(args.gpytorch_repeats):
            t, gp_loss = time_gpytorch(mll, gp, Y)
            gp_times.append(t)
        del mll, gp, Y

    ours, chol = min(ours_times), min(chol_times)
    gpyt = min(gp_times) if gp_times else math.nan
    print(
        f"bench_mll: one exact log-ML + gradient evaluation, n = {n}, d = {d}, N = n (d + 1) = {N}, float64\n"
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), gpytorch {gpytorch.__version__}, "
        f"gpderiv {gpderiv.__version__}, python {platform.python_version()}, {platform.machine()}"
    )
    rows = [
        ("ours: loss() + backward", ours, f"best of {len(ours_times)}: " + ", ".join(f"{t:.3f}" for t in ours_times)),
        (
            "bare torch.linalg.cholesky",
            chol,
            f"best of {len(chol_times)}: " + ", ".join(f"{t:.3f}" for t in chol_times),
        ),
        (
            "gpytorch: -mll + backward",
            gpyt,
            "skipped" if not gp_times else f"best of {len(gp_times)}: " + ", ".join(f"{t:.3f}" for t in gp_times),
        ),
    ]
    print(f"{'method':<28} {'seconds':>9}  runs")
    for name, t, note in rows:
        print(f"{name:<28} {t:>9.3f}  {note}")
    print(f"{'ratio ours / cholesky':<28} {ours / chol:>9.2f}")
    print(f"{'ratio gpytorch / ours':<28} {gpyt / ours:>9.2f}")
    print(f"log ML (user units, summed): ours {ours_mll:.6f} (ours.loss() = {ours_loss:.6f}, internal units / N)")
    if gp_times:
        gp_mll = -gp_loss * N
        note = "same hyperparameters" if gp_matched else "DIFFERENT hyperparameters (could not match the noise)"
        print(f"                             gpytorch {gp_mll:.6f} (-loss = mll / N = {-gp_loss:.6f}; {note})")
        if gp_matched:
            print(f"                             |difference| {abs(gp_mll - ours_mll):.2e}")
    return {
        "n": n,
        "d": d,
        "N": N,
        "ours_s": ours,
        "cholesky_s": chol,
        "gpytorch_s": gpyt,
        "ours_mll": ours_mll,
        "gpytorch_mll": -gp_loss * N if gp_times else math.nan,
        "threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    main()
