"""The BoTorch adapter: posterior maths, transforms, conditioning, fantasies and acquisition functions."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("botorch")

from botorch.acquisition import (  # noqa: E402
    LogExpectedImprovement,
    PosteriorMean,
    UpperConfidenceBound,
    qKnowledgeGradient,
    qLogExpectedImprovement,
    qLogNoisyExpectedImprovement,
    qUpperConfidenceBound,
)
from botorch.acquisition.objective import ScalarizedPosteriorTransform  # noqa: E402
from botorch.fit import fit_gpytorch_mll  # noqa: E402
from botorch.models.transforms.input import Normalize, Warp  # noqa: E402
from botorch.models.transforms.outcome import Standardize  # noqa: E402
from botorch.optim import optimize_acqf  # noqa: E402
from botorch.optim.closures import get_loss_closure  # noqa: E402
from botorch.sampling import SobolQMCNormalSampler  # noqa: E402
from gpytorch.distributions import MultitaskMultivariateNormal, MultivariateNormal  # noqa: E402
from gpytorch.mlls import ExactMarginalLogLikelihood  # noqa: E402
from linear_operator.utils.warnings import NumericalWarning  # noqa: E402

from gpderiv.botorch import DerivativeGPModel, DerivativeStandardize  # noqa: E402
from gpderiv.inference import DenseCholesky  # noqa: E402
from gpderiv.kernels import DerivativeRBFKernel  # noqa: E402

DTYPE = torch.float64
LOW = torch.tensor([-2.0, 1.0], dtype=DTYPE)
HIGH = torch.tensor([3.0, 4.0], dtype=DTYPE)
BOUNDS = torch.stack([LOW, HIGH])


def objective(X: torch.Tensor) -> torch.Tensor:
    """A smooth 2-D test function on BOUNDS (values of order 10, so standardising matters)."""
    return 10 * torch.sin(X[..., 0]) * torch.cos(0.7 * X[..., 1]) + X[..., 0] ** 2


def observe(X: torch.Tensor) -> torch.Tensor:
    """`n x 3` observations [f, df/dx_1, df/dx_2] by autograd."""
    Xg = X.detach().clone().requires_grad_(True)
    y = objective(Xg)
    (g,) = torch.autograd.grad(y.sum(), Xg)
    return torch.cat([y.detach().unsqueeze(-1), g], -1)


def design(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return LOW + (HIGH - LOW) * torch.rand(n, 2, generator=gen, dtype=DTYPE)


def make_model(n: int = 7, seed: int = 0, **kwargs) -> DerivativeGPModel:
    """A model with set (not fitted) hyperparameters, Normalize and DerivativeStandardize active."""
    X = design(n, seed)
    kwargs.setdefault("input_transform", Normalize(2))
    model = DerivativeGPModel(X, observe(X), **kwargs)
    model.covar_module.lengthscale = torch.tensor([[0.3, 0.4]], dtype=DTYPE)
    model.likelihood.noise_covar.noise = torch.tensor([1e-3, 2e-3], dtype=DTYPE)
    model.mean_module.constant = torch.tensor(0.2, dtype=DTYPE)
    return model.eval()


# ---------------------------------------------------------------- posterior


@pytest.mark.parametrize("shape", [(4, 2), (3, 4, 2), (2, 3, 4, 2)])
def test_posterior_shapes_for_batches_and_q(shape):
    model = make_model()
    X = torch.rand(*shape, dtype=DTYPE)
    post = model.posterior(X)
    assert isinstance(post.distribution, MultivariateNormal)
    assert post.mean.shape == (*shape[:-1], 1)
    assert post.rsample(torch.Size([5])).shape == (5, *shape[:-1], 1)
    post = model.posterior(X, output_indices=[0, 2])
    assert isinstance(post.distribution, MultitaskMultivariateNormal)
    assert post.mean.shape == post.variance.shape == (*shape[:-1], 2)
    sampler = SobolQMCNormalSampler(torch.Size([8]), seed=0)
    assert sampler(post).shape == (8, *shape[:-1], 2)


def test_posterior_gradients_are_the_derivatives_of_the_value_posterior():
    """With Normalize and DerivativeStandardize active, every unit conversion shows up here."""
    model = make_model()
    x = design(3, seed=5)
    grads = model.posterior(x, output_indices=[1, 2])
    z = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(model.posterior(z).mean.sum(), z)  # points are independent in the mean
    torch.testing.assert_close(grads.mean, expected, rtol=1e-9, atol=1e-9)

    # Cov(df/dx_a, df/dx_b) = d^2/dx_a dx'_b Cov(f(x), f(x')) at x = x'.
    for i in range(3):
        z1, z2 = x[i].clone().requires_grad_(True), x[i].clone().requires_grad_(True)
        cov = model.posterior(torch.stack([z1, z2])).distribution.covariance_matrix[0, 1]
        (g1,) = torch.autograd.grad(cov, z1, create_graph=True)
        mixed = torch.stack([torch.autograd.grad(g1[a], z2, retain_graph=True)[0] for a in range(2)])
        joint = model.posterior(x[i : i + 1], output_indices=[1, 2]).distribution.covariance_matrix
        torch.testing.assert_close(joint, mixed, rtol=1e-7, atol=1e-9)


def test_posterior_interpolates_values_and_gradients():
    model = make_model(n=10)
    X = design(10)
    post = model.posterior(X, output_indices=[0, 1, 2])
    torch.testing.assert_close(post.mean, observe(X), rtol=0, atol=0.05 * observe(X).abs().max().item())
    assert model.posterior(X).mean.shape == (10, 1)


def test_observation_noise_adds_the_noise_of_each_output():
    model = make_model()
    X = design(4, seed=3)
    sigma = model.outcome_transform.stdvs.reshape(())
    coef = model.input_transform.coefficient.reshape(-1)
    plain = model.posterior(X, output_indices=[0, 1]).variance
    noisy = model.posterior(X, output_indices=[0, 1], observation_noise=True).variance
    expected = torch.stack([1e-3 * sigma**2, 2e-3 * (sigma / coef[0]) ** 2])
    torch.testing.assert_close(noisy - plain, expected.expand_as(plain))
    given = torch.full((4, 2), 0.5, dtype=DTYPE)
    noisy = model.posterior(X, output_indices=[0, 1], observation_noise=given).variance
    torch.testing.assert_close(noisy - plain, 0.5 * torch.stack([sigma**2, (sigma / coef[0]) ** 2]).expand_as(plain))


def test_posterior_transform_scalarises_selected_outputs():
    model = make_model()
    X = design(3, seed=4)
    weights = torch.tensor([1.0, -2.0], dtype=DTYPE)
    full = model.posterior(X, output_indices=[0, 1])
    post = model.posterior(X, output_indices=[0, 1], posterior_transform=ScalarizedPosteriorTransform(weights))
    torch.testing.assert_close(post.mean.squeeze(-1), full.mean @ weights)


# ---------------------------------------------------------------- exact maths with missing entries


def dense_reference(model: DerivativeGPModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Observed-entry covariance, targets and the log marginal likelihood, by plain dense algebra."""
    X, Y = model.train_inputs[0], model._train_Y_model
    seen = torch.isfinite(Y).reshape(-1)
    K = model.covar_module.forward(X, X)[seen][:, seen]
    noise = model.likelihood.train_noise(Y.shape).reshape(-1)[seen]
    prior = torch.zeros_like(Y)
    prior[..., 0] = model.mean_module.constant
    prior = prior.reshape(-1)[seen]
    cov = K + torch.diag(noise)
    dist = torch.distributions.MultivariateNormal(prior, covariance_matrix=cov)
    return cov, prior, dist.log_prob(Y.reshape(-1)[seen])


