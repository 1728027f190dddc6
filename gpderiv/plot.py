"""Plots of fitted derivative GPs and of Bayesian-optimisation regret curves.

Every function draws with matplotlib, returns the :class:`~matplotlib.figure.Figure` and never
calls ``plt.show()``. New figures are made with ``pyplot`` (so they show in notebooks and under
``plt.show()``); close them with ``plt.close(fig)`` when done. Each function also draws into given
axes (``ax`` / ``axes``), which composes several plots in one figure.

Example:
    >>> import torch
    >>> from gpderiv import DerivativeGP
    >>> from gpderiv.plot import plot_1d
    >>> X = torch.linspace(0, 3, 6, dtype=torch.float64)
    >>> model = DerivativeGP(X, torch.sin(X), torch.cos(X)).fit(maxiter=10)
    >>> fig = plot_1d(model, truth=torch.sin, truth_grad=torch.cos, label="with derivatives")
    >>> len(fig.axes)
    2
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

if TYPE_CHECKING:
    from gpderiv.model import DerivativeGP

__all__ = ["plot_1d", "plot_2d", "plot_regret", "save_figure"]

#: Half-length of an observed-slope segment, as a fraction of the panel's (x, y) ranges.
_TANGENT_HALF = 0.04
#: Regrets at or below this are drawn at ``log10(_REGRET_FLOOR)`` on a log scale.
_REGRET_FLOOR = 1e-12
_OBSERVED = "k"
_OBSERVED_GRAD = "tab:red"
_PREDICTED_GRAD = "white"

PathT = TypeVar("PathT", str, os.PathLike)
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

    Returns:
        The figure holding ``axes``.

    Raises:
        TypeError: ``model`` is not a DerivativeGP.
        ValueError: ``model`` is not 1-D, or ``x``, ``n``, ``axes``, ``truth`` or ``truth_grad``
            have the wrong shape.
    """
    _check_model(model, 1, "plot_1d")
    X, y, grad = _training_data(model)
    xs = _test_inputs_1d(x, X[:, 0], n)
    order = np.argsort(xs, kind="stable")
    xs = xs[order]
    ax_f, ax_g = _two_axes(axes)

    pred = _predict(model, xs[:, None])
    mean, std = pred["mean"], pred["std"]
    gmean, gstd = pred["grad_mean"][:, 0], pred["grad_std"][:, 0]
    line = ax_f.plot(xs, mean, color=color, lw=1.6, label=label or "posterior mean", zorder=2)[0]
    color = line.get_color()
    ax_f.fill_between(xs, mean - 2 * std, mean + 2 * std, color=color, alpha=0.2, lw=0, zorder=1)
    ax_g.plot(xs, gmean, color=color, lw=1.6, label=label or "posterior mean", zorder=2)
    ax_g.fill_between(xs, gmean - 2 * gstd, gmean + 2 * gstd, color=color, alpha=0.2, lw=0, zorder=1)

    for ax, fn, name in ((ax_f, truth, "truth"), (ax_g, truth_grad, "truth_grad")):
        values = _truth_1d(fn, xs, order, name)
        if values is not None:
            ax.plot(xs, values, "k--", lw=1.1, label=_once(ax, "truth"), zorder=3)

    x_obs = X[:, 0]
    seen = ~np.isnan(y)
    if seen.any():
        ax_f.plot(x_obs[seen], y[seen], "o", color=_OBSERVED, ms=4, label=_once(ax_f, "observed"), zorder=5)
    if grad is not None and (~np.isnan(grad[:, 0])).any():
        g_seen = ~np.isnan(grad[:, 0])
        ax_g.plot(x_obs[g_seen], grad[g_seen, 0], "o", color=_OBSERVED, ms=4, label=_once(ax_g, "observed"), zorder=5)
        centre = y.copy()
        missing = g_seen & np.isnan(centre)
        if missing.any():
            centre[missing] = _predict(model, x_obs[missing, None])["mean"]
        yr = _span(np.concatenate([mean - 2 * std, mean + 2 * std, y[seen]]))
        _tangents(ax_f, x_obs[g_seen], centre[g_seen], grad[g_seen, 0], _span(xs), yr)

    ax_f.set_ylabel("f(x)")
    ax_g.set_ylabel("f'(x)")
    ax_g.set_xlabel("x")
    for ax in (ax_f, ax_g):
        ax.legend(loc="best", fontsize=8)
    return ax_f.figure


