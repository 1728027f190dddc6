"""Gaussian observation noise with one variance per observation kind."""

from __future__ import annotations

import copy

import torch
from gpytorch.constraints import GreaterThan
from gpytorch.module import Module
from gpytorch.priors import LogNormalPrior, Prior
from torch import Tensor

__all__ = ["DerivativeGaussianNoise", "default_noise_prior"]


def default_noise_prior() -> Prior:
    r"""The noise prior of :class:`~gpderiv.DerivativeGP` with ``noise_prior=True`` (internal units).

    :math:`\sigma^2 \sim \mathrm{LogNormal}(-4, 1)`, BoTorch's default for ``SingleTaskGP``: median
    :math:`e^{-4} \approx 0.018` of the variance of the standardised data, 95 % of the mass between
    0.0026 and 0.13. Without it, a maximum-likelihood fit to a few noisy points sometimes drives a
    noise variance to its lower bound; with it, the noise of exact data is over-estimated
    (docs/reliability.md, "Calibration").
    """
    return LogNormalPrior(loc=-4.0, scale=1.0)


class _Variance:
    """The prior's closure: the learned variance of one group (a class, not a lambda: models are deep-copied)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, module: DerivativeGaussianNoise) -> Tensor:
        return module._variance(self.name)


class DerivativeGaussianNoise(Module):
    r"""Independent Gaussian noise: :math:`\sigma_0^2` on values, :math:`\sigma_a^2` on :math:`\partial_a f`.

    Variances live in the model's internal units. Each group (values, derivatives) is either
    learned, with a positive lower bound (a ``GreaterThan`` constraint), or known and fixed.

    Args:
        d: input dimension.
        shared_grad_noise: one variance for all derivative dimensions instead of one per dimension.
        lower_bound: lower bound of learned variances (internal units, i.e. relative to Var(y)).
        value_noise: known value-noise variance (internal units), or None to learn it.
        grad_noise: known derivative-noise variance, scalar or `d` (internal units), or None to learn
            (``shared_grad_noise`` then does not apply).
        directional: learn a variance for directional-derivative observations.
        hessian: learn a variance for second-derivative observations.
        initial: initial value of learned variances; raised to twice ``lower_bound`` when it is
            not above that, so that every learned variance starts inside its bounds (the constraint's
            inverse transform of a value below the bound is NaN).
        prior: a prior of each learned variance (each group gets its own copy), or None; see
            :func:`default_noise_prior`.
    """

    def __init__(
        self,
        d: int,
        *,
        shared_grad_noise: bool = False,
        lower_bound: float = 1e-6,
        value_noise: Tensor | None = None,
        grad_noise: Tensor | None = None,
        directional: bool = False,
        hessian: bool = False,
        initial: float = 1e-2,
        prior: Prior | None = None,
    ) -> None:
        super().__init__()
        self.d = d
        groups = [("value", value_noise, 1), ("grad", grad_noise, 1 if shared_grad_noise else d)]
        groups += [(name, None, 1) for name, wanted in (("directional", directional), ("hessian", hessian)) if wanted]
        self._groups = [name for name, _, _ in groups]
        start = max(initial, min(2.0 * lower_bound, torch.finfo(torch.float64).max))
        for name, known, size in groups:
            if known is not None:
                self.register_buffer(f"fixed_{name}_noise", torch.as_tensor(known, dtype=torch.float64).reshape(-1))
                continue
            self.register_buffer(f"fixed_{name}_noise", None)
            self.register_parameter(f"raw_{name}_noise", torch.nn.Parameter(torch.zeros(size, dtype=torch.float64)))
            constraint = GreaterThan(lower_bound)
            self.register_constraint(f"raw_{name}_noise", constraint)
            raw = constraint.inverse_transform(torch.tensor(start, dtype=torch.float64))
            with torch.no_grad():
                getattr(self, f"raw_{name}_noise").fill_(raw.item())
            if prior is not None:
                self.register_prior(f"{name}_noise_prior", copy.deepcopy(prior), _Variance(name))

    def _variance(self, name: str) -> Tensor:
        fixed = getattr(self, f"fixed_{name}_noise")
        if fixed is not None:
            return fixed
        raw = getattr(self, f"raw_{name}_noise")
        return getattr(self, f"raw_{name}_noise_constraint").transform(raw)

    @property
    def value_noise(self) -> Tensor:
        """`1` variance of value observations."""
        return self._variance("value")

    @property
    def grad_noise(self) -> Tensor:
        """`d` variances of the partial-derivative observations."""
        return self._variance("grad").expand(self.d)

    @property
    def shared_grad_noise(self) -> bool:
        """Whether every partial derivative has the same noise variance by construction.

        A learned variance is shared only when it is one parameter (``shared_grad_noise=True``):
        equal values of separate parameters would get separate gradients. A known variance is
        shared when its values are equal.
        """
        raw = getattr(self, "raw_grad_noise", None)
        if raw is not None:
            return raw.numel() == 1
        return bool((self.grad_noise == self.grad_noise[0]).all())

    def extra_noise(self, name: str) -> Tensor:
        """`1` variance of the ``"directional"`` or ``"hessian"`` group (0 if the model has none)."""
        return self._variance(name) if name in self._groups else self.value_noise.new_zeros(1)

    @torch.no_grad()
    def set_from_errors(self, sums: Tensor, counts: Tensor) -> None:
        r"""Set each learned variance to the mean expected squared error of its rows.

        For independent Gaussian noise, :math:`\sigma^2 = \tfrac1{|G|}\sum_{i \in G} e_i` maximises
        :math:`-\tfrac12\sum_{i \in G}[\log 2\pi\sigma^2 + e_i/\sigma^2]` (an EM step of a bound).
        Known variances and groups without rows keep their values; results are kept above twice
        the lower bound, where the constraint's transform still has a useful gradient.

        Args:
            sums: `d + 3` sums of :math:`e_i` per row kind (:meth:`row_noise`'s kinds).
            counts: `d + 3` rows per kind.
        """
        d = self.d
        kinds = {"value": [[0]], "directional": [[d + 1]], "hessian": [[d + 2]]}
        kinds["grad"] = [list(range(1, d + 1))] if self.shared_grad_noise else [[1 + a] for a in range(d)]
        for name in self._groups:
            raw = getattr(self, f"raw_{name}_noise", None)
            if raw is None:
                continue
            constraint = getattr(self, f"raw_{name}_noise_constraint")
            floor = 2.0 * float(constraint.lower_bound)
            for position, group in enumerate(kinds[name]):
                count = counts[group].sum()
                if count > 0:
                    value = (sums[group].sum() / count).clamp_min(floor).to(raw)
                    raw[position] = constraint.inverse_transform(value)

    def kind_noise(self) -> Tensor:
        """`d + 3` noise variance of each row kind (:meth:`row_noise`'s kinds; 0 for a kind the model lacks)."""
        extra = [self.extra_noise("directional"), self.extra_noise("hessian")]
        return torch.cat([self.value_noise, self.grad_noise, *extra])

    def row_noise(self, kinds: Tensor) -> Tensor:
        """`N` noise variance of each observed row, given its kind.

        Kinds: 0 value, ``1 + a`` partial ``a``, ``d + 1`` directional, ``d + 2`` Hessian entry.
        """
        return self.kind_noise()[kinds]
