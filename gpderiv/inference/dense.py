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
``cholesky_inverse`` (DESIGN.md).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gpderiv.exceptions import CholeskyError, JitterWarning, ProblemTooLargeError

__all__ = ["DenseCholesky", "DenseFactor", "cholesky_with_jitter"]

#: Relative jitters tried in turn (times the mean of the diagonal) when a factorisation fails.
JITTER_SEQUENCE = (1e-10, 1e-9, 1e-8, 1e-7, 1e-6, 1e-5)


def _cholesky_in_place(A: Tensor) -> tuple[Tensor, bool]:
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


def cholesky_solve(L: Tensor, b: Tensor) -> Tensor:
    """``(L L^T)^-1 b`` for an `N` vector ``b`` by two triangular solves.

    ``torch.cholesky_solve`` copies the `N x N` factor on every call (measured: one extra
    matrix of peak memory); ``solve_triangular`` works on it in place in either layout.
    """
    z = torch.linalg.solve_triangular(L, b.unsqueeze(-1), upper=False)
    return torch.linalg.solve_triangular(L.mT, z, upper=True).squeeze(-1)


def cholesky_inverse(L: Tensor) -> Tensor:
    """``(L L^T)^-1`` as a new `N x N` matrix (``L`` column-major, as factorised here: no copy)."""
    return torch.cholesky_inverse(L)


def cholesky_with_jitter(K: Tensor, noise: Tensor, scale: Tensor | None = None) -> tuple[Tensor, float]:
    """Lower Cholesky factor of ``scale * K + diag(noise)``, escalating jitter if the factorisation fails.

    Args:
        K: `N x N` symmetric covariance (not modified).
        noise: `N` diagonal to add.
        scale: optional scalar multiplying ``K``.

    The matrix ``scale * K + diag(noise)`` is formed in one new buffer, factorised in place.

    Returns:
        ``(L, jitter)``: the `N x N` lower factor and the absolute jitter that was added (0.0 if none).

    Raises:
        CholeskyError: if the factorisation fails even with the largest jitter; the message
            says what to do.
    """

    def fill(A: Tensor | None, jitter: float) -> Tensor:
        A = K.detach().clone() if scale is None else torch.mul(K.detach(), scale.detach(), out=A)
        A.diagonal().add_(noise.detach() + jitter)
        return A

    A = fill(None, 0.0)
    # Jitter relative to the size of the diagonal; 1 when the diagonal is zero (or negative: bad kernel).
    size = A.diagonal().mean().item()
    size = size if size > 0 else 1.0
    L, ok = _cholesky_in_place(A)
    if ok:
        return L, 0.0
    for relative in JITTER_SEQUENCE:
        jitter = relative * size
        A = fill(A if A.is_contiguous() and scale is not None else None, jitter)
        L, ok = _cholesky_in_place(A)
        if ok:
            warnings.warn(
                f"The {K.shape[-1]} x {K.shape[-1]} covariance was not numerically positive definite; "
                f"added jitter {jitter:.1e} ({relative:.0e} x mean diagonal) to factorise it.",
                JitterWarning,
                stacklevel=4,
            )
            return L, jitter
    precision = " Use float64 inputs (the model runs in float32)." if K.dtype == torch.float32 else ""
    raise CholeskyError(
        f"Cholesky factorisation of the {K.shape[-1]} x {K.shape[-1]} covariance failed even with jitter "
        f"{JITTER_SEQUENCE[-1] * size:.1e} on the diagonal: the system is numerically singular. This happens "
        "with near-duplicate inputs that carry gradient observations, or with a noise level far below the data's. "
        "Try: a larger noise_lower_bound (e.g. 1e-4), known noise instead of none, removing near-duplicate "
        f"points, or a shorter initial lengthscale.{precision}"
    )


class _NegativeLogMarginal(torch.autograd.Function):
    """``L(K, s, noise, r)`` with the closed-form backward of the module docstring."""

    @staticmethod
    def forward(ctx: Any, K: Tensor, scale: Tensor | None, noise: Tensor, resid: Tensor) -> Tensor:
        L, jitter = cholesky_with_jitter(K, noise, scale)
        resid = resid.detach()
        alpha = cholesky_solve(L, resid)
        quad = resid.dot(alpha)
        # K itself is not kept: the output-scale gradient needs only the diagonal (see backward).
        ctx.save_for_backward(L, alpha, quad, noise.detach() + jitter, scale)
        n = resid.shape[-1]
        return 0.5 * quad + L.diagonal().log().sum() + 0.5 * n * math.log(2 * math.pi)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        L, alpha, quad, diagonal, scale = ctx.saved_tensors
        grad_K = grad_scale = grad_noise = grad_resid = None
        if any(ctx.needs_input_grad[:3]):
            # W = 1/2 (A^-1 - alpha alpha^T), built in one N x N buffer.
            W = cholesky_inverse(L)
            W.addr_(alpha, alpha, alpha=-1.0)
            W.mul_(0.5 * grad_output)
            if ctx.needs_input_grad[2]:
                grad_noise = W.diagonal().clone()
            if ctx.needs_input_grad[1]:
                # <W, K> = (tr(W A) - tr(W D)) / s with A = s K + D, and tr(W A) = (N - r^T alpha) / 2
                # because A alpha = r: no copy of K is needed.
                trace_wa = 0.5 * grad_output * (alpha.numel() - quad)
                grad_scale = ((trace_wa - W.diagonal().dot(diagonal)) / scale.detach()).reshape(scale.shape)
            grad_K = W if scale is None else W.mul_(scale.detach())
        if ctx.needs_input_grad[3]:
            grad_resid = alpha * grad_output
        return grad_K, grad_scale, grad_noise, grad_resid


