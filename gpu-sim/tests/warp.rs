//! Warp collectives, asynchronous copies, barriers with reduction, atomics and calls, in small
//! hand-written kernels whose results follow from the PTX ISA's definitions.

mod common;
use common::*;

#[test]
fn shfl_sync_modes_member_masks_and_predicates() {
    let m = module(
        r#"
.visible .entry k(.param .u64 out)
{
    .reg .pred %p<8>;
    .reg .b32 %r<24>;
    .reg .b64 %rd<8>;
    ld.param.u64 %rd1, [out];
    mov.u32 %r1, %tid.x;
    mul.lo.s32 %r2, %r1, 10;
    shfl.sync.bfly.b32 %r3|%p1, %r2, 1, 31, -1;
    shfl.sync.bfly.b32 %r4, %r2, 16, 31, -1;
    shfl.sync.up.b32 %r5|%p2, %r2, 3, 0, -1;
    shfl.sync.down.b32 %r6|%p3, %r2, 5, 31, -1;
    shfl.sync.idx.b32 %r7, %r2, 7, 31, -1;
    shfl.sync.idx.b32 %r8, %r2, 2, 0x181f, -1;
    // only the lower half takes part, with a member mask of its own lanes
    mov.u32 %r9, 0;
    setp.lt.u32 %p4, %r1, 16;
    @%p4 shfl.sync.bfly.b32 %r9, %r2, 8, 31, 0xffff;
    selp.u32 %r10, 1, 0, %p1;
    selp.u32 %r11, 1, 0, %p2;
    selp.u32 %r12, 1, 0, %p3;
    mul.wide.u32 %rd2, %r1, 4;
    add.s64 %rd3, %rd1, %rd2;
    st.global.u32 [%rd3], %r3;
    st.global.u32 [%rd3+128], %r4;
    st.global.u32 [%rd3+256], %r5;
    st.global.u32 [%rd3+384], %r6;
    st.global.u32 [%rd3+512], %r7;
    st.global.u32 [%rd3+640], %r8;
    st.global.u32 [%rd3+768], %r9;
    st.global.u32 [%rd3+896], %r10;
    st.global.u32 [%rd3+1024], %r11;
    st.global.u32 [%rd3+1152], %r12;
    ret;
}
"#,
    );
    let dev = Dev::new();
    let out = dev.zeros(10 * 128);
    dev.launch(&m.kernel("k").unwrap(), [1; 3], [32, 1, 1], 0, &[out], true)
        .unwrap();
    let r = read_u32(&dev, out, 320);
    for l in 0..32u32 {
        let v = |j: u32| j * 10;
        assert_eq!(r[l as usize], v(l ^ 1), "bfly 1, lane {l}");
        assert_eq!(r[32 + l as usize], v(l ^ 16), "bfly 16");
        assert_eq!(
            r[64 + l as usize],
            if l >= 3 { v(l - 3) } else { v(l) },
            "up 3"
        );
        assert_eq!(
            r[96 + l as usize],
            if l + 5 <= 31 { v(l + 5) } else { v(l) },
            "down 5"
        );
        assert_eq!(r[128 + l as usize], v(7), "idx 7");
        assert_eq!(
            r[160 + l as usize],
            v((l & !7) | 2),
            "idx 2 in segments of 8"
        );
        assert_eq!(
            r[192 + l as usize],
            if l < 16 { v(l ^ 8) } else { 0 },
            "half-warp member mask"
        );
        assert_eq!(r[224 + l as usize], 1, "bfly predicate");
        assert_eq!(r[256 + l as usize], (l >= 3) as u32, "up predicate");
        assert_eq!(r[288 + l as usize], (l + 5 <= 31) as u32, "down predicate");
    }
}

#[test]
fn a_collective_waits_for_lanes_that_arrive_later() {
    // The lower half takes a detour placed after the shfl; the upper half reaches the shfl
    // first and must wait for it rather than run alone.
    let m = module(
        r#"
.visible .entry k(.param .u64 out)
{
    .reg .pred %p<4>;
    .reg .b32 %r<8>;
    .reg .b64 %rd<4>;
    ld.param.u64 %rd1, [out];
    mov.u32 %r1, %tid.x;
    mov.u32 %r2, %r1;
    setp.lt.u32 %p1, %r1, 16;
    @%p1 bra DETOUR;
JOIN:
    shfl.sync.bfly.b32 %r3, %r2, 16, 31, -1;
    mul.wide.u32 %rd2, %r1, 4;
    add.s64 %rd3, %rd1, %rd2;
    st.global.u32 [%rd3], %r3;
    ret;
DETOUR:
    add.s32 %r2, %r2, 1000;
    bra.uni JOIN;
}
"#,
    );
    let dev = Dev::new();
    let out = dev.zeros(128);
    dev.launch(
        &m.kernel("k").unwrap(),
        [1; 3],
        [32, 1, 1],
        0,
        &[out],
        false,
    )
    .unwrap();
    let r = read_u32(&dev, out, 32);
    for l in 0..32u32 {
        let src = l ^ 16;
        assert_eq!(
            r[l as usize],
            if src < 16 { src + 1000 } else { src },
            "lane {l}"
        );
    }
}

