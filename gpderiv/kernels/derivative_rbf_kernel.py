"""Squared-exponential kernel with gradient observations."""

from __future__ import annotations

from torch import Tensor

from gpderiv.blocks import rbf_profile
from gpderiv.kernels.stationary_derivative_kernel import StationaryDerivativeKernel

__all__ = ["DerivativeRBFKernel"]


class DerivativeRBFKernel(StationaryDerivativeKernel):
    r"""RBF kernel over function values and their partial derivatives.

    With :math:`k(x_1, x_2) = \exp(-\tfrac12 \sum_a r_a^2/\ell_a^2)`, :math:`r = x_1 - x_2`, the
    blocks of the joint covariance ``[[K, K_fg], [K_gf, K_gg]]`` are

    .. math::

        K_{ij} &= k(x_{1i}, x_{2j}) \\
        K_{fg}[i, jd + b] &= \frac{\partial k}{\partial x_{2b}} = k\,\frac{r_b}{\ell_b^2} \\
        K_{gf}[id + a, j] &= \frac{\partial k}{\partial x_{1a}} = -k\,\frac{r_a}{\ell_a^2} \\
        K_{gg}[id + a, jd + b] &= \frac{\partial^2 k}{\partial x_{1a}\,\partial x_{2b}}
            = k \left(\frac{\delta_{ab}}{\ell_a^2} - \frac{r_a r_b}{\ell_a^2 \ell_b^2}\right)

    No square root appears, so every entry is exact and finite at coincident points (where
    ``K_gg`` is :math:`\operatorname{diag}(1/\ell^2)`). Wrap in
    :class:`gpytorch.kernels.ScaleKernel` for an output scale.

    Args:
        layout: ``"block"`` (default, see above) or ``"interleaved"`` (GPyTorch's
            ``RBFKernelGrad`` ordering, for use as a drop-in replacement).
        **kwargs: ``ard_num_dims``, ``batch_shape``, ``active_dims``, ``lengthscale_prior``,
            ``lengthscale_constraint``, ``eps`` as for :class:`gpytorch.kernels.RBFKernel`.

    Example:
        >>> import torch
        >>> from gpytorch.kernels import ScaleKernel
        >>> kernel = ScaleKernel(DerivativeRBFKernel(ard_num_dims=3))
        >>> kernel(torch.rand(10, 3)).to_dense().shape
        torch.Size([40, 40])
    """

    @staticmethod
    def profile(u: Tensor, order: int = 2) -> tuple[Tensor, ...]:
        """RBF profile, see :func:`gpderiv.blocks.rbf_profile`."""
        return rbf_profile(u, order)
