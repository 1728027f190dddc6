"""The variational engine: exactness limit, lower bound, unbiased minibatches, missing rows, persistence."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from gpderiv import DerivativeGP
from gpderiv.inference import get_engine, registry
from gpderiv.inference.variational import InducingVariables, VariationalELBO
from gpderiv.observations import Functionals
from gpderiv.observed_rows import ObservedRows

DTYPE = torch.float64


def _problem(n: int = 12, d: int = 2, seed: int = 0, noise: float = 1e-3):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, d, dtype=DTYPE, generator=g)
    w = torch.linspace(1.0, 2.0, d, dtype=DTYPE)
    y = torch.sin(X @ w) + noise * torch.randn(n, dtype=DTYPE, generator=g)
    grad = torch.cos(X @ w).unsqueeze(-1) * w + noise * torch.randn(n, d, dtype=DTYPE, generator=g)
    return X, y, grad


def _hyperparameters(model: DerivativeGP) -> None:
    """Distinct ARD lengthscales, output scale and noises (internal units), the same for every model."""
    k = model.covar_module
    k.base_kernel.lengthscale = torch.linspace(0.4, 0.7, model.d, dtype=DTYPE)
    k.outputscale = torch.tensor(1.3, dtype=DTYPE)
    lik = model.likelihood
    for name, value in (("value", torch.tensor([1e-3])), ("grad", torch.linspace(2e-3, 4e-3, model.d))):
        raw = getattr(lik, f"raw_{name}_noise")
        constraint = getattr(lik, f"raw_{name}_noise_constraint")
        raw.data = constraint.inverse_transform(value.to(DTYPE).expand(raw.shape))
    model.fitted = True


def _pair(*args, options=None, **kwargs):
    exact = DerivativeGP(*args, inference="dense", hyperparameter_uncertainty=False, **kwargs)
    approx = DerivativeGP(
        *args, inference="variational", inference_options=options, hyperparameter_uncertainty=False, **kwargs
    )
    for model in (exact, approx):
        _hyperparameters(model)
    return exact, approx


def _close(a, b, tol):
    assert torch.allclose(a, b, rtol=tol, atol=tol), (a - b).abs().max()


def test_all_points_with_full_gradients_recover_the_exact_posterior():
    """M = n inducing points at the inputs, p = d: the exact posterior and log marginal likelihood."""
    X, y, grad = _problem()
    exact, approx = _pair(X, y, grad)
    assert approx.engine_state.Z.shape == (12, 2) and approx.engine_state.p == 2
    Xs = torch.rand(7, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(5))
    pe, pv = exact.predict(Xs, full_cov=True), approx.predict(Xs, full_cov=True)
    for name in ("mean", "variance", "grad_mean", "grad_variance", "covariance"):
        _close(getattr(pv, name), getattr(pe, name), 1e-6)
    assert approx.log_marginal_likelihood() == pytest.approx(exact.log_marginal_likelihood(), abs=1e-3)


def test_missing_entries_and_directional_rows_are_exact_in_the_limit():
    X, y, grad = _problem(n=10, d=3, seed=1)
    y[2] = math.nan
    grad[0, 1] = grad[4, 0] = grad[7, 2] = math.nan
    index = torch.tensor([1, 5])
    V = torch.tensor([[1.0, 2.0, 0.5], [0.0, 1.0, -1.0]], dtype=DTYPE)
    directional = (index, V, (grad[index] * V).sum(-1))
    exact, approx = _pair(X, y, grad, directional=directional)
    Xs = torch.rand(5, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(2))
    pe, pv = exact.predict(Xs), approx.predict(Xs)
    _close(pv.mean, pe.mean, 1e-6)
    _close(pv.grad_variance, pe.grad_variance, 1e-6)
    assert approx.log_marginal_likelihood() == pytest.approx(exact.log_marginal_likelihood(), abs=1e-3)


@pytest.mark.parametrize("directions", [0, 1, 2, 3])
def test_the_elbo_is_a_lower_bound(directions):
    X, y, grad = _problem(n=30, d=3, seed=3)
    H = torch.zeros(30, 3, 3, dtype=DTYPE).fill_(math.nan)
    H[:5, 0, 0] = -0.5  # Hessian rows too: any row the exact engine takes
    exact, approx = _pair(X, y, grad, hessian=H, options={"num_inducing": 8, "directions": directions})
    assert approx.engine_state.size == 8 * (1 + directions)
    bound, exact_mll = approx.log_marginal_likelihood(), exact.log_marginal_likelihood()
    assert bound < exact_mll
    assert math.isfinite(bound)


def test_streaming_factor_and_full_batch_objective_agree():
    """The full-batch loss after a full natural step (optimal q) is minus the factor's ELBO."""
    X, y, grad = _problem(n=25, d=2, seed=4)
    _, approx = _pair(X, y, grad, options={"num_inducing": 6, "directions": 1})
    engine, args = approx.engine, (approx.covar_module, approx.data, approx.row_noise(), approx.residual())
    with torch.no_grad():
        loss = engine.minibatch_loss(*args, points=None, update=True)
        factor_elbo = engine.factor(*args).elbo
    _close(-loss, factor_elbo, 1e-9)


