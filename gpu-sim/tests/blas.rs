//! cuBLASLt and cuBLAS against a naive reference: every transpose combination, row- and
//! column-major layouts, odd shapes, padded leading dimensions, beta 0 over NaN, beta 1 in
//! place, bf16 and f32 outputs; and the arguments the real libraries refuse.

mod blas_support;

use blas_support::*;
use gpu_sim::blas::*;
use gpu_sim::driver::*;
use std::ffi::{c_void, CStr};
use std::mem::ManuallyDrop;
use std::ptr::null_mut;

const SHAPES: [(usize, usize, usize); 6] = [
    (1, 1, 1),
    (7, 33, 130),
    (130, 7, 33),
    (33, 130, 7),
    (1, 7, 33),
    (33, 1, 1),
];

/// (row_a, row_b, row_c) combinations.
const ORDERS: [(bool, bool, bool); 4] = [
    (false, false, false),
    (true, true, true),
    (true, false, true),
    (false, true, false),
];

fn cases(orders: &[(bool, bool, bool)]) -> Vec<Case> {
    let mut v = Vec::new();
    let mut i = 0;
    for &(m, n, k) in &SHAPES {
        for ta in [false, true] {
            for tb in [false, true] {
                for &(row_a, row_b, row_c) in orders {
                    for c_f32 in [false, true] {
                        for beta in [0.0, 1.0] {
                            i += 1;
                            v.push(Case {
                                m,
                                n,
                                k,
                                ta,
                                tb,
                                row_a,
                                row_b,
                                row_c,
                                // Padded leading dimensions on every other case.
                                pad: if i % 2 == 0 { 3 } else { 0 },
                                c_f32,
                                // Scaled alpha/beta on every fifth case.
                                alpha: if i % 5 == 0 { 2.0 } else { 1.0 },
                                beta: if i % 5 == 0 && beta != 0.0 { 0.5 } else { beta },
                            });
                        }
                    }
                }
            }
        }
    }
    v
}

#[test]
fn lt_matmul_matches_the_reference_for_every_transpose_order_and_shape() {
    ctx(0);
    let lt = Lt::new();
    let all = cases(&ORDERS);
    assert_eq!(all.len(), 6 * 4 * 4 * 2 * 2);
    for (i, case) in all.iter().enumerate() {
        let (a, b, c) = case.operands(i as u64);
        let want = reference(case, &a, &b, &c);
        let got = run_lt(&lt, case, &a, &b, &c);
        check(case, &want, &c, &got, "cublasLtMatmul");
    }
}

#[test]
fn gemm_ex_matches_the_reference_for_every_transpose_and_shape() {
    ctx(0);
    let h = Blas::new();
    let all = cases(&[(false, false, false)]);
    for (i, case) in all.iter().enumerate() {
        let (a, b, c) = case.operands(1000 + i as u64);
        let want = reference(case, &a, &b, &c);
        let got = run_gemm_ex(&h, case, &a, &b, &c);
        check(case, &want, &c, &got, "cublasGemmEx");
    }
}

/// Values with full bf16 significands, whose f32 sums do round: within the accumulation bound.
#[test]
fn full_precision_bf16_inputs_are_within_the_f32_accumulation_bound() {
    ctx(0);
    let lt = Lt::new();
    for (i, c_f32) in [false, true].into_iter().enumerate() {
        let case = Case {
            m: 65,
            n: 31,
            k: 257,
            ta: true,
            tb: false,
            row_a: false,
            row_b: false,
            row_c: false,
            pad: 1,
            c_f32,
            alpha: 1.0,
            beta: 1.0,
        };
        let (a, b, c) = case.operands(7 + i as u64);
        let mut g = Gen::new(99);
        let a = a.fill(|| g.full_bf16());
        let b = b.fill(|| g.full_bf16());
        let c = c.fill(|| g.full_bf16());
        let want = reference(&case, &a, &b, &c);
        let got = run_lt(&lt, &case, &a, &b, &c);
        check(&case, &want, &c, &got, "full-precision");
    }
}

