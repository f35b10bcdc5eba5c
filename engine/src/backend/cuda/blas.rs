//! Matmuls through cuBLASLt `cublasLtMatmul`: bf16 A and B, f32 accumulation
//! (`CUBLAS_COMPUTE_32F`, f32 alpha/beta), C = D in bf16 (activations) or f32 (weight gradients,
//! accumulated with beta = 1). `LLAMA2_GEMM=cublas` selects the previous path, cuBLAS
//! `cublasGemmEx` (same types, same layouts); a shape for which cuBLASLt's heuristic finds no
//! algorithm falls back to it too (one warning per shape).
//!
//! Layouts are ops::matmul_*'s, row-major with Hugging Face's [out, in] weights. cuBLAS is
//! column-major, and a row-major [r, c] matrix is the column-major [c, r] matrix (its transpose)
//! with leading dimension c, so each row-major product is computed as its transpose:
//! - fwd:   out[n,o] = x[n,i] w[o,i]^T   <=>  out^T[o,n] = (w^T)^T[o,i] x^T[i,n]
//! - data:  dx[n,i]  = dy[n,o] w[o,i]    <=>  dx^T[i,n]  = w^T[i,o] dy^T[o,n]
//! - weight: dw[o,i] += dy^T[o,n] x[n,i] <=>  dw^T[i,o] += x^T[i,n] (dy^T[o,n])^T
//!
//! [`GemmCall`] is that column-major call as GemmEx takes it; [`lt_shape`] turns it into
//! cuBLASLt's form (each operand's stored rows, cols, leading dimension and order, plus the
//! transposes). Both are pure and checked on the CPU by the tests at the end of this file.
//!
//! cuBLASLt state ([`Lt`]): one handle and one 32 MiB workspace per backend, and per
//! (layouts, transposes, C dtype, operand alignments) a cached [`LtPlan`] (matmul descriptor,
//! three layouts, the heuristic's algorithm), so the heuristic runs once per shape and a call
//! on a known shape allocates nothing. Everything runs on the backend's one stream, so the
//! shared workspace is never used by two matmuls at once.

use super::Cuda;
use crate::error::{Error, Result};
use cudarc::cublas::sys::{cublasComputeType_t, cublasOperation_t, cudaDataType};
use cudarc::cublaslt::result::CublasError;
use cudarc::cublaslt::sys as lt_sys;
use cudarc::driver::{CudaSlice, CudaStream};
use std::collections::HashMap;
use std::ffi::c_void;
use std::fmt;
use std::sync::{Arc, Mutex};

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

/// One stored matrix as a cuBLASLt layout descriptor takes it: `rows` x `cols` elements with
/// leading dimension `ld` in `order` (column-major: element (r, c) at r + c·ld).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct LtLayout {
    pub rows: u64,
    pub cols: u64,
    pub ld: i64,
    pub order: lt_sys::cublasLtOrder_t,
}

/// One `cublasLtMatmul`, D = op(A) op(B) + beta C with D = C (same buffer, same layout): the
/// stored layouts of A, B and C and the transposes. m = c.rows, n = c.cols, k = op(A)'s cols.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct LtShape {
    pub trans_a: bool,
    pub trans_b: bool,
    pub a: LtLayout,
    pub b: LtLayout,
    pub c: LtLayout,
}

impl fmt::Display for LtShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = |x: &LtLayout| format!("{}x{} ld {}", x.rows, x.cols, x.ld);
        let t = |x: bool| if x { "T" } else { "N" };
        write!(
            f,
            "A {} op {}, B {} op {}, C {}",
            l(&self.a),
            t(self.trans_a),
            l(&self.b),
            t(self.trans_b),
            l(&self.c)
        )
    }
}

