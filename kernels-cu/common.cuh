// Shared helpers for the kernels: bf16 conversions, 128-bit vector access, grid-stride indices,
// deterministic warp/block reductions and online-softmax statistics.
//
// Conventions (every kernel): pointers are passed as 64-bit device addresses, sizes as int64_t
// ("64-bit indices in kernels"); outputs first, then inputs, then weights, then dims.
#pragma once
#ifdef LLAMA2_HOST_EMU
#include "ops_emu.cuh"  // the CPU emulation behind ops_emu_test.cuh
#else
#include <cuda_bf16.h>
#endif
#include <stdint.h>

// Dynamic shared memory of type T (16-byte aligned for T = float4).
#ifdef LLAMA2_HOST_EMU
#define DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(emu::g_smem)
#else
#define DYNAMIC_SMEM(T, name) extern __shared__ T name[]
#endif

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float bf2f(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ bf16 f2bf(float x) { return __float2bfloat16_rn(x); }

// Eight bf16 in one 128-bit word: one vector load/store.
union Pack8 {
    uint4 u;
    bf16 h[8];
};
// Four f32 in one 128-bit word.
union Pack4f {
    float4 v;
    float f[4];
};

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

__device__ __forceinline__ int64_t global_tid() {
    return (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t global_stride() {
    return (int64_t)gridDim.x * blockDim.x;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the whole block (blockDim a multiple of 32, at most 1024); every thread gets the
// result. The order of additions is fixed, so the result is deterministic. `sh` holds 32 values.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* sh) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // a previous call may still be reading sh
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    T r = lane < nw ? sh[lane] : T(0);
    return warp_sum(r);
}

// Online softmax statistics of a set of values: max m, s = sum exp(x - m),
// sx = sum exp(x - m) * (x - m) (for the entropy). Empty sets have m = -inf, s = sx = 0.
struct SoftStats {
    float m, s, sx;
};

__device__ __forceinline__ SoftStats soft_empty() { return {-INFINITY, 0.f, 0.f}; }

__device__ __forceinline__ SoftStats soft_combine(SoftStats a, SoftStats b) {
    if (b.m == -INFINITY) return a;
    if (a.m == -INFINITY) return b;
    const float m = fmaxf(a.m, b.m);
    const float ea = expf(a.m - m), eb = expf(b.m - m);
    SoftStats r;
    r.m = m;
    r.s = a.s * ea + b.s * eb;
    r.sx = ea * (a.sx + a.s * (a.m - m)) + eb * (b.sx + b.s * (b.m - m));
    return r;
}

// Adds one value to running statistics (one exp per value unless the max moves).
__device__ __forceinline__ void soft_push(SoftStats& st, float x) {
    if (x == -INFINITY) return;  // contributes nothing (and -inf - -inf would be NaN)
    if (x <= st.m) {
        const float d = x - st.m, e = expf(d);
        st.s += e;
        st.sx += e * d;
    } else if (st.m == -INFINITY) {
        st.m = x;
        st.s = 1.f;
        st.sx = 0.f;
    } else {
        const float d = st.m - x, e = expf(d);  // rescale the old sums to the new max
        st.sx = e * (st.sx + st.s * d);
        st.s = st.s * e + 1.f;
        st.m = x;
    }
}

__device__ __forceinline__ SoftStats soft_shfl(SoftStats a, int o) {
    SoftStats b;
    b.m = __shfl_xor_sync(0xffffffffu, a.m, o);
    b.s = __shfl_xor_sync(0xffffffffu, a.s, o);
    b.sx = __shfl_xor_sync(0xffffffffu, a.sx, o);
    return b;
}

// Block-wide combination of per-thread statistics; every thread gets the row's statistics.
__device__ __forceinline__ SoftStats block_soft(SoftStats st, SoftStats* sh) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) st = soft_combine(st, soft_shfl(st, o));
    __syncthreads();
    if (lane == 0) sh[wid] = st;
    __syncthreads();
    SoftStats r = lane < nw ? sh[lane] : soft_empty();
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) r = soft_combine(r, soft_shfl(r, o));
    return r;
}

// Calls f(i, x) for every element of a bf16 row of length n, each thread taking a strided share;
// 128-bit loads when the row is 16-byte aligned.
template <typename F>
__device__ __forceinline__ void row_read(const bf16* row, int64_t n, F&& f) {
    int64_t start = 0;
    if (aligned16(row)) {
        const int64_t nv = n / 8;
        const uint4* r4 = reinterpret_cast<const uint4*>(row);
        for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
            Pack8 p;
            p.u = r4[i];
#pragma unroll
            for (int k = 0; k < 8; k++) f(i * 8 + k, bf2f(p.h[k]));
        }
        start = nv * 8;
    }
    for (int64_t i = start + threadIdx.x; i < n; i += blockDim.x) f(i, bf2f(row[i]));
}

// Replaces every element x of a bf16 row by g(i, x), same access pattern as row_read.
template <typename G>
__device__ __forceinline__ void row_update(bf16* row, int64_t n, G&& g) {
    int64_t start = 0;
    if (aligned16(row)) {
        const int64_t nv = n / 8;
        uint4* r4 = reinterpret_cast<uint4*>(row);
        for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
            Pack8 p;
            p.u = r4[i];
#pragma unroll
            for (int k = 0; k < 8; k++) p.h[k] = f2bf(g(i * 8 + k, bf2f(p.h[k])));
            r4[i] = p.u;
        }
        start = nv * 8;
    }
    for (int64_t i = start + threadIdx.x; i < n; i += blockDim.x) row[i] = f2bf(g(i, bf2f(row[i])));
}
