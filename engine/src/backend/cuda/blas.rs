//! Matmuls through cuBLAS `cublasGemmEx` (which dispatches to cuBLASLt kernels): bf16 A and B,
//! f32 accumulation (`CUBLAS_COMPUTE_32F`), C in bf16 (activations) or f32 (weight gradients,
//! accumulated with beta = 1).
//!
//! Layouts are ops::matmul_*'s, row-major with Hugging Face's [out, in] weights. cuBLAS is
//! column-major, and a row-major [r, c] matrix is the column-major [c, r] matrix (its transpose)
//! with leading dimension c, so each row-major product is computed as its transpose:
//! - fwd:   out[n,o] = x[n,i] w[o,i]^T   <=>  out^T[o,n] = (w^T)^T[o,i] x^T[i,n]
//! - data:  dx[n,i]  = dy[n,o] w[o,i]    <=>  dx^T[i,n]  = w^T[i,o] dy^T[o,n]
//! - weight: dw[o,i] += dy^T[o,n] x[n,i] <=>  dw^T[i,o] += x^T[i,n] (dy^T[o,n])^T

use super::Cuda;
use crate::error::{Error, Result};
use cudarc::cublas::sys::{cublasComputeType_t, cublasOperation_t, cudaDataType};
use std::ffi::c_void;

const N: cublasOperation_t = cublasOperation_t::CUBLAS_OP_N;
const T: cublasOperation_t = cublasOperation_t::CUBLAS_OP_T;

/// One column-major GEMM, C (m x n) = op(A) op(B) + beta C, as cuBLAS takes it. Operands are
/// named by which row-major buffer they are; the three matmuls below only choose these fields,
/// so the CPU test at the end of this file can check the mapping against ops::matmul_*.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct GemmCall {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub beta: f32,
}

/// out[n, o] = x[n, i] · w[o, i]ᵀ: A = w, B = x, C = out.
pub(super) fn fwd_call(n: usize, i: usize, o: usize) -> GemmCall {
    GemmCall {
        trans_a: true,
        trans_b: false,
        m: o,
        n,
        k: i,
        lda: i,
        ldb: i,
        ldc: o,
        beta: 0.0,
    }
}

/// dx[n, i] (+)= dy[n, o] · w[o, i]: A = w, B = dy, C = dx.
pub(super) fn bwd_data_call(n: usize, i: usize, o: usize, accumulate: bool) -> GemmCall {
    let beta = if accumulate { 1.0 } else { 0.0 };
    GemmCall {
        trans_a: false,
        trans_b: false,
        m: i,
        n,
        k: o,
        lda: i,
        ldb: o,
        ldc: i,
        beta,
    }
}

/// dw[o, i] += dy[n, o]ᵀ · x[n, i]: A = x, B = dy, C = dw (f32).
pub(super) fn bwd_weight_call(n: usize, i: usize, o: usize) -> GemmCall {
    GemmCall {
        trans_a: false,
        trans_b: true,
        m: i,
        n: o,
        k: n,
        lda: i,
        ldb: o,
        ldc: i,
        beta: 1.0,
    }
}

fn gemm(cx: &Cuda, g: GemmCall, a: u64, b: u64, c: u64, c_f32: bool) -> Result<()> {
    let op = |t: bool| if t { T } else { N };
    gemm_raw(
        cx,
        (op(g.trans_a), op(g.trans_b)),
        (g.m, g.n, g.k),
        a,
        g.lda,
        b,
        g.ldb,
        c,
        g.ldc,
        c_f32,
        g.beta,
    )
}

/// C (m x n, col-major) = alpha op(A) op(B) + beta C with bf16 A/B, f32 compute.
#[allow(clippy::too_many_arguments)]
fn gemm_raw(
    cx: &Cuda,
    (ta, tb): (cublasOperation_t, cublasOperation_t),
    (m, n, k): (usize, usize, usize),
    a: u64,
    lda: usize,
    b: u64,
    ldb: usize,
    c: u64,
    ldc: usize,
    c_f32: bool,
    beta: f32,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let int = |x: usize, what: &str| {
        i32::try_from(x).map_err(|_| {
            Error::Shape(format!(
                "matmul {what} = {x} exceeds cuBLAS's 32-bit dimension limit"
            ))
        })
    };
    let (m, n, k) = (int(m, "m")?, int(n, "n")?, int(k, "k")?);
    let (lda, ldb, ldc) = (int(lda, "lda")?, int(ldb, "ldb")?, int(ldc, "ldc")?);
    let alpha = 1f32;
    cx.bind()?;
    let c_type = if c_f32 {
        cudaDataType::CUDA_R_32F
    } else {
        cudaDataType::CUDA_R_16BF
    };
    // SAFETY: the callers checked that A, B and C hold the m x k, k x n and m x n matrices
    // described by the leading dimensions; alpha and beta are host scalars (the handle's default
    // pointer mode) that outlive the call; the handle's stream is this backend's stream.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *cx.blas().handle(),
            ta,
            tb,
            m,
            n,
            k,
            &alpha as *const f32 as *const c_void,
            a as *const c_void,
            cudaDataType::CUDA_R_16BF,
            lda,
            b as *const c_void,
            cudaDataType::CUDA_R_16BF,
            ldb,
            &beta as *const f32 as *const c_void,
            c as *mut c_void,
            c_type,
            ldc,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cudarc::cublas::sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| cx.dev_err("cublasGemmEx", e))
}