/// A (16×16) and B (16×8) in the fragment layout of the PTX ISA's figures for
/// mma.m16n8k16 with .bf16: groupID = lane >> 2, threadID_in_group = lane % 4;
/// a_i: row = groupID + 8·(i ∈ {2,3,6,7}), col = 2·tig + (i & 1) + 8·(i ≥ 4);
/// b_i: row = 2·tig + (i & 1) + 8·(i ≥ 2), col = groupID;
/// c_i: row = groupID + 8·(i ≥ 2), col = 2·tig + (i & 1). Register j holds elements 2j, 2j+1
/// (the lower-numbered one in the low half) of A and B, element j of C and D.
fn frag_a(lane: usize, i: usize) -> (usize, usize) {
    let (g, t) = (lane >> 2, lane % 4);
    let row = g + if matches!(i, 2 | 3 | 6 | 7) { 8 } else { 0 };
    let col = 2 * t + (i & 1) + if i >= 4 { 8 } else { 0 };
    (row, col)
}
fn frag_b(lane: usize, i: usize) -> (usize, usize) {
    let (g, t) = (lane >> 2, lane % 4);
    (2 * t + (i & 1) + if i >= 2 { 8 } else { 0 }, g)
}
fn frag_c(lane: usize, i: usize) -> (usize, usize) {
    let (g, t) = (lane >> 2, lane % 4);
    (g + if i >= 2 { 8 } else { 0 }, 2 * t + (i & 1))
}

#[test]
fn mma_m16n8k16_bf16_fragment_layout() {
    mma_case(false);
    mma_case(true);
}