def _two_axes(axes: Sequence[Axes] | np.ndarray | None) -> tuple[Axes, Axes]:
    if axes is None:
        _, (ax_f, ax_g) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
        return ax_f, ax_g
    flat = list(np.asarray(axes, dtype=object).reshape(-1))
    if len(flat) != 2 or not all(isinstance(a, Axes) for a in flat):
        raise ValueError(f"axes: expected two matplotlib Axes (f, then f'), got {_describe(axes)}")
    return flat[0], flat[1]


def _test_inputs_1d(x: Any, X: np.ndarray, n: int) -> np.ndarray:
    if x is None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"n: expected an integer >= 2, got {n!r}")
        lo, hi = _padded_range(X)
        return np.linspace(lo, hi, n)
    xs = _to_numpy(x)
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
    values = _to_numpy(fn(torch.as_tensor(xs, dtype=torch.float64)) if callable(fn) else fn)
    if values.size != xs.size:
        raise ValueError(f"{name}: expected {xs.size} values (one per test input), got shape {values.shape}")
    values = values.reshape(-1)
    return values if callable(fn) else values[order]


def _tangents(
    ax: Axes, x: np.ndarray, y: np.ndarray, slope: np.ndarray, xr: float, yr: float, color: str = _OBSERVED_GRAD
) -> None:
    """Segments of slope ``slope`` centred at ``(x, y)``, all of one length relative to the panel."""
    s = slope * xr / yr  # slope in axis-fraction units
    dx = _TANGENT_HALF * xr / np.sqrt(1 + s**2)
    segments = np.stack([np.stack([x - dx, y - slope * dx], -1), np.stack([x + dx, y + slope * dx], -1)], 1)
    label = _once(ax, "observed slope")
    ax.add_collection(LineCollection(segments, colors=color, linewidths=2.2, zorder=4, label=label))
    ax.autoscale_view()


