"""Derivative-aware GPyTorch kernels."""

from gpderiv.kernels.base_derivative_kernel import BaseDerivativeKernel
from gpderiv.kernels.composition import check_derivative_kernel, walk
from gpderiv.kernels.defaults import default_kernel
from gpderiv.kernels.derivative_kernel import DerivativeKernel
from gpderiv.kernels.derivative_matern32_kernel import DerivativeMatern32Kernel
from gpderiv.kernels.derivative_matern52_kernel import DerivativeMatern52Kernel
from gpderiv.kernels.derivative_rbf_kernel import DerivativeRBFKernel
from gpderiv.kernels.stationary_derivative_kernel import StationaryDerivativeKernel

__all__ = [
    "BaseDerivativeKernel",
    "DerivativeKernel",
    "DerivativeMatern32Kernel",
    "DerivativeMatern52Kernel",
    "DerivativeRBFKernel",
    "StationaryDerivativeKernel",
    "check_derivative_kernel",
    "default_kernel",
    "walk",
]
