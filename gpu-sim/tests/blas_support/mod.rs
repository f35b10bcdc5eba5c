//! Shared by the cuBLAS/cuBLASLt tests: a context, device buffers, the tests' own bf16
//! rounding, a naive reference product, and drivers for cublasLtMatmul and cublasGemmEx that
//! call the exported functions as cudarc does.
//!
//! Constants are CUDA 13's header values, written here rather than taken from the simulator, so
//! a wrong value there is a failing test here.

#![allow(dead_code)]

use gpu_sim::blas::*;
use gpu_sim::driver::*;
use std::ffi::{c_void, CStr};
use std::ptr::null_mut;

pub type Handle = *mut c_void;

pub const SUCCESS: u32 = 0;
pub const NOT_INITIALIZED: u32 = 1;
pub const INVALID_VALUE: u32 = 7;
pub const EXECUTION_FAILED: u32 = 13;
pub const NOT_SUPPORTED: u32 = 15;

pub const R_32F: u32 = 0;
pub const R_16F: u32 = 2;
pub const R_16BF: u32 = 14;
pub const COMPUTE_16F: u32 = 64;
pub const COMPUTE_32F: u32 = 68;
pub const OP_N: u32 = 0;
pub const OP_T: u32 = 1;
pub const ORDER_COL: i32 = 0;
pub const ORDER_ROW: i32 = 1;
pub const ORDER_COL32: i32 = 2;

pub const DESC_POINTER_MODE: u32 = 2;
pub const DESC_TRANSA: u32 = 3;
pub const DESC_TRANSB: u32 = 4;
pub const DESC_EPILOGUE: u32 = 7;
pub const EPILOGUE_RELU: u32 = 2;
pub const LAYOUT_TYPE: u32 = 0;
pub const LAYOUT_ORDER: u32 = 1;
pub const LAYOUT_ROWS: u32 = 2;
pub const LAYOUT_LD: u32 = 4;
pub const LAYOUT_BATCH_COUNT: u32 = 5;
pub const PREF_MAX_WORKSPACE: u32 = 1;
pub const PREF_ALIGN_A: u32 = 5;

pub const CUDA_ERROR_ILLEGAL_ADDRESS: i32 = 700;
pub const CUDA_ERROR_MISALIGNED_ADDRESS: i32 = 716;

/// Makes device `dev`'s primary context current on this thread.
pub fn ctx(dev: i32) {
    // SAFETY: out-pointers to locals.
    unsafe {
        assert_eq!(cuInit(0), 0);
        let mut c = null_mut();
        assert_eq!(cuDevicePrimaryCtxRetain(&mut c, dev), 0);
        assert_eq!(cuCtxSetCurrent(c), 0);
    }
}

pub fn alloc(bytes: usize) -> u64 {
    let mut p = 0u64;
    // SAFETY: out-pointer to a local.
    assert_eq!(unsafe { cuMemAlloc_v2(&mut p, bytes.max(1)) }, 0);
    p
}

pub fn upload(bytes: &[u8]) -> u64 {
    let p = alloc(bytes.len());
    // SAFETY: `bytes` has bytes.len() bytes.
    assert_eq!(
        unsafe { cuMemcpyHtoD_v2(p, bytes.as_ptr() as *const c_void, bytes.len()) },
        0
    );
    p
}

pub fn download(p: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    // SAFETY: `v` has len bytes.
    assert_eq!(
        unsafe { cuMemcpyDtoH_v2(v.as_mut_ptr() as *mut c_void, p, len) },
        0
    );
    v
}

pub fn free(p: u64) {
    assert_eq!(cuMemFree_v2(p), 0);
}

/// The detail the simulator recorded for a CUDA error code.
pub fn error_string(code: i32) -> String {
    let mut s = std::ptr::null();
    // SAFETY: out-pointer to a local; the string is static while the process lives.
    unsafe {
        assert_eq!(cuGetErrorString(code, &mut s), 0);
        CStr::from_ptr(s).to_string_lossy().into_owned()
    }
}

// ---------------------------------------------------------------- numbers

/// f32 -> bf16 bits, round to nearest, ties to even (the tests' own).
pub fn bf16_rne(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    let lower = b & 0xFFFF;
    let mut hi = b >> 16;
    if lower > 0x8000 || (lower == 0x8000 && hi & 1 == 1) {
        hi += 1;
    }
    hi as u16
}

pub fn bf16_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// The spacing of bf16 values at `x` (one unit in the last place).
pub fn bf16_ulp(x: f32) -> f32 {
    let e = ((x.to_bits() >> 23) & 0xFF).max(1) as i32;
    2f32.powi(e - 127 - 7)
}

