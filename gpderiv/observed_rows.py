r"""The observed rows of a GP with derivative observations, and their covariances.

An :class:`ObservedRows` is what every inference engine receives as training data: inputs in
the model's internal units and, for each observed row, which linear functional of f it is.
Rows come in two parts (see :mod:`gpderiv.observations`):

- *standard* rows, values and partial derivatives: a selection ``rows`` from the block vector
  ``[f(x_1..x_n), grad f(x_1), ..., grad f(x_n)]`` (or from ``[f(x_1..x_n)]`` for value-only
  data), whose covariance comes from the kernel's fast block path;
- *extra* rows, directional derivatives and Hessian entries, as :class:`Functionals`, whose
  covariance comes from :func:`~gpderiv.observations.functional_cov`.

The covariance of two row sets is assembled in one place, :meth:`ObservedRows.covariance`:

.. math::

    \operatorname{cov}(\text{rows}_1, \text{rows}_2) = \begin{bmatrix}
        K_{S_1 S_2} & K_{S_1 E_2} \\ K_{E_1 S_2} & K_{E_1 E_2} \end{bmatrix},

with :math:`S` the standard and :math:`E` the extra rows. Test points are row sets too
(:meth:`ObservedRows.block` for ``[f, grad f]`` at test points, :meth:`ObservedRows.functionals`
for derivative functionals there), so training, prediction and local variances share this code.

The output scale of a top-level ``ScaleKernel`` is split off (``(K, s)`` with covariance ``s K``):
engines fuse it into work they do anyway instead of a separate pass over an `N x N` matrix.
"""

from __future__ import annotations

import gpytorch
import torch
from gpytorch.kernels import Kernel, ScaleKernel
from torch import Tensor

from gpderiv.blocks import interleave_index
from gpderiv.kernels.composition import derivative_leaves
from gpderiv.observations import DIRECTIONAL, HESSIAN, Functionals, ObservationSet, functional_cov
from gpderiv.scaling import Scaling, scale_limits

__all__ = ["ObservedRows", "block_kernel", "deinterleave_index", "split_scale"]


def split_scale(kernel: Kernel) -> tuple[Kernel, Tensor | None]:
    """``(base, s)`` with ``kernel = s * base``; ``s`` is None without a top-level ``ScaleKernel``."""
    if isinstance(kernel, ScaleKernel) and kernel.active_dims is None:
        return kernel.base_kernel, kernel.outputscale
    return kernel, None


