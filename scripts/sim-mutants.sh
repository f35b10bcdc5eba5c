#!/usr/bin/env bash
# Planted bugs that the GPU tests must catch on gpu-sim (issue 16). Each mutant is run and must
# make its test FAIL; the script exits non-zero if any mutant survives.
#
# Kernel bugs are planted in a copy of kernels-cu/, compiled to PTX with the same nvcc flags as
# ptx-build.rs, and loaded in place of the engine's own PTX (gpu-sim --ptx-override), so the
# engine need not be rebuilt. Host-side bugs are planted by gpu-sim at the API boundary
# (gpu-sim --fault), the exact effect of the bug in the engine's Rust code: a call that swaps
# two kernel arguments, a cublasLtMatmul with the other transpose flag, a missing
# cuStreamWaitEvent.
#
# Needs: target/release/gpu-sim (cargo build --release -p gpu-sim), llama2 built with kernels,
# and $NVCC (scripts/sim-check.sh builds all of it).
set -uo pipefail
cd "$(dirname "$0")/.."
SIM=${SIM:-target/release/gpu-sim}
: "${NVCC:?set NVCC to the nvcc that built the kernels}"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
ARCH=${CUDA_COMPUTE_CAP:+compute_${CUDA_COMPUTE_CAP}}
ARCH=${ARCH:-compute_80}

# The GPU test binaries, as README's test command builds them (built, not run, here).
. scripts/test-bin.sh
CUDA_OPS=$(test_bin cuda_ops)
SIM_DIST=$(test_bin sim_dist)
[ -x "$CUDA_OPS" ] && [ -x "$SIM_DIST" ] || { echo "GPU test binaries not found"; exit 2; }

survived=()
results=()

# mutate NAME FILE PYTHON-REPLACEMENT: copies kernels-cu/, applies old->new once (the old text
# must be present exactly once), compiles FILE's .cu to $WORK/NAME/ptx/<stem>.ptx.
mutate() {
    local name=$1 file=$2 old=$3 new=$4 cu=$5
    local dir=$WORK/$name
    mkdir -p "$dir/ptx"
    cp -r kernels-cu "$dir/src"
    python3 - "$dir/src/$file" "$old" "$new" <<'EOF' || return 1
import sys
path, old, new = sys.argv[1], sys.argv[2], sys.argv[3]
text = open(path).read()
n = text.count(old)
if n != 1:
    sys.exit(f"mutant: expected the text once in {path}, found it {n} times: {old!r}")
open(path, "w").write(text.replace(old, new))
EOF
    local flags=(-ptx -O3 -std=c++17 -lineinfo "-I$dir/src" "-arch=$ARCH")
    grep -qx '// ptx-build: fast-math' "$dir/src/$cu.cu" && flags+=(--use_fast_math)
    "$NVCC" "${flags[@]}" "$dir/src/$cu.cu" -o "$dir/ptx/$cu.ptx" || return 1
}

# expect_fail NAME WHAT COMMAND...: the mutant is caught when COMMAND fails.
expect_fail() {
    local name=$1 what=$2
    shift 2
    local log=$WORK/$name.log
    local t0=$SECONDS
    if "$@" >"$log" 2>&1; then
        survived+=("$name")
        results+=("SURVIVED  $name ($what): the test passed with the bug planted")
        tail -n 20 "$log"
    else
        local why
        # The sanitizer's finding, else the failed assertion's message.
        why=$(grep -m1 -oE '(Memcheck|Synccheck|Racecheck) in [^(]{0,140}' "$log" ||
            grep -m1 -A1 'panicked at' "$log" | tail -n 1 | cut -c1-160)
        results+=("caught    $name ($what) in $((SECONDS - t0)) s: ${why:-the test failed}")
    fi
}

# 1. mma operands swapped in the inline asm (a[1] and a[2] exchanged).
mutate mma_swap attention_mma.cuh \
    '"r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3])' \
    '"r"(a[0]), "r"(a[2]), "r"(a[1]), "r"(a[3])' attention &&
    expect_fail mma_swap "attention_mma.cuh: mma A operands swapped" \
        "$SIM" run --ptx-override "$WORK/mma_swap/ptx" -- "$CUDA_OPS" --test-threads 1 attention

# 2. An off-by-one in a kernel's index: the residual add's scalar tail runs to n inclusive.
mutate off_by_one elementwise.cu \
    'for (int64_t i = start + global_tid(); i < n; i += global_stride())
        out[i] = f2bf(bf2f(a[i]) + bf2f(b[i]));' \
    'for (int64_t i = start + global_tid(); i <= n; i += global_stride())
        out[i] = f2bf(bf2f(a[i]) + bf2f(b[i]));' elementwise &&
    expect_fail off_by_one "elementwise.cu add_bf16: i <= n" \
        "$SIM" run --ptx-override "$WORK/off_by_one/ptx" -- "$CUDA_OPS" --test-threads 1 elementwise

# 3. A missing __syncthreads: block_sum reads the warps' partial sums without the barrier.
mutate no_sync common.cuh \
    '    if (lane == 0) sh[wid] = v;
    __syncthreads();' \
    '    if (lane == 0) sh[wid] = v;' rmsnorm &&
    expect_fail no_sync "common.cuh block_sum: barrier removed (rmsnorm)" \
        "$SIM" run --ptx-override "$WORK/no_sync/ptx" -- "$CUDA_OPS" --test-threads 1 rmsnorm

# 4. A launch with a wrong argument order: rmsnorm_fwd_bf16 gets its output and input swapped.
expect_fail swap_args "rmsnorm_fwd_bf16 launched with arguments 0 and 2 swapped" \
    "$SIM" run --fault swap-args:rmsnorm_fwd_bf16:0:2 -- "$CUDA_OPS" --test-threads 1 rmsnorm

# 5. A wrong transpose flag on one cuBLASLt call: the first matmul of the test.
expect_fail lt_transpose "cublasLtMatmul call 0 with the other TRANSA" \
    "$SIM" run --fault lt-flip-transa:0 -- "$CUDA_OPS" --test-threads 1 matmuls

# 6. A missing event wait between the NCCL stream and the compute stream: 2 ranks of
#    pretrain --dist against one process.
expect_fail no_event_wait "every cuStreamWaitEvent dropped (NCCL stream vs compute stream)" \
    env GPU_SIM_NCCL_TIMEOUT=60 "$SIM" run --gpus 3 --fault skip-event-waits -- "$SIM_DIST"

printf '%s\n' "${results[@]}"
if [ ${#survived[@]} -gt 0 ]; then
    echo "sim-mutants: ${#survived[@]} planted bug(s) not caught: ${survived[*]}"
    exit 1
fi
echo "sim-mutants: all ${#results[@]} planted bugs caught"
