r"""The inverse of a symmetric positive-definite matrix from its Cholesky factor, in matrix-product blocks.

The MLL gradient needs :math:`A^{-1}` (:mod:`gpderiv.inference.dense`). ``torch.cholesky_inverse``
computes it as a solve with the identity, :math:`L^{-\top}(L^{-1} I)`: two triangular solves with
`N` right-hand sides, :math:`2N^3` flops or 6 Choleskys (on an H200 at N = 24,000 it took 0.60 s
against 0.11 s for the Cholesky). The inverse needs only a third of that: the triangular inverse
:math:`X = L^{-1}` (:math:`N^3/3`) and the lower triangle of :math:`X^\top X` (:math:`N^3/3`), as
LAPACK's ``potri`` does. Here both are recursive halvings whose work is matrix products and
triangular solves with many right-hand sides, the fastest kernels on every device:

.. math::

    L = \begin{pmatrix} L_{11} & 0 \\ L_{21} & L_{22} \end{pmatrix}, \quad
    X = \begin{pmatrix} L_{11}^{-1} & 0 \\ -L_{22}^{-1} L_{21} L_{11}^{-1} & L_{22}^{-1} \end{pmatrix}, \quad
    X^\top X = \begin{pmatrix} X_{11}^\top X_{11} + X_{21}^\top X_{21} & \cdot \\
                                X_{22}^\top X_{21} & X_{22}^\top X_{22} \end{pmatrix}.

The off-diagonal block of :math:`X` costs two triangular solves with the factor's own blocks; the
blocks of :math:`X^\top X` are two dense products (which ignore the zeros of the triangular
factors: :math:`2N^3/3` flops instead of :math:`N^3/3`, the price of using plain GEMM). In all
:math:`N^3` flops, half of ``cholesky_inverse``'s, in one `N x N` result plus short-lived blocks of
at most :math:`N^2/2` elements. Below ``block`` rows the recursion ends in a triangular solve with
the identity and one product.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["BLOCK_ROWS", "inverse_lower_blocked"]

#: Rows below which the recursion stops (a solve with the identity and one product), by device
#: type. CPU, one thread: 128 and 256 equal, 512 slower (N = 1500-3000). On a GPU larger leaves
#: mean fewer kernel launches, and their extra flops (N x block^2) stay below 1 % of N^3 at
#: N = 24,000: 1024 is chosen from that count, not yet measured (benchmarks/gpu_checks.sh measures it).
BLOCK_ROWS = {"cpu": 256, "cuda": 1024}


def _invert_triangular_(X: Tensor, block: int) -> None:
    """Overwrite the lower-triangular `... x n x n` ``X`` (zero upper triangle) with its inverse."""
    n = X.shape[-1]
    if n <= block:
        eye = torch.eye(n, dtype=X.dtype, device=X.device)
        X.copy_(torch.linalg.solve_triangular(X, eye, upper=False))
        return
    k = n // 2
    L11, L21, L22 = X[..., :k, :k], X[..., k:, :k], X[..., k:, k:]
    # X21 = -L22^-1 (L21 L11^-1) from the factor's blocks, before they are inverted in place.
    right = torch.linalg.solve_triangular(L11, L21, upper=False, left=False)
    L21.copy_(torch.linalg.solve_triangular(L22, right, upper=False).neg_())
    _invert_triangular_(L11, block)
    _invert_triangular_(L22, block)


def _lower_gram_(X: Tensor, block: int) -> None:
    """Overwrite the lower-triangular `... x n x n` ``X`` with the lower triangle of ``X^T X`` (LAPACK ``lauum``)."""
    n = X.shape[-1]
    if n <= block:
        X.copy_((X.mT @ X).tril_())
        return
    k = n // 2
    X11, X21, X22 = X[..., :k, :k], X[..., k:, :k], X[..., k:, k:]
    _lower_gram_(X11, block)  # X11^T X11 (uses only X11) ...
    X11.add_((X21.mT @ X21).tril_())  # ... + X21^T X21, before X21 is overwritten
    X21.copy_(X22.mT @ X21)  # X22^T X21, before X22 is overwritten
    _lower_gram_(X22, block)


def inverse_lower_blocked(L: Tensor, block: int | None = None) -> Tensor:
    """The lower triangle of ``(L L^T)^-1`` (upper triangle zero), in matrix-product blocks.

    Args:
        L: `... x N x N` lower Cholesky factor (not modified; its upper triangle is ignored).
        block: rows below which the recursion stops (default: :data:`BLOCK_ROWS` of the device).

    Returns:
        A new `... x N x N` tensor on ``L``'s device.
    """
    if block is None:
        block = BLOCK_ROWS.get(L.device.type, BLOCK_ROWS["cpu"])
    if block < 1:
        raise ValueError(f"block: expected a positive number of rows, got {block}")
    # The copy keeps only the lower triangle: the recursion reads the upper blocks of X22^T X21.
    X = torch.tril(L, out=torch.empty(L.shape, dtype=L.dtype, device=L.device))
    _invert_triangular_(X, block)
    _lower_gram_(X, block)
    return X
