"""Small problems (the BO case): the single-thread rule, the potri inverse and the one-chunk lengthscale backward.

Each fast path is compared with the path it replaced, which is still used elsewhere (batches,
GPUs, large problems), and with autograd or finite differences, in float64.
"""

from __future__ import annotations

import pytest
import torch
from threadpoolctl import threadpool_info

from gpderiv import DerivativeGP
from gpderiv.blocks import stationary
from gpderiv.blocks.profiles import rbf_profile
from gpderiv.inference import dense, threads
from gpderiv.inference.threads import blas_threads, threads_for
from gpderiv.testing import assert_close, sine_data

CPU = torch.device("cpu")


def blas_counts() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


@pytest.fixture
def two_threads():
    """torch and the BLAS pools at 2 threads for the test (the user's setting to restore), then as before."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    with blas_threads(2):
        yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """torch at one thread, where the MLL gradient takes its inverse from potri."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_small_problems_run_single_threaded_and_restore_the_setting(two_threads) -> None:
    with threads_for(60, CPU):
        assert torch.get_num_threads() == 1
        assert set(blas_counts()) == {1}
    assert torch.get_num_threads() == 2
    assert set(blas_counts()) == {2}


def test_the_setting_is_restored_after_an_exception(two_threads) -> None:
    with pytest.raises(ZeroDivisionError), threads_for(60, CPU):
        1 / 0  # noqa: B018 - the exception is the point
    assert torch.get_num_threads() == 2
    assert set(blas_counts()) == {2}


def test_large_problems_keep_the_users_threads(two_threads) -> None:
    with threads_for(threads.SINGLE_THREAD_ROWS + 1, CPU):
        assert torch.get_num_threads() == 2
        assert set(blas_counts()) == {2}


@pytest.mark.filterwarnings("ignore::gpderiv.exceptions.OptimizationWarning")
def test_fit_and_predict_run_single_threaded_and_leave_the_setting_as_it_was(two_threads, monkeypatch) -> None:
    seen = []
    loss = DerivativeGP.loss

    def spying_loss(self, subset=None):
        seen.append(torch.get_num_threads())
        return loss(self, subset)

    monkeypatch.setattr(DerivativeGP, "loss", spying_loss)
    X, y, grad = sine_data(n=8, d=2)
    model = DerivativeGP(X, y, grad).fit(maxiter=5)
    model.predict(X[:3])  # the hyperparameters' uncertainty evaluates the loss here too
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2
    assert set(blas_counts()) == {2}


