//! cuBLAS and cuBLASLt: the C symbols the engine reaches through cudarc (`cublasGemmEx` and the
//! `cublasLtMatmul` family, with the handle, stream and mode calls around them).
//!
//! Semantics are NVIDIA's documented ones: column-major operands (or row-major where a cuBLASLt
//! layout's ORDER says so), D = alpha op(A) op(B) + beta C with f32 compute and f32 alpha/beta
//! read from host memory at the call, bf16/f16 inputs widened exactly to f32, the result rounded
//! to D's type (round-to-nearest-even), C not read at all when beta is 0, and C = D in place.
//!
//! Arguments are checked at the call, as the real libraries check them, and a bad one returns
//! the status the real library returns (a bad handle, inconsistent dimensions, a leading
//! dimension too small, a type combination or attribute the simulator does not model, a
//! workspace smaller than the algorithm needs). The product itself is queued on the stream and
//! computed (through the `gemm` crate) when the stream runs, reading device memory then: an
//! operand outside device memory fails the job as a kernel fault would, sticky, naming the
//! operand. No panic crosses the C boundary; details go to stderr prefixed `gpu-sim:`.

use crate::mem::{MemView, BASE, DEVICE_SPAN};
use crate::runtime::{code, sim, Device, Failure, Res};
use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// cublasStatus_t (cublas_api.h).
pub mod status {
    pub const SUCCESS: u32 = 0;
    pub const NOT_INITIALIZED: u32 = 1;
    pub const ALLOC_FAILED: u32 = 3;
    pub const INVALID_VALUE: u32 = 7;
    pub const ARCH_MISMATCH: u32 = 8;
    pub const MAPPING_ERROR: u32 = 11;
    pub const EXECUTION_FAILED: u32 = 13;
    pub const INTERNAL_ERROR: u32 = 14;
    pub const NOT_SUPPORTED: u32 = 15;
    pub const LICENSE_ERROR: u32 = 16;
}

/// cudaDataType_t values the simulator computes with.
const R_32F: u32 = 0;
const R_16F: u32 = 2;
const R_16BF: u32 = 14;
/// The highest cudaDataType_t value CUDA 13.0 defines (CUDA_R_4F_E2M1).
const DATA_TYPE_MAX: u32 = 33;

/// cublasComputeType_t: the f32-accumulating ones the simulator computes with.
const COMPUTE_32F: u32 = 68;
const COMPUTE_32F_PEDANTIC: u32 = 69;
/// Every cublasComputeType_t value CUDA 13.0 defines.
const COMPUTE_TYPES: [u32; 13] = [64, 65, 68, 69, 70, 71, 72, 73, 74, 75, 77, 78, 79];

/// cublasOperation_t.
const OP_N: u32 = 0;
const OP_T: u32 = 1;
const OP_C: u32 = 2;
const OP_CONJG: u32 = 3;

/// cublasLtOrder_t.
const ORDER_COL: i32 = 0;
const ORDER_ROW: i32 = 1;

/// Version reported by cublasGetVersion / cublasLtGetVersion (cuBLAS 13.0.0, as CUDA 13.0 ships).
const VERSION: c_int = 130000;

/// The simulated algorithm's workspace, when the preference allows it: a nominal split-K
/// buffer, so a caller that passes less workspace than the heuristic reported is caught.
const ALGO_WORKSPACE: u64 = 1 << 20;
/// The widest vector access the simulated kernels assume for an operand (bytes).
const MAX_VECTOR: u32 = 16;
/// Marks a cublasLtMatmulAlgo_t filled in by this simulator's heuristic.
const ALGO_MAGIC: u64 = 0x6770_7573_696d_a160;

// ---------------------------------------------------------------- errors and the guard

/// A cuBLAS status with what went wrong.
#[derive(Debug)]
pub struct BlasError {
    pub status: u32,
    pub message: String,
}

type BRes<T> = Result<T, BlasError>;

fn err(status: u32, message: impl Into<String>) -> BlasError {
    BlasError {
        status,
        message: message.into(),
    }
}

fn invalid(message: impl Into<String>) -> BlasError {
    err(status::INVALID_VALUE, message)
}

fn unsupported(message: impl Into<String>) -> BlasError {
    err(status::NOT_SUPPORTED, message)
}

/// A driver-side failure (no context, a bad stream, a faulted device) as cuBLAS reports it: the
/// work could not be launched.
fn launch_failure(f: Failure) -> BlasError {
    err(
        status::EXECUTION_FAILED,
        format!("the work could not be queued: {}", f.message),
    )
}

/// Runs an export's body: its error becomes the returned status (with the detail on stderr),
/// a panic becomes CUBLAS_STATUS_INTERNAL_ERROR naming the simulator as the culprit.
fn guard(api: &str, f: impl FnOnce() -> BRes<()>) -> u32 {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(())) => status::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("gpu-sim: {api}: {} ({})", e.message, status_name(e.status));
            e.status
        }
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            eprintln!("gpu-sim: {api}: internal error in gpu-sim (please report): {msg}");
            status::INTERNAL_ERROR
        }
    }
}

fn status_name(s: u32) -> &'static str {
    status_text(s).0.to_str().unwrap_or("?")
}

/// (name, description) of a status.
fn status_text(s: u32) -> (&'static CStr, &'static CStr) {
    match s {
        status::SUCCESS => (c"CUBLAS_STATUS_SUCCESS", c"success"),
        status::NOT_INITIALIZED => (
            c"CUBLAS_STATUS_NOT_INITIALIZED",
            c"the library or handle was not initialized",
        ),
        status::ALLOC_FAILED => (
            c"CUBLAS_STATUS_ALLOC_FAILED",
            c"a resource allocation failed",
        ),
        status::INVALID_VALUE => (
            c"CUBLAS_STATUS_INVALID_VALUE",
            c"an invalid value or parameter was passed",
        ),
        status::ARCH_MISMATCH => (
            c"CUBLAS_STATUS_ARCH_MISMATCH",
            c"the device does not support the operation",
        ),
        status::MAPPING_ERROR => (
            c"CUBLAS_STATUS_MAPPING_ERROR",
            c"accessing GPU memory failed",
        ),
        status::EXECUTION_FAILED => (
            c"CUBLAS_STATUS_EXECUTION_FAILED",
            c"the GPU program failed to execute",
        ),
        status::INTERNAL_ERROR => (
            c"CUBLAS_STATUS_INTERNAL_ERROR",
            c"an internal operation failed",
        ),
        status::NOT_SUPPORTED => (
            c"CUBLAS_STATUS_NOT_SUPPORTED",
            c"the requested functionality is not supported",
        ),
        status::LICENSE_ERROR => (c"CUBLAS_STATUS_LICENSE_ERROR", c"license error"),
        _ => (c"CUBLAS_STATUS_UNKNOWN", c"unknown status"),
    }
}

/// Writes `v` through an out-pointer, refusing NULL.
///
/// # Safety
/// `p` is NULL or valid for a write of T.
unsafe fn out<T>(p: *mut T, v: T, what: &str) -> BRes<()> {
    if p.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-null, and the caller passes a pointer to a T.
    unsafe { p.write_unaligned(v) };
    Ok(())
}

/// Whether `p` lies where the simulator puts device memory (so it must not be read as a host
/// pointer: it is not mapped in this process).
fn is_device_address(p: u64) -> bool {
    let end = BASE + DEVICE_SPAN * sim().devices.len() as u64;
    (BASE..end).contains(&p)
}

/// Reads a host f32 scalar (alpha or beta) at the call, as the host pointer mode does.
///
/// # Safety
/// `p` is NULL, a simulated device address, or points at 4 readable bytes.
unsafe fn host_scalar(p: *const c_void, what: &str) -> BRes<f32> {
    if p.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    if is_device_address(p as u64) {
        return Err(invalid(format!(
            "{what} ({p:p}) is a device address, but the pointer mode is host: alpha and beta \
             must point at host memory"
        )));
    }
    // SAFETY: caller contract (a host pointer to an f32, the scale type).
    Ok(unsafe { (p as *const f32).read_unaligned() })
}

// ---------------------------------------------------------------- handles and descriptors

/// A cuBLAS handle's settings.
#[derive(Clone, Debug)]
struct BlasHandle {
    device: u32,
    stream: u64,
    pointer_mode: u32,
    math_mode: u32,
    workspace: (u64, usize),
}

