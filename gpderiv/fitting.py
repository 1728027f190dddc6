"""Fitting hyperparameters: the fit loop (restarts, subsets, progress) and its optimisers (L-BFGS-B, Adam)."""

from __future__ import annotations

import copy
import functools
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import OptimizeResult, minimize
from torch import Tensor
from tqdm.auto import tqdm

from gpderiv.exceptions import CholeskyError, OptimizationWarning
from gpderiv.kernels.composition import walk

__all__ = [
    "AUTO_WINDOW_MIN_POINTS",
    "AUTO_WINDOW_MIN_ROWS",
    "AUTO_WINDOW_ROWS",
    "FitResult",
    "approximation_error",
    "auto_window",
    "compact_window",
    "fit_hyperparameters",
    "minimize_adam",
    "minimize_lbfgs",
    "noise_from_bound",
    "randomize",
    "warm_start",
    "window_points",
]

#: Least improvement of the mean loss (per observation, internal units) over a window of Adam steps
#: that keeps an early-stopping run going (:func:`minimize_adam`).
EARLY_STOP_TOLERANCE = 1e-3

#: ``fit(subset="auto")`` fits the hyperparameters on a compact window (:func:`auto_window`) above this
#: many rows: one dense MLL + gradient at N = 6,000 costs a few seconds on 2 cores, and a fit 100-200
#: of them; Mount St Helens' 21,060 rows did not finish a full-data fit in 13 minutes ...
AUTO_WINDOW_MIN_ROWS = 6000
#: ... on a window of about this many rows (1,000 points with slopes in 2-D: the terrain example's
#: window, relative error 0.0296, fit + predict 185 s, docs/terrain.md) ...
AUTO_WINDOW_ROWS = 3000
#: ... when that window holds at least this many points (fewer points in many dimensions say little
#: about the lengthscales: such problems fit on all the data).
AUTO_WINDOW_MIN_POINTS = 200

#: EM rounds of :func:`noise_from_bound`, and the points of each of its two samples.
NOISE_ROUNDS = 5
NOISE_POINTS = 1024
#: Most training points whose errors set an approximate model's :func:`approximation_error` ...
ERROR_POINTS = 4096
#: ... and the least error variance it reports, relative to the exact fit's noise variance.
DETECTABLE = 0.25

#: What the optimisers return when their callback ended the run (``fit(time_budget=...)``).
BUDGET_SPENT = "stopped: the time budget was spent"

#: ``closure()`` returns the loss with gradients already accumulated into the parameters.
Closure = Callable[[], Tensor]


def _flatten(params: Sequence[Tensor]) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in params]).cpu().double().numpy()


def _assign(params: Sequence[Tensor], x: np.ndarray) -> None:
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(torch.from_numpy(x[offset : offset + n]).view_as(p))
            offset += n


