"""The engine contract: registration, every engine against the dense one, batching, extension."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from gpytorch.kernels import ScaleKernel
from torch import Tensor

from gpderiv import DerivativeGP
from gpderiv.inference import (
    DenseCholesky,
    Engine,
    Factor,
    IterativeCG,
    engine_names,
    get_engine,
    register_engine,
)
from gpderiv.inference import registry as registry_module
from gpderiv.kernels import DerivativeMatern52Kernel, DerivativeRBFKernel
from gpderiv.observed_rows import ObservedRows
from gpderiv.testing import assert_close

DTYPE = torch.float64


class NaiveEngine(Engine):
    """A test engine: torch.linalg.solve and autograd through torch's MultivariateNormal, nothing clever."""

    name = "naive"

    def memory_estimate(self, data: ObservedRows, dtype: torch.dtype) -> int:
        return 0

    @staticmethod
    def matrix(kernel, data: ObservedRows, noise: Tensor) -> Tensor:
        K, s = data.covariance(kernel)
        return (K if s is None else s.reshape(*s.shape, 1, 1) * K) + torch.diag_embed(noise)

    def negative_log_marginal(self, kernel, data, noise, resid) -> Tensor:
        A = self.matrix(kernel, data, noise)
        return -torch.distributions.MultivariateNormal(torch.zeros_like(resid), A).log_prob(resid)

    def factor(self, kernel, data, noise, resid) -> Factor:
        return NaiveFactor(self, kernel, data, noise, resid)


class NaiveFactor(Factor):
    def __init__(self, engine, kernel, data, noise, resid) -> None:
        super().__init__(engine, kernel, data, noise, resid)
        self.A = NaiveEngine.matrix(kernel, data, noise)
        self.alpha = self.solve(resid)

    def solve(self, rhs: Tensor) -> Tensor:
        if rhs.dim() == 1:
            return torch.linalg.solve(self.A, rhs.unsqueeze(-1)).squeeze(-1)
        return torch.linalg.solve(self.A, rhs)


@pytest.fixture
def naive_registered():
    saved = dict(registry_module._ENGINES)
    register_engine("naive", NaiveEngine)
    yield
    registry_module._ENGINES.clear()
    registry_module._ENGINES.update(saved)


