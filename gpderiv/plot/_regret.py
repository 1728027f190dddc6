"""Regret curves of Bayesian-optimisation runs: mean ± one standard error over seeds per method."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from gpderiv.plot._common import LEGEND_SIZE, describe, to_numpy

#: Regrets at or below this are drawn at ``log10(_REGRET_FLOOR)`` on a log scale.
_REGRET_FLOOR = 1e-12
_BAND_ALPHA = 0.2


def plot_regret(
    curves: Mapping[str, Any],
    *,
    ax: Axes | None = None,
    log: bool = True,
    xlabel: str = "evaluations",
    ylabel: str | None = None,
) -> Figure:
    """Regret curves of Bayesian-optimisation runs: mean ± one standard error over seeds per method.

    Statistics ignore NaN entries (runs of different lengths can be padded with NaN); the band
    is drawn where at least two seeds have a value, and the legend explains it. The x axis counts
    evaluations, so its ticks are integers.

    Args:
        curves: method name -> regret of shape `n_seeds x n_evals` (numpy array, torch tensor or
            nested lists); entry ``[s, t]`` is the regret of seed ``s`` after ``t + 1`` evaluations.
        ax: axes to draw into; default a new figure.
        log: average ``log10(regret)`` instead of the regret (regrets <= 1e-12, including 0 and
            negative ones, count as 1e-12).
        xlabel: label of the x axis.
        ylabel: label of the y axis; default ``"log10 regret"`` (as math) or ``"regret"``.

    Returns:
        The figure holding ``ax``.

    Raises:
        ValueError: ``curves`` is empty or one of its arrays is not 2-D or is empty.
    """
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError(f"curves: expected a non-empty dict name -> (n_seeds, n_evals) array, got {describe(curves)}")
    arrays = {}
    for name, value in curves.items():
        a = to_numpy(value)
        if a.ndim != 2 or 0 in a.shape:
            raise ValueError(
                f"curves[{name!r}]: expected a 2-D array of shape (n_seeds, n_evals), n_seeds, n_evals >= 1, "
                f"got shape {a.shape}"
            )
        arrays[name] = a
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    banded = False
    for name, a in arrays.items():
        if log:
            a = np.where(np.isnan(a), np.nan, np.log10(np.maximum(np.nan_to_num(a, nan=1.0), _REGRET_FLOOR)))
        mean, se = _mean_and_error(a)
        evals = np.arange(1, a.shape[1] + 1)
        seeds = a.shape[0]
        line = ax.plot(evals, mean, lw=1.6, label=f"{name} ({seeds} seed{'' if seeds == 1 else 's'})")[0]
        if np.isfinite(se).any():
            ax.fill_between(evals, mean - se, mean + se, color=line.get_color(), alpha=_BAND_ALPHA, lw=0)
            banded = True
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel or (r"$\log_{10}$ regret" if log else "regret"))
    ax.grid(alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    if banded:  # one entry says what every method's shading is
        handles.append(Patch(facecolor="0.5", alpha=_BAND_ALPHA * 2, label="± 1 standard error over seeds"))
    ax.legend(handles=handles, fontsize=LEGEND_SIZE)
    return ax.figure


def _mean_and_error(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error over seeds (rows) ignoring NaN; the error is NaN where fewer than 2 seeds count."""
    count = (~np.isnan(a)).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(a, axis=0) / count
        var = np.nansum((a - mean) ** 2, axis=0) / (count - 1)
        se = np.where(count >= 2, np.sqrt(var / count), np.nan)
    return np.where(count > 0, mean, np.nan), se