def test_single_threaded_fit_equals_the_multithreaded_one(two_threads, monkeypatch) -> None:
    X, y, grad = sine_data(n=10, d=2)
    Xs = sine_data(n=5, d=2, seed=1)[0]
    single = DerivativeGP(X, y, grad).fit().predict(Xs)
    monkeypatch.setattr(threads, "SINGLE_THREAD_ROWS", 0)
    multi = DerivativeGP(X, y, grad).fit().predict(Xs)
    # Threads change the order of floating-point sums only: the same optimum, to optimiser tolerance.
    assert_close(single.mean, multi.mean, scale=1e4)
    assert_close(single.variance, multi.variance, scale=1e4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_potri_inverse_is_the_lower_triangle_of_the_inverse(dtype, one_thread) -> None:
    B = torch.randn(40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    A = (B @ B.T + 40 * torch.eye(40, dtype=torch.float64)).to(dtype)
    L, ok = dense.cholesky_in_place(A.clone())
    assert ok
    lower = dense.inverse_lower(L)
    assert lower is not None
    assert_close(lower, torch.linalg.inv(A).tril(), scale=10)
    assert_close(L @ L.mT, A, scale=10)  # the factor itself is untouched


def test_potri_inverse_leaves_batches_and_several_threads_to_torch(two_threads) -> None:
    L = torch.eye(3, dtype=torch.float64)
    assert dense.inverse_lower(L) is None  # two thread pools would contend
    torch.set_num_threads(1)
    assert dense.inverse_lower(L.expand(2, 3, 3).clone()) is None
    assert dense.inverse_lower(L) is not None


def model_gradients(model: DerivativeGP, weight: float) -> list[torch.Tensor]:
    model.zero_grad()
    (weight * model.loss()).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("weight", [1.0, -2.5])
def test_marginal_likelihood_gradient_from_the_lower_inverse_equals_the_full_inverse(
    weight, one_thread, monkeypatch
) -> None:
    X, y, grad = sine_data(n=9, d=2)
    grad[2, 1] = float("nan")  # a missing entry: rows of different kinds
    model = DerivativeGP(X, y, grad)
    calls = []
    inverse = dense.inverse_lower
    monkeypatch.setattr(dense, "inverse_lower", lambda L: calls.append(L.shape) or inverse(L))
    fast = model_gradients(model, weight)
    assert calls == [(model.num_observations, model.num_observations)]  # the potri path was taken
    monkeypatch.setattr(dense, "inverse_lower", lambda L: None)
    reference = model_gradients(model, weight)
    for a, b in zip(fast, reference, strict=True):
        assert_close(a, b)


def test_marginal_likelihood_gradient_against_finite_differences(one_thread) -> None:
    X, y, grad = sine_data(n=7, d=2)
    model = DerivativeGP(X, y, grad)
    params = [p for p in model.parameters() if p.requires_grad]
    analytic = torch.cat([g.reshape(-1) for g in model_gradients(model, 1.0)])
    numeric = []
    h = 1e-6
    for p in params:
        for k in range(p.numel()):
            with torch.no_grad():
                p.view(-1)[k] += h
                up = model.loss().item()
                p.view(-1)[k] -= 2 * h
                down = model.loss().item()
                p.view(-1)[k] += h
            numeric.append((up - down) / (2 * h))
    torch.testing.assert_close(analytic, torch.tensor(numeric, dtype=torch.float64), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("n", [3, 40])
def test_lengthscale_backward_in_one_chunk_or_many_equals_autograd(n, monkeypatch) -> None:
    gen = torch.Generator().manual_seed(n)
    X = torch.rand(n, 3, dtype=torch.float64, generator=gen)
    ls = torch.tensor([[0.3, 0.5, 0.8]], dtype=torch.float64, requires_grad=True)
    G = torch.randn(4 * n, 4 * n, dtype=torch.float64, generator=gen)  # not symmetric: any upstream gradient
    (expected,) = torch.autograd.grad(stationary._assemble(X, X, ls, rbf_profile, True, True), ls, G)
    for small in (stationary._SMALL_CHUNK_ELEMENTS, 1):  # one chunk; then the 1/8 rule's several
        monkeypatch.setattr(stationary, "_SMALL_CHUNK_ELEMENTS", small)
        (actual,) = torch.autograd.grad(stationary._BlocksLengthscaleVJP.apply(X, X, ls, rbf_profile), ls, G)
        assert_close(actual, expected)


def test_botorch_model_fits_and_predicts_single_threaded(two_threads, monkeypatch) -> None:
    pytest.importorskip("botorch")
    from gpderiv.botorch import DerivativeGPModel

    seen = []
    loss = DerivativeGPModel.compute_custom_loss
    moments = DerivativeGPModel._moments

    def spying_loss(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return loss(self, *args, **kwargs)

    def spying_moments(self, *args):
        seen.append(torch.get_num_threads())
        return moments(self, *args)

    monkeypatch.setattr(DerivativeGPModel, "compute_custom_loss", spying_loss)
    monkeypatch.setattr(DerivativeGPModel, "_moments", spying_moments)
    X, y, grad = sine_data(n=8, d=2)
    model = DerivativeGPModel(X, torch.cat([y.unsqueeze(-1), grad], -1)).fit()
    model.posterior(X[:2])
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2
    assert set(blas_counts()) == {2}


def test_threads_from_several_python_threads_restore_the_setting() -> None:
    """Found in review: concurrent calls restored each other's temporary single-thread setting."""
    import threading

    from gpderiv.inference.threads import _blas_pools, threads_for

    before_torch = torch.get_num_threads()
    before_blas = [info["num_threads"] for info in _blas_pools().info() if info["user_api"] == "blas"]

    def work() -> None:
        for _ in range(50):
            with threads_for(60, torch.device("cpu")):
                pass

    with threads_for(60, torch.device("cpu")):  # the main thread nests with the others running
        assert torch.get_num_threads() == 1

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    with threads_for(60, torch.device("cpu")):
        work()
    for t in threads:
        t.join()
    assert torch.get_num_threads() == before_torch
    assert [info["num_threads"] for info in _blas_pools().info() if info["user_api"] == "blas"] == before_blas
