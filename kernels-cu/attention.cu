// Causal grouped-query attention (bf16 in/out, fp32 accumulation): the CUDA counterpart of
// engine/src/ops.rs `attention_fwd`, `attention_bwd`, `attention_cached`.
//
// Layouts (row-major, element offsets always computed in 64 bits):
//   q, out, dout, dq : [b, t, nh, hd] bf16      k, v, dk, dv : [b, t, nkv, hd] bf16
//   lse, D           : [b, t, nh] f32           doc          : [b, t] i32 (optional)
//   lse[i] = ln Σ_{j allowed} exp(scale·q_i·k_j), scale = 1/sqrt(hd) (natural log of the sum of
//   the exponentials of the *scaled* scores, exactly ops.rs' `m + sum.ln()`).
//   Query head h reads KV head h / (nh / nkv). Token i attends j ≤ i, and with `doc` only j with
//   doc[j] == doc[i].
//
// Kernels
//   attention_fwd_bf16_hd{64,128}      FlashAttention-2 forward (fast path)
//   attention_bwd_preprocess_bf16      D = rowsum(dout ∘ out) (both backward paths)
//   attention_bwd_bf16_hd{64,128}      FlashAttention-2 backward: dK, dV, and dQ into an f32
//                                      accumulator with atomics (zeroed by the caller)
//   attention_bwd_dq_convert_bf16      dq = bf16(scale · dq_accum)
//   attention_fwd_naive_bf16           obviously-correct fallbacks, any hd ≤ 256
//   attention_bwd_naive_dq_bf16        (LLAMA2_ATTN=naive, or hd not 64/128)
//   attention_bwd_naive_dkdv_bf16
//   attention_cached_bf16              KV-cache attention (decode / prefill), any hd ≤ 256
//
// ------------------------------------------------------------------------------------------------
// Fast forward (attention_fwd_bf16_hd{HD}): one CTA per (query block of BM = 64 rows, head, batch),
// 4 warps × 16 query rows; key/value tiles of BN = 64 rows. Grid (ceil(t/64), nh, b), the query
// block index reversed (blockIdx.x = 0 is the last, i.e. heaviest, causal block). blockIdx.x
// varies fastest, so the CTAs in flight together share one head's K/V in L2; within a head the
// heaviest blocks start first.
//   * Q (64×HD) is copied once with cp.async and kept in registers as A fragments (HD/16 × 4 b32).
//   * K, V tiles: cp.async, double-buffered (tile n+1 is in flight while tile n is computed).
//   * S = Q·Kᵀ (16×64 per warp, fp32) with mma.m16n8k16, B fragments by ldmatrix.x4 of K.
//   * Online softmax in registers in the log2 domain (scale·log2e folded into one FMA, ex2.approx);
//     P is repacked to bf16 A fragments in registers and O += P·V with ldmatrix.x4.trans of V.
//   * Causal: key tiles beyond the last row of the block are never visited; the per-element mask
//     is applied only on tiles that cross the diagonal (or the end of the sequence) and, with doc,
//     on every tile (exact doc[j] == doc[i] test). With doc, key tiles that end before the first
//     token of the document of the block's first row are skipped: this assumes a document's tokens
//     are one contiguous run (as the packer produces; ids of different runs differ).
//   * Shared memory rows are padded to HD + 8 elements (16 bytes) so ldmatrix's 8 row addresses
//     hit 8 distinct 16-byte bank groups (row stride ≡ 16 mod 128 bytes): conflict-free.
//   Shared memory: Q 64·(HD+8)·2 + K,V 2·2·64·(HD+8)·2 + key doc ids 2·64·4
//     = 46,592 B (HD 64), 87,552 B (HD 128): dynamic, > 48 KB opted in from Rust.
//
// Fast backward (attention_bwd_bf16_hd{HD}): one CTA per (key block of BN = 128 keys, kv head,
// batch), 8 warps × 16 keys. Grid (ceil(t/128), nkv, b); blockIdx.x = 0 (the heaviest causal key
// block, seen by every query) first. The CTA loops over the nh/nkv query heads of its KV head and
// over the query blocks of BM rows (64 for HD 64, 32 for HD 128) that can see its keys (from the
// block of its first key to the end of the sequence, or to the end of the last key's document
// with doc). Per step, for warp w's 16 keys:
//   Sᵀ = K_w·Qᵀ (16×BM)                 Pᵀ = exp2(Sᵀ·scale·log2e − lse·log2e), masked → 0
//   dV_w += Pᵀ·dO                        dPᵀ = V_w·dOᵀ
//   dSᵀ = Pᵀ ∘ (dPᵀ − D)                dK_w += dSᵀ·Q
//   dSᵀ → shared memory (bf16), then dQ[BM×HD] += dS·K split over the 8 warps in 16×32 units,
//   added with fp32 atomicAdd into dq_accum [b, t, nh, hd].
// dK, dV (16×HD per warp each) stay in registers over all steps: the GQA group sum needs no
// atomics. The Q/dO/lse/D tiles of step s+1 are fetched with cp.async while step s computes.
// dQ trade-off: atomics cost one extra product (dS·K) per step and make dQ's summation order
// (hence its last bits) nondeterministic; the deterministic alternative (a second kernel per query
// block recomputing S, P, dP) costs three extra products. The f32 accumulator is b·t·nh·hd·4
// bytes of scratch plus a convert kernel.
//   Shared memory: K, V 2·128·(HD+8)·2 + Q, dO 2·2·BM·(HD+8)·2 + dSᵀ 128·(BM+8)·2
//     + lse, D 2·2·BM·4 + doc ids (2·BM + 128)·4
//     = 94,208 B (HD 64, BM 64), 115,968 B (HD 128, BM 32).
//
// Registers per thread reported by ptxas (CUDA 13.0, -O3; 0 bytes spill stores/loads and 0 bytes
// stack frame for every entry point on both targets; dynamic shared memory as listed above):
//   entry point                        sm_90   sm_80   threads
//   attention_fwd_bf16_hd64             130     134      128
//   attention_fwd_bf16_hd128            177     175      128
//   attention_bwd_bf16_hd64             220     216      256   (BM 64)
//   attention_bwd_bf16_hd128            242     248      256   (BM 32; with BM 64 it spilled)
//   attention_bwd_preprocess_bf16        31      32      256
//   attention_bwd_dq_convert_bf16        12      12      256
//   attention_fwd_naive_bf16             44      48      128
//   attention_bwd_naive_dq_bf16          40      48      128
//   attention_bwd_naive_dkdv_bf16        48      56      128
//   attention_cached_bf16                80      90      256
// (The engine ships compute_80 PTX that the driver JIT-compiles. Assembling that PTX for sm_90
// with CUDA 13.0's ptxas, as scripts/check-ptx.sh does, gives the same counts (naive fwd 40);
// an older driver's JIT may differ by a few. The fast backward is close to the 255 limit: rerun
// scripts/check-ptx.sh after any change to it.)
//
// Correctness test without a GPU: attention_emu_test.cuh runs this file's kernels on the CPU under
// an emulation of the warp collectives (attention_emu.cuh) against a port of ops.rs.
// ------------------------------------------------------------------------------------------------