def test_missing_entries_match_the_observed_submatrix():
    X = design(6, seed=1)
    Y = observe(X)
    Y[0, 1] = Y[2, 0] = Y[3, 2] = Y[5, 1] = float("nan")
    Y[4, 1:] = float("nan")
    model = DerivativeGPModel(X, Y, input_transform=Normalize(2))
    model.covar_module.lengthscale = torch.tensor([[0.4, 0.5]], dtype=DTYPE)
    with torch.no_grad():
        _, _, expected = dense_reference(model)
        torch.testing.assert_close(model.log_marginal_likelihood(), expected, rtol=1e-10, atol=1e-10)
    # Posterior of the values at new points, from the same submatrix.
    Xs = design(3, seed=9)
    Xs_t = model.input_transform(Xs)
    with torch.no_grad():
        cov, prior, _ = dense_reference(model)
        seen = torch.isfinite(model._train_Y_model).reshape(-1)
        K_sx = model.covar_module.forward(Xs_t, model.train_inputs[0], grad1=False)[:, seen]
        resid = model._train_Y_model.reshape(-1)[seen] - prior
        mean = model.mean_module.constant + K_sx @ torch.linalg.solve(cov, resid)
        loc, scale = model._output_affine()
        torch.testing.assert_close(model.posterior(Xs).mean.squeeze(-1), loc[..., 0] + scale[..., 0] * mean)