def test_minibatch_gradients_are_unbiased():
    """Averaged over every minibatch of 2 of the 6 points, the gradient is the full-batch one (q fixed)."""
    X, y, grad = _problem(n=6, d=2, seed=6)
    _, approx = _pair(X, y, grad, options={"num_inducing": 3, "directions": 1})
    engine, params = approx.engine, [p for p in approx.parameters() if p.requires_grad]
    with torch.no_grad():  # a q that is not optimal, so every term of the bound matters
        engine.minibatch_loss(approx.covar_module, approx.data, approx.row_noise(), approx.residual(), None, True)
        approx.engine_state.shift.mul_(0.7)

    def gradient(points):
        loss = engine.minibatch_loss(approx.covar_module, approx.data, approx.row_noise(), approx.residual(), points)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    full = gradient(None)
    pairs = [torch.tensor([i, j]) for i in range(6) for j in range(i + 1, 6)]
    mean = torch.stack([gradient(p) for p in pairs]).mean(0)
    _close(mean, full, 1e-9)
    assert (torch.stack([gradient(p) for p in pairs[:3]]) - full).abs().max() > 1e-3  # each one is noisy


def test_objective_gradient_matches_finite_differences():
    X, y, grad = _problem(n=15, d=2, seed=7)
    _, approx = _pair(X, y, grad, options={"num_inducing": 5, "directions": 1})
    engine = approx.engine
    with torch.no_grad():
        engine.minibatch_loss(approx.covar_module, approx.data, approx.row_noise(), approx.residual(), None, True)

    def loss() -> torch.Tensor:
        return engine.minibatch_loss(approx.covar_module, approx.data, approx.row_noise(), approx.residual(), None)

    params = [p for p in approx.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss(), params)
    for p, g in zip(params, grads, strict=True):
        flat, gflat = p.data.view(-1), g.reshape(-1)
        for i in range(min(3, flat.numel())):
            h = 1e-6
            flat[i] += h
            up = loss().item()
            flat[i] -= 2 * h
            down = loss().item()
            flat[i] += h
            assert (up - down) / (2 * h) == pytest.approx(gflat[i].item(), rel=1e-5, abs=1e-6)


def test_projected_directions_match_directional_functionals():
    """The projection of the block covariance onto the directions is the covariance of directional rows."""
    X, y, grad = _problem(n=8, d=3, seed=8)
    model = DerivativeGP(X, y, grad, inference="variational", inference_options={"num_inducing": 4, "directions": 2})
    _hyperparameters(model)
    state = model.engine_state
    V = state.directions()  # 4 x 2 x 3
    M, p, d = V.shape
    idx = torch.stack([torch.arange(d), torch.full((d,), -1)], -1)
    values = Functionals.block(M, d, X.device, DTYPE).take(torch.arange(M))
    directional = Functionals(torch.arange(M).repeat_interleave(p), idx.expand(M * p, d, 2), V.reshape(M * p, d))
    pad = torch.nn.functional.pad
    F = Functionals(
        torch.cat([values.point, directional.point]),
        torch.cat([pad(values.idx, (0, 0, 0, d - 1), value=-1), directional.idx]),
        torch.cat([pad(values.coef, (0, d - 1)), directional.coef]),
    )
    rows = ObservedRows.functionals(state.Z, F)
    _close(state.covariance(model.covar_module), rows.scaled_covariance(model.covar_module), 1e-12)
    kernel = model.covar_module
    _close(state.covariance(kernel, model.data), rows.scaled_covariance(kernel, model.data), 1e-12)


