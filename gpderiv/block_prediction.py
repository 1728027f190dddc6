"""Posterior of f and grad f at test points for :class:`~gpderiv.DerivativeGP`: ``predict`` and ``posterior``.

Means and variances (or the joint covariance) of ``[f, grad f]`` come from the engine's factor
(:meth:`~gpderiv.inference.Factor.posterior`) in internal units, plus the hyperparameters' share of
the variances where it applies (:mod:`gpderiv.hyperparameter_uncertainty`) or local variances
(:mod:`gpderiv.local_variance`), and are mapped to the user's units here, in one place.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np
import torch
from gpytorch.distributions import MultitaskMultivariateNormal
from linear_operator.operators import DenseLinearOperator
from torch import Tensor

from gpderiv._validation import as_chunk_size, as_flag, as_float_tensor, check_finite
from gpderiv.blocks import interleave_index
from gpderiv.exceptions import NotFittedWarning
from gpderiv.inference.threads import threads_for
from gpderiv.local_variance import local_variance
from gpderiv.observed_rows import ObservedRows
from gpderiv.prediction import Prediction, join_blocks
from gpderiv.scaling import Scaling, scale_limits

__all__ = ["LOCAL_NEIGHBOURS", "BlockPredictions"]

#: predict(variance="local") conditions each test point on the observations at this many nearest
#: training points. At d = 10, lengthscale 0.3 the standard deviations were at most 1.4 % (n = 1000)
#: and 4.5 % (n = 2000) above the exact ones, at 0.08-0.14 s per test point (docs/benchmarks.md).
LOCAL_NEIGHBOURS = 200


class BlockPredictions:
    """Predictions of ``[f, grad f]`` for :class:`~gpderiv.DerivativeGP` (a mixin of its public methods).

    Uses the model's ``factor()``, ``scaling``, ``likelihood``, ``mean_module``, ``covar_module``,
    ``data``, ``_hyperparameters``, ``fitted``, ``d`` and ``train_X``.
    """

    def predict(
        self,
        Xs: Any,
        *,
        full_cov: bool = False,
        observation_noise: bool = False,
        chunk_size: int | None = None,
        hessian: bool = False,
        variance: bool | str = True,
        neighbours: int = LOCAL_NEIGHBOURS,
    ) -> Prediction:
        """Posterior of f and grad f (and optionally the Hessian) at test points, in the user's units.

        Uses the factorisation cached by :meth:`fit` (nothing is refactorised). The outputs are
        differentiable with respect to ``Xs`` when it requires grad, and detached otherwise.

        Args:
            Xs: `m x d` test inputs.
            full_cov: also return the joint `m (1 + d)` square covariance of ``[f, grad f]``, in block
                layout (:ref:`layouts`).
            observation_noise: add the observation noise to the variances (predictive
                distribution of new measurements instead of the latent f).
            chunk_size: test points per chunk (default: cross-covariance chunks of 64 MiB);
                ignored with ``full_cov``.
            hessian: also return the posterior mean and variance of every second derivative
                (``hessian_mean``, ``hessian_variance``; see :meth:`predict_hessian`).
            variance: ``True``: the exact variances; ``False``: none (``variance`` and
                ``grad_variance`` are None, which skips the `O(N^2)`-per-point triangular solves:
                means of large data sets); ``"local"``: at each test point, the variances given
                only the observations at its ``neighbours`` nearest training points (distances
                in lengthscales). Conditioning on fewer data never lowers a variance, so these
                are upper bounds on the exact ones, equal to them when ``neighbours >= n``, at a
                cost per test point independent of n: the variances of large data sets with
                ``inference="iterative"``, whose exact variances need a CG solve with ``1 + d``
                right-hand sides per test point. Needs at least one training point.
            neighbours: training points per test point for ``variance="local"``.

        Returns:
            A :class:`~gpderiv.prediction.Prediction`.
        """
        # Outputs carry an autograd graph only when the caller asks for gradients in Xs.
        track = torch.is_grad_enabled() and isinstance(Xs, Tensor) and Xs.requires_grad
        full_cov, hessian = as_flag("full_cov", full_cov), as_flag("hessian", hessian)
        observation_noise = as_flag("observation_noise", observation_noise)
        chunk_size = as_chunk_size(chunk_size)
        if isinstance(variance, str) and variance != "local":
            raise ValueError(f"variance: expected True, False or 'local', got {variance!r}")
        if not isinstance(variance, str) and not isinstance(variance, (bool, np.bool_)):
            raise TypeError(f"variance: expected True, False or 'local', got {type(variance).__name__} {variance!r}")
        variance = variance if isinstance(variance, str) else bool(variance)
        if full_cov and variance is not True:
            raise ValueError(f"variance: full_cov=True needs variance=True, got {variance!r}")
        with torch.set_grad_enabled(track), threads_for(self.num_observations, self.train_X.device):
            pred = self._predict(self._test_inputs(Xs), full_cov, observation_noise, chunk_size, variance, neighbours)
        if not hessian:
            return pred
        hessian_mean, hessian_variance = self.predict_hessian(Xs, chunk_size=chunk_size)
        return dataclasses.replace(pred, hessian_mean=hessian_mean, hessian_variance=hessian_variance)

    def _predict(
        self,
        xs: Tensor,
        full_cov: bool,
        observation_noise: bool,
        chunk_size: int | None,
        variance: bool | str,
        neighbours: int,
    ) -> Prediction:
        m, d = xs.shape
        factor = self.factor()
        # The hyperparameters' share of the variances (module gpderiv.hyperparameter_uncertainty); it is
        # added to local variances too, so that those stay upper bounds of the exact ones.
        spread = self._hyperparameters.applies(self) and variance is not False
        if full_cov or m == 0:
            test = ObservedRows.block(xs)
            mean, cov = factor.posterior(test, "cov")
            if spread:
                deltas = self._hyperparameters.spread(self, test, mean, m)
                cov = cov + deltas.mT @ deltas
            var, cov = cov.diagonal().clamp_min(0.0), cov if full_cov else None
        else:
            chunk = chunk_size or factor.chunk_points(1 + d)
            mode = "var" if variance is True else "mean"
            means, variances, spreads = [], [], []
            for i in range(0, m, chunk):
                test = ObservedRows.block(xs[i : i + chunk])
                part_mean, part_var = factor.posterior(test, mode)
                means.append(part_mean)
                variances.append(part_var)
                if spread:
                    spreads.append(self._hyperparameters.spread(self, test, part_mean, test.n).square().sum(0))
            mean, cov = join_blocks(tuple(means), d), None
            var = join_blocks(tuple(variances), d) if variance is True else None
            if variance == "local":
                noise, resid = self.row_noise(), self.residual()
                var = local_variance(self.covar_module, self.data, noise, resid, xs, neighbours)
            if spread:
                var = var + join_blocks(tuple(spreads), d)
        kinds = Scaling.block_kinds(m, d, xs.device)
        factor_u = self.scaling.factor(kinds)
        mean = torch.cat([mean[:m] + self.mean_module.constant, mean[m:]]) * factor_u + self.scaling.offset(kinds)
        if var is not None:
            if observation_noise:
                var = var + self.likelihood.row_noise(kinds)
            var = var * factor_u.square()
        if cov is not None:
            if observation_noise:
                cov = cov + torch.diag_embed(self.likelihood.row_noise(kinds))
            cov = cov * factor_u.unsqueeze(-1) * factor_u
        return Prediction(
            mean=mean[:m],
            variance=None if var is None else var[:m],
            grad_mean=mean[m:].view(m, d),
            grad_variance=None if var is None else var[m:].view(m, d),
            covariance=cov,
        )

    def posterior(self, Xs: Any, *, observation_noise: bool = False) -> MultitaskMultivariateNormal:
        r"""Joint Gaussian posterior of ``f`` and ``grad f`` at ``Xs`` (user units), as GPyTorch's derivative models.

        The mean is `m x (1 + d)`: column 0 the value, column ``1 + a`` the derivative
        :math:`\partial f / \partial x_a`. The covariance is in GPyTorch's interleaved layout (the
        task index runs fastest: ``[f(x_1), d_1 f(x_1), ..., d_d f(x_1), f(x_2), ...]``; see
        :ref:`layouts`). It is a lazy operator, factorised (with jitter) only when sampling.

        Args:
            Xs: `m x d` test inputs.
            observation_noise: include the observation noise (the predictive distribution of new
                measurements of ``[f, grad f]``).

        Returns:
            A GPyTorch ``MultitaskMultivariateNormal`` with an `m x (1 + d)` mean and an interleaved
            `m (1 + d) x m (1 + d)` covariance.
        """
        pred = self.predict(Xs, full_cov=True, observation_noise=observation_noise)
        m = pred.mean.shape[0]
        mean = torch.cat([pred.mean.unsqueeze(-1), pred.grad_mean], -1)
        order = interleave_index(m, self.d, pred.mean.device)  # block layout -> interleaved, the one conversion
        cov = pred.covariance[order][:, order]
        # A lazy operator: torch's distribution would factorise the (often near-singular) joint
        # covariance at construction; GPyTorch factorises it only for sampling, with jitter.
        return MultitaskMultivariateNormal(mean, DenseLinearOperator(cov), interleaved=True)

    def _warn_if_not_fitted(self) -> None:
        """Warn (once per model) that a prediction uses hyperparameters that were never fitted."""
        if self.fitted or self._warned_not_fitted:
            return
        self._warned_not_fitted = True
        warnings.warn(
            "predicting with the initial hyperparameters: this model was never fitted. Call model.fit() "
            "first, or, if you set the hyperparameters yourself, set model.fitted = True to silence this warning.",
            NotFittedWarning,
            stacklevel=4,
        )

    def _test_inputs(self, Xs: Any) -> Tensor:
        """Check and scale test points; every prediction method passes through here (and warns if not fitted)."""
        Xs = as_float_tensor("Xs", Xs, like=self.train_X, shape_hint=f"(m, {self.d})")
        if Xs.ndim == 1 and self.d == 1:
            Xs = Xs.unsqueeze(-1)
        if Xs.ndim != 2 or Xs.shape[-1] != self.d:
            raise ValueError(f"Xs: expected shape (m, {self.d}) like the training X, got {tuple(Xs.shape)}")
        check_finite("Xs", Xs)
        self._warn_if_not_fitted()
        xs = self.scaling.x(Xs)
        # Squared distances in internal units must be representable (the kernels square them).
        limit = scale_limits(xs.dtype)[1]
        if not bool((xs.abs() <= limit).all()):
            raise ValueError(
                f"Xs: expected test points within {limit:.2g} input ranges of the training inputs (beyond, squared "
                f"distances overflow {Xs.dtype}), got values up to {Xs.abs().max().item():.3g} with training inputs "
                f"from {self.scaling.x_offset.min().item():.3g} and ranges from {self.scaling.x_scale.min().item():.3g}"
            )
        return xs