def minimize_lbfgs(
    closure: Closure,
    params: Sequence[Tensor],
    maxiter: int,
    callback: Callable[[float], None],
) -> str:
    """Minimise with scipy's L-BFGS-B over the flattened raw parameters.

    Args:
        closure: zeroes nothing; must return the loss after ``backward()`` filled ``p.grad``.
        params: parameters to optimise (modified in place, ending at the best point found).
        maxiter: iteration limit.
        callback: called with the loss after each iteration; raising ``StopIteration`` ends the
            run there (:data:`BUDGET_SPENT` is then returned).

    Returns:
        scipy's termination message; an :class:`~gpderiv.OptimizationWarning` says when the
        iteration limit stopped it before convergence.
    """
    non_finite = [0]

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        _assign(params, x)
        for p in params:
            p.grad = None
        try:
            loss = closure()
        except CholeskyError:
            non_finite[0] += 1
            return np.inf, np.zeros(sum(p.numel() for p in params))
        grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        value = loss.item()
        if not np.isfinite(value) or not torch.isfinite(grad).all():
            # A non-finite loss makes L-BFGS-B's line search step back instead of stopping.
            non_finite[0] += 1
            return np.inf, np.zeros(grad.numel())
        return value, grad.cpu().double().numpy()

    def on_iteration(intermediate_result: OptimizeResult) -> None:  # scipy matches this name
        if np.isfinite(intermediate_result.fun):
            callback(float(intermediate_result.fun))

    result = minimize(
        fun, _flatten(params), jac=True, method="L-BFGS-B", options={"maxiter": maxiter}, callback=on_iteration
    )
    _assign(params, result.x)
    if result.status == 99:  # scipy: the callback raised StopIteration (the time budget)
        return BUDGET_SPENT
    if result.status == 1:  # L-BFGS-B: the iteration limit, not a convergence test, ended the run
        warnings.warn(
            f"fit: L-BFGS-B stopped at maxiter={maxiter} before it converged ({result.message}); "
            "pass a larger maxiter, or ignore this if the fit is only a warm start",
            OptimizationWarning,
            stacklevel=4,
        )
    if non_finite[0]:
        return f"{result.message} (the loss was non-finite at {non_finite[0]} trial point(s), which were rejected)"
    return str(result.message)


def minimize_adam(
    closure: Closure,
    params: Sequence[Tensor],
    maxiter: int,
    callback: Callable[[float], None],
    lr: float = 0.1,
    patience: int | None = None,
) -> str:
    """Minimise with ``torch.optim.Adam`` for ``maxiter`` steps (arguments as :func:`minimize_lbfgs`).

    Args:
        closure: as for :func:`minimize_lbfgs`.
        params: parameters to optimise (modified in place).
        maxiter: iteration limit.
        callback: called with the loss after each step (``StopIteration`` ends the run, as for
            :func:`minimize_lbfgs`).
        lr: learning rate.
        patience: stop early once the mean loss over the last ``patience`` steps is no more than
            :data:`EARLY_STOP_TOLERANCE` below the best such mean seen (a stochastic objective,
            whose single values are noise); None runs all ``maxiter`` steps.
    """
    optimizer = torch.optim.Adam(params, lr=lr)
    last_finite: np.ndarray | None = None  # parameters of the last evaluation with a finite loss
    losses: list[float] = []
    best_window = math.inf
    for step in range(maxiter):
        optimizer.zero_grad()
        current = [p.detach().clone() for p in params]
        try:
            loss = closure()
        except CholeskyError:
            loss = torch.tensor(float("nan"))
        if not torch.isfinite(loss):
            if last_finite is not None:
                _assign(params, last_finite)
            return "stopped: the loss became non-finite"
        last_finite = torch.cat([t.reshape(-1) for t in current]).cpu().double().numpy()
        optimizer.step()
        losses.append(loss.item())
        try:
            callback(losses[-1])
        except StopIteration:
            return BUDGET_SPENT
        if patience and (step + 1) % patience == 0:
            window = sum(losses[-patience:]) / patience
            if window > best_window - EARLY_STOP_TOLERANCE:
                return f"converged after {step + 1} Adam steps (mean loss over {patience} steps stopped improving)"
            best_window = min(best_window, window)
    return f"completed {maxiter} Adam steps"


@dataclass
class FitResult:
    """What :func:`fit_hyperparameters` found.

    Attributes:
        mll: log marginal likelihood (user units) of the kept run, or None when it was not evaluated
            (one run with a lazy engine: the model evaluates it on first use).
        history: log marginal likelihood after each iteration of the kept run (of the subset, with one).
        state: the kept run's state dict, or None when it is the model's current state.
    """

    mll: float | None
    history: list[float]
    state: dict | None