class ObservedRows(torch.nn.Module):
    """Internal-unit inputs and the functional of every observed row (buffers: ``.to(device)`` moves them).

    Args:
        X: `n x d` inputs (internal units).
        has_grad: whether the standard block vector holds gradients (``n (1 + d)`` rows) or only
            values (``n`` rows).
        rows: `N_std` indices of the observed standard rows in that block vector (increasing for
            training data; test rows may take any order, e.g. GPyTorch's interleaved one).
        std_idx: `N_std x 2` derivative indices of the standard rows (``[-1, -1]`` value, ``[a, -1]``).
        std_point: `N_std` point of each standard row.
        extra: the extra rows (directional, Hessian), or None.
        kinds: `N` kind of every row (0 value, ``1 + a`` partial ``a``, ``d + 1`` directional,
            ``d + 2`` Hessian entry), or None for a test row set.
        targets: `N` observed numbers (internal units), or None for a test row set.
        row_factor: `N` user value = ``row_factor * internal + offset``, or None.
        noise_ratio: `N` factor of each row's noise variance relative to its group's, or None.
    """

    def __init__(
        self,
        X: Tensor,
        has_grad: bool,
        rows: Tensor,
        std_idx: Tensor,
        std_point: Tensor,
        extra: Functionals | None = None,
        kinds: Tensor | None = None,
        targets: Tensor | None = None,
        row_factor: Tensor | None = None,
        noise_ratio: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.n, self.d = X.shape[-2:]
        self.has_grad = has_grad
        size = self.n * (1 + self.d) if has_grad else self.n
        # Whether the rows are the whole block vector in order: covariances then need no gather.
        self.complete = rows.numel() == size and bool((rows == torch.arange(size, device=rows.device)).all())
        for name, value in (
            ("X", X),
            ("rows", rows),
            ("std_idx", std_idx),
            ("std_point", std_point),
            ("extra_point", None if extra is None else extra.point),
            ("extra_idx", None if extra is None else extra.idx),
            ("extra_coef", None if extra is None else extra.coef),
            ("kinds", kinds),
            ("targets", targets),
            ("row_factor", row_factor),
            ("noise_ratio", noise_ratio),
        ):
            self.register_buffer(name, value)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_observations(cls, X: Tensor, obs: ObservationSet, scaling: Scaling) -> ObservedRows:
        """The training rows in internal units.

        A row's user value is ``row_factor * internal + offset``. Noise variances are one per
        group (kind) in internal units; for directional and Hessian rows, whose factors differ
        within a group, ``noise_ratio`` rescales the group variance so that the noise is the
        same for every row of the group in the user's units (the group's reference factor is the
        geometric mean of its rows' factors).

        Args:
            X: `n x d` inputs (internal units).
            obs: the observations (user units).
            scaling: the map between user and internal units.
        """
        n_std = obs.num_standard
        kinds_std = obs.kinds[:n_std]
        targets = [scaling.to_internal(obs.targets[:n_std], kinds_std)]
        factors = [scaling.factor(kinds_std)]
        ratios = [torch.ones_like(factors[0])]
        standard = obs.standard_functionals(X.dtype)
        extra = None
        if obs.extra is not None:
            extra, factor = scaling.functionals_to_internal(obs.extra)
            kinds = obs.kinds[n_std:]
            targets.append(obs.targets[n_std:] / factor)
            factors.append(factor)
            ratio = torch.empty_like(factor)
            for group in (DIRECTIONAL, HESSIAN):
                rows = kinds == obs.d + group
                if rows.any():
                    reference = factor[rows].log().mean().exp()
                    ratio[rows] = (reference / factor[rows]).square()
            ratios.append(ratio)
        _check_internal_targets(torch.cat(targets), obs)
        return cls(
            X,
            obs.has_grad,
            obs.rows,
            standard.idx[:, 0],
            standard.point,
            extra,
            kinds=obs.kinds,
            targets=torch.cat(targets),
            row_factor=torch.cat(factors),
            noise_ratio=torch.cat(ratios),
        )

    @classmethod
    def block(cls, xs: Tensor) -> ObservedRows:
        """The rows ``[f(xs), grad f(xs)]`` of `... x m` test points (block layout, every row)."""
        m, d = xs.shape[-2:]
        F = Functionals.block(m, d, xs.device, xs.dtype)
        return cls(xs, True, torch.arange(m * (1 + d), device=xs.device), F.idx[:, 0], F.point)

    @classmethod
    def functionals(cls, xs: Tensor, F: Functionals) -> ObservedRows:
        """Derivative functionals ``F`` (internal coefficients) at test points ``xs``."""
        empty = torch.zeros(0, dtype=torch.long, device=xs.device)
        return cls(xs, False, empty, empty.reshape(0, 2), empty, F)

    # ------------------------------------------------------------------ structure
    @property
    def extra(self) -> Functionals | None:
        """The directional and Hessian rows, or None."""
        return None if self.extra_point is None else Functionals(self.extra_point, self.extra_idx, self.extra_coef)

    @property
    def standard(self) -> Functionals:
        """The standard rows as elementary functionals."""
        return Functionals.elementary(self.std_point, self.std_idx, self.X.dtype)

    @property
    def batch_shape(self) -> torch.Size:
        """Leading batch dimensions of the inputs (the rows are the same for every batch member)."""
        return self.X.shape[:-2]

    @property
    def num_rows(self) -> int:
        """Number of rows ``N`` (standard and extra)."""
        extra = 0 if self.extra_point is None else self.extra_point.numel()
        return self.rows.numel() + extra

    @property
    def values_and_gradients(self) -> bool:
        """Exactly every value and every partial derivative observed, nothing else (the fast engines' scope)."""
        return self.has_grad and self.complete and self.extra_point is None

    def subset(self, points: Tensor) -> tuple[ObservedRows, Tensor]:
        """The rows at a subset of the points (subset-of-data fits, local variances).

        Args:
            points: `s` distinct point indices.

        Returns:
            ``(rows, index)``: the row set of the points in increasing order, and the `N_s`
            positions of its rows among this set's rows (to select targets and noise).
        """
        points = points.sort().values
        s, d = points.numel(), self.d
        position = torch.full((self.n,), -1, dtype=torch.long, device=points.device)
        position[points] = torch.arange(s, device=points.device)
        std_position = position[self.std_point]
        keep = std_position >= 0
        first = self.std_idx[:, 0]
        block = torch.where(first < 0, std_position, s + std_position * d + first) if self.has_grad else std_position
        index = [torch.nonzero(keep).flatten()]
        extra = self.extra
        if extra is not None:
            extra_position = position[extra.point]
            keep_extra = extra_position >= 0
            index.append(self.rows.numel() + torch.nonzero(keep_extra).flatten())
            extra = Functionals(extra_position[keep_extra], extra.idx[keep_extra], extra.coef[keep_extra])
            extra = extra if len(extra) else None
        index = torch.cat(index)

        def take(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[index]

        sub = ObservedRows(
            self.X[..., points, :],
            self.has_grad,
            block[keep],
            self.std_idx[keep],
            std_position[keep],
            extra,
            kinds=take(self.kinds),
            targets=take(self.targets),
            row_factor=take(self.row_factor),
            noise_ratio=take(self.noise_ratio),
        )
        return sub, index

    # ------------------------------------------------------------------ covariances
    def covariance(self, kernel: Kernel, other: ObservedRows | None = None) -> tuple[Tensor, Tensor | None]:
        """``(K, s)``: the noiseless covariance of these rows with ``other``'s (default: themselves) is ``s K``.

        Args:
            kernel: a derivative kernel in block layout (or sums and ScaleKernels of them).
            other: the column rows (default ``self``: the `N x N` training covariance).

        Returns:
            `N1 x N2` matrix ``K`` and the split-off output scale ``s`` (None if there is none).
        """
        symmetric = other is None
        other = self if other is None else other
        base, scale = split_scale(kernel)
        K = self._standard_covariance(base, other)
        extra1, extra2 = self.extra, other.extra
        if extra1 is None and extra2 is None:
            return K, scale
        blocks = [[K]]
        if extra2 is not None:
            blocks[0].append(_functional_cov(base, self.X, self.standard, other.X, extra2))
        if extra1 is not None:
            if symmetric:
                row = [blocks[0][1].transpose(-1, -2)]
            else:
                row = [_functional_cov(base, self.X, extra1, other.X, other.standard)]
            if extra2 is not None:
                row.append(_functional_cov(base, self.X, extra1, other.X, extra2))
            blocks.append(row)
        return torch.cat([torch.cat(row, -1) for row in blocks], -2), scale

    def scaled_covariance(self, kernel: Kernel, other: ObservedRows | None = None) -> Tensor:
        """The covariance ``s K`` itself (``covariance`` with the output scale applied per batch member)."""
        K, scale = self.covariance(kernel, other)
        return K if scale is None else scale.reshape(*scale.shape, 1, 1) * K

    def _standard_covariance(self, kernel: Kernel, other: ObservedRows) -> Tensor:
        """Covariance of the standard rows through the kernel's block path (gathers only where rows are missing)."""
        if self.rows.numel() == 0 or other.rows.numel() == 0:
            batch = torch.broadcast_shapes(self.batch_shape, other.batch_shape)
            return self.X.new_zeros(*batch, self.rows.numel(), other.rows.numel())
        batch = torch.broadcast_shapes(self.batch_shape, other.batch_shape)
        X1, X2 = self.X.expand(*batch, -1, -1), other.X.expand(*batch, -1, -1)
        K = block_kernel(kernel, X1, X2, self.has_grad, other.has_grad)
        if not self.complete:
            K = K[..., self.rows, :]
        if not other.complete:
            K = K[..., other.rows]
        return K

    def prior_variance(self, kernel: Kernel) -> Tensor:
        """`N` prior variances of the rows (the diagonal of ``covariance``, without forming it; scale included)."""
        parts = []
        if self.rows.numel():
            diagonal = block_kernel(kernel, self.X, self.X, diag=True)
            diagonal = diagonal if self.has_grad else diagonal[..., : self.n]
            parts.append(diagonal if self.complete else diagonal[..., self.rows])
        extra = self.extra
        if extra is not None:
            parts.append(_functional_cov(kernel, self.X, extra, self.X, extra, pairwise=False))
        return torch.cat(parts) if parts else self.X.new_zeros(0)

    def white_variance(self, per_kind: Tensor) -> Tensor:
        r"""`N` variances of the rows under white noise of variance ``per_kind[k]`` on each derivative of kind k.

        A row :math:`\sum_k c_k \partial^{\alpha_k} f` gets :math:`\sum_k c_k^2 \, \mathrm{per\_kind}[\alpha_k]`
        (independent errors of the elementary derivatives); kinds as ``kinds``: 0 value, ``1 + a``
        partial ``a``, ``d + 2`` any second derivative.

        Args:
            per_kind: `d + 3` variances.
        """
        d, parts = self.d, []
        for F in (self.standard, self.extra):
            if F is None or not len(F):
                continue
            first, second = F.idx[..., 0], F.idx[..., 1]
            kinds = torch.where(first < 0, 0, torch.where(second < 0, 1 + first, d + 2))
            parts.append((F.coef.square() * per_kind.to(F.coef)[kinds]).sum(-1))
        return torch.cat(parts) if parts else self.X.new_zeros(0)


def _check_internal_targets(targets: Tensor, obs: ObservationSet) -> None:
    """Refuse observations that are not representable (with a squared margin) in internal units.

    Values are standardised, so only derivatives can be far from 1 internally: a derivative
    times its input range can exceed the scale of the values by more than float64 holds (e.g.
    gradients of 1e300 over an input range of 1e300 with values of order 1, internally 1e600).

    Raises:
        ValueError: naming ``grad``, ``directional`` or ``hessian``, with the largest internal magnitude.
    """
    _, high = scale_limits(targets.dtype)
    bad = ~(targets.abs() <= high)
    if not bool(bad.any()):
        return
    kind = int(obs.kinds[bad][0])
    names = {0: "y", obs.d + DIRECTIONAL: "directional", obs.d + HESSIAN: "hessian"}
    name = names.get(kind, "grad")
    raise ValueError(
        f"{name}: observed derivatives times the input ranges exceed the scale of y by more than {high:.2g} "
        f"(internally {float(targets[bad].abs().max()):.3g}), which {targets.dtype} cannot hold in a covariance; "
        "the derivatives are inconsistent with the values' scale, or the data need rescaling"
    )


def block_kernel(
    kernel: Kernel, x1: Tensor, x2: Tensor, grad1: bool = True, grad2: bool = True, diag: bool = False
) -> Tensor:
    """The kernel's covariance of ``[f, grad f](x1)`` with ``[f, grad f](x2)`` in block layout, whatever its layout.

    A kernel in GPyTorch's interleaved layout (the BoTorch model's) is reordered here, the one
    place where layouts meet the engines (:ref:`layouts`).

    Args:
        kernel: a derivative kernel, or sums and ScaleKernels of them (one layout throughout).
        x1: `... x n1 x d` inputs.
        x2: `... x n2 x d` inputs.
        grad1: include the gradient rows of ``x1``.
        grad2: include the gradient columns of ``x2``.
        diag: the `... x n1 (1 + d)` diagonal instead (``x1`` is ``x2``, both grads).
    """
    with gpytorch.settings.lazily_evaluate_kernels(False):
        K = kernel(x1, diag=True) if diag else kernel(x1, x2, grad1=grad1, grad2=grad2).to_dense()
    if _layout(kernel) == "block":
        return K
    d = x1.shape[-1]
    if diag:
        return K[..., deinterleave_index(x1.shape[-2], d, x1.device)]
    if grad1:
        K = K[..., deinterleave_index(x1.shape[-2], d, x1.device), :]
    if grad2:
        K = K[..., deinterleave_index(x2.shape[-2], d, x2.device)]
    return K


def deinterleave_index(n: int, d: int, device: torch.device) -> Tensor:
    """Index that reorders an interleaved axis (``[f, d_1 f, ..., d_d f]`` per point) into block layout."""
    return torch.argsort(interleave_index(n, d, device))


def _layout(kernel: Kernel) -> str:
    leaves = derivative_leaves(kernel)
    return leaves[0].layout if leaves else "block"


def _functional_cov(
    kernel: Kernel, X1: Tensor, F1: Functionals, X2: Tensor, F2: Functionals, pairwise: bool = True
) -> Tensor:
    """:func:`functional_cov` that allows empty row sets."""
    if len(F1) == 0 or len(F2) == 0:
        return X1.new_zeros(len(F1), len(F2)) if pairwise else X1.new_zeros(0)
    return functional_cov(kernel, X1, F1, X2, F2, pairwise=pairwise)
