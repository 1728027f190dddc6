"""Outcome transforms that respect the chain rule, and posteriors in the original units."""

from __future__ import annotations

import torch
from botorch.models.transforms.outcome import OutcomeTransform
from botorch.posteriors.gpytorch import GPyTorchPosterior
from gpytorch.distributions import MultitaskMultivariateNormal, MultivariateNormal
from linear_operator.operators import DenseLinearOperator
from torch import Tensor

from gpderiv.scaling import scale_limits

__all__ = ["DerivativeStandardize", "affine_posterior"]


class DerivativeStandardize(OutcomeTransform):
    r"""Standardise the objective and scale its gradients by the same :math:`\sigma` (never centre them).

    .. math:: \tilde y = (y - \mu) / \sigma, \qquad \partial_a \tilde y = \partial_a y / \sigma,
       \qquad \widetilde{\mathrm{Var}} = \mathrm{Var} / \sigma^2

    :math:`\mu, \sigma` are the mean and standard deviation of the observed (non-NaN) values,
    learned on the first call in training mode, per batch member. Outputs are columns
    ``[f, df/dx_1, ..., df/dx_d]``.

    Args:
        d: input dimension (the transform handles ``1 + d`` columns).
        min_stdv: a standard deviation below this is replaced by 1 (constant values).
    """

    _is_linear = True

    def __init__(self, d: int, min_stdv: float = 1e-8) -> None:
        super().__init__()
        self.d = d
        self.min_stdv = min_stdv
        self.register_buffer("means", torch.zeros(1, 1))
        self.register_buffer("stdvs", torch.ones(1, 1))
        self._is_trained = False

    def affine(self) -> tuple[Tensor, Tensor]:
        """`batch x 1 x (1 + d)` offsets and scales with ``y = offset + scale * y_transformed``."""
        loc = torch.cat([self.means, torch.zeros_like(self.means).expand(*self.means.shape[:-1], self.d)], -1)
        return loc, self.stdvs.expand(*self.stdvs.shape[:-1], 1 + self.d)

    def _learn(self, Y: Tensor) -> None:
        values = Y[..., 0]
        seen = torch.isfinite(values)
        count = seen.sum(-1, keepdim=True)
        zero = torch.zeros_like(values)
        # Moments of the values divided by their largest magnitude: near the dtype's maximum the
        # plain sums and squares overflow although the mean and std are representable.
        top = torch.where(seen, values.abs(), zero).amax(-1, keepdim=True)
        top = torch.where(top > 0, top, torch.ones_like(top))
        unit = torch.where(seen, values / top, zero)
        mean = unit.sum(-1, keepdim=True) / count.clamp_min(1)
        sq = torch.where(seen, (unit - mean) ** 2, zero).sum(-1, keepdim=True)
        mean, std = mean * top, (sq / (count - 1).clamp_min(1)).sqrt() * top
        lo, hi = scale_limits(values.dtype)
        if bool((std > hi).any()):
            raise ValueError(
                f"train_Y: expected observed values whose standard deviation is at most {hi:.1e} (the "
                f"posterior variances scale with its square, which {values.dtype} cannot hold above that), got "
                f"{std.max().item():.3g}; rescale the objective"
            )
        std = torch.where((count > 1) & (std >= self.min_stdv), std, torch.ones_like(std))
        self.means = mean.unsqueeze(-1)
        self.stdvs = std.unsqueeze(-1)
        self._is_trained = True

    def forward(self, Y: Tensor, Yvar: Tensor | None = None, X: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Transform `batch x n x (1 + d)` outcomes (and their variances); learns in training mode."""
        if Y.shape[-1] != 1 + self.d:
            raise ValueError(f"Y: expected {1 + self.d} columns [f, grad f], got shape {tuple(Y.shape)}")
        if self.training:
            self._learn(Y)
        loc, scale = self.affine()
        return (Y - loc) / scale, None if Yvar is None else Yvar / scale**2

    def untransform(
        self, Y: Tensor, Yvar: Tensor | None = None, X: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Inverse of :meth:`forward` (never updates the statistics)."""
        loc, scale = self.affine()
        return loc + scale * Y, None if Yvar is None else Yvar * scale**2

    def untransform_posterior(self, posterior: GPyTorchPosterior, X: Tensor | None = None) -> GPyTorchPosterior:
        """Untransform a posterior over all ``1 + d`` outputs (what :class:`DerivativeGPModel` does itself)."""
        m = posterior.mean.shape[-1]
        if m != 1 + self.d:
            raise ValueError(f"posterior: expected {1 + self.d} outputs, got {m}")
        loc, scale = self.affine()
        return affine_posterior(posterior.mean, posterior.distribution.covariance_matrix, loc, scale)


def affine_posterior(mean: Tensor, cov: Tensor, loc: Tensor, scale: Tensor) -> GPyTorchPosterior:
    """The posterior of ``loc + scale * Z`` for `Z` with a `batch x q x m` mean and interleaved `qm x qm` covariance.

    One output gives a ``MultivariateNormal``, several an interleaved ``MultitaskMultivariateNormal``;
    ``loc`` and ``scale`` are `... x 1 x m`.
    """
    s = scale.expand(*scale.shape[:-2], mean.shape[-2], scale.shape[-1]).flatten(-2)
    mean, cov = loc + scale * mean, DenseLinearOperator(cov * s.unsqueeze(-1) * s.unsqueeze(-2))
    if mean.shape[-1] == 1:
        return GPyTorchPosterior(MultivariateNormal(mean.squeeze(-1), cov))
    return GPyTorchPosterior(MultitaskMultivariateNormal(mean, cov, interleaved=True))