def fit_hyperparameters(
    model: Any,
    *,
    optimizer: str,
    maxiter: int,
    lr: float,
    restarts: int,
    generator: torch.Generator | None,
    progress: bool | None,
    points: Tensor | None,
    patience: int | None = None,
    deadline: float | None = None,
) -> FitResult:
    """Minimise ``model.loss(points)`` from the current and ``restarts`` random hyperparameters; keep the best run.

    Runs are compared by the full-data log marginal likelihood (``model.log_marginal_likelihood()``).
    With one run and a lazy engine (``model.engine.lazy``: each evaluation is a full set of CG
    solves) nothing is compared and the likelihood is left for the model to evaluate on first use.

    Args:
        model: a :class:`~gpderiv.DerivativeGP` (its parameters are updated in place).
        optimizer: ``"lbfgs"`` or ``"adam"``.
        maxiter: iteration limit per run.
        lr: Adam learning rate.
        restarts: extra runs from random initial hyperparameters (:func:`randomize`).
        generator: random numbers of the restarts.
        progress: tqdm bar: None shows it once a run takes over 2 s and only when standard error
            is a terminal (logs, CI and pipes stay clean, as with GPyTorch, BoTorch and
            scikit-learn), True always, False never.
        points: optimise the marginal likelihood of the rows at these points only (None: all).
        patience: Adam's early stop (:func:`minimize_adam`).
        deadline: ``time.monotonic()`` after which the optimiser stops at the end of its current
            iteration (and no further restart begins); an :class:`~gpderiv.OptimizationWarning`
            says so. None: no limit.

    Returns:
        The :class:`FitResult`; the model is left in the last run's state.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    index = model.data.subset(points)[1] if points is not None else slice(None)
    # The loss is per observation in internal units; the history is in user units.
    scale = model.data.targets[index].numel()
    offset = model.data.row_factor[index].log().sum().item()

    def closure() -> Tensor:
        loss = model.loss(points)
        loss.backward()
        return model.engine.agree(loss, params)  # the same on every torch.distributed rank

    lazy = model.engine.lazy and not restarts
    stop = _until(deadline)
    label = "elbo" if model.engine.approximate else "mll"
    best: FitResult | None = None
    for run in range(restarts + 1):
        if run > 0 and deadline is not None and time.monotonic() > deadline:
            break  # the time budget is spent: keep the runs made
        if run > 0:
            randomize(model, generator)
        history: list[float] = []
        bar = tqdm(
            total=maxiter,
            desc=f"fit {run + 1}/{restarts + 1}",
            disable=progress is False or (progress is None and not _stderr_is_terminal()),
            delay=2.0 if progress is None else 0.0,  # quick fits stay silent
            leave=False,
        )

        def record(loss: float, history: list[float] = history, bar: tqdm = bar) -> None:
            history.append(-loss * scale - offset)
            bar.update(1)
            bar.set_postfix({label: f"{history[-1]:.4g}"}, refresh=False)  # refresh would defeat delay
            stop(loss)  # past the deadline: the optimisers end the run here, keeping this iterate

        minimize = (
            minimize_lbfgs if optimizer == "lbfgs" else functools.partial(minimize_adam, lr=lr, patience=patience)
        )
        message = minimize(closure, params, maxiter, record)
        bar.close()
        if message == BUDGET_SPENT:
            warnings.warn(
                f"fit: the time budget was spent after {len(history)} iterations of run {run + 1}, before the "
                "optimiser converged; the model keeps the hyperparameters reached (a larger time_budget fits further)",
                OptimizationWarning,
                stacklevel=3,
            )
        if "non-finite" in message:
            note = f"fit run {run + 1}: {message}; kept the last point with a finite loss"
            warnings.warn(note, RuntimeWarning, stacklevel=3)
        if lazy:  # a single run: nothing to compare, no state to restore
            return FitResult(None, history, None)
        mll = model.log_marginal_likelihood()
        if best is None or mll > best.mll:
            best = FitResult(mll, history, copy.deepcopy(model.state_dict()) if restarts else None)
    assert best is not None
    return best


def _stderr_is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def randomize(model: Any, generator: torch.Generator | None) -> None:
    """Initial hyperparameters of a restart: log-uniform lengthscales in [0.05, 1] (internal units), zero mean."""
    for _, module in walk(model.covar_module):
        if module.has_lengthscale:
            log_ls = torch.empty(module.lengthscale.shape, dtype=torch.float64).uniform_(
                math.log(0.05), math.log(1.0), generator=generator
            )
            module.lengthscale = log_ls.exp().to(module.lengthscale)
    with torch.no_grad():
        model.mean_module.constant.zero_()


def compact_window(X: Tensor, size: int) -> Tensor:
    """The ``size`` points nearest to the coordinate-wise median of `n x d` ``X``, sorted (a compact window).

    A window keeps the density of the data, which lengthscales and noise depend on; a random
    subset of the same size is sparser and gives longer lengthscales and more noise
    (docs/terrain.md).
    """
    centre = X.median(0).values
    distance = (X - centre).abs().amax(-1)
    return distance.argsort()[: min(size, X.shape[0])].sort().values


def window_points(model: Any, rows: int) -> int:
    """How many of the model's points hold about ``rows`` observed rows (its mean rows per point)."""
    return int(rows / max(1.0, model.num_observations / model.n))


