"""Derivative kernels of stationary families given by a radial profile."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from gpderiv.blocks import functional_covariance, stationary_derivative_blocks, stationary_derivative_diag
from gpderiv.kernels.base_derivative_kernel import BaseDerivativeKernel

__all__ = ["StationaryDerivativeKernel"]


class StationaryDerivativeKernel(BaseDerivativeKernel):
    """A stationary kernel ``k = phi(u)``, ``u = sum_a (x1_a - x2_a)^2 / l_a^2``, with its derivatives.

    Subclasses supply only :meth:`profile`, the radial profile of the family as a function of
    the squared scaled distance ``u`` (see :mod:`gpderiv.blocks`); block assembly, closed-form
    lengthscale gradients and second-derivative covariances come from :mod:`gpderiv.blocks`.

    Args:
        layout: ``"block"`` (default) orders the rows ``[f(x_1..x_n), grad f(x_1), ...,
            grad f(x_n)]``; ``"interleaved"`` orders them ``[f, d_1 f, ..., d_d f]`` per point,
            exactly like GPyTorch's ``RBFKernelGrad``.
        **kwargs: passed to :class:`gpytorch.kernels.Kernel` (``ard_num_dims``, ``batch_shape``,
            ``active_dims``, ``lengthscale_prior``, ``lengthscale_constraint``, ``eps``).
    """

    has_lengthscale = True

    def __init__(self, layout: str = "block", **kwargs: Any) -> None:
        super().__init__(layout=layout, **kwargs)

    @staticmethod
    def profile(u: Tensor, order: int = 2) -> tuple[Tensor, ...]:
        """Radial profile ``(phi, phi', ..., phi^(order))`` at squared scaled distances ``u``."""
        raise NotImplementedError

    def _blocks(self, x1: Tensor, x2: Tensor, grad1: bool, grad2: bool) -> Tensor:
        return stationary_derivative_blocks(x1, x2, self.lengthscale, self.profile, grad1=grad1, grad2=grad2)

    def _diag(self, x1: Tensor, x2: Tensor) -> Tensor:
        return stationary_derivative_diag(x1, x2, self.lengthscale, self.profile)

    def _functional_covariance(self, x1: Tensor, x2: Tensor, idx1: Tensor, idx2: Tensor, pairwise: bool) -> Tensor:
        return functional_covariance(x1, x2, idx1, idx2, self.lengthscale, self.profile, pairwise=pairwise)
