"""1-D plots: posterior of f and f' with bands, observations and observed slopes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from gpderiv.plot._common import (
    LEGEND_SIZE,
    OBSERVED,
    OBSERVED_GRAD,
    check_label,
    check_model,
    describe,
    once,
    padded_range,
    predict,
    span,
    to_numpy,
    training_data,
)

if TYPE_CHECKING:
    from gpderiv.model import DerivativeGP

#: Half-length of an observed-slope segment, as a fraction of the panel's (x, y) ranges.
_TANGENT_HALF = 0.04

Truth = Callable[[torch.Tensor], Any]


# ---------------------------------------------------------------------------------------- 1-D
def plot_1d(
    model: DerivativeGP,
    x: Any = None,
    *,
    truth: Truth | Any = None,
    truth_grad: Truth | Any = None,
    n: int = 400,
    axes: Sequence[Axes] | np.ndarray | None = None,
    label: str | None = None,
    color: str | None = None,
    band_label: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    grad_ylabel: str | None = None,
) -> Figure:
    """Posterior of f (top panel) and f' (bottom panel) of a 1-D model, with the training data.

    Each panel shows the posterior mean and a ±2 standard-deviation band. The top panel also shows
    the observed values as dots and each observed slope as a short segment of that slope through
    the observed point (through the posterior mean where the value itself is not observed); the
    bottom panel shows the observed slopes as dots. Calling it again with the returned figure's
    axes overlays another model (for instance one fitted without derivatives)::

        fig = plot_1d(with_grad, label="values + derivatives")
        plot_1d(values_only, axes=fig.axes[:2], label="values only")

    Args:
        model: a fitted :class:`~gpderiv.DerivativeGP` on one input dimension.
        x: `m` (or `m x 1`) test inputs; default ``n`` points evenly spaced over the training range.
            They are sorted before plotting.
        truth: the true f, drawn dashed: a callable mapping the `m` test inputs (a float64 torch
            tensor of shape `m`) to `m` values, or the `m` values at ``x``.
        truth_grad: the true f', in the same form as ``truth``.
        n: number of test inputs when ``x`` is None.
        axes: two axes to draw into (f, then f'); default a new figure with two stacked panels.
        label: legend label of this model's mean (default ``"posterior mean"``).
        color: colour of this model's mean and band (default the axes' next colour).
        band_label: legend label of this model's band (default ``"<label> ± 2 std"``).
        xlabel: label of the x axis, with units where there are any (``"depth [m]"``); default
            ``"x"``, or the label the axes already have (when overlaying).
        ylabel: label of the f panel's y axis, with units; default ``"f(x)"`` or the present one.
        grad_ylabel: label of the f' panel's y axis, with units (those of f per unit of x);
            default ``"f'(x)"`` or the present one.

    Returns:
        The figure holding ``axes``.

    Raises:
        TypeError: ``model`` is not a DerivativeGP.
        ValueError: ``model`` is not 1-D, or ``x``, ``n``, ``axes``, ``truth`` or ``truth_grad``
            have the wrong shape.
        TypeError: a label is not a non-empty string.
    """
    check_model(model, 1, "plot_1d")
    for name, text in (("xlabel", xlabel), ("ylabel", ylabel), ("grad_ylabel", grad_ylabel)):
        if text is not None:
            check_label(name, text)
    X, y, grad = training_data(model)
    xs = _test_inputs_1d(x, X[:, 0], n)
    order = np.argsort(xs, kind="stable")
    xs = xs[order]
    ax_f, ax_g = _two_axes(axes)

    pred = predict(model, xs[:, None])
    mean, std = pred["mean"], pred["std"]
    gmean, gstd = pred["grad_mean"][:, 0], pred["grad_std"][:, 0]
    label = label or "posterior mean"
    band_label = band_label or f"{label} ± 2 std"
    line = ax_f.plot(xs, mean, color=color, lw=1.6, label=label, zorder=2)[0]
    color = line.get_color()
    # The band is labelled: a reader must be told what the shading means.
    ax_f.fill_between(xs, mean - 2 * std, mean + 2 * std, color=color, alpha=0.2, lw=0, zorder=1, label=band_label)
    ax_g.plot(xs, gmean, color=color, lw=1.6, label=label, zorder=2)
    ax_g.fill_between(
        xs, gmean - 2 * gstd, gmean + 2 * gstd, color=color, alpha=0.2, lw=0, zorder=1, label=band_label
    )

    for ax, fn, name in ((ax_f, truth, "truth"), (ax_g, truth_grad, "truth_grad")):
        values = _truth_1d(fn, xs, order, name)
        if values is not None:
            ax.plot(xs, values, "k--", lw=1.1, label=once(ax, "truth"), zorder=3)

    x_obs = X[:, 0]
    seen = ~np.isnan(y)
    if seen.any():
        ax_f.plot(x_obs[seen], y[seen], "o", color=OBSERVED, ms=4, label=once(ax_f, "observed"), zorder=5)
    if grad is not None and (~np.isnan(grad[:, 0])).any():
        g_seen = ~np.isnan(grad[:, 0])
        ax_g.plot(x_obs[g_seen], grad[g_seen, 0], "o", color=OBSERVED, ms=4, label=once(ax_g, "observed"), zorder=5)
        centre = y.copy()
        missing = g_seen & np.isnan(centre)
        if missing.any():
            centre[missing] = predict(model, x_obs[missing, None])["mean"]
        yr = span(np.concatenate([mean - 2 * std, mean + 2 * std, y[seen]]))
        _tangents(ax_f, x_obs[g_seen], centre[g_seen], grad[g_seen, 0], span(xs), yr)

    xlabel = xlabel or ax_g.get_xlabel() or "x"
    ax_f.set_ylabel(ylabel or ax_f.get_ylabel() or "f(x)")
    ax_g.set_ylabel(grad_ylabel or ax_g.get_ylabel() or "f'(x)")
    ax_g.set_xlabel(xlabel)
    if not ax_f.get_shared_x_axes().joined(ax_f, ax_g):  # stacked panels share the lower label
        ax_f.set_xlabel(xlabel)
    for ax in (ax_f, ax_g):
        ax.legend(loc="best", fontsize=LEGEND_SIZE)
    return ax_f.figure


def _two_axes(axes: Sequence[Axes] | np.ndarray | None) -> tuple[Axes, Axes]:
    if axes is None:
        _, (ax_f, ax_g) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
        return ax_f, ax_g
    flat = list(np.asarray(axes, dtype=object).reshape(-1))
    if len(flat) != 2 or not all(isinstance(a, Axes) for a in flat):
        raise ValueError(f"axes: expected two matplotlib Axes (f, then f'), got {describe(axes)}")
    return flat[0], flat[1]


def _test_inputs_1d(x: Any, X: np.ndarray, n: int) -> np.ndarray:
    if x is None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"n: expected an integer >= 2, got {n!r}")
        lo, hi = padded_range(X)
        return np.linspace(lo, hi, n)
    xs = to_numpy(x)
    if xs.ndim == 2 and xs.shape[1] == 1:
        xs = xs[:, 0]
    if xs.ndim != 1 or xs.size == 0:
        raise ValueError(f"x: expected shape (m,) or (m, 1) with m >= 1, got {xs.shape}")
    if not np.isfinite(xs).all():
        raise ValueError("x: expected finite test inputs, got NaN or infinite entries")
    return xs


def _truth_1d(fn: Any, xs: np.ndarray, order: np.ndarray, name: str) -> np.ndarray | None:
    """Values of a truth callable at ``xs`` (sorted), or given values reordered like ``xs``."""
    if fn is None:
        return None
    values = to_numpy(fn(torch.as_tensor(xs, dtype=torch.float64)) if callable(fn) else fn)
    if values.size != xs.size:
        raise ValueError(f"{name}: expected {xs.size} values (one per test input), got shape {values.shape}")
    values = values.reshape(-1)
    return values if callable(fn) else values[order]


def _tangents(
    ax: Axes, x: np.ndarray, y: np.ndarray, slope: np.ndarray, xr: float, yr: float, color: str = OBSERVED_GRAD
) -> None:
    """Segments of slope ``slope`` centred at ``(x, y)``, all of one length relative to the panel."""
    s = slope * xr / yr  # slope in axis-fraction units
    dx = _TANGENT_HALF * xr / np.sqrt(1 + s**2)
    segments = np.stack([np.stack([x - dx, y - slope * dx], -1), np.stack([x + dx, y + slope * dx], -1)], 1)
    label = once(ax, "observed slope")
    ax.add_collection(LineCollection(segments, colors=color, linewidths=2.2, zorder=4, label=label))
    ax.autoscale_view()


