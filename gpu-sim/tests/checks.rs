//! Control flow (divergence, reconvergence, early exits), the sanitizer checks (memcheck,
//! synccheck, racecheck) and load errors, in hand-written kernels.

mod common;
use common::*;
use gpu_sim::ptx::{FaultKind, KernelFault, Module};

#[test]
fn divergent_branches_reconverge_before_a_full_warp_shuffle() {
    let m = module(
        r#"
.visible .entry k(.param .u64 out)
{
    .reg .pred %p<2>;
    .reg .b32 %r<8>;
    .reg .b64 %rd<4>;
    mov.u32 %r1, %tid.x;
    and.b32 %r2, %r1, 1;
    setp.eq.u32 %p1, %r2, 1;
    @%p1 bra ODD;
    mov.u32 %r3, 200;
    bra.uni JOIN;
ODD:
    mov.u32 %r3, 100;
JOIN:
    shfl.sync.bfly.b32 %r4, %r3, 1, 31, -1;
    add.s32 %r5, %r3, %r4;
    ld.param.u64 %rd1, [out];
    mul.wide.u32 %rd2, %r1, 8;
    add.s64 %rd3, %rd1, %rd2;
    st.global.v2.u32 [%rd3], {%r3, %r5};
    ret;
}
"#,
    );
    let dev = Dev::new();
    let out = dev.zeros(64 * 8);
    let st = dev
        .launch(
            &m.kernel("k").unwrap(),
            [1; 3],
            [64, 1, 1],
            0,
            &[out],
            false,
        )
        .unwrap();
    let r = read_u32(&dev, out, 128);
    for t in 0..64 {
        assert_eq!(r[2 * t], if t % 2 == 1 { 100 } else { 200 });
        assert_eq!(r[2 * t + 1], 300, "lane {t}");
    }
    // each path is counted once per warp: 2 warps × (4 before the branch + 2 even-only +
    // 1 odd-only + 7 after the join)
    assert_eq!(st.warp_instructions, 2 * (4 + 2 + 1 + 7));
}

#[test]
fn loops_with_early_exit_and_a_partial_warp() {
    // lane i leaves the loop after i iterations; the partial second warp (16 lanes) shuffles
    // with a member mask of the lanes it has
    let m = module(
        r#"
.visible .entry k(.param .u64 out)
{
    .reg .pred %p<4>;
    .reg .b32 %r<12>;
    .reg .b64 %rd<4>;
    mov.u32 %r1, %tid.x;
    and.b32 %r2, %r1, 31;
    mov.u32 %r3, 0;
LOOP:
    setp.eq.u32 %p1, %r3, %r2;
    @%p1 bra DONE;
    add.s32 %r3, %r3, 1;
    setp.lt.u32 %p2, %r3, 100;
    @%p2 bra LOOP;
DONE:
    setp.lt.u32 %p3, %r1, 32;
    selp.b32 %r4, -1, 0xffff, %p3;
    selp.b32 %r5, 31, 15, %p3;
    shfl.sync.idx.b32 %r6, %r3, %r5, 31, %r4;
    ld.param.u64 %rd1, [out];
    mul.wide.u32 %rd2, %r1, 8;
    add.s64 %rd3, %rd1, %rd2;
    st.global.v2.u32 [%rd3], {%r3, %r6};
    ret;
}
"#,
    );
    let dev = Dev::new();
    let out = dev.zeros(48 * 8);
    dev.launch(&m.kernel("k").unwrap(), [1; 3], [48, 1, 1], 0, &[out], true)
        .unwrap();
    let r = read_u32(&dev, out, 96);
    for t in 0..48 {
        assert_eq!(r[2 * t], (t % 32) as u32, "iterations of lane {t}");
        assert_eq!(
            r[2 * t + 1],
            if t < 32 { 31 } else { 15 },
            "shuffled from the last lane"
        );
    }
}

fn synccheck_fault(body: &str, block: u32) -> KernelFault {
    let m = module(body);
    let dev = Dev::new();
    let e = dev
        .launch(
            &m.kernel("k").unwrap(),
            [1; 3],
            [block, 1, 1],
            0,
            &[0],
            false,
        )
        .unwrap_err();
    assert_eq!(e.kind, FaultKind::Synccheck, "{e}");
    e
}

