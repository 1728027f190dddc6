"""DerivativeGP: marginal likelihood, its gradient, prediction, NaN masking, scaling, fitting."""

from __future__ import annotations

import math
import warnings

import gpytorch
import pytest
import torch
from linear_operator.operators import DenseLinearOperator
from torch import Tensor
from torch.distributions import MultivariateNormal
from torch.func import jacrev, vmap

import gpderiv
import gpderiv.inference.dense as dense
from gpderiv import DerivativeGP
from gpderiv.testing import assert_close, train_covariance

DTYPE = torch.float64


def franke_like(X: Tensor) -> Tensor:
    return torch.sin(3 * X[..., 0]) * torch.cos(2 * X[..., -1]) + 0.5 * X[..., 0]


def gradient(fn, X: Tensor) -> Tensor:
    return vmap(jacrev(fn))(X)


def make_data(n: int = 12, d: int = 2, seed: int = 0, scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(n, d, generator=gen, dtype=DTYPE) * scale
    return X, franke_like(X), gradient(franke_like, X)


def set_hypers(model: DerivativeGP, lengthscale: float | list[float], outputscale: float, noise: float) -> None:
    """Set internal-unit hyperparameters (noise on every row kind)."""
    model.covar_module.base_kernel.lengthscale = torch.as_tensor(lengthscale, dtype=DTYPE)
    model.covar_module.outputscale = torch.as_tensor(outputscale, dtype=DTYPE)
    lik = model.likelihood
    for name in ("raw_value_noise", "raw_grad_noise"):
        if hasattr(lik, name):
            raw = getattr(lik, name)
            constraint = getattr(lik, f"{name}_constraint")
            with torch.no_grad():
                raw.copy_(constraint.inverse_transform(torch.full_like(raw, noise)))
    with torch.no_grad():
        model.mean_module.constant.fill_(0.3)


def plain_rbf_blocks(X1: Tensor, X2: Tensor, lengthscale: Tensor, outputscale: Tensor) -> Tensor:
    """Block covariance built by torch.func from the plain RBF (independent of gpderiv.blocks)."""

    def k(a: Tensor, b: Tensor) -> Tensor:
        return outputscale * torch.exp(-0.5 * ((a - b) / lengthscale).square().sum())

    pair = vmap(vmap(k, (None, 0)), (0, None))
    dk2 = vmap(vmap(jacrev(k, 1), (None, 0)), (0, None))  # n1 x n2 x d
    dk1 = vmap(vmap(jacrev(k, 0), (None, 0)), (0, None))
    dk12 = vmap(vmap(jacrev(jacrev(k, 0), 1), (None, 0)), (0, None))  # n1 x n2 x d x d
    n1, d = X1.shape
    n2 = X2.shape[0]
    top = torch.cat([pair(X1, X2), dk2(X1, X2).reshape(n1, n2 * d)], 1)
    bottom = torch.cat(
        [dk1(X1, X2).permute(0, 2, 1).reshape(n1 * d, n2), dk12(X1, X2).permute(0, 2, 1, 3).reshape(n1 * d, n2 * d)], 1
    )
    return torch.cat([top, bottom], 0)


def user_unit_reference(
    model: DerivativeGP, X: Tensor, y: Tensor, grad: Tensor
) -> torch.distributions.MultivariateNormal:
    """The model's prior over the observed entries, rebuilt in the user's units from its hyperparameters."""
    hp = model.hyperparameters()
    n, d = X.shape
    K = plain_rbf_blocks(X, X, hp["base_kernel.lengthscale"], hp["outputscale"])
    noise = torch.cat([hp["noise"].expand(n), hp["grad_noise"].repeat(n)])
    mean = torch.cat([hp["mean"].expand(n), torch.zeros(n * d, dtype=DTYPE)])
    observed = ~torch.isnan(torch.cat([y, grad.flatten()]))
    idx = torch.nonzero(observed).flatten()
    cov = K[idx][:, idx] + torch.diag(noise[idx])
    return MultivariateNormal(mean[idx], cov), torch.cat([y, grad.flatten()])[idx]


@pytest.mark.parametrize("d", [1, 3])
def test_log_marginal_likelihood_matches_dense_reference(d: int) -> None:
    X, y, grad = make_data(n=9, d=d, scale=7.0)
    y = 20.0 * y + 3.0
    grad = 20.0 * grad
    model = DerivativeGP(X, y, grad)
    set_hypers(model, [0.4 + 0.1 * a for a in range(d)], 1.7, 1e-3)
    reference, targets = user_unit_reference(model, X, y, grad)
    assert_close(torch.tensor(model.log_marginal_likelihood(), dtype=DTYPE), reference.log_prob(targets), scale=1e3)


@pytest.mark.filterwarnings("ignore::gpderiv.NotFittedWarning")  # initial hyperparameters on purpose
def test_nan_masked_model_equals_reduced_system() -> None:
    X, y, grad = make_data(n=10, d=3)
    y[[1, 4]] = math.nan
    grad[0] = math.nan
    grad[2, 1] = math.nan
    grad[5, [0, 2]] = math.nan
    model = DerivativeGP(X, y, grad)
    set_hypers(model, [0.5, 0.6, 0.7], 1.2, 1e-4)
    assert model.num_observations == int((~torch.isnan(y)).sum() + (~torch.isnan(grad)).sum())
    reference, targets = user_unit_reference(model, X, y, grad)
    assert_close(torch.tensor(model.log_marginal_likelihood(), dtype=DTYPE), reference.log_prob(targets), scale=1e3)

    # Posterior mean and covariance by hand on the reduced system, in user units.
    hp = model.hyperparameters()
    Xs = torch.rand(4, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(5))
    K_sx = plain_rbf_blocks(Xs, X, hp["base_kernel.lengthscale"], hp["outputscale"])
    observed = torch.nonzero(~torch.isnan(torch.cat([y, grad.flatten()]))).flatten()
    K_sx = K_sx[:, observed]
    K_ss = plain_rbf_blocks(Xs, Xs, hp["base_kernel.lengthscale"], hp["outputscale"])
    prior_mean_s = torch.cat([hp["mean"].expand(4), torch.zeros(12, dtype=DTYPE)])
    solve = torch.linalg.solve(reference.covariance_matrix, torch.cat([K_sx.T, (targets - reference.mean)[:, None]], 1))
    mean = prior_mean_s + K_sx @ solve[:, -1]
    cov = K_ss - K_sx @ solve[:, :-1]
    pred = model.predict(Xs, full_cov=True)
    assert_close(torch.cat([pred.mean, pred.grad_mean.flatten()]), mean, scale=1e4)
    assert_close(pred.covariance, cov, scale=1e4)


def test_mll_gradient_matches_autograd_reference_and_finite_differences() -> None:
    X, y, grad = make_data(n=8, d=2)
    grad[3, 0] = math.nan
    model = DerivativeGP(X, y, grad, noise_prior=False)  # the loss is then the negative log marginal likelihood
    set_hypers(model, [0.5, 0.8], 1.3, 1e-3)
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model.loss()
    ours = torch.autograd.grad(loss, params)

    # Dense reference: autograd through torch's Cholesky inside MultivariateNormal.log_prob.
    def reference_loss() -> Tensor:
        K = train_covariance(model) + torch.diag(model.likelihood.row_noise(model.kinds))
        resid = model.residual()
        dist = MultivariateNormal(torch.zeros_like(resid), K)
        return -dist.log_prob(resid) / model.num_observations

    assert_close(reference_loss(), loss.detach(), scale=1e2)
    reference = torch.autograd.grad(reference_loss(), params)
    for a, b in zip(ours, reference, strict=True):
        assert_close(a, b, scale=1e3)

    # Central finite differences of the loss in each raw parameter coordinate.
    eps = 1e-6
    for p, g in zip(params, ours, strict=True):
        for i in range(p.numel()):
            with torch.no_grad():
                flat = p.view(-1)
                flat[i] += eps
                up = model.loss().item()
                flat[i] -= 2 * eps
                down = model.loss().item()
                flat[i] += eps
            assert abs((up - down) / (2 * eps) - g.view(-1)[i].item()) < 1e-6 * max(1.0, abs(g.view(-1)[i].item()))


@pytest.mark.filterwarnings("ignore::gpderiv.NotFittedWarning")  # initial hyperparameters on purpose
def test_noise_free_interpolation_of_values_and_gradients() -> None:
    X, y, grad = make_data(n=10, d=2)
    model = DerivativeGP(X, y, grad, noise=0.0, grad_noise=0.0)
    model.covar_module.base_kernel.lengthscale = torch.tensor([0.4, 0.4], dtype=DTYPE)
    pred = model.predict(X)
    assert_close(pred.mean, y, scale=1e4)
    assert_close(pred.grad_mean, grad, scale=1e4)
    assert pred.variance.max() < 1e-7 and pred.grad_variance.max() < 1e-6


@pytest.mark.filterwarnings("ignore::gpderiv.NotFittedWarning")  # initial hyperparameters on purpose
@pytest.mark.parametrize("with_grad", [True, False])
def test_grad_mean_is_the_derivative_of_the_mean(with_grad: bool) -> None:
    X, y, grad = make_data(n=15, d=3)
    model = DerivativeGP(X, y, grad if with_grad else None)
    set_hypers(model, [0.3, 0.5, 0.9], 1.0, 1e-3)
    Xs = torch.rand(6, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    Xs[0] = X[2]  # a training point: coincident with observations
    Xs.requires_grad_(True)
    pred = model.predict(Xs)
    (autograd,) = torch.autograd.grad(pred.mean.sum(), Xs)
    assert_close(pred.grad_mean.detach(), autograd, scale=1e3)


@pytest.mark.filterwarnings("ignore::gpderiv.NotFittedWarning")  # initial hyperparameters on purpose
def test_variances_nonnegative_and_consistent_with_full_covariance() -> None:
    X, y, grad = make_data(n=20, d=2)
    model = DerivativeGP(X, y, grad)
    set_hypers(model, [0.2, 0.3], 1.0, 1e-6)
    Xs = torch.cat([X[:3], torch.rand(5, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(2))])
    pred = model.predict(Xs, full_cov=True)
    assert (pred.variance >= 0).all() and (pred.grad_variance >= 0).all()
    cov = pred.covariance
    assert cov.shape == (8 * 3, 8 * 3)
    assert_close(cov, cov.T)
    assert torch.linalg.eigvalsh(cov).min() > -1e-8 * cov.diagonal().max()
    diag = model.predict(Xs)
    assert_close(cov.diagonal(), torch.cat([diag.variance, diag.grad_variance.flatten()]), scale=1e5)
    noisy = model.predict(Xs, observation_noise=True)
    hp = model.hyperparameters()
    assert_close(noisy.variance, diag.variance + hp["noise"])
    assert_close(noisy.grad_variance, diag.grad_variance + hp["grad_noise"])


@pytest.mark.filterwarnings("ignore::gpderiv.NotFittedWarning")  # initial hyperparameters on purpose
@pytest.mark.parametrize("observation_noise", [False, True])
def test_posterior_is_multitask_with_value_and_gradient_columns(observation_noise: bool) -> None:
    """posterior(): mean `m x (1 + d)` (value, then gradient), covariance interleaved (task fastest), lazy."""
    X, y, grad = make_data(n=10, d=2)
    model = DerivativeGP(X, y, grad)
    Xs = torch.rand(4, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(5))
    pred = model.predict(Xs, full_cov=True, observation_noise=observation_noise)
    post = model.posterior(Xs, observation_noise=observation_noise)
    assert isinstance(post, gpytorch.distributions.MultitaskMultivariateNormal)
    assert isinstance(post.lazy_covariance_matrix, DenseLinearOperator)
    assert post.mean.shape == (4, 3) and post.num_tasks == 3
    assert_close(post.mean[:, 0], pred.mean)
    assert_close(post.mean[:, 1:], pred.grad_mean)
    assert_close(post.variance, torch.cat([pred.variance.unsqueeze(-1), pred.grad_variance], -1))
    cov, block = post.covariance_matrix, pred.covariance
    m = 4
    for i, a, j, b in [(0, 0, 1, 0), (0, 0, 2, 2), (1, 1, 3, 2), (2, 2, 2, 1), (3, 0, 0, 1)]:
        # block layout: value of point i at i, d_a f at m + 2 i + a - 1
        bi = i if a == 0 else m + 2 * i + a - 1
        bj = j if b == 0 else m + 2 * j + b - 1
        assert_close(cov[3 * i + a, 3 * j + b], block[bi, bj])
    assert_close(torch.sort(cov.flatten()).values, torch.sort(block.flatten()).values)


@pytest.mark.filterwarnings("ignore::gpderiv.NotFittedWarning")  # initial hyperparameters on purpose
def test_chunked_prediction_equals_single_pass() -> None:
    X, y, grad = make_data(n=12, d=2)
    model = DerivativeGP(X, y, grad)
    Xs = torch.rand(23, 2, dtype=DTYPE)
    whole = model.predict(Xs, chunk_size=100)
    chunked = model.predict(Xs, chunk_size=4)
    for name in ("mean", "variance", "grad_mean", "grad_variance"):
        assert_close(getattr(chunked, name), getattr(whole, name))


def test_predictions_are_in_user_units_and_scale_invariant() -> None:
    X, y, grad = make_data(n=12, d=2)
    a, b, c = torch.tensor([100.0, 0.01], dtype=DTYPE), 7.0, -3.0
    base = DerivativeGP(X, y, grad).fit(maxiter=30)
    scaled = DerivativeGP(X * a + 5.0, b * y + c, grad * b / a).fit(maxiter=30)
    Xs = torch.rand(7, 2, dtype=DTYPE)
    p, q = base.predict(Xs), scaled.predict(Xs * a + 5.0)
    assert_close(q.mean, b * p.mean + c, scale=1e4)
    assert_close(q.variance, b**2 * p.variance, scale=1e4)
    assert_close(q.grad_mean, p.grad_mean * b / a, scale=1e4)
    assert_close(q.grad_variance, p.grad_variance * (b / a) ** 2, scale=1e4)
    assert_close(torch.tensor(scaled.mll), torch.tensor(base.mll - 12 * math.log(b) - 12 * math.log(b**2 / a.prod())))


def test_value_only_model_uses_n_rows_and_predicts_gradients() -> None:
    X, y, grad = make_data(n=25, d=2)
    model = DerivativeGP(X, y).fit()
    assert model.num_observations == 25 and not model.has_grad
    Xs = torch.rand(50, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(3)) * 0.8 + 0.1
    pred = model.predict(Xs)
    assert (pred.grad_mean - gradient(franke_like, Xs)).square().mean().sqrt() < 0.3


def test_gradients_improve_the_fit() -> None:
    X, y, grad = make_data(n=12, d=2, seed=4)
    Xs = torch.rand(200, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(9))
    truth = franke_like(Xs)
    with_grad = DerivativeGP(X, y, grad).fit()
    without = DerivativeGP(X, y).fit()
    rmse = [(m.predict(Xs).mean - truth).square().mean().sqrt() for m in (with_grad, without)]
    assert rmse[0] < 0.5 * rmse[1]


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_fit_increases_marginal_likelihood_and_records_history(optimizer: str) -> None:
    X, y, grad = make_data(n=10, d=2)
    model = DerivativeGP(X, y, grad)
    initial = model.log_marginal_likelihood()
    assert model.fit(optimizer=optimizer, maxiter=40) is model
    assert model.mll > initial
    assert len(model.mll_history) >= 1
    assert model.mll == pytest.approx(model.log_marginal_likelihood())
    assert model.mll >= model.mll_history[0] - 1e-6


def test_restarts_keep_the_best_run() -> None:
    X, y, grad = make_data(n=10, d=2)
    single = DerivativeGP(X, y, grad).fit(maxiter=15)
    restarted = DerivativeGP(X, y, grad).fit(maxiter=15, restarts=2, seed=0, progress=True)
    assert restarted.mll >= single.mll - 1e-8


def test_predict_reuses_the_cached_factorisation(monkeypatch: pytest.MonkeyPatch) -> None:
    X, y, grad = make_data(n=10, d=2)
    model = DerivativeGP(X, y, grad, hyperparameter_uncertainty=False).fit(maxiter=5)
    calls = []
    original = dense.cholesky_with_jitter
    monkeypatch.setattr(dense, "cholesky_with_jitter", lambda *a: calls.append(1) or original(*a))
    model.predict(torch.rand(3, 2, dtype=DTYPE))
    model.predict(torch.rand(300, 2, dtype=DTYPE), chunk_size=50)
    assert calls == []
    model.covar_module.outputscale = 2.0  # new hyperparameters: one new factorisation
    model.predict(torch.rand(3, 2, dtype=DTYPE))
    model.predict(torch.rand(3, 2, dtype=DTYPE))
    assert calls == [1]


def test_fixed_known_noise_is_not_learned() -> None:
    X, y, grad = make_data(n=10, d=2)
    model = DerivativeGP(X, y, grad, noise=1e-4, grad_noise=[1e-3, 2e-3]).fit(maxiter=10)
    hp = model.hyperparameters()
    assert_close(hp["noise"], torch.tensor([1e-4], dtype=DTYPE))
    assert_close(hp["grad_noise"], torch.tensor([1e-3, 2e-3], dtype=DTYPE))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_and_predict_on_cuda() -> None:
    X, y, grad = make_data(n=30, d=2)
    cpu = DerivativeGP(X, y, grad).fit(maxiter=20)
    gpu = DerivativeGP(X.cuda(), y.cuda(), grad.cuda()).fit(maxiter=20)
    Xs = torch.rand(10, 2, dtype=DTYPE)
    assert gpu.predict(Xs.cuda()).mean.device.type == "cuda"
    assert_close(gpu.predict(Xs.cuda()).mean.cpu(), cpu.predict(Xs).mean, scale=1e5)
    moved = cpu.to("cuda")
    assert_close(moved.predict(Xs.cuda()).mean.cpu(), cpu.to("cpu").predict(Xs).mean, scale=1e3)


def test_fit_whose_loss_turns_nan_warns_and_keeps_the_last_finite_point(monkeypatch: pytest.MonkeyPatch) -> None:
    X, y, grad = make_data(n=8, d=2)
    model = DerivativeGP(X, y, grad)
    original, calls = model.loss, []

    def loss_turning_nan(points: Tensor | None = None) -> Tensor:
        calls.append(1)
        value = original(points)
        return value * math.nan if len(calls) > 3 else value

    monkeypatch.setattr(model, "loss", loss_turning_nan)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        model.fit(optimizer="adam", maxiter=10)
    assert len(model.mll_history) == 3
    assert math.isfinite(model.mll)
    assert torch.isfinite(model.predict(X).mean).all()


def test_subset_of_data_loss_equals_the_loss_of_a_model_on_those_points() -> None:
    X, y, grad = make_data(n=14, d=2)
    grad[3, 0] = math.nan
    y[6] = math.nan
    model = DerivativeGP(X, y, grad, noise_prior=False)
    set_hypers(model, [0.3, 0.4], 1.2, 1e-3)
    points = torch.tensor([1, 3, 6, 8, 11])
    K_all = train_covariance(model)
    subset, rows = model.data.subset(points)
    assert_close(subset.covariance(model.covar_module)[0] * model.covar_module.outputscale, K_all[rows][:, rows])
    # Same loss as the dense reference on the selected rows.
    resid, noise = model.residual()[rows], model.row_noise()[rows]
    reference = -MultivariateNormal(torch.zeros_like(resid), K_all[rows][:, rows] + torch.diag(noise)).log_prob(resid)
    assert_close(model.loss(points), reference / rows.numel(), scale=1e3)
    assert_close(model.loss(torch.arange(14)), model.loss())


def test_fit_on_a_subset_then_predict_with_all_data() -> None:
    X, y, grad = make_data(n=40, d=2)
    model = DerivativeGP(X, y, grad).fit(subset=15, seed=0, maxiter=40)
    assert model.mll == pytest.approx(model.log_marginal_likelihood())  # all data
    Xs = torch.rand(30, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(7)) * 0.8 + 0.1
    assert (model.predict(Xs).mean - franke_like(Xs)).abs().max() < 0.05
    with pytest.raises(ValueError, match="subset: expected a positive number of points"):
        model.fit(subset=0)


@pytest.mark.filterwarnings("ignore::gpderiv.NotFittedWarning")  # initial hyperparameters on purpose
def test_mean_only_prediction_skips_variances() -> None:
    X, y, grad = make_data(n=12, d=2)
    model = DerivativeGP(X, y, grad)
    Xs = torch.rand(9, 2, dtype=DTYPE)
    fast, full = model.predict(Xs, variance=False, chunk_size=4), model.predict(Xs)
    assert fast.variance is None and fast.grad_variance is None and fast.std is None
    assert_close(fast.mean, full.mean)
    assert_close(fast.grad_mean, full.grad_mean)
    with pytest.raises(ValueError, match="variance"):
        model.predict(Xs, full_cov=True, variance=False)


def test_fit_warns_when_lbfgs_stops_at_maxiter_and_not_when_it_converges() -> None:
    X, y, grad = make_data(n=10, d=2)
    with pytest.warns(gpderiv.OptimizationWarning, match="stopped at maxiter=2 before it converged"):
        DerivativeGP(X, y, grad).fit(maxiter=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fit that converges normally is silent
        DerivativeGP(X, y, grad).fit()
