"""The BoTorch model's SingleTaskGP conventions: InputDataWarning, ``likelihood=``, ``mean_module=``."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

pytest.importorskip("botorch")

from botorch import settings  # noqa: E402
from botorch.exceptions import InputDataWarning  # noqa: E402
from botorch.models import SingleTaskGP  # noqa: E402
from botorch.models.transforms.input import Normalize  # noqa: E402
from botorch.sampling import SobolQMCNormalSampler  # noqa: E402
from gpytorch.constraints import Interval  # noqa: E402
from gpytorch.likelihoods import GaussianLikelihood  # noqa: E402
from gpytorch.means import LinearMean, ZeroMean  # noqa: E402
from gpytorch.priors import GammaPrior  # noqa: E402

from gpderiv.botorch import DerivativeGaussianLikelihood, DerivativeGPModel  # noqa: E402
from gpderiv.kernels import DerivativeRBFKernel  # noqa: E402
from gpderiv.testing import assert_close, contains_all  # noqa: E402

DTYPE = torch.float64


def data(n: int = 8, d: int = 2, scale: float = 1.0, shift: float = 0.0, seed: int = 0):
    """`n x d` inputs in ``shift + scale * [0, 1]^d`` and `n x (1 + d)` observations of a quadratic."""
    X = shift + scale * torch.rand(n, d, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))
    f = (X**2).sum(-1, keepdim=True) + X[..., :1]
    grad = 2 * X + torch.nn.functional.one_hot(torch.tensor(0), d).to(DTYPE)
    return X, torch.cat([f, grad], -1)


def input_data_warnings(build) -> list[str]:
    """Messages of the InputDataWarnings that ``build()`` gives."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        build()
    return [str(w.message) for w in record if issubclass(w.category, InputDataWarning)]


# ---------------------------------------------------------------- InputDataWarning


def test_float32_inputs_warn_once_with_botorchs_class_at_the_callers_line():
    X, Y = data()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        DerivativeGPModel(X.float(), Y.float())
    found = [w for w in record if issubclass(w.category, InputDataWarning)]
    assert len(found) == 1 and "train_X: got torch.float32" in str(found[0].message)
    assert found[0].filename == __file__  # points at the constructor call, as SingleTaskGP's


@pytest.mark.parametrize(
    ("scale", "shift", "transform", "standardize"),
    [
        (1.0, 0.0, None, True),  # unit cube, standardised: silent
        (5.0, -2.0, None, True),  # inputs outside the unit cube
        (5.0, -2.0, "normalize", True),  # ... normalised by the transform: silent
        (0.5, 0.2, None, True),  # inside the cube without filling it: silent (not strict)
        (1.0, 0.0, None, False),  # raw outcomes
        (5.0, -2.0, None, False),  # both
    ],
)
def test_scaling_warnings_exactly_when_singletaskgp_warns(scale, shift, transform, standardize):
    """Same data, same transforms: our model warns about scaling iff SingleTaskGP does (values column)."""
    X, Y = data(scale=scale, shift=shift)
    Y = Y * 10 + 3  # values of mean and spread far from (0, 1)
    d = X.shape[-1]

    def ours():
        DerivativeGPModel(
            X,
            Y,
            input_transform=Normalize(d) if transform else None,
            outcome_transform="default" if standardize else None,
        )

    def theirs():
        SingleTaskGP(
            X,
            Y[..., :1],
            input_transform=Normalize(d) if transform else None,
            **({} if standardize else {"outcome_transform": None}),
        )

    mine, reference = input_data_warnings(ours), input_data_warnings(theirs)
    kinds = ("not contained to the unit cube", "not standardized")
    assert [any(k in m for m in mine) for k in kinds] == [any(k in m for m in reference) for k in kinds]
    assert any(kinds[0] in m for m in mine) == (scale > 1 and not transform)
    assert any(kinds[1] in m for m in mine) == (not standardize)


