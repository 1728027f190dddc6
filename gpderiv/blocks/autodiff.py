r"""Derivative blocks of any stationary kernel :math:`k(x_1, x_2) = \kappa(x_1 - x_2)` by torch.func.

With :math:`\tau = x_1 - x_2`: :math:`\partial k / \partial x_{2b} = -\partial_b \kappa`,
:math:`\partial k / \partial x_{1a} = \partial_a \kappa`,
:math:`\partial^2 k / \partial x_{1a} \partial x_{2b} = -\partial_{ab} \kappa`, and in general
:math:`\operatorname{cov}(\partial^\alpha f(x_1), \partial^\beta f(x_2)) = (-1)^{|\beta|}
\partial^{\alpha+\beta}\kappa(\tau)`. The derivatives of :math:`\kappa` come from nested
``torch.func.jacrev`` inside ``vmap`` over the pairs of points.

Autodiff is exact at :math:`\tau = 0` only if :math:`\kappa` is written without a square root of
the distance. Radial profiles enter through :class:`ProfileValue`, whose derivatives are the
profile's own closed forms, so Matern kernels stay exact there too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import jacrev, vmap

from gpderiv.blocks.functionals import combine_by_order, max_total_order
from gpderiv.blocks.stationary import Profile, assemble_block_matrix

__all__ = [
    "ProfileValue",
    "StationaryFunction",
    "autodiff_derivative_blocks",
    "autodiff_derivative_diag",
    "autodiff_functional_covariance",
]

#: ``kappa(tau)``, the kernel as a function of one difference vector (`d` -> scalar).
StationaryFunction = Callable[[Tensor], Tensor]


class ProfileValue(torch.autograd.Function):
    r""":math:`\varphi^{(k)}(u)` of a radial profile, differentiable to any order through the profile.

    Autograd through a profile written with :math:`\sqrt u` is wrong or NaN at :math:`u = 0`;
    here every derivative is the profile's closed form (:mod:`gpderiv.blocks.profiles`).
    Works inside ``torch.func`` transforms.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(u: Tensor, profile: Profile, k: int) -> Tensor:
        """``phi^(k)(u)``."""
        return profile(u, k)[k]

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        """Keep ``u`` and the profile for the backward."""
        u, profile, k = inputs
        ctx.save_for_backward(u)
        ctx.profile, ctx.k = profile, k

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        """``grad * phi^(k+1)(u)``, itself differentiable."""
        (u,) = ctx.saved_tensors
        return grad * ProfileValue.apply(u, ctx.profile, ctx.k + 1), None, None


def _derivatives(kappa: StationaryFunction, tau: Tensor, order: int) -> list[Tensor]:
    """``[kappa, grad kappa, ..., d^order kappa]`` at each row of `P x d` differences."""
    out, fn = [], kappa
    for _ in range(order + 1):
        out.append(vmap(fn)(tau))
        fn = jacrev(fn)
    return out


def autodiff_derivative_blocks(
    kappa: StationaryFunction, x1: Tensor, x2: Tensor, *, grad1: bool = True, grad2: bool = True
) -> Tensor:
    """Joint covariance of values and gradients in block layout, by autodiff of ``kappa``.

    Args:
        kappa: the kernel as a function of one difference vector.
        x1: `... x n1 x d` inputs.
        x2: `... x n2 x d` inputs.
        grad1: include the gradient rows of ``x1``.
        grad2: include the gradient columns of ``x2``.

    Returns:
        `... x n1 (1 + d [grad1]) x n2 (1 + d [grad2])` covariance.
    """
    tau = x1.unsqueeze(-2) - x2.unsqueeze(-3)  # ... x n1 x n2 x d
    shape, d = tau.shape[:-1], tau.shape[-1]
    order = 2 if grad1 and grad2 else int(grad1 or grad2)
    derivs = _derivatives(kappa, tau.reshape(-1, d), order)
    k = derivs[0].view(shape)
    gradient = derivs[1].view(*shape, d) if order >= 1 else None
    k_gg = None
    if order == 2:  # -d2 kappa / dtau_a dtau_b, in point-major order ... x n1 x d x n2 x d
        k_gg = -derivs[2].view(*shape, d, d).permute(*range(len(shape) - 2), -4, -2, -3, -1)
    return assemble_block_matrix(k, -gradient if grad2 else None, gradient if grad1 else None, k_gg)


def autodiff_derivative_diag(kappa: StationaryFunction, x1: Tensor, x2: Tensor) -> Tensor:
    """Diagonal of :func:`autodiff_derivative_blocks` for ``n1 == n2`` (pairs ``x1[i]``, ``x2[i]``).

    Returns:
        `... x n (1 + d)` diagonal in block layout.
    """
    tau = x1 - x2
    shape, d = tau.shape[:-1], tau.shape[-1]
    k, _, hess = _derivatives(kappa, tau.reshape(-1, d), 2)
    grad_diag = -hess.diagonal(dim1=-2, dim2=-1).view(*shape, d)
    return torch.cat([k.view(shape), grad_diag.flatten(-2)], dim=-1)


def autodiff_functional_covariance(
    kappa: StationaryFunction, x1: Tensor, x2: Tensor, idx1: Tensor, idx2: Tensor, *, pairwise: bool = True
) -> Tensor:
    """Covariance of derivative functionals, as :func:`gpderiv.blocks.functional_covariance`, by autodiff.

    Args:
        kappa: the kernel as a function of one difference vector.
        x1: `R1 x d` point of each row functional.
        x2: `R2 x d` point of each column functional.
        idx1: `R1 x 2` derivative indices (-1 = none, present first).
        idx2: `R2 x 2` derivative indices.
        pairwise: `R1 x R2` matrix, or the `R` vector of row ``r`` with column ``r``.

    Returns:
        `R1 x R2` (or `R`) covariance.
    """
    if pairwise:
        x1, x2, idx1, idx2 = x1.unsqueeze(-2), x2.unsqueeze(-3), idx1.unsqueeze(-2), idx2.unsqueeze(-3)
    tau = x1 - x2
    shape, d = tau.shape[:-1], tau.shape[-1]
    derivs = _derivatives(kappa, tau.reshape(-1, d), max_total_order(idx1, idx2))

    def derivative(gamma: list[Tensor]) -> Tensor:
        flat = torch.zeros(shape, dtype=torch.long, device=tau.device)
        for g in gamma:  # linear index into the d^m derivative tensor
            flat = flat * d + g.expand(shape)
        return derivs[len(gamma)].reshape(-1, d ** len(gamma)).gather(-1, flat.reshape(-1, 1)).view(shape)

    return combine_by_order(idx1, idx2, shape, tau, derivative)
