"""The kernel-tree walker and the composition check built on it."""

from __future__ import annotations

import pytest
from gpytorch.kernels import AdditiveKernel, PeriodicKernel, ProductKernel, RBFKernel, ScaleKernel

from gpderiv.kernels import (
    DerivativeKernel,
    DerivativeMatern52Kernel,
    DerivativeRBFKernel,
    check_derivative_kernel,
    walk,
)
from gpderiv.kernels.composition import child_kernels, derivative_leaves


def tree():
    return AdditiveKernel(
        ScaleKernel(DerivativeRBFKernel(ard_num_dims=2)),
        DerivativeKernel(RBFKernel() * PeriodicKernel()),
        DerivativeMatern52Kernel(),
    )


def test_walk_visits_every_kernel_parents_first_with_module_paths() -> None:
    kernel = tree()
    names = [name for name, _ in walk(kernel)]
    assert names == [
        "",
        "kernels.0",
        "kernels.0.base_kernel",
        "kernels.1",
        "kernels.1.base_kernel",
        "kernels.1.base_kernel.kernels.0",
        "kernels.1.base_kernel.kernels.1",
        "kernels.2",
    ]
    modules = dict(kernel.named_modules())
    assert all(modules[name] is node for name, node in walk(kernel))  # the same paths as named_modules
    assert [type(k).__name__ for _, k in walk(kernel)][-2:] == ["PeriodicKernel", "DerivativeMatern52Kernel"]


def test_walk_stop_at_yields_but_does_not_descend() -> None:
    names = [name for name, _ in walk(tree(), stop_at=(DerivativeKernel,))]
    assert "kernels.1" in names and not any(n.startswith("kernels.1.") for n in names)


def test_child_kernels_are_the_direct_sub_kernels() -> None:
    kernel = tree()
    assert [name for name, _ in child_kernels(kernel)] == ["kernels.0", "kernels.1", "kernels.2"]
    assert [name for name, _ in child_kernels(kernel.kernels[0])] == ["base_kernel"]
    assert child_kernels(kernel.kernels[2]) == []


def test_derivative_leaves_and_check_use_the_walker() -> None:
    kernel = tree()
    leaves = derivative_leaves(kernel)
    assert [type(k).__name__ for k in leaves] == ["DerivativeRBFKernel", "DerivativeKernel", "DerivativeMatern52Kernel"]
    check_derivative_kernel(kernel)  # plain kernels inside DerivativeKernel are fine
    with pytest.raises(ValueError, match="kernel: a product of derivative kernels"):
        check_derivative_kernel(ScaleKernel(ProductKernel(DerivativeRBFKernel(), DerivativeRBFKernel())))
    with pytest.raises(TypeError, match="got RBFKernel"):
        check_derivative_kernel(AdditiveKernel(DerivativeRBFKernel(), RBFKernel()))
    with pytest.raises(ValueError, match="got layout='interleaved'"):
        check_derivative_kernel(ScaleKernel(DerivativeRBFKernel(layout="interleaved")), name="covar_module")
    with pytest.raises(TypeError, match="k: expected a gpytorch.kernels.Kernel, got int"):
        check_derivative_kernel(3, name="k")
