r"""Block covariance of a stationary kernel and its first derivatives.

For a kernel :math:`k(x_1, x_2) = \varphi(u)` with
:math:`u = \sum_a \delta_a^2 / \ell_a^2`, :math:`\delta = x_1 - x_2` and
:math:`\rho_a = \delta_a / \ell_a^2`, the chain rule gives (:math:`\partial u / \partial x_{2b}
= -2\rho_b`, :math:`\partial u / \partial x_{1a} = 2\rho_a`):

.. math::

    K           &= \varphi(u) \\
    K_{fg}[:, b] = \frac{\partial k}{\partial x_{2b}} &= -2\,\varphi'(u)\,\rho_b \\
    K_{gf}[a, :] = \frac{\partial k}{\partial x_{1a}} &= \phantom{-}2\,\varphi'(u)\,\rho_a \\
    K_{gg}[a, b] = \frac{\partial^2 k}{\partial x_{1a}\,\partial x_{2b}}
        &= -4\,\varphi''(u)\,\rho_a \rho_b - 2\,\varphi'(u)\,\delta_{ab} / \ell_a^2

For the RBF profile (:math:`\varphi = e^{-u/2}`) these are the signs of DESIGN.md:
:math:`K_{fg} = k\,\rho_b`, :math:`K_{gf} = -k\,\rho_a`,
:math:`K_{gg} = k\,(\delta_{ab}/\ell_a^2 - \rho_a\rho_b)`.

Block layout: values first, then the gradients point-major, so row ``n1 + i*d + a`` is
:math:`\partial f(x_{1i}) / \partial x_a`.  :func:`interleave_index` maps it to GPyTorch's
interleaved layout ``[f, d_1 f, ..., d_d f]`` per point (:ref:`layouts`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "Profile",
    "assemble_block_matrix",
    "interleave_index",
    "stationary_derivative_blocks",
    "stationary_derivative_diag",
]

#: A radial profile ``(u, order) -> (phi(u), phi'(u), ..., phi^(order)(u))``, derivatives with
#: respect to u. The blocks need order 2; their lengthscale gradient needs order 3.
Profile = Callable[[Tensor, int], tuple[Tensor, ...]]

#: Elements of one chunk of temporaries in the lengthscale backward (32 MiB in float64).
_CHUNK_ELEMENTS = 2**22
#: Below this many elements (512 KiB in float64) a chunk is not cut further to save memory: at
#: N = 60 the 1/8 rule made ten chunks of two rows each, a dozen small ops apiece, the largest
#: cost of an L-BFGS iteration after the thread setting (docs/benchmarks.md, "Small problems").
_SMALL_CHUNK_ELEMENTS = 2**16


def _scaled_differences(x1: Tensor, x2: Tensor, lengthscale: Tensor, pairwise: bool) -> tuple[Tensor, Tensor]:
    """Return ``u`` (`... x n1 x n2`) and ``rho = delta / l^2`` (`... x n1 x n2 x d`).

    ``u`` is a sum of squares of differences (not ``|x1|^2 + |x2|^2 - 2 x1.x2``): it is exactly
    zero at coincident points and never negative.
    """
    x1s, x2s = x1 / lengthscale, x2 / lengthscale
    if pairwise:
        x1s, x2s, lengthscale = x1s.unsqueeze(-2), x2s.unsqueeze(-3), lengthscale.unsqueeze(-2)
    diff = x1s - x2s
    return diff.square().sum(-1), diff / lengthscale


def stationary_derivative_blocks(
    x1: Tensor,
    x2: Tensor,
    lengthscale: Tensor,
    profile: Profile,
    *,
    grad1: bool = True,
    grad2: bool = True,
) -> Tensor:
    r"""Joint covariance of values and gradients, ``[[K, K_fg], [K_gf, K_gg]]`` (block layout).

    Args:
        x1: `... x n1 x d` inputs.
        x2: `... x n2 x d` inputs.
        lengthscale: `... x 1 x d` (ARD) or `... x 1 x 1` lengthscales.
        profile: radial profile of the kernel family (see :data:`Profile`).
        grad1: include the gradient rows of ``x1`` (otherwise only the value rows).
        grad2: include the gradient columns of ``x2``.

    Returns:
        `... x n1 (1 + d [grad1]) x n2 (1 + d [grad2])` covariance in block layout.
    """
    if grad1 and grad2 and not (x1.requires_grad or x2.requires_grad):
        # Training path: hyperparameter gradients in closed form (see _BlocksLengthscaleVJP).
        return _BlocksLengthscaleVJP.apply(x1, x2, lengthscale, profile)
    return _assemble(x1, x2, lengthscale, profile, grad1, grad2)


def _assemble(x1: Tensor, x2: Tensor, lengthscale: Tensor, profile: Profile, grad1: bool, grad2: bool) -> Tensor:
    """The assembly itself, in differentiable torch operations (autograd gives any gradient)."""
    d = x1.shape[-1]
    lengthscale = lengthscale.expand(*lengthscale.shape[:-1], d)
    u, rho = _scaled_differences(x1, x2, lengthscale, pairwise=True)
    phi, dphi, d2phi = profile(u, 2)
    k_fg = (-2.0 * dphi).unsqueeze(-1) * rho if grad2 else None
    k_gf = (2.0 * dphi).unsqueeze(-1) * rho if grad1 else None
    if not (grad1 and grad2):
        return assemble_block_matrix(phi, k_fg, k_gf, None)
    # K_gg[i, a, j, b] = -4 phi'' rho_a rho_b - 2 phi' delta_ab / l_a^2, in point-major order.
    weighted = ((-4.0 * d2phi).unsqueeze(-1) * rho).transpose(-1, -2).contiguous()  # ... x n1 x d x n2
    diagonal = (-2.0 * dphi).unsqueeze(-1) / lengthscale.unsqueeze(-2).square()
    if torch.is_grad_enabled():  # autograd path: differentiable operations, one d^2 temporary
        k_gg = weighted.unsqueeze(-1) * rho.unsqueeze(-3)
        k_gg.diagonal(dim1=-3, dim2=-1).add_(diagonal)
        return assemble_block_matrix(phi, k_fg, k_gf, k_gg)
    # Training path (inside _BlocksLengthscaleVJP): K_gg is written straight into the output,
    # so the assembly peaks at one N x N matrix.
    out = assemble_block_matrix(phi, k_fg, k_gf, None)
    n1, n2 = phi.shape[-2:]
    view = out[..., n1:, n2:].unflatten(-1, (n2, d)).unflatten(-3, (n1, d))  # ... x n1 x d x n2 x d
    torch.mul(weighted.unsqueeze(-1), rho.unsqueeze(-3), out=view)
    view.diagonal(dim1=-3, dim2=-1).add_(diagonal)
    return out


def assemble_block_matrix(k: Tensor, k_fg: Tensor | None, k_gf: Tensor | None, k_gg: Tensor | None) -> Tensor:
    """Place the blocks of the joint covariance in block layout.

    Args:
        k: `... x n1 x n2` covariance of values.
        k_fg: `... x n1 x n2 x d` with ``k_fg[i, j, b] = dk/dx2_b``, or None (no gradient columns).
        k_gf: `... x n1 x n2 x d` with ``k_gf[i, j, a] = dk/dx1_a``, or None (no gradient rows).
        k_gg: `... x n1 x d x n2 x d` with ``k_gg[i, a, j, b] = d2k/dx1_a dx2_b`` (point-major), or
            None: then that block is left uninitialised for the caller to fill in place.

    Returns:
        `... x n1 (1 + d [k_gf]) x n2 (1 + d [k_fg])` matrix.
    """
    *batch, n1, n2 = k.shape
    d = (k_fg if k_fg is not None else k_gf).shape[-1] if (k_fg is not None or k_gf is not None) else 0
    rows = n1 * (1 + d * (k_gf is not None))
    cols = n2 * (1 + d * (k_fg is not None))
    # One output buffer filled block by block: the d^2-sized K_gg is copied once, instead of the
    # several full-size temporaries of nested torch.cat calls.
    out = k.new_empty(*batch, rows, cols)
    out[..., :n1, :n2] = k
    if k_fg is not None:
        out[..., :n1, n2:] = k_fg.reshape(*batch, n1, n2 * d)
    if k_gf is not None:
        out[..., n1:, :n2] = k_gf.transpose(-1, -2).reshape(*batch, n1 * d, n2)
    if k_gg is not None:
        out[..., n1:, n2:] = k_gg.reshape(*batch, n1 * d, n2 * d)
    return out


class _BlocksLengthscaleVJP(torch.autograd.Function):
    r"""The full block matrix with a closed-form vector-Jacobian product for the lengthscales.

    Autograd through :func:`_assemble` makes some fifteen memory-bound passes over the
    `N x N` upstream gradient; this backward makes one copy and two batched mat-vecs. With
    :math:`w_c = \ell_c^{-2}`, :math:`\partial u / \partial w_c = \delta_c^2` and
    :math:`\partial \rho_a / \partial w_c = \delta_{ac}\delta_a`, the contraction of the
    upstream gradient :math:`G` with :math:`\partial K / \partial w_c` is, per pair of points,
    :math:`\delta_c^2 A + \delta_c B_c + C_c` with

    .. math::

        A &= \varphi^{(1)} G_{ff} + 2\varphi^{(2)}(t_{gf} - t_{fg})
             - 4\varphi^{(3)} \rho^\top G_{gg}\rho - 2\varphi^{(2)} \textstyle\sum_a w_a G_{gg,aa}, \\
        B_c &= 2\varphi^{(1)}(G_{gf,c} - G_{fg,c})
             - 4\varphi^{(2)}\big((G_{gg}\rho)_c + (G_{gg}^\top\rho)_c\big), \qquad
        C_c = -2\varphi^{(1)} G_{gg,cc},

    :math:`t_{fg} = \sum_b G_{fg,b}\rho_b`, :math:`t_{gf} = \sum_a G_{gf,a}\rho_a`. Gradients
    with respect to the inputs are not provided: callers whose inputs require grad take the
    autograd path.
    """

    @staticmethod
    def forward(ctx: Any, x1: Tensor, x2: Tensor, lengthscale: Tensor, profile: Profile) -> Tensor:
        ctx.profile = profile
        ctx.save_for_backward(x1, x2, lengthscale)
        return _assemble(x1, x2, lengthscale, profile, True, True)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x1, x2, lengthscale = ctx.saved_tensors
        if not ctx.needs_input_grad[2]:
            return None, None, None, None
        n1, d = x1.shape[-2:]
        n2 = x2.shape[-2]
        ls = lengthscale.expand(*lengthscale.shape[:-1], d)
        w = ls.pow(-2).unsqueeze(-2)  # ... x 1 x 1 x d
        # sum_a v_a w_a: one matrix-vector product for shared lengthscales (a broadcast matmul copies per batch).
        w_vector = w.reshape(d) if w.numel() == d else None

        def weighted(v: Tensor) -> Tensor:
            return v @ w_vector if w_vector is not None else (v * w).sum(-1)

        batch = grad.shape[:-2]
        grad_w = 0.0
        # Rows of points in chunks: every temporary is O(chunk n2 d^2), not O(N^2).
        # At most 32 MiB, and at most 1/8 of the d^2 block, so small problems stay near 2 matrices;
        # but never cut below 512 KiB, where the memory saved is nothing and each chunk costs ops.
        elements = min(_CHUNK_ELEMENTS, max(n1 * n2 * d * d // 8, _SMALL_CHUNK_ELEMENTS))
        chunk = max(1, elements // (n2 * d * d))
        for i0 in range(0, n1, chunk):
            i1 = min(n1, i0 + chunk)
            c = i1 - i0
            delta = x1[..., i0:i1, :].unsqueeze(-2) - x2.unsqueeze(-3)  # ... x c x n2 x d
            rho = delta * w
            # Sums over the d components as batched products (matmul): for small d a multiply-then-
            # sum(-1) was 3-4x slower, and these sums were most of the backward's time.
            _, p1, p2, p3 = ctx.profile(weighted(delta.square()), 3)
            g_ff = grad[..., i0:i1, :n2]
            g_fg = grad[..., i0:i1, n2:].reshape(*batch, c, n2, d)
            g_gf = grad[..., n1 + i0 * d : n1 + i1 * d, :n2].reshape(*batch, c, d, n2).transpose(-1, -2)
            # The chunk of the d^2 block in pair-major order (a strided view, no copy).
            g_gg = grad[..., n1 + i0 * d : n1 + i1 * d, n2:].reshape(*batch, c, d, n2, d).transpose(-3, -2)
            # G rho + G^T rho = (G + G^T) rho in one batched mat-vec, and rho^T G rho = rho^T (G + G^T) rho / 2.
            s_rho = ((g_gg + g_gg.mT) @ rho.unsqueeze(-1)).squeeze(-1)
            g_diag = g_gg.diagonal(dim1=-2, dim2=-1)
            g_diff = g_gf - g_fg
            A = p1 * g_ff + 2 * p2 * (_dot(g_diff, rho) - weighted(g_diag)) - 2 * p3 * _dot(rho, s_rho)
            B = 2 * p1.unsqueeze(-1) * g_diff - 4 * p2.unsqueeze(-1) * s_rho
            C = -2 * p1.unsqueeze(-1) * g_diag
            grad_w = grad_w + (delta * (delta * A.unsqueeze(-1) + B) + C).sum((-3, -2)).unsqueeze(-2)
        grad_ls = grad_w * (-2.0) * ls.pow(-3)  # dw/dl = -2 / l^3
        return None, None, grad_ls.sum_to_size(lengthscale.shape), None


def _dot(x: Tensor, y: Tensor) -> Tensor:
    """``(x * y).sum(-1)`` as a batched product of `1 x d` and `d x 1` matrices (faster for small d)."""
    return (x.unsqueeze(-2) @ y.unsqueeze(-1)).flatten(-3)


def stationary_derivative_diag(x1: Tensor, x2: Tensor, lengthscale: Tensor, profile: Profile) -> Tensor:
    r"""Diagonal of :func:`stationary_derivative_blocks` for ``n1 == n2``, without the full matrix.

    Entry ``i`` pairs ``x1[i]`` with ``x2[i]``; at coincident points the gradient entries
    reduce to :math:`-2\varphi'(0)/\ell_a^2` (:math:`1/\ell_a^2` for the RBF).

    Args:
        x1: `... x n x d` inputs.
        x2: `... x n x d` inputs.
        lengthscale: `... x 1 x d` or `... x 1 x 1` lengthscales.
        profile: radial profile of the kernel family.

    Returns:
        `... x n (1 + d)` diagonal in block layout.
    """
    d = x1.shape[-1]
    lengthscale = lengthscale.expand(*lengthscale.shape[:-1], d)
    u, rho = _scaled_differences(x1, x2, lengthscale, pairwise=False)
    phi, dphi, d2phi = profile(u, 2)
    grad_diag = (-4.0 * d2phi).unsqueeze(-1) * rho.square() - (2.0 * dphi).unsqueeze(-1) / lengthscale.square()
    return torch.cat([phi, grad_diag.flatten(-2)], dim=-1)


def interleave_index(n: int, d: int, device: torch.device | None = None) -> Tensor:
    """Index that reorders a block-layout axis into GPyTorch's interleaved layout.

    ``block[..., interleave_index(n, d)]`` has entry ``i*(d+1)`` equal to the value at point
    ``i`` and entry ``i*(d+1) + 1 + a`` equal to its ``a``-th partial derivative.

    Args:
        n: number of points.
        d: input dimension.
        device: device of the returned index.

    Returns:
        `n (d + 1)` long tensor.
    """
    values = torch.arange(n, device=device).unsqueeze(-1)
    grads = n + torch.arange(n * d, device=device).view(n, d)
    return torch.cat([values, grads], dim=-1).flatten()
