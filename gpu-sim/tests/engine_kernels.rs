//! Engine kernels run through `ptx::launch` with the engine's grids, blocks and shared memory,
//! against the CPU reference ops (inputs rounded to bf16, reference in f32).

mod common;
use common::*;
use engine::ops;

#[test]
fn add_bf16_matches_the_reference() {
    let Some(k) = kernel("elementwise", "add_bf16") else {
        return;
    };
    let dev = Dev::new();
    // 1003: the vector path plus a scalar tail
    let n = 1003;
    let a = bf(&rand_vec(n, 1));
    let b = bf(&rand_vec(n, 2));
    let (pa, pb, po) = (dev.bf16(&a), dev.bf16(&b), dev.alloc(n * 2));
    let grid = n.div_ceil(8).div_ceil(256) as u32;
    let st = dev
        .launch(
            &k,
            [grid, 1, 1],
            [256, 1, 1],
            0,
            &[po, pa, pb, n as u64],
            true,
        )
        .unwrap();
    assert!(st.warp_instructions > 0);
    let got = dev.read_bf16(po, n);
    let want: Vec<f32> = bf(&a.iter().zip(&b).map(|(x, y)| x + y).collect::<Vec<_>>());
    assert_eq!(got, want, "add_bf16 rounds the f32 sum once");
}

#[test]
fn rmsnorm_fwd_matches_the_reference() {
    let Some(k) = kernel("rmsnorm", "rmsnorm_fwd_bf16") else {
        return;
    };
    let dev = Dev::new();
    let (rows, h) = (7, 200); // h % 8 == 0 (vector path); 200 > 128: several lanes per row
    let x = bf(&rand_vec(rows * h, 3));
    let w = bf(&rand_vec(h, 4));
    let eps = 1e-5f32;
    let (px, pw, po, pr) = (
        dev.bf16(&x),
        dev.bf16(&w),
        dev.alloc(rows * h * 2),
        dev.alloc(rows * 4),
    );
    dev.launch(
        &k,
        [rows as u32, 1, 1],
        [256, 1, 1],
        0,
        &[po, pr, px, pw, rows as u64, h as u64, f(eps)],
        true,
    )
    .unwrap();
    let mut want = vec![0f32; rows * h];
    let mut rstd = vec![0f32; rows];
    ops::rmsnorm_fwd(&mut want, &mut rstd, &x, &w, h, eps);
    let (ma, mr) = errs(&dev.read_f32(pr, rows), &rstd, 1e-3);
    assert!(mr < 1e-5, "rstd: max abs {ma}, max rel {mr}");
    let (ma, _) = errs(&dev.read_bf16(po, rows * h), &want, 1.0);
    assert!(ma < 2e-2, "out: max abs {ma}");
}

fn fwd_smem(hd: usize) -> u32 {
    let ld = hd + 8;
    (64 * ld * 2 + 4 * 64 * ld * 2 + 2 * 64 * 4) as u32
}

