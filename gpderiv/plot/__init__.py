"""Figures of fitted derivative GPs and of Bayesian-optimisation regret curves.

Every function draws with matplotlib, returns the :class:`~matplotlib.figure.Figure` and never
calls ``plt.show()``. New figures are made with ``pyplot`` (so they show in notebooks and under
``plt.show()``); close them with ``plt.close(fig)`` when done. Each function also draws into given
axes (``ax`` / ``axes``), which composes several plots in one figure.

The figures are meant to be published as they are: every axis and colour bar takes a label (give
the units there), every shaded band has a legend entry, uncertainty is shown (bands in 1-D, a
posterior-std panel in 2-D), signed errors use a diverging colour map centred at 0
(:func:`plot_map` with ``diverging=True``), cells without a value are grey rather than white, maps
keep equal scales on both axes, and :func:`save_figure` writes 150 dpi.

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

from gpderiv.plot._common import save_figure
from gpderiv.plot._one_d import plot_1d
from gpderiv.plot._regret import plot_regret
from gpderiv.plot._two_d import plot_2d, plot_map

__all__ = ["plot_1d", "plot_2d", "plot_map", "plot_regret", "save_figure"]
