r"""The contract every inference engine meets: :class:`Engine` and the :class:`Factor` it returns.

Every engine computes the same things for the same model; engines differ only in how.

**What an engine receives.** A derivative kernel :math:`k` (block layout, internal units), the
observed rows (:class:`~gpderiv.observed_rows.ObservedRows`: training inputs :math:`X` and the
linear functional :math:`L_i` of f observed in each row :math:`i = 1..N`), the noise variance
:math:`\sigma_i^2` of each row and the residual :math:`r = y - \mu` (targets minus prior mean).
The rows' noiseless covariance is :math:`K_{ij} = L_i L'_j k(x, x')` and the system matrix

.. math:: A = K + \operatorname{diag}(\sigma^2).

**What it returns.**

* :meth:`Engine.negative_log_marginal`: the scalar
  :math:`\mathcal L = \tfrac12 r^\top A^{-1} r + \tfrac12 \log|A| + \tfrac N2 \log 2\pi`,
  differentiable with respect to the kernel's hyperparameters, the noise and the residual
  (exact, or an unbiased stochastic estimate: then the engine says so in its docstring).
* :meth:`Engine.factor`: a :class:`Factor` of :math:`A` at fixed hyperparameters, computed once
  and cached by the model, with :math:`\alpha = A^{-1} r` and the posterior at test points:
  for test rows :math:`*` (values and gradients, or other functionals)

  .. math:: \mathbb E[f_*] = K_{*X}\,\alpha, \qquad
            \operatorname{Cov}[f_*] = K_{**} - K_{*X} A^{-1} K_{X*}

  (zero prior mean: the model adds its mean), and :meth:`Factor.extend` for new observations.
* :meth:`Engine.supports`: ``None`` when the engine applies to a kernel and rows, else the reason.
* :meth:`Engine.memory_estimate`: bytes at the peak of one evaluation, checked by
  :meth:`Engine.check_memory` before anything large is allocated.

* :meth:`Engine.make_state`: for an engine with trainable state of its own (the variational
  engine's inducing variables) the module that holds it; None for exact engines.

An approximate engine (:attr:`Engine.approximate`) returns minus a lower bound of the log marginal
likelihood instead of :math:`\mathcal L`, and a factor whose posterior approximates the exact one.

**Adding an engine.** Subclass :class:`Engine` (and :class:`Factor` when the default
prediction through a dense cross-covariance does not suit it) in one module and register it:
``gpderiv.inference.register_engine("name", MyEngine)``. ``DerivativeGP(..., inference="name")``
and ``DerivativeGPModel(..., inference="name")`` then use it (constructor options through
``inference_options``); nothing else changes.
"""

from __future__ import annotations

import math
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from gpytorch.kernels import Kernel
from torch import Tensor

from gpderiv.exceptions import ProblemTooLargeError
from gpderiv.observed_rows import ObservedRows

__all__ = [
    "Engine",
    "Factor",
    "FactorCache",
    "available_memory",
    "cgroup_headroom",
    "fold_batch",
    "require_memory",
]

#: Elements of one `chunk x N` cross-covariance in prediction (64 MiB in float64).
CHUNK_ELEMENTS = 2**23
#: Where the kernel reports memory (a module constant, so tests can point it at a fake file).
MEMINFO_PATH = "/proc/meminfo"
#: Where the container's memory controller is mounted (cgroup v2 files at its top, v1 under ``memory/``).
CGROUP_ROOT = "/sys/fs/cgroup"
#: A cgroup limit at or above this many bytes (1 EiB) means "no limit": cgroup v1 writes 2^63 - 4096.
CGROUP_NO_LIMIT = 2**60
#: ``(limit, usage, statistics, reclaimable key)`` files of cgroup v2 and v1, relative to :data:`CGROUP_ROOT`.
_CGROUP_FILES = (
    ("memory.max", "memory.current", "memory.stat", "inactive_file"),
    ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat", "total_inactive_file"),
)


