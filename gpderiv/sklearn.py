"""scikit-learn estimator around :class:`~gpderiv.model.DerivativeGP`.

scikit-learn is an optional dependency (``pip install scikit-learn`` or
``pip install gpderiv[sklearn]``); it is imported when this module is.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import numpy as np
import torch
from gpytorch.distributions import MultivariateNormal
from gpytorch.kernels import Kernel
from linear_operator.operators import DenseLinearOperator

try:
    from sklearn.base import BaseEstimator, RegressorMixin
    from sklearn.pipeline import Pipeline
    from sklearn.utils import check_random_state
    from sklearn.utils.validation import (
        check_array,
        check_consistent_length,
        check_is_fitted,
        column_or_1d,
        validate_data,
    )
except ImportError as exc:  # pragma: no cover - exercised by a test that hides sklearn
    raise ImportError(
        "gpderiv.sklearn requires scikit-learn >= 1.6, which could not be imported "
        f"({exc}). Install it with `pip install scikit-learn` (or `pip install gpderiv[sklearn]`)."
    ) from exc

from gpderiv.exceptions import InputWarning
from gpderiv.kernels.defaults import FAMILIES, default_kernel
from gpderiv.model import DerivativeGP

__all__ = ["DerivativeGPRegressor", "check_pipeline"]

# How far up the call stack fit looks for a Pipeline whose final step it is (see _calling_pipeline):
# Pipeline.fit calls the final step's fit directly; a few frames cover decorators and nesting.
_PIPELINE_FRAMES = 8


def _is_transform(step: Any) -> bool:
    """Whether a Pipeline step changes X (``None`` and ``"passthrough"`` do not)."""
    return step is not None and not (isinstance(step, str) and step == "passthrough")


def check_pipeline(pipeline: Any, *, stacklevel: int = 2) -> list[str]:
    """Warn if a step of ``pipeline`` transforms ``X`` before a :class:`DerivativeGPRegressor` fed gradients.

    A gradient passed through the pipeline's fit parameters (``pipe.fit(X, y, reg__grad=G)``)
    reaches the regressor unchanged while its ``X`` has been transformed: for a scaler
    ``X' = (X - mu) / s`` the regressor needs ``df/dX'_a = s_a df/dX_a``, so it would be fitted to
    wrong derivatives. Call this before fitting a pipeline with gradients; ``fit`` also runs it
    itself when it is called by a ``Pipeline`` (best effort: see docs/sklearn.md).

    Args:
        pipeline: a ``sklearn.pipeline.Pipeline`` whose final step is a
            :class:`DerivativeGPRegressor` (nested pipelines are followed through their final
            steps).
        stacklevel: of the warning, as for :func:`warnings.warn`.

    Returns:
        The names of the steps that transform ``X`` before the regressor (``"outer__inner"`` for
        nested pipelines); empty when there is none (then nothing is warned).

    Raises:
        TypeError: ``pipeline`` is not a Pipeline ending in a DerivativeGPRegressor.
    """
    names: list[str] = []
    current, prefix = pipeline, ""
    while isinstance(current, Pipeline) and current.steps:
        names += [prefix + name for name, step in current.steps[:-1] if _is_transform(step)]
        prefix += current.steps[-1][0] + "__"
        current = current.steps[-1][1]
    if not isinstance(pipeline, Pipeline) or not isinstance(current, DerivativeGPRegressor):
        raise TypeError(
            "pipeline: expected a sklearn Pipeline whose final step is a DerivativeGPRegressor, got "
            f"{type(pipeline).__name__} ending in {type(current).__name__}"
        )
    if names:
        warnings.warn(
            f"grad: the pipeline step(s) {', '.join(repr(n) for n in names)} transform X before the "
            "DerivativeGPRegressor, but the gradients passed with fit are not transformed: they still refer to the "
            "unscaled inputs (a scaler X' = (X - mu) / s needs grad * s). Fit the regressor on unscaled inputs "
            "(it scales internally), or transform the gradients yourself.",
            InputWarning,
            stacklevel=stacklevel,
        )
    return names


def _calling_pipeline(estimator: DerivativeGPRegressor) -> tuple[Any | None, int]:
    """The outermost Pipeline whose ``fit`` called ``estimator.fit`` through final steps, and the user's frame.

    Looks at the ``self`` of the few frames above ``fit`` (see :data:`_PIPELINE_FRAMES`): it finds
    scikit-learn's ``Pipeline.fit`` (and pipelines nested as final steps), not wrappers that copy
    the data first. It costs a few attribute lookups and never raises.

    Returns:
        ``(pipeline, level)``: the pipeline or None, and the stack level, counted from ``fit``'s
        caller as 1, of the first frame outside scikit-learn above it (where a warning should point).
    """
    found, target, level = None, estimator, 1
    frame = sys._getframe(2)  # the caller of fit
    try:
        for depth in range(1, _PIPELINE_FRAMES + 1):
            if frame is None:
                break
            owner = frame.f_locals.get("self")
            if isinstance(owner, Pipeline) and owner.steps and owner.steps[-1][1] is target:
                found, target, level = owner, owner, depth + 1
            frame = frame.f_back
        # Skip scikit-learn's own frames above the pipeline (decorators, cross-validation helpers).
        frame = sys._getframe(1 + level) if found is not None else None
        while frame is not None and str(frame.f_globals.get("__name__", "")).startswith("sklearn."):
            frame, level = frame.f_back, level + 1
    finally:
        del frame  # no reference cycle through the frames
    return found, level


def _make_kernel(name: Any, d: int) -> Kernel:
    """``ScaleKernel(Derivative...Kernel(ard_num_dims=d))`` with DerivativeGP's default initial values."""
    if not isinstance(name, str) or name not in FAMILIES:
        raise ValueError(f"kernel: expected one of {sorted(FAMILIES)}, got {name!r}")
    return default_kernel(d, family=name)


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    """A float64 tensor owning a copy of ``array`` (safe for read-only or memory-mapped input)."""
    return torch.from_numpy(np.array(array, dtype=np.float64, copy=True))


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().copy()