/// bf16 output rounds to nearest, ties to even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7
/// (rounds down, to the even significand); 1 + 2^-7 + 2^-8 is halfway between 1 + 2^-7 and
/// 1 + 2^-6 (rounds up, to the even one); a hair above the first tie rounds up.
#[test]
fn bf16_output_rounds_to_nearest_even() {
    ctx(0);
    let lt = Lt::new();
    let h = Blas::new();
    let p8 = 2f32.powi(-8);
    for (bv, want) in [
        (vec![1.0, p8, 0.0], 1.0),
        (vec![1.0 + 2.0 * p8, p8, 0.0], 1.0 + 4.0 * p8),
        (vec![1.0, p8, p8 * p8], 1.0 + 2.0 * p8),
        (vec![-1.0, -p8, 0.0], -1.0),
    ] {
        let case = Case {
            m: 1,
            n: 1,
            k: 3,
            ta: false,
            tb: false,
            row_a: false,
            row_b: false,
            row_c: false,
            pad: 0,
            c_f32: false,
            alpha: 1.0,
            beta: 0.0,
        };
        let a = HostMat::new(1, 3, 0, false).fill(|| 1.0);
        let mut it = bv.iter().copied();
        let b = HostMat::new(3, 1, 0, false).fill(|| it.next().unwrap());
        let c = HostMat::new(1, 1, 0, false);
        assert_eq!(run_lt(&lt, &case, &a, &b, &c)[0], want, "B = {bv:?}");
        assert_eq!(run_gemm_ex(&h, &case, &a, &b, &c)[0], want, "B = {bv:?}");
    }
}

/// k = 0 is C = beta C; A and B are not read (NULL here).
#[test]
fn gemm_ex_with_k_zero_scales_c() {
    ctx(0);
    let h = Blas::new();
    let c: Vec<f32> = vec![1.0, -2.0, 3.0, 4.0];
    let dc = upload(&c.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>());
    let s = gemm_ex(
        &h,
        (false, false),
        (2, 2, 0),
        1.0,
        (0, R_16BF, 2),
        (0, R_16BF, 1),
        2.0,
        (dc, R_32F, 2),
        COMPUTE_32F,
    );
    assert_eq!(s, SUCCESS);
    let got = HostMat::new(2, 2, 0, false).decode(&download(dc, 16), R_32F);
    assert_eq!(got, vec![2.0, -4.0, 6.0, 8.0]);
}

// ---------------------------------------------------------------- validation

/// [`Case::small`] planned, with its operands.
fn small_plan() -> (Plan, Case, HostMat, HostMat, HostMat) {
    let case = Case::small();
    let (a, b, c) = case.operands(3);
    (plan_for(&case, &a, &b, &c, 32 << 20), case, a, b, c)
}

/// Device buffers big enough for small_plan's operands.
fn small_buffers() -> (u64, u64, u64, u64) {
    (alloc(4096), alloc(4096), alloc(4096), alloc(32 << 20))
}

