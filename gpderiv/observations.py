"""Which linear functionals of f were observed: values, partial, directional and second derivatives.

NaN means "not observed" everywhere; only observed entries become rows of the linear system.
Rows come in two parts:

- *standard* rows, values and partial derivatives: a selection from the block vector
  ``[f(x_1..x_n), grad f(x_1), ..., grad f(x_n)]``, whose covariance has the fast specialised
  path of :func:`gpderiv.blocks.stationary_derivative_blocks`;
- *extra* rows, directional derivatives ``v . grad f(x_i)`` and Hessian entries
  ``d2f / dx_a dx_b (x_i)``, described as :class:`Functionals` and handled by the general
  :func:`gpderiv.blocks.functional_covariance`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gpytorch.kernels import AdditiveKernel, Kernel, ScaleKernel
from torch import Tensor

from gpderiv.kernels import BaseDerivativeKernel

__all__ = ["DIRECTIONAL", "HESSIAN", "Functionals", "ObservationSet", "functional_cov"]

#: Observation kinds beyond 0 (value) and 1 + a (partial derivative a), as offsets from d.
DIRECTIONAL, HESSIAN = 1, 2


@dataclass(frozen=True)
class Functionals:
    r"""Linear functionals :math:`L_r f = \sum_k c_{rk}\, \partial^{\alpha_{rk}} f(x_{p_r})`.

    Attributes:
        point: `R` index of the point of each functional.
        idx: `R x K x 2` derivative indices of each term, -1 for none (present first):
            ``[-1, -1]`` value, ``[a, -1]`` first derivative, ``[a, b]`` second derivative.
        coef: `R x K` coefficients of the terms.
    """

    point: Tensor
    idx: Tensor
    coef: Tensor

    def __len__(self) -> int:
        return self.point.shape[0]

    @classmethod
    def elementary(cls, point: Tensor, idx: Tensor, dtype: torch.dtype) -> Functionals:
        """One derivative per functional: ``idx`` is `R x 2`."""
        return cls(point, idx.unsqueeze(-2), torch.ones(point.shape[0], 1, dtype=dtype, device=point.device))

    @classmethod
    def block(cls, m: int, d: int, device: torch.device, dtype: torch.dtype) -> Functionals:
        """The rows of the block vector ``[f(x_1..x_m), grad f(x_1), ..., grad f(x_m)]``."""
        point = torch.cat([torch.arange(m, device=device), torch.arange(m, device=device).repeat_interleave(d)])
        first = torch.cat([torch.full((m,), -1, device=device), torch.arange(d, device=device).repeat(m)])
        idx = torch.stack([first, torch.full_like(first, -1)], -1)
        return cls.elementary(point, idx, dtype)

    @classmethod
    def hessian_entries(cls, m: int, d: int, device: torch.device, dtype: torch.dtype) -> Functionals:
        """The `m d (d + 1) / 2` entries ``a <= b`` of the Hessian at each of ``m`` points (point-major)."""
        a, b = torch.triu_indices(d, d, device=device)
        point = torch.arange(m, device=device).repeat_interleave(a.numel())
        idx = torch.stack([a, b], -1).repeat(m, 1)
        return cls.elementary(point, idx, dtype)

    def take(self, rows: Tensor) -> Functionals:
        """The functionals at positions ``rows``."""
        return Functionals(self.point[rows], self.idx[rows], self.coef[rows])


def _leaf_covariance(kernel: Kernel, x1: Tensor, x2: Tensor, idx1: Tensor, idx2: Tensor, pairwise: bool) -> Tensor:
    """Covariance of elementary functionals under ``kernel`` (derivative leaves, sums, scalings)."""
    if isinstance(kernel, BaseDerivativeKernel):
        return kernel.functional_covariance(x1, x2, idx1, idx2, pairwise=pairwise)
    if isinstance(kernel, ScaleKernel):
        return kernel.outputscale * _leaf_covariance(kernel.base_kernel, x1, x2, idx1, idx2, pairwise)
    if isinstance(kernel, AdditiveKernel):
        return sum(_leaf_covariance(k, x1, x2, idx1, idx2, pairwise) for k in kernel.kernels)
    raise TypeError(f"kernel: {type(kernel).__name__} cannot give covariances of derivative functionals")


def functional_cov(
    kernel: Kernel, X1: Tensor, F1: Functionals, X2: Tensor, F2: Functionals, *, pairwise: bool = True
) -> Tensor:
    """Covariance of functionals ``F1`` at points ``X1`` with ``F2`` at points ``X2``.

    Args:
        kernel: a derivative kernel, or sums and scalings (``ScaleKernel``) of them.
        X1: `n1 x d` points indexed by ``F1.point``.
        F1: `R1` functionals.
        X2: `n2 x d` points indexed by ``F2.point``.
        F2: `R2` functionals.
        pairwise: the `R1 x R2` matrix, or (``False``, ``R1 == R2``) the `R` vector of
            covariances of functional ``r`` of ``F1`` with functional ``r`` of ``F2``.

    Returns:
        `R1 x R2` (or `R`) covariance.
    """
    (r1, k1), (r2, k2) = F1.coef.shape, F2.coef.shape
    if pairwise:
        x1 = X1[F1.point].repeat_interleave(k1, 0)
        x2 = X2[F2.point].repeat_interleave(k2, 0)
        C = _leaf_covariance(kernel, x1, x2, F1.idx.reshape(-1, 2), F2.idx.reshape(-1, 2), True)
        return torch.einsum("rk,rksl,sl->rs", F1.coef, C.view(r1, k1, r2, k2), F2.coef)
    # Pairwise=False: every (k, l) term combination of functional r with functional r.
    x1 = X1[F1.point].unsqueeze(1).unsqueeze(2).expand(r1, k1, k2, -1)
    x2 = X2[F2.point].unsqueeze(1).unsqueeze(1).expand(r2, k1, k2, -1)
    i1 = F1.idx.unsqueeze(2).expand(r1, k1, k2, 2)
    i2 = F2.idx.unsqueeze(1).expand(r2, k1, k2, 2)
    d = X1.shape[-1]
    C = _leaf_covariance(
        kernel, x1.reshape(-1, d), x2.reshape(-1, d), i1.reshape(-1, 2), i2.reshape(-1, 2), False
    ).view(r1, k1, k2)
    return torch.einsum("rk,rkl,rl->r", F1.coef, C, F2.coef)


@dataclass(frozen=True)
class ObservationSet:
    """The observed rows: standard (values, partial derivatives) first, then extra rows.

    Attributes:
        n: number of input points.
        d: input dimension.
        has_grad: whether any partial derivative was observed. When ``False`` the block vector
            of the standard rows is just the ``n`` values (a value-only GP).
        rows: `N_std` long indices into the block vector (length ``n (1 + d)`` or ``n``).
        kinds: `N` kinds of all rows: 0 value, ``1 + a`` partial ``a``, ``d + 1`` directional,
            ``d + 2`` Hessian entry.
        targets: `N` observed numbers (user units), standard rows first.
        extra: functionals of the extra rows (user-unit coefficients), or None.
    """

    n: int
    d: int
    has_grad: bool
    rows: Tensor
    kinds: Tensor
    targets: Tensor
    extra: Functionals | None = None

    @classmethod
    def from_data(
        cls,
        y: Tensor,
        grad: Tensor | None,
        d: int,
        directional: tuple[Tensor, Tensor, Tensor] | None = None,
        hessian: Tensor | None = None,
    ) -> ObservationSet:
        """Collect the observed entries.

        Args:
            y: `n` values (NaN = not observed).
            grad: `n x d` partial derivatives, or None.
            d: input dimension.
            directional: ``(index, V, values)``: `k` point indices, `k x d` directions, `k`
                observed ``v . grad f``; NaN values are not observed.
            hessian: `n x d x d` second derivatives, or None; ``H[i, a, b]`` and ``H[i, b, a]``
                are the same functional and may be given once (or twice, equal).

        Raises:
            ValueError: for infinite entries, asymmetric Hessian entries, or when nothing at
                all is observed.
        """
        n = y.shape[0]
        dvalues = None if directional is None else directional[2]
        for name, t in (("y", y), ("grad", grad), ("directional values", dvalues), ("hessian", hessian)):
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
        values = torch.cat([y, grad.flatten()]) if has_grad else y
        rows = torch.nonzero(mask).flatten()
        kinds_all, targets = [torch.cat(kinds)[rows]], [values[rows]]
        extras: list[Functionals] = []
        if directional is not None:
            index, V, dvalues = directional
            keep = ~torch.isnan(dvalues)
            idx = torch.stack([torch.arange(d, device=device), torch.full((d,), -1, device=device)], -1)
            extras.append(Functionals(index[keep], idx.expand(int(keep.sum()), d, 2), V[keep]))
            kinds_all.append(torch.full((int(keep.sum()),), d + DIRECTIONAL, device=device))
            targets.append(dvalues[keep])
        if hessian is not None:
            point, idx, hvalues = _hessian_entries(hessian)
            extras.append(Functionals.elementary(point, idx, y.dtype))
            kinds_all.append(torch.full((point.numel(),), d + HESSIAN, device=device))
            targets.append(hvalues)
        extra = None
        if extras:
            width = max(f.coef.shape[1] for f in extras)  # pad terms with (value, coefficient 0)
            pad = torch.nn.functional.pad
            extra = Functionals(
                torch.cat([f.point for f in extras]),
                torch.cat([pad(f.idx, (0, 0, 0, width - f.idx.shape[1]), value=-1) for f in extras]),
                torch.cat([pad(f.coef, (0, width - f.coef.shape[1])) for f in extras]),
            )
        obs = cls(n, d, has_grad, rows, torch.cat(kinds_all), torch.cat(targets), extra)
        if obs.size == 0:
            raise ValueError("y, grad: expected at least one observed (non-NaN) value or derivative, got none")
        return obs

    @property
    def size(self) -> int:
        """Number of observed rows ``N``."""
        return self.targets.numel()

    @property
    def num_standard(self) -> int:
        """Number of standard rows (values and partial derivatives)."""
        return self.rows.numel()

    @property
    def complete(self) -> bool:
        """Whether every row of the standard block vector is observed (no selection needed)."""
        return self.num_standard == self.n * (1 + self.d * self.has_grad)

    @property
    def is_value(self) -> Tensor:
        """`N` boolean mask of the value rows."""
        return self.kinds == 0

    def standard_functionals(self, dtype: torch.dtype) -> Functionals:
        """The standard rows as elementary functionals (for the general covariance path)."""
        if self.has_grad:
            return Functionals.block(self.n, self.d, self.rows.device, dtype).take(self.rows)
        return Functionals.elementary(self.rows, torch.full((self.rows.numel(), 2), -1, device=self.rows.device), dtype)


def _hessian_entries(hessian: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Observed entries ``a <= b`` of `n x d x d` second derivatives: ``(point, idx, values)``."""
    d = hessian.shape[-1]
    upper, lower = hessian, hessian.transpose(-1, -2)
    both = ~torch.isnan(upper) & ~torch.isnan(lower)
    if (both & ((upper - lower).abs() > 1e-8 * (1 + upper.abs()))).any():
        i, a, b = torch.nonzero(both & ((upper - lower).abs() > 1e-8 * (1 + upper.abs())))[0].tolist()
        raise ValueError(
            f"hessian: expected symmetric second derivatives, got H[{i}, {a}, {b}] = {upper[i, a, b].item():.6g} "
            f"!= H[{i}, {b}, {a}] = {upper[i, b, a].item():.6g}"
        )
    merged = torch.where(torch.isnan(upper), lower, upper)
    a, b = torch.triu_indices(d, d, device=hessian.device)
    values = merged[:, a, b]  # n x (d (d + 1) / 2)
    keep = ~torch.isnan(values)
    point, entry = torch.nonzero(keep, as_tuple=True)
    idx = torch.stack([a[entry], b[entry]], -1)
    return point, idx, values[keep]