def _read_int(path: str) -> int | None:
    """The non-negative integer in a one-value file; None when missing, unreadable, ``max`` or garbage."""
    try:
        with open(path) as fh:
            value = int(fh.read().strip())
    except (OSError, ValueError):
        return None
    return value if value >= 0 else None


def _read_stat(path: str, key: str) -> int:
    """The value of ``key`` in a ``key value`` statistics file (0 when missing or unreadable)."""
    try:
        with open(path) as fh:
            for line in fh:
                fields = line.split()
                if len(fields) == 2 and fields[0] == key and fields[1].isdigit():
                    return int(fields[1])
    except (OSError, UnicodeDecodeError):
        pass
    return 0


def cgroup_headroom(root: str | os.PathLike = CGROUP_ROOT) -> int | None:
    """Bytes this process's container may still allocate before its memory limit (None: no limit known).

    cgroup v2: ``memory.max - memory.current``; cgroup v1: ``memory/memory.limit_in_bytes -
    memory/memory.usage_in_bytes``; in both, the reclaimable page cache (``inactive_file`` in
    ``memory.stat``) counts as free, as ``docker stats`` counts it. A limit of ``max``, one at or
    above :data:`CGROUP_NO_LIMIT`, and missing, unreadable or garbled files mean no limit; when
    both versions give one, the smaller headroom.

    Args:
        root: the mount point of the cgroup file system.
    """
    headrooms = []
    for limit_file, usage_file, stat_file, reclaimable in _CGROUP_FILES:
        limit = _read_int(os.path.join(root, limit_file))
        usage = _read_int(os.path.join(root, usage_file))
        if limit is None or usage is None or limit >= CGROUP_NO_LIMIT:
            continue
        used = max(0, usage - _read_stat(os.path.join(root, stat_file), reclaimable))
        headrooms.append(max(0, limit - used))
    return min(headrooms) if headrooms else None


def _mem_available() -> int | None:
    """``MemAvailable`` of :data:`MEMINFO_PATH` in bytes (None if unknown)."""
    try:
        with open(MEMINFO_PATH) as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory(device: torch.device) -> int | None:
    """Bytes of memory available on ``device`` (None if unknown).

    On a GPU, the free memory CUDA reports. On the CPU, the smaller of the kernel's
    ``MemAvailable`` and the headroom under the container's memory limit (:func:`cgroup_headroom`):
    in a container the machine's free memory is not the process's to take.
    """
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    known = [b for b in (_mem_available(), cgroup_headroom(CGROUP_ROOT)) if b is not None]
    return min(known) if known else None


def fold_batch(solve: Callable[[Tensor], Tensor], B: Tensor) -> Tensor:
    """``solve`` (of an unbatched `N x t` matrix) applied to `... x N x t` ``B``, the batch folded into columns.

    Fantasies share their parent's unbatched factor: one solve with all their columns.
    """
    if B.dim() <= 2:
        return solve(B)
    N = B.shape[-2]
    folded = B.movedim(-2, 0).reshape(N, -1)
    return solve(folded).reshape(N, *B.shape[:-2], B.shape[-1]).movedim(0, -2)


def require_memory(need: int, device: torch.device, what: str, advice: str) -> None:
    """Raise :class:`ProblemTooLargeError` when ``need`` bytes exceed the memory available on ``device``.

    Args:
        need: bytes needed.
        device: where they would be allocated.
        what: what needs them (the start of the message).
        advice: what to do instead (the end of the message).
    """
    have = available_memory(device)
    if have is not None and need > have:
        raise ProblemTooLargeError(
            f"{what} needs about {format_bytes(need)}, but {device} has {format_bytes(have)} available. {advice}"
        )


