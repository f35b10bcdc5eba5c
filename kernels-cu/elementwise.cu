// Elementwise and row-copy kernels: residual add, SwiGLU forward/backward, f32 -> bf16 (the
// compute shadow of the master weights), and row gather/scatter (embedding forward, KV cache).
//
// All grid-stride over 64-bit indices; a 128-bit path (8 bf16 / 4 f32 per access) runs when
// every pointer is 16-byte aligned, with a scalar tail. Launch: any grid, 256 threads.
//
// Bytes moved per element (for the bench table):
//   add_bf16          3 x 2 B          (read a, b; write out)
//   swiglu_fwd_bf16   3 x 2 B          (read gate, up; write out)
//   swiglu_bwd_bf16   5 x 2 B          (read dout, gate, up; write dgate, dup)
//   f32_to_bf16       4 + 2 B
//   gather/scatter    2 x 2 B per copied element (+ 4 B index per row)
#include "common.cuh"

__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + expf(-x)); }

// out[n] = a[n] + b[n]   (the residual add, f32 sum rounded once)
extern "C" __global__ void __launch_bounds__(256) add_bf16(bf16* out, const bf16* a, const bf16* b,
                                                           int64_t n) {
    int64_t start = 0;
    if (aligned16(out) && aligned16(a) && aligned16(b)) {
        const int64_t nv = n / 8;
        for (int64_t i = global_tid(); i < nv; i += global_stride()) {
            Pack8 pa, pb, po;
            pa.u = reinterpret_cast<const uint4*>(a)[i];
            pb.u = reinterpret_cast<const uint4*>(b)[i];
#pragma unroll
            for (int k = 0; k < 8; k++) po.h[k] = f2bf(bf2f(pa.h[k]) + bf2f(pb.h[k]));
            reinterpret_cast<uint4*>(out)[i] = po.u;
        }
        start = nv * 8;
    }
    for (int64_t i = start + global_tid(); i < n; i += global_stride())
        out[i] = f2bf(bf2f(a[i]) + bf2f(b[i]));
}

// out[n] = silu(gate[n]) * up[n],  silu(g) = g * sigmoid(g)
extern "C" __global__ void __launch_bounds__(256) swiglu_fwd_bf16(bf16* out, const bf16* gate,
                                                                  const bf16* up, int64_t n) {
    int64_t start = 0;
    if (aligned16(out) && aligned16(gate) && aligned16(up)) {
        const int64_t nv = n / 8;
        for (int64_t i = global_tid(); i < nv; i += global_stride()) {
            Pack8 pg, pu, po;
            pg.u = reinterpret_cast<const uint4*>(gate)[i];
            pu.u = reinterpret_cast<const uint4*>(up)[i];
#pragma unroll
            for (int k = 0; k < 8; k++) {
                const float g = bf2f(pg.h[k]);
                po.h[k] = f2bf(g * sigmoidf_(g) * bf2f(pu.h[k]));
            }
            reinterpret_cast<uint4*>(out)[i] = po.u;
        }
        start = nv * 8;
    }
    for (int64_t i = start + global_tid(); i < n; i += global_stride()) {
        const float g = bf2f(gate[i]);
        out[i] = f2bf(g * sigmoidf_(g) * bf2f(up[i]));
    }
}

