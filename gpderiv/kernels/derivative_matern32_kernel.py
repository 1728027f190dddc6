"""Matern 3/2 kernel with gradient observations."""

from __future__ import annotations

from torch import Tensor

from gpderiv.blocks import matern32_profile
from gpderiv.kernels.stationary_derivative_kernel import StationaryDerivativeKernel

__all__ = ["DerivativeMatern32Kernel"]


class DerivativeMatern32Kernel(StationaryDerivativeKernel):
    r"""Matern 3/2 kernel over function values and their partial derivatives.

    With :math:`r = \sqrt{u}`, :math:`a = \sqrt3`, :math:`k = (1 + a r) e^{-a r}` and
    :math:`\rho_b = (x_{1b} - x_{2b}) / \ell_b^2`:

    .. math::

        K_{fg}[i, jd + b] &= \frac{\partial k}{\partial x_{2b}} = a^2 e^{-a r} \rho_b \\
        K_{gf}[id + a', j] &= \frac{\partial k}{\partial x_{1a'}} = -a^2 e^{-a r} \rho_{a'} \\
        K_{gg}[id + a', jd + b] &= a^2 e^{-a r} \left(\frac{\delta_{a'b}}{\ell_{a'}^2}
            - \frac{a}{r} \rho_{a'} \rho_b\right)

    where :math:`\rho_{a'}\rho_b / r = O(r)` vanishes at coincident points (the blocks return
    its exact limit 0 there, so :math:`K_{gg} = 3 \operatorname{diag}(1/\ell^2)`). The process is
    only once mean-square differentiable: gradient observations are fine, second-derivative
    observations are refused.

    Args:
        layout: ``"block"`` (default) or ``"interleaved"`` (GPyTorch's ordering).
        **kwargs: ``ard_num_dims``, ``batch_shape``, ``active_dims``, ``lengthscale_prior``,
            ``lengthscale_constraint``, ``eps`` as for :class:`gpytorch.kernels.MaternKernel`.
    """

    max_derivative_order = 1

    @staticmethod
    def profile(u: Tensor, order: int = 2) -> tuple[Tensor, ...]:
        """Matern 3/2 profile, see :func:`gpderiv.blocks.matern32_profile`."""
        return matern32_profile(u, order)
