"""Base class of every derivative-aware GPyTorch kernel: layouts, flags, composition guards."""

from __future__ import annotations

from typing import Any

import torch
from gpytorch import settings
from gpytorch.kernels import Kernel
from torch import Tensor

from gpderiv.blocks import interleave_index

__all__ = ["BaseDerivativeKernel"]

_LAYOUTS = ("block", "interleaved")


class BaseDerivativeKernel(Kernel):
    """A kernel that returns the joint covariance of values and gradients, ``[[K, K_fg], [K_gf, K_gg]]``.

    Subclasses supply the block-layout matrix (:meth:`_blocks`), its diagonal (:meth:`_diag`)
    and covariances of second derivatives (:meth:`functional_covariance`); the layouts, the
    ``grad1``/``grad2`` flags, GPyTorch's lazy evaluation and the refusal of products live here.

    Args:
        layout: ``"block"`` (default) orders the rows ``[f(x_1..x_n), grad f(x_1), ...,
            grad f(x_n)]``; ``"interleaved"`` orders them ``[f, d_1 f, ..., d_d f]`` per point,
            exactly like GPyTorch's ``RBFKernelGrad`` (:ref:`layouts`).
        **kwargs: passed to :class:`gpytorch.kernels.Kernel`.
    """

    #: Highest order of derivative observations the family supports (mean-square differentiability).
    max_derivative_order = 2

    def __init__(self, layout: str = "block", **kwargs: Any) -> None:
        if layout not in _LAYOUTS:
            raise ValueError(f"layout: expected one of {_LAYOUTS}, got {layout!r}")
        super().__init__(**kwargs)
        self.layout = layout

    def _blocks(self, x1: Tensor, x2: Tensor, grad1: bool, grad2: bool) -> Tensor:
        """Block-layout covariance (see :meth:`forward`)."""
        raise NotImplementedError

    def _diag(self, x1: Tensor, x2: Tensor) -> Tensor:
        """Block-layout diagonal for ``n1 == n2``."""
        raise NotImplementedError

    def forward(
        self,
        x1: Tensor,
        x2: Tensor,
        diag: bool = False,
        last_dim_is_batch: bool = False,
        *,
        grad1: bool = True,
        grad2: bool = True,
        **params: Any,
    ) -> Tensor:
        """Covariance of ``[f(x1), grad f(x1)]`` with ``[f(x2), grad f(x2)]``.

        Args:
            x1: `... x n1 x d` inputs.
            x2: `... x n2 x d` inputs.
            diag: return only the diagonal (requires ``n1 == n2``); the full matrix is not built.
            last_dim_is_batch: not supported (deprecated in GPyTorch).
            grad1: include the gradient rows of ``x1``; ``False`` gives value rows only.
            grad2: include the gradient columns of ``x2``.
            **params: ignored (GPyTorch passes kernel options through).

        Returns:
            `... x n1 (d + 1) x n2 (d + 1)` covariance (fewer rows/columns when ``grad1`` or
            ``grad2`` is ``False``), or its `... x n1 (d + 1)` diagonal.
        """
        if last_dim_is_batch:
            raise ValueError("last_dim_is_batch: not supported by derivative kernels (got True)")
        n1, d = x1.shape[-2:]
        n2 = x2.shape[-2]
        if diag:
            if n1 != n2:
                raise ValueError(f"diag=True: expected x1 and x2 with the same number of points, got {n1} and {n2}")
            if not (grad1 and grad2):
                raise ValueError("diag=True: expected grad1=True and grad2=True (a diagonal needs square blocks)")
            res = self._diag(x1, x2)
            return res[..., interleave_index(n1, d, x1.device)] if self.layout == "interleaved" else res
        res = self._blocks(x1, x2, grad1, grad2)
        if self.layout == "interleaved":
            if grad1:
                res = res[..., interleave_index(n1, d, x1.device), :]
            if grad2:
                res = res[..., interleave_index(n2, d, x2.device)]
        return res

    def __call__(self, x1: Tensor, x2: Tensor | None = None, diag: bool = False, **params: Any) -> Any:
        """Evaluate as GPyTorch does; eagerly when ``grad1`` or ``grad2`` is False.

        GPyTorch's lazy kernel tensor predicts its shape from :meth:`num_outputs_per_input`,
        which cannot see these flags. Wrappers (``ScaleKernel``, sums) forward the flags to
        :meth:`forward` too, but must then be evaluated under
        ``gpytorch.settings.lazily_evaluate_kernels(False)``, as :class:`~gpderiv.DerivativeGP` does.
        """
        if params.get("grad1", True) and params.get("grad2", True):
            return super().__call__(x1, x2, diag=diag, **params)
        with settings.lazily_evaluate_kernels(False):
            return super().__call__(x1, x2, diag=diag, **params)

    def functional_covariance(
        self, x1: Tensor, x2: Tensor, idx1: Tensor, idx2: Tensor, *, pairwise: bool = True
    ) -> Tensor:
        """Covariance of derivatives of order up to 2 per side (see :mod:`gpderiv.blocks.functionals`).

        Args:
            x1: `R1 x d` point of each row functional.
            x2: `R2 x d` point of each column functional.
            idx1: `R1 x 2` derivative indices of each row (-1 = none, present first).
            idx2: `R2 x 2` derivative indices of each column.
            pairwise: `R1 x R2` matrix, or the `R` vector of row ``r`` with column ``r``.

        Raises:
            ValueError: for a batched kernel, or derivatives beyond :attr:`max_derivative_order`.
        """
        if self.batch_shape != torch.Size([]):
            raise ValueError(f"batch_shape: derivative functionals need an unbatched kernel, got {self.batch_shape}")
        order = max(_max_order(idx1), _max_order(idx2))
        if order > self.max_derivative_order:
            raise ValueError(
                f"{type(self).__name__} is only {self.max_derivative_order} time(s) mean-square differentiable: "
                f"expected derivative observations of order <= {self.max_derivative_order}, got order {order}"
            )
        return self._functional_covariance(x1, x2, idx1, idx2, pairwise)

    def _functional_covariance(self, x1: Tensor, x2: Tensor, idx1: Tensor, idx2: Tensor, pairwise: bool) -> Tensor:
        raise NotImplementedError

    def __mul__(self, other: Any) -> Kernel:
        raise TypeError(
            "A product of derivative kernels is not well defined (the derivative of a product is not the product of "
            "the derivatives). Multiply the plain GPyTorch kernels and wrap the product in "
            "gpderiv.kernels.DerivativeKernel, or use ScaleKernel for a constant factor."
        )

    def num_outputs_per_input(self, x1: Tensor, x2: Tensor) -> int:
        """Each input point carries its value and ``d`` partial derivatives."""
        return x1.size(-1) + 1


def _max_order(idx: Tensor) -> int:
    """Highest derivative order among `R x 2` derivative indices (0 when empty)."""
    orders = (idx >= 0).sum(-1)
    return int(orders.max()) if orders.numel() else 0
