#!/usr/bin/env bash
# Stages, here, what a lent GPU session runs: the `llama2` binary and the CUDA test binaries
# (built with the kernels compiled, stripped), both fixtures, Tiny Shakespeare. Everything goes
# to .gpu/ (git-ignored, ~30 MiB, under the device tool's 64 MiB carry limit). Then, with the
# device tool: carry [".gpu"], command `scripts/gpu-run.sh` (see that file).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NVCC:?set NVCC to a CUDA 13.0 nvcc (e.g. the PyPI wheel .ci/run installs) so kernels compile}"
shared=${LLAMA2_SHARED:-../shared}
rm -rf .gpu
mkdir -p .gpu/bin .gpu/fixtures .gpu/data
cargo build --release --locked --bin llama2
strip -o .gpu/bin/llama2 target/release/llama2
# name, then the cargo selection of the test binary
stage_test() {
    local name=$1
    shift
    local exe
    exe=$(cargo test --release --locked "$@" --no-run --message-format=json 2>/dev/null |
        jq -r 'select(.profile.test == true and .executable != null) | .executable' | tail -1)
    [ -n "$exe" ] || { echo "no test binary for $*" >&2; exit 1; }
    strip -o ".gpu/bin/$name" "$exe"
}
stage_test cuda_ops -p llama2-engine --test cuda_ops
stage_test engine_lib -p llama2-engine --lib
stage_test zero1 -p llama2-engine --test zero1
cargo build --release --locked -p llama2-engine --example zero1_launch
strip -o .gpu/bin/zero1_launch target/release/examples/zero1_launch
cp -r "$shared"/fixtures/llama-tiny-* .gpu/fixtures/
cp "$shared"/fixtures/README.md .gpu/fixtures/
cp "$shared"/data/tinyshakespeare.txt .gpu/data/
du -sh .gpu
echo "staged: carry [\".gpu\"] and run scripts/gpu-run.sh on the device"
