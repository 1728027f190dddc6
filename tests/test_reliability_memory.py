"""Reliability catalogue, round 2: memory guards beyond the dense engine's training matrices.

Each test is one case of docs/reliability.md, section "Round 2: memory guards" (cases 130-142).
Small memory is simulated, never allocated: fake cgroup and ``/proc/meminfo`` files (the module
constants ``CGROUP_ROOT`` and ``MEMINFO_PATH`` of :mod:`gpderiv.inference.base`), or a patched
``available_memory``. Every case ends in ``ProblemTooLargeError`` naming what is too large and
what to do, or, on the command line, in one ``gpderiv: error:`` line with exit code 2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_reliability import FIT_ARGS, assert_cli_error, data, no_leftovers, run_cli, training_csv

import gpderiv.inference.base as base
from gpderiv import DerivativeGP, ProblemTooLargeError
from gpderiv.inference import available_memory, cgroup_headroom
from gpderiv.testing import contains_all

DTYPE = torch.float64
CPU = torch.device("cpu")
GiB = 2**30


def fake_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mem_available: int, files: dict[str, str]) -> Path:
    """Point ``/proc/meminfo`` and the cgroup root at fake files under ``tmp_path``; returns the root."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal:       {4 * mem_available // 1024} kB\nMemAvailable:   {mem_available // 1024} kB\n")
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    root.mkdir(exist_ok=True)
    monkeypatch.setattr(base, "MEMINFO_PATH", str(meminfo))
    monkeypatch.setattr(base, "CGROUP_ROOT", str(root))
    return root


def container(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, headroom: int) -> None:
    """A cgroup v2 container with ``headroom`` bytes left under its limit, on a machine with 64 GiB available."""
    limit = 2 * GiB
    files = {"memory.max": f"{limit}\n", "memory.current": f"{limit - headroom}\n"}
    fake_system(tmp_path, monkeypatch, 64 * GiB, files)


def small_model(n: int = 10, **kwargs) -> DerivativeGP:
    model = DerivativeGP(*data(n, 2), **kwargs)
    model.fitted = True  # the initial hyperparameters, on purpose
    return model


# ----------------------------------------------------------------------------------------------
# The available-memory estimate (cases 130-133)
# ----------------------------------------------------------------------------------------------


def test_cgroup_v2_limit_bounds_the_available_memory(tmp_path, monkeypatch):
    """Case 130: cgroup v2 ``memory.max - memory.current`` (page cache counted as free) below MemAvailable."""
    files = {
        "memory.max": "1073741824\n",
        "memory.current": "805306368\n",
        "memory.stat": "anon 700000000\nfile 105306368\ninactive_file 100000000\n",
    }
    root = fake_system(tmp_path, monkeypatch, 64 * GiB, files)
    assert cgroup_headroom(root) == 1073741824 - (805306368 - 100000000)
    assert available_memory(CPU) == 1073741824 - (805306368 - 100000000)


def test_cgroup_v1_limit_bounds_the_available_memory(tmp_path, monkeypatch):
    """Case 131: cgroup v1 ``limit_in_bytes - usage_in_bytes`` (``total_inactive_file`` counted as free)."""
    files = {
        "memory/memory.limit_in_bytes": "536870912\n",
        "memory/memory.usage_in_bytes": "500000000\n",
        "memory/memory.stat": "cache 10\ntotal_inactive_file 1000000\n",
    }
    fake_system(tmp_path, monkeypatch, 64 * GiB, files)
    assert available_memory(CPU) == 536870912 - 499000000


def test_both_cgroup_versions_and_meminfo_take_the_smallest(tmp_path, monkeypatch):
    """Case 132: the smallest of MemAvailable and both cgroup headrooms; a usage above the limit is 0."""
    files = {
        "memory.max": "3000000000\n",
        "memory.current": "1000000000\n",
        "memory/memory.limit_in_bytes": "1500000000\n",
        "memory/memory.usage_in_bytes": "1000000000\n",
    }
    fake_system(tmp_path, monkeypatch, 64 * GiB, files)
    assert available_memory(CPU) == 500000000
    fake_system(tmp_path, monkeypatch, 100 * 2**20, files)
    assert available_memory(CPU) == 100 * 2**20
    fake_system(tmp_path, monkeypatch, 64 * GiB, {"memory.max": "1000\n", "memory.current": "5000\n"})
    assert available_memory(CPU) == 0


