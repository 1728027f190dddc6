r"""The structured engine with ARD lengthscales and one noise variance per derivative dimension.

The general case of :mod:`gpderiv.inference.structured` (same notation; read it first): the RBF
kernel :math:`k = s\,e^{-\frac12 (x - x')^\top \Lambda^{-1}(x - x')}` with
:math:`\Lambda = \operatorname{diag}(\ell_a^2)`, precisions :math:`w_a = \ell_a^{-2}`,
:math:`W = \operatorname{diag}(w)`, value noise :math:`\sigma_v^2` and noise :math:`\sigma_a^2` on
:math:`\partial_a f`. With :math:`E_{ij} = k(x_i, x_j)/s` and :math:`Z = XW` (:math:`z_a = Z_{:,a}`)
every block keeps its isotropic form, because :math:`w_a (x_{ia} - x_{ja}) = z_{ia} - z_{ja}`:

.. math::

    K_{gg}V = s\,EVW - s\,\mathcal C(VZ^\top)\,Z, \qquad K_{gf}u = s\,\mathcal F(u)\,Z, \qquad
    K_{fg}V = s\,\mathcal F^\top(VZ^\top),

so :math:`A = \begin{bmatrix} sE + \sigma_v^2 I & s\mathcal F^\top U^\top \\ sU\mathcal F & B - sU\mathcal C U^\top
\end{bmatrix}` with :math:`U: c \mapsto cZ` as before, but the Kronecker part is now block diagonal
per dimension: :math:`(BV)_{:,a} = B_a V_{:,a}`, :math:`B_a = s w_a E + \sigma_a^2 I` (`n x n`).

**One eigendecomposition for all d blocks.** With :math:`E = Q\Lambda_E Q^\top`,
:math:`B_a = Q\,\operatorname{diag}(b_{\cdot a})\,Q^\top`, :math:`b_{ja} = s w_a \lambda_j + \sigma_a^2`, and
:math:`D = 1 / b` (`n x d`): :math:`\log|B| = \sum_{ja} \log b_{ja}`, :math:`B^{-1}V = Q(D \circ Q^\top V)`.
The push-through Woodbury identity and the determinant lemma of the isotropic case hold word for
word with :math:`\Gamma = U^\top B^{-1} U : c \mapsto \sum_a B_a^{-1} c\, z_a z_a^\top` and
:math:`T = I - s\,\mathcal C\Gamma` (:math:`n^2 \times n^2`):

.. math::

    \log|A| = \log|B| + \log|T| + \log|S|, \qquad S = sE + \sigma_v^2 I - s^2 \mathcal F^\top \Gamma T^{-1}\mathcal F,

    r^\top A^{-1} r = \langle R_g, B^{-1}R_g\rangle + \psi^\top u + t^\top S^{-1} t, \qquad
    \psi = U^\top B^{-1}R_g, \quad u = T^{-1} s\,\mathcal C\psi, \quad t = r_f - s\,\mathcal F^\top(\psi + \Gamma u).

In the eigenbasis (:math:`c = Qc'`) :math:`\Gamma` is block diagonal: :math:`\Gamma'(c')_{j} = c'_j P_j`
(row :math:`j`) with :math:`P_j = Z\operatorname{diag}(D_{j,:})Z^\top`, all `n` blocks in one
:math:`O(n^3 d)` product; :math:`\Gamma = (Q \otimes I)\Gamma'(Q \otimes I)^\top` costs
:math:`O(n^5)`. :math:`\Gamma` no longer has a Kronecker square root, so the core is factorised by
LU (:class:`_LogdetSolveLU`, closed-form backward) rather than by the symmetric Cholesky of the
isotropic engine, which the engine keeps for one lengthscale and one shared noise.

**Gradients without differentiating eigenvectors.** :math:`Q` is not a smooth function of
:math:`E` (eigenvalues of :math:`E` cluster at 1 for short lengthscales), so :math:`Q` is a
constant of each evaluation and the hyperparameters enter through :math:`\tilde E = Q^\top E Q`,
which equals :math:`\Lambda_E` at the current point. Since :math:`B_a^{-1} = Q(s w_a\tilde E + \sigma_a^2 I)^{-1}Q^\top`
for any fixed orthogonal :math:`Q`, replacing the inverse by its first-order expansion around the
diagonal,

.. math::

    (s w_a\tilde E + \sigma_a^2 I)^{-1} \to \operatorname{diag}(D_{\cdot a}) - s w_a \operatorname{diag}(D_{\cdot a})\,
    \tilde E_{\mathrm{off}}\,\operatorname{diag}(D_{\cdot a}), \qquad \lambda = \operatorname{diag}\tilde E,

(:math:`\tilde E_{\mathrm{off}}`: the off-diagonal part, zero in value) changes no value and no first
derivative. The off-diagonal terms add :math:`-s\langle \tilde E_{\mathrm{off}}, \bar VW\bar V^\top\rangle`
to :math:`\langle R_g, B^{-1}R_g\rangle` (:math:`\bar V = D \circ Q^\top R_g`), a term
:math:`-(D \circ \tilde E_{\mathrm{off}}\bar V)\,sW Z^\top` to :math:`Q^\top\psi`, and to :math:`\Gamma'` the
coupling :math:`\Gamma'_{(jl),(km)} \mathrel{+}= -\tilde E_{\mathrm{off},jk}\,\Phi_{jklm}`,
:math:`\Phi_{jklm} = s\sum_a w_a D_{ja}D_{ka} z_{la} z_{ma}` (a constant: it multiplies a zero;
:math:`O(n^4 d)` in chunks of `d`). The gradient with respect to :math:`w` through :math:`E` is
closed form (:class:`_WeightedSquaredDistances`).

**Cost.** Time :math:`O(n^2 d + n^3 d + n^4 d + n^6)` (Gram products; the blocks :math:`P_j`;
:math:`\Phi`; the LU of :math:`T`), memory :math:`O(n^2 d + n^4)`: linear in `d`.

**Prediction** (:class:`ARDStructuredFactor`): :math:`A^{-1} = \operatorname{blockdiag}(0, B^{-1}) +
\mathcal W\mathcal K\mathcal W^\top` as in the isotropic case, with :math:`\mathcal K` stored in the
eigenbasis. At a test point with :math:`e_j = E(x_*, x_j)`, :math:`\Delta = (x_* - X)W` (`n x d`),
:math:`v_a = e \circ \Delta_{:,a}` and :math:`q = Q^\top e`, the row of :math:`\partial_a f(x_*)` is
:math:`k_f = -s v_a`, :math:`K_g = s(w_a e\,\varepsilon_a^\top - \operatorname{diag}(v_a)\Delta)`, and

.. math::

    \langle K_g, B^{-1}K_g\rangle = s^2\big(w_a^2 \textstyle\sum_j D_{ja}q_j^2 - 2w_a \sum_j D_{ja} q_j
        (Q^\top(v_a\circ\Delta_{:,a}))_j + v_a^\top\Omega v_a\big), \quad
        \Omega_{jk} = \textstyle\sum_b \Delta_{jb}\Delta_{kb}(B_b^{-1})_{jk},

    Q^\top U^\top B^{-1}K_g = s\big(w_a (D_{:,a}\circ q)\, z_a^\top - \textstyle\sum_j v_{aj}\, Q_{ji}\,\Xi_{ijl}\big),
    \qquad \Xi_{ijl} = \textstyle\sum_b D_{ib}\Delta_{jb}Z_{lb}.

:math:`\Xi` and :math:`\Omega` cost :math:`O(n^3 d)` per test point and the `d` quadratic forms in
:math:`\mathcal K` one :math:`(n + n^2)^2 \times d` product, :math:`O(n^4 d)`: prediction with
variances costs :math:`O(m n^4 d)` for `m` test points (means alone :math:`O(m n d)`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gpderiv.exceptions import CholeskyError
from gpderiv.inference.base import DirectPredictionFactor, Engine, fold_batch, gaussian_constant
from gpderiv.inference.structured import _CHUNK_ELEMENTS, _cholesky, _core_map, _cross_map_t, _cross_matrix
from gpderiv.observed_rows import ObservedRows

__all__ = ["ARDStructuredFactor", "ard_structured_nll"]


class _WeightedSquaredDistances(torch.autograd.Function):
    r"""`n x n` matrix :math:`\sum_a w_a (x_{ia} - x_{ja})^2` from exact differences; gradient in ``w`` only.

    Backward without an `n x n x d` buffer:
    :math:`\bar w_a = \sum_{ij}\bar G_{ij}(x_{ia} - x_{ja})^2 = ((\bar G + \bar G^\top)\mathbf 1)^\top X_{:,a}^{\circ 2}
    - 2\,X_{:,a}^\top \bar G X_{:,a}` (``X`` centred, so that the difference loses nothing).
    """

    @staticmethod
    def forward(ctx: Any, X: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(X)
        root = w.sqrt()
        Xw = X * root
        chunk = max(1, _CHUNK_ELEMENTS // max(1, X.shape[0] * X.shape[1]))
        parts = [(Xw[i : i + chunk].unsqueeze(1) - Xw).square().sum(-1) for i in range(0, X.shape[0], chunk)]
        return torch.cat(parts) if parts else X.new_zeros(0, 0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:
        (X,) = ctx.saved_tensors
        sym = grad + grad.T
        return None, sym.sum(-1) @ X.square() - 2.0 * (X * (grad @ X)).sum(0)


class _LogdetSolveLU(torch.autograd.Function):
    r"""``(log|T|, T^-1 B)`` for a non-symmetric core ``T`` with positive determinant, by LU.

    Backward (DESIGN.md: not through the factorisation): for :math:`X = T^{-1}B`,
    :math:`\bar B = T^{-\top}\bar X` and :math:`\bar T = \bar g\,T^{-\top} - \bar B X^\top`.
    """

    @staticmethod
    def forward(ctx: Any, T: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
        LU, pivots, info = torch.linalg.lu_factor_ex(T.detach())
        diagonal = LU.diagonal()
        if bool(info) or not bool(torch.isfinite(diagonal).all()) or bool((diagonal == 0).any()):
            raise CholeskyError(
                f"LU factorisation of the {T.shape[-1]} x {T.shape[-1]} Woodbury core of the structured engine failed: "
                "the system is numerically singular. Try a larger noise_lower_bound (e.g. 1e-4) or removing "
                "near-duplicate points."
            )
        X = torch.linalg.lu_solve(LU, pivots, B.detach())
        ctx.save_for_backward(LU, pivots, X)
        return diagonal.abs().log().sum(), X

    @staticmethod
    def backward(ctx: Any, grad_logdet: Tensor, grad_X: Tensor) -> tuple[Tensor | None, Tensor | None]:
        LU, pivots, X = ctx.saved_tensors
        grad_B = torch.linalg.lu_solve(LU, pivots, grad_X, adjoint=True)
        grad_T = None
        if ctx.needs_input_grad[0]:
            eye = torch.eye(LU.shape[-1], dtype=LU.dtype, device=LU.device)
            grad_T = torch.linalg.lu_solve(LU, pivots, eye, adjoint=True).mul_(grad_logdet)
            grad_T.addmm_(grad_B, X.T, alpha=-1.0)
        return grad_T, grad_B if ctx.needs_input_grad[1] else None


def _tangent(x: Tensor) -> Tensor:
    """Zero in value, ``x``'s gradient: the first-order part of a quantity expanded around its current value."""
    return x - x.detach()


