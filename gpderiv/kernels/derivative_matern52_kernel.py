"""Matern 5/2 kernel with gradient observations."""

from __future__ import annotations

from torch import Tensor

from gpderiv.blocks import matern52_profile
from gpderiv.kernels.stationary_derivative_kernel import StationaryDerivativeKernel

__all__ = ["DerivativeMatern52Kernel"]


class DerivativeMatern52Kernel(StationaryDerivativeKernel):
    r"""Matern 5/2 kernel over function values and their partial derivatives.

    With :math:`r = \sqrt{u}`, :math:`u = \sum_a (x_{1a} - x_{2a})^2 / \ell_a^2` and
    :math:`a = \sqrt5`, :math:`k = (1 + a r + a^2 r^2 / 3) e^{-a r}`. Writing
    :math:`\rho_b = (x_{1b} - x_{2b}) / \ell_b^2`, the blocks are

    .. math::

        K_{fg}[i, jd + b] &= \frac{\partial k}{\partial x_{2b}} = \tfrac{a^2}{3} (1 + a r)\, e^{-a r} \rho_b \\
        K_{gf}[id + a', j] &= \frac{\partial k}{\partial x_{1a'}} = -\tfrac{a^2}{3} (1 + a r)\, e^{-a r} \rho_{a'} \\
        K_{gg}[id + a', jd + b] &= \tfrac{a^2}{3} e^{-a r} \left((1 + a r) \frac{\delta_{a'b}}{\ell_{a'}^2}
            - a^2 \rho_{a'} \rho_b\right)

    exact at coincident points (:math:`K_{gg} = \tfrac53 \operatorname{diag}(1/\ell^2)` there, no
    division by r anywhere). The signs are those of the derivatives of the kernel, checked against
    autograd (GPyTorch's ``Matern52KernelGrad`` shipped with a sign error in one block, #2563).
    The process is twice mean-square differentiable.

    Args:
        layout: ``"block"`` (default) or ``"interleaved"`` (GPyTorch's ordering).
        **kwargs: ``ard_num_dims``, ``batch_shape``, ``active_dims``, ``lengthscale_prior``,
            ``lengthscale_constraint``, ``eps`` as for :class:`gpytorch.kernels.MaternKernel`.
    """

    max_derivative_order = 2

    @staticmethod
    def profile(u: Tensor, order: int = 2) -> tuple[Tensor, ...]:
        """Matern 5/2 profile, see :func:`gpderiv.blocks.matern52_profile`."""
        return matern52_profile(u, order)
