"""DerivativeGP: exact GP regression on values and partial derivatives (wiring over the shared engines)."""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Iterator
from typing import Any

import gpytorch
import numpy as np
import torch
from gpytorch.kernels import Kernel, ScaleKernel
from gpytorch.means import ConstantMean
from torch import Tensor

from gpderiv._validation import (
    as_column,
    as_directional,
    as_flag,
    as_float_tensor,
    as_hessian,
    as_integer,
    as_positive_number,
    as_seed,
    check_finite,
    check_hyperparameters,
    known_noise,
    subset_points,
)
from gpderiv.block_prediction import BlockPredictions
from gpderiv.fitting import approximation_error, auto_window, fit_hyperparameters, noise_from_bound, warm_start
from gpderiv.functional_prediction import FunctionalPredictions
from gpderiv.hyperparameter_uncertainty import HyperparameterUncertainty
from gpderiv.inference import Engine, Factor, FactorCache, engine_names, get_engine, resolve_engine
from gpderiv.inference.threads import threads_for
from gpderiv.kernels import default_kernel
from gpderiv.kernels.composition import check_derivative_kernel, derivative_leaves, walk
from gpderiv.likelihoods import DerivativeGaussianNoise, default_noise_prior
from gpderiv.observations import DIRECTIONAL, HESSIAN, ObservationSet
from gpderiv.observed_rows import ObservedRows
from gpderiv.scaling import Scaling

__all__ = ["DerivativeGP"]


def _internal_noise(name: str, value: Any, size: int, factor: Tensor) -> Tensor:
    """A known noise variance (user units) in internal units: divided by the squared row factor.

    Divided twice by the factor rather than once by its square, which would underflow first.

    Raises:
        ValueError: the internal variance overflows (a noise many orders of magnitude above the data's scale).
    """
    noise = known_noise(name, value, size).to(factor) / factor / factor
    if not bool(torch.isfinite(noise).all()):
        raise ValueError(
            f"{name}: the known noise variance {value!r} is too large for the scale of the data "
            f"({factor.max().item():.3g}, its square overflows {factor.dtype} when dividing); expected a variance "
            "representable relative to the data's scale"
        )
    return noise