def _until(deadline: float | None) -> Callable[[float], None]:
    """An optimiser callback that ends the run once ``time.monotonic()`` passes ``deadline`` (None: never)."""

    def check(_: float) -> None:
        if deadline is not None and time.monotonic() > deadline:
            raise StopIteration

    return check


def warm_start(model: Any, rows: int, maxiter: int = 100, deadline: float | None = None) -> str:
    """Fit the hyperparameters by L-BFGS on a compact window of about ``rows`` observed rows.

    Through ``model.loss(points)``, i.e. the engine's ``subset_engine`` (exact for the variational
    engine): a starting point for a stochastic fit, which converges slowly from the defaults.
    Nothing is done when the window would hold all the points. ``deadline``: as for
    :func:`fit_hyperparameters`.

    Returns:
        L-BFGS's termination message (empty when nothing was done).
    """
    size = max(1, window_points(model, rows))
    if size >= model.n:
        return ""
    window = compact_window(model.train_X, size)
    params = [p for name, p in model.named_parameters() if p.requires_grad and not name.startswith("engine_state.")]

    def closure() -> Tensor:
        loss = model.loss(window)
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizationWarning)  # a warm start need not converge
        return minimize_lbfgs(closure, params, maxiter, _until(deadline))


def noise_from_bound(model: Any, rounds: int = NOISE_ROUNDS, points: int = NOISE_POINTS) -> bool:
    r"""Set the learned noise variances to their maximisers of an approximate engine's bound (EM rounds).

    An exact fit (the warm start) can drive a noise variance to its lower bound, where the
    approximate model, which explains less of the data, needs far more; there the constraint's
    transform has a vanishing gradient and Adam cannot bring it back (in a 10-D case the learned
    value noise stayed at 1e-6 with residuals of 0.7 and over-confident bars). Each round takes
    :math:`q` from one random sample and sets every learned group variance to the mean expected
    squared error :math:`(r_i - \mu_i)^2 + \kappa_i` of its rows at another
    (:meth:`~gpderiv.inference.base.Engine.expected_errors`,
    :meth:`~gpderiv.likelihoods.DerivativeGaussianNoise.set_from_errors`).

    Returns:
        Whether the engine supports it (False for exact engines: nothing is done).
    """
    for _ in range(rounds):
        with torch.no_grad():
            stats = model.engine.expected_errors(
                model.covar_module, model.data, model.row_noise(), model.residual(), points
            )
        if stats is None:
            return False
        model.likelihood.set_from_errors(*stats)
    return True


