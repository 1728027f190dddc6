"""Bayesian optimisation with gradients: qLogEI and d-KG on DerivativeGPModel vs value-only qLogEI.

Three methods on the same initial designs (scrambled Sobol, one per seed), one evaluation per
step (``q = 1``); an evaluation returns the value *and* the gradient (by autograd of BoTorch's
test function), so each step costs the same for every method:

* ``qLogEI + grad``: :class:`gpderiv.botorch.DerivativeGPModel` (values and gradients) + qLogEI;
* ``d-KG``: the same model + ``qKnowledgeGradient`` (its fantasies include gradients: d-KG, Wu et
  al. 2017);
* ``qLogEI values``: ``SingleTaskGP`` on the values only + qLogEI (BoTorch's defaults).

Every model is refitted by ``fit_gpytorch_mll`` after each evaluation, inputs normalised by the
problem's bounds. After each evaluation the *recommended point* is the maximiser of the posterior
mean (optimised, and compared with the evaluated points); its log10 regret
``log10(f(x_rec) - f*)`` is recorded. Problems (minimised): Branin (2-D), Levy (4-D), Hartmann6 (6-D).

Run::

    python examples/bo_with_gradients.py                            # all problems, 10 seeds (long)
    python examples/bo_with_gradients.py --problems branin --seeds 3
    python examples/bo_with_gradients.py --report                   # table + plot from saved runs
    python examples/bo_with_gradients.py --smoke                    # seconds

Each problem's runs are saved to ``<out>/bo_<problem>.json`` (several problems can run in
parallel processes); the table and ``<out>/bo_with_gradients.png`` cover every saved problem.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from botorch.acquisition import PosteriorMean, qKnowledgeGradient, qLogExpectedImprovement
from botorch.exceptions import BotorchWarning
from botorch.fit import fit_gpytorch_mll
from botorch.models import SingleTaskGP
from botorch.models.transforms.input import Normalize
from botorch.optim import optimize_acqf
from botorch.test_functions import Branin, Hartmann, Levy
from botorch.utils.sampling import draw_sobol_samples
from gpytorch.mlls import ExactMarginalLogLikelihood

from gpderiv.botorch import DerivativeGPModel
from gpderiv.plot import plot_regret, save_figure

DTYPE = torch.float64
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")
METHODS = ("qLogEI + grad", "d-KG", "qLogEI values")

#: name -> (test problem, initial design size, total evaluations).
PROBLEMS: dict[str, tuple[Callable[[], object], int, int]] = {
    "branin": (lambda: Branin(), 4, 25),
    "levy4": (lambda: Levy(dim=4), 5, 35),
    "hartmann6": (lambda: Hartmann(dim=6), 7, 40),
}
SMOKE_EVALS = {"branin": (3, 5), "levy4": (4, 5), "hartmann6": (5, 6)}

#: optimize_acqf settings: (num_restarts, raw_samples, options).
QLOGEI_OPT = (4, 128, {"maxiter": 100, "batch_limit": 4})
DKG_OPT = (2, 32, {"maxiter": 40, "batch_limit": 2, "init_batch_limit": 8})
RECOMMEND_OPT = (2, 64, {"maxiter": 60})


def evaluate(problem, X: torch.Tensor) -> torch.Tensor:
    """`n x (1 + d)` observations of the *negated* objective (BoTorch maximises): [-f, -grad f]."""
    Xg = X.detach().clone().requires_grad_(True)
    f = problem.evaluate_true(Xg)
    (g,) = torch.autograd.grad(f.sum(), Xg)
    return -torch.cat([f.detach().unsqueeze(-1), g], -1)


def fit_model(method: str, X: torch.Tensor, Y: torch.Tensor, bounds: torch.Tensor):
    """The method's model, fitted by maximum a posteriori marginal likelihood."""
    normalize = Normalize(X.shape[-1], bounds=bounds)
    if method == "qLogEI values":
        model = SingleTaskGP(X, Y[:, :1], input_transform=normalize)
    else:
        model = DerivativeGPModel(X, Y, input_transform=normalize)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jitter / optimiser chatter; failures still raise
        fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
    return model.eval()


def next_point(method: str, model, Y: torch.Tensor, bounds: torch.Tensor, fantasies: int) -> torch.Tensor:
    """`1 x d` point chosen by the method's acquisition function."""
    if method == "d-KG":
        acqf = qKnowledgeGradient(model, num_fantasies=fantasies)
        restarts, raw, options = DKG_OPT
    else:
        acqf = qLogExpectedImprovement(model, best_f=Y[:, 0].max())
        restarts, raw, options = QLOGEI_OPT
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=BotorchWarning)
        warnings.simplefilter("ignore", category=RuntimeWarning)
        candidate, _ = optimize_acqf(acqf, bounds, q=1, num_restarts=restarts, raw_samples=raw, options=options)
    return candidate.detach()


