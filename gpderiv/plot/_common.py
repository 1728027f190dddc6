"""Shared pieces of :mod:`gpderiv.plot`: input checks, predictions as numpy, colour maps, saving."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colorbar import Colorbar
from matplotlib.colors import Colormap, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

if TYPE_CHECKING:
    from matplotlib.cm import ScalarMappable

    from gpderiv.model import DerivativeGP

PathT = TypeVar("PathT", str, os.PathLike)

#: Resolution of saved figures: 150 dpi keeps 8-pt text legible on paper and on screen.
DPI = 150
#: Colour of cells without a value (NaN): a mid grey, so that they differ from white, which a
#: diverging map uses for zero, and from the ends of the sequential maps used here.
MASKED = "0.55"
OBSERVED = "k"
OBSERVED_GRAD = "tab:red"
PREDICTED_GRAD = "white"
SEQUENTIAL = "viridis"
#: Posterior standard deviations: sequential, light = certain, dark = uncertain.
UNCERTAINTY = "magma_r"
DIVERGING = "RdBu_r"
LEGEND_SIZE = 8


def save_figure(fig: Figure, path: PathT, *, dpi: int = DPI, format: str | None = None) -> PathT:
    """Save ``fig`` (150 dpi by default), making the parent directory first; the format follows the suffix.

    Args:
        fig: the figure.
        path: output file (``.png``, ``.pdf``, ``.svg``, ...).
        dpi: resolution of raster formats, in dots per inch.
        format: file format (``"png"``, ...) when the suffix does not say it (a temporary file).

    Returns:
        ``path``, unchanged.

    Raises:
        ValueError: ``dpi`` is not a positive integer.
    """
    if isinstance(dpi, bool) or not isinstance(dpi, int) or dpi <= 0:
        raise ValueError(f"dpi: expected a positive integer, got {dpi!r}")
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, dpi=dpi, format=format)
    return path


def colormap(name: str | Colormap) -> Colormap:
    """The colour map ``name`` with NaN cells drawn in :data:`MASKED` grey (matplotlib's default is transparent)."""
    cmap = colormaps[name] if isinstance(name, str) else name
    return cmap.with_extremes(bad=MASKED)


def centred_norm(values: np.ndarray, limit: float | None = None) -> TwoSlopeNorm:
    """A norm with 0 at the centre of the colour map and symmetric ends ``±limit`` (default ``max |values|``)."""
    if limit is None:
        finite = np.abs(values[np.isfinite(values)])
        limit = float(finite.max()) if finite.size else 1.0
    limit = limit if limit > 0 else 1.0
    return TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit)


def colorbar(mappable: ScalarMappable, ax: Axes, label: str, *, extend: str | None = None) -> Colorbar:
    """A colour bar beside ``ax`` with ``label`` (quantity and units)."""
    kwargs = {} if extend is None else {"extend": extend}
    bar = ax.figure.colorbar(mappable, ax=ax, label=label, **kwargs)
    bar.ax.tick_params(labelsize=LEGEND_SIZE)
    return bar


def extend_for(values: np.ndarray, lo: float, hi: float) -> str:
    """The colour bar's ``extend`` when ``values`` leave ``[lo, hi]``."""
    finite = values[np.isfinite(values)]
    below = finite.size > 0 and finite.min() < lo
    above = finite.size > 0 and finite.max() > hi
    return {(False, False): "neither", (True, False): "min", (False, True): "max"}.get((below, above), "both")


# ---------------------------------------------------------------------------------------- models
def check_model(model: Any, d: int, where: str) -> None:
    from gpderiv.model import DerivativeGP

    if not isinstance(model, DerivativeGP):
        raise TypeError(f"model: expected a DerivativeGP, got {type(model).__name__}")
    if model.d != d:
        raise ValueError(f"model: {where} needs a model on {d} input dimension(s), got d = {model.d}")


def training_data(model: DerivativeGP) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Training ``X`` (`n x d`), ``y`` (`n`) and ``grad`` (`n x d` or None) in user units; NaN = unobserved."""
    args = model.training_data
    grad = args["grad"]
    return to_numpy(args["X"]), to_numpy(args["y"]), None if grad is None else to_numpy(grad)


def predict(model: DerivativeGP, xs: np.ndarray) -> dict[str, np.ndarray]:
    """Posterior ``mean``, ``std`` (`m`), ``grad_mean`` and ``grad_std`` (`m x d`) at `m x d` inputs ``xs``."""
    like = model.train_X
    with torch.no_grad():
        pred = model.predict(torch.as_tensor(xs, dtype=like.dtype, device=like.device))
    return {
        "mean": to_numpy(pred.mean),
        "std": to_numpy(pred.std),
        "grad_mean": to_numpy(pred.grad_mean),
        "grad_std": to_numpy(pred.grad_std),
    }


# ---------------------------------------------------------------------------------------- small helpers
def to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().to(torch.float64).numpy()
    return np.asarray(value, dtype=np.float64)


def padded_range(x: np.ndarray) -> tuple[float, float]:
    """``(min, max)`` of ``x``, widened to ±0.5 around a single value."""
    lo, hi = float(np.min(x)), float(np.max(x))
    return (lo - 0.5, hi + 0.5) if hi <= lo else (lo, hi)


def span(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    width = float(values.max() - values.min()) if values.size else 0.0
    return width if width > 0 else 1.0


def once(ax: Axes, label: str) -> str:
    """``label``, or a label hidden from the legend when ``ax`` already has an artist labelled so."""
    taken = {a.get_label() for a in (*ax.lines, *ax.collections)}
    return "_" + label if label in taken else label


def arrow_handle(color: str, label: str) -> Line2D:
    """A legend entry that looks like an arrow."""
    return Line2D([], [], color=color, marker=r"$\rightarrow$", ms=12, ls="", mec="k", mew=0.3, label=label)


def point_handle(label: str = "training inputs") -> Line2D:
    """A legend entry for the training inputs drawn as small black dots."""
    return Line2D([], [], color=OBSERVED, marker="o", ms=2.5, ls="", label=label)


def check_label(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise TypeError(f"{name}: expected a non-empty string, got {describe(value)}")
    return value


def describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:80] + '...' if len(text) > 80 else text}"