/// A cuBLASLt matrix layout: the attributes, all of them (`GetAttribute` returns them).
#[derive(Clone, Debug, PartialEq)]
struct Layout {
    ty: u32,
    order: i32,
    rows: u64,
    cols: u64,
    ld: i64,
    batch_count: i32,
    batch_stride: i64,
    plane_offset: i64,
    batch_mode: u32,
}

/// A cuBLASLt matmul descriptor: attribute id -> its bytes, every attribute present (defaults
/// filled in at creation).
#[derive(Clone, Debug)]
struct Desc {
    attrs: BTreeMap<u32, Vec<u8>>,
}

/// A cuBLASLt preference: attribute id -> its bytes.
#[derive(Clone, Debug)]
struct Pref {
    attrs: BTreeMap<u32, Vec<u8>>,
}

enum Obj {
    Blas(BlasHandle),
    Lt,
    Desc(Desc),
    Layout(Layout),
    Pref(Pref),
}

impl Obj {
    fn kind(&self) -> &'static str {
        match self {
            Obj::Blas(_) => "a cuBLAS handle",
            Obj::Lt => "a cuBLASLt handle",
            Obj::Desc(_) => "a matmul descriptor",
            Obj::Layout(_) => "a matrix layout",
            Obj::Pref(_) => "a matmul preference",
        }
    }
}

/// Every live handle and descriptor, by its (opaque) handle value.
fn objects() -> &'static Mutex<HashMap<u64, Obj>> {
    static OBJS: OnceLock<Mutex<HashMap<u64, Obj>>> = OnceLock::new();
    OBJS.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Handle values: tagged integers above every user-space address, so none is a valid pointer.
static NEXT_OBJ: AtomicU64 = AtomicU64::new(0xB1A5_0000_0000);

fn insert(o: Obj) -> u64 {
    let h = NEXT_OBJ.fetch_add(16, Ordering::Relaxed);
    objects().lock().unwrap().insert(h, o);
    h
}

/// Why handle `h` is not a `want`: NULL, destroyed/never created, or another kind of object.
fn not_a(h: u64, want: &str, objs: &HashMap<u64, Obj>) -> String {
    if h == 0 {
        format!("{want} is NULL")
    } else {
        match objs.get(&h) {
            Some(o) => format!("{h:#x} is {}, not {want}", o.kind()),
            None => format!("{h:#x} is not {want} (destroyed, or never created)"),
        }
    }
}

/// Removes object `h` of the kind `is` accepts; `status` when it is not one.
fn destroy(h: *mut c_void, want: &str, status: u32, is: fn(&Obj) -> bool) -> BRes<()> {
    let mut objs = objects().lock().unwrap();
    match objs.get(&(h as u64)) {
        Some(o) if is(o) => {
            objs.remove(&(h as u64));
            Ok(())
        }
        _ => Err(err(status, not_a(h as u64, want, &objs))),
    }
}

fn blas_handle(h: *mut c_void) -> BRes<BlasHandle> {
    let objs = objects().lock().unwrap();
    match objs.get(&(h as u64)) {
        Some(Obj::Blas(b)) => Ok(b.clone()),
        _ => Err(err(
            status::NOT_INITIALIZED,
            not_a(h as u64, "a cuBLAS handle", &objs),
        )),
    }
}

fn with_blas<R>(h: *mut c_void, f: impl FnOnce(&mut BlasHandle) -> BRes<R>) -> BRes<R> {
    let mut objs = objects().lock().unwrap();
    if let Some(Obj::Blas(b)) = objs.get_mut(&(h as u64)) {
        return f(b);
    }
    Err(err(
        status::NOT_INITIALIZED,
        not_a(h as u64, "a cuBLAS handle", &objs),
    ))
}

fn lt_handle(h: *mut c_void) -> BRes<()> {
    let objs = objects().lock().unwrap();
    match objs.get(&(h as u64)) {
        Some(Obj::Lt) => Ok(()),
        _ => Err(err(
            status::NOT_INITIALIZED,
            not_a(h as u64, "a cuBLASLt handle", &objs),
        )),
    }
}

fn layout(h: *mut c_void, what: &str) -> BRes<Layout> {
    let objs = objects().lock().unwrap();
    match objs.get(&(h as u64)) {
        Some(Obj::Layout(l)) => Ok(l.clone()),
        _ => Err(invalid(format!(
            "{what}: {}",
            not_a(h as u64, "a matrix layout", &objs)
        ))),
    }
}

fn desc(h: *mut c_void) -> BRes<Desc> {
    let objs = objects().lock().unwrap();
    match objs.get(&(h as u64)) {
        Some(Obj::Desc(d)) => Ok(d.clone()),
        _ => Err(invalid(not_a(h as u64, "a matmul descriptor", &objs))),
    }
}

fn pref(h: *mut c_void) -> BRes<Pref> {
    let objs = objects().lock().unwrap();
    match objs.get(&(h as u64)) {
        Some(Obj::Pref(p)) => Ok(p.clone()),
        _ => Err(invalid(not_a(h as u64, "a matmul preference", &objs))),
    }
}

// ---------------------------------------------------------------- attributes

/// cublasLtMatmulDescAttributes_t of CUDA 13.0: (id, name, size in bytes).
const DESC_ATTRS: [(u32, &str, usize); 32] = [
    (0, "COMPUTE_TYPE", 4),
    (1, "SCALE_TYPE", 4),
    (2, "POINTER_MODE", 4),
    (3, "TRANSA", 4),
    (4, "TRANSB", 4),
    (5, "TRANSC", 4),
    (6, "FILL_MODE", 4),
    (7, "EPILOGUE", 4),
    (8, "BIAS_POINTER", 8),
    (10, "BIAS_BATCH_STRIDE", 8),
    (11, "EPILOGUE_AUX_POINTER", 8),
    (12, "EPILOGUE_AUX_LD", 8),
    (13, "EPILOGUE_AUX_BATCH_STRIDE", 8),
    (14, "ALPHA_VECTOR_BATCH_STRIDE", 8),
    (15, "SM_COUNT_TARGET", 4),
    (17, "A_SCALE_POINTER", 8),
    (18, "B_SCALE_POINTER", 8),
    (19, "C_SCALE_POINTER", 8),
    (20, "D_SCALE_POINTER", 8),
    (21, "AMAX_D_POINTER", 8),
    (22, "EPILOGUE_AUX_DATA_TYPE", 4),
    (23, "EPILOGUE_AUX_SCALE_POINTER", 8),
    (24, "EPILOGUE_AUX_AMAX_POINTER", 8),
    (25, "FAST_ACCUM", 1),
    (26, "BIAS_DATA_TYPE", 4),
    (31, "A_SCALE_MODE", 4),
    (32, "B_SCALE_MODE", 4),
    (33, "C_SCALE_MODE", 4),
    (34, "D_SCALE_MODE", 4),
    (35, "EPILOGUE_AUX_SCALE_MODE", 4),
    (36, "D_OUT_SCALE_POINTER", 8),
    (37, "D_OUT_SCALE_MODE", 4),
];
/// CUBLASLT_MATMUL_DESC_EMULATION_DESCRIPTOR (a pointer; separate so the table stays sorted by
/// what the checks below treat alike).
const DESC_EMULATION: (u32, &str, usize) = (38, "EMULATION_DESCRIPTOR", 8);

const D_COMPUTE: u32 = 0;
const D_SCALE: u32 = 1;
const D_POINTER_MODE: u32 = 2;
const D_TRANSA: u32 = 3;
const D_TRANSB: u32 = 4;
const D_TRANSC: u32 = 5;
const D_FILL_MODE: u32 = 6;
const D_EPILOGUE: u32 = 7;
/// CUBLAS_FILL_MODE_FULL, the descriptor's default.
const FILL_FULL: i32 = 2;
/// CUBLASLT_EPILOGUE_DEFAULT.
const EPILOGUE_DEFAULT: i32 = 1;

/// Attributes that only matter with an epilogue, a scaled (fp8) type, or as performance hints:
/// with the default epilogue and the types the simulator supports they change nothing.
const DESC_INERT: [u32; 11] = [8, 10, 11, 12, 13, 14, 15, 22, 25, 26, 38];

fn desc_attr(attr: u32) -> Option<(&'static str, usize)> {
    DESC_ATTRS
        .iter()
        .chain(std::iter::once(&DESC_EMULATION))
        .find(|a| a.0 == attr)
        .map(|a| (a.1, a.2))
}