def recommend(model, X: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """`1 x d` maximiser of the posterior mean: optimised, or an evaluated point if that is better."""
    restarts, raw, options = RECOMMEND_OPT
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x_opt, _ = optimize_acqf(PosteriorMean(model), bounds, q=1, num_restarts=restarts, raw_samples=raw,
                                 options=options)
    candidates = torch.cat([x_opt.detach(), X])
    with torch.no_grad():
        mean = model.posterior(candidates).mean.squeeze(-1)
    return candidates[mean.argmax()].unsqueeze(0)


def run(problem_name: str, method: str, seed: int, n_init: int, n_evals: int, fantasies: int) -> dict:
    """One BO run; regret[t] after t + 1 evaluations (NaN before the initial design is complete)."""
    problem = PROBLEMS[problem_name][0]()
    bounds = problem.bounds.to(DTYPE)
    torch.manual_seed(seed)
    X = draw_sobol_samples(bounds, n=n_init, q=1, seed=seed).squeeze(1).to(DTYPE)
    Y = evaluate(problem, X)
    regret = [math.nan] * (n_init - 1)
    start = time.perf_counter()
    while True:
        model = fit_model(method, X, Y, bounds)
        x_rec = recommend(model, X, bounds)
        regret.append(problem.evaluate_true(x_rec).item() - problem.optimal_value)
        if X.shape[0] >= n_evals:
            break
        x_new = next_point(method, model, Y, bounds, fantasies)
        X, Y = torch.cat([X, x_new]), torch.cat([Y, evaluate(problem, x_new)])
    return {"seed": seed, "regret": regret, "seconds": time.perf_counter() - start}


def summarise(results: dict) -> list[str]:
    """Markdown table: log10 regret (mean +- standard error over seeds) at a few evaluation budgets."""
    lines = []
    for problem_name, res in results.items():
        n_init, n_evals = res["n_init"], res["n_evals"]
        budgets = default_budgets(n_init, n_evals)
        seeds = len(next(iter(res["runs"].values()), []))
        spread = "mean ± standard error over seeds" if seeds > 1 else "one seed, no standard error"
        lines.append(f"\n{problem_name} (d = {res['d']}, {seeds} seed{'' if seeds == 1 else 's'}), log10 regret at "
                     f"the recommended point ({spread}):\n")
        lines.append("| method | " + " | ".join(f"{b} evals" for b in budgets) + " | s / run |")
        lines.append("|---|" + "---|" * (len(budgets) + 1))
        for method in METHODS:
            runs = res["runs"].get(method, [])
            if not runs:
                continue
            logs = np.log10(np.maximum(np.array([r["regret"] for r in runs], dtype=float), 1e-12))
            cells = []
            for b in budgets:
                col = logs[:, b - 1]
                if len(col) > 1:
                    cells.append(f"{col.mean():.2f} ± {col.std(ddof=1) / math.sqrt(len(col)):.2f}")
                else:  # a standard error needs two seeds: print none rather than "± nan"
                    cells.append(f"{col.mean():.2f}")
            seconds = np.mean([r["seconds"] for r in runs])
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {seconds:.1f} |")
    return lines


def default_budgets(n_init: int, n_evals: int) -> list[int]:
    return sorted({n_init, n_init + (n_evals - n_init) // 2, n_evals})


def load_results(out: str) -> dict:
    results = {}
    for name in PROBLEMS:
        path = os.path.join(out, f"bo_{name}.json")
        if os.path.isfile(path):
            with open(path) as fh:
                results[name] = json.load(fh)
    return results


def report(results: dict, out: str) -> str:
    """Print the table and save the regret plot; returns the plot's path."""
    print("\n".join(summarise(results)))
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.5), squeeze=False, layout="constrained")
    for ax, (name, res) in zip(axes[0], results.items(), strict=True):
        curves = {m: [r["regret"] for r in res["runs"][m]] for m in METHODS if res["runs"].get(m)}
        plot_regret(curves, ax=ax, xlabel="evaluations (initial design included)",
                    ylabel=r"$\log_{10}$ regret at the recommended point")
        ax.axvline(res["n_init"], color="0.5", lw=0.8, ls=":", zorder=0)  # the initial design ends here
        title = name.rstrip("0123456789").capitalize()  # "levy4" -> "Levy"; d is in the title
        ax.set_title(f"{title} (d = {res['d']}; dotted: end of the initial design)", fontsize=10)
    return str(save_figure(fig, os.path.join(out, "bo_with_gradients.png")))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", nargs="+", choices=list(PROBLEMS), default=list(PROBLEMS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", type=int, default=10, help="number of seeds (0 .. seeds - 1)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--fantasies", type=int, default=8, help="d-KG fantasies")
    parser.add_argument("--smoke", action="store_true", help="1 seed, a handful of evaluations")
    parser.add_argument("--report", action="store_true", help="only print the table and plot of saved runs")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.set_default_dtype(DTYPE)
    if args.smoke:
        args.seeds, args.fantasies = 1, 2

    if not args.report:
        for name in args.problems:
            problem = PROBLEMS[name][0]()
            n_init, n_evals = SMOKE_EVALS[name] if args.smoke else PROBLEMS[name][1:]
            res = {"n_init": n_init, "n_evals": n_evals, "d": problem.dim, "runs": {m: [] for m in args.methods}}
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                for method in args.methods:
                    r = run(name, method, seed, n_init, n_evals, args.fantasies)
                    res["runs"][method].append(r)
                    print(f"{name} seed {seed} {method:14s} final log10 regret "
                          f"{math.log10(max(r['regret'][-1], 1e-12)):6.2f} ({r['seconds']:.1f} s)", flush=True)
            with open(os.path.join(args.out, f"bo_{name}.json"), "w") as fh:
                json.dump(res, fh)
    results = load_results(args.out)
    results = {k: v for k, v in results.items() if args.report or k in args.problems}
    png = report(results, args.out)
    print(f"figure: {png}")
    return {"results": results, "png": png}


if __name__ == "__main__":
    main()
