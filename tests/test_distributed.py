"""The iterative engine split across 2 gloo processes (torchrun) against the single-process engine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import gpderiv
from gpderiv.inference.distributed import Ranks

SCRIPT = Path(__file__).with_name("distributed_script.py")
#: Relative agreement of split and single-process results where CG iterates: CG amplifies the
#: last-bit differences of the split products (a GEMM over a share of the rows rounds differently)
#: into differences near its tolerance (perturbing products by 1e-15 moved a solve to 1e-6 by
#: 1.4e-6, both 1.1e-5 from the exact solution); a wrong split (a gradient share lost or counted
#: twice, rows out of place) is off by order one.
CG_AGREEMENT = 1e-4
#: ... and where the preconditioner is the whole matrix (one cluster): CG takes one step.
EXACT_AGREEMENT = 1e-12

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


def test_shares_partition_the_points_in_rank_order() -> None:
    for count in (0, 1, 2, 7, 61):
        for size in (2, 3, 4):
            shares = [Ranks(rank, size).share(count) for rank in range(size)]
            assert [i for s in shares for i in range(count)[s]] == list(range(count))
            assert max(s.stop - s.start for s in shares) - min(s.stop - s.start for s in shares) <= 1


@pytest.fixture(scope="module")
def ranks_output(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Both ranks' results of tests/distributed_script.py under torchrun (2 gloo processes)."""
    out = tmp_path_factory.mktemp("distributed")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(gpderiv.__file__).parents[1]))
    # --standalone: a rendezvous store on a free port (bound to port 0), so parallel runs cannot clash.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    process = subprocess.Popen(
        [*command, str(SCRIPT), str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a hung run is killed with its workers
    )
    try:
        log, _ = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        log, _ = process.communicate()
        pytest.fail(f"torchrun did not finish in 180 s:\n{log[-4000:]}")
    assert process.returncode == 0, log[-4000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@needs_gloo
def test_every_rank_returns_the_same_model(ranks_output: list[dict]) -> None:
    """Loss, gradient, predictions, input gradients and a fit: bit for bit the same on both ranks."""
    first, second = (output["split"] for output in ranks_output)
    for case, results in first.items():
        for name, value in results.items():
            assert torch.equal(value, second[case][name]), (case, name)


@needs_gloo
def test_split_results_equal_the_single_process_ones(ranks_output: list[dict]) -> None:
    """The same probe seed: the single-process loss, gradient, predictions and fit, to the CG tolerance."""
    single, split = ranks_output[0]["single"], ranks_output[0]["split"]
    assert set(split) == {"one_block", "blocks", "kronecker", "variational"}
    for case, results in split.items():
        # The variational engine's split sums (no CG) agree to rounding.
        tolerance = EXACT_AGREEMENT if case in ("one_block", "variational") else CG_AGREEMENT
        for name, value in results.items():
            reference = single[case][name]
            error = (value - reference).abs().max() / reference.abs().max()
            assert error <= tolerance, (case, name, error.item())


@needs_gloo
def test_ranks_that_diverge_raise_instead_of_hanging(ranks_output: list[dict]) -> None:
    """Products of different vectors on the ranks raise on every rank; ``agree`` makes fits' steps rank 0's."""
    for rank, output in enumerate(ranks_output):
        assert output["diverged"] == "raised", rank
        torch.testing.assert_close(output["agreed"], torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), rtol=0, atol=0)


@needs_gloo
def test_variational_minibatch_fit_stays_in_lock_step(ranks_output: list[dict]) -> None:
    """A minibatch fit whose ranks share out each minibatch: the same hyperparameters, q and predictions on both."""
    first, second = (output["variational_fit"] for output in ranks_output)
    for name, value in first.items():
        assert torch.equal(value, second[name]), name