/// cublasLtMatrixLayoutAttribute_t of CUDA 13.0: (id, name, size).
const LAYOUT_ATTRS: [(u32, &str, usize); 9] = [
    (0, "TYPE", 4),
    (1, "ORDER", 4),
    (2, "ROWS", 8),
    (3, "COLS", 8),
    (4, "LD", 8),
    (5, "BATCH_COUNT", 4),
    (6, "STRIDED_BATCH_OFFSET", 8),
    (7, "PLANE_OFFSET", 8),
    (8, "BATCH_MODE", 4),
];

/// cublasLtMatmulPreferenceAttributes_t of CUDA 13.0: (id, name, size).
const PREF_ATTRS: [(u32, &str, usize); 9] = [
    (0, "SEARCH_MODE", 4),
    (1, "MAX_WORKSPACE_BYTES", 8),
    (3, "REDUCTION_SCHEME_MASK", 4),
    (5, "MIN_ALIGNMENT_A_BYTES", 4),
    (6, "MIN_ALIGNMENT_B_BYTES", 4),
    (7, "MIN_ALIGNMENT_C_BYTES", 4),
    (8, "MIN_ALIGNMENT_D_BYTES", 4),
    (9, "MAX_WAVES_COUNT", 4),
    (12, "IMPL_MASK", 8),
];
const P_MAX_WORKSPACE: u32 = 1;
const P_ALIGN_A: u32 = 5;

fn table_attr(table: &[(u32, &'static str, usize)], attr: u32) -> Option<(&'static str, usize)> {
    table.iter().find(|a| a.0 == attr).map(|a| (a.1, a.2))
}

/// The `size` bytes at `buf`, checked as cuBLASLt's SetAttribute functions check them: NULL or a
/// size other than the attribute's is INVALID_VALUE.
///
/// # Safety
/// `buf` is NULL or has `size` readable bytes.
unsafe fn attr_bytes(buf: *const c_void, size: usize, name: &str, want: usize) -> BRes<Vec<u8>> {
    if buf.is_null() {
        return Err(invalid(format!("attribute {name}: the buffer is NULL")));
    }
    if size != want {
        return Err(invalid(format!(
            "attribute {name} is {want} bytes, but {size} were passed"
        )));
    }
    // SAFETY: caller contract; `size` bytes.
    Ok(unsafe { std::slice::from_raw_parts(buf as *const u8, size) }.to_vec())
}

/// GetAttribute's contract: with `size` 0 and `written` non-NULL, only the size is reported;
/// otherwise the buffer must hold the attribute.
///
/// # Safety
/// `buf` is NULL or has `size` writable bytes; `written` is NULL or points at a usize.
unsafe fn attr_out(
    bytes: &[u8],
    name: &str,
    buf: *mut c_void,
    size: usize,
    written: *mut usize,
) -> BRes<()> {
    if size == 0 && !written.is_null() {
        // SAFETY: caller contract.
        unsafe { written.write_unaligned(bytes.len()) };
        return Ok(());
    }
    if buf.is_null() || size < bytes.len() {
        return Err(invalid(format!(
            "attribute {name}: needs a {}-byte buffer, got {size} bytes at {buf:p}",
            bytes.len()
        )));
    }
    // SAFETY: caller contract; `buf` has at least bytes.len() bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf as *mut u8, bytes.len());
        if !written.is_null() {
            written.write_unaligned(bytes.len());
        }
    }
    Ok(())
}

fn le_i64(b: &[u8]) -> i64 {
    let mut a = [0u8; 8];
    a[..b.len()].copy_from_slice(b);
    // Sign-extend 4-byte values.
    let v = i64::from_le_bytes(a);
    if b.len() == 4 {
        v as i32 as i64
    } else {
        v
    }
}

impl Desc {
    fn new(compute: u32, scale: u32) -> Desc {
        let mut attrs = BTreeMap::new();
        for (id, _, size) in DESC_ATTRS.iter().chain(std::iter::once(&DESC_EMULATION)) {
            attrs.insert(*id, vec![0u8; *size]);
        }
        attrs.insert(D_COMPUTE, compute.to_le_bytes().to_vec());
        attrs.insert(D_SCALE, scale.to_le_bytes().to_vec());
        attrs.insert(D_FILL_MODE, FILL_FULL.to_le_bytes().to_vec());
        attrs.insert(D_EPILOGUE, EPILOGUE_DEFAULT.to_le_bytes().to_vec());
        Desc { attrs }
    }

    fn get(&self, attr: u32) -> i64 {
        self.attrs.get(&attr).map_or(0, |b| le_i64(b))
    }
}

impl Pref {
    fn new() -> Pref {
        let mut attrs = BTreeMap::new();
        for (id, _, size) in PREF_ATTRS {
            attrs.insert(id, vec![0u8; size]);
        }
        for a in P_ALIGN_A..P_ALIGN_A + 4 {
            attrs.insert(a, 256u32.to_le_bytes().to_vec());
        }
        // Every reduction scheme and implementation allowed.
        attrs.insert(3, 7u32.to_le_bytes().to_vec());
        attrs.insert(12, u64::MAX.to_le_bytes().to_vec());
        Pref { attrs }
    }

    fn get(&self, attr: u32) -> u64 {
        self.attrs.get(&attr).map_or(0, |b| {
            let mut a = [0u8; 8];
            a[..b.len()].copy_from_slice(b);
            u64::from_le_bytes(a)
        })
    }
}

impl Layout {
    fn get(&self, attr: u32) -> Vec<u8> {
        match attr {
            0 => self.ty.to_le_bytes().to_vec(),
            1 => self.order.to_le_bytes().to_vec(),
            2 => self.rows.to_le_bytes().to_vec(),
            3 => self.cols.to_le_bytes().to_vec(),
            4 => self.ld.to_le_bytes().to_vec(),
            5 => self.batch_count.to_le_bytes().to_vec(),
            6 => self.batch_stride.to_le_bytes().to_vec(),
            7 => self.plane_offset.to_le_bytes().to_vec(),
            _ => self.batch_mode.to_le_bytes().to_vec(),
        }
    }

    fn set(&mut self, attr: u32, b: &[u8]) {
        let v = le_i64(b);
        match attr {
            0 => self.ty = v as u32,
            1 => self.order = v as i32,
            2 => self.rows = v as u64,
            3 => self.cols = v as u64,
            4 => self.ld = v,
            5 => self.batch_count = v as i32,
            6 => self.batch_stride = v,
            7 => self.plane_offset = v,
            _ => self.batch_mode = v as u32,
        }
    }
}

// ---------------------------------------------------------------- the product

/// An element type the simulator computes with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ty {
    F32,
    F16,
    Bf16,
}

impl Ty {
    fn of(t: u32) -> Option<Ty> {
        match t {
            R_32F => Some(Ty::F32),
            R_16F => Some(Ty::F16),
            R_16BF => Some(Ty::Bf16),
            _ => None,
        }
    }

    fn size(self) -> u64 {
        match self {
            Ty::F32 => 4,
            _ => 2,
        }
    }
}

impl fmt::Display for Ty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Ty::F32 => "f32",
            Ty::F16 => "f16",
            Ty::Bf16 => "bf16",
        })
    }
}

fn type_name(t: u32) -> String {
    match Ty::of(t) {
        Some(t) => t.to_string(),
        None => format!("cudaDataType {t}"),
    }
}

/// The type combinations NVIDIA documents for f32 compute with an f32 scale type (A, B, C = D),
/// restricted to the floating-point ones the simulator computes.
fn supported_types(a: u32, b: u32, c: u32) -> bool {
    matches!(
        (a, b, c),
        (R_16BF, R_16BF, R_16BF | R_32F) | (R_16F, R_16F, R_16F | R_32F) | (R_32F, R_32F, R_32F)
    )
}

/// One stored matrix: element (r, c) at `addr + (r * rs + c * cs) * size`.
#[derive(Clone, Copy, Debug)]
struct Mat {
    addr: u64,
    ty: Ty,
    rows: usize,
    cols: usize,
    ld: usize,
    row_major: bool,
}

impl Mat {
    /// (row stride, column stride) in elements.
    fn strides(&self) -> (usize, usize) {
        if self.row_major {
            (self.ld, 1)
        } else {
            (1, self.ld)
        }
    }

