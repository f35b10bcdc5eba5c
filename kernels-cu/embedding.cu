// Embedding backward, deterministic without atomics: dwte[ids[t], :] += dout[t, :].
// The host groups the token indices by id (a stable counting sort of the ids it already holds):
// tok[] lists token indices grouped by id, in token order within a group; seg[u]..seg[u+1] is
// group u, whose id is seg_id[u]. One block per group sums its tokens' rows in token order and
// adds the sum to the group's row of dwte, so no two threads ever write the same element.
// (The forward is gather_rows_bf16 in elementwise.cu.)
// Bytes per element: 2 B (dout) + 4 + 4 B (dwte read and written once per distinct id).
#include "common.cuh"

// dwte[V, h] (f32, accumulated) from dout[n, h]; tok[n], seg[U + 1], seg_id[U].
// grid: any (<= U useful), block: 256.
extern "C" __global__ void __launch_bounds__(256)
    embedding_bwd_bf16(float* dwte, const bf16* dout, const int32_t* tok, const int32_t* seg,
                       const int32_t* seg_id, int64_t U, int64_t h) {
    const bool vec = aligned16(dwte) && aligned16(dout) && h % 8 == 0;
    for (int64_t u = blockIdx.x; u < U; u += gridDim.x) {
        const int64_t k0 = seg[u], k1 = seg[u + 1];
        float* drow = dwte + (int64_t)seg_id[u] * h;
        if (vec) {
            for (int64_t j8 = threadIdx.x; j8 < h / 8; j8 += blockDim.x) {
                float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
                for (int64_t k = k0; k < k1; k++) {
                    Pack8 p;
                    p.u = reinterpret_cast<const uint4*>(dout + (int64_t)tok[k] * h)[j8];
#pragma unroll
                    for (int q = 0; q < 8; q++) acc[q] += bf2f(p.h[q]);
                }
                Pack4f a0, a1;
                a0.v = reinterpret_cast<float4*>(drow)[2 * j8];
                a1.v = reinterpret_cast<float4*>(drow)[2 * j8 + 1];
#pragma unroll
                for (int q = 0; q < 4; q++) {
                    a0.f[q] += acc[q];
                    a1.f[q] += acc[4 + q];
                }
                reinterpret_cast<float4*>(drow)[2 * j8] = a0.v;
                reinterpret_cast<float4*>(drow)[2 * j8 + 1] = a1.v;
            }
        } else {
            for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
                float acc = 0.f;
                for (int64_t k = k0; k < k1; k++) acc += bf2f(dout[(int64_t)tok[k] * h + j]);
                drow[j] += acc;
            }
        }
    }
}
