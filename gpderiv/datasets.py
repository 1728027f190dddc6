"""Built-in test functions with their exact gradients (the demo, examples and tests use them)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import grad, vmap

__all__ = ["franke", "franke_with_grad"]


def franke(x: Tensor) -> Tensor:
    r"""Franke's function of one point ``x = (x_1, x_2)`` in :math:`[0, 1]^2` (batch it with ``vmap``).

    .. math::

        f = \tfrac34 e^{-((9x_1-2)^2 + (9x_2-2)^2)/4} + \tfrac34 e^{-(9x_1+1)^2/49 - (9x_2+1)/10}
          + \tfrac12 e^{-((9x_1-7)^2 + (9x_2-3)^2)/4} - \tfrac15 e^{-(9x_1-4)^2 - (9x_2-7)^2}
    """
    a, b = 9 * x[0], 9 * x[1]
    return (
        0.75 * torch.exp(-((a - 2) ** 2 + (b - 2) ** 2) / 4)
        + 0.75 * torch.exp(-((a + 1) ** 2) / 49 - (b + 1) / 10)
        + 0.5 * torch.exp(-((a - 7) ** 2 + (b - 3) ** 2) / 4)
        - 0.2 * torch.exp(-((a - 4) ** 2) - (b - 7) ** 2)
    )


def franke_with_grad(X: Tensor) -> tuple[Tensor, Tensor]:
    """Values (`n`) and exact gradients (`n x 2`, by ``torch.func``) of Franke's function at the rows of ``X``."""
    return vmap(franke)(X), vmap(grad(franke))(X)