def test_mll_gradient_matches_finite_differences():
    model = make_model()
    model.train()
    raw = model.covar_module.raw_lengthscale
    loss = model.compute_custom_loss()
    (grad,) = torch.autograd.grad(loss, raw)
    eps = 1e-6
    fd = torch.zeros_like(raw)
    for j in range(raw.numel()):
        with torch.no_grad():
            raw.view(-1)[j] += eps
            up = model.compute_custom_loss()
            raw.view(-1)[j] -= 2 * eps
            down = model.compute_custom_loss()
            raw.view(-1)[j] += eps
        fd.view(-1)[j] = (up - down) / (2 * eps)
    torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-7)


def test_fit_gpytorch_mll_minimises_the_exact_loss():
    X = design(8, seed=2)
    Y = observe(X)
    a = DerivativeGPModel(X, Y, input_transform=Normalize(2))
    b = DerivativeGPModel(X, Y, input_transform=Normalize(2))
    mll = ExactMarginalLogLikelihood(a.likelihood, a)
    start = a.compute_custom_loss().item()
    assert get_loss_closure(mll)().item() == start  # BoTorch's loss is the model's exact one
    fit_gpytorch_mll(mll)
    b.fit()
    assert a.compute_custom_loss().item() < start - 0.1
    assert a.compute_custom_loss().item() == pytest.approx(b.compute_custom_loss().item(), abs=1e-6)


# ---------------------------------------------------------------- transforms


def test_derivative_standardize_scales_gradients_and_never_centres_them():
    Y = torch.tensor([[1.0, 2.0, -3.0], [3.0, 4.0, 5.0], [8.0, float("nan"), 0.5]], dtype=DTYPE)
    tf = DerivativeStandardize(2)
    Yt, Yvt = tf(Y, torch.ones_like(Y))
    mean, std = torch.tensor(4.0, dtype=DTYPE), torch.tensor([1.0, 3.0, 8.0], dtype=DTYPE).std()
    torch.testing.assert_close(Yt[:, 0], (Y[:, 0] - mean) / std)
    torch.testing.assert_close(Yt[:, 1:], Y[:, 1:] / std, equal_nan=True)
    torch.testing.assert_close(Yvt, torch.ones_like(Y) / std**2)
    tf.eval()
    back, back_var = tf.untransform(Yt, Yvt)
    torch.testing.assert_close(back, Y, equal_nan=True)
    torch.testing.assert_close(back_var, torch.ones_like(Y))


def test_normalize_equals_doing_the_chain_rule_by_hand():
    """A model on x with Normalize == a model on u = (x - low) / range with gradients * range."""
    X = design(7)
    Y = observe(X)
    rng = HIGH - LOW
    a = DerivativeGPModel(X, Y, input_transform=Normalize(2, bounds=BOUNDS))
    U = (X - LOW) / rng
    b = DerivativeGPModel(U, torch.cat([Y[:, :1], Y[:, 1:] * rng], -1))
    b.load_state_dict(a.state_dict(), strict=False)
    Xs = design(4, seed=8)
    pa = a.posterior(Xs, output_indices=[0, 1, 2])
    pb = b.posterior((Xs - LOW) / rng, output_indices=[0, 1, 2])
    scale = torch.cat([torch.ones(1, dtype=DTYPE), 1 / rng])
    torch.testing.assert_close(pa.mean, pb.mean * scale)
    torch.testing.assert_close(pa.variance, pb.variance * scale**2)
    torch.testing.assert_close(a.train_targets, Y)


def test_transforms_that_break_the_chain_rule_are_refused():
    X = design(5)
    Y = observe(X)
    with pytest.raises(TypeError, match="outcome_transform: expected gpderiv.botorch.DerivativeStandardize"):
        DerivativeGPModel(X, Y, outcome_transform=Standardize(m=3))
    with pytest.raises(TypeError, match="input_transform: expected an affine transform"):
        DerivativeGPModel(X, Y, input_transform=Warp(d=2, indices=[0]))
    with pytest.raises(ValueError, match=r"DerivativeStandardize\(d=2\)"):
        DerivativeGPModel(X, Y, outcome_transform=DerivativeStandardize(3))