# ---------------------------------------------------------------------------------------- 2-D
def plot_2d(
    model: DerivativeGP,
    *,
    bounds: Any = None,
    resolution: int = 50,
    truth: Truth | None = None,
    ax: Axes | None = None,
    arrows: int = 20,
    levels: int | Sequence[float] = 20,
    arrow_scale: float | None = None,
) -> Figure:
    """Posterior mean of a 2-D model as filled contours, with its gradient field and the data.

    The predicted gradient ``E[grad f]`` is drawn as white arrows on an ``arrows x arrows`` grid of
    cell centres, the observed gradients as red arrows at the training points where both
    components are observed, and the training inputs as black dots. Arrows are drawn in data
    coordinates (an arrow points along the gradient when both axes have the same scale) and all
    arrows of one plot share one scale.

    Args:
        model: a fitted :class:`~gpderiv.DerivativeGP` on two input dimensions.
        bounds: `2 x 2` ``[[lo_1, lo_2], [hi_1, hi_2]]`` (lower bounds, then upper bounds, as in
            BoTorch); default the bounding box of the training inputs.
        resolution: grid points per dimension of the contour plot.
        truth: the true f, drawn as dashed contour lines at the same levels: a callable mapping
            `k x 2` float64 torch inputs to `k` values.
        ax: axes to draw into; default a new figure.
        arrows: arrows per dimension of the predicted gradient field (0: none).
        levels: number of contour levels, or the levels themselves (give the same levels to
            several plots to share their colour scale).
        arrow_scale: gradient magnitude drawn as an arrow one data unit long (give the same value
            to several plots to compare their arrows); default: the longest arrow is about one
            cell of the arrow grid long.

    Returns:
        The figure holding ``ax``.

    Raises:
        TypeError: ``model`` is not a DerivativeGP.
        ValueError: ``model`` is not 2-D, or ``bounds``, ``resolution``, ``arrows``,
            ``arrow_scale`` or ``truth`` are invalid.
    """
    _check_model(model, 2, "plot_2d")
    X, _, grad = _training_data(model)
    lo, hi = _bounds_2d(bounds, X)
    for name, value, least in (("resolution", resolution, 2), ("arrows", arrows, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name}: expected an integer >= {least}, got {value!r}")
    if arrow_scale is not None and not (isinstance(arrow_scale, (int, float)) and 0 < arrow_scale < math.inf):
        raise ValueError(f"arrow_scale: expected a positive number, got {arrow_scale!r}")
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 5.5))
    fig = ax.figure

    u = np.linspace(lo[0], hi[0], resolution)
    v = np.linspace(lo[1], hi[1], resolution)
    U, V = np.meshgrid(u, v)  # rows follow x2, as contourf expects
    grid = np.stack([U.ravel(), V.ravel()], -1)
    mean = _predict(model, grid)["mean"].reshape(U.shape)
    extend = "neither" if isinstance(levels, int) else "both"  # given levels may not cover the mean
    filled = ax.contourf(U, V, mean, levels=levels, cmap="viridis", extend=extend, zorder=0)
    fig.colorbar(filled, ax=ax, label="posterior mean")
    handles: list[Line2D] = []
    if truth is not None:
        values = _to_numpy(truth(torch.as_tensor(grid, dtype=torch.float64)))
        if values.size != grid.shape[0]:
            raise ValueError(
                f"truth: expected {grid.shape[0]} values for {grid.shape[0]} inputs of shape (k, 2), "
                f"got shape {values.shape}"
            )
        truth_grid = values.reshape(U.shape)
        ax.contour(U, V, truth_grid, levels=filled.levels, colors="k", linewidths=0.7, linestyles="dashed", zorder=1)
        handles.append(Line2D([], [], color="k", lw=0.7, ls="--", label="truth"))

    # Arrow field at cell centres, so that no arrow sits on the border.
    if arrows:
        cu = lo[0] + (np.arange(arrows) + 0.5) * (hi[0] - lo[0]) / arrows
        cv = lo[1] + (np.arange(arrows) + 0.5) * (hi[1] - lo[1]) / arrows
        AU, AV = np.meshgrid(cu, cv)
        field = _predict(model, np.stack([AU.ravel(), AV.ravel()], -1))["grad_mean"]
    else:
        field = np.zeros((0, 2))
    both = np.zeros(X.shape[0], dtype=bool) if grad is None else ~np.isnan(grad).any(axis=1)
    observed = grad[both] if grad is not None else np.zeros((0, 2))
    if arrow_scale is None:
        cell = min(hi - lo) / (arrows or 10)
        longest = max([np.hypot(*field.T).max(initial=0.0), np.hypot(*observed.T).max(initial=0.0)])
        arrow_scale = longest / cell if longest > 0 else 1.0
    quiver = {"angles": "xy", "scale_units": "xy", "scale": arrow_scale, "width": 0.004, "zorder": 3}
    if arrows:
        ax.quiver(AU, AV, field[:, 0], field[:, 1], color=_PREDICTED_GRAD, edgecolor="k", linewidth=0.3, **quiver)
        handles.append(_arrow_handle(_PREDICTED_GRAD, "predicted gradient"))
    if both.any():
        ax.quiver(X[both, 0], X[both, 1], observed[:, 0], observed[:, 1], color=_OBSERVED_GRAD, **quiver)
        handles.append(_arrow_handle(_OBSERVED_GRAD, "observed gradient"))
    ax.plot(X[:, 0], X[:, 1], "o", color=_OBSERVED, ms=2.5, zorder=4)
    handles.append(Line2D([], [], color=_OBSERVED, marker="o", ms=2.5, ls="", label="training inputs"))

    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    ratio = (hi[1] - lo[1]) / (hi[0] - lo[0])
    if 0.2 <= ratio <= 5:
        ax.set_aspect("equal")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    ax.set_title("posterior mean and gradient", fontsize=10)
    ax.legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.8)
    return fig


