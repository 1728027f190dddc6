r"""Any engine's factor grown by new rows through the Schur complement (conditioning, fantasies).

For a factor of :math:`A_{11}` (any engine: it only needs to solve) and new rows with
cross-covariance :math:`A_{12}` and noisy covariance :math:`A_{22}`,

.. math::

    W = A_{11}^{-1} A_{12}, \qquad S = A_{22} - A_{12}^\top W = C C^\top, \qquad
    A^{-1} \begin{bmatrix} r_1 \\ r_2 \end{bmatrix} =
    \begin{bmatrix} A_{11}^{-1} r_1 - W x_2 \\ x_2 \end{bmatrix}, \quad x_2 = S^{-1} (r_2 - W^\top r_1),

    \log|A| = \log|A_{11}| + \log|S| .

Growing costs `N'` solves with the parent (its columns, with the batch folded in: fantasies share
the parent) and one Cholesky of the `N' x N'` Schur complement; every later solve costs one
parent solve. The dense engine grows its triangular factor directly instead
(:class:`~gpderiv.inference.dense.DenseFactor`), which is faster for variances.
"""

from __future__ import annotations

import torch
from gpytorch.kernels import Kernel
from torch import Tensor

from gpderiv.inference.base import Factor, fold_batch, gaussian_constant
from gpderiv.inference.dense import cholesky_differentiable, solve_triangular
from gpderiv.observed_rows import ObservedRows

__all__ = ["GrownFactor"]


def _solve_columns(factor: Factor, B: Tensor) -> Tensor:
    """``A^-1 B`` for `... x N x t` columns; an unbatched factor gets the batch folded into the columns."""
    return fold_batch(factor.solve, B) if factor.alpha.dim() == 1 else factor.solve(B)


class GrownFactor(Factor):
    """A parent factor grown by new rows (module docstring); differentiable in the new rows.

    Args:
        parent: the factor of the old rows.
        new: the new rows.
        noise: their `... x N'` noise variances.
        resid: their `... x N'` residuals.
        kernel: the kernel the grown factor answers with (default: the parent's).
    """

    def __init__(
        self, parent: Factor, new: ObservedRows, noise: Tensor, resid: Tensor, kernel: Kernel | None = None
    ) -> None:
        A12, A22 = parent._grow_blocks(new, noise)
        self.parent = parent
        self.cross_matrices = parent.cross_matrices + 1  # the parent's solve, then W's product
        self.W = _solve_columns(parent, A12)  # `... x N x N'`
        S = A22 - A12.mT @ self.W
        self.C = cholesky_differentiable(0.5 * (S + S.mT))[0]
        kernel = parent.kernel if kernel is None else kernel
        super().__init__(parent.engine, kernel, parent.data, *parent._grow_vectors(noise, resid))
        self.parts = (*parent.parts, new)
        self.size = parent.resid.shape[-1]
        self.alpha = self.solve(self.resid.unsqueeze(-1)).squeeze(-1)

    def _schur_solve(self, B: Tensor) -> Tensor:
        return solve_triangular(self.C, solve_triangular(self.C, B, upper=False), upper=True)

    def solve(self, rhs: Tensor) -> Tensor:
        """``A^-1 rhs`` for an `N` vector or `... x N x t` matrix (one parent solve)."""
        if rhs.dim() == 1:
            return self.solve(rhs.unsqueeze(-1)).squeeze(-1)
        r1, r2 = rhs[..., : self.size, :], rhs[..., self.size :, :]
        x2 = self._schur_solve(r2 - self.W.mT @ r1)
        x1 = _solve_columns(self.parent, r1) - self.W @ x2
        batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2])
        return torch.cat([x1.expand(*batch, *x1.shape[-2:]), x2.expand(*batch, *x2.shape[-2:])], -2)

    def negative_log_marginal(self) -> Tensor:
        """The parent's plus the new rows' conditional term: ``1/2 t^T S^-1 t + 1/2 log|S|``."""
        r1, r2 = self.resid[..., : self.size], self.resid[..., self.size :]
        t = (r2.unsqueeze(-1) - self.W.mT @ r1.unsqueeze(-1)).squeeze(-1)
        z = solve_triangular(self.C, t.unsqueeze(-1), upper=False).squeeze(-1)
        half_logdet = self.C.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        new_rows = 0.5 * z.square().sum(-1) + half_logdet + gaussian_constant(t.shape[-1])
        return self.parent.negative_log_marginal() + new_rows
