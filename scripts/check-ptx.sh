#!/usr/bin/env bash
# Compiles every kernels-cu/*.cu to PTX exactly as ptx-build.rs does (compute_80, or
# $CUDA_COMPUTE_CAP; compute_90a too for files that ask for it), assembles each PTX for sm_90
# (sm_90a) with `ptxas -v` as the driver's JIT would, and fails on any register spill or error.
# Usage: NVCC=/path/to/nvcc scripts/check-ptx.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${NVCC:-nvcc}"
PTXAS="$(dirname "$(command -v "$NVCC")")/ptxas"
cap="${CUDA_COMPUTE_CAP:-80}"; cap="${cap//./}"; cap="${cap#sm_}"; cap="${cap#compute_}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
fail=0
for cu in kernels-cu/*.cu; do
  name="$(basename "$cu" .cu)"
  flags=(-ptx -O3 -std=c++17 -lineinfo -Ikernels-cu)
  grep -qx '// ptx-build: fast-math' "$cu" && flags+=(--use_fast_math)
  archs=("compute_$cap:sm_90")
  grep -qx '// ptx-build: sm_90a' "$cu" && archs+=("compute_90a:sm_90a")
  for pair in "${archs[@]}"; do
    virt="${pair%%:*}" arch="${pair##*:}"
    log="$tmp/$name.$arch.log"
    ptx="$tmp/$name.$virt.ptx"
    if ! "$NVCC" "${flags[@]}" -arch="$virt" "$cu" -o "$ptx" >"$log" 2>&1 ||
       ! "$PTXAS" -v -arch="$arch" "$ptx" -o "$tmp/$name.$arch.cubin" >>"$log" 2>&1; then
      echo "FAIL $cu ($virt -> $arch): does not compile"; cat "$log"; fail=1; continue
    fi
    # ptxas prints "N bytes spill stores, M bytes spill loads" per function.
    spills="$(grep -E '[1-9][0-9]* bytes spill (stores|loads)' "$log" || true)"
    if [ -n "$spills" ]; then
      echo "FAIL $cu ($virt -> $arch): register spills"
      grep -E "Compiling entry|spill" "$log" | grep -B1 -E '[1-9][0-9]* bytes spill' || true
      fail=1
    else
      echo "ok   $cu ($virt -> $arch): $(grep -c 'Compiling entry' "$log") kernels, no spills"
    fi
  done
done
exit $fail
