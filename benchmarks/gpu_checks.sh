#!/usr/bin/env bash
# Every GPU check of the project in one call (the lent GPU machine's time is short: see
# docs/benchmarks.md, "GPU checks"). Run from the repository root on a machine with CUDA, torch,
# gpytorch, botorch and pytest installed; gpderiv is imported from the working tree.
#
#   bash benchmarks/gpu_checks.sh [SECONDS]      # total budget, default 570 (the device tool's limit is 600)
#
# Steps run in order of importance, each under its own time limit and never past the budget (a step
# that would start with under 20 s left is skipped); the log goes to stdout and to
# $OUT/gpu_checks.log when OUT is set (the device tool's result folder). The exit status is 1 if
# any step failed or ran out of time. Sizes: the issue-17 targets (dense MLL and prediction at
# N = 6,000-24,000 against GPyTorch, the N = 110,000 iterative step) and the issue-16
# million-observation variational run.
set -u
budget=${1:-570}
start=$SECONDS
failed=0
log=${OUT:-/tmp}/gpu_checks.log
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
PY=${PYTHON:-python3}
: >"$log"

say() { echo "$*" | tee -a "$log"; }

step() {  # step NAME LIMIT COMMAND...: run under min(LIMIT, what is left of the budget)
    local name=$1 limit=$2
    shift 2
    local left=$((budget - (SECONDS - start)))
    if ((left < 20)); then
        say "=== $name: skipped, budget spent"
        failed=1
        return
    fi
    ((limit > left)) && limit=$left
    say "=== $name (limit ${limit}s, $((SECONDS - start))s used)"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    ((rc != 0)) && failed=1
    say "=== $name: exit $rc after $((SECONDS - start))s"
}

step "device" 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
# The CUDA tests, and GPyTorch's kernel test cases, whose dtype/device test moves kernels to the GPU.
step "cuda tests" 90 "$PY" -m pytest -q -p no:cacheprovider tests -k "cuda or gpu or dtype_device"
step "inverse" 45 "$PY" benchmarks/bench_inverse.py --device cuda --sizes 6000 12000 24000 --blocks 512 1024 2048
step "dense mll vs gpytorch" 120 "$PY" benchmarks/bench_mll.py --device cuda --sizes 6000 12000 24000 --d 5
step "predict vs gpytorch" 60 "$PY" benchmarks/bench_predict.py --device cuda --n 4000 --d 5 --m 1000
step "iterative mll step N=110k" 120 "$PY" benchmarks/bench_cg.py --mll-n 10000 --preconditioner two-level --device cuda
step "variational 1M" 100 "$PY" benchmarks/bench_variational.py --case million --device cuda --variational-only
# Last, with what is left: the whole suite (tests that CPU machines never reach may fail on a GPU machine).
step "full test suite" 150 "$PY" -m pytest -q -n 8 -p no:cacheprovider tests
say "=== done in $((SECONDS - start))s, $([ $failed = 0 ] && echo 'every step passed' || echo 'some step failed'); log: $log"
exit $failed
