"""Derivative kernel of any supported stationary GPyTorch kernel, by automatic differentiation."""

from __future__ import annotations

import math

import torch
from gpytorch.kernels import (
    AdditiveKernel,
    Kernel,
    MaternKernel,
    PeriodicKernel,
    ProductKernel,
    RBFKernel,
    RQKernel,
    ScaleKernel,
)
from torch import Tensor

from gpderiv.blocks import matern32_profile, matern52_profile, rbf_profile
from gpderiv.blocks.autodiff import (
    ProfileValue,
    StationaryFunction,
    autodiff_derivative_blocks,
    autodiff_derivative_diag,
    autodiff_functional_covariance,
)
from gpderiv.kernels.base_derivative_kernel import BaseDerivativeKernel

__all__ = ["DerivativeKernel"]

_SUPPORTED = (
    "RBFKernel, MaternKernel (nu = 1.5, 2.5), RQKernel, PeriodicKernel, and sums, products, ScaleKernels of them"
)


class DerivativeKernel(BaseDerivativeKernel):
    r"""Joint covariance of values and derivatives for a stationary GPyTorch kernel, by torch.func.

    Wraps ``base_kernel`` (an ``RBFKernel``, ``MaternKernel`` with :math:`\nu \in \{3/2, 5/2\}`,
    ``RQKernel``, ``PeriodicKernel``, or sums, products and ``ScaleKernel``\ s of them) and
    derives every block from :math:`\kappa(\tau) = k(x_1, x_2)`, :math:`\tau = x_1 - x_2`:

    .. math::

        K_{fg} = -\nabla\kappa, \qquad K_{gf} = \nabla\kappa, \qquad K_{gg} = -\nabla^2\kappa,
        \qquad \operatorname{cov}(\partial^\alpha f, \partial^\beta f) = (-1)^{|\beta|}\partial^{\alpha+\beta}\kappa.

    Each supported kernel is re-expressed in terms of :math:`\tau` without a square root of the
    distance (Matern through its radial profile with closed-form derivatives), so the blocks are
    exact and finite at coincident points, where autodiff of GPyTorch's own distance-based
    forward gives NaN. Products are well defined here because the product is formed *before*
    differentiation. The hyperparameters are the base kernel's own (priors and constraints
    included). This is slower than the closed-form kernels (``DerivativeRBFKernel``, ...),
    which it matches to rounding error.

    Args:
        base_kernel: the stationary GPyTorch kernel to differentiate (unbatched).
        layout: ``"block"`` (default) or ``"interleaved"`` (GPyTorch's ordering).

    Raises:
        TypeError: for a kernel that is not supported (the message lists the supported ones).
        ValueError: for a batched kernel or a Matern smoothness that is not differentiable.

    Example:
        >>> from gpytorch.kernels import PeriodicKernel, RBFKernel
        >>> kernel = DerivativeKernel(RBFKernel() * PeriodicKernel())
        >>> kernel(torch.rand(5, 2)).to_dense().shape
        torch.Size([15, 15])
    """

    def __init__(self, base_kernel: Kernel, layout: str = "block") -> None:
        super().__init__(layout=layout)
        self.base_kernel = base_kernel
        self.max_derivative_order = _lower(base_kernel)[1]

    def _kappa(self) -> StationaryFunction:
        return _lower(self.base_kernel)[0]

    def _blocks(self, x1: Tensor, x2: Tensor, grad1: bool, grad2: bool) -> Tensor:
        return autodiff_derivative_blocks(self._kappa(), x1, x2, grad1=grad1, grad2=grad2)

    def _diag(self, x1: Tensor, x2: Tensor) -> Tensor:
        return autodiff_derivative_diag(self._kappa(), x1, x2)

    def _functional_covariance(self, x1: Tensor, x2: Tensor, idx1: Tensor, idx2: Tensor, pairwise: bool) -> Tensor:
        return autodiff_functional_covariance(self._kappa(), x1, x2, idx1, idx2, pairwise=pairwise)


def _lower(kernel: Kernel) -> tuple[StationaryFunction, int]:
    """``(kappa, order)``: the kernel as a function of one difference vector, and its order.

    The order is how many derivatives per side the kernel supports (its mean-square
    differentiability, at most 2).
    """
    if kernel.batch_shape != torch.Size([]):
        raise ValueError(f"base_kernel: expected an unbatched kernel, got batch_shape {tuple(kernel.batch_shape)}")
    if isinstance(kernel, ScaleKernel):
        inner, order = _lower(kernel.base_kernel)
        return (lambda tau: kernel.outputscale * inner(tau)), order
    if isinstance(kernel, (AdditiveKernel, ProductKernel)):
        parts = [_lower(k) for k in kernel.kernels]
        order = min(p[1] for p in parts)
        if isinstance(kernel, AdditiveKernel):
            return (lambda tau: sum(p[0](tau) for p in parts)), order

        def product(tau: Tensor) -> Tensor:
            out = parts[0][0](tau)
            for p in parts[1:]:
                out = out * p[0](tau)
            return out

        return product, order
    kappa, order = _leaf(kernel)
    if kernel.active_dims is None:
        return kappa, order
    return (lambda tau: kappa(tau[kernel.active_dims])), order


def _leaf(kernel: Kernel) -> tuple[StationaryFunction, int]:
    """Sqrt-free expressions of the supported stationary kernels, reading current parameters."""

    def u(tau: Tensor) -> Tensor:  # squared scaled distance
        return (tau / kernel.lengthscale.reshape(-1)).square().sum()

    if isinstance(kernel, RBFKernel):
        return (lambda tau: ProfileValue.apply(u(tau), rbf_profile, 0)), 2
    if isinstance(kernel, MaternKernel):
        profiles = {1.5: (matern32_profile, 1), 2.5: (matern52_profile, 2)}
        if kernel.nu not in profiles:
            raise ValueError(
                f"base_kernel: MaternKernel with nu = {kernel.nu} is not differentiable; use nu = 1.5 or 2.5"
            )
        profile, order = profiles[kernel.nu]
        return (lambda tau: ProfileValue.apply(u(tau), profile, 0)), order
    if isinstance(kernel, RQKernel):
        return (lambda tau: (1 + u(tau) / (2 * kernel.alpha.reshape(()))).pow(-kernel.alpha.reshape(()))), 2
    if isinstance(kernel, PeriodicKernel):
        # GPyTorch: exp(-2 sum_a sin^2(pi tau_a / p_a) / l_a); smooth in tau, no distance needed.
        def periodic(tau: Tensor) -> Tensor:
            phase = math.pi * tau / kernel.period_length.reshape(-1)
            return torch.exp(-2.0 * (phase.sin().square() / kernel.lengthscale.reshape(-1)).sum())

        return periodic, 2
    raise TypeError(f"base_kernel: expected a stationary kernel among {_SUPPORTED}, got {type(kernel).__name__}")