@pytest.mark.parametrize(
    "files",
    [
        {},
        {"memory.max": "max\n", "memory.current": "123456\n"},
        {"memory/memory.limit_in_bytes": "9223372036854771712\n", "memory/memory.usage_in_bytes": "123456\n"},
        {"memory.max": "1000000\n"},
        {"memory.current": "1000\n"},
        {"memory.max": "lots\n", "memory.current": "1000\n"},
        {"memory.max": "\n", "memory.current": "1000\n"},
        {"memory.max": "-5\n", "memory.current": "1000\n"},
        {"memory.max": "1e9\n", "memory.current": "1000\n"},
        {"memory/memory.limit_in_bytes": "1000000\n", "memory/memory.usage_in_bytes": "\x00\xff garbage"},
    ],
    ids=["none", "v2-max", "v1-huge", "no-usage", "no-limit", "garbage", "empty", "negative", "float", "binary"],
)
def test_no_limit_missing_or_garbled_cgroup_files_are_ignored(tmp_path, monkeypatch, files):
    """Case 133: "max", a v1 limit of 2^63 - 4096, missing, empty, negative or garbled files mean no limit."""
    fake_system(tmp_path, monkeypatch, 3 * GiB, files)
    assert available_memory(CPU) == 3 * GiB
    (tmp_path / "meminfo").write_text("MemTotal: 1 kB\nMemAvailable: many kB\n")
    assert available_memory(CPU) is None


# ----------------------------------------------------------------------------------------------
# Engines in a container (cases 134-135)
# ----------------------------------------------------------------------------------------------


def test_dense_engine_in_a_container_is_refused_before_allocating(tmp_path, monkeypatch):
    """Case 134: the dense engine's N x N matrices checked against the container's headroom, not the machine's."""
    container(tmp_path, monkeypatch, headroom=50 * 2**20)
    X, y, g = data(700, 2)  # N = 2100: 3 matrices of 33.6 MiB
    with pytest.raises(
        ProblemTooLargeError,
        match=contains_all("dense engine", "N = 2100", "needs about 100.9 MiB", "50.0 MiB available"),
    ):
        DerivativeGP(X, y, g, inference="dense")


def test_iterative_engine_in_a_container_is_refused_before_allocating(tmp_path, monkeypatch):
    """Case 135: the iterative engine (n x n exponentials, preconditioner blocks) in a container, at construction."""
    container(tmp_path, monkeypatch, headroom=50 * 2**20)
    X, y, g = data(2000, 2)  # N = 6000: preconditioner blocks of 6000 x 4096 alone are 188 MiB
    message = contains_all("iterative engine", "N = 6000", "Use fewer points")
    with pytest.raises(ProblemTooLargeError, match=message):
        DerivativeGP(X, y, g, inference="iterative")
    with pytest.raises(ProblemTooLargeError, match=message):
        DerivativeGP(X, y, g)  # "auto": the dense engine does not fit, nor does the iterative one
    pytest.importorskip("botorch")
    from gpderiv.botorch import DerivativeGPModel

    with pytest.raises(ProblemTooLargeError, match=message):
        DerivativeGPModel(X, torch.cat([y.unsqueeze(-1), g], -1), inference="iterative")


# ----------------------------------------------------------------------------------------------
# Prediction (cases 136-140)
# ----------------------------------------------------------------------------------------------


def test_predict_full_cov_at_many_points_is_refused_before_allocating(monkeypatch):
    """Case 136: ``predict(full_cov=True)``: the m (1 + d) square covariance is checked first."""
    model = small_model()
    Xs = torch.rand(300, 2, dtype=DTYPE)
    model.predict(Xs[:50], full_cov=True)  # fits below
    monkeypatch.setattr(base, "available_memory", lambda device: 5 * 2**20)
    model.predict(Xs[:50], full_cov=True)
    model.predict(Xs)  # variances in chunks: no m x m matrix
    message = contains_all(
        "joint covariance of 900 test rows", "N = 30", "19.2 MiB", "5.0 MiB available", "full_cov=False"
    )
    with pytest.raises(ProblemTooLargeError, match=message):
        model.predict(Xs, full_cov=True)