/// out[n, o] = x[n, i] · w[o, i]ᵀ
pub(super) fn matmul_fwd(
    cx: &Cuda,
    out: u64,
    x: u64,
    w: u64,
    n: usize,
    i: usize,
    o: usize,
) -> Result<()> {
    gemm(cx, fwd_call(n, i, o), w, x, out, false)
}

/// dx[n, i] (+)= dy[n, o] · w[o, i]
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul_bwd_data(
    cx: &Cuda,
    dx: u64,
    dy: u64,
    w: u64,
    n: usize,
    i: usize,
    o: usize,
    accumulate: bool,
) -> Result<()> {
    gemm(cx, bwd_data_call(n, i, o, accumulate), w, dy, dx, false)
}

/// dw[o, i] += dy[n, o]ᵀ · x[n, i]  (dw f32)
pub(super) fn matmul_bwd_weight(
    cx: &Cuda,
    dw: u64,
    dy: u64,
    x: u64,
    n: usize,
    i: usize,
    o: usize,
) -> Result<()> {
    gemm(cx, bwd_weight_call(n, i, o), x, dy, dw, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// cuBLAS's semantics on the CPU: column-major, element (r, c) of an ld-strided matrix at
    /// r + c * ld; op(X) = Xᵀ when transposed.
    fn gemm_cm(g: GemmCall, a: &[f32], b: &[f32], c: &mut [f32]) {
        let at = |r: usize, cc: usize| {
            if g.trans_a {
                a[cc + r * g.lda]
            } else {
                a[r + cc * g.lda]
            }
        };
        let bt = |r: usize, cc: usize| {
            if g.trans_b {
                b[cc + r * g.ldb]
            } else {
                b[r + cc * g.ldb]
            }
        };
        for col in 0..g.n {
            for row in 0..g.m {
                let acc: f32 = (0..g.k).map(|p| at(row, p) * bt(p, col)).sum();
                let dst = &mut c[row + col * g.ldc];
                *dst = acc + g.beta * *dst;
            }
        }
    }

    fn vals(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|j| (((j * 7 + seed * 13) % 23) as f32 - 11.0) / 8.0)
            .collect()
    }

    fn close(a: &[f32], b: &[f32]) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
        }
    }

    /// The matmuls' cuBLAS parameters reproduce ops::matmul_* exactly (layouts, transposes,
    /// leading dimensions, accumulation) on odd shapes.
    #[test]
    fn gemm_calls_match_the_cpu_matmuls() {
        let (n, i, o) = (5, 7, 3);
        let x = vals(n * i, 1);
        let w = vals(o * i, 2);
        let dy = vals(n * o, 3);

        let mut want = vec![0f32; n * o];
        crate::ops::matmul_fwd(&mut want, &x, &w, n, i, o);
        let mut got = vec![0f32; n * o];
        gemm_cm(fwd_call(n, i, o), &w, &x, &mut got);
        close(&got, &want);

        for acc in [false, true] {
            let start = vals(n * i, 4);
            let mut want = start.clone();
            crate::ops::matmul_bwd_data(&mut want, &dy, &w, n, i, o, acc);
            let mut got = start.clone();
            gemm_cm(bwd_data_call(n, i, o, acc), &w, &dy, &mut got);
            close(&got, &want);
        }

        let start = vals(o * i, 5);
        let mut want = start.clone();
        crate::ops::matmul_bwd_weight(&mut want, &dy, &x, n, i, o);
        let mut got = start;
        gemm_cm(bwd_weight_call(n, i, o), &x, &dy, &mut got);
        close(&got, &want);
    }
}
