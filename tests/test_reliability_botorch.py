"""Reliability catalogue, round 2: the BoTorch adapter (:class:`gpderiv.botorch.DerivativeGPModel`).

Cases 100-112 of docs/reliability.md. Every tensor argument of the model (training data, test
points, observation noise, new observations and their noise) is checked in one place,
``validate_tensor_args``, with the messages of :class:`gpderiv.DerivativeGP`:
``<argument>: expected ..., got ...`` as a ``ValueError`` or ``TypeError``. Acquisition functions
keep their gradients (cases 109, 110). Fits use ``maxiter=3``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("botorch")

from botorch.acquisition import qKnowledgeGradient  # noqa: E402
from botorch.exceptions import InputDataWarning  # noqa: E402
from gpytorch.kernels import ScaleKernel  # noqa: E402
from torch import Tensor  # noqa: E402

from gpderiv.botorch import DerivativeGPModel  # noqa: E402
from gpderiv.kernels import DerivativeRBFKernel  # noqa: E402
from gpderiv.testing import contains_all, names  # noqa: E402

DTYPE = torch.float64
FIT = {"optimizer_kwargs": {"options": {"maxiter": 3}}}


def data(n: int = 6, seed: int = 0) -> tuple[Tensor, Tensor]:
    """`n x 2` inputs in the unit box and `n x 3` observations ``[f, df/dx_1, df/dx_2]`` of ``sum sin``."""
    X = torch.rand(n, 2, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    return X, torch.cat([torch.sin(X).sum(-1, keepdim=True), torch.cos(X)], -1)


def model(**kwargs) -> DerivativeGPModel:
    X, Y = data()
    return DerivativeGPModel(X, Y, **kwargs).eval()


def test_non_finite_test_points_are_refused():
    """Case 100 (was: a NaN posterior mean without an error)."""
    m = model()
    for bad in (float("nan"), float("inf"), -float("inf")):
        X = torch.tensor([[0.2, 0.3], [bad, 0.5]], dtype=DTYPE)
        with pytest.raises(ValueError, match=contains_all("X: expected finite values", "NaN or Inf", "(1, 0)")):
            m.posterior(X)
    with pytest.raises(ValueError, match=names("X")):
        m.posterior(torch.full((3, 2, 2), float("nan"), dtype=DTYPE), output_indices=[0, 1])


def test_test_points_of_another_type_device_or_dtype():
    """Case 101: a list, a tensor on another device, half precision; float32 points are converted."""
    m = model()
    with pytest.raises(TypeError, match="X: expected a torch.Tensor, got list"):
        m.posterior([[0.1, 0.2]])
    with pytest.raises(ValueError, match=r"X: expected a tensor on cpu \(the device of the training data\), got meta"):
        m.posterior(torch.rand(2, 2, dtype=DTYPE, device="meta"))
    with pytest.raises(TypeError, match=contains_all("X: expected float64 (or float32)", "float16")):
        m.posterior(torch.rand(2, 2).half())
    X = torch.rand(3, 2, dtype=DTYPE)
    post32, post64 = m.posterior(X.float()), m.posterior(X.float().double())
    assert post32.mean.dtype == DTYPE
    torch.testing.assert_close(post32.mean, post64.mean)


def test_training_tensors_of_different_dtypes_are_converted_to_train_X():
    """Case 102 (was: a float32 train_X with float64 train_Y kept float64 targets in a float32 model,
    and float64 test points then failed deep in torch: "expected m1 and m2 to have the same dtype")."""
    X, Y = data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputDataWarning)
        m = DerivativeGPModel(X.float(), Y).fit(**FIT)
    assert m.train_targets.dtype == torch.float32
    post = m.posterior(X[:2])  # float64 points on a float32 model: converted, as DerivativeGP's case 32
    assert post.mean.dtype == torch.float32 and torch.isfinite(post.mean).all()
    m64 = DerivativeGPModel(X, Y.float())
    assert m64.train_targets.dtype == DTYPE
    assert torch.isfinite(m64.fit(**FIT).posterior(X[:2]).mean).all()


def test_train_yvar_and_train_y_of_another_dtype_or_device():
    """Case 103: train_Yvar in float32 is converted; train_Y or train_Yvar on another device is refused."""
    X, Y = data()
    m = DerivativeGPModel(X, Y, train_Yvar=torch.full((6, 3), 1e-3))
    assert m.likelihood.train_Yvar.dtype == DTYPE and torch.isfinite(m.posterior(X[:2]).mean).all()
    meta = "expected a tensor on cpu (the device of the training data), got meta"
    with pytest.raises(ValueError, match=contains_all("train_Yvar: " + meta)):
        DerivativeGPModel(X, Y, train_Yvar=torch.full((6, 3), 1e-3, dtype=DTYPE, device="meta"))
    with pytest.raises(ValueError, match=contains_all("train_Y: " + meta)):
        DerivativeGPModel(X, Y.to("meta"))
    with pytest.raises(TypeError, match="train_Yvar: expected a torch.Tensor, got float"):
        DerivativeGPModel(X, Y, train_Yvar=1e-3)


def test_half_precision_is_refused_and_float32_warns():
    """Case 104, as DerivativeGP's cases 12 and 13 (was: float16 accepted)."""
    X, Y = data()
    for half in (torch.float16, torch.bfloat16):
        with pytest.raises(TypeError, match=contains_all("train_X: expected float64 (or float32)", str(half))):
            DerivativeGPModel(X.to(half), Y.to(half))
    with pytest.warns(InputDataWarning, match="train_X: got torch.float32"):
        DerivativeGPModel(X.float(), Y.float())