def test_scaling_checks_skip_gradient_columns_custom_kernels_and_the_setting():
    X, Y = data()
    Y = torch.cat([Y[..., :1], 1e3 * Y[..., 1:] + 50], -1)  # gradients are never centred nor unit
    assert input_data_warnings(lambda: DerivativeGPModel(X, Y)) == []
    raw = data(scale=4.0)[1] + 7
    assert input_data_warnings(lambda: DerivativeGPModel(4 * X, raw, outcome_transform=None))
    # A custom kernel (SingleTaskGP's check_nans_only) or BoTorch's setting: no scaling warnings.
    kernel = DerivativeRBFKernel(layout="interleaved", ard_num_dims=2)
    custom = lambda: DerivativeGPModel(4 * X, raw, covar_module=kernel, outcome_transform=None)  # noqa: E731
    assert input_data_warnings(custom) == []
    with settings.validate_input_scaling(False):
        assert input_data_warnings(lambda: DerivativeGPModel(4 * X, raw, outcome_transform=None)) == []
    # Missing values are left out of the standardisation check, not NaN-propagated into silence.
    partly = raw.clone()
    partly[0, 0] = float("nan")
    assert input_data_warnings(lambda: DerivativeGPModel(4 * X, partly, outcome_transform=None))


# ---------------------------------------------------------------- likelihood=


def test_other_likelihoods_are_refused_with_the_reason():
    X, Y = data()
    with pytest.raises(TypeError, match=contains_all("likelihood: expected a gpderiv.botorch", "GaussianLikelihood")):
        DerivativeGPModel(X, Y, likelihood=GaussianLikelihood())
    with pytest.raises(ValueError, match=contains_all("likelihood: expected DerivativeGaussianLikelihood(d=2", "d=3")):
        DerivativeGPModel(X, Y, likelihood=DerivativeGaussianLikelihood(3))
    with pytest.raises(ValueError, match="likelihood: expected DerivativeGaussianLikelihood"):
        DerivativeGPModel(X, Y, likelihood=DerivativeGaussianLikelihood(2, batch_shape=torch.Size([3])))
    with pytest.raises(ValueError, match=contains_all("likelihood: expected a likelihood that learns", "train_Yvar")):
        DerivativeGPModel(X, Y, torch.full_like(Y, 0.01), likelihood=DerivativeGaussianLikelihood(2))


def test_a_custom_likelihood_is_used_and_survives_conditioning_fantasies_and_state_dicts():
    X, Y = data()
    prior = GammaPrior(2.0, 10.0)
    likelihood = DerivativeGaussianLikelihood(2, noise_prior=prior, noise_constraint=Interval(1e-3, 0.5))
    model = DerivativeGPModel(X, Y, likelihood=likelihood)
    assert model.likelihood is likelihood
    default = DerivativeGPModel(X, Y)
    noise = likelihood.noise.detach()
    # the prior's mode, inside the constraint (through GPyTorch's float32 setter)
    torch.testing.assert_close(noise, torch.full((2,), 0.1, dtype=DTYPE), rtol=1e-6, atol=0)
    default.likelihood.noise = noise  # same noise, other prior: the losses differ by the priors only
    loss, reference = model.compute_custom_loss(), default.compute_custom_loss()
    entries = torch.isfinite(Y).sum()
    log_priors = default.likelihood.noise_covar.noise_prior.log_prob(noise).sum() - prior.log_prob(noise).sum()
    expected = reference + log_priors / entries
    assert_close(loss, expected)
    model.fit(optimizer_kwargs={"options": {"maxiter": 3}})
    assert bool(((model.likelihood.noise >= 1e-3) & (model.likelihood.noise <= 0.5)).all())
    Xn, Yn = data(n=2, seed=1)
    cond = model.condition_on_observations(Xn, Yn)
    assert isinstance(cond.likelihood.noise_covar.raw_noise_constraint, Interval)
    assert_close(cond.likelihood.noise, model.likelihood.noise)
    fantasy = model.fantasize(Xn, SobolQMCNormalSampler(torch.Size([2]), seed=0))
    assert fantasy.posterior(Xn).mean.shape == (2, 2, 1)
    assert isinstance(fantasy.likelihood.noise_covar.noise_prior, GammaPrior)
    rebuilt = DerivativeGPModel(X, Y, likelihood=DerivativeGaussianLikelihood(2, noise_prior=GammaPrior(2.0, 10.0)))
    rebuilt.likelihood.noise_covar.register_constraint("raw_noise", Interval(1e-3, 0.5))
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt.posterior(Xn).mean, model.posterior(Xn).mean, rtol=1e-7, atol=1e-9)


