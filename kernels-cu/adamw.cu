// Fused AdamW over one contiguous run of parameters: one pass reads the f32 master weight,
// first and second moments and the f32 gradient, writes the three f32 states back and the bf16
// compute copy (shadow) of the new weight. The clip scale from the global gradient norm is folded
// in (g *= grad_scale). The arithmetic is ops::adamw's, operation for operation, with
// round-to-nearest intrinsics so nvcc cannot contract it into FMAs: the f32 result is bitwise the
// CPU's. Bias corrections (step_size = lr / (1 - beta1^t), bc2_sqrt = sqrt(1 - beta2^t)) and
// decay = 1 - lr * wd are computed on the host exactly as the CPU does.
//
// Bytes per element: read 4 x 4 B, write 3 x 4 B + 2 B (shadow) = 30 B.
#include "common.cuh"

struct AdamWArgs {
    float beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, bc2_sqrt,
        grad_scale;
};

__device__ __forceinline__ float adamw_one(float& p, float& m, float& v, float g,
                                           const AdamWArgs& a) {
    g = __fmul_rn(g, a.grad_scale);
    p = __fmul_rn(p, a.decay);
    m = __fadd_rn(__fmul_rn(a.beta1, m), __fmul_rn(a.one_minus_beta1, g));
    v = __fadd_rn(__fmul_rn(a.beta2, v), __fmul_rn(__fmul_rn(a.one_minus_beta2, g), g));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), a.bc2_sqrt), a.eps);
    p = __fsub_rn(p, __fdiv_rn(__fmul_rn(a.step_size, m), denom));
    return p;
}

// master[n], m[n], v[n] updated in place from g[n]; shadow[n] = bf16(master) unless shadow is
// null.  grid: any, block: 256.
extern "C" __global__ void __launch_bounds__(256)
    adamw_f32(float* master, bf16* shadow, float* m, float* v, const float* g, int64_t n,
              float beta1, float one_minus_beta1, float beta2, float one_minus_beta2, float eps,
              float decay, float step_size, float bc2_sqrt, float grad_scale) {
    const AdamWArgs a{beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size,
                      bc2_sqrt, grad_scale};
    int64_t start = 0;
    if (aligned16(master) && aligned16(m) && aligned16(v) && aligned16(g) &&
        (reinterpret_cast<uintptr_t>(shadow) & 7) == 0) {
        const int64_t nv = n / 4;
        for (int64_t i = global_tid(); i < nv; i += global_stride()) {
            Pack4f pp, pm, pv, pg;
            pp.v = reinterpret_cast<const float4*>(master)[i];
            pm.v = reinterpret_cast<const float4*>(m)[i];
            pv.v = reinterpret_cast<const float4*>(v)[i];
            pg.v = reinterpret_cast<const float4*>(g)[i];
#pragma unroll
            for (int k = 0; k < 4; k++) adamw_one(pp.f[k], pm.f[k], pv.f[k], pg.f[k], a);
            reinterpret_cast<float4*>(master)[i] = pp.v;
            reinterpret_cast<float4*>(m)[i] = pm.v;
            reinterpret_cast<float4*>(v)[i] = pv.v;
            if (shadow) {
                union {
                    uint2 u;
                    bf16 h[4];
                } s;
#pragma unroll
                for (int k = 0; k < 4; k++) s.h[k] = f2bf(pp.f[k]);
                reinterpret_cast<uint2*>(shadow)[i] = s.u;
            }
        }
        start = nv * 4;
    }
    for (int64_t i = start + global_tid(); i < n; i += global_stride()) {
        float p = master[i], mm = m[i], vv = v[i];
        adamw_one(p, mm, vv, g[i], a);
        master[i] = p;
        m[i] = mm;
        v[i] = vv;
        if (shadow) shadow[i] = f2bf(p);
    }
}