/// The GemmEx call `g` in cuBLASLt's terms. cuBLASLt describes each operand as stored (before
/// its transpose), so A is k x m when transposed and m x k otherwise, B is n x k or k x n, and C
/// is m x n; all column-major with GemmEx's leading dimensions.
pub(super) fn lt_shape(g: GemmCall) -> LtShape {
    let (m, n, k) = (g.m as u64, g.n as u64, g.k as u64);
    let col = |rows: u64, cols: u64, ld: usize| LtLayout {
        rows,
        cols,
        ld: ld as i64,
        order: lt_sys::cublasLtOrder_t::CUBLASLT_ORDER_COL,
    };
    LtShape {
        trans_a: g.trans_a,
        trans_b: g.trans_b,
        a: if g.trans_a {
            col(k, m, g.lda)
        } else {
            col(m, k, g.lda)
        },
        b: if g.trans_b {
            col(n, k, g.ldb)
        } else {
            col(k, n, g.ldb)
        },
        c: col(m, n, g.ldc),
    }
}

/// The alignment cuBLASLt may assume for a device pointer: its largest power-of-two divisor,
/// capped at 256 bytes (the heuristic's default assumption, which sub-views at odd offsets break).
pub(super) fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        (1u64 << ptr.trailing_zeros().min(8)) as u32
    }
}

/// Which GEMM library the matmuls use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum GemmPath {
    /// `cublasLtMatmul` (the default).
    Lt,
    /// `cublasGemmEx`.
    GemmEx,
}

/// The environment variable that selects [`GemmPath`] (read once, when the backend opens).
pub(super) const GEMM_ENV: &str = "LLAMA2_GEMM";

/// `LLAMA2_GEMM`'s value: unset, empty or `cublaslt` for cuBLASLt, `cublas` for cublasGemmEx.
pub(super) fn gemm_path(value: Option<&str>) -> Result<GemmPath> {
    match value.map(str::trim) {
        None | Some("") => Ok(GemmPath::Lt),
        Some(v) if v.eq_ignore_ascii_case("cublaslt") => Ok(GemmPath::Lt),
        Some(v) if v.eq_ignore_ascii_case("cublas") => Ok(GemmPath::GemmEx),
        Some(v) => Err(Error::Config(format!(
            "{GEMM_ENV}={v:?}: expected `cublaslt` (the default: cublasLtMatmul) or `cublas` \
             (cublasGemmEx)"
        ))),
    }
}

/// Which matmul a GEMM computes, in ops::matmul_*'s dimensions (for messages).
#[derive(Clone, Copy, Debug)]
pub(super) struct Op {
    name: &'static str,
    n: usize,
    i: usize,
    o: usize,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Op { name, n, i, o } = *self;
        write!(f, "{name} (n={n}, i={i}, o={o})")
    }
}