#[test]
fn a_barrier_in_divergent_code_is_a_synccheck_error() {
    let body = r#"
.visible .entry k(.param .u64 out)
{
    .reg .pred %p<2>;
    .reg .b32 %r<4>;
    mov.u32 %r1, %tid.x;
    setp.lt.u32 %p1, %r1, 16;
    @!%p1 bra SKIP;
    bar.sync 0;
SKIP:
    bar.sync 0;
    ret;
}
"#;
    let e = synccheck_fault(body, 32);
    assert!(e.message.contains("barrier"), "{}", e.message);
    let skip = line_of(body, "SKIP:");
    assert!(
        e.message.contains(&format!("line {}", skip - 1))
            && e.message.contains(&format!("line {}", skip + 1)),
        "names both barriers: {}",
        e.message
    );
}

#[test]
fn threads_that_exited_do_not_hold_up_a_barrier() {
    let m = module(
        r#"
.shared .align 4 .b8 s[4];
.visible .entry k(.param .u64 out)
{
    .reg .pred %p<2>;
    .reg .b32 %r<4>;
    .reg .b64 %rd<2>;
    mov.u32 %r1, %tid.x;
    setp.ge.u32 %p1, %r1, 40;
    @%p1 ret;
    setp.ne.u32 %p1, %r1, 3;
    @%p1 bra WAIT;
    mov.u32 %r2, 77;
    st.shared.u32 [s], %r2;
WAIT:
    bar.sync 0;
    ld.shared.u32 %r3, [s];
    setp.ne.u32 %p1, %r1, 39;
    @%p1 ret;
    ld.param.u64 %rd1, [out];
    st.global.u32 [%rd1], %r3;
    ret;
}
"#,
    );
    let dev = Dev::new();
    let out = dev.zeros(4);
    dev.launch(&m.kernel("k").unwrap(), [1; 3], [96, 1, 1], 0, &[out], true)
        .unwrap();
    assert_eq!(read_u32(&dev, out, 1), vec![77]);
}

#[test]
fn a_shuffle_with_a_member_missing_is_a_synccheck_error() {
    let body = r#"
.visible .entry k(.param .u64 out)
{
    .reg .pred %p<2>;
    .reg .b32 %r<4>;
    mov.u32 %r1, %tid.x;
    setp.eq.u32 %p1, %r1, 31;
    @%p1 bra END;
    shfl.sync.bfly.b32 %r2, %r1, 1, 31, -1;
END:
    ret;
}
"#;
    let e = synccheck_fault(body, 32);
    assert_eq!(e.ptx_line, line_of(body, "shfl.sync"));
    assert!(
        e.message.contains("0x80000000"),
        "names the missing lane: {}",
        e.message
    );
    // an mma in a partial warp can never have all 32 lanes
    let body = r#"
.visible .entry k(.param .u64 out)
{
    .reg .b32 %r<8>;
    .reg .f32 %f<8>;
    mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f0, %f1, %f2, %f3}, {%r0, %r1, %r2, %r3}, {%r4, %r5}, {%f4, %f5, %f6, %f7};
    ret;
}
"#;
    let e = synccheck_fault(body, 16);
    assert!(e.message.contains("do not exist"), "{}", e.message);
}

#[test]
fn lanes_at_two_different_shuffles_are_a_synccheck_error() {
    let body = r#"
.visible .entry k(.param .u64 out)
{
    .reg .pred %p<2>;
    .reg .b32 %r<4>;
    mov.u32 %r1, %tid.x;
    setp.lt.u32 %p1, %r1, 16;
    @%p1 bra LOW;
    shfl.sync.bfly.b32 %r2, %r1, 1, 31, -1;
    bra.uni END;
LOW:
    shfl.sync.bfly.b32 %r2, %r1, 2, 31, -1;
END:
    ret;
}
"#;
    let e = synccheck_fault(body, 32);
    let other = line_of(body, "bfly.b32 %r2, %r1, 1,");
    assert!(
        e.message
            .contains(&format!("another collective (PTX line {other})")),
        "{}",
        e.message
    );
    // a lane waiting at a barrier instead
    let body = r#"
.visible .entry k(.param .u64 out)
{
    .reg .pred %p<2>;
    .reg .b32 %r<4>;
    mov.u32 %r1, %tid.x;
    setp.eq.u32 %p1, %r1, 5;
    @%p1 bra BAR;
    shfl.sync.bfly.b32 %r2, %r1, 1, 31, -1;
    ret;
BAR:
    bar.sync 0;
    ret;
}
"#;
    let e = synccheck_fault(body, 32);
    assert!(
        e.message.contains("lanes 0x00000020 wait at a CTA barrier"),
        "{}",
        e.message
    );
}

