"""Bayesian optimisation with gradients in 100-200 dimensions: a local gradient GP vs TuRBO-1 and qLogEI.

Three methods minimise BoTorch's test functions (Levy, Ackley, Rosenbrock; Ackley also on the
TuRBO tutorial's box [-5, 10]^d) in d = 100 or 200 from the same initial design per seed
(scrambled Sobol, ``--init`` points), one evaluation per iteration, ``--evals`` evaluations in all.
Every method works in the unit cube (the problem's box mapped affinely); an evaluation returns the
value and, for the gradient method, the gradient by autograd of the test function.

* ``TR-qLogEI + grad`` (ours): :class:`gpderiv.botorch.DerivativeGPModel` on the values *and
  gradients* of the ``LOCAL_POINTS`` evaluated points nearest the incumbent (30 points: 6,030
  observations in d = 200, solved exactly by the ``structured`` engine, de Roos et al. 2021),
  qLogEI maximised inside a TuRBO-style trust region around the incumbent. Hyperparameters (ARD
  lengthscales with the dimension-scaled prior, noise) are refitted every ``REFIT_EVERY``
  iterations from the previous ones (warm start, L-BFGS-B capped at ``REFIT_MAXITER``); in
  between, the new data enter with the old hyperparameters. The acquisition's starting points are
  TuRBO's perturbations of the incumbent plus points along the observed gradient at the
  incumbent; the trust region shrinks after ``GRAD_FAILURES`` failures instead of TuRBO's
  ``ceil(d / batch)``, because each evaluation observes all d partial derivatives.
* ``qLogEI values``: ``SingleTaskGP`` (BoTorch's defaults) on the values, refitted every
  iteration, qLogEI maximised over the whole cube.
* ``TuRBO-1``: re-implemented from BoTorch's TuRBO tutorial (Eriksson et al. 2019): trust region
  of side 0.8 (min 0.5^7, max 1.6) around the incumbent, stretched by the ARD lengthscales;
  doubled after 10 consecutive successes, halved after ``ceil(max(4, d))`` consecutive failures
  (batch size 1); a restart from a fresh Sobol design when it collapses; ``SingleTaskGP`` with a
  Matern-5/2 ARD kernel (lengthscales in [0.005, 4], noise in [1e-8, 1e-3]) on the data of the
  current restart; Thompson sampling over ``min(5000, max(2000, 200 d))`` candidates that
  perturb about 20 coordinates of the incumbent.

The score is the regret of the best evaluated point, ``min f(x_i) - f*`` after each evaluation,
and the wall-clock seconds per BO iteration (model, acquisition and the evaluation).

Run::

    python examples/bo_high_dimensional.py                                   # the full protocol (hours)
    python examples/bo_high_dimensional.py --problems levy ackley --dims 200 --seeds 2
    python examples/bo_high_dimensional.py --report                          # table + figure of saved runs
    python examples/bo_high_dimensional.py --smoke                           # seconds

Runs are saved after each one to ``<out>/bo_high_<problem><d>.json``; an interrupted protocol
resumes where it stopped (finished runs are skipped). The table and
``<out>/bo_high_dimensional.png`` cover every saved problem.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from botorch.acquisition import qLogExpectedImprovement
from botorch.fit import fit_gpytorch_mll
from botorch.generation import MaxPosteriorSampling
from botorch.models import SingleTaskGP
from botorch.optim import optimize_acqf
from botorch.test_functions import Ackley, Levy, Rosenbrock
from botorch.utils.sampling import draw_sobol_samples
from gpytorch.constraints import Interval
from gpytorch.kernels import MaternKernel, ScaleKernel
from gpytorch.likelihoods import GaussianLikelihood
from gpytorch.mlls import ExactMarginalLogLikelihood
from gpytorch.settings import max_cholesky_size
from torch.quasirandom import SobolEngine

from gpderiv.botorch import DerivativeGPModel
from gpderiv.plot import plot_regret, save_figure

DTYPE = torch.float64
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")
METHODS = ("TR-qLogEI + grad", "qLogEI values", "TuRBO-1")
#: Each problem's title (tables and panels) and its test function in d dimensions.
PROBLEMS: dict[str, tuple[str, Callable[[int], object]]] = {
    "levy": ("Levy", lambda d: Levy(dim=d)),
    "ackley": ("Ackley", lambda d: Ackley(dim=d)),
    "rosenbrock": ("Rosenbrock", lambda d: Rosenbrock(dim=d)),
    # Ackley on the box of BoTorch's TuRBO tutorial, [-5, 10]^d: the ripple's period is 1/15 of the side
    # (1/65 on the standard box), and the optimum lies off-centre, at a third of each side.
    "ackley_turbo_box": ("Ackley on [-5, 10]", lambda d: Ackley(dim=d, bounds=[(-5.0, 10.0)] * d)),
}

#: The gradient method: local model size, refits, acquisition optimisation, trust-region failures.
LOCAL_POINTS = 30
REFIT_EVERY = 5
REFIT_MAXITER = 30
GRAD_RAW = 256
GRAD_RESTARTS = 4
GRAD_MAXITER = 50
GRAD_FAILURES = 4
GRAD_SUCCESSES = 3
#: Step sizes along the observed gradient, as fractions of the trust region's half side.
GRADIENT_STEPS = tuple(2.0**-k for k in range(11))
#: Value-only qLogEI: optimize_acqf settings (as examples/bo_with_gradients.py).
VALUES_OPT = (4, 128, {"maxiter": 100, "batch_limit": 4})
#: Smoke mode: d, initial points, evaluations, Thompson candidates, raw samples.
SMOKE = {"d": 100, "n_init": 4, "n_evals": 6, "candidates": 256, "raw": 32}


@dataclass
class TrustRegion:
    """TuRBO's trust-region state (side length and success/failure counters), batch size 1."""

    d: int
    success_tolerance: int = 10
    failure_tolerance: int | None = None
    length: float = 0.8
    length_min: float = 0.5**7
    length_max: float = 1.6
    successes: int = 0
    failures: int = 0
    best: float = -math.inf
    restart: bool = False

    def __post_init__(self) -> None:
        if self.failure_tolerance is None:  # TuRBO: ceil(max(4 / batch, d / batch)) with batch = 1
            self.failure_tolerance = math.ceil(max(4.0, float(self.d)))

    def update(self, y_new: float) -> None:
        """Count a success (improvement by more than 1e-3 |best|) or a failure; resize; flag a restart."""
        if self.best == -math.inf or y_new > self.best + 1e-3 * abs(self.best):
            self.successes, self.failures = self.successes + 1, 0
        else:
            self.successes, self.failures = 0, self.failures + 1
        if self.successes == self.success_tolerance:
            self.length, self.successes = min(2.0 * self.length, self.length_max), 0
        elif self.failures == self.failure_tolerance:
            self.length, self.failures = self.length / 2.0, 0
        self.best = max(self.best, y_new)
        self.restart = self.length < self.length_min

    def box(self, centre: torch.Tensor, lengthscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`d` lower and upper corners: side ``length`` stretched by the lengthscales (geometric mean 1)."""
        w = lengthscale.detach().reshape(-1)
        w = w / w.mean()
        w = w / w.log().mean().exp()
        half = w * self.length / 2.0
        return (centre - half).clamp(0.0, 1.0), (centre + half).clamp(0.0, 1.0)


class Objective:
    """A BoTorch test function on the unit cube (minimised): values and gradients in cube units."""

    def __init__(self, name: str, d: int) -> None:
        self.problem = PROBLEMS[name][1](d)
        bounds = self.problem.bounds.to(DTYPE)
        self.lower, self.width = bounds[0], bounds[1] - bounds[0]
        self.optimum = float(self.problem.optimal_value)

    def __call__(self, U: torch.Tensor) -> torch.Tensor:
        """`n` values at `n x d` points of the cube."""
        with torch.no_grad():
            return self.problem.evaluate_true(self.lower + self.width * U)

    def with_gradient(self, U: torch.Tensor) -> torch.Tensor:
        """`n x (1 + d)` observations of the *negated* objective (BoTorch maximises): ``[-f, -grad f]``."""
        Ug = U.detach().clone().requires_grad_(True)
        f = self.problem.evaluate_true(self.lower + self.width * Ug)
        (g,) = torch.autograd.grad(f.sum(), Ug)
        return -torch.cat([f.detach().unsqueeze(-1), g], -1)


def perturbations(centre: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """`n x d` TuRBO candidates: the centre with about 20 coordinates replaced by Sobol points of the box."""
    d = centre.shape[-1]
    sobol = SobolEngine(d, scramble=True, seed=seed).draw(n).to(centre)
    pert = lower + (upper - lower) * sobol
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, d, generator=generator).to(centre) <= min(20.0 / d, 1.0)
    empty = ~mask.any(-1)  # at least one perturbed coordinate per candidate
    mask[empty, torch.randint(d, (int(empty.sum()),), generator=generator)] = True
    return torch.where(mask, pert, centre.expand(n, d))


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silences jitter, optimiser and input-scaling chatter (failures still raise)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class GradientTR:
    """Ours: a local DerivativeGPModel + qLogEI in a trust region, warm-started hyperparameters."""

    def __init__(self, d: int, raw: int) -> None:
        self.state = TrustRegion(d, success_tolerance=GRAD_SUCCESSES, failure_tolerance=GRAD_FAILURES)
        self.raw, self.hyper, self.iteration = raw, None, 0

    def next_point(self, U: torch.Tensor, Y: torch.Tensor, seed: int) -> torch.Tensor:
        best = int(Y[:, 0].argmax())
        centre = U[best]
        local = torch.cdist(U, centre.unsqueeze(0)).squeeze(-1).argsort()[:LOCAL_POINTS]
        with quiet():
            model = DerivativeGPModel(U[local], Y[local])
            if self.hyper is not None:
                for name, state in self.hyper.items():
                    getattr(model, name).load_state_dict(state)
            if self.hyper is None or self.iteration % REFIT_EVERY == 0:
                try:  # warm start from the loaded hyperparameters
                    model.fit(optimizer_kwargs={"options": {"maxiter": REFIT_MAXITER}})
                except Exception:  # noqa: BLE001 - a failed refit keeps the previous hyperparameters
                    if self.hyper is None:
                        raise
                self.hyper = {name: {k: v.detach().clone() for k, v in getattr(model, name).state_dict().items()}
                              for name in ("covar_module", "likelihood", "mean_module")}
            model.eval()
            lower, upper = self.state.box(centre, model.covar_module.lengthscale)
            ascent = Y[best, 1:]  # gradient of -f: the direction of the steepest ascent of the model's target
            step = ascent / ascent.abs().max().clamp_min(1e-300) * (upper - lower) / 2.0
            line = torch.stack([centre + t * step for t in GRADIENT_STEPS])
            raw = torch.cat([perturbations(centre, lower, upper, self.raw, seed), line])
            raw = torch.maximum(torch.minimum(raw, upper), lower).unsqueeze(1)
            acqf = qLogExpectedImprovement(model, best_f=Y[:, 0].max())
            with torch.no_grad():
                values = torch.cat([acqf(chunk) for chunk in raw.split(64)])
            start = raw[values.topk(min(GRAD_RESTARTS, len(values))).indices]
            candidate, _ = optimize_acqf(acqf, torch.stack([lower, upper]), q=1, num_restarts=len(start),
                                         batch_initial_conditions=start,
                                         options={"maxiter": GRAD_MAXITER, "batch_limit": GRAD_RESTARTS})
        self.iteration += 1
        return candidate.detach().reshape(1, -1)

    def begin(self, best: float) -> None:
        """The best value of the initial design, against which the first step is judged."""
        self.state.best = best

    def observe(self, y_new: float) -> None:
        self.state.update(y_new)
        if self.state.restart:  # keep the data (the local model follows the incumbent), reopen the region
            self.state = TrustRegion(self.state.d, success_tolerance=GRAD_SUCCESSES,
                                     failure_tolerance=GRAD_FAILURES, best=self.state.best)


class ValuesQLogEI:
    """SingleTaskGP (BoTorch's defaults) on the values + qLogEI over the whole cube, refitted every iteration."""

    def __init__(self, d: int, raw: int) -> None:
        self.d, self.raw = d, raw

    def next_point(self, U: torch.Tensor, Y: torch.Tensor, seed: int) -> torch.Tensor:
        restarts, raw, options = VALUES_OPT
        with quiet():
            model = SingleTaskGP(U, Y[:, :1])
            fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
            acqf = qLogExpectedImprovement(model, best_f=Y[:, 0].max())
            bounds = torch.stack([torch.zeros(self.d), torch.ones(self.d)]).to(U)
            candidate, _ = optimize_acqf(acqf, bounds, q=1, num_restarts=restarts, raw_samples=min(raw, self.raw),
                                         options=options)
        return candidate.detach().reshape(1, -1)

    def begin(self, best: float) -> None:
        pass

    def observe(self, y_new: float) -> None:
        pass


class TuRBO1:
    """TuRBO-1 (batch size 1, Thompson sampling), written from the BoTorch tutorial's description."""

    def __init__(self, d: int, candidates: int) -> None:
        self.d, self.state, self.start = d, TrustRegion(d), 0
        self.candidates = candidates

    def next_point(self, U: torch.Tensor, Y: torch.Tensor, seed: int) -> torch.Tensor:
        U, y = U[self.start:], Y[self.start:, :1]  # the data of the current restart only
        with quiet():
            covar = ScaleKernel(MaternKernel(nu=2.5, ard_num_dims=self.d, lengthscale_constraint=Interval(0.005, 4.0)))
            likelihood = GaussianLikelihood(noise_constraint=Interval(1e-8, 1e-3))
            model = SingleTaskGP(U, y, covar_module=covar, likelihood=likelihood)  # Standardize: BoTorch's default
            with max_cholesky_size(float("inf")):
                fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
                centre = U[y[:, 0].argmax()]
                lower, upper = self.state.box(centre, model.covar_module.base_kernel.lengthscale)
                cand = perturbations(centre, lower, upper, self.candidates, seed)
                with torch.no_grad():
                    x = MaxPosteriorSampling(model=model, replacement=False)(cand, num_samples=1)
        return x.detach().reshape(1, -1)

    def begin(self, best: float) -> None:
        """The best value of the (restart's) initial design, against which the next step is judged."""
        self.state.best = best

    def observe(self, y_new: float) -> None:
        self.state.update(y_new)

    def restart(self, n_evaluated: int) -> bool:
        """Whether the region collapsed: then a new restart begins at evaluation ``n_evaluated``."""
        if not self.state.restart:
            return False
        self.state, self.start = TrustRegion(self.d), n_evaluated
        return True


def make_method(method: str, d: int, candidates: int, raw: int):
    if method == "TR-qLogEI + grad":
        return GradientTR(d, raw)
    if method == "qLogEI values":
        return ValuesQLogEI(d, raw)
    return TuRBO1(d, candidates)


def initial_design(d: int, n: int, seed: int) -> torch.Tensor:
    """`n x d` scrambled Sobol points of the cube: the seed's design, shared by every method."""
    unit = torch.stack([torch.zeros(d, dtype=DTYPE), torch.ones(d, dtype=DTYPE)])
    return draw_sobol_samples(unit, n=n, q=1, seed=seed).squeeze(1).to(DTYPE)


def run(name: str, d: int, method: str, seed: int, n_init: int, n_evals: int, candidates: int, raw: int) -> dict:
    """One BO run; ``regret[t]`` = min of the first t + 1 evaluations minus f*."""
    objective = Objective(name, d)
    torch.manual_seed(seed)
    U = initial_design(d, n_init, seed)
    Y = objective.with_gradient(U)
    solver = make_method(method, d, candidates, raw)
    solver.begin(Y[:, 0].max().item())
    iteration_seconds, restarts = [], 0
    while U.shape[0] < n_evals:
        start = time.perf_counter()
        if isinstance(solver, TuRBO1) and solver.restart(U.shape[0]):  # a fresh design for the new restart
            restarts += 1
            x_new = initial_design(d, min(n_init, n_evals - U.shape[0]), seed + 1000 * restarts)
            y_new = objective.with_gradient(x_new)
            solver.begin(y_new[:, 0].max().item())
        else:
            x_new = solver.next_point(U, Y, seed + 7919 * U.shape[0])
            y_new = objective.with_gradient(x_new)
            solver.observe(y_new[0, 0].item())
        U, Y = torch.cat([U, x_new]), torch.cat([Y, y_new])
        iteration_seconds.append(time.perf_counter() - start)
    f = -Y[:, 0]
    regret = (torch.cummin(f, 0).values - objective.optimum).tolist()
    return {
        "seed": seed,
        "regret": regret,
        "initial_values": f[:n_init].tolist(),
        "seconds": float(sum(iteration_seconds)),
        "seconds_per_iteration": float(np.mean(iteration_seconds)) if iteration_seconds else 0.0,
        "restarts": restarts,
    }


def key(name: str, d: int) -> str:
    return f"{name}{d}"


def results_path(out: str, name: str, d: int) -> str:
    return os.path.join(out, f"bo_high_{key(name, d)}.json")


def load_results(out: str) -> dict:
    """Every saved ``bo_high_*.json`` of a known problem in ``out``: larger d first, then PROBLEMS' order."""
    results = {}
    for path in sorted(os.listdir(out)) if os.path.isdir(out) else []:
        if path.startswith("bo_high_") and path.endswith(".json"):
            with open(os.path.join(out, path)) as fh:
                res = json.load(fh)
            if res.get("problem") in PROBLEMS:
                results[key(res["problem"], res["d"])] = res
    order = list(PROBLEMS)
    return dict(sorted(results.items(), key=lambda kv: (-kv[1]["d"], order.index(kv[1]["problem"]))))


def _mean_se(values: np.ndarray) -> str:
    if len(values) > 1:
        return f"{values.mean():.3g} ± {values.std(ddof=1) / math.sqrt(len(values)):.2g}"
    return f"{values.mean():.3g}"  # one seed: no standard error


def summarise(results: dict) -> list[str]:
    """Markdown table per problem: regret (mean ± standard error over seeds) and seconds per iteration."""
    lines = []
    for res in results.values():
        n_init, n_evals = res["n_init"], res["n_evals"]
        budgets = sorted({n_init, (n_init + n_evals) // 2, n_evals})
        title = PROBLEMS[res["problem"]][0]
        lines.append(f"\n{title}, d = {res['d']} ({n_init} initial points, {n_evals} evaluations), "
                     "regret of the best evaluated point (mean ± standard error over seeds):\n")
        lines.append("| method | seeds | " + " | ".join(f"{b} evals" for b in budgets) + " | s / iteration |")
        lines.append("|---|---|" + "---|" * (len(budgets) + 1))
        for method in METHODS:
            runs = res["runs"].get(method, [])
            if not runs:
                continue
            regret = np.array([r["regret"] for r in runs], dtype=float)
            cells = [_mean_se(regret[:, b - 1]) for b in budgets]
            per_iteration = np.mean([r["seconds_per_iteration"] for r in runs])
            lines.append(f"| {method} | {len(runs)} | " + " | ".join(cells) + f" | {per_iteration:.2f} |")
    return lines


def report(results: dict, out: str) -> str:
    """Print the table and save the regret figure; returns the figure's path."""
    print("\n".join(summarise(results)))
    import matplotlib.pyplot as plt

    cols = min(3, len(results))  # a grid of at most three panels a row stays readable
    rows = math.ceil(len(results) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.3 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[len(results) :]:
        ax.set_visible(False)
    for ax, res in zip(axes.flat, results.values(), strict=False):
        curves = {m: [r["regret"] for r in res["runs"][m]] for m in METHODS if res["runs"].get(m)}
        plot_regret(curves, ax=ax, log=False, xlabel="evaluations (initial design included)",
                    ylabel="regret of the best evaluated point")
        values = [v for runs in curves.values() for r in runs for v in r]
        if max(values) > 10 * min(values):  # log scale only where the regrets span a decade (else its ticks read 2.1e1)
            ax.set_yscale("log")
        ax.axvline(res["n_init"], color="0.5", lw=0.8, ls=":", zorder=0)
        ax.set_title(f"{PROBLEMS[res['problem']][0]}, d = {res['d']} (dotted: end of the initial design)", fontsize=10)
    return str(save_figure(fig, os.path.join(out, "bo_high_dimensional.png")))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", nargs="+", choices=list(PROBLEMS), default=["levy", "ackley", "rosenbrock"],
                        help="ackley_turbo_box: Ackley on [-5, 10]^d, as in BoTorch's TuRBO tutorial")
    parser.add_argument("--dims", nargs="+", type=int, default=[200, 100])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (first-seed .. first-seed + seeds - 1)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--init", type=int, default=30, help="initial Sobol points")
    parser.add_argument("--evals", type=int, default=150, help="evaluations in all, initial design included")
    smoke = f"1 seed, d = {SMOKE['d']}, {SMOKE['n_evals']} evaluations, all methods"
    parser.add_argument("--smoke", action="store_true", help=smoke)
    parser.add_argument("--report", action="store_true", help="only print the table and plot the saved runs")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.set_default_dtype(DTYPE)
    candidates, raw = 5000, GRAD_RAW  # TuRBO's min(5000, max(2000, 200 d)) is 5000 for d >= 25
    if args.smoke:
        args.seeds, args.dims, args.init, args.evals = 1, [SMOKE["d"]], SMOKE["n_init"], SMOKE["n_evals"]
        candidates, raw = SMOKE["candidates"], SMOKE["raw"]
    if args.evals <= args.init:
        parser.error(f"--evals: expected more than --init = {args.init}, got {args.evals}")

    if not args.report:
        for seed in range(args.first_seed, args.first_seed + args.seeds):  # seeds outermost: partial runs are balanced
            for d in args.dims:
                for name in args.problems:
                    path = results_path(args.out, name, d)
                    res = {"problem": name, "d": d, "n_init": args.init, "n_evals": args.evals, "runs": {}}
                    if os.path.isfile(path):
                        with open(path) as fh:
                            saved = json.load(fh)
                        if (saved["n_init"], saved["n_evals"]) == (args.init, args.evals):
                            res = saved  # resume: keep the finished runs
                    for method in args.methods:
                        runs = res["runs"].setdefault(method, [])
                        if any(r["seed"] == seed for r in runs):
                            continue
                        r = run(name, d, method, seed, args.init, args.evals, candidates, raw)
                        runs.append(r)
                        print(f"{key(name, d)} seed {seed} {method:17s} final regret {r['regret'][-1]:10.4g} "
                              f"({r['seconds_per_iteration']:.2f} s / iteration)", flush=True)
                        with open(path, "w") as fh:  # after every run: an interrupted protocol loses one run
                            json.dump(res, fh)
    results = load_results(args.out)
    if not args.report:
        results = {k: v for k, v in results.items() if v["problem"] in args.problems and v["d"] in args.dims}
    png = report(results, args.out)
    print(f"figure: {png}")
    return {"results": results, "png": png}


if __name__ == "__main__":
    main()
