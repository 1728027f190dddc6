"""The default kernels of every front end (DerivativeGP, estimator, CLI, BoTorch model), built in one place."""

from __future__ import annotations

import math

import torch
from gpytorch.constraints import GreaterThan
from gpytorch.kernels import Kernel, ScaleKernel
from gpytorch.priors import LogNormalPrior

from gpderiv.kernels.derivative_matern32_kernel import DerivativeMatern32Kernel
from gpderiv.kernels.derivative_matern52_kernel import DerivativeMatern52Kernel
from gpderiv.kernels.derivative_rbf_kernel import DerivativeRBFKernel
from gpderiv.kernels.stationary_derivative_kernel import StationaryDerivativeKernel

__all__ = ["FAMILIES", "default_kernel"]

#: Kernel families of :func:`default_kernel` by name (the names of ``--kernel`` and the estimator's ``kernel``).
FAMILIES: dict[str, type[StationaryDerivativeKernel]] = {
    "rbf": DerivativeRBFKernel,
    "matern52": DerivativeMatern52Kernel,
    "matern32": DerivativeMatern32Kernel,
}
#: Initial lengthscale of the DerivativeGP default, in internal units (inputs scaled to the unit box).
INITIAL_LENGTHSCALE = 0.3
#: Initial output scale of the DerivativeGP default, in internal units (standardised values).
INITIAL_OUTPUTSCALE = 1.0
#: Lower bound of the BoTorch default's lengthscales (as BoTorch's ``get_covar_module_with_dim_scaled_prior``).
BOTORCH_MIN_LENGTHSCALE = 2.5e-2


def default_kernel(
    d: int,
    *,
    family: str = "rbf",
    layout: str | None = None,
    botorch: bool = False,
    batch_shape: torch.Size | None = None,
) -> Kernel:
    r"""The default derivative kernel over `d` inputs.

    With ``botorch=False`` (:class:`~gpderiv.DerivativeGP`, the scikit-learn estimator, the CLI):
    ``ScaleKernel(<family>(ard_num_dims=d))`` with lengthscales 0.3 and output scale 1.0 (inputs
    are scaled to the unit box and values standardised inside the model), no priors.

    With ``botorch=True`` (:class:`~gpderiv.botorch.DerivativeGPModel`, like BoTorch's
    ``SingleTaskGP``): ``<family>(ard_num_dims=d)`` without a ``ScaleKernel``, with the
    dimension-scaled lengthscale prior of Hvarfner et al. (2024),
    :math:`\ell_a \sim \mathrm{LogNormal}(\sqrt2 + \tfrac12 \log d, \sqrt3)`, lengthscales bounded
    below by 0.025 (``GreaterThan(0.025, transform=None)``) and initialised at the prior's mode
    :math:`\exp(\sqrt2 + \tfrac12 \log d - 3)`.

    Args:
        d: number of input dimensions (one lengthscale each).
        family: ``"rbf"`` (default), ``"matern52"`` or ``"matern32"`` (see :data:`FAMILIES`).
        layout: row order of the covariance, ``"block"`` or ``"interleaved"``; default ``"block"``
            for ``botorch=False`` and ``"interleaved"`` (GPyTorch's order) for ``botorch=True``.
        botorch: build the BoTorch model's default instead of DerivativeGP's.
        batch_shape: hyperparameters per batch member (batched BoTorch models, as ``SingleTaskGP``).

    Returns:
        A new kernel whose matrices are `n (1 + d) x n (1 + d)` for `n` points.

    Raises:
        ValueError: ``d`` is not a positive integer, or ``family`` or ``layout`` is unknown.
        TypeError: ``botorch`` is not a bool.

    Example:
        >>> kernel = default_kernel(3)
        >>> type(kernel.base_kernel).__name__, kernel.base_kernel.lengthscale.shape
        ('DerivativeRBFKernel', torch.Size([1, 3]))
    """
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ValueError(f"d: expected a positive integer (the number of inputs), got {d!r}")
    if not isinstance(family, str) or family not in FAMILIES:
        raise ValueError(f"family: expected one of {sorted(FAMILIES)}, got {family!r}")
    if not isinstance(botorch, bool):
        raise TypeError(f"botorch: expected a bool, got {type(botorch).__name__}")
    if layout is None:
        layout = "interleaved" if botorch else "block"
    cls = FAMILIES[family]
    if botorch:
        prior = LogNormalPrior(loc=math.sqrt(2) + 0.5 * math.log(d), scale=math.sqrt(3))
        constraint = GreaterThan(BOTORCH_MIN_LENGTHSCALE, transform=None, initial_value=prior.mode)
        return cls(
            layout=layout,
            ard_num_dims=d,
            batch_shape=batch_shape,
            lengthscale_prior=prior,
            lengthscale_constraint=constraint,
        )
    kernel = ScaleKernel(cls(layout=layout, ard_num_dims=d, batch_shape=batch_shape), batch_shape=batch_shape)
    kernel.base_kernel.lengthscale = INITIAL_LENGTHSCALE
    kernel.outputscale = INITIAL_OUTPUTSCALE
    return kernel
