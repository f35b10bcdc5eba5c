// Host (g++, C++20) emulation of the CUDA features attention.cu uses, so that the real kernel
// source runs on a CPU for a correctness test where no GPU is at hand. Included by
// attention_mma.cuh when ATTN_HOST_EMU is defined; the test itself is attention_emu_test.cuh:
//
//   g++ -std=c++20 -O2 -pthread -DATTN_HOST_EMU -x c++ kernels-cu/attention_emu_test.cuh \
//       -o /tmp/attn_emu && /tmp/attn_emu
//
// Model: one CTA at a time, one std::thread per CUDA thread. __syncthreads is a CTA barrier;
// each warp collective (shuffle, ldmatrix, mma) is an exchange through per-warp slots between two
// warp barriers, so a collective reached by only part of a warp deadlocks (a bug, as on a GPU).
// The semantics implemented here are taken from the PTX ISA, independently of the layout notes in
// attention_mma.cuh:
//   mma.m16n8k16 (bf16): A rows g (a0,a1,a4,a5) / g+8 (a2,a3,a6,a7), cols 2tq + (i&1) (+8 for
//     a4..a7); B rows 2tq + (i&1) (+8 for b2,b3), col g; C rows g (c0,c1) / g+8, cols 2tq + (i&1).
//   ldmatrix m8n8 .b16: matrix i's rows at the addresses of lanes 8i..8i+7; lane l gets row l/4,
//     cols 2(l%4), +1; with .trans it gets the same fragment of the transposed matrix.
//   cp.async: the copy happens when a wait_group retires its group (late), or at issue (early);
//     the test runs both orders, which exposes a missing wait (late) or an overwrite of a buffer
//     still being read (early).
// Shared memory: the dynamic buffer is one host arena; __shared__ variables become function
// statics (one CTA runs at a time, so they are per-CTA).

#pragma once

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define CUDART_INF_F INFINITY