#[test]
fn bad_handles_and_descriptors_are_refused() {
    ctx(0);
    let lt = Lt::new();
    let (plan, ..) = small_plan();
    let (_, _, r) = plan.heuristic(&lt);
    let (a, b, c, ws) = small_buffers();
    let mm = |lt: &Lt, plan: &Plan| {
        plan.matmul(
            lt,
            1.0,
            a,
            b,
            0.0,
            c,
            Some(&r.algo),
            ws,
            32 << 20,
            null_mut(),
        )
    };
    assert_eq!(mm(&lt, &plan), SUCCESS);
    // NULL and destroyed handles: NOT_INITIALIZED.
    assert_eq!(
        mm(&ManuallyDrop::new(Lt(null_mut())), &plan),
        NOT_INITIALIZED
    );
    let mut dead = null_mut();
    // SAFETY: out-pointer to a local.
    assert_eq!(unsafe { cublasLtCreate(&mut dead) }, SUCCESS);
    assert_eq!(cublasLtDestroy(dead), SUCCESS);
    assert_eq!(mm(&ManuallyDrop::new(Lt(dead)), &plan), NOT_INITIALIZED);
    assert_eq!(cublasLtDestroy(dead), NOT_INITIALIZED);
    // A layout where the descriptor goes, a NULL layout: INVALID_VALUE. (Views of `plan`'s
    // descriptors, not dropped: `plan` destroys them.)
    let swapped = ManuallyDrop::new(Plan::new(plan.a, plan.a, plan.b, plan.c, plan.pref));
    assert_eq!(mm(&lt, &swapped), INVALID_VALUE);
    let nulled = ManuallyDrop::new(Plan::new(plan.desc, plan.a, null_mut(), plan.c, plan.pref));
    assert_eq!(mm(&lt, &nulled), INVALID_VALUE);
    // cuBLAS: NULL handle.
    let s = gemm_ex(
        &ManuallyDrop::new(Blas(null_mut())),
        (false, false),
        (4, 3, 5),
        1.0,
        (a, R_16BF, 4),
        (b, R_16BF, 5),
        0.0,
        (c, R_32F, 4),
        COMPUTE_32F,
    );
    assert_eq!(s, NOT_INITIALIZED);
    assert_eq!(cublasDestroy_v2(null_mut()), NOT_INITIALIZED);
    // NULL alpha.
    // SAFETY: every pointer but alpha is valid; alpha NULL is refused before any read.
    let s = unsafe {
        cublasLtMatmul(
            lt.0,
            plan.desc,
            std::ptr::null(),
            a as *const c_void,
            plan.a,
            b as *const c_void,
            plan.b,
            &0f32 as *const f32 as *const c_void,
            c as *const c_void,
            plan.c,
            c as *mut c_void,
            plan.c,
            &r.algo,
            ws as *mut c_void,
            32 << 20,
            null_mut(),
        )
    };
    assert_eq!(s, INVALID_VALUE);
    assert_eq!(cuCtxSynchronize(), 0);
}

