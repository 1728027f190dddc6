"""Test helpers shipped with the package: tolerances by dtype in one place."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "TOLERANCES",
    "assert_close",
    "assert_same_predictions",
    "contains_all",
    "names",
    "sine_data",
    "tolerance",
    "train_covariance",
]

#: ``(rtol, atol)`` by dtype for comparisons of closed forms with autograd or dense references.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (1e-4, 1e-5),
}


def tolerance(dtype: torch.dtype, scale: float = 1.0) -> tuple[float, float]:
    """``(rtol, atol)`` for ``dtype``, both multiplied by ``scale``."""
    rtol, atol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    return rtol * scale, atol * scale


def assert_close(actual: Tensor, expected: Tensor, scale: float = 1.0, msg: str | None = None) -> None:
    """``torch.testing.assert_close`` with the dtype tolerance of ``expected`` times ``scale``."""
    rtol, atol = tolerance(expected.dtype, scale)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=msg)


def contains_all(*parts: str) -> str:
    """A regex (for ``pytest.raises(match=...)``) matching text that contains every literal part, in any order."""
    return "(?s)" + "".join(f"(?=.*{re.escape(part)})" for part in parts)


def names(argument: str) -> str:
    """A regex matching ``argument`` as a whole word (``"X"`` does not match ``"Xs"``)."""
    return rf"(?<![A-Za-z_]){re.escape(argument)}(?![A-Za-z_])"


def train_covariance(model: Any) -> Tensor:
    """`N x N` noiseless covariance ``s K`` of a :class:`~gpderiv.DerivativeGP`'s observed rows (internal units).

    The dense reference that tests and benchmarks compare the engines with.
    """
    return model.data.scaled_covariance(model.covar_module)


def sine_data(
    n: int = 6, d: int = 2, seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor, Tensor]:
    """``(X, y, grad)``: `n x d` points in the unit box, ``y = sum_a sin(X_a)`` and its gradient ``cos(X)``."""
    X = torch.rand(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return X, torch.sin(X).sum(-1), torch.cos(X)


def assert_same_predictions(model: Any, reference: Any, Xs: Tensor, scale: float = 100) -> None:
    """Two :class:`~gpderiv.DerivativeGP` models (e.g. two engines) predict alike at `m x d` points ``Xs``.

    Means and variances of f and grad f (with and without observation noise), the mean-only
    prediction, the joint covariance and the Hessian at the first points (general paths).
    """
    for options in ({}, {"observation_noise": True}):
        p, q = reference.predict(Xs, **options), model.predict(Xs, **options)
        for name in ("mean", "grad_mean", "variance", "grad_variance"):
            assert_close(getattr(q, name), getattr(p, name), scale=scale, msg=name)
    fast = model.predict(Xs, variance=False)
    assert fast.variance is None and fast.grad_variance is None
    assert_close(fast.mean, p.mean, scale=scale)
    assert_close(fast.grad_mean, p.grad_mean, scale=scale)
    full, full_ref = model.predict(Xs[:3], full_cov=True), reference.predict(Xs[:3], full_cov=True)
    assert_close(full.covariance, full_ref.covariance, scale=scale)
    for a, b in zip(model.predict_hessian(Xs[:2]), reference.predict_hessian(Xs[:2]), strict=True):
        assert_close(a, b, scale=scale)
