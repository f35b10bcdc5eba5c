//! The rest of the engine's kernels through `ptx::launch`, with racecheck on, launched as
//! engine/src/backend/cuda/ops.rs and attention.rs launch them, against engine::ops.

mod common;
use common::*;
use engine::ops;

const SMS: usize = 132; // grid_for's cap: sm_count · 16

fn grid_for(work: usize, per_block: usize) -> u32 {
    work.div_ceil(per_block).clamp(1, SMS * 16) as u32
}

fn ew_grid(n: usize) -> u32 {
    grid_for(n.div_ceil(8), 256)
}

#[test]
fn swiglu_fwd_bwd_and_f32_to_bf16() {
    let Some(fwd) = kernel("elementwise", "swiglu_fwd_bf16") else {
        return;
    };
    let bwd = kernel("elementwise", "swiglu_bwd_bf16").unwrap();
    let cvt = kernel("elementwise", "f32_to_bf16").unwrap();
    let dev = Dev::new();
    let n = 4099;
    let (g, u, d) = (
        bf(&rand_vec(n, 71)),
        bf(&rand_vec(n, 72)),
        bf(&rand_vec(n, 73)),
    );
    let (pg, pu, pd) = (dev.bf16(&g), dev.bf16(&u), dev.bf16(&d));
    let po = dev.alloc(n * 2);
    dev.launch(
        &fwd,
        [ew_grid(n), 1, 1],
        [256, 1, 1],
        0,
        &[po, pg, pu, n as u64],
        true,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut want = vec![0f32; n];
    ops::swiglu_fwd(&mut want, &g, &u);
    let (ma, _) = errs(&dev.read_bf16(po, n), &want, 1.0);
    assert!(ma < 1e-2, "swiglu_fwd: {ma}");
    let (pdg, pdu) = (dev.alloc(n * 2), dev.alloc(n * 2));
    dev.launch(
        &bwd,
        [ew_grid(n), 1, 1],
        [256, 1, 1],
        0,
        &[pdg, pdu, pd, pg, pu, n as u64],
        true,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
    ops::swiglu_bwd(&mut dg, &mut du, &d, &g, &u);
    let (a1, _) = errs(&dev.read_bf16(pdg, n), &dg, 1.0);
    let (a2, _) = errs(&dev.read_bf16(pdu, n), &du, 1.0);
    assert!(a1 < 1e-2 && a2 < 1e-2, "swiglu_bwd: {a1} {a2}");
    let x = rand_vec(n, 74);
    let (px, pb) = (dev.f32(&x), dev.alloc(n * 2));
    dev.launch(
        &cvt,
        [ew_grid(n), 1, 1],
        [256, 1, 1],
        0,
        &[pb, px, n as u64],
        true,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(dev.read_bf16(pb, n), bf(&x));
}

#[test]
fn gather_scatter_rows_and_embedding_bwd() {
    let Some(gather) = kernel("elementwise", "gather_rows_bf16") else {
        return;
    };
    let scatter = kernel("elementwise", "scatter_rows_bf16").unwrap();
    let ebwd = kernel("embedding", "embedding_bwd_bf16").unwrap();
    let dev = Dev::new();
    let (vocab, w) = (50, 72);
    let table = bf(&rand_vec(vocab * w, 81));
    let ids: Vec<i32> = vec![3, 49, 0, 3, 17, 3, 49];
    let n = ids.len();
    let (pt, pi, pout) = (dev.bf16(&table), dev.i32(&ids), dev.alloc(n * w * 2));
    dev.launch(
        &gather,
        [n as u32, 1, 1],
        [256, 1, 1],
        0,
        &[pout, pt, pi, n as u64, w as u64],
        true,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut want = vec![0f32; n * w];
    ops::gather_rows(&mut want, &table, &ids, w);
    assert_eq!(dev.read_bf16(pout, n * w), want);
    // scatter distinct rows into a cache
    let rows: Vec<i32> = vec![5, 0, 9];
    let src = bf(&rand_vec(rows.len() * w, 82));
    let cache = bf(&rand_vec(10 * w, 83));
    let (pc, ps, pr) = (dev.bf16(&cache), dev.bf16(&src), dev.i32(&rows));
    dev.launch(
        &scatter,
        [3, 1, 1],
        [256, 1, 1],
        0,
        &[pc, ps, pr, 3, w as u64],
        true,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut want = cache.clone();
    ops::scatter_rows(&mut want, &src, &rows, w);
    assert_eq!(dev.read_bf16(pc, 10 * w), want);
    // embedding backward with the host's grouping plan (tokens by id, in order)
    let dout = bf(&rand_vec(n * w, 84));
    let mut order: Vec<i32> = (0..n as i32).collect();
    order.sort_by_key(|&t| (ids[t as usize], t));
    let (mut seg, mut seg_id) = (vec![], vec![]);
    for (k, &t) in order.iter().enumerate() {
        let id = ids[t as usize];
        if seg_id.last() != Some(&id) {
            seg.push(k as i32);
            seg_id.push(id);
        }
    }
    seg.push(n as i32);
    let u = seg_id.len();
    let dw0 = rand_vec(vocab * w, 85);
    let (pdw, pdo) = (dev.f32(&dw0), dev.bf16(&dout));
    let (po, pseg, psid) = (dev.i32(&order), dev.i32(&seg), dev.i32(&seg_id));
    dev.launch(
        &ebwd,
        [u as u32, 1, 1],
        [256, 1, 1],
        0,
        &[pdw, pdo, po, pseg, psid, u as u64, w as u64],
        true,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut want = dw0.clone();
    ops::embedding_bwd(&mut want, &dout, &ids, w);
    let (ma, _) = errs(&dev.read_f32(pdw, vocab * w), &want, 1.0);
    assert!(ma < 1e-5, "embedding_bwd: {ma}");
}

#[test]
fn rmsnorm_bwd_and_dw_reduce() {
    let Some(bwd) = kernel("rmsnorm", "rmsnorm_bwd_bf16") else {
        return;
    };
    let red = kernel("rmsnorm", "rmsnorm_dw_reduce").unwrap();
    let dev = Dev::new();
    for h in [200usize, 100] {
        // h = 100: not a multiple of 8, the scalar path
        let n = 1030;
        let (x, w, dout) = (
            bf(&rand_vec(n * h, 91)),
            bf(&rand_vec(h, 92)),
            bf(&rand_vec(n * h, 93)),
        );
        let dx0 = bf(&rand_vec(n * h, 94));
        let mut out = vec![0f32; n * h];
        let mut rstd = vec![0f32; n];
        ops::rmsnorm_fwd(&mut out, &mut rstd, &x, &w, h, 1e-5);
        let per = n.div_ceil(512);
        let parts = n.div_ceil(per);
        let (px, pw, pdo, pr, pdx) = (
            dev.bf16(&x),
            dev.bf16(&w),
            dev.bf16(&dout),
            dev.f32(&rstd),
            dev.bf16(&dx0),
        );
        let part = dev.alloc(parts * h * 4);
        let dw0 = rand_vec(h, 95);
        let pdw = dev.f32(&dw0);
        dev.launch(
            &bwd,
            [parts as u32, 1, 1],
            [256, 1, 1],
            (h * 4) as u32,
            &[pdx, part, pdo, px, pw, pr, n as u64, h as u64, per as u64],
            true,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        dev.launch(
            &red,
            [h.div_ceil(256) as u32, 1, 1],
            [256, 1, 1],
            0,
            &[pdw, part, parts as u64, h as u64],
            true,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let (mut dx, mut dw) = (dx0.clone(), dw0.clone());
        ops::rmsnorm_bwd(&mut dx, &mut dw, &dout, &x, &w, &rstd, h);
        let (a1, _) = errs(&dev.read_bf16(pdx, n * h), &dx, 1.0);
        let (a2, r2) = errs(&dev.read_f32(pdw, h), &dw, 1.0);
        assert!(a1 < 3e-2, "h {h}: dx max abs {a1}");
        assert!(r2 < 1e-3, "h {h}: dw max abs {a2} rel {r2}");
    }
}

#[test]
fn scalar_head_fwd_and_bwd() {
    let Some(fwd) = kernel("scalar_head", "scalar_head_fwd_bf16") else {
        return;
    };
    let bwd = kernel("scalar_head", "scalar_head_bwd_bf16").unwrap();
    let dev = Dev::new();
    let (nrows, d) = (9, 300);
    let h = bf(&rand_vec(nrows * d, 101));
    let w = bf(&rand_vec(d, 102));
    let rows: Vec<i32> = vec![8, 0, 4, 4];
    let m = rows.len();
    let (ph, pw, pr, po) = (dev.bf16(&h), dev.bf16(&w), dev.i32(&rows), dev.alloc(m * 4));
    dev.launch(
        &fwd,
        [m as u32, 1, 1],
        [256, 1, 1],
        0,
        &[po, ph, pw, pr, m as u64, d as u64],
        true,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut want = vec![0f32; m];
    ops::scalar_head_fwd(&mut want, &h, &w, &rows, d);
    let (ma, _) = errs(&dev.read_f32(po, m), &want, 1.0);
    assert!(ma < 1e-4, "scalar_head_fwd: {ma}");
    let dout = rand_vec(m, 103);
    let dh0 = bf(&rand_vec(nrows * d, 104));
    let dw0 = rand_vec(d, 105);
    let (pdh, pdw, pdo) = (dev.bf16(&dh0), dev.f32(&dw0), dev.f32(&dout));
    dev.launch(
        &bwd,
        [d.div_ceil(256) as u32, 1, 1],
        [256, 1, 1],
        0,
        &[pdh, pdw, pdo, ph, pw, pr, m as u64, d as u64],
        true,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (mut dh, mut dw) = (dh0.clone(), dw0.clone());
    ops::scalar_head_bwd(&mut dh, &mut dw, &dout, &h, &w, &rows, d);
    let (a1, _) = errs(&dev.read_bf16(pdh, nrows * d), &dh, 1.0);
    let (a2, _) = errs(&dev.read_f32(pdw, d), &dw, 1.0);
    assert!(a1 < 2e-2 && a2 < 1e-5, "scalar_head_bwd: {a1} {a2}");
}

#[test]
fn cross_entropy_bwd_and_logprob_fwd_bwd() {
    let Some(xb) = kernel("softmax_xent", "cross_entropy_bwd_bf16") else {
        return;
    };
    let lf = kernel("softmax_xent", "logprob_fwd_bf16").unwrap();
    let lb = kernel("softmax_xent", "logprob_bwd_bf16").unwrap();
    let dev = Dev::new();
    let (n, v) = (4, 2051);
    let logits: Vec<f32> = bf(&rand_vec(n * v, 111)
        .iter()
        .map(|x| x * 6.0)
        .collect::<Vec<_>>());
    let targets = vec![5, -1, 2050, 0];
    let pt = dev.i32(&targets);
    // cross-entropy backward in place
    let pl = dev.bf16(&logits);
    dev.launch(
        &xb,
        [n as u32, 1, 1],
        [1024, 1, 1],
        0,
        &[pl, pt, n as u64, v as u64, f(0.25)],
        true,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut want = logits.clone();
    ops::cross_entropy_bwd(&mut want, &targets, v, 0.25);
    let (ma, _) = errs(&dev.read_bf16(pl, n * v), &want, 1.0);
    assert!(ma < 1e-3, "cross_entropy_bwd: {ma}");
    // log-probabilities and entropies
    let pl = dev.bf16(&logits);
    let (plp, pen) = (dev.alloc(n * 4), dev.alloc(n * 4));
    dev.launch(
        &lf,
        [n as u32, 1, 1],
        [1024, 1, 1],
        0,
        &[plp, pen, pl, pt, n as u64, v as u64],
        true,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (mut lp, mut en) = (vec![0f32; n], vec![0f32; n]);
    ops::logprob_fwd(&mut lp, &mut en, &logits, &targets, v);
    let (a1, _) = errs(&dev.read_f32(plp, n), &lp, 1.0);
    let (a2, _) = errs(&dev.read_f32(pen, n), &en, 1.0);
    assert!(a1 < 1e-4 && a2 < 1e-4, "logprob_fwd: {a1} {a2}");
    let weights = vec![0.5f32, 1.0, 0.0, -2.0];
    let pw = dev.f32(&weights);
    dev.launch(
        &lb,
        [n as u32, 1, 1],
        [1024, 1, 1],
        0,
        &[pl, pt, pw, n as u64, v as u64],
        true,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut want = logits.clone();
    ops::logprob_bwd(&mut want, &targets, &weights, v);
    let (ma, _) = errs(&dev.read_bf16(pl, n * v), &want, 1.0);
    assert!(ma < 1e-2, "logprob_bwd: {ma}");
}

#[test]
fn naive_attention_fwd_bwd_and_the_kv_cache_kernel() {
    let Some(fwd) = kernel("attention", "attention_fwd_naive_bf16") else {
        return;
    };
    let pre = kernel("attention", "attention_bwd_preprocess_bf16").unwrap();
    let dqk = kernel("attention", "attention_bwd_naive_dq_bf16").unwrap();
    let dkv = kernel("attention", "attention_bwd_naive_dkdv_bf16").unwrap();
    let dev = Dev::new();
    // hd 40: not a fast-path size; t 130: two key chunks of 128; GQA group 2
    let (b, t, nh, nkv, hd) = (1, 130, 2, 1, 40);
    let d = ops::AttnDims { b, t, nh, nkv, hd };
    let q = bf(&rand_vec(b * t * nh * hd, 121));
    let k = bf(&rand_vec(b * t * nkv * hd, 122));
    let v = bf(&rand_vec(b * t * nkv * hd, 123));
    let dout = bf(&rand_vec(b * t * nh * hd, 124));
    let doc: Vec<i32> = (0..b * t).map(|i| ((i % t) / 50) as i32).collect();
    let (pq, pk, pv, pdo, pdoc) = (
        dev.bf16(&q),
        dev.bf16(&k),
        dev.bf16(&v),
        dev.bf16(&dout),
        dev.i32(&doc),
    );
    let (po, pl) = (dev.alloc(q.len() * 2), dev.alloc(b * t * nh * 4));
    let scale = f(1.0 / (hd as f32).sqrt());
    let dims = [b as u64, t as u64, nh as u64, nkv as u64, hd as u64];
    let mut args = vec![po, pl, pq, pk, pv, pdoc];
    args.extend(dims);
    args.push(scale);
    dev.launch(
        &fwd,
        [t as u32, nh as u32, b as u32],
        [128, 1, 1],
        0,
        &args,
        true,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (mut out, mut lse) = (vec![0f32; q.len()], vec![0f32; b * t * nh]);
    ops::attention_fwd(&mut out, &mut lse, &q, &k, &v, Some(&doc), d);
    let (la, _) = errs(&dev.read_f32(pl, lse.len()), &lse, 1.0);
    let (oa, _) = errs(&dev.read_bf16(po, out.len()), &out, 1.0);
    assert!(la < 1e-4 && oa < 1e-2, "naive fwd: lse {la} out {oa}");
    let out = bf(&out);
    let (po, pl) = (dev.bf16(&out), dev.f32(&lse));
    let rows = b * t * nh;
    let pd = dev.alloc(rows * 4);
    dev.launch(
        &pre,
        [rows.div_ceil(8) as u32, 1, 1],
        [256, 1, 1],
        0,
        &[pd, pdo, po, rows as u64, hd as u64],
        true,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (pdq, pdk, pdv) = (
        dev.alloc(q.len() * 2),
        dev.alloc(k.len() * 2),
        dev.alloc(k.len() * 2),
    );
    let mut a = vec![pdq, pdo, pq, pk, pv, pl, pd, pdoc];
    a.extend(dims);
    a.push(scale);
    dev.launch(
        &dqk,
        [t as u32, nh as u32, b as u32],
        [128, 1, 1],
        0,
        &a,
        true,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut a = vec![pdk, pdv, pdo, pq, pk, pv, pl, pd, pdoc];
    a.extend(dims);
    a.push(scale);
    dev.launch(
        &dkv,
        [t as u32, nkv as u32, b as u32],
        [128, 1, 1],
        0,
        &a,
        true,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (mut dq, mut dk, mut dv) = (
        vec![0f32; q.len()],
        vec![0f32; k.len()],
        vec![0f32; k.len()],
    );
    ops::attention_bwd(
        &mut dq,
        &mut dk,
        &mut dv,
        &dout,
        &q,
        &k,
        &v,
        &out,
        &lse,
        Some(&doc),
        d,
    );
    for (name, p, want) in [("dq", pdq, &dq), ("dk", pdk, &dk), ("dv", pdv, &dv)] {
        let (ma, _) = errs(&dev.read_bf16(p, want.len()), want, 1.0);
        let top = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(ma / top < 1e-2, "naive {name}: {ma} of {top}");
    }
    // KV cache: 3 sequences of 2 new tokens each against caches of 40 positions
    let cached = kernel("attention", "attention_cached_bf16").unwrap();
    let c = ops::CacheDims {
        b: 3,
        tq: 2,
        tmax: 40,
        nh: 4,
        nkv: 2,
        hd: 72,
    };
    let q = bf(&rand_vec(c.b * c.tq * c.nh * c.hd, 131));
    let kc = bf(&rand_vec(c.b * c.tmax * c.nkv * c.hd, 132));
    let vc = bf(&rand_vec(c.b * c.tmax * c.nkv * c.hd, 133));
    let qpos = vec![0, 1, 20, 21, 38, 39];
    let (pq, pk, pv, pp, po) = (
        dev.bf16(&q),
        dev.bf16(&kc),
        dev.bf16(&vc),
        dev.i32(&qpos),
        dev.alloc(q.len() * 2),
    );
    dev.launch(
        &cached,
        [(c.b * c.tq) as u32, c.nh as u32, 1],
        [256, 1, 1],
        0,
        &[
            po,
            pq,
            pk,
            pv,
            pp,
            c.b as u64,
            c.tq as u64,
            c.tmax as u64,
            c.nh as u64,
            c.nkv as u64,
            c.hd as u64,
            f(1.0 / (c.hd as f32).sqrt()),
        ],
        true,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut want = vec![0f32; q.len()];
    ops::attention_cached(&mut want, &q, &kc, &vc, &qpos, c);
    let (ma, _) = errs(&dev.read_bf16(po, q.len()), &want, 1.0);
    assert!(ma < 1e-2, "attention_cached: {ma}");
}