// (CUDA headers come through attention_mma.cuh, which swaps in the host emulation of
// attention_emu.cuh when ATTN_HOST_EMU is defined.)
#include "attention_mma.cuh"

using bf16 = __nv_bfloat16;
typedef long long i64;

namespace attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// First position of the run of equal document ids that contains `pos` (docb: this sequence's
// ids). Called by all threads of the CTA (contains barriers); the result is CTA-uniform.
template <int NT>
__device__ int doc_run_start(const int* __restrict__ docb, int pos, int* s_red) {
    const int tid = threadIdx.x;
    const int d = docb[pos];
    if (tid == 0) *s_red = 0;
    __syncthreads();
    for (int base = pos - 1; base >= 0; base -= NT) {  // CTA-uniform loop
        const int j = base - tid;
        const bool diff = j >= 0 && docb[j] != d;
        if (diff) atomicMax(s_red, j + 1);
        if (__syncthreads_or(diff)) break;  // barrier: the atomics above are visible after it
    }
    const int r = *s_red;
    __syncthreads();  // s_red may be reused by the caller
    return r;
}

// Last position of the run of equal document ids that contains `pos` (< t).
template <int NT>
__device__ int doc_run_end(const int* __restrict__ docb, int pos, int t, int* s_red) {
    const int tid = threadIdx.x;
    const int d = docb[pos];
    if (tid == 0) *s_red = t - 1;
    __syncthreads();
    for (int base = pos + 1; base < t; base += NT) {  // CTA-uniform loop
        const int j = base + tid;
        const bool diff = j < t && docb[j] != d;
        if (diff) atomicMin(s_red, j - 1);
        if (__syncthreads_or(diff)) break;
    }
    const int r = *s_red;
    __syncthreads();
    return r;
}

// Copies rows [r0, r0 + ROWS) of a [*, HD] strided bf16 matrix (row r at src + r·stride) into
// shared memory with rows of LD elements; rows ≥ t are zero-filled. All NT threads call it.
template <int ROWS, int HD, int LD, int NT>
__device__ __forceinline__ void load_rows_async(bf16* dst, const bf16* __restrict__ src,
                                                i64 stride, int r0, int t) {
    constexpr int CHUNKS = HD / 8;  // 16-byte chunks per row
    for (int c = threadIdx.x; c < ROWS * CHUNKS; c += NT) {
        const int row = c / CHUNKS, col = (c % CHUNKS) * 8;
        const int r = r0 + row;
        const bool valid = r < t;
        const bf16* p = valid ? src + (i64)r * stride + col : src;
        cp_async_16(smem_u32(dst + row * LD + col), p, valid);
    }
}

// ================================================================================================
// Forward
// ================================================================================================