def _rotate_pairs(G: Tensor, Q: Tensor) -> Tensor:
    """``(Q (x) I) G (Q (x) I)^T`` for an `n^2 x n^2` matrix in row-major pairs ``(j, l)``; `O(n^5)`."""
    n = Q.shape[0]
    G4 = G.reshape(n, n, n, n)
    G4 = torch.einsum("ab,blcm->alcm", Q, G4)
    G4 = torch.einsum("alcm,dc->aldm", G4, Q)
    return G4.reshape(n * n, n * n)


def _block_coupling(D: Tensor, Z: Tensor, scale: Tensor) -> Tensor:
    """`n^2 x n^2` matrix ``Phi[(j, k), (l, m)] = sum_a scale_a D_ja D_ka Z_la Z_ma`` in chunks of `d` (no graph)."""
    n, d = D.shape
    chunk = max(1, _CHUNK_ELEMENTS // max(1, n * n))
    out = D.new_zeros(n * n, n * n)
    for a in range(0, d, chunk):
        Da, Za = D[:, a : a + chunk], Z[:, a : a + chunk]
        left = (Da.unsqueeze(1) * Da.unsqueeze(0) * scale[a : a + chunk]).reshape(n * n, -1)
        out.addmm_(left, (Za.unsqueeze(1) * Za.unsqueeze(0)).reshape(n * n, -1).T)
    return out


def _spectrum(E: Tensor, sw: Tensor, grad_noise: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""``(Q, D, log|B|, E_off)``: eigenvectors of ``E`` (constant), ``D = 1 / (s w_a lambda_j + sigma_a^2)``.

    ``D``, ``log|B|`` and ``E_off`` (zero in value) carry the first-order dependence on ``E``,
    ``s w`` and the noises (module docstring).
    """
    with torch.no_grad():
        values, Q = torch.linalg.eigh(E.detach())
    tangent = _tangent(Q.T @ E @ Q)
    lam = values + tangent.diagonal()
    b = lam.unsqueeze(-1) * sw + grad_noise  # n x d
    if bool((b.detach() <= 0).any()):
        raise CholeskyError(
            "the gradient blocks s w_a E + noise_a I of the structured engine are not positive definite; "
            "try a larger noise_lower_bound (e.g. 1e-4)."
        )
    return Q, 1.0 / b, b.log().sum(), tangent - torch.diag_embed(tangent.diagonal())


def _parts(X: Tensor, lengthscale: Tensor, outputscale: Tensor, grad_noise: Tensor):
    """Common start of the likelihood and the factor: ``w, s, E, Q, D, log|B|, E_off, Z, Gamma``."""
    n, d = X.shape
    w = lengthscale.reshape(-1).expand(d).pow(-2)
    s = outputscale.reshape(())
    E = torch.exp(-0.5 * _WeightedSquaredDistances.apply(X, w))
    Q, D, logdet_B, E_off = _spectrum(E, s * w, grad_noise.reshape(-1).expand(d))
    Z = X * w
    # Gamma' = blockdiag_j(P_j) in the eigenbasis, P_j = Z diag(D_j) Z^T, plus the coupling -E_off (.) Phi.
    P = (D.unsqueeze(1) * Z.unsqueeze(0)) @ Z.T  # j, l, m
    eye = torch.eye(n, dtype=X.dtype, device=X.device)
    G4 = P.unsqueeze(2) * eye.reshape(n, 1, n, 1)  # (j, l, k, m) = delta_jk P_j[l, m]
    if E_off.requires_grad:
        Phi = _block_coupling(D.detach(), Z.detach(), (s * w).detach()).reshape(n, n, n, n)  # j, k, l, m
        G4 = G4 - (E_off.reshape(n, n, 1, 1) * Phi).permute(0, 2, 1, 3)
    Gamma = _rotate_pairs(G4.reshape(n * n, n * n), Q)
    return w, s, E, Q, D, logdet_B, E_off, Z, Gamma


def _core(E: Tensor, s: Tensor, Gamma: Tensor) -> Tensor:
    """``T = I - s C Gamma`` (`n^2 x n^2`), ``C`` applied to every column of ``Gamma`` in `O(n^4)`."""
    n = E.shape[0]
    C_Gamma = _core_map(E, Gamma.T.reshape(n * n, n, n)).reshape(n * n, n * n).T
    return torch.eye(n * n, dtype=E.dtype, device=E.device) - s * C_Gamma


def _schur(E: Tensor, s: Tensor, value_noise: Tensor, F_Gamma_T_F: Tensor) -> Tensor:
    """Cholesky factor of ``S = s E + sigma_v^2 I - s^2 F^T Gamma T^-1 F``."""
    eye = torch.eye(E.shape[0], dtype=E.dtype, device=E.device)
    S = s * E + value_noise * eye - (s * s) * F_Gamma_T_F
    return _cholesky(0.5 * (S + S.T), "Schur complement of the values")


def ard_structured_nll(
    X: Tensor, lengthscale: Tensor, outputscale: Tensor, value_noise: Tensor, grad_noise: Tensor, resid: Tensor
) -> Tensor:
    """Differentiable negative log marginal likelihood, ARD lengthscales and per-dimension noise (module docstring).

    Args:
        X: `n x d` inputs (data: no gradient flows to them).
        lengthscale: `d` (or `1`) lengthscales.
        outputscale: output scale ``s`` (one element).
        value_noise: value-noise variance (one element).
        grad_noise: `d` (or `1`) derivative-noise variances.
        resid: `N = n (1 + d)` targets minus prior mean, block layout.

    Returns:
        Scalar tensor; autograd gives its gradient with respect to every argument but ``X``.
    """
    X = X.detach() - X.detach().mean(0)  # differences only: centring helps the rounding
    n, d = X.shape
    w, s, E, Q, D, logdet_B, E_off, Z, Gamma = _parts(X, lengthscale, outputscale, grad_noise)
    sw = s * w
    r_f, R_g = resid[:n], resid[n:].reshape(n, d)
    V = D * (Q.T @ R_g)  # Q^T B^-1 R_g, diagonal part
    quad_B = (V * (Q.T @ R_g)).sum() - (E_off * ((V * sw) @ V.T).detach()).sum()
    psi = Q @ (V @ Z.T - (D * (E_off @ V.detach()) * sw.detach()) @ Z.detach().T)  # U^T B^-1 R_g
    C_psi = _core_map(E, psi)
    F = _cross_matrix(E)
    logdet_T, solved = _LogdetSolveLU.apply(_core(E, s, Gamma), torch.cat([s * C_psi.reshape(n * n, 1), F], -1))
    u = solved[:, 0]
    S_chol = _schur(E, s, value_noise.reshape(()), F.T @ (Gamma @ solved[:, 1:]))
    t = r_f - s * _cross_map_t(E, psi + (Gamma @ u).reshape(n, n))
    quad_S = torch.cholesky_solve(t.unsqueeze(-1), S_chol).squeeze(-1).dot(t)
    logdet = logdet_B + logdet_T + 2.0 * S_chol.diagonal().log().sum()
    return 0.5 * (quad_B + psi.reshape(-1).dot(u) + quad_S + logdet) + gaussian_constant(resid.shape[-1])


def ard_structured_factor(
    engine: Engine,
    kernel: Any,
    data: ObservedRows,
    noise: Tensor,
    resid: Tensor,
    params: tuple[Tensor, Tensor, Tensor, Tensor],
) -> ARDStructuredFactor:
    """The factor of :class:`ARDStructuredFactor` (no graph); ``params``: lengthscale, scale, value and grad noise."""
    with torch.no_grad():
        lengthscale, outputscale, value_noise, grad_noise = (p.detach() for p in params)
        centre = data.X.detach().mean(0)
        X = data.X.detach() - centre
        n = X.shape[0]
        w, s, E, Q, D, _, _, Z, Gamma = _parts(X, lengthscale, outputscale, grad_noise)
        T = _core(E, s, Gamma)
        LU, pivots = torch.linalg.lu_factor(T)
        F = _cross_matrix(E)
        C = _core_map(E, torch.eye(n * n, dtype=X.dtype, device=X.device).reshape(n * n, n, n))
        C = C.reshape(n * n, n * n).T
        T_inv_F = torch.linalg.lu_solve(LU, pivots, F)
        S_inv = torch.cholesky_inverse(_schur(E, s, value_noise.reshape(()), F.T @ (Gamma @ T_inv_F)))
        K_cf = -s * T_inv_F @ S_inv
        K_cc = s * torch.linalg.lu_solve(LU, pivots, C) + (s * s) * (T_inv_F @ S_inv @ T_inv_F.T)
        # In the eigenbasis of E: coefficients c = Q c' on the point index.
        K_cf = (Q.T @ K_cf.reshape(n, n * n)).reshape(n * n, n)  # rows (k, m): Q^T on k
        K_cc = _rotate_pairs(0.5 * (K_cc + K_cc.T), Q.T)
        K = torch.cat([torch.cat([S_inv, K_cf.T], -1), torch.cat([K_cf, K_cc], -1)])
        return ARDStructuredFactor(engine, kernel, data, noise, resid, X, centre, w, s, Q, D, K)


class ARDStructuredFactor(DirectPredictionFactor):
    """Prediction after an ARD structured fit: ``A^-1 = blockdiag(0, B^-1) + W K W^T`` (module docstring).

    Attributes:
        X: `n x d` centred training inputs; ``centre`` (`d`) is subtracted from test points too.
        w: `d` precisions ``1 / l_a^2``; ``s`` the output scale.
        Q: `n x n` eigenvectors of ``E``; ``D``: `n x d` inverse eigenvalues of the blocks ``B_a``.
        K: `(n + n^2) x (n + n^2)` core in the eigenbasis.
        alpha: `N` weights ``A^-1 r`` (block layout).
    """

    def __init__(
        self,
        engine: Engine,
        kernel: Any,
        data: ObservedRows,
        noise: Tensor,
        resid: Tensor,
        X: Tensor,
        centre: Tensor,
        w: Tensor,
        s: Tensor,
        Q: Tensor,
        D: Tensor,
        K: Tensor,
    ) -> None:
        super().__init__(engine, kernel, data, noise, resid)
        self.X, self.centre, self.w, self.s, self.Q, self.D, self.K = X, centre, w, s, Q, D, K
        self.alpha = self.solve(resid.detach())

    def _B_inv(self, V: Tensor) -> Tensor:
        """``B^-1 V`` for `n x d x t` gradient blocks: ``Q (D o Q^T V)`` per column."""
        n, d, t = V.shape
        rotated = (self.Q.T @ V.reshape(n, d * t)).reshape(n, d, t) * self.D.unsqueeze(-1)
        return (self.Q @ rotated.reshape(n, d * t)).reshape(n, d, t)

    def solve(self, rhs: Tensor) -> Tensor:
        """``A^-1 rhs`` for an `N` vector or `... x N x t` matrix in block layout, in `O(n^2 d t + n^4 t)`."""
        if rhs.dim() > 2:
            return fold_batch(self.solve, rhs)
        n, d = self.X.shape
        Z = self.X * self.w
        vector = rhs.ndim == 1
        rhs = rhs.unsqueeze(-1) if vector else rhs
        t = rhs.shape[-1]
        r_f, R_g = rhs[:n], rhs[n:].reshape(n, d, t)
        BR = self._B_inv(R_g)
        psi = (Z @ BR.permute(1, 0, 2).reshape(d, n * t)).reshape(n, n, t).transpose(0, 1)  # (B^-1 R_g) Z^T
        rotated = (self.Q.T @ psi.reshape(n, n * t)).reshape(n * n, t)
        k = self.K @ torch.cat([r_f, rotated])
        c = (self.Q @ k[n:].reshape(n, n * t)).reshape(n, n, t)  # back from the eigenbasis
        out_g = BR + self._B_inv((c.transpose(1, 2) @ Z).transpose(1, 2))  # + B^-1 (c Z)
        out = torch.cat([k[:n], out_g.reshape(n * d, t)])
        return out.squeeze(-1) if vector else out

    def predict(self, xs: Tensor, variance: bool = True) -> tuple[Tensor, Tensor | None]:
        """Posterior mean (zero prior mean) and variance of ``[f, grad f]`` at `m` test points.

        Args:
            xs: `m x d` test inputs (internal units, not centred).
            variance: also compute the variances (`O(m n^4 d)`; the mean alone is `O(m n d)`).

        Returns:
            ``(mean, variance)``, each `m (1 + d)` in block layout (``variance`` None if not asked for).
        """
        X, w, s = self.X, self.w, self.s
        n, d = X.shape
        xs = xs - self.centre
        alpha_f, alpha_g = self.alpha[:n], self.alpha[n:].reshape(n, d)
        xw = xs * w
        sq = (xw * xs).sum(-1).unsqueeze(-1) - 2.0 * xw @ X.T + (X * X * w).sum(-1)
        e = torch.exp(-0.5 * sq.clamp_min(0.0))  # m x n
        dots = xw @ alpha_g.T - (X * w * alpha_g).sum(-1)  # Delta_j . alpha_g,j
        q = e * (alpha_f + dots)
        mean_f = s * (e @ alpha_f + (e * dots).sum(-1))
        mean_g = s * w * (e @ alpha_g - xs * q.sum(-1, keepdim=True) + q @ X)
        mean = torch.cat([mean_f, mean_g.reshape(-1)])
        if not variance:
            return mean, None
        parts = [self._variance(xs[i], e[i]) for i in range(xs.shape[0])]
        var_f = torch.stack([p[0] for p in parts]) if parts else xs.new_zeros(0)
        var_g = torch.stack([p[1] for p in parts]) if parts else xs.new_zeros(0, d)
        return mean, torch.cat([var_f, var_g.reshape(-1)])

    def _variance(self, x: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
        """Value variance and `d` gradient variances at one centred test point ``x`` (module docstring)."""
        X, w, s, Q, D, K = self.X, self.w, self.s, self.Q, self.D, self.K
        n, d = X.shape
        Z = X * w
        Delta = (x - X) * w  # n x d
        q = Q.T @ e
        # Xi[i, j, l] = sum_b D_ib Delta_jb Z_lb and Xi2[i, j, k] = sum_b D_ib Delta_jb Delta_kb, one product.
        both = ((D.unsqueeze(1) * Delta.unsqueeze(0)).reshape(n * n, d) @ torch.cat([Z, Delta]).T).reshape(n, n, 2 * n)
        G = Q.T.unsqueeze(-1) * both[..., :n]  # G[i, j, l] = Q_ji Xi[i, j, l]
        Omega = torch.einsum("ji,ki,ijk->jk", Q, Q, both[..., n:])
        # Values: K_g = s e o Delta; y = [s e; s sum_j e_j G[:, j, :]].
        v = e.unsqueeze(-1) * Delta  # n x d, column a: v_a = e o delta_a
        y0 = torch.cat([s * e, s * torch.einsum("j,ijl->il", e, G).reshape(-1)])
        var_f = s - (s * s) * (D * (Q.T @ v).square()).sum() - y0.dot(K @ y0)
        # Gradients: one column per dimension a.
        first = (s * w) * D * q.unsqueeze(-1)  # n x d: s w_a D_ia q_i
        second = (first.unsqueeze(1) * Z.unsqueeze(0)).reshape(n * n, d)  # (i, l), a
        second = second - s * (G.permute(1, 0, 2).reshape(n, n * n).T @ v)
        Y = torch.cat([-s * v, second])
        quad_K = (Y * (K @ Y)).sum(0)
        quad_B = (s * s) * (
            w.square() * (D * q.square().unsqueeze(-1)).sum(0)
            - 2.0 * w * (D * q.unsqueeze(-1) * (Q.T @ (v * Delta))).sum(0)
            + (v * (Omega @ v)).sum(0)
        )
        return var_f, s * w - quad_B - quad_K
