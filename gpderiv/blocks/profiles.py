r"""Radial profiles :math:`\\varphi(u)` of stationary kernel families and their u-derivatives."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rbf_profile"]


def rbf_profile(u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Profile of the squared-exponential (RBF) kernel.

    .. math::

        \varphi(u) = e^{-u/2}, \qquad \varphi'(u) = -\tfrac12 e^{-u/2},
        \qquad \varphi''(u) = \tfrac14 e^{-u/2}.

    Args:
        u: `... x n1 x n2` squared scaled distances (non-negative).

    Returns:
        ``(phi, dphi, d2phi)``, each of the shape of ``u``.
    """
    phi = torch.exp(-0.5 * u)
    return phi, -0.5 * phi, 0.25 * phi
