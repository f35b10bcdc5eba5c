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

/// C (m x n, col-major) = alpha op(A) op(B) + beta C with bf16 A/B, f32 compute.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm(
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
    gemm(cx, (T, N), (o, n, i), w, i, x, i, out, o, false, 0.0)
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
    let beta = if accumulate { 1.0 } else { 0.0 };
    gemm(cx, (N, N), (i, n, o), w, i, dy, o, dx, i, false, beta)
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
    gemm(cx, (N, T), (i, o, n), x, i, dy, o, dw, i, true, 1.0)
}
