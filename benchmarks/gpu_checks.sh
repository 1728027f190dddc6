#!/usr/bin/env bash
# Every GPU check of the project in one call (the lent GPU machine's time is short: see
# docs/benchmarks.md, "GPU"). Run from the repository root on a machine with CUDA, torch, gpytorch,
# botorch and pytest installed; gpderiv is imported from the working tree.
#
#   bash benchmarks/gpu_checks.sh [SECONDS]      # total budget, default 540
#
# Steps run in order of importance, each under its own time limit and never past the budget; the
# log goes to stdout and to $OUT/gpu_checks.log when OUT is set (the device tool's result folder).
# Sizes: the issue-17 targets (dense MLL and prediction at N = 6,000-24,000 against GPyTorch, the
# N = 110,000 iterative step) and the issue-16 million-observation variational run.
set -u
budget=${1:-540}
start=$SECONDS
log=${OUT:-/tmp}/gpu_checks.log
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
PY=${PYTHON:-python3}
: >"$log"

step() {  # step NAME LIMIT COMMAND...: run under min(LIMIT, what is left of the budget)
    local name=$1 limit=$2
    shift 2
    local left=$((budget - (SECONDS - start)))
    if ((left < 20)); then
        echo "=== $name: skipped, budget spent" | tee -a "$log"
        return
    fi
    ((limit > left)) && limit=$left
    echo "=== $name (limit ${limit}s, $((SECONDS - start))s used)" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start))s" | tee -a "$log"
}

step "device" 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step "cuda tests" 150 "$PY" -m pytest -q -p no:cacheprovider tests -k "cuda or gpu" -x
step "inverse" 60 "$PY" benchmarks/bench_inverse.py --device cuda --sizes 6000 12000 24000 --blocks 512 1024 2048
step "dense mll vs gpytorch" 150 "$PY" benchmarks/bench_mll.py --device cuda --sizes 6000 12000 24000 --d 5
step "predict vs gpytorch" 90 "$PY" benchmarks/bench_predict.py --device cuda --n 4000 --d 5 --m 1000
step "iterative mll step N=110k" 150 "$PY" benchmarks/bench_cg.py --mll-n 10000 --preconditioner two-level --device cuda
step "variational 1M" 150 "$PY" benchmarks/bench_variational.py --case million --device cuda --variational-only
echo "=== done in $((SECONDS - start))s; log: $log"
