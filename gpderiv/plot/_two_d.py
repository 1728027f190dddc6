"""2-D plots: posterior mean with its gradient field and posterior std of a model; maps of gridded values."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from gpderiv.plot._common import (
    DIVERGING,
    LEGEND_SIZE,
    OBSERVED,
    OBSERVED_GRAD,
    PREDICTED_GRAD,
    SEQUENTIAL,
    UNCERTAINTY,
    arrow_handle,
    centred_norm,
    check_label,
    check_model,
    colorbar,
    colormap,
    describe,
    extend_for,
    padded_range,
    point_handle,
    predict,
    to_numpy,
    training_data,
)

if TYPE_CHECKING:
    from gpderiv.model import DerivativeGP

Truth = Callable[[torch.Tensor], Any]
#: Widest ratio of the two ranges at which a 2-D panel keeps equal scales on both axes.
_EQUAL_ASPECT_MAX_RATIO = 5.0


def plot_2d(
    model: DerivativeGP,
    *,
    bounds: Any = None,
    resolution: int = 50,
    truth: Truth | None = None,
    axes: Axes | Sequence[Axes] | np.ndarray | None = None,
    arrows: int = 20,
    levels: int | Sequence[float] = 20,
    std_levels: int | Sequence[float] = 10,
    arrow_scale: float | None = None,
    label: str = "f",
    xlabel: str = "$x_1$",
    ylabel: str = "$x_2$",
) -> Figure:
    """Posterior mean of a 2-D model with its gradient field and the data, and its posterior std.

    The mean panel shows the posterior mean as filled contours, the predicted gradient
    ``E[grad f]`` as white arrows on an ``arrows x arrows`` grid of cell centres, the observed
    gradients as red arrows at the training points where both components are observed, and the
    training inputs as black dots. Arrows are drawn in data coordinates (an arrow points along the
    gradient when both axes have the same scale) and all arrows of one plot share one scale. The
    std panel shows the posterior standard deviation of f (sequential colours from 0) with the
    training inputs. Both panels keep equal scales on both axes unless their ranges differ by more
    than a factor of 5.

    Args:
        model: a fitted :class:`~gpderiv.DerivativeGP` on two input dimensions.
        bounds: `2 x 2` ``[[lo_1, lo_2], [hi_1, hi_2]]`` (lower bounds, then upper bounds, as in
            BoTorch); default the bounding box of the training inputs.
        resolution: grid points per dimension of the contour plots.
        truth: the true f, drawn as dashed contour lines at the mean's levels: a callable mapping
            `k x 2` float64 torch inputs to `k` values.
        axes: where to draw: one Axes (the mean panel only) or two (mean, then std); default a new
            figure with both panels side by side.
        arrows: arrows per dimension of the predicted gradient field (0: none).
        levels: number of contour levels of the mean, or the levels themselves (give the same
            levels to several plots to share their colour scale).
        std_levels: number of contour levels of the std (from 0), or the levels themselves.
        arrow_scale: gradient magnitude drawn as an arrow one data unit long (give the same value
            to several plots to compare their arrows); default: the longest arrow is about one
            cell of the arrow grid long.
        label: the quantity f, with its units, for the colour bars (``"elevation [m]"``).
        xlabel: label of the first input, with units.
        ylabel: label of the second input, with units.

    Returns:
        The figure holding the panels.

    Raises:
        TypeError: ``model`` is not a DerivativeGP, or a label is not a non-empty string.
        ValueError: ``model`` is not 2-D, or ``bounds``, ``resolution``, ``arrows``, ``axes``,
            ``arrow_scale`` or ``truth`` are invalid.
    """
    check_model(model, 2, "plot_2d")
    for name, text in (("label", label), ("xlabel", xlabel), ("ylabel", ylabel)):
        check_label(name, text)
    X, _, grad = training_data(model)
    lo, hi = _bounds_2d(bounds, X)
    for name, value, least in (("resolution", resolution, 2), ("arrows", arrows, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name}: expected an integer >= {least}, got {value!r}")
    if arrow_scale is not None and not (isinstance(arrow_scale, (int, float)) and 0 < arrow_scale < math.inf):
        raise ValueError(f"arrow_scale: expected a positive number, got {arrow_scale!r}")
    ax, ax_std = _panels(axes)
    fig = ax.figure

    u = np.linspace(lo[0], hi[0], resolution)
    v = np.linspace(lo[1], hi[1], resolution)
    U, V = np.meshgrid(u, v)  # rows follow x2, as contourf expects
    grid = np.stack([U.ravel(), V.ravel()], -1)
    pred = predict(model, grid)
    mean = pred["mean"].reshape(U.shape)
    extend = "neither" if isinstance(levels, int) else extend_for(mean, min(levels), max(levels))
    filled = ax.contourf(U, V, mean, levels=levels, cmap=SEQUENTIAL, extend=extend, zorder=0)
    colorbar(filled, ax, f"posterior mean of {label}")
    handles: list[Line2D] = []
    if truth is not None:
        values = to_numpy(truth(torch.as_tensor(grid, dtype=torch.float64)))
        if values.size != grid.shape[0]:
            raise ValueError(
                f"truth: expected {grid.shape[0]} values for {grid.shape[0]} inputs of shape (k, 2), "
                f"got shape {values.shape}"
            )
        truth_grid = values.reshape(U.shape)
        ax.contour(U, V, truth_grid, levels=filled.levels, colors="k", linewidths=0.7, linestyles="dashed", zorder=1)
        handles.append(Line2D([], [], color="k", lw=0.7, ls="--", label="truth"))
    handles += _gradient_arrows(ax, model, X, grad, lo, hi, arrows, arrow_scale)
    ax.plot(X[:, 0], X[:, 1], "o", color=OBSERVED, ms=2.5, zorder=4)
    handles.append(point_handle())
    ax.set_title("posterior mean and gradient", fontsize=10)
    ax.legend(handles=handles, loc="upper right", fontsize=LEGEND_SIZE - 1, framealpha=0.8)

    if ax_std is not None:
        std = pred["std"].reshape(U.shape)
        if isinstance(std_levels, int):
            std_levels = MaxNLocator(std_levels).tick_values(0.0, max(float(std.max()), 1e-12))
        shaded = ax_std.contourf(
            U, V, std, levels=std_levels, cmap=UNCERTAINTY, extend=extend_for(std, 0.0, max(std_levels)), zorder=0
        )
        colorbar(shaded, ax_std, f"posterior std of {label}")
        ax_std.plot(X[:, 0], X[:, 1], "o", color=OBSERVED, ms=2.5, zorder=4)
        ax_std.set_title("posterior standard deviation", fontsize=10)
        ax_std.legend(handles=[point_handle()], loc="upper right", fontsize=LEGEND_SIZE - 1, framealpha=0.8)
    for panel in (ax, ax_std):
        if panel is not None:
            _frame(panel, lo, hi, xlabel, ylabel)
    return fig


def _panels(axes: Any) -> tuple[Axes, Axes | None]:
    if axes is None:
        _, (ax, ax_std) = plt.subplots(1, 2, figsize=(12, 5), layout="constrained")
        return ax, ax_std
    if isinstance(axes, Axes):
        return axes, None
    flat = list(np.asarray(axes, dtype=object).reshape(-1))
    if len(flat) not in (1, 2) or not all(isinstance(a, Axes) for a in flat):
        raise ValueError(f"axes: expected one or two matplotlib Axes (mean, then std), got {describe(axes)}")
    return flat[0], flat[1] if len(flat) == 2 else None


def _gradient_arrows(
    ax: Axes,
    model: DerivativeGP,
    X: np.ndarray,
    grad: np.ndarray | None,
    lo: np.ndarray,
    hi: np.ndarray,
    arrows: int,
    arrow_scale: float | None,
) -> list[Line2D]:
    """Predicted gradients at cell centres (none on the border) and observed ones; their legend entries."""
    if arrows:
        cu = lo[0] + (np.arange(arrows) + 0.5) * (hi[0] - lo[0]) / arrows
        cv = lo[1] + (np.arange(arrows) + 0.5) * (hi[1] - lo[1]) / arrows
        AU, AV = np.meshgrid(cu, cv)
        field = predict(model, np.stack([AU.ravel(), AV.ravel()], -1))["grad_mean"]
    else:
        field = np.zeros((0, 2))
    both = np.zeros(X.shape[0], dtype=bool) if grad is None else ~np.isnan(grad).any(axis=1)
    observed = grad[both] if grad is not None else np.zeros((0, 2))
    if arrow_scale is None:
        cell = min(hi - lo) / (arrows or 10)
        longest = max([np.hypot(*field.T).max(initial=0.0), np.hypot(*observed.T).max(initial=0.0)])
        arrow_scale = longest / cell if longest > 0 else 1.0
    quiver = {"angles": "xy", "scale_units": "xy", "scale": arrow_scale, "width": 0.004, "zorder": 3}
    handles = []
    if arrows:
        ax.quiver(AU, AV, field[:, 0], field[:, 1], color=PREDICTED_GRAD, edgecolor="k", linewidth=0.3, **quiver)
        handles.append(arrow_handle(PREDICTED_GRAD, "predicted gradient"))
    if both.any():
        ax.quiver(X[both, 0], X[both, 1], observed[:, 0], observed[:, 1], color=OBSERVED_GRAD, **quiver)
        handles.append(arrow_handle(OBSERVED_GRAD, "observed gradient"))
    return handles


def _frame(ax: Axes, lo: np.ndarray, hi: np.ndarray, xlabel: str, ylabel: str) -> None:
    """Limits, axis labels, and equal scales unless the two ranges differ too much for that."""
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    ratio = (hi[1] - lo[1]) / (hi[0] - lo[0])
    if 1 / _EQUAL_ASPECT_MAX_RATIO <= ratio <= _EQUAL_ASPECT_MAX_RATIO:
        ax.set_aspect("equal")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def _bounds_2d(bounds: Any, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if bounds is None:
        lo, hi = zip(*(padded_range(X[:, a]) for a in range(2)), strict=True)
        return np.array(lo), np.array(hi)
    b = to_numpy(bounds)
    if b.shape != (2, 2) or not np.isfinite(b).all() or not (b[0] < b[1]).all():
        raise ValueError(
            f"bounds: expected finite [[lo_1, lo_2], [hi_1, hi_2]] of shape (2, 2) with lo < hi, got {bounds!r}"
        )
    return b[0], b[1]


# ---------------------------------------------------------------------------------------- maps
def plot_map(
    values: Any,
    x1: Any,
    x2: Any,
    *,
    label: str,
    ax: Axes | None = None,
    diverging: bool = False,
    limit: float | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str | None = None,
    xlabel: str = "$x_1$",
    ylabel: str = "$x_2$",
    equal_aspect: bool = True,
) -> Figure:
    """A map of values on a regular grid, with a labelled colour bar; NaN cells are drawn grey.

    For errors and other signed quantities use ``diverging=True``: a diverging colour map whose
    white centre is 0, with symmetric ends ``±limit``. Cells without a value (NaN) are drawn in a
    mid grey, so they cannot be mistaken for a zero (white) or for the end of the colour map.

    Args:
        values: `n2 x n1` values; row ``j``, column ``i`` is the cell at ``(x1[i], x2[j])``.
        x1: `n1` coordinates of the cell centres along the first input.
        x2: `n2` coordinates of the cell centres along the second input.
        label: the quantity, with its units, for the colour bar (``"error [m]"``).
        ax: axes to draw into; default a new figure.
        diverging: centre the colour map at 0 (for errors and other signed values).
        limit: with ``diverging``, the colour bar spans ``[-limit, limit]``; default
            ``max |values|``. Values beyond it take the end colours (the bar shows arrows).
        vmin: without ``diverging``, the value of the colour map's low end (default the minimum).
        vmax: without ``diverging``, the value of its high end (default the maximum).
        cmap: colour map name; default ``"RdBu_r"`` with ``diverging``, else ``"viridis"``.
        xlabel: label of the first input, with units.
        ylabel: label of the second input, with units.
        equal_aspect: one unit of ``x1`` as long on screen as one unit of ``x2`` (maps in the same
            units); set False when the two inputs have different units.

    Returns:
        The figure holding ``ax``.

    Raises:
        ValueError: the shapes of ``values``, ``x1`` and ``x2`` do not match, coordinates are not
            finite, ``limit`` is not positive, or ``vmin``/``vmax`` are given with ``diverging``.
        TypeError: a label is not a non-empty string.
    """
    for name, text in (("label", label), ("xlabel", xlabel), ("ylabel", ylabel)):
        check_label(name, text)
    z, u, v = to_numpy(values), to_numpy(x1).reshape(-1), to_numpy(x2).reshape(-1)
    if z.ndim != 2 or z.shape != (v.size, u.size):
        raise ValueError(f"values: expected shape (len(x2), len(x1)) = ({v.size}, {u.size}), got {z.shape}")
    if not (np.isfinite(u).all() and np.isfinite(v).all()):
        raise ValueError("x1, x2: expected finite coordinates, got NaN or infinite entries")
    if limit is not None and not (isinstance(limit, (int, float)) and 0 < limit < math.inf):
        raise ValueError(f"limit: expected a positive number, got {limit!r}")
    if diverging and (vmin is not None or vmax is not None):
        raise ValueError("vmin, vmax: expected None with diverging=True (the map is centred at 0: give limit)")
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 5.5), layout="constrained")
    if diverging:
        norm = centred_norm(z, limit)
        lo, hi = norm.vmin, norm.vmax
        style = {"cmap": colormap(cmap or DIVERGING), "norm": norm}
    else:
        finite = z[np.isfinite(z)]
        lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
        hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
        style = {"cmap": colormap(cmap or SEQUENTIAL), "vmin": lo, "vmax": hi}
    mesh = ax.pcolormesh(u, v, np.ma.masked_invalid(z), shading="nearest", **style)
    colorbar(mesh, ax, label, extend=extend_for(z, lo, hi))
    if equal_aspect:
        ax.set_aspect("equal")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return ax.figure
