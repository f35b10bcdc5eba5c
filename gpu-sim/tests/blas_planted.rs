//! The planted fault `lt-flip-transa:N` runs the N-th cublasLtMatmul of the process with TRANSA
//! flipped, and no other. One test in its own process, so the calls are counted from zero.

mod blas_support;

use blas_support::*;

#[test]
fn lt_flip_transa_flips_exactly_the_chosen_call() {
    // Before the simulator starts (this process's first call).
    std::env::set_var("GPU_SIM_FAULT", "lt-flip-transa:1");
    ctx(0);
    let lt = Lt::new();
    // Square, so the flipped call is still consistent and computes op(A) = A instead of Aᵀ.
    let case = Case {
        m: 8,
        n: 8,
        k: 8,
        ta: true,
        tb: false,
        row_a: false,
        row_b: false,
        row_c: false,
        pad: 2,
        c_f32: true,
        alpha: 1.0,
        beta: 0.0,
    };
    let (a, b, c) = case.operands(11);
    let want = reference(&case, &a, &b, &c);
    let flipped_case = Case { ta: false, ..case };
    let flipped = reference(&flipped_case, &a, &b, &c);
    assert!(want.iter().zip(&flipped).any(|(x, y)| x.0 != y.0));

    // Call 0: as asked.
    check(&case, &want, &c, &run_lt(&lt, &case, &a, &b, &c), "call 0");
    // Call 1: TRANSA flipped.
    let got = run_lt(&lt, &case, &a, &b, &c);
    check(&flipped_case, &flipped, &c, &got, "call 1 (flipped)");
    // Call 2: as asked again.
    check(&case, &want, &c, &run_lt(&lt, &case, &a, &b, &c), "call 2");
}