def test_fit_predict_save_load(tmp_path):
    X, y, grad = _problem(n=40, d=2, seed=9, noise=0.01)
    model = DerivativeGP(X, y, grad, inference="variational", inference_options={"num_inducing": 10})
    model.fit(seed=0, maxiter=300)
    exact = DerivativeGP(X, y, grad, inference="dense").fit()
    assert model.mll < exact.mll  # a lower bound (of the exact fit's maximum)
    Xs = torch.rand(20, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    pred = model.predict(Xs)
    truth = torch.sin(Xs @ torch.tensor([1.0, 2.0], dtype=DTYPE))
    assert (pred.mean - truth).abs().max() < 0.05
    assert bool((pred.variance > 0).all())
    model.save(tmp_path / "v.pt")
    loaded = DerivativeGP.load(tmp_path / "v.pt")
    assert loaded.inference == "variational" and loaded.engine_state.Z.shape == (10, 2)
    again = loaded.predict(Xs)
    assert torch.equal(again.mean, pred.mean) and torch.equal(again.grad_variance, pred.grad_variance)


def test_same_seed_same_fit():
    X, y, grad = _problem(n=60, d=2, seed=10, noise=0.01)
    options = {"num_inducing": 8, "batch_size": 16}
    fits = [DerivativeGP(X, y, grad, inference="variational", inference_options=options) for _ in range(2)]
    for model in fits:
        model.fit(seed=3, maxiter=30)
    assert torch.equal(fits[0].engine_state.Z, fits[1].engine_state.Z)
    assert fits[0].mll == fits[1].mll


def test_options_are_checked():
    X, y, grad = _problem()
    with pytest.raises(TypeError, match="inference_options.*takes"):
        DerivativeGP(X, y, grad, inference="variational", inference_options={"inducing": 3})
    with pytest.raises(TypeError, match="dense"):
        DerivativeGP(X, y, grad, inference="dense", inference_options={"num_inducing": 3})
    with pytest.raises(ValueError, match="num_inducing"):
        DerivativeGP(X, y, grad, inference="variational", inference_options={"num_inducing": 0})
    with pytest.raises(ValueError, match="directions.*at most d = 2"):
        DerivativeGP(X, y, grad, inference="variational", inference_options={"directions": 3})
    with pytest.raises(ValueError, match="step"):
        VariationalELBO(step=1.5)
    with pytest.raises(TypeError, match="batch_size"):
        VariationalELBO(batch_size=2.5)


def test_conditioning_is_refused_with_a_reason():
    X, y, grad = _problem()
    _, approx = _pair(X, y, grad)
    rows = ObservedRows.block(X[:2])
    with pytest.raises(NotImplementedError, match="refit"):
        approx.factor().extend(rows, torch.ones(6, dtype=DTYPE), torch.zeros(6, dtype=DTYPE))


def test_auto_chooses_it_beyond_exact_inference_and_warns(monkeypatch):
    X, y, grad = _problem(n=30, d=2)
    monkeypatch.setattr(registry, "AUTO_ITERATIVE_MAX_ROWS", 10)
    monkeypatch.setattr(type(get_engine("dense")), "memory_estimate", lambda self, data, dtype: 2**62)
    with pytest.warns(UserWarning, match="approximate 'variational' engine"):
        model = DerivativeGP(X, y, grad)
    assert model.inference == "variational"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DerivativeGP(X, y, grad, inference="variational")  # asked for: no warning


def test_inducing_state_is_a_module_of_the_model():
    X, y, grad = _problem(n=50, d=2)
    model = DerivativeGP(X, y, grad, inference="variational", inference_options={"num_inducing": 7})
    assert isinstance(model.engine_state, InducingVariables)
    names = dict(model.named_parameters())
    assert "engine_state.Z" in names and "engine_state.precision" in model.state_dict()
    # k-means centres lie within the data's box (internal units)
    Z = model.engine_state.Z.detach()
    assert bool((Z >= model.train_X.min(0).values - 1e-12).all() and (Z <= model.train_X.max(0).values + 1e-12).all())


def test_botorch_model_posterior_through_the_shared_engine():
    from botorch.acquisition import qLogExpectedImprovement
    from botorch.fit import fit_gpytorch_mll
    from botorch.sampling import SobolQMCNormalSampler
    from gpytorch.mlls import ExactMarginalLogLikelihood

    from gpderiv.botorch import DerivativeGPModel

    X, y, grad = _problem(n=15, d=2, seed=11, noise=0.0)
    Y = torch.cat([y.unsqueeze(-1), grad], -1)
    exact = DerivativeGPModel(X, Y, inference="dense")
    approx = DerivativeGPModel(X, Y, inference="variational")  # M = n, full gradients: the exact posterior
    approx.load_state_dict(exact.state_dict(), strict=False)
    Xs = torch.rand(4, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    pe, pv = exact.posterior(Xs), approx.posterior(Xs)
    _close(pv.mean, pe.mean, 1e-6)
    _close(pv.variance, pe.variance, 1e-6)
    small = DerivativeGPModel(X, Y, inference="variational", inference_options={"num_inducing": 5})
    mll = ExactMarginalLogLikelihood(small.likelihood, small)
    fit_gpytorch_mll(mll, optimizer_kwargs={"options": {"maxiter": 15}})  # BoTorch's L-BFGS: full batch, exact q
    value = qLogExpectedImprovement(small, best_f=y.max())(Xs.unsqueeze(1))
    assert value.shape == (4,) and bool(torch.isfinite(value).all())
    with pytest.raises(NotImplementedError, match="fantasies"):
        small.fantasize(Xs[:2], sampler=SobolQMCNormalSampler(torch.Size([2])))
    with pytest.raises(ValueError, match="batch"):
        DerivativeGPModel(X.expand(2, 15, 2), Y.expand(2, 15, 3), inference="variational")


def test_autograd_kernel_recovers_the_exact_posterior():
    """DerivativeKernel (derivatives by torch.func) takes the same path: exact in the limit M = n."""
    from gpytorch.kernels import MaternKernel, ScaleKernel

    from gpderiv.kernels import DerivativeKernel

    X, y, grad = _problem(n=10, d=2, seed=12)

    def kernel():
        return ScaleKernel(DerivativeKernel(MaternKernel(nu=2.5, ard_num_dims=2))).double()

    exact = DerivativeGP(X, y, grad, kernel=kernel(), inference="dense", hyperparameter_uncertainty=False)
    approx = DerivativeGP(X, y, grad, kernel=kernel(), inference="variational")
    approx.load_state_dict(exact.state_dict(), strict=False)
    exact.fitted = approx.fitted = True
    Xs = torch.rand(4, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(4))
    pe, pv = exact.predict(Xs), approx.predict(Xs)
    _close(pv.mean, pe.mean, 1e-6)
    _close(pv.grad_variance, pe.grad_variance, 1e-6)


def test_white_variance_sums_squared_coefficients_per_kind():
    """A row sum_k c_k d^a_k f gets sum_k c_k^2 eps[a_k]: values, partials, directional and Hessian rows."""
    d = 3
    eps = torch.tensor([0.5, 1.0, 2.0, 3.0, 7.0, 11.0], dtype=DTYPE)  # value, partials 0-2, directional, second
    X = torch.rand(2, d, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    block = ObservedRows.block(X)
    expected_block = torch.cat([eps[:1].expand(2), eps[1:4].repeat(2)])
    _close(block.white_variance(eps), expected_block, 0)
    idx = torch.tensor([[[0, -1], [2, -1]], [[1, 2], [-1, -1]]])  # a directional row, a Hessian entry
    coef = torch.tensor([[0.6, 0.8], [1.0, 0.0]], dtype=DTYPE)
    rows = ObservedRows.functionals(X, Functionals(torch.tensor([0, 1]), idx, coef))
    _close(rows.white_variance(eps), torch.tensor([0.36 * 1.0 + 0.64 * 3.0, 11.0], dtype=DTYPE), 1e-15)


def test_noise_from_bound_revives_a_noise_stuck_at_its_bound():
    """An exact warm start can leave a noise where its constraint has no gradient; EM rounds set it from the bound."""
    from gpderiv.fitting import noise_from_bound

    X, y, grad = _problem(n=200, d=2, seed=11, noise=0.01)
    y = y + 0.3 * torch.sin(25 * X[:, 0])  # wiggles that 5 inducing points cannot follow: misfit
    model = DerivativeGP(X, y, grad, inference="variational", inference_options={"num_inducing": 5})
    _hyperparameters(model)
    lik = model.likelihood
    lik.raw_value_noise.data.fill_(-500.0)  # where an exact L-BFGS warm start left it in a 10-D case
    adam = torch.optim.Adam([lik.raw_value_noise], lr=0.01)
    model.loss().backward()
    adam.step()
    assert lik.raw_value_noise.item() == -500.0  # its gradient squared underflows: Adam never moves it
    grad_before = lik.grad_noise.detach().clone()
    assert noise_from_bound(model)
    assert lik.value_noise.item() > 1e-3  # the misfit of the wiggles, 0.3^2 / 2 in user units
    assert not torch.equal(lik.grad_noise.detach(), grad_before)
    # At the EM fixed point every learned variance is the mean expected squared error of its rows.
    sums, counts = model.engine.expected_errors(
        model.covar_module, model.data, model.row_noise(), model.residual(), 10_000
    )
    assert 0.5 < (sums[0] / counts[0] / lik.value_noise).item() < 2.0
    assert not DerivativeGP(X, y, grad, inference="dense").engine.expected_errors(None, None, None, None, 1)


def test_set_from_errors_keeps_known_and_shared_variances():
    from gpderiv.likelihoods import DerivativeGaussianNoise

    sums, counts = torch.tensor([2.0, 3.0, 5.0, 0.0, 0.0], dtype=DTYPE), torch.tensor([2.0, 1.0, 1.0, 0.0, 0.0])
    per_dimension = DerivativeGaussianNoise(2)
    per_dimension.set_from_errors(sums, counts)
    _close(per_dimension.kind_noise(), torch.tensor([1.0, 3.0, 5.0, 0.0, 0.0], dtype=DTYPE), 1e-12)
    shared = DerivativeGaussianNoise(2, shared_grad_noise=True, value_noise=torch.tensor(0.25))
    shared.set_from_errors(sums, counts)
    _close(shared.kind_noise(), torch.tensor([0.25, 4.0, 4.0, 0.0, 0.0], dtype=DTYPE), 1e-12)
    floor = DerivativeGaussianNoise(2, lower_bound=1e-4)
    floor.set_from_errors(torch.zeros(5, dtype=DTYPE), torch.ones(5))
    _close(floor.value_noise, torch.tensor([2e-4], dtype=DTYPE), 1e-9)  # kept inside its bounds


def test_error_bars_include_the_approximation_error():
    """Too few inducing points for the function: the latent variance alone is over-confident, with the error not."""
    g = torch.Generator().manual_seed(0)

    def f(x):
        return torch.sin(6 * x[..., 0]) * torch.cos(5 * x[..., 1]) + x[..., 0]

    def grad_f(x):
        a, b = 6 * x[..., 0], 5 * x[..., 1]
        return torch.stack([6 * torch.cos(a) * torch.cos(b) + 1, -5 * torch.sin(a) * torch.sin(b)], -1)

    X, Xs = torch.rand(400, 2, dtype=DTYPE, generator=g), torch.rand(300, 2, dtype=DTYPE, generator=g)
    y = f(X) + 1e-3 * torch.randn(400, dtype=DTYPE, generator=g)
    model = DerivativeGP(X, y, grad_f(X), inference="variational", inference_options={"num_inducing": 6})
    model.fit(maxiter=60, seed=0)  # 400 points: an exact warm start on a window, then the bound
    error = model.engine_state.approximation_error
    assert bool((error[:3] > 0).all()) and bool((error[3:] == 0).all())  # value and both partials; no others

    def calibration():
        pred = model.predict(Xs)
        out = []
        for mean, var, truth in ((pred.mean, pred.variance, f(Xs)), (pred.grad_mean, pred.grad_variance, grad_f(Xs))):
            err = mean - truth
            out.append(((err**2 / var).mean().item(), (err.abs() <= 1.96 * var.sqrt()).double().mean().item()))
        return out

    (z2_f, cover_f), (z2_g, cover_g) = calibration()
    assert 0.5 < z2_f < 1.5 and 0.5 < z2_g < 1.5
    assert 0.9 < cover_f and 0.9 < cover_g
    error.zero_()
    (z2_f, _), _ = calibration()
    assert z2_f > 2.0  # the latent variance alone is over-confident


def test_no_approximation_error_where_the_inducing_variables_follow_the_function():
    """A smooth function: the training residuals are noise, and no error may widen the bars (tiny errors of f)."""
    X, y, grad = _problem(n=600, d=2, seed=0, noise=0.01)
    Xs = torch.rand(300, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(5))
    w = torch.tensor([1.0, 2.0], dtype=DTYPE)
    model = DerivativeGP(X, y, grad, inference="variational", inference_options={"num_inducing": 20})
    model.fit(maxiter=100, seed=0)
    assert bool((model.engine_state.approximation_error == 0).all())  # an excess of a few % of the noise is not one
    pred = model.predict(Xs)
    z2 = ((pred.mean - torch.sin(Xs @ w)) ** 2 / pred.variance).mean()
    assert 0.2 < z2 < 2.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_and_predict_on_cuda():
    X, y, grad = _problem(n=300, d=2, seed=12, noise=0.01)
    options = {"num_inducing": 16}
    gpu = DerivativeGP(X.cuda(), y.cuda(), grad.cuda(), inference="variational", inference_options=options)
    gpu.fit(maxiter=30, seed=0)
    Xs = torch.rand(10, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(2))
    pred = gpu.predict(Xs.cuda())
    assert pred.mean.device.type == "cuda" and bool(torch.isfinite(pred.variance).all())
    cpu = DerivativeGP(X, y, grad, inference="variational", inference_options=options).fit(maxiter=30, seed=0)
    _close(cpu.to("cuda").predict(Xs.cuda()).mean.cpu(), cpu.to("cpu").predict(Xs).mean, 1e-8)
