"""DerivativeGPModel: BoTorch's model contract over the shared engines (see :mod:`gpderiv.botorch`)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from botorch.fit import fit_gpytorch_mll
from botorch.models.gpytorch import GPyTorchModel
from botorch.models.model import FantasizeMixin
from botorch.models.transforms.input import AffineInputTransform
from botorch.models.utils.assorted import fantasize as fantasize_flag
from botorch.posteriors.gpytorch import GPyTorchPosterior
from botorch.sampling.base import MCSampler
from botorch.settings import propagate_grads
from gpytorch.distributions import MultivariateNormal
from gpytorch.means import ConstantMean, Mean
from gpytorch.mlls import ExactMarginalLogLikelihood
from gpytorch.models import GP
from torch import Tensor

from gpderiv._validation import check_hyperparameters
from gpderiv.botorch.likelihood import DerivativeGaussianLikelihood
from gpderiv.botorch.transforms import DerivativeStandardize, affine_posterior
from gpderiv.botorch.validation import check_indices, check_scaling, validate_tensor_args
from gpderiv.inference import Engine, Factor, FactorCache, engine_names, get_engine, resolve_engine
from gpderiv.inference.threads import threads_for
from gpderiv.kernels import default_kernel
from gpderiv.kernels.composition import derivative_leaves
from gpderiv.observations import ObservationSet
from gpderiv.observed_rows import ObservedRows
from gpderiv.scaling import scale_limits

__all__ = ["DerivativeGPModel"]


def _block(Y: Tensor, has_grad: bool) -> Tensor:
    """`... x n (1 + d)` block-layout vector ``[f, grad f point-major]`` of `... x n x (1 + d)` entries."""
    return torch.cat([Y[..., 0], Y[..., 1:].flatten(-2)], -1) if has_grad else Y[..., 0]


def _observed_rows(X: Tensor, Y: Tensor) -> ObservedRows:
    """The observed (non-NaN) entries of `batch x n x (1 + d)` ``Y`` at `batch x n x d` ``X`` as engine rows.

    The batch members miss the same entries (checked by :func:`~gpderiv.botorch.validation.validate_tensor_args`).
    """
    d = X.shape[-1]
    obs = ObservationSet.from_data(Y.reshape(-1, *Y.shape[-2:])[0, :, 0], Y.reshape(-1, *Y.shape[-2:])[0, :, 1:], d)
    standard = obs.standard_functionals(X.dtype)
    targets = _block(Y, obs.has_grad)[..., obs.rows]
    hi = scale_limits(targets.dtype)[1]
    if targets.numel() and bool((targets.abs() > hi).any()):  # model units: standardised, chain-ruled
        raise ValueError(
            f"train_Y: expected observations within {hi:.1e} of the prior mean after the outcome and input "
            f"transforms (posterior variances scale with their square), got {targets.abs().max().item():.3g}; "
            "rescale the objective or its gradients (e.g. with DerivativeStandardize and Normalize)"
        )
    return ObservedRows(X, obs.has_grad, obs.rows, standard.idx[:, 0], standard.point, kinds=obs.kinds, targets=targets)


def _test_rows(X: Tensor, outputs: list[int]) -> ObservedRows:
    """Rows of the outputs ``[f, df/dx_1, ...][outputs]`` at `batch x q x d` ``X``, interleaved (point-major)."""
    q, d = X.shape[-2:]
    point = torch.arange(q, device=X.device).unsqueeze(-1)
    out = torch.tensor(outputs, device=X.device)
    has_grad = outputs != [0]
    rows = torch.where(out == 0, point, q + point * d + out - 1).reshape(-1) if has_grad else point.reshape(-1)
    idx = torch.stack([(out - 1).expand(q, -1).reshape(-1), torch.full_like(rows, -1)], -1)
    return ObservedRows(X, has_grad, rows, idx, point.expand(q, len(outputs)).reshape(-1))


def _check_likelihood(likelihood: Any, train_X: Tensor, train_Yvar: Tensor | None) -> None:
    """A user's likelihood: a DerivativeGaussianLikelihood of the model's d and batch shape that learns its noise."""
    if likelihood is None:
        return
    if not isinstance(likelihood, DerivativeGaussianLikelihood):
        raise TypeError(
            "likelihood: expected a gpderiv.botorch.DerivativeGaussianLikelihood (noise on values and on derivatives, "
            f"the noise model the engines understand), got {type(likelihood).__name__}"
        )
    d, batch, own = train_X.shape[-1], tuple(train_X.shape[:-2]), tuple(likelihood.noise.shape[:-1])
    # A likelihood without batch shape is shared by the batch members (as SingleTaskGP allows).
    if likelihood.d != d or own not in ((), batch):
        raise ValueError(
            f"likelihood: expected DerivativeGaussianLikelihood(d={d}, batch_shape={batch} or ()) like train_X, "
            f"got d={likelihood.d}, batch_shape={own}"
        )
    if train_Yvar is not None or likelihood.train_Yvar is not None:
        raise ValueError(
            "likelihood: expected a likelihood that learns its noise, without train_Yvar (known variances fix the "
            "noise: pass train_Yvar alone for them), got known variances"
        )


class DerivativeGPModel(GPyTorchModel, GP, FantasizeMixin):
    r"""Exact GP on values and gradients, a BoTorch ``Model`` (d-EI, d-KG, d-UCB...).

    Example:
        >>> model = DerivativeGPModel(train_X, train_Y)  # train_Y = [f, df/dx_1, ..., df/dx_d]
        >>> fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))  # or model.fit()
        >>> acqf = qLogNoisyExpectedImprovement(model, X_baseline=train_X)
        >>> candidate, _ = optimize_acqf(acqf, bounds, q=2, num_restarts=8, raw_samples=256)
        >>> model.posterior(X, output_indices=[1, 2]).mean  # batch x q x 2 gradient means

    Args:
        train_X: `batch x n x d` (or `n x d`) inputs.
        train_Y: `batch x n x (1 + d)` observations ``[f, df/dx_1, ..., df/dx_d]``; NaN = not observed.
        train_Yvar: known observation variances in the shape of ``train_Y`` (original units), or
            None to learn one variance for values and one for derivatives.
        covar_module: a derivative kernel in ``layout="interleaved"`` (default: ARD
            DerivativeRBFKernel with SingleTaskGP's dimension-scaled lengthscale prior).
        input_transform: an affine input transform (``Normalize``, ``InputStandardize``), or None.
        outcome_transform: a :class:`DerivativeStandardize` (the default) or None.
        outputs: indices of the model's outputs among ``[f, df/dx_1, ..., df/dx_d]`` (default ``[0]``).
        inference: the inference engine, as for :class:`~gpderiv.DerivativeGP`: ``"auto"``
            (:func:`gpderiv.inference.select_engine`), ``"dense"``, ``"iterative"``, ``"structured"``
            or any name registered with :func:`gpderiv.inference.register_engine`. Conditioning and
            fantasies grow the engine's factor by the new rows (:meth:`~gpderiv.inference.Factor.extend`);
            ``"variational"`` gives posteriors (and so analytic and Monte Carlo acquisition functions
            without fantasies) but refuses conditioning and fantasies, which its approximation does
            not define.
        likelihood: a :class:`~gpderiv.botorch.DerivativeGaussianLikelihood` (e.g. with another
            noise prior or constraint), or None for the default one (BoTorch's noise prior, or the
            known ``train_Yvar``). Other likelihoods are refused: the shared engines need the noise
            of value rows and of derivative rows, which a plain ``GaussianLikelihood`` does not give.
        mean_module: a GPyTorch ``Mean`` of the objective (default ``ConstantMean``), in model
            units. Its gradient, the prior mean of the derivative outputs, is taken by autograd
            (zero for a constant mean).
        inference_options: keyword options of the engine, as for :class:`~gpderiv.DerivativeGP`.

    As ``SingleTaskGP``, the constructor warns (``botorch.exceptions.InputDataWarning``) on
    float32 inputs, and, with the default kernel only, on inputs outside the unit cube after the
    input transform (``check_min_max_scaling``) or observed values that are not standardised
    after the outcome transform (``check_standardization`` on the value column: the gradient
    columns are scaled but never centred); ``botorch.settings.validate_input_scaling(False)``
    turns the scaling checks off.

    Attributes:
        engine: the inference engine (:class:`~gpderiv.inference.Engine`); ``inference`` its name.

    Raises:
        ValueError: shapes that do not match, a kernel in block layout, no finite observation.
        TypeError: a transform that is not derivative-aware, a likelihood that is not a
            DerivativeGaussianLikelihood, a mean_module that is not a GPyTorch Mean.
    """

    def __init__(
        self,
        train_X: Tensor,
        train_Y: Tensor,
        train_Yvar: Tensor | None = None,
        covar_module: Any | None = None,
        input_transform: AffineInputTransform | None = None,
        outcome_transform: DerivativeStandardize | None | str = "default",
        outputs: Sequence[int] | None = None,
        inference: str = "auto",
        likelihood: DerivativeGaussianLikelihood | None = None,
        mean_module: Mean | None = None,
        inference_options: dict[str, Any] | None = None,
    ) -> None:
        train_X, train_Y, train_Yvar = validate_tensor_args(
            train_X, train_Y, train_Yvar, names=("train_X", "train_Y", "train_Yvar")
        )
        _check_likelihood(likelihood, train_X, train_Yvar)
        if mean_module is not None and not isinstance(mean_module, Mean):
            raise TypeError(f"mean_module: expected a gpytorch.means.Mean, got {type(mean_module).__name__}")
        if inference != "auto" and inference not in engine_names():
            raise ValueError(f"inference: expected 'auto' or one of {engine_names()}, got {inference!r}")
        d, batch = train_X.shape[-1], train_X.shape[:-2]
        super().__init__()
        self.d = d
        # The model's dtype and device, whatever its modules hold (a ZeroMean holds no parameter).
        self.register_buffer("_reference", train_X.new_empty(0), persistent=False)
        if outcome_transform == "default":
            outcome_transform = DerivativeStandardize(d)
        self._check_transforms(d, input_transform, outcome_transform)
        if input_transform is not None:
            self.input_transform = input_transform.to(train_X)
            input_transform.train()
            input_transform(train_X)  # learns e.g. Normalize's bounds from the training inputs
            input_transform.eval()
        if outcome_transform is not None:
            self.outcome_transform = outcome_transform.to(train_X)
            outcome_transform.train()
            outcome_transform(train_Y)  # learns mu, sigma of the values
            outcome_transform.eval()
        default_covar = covar_module is None
        # One set of hyperparameters per batch member, as SingleTaskGP.
        covar_module = default_kernel(d, botorch=True, batch_shape=batch) if default_covar else covar_module
        self._check_kernel(covar_module)
        self.covar_module = covar_module.to(train_X)
        self.mean_module = (ConstantMean(batch_shape=batch) if mean_module is None else mean_module).to(train_X)
        X_t, Y_t, Yvar_t = self._to_model_units(train_X, train_Y, train_Yvar)
        if default_covar:  # as SingleTaskGP: a custom kernel may have its own idea of scale
            check_scaling(X_t, Y_t)
        if likelihood is None:
            likelihood = DerivativeGaussianLikelihood(d, Yvar_t, batch_shape=batch)
        self.likelihood = likelihood.to(train_X)
        self._outputs = [0] if outputs is None else check_indices(outputs, "outputs", d)
        self._has_transformed_inputs = False
        self._set_data(train_X, X_t, Y_t)
        self.engine: Engine = resolve_engine(
            inference,
            self.covar_module,
            self._rows,
            shared_grad_noise=self._shared_noise(),
            dtype=train_X.dtype,
            device=train_X.device,
            noise_by_kind=self._noise_by_kind(),
            options=inference_options,
        )
        self.inference = self.engine.name
        #: The engine's trainable state (the variational engine's inducing variables), or None.
        self.engine_state = self.engine.make_state(self.covar_module, self._rows)
        self.to(train_X)

    # ------------------------------------------------------------------ data and transforms

    def _set_data(self, X: Tensor, X_t: Tensor, Y_t: Tensor) -> None:
        self._train_X = X
        self._train_X_model = X_t
        self._train_Y_model = Y_t
        # The engines' rows: data, not a submodule (no state-dict entries, shared by copies).
        self.__dict__["_rows"] = _observed_rows(X_t, Y_t)
        self._cache = FactorCache()  # the engine's factor of the training rows
        self._grown = FactorCache()  # a conditioned model's: its parent's factor grown by the new rows

    @property
    def train_inputs(self) -> tuple[Tensor]:
        """``(train_X,)`` in the model's (input-transformed) units, as BoTorch's models keep them."""
        return (self._train_X_model,)

    @property
    def train_targets(self) -> Tensor:
        """`batch x n x (1 + d)` training observations in the original units (NaN = not observed)."""
        loc, scale = self._output_affine()
        return loc + scale * self._train_Y_model

    @property
    def num_outputs(self) -> int:
        """Number of outputs returned by :meth:`posterior` by default."""
        return len(self._outputs)

    def _set_transformed_inputs(self) -> None:
        """Training inputs are stored transformed once (affine transforms only), nothing to swap."""

    def _revert_to_original_inputs(self) -> None:
        """See :meth:`_set_transformed_inputs`."""

    @staticmethod
    def _check_transforms(d: int, input_transform: Any, outcome_transform: Any) -> None:
        if input_transform is not None and not isinstance(input_transform, AffineInputTransform):
            raise TypeError(
                "input_transform: expected an affine transform (Normalize, InputStandardize, AffineInputTransform), "
                f"whose effect on gradients is a fixed scaling, got {type(input_transform).__name__}"
            )
        if outcome_transform is not None and not isinstance(outcome_transform, DerivativeStandardize):
            raise TypeError(
                "outcome_transform: expected gpderiv.botorch.DerivativeStandardize or None (BoTorch's Standardize "
                f"would centre the gradient columns), got {type(outcome_transform).__name__}"
            )
        if isinstance(outcome_transform, DerivativeStandardize) and outcome_transform.d != d:
            raise ValueError(f"outcome_transform: expected DerivativeStandardize(d={d}), got d={outcome_transform.d}")

    @staticmethod
    def _check_kernel(kernel: Any) -> None:
        leaves = derivative_leaves(kernel)
        if not leaves:
            raise TypeError(
                f"covar_module: expected a gpderiv derivative kernel (or sums/ScaleKernels of them), got "
                f"{type(kernel).__name__}"
            )
        if any(leaf.layout != "interleaved" for leaf in leaves):
            raise ValueError("covar_module: expected layout='interleaved' (BoTorch's [f, grad f] per point order)")
        check_hyperparameters("covar_module", kernel)

    def _input_coefficient(self) -> Tensor:
        """`... x 1 x d` factor ``c`` of the affine input map ``u = (x - offset) / c`` (ones without one)."""
        transform = getattr(self, "input_transform", None)
        if transform is None:
            ref = self._reference
            return torch.ones(1, self.d, dtype=ref.dtype, device=ref.device)
        return transform.coefficient

    def _output_affine(self) -> tuple[Tensor, Tensor]:
        r"""`... x 1 x (1 + d)` ``loc, scale`` with outputs (original units) ``= loc + scale * model outputs``.

        Values: :math:`\mu + \sigma \tilde f`; derivatives:
        :math:`\partial_{x_a} f = (\sigma / c_a) \partial_{u_a} \tilde f`.
        """
        coef = self._input_coefficient()
        ratio = torch.cat([torch.ones_like(coef[..., :1]), 1.0 / coef], -1)
        transform = getattr(self, "outcome_transform", None)
        if transform is None:
            return torch.zeros_like(ratio), ratio
        loc, scale = transform.affine()
        return loc, scale * ratio

    def _transform_X(self, X: Tensor) -> Tensor:
        transform = getattr(self, "input_transform", None)
        if transform is None:
            return X
        was_training = transform.training
        transform.eval()
        try:
            return transform.transform(X)
        finally:
            transform.train(was_training)

    def _to_model_units(
        self, X: Tensor, Y: Tensor, Yvar: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Inputs, outcomes and (original-unit) variances in the model's units."""
        X_t = self._transform_X(X)
        loc, scale = self._output_affine()
        Y_t = (Y - loc) / scale
        return X_t, Y_t, None if Yvar is None else Yvar / scale**2

    # ------------------------------------------------------------------ inference (the shared engines)

    def _row_noise(self, rows: ObservedRows, Yvar: Tensor | None) -> Tensor:
        """`batch x N` noise variances of ``rows``: learned per kind, or ``Yvar`` (`batch x n x (1 + d)`) if known."""
        if Yvar is None:
            return self.likelihood.noise[..., (rows.kinds > 0).long()]
        return _block(Yvar, rows.has_grad)[..., rows.rows]

    def _prior_mean(self, X_t: Tensor) -> Tensor:
        r"""`batch x n x (1 + d)` prior mean of ``[f, grad f]`` at `batch x n x d` ``X_t`` (model units).

        :math:`[m(x), \nabla m(x)]`: a ``ConstantMean`` gives ``[c, 0, ..., 0]``; any other mean is
        differentiated by autograd (each point's mean depends on that point only, so the
        gradient of the sum is every point's gradient), keeping the graph to the mean's
        hyperparameters and to ``X_t``.
        """
        mean = self.mean_module
        if type(mean) is ConstantMean:
            c = mean.constant.unsqueeze(-1).expand(*mean.constant.shape, X_t.shape[-2]).unsqueeze(-1)
            return torch.cat([c, torch.zeros_like(c).expand(*c.shape[:-1], self.d)], -1)
        tracking = torch.is_grad_enabled()
        # Every batch member its own copy of the points, so the gradient of the sum is per member.
        batch = torch.broadcast_shapes(X_t.shape[:-2], self._train_X.shape[:-2])
        with torch.enable_grad():
            x = X_t.expand(*batch, *X_t.shape[-2:])
            x = x if x.requires_grad else x.detach().clone().requires_grad_(True)
            value = mean(x).expand(x.shape[:-1])
            grad = None
            if value.requires_grad:  # else the mean does not depend on x (ZeroMean)
                (grad,) = torch.autograd.grad(value.sum(), x, create_graph=tracking, allow_unused=True)
        grad = torch.zeros_like(x) if grad is None else grad
        out = torch.cat([value.unsqueeze(-1), grad], -1)
        return out if tracking else out.detach()

    def _residual(self, rows: ObservedRows) -> Tensor:
        """`batch x N` targets of ``rows`` minus their prior mean."""
        return rows.targets - _block(self._prior_mean(rows.X), rows.has_grad)[..., rows.rows]

    def _system(self) -> tuple[Any, ObservedRows, Tensor, Tensor]:
        """What the engine receives: kernel, training rows, their noise and residual (model units)."""
        rows = self._rows
        return self.covar_module, rows, self._row_noise(rows, self.likelihood.train_Yvar), self._residual(rows)

    def _hyperparameter_modules(self) -> tuple[torch.nn.Module, ...]:
        """What the factor depends on besides the data (its cache key; the transforms are fixed after construction)."""
        modules = (self.covar_module, self.mean_module, self.likelihood, self.engine_state)
        return tuple(m for m in modules if m is not None)

    def _shared_noise(self) -> bool:
        """One noise variance for all value rows and one for all derivative rows."""
        return self._noise_constant_over(lambda kinds: (kinds == 0, kinds > 0))

    def _noise_by_kind(self) -> bool:
        """One noise variance for all value rows and one per derivative dimension (the structured engine's scope)."""
        return self._noise_constant_over(lambda kinds: [kinds == k for k in range(self.d + 1)])

    def _noise_constant_over(self, groups_of: Any) -> bool:
        """Whether the rows' noise is constant within each group of row kinds that ``groups_of(kinds)`` selects."""
        Yvar = self.likelihood.train_Yvar
        if Yvar is None:
            return True  # learned: one parameter per group by construction
        rows = self._rows
        noise = self._row_noise(rows, Yvar)
        groups = [noise[..., mask] for mask in groups_of(rows.kinds)]
        return all(bool((g == g[..., :1]).all()) for g in groups if g.numel())

    def _factor(self) -> Factor:
        """The engine's factor of the training rows, reused while no hyperparameter changes.

        A conditioned (fantasy) model starts from its parent's factor grown by the new rows.
        Otherwise the factor is cached, built without autograd (like GPyTorch's detached test
        caches) so that repeated backward passes of acquisition functions never traverse it --
        unless the training data itself needs gradients (fantasies of candidate points), when it
        is recomputed with them.
        """
        modules = self._hyperparameter_modules()
        factor = self._grown.get(modules) or self._cache.get(modules)
        if factor is not None:
            return factor
        if self._train_X_model.requires_grad or self._train_Y_model.requires_grad:
            return self.engine.factor(*self._system())
        with torch.no_grad():
            return self._cache.put(modules, self.engine.factor(*self._system()))

    def log_marginal_likelihood(self) -> Tensor:
        """`batch` log marginal likelihood of the observed entries (model units), with gradients."""
        return -self.engine.negative_log_marginal(*self._system())

    def compute_custom_loss(self, mll: Any | None = None, **kwargs: Any) -> Tensor:
        """Negative log marginal likelihood plus log priors per observed entry (BoTorch's fitting hook).

        ``botorch.fit.fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))``
        calls this instead of GPyTorch's generic path, so fitting uses the exact masked covariance.
        """
        lml = self.log_marginal_likelihood().sum()
        for _, module, prior, closure, _ in self.named_priors():
            lml = lml + prior.log_prob(closure(module)).sum()
        return -lml / torch.isfinite(self._train_Y_model).sum().clamp_min(1)

    def fit(self, **kwargs: Any) -> DerivativeGPModel:
        """Fit hyperparameters (MAP) with ``botorch.fit.fit_gpytorch_mll``; returns ``self`` in eval mode.

        The same as ``fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))``:
        scipy's L-BFGS-B within the constraints' bounds, on the exact loss of
        :meth:`compute_custom_loss`, with BoTorch's retries from prior samples on failure.

        Args:
            **kwargs: passed to ``fit_gpytorch_mll`` (e.g. ``optimizer_kwargs``).
        """
        with threads_for(self._system_size(), self._train_X.device):  # small problems single-threaded (BO refits often)
            fit_gpytorch_mll(ExactMarginalLogLikelihood(self.likelihood, self), **kwargs)
        return self.eval()

    def _system_size(self) -> int:
        """Observed entries of one batch member: the size of its linear system, for the thread rule."""
        Y = self._train_Y_model
        return int(torch.isfinite(Y).sum()) // max(1, Y[..., 0, 0].numel())

    def forward(self, X: Tensor) -> MultivariateNormal:
        """Prior over the values ``f(X)`` (model units); the derivative model lives in :meth:`posterior`."""
        X_t = self._transform_X(X)
        mean = self._prior_mean(X_t)[..., 0]
        return MultivariateNormal(mean, self.covar_module.forward(X_t, X_t, grad1=False, grad2=False))

    def _moments(self, X_t: Tensor, outputs: list[int]) -> tuple[Tensor, Tensor]:
        """Posterior mean `batch x q x m` and interleaved covariance `batch x qm x qm` (model units)."""
        q = X_t.shape[-2]
        mean, cov = self._factor().posterior(_test_rows(X_t, outputs), "cov")
        prior = self._prior_mean(X_t)[..., outputs]
        return mean.reshape(*mean.shape[:-1], q, len(outputs)) + prior, cov

    def posterior(
        self,
        X: Tensor,
        output_indices: Sequence[int] | None = None,
        observation_noise: bool | Tensor = False,
        posterior_transform: Any | None = None,
        **kwargs: Any,
    ) -> GPyTorchPosterior:
        """Posterior over `batch x q x m` outputs at `batch x q x d` points, in original units.

        Args:
            X: `batch x q x d` (or `q x d`) points.
            output_indices: which of ``[f, df/dx_1, ..., df/dx_d]`` (indices 0..d) to return;
                None gives the model's outputs (``[0]`` unless set by ``outputs``/``subset_output``).
            observation_noise: add the observation noise of each output; or a `batch x q x m`
                tensor of variances (outcome-transformed units, as BoTorch expects).
            posterior_transform: applied last, e.g. ``ScalarizedPosteriorTransform``.
            **kwargs: ignored (BoTorch passes options through).

        Returns:
            A GPyTorchPosterior: an MVN for one output, a multitask MVN (interleaved) for several.
        """
        self.eval()
        outputs = self._outputs if output_indices is None else check_indices(output_indices, "output_indices", self.d)
        if not isinstance(observation_noise, (bool, Tensor)):
            raise TypeError(
                "observation_noise: expected a bool or a `batch x q x m` tensor of variances, got "
                f"{type(observation_noise).__name__}"
            )
        batch = self._train_X.shape[:-2]
        X, _, noise = validate_tensor_args(
            X,
            Yvar=observation_noise if isinstance(observation_noise, Tensor) else None,
            names=("X", "Y", "observation_noise"),
            d=self.d,
            like=self._train_X,
            batch_shape=batch,
            num_outputs=len(outputs),
        )
        with threads_for(self._system_size(), X.device):  # small problems single-threaded, as fit
            mean, cov = self._moments(self._transform_X(X), outputs)
        if observation_noise is not False:
            if noise is not None:
                noise = noise.expand_as(mean)
            else:
                noise = self.likelihood.output_noise()[..., outputs].expand_as(mean)
            cov = cov + torch.diag_embed(noise.flatten(-2))
        loc, scale = self._output_affine()
        posterior = affine_posterior(mean, cov, loc[..., outputs], scale[..., outputs])
        if posterior_transform is not None:
            return posterior_transform(posterior=posterior, X=X)
        return posterior

    # ------------------------------------------------------------------ BoTorch model API

    def condition_on_observations(self, X: Tensor, Y: Tensor, noise: Tensor | None = None, **kwargs: Any) -> Any:
        """A model with the same hyperparameters that has also observed ``Y`` (values and gradients) at ``X``.

        Args:
            X: `batch x n' x d` inputs (original units).
            Y: `batch' x n' x (1 + d)` observations ``[f, grad f]`` (original units; NaN = not
                observed), or `batch' x n' x 1` values only. Batch shapes broadcast with the model's.
            noise: variances in the shape of ``Y`` (outcome-transformed units, as in BoTorch);
                None uses the model's noise (learned, or the mean known variance per output).
            **kwargs: ignored (BoTorch passes options through).

        Returns:
            A DerivativeGPModel whose batch shape is the broadcast of the three batch shapes.
        """
        X, Y, noise = validate_tensor_args(
            X, Y, noise, d=self.d, like=self._train_X, batch_shape=self._train_X.shape[:-2]
        )
        self.eval()
        X_t, Y_t, _ = self._to_model_units(X, Y)
        batch = torch.broadcast_shapes(self._train_X.shape[:-2], X.shape[:-2], Y.shape[:-2])

        def grow(old: Tensor, new: Tensor) -> Tensor:
            return torch.cat([old.expand(*batch, *old.shape[-2:]), new.expand(*batch, *new.shape[-2:])], -2)

        fantasy = copy.deepcopy(self)
        known = self.likelihood.train_Yvar
        if known is not None:
            new_var = self.likelihood.output_noise().expand_as(Y_t) if noise is None else noise.expand_as(Y_t)
            fantasy.likelihood.train_Yvar = grow(known, new_var)
        elif noise is not None:
            # Known variances for the new entries only: keep the learned ones for the old entries.
            old_var = self.likelihood.train_noise(self._train_Y_model.shape).detach()
            known = grow(old_var, noise.expand_as(Y_t))
            fantasy.likelihood = DerivativeGaussianLikelihood(self.d, known).to(self._train_X)
        parent = self._factor()
        fantasy._set_data(grow(self._train_X, X), grow(self._train_X_model, X_t), grow(self._train_Y_model, Y_t))
        # Grow the parent's factor by the new rows instead of refactorising everything.
        n_old = self._train_X.shape[-2]
        new = _observed_rows(X_t.expand(*batch, *X_t.shape[-2:]), Y_t.expand(*batch, *Y_t.shape[-2:]))
        known = fantasy.likelihood.train_Yvar
        noise = fantasy._row_noise(new, None if known is None else known[..., n_old:, :])
        grown = parent.extend(new, noise, fantasy._residual(new), kernel=fantasy.covar_module)
        fantasy._grown.put(fantasy._hyperparameter_modules(), grown)
        kinds = {"shared_grad_noise": fantasy._shared_noise(), "noise_by_kind": fantasy._noise_by_kind()}
        if fantasy.engine.supports(fantasy.covar_module, fantasy._rows, **kinds):
            # Batched or partly observed rows beyond the engine's scope: should the fantasy ever be
            # refactorised (new hyperparameters, its marginal likelihood), the dense engine does it.
            fantasy.engine, fantasy.inference = get_engine("dense"), "dense"
        return fantasy

    def fantasize(
        self,
        X: Tensor,
        sampler: MCSampler,
        observation_noise: Tensor | None = None,
        **kwargs: Any,
    ) -> DerivativeGPModel:
        """Fantasy model conditioned on sampled values *and* gradients at ``X`` (d-KG's lookahead).

        Args:
            X: `batch x q x d` points (original units).
            sampler: draws `num_fantasies` samples of the `q x (1 + d)` noisy observations.
            observation_noise: `batch x q x (1 + d)` variances (transformed units) or None for the model's.
            **kwargs: ``propagate_grads`` as in BoTorch; others ignored.

        Returns:
            A model with batch shape ``sampler.sample_shape x batch``.
        """
        all_outputs = list(range(1 + self.d))
        with fantasize_flag(), propagate_grads(kwargs.pop("propagate_grads", False)):
            noise = True if observation_noise is None else observation_noise
            post = self.posterior(X, output_indices=all_outputs, observation_noise=noise)
            Y = sampler(post)
            new_noise = None if observation_noise is None else observation_noise.expand(Y.shape[1:])
            return self.condition_on_observations(X, Y, noise=new_noise)

    def subset_output(self, idcs: list[int]) -> DerivativeGPModel:
        """The same model whose outputs are ``[self outputs][idcs]`` (shares nothing with ``self``)."""
        idcs = check_indices(idcs, "idcs", self.num_outputs - 1)
        new = copy.deepcopy(self)
        new._outputs = [self._outputs[i] for i in idcs]
        return new

    def train(self, mode: bool = True) -> DerivativeGPModel:
        """Training mode (also of the transforms' modules); the transforms keep their learned statistics."""
        super().train(mode)
        for name in ("input_transform", "outcome_transform"):
            if hasattr(self, name):
                getattr(self, name).eval()  # statistics were learned at construction and stay fixed
        return self

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load hyperparameters and transform statistics; the training data is re-expressed in the new units."""
        Y = self.train_targets.detach()
        known = self.likelihood.train_Yvar
        Yvar = None if known is None else known * self._output_affine()[1] ** 2
        result = torch.nn.Module.load_state_dict(self, state_dict, strict=strict, assign=assign)
        X_t, Y_t, Yvar_t = self._to_model_units(self._train_X, Y, Yvar)
        if Yvar_t is not None:
            self.likelihood.train_Yvar = Yvar_t
        self._set_data(self._train_X, X_t, Y_t)
        return result

    def __deepcopy__(self, memo: dict[int, Any]) -> DerivativeGPModel:
        """Deep copy that shares the training data (never modified in place) and drops the caches.

        Sharing lets fantasy models, whose training data carries autograd history, be copied again.
        """
        for t in (self._train_X, self._train_X_model, self._train_Y_model):
            memo[id(t)] = t
        memo[id(self._rows)] = self._rows
        cache, grown = self._cache, self._grown
        self._cache, self._grown = FactorCache(), FactorCache()
        try:
            new = type(self).__new__(type(self))
            memo[id(self)] = new
            new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        finally:
            self._cache, self._grown = cache, grown
        return new
