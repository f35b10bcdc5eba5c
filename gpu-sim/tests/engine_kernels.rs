//! Engine kernels run through `ptx::launch` with the engine's grids, blocks and shared memory,
//! against the CPU reference ops (inputs rounded to bf16, reference in f32).

mod common;
use common::*;
use engine::ops;

#[test]
fn add_bf16_matches_the_reference() {
    let Some(k) = kernel("elementwise", "add_bf16") else { return };
    let dev = Dev::new();
    // 1003: the vector path plus a scalar tail
    let n = 1003;
    let a = bf(&rand_vec(n, 1));
    let b = bf(&rand_vec(n, 2));
    let (pa, pb, po) = (dev.bf16(&a), dev.bf16(&b), dev.alloc(n * 2));
    let grid = n.div_ceil(8).div_ceil(256) as u32;
    let st = dev
        .launch(&k, [grid, 1, 1], [256, 1, 1], 0, &[po, pa, pb, n as u64], true)
        .unwrap();
    assert!(st.warp_instructions > 0);
    let got = dev.read_bf16(po, n);
    let want: Vec<f32> = bf(&a.iter().zip(&b).map(|(x, y)| x + y).collect::<Vec<_>>());
    assert_eq!(got, want, "add_bf16 rounds the f32 sum once");
}

#[test]
fn rmsnorm_fwd_matches_the_reference() {
    let Some(k) = kernel("rmsnorm", "rmsnorm_fwd_bf16") else { return };
    let dev = Dev::new();
    let (rows, h) = (7, 200); // h % 8 == 0 (vector path); 200 > 128: several lanes per row
    let x = bf(&rand_vec(rows * h, 3));
    let w = bf(&rand_vec(h, 4));
    let eps = 1e-5f32;
    let (px, pw, po, pr) = (dev.bf16(&x), dev.bf16(&w), dev.alloc(rows * h * 2), dev.alloc(rows * 4));
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
    let Some(k) = kernel("attention", &name) else { return };
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
            &[po, pl, pq, pk, pv, pdoc, b as u64, t as u64, nh as u64, nkv as u64, f(scale)],
            racecheck,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(st.ctas, (t.div_ceil(64) * nh * b) as u64);
    let d = ops::AttnDims { b, t, nh, nkv, hd };
    let mut out = vec![0f32; q.len()];
    let mut lse = vec![0f32; b * t * nh];
    ops::attention_fwd(&mut out, &mut lse, &q, &kk, &v, with_doc.then_some(&doc[..]), d);
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