def _bounds_2d(bounds: Any, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if bounds is None:
        lo, hi = zip(*(_padded_range(X[:, a]) for a in range(2)), strict=True)
        return np.array(lo), np.array(hi)
    b = _to_numpy(bounds)
    if b.shape != (2, 2) or not np.isfinite(b).all() or not (b[0] < b[1]).all():
        raise ValueError(
            f"bounds: expected finite [[lo_1, lo_2], [hi_1, hi_2]] of shape (2, 2) with lo < hi, got {bounds!r}"
        )
    return b[0], b[1]


# ---------------------------------------------------------------------------------------- regret
def plot_regret(
    curves: Mapping[str, Any],
    *,
    ax: Axes | None = None,
    log: bool = True,
    xlabel: str = "evaluations",
    ylabel: str = "log10 regret",
) -> Figure:
    """Regret curves of Bayesian-optimisation runs: mean ± one standard error over seeds per method.

    Statistics ignore NaN entries (runs of different lengths can be padded with NaN); the band
    is drawn where at least two seeds have a value.

    Args:
        curves: method name -> regret of shape `n_seeds x n_evals` (numpy array, torch tensor or
            nested lists); entry ``[s, t]`` is the regret of seed ``s`` after ``t + 1`` evaluations.
        ax: axes to draw into; default a new figure.
        log: average ``log10(regret)`` instead of the regret (regrets <= 1e-12, including 0 and
            negative ones, count as 1e-12).
        xlabel: label of the x axis.
        ylabel: label of the y axis (change it with ``log=False``).

    Returns:
        The figure holding ``ax``.

    Raises:
        ValueError: ``curves`` is empty or one of its arrays is not 2-D or is empty.
    """
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError(f"curves: expected a non-empty dict name -> (n_seeds, n_evals) array, got {_describe(curves)}")
    arrays = {}
    for name, value in curves.items():
        a = _to_numpy(value)
        if a.ndim != 2 or 0 in a.shape:
            raise ValueError(
                f"curves[{name!r}]: expected a 2-D array of shape (n_seeds, n_evals), n_seeds, n_evals >= 1, "
                f"got shape {a.shape}"
            )
        arrays[name] = a
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.5))
    for name, a in arrays.items():
        if log:
            a = np.where(np.isnan(a), np.nan, np.log10(np.maximum(np.nan_to_num(a, nan=1.0), _REGRET_FLOOR)))
        count = (~np.isnan(a)).sum(axis=0)
        evals = np.arange(1, a.shape[1] + 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.nansum(a, axis=0) / count
            var = np.nansum((a - mean) ** 2, axis=0) / (count - 1)
            se = np.where(count >= 2, np.sqrt(var / count), np.nan)
        mean = np.where(count > 0, mean, np.nan)
        line = ax.plot(evals, mean, lw=1.6, label=f"{name} ({a.shape[0]} seeds)")[0]
        ax.fill_between(evals, mean - se, mean + se, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax.figure


# ---------------------------------------------------------------------------------------- saving
def save_figure(fig: Figure, path: PathT) -> PathT:
    """Save ``fig`` at 120 dpi, making the parent directory first; the format follows the suffix.

    Args:
        fig: the figure.
        path: output file (``.png``, ``.pdf``, ``.svg``, ...).

    Returns:
        ``path``, unchanged.
    """
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


# ---------------------------------------------------------------------------------------- helpers
def _check_model(model: Any, d: int, where: str) -> None:
    from gpderiv.model import DerivativeGP

    if not isinstance(model, DerivativeGP):
        raise TypeError(f"model: expected a DerivativeGP, got {type(model).__name__}")
    if model.d != d:
        raise ValueError(f"model: {where} needs a model on {d} input dimension(s), got d = {model.d}")


def _training_data(model: DerivativeGP) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Training ``X`` (`n x d`), ``y`` (`n`) and ``grad`` (`n x d` or None) in user units; NaN = unobserved."""
    args = model.training_data
    grad = args["grad"]
    return _to_numpy(args["X"]), _to_numpy(args["y"]), None if grad is None else _to_numpy(grad)


def _predict(model: DerivativeGP, xs: np.ndarray) -> dict[str, np.ndarray]:
    like = model.train_X
    with torch.no_grad():
        pred = model.predict(torch.as_tensor(xs, dtype=like.dtype, device=like.device))
    return {
        "mean": _to_numpy(pred.mean),
        "std": _to_numpy(pred.std),
        "grad_mean": _to_numpy(pred.grad_mean),
        "grad_std": _to_numpy(pred.grad_std),
    }


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().to(torch.float64).numpy()
    return np.asarray(value, dtype=np.float64)


def _padded_range(x: np.ndarray) -> tuple[float, float]:
    """``(min, max)`` of ``x``, widened to ±0.5 around a single value."""
    lo, hi = float(np.min(x)), float(np.max(x))
    return (lo - 0.5, hi + 0.5) if hi <= lo else (lo, hi)


def _span(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    span = float(values.max() - values.min()) if values.size else 0.0
    return span if span > 0 else 1.0


def _once(ax: Axes, label: str) -> str:
    """``label``, or a label hidden from the legend when ``ax`` already has an artist labelled so."""
    taken = {a.get_label() for a in (*ax.lines, *ax.collections)}
    return "_" + label if label in taken else label


def _arrow_handle(color: str, label: str) -> Line2D:
    """A legend entry that looks like an arrow."""
    return Line2D([], [], color=color, marker=r"$\rightarrow$", ms=12, ls="", mec="k", mew=0.3, label=label)


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:80] + '...' if len(text) > 80 else text}"
