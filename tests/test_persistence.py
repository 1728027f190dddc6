"""Model files: bit-identical round trips of every allowed kernel, crafted and old files refused, atomic saves."""

from __future__ import annotations

import builtins
import contextlib
import copy
import io
import math
import os
import pickle
import shlex
import stat

import pytest
import torch
from gpytorch.constraints import GreaterThan, Interval, LessThan, Positive
from gpytorch.kernels import (
    AdditiveKernel,
    LinearKernel,
    MaternKernel,
    PeriodicKernel,
    PolynomialKernel,
    RBFKernel,
    RQKernel,
    ScaleKernel,
)
from gpytorch.priors import (
    GammaPrior,
    HalfCauchyPrior,
    HorseshoePrior,
    LogNormalPrior,
    NormalPrior,
    UniformPrior,
)

from gpderiv import DerivativeGP
from gpderiv.cli import main
from gpderiv.kernels import (
    DerivativeKernel,
    DerivativeMatern32Kernel,
    DerivativeMatern52Kernel,
    DerivativeRBFKernel,
    default_kernel,
)
from gpderiv.kernels.description import build_kernel, describe_kernel, same_description
from gpderiv.persistence import FORMAT, VERSION

DTYPE = torch.float64


def data(n: int = 12, d: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(n, d, dtype=DTYPE, generator=gen) * 50 + 3  # scaling matters
    y = 100 * torch.sin(X / 20).sum(-1)
    grad = 5 * torch.cos(X / 20)
    grad[2, 1] = math.nan
    y[4] = math.nan
    return X, y, grad


def is_plain(obj) -> bool:
    """Only tensors, dicts with str keys, lists, tuples, str, int, float, bool and None."""
    if isinstance(obj, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(is_plain(v) for v in obj)
    return obj is None or torch.is_tensor(obj) or type(obj) in (str, int, float, bool)


# ---------------------------------------------------------------------------- round trips
CUSTOM_KERNELS = {
    "default": lambda: None,
    "matern52": lambda: ScaleKernel(DerivativeMatern52Kernel(ard_num_dims=2)),
    "matern32 with priors and constraints": lambda: ScaleKernel(
        DerivativeMatern32Kernel(
            ard_num_dims=2,
            lengthscale_prior=GammaPrior(3.0, 6.0),
            lengthscale_constraint=Interval(0.01, 5.0),
        ),
        outputscale_prior=HalfCauchyPrior(1.0),
        outputscale_constraint=GreaterThan(1e-3, transform=None, initial_value=0.7),
    ),
    "scaled sum with active dims": lambda: ScaleKernel(
        AdditiveKernel(
            ScaleKernel(DerivativeRBFKernel(ard_num_dims=2, lengthscale_prior=LogNormalPrior(0.0, 1.0))),
            ScaleKernel(
                DerivativeMatern52Kernel(lengthscale_constraint=LessThan(10.0)), outputscale_prior=NormalPrior(1.0, 0.5)
            ),
        )
    ),
    "DerivativeKernel of a plain composition": lambda: DerivativeKernel(
        ScaleKernel(RBFKernel(ard_num_dims=2) * PeriodicKernel(period_length_prior=GammaPrior(2.0, 2.0)))
        + RQKernel(alpha_constraint=GreaterThan(1e-2, transform=torch.exp))
        + MaternKernel(nu=2.5, lengthscale_prior=NormalPrior(0.5, 0.1), lengthscale_constraint=Positive())
    ),
    "botorch default in block layout": lambda: default_kernel(2, botorch=True, layout="block"),
}


@pytest.mark.parametrize("name", list(CUSTOM_KERNELS))
def test_save_load_round_trip_is_bit_identical(tmp_path, name) -> None:
    X, y, grad = data()
    model = DerivativeGP(X, y, grad, kernel=CUSTOM_KERNELS[name](), grad_noise=1e-4).fit(maxiter=15)
    Xs = torch.rand(7, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(1)) * 50 + 3
    before = model.predict(Xs, full_cov=True)
    path = tmp_path / "model.pt"
    model.save(path)
    loaded = DerivativeGP.load(path)
    after = loaded.predict(Xs, full_cov=True)
    for field in ("mean", "variance", "grad_mean", "grad_variance", "covariance"):
        assert torch.equal(getattr(before, field), getattr(after, field)), field
    assert same_description(describe_kernel(loaded.covar_module), describe_kernel(model.covar_module))
    assert [type(m) for m in loaded.covar_module.modules()] == [type(m) for m in model.covar_module.modules()]
    assert loaded.mll == model.mll and loaded.mll_history == model.mll_history
    assert torch.equal(loaded.scaling.x_scale, model.scaling.x_scale)
    assert loaded.num_observations == model.num_observations
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert list(state) == list(loaded_state) and all(torch.equal(state[k], loaded_state[k]) for k in state)


def test_model_file_holds_only_tensors_and_plain_data(tmp_path) -> None:
    X, y, grad = data()
    model = DerivativeGP(X, y, grad, kernel=CUSTOM_KERNELS["matern32 with priors and constraints"](), noise=1e-3)
    model.save(tmp_path / "model.pt")
    payload = torch.load(tmp_path / "model.pt", weights_only=True)
    assert is_plain(payload)
    assert payload["format"] == FORMAT and payload["version"] == VERSION == 2
    assert payload["kernel"]["class"] == "ScaleKernel"
    assert payload["kernel"]["children"]["base_kernel"]["class"] == "DerivativeMatern32Kernel"
    assert torch.equal(payload["init"]["X"], X)


ALLOWED = [  # one kernel of every allowed class, each with its constructor arguments, priors and constraints
    lambda: DerivativeRBFKernel(
        layout="interleaved", ard_num_dims=3, batch_shape=torch.Size([2]), active_dims=[0, 1, 3]
    ),
    lambda: DerivativeKernel(RBFKernel() + MaternKernel(nu=1.5), layout="interleaved"),
    lambda: AdditiveKernel(ScaleKernel(DerivativeMatern52Kernel()), DerivativeMatern32Kernel()),
    lambda: RQKernel(ard_num_dims=4, lengthscale_prior=GammaPrior(2.0, 1.0), alpha_constraint=Interval(0.1, 4.0)),
    lambda: PeriodicKernel(
        ard_num_dims=4, period_length_constraint=GreaterThan(0.2), lengthscale_prior=LogNormalPrior(0.0, 2.0)
    ),
    lambda: ScaleKernel(
        LinearKernel(ard_num_dims=4, variance_prior=HalfCauchyPrior(2.0)), outputscale_constraint=LessThan(3.0)
    ),
    lambda: PolynomialKernel(power=3, offset_prior=NormalPrior(1.0, 1.0), batch_shape=torch.Size([2])),
    lambda: RBFKernel() * MaternKernel(nu=0.5, lengthscale_constraint=Positive(transform=torch.exp)),
    lambda: ScaleKernel(RBFKernel(), outputscale_prior=UniformPrior(0.1, 5.0, validate_args=True)),
]


@pytest.mark.parametrize("make", ALLOWED, ids=lambda make: type(make()).__name__)
def test_description_rebuilds_every_allowed_kernel_exactly(make) -> None:
    kernel = make().double()
    with torch.no_grad():
        for p in kernel.parameters():
            p.copy_(torch.randn_like(p))
    description = describe_kernel(kernel)
    assert is_plain(description)
    rebuilt = build_kernel(copy.deepcopy(description)).double()
    rebuilt.load_state_dict(kernel.state_dict())
    assert same_description(describe_kernel(rebuilt), description)
    assert [type(m) for m in rebuilt.modules()] == [type(m) for m in kernel.modules()]
    x = torch.rand(4, 4, dtype=DTYPE)
    assert torch.equal(rebuilt(x).to_dense(), kernel(x).to_dense())
    ref = {n: p.log_prob(c(m)) for n, m, p, c, _ in kernel.named_priors()}
    got = {n: p.log_prob(c(m)) for n, m, p, c, _ in rebuilt.named_priors()}
    assert got.keys() == ref.keys() and all(torch.equal(got[n], ref[n]) for n in ref)


# ---------------------------------------------------------------------------- bad and crafted files
def test_load_missing_corrupt_and_foreign_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        DerivativeGP.load(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable gpderiv model file"):
        DerivativeGP.load(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match="not a gpderiv model file"):
        DerivativeGP.load(foreign)
    X, y, grad = data()
    model = DerivativeGP(X, y, grad)
    good = tmp_path / "good.pt"
    model.save(good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="gpderiv model file"):
        DerivativeGP.load(truncated)
    payload = torch.load(good, weights_only=True)
    payload["version"] = 99
    newer = tmp_path / "newer.pt"
    torch.save(payload, newer)
    with pytest.raises(ValueError, match="newer gpderiv"):
        DerivativeGP.load(newer)


class WritesMarker:
    """Unpickling this runs ``exec``, which creates a marker file: what a crafted model file could do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').close()",)


class RunsShell:
    """Unpickling this runs a shell command (``os.system``) that creates a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def crafted_files(tmp_path, good_payload) -> dict[str, os.PathLike]:
    """Model files whose unpickling would create ``tmp_path / 'marker'``."""
    marker = str(tmp_path / "marker")
    files = {}
    for name, content in {
        "v2 look-alike, kernel": {**good_payload, "kernel": WritesMarker(marker)},
        "v2 look-alike, init": {**good_payload, "init": {**good_payload["init"], "noise": RunsShell(marker)}},
        "no format": [RunsShell(marker)],
    }.items():
        files[name] = tmp_path / f"{len(files)}.pt"
        torch.save(content, files[name])
    files["bare pickle"] = tmp_path / "bare.pkl"
    with open(files["bare pickle"], "wb") as fh:
        pickle.dump(RunsShell(marker), fh, protocol=4)
    return files


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    X, y, grad = data()
    path = tmp_path_factory.mktemp("good") / "good.pt"
    DerivativeGP(X, y, grad).fit(maxiter=3).save(path)
    return path


def test_crafted_file_does_not_run_code_on_load(tmp_path, good_file) -> None:
    files = crafted_files(tmp_path, torch.load(good_file, weights_only=True))
    marker = tmp_path / "marker"
    for name, path in files.items():
        with pytest.raises(ValueError) as info:
            DerivativeGP.load(path)
        assert not marker.exists(), f"{name}: code from the file ran"
        message = str(info.value)
        assert str(path) in message and "not a safe gpderiv model file of format 2" in message, message
        assert "weights_only=False" not in message  # torch's advice to unpickle anyway is not passed on
    assert "(builtins.exec)" in str(pytest.raises(ValueError, DerivativeGP.load, files["v2 look-alike, kernel"]).value)
    assert "(posix.system)" in str(pytest.raises(ValueError, DerivativeGP.load, files["bare pickle"]).value)
    # The test is meaningful: the same file does run its code when unpickled without restrictions.
    torch.load(files["v2 look-alike, kernel"], weights_only=False)
    assert marker.exists()


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_crafted_file_does_not_run_code_in_cli_predict(tmp_path, good_file) -> None:
    files = crafted_files(tmp_path, torch.load(good_file, weights_only=True))
    (tmp_path / "pts.csv").write_text("x1,x2\n10,20\n")
    for name, path in files.items():
        out = tmp_path / "pred.csv"
        code, stdout, stderr = run_cli(
            "predict", str(path), str(tmp_path / "pts.csv"), "--out", str(out), "--x", "x1,x2"
        )
        assert not (tmp_path / "marker").exists(), f"{name}: code from the file ran"
        assert code == 2 and stdout == "" and not out.exists()
        assert stderr.startswith(f"gpderiv: error: {path}: not a safe gpderiv model file of format 2"), stderr
        assert stderr.count("\n") == 1 and "Traceback" not in stderr


@pytest.mark.parametrize(
    "where, value",
    [
        (("kernel", "class"), "os.system"),
        (("kernel", "class"), "builtins.eval"),
        (("kernel", "children", "base_kernel", "class"), "builtins.eval"),
        (("kernel", "children", "base_kernel", "args", "lengthscale_constraint", "class"), "os.system"),
        (("kernel", "children", "base_kernel", "args", "lengthscale_constraint", "args", "transform"), "os.system"),
        (("kernel", "args", "outputscale_prior"), {"class": "builtins.eval", "args": {}}),
        (("kernel", "class"), ["ScaleKernel"]),
    ],
)
def test_description_naming_a_class_off_the_allow_list_is_refused(tmp_path, good_file, where, value) -> None:
    payload = torch.load(good_file, weights_only=True)
    entry = payload
    for key in where[:-1]:
        entry = entry[key]
    entry[where[-1]] = value
    path = tmp_path / "bad.pt"
    torch.save(payload, path)
    refused = r"not a safe gpderiv model file of format 2: .*is not allowed in a model file \(allowed: "
    with pytest.raises(ValueError, match=refused) as info:
        DerivativeGP.load(path)
    assert str(path) in str(info.value)


def write_version_1(model: DerivativeGP, path) -> None:
    """A model file as gpderiv wrote it before format 2: the kernel module pickled."""
    torch.save(
        {
            "format": FORMAT,
            "version": 1,
            "init": {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in model._init_args.items()},
            "kernel": copy.deepcopy(model.covar_module).cpu(),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "mll": model.mll,
            "mll_history": list(model.mll_history),
        },
        path,
    )


def test_version_1_file_gets_a_clear_error(tmp_path) -> None:
    X, y, grad = data()
    old = tmp_path / "old.pt"
    write_version_1(DerivativeGP(X, y, grad), old)
    with pytest.raises(ValueError) as info:
        DerivativeGP.load(old)
    message = str(info.value)
    for part in (str(old), "old format 1", "cannot be read safely", "re-fit the model", "version that wrote it"):
        assert part in message, (part, message)
    (tmp_path / "pts.csv").write_text("x1,x2\n10,20\n")
    code, _, stderr = run_cli(
        "predict", str(old), str(tmp_path / "pts.csv"), "--out", str(tmp_path / "p.csv"), "--x", "x1,x2"
    )
    assert code == 2 and "old format 1" in stderr and not (tmp_path / "p.csv").exists()


# ---------------------------------------------------------------------------- what cannot be saved
class MyRBF(DerivativeRBFKernel):
    """A user's subclass: not on the allow-list (its code would have to be trusted)."""


def custom_closure_prior():
    kernel = DerivativeRBFKernel(ard_num_dims=2)
    kernel.register_prior("lengthscale_prior", NormalPrior(0.0, 1.0), lambda m: m.lengthscale.log())
    return ScaleKernel(kernel)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ScaleKernel(MyRBF()), r"kernel\.base_kernel: .*MyRBF cannot be saved: .*allow-list \(Derivative"),
        (
            lambda: ScaleKernel(DerivativeRBFKernel(lengthscale_prior=HorseshoePrior(0.1))),
            r"kernel\.base_kernel\.lengthscale_prior: prior .*HorseshoePrior cannot be saved; .*LogNormalPrior",
        ),
        (
            lambda: ScaleKernel(DerivativeRBFKernel(lengthscale_constraint=GreaterThan(0.1, transform=torch.square))),
            r"lengthscale_constraint constraint transform: square cannot be saved; .*softplus",
        ),
        (custom_closure_prior, r"lengthscale_prior: a prior registered on a custom function of the parameters"),
    ],
)
def test_save_refuses_parts_off_the_allow_list_and_writes_nothing(tmp_path, make, match) -> None:
    X, y, grad = data()
    model = DerivativeGP(X, y, grad, kernel=make())
    with pytest.raises(TypeError, match=match):
        model.save(tmp_path / "model.pt")
    assert os.listdir(tmp_path) == []


def test_interrupted_save_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path, monkeypatch) -> None:
    X, y, grad = data()
    model = DerivativeGP(X, y, grad)
    path = tmp_path / "model.pt"
    model.save(path)
    old = path.read_bytes()

    def half_write(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(old[: len(old) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", half_write)
    with pytest.raises(KeyboardInterrupt):
        model.fit(maxiter=2).save(path)
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["model.pt"]
    monkeypatch.undo()
    DerivativeGP.load(path)  # still the complete old model


def test_save_replaces_an_existing_file_keeping_its_permissions(tmp_path) -> None:
    X, y, grad = data()
    path = tmp_path / "model.pt"
    DerivativeGP(X, y, grad).save(path)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~mask  # as open() would create it, not mkstemp's 0o600
    os.chmod(path, 0o640)
    model = DerivativeGP(X, y, grad).fit(maxiter=3)
    model.save(path)
    assert DerivativeGP.load(path).mll == model.mll and os.listdir(tmp_path) == ["model.pt"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
