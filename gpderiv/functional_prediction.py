r"""Posteriors of derivative functionals at test points: Hessians, directional derivatives, Laplacians.

A linear functional :math:`L f = \sum_k c_k \partial^{\alpha_k} f(x_*)` of the GP has the posterior

.. math:: \mathbb E[L f] = \mu_L + k_{L X} \alpha, \qquad
          \operatorname{var}[L f] = k_{LL} - k_{L X} A^{-1} k_{X L},

with the covariances of :class:`~gpderiv.observed_rows.ObservedRows` and the engine's factor
(:meth:`~gpderiv.inference.Factor.posterior`), so every engine gives them. The mean's prior part is
zero: the constant prior mean has no derivatives.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gpderiv._validation import as_chunk_size, as_float_tensor, check_finite
from gpderiv.inference.threads import threads_for
from gpderiv.observations import Functionals
from gpderiv.observed_rows import ObservedRows

__all__ = ["FunctionalPredictions"]


class FunctionalPredictions:
    """Predictions of derivative functionals for :class:`~gpderiv.DerivativeGP` (a mixin of its public methods).

    Uses the model's ``factor()``, ``scaling``, ``_test_inputs``, ``num_observations``,
    ``_hyperparameters`` (the hyperparameters' share of the variances, as in ``predict``), ``d`` and
    ``train_X``.
    """

    def _functional_posterior(self, Xs: Any, F: Functionals, chunk_size: int | None) -> tuple[Tensor, Tensor]:
        """Mean and variance (user units) of derivative functionals at test points.

        Args:
            Xs: `m x d` test inputs.
            F: `m r` functionals with user-unit coefficients, `r` per test point, point-major.
            chunk_size: test points per chunk.

        Returns:
            ``(mean, variance)``, each `m x r`.
        """
        track = torch.is_grad_enabled() and isinstance(Xs, Tensor) and Xs.requires_grad
        chunk_size = as_chunk_size(chunk_size)
        # Small problems single-threaded, as in predict (gpderiv.inference.threads).
        with torch.set_grad_enabled(track), threads_for(self.num_observations, self.train_X.device):
            xs = self._test_inputs(Xs)
            m = xs.shape[0]
            per_point = len(F) // m if m else 1
            F, row_factor = self.scaling.functionals_to_internal(F)
            factor = self.factor()
            chunk = chunk_size or max(1, factor.chunk_points(per_point) // 4)
            spread = self._hyperparameters.applies(self)
            means, variances = [], []
            for i in range(0, m, chunk):
                rows = slice(i * per_point, (i + chunk) * per_point)
                part = Functionals(F.point[rows] - i, F.idx[rows], F.coef[rows])
                test = ObservedRows.functionals(xs[i : i + chunk], part)
                mean, var = factor.posterior(test, "var")
                if spread:  # derivatives of f have no constant: no value rows
                    var = var + self._hyperparameters.spread(self, test, mean, 0).square().sum(0)
                means.append(mean * row_factor[rows])
                variances.append(var * row_factor[rows].square())
            if not means:
                return xs.new_zeros(0, per_point), xs.new_zeros(0, per_point)
            return torch.cat(means).view(m, per_point), torch.cat(variances).view(m, per_point)

    def predict_hessian(self, Xs: Any, *, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
        """Posterior mean and variance of every second derivative ``d2f / dx_a dx_b`` at test points.

        Args:
            Xs: `m x d` test inputs.
            chunk_size: test points per chunk.

        Returns:
            ``(mean, variance)``, each `m x d x d` and symmetric, in the user's units.
        """
        d = self.d
        a, b = torch.triu_indices(d, d)
        F = Functionals.hessian_entries(len(Xs), d, self.train_X.device, self.train_X.dtype)
        mean, var = self._functional_posterior(Xs, F, chunk_size)
        return _symmetric(mean, a, b, d), _symmetric(var, a, b, d)

    def predict_directional(self, Xs: Any, V: Any, *, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
        """Posterior mean and variance of the directional derivative ``v_i . grad f(x_i)``.

        Args:
            Xs: `m x d` test inputs.
            V: `m x d` directions (user units), or one `d` direction for every point.
            chunk_size: test points per chunk.

        Returns:
            ``(mean, variance)``, each `m`.
        """
        m = len(Xs)
        V = as_float_tensor("V", V, like=self.train_X, shape_hint=f"({m}, {self.d})")
        V = V.expand(m, self.d) if V.shape == (self.d,) else V
        if tuple(V.shape) != (m, self.d):
            raise ValueError(f"V: expected shape ({m}, {self.d}) or ({self.d},), got {tuple(V.shape)}")
        check_finite("V", V)
        if (V.norm(dim=-1) == 0).any():
            raise ValueError("V: expected non-zero direction vectors, got a zero row")
        d, device = self.d, self.train_X.device
        idx = torch.stack([torch.arange(d, device=device), torch.full((d,), -1, device=device)], -1)

        F = Functionals(torch.arange(m, device=device), idx.expand(m, d, 2), V)
        mean, var = self._functional_posterior(Xs, F, chunk_size)
        return mean[:, 0], var[:, 0]

    def laplacian(self, Xs: Any, *, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
        """Posterior mean and variance of the Laplacian ``sum_a d2f / dx_a^2`` at test points.

        The variance includes the covariances between the diagonal Hessian entries.

        Args:
            Xs: `m x d` test inputs.
            chunk_size: test points per chunk.

        Returns:
            ``(mean, variance)``, each `m`.
        """
        d, device, dtype = self.d, self.train_X.device, self.train_X.dtype
        idx = torch.arange(d, device=device).unsqueeze(-1).expand(d, 2)

        m = len(Xs)
        ones = torch.ones(m, d, dtype=dtype, device=device)
        F = Functionals(torch.arange(m, device=device), idx.expand(m, d, 2), ones)
        mean, var = self._functional_posterior(Xs, F, chunk_size)
        return mean[:, 0], var[:, 0]


def _symmetric(entries: Tensor, a: Tensor, b: Tensor, d: int) -> Tensor:
    """`m x d x d` symmetric matrices from their `m x d (d + 1) / 2` upper-triangular entries."""
    out = entries.new_zeros(entries.shape[0], d, d)
    out[:, a, b] = entries
    out[:, b, a] = entries
    return out