namespace fwd {
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int BM = 16 * kWarps;  // query rows per CTA
constexpr int BN = 64;           // keys per tile

template <int HD>
struct Smem {
    static constexpr int LD = HD + 8;
    static constexpr int Q = 0;                      // bf16 [BM][LD]
    static constexpr int K = Q + BM * LD * 2;        // bf16 [2][BN][LD]
    static constexpr int V = K + 2 * BN * LD * 2;    // bf16 [2][BN][LD]
    static constexpr int KDOC = V + 2 * BN * LD * 2; // i32  [2][BN]
    static constexpr int BYTES = KDOC + 2 * BN * 4;
};

template <int HD>
__device__ __forceinline__ void kernel(bf16* __restrict__ out, float* __restrict__ lse,
                                       const bf16* __restrict__ q, const bf16* __restrict__ k,
                                       const bf16* __restrict__ v, const int* __restrict__ doc,
                                       i64 B, i64 T, i64 NH, i64 NKV, float scale) {
    static_assert(HD % 16 == 0 && HD <= 256, "head dim");
    using S = Smem<HD>;
    constexpr int LD = S::LD;
    constexpr int NT_S = BN / 8;   // n-tiles of S per warp
    constexpr int NT_O = HD / 8;   // n-tiles of O per warp
    constexpr int KQ = HD / 16;    // k-slices of Q·Kᵀ

    ATTN_DYNAMIC_SMEM(smem);
    bf16* sQ = reinterpret_cast<bf16*>(smem + S::Q);
    bf16* sK = reinterpret_cast<bf16*>(smem + S::K);
    bf16* sV = reinterpret_cast<bf16*>(smem + S::V);
    int* sKdoc = reinterpret_cast<int*>(smem + S::KDOC);
    __shared__ int s_red;

    const int t = (int)T;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, tq = lane % 4;
    const int nmb = (t + BM - 1) / BM;
    const int mb = nmb - 1 - (int)blockIdx.x;  // heaviest (last) query blocks first
    const i64 h = blockIdx.y, b = blockIdx.z;
    const i64 kvh = h / (NH / NKV);
    const int m0 = mb * BM;
    const int m_last = min(m0 + BM, t) - 1;

    const i64 q_stride = NH * HD, kv_stride = NKV * HD;
    const bf16* qb = q + (b * T * NH + h) * HD;   // row i at qb + i·q_stride
    const bf16* kb = k + (b * T * NKV + kvh) * HD;
    const bf16* vb = v + (b * T * NKV + kvh) * HD;
    const int* docb = doc ? doc + b * T : nullptr;

    // Key range: [kv_lo, m_last]; with doc, kv_lo = first token of the document of row m0.
    int kv_lo = 0;
    if (docb) kv_lo = doc_run_start<kThreads>(docb, m0, &s_red);
    const int nb_lo = kv_lo / BN, nb_hi = m_last / BN;

    // This thread's two rows (g and g + 8 of its warp's 16) and their document ids.
    const int row0 = m0 + warp * 16 + g, row1 = row0 + 8;
    int rdoc0 = 0, rdoc1 = 0;
    if (docb) {
        rdoc0 = row0 < t ? docb[row0] : 0;
        rdoc1 = row1 < t ? docb[row1] : 0;
    }

    auto load_kv = [&](int nb, int buf) {
        const int n0 = nb * BN;
        load_rows_async<BN, HD, LD, kThreads>(sK + buf * BN * LD, kb, kv_stride, n0, t);
        load_rows_async<BN, HD, LD, kThreads>(sV + buf * BN * LD, vb, kv_stride, n0, t);
        if (docb) {
            for (int c = tid; c < BN; c += kThreads) {
                const int j = n0 + c;
                cp_async_4(smem_u32(sKdoc + buf * BN + c), j < t ? docb + j : docb, j < t);
            }
        }
    };

    // Prologue: Q and the first K/V tile in one group.
    load_rows_async<BM, HD, LD, kThreads>(sQ, qb, q_stride, m0, t);
    load_kv(nb_lo, 0);
    cp_async_commit();

    uint32_t qf[KQ][4];           // Q A-fragments, rows warp·16 .. +15
    float o[NT_O][4];             // O accumulator (unnormalised)
    float m_i[2] = {-CUDART_INF_F, -CUDART_INF_F};  // running max (log2 domain) of rows g, g+8
    float l_i[2] = {0.f, 0.f};    // running Σ p of this thread's columns (quad-reduced at the end)
#pragma unroll
    for (int i = 0; i < NT_O; ++i)
#pragma unroll
        for (int c = 0; c < 4; ++c) o[i][c] = 0.f;

    const float scale_log2 = scale * kLog2e;

    for (int nb = nb_lo; nb <= nb_hi; ++nb) {
        const int buf = (nb - nb_lo) & 1;
        if (nb < nb_hi) load_kv(nb + 1, buf ^ 1);
        cp_async_commit();  // possibly empty: keeps the group count uniform
        cp_async_wait<1>(); // every group but the newest is complete: tile nb (and Q) landed
        __syncthreads();

        if (nb == nb_lo) {
#pragma unroll
            for (int kk = 0; kk < KQ; ++kk) {
                const bf16* p = sQ + (warp * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * LD +
                                kk * 16 + (lane / 16) * 8;
                ldmatrix_x4(qf[kk], smem_u32(p));
            }
        }

        const bf16* sKb = sK + buf * BN * LD;
        const bf16* sVb = sV + buf * BN * LD;
        const int n0 = nb * BN;

        // ---- S = Q·Kᵀ (16 × BN per warp) ----
        float s[NT_S][4];
#pragma unroll
        for (int i = 0; i < NT_S; ++i)
#pragma unroll
            for (int c = 0; c < 4; ++c) s[i][c] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KQ; ++kk) {
#pragma unroll
            for (int np = 0; np < BN / 16; ++np) {
                uint32_t bk[4];
                const bf16* p = sKb + (np * 16 + (lane % 8) + (lane / 16) * 8) * LD + kk * 16 +
                                ((lane / 8) % 2) * 8;
                ldmatrix_x4(bk, smem_u32(p));
                mma_bf16_16816(s[2 * np], qf[kk], bk[0], bk[1]);
                mma_bf16_16816(s[2 * np + 1], qf[kk], bk[2], bk[3]);
            }
        }

        // ---- mask: key ≤ row, key < t, same document ----
        const bool need_mask = docb != nullptr || n0 + BN - 1 > m0 || n0 + BN > t;
        if (need_mask) {
            const int* kd = sKdoc + buf * BN;
#pragma unroll
            for (int nt = 0; nt < NT_S; ++nt) {
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int row = c < 2 ? row0 : row1;
                    const int kc = nt * 8 + 2 * tq + (c & 1);  // key within the tile
                    const int key = n0 + kc;
                    bool ok = key <= row && key < t;
                    if (docb) ok = ok && kd[kc] == (c < 2 ? rdoc0 : rdoc1);
                    if (!ok) s[nt][c] = -CUDART_INF_F;
                }
            }
        }

        // ---- online softmax (rows g: c = 0,1; g + 8: c = 2,3) ----
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = -CUDART_INF_F;
#pragma unroll
            for (int nt = 0; nt < NT_S; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
            // the 4 threads of a quad hold the same row
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(m_i[r], mx * scale_log2);
            // a row with every key so far masked keeps m = -inf; subtract 0 then (no inf − inf)
            const float m_base = m_new == -CUDART_INF_F ? 0.f : m_new;
            const float alpha = exp2_approx(m_i[r] - m_base);  // 0 when m_i = -inf
            m_i[r] = m_new;
            float rs = 0.f;
#pragma unroll
            for (int nt = 0; nt < NT_S; ++nt) {
                const float p0 = exp2_approx(fmaf(s[nt][2 * r], scale_log2, -m_base));
                const float p1 = exp2_approx(fmaf(s[nt][2 * r + 1], scale_log2, -m_base));
                s[nt][2 * r] = p0;
                s[nt][2 * r + 1] = p1;
                rs += p0 + p1;
            }
            l_i[r] = l_i[r] * alpha + rs;
#pragma unroll
            for (int dt = 0; dt < NT_O; ++dt) {
                o[dt][2 * r] *= alpha;
                o[dt][2 * r + 1] *= alpha;
            }
        }

        // ---- O += P·V: P's C fragments become bf16 A fragments (see attention_mma.cuh) ----
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            uint32_t a[4];
            a[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
            a[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
            a[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            a[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int dp = 0; dp < HD / 16; ++dp) {
                uint32_t bv[4];
                const bf16* p = sVb + (kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * LD +
                                dp * 16 + (lane / 16) * 8;
                ldmatrix_x4_trans(bv, smem_u32(p));
                mma_bf16_16816(o[2 * dp], a, bv[0], bv[1]);
                mma_bf16_16816(o[2 * dp + 1], a, bv[2], bv[3]);
            }
        }
        __syncthreads();  // all warps are done with buffer `buf` before it is refilled
    }
    cp_async_wait<0>();  // nothing is in flight at exit (the last group is empty)

    // ---- epilogue: O / l, lse = m·ln2 + ln l ----
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = l_i[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const int row = r == 0 ? row0 : row1;
        if (row < t) {
            const float inv = l > 0.f ? 1.f / l : 0.f;
            bf16* orow = out + ((b * T + row) * NH + h) * HD;
#pragma unroll
            for (int dt = 0; dt < NT_O; ++dt) {
                *reinterpret_cast<uint32_t*>(orow + dt * 8 + 2 * tq) =
                    pack_bf16(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
            }
            if (tq == 0) {
                lse[(b * T + row) * NH + h] = l > 0.f ? m_i[r] * kLn2 + logf(l) : -CUDART_INF_F;
            }
        }
    }
}
}  // namespace fwd

// ================================================================================================
// Backward
// ================================================================================================

namespace bwd {
constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int BN = 16 * kWarps;  // keys per CTA

// Queries per step: 64 for HD 64; 32 for HD 128, where the 2 × 64 fp32 dK/dV accumulators leave
// room for only 16 × 32 fp32 Sᵀ and dPᵀ tiles per warp without spilling.
template <int HD>
struct Cfg {
    static constexpr int BM = HD >= 128 ? 32 : 64;
};

template <int HD>
struct Smem {
    static constexpr int BM = Cfg<HD>::BM;
    static constexpr int LDS = BM + 8;  // dSᵀ row (elements), padded like the others
    static constexpr int LD = HD + 8;
    static constexpr int K = 0;                         // bf16 [BN][LD]
    static constexpr int V = K + BN * LD * 2;           // bf16 [BN][LD]
    static constexpr int Q = V + BN * LD * 2;           // bf16 [2][BM][LD]
    static constexpr int DO = Q + 2 * BM * LD * 2;      // bf16 [2][BM][LD]
    static constexpr int DS = DO + 2 * BM * LD * 2;     // bf16 [BN][LDS]  (dSᵀ: [key][query])
    static constexpr int LSE = DS + BN * LDS * 2;       // f32 [2][BM]
    static constexpr int DD = LSE + 2 * BM * 4;         // f32 [2][BM]
    static constexpr int QDOC = DD + 2 * BM * 4;        // i32 [2][BM]
    static constexpr int KDOC = QDOC + 2 * BM * 4;      // i32 [BN]
    static constexpr int BYTES = KDOC + BN * 4;
};

template <int HD>
__device__ __forceinline__ void kernel(float* __restrict__ dq_acc, bf16* __restrict__ dk,
                                       bf16* __restrict__ dv, const bf16* __restrict__ dout,
                                       const bf16* __restrict__ q, const bf16* __restrict__ k,
                                       const bf16* __restrict__ v, const float* __restrict__ lse,
                                       const float* __restrict__ dsum,
                                       const int* __restrict__ doc, i64 B, i64 T, i64 NH, i64 NKV,
                                       float scale) {
    static_assert(HD % 32 == 0 && HD <= 256, "head dim");
    using S = Smem<HD>;
    constexpr int LD = S::LD;
    constexpr int BM = S::BM, LDS = S::LDS;
    constexpr int NT_S = BM / 8;   // n-tiles of Sᵀ / dPᵀ per warp (queries)
    constexpr int NT_D = HD / 8;   // n-tiles of dK / dV per warp
    constexpr int KD = HD / 16;    // k-slices over the head dim

    ATTN_DYNAMIC_SMEM(smem);
    bf16* sK = reinterpret_cast<bf16*>(smem + S::K);
    bf16* sV = reinterpret_cast<bf16*>(smem + S::V);
    bf16* sQ = reinterpret_cast<bf16*>(smem + S::Q);
    bf16* sdO = reinterpret_cast<bf16*>(smem + S::DO);
    bf16* sdS = reinterpret_cast<bf16*>(smem + S::DS);
    float* sL = reinterpret_cast<float*>(smem + S::LSE);
    float* sD = reinterpret_cast<float*>(smem + S::DD);
    int* sQdoc = reinterpret_cast<int*>(smem + S::QDOC);
    int* sKdoc = reinterpret_cast<int*>(smem + S::KDOC);
    __shared__ int s_red;

    const int t = (int)T;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, tq = lane % 4;
    const int n0 = (int)blockIdx.x * BN;
    const i64 kvh = blockIdx.y, b = blockIdx.z;
    const i64 group = NH / NKV;
    const int key0 = n0 + warp * 16 + g, key1 = key0 + 8;  // this thread's two keys (rows)
    const int kw0 = n0 + warp * 16;                        // first key of this warp

    const i64 q_stride = NH * HD, kv_stride = NKV * HD;
    const bf16* kb = k + (b * T * NKV + kvh) * HD;
    const bf16* vb = v + (b * T * NKV + kvh) * HD;
    const int* docb = doc ? doc + b * T : nullptr;

    // Queries that can see these keys: [n0, q_hi].
    const int k_last = min(n0 + BN, t) - 1;
    int q_hi = t - 1;
    if (docb) q_hi = doc_run_end<kThreads>(docb, k_last, t, &s_red);
    const int mb_lo = n0 / BM, mb_hi = q_hi / BM;
    const int nmbs = mb_hi - mb_lo + 1;
    const int nsteps = (int)group * nmbs;

    // Q, dO, lse, D and the query doc ids of step st into buffer buf.
    auto load_step = [&](int st, int buf) {
        const i64 h = kvh * group + st / nmbs;
        const int mq0 = (mb_lo + st % nmbs) * BM;
        const bf16* qb = q + (b * T * NH + h) * HD;
        const bf16* dob = dout + (b * T * NH + h) * HD;
        load_rows_async<BM, HD, LD, kThreads>(sQ + buf * BM * LD, qb, q_stride, mq0, t);
        load_rows_async<BM, HD, LD, kThreads>(sdO + buf * BM * LD, dob, q_stride, mq0, t);
        for (int c = tid; c < BM; c += kThreads) {
            const int i = mq0 + c;
            const bool valid = i < t;
            const i64 off = valid ? (b * T + i) * NH + h : 0;
            cp_async_4(smem_u32(sL + buf * BM + c), lse + off, valid);
            cp_async_4(smem_u32(sD + buf * BM + c), dsum + off, valid);
            if (docb) cp_async_4(smem_u32(sQdoc + buf * BM + c), docb + (valid ? i : 0), valid);
        }
    };

    // Prologue: K, V, key doc ids and step 0 in one group.
    load_rows_async<BN, HD, LD, kThreads>(sK, kb, kv_stride, n0, t);
    load_rows_async<BN, HD, LD, kThreads>(sV, vb, kv_stride, n0, t);
    if (docb) {
        for (int c = tid; c < BN; c += kThreads) {
            const int j = n0 + c;
            cp_async_4(smem_u32(sKdoc + c), docb + (j < t ? j : 0), j < t);
        }
    }
    load_step(0, 0);
    cp_async_commit();

    float dk_acc[NT_D][4], dv_acc[NT_D][4];
#pragma unroll
    for (int i = 0; i < NT_D; ++i)
#pragma unroll
        for (int c = 0; c < 4; ++c) dk_acc[i][c] = dv_acc[i][c] = 0.f;

    const float scale_log2 = scale * kLog2e;
    // ldmatrix lane offsets (elements) of the three addressing patterns, see attention_mma.cuh
    const int a_row = (lane % 8) + ((lane / 8) % 2) * 8, a_col = (lane / 16) * 8;  // A / trans-B
    const int b_row = (lane % 8) + (lane / 16) * 8, b_col = ((lane / 8) % 2) * 8;  // B / trans-A

    for (int st = 0; st < nsteps; ++st) {
        const int buf = st & 1;
        if (st + 1 < nsteps) load_step(st + 1, buf ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();

        const i64 h = kvh * group + st / nmbs;
        const int mq0 = (mb_lo + st % nmbs) * BM;
        const bf16* sQb = sQ + buf * BM * LD;
        const bf16* sdOb = sdO + buf * BM * LD;
        const float* sLb = sL + buf * BM;
        const float* sDb = sD + buf * BM;

        // ---- Sᵀ = K_w·Qᵀ (16 keys × BM queries) ----
        float p[NT_S][4];
#pragma unroll
        for (int i = 0; i < NT_S; ++i)
#pragma unroll
            for (int c = 0; c < 4; ++c) p[i][c] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) {
            uint32_t ak[4];
            ldmatrix_x4(ak, smem_u32(sK + (warp * 16 + a_row) * LD + kk * 16 + a_col));
#pragma unroll
            for (int np = 0; np < BM / 16; ++np) {
                uint32_t bq[4];
                ldmatrix_x4(bq, smem_u32(sQb + (np * 16 + b_row) * LD + kk * 16 + b_col));
                mma_bf16_16816(p[2 * np], ak, bq[0], bq[1]);
                mma_bf16_16816(p[2 * np + 1], ak, bq[2], bq[3]);
            }
        }

        // ---- Pᵀ = exp(scale·S − lse), 0 where masked ----
        // element (nt, c): key = c < 2 ? key0 : key1, query = mq0 + nt·8 + 2tq + (c & 1)
        const bool need_mask = docb != nullptr || mq0 < kw0 + 15 || mq0 + BM > t;
#pragma unroll
        for (int nt = 0; nt < NT_S; ++nt) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int qc = nt * 8 + 2 * tq + (c & 1);
                const float e = exp2_approx(fmaf(p[nt][c], scale_log2, -sLb[qc] * kLog2e));
                bool ok = true;
                if (need_mask) {
                    const int key = c < 2 ? key0 : key1;
                    const int query = mq0 + qc;
                    ok = key <= query && query < t;
                    if (docb) ok = ok && sKdoc[key - n0] == sQdoc[buf * BM + qc];
                }
                p[nt][c] = ok ? e : 0.f;
            }
        }

        // ---- dV_w += Pᵀ·dO (k = queries) ----
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) {
            uint32_t a[4];
            a[0] = pack_bf16(p[2 * kk][0], p[2 * kk][1]);
            a[1] = pack_bf16(p[2 * kk][2], p[2 * kk][3]);
            a[2] = pack_bf16(p[2 * kk + 1][0], p[2 * kk + 1][1]);
            a[3] = pack_bf16(p[2 * kk + 1][2], p[2 * kk + 1][3]);
#pragma unroll
            for (int dp = 0; dp < HD / 16; ++dp) {
                uint32_t bo[4];
                ldmatrix_x4_trans(bo, smem_u32(sdOb + (kk * 16 + a_row) * LD + dp * 16 + a_col));
                mma_bf16_16816(dv_acc[2 * dp], a, bo[0], bo[1]);
                mma_bf16_16816(dv_acc[2 * dp + 1], a, bo[2], bo[3]);
            }
        }

        // ---- dPᵀ = V_w·dOᵀ (16 keys × BM queries) ----
        float ds[NT_S][4];
#pragma unroll
        for (int i = 0; i < NT_S; ++i)
#pragma unroll
            for (int c = 0; c < 4; ++c) ds[i][c] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) {
            uint32_t av[4];
            ldmatrix_x4(av, smem_u32(sV + (warp * 16 + a_row) * LD + kk * 16 + a_col));
#pragma unroll
            for (int np = 0; np < BM / 16; ++np) {
                uint32_t bo[4];
                ldmatrix_x4(bo, smem_u32(sdOb + (np * 16 + b_row) * LD + kk * 16 + b_col));
                mma_bf16_16816(ds[2 * np], av, bo[0], bo[1]);
                mma_bf16_16816(ds[2 * np + 1], av, bo[2], bo[3]);
            }
        }

        // ---- dSᵀ = Pᵀ ∘ (dPᵀ − D) ----
#pragma unroll
        for (int nt = 0; nt < NT_S; ++nt) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int qc = nt * 8 + 2 * tq + (c & 1);
                ds[nt][c] = p[nt][c] * (ds[nt][c] - sDb[qc]);
            }
        }

        // ---- dK_w += dSᵀ·Q (k = queries); dSᵀ (bf16) → shared memory for dQ ----
        bf16* sdSw = sdS + (warp * 16 + g) * LDS;  // row key0 − n0; row + 8: key1
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) {
            uint32_t a[4];
            a[0] = pack_bf16(ds[2 * kk][0], ds[2 * kk][1]);
            a[1] = pack_bf16(ds[2 * kk][2], ds[2 * kk][3]);
            a[2] = pack_bf16(ds[2 * kk + 1][0], ds[2 * kk + 1][1]);
            a[3] = pack_bf16(ds[2 * kk + 1][2], ds[2 * kk + 1][3]);
            // a[0]: (key0, queries 16kk + 2tq, +1)    a[1]: (key1, same)
            // a[2]: (key0, queries 16kk + 8 + 2tq, +1) a[3]: (key1, same)
            *reinterpret_cast<uint32_t*>(sdSw + kk * 16 + 2 * tq) = a[0];
            *reinterpret_cast<uint32_t*>(sdSw + 8 * LDS + kk * 16 + 2 * tq) = a[1];
            *reinterpret_cast<uint32_t*>(sdSw + kk * 16 + 8 + 2 * tq) = a[2];
            *reinterpret_cast<uint32_t*>(sdSw + 8 * LDS + kk * 16 + 8 + 2 * tq) = a[3];
#pragma unroll
            for (int dp = 0; dp < HD / 16; ++dp) {
                uint32_t bq[4];
                ldmatrix_x4_trans(bq, smem_u32(sQb + (kk * 16 + a_row) * LD + dp * 16 + a_col));
                mma_bf16_16816(dk_acc[2 * dp], a, bq[0], bq[1]);
                mma_bf16_16816(dk_acc[2 * dp + 1], a, bq[2], bq[3]);
            }
        }
        __syncthreads();  // dSᵀ of all warps is in shared memory

        // ---- dQ[BM × HD] += dS·K (k = the BN keys), units of 16 queries × 32 dims ----
        constexpr int DCH = HD / 32;
        constexpr int UNITS = (BM / 16) * DCH;
        for (int u = warp; u < UNITS; u += kWarps) {
            const int mt = u / DCH, dc = u % DCH;
            float acc[4][4];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int c = 0; c < 4; ++c) acc[i][c] = 0.f;
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                uint32_t a[4];  // A[m = query][k = key] = dSᵀ[key][query]: trans-A pattern
                ldmatrix_x4_trans(a, smem_u32(sdS + (kk * 16 + b_row) * LDS + mt * 16 + b_col));
