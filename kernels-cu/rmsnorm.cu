// RMSNorm, per row of width h:  out = w * (x * rstd),  rstd = 1 / sqrt(mean(x^2) + eps).
//
// Forward: one block per row (grid-stride over rows), 256 threads. Bytes per element: read x,
// write out (2 + 2 B), w is cached; plus 4 B of rstd per row.
//
// Backward is fused with the residual add: dx ACCUMULATES (dx += d/dx), which is how the model
// sums the residual stream's gradient. The weight gradient is deterministic without atomics:
// block b reduces its fixed run of rows into a shared-memory partial (each column owned by one
// thread, rows in order) and writes it to part[b, h]; rmsnorm_dw_reduce then sums the partials
// in block order into dw (dw += sum). Bytes per element: read dout, x, dx; write dx (4 x 2 B).
#include "common.cuh"

// out[n, h], rstd[n] from x[n, h], w[h].  grid: any (<= n useful), block: 256.
extern "C" __global__ void __launch_bounds__(256)
    rmsnorm_fwd_bf16(bf16* out, float* rstd, const bf16* x, const bf16* w, int64_t n, int64_t h,
                     float eps) {
    __shared__ float sh[32];
    const bool vec = aligned16(out) && aligned16(x) && aligned16(w) && h % 8 == 0;
    for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
        const bf16* xr = x + r * h;
        bf16* orow = out + r * h;
        float ss = 0.f;
        row_read(xr, h, [&](int64_t, float v) { ss += v * v; });
        ss = block_sum(ss, sh);
        const float rs = 1.f / sqrtf(ss / (float)h + eps);
        if (threadIdx.x == 0) rstd[r] = rs;
        if (vec) {
            const int64_t hv = h / 8;
            for (int64_t i = threadIdx.x; i < hv; i += blockDim.x) {
                Pack8 px, pw, po;
                px.u = reinterpret_cast<const uint4*>(xr)[i];
                pw.u = reinterpret_cast<const uint4*>(w)[i];
#pragma unroll
                for (int k = 0; k < 8; k++) po.h[k] = f2bf(bf2f(pw.h[k]) * (bf2f(px.h[k]) * rs));
                reinterpret_cast<uint4*>(orow)[i] = po.u;
            }
        } else {
            for (int64_t j = threadIdx.x; j < h; j += blockDim.x)
                orow[j] = f2bf(bf2f(w[j]) * (bf2f(xr[j]) * rs));
        }
    }
}

// dx[n, h] += d/dx;  part[gridDim.x, h] = this block's share of d/dw, from dout[n, h], x[n, h],
// w[h], rstd[n]. Block b takes rows [b * rows_per_block, (b + 1) * rows_per_block).
// block: 256; dynamic shared memory: h * 4 bytes.
extern "C" __global__ void __launch_bounds__(256)
    rmsnorm_bwd_bf16(bf16* dx, float* part, const bf16* dout, const bf16* x, const bf16* w,
                     const float* rstd, int64_t n, int64_t h, int64_t rows_per_block) {
    DYNAMIC_SMEM(float4, dwp_storage);  // float4: 16-byte aligned for the vector path
    float* dwp = reinterpret_cast<float*>(dwp_storage);
    __shared__ float sh[32];
    const bool vec = aligned16(dx) && aligned16(dout) && aligned16(x) && aligned16(w) &&
                     aligned16(part) && h % 8 == 0;
    for (int64_t j = threadIdx.x; j < h; j += blockDim.x) dwp[j] = 0.f;
    const int64_t r0 = (int64_t)blockIdx.x * rows_per_block;
    const int64_t r1 = min(n, r0 + rows_per_block);
    const float inv_h = 1.f / (float)h;
    for (int64_t r = r0; r < r1; r++) {
        const bf16* dr = dout + r * h;
        const bf16* xr = x + r * h;
        bf16* dxr = dx + r * h;
        const float rs = rstd[r];
        float dot = 0.f;
        if (vec) {
            const int64_t hv = h / 8;
            for (int64_t i = threadIdx.x; i < hv; i += blockDim.x) {
                Pack8 pd, px, pw;
                pd.u = reinterpret_cast<const uint4*>(dr)[i];
                px.u = reinterpret_cast<const uint4*>(xr)[i];
                pw.u = reinterpret_cast<const uint4*>(w)[i];
#pragma unroll
                for (int k = 0; k < 8; k++)
                    dot += bf2f(pd.h[k]) * bf2f(pw.h[k]) * (bf2f(px.h[k]) * rs);
            }
        } else {
            for (int64_t j = threadIdx.x; j < h; j += blockDim.x)
                dot += bf2f(dr[j]) * bf2f(w[j]) * (bf2f(xr[j]) * rs);
        }
        const float mean = block_sum(dot, sh) * inv_h;
        if (vec) {
            const int64_t hv = h / 8;
            for (int64_t i = threadIdx.x; i < hv; i += blockDim.x) {
                Pack8 pd, px, pw, pdx;
                pd.u = reinterpret_cast<const uint4*>(dr)[i];
                px.u = reinterpret_cast<const uint4*>(xr)[i];
                pw.u = reinterpret_cast<const uint4*>(w)[i];
                pdx.u = reinterpret_cast<const uint4*>(dxr)[i];
                Pack4f a0, a1;
                a0.v = reinterpret_cast<float4*>(dwp)[2 * i];
                a1.v = reinterpret_cast<float4*>(dwp)[2 * i + 1];
#pragma unroll
                for (int k = 0; k < 8; k++) {
                    const float d = bf2f(pd.h[k]), xhat = bf2f(px.h[k]) * rs;
                    if (k < 4)
                        a0.f[k] += d * xhat;
                    else
                        a1.f[k - 4] += d * xhat;
                    pdx.h[k] = f2bf(bf2f(pdx.h[k]) + rs * (d * bf2f(pw.h[k]) - xhat * mean));
                }
                reinterpret_cast<float4*>(dwp)[2 * i] = a0.v;
                reinterpret_cast<float4*>(dwp)[2 * i + 1] = a1.v;
                reinterpret_cast<uint4*>(dxr)[i] = pdx.u;
            }
        } else {
            for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
                const float d = bf2f(dr[j]), xhat = bf2f(xr[j]) * rs;
                dwp[j] += d * xhat;
                dxr[j] = f2bf(bf2f(dxr[j]) + rs * (d * bf2f(w[j]) - xhat * mean));
            }
        }
    }
    // Each thread wrote only its own columns of dwp; the barrier is for the columns' new owners.
    __syncthreads();
    float* pr = part + (int64_t)blockIdx.x * h;
    for (int64_t j = threadIdx.x; j < h; j += blockDim.x) pr[j] = dwp[j];
}

// dw[h] += sum over p < nparts of part[p, h], in order of p (deterministic).
// grid: ceil(h / 256), block: 256.
extern "C" __global__ void __launch_bounds__(256)
    rmsnorm_dw_reduce(float* dw, const float* part, int64_t nparts, int64_t h) {
    for (int64_t j = global_tid(); j < h; j += global_stride()) {
        float acc = 0.f;
        for (int64_t p = 0; p < nparts; p++) acc += part[p * h + j];
        dw[j] += acc;
    }
}