fn gemm(cx: &Cuda, op: Op, g: GemmCall, a: u64, b: u64, c: u64, c_f32: bool) -> Result<()> {
    if g.m == 0 || g.n == 0 {
        return Ok(());
    }
    if cx.is_dry_run() {
        // A dry run checks kernel launches only; cuBLAS is not emulated.
        return Ok(());
    }
    // k = 0 (C = beta C) goes to GemmEx, which defines it; cuBLASLt layouts need rows, cols ≥ 1.
    if let (Some(lt), true) = (cx.lt(), g.k > 0) {
        if lt.matmul(cx, op, g, a, b, c, c_f32)? {
            return Ok(());
        }
    }
    let op_of = |t: bool| if t { T } else { N };
    gemm_ex(
        cx,
        op,
        (op_of(g.trans_a), op_of(g.trans_b)),
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

/// C (m x n, col-major) = alpha op(A) op(B) + beta C with bf16 A/B, f32 compute (cublasGemmEx).
#[allow(clippy::too_many_arguments)]
fn gemm_ex(
    cx: &Cuda,
    op: Op,
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
                "{op}: cublasGemmEx {what} = {x} exceeds cuBLAS's 32-bit dimension limit"
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
    .map_err(|e| {
        cx.dev_err(
            &format!(
                "cublasGemmEx for {op} (m={m} n={n} k={k} lda={lda} ldb={ldb} ldc={ldc}, C {})",
                if c_f32 { "f32" } else { "bf16" }
            ),
            e,
        )
    })
}

/// cuBLASLt's workspace: 32 MiB, NVIDIA's recommendation for Hopper (cublasSetWorkspace).
pub(super) const LT_WORKSPACE_BYTES: usize = 32 << 20;

/// A cuBLASLt handle, destroyed on drop.
struct LtHandle(lt_sys::cublasLtHandle_t);

impl LtHandle {
    fn new() -> Result<Self, CublasError> {
        cudarc::cublaslt::result::create_handle().map(LtHandle)
    }
}

impl Drop for LtHandle {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtCreate in `new` and destroyed only here. A failure is not
        // actionable in drop, so it is ignored.
        let _ = unsafe { cudarc::cublaslt::result::destroy_handle(self.0) };
    }
}

/// A matmul descriptor: f32 compute and scale, the given transposes; destroyed on drop.
struct MatmulDesc(lt_sys::cublasLtMatmulDesc_t);

impl MatmulDesc {
    fn new(trans_a: bool, trans_b: bool) -> Result<Self, CublasError> {
        let desc = MatmulDesc(cudarc::cublaslt::result::create_matmul_desc(
            lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            lt_sys::cudaDataType::CUDA_R_32F,
        )?);
        for (attr, t) in [
            (
                lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                trans_a,
            ),
            (
                lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                trans_b,
            ),
        ] {
            // The attribute is an int32_t holding a cublasOperation_t.
            let v: i32 = if t { T as i32 } else { N as i32 };
            // SAFETY: `desc` is live; the buffer is an i32 of the size passed, read during the
            // call only.
            unsafe {
                cudarc::cublaslt::result::set_matmul_desc_attribute(
                    desc.0,
                    attr,
                    &v as *const i32 as *const c_void,
                    std::mem::size_of::<i32>(),
                )
            }?;
        }
        Ok(desc)
    }
}

impl Drop for MatmulDesc {
    fn drop(&mut self) {
        // SAFETY: created in `new` and destroyed only here; errors are ignored in drop.
        let _ = unsafe { cudarc::cublaslt::result::destroy_matmul_desc(self.0) };
    }
}

/// A matrix layout descriptor, destroyed on drop.
struct Layout(lt_sys::cublasLtMatrixLayout_t);

impl Layout {
    fn new(ty: lt_sys::cudaDataType, l: LtLayout) -> Result<Self, CublasError> {
        let layout = Layout(cudarc::cublaslt::result::create_matrix_layout(
            ty, l.rows, l.cols, l.ld,
        )?);
        // The attribute is an int32_t holding a cublasLtOrder_t (column-major is the default;
        // set anyway so the layout is exactly `l`).
        let order = l.order as i32;
        // SAFETY: `layout` is live; the buffer is an i32 of the size passed, read during the
        // call only.
        unsafe {
            cudarc::cublaslt::result::set_matrix_layout_attribute(
                layout.0,
                lt_sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_ORDER,
                &order as *const i32 as *const c_void,
                std::mem::size_of::<i32>(),
            )
        }?;
        Ok(layout)
    }
}

impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created in `new` and destroyed only here; errors are ignored in drop.
        let _ = unsafe { cudarc::cublaslt::result::destroy_matrix_layout(self.0) };
    }
}

/// Heuristic search preferences (workspace limit, operand alignments), destroyed on drop.
struct Pref(lt_sys::cublasLtMatmulPreference_t);

impl Pref {
    fn new(workspace: usize, align: [u32; 3]) -> Result<Self, CublasError> {
        use lt_sys::cublasLtMatmulPreferenceAttributes_t as P;
        let pref = Pref(cudarc::cublaslt::result::create_matmul_pref()?);
        let ws = workspace as u64;
        // SAFETY: `pref` is live; the buffer is a u64 (the attribute's uint64_t), read during the
        // call only.
        unsafe {
            cudarc::cublaslt::result::set_matmul_pref_attribute(
                pref.0,
                P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                std::mem::size_of::<u64>(),
            )
        }?;
        let [a, b, c] = align;
        for (attr, v) in [
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, a),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, b),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, c),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, c),
        ] {
            // SAFETY: as above, with a u32 (the attributes' uint32_t).
            unsafe {
                cudarc::cublaslt::result::set_matmul_pref_attribute(
                    pref.0,
                    attr,
                    &v as *const u32 as *const c_void,
                    std::mem::size_of::<u32>(),
                )
            }?;
        }
        Ok(pref)
    }
}

impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created in `new` and destroyed only here; errors are ignored in drop.
        let _ = unsafe { cudarc::cublaslt::result::destroy_matmul_pref(self.0) };
    }
}

/// What a cached plan is keyed by: everything the descriptors and the heuristic depend on
/// (alpha and beta are passed per call and do not change the algorithm).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct LtKey {
    shape: LtShape,
    c_f32: bool,
    /// Alignments of A, B and C (= D) in bytes, see [`alignment`].
    align: [u32; 3],
}

/// The descriptors of one shape and the algorithm the heuristic chose for them.
struct LtPlan {
    desc: MatmulDesc,
    a: Layout,
    b: Layout,
    c: Layout,
    algo: lt_sys::cublasLtMatmulAlgo_t,
}

impl LtPlan {
    /// Builds the descriptors for `key` and asks the heuristic for its best algorithm; None when
    /// it has none (no heuristic for the configuration, or zero results). Errors name the call.
    fn new(handle: &LtHandle, key: &LtKey) -> Result<Option<LtPlan>, String> {
        let at = |call: &'static str| move |e: CublasError| format!("{call}: {e}");
        let bf16 = lt_sys::cudaDataType::CUDA_R_16BF;
        let c_type = if key.c_f32 {
            lt_sys::cudaDataType::CUDA_R_32F
        } else {
            bf16
        };
        let desc = MatmulDesc::new(key.shape.trans_a, key.shape.trans_b)
            .map_err(at("cublasLtMatmulDescCreate/SetAttribute"))?;
        let a = Layout::new(bf16, key.shape.a).map_err(at("cublasLtMatrixLayoutCreate (A)"))?;
        let b = Layout::new(bf16, key.shape.b).map_err(at("cublasLtMatrixLayoutCreate (B)"))?;
        let c = Layout::new(c_type, key.shape.c).map_err(at("cublasLtMatrixLayoutCreate (C)"))?;
        let pref = Pref::new(LT_WORKSPACE_BYTES, key.align)
            .map_err(at("cublasLtMatmulPreferenceCreate/SetAttribute"))?;
        let mut result = std::mem::MaybeUninit::<lt_sys::cublasLtMatmulHeuristicResult_t>::zeroed();
        let mut count: std::ffi::c_int = 0;
        // SAFETY: every descriptor is live for the call; C's layout is also D's (in place);
        // `result` has room for the one result requested and `count` receives how many were
        // written.
        let status = unsafe {
            lt_sys::cublasLtMatmulAlgoGetHeuristic(
                handle.0,
                desc.0,
                a.0,
                b.0,
                c.0,
                c.0,
                pref.0,
                1,
                result.as_mut_ptr(),
                &mut count,
            )
        };
        match status {
            lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS => {}
            // NVIDIA: "no heuristic function available for current configuration".
            lt_sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED => return Ok(None),
            s => return Err(format!("cublasLtMatmulAlgoGetHeuristic: {s:?}")),
        }
        if count < 1 {
            return Ok(None);
        }
        // SAFETY: the call succeeded and wrote `count` ≥ 1 results (and the buffer was zeroed).
        let result = unsafe { result.assume_init() };
        if result.state != lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Ok(None);
        }
        Ok(Some(LtPlan {
            desc,
            a,
            b,
            c,
            algo: result.algo,
        }))
    }
}

/// Cached plans (None: the heuristic had no algorithm, so the shape uses GemmEx) and the handle
/// they run with. Only used under [`Lt`]'s mutex.
struct LtState {
    plans: HashMap<LtKey, Option<LtPlan>>,
    handle: LtHandle,
}

// SAFETY: the cuBLASLt handle and descriptors are host-side objects that are not tied to the
// thread that created them; `LtState` is only reached through `Lt`'s mutex, so no two threads use
// them at once.
unsafe impl Send for LtState {}

/// The backend's cuBLASLt state: the handle, the plan cache and the workspace.
pub(super) struct Lt {
    state: Mutex<LtState>,
    /// Owns the workspace ([`LT_WORKSPACE_BYTES`]); `workspace_ptr` is its address.
    _workspace: CudaSlice<u8>,
    workspace_ptr: u64,
}