/// A deterministic sequence of small dyadic values (multiples of 1/8 in [-2, 2]): exact in
/// bf16, and every product and sum of up to thousands of them is exact in f32, so the expected
/// results do not depend on summation order.
pub struct Gen(u64);

impl Gen {
    pub fn new(seed: u64) -> Gen {
        Gen(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    pub fn dyadic(&mut self) -> f32 {
        ((self.next() % 33) as i32 - 16) as f32 / 8.0
    }
    /// A bf16 value with a full 8-bit significand in ±[0.5, 2).
    pub fn full_bf16(&mut self) -> f32 {
        let r = self.next();
        let sign = (r & 1) << 15;
        let exp = 126 + (r >> 1) % 2; // 2^-1 or 2^0
        let man = (r >> 2) & 0x7F;
        bf16_f32((sign | (exp << 7) | man) as u16)
    }
}

/// A stored matrix on the host: `rows x cols` with leading dimension `ld` in either order, the
/// gaps between rows/columns filled with NaN (which no correct product reads).
#[derive(Clone, Debug)]
pub struct HostMat {
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
    pub row_major: bool,
    pub data: Vec<f32>,
}

impl HostMat {
    pub fn new(rows: usize, cols: usize, pad: usize, row_major: bool) -> HostMat {
        let inner = if row_major { cols } else { rows };
        let outer = if row_major { rows } else { cols };
        let ld = inner.max(1) + pad;
        let span = if rows == 0 || cols == 0 {
            0
        } else {
            (outer - 1) * ld + inner
        };
        HostMat {
            rows,
            cols,
            ld,
            row_major,
            data: vec![f32::NAN; span],
        }
    }

    pub fn idx(&self, r: usize, c: usize) -> usize {
        if self.row_major {
            r * self.ld + c
        } else {
            r + c * self.ld
        }
    }

    pub fn at(&self, r: usize, c: usize) -> f32 {
        self.data[self.idx(r, c)]
    }

    pub fn fill(mut self, mut f: impl FnMut() -> f32) -> HostMat {
        for c in 0..self.cols {
            for r in 0..self.rows {
                let i = self.idx(r, c);
                self.data[i] = f();
            }
        }
        self
    }

    /// The bytes as `ty` (values must be exact in bf16 when `ty` is bf16).
    pub fn bytes(&self, ty: u32) -> Vec<u8> {
        match ty {
            R_16BF => self
                .data
                .iter()
                .flat_map(|&x| {
                    let b = bf16_rne(x);
                    assert!(x.is_nan() || bf16_f32(b) == x, "{x} is not a bf16 value");
                    b.to_le_bytes()
                })
                .collect(),
            R_32F => self.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            _ => panic!("type {ty}"),
        }
    }

    /// Decodes device bytes of type `ty` with this matrix's shape.
    pub fn decode(&self, bytes: &[u8], ty: u32) -> Vec<f32> {
        match ty {
            R_16BF => bytes
                .chunks(2)
                .map(|c| bf16_f32(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
            _ => bytes
                .chunks(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        }
    }
}

/// One product to check: D (m x n) = alpha op(A) op(B) + beta C, C = D in place.
#[derive(Clone, Copy, Debug)]
pub struct Case {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub ta: bool,
    pub tb: bool,
    pub row_a: bool,
    pub row_b: bool,
    pub row_c: bool,
    /// Extra leading-dimension elements of every operand.
    pub pad: usize,
    pub c_f32: bool,
    pub alpha: f32,
    pub beta: f32,
}

impl Case {
    /// A 4x5 (op N) times 5x3 (op N) into 4x3, bf16 in, f32 out, column-major, tight: the
    /// product the error-path tests use.
    pub fn small() -> Case {
        Case {
            m: 4,
            n: 3,
            k: 5,
            ta: false,
            tb: false,
            row_a: false,
            row_b: false,
            row_c: false,
            pad: 0,
            c_f32: true,
            alpha: 1.0,
            beta: 0.0,
        }
    }

    pub fn c_type(&self) -> u32 {
        if self.c_f32 {
            R_32F
        } else {
            R_16BF
        }
    }

    /// A, B and C as stored (A k x m when transposed, B n x k when transposed).
    pub fn operands(&self, seed: u64) -> (HostMat, HostMat, HostMat) {
        let mut g = Gen::new(seed);
        let (ar, ac) = if self.ta {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        };
        let (br, bc) = if self.tb {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        };
        let a = HostMat::new(ar, ac, self.pad, self.row_a).fill(|| g.dyadic());
        let b = HostMat::new(br, bc, self.pad, self.row_b).fill(|| g.dyadic());
        let c = HostMat::new(self.m, self.n, self.pad, self.row_c);
        // beta = 0: C holds NaN everywhere, which must not reach D.
        let c = if self.beta == 0.0 {
            c
        } else {
            c.fill(|| g.dyadic())
        };
        (a, b, c)
    }
}

/// The naive product in f64: element (i, j) of alpha op(A) op(B) + beta C, and the sum of the
/// magnitudes that went into it (for error bounds).
pub fn reference(case: &Case, a: &HostMat, b: &HostMat, c: &HostMat) -> Vec<(f64, f64)> {
    let opa = |i: usize, p: usize| if case.ta { a.at(p, i) } else { a.at(i, p) } as f64;
    let opb = |p: usize, j: usize| if case.tb { b.at(j, p) } else { b.at(p, j) } as f64;
    let mut out = Vec::with_capacity(case.m * case.n);
    for j in 0..case.n {
        for i in 0..case.m {
            let (mut s, mut mag) = (0f64, 0f64);
            for p in 0..case.k {
                s += opa(i, p) * opb(p, j);
                mag += (opa(i, p) * opb(p, j)).abs();
            }
            let alpha = case.alpha as f64;
            let mut v = alpha * s;
            mag *= alpha.abs();
            if case.beta != 0.0 {
                let cv = case.beta as f64 * c.at(i, j) as f64;
                v += cv;
                mag += cv.abs();
            }
            out.push((v, mag));
        }
    }
    out
}

/// Checks D against the reference: bf16 within one bf16 ulp of the reference rounded to bf16
/// (plus the f32 accumulation's error bound, zero for the dyadic values); f32 within a small
/// relative bound; and every element between D's rows/columns left as it was.
pub fn check(case: &Case, want: &[(f64, f64)], c_before: &HostMat, d_after: &[f32], what: &str) {
    let fmt_case = format!("{what} {case:?}");
    for j in 0..case.n {
        for i in 0..case.m {
            let (v, mag) = want[i + j * case.m];
            let got = d_after[c_before.idx(i, j)];
            // f32 accumulation error bound: k+2 roundings of sums no larger than `mag`.
            let acc = (case.k as f64 + 2.0) * f32::EPSILON as f64 * mag;
            if case.c_f32 {
                let tol = acc + 1e-30;
                assert!(
                    (got as f64 - v).abs() <= tol,
                    "{fmt_case}: D({i},{j}) = {got}, expected {v} (tolerance {tol})"
                );
            } else {
                let r = bf16_f32(bf16_rne(v as f32));
                let tol = bf16_ulp(r) as f64 + acc;
                assert!(
                    (got as f64 - r as f64).abs() <= tol,
                    "{fmt_case}: D({i},{j}) = {got}, expected {r} (bf16 of {v}, tolerance {tol})"
                );
            }
        }
    }
    // The gaps of D (between its columns or rows) are not D's elements: untouched.
    let mut inside = vec![false; c_before.data.len()];
    for j in 0..case.n {
        for i in 0..case.m {
            inside[c_before.idx(i, j)] = true;
        }
    }
    for (x, (&before, &after)) in c_before.data.iter().zip(d_after).enumerate() {
        if !inside[x] {
            assert!(
                before.to_bits() == after.to_bits() || (before.is_nan() && after.is_nan()),
                "{fmt_case}: element {x} of D's storage is not in D but changed from {before} to \
                 {after}"
            );
        }
    }
}

// ---------------------------------------------------------------- cuBLASLt

pub struct Lt(pub Handle);

impl Lt {
    pub fn new() -> Lt {
        let mut h = null_mut();
        // SAFETY: out-pointer to a local.
        assert_eq!(unsafe { cublasLtCreate(&mut h) }, SUCCESS);
        Lt(h)
    }
}

impl Drop for Lt {
    fn drop(&mut self) {
        assert_eq!(cublasLtDestroy(self.0), SUCCESS);
    }
}

/// Sets an attribute from a value's bytes.
pub fn set_desc<T>(d: Handle, attr: u32, v: T) -> u32 {
    // SAFETY: `v` lives across the call, size_of::<T>() bytes.
    unsafe {
        cublasLtMatmulDescSetAttribute(
            d,
            attr,
            &v as *const T as *const c_void,
            std::mem::size_of::<T>(),
        )
    }
}

pub fn set_layout<T>(l: Handle, attr: u32, v: T) -> u32 {
    // SAFETY: as set_desc.
    unsafe {
        cublasLtMatrixLayoutSetAttribute(
            l,
            attr,
            &v as *const T as *const c_void,
            std::mem::size_of::<T>(),
        )
    }
}

pub fn set_pref<T>(p: Handle, attr: u32, v: T) -> u32 {
    // SAFETY: as set_desc.
    unsafe {
        cublasLtMatmulPreferenceSetAttribute(
            p,
            attr,
            &v as *const T as *const c_void,
            std::mem::size_of::<T>(),
        )
    }
}

pub fn make_desc(compute: u32, scale: u32, ta: bool, tb: bool) -> Handle {
    let mut d = null_mut();
    // SAFETY: out-pointer to a local.
    assert_eq!(
        unsafe { cublasLtMatmulDescCreate(&mut d, compute, scale) },
        SUCCESS
    );
    let op = |t: bool| if t { OP_T as i32 } else { OP_N as i32 };
    assert_eq!(set_desc(d, DESC_TRANSA, op(ta)), SUCCESS);
    assert_eq!(set_desc(d, DESC_TRANSB, op(tb)), SUCCESS);
    d
}

pub fn make_layout(ty: u32, rows: u64, cols: u64, ld: i64, order: i32) -> Handle {
    let mut l = null_mut();
    // SAFETY: out-pointer to a local.
    assert_eq!(
        unsafe { cublasLtMatrixLayoutCreate(&mut l, ty, rows, cols, ld) },
        SUCCESS
    );
    assert_eq!(set_layout(l, LAYOUT_ORDER, order), SUCCESS);
    l
}

pub fn layout_of(m: &HostMat, ty: u32) -> Handle {
    make_layout(
        ty,
        m.rows as u64,
        m.cols as u64,
        m.ld as i64,
        if m.row_major { ORDER_ROW } else { ORDER_COL },
    )
}

pub fn make_pref(max_workspace: u64, align: u32) -> Handle {
    let mut p = null_mut();
    // SAFETY: out-pointer to a local.
    assert_eq!(unsafe { cublasLtMatmulPreferenceCreate(&mut p) }, SUCCESS);
    assert_eq!(set_pref(p, PREF_MAX_WORKSPACE, max_workspace), SUCCESS);
    for a in PREF_ALIGN_A..PREF_ALIGN_A + 4 {
        assert_eq!(set_pref(p, a, align), SUCCESS);
    }
    p
}

/// Everything one cublasLtMatmul needs besides the pointers.
pub struct Plan {
    pub desc: Handle,
    pub a: Handle,
    pub b: Handle,
    pub c: Handle,
    pub pref: Handle,
}

impl Plan {
    pub fn new(desc: Handle, a: Handle, b: Handle, c: Handle, pref: Handle) -> Plan {
        Plan {
            desc,
            a,
            b,
            c,
            pref,
        }
    }

    /// The heuristic's status, result count and first result.
    pub fn heuristic(&self, lt: &Lt) -> (u32, i32, HeuristicResult) {
        let mut r = HeuristicResult {
            algo: [0; 8],
            workspace_size: usize::MAX,
            state: 99,
            waves_count: 0.0,
            reserved: [0; 4],
        };
        let mut n = 0;
        // SAFETY: room for one result; out-pointers to locals.
        let s = unsafe {
            cublasLtMatmulAlgoGetHeuristic(
                lt.0, self.desc, self.a, self.b, self.c, self.c, self.pref, 1, &mut r, &mut n,
            )
        };
        (s, n, r)
    }

    /// cublasLtMatmul with C = D (same pointer, same layout).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &self,
        lt: &Lt,
        alpha: f32,
        a: u64,
        b: u64,
        beta: f32,
        c: u64,
        algo: Option<&[u64; 8]>,
        ws: u64,
        ws_bytes: usize,
        stream: Handle,
    ) -> u32 {
        // SAFETY: alpha and beta are host f32s that outlive the call; the algo, if any, came
        // from the heuristic.
        unsafe {
            cublasLtMatmul(
                lt.0,
                self.desc,
                &alpha as *const f32 as *const c_void,
                a as *const c_void,
                self.a,
                b as *const c_void,
                self.b,
                &beta as *const f32 as *const c_void,
                c as *const c_void,
                self.c,
                c as *mut c_void,
                self.c,
                algo.map_or(std::ptr::null(), |a| a as *const [u64; 8]),
                ws as *mut c_void,
                ws_bytes,
                stream,
            )
        }
    }
}

impl Drop for Plan {
    fn drop(&mut self) {
        assert_eq!(cublasLtMatmulDescDestroy(self.desc), SUCCESS);
        for l in [self.a, self.b, self.c] {
            assert_eq!(cublasLtMatrixLayoutDestroy(l), SUCCESS);
        }
        assert_eq!(cublasLtMatmulPreferenceDestroy(self.pref), SUCCESS);
    }
}

/// The plan for `case` with bf16 A and B, as the engine builds it.
pub fn plan_for(case: &Case, a: &HostMat, b: &HostMat, c: &HostMat, max_ws: u64) -> Plan {
    Plan::new(
        make_desc(COMPUTE_32F, R_32F, case.ta, case.tb),
        layout_of(a, R_16BF),
        layout_of(b, R_16BF),
        layout_of(c, case.c_type()),
        make_pref(max_ws, 256),
    )
}

/// Runs `case` through the heuristic and cublasLtMatmul on the legacy stream of the current
/// context; returns D's storage as read back.
pub fn run_lt(lt: &Lt, case: &Case, a: &HostMat, b: &HostMat, c: &HostMat) -> Vec<f32> {
    const WS: usize = 32 << 20;
    let plan = plan_for(case, a, b, c, WS as u64);
    let (s, n, r) = plan.heuristic(lt);
    assert_eq!((s, n, r.state), (SUCCESS, 1, SUCCESS), "heuristic {case:?}");
    assert!(r.workspace_size <= WS, "{case:?}");
    let (da, db) = (upload(&a.bytes(R_16BF)), upload(&b.bytes(R_16BF)));
    let dc = upload(&c.bytes(case.c_type()));
    let ws = alloc(WS);
    let s = plan.matmul(
        lt,
        case.alpha,
        da,
        db,
        case.beta,
        dc,
        Some(&r.algo),
        ws,
        WS,
        null_mut(),
    );
    assert_eq!(s, SUCCESS, "cublasLtMatmul {case:?}");
    let esize = if case.c_f32 { 4 } else { 2 };
    let out = c.decode(&download(dc, c.data.len() * esize), case.c_type());
    for p in [da, db, dc, ws] {
        free(p);
    }
    out
}

// ---------------------------------------------------------------- cuBLAS

pub struct Blas(pub Handle);

impl Blas {
    pub fn new() -> Blas {
        let mut h = null_mut();
        // SAFETY: out-pointer to a local.
        assert_eq!(unsafe { cublasCreate_v2(&mut h) }, SUCCESS);
        Blas(h)
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        assert_eq!(cublasDestroy_v2(self.0), SUCCESS);
    }
}

/// cublasGemmEx with f32 compute, host alpha/beta.
#[allow(clippy::too_many_arguments)]
pub fn gemm_ex(
    h: &Blas,
    (ta, tb): (bool, bool),
    (m, n, k): (i32, i32, i32),
    alpha: f32,
    (a, a_type, lda): (u64, u32, i32),
    (b, b_type, ldb): (u64, u32, i32),
    beta: f32,
    (c, c_type, ldc): (u64, u32, i32),
    compute: u32,
) -> u32 {
    let op = |t: bool| if t { OP_T } else { OP_N };
    // SAFETY: host scalars that outlive the call.
    unsafe {
        cublasGemmEx(
            h.0,
            op(ta),
            op(tb),
            m,
            n,
            k,
            &alpha as *const f32 as *const c_void,
            a as *const c_void,
            a_type,
            lda,
            b as *const c_void,
            b_type,
            ldb,
            &beta as *const f32 as *const c_void,
            c as *mut c_void,
            c_type,
            ldc,
            compute,
            -1,
        )
    }
}

/// Runs a column-major `case` through cublasGemmEx on the handle's stream; returns C's storage.
pub fn run_gemm_ex(h: &Blas, case: &Case, a: &HostMat, b: &HostMat, c: &HostMat) -> Vec<f32> {
    assert!(!a.row_major && !b.row_major && !c.row_major);
    let (da, db) = (upload(&a.bytes(R_16BF)), upload(&b.bytes(R_16BF)));
    let dc = upload(&c.bytes(case.c_type()));
    let s = gemm_ex(
        h,
        (case.ta, case.tb),
        (case.m as i32, case.n as i32, case.k as i32),
        case.alpha,
        (da, R_16BF, a.ld as i32),
        (db, R_16BF, b.ld as i32),
        case.beta,
        (dc, case.c_type(), c.ld as i32),
        COMPUTE_32F,
    );
    assert_eq!(s, SUCCESS, "cublasGemmEx {case:?}");
    let esize = if case.c_f32 { 4 } else { 2 };
    let out = c.decode(&download(dc, c.data.len() * esize), case.c_type());
    for p in [da, db, dc] {
        free(p);
    }
    out
}
