r"""Work of the matrix-free engine split by rows across ``torch.distributed`` ranks.

When ``torch.distributed`` is initialised with more than one rank (a script launched with
``torchrun --nproc_per_node K``), every rank runs the same script on the same data and holds the
same model; the iterative engine (:mod:`gpderiv.inference.iterative`) then divides each kernel
product among them:

* **Products.** Rank :math:`r` of :math:`W` owns the contiguous share of points
  :math:`P_r = [\lfloor rn/W \rfloor, \lfloor (r+1)n/W \rfloor)` and computes the rows of
  :math:`K` for them, their value rows and their gradient rows, against all training inputs:
  :math:`(K v)_{P_r} = K(X_{P_r}, X)\, v`, :math:`O(n^2 d / W)` per vector. An all-gather
  assembles :math:`K v` in block layout (values :math:`0..n-1`, then gradient row
  :math:`n + i d + a`) on every rank (:func:`gather_block_rows`). Test points are split the same
  way for the posterior mean :math:`K_{*X}\alpha`.
* **Gradients.** For a loss :math:`\ell` that every rank computes alike from the gathered
  product :math:`y = K(\theta) v`, :math:`\partial\ell/\partial\theta = \sum_r
  (\partial\ell/\partial y_{P_r})^\top \partial y_{P_r}/\partial\theta`: each rank
  back-propagates the rows it owns and an all-reduce sums the shares (:func:`split_product`), so
  every rank holds the full gradient, counted once (linear_operator differentiates solves and
  log-determinants through the operator's products, ``_bilinear_derivative``).
* **Preconditioners.** The block-Jacobi clusters and the Kronecker preconditioner's kinds
  (values, each derivative dimension) are split the same way; their solves are gathered too.
* **Probes.** The stochastic log-determinant's probe vectors are drawn on every rank and rank 0's
  are used (:meth:`Ranks.broadcast`): every rank follows the same CG path, and a run whose rank 0
  has the random state of a single process draws that process's probes.

Everything else (CG's vector updates, the Lanczos quadrature, the optimiser) runs replicated on
gathered, identical data, so the ranks stay in lock-step as long as their arithmetic is the same
(same hardware type, same thread count: ``torchrun`` sets ``OMP_NUM_THREADS=1``); a fit steps
with rank 0's loss and gradient (:meth:`IterativeCG.agree
<gpderiv.inference.iterative.IterativeCG.agree>`). The gathers of CG's products and
preconditioner solves compare a fingerprint (per column, the sum and the sum of squares) of the
vector being multiplied across ranks and raise on every rank when they differ: ranks whose
vectors drift apart stop with an error instead of one of them waiting in a collective that the
others never call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Ranks", "current_ranks", "gather_block_rows", "own_block_rows", "split_product"]


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ``torch.distributed`` ranks (default process group).

    Attributes:
        rank: this process's rank.
        size: the number of ranks (more than one).
    """

    rank: int
    size: int

    def share(self, count: int, rank: int | None = None) -> slice:
        """The contiguous share of ``count`` items (points, clusters) that ``rank`` (default: this one) owns.

        ``[floor(r count / W), floor((r + 1) count / W))``: shares differ by at most one item, in
        rank order, and may be empty when ``count < W``.
        """
        r = self.rank if rank is None else rank
        return slice(r * count // self.size, (r + 1) * count // self.size)

    def gather(self, local: Tensor, count: int, check: Tensor | None = None) -> Tensor:
        """All ranks' shares of a tensor whose first dimension is split by :meth:`share`, joined in order.

        Args:
            local: `s_r x ...` this rank's share (`s_r` items of ``count``); the trailing shape is
                the same on every rank.
            count: items in all.
            check: a tensor every rank must hold alike (the vector being multiplied); its
                fingerprint travels with the gather at no extra round trip.

        Returns:
            `count x ...` on every rank.

        Raises:
            RuntimeError: ``check`` differs between ranks.
        """
        rest = local.shape[1:]
        width = -(-count // self.size) * math.prod(rest)  # the largest share, flattened
        fingerprint = _fingerprint(check, local) if check is not None else local.new_zeros(0)
        buffer = torch.cat([local.reshape(-1), local.new_zeros(width - local.numel()), fingerprint])
        parts = [torch.empty_like(buffer) for _ in range(self.size)]
        dist.all_gather(parts, buffer)
        if check is not None:
            prints = torch.stack([part[width:] for part in parts])
            same = (prints == prints[0]) | (prints.isnan() & prints[0].isnan())
            if not bool(same.all()):
                raise RuntimeError(
                    "gpderiv.inference.distributed: the ranks multiply different vectors. Every rank must run the "
                    "same script on the same data with the same arithmetic (same hardware type and thread count, "
                    "e.g. OMP_NUM_THREADS=1 as torchrun sets it)."
                )
        blocks = []
        for r, part in enumerate(parts):
            share = self.share(count, r)
            blocks.append(part[: (share.stop - share.start) * math.prod(rest)].view(-1, *rest))
        return torch.cat(blocks)

    def broadcast(self, tensor: Tensor) -> Tensor:
        """Rank 0's ``tensor`` (same shape and dtype on every rank), in place."""
        dist.broadcast(tensor, src=0)
        return tensor

    def all_true(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` holds on every rank (all ranks then take the same branch)."""
        value = torch.tensor([1 if flag else 0], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def all_reduce_sum(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The sums over ranks of ``tensors`` (one flattened all-reduce)."""
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]


def current_ranks() -> Ranks | None:
    """The ranks to split work across, or None when ``torch.distributed`` is not initialised or has one rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return Ranks(dist.get_rank(), dist.get_world_size())


def _fingerprint(check: Tensor, like: Tensor) -> Tensor:
    """Per column: the sum and the sum of squares of ``check`` (a cheap, order-fixed summary)."""
    columns = check.detach().reshape(check.shape[0], -1).to(like.dtype)
    return torch.cat([columns.sum(0), columns.square().sum(0)])


def gather_block_rows(ranks: Ranks, local: Tensor, n: int, d: int, check: Tensor | None = None) -> Tensor:
    """The `n (1 + d) x t` block-layout matrix (or vector) from each rank's rows for its share of `n` points.

    Args:
        ranks: the ranks.
        local: `m_r (1 + d) x t` (or `m_r (1 + d)`) rows of this rank's `m_r` points, in block
            layout among themselves (their values, then their gradients point-major).
        n: points in all.
        d: input dimension.
        check: as in :meth:`Ranks.gather`.
    """
    m, t = local.shape[0] // (1 + d), local.shape[1:]
    per_point = torch.cat([local[:m].unsqueeze(1), local[m:].reshape(m, d, *t)], 1)  # m x (1 + d) x t
    full = ranks.gather(per_point, n, check)
    return torch.cat([full[:, 0], full[:, 1:].reshape(n * d, *t)])


def own_block_rows(ranks: Ranks, full: Tensor, n: int, d: int) -> Tensor:
    """This rank's rows of an `n (1 + d) x t` block-layout matrix (the inverse of :func:`gather_block_rows`)."""
    share = ranks.share(n)
    return torch.cat([full[share], full[n + share.start * d : n + share.stop * d]])


class _SplitProduct(torch.autograd.Function):
    """Gathered rows whose backward sums every rank's share of the input gradients (module docstring)."""

    @staticmethod
    def forward(ctx, ranks: Ranks, n: int, d: int, compute: Callable[..., Tensor], *inputs: Tensor) -> Tensor:  # noqa: ANN001
        leaves = [x.detach().requires_grad_(x.requires_grad) for x in inputs]
        with torch.enable_grad():  # the graph of this rank's rows, kept for backward
            local = compute(*leaves)
        ctx.ranks, ctx.n, ctx.d, ctx.local, ctx.leaves = ranks, n, d, local, leaves
        return gather_block_rows(ranks, local.detach(), n, d)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        wanted = [x for x in ctx.leaves if x.requires_grad]
        own = own_block_rows(ctx.ranks, grad, ctx.n, ctx.d)
        shares: Sequence[Tensor | None] = [None] * len(wanted)
        if ctx.local.requires_grad:  # an empty share has no graph
            shares = torch.autograd.grad(ctx.local, wanted, own, allow_unused=True)
        shares = [torch.zeros_like(x) if g is None else g for g, x in zip(shares, wanted, strict=True)]
        totals = iter(ctx.ranks.all_reduce_sum(shares))
        return (None, None, None, None, *(next(totals) if x.requires_grad else None for x in ctx.leaves))


def split_product(
    ranks: Ranks,
    compute: Callable[..., Tensor],
    n: int,
    d: int,
    *inputs: Tensor,
    check: Tensor | None = None,
) -> Tensor:
    """Rows of a block-layout product for `n` points, each rank computing its share, gathered.

    Differentiable in ``inputs``: the gradients are the full ones on every rank, for a loss that
    every rank computes alike from the result (module docstring).

    Args:
        ranks: the ranks.
        compute: ``compute(*inputs)``: the `m_r (1 + d) x t` rows of this rank's points
            (``ranks.share(n)``), in block layout among themselves.
        n: points whose rows the product has.
        d: input dimension.
        inputs: the tensors ``compute`` reads.
        check: as in :meth:`Ranks.gather` (used when no gradient is tracked).

    Returns:
        `n (1 + d) x t` product in block layout, the same on every rank.
    """
    if torch.is_grad_enabled() and any(x.requires_grad for x in inputs):
        return _SplitProduct.apply(ranks, n, d, compute, *inputs)
    return gather_block_rows(ranks, compute(*inputs), n, d, check)