impl Lt {
    /// The cuBLASLt state for the backend on `stream`, or None when `LLAMA2_GEMM=cublas` asks for
    /// cublasGemmEx (or libcublasLt is missing: then a warning, and GemmEx).
    pub(super) fn from_env(stream: &Arc<CudaStream>, ordinal: usize) -> Result<Option<Lt>> {
        let path = gemm_path(std::env::var(GEMM_ENV).ok().as_deref())?;
        if path == GemmPath::GemmEx {
            return Ok(None);
        }
        // SAFETY: only tries to dlopen libcublasLt.
        if !unsafe { lt_sys::is_culib_present() } {
            eprintln!(
                "warning: cuda:{ordinal}: libcublasLt was not found; matmuls use cublasGemmEx \
                 (set {GEMM_ENV}=cublas to silence this)"
            );
            return Ok(None);
        }
        let err = |what: &str, e: &dyn fmt::Display| {
            Error::Device(format!("cuda:{ordinal}: cuBLASLt: {what}: {e}"))
        };
        let handle = LtHandle::new().map_err(|e| err("cublasLtCreate", &e))?;
        let workspace = stream
            .alloc_zeros::<u8>(LT_WORKSPACE_BYTES)
            .map_err(|e| err("allocating the 32 MiB workspace", &e))?;
        let workspace_ptr = super::device::raw_ptr(&workspace, stream);
        Ok(Some(Lt {
            state: Mutex::new(LtState {
                plans: HashMap::new(),
                handle,
            }),
            _workspace: workspace,
            workspace_ptr,
        }))
    }