// dgate[n], dup[n] (overwritten) from dout[n], gate[n], up[n]:
//   dup = dout * silu(g),  dgate = dout * up * s * (1 + g (1 - s)),  s = sigmoid(g)
extern "C" __global__ void __launch_bounds__(256)
    swiglu_bwd_bf16(bf16* dgate, bf16* dup, const bf16* dout, const bf16* gate, const bf16* up,
                    int64_t n) {
    int64_t start = 0;
    if (aligned16(dgate) && aligned16(dup) && aligned16(dout) && aligned16(gate) &&
        aligned16(up)) {
        const int64_t nv = n / 8;
        for (int64_t i = global_tid(); i < nv; i += global_stride()) {
            Pack8 pd, pg, pu, odg, odu;
            pd.u = reinterpret_cast<const uint4*>(dout)[i];
            pg.u = reinterpret_cast<const uint4*>(gate)[i];
            pu.u = reinterpret_cast<const uint4*>(up)[i];
#pragma unroll
            for (int k = 0; k < 8; k++) {
                const float d = bf2f(pd.h[k]), g = bf2f(pg.h[k]), u = bf2f(pu.h[k]);
                const float s = sigmoidf_(g);
                odu.h[k] = f2bf(d * g * s);
                odg.h[k] = f2bf(d * u * s * (1.f + g * (1.f - s)));
            }
            reinterpret_cast<uint4*>(dgate)[i] = odg.u;
            reinterpret_cast<uint4*>(dup)[i] = odu.u;
        }
        start = nv * 8;
    }
    for (int64_t i = start + global_tid(); i < n; i += global_stride()) {
        const float d = bf2f(dout[i]), g = bf2f(gate[i]), u = bf2f(up[i]);
        const float s = sigmoidf_(g);
        dup[i] = f2bf(d * g * s);
        dgate[i] = f2bf(d * u * s * (1.f + g * (1.f - s)));
    }
}

// out[n] = bf16(in[n])  (refreshes the bf16 compute copy of the f32 master weights)
extern "C" __global__ void __launch_bounds__(256) f32_to_bf16(bf16* out, const float* in,
                                                              int64_t n) {
    int64_t start = 0;
    if (aligned16(out) && aligned16(in)) {
        const int64_t nv = n / 8;
        for (int64_t i = global_tid(); i < nv; i += global_stride()) {
            Pack4f x0, x1;
            x0.v = reinterpret_cast<const float4*>(in)[2 * i];
            x1.v = reinterpret_cast<const float4*>(in)[2 * i + 1];
            Pack8 po;
#pragma unroll
            for (int k = 0; k < 4; k++) {
                po.h[k] = f2bf(x0.f[k]);
                po.h[4 + k] = f2bf(x1.f[k]);
            }
            reinterpret_cast<uint4*>(out)[i] = po.u;
        }
        start = nv * 8;
    }
    for (int64_t i = start + global_tid(); i < n; i += global_stride()) out[i] = f2bf(in[i]);
}

// dst[i, :] = src[rows[i], :] for i < nrows, rows of width w (embedding forward: rows = ids).
// The caller validates row indices. One block per row (grid-stride), threads along the row.
// grid: any, block: 256.
extern "C" __global__ void __launch_bounds__(256)
    gather_rows_bf16(bf16* dst, const bf16* src, const int32_t* rows, int64_t nrows, int64_t w) {
    const bool vec = aligned16(dst) && aligned16(src) && w % 8 == 0;
    for (int64_t r = blockIdx.x; r < nrows; r += gridDim.x) {
        const int64_t s = rows[r];
        if (vec) {
            const uint4* sp = reinterpret_cast<const uint4*>(src + s * w);
            uint4* dp = reinterpret_cast<uint4*>(dst + r * w);
            for (int64_t c = threadIdx.x; c < w / 8; c += blockDim.x) dp[c] = sp[c];
        } else {
            for (int64_t c = threadIdx.x; c < w; c += blockDim.x) dst[r * w + c] = src[s * w + c];
        }
    }
}

// dst[rows[i], :] = src[i, :] for i < nrows, rows of width w (new keys/values into a KV cache).
// Rows must be distinct (they are: one cache slot per position).  grid: any, block: 256.
extern "C" __global__ void __launch_bounds__(256)
    scatter_rows_bf16(bf16* dst, const bf16* src, const int32_t* rows, int64_t nrows, int64_t w) {
    const bool vec = aligned16(dst) && aligned16(src) && w % 8 == 0;
    for (int64_t r = blockIdx.x; r < nrows; r += gridDim.x) {
        const int64_t d = rows[r];
        if (vec) {
            const uint4* sp = reinterpret_cast<const uint4*>(src + r * w);
            uint4* dp = reinterpret_cast<uint4*>(dst + d * w);
            for (int64_t c = threadIdx.x; c < w / 8; c += blockDim.x) dp[c] = sp[c];
        } else {
            for (int64_t c = threadIdx.x; c < w; c += blockDim.x) dst[d * w + c] = src[r * w + c];
        }
    }
}