class DerivativeGP(BlockPredictions, FunctionalPredictions, gpytorch.Module):
    r"""Exact Gaussian-process regression on function values and partial derivatives.

    The prior is :math:`f \sim \mathcal{GP}(c, k)`; an observation of kind 0 is
    :math:`y_i = f(x_i) + \varepsilon_0`, one of kind ``1 + a`` is
    :math:`g_{ia} = \partial_a f(x_i) + \varepsilon_a`, with independent
    :math:`\varepsilon_a \sim \mathcal N(0, \sigma_a^2)`. Only observed entries (not NaN) enter
    the linear system. Internally X is scaled to the unit box and y standardised (see
    :class:`~gpderiv.scaling.Scaling`); every input and output of this class is in the user's units.

    Args:
        X: `n x d` inputs (a 1-D array is taken as `n` points in one dimension).
        y: `n` observed values; NaN = not observed.
        grad: `n x d` observed partial derivatives ``df/dx_a``; NaN = not observed. None gives a
            value-only GP, which still predicts gradients.
        directional: observed directional derivatives ``(index, V, values)``: `k` indices of
            points of X, `k x d` directions (user units, not necessarily unit length) and `k`
            observed ``v . grad f(x)``; several per point are allowed; NaN = not observed. Each
            costs one row of the system, not d.
        hessian: `n x d x d` observed second derivatives ``d2f / dx_a dx_b``; NaN = not observed.
            ``H[i, a, b]`` and ``H[i, b, a]`` are one observation (give either, or both equal).
            Needs a twice mean-square differentiable kernel (RBF, Matern 5/2).
        kernel: a derivative-aware GPyTorch kernel in block layout working in internal units
            (default ``ScaleKernel(DerivativeRBFKernel(ard_num_dims=d))``).
        noise: known noise variance of the values (user units), or None to learn it.
        grad_noise: known noise variance of the derivatives, scalar or `d` (user units), or None
            to learn it.
        shared_grad_noise: learn one derivative-noise variance for all dimensions.
        noise_lower_bound: lower bound of learned noise variances, relative to the variance of
            the data (internal units).
        noise_prior: put :func:`~gpderiv.likelihoods.default_noise_prior` (BoTorch's
            :math:`\mathrm{LogNormal}(-4, 1)`, internal units) on every learned noise variance, so
            that :meth:`fit` maximises the posterior rather than the likelihood in them. It keeps a
            noise variance of a few noisy points off its bound (lowest coverage of a fit in the
            calibration benchmark 0.66 instead of 0.47) but pulls the noise of exact data up (RMSE
            12-15 % worse on noiseless data): off by default (docs/reliability.md, "Calibration").
        hyperparameter_uncertainty: add the uncertainty of the fitted hyperparameters to the
            predicted variances of f and grad f (and to ``full_cov`` covariances): a Laplace
            approximation of their posterior propagated by the delta method, see
            :mod:`gpderiv.hyperparameter_uncertainty`. ``"auto"`` (default): for small problems
            (`2P N^2` at most :data:`~gpderiv.hyperparameter_uncertainty.AUTO_ELEMENTS` for `P`
            hyperparameters and `N` rows), ``True``: always, ``False``: never (plug-in variances).
            Only after :meth:`fit` (or for a model loaded as fitted) and never with a stochastic
            engine (``"iterative"``). Means are unchanged; Hessian, directional and local
            variances get the same term.
        inference: inference engine: ``"auto"`` (default: chosen by
            :func:`gpderiv.inference.select_engine`), ``"dense"`` (exact Cholesky,
            any kernel and observations), ``"iterative"`` (matrix-free CG and stochastic Lanczos
            log-determinants for the default RBF kernel with values and full gradients; memory
            O(n d); see :mod:`gpderiv.inference.iterative`) or ``"structured"`` (exact, time and
            memory linear in d for few points in many dimensions: the default RBF kernel, ARD or
            not, with values and full gradients; see :mod:`gpderiv.inference.structured` and
            :mod:`gpderiv.inference.structured_ard`), ``"variational"`` (approximate: inducing
            values and directional derivatives trained on minibatches, any kernel and
            observations, for millions of rows; see :mod:`gpderiv.inference.variational`), or the
            name of any engine registered with :func:`gpderiv.inference.register_engine`.
        inference_options: keyword options of the engine (saved with the model), e.g.
            ``{"num_inducing": 500, "directions": 2, "batch_size": 256}`` for ``"variational"``.

    The resolved engine's name is the attribute ``inference`` (what :meth:`save` stores), the engine
    itself :attr:`engine`; the model never branches on which engine it is.

    Attributes:
        data: the observed rows in internal units (:class:`~gpderiv.observed_rows.ObservedRows`).
        engine: the inference engine (:class:`~gpderiv.inference.Engine`).
        mll: exact log marginal likelihood (user units) after :meth:`fit` (a stochastic estimate with
            ``inference="iterative"``, evaluated on first access when ``fit`` did not need it).
        mll_history: log marginal likelihood after each optimiser iteration of the kept run.
        fitted: whether the hyperparameters are meant for prediction: False for a new model, True
            after :meth:`fit` and for a model loaded from a file saved when it was True. Predicting
            while it is False warns once per model (:class:`~gpderiv.exceptions.NotFittedWarning`);
            set it to True yourself after setting the hyperparameters by hand.

    Example:
        >>> import torch
        >>> X = torch.linspace(0, 3, 8, dtype=torch.float64).unsqueeze(-1)
        >>> model = DerivativeGP(X, torch.sin(X[:, 0]), torch.cos(X)).fit()
        >>> pred = model.predict(torch.tensor([[1.5]], dtype=torch.float64))
        >>> bool((pred.grad_mean - torch.cos(torch.tensor(1.5))).abs() < 1e-2)
        True
    """

    def __init__(
        self,
        X: Any,
        y: Any,
        grad: Any = None,
        *,
        directional: tuple[Any, Any, Any] | None = None,
        hessian: Any = None,
        kernel: Kernel | None = None,
        noise: float | None = None,
        grad_noise: float | Any | None = None,
        shared_grad_noise: bool = False,
        noise_lower_bound: float = 1e-6,
        noise_prior: bool = False,
        hyperparameter_uncertainty: bool | str = "auto",
        inference: str = "auto",
        inference_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        X = as_float_tensor("X", X, shape_hint="(n, d)")
        X = X.unsqueeze(-1) if X.ndim == 1 else X
        if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
            raise ValueError(f"X: expected shape (n, d) with n >= 1 and d >= 1, got {tuple(X.shape)}")
        check_finite("X", X)
        n, d = X.shape
        y = as_column("y", y, X, (n,))
        grad = None if grad is None else as_column("grad", grad, X, (n, d))
        directional = None if directional is None else as_directional(directional, X)
        hessian = None if hessian is None else as_hessian(hessian, X)
        shared_grad_noise = as_flag("shared_grad_noise", shared_grad_noise)
        noise_prior = as_flag("noise_prior", noise_prior)
        if not (isinstance(hyperparameter_uncertainty, (bool, np.bool_)) or hyperparameter_uncertainty == "auto"):
            raise TypeError(
                f"hyperparameter_uncertainty: expected True, False or 'auto', got {hyperparameter_uncertainty!r}"
            )
        hyperparameter_uncertainty = (
            "auto" if hyperparameter_uncertainty == "auto" else bool(hyperparameter_uncertainty)
        )
        if isinstance(noise_lower_bound, bool) or not (
            isinstance(noise_lower_bound, (int, float)) and 0 <= noise_lower_bound < math.inf
        ):
            raise ValueError(f"noise_lower_bound: expected a finite number >= 0, got {noise_lower_bound!r}")
        if inference != "auto" and inference not in engine_names():
            raise ValueError(f"inference: expected 'auto' or one of {engine_names()}, got {inference!r}")
        # Training data is data: detached, so that fitting (one backward pass per loss evaluation)
        # never reaches into the caller's autograd graph ("backward through the graph a second time").
        X, y, grad, hessian = (None if t is None else t.detach() for t in (X, y, grad, hessian))
        directional = None if directional is None else tuple(t.detach() for t in directional)

        # What save() needs to rebuild the model (user units, validated).
        self._init_args = {
            "X": X.clone(),
            "y": y.clone(),
            "grad": None if grad is None else grad.clone(),
            "directional": None if directional is None else tuple(t.clone() for t in directional),
            "hessian": None if hessian is None else hessian.clone(),
            "noise": noise,
            "grad_noise": grad_noise,
            "shared_grad_noise": shared_grad_noise,
            "noise_lower_bound": noise_lower_bound,
            "noise_prior": noise_prior,
            "hyperparameter_uncertainty": hyperparameter_uncertainty,
            "inference": inference,
            "inference_options": None if inference_options is None else dict(inference_options),
        }
        obs = ObservationSet.from_data(y, grad, d, directional, hessian)
        self.n, self.d, self.has_grad = n, d, obs.has_grad
        self.scaling = Scaling(X, obs)
        self.data = ObservedRows.from_observations(self.scaling.x(X), obs, self.scaling)
        self.mean_module = ConstantMean()
        self.covar_module = kernel if kernel is not None else default_kernel(d)
        check_derivative_kernel(self.covar_module)
        check_hyperparameters("kernel", self.covar_module)
        order = 2 if bool((self.kinds == d + HESSIAN).any()) else 1
        for leaf in derivative_leaves(self.covar_module):
            if leaf.max_derivative_order < order:
                raise ValueError(
                    f"hessian: {type(leaf).__name__} is only {leaf.max_derivative_order} time(s) mean-square "
                    "differentiable, so second-derivative observations are not defined; use DerivativeRBFKernel "
                    "or DerivativeMatern52Kernel"
                )
        y_factor, grad_factor = self.scaling.y_scale, self.scaling.y_scale / self.scaling.x_scale
        self.likelihood = DerivativeGaussianNoise(
            d,
            shared_grad_noise=shared_grad_noise,
            lower_bound=noise_lower_bound,
            value_noise=None if noise is None else _internal_noise("noise", noise, 1, y_factor),
            grad_noise=None if grad_noise is None else _internal_noise("grad_noise", grad_noise, d, grad_factor),
            directional=bool((self.kinds == d + DIRECTIONAL).any()),
            hessian=order == 2,
            prior=default_noise_prior() if noise_prior else None,
        )
        shared = self.likelihood.shared_grad_noise
        self.engine: Engine = resolve_engine(
            inference,
            self.covar_module,
            self.data,
            shared_grad_noise=shared,
            dtype=X.dtype,
            device=X.device,
            options=inference_options,
        )
        #: The engine's name (``"auto"`` resolved); saved models reload with the same engine.
        self.inference = self._init_args["inference"] = self.engine.name
        #: The engine's trainable state (the variational engine's inducing variables), or None.
        self.engine_state = self.engine.make_state(self.covar_module, self.data)
        self.to(dtype=X.dtype, device=X.device)
        self._mll: float | None = None
        self._mll_pending = False
        self.mll_history: list[float] = []
        self.fitted = False
        self._warned_not_fitted = False
        self._cache = FactorCache()
        self._hyperparameters = HyperparameterUncertainty(hyperparameter_uncertainty)
        if hyperparameter_uncertainty is True and self.engine.stochastic:
            warnings.warn(
                f"hyperparameter_uncertainty=True does not apply with the {self.engine.name!r} engine (its marginal "
                "likelihood is a stochastic estimate, whose Hessian by differences would be noise): the variances "
                "are plug-in ones; pass inference='dense' for the correction",
                UserWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------ data (internal units)
    @property
    def train_X(self) -> Tensor:
        """`n x d` training inputs (internal units)."""
        return self.data.X

    @property
    def train_targets(self) -> Tensor:
        """`N` observed rows (internal units)."""
        return self.data.targets

    @property
    def kinds(self) -> Tensor:
        """`N` kind of each row: 0 value, ``1 + a`` partial ``a``, ``d + 1`` directional, ``d + 2`` Hessian."""
        return self.data.kinds

    @property
    def num_observations(self) -> int:
        """Number of observed rows ``N`` (values, partial, directional and second derivatives)."""
        return self.data.num_rows

    @property
    def training_data(self) -> dict[str, Any]:
        """The training data in the user's units (``X``, ``y``, ``grad``, ``directional``, ``hessian``)."""
        keys = ("X", "y", "grad", "directional", "hessian")
        return {k: self._init_args[k] for k in keys}

    def row_noise(self) -> Tensor:
        """`N` noise variance of each observed row (internal units)."""
        return self.likelihood.row_noise(self.data.kinds) * self.data.noise_ratio

    def residual(self) -> Tensor:
        """`N` targets minus the prior mean (internal units): the constant applies to value rows only."""
        return self.data.targets - self.mean_module.constant * (self.data.kinds == 0)

    # ------------------------------------------------------------------ marginal likelihood
    def loss(self, subset: Tensor | None = None) -> Tensor:
        """What :meth:`fit` minimises: negative log marginal likelihood plus negative log priors, per row.

        Internal units, differentiable with respect to every hyperparameter.

        Args:
            subset: use only the observations at these point indices (subset of data, through
                the engine's ``subset_engine``).
        """
        noise, resid, data, engine = self.row_noise(), self.residual(), self.data, self.engine
        if subset is not None:
            data, index = data.subset(subset)
            noise, resid = noise[index], resid[index]
            engine = get_engine(engine.subset_engine) if engine.subset_engine else engine
        loss = engine.negative_log_marginal(self.covar_module, data, noise, resid)
        for _, module, prior, closure, _ in self.named_priors():
            loss = loss - prior.log_prob(closure(module)).sum()
        return loss / resid.numel()

    def _factor_modules(self) -> tuple[torch.nn.Module, ...]:
        """The modules a factor depends on: hyperparameters, data and the engine's state."""
        modules = (self.covar_module, self.mean_module, self.likelihood, self.data, self.engine_state)
        return tuple(m for m in modules if m is not None)

    def _cached_factor(self) -> Factor | None:
        """The cached factor if the hyperparameters (and the data's device) are still those it was made with."""
        return self._cache.get(self._factor_modules())

    def factor(self) -> Factor:
        """The engine's factorisation at the current hyperparameters, computed once and cached."""
        factor = self._cached_factor()
        if factor is None:
            check_hyperparameters("kernel", self.covar_module)  # also set after construction, e.g. by hand
            with torch.no_grad():
                factor = self.engine.factor(self.covar_module, self.data, self.row_noise(), self.residual())
            self._cache.put(self._factor_modules(), factor)
        return factor

    def clear_cache(self) -> None:
        """Drop the cached factorisation: the next prediction factorises again (for timings)."""
        self._cache.clear()

    def log_marginal_likelihood(self) -> float:
        r"""Exact :math:`\log p(y, \nabla f \mid X, \theta)` of the observed data in the user's units.

        With ``inference="iterative"`` the log-determinant is a stochastic Lanczos estimate.
        """
        # Lazy engines' factors are a full set of CG solves: not made just for this number.
        factor = self._cached_factor() or (None if self.engine.lazy else self.factor())
        with torch.no_grad():
            if factor is not None:
                nll = factor.negative_log_marginal()
            else:
                nll = self.engine.negative_log_marginal(self.covar_module, self.data, self.row_noise(), self.residual())
        return float(-nll - self.data.row_factor.log().sum())

    def fit(
        self,
        *,
        optimizer: str | None = None,
        maxiter: int | None = None,
        lr: float | None = None,
        restarts: int = 0,
        seed: int | None = None,
        progress: bool | None = None,
        subset: int | Any | None = "auto",
        time_budget: float | None = None,
    ) -> DerivativeGP:
        """Maximise the exact log marginal likelihood over the hyperparameters (an approximate engine's bound).

        With the variational engine the hyperparameters first come from an exact fit on a compact
        window of about 1,000 rows (:func:`~gpderiv.fitting.warm_start`) and the noise variances
        from the bound (:func:`~gpderiv.fitting.noise_from_bound`); then the evidence lower
        bound on minibatches is maximised by Adam over the hyperparameters and the inducing points
        and directions while the variational distribution takes natural-gradient steps
        (:mod:`gpderiv.inference.variational`); the run stops early once the mean bound over a
        window of iterations stops improving. Last, the approximation's misfit beyond its own
        variance is measured (:func:`~gpderiv.fitting.approximation_error`) and added to the error
        bars of its predictions.

        Args:
            optimizer: ``"lbfgs"`` (scipy L-BFGS-B) or ``"adam"``; default: the engine's
                (L-BFGS, Adam for the variational engine).
            maxiter: iteration limit (default: the engine's, else 200 for L-BFGS, 100 for Adam).
            lr: Adam learning rate (default: the engine's, else 0.1).
            restarts: extra runs from random initial hyperparameters; the run with the best
                final marginal likelihood is kept.
            seed: seed of the random restarts and subsets, and, with an engine whose marginal
                likelihood is stochastic (``"iterative"``), of its probe vectors: the same seed then
                gives the same fit (torch's global random state is left as it was).
            progress: show a tqdm bar with the current log marginal likelihood: ``None`` (default)
                shows it only when standard error is a terminal and once a run has taken more
                than 2 seconds (logs and CI stay clean), ``True`` always, ``False`` never.
            subset: optimise the marginal likelihood of the observations at this many random
                points (drawn once per fit, with ``seed``), or at these point indices, instead
                of all of them; the final factorisation, :attr:`mll` and predictions use all the
                data. A fast way to set hyperparameters on large data sets (a spatially compact
                subset keeps the data's density, which lengthscales and noise depend on);
                :attr:`mll_history` then refers to the subset. ``"auto"`` (default): all the
                data, except for large problems of an exact engine (more than
                :data:`~gpderiv.fitting.AUTO_WINDOW_MIN_ROWS` rows at enough points), whose
                hyperparameters come from a compact window of about
                :data:`~gpderiv.fitting.AUTO_WINDOW_ROWS` rows (:func:`~gpderiv.fitting.auto_window`):
                Mount St Helens' 21,060 rows then fit and predict in about 3 minutes on 2 cores.
                ``None``: always all the data.
            time_budget: seconds the hyperparameter fit may take (warm start and restarts
                included): the optimiser stops at the end of the iteration that passes it, with an
                :class:`~gpderiv.OptimizationWarning`, and the model keeps the hyperparameters
                reached; the final factorisation comes on top. None (default): no limit. The
                progress bar shows the expected time to ``maxiter`` as its remaining time.

        Returns:
            ``self``, with :attr:`mll` and :attr:`mll_history` set and the factorisation cached
            (with ``inference="iterative"`` and no restarts, both wait for their first use: each is
            a full set of CG solves, minutes at N = 110,000, and the log marginal likelihood is
            not needed to choose a run).
        """
        engine = self.engine
        optimizer = engine.optimizer if optimizer is None else optimizer
        if optimizer not in ("lbfgs", "adam"):
            raise ValueError(f"optimizer: expected 'lbfgs' or 'adam', got {optimizer!r}")
        restarts = as_integer("restarts", restarts, minimum=0)
        maxiter = engine.maxiter if maxiter is None else as_integer("maxiter", maxiter, minimum=1)
        lr = as_positive_number("lr", engine.lr if lr is None else lr)
        seed = as_seed(seed)
        progress = as_flag("progress", progress, none_ok=True)
        deadline = None if time_budget is None else time.monotonic() + as_positive_number("time_budget", time_budget)
        auto = isinstance(subset, str) and subset == "auto"
        points = auto_window(self) if auto else subset_points(subset, self.n, self.train_X.device)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        if isinstance(points, int):  # a number of random points
            points = torch.randperm(self.n, generator=generator)[:points].sort().values.to(self.train_X.device)
        # Small problems fit single-threaded (gpderiv.inference.threads). The size is the full data's
        # even for a subset fit: runs are compared, and the factor cached, on all of it.
        with threads_for(self.num_observations, self.train_X.device), self._probe_seed(seed):
            error = getattr(self.engine_state, "approximation_error", None)
            if error is not None:
                error.zero_()  # set again below, from this fit's misfit
            warm = points is None and engine.warm_start_rows
            warmed = warm and warm_start(self, engine.warm_start_rows, deadline=deadline)
            reference = self.likelihood.kind_noise().detach().clone() if warmed else None
            if points is None and engine.approximate:
                noise_from_bound(self)  # an exact warm start's noise is too small for the approximation
            result = fit_hyperparameters(
                self,
                optimizer=optimizer,
                maxiter=maxiter if maxiter is not None else (200 if optimizer == "lbfgs" else 100),
                lr=lr,
                restarts=restarts,
                generator=generator,
                progress=progress,
                points=points,
                patience=engine.patience if optimizer == "adam" else None,
                deadline=deadline,
            )
        if result.state is not None:
            self.load_state_dict(result.state)
        self.mll, self.mll_history = result.mll, result.history
        self.fitted = True
        self._mll_pending = result.mll is None
        if not self._mll_pending:
            with threads_for(self.num_observations, self.train_X.device):
                factor = self.factor()  # cached for predict (a no-op when the last run was the best)
                if reference is not None and error is not None:  # the approximation's misfit, for its error bars
                    error.copy_(approximation_error(self, factor, reference))
                    self._cache.put(self._factor_modules(), factor)  # which the factor does not depend on
        self.prepare_uncertainty()
        return self

    @contextlib.contextmanager
    def _probe_seed(self, seed: int | None) -> Iterator[None]:
        """Seed torch's random state for a stochastic engine's probe vectors inside, and restore it after."""
        if seed is None or not self.engine.stochastic:
            yield
            return
        device = self.train_X.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            yield

    def prepare_uncertainty(self) -> None:
        """Compute the factorisation and the hyperparameters' share of the variances now, not at the next prediction.

        :meth:`fit` and :meth:`load` call it: the next prediction then does no extra work, and it may
        run inside ``torch.inference_mode()`` or a ``torch.func`` transform (which refuse the autograd
        and in-place parameter updates of this computation; there the variances fall back to plug-in
        ones, with a warning). Call it yourself after changing hyperparameters by hand. A no-op when
        the correction does not apply (``hyperparameter_uncertainty``).
        """
        if self._hyperparameters.applies(self):
            with threads_for(self.num_observations, self.train_X.device):
                self.factor()
                self._hyperparameters.prepare(self)

    @property
    def mll(self) -> float | None:
        """Log marginal likelihood after :meth:`fit` (user units); None before."""
        if self._mll_pending:
            self._mll, self._mll_pending = self.log_marginal_likelihood(), False
        return self._mll

    @mll.setter
    def mll(self, value: float | None) -> None:
        self._mll, self._mll_pending = value, False

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Save the model (data, options, kernel description, hyperparameters) to ``path``; see :meth:`load`."""
        from gpderiv.persistence import save_model  # persistence depends on the model, not the reverse

        save_model(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> DerivativeGP:
        """Load a model saved with :meth:`save`; predictions are bit-identical to the saved model's.

        The file is read with ``torch.load(weights_only=True)``: tensors and plain data only, the
        kernel rebuilt from an allow-list of classes. Loading never executes code from the file.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: the file is corrupt, not a gpderiv model file, or of an unsupported format.
        """
        from gpderiv.persistence import load_model

        return load_model(cls, path)

    # ------------------------------------------------------------------ hyperparameters (user units)
    def hyperparameters(self) -> dict[str, Tensor]:
        """Learned hyperparameters in the user's units (lengthscales per input dimension, etc.)."""
        out: dict[str, Tensor] = {
            "mean": (self.mean_module.constant * self.scaling.y_scale + self.scaling.y_offset).detach(),
            "noise": (self.likelihood.value_noise * self.scaling.y_scale.square()).detach(),
        }
        if self.has_grad:
            out["grad_noise"] = (
                self.likelihood.grad_noise * (self.scaling.y_scale / self.scaling.x_scale).square()
            ).detach()
        for group, name in ((DIRECTIONAL, "directional_noise"), (HESSIAN, "hessian_noise")):
            rows = self.kinds == self.d + group
            if bool(rows.any()):  # user units: the same for every row of the group (ObservedRows.from_observations)
                reference = self.data.row_factor[rows].log().mean().exp()
                noise = self.likelihood.extra_noise(name.split("_")[0]) * reference.square()
                out[name] = noise.detach()
        for name, module in walk(self.covar_module):
            prefix = f"{name}." if name else ""
            if isinstance(module, ScaleKernel):
                out[f"{prefix}outputscale"] = (module.outputscale * self.scaling.y_scale.square()).detach()
            # Lengths along the inputs (lengthscales, periods) scale with the input ranges.
            for attr in ("lengthscale", "period_length"):
                if getattr(module, f"raw_{attr}", None) is not None:
                    value = getattr(module, attr).reshape(-1)
                    out[f"{prefix}{attr}"] = (value * self.scaling.x_scale).detach()
        return out