class DerivativeGPRegressor(RegressorMixin, BaseEstimator):
    """Gaussian-process regressor that can also learn from observed gradients (scikit-learn API).

    A thin wrapper of :class:`~gpderiv.model.DerivativeGP`: :meth:`fit` builds the model on
    float64 copies of the data and maximises its exact log marginal likelihood; :meth:`predict`
    returns the posterior mean (and optionally its standard deviation, the predicted gradient and
    the gradient's standard deviation) as numpy arrays. Without ``grad`` it is an ordinary GP
    regressor with a learned constant mean, ARD kernel and learned noise.

    Args:
        kernel: ``"rbf"``, ``"matern52"`` or ``"matern32"``; fit builds
            ``ScaleKernel(Derivative...Kernel(ard_num_dims=n_features))`` (all three accept
            gradient observations; see :mod:`gpderiv.kernels`).
        noise: known noise variance of ``y`` (units of ``y`` squared), or None to learn it.
        grad_noise: known noise variance of the gradients, scalar or `n_features` values, or None
            to learn it (one variance per input dimension).
        noise_lower_bound: lower bound of learned noise variances, relative to the variance of
            the data.
        noise_prior: BoTorch's ``LogNormal(-4, 1)`` prior on learned noise variances (internal
            units), as for :class:`~gpderiv.DerivativeGP` (off by default).
        hyperparameter_uncertainty: include the fitted hyperparameters' uncertainty in predicted
            standard deviations and covariances (``"auto"``: on small problems), as for
            :class:`~gpderiv.DerivativeGP`.
        optimizer: ``"lbfgs"`` (scipy L-BFGS-B) or ``"adam"``; None: the engine's (L-BFGS, Adam for
            the variational engine).
        maxiter: iteration limit of the optimiser (None: the engine's, else 200 for L-BFGS, 100 for Adam).
        time_budget: seconds the hyperparameter fit may take (None: no limit), as for
            :meth:`DerivativeGP.fit <gpderiv.DerivativeGP.fit>`.
        restarts: extra optimisation runs from random initial lengthscales; the run with the
            best marginal likelihood is kept.
        random_state: seed of the restarts: None, an int or a ``numpy.random.RandomState``
            (used only when ``restarts > 0``).
        progress: show a tqdm progress bar while fitting.
        inference: the inference engine, as for :class:`~gpderiv.DerivativeGP` (``"auto"``,
            ``"dense"``, ``"iterative"``, ``"structured"``, ``"variational"`` or any registered name).
        inference_options: keyword options of the engine (e.g. ``{"num_inducing": 500}`` for
            ``"variational"``), as for :class:`~gpderiv.DerivativeGP`.

    Attributes:
        model_: the fitted :class:`~gpderiv.model.DerivativeGP` (float64).
        n_features_in_: number of features seen in :meth:`fit`.
        feature_names_in_: feature names seen in :meth:`fit`, only when ``X`` had string
            column names (a pandas DataFrame).
        log_marginal_likelihood_value_: exact log marginal likelihood of the training data
            (values and gradients) at the fitted hyperparameters.

    Notes:
        Gradients are derivatives with respect to the ``X`` passed to :meth:`fit`, in its units.
        A scaler in front of this estimator in a ``Pipeline`` changes those units, and the
        ``grad`` routed through the pipeline's fit parameters is not rescaled: fit on unscaled
        inputs when you pass gradients (the model scales internally anyway). :meth:`fit` with
        ``grad`` warns (:class:`~gpderiv.InputWarning`) when a ``Pipeline`` that transforms ``X``
        first calls it; :func:`check_pipeline` is the same check for a pipeline you hold.

    Example:
        >>> import numpy as np
        >>> X = np.linspace(0, 3, 8).reshape(-1, 1)
        >>> reg = DerivativeGPRegressor().fit(X, np.sin(X[:, 0]), grad=np.cos(X))
        >>> mean, std, grad, grad_std = reg.predict([[1.5]], return_std=True, return_grad=True)
        >>> mean.shape, std.shape, grad.shape, grad_std.shape
        ((1,), (1,), (1, 1), (1, 1))
        >>> bool(abs(mean[0] - np.sin(1.5)) < 1e-2 and abs(grad[0, 0] - np.cos(1.5)) < 1e-2)
        True
    """

    def __init__(
        self,
        kernel: str = "rbf",
        noise: float | None = None,
        grad_noise: Any = None,
        noise_lower_bound: float = 1e-6,
        noise_prior: bool = False,
        hyperparameter_uncertainty: bool | str = "auto",
        optimizer: str | None = None,
        maxiter: int | None = None,
        time_budget: float | None = None,
        restarts: int = 0,
        random_state: Any = None,
        progress: bool = False,
        inference: str = "auto",
        inference_options: dict[str, Any] | None = None,
    ) -> None:
        self.kernel = kernel
        self.noise = noise
        self.grad_noise = grad_noise
        self.noise_lower_bound = noise_lower_bound
        self.noise_prior = noise_prior
        self.hyperparameter_uncertainty = hyperparameter_uncertainty
        self.optimizer = optimizer
        self.maxiter = maxiter
        self.time_budget = time_budget
        self.restarts = restarts
        self.random_state = random_state
        self.progress = progress
        self.inference = inference
        self.inference_options = inference_options

    def fit(self, X: Any, y: Any, grad: Any = None) -> DerivativeGPRegressor:
        """Fit the Gaussian process by maximising the exact log marginal likelihood.

        Args:
            X: `n_samples x n_features` finite inputs.
            y: `n_samples` observed values; NaN = not observed at that point (infinite values
                are an error).
            grad: `n_samples x n_features` observed partial derivatives ``df/dX[:, a]`` in the
                units of ``X`` (`n_samples` is accepted for one feature); NaN = not observed.
                None fits a value-only GP, which still predicts gradients.

        Returns:
            ``self``, fitted.

        Raises:
            ValueError: for NaN or infinite ``X``, infinite ``y`` or ``grad``, inconsistent
                shapes, nothing observed (all of ``y`` NaN and no gradient), or invalid
                parameters.
        """
        X, y = validate_data(
            self,
            X,
            y,
            validate_separately=(
                {"dtype": np.float64},
                {"dtype": np.float64, "ensure_2d": False, "ensure_all_finite": "allow-nan"},
            ),
        )
        y = column_or_1d(y, warn=True)
        check_consistent_length(X, y)
        n, d = X.shape
        if grad is not None:
            grad = check_array(
                grad, dtype=np.float64, ensure_2d=False, ensure_all_finite="allow-nan", input_name="grad"
            )
            if grad.ndim == 1 and d == 1:
                grad = grad.reshape(-1, 1)
            if grad.shape != (n, d):
                raise ValueError(f"grad: expected shape ({n}, {d}) to match X, got {grad.shape}")
            pipeline, level = _calling_pipeline(self)
            if pipeline is not None:
                check_pipeline(pipeline, stacklevel=2 + level)  # check_pipeline <- fit <- ...
        seed = None
        if self.restarts:
            seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        model = DerivativeGP(
            _to_tensor(X),
            _to_tensor(y),
            None if grad is None else _to_tensor(grad),
            kernel=_make_kernel(self.kernel, d),
            noise=self.noise,
            grad_noise=self.grad_noise,
            noise_lower_bound=self.noise_lower_bound,
            noise_prior=self.noise_prior,
            hyperparameter_uncertainty=self.hyperparameter_uncertainty,
            inference=self.inference,
            inference_options=self.inference_options,
        )
        model.fit(
            optimizer=self.optimizer,
            maxiter=self.maxiter,
            time_budget=self.time_budget,
            restarts=self.restarts,
            seed=seed,
            progress=self.progress,
        )
        self.model_ = model
        self.log_marginal_likelihood_value_ = float(model.mll)
        return self

    def predict(
        self, X: Any, return_std: bool = False, return_grad: bool = False, return_cov: bool = False
    ) -> np.ndarray | tuple[np.ndarray, ...]:
        """Posterior mean of f at ``X``, optionally with standard deviations or covariance, and gradients.

        The standard deviations and covariances are those of the latent function (observation
        noise excluded), as in scikit-learn's ``GaussianProcessRegressor``.

        Args:
            X: `n_samples x n_features` finite inputs.
            return_std: also return the posterior standard deviation of f (and, with
                ``return_grad``, of the gradient).
            return_grad: also return the posterior mean of the gradient ``df/dX``.
            return_cov: also return the joint `n_samples x n_samples` posterior covariance of f
                (instead of ``return_std``: at most one of them).

        Returns:
            ``mean`` (`n_samples`), then ``std`` (`n_samples`) if ``return_std`` or ``cov``
            (`n_samples x n_samples`) if ``return_cov``, then ``grad`` (`n_samples x n_features`)
            if ``return_grad``, then ``grad_std`` (`n_samples x n_features`) if ``return_std``
            and ``return_grad``: a bare array when no flag is set, a tuple otherwise.

        Raises:
            sklearn.exceptions.NotFittedError: before :meth:`fit`.
            ValueError: for NaN or infinite ``X``, a number of features other than in fit, or
                both ``return_std`` and ``return_cov``.
        """
        if return_std and return_cov:
            raise ValueError("return_std, return_cov: expected at most one of them, got both True")
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        pred = self.model_.predict(_to_tensor(X), full_cov=bool(return_cov))
        out = [_to_numpy(pred.mean)]
        if return_std:
            out.append(_to_numpy(pred.std))
        if return_cov:
            m = X.shape[0]
            out.append(_to_numpy(pred.covariance[:m, :m]))  # block layout: the values come first
        if return_grad:
            out.append(_to_numpy(pred.grad_mean))
        if return_std and return_grad:
            out.append(_to_numpy(pred.grad_std))
        return out[0] if len(out) == 1 else tuple(out)

    def sample_y(self, X: Any, n_samples: int = 1, random_state: Any = 0) -> np.ndarray:
        """Draws of the latent f at ``X`` from the joint posterior (scikit-learn's ``sample_y``).

        Args:
            X: `n_samples_X x n_features` finite inputs.
            n_samples: number of draws.
            random_state: seed: None, an int or a ``numpy.random.RandomState`` (the default 0
                gives the same draws on every call, as in scikit-learn).

        Returns:
            `n_samples_X x n_samples` array: column ``j`` is one draw of f at every row of ``X``.

        Raises:
            sklearn.exceptions.NotFittedError: before :meth:`fit`.
            ValueError: for a bad ``X`` or ``n_samples``.
        """
        if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
            raise ValueError(f"n_samples: expected a positive integer, got {n_samples!r}")
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        m = X.shape[0]
        pred = self.model_.predict(_to_tensor(X), full_cov=True)
        seed = int(check_random_state(random_state).randint(np.iinfo(np.int32).max))
        base = torch.randn(int(n_samples), m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        # GPyTorch draws through a root of the (often near-singular) covariance, with jitter.
        posterior = MultivariateNormal(pred.mean, DenseLinearOperator(pred.covariance[:m, :m]))
        return _to_numpy(posterior.rsample(base_samples=base).T)

    def log_marginal_likelihood(self) -> float:
        """Exact log marginal likelihood of the training data at the fitted hyperparameters.

        Returns:
            The same number as :attr:`log_marginal_likelihood_value_`, recomputed from the
            fitted model.

        Raises:
            sklearn.exceptions.NotFittedError: before :meth:`fit`.
        """
        check_is_fitted(self)
        return self.model_.log_marginal_likelihood()