#[test]
fn inconsistent_dimensions_are_invalid() {
    ctx(0);
    let lt = Lt::new();
    let (a, b, c, ws) = small_buffers();
    // op(A) 4x5, op(B) 6x3: k differs.
    let plan = Plan::new(
        make_desc(COMPUTE_32F, R_32F, false, false),
        make_layout(R_16BF, 4, 5, 4, ORDER_COL),
        make_layout(R_16BF, 6, 3, 6, ORDER_COL),
        make_layout(R_32F, 4, 3, 4, ORDER_COL),
        make_pref(32 << 20, 256),
    );
    assert_eq!(plan.heuristic(&lt).0, INVALID_VALUE);
    assert_eq!(
        plan.matmul(&lt, 1.0, a, b, 0.0, c, None, ws, 32 << 20, null_mut()),
        INVALID_VALUE
    );
    // A stored 4x5 but marked transposed: op(A) is 5x4, C is 4x3.
    let plan = Plan::new(
        make_desc(COMPUTE_32F, R_32F, true, false),
        make_layout(R_16BF, 4, 5, 4, ORDER_COL),
        make_layout(R_16BF, 5, 3, 5, ORDER_COL),
        make_layout(R_32F, 4, 3, 4, ORDER_COL),
        make_pref(32 << 20, 256),
    );
    assert_eq!(plan.heuristic(&lt).0, INVALID_VALUE);
    // C 4x4 for a 4x3 product.
    let plan = Plan::new(
        make_desc(COMPUTE_32F, R_32F, false, false),
        make_layout(R_16BF, 4, 5, 4, ORDER_COL),
        make_layout(R_16BF, 5, 3, 5, ORDER_COL),
        make_layout(R_32F, 4, 4, 4, ORDER_COL),
        make_pref(32 << 20, 256),
    );
    assert_eq!(plan.heuristic(&lt).0, INVALID_VALUE);
    // The same shapes, consistent: fine.
    let plan = Plan::new(
        make_desc(COMPUTE_32F, R_32F, true, false),
        make_layout(R_16BF, 5, 4, 5, ORDER_COL),
        make_layout(R_16BF, 5, 3, 5, ORDER_COL),
        make_layout(R_32F, 4, 3, 4, ORDER_COL),
        make_pref(32 << 20, 256),
    );
    assert_eq!(plan.heuristic(&lt).0, SUCCESS);
    // In place (C and D one buffer) with two different layouts: refused; out of place, fine.
    let d_layout = make_layout(R_32F, 4, 3, 5, ORDER_COL);
    let d2 = alloc(4096);
    let run = |d: u64| {
        let (alpha, beta) = (1f32, 1f32);
        // SAFETY: live descriptors, host scalars, buffers larger than the layouts.
        unsafe {
            cublasLtMatmul(
                lt.0,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                a as *const c_void,
                plan.a,
                b as *const c_void,
                plan.b,
                &beta as *const f32 as *const c_void,
                c as *const c_void,
                plan.c,
                d as *mut c_void,
                d_layout,
                std::ptr::null(),
                ws as *mut c_void,
                32 << 20,
                null_mut(),
            )
        }
    };
    assert_eq!(run(c), INVALID_VALUE);
    assert_eq!(run(d2), SUCCESS);
    assert_eq!(cublasLtMatrixLayoutDestroy(d_layout), SUCCESS);
    assert_eq!(cuCtxSynchronize(), 0);
}

#[test]
fn a_leading_dimension_too_small_is_invalid() {
    ctx(0);
    let lt = Lt::new();
    let (a, b, c, ws) = small_buffers();
    let with_a = |rows, cols, ld, order| {
        Plan::new(
            make_desc(COMPUTE_32F, R_32F, false, false),
            make_layout(R_16BF, rows, cols, ld, order),
            make_layout(R_16BF, 5, 3, 5, ORDER_COL),
            make_layout(R_32F, 4, 3, 4, ORDER_COL),
            make_pref(32 << 20, 256),
        )
    };
    // Column-major A 4x5: ld must be >= 4 (rows).
    let bad = with_a(4, 5, 3, ORDER_COL);
    assert_eq!(bad.heuristic(&lt).0, INVALID_VALUE);
    assert_eq!(
        bad.matmul(&lt, 1.0, a, b, 0.0, c, None, ws, 32 << 20, null_mut()),
        INVALID_VALUE
    );
    assert_eq!(with_a(4, 5, 4, ORDER_COL).heuristic(&lt).0, SUCCESS);
    // Row-major A 4x5: ld must be >= 5 (cols), so 4 is too small although it covers the rows.
    assert_eq!(with_a(4, 5, 4, ORDER_ROW).heuristic(&lt).0, INVALID_VALUE);
    assert_eq!(with_a(4, 5, 5, ORDER_ROW).heuristic(&lt).0, SUCCESS);

    // cublasGemmEx: lda >= m for op N, >= k for op T; ldb >= k / n; ldc >= m.
    let h = Blas::new();
    let g = |t: (bool, bool), lda, ldb, ldc| {
        gemm_ex(
            &h,
            t,
            (4, 3, 5),
            1.0,
            (a, R_16BF, lda),
            (b, R_16BF, ldb),
            0.0,
            (c, R_32F, ldc),
            COMPUTE_32F,
        )
    };
    assert_eq!(g((false, false), 3, 5, 4), INVALID_VALUE);
    assert_eq!(g((false, false), 4, 4, 4), INVALID_VALUE);
    assert_eq!(g((false, false), 4, 5, 3), INVALID_VALUE);
    assert_eq!(g((true, false), 4, 5, 4), INVALID_VALUE);
    assert_eq!(g((false, true), 4, 5, 4), SUCCESS);
    assert_eq!(g((true, true), 5, 3, 4), SUCCESS);
    assert_eq!(g((false, true), 4, 2, 4), INVALID_VALUE);
    assert_eq!(cuCtxSynchronize(), 0);
}

