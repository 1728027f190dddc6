r"""Exact inference for n << d: Woodbury through the structure of the RBF gradient covariance.

After de Roos, Gessner & Hennig, *High-dimensional Gaussian process inference with derivatives*
(ICML 2021). Time :math:`O(n^2 d + n^6)` and memory :math:`O(n d + n^4)` for one marginal
likelihood and its gradient, against :math:`O(n^3 d^3)` and :math:`O(n^2 d^2)` for the dense
engine; no `n d x n d` matrix is ever formed.

**Setting.** Internal units, `n` points :math:`X` (`n x d`, rows :math:`x_i`), the isotropic RBF
kernel :math:`k = s\,e^{-\frac w2 |x - x'|^2}` (:math:`w = \ell^{-2}`, output scale :math:`s`),
every value and every partial derivative observed, value noise :math:`\sigma_v^2` and one
gradient noise :math:`\sigma_g^2`. Write :math:`E_{ij} = e^{-\frac w2 |x_i - x_j|^2}`,
:math:`Z = wX` (rows :math:`z_i`), :math:`P = ZZ^\top`, and store a gradient vector as an
`n x d` matrix :math:`V` (row :math:`j` = the gradient rows of point :math:`j`, the block layout).

**Structure.** With :math:`(z_i - z_j)\cdot v_j = \Psi_{ji} - \Psi_{jj}` for :math:`\Psi = VZ^\top`
(`n x n`), the blocks of the noisy covariance :math:`A` act as

.. math::

    K_{gg}V = s\,w\,EV - s\,\mathcal C(\Psi)\,Z, \qquad
    \mathcal C(\Psi) = \operatorname{diag}(H\mathbf 1) - H, \quad H_{ij} = E_{ij}(\Psi_{ji} - \Psi_{jj}),

    K_{gf}u = s\,\mathcal F(u)\,Z, \quad \mathcal F(u) = E\operatorname{diag}(u) - \operatorname{diag}(Eu), \qquad
    K_{fg}V = s\,\mathcal F^\top(\Psi), \quad \mathcal F^\top(\Psi)_j = \textstyle\sum_i E_{ij}(\Psi_{ij} - \Psi_{ii}).

So with :math:`U : c \mapsto cZ` (`n x n` coefficients to `n x d` gradients, :math:`U^\top V = VZ^\top`):

.. math::

    A = \begin{bmatrix} sE + \sigma_v^2 I & s\,\mathcal F^\top U^\top \\ s\,U\mathcal F & G \end{bmatrix},
    \qquad G = B - s\,U\mathcal C U^\top, \qquad B = B_n \otimes I_d, \quad B_n = s w E + \sigma_g^2 I_n .

:math:`B` is a Kronecker product (one `n x n` Cholesky) and the rest of :math:`G` has rank at most
:math:`n^2` in the span of the inputs. With :math:`\Gamma = U^\top B^{-1} U : c \mapsto B_n^{-1} c P`
(an :math:`n^2 \times n^2` matrix, :math:`\Gamma = B_n^{-1} \otimes P`) and the core
:math:`T = I - s\,\mathcal C\Gamma` (:math:`n^2 \times n^2`), the push-through Woodbury identity
and the matrix determinant lemma give

.. math::

    G^{-1} = B^{-1} + B^{-1} U\, T^{-1} s\,\mathcal C\, U^\top B^{-1}, \qquad
    G^{-1}U = B^{-1}U\,T^{-1}, \qquad U^\top G^{-1} U = \Gamma T^{-1}, \qquad
    \log|G| = d \log|B_n| + \log|T| .

:math:`T` is not symmetric. A square root of :math:`\Gamma` makes it so: with
:math:`B_n = L_B L_B^\top`, :math:`XX^\top = YY^\top` (a constant of the data) and
:math:`R = L_B^{-\top} \otimes wY` (:math:`RR^\top = \Gamma`, applied as :math:`c \mapsto
L_B^{-\top} c\, (wY)^\top`), :math:`\mathcal C` is a symmetric matrix and, by Sylvester's
identity and push-through,

.. math::

    M = I - s R^\top \mathcal C R \succ 0, \qquad \log|T| = \log|M|, \qquad
    T^{-1} = I + s\,\mathcal C R M^{-1} R^\top, \qquad \Gamma T^{-1} = R M^{-1} R^\top,

so the core is factorised by a Cholesky of :math:`M` (positive definite because :math:`G` is).
The values follow by the Schur complement
:math:`S = sE + \sigma_v^2 I - s^2 \mathcal F^\top \Gamma T^{-1} \mathcal F = sE + \sigma_v^2 I -
s^2 (R^\top\mathcal F)^\top M^{-1} (R^\top\mathcal F)` (`n x n`, positive definite):
:math:`\log|A| = d\log|B_n| + \log|M| + \log|S|` and, for :math:`r = [r_f; R_g]`,
:math:`\psi = U^\top B^{-1} R_g = B_n^{-1} R_g Z^\top` and :math:`a = R^\top \mathcal C \psi`,

.. math::

    r^\top A^{-1} r = \langle R_g, B_n^{-1} R_g\rangle + s\,\psi^\top \mathcal C \psi + s^2 a^\top M^{-1} a
        + t^\top S^{-1} t, \qquad t = r_f - s\,\mathcal F^\top\big(\psi + s R M^{-1} a\big).

The negative log marginal likelihood :math:`\frac12 r^\top A^{-1} r + \frac12\log|A| + \frac N2\log 2\pi`
is then a function of the `n x n` Gram matrices :math:`XX^\top`, :math:`R_g X^\top`,
:math:`R_g R_g^\top` (one :math:`O(n^2 d)` pass) and of :math:`n^2 \times n^2` cores
(:math:`O(n^5)` to form :math:`M`, :math:`O(n^6)` to factorise it). Autograd through these small
formulas gives its gradient with respect to :math:`\ell, s, \sigma_v^2, \sigma_g^2` (and the
residual), except through the Cholesky of :math:`M`, whose backward is closed-form
(:class:`_LogdetSolve`). Inputs are centred first (the covariance depends on differences only).

**Prediction.** The same blocks give the inverse as a diagonal-Kronecker part plus a low-rank part,

.. math::

    A^{-1} = \begin{bmatrix} 0 & 0 \\ 0 & B^{-1} \end{bmatrix} + \mathcal W \mathcal K \mathcal W^\top,
    \qquad \mathcal W = \begin{bmatrix} I_n & \\ & B^{-1}U \end{bmatrix}, \qquad
    \mathcal K = \begin{bmatrix} S^{-1} & -s S^{-1}\mathcal F^\top T^{-\top} \\
        -s T^{-1}\mathcal F S^{-1} & s T^{-1}\mathcal C + s^2 T^{-1}\mathcal F S^{-1}\mathcal F^\top T^{-\top}
    \end{bmatrix},

so a cross-covariance row :math:`k = [k_f; K_g]` has :math:`k^\top A^{-1} k = \langle K_g, B_n^{-1}K_g\rangle
+ y^\top \mathcal K y` with :math:`y = [k_f; B_n^{-1} K_g Z^\top]` (size :math:`n + n^2`). At a test
point with :math:`e_j = E(x_*, x_j)` and :math:`\Delta_j = z_* - z_j` the value row is
:math:`k_f = s e`, :math:`K_g = s\operatorname{diag}(e)\Delta`, and the row of
:math:`\partial_a f(x_*)` is :math:`k_f = -s\,e \circ \delta_a`,
:math:`K_g = s(w\,e\,\varepsilon_a^\top - \operatorname{diag}(e\circ\delta_a)\Delta)` with
:math:`\delta_a = \Delta_{:,a}`. Its :math:`y` is linear in :math:`h_a = [\delta_a; Z_{:,a}] \in
\mathbb R^{2n}`, :math:`y = Y h_a`, so the `d` gradient variances of a test point cost one
:math:`2n \times 2n` matrix :math:`Y^\top\mathcal K Y` and :math:`O(n^2 d)`:

.. math::

    \langle K_g, B_n^{-1} K_g\rangle = s^2\big(w^2 e^\top B_n^{-1} e - 2w\,(B_n^{-1}e)^\top(e\circ\delta_a^2)
        + (e\circ\delta_a)^\top (B_n^{-1}\circ \Delta\Delta^\top)(e\circ\delta_a)\big).

(:math:`\mathcal K` is computed through :math:`M`: :math:`T^{-1}\mathcal F = \mathcal F + s\,\mathcal C R
M^{-1} R^\top \mathcal F`, :math:`T^{-1} s\,\mathcal C = s\,\mathcal C + s^2\,\mathcal C R M^{-1}
(\mathcal C R)^\top`.) Written out in :math:`\delta_a = w(x_{*a} - X_{:,a})`, all these reductions are
quadratic forms in :math:`(x_{*a}, X_{:,a})` with `n`-sized coefficients per test point, so their
`d` evaluations are matrix products over all test points at once. Prediction costs
:math:`O(m n^2 d + m n^5)` for `m` test points (means and variances of f and grad f); weights
:math:`\alpha = A^{-1} r` and any :math:`A^{-1} v` cost :math:`O(n^2 d + n^4)`.

Scope (:meth:`StructuredWoodbury.supports`): ``ScaleKernel(DerivativeRBFKernel())`` or a bare
``DerivativeRBFKernel`` (any layout), unbatched, all values and partial derivatives observed, one
noise variance for the values and one per derivative dimension, the same at every point. This
module is the path for one lengthscale and one gradient-noise variance; ARD lengthscales or a
noise per dimension take the general path of :mod:`gpderiv.inference.structured_ard` (same
structure, block-diagonal :math:`B`, an LU instead of a Cholesky of the core).
The core is :math:`n^2 \times n^2`: the engine is meant for tens of points, not thousands.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from gpytorch.kernels import Kernel
from torch import Tensor

from gpderiv.exceptions import CholeskyError
from gpderiv.inference.base import DirectPredictionFactor, Engine, Factor, fold_batch, gaussian_constant
from gpderiv.inference.iterative import rbf_parts, rbf_scope_error
from gpderiv.observed_rows import ObservedRows

__all__ = ["IsotropicRBFCovariance", "StructuredFactor", "StructuredWoodbury", "structured_nll"]

#: Elements of one `chunk x n x d` temporary (32 MiB in float64): pairwise differences of the
#: training inputs and of test points with the training inputs.
_CHUNK_ELEMENTS = 2**22
#: Peak number of `n^2 x n^2` core matrices alive (C R, M, its factor and inverse in the backward,
#: the autograd buffers; in the factor also C and the K matrix), and of `n x d` matrices (inputs,
#: residual, weights, temporaries).
_CORE_MATRICES = 10
_INPUT_MATRICES = 8


@dataclass
class IsotropicRBFCovariance:
    """The noiseless covariance ``s K(X, X)`` of values and all gradients for the isotropic RBF kernel.

    What the structured engine needs instead of a matrix: the inputs and the hyperparameters.

    Attributes:
        X: `n x d` inputs (internal units).
        lengthscale: the single lengthscale ``l`` (any shape with one element).
        outputscale: the output scale ``s`` (any shape with one element).
    """

    X: Tensor
    lengthscale: Tensor
    outputscale: Tensor

    @property
    def precision(self) -> Tensor:
        """``w = 1 / l^2`` as a scalar tensor."""
        return self.lengthscale.reshape(()).pow(-2)

    @property
    def scale(self) -> Tensor:
        """``s`` as a scalar tensor."""
        return self.outputscale.reshape(())


def squared_distances(x1: Tensor, x2: Tensor) -> Tensor:
    """`n1 x n2` matrix of ``|x1_i - x2_j|^2`` from exact differences (zero at coincident points), in row chunks."""
    chunk = max(1, _CHUNK_ELEMENTS // max(1, x2.shape[0] * x2.shape[1]))
    parts = [(x1[i : i + chunk].unsqueeze(1) - x2).square().sum(-1) for i in range(0, x1.shape[0], chunk)]
    return torch.cat(parts) if parts else x1.new_zeros(0, x2.shape[0])


def _core_map(E: Tensor, Psi: Tensor) -> Tensor:
    r"""``C(Psi) = diag(H 1) - H`` with ``H_ij = E_ij (Psi_ji - Psi_jj)``, batched over leading dims of ``Psi``."""
    H = E * (Psi.transpose(-1, -2) - Psi.diagonal(dim1=-2, dim2=-1).unsqueeze(-2))
    return torch.diag_embed(H.sum(-1)) - H


def _cross_map_t(E: Tensor, Psi: Tensor) -> Tensor:
    r"""``F^T(Psi)_j = sum_i E_ij (Psi_ij - Psi_ii)``, batched over leading dimensions of ``Psi``."""
    return (E * Psi).sum(-2) - Psi.diagonal(dim1=-2, dim2=-1) @ E


def _cross_matrix(E: Tensor) -> Tensor:
    """`n^2 x n` matrix of ``F``: column ``j`` is ``vec(F(e_j))``, ``F(e_j)[i, k] = E_ij (delta_kj - delta_ik)``."""
    n = E.shape[0]
    eye = torch.eye(n, dtype=E.dtype, device=E.device)
    columns = E.T.unsqueeze(-1) * eye.unsqueeze(1) - torch.diag_embed(E.T)  # [j, i, k]
    return columns.reshape(n, n * n).T


def _cholesky(M: Tensor, what: str) -> Tensor:
    """Differentiable lower Cholesky factor of a small symmetric matrix; a clear error if not positive definite."""
    L, info = torch.linalg.cholesky_ex(M)
    if bool(info):
        raise CholeskyError(
            f"Cholesky factorisation of the {M.shape[-1]} x {M.shape[-1]} {what} of the structured engine failed: "
            "the system is numerically singular. This happens with near-duplicate inputs that carry gradient "
            "observations, or with a noise level far below the data's. Try: a larger noise_lower_bound (e.g. 1e-4), "
            "known noise instead of none, removing near-duplicate points, or a shorter initial lengthscale."
        )
    return L


def _gram_root(X: Tensor) -> Tensor:
    """`n x n` matrix ``Y`` with ``Y Y^T = X X^T`` (eigenvalues clamped at 0; no autograd: X is data)."""
    with torch.no_grad():
        values, vectors = torch.linalg.eigh(X @ X.T)
        return vectors * values.clamp_min(0.0).sqrt()


class _LogdetSolve(torch.autograd.Function):
    r"""``(log|M|, M^-1 B)`` for a symmetric positive definite core ``M``, with a closed-form backward.

    Autograd through ``torch.linalg.cholesky`` of the :math:`n^2 \times n^2` core costs about
    three times :math:`n^6` flops; the backward here needs one ``cholesky_inverse`` (DESIGN.md:
    do not backpropagate through the Cholesky). For :math:`X = M^{-1}B`,
    :math:`\bar B = M^{-1}\bar X` and :math:`\bar M = \bar g M^{-1} - \bar B X^\top` (symmetrised).
    """

    @staticmethod
    def forward(ctx: Any, M: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
        L = _cholesky(M.detach(), "Woodbury core")
        X = torch.cholesky_solve(B.detach(), L)
        ctx.save_for_backward(L, X)
        return 2.0 * L.diagonal().log().sum(), X

    @staticmethod
    def backward(ctx: Any, grad_logdet: Tensor, grad_X: Tensor) -> tuple[Tensor | None, Tensor | None]:
        L, X = ctx.saved_tensors
        grad_B = torch.cholesky_solve(grad_X, L)
        grad_M = None
        if ctx.needs_input_grad[0]:
            grad_M = torch.cholesky_inverse(L).mul_(grad_logdet)
            grad_M.addmm_(grad_B, X.T, alpha=-1.0)
            grad_M = 0.5 * (grad_M + grad_M.T)
        return grad_M, grad_B if ctx.needs_input_grad[1] else None


@dataclass
class _System:
    """The small matrices of the structured factorisation (differentiable when the inputs are).

    ``R = L_B^-T (x) (w Y)`` (`n^2 x n^2`, with ``B_n = L_B L_B^T`` and ``Y Y^T = X X^T``) is a
    square root of ``Gamma = B_n^-1 (x) P``, and ``M = I - s R^T C R`` is the symmetric positive
    definite core: ``det T = det M`` and ``T^-1 = I + s C R M^-1 R^T`` (push-through), so
    ``Gamma T^-1 = R M^-1 R^T``.
    """

    E: Tensor  # n x n exponentials
    B_inv: Tensor  # n x n inverse of B_n = s w E + sigma_g^2 I
    L_B_inv: Tensor  # n x n inverse of the Cholesky factor of B_n
    root: Tensor  # n x n w Y, with (w Y)(w Y)^T = P = Z Z^T
    logdet_B: Tensor  # log|B_n| (one copy; log|B| = d times this)
    CR: Tensor  # n^2 x n^2 C R
    M: Tensor  # n^2 x n^2 core M = I - s R^T C R
    F: Tensor  # n^2 x n matrix of F
    RtF: Tensor  # n^2 x n R^T F
    w: Tensor
    s: Tensor
    value_noise: Tensor

    def R(self, c: Tensor) -> Tensor:
        """``R vec(c) = vec(L_B^-T c (wY)^T)`` for `... x n x n` coefficients."""
        return self.L_B_inv.T @ c @ self.root.T

    def R_t(self, c: Tensor) -> Tensor:
        """``R^T vec(c) = vec(L_B^-1 c (wY))`` for `... x n x n` coefficients."""
        return self.L_B_inv @ c @ self.root

    def schur_cholesky(self, FtGTF: Tensor) -> Tensor:
        """Cholesky factor of ``S = s E + sigma_v^2 I - s^2 F^T Gamma T^-1 F``, given ``F^T Gamma T^-1 F``."""
        n = self.E.shape[0]
        eye = torch.eye(n, dtype=self.E.dtype, device=self.E.device)
        S = self.s * self.E + self.value_noise * eye - (self.s * self.s) * FtGTF
        return _cholesky(0.5 * (S + S.T), "Schur complement of the values")


def _system(covariance: IsotropicRBFCovariance, noise: Tensor) -> _System:
    """The small matrices of the module docstring: ``B_n`` (factorised), ``C R``, the core ``M`` and ``R^T F``."""
    X = covariance.X
    n = X.shape[0]
    w, s = covariance.precision, covariance.scale
    value_noise, grad_noise = noise.reshape(2).unbind()
    E = torch.exp(-0.5 * w * squared_distances(X.detach(), X.detach()))
    eye = torch.eye(n, dtype=X.dtype, device=X.device)
    L_B = _cholesky((s * w) * E + grad_noise * eye, "gradient block B_n = s w E + noise I")
    L_B_inv = torch.linalg.solve_triangular(L_B, eye, upper=False)
    root = w * _gram_root(X)
    # R applied to the unit coefficients e_jl is the outer product L_B^-T[:, j] (wY)[:, l]^T; then C
    # (O(n^2) each) and R^T (O(n^3) each): M = I - s R^T C R in O(n^5), symmetric as C is.
    unit_images = (L_B_inv.unsqueeze(1).unsqueeze(-1) * root.T.unsqueeze(0).unsqueeze(-2)).reshape(n * n, n, n)
    CR = _core_map(E, unit_images).reshape(n * n, n * n).T  # column (j, l) = vec(C R e_jl)
    RtCR = (L_B_inv @ CR.T.reshape(n * n, n, n) @ root).reshape(n * n, n * n)  # symmetric
    M = torch.eye(n * n, dtype=X.dtype, device=X.device) - s * 0.5 * (RtCR + RtCR.T)
    F = _cross_matrix(E)
    RtF = (L_B_inv @ F.T.reshape(n, n, n) @ root).reshape(n, n * n).T
    return _System(
        E=E,
        B_inv=L_B_inv.T @ L_B_inv,
        L_B_inv=L_B_inv,
        root=root,
        logdet_B=2.0 * L_B.diagonal().log().sum(),
        CR=CR,
        M=M,
        F=F,
        RtF=RtF,
        w=w,
        s=s,
        value_noise=value_noise,
    )


def structured_nll(covariance: IsotropicRBFCovariance, noise: Tensor, resid: Tensor) -> Tensor:
    """Differentiable negative log marginal likelihood of values and all gradients (module docstring).

    Args:
        covariance: inputs and kernel hyperparameters.
        noise: `2` variances ``(value noise, gradient noise)``.
        resid: `N = n (1 + d)` targets minus prior mean, block layout.

    Returns:
        Scalar tensor; autograd gives its gradient with respect to every input.
    """
    X = covariance.X - covariance.X.detach().mean(0)  # differences only: centring helps the rounding
    covariance = IsotropicRBFCovariance(X, covariance.lengthscale, covariance.outputscale)
    n, d = X.shape
    sys_ = _system(covariance, noise)
    w, s = sys_.w, sys_.s
    r_f, R_g = resid[:n], resid[n:].reshape(n, d)
    psi = w * (sys_.B_inv @ (R_g @ X.T))  # B_n^-1 R_g Z^T
    quad_B = (sys_.B_inv * (R_g @ R_g.T)).sum()  # <R_g, B_n^-1 R_g>
    C_psi = _core_map(sys_.E, psi)
    a = sys_.R_t(C_psi).reshape(n * n, 1)  # R^T C psi
    logdet_M, solved = _LogdetSolve.apply(sys_.M, torch.cat([a, sys_.RtF], -1))  # M^-1 [a, R^T F]
    # psi^T T^-1 s C psi with T^-1 = I + s C R M^-1 R^T
    quad_G = quad_B + s * (psi * C_psi).sum() + (s * s) * (a * solved[:, :1]).sum()
    S_chol = sys_.schur_cholesky(sys_.RtF.T @ solved[:, 1:])
    # U^T G^-1 R_g = psi + Gamma T^-1 s C psi = psi + s R M^-1 R^T C psi
    t = r_f - s * _cross_map_t(sys_.E, psi + s * sys_.R(solved[:, 0].reshape(n, n)))
    quad_S = torch.cholesky_solve(t.unsqueeze(-1), S_chol).squeeze(-1).dot(t)
    logdet = d * sys_.logdet_B + logdet_M + 2.0 * S_chol.diagonal().log().sum()
    return 0.5 * (quad_G + quad_S + logdet) + gaussian_constant(resid.shape[-1])


def _covariance(kernel: Kernel, data: ObservedRows) -> IsotropicRBFCovariance:
    base, scale = rbf_parts(kernel)
    return IsotropicRBFCovariance(data.X, base.lengthscale, scale)


def _two_noises(noise: Tensor, n: int) -> Tensor:
    """`2` variances (values, gradients) from `N` row variances, block layout.

    Means, so that the gradient reaches the one parameter behind each group exactly (the
    engine's scope requires one variance per group: :meth:`StructuredWoodbury.supports`).
    """
    return torch.stack([noise[:n].mean(), noise[n:].mean()])


def _noise_groups(noise: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``(value variance, d gradient variances)`` from `N` row variances, block layout (means over points).

    Means, so that the gradient reaches each parameter behind a group exactly (the engine's scope
    requires the same variances at every point: :meth:`StructuredWoodbury.supports`).
    """
    return noise[:n].mean(), noise[n:].reshape(n, -1).mean(0)


class StructuredWoodbury(Engine):
    """Exact inference in time linear in d for n << d (``inference="structured"``; module docstring)."""

    name = "structured"
    memory_advice = "It is meant for few points in many dimensions; use inference='dense' or 'iterative'."

    #: Whether the gradient noise is one variance (recorded by :meth:`supports`): with one lengthscale
    #: too, the isotropic path (symmetric core, module docstring) is exact and its gradient reaches
    #: that one parameter; otherwise the ARD path (:mod:`gpderiv.inference.structured_ard`), exact
    #: for any lengthscales and per-dimension noises, so also the safe default.
    shared_grad_noise: bool = False

    def supports(
        self, kernel: Kernel, data: ObservedRows, *, shared_grad_noise: bool, noise_by_kind: bool = True
    ) -> str | None:
        """The default RBF kernel (ARD or not), values and full gradients, one noise variance per dimension."""
        error = rbf_scope_error(kernel, data, self.name)
        if error is not None:
            return error
        if not noise_by_kind:
            return (
                "inference: 'structured' needs one noise variance for all values and one per derivative "
                "dimension, the same at every point (train_Yvar varies between points); use inference='dense'"
            )
        self.shared_grad_noise = shared_grad_noise
        return None

    def isotropic(self, kernel: Kernel) -> bool:
        """Whether the isotropic path applies: one lengthscale and one gradient-noise variance."""
        return self.shared_grad_noise and rbf_parts(kernel)[0].lengthscale.numel() == 1

    def memory_estimate(self, data: ObservedRows, dtype: torch.dtype) -> int:
        """Bytes of :data:`_CORE_MATRICES` `n^2 x n^2` cores, :data:`_INPUT_MATRICES` `n^2 x d` matrices, one chunk.

        (`n^2 x d`: the ARD path's blocks ``P_j`` and their products; the isotropic path needs `n x d`.)
        """
        itemsize = torch.finfo(dtype).bits // 8
        n = data.n
        return itemsize * (_CORE_MATRICES * n**4 + _INPUT_MATRICES * n * data.num_rows + _CHUNK_ELEMENTS)

    def negative_log_marginal(self, kernel: Kernel, data: ObservedRows, noise: Tensor, resid: Tensor) -> Tensor:
        """Differentiable negative log marginal likelihood (exact; formulas in the module docstrings).

        Args:
            kernel: ``ScaleKernel(DerivativeRBFKernel())`` or a bare ``DerivativeRBFKernel``, ARD or not.
            data: `n` points with every value and partial derivative.
            noise: `N` row variances (one for values, one per derivative dimension: see :meth:`supports`).
            resid: `N = n (1 + d)` targets minus prior mean, block layout.

        Returns:
            Scalar tensor; autograd gives its gradient with respect to every input.
        """
        if self.isotropic(kernel):
            return structured_nll(_covariance(kernel, data), _two_noises(noise, data.n), resid)
        from gpderiv.inference.structured_ard import ard_structured_nll  # it builds on this module

        base, scale = rbf_parts(kernel)
        return ard_structured_nll(data.X, base.lengthscale, scale, *_noise_groups(noise, data.n), resid)

    def factor(self, kernel: Kernel, data: ObservedRows, noise: Tensor, resid: Tensor) -> Factor:
        """The inverse in the form ``blockdiag(0, B^-1) + W K W^T`` and the weights ``A^-1 r`` (no graph kept)."""
        if not self.isotropic(kernel):
            from gpderiv.inference.structured_ard import ard_structured_factor  # it builds on this module

            base, scale = rbf_parts(kernel)
            params = (base.lengthscale, scale, *_noise_groups(noise, data.n))
            return ard_structured_factor(self, kernel, data, noise, resid, params)
        with torch.no_grad():
            covariance = _covariance(kernel, data)
            # The covariance depends on differences only: centring the inputs changes nothing but
            # the rounding of the products with them (test points are shifted by the same centre).
            centre = covariance.X.detach().mean(0)
            X = covariance.X.detach() - centre
            covariance = IsotropicRBFCovariance(X, covariance.lengthscale.detach(), covariance.outputscale.detach())
            n = X.shape[0]
            sys_ = _system(covariance, _two_noises(noise.detach(), n))
            s = sys_.s
            L_M = _cholesky(sys_.M, "Woodbury core")
            CR = sys_.CR
            M_inv_RtF = torch.cholesky_solve(sys_.RtF, L_M)
            S_inv = torch.cholesky_inverse(sys_.schur_cholesky(sys_.RtF.T @ M_inv_RtF))
            eye = torch.eye(n * n, dtype=X.dtype, device=X.device)
            C = _core_map(sys_.E, eye.reshape(n * n, n, n)).reshape(n * n, n * n).T  # symmetric
            # T^-1 F = F + s C R M^-1 R^T F and T^-1 s C = s C + s^2 (C R) M^-1 (C R)^T
            T_inv_F = sys_.F + s * CR @ M_inv_RtF
            K_cf = -s * T_inv_F @ S_inv
            K_cc = s * C + (s * s) * (CR @ torch.cholesky_solve(CR.T, L_M) + T_inv_F @ S_inv @ T_inv_F.T)
            K = torch.cat([torch.cat([S_inv, K_cf.T], -1), torch.cat([K_cf, 0.5 * (K_cc + K_cc.T)], -1)])
            return StructuredFactor(self, kernel, data, noise, resid, covariance, centre, sys_.B_inv, K)


class StructuredFactor(DirectPredictionFactor):
    """What prediction needs from a structured fit: ``A^-1 = blockdiag(0, B_n^-1 (x) I_d) + W K W^T``.

    Attributes:
        covariance: centred inputs and hyperparameters (detached).
        centre: `d` mean of the training inputs, subtracted from ``covariance.X`` and from test points.
        B_inv: `n x n` inverse of ``B_n = s w E + sigma_g^2 I``.
        K: `(n + n^2) x (n + n^2)` symmetric core of the low-rank part (module docstring).
        alpha: `N` weights ``A^-1 r`` (block layout).
    """

    def __init__(
        self,
        engine: StructuredWoodbury,
        kernel: Kernel,
        data: ObservedRows,
        noise: Tensor,
        resid: Tensor,
        covariance: IsotropicRBFCovariance,
        centre: Tensor,
        B_inv: Tensor,
        K: Tensor,
    ) -> None:
        super().__init__(engine, kernel, data, noise, resid)
        self.covariance, self.centre, self.B_inv, self.K = covariance, centre, B_inv, K
        self.alpha = self.solve(resid.detach())

    def solve(self, rhs: Tensor) -> Tensor:
        """``A^-1 rhs`` for an `N` vector or `... x N x t` matrix in block layout, in `O(n^2 d t + n^4 t)`."""
        if rhs.dim() > 2:
            return fold_batch(self.solve, rhs)
        X = self.covariance.X
        n, d = X.shape
        w = self.covariance.precision
        vector = rhs.ndim == 1
        rhs = rhs.unsqueeze(-1) if vector else rhs
        t = rhs.shape[-1]
        r_f, R_g = rhs[:n], rhs[n:].reshape(n, d, t)
        BR = (self.B_inv @ R_g.reshape(n, d * t)).reshape(n, d, t)  # B^-1 R_g
        psi = w * (X @ BR.permute(1, 0, 2).reshape(d, n * t)).reshape(n, n, t).transpose(0, 1)  # (B^-1 R_g) Z^T
        k = self.K @ torch.cat([r_f, psi.reshape(n * n, t)])
        c = self.B_inv @ k[n:].reshape(n, n * t)  # B_n^-1 c, then U: (B_n^-1 c) Z
        out_g = BR + w * (c.reshape(n, n, t).transpose(1, 2) @ X).transpose(1, 2)
        out = torch.cat([k[:n], out_g.reshape(n * d, t)])
        return out.squeeze(-1) if vector else out

    def predict(self, xs: Tensor, variance: bool = True) -> tuple[Tensor, Tensor | None]:
        """Posterior mean (zero prior mean) and variance of ``[f, grad f]`` at test points, never forming ``K_cross``.

        Every product with a `d`-long vector is one matrix product over all test points; what is
        per test point has size `n^2` (the value variance) or `n^2 x 2n` (the gradient variances).

        Args:
            xs: `m x d` test inputs (internal units, not centred).
            variance: also compute the variances (`O(m n^2 d + m n^5)`; the mean alone is `O(m n d)`).

        Returns:
            ``(mean, variance)``, each `m (1 + d)` in block layout (``variance`` None if not asked for).
        """
        cov = self.covariance
        X, w, s = cov.X, cov.precision, cov.scale
        n, d = X.shape
        xs = xs - self.centre
        alpha_f, alpha_g = self.alpha[:n], self.alpha[n:].reshape(n, d)
        cross = xs @ X.T  # m x n, x* . x_j
        sq = xs.square().sum(-1)  # |x*|^2
        sq_X = X.square().sum(-1)
        e = torch.exp(-0.5 * w * (sq.unsqueeze(-1) - 2.0 * cross + sq_X).clamp_min(0.0))  # m x n
        # Means: k_f = s e, K_g = s diag(e) Delta (values); -s e o delta_a, s (w e eps_a^T - diag(e o delta_a) Delta).
        dots = w * (xs @ alpha_g.T - (X * alpha_g).sum(-1))  # Delta_j . alpha_g,j
        q = e * (alpha_f + dots)
        mean_f = s * (e @ alpha_f + (e * dots).sum(-1))
        mean_g = (s * w) * (e @ alpha_g - xs * q.sum(-1, keepdim=True) + q @ X)
        mean = torch.cat([mean_f, mean_g.reshape(-1)])
        if not variance:
            return mean, None
        chunk = max(1, _CHUNK_ELEMENTS // (2 * n * (n + n * n)))  # c x (n + n^2) x 2n columns of Y
        parts = [
            self._variance(xs[i : i + chunk], e[i : i + chunk], cross[i : i + chunk], sq[i : i + chunk])
            for i in range(0, xs.shape[0], chunk)
        ]
        var_f = torch.cat([p[0] for p in parts]) if parts else xs.new_zeros(0)
        var_g = torch.cat([p[1] for p in parts]) if parts else xs.new_zeros(0, d)
        return mean, torch.cat([var_f, var_g.reshape(-1)])

    def _variance(self, xs: Tensor, e: Tensor, cross: Tensor, sq: Tensor) -> tuple[Tensor, Tensor]:
        r"""`c` value variances and `c x d` gradient variances at a chunk of (centred) test points.

        With :math:`\delta_a = w(x_{*a}\mathbf 1 - \xi_a)`, :math:`\xi_a = X_{:,a}`, every reduction of
        the gradient variance is a quadratic form in :math:`(x_{*a}, \xi_a)`:
        :math:`\kappa_0 + \kappa_1 x_{*a}^2 + x_{*a}\, k_2\cdot\xi_a + \xi_a^\top K_3 \xi_a`, whose
        `n`-sized coefficients are per test point and whose `d` evaluations are matrix products.
        """
        cov = self.covariance
        X, w, s = cov.X, cov.precision, cov.scale
        n = X.shape[0]
        c = xs.shape[0]
        B_inv, K = self.B_inv, self.K
        G = X @ X.T
        ww = w * w
        gram = ww * (sq.reshape(c, 1, 1) - cross.unsqueeze(-1) - cross.unsqueeze(-2) + G)  # Delta_j . Delta_k
        Q = ww * (cross.unsqueeze(-2) - G)  # Q_jl = Delta_j . z_l
        beta = e @ B_inv  # B_n^-1 e
        e_col = e.unsqueeze(-1)
        M = e_col * (B_inv * gram) * e.unsqueeze(-2)  # diag(e) (B_n^-1 o gram) diag(e)
        eBe = (e * beta).sum(-1)
        # Values: <K_g, B^-1 K_g> + y^T K y with y = [s e; s B_n^-1 diag(e) Q].
        y = torch.cat([s * e.T, s * (B_inv @ (e_col * Q)).reshape(c, n * n).T])  # (n + n^2) x c
        var_f = s - (s * s) * M.sum((-2, -1)) - (y * (K @ y)).sum(0)
        # Gradients: y = Y h_a with h_a = [delta_a; Z_:a] and Y = [Y_delta, Y_zeta] ((n + n^2) x 2n per point).
        eye = torch.eye(n, dtype=X.dtype, device=X.device)
        Y = xs.new_zeros(n + n * n, c, 2 * n)
        Y[:n, :, :n] = -s * e.T.unsqueeze(-1) * eye.unsqueeze(1)  # value part: -s e_i at row i
        # c part of column i: -s e_i B_n^-1[:, i] Q[i, :]^T; of column n + l: s w B_n^-1 e at column l.
        Y_delta = -s * B_inv.reshape(n, 1, 1, n) * (e_col * Q).permute(2, 0, 1).unsqueeze(0)  # j, l, c, i
        Y[n:, :, :n] = Y_delta.reshape(n * n, c, n)
        Y_zeta = (s * w) * beta.T.reshape(n, 1, c, 1) * eye.reshape(1, n, 1, n)  # j, l', c, l
        Y[n:, :, n:] = Y_zeta.reshape(n * n, c, n)
        KY = (K @ Y.reshape(n + n * n, c * 2 * n)).reshape(n + n * n, c, 2 * n)
        core = torch.einsum("pci,pcj->cij", Y, KY)
        core = 0.5 * (core + core.transpose(-1, -2))
        dd, dz, zz = core[:, :n, :n], core[:, :n, n:], core[:, n:, n:]
        # h_a = w (x*_a u + D xi_a), u = [1; 0], D = [-I; I]: coefficients of y^T K y / w^2 ...
        c0 = dd.sum((-2, -1))
        c1 = (dz.transpose(-1, -2) - dd).sum(-1)  # D^T core u
        c2 = dd - dz - dz.transpose(-1, -2) + zz  # D^T core D
        # ... and of <K_g, B^-1 K_g> / (s w)^2 - e^T B^-1 e: -2 w b^T (x*_a - xi_a)^2 + (x*_a - xi_a)^T M (x*_a - xi_a).
        b = beta * e
        kappa1 = (s * s) * (M.sum((-2, -1)) - 2 * w * b.sum(-1)) + c0
        k2 = (s * s) * (-2 * M.sum(-1) + 4 * w * b) + 2 * c1
        K3 = (s * s) * (M - 2 * w * torch.diag_embed(b)) + c2
        quadratic = kappa1.unsqueeze(-1) * xs.square() + xs * (k2 @ X) + _diagonal_forms(K3.reshape(c, n * n), X)
        var_g = s * w - ((s * s) * ww * eBe).unsqueeze(-1) - ww * quadratic
        return var_f, var_g


def _diagonal_forms(K3: Tensor, X: Tensor) -> Tensor:
    """`c x d` matrix of ``xi_a^T K3_c xi_a`` (``xi_a = X[:, a]``): products with ``X_ja X_ka``, in d-chunks."""
    n, d = X.shape
    chunk = max(1, _CHUNK_ELEMENTS // (n * n))
    parts = []
    for a in range(0, d, chunk):
        columns = X[:, a : a + chunk]
        parts.append(K3 @ (columns.unsqueeze(1) * columns.unsqueeze(0)).reshape(n * n, -1))
    return torch.cat(parts, -1)