    /// Elements from the first to the last one the matrix covers.
    fn span(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            return 0;
        }
        let (rs, cs) = self.strides();
        (self.rows - 1) * rs + (self.cols - 1) * cs + 1
    }

    fn bytes(&self) -> u64 {
        self.span() as u64 * self.ty.size()
    }
}

impl fmt::Display for Mat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}x{} {} ld {}, {} bytes at {:#x}",
            self.ty,
            self.rows,
            self.cols,
            if self.row_major {
                "row-major"
            } else {
                "column-major"
            },
            self.ld,
            self.bytes(),
            self.addr
        )
    }
}

/// One validated product D (m x n) = alpha op(A) op(B) + beta C, ready to run.
#[derive(Clone, Debug)]
struct Problem {
    api: &'static str,
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    trans_a: bool,
    b: Mat,
    trans_b: bool,
    c: Mat,
    d: Mat,
    alpha: f32,
    beta: f32,
    /// Byte alignment the algorithm assumes for A, B, C and D.
    align: [u32; 4],
    /// Scratch the algorithm writes: (address, bytes).
    workspace: (u64, u64),
}

impl Problem {
    fn label(&self) -> String {
        let t = |x: bool| if x { "T" } else { "N" };
        format!(
            "{} m={} n={} k={} op(A)={} op(B)={} {}x{}x{}->{} alpha={} beta={}",
            self.api,
            self.m,
            self.n,
            self.k,
            t(self.trans_a),
            t(self.trans_b),
            self.a.ty,
            self.b.ty,
            self.c.ty,
            self.d.ty,
            self.alpha,
            self.beta
        )
    }
}

/// Why an operand cannot be used as the job meets it: a fault as a kernel would take it.
fn operand(view: &MemView, name: &str, m: &Mat, align: u32) -> Res<*mut u8> {
    let align = (align as u64).max(m.ty.size());
    if !m.addr.is_multiple_of(align) {
        return Err(Failure::new(
            code::MISALIGNED_ADDRESS,
            format!(
                "operand {name} ({m}) is not aligned to the {align} bytes the algorithm assumes"
            ),
        ));
    }
    view.translate(m.addr, m.bytes())
        .map_err(|f| Failure::new(code::ILLEGAL_ADDRESS, format!("operand {name} ({m}): {f}")))
}

/// The `n` elements at `p` widened to f32 (exactly: every bf16 and f16 is an f32).
///
/// # Safety
/// `p` has `n` elements of `ty`.
unsafe fn widen(p: *const u8, ty: Ty, n: usize) -> Vec<f32> {
    let half_at = |i: usize| {
        // SAFETY: i < n and `p` has n 2-byte elements (caller contract); unaligned-safe read.
        unsafe { (p as *const u16).add(i).read_unaligned() }
    };
    match ty {
        Ty::F32 => (0..n)
            // SAFETY: i < n and `p` has n f32 elements (caller contract); unaligned-safe read.
            .map(|i| unsafe { (p as *const f32).add(i).read_unaligned() })
            .collect(),
        Ty::Bf16 => (0..n)
            .map(|i| f32::from(half::bf16::from_bits(half_at(i))))
            .collect(),
        Ty::F16 => (0..n)
            .map(|i| f32::from(half::f16::from_bits(half_at(i))))
            .collect(),
    }
}

/// Runs a product on the device (the queued job).
fn execute(p: &Problem, dev: &Device) -> Res<()> {
    let view = dev.mem.view();
    let (m, n, k) = (p.m, p.n, p.k);
    if p.workspace.1 > 0 {
        let ws = view.translate(p.workspace.0, p.workspace.1).map_err(|f| {
            Failure::new(
                code::ILLEGAL_ADDRESS,
                format!(
                    "the workspace ({} bytes at {:#x}): {f}",
                    p.workspace.1, p.workspace.0
                ),
            )
        })?;
        // The algorithm's scratch: whatever it held is gone (NaN), as after a real split-K pass.
        // SAFETY: translate checked the range.
        unsafe { std::ptr::write_bytes(ws, crate::mem::FRESH, p.workspace.1 as usize) };
    }
    // A and B are read only when there is a product to form.
    let mut acc = vec![0f32; m * n];
    if k > 0 {
        let pa = operand(&view, "A", &p.a, p.align[0])?;
        let pb = operand(&view, "B", &p.b, p.align[1])?;
        // SAFETY: `operand` checked that each span is inside device memory.
        let (av, bv) = unsafe { (widen(pa, p.a.ty, p.a.span()), widen(pb, p.b.ty, p.b.span())) };
        // op(X)(i, j) = X(j, i) when transposed: swap the strides.
        let (ars, acs) = p.a.strides();
        let (ars, acs) = if p.trans_a { (acs, ars) } else { (ars, acs) };
        let (brs, bcs) = p.b.strides();
        let (brs, bcs) = if p.trans_b { (bcs, brs) } else { (brs, bcs) };
        // The last element of op(A) and op(B) must lie in what was read: a stride mistake here
        // is a clean internal error, not a read past the buffers.
        assert!(
            (m - 1) * ars + (k - 1) * acs < av.len(),
            "op(A) outside A's span"
        );
        assert!(
            (k - 1) * brs + (n - 1) * bcs < bv.len(),
            "op(B) outside B's span"
        );
        let work = m as u64 * n as u64 * k as u64;
        let par = if work >= 1 << 18 {
            gemm::Parallelism::Rayon(rayon::current_num_threads().max(1))
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: acc is m x n column-major; every (i, p) of op(A) (m x k) and (p, j) of op(B)
        // (k x n) indexes inside av and bv, whose spans were computed from the same strides.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                acc.as_mut_ptr(),
                m as isize,
                1,
                false,
                av.as_ptr(),
                acs as isize,
                ars as isize,
                bv.as_ptr(),
                bcs as isize,
                brs as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            )
        };
    }
    // beta = 0: C is not read at all (it may hold NaN, or be unwritten memory).
    let c = if p.beta != 0.0 {
        let pc = operand(&view, "C", &p.c, p.align[2])?;
        // SAFETY: checked by `operand`.
        Some(unsafe { widen(pc, p.c.ty, p.c.span()) })
    } else {
        None
    };
    let pd = operand(&view, "D", &p.d, p.align[3])?;
    let (crs, ccs) = p.c.strides();
    let (drs, dcs) = p.d.strides();
    assert!(
        (m - 1) * drs + (n - 1) * dcs < p.d.span(),
        "D outside its span"
    );
    if let Some(c) = &c {
        assert!(
            (m - 1) * crs + (n - 1) * ccs < c.len(),
            "C outside its span"
        );
    }
    for j in 0..n {
        for i in 0..m {
            let mut v = p.alpha * acc[i + j * m];
            if let Some(c) = &c {
                v += p.beta * c[i * crs + j * ccs];
            }
            let off = i * drs + j * dcs;
            // SAFETY: (i, j) is inside D's span, checked by `operand`.
            unsafe {
                match p.d.ty {
                    Ty::F32 => (pd as *mut f32).add(off).write_unaligned(v),
                    Ty::Bf16 => (pd as *mut u16)
                        .add(off)
                        .write_unaligned(half::bf16::from_f32(v).to_bits()),
                    Ty::F16 => (pd as *mut u16)
                        .add(off)
                        .write_unaligned(half::f16::from_f32(v).to_bits()),
                }
            }
        }
    }
    Ok(())
}

/// Queues `p` on `stream`.
fn enqueue(p: Problem, stream: u64) -> BRes<()> {
    if p.m == 0 || p.n == 0 {
        // Nothing to write: BLAS returns at once.
        return Ok(());
    }
    let label = p.label();
    let job = move |dev: &Device| {
        // A panic here is the simulator's bug: a launch failure naming it, not an unwinding
        // device runner.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| execute(&p, dev))).unwrap_or_else(
            |e| {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                Err(Failure::new(
                    code::LAUNCH_FAILED,
                    format!("internal error in gpu-sim (please report): {msg}"),
                ))
            },
        )
    };
    sim()
        .enqueue(stream, label, Box::new(job))
        .map_err(launch_failure)
}

// ---------------------------------------------------------------- cuBLAS

type Handle = *mut c_void;