def make_data(n: int = 9, d: int = 2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(n, d, generator=gen, dtype=DTYPE)
    y = torch.sin(3 * X).sum(-1)
    return X, y, 3 * torch.cos(3 * X)


# ---------------------------------------------------------------- registration


def test_register_engine_refuses_what_is_not_an_engine() -> None:
    with pytest.raises(TypeError, match="cls: expected a subclass of gpderiv.inference.Engine"):
        register_engine("bad", dict)
    with pytest.raises(ValueError, match="name: expected a non-empty string other than 'auto'"):
        register_engine("auto", NaiveEngine)
    with pytest.raises(ValueError, match=r"inference: expected 'auto' or one of \['dense', 'iterative'"):
        get_engine("nope")
    assert {"dense", "iterative", "structured"} <= set(engine_names())


@pytest.mark.filterwarnings("ignore::gpderiv.NotFittedWarning")  # initial hyperparameters on purpose
def test_an_engine_registered_in_a_test_file_drives_derivative_gp(naive_registered) -> None:
    X, y, grad = make_data()
    grad[2, 1] = math.nan  # partial observations: the test engine gets whatever rows there are
    models = {name: DerivativeGP(X, y, grad, inference=name) for name in ("naive", "dense")}
    assert isinstance(models["naive"].engine, NaiveEngine) and models["naive"].inference == "naive"
    params = {name: list(m.parameters()) for name, m in models.items()}
    losses = {name: m.loss() for name, m in models.items()}
    assert_close(losses["naive"], losses["dense"])
    for a, b in zip(
        torch.autograd.grad(losses["naive"], params["naive"]),
        torch.autograd.grad(losses["dense"], params["dense"]),
        strict=True,
    ):
        assert_close(a, b, scale=10)
    Xs = torch.rand(4, 2, dtype=DTYPE)
    p, q = models["naive"].predict(Xs, full_cov=True), models["dense"].predict(Xs, full_cov=True)
    for name in ("mean", "grad_mean", "covariance"):
        assert_close(getattr(p, name), getattr(q, name), scale=100, msg=name)
    assert models["naive"].log_marginal_likelihood() == pytest.approx(models["dense"].log_marginal_likelihood())


# ---------------------------------------------------------------- the BoTorch model on every engine

botorch = pytest.importorskip("botorch")
from botorch.models.transforms.input import Normalize  # noqa: E402
from botorch.sampling import SobolQMCNormalSampler  # noqa: E402

from gpderiv.botorch import DerivativeGPModel  # noqa: E402


def observe(X: Tensor) -> Tensor:
    return torch.cat([torch.sin(3 * X).sum(-1, keepdim=True), 3 * torch.cos(3 * X)], -1)


def botorch_pair(engine: str, n: int = 8, d: int = 3, **kwargs) -> tuple[DerivativeGPModel, DerivativeGPModel]:
    """The same BoTorch model (data, hyperparameters) with ``engine`` and with the dense engine."""
    X = torch.rand(n, d, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    models = []
    for name in (engine, "dense"):
        kernel = DerivativeRBFKernel(layout="interleaved", **kwargs.get("kernel_args", {}))
        model = DerivativeGPModel(X, observe(X), covar_module=kernel, input_transform=Normalize(d), inference=name)
        model.covar_module.lengthscale = 0.6
        model.likelihood.noise = torch.tensor([1e-3, 2e-3], dtype=DTYPE)
        model.mean_module.constant = torch.tensor(0.1, dtype=DTYPE)
        models.append(model.eval())
    return models[0], models[1]


ENGINE_CASES = {
    "naive": {},
    "iterative": {"kernel_args": {"ard_num_dims": 3}},
    "structured": {},  # one lengthscale and shared noise: the isotropic path (ARD: tests/test_structured_ard.py)
}


@pytest.mark.parametrize("engine", list(ENGINE_CASES))
def test_botorch_model_with_each_engine_agrees_with_dense(engine, naive_registered) -> None:
    model, dense = botorch_pair(engine, **ENGINE_CASES[engine])
    assert model.inference == engine and type(model.engine) is type(get_engine(engine))
    if engine == "iterative":
        model.engine = IterativeCG(num_trace_samples=2000)  # the log-determinant is a stochastic estimate
    tol = {"naive": 10, "structured": 1e4, "iterative": 1e5}[engine]
    Xs = torch.rand(2, 3, 3, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    for outputs in ([0], [0, 2], [0, 1, 2, 3]):
        p, q = model.posterior(Xs, output_indices=outputs), dense.posterior(Xs, output_indices=outputs)
        assert_close(p.mean, q.mean, scale=tol)
        assert_close(p.distribution.covariance_matrix, q.distribution.covariance_matrix, scale=tol)
    mll, reference = model.log_marginal_likelihood().detach(), dense.log_marginal_likelihood().detach()
    assert abs(mll - reference) < (2e-2 * abs(reference) if engine == "iterative" else 1e-8 * abs(reference))
    # Conditioning: the engine's factor grown by the new rows (with a missing gradient entry).
    Xn = torch.rand(3, 3, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    Yn = observe(Xn)
    Yn[1, 2] = math.nan
    c, cd = model.condition_on_observations(Xn, Yn), dense.condition_on_observations(Xn, Yn)
    p, q = c.posterior(Xs, output_indices=[0, 1]), cd.posterior(Xs, output_indices=[0, 1])
    assert_close(p.mean, q.mean, scale=tol)
    assert_close(p.distribution.covariance_matrix, q.distribution.covariance_matrix, scale=tol)
    # Fantasies: batched over samples and candidate batches, the same draws for both.
    Xf = torch.rand(2, 1, 3, generator=torch.Generator().manual_seed(4), dtype=DTYPE)
    f = model.fantasize(Xf, SobolQMCNormalSampler(torch.Size([3]), seed=0))
    fd = dense.fantasize(Xf, SobolQMCNormalSampler(torch.Size([3]), seed=0))
    assert f.batch_shape == fd.batch_shape == torch.Size([3, 2])
    Xq = torch.rand(2, 4, 3, generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    p, q = f.posterior(Xq, output_indices=[0, 1, 2, 3]), fd.posterior(Xq, output_indices=[0, 1, 2, 3])
    assert_close(p.mean, q.mean, scale=tol)
    assert_close(p.variance, q.variance, scale=tol)


def test_an_engine_registered_in_a_test_file_drives_the_botorch_model(naive_registered) -> None:
    model, dense = botorch_pair("naive")
    loss, reference = model.compute_custom_loss(), dense.compute_custom_loss()
    assert_close(loss, reference)
    g = torch.autograd.grad(loss, model.covar_module.raw_lengthscale)[0]
    h = torch.autograd.grad(reference, dense.covar_module.raw_lengthscale)[0]
    assert_close(g, h, scale=10)


def test_engines_that_do_not_apply_say_why() -> None:
    X = torch.rand(5, 2, dtype=DTYPE)
    Y = observe(X)
    Y[0, 1] = math.nan
    with pytest.raises(ValueError, match="inference: 'iterative' needs every value and every partial derivative"):
        DerivativeGPModel(X, Y, inference="iterative")
    with pytest.raises(ValueError, match="inference: 'structured' needs every value and every partial derivative"):
        DerivativeGPModel(X, Y, inference="structured")
    with pytest.raises(ValueError, match="inference: expected 'auto' or one of"):
        DerivativeGPModel(X, observe(X), inference="cholesky")
    Xb = torch.rand(2, 5, 2, dtype=DTYPE)
    with pytest.raises(ValueError, match="inference: 'iterative' needs an unbatched model"):
        DerivativeGPModel(Xb, observe(Xb), inference="iterative")


def test_batched_botorch_models_fit_one_set_of_hyperparameters_per_member() -> None:
    """Two members, one smooth and one wiggly: each gets its own lengthscales, as with SingleTaskGP."""
    X = torch.rand(2, 12, 2, generator=torch.Generator().manual_seed(6), dtype=DTYPE)
    frequency = torch.tensor([0.5, 4.0], dtype=DTYPE).reshape(2, 1, 1)
    Y = torch.cat([torch.sin(frequency * X).sum(-1, keepdim=True), frequency * torch.cos(frequency * X)], -1)
    model = DerivativeGPModel(X, Y, input_transform=Normalize(2, batch_shape=torch.Size([2]))).fit()
    lengthscale = model.covar_module.lengthscale
    assert lengthscale.shape == (2, 1, 2) and model.likelihood.noise.shape == (2, 2)
    assert (lengthscale[0] > 2 * lengthscale[1]).all()  # the smooth member's are longer
    # Each member's hyperparameters are its own: the other member's fit its data worse.
    mll = model.log_marginal_likelihood().detach()
    swapped = DerivativeGPModel(X, Y, input_transform=Normalize(2, batch_shape=torch.Size([2])))
    state = {k: v.flip(0) if v.dim() and v.shape[0] == 2 else v for k, v in model.state_dict().items()}
    swapped.load_state_dict(state)
    assert (swapped.log_marginal_likelihood().detach() < mll).all()
    # And the batched likelihood is the members' likelihoods side by side.
    for i in range(2):
        single = DerivativeGPModel(X[i], Y[i], input_transform=Normalize(2))
        single.covar_module.lengthscale = lengthscale[i]
        single.likelihood.noise = model.likelihood.noise[i].detach()
        single.mean_module.constant = model.mean_module.constant[i].detach()
        assert_close(single.log_marginal_likelihood().detach(), mll[i], scale=1e3)


def test_train_inputs_are_the_transformed_inputs_as_in_botorch() -> None:
    X = torch.rand(6, 2, dtype=DTYPE) * 10 - 3
    transform = Normalize(2)
    model = DerivativeGPModel(X, observe(X), input_transform=transform).eval()
    assert_close(model.train_inputs[0], transform(X))
    Xf = torch.rand(2, 2, dtype=DTYPE) * 10 - 3
    fantasy = model.fantasize(Xf, SobolQMCNormalSampler(torch.Size([2]), seed=0))
    assert_close(fantasy.train_inputs[0][..., -2:, :], transform(Xf).expand(2, 2, 2))


# ---------------------------------------------------------------- the dense engine: batched, extended


@pytest.mark.parametrize("batch", [(), (3,), (2, 2)])
def test_batched_dense_marginal_likelihood_and_gradients(batch) -> None:
    n, d = 5, 2
    X = torch.rand(*batch, n, d, generator=torch.Generator().manual_seed(7), dtype=DTYPE)
    shape = torch.Size(batch)
    kernel = ScaleKernel(DerivativeRBFKernel(ard_num_dims=d, batch_shape=shape), batch_shape=shape).double()
    kernel.base_kernel.lengthscale = 0.4
    data = ObservedRows.block(X)
    N = n * (1 + d)
    noise = torch.full((*batch, N), 1e-2, dtype=DTYPE, requires_grad=True)
    resid = torch.randn(*batch, N, generator=torch.Generator().manual_seed(8), dtype=DTYPE, requires_grad=True)
    nll = DenseCholesky().negative_log_marginal(kernel, data, noise, resid)
    reference = NaiveEngine().negative_log_marginal(kernel, data, noise, resid)
    assert nll.shape == torch.Size(batch)
    assert_close(nll, reference, scale=10)
    inputs = [kernel.base_kernel.raw_lengthscale, kernel.raw_outputscale, noise, resid]
    for a, b in zip(torch.autograd.grad(nll.sum(), inputs), torch.autograd.grad(reference.sum(), inputs), strict=True):
        assert_close(a, b, scale=1e3)


def test_dense_gradient_with_a_shared_noise_against_finite_differences() -> None:
    """Noise shared by a batch of residuals (broadcast inputs get summed gradients)."""
    X = torch.rand(4, 2, generator=torch.Generator().manual_seed(9), dtype=DTYPE)
    kernel = DerivativeMatern52Kernel(ard_num_dims=2).double()
    data = ObservedRows.block(X)
    resid = torch.randn(3, 12, generator=torch.Generator().manual_seed(10), dtype=DTYPE)

    def nll(noise: Tensor) -> Tensor:
        return DenseCholesky().negative_log_marginal(kernel, data, noise.expand(12), resid).sum()

    assert torch.autograd.gradcheck(nll, (torch.tensor([0.05], dtype=DTYPE, requires_grad=True),))


@pytest.mark.parametrize(("engine", "batch"), itertools.product(["dense", "naive"], [(), (2,)]))
def test_extended_factor_equals_the_factor_of_all_rows(engine, batch, naive_registered) -> None:
    """Dense: triangular growth; any other engine: the Schur complement (GrownFactor)."""
    X, Xn = torch.rand(6, 2, dtype=DTYPE), torch.rand(*batch, 2, 2, dtype=DTYPE)
    kernel = ScaleKernel(DerivativeRBFKernel(ard_num_dims=2)).double()
    kernel.outputscale = 1.7
    old, new = ObservedRows.block(X), ObservedRows.block(Xn)
    r_old, r_new = torch.randn(18, dtype=DTYPE), torch.randn(*batch, 6, dtype=DTYPE)
    e = get_engine(engine)
    grown = e.factor(kernel, old, torch.full((18,), 1e-2, dtype=DTYPE), r_old)
    grown = grown.extend(new, torch.full((*batch, 6), 1e-2, dtype=DTYPE), r_new)
    grown = grown.extend(ObservedRows.block(torch.rand(1, 2, dtype=DTYPE)), torch.full((3,), 1e-2, dtype=DTYPE),
                         torch.randn(3, dtype=DTYPE))  # nested
    assert len(grown.parts) == 3
    A = torch.cat([grown.cross_covariance(p) for p in grown.parts], -2)  # the output scale included
    A = A.expand(*batch, -1, -1) + torch.diag_embed(grown.noise)
    residual = (A @ grown.alpha.unsqueeze(-1)).squeeze(-1) - grown.resid
    assert residual.norm() < 1e-10 * grown.resid.norm()
    reference = -torch.distributions.MultivariateNormal(torch.zeros_like(grown.resid), A).log_prob(grown.resid)
    assert_close(grown.negative_log_marginal(), reference, scale=1e3)
    xs = ObservedRows.block(torch.rand(3, 2, dtype=DTYPE))
    mean, cov = grown.posterior(xs, "cov")
    K_cross = grown.cross_covariance(xs)
    K_ss = xs.scaled_covariance(kernel)
    assert_close(cov, K_ss - K_cross @ torch.linalg.solve(A, K_cross.mT), scale=1e3)


# ---------------------------------------------------------------- review findings, kept as regression tests


def test_batched_scale_kernel_posterior_equals_each_member_alone() -> None:
    """A batched output scale multiplies its own batch member (not the rows of the posterior)."""
    X = torch.rand(2, 6, 2, generator=torch.Generator().manual_seed(11), dtype=DTYPE)
    Y = observe(X)
    shape = torch.Size([2])
    base = DerivativeRBFKernel(layout="interleaved", ard_num_dims=2, batch_shape=shape)
    kernel = ScaleKernel(base, batch_shape=shape)
    model = DerivativeGPModel(X, Y, covar_module=kernel.double(), outcome_transform=None)
    model.covar_module.outputscale = torch.tensor([0.5, 3.0], dtype=DTYPE)
    model.covar_module.base_kernel.lengthscale = 0.5
    Xs = torch.rand(3, 2, generator=torch.Generator().manual_seed(12), dtype=DTYPE)  # q = 3 != batch size 2
    post = model.posterior(Xs, output_indices=[0, 1, 2])
    for i in range(2):
        single_kernel = ScaleKernel(DerivativeRBFKernel(layout="interleaved", ard_num_dims=2)).double()
        single = DerivativeGPModel(X[i], Y[i], covar_module=single_kernel, outcome_transform=None)
        single.covar_module.outputscale = model.covar_module.outputscale[i].detach()
        single.covar_module.base_kernel.lengthscale = model.covar_module.base_kernel.lengthscale[i].detach()
        single.likelihood.noise = model.likelihood.noise[i].detach()
        reference = single.posterior(Xs, output_indices=[0, 1, 2])
        assert_close(post.mean[i], reference.mean, scale=100)
        assert_close(post.distribution.covariance_matrix[i], reference.distribution.covariance_matrix, scale=100)


def test_structured_engine_refuses_noise_that_varies_within_a_group() -> None:
    X = torch.rand(4, 12, generator=torch.Generator().manual_seed(13), dtype=DTYPE)
    Y = observe(X)
    kernel = DerivativeRBFKernel(layout="interleaved")  # one lengthscale
    varying = torch.full_like(Y, 1e-3)
    varying[0, 1] = 5e-3
    with pytest.raises(ValueError, match="inference: 'structured' needs one noise variance for all values and one per"):
        DerivativeGPModel(X, Y, train_Yvar=varying, covar_module=kernel, inference="structured")
    constant = torch.full_like(Y, 1e-3)
    constant[..., 1:] = 2e-3  # one variance per group: in scope
    model = DerivativeGPModel(X, Y, train_Yvar=constant, covar_module=kernel, inference="structured")
    dense = DerivativeGPModel(X, Y, train_Yvar=constant, covar_module=kernel, inference="dense")
    dense.load_state_dict(model.state_dict())
    Xs = torch.rand(2, 12, dtype=DTYPE)
    assert_close(model.posterior(Xs).mean, dense.posterior(Xs).mean, scale=1e4)


def test_conditioned_model_keeps_its_own_hyperparameters_when_the_parent_changes() -> None:
    model, _ = botorch_pair("dense")
    Xn = torch.rand(2, 3, generator=torch.Generator().manual_seed(14), dtype=DTYPE)
    conditioned = model.condition_on_observations(Xn, observe(Xn))
    Xs = torch.rand(4, 3, generator=torch.Generator().manual_seed(15), dtype=DTYPE)
    before = conditioned.posterior(Xs, output_indices=[0, 1]).mean
    model.covar_module.lengthscale = 0.2  # e.g. the parent refitted
    assert_close(conditioned.posterior(Xs, output_indices=[0, 1]).mean, before)


@pytest.mark.parametrize("engine", ["iterative", "structured"])
def test_fantasies_beyond_an_engines_scope_refactorise_with_the_dense_engine(engine) -> None:
    model, dense = botorch_pair(engine, **ENGINE_CASES[engine])
    Xf = torch.rand(2, 1, 3, generator=torch.Generator().manual_seed(16), dtype=DTYPE)
    f = model.fantasize(Xf, SobolQMCNormalSampler(torch.Size([2]), seed=0))
    fd = dense.fantasize(Xf, SobolQMCNormalSampler(torch.Size([2]), seed=0))
    assert f.inference == "dense"  # batched rows: beyond the iterative and structured engines
    assert_close(f.log_marginal_likelihood().detach(), fd.log_marginal_likelihood().detach(), scale=1e4)
    f.covar_module.lengthscale = 0.3
    fd.covar_module.lengthscale = 0.3
    Xq = torch.rand(2, 2, 3, dtype=DTYPE)
    assert_close(f.posterior(Xq).mean, fd.posterior(Xq).mean, scale=1e4)