# ---------------------------------------------------------------- conditioning and fantasies


@pytest.mark.parametrize("known_noise", [False, True])
def test_condition_on_observations_equals_refitting_with_the_same_hyperparameters(known_noise):
    X, Xn = design(6, seed=1), design(3, seed=2)
    Y, Yn = observe(X), observe(Xn)
    Yn[1, 2] = float("nan")
    kwargs = {"input_transform": Normalize(2, bounds=BOUNDS), "outcome_transform": None}
    var = torch.full_like(Y, 1e-3)
    a = DerivativeGPModel(X, Y, train_Yvar=var if known_noise else None, **kwargs)
    a.covar_module.lengthscale = torch.tensor([[0.3, 0.35]], dtype=DTYPE)
    a.mean_module.constant = torch.tensor(1.5, dtype=DTYPE)
    a.eval()
    both = torch.cat([Y, Yn])
    b = DerivativeGPModel(torch.cat([X, Xn]), both, train_Yvar=torch.full_like(both, 1e-3) if known_noise else None,
                          **kwargs)
    b.load_state_dict(a.state_dict(), strict=False)
    noise = 1e-3 / a._output_affine()[1] ** 2 if known_noise else None  # BoTorch: noise in model units
    c = a.condition_on_observations(Xn, Yn, noise=noise)
    Xs = design(5, seed=3)
    for outputs in ([0], [0, 1, 2]):
        pc, pb = c.posterior(Xs, output_indices=outputs), b.posterior(Xs, output_indices=outputs)
        torch.testing.assert_close(pc.mean, pb.mean)
        torch.testing.assert_close(pc.distribution.covariance_matrix, pb.distribution.covariance_matrix)
    # The original model is untouched and the two do not share parameters.
    assert a.train_inputs[0].shape[-2] == 6 and c.train_inputs[0].shape[-2] == 9
    assert c.covar_module.raw_lengthscale is not a.covar_module.raw_lengthscale


def test_condition_on_values_only_leaves_gradients_unobserved():
    model = make_model()
    Xn = design(2, seed=6)
    cond = model.condition_on_observations(Xn, observe(Xn)[:, :1])
    assert torch.isnan(cond.train_targets[-2:, 1:]).all()
    torch.testing.assert_close(cond.train_targets[-2:, 0], observe(Xn)[:, 0])


def test_fantasize_draws_values_and_gradients():
    model = make_model()
    X = torch.rand(3, 2, 2, dtype=DTYPE) * (HIGH - LOW) + LOW  # batch 3, q = 2
    sampler = SobolQMCNormalSampler(torch.Size([4]), seed=0)
    fantasy = model.fantasize(X, sampler)
    assert fantasy.batch_shape == (4, 3)
    assert fantasy.train_targets.shape == (4, 3, 9, 3)
    assert torch.isfinite(fantasy.train_targets[..., -2:, :]).all()  # gradients fantasised too
    assert fantasy.posterior(torch.rand(3, 5, 2, dtype=DTYPE)).mean.shape == (4, 3, 5, 1)
    # With small noise the fantasy model reproduces its fantasised observations.
    post = fantasy.posterior(X.expand(4, 3, 2, 2), output_indices=[0, 1, 2])
    scale = fantasy.train_targets[..., -2:, :].abs().max()
    torch.testing.assert_close(post.mean, fantasy.train_targets[..., -2:, :], rtol=0, atol=0.05 * scale.item())


def test_knowledge_gradient_depends_on_the_fantasised_gradients():
    """d-KG: the gradient of qKG with respect to the candidate flows through the fantasy model."""
    model = make_model()
    acqf = qKnowledgeGradient(model, num_fantasies=4)
    X = torch.rand(1, 1 + 4, 2, dtype=DTYPE) * (HIGH - LOW) + LOW
    X.requires_grad_(True)
    acqf(X).sum().backward()
    assert torch.isfinite(X.grad).all() and X.grad[0, 0].abs().sum() > 0