/// # Safety
/// `handle` is NULL or points at a handle.
#[no_mangle]
pub unsafe extern "C" fn cublasCreate_v2(handle: *mut Handle) -> u32 {
    guard("cublasCreate", || {
        // The handle belongs to the current device (device 0 when no context is current, as the
        // runtime would make device 0's primary context current).
        let device = crate::runtime::current().unwrap_or(0);
        sim()
            .device(device)
            .map_err(|f| err(status::NOT_INITIALIZED, f.message))?;
        let h = insert(Obj::Blas(BlasHandle {
            device,
            stream: 0,
            pointer_mode: 0,
            math_mode: 0,
            workspace: (0, 0),
        }));
        // SAFETY: caller contract.
        unsafe { out(handle, h as Handle, "the handle pointer") }
    })
}

#[no_mangle]
pub extern "C" fn cublasDestroy_v2(handle: Handle) -> u32 {
    guard("cublasDestroy", || {
        destroy(handle, "a cuBLAS handle", status::NOT_INITIALIZED, |o| {
            matches!(o, Obj::Blas(_))
        })
    })
}

#[no_mangle]
pub extern "C" fn cublasSetStream_v2(handle: Handle, stream: *mut c_void) -> u32 {
    guard("cublasSetStream", || {
        with_blas(handle, |b| {
            b.stream = stream as u64;
            Ok(())
        })
    })
}

/// # Safety
/// `stream` is NULL or points at a pointer.
#[no_mangle]
pub unsafe extern "C" fn cublasGetStream_v2(handle: Handle, stream: *mut *mut c_void) -> u32 {
    guard("cublasGetStream", || {
        let s = blas_handle(handle)?.stream;
        // SAFETY: caller contract.
        unsafe { out(stream, s as *mut c_void, "the stream pointer") }
    })
}

/// Device pointer mode is accepted here (it is a valid setting) and refused by the GEMM that
/// would need it: the simulator reads alpha and beta from host memory only.
#[no_mangle]
pub extern "C" fn cublasSetPointerMode_v2(handle: Handle, mode: u32) -> u32 {
    guard("cublasSetPointerMode", || {
        with_blas(handle, |b| {
            if mode > 1 {
                return Err(invalid(format!("pointer mode {mode} does not exist")));
            }
            b.pointer_mode = mode;
            Ok(())
        })
    })
}

/// # Safety
/// `mode` is NULL or points at a u32.
#[no_mangle]
pub unsafe extern "C" fn cublasGetPointerMode_v2(handle: Handle, mode: *mut u32) -> u32 {
    guard("cublasGetPointerMode", || {
        let m = blas_handle(handle)?.pointer_mode;
        // SAFETY: caller contract.
        unsafe { out(mode, m, "the mode pointer") }
    })
}

/// Math modes only allow faster, less precise paths; the simulator's f32 product is within every
/// one of them, so any valid mode is recorded and changes nothing.
#[no_mangle]
pub extern "C" fn cublasSetMathMode(handle: Handle, mode: u32) -> u32 {
    guard("cublasSetMathMode", || {
        with_blas(handle, |b| {
            if !matches!(mode & !16, 0..=4 | 8) {
                return Err(invalid(format!("math mode {mode} does not exist")));
            }
            b.math_mode = mode;
            Ok(())
        })
    })
}

/// # Safety
/// `mode` is NULL or points at a u32.
#[no_mangle]
pub unsafe extern "C" fn cublasGetMathMode(handle: Handle, mode: *mut u32) -> u32 {
    guard("cublasGetMathMode", || {
        let m = blas_handle(handle)?.math_mode;
        // SAFETY: caller contract.
        unsafe { out(mode, m, "the mode pointer") }
    })
}

/// The workspace must be 256-byte aligned, as cuBLAS requires.
#[no_mangle]
pub extern "C" fn cublasSetWorkspace_v2(handle: Handle, ws: *mut c_void, bytes: usize) -> u32 {
    guard("cublasSetWorkspace", || {
        with_blas(handle, |b| {
            if bytes > 0 && !(ws as u64).is_multiple_of(256) {
                return Err(invalid(format!(
                    "the workspace {ws:p} is not 256-byte aligned"
                )));
            }
            b.workspace = (ws as u64, bytes);
            Ok(())
        })
    })
}

/// # Safety
/// `version` is NULL or points at an int.
#[no_mangle]
pub unsafe extern "C" fn cublasGetVersion_v2(handle: Handle, version: *mut c_int) -> u32 {
    guard("cublasGetVersion", || {
        blas_handle(handle)?;
        // SAFETY: caller contract.
        unsafe { out(version, VERSION, "the version pointer") }
    })
}

#[no_mangle]
pub extern "C" fn cublasGetStatusName(s: u32) -> *const c_char {
    status_text(s).0.as_ptr()
}

#[no_mangle]
pub extern "C" fn cublasGetStatusString(s: u32) -> *const c_char {
    status_text(s).1.as_ptr()
}

/// A GemmEx/GemmEx-like transpose argument: N, or T (C is T for real types).
fn gemm_op(op: u32, which: &str) -> BRes<bool> {
    match op {
        OP_N => Ok(false),
        OP_T | OP_C => Ok(true),
        OP_CONJG => Err(invalid(format!(
            "{which} = CUBLAS_OP_CONJG is not valid for a GEMM"
        ))),
        _ => Err(invalid(format!(
            "{which} = {op} is not a cublasOperation_t"
        ))),
    }
}

/// C (m x n) = alpha op(A) op(B) + beta C, column-major, f32 compute: the engine's
/// `LLAMA2_GEMM=cublas` path.
///
/// # Safety
/// `alpha` and `beta` point at host f32 values (the pointer mode is host).
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cublasGemmEx(
    handle: Handle,
    transa: u32,
    transb: u32,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const c_void,
    a: *const c_void,
    a_type: u32,
    lda: c_int,
    b: *const c_void,
    b_type: u32,
    ldb: c_int,
    beta: *const c_void,
    c: *mut c_void,
    c_type: u32,
    ldc: c_int,
    compute: u32,
    algo: c_int,
) -> u32 {
    guard("cublasGemmEx", || {
        let h = blas_handle(handle)?;
        let ta = gemm_op(transa, "transa")?;
        let tb = gemm_op(transb, "transb")?;
        if m < 0 || n < 0 || k < 0 {
            return Err(invalid(format!("m={m} n={n} k={k}: negative dimension")));
        }
        let (m, n, k) = (m as usize, n as usize, k as usize);
        // Stored shapes: A is m x k (k x m when transposed), B k x n (n x k), C m x n.
        let (ar, ac) = if ta { (k, m) } else { (m, k) };
        let (br, bc) = if tb { (n, k) } else { (k, n) };
        for (name, ld, rows) in [("lda", lda, ar), ("ldb", ldb, br), ("ldc", ldc, m)] {
            if (ld as i64) < rows.max(1) as i64 {
                return Err(invalid(format!(
                    "{name} = {ld} is less than max(1, {rows}), the rows of the stored matrix \
                     (m={m} n={n} k={k}, transa={transa} transb={transb})"
                )));
            }
        }
        if !(matches!(algo, -1 | 0..=23 | 99..=115)) {
            return Err(invalid(format!("algo {algo} is not a cublasGemmAlgo_t")));
        }
        if !matches!(compute, COMPUTE_32F | COMPUTE_32F_PEDANTIC) {
            return Err(unsupported(format!(
                "compute type {compute}: the simulator computes CUBLAS_COMPUTE_32F (68) and \
                 CUBLAS_COMPUTE_32F_PEDANTIC (69) only"
            )));
        }
        if !supported_types(a_type, b_type, c_type) {
            return Err(unsupported(format!(
                "A {}, B {}, C {} with f32 compute is not a supported combination",
                type_name(a_type),
                type_name(b_type),
                type_name(c_type)
            )));
        }
        if h.pointer_mode != 0 {
            return Err(unsupported(
                "the handle's pointer mode is DEVICE: the simulator reads alpha and beta from \
                 host memory only (CUBLAS_POINTER_MODE_HOST)",
            ));
        }
        // SAFETY: caller contract (host f32 scalars).
        let alpha = unsafe { host_scalar(alpha, "alpha")? };
        // SAFETY: as above.
        let beta = unsafe { host_scalar(beta, "beta")? };
        let stream_dev = sim().stream_device(h.stream).map_err(launch_failure)?;
        if stream_dev.ordinal != h.device {
            return Err(err(
                status::EXECUTION_FAILED,
                format!(
                    "the handle belongs to device {} but its stream {:#x} to device {}",
                    h.device, h.stream, stream_dev.ordinal
                ),
            ));
        }
        let mat = |addr: *const c_void, ty: u32, rows, cols, ld: c_int| Mat {
            addr: addr as u64,
            ty: Ty::of(ty).expect("checked by supported_types"),
            rows,
            cols,
            ld: ld as usize,
            row_major: false,
        };
        let cm = mat(c, c_type, m, n, ldc);
        let p = Problem {
            api: "cublasGemmEx",
            m,
            n,
            k,
            a: mat(a, a_type, ar, ac, lda),
            trans_a: ta,
            b: mat(b, b_type, br, bc, ldb),
            trans_b: tb,
            c: cm,
            d: cm,
            alpha,
            beta,
            // cuBLAS picks kernels for the pointers it is given: element alignment suffices.
            align: [1; 4],
            workspace: (0, 0),
        };
        enqueue(p, h.stream)
    })
}

