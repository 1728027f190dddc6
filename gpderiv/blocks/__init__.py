r"""Closed-form derivative blocks: pure tensor functions, no ``nn.Module`` and no GPyTorch.

A stationary kernel family enters this layer only through its *radial profile*
:math:`\varphi(u)` and the first derivatives of :math:`\varphi` with respect to the
squared scaled distance :math:`u = \sum_a (x_{1a} - x_{2a})^2 / \ell_a^2`.  Because the
profile is a function of :math:`u` (not of :math:`r = \sqrt{u}`), the blocks never take a
square root and are exact and finite at coincident points.
"""

from gpderiv.blocks.functionals import functional_covariance
from gpderiv.blocks.matvec import rbf_derivative_matmul, rbf_exponentials
from gpderiv.blocks.profiles import matern32_profile, matern52_profile, rbf_profile
from gpderiv.blocks.stationary import (
    Profile,
    interleave_index,
    stationary_derivative_blocks,
    stationary_derivative_diag,
)

__all__ = [
    "Profile",
    "functional_covariance",
    "interleave_index",
    "matern32_profile",
    "matern52_profile",
    "rbf_derivative_matmul",
    "rbf_exponentials",
    "rbf_profile",
    "stationary_derivative_blocks",
    "stationary_derivative_diag",
]