def test_subset_output_batch_shape_and_num_outputs():
    model = make_model(outputs=[0, 1, 2])
    assert model.num_outputs == 3 and model.batch_shape == torch.Size([])
    sub = model.subset_output([0, 2])
    assert sub.num_outputs == 2
    X = design(3, seed=4)
    torch.testing.assert_close(sub.posterior(X).mean, model.posterior(X).mean[..., [0, 2]])
    with pytest.raises(ValueError, match="idcs"):
        model.subset_output([3])
    Xb = design(10).reshape(2, 5, 2)
    batched = DerivativeGPModel(Xb, observe(Xb))
    assert batched.batch_shape == torch.Size([2])
    assert batched.posterior(torch.rand(4, 2, dtype=DTYPE)).mean.shape == (2, 4, 1)


# ---------------------------------------------------------------- acquisition functions


ACQUISITIONS = {
    "LogEI": lambda m, X, best: LogExpectedImprovement(m, best_f=best),
    "UCB": lambda m, X, best: UpperConfidenceBound(m, beta=2.0),
    "qLogEI": lambda m, X, best: qLogExpectedImprovement(m, best_f=best),
    "qLogNEI": lambda m, X, best: qLogNoisyExpectedImprovement(m, X_baseline=X),
    "qUCB": lambda m, X, best: qUpperConfidenceBound(m, beta=2.0),
    "qKG": lambda m, X, best: qKnowledgeGradient(m, num_fantasies=4),
}


@pytest.mark.parametrize("name", list(ACQUISITIONS))
def test_acquisition_functions_run_in_optimize_acqf(name):
    model = make_model(n=6)
    X = model.train_inputs[0]
    acqf = ACQUISITIONS[name](model, X, model.train_targets[:, 0].max())
    if name == "qLogNEI":
        assert acqf._cache_root  # BoTorch's default low-rank sampling is supported, not silently disabled
    q = 1 if name in ("LogEI", "UCB") else 2
    with warnings.catch_warnings():  # optimize_acqf's raw samples: the generator conftest seeds per test
        warnings.simplefilter("error", RuntimeWarning)  # e.g. "cache_root not supported"
        # Two of the q candidates may meet at a corner; their joint posterior covariance is then
        # singular and linear_operator adds jitter with a NumericalWarning, as it does for any GPyTorch model.
        warnings.simplefilter("ignore", NumericalWarning)
        candidate, value = optimize_acqf(
            acqf, BOUNDS, q=q, num_restarts=2, raw_samples=16, options={"maxiter": 15, "batch_limit": 4}
        )
    assert candidate.shape == (q, 2) and torch.isfinite(value).all()
    assert ((candidate >= LOW) & (candidate <= HIGH)).all()


def test_posterior_mean_recommendation():
    model = make_model(n=10)
    candidate, _ = optimize_acqf(PosteriorMean(model), BOUNDS, q=1, num_restarts=2, raw_samples=32)
    assert candidate.shape == (1, 2)


# ---------------------------------------------------------------- bad input