/// `imm_c`: C given as immediates (the constant path of the operand reads).
fn mma_case(imm_c: bool) {
    let text = r#"
.visible .entry k(.param .u64 out, .param .u64 pa, .param .u64 pb, .param .u64 pc)
{
    .reg .b32 %r<16>;
    .reg .f32 %f<16>;
    .reg .b64 %rd<16>;
    mov.u32 %r0, %tid.x;
    mul.wide.u32 %rd0, %r0, 4;
    ld.param.u64 %rd1, [pa];
    add.s64 %rd1, %rd1, %rd0;
    ld.param.u64 %rd2, [pb];
    add.s64 %rd2, %rd2, %rd0;
    ld.param.u64 %rd3, [pc];
    add.s64 %rd3, %rd3, %rd0;
    ld.param.u64 %rd4, [out];
    add.s64 %rd4, %rd4, %rd0;
    ld.global.u32 %r1, [%rd1];
    ld.global.u32 %r2, [%rd1+128];
    ld.global.u32 %r3, [%rd1+256];
    ld.global.u32 %r4, [%rd1+384];
    ld.global.u32 %r5, [%rd2];
    ld.global.u32 %r6, [%rd2+128];
    ld.global.f32 %f1, [%rd3];
    ld.global.f32 %f2, [%rd3+128];
    ld.global.f32 %f3, [%rd3+256];
    ld.global.f32 %f4, [%rd3+384];
    MMA
    st.global.f32 [%rd4], %f5;
    st.global.f32 [%rd4+128], %f6;
    st.global.f32 [%rd4+256], %f7;
    st.global.f32 [%rd4+384], %f8;
    ret;
}
"#;
    let mma = if imm_c {
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f5, %f6, %f7, %f8}, {%r1, %r2, %r3, %r4}, {%r5, %r6}, {0f3F800000, 0f3F800000, 0f3F800000, 0f3F800000};"
    } else {
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f5, %f6, %f7, %f8}, {%r1, %r2, %r3, %r4}, {%r5, %r6}, {%f1, %f2, %f3, %f4};"
    };
    let m = module(&text.replace("MMA", mma));
    // distinct values, all exact in bf16 (integers up to 256), sums exact in f32
    let a = |r: usize, c: usize| (r * 16 + c) as f32;
    let b = |r: usize, c: usize| (r * 8 + c + 1) as f32;
    let c = |r: usize, col: usize| {
        if imm_c {
            1.0
        } else {
            1000.0 + (r * 8 + col) as f32
        }
    };
    let bf = |x: f32| half::bf16::from_f32(x).to_bits() as u32;
    let mut fa = vec![0u32; 128];
    let mut fb = vec![0u32; 64];
    let mut fc = vec![0f32; 128];
    for lane in 0..32 {
        for j in 0..4 {
            let (r0, c0) = frag_a(lane, 2 * j);
            let (r1, c1) = frag_a(lane, 2 * j + 1);
            fa[j * 32 + lane] = bf(a(r0, c0)) | bf(a(r1, c1)) << 16;
            let (r, cc) = frag_c(lane, j);
            fc[j * 32 + lane] = c(r, cc);
        }
        for j in 0..2 {
            let (r0, c0) = frag_b(lane, 2 * j);
            let (r1, c1) = frag_b(lane, 2 * j + 1);
            fb[j * 32 + lane] = bf(b(r0, c0)) | bf(b(r1, c1)) << 16;
        }
    }
    let dev = Dev::new();
    let u32b = |v: &[u32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let (pa, pb, pc) = (dev.bytes(&u32b(&fa)), dev.bytes(&u32b(&fb)), dev.f32(&fc));
    let out = dev.alloc(512);
    dev.launch(
        &m.kernel("k").unwrap(),
        [1; 3],
        [32, 1, 1],
        0,
        &[out, pa, pb, pc],
        false,
    )
    .unwrap();
    let d = dev.read_f32(out, 128);
    for lane in 0..32 {
        for j in 0..4 {
            let (r, col) = frag_c(lane, j);
            let want: f32 = (0..16).map(|k| a(r, k) * b(k, col)).sum::<f32>() + c(r, col);
            assert_eq!(d[j * 32 + lane], want, "D[{r}][{col}] (lane {lane}, d{j})");
        }
    }
}

#[test]
fn ldmatrix_x4_and_trans_layouts() {
    // four 8×8 matrices of u16 in shared memory, rows 32 bytes apart, matrices 256 apart
    let m = module(
        r#"
.shared .align 16 .b8 sm[1024];
.visible .entry k(.param .u64 out, .param .u64 src)
{
    .reg .b32 %r<24>;
    .reg .b64 %rd<8>;
    mov.u32 %r0, %tid.x;
    ld.param.u64 %rd1, [src];
    mul.wide.u32 %rd2, %r0, 32;
    add.s64 %rd3, %rd1, %rd2;
    mov.u32 %r1, sm;
    shl.b32 %r2, %r0, 5;
    add.s32 %r3, %r1, %r2;
    ld.global.v4.u32 {%r4, %r5, %r6, %r7}, [%rd3];
    st.shared.v4.u32 [%r3], {%r4, %r5, %r6, %r7};
    ld.global.v4.u32 {%r4, %r5, %r6, %r7}, [%rd3+16];
    st.shared.v4.u32 [%r3+16], {%r4, %r5, %r6, %r7};
    bar.sync 0;
    // lane l gives row l % 8 of matrix l / 8
    shr.u32 %r8, %r0, 3;
    shl.b32 %r9, %r8, 8;
    and.b32 %r10, %r0, 7;
    shl.b32 %r11, %r10, 5;
    add.s32 %r12, %r9, %r11;
    add.s32 %r13, %r1, %r12;
    ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r14, %r15, %r16, %r17}, [%r13];
    ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%r18, %r19, %r20, %r21}, [%r13];
    ld.param.u64 %rd4, [out];
    mul.wide.u32 %rd5, %r0, 4;
    add.s64 %rd6, %rd4, %rd5;
    st.global.u32 [%rd6], %r14;
    st.global.u32 [%rd6+128], %r15;
    st.global.u32 [%rd6+256], %r16;
    st.global.u32 [%rd6+384], %r17;
    st.global.u32 [%rd6+512], %r18;
    st.global.u32 [%rd6+640], %r19;
    st.global.u32 [%rd6+768], %r20;
    st.global.u32 [%rd6+896], %r21;
    ret;
}
"#,
    );
    let vals: Vec<u16> = (0..512u32).map(|i| (i * 7 + 3) as u16).collect();
    let dev = Dev::new();
    let src = dev.bytes(
        &vals
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>(),
    );
    let out = dev.alloc(1024);
    dev.launch(
        &m.kernel("k").unwrap(),
        [1; 3],
        [32, 1, 1],
        0,
        &[out, src],
        true,
    )
    .unwrap();
    let r = read_u32(&dev, out, 256);
    // M_i[row][col] at byte i·256 + row·32 + 2·col
    let mat = |i: usize, row: usize, col: usize| vals[(i * 256 + row * 32 + 2 * col) / 2] as u32;
    for i in 0..4 {
        for l in 0..32 {
            let (row, c) = (l / 4, 2 * (l % 4));
            assert_eq!(
                r[i * 32 + l],
                mat(i, row, c) | mat(i, row, c + 1) << 16,
                "x4 reg {i} lane {l}"
            );
            assert_eq!(
                r[128 + i * 32 + l],
                mat(i, c, row) | mat(i, c + 1, row) << 16,
                "x4.trans reg {i} lane {l}"
            );
        }
    }
}

