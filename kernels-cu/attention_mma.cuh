// Warp-level building blocks of the attention kernels (attention.cu): bf16 tensor-core MMA,
// ldmatrix, cp.async, and the fragment layouts they use. sm_80+ (PTX ISA 7.0+).
//
// ------------------------------------------------------------------------------------------------
// Fragment layouts of mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (PTX ISA, "Matrix
// fragments for mma.m16n8k16 with floating point type"). In a warp, lane = 4·g + tq, with
// g = lane / 4 ("groupID", 0..7) and tq = lane % 4 ("threadID_in_group", 0..3).
//
//   A (16×16, row-major, 4 × b32 = 8 bf16 per lane):
//     a[0] = A[g    ][2tq, 2tq+1]      a[1] = A[g + 8][2tq, 2tq+1]
//     a[2] = A[g    ][2tq+8, 2tq+9]    a[3] = A[g + 8][2tq+8, 2tq+9]
//   B (16×8, "col": indexed B[k][n], 2 × b32 per lane):
//     b[0] = B[2tq, 2tq+1][g]          b[1] = B[2tq+8, 2tq+9][g]
//   C/D (16×8, f32, 4 per lane):
//     c[0], c[1] = C[g    ][2tq, 2tq+1]
//     c[2], c[3] = C[g + 8][2tq, 2tq+1]
//   In every b32 register the element with the lower column (A, C) / lower k (B) is in the low
//   16 bits.
//
// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8i..8i+7 give the 8 row addresses (16 bytes
// each) of matrix i; lane l receives in register i the pair M_i[l/4][2(l%4), 2(l%4)+1].
// With .trans it receives M_i[2(l%4)][l/4], M_i[2(l%4)+1][l/4] (the transposed matrix's pair).
//
// Consequences used by the kernels (X stored row-major in shared memory, X[row][col]):
//   * A operand from X (A = X[r0.., c0..]):        non-trans x4, lane l addresses
//         row r0 + (l % 8) + ((l / 8) % 2)·8,  col c0 + (l / 16)·8
//     → registers exactly a[0..3] above (matrices: rows 0-7/cols 0-7, rows 8-15/cols 0-7,
//       rows 0-7/cols 8-15, rows 8-15/cols 8-15).
//   * B operand with B[k][n] = X[n][k] (e.g. S = Q·Kᵀ, B = Kᵀ with K stored [key][d]):
//         non-trans x4, lane l addresses row n0 + (l % 8) + (l / 16)·8, col k0 + ((l / 8) % 2)·8
//     → r[0], r[1] = b[0], b[1] of the n-tile n0..n0+7; r[2], r[3] = those of n0+8..n0+15.
//   * B operand with B[k][n] = X[k][n] (e.g. O = P·V, V stored [key][d]):
//         .trans x4, lane l addresses row k0 + (l % 8) + ((l / 8) % 2)·8, col n0 + (l / 16)·8
//     → r[0], r[1] = b[0], b[1] of the n-tile n0..n0+7; r[2], r[3] = those of n0+8..n0+15.
//   * A operand with A[m][k] = X[k][m] (e.g. dQ = dS·K with dSᵀ stored [key][query]):
//         .trans x4, lane l addresses row k0 + (l % 8) + (l / 16)·8, col m0 + ((l / 8) % 2)·8
//     → registers a[0..3] (matrices: k 0-7/m 0-7, k 0-7/m 8-15, k 8-15/m 0-7, k 8-15/m 8-15).
//   * C fragments of two adjacent n-tiles (2j, 2j+1) of a 16-row product are, after packing to
//     bf16 pairs, the A fragment of the k-slice j (k = 16j..16j+15) of the next product:
//         a[0] = pack(c(2j)[0], c(2j)[1])   a[1] = pack(c(2j)[2], c(2j)[3])
//         a[2] = pack(c(2j+1)[0], c(2j+1)[1])   a[3] = pack(c(2j+1)[2], c(2j+1)[3])
// ------------------------------------------------------------------------------------------------

#pragma once

#ifdef ATTN_HOST_EMU
// Host (g++) build of the kernels for the CPU emulation test: same function names, emulated
// warp collectives. See attention_emu.cuh.
#include "attention_emu.cuh"
#else

#include <cuda_bf16.h>
#include <math_constants.h>
#include <stdint.h>

// The kernels' dynamic shared memory (16-byte aligned for cp.async and ldmatrix).
#define ATTN_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]

namespace attn {

// D = A·B + D, one m16n8k16 tile, fp32 accumulators.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4],
                                               uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// 16-byte asynchronous global→shared copy; src_bytes = 0 writes 16 zero bytes and reads nothing
// (the address must still be a valid one; callers pass the tensor's base then).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
    int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}

// 4-byte asynchronous copy (lse, D, document ids); invalid → zero.
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src, bool valid) {
    int n = valid ? 4 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Two floats → one b32 of two bf16 (lo in the low half), round to nearest even.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// 2^x (ex2.approx: max rel. error 2^-22; 2^-inf = +0).
__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

}  // namespace attn

#endif  // ATTN_HOST_EMU
