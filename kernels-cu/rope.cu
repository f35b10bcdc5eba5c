// RoPE in place, Hugging Face's rotate_half layout: within each head of width hd the rotated
// pairs are (i, i + hd/2), angle = pos[token] * inv_freq[i], inv_freq[i] = 1 / theta^(2i/hd)
// computed in double then rounded to f32 (as transformers and the CPU reference do).
//   forward:  (a, b) -> (a cos - b sin, b cos + a sin)
//   backward: the same with sin negated (the transpose of a rotation).
// x is [n, heads, hd]. One block per token (grid-stride): the block computes the token's hd/2
// sines and cosines once into shared memory, then rotates every head's pairs.
// Bytes per element: 2 + 2 B (read and write x). Needs hd even and hd <= 1024.
#include "common.cuh"

#define ROPE_MAX_HALF 512

__device__ __forceinline__ void rope_impl(bf16* x, const int32_t* pos, int64_t n, int64_t heads,
                                          int64_t hd, float theta, float sign) {
    __shared__ float sh_c[ROPE_MAX_HALF], sh_s[ROPE_MAX_HALF];
    const int half = (int)(hd / 2);
    const int pairs = (int)heads * half;
    for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
        __syncthreads();  // the previous token's tables are no longer read
        for (int i = threadIdx.x; i < half; i += blockDim.x) {
            const float inv = (float)(1.0 / pow((double)theta, (double)(2 * i) / (double)hd));
            const float ang = (float)pos[row] * inv;
            float s, c;
            sincosf(ang, &s, &c);
            sh_c[i] = c;
            sh_s[i] = s * sign;
        }
        __syncthreads();
        bf16* xr = x + row * heads * hd;
        for (int idx = threadIdx.x; idx < pairs; idx += blockDim.x) {
            const int hh = idx / half, i = idx - hh * half;
            bf16* p = xr + (int64_t)hh * hd;
            const float a = bf2f(p[i]), b = bf2f(p[i + half]);
            const float c = sh_c[i], s = sh_s[i];
            p[i] = f2bf(a * c - b * s);
            p[i + half] = f2bf(b * c + a * s);
        }
    }
}

// x[n, heads, hd] rotated in place by the angles of pos[n].  grid: any, block: 256.
extern "C" __global__ void __launch_bounds__(256)
    rope_fwd_bf16(bf16* x, const int32_t* pos, int64_t n, int64_t heads, int64_t hd, float theta) {
    rope_impl(x, pos, n, heads, hd, theta, 1.f);
}

// dx[n, heads, hd] in place: rotation by minus the angles.  grid: any, block: 256.
extern "C" __global__ void __launch_bounds__(256)
    rope_bwd_bf16(bf16* dx, const int32_t* pos, int64_t n, int64_t heads, int64_t hd, float theta) {
    rope_impl(dx, pos, n, heads, hd, theta, -1.f);
}
