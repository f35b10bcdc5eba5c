// Scalar head (reward / value models): out[m] = w . h[rows[m], :], and its backward.
// Small (a few rows per batch): the forward is one block per scored row with a deterministic
// block reduction; the backward gives each column to one thread, which walks the scored rows in
// order, so repeated rows and the weight gradient accumulate without races or atomics.
#include "common.cuh"

// out[m] (f32) from h[n, d], w[d] at rows[m].  grid: any, block: 256.
extern "C" __global__ void __launch_bounds__(256)
    scalar_head_fwd_bf16(float* out, const bf16* h, const bf16* w, const int32_t* rows, int64_t m,
                         int64_t d) {
    __shared__ float sh[32];
    for (int64_t r = blockIdx.x; r < m; r += gridDim.x) {
        const bf16* hr = h + (int64_t)rows[r] * d;
        float acc = 0.f;
        for (int64_t j = threadIdx.x; j < d; j += blockDim.x) acc += bf2f(hr[j]) * bf2f(w[j]);
        acc = block_sum(acc, sh);
        if (threadIdx.x == 0) out[r] = acc;
    }
}

// dh[rows[i], :] += dout[i] * w  (bf16, accumulated), dw[d] += sum_i dout[i] * h[rows[i], :]
// (f32, accumulated).  grid: ceil(d / 256), block: 256.
extern "C" __global__ void __launch_bounds__(256)
    scalar_head_bwd_bf16(bf16* dh, float* dw, const float* dout, const bf16* h, const bf16* w,
                         const int32_t* rows, int64_t m, int64_t d) {
    for (int64_t j = global_tid(); j < d; j += global_stride()) {
        const float wj = bf2f(w[j]);
        float acc = dw[j];
        for (int64_t i = 0; i < m; i++) {
            const float g = dout[i];
            const int64_t at = (int64_t)rows[i] * d + j;
            dh[at] = f2bf(bf2f(dh[at]) + g * wj);
            acc += g * bf2f(h[at]);
        }
        dw[j] = acc;
    }
}
