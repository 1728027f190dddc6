"""Directional derivatives, second derivatives and the general functional-covariance path."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torch.distributions import MultivariateNormal
from torch.func import hessian, jacrev, vmap

from gpderiv import DerivativeGP
from gpderiv.blocks import (
    functional_covariance,
    matern52_profile,
    rbf_profile,
    stationary_derivative_blocks,
)
from gpderiv.kernels import DerivativeMatern32Kernel
from gpderiv.testing import assert_close

DTYPE = torch.float64


def f(x: Tensor) -> Tensor:
    return torch.sin(2 * x[..., 0]) * torch.cos(x[..., -1]) + 0.3 * x[..., 0] ** 2


def elementary(n: int, d: int) -> tuple[Tensor, Tensor]:
    """Every functional of order <= 2 at each of n points: value, d partials, d^2 second derivatives."""
    point, idx = [], []
    for i in range(n):
        point.append(i)
        idx.append([-1, -1])
        for a in range(d):
            point.append(i)
            idx.append([a, -1])
        for a in range(d):
            for b in range(d):
                point.append(i)
                idx.append([a, b])
    return torch.tensor(point), torch.tensor(idx)


def autograd_derivative(k, indices1: list[int], indices2: list[int]):
    """d^indices1 / dx1 d^indices2 / dx2 of k(x1, x2) by nested jacrev."""
    fn = k
    for argnum, indices in ((0, indices1), (1, indices2)):
        for a in indices:
            if a < 0:
                continue
            fn = (lambda g, aa, arg: lambda x1, x2: jacrev(g, arg)(x1, x2)[aa])(fn, a, argnum)
    return fn


@pytest.mark.parametrize(
    ("profile", "radial", "coincident_ok"),
    [
        (rbf_profile, lambda u: torch.exp(-0.5 * u), True),
        (matern52_profile, lambda u: (1 + torch.sqrt(5 * u) + 5 * u / 3) * torch.exp(-torch.sqrt(5 * u)), False),
    ],
)
def test_functional_covariance_matches_autograd_for_every_order(profile, radial, coincident_ok) -> None:
    gen = torch.Generator().manual_seed(0)
    d, n1, n2 = 2, 2, 3
    x1 = torch.randn(n1, d, dtype=DTYPE, generator=gen)
    x2 = torch.randn(n2, d, dtype=DTYPE, generator=gen)
    x2[0] = x1[1]
    ls = torch.tensor([[0.7, 1.3]], dtype=DTYPE)
    p1, i1 = elementary(n1, d)
    p2, i2 = elementary(n2, d)
    C = functional_covariance(x1[p1], x2[p2], i1, i2, ls, profile)

    def k(a: Tensor, b: Tensor) -> Tensor:
        return radial((((a - b) / ls[0]) ** 2).sum())

    for r in range(len(p1)):
        for s in range(len(p2)):
            if (p1[r].item(), p2[s].item()) == (1, 0) and not coincident_ok:
                continue  # sqrt-based reference is NaN at r = 0; limits are checked below
            expected = autograd_derivative(k, i1[r].tolist(), i2[s].tolist())(x1[p1[r]], x2[p2[s]])
            assert_close(C[r, s], expected, scale=100)
    # Diagonal mode equals the diagonal of the matrix.
    assert_close(
        functional_covariance(x1[p1][:7], x1[p1][:7], i1[:7], i1[:7], ls, profile, pairwise=False),
        functional_covariance(x1[p1][:7], x1[p1][:7], i1[:7], i1[:7], ls, profile).diagonal(),
    )


def test_functional_covariance_is_continuous_at_coincident_points_for_matern52() -> None:
    d = 2
    p, idx = elementary(1, d)
    x = torch.tensor([[0.3, -0.2]], dtype=DTYPE)
    ls = torch.tensor([[0.8, 1.1]], dtype=DTYPE)
    at = functional_covariance(x[p], x[p], idx, idx, ls, matern52_profile)
    near = functional_covariance(x[p], (x + 1e-7)[p], idx, idx, ls, matern52_profile)
    assert torch.isfinite(at).all()
    torch.testing.assert_close(at, near, rtol=1e-4, atol=1e-4)
    # Exact limit of d4 k / dx_a^2 dx'_a^2 at 0: phi''(0) * 3 * (2 w_a)^2 = 25 w_a^2.
    w = ls[0, 0] ** -2
    row = 1 + d  # the (0, 0) second derivative
    assert_close(at[row, row], 25 * w**2)


def test_functional_path_reproduces_the_fast_gradient_blocks() -> None:
    gen = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(3, 3, dtype=DTYPE, generator=gen), torch.randn(4, 3, dtype=DTYPE, generator=gen)
    ls = torch.tensor([[0.5, 0.9, 1.7]], dtype=DTYPE)

    def block(n: int, d: int) -> tuple[Tensor, Tensor]:
        point = torch.cat([torch.arange(n), torch.arange(n).repeat_interleave(d)])
        first = torch.cat([torch.full((n,), -1), torch.arange(d).repeat(n)])
        return point, torch.stack([first, torch.full_like(first, -1)], -1)

    (q1, j1), (q2, j2) = block(3, 3), block(4, 3)
    for profile in (rbf_profile, matern52_profile):
        assert_close(
            functional_covariance(x1[q1], x2[q2], j1, j2, ls, profile),
            stationary_derivative_blocks(x1, x2, ls, profile),
        )


# ----------------------------------------------------------------------------------------------
# Models with directional and second-derivative observations, against dense references
# ----------------------------------------------------------------------------------------------


def reference_covariance(
    X1: Tensor, F1: list, X2: Tensor, F2: list, lengthscale: Tensor, outputscale: Tensor
) -> Tensor:
    """Covariance of functionals [(point, [(coef, indices), ...]), ...] of the plain RBF, by torch.func."""

    def k(a: Tensor, b: Tensor) -> Tensor:
        return outputscale * torch.exp(-0.5 * (((a - b) / lengthscale) ** 2).sum())

    out = torch.zeros(len(F1), len(F2), dtype=DTYPE)
    for r, (p, terms1) in enumerate(F1):
        for s, (q, terms2) in enumerate(F2):
            for c1, ind1 in terms1:
                for c2, ind2 in terms2:
                    out[r, s] += c1 * c2 * autograd_derivative(k, ind1, ind2)(X1[p], X2[q])
    return out


def test_hessian_and_directional_observations_match_dense_reference_mll() -> None:
    gen = torch.Generator().manual_seed(2)
    n, d = 5, 2
    X = torch.rand(n, d, dtype=DTYPE, generator=gen) * torch.tensor([10.0, 0.1], dtype=DTYPE)  # anisotropic units
    y = 5 * f(X * torch.tensor([0.1, 10.0], dtype=DTYPE))
    y[1] = math.nan
    H = torch.full((n, d, d), math.nan, dtype=DTYPE)
    H[0] = torch.tensor([[0.2, 1.5], [1.5, -40.0]])
    H[3, 1, 1] = 7.0
    H[4, 1, 0] = -2.0  # given below the diagonal only
    index = torch.tensor([0, 2, 2])
    V = torch.tensor([[1.0, 0.0], [0.6, -3.0], [2.0, 1.0]], dtype=DTYPE)
    dvalues = torch.tensor([0.5, -1.0, 2.0], dtype=DTYPE)
    model = DerivativeGP(X, y, directional=(index, V, dvalues), hessian=H)
    model.covar_module.base_kernel.lengthscale = torch.tensor([0.4, 0.7], dtype=DTYPE)
    model.covar_module.outputscale = torch.tensor(1.3, dtype=DTYPE)
    hp = model.hyperparameters()
    assert model.num_observations == 4 + 3 + 5

    # The same rows, in the user's units, by hand.
    F = [(i, [(1.0, [-1, -1])]) for i in range(n) if i != 1]
    F += [(int(i), [(v[a].item(), [a, -1]) for a in range(d)]) for i, v in zip(index, V, strict=True)]
    F += [(0, [(1.0, [0, 0])]), (0, [(1.0, [0, 1])]), (0, [(1.0, [1, 1])]), (3, [(1.0, [1, 1])]), (4, [(1.0, [0, 1])])]
    targets = torch.cat([y[[0, 2, 3, 4]], dvalues, torch.tensor([0.2, 1.5, -40.0, 7.0, -2.0], dtype=DTYPE)])
    K = reference_covariance(X, F, X, F, hp["base_kernel.lengthscale"], hp["outputscale"])
    noise = torch.cat([hp["noise"].expand(4), hp["directional_noise"].expand(3), hp["hessian_noise"].expand(5)])
    mean = torch.cat([hp["mean"].expand(4), torch.zeros(8, dtype=DTYPE)])
    reference = MultivariateNormal(mean, K + torch.diag(noise)).log_prob(targets)
    assert_close(torch.tensor(model.log_marginal_likelihood(), dtype=DTYPE), reference, scale=1e4)


def test_mll_gradient_with_hessian_rows_matches_finite_differences() -> None:
    gen = torch.Generator().manual_seed(3)
    X = torch.rand(6, 2, dtype=DTYPE, generator=gen)
    H = vmap(hessian(f))(X)
    model = DerivativeGP(X, f(X), hessian=H, directional=(torch.tensor([1]), torch.tensor([[1.0, 2.0]]), [0.3]))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(model.loss(), params)
    eps = 1e-6
    for p, g in zip(params, grads, strict=True):
        for i in range(p.numel()):
            with torch.no_grad():
                p.view(-1)[i] += eps
                up = model.loss().item()
                p.view(-1)[i] -= 2 * eps
                down = model.loss().item()
                p.view(-1)[i] += eps
            assert abs((up - down) / (2 * eps) - g.view(-1)[i].item()) < 1e-6 * max(1.0, abs(g.view(-1)[i].item()))


def test_hessian_prediction_is_the_hessian_of_the_predicted_mean() -> None:
    gen = torch.Generator().manual_seed(4)
    X = torch.rand(10, 2, dtype=DTYPE, generator=gen) * 3
    model = DerivativeGP(X, f(X), vmap(jacrev(f))(X), hessian=vmap(hessian(f))(X)).fit(maxiter=30)
    xs = torch.rand(3, 2, dtype=DTYPE, generator=gen) * 3
    mean, var = model.predict_hessian(xs)
    for i in range(3):
        expected = hessian(lambda x: model.predict(x.unsqueeze(0)).mean[0])(xs[i])
        assert_close(mean[i], expected, scale=1e4)
    assert (var >= 0).all()
    assert_close(mean, mean.transpose(-1, -2))
    lap_mean, lap_var = model.laplacian(xs)
    assert_close(lap_mean, mean.diagonal(dim1=-2, dim2=-1).sum(-1), scale=1e3)


@pytest.mark.filterwarnings("ignore::gpderiv.NotFittedWarning")  # initial hyperparameters on purpose
def test_second_derivative_variance_matches_finite_differences_of_gradient_covariance() -> None:
    X = torch.linspace(0, 3, 7, dtype=DTYPE).unsqueeze(-1)
    model = DerivativeGP(X, torch.sin(2 * X[:, 0]), noise=1e-4)
    model.covar_module.base_kernel.lengthscale = torch.tensor(0.4, dtype=DTYPE)
    x, h = 1.3, 1e-4
    _, var = model.predict_hessian(torch.tensor([[x]], dtype=DTYPE))
    pred = model.predict(torch.tensor([[x - h], [x + h]], dtype=DTYPE), full_cov=True)
    g = pred.covariance[2:, 2:]  # covariance of f'(x - h), f'(x + h)
    fd = (g[0, 0] + g[1, 1] - 2 * g[0, 1]) / (2 * h) ** 2
    torch.testing.assert_close(var[0, 0, 0], fd, rtol=1e-4, atol=1e-8)
    lap_mean, lap_var = model.laplacian(torch.tensor([[x]], dtype=DTYPE))
    assert_close(lap_var, var[:, 0, 0])


def test_directional_prediction_equals_projection_of_the_gradient_posterior() -> None:
    gen = torch.Generator().manual_seed(5)
    X = torch.rand(12, 3, dtype=DTYPE, generator=gen)
    model = DerivativeGP(X, f(X), vmap(jacrev(f))(X)).fit(maxiter=20)
    xs = torch.rand(4, 3, dtype=DTYPE, generator=gen)
    V = torch.randn(4, 3, dtype=DTYPE, generator=gen)
    mean, var = model.predict_directional(xs, V)
    pred = model.predict(xs, full_cov=True)
    assert_close(mean, (pred.grad_mean * V).sum(-1), scale=1e3)
    grad_cov = pred.covariance[4:, 4:].view(4, 3, 4, 3)
    expected = torch.stack([V[i] @ grad_cov[i, :, i, :] @ V[i] for i in range(4)])
    assert_close(var, expected, scale=1e4)


def test_directional_observations_cost_one_row_each_and_inform_the_gradient() -> None:
    gen = torch.Generator().manual_seed(6)
    n, d = 15, 4
    X = torch.rand(n, d, dtype=DTYPE, generator=gen)
    V = torch.randn(n, d, dtype=DTYPE, generator=gen)
    grads = vmap(jacrev(f))(X)
    with_dir = DerivativeGP(X, f(X), directional=(torch.arange(n), V, (V * grads).sum(-1))).fit(maxiter=50)
    values_only = DerivativeGP(X, f(X)).fit(maxiter=50)
    assert with_dir.num_observations == 2 * n
    xs = torch.rand(50, d, dtype=DTYPE, generator=gen) * 0.6 + 0.2
    truth = vmap(jacrev(f))(xs)
    err = [(m.predict(xs).grad_mean - truth).square().mean().sqrt() for m in (with_dir, values_only)]
    assert err[0] < err[1]


@pytest.mark.filterwarnings("ignore::gpderiv.NotFittedWarning")  # initial hyperparameters on purpose
def test_noise_free_hessian_observations_are_interpolated() -> None:
    X = torch.tensor([[0.1, 0.2], [0.7, 0.4], [0.4, 0.9]], dtype=DTYPE)
    H = vmap(hessian(f))(X)
    model = DerivativeGP(X, f(X), hessian=H, noise=0.0, noise_lower_bound=1e-12)
    model.likelihood.raw_hessian_noise.data.fill_(-30.0)  # essentially noise-free second derivatives
    mean, var = model.predict_hessian(X)
    assert_close(mean, H, scale=1e5)
    assert var.max() < 1e-6


@pytest.mark.filterwarnings("ignore::gpderiv.NotFittedWarning")  # initial hyperparameters on purpose
def test_second_derivative_observations_need_a_twice_differentiable_kernel() -> None:
    X = torch.rand(4, 2, dtype=DTYPE)
    H = vmap(hessian(f))(X)
    from gpytorch.kernels import ScaleKernel

    with pytest.raises(ValueError, match="mean-square differentiable"):
        DerivativeGP(X, f(X), hessian=H, kernel=ScaleKernel(DerivativeMatern32Kernel(ard_num_dims=2)))
    model = DerivativeGP(X, f(X), kernel=ScaleKernel(DerivativeMatern32Kernel(ard_num_dims=2)))
    with pytest.raises(ValueError, match="mean-square differentiable"):
        model.predict_hessian(X)


def test_bad_directional_and_hessian_input() -> None:
    X = torch.rand(4, 2, dtype=DTYPE)
    y = f(X)
    with pytest.raises(TypeError, match="directional"):
        DerivativeGP(X, y, directional=torch.ones(4, 2))
    with pytest.raises(ValueError, match=r"directional: expected point indices in \[0, 4\)"):
        DerivativeGP(X, y, directional=([0, 4], torch.ones(2, 2), [1.0, 2.0]))
    with pytest.raises(ValueError, match=r"directional directions: expected shape \(2, 2\)"):
        DerivativeGP(X, y, directional=([0, 1], torch.ones(2, 3), [1.0, 2.0]))
    with pytest.raises(ValueError, match="non-zero direction"):
        DerivativeGP(X, y, directional=([0, 1], torch.zeros(2, 2), [1.0, 2.0]))
    with pytest.raises(TypeError, match="directional: expected index as `k` integers"):
        DerivativeGP(X, y, directional=([0.5, 1.0], torch.ones(2, 2), [1.0, 2.0]))
    with pytest.raises(ValueError, match=r"hessian: expected shape \(4, 2, 2\)"):
        DerivativeGP(X, y, hessian=torch.zeros(4, 2))
    H = torch.zeros(4, 2, 2, dtype=DTYPE)
    H[1, 0, 1], H[1, 1, 0] = 1.0, 2.0
    with pytest.raises(ValueError, match=r"hessian: expected symmetric second derivatives, got H\[1, 0, 1\]"):
        DerivativeGP(X, y, hessian=H)
    model = DerivativeGP(X, y)
    with pytest.raises(ValueError, match=r"V: expected shape \(4, 2\) or \(2,\)"):
        model.predict_directional(X, torch.ones(3, 2))


def test_second_derivative_covariances_match_finite_differences_of_the_kernel() -> None:
    ls = torch.tensor([[0.8, 1.2]], dtype=DTYPE)
    x1, x2 = torch.tensor([0.3, -0.1], dtype=DTYPE), torch.tensor([0.9, 0.4], dtype=DTYPE)
    h = 1e-3
    e = torch.eye(2, dtype=DTYPE) * h
    for profile in (rbf_profile, matern52_profile):

        def k(a: Tensor, b: Tensor, profile=profile) -> Tensor:
            return functional_covariance(
                a[None], b[None], torch.tensor([[-1, -1]]), torch.tensor([[-1, -1]]), ls, profile
            )[0, 0]

        for a in range(2):
            for b in range(2):
                fd = (
                    k(x1 + e[a] + e[b], x2)
                    - k(x1 + e[a] - e[b], x2)
                    - k(x1 - e[a] + e[b], x2)
                    + k(x1 - e[a] - e[b], x2)
                ) / (4 * h * h)
                exact = functional_covariance(
                    x1[None], x2[None], torch.tensor([[a, b]]), torch.tensor([[-1, -1]]), ls, profile
                )
                torch.testing.assert_close(exact[0, 0], fd, rtol=2e-4, atol=1e-6)  # O(h^2) truncation


def test_predict_with_hessian_flag_and_automatic_progress_bar(capsys: pytest.CaptureFixture) -> None:
    X = torch.rand(8, 2, dtype=DTYPE)
    model = DerivativeGP(X, f(X)).fit(maxiter=5)  # quick: the automatic bar stays silent
    assert "fit 1/1" not in capsys.readouterr().err
    pred = model.predict(X[:3], hessian=True)
    mean, var = model.predict_hessian(X[:3])
    assert torch.equal(pred.hessian_mean, mean) and torch.equal(pred.hessian_variance, var)
    assert model.predict(X[:3]).hessian_mean is None
    model.fit(maxiter=3, progress=True)
    assert "fit 1/1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("terminal", "progress", "shown"), [(False, None, False), (True, None, True), (False, True, True)]
)
def test_automatic_progress_bar_only_on_a_terminal(monkeypatch, terminal, progress, shown) -> None:
    """Like GPyTorch, BoTorch and scikit-learn: no bar in logs, CI or pipes unless asked for."""
    import gpderiv.fitting as fitting

    seen = []
    original = fitting.tqdm
    monkeypatch.setattr(fitting, "tqdm", lambda *a, **k: seen.append(not k["disable"]) or original(*a, **k))
    monkeypatch.setattr(fitting, "_stderr_is_terminal", lambda: terminal)
    X = torch.rand(6, 2, dtype=DTYPE)
    DerivativeGP(X, f(X)).fit(maxiter=2, progress=progress)
    assert seen == [shown]
