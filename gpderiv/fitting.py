"""Optimisers for hyperparameters: scipy L-BFGS-B (default) and torch Adam."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy.optimize import OptimizeResult, minimize
from torch import Tensor

from gpderiv.exceptions import CholeskyError

__all__ = ["minimize_adam", "minimize_lbfgs"]

#: ``closure()`` returns the loss with gradients already accumulated into the parameters.
Closure = Callable[[], Tensor]


def _flatten(params: Sequence[Tensor]) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in params]).cpu().double().numpy()


def _assign(params: Sequence[Tensor], x: np.ndarray) -> None:
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(torch.from_numpy(x[offset : offset + n]).view_as(p))
            offset += n


def minimize_lbfgs(
    closure: Closure,
    params: Sequence[Tensor],
    maxiter: int,
    callback: Callable[[float], None],
) -> str:
    """Minimise with scipy's L-BFGS-B over the flattened raw parameters.

    Args:
        closure: zeroes nothing; must return the loss after ``backward()`` filled ``p.grad``.
        params: parameters to optimise (modified in place, ending at the best point found).
        maxiter: iteration limit.
        callback: called with the loss after each iteration.

    Returns:
        scipy's termination message.
    """
    non_finite = [0]

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        _assign(params, x)
        for p in params:
            p.grad = None
        try:
            loss = closure()
        except CholeskyError:
            non_finite[0] += 1
            return np.inf, np.zeros(sum(p.numel() for p in params))
        grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        value = loss.item()
        if not np.isfinite(value) or not torch.isfinite(grad).all():
            # A non-finite loss makes L-BFGS-B's line search step back instead of stopping.
            non_finite[0] += 1
            return np.inf, np.zeros(grad.numel())
        return value, grad.cpu().double().numpy()

    def on_iteration(intermediate_result: OptimizeResult) -> None:  # scipy matches this name
        if np.isfinite(intermediate_result.fun):
            callback(float(intermediate_result.fun))

    result = minimize(
        fun, _flatten(params), jac=True, method="L-BFGS-B", options={"maxiter": maxiter}, callback=on_iteration
    )
    _assign(params, result.x)
    if non_finite[0]:
        return f"{result.message} (the loss was non-finite at {non_finite[0]} trial point(s), which were rejected)"
    return str(result.message)


def minimize_adam(
    closure: Closure,
    params: Sequence[Tensor],
    maxiter: int,
    callback: Callable[[float], None],
    lr: float = 0.1,
) -> str:
    """Minimise with ``torch.optim.Adam`` for ``maxiter`` steps (arguments as :func:`minimize_lbfgs`)."""
    optimizer = torch.optim.Adam(params, lr=lr)
    last_finite: np.ndarray | None = None  # parameters of the last evaluation with a finite loss
    for _ in range(maxiter):
        optimizer.zero_grad()
        current = [p.detach().clone() for p in params]
        try:
            loss = closure()
        except CholeskyError:
            loss = torch.tensor(float("nan"))
        if not torch.isfinite(loss):
            if last_finite is not None:
                _assign(params, last_finite)
            return "stopped: the loss became non-finite"
        last_finite = torch.cat([t.reshape(-1) for t in current]).cpu().double().numpy()
        optimizer.step()
        callback(loss.item())
    return f"completed {maxiter} Adam steps"