def test_posterior_at_many_points_is_refused_before_allocating(monkeypatch):
    """Case 137: ``DerivativeGP.posterior`` (a full covariance) at many points, in a container's memory too."""
    model = small_model()
    Xs = torch.rand(300, 2, dtype=DTYPE)
    monkeypatch.setattr(base, "available_memory", lambda device: 5 * 2**20)
    assert model.posterior(Xs[:5]).mean.shape == (5, 3)
    with pytest.raises(ProblemTooLargeError, match=contains_all("joint covariance of 900 test rows", "fewer")):
        model.posterior(Xs)


def test_a_chunk_size_larger_than_memory_allows_is_refused(monkeypatch):
    """Case 138: variances or means in chunks: a caller's ``chunk_size`` too large is named; the default fits."""
    model = small_model()
    Xs = torch.rand(300, 2, dtype=DTYPE)
    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 3000)  # default chunks of 33 points: 71 kB
    monkeypatch.setattr(base, "available_memory", lambda device: 200_000)
    default = model.predict(Xs)
    assert torch.isfinite(default.variance).all()
    assert torch.equal(model.predict(Xs, chunk_size=20).mean, default.mean)
    for variance in (True, False):
        with pytest.raises(ProblemTooLargeError, match=contains_all("900 test rows", "chunk_size")):
            model.predict(Xs, chunk_size=300, variance=variance)
    with pytest.raises(ProblemTooLargeError, match="chunk_size"):
        model.predict_hessian(Xs, chunk_size=300)


@pytest.mark.filterwarnings("ignore::gpderiv.NotFittedWarning")
def test_iterative_variances_count_the_cg_matrices(monkeypatch):
    """Case 139: the iterative engine's variances (CG with m right-hand sides) count CG's N x m matrices."""
    model = DerivativeGP(*data(10, 2), inference="iterative")
    Xs = torch.rand(40, 2, dtype=DTYPE)  # 120 test rows against N = 30: one N x m matrix is 28.8 kB
    monkeypatch.setattr(base, "available_memory", lambda device: 150_000)  # 3 fit, 8 do not
    assert model.predict(Xs, variance=False).mean.shape == (40,)  # matrix-free means
    with pytest.raises(ProblemTooLargeError, match=contains_all("variances of 120 test rows", "chunk_size")):
        model.predict(Xs)
    assert torch.isfinite(model.predict(Xs, chunk_size=10).variance).all()


def test_botorch_posterior_at_large_q_is_refused_before_allocating(monkeypatch):
    """Case 140: the BoTorch model's joint posterior at large q (and over a batch) is checked first."""
    pytest.importorskip("botorch")
    from gpderiv.botorch import DerivativeGPModel

    X, y, g = data(10, 2)
    model = DerivativeGPModel(X, torch.cat([y.unsqueeze(-1), g], -1), outputs=[0, 1, 2]).eval()
    monkeypatch.setattr(base, "available_memory", lambda device: 5 * 2**20)
    assert model.posterior(torch.rand(50, 2, dtype=DTYPE)).mean.shape == (50, 3)
    with pytest.raises(ProblemTooLargeError, match=contains_all("joint covariance of 900 test rows", "(q)")):
        model.posterior(torch.rand(300, 2, dtype=DTYPE))
    with pytest.raises(ProblemTooLargeError, match=contains_all("in a batch of 8", "smaller batch")):
        model.posterior(torch.rand(8, 100, 2, dtype=DTYPE))


# ----------------------------------------------------------------------------------------------
# The command line (cases 141-142)
# ----------------------------------------------------------------------------------------------


