"""gpderiv.plot: figures render to PNG (Agg), overlay into given axes, and reject bad input clearly."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import LineCollection, PolyCollection  # noqa: E402
from matplotlib.colors import TwoSlopeNorm, to_rgba  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.quiver import Quiver  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from gpderiv import DerivativeGP  # noqa: E402
from gpderiv.plot import plot_1d, plot_2d, plot_map, plot_regret, save_figure  # noqa: E402

DTYPE = torch.float64
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def f1(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(2 * x) + torch.cos(x)


def df1(x: torch.Tensor) -> torch.Tensor:
    return 2 * torch.cos(2 * x) - torch.sin(x)


def f2(X: torch.Tensor) -> torch.Tensor:
    return torch.sin(3 * X[:, 0]) * torch.cos(2 * X[:, 1])


def df2(X: torch.Tensor) -> torch.Tensor:
    a, b = 3 * X[:, 0], 2 * X[:, 1]
    return torch.stack([3 * torch.cos(a) * torch.cos(b), -2 * torch.sin(a) * torch.sin(b)], dim=-1)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def models_1d() -> tuple[DerivativeGP, DerivativeGP]:
    X = torch.linspace(0, 6, 10, dtype=DTYPE)
    y, g = f1(X), df1(X).unsqueeze(-1)
    y[4] = math.nan  # a slope without its value: the segment is centred on the posterior mean
    g[7] = math.nan
    with_grad = DerivativeGP(X, y, g).fit(maxiter=15)
    values_only = DerivativeGP(X, f1(X)).fit(maxiter=15)
    return with_grad, values_only


@pytest.fixture(scope="module")
def model_2d() -> DerivativeGP:
    X = torch.rand(12, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    g = df2(X)
    g[:3, 1] = math.nan  # only one component observed: no observed arrow
    g[3:5] = math.nan
    return DerivativeGP(X, f2(X), g).fit(maxiter=15)


def panels(fig) -> list:
    """The figure's axes other than colour bars."""
    return [a for a in fig.axes if a.get_label() != "<colorbar>"]


def colorbar_labels(fig) -> list[str]:
    return [a.get_ylabel() or a.get_xlabel() for a in fig.axes if a.get_label() == "<colorbar>"]


def legend_labels(ax) -> list[str]:
    legend = ax.get_legend()
    return [] if legend is None else [t.get_text() for t in legend.get_texts()]


def assert_publishable(fig) -> None:
    """Every panel has both axis labels, every colour bar a label, and no text says nan or '1 seeds'."""
    fig.canvas.draw()  # tick labels exist only once drawn
    for ax in panels(fig):
        assert ax.get_xlabel().strip() or any(  # stacked panels share the lowest one's x label
            other.get_xlabel().strip() for other in ax.get_shared_x_axes().get_siblings(ax)
        ), ax.get_title()
        assert ax.get_ylabel().strip(), ax.get_title()
    assert all(label.strip() for label in colorbar_labels(fig))
    texts = " | ".join(t.get_text() for t in fig.findobj(Text)).lower()
    assert "nan" not in texts.replace("nanometre", "")
    assert "1 seeds" not in texts


def assert_png(path: str | Path) -> None:
    path = Path(path)
    assert path.is_file()
    assert path.stat().st_size > 5_000
    assert path.read_bytes()[:8] == PNG_MAGIC


# ------------------------------------------------------------------------------------ plot_1d
def test_plot_1d_renders_png(models_1d, tmp_path):
    model, _ = models_1d
    x = torch.linspace(0, 6, 50, dtype=DTYPE)
    fig = plot_1d(model, x, truth=f1, truth_grad=df1(x).numpy(), label="with derivatives")
    assert len(fig.axes) == 2
    out = save_figure(fig, tmp_path / "one_d.png")
    assert out == tmp_path / "one_d.png"
    assert_png(out)


