r"""A preconditioner for many points in many dimensions: the exactly invertible block-diagonal part.

For the RBF kernel (ARD or not; notation of :mod:`gpderiv.inference.structured_ard`) the noisy
covariance of values and gradients is

.. math::

    A = \begin{bmatrix} sE + \sigma_v^2 I & s\mathcal F^\top U^\top \\
        sU\mathcal F & B - sU\mathcal CU^\top \end{bmatrix},
    \qquad B = \operatorname{blockdiag}_a(s w_a E + \sigma_a^2 I),

and :math:`P = \operatorname{blockdiag}(sE + \sigma_v^2 I, B)` is inverted exactly through one
eigendecomposition :math:`E = Q\Lambda_E Q^\top`: every block is
:math:`Q\operatorname{diag}(\alpha\lambda + \beta)Q^\top`. What :math:`P` leaves to CG is the
rank-:math:`n^2` term :math:`sU\mathcal CU^\top` and the value-gradient coupling, of rank at most
:math:`n^2 + 2n` in all, against the `n d` gradient rows: for `n << d` the preconditioned
spectrum is 1 apart from a few hundred outliers, whatever `d`. Its products, solves and draws
cost :math:`O(n^2 d)` per vector (as the operator's own products, :func:`~gpderiv.blocks.rbf_derivative_matmul`),
set-up :math:`O(n^2 d + n^3)`, memory :math:`O(n d)`. The block-Jacobi preconditioner over
spatial clusters (:class:`~gpderiv.inference.iterative.BlockJacobiPreconditioner`) holds
:data:`~gpderiv.inference.iterative.PRECONDITIONER_BLOCK_ROWS` rows, a handful of points once
`d` is in the hundreds, and misses the couplings between clusters that :math:`P` keeps.

The noise is taken per kind (the mean over points of each value or derivative-dimension group):
exact where the noise is set by kind, as in :class:`~gpderiv.DerivativeGP`, and a symmetric
positive-definite preconditioner otherwise, which is all CG and the stochastic Lanczos
quadrature need.

Under ``torch.distributed`` the kinds (values, then each derivative dimension) are split across
the ranks and the products gathered (:mod:`gpderiv.inference.distributed`): replicated, they would
cost about as much as the operator's own share of each CG iteration.
"""

from __future__ import annotations

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from gpderiv.inference.distributed import Ranks

__all__ = ["KroneckerPreconditioner"]


class KroneckerPreconditioner:
    r""":math:`P = \operatorname{blockdiag}(sE + \sigma_v^2 I, \operatorname{blockdiag}_a(s w_a E + \sigma_a^2 I))`.

    Args:
        X: `n x d` inputs.
        lengthscale: `d` (or `1`) lengthscales.
        outputscale: scalar output scale ``s``.
        noise: `N = n (1 + d)` noise variance per row (block layout).
        ranks: the ranks to split the kinds across (None: all here).
    """

    def __init__(
        self, X: Tensor, lengthscale: Tensor, outputscale: Tensor, noise: Tensor, ranks: Ranks | None = None
    ) -> None:
        n, d = X.shape
        self.n, self.d, self.N, self.ranks = n, d, n * (1 + d), ranks
        with torch.no_grad():
            X = X.detach() - X.detach().mean(0)
            w = lengthscale.detach().reshape(-1).expand(d).pow(-2)
            s = outputscale.detach().reshape(())
            Xw = X * w.sqrt()
            sq = (Xw.square().sum(-1).unsqueeze(-1) - 2.0 * Xw @ Xw.T + Xw.square().sum(-1)).clamp_min(0.0)
            values, self.Q = torch.linalg.eigh(torch.exp(-0.5 * sq))
            values = values.clamp_min(0.0)  # E is positive semi-definite: rounding only
            noise = noise.detach()
            value_noise, grad_noise = noise[:n].mean(), noise[n:].reshape(n, d).mean(0)
            # Eigenvalues of every block: column 0 the values' block, column 1 + a dimension a's.
            scales = torch.cat([s.reshape(1), s * w])
            self.eigenvalues = values.unsqueeze(-1) * scales + torch.cat([value_noise.reshape(1), grad_noise])
        self.logdet = self.eigenvalues.log().sum()

    def _apply(self, rhs: Tensor, power: float) -> Tensor:
        """``P^power rhs`` for an `N x t` matrix: rotate, scale by the eigenvalues, rotate back."""
        n, d, t = self.n, self.d, rhs.shape[-1]
        blocks = torch.cat([rhs[:n].unsqueeze(1), rhs[n:].reshape(n, d, t)], 1)  # n x (1 + d) x t
        kinds = slice(None) if self.ranks is None else self.ranks.share(1 + d)  # the kinds applied here
        part = blocks[:, kinds]
        k = part.shape[1]
        scales = self.eigenvalues[:, kinds].pow(power).unsqueeze(-1)
        rotated = (self.Q.T @ part.reshape(n, -1)).reshape(n, k, t) * scales
        out = (self.Q @ rotated.reshape(n, -1)).reshape(n, k, t)
        if self.ranks is not None:
            out = self.ranks.gather(out.transpose(0, 1), 1 + d, rhs).transpose(0, 1)
        return torch.cat([out[:, 0], out[:, 1:].reshape(n * d, t)])

    def solve(self, rhs: Tensor) -> Tensor:
        """``P^-1 rhs`` for an `N` vector or `N x t` matrix."""
        if rhs.ndim == 1:
            return self._apply(rhs.unsqueeze(-1), -1.0).squeeze(-1)
        return self._apply(rhs, -1.0)

    def matmul(self, rhs: Tensor) -> Tensor:
        """``P rhs`` for an `N x t` matrix."""
        return self._apply(rhs, 1.0)

    def sample(self, num_samples: int) -> Tensor:
        """`num_samples x N` draws from ``N(0, P)`` (``P^1/2 eps``; with ranks, rank 0's ``eps``)."""
        eps = torch.randn(self.N, num_samples, dtype=self.Q.dtype, device=self.Q.device)
        if self.ranks is not None:
            eps = self.ranks.broadcast(eps)
        return self._apply(eps, 0.5).T

    def __call__(self, operator: LinearOperator) -> tuple:
        """linear_operator's ``preconditioner_override`` protocol: (solve, P as operator, log|P|)."""
        from gpderiv.inference.iterative import _PreconditionerOperator  # the shared probe operator

        return self.solve, _PreconditionerOperator(self.Q, preconditioner=self), self.logdet
