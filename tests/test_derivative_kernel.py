"""DerivativeKernel: derivative blocks of any supported stationary GPyTorch kernel by torch.func."""

from __future__ import annotations

import math

import gpytorch
import pytest
import torch
from gpytorch.kernels import LinearKernel, MaternKernel, PeriodicKernel, RBFKernel, RBFKernelGrad, RQKernel, ScaleKernel
from torch import Tensor
from torch.func import jacrev

from gpderiv import DerivativeGP
from gpderiv.kernels import DerivativeKernel, DerivativeMatern32Kernel, DerivativeMatern52Kernel, DerivativeRBFKernel
from gpderiv.testing import assert_close

DTYPE = torch.float64


def points(n1: int, n2: int, d: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n1, d, dtype=DTYPE, generator=gen)
    x2 = torch.randn(n2, d, dtype=DTYPE, generator=gen)
    x2[0] = x1[1]  # coincident
    x2[1] = x1[0] + 1e-9  # near-coincident
    return x1, x2


CLOSED_FORMS = [
    (lambda: RBFKernel(ard_num_dims=3), lambda: DerivativeRBFKernel(ard_num_dims=3)),
    (lambda: MaternKernel(nu=2.5, ard_num_dims=3), lambda: DerivativeMatern52Kernel(ard_num_dims=3)),
    (lambda: MaternKernel(nu=1.5, ard_num_dims=3), lambda: DerivativeMatern32Kernel(ard_num_dims=3)),
    (lambda: RBFKernel(), lambda: DerivativeRBFKernel()),
]


@pytest.mark.parametrize(("make_base", "make_closed"), CLOSED_FORMS)
def test_agrees_with_closed_forms_to_1e_10_including_coincident_points(make_base, make_closed) -> None:
    base, closed = make_base().to(DTYPE), make_closed().to(DTYPE)
    ls = torch.tensor([0.6, 1.1, 2.0], dtype=DTYPE) if base.ard_num_dims else torch.tensor(0.8, dtype=DTYPE)
    base.lengthscale = closed.lengthscale = ls
    x1, x2 = points(4, 5, 3)
    kernel = DerivativeKernel(base)
    torch.testing.assert_close(kernel(x1, x2).to_dense(), closed(x1, x2).to_dense(), rtol=0, atol=1e-10)
    torch.testing.assert_close(kernel(x1, diag=True), closed(x1, diag=True), rtol=0, atol=1e-10)
    with gpytorch.settings.lazily_evaluate_kernels(False):
        assert_close(kernel(x1, x2, grad2=False).to_dense(), closed(x1, x2, grad2=False).to_dense())
        assert_close(kernel(x1, x2, grad1=False).to_dense(), closed(x1, x2, grad1=False).to_dense())


def test_interleaved_layout_matches_rbf_kernel_grad() -> None:
    x1, x2 = points(3, 4, 2)
    base = RBFKernel(ard_num_dims=2).to(DTYPE)
    theirs = RBFKernelGrad(ard_num_dims=2).to(DTYPE)
    base.lengthscale = theirs.lengthscale = torch.tensor([0.5, 1.5], dtype=DTYPE)
    assert_close(DerivativeKernel(base, layout="interleaved")(x1, x2).to_dense(), theirs(x1, x2).to_dense())


def periodic(kernel: PeriodicKernel, a: Tensor, b: Tensor) -> Tensor:
    """GPyTorch's periodic kernel written out (its forward uses cdist, which has no double backward)."""
    phase = math.pi * (a - b) / kernel.period_length.reshape(-1)
    return torch.exp(-2 * (phase.sin().square() / kernel.lengthscale.reshape(-1)).sum())


def gpytorch_forward(kernel) -> callable:
    return lambda a, b: kernel.forward(a.unsqueeze(0), b.unsqueeze(0)).to_dense()[0, 0]


@pytest.mark.parametrize(
    ("make_base", "reference"),
    [
        (lambda: RQKernel(ard_num_dims=2), gpytorch_forward),
        (lambda: RBFKernel() + ScaleKernel(RQKernel()), gpytorch_forward),
        (lambda: PeriodicKernel(ard_num_dims=2), lambda kern: lambda a, b: periodic(kern, a, b)),
        (
            lambda: ScaleKernel(RBFKernel(ard_num_dims=2)) * PeriodicKernel(),
            lambda kern: lambda a, b: gpytorch_forward(kern.kernels[0])(a, b) * periodic(kern.kernels[1], a, b),
        ),
    ],
)
def test_blocks_match_autograd_of_the_plain_kernel_away_from_zero_and_are_finite_at_zero(make_base, reference) -> None:
    base = make_base().to(DTYPE)
    x1, x2 = points(3, 4, 2, seed=1)
    K = DerivativeKernel(base)(x1, x2).to_dense().detach()
    k = reference(base)
    n1, n2, d = 3, 4, 2
    assert torch.isfinite(K).all()
    for i in range(n1):
        for j in range(2, n2):  # columns 0 and 1 are (near-)coincident: GPyTorch's forward has a sqrt
            rows, cols = slice(n1 + i * d, n1 + (i + 1) * d), slice(n2 + j * d, n2 + (j + 1) * d)
            assert_close(K[i, j], k(x1[i], x2[j]))
            assert_close(K[i, cols], jacrev(k, 1)(x1[i], x2[j]), scale=10)
            assert_close(K[rows, j], jacrev(k, 0)(x1[i], x2[j]), scale=10)
            assert_close(K[rows, cols], jacrev(jacrev(k, 0), 1)(x1[i], x2[j]), scale=100)
    X = torch.cat([x1, x1[:1]])  # with a duplicate point
    KX = DerivativeKernel(base)(X).to_dense().detach()
    assert_close(KX, KX.T)
    assert torch.linalg.eigvalsh(KX).min() > -1e-9 * KX.diagonal().max()


