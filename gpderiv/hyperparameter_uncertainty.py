r"""Hyperparameter uncertainty in predictions: a Laplace approximation propagated by the delta method.

A GP fitted by maximising the marginal likelihood predicts with the plug-in hyperparameters
:math:`\hat\theta`, as if they were known. On few points they are not: the lengthscales of a
15-point fit are often far from those of a 150-point fit of the same function, and the plug-in
95 % bands covered the truth 88-89 % of the time on average over such problems, single fits as
little as 30 %; with this correction 94 % (docs/reliability.md, "Calibration"). The predictive
distribution marginalised over :math:`\theta` has, by the law of total variance,

.. math::

    \operatorname{Var}[f_*] = \mathbb E_\theta\,\operatorname{Var}[f_* \mid \theta]
        + \operatorname{Var}_\theta\,\mathbb E[f_* \mid \theta]
    \approx \sigma_*^2(\hat\theta) + \sum_k \delta_k^2, \qquad
    \delta_k = \tfrac12\big(\mu_*(\hat\theta + c\,s_k) - \mu_*(\hat\theta - c\,s_k)\big),

with the Laplace approximation :math:`\theta \sim \mathcal N(\hat\theta, \sum_k s_k s_k^\top)`
(:mod:`gpderiv.inference.laplace`) and the posterior mean :math:`\mu_*` differenced along each
principal axis: the delta method :math:`c^2 J \Sigma J^\top` (:math:`J = \partial\mu_*/\partial\theta`)
by central differences at :math:`c` = :data:`SPREAD` standard deviations, which also catches some
of the curvature of :math:`\mu_*` in :math:`\theta` and widens the too narrow Laplace
approximation. The joint covariance gains :math:`\sum_k \delta_k \delta_k^\top` (positive
semi-definite); the posterior mean stays the plug-in one, and the first term keeps its plug-in
value (averaging it too changed coverage by less than 0.01 on the benchmark).

Cost: after each fit, `2P` gradient evaluations for the Hessian and `2P` factorisations at the
perturbed hyperparameters (`P` hyperparameters: `2d + 3` for the default model, with `d`
lengthscales, an output scale, the mean constant and `1 + d` noise variances); then `2P`
posterior means per prediction. Hence ``"auto"`` applies it to small problems only, where it
matters and is cheap (:data:`AUTO_ELEMENTS`).
"""

from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn.utils import parameters_to_vector

from gpderiv.inference import Factor, FactorCache
from gpderiv.inference.laplace import finite_difference_hessian, hessian_step, laplace_directions
from gpderiv.observed_rows import ObservedRows

if TYPE_CHECKING:
    from gpderiv.model import DerivativeGP

__all__ = ["AUTO_ELEMENTS", "HyperparameterUncertainty"]

#: ``"auto"`` applies the correction when the `2P` perturbed factorisations hold at most this many
#: numbers (`2P N^2`; 8 Mi = 64 MiB in float64): N up to about 770 rows for d = 2, 420 for d = 10.
AUTO_ELEMENTS = 2**23
#: The differences are taken at this many Laplace standard deviations (the variance term grows as
#: its square): an empirical widening, because the Laplace approximation is too narrow for the
#: skewed posteriors of lengthscales on few points. Over the 210 fits of
#: ``benchmarks/bench_calibration.py`` the 95 % bands covered f and grad f 0.933 and 0.926 of the
#: time at 2.0, 0.944 and 0.938 at 2.5, with no problem above 0.983 (plug-in: 0.894 and 0.879).
SPREAD = 2.5


def _assign(params: list[Tensor], x: Tensor) -> None:
    """Write ``x`` into ``params``, skipping those that hold it already (restoring after a refused write)."""
    offset = 0
    with torch.no_grad():
        for p in params:
            value = x[offset : offset + p.numel()].view_as(p)
            if not torch.equal(p, value):
                p.copy_(value)
            offset += p.numel()