#pragma unroll
                for (int dp = 0; dp < 2; ++dp) {
                    uint32_t bk[4];  // B[k = key][n = dim] = K[key][dim]: trans-B pattern
                    ldmatrix_x4_trans(bk, smem_u32(sK + (kk * 16 + a_row) * LD + dc * 32 +
                                                   dp * 16 + a_col));
                    mma_bf16_16816(acc[2 * dp], a, bk[0], bk[1]);
                    mma_bf16_16816(acc[2 * dp + 1], a, bk[2], bk[3]);
                }
            }
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int query = mq0 + mt * 16 + g + 8 * r;
                if (query < t) {
                    float* dst = dq_acc + ((b * T + query) * NH + h) * HD + dc * 32 + 2 * tq;
#pragma unroll
                    for (int nt = 0; nt < 4; ++nt) {
                        atomicAdd(dst + nt * 8, acc[nt][2 * r]);
                        atomicAdd(dst + nt * 8 + 1, acc[nt][2 * r + 1]);
                    }
                }
            }
        }
        __syncthreads();  // buffers `buf` and dSᵀ are free for the next step
    }
    cp_async_wait<0>();

    // ---- dK = scale·Σ dSᵀ·Q, dV = Σ Pᵀ·dO ----
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int key = r == 0 ? key0 : key1;
        if (key < t) {
            bf16* dkr = dk + ((b * T + key) * NKV + kvh) * HD;
            bf16* dvr = dv + ((b * T + key) * NKV + kvh) * HD;
#pragma unroll
            for (int dt = 0; dt < NT_D; ++dt) {
                *reinterpret_cast<uint32_t*>(dkr + dt * 8 + 2 * tq) =
                    pack_bf16(dk_acc[dt][2 * r] * scale, dk_acc[dt][2 * r + 1] * scale);
                *reinterpret_cast<uint32_t*>(dvr + dt * 8 + 2 * tq) =
                    pack_bf16(dv_acc[dt][2 * r], dv_acc[dt][2 * r + 1]);
            }
        }
    }
}
}  // namespace bwd