@dataclass
class DenseFactor:
    """Cached factorisation for prediction.

    Attributes:
        L: `N x N` lower Cholesky factor of ``K + diag(noise) + jitter I``.
        alpha: `N` weights ``A^-1 r``.
        jitter: absolute jitter that was needed (0.0 if none).
    """

    L: Tensor
    alpha: Tensor
    jitter: float

    def mean(self, K_cross: Tensor) -> Tensor:
        """Posterior mean contribution ``K_cross @ alpha`` for `m x N` cross-covariances."""
        return K_cross @ self.alpha

    def whiten(self, K_cross: Tensor) -> Tensor:
        """`N x m` matrix ``V = L^-1 K_cross^T``: the posterior covariance is ``K_** - V^T V``."""
        return torch.linalg.solve_triangular(self.L, K_cross.transpose(-1, -2), upper=False)

    def variance_reduction(self, K_cross: Tensor) -> Tensor:
        """`m` diagonal of ``K_cross A^-1 K_cross^T`` (column norms of ``V``, no ``V^2`` temporary)."""
        return torch.linalg.vector_norm(self.whiten(K_cross), dim=0).square()

    def covariance_reduction(self, K_cross: Tensor) -> Tensor:
        """`m x m` matrix ``K_cross A^-1 K_cross^T = V^T V``."""
        V = self.whiten(K_cross)
        return V.transpose(-1, -2) @ V


def available_memory(device: torch.device) -> int | None:
    """Bytes of memory available on ``device`` (None if unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class DenseCholesky:
    """Dense exact inference: one Cholesky per evaluation, O(N^3) time, O(N^2) memory."""

    name = "dense"
    #: Peak number of `N x N` matrices alive during one MLL + gradient evaluation: the kernel
    #: matrix and its noisy copy (factorised in place) in the forward, the factor and A^-1 in
    #: the backward; measured 2.1-2.7 (docs/benchmarks.md), 3 leaves room for temporaries.
    peak_matrices = 3

    def check_memory(self, N: int, dtype: torch.dtype, device: torch.device) -> None:
        """Refuse, before allocating, a problem whose `N x N` matrices do not fit in memory.

        Raises:
            ProblemTooLargeError: with the estimate, what is available, and what to do.
        """
        need = self.peak_matrices * N * N * torch.finfo(dtype).bits // 8
        have = available_memory(device)
        if have is not None and need > have:
            raise ProblemTooLargeError(
                f"The dense engine needs about {need / 2**30:.1f} GiB for N = {N} observed rows "
                f"({self.peak_matrices} matrices of {N} x {N} {dtype}), but {device} has {have / 2**30:.1f} GiB "
                "available. Use fewer observations (for instance gradients at a subset of the points: NaN marks "
                "what is left out), or a machine with more memory."
            )

    def negative_log_marginal(self, K: Tensor, noise: Tensor, resid: Tensor, scale: Tensor | None = None) -> Tensor:
        """Differentiable negative log marginal likelihood (see the module docstring).

        Args:
            K: `N x N` noiseless covariance of the observed rows (requires grad for fitting).
            noise: `N` noise variance per row.
            resid: `N` targets minus prior mean.
            scale: optional scalar output scale multiplying ``K``.

        Returns:
            Scalar tensor; its backward gives gradients with respect to every input.
        """
        return _NegativeLogMarginal.apply(K, scale, noise, resid)

    def factor(self, K: Tensor, noise: Tensor, resid: Tensor, scale: Tensor | None = None) -> DenseFactor:
        """Factorise ``scale * K + diag(noise)`` once for prediction (no autograd graph is kept)."""
        with torch.no_grad():
            L, jitter = cholesky_with_jitter(K, noise, scale)
            alpha = cholesky_solve(L, resid.detach())
        return DenseFactor(L=L, alpha=alpha, jitter=jitter)
