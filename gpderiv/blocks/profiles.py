r"""Radial profiles :math:`\\varphi(u)` of stationary kernel families and their u-derivatives."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rbf_profile"]


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
