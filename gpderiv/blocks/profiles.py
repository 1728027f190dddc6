r"""Radial profiles :math:`\varphi(u)` of stationary kernel families and their u-derivatives.

A profile is a function of the squared scaled distance :math:`u = r^2`. Where a derivative
:math:`\varphi^{(k)}` diverges at :math:`u = 0` (the Matern family, whose profiles contain
:math:`\sqrt u`), its value at exactly :math:`u = 0` is returned as 0: in every block it is
multiplied by a power of :math:`\rho = \delta / \ell^2` that vanishes faster (for instance
:math:`\varphi''\rho_a\rho_b = O(\sqrt u)` for Matern 3/2), so 0 is the exact limit. Square
roots are taken of :math:`u` clamped away from 0 inside ``torch.where``, so autograd never
sees the infinite slope of :math:`\sqrt u` at 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["matern32_profile", "matern52_profile", "rbf_profile"]


def rbf_profile(u: Tensor, order: int = 2) -> tuple[Tensor, ...]:
    r"""Profile of the squared-exponential (RBF) kernel and its u-derivatives.

    .. math::

        \varphi(u) = e^{-u/2}, \qquad \varphi^{(k)}(u) = (-\tfrac12)^k e^{-u/2}.

    Args:
        u: `... x n1 x n2` squared scaled distances (non-negative).
        order: highest derivative returned (2 for the blocks, 3 for their lengthscale gradient).

    Returns:
        ``(phi, phi', ..., phi^(order))``, each of the shape of ``u``.
    """
    phi = torch.exp(-0.5 * u)
    return tuple(phi * (-0.5) ** k for k in range(order + 1))


def _safe_sqrt(u: Tensor) -> tuple[Tensor, Tensor]:
    """``(s, positive)``: ``s = sqrt(u)`` with zero gradient at ``u = 0`` and the mask ``u > 0``."""
    positive = u > 0
    s = torch.where(positive, torch.sqrt(torch.where(positive, u, torch.ones_like(u))), torch.zeros_like(u))
    return s, positive


def _matern_terms(u: Tensor, a: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(s, positive, s_safe, e)``: ``sqrt(u)``, the mask ``u > 0``, ``s`` with 1 at 0, ``exp(-a s)``."""
    s, positive = _safe_sqrt(u)
    return s, positive, torch.where(positive, s, torch.ones_like(s)), torch.exp(-a * s)


def _singular(positive: Tensor, value: Tensor) -> Tensor:
    """A derivative that diverges at ``u = 0``: its (vanishing) contribution there is 0."""
    return torch.where(positive, value, torch.zeros_like(value))


def matern52_profile(u: Tensor, order: int = 2) -> tuple[Tensor, ...]:
    r"""Profile of the Matern 5/2 kernel, :math:`a = \sqrt5`, :math:`s = \sqrt u`.

    .. math::

        \varphi &= (1 + a s + a^2 u / 3)\, e^{-a s}, &
        \varphi' &= -\tfrac{a^2}{6} (1 + a s)\, e^{-a s}, &
        \varphi'' &= \tfrac{a^4}{12} e^{-a s}, \\
        \varphi''' &= -\tfrac{a^5}{24 s} e^{-a s}, &
        \varphi^{(4)} &= \tfrac{a^5}{48} \left(\tfrac{1}{s^3} + \tfrac{a}{s^2}\right) e^{-a s}.

    :math:`\varphi, \varphi', \varphi''` are finite at 0 (the process is twice mean-square
    differentiable); higher derivatives diverge and are 0 at ``u = 0`` (module docstring).

    Args:
        u: squared scaled distances.
        order: highest derivative returned (at most 4).

    Returns:
        ``(phi, phi', ..., phi^(order))``.
    """
    a = math.sqrt(5.0)
    s, positive, s_safe, e = _matern_terms(u, a)
    out = [(1 + a * s + a * a * u / 3) * e, -(a**2 / 6) * (1 + a * s) * e, (a**4 / 12) * e]
    if order >= 3:
        out.append(_singular(positive, -(a**5 / 24) * e / s_safe))
    if order >= 4:
        out.append(_singular(positive, (a**5 / 48) * (1 / s_safe**3 + a / s_safe**2) * e))
    return tuple(out[: order + 1])


def matern32_profile(u: Tensor, order: int = 2) -> tuple[Tensor, ...]:
    r"""Profile of the Matern 3/2 kernel, :math:`a = \sqrt3`, :math:`s = \sqrt u`.

    .. math::

        \varphi = (1 + a s)\, e^{-a s}, \qquad \varphi' = -\tfrac{a^2}{2} e^{-a s}, \qquad
        \varphi'' = \tfrac{a^3}{4 s} e^{-a s}, \qquad
        \varphi''' = -\tfrac{a^3}{8} \left(\tfrac{1}{s^3} + \tfrac{a}{s^2}\right) e^{-a s}.

    Only :math:`\varphi, \varphi'` are finite at 0: the process is once mean-square
    differentiable, so gradient observations are fine but second derivatives are not.

    Args:
        u: squared scaled distances.
        order: highest derivative returned (at most 3).

    Returns:
        ``(phi, phi', ..., phi^(order))``.
    """
    a = math.sqrt(3.0)
    s, positive, s_safe, e = _matern_terms(u, a)
    out = [(1 + a * s) * e, -(a**2 / 2) * e]
    if order >= 2:
        out.append(_singular(positive, (a**3 / 4) * e / s_safe))
    if order >= 3:
        out.append(_singular(positive, -(a**3 / 8) * (1 / s_safe**3 + a / s_safe**2) * e))
    return tuple(out[: order + 1])
