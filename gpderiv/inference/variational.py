r"""Variational inference with inducing values and directional derivatives, trained on minibatches.

A sparse variational GP (Titsias 2009; Hensman, Fusi and Lawrence 2013) whose inducing variables
carry derivative information (Padidar et al., NeurIPS 2021): at each of :math:`M` inducing points
:math:`z_j` the value :math:`f(z_j)` and :math:`p` directional derivatives
:math:`v_{jk}^\top \nabla f(z_j)` (``p = d``: the full gradient, ``p = 0``: values only). Their
:math:`M_u = M (1 + p)` variables :math:`u` have the prior covariance :math:`K_{uu} = L L^\top` and
are *whitened*, :math:`u = L v` with :math:`v \sim \mathcal N(0, I)`, and the variational
distribution is :math:`q(v) = \mathcal N(m, S)`.

**Evidence lower bound.** For observed rows :math:`i` (values, partial, directional or Hessian
rows, each the functional :math:`L_i f`) with noise :math:`\sigma_i^2` and residual :math:`r_i`,
let :math:`a_i = L^{-1} k_{u i}` (:math:`k_{ui} = \operatorname{cov}(u, L_i f)`). Then
:math:`q(L_i f) = \mathcal N(a_i^\top m,\ \kappa_i)`,
:math:`\kappa_i = k_{ii} - a_i^\top a_i + a_i^\top S a_i`, and

.. math::

    \mathrm{ELBO} = \sum_i \Big[-\tfrac12 \log 2\pi\sigma_i^2
        - \frac{(r_i - a_i^\top m)^2 + \kappa_i}{2\sigma_i^2}\Big]
        - \tfrac12\big(\operatorname{tr} S + m^\top m - M_u - \log|S|\big)
    \;\le\; \log p(r).

On a minibatch of :math:`b` of the :math:`n` points (all observed rows of each) the sum is
estimated without bias by :math:`n / b` times the minibatch's sum.

**Training** (:meth:`VariationalELBO.negative_log_marginal`): each evaluation draws a minibatch,
takes one natural-gradient step of :math:`q` (for a Gaussian likelihood the natural gradient step
of size :math:`\gamma` is closed-form; Hensman et al. 2013):

.. math::

    S^{-1} \leftarrow (1-\gamma) S^{-1} + \gamma\Big(I + \tfrac nb \sum_{i \in B} a_i a_i^\top/\sigma_i^2\Big),
    \qquad
    S^{-1} m \leftarrow (1-\gamma) S^{-1} m + \gamma\, \tfrac nb \sum_{i \in B} a_i r_i/\sigma_i^2,

and returns the minibatch's negative ELBO at the updated :math:`q`, differentiable in the
hyperparameters, the inducing points and the inducing directions (which the optimiser, Adam,
trains): :math:`q` is the engine's state, not an optimiser parameter (Salimbeni, Eleftheriadis and
Hensman 2018: natural gradients for :math:`q`, Adam for the rest). With the whole data in one
batch and :math:`\gamma = 1` the step reaches the optimal :math:`q` at once.

**Prediction** (:class:`VariationalFactor`): at fixed hyperparameters and inducing inputs the
optimal :math:`q` is closed-form (Titsias 2009),
:math:`S^{-1} = I + \sum_i a_i a_i^\top / \sigma_i^2`, :math:`m = S \sum_i a_i r_i/\sigma_i^2`,
accumulated in one streaming pass over the data (memory :math:`O(M_u^2)`, time
:math:`O(N M_u^2)`), which also gives the full-data ELBO (the model's ``mll``). For test rows
:math:`*`, with :math:`A_* = L^{-1} K_{u*}`,

.. math::

    \mathbb E[f_*] = A_*^\top m, \qquad
    \operatorname{Cov}[f_*] = K_{**} - A_*^\top A_* + A_*^\top S A_* + \operatorname{diag}(\epsilon_*).

**Approximation error** :math:`\epsilon_*`. Where the inducing variables cannot represent the
function (short lengthscales in many dimensions), the bound explains the misfit as observation
noise, and the latent variance above, which shrinks near every inducing point while the misfit
does not, is far too small (a 10-D case: mean z^2 of 32). After the fit,
:func:`gpderiv.fitting.approximation_error` finds for each kind of derivative the least white
error variance that makes the mean z^2 of a sample of training rows at most 1, given an exact
fit's (the warm start's) noise; a test row :math:`\sum_k c_k \partial^{\alpha_k} f` gets
:math:`\sum_k c_k^2 \epsilon_{\alpha_k}`
(:meth:`~gpderiv.observed_rows.ObservedRows.white_variance`). It is zero without a warm start
(small problems) and where it would be below a quarter of that noise (not detectable).

With :math:`M = n` inducing points at the training inputs carrying full gradients (``p = d``) and
only values and gradients observed, this is the exact posterior and the ELBO the exact log
marginal likelihood (up to the jitter of :math:`K_{uu}`).

Inducing points start at k-means centres of the inputs (scipy's ``kmeans2``, ``k-means++``
seeding; the inputs themselves when :math:`M \ge n`); inducing directions at random orthonormal
frames. Fantasies and conditioning on new observations are not defined for this approximation
(:meth:`VariationalFactor.extend` refuses them): refit with the new data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
from gpytorch.kernels import Kernel
from scipy.cluster.vq import kmeans2
from torch import Tensor

from gpderiv.exceptions import CholeskyError
from gpderiv.inference.base import CHUNK_ELEMENTS, Engine, Factor
from gpderiv.inference.dense import solve_triangular
from gpderiv.inference.distributed import current_ranks
from gpderiv.observed_rows import ObservedRows

__all__ = ["InducingVariables", "VariationalELBO", "VariationalFactor", "default_options"]

#: Relative jitters (times the mean diagonal) tried in turn on :math:`K_{uu}`: inducing values and
#: derivatives at nearby points are nearly collinear; the first that factorises is part of the
#: approximation (GPyTorch's variational strategy adds a fixed 1e-8 in float64 likewise).
JITTERS = (1e-12, 1e-10, 1e-8, 1e-6, 1e-4)
#: Default number of inducing variables M (1 + p): one training step of the Mount St Helens model
#: (d = 2, 256 points per minibatch, one thread, loaded machine) took 0.35 s with 510 variables
#: and 1.6 s with 1023.
INDUCING_VARIABLES = 512
#: Most points used to place the inducing points by k-means (a random sample of larger data).
KMEANS_SAMPLE = 50_000


def default_options(n: int, d: int, directions: int | None = None) -> dict[str, int | float]:
    """The engine's defaults for `n` points in `d` dimensions (every one can be overridden).

    ``directions``: ``d`` (full gradients) up to d = 3, else 2 (Padidar et al. found 1-2
    directions enough in high dimensions); ``num_inducing``: ``M`` with ``M (1 + p) <=``
    :data:`INDUCING_VARIABLES`, at most ``n``; ``batch_size``: 256 points (all of them when
    n <= 1024); ``step``: the natural-gradient step 0.1. With ``directions`` given, ``num_inducing``
    follows from it.
    """
    directions = (d if d <= 3 else 2) if directions is None else directions
    return {
        "num_inducing": max(1, min(n, INDUCING_VARIABLES // (1 + directions))),
        "directions": directions,
        "batch_size": n if n <= 1024 else 256,
        "step": 0.1,
    }


class InducingVariables(torch.nn.Module):
    """The variational state: inducing points and directions (trained) and :math:`q(v)` (natural parameters).

    Args:
        Z: `M x d` initial inducing points (internal units).
        directions: `p` directional derivatives per point, 0 to d.
        generator: random numbers of the initial directions.

    Attributes:
        Z: `M x d` inducing points (a parameter).
        raw_directions: `M x p x d` unnormalised directions (a parameter; only for 0 < p < d).
        precision: `M_u x M_u` buffer :math:`S^{-1}`.
        shift: `M_u` buffer :math:`S^{-1} m`.
        steps: scalar buffer, natural-gradient steps taken (0: :math:`q` is the prior).
        approximation_error: `d + 3` buffer, variance per row kind of the approximation's error that
            predictions add (:func:`gpderiv.fitting.approximation_error`; zero until set).
    """

    def __init__(self, Z: Tensor, directions: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        M, d = Z.shape
        self.p = directions
        self.Z = torch.nn.Parameter(Z.clone())
        if 0 < directions < d:
            G = torch.randn(M, d, directions, generator=generator, dtype=torch.float64)
            frames = torch.linalg.qr(G).Q.mT  # M x p x d, orthonormal rows
            self.raw_directions = torch.nn.Parameter(frames.to(Z))
        else:
            self.raw_directions = None
        size = M * (1 + directions)
        self.register_buffer("precision", torch.eye(size, dtype=Z.dtype, device=Z.device))
        self.register_buffer("shift", torch.zeros(size, dtype=Z.dtype, device=Z.device))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long, device=Z.device))
        self.register_buffer("approximation_error", torch.zeros(d + 3, dtype=Z.dtype, device=Z.device))

    @property
    def size(self) -> int:
        """Number of inducing variables :math:`M_u = M (1 + p)`."""
        return self.Z.shape[0] * (1 + self.p)

    def directions(self) -> Tensor:
        """`M x p x d` unit directions."""
        return torch.nn.functional.normalize(self.raw_directions, dim=-1)

    def covariance(self, kernel: Kernel, other: ObservedRows | None = None) -> Tensor:
        """`... x M_u x N2` covariance of the inducing variables with ``other``'s rows (default: themselves).

        Values first, then the directional derivatives point-major. With ``0 < p < d`` the block
        covariance of ``[f, grad f](Z)`` is projected onto the directions.
        """
        M, d = self.Z.shape
        if self.p == 0:
            index = torch.arange(M, device=self.Z.device)
            rows = ObservedRows(self.Z, False, index, torch.full((M, 2), -1, device=index.device), index)
        else:
            rows = ObservedRows.block(self.Z)
        K = rows.scaled_covariance(kernel, other)
        if self.raw_directions is None:
            return K
        V = self.directions()
        K = self._project(K, V)
        return self._project(K.mT, V).mT if other is None else K

    @staticmethod
    def _project(K: Tensor, V: Tensor) -> Tensor:
        """Rows ``[f(Z), grad f(Z)]`` of `... x M(1+d) x c` ``K`` to ``[f(Z), V grad f(Z)]``."""
        M, p, d = V.shape
        values, grads = K[..., :M, :], K[..., M:, :].unflatten(-2, (M, d))
        projected = torch.einsum("mpd,...mdc->...mpc", V, grads).flatten(-3, -2)
        return torch.cat([values, projected], -2)

    def cholesky(self, kernel: Kernel) -> Tensor:
        r"""Lower factor :math:`L` of :math:`K_{uu}` plus the least jitter of :data:`JITTERS` that factorises it.

        Differentiable. The jitter is relative to the mean diagonal and part of the approximation:
        with nearly noiseless data every bit of it enters the bound through :math:`k_{ii} - a_i^\top a_i`.
        """
        K = self.covariance(kernel)
        size = K.detach().diagonal().mean().clamp_min(1e-300)
        eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
        for relative in JITTERS:
            L, info = torch.linalg.cholesky_ex(K + (relative * size) * eye)
            if not bool(info.any()):
                return L
        raise CholeskyError(
            f"Cholesky factorisation of the {K.shape[-1]} x {K.shape[-1]} inducing covariance failed even with jitter "
            f"{JITTERS[-1]:.0e} x its mean diagonal: inducing points too close together for their derivatives; use "
            "fewer inducing points (inference_options={'num_inducing': ...}) or fewer directions"
        )

    def q(self) -> tuple[Tensor, Tensor]:
        """``(m, L_q)``: the variational mean and the lower factor of :math:`S^{-1}` (no graph)."""
        Lq, info = torch.linalg.cholesky_ex(self.precision)
        if bool(info.any()):  # cannot happen for steps of size <= 1 (a convex combination of SPD matrices)
            raise CholeskyError("the variational precision is not positive definite")
        return torch.cholesky_solve(self.shift.unsqueeze(-1), Lq).squeeze(-1), Lq

    @torch.no_grad()
    def natural_step(self, A: Tensor, weights: Tensor, resid: Tensor, scale: float, step: float) -> None:
        r"""One natural-gradient step of :math:`q` from whitened covariances ``A`` (`M_u x B`) of a minibatch.

        Args:
            A: `M_u x B` whitened cross-covariances :math:`L^{-1} K_{uB}`.
            weights: `B` inverse noise variances.
            resid: `B` residuals.
            scale: ``n / b``, the minibatch's share of the data.
            step: :math:`\gamma`; the first step is always 1 (from the prior).
        """
        gamma = 1.0 if int(self.steps) == 0 else step
        G, h = (A * weights) @ A.mT, A @ (weights * resid)
        ranks = current_ranks()
        if ranks is not None:  # each rank holds a share of the minibatch
            G, h = ranks.all_reduce_sum([G, h])
        precision = torch.eye(A.shape[0], dtype=A.dtype, device=A.device).add_(G, alpha=scale)
        self.precision.mul_(1 - gamma).add_(precision, alpha=gamma)
        self.shift.mul_(1 - gamma).add_(h, alpha=gamma * scale)
        self.steps += 1


def _kl(m: Tensor, Lq: Tensor) -> Tensor:
    r""":math:`\mathrm{KL}(\mathcal N(m, S) \,\|\, \mathcal N(0, I))` with :math:`S^{-1} = L_q L_q^\top`."""
    eye = torch.eye(Lq.shape[-1], dtype=Lq.dtype, device=Lq.device)
    trace_S = solve_triangular(Lq, eye, upper=False).square().sum()
    return 0.5 * (trace_S + m.square().sum() - m.numel() + 2 * Lq.diagonal().log().sum())


class VariationalFactor(Factor):
    """The optimal :math:`q` at fixed hyperparameters and inducing inputs, for prediction (module docstring).

    Attributes:
        L: `M_u x M_u` lower factor of :math:`K_{uu}` (jittered).
        m: `M_u` variational mean (whitened).
        Lq: lower factor of :math:`S^{-1}`.
        elbo: the full-data evidence lower bound at this :math:`q` (internal units).
    """

    def __init__(
        self, engine: VariationalELBO, kernel: Kernel, data: ObservedRows, noise: Tensor, resid: Tensor
    ) -> None:
        super().__init__(engine, kernel, data, noise, resid)
        state = engine.state
        self.state = state
        self.L = state.cholesky(kernel)
        size = self.L.shape[-1]
        G = torch.zeros(size, size, dtype=noise.dtype, device=noise.device)
        h = torch.zeros(size, dtype=noise.dtype, device=noise.device)
        sums = torch.zeros(3, dtype=noise.dtype, device=noise.device)  # sum r^2/s2, sum log 2 pi s2, sum k_ii/s2
        for rows, index in engine.chunks(data, state, current_ranks()):
            A = solve_triangular(self.L, state.covariance(kernel, rows), upper=False)
            w, r = 1.0 / noise[index], resid[index]
            G.addmm_(A * w, A.mT)
            h.add_(A @ (w * r))
            prior = rows.prior_variance(kernel)
            sums += torch.stack([(w * r * r).sum(), torch.log(2 * math.pi * noise[index]).sum(), (prior * w).sum()])
        ranks = current_ranks()
        if ranks is not None:  # every rank streamed its share of the points
            G, h, sums = ranks.all_reduce_sum([G, h, sums])
        precision = G + torch.eye(size, dtype=G.dtype, device=G.device)
        self.Lq, info = torch.linalg.cholesky_ex(precision)
        if bool(info.any()):
            raise CholeskyError("the optimal variational precision is not positive definite (non-finite data?)")
        self.m = torch.cholesky_solve(h.unsqueeze(-1), self.Lq).squeeze(-1)
        S_G = torch.cholesky_solve(G, self.Lq).diagonal().sum()  # tr(S G)
        fit = sums[0] - 2 * (self.m @ h) + self.m @ (G @ self.m)
        self.elbo = -0.5 * (sums[1] + fit + sums[2] - G.diagonal().sum() + S_G) - _kl(self.m, self.Lq)
        self.alpha = self.m  # the weights the posterior mean applies (to whitened covariances)

    def solve(self, rhs: Tensor) -> Tensor:
        """Not defined: the approximation has no :math:`A^{-1}` of the training rows."""
        raise NotImplementedError("the variational engine has no solve with the training covariance")

    def negative_log_marginal(self) -> Tensor:
        """Minus the full-data ELBO (a lower bound of the log marginal likelihood) at the optimal :math:`q`."""
        return -self.elbo

    def chunk_points(self, rows_per_point: int) -> int:
        """Test points per call: cross-covariances with the :math:`M_u` inducing variables, not the `N` rows."""
        return max(1, CHUNK_ELEMENTS // (rows_per_point * self.L.shape[-1]))

    def posterior_memory(self, test: ObservedRows, mode: str) -> int:
        """Bytes at the peak of :meth:`posterior`: `m x M_u` matrices (and `m x m` in ``"cov"`` mode)."""
        m, size = test.num_rows, self.L.shape[-1]
        batch = test.batch_shape.numel()
        elements = self.cross_matrices * m * size + (self.covariance_matrices * m * m if mode == "cov" else 0)
        return batch * elements * self.m.element_size()

    def posterior(self, test: ObservedRows, mode: str) -> tuple[Tensor, Tensor | None]:
        """Mean and (by ``mode``) variances or covariance of test rows under :math:`q` (module docstring)."""
        self.check_posterior_memory(test, mode)
        A = solve_triangular(self.L, self.state.covariance(self.kernel, test), upper=False)  # ... x M_u x m
        mean = (A * self.m.unsqueeze(-1)).sum(-2)
        if mode == "mean":
            return mean, None
        B = solve_triangular(self.Lq, A, upper=False)
        error = test.white_variance(self.state.approximation_error)
        if mode == "cov":
            return mean, test.scaled_covariance(self.kernel) - A.mT @ A + B.mT @ B + torch.diag_embed(error)
        reduction = A.square().sum(-2) - B.square().sum(-2)
        return mean, (test.prior_variance(self.kernel) - reduction).clamp_min(0.0) + error

    def extend(self, new: ObservedRows, noise: Tensor, resid: Tensor, kernel: Kernel | None = None) -> Factor:
        """Refused: conditioning and fantasies are not defined for the variational approximation."""
        raise NotImplementedError(
            "the variational engine does not condition on new observations (no fantasies, condition_on_observations "
            "or knowledge-gradient acquisition): refit the model with the new data, or use an exact engine "
            "(inference='dense' or 'iterative')"
        )


class VariationalELBO(Engine):
    r"""Sparse variational inference with inducing values and directional derivatives (module docstring).

    Args:
        num_inducing: inducing points ``M`` (default: :func:`default_options`).
        directions: directional derivatives per inducing point, 0 to d (``d``: full gradients).
        batch_size: points per minibatch.
        step: natural-gradient step :math:`\gamma` of :math:`q`, in (0, 1].

    Raises:
        ValueError: an option out of range (the message names it).
    """

    name = "variational"
    stochastic = True
    approximate = True
    subset_engine = "dense"
    optimizer = "adam"
    maxiter = 1000
    lr = 0.01
    patience = 100
    warm_start_rows = 1000

    #: Options a model passes through ``inference_options`` (saved with it).
    option_names: ClassVar[tuple[str, ...]] = ("num_inducing", "directions", "batch_size", "step")

    def __init__(
        self,
        num_inducing: int | None = None,
        directions: int | None = None,
        batch_size: int | None = None,
        step: float | None = None,
    ) -> None:
        for name, value in (("num_inducing", num_inducing), ("directions", directions), ("batch_size", batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
                raise TypeError(f"inference_options['{name}']: expected an int, got {value!r}")
            minimum = 0 if name == "directions" else 1
            if value is not None and value < minimum:
                raise ValueError(f"inference_options['{name}']: expected an int >= {minimum}, got {value!r}")
        if step is not None and not (isinstance(step, (int, float)) and 0 < step <= 1):
            raise ValueError(f"inference_options['step']: expected a number in (0, 1], got {step!r}")
        self.options = {"num_inducing": num_inducing, "directions": directions, "batch_size": batch_size, "step": step}
        self.state: InducingVariables | None = None

    def supports(
        self, kernel: Kernel, data: ObservedRows, *, shared_grad_noise: bool, noise_by_kind: bool = True
    ) -> str | None:
        """Any kernel and rows, but one data set: not a batch of them (BoTorch's batched models)."""
        if data.batch_shape.numel() > 1 or len(data.batch_shape):
            return (
                f"inference='variational' takes one data set, got a batch of shape {tuple(data.batch_shape)}; "
                "use inference='dense' for batched models"
            )
        return None

    def resolved(self, n: int, d: int) -> dict[str, int | float]:
        """The options for `n` points in `d` dimensions: the given ones, defaults for the rest."""
        given = {k: v for k, v in self.options.items() if v is not None}
        if "directions" in given and given["directions"] > d:
            raise ValueError(f"inference_options['directions']: expected at most d = {d}, got {given['directions']}")
        return {**default_options(n, d, given.get("directions")), **given}

    def make_state(self, kernel: Kernel, data: ObservedRows) -> InducingVariables:
        """Inducing points at k-means centres of the inputs (the inputs themselves when ``M >= n``)."""
        options = self.resolved(data.n, data.d)
        M = min(int(options["num_inducing"]), data.n)
        X = data.X.detach()
        if M == data.n:
            Z = X.clone()
        else:
            rng = np.random.default_rng(0)  # a model's initial state does not depend on global random numbers
            sample = X.cpu().double().numpy()
            if sample.shape[0] > KMEANS_SAMPLE:
                sample = sample[rng.choice(sample.shape[0], KMEANS_SAMPLE, replace=False)]
            centres, _ = kmeans2(sample, M, minit="++", seed=rng)
            Z = torch.as_tensor(centres, dtype=X.dtype, device=X.device)
        generator = torch.Generator().manual_seed(0)
        self.state = InducingVariables(Z, int(options["directions"]), generator).to(X.device)
        self.batch_size = int(options["batch_size"])
        self.step = float(options["step"])
        return self.state

    def memory_estimate(self, data: ObservedRows, dtype: torch.dtype) -> int:
        """Bytes of the minibatch's cross-covariances and a few `M_u x M_u` matrices (independent of N)."""
        options = self.resolved(data.n, data.d)
        size = int(options["num_inducing"]) * (1 + data.d)
        rows = int(options["batch_size"]) * (1 + data.d)
        return 6 * (size * size + size * rows) * (torch.finfo(dtype).bits // 8)

    def chunks(self, data: ObservedRows, state: InducingVariables, ranks=None):  # noqa: ANN001, ANN201
        """``(rows, index)`` of consecutive chunks of points: cross-covariances of at most ``CHUNK_ELEMENTS / 2``.

        With ``ranks`` (:class:`~gpderiv.inference.distributed.Ranks`), only this rank's share of the points.
        """
        width = state.Z.shape[0] * (1 + data.d) * (1 + data.d)
        size = max(1, CHUNK_ELEMENTS // 2 // width)
        share = slice(0, data.n) if ranks is None else ranks.share(data.n)
        for start in range(share.start, share.stop, size):
            yield data.subset(torch.arange(start, min(start + size, share.stop), device=data.X.device))

    def negative_log_marginal(self, kernel: Kernel, data: ObservedRows, noise: Tensor, resid: Tensor) -> Tensor:
        """Minus the minibatch estimate of the ELBO after one natural-gradient step of :math:`q` (module docstring).

        Differentiable in the kernel's hyperparameters, the noise, the residual and the inducing
        points and directions; :math:`q` is updated in place (a side effect of training).
        """
        ranks = current_ranks()
        world = 1 if ranks is None else ranks.size
        b = min(self.batch_size * world, data.n)  # one minibatch per rank
        if b < data.n:
            points = torch.randperm(data.n, device=data.X.device)[:b]
            points = points if ranks is None else ranks.broadcast(points)  # rank 0's draw, shared out
        elif ranks is not None:
            points = torch.arange(data.n, device=data.X.device)  # full batch, split across the ranks
        else:
            points = None
        return self.minibatch_loss(kernel, data, noise, resid, points, update=True)

    def minibatch_loss(
        self,
        kernel: Kernel,
        data: ObservedRows,
        noise: Tensor,
        resid: Tensor,
        points: Tensor | None,
        update: bool = False,
    ) -> Tensor:
        """Minus the unbiased estimate of the ELBO from the rows at ``points`` (None: all; exact).

        Under ``torch.distributed`` each rank takes its share of ``points``: the natural step sums
        the statistics of all shares (every rank then holds the same :math:`q`), and the loss is
        this rank's share of the total (the KL term split evenly), whose sum over ranks
        :meth:`agree` forms, with the gradients.

        Args:
            kernel: the kernel (block layout, internal units).
            data: the `N` training rows.
            noise: `N` noise variances.
            resid: `N` residual.
            points: `b` distinct point indices of the minibatch, or None for all points.
            update: take the natural-gradient step of :math:`q` first (full step for all points).
        """
        state, ranks = self.state, current_ranks()
        scale = 1.0 if points is None else data.n / points.numel()
        full = points is None or points.numel() == data.n
        if ranks is not None and points is not None:
            points = points[ranks.share(points.numel())]
        rows, index = (data, slice(None)) if points is None else data.subset(points)
        noise, resid = noise[index], resid[index]
        L = state.cholesky(kernel)
        A = solve_triangular(L, state.covariance(kernel, rows), upper=False)  # M_u x B
        if update:
            state.natural_step(A.detach(), 1.0 / noise.detach(), resid.detach(), scale, 1.0 if full else self.step)
        m, Lq = state.q()
        B = solve_triangular(Lq, A, upper=False)
        var = rows.prior_variance(kernel) - A.square().sum(0) + B.square().sum(0)
        expected = torch.log(2 * math.pi * noise) + ((resid - A.mT @ m).square() + var) / noise
        return 0.5 * scale * expected.sum() + _kl(m, Lq) / (1 if ranks is None else ranks.size)

    @torch.no_grad()
    def expected_errors(
        self, kernel: Kernel, data: ObservedRows, noise: Tensor, resid: Tensor, points: int
    ) -> tuple[Tensor, Tensor]:
        r"""Sums and counts per kind of :math:`e_i = (r_i - a_i^\top m)^2 + \kappa_i` at rows :math:`q` did not see.

        :math:`q` takes a full natural step (:math:`\gamma = 1`) on ``points`` random points (scaled
        to all `n`); the errors are those of the rows of as many other points (held out, so not
        biased low by the fit), divided by the rows' ``noise_ratio``. Under ``torch.distributed``
        the ranks share both sets (rank 0's draw) and sum the results.

        Returns:
            ``(sums, counts)``, each `d + 3` (:meth:`Engine.expected_errors`).
        """
        state, ranks = self.state, current_ranks()
        b = max(1, min(points, data.n // 2))
        order = torch.randperm(data.n, device=data.X.device)[: 2 * b]
        order = order if ranks is None else ranks.broadcast(order)
        fit, test = order[:b], order[b:] if order.numel() > b else order[:b]
        if ranks is not None:
            fit, test = fit[ranks.share(fit.numel())], test[ranks.share(test.numel())]
        L = state.cholesky(kernel)
        rows, index = data.subset(fit)
        A = solve_triangular(L, state.covariance(kernel, rows), upper=False)
        state.steps.zero_()  # a full step: q from this sample alone
        state.natural_step(A, 1.0 / noise[index], resid[index], data.n / b, 1.0)
        m, Lq = state.q()
        rows, index = data.subset(test)
        A = solve_triangular(L, state.covariance(kernel, rows), upper=False)
        B = solve_triangular(Lq, A, upper=False)
        var = rows.prior_variance(kernel) - A.square().sum(0) + B.square().sum(0)
        errors = (resid[index] - A.mT @ m).square() + var.clamp_min(0.0)
        if rows.noise_ratio is not None:
            errors = errors / rows.noise_ratio
        kinds = rows.kinds
        sums = torch.zeros(data.d + 3, dtype=errors.dtype, device=errors.device).index_add_(0, kinds, errors)
        counts = torch.zeros_like(sums).index_add_(0, kinds, torch.ones_like(errors))
        if ranks is not None:
            sums, counts = ranks.all_reduce_sum([sums, counts])
        return sums, counts

    def agree(self, loss: Tensor, params: Sequence[Tensor]) -> Tensor:
        """The sums over ``torch.distributed`` ranks of their shares of the loss and its gradients (else ``loss``)."""
        ranks = current_ranks()
        if ranks is None:
            return loss
        grads = [p.grad for p in params if p.grad is not None]
        total = ranks.all_reduce_sum([loss.detach().reshape(1), *grads])
        for g, value in zip(grads, total[1:], strict=True):
            g.copy_(value)
        return total[0][0]

    def factor(self, kernel: Kernel, data: ObservedRows, noise: Tensor, resid: Tensor) -> VariationalFactor:
        """The optimal :math:`q` by one streaming pass over the data (module docstring)."""
        return VariationalFactor(self, kernel, data, noise, resid)