def test_plot_1d_tangents_at_observed_points(models_1d):
    model, _ = models_1d
    fig = plot_1d(model, n=60)
    top, bottom = fig.axes
    X, y, g = (model._init_args[k].numpy() for k in ("X", "y", "grad"))
    observed = ~np.isnan(g[:, 0])
    (segments,) = [c for c in top.collections if isinstance(c, LineCollection) and c.get_label() == "observed slope"]
    segs = np.asarray(segments.get_segments())  # n_obs x 2 x 2
    assert segs.shape == (observed.sum(), 2, 2)
    mid = segs.mean(axis=1)
    np.testing.assert_allclose(mid[:, 0], X[observed, 0])
    slope = (segs[:, 1, 1] - segs[:, 0, 1]) / (segs[:, 1, 0] - segs[:, 0, 0])
    np.testing.assert_allclose(slope, g[observed, 0])
    # Centred on the observed value, or on the posterior mean where the value is missing.
    centre = y[observed]
    with torch.no_grad():
        fill = model.predict(torch.as_tensor(X[observed & np.isnan(y)])).mean.numpy()
    centre[np.isnan(centre)] = fill
    np.testing.assert_allclose(mid[:, 1], centre)
    # A few % of the x range long (in x), and the observed slopes are dots on the f' panel.
    width = segs[:, 1, 0] - segs[:, 0, 0]
    assert np.all(width > 0) and np.all(width <= 0.1 * 6)
    dots = [ln for ln in bottom.lines if ln.get_label() == "observed"]
    np.testing.assert_allclose(dots[0].get_ydata(), g[observed, 0])


def test_plot_1d_overlay_into_given_axes(models_1d, tmp_path):
    with_grad, values_only = models_1d
    fig, axes = plt.subplots(2, 1)
    assert plot_1d(with_grad, axes=axes, label="values + derivatives", truth=f1, truth_grad=df1) is fig
    n_lines = [len(ax.lines) for ax in axes]
    assert plot_1d(values_only, axes=axes, label="values only", color="C3", truth=f1, truth_grad=df1) is fig
    assert len(fig.axes) == 2  # drawn into the given axes, no new ones
    assert all(len(ax.lines) > n for ax, n in zip(axes, n_lines, strict=True))
    for ax in axes:
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "values + derivatives" in labels and "values only" in labels
        assert labels.count("truth") == 1 and labels.count("observed") == 1
    (second,) = [ln for ln in axes[0].lines if ln.get_label() == "values only"]
    assert matplotlib.colors.same_color(second.get_color(), "C3")
    assert_png(save_figure(fig, tmp_path / "overlay.png"))


def test_plot_1d_errors(models_1d, model_2d):
    model, _ = models_1d
    with pytest.raises(ValueError, match="model"):
        plot_1d(model_2d)
    with pytest.raises(TypeError, match="model"):
        plot_1d("not a model")
    _, ax = plt.subplots()
    with pytest.raises(ValueError, match="axes"):
        plot_1d(model, axes=ax)
    with pytest.raises(ValueError, match="truth"):
        plot_1d(model, n=20, truth=np.zeros(7))
    with pytest.raises(ValueError, match="x"):
        plot_1d(model, np.zeros((3, 2)))


# ------------------------------------------------------------------------------------ plot_2d
def test_plot_2d_nan_masked_gradients(model_2d, tmp_path):
    fig = plot_2d(model_2d, resolution=25, truth=f2, arrows=8)
    ax, _ = panels(fig)
    quivers = [c for c in ax.collections if isinstance(c, Quiver)]
    predicted, observed = quivers
    assert predicted.N == 8 * 8
    g = model_2d._init_args["grad"]
    both = ~torch.isnan(g).any(dim=1)
    assert observed.N == int(both.sum()) == 7
    np.testing.assert_allclose(observed.U, g[both, 0].numpy())
    assert_png(save_figure(fig, tmp_path / "two_d.png"))


def test_plot_2d_into_given_axes_with_bounds(model_2d, tmp_path):
    X = model_2d._init_args["X"]
    values_only = DerivativeGP(X, f2(X)).fit(maxiter=10)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    levels = np.linspace(-1, 1, 11)
    assert plot_2d(model_2d, axes=axes[0], bounds=[[0, 0], [1, 1]], resolution=20, levels=levels) is fig
    assert plot_2d(values_only, axes=[axes[1]], bounds=torch.tensor([[0.0, 0.0], [1.0, 1.0]]), arrows=0) is fig
    assert axes[0].get_xlim() == (0.0, 1.0) and axes[1].get_ylim() == (0.0, 1.0)
    assert not any(isinstance(c, Quiver) for c in axes[1].collections)  # no arrows asked, none observed
    assert_png(save_figure(fig, tmp_path / "sub" / "dir" / "two_d.png"))


def test_plot_2d_errors(models_1d, model_2d):
    with pytest.raises(ValueError, match="model"):
        plot_2d(models_1d[0])
    with pytest.raises(ValueError, match="bounds"):
        plot_2d(model_2d, bounds=[[0, 1], [1, 0]])
    with pytest.raises(ValueError, match="resolution"):
        plot_2d(model_2d, resolution=1)
    with pytest.raises(ValueError, match="truth"):
        plot_2d(model_2d, resolution=5, truth=lambda X: X)