def test_periodic_is_exact_at_coincident_points() -> None:
    base = PeriodicKernel().to(DTYPE)
    base.lengthscale = torch.tensor(0.7, dtype=DTYPE)
    base.period_length = torch.tensor(1.3, dtype=DTYPE)
    x = torch.tensor([[0.2]], dtype=DTYPE)
    K = DerivativeKernel(base)(x).to_dense()
    # kappa = exp(-2 sin^2(pi tau / p) / l): d2 kappa / dtau2 at 0 = -4 (pi / p)^2 / l.
    assert_close(K[1, 1], torch.tensor(4 * (math.pi / 1.3) ** 2 / 0.7, dtype=DTYPE))
    assert K[0, 1] == 0 and K[1, 0] == 0


def test_functional_covariance_matches_closed_form_second_derivatives() -> None:
    x1, x2 = points(3, 3, 2, seed=2)
    idx = torch.tensor([[-1, -1], [0, -1], [1, -1], [0, 0], [0, 1], [1, 1]])
    p = torch.arange(3).repeat_interleave(6)
    i = idx.repeat(3, 1)
    for base, closed in (
        (RBFKernel(ard_num_dims=2), DerivativeRBFKernel(ard_num_dims=2)),
        (MaternKernel(nu=2.5, ard_num_dims=2), DerivativeMatern52Kernel(ard_num_dims=2)),
    ):
        base, closed = base.to(DTYPE), closed.to(DTYPE)
        base.lengthscale = closed.lengthscale = torch.tensor([0.7, 1.4], dtype=DTYPE)
        ours = DerivativeKernel(base).functional_covariance(x1[p], x2[p], i, i)
        assert_close(ours, closed.functional_covariance(x1[p], x2[p], i, i), scale=1e3)
        diag = DerivativeKernel(base).functional_covariance(x1[p], x2[p], i, i, pairwise=False)
        assert_close(diag, ours.diagonal())


def test_hyperparameter_gradients_flow_to_the_base_kernel() -> None:
    base = (ScaleKernel(RBFKernel()) * PeriodicKernel()).to(DTYPE)
    kernel = DerivativeKernel(base)
    X, _ = points(5, 2, 1)
    kernel(X).to_dense().square().sum().backward()
    grads = {name: p.grad for name, p in kernel.named_parameters()}
    assert len(grads) == 4 and all(g is not None and torch.isfinite(g).all() for g in grads.values())


def test_model_with_a_product_kernel_learns_a_periodic_function_and_its_gradient() -> None:
    gen = torch.Generator().manual_seed(3)
    X = torch.rand(12, 1, dtype=DTYPE, generator=gen) * 6
    f = torch.sin(2 * math.pi * X[:, 0] / 2.0) * torch.exp(-0.05 * X[:, 0])
    g = torch.func.vmap(torch.func.grad(lambda x: torch.sin(2 * math.pi * x / 2.0) * torch.exp(-0.05 * x)))(X[:, 0])
    kernel = ScaleKernel(DerivativeKernel(RBFKernel() * PeriodicKernel()))
    model = DerivativeGP(X, f, g.unsqueeze(-1), kernel=kernel).fit(maxiter=60)
    xs = torch.linspace(0.5, 5.5, 30, dtype=DTYPE).unsqueeze(-1)
    pred = model.predict(xs)
    truth = torch.sin(2 * math.pi * xs[:, 0] / 2.0) * torch.exp(-0.05 * xs[:, 0])
    assert (pred.mean - truth).abs().max() < 0.05
    assert "base_kernel.base_kernel.kernels.1.period_length" in model.hyperparameters()
    mean, var = model.predict_hessian(xs[:3])
    assert torch.isfinite(mean).all() and (var >= 0).all()


def test_unsupported_kernels_are_refused_with_the_list_of_supported_ones() -> None:
    with pytest.raises(TypeError, match="base_kernel: expected a stationary kernel among RBFKernel"):
        DerivativeKernel(LinearKernel())
    with pytest.raises(ValueError, match="nu = 0.5 is not differentiable"):
        DerivativeKernel(MaternKernel(nu=0.5))
    with pytest.raises(ValueError, match="unbatched"):
        DerivativeKernel(RBFKernel(batch_shape=torch.Size([2])))
    X = torch.rand(4, 2, dtype=DTYPE)
    H = torch.zeros(4, 2, 2, dtype=DTYPE)
    with pytest.raises(ValueError, match="mean-square differentiable"):
        DerivativeGP(X, X.sum(-1), hessian=H, kernel=DerivativeKernel(MaternKernel(nu=1.5) * RBFKernel()))