#[test]
fn cp_async_lands_at_wait_group_and_zero_fills() {
    let m = module(
        r#"
.shared .align 16 .b8 buf[64];
.visible .entry k(.param .u64 out, .param .u64 src)
{
    .reg .pred %p<2>;
    .reg .b32 %r<16>;
    .reg .b64 %rd<8>;
    ld.param.u64 %rd1, [src];
    ld.param.u64 %rd2, [out];
    mov.u32 %r0, %tid.x;
    setp.ne.u32 %p1, %r0, 0;
    @%p1 bra DONE;
    mov.u32 %r1, buf;
    mov.u32 %r2, 0xaaaaaaaa;
    st.shared.v4.u32 [%r1], {%r2, %r2, %r2, %r2};
    st.shared.v4.u32 [%r1+16], {%r2, %r2, %r2, %r2};
    cp.async.ca.shared.global [%r1], [%rd1], 4;
    cp.async.commit_group;
    mov.u32 %r3, 4;
    cp.async.cg.shared.global [%r1+16], [%rd1+16], 16, %r3;
    cp.async.commit_group;
    // the source changes after the copy was issued: the copy reads it when it lands
    mov.u32 %r4, 999;
    st.global.u32 [%rd1], %r4;
    ld.shared.u32 %r5, [%r1];
    cp.async.wait_group 1;
    ld.shared.u32 %r6, [%r1];
    ld.shared.u32 %r7, [%r1+16];
    cp.async.wait_group 0;
    ld.shared.v4.u32 {%r8, %r9, %r10, %r11}, [%r1+16];
    st.global.u32 [%rd2], %r5;
    st.global.u32 [%rd2+4], %r6;
    st.global.u32 [%rd2+8], %r7;
    st.global.v4.u32 [%rd2+16], {%r8, %r9, %r10, %r11};
DONE:
    ret;
}
"#,
    );
    let dev = Dev::new();
    let src = dev.bytes(
        &(0..32u32)
            .flat_map(|i| (i + 1).to_le_bytes())
            .collect::<Vec<u8>>(),
    );
    let out = dev.zeros(32);
    dev.launch(
        &m.kernel("k").unwrap(),
        [1; 3],
        [32, 1, 1],
        0,
        &[out, src],
        true,
    )
    .unwrap();
    let r = read_u32(&dev, out, 8);
    assert_eq!(
        r[0], 0xaaaa_aaaa,
        "shared read before the wait sees the old data"
    );
    assert_eq!(r[1], 999, "the copy read global memory when it landed");
    assert_eq!(
        r[2], 0xaaaa_aaaa,
        "the newer group is still in flight after wait_group 1"
    );
    assert_eq!(
        &r[4..8],
        &[5, 0, 0, 0],
        "src-size 4 of 16: the rest is zero-filled"
    );
}