    /// Runs `g` through cublasLtMatmul; Ok(false) when cuBLASLt has no algorithm for the shape
    /// (the caller then uses GemmEx). The first call on a shape builds and caches its plan.
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &self,
        cx: &Cuda,
        op: Op,
        g: GemmCall,
        a: u64,
        b: u64,
        c: u64,
        c_f32: bool,
    ) -> Result<bool> {
        let key = LtKey {
            shape: lt_shape(g),
            c_f32,
            align: [alignment(a), alignment(b), alignment(c)],
        };
        let shape_err = |call: &str, e: &dyn fmt::Display| {
            cx.dev_err(
                &format!(
                    "{call} for {op} [{}, C {}, alignments {:?}]",
                    key.shape,
                    if c_f32 { "f32" } else { "bf16" },
                    key.align
                ),
                e,
            )
        };
        cx.bind()?;
        let mut guard = self.state.lock().unwrap();
        let state = &mut *guard;
        if !state.plans.contains_key(&key) {
            let plan =
                LtPlan::new(&state.handle, &key).map_err(|e| shape_err("cuBLASLt setup", &e))?;
            if plan.is_none() {
                eprintln!(
                    "warning: cuda:{}: cuBLASLt's heuristic found no algorithm for {op} [{}, C \
                     {}]; this shape uses cublasGemmEx",
                    cx.ordinal(),
                    key.shape,
                    if c_f32 { "f32" } else { "bf16" }
                );
            }
            state.plans.insert(key, plan);
        }
        let Some(Some(plan)) = state.plans.get(&key) else {
            return Ok(false);
        };
        let (alpha, beta) = (1f32, g.beta);
        // SAFETY: the callers checked that A, B and C hold the matrices `key.shape` describes
        // (the same extents as the GemmEx call); the plan's descriptors are live and were built
        // for this key, C's layout serves as D's (in place, as cuBLASLt requires: same buffer,
        // same layout); alpha and beta are host f32 (the default pointer mode, f32 scale type)
        // that outlive the call; the workspace is LT_WORKSPACE_BYTES of device memory owned by
        // `self`, used only by work on this one stream, which runs in order.
        unsafe {
            lt_sys::cublasLtMatmul(
                state.handle.0,
                plan.desc.0,
                &alpha as *const f32 as *const c_void,
                a as *const c_void,
                plan.a.0,
                b as *const c_void,
                plan.b.0,
                &beta as *const f32 as *const c_void,
                c as *const c_void,
                plan.c.0,
                c as *mut c_void,
                plan.c.0,
                &plan.algo,
                self.workspace_ptr as *mut c_void,
                LT_WORKSPACE_BYTES,
                cx.stream().cu_stream() as lt_sys::cudaStream_t,
            )
        }
        .result()
        .map_err(|e| shape_err("cublasLtMatmul", &e))?;
        Ok(true)
    }
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
    let op = Op {
        name: "matmul_fwd",
        n,
        i,
        o,
    };
    gemm(cx, op, fwd_call(n, i, o), w, x, out, false)
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
    let op = Op {
        name: "matmul_bwd_data",
        n,
        i,
        o,
    };
    gemm(cx, op, bwd_data_call(n, i, o, accumulate), w, dy, dx, false)
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
    let op = Op {
        name: "matmul_bwd_weight",
        n,
        i,
        o,
    };
    gemm(cx, op, bwd_weight_call(n, i, o), x, dy, dw, true)
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

    /// cublasLtMatmul's semantics on the CPU, D = C = op(A) op(B) + beta C, reading each operand
    /// only through its layout (rows, cols, ld, order) and rejecting what cuBLASLt rejects:
    /// op(A), op(B) and C of mismatched sizes, a leading dimension shorter than a row or column,
    /// and a layout reaching past its buffer.
    fn lt_matmul_cpu(s: LtShape, beta: f32, a: &[f32], b: &[f32], c: &mut [f32]) {
        use lt_sys::cublasLtOrder_t::{CUBLASLT_ORDER_COL, CUBLASLT_ORDER_ROW};
        let index = |l: LtLayout, len: usize| {
            let (rows, cols, ld) = (l.rows as usize, l.cols as usize, l.ld as usize);
            assert!(rows > 0 && cols > 0, "empty layout {l:?}");
            let (inner, outer) = match l.order {
                CUBLASLT_ORDER_COL => (rows, cols),
                CUBLASLT_ORDER_ROW => (cols, rows),
                o => panic!("order {o:?} is not emulated"),
            };
            assert!(ld >= inner, "ld {ld} shorter than {inner} in {l:?}");
            assert!(
                (outer - 1) * ld + inner <= len,
                "{l:?} reaches past {len} elements"
            );
            move |r: usize, cc: usize| match l.order {
                CUBLASLT_ORDER_COL => r + cc * ld,
                _ => r * ld + cc,
            }
        };
        let (ia, ib, ic) = (
            index(s.a, a.len()),
            index(s.b, b.len()),
            index(s.c, c.len()),
        );
        let dims = |l: LtLayout, t: bool| {
            let (r, cc) = (l.rows as usize, l.cols as usize);
            if t {
                (cc, r)
            } else {
                (r, cc)
            }
        };
        let (m, n) = (s.c.rows as usize, s.c.cols as usize);
        let (am, ak) = dims(s.a, s.trans_a);
        let (bk, bn) = dims(s.b, s.trans_b);
        assert_eq!(
            (am, bn, ak),
            (m, n, bk),
            "op(A) {am}x{ak}, op(B) {bk}x{bn}, C {m}x{n}"
        );
        let opa = |r: usize, p: usize| if s.trans_a { a[ia(p, r)] } else { a[ia(r, p)] };
        let opb = |p: usize, cc: usize| {
            if s.trans_b {
                b[ib(cc, p)]
            } else {
                b[ib(p, cc)]
            }
        };
        for col in 0..n {
            for row in 0..m {
                let acc: f32 = (0..ak).map(|p| opa(row, p) * opb(p, col)).sum();
                let dst = &mut c[ic(row, col)];
                // BLAS semantics: with beta = 0, C is not read (it may hold NaN).
                *dst = if beta == 0.0 { acc } else { acc + beta * *dst };
            }
        }
    }

    /// The cuBLASLt layouts of the three matmuls reproduce ops::matmul_* (layouts, transposes,
    /// leading dimensions, accumulation into bf16/f32 C) on odd and non-square shapes.
    #[test]
    fn lt_layouts_match_the_cpu_matmuls() {
        for (n, i, o) in [
            (48, 48, 48),
            (97, 64, 128),
            (5, 7, 3),
            (64, 97, 33),
            (1, 33, 17),
            (130, 3, 1),
        ] {
            let x = vals(n * i, 1);
            let w = vals(o * i, 2);
            let dy = vals(n * o, 3);
            let shape = format!("n={n} i={i} o={o}");

            let mut want = vec![0f32; n * o];
            crate::ops::matmul_fwd(&mut want, &x, &w, n, i, o);
            let g = fwd_call(n, i, o);
            let mut got = vec![f32::NAN; n * o]; // beta = 0: C is not read
            lt_matmul_cpu(lt_shape(g), 0.0, &w, &x, &mut got);
            close(&got, &want);
            assert_eq!(g.beta, 0.0, "fwd {shape}");

            for acc in [false, true] {
                let start = vals(n * i, 4);
                let mut want = start.clone();
                crate::ops::matmul_bwd_data(&mut want, &dy, &w, n, i, o, acc);
                let g = bwd_data_call(n, i, o, acc);
                let mut got = if acc {
                    start.clone()
                } else {
                    vec![f32::NAN; n * i]
                };
                lt_matmul_cpu(lt_shape(g), g.beta, &w, &dy, &mut got);
                close(&got, &want);
            }

            let start = vals(o * i, 5);
            let mut want = start.clone();
            crate::ops::matmul_bwd_weight(&mut want, &dy, &x, n, i, o);
            let g = bwd_weight_call(n, i, o);
            let mut got = start;
            lt_matmul_cpu(lt_shape(g), g.beta, &x, &dy, &mut got);
            close(&got, &want);
        }
    }

    /// The layouts themselves on one shape, as the GPU will get them.
    #[test]
    fn lt_layouts_of_a_97_64_128_step() {
        use lt_sys::cublasLtOrder_t::CUBLASLT_ORDER_COL as COL;
        let l = |rows, cols, ld| LtLayout {
            rows,
            cols,
            ld,
            order: COL,
        };
        let (n, i, o) = (97, 64, 128);
        let s = lt_shape(fwd_call(n, i, o));
        assert_eq!((s.trans_a, s.trans_b), (true, false));
        assert_eq!(
            (s.a, s.b, s.c),
            (l(64, 128, 64), l(64, 97, 64), l(128, 97, 128))
        );
        let s = lt_shape(bwd_data_call(n, i, o, true));
        assert_eq!((s.trans_a, s.trans_b), (false, false));
        assert_eq!(
            (s.a, s.b, s.c),
            (l(64, 128, 64), l(128, 97, 128), l(64, 97, 64))
        );
        let s = lt_shape(bwd_weight_call(n, i, o));
        assert_eq!((s.trans_a, s.trans_b), (false, true));
        assert_eq!(
            (s.a, s.b, s.c),
            (l(64, 97, 64), l(128, 97, 128), l(64, 128, 64))
        );
    }

    #[test]
    fn pointer_alignment_caps_at_256() {
        assert_eq!(alignment(0), 256);
        assert_eq!(alignment(0x7f00_0000_0000), 256);
        assert_eq!(alignment(0x7f00_0000_0100), 256);
        assert_eq!(alignment(0x7f00_0000_0080), 128);
        assert_eq!(alignment(0x7f00_0000_0002), 2);
        assert_eq!(alignment(0x7f00_0000_0006), 2);
        assert_eq!(alignment(1), 1);
    }

    #[test]
    fn gemm_env_selects_the_path() {
        assert_eq!(gemm_path(None).unwrap(), GemmPath::Lt);
        assert_eq!(gemm_path(Some("")).unwrap(), GemmPath::Lt);
        assert_eq!(gemm_path(Some("cublasLt")).unwrap(), GemmPath::Lt);
        assert_eq!(gemm_path(Some("cublas")).unwrap(), GemmPath::GemmEx);
        assert_eq!(gemm_path(Some(" CUBLAS ")).unwrap(), GemmPath::GemmEx);
        let e = gemm_path(Some("gemmex")).unwrap_err().to_string();
        assert!(e.contains("LLAMA2_GEMM") && e.contains("cublas"), "{e}");
    }
}