// engine/src/backend/cuda/attention.rs mirrors these byte counts (dynamic shared memory).
static_assert(fwd::Smem<64>::BYTES == 46592, "attention.rs fwd_smem_bytes(64)");
static_assert(fwd::Smem<128>::BYTES == 87552, "attention.rs fwd_smem_bytes(128)");
static_assert(bwd::Smem<64>::BYTES == 94208, "attention.rs bwd_smem_bytes(64)");
static_assert(bwd::Smem<128>::BYTES == 115968, "attention.rs bwd_smem_bytes(128)");

// ================================================================================================
// Naive kernels: one CTA of 128 threads per (row, head, batch); fp32 math; any hd ≤ 256.
// Scores are computed one warp per key (lanes across the head dimension), in chunks of 128 keys
// held in shared memory; each thread then owns head dims tid and tid + 128.
// ================================================================================================

namespace naive {
constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int CH = 128;       // keys (or queries) per chunk
constexpr int MAX_HD = 256;   // = 2 · kThreads

__device__ __forceinline__ float dot_lane(const float* sx, const bf16* __restrict__ y, int hd,
                                          int lane) {
    float acc = 0.f;
    for (int d = lane; d < hd; d += 32) acc += sx[d] * __bfloat162float(y[d]);
    return warp_sum(acc);
}

__device__ __forceinline__ void fwd(bf16* __restrict__ out, float* __restrict__ lse,
                                    const bf16* __restrict__ q, const bf16* __restrict__ k,
                                    const bf16* __restrict__ v, const int* __restrict__ doc, i64 T,
                                    i64 NH, i64 NKV, i64 HD, float scale) {
    __shared__ float sq[MAX_HD];
    __shared__ float sp[CH];
    __shared__ float s_m[kWarps], s_l[kWarps];
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const i64 i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const i64 kvh = h / (NH / NKV);
    const int hd = (int)HD;
    const bf16* qr = q + ((b * T + i) * NH + h) * HD;
    for (int d = tid; d < hd; d += kThreads) sq[d] = __bfloat162float(qr[d]);
    const int di = doc ? doc[b * T + i] : 0;
    __syncthreads();

    // pass 1: max and Σ exp of the allowed scaled scores, one (m, l) per warp, then combined
    float m = -CUDART_INF_F, l = 0.f;
    for (i64 j = warp; j <= i; j += kWarps) {
        if (doc && doc[b * T + j] != di) continue;  // warp-uniform
        const float s = dot_lane(sq, k + ((b * T + j) * NKV + kvh) * HD, hd, lane) * scale;
        const float mn = fmaxf(m, s);
        l = l * expf(m - mn) + expf(s - mn);
        m = mn;
    }
    if (lane == 0) {
        s_m[warp] = m;
        s_l[warp] = l;
    }
    __syncthreads();
    float M = -CUDART_INF_F;
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, s_m[w]);
    float L = 0.f;  // row i always allows j = i, so M is finite and L ≥ 1
    for (int w = 0; w < kWarps; ++w) L += s_l[w] * expf(s_m[w] - M);

