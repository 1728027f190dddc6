r"""Matrix-free exact inference for the RBF derivative kernel: CG solves and Lanczos log-determinants.

The covariance of values and gradients is never formed: :class:`RBFDerivativeLinearOperator` is a
``linear_operator`` ``LinearOperator`` whose products use
:func:`gpderiv.blocks.rbf_derivative_matmul` (:math:`O(n^2 d)` per vector, memory
:math:`O(n d)` plus row chunks). ``linear_operator`` supplies conjugate gradients for
:math:`A^{-1} r`, stochastic Lanczos quadrature for :math:`\log|A|` and, through the operator's
differentiable products, the gradients of both with respect to the hyperparameters.

CG is preconditioned by :class:`BlockJacobiPreconditioner`: the exact diagonal blocks of the noisy
matrix over spatial clusters of points. linear_operator's default (a rank-100 pivoted Cholesky
plus the diagonal) made CG *slower* on these matrices: at n = 1000, d = 10, lengthscale 0.3,
noise 1e-4 it took 303 iterations to a relative residual of 1e-2 where no preconditioner took 56
and clusters of 200 points took 16 (docs/benchmarks.md). With more than one block, a Nyström
coarse level at landmark points takes the long-range part of the spectrum that no block holds
(:class:`~gpderiv.inference.two_level.TwoLevelPreconditioner`): at n = 300, d = 10, lengthscale
1.5 CG then needed 71 iterations where block-Jacobi alone did not converge in 5,000.

Scope (:meth:`IterativeCG.supports`): the default kernel ``ScaleKernel(DerivativeRBFKernel)``,
values and all partial derivatives observed at every point.
The log-determinant is a stochastic estimate (``num_trace_samples`` probes), so the marginal
likelihood and its gradient carry Monte Carlo noise; solves are exact to the CG tolerance.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from gpytorch.kernels import Kernel, ScaleKernel
from linear_operator import settings
from linear_operator.operators import AddedDiagLinearOperator, DiagLinearOperator, LinearOperator
from linear_operator.utils.linear_cg import linear_cg
from torch import Tensor

from gpderiv.blocks import functional_covariance, rbf_profile, stationary_derivative_blocks
from gpderiv.blocks.matvec import rbf_derivative_matmul, rbf_exponentials
from gpderiv.exceptions import CholeskyError
from gpderiv.inference.base import Engine, Factor, fold_batch, gaussian_constant
from gpderiv.inference.dense import cholesky_in_place
from gpderiv.inference.distributed import Ranks, current_ranks, split_product
from gpderiv.inference.structured_cg import KroneckerPreconditioner
from gpderiv.kernels import DerivativeRBFKernel
from gpderiv.observed_rows import ObservedRows

if TYPE_CHECKING:  # two_level builds on this module's block-Jacobi level, so it is imported where used
    from gpderiv.inference.two_level import TwoLevelPreconditioner

__all__ = [
    "BlockJacobiPreconditioner",
    "cg_solve",
    "operator_nll",
    "IterativeCG",
    "DEFAULT_PRECONDITIONER",
    "KRONECKER_MIN_DIMS",
    "PRECONDITIONERS",
    "IterativeFactor",
    "RBFDerivativeLinearOperator",
    "noisy_operator",
    "rbf_scope_error",
    "spatial_clusters",
]

#: Most rows of one diagonal block of the preconditioner (points per cluster times 1 + d). Larger
#: blocks need fewer CG iterations (n = 5000, d = 10, lengthscale 0.3, noise 1e-4, 10 probes:
#: 219 products for 2048 rows, 131 for 4096, 136 for 8192); the blocks take N x rows x 8 bytes
#: (3.4 GiB at N = 110,000) and O(N rows^2) flops to factorise.
PRECONDITIONER_BLOCK_ROWS = 4096
#: From this many input dimensions on, CG is preconditioned by the exactly invertible block-diagonal
#: part instead (:class:`~gpderiv.inference.structured_cg.KroneckerPreconditioner`): block-Jacobi
#: clusters then hold at most 4096 / 65 = 63 points. Measured (one solve to 1e-6, lengthscales
#: 0.3-0.7 sqrt(d), noise 1e-2 / 1e-3-1e-2, 1 thread): n = 300, d = 100: 0.05 s set-up + 4.9 s
#: against 22 s + 91 s for block-Jacobi; n = 100, d = 1000: 0.07 s + 2.1 s against 116 s + 145 s;
#: n = 1000, d = 10: block-Jacobi reached 1e-5 in 2000 iterations where it reached 3e-4.
KRONECKER_MIN_DIMS = 64
#: Preconditioners of the iterative engine (``inference_options={"preconditioner": ...}``) below
#: :data:`KRONECKER_MIN_DIMS`, and the default: block-Jacobi alone, or with the Nyström coarse level
#: of :mod:`gpderiv.inference.two_level` (far fewer CG iterations at long lengthscales, more set-up).
PRECONDITIONERS = ("block-jacobi", "two-level")
#: The default of :data:`PRECONDITIONERS` (docs/design.md, "Matrix-free products": its iteration table).
DEFAULT_PRECONDITIONER = "two-level"
#: Relative residual of the CG solves inside the marginal likelihood (as loose as GPyTorch's
#: training default allows: the log-determinant is a stochastic estimate anyway) ...
TRAINING_TOLERANCE = 1e-2
#: ... and of the solves for prediction (weights and variances).
SOLVE_TOLERANCE = 1e-6


class RBFDerivativeLinearOperator(LinearOperator):
    """``s K(X, X)`` for the RBF derivative kernel in block layout, as a matrix-free operator.

    Under ``torch.distributed`` with several ranks each rank computes the rows of its share of the
    points and the products are gathered (:mod:`gpderiv.inference.distributed`).

    Args:
        X: `n x d` inputs.
        lengthscale: `d` (or `1`) lengthscales.
        outputscale: scalar output scale ``s``.

    Attributes:
        ranks: the ranks the products are split across (None: this process computes them whole).
    """

    def __init__(self, X: Tensor, lengthscale: Tensor, outputscale: Tensor) -> None:
        super().__init__(X, lengthscale, outputscale)
        self.X, self.lengthscale, self.outputscale = X, lengthscale, outputscale
        self._exponentials: Tensor | None = None
        self.ranks = current_ranks()

    def _matmul(self, rhs: Tensor) -> Tensor:
        if self.ranks is not None:
            return self.outputscale * self._split_matmul(rhs)
        # The n x n exponentials are computed once per operator (one matrix product) and reused
        # by every CG iteration: O(n^2) memory, far below the n^2 d^2 of the dense matrix.
        if self._exponentials is None or self._exponentials.requires_grad != torch.is_grad_enabled():
            self._exponentials = rbf_exponentials(self.X, self.X, self.lengthscale)
        return self.outputscale * rbf_derivative_matmul(
            self.X, self.X, self.lengthscale, rhs, exponentials=self._exponentials
        )

    def _split_matmul(self, rhs: Tensor) -> Tensor:
        """``K rhs`` with this rank's rows computed here and the rest gathered (without the output scale)."""
        n, d = self.X.shape
        mine = self.ranks.share(n)

        def own_rows(X: Tensor, lengthscale: Tensor, rhs: Tensor) -> Tensor:
            if torch.is_grad_enabled() and (X.requires_grad or lengthscale.requires_grad):
                exponentials = rbf_exponentials(X[mine], X, lengthscale)  # the gradient's path
            else:  # CG: this rank's m x n exponentials, once per operator
                if self._exponentials is None:
                    with torch.no_grad():
                        self._exponentials = rbf_exponentials(self.X[mine], self.X, self.lengthscale)
                exponentials = self._exponentials
            return rbf_derivative_matmul(X[mine], X, lengthscale, rhs, exponentials=exponentials)

        return split_product(self.ranks, own_rows, n, d, self.X, self.lengthscale, rhs, check=rhs)

    def _size(self) -> torch.Size:
        n, d = self.X.shape
        return torch.Size([n * (1 + d), n * (1 + d)])

    def _transpose_nonbatch(self) -> RBFDerivativeLinearOperator:
        return self  # symmetric

    def _get_indices(self, row_index: Tensor, col_index: Tensor, *batch_indices: Tensor) -> Tensor:
        """Individual entries (for the pivoted-Cholesky preconditioner), through the functional path."""
        n, d = self.X.shape

        def decode(index: Tensor) -> tuple[Tensor, Tensor]:
            value = index < n
            point = torch.where(value, index, (index - n).div(d, rounding_mode="floor"))
            first = torch.where(value, torch.full_like(index, -1), (index - n) % d)
            return point, torch.stack([first, torch.full_like(index, -1)], -1)

        (p1, i1), (p2, i2) = decode(row_index), decode(col_index)
        return self.outputscale * functional_covariance(
            self.X[p1], self.X[p2], i1, i2, self.lengthscale.reshape(1, -1), rbf_profile, pairwise=False
        )

    def _diagonal(self) -> Tensor:
        n, d = self.X.shape
        w = self.lengthscale.reshape(-1).expand(d).pow(-2)
        return self.outputscale * torch.cat([self.X.new_ones(n), w.repeat(n)])


