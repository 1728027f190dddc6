"""Kernel composition trees: one walker over them, and which compositions are well defined."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from gpytorch.kernels import AdditiveKernel, Kernel, ProductKernel, ScaleKernel
from torch.nn import ModuleList

from gpderiv.kernels.base_derivative_kernel import BaseDerivativeKernel

__all__ = ["check_derivative_kernel", "derivative_leaves", "child_kernels", "walk"]


def child_kernels(kernel: Kernel) -> list[tuple[str, Kernel]]:
    """The kernels directly inside ``kernel``, with their attribute names, in order.

    ``[("base_kernel", k)]`` for a ``ScaleKernel`` or a :class:`~gpderiv.kernels.DerivativeKernel`,
    ``[("kernels.0", k0), ("kernels.1", k1), ...]`` for a sum or product, ``[]`` for a leaf; any
    other kernel-valued attribute (or list of kernels) of a wrapper is included the same way.
    """
    out: list[tuple[str, Kernel]] = []
    for name, child in kernel.named_children():
        if isinstance(child, Kernel):
            out.append((name, child))
        elif isinstance(child, ModuleList):
            out.extend((f"{name}.{i}", k) for i, k in enumerate(child) if isinstance(k, Kernel))
    return out


def walk(kernel: Kernel, *, stop_at: tuple[type[Kernel], ...] = ()) -> Iterator[tuple[str, Kernel]]:
    """Every kernel of a composition tree, parents before children: ``(name, kernel)``.

    Names are the dotted module paths relative to ``kernel`` (as in ``kernel.named_modules()``):
    ``""`` for ``kernel`` itself, then e.g. ``"base_kernel"``, ``"base_kernel.kernels.1"``.
    Priors, constraints and other non-kernel modules are not visited.

    Args:
        kernel: the root of the tree.
        stop_at: kernel classes that are yielded but not descended into (e.g.
            :class:`~gpderiv.kernels.BaseDerivativeKernel`, whose base kernel is plain).
    """
    stack = [("", kernel)]
    while stack:
        name, node = stack.pop()
        yield name, node
        if not isinstance(node, stop_at):
            prefix = f"{name}." if name else ""
            stack.extend((prefix + child_name, child) for child_name, child in reversed(child_kernels(node)))


def derivative_leaves(kernel: Kernel) -> list[BaseDerivativeKernel]:
    """The derivative-aware kernels inside ``kernel`` (``kernel`` itself included), parents first."""
    return [node for _, node in walk(kernel) if isinstance(node, BaseDerivativeKernel)]


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
    for _, node in walk(kernel, stop_at=(BaseDerivativeKernel,)):
        if isinstance(node, BaseDerivativeKernel):
            if node.layout != "block":
                raise ValueError(f"{name}: expected layout='block' (the model's row order), got layout='interleaved'")
        elif isinstance(node, ProductKernel) and derivative_leaves(node):
            raise ValueError(
                f"{name}: a product of derivative kernels is not well defined (the derivative of a product is not "
                "the product of the derivatives); use a sum, a ScaleKernel, or wrap the product of plain kernels in "
                "gpderiv.kernels.DerivativeKernel"
            )
        elif not isinstance(node, (ScaleKernel, AdditiveKernel)):
            raise TypeError(
                f"{name}: expected a derivative-aware kernel (DerivativeRBFKernel, DerivativeMatern52Kernel, ...), "
                f"or sums and ScaleKernels of them, got {type(node).__name__}"
            )
