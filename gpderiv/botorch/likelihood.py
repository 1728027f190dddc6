"""Gaussian noise on values and on partial derivatives, BoTorch's noise priors and bounds."""

from __future__ import annotations

from typing import Any

import torch
from botorch.models.utils.gpytorch_modules import MIN_INFERRED_NOISE_LEVEL
from gpytorch.constraints import GreaterThan, Interval
from gpytorch.likelihoods.gaussian_likelihood import _GaussianLikelihoodBase
from gpytorch.likelihoods.noise_models import Noise
from gpytorch.priors import LogNormalPrior, Prior
from linear_operator.operators import DiagLinearOperator
from torch import Tensor

__all__ = ["DerivativeGaussianLikelihood"]


class _OutputNoise(Noise):
    """Learned variances: one for values, one shared by all partial derivatives (per batch member)."""

    def __init__(
        self,
        d: int,
        batch_shape: torch.Size | None = None,
        noise_prior: Prior | None = None,
        noise_constraint: Interval | None = None,
    ) -> None:
        super().__init__()
        self.d = d
        batch_shape = torch.Size() if batch_shape is None else batch_shape
        default = noise_prior is None and noise_constraint is None
        prior = LogNormalPrior(loc=-4.0, scale=1.0) if default else noise_prior
        if noise_constraint is None:
            initial = prior.mode if prior is not None else None
            noise_constraint = GreaterThan(MIN_INFERRED_NOISE_LEVEL, transform=None, initial_value=initial)
        self.register_parameter("raw_noise", torch.nn.Parameter(torch.zeros(*batch_shape, 2)))
        if prior is not None:
            self.register_prior("noise_prior", prior, lambda m: m.noise)
        self.register_constraint("raw_noise", noise_constraint)
        # Start at the prior's mode (BoTorch's default), else at 1e-2 inside the constraint.
        start = prior.mode if prior is not None else torch.tensor(1e-2)
        start = torch.as_tensor(start).clamp(noise_constraint.lower_bound, noise_constraint.upper_bound)
        with torch.no_grad():
            self.raw_noise.fill_(noise_constraint.inverse_transform(start).item())

    @property
    def noise(self) -> Tensor:
        """`batch x 2` variances: values, derivatives."""
        return self.raw_noise_constraint.transform(self.raw_noise)

    @noise.setter
    def noise(self, value: Tensor) -> None:
        value = torch.as_tensor(value, dtype=self.raw_noise.dtype, device=self.raw_noise.device)
        self.initialize(raw_noise=self.raw_noise_constraint.inverse_transform(value.expand_as(self.raw_noise)))

    def per_output(self) -> Tensor:
        """`batch x (1 + d)` variances of ``[f, df/dx_1, ..., df/dx_d]``."""
        noise = self.noise
        return torch.cat([noise[..., :1], noise[..., 1:].expand(*noise.shape[:-1], self.d)], -1)

    def forward(self, *params: Any, shape: torch.Size | None = None, **kwargs: Any) -> DiagLinearOperator:
        """Value noise on each of `shape[-1]` rows.

        GPyTorch applies the likelihood to the model's ``forward``, the prior over values; the
        model adds derivative noise itself, per output.
        """
        rows = 1 if shape is None else shape[-1]
        value = self.noise[..., :1]
        return DiagLinearOperator(value.expand(*value.shape[:-1], rows))


class DerivativeGaussianLikelihood(_GaussianLikelihoodBase):
    r"""Gaussian noise on values (:math:`\sigma_0^2`) and on partial derivatives (:math:`\sigma_1^2`).

    Learned by default, each with BoTorch's ``LogNormal(-4, 1)`` prior and a lower bound of
    ``1e-4`` (outcome-transformed units), as SingleTaskGP's noise, one pair per batch member. With
    ``train_Yvar`` the variance of every training entry is known and fixed instead.

    This is the noise model the shared engines understand, so it is the one kind of likelihood
    :class:`~gpderiv.botorch.DerivativeGPModel` accepts (``likelihood=``): build one with another
    prior or constraint to change how the noise is learned.

    Example:
        >>> likelihood = DerivativeGaussianLikelihood(d, noise_prior=GammaPrior(1.1, 0.05))
        >>> model = DerivativeGPModel(train_X, train_Y, likelihood=likelihood)

    Args:
        d: input dimension.
        train_Yvar: `batch x n x (1 + d)` known variances (model units), or None to learn them.
        batch_shape: batch shape of the learned variances.
        noise_prior: prior on both learned variances (model units), or None: BoTorch's
            ``LogNormal(-4, 1)`` when ``noise_constraint`` is None too, else no prior.
        noise_constraint: constraint on both learned variances (default ``GreaterThan(1e-4)``).
    """

    def __init__(
        self,
        d: int,
        train_Yvar: Tensor | None = None,
        batch_shape: torch.Size | None = None,
        noise_prior: Prior | None = None,
        noise_constraint: Interval | None = None,
    ) -> None:
        super().__init__(noise_covar=_OutputNoise(d, batch_shape, noise_prior, noise_constraint))
        self.d = d
        if train_Yvar is not None:
            self.noise_covar.raw_noise.requires_grad_(False)
        self.register_buffer("train_Yvar", train_Yvar, persistent=False)  # data, not a hyperparameter

    @property
    def noise(self) -> Tensor:
        """`batch x 2` learned variances (model units): values, derivatives."""
        return self.noise_covar.noise

    @noise.setter
    def noise(self, value: Tensor) -> None:
        self.noise_covar.noise = value

    def output_noise(self) -> Tensor:
        """`... x 1 x (1 + d)` variance of a new observation of each output."""
        if self.train_Yvar is None:
            return self.noise_covar.per_output().unsqueeze(-2)
        return self.train_Yvar.nanmean(-2, keepdim=True).nan_to_num(0.0)

    def train_noise(self, shape: torch.Size) -> Tensor:
        """`batch x n x (1 + d)` variances of the training entries."""
        noise = self.output_noise() if self.train_Yvar is None else self.train_Yvar
        return noise.expand(shape)