# ------------------------------------------------------------------------------------ plot_regret
def test_plot_regret_numpy_and_torch(tmp_path):
    rng = np.random.default_rng(0)
    numpy_curves = np.minimum.accumulate(rng.random((4, 15)), axis=1)
    torch_curves = torch.cummin(torch.rand(3, 15, dtype=DTYPE), dim=1).values
    torch_curves[0, -1] = 0.0  # zero regret is clipped, not -inf
    fig = plot_regret({"random": numpy_curves, "EI": torch_curves})
    (ax,) = fig.axes
    lines = {ln.get_label(): ln for ln in ax.lines}
    np.testing.assert_allclose(lines["random (4 seeds)"].get_ydata(), np.log10(numpy_curves).mean(axis=0))
    assert np.isfinite(lines["EI (3 seeds)"].get_ydata()).all()
    np.testing.assert_array_equal(lines["EI (3 seeds)"].get_xdata(), np.arange(1, 16))
    assert ax.get_ylabel() == r"$\log_{10}$ regret"
    assert_png(save_figure(fig, str(tmp_path / "regret.png")))


def test_plot_regret_linear_into_given_axes(tmp_path):
    fig, ax = plt.subplots()
    curves = torch.tensor([[3.0, 2.0, 1.0], [1.0, 1.0, 1.0]])
    assert plot_regret({"a": curves}, ax=ax, log=False, ylabel="regret") is fig
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [2.0, 1.5, 1.0])
    assert_png(save_figure(fig, tmp_path / "regret_linear.png"))


@pytest.mark.parametrize("bad", [np.zeros(5), torch.zeros(2, 3, 4), np.zeros((0, 4))])
def test_plot_regret_rejects_non_2d(bad):
    with pytest.raises(ValueError, match=r"curves\['bad'\]"):
        plot_regret({"good": np.ones((2, 4)), "bad": bad})


def test_plot_regret_rejects_empty():
    with pytest.raises(ValueError, match="curves"):
        plot_regret({})


# ------------------------------------------------------------------------------------ publishable figures
def test_plot_1d_labels_units_and_band_legend(models_1d):
    with_grad, values_only = models_1d
    fig = plot_1d(with_grad, n=40, label="with slopes", xlabel="depth [m]", ylabel="T [K]", grad_ylabel="dT/dz [K/m]")
    plot_1d(values_only, n=40, axes=fig.axes, label="values only", band_label="values only ± 2 std")
    assert_publishable(fig)
    top, bottom = fig.axes
    assert (top.get_ylabel(), bottom.get_ylabel(), bottom.get_xlabel()) == ("T [K]", "dT/dz [K/m]", "depth [m]")
    for ax in (top, bottom):
        labels = legend_labels(ax)
        assert "with slopes ± 2 std" in labels and "values only ± 2 std" in labels
        bands = [c for c in ax.collections if isinstance(c, PolyCollection) and c.get_label().endswith("± 2 std")]
        assert len(bands) == 2  # each band is the labelled artist, not a stand-in
    # Separate (not stacked) panels each get the x label.
    _, axes = plt.subplots(1, 2)
    plot_1d(with_grad, n=20, axes=axes, xlabel="t [s]")
    assert [ax.get_xlabel() for ax in axes] == ["t [s]", "t [s]"]


def test_plot_2d_has_a_std_panel_with_labelled_colour_bars(model_2d):
    fig = plot_2d(model_2d, resolution=15, arrows=5, label="h [m]", xlabel="east [km]", ylabel="north [km]")
    assert_publishable(fig)
    mean_ax, std_ax = panels(fig)
    assert colorbar_labels(fig) == ["posterior mean of h [m]", "posterior std of h [m]"]
    assert (std_ax.get_xlabel(), std_ax.get_ylabel()) == ("east [km]", "north [km]")
    (shaded,) = [c for c in std_ax.collections if hasattr(c, "levels")]
    # Levels from 0 up to at least the largest std on the plotted grid.
    lo, hi = model_2d.training_data["X"].min(0).values, model_2d.training_data["X"].max(0).values
    u = torch.linspace(lo[0], hi[0], 15, dtype=DTYPE)
    v = torch.linspace(lo[1], hi[1], 15, dtype=DTYPE)
    U, V = torch.meshgrid(u, v, indexing="xy")
    with torch.no_grad():
        std = model_2d.predict(torch.stack([U.reshape(-1), V.reshape(-1)], -1)).std
    assert shaded.levels[0] == 0.0 and shaded.levels[-1] >= std.max().item() - 1e-12
    assert "training inputs" in legend_labels(std_ax)
    for ax in (mean_ax, std_ax):
        assert ax.get_aspect() == 1.0  # a map: one unit as long on both axes


