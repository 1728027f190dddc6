"""Which compositions of derivative kernels are well defined, checked in one place."""

from __future__ import annotations

from typing import Any

from gpytorch.kernels import AdditiveKernel, Kernel, ProductKernel, ScaleKernel

from gpderiv.kernels.base_derivative_kernel import BaseDerivativeKernel

__all__ = ["check_derivative_kernel", "derivative_leaves"]


def derivative_leaves(kernel: Kernel) -> list[BaseDerivativeKernel]:
    """The derivative-aware kernels inside ``kernel``."""
    return [m for m in kernel.modules() if isinstance(m, BaseDerivativeKernel)]


def check_derivative_kernel(kernel: Any, name: str = "kernel") -> None:
    """Check that ``kernel`` yields the joint covariance of values and gradients in block layout.

    Well defined, because differentiation is linear: a derivative kernel, ``ScaleKernel`` of a
    well-defined kernel (a constant factor), and ``AdditiveKernel`` of well-defined kernels.
    Not well defined: a ``ProductKernel`` (the derivative of a product is not the product of
    the derivatives, so elementwise products of blocks are wrong) and any plain kernel mixed in
    (its matrix has only value rows).

    Raises:
        TypeError: ``kernel`` is not a GPyTorch kernel, or contains a plain kernel.
        ValueError: a product of derivative kernels, or a kernel in interleaved layout.
    """
    if not isinstance(kernel, Kernel):
        raise TypeError(f"{name}: expected a gpytorch.kernels.Kernel, got {type(kernel).__name__}")
    if isinstance(kernel, BaseDerivativeKernel):
        if kernel.layout != "block":
            raise ValueError(f"{name}: expected layout='block' (the model's row order), got layout='interleaved'")
        return
    if isinstance(kernel, ScaleKernel):
        check_derivative_kernel(kernel.base_kernel, name)
        return
    if isinstance(kernel, AdditiveKernel):
        for sub in kernel.kernels:
            check_derivative_kernel(sub, name)
        return
    if isinstance(kernel, ProductKernel) and derivative_leaves(kernel):
        raise ValueError(
            f"{name}: a product of derivative kernels is not well defined (the derivative of a product is not the "
            "product of the derivatives); use a sum, a ScaleKernel, or wrap the product of plain kernels in "
            "gpderiv.kernels.DerivativeKernel"
        )
    raise TypeError(
        f"{name}: expected a derivative-aware kernel (DerivativeRBFKernel, DerivativeMatern52Kernel, ...), "
        f"or sums and ScaleKernels of them, got {type(kernel).__name__}"
    )