@pytest.mark.parametrize("bad", [[0.7, 1.2], [True], [True, False], "01", 1, [1.0]])
def test_non_integer_outputs_are_refused_not_truncated(bad):
    """Case 105 (was: ``[0.7, 1.2]`` became outputs ``[0, 1]``, ``[True]`` output 1)."""
    with pytest.raises(TypeError, match=contains_all("outputs: expected a list of integer indices in [0, 2]")):
        model(outputs=bad)
    m = model()
    with pytest.raises(TypeError, match=contains_all("output_indices: expected a list of integer indices")):
        m.posterior(torch.rand(2, 2, dtype=DTYPE), output_indices=bad)


def test_repeated_or_out_of_range_outputs_and_idcs():
    """Case 105: repeated indices, and the same checks for subset_output's ``idcs``; integer tensors work."""
    with pytest.raises(ValueError, match=r"outputs: expected distinct indices, got \[0, 0\]"):
        model(outputs=[0, 0])
    m = model(outputs=torch.tensor([0, 2]))
    assert m.num_outputs == 2
    with pytest.raises(TypeError, match="idcs: expected a list of integer indices in"):
        m.subset_output([0.5])
    with pytest.raises(ValueError, match=r"idcs: expected indices in \[0, 1\], got \[2\]"):
        m.subset_output([2])


def test_observation_noise_of_a_wrong_shape_value_or_type():
    """Case 106 (was: torch's "expanded size" RuntimeError, or a NaN/negative variance accepted)."""
    m = model(outputs=[0, 1])
    X = torch.rand(2, 2, dtype=DTYPE)
    for shape in ((3,), (2, 3), (4, 2, 2)):
        with pytest.raises(ValueError, match=contains_all("observation_noise: expected a shape that broadcasts to")):
            m.posterior(X, observation_noise=torch.ones(shape, dtype=DTYPE))
    for value in (float("nan"), -1.0, float("inf")):
        with pytest.raises(ValueError, match="observation_noise: expected finite non-negative variances"):
            m.posterior(X, observation_noise=torch.full((2, 2), value, dtype=DTYPE))
    with pytest.raises(TypeError, match="observation_noise: expected a bool or"):
        m.posterior(X, observation_noise=0.1)
    noisy = m.posterior(X, observation_noise=torch.full((2, 1), 0.5, dtype=DTYPE))
    assert (noisy.variance > m.posterior(X).variance).all()


def test_condition_on_observations_refuses_bad_x_and_y():
    """Case 107 (was: a CholeskyError for NaN in X, an IndexError for a 1-D Y, messages naming y, grad)."""
    m = model()
    X, Y = data(2, seed=3)
    nan_X = X.clone()
    nan_X[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"X: expected finite values, got NaN or Inf \(first at index \(1, 0\)\)"):
        m.condition_on_observations(nan_X, Y)
    with pytest.raises(ValueError, match=r"Y: expected finite observations or NaN \(= not observed\), got Inf"):
        m.condition_on_observations(X, torch.full_like(Y, float("inf")))
    with pytest.raises(ValueError, match=r"Y: expected at least one observed \(non-NaN\) entry, got none"):
        m.condition_on_observations(X, torch.full_like(Y, float("nan")))
    with pytest.raises(ValueError, match=r"Y: expected shape batch x 2 x 3 \(\[f, grad f\] at each X\), got \(3,\)"):
        m.condition_on_observations(X, Y[0])
    with pytest.raises(ValueError, match=contains_all("Y: expected a batch shape that broadcasts", "got (3,)")):
        m.condition_on_observations(X.expand(2, 2, 2), Y.expand(3, 2, 3))
    with pytest.raises(TypeError, match="Y: expected a torch.Tensor, got list"):
        m.condition_on_observations(X, Y.tolist())
    patterns = Y.expand(2, 2, 3).clone()
    patterns[0, 0, 1] = float("nan")
    with pytest.raises(ValueError, match=contains_all("Y: expected the same missing (NaN) entries")):
        m.condition_on_observations(X, patterns)
    # Partly missing entries and float32 observations are fine.
    Y_missing = Y.clone()
    Y_missing[0, 1:] = float("nan")
    cond = m.condition_on_observations(X.float(), Y_missing.float())
    assert torch.isfinite(cond.posterior(X).mean).all()


