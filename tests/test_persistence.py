"""Save/load round trip: bit-identical predictions, kernels and scaling included; bad files."""

from __future__ import annotations

import math

import pytest
import torch
from gpytorch.kernels import ScaleKernel

from gpderiv import DerivativeGP
from gpderiv.kernels import DerivativeMatern52Kernel

DTYPE = torch.float64


def data(n: int = 12, d: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(n, d, dtype=DTYPE, generator=gen) * 50 + 3  # scaling matters
    y = 100 * torch.sin(X / 20).sum(-1)
    grad = 5 * torch.cos(X / 20)
    grad[2, 1] = math.nan
    y[4] = math.nan
    return X, y, grad


@pytest.mark.parametrize("kernel", [None, ScaleKernel(DerivativeMatern52Kernel(ard_num_dims=2))])
def test_save_load_round_trip_is_bit_identical(tmp_path, kernel) -> None:
    X, y, grad = data()
    model = DerivativeGP(X, y, grad, kernel=kernel, grad_noise=1e-4).fit(maxiter=15)
    Xs = torch.rand(7, 2, dtype=DTYPE) * 50 + 3
    before = model.predict(Xs, full_cov=True)
    path = tmp_path / "model.pt"
    model.save(path)
    loaded = DerivativeGP.load(path)
    after = loaded.predict(Xs, full_cov=True)
    for name in ("mean", "variance", "grad_mean", "grad_variance", "covariance"):
        assert torch.equal(getattr(before, name), getattr(after, name)), name
    assert type(loaded.covar_module.base_kernel) is type(model.covar_module.base_kernel)
    assert loaded.mll == model.mll and loaded.mll_history == model.mll_history
    assert torch.equal(loaded.scaling.x_scale, model.scaling.x_scale)
    assert loaded.num_observations == model.num_observations


def test_load_missing_corrupt_and_foreign_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        DerivativeGP.load(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable gpderiv model file"):
        DerivativeGP.load(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match="not a gpderiv model file"):
        DerivativeGP.load(foreign)
    X, y, grad = data()
    model = DerivativeGP(X, y, grad)
    good = tmp_path / "good.pt"
    model.save(good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="gpderiv model file"):
        DerivativeGP.load(truncated)
    payload = torch.load(good, weights_only=False)
    payload["version"] = 99
    newer = tmp_path / "newer.pt"
    torch.save(payload, newer)
    with pytest.raises(ValueError, match="newer gpderiv"):
        DerivativeGP.load(newer)
