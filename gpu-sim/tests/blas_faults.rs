//! Operands outside device memory fault the stream when the product runs, as a kernel's bad
//! access would: sticky, with the operand and the memcheck fault in cuGetErrorString. One test
//! in its own process, one simulated GPU per fault (a faulted device stays faulted).

mod blas_support;

use blas_support::*;
use gpu_sim::driver::*;
use std::ptr::null_mut;

/// The call succeeds (the fault is the kernel's, later); the wait reports `code` and the detail
/// names `needles`.
fn expect_fault(code: i32, needles: &[&str]) {
    assert_eq!(cuCtxSynchronize(), code);
    let detail = error_string(code);
    for n in needles {
        assert!(detail.contains(n), "{detail:?} does not mention {n:?}");
    }
}

#[test]
fn operands_outside_device_memory_fault_naming_the_operand() {
    // Before the simulator starts (this process's first call): four GPUs.
    std::env::set_var("GPU_SIM_GPUS", "4");
    let case = Case::small();
    let (a, b, c) = case.operands(1);

    // cuda:0: a host pointer as A.
    ctx(0);
    let lt = Lt::new();
    let plan = plan_for(&case, &a, &b, &c, 0);
    let (s, _, r) = plan.heuristic(&lt);
    assert_eq!(s, SUCCESS);
    let host = a.bytes(R_16BF);
    let (db, dc) = (upload(&b.bytes(R_16BF)), alloc(48));
    let ha = host.as_ptr() as u64;
    let s = plan.matmul(&lt, 1.0, ha, db, 0.0, dc, Some(&r.algo), 0, 0, null_mut());
    assert_eq!(s, SUCCESS);
    expect_fault(
        CUDA_ERROR_ILLEGAL_ADDRESS,
        &["cublasLtMatmul", "operand A", "no device allocation"],
    );
    // The device stays faulted: the next matmul cannot be queued.
    let s = plan.matmul(&lt, 1.0, db, db, 0.0, dc, Some(&r.algo), 0, 0, null_mut());
    assert_eq!(s, EXECUTION_FAILED);

    // cuda:1: D freed before the call.
    ctx(1);
    let (da, db) = (upload(&a.bytes(R_16BF)), upload(&b.bytes(R_16BF)));
    let dc = alloc(48);
    free(dc);
    let s = plan.matmul(&lt, 1.0, da, db, 0.0, dc, Some(&r.algo), 0, 0, null_mut());
    assert_eq!(s, SUCCESS);
    expect_fault(CUDA_ERROR_ILLEGAL_ADDRESS, &["operand D", "freed"]);

    // cuda:2: B at a 2-byte offset while the algorithm was chosen for 16-byte alignment.
    ctx(2);
    let plan16 = Plan::new(
        make_desc(COMPUTE_32F, R_32F, false, false),
        layout_of(&a, R_16BF),
        layout_of(&b, R_16BF),
        layout_of(&c, R_32F),
        make_pref(0, 16),
    );
    let (s, _, r16) = plan16.heuristic(&lt);
    assert_eq!(s, SUCCESS);
    let (da, db, dc) = (upload(&a.bytes(R_16BF)), alloc(64), alloc(48));
    let s = plan16.matmul(
        &lt,
        1.0,
        da,
        db + 2,
        0.0,
        dc,
        Some(&r16.algo),
        0,
        0,
        null_mut(),
    );
    assert_eq!(s, SUCCESS);
    expect_fault(CUDA_ERROR_MISALIGNED_ADDRESS, &["operand B", "aligned"]);

    // cuda:3: cublasGemmEx whose C (ldc 4, 3 columns of f32: 48 bytes) overruns 40 bytes.
    ctx(3);
    let h = Blas::new();
    let (da, db, dc) = (
        upload(&a.bytes(R_16BF)),
        upload(&b.bytes(R_16BF)),
        alloc(40),
    );
    let s = gemm_ex(
        &h,
        (false, false),
        (4, 3, 5),
        1.0,
        (da, R_16BF, 4),
        (db, R_16BF, 5),
        0.0,
        (dc, R_32F, 4),
        COMPUTE_32F,
    );
    assert_eq!(s, SUCCESS);
    expect_fault(
        CUDA_ERROR_ILLEGAL_ADDRESS,
        &["cublasGemmEx", "operand D", "past the end"],
    );
}
