r"""Laplace approximation of the hyperparameter posterior: the directions of its covariance.

Near the maximum :math:`\hat\theta` of the log posterior of the raw hyperparameters (log marginal
likelihood plus log priors), :math:`p(\theta \mid \mathcal D) \approx \mathcal N(\hat\theta,
\Sigma)` with :math:`\Sigma = H^{-1}`, :math:`H = \nabla^2 \mathcal L(\hat\theta)` the Hessian of the
negative log posterior :math:`\mathcal L`. With the eigendecomposition :math:`H = \sum_k \lambda_k
u_k u_k^\top`, the directions :math:`s_k = u_k / \sqrt{\lambda_k}` satisfy :math:`\sum_k s_k s_k^\top
= \Sigma`: one standard deviation of the approximate posterior along each of its principal axes.

The Hessian is taken by central differences of the (exact, closed-form) gradient,
:math:`H_{:k} = (\nabla\mathcal L(\hat\theta + h e_k) - \nabla\mathcal L(\hat\theta - h e_k)) / 2h`,
then symmetrised: `2P` gradient evaluations for `P` hyperparameters. Directions the data do not
identify (a flat or, away from a strict maximum, concave log posterior) would get an infinite or
imaginary standard deviation; the curvature is floored at ``curvature_floor`` so that no standard
deviation exceeds :math:`1/\sqrt{\text{floor}}` raw units (with the default floor 1: one unit, a factor
:math:`e` in a small positive hyperparameter behind a softplus).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["finite_difference_hessian", "hessian_step", "laplace_directions"]

#: Central-difference step of :func:`finite_difference_hessian` in float64 (raw hyperparameter units).
HESSIAN_STEP = 1e-4
#: Smallest curvature of :func:`laplace_directions`: at most one raw unit of standard deviation.
CURVATURE_FLOOR = 1.0


def hessian_step(dtype: torch.dtype) -> float:
    """The difference step for ``dtype``: :data:`HESSIAN_STEP` in float64, about the cube root of eps otherwise.

    A central difference errs by O(h^2) (truncation) plus O(eps / h) (rounding of the gradient):
    balanced near h = eps^(1/3), 6e-6 in float64 (1e-4 keeps a margin) and 5e-3 in float32.
    """
    return HESSIAN_STEP if dtype == torch.float64 else float(torch.finfo(dtype).eps) ** (1 / 3)


def finite_difference_hessian(gradient: Callable[[Tensor], Tensor], x: Tensor, step: float = HESSIAN_STEP) -> Tensor:
    """Symmetric `P x P` Hessian by central differences of ``gradient`` at ``x`` (`P`)."""
    columns = []
    for k in range(x.numel()):
        e = torch.zeros_like(x)
        e[k] = step
        columns.append((gradient(x + e) - gradient(x - e)) / (2 * step))
    H = torch.stack(columns, -1)
    return (H + H.mT) / 2


def laplace_directions(hessian: Tensor, curvature_floor: float = CURVATURE_FLOOR) -> Tensor:
    r"""`P x P` directions :math:`s_k` (columns) with :math:`\sum_k s_k s_k^\top = H^{-1}` (floored curvatures).

    Args:
        hessian: `P x P` symmetric Hessian of the negative log posterior at its minimum.
        curvature_floor: eigenvalues of the Hessian below this are raised to it.
    """
    curvature, axes = torch.linalg.eigh(hessian)
    return axes / curvature.clamp_min(curvature_floor).sqrt()
