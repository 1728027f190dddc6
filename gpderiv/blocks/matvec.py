r"""Products with the RBF derivative block matrix without forming it: O(n1 n2 d) per vector.

For the RBF kernel :math:`E_{ij} = e^{-\frac12 \sum_a w_a r_{ija}^2}`, :math:`r_{ij} = x_{1i} - x_{2j}`,
:math:`w = \ell^{-2}`, the blocks are :math:`K_{fg} = E_{ij} w_b r_{ijb}`,
:math:`K_{gf} = -E_{ij} w_a r_{ija}` and :math:`K_{gg} = E_{ij}(w_a\delta_{ab} - w_a r_{ija} w_b r_{ijb})`:
the gradient-gradient block is a Kronecker term minus a term of rank :math:`n_2` in the span of the
inputs (DESIGN.md). For a right-hand side :math:`[u; U]` (values `n2`, gradients `n2 x d`) and
:math:`z = w \odot x`, with :math:`P_{ij} = z_{1i}\cdot U_j`, :math:`p_j = z_{2j}\cdot U_j` and
:math:`F_{ij} = E_{ij}(u_j + P_{ij} - p_j)`:

.. math::

    (K [u; U])_{f,i} = \sum_j F_{ij}, \qquad
    (K [u; U])_{g,i} = w \odot \Big(\sum_j E_{ij} U_j - x_{1i} \sum_j F_{ij} + \sum_j F_{ij} x_{2j}\Big),

so one product costs :math:`O(n_1 n_2 d)` instead of the :math:`O(n_1 n_2 d^2)` of the dense
matrix, and memory stays :math:`O(c\,(d^2 t + n_2 d) + (n_1 + n_2) d^2 t)` for row chunks of size
`c` and `t` right-hand sides (:math:`O(c\, n_2 (t + d))` above ``_GEMM_MAX_DIM``). The building
block of a matrix-free (iterative) engine.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rbf_derivative_matmul", "rbf_exponentials"]

#: Elements of the temporaries of one row chunk (32 MiB in float64). Chunks sized by these, not by
#: `n2 t`, keep the `E @ T` product a wide GEMM: at n1 = n2 = 10,000, d = 10, one product with 11
#: (22) columns took 3.18 s (9.13 s) with 38 (19) rows per chunk and 1.80 s (3.23 s) with 2048.
_CHUNK_ELEMENTS = 2**22
#: Up to this input dimension the product is all matrix products (with d^2 t columns); above it,
#: an elementwise `chunk x n2 x t` pass is cheaper than d^2 columns.
_GEMM_MAX_DIM = 32


def rbf_exponentials(x1: Tensor, x2: Tensor, lengthscale: Tensor) -> Tensor:
    """`n1 x n2` matrix ``E_ij = exp(-|x1_i - x2_j|^2_w / 2)`` by one matrix product (BLAS).

    ``|a|^2 + |b|^2 - 2 a.b`` with the scaled inputs, clamped at 0: the rounding at coincident
    points is of order 1e-16 relative, harmless in products (the closed-form blocks use exact
    differences where exactness at r = 0 matters).
    """
    w = lengthscale.reshape(-1).expand(x1.shape[-1]).pow(-2)
    s1, s2 = x1 * w.sqrt(), x2 * w.sqrt()
    u = s1.square().sum(-1).unsqueeze(-1) + s2.square().sum(-1) - 2.0 * s1 @ s2.T
    return torch.exp(-0.5 * u.clamp_min(0.0))


def rbf_derivative_matmul(
    x1: Tensor,
    x2: Tensor,
    lengthscale: Tensor,
    rhs: Tensor,
    *,
    chunk_size: int | None = None,
    exponentials: Tensor | None = None,
) -> Tensor:
    """``K(x1, x2) @ rhs`` for the RBF derivative block matrix (block layout), never formed.

    Differentiable with respect to every input (autograd through the chunked computation).

    Args:
        x1: `n1 x d` inputs of the rows.
        x2: `n2 x d` inputs of the columns.
        lengthscale: `d`, `1 x d` or scalar-like lengthscales.
        rhs: `n2 (1 + d)` vector or `n2 (1 + d) x t` matrix in block layout.
        chunk_size: rows of ``x1`` per chunk (default: temporaries of 32 MiB).
        exponentials: precomputed :func:`rbf_exponentials` (`n1 x n2`), reused across products
            (an iterative solver multiplies by the same matrix many times).

    Returns:
        `n1 (1 + d)` (or `n1 (1 + d) x t`) product in block layout.
    """
    n1, d = x1.shape
    n2 = x2.shape[0]
    vector = rhs.ndim == 1
    rhs = rhs.unsqueeze(-1) if vector else rhs
    if rhs.shape[0] != n2 * (1 + d):
        raise ValueError(f"rhs: expected {n2 * (1 + d)} rows for n2 = {n2}, d = {d}, got {rhs.shape[0]}")
    t = rhs.shape[-1]
    if n1 == 0:  # no rows (a rank whose share of the points is empty, gpderiv.inference.distributed)
        out = rhs.new_zeros(0, t)
        return out.squeeze(-1) if vector else out
    w = lengthscale.reshape(-1).expand(d).pow(-2)
    u, U = rhs[:n2], rhs[n2:].reshape(n2, d, t)
    z1, z2 = x1 * w, x2 * w
    p = torch.einsum("ja,jat->jt", z2, U)  # z2_j . U_j
    U_flat = U.reshape(n2, d * t)  # for E @ U
    gemm = d <= _GEMM_MAX_DIM
    if gemm:
        T = (U.unsqueeze(2) * x2.unsqueeze(1).unsqueeze(-1)).reshape(n2, d * d * t)  # T_j[b, a] = U_jb x2_ja
        Ux = ((u - p).unsqueeze(1) * x2.unsqueeze(-1)).reshape(n2, d * t)  # (u_j - p_j) x2_j
        # One GEMM per chunk instead of four: E is read once.
        R = torch.cat([U_flat, u - p, T, Ux], -1)
        widths = [d * t, t, d * d * t, d * t]
    else:
        U_dn = U.permute(1, 0, 2).reshape(d, n2 * t)  # for z1 @ U_j
    # Per row of a chunk: E R ((d + 1)^2 t) or F and P (2 n2 t), plus the n2 x d differences and E itself
    # when E is not given.
    per_row = ((d + 1) ** 2 * t if gemm else 2 * n2 * t) + (0 if exponentials is not None else n2 * (d + 1))
    chunk = chunk_size or max(1, _CHUNK_ELEMENTS // max(1, per_row))
    f_parts, g_parts = [], []
    for i0 in range(0, n1, chunk):
        xc, zc = x1[i0 : i0 + chunk], z1[i0 : i0 + chunk]
        if exponentials is None:
            E = torch.exp(-0.5 * ((xc.unsqueeze(1) - x2.unsqueeze(0)).square() * w).sum(-1))  # exact at r = 0
        else:
            E = exponentials[i0 : i0 + chunk]
        c = xc.shape[0]
        if gemm:
            # Everything as matrix products: sum_j E_ij P_ij = z1_i . (E U)_i, and
            # sum_j E_ij P_ij x2_j = sum_b z1_ib (E T)_i[b] with T_j[b, a] = U_jb x2_ja.
            EU, Eu, ET, EUx = (E @ R).split(widths, -1)
            EU = EU.reshape(c, d, t)  # sum_j E_ij U_j
            row_sums = Eu + torch.einsum("ia,iat->it", zc, EU)  # c x t
            Fx = EUx.reshape(c, d, t) + torch.einsum("ib,ibat->iat", zc, ET.reshape(c, d, d, t))
        else:  # large d: the c x n2 x t tensor F_ij = E_ij (u_j + P_ij - p_j) is cheaper than d^2 columns
            EU = (E @ U_flat).view(c, d, t)  # sum_j E_ij U_j
            P = (zc @ U_dn).view(c, n2, t)
            F = E.unsqueeze(-1) * (u.unsqueeze(0) + P - p.unsqueeze(0))
            row_sums = F.sum(1)
            Fx = (F.transpose(1, 2).reshape(c * t, n2) @ x2).view(c, t, d).transpose(1, 2)
        f_parts.append(row_sums)
        g = EU - xc.unsqueeze(-1) * row_sums.unsqueeze(1) + Fx
        g_parts.append((w.unsqueeze(-1) * g).reshape(-1, t))
    out = torch.cat([torch.cat(f_parts), torch.cat(g_parts)])
    return out.squeeze(-1) if vector else out
