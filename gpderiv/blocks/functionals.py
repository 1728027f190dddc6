r"""Covariances of arbitrary derivatives of order <= 2 (per side) of a stationary kernel.

For :math:`k(x_1, x_2) = \kappa(\tau) = \varphi(u)`, :math:`\tau = x_1 - x_2`,
:math:`u = \tau^\top W \tau`, :math:`W = \operatorname{diag}(\ell^{-2})`:

.. math::

    \operatorname{cov}\big(\partial^\alpha f(x_1), \partial^\beta f(x_2)\big)
        = \partial^\alpha_{x_1} \partial^\beta_{x_2} k = (-1)^{|\beta|}\, \partial^{\alpha+\beta} \kappa(\tau).

Because :math:`u` is quadratic in :math:`\tau` (:math:`\partial_a u = g_a = 2 w_a \tau_a`,
:math:`\partial_{ab} u = 2 w_a \delta_{ab}`, higher derivatives zero), Faa di Bruno's formula
reduces to a sum over the ways of splitting the derivative indices :math:`\gamma = \alpha+\beta`
into singletons and pairs:

.. math::

    \partial^\gamma \kappa = \sum_{P} \varphi^{(|P|)}(u) \prod_{\{i\} \in P} g_{\gamma_i}
        \prod_{\{i, j\} \in P} 2 w_{\gamma_i} \delta_{\gamma_i \gamma_j}

(1, 1, 2, 4 and 10 terms for orders 0 to 4). This is the one code path for every profile
family and every derivative observation type; :mod:`gpderiv.blocks.stationary` is its
specialised fast path for the value-and-gradient blocks and is tested against it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
from torch import Tensor

from gpderiv.blocks.stationary import Profile

__all__ = ["MAX_ORDER", "functional_covariance"]

#: Highest derivative order per side (second derivatives).
MAX_ORDER = 2


@cache
def _pairings(m: int) -> tuple[tuple[tuple[int, ...], tuple[tuple[int, int], ...]], ...]:
    """All splits of ``range(m)`` into singletons and pairs, as ``(singletons, pairs)``."""

    def split(items: tuple[int, ...]):
        if not items:
            yield (), ()
            return
        first, rest = items[0], items[1:]
        for singles, pairs in split(rest):
            yield (first, *singles), pairs
        for j, other in enumerate(rest):
            for singles, pairs in split(rest[:j] + rest[j + 1 :]):
                yield singles, ((first, other), *pairs)

    return tuple(split(tuple(range(m))))


def _mixed_partial(tau: Tensor, w: Tensor, phis: tuple[Tensor, ...], gamma: list[Tensor]) -> Tensor:
    """``d^gamma kappa(tau)`` for index tensors ``gamma`` (each broadcastable to ``tau.shape[:-1]``)."""
    g = 2.0 * w * tau  # du/dtau, ... x d
    shape = tau.shape[:-1]
    w_full = w.expand(tau.shape)
    gathered_g = [torch.gather(g, -1, idx.expand(shape).unsqueeze(-1)).squeeze(-1) for idx in gamma]
    total = torch.zeros(shape, dtype=tau.dtype, device=tau.device)
    for singles, pairs in _pairings(len(gamma)):
        term = phis[len(singles) + len(pairs)].expand(shape)
        for i in singles:
            term = term * gathered_g[i]
        for i, j in pairs:
            same = (gamma[i] == gamma[j]).expand(shape)
            w_i = torch.gather(w_full, -1, gamma[i].expand(shape).unsqueeze(-1)).squeeze(-1)
            term = term * torch.where(same, 2.0 * w_i, torch.zeros_like(w_i))
        total = total + term
    return total


def combine_by_order(
    idx1: Tensor, idx2: Tensor, shape: torch.Size, like: Tensor, derivative: Callable[[list[Tensor]], Tensor]
) -> Tensor:
    r"""Assemble :math:`(-1)^{|\beta|}\,\partial^{\alpha+\beta}\kappa` over every combination of orders.

    Pairs are grouped by (row order, column order); each group has a fixed list of present
    derivative indices ``gamma`` (row indices first), for which ``derivative(gamma)`` gives
    :math:`\partial^\gamma\kappa` over the whole broadcast shape. Shared by the closed-form
    and the autodiff paths.

    Args:
        idx1: `... x 2` row derivative indices (-1 = none, present first), broadcastable to ``shape``.
        idx2: `... x 2` column derivative indices.
        shape: broadcast shape of the pairs.
        like: tensor giving the dtype and device of the result.
        derivative: ``gamma -> d^gamma kappa`` (each index tensor broadcastable to ``shape``).

    Returns:
        Covariances of the pairs, of shape ``shape``.
    """
    order1, order2 = (idx1 >= 0).sum(-1), (idx2 >= 0).sum(-1)
    out = torch.zeros(shape, dtype=like.dtype, device=like.device)
    for o1 in range(MAX_ORDER + 1):
        for o2 in range(MAX_ORDER + 1):
            mask = (order1 == o1) & (order2 == o2)
            if not mask.any():
                continue
            # Indices of pairs outside this group may be -1: clamp them (their values are discarded).
            gamma = [idx1[..., i].clamp_min(0) for i in range(o1)] + [idx2[..., j].clamp_min(0) for j in range(o2)]
            out = torch.where(mask, (-1.0) ** o2 * derivative(gamma), out)
    return out


def max_total_order(idx1: Tensor, idx2: Tensor) -> int:
    """Highest total derivative order of a row-column pair (0 when empty)."""
    if not (idx1.numel() and idx2.numel()):
        return 0
    return int((idx1 >= 0).sum(-1).max()) + int((idx2 >= 0).sum(-1).max())


def functional_covariance(
    x1: Tensor,
    x2: Tensor,
    idx1: Tensor,
    idx2: Tensor,
    lengthscale: Tensor,
    profile: Profile,
    *,
    pairwise: bool = True,
) -> Tensor:
    r"""Covariance of :math:`\partial^{\alpha_r} f(x_{1r})` with :math:`\partial^{\beta_s} f(x_{2s})`.

    Args:
        x1: `R1 x d` point of each row functional.
        x2: `R2 x d` point of each column functional.
        idx1: `R1 x 2` derivative indices of each row, -1 for none (present indices first):
            ``[-1, -1]`` is the value, ``[a, -1]`` is :math:`\partial_a f`, ``[a, b]`` is
            :math:`\partial_a\partial_b f`.
        idx2: `R2 x 2` derivative indices of each column.
        lengthscale: `1 x d` or `1 x 1` lengthscales.
        profile: radial profile of the family; derivatives up to the total order are used.
        pairwise: ``True`` for the `R1 x R2` matrix; ``False`` for the `R` vector of the
            covariances of row ``r`` with column ``r`` (``R1 == R2``), without the matrix.

    Returns:
        `R1 x R2` covariance (or `R` with ``pairwise=False``).
    """
    d = x1.shape[-1]
    w = lengthscale.reshape(-1).expand(d).pow(-2)
    if pairwise:
        x1, x2, idx1, idx2 = x1.unsqueeze(-2), x2.unsqueeze(-3), idx1.unsqueeze(-2), idx2.unsqueeze(-3)
    tau = x1 - x2
    shape = tau.shape[:-1]
    u = (tau.square() * w).sum(-1)
    phis = profile(u, max_total_order(idx1, idx2))
    return combine_by_order(idx1, idx2, shape, tau, lambda gamma: _mixed_partial(tau, w, phis, gamma))