def test_condition_on_observations_refuses_bad_noise():
    """Case 108 (was: torch's "expanded size" RuntimeError, a CholeskyError for NaN or negative noise)."""
    m = model()
    X, Y = data(2, seed=3)
    with pytest.raises(ValueError, match=r"noise: expected a shape that broadcasts to \(2, 3\), got \(2, 2\)"):
        m.condition_on_observations(X, Y, noise=torch.ones(2, 2, dtype=DTYPE))
    for value in (float("nan"), -1.0, float("inf")):
        with pytest.raises(ValueError, match="noise: expected finite non-negative variances at every observed entry"):
            m.condition_on_observations(X, Y, noise=torch.full_like(Y, value))
    # NaN noise where Y is not observed is not used.
    Y_missing, noise = Y.clone(), torch.full_like(Y, 1e-3)
    Y_missing[:, 1:] = float("nan")
    noise[:, 1:] = float("nan")
    cond = m.condition_on_observations(X, Y_missing, noise=noise)
    assert torch.isfinite(cond.posterior(X).mean).all()


def test_posterior_stays_differentiable_in_the_test_points():
    """Case 109: the checks keep the autograd graph of ``X`` (acquisition functions need it)."""
    m = model()
    X = torch.rand(1, 3, 2, dtype=DTYPE, requires_grad=True)
    m.posterior(X, output_indices=[0, 1]).mean.sum().backward()
    assert X.grad is not None and torch.isfinite(X.grad).all() and X.grad.abs().sum() > 0


def test_knowledge_gradient_gradient_flows_through_the_fantasies():
    """Case 110: fantasies keep their graphs through condition_on_observations (d-KG needs them)."""
    X, Y = data(8)
    m = DerivativeGPModel(X, Y).eval()
    acqf = qKnowledgeGradient(m, num_fantasies=3)
    Xc = torch.rand(1, 1 + 3, 2, dtype=DTYPE, requires_grad=True)
    acqf(Xc).sum().backward()
    assert torch.isfinite(Xc.grad).all() and Xc.grad[0, 0].abs().sum() > 0


def test_training_data_that_requires_grad_is_detached():
    """Case 111 (was: fit failed with "backward through the graph a second time")."""
    X, Y = data()
    X_in = (X * 1.0).requires_grad_(True)
    Y_in = (Y * 1.0).requires_grad_(True)
    m = DerivativeGPModel(X_in, Y_in, train_Yvar=torch.full((6, 3), 1e-3, dtype=DTYPE, requires_grad=True))
    m.fit(**FIT)
    m2 = DerivativeGPModel(X_in * 2, Y_in).fit(**FIT)
    for fitted in (m, m2):
        assert not fitted.train_inputs[0].requires_grad and not fitted.train_targets.requires_grad
        assert torch.isfinite(fitted.posterior(X[:2]).mean).all()
    assert X_in.grad is None and Y_in.grad is None


def test_covar_module_with_a_zero_lengthscale_is_refused_naming_it():
    """Case 112 (was: a CholeskyError whose advice does not name the lengthscale)."""
    X, Y = data()
    kernel = DerivativeRBFKernel(ard_num_dims=2, layout="interleaved")
    kernel.lengthscale = torch.tensor([[0.0, 0.5]])
    with pytest.raises(ValueError, match=r"covar_module\.lengthscale: expected positive values, got 0\.0"):
        DerivativeGPModel(X, Y, covar_module=kernel)
    scaled = ScaleKernel(DerivativeRBFKernel(ard_num_dims=2, layout="interleaved"))
    scaled.base_kernel.raw_lengthscale.data.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"covar_module\.base_kernel\.lengthscale: expected positive values, got nan"):
        DerivativeGPModel(X, Y, covar_module=scaled)