    // pass 2: out = Σ_j (exp(s_j − M) / L) · v_j
    float acc[2] = {0.f, 0.f};
    for (i64 j0 = 0; j0 <= i; j0 += CH) {
        for (int jj = warp; jj < CH; jj += kWarps) {
            const i64 j = j0 + jj;
            float pj = 0.f;
            if (j <= i && (!doc || doc[b * T + j] == di)) {
                const float s =
                    dot_lane(sq, k + ((b * T + j) * NKV + kvh) * HD, hd, lane) * scale;
                pj = expf(s - M) / L;
            }
            if (lane == 0) sp[jj] = pj;
        }
        __syncthreads();
        const int n = (int)min((i64)CH, i + 1 - j0);
        for (int jj = 0; jj < n; ++jj) {
            const float pj = sp[jj];
            if (pj == 0.f) continue;  // CTA-uniform
            const bf16* vr = v + ((b * T + j0 + jj) * NKV + kvh) * HD;
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int d = tid + e * kThreads;
                if (d < hd) acc[e] += pj * __bfloat162float(vr[d]);
            }
        }
        __syncthreads();
    }
    bf16* orow = out + ((b * T + i) * NH + h) * HD;
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        const int d = tid + e * kThreads;
        if (d < hd) orow[d] = __float2bfloat16(acc[e]);
    }
    if (tid == 0) lse[(b * T + i) * NH + h] = M + logf(L);
}