// ---------------------------------------------------------------- cuBLASLt

/// # Safety
/// `handle` is NULL or points at a handle.
#[no_mangle]
pub unsafe extern "C" fn cublasLtCreate(handle: *mut Handle) -> u32 {
    guard("cublasLtCreate", || {
        let h = insert(Obj::Lt);
        // SAFETY: caller contract.
        unsafe { out(handle, h as Handle, "the handle pointer") }
    })
}

#[no_mangle]
pub extern "C" fn cublasLtDestroy(handle: Handle) -> u32 {
    guard("cublasLtDestroy", || {
        destroy(handle, "a cuBLASLt handle", status::NOT_INITIALIZED, |o| {
            matches!(o, Obj::Lt)
        })
    })
}

#[no_mangle]
pub extern "C" fn cublasLtGetVersion() -> usize {
    VERSION as usize
}

#[no_mangle]
pub extern "C" fn cublasLtGetStatusName(s: u32) -> *const c_char {
    status_text(s).0.as_ptr()
}

#[no_mangle]
pub extern "C" fn cublasLtGetStatusString(s: u32) -> *const c_char {
    status_text(s).1.as_ptr()
}

/// # Safety
/// `layout` is NULL or points at a handle.
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatrixLayoutCreate(
    layout: *mut Handle,
    ty: u32,
    rows: u64,
    cols: u64,
    ld: i64,
) -> u32 {
    guard("cublasLtMatrixLayoutCreate", || {
        if layout.is_null() {
            return Err(invalid("the layout pointer is NULL"));
        }
        let h = insert(Obj::Layout(Layout {
            ty,
            order: ORDER_COL,
            rows,
            cols,
            ld,
            batch_count: 1,
            batch_stride: 0,
            plane_offset: 0,
            batch_mode: 0,
        }));
        // SAFETY: caller contract.
        unsafe { out(layout, h as Handle, "the layout pointer") }
    })
}

#[no_mangle]
pub extern "C" fn cublasLtMatrixLayoutDestroy(layout: Handle) -> u32 {
    guard("cublasLtMatrixLayoutDestroy", || {
        destroy(layout, "a matrix layout", status::INVALID_VALUE, |o| {
            matches!(o, Obj::Layout(_))
        })
    })
}

/// # Safety
/// `buf` is NULL or has `size` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatrixLayoutSetAttribute(
    layout: Handle,
    attr: u32,
    buf: *const c_void,
    size: usize,
) -> u32 {
    guard("cublasLtMatrixLayoutSetAttribute", || {
        let (name, want) = table_attr(&LAYOUT_ATTRS, attr)
            .ok_or_else(|| invalid(format!("layout attribute {attr} does not exist")))?;
        // SAFETY: caller contract.
        let bytes = unsafe { attr_bytes(buf, size, name, want)? };
        let mut objs = objects().lock().unwrap();
        match objs.get_mut(&(layout as u64)) {
            Some(Obj::Layout(l)) => {
                l.set(attr, &bytes);
                Ok(())
            }
            _ => Err(invalid(not_a(layout as u64, "a matrix layout", &objs))),
        }
    })
}

/// # Safety
/// `buf` is NULL or has `size` writable bytes; `written` is NULL or points at a usize.
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatrixLayoutGetAttribute(
    layout: Handle,
    attr: u32,
    buf: *mut c_void,
    size: usize,
    written: *mut usize,
) -> u32 {
    guard("cublasLtMatrixLayoutGetAttribute", || {
        let (name, _) = table_attr(&LAYOUT_ATTRS, attr)
            .ok_or_else(|| invalid(format!("layout attribute {attr} does not exist")))?;
        let l = self::layout(layout, "layout")?;
        // SAFETY: caller contract.
        unsafe { attr_out(&l.get(attr), name, buf, size, written) }
    })
}

/// # Safety
/// `desc` is NULL or points at a handle.
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulDescCreate(
    desc: *mut Handle,
    compute: u32,
    scale: u32,
) -> u32 {
    guard("cublasLtMatmulDescCreate", || {
        if desc.is_null() {
            return Err(invalid("the descriptor pointer is NULL"));
        }
        if !COMPUTE_TYPES.contains(&compute) {
            return Err(invalid(format!(
                "compute type {compute} is not a cublasComputeType_t"
            )));
        }
        if scale > DATA_TYPE_MAX {
            return Err(invalid(format!("scale type {scale} is not a cudaDataType")));
        }
        let h = insert(Obj::Desc(Desc::new(compute, scale)));
        // SAFETY: caller contract.
        unsafe { out(desc, h as Handle, "the descriptor pointer") }
    })
}

#[no_mangle]
pub extern "C" fn cublasLtMatmulDescDestroy(desc: Handle) -> u32 {
    guard("cublasLtMatmulDescDestroy", || {
        destroy(desc, "a matmul descriptor", status::INVALID_VALUE, |o| {
            matches!(o, Obj::Desc(_))
        })
    })
}

/// # Safety
/// `buf` is NULL or has `size` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulDescSetAttribute(
    desc: Handle,
    attr: u32,
    buf: *const c_void,
    size: usize,
) -> u32 {
    guard("cublasLtMatmulDescSetAttribute", || {
        let (name, want) = desc_attr(attr)
            .ok_or_else(|| invalid(format!("matmul descriptor attribute {attr} does not exist")))?;
        // SAFETY: caller contract.
        let bytes = unsafe { attr_bytes(buf, size, name, want)? };
        let mut objs = objects().lock().unwrap();
        match objs.get_mut(&(desc as u64)) {
            Some(Obj::Desc(d)) => {
                d.attrs.insert(attr, bytes);
                Ok(())
            }
            _ => Err(invalid(not_a(desc as u64, "a matmul descriptor", &objs))),
        }
    })
}

/// # Safety
/// `buf` is NULL or has `size` writable bytes; `written` is NULL or points at a usize.
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulDescGetAttribute(
    desc: Handle,
    attr: u32,
    buf: *mut c_void,
    size: usize,
    written: *mut usize,
) -> u32 {
    guard("cublasLtMatmulDescGetAttribute", || {
        let (name, _) = desc_attr(attr)
            .ok_or_else(|| invalid(format!("matmul descriptor attribute {attr} does not exist")))?;
        let d = self::desc(desc)?;
        // SAFETY: caller contract.
        unsafe { attr_out(&d.attrs[&attr], name, buf, size, written) }
    })
}

/// # Safety
/// `pref` is NULL or points at a handle.
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulPreferenceCreate(pref: *mut Handle) -> u32 {
    guard("cublasLtMatmulPreferenceCreate", || {
        if pref.is_null() {
            return Err(invalid("the preference pointer is NULL"));
        }
        let h = insert(Obj::Pref(Pref::new()));
        // SAFETY: caller contract.
        unsafe { out(pref, h as Handle, "the preference pointer") }
    })
}

#[no_mangle]
pub extern "C" fn cublasLtMatmulPreferenceDestroy(pref: Handle) -> u32 {
    guard("cublasLtMatmulPreferenceDestroy", || {
        destroy(pref, "a matmul preference", status::INVALID_VALUE, |o| {
            matches!(o, Obj::Pref(_))
        })
    })
}