def test_bad_input_names_the_argument_and_shapes():
    X = design(5)
    Y = observe(X)
    with pytest.raises(ValueError, match=r"train_Y: expected shape \(5, 3\).*got \(5, 2\)"):
        DerivativeGPModel(X, Y[:, :2])
    with pytest.raises(ValueError, match="train_Y: expected finite"):
        DerivativeGPModel(X, torch.where(Y > 0, torch.inf, Y))
    with pytest.raises(TypeError, match="train_X: expected a floating-point tensor"):
        DerivativeGPModel(X.long(), Y)
    with pytest.raises(ValueError, match="train_Yvar: expected shape"):
        DerivativeGPModel(X, Y, train_Yvar=torch.ones(5, 1, dtype=DTYPE))
    with pytest.raises(ValueError, match="layout='interleaved'"):
        DerivativeGPModel(X, Y, covar_module=DerivativeRBFKernel())
    model = make_model()
    with pytest.raises(ValueError, match="output_indices: expected indices in"):
        model.posterior(X, output_indices=[3])
    with pytest.raises(ValueError, match=r"X: expected shape batch x q x 2, got \(5, 3\)"):
        model.posterior(torch.rand(5, 3, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"Y: expected shape batch x 2 x 3"):
        model.condition_on_observations(X[:2], Y[:2, :2])


def test_missing_botorch_gives_a_clear_import_error():
    code = "import sys; sys.modules['botorch'] = None; import gpderiv.botorch"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "pip install 'gpderiv[botorch]'" in proc.stderr


def test_factor_is_cached_until_a_hyperparameter_changes(monkeypatch):
    model = make_model()
    calls = []
    original = DenseCholesky.factor
    monkeypatch.setattr(DenseCholesky, "factor", lambda self, *args: calls.append(1) or original(self, *args))
    X = design(3, seed=7)
    first = model.posterior(X).mean
    model.posterior(X)
    fantasy = model.fantasize(X[:1], SobolQMCNormalSampler(torch.Size([2]), seed=0))
    fantasy.posterior(X)
    assert len(calls) == 1  # the parent's factor served the second call and the fantasy (grown, not refactorised)
    model.covar_module.lengthscale = torch.tensor([[0.5, 0.6]], dtype=DTYPE)
    assert not torch.allclose(model.posterior(X).mean, first)
    assert len(calls) == 2


def test_qmc_samples_have_the_posterior_mean_and_covariance():
    """Base samples map through the interleaved multi-output covariance correctly."""
    model = make_model()
    X = design(2, seed=11)
    post = model.posterior(X, output_indices=[0, 1, 2])
    samples = SobolQMCNormalSampler(torch.Size([4096]), seed=1)(post)  # 4096 x 2 x 3
    torch.testing.assert_close(samples.mean(0), post.mean, rtol=0, atol=0.05 * post.variance.sqrt().max().item())
    flat = samples.reshape(4096, -1)  # interleaved: point-major, output-minor
    empirical = torch.cov(flat.T)
    cov = post.distribution.covariance_matrix
    torch.testing.assert_close(empirical, cov, rtol=0, atol=0.1 * cov.diagonal().max().item())


def test_conditioning_twice_grows_the_factor_twice():
    """A conditioned model conditioned again (nested block factors) equals the rebuilt model."""
    X, X1, X2 = design(5, seed=1), design(2, seed=2), design(3, seed=3)
    kwargs = {"input_transform": Normalize(2, bounds=BOUNDS), "outcome_transform": None}
    a = DerivativeGPModel(X, observe(X), **kwargs)
    a.covar_module.lengthscale = torch.tensor([[0.3, 0.35]], dtype=DTYPE)
    a.eval()
    twice = a.condition_on_observations(X1, observe(X1)).condition_on_observations(X2, observe(X2))
    assert len(twice._factor().parts) == 3  # the parent's factor grown twice, not refactorised
    Xall = torch.cat([X, X1, X2])
    b = DerivativeGPModel(Xall, observe(Xall), **kwargs)
    b.load_state_dict(a.state_dict(), strict=False)
    Xs = design(4, seed=4)
    pt, pb = twice.posterior(Xs, output_indices=[0, 1, 2]), b.posterior(Xs, output_indices=[0, 1, 2])
    torch.testing.assert_close(pt.mean, pb.mean)
    torch.testing.assert_close(pt.distribution.covariance_matrix, pb.distribution.covariance_matrix)


def test_gpytorch_likelihood_on_the_value_prior_adds_value_noise():
    model = make_model()
    X = design(4, seed=12)
    prior = model(X)
    noisy = model.likelihood(prior)
    torch.testing.assert_close(noisy.variance - prior.variance, torch.full((4,), 1e-3, dtype=DTYPE))


def test_values_only_train_y_of_one_column_is_accepted():
    """As BoTorch's single-output models take it: the gradient columns are then not observed (NaN)."""
    X = design(6, seed=13)
    Y = observe(X)
    values_only = DerivativeGPModel(X, Y[:, :1], train_Yvar=torch.full((6, 1), 1e-3, dtype=DTYPE))
    padded = torch.cat([Y[:, :1], torch.full((6, 2), float("nan"), dtype=DTYPE)], -1)
    reference = DerivativeGPModel(X, padded, train_Yvar=torch.full((6, 3), 1e-3, dtype=DTYPE))
    assert values_only.train_targets.shape == (6, 3) and torch.isnan(values_only.train_targets[:, 1:]).all()
    Xs = design(3, seed=14)
    torch.testing.assert_close(values_only.posterior(Xs).mean, reference.posterior(Xs).mean)
    variances = [m.posterior(Xs, output_indices=[0, 1]).variance for m in (values_only, reference)]
    torch.testing.assert_close(*variances)