#[test]
fn unsupported_types_attributes_and_modes_are_not_supported() {
    ctx(0);
    let lt = Lt::new();
    let (a, b, c, ws) = small_buffers();
    let plan_with = |desc: Handle, ta: u32, tb: u32, tc: u32| {
        Plan::new(
            desc,
            make_layout(ta, 4, 5, 4, ORDER_COL),
            make_layout(tb, 5, 3, 5, ORDER_COL),
            make_layout(tc, 4, 3, 4, ORDER_COL),
            make_pref(32 << 20, 256),
        )
    };
    let f32c = || make_desc(COMPUTE_32F, R_32F, false, false);
    let both = |p: &Plan| {
        (
            p.heuristic(&lt).0,
            p.matmul(&lt, 1.0, a, b, 0.0, c, None, ws, 32 << 20, null_mut()),
        )
    };
    // f32 A with bf16 B; bf16 A/B into f16 C.
    for (ta, tb, tc) in [(R_32F, R_16BF, R_32F), (R_16BF, R_16BF, R_16F)] {
        assert_eq!(
            both(&plan_with(f32c(), ta, tb, tc)),
            (NOT_SUPPORTED, NOT_SUPPORTED)
        );
    }
    // The supported combinations.
    for (ta, tb, tc) in [
        (R_16BF, R_16BF, R_16BF),
        (R_16BF, R_16BF, R_32F),
        (R_16F, R_16F, R_16F),
        (R_16F, R_16F, R_32F),
        (R_32F, R_32F, R_32F),
    ] {
        assert_eq!(both(&plan_with(f32c(), ta, tb, tc)), (SUCCESS, SUCCESS));
    }
    // f16 compute.
    let p = plan_with(
        make_desc(COMPUTE_16F, R_16F, false, false),
        R_16BF,
        R_16BF,
        R_32F,
    );
    assert_eq!(both(&p), (NOT_SUPPORTED, NOT_SUPPORTED));
    // A ReLU epilogue.
    let d = f32c();
    assert_eq!(set_desc(d, DESC_EPILOGUE, EPILOGUE_RELU), SUCCESS);
    assert_eq!(
        both(&plan_with(d, R_16BF, R_16BF, R_32F)),
        (NOT_SUPPORTED, NOT_SUPPORTED)
    );
    // Device pointer mode.
    let d = f32c();
    assert_eq!(set_desc(d, DESC_POINTER_MODE, 1i32), SUCCESS);
    assert_eq!(
        both(&plan_with(d, R_16BF, R_16BF, R_32F)),
        (NOT_SUPPORTED, NOT_SUPPORTED)
    );
    // COL32 order, batch count 2.
    let p = plan_with(f32c(), R_16BF, R_16BF, R_32F);
    assert_eq!(set_layout(p.a, LAYOUT_ORDER, ORDER_COL32), SUCCESS);
    assert_eq!(both(&p), (NOT_SUPPORTED, NOT_SUPPORTED));
    let p = plan_with(f32c(), R_16BF, R_16BF, R_32F);
    assert_eq!(set_layout(p.b, LAYOUT_BATCH_COUNT, 2i32), SUCCESS);
    assert_eq!(both(&p), (NOT_SUPPORTED, NOT_SUPPORTED));

    // cuBLAS: a type combination, a compute type, device pointer mode.
    let h = Blas::new();
    let g = |h: &Blas, at, ct, compute| {
        gemm_ex(
            h,
            (false, false),
            (4, 3, 5),
            1.0,
            (a, at, 4),
            (b, R_16BF, 5),
            0.0,
            (c, ct, 4),
            compute,
        )
    };
    assert_eq!(g(&h, R_16BF, R_16F, COMPUTE_32F), NOT_SUPPORTED);
    assert_eq!(g(&h, R_32F, R_32F, COMPUTE_32F), NOT_SUPPORTED);
    assert_eq!(g(&h, R_16BF, R_32F, COMPUTE_16F), NOT_SUPPORTED);
    assert_eq!(g(&h, R_16BF, R_32F, COMPUTE_32F), SUCCESS);
    assert_eq!(cublasSetPointerMode_v2(h.0, 1), SUCCESS);
    let mut mode = 7u32;
    // SAFETY: out-pointer to a local.
    assert_eq!(unsafe { cublasGetPointerMode_v2(h.0, &mut mode) }, SUCCESS);
    assert_eq!(mode, 1);
    assert_eq!(g(&h, R_16BF, R_32F, COMPUTE_32F), NOT_SUPPORTED);
    assert_eq!(cublasSetPointerMode_v2(h.0, 0), SUCCESS);
    assert_eq!(cuCtxSynchronize(), 0);
}