/// # Safety
/// `buf` is NULL or has `size` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulPreferenceSetAttribute(
    pref: Handle,
    attr: u32,
    buf: *const c_void,
    size: usize,
) -> u32 {
    guard("cublasLtMatmulPreferenceSetAttribute", || {
        let (name, want) = table_attr(&PREF_ATTRS, attr)
            .ok_or_else(|| invalid(format!("preference attribute {attr} does not exist")))?;
        // SAFETY: caller contract.
        let bytes = unsafe { attr_bytes(buf, size, name, want)? };
        let mut objs = objects().lock().unwrap();
        match objs.get_mut(&(pref as u64)) {
            Some(Obj::Pref(p)) => {
                p.attrs.insert(attr, bytes);
                Ok(())
            }
            _ => Err(invalid(not_a(pref as u64, "a matmul preference", &objs))),
        }
    })
}

/// # Safety
/// `buf` is NULL or has `size` writable bytes; `written` is NULL or points at a usize.
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulPreferenceGetAttribute(
    pref: Handle,
    attr: u32,
    buf: *mut c_void,
    size: usize,
    written: *mut usize,
) -> u32 {
    guard("cublasLtMatmulPreferenceGetAttribute", || {
        let (name, _) = table_attr(&PREF_ATTRS, attr)
            .ok_or_else(|| invalid(format!("preference attribute {attr} does not exist")))?;
        let p = self::pref(pref)?;
        // SAFETY: caller contract.
        unsafe { attr_out(&p.attrs[&attr], name, buf, size, written) }
    })
}

/// What a matmul's descriptors describe once checked: everything but the pointers and scalars.
#[derive(Clone, Debug)]
struct LtConfig {
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    trans_a: bool,
    b: Mat,
    trans_b: bool,
    c: Mat,
    d: Mat,
}

fn lt_op(v: i64, which: &str) -> BRes<bool> {
    match v {
        0 => Ok(false),
        1 | 2 => Ok(true),
        _ => Err(unsupported(format!(
            "{which} = {v}: only CUBLAS_OP_N and CUBLAS_OP_T apply to real types"
        ))),
    }
}

/// Checks one layout and returns it as a matrix (address filled in later).
fn lt_mat(name: &str, l: &Layout) -> BRes<Mat> {
    let ty = Ty::of(l.ty).ok_or_else(|| {
        unsupported(format!(
            "{name}: type {} is not one the simulator computes",
            type_name(l.ty)
        ))
    })?;
    let row_major = match l.order {
        ORDER_COL => false,
        ORDER_ROW => true,
        o => {
            return Err(unsupported(format!(
                "{name}: order {o}: only CUBLASLT_ORDER_COL and CUBLASLT_ORDER_ROW apply to \
                 floating-point matmuls"
            )))
        }
    };
    if l.batch_count <= 0 {
        return Err(invalid(format!(
            "{name}: batch count {} is not positive",
            l.batch_count
        )));
    }
    if l.batch_count != 1 {
        return Err(unsupported(format!(
            "{name}: batch count {}: the simulator models batch count 1",
            l.batch_count
        )));
    }
    if l.plane_offset != 0 {
        return Err(unsupported(format!(
            "{name}: a plane offset ({}) is for planar complex types",
            l.plane_offset
        )));
    }
    let max = i32::MAX as u64;
    if l.rows > max || l.cols > max {
        return Err(unsupported(format!(
            "{name}: {}x{} exceeds the 32-bit dimensions cuBLASLt supports",
            l.rows, l.cols
        )));
    }
    let inner = if row_major { l.cols } else { l.rows };
    if l.ld < inner.max(1) as i64 {
        return Err(invalid(format!(
            "{name}: leading dimension {} is less than max(1, {inner}), the {} of a {}x{} \
             {} matrix",
            l.ld,
            if row_major { "columns" } else { "rows" },
            l.rows,
            l.cols,
            if row_major {
                "row-major"
            } else {
                "column-major"
            }
        )));
    }
    Ok(Mat {
        addr: 0,
        ty,
        rows: l.rows as usize,
        cols: l.cols as usize,
        ld: l.ld as usize,
        row_major,
    })
}

/// Checks a matmul's descriptors as the heuristic and cublasLtMatmul do. `flip_a` is the
/// planted fault: TRANSA inverted.
fn lt_config(
    d: &Desc,
    la: &Layout,
    lb: &Layout,
    lc: &Layout,
    ld: &Layout,
    flip_a: bool,
) -> BRes<LtConfig> {
    let compute = d.get(D_COMPUTE) as u32;
    let scale = d.get(D_SCALE) as u32;
    if !matches!(compute, COMPUTE_32F | COMPUTE_32F_PEDANTIC) || scale != R_32F {
        return Err(unsupported(format!(
            "compute type {compute} with scale type {}: the simulator computes \
             CUBLAS_COMPUTE_32F(_PEDANTIC) with an f32 scale type only",
            type_name(scale)
        )));
    }
    if d.get(D_POINTER_MODE) != 0 {
        return Err(unsupported(format!(
            "pointer mode {}: the simulator reads alpha and beta from host memory only \
             (CUBLASLT_POINTER_MODE_HOST)",
            d.get(D_POINTER_MODE)
        )));
    }
    let must = |attr: u32, want: i64| -> BRes<()> {
        let v = d.get(attr);
        if v != want {
            let name = desc_attr(attr).map_or("?", |a| a.0);
            return Err(unsupported(format!(
                "descriptor attribute {name} = {v:#x}: the simulator models only the default \
                 ({want})"
            )));
        }
        Ok(())
    };
    must(D_TRANSC, OP_N as i64)?;
    must(D_FILL_MODE, FILL_FULL as i64)?;
    must(D_EPILOGUE, EPILOGUE_DEFAULT as i64)?;
    for (id, _, _) in DESC_ATTRS {
        if id > D_EPILOGUE && !DESC_INERT.contains(&id) {
            must(id, 0)?;
        }
    }
    let trans_a = lt_op(d.get(D_TRANSA), "TRANSA")? ^ flip_a;
    let trans_b = lt_op(d.get(D_TRANSB), "TRANSB")?;
    let a = lt_mat("A", la)?;
    let b = lt_mat("B", lb)?;
    let c = lt_mat("C", lc)?;
    let dm = lt_mat("D", ld)?;
    if !supported_types(la.ty, lb.ty, lc.ty) || lc.ty != ld.ty {
        return Err(unsupported(format!(
            "A {}, B {}, C {}, D {} with f32 compute is not a supported combination",
            type_name(la.ty),
            type_name(lb.ty),
            type_name(lc.ty),
            type_name(ld.ty)
        )));
    }
    let (m, n) = (dm.rows, dm.cols);
    let (am, ak) = if trans_a {
        (a.cols, a.rows)
    } else {
        (a.rows, a.cols)
    };
    let (bk, bn) = if trans_b {
        (b.cols, b.rows)
    } else {
        (b.rows, b.cols)
    };
    if am != m || bn != n || ak != bk || (c.rows, c.cols) != (m, n) {
        let t = |x: bool| if x { "T" } else { "N" };
        return Err(invalid(format!(
            "inconsistent dimensions: A {}x{} op {} is {am}x{ak}, B {}x{} op {} is {bk}x{bn}, \
             C {}x{}, D {m}x{n}",
            a.rows,
            a.cols,
            t(trans_a),
            b.rows,
            b.cols,
            t(trans_b),
            c.rows,
            c.cols
        )));
    }
    Ok(LtConfig {
        m,
        n,
        k: ak,
        a,
        trans_a,
        b,
        trans_b,
        c,
        d: dm,
    })
}

/// The simulator's one algorithm, as the heuristic describes it in cublasLtMatmulAlgo_t's
/// opaque words: [magic, workspace bytes, packed alignments A|B|C|D, 0...].
#[derive(Clone, Copy, Debug)]
struct Algo {
    workspace: u64,
    align: [u32; 4],
}

impl Algo {
    /// The algorithm the heuristic picks under a workspace limit and operand alignments.
    fn choose(max_workspace: u64, align: [u32; 4]) -> Algo {
        Algo {
            workspace: if max_workspace >= ALGO_WORKSPACE {
                ALGO_WORKSPACE
            } else {
                0
            },
            // The kernels vectorise up to 16 bytes, and as far as the pointers allow (a
            // power of two: an odd preference rounds down).
            align: align.map(|a| {
                let a = a.clamp(1, MAX_VECTOR);
                1 << (31 - a.leading_zeros())
            }),
        }
    }

