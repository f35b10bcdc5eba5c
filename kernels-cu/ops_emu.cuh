// Host (g++) emulation of what the non-attention kernels use beyond attention_emu.cuh (which
// provides the execution model: one fiber per CUDA thread, barriers, float shuffles, bf16):
// 128-bit vector types, double shuffles, round-to-nearest arithmetic intrinsics and 64-bit
// min/max. Included by common.cuh when LLAMA2_HOST_EMU is defined; see ops_emu_test.cuh.
#pragma once
#define ATTN_HOST_EMU
#include "attention_emu.cuh"

struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};

inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }

inline double __shfl_xor_sync(unsigned, double x, int o) {
    uint32_t u[2];
    memcpy(u, &x, 8);
    emu::slots(emu::lane_id())[0] = u[0];
    emu::slots(emu::lane_id())[1] = u[1];
    emu::warp_sync();
    u[0] = emu::slots(emu::lane_id() ^ o)[0];
    u[1] = emu::slots(emu::lane_id() ^ o)[1];
    emu::warp_sync();
    double r;
    memcpy(&r, u, 8);
    return r;
}

// Built with -ffp-contract=off, plain operators round once each, as the _rn intrinsics do.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }

inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