// ---- bf16 ----
struct __nv_bfloat16 {
    uint16_t bits;
};
struct __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
inline float __bfloat162float(__nv_bfloat16 h) {
    uint32_t u = (uint32_t)h.bits << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {  // round to nearest even (NaN kept quiet)
    uint32_t u;
    memcpy(&u, &f, 4);
    if (std::isnan(f)) return __nv_bfloat16{(uint16_t)((u >> 16) | 0x40)};
    u += 0x7fff + ((u >> 16) & 1);
    return __nv_bfloat16{(uint16_t)(u >> 16)};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
    return __nv_bfloat162{__float2bfloat16(lo), __float2bfloat16(hi)};
}

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

// ---- execution model ----
struct dim3e {
    unsigned x = 0, y = 0, z = 0;
};
namespace emu {
inline thread_local dim3e tl_thread, tl_block;
inline dim3e g_grid, g_blockdim;
inline bool g_early_copy = false;  // cp.async at issue instead of at wait

constexpr size_t kArena = 256 * 1024;
alignas(16) inline unsigned char g_smem[kArena];

struct Cta {
    int nthreads;
    std::barrier<> all;
    std::vector<std::unique_ptr<std::barrier<>>> warp;
    // per-warp exchange slots: 32 lanes × up to 16 words
    std::vector<uint32_t> slot;
    std::atomic<int> or_count{0};
    explicit Cta(int n) : nthreads(n), all(n), slot((size_t)(n / 32) * 32 * 16) {
        for (int w = 0; w < n / 32; ++w) warp.emplace_back(new std::barrier<>(32));
    }
};
inline Cta* g_cta = nullptr;

inline int tid() { return (int)tl_thread.x; }
inline int warp_id() { return tid() / 32; }
inline int lane_id() { return tid() % 32; }
inline uint32_t* slots(int lane) { return &g_cta->slot[((size_t)warp_id() * 32 + lane) * 16]; }
inline void warp_sync() { g_cta->warp[warp_id()]->arrive_and_wait(); }

// pending cp.async copies of this thread, by group
struct Copy {
    void* dst;
    const void* src;
    int n, valid;
};
inline thread_local std::vector<Copy> tl_open;
inline thread_local std::vector<std::vector<Copy>> tl_groups;
inline void do_copy(const Copy& c) {
    if (c.valid)
        memcpy(c.dst, c.src, c.n);
    else
        memset(c.dst, 0, c.n);
}
}  // namespace emu

#define threadIdx (emu::tl_thread)
#define blockIdx (emu::tl_block)
#define gridDim (emu::g_grid)
#define blockDim (emu::g_blockdim)

inline void __syncthreads() { emu::g_cta->all.arrive_and_wait(); }
inline int __syncthreads_or(int p) {
    // three phases: clear is ordered before the adds by the first barrier
    emu::g_cta->all.arrive_and_wait();
    if (p) emu::g_cta->or_count.fetch_add(1);
    emu::g_cta->all.arrive_and_wait();
    int r = emu::g_cta->or_count.load() != 0;
    emu::g_cta->all.arrive_and_wait();
    if (emu::tid() == 0) emu::g_cta->or_count.store(0);
    emu::g_cta->all.arrive_and_wait();
    return r;
}
inline float __shfl_xor_sync(unsigned, float x, int o) {
    uint32_t u;
    memcpy(&u, &x, 4);
    emu::slots(emu::lane_id())[0] = u;
    emu::warp_sync();
    u = emu::slots(emu::lane_id() ^ o)[0];
    emu::warp_sync();
    float r;
    memcpy(&r, &u, 4);
    return r;
}
inline int atomicMax(int* p, int v) {
    std::atomic_ref<int> a(*p);
    int old = a.load();
    while (old < v && !a.compare_exchange_weak(old, v)) {
    }
    return old;
}
inline int atomicMin(int* p, int v) {
    std::atomic_ref<int> a(*p);
    int old = a.load();
    while (old > v && !a.compare_exchange_weak(old, v)) {
    }
    return old;
}
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline size_t __cvta_generic_to_shared(const void* p) {
    const unsigned char* c = static_cast<const unsigned char*>(p);
    if (c < emu::g_smem || c >= emu::g_smem + emu::kArena) {
        fprintf(stderr, "emu: shared-memory address outside the dynamic arena\n");
        abort();
    }
    return (size_t)(c - emu::g_smem);
}

#define ATTN_DYNAMIC_SMEM(name) unsigned char* name = emu::g_smem

namespace attn {

inline uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

inline uint16_t smem_b16(uint32_t addr) {
    if (addr % 2 || addr + 2 > emu::kArena) abort();
    uint16_t v;
    memcpy(&v, emu::g_smem + addr, 2);
    return v;
}

// ldmatrix m8n8 x4 (.trans): see the header comment.
inline void ldmatrix_impl(uint32_t (&r)[4], uint32_t addr, bool trans) {
    if (addr % 16) {
        fprintf(stderr, "emu: ldmatrix row address not 16-byte aligned\n");
        abort();
    }
    const int lane = emu::lane_id();
    emu::slots(lane)[0] = addr;
    emu::warp_sync();
    const int row = lane / 4, col = 2 * (lane % 4);
    for (int i = 0; i < 4; ++i) {
        uint16_t lo, hi;
        if (!trans) {
            const uint32_t ra = emu::slots(8 * i + row)[0];
            lo = smem_b16(ra + 2 * col);
            hi = smem_b16(ra + 2 * (col + 1));
        } else {  // element (row, col) of the transpose = M[col][row]
            lo = smem_b16(emu::slots(8 * i + col)[0] + 2 * row);
            hi = smem_b16(emu::slots(8 * i + col + 1)[0] + 2 * row);
        }
        r[i] = (uint32_t)lo | ((uint32_t)hi << 16);
    }
    emu::warp_sync();
}
inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) { ldmatrix_impl(r, addr, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) { ldmatrix_impl(r, addr, true); }

inline float bf_lo(uint32_t u) { return __bfloat162float(__nv_bfloat16{(uint16_t)(u & 0xffff)}); }
inline float bf_hi(uint32_t u) { return __bfloat162float(__nv_bfloat16{(uint16_t)(u >> 16)}); }

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, D = A·B + C (C = D in place)
inline void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    const int lane = emu::lane_id();
    uint32_t* s = emu::slots(lane);
    for (int i = 0; i < 4; ++i) s[i] = a[i];
    s[4] = b0;
    s[5] = b1;
    emu::warp_sync();
    float A[16][16], B[16][8];
    for (int L = 0; L < 32; ++L) {
        const uint32_t* x = emu::slots(L);
        const int g = L / 4, tq = L % 4;
        // a0,a1 | a2,a3 | a4,a5 | a6,a7 = registers 0 | 1 | 2 | 3
        A[g][2 * tq] = bf_lo(x[0]);
        A[g][2 * tq + 1] = bf_hi(x[0]);
        A[g + 8][2 * tq] = bf_lo(x[1]);
        A[g + 8][2 * tq + 1] = bf_hi(x[1]);
        A[g][2 * tq + 8] = bf_lo(x[2]);
        A[g][2 * tq + 9] = bf_hi(x[2]);
        A[g + 8][2 * tq + 8] = bf_lo(x[3]);
        A[g + 8][2 * tq + 9] = bf_hi(x[3]);
        B[2 * tq][g] = bf_lo(x[4]);
        B[2 * tq + 1][g] = bf_hi(x[4]);
        B[2 * tq + 8][g] = bf_lo(x[5]);
        B[2 * tq + 9][g] = bf_hi(x[5]);
    }
    emu::warp_sync();
    const int g = lane / 4, tq = lane % 4;
    for (int c = 0; c < 4; ++c) {
        const int row = g + (c >= 2 ? 8 : 0), col = 2 * tq + (c & 1);
        float acc = d[c];
        for (int kk = 0; kk < 16; ++kk) acc += A[row][kk] * B[kk][col];
        d[c] = acc;
    }
}

inline void cp_async_impl(uint32_t dst, const void* src, int n, bool valid) {
    if (dst % n) abort();
    emu::Copy c{emu::g_smem + dst, src, n, valid};
    if (emu::g_early_copy)
        emu::do_copy(c);
    else
        emu::tl_open.push_back(c);
}
inline void cp_async_16(uint32_t dst, const void* src, bool valid) {
    if ((uintptr_t)src % 16) {
        fprintf(stderr, "emu: cp.async 16 from an unaligned global address\n");
        abort();
    }
    cp_async_impl(dst, src, 16, valid);
}
inline void cp_async_4(uint32_t dst, const void* src, bool valid) {
    cp_async_impl(dst, src, 4, valid);
}
inline void cp_async_commit() {
    emu::tl_groups.push_back(std::move(emu::tl_open));
    emu::tl_open.clear();
}
template <int N>
inline void cp_async_wait() {
    while ((int)emu::tl_groups.size() > N) {
        for (auto& c : emu::tl_groups.front()) emu::do_copy(c);
        emu::tl_groups.erase(emu::tl_groups.begin());
    }
}

inline uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return (uint32_t)v.x.bits | ((uint32_t)v.y.bits << 16);
}
inline float exp2_approx(float x) { return exp2f(x); }

}  // namespace attn

namespace emu {
// Runs kernel() for every CTA of the grid, one CTA at a time, `threads` std::threads each.
inline void launch(dim3e grid, int threads, const std::function<void()>& kernel) {
    g_grid = grid;
    g_blockdim = dim3e{(unsigned)threads, 1, 1};
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                memset(g_smem, 0xff, kArena);  // garbage (NaN bf16 pairs) in fresh shared memory
                Cta cta(threads);
                g_cta = &cta;
                std::vector<std::thread> th;
                for (int t = 0; t < threads; ++t)
                    th.emplace_back([&, t] {
                        tl_thread = dim3e{(unsigned)t, 0, 0};
                        tl_block = dim3e{x, y, z};
                        tl_open.clear();
                        tl_groups.clear();
                        kernel();
                        if (!tl_open.empty() || !tl_groups.empty()) {
                            // copies never waited for: harmless on a GPU only if unused
                            tl_open.clear();
                            tl_groups.clear();
                        }
                    });
                for (auto& t : th) t.join();
                g_cta = nullptr;
            }
}
}  // namespace emu