#[test]
fn bar_red_or_and_atomics() {
    let m = module(
        r#"
.shared .align 4 .b8 s[8];
.visible .entry k(.param .u64 out, .param .u32 who, .param .u64 gsum, .param .u64 olds)
{
    .reg .pred %p<4>;
    .reg .b32 %r<16>;
    .reg .f32 %f<4>;
    .reg .b64 %rd<8>;
    ld.param.u64 %rd1, [out];
    ld.param.u32 %r1, [who];
    mov.u32 %r0, %tid.x;
    setp.eq.u32 %p1, %r0, %r1;
    bar.red.or.pred %p2, 0, %p1;
    selp.u32 %r2, 1, 0, %p2;
    mul.wide.u32 %rd2, %r0, 4;
    add.s64 %rd3, %rd1, %rd2;
    st.global.u32 [%rd3], %r2;
    // shared min / max from every thread of both warps
    setp.ne.u32 %p3, %r0, 0;
    mov.u32 %r3, s;
    @%p3 bra SKIP;
    mov.u32 %r4, 1000;
    st.shared.u32 [%r3], %r4;
    mov.u32 %r4, -1000;
    st.shared.u32 [%r3+4], %r4;
SKIP:
    bar.sync 0;
    sub.s32 %r5, %r0, 20;
    atom.shared.min.s32 %r6, [%r3], %r5;
    atom.shared.max.s32 %r7, [%r3+4], %r5;
    bar.sync 0;
    ld.shared.u32 %r8, [%r3];
    ld.shared.u32 %r9, [%r3+4];
    st.global.u32 [%rd3+256], %r8;
    st.global.u32 [%rd3+512], %r9;
    // global f32 add from every thread of every CTA
    ld.param.u64 %rd4, [gsum];
    mov.f32 %f1, 0f3F800000;
    atom.global.add.f32 %f2, [%rd4], %f1;
    ld.param.u64 %rd5, [olds];
    mov.u32 %r10, %ctaid.x;
    mad.lo.s32 %r11, %r10, 64, %r0;
    mul.wide.u32 %rd6, %r11, 4;
    add.s64 %rd7, %rd5, %rd6;
    st.global.f32 [%rd7], %f2;
    ret;
}
"#,
    );
    let k = m.kernel("k").unwrap();
    for who in [37u32, 1000] {
        let dev = Dev::new();
        let out = dev.zeros(3 * 256);
        let gsum = dev.zeros(4);
        let olds = dev.zeros(8 * 64 * 4);
        dev.launch(
            &k,
            [8, 1, 1],
            [64, 1, 1],
            0,
            &[out, who as u64, gsum, olds],
            true,
        )
        .unwrap();
        let r = read_u32(&dev, out, 192);
        let any = (who < 64) as u32;
        assert!(
            r[..64].iter().all(|&x| x == any),
            "bar.red.or with who = {who}"
        );
        assert!(
            r[64..128].iter().all(|&x| x as i32 == -20),
            "atom.shared.min"
        );
        assert!(r[128..].iter().all(|&x| x as i32 == 43), "atom.shared.max");
        assert_eq!(
            dev.read_f32(gsum, 1)[0],
            512.0,
            "atom.global.add.f32 from 8 CTAs"
        );
        let mut olds = dev.read_f32(olds, 512);
        olds.sort_by(f32::total_cmp);
        assert!(
            olds.iter().enumerate().all(|(i, &x)| x == i as f32),
            "each add saw a distinct old value"
        );
    }
}