// dq_i = scale · Σ_j P_ij (dP_ij − D_i) k_j,  P_ij = exp(scale·q_i·k_j − lse_i), dP_ij = dO_i·v_j
__device__ __forceinline__ void bwd_dq(bf16* __restrict__ dq, const bf16* __restrict__ dout,
                                       const bf16* __restrict__ q, const bf16* __restrict__ k,
                                       const bf16* __restrict__ v, const float* __restrict__ lse,
                                       const float* __restrict__ dsum, const int* __restrict__ doc,
                                       i64 T, i64 NH, i64 NKV, i64 HD, float scale) {
    __shared__ float sq[MAX_HD], sdo[MAX_HD];
    __shared__ float sds[CH];
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const i64 i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const i64 kvh = h / (NH / NKV);
    const int hd = (int)HD;
    const i64 row = (b * T + i) * NH + h;
    for (int d = tid; d < hd; d += kThreads) {
        sq[d] = __bfloat162float(q[row * HD + d]);
        sdo[d] = __bfloat162float(dout[row * HD + d]);
    }
    const float Li = lse[row], Di = dsum[row];
    const int di = doc ? doc[b * T + i] : 0;
    __syncthreads();

    float acc[2] = {0.f, 0.f};
    for (i64 j0 = 0; j0 <= i; j0 += CH) {
        for (int jj = warp; jj < CH; jj += kWarps) {
            const i64 j = j0 + jj;
            float dsj = 0.f;
            if (j <= i && (!doc || doc[b * T + j] == di)) {
                const i64 kv = ((b * T + j) * NKV + kvh) * HD;
                const float s = dot_lane(sq, k + kv, hd, lane) * scale;
                const float dp = dot_lane(sdo, v + kv, hd, lane);
                dsj = expf(s - Li) * (dp - Di);
            }
            if (lane == 0) sds[jj] = dsj;
        }
        __syncthreads();
        const int n = (int)min((i64)CH, i + 1 - j0);
        for (int jj = 0; jj < n; ++jj) {
            const float dsj = sds[jj];
            if (dsj == 0.f) continue;  // CTA-uniform
            const bf16* kr = k + ((b * T + j0 + jj) * NKV + kvh) * HD;
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int d = tid + e * kThreads;
                if (d < hd) acc[e] += dsj * __bfloat162float(kr[d]);
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        const int d = tid + e * kThreads;
        if (d < hd) dq[row * HD + d] = __float2bfloat16(acc[e] * scale);
    }
}

// For key j of kv head g: dv_j = Σ_{h in group} Σ_i P_ij dO_i;  dk_j = scale · Σ Σ dS_ij q_i
__device__ __forceinline__ void bwd_dkdv(bf16* __restrict__ dk, bf16* __restrict__ dv,
                                         const bf16* __restrict__ dout, const bf16* __restrict__ q,
                                         const bf16* __restrict__ k, const bf16* __restrict__ v,
                                         const float* __restrict__ lse,
                                         const float* __restrict__ dsum,
                                         const int* __restrict__ doc, i64 T, i64 NH, i64 NKV,
                                         i64 HD, float scale) {
    __shared__ float sk[MAX_HD], sv[MAX_HD];
    __shared__ float sp[CH], sds[CH];
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const i64 j = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
    const i64 group = NH / NKV;
    const int hd = (int)HD;
    const i64 krow = (b * T + j) * NKV + kvh;
    for (int d = tid; d < hd; d += kThreads) {
        sk[d] = __bfloat162float(k[krow * HD + d]);
        sv[d] = __bfloat162float(v[krow * HD + d]);
    }
    const int dj = doc ? doc[b * T + j] : 0;
    __syncthreads();

    float acck[2] = {0.f, 0.f}, accv[2] = {0.f, 0.f};
    for (i64 h = kvh * group; h < (kvh + 1) * group; ++h) {
        for (i64 i0 = j; i0 < T; i0 += CH) {
            for (int ii = warp; ii < CH; ii += kWarps) {
                const i64 i = i0 + ii;
                float pij = 0.f, dsij = 0.f;
                if (i < T && (!doc || doc[b * T + i] == dj)) {
                    const i64 row = (b * T + i) * NH + h;
                    const float s = dot_lane(sk, q + row * HD, hd, lane) * scale;
                    const float dp = dot_lane(sv, dout + row * HD, hd, lane);
                    pij = expf(s - lse[row]);
                    dsij = pij * (dp - dsum[row]);
                }
                if (lane == 0) {
                    sp[ii] = pij;
                    sds[ii] = dsij;
                }
            }
            __syncthreads();
            const int n = (int)min((i64)CH, T - i0);
            for (int ii = 0; ii < n; ++ii) {
                const float pij = sp[ii], dsij = sds[ii];
                if (pij == 0.f && dsij == 0.f) continue;  // CTA-uniform
                const i64 row = (b * T + i0 + ii) * NH + h;
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int d = tid + e * kThreads;
                    if (d < hd) {
                        accv[e] += pij * __bfloat162float(dout[row * HD + d]);
                        acck[e] += dsij * __bfloat162float(q[row * HD + d]);
                    }
                }
            }
            __syncthreads();
        }
    }
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        const int d = tid + e * kThreads;
        if (d < hd) {
            dk[krow * HD + d] = __float2bfloat16(acck[e] * scale);
            dv[krow * HD + d] = __float2bfloat16(accv[e]);
        }
    }
}
}  // namespace naive

// ================================================================================================
// Attention against a KV cache: one CTA of 8 warps per (query row r, head h), grid (b·tq, nh).
// Warp w takes keys w, w + 8, ...; lanes split the head dim (d = lane + 32e); online softmax per
// warp, then the 8 partial (m, l, o) are merged in shared memory. Any hd ≤ 256. Simple rather than
// fast: decode at long context would gain from splitting the keys over several CTAs
// (flash-decoding) and from serving the query heads of a KV group together.
// ================================================================================================

