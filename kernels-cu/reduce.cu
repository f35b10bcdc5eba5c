// Deterministic two-pass reductions of an f32 vector to one f64 scalar: sum of squares (the
// global gradient norm) and plain sum (the loss). Pass 1: block b sums its grid-stride share in
// f64 (fixed order) into partials[b]; pass 2: one block sums the partials in a fixed order.
// The grid size is chosen from n alone, so the result does not depend on the device.
// Bytes per element: 4 B read.
#include "common.cuh"

// partials[gridDim.x] = per-block sum of x (square != 0: of x^2).  block: 256.
extern "C" __global__ void __launch_bounds__(256)
    reduce_sum_f32(double* partials, const float* x, int64_t n, int32_t square) {
    __shared__ double sh[32];
    double acc = 0.0;
    int64_t start = 0;
    if (aligned16(x)) {
        const int64_t nv = n / 4;
        for (int64_t i = global_tid(); i < nv; i += global_stride()) {
            Pack4f p;
            p.v = reinterpret_cast<const float4*>(x)[i];
#pragma unroll
            for (int k = 0; k < 4; k++) {
                const double d = p.f[k];
                acc += square ? d * d : d;
            }
        }
        start = nv * 4;
    }
    for (int64_t i = start + global_tid(); i < n; i += global_stride()) {
        const double d = x[i];
        acc += square ? d * d : d;
    }
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// out[0] = sum of partials[nparts].  grid: 1, block: 1024.
extern "C" __global__ void __launch_bounds__(1024)
    reduce_finish_f64(double* out, const double* partials, int64_t nparts) {
    __shared__ double sh[32];
    double acc = 0.0;
    for (int64_t i = threadIdx.x; i < nparts; i += blockDim.x) acc += partials[i];
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0) out[0] = acc;
}
