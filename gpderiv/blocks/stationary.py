r"""Block covariance of a stationary kernel and its first derivatives.

For a kernel :math:`k(x_1, x_2) = \varphi(u)` with
:math:`u = \sum_a \delta_a^2 / \ell_a^2`, :math:`\delta = x_1 - x_2` and
:math:`\rho_a = \delta_a / \ell_a^2`, the chain rule gives (:math:`\partial u / \partial x_{2b}
= -2\rho_b`, :math:`\partial u / \partial x_{1a} = 2\rho_a`):

.. math::

    K           &= \varphi(u) \\
    K_{fg}[:, b] = \frac{\partial k}{\partial x_{2b}} &= -2\,\varphi'(u)\,\rho_b \\
    K_{gf}[a, :] = \frac{\partial k}{\partial x_{1a}} &= \phantom{-}2\,\varphi'(u)\,\rho_a \\
    K_{gg}[a, b] = \frac{\partial^2 k}{\partial x_{1a}\,\partial x_{2b}}
        &= -4\,\varphi''(u)\,\rho_a \rho_b - 2\,\varphi'(u)\,\delta_{ab} / \ell_a^2

For the RBF profile (:math:`\varphi = e^{-u/2}`) these are the signs of DESIGN.md:
:math:`K_{fg} = k\,\rho_b`, :math:`K_{gf} = -k\,\rho_a`,
:math:`K_{gg} = k\,(\delta_{ab}/\ell_a^2 - \rho_a\rho_b)`.

Block layout: values first, then the gradients point-major, so row ``n1 + i*d + a`` is
:math:`\partial f(x_{1i}) / \partial x_a`.  :func:`interleave_index` maps it to GPyTorch's
interleaved layout ``[f, d_1 f, ..., d_d f]`` per point.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "Profile",
    "interleave_index",
    "stationary_derivative_blocks",
    "stationary_derivative_diag",
]

#: A radial profile: ``u -> (phi(u), phi'(u), phi''(u))``, derivatives taken with respect to u.
Profile = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]


def _scaled_differences(x1: Tensor, x2: Tensor, lengthscale: Tensor, pairwise: bool) -> tuple[Tensor, Tensor]:
    """Return ``u`` (`... x n1 x n2`) and ``rho = delta / l^2`` (`... x n1 x n2 x d`).

    ``u`` is a sum of squares of differences (not ``|x1|^2 + |x2|^2 - 2 x1.x2``): it is exactly
    zero at coincident points and never negative.
    """
    x1s, x2s = x1 / lengthscale, x2 / lengthscale
    if pairwise:
        x1s, x2s, lengthscale = x1s.unsqueeze(-2), x2s.unsqueeze(-3), lengthscale.unsqueeze(-2)
    diff = x1s - x2s
    return diff.square().sum(-1), diff / lengthscale


def stationary_derivative_blocks(
    x1: Tensor,
    x2: Tensor,
    lengthscale: Tensor,
    profile: Profile,
    *,
    grad1: bool = True,
    grad2: bool = True,
) -> Tensor:
    r"""Joint covariance of values and gradients, ``[[K, K_fg], [K_gf, K_gg]]`` (block layout).

    Args:
        x1: `... x n1 x d` inputs.
        x2: `... x n2 x d` inputs.
        lengthscale: `... x 1 x d` (ARD) or `... x 1 x 1` lengthscales.
        profile: radial profile of the kernel family (see :data:`Profile`).
        grad1: include the gradient rows of ``x1`` (otherwise only the value rows).
        grad2: include the gradient columns of ``x2``.

    Returns:
        `... x n1 (1 + d [grad1]) x n2 (1 + d [grad2])` covariance in block layout.
    """
    n1, d = x1.shape[-2:]
    n2 = x2.shape[-2]
    lengthscale = lengthscale.expand(*lengthscale.shape[:-1], d)
    u, rho = _scaled_differences(x1, x2, lengthscale, pairwise=True)
    phi, dphi, d2phi = profile(u)
    batch = phi.shape[:-2]
    rows = n1 * (1 + d * grad1)
    cols = n2 * (1 + d * grad2)
    # One output buffer filled block by block: the d^2-sized K_gg is built once and copied
    # once, instead of the several full-size temporaries of nested torch.cat calls.
    out = phi.new_empty(*batch, rows, cols)
    out[..., :n1, :n2] = phi
    if grad2:
        out[..., :n1, n2:] = ((-2.0 * dphi).unsqueeze(-1) * rho).reshape(*batch, n1, n2 * d)
    if grad1:
        k_gf = (2.0 * dphi).unsqueeze(-1) * rho  # ... x n1 x n2 x d
        out[..., n1:, :n2] = k_gf.transpose(-1, -2).reshape(*batch, n1 * d, n2)
    if grad1 and grad2:
        # ... x n1 x d x n2 x d, built directly in point-major order so the reshape is a view.
        weighted = ((-4.0 * d2phi).unsqueeze(-1) * rho).transpose(-1, -2).contiguous()  # ... x n1 x d x n2
        k_gg = weighted.unsqueeze(-1) * rho.unsqueeze(-3)
        k_gg.diagonal(dim1=-3, dim2=-1).add_((-2.0 * dphi).unsqueeze(-1) / lengthscale.unsqueeze(-2).square())
        out[..., n1:, n2:] = k_gg.reshape(*batch, n1 * d, n2 * d)
    return out


def stationary_derivative_diag(x1: Tensor, x2: Tensor, lengthscale: Tensor, profile: Profile) -> Tensor:
    r"""Diagonal of :func:`stationary_derivative_blocks` for ``n1 == n2``, without the full matrix.

    Entry ``i`` pairs ``x1[i]`` with ``x2[i]``; at coincident points the gradient entries
    reduce to :math:`-2\varphi'(0)/\ell_a^2` (:math:`1/\ell_a^2` for the RBF).

    Args:
        x1: `... x n x d` inputs.
        x2: `... x n x d` inputs.
        lengthscale: `... x 1 x d` or `... x 1 x 1` lengthscales.
        profile: radial profile of the kernel family.

    Returns:
        `... x n (1 + d)` diagonal in block layout.
    """
    d = x1.shape[-1]
    lengthscale = lengthscale.expand(*lengthscale.shape[:-1], d)
    u, rho = _scaled_differences(x1, x2, lengthscale, pairwise=False)
    phi, dphi, d2phi = profile(u)
    grad_diag = (-4.0 * d2phi).unsqueeze(-1) * rho.square() - (2.0 * dphi).unsqueeze(-1) / lengthscale.square()
    return torch.cat([phi, grad_diag.flatten(-2)], dim=-1)


def interleave_index(n: int, d: int, device: torch.device | None = None) -> Tensor:
    """Index that reorders a block-layout axis into GPyTorch's interleaved layout.

    ``block[..., interleave_index(n, d)]`` has entry ``i*(d+1)`` equal to the value at point
    ``i`` and entry ``i*(d+1) + 1 + a`` equal to its ``a``-th partial derivative.

    Args:
        n: number of points.
        d: input dimension.
        device: device of the returned index.

    Returns:
        `n (d + 1)` long tensor.
    """
    values = torch.arange(n, device=device).unsqueeze(-1)
    grads = n + torch.arange(n * d, device=device).view(n, d)
    return torch.cat([values, grads], dim=-1).flatten()
