"""Smoke test of examples/terrain.py (Mount St Helens) on 1,000 points."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "terrain.py"


def load_example():
    spec = importlib.util.spec_from_file_location("terrain_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_terrain_smoke(tmp_path) -> None:
    terrain = load_example()  # the data ships with the package: no skip on a fresh clone
    result = terrain.main(["--smoke", "--out", str(tmp_path)])
    assert Path(result["figure"]).exists()
    with_grad, values_only = result["rows"]
    assert with_grad["N"] == 3 * values_only["N"]
    # 500 training points are too sparse for the slopes to help (the fitted lengthscale is
    # shorter than the spacing); the full protocol is in docs/terrain.md.
    assert 0 < with_grad["error"] < 0.5 and 0 < values_only["error"] < 0.3


def test_mount_st_helens_ships_with_the_package() -> None:
    import torch

    from gpderiv.datasets import mount_st_helens

    data = mount_st_helens()
    nx, ny = data.shape
    assert data.X.shape == (nx * ny, 2) == (14040, 2) and data.y.shape == (14040,) and data.grad.shape == (14040, 2)
    assert data.X.dtype == data.y.dtype == data.grad.dtype == torch.float64
    assert torch.isfinite(data.y).all() and torch.isfinite(data.grad).all()
    # A regular grid, first coordinate fastest, step 8 ...
    grid = data.X.reshape(ny, nx, 2)
    assert (grid[:, 1:, 0] - grid[:, :-1, 0] == 8).all() and (grid[1:, :, 1] - grid[:-1, :, 1] == 8).all()
    # ... whose measured slopes follow the elevations' central differences (correlation 0.81-0.83).
    Z, G = data.y.reshape(ny, nx), data.grad.reshape(ny, nx, 2)
    for fd, g in (((Z[:, 2:] - Z[:, :-2]) / 16, G[:, 1:-1, 0]), ((Z[2:] - Z[:-2]) / 16, G[1:-1, :, 1])):
        assert torch.corrcoef(torch.stack([fd.flatten(), g.flatten()]))[0, 1] > 0.75
