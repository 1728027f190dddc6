r"""Local posterior variances: each test point conditioned on the observations at its nearest training points.

For a test point :math:`x_*` and the observed rows :math:`L` at its ``neighbours`` nearest
training points (Euclidean distance of the inputs divided by the lengthscales),

.. math:: \operatorname{var} = k_{**} - k_{*L} (K_{LL} + \Sigma_L)^{-1} k_{L*},

by a dense Cholesky of the `|L| x |L|` system (at most ``neighbours (1 + d)`` rows). Conditioning
on fewer data never lowers a posterior variance, so these are upper bounds on the full-data
variances, equal to them when ``neighbours >= n`` and tight when the covariance decays within the
neighbourhood. The cost per test point does not depend on n: the variances of large data sets,
whose exact variances with the iterative engine need a CG solve per test point.
"""

from __future__ import annotations

import torch
from gpytorch.kernels import Kernel
from scipy.spatial import cKDTree
from torch import Tensor

from gpderiv.inference.base import require_memory
from gpderiv.inference.dense import DenseCholesky
from gpderiv.observed_rows import ObservedRows, split_scale
from gpderiv.prediction import join_blocks

__all__ = ["local_variance"]


def local_variance(
    kernel: Kernel, data: ObservedRows, noise: Tensor, resid: Tensor, xs: Tensor, neighbours: int
) -> Tensor:
    """Block-layout variances of ``[f, grad f](xs)`` given the observations at nearby points only.

    Args:
        kernel: the model's kernel (internal units).
        data: the `N` training rows.
        noise: `N` noise variances.
        resid: `N` residuals.
        xs: `m x d` internal test inputs, ``m >= 1``.
        neighbours: training points per test point (all of them when ``>= n``).

    Returns:
        `m (1 + d)` variances (internal units).

    Raises:
        ValueError: ``neighbours`` is not a positive integer.
        ProblemTooLargeError: the neighbourhoods' dense systems do not fit in memory.
    """
    if isinstance(neighbours, bool) or not isinstance(neighbours, int) or neighbours < 1:
        raise ValueError(f"neighbours: expected a positive integer, got {neighbours!r}")
    m, d = xs.shape
    k = min(neighbours, data.n)
    # Refuse, before allocating, neighbourhoods whose dense systems do not fit (k = 1600 points
    # with 10 partials each, 17,600 rows, peaked at 19 GiB).
    rows = k * (1 + d)
    what = f"neighbours: {neighbours} are too many for local variances. The dense engine, for N = {rows} rows,"
    engine = DenseCholesky()
    require_memory(engine.memory_for_rows(rows, xs.dtype), xs.device, what, "Use fewer neighbours.")
    scale = _lengthscale(kernel, d, xs)
    tree = cKDTree((data.X / scale).detach().cpu().numpy())
    _, nearest = tree.query((xs / scale).detach().cpu().numpy(), k=k)
    nearest = torch.as_tensor(nearest, device=xs.device).reshape(m, k)
    variances = []
    for i in range(m):  # one dense system per test point: O(k^3 d^3), independent of n
        sub, index = data.subset(nearest[i])
        factor = engine.factor(kernel, sub, noise[index], resid[index])
        variances.append(factor.posterior(ObservedRows.block(xs[i : i + 1]), "var")[1])
    return join_blocks(tuple(variances), d)


def _lengthscale(kernel: Kernel, d: int, like: Tensor) -> Tensor:
    """Lengthscales of the kernel (scalar or `d`) for neighbour distances, 1 where it has none."""
    base = split_scale(kernel)[0]
    lengthscale = getattr(base, "lengthscale", None) if base.has_lengthscale else None
    if lengthscale is None or lengthscale.numel() not in (1, d):
        return torch.ones((), dtype=like.dtype, device=like.device)
    return lengthscale.detach().reshape(-1)