    fn encode(self) -> [u64; 8] {
        let mut w = [0u64; 8];
        w[0] = ALGO_MAGIC;
        w[1] = self.workspace;
        w[2] = self
            .align
            .iter()
            .enumerate()
            .fold(0, |acc, (i, a)| acc | ((*a as u64) << (16 * i)));
        w
    }

    fn decode(w: &[u64; 8]) -> Option<Algo> {
        if w[0] != ALGO_MAGIC {
            return None;
        }
        Some(Algo {
            workspace: w[1],
            align: std::array::from_fn(|i| ((w[2] >> (16 * i)) & 0xFFFF) as u32),
        })
    }
}

/// cublasLtMatmulHeuristicResult_t.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct HeuristicResult {
    pub algo: [u64; 8],
    pub workspace_size: usize,
    pub state: u32,
    pub waves_count: f32,
    pub reserved: [c_int; 4],
}

/// The heuristic: one algorithm for every configuration the simulator computes (state SUCCESS,
/// workspace within the preference's maximum), NOT_SUPPORTED for the others.
///
/// # Safety
/// `results` has room for `requested` results; `count` is NULL or points at an int.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cublasLtMatmulAlgoGetHeuristic(
    handle: Handle,
    op: Handle,
    a: Handle,
    b: Handle,
    c: Handle,
    d: Handle,
    preference: Handle,
    requested: c_int,
    results: *mut HeuristicResult,
    count: *mut c_int,
) -> u32 {
    guard("cublasLtMatmulAlgoGetHeuristic", || {
        lt_handle(handle)?;
        let dsc = desc(op)?;
        let (la, lb) = (layout(a, "Adesc")?, layout(b, "Bdesc")?);
        let (lc, ld) = (layout(c, "Cdesc")?, layout(d, "Ddesc")?);
        let pr = pref(preference)?;
        if requested <= 0 {
            return Err(invalid(format!(
                "requestedAlgoCount = {requested} is not positive"
            )));
        }
        if results.is_null() || count.is_null() {
            return Err(invalid("the results array or the count pointer is NULL"));
        }
        let cfg = lt_config(&dsc, &la, &lb, &lc, &ld, false)?;
        let align: [u32; 4] = std::array::from_fn(|i| pr.get(P_ALIGN_A + i as u32) as u32);
        for (i, (name, m)) in [("A", cfg.a), ("B", cfg.b), ("C", cfg.c), ("D", cfg.d)]
            .iter()
            .enumerate()
        {
            if (align[i] as u64) < m.ty.size() {
                return Err(unsupported(format!(
                    "no algorithm for {name} aligned to {} bytes (less than its {}-byte \
                     elements)",
                    align[i],
                    m.ty.size()
                )));
            }
        }
        let algo = Algo::choose(pr.get(P_MAX_WORKSPACE), align);
        let r = HeuristicResult {
            algo: algo.encode(),
            workspace_size: algo.workspace as usize,
            state: status::SUCCESS,
            waves_count: 1.0,
            reserved: [0; 4],
        };
        // SAFETY: `results` has room for `requested` ≥ 1 results; `count` is an int.
        unsafe {
            results.write_unaligned(r);
            count.write_unaligned(1);
        }
        Ok(())
    })
}

/// Counts cublasLtMatmul calls, for the planted fault `lt-flip-transa:N`.
static LT_CALLS: AtomicU64 = AtomicU64::new(0);

/// D = alpha op(A) op(B) + beta C through descriptors (the engine's default GEMM path).
///
/// # Safety
/// `alpha` and `beta` point at host f32 values; `algo` is NULL or points at an algorithm.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cublasLtMatmul(
    handle: Handle,
    op: Handle,
    alpha: *const c_void,
    a: *const c_void,
    adesc: Handle,
    b: *const c_void,
    bdesc: Handle,
    beta: *const c_void,
    c: *const c_void,
    cdesc: Handle,
    d: *mut c_void,
    ddesc: Handle,
    algo: *const [u64; 8],
    workspace: *mut c_void,
    workspace_bytes: usize,
    stream: *mut c_void,
) -> u32 {
    let call = LT_CALLS.fetch_add(1, Ordering::Relaxed);
    guard("cublasLtMatmul", || {
        lt_handle(handle)?;
        let dsc = desc(op)?;
        let (la, lb) = (layout(adesc, "Adesc")?, layout(bdesc, "Bdesc")?);
        let (lc, ld) = (layout(cdesc, "Cdesc")?, layout(ddesc, "Ddesc")?);
        let flip = sim().cfg.faults.lt_flip_transa == Some(call);
        if flip {
            eprintln!(
                "gpu-sim: planted fault lt-flip-transa:{call}: cublasLtMatmul call #{call} runs \
                 with TRANSA flipped"
            );
        }
        let cfg = lt_config(&dsc, &la, &lb, &lc, &ld, flip)?;
        if c as u64 == d as u64 && lc != ld {
            return Err(invalid(
                "C and D are the same buffer (in place) but Cdesc and Ddesc differ",
            ));
        }
        // SAFETY: caller contract (host f32 scalars: pointer mode host, scale type f32).
        let alpha = unsafe { host_scalar(alpha, "alpha")? };
        // SAFETY: as above.
        let beta = unsafe { host_scalar(beta, "beta")? };
        let chosen = if algo.is_null() {
            // No algorithm: an implicit heuristic under the workspace given, assuming what the
            // pointers' own alignment allows.
            let align =
                [a as u64, b as u64, c as u64, d as u64].map(|p| 1u32 << p.trailing_zeros().min(8));
            Algo::choose(workspace_bytes as u64, align)
        } else {
            // SAFETY: caller contract (a cublasLtMatmulAlgo_t, 64 bytes).
            let words = unsafe { algo.read_unaligned() };
            Algo::decode(&words).ok_or_else(|| {
                invalid("algo was not filled in by cublasLtMatmulAlgoGetHeuristic")
            })?
        };
        if (workspace_bytes as u64) < chosen.workspace {
            return Err(invalid(format!(
                "the algorithm needs {} bytes of workspace, but workspaceSizeInBytes is \
                 {workspace_bytes}",
                chosen.workspace
            )));
        }
        if chosen.workspace > 0 && workspace.is_null() {
            return Err(invalid(format!(
                "the algorithm needs {} bytes of workspace, but the workspace is NULL",
                chosen.workspace
            )));
        }
        let at = |m: Mat, p: u64| Mat { addr: p, ..m };
        let p = Problem {
            api: "cublasLtMatmul",
            m: cfg.m,
            n: cfg.n,
            k: cfg.k,
            a: at(cfg.a, a as u64),
            trans_a: cfg.trans_a,
            b: at(cfg.b, b as u64),
            trans_b: cfg.trans_b,
            c: at(cfg.c, c as u64),
            d: at(cfg.d, d as u64),
            alpha,
            beta,
            align: chosen.align,
            workspace: (workspace as u64, chosen.workspace),
        };
        enqueue(p, stream as u64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algo_round_trips_through_its_opaque_words() {
        let a = Algo::choose(32 << 20, [256, 2, 128, 16]);
        assert_eq!(a.workspace, ALGO_WORKSPACE);
        assert_eq!(a.align, [16, 2, 16, 16]);
        let b = Algo::decode(&a.encode()).unwrap();
        assert_eq!((b.workspace, b.align), (a.workspace, a.align));
        assert!(Algo::decode(&[0; 8]).is_none());
        assert_eq!(Algo::choose(ALGO_WORKSPACE - 1, [256; 4]).workspace, 0);
        assert_eq!(Algo::choose(0, [6, 12, 3, 1]).align, [4, 8, 2, 1]);
    }

    #[test]
    fn heuristic_result_has_the_c_layout() {
        assert_eq!(std::mem::size_of::<HeuristicResult>(), 96);
        assert_eq!(std::mem::offset_of!(HeuristicResult, workspace_size), 64);
        assert_eq!(std::mem::offset_of!(HeuristicResult, state), 72);
    }

    #[test]
    fn spans_cover_the_last_element() {
        let m = Mat {
            addr: 0,
            ty: Ty::Bf16,
            rows: 3,
            cols: 4,
            ld: 5,
            row_major: false,
        };
        assert_eq!(m.span(), 3 * 5 + 3);
        let r = Mat {
            row_major: true,
            ld: 6,
            ..m
        };
        assert_eq!(r.span(), 2 * 6 + 4);
        assert_eq!(Mat { rows: 0, ..m }.span(), 0);
    }
}