/// The tensor-core forward at a ragged shape (t = 100: the second query block has 36 rows),
/// GQA group 2, with and without document ids, against ops::attention_fwd.
fn attention_fwd_case(hd: usize, t: usize, with_doc: bool, racecheck: bool) {
    let name = format!("attention_fwd_bf16_hd{hd}");
    let Some(k) = kernel("attention", &name) else {
        return;
    };
    let dev = Dev::new();
    let (b, nh, nkv) = (2, 4, 2);
    let q = bf(&rand_vec(b * t * nh * hd, 11));
    let kk = bf(&rand_vec(b * t * nkv * hd, 12));
    let v = bf(&rand_vec(b * t * nkv * hd, 13));
    // documents: runs of 37 tokens (a boundary inside the first key tile)
    let doc: Vec<i32> = (0..b * t).map(|i| ((i % t) / 37) as i32).collect();
    let (pq, pk, pv) = (dev.bf16(&q), dev.bf16(&kk), dev.bf16(&v));
    let pdoc = if with_doc { dev.i32(&doc) } else { 0 };
    let (po, pl) = (dev.alloc(q.len() * 2), dev.alloc(b * t * nh * 4));
    let scale = 1.0 / (hd as f32).sqrt();
    let st = dev
        .launch(
            &k,
            [t.div_ceil(64) as u32, nh as u32, b as u32],
            [128, 1, 1],
            fwd_smem(hd),
            &[
                po,
                pl,
                pq,
                pk,
                pv,
                pdoc,
                b as u64,
                t as u64,
                nh as u64,
                nkv as u64,
                f(scale),
            ],
            racecheck,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(st.ctas, (t.div_ceil(64) * nh * b) as u64);
    let d = ops::AttnDims { b, t, nh, nkv, hd };
    let mut out = vec![0f32; q.len()];
    let mut lse = vec![0f32; b * t * nh];
    ops::attention_fwd(
        &mut out,
        &mut lse,
        &q,
        &kk,
        &v,
        with_doc.then_some(&doc[..]),
        d,
    );
    let (la, _) = errs(&dev.read_f32(pl, lse.len()), &lse, 1.0);
    assert!(la < 2e-3, "{name}: lse max abs {la}");
    let (oa, _) = errs(&dev.read_bf16(po, out.len()), &out, 1.0);
    assert!(oa < 2e-2, "{name}: out max abs {oa}");
}

#[test]
fn attention_fwd_hd64_matches_the_reference() {
    attention_fwd_case(64, 100, false, true);
}

#[test]
fn attention_fwd_hd64_with_documents_matches_the_reference() {
    attention_fwd_case(64, 100, true, false);
}

#[test]
fn attention_fwd_hd128_matches_the_reference() {
    attention_fwd_case(128, 70, false, false);
}

fn bwd_smem(hd: usize) -> u32 {
    let ld = hd + 8;
    let bm = if hd >= 128 { 32 } else { 64 };
    (2 * 128 * ld * 2 + 4 * bm * ld * 2 + 128 * (bm + 8) * 2 + 3 * 2 * bm * 4 + 128 * 4) as u32
}

/// max |got - want| relative to max |want|.
fn rel_to_max(got: &[f32], want: &[f32]) -> f32 {
    let (ma, _) = errs(got, want, 1.0);
    ma / want.iter().fold(0f32, |m, x| m.max(x.abs()))
}

/// The tensor-core backward (preprocess, dK/dV with dQ atomics, dQ convert) as
/// engine/src/backend/cuda/attention.rs launches it, against ops::attention_bwd.
fn attention_bwd_case(hd: usize, t: usize, with_doc: bool) {
    let Some(pre) = kernel("attention", "attention_bwd_preprocess_bf16") else {
        return;
    };
    let bwd = kernel("attention", &format!("attention_bwd_bf16_hd{hd}")).unwrap();
    let conv = kernel("attention", "attention_bwd_dq_convert_bf16").unwrap();
    let dev = Dev::new();
    let (b, nh, nkv) = (2, 8, 2);
    let d = ops::AttnDims { b, t, nh, nkv, hd };
    let q = bf(&rand_vec(b * t * nh * hd, 21));
    let k = bf(&rand_vec(b * t * nkv * hd, 22));
    let v = bf(&rand_vec(b * t * nkv * hd, 23));
    let dout = bf(&rand_vec(b * t * nh * hd, 24));
    let doc: Vec<i32> = (0..b * t).map(|i| ((i % t) / 150) as i32 + 7).collect();
    let docs = with_doc.then_some(&doc[..]);
    let mut out = vec![0f32; q.len()];
    let mut lse = vec![0f32; b * t * nh];
    ops::attention_fwd(&mut out, &mut lse, &q, &k, &v, docs, d);
    let out = bf(&out);
    let (mut dq, mut dk, mut dv) = (
        vec![0f32; q.len()],
        vec![0f32; k.len()],
        vec![0f32; k.len()],
    );
    ops::attention_bwd(
        &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse, docs, d,
    );

    let (pq, pk, pv, pdo, po) = (
        dev.bf16(&q),
        dev.bf16(&k),
        dev.bf16(&v),
        dev.bf16(&dout),
        dev.bf16(&out),
    );
    let pl = dev.f32(&lse);
    let pdoc = if with_doc { dev.i32(&doc) } else { 0 };
    let rows = b * t * nh;
    let pd = dev.alloc(rows * 4);
    let acc = dev.zeros(q.len() * 4);
    let (pdq, pdk, pdv) = (
        dev.alloc(q.len() * 2),
        dev.alloc(k.len() * 2),
        dev.alloc(k.len() * 2),
    );
    let scale = 1.0 / (hd as f32).sqrt();
    dev.launch(
        &pre,
        [rows.div_ceil(8) as u32, 1, 1],
        [256, 1, 1],
        0,
        &[pd, pdo, po, rows as u64, hd as u64],
        true,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    dev.launch(
        &bwd,
        [t.div_ceil(128) as u32, nkv as u32, b as u32],
        [256, 1, 1],
        bwd_smem(hd),
        &[
            acc,
            pdk,
            pdv,
            pdo,
            pq,
            pk,
            pv,
            pl,
            pd,
            pdoc,
            b as u64,
            t as u64,
            nh as u64,
            nkv as u64,
            f(scale),
        ],
        true,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let nq = q.len();
    dev.launch(
        &conv,
        [nq.div_ceil(256) as u32, 1, 1],
        [256, 1, 1],
        0,
        &[pdq, acc, nq as u64, f(scale)],
        true,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // D = rowsum(dout ∘ out)
    let dsum: Vec<f32> = (0..rows)
        .map(|r| (0..hd).map(|j| dout[r * hd + j] * out[r * hd + j]).sum())
        .collect();
    let (da, _) = errs(&dev.read_f32(pd, rows), &dsum, 1.0);
    assert!(da < 1e-4, "D: max abs {da}");
    for (name, p, want) in [("dq", pdq, &dq), ("dk", pdk, &dk), ("dv", pdv, &dv)] {
        let e = rel_to_max(&dev.read_bf16(p, want.len()), want);
        assert!(
            e < 2e-2,
            "hd{hd} t{t} doc {with_doc}: {name} max error {e} of max |{name}|"
        );
    }
}

#[test]
fn attention_bwd_hd64_matches_the_reference() {
    // t = 260: three key blocks of 128, the last ragged; query blocks of 64
    attention_bwd_case(64, 260, false);
}

#[test]
fn attention_bwd_hd128_with_documents_matches_the_reference() {
    attention_bwd_case(128, 200, true);
}

#[test]
fn rope_fwd_and_bwd_match_the_reference_including_huge_angles() {
    // pow() through call.uni to __internal_accurate_pow, and sincosf's Payne-Hanek path (local
    // frame, the __cudart_i2opi_f table) for angles above 105615
    let dev = Dev::new();
    let Some(fwd) = kernel_bound(&dev, "rope", "rope_fwd_bf16") else {
        return;
    };
    let bwd = kernel_bound(&dev, "rope", "rope_bwd_bf16").unwrap();
    let (heads, hd, theta) = (3, 64, 10000.0f32);
    let pos: Vec<i32> = vec![0, 1, 17, 4095, 123_457, 1_000_003, 2_000_000_000];
    let n = pos.len();
    let x = bf(&rand_vec(n * heads * hd, 31));
    let pp = dev.i32(&pos);
    for (k, sign) in [(&fwd, 1.0f32), (&bwd, -1.0)] {
        let px = dev.bf16(&x);
        dev.launch(
            k,
            [n as u32, 1, 1],
            [256, 1, 1],
            0,
            &[px, pp, n as u64, heads as u64, hd as u64, f(theta)],
            true,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let mut want = x.clone();
        if sign > 0.0 {
            ops::rope_fwd(&mut want, &pos, heads, hd, theta);
        } else {
            ops::rope_bwd(&mut want, &pos, heads, hd, theta);
        }
        let (ma, _) = errs(&dev.read_bf16(px, x.len()), &want, 1.0);
        assert!(ma < 1e-2, "rope sign {sign}: max abs {ma}");
    }
}

#[test]
fn cross_entropy_fwd_matches_the_reference() {
    let Some(k) = kernel("softmax_xent", "cross_entropy_fwd_bf16") else {
        return;
    };
    let dev = Dev::new();
    let (n, v) = (5, 3001);
    let logits: Vec<f32> = bf(&rand_vec(n * v, 41)
        .iter()
        .map(|x| x * 8.0)
        .collect::<Vec<_>>());
    let targets = vec![0, 3000, -1, 17, 1234];
    let (pl, pt, po) = (dev.bf16(&logits), dev.i32(&targets), dev.alloc(n * 4));
    dev.launch(
        &k,
        [n as u32, 1, 1],
        [1024, 1, 1],
        0,
        &[po, pl, pt, n as u64, v as u64],
        true,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut want = vec![0f32; n];
    ops::cross_entropy_fwd(&mut want, &logits, &targets, v);
    let (ma, _) = errs(&dev.read_f32(po, n), &want, 1.0);
    assert!(ma < 1e-4, "losses: max abs {ma}");
}

#[test]
fn reduce_sum_of_squares_in_f64_matches_the_reference() {
    let Some(part) = kernel("reduce", "reduce_sum_f32") else {
        return;
    };
    let fin = kernel("reduce", "reduce_finish_f64").unwrap();
    let dev = Dev::new();
    let n = 100_003;
    let x: Vec<f32> = rand_vec(n, 51);
    let parts = n.div_ceil(256 * 16).clamp(1, 1024);
    let (px, pp, po) = (dev.f32(&x), dev.alloc(parts * 8), dev.alloc(8));
    dev.launch(
        &part,
        [parts as u32, 1, 1],
        [256, 1, 1],
        0,
        &[pp, px, n as u64, 1],
        true,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    dev.launch(
        &fin,
        [1, 1, 1],
        [1024, 1, 1],
        0,
        &[po, pp, parts as u64],
        true,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let got = dev.read_f64(po, 1)[0];
    let want = ops::sum_squares(&x);
    assert!(((got - want) / want).abs() < 1e-12, "{got} vs {want}");
}

#[test]
fn adamw_matches_the_reference() {
    let Some(k) = kernel("adamw", "adamw_f32") else {
        return;
    };
    let dev = Dev::new();
    let n = 1029;
    let (p0, m0, g) = (rand_vec(n, 61), rand_vec(n, 62), rand_vec(n, 63));
    let v0: Vec<f32> = rand_vec(n, 64).iter().map(|x| x.abs()).collect();
    let s = ops::AdamWStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 7,
        grad_scale: 0.5,
    };
    let (pp, pm, pv, pg, psh) = (
        dev.f32(&p0),
        dev.f32(&m0),
        dev.f32(&v0),
        dev.f32(&g),
        dev.alloc(n * 2),
    );
    let bc1 = 1.0 - (s.beta1 as f64).powi(s.step as i32);
    let bc2 = 1.0 - (s.beta2 as f64).powi(s.step as i32);
    let grid = n.div_ceil(4).div_ceil(256) as u32;
    dev.launch(
        &k,
        [grid, 1, 1],
        [256, 1, 1],
        0,
        &[
            pp,
            psh,
            pm,
            pv,
            pg,
            n as u64,
            f(s.beta1),
            f(1.0 - s.beta1),
            f(s.beta2),
            f(1.0 - s.beta2),
            f(s.eps),
            f(1.0 - s.lr * s.weight_decay),
            f((s.lr as f64 / bc1) as f32),
            f(bc2.sqrt() as f32),
            f(s.grad_scale),
        ],
        true,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
    ops::adamw(&mut p, &mut m, &mut v, &g, s);
    for (name, got, want) in [
        ("p", dev.read_f32(pp, n), p.clone()),
        ("m", dev.read_f32(pm, n), m),
        ("v", dev.read_f32(pv, n), v),
    ] {
        let (_, mr) = errs(&got, &want, 1e-6);
        assert!(mr < 1e-5, "{name}: max rel {mr}");
    }
    assert_eq!(
        dev.read_bf16(psh, n),
        bf(&p),
        "the bf16 shadow is the rounded master"
    );
}

#[test]
fn a_fault_in_an_engine_kernel_names_its_cuda_source_line() {
    let Some(k) = kernel("attention", "attention_fwd_bf16_hd64") else {
        return;
    };
    let dev = Dev::new();
    let (b, t, nh, nkv, hd) = (1usize, 64usize, 2usize, 1usize, 64usize);
    let q = dev.bf16(&rand_vec(b * t * nh * hd, 1));
    let kv = dev.bf16(&rand_vec(b * t * nkv * hd, 2));
    let out = dev.alloc(b * t * nh * hd * 2);
    // lse one row short: the last row's store runs past the end
    let lse = dev.alloc((b * t * nh - 1) * 4);
    let e = dev
        .launch(
            &k,
            [1, nh as u32, b as u32],
            [128, 1, 1],
            fwd_smem(hd),
            &[
                out,
                lse,
                q,
                kv,
                kv,
                0,
                b as u64,
                t as u64,
                nh as u64,
                nkv as u64,
                f(0.125),
            ],
            false,
        )
        .unwrap_err();
    assert_eq!(e.kind, gpu_sim::ptx::FaultKind::Memcheck);
    let (file, line) = e.source.clone().expect("the PTX has line info");
    assert!(file.ends_with("attention.cu") && line > 0, "{file}:{line}");
    assert!(
        e.message.contains(&format!("attention.cu:{line}")),
        "{}",
        e.message
    );
    assert_eq!(e.address, Some(lse + ((b * t * nh - 1) * 4) as u64));
    assert_eq!(e.block, [0, 1, 0], "the last row belongs to head 1");
}

#[test]
fn attention_fwd_hd64_skips_key_tiles_before_the_document() {
    // t = 260: the block of rows 192..255 starts in the document 185..221, so key tiles 0 and 1
    // are skipped; the last block has 4 rows
    attention_fwd_case(64, 260, true, true);
}