#[test]
fn attributes_are_checked_and_read_back() {
    ctx(0);
    let d = make_desc(COMPUTE_32F, R_32F, true, false);
    // Wrong size, NULL buffer, unknown attribute.
    assert_eq!(set_desc(d, DESC_TRANSA, 1u64), INVALID_VALUE);
    assert_eq!(set_desc(d, DESC_TRANSA, 1u8), INVALID_VALUE);
    // SAFETY: a NULL buffer is refused before any read.
    let s = unsafe { cublasLtMatmulDescSetAttribute(d, DESC_TRANSA, std::ptr::null(), 4) };
    assert_eq!(s, INVALID_VALUE);
    assert_eq!(set_desc(d, 9, 0i32), INVALID_VALUE);
    let (mut v, mut written) = (0i32, 0usize);
    // SAFETY: a 4-byte buffer and an out-pointer to locals.
    let s = unsafe {
        cublasLtMatmulDescGetAttribute(
            d,
            DESC_TRANSA,
            &mut v as *mut i32 as *mut c_void,
            4,
            &mut written,
        )
    };
    assert_eq!((s, v, written), (SUCCESS, OP_T as i32, 4));
    assert_eq!(cublasLtMatmulDescDestroy(d), SUCCESS);
    assert_eq!(cublasLtMatmulDescDestroy(d), INVALID_VALUE);

    let l = make_layout(R_16BF, 4, 5, 4, ORDER_COL);
    assert_eq!(set_layout(l, LAYOUT_ROWS, 7i32), INVALID_VALUE);
    assert_eq!(set_layout(l, LAYOUT_ROWS, 7u64), SUCCESS);
    assert_eq!(set_layout(l, LAYOUT_LD, 9i64), SUCCESS);
    let mut ld = 0i64;
    // SAFETY: an 8-byte buffer; NULL sizeWritten is allowed.
    let s = unsafe {
        cublasLtMatrixLayoutGetAttribute(
            l,
            LAYOUT_LD,
            &mut ld as *mut i64 as *mut c_void,
            8,
            null_mut(),
        )
    };
    assert_eq!((s, ld), (SUCCESS, 9));
    // Size query: sizeInBytes 0 with sizeWritten.
    let mut written = 0usize;
    // SAFETY: only sizeWritten is written.
    let s =
        unsafe { cublasLtMatrixLayoutGetAttribute(l, LAYOUT_TYPE, null_mut(), 0, &mut written) };
    assert_eq!((s, written), (SUCCESS, 4));
    assert_eq!(cublasLtMatrixLayoutDestroy(l), SUCCESS);

    let p = make_pref(0, 256);
    assert_eq!(set_pref(p, PREF_MAX_WORKSPACE, 1u32), INVALID_VALUE);
    assert_eq!(set_pref(p, PREF_ALIGN_A, 16u64), INVALID_VALUE);
    assert_eq!(cublasLtMatmulPreferenceDestroy(p), SUCCESS);
}

