"""Honest error bars: noise prior, Laplace directions, delta-method spread and coverage (issue 18, item 1)."""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from gpytorch.priors import LogNormalPrior
from torch import Tensor

from gpderiv import DerivativeGP, hyperparameter_uncertainty
from gpderiv.inference.laplace import finite_difference_hessian, laplace_directions
from gpderiv.observed_rows import ObservedRows
from gpderiv.testing import names, train_covariance

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_calibration  # noqa: E402

DTYPE = torch.float64


def franke_data(n: int = 12, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    data = bench_calibration.problem("franke", n, 50, 0.05, 0.0, seed)
    return data["X"], data["y"], data["grad"]


# ------------------------------------------------------------------ the Laplace directions
def test_finite_difference_hessian_recovers_a_quadratic() -> None:
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(5, 5, generator=gen, dtype=DTYPE)
    A = B @ B.mT + torch.eye(5, dtype=DTYPE)
    b = torch.randn(5, generator=gen, dtype=DTYPE)
    H = finite_difference_hessian(lambda x: A @ x + b, torch.randn(5, generator=gen, dtype=DTYPE))
    torch.testing.assert_close(H, A, rtol=1e-8, atol=1e-8)


def test_laplace_directions_factor_the_inverse_hessian_with_a_floor() -> None:
    gen = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=DTYPE))
    curvature = torch.tensor([50.0, 4.0, 0.2, -3.0], dtype=DTYPE)  # one flat, one concave direction
    S = laplace_directions(Q @ torch.diag(curvature) @ Q.mT, curvature_floor=1.0)
    floored = curvature.clamp_min(1.0)
    torch.testing.assert_close(S @ S.mT, Q @ torch.diag(1 / floored) @ Q.mT, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ the noise prior
def test_noise_prior_is_on_learned_noise_variances_only() -> None:
    X, y, grad = franke_data()
    model = DerivativeGP(X, y, grad, noise=1e-4, noise_prior=True)
    priors = {name: prior for name, _, prior, _, _ in model.named_priors()}
    assert list(priors) == ["likelihood.grad_noise_prior"]
    assert isinstance(priors["likelihood.grad_noise_prior"], LogNormalPrior)
    assert float(priors["likelihood.grad_noise_prior"].loc) == -4.0
    assert not list(DerivativeGP(X, y, grad).named_priors())  # off by default
    # The loss is the negative log posterior: the prior term is what the two losses differ by.
    plain = DerivativeGP(X, y, grad)
    with_prior = DerivativeGP(X, y, grad, noise_prior=True)
    variances = torch.cat([with_prior.likelihood.value_noise, with_prior.likelihood.grad_noise])
    log_prior = LogNormalPrior(-4.0, 1.0).log_prob(variances).sum()
    N = with_prior.num_observations
    torch.testing.assert_close(with_prior.loss() * N, plain.loss() * N - log_prior)


def test_noise_prior_keeps_noise_off_its_lower_bound() -> None:
    """Plain maximum likelihood drove this fit's gradient noise to the 1e-6 bound (seed chosen for it)."""
    data = bench_calibration.problem("branin", 15, 50, 0.05, 0.3, 15003)
    plain = DerivativeGP(data["X"], data["y"], data["grad"]).fit()
    assert float(plain.likelihood.grad_noise.detach().min()) < 1e-5
    model = DerivativeGP(data["X"], data["y"], data["grad"], noise_prior=True).fit()
    assert float(model.likelihood.grad_noise.detach().min()) > 1e-3


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_bad_options_name_the_argument(value: object) -> None:
    X, y, grad = franke_data()
    with pytest.raises(TypeError, match=names("hyperparameter_uncertainty")):
        DerivativeGP(X, y, grad, hyperparameter_uncertainty=value)
    with pytest.raises(TypeError, match=names("noise_prior")):
        DerivativeGP(X, y, grad, noise_prior=value)


# ------------------------------------------------------------------ the delta method
class _Reference(torch.nn.Module):
    """Dense references as functions of the model's parameters (for torch.func.functional_call)."""

    def __init__(self, model: DerivativeGP, xs: Tensor) -> None:
        super().__init__()
        self.model, self.test = model, ObservedRows.block(xs)

    def forward(self, what: str) -> Tensor:
        model = self.model
        K = train_covariance(model) + torch.diag(model.row_noise())
        resid = model.residual()
        if what == "loss":
            L = torch.linalg.cholesky(K)
            alpha = torch.cholesky_solve(resid.unsqueeze(-1), L).squeeze(-1)
            nll = 0.5 * resid @ alpha + L.diagonal().log().sum() + 0.5 * resid.numel() * math.log(2 * math.pi)
            return nll - sum(p.log_prob(c(m)).sum() for _, m, p, c, _ in model.named_priors())
        cross = model.data.scaled_covariance(model.covar_module, self.test)  # N x M
        mean = torch.linalg.solve(K, cross).mT @ resid
        is_value = torch.zeros_like(mean)
        is_value[: self.test.n] = 1.0
        return mean + model.mean_module.constant * is_value


def test_spread_is_the_delta_method_with_an_exact_hessian(monkeypatch: pytest.MonkeyPatch) -> None:
    r"""With steps of 1e-3 standard deviations, :math:`\sum_k \delta_k^2 / c^2 = \mathrm{diag}(J \Sigma J^\top)`.

    J and the Hessian of the negative log posterior (hence Sigma) by autograd of a dense reference.
    """
    step = 1e-3
    monkeypatch.setattr(hyperparameter_uncertainty, "SPREAD", step)  # before fit, which prepares the spread
    X, y, grad = franke_data(n=14, seed=3)
    model = DerivativeGP(X, y, grad).fit()
    xs = model.scaling.x(torch.rand(4, 2, generator=torch.Generator().manual_seed(5), dtype=DTYPE))
    names_, params = zip(*[(k, p) for k, p in model.named_parameters() if p.requires_grad], strict=True)
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    reference = _Reference(model, xs)

    def call(x: Tensor, what: str) -> Tensor:
        values, offset = {}, 0
        for name, p in zip(names_, params, strict=True):
            values[f"model.{name}"] = x[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        return torch.func.functional_call(reference, values, (what,))

    H = torch.autograd.functional.hessian(lambda x: call(x, "loss"), theta)
    J = torch.autograd.functional.jacobian(lambda x: call(x, "mean"), theta)
    curvature, axes = torch.linalg.eigh(H)
    assert bool((curvature > -1e-2).all()), "a minimum (a noise variance at its bound leaves a flat direction)"
    expected = ((J @ axes) ** 2 / curvature.clamp_min(1.0)).sum(-1)  # the floor of laplace_directions

    with torch.no_grad():
        center, _ = model.factor().posterior(reference.test, "mean")
        deltas = model._hyperparameters.spread(model, reference.test, center, reference.test.n)
    torch.testing.assert_close(deltas.square().sum(0) / step**2, expected, rtol=1e-4, atol=1e-12)


def test_uncertainty_widens_variances_and_keeps_means() -> None:
    X, y, grad = franke_data(n=10)
    model = DerivativeGP(X, y, grad).fit()
    plug_in = DerivativeGP(X, y, grad, hyperparameter_uncertainty=False)
    plug_in.load_state_dict(model.state_dict())
    plug_in.fitted = True
    Xs = torch.rand(6, 2, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    ours, theirs = model.predict(Xs), plug_in.predict(Xs)
    torch.testing.assert_close(ours.mean, theirs.mean, rtol=0, atol=0)
    torch.testing.assert_close(ours.grad_mean, theirs.grad_mean, rtol=0, atol=0)
    assert bool((ours.variance > theirs.variance).all())
    assert bool((ours.grad_variance >= theirs.grad_variance).all())
    assert float((ours.variance / theirs.variance).max()) > 1.01
    full = model.predict(Xs, full_cov=True)
    torch.testing.assert_close(full.variance, ours.variance)
    torch.testing.assert_close(full.grad_variance, ours.grad_variance)
    assert float(torch.linalg.eigvalsh(full.covariance).min()) > -1e-10 * float(full.covariance.diagonal().max())
    # Chunks of the test points see the same correction, and local variances too (all neighbours: exact).
    chunked = model.predict(Xs, chunk_size=2)
    torch.testing.assert_close(chunked.variance, ours.variance)
    hessian_var, plug_in_hessian_var = model.predict_hessian(Xs)[1], plug_in.predict_hessian(Xs)[1]
    assert bool((hessian_var >= plug_in_hessian_var).all()) and bool((hessian_var > plug_in_hessian_var).any())
    local = model.predict(Xs, variance="local", neighbours=10)
    torch.testing.assert_close(local.variance, ours.variance)
    torch.testing.assert_close(local.grad_variance, ours.grad_variance)


def test_uncertainty_is_off_before_fit_and_for_stochastic_engines() -> None:
    X, y, grad = franke_data(n=10)
    for model in (DerivativeGP(X, y, grad), DerivativeGP(X, y, grad, inference="iterative")):
        model.fitted = model.engine.stochastic  # unfitted dense model; "fitted" iterative model
        assert not model._hyperparameters.applies(model)
    assert DerivativeGP(X, y, grad, hyperparameter_uncertainty=True).engine.stochastic is False


def test_auto_applies_to_small_problems_only(monkeypatch: pytest.MonkeyPatch) -> None:
    X, y, grad = franke_data(n=10)
    model = DerivativeGP(X, y, grad)
    model.fitted = True
    assert model._hyperparameters.applies(model)
    monkeypatch.setattr(hyperparameter_uncertainty, "AUTO_ELEMENTS", 2 * 7 * 30**2 - 1)  # P = 7, N = 30
    assert not model._hyperparameters.applies(model)
    forced = DerivativeGP(X, y, grad, hyperparameter_uncertainty=True)
    forced.fitted = True
    assert forced._hyperparameters.applies(forced)


def test_saved_model_predicts_the_same_and_old_files_load_as_plug_in(tmp_path: Path) -> None:
    X, y, grad = franke_data(n=10)
    model = DerivativeGP(X, y, grad).fit()
    Xs = torch.rand(3, 2, generator=torch.Generator().manual_seed(4), dtype=DTYPE)
    model.save(tmp_path / "m.pt")
    loaded = DerivativeGP.load(tmp_path / "m.pt")
    torch.testing.assert_close(loaded.predict(Xs).variance, model.predict(Xs).variance, rtol=0, atol=0)
    # A file written before the options existed: its init lacks them, and it predicts as it did.
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    for key in ("noise_prior", "hyperparameter_uncertainty"):
        del payload["init"][key]
    payload["state_dict"] = {k: v for k, v in payload["state_dict"].items() if "prior" not in k}
    torch.save(payload, tmp_path / "old.pt")
    old = DerivativeGP.load(tmp_path / "old.pt")
    assert not list(old.named_priors()) and not old._hyperparameters.applies(old)


# ------------------------------------------------------------------ coverage
def test_coverage_of_small_fits_is_near_nominal() -> None:
    """Branin, n = 15 with noisy values and 30 % missing gradients (5 fits): plug-in bands covered 0.80 on average."""
    warnings.simplefilter("ignore")
    datas = [bench_calibration.problem("branin", 15, 100, 0.05, 0.3, 15000 + s) for s in range(5)]
    new = [bench_calibration.trial(d, bench_calibration.default_fit) for d in datas]
    old = [bench_calibration.trial(d, bench_calibration.plugin_fit) for d in datas]
    cov_new = sum(r["cov_f"] + r["cov_g"] for r in new) / (2 * len(new))
    cov_old = sum(r["cov_f"] + r["cov_g"] for r in old) / (2 * len(old))
    assert cov_old < 0.83, cov_old  # 0.80 when measured
    assert cov_new > 0.85 and cov_new > cov_old + 0.04, (cov_new, cov_old)  # 0.88
    for a, b in zip(new, old, strict=True):  # the same fit: the means, hence the errors, are unchanged
        assert a["rmse_f"] == pytest.approx(b["rmse_f"], rel=1e-9)
        assert a["rmse_g"] == pytest.approx(b["rmse_g"], rel=1e-9)


def test_perturbed_factorisations_are_made_by_fit_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from gpderiv.inference import dense

    X, y, grad = franke_data(n=10)
    model = DerivativeGP(X, y, grad).fit(maxiter=5)
    calls: list[int] = []
    original = dense.cholesky_with_jitter
    monkeypatch.setattr(dense, "cholesky_with_jitter", lambda *a: calls.append(1) or original(*a))
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert len(model._hyperparameters._perturbed(model)) == 2 * P  # prepared by fit
    model.predict(torch.rand(3, 2, dtype=DTYPE))
    model.predict(torch.rand(30, 2, dtype=DTYPE), chunk_size=7)
    model.predict(torch.rand(3, 2, dtype=DTYPE), full_cov=True)
    model.predict_hessian(torch.rand(3, 2, dtype=DTYPE))
    assert calls == []
    model.covar_module.outputscale = 2.0  # new hyperparameters: prepared again on the next prediction
    model.predict(torch.rand(3, 2, dtype=DTYPE))
    assert len(calls) >= 2 * P + 1


def test_stale_spread_inside_inference_mode_falls_back_once_then_recovers() -> None:
    """Found in review: hyperparameters changed after fit, then a prediction inside inference_mode crashed."""
    X, y, grad = franke_data(n=10)
    model = DerivativeGP(X, y, grad).fit()
    Xs = torch.rand(3, 2, generator=torch.Generator().manual_seed(6), dtype=DTYPE)
    with torch.no_grad():
        model.covar_module.base_kernel.raw_lengthscale += 0.1
    params = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    plug_in = DerivativeGP(X, y, grad, hyperparameter_uncertainty=False)
    plug_in.load_state_dict(model.state_dict())
    plug_in.fitted = True
    with pytest.warns(RuntimeWarning, match="plug-in"), torch.inference_mode():
        inside = model.predict(Xs).variance
    torch.testing.assert_close(inside, plug_in.predict(Xs).variance)
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), params)  # restored
    assert bool((model.predict(Xs).variance > inside).all())  # outside it, computed after all


def test_prepared_model_predicts_inside_torch_func() -> None:
    X, y, grad = franke_data(n=10)
    model = DerivativeGP(X, y, grad).fit()
    Xs = torch.rand(3, 2, generator=torch.Generator().manual_seed(7), dtype=DTYPE)
    jac = torch.func.jacrev(lambda x: model.predict(x).variance.sum())(Xs)
    h = 1e-6
    step = torch.zeros_like(Xs)
    step[1, 0] = h
    fd = (model.predict(Xs + step).variance.sum() - model.predict(Xs - step).variance.sum()) / (2 * h)
    torch.testing.assert_close(jac[1, 0], fd, rtol=1e-5, atol=1e-9)


def test_float32_and_stochastic_engines_get_no_correction_by_default() -> None:
    X, y, grad = franke_data(n=10)
    model = DerivativeGP(X.float(), y.float(), grad.float())
    model.fitted = True
    assert not model._hyperparameters.applies(model)
    with pytest.warns(UserWarning, match="does not apply with the 'iterative' engine"):
        DerivativeGP(X, y, grad, inference="iterative", hyperparameter_uncertainty=True)