def spatial_clusters(Z: Tensor, max_size: int) -> Tensor:
    """Points grouped by recursive splits of the widest coordinate (a k-d tree's leaves).

    A group of ``m > max_size`` points needs ``q = ceil(m / max_size)`` clusters; it is split at
    the ``floor(q / 2) / q`` quantile of its widest coordinate, so the clusters end up nearly
    equal, about ``n / ceil(n / max_size)`` points each (103 points, ``max_size = 10``: 11
    clusters of 9 or 10).

    Args:
        Z: `n x d` (scaled) inputs.
        max_size: most points per cluster.

    Returns:
        `c x b` point indices, one row per cluster, padded with -1.
    """
    pending, leaves = [torch.arange(Z.shape[0], device=Z.device)], []
    while pending:
        index = pending.pop()
        q = -(-index.numel() // max_size)
        if q <= 1:
            leaves.append(index)
            continue
        points = Z[index]
        axis = (points.amax(0) - points.amin(0)).argmax()
        order = index[points[:, axis].argsort()]
        left = round(order.numel() * (q // 2) / q)
        pending += [order[:left], order[left:]]
    b = max(leaf.numel() for leaf in leaves)
    return torch.stack([F.pad(leaf, (0, b - leaf.numel()), value=-1) for leaf in leaves])


class BlockJacobiPreconditioner:
    r"""Block-Jacobi preconditioner of ``s K + diag(noise)`` over spatial clusters of points.

    :math:`P = \operatorname{blockdiag}_c (s K_{cc} + D_{cc})` where cluster :math:`c` holds the
    value and gradient rows of nearby points (:func:`spatial_clusters` in lengthscale units), so
    the strongest couplings, between a point's own value and gradient and between neighbours, are
    inverted exactly. The blocks are dense Cholesky factors, batched over clusters (padding rows
    are identity). Built without autograd: CG and the stochastic trace estimates stay unbiased for
    any fixed symmetric positive-definite :math:`P`.

    With ``ranks`` each rank factorises its share of the clusters and the solves are gathered
    (:mod:`gpderiv.inference.distributed`): the set-up and solves cost nearly half of an
    evaluation (n = 2000, d = 10: 2.0 s of Cholesky and 7.1 s of solves in 20.6 s, one thread).

    Args:
        X: `n x d` inputs.
        lengthscale: `d` (or `1`) lengthscales.
        outputscale: scalar output scale ``s``.
        noise: `N` noise variance per row (block layout).
        block_rows: most rows per block (default :data:`PRECONDITIONER_BLOCK_ROWS`).
        ranks: the ranks to split the clusters across (None: all here).
        low_rank: `r x N` matrix ``W`` whose ``W^T W`` is taken from the blocks (the first level
            of :class:`~gpderiv.inference.two_level.TwoLevelPreconditioner`), or None.
    """

    def __init__(
        self,
        X: Tensor,
        lengthscale: Tensor,
        outputscale: Tensor,
        noise: Tensor,
        block_rows: int | None = None,
        ranks: Ranks | None = None,
        low_rank: Tensor | None = None,
    ) -> None:
        n, d = X.shape
        self.N, self.ranks = n * (1 + d), ranks
        with torch.no_grad():
            ls = lengthscale.detach().reshape(-1).expand(d)
            block_rows = block_rows or PRECONDITIONER_BLOCK_ROWS
            clusters = spatial_clusters(X / ls, max(1, block_rows // (1 + d)))  # c x b
            c, b = clusters.shape
            valid = clusters >= 0
            points = clusters.clamp_min(0)
            grad_rows = (n + points.unsqueeze(-1) * d + torch.arange(d, device=X.device)).reshape(c, b * d)
            rows = torch.cat([points, grad_rows], -1)
            valid = torch.cat([valid, valid.repeat_interleave(d, -1)], -1)
            self.rows = torch.where(valid, rows, self.N)  # all clusters; padding maps to a dropped extra row
            self.mine = slice(None) if ranks is None else ranks.share(c)  # the clusters factorised here
            points, rows, valid = points[self.mine], rows[self.mine], valid[self.mine]

            def blocks(jitter: float) -> Tensor:
                Xc = X[points]
                K = stationary_derivative_blocks(Xc, Xc, ls.reshape(1, 1, d), rbf_profile)  # c x B x B
                K.mul_(outputscale.detach())
                if low_rank is not None:  # the blocks of A - W^T W (two_level.TwoLevelPreconditioner)
                    W = torch.cat([low_rank, low_rank.new_zeros(low_rank.shape[0], 1)], -1)[:, rows].movedim(0, 1)
                    K.baddbmm_(W.mT, W, alpha=-1.0)
                diagonal = K.diagonal(dim1=-2, dim2=-1)
                diagonal.add_(noise.detach()[rows] + jitter * diagonal.mean(-1, keepdim=True))
                # Padding rows and columns become identity, decoupled from the real ones.
                K.masked_fill_(~(valid.unsqueeze(-1) & valid.unsqueeze(-2)), 0.0)
                diagonal.masked_fill_(~valid, 1.0)
                return K

            L, ok = cholesky_in_place(blocks(0.0))  # one c x B x B buffer
            if not self._everywhere(ok, X.device):  # blocks of a positive-definite matrix: only rounding fails them
                L, ok = cholesky_in_place(blocks(1e-8))
                if not self._everywhere(ok, X.device):
                    raise CholeskyError("the block-Jacobi preconditioner's blocks are not positive definite")
            log_diagonal = L.diagonal(dim1=-2, dim2=-1).log()
            if ranks is not None:
                log_diagonal = ranks.gather(log_diagonal, c)
        self.L = L
        self.logdet = 2.0 * log_diagonal.sum()

    def _everywhere(self, ok: bool, device: torch.device) -> bool:
        """Whether every rank's blocks factorised (all ranks then retry, or raise, together)."""
        return ok if self.ranks is None else self.ranks.all_true(ok, device)

    def _gather(self, rhs: Tensor) -> Tensor:
        """`c x B x t` blocks of an `N x t` matrix (zeros at padding), of this rank's clusters."""
        return torch.cat([rhs, rhs.new_zeros(1, rhs.shape[-1])])[self.rows[self.mine]]

    def _scatter(self, blocks: Tensor, check: Tensor) -> Tensor:
        """The `N x t` matrix of all clusters' `c x B x t` blocks, given this rank's (``check``: the input)."""
        if self.ranks is not None:
            blocks = self.ranks.gather(blocks, self.rows.shape[0], check)
        out = blocks.new_empty(self.N + 1, blocks.shape[-1])
        out[self.rows.reshape(-1)] = blocks.reshape(-1, blocks.shape[-1])
        return out[: self.N]

    def solve(self, rhs: Tensor) -> Tensor:
        """``P^-1 rhs`` for an `N` vector or `N x t` matrix."""
        vector = rhs.ndim == 1
        rhs = rhs.unsqueeze(-1) if vector else rhs
        # Two batched triangular solves: 5-10x faster than torch.cholesky_solve here (CPU, measured).
        half = torch.linalg.solve_triangular(self.L, self._gather(rhs), upper=False)
        out = self._scatter(torch.linalg.solve_triangular(self.L.transpose(-1, -2), half, upper=True), rhs)
        return out.squeeze(-1) if vector else out

    def matmul(self, rhs: Tensor) -> Tensor:
        """``P rhs`` for an `N x t` matrix."""
        L = self.L
        return self._scatter(L @ (L.transpose(-1, -2) @ self._gather(rhs)), rhs)

    def sample(self, num_samples: int) -> Tensor:
        """`num_samples x N` draws from ``N(0, P)`` (``L eps`` per block; with ranks, rank 0's ``eps``)."""
        eps = torch.randn(*self.rows.shape, num_samples, dtype=self.L.dtype, device=self.L.device)
        if self.ranks is not None:
            eps = self.ranks.broadcast(eps)
        return self._scatter(self.L @ eps[self.mine], eps).T

    def __call__(self, operator: LinearOperator) -> tuple:
        """linear_operator's ``preconditioner_override`` protocol: (solve, P as operator, log|P|)."""
        return self.solve, _PreconditionerOperator(self.L, preconditioner=self), self.logdet


class _PreconditionerOperator(LinearOperator):
    """:class:`BlockJacobiPreconditioner` as the operator linear_operator draws its probes from."""

    def __init__(self, L: Tensor, preconditioner: BlockJacobiPreconditioner) -> None:
        super().__init__(L, preconditioner=preconditioner)
        self.preconditioner = preconditioner

    def _matmul(self, rhs: Tensor) -> Tensor:
        return self.preconditioner.matmul(rhs)

    def _size(self) -> torch.Size:
        return torch.Size([self.preconditioner.N, self.preconditioner.N])

    def _transpose_nonbatch(self) -> _PreconditionerOperator:
        return self

    def zero_mean_mvn_samples(self, num_samples: int) -> Tensor:
        return self.preconditioner.sample(num_samples)


class _NoisyOperator(AddedDiagLinearOperator):
    """``K + diag(noise)`` whose CG can reach tight tolerances.

    linear_operator's ``linear_cg`` treats a curvature ``p^T A p`` below ``eps = 1e-10`` as zero
    and stops updating, and with rhs normalised to 1 that is a relative residual of about
    1e-5: at n = 300, d = 10 (N = 3300, condition number 2000) it stalled at 1.9e-6 without and
    2.5e-5 with our preconditioner and ran to the iteration cap, where ``eps = 1e-20`` reached
    1e-6 in 150 and 37 iterations. We pass the square root of the dtype's smallest normal number.
    """

    def _solve(self, rhs: Tensor, preconditioner=None, num_tridiag: int | None = 0):  # noqa: ANN001, ANN202
        return linear_cg(
            self._matmul,
            rhs,
            n_tridiag=num_tridiag,
            max_iter=settings.max_cg_iterations.value(),
            max_tridiag_iter=settings.max_lanczos_quadrature_iterations.value(),
            preconditioner=preconditioner,
            eps=torch.finfo(rhs.dtype).tiny ** 0.5,
        )


def _preconditioner_kind(N: int, d: int, preconditioner: str | None, block_rows: int | None = None) -> str:
    """What :func:`noisy_operator` builds for `N` rows in `d` dimensions: "kronecker", "two-level" or "block-jacobi"."""
    if d >= KRONECKER_MIN_DIMS:
        return "kronecker"
    several_blocks = N > (block_rows or PRECONDITIONER_BLOCK_ROWS)  # one block is exact: no coarse level
    coarse = (preconditioner or DEFAULT_PRECONDITIONER) == "two-level"
    return "two-level" if several_blocks and coarse else "block-jacobi"


def noisy_operator(
    operator: RBFDerivativeLinearOperator,
    noise: Tensor,
    block_rows: int | None = None,
    preconditioner: str | None = None,
) -> AddedDiagLinearOperator:
    """``operator + diag(noise)`` with its preconditioner (built on first use, once).

    Block-Jacobi over spatial clusters (one block: exact); with ``preconditioner="two-level"``
    (default :data:`DEFAULT_PRECONDITIONER`) and several blocks, plus a Nyström coarse level
    (:mod:`gpderiv.inference.two_level`); for `d >=` :data:`KRONECKER_MIN_DIMS`, the block-diagonal part.
    """

    @functools.cache
    def build() -> BlockJacobiPreconditioner | KroneckerPreconditioner | TwoLevelPreconditioner:
        X, ls, s, ranks = operator.X, operator.lengthscale, operator.outputscale, operator.ranks
        kind = _preconditioner_kind(noise.numel(), X.shape[-1], preconditioner, block_rows)
        if kind == "kronecker":
            return KroneckerPreconditioner(X, ls, s, noise, ranks=ranks)
        if kind == "two-level":
            from gpderiv.inference.two_level import TwoLevelPreconditioner  # built on this module's first level

            return TwoLevelPreconditioner(X, ls, s, noise, block_rows, ranks=ranks)
        return BlockJacobiPreconditioner(X, ls, s, noise, block_rows, ranks=ranks)

    return _NoisyOperator(operator, DiagLinearOperator(noise), preconditioner_override=lambda A: build()(A))


@contextmanager
def _iterative_settings(trace_samples: int, tolerance: float) -> Iterator[None]:
    """Force the iterative path of ``linear_operator``, with our tolerances."""
    with ExitStack() as stack:
        for context in (
            settings.max_cholesky_size(0),  # never fall back to a dense Cholesky ...
            # ... even where BoTorch's import has switched linear_operator's fast computations off
            # globally (it does), which would make every solve densify the N x N matrix.
            settings.fast_computations(covar_root_decomposition=True, log_prob=True, solves=True),
            settings.cg_tolerance(tolerance),
            settings.max_cg_iterations(2000),
            settings.num_trace_samples(max(trace_samples, 1)),
            settings.max_lanczos_quadrature_iterations(50),
        ):
            stack.enter_context(context)
        yield


def cg_solve(A: LinearOperator, rhs: Tensor) -> Tensor:
    """``A^-1 rhs`` by preconditioned CG to :data:`SOLVE_TOLERANCE` (`N` vector or `N x t` matrix)."""
    with _iterative_settings(0, SOLVE_TOLERANCE):
        if rhs.dim() == 1:
            return A.solve(rhs.unsqueeze(-1)).squeeze(-1)
        return A.solve(rhs)


def operator_nll(
    operator: LinearOperator,
    noise: Tensor,
    resid: Tensor,
    num_trace_samples: int = 10,
    preconditioner: str | None = None,
) -> Tensor:
    """Differentiable negative log marginal likelihood of ``operator + diag(noise)`` (stochastic log-determinant).

    Args:
        operator: the noiseless covariance (e.g. :class:`RBFDerivativeLinearOperator`).
        noise: `N` noise variances.
        resid: `N` residual.
        num_trace_samples: probe vectors of the stochastic Lanczos log-determinant.
        preconditioner: as for :func:`noisy_operator`.
    """
    A = noisy_operator(operator, noise, preconditioner=preconditioner)
    with _iterative_settings(num_trace_samples, TRAINING_TOLERANCE):
        inv_quad, logdet = A.inv_quad_logdet(inv_quad_rhs=resid.unsqueeze(-1), logdet=True)
    return 0.5 * (inv_quad + logdet) + gaussian_constant(resid.shape[-1])


def rbf_parts(kernel: Kernel) -> tuple[DerivativeRBFKernel, Tensor]:
    """``(rbf, s)`` of ``ScaleKernel(DerivativeRBFKernel)`` or of a bare ``DerivativeRBFKernel`` (``s = 1``)."""
    if isinstance(kernel, ScaleKernel):
        return kernel.base_kernel, kernel.outputscale
    return kernel, kernel.lengthscale.new_ones(())


def rbf_scope_error(kernel: Kernel, data: ObservedRows, name: str) -> str | None:
    """Why an engine for the RBF kernel with values and full gradients does not apply (None if it does)."""
    base = kernel.base_kernel if isinstance(kernel, ScaleKernel) else kernel  # any kernel: sums too
    if type(base) is not DerivativeRBFKernel or kernel.active_dims is not None or base.active_dims is not None:
        return (
            f"inference: {name!r} needs the default kernel ScaleKernel(DerivativeRBFKernel) (or a bare "
            f"DerivativeRBFKernel), got {type(kernel).__name__}"
        )
    if data.batch_shape != torch.Size() or base.batch_shape != torch.Size():
        return f"inference: {name!r} needs an unbatched model, got batch shape {tuple(data.batch_shape)}"
    if not data.values_and_gradients:
        return (
            f"inference: {name!r} needs every value and every partial derivative observed (no NaN, no "
            "directional or second derivatives); use inference='dense' for partial observations"
        )
    return None


class IterativeFactor(Factor):
    """What prediction needs from a matrix-free fit: the noisy operator and ``alpha = A^-1 r`` by CG.

    Attributes:
        operator: the noisy operator ``s K + diag(noise)``.
    """

    #: CG keeps about six `N x m` matrices besides the cross-covariance and the solution
    #: (linear_operator's ``linear_cg``: residual, preconditioned residual, search direction,
    #: product, normalised right-hand side, workspace).
    cross_matrices = 8

    def __init__(
        self, engine: IterativeCG, kernel: Kernel, data: ObservedRows, noise: Tensor, resid: Tensor
    ) -> None:
        super().__init__(engine, kernel, data, noise, resid)
        self.operator = noisy_operator(engine.operator(kernel, data), noise, preconditioner=engine.preconditioner)
        self.alpha = self.solve(resid)

    def solve(self, rhs: Tensor) -> Tensor:
        """``A^-1 rhs`` by preconditioned CG to :data:`SOLVE_TOLERANCE` (`N` vector or `... x N x t` matrix)."""
        return fold_batch(lambda B: cg_solve(self.operator, B), rhs)

    def posterior(self, test: ObservedRows, mode: str) -> tuple[Tensor, Tensor | None]:
        """Means matrix-free (`O(m n d)`, no cross-covariance matrix); variances as every engine does."""
        if mode != "mean" or not test.values_and_gradients:
            return super().posterior(test, mode)
        base, scale = rbf_parts(self.kernel)
        ranks, lengthscale = current_ranks(), base.lengthscale.reshape(-1)
        if ranks is None:
            return scale * rbf_derivative_matmul(test.X, self.data.X, lengthscale, self.alpha), None
        mine = ranks.share(test.n)  # test points split across the ranks, the rows gathered

        def own_rows(Xs: Tensor, X: Tensor, lengthscale: Tensor, alpha: Tensor) -> Tensor:
            return rbf_derivative_matmul(Xs[mine], X, lengthscale, alpha)

        inputs = (test.X, self.data.X, lengthscale, self.alpha)
        return scale * split_product(ranks, own_rows, test.n, test.d, *inputs), None


class IterativeCG(Engine):
    """Matrix-free exact inference: CG + stochastic Lanczos quadrature (``inference="iterative"``).

    The marginal likelihood's log-determinant is an unbiased stochastic estimate.

    Args:
        num_trace_samples: probe vectors of the log-determinant estimate.
        preconditioner: ``"two-level"`` or ``"block-jacobi"`` (:data:`PRECONDITIONERS`; default
            :data:`DEFAULT_PRECONDITIONER`) below :data:`KRONECKER_MIN_DIMS` dimensions.

    Raises:
        ValueError: an unknown preconditioner.
    """

    name = "iterative"
    lazy = True
    stochastic = True
    subset_engine = "dense"  # a subset is meant to be small
    memory_advice = "Use fewer points, or a machine with more memory."

    #: Options a model passes through ``inference_options`` (saved with it).
    option_names: ClassVar[tuple[str, ...]] = ("num_trace_samples", "preconditioner")

    def __init__(self, num_trace_samples: int = 10, preconditioner: str | None = None) -> None:
        if preconditioner is not None and preconditioner not in PRECONDITIONERS:
            raise ValueError(
                f"inference_options['preconditioner']: expected one of {PRECONDITIONERS}, got {preconditioner!r}"
            )
        self.num_trace_samples = num_trace_samples
        self.preconditioner = preconditioner or DEFAULT_PRECONDITIONER

    def supports(
        self, kernel: Kernel, data: ObservedRows, *, shared_grad_noise: bool, noise_by_kind: bool = True
    ) -> str | None:
        """The RBF kernel (with or without ``ScaleKernel``), unbatched, every value and partial derivative."""
        return rbf_scope_error(kernel, data, self.name)

    def memory_estimate(self, data: ObservedRows, dtype: torch.dtype) -> int:
        """The `n x n` exponentials (twice: with and without autograd), the preconditioner, `N` vectors.

        Block-Jacobi holds `N x b` numbers in its blocks of `b` rows; the two-level preconditioner
        adds its coarse level's two `r x N` matrices on every rank; the Kronecker one (`d >=`
        :data:`KRONECKER_MIN_DIMS`) holds one `n x n` eigenbasis and `N` eigenvalues on every rank.
        Under ``torch.distributed`` with `W` ranks, each holds `1/W` of the exponentials and blocks.
        Vectors: 64 per row, 256 with the Kronecker preconditioner, where one MLL + gradient of the
        default ARD model peaked at 0.45 / 0.70 / 0.68 GiB above the baseline for `N` = 250,100 /
        500,100 / 500,200 (n = 100 / 100 / 200; 1 thread): about 1.1 KiB a row, against 0.5 KiB
        of the 64.
        """
        N, d, n = data.num_rows, data.X.shape[-1], data.n
        ranks = current_ranks()
        split = 1 if ranks is None else ranks.size
        kind = _preconditioner_kind(N, d, self.preconditioner)
        if kind == "kronecker":
            blocks, replicated, vectors = 0, n * n + N, 256 * N
        else:
            blocks, replicated, vectors = N * min(N, PRECONDITIONER_BLOCK_ROWS), 0, 64 * N
        if kind == "two-level":
            from gpderiv.inference.two_level import landmark_points  # two_level builds on this module

            replicated = 2 * N * landmark_points(n, d) * (1 + d)
        return (torch.finfo(dtype).bits // 8) * ((2 * n**2 + blocks) // split + replicated + vectors)

    def operator(self, kernel: Kernel, data: ObservedRows) -> RBFDerivativeLinearOperator:
        """The noiseless covariance of all rows as a matrix-free operator."""
        base, scale = rbf_parts(kernel)
        return RBFDerivativeLinearOperator(data.X, base.lengthscale.reshape(-1), scale)

    def negative_log_marginal(self, kernel: Kernel, data: ObservedRows, noise: Tensor, resid: Tensor) -> Tensor:
        """Differentiable negative log marginal likelihood with a stochastic log-determinant."""
        return operator_nll(self.operator(kernel, data), noise, resid, self.num_trace_samples, self.preconditioner)

    def factor(self, kernel: Kernel, data: ObservedRows, noise: Tensor, resid: Tensor) -> IterativeFactor:
        """CG weights for prediction."""
        return IterativeFactor(self, kernel, data, noise, resid)

    def agree(self, loss: Tensor, params: Sequence[Tensor]) -> Tensor:
        """Rank 0's loss and gradients on every rank under ``torch.distributed`` (else ``loss`` as it is).

        The ranks compute both alike from gathered products; taking rank 0's makes the optimisers'
        steps equal even where the last bits of the replicated arithmetic differ.
        """
        ranks = current_ranks()
        if ranks is None:
            return loss
        grads = [p.grad for p in params if p.grad is not None]
        agreed = ranks.broadcast(torch.cat([loss.detach().reshape(1), *(g.reshape(-1) for g in grads)]))
        for g, value in zip(grads, agreed[1:].split([g.numel() for g in grads]), strict=True):
            g.copy_(value.view_as(g))
        return agreed[0]
