r"""Exact inference by a dense Cholesky factorisation.

The negative log marginal likelihood of centred targets :math:`r` under
:math:`A = s K + \operatorname{diag}(\sigma^2)` (:math:`s` an output scale, 1 if none) is

.. math::

    \mathcal L = \tfrac12 r^\top A^{-1} r + \tfrac12 \log|A| + \tfrac N2 \log 2\pi
              = \tfrac12 r^\top \alpha + \sum_i \log L_{ii} + \tfrac N2 \log 2\pi,

with :math:`A = L L^\top` and :math:`\alpha = A^{-1} r` (Rasmussen & Williams, Alg. 2.1). Its
gradient with respect to the matrix is (R&W eq. 5.9)

.. math::

    \frac{\partial \mathcal L}{\partial A} = \tfrac12 (A^{-1} - \alpha\alpha^\top) =: W, \qquad
    \frac{\partial \mathcal L}{\partial K} = s W, \qquad
    \frac{\partial \mathcal L}{\partial s} = \langle W, K \rangle, \qquad
    \frac{\partial \mathcal L}{\partial \sigma^2} = \operatorname{diag} W, \qquad
    \frac{\partial \mathcal L}{\partial r} = \alpha .

The output scale is an input of its own so that ``ScaleKernel``'s scaling costs no extra
`N x N` pass: it is fused into the copy that the factorisation needs anyway.

:class:`_NegativeLogMarginal` hands these to autograd, which carries them through the kernel
assembly to the hyperparameters. Autograd through ``torch.linalg.cholesky`` itself is avoided:
on 2 cores at N = 6000 its backward takes 22-38 s, against about 1.4 s for
``cholesky_inverse`` (DESIGN.md). On the CPU with one thread and on CUDA the backward takes only
the lower triangle of :math:`A^{-1}` (:func:`inverse_lower`: LAPACK ``potri``, or matrix-product
blocks on the GPU): the gradient needs no more, since :math:`\partial K / \partial \theta` is symmetric.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import scipy.linalg
import torch
from gpytorch.kernels import Kernel
from torch import Tensor

from gpderiv.exceptions import CholeskyError, JitterWarning
from gpderiv.inference.base import Engine, Factor, fold_batch, gaussian_constant
from gpderiv.inference.spd_inverse import inverse_lower_blocked
from gpderiv.inference.threads import blas_threads
from gpderiv.observed_rows import ObservedRows

__all__ = ["DenseCholesky", "DenseFactor", "cholesky_with_jitter"]

#: Relative jitters tried in turn (times the mean of the diagonal) when a factorisation fails.
JITTER_SEQUENCE = (1e-10, 1e-9, 1e-8, 1e-7, 1e-6, 1e-5)
#: The MLL gradient's ``A^-1`` comes from scipy's ``potri`` (:func:`inverse_lower`) up to this N,
#: the largest size at which it was measured (docs/benchmarks.md); beyond, ``torch.cholesky_inverse``.
#: (scipy's bundled OpenBLAS crashed in ``potrf`` at N = 21,060, see :func:`cholesky_in_place`.)
POTRI_ROWS = 6000


def cholesky_in_place(A: Tensor) -> tuple[Tensor, bool]:
    """Lower Cholesky factor of symmetric row-major ``A``, computed in ``A``'s own memory; ``(L, ok)``.

    ``torch.linalg.cholesky_ex(..., out=...)`` factorises in place only into a column-major
    buffer (otherwise it allocates a second `N x N` matrix and copies back). ``A`` is
    symmetric, so its transpose view is the same matrix in column-major order: factorising that
    view in place keeps the peak memory of an MLL evaluation near two matrices, on any device.
    The factor is returned column-major, the layout LAPACK solves use without a copy.
    (scipy's LAPACK ``potrf`` on the same view segfaulted at N = 21,060 in its OpenBLAS.)
    """
    view = A.mT
    info = torch.empty(A.shape[:-2], dtype=torch.int32, device=A.device)  # batched: one per matrix
    L, info = torch.linalg.cholesky_ex(view, out=(view, info))
    return L, not bool(info.any())


def solve_triangular(L: Tensor, B: Tensor, upper: bool) -> Tensor:
    """``L^-1 B`` (``upper=False``) or ``L^-T B`` (``upper=True``) for a lower factor and `... x N x t` ``B``.

    One unbatched factor and a batched ``B`` (fantasies sharing their parent's factor): the batch
    is folded into the columns, one LAPACK call instead of one per batch member.
    """
    T = L.mT if upper else L
    if T.dim() == 2:
        return fold_batch(lambda C: torch.linalg.solve_triangular(T, C, upper=upper), B)
    return torch.linalg.solve_triangular(T, B, upper=upper)


def cholesky_solve(L: Tensor, b: Tensor) -> Tensor:
    """``(L L^T)^-1 b`` for a `... x N` vector ``b`` by two triangular solves.

    ``torch.cholesky_solve`` copies the `N x N` factor on every call (measured: one extra
    matrix of peak memory); ``solve_triangular`` works on it in place in either layout.
    """
    z = solve_triangular(L, b.unsqueeze(-1), upper=False)
    return solve_triangular(L, z, upper=True).squeeze(-1)


def _with_jitter(
    factorise: Callable[[float], tuple[Tensor, bool]], size: float, N: int, dtype: torch.dtype
) -> tuple[Tensor, float]:
    """The jitter policy of every dense factorisation: none, then the relative :data:`JITTER_SEQUENCE`.

    Args:
        factorise: ``factorise(jitter)`` returns ``(L, ok)`` of the matrix with ``jitter`` added to its diagonal.
        size: mean of the diagonal (jitters are relative to it).
        N: size of the matrix (for the messages).
        dtype: its dtype (for the messages).

    Returns:
        ``(L, jitter)``; a :class:`JitterWarning` says when jitter was needed.

    Raises:
        CholeskyError: if even the largest jitter fails; the message says what to do.
    """
    size = size if size > 0 else 1.0  # zero (or negative: a bad kernel) diagonal
    L, ok = factorise(0.0)
    if ok:
        return L, 0.0
    for relative in JITTER_SEQUENCE:
        jitter = relative * size
        L, ok = factorise(jitter)
        if ok:
            warnings.warn(
                f"The {N} x {N} covariance was not numerically positive definite; "
                f"added jitter {jitter:.1e} ({relative:.0e} x mean diagonal) to factorise it.",
                JitterWarning,
                stacklevel=5,
            )
            return L, jitter
    precision = " Use float64 inputs (the model runs in float32)." if dtype == torch.float32 else ""
    raise CholeskyError(
        f"Cholesky factorisation of the {N} x {N} covariance failed even with jitter "
        f"{JITTER_SEQUENCE[-1] * size:.1e} on the diagonal: the system is numerically singular. This happens "
        "with near-duplicate inputs that carry gradient observations, or with a noise level far below the data's. "
        "Try: a larger noise_lower_bound (e.g. 1e-4), known noise instead of none, removing near-duplicate "
        f"points, or a shorter initial lengthscale.{precision}"
    )


def _scale_view(scale: Tensor) -> Tensor:
    """An output scale of shape `batch` as `batch x 1 x 1`, to multiply `batch x N x N` matrices."""
    return scale.detach().reshape(*scale.shape, 1, 1)


def cholesky_with_jitter(K: Tensor, noise: Tensor, scale: Tensor | None = None) -> tuple[Tensor, float]:
    """Lower Cholesky factor of ``scale * K + diag(noise)`` (no autograd), escalating jitter if it fails.

    The matrix is formed in one new buffer and factorised in place.

    Args:
        K: `... x N x N` symmetric covariance (not modified).
        noise: `... x N` diagonal to add.
        scale: optional output scale (shape `batch` or scalar) multiplying ``K``.

    Returns:
        ``(L, jitter)``: the `... x N x N` lower factor and the absolute jitter that was added (0.0 if none).

    Raises:
        CholeskyError: if the factorisation fails even with the largest jitter; the message
            says what to do.
    """
    buffer: list[Tensor] = []

    def factorise(jitter: float) -> tuple[Tensor, bool]:
        # Refill the buffer of the previous attempt when the factorisation left it reusable.
        out = buffer[0] if buffer and buffer[0].is_contiguous() and scale is not None else None
        if scale is None:
            A = K.detach().clone()
        else:
            A = K.detach() * _scale_view(scale) if out is None else torch.mul(K.detach(), _scale_view(scale), out=out)
        A.diagonal(dim1=-2, dim2=-1).add_(noise.detach() + jitter)
        buffer[:] = [A]
        return cholesky_in_place(A)

    diagonal = K.detach().diagonal(dim1=-2, dim2=-1)
    diagonal = diagonal if scale is None else diagonal * scale.detach().reshape(*scale.shape, 1)
    size = diagonal.mean() + noise.detach().mean()
    return _with_jitter(factorise, size.item(), K.shape[-1], K.dtype)


def cholesky_differentiable(A: Tensor) -> tuple[Tensor, float]:
    """Lower Cholesky factor of a `... x N x N` matrix with autograd (small blocks), same jitter policy."""
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)

    def factorise(jitter: float) -> tuple[Tensor, bool]:
        L, info = torch.linalg.cholesky_ex(A + jitter * eye if jitter else A)
        return L, not bool(info.any())

    return _with_jitter(factorise, A.detach().diagonal(dim1=-2, dim2=-1).mean().item(), A.shape[-1], A.dtype)


def inverse_lower(L: Tensor) -> Tensor | None:
    """The lower triangle of ``(L L^T)^-1`` (upper triangle zero), or None where no faster way than torch's applies.

    - CPU, torch on one thread (small problems, :func:`~gpderiv.inference.threads.threads_for`, or
      a user's setting), one factor of at most :data:`POTRI_ROWS` rows: LAPACK ``potri`` through
      scipy (triangular inverse, then the symmetric product ``L^-T L^-1``), writing only the lower
      triangle, in 1.5 Choleskys of the same N where ``torch.cholesky_inverse`` (which fills both
      triangles) takes 2.1 (N = 1500, docs/benchmarks.md, "Small problems"). With two threads,
      scipy's OpenBLAS pool next to torch's OpenMP pool made one N = 1200 MLL + gradient 0.16-0.21 s
      against 0.066 s through torch alone (loaded 2-core machine): two thread pools contend.
    - CUDA, one factor: :func:`~gpderiv.inference.spd_inverse.inverse_lower_blocked`. torch's CUDA
      ``cholesky_inverse`` solves with the identity (2 N^3 flops, 6 Choleskys; 0.60 s against a
      0.11 s Cholesky on an H200 at N = 24,000); the blocked inverse needs half the flops, mostly in
      matrix products (on the CPU it took 0.50-0.58 of the solve with the identity's time,
      N = 1500-3000, docs/benchmarks.md). Not for float32 while TF32 matrix products are allowed
      (``torch.get_float32_matmul_precision() != "highest"``): their ~1e-3 relative error would
      enter the inverse.
    - Otherwise None, and the caller uses ``torch.cholesky_inverse``.

    Args:
        L: `N x N` lower Cholesky factor with a zero upper triangle (not modified).

    Returns:
        A new `N x N` tensor or None.
    """
    if L.dim() != 2:
        return None
    if L.device.type == "cuda":
        tf32 = L.dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
        return None if tf32 else inverse_lower_blocked(L)
    applies = L.device.type == "cpu" and L.dtype in (torch.float64, torch.float32)
    if not applies or L.shape[-1] > POTRI_ROWS or torch.get_num_threads() != 1:
        return None
    # A column-major copy is a Fortran-ordered array for LAPACK, inverted in its own memory.
    work = torch.empty_strided(L.shape, (1, L.shape[0]), dtype=L.dtype).copy_(L)
    array = work.numpy()
    (potri,) = scipy.linalg.lapack.get_lapack_funcs(("potri",), (array,))
    with blas_threads(1):  # as torch: one pool of one thread
        _, info = potri(array, lower=1, overwrite_c=1)
    if info != 0:  # a singular factor: potri leaves it unusable; torch reports the same failure its own way
        return None
    return work  # potri leaves the upper triangle as it was: zero, as torch's Cholesky writes its factors


def _sum_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back to the shape of its input (inputs shared by a batch)."""
    while grad.dim() > len(shape):
        grad = grad.sum(0)
    dims = [i for i, (g, s) in enumerate(zip(grad.shape, shape, strict=True)) if s == 1 and g != 1]
    return grad.sum(dims, keepdim=True) if dims else grad


class _NegativeLogMarginal(torch.autograd.Function):
    """``L(K, s, noise, r)`` with the closed-form backward of the module docstring (batched over leading dims)."""

    @staticmethod
    def forward(ctx: Any, K: Tensor, scale: Tensor | None, noise: Tensor, resid: Tensor) -> Tensor:
        L, jitter = cholesky_with_jitter(K, noise, scale)
        resid = resid.detach()
        alpha = cholesky_solve(L, resid)
        quad = (resid * alpha).sum(-1)
        # K itself is not kept: the output-scale gradient needs only the diagonal (see backward).
        ctx.save_for_backward(L, alpha, quad, noise.detach() + jitter, scale)
        ctx.shapes = (K.shape, noise.shape, resid.shape)
        return 0.5 * quad + L.diagonal(dim1=-2, dim2=-1).log().sum(-1) + gaussian_constant(resid.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        L, alpha, quad, diagonal, scale = ctx.saved_tensors
        K_shape, noise_shape, resid_shape = ctx.shapes
        grad_K = grad_scale = grad_noise = grad_resid = None
        if any(ctx.needs_input_grad[:3]):
            lower = inverse_lower(L) if alpha.dim() == 1 else None
            if lower is not None:
                # Only the lower triangle of A^-1 is computed (potri, or blocks on CUDA). Every consumer of
                # grad_K contracts it with dK/dtheta, which is symmetric, so any G with
                # G + G^T = 2 W gives the same gradients: G = tril(A^-1, -1) + diag(A^-1) / 2
                # - alpha alpha^T / 2, whose diagonal is W's.
                W = lower
                W.diagonal().mul_(0.5)
                W.addr_(alpha, alpha, alpha=-0.5)
                if bool(grad_output != 1.0):
                    W.mul_(grad_output)
            else:
                # W = 1/2 (A^-1 - alpha alpha^T), built in one N x N buffer.
                W = torch.cholesky_inverse(L)  # L is column-major as factorised here: no copy
                if alpha.dim() > L.dim() - 1:  # a batch of residuals sharing one matrix
                    W = W.expand(*alpha.shape[:-1], *W.shape[-2:]).clone()
                if alpha.dim() == 1:
                    W.addr_(alpha, alpha, alpha=-1.0)
                else:
                    W.sub_(alpha.unsqueeze(-1) * alpha.unsqueeze(-2))
                W.mul_(0.5 * grad_output.reshape(*grad_output.shape, 1, 1))
            W_diagonal = W.diagonal(dim1=-2, dim2=-1)  # W's own diagonal in both layouts
            if ctx.needs_input_grad[2]:
                grad_noise = _sum_to(W_diagonal.clone(), noise_shape)
            if ctx.needs_input_grad[1]:
                # <W, K> = (tr(W A) - tr(W D)) / s with A = s K + D, and tr(W A) = (N - r^T alpha) / 2
                # because A alpha = r: no copy of K is needed.
                trace_wa = 0.5 * grad_output * (alpha.shape[-1] - quad)
                grad = (trace_wa - (W_diagonal * diagonal).sum(-1)) / scale.detach()
                grad_scale = _sum_to(grad, scale.shape).reshape(scale.shape)
            grad_K = _sum_to(W if scale is None else W.mul_(_scale_view(scale)), K_shape)
        if ctx.needs_input_grad[3]:
            grad_resid = _sum_to(alpha * grad_output.unsqueeze(-1), resid_shape)
        return grad_K, grad_scale, grad_noise, grad_resid


class _Lower:
    """A dense lower Cholesky factor ``L``: ``L^-1 B`` and ``L^-T B`` for `... x N x t` ``B``."""

    def __init__(self, L: Tensor) -> None:
        self.L = L
        self.size = L.shape[-1]

    def solve_lower(self, B: Tensor) -> Tensor:
        """``L^-1 B``."""
        return solve_triangular(self.L, B, upper=False)

    def solve_upper(self, B: Tensor) -> Tensor:
        """``L^-T B``."""
        return solve_triangular(self.L, B, upper=True)

    def half_logdet(self) -> Tensor:
        """`batch` ``sum log diag L`` = half the log-determinant."""
        return self.L.diagonal(dim1=-2, dim2=-1).log().sum(-1)


def _cat_rows(top: Tensor, bottom: Tensor) -> Tensor:
    """``[top; bottom]`` along the row dimension, broadcasting their batch dimensions."""
    batch = torch.broadcast_shapes(top.shape[:-2], bottom.shape[:-2])
    return torch.cat([top.expand(*batch, *top.shape[-2:]), bottom.expand(*batch, *bottom.shape[-2:])], -2)


class _Grown:
    r"""Factor of ``[[A11, A12], [A21, A22]]`` grown from a factor ``L1`` of ``A11`` (new observations).

    .. math:: L = \begin{bmatrix} L_1 & 0 \\ B^\top & C \end{bmatrix}, \quad B = L_1^{-1} A_{12},
       \quad C C^\top = A_{22} - B^\top B

    Conditioning on ``N2`` new rows costs ``O(N1^2 N2)`` instead of a new ``O((N1 + N2)^3)``
    factorisation, and the old factor is shared by every batch member (fantasy). Nested growth
    (fantasies of fantasies) stacks these.
    """

    def __init__(self, first: _Lower | _Grown, A12: Tensor, A22: Tensor) -> None:
        self.first = first
        self.Bt = first.solve_lower(A12).mT  # `batch x N2 x N1`
        self.C = _Lower(cholesky_differentiable(A22 - self.Bt @ self.Bt.mT)[0])
        self.size = first.size + self.C.size

    def solve_lower(self, B: Tensor) -> Tensor:
        """``w1 = L1^-1 b1``, ``w2 = C^-1 (b2 - B^T w1)``."""
        W1 = self.first.solve_lower(B[..., : self.first.size, :])
        W2 = self.C.solve_lower(B[..., self.first.size :, :] - self.Bt @ W1)
        return _cat_rows(W1, W2)

    def solve_upper(self, B: Tensor) -> Tensor:
        """``z2 = C^-T b2``, ``z1 = L1^-T (b1 - B z2)``."""
        Z2 = self.C.solve_upper(B[..., self.first.size :, :])
        Z1 = self.first.solve_upper(B[..., : self.first.size, :] - self.Bt.mT @ Z2)
        return _cat_rows(Z1, Z2)

    def half_logdet(self) -> Tensor:
        """`batch` half the log-determinant."""
        return self.first.half_logdet() + self.C.half_logdet()


class DenseFactor(Factor):
    """A dense Cholesky factor of ``A`` (possibly grown by :meth:`extend`) and ``alpha = A^-1 r``.

    Attributes:
        jitter: absolute jitter that was added to factorise (0.0 if none).
    """

    def __init__(
        self,
        engine: Engine,
        kernel: Kernel,
        parts: tuple[ObservedRows, ...],
        noise: Tensor,
        resid: Tensor,
        lower: _Lower | _Grown,
        jitter: float,
    ) -> None:
        super().__init__(engine, kernel, parts[0], noise, resid)
        self.parts = parts
        self.lower, self.jitter = lower, jitter
        self.alpha = self.solve(resid.unsqueeze(-1)).squeeze(-1)  # `batch x N`

    def solve(self, rhs: Tensor) -> Tensor:
        """``A^-1 rhs`` for an `N` vector or a `... x N x t` matrix (two triangular solves)."""
        if rhs.dim() == 1:
            return self.solve(rhs.unsqueeze(-1)).squeeze(-1)
        return self.lower.solve_upper(self.lower.solve_lower(rhs))

    def negative_log_marginal(self) -> Tensor:
        """``1/2 r^T alpha + sum log diag L + N/2 log 2 pi``, from the factor (no new factorisation)."""
        return 0.5 * (self.resid * self.alpha).sum(-1) + self.lower.half_logdet() + gaussian_constant(self.lower.size)

    def whiten(self, K_cross: Tensor) -> Tensor:
        """`... x N x m` matrix ``V = L^-1 K_cross^T``: the posterior covariance is ``K_** - V^T V``."""
        return self.lower.solve_lower(K_cross.mT)

    def variance_reduction(self, K_cross: Tensor) -> Tensor:
        """`m` diagonal of ``K_cross A^-1 K_cross^T`` (column norms of ``V``, no ``V^2`` temporary)."""
        return torch.linalg.vector_norm(self.whiten(K_cross), dim=-2).square()

    def covariance_reduction(self, K_cross: Tensor) -> Tensor:
        """`m x m` matrix ``K_cross A^-1 K_cross^T = V^T V``."""
        V = self.whiten(K_cross)
        return V.mT @ V

    def extend(self, new: ObservedRows, noise: Tensor, resid: Tensor, kernel: Kernel | None = None) -> DenseFactor:
        """Grow the factor by new rows: ``O(N^2 N')`` instead of a new factorisation (differentiable in ``new``).

        Arguments as :meth:`Factor.extend`.
        """
        A12, A22 = self._grow_blocks(new, noise)
        noise_all, resid_all = self._grow_vectors(noise, resid)
        kernel = self.kernel if kernel is None else kernel
        lower = _Grown(self.lower, A12, A22)
        return DenseFactor(self.engine, kernel, (*self.parts, new), noise_all, resid_all, lower, self.jitter)


class DenseCholesky(Engine):
    """Dense exact inference: one Cholesky per evaluation, O(N^3) time, O(N^2) memory; any kernel and rows."""

    name = "dense"
    #: Peak number of `N x N` matrices alive during one MLL + gradient evaluation: the kernel
    #: matrix and its noisy copy (factorised in place) in the forward, the factor and A^-1 in
    #: the backward; measured 2.1-2.7 (docs/benchmarks.md), 3 leaves room for temporaries.
    peak_matrices = 3
    memory_advice = (
        "Use fewer observations (for instance gradients at a subset of the points: NaN marks what is left out), "
        "inference='iterative' where it applies, or a machine with more memory."
    )

    @classmethod
    def memory_for_rows(cls, N: int, dtype: torch.dtype, batch: int = 1) -> int:
        """Bytes of ``peak_matrices`` `N x N` matrices (per batch member)."""
        return batch * cls.peak_matrices * N * N * (torch.finfo(dtype).bits // 8)

    def memory_estimate(self, data: ObservedRows, dtype: torch.dtype) -> int:
        """Bytes of :attr:`peak_matrices` `N x N` matrices per batch member."""
        return self.memory_for_rows(data.num_rows, dtype, data.batch_shape.numel())

    def negative_log_marginal(self, kernel: Kernel, data: ObservedRows, noise: Tensor, resid: Tensor) -> Tensor:
        """Differentiable negative log marginal likelihood (exact; see the module docstring), `batch` shaped."""
        K, scale = data.covariance(kernel)
        return _NegativeLogMarginal.apply(K, scale, noise, resid)

    def factor(self, kernel: Kernel, data: ObservedRows, noise: Tensor, resid: Tensor) -> DenseFactor:
        """Factorise ``A`` once for prediction; with autograd only when the data itself needs gradients."""
        K, scale = data.covariance(kernel)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (data.X, resid)):
            A = K if scale is None else scale.unsqueeze(-1).unsqueeze(-1) * K
            L, jitter = cholesky_differentiable(A + torch.diag_embed(noise))
        else:
            L, jitter = cholesky_with_jitter(K, noise, scale)
        return DenseFactor(self, kernel, (data,), noise, resid, _Lower(L), jitter)
