"""BoTorch's own generic GP model tests, ported to :class:`~gpderiv.botorch.DerivativeGPModel`.

Origin: BoTorch's ``test/models/test_gp_regression.py`` (classes ``TestGPRegressionBase``,
``TestSingleTaskGP`` and ``TestSingleTaskGPFixedNoise``) and its helpers
``botorch.utils.testing.get_random_data`` and ``botorch.utils.test_helpers.get_pvar_expected``,
rewritten here as our own code for a value + gradient model. Each test names the test it ports.
As BoTorch's ``TestSingleTaskGPFixedNoise`` inherits every test of ``TestSingleTaskGP``, every
test here runs for a learned noise and for known variances (``train_Yvar = 0.01``), the
``noise`` fixture.

Adaptations, the same everywhere:

* ``train_Y`` is `batch x n x (1 + d)`: ``[f, df/dx]`` (docs/botorch.md); BoTorch's number of
  outputs ``m`` in {1, 2} becomes the model's outputs ``[0]`` (the objective) or ``[0, 1]``
  (objective and derivative), chosen with ``outputs=``. Both outputs belong to one GP, so the
  model's parameters have the batch shape but not a dimension per output.
* ``Standardize`` becomes :class:`~gpderiv.botorch.DerivativeStandardize` (BoTorch's would centre
  the gradient column, and is refused); a custom kernel is ``DerivativeRBFKernel(
  layout="interleaved")`` instead of ``RBFKernel``, a custom likelihood a
  ``DerivativeGaussianLikelihood`` instead of ``GaussianLikelihood``.
* float64 only (the house rule for tests; the float32 path is covered by
  tests/test_reliability_botorch.py and tests/test_botorch_inputs.py).
* Test points whose batch shape does not broadcast with the model's raise our ``ValueError``
  (``X: expected a batch shape that broadcasts with ...``) where SingleTaskGP raises a
  ``RuntimeError`` from deep inside GPyTorch.

Not ported, because they do not apply:

* ``TestGPRegressionBase.test_default_transforms`` with ``Log()``: a non-affine outcome transform
  breaks the chain rule between values and gradients, so the model refuses it (tested here as
  the adapted case); the other two cases (default, None) are ported.
* ``TestSingleTaskGP.test_construct_inputs_task_feature_deprecated``: a deprecation of
  ``SingleTaskGP.construct_inputs``'s own ``task_feature`` argument; our model uses
  ``Model.construct_inputs``, which never had it.

Then BoTorch's open pull request #2137, the "first order BO" tutorial (a GP on values and
gradients, then a BO loop with qNEI and one with qKG, whose fantasies carry gradients: d-KG): its
qNEI and qKG loops run with our model in :func:`test_first_order_bo_tutorial_qnei_and_qkg_loops`
(a few iterations, tiny ``raw_samples``/``num_restarts``). The pull request's notebook is neither
in the BoTorch mirror nor in the search index available here, so the loops follow its
description (and examples/bo_with_gradients.py, which runs the same methods at full size), not
its code.
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

pytest.importorskip("botorch")

from botorch.acquisition import qKnowledgeGradient, qNoisyExpectedImprovement  # noqa: E402
from botorch.exceptions.warnings import OptimizationWarning  # noqa: E402
from botorch.fit import fit_gpytorch_mll  # noqa: E402
from botorch.models.transforms.input import InputStandardize, Normalize  # noqa: E402
from botorch.models.transforms.outcome import Log  # noqa: E402
from botorch.optim import optimize_acqf  # noqa: E402
from botorch.posteriors import GPyTorchPosterior  # noqa: E402
from botorch.sampling import SobolQMCNormalSampler  # noqa: E402
from botorch.test_functions import Branin  # noqa: E402
from botorch.utils.datasets import SupervisedDataset  # noqa: E402
from botorch.utils.sampling import draw_sobol_samples  # noqa: E402
from gpytorch.means import ConstantMean, ZeroMean  # noqa: E402
from gpytorch.mlls import ExactMarginalLogLikelihood  # noqa: E402
from gpytorch.priors import LogNormalPrior  # noqa: E402

from gpderiv.botorch import DerivativeGaussianLikelihood, DerivativeGPModel, DerivativeStandardize  # noqa: E402
from gpderiv.kernels import DerivativeRBFKernel  # noqa: E402

DTYPE = torch.float64
BATCH_SHAPES = (torch.Size(), torch.Size([2]))
OUTPUTS = {1: [0], 2: [0, 1]}  # BoTorch's m -> our outputs: the objective, then df/dx


@pytest.fixture(params=["learned", "fixed"])
def noise(request) -> str:
    """TestSingleTaskGP (learned noise) and TestSingleTaskGPFixedNoise (train_Yvar = 0.01)."""
    return request.param


def random_data(batch_shape: torch.Size, d: int = 1, n: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """BoTorch's ``get_random_data`` with gradients: `batch x n x d` inputs, `batch x n x (1 + d)` ``[f, grad f]``.

    Inputs on a jittered grid of [0, 1] (the first batch member shifted by 0.02), ``f`` the sine of
    the first input with noise of standard deviation 0.2 on values and gradients.
    """
    gen = torch.Generator().manual_seed(seed)
    X = torch.linspace(0, 0.95, n, dtype=DTYPE).unsqueeze(-1).expand(n, d)
    X = X + 0.05 * torch.rand(n, d, generator=gen, dtype=DTYPE)
    X = X.repeat(*batch_shape, 1, 1)
    X[0] += 0.02
    f = torch.sin(2 * math.pi * X[..., :1])
    grad = torch.cat([2 * math.pi * torch.cos(2 * math.pi * X[..., :1]), torch.zeros_like(X[..., 1:])], -1)
    noise = 0.2 * torch.randn(n, 1 + d, generator=gen, dtype=DTYPE)
    return X, torch.cat([f, grad], -1) + noise


def make_model(
    batch_shape: torch.Size,
    m: int,
    noise: str,
    outcome_transform=None,
    input_transform=None,
    **extra,
) -> tuple[DerivativeGPModel, dict]:
    """``_get_model_and_data`` of both test classes: a model on random data, and its arguments."""
    X, Y = random_data(batch_shape)
    kwargs = {"train_X": X, "train_Y": Y, "outcome_transform": outcome_transform, "input_transform": input_transform}
    if noise == "fixed":
        kwargs["train_Yvar"] = torch.full_like(Y, 0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)  # InputDataWarning: raw outcomes on purpose
        model = DerivativeGPModel(**kwargs, outputs=OUTPUTS[m], **extra)
    return model, kwargs


def output_scale(model: DerivativeGPModel, outputs: list[int]) -> torch.Tensor:
    """`... x 1 x m` factor from model units to original units of each output: sigma / c_a (chain rule)."""
    d = model.d
    scale = torch.ones(1, 1 + d, dtype=DTYPE)
    if hasattr(model, "outcome_transform"):
        scale = scale * model.outcome_transform.stdvs
    if hasattr(model, "input_transform"):
        scale = scale * torch.cat([torch.ones(1, 1, dtype=DTYPE), 1.0 / model.input_transform.coefficient], -1)
    return scale[..., outputs]


def expected_noisy_variance(model: DerivativeGPModel, posterior, outputs: list[int]) -> torch.Tensor:
    """BoTorch's ``get_pvar_expected``: the posterior variance plus each output's noise, in original units.

    The noise of a new observation is the learned variance of its kind, or the mean known
    variance of its output (as FixedNoiseGaussianLikelihood's mean noise), untransformed.
    """
    if model.likelihood.train_Yvar is None:
        noise = model.likelihood.noise[..., [0] + [1] * model.d].unsqueeze(-2)
    else:
        noise = model.likelihood.train_Yvar.mean(-2, keepdim=True)
    return posterior.variance + noise[..., outputs] * output_scale(model, outputs) ** 2


def fit_one_step(model: DerivativeGPModel) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=OptimizationWarning)
        fit_gpytorch_mll(
            ExactMarginalLogLikelihood(model.likelihood, model),
            optimizer_kwargs={"options": {"maxiter": 1}},
            max_attempts=1,
        )


def test_gp(noise):
    """Port of TestGPRegressionBase.test_gp: init, parameter shapes, posterior shapes and observation noise."""
    bounds = torch.tensor([[-1.0], [1.0]], dtype=DTYPE)
    for batch_shape, m, use_octf, use_intf in itertools.product(BATCH_SHAPES, (1, 2), (False, True), (False, True)):
        octf = DerivativeStandardize(d=1).eval() if use_octf else None  # put in train mode by the constructor
        intf = Normalize(d=1, bounds=bounds, transform_on_train=True) if use_intf else None
        model, kwargs = make_model(batch_shape, m, noise, outcome_transform=octf, input_transform=intf)
        fit_one_step(model)
        outputs = OUTPUTS[m]

        # init
        assert isinstance(model.mean_module, ConstantMean)
        assert isinstance(model.covar_module, DerivativeRBFKernel)
        assert isinstance(model.covar_module.lengthscale_prior, LogNormalPrior)
        if use_octf:
            assert isinstance(model.outcome_transform, DerivativeStandardize)
            assert not torch.all(model.outcome_transform.means == 0)  # trained by the constructor
        if use_intf:
            assert isinstance(model.input_transform, Normalize)
            assert torch.equal(model.train_inputs[0], intf(kwargs["train_X"]))

        # parameter sizes: one set of hyperparameters per batch member (shared by the outputs)
        for name, param in model.named_parameters():
            assert param.shape[: len(batch_shape)] == batch_shape, name

        # posterior, non-batch evaluation
        X = torch.rand(batch_shape + torch.Size([3, 1]), dtype=DTYPE)
        expected_shape = batch_shape + torch.Size([3, m])
        posterior = model.posterior(X)
        assert isinstance(posterior, GPyTorchPosterior)
        assert posterior.mean.shape == posterior.variance.shape == expected_shape

        # adding observation noise
        noisy = model.posterior(X, observation_noise=True)
        assert noisy.mean.shape == noisy.variance.shape == expected_shape
        torch.testing.assert_close(noisy.variance, expected_noisy_variance(model, posterior, outputs))

        # tensor valued observation noise (outcome-transformed units)
        obs_noise = torch.rand(batch_shape + torch.Size([3, m]), dtype=DTYPE)
        noisy = model.posterior(X, observation_noise=obs_noise)
        assert noisy.mean.shape == noisy.variance.shape == expected_shape
        torch.testing.assert_close(noisy.variance, posterior.variance + obs_noise * output_scale(model, outputs) ** 2)

        # batch evaluation
        X = torch.rand(2, *batch_shape, 3, 1, dtype=DTYPE)
        expected_shape = torch.Size([2]) + batch_shape + torch.Size([3, m])
        posterior = model.posterior(X)
        assert posterior.mean.shape == expected_shape
        noisy = model.posterior(X, observation_noise=True)
        assert noisy.mean.shape == expected_shape
        torch.testing.assert_close(noisy.variance, expected_noisy_variance(model, posterior, outputs))

        # batch evaluation with broadcasting
        for input_batch_shape in ([], [3], [1]):
            X = torch.rand(*input_batch_shape, 3, 1, dtype=DTYPE)
            if input_batch_shape == [3] and len(batch_shape) > 0:
                with pytest.raises(ValueError, match="X: expected a batch shape that broadcasts with"):
                    model.posterior(X, observation_noise=True)
                continue
            posterior = model.posterior(X, observation_noise=True)
            new_dims = [] if input_batch_shape == [1] and len(batch_shape) > 0 else input_batch_shape
            assert posterior.mean.shape == batch_shape + torch.Size([*new_dims, 3, m])


def test_default_transforms(noise):
    """Port of TestGPRegressionBase.test_default_transforms (Default, None; Log is refused)."""
    for batch_shape, m, octf in itertools.product(BATCH_SHAPES, (1, 2), ("Default", "None", "Log")):
        X, Y = random_data(batch_shape)
        Yvar = torch.full_like(Y, 0.01) if noise == "fixed" else None
        kwargs = {} if octf == "Default" else {"outcome_transform": None if octf == "None" else Log()}
        if octf == "Log":
            with pytest.raises(TypeError, match="outcome_transform: expected gpderiv.botorch.DerivativeStandardize"):
                DerivativeGPModel(X, Y.abs() + 1, Yvar, outputs=OUTPUTS[m], **kwargs)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)  # raw outcomes with outcome_transform=None
            model = DerivativeGPModel(X, Y, Yvar, outputs=OUTPUTS[m], **kwargs)
        if octf == "Default":
            assert isinstance(model.outcome_transform, DerivativeStandardize)
            assert model.outcome_transform.d == 1
            assert model.outcome_transform.means.shape[:-2] == batch_shape
        else:
            assert not hasattr(model, "outcome_transform")
        assert not hasattr(model, "input_transform")


def test_custom_init(noise):
    """Port of TestGPRegressionBase.test_custom_init: the given mean, kernel and likelihood are the model's."""
    for batch_shape, m in itertools.product(BATCH_SHAPES, (1, 2)):
        extra = {"mean_module": ZeroMean(), "covar_module": DerivativeRBFKernel(layout="interleaved")}
        if noise == "learned":  # as TestSingleTaskGPFixedNoise, no likelihood with known variances
            extra["likelihood"] = DerivativeGaussianLikelihood(1)
        model, _ = make_model(batch_shape, m, noise, **extra)
        assert model.mean_module is extra["mean_module"]
        assert model.covar_module is extra["covar_module"]
        if "likelihood" in extra:
            assert model.likelihood is extra["likelihood"]
        assert torch.isfinite(model.posterior(torch.rand(4, 1, dtype=DTYPE)).mean).all()


def test_condition_on_observations(noise):
    """Port of TestGPRegressionBase.test_condition_on_observations, with the batched-vs-unbatched check."""
    for batch_shape, m, use_octf in itertools.product(BATCH_SHAPES, (1, 2), (False, True)):
        octf = DerivativeStandardize(d=1) if use_octf else None
        model, kwargs = make_model(batch_shape, m, noise, outcome_transform=octf)
        model.posterior(torch.rand(4, 1, dtype=DTYPE))
        fant_shape = torch.Size([2])
        X_fant, Y_fant = random_data(fant_shape + batch_shape, n=3, seed=1)
        c_kwargs = {"noise": torch.full_like(Y_fant, 0.01)} if noise == "fixed" else {}
        cm = model.condition_on_observations(X_fant, Y_fant, **c_kwargs)
        # the same input points for every fantasy (broadcasting)
        c_same = {"noise": torch.full_like(Y_fant[0], 0.01)} if noise == "fixed" else {}
        cm_same_inputs = model.condition_on_observations(X_fant[0], Y_fant, **c_same)

        test_Xs = [
            torch.rand(4, 1, dtype=DTYPE),  # broadcast across fantasy and model batches
            torch.rand(batch_shape + torch.Size([4, 1]), dtype=DTYPE),  # per model batch
            torch.rand(fant_shape + batch_shape + torch.Size([4, 1]), dtype=DTYPE),  # per fantasy and model batch
        ]
        for test_X in test_Xs:
            posterior = cm.posterior(test_X)
            assert posterior.mean.shape == fant_shape + batch_shape + torch.Size([4, m])
            posterior_same_inputs = cm_same_inputs.posterior(test_X)
            assert posterior_same_inputs.mean.shape == fant_shape + batch_shape + torch.Size([4, m])

            # fantasies of the batched model equal those of its first member on its own
            if len(batch_shape) > 0 and test_X.dim() == 2:
                state_dict_non_batch = {k: (v[0] if v.numel() > 1 else v) for k, v in model.state_dict().items()}
                non_batch_kwargs = {"train_X": kwargs["train_X"][0], "train_Y": kwargs["train_Y"][0]}
                if "train_Yvar" in kwargs:
                    non_batch_kwargs["train_Yvar"] = kwargs["train_Yvar"][0]
                non_batch_kwargs["outcome_transform"] = DerivativeStandardize(d=1) if use_octf else None
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", category=UserWarning)
                    model_non_batch = DerivativeGPModel(**non_batch_kwargs, outputs=OUTPUTS[m])
                model_non_batch.load_state_dict(state_dict_non_batch)
                model_non_batch.eval()
                model_non_batch.posterior(torch.rand(4, 1, dtype=DTYPE))
                c_kwargs = {"noise": torch.full_like(Y_fant[0, 0], 0.01)} if noise == "fixed" else {}
                cm_non_batch = model_non_batch.condition_on_observations(X_fant[0][0], Y_fant[:, 0], **c_kwargs)
                non_batch_posterior = cm_non_batch.posterior(test_X)
                torch.testing.assert_close(
                    posterior_same_inputs.mean[:, 0], non_batch_posterior.mean, atol=1e-3, rtol=0
                )
                torch.testing.assert_close(
                    posterior_same_inputs.distribution.covariance_matrix[:, 0],
                    non_batch_posterior.distribution.covariance_matrix,
                    atol=1e-3,
                    rtol=0,
                )


def test_fantasize(noise):
    """Port of TestGPRegressionBase.test_fantasize: fantasy models, and input transforms applied to X."""
    for batch_shape, m, use_octf in itertools.product(BATCH_SHAPES, (1, 2), (False, True)):
        octf = DerivativeStandardize(d=1) if use_octf else None
        model, _ = make_model(batch_shape, m, noise, outcome_transform=octf)
        X_f = torch.rand(batch_shape + torch.Size([4, 1]), dtype=DTYPE)
        fm = model.fantasize(X=X_f, sampler=SobolQMCNormalSampler(sample_shape=torch.Size([3])))
        assert isinstance(fm, model.__class__)
        assert fm.batch_shape == torch.Size([3]) + batch_shape

    # input transforms are applied to X
    intf = Normalize(d=1, bounds=torch.tensor([[0.0], [10.0]], dtype=DTYPE))
    model, _ = make_model(torch.Size(), 1, noise, input_transform=intf)
    X_f = torch.rand(4, 1, dtype=DTYPE)
    fm = model.fantasize(X_f, sampler=SobolQMCNormalSampler(sample_shape=torch.Size([3])))
    torch.testing.assert_close(fm.train_inputs[0][:, -4:], intf(X_f).expand(3, -1, -1))


def test_subset_model(noise):
    """Port of TestGPRegressionBase.test_subset_model: subset_output([0]) and subset_output([0, 1])."""
    for batch_shape, use_octf in itertools.product(BATCH_SHAPES, (True, False)):
        octf = DerivativeStandardize(d=1) if use_octf else None
        model, _ = make_model(batch_shape, 2, noise, outcome_transform=octf)
        subset_model = model.subset_output([0])
        X = torch.rand(batch_shape + torch.Size([3, 1]), dtype=DTYPE)
        p, p_sub = model.posterior(X), subset_model.posterior(X)
        torch.testing.assert_close(p_sub.mean, p.mean[..., [0]], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(p_sub.variance, p.variance[..., [0]], atol=1e-4, rtol=1e-4)
        subset_all_model = model.subset_output([0, 1])
        torch.testing.assert_close(subset_all_model.posterior(X).mean, p.mean)
        assert subset_all_model is not model  # a copy


def test_construct_inputs(noise):
    """Port of TestGPRegressionBase.test_construct_inputs and TestSingleTaskGPFixedNoise.test_construct_inputs."""
    for batch_shape in BATCH_SHAPES:
        model, kwargs = make_model(batch_shape, 1, noise)
        X, Y, Yvar = kwargs["train_X"], kwargs["train_Y"], kwargs.get("train_Yvar")
        data = SupervisedDataset(X, Y, Yvar=Yvar, feature_names=["x0"], outcome_names=["y", "dy_dx0"])
        data_dict = model.construct_inputs(data)
        assert X.equal(data_dict["train_X"]) and Y.equal(data_dict["train_Y"])
        if Yvar is not None:
            assert Yvar.equal(data_dict["train_Yvar"])
        rebuilt = DerivativeGPModel(**data_dict)  # the inputs build the model
        assert rebuilt.train_targets.shape == Y.shape


def test_set_transformed_inputs():
    """Port of TestGPRegressionBase.test_set_transformed_inputs (BoTorch issue 1078): fitting keeps X's shape."""
    X = torch.rand(5, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    Y = torch.cat([(X**2).sum(-1, keepdim=True), 2 * X], -1)
    for tf_class in (Normalize, InputStandardize):
        intf = tf_class(d=2)
        model = DerivativeGPModel(X, Y, input_transform=intf)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=OptimizationWarning)
            mll = ExactMarginalLogLikelihood(model.likelihood, model)
            fit_gpytorch_mll(mll, optimizer_kwargs={"options": {"maxiter": 2}})
        assert intf(X).shape == X.shape
        assert model.train_inputs[0].shape == X.shape


def test_fixed_noise_likelihood():
    """Port of TestSingleTaskGPFixedNoise.test_fixed_noise_likelihood: the likelihood holds the known variances."""
    for batch_shape, m in itertools.product(BATCH_SHAPES, (1, 2)):
        model, kwargs = make_model(batch_shape, m, "fixed")
        # model units: the outcome transform divides the variances by sigma^2 (outcome_transform=None: equal)
        assert model.likelihood.train_Yvar is not None
        assert torch.equal(model.likelihood.train_Yvar.reshape(-1), kwargs["train_Yvar"].reshape(-1))
        assert not model.likelihood.noise_covar.raw_noise.requires_grad  # fixed, not learned


def test_fantasized_noise():
    """Port of TestSingleTaskGPFixedNoise.test_fantasized_noise: new points get the mean known noise, or the given."""
    for batch_shape, m, use_octf in itertools.product(BATCH_SHAPES, (1, 2), (False, True)):
        octf = DerivativeStandardize(d=1) if use_octf else None
        model, _ = make_model(batch_shape, m, "fixed", outcome_transform=octf)
        X_f = torch.rand(batch_shape + torch.Size([4, 1]), dtype=DTYPE)
        sampler = SobolQMCNormalSampler(sample_shape=torch.Size([3]))
        fm = model.fantasize(X=X_f, sampler=sampler)
        avg_noise = model.likelihood.train_Yvar.mean(dim=-2, keepdim=True)
        assert (fm.likelihood.train_Yvar[..., -4:, :] == avg_noise).all()
        # a tensor of noise (outcome-transformed units), batch x n' x (1 + d): every output of the new points
        obs_noise = torch.full(X_f.shape[:-1] + torch.Size([2]), 0.1, dtype=DTYPE)
        fm = model.fantasize(X=X_f, sampler=sampler, observation_noise=obs_noise)
        assert (fm.likelihood.train_Yvar[..., -4:, :] == obs_noise).all()
        # batch x 1 x (1 + d)
        obs_noise = torch.full(X_f.shape[:-2] + torch.Size([1, 2]), 0.1, dtype=DTYPE)
        fm = model.fantasize(X=X_f, sampler=sampler, observation_noise=obs_noise)
        assert (fm.likelihood.train_Yvar[..., -4:, :] == obs_noise.expand(X_f.shape[:-1] + torch.Size([2]))).all()


# ---------------------------------------------------------------- BoTorch PR #2137: first-order BO


def first_order_observations(problem, X: torch.Tensor) -> torch.Tensor:
    """`n x (1 + d)` ``[f, grad f]`` of a BoTorch test problem at ``X`` (the gradient by autograd)."""
    Xg = X.detach().clone().requires_grad_(True)
    f = problem.evaluate_true(Xg)
    (g,) = torch.autograd.grad(f.sum(), Xg)
    return torch.cat([f.detach().unsqueeze(-1), g], -1)


def test_first_order_bo_tutorial_qnei_and_qkg_loops():
    """Port of BoTorch PR #2137's first-order BO tutorial: its qNEI and qKG (d-KG) loops on our model.

    Each iteration refits a DerivativeGPModel on every value and gradient seen so far, maximises the
    acquisition function and evaluates the candidate's value and gradient (Branin, negated:
    BoTorch maximises).
    """
    problem = Branin(negate=True)
    bounds = problem.bounds.to(DTYPE)
    X0 = draw_sobol_samples(bounds, n=4, q=1, seed=0).squeeze(1).to(DTYPE)
    Y0 = first_order_observations(problem, X0)
    for method in ("qNEI", "qKG"):
        X, Y = X0.clone(), Y0.clone()
        for _ in range(2):
            model = DerivativeGPModel(X, Y, input_transform=Normalize(2, bounds=bounds))
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=OptimizationWarning)
                fit_gpytorch_mll(
                    ExactMarginalLogLikelihood(model.likelihood, model), optimizer_kwargs={"options": {"maxiter": 20}}
                )
            if method == "qNEI":
                sampler = SobolQMCNormalSampler(sample_shape=torch.Size([32]), seed=0)
                acqf = qNoisyExpectedImprovement(model, X_baseline=X, sampler=sampler)
            else:
                acqf = qKnowledgeGradient(model, num_fantasies=4)
                # d-KG: the fantasies condition on sampled values *and* gradients at the candidate.
                fantasy = model.fantasize(X[:1], SobolQMCNormalSampler(sample_shape=torch.Size([4]), seed=0))
                assert fantasy.train_targets.shape == (4, X.shape[0] + 1, 3)
                assert torch.isfinite(fantasy.train_targets[..., -1, :]).all()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", category=UserWarning)  # qNEI's advice to use qLogNEI, optimiser chatter
                warnings.simplefilter("ignore", category=RuntimeWarning)
                candidate, value = optimize_acqf(
                    acqf, bounds, q=1, num_restarts=2, raw_samples=16, options={"maxiter": 20, "batch_limit": 2}
                )
            assert candidate.shape == (1, 2) and torch.isfinite(value).all() and bool(value >= 0)
            assert bool(((candidate >= bounds[0]) & (candidate <= bounds[1])).all())
            X, Y = torch.cat([X, candidate.detach()]), torch.cat([Y, first_order_observations(problem, candidate)])
        assert X.shape == (6, 2) and Y.shape == (6, 3) and torch.isfinite(Y).all()
        assert Y[:, 0].max() >= Y0[:, 0].max()
