"""Derivative-aware GPyTorch kernels."""

from gpderiv.kernels.derivative_rbf_kernel import DerivativeRBFKernel
from gpderiv.kernels.stationary_derivative_kernel import StationaryDerivativeKernel

__all__ = ["DerivativeRBFKernel", "StationaryDerivativeKernel"]
