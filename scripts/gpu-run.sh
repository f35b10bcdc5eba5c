#!/usr/bin/env bash
# A lent GPU session's checks in one call (from the repo root, after scripts/gpu-stage.sh here
# and with .gpu carried): the CUDA kernel tests (cuBLASLt and GemmEx), `llama2 check` on both
# fixtures on CUDA, NCCL with world size 1 (the engine test and `pretrain --dist` through the
# real launch path), the kernel table against PyTorch, and memory and speed per --recompute on
# a 1.1B model at sequence 4096. Writes $OUT/gpu-session.log, $OUT/kernels.json and
# $OUT/train-{none,attn,full}.json (the device tool brings back at most 8 files). Every step
# runs even if an earlier one failed; the log ends with each step's exit status.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
B=.gpu/bin
L="$OUT/gpu-session.log"
: >"$L"
status=()
step() {
    local name=$1
    shift
    echo "=== $name: $*" | tee -a "$L"
    local t0=$SECONDS
    "$@" >>"$L" 2>&1
    local rc=$?
    echo "=== $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$L"
    status+=("$name=$rc")
}
{
    date -u
    git log -1 --format='commit %H %s' 2>/dev/null
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
} >>"$L" 2>&1

step cuda_ops $B/cuda_ops --test-threads 1
step cuda_ops_gemmex env LLAMA2_GEMM=cublas $B/cuda_ops --test-threads 1 matmul
for f in .gpu/fixtures/llama-tiny-*/; do
    step "check_$(basename "$f")" $B/llama2 check "$f" --device cuda
done
step nccl_world_of_one $B/engine_lib --test-threads 1 nccl
step zero1 $B/zero1
# The ZeRO-1 step on CUDA over NCCL (a world of one, not filtered to whole AdamW as the
# trainers do), buckets overlapped with the backward, then without buckets: the same losses.
step zero1_launch_cuda $B/zero1_launch --device cuda --steps 10
step zero1_launch_cuda_nobucket $B/zero1_launch --device cuda --steps 10 --bucket 0

# pretrain on CUDA, in one process and as rank 0 of 1 under --dist: the losses should agree.
D=/tmp/gpu-data
step tokenizer $B/llama2 train-tokenizer --vocab-size 512 --out $D/tok.json .gpu/data/tinyshakespeare.txt
step prepare $B/llama2 prepare-data --tokenizer $D/tok.json --out $D/shards .gpu/data/tinyshakespeare.txt
step pretrain_cuda $B/llama2 pretrain --data $D/shards --preset tiny --steps 30 --eval-every 10 \
    --device cuda --out $D/run-single --no-progress
step pretrain_dist env RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29517 \
    $B/llama2 pretrain --data $D/shards --preset tiny --steps 30 --eval-every 10 --dist \
    --out $D/run-dist --no-progress
step losses sh -c "grep -h '\"loss\"' $D/run-single/metrics.jsonl | tail -3; grep -h '\"loss\"' $D/run-dist/metrics.jsonl | tail -3"

step bench_kernels $B/llama2 bench kernels --vs-torch --json "$OUT/kernels.json"
for r in none attn full; do
    step "train_$r" $B/llama2 bench train --device cuda --config bench/configs/llama-1b.json \
        --seq-len 4096 --batch-size 2 --steps 3 --warmup 1 --recompute $r --json "$OUT/train-$r.json"
done
# The plan for the same shapes, to set beside the measured device memory above.
step memory_plan $B/llama2 bench memory --config bench/configs/llama-1b.json --seq-len 4096 \
    --batch-size 2 --json "$OUT/memory-plan.json"
echo "=== summary: ${status[*]}" | tee -a "$L"