def format_bytes(size: int) -> str:
    """``size`` bytes in the largest binary unit that keeps it at 1 or more: ``"724.2 GiB"``, ``"5.0 MiB"``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


class Factor(ABC):
    r"""A factorisation of :math:`A = K + \operatorname{diag}(\sigma^2)` for prediction (no autograd graph).

    Args:
        engine: the engine that made it.
        kernel: the kernel it was made with.
        data: the training rows.
        noise: `N` noise variances.
        resid: `N` residual ``r``.

    Attributes:
        alpha: `N` weights :math:`A^{-1} r`, set by the engine.
    """

    alpha: Tensor

    #: `m x N` matrices alive at the peak of :meth:`posterior` for `m` test rows: the cross-covariance,
    #: its solved (whitened) copy and a temporary of the same size (an engine whose solves keep more
    #: `N x m` matrices, CG's for instance, says so).
    cross_matrices: ClassVar[int] = 3
    #: `m x m` matrices alive at the peak of a ``"cov"`` posterior: the prior covariance, the reduction
    #: and their difference (the front ends then scale it to the user's units).
    covariance_matrices: ClassVar[int] = 3

    def __init__(self, engine: Engine, kernel: Kernel, data: ObservedRows, noise: Tensor, resid: Tensor) -> None:
        self.engine, self.kernel, self.data = engine, kernel, data
        # Not detached: a factor grown by fantasy observations is differentiable in them.
        self.noise, self.resid = noise, resid
        #: The row sets of the factor, in its row order (more than one after :meth:`extend`).
        self.parts: tuple[ObservedRows, ...] = (data,)

    @abstractmethod
    def solve(self, rhs: Tensor) -> Tensor:
        """:math:`A^{-1}` times an `N` vector or `N x t` matrix."""

    def negative_log_marginal(self) -> Tensor:
        r""":math:`\mathcal L` at the factor's hyperparameters (no graph); engines with the terms at hand override."""
        with torch.no_grad():
            return self.engine.negative_log_marginal(self.kernel, self.data, self.noise, self.resid)

    def mean(self, K_cross: Tensor) -> Tensor:
        r"""`... x m` posterior mean contribution :math:`K_{*X} \alpha` for a `... x m x N` cross-covariance."""
        return (K_cross @ self.alpha.unsqueeze(-1)).squeeze(-1)

    def variance_reduction(self, K_cross: Tensor) -> Tensor:
        """`m` diagonal of :math:`K_{*X} A^{-1} K_{X*}`."""
        return (K_cross * self.solve(K_cross.transpose(-1, -2)).transpose(-1, -2)).sum(-1)

    def covariance_reduction(self, K_cross: Tensor) -> Tensor:
        """`m x m` matrix :math:`K_{*X} A^{-1} K_{X*}`."""
        return K_cross @ self.solve(K_cross.transpose(-1, -2))

    def posterior(self, test: ObservedRows, mode: str) -> tuple[Tensor, Tensor | None]:
        """Posterior mean and (by ``mode``) nothing, variances or covariance of test rows (zero prior mean).

        The default forms the `m x N` cross-covariance; engines with structure override it.

        Args:
            test: the test rows (:meth:`ObservedRows.block` for ``[f, grad f]`` at test points).
            mode: ``"mean"`` (variance None: no solves), ``"var"`` (`m` variances) or ``"cov"``
                (`m x m` covariance).

        Returns:
            ``(mean, variance or covariance or None)`` in the row order of ``test``.

        Raises:
            ProblemTooLargeError: the matrices would not fit in memory (:meth:`check_posterior_memory`).
        """
        self.check_posterior_memory(test, mode)
        K_cross = self.cross_covariance(test)
        mean = self.mean(K_cross)
        if mode == "mean":
            return mean, None
        if mode == "cov":
            return mean, test.scaled_covariance(self.kernel) - self.covariance_reduction(K_cross)
        return mean, (test.prior_variance(self.kernel) - self.variance_reduction(K_cross)).clamp_min(0.0)

    def posterior_memory(self, test: ObservedRows, mode: str) -> int:
        """Bytes at the peak of :meth:`posterior` for ``test`` rows in ``mode``.

        :attr:`cross_matrices` `m x N` matrices, and in ``"cov"`` mode :attr:`covariance_matrices`
        `m x m` ones, per member of the broadcast batch of the test rows and the factor.
        """
        m, N = test.num_rows, self.alpha.shape[-1]
        batch = torch.broadcast_shapes(test.batch_shape, self.alpha.shape[:-1]).numel()
        elements = self.cross_matrices * m * N + (self.covariance_matrices * m * m if mode == "cov" else 0)
        return batch * elements * self.alpha.element_size()

    def check_posterior_memory(self, test: ObservedRows, mode: str) -> None:
        """Refuse, before allocating, a posterior whose matrices do not fit in the memory available.

        Args:
            test: the test rows.
            mode: as in :meth:`posterior`.

        Raises:
            ProblemTooLargeError: naming the number of test rows and what to do instead.
        """
        kind = {"cov": "joint covariance", "var": "variances"}.get(mode, "mean")
        batch = torch.broadcast_shapes(test.batch_shape, self.alpha.shape[:-1])
        batched = f" in a batch of {batch.numel()}" if batch.numel() > 1 else ""
        what = (
            f"The posterior {kind} of {test.num_rows} test rows{batched} (against N = {self.alpha.shape[-1]} "
            f"training rows, {self.alpha.dtype})"
        )
        if mode == "cov":
            advice = (
                "Ask for the joint covariance of fewer test points per call: DerivativeGP.predict(..., "
                "full_cov=False) gives the variances in chunks; a BoTorch posterior needs fewer points (q) "
                "or a smaller batch per call."
            )
        else:
            advice = "Predict fewer test points per chunk: predict(..., chunk_size=k) with a smaller k."
        require_memory(self.posterior_memory(test, mode), self.alpha.device, what, advice)

    def chunk_points(self, rows_per_point: int) -> int:
        """Test points per :meth:`posterior` call: cross-covariance chunks of :data:`CHUNK_ELEMENTS`."""
        return max(1, CHUNK_ELEMENTS // (rows_per_point * self.data.num_rows))

    def cross_covariance(self, test: ObservedRows) -> Tensor:
        """`... x m x N` covariance of test rows with the factor's rows (every part, in order)."""
        blocks = [test.scaled_covariance(self.kernel, part) for part in self.parts]
        if len(blocks) == 1:
            return blocks[0]
        batch = torch.broadcast_shapes(*(K.shape[:-2] for K in blocks))
        return torch.cat([K.expand(*batch, *K.shape[-2:]) for K in blocks], -1)

    def _grow_blocks(self, new: ObservedRows, noise: Tensor) -> tuple[Tensor, Tensor]:
        """``(A12, A22)``: `... x N x N'` covariance of the factor's rows with new rows, and their noisy covariance."""
        A12 = self.cross_covariance(new).mT
        return A12, new.scaled_covariance(self.kernel) + torch.diag_embed(noise)

    def _grow_vectors(self, noise: Tensor, resid: Tensor) -> tuple[Tensor, Tensor]:
        """The factor's noise and residual followed by the new rows', broadcast over their batch shapes."""
        batch = torch.broadcast_shapes(self.resid.shape[:-1], resid.shape[:-1])
        noise = torch.cat([self.noise.expand(*batch, -1), noise.expand(*batch, -1)], -1)
        return noise, torch.cat([self.resid.expand(*batch, -1), resid.expand(*batch, -1)], -1)

    def extend(self, new: ObservedRows, noise: Tensor, resid: Tensor, kernel: Kernel | None = None) -> Factor:
        """The factor of the system grown by new rows (conditioning, fantasies); ``self`` is unchanged.

        The default grows any factor through the Schur complement
        (:class:`~gpderiv.inference.grown.GrownFactor`); engines with a faster way override it.
        Differentiable in the new rows (inputs and residuals), as fantasies need.

        Args:
            new: the new rows (internal units), with their own inputs; batched for fantasies.
            noise: their `... x N'` noise variances.
            resid: their `... x N'` residuals.
            kernel: the kernel the grown factor answers with from now on (default: this factor's), e.g.
                a conditioned model's own copy; its hyperparameters must equal this factor's.
        """
        from gpderiv.inference.grown import GrownFactor  # it builds on this class

        return GrownFactor(self, new, noise, resid, kernel)


class DirectPredictionFactor(Factor):
    """A factor whose :meth:`predict` gives means and variances of ``[f, grad f]`` without a cross-covariance."""

    def chunk_points(self, rows_per_point: int) -> int:
        """All test points at once: :meth:`predict` chunks internally and forms no cross-covariance."""
        return sys.maxsize

    def posterior(self, test: ObservedRows, mode: str) -> tuple[Tensor, Tensor | None]:
        """Means and variances of ``[f, grad f]`` without a cross-covariance (:meth:`predict`); else the default."""
        if mode == "cov" or not test.values_and_gradients:
            return super().posterior(test, mode)
        mean, var = self.predict(test.X, variance=mode == "var")
        return mean, None if var is None else var.clamp_min(0.0)

    @abstractmethod
    def predict(self, xs: Tensor, variance: bool = True) -> tuple[Tensor, Tensor | None]:
        """Posterior mean (zero prior mean) and, if asked, variance of ``[f, grad f]`` at `m x d` test points."""


class Engine(ABC):
    """An inference engine: marginal likelihood and factorisation of the GP (module docstring).

    Subclasses set :attr:`name`, implement :meth:`negative_log_marginal`, :meth:`factor`,
    :meth:`memory_estimate` and, when their scope is narrower than every kernel and row set,
    :meth:`supports`.
    """

    #: The name under which the engine is registered (``inference=name``).
    name: ClassVar[str]
    #: Whether the factor and the marginal likelihood are expensive enough that a model computes
    #: them on first use rather than after every fit (matrix-free engines).
    lazy: ClassVar[bool] = False
    #: Whether :meth:`negative_log_marginal` is a stochastic estimate (its derivatives by finite
    #: differences, e.g. the Hessian of :mod:`gpderiv.inference.laplace`, are then noise).
    stochastic: ClassVar[bool] = False
    #: Whether the engine approximates the posterior (variational): ``inference="auto"`` then warns,
    #: and :meth:`negative_log_marginal` is minus a lower bound of the log marginal likelihood.
    approximate: ClassVar[bool] = False
    #: Name of the engine used for a subset-of-data fit (None: this one).
    subset_engine: ClassVar[str | None] = None
    #: What to do when the memory check fails (appended to the error).
    memory_advice: ClassVar[str] = ""
    #: How a model fits with this engine by default: the optimiser (``"lbfgs"`` or ``"adam"``), its
    #: iteration limit (None: 200 for L-BFGS, 100 for Adam), Adam's learning rate, and the early stop
    #: of a stochastic objective (None: none; else the window of iterations whose mean loss must improve).
    optimizer: ClassVar[str] = "lbfgs"
    maxiter: ClassVar[int | None] = None
    lr: ClassVar[float] = 0.1
    patience: ClassVar[int | None] = None
    #: Before the fit proper, fit the hyperparameters exactly (``subset_engine``) on a compact window
    #: of about this many rows (:func:`gpderiv.fitting.warm_start`); None: no warm start.
    warm_start_rows: ClassVar[int | None] = None
    #: Keyword options of the constructor, which a model takes as ``inference_options`` (and saves).
    option_names: ClassVar[tuple[str, ...]] = ()

    def make_state(self, kernel: Kernel, data: ObservedRows) -> torch.nn.Module | None:
        """The engine's own trainable state for these rows (inducing variables), or None (exact engines).

        A model registers the module as its ``engine_state``: :meth:`fit` trains its parameters with
        the hyperparameters, ``state_dict``/``save``/``load`` keep it, ``.to()`` moves it, and a
        change of it invalidates the cached factor.
        """
        return None

    def supports(
        self, kernel: Kernel, data: ObservedRows, *, shared_grad_noise: bool, noise_by_kind: bool = True
    ) -> str | None:
        """``None`` when the engine applies, else the reason (a sentence naming what to change).

        Args:
            kernel: the model's kernel.
            data: the training rows.
            shared_grad_noise: whether all partial derivatives share one noise variance parameter.
            noise_by_kind: whether the noise variance of a row depends on its kind alone (one variance
                for all values, one per derivative dimension), not on its point.
        """
        return None

    @abstractmethod
    def memory_estimate(self, data: ObservedRows, dtype: torch.dtype) -> int:
        """Bytes at the peak of one marginal likelihood + gradient evaluation."""

    def check_memory(self, data: ObservedRows, dtype: torch.dtype, device: torch.device) -> None:
        """Refuse, before allocating, a problem that does not fit in the memory available on ``device``.

        Raises:
            ProblemTooLargeError: with the estimate, what is available, and what to do.
        """
        what = f"The {self.name} engine, for N = {data.num_rows} observed rows at n = {data.n} points ({dtype}),"
        require_memory(self.memory_estimate(data, dtype), device, what, self.memory_advice)

    @abstractmethod
    def negative_log_marginal(self, kernel: Kernel, data: ObservedRows, noise: Tensor, resid: Tensor) -> Tensor:
        r"""Differentiable :math:`\mathcal L` (module docstring).

        Args:
            kernel: the kernel (block layout, internal units).
            data: the `N` training rows.
            noise: `N` noise variances.
            resid: `N` residual.

        Returns:
            Scalar tensor.
        """

    @abstractmethod
    def factor(self, kernel: Kernel, data: ObservedRows, noise: Tensor, resid: Tensor) -> Factor:
        """The :class:`Factor` of the system for prediction (arguments as :meth:`negative_log_marginal`)."""

    def expected_errors(
        self, kernel: Kernel, data: ObservedRows, noise: Tensor, resid: Tensor, points: int
    ) -> tuple[Tensor, Tensor] | None:
        r"""Per observation kind, sums and counts of expected squared errors over rows, or None.

        An approximate engine whose bound has a Gaussian expected log-likelihood
        :math:`-\tfrac12\sum_i[\log 2\pi\sigma_i^2 + e_i/\sigma_i^2]` returns, over the rows of
        about ``points`` random points, the sums of :math:`e_i / \rho_i` (:math:`\rho_i` the row's
        ``noise_ratio``) and the row counts, each of length `d + 3` (the kinds of
        :class:`~gpderiv.observed_rows.ObservedRows`): a group's mean is the bound's maximiser over
        its noise variance (:func:`gpderiv.fitting.noise_from_bound`). Exact engines: None.
        """
        return None

    def agree(self, loss: Tensor, params: Sequence[Tensor]) -> Tensor:
        """The loss, and the gradients in ``params``' ``.grad``, that the optimiser steps with.

        An engine that splits its work across ``torch.distributed`` processes returns the same on
        every one (and writes the same gradients), so that their fits stay in lock-step; here,
        ``loss`` as it is.

        Args:
            loss: the scalar loss, after ``backward()``.
            params: the parameters being optimised.
        """
        return loss


def gaussian_constant(N: int) -> float:
    r"""The constant :math:`\tfrac N2 \log 2\pi` of an `N`-dimensional Gaussian log density."""
    return 0.5 * N * math.log(2 * math.pi)


class FactorCache:
    """A factor kept while the hyperparameters it was made with stay the same.

    Compared by value (GPyTorch's setters write through ``.data``, which bumps no version
    counter), over the parameters and buffers of the modules that define the factor.
    """

    def __init__(self) -> None:
        self._key: Tensor | None = None
        self._factor: Factor | None = None

    @staticmethod
    def _key_of(modules: tuple[torch.nn.Module, ...]) -> Tensor:
        return torch.cat([t.detach().reshape(-1) for m in modules for t in (*m.parameters(), *m.buffers())])

    def get(self, modules: tuple[torch.nn.Module, ...]) -> Factor | None:
        """The stored factor if ``modules`` hold the values it was stored with, else None."""
        if self._key is None:
            return None
        key = self._key_of(modules)
        same = key.shape == self._key.shape and key.device == self._key.device and bool(torch.equal(key, self._key))
        return self._factor if same else None

    def put(self, modules: tuple[torch.nn.Module, ...], factor: Factor) -> Factor:
        """Store ``factor`` for the current values of ``modules``; returns it."""
        self._key, self._factor = self._key_of(modules), factor
        return factor

    def clear(self) -> None:
        """Forget the stored factor."""
        self._key = self._factor = None