namespace cached {
constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int E = 8;  // head dims per lane (256 / 32)

__device__ __forceinline__ void kernel(bf16* __restrict__ out, const bf16* __restrict__ q,
                                       const bf16* __restrict__ kc, const bf16* __restrict__ vc,
                                       const int* __restrict__ qpos, i64 TQ, i64 TMAX, i64 NH,
                                       i64 NKV, i64 HD, float scale) {
    __shared__ float s_m[kWarps], s_l[kWarps];
    __shared__ float s_o[kWarps][E * 32];
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const i64 r = blockIdx.x, h = blockIdx.y;
    const i64 seq = r / TQ;
    const i64 kvh = h / (NH / NKV);
    const int hd = (int)HD;
    // positions 0..=p; p clamped to the cache (the CPU reference would index out of bounds)
    const i64 p = min((i64)qpos[r], TMAX - 1);

    const bf16* qr = q + (r * NH + h) * HD;
    float qv[E], o[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
        const int d = lane + 32 * e;
        qv[e] = d < hd ? __bfloat162float(qr[d]) : 0.f;
        o[e] = 0.f;
    }
    float m = -CUDART_INF_F, l = 0.f;
    const i64 base = seq * TMAX * NKV;  // row (seq, j) of the caches at (base + j·NKV + kvh)·HD
    // unrolled so that the loads of several keys are in flight together (decode is latency-bound)
#pragma unroll 4
    for (i64 j = warp; j <= p; j += kWarps) {
        const i64 off = ((base + j * NKV) + kvh) * HD;
        float s = 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) {
            const int d = lane + 32 * e;
            if (d < hd) s += qv[e] * __bfloat162float(kc[off + d]);
        }
        s = warp_sum(s) * scale;
        const float mn = fmaxf(m, s);
        const float alpha = expf(m - mn), pj = expf(s - mn);
        l = l * alpha + pj;
#pragma unroll
        for (int e = 0; e < E; ++e) {
            const int d = lane + 32 * e;
            if (d < hd) o[e] = o[e] * alpha + pj * __bfloat162float(vc[off + d]);
        }
        m = mn;
    }
    if (lane == 0) {
        s_m[warp] = m;
        s_l[warp] = l;
    }
#pragma unroll
    for (int e = 0; e < E; ++e) s_o[warp][lane + 32 * e] = o[e];
    __syncthreads();
    float M = -CUDART_INF_F;
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, s_m[w]);
    float L = 0.f;
    float f[kWarps];
    for (int w = 0; w < kWarps; ++w) {
        f[w] = s_m[w] == -CUDART_INF_F ? 0.f : expf(s_m[w] - M);
        L += s_l[w] * f[w];
    }
    const float inv = L > 0.f ? 1.f / L : 0.f;  // L = 0 only when qpos < 0: output zeros
    bf16* orow = out + (r * NH + h) * HD;
    for (int d = tid; d < hd; d += kThreads) {
        float acc = 0.f;
        for (int w = 0; w < kWarps; ++w) acc += s_o[w][d] * f[w];
        orow[d] = __float2bfloat16(acc * inv);
    }
}
}  // namespace cached

}  // namespace attn

// ================================================================================================
// Entry points. Arguments: outputs, inputs, then dims (long long) and the softmax scale.
// ================================================================================================

#define ATTN_FWD(HD)                                                                             \
    extern "C" __global__ void __launch_bounds__(attn::fwd::kThreads)                          \
        attention_fwd_bf16_hd##HD(bf16* out, float* lse, const bf16* q, const bf16* k,         \
                                  const bf16* v, const int* doc, i64 B, i64 T, i64 NH,         \
                                  i64 NKV, float scale) {                                      \
        attn::fwd::kernel<HD>(out, lse, q, k, v, doc, B, T, NH, NKV, scale);                    \
    }
ATTN_FWD(64)
ATTN_FWD(128)

#define ATTN_BWD(HD)                                                                             \
    extern "C" __global__ void __launch_bounds__(attn::bwd::kThreads, 1)                       \
        attention_bwd_bf16_hd##HD(float* dq_accum, bf16* dk, bf16* dv, const bf16* dout,       \
                                  const bf16* q, const bf16* k, const bf16* v,                 \
                                  const float* lse, const float* dsum, const int* doc, i64 B,  \
                                  i64 T, i64 NH, i64 NKV, float scale) {                       \
        attn::bwd::kernel<HD>(dq_accum, dk, dv, dout, q, k, v, lse, dsum, doc, B, T, NH, NKV,   \
                              scale);                                                           \
    }
ATTN_BWD(64)
ATTN_BWD(128)

// D[row] = Σ_d dout[row, d] · out[row, d] over rows = b·t·nh, one warp per row (256 threads).
extern "C" __global__ void __launch_bounds__(256)
    attention_bwd_preprocess_bf16(float* dsum, const bf16* dout, const bf16* out, i64 rows,
                                  i64 hd) {
    const i64 row = (i64)blockIdx.x * 8 + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const bf16* a = dout + row * hd;
    const bf16* o = out + row * hd;
    float acc = 0.f;
    for (i64 d = lane; d < hd; d += 32) acc += __bfloat162float(a[d]) * __bfloat162float(o[d]);
    acc = attn::warp_sum(acc);
    if (lane == 0) dsum[row] = acc;
}

// dq[i] = bf16(scale · dq_accum[i]), n elements, grid-stride.
extern "C" __global__ void __launch_bounds__(256)
    attention_bwd_dq_convert_bf16(bf16* dq, const float* dq_accum, i64 n, float scale) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (i64)gridDim.x * blockDim.x)
        dq[i] = __float2bfloat16(dq_accum[i] * scale);
}

// Grid (t, nh, b), 128 threads.
extern "C" __global__ void __launch_bounds__(attn::naive::kThreads)
    attention_fwd_naive_bf16(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                             const int* doc, i64 B, i64 T, i64 NH, i64 NKV, i64 HD, float scale) {
    attn::naive::fwd(out, lse, q, k, v, doc, T, NH, NKV, HD, scale);
}

// Grid (t, nh, b), 128 threads. Needs D from attention_bwd_preprocess_bf16.
extern "C" __global__ void __launch_bounds__(attn::naive::kThreads)
    attention_bwd_naive_dq_bf16(bf16* dq, const bf16* dout, const bf16* q, const bf16* k,
                                const bf16* v, const float* lse, const float* dsum,
                                const int* doc, i64 B, i64 T, i64 NH, i64 NKV, i64 HD,
                                float scale) {
    attn::naive::bwd_dq(dq, dout, q, k, v, lse, dsum, doc, T, NH, NKV, HD, scale);
}

// Grid (t, nkv, b), 128 threads. Needs D from attention_bwd_preprocess_bf16.
extern "C" __global__ void __launch_bounds__(attn::naive::kThreads)
    attention_bwd_naive_dkdv_bf16(bf16* dk, bf16* dv, const bf16* dout, const bf16* q,
                                  const bf16* k, const bf16* v, const float* lse,
                                  const float* dsum, const int* doc, i64 B, i64 T, i64 NH,
                                  i64 NKV, i64 HD, float scale) {
    attn::naive::bwd_dkdv(dk, dv, dout, q, k, v, lse, dsum, doc, T, NH, NKV, HD, scale);
}

// Grid (b·tq, nh), 256 threads.
extern "C" __global__ void __launch_bounds__(attn::cached::kThreads)
    attention_cached_bf16(bf16* out, const bf16* q, const bf16* kcache, const bf16* vcache,
                          const int* qpos, i64 B, i64 TQ, i64 TMAX, i64 NH, i64 NKV, i64 HD,
                          float scale) {
    attn::cached::kernel(out, q, kcache, vcache, qpos, TQ, TMAX, NH, NKV, HD, scale);
}
