"""The one factory of default kernels equals what each front end built before it existed."""

from __future__ import annotations

import math

import pytest
import torch
from gpytorch.constraints import GreaterThan
from gpytorch.kernels import ScaleKernel
from gpytorch.priors import LogNormalPrior

from gpderiv.kernels import (
    DerivativeMatern32Kernel,
    DerivativeMatern52Kernel,
    DerivativeRBFKernel,
    default_kernel,
)
from gpderiv.kernels.description import describe_kernel, same_description


def assert_same_kernel(a, b) -> None:
    assert same_description(describe_kernel(a), describe_kernel(b))  # classes, layout, arguments, priors, constraints
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)  # hyperparameter values


def model_default_before(d: int, cls=DerivativeRBFKernel):
    """gpderiv/model.py's _default_kernel (and the CLI's and estimator's Matern variants) before the factory."""
    kernel = ScaleKernel(cls(ard_num_dims=d))
    kernel.base_kernel.lengthscale = 0.3
    kernel.outputscale = 1.0
    return kernel


def botorch_default_before(d: int):
    """gpderiv/botorch.py's _default_kernel before the factory."""
    prior = LogNormalPrior(loc=math.sqrt(2) + 0.5 * math.log(d), scale=math.sqrt(3))
    return DerivativeRBFKernel(
        layout="interleaved",
        ard_num_dims=d,
        lengthscale_prior=prior,
        lengthscale_constraint=GreaterThan(2.5e-2, transform=None, initial_value=prior.mode),
    )


@pytest.mark.parametrize("d", [1, 3, 20])
@pytest.mark.parametrize(
    "family, cls",
    [("rbf", DerivativeRBFKernel), ("matern52", DerivativeMatern52Kernel), ("matern32", DerivativeMatern32Kernel)],
)
def test_default_kernel_equals_the_models_default(d, family, cls) -> None:
    kernel = default_kernel(d, family=family)
    assert_same_kernel(kernel, model_default_before(d, cls))
    assert type(kernel.base_kernel) is cls and kernel.base_kernel.layout == "block"
    assert torch.allclose(kernel.base_kernel.lengthscale, torch.full((1, d), 0.3))
    assert torch.allclose(kernel.outputscale, torch.tensor(1.0))


@pytest.mark.parametrize("d", [1, 3, 20])
def test_botorch_default_kernel_equals_the_botorch_models_default(d) -> None:
    kernel = default_kernel(d, botorch=True)
    assert_same_kernel(kernel, botorch_default_before(d))
    assert type(kernel) is DerivativeRBFKernel and kernel.layout == "interleaved"
    prior = kernel.lengthscale_prior
    assert isinstance(prior, LogNormalPrior)
    assert prior.loc.item() == pytest.approx(math.sqrt(2) + 0.5 * math.log(d))
    assert prior.scale.item() == pytest.approx(math.sqrt(3))
    mode = math.exp(math.sqrt(2) + 0.5 * math.log(d) - 3)
    assert torch.allclose(kernel.lengthscale, torch.full((1, d), mode))
    constraint = kernel.raw_lengthscale_constraint
    assert type(constraint) is GreaterThan and not constraint.enforced
    assert constraint.lower_bound.item() == pytest.approx(2.5e-2)


def test_default_kernel_layout_and_family_options() -> None:
    assert default_kernel(2, layout="interleaved").base_kernel.layout == "interleaved"
    assert default_kernel(2, botorch=True, layout="block").layout == "block"
    assert type(default_kernel(2, family="matern52", botorch=True)) is DerivativeMatern52Kernel
    assert default_kernel(2) is not default_kernel(2)  # a new kernel each time


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"d": 0}, ValueError, "d: expected a positive integer"),
        ({"d": 2.0}, ValueError, "d: expected a positive integer"),
        ({"d": 2, "family": "matern12"}, ValueError, r"family: expected one of \['matern32', 'matern52', 'rbf'\]"),
        ({"d": 2, "layout": "rows"}, ValueError, "layout: expected one of"),
        ({"d": 2, "botorch": "yes"}, TypeError, "botorch: expected a bool, got str"),
    ],
)
def test_default_kernel_refuses_bad_arguments(kwargs, error, match) -> None:
    d = kwargs.pop("d")
    with pytest.raises(error, match=match):
        default_kernel(d, **kwargs)
