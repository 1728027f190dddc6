"""Engines by name: :func:`register_engine`, :func:`get_engine`, and the ``"auto"`` rule.

A new engine is one module plus one call, ``register_engine("name", MyEngine)``; every front end
(``DerivativeGP``, the estimator, the CLI, ``DerivativeGPModel``) then accepts ``inference="name"``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from gpytorch.kernels import Kernel

from gpderiv.exceptions import ProblemTooLargeError
from gpderiv.inference.base import Engine
from gpderiv.inference.iterative import KRONECKER_MIN_DIMS
from gpderiv.observed_rows import ObservedRows

__all__ = [
    "AUTO_ITERATIVE_MAX_ROWS",
    "AUTO_ITERATIVE_MAX_WORK",
    "AUTO_STRUCTURED_MAX_POINTS",
    "AUTO_STRUCTURED_MIN_RATIO",
    "AUTO_STRUCTURED_MIN_ROWS",
    "engine_names",
    "get_engine",
    "register_engine",
    "resolve_engine",
    "select_engine",
]

_ENGINES: dict[str, type[Engine]] = {}

#: ``"auto"`` picks the structured engine (when it applies) for at most this many points (its
#: `n^2 x n^2` core: one MLL + gradient of the default ARD model took 7.3 s at n = 50 and
#: 23-41 s at n = 64 (d = 96 to 192), one thread, loaded machine, docs/benchmarks.md) ...
AUTO_STRUCTURED_MAX_POINTS = 64
#: ... when d >= this many times n (measured crossover with the dense engine, MLL + gradient,
#: d = 1.5 n to 1.8 n, isotropic kernel for n = 10 to 40, default ARD model for n = 10 to 64) ...
AUTO_STRUCTURED_MIN_RATIO = 2
#: ... and there are at least this many observed rows n (1 + d) (below, dense takes milliseconds).
AUTO_STRUCTURED_MIN_ROWS = 1000
#: ``"auto"`` switches to the iterative engine, when the dense one does not fit in memory, up to
#: this many rows (one MLL step at N = 110,000, d = 10 took 10 min on 2 cores: docs/benchmarks.md) ...
AUTO_ITERATIVE_MAX_ROWS = 120_000
#: In d >= KRONECKER_MIN_DIMS dimensions (CG preconditioned by the exactly invertible
#: block-diagonal part, gpderiv.inference.structured_cg) ``"auto"`` prefers the iterative engine to
#: the dense one up to this many pair-dimension terms n^2 d, the cost of one product (n = 500 points
#: in d = 1000: N = 500,500 rows, one MLL + gradient in about 2 minutes on one thread,
#: docs/benchmarks.md).
AUTO_ITERATIVE_MAX_WORK = 500**2 * 1000


def register_engine(name: str, cls: type[Engine]) -> None:
    """Make ``cls`` available as ``inference=name`` (replacing an engine of that name).

    Raises:
        TypeError: ``cls`` is not a subclass of :class:`~gpderiv.inference.Engine`.
        ValueError: ``name`` is not a non-empty string, or is ``"auto"``.
    """
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"name: expected a non-empty string other than 'auto', got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Engine)):
        raise TypeError(f"cls: expected a subclass of gpderiv.inference.Engine, got {cls!r}")
    _ENGINES[name] = cls


def engine_names() -> list[str]:
    """The registered engine names, sorted."""
    return sorted(_ENGINES)


def get_engine(name: str, options: dict[str, Any] | None = None) -> Engine:
    """A new instance of the engine registered as ``name``, made with ``options``.

    Raises:
        ValueError: no engine of that name (the message lists them).
        TypeError: ``options`` names an option the engine does not take (the message lists them).
    """
    if name not in _ENGINES:
        raise ValueError(f"inference: expected 'auto' or one of {engine_names()}, got {name!r}")
    cls = _ENGINES[name]
    options = options or {}
    if not isinstance(options, dict):
        raise TypeError(f"inference_options: expected a dict or None, got {type(options).__name__}")
    unknown = sorted(set(options) - set(cls.option_names))
    if unknown:
        raise TypeError(
            f"inference_options: the {name!r} engine takes {list(cls.option_names) or 'no options'}, got {unknown}"
        )
    return cls(**options)


def select_engine(
    kernel: Kernel,
    data: ObservedRows,
    *,
    shared_grad_noise: bool,
    dtype: torch.dtype,
    device: torch.device,
    noise_by_kind: bool = True,
) -> str:
    """The engine of ``inference="auto"``: the one place that chooses.

    In this order (constants of this module; timings in docs/benchmarks.md):

    1. ``"structured"`` when it supports the problem (the RBF kernel, ARD or not, as in the
       defaults of DerivativeGP, the estimator, the CLI and the BoTorch model; values and full
       gradients; one noise variance per derivative dimension), ``n <= 64`` (its `n^2 x n^2` core
       costs `O(n^6)`), ``d >= 2 n`` (measured crossover with the dense engine: d = 1.5 n to 1.8 n),
       ``N = n (1 + d) >= 1000`` (below, the dense engine takes milliseconds) and it fits in memory;
    2. ``"iterative"`` when it supports the problem, ``d >= 64`` (its CG is then preconditioned by
       the exactly invertible block-diagonal part), ``n^2 d <= 500^2 * 1000``, ``N >= 1000`` and it
       fits in memory: measured 25x to 120x faster than dense (n = 70, d = 64: 0.25 s against 6.1 s;
       n = 100, d = 100: 0.86 s against 106 s per MLL + gradient), with an unbiased stochastic
       log-determinant instead of an exact one;
    3. ``"dense"`` when its `N x N` matrices fit in memory (any kernel and observations);
    4. ``"iterative"`` when they do not, it supports the problem and ``N <= 120,000`` (one marginal
       likelihood step at N = 110,000, d = 10 took 10 minutes on 2 cores);
    5. ``"variational"`` (approximate: :func:`resolve_engine` warns) when none of them applies (the
       dense matrices do not fit, and the iterative engine does not apply or N > 120,000): any
       kernel and rows, a cost per training step independent of N, memory linear in N.

    Raises:
        ProblemTooLargeError: none of them applies, the variational engine unregistered (the
            message says what to do).
    """
    n, d, N = data.n, data.d, data.num_rows
    structured = get_engine("structured")
    if (
        n <= AUTO_STRUCTURED_MAX_POINTS
        and d >= AUTO_STRUCTURED_MIN_RATIO * n
        and N >= AUTO_STRUCTURED_MIN_ROWS
        and structured.supports(kernel, data, shared_grad_noise=shared_grad_noise, noise_by_kind=noise_by_kind) is None
    ):
        try:
            structured.check_memory(data, dtype, device)
            return "structured"
        except ProblemTooLargeError:
            pass
    iterative = get_engine("iterative")

    def supported() -> bool:  # only when asked: the iterative scope check reads the kernel's parts
        error = iterative.supports(kernel, data, shared_grad_noise=shared_grad_noise, noise_by_kind=noise_by_kind)
        return error is None

    many_dims = d >= KRONECKER_MIN_DIMS and n * n * d <= AUTO_ITERATIVE_MAX_WORK
    if many_dims and N >= AUTO_STRUCTURED_MIN_ROWS and supported():
        try:
            iterative.check_memory(data, dtype, device)
            return "iterative"
        except ProblemTooLargeError:
            pass
    try:
        get_engine("dense").check_memory(data, dtype, device)
    except ProblemTooLargeError as exc:
        if N <= AUTO_ITERATIVE_MAX_ROWS and supported():
            return "iterative"
        if "variational" in _ENGINES:
            return "variational"
        raise ProblemTooLargeError(
            f"{exc} (inference='auto' does not switch to the iterative engine above N = "
            f"{AUTO_ITERATIVE_MAX_ROWS} rows, or n^2 d = {AUTO_ITERATIVE_MAX_WORK:,} in d >= {KRONECKER_MIN_DIMS} "
            "dimensions, where one evaluation takes more than half an hour; pass inference='iterative' to use it "
            "anyway.)"
        ) from None
    return "dense"


def resolve_engine(
    inference: str,
    kernel: Kernel,
    data: ObservedRows,
    *,
    shared_grad_noise: bool,
    dtype: torch.dtype,
    device: torch.device,
    noise_by_kind: bool = True,
    options: dict[str, Any] | None = None,
) -> Engine:
    """The engine a front end uses: ``"auto"`` resolved, its scope and memory checked, once.

    Args:
        inference: ``"auto"`` or a registered name.
        kernel: the model's kernel.
        data: the training rows.
        shared_grad_noise: one noise variance for all values and one for all partial derivatives.
        noise_by_kind: the noise variance of a row depends on its kind alone (values, derivative dimension).
        dtype: the model's dtype.
        device: the model's device.
        options: the engine's constructor options (``inference_options``).

    Raises:
        ValueError: an unknown name, or an engine that does not apply (the message says why).
        TypeError: an option the engine does not take.
        ProblemTooLargeError: the engine's memory estimate exceeds what ``device`` has.
    """
    chosen = inference == "auto"
    if chosen:
        inference = select_engine(
            kernel, data, shared_grad_noise=shared_grad_noise, dtype=dtype, device=device, noise_by_kind=noise_by_kind
        )
    engine = get_engine(inference, options)
    if chosen and engine.approximate:
        warnings.warn(
            f"inference='auto' chose the approximate {engine.name!r} engine for N = {data.num_rows} observed rows "
            "(beyond what exact inference takes in this memory and time): predictions and error bars approximate "
            "the exact GP's; pass inference='iterative' or 'dense' for exact inference",
            UserWarning,
            stacklevel=3,
        )
    error = engine.supports(kernel, data, shared_grad_noise=shared_grad_noise, noise_by_kind=noise_by_kind)
    if error is not None:
        raise ValueError(error)
    engine.check_memory(data, dtype, device)
    return engine
