"""DerivativeGP: exact GP regression on values and partial derivatives."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import warnings
from typing import Any

import gpytorch
import torch
from gpytorch.distributions import MultivariateNormal
from gpytorch.kernels import Kernel, ScaleKernel
from gpytorch.means import ConstantMean
from scipy.spatial import cKDTree
from torch import Tensor
from tqdm.auto import tqdm

from gpderiv._validation import (
    as_column,
    as_directional,
    as_float_tensor,
    as_hessian,
    check_finite,
    known_noise,
    subset_points,
)
from gpderiv.blocks import rbf_derivative_matmul
from gpderiv.exceptions import ProblemTooLargeError
from gpderiv.fitting import minimize_adam, minimize_lbfgs
from gpderiv.inference import (
    DenseCholesky,
    DenseFactor,
    IsotropicRBFCovariance,
    IterativeCG,
    IterativeFactor,
    RBFDerivativeLinearOperator,
    StructuredFactor,
    StructuredWoodbury,
)
from gpderiv.kernels import DerivativeRBFKernel
from gpderiv.kernels.composition import check_derivative_kernel, derivative_leaves
from gpderiv.likelihoods import DerivativeGaussianNoise
from gpderiv.observations import DIRECTIONAL, HESSIAN, Functionals, ObservationSet, functional_cov
from gpderiv.persistence import load_model, save_model
from gpderiv.prediction import Prediction
from gpderiv.scaling import Scaling

__all__ = ["DerivativeGP"]

_ENGINES = {"dense": DenseCholesky, "iterative": IterativeCG, "structured": StructuredWoodbury}
#: Elements of one `chunk x N` cross-covariance in predict (64 MiB in float64).
_CHUNK_ELEMENTS = 2**23
#: inference="auto" picks the structured engine (when it applies) for at most this many points ...
AUTO_STRUCTURED_MAX_POINTS = 64
#: ... when d >= this many times n ...
AUTO_STRUCTURED_MIN_RATIO = 2
#: ... and there are at least this many observed rows n (1 + d) (below, dense takes milliseconds).
AUTO_STRUCTURED_MIN_ROWS = 1000
#: inference="auto" switches to the iterative engine, when the dense one does not fit in memory, up to
#: this many rows (one MLL step at N = 110,000, d = 10 took 10 min on 2 cores: docs/benchmarks.md).
AUTO_ITERATIVE_MAX_ROWS = 120_000
#: predict(variance="local") conditions each test point on the observations at this many nearest
#: training points. At d = 10, lengthscale 0.3 the standard deviations were at most 1.4 % (n = 1000)
#: and 4.5 % (n = 2000) above the exact ones, at 0.08-0.14 s per test point (docs/benchmarks.md).
LOCAL_NEIGHBOURS = 200


class DerivativeGP(gpytorch.Module):
    r"""Exact Gaussian-process regression on function values and partial derivatives.

    The prior is :math:`f \sim \mathcal{GP}(c, k)`; an observation of kind 0 is
    :math:`y_i = f(x_i) + \varepsilon_0`, one of kind ``1 + a`` is
    :math:`g_{ia} = \partial_a f(x_i) + \varepsilon_a`, with independent
    :math:`\varepsilon_a \sim \mathcal N(0, \sigma_a^2)`. Only observed entries (not NaN) enter
    the linear system. Internally X is scaled to the unit box and y standardised (see
    :class:`~gpderiv.scaling.Scaling`); every input and output of this class is in the user's units.

    Args:
        X: `n x d` inputs (a 1-D array is taken as `n` points in one dimension).
        y: `n` observed values; NaN = not observed.
        grad: `n x d` observed partial derivatives ``df/dx_a``; NaN = not observed. None gives a
            value-only GP, which still predicts gradients.
        directional: observed directional derivatives ``(index, V, values)``: `k` indices of
            points of X, `k x d` directions (user units, not necessarily unit length) and `k`
            observed ``v . grad f(x)``; several per point are allowed; NaN = not observed. Each
            costs one row of the system, not d.
        hessian: `n x d x d` observed second derivatives ``d2f / dx_a dx_b``; NaN = not observed.
            ``H[i, a, b]`` and ``H[i, b, a]`` are one observation (give either, or both equal).
            Needs a twice mean-square differentiable kernel (RBF, Matern 5/2).
        kernel: a derivative-aware GPyTorch kernel in block layout working in internal units
            (default ``ScaleKernel(DerivativeRBFKernel(ard_num_dims=d))``).
        noise: known noise variance of the values (user units), or None to learn it.
        grad_noise: known noise variance of the derivatives, scalar or `d` (user units), or None
            to learn it.
        shared_grad_noise: learn one derivative-noise variance for all dimensions.
        noise_lower_bound: lower bound of learned noise variances, relative to the variance of
            the data (internal units).
        inference: inference engine: ``"auto"`` (default, see below), ``"dense"`` (exact Cholesky,
            any kernel and observations), ``"iterative"`` (matrix-free CG and stochastic Lanczos
            log-determinants for the default RBF kernel with values and full gradients; memory
            O(n d); see :mod:`gpderiv.inference.iterative`) or ``"structured"`` (exact, time and
            memory linear in d for few points in many dimensions: ``ScaleKernel(DerivativeRBFKernel())``
            with one lengthscale, values and full gradients, one gradient-noise variance, e.g.
            ``shared_grad_noise=True``; see :mod:`gpderiv.inference.structured`).

    ``inference="auto"`` picks, in this order (constants of :mod:`gpderiv.model`, timings in
    docs/benchmarks.md):

    1. ``"structured"`` when its scope applies, ``n <= 64`` (its `n^2 x n^2` core costs
       `O(n^6)`), ``d >= 2 n`` (measured crossover with the dense engine: d = 1.5 n to 1.8 n) and
       ``N = n (1 + d) >= 1000`` (below, the dense engine takes milliseconds);
    2. ``"dense"`` when its `N x N` matrices fit in memory (the default kernel, small problems,
       partial observations: the behaviour of earlier versions);
    3. ``"iterative"`` when they do not, its scope applies and ``N <= 120,000`` (one marginal
       likelihood step at N = 110,000, d = 10 took 10 minutes on 2 cores); otherwise
       :class:`~gpderiv.ProblemTooLargeError`.

    The resolved engine is the attribute ``inference`` and is what :meth:`save` stores.

    Attributes:
        mll: exact log marginal likelihood (user units) after :meth:`fit` (a stochastic estimate with
            ``inference="iterative"``, evaluated on first access when ``fit`` did not need it).
        mll_history: log marginal likelihood after each optimiser iteration of the kept run.

    Example:
        >>> import torch
        >>> X = torch.linspace(0, 3, 8, dtype=torch.float64).unsqueeze(-1)
        >>> model = DerivativeGP(X, torch.sin(X[:, 0]), torch.cos(X)).fit()
        >>> pred = model.predict(torch.tensor([[1.5]], dtype=torch.float64))
        >>> bool((pred.grad_mean - torch.cos(torch.tensor(1.5))).abs() < 1e-2)
        True
    """

    def __init__(
        self,
        X: Any,
        y: Any,
        grad: Any = None,
        *,
        directional: tuple[Any, Any, Any] | None = None,
        hessian: Any = None,
        kernel: Kernel | None = None,
        noise: float | None = None,
        grad_noise: float | Any | None = None,
        shared_grad_noise: bool = False,
        noise_lower_bound: float = 1e-6,
        inference: str = "auto",
    ) -> None:
        super().__init__()
        X = as_float_tensor("X", X, shape_hint="(n, d)")
        X = X.unsqueeze(-1) if X.ndim == 1 else X
        if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
            raise ValueError(f"X: expected shape (n, d) with n >= 1 and d >= 1, got {tuple(X.shape)}")
        check_finite("X", X)
        n, d = X.shape
        y = as_column("y", y, X, (n,))
        grad = None if grad is None else as_column("grad", grad, X, (n, d))
        directional = None if directional is None else as_directional(directional, X)
        hessian = None if hessian is None else as_hessian(hessian, X)
        if not (isinstance(noise_lower_bound, (int, float)) and 0 <= noise_lower_bound < math.inf):
            raise ValueError(f"noise_lower_bound: expected a finite number >= 0, got {noise_lower_bound!r}")
        if inference not in _ENGINES and inference != "auto":
            raise ValueError(f"inference: expected one of {sorted([*_ENGINES, 'auto'])}, got {inference!r}")

        # What save() needs to rebuild the model (user units, validated).
        self._init_args = {
            "X": X.clone(),
            "y": y.clone(),
            "grad": None if grad is None else grad.clone(),
            "directional": None if directional is None else tuple(t.clone() for t in directional),
            "hessian": None if hessian is None else hessian.clone(),
            "noise": noise,
            "grad_noise": grad_noise,
            "shared_grad_noise": shared_grad_noise,
            "noise_lower_bound": noise_lower_bound,
            "inference": inference,
        }
        obs = ObservationSet.from_data(y, grad, d, directional, hessian)
        self.n, self.d, self.has_grad, self._complete = n, d, obs.has_grad, obs.complete
        self.scaling = Scaling(X, obs)
        self.register_buffer("train_X", self.scaling.x(X))
        self._register_rows(obs)
        self.mean_module = ConstantMean()
        self.covar_module = kernel if kernel is not None else _default_kernel(d)
        check_derivative_kernel(self.covar_module)
        order = 2 if bool((self.kinds == d + HESSIAN).any()) else 1
        for leaf in derivative_leaves(self.covar_module):
            if leaf.max_derivative_order < order:
                raise ValueError(
                    f"hessian: {type(leaf).__name__} is only {leaf.max_derivative_order} time(s) mean-square "
                    "differentiable, so second-derivative observations are not defined; use DerivativeRBFKernel "
                    "or DerivativeMatern52Kernel"
                )
        self.likelihood = DerivativeGaussianNoise(
            d,
            shared_grad_noise=shared_grad_noise,
            lower_bound=noise_lower_bound,
            value_noise=None if noise is None else known_noise("noise", noise, 1) / self.scaling.y_scale.square(),
            grad_noise=None
            if grad_noise is None
            else known_noise("grad_noise", grad_noise, d) * (self.scaling.x_scale / self.scaling.y_scale).square(),
            directional=bool((self.kinds == d + DIRECTIONAL).any()),
            hessian=order == 2,
        )
        if inference == "auto":
            inference = self._select_engine(X.dtype, X.device)
        #: The engine in use (``"auto"`` resolved); saved models reload with the same engine.
        self.inference = self._init_args["inference"] = inference
        self.engine = _ENGINES[inference]()
        if inference == "iterative":
            self._check_iterative_scope()
        if inference == "structured":
            self._check_structured_scope()
            self.engine.check_memory(self.num_observations, X.dtype, X.device, num_points=n)
        else:
            self.engine.check_memory(self.num_observations, X.dtype, X.device)
        self.to(dtype=X.dtype, device=X.device)
        self._mll: float | None = None
        self._mll_pending = False
        self.mll_history: list[float] = []
        self._cache: tuple[tuple[Tensor, tuple], DenseFactor | IterativeFactor | StructuredFactor] | None = None

    # ------------------------------------------------------------------ internal units
    def _register_rows(self, obs: ObservationSet) -> None:
        """Buffers of the observed rows in internal units: targets, kinds, row factors, functionals.

        A row's user value is ``row_factor * internal + offset``. Noise variances are one per
        group (kind) in internal units; for directional and Hessian rows, whose factors differ
        within a group, ``noise_ratio`` rescales the group variance so that the noise is the
        same for every row of the group in the user's units.
        """
        n_std = obs.num_standard
        kinds_std = obs.kinds[:n_std]
        targets = [self.scaling.to_internal(obs.targets[:n_std], kinds_std)]
        factors = [self.scaling.factor(kinds_std)]
        ratios = [torch.ones_like(factors[0])]
        extra_ref = self.train_X.new_ones(2)
        F_std = obs.standard_functionals(self.train_X.dtype)
        self.register_buffer("std_point", F_std.point)
        self.register_buffer("std_idx", F_std.idx[:, 0])
        extra = {"point": None, "idx": None, "coef": None}
        if obs.extra is not None:
            F, factor = self.scaling.functionals_to_internal(obs.extra)
            kinds = obs.kinds[n_std:]
            targets.append(obs.targets[n_std:] / factor)
            factors.append(factor)
            ratio = torch.empty_like(factor)
            for group in (DIRECTIONAL, HESSIAN):
                rows = kinds == self.d + group
                if rows.any():  # the group's reference factor: geometric mean over its rows
                    extra_ref[group - 1] = factor[rows].log().mean().exp()
                    ratio[rows] = (extra_ref[group - 1] / factor[rows]).square()
            ratios.append(ratio)
            extra = {"point": F.point, "idx": F.idx, "coef": F.coef}
        for name, value in extra.items():
            self.register_buffer(f"extra_{name}", value)
        self.register_buffer("extra_ref", extra_ref)
        self.register_buffer("rows", obs.rows)
        self.register_buffer("kinds", obs.kinds)
        self.register_buffer("train_targets", torch.cat(targets))
        self.register_buffer("row_factor", torch.cat(factors))
        self.register_buffer("noise_ratio", torch.cat(ratios))

    @property
    def _std_functionals(self) -> Functionals:
        return Functionals.elementary(self.std_point, self.std_idx, self.train_X.dtype)

    @property
    def _extra_functionals(self) -> Functionals | None:
        if self.extra_point is None:
            return None
        return Functionals(self.extra_point, self.extra_idx, self.extra_coef)

    def _row_noise(self) -> Tensor:
        """`N` noise variance of each observed row (internal units)."""
        return self.likelihood.row_noise(self.kinds) * self.noise_ratio

    @property
    def training_data(self) -> dict[str, Any]:
        """The training data in the user's units (``X``, ``y``, ``grad``, ``directional``, ``hessian``)."""
        keys = ("X", "y", "grad", "directional", "hessian")
        return {k: self._init_args[k] for k in keys}

    @property
    def num_observations(self) -> int:
        """Number of observed rows ``N`` (values, partial, directional and second derivatives)."""
        return self.train_targets.numel()

    def _kernel(self, x1: Tensor, x2: Tensor, grad1: bool, grad2: bool) -> Tensor:
        with gpytorch.settings.lazily_evaluate_kernels(False):
            return self.covar_module(x1, x2, grad1=grad1, grad2=grad2).to_dense()

    def _train_covariance_parts(self, points: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``(K, s)``: the noiseless covariance of the observed rows is ``s * K`` (internal units).

        The output scale of a top-level ``ScaleKernel`` is split off so that the engine fuses
        it into the copy it makes for the factorisation, instead of a separate `N x N` pass
        forward and two backward.

        Args:
            points: restrict to the rows at these point indices (see :meth:`_rows_at`).
        """
        kernel, scale = self._split_scale()
        X = self.train_X if points is None else self.train_X[points]
        with gpytorch.settings.lazily_evaluate_kernels(False):
            K = kernel(X, X, grad1=self.has_grad, grad2=self.has_grad).to_dense()
        if points is None:
            K = K if self._complete else K[self.rows.unsqueeze(-1), self.rows]
            standard, extra = self._std_functionals, self._extra_functionals
        else:
            _, block, standard, extra = self._rows_at(points)
            if block.numel() != K.shape[-1] or bool((block != torch.arange(block.numel(), device=block.device)).any()):
                K = K[block.unsqueeze(-1), block]  # a copy: skipped where every row is observed
        if extra is not None:  # directional and Hessian rows through the general path
            K_se = functional_cov(kernel, X, standard, X, extra)
            K_ee = functional_cov(kernel, X, extra, X, extra)
            K = torch.cat([torch.cat([K, K_se], -1), torch.cat([K_se.transpose(-1, -2), K_ee], -1)], -2)
        return K, scale

    def _split_scale(self) -> tuple[Kernel, Tensor | None]:
        """``(kernel, s)`` with ``covar_module = s * kernel`` (``s`` None without a top-level ScaleKernel).

        Applying the output scale to small results instead of to `N`-sized matrices saves one
        full pass over every covariance matrix.
        """
        kernel = self.covar_module
        if isinstance(kernel, ScaleKernel) and kernel.active_dims is None:
            return kernel.base_kernel, kernel.outputscale
        return kernel, None

    def _rows_at(self, points: Tensor) -> tuple[Tensor, Tensor, Functionals, Functionals | None]:
        """The observed rows at a subset of the points, for a subset-of-data marginal likelihood.

        Args:
            points: `s` distinct point indices.

        Returns:
            ``(rows, block, standard, extra)``: indices of these rows among all observed rows;
            positions of their standard rows in the block vector of the `s` points; and their
            standard and extra functionals, with point indices into ``points``.
        """
        s, d = points.numel(), self.d
        position = torch.full((self.n,), -1, dtype=torch.long, device=points.device)
        position[points] = torch.arange(s, device=points.device)
        std_position = position[self.std_point]
        keep = std_position >= 0
        first = self.std_idx[:, 0]
        block = torch.where(first < 0, std_position, s + std_position * d + first) if self.has_grad else std_position
        rows = [torch.nonzero(keep).flatten()]
        standard = Functionals.elementary(std_position[keep], self.std_idx[keep], self.train_X.dtype)
        extra = self._extra_functionals
        if extra is not None:
            extra_position = position[extra.point]
            keep_extra = extra_position >= 0
            rows.append(self.std_point.numel() + torch.nonzero(keep_extra).flatten())
            extra = Functionals(extra_position[keep_extra], extra.idx[keep_extra], extra.coef[keep_extra])
            extra = extra if len(extra) else None
        return torch.cat(rows), block[keep], standard, extra

    def _train_covariance(self) -> Tensor:
        """`N x N` noiseless covariance of the observed rows (internal units)."""
        K, scale = self._train_covariance_parts()
        return K if scale is None else scale * K

    def _cross_covariance_parts(self, xs: Tensor, points: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``(K, s)``: the `m (1 + d) x N` covariance of ``[f, grad f](xs)`` with the observed rows is ``s K``.

        Args:
            xs: `m x d` internal test inputs.
            points: restrict to the rows at these point indices, in the order of
                :meth:`_train_covariance_parts` with the same ``points``.
        """
        kernel, scale = self._split_scale()
        X = self.train_X if points is None else self.train_X[points]
        with gpytorch.settings.lazily_evaluate_kernels(False):
            K = kernel(xs, X, grad1=True, grad2=self.has_grad).to_dense()
        if points is None:
            K = K if self._complete else K[:, self.rows]
            extra = self._extra_functionals
        else:
            _, block, _, extra = self._rows_at(points)
            K = K[:, block]
        if extra is not None:
            block = Functionals.block(xs.shape[0], self.d, xs.device, xs.dtype)
            K = torch.cat([K, functional_cov(kernel, xs, block, X, extra)], -1)
        return K, scale

    def _local_variance(self, xs: Tensor, neighbours: int) -> Tensor:
        r"""Block-layout variances of ``[f, grad f](xs)`` given the observations at nearby points only.

        For each test point :math:`x_*` with the observed rows :math:`L` at its ``neighbours``
        nearest training points (Euclidean distance of the inputs divided by the lengthscales),
        :math:`\operatorname{var} = k_{**} - k_{*L} (K_{LL} + \Sigma_L)^{-1} k_{L*}`, by a dense
        Cholesky of the `|L| x |L|` matrix (at most ``neighbours (1 + d)`` rows). Dropping
        observations never decreases a posterior variance, so this bounds the full-data variance
        from above; the bound is tight when the covariance decays within the neighbourhood.

        Args:
            xs: `m x d` internal test inputs, ``m >= 1``.
            neighbours: training points per test point (all of them when ``>= n``).

        Returns:
            `m (1 + d)` variances (internal units).
        """
        if isinstance(neighbours, bool) or not isinstance(neighbours, int) or neighbours < 1:
            raise ValueError(f"neighbours: expected a positive integer, got {neighbours!r}")
        m, d = xs.shape
        k = min(neighbours, self.n)
        engine = DenseCholesky()
        # Refuse, before allocating, neighbourhoods whose dense systems do not fit (k = 1600 points
        # with 10 partials each, 17,600 rows, peaked at 19 GiB).
        try:
            engine.check_memory(k * (1 + d), xs.dtype, xs.device)
        except ProblemTooLargeError as exc:
            raise ProblemTooLargeError(f"neighbours: {neighbours} are too many for local variances. {exc}") from None
        scale = self._neighbour_lengthscale()
        tree = cKDTree((self.train_X / scale).detach().cpu().numpy())
        _, nearest = tree.query((xs / scale).detach().cpu().numpy(), k=k)
        nearest = torch.as_tensor(nearest, device=xs.device).reshape(m, k).sort(-1).values
        noise, resid = self._row_noise(), self._residual()
        prior = self.covar_module(xs, diag=True)
        reductions = []
        for i in range(m):  # one dense system per test point: O(k^3 d^3), independent of n
            rows = self._rows_at(nearest[i])[0]
            K, s = self._train_covariance_parts(nearest[i])
            K_cross, _ = self._cross_covariance_parts(xs[i : i + 1], nearest[i])
            factor = engine.factor(K, noise[rows], resid[rows], s)
            reductions.append(factor.variance_reduction(K_cross) * (1.0 if s is None else s * s))
        return (prior - _join_blocks(tuple(reductions), d)).clamp_min(0.0)

    def _neighbour_lengthscale(self) -> Tensor:
        """Lengthscales of the kernel (scalar or `d`) for neighbour distances, 1 where it has none."""
        kernel = self._split_scale()[0]
        lengthscale = getattr(kernel, "lengthscale", None) if kernel.has_lengthscale else None
        if lengthscale is None or lengthscale.numel() not in (1, self.d):
            return torch.ones((), dtype=self.train_X.dtype, device=self.train_X.device)
        return lengthscale.detach().reshape(-1)

    def _residual(self) -> Tensor:
        """Targets minus the prior mean: the constant applies to value rows only."""
        return self.train_targets - self.mean_module.constant * (self.kinds == 0)

    def _scaling_log_det(self) -> Tensor:
        """``sum log factor``: log p(y_user) = log p(y_internal) - this."""
        return self.row_factor.log().sum()

    @property
    def _iterative(self) -> bool:
        return isinstance(self.engine, IterativeCG)

    @property
    def _structured(self) -> bool:
        return isinstance(self.engine, StructuredWoodbury)

    def _rbf_scope_error(self, name: str) -> str | None:
        """Why the matrix-free and structured engines do not apply (None if they do)."""
        kernel = self.covar_module
        base = kernel.base_kernel if isinstance(kernel, ScaleKernel) else None
        if type(base) is not DerivativeRBFKernel or kernel.active_dims is not None or base.active_dims is not None:
            return (
                f"inference: {name!r} needs the default kernel ScaleKernel(DerivativeRBFKernel), "
                f"got {type(kernel).__name__}"
            )
        if not (self._complete and self.has_grad) or self.extra_point is not None:
            return (
                f"inference: {name!r} needs every value and every partial derivative observed (no NaN, no "
                "directional or second derivatives); use inference='dense' for partial observations"
            )
        return None

    def _structured_scope_error(self) -> str | None:
        """Why the structured engine does not apply (None if it does): one lengthscale, one gradient noise."""
        error = self._rbf_scope_error("structured")
        if error is not None:
            return error
        if self.covar_module.base_kernel.lengthscale.numel() != 1 or self.covar_module.batch_shape != torch.Size():
            return (
                "inference: 'structured' needs one lengthscale for all dimensions: "
                "kernel=ScaleKernel(DerivativeRBFKernel()) (no ard_num_dims, no batch shape)"
            )
        if self._shared_grad_noise() is None:
            return (
                "inference: 'structured' needs one gradient-noise variance for all dimensions (internal units): "
                "pass shared_grad_noise=True, or a known grad_noise that is the same in every dimension after "
                "scaling by the input ranges"
            )
        return None

    def _check_iterative_scope(self) -> None:
        """The matrix-free engine covers the default kernel with values and full gradients."""
        error = self._rbf_scope_error("iterative")
        if error is not None:
            raise ValueError(error)

    def _check_structured_scope(self) -> None:
        """The structured engine covers the isotropic default kernel, values and full gradients, one gradient noise."""
        error = self._structured_scope_error()
        if error is not None:
            raise ValueError(error)

    def _shared_grad_noise(self) -> Tensor | None:
        """`1` gradient-noise variance (internal units) when it is one for all dimensions by construction, else None.

        A learned variance is shared only when it is one parameter (``shared_grad_noise=True``):
        equal values of separate parameters would get wrong gradients. A known variance is
        shared when its internal values are equal.
        """
        grad_noise = self.likelihood.grad_noise
        raw = getattr(self.likelihood, "raw_grad_noise", None)
        if raw is not None:
            return grad_noise[:1] if raw.numel() == 1 else None
        return grad_noise[:1] if bool((grad_noise == grad_noise[0]).all()) else None

    def _select_engine(self, dtype: torch.dtype, device: torch.device) -> str:
        """The engine of ``inference="auto"`` (the rule is in the class docstring)."""
        n, d, N = self.n, self.d, self.num_observations
        if (
            n <= AUTO_STRUCTURED_MAX_POINTS
            and d >= AUTO_STRUCTURED_MIN_RATIO * n
            and N >= AUTO_STRUCTURED_MIN_ROWS
            and self._structured_scope_error() is None
        ):
            try:
                StructuredWoodbury().check_memory(N, dtype, device, num_points=n)
                return "structured"
            except ProblemTooLargeError:
                pass
        try:
            DenseCholesky().check_memory(N, dtype, device)
        except ProblemTooLargeError as exc:
            if N <= AUTO_ITERATIVE_MAX_ROWS and self._rbf_scope_error("iterative") is None:
                return "iterative"
            raise ProblemTooLargeError(
                f"{exc} (inference='auto' does not switch to the iterative engine above N = "
                f"{AUTO_ITERATIVE_MAX_ROWS} rows, where one evaluation takes more than half an hour; pass "
                "inference='iterative' to use it anyway.)"
            ) from None
        return "dense"

    def _structured_covariance(self, points: Tensor | None = None) -> tuple[IsotropicRBFCovariance, Tensor]:
        """The structured engine's description of the noiseless covariance, and its `2` noise variances.

        Args:
            points: restrict to these point indices (subset of data).
        """
        base = self.covar_module.base_kernel
        X = self.train_X if points is None else self.train_X[points.sort().values]
        noise = torch.cat([self.likelihood.value_noise.reshape(1), self._shared_grad_noise()])
        return IsotropicRBFCovariance(X, base.lengthscale, self.covar_module.outputscale), noise

    def _operator(self) -> RBFDerivativeLinearOperator:
        """The noiseless covariance of all rows as a matrix-free operator (iterative engine)."""
        base = self.covar_module.base_kernel
        return RBFDerivativeLinearOperator(self.train_X, base.lengthscale.reshape(-1), self.covar_module.outputscale)

    def _loss(self, points: Tensor | None = None) -> Tensor:
        """Negative log marginal likelihood plus negative log priors, per observation (internal units).

        Args:
            points: use only the observations at these point indices (subset of data; always
                through the dense engine, as a subset is meant to be small).
        """
        noise, resid = self._row_noise(), self._residual()
        if points is not None:
            rows = self._rows_at(points)[0]
            noise, resid = noise[rows], resid[rows]
        if self._iterative and points is None:
            loss = self.engine.negative_log_marginal(self._operator(), noise, resid)
        elif self._structured:  # also on a subset: its d-dimensional dense matrix would be as large
            loss = self.engine.negative_log_marginal(*self._structured_covariance(points), resid)
        else:
            K, scale = self._train_covariance_parts(points)
            engine = self.engine if not self._iterative else DenseCholesky()
            loss = engine.negative_log_marginal(K, noise, resid, scale)
        for _, module, prior, closure, _ in self.named_priors():
            loss = loss - prior.log_prob(closure(module)).sum()
        return loss / resid.numel()

    def _state_key(self) -> tuple[Tensor, tuple]:
        """What the factorisation depends on: parameter values and buffer identities.

        Parameters are compared by value because GPyTorch's setters write through ``.data``,
        which does not bump version counters.
        """
        values = torch.cat([p.detach().reshape(-1) for p in self.parameters()])
        return values, tuple((t.data_ptr(), t._version) for t in self.buffers())

    def _cache_valid(self, key: tuple[Tensor, tuple]) -> bool:
        if self._cache is None:
            return False
        (values, buffers), _ = self._cache
        return buffers == key[1] and values.shape == key[0].shape and bool(torch.equal(values, key[0]))

    def _factor(self) -> DenseFactor | IterativeFactor | StructuredFactor:
        """The factorisation at the current hyperparameters, computed once and cached."""
        key = self._state_key()
        if not self._cache_valid(key):
            with torch.no_grad():
                if self._iterative:
                    factor = self.engine.factor(self._operator(), self._row_noise(), self._residual())
                elif self._structured:
                    factor = self.engine.factor(*self._structured_covariance(), self._residual())
                else:
                    K, scale = self._train_covariance_parts()
                    factor = self.engine.factor(K, self._row_noise(), self._residual(), scale)
            self._cache = (key, factor)
        return self._cache[1]

    # ------------------------------------------------------------------ public API
    def log_marginal_likelihood(self) -> float:
        r"""Exact :math:`\log p(y, \nabla f \mid X, \theta)` of the observed data in the user's units.

        With ``inference="iterative"`` the log-determinant is a stochastic Lanczos estimate.
        """
        if self._iterative or self._structured:
            with torch.no_grad():
                if self._iterative:
                    nll = self.engine.negative_log_marginal(self._operator(), self._row_noise(), self._residual())
                else:
                    nll = self.engine.negative_log_marginal(*self._structured_covariance(), self._residual())
            return float(-nll - self._scaling_log_det())
        factor = self._factor()
        with torch.no_grad():
            resid = self._residual()
            nll = 0.5 * resid.dot(factor.alpha) + factor.L.diagonal().log().sum()
            nll = nll + 0.5 * self.num_observations * math.log(2 * math.pi)
            return float(-nll - self._scaling_log_det())

    def fit(
        self,
        *,
        optimizer: str = "lbfgs",
        maxiter: int | None = None,
        lr: float = 0.1,
        restarts: int = 0,
        seed: int | None = None,
        progress: bool | None = None,
        subset: int | Any | None = None,
    ) -> DerivativeGP:
        """Maximise the exact log marginal likelihood over the hyperparameters.

        Args:
            optimizer: ``"lbfgs"`` (scipy L-BFGS-B, default) or ``"adam"``.
            maxiter: iteration limit (default 200 for L-BFGS, 100 for Adam).
            lr: Adam learning rate.
            restarts: extra runs from random initial hyperparameters; the run with the best
                final marginal likelihood is kept.
            seed: seed of the random restarts.
            progress: show a tqdm bar with the current log marginal likelihood: ``None`` (default)
                shows it only once a run has taken more than 2 seconds, ``True`` always,
                ``False`` never.
            subset: optimise the marginal likelihood of the observations at this many random
                points (drawn once per fit, with ``seed``), or at these point indices, instead
                of all of them; the final factorisation, :attr:`mll` and predictions use all the
                data. A fast way to set hyperparameters on large data sets (a spatially compact
                subset keeps the data's density, which lengthscales and noise depend on);
                :attr:`mll_history` then refers to the subset.

        Returns:
            ``self``, with :attr:`mll` and :attr:`mll_history` set and the factorisation cached
            (with ``inference="iterative"`` and no restarts, both wait for their first use: each is
            a full set of CG solves, minutes at N = 110,000, and the log marginal likelihood is
            not needed to choose a run).
        """
        if optimizer not in ("lbfgs", "adam"):
            raise ValueError(f"optimizer: expected 'lbfgs' or 'adam', got {optimizer!r}")
        if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 0:
            raise ValueError(f"restarts: expected a non-negative integer, got {restarts!r}")
        if maxiter is not None and (isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 1):
            raise ValueError(f"maxiter: expected a positive integer, got {maxiter!r}")
        if not lr > 0:
            raise ValueError(f"lr: expected a positive learning rate, got {lr!r}")
        points = subset_points(subset, self.n, self.train_X.device)
        maxiter = maxiter if maxiter is not None else (200 if optimizer == "lbfgs" else 100)
        params = [p for p in self.parameters() if p.requires_grad]
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        best: tuple[float, dict, list[float]] | None = None
        if isinstance(points, int):  # a number of random points
            points = torch.randperm(self.n, generator=generator)[:points].sort().values.to(self.train_X.device)
        rows = self._rows_at(points)[0] if points is not None else slice(None)
        scale = self.train_targets[rows].numel()
        offset = self.row_factor[rows].log().sum().item()

        def closure() -> Tensor:
            loss = self._loss(points)
            loss.backward()
            return loss

        lazy = self._iterative and not restarts  # no run to choose: mll and factor wait for their first use
        for run in range(restarts + 1):
            if run > 0:
                self._randomize(generator)
            history: list[float] = []
            bar = tqdm(
                total=maxiter,
                desc=f"fit {run + 1}/{restarts + 1}",
                disable=progress is False,
                delay=2.0 if progress is None else 0.0,  # quick fits stay silent
                leave=False,
            )

            def record(loss: float, history: list[float] = history, bar: tqdm = bar) -> None:
                history.append(-loss * scale - offset)
                bar.update(1)
                bar.set_postfix(mll=f"{history[-1]:.4g}", refresh=False)  # refresh would defeat delay

            if optimizer == "lbfgs":
                message = minimize_lbfgs(closure, params, maxiter, record)
            else:
                message = minimize_adam(closure, params, maxiter, record, lr=lr)
            bar.close()
            if "non-finite" in message:
                note = f"fit run {run + 1}: {message}; kept the last point with a finite loss"
                warnings.warn(note, RuntimeWarning, stacklevel=2)
            self._cache = None
            if lazy:  # a single run: nothing to compare, no state to restore
                best = (None, None, history)
            else:
                mll = self.log_marginal_likelihood()
                if best is None or mll > best[0]:
                    best = (mll, copy.deepcopy(self.state_dict()), history)
        assert best is not None
        if restarts:
            self.load_state_dict(best[1])
        self.mll, self.mll_history = best[0], best[2]
        self._mll_pending = lazy
        if not lazy:
            self._factor()  # cached for predict (a no-op when the last run was the best)
        return self

    @property
    def mll(self) -> float | None:
        """Log marginal likelihood after :meth:`fit` (user units); None before."""
        if self._mll_pending:
            self._mll, self._mll_pending = self.log_marginal_likelihood(), False
        return self._mll

    @mll.setter
    def mll(self, value: float | None) -> None:
        self._mll, self._mll_pending = value, False

    def _randomize(self, generator: torch.Generator | None) -> None:
        """Draw initial hyperparameters for a restart (internal units)."""
        for module in self.covar_module.modules():
            if isinstance(module, Kernel) and module.has_lengthscale:
                log_ls = torch.empty(module.lengthscale.shape, dtype=torch.float64).uniform_(
                    math.log(0.05), math.log(1.0), generator=generator
                )
                module.lengthscale = log_ls.exp().to(module.lengthscale)
        with torch.no_grad():
            self.mean_module.constant.zero_()

    def predict(
        self,
        Xs: Any,
        *,
        full_cov: bool = False,
        observation_noise: bool = False,
        chunk_size: int | None = None,
        hessian: bool = False,
        variance: bool | str = True,
        neighbours: int = LOCAL_NEIGHBOURS,
    ) -> Prediction:
        """Posterior of f and grad f (and optionally the Hessian) at test points, in the user's units.

        Uses the factorisation cached by :meth:`fit` (nothing is refactorised). The outputs are
        differentiable with respect to ``Xs`` when it requires grad, and detached otherwise.

        Args:
            Xs: `m x d` test inputs.
            full_cov: also return the joint `m (1 + d)` square covariance of ``[f, grad f]``.
            observation_noise: add the observation noise to the variances (predictive
                distribution of new measurements instead of the latent f).
            chunk_size: test points per chunk (default: cross-covariance chunks of 64 MiB);
                ignored with ``full_cov``.
            hessian: also return the posterior mean and variance of every second derivative
                (``hessian_mean``, ``hessian_variance``; see :meth:`predict_hessian`).
            variance: ``True``: the exact variances; ``False``: none (``variance`` and
                ``grad_variance`` are None, which skips the `O(N^2)`-per-point triangular solves:
                means of large data sets); ``"local"``: at each test point, the variances given
                only the observations at its ``neighbours`` nearest training points (distances
                in lengthscales). Conditioning on fewer data never lowers a variance, so these
                are upper bounds on the exact ones, equal to them when ``neighbours >= n``, at a
                cost per test point independent of n: the variances of large data sets with
                ``inference="iterative"``, whose exact variances need a CG solve with ``1 + d``
                right-hand sides per test point. Needs at least one training point.
            neighbours: training points per test point for ``variance="local"``.

        Returns:
            A :class:`~gpderiv.prediction.Prediction`.
        """
        # Outputs carry an autograd graph only when the caller asks for gradients in Xs.
        track = torch.is_grad_enabled() and isinstance(Xs, Tensor) and Xs.requires_grad
        if isinstance(variance, str) and variance != "local":
            raise ValueError(f"variance: expected True, False or 'local', got {variance!r}")
        variance = variance if isinstance(variance, str) else bool(variance)
        if full_cov and variance is not True:
            raise ValueError(f"variance: full_cov=True needs variance=True, got {variance!r}")
        with torch.set_grad_enabled(track):
            pred = self._predict(self._test_inputs(Xs), full_cov, observation_noise, chunk_size, variance, neighbours)
        if not hessian:
            return pred
        hessian_mean, hessian_variance = self.predict_hessian(Xs, chunk_size=chunk_size)
        return dataclasses.replace(pred, hessian_mean=hessian_mean, hessian_variance=hessian_variance)

    def _predict(
        self,
        xs: Tensor,
        full_cov: bool,
        observation_noise: bool,
        chunk_size: int | None,
        variance: bool | str = True,
        neighbours: int = LOCAL_NEIGHBOURS,
    ) -> Prediction:
        m, d = xs.shape
        factor = self._factor()
        if full_cov or m == 0:
            mean, cov = self._posterior_internal(xs, factor, "cov")
            var, cov = cov.diagonal().clamp_min(0.0), cov if full_cov else None
        else:
            chunk = chunk_size or max(1, _CHUNK_ELEMENTS // ((1 + d) * self.num_observations))
            chunk = m if self._structured and chunk_size is None else chunk  # chunks internally, no K_cross
            mode = "var" if variance is True else "mean"
            chunks = [self._posterior_internal(xs[i : i + chunk], factor, mode) for i in range(0, m, chunk)]
            means, variances = zip(*chunks, strict=True)
            mean, cov = _join_blocks(means, d), None
            var = _join_blocks(variances, d) if variance is True else None
            if variance == "local":
                var = self._local_variance(xs, neighbours)
        kinds = Scaling.block_kinds(m, d, xs.device)
        factor_u = self.scaling.factor(kinds)
        mean = mean * factor_u + self.scaling.offset(kinds)
        if var is not None:
            if observation_noise:
                var = var + self.likelihood.row_noise(kinds)
            var = var * factor_u.square()
        if cov is not None:
            if observation_noise:
                cov = cov + torch.diag_embed(self.likelihood.row_noise(kinds))
            cov = cov * factor_u.unsqueeze(-1) * factor_u
        return Prediction(
            mean=mean[:m],
            variance=None if var is None else var[:m],
            grad_mean=mean[m:].view(m, d),
            grad_variance=None if var is None else var[m:].view(m, d),
            covariance=cov,
        )

    def _functional_posterior(self, Xs: Any, make: Any, chunk_size: int | None) -> tuple[Tensor, Tensor]:
        """Mean and variance (user units) of derivative functionals at test points.

        Args:
            Xs: `m x d` test inputs.
            make: ``make(start, c)`` returns the user-unit :class:`Functionals` at the ``c`` test
                points from ``start`` on, `r` per point, point-major, with point indices from 0.
            chunk_size: test points per chunk.

        Returns:
            ``(mean, variance)``, each `m x r`.
        """
        track = torch.is_grad_enabled() and isinstance(Xs, Tensor) and Xs.requires_grad
        with torch.set_grad_enabled(track):
            xs = self._test_inputs(Xs)
            m = xs.shape[0]
            factor = self._factor()
            per_point = len(make(0, 1)) if m else 1
            chunk = chunk_size or max(1, _CHUNK_ELEMENTS // (per_point * self.num_observations * 4))
            means, variances = [], []
            for i in range(0, max(m, 1), chunk):
                x = xs[i : i + chunk]
                F, row_factor = self.scaling.functionals_to_internal(make(i, x.shape[0]))
                K_cross = functional_cov(self.covar_module, x, F, self.train_X, self._std_functionals)
                extra = self._extra_functionals
                if extra is not None:
                    K_cross = torch.cat([K_cross, functional_cov(self.covar_module, x, F, self.train_X, extra)], -1)
                prior = functional_cov(self.covar_module, x, F, x, F, pairwise=False)
                var = (prior - factor.variance_reduction(K_cross)).clamp_min(0.0)
                means.append(factor.mean(K_cross) * row_factor)
                variances.append(var * row_factor.square())
            return torch.cat(means).view(m, per_point), torch.cat(variances).view(m, per_point)

    def predict_hessian(self, Xs: Any, *, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
        """Posterior mean and variance of every second derivative ``d2f / dx_a dx_b`` at test points.

        Args:
            Xs: `m x d` test inputs.
            chunk_size: test points per chunk.

        Returns:
            ``(mean, variance)``, each `m x d x d` and symmetric, in the user's units.
        """
        d = self.d
        a, b = torch.triu_indices(d, d)
        mean, var = self._functional_posterior(
            Xs, lambda _, c: Functionals.hessian_entries(c, d, self.train_X.device, self.train_X.dtype), chunk_size
        )
        return _symmetric(mean, a, b, d), _symmetric(var, a, b, d)

    def predict_directional(self, Xs: Any, V: Any, *, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
        """Posterior mean and variance of the directional derivative ``v_i . grad f(x_i)``.

        Args:
            Xs: `m x d` test inputs.
            V: `m x d` directions (user units), or one `d` direction for every point.
            chunk_size: test points per chunk.

        Returns:
            ``(mean, variance)``, each `m`.
        """
        m = len(Xs)
        V = as_float_tensor("V", V, like=self.train_X, shape_hint=f"({m}, {self.d})")
        V = V.expand(m, self.d) if V.shape == (self.d,) else V
        if tuple(V.shape) != (m, self.d):
            raise ValueError(f"V: expected shape ({m}, {self.d}) or ({self.d},), got {tuple(V.shape)}")
        check_finite("V", V)
        if (V.norm(dim=-1) == 0).any():
            raise ValueError("V: expected non-zero direction vectors, got a zero row")
        d, device = self.d, self.train_X.device
        idx = torch.stack([torch.arange(d, device=device), torch.full((d,), -1, device=device)], -1)

        def make(start: int, c: int) -> Functionals:
            return Functionals(torch.arange(c, device=device), idx.expand(c, d, 2), V[start : start + c])

        mean, var = self._functional_posterior(Xs, make, chunk_size)
        return mean[:, 0], var[:, 0]

    def laplacian(self, Xs: Any, *, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
        """Posterior mean and variance of the Laplacian ``sum_a d2f / dx_a^2`` at test points.

        The variance includes the covariances between the diagonal Hessian entries.

        Args:
            Xs: `m x d` test inputs.
            chunk_size: test points per chunk.

        Returns:
            ``(mean, variance)``, each `m`.
        """
        d, device, dtype = self.d, self.train_X.device, self.train_X.dtype
        idx = torch.arange(d, device=device).unsqueeze(-1).expand(d, 2)

        def make(_: int, c: int) -> Functionals:
            return Functionals(
                torch.arange(c, device=device), idx.expand(c, d, 2), torch.ones(c, d, dtype=dtype, device=device)
            )

        mean, var = self._functional_posterior(Xs, make, chunk_size)
        return mean[:, 0], var[:, 0]

    def posterior(self, Xs: Any, *, observation_noise: bool = False) -> MultivariateNormal:
        """Joint Gaussian posterior of ``[f(Xs), grad f(Xs)]`` (block layout, user units).

        Args:
            Xs: `m x d` test inputs.
            observation_noise: include the observation noise.

        Returns:
            A GPyTorch ``MultivariateNormal`` of dimension `m (1 + d)`.
        """
        pred = self.predict(Xs, full_cov=True, observation_noise=observation_noise)
        mean = torch.cat([pred.mean, pred.grad_mean.flatten()])
        return MultivariateNormal(mean, pred.covariance)

    def _test_inputs(self, Xs: Any) -> Tensor:
        Xs = as_float_tensor("Xs", Xs, like=self.train_X, shape_hint=f"(m, {self.d})")
        if Xs.ndim == 1 and self.d == 1:
            Xs = Xs.unsqueeze(-1)
        if Xs.ndim != 2 or Xs.shape[-1] != self.d:
            raise ValueError(f"Xs: expected shape (m, {self.d}) like the training X, got {tuple(Xs.shape)}")
        check_finite("Xs", Xs)
        return self.scaling.x(Xs)

    def _posterior_internal(
        self, xs: Tensor, factor: DenseFactor | IterativeFactor | StructuredFactor, mode: str
    ) -> tuple[Tensor, Tensor | None]:
        """Block-layout mean and (``mode``) nothing, the variance or the covariance at internal inputs."""
        m = xs.shape[0]
        if self._structured and mode != "cov":  # O(m n^2 d): no m (1 + d) x N cross-covariance
            mean, var = factor.predict(xs, variance=mode == "var")
            var = None if var is None else var.clamp_min(0.0)
            return torch.cat([mean[:m] + self.mean_module.constant, mean[m:]]), var
        if self._iterative and mode == "mean":  # matrix-free: O(m n d), no cross-covariance matrix
            base = self.covar_module.base_kernel
            mean = self.covar_module.outputscale * rbf_derivative_matmul(
                xs, self.train_X, base.lengthscale.reshape(-1), factor.alpha
            )
            return torch.cat([mean[:m] + self.mean_module.constant, mean[m:]]), None
        K_cross, scale = self._cross_covariance_parts(xs)
        scale = 1.0 if scale is None else scale
        mean = factor.mean(K_cross) * scale
        mean = torch.cat([mean[:m] + self.mean_module.constant, mean[m:]])
        if mode == "mean":  # no triangular solve: O(N) per test row instead of O(N^2)
            return mean, None
        # Reductions of the unscaled cross-covariance: the output scale enters squared.
        if mode == "cov":
            cov = self._kernel(xs, xs, True, True) - (scale * scale) * factor.covariance_reduction(K_cross)
            return mean, cov
        prior_var = self.covar_module(xs, diag=True)
        return mean, (prior_var - (scale * scale) * factor.variance_reduction(K_cross)).clamp_min(0.0)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Save the model (data, options, kernel, hyperparameters) to ``path``; see :meth:`load`."""
        save_model(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> DerivativeGP:
        """Load a model saved with :meth:`save`; predictions are bit-identical to the saved model's.

        The file is unpickled (it holds the kernel module): load only files you trust.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: the file is corrupt or not a gpderiv model file.
        """
        return load_model(cls, path)

    # ------------------------------------------------------------------ hyperparameters (user units)
    def hyperparameters(self) -> dict[str, Tensor]:
        """Learned hyperparameters in the user's units (lengthscales per input dimension, etc.)."""
        out: dict[str, Tensor] = {
            "mean": (self.mean_module.constant * self.scaling.y_scale + self.scaling.y_offset).detach(),
            "noise": (self.likelihood.value_noise * self.scaling.y_scale.square()).detach(),
        }
        if self.has_grad:
            out["grad_noise"] = (
                self.likelihood.grad_noise * (self.scaling.y_scale / self.scaling.x_scale).square()
            ).detach()
        for group, name in ((DIRECTIONAL, "directional_noise"), (HESSIAN, "hessian_noise")):
            if bool((self.kinds == self.d + group).any()):  # user units: same for every row of the group
                noise = self.likelihood.extra_noise(name.split("_")[0]) * self.extra_ref[group - 1].square()
                out[name] = noise.detach()
        for name, module in self.covar_module.named_modules():
            prefix = f"{name}." if name else ""
            if isinstance(module, ScaleKernel):
                out[f"{prefix}outputscale"] = (module.outputscale * self.scaling.y_scale.square()).detach()
            # Lengths along the inputs (lengthscales, periods) scale with the input ranges.
            for attr in ("lengthscale", "period_length"):
                if isinstance(module, Kernel) and getattr(module, f"raw_{attr}", None) is not None:
                    value = getattr(module, attr).reshape(-1)
                    out[f"{prefix}{attr}"] = (value * self.scaling.x_scale).detach()
        return out


def _symmetric(entries: Tensor, a: Tensor, b: Tensor, d: int) -> Tensor:
    """`m x d x d` symmetric matrices from their `m x d (d + 1) / 2` upper-triangular entries."""
    out = entries.new_zeros(entries.shape[0], d, d)
    out[:, a, b] = entries
    out[:, b, a] = entries
    return out


def _join_blocks(parts: tuple[Tensor, ...], d: int) -> Tensor:
    """Join block-layout vectors of consecutive chunks of points into one block-layout vector."""
    sizes = [p.numel() // (1 + d) for p in parts]
    pairs = list(zip(parts, sizes, strict=True))
    return torch.cat([p[:s] for p, s in pairs] + [p[s:] for p, s in pairs])


def _default_kernel(d: int) -> Kernel:
    kernel = ScaleKernel(DerivativeRBFKernel(ard_num_dims=d))
    kernel.base_kernel.lengthscale = 0.3
    kernel.outputscale = 1.0
    return kernel
