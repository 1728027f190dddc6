"""The iterative engine split across torch.distributed processes: speed-up of 2 processes over 1.

For each ``--n`` (points with gradients in ``--d`` dimensions, N = n (1 + d) rows) the launcher runs
this script under ``torchrun`` in three configurations on the CPU:

* 1 process with 1 thread (``OMP_NUM_THREADS=1``), the reference;
* 1 process with 2 threads (what one process makes of the 2 cores by itself);
* 2 processes with 1 thread each (gloo), the work of every kernel product, of the block-Jacobi
  preconditioner and of the posterior means split by rows (gpderiv.inference.distributed).

Each times, at fixed hyperparameters (lengthscale 0.3, the data of benchmarks/bench_large.py):

* ``mll``: one negative log marginal likelihood + gradient (``model.loss(); loss.backward()``,
  10 probe vectors, the same probes in every configuration: seed 0, rank 0's);
* ``predict``: the factorisation (CG to 1e-6) and the means of f and grad f at ``--m`` test points
  (``predict(Xs, variance=False)``).

and counts the kernel products of the MLL step (the same in every configuration: the ranks follow the
single-process CG path; CG's count for the factorisation can differ by one or two with the thread
count). Ratios are of wall times, against 1 process with 1 thread. The CPU seconds of the busiest
process (all its threads) show how the work divides whatever the machine's load: on a shared
machine the wall-time ratio also depends on how many cores the other jobs leave. With ``--device cuda`` the
configurations are 1 GPU and all visible GPUs (one process each, NCCL, ``cuda:<local rank>``).

Run::

    python benchmarks/bench_distributed.py --n 2000            # about 2 minutes on 2 cores
    python benchmarks/bench_distributed.py --n 5000            # about 6 minutes
    python benchmarks/bench_distributed.py --n 20000 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
#: The line of the worker's output that carries its timings.
MARKER = "BENCH_DISTRIBUTED "


def worker(args: argparse.Namespace) -> None:
    """One configuration: every rank runs this; rank 0 prints the timings."""
    sys.path.insert(0, str(HERE))
    from bench_large import data

    import gpderiv.inference.iterative as iterative
    from gpderiv import DerivativeGP

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    X, y, grad = data(args.n, args.d, seed=0)
    model = DerivativeGP(X, y, grad, inference="iterative").to(device)
    model.covar_module.base_kernel.lengthscale = torch.full((args.d,), 0.3, dtype=torch.float64, device=device)
    model.fitted = True
    Xs = torch.rand(args.m, args.d, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(device)
    products = []
    original = iterative.RBFDerivativeLinearOperator._matmul

    def counting(self: iterative.RBFDerivativeLinearOperator, rhs: torch.Tensor) -> torch.Tensor:
        products.append(rhs.shape[-1])
        return original(self, rhs)

    iterative.RBFDerivativeLinearOperator._matmul = counting

    def timed(step: object) -> tuple[float, float]:
        """Wall seconds, and CPU seconds of the busiest process (all its threads; what load does not change)."""
        if world > 1:
            dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, cpu = time.perf_counter(), time.process_time()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        cpu = torch.tensor([time.process_time() - cpu], device=device)
        if world > 1:
            dist.barrier()
            dist.all_reduce(cpu, op=dist.ReduceOp.MAX)
        return time.perf_counter() - start, cpu.item()

    def mll() -> None:
        torch.manual_seed(0)
        model.loss().backward()

    result: dict[str, float] = {}
    result["mll"], result["mll_cpu"] = timed(mll)
    result["mll_products"] = len(products)
    products.clear()
    result["predict"], result["predict_cpu"] = timed(lambda: model.predict(Xs, variance=False))
    result["predict_products"] = len(products)
    if world > 1:
        dist.destroy_process_group()
    if local_rank == 0:
        print(MARKER + json.dumps(result), flush=True)


def run(n: int, d: int, m: int, device: str, procs: int, threads: int) -> dict:
    """Timings of one configuration (a torchrun of this script's worker)."""
    path = os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))  # this checkout's gpderiv
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=path)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
    # One JSON argument: torchrun's own parser would take --n, --d and --m for abbreviations of its options.
    command += [__file__, "--worker", json.dumps({"n": n, "d": d, "m": m, "device": device})]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith(MARKER)]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"configuration {procs} x {threads} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[0][len(MARKER) :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[2000], help="points (each a value and d derivatives)")
    parser.add_argument("--d", type=int, default=10)
    parser.add_argument("--m", type=int, default=1000, help="test points of the predict timing")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--skip-threads", action="store_true", help="CPU: skip 1 process with 2 threads")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(argparse.Namespace(**json.loads(args.worker)))
        return
    if args.device == "cuda":
        gpus = torch.cuda.device_count()
        configs = [("1 GPU", 1, 1), (f"{gpus} GPUs", gpus, 1)] if gpus > 1 else [("1 GPU", 1, 1)]
    else:
        configs = [("1 process, 1 thread", 1, 1), ("1 process, 2 threads", 1, 2), ("2 processes x 1 thread", 2, 1)]
        configs = [c for c in configs if not (args.skip_threads and c[2] == 2)]
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs")
    print("| n | d | N | configuration | MLL+grad s (CPU s) | speed-up | products | factor + means s (CPU s) ", end="")
    print("| speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.n:
        base = None
        for name, procs, threads in configs:
            r = run(n, args.d, args.m, args.device, procs, threads)
            base = base or r
            print(
                f"| {n} | {args.d} | {n * (1 + args.d)} | {name} | {r['mll']:.2f} ({r['mll_cpu']:.2f}) "
                f"| {base['mll'] / r['mll']:.2f} | {r['mll_products']} "
                f"| {r['predict']:.2f} ({r['predict_cpu']:.2f}) | {base['predict'] / r['predict']:.2f} |",
                flush=True,
            )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
