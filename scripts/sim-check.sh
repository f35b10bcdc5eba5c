#!/usr/bin/env bash
# The engine's CUDA path, unmodified, on gpu-sim (issue 16): the real PTX of kernels-cu/ executed
# on the CPU with memcheck, synccheck and racecheck, cuBLAS/cuBLASLt and NCCL stand-ins. Runs
# every GPU test and `llama2 check --device cuda`; fails if any of them fails or skips.
#
# Needs the kernels compiled ($NVCC or a pip toolkit, see README's CUDA section) and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${LLAMA2_SHARED:-../shared}
cargo build --release --locked -p gpu-sim
cargo build --release --locked
SIM=target/release/gpu-sim
. scripts/test-bin.sh
CUDA_OPS=$(test_bin cuda_ops)
ENGINE_UNIT=$(test_bin engine lib)
SIM_DIST=$(test_bin sim_dist)
for b in "$CUDA_OPS" "$ENGINE_UNIT" "$SIM_DIST"; do
    [ -x "$b" ] || { echo "sim-check: a test binary was not found ($b)"; exit 2; }
done

# step NAME COMMAND...: runs it, shows its last lines and its time; a test that printed
# `skipped` did not run on the simulator, which is a failure here.
step() {
    local name=$1
    shift
    local log t0=$SECONDS
    log=$(mktemp)
    if ! "$@" >"$log" 2>&1; then
        tail -n 40 "$log"
        echo "sim-check: FAILED: $name"
        exit 1
    fi
    # (cuda_ops' no_gpu_is_a_clean_error is for machines without a GPU: its skip is right.)
    if grep 'skipped:' "$log" | grep -qv 'covers machines without one'; then
        grep 'skipped:' "$log" | head -n 5
        echo "sim-check: FAILED: $name skipped tests instead of running them on gpu-sim"
        exit 1
    fi
    grep -v '^[[:space:]]*$' "$log" | tail -n 1
    echo "sim-check: ok $name ($((SECONDS - t0)) s)"
    rm -f "$log"
}

for f in llama-tiny-gqa llama-tiny-mha; do
    step "llama2 check $f --device cuda" \
        "$SIM" run -- target/release/llama2 check "$SHARED/fixtures/$f" --device cuda
done
step "engine/tests/cuda_ops.rs (cuBLASLt)" "$SIM" run -- "$CUDA_OPS" --nocapture
step "engine/tests/cuda_ops.rs matmuls (LLAMA2_GEMM=cublas: GemmEx)" \
    env LLAMA2_GEMM=cublas "$SIM" run -- "$CUDA_OPS" --nocapture matmul
step "NCCL, world of one (engine dist::nccl)" "$SIM" run -- "$ENGINE_UNIT" --nocapture dist::nccl
step "pretrain --dist on 2 and 3 simulated GPUs vs one process (tests/sim_dist.rs)" \
    "$SIM" run --gpus 3 -- "$SIM_DIST" --nocapture
echo "sim-check: every GPU test ran on gpu-sim and passed"
