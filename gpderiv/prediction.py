"""Posterior predictions of f and grad f."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Prediction", "join_blocks"]


@dataclass(frozen=True)
class Prediction:
    """Posterior of the function and its gradient at `m` test points, in the user's units.

    Attributes:
        mean: `m` posterior mean of f.
        variance: `m` posterior variance of f (None with ``variance=False``).
        grad_mean: `m x d` posterior mean of grad f.
        grad_variance: `m x d` posterior variance of each partial derivative (None with
            ``variance=False``).
        covariance: `m (1 + d) x m (1 + d)` joint covariance of ``[f, grad f]`` in block layout
            (values first, then gradients point-major; :ref:`layouts`), only with ``full_cov=True``.
        hessian_mean: `m x d x d` posterior mean of the second derivatives, only with ``hessian=True``.
        hessian_variance: `m x d x d` posterior variance of each second derivative, only with
            ``hessian=True``.
    """

    mean: Tensor
    variance: Tensor | None
    grad_mean: Tensor
    grad_variance: Tensor | None
    covariance: Tensor | None = None
    hessian_mean: Tensor | None = None
    hessian_variance: Tensor | None = None

    @property
    def std(self) -> Tensor | None:
        """`m` posterior standard deviation of f."""
        return None if self.variance is None else self.variance.sqrt()

    @property
    def grad_std(self) -> Tensor | None:
        """`m x d` posterior standard deviation of each partial derivative."""
        return None if self.grad_variance is None else self.grad_variance.sqrt()


def join_blocks(parts: tuple[Tensor, ...], d: int) -> Tensor:
    """Join block-layout vectors of consecutive chunks of points into one block-layout vector.

    Each part is ``[f(chunk), grad f(chunk)]`` (`c (1 + d)`); the result is ``[f(all), grad f(all)]``.
    """
    sizes = [p.numel() // (1 + d) for p in parts]
    pairs = list(zip(parts, sizes, strict=True))
    return torch.cat([p[:s] for p, s in pairs] + [p[s:] for p, s in pairs])