#[test]
fn an_out_of_bounds_store_names_block_thread_line_source_and_address() {
    let body = r#"
.file 1 "/src/kernels-cu/oob.cu"
.visible .entry k(.param .u64 out, .param .u64 n)
{
    .reg .pred %p<2>;
    .reg .b32 %r<4>;
    .reg .b64 %rd<8>;
    ld.param.u64 %rd1, [out];
    mov.u32 %r1, %ctaid.x;
    mov.u32 %r2, %ntid.x;
    mov.u32 %r3, %tid.x;
    mad.lo.s32 %r1, %r1, %r2, %r3;
    mul.wide.u32 %rd2, %r1, 4;
    add.s64 %rd3, %rd1, %rd2;
    .loc 1 42 7
    st.global.u32 [%rd3], %r1;
    ret;
}
"#;
    let m = module(body);
    let dev = Dev::new();
    let out = dev.alloc(100 * 4);
    let e = dev
        .launch(
            &m.kernel("k").unwrap(),
            [2, 1, 1],
            [64, 1, 1],
            0,
            &[out, 100],
            false,
        )
        .unwrap_err();
    assert_eq!(e.kind, FaultKind::Memcheck);
    assert_eq!(e.kernel, "k");
    assert_eq!(e.block, [1, 0, 0]);
    assert_eq!(
        e.thread,
        [36, 0, 0],
        "thread 64 + 36 = 100 is the first out of bounds"
    );
    assert_eq!(e.ptx_line, line_of(body, "st.global.u32"));
    assert_eq!(e.source, Some(("/src/kernels-cu/oob.cu".to_string(), 42)));
    assert_eq!(e.address, Some(out + 400));
    assert!(e.message.contains("past the end"), "{}", e.message);
    assert!(e.message.contains("oob.cu:42"), "{}", e.message);
}

#[test]
fn misaligned_and_shared_out_of_bounds_accesses_are_memcheck_errors() {
    let m = module(
        r#"
.shared .align 4 .b8 s[64];
.visible .entry k(.param .u64 p, .param .u32 off)
{
    .reg .b32 %r<4>;
    .reg .b64 %rd<4>;
    ld.param.u64 %rd1, [p];
    ld.param.u32 %r1, [off];
    cvt.u64.u32 %rd2, %r1;
    add.s64 %rd3, %rd1, %rd2;
    ld.global.u32 %r2, [%rd3];
    mov.u32 %r3, s;
    add.s32 %r3, %r3, %r1;
    st.shared.u32 [%r3+60], %r2;
    ret;
}
"#,
    );
    let k = m.kernel("k").unwrap();
    let dev = Dev::new();
    let p = dev.zeros(256);
    dev.launch(&k, [1; 3], [32, 1, 1], 0, &[p, 0], false)
        .unwrap();
    let e = dev
        .launch(&k, [1; 3], [32, 1, 1], 0, &[p, 2], false)
        .unwrap_err();
    assert_eq!(e.kind, FaultKind::Memcheck);
    assert!(e.message.contains("misaligned"), "{}", e.message);
    let e = dev
        .launch(&k, [1; 3], [32, 1, 1], 0, &[p, 4], false)
        .unwrap_err();
    assert_eq!(e.kind, FaultKind::Memcheck);
    assert!(
        e.message.contains("shared") && e.message.contains("out of bounds"),
        "{}",
        e.message
    );
}

const RACE: &str = r#"
.shared .align 4 .b8 s[256];
.visible .entry k(.param .u64 out)
{
    .reg .b32 %r<8>;
    .reg .b64 %rd<4>;
    mov.u32 %r1, %tid.x;
    mov.u32 %r2, s;
    shl.b32 %r3, %r1, 2;
    add.s32 %r4, %r2, %r3;
    st.shared.u32 [%r4], %r1;
    BARRIER
    add.s32 %r5, %r1, 32;
    and.b32 %r5, %r5, 63;
    shl.b32 %r5, %r5, 2;
    add.s32 %r6, %r2, %r5;
    ld.shared.u32 %r7, [%r6];
    ld.param.u64 %rd1, [out];
    mul.wide.u32 %rd2, %r1, 4;
    add.s64 %rd3, %rd1, %rd2;
    st.global.u32 [%rd3], %r7;
    ret;
}
"#;