def approximation_error(model: Any, factor: Any, reference: Tensor) -> Tensor:
    r"""`d + 3` variances per row kind of an approximate model's error beyond its own variance and the noise.

    Where the approximation cannot follow the function, its misfit does not shrink near the
    inducing points as its variance does. At the rows :math:`i` of a random sample of training
    points (at most :data:`ERROR_POINTS`), with the factor's posterior mean :math:`\mu_i` and
    variance :math:`\kappa_i`, the ``reference`` noise variance :math:`\sigma^2_i` of an exact fit
    (the warm start's) and the row's noise ratio :math:`\rho_i`, kind k gets the least
    :math:`\epsilon_k \ge 0` with

    .. math:: \operatorname{mean}_{i \in k} \frac{(r_i - \mu_i)^2}{\kappa_i + \rho_i(\sigma^2_i + \epsilon_k)} \le 1,

    found by bisection (the mean falls as :math:`\epsilon_k` grows, and is at most 1 at
    :math:`\epsilon_k = \operatorname{mean} (r_i - \mu_i)^2 / \rho_i`): white error of the
    approximate mean that calibrates the rows. An :math:`\epsilon_k` below :data:`DETECTABLE`
    times :math:`\sigma^2_k` is set to zero: the noise estimate is not that precise. The
    approximation uses few of the rows' degrees of freedom (``M_u`` of ``N``), so errors at
    training rows stand for those at new points. Predictions add it
    (:mod:`gpderiv.inference.variational`, "Approximation error").

    Args:
        model: the model (its ``data`` and ``residual()``).
        factor: the approximate engine's factor, whose posterior does not include the error yet.
        reference: `d + 3` noise variances per row kind of an exact fit.
    """
    data = model.data
    generator = torch.Generator().manual_seed(0)  # the same sample on every torch.distributed rank
    size = min(data.n, ERROR_POINTS, factor.chunk_points(math.ceil(data.num_rows / data.n)))
    points = torch.randperm(data.n, generator=generator)[:size].to(data.X.device)
    rows, index = data.subset(points)
    with torch.no_grad():
        mean, var = factor.posterior(rows, "var")
        squared = (model.residual()[index] - mean).square()
        ratio = torch.ones_like(squared) if rows.noise_ratio is None else rows.noise_ratio
        kinds = rows.kinds
        error = torch.zeros_like(reference, dtype=squared.dtype, device=squared.device)
        for kind in kinds.unique().tolist():
            e, k, rho = squared[kinds == kind], var[kinds == kind], ratio[kinds == kind]
            floor = k + rho * reference[kind].to(k)

            def z2(eps: float, e=e, rho=rho, floor=floor) -> float:
                return float((e / (floor + rho * eps)).mean())

            if z2(0.0) <= 1.0:
                continue
            low, high = 0.0, float((e / rho).mean())
            for _ in range(60):  # bisection to float64 resolution
                middle = 0.5 * (low + high)
                low, high = (middle, high) if z2(middle) > 1.0 else (low, middle)
            # Below a quarter of the noise, an excess is not told apart from an error of the noise
            # estimate itself (a smooth 3-D function, N = 1,000,000: an excess of 7 % of the noise
            # made the bars of f, whose error is far below the noise, 80 times too wide).
            error[kind] = high if high > DETECTABLE * float(reference[kind]) else 0.0
        return error


def auto_window(model: Any) -> Tensor | None:
    """The points of ``fit(subset="auto")``: a compact window for a large exact problem, else None (all).

    A window of about :data:`AUTO_WINDOW_ROWS` rows (:func:`compact_window`) when the model has more
    than :data:`AUTO_WINDOW_MIN_ROWS` rows, the window holds at least :data:`AUTO_WINDOW_MIN_POINTS`
    points, and the engine is exact (the variational engine warm-starts on a window itself).
    """
    size = window_points(model, AUTO_WINDOW_ROWS)
    if model.engine.approximate or model.num_observations <= AUTO_WINDOW_MIN_ROWS or size < AUTO_WINDOW_MIN_POINTS:
        return None
    return compact_window(model.train_X, size)
