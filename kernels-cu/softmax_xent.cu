// Cross-entropy fused with softmax, and per-token log-probabilities (policy gradients), over
// bf16 logits [n, V]. One block per row (grid-stride over rows), 1024 threads; the row's
// statistics (max, sum of exp, and for the entropy sum of exp * (x - max)) are accumulated online
// in one read, combined deterministically across the block. Probabilities are never stored: the
// backward re-reads the row once for its statistics and once to write the gradient in place.
// Ignore index: any negative target (the model uses -100).
//
// Bytes per element: forward 2 B (read logits); backward 2 + 2 + 2 B (read twice, write once).
#include "common.cuh"

__device__ __forceinline__ SoftStats row_stats(const bf16* row, int64_t V, SoftStats* sh) {
    SoftStats st = soft_empty();
    row_read(row, V, [&](int64_t, float x) { soft_push(st, x); });
    return block_soft(st, sh);
}

// losses[n] = logsumexp(logits[n, :]) - logits[n, target[n]]  (0 where target < 0).
// grid: any, block: 1024.
extern "C" __global__ void __launch_bounds__(1024)
    cross_entropy_fwd_bf16(float* losses, const bf16* logits, const int32_t* targets, int64_t n,
                           int64_t V) {
    __shared__ SoftStats sh[32];
    for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
        const int32_t tg = targets[r];
        if (tg < 0) {
            if (threadIdx.x == 0) losses[r] = 0.f;
            continue;  // uniform across the block: no barrier is skipped by some threads only
        }
        const bf16* row = logits + r * V;
        const SoftStats st = row_stats(row, V, sh);
        if (threadIdx.x == 0) losses[r] = st.m + logf(st.s) - bf2f(row[tg]);
    }
}

// dlogits[n, V] in place (holds the logits on entry): (softmax - onehot(target)) * scale,
// zero rows where target < 0.  grid: any, block: 1024.
extern "C" __global__ void __launch_bounds__(1024)
    cross_entropy_bwd_bf16(bf16* dlogits, const int32_t* targets, int64_t n, int64_t V,
                           float scale) {
    __shared__ SoftStats sh[32];
    for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
        const int32_t tg = targets[r];
        bf16* row = dlogits + r * V;
        if (tg < 0) {
            row_update(row, V, [&](int64_t, float) { return 0.f; });
            continue;
        }
        const SoftStats st = row_stats(row, V, sh);
        __syncthreads();  // every thread has its statistics before the row is overwritten
        const float inv = scale / st.s;
        const float m = st.m;
        row_update(row, V, [&](int64_t i, float x) {
            const float p = expf(x - m) * inv;
            return i == tg ? p - scale : p;
        });
    }
}

// out_logp[n] = log softmax(logits[n, :])[target[n]], out_entropy[n] = -sum p log p of the row;
// both 0 where target < 0.  grid: any, block: 1024.
extern "C" __global__ void __launch_bounds__(1024)
    logprob_fwd_bf16(float* out_logp, float* out_entropy, const bf16* logits,
                     const int32_t* targets, int64_t n, int64_t V) {
    __shared__ SoftStats sh[32];
    for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
        const int32_t tg = targets[r];
        if (tg < 0) {
            if (threadIdx.x == 0) {
                out_logp[r] = 0.f;
                out_entropy[r] = 0.f;
            }
            continue;
        }
        const bf16* row = logits + r * V;
        const SoftStats st = row_stats(row, V, sh);
        if (threadIdx.x == 0) {
            const float lse = logf(st.s);  // relative to the max
            out_logp[r] = bf2f(row[tg]) - st.m - lse;
            out_entropy[r] = lse - st.sx / st.s;
        }
    }
}

// dlogits[n, V] in place: weights[n] * (onehot(target) - softmax(logits[n])), the gradient of
// sum_n weights[n] * logp_n; zero rows where target < 0 or the weight is 0.
// grid: any, block: 1024.
extern "C" __global__ void __launch_bounds__(1024)
    logprob_bwd_bf16(bf16* dlogits, const int32_t* targets, const float* weights, int64_t n,
                     int64_t V) {
    __shared__ SoftStats sh[32];
    for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
        const int32_t tg = targets[r];
        const float w = weights[r];
        bf16* row = dlogits + r * V;
        if (tg < 0 || w == 0.f) {
            row_update(row, V, [&](int64_t, float) { return 0.f; });
            continue;
        }
        const SoftStats st = row_stats(row, V, sh);
        __syncthreads();
        const float inv = -w / st.s;
        const float m = st.m;
        row_update(row, V, [&](int64_t i, float x) {
            const float p = expf(x - m) * inv;
            return i == tg ? p + w : p;
        });
    }
}