/// The heuristic's algorithm fits the preference's workspace limit, and cublasLtMatmul refuses
/// less workspace than the algorithm reported.
#[test]
fn workspace_follows_the_preference_and_is_enforced() {
    ctx(0);
    let lt = Lt::new();
    let (plan, ..) = small_plan();
    let (s, n, r) = plan.heuristic(&lt);
    assert_eq!((s, n, r.state), (SUCCESS, 1, SUCCESS));
    assert!(
        r.workspace_size > 0 && r.workspace_size <= 32 << 20,
        "{}",
        r.workspace_size
    );
    let (a, b, c, ws) = small_buffers();
    let need = r.workspace_size;
    let mm = |ws, bytes| plan.matmul(&lt, 1.0, a, b, 0.0, c, Some(&r.algo), ws, bytes, null_mut());
    assert_eq!(mm(ws, need - 1), INVALID_VALUE);
    assert_eq!(mm(0, need), INVALID_VALUE);
    assert_eq!(mm(ws, need), SUCCESS);
    // A preference with no workspace gets an algorithm that needs none.
    let mut p = null_mut();
    // SAFETY: out-pointer to a local.
    assert_eq!(unsafe { cublasLtMatmulPreferenceCreate(&mut p) }, SUCCESS);
    let plan0 = ManuallyDrop::new(Plan::new(plan.desc, plan.a, plan.b, plan.c, p));
    let (s, n, r0) = plan0.heuristic(&lt);
    assert_eq!(
        (s, n, r0.state, r0.workspace_size),
        (SUCCESS, 1, SUCCESS, 0)
    );
    assert_eq!(
        plan0.matmul(&lt, 1.0, a, b, 0.0, c, Some(&r0.algo), 0, 0, null_mut()),
        SUCCESS
    );
    // An algorithm the heuristic did not fill in.
    assert_eq!(
        plan0.matmul(
            &lt,
            1.0,
            a,
            b,
            0.0,
            c,
            Some(&[0; 8]),
            ws,
            32 << 20,
            null_mut()
        ),
        INVALID_VALUE
    );
    // Requesting zero results.
    let mut n = 0;
    let mut res = r0;
    // SAFETY: room for one result.
    let s = unsafe {
        cublasLtMatmulAlgoGetHeuristic(
            lt.0, plan0.desc, plan0.a, plan0.b, plan0.c, plan0.c, plan0.pref, 0, &mut res, &mut n,
        )
    };
    assert_eq!(s, INVALID_VALUE);
    assert_eq!(cublasLtMatmulPreferenceDestroy(p), SUCCESS);
    assert_eq!(cuCtxSynchronize(), 0);
}

/// alpha or beta given as a device address under host pointer mode is refused, not read.
#[test]
fn a_device_address_as_alpha_is_invalid() {
    ctx(0);
    let h = Blas::new();
    let (a, b, c, _) = small_buffers();
    // SAFETY: alpha is a device address, refused before any read.
    let s = unsafe {
        cublasGemmEx(
            h.0,
            OP_N,
            OP_N,
            4,
            3,
            5,
            a as *const c_void,
            a as *const c_void,
            R_16BF,
            4,
            b as *const c_void,
            R_16BF,
            5,
            &0f32 as *const f32 as *const c_void,
            c as *mut c_void,
            R_32F,
            4,
            COMPUTE_32F,
            -1,
        )
    };
    assert_eq!(s, INVALID_VALUE);
}