def test_a_batched_custom_likelihood():
    X, Y = data()
    Xb, Yb = X.expand(3, -1, -1), Y.expand(3, -1, -1)
    likelihood = DerivativeGaussianLikelihood(2, batch_shape=torch.Size([3]), noise_prior=GammaPrior(2.0, 10.0))
    model = DerivativeGPModel(Xb, Yb, likelihood=likelihood)
    assert model.likelihood.noise.shape == (3, 2)
    assert model.posterior(X[:2]).mean.shape == (3, 2, 1)


# ---------------------------------------------------------------- mean_module=


def test_mean_module_must_be_a_gpytorch_mean():
    X, Y = data()
    with pytest.raises(TypeError, match=contains_all("mean_module: expected a gpytorch.means.Mean", "Linear")):
        DerivativeGPModel(X, Y, mean_module=torch.nn.Linear(2, 1))


def linear_mean(d: int = 2) -> LinearMean:
    mean = LinearMean(d).double()
    with torch.no_grad():
        mean.weights.copy_(torch.tensor([[1.5], [-0.5]], dtype=DTYPE))
        mean.bias.fill_(0.3)
    return mean


def test_a_mean_function_equals_subtracting_it_and_its_gradient_from_the_data():
    """GP with mean m on data [y, g] = m + (zero-mean GP on [y - m, g - grad m]), in every output."""
    X, Y = data()
    mean = linear_mean()
    w, b = mean.weights.detach().squeeze(-1), mean.bias.detach()
    prior = torch.cat([(X @ w + b).unsqueeze(-1), w.expand(X.shape[0], 2)], -1)
    with_mean = DerivativeGPModel(X, Y, outcome_transform=None, mean_module=mean)
    subtracted = DerivativeGPModel(X, Y - prior, outcome_transform=None, mean_module=ZeroMean())
    Xs = data(n=5, seed=3)[0]
    shift = torch.cat([(Xs @ w + b).unsqueeze(-1), w.expand(5, 2)], -1)
    pm, ps = with_mean.posterior(Xs, output_indices=[0, 1, 2]), subtracted.posterior(Xs, output_indices=[0, 1, 2])
    assert_close(pm.mean, ps.mean + shift)
    assert_close(pm.distribution.covariance_matrix, ps.distribution.covariance_matrix)
    # Conditioning on new data is the model rebuilt on all of it.
    Xn, Yn = data(n=3, seed=4)
    cond = with_mean.condition_on_observations(Xn, Yn)
    full = DerivativeGPModel(torch.cat([X, Xn]), torch.cat([Y, Yn]), outcome_transform=None, mean_module=mean)
    assert_close(cond.posterior(Xs).mean, full.posterior(Xs).mean)


def test_mean_function_posterior_is_differentiable_and_its_hyperparameters_are_fitted():
    X, Y = data()
    model = DerivativeGPModel(X, Y, mean_module=linear_mean())
    x = data(n=1, seed=5)[0].requires_grad_(True)
    (expected,) = torch.autograd.grad(model.posterior(x).mean.sum(), x)
    assert_close(model.posterior(x, output_indices=[1, 2]).mean.reshape(-1), expected.reshape(-1))
    model.train()
    model.compute_custom_loss().backward()
    assert model.mean_module.weights.grad is not None and bool(model.mean_module.weights.grad.abs().sum() > 0)
    before = copy.deepcopy(model.mean_module.weights.detach())
    model.fit(optimizer_kwargs={"options": {"maxiter": 5}})
    assert not torch.equal(before, model.mean_module.weights.detach())
    mean = LinearMean(2, batch_shape=torch.Size([2])).double()
    batched = DerivativeGPModel(X.expand(2, -1, -1), Y.expand(2, -1, -1), mean_module=mean)
    assert batched.posterior(x.detach(), output_indices=[0, 1, 2]).mean.shape == (2, 1, 3)