#[test]
fn a_missing_barrier_between_warps_is_a_racecheck_error() {
    let racy = module(&RACE.replace("BARRIER", ""));
    let dev = Dev::new();
    let out = dev.zeros(256);
    let e = dev
        .launch(
            &racy.kernel("k").unwrap(),
            [1; 3],
            [64, 1, 1],
            0,
            &[out],
            true,
        )
        .unwrap_err();
    assert_eq!(e.kind, FaultKind::Racecheck, "{e}");
    assert!(e.message.contains("hazard"), "{}", e.message);
    assert_eq!(
        e.ptx_line,
        line_of(RACE, "st.shared.u32"),
        "warp 1's store after warp 0's read"
    );
    // without racecheck the launch runs (and warp 0 read memory nobody had written)
    dev.launch(
        &racy.kernel("k").unwrap(),
        [1; 3],
        [64, 1, 1],
        0,
        &[out],
        false,
    )
    .unwrap();
    assert_eq!(
        read_u32(&dev, out, 1)[0],
        0xffff_ffff,
        "fresh shared memory reads as 0xff bytes"
    );
    // with the barrier: no hazard, and each thread reads its partner's value
    let ok = module(&RACE.replace("BARRIER", "bar.sync 0;"));
    dev.launch(
        &ok.kernel("k").unwrap(),
        [1; 3],
        [64, 1, 1],
        0,
        &[out],
        true,
    )
    .unwrap();
    let r = read_u32(&dev, out, 64);
    assert!((0..64).all(|t| r[t] == ((t as u32 + 32) & 63)));
}

#[test]
fn unsupported_instructions_and_directives_are_load_errors_with_their_line() {
    let cases = [
        (
            "    vote.sync.all.pred %p1, %p1, -1;\n",
            "vote.sync.all.pred",
        ),
        ("    add.sat.s32 %r1, %r1, %r1;\n", "add.sat.s32"),
        ("    ld.u32 %r1, [%rd1];\n", "generic addressing"),
        ("    mov.u32 %r1, %clock;\n", "%clock"),
        ("    .maxclusterrank 2\n", ".maxclusterrank"),
    ];
    for (line, what) in cases {
        let body = format!(
            ".visible .entry k()\n{{\n    .reg .pred %p<2>;\n    .reg .b32 %r<2>;\n    .reg .b64 %rd<2>;\n{line}    ret;\n}}\n"
        );
        let err = Module::parse(&format!("{HEAD}{body}"))
            .err()
            .unwrap_or_else(|| panic!("{what} accepted"));
        assert_eq!(err.line, line_of(&body, line.trim()), "{what}: {err}");
        assert!(err.message.contains(what), "{what}: {err}");
    }
    let err = Module::parse(&format!("{HEAD}.alias a, b;\n"))
        .err()
        .unwrap();
    assert_eq!(err.line, 4);
    assert!(err.message.contains(".alias"), "{err}");
}

#[test]
fn nothing_is_cached_across_launches_freed_memory_and_other_devices_alike() {
    // one worker thread, so consecutive launches share its CTA state
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let m = module(
        r#"
.visible .entry k(.param .u64 out, .param .u32 v)
{
    .reg .b32 %r<2>;
    .reg .b64 %rd<2>;
    ld.param.u64 %rd1, [out];
    ld.param.u32 %r1, [v];
    st.global.u32 [%rd1], %r1;
    ret;
}
"#,
    );
    let k = m.kernel("k").unwrap();
    pool.install(|| {
        let (a, b) = (Dev::new(), Dev::new());
        let (pa, pb) = (a.zeros(4), b.zeros(4));
        assert_eq!(pa, pb, "two devices' memories at the same addresses");
        a.launch(&k, [1; 3], [1, 1, 1], 0, &[pa, 1], false).unwrap();
        b.launch(&k, [1; 3], [1, 1, 1], 0, &[pb, 2], false).unwrap();
        assert_eq!(read_u32(&a, pa, 1), vec![1]);
        assert_eq!(
            read_u32(&b, pb, 1),
            vec![2],
            "the second launch wrote its own memory"
        );
        a.mem.free(pa).unwrap();
        let e = a
            .launch(&k, [1; 3], [1, 1, 1], 0, &[pa, 3], false)
            .unwrap_err();
        assert_eq!(e.kind, FaultKind::Memcheck);
        assert!(e.message.contains("freed"), "{}", e.message);
    });
}
