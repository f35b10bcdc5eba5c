//! cublasLtMatmul is queued on the stream it is given and runs when that stream is waited for.
//! Its own process: in a shared one, another test's device-wide sync (cuCtxSynchronize,
//! cuMemFree) may legitimately run the stream early.

mod blas_support;

use blas_support::*;
use gpu_sim::driver::*;
use std::ptr::null_mut;

/// The work is queued on the stream it was given and runs when that stream is waited for: a
/// read on the (unrelated) legacy stream before the wait sees D as it was.
#[test]
fn matmul_runs_in_stream_order() {
    ctx(0);
    let lt = Lt::new();
    let case = Case::small();
    let (a, b, c) = case.operands(5);
    let plan = plan_for(&case, &a, &b, &c, 0);
    let (s, _, r) = plan.heuristic(&lt);
    assert_eq!(s, SUCCESS);
    let (da, db) = (upload(&a.bytes(R_16BF)), upload(&b.bytes(R_16BF)));
    let dc = upload(&c.bytes(R_32F));
    let mut stream = null_mut();
    // SAFETY: out-pointer to a local. Flags 1: non-blocking (not ordered with the legacy stream).
    assert_eq!(unsafe { cuStreamCreate(&mut stream, 1) }, 0);
    let s = plan.matmul(&lt, 1.0, da, db, 0.0, dc, Some(&r.algo), 0, 0, stream);
    assert_eq!(s, SUCCESS);
    let before = c.decode(&download(dc, 4 * 12), R_32F);
    assert!(
        before.iter().all(|x| x.is_nan()),
        "ran before its stream was waited for"
    );
    assert_eq!(cuStreamSynchronize(stream), 0);
    let after = c.decode(&download(dc, 4 * 12), R_32F);
    check(&case, &reference(&case, &a, &b, &c), &c, &after, "stream");
    assert_eq!(cuStreamDestroy_v2(stream), 0);
}