#[test]
fn handle_settings_and_status_strings() {
    ctx(0);
    let h = Blas::new();
    let mut s = null_mut();
    assert_eq!(new_stream(&mut s), 0);
    assert_eq!(cublasSetStream_v2(h.0, s), SUCCESS);
    let mut got = null_mut();
    // SAFETY: out-pointer to a local.
    assert_eq!(unsafe { cublasGetStream_v2(h.0, &mut got) }, SUCCESS);
    assert_eq!(got, s);
    assert_eq!(cublasSetMathMode(h.0, 3), SUCCESS);
    assert_eq!(cublasSetMathMode(h.0, 77), INVALID_VALUE);
    let ws = alloc(1 << 20);
    assert_eq!(
        cublasSetWorkspace_v2(h.0, (ws + 2) as *mut c_void, 1024),
        INVALID_VALUE
    );
    assert_eq!(
        cublasSetWorkspace_v2(h.0, ws as *mut c_void, 1 << 20),
        SUCCESS
    );
    let mut v = 0;
    // SAFETY: out-pointer to a local.
    assert_eq!(unsafe { cublasGetVersion_v2(h.0, &mut v) }, SUCCESS);
    assert!(v >= 130000, "{v}");
    // SAFETY: static strings.
    let name = unsafe { CStr::from_ptr(cublasGetStatusName(NOT_SUPPORTED)) };
    assert_eq!(name.to_str().unwrap(), "CUBLAS_STATUS_NOT_SUPPORTED");
    // SAFETY: as above.
    let name = unsafe { CStr::from_ptr(cublasLtGetStatusName(INVALID_VALUE)) };
    assert_eq!(name.to_str().unwrap(), "CUBLAS_STATUS_INVALID_VALUE");
    assert_eq!(cublasSetStream_v2(h.0, null_mut()), SUCCESS);
    assert_eq!(cuStreamDestroy_v2(s), 0);
}

fn new_stream(s: &mut Handle) -> i32 {
    // SAFETY: out-pointer.
    unsafe { cuStreamCreate(s, 0) }
}

/// Every cuBLAS/cuBLASLt symbol the engine's cudarc path resolves is exported by the shared
/// library `gpu-sim run` installs (cargo builds it next to this test).
#[test]
fn the_shared_library_exports_every_symbol_the_engine_resolves() {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    let so = gpu_sim::shared_library_near(dir)
        .unwrap_or_else(|| panic!("libgpu_sim.so not found near {}", exe.display()));
    let path = std::ffi::CString::new(so.to_str().unwrap()).unwrap();
    // SAFETY: dlopen of a library this package builds; only symbol addresses are looked up,
    // nothing in it is called.
    let lib = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!lib.is_null(), "dlopen {}", so.display());
    for name in [
        // cudarc's CudaBlas (create, stream, drop) and the engine's LLAMA2_GEMM=cublas path.
        "cublasCreate_v2",
        "cublasSetStream_v2",
        "cublasDestroy_v2",
        "cublasGemmEx",
        "cublasSetPointerMode_v2",
        "cublasGetPointerMode_v2",
        // The engine's cuBLASLt path.
        "cublasLtCreate",
        "cublasLtDestroy",
        "cublasLtMatmulDescCreate",
        "cublasLtMatmulDescSetAttribute",
        "cublasLtMatmulDescDestroy",
        "cublasLtMatrixLayoutCreate",
        "cublasLtMatrixLayoutSetAttribute",
        "cublasLtMatrixLayoutDestroy",
        "cublasLtMatmulPreferenceCreate",
        "cublasLtMatmulPreferenceSetAttribute",
        "cublasLtMatmulPreferenceDestroy",
        "cublasLtMatmulAlgoGetHeuristic",
        "cublasLtMatmul",
    ] {
        let c = std::ffi::CString::new(name).unwrap();
        // SAFETY: `lib` is a live handle from dlopen.
        let sym = unsafe { libc::dlsym(lib, c.as_ptr()) };
        assert!(!sym.is_null(), "{name} is not exported by {}", so.display());
    }
    // The library stays loaded (unloading Rust cdylibs is not reliably safe).
}
