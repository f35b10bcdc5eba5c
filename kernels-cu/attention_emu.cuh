// Host (g++, C++20) emulation of the CUDA features attention.cu uses, so that the real kernel
// source runs on a CPU for a correctness test where no GPU is at hand. Included by
// attention_mma.cuh when ATTN_HOST_EMU is defined; the test itself is attention_emu_test.cuh:
//
//   g++ -std=c++20 -O2 -DATTN_HOST_EMU -x c++ kernels-cu/attention_emu_test.cuh \
//       -o /tmp/attn_emu && /tmp/attn_emu
//
// Model: one CTA at a time, one fiber (ucontext) per CUDA thread, all on the calling OS thread,
// scheduled round-robin at barriers. __syncthreads is a CTA barrier;
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
#include <cmath>
#include <functional>
#include <memory>
#include <ucontext.h>
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

// ---- execution model: one fiber (ucontext) per CUDA thread, all on one OS thread ----
struct dim3e {
    unsigned x = 0, y = 0, z = 0;
};
namespace emu {
inline bool g_early_copy = false;  // cp.async at issue instead of at wait

constexpr size_t kArena = 256 * 1024;
alignas(16) inline unsigned char g_smem[kArena];

// pending cp.async copies of a thread, by group
struct Copy {
    void* dst;
    const void* src;
    int n, valid;
};
inline void do_copy(const Copy& c) {
    if (c.valid)
        memcpy(c.dst, c.src, c.n);
    else
        memset(c.dst, 0, c.n);
}

struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    dim3e tidx, bidx;
    std::vector<Copy> open;
    std::vector<std::vector<Copy>> groups;
    bool done = false;
};

struct Barrier {
    int count = 0, arrived = 0;
    unsigned long gen = 0;
};

struct Cta {
    int nthreads;
    Barrier all;
    std::vector<Barrier> warp;
    std::vector<uint32_t> slot;  // per-warp exchange slots: 32 lanes × 16 words
    int or_count = 0;
    explicit Cta(int n) : nthreads(n), warp(n / 32), slot((size_t)n * 16) {
        all.count = n;
        for (auto& w : warp) w.count = 32;
    }
};

inline dim3e g_grid, g_blockdim;
inline Cta* g_cta = nullptr;
inline Fiber* g_cur = nullptr;
inline ucontext_t g_sched;
inline unsigned long g_progress = 0;

inline void yield() { swapcontext(&g_cur->ctx, &g_sched); }
inline void wait(Barrier& b) {
    const unsigned long gen = b.gen;
    ++g_progress;
    if (++b.arrived == b.count) {
        b.arrived = 0;
        ++b.gen;
        return;
    }
    while (b.gen == gen) yield();
}

inline int tid() { return (int)g_cur->tidx.x; }
inline int warp_id() { return tid() / 32; }
inline int lane_id() { return tid() % 32; }
inline uint32_t* slots(int lane) { return &g_cta->slot[((size_t)warp_id() * 32 + lane) * 16]; }
inline void warp_sync() { wait(g_cta->warp[warp_id()]); }
}  // namespace emu

#define threadIdx (emu::g_cur->tidx)
#define blockIdx (emu::g_cur->bidx)
#define gridDim (emu::g_grid)
#define blockDim (emu::g_blockdim)

inline void __syncthreads() { emu::wait(emu::g_cta->all); }
inline int __syncthreads_or(int p) {
    emu::wait(emu::g_cta->all);
    if (p) ++emu::g_cta->or_count;
    emu::wait(emu::g_cta->all);
    const int r = emu::g_cta->or_count != 0;
    emu::wait(emu::g_cta->all);
    if (emu::tid() == 0) emu::g_cta->or_count = 0;
    emu::wait(emu::g_cta->all);
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
        emu::g_cur->open.push_back(c);
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
    emu::g_cur->groups.push_back(std::move(emu::g_cur->open));
    emu::g_cur->open.clear();
}
template <int N>
inline void cp_async_wait() {
    auto& gr = emu::g_cur->groups;
    while ((int)gr.size() > N) {
        for (auto& c : gr.front()) emu::do_copy(c);
        gr.erase(gr.begin());
    }
}

inline uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return (uint32_t)v.x.bits | ((uint32_t)v.y.bits << 16);
}
inline float exp2_approx(float x) { return exp2f(x); }

}  // namespace attn

namespace emu {
inline const std::function<void()>* g_kernel = nullptr;
inline void fiber_main() {
    (*g_kernel)();
    g_cur->done = true;
    ++g_progress;
    // returning resumes uc_link (the scheduler)
}

// Runs kernel() for every CTA of the grid, one CTA at a time, `threads` fibers each, scheduled
// round-robin; a full round without progress (every fiber waiting) is reported as a deadlock.
inline void launch(dim3e grid, int threads, const std::function<void()>& kernel) {
    g_grid = grid;
    g_blockdim = dim3e{(unsigned)threads, 1, 1};
    g_kernel = &kernel;
    constexpr size_t kStack = 256 * 1024;
    std::vector<Fiber> fib(threads);
    for (auto& f : fib) f.stack.resize(kStack);
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                memset(g_smem, 0xff, kArena);  // garbage (NaN bf16 pairs) in fresh shared memory
                Cta cta(threads);
                g_cta = &cta;
                for (int t = 0; t < threads; ++t) {
                    Fiber& f = fib[t];
                    f.tidx = dim3e{(unsigned)t, 0, 0};
                    f.bidx = dim3e{x, y, z};
                    f.open.clear();
                    f.groups.clear();
                    f.done = false;
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = f.stack.data();
                    f.ctx.uc_stack.ss_size = f.stack.size();
                    f.ctx.uc_link = &g_sched;
                    makecontext(&f.ctx, fiber_main, 0);
                }
                int live = threads;
                while (live > 0) {
                    const unsigned long before = g_progress;
                    live = 0;
                    for (auto& f : fib) {
                        if (f.done) continue;
                        g_cur = &f;
                        swapcontext(&g_sched, &f.ctx);
                        g_cur = nullptr;
                        if (!f.done) ++live;
                    }
                    if (live > 0 && g_progress == before) {
                        fprintf(stderr, "emu: deadlock in CTA (%u, %u, %u): %d threads waiting\n", x,
                                y, z, live);
                        abort();
                    }
                }
                g_cta = nullptr;
            }
}
}  // namespace emu