class HyperparameterUncertainty:
    r"""The perturbed posteriors of one model, computed once per set of fitted hyperparameters.

    Args:
        setting: ``True`` (always), ``False`` (never: plug-in predictions) or ``"auto"`` (when
            the model is small enough, :data:`AUTO_ELEMENTS`). Never for engines with a stochastic
            marginal likelihood (its Hessian by differences would be noise), nor for unfitted models.
    """

    def __init__(self, setting: bool | str) -> None:
        self.setting = setting
        self._cache = FactorCache()
        self._warned = False  # recoveries warn once per model

    def applies(self, model: DerivativeGP) -> bool:
        """Whether predictions of ``model`` get the hyperparameter term now."""
        if self.setting is False or not model.fitted or model.engine.stochastic:
            return False
        if self.setting == "auto":
            # float64 only: in float32 the Hessian by differences of the gradient is mostly rounding.
            P = sum(p.numel() for p in model.parameters() if p.requires_grad)
            return model.train_X.dtype == torch.float64 and 2 * P * model.num_observations**2 <= AUTO_ELEMENTS
        return True

    def prepare(self, model: DerivativeGP) -> None:
        """Compute and cache the perturbed posteriors at the model's current hyperparameters."""
        self._perturbed(model)

    def _perturbed(self, model: DerivativeGP) -> list[tuple[Factor | None, Tensor]]:
        r"""``(factor, mean constant)`` at :math:`\hat\theta \pm c\,s_k`, k = 1..P (plus, minus, alternating)."""
        modules = (model.covar_module, model.mean_module, model.likelihood, model.data)
        cached = self._cache.get(modules)
        if cached is not None:
            return cached  # type: ignore[return-value]
        params = [p for p in model.parameters() if p.requires_grad]
        theta = parameters_to_vector(params).detach().clone()
        rows = model.num_observations

        def gradient(x: Tensor) -> Tensor:
            _assign(params, x)
            grads = torch.autograd.grad(model.loss() * rows, params, allow_unused=True)
            return torch.cat(
                [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads, strict=True)]
            )

        perturbed: list[tuple[Factor | None, Tensor]] = []
        failure, retry = None, False
        try:
            with torch.enable_grad(), warnings.catch_warnings():
                # Jitter and overflow warnings at perturbed hyperparameters are not about the user's model.
                warnings.simplefilter("ignore")
                hessian = finite_difference_hessian(gradient, theta, hessian_step(theta.dtype))
                if not bool(torch.isfinite(hessian).all()):
                    failure = "the Hessian of the loss at the fitted hyperparameters is not finite"
                directions = laplace_directions(hessian) if failure is None else hessian.new_zeros(theta.numel(), 0)
                for k in range(directions.shape[-1]):
                    for sign in (1.0, -1.0):
                        _assign(params, theta + sign * SPREAD * directions[:, k])
                        perturbed.append(self._factor_at(model))
        except RuntimeError as exc:
            # E.g. inside torch.inference_mode() or a torch.func transform (no autograd, no in-place
            # parameter updates) when the hyperparameters changed since fit(), or a failed loss.
            failure, retry = f"it could not be computed here ({type(exc).__name__}: {exc})", True
        finally:
            _assign(params, theta)
        if failure is not None:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"hyperparameter_uncertainty: {failure}, so the predicted variances are the plug-in ones, "
                    "without the hyperparameters' uncertainty (call model.prepare_uncertainty() outside such "
                    "contexts after changing hyperparameters)",
                    RuntimeWarning,
                    stacklevel=5,
                )
            if retry:
                return []  # not cached: a later call outside that context may succeed
        self._cache.put(modules, perturbed)  # type: ignore[arg-type]
        return perturbed

    @staticmethod
    def _factor_at(model: DerivativeGP) -> tuple[Factor | None, Tensor]:
        """The factor at the model's current hyperparameters, with its own copy of the kernel (None if it fails)."""
        constant = model.mean_module.constant.detach().clone()
        try:
            with torch.no_grad():
                kernel = copy.deepcopy(model.covar_module)
                return model.engine.factor(kernel, model.data, model.row_noise(), model.residual()), constant
        except (RuntimeError, ValueError):  # a failed factorisation (CholeskyError is a RuntimeError)
            return None, constant

    def spread(self, model: DerivativeGP, test: ObservedRows, center: Tensor, value_rows: int) -> Tensor:
        r"""`P x M` differences :math:`\delta_k` of the posterior mean of ``test`` rows (internal units).

        Args:
            model: the fitted model.
            test: `M` test rows.
            center: `M` plug-in posterior mean of ``test`` (zero prior mean), the fallback where
                a perturbed factorisation failed.
            value_rows: the first ``value_rows`` rows are values of f (they get the mean constant).
        """
        perturbed = self._perturbed(model)
        is_value = torch.zeros_like(center)
        is_value[:value_rows] = 1.0
        base = center + model.mean_module.constant.detach() * is_value

        def mean(entry: tuple[Factor | None, Tensor]) -> Tensor | None:
            factor, constant = entry
            return None if factor is None else factor.posterior(test, "mean")[0] + constant * is_value

        deltas = []
        for plus, minus in zip(perturbed[0::2], perturbed[1::2], strict=True):
            up, down = mean(plus), mean(minus)
            if up is not None and down is not None:
                deltas.append((up - down) / 2)
            elif up is not None or down is not None:  # one side failed to factorise: a one-sided difference
                deltas.append(up - base if up is not None else base - down)  # type: ignore[operator]
        return torch.stack(deltas) if deltas else center.new_zeros(0, center.numel())