def test_cli_in_a_container_exits_2_with_one_line(tmp_path, monkeypatch):
    """Case 141: ``gpderiv fit`` and ``gpderiv predict`` whose engine does not fit the container: exit 2, one line."""
    work = tmp_path / "work"
    work.mkdir()
    training_csv(work / "data.csv")
    code, _, err = run_cli("fit", str(work / "data.csv"), *FIT_ARGS, "--save", str(work / "model.pt"))
    assert code == 0, err
    container(tmp_path, monkeypatch, headroom=1000)
    result = run_cli("fit", str(work / "data.csv"), *FIT_ARGS, "--save", str(work / "new.pt"))
    assert_cli_error(result, "data.csv: The iterative engine", "1000 bytes available")
    result = run_cli("predict", str(work / "model.pt"), str(work / "data.csv"), "--out", str(work / "out.csv"))
    assert_cli_error(result, "model.pt: The dense engine", "1000 bytes available")
    no_leftovers(work, "data.csv", "model.pt", "model.pt.json")


ALLOCATOR_ERRORS = {
    "cpu": RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
        "allocate 80000000000 bytes. Error code 12 (Cannot allocate memory)"
    ),
    "cuda": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB.\nSee the documentation."),
    "python": MemoryError(),
}


def fit_cli(*argv: str) -> tuple[int, str, str]:
    """``gpderiv fit`` with ``FIT_ARGS``; the warning line of its short ``--maxiter`` is dropped from stderr."""
    code, out, err = run_cli("fit", *argv[:1], *FIT_ARGS, *argv[1:])
    err = "".join(line for line in err.splitlines(keepends=True) if "L-BFGS-B stopped at maxiter" not in line)
    return code, out, err


@pytest.mark.parametrize("kind", ALLOCATOR_ERRORS)
def test_cli_allocator_errors_exit_2_with_one_line(tmp_path, monkeypatch, kind):
    """Case 142: an allocator's ``MemoryError`` or out-of-memory ``RuntimeError`` in fit, predict or save: one line."""
    training_csv(tmp_path / "data.csv")
    code, _, err = run_cli("fit", str(tmp_path / "data.csv"), *FIT_ARGS, "--save", str(tmp_path / "model.pt"))
    assert code == 0, err

    def fail(*args, **kwargs):
        raise ALLOCATOR_ERRORS[kind]

    with monkeypatch.context() as patch:
        patch.setattr(DerivativeGP, "predict", fail)
        result = run_cli("predict", str(tmp_path / "model.pt"), str(tmp_path / "data.csv"), "--out", "out.csv")
    assert_cli_error(result, "data.csv", "out of memory", "fewer")
    with monkeypatch.context() as patch:
        patch.setattr(DerivativeGP, "fit", fail)
        result = run_cli("fit", str(tmp_path / "data.csv"), *FIT_ARGS, "--save", str(tmp_path / "m2.pt"))
    assert_cli_error(result, "data.csv", "out of memory")
    with monkeypatch.context() as patch:
        patch.setattr(DerivativeGP, "save", fail)  # inside the atomic write: its temporary file is removed
        result = fit_cli(str(tmp_path / "data.csv"), "--save", str(tmp_path / "m3.pt"))
    assert_cli_error(result, "out of memory")
    assert "enforce fail" not in result[2]
    no_leftovers(tmp_path, "data.csv", "model.pt", "model.pt.json")


def test_cli_other_runtime_errors_are_not_reported_as_memory(tmp_path, monkeypatch):
    """Case 142, neighbour: a RuntimeError that is not about memory is a bug and keeps its traceback."""
    training_csv(tmp_path / "data.csv")

    def fail(*args, **kwargs):
        raise RuntimeError("expected m1 and m2 to have the same dtype")

    monkeypatch.setattr(DerivativeGP, "fit", fail)
    with pytest.raises(RuntimeError, match="same dtype"):
        run_cli("fit", str(tmp_path / "data.csv"), *FIT_ARGS, "--save", str(tmp_path / "m.pt"))


def test_posterior_at_many_points_on_a_small_model_is_lazy():
    """Case 143: the joint covariance of 50 test points on a 10-point model is near-singular; the posterior
    is returned without factorising it (was: torch's distribution raised LinAlgError at construction)."""
    X = torch.rand(10, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    model = DerivativeGP(X, torch.sin(X).sum(-1), torch.cos(X))
    model.fitted = True
    post = model.posterior(torch.rand(50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4)))
    assert post.mean.shape == post.variance.shape == (50, 3)
    assert torch.isfinite(post.variance).all() and (post.variance >= 0).all()
    assert torch.isfinite(post.rsample(torch.Size([2]))).all()  # sampling factorises with jitter
