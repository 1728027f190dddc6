"""Built-in data: test functions with their exact gradients, and real terrain with measured slopes."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import torch
from scipy.io import loadmat
from torch import Tensor
from torch.func import grad, vmap

__all__ = ["Terrain", "franke", "franke_with_grad", "mount_st_helens"]


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


@dataclass(frozen=True)
class Terrain:
    """Elevations and slopes on a regular grid (float64, the data set's own units).

    Attributes:
        X: `n x 2` grid coordinates.
        y: `n` elevations.
        grad: `n x 2` slopes ``d elevation / d x_a``, in elevation per coordinate unit.
        shape: grid shape ``(nx, ny)`` with ``nx * ny = n``.
    """

    X: Tensor
    y: Tensor
    grad: Tensor
    shape: tuple[int, int]


def mount_st_helens() -> Terrain:
    """Lidar elevation of Mount St. Helens on a 120 x 117 grid (14,040 points) with the slope at every point.

    The terrain data set of Eriksson et al., "Scaling Gaussian Process Regression with
    Derivatives" (NeurIPS 2018), from their repository GP_Derivatives (MIT licence, shipped as
    ``gpderiv/data/LICENSE-mount_st_helens``). Coordinates run from 8 to 960 in steps of 8, the
    first coordinate fastest. The slopes are measured, not differences of the elevations: against
    central differences of the elevation grid they correlate at 0.81-0.83, with a relative
    difference of 0.56-0.59 (measured), so treat them as noisy observations. The paper's
    protocol: a random 50/50 split, error ``||y_pred - y_test|| / ||y_test - mean(y_train)||``;
    its D-SKI reaches 0.0300 with slopes and SKI 0.0393 without (``examples/terrain.py``
    reproduces the protocol with an exact GP).

    Returns:
        A :class:`Terrain` with `14040 x 2` inputs, `14040` elevations and `14040 x 2` slopes.

    Example:
        >>> data = mount_st_helens()
        >>> data.X.shape, data.y.shape, data.grad.shape, data.shape
        (torch.Size([14040, 2]), torch.Size([14040]), torch.Size([14040, 2]), (120, 117))
    """
    with resources.files("gpderiv").joinpath("data/mount_st_helens.mat").open("rb") as fh:
        raw = loadmat(fh)
    return Terrain(
        X=torch.as_tensor(raw["mth_points"].astype("float64")),
        y=torch.as_tensor(raw["mth_verts"][:, 0].astype("float64")),
        grad=torch.as_tensor(raw["mth_grads"].astype("float64")),
        shape=(int(raw["nx"][0, 0]), int(raw["ny"][0, 0])),
    )
