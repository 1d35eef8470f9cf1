#!/usr/bin/env bash
# One lease of a CUDA machine, in one command (run from the repository root; needs python3 with
# torch and triton, nothing installed): correctness of the compiled kernels, then the benchmark.
# Results go to $OUT (default ./gpu_out): logs, JSON and nvidia-smi's view of the card.
#   bash kernels/gpu_run.sh
set -u
out=${OUT:-gpu_out}
mkdir -p "$out"
pkg=$(mktemp -d)  # kernels/ imported as avmt_kernels without installing the project
ln -s "$PWD/kernels" "$pkg/avmt_kernels"
export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$out/nvidia-smi.txt"
step() {  # step SECONDS NAME ARGS...: one stage under a time limit, its log kept
    local limit=$1 name=$2; shift 2
    echo "== $name ($(date +%T), limit ${limit}s)"
    timeout "$limit" python3 -m "$@" 2>&1 | tee "$out/$name.log"
    echo "== $name exit ${PIPESTATUS[0]}"
}
step 60 check_quick avmt_kernels.gpu_check --quick
step 220 bench_qwen avmt_kernels.bench --models qwen2.5-7b --json "$out/bench_qwen.json"
step 180 check_full avmt_kernels.gpu_check --json "$out/gpu_check.json"
step 90 bench_crab avmt_kernels.bench --models crab-7b --rep 100 --json "$out/bench_crab.json"