def test_plot_2d_axes_argument(model_2d):
    fig, axes = plt.subplots(1, 2)
    plot_2d(model_2d, resolution=8, arrows=0, axes=axes)
    assert len(panels(fig)) == 2 and colorbar_labels(fig)[1] == "posterior std of f"
    with pytest.raises(ValueError, match="axes"):
        plot_2d(model_2d, axes=[axes[0]] * 3)
    with pytest.raises(TypeError, match="label"):
        plot_2d(model_2d, label="")


def test_plot_map_diverging_centred_at_zero_and_masked_grey(tmp_path):
    x1, x2 = np.linspace(0, 2, 5), np.linspace(0, 1, 3)
    error = np.array([[-0.5, 0.1, 2.0, np.nan, 0.0], [0.3, -0.2, 0.1, 0.4, np.nan], [1.0, 0.0, -1.0, 0.2, 0.1]])
    fig = plot_map(error, x1, x2, label="error [m]", diverging=True, xlabel="x [m]", ylabel="y [m]")
    assert_publishable(fig)
    (ax,) = panels(fig)
    (mesh,) = ax.collections
    norm = mesh.norm
    assert isinstance(norm, TwoSlopeNorm) and norm.vcenter == 0.0 and norm.vmin == -norm.vmax == -2.0
    assert norm(0.0) == 0.5  # zero is the centre (white) of the colour map
    bad = to_rgba(mesh.cmap.get_bad())
    assert bad[3] == 1.0 and bad[:3] != (1.0, 1.0, 1.0)  # opaque, not white: not to be read as a zero error
    assert np.ma.getmaskarray(mesh.get_array()).sum() == 2
    assert colorbar_labels(fig) == ["error [m]"] and ax.get_aspect() == 1.0
    # A given limit clips symmetrically, and the colour bar marks the values beyond it (2.0).
    fig = plot_map(error, x1, x2, label="error [m]", diverging=True, limit=1.0)
    (mesh,) = panels(fig)[0].collections
    assert (mesh.norm.vmin, mesh.norm.vmax) == (-1.0, 1.0)
    assert [a for a in fig.axes if a.get_label() == "<colorbar>"][0]._colorbar.extend == "max"  # only 2.0 > 1
    assert_png(save_figure(fig, tmp_path / "map.png"))


def test_plot_map_sequential_and_errors():
    x1, x2 = np.arange(3.0), np.arange(2.0)
    fig = plot_map(np.arange(6.0).reshape(2, 3), x1, x2, label="elevation [m]", vmin=1.0, equal_aspect=False)
    (mesh,) = panels(fig)[0].collections
    assert (mesh.norm.vmin, mesh.norm.vmax) == (1.0, 5.0)
    assert panels(fig)[0].get_aspect() == "auto"
    with pytest.raises(ValueError, match="values"):
        plot_map(np.zeros((3, 2)), x1, x2, label="z")
    with pytest.raises(ValueError, match="vmin"):
        plot_map(np.zeros((2, 3)), x1, x2, label="z", diverging=True, vmin=0.0)
    with pytest.raises(ValueError, match="limit"):
        plot_map(np.zeros((2, 3)), x1, x2, label="z", diverging=True, limit=-1.0)
    with pytest.raises(TypeError, match="label"):
        plot_map(np.zeros((2, 3)), x1, x2, label=" ")


def test_plot_regret_integer_ticks_band_entry_and_seed_count():
    rng = np.random.default_rng(1)
    fig = plot_regret({"EI": rng.random((3, 4)), "single": rng.random((1, 4))})
    assert_publishable(fig)
    (ax,) = fig.axes
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)  # evaluations are counts
    labels = legend_labels(ax)
    assert "EI (3 seeds)" in labels and "single (1 seed)" in labels
    assert "± 1 standard error over seeds" in labels
    assert any(isinstance(h, Patch) for h in ax.get_legend().legend_handles)
    # One seed only: no band, so no legend entry for one.
    fig = plot_regret({"single": [[1.0, 0.5, 0.1]]})
    assert_publishable(fig)
    assert legend_labels(fig.axes[0]) == ["single (1 seed)"]


def test_save_figure_dpi(tmp_path):
    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1])
    out = save_figure(fig, tmp_path / "small.png")
    width, height = plt.imread(out).shape[1::-1]
    assert (width, height) == (300, 150)  # 150 dpi by default
    out = save_figure(fig, tmp_path / "big.png", dpi=200)
    assert plt.imread(out).shape[1] == 400
    with pytest.raises(ValueError, match="dpi"):
        save_figure(fig, tmp_path / "x.png", dpi=0)
