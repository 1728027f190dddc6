"""Which linear functionals of f were observed: values and partial derivatives, NaN = missing."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ObservationSet"]


@dataclass(frozen=True)
class ObservationSet:
    """The observed rows of the block vector ``[f(x_1..x_n), grad f(x_1), ..., grad f(x_n)]``.

    Only observed entries become rows of the linear system; nothing is NaN-filled.

    Attributes:
        n: number of input points.
        d: input dimension.
        has_grad: whether any partial derivative was observed. When ``False`` the block vector
            is just the ``n`` values (a value-only GP).
        rows: `N` long indices into the block vector (length ``n (1 + d)`` or ``n``).
        kinds: `N` long observation kinds: 0 for a value, ``1 + a`` for ``df/dx_a``.
        targets: `N` observed numbers, in the order of ``rows``.
    """

    n: int
    d: int
    has_grad: bool
    rows: Tensor
    kinds: Tensor
    targets: Tensor

    @classmethod
    def from_data(cls, y: Tensor, grad: Tensor | None, d: int) -> ObservationSet:
        """Collect the observed entries of ``y`` (`n`) and ``grad`` (`n x d`, or None).

        Raises:
            ValueError: for infinite entries or when nothing at all is observed.
        """
        n = y.shape[0]
        for name, t in (("y", y), ("grad", grad)):
            if t is not None and torch.isinf(t).any():
                raise ValueError(f"{name}: expected finite numbers or NaN (= not observed), got Inf")
        device = y.device
        observed = [~torch.isnan(y)]
        kinds = [torch.zeros(n, dtype=torch.long, device=device)]
        has_grad = grad is not None and bool((~torch.isnan(grad)).any())
        if has_grad:
            observed.append(~torch.isnan(grad).flatten())
            kinds.append(torch.arange(1, d + 1, device=device).repeat(n))
        mask = torch.cat(observed)
        if not mask.any():
            raise ValueError("y, grad: expected at least one observed (non-NaN) value or derivative, got none")
        values = torch.cat([y, grad.flatten()]) if has_grad else y
        rows = torch.nonzero(mask).flatten()
        return cls(n=n, d=d, has_grad=has_grad, rows=rows, kinds=torch.cat(kinds)[rows], targets=values[rows])

    @property
    def size(self) -> int:
        """Number of observed rows ``N``."""
        return self.rows.numel()

    @property
    def complete(self) -> bool:
        """Whether every row of the block vector is observed (no selection needed)."""
        return self.size == self.n * (1 + self.d * self.has_grad)

    @property
    def is_value(self) -> Tensor:
        """`N` boolean mask of the value rows."""
        return self.kinds == 0