#[test]
fn call_with_params_return_value_and_local_frames() {
    let m = module(
        r#"
.func (.param .b32 retv) addmul(.param .b32 pa, .param .b32 pb)
{
    .local .align 4 .b8 __local_depot1[8];
    .reg .b32 %r<8>;
    .reg .b64 %rd<4>;
    ld.param.b32 %r1, [pa];
    ld.param.b32 %r2, [pb];
    mov.u64 %rd1, __local_depot1;
    st.local.u32 [%rd1], %r1;
    st.local.u32 [%rd1+4], %r2;
    ld.local.u32 %r3, [%rd1+4];
    mul.lo.s32 %r4, %r1, %r3;
    add.s32 %r5, %r4, %r2;
    st.param.b32 [retv], %r5;
    ret;
}
.visible .entry k(.param .u64 out)
{
    .local .align 8 .b8 __local_depot0[16];
    .reg .b64 %SP;
    .reg .b64 %SPL;
    .reg .pred %p<2>;
    .reg .b32 %r<12>;
    .reg .b64 %rd<12>;
    mov.u64 %SPL, __local_depot0;
    cvta.local.u64 %SP, %SPL;
    mov.u32 %r1, %tid.x;
    add.u64 %rd1, %SP, 8;
    cvta.to.local.u64 %rd2, %rd1;
    cvt.u64.u32 %rd3, %r1;
    st.local.u32 [%rd2], %rd3;
    ld.local.u32 %r2, [%SPL+8];
    mov.u32 %r3, 3;
    {
    .param .b32 param0;
    st.param.b32 [param0], %r2;
    .param .b32 param1;
    st.param.b32 [param1], %r3;
    .param .b32 retval0;
    call.uni (retval0), addmul, (param0, param1);
    ld.param.b32 %r4, [retval0];
    }
    // a divergent call: odd lanes only
    mov.u32 %r5, 0;
    and.b32 %r6, %r1, 1;
    setp.eq.u32 %p1, %r6, 1;
    mov.u32 %r7, 5;
    {
    .param .b32 param0;
    st.param.b32 [param0], %r1;
    .param .b32 param1;
    st.param.b32 [param1], %r7;
    .param .b32 retval0;
    @%p1 call (retval0), addmul, (param0, param1);
    @%p1 ld.param.b32 %r5, [retval0];
    }
    ld.param.u64 %rd4, [out];
    mul.wide.u32 %rd5, %r1, 8;
    add.s64 %rd6, %rd4, %rd5;
    st.global.u32 [%rd6], %r4;
    st.global.u32 [%rd6+4], %r5;
    ret;
}
"#,
    );
    let k = m.kernel("k").unwrap();
    assert!(
        k.local_bytes() >= 16 + 8 + 12,
        "frames of both functions and addmul's parameters"
    );
    let dev = Dev::new();
    let out = dev.zeros(64 * 8);
    dev.launch(&k, [1; 3], [64, 1, 1], 0, &[out], true).unwrap();
    let r = read_u32(&dev, out, 128);
    for t in 0..64u32 {
        assert_eq!(r[2 * t as usize], t * 3 + 3, "addmul(tid, 3)");
        assert_eq!(
            r[2 * t as usize + 1],
            if t % 2 == 1 { t * 5 + 5 } else { 0 },
            "odd lanes call"
        );
    }
}

#[test]
fn a_generic_local_address_is_no_global_address() {
    let m = module(
        r#"
.visible .entry k(.param .u64 out)
{
    .local .align 8 .b8 __local_depot0[8];
    .reg .b64 %SP;
    .reg .b64 %SPL;
    .reg .b32 %r<2>;
    mov.u64 %SPL, __local_depot0;
    cvta.local.u64 %SP, %SPL;
    ld.global.u32 %r1, [%SP];
    ret;
}
"#,
    );
    let dev = Dev::new();
    let e = dev
        .launch(&m.kernel("k").unwrap(), [1; 3], [32, 1, 1], 0, &[0], false)
        .unwrap_err();
    assert_eq!(e.kind, gpu_sim::ptx::FaultKind::Memcheck);
    assert!(e.message.contains("no device allocation"), "{}", e.message);
    assert_eq!(e.address, Some(gpu_sim::ptx::LOCAL_WINDOW));
}

#[test]
fn bar_warp_sync_waits_for_its_members() {
    let body = r#"
.visible .entry k(.param .u64 out, .param .u32 mask)
{
    .reg .pred %p<2>;
    .reg .b32 %r<8>;
    .reg .b64 %rd<4>;
    ld.param.u32 %r6, [mask];
    mov.u32 %r1, %tid.x;
    setp.lt.u32 %p1, %r1, 8;
    @%p1 bra DETOUR;
JOIN:
    bar.warp.sync %r6;
    ld.param.u64 %rd1, [out];
    mul.wide.u32 %rd2, %r1, 4;
    add.s64 %rd3, %rd1, %rd2;
    st.global.u32 [%rd3], %r1;
    ret;
DETOUR:
    bra.uni JOIN;
}
"#;
    let m = module(body);
    let dev = Dev::new();
    let out = dev.zeros(128);
    dev.launch(
        &m.kernel("k").unwrap(),
        [1; 3],
        [32, 1, 1],
        0,
        &[out, 0xffff_ffff],
        false,
    )
    .unwrap();
    assert_eq!(read_u32(&dev, out, 32), (0..32).collect::<Vec<u32>>());
    // a member mask naming a lane that exits first is a synccheck error
    let m = module(&body.replace(
        "@%p1 bra DETOUR;",
        "@%p1 bra DETOUR;\n    setp.eq.u32 %p1, %r1, 31;\n    @%p1 ret;",
    ));
    let e = dev
        .launch(
            &m.kernel("k").unwrap(),
            [1; 3],
            [32, 1, 1],
            0,
            &[out, 0xffff_ffff],
            false,
        )
        .unwrap_err();
    assert_eq!(e.kind, gpu_sim::ptx::FaultKind::Synccheck, "{e}");
}
