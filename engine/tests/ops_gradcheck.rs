//! Finite-difference gradient checks for every CPU op in `engine::ops`, plus forward-formula
//! checks against straightforward f64 re-implementations.
//!
//! For an op y = f(x) we draw random inputs and a random cotangent R, define L = Σ y ⊙ R
//! (accumulated in f64), take the analytic gradient from the op's backward and compare it with
//! central differences for every input element: max|fd − analytic| <= 2e-2·max|analytic| + 1e-3.
//! Backward conventions are checked too: ops that accumulate are run twice on a non-zero buffer
//! (the second call must add the same again), ops that overwrite are run on NaN-filled buffers.

use engine::ops::{self, AdamWStep, AttnDims};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Central-difference step.
const EPS: f32 = 1e-2;

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `n` values uniform in (-lim, lim).
fn randv(rng: &mut ChaCha8Rng, n: usize, lim: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-lim..lim)).collect()
}

/// Σ a ⊙ b in f64.
fn dot(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// Per-tensor max-abs comparison: max|got − want| <= rtol·max|want| + atol (NaN fails).
fn assert_close<A: Copy + Into<f64>, B: Copy + Into<f64>>(
    name: &str,
    got: &[A],
    want: &[B],
    rtol: f64,
    atol: f64,
) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let (mut err, mut scale, mut worst) = (0f64, 0f64, 0);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (g, w): (f64, f64) = (g.into(), w.into());
        assert!(
            g.is_finite() && w.is_finite(),
            "{name}: non-finite at {i}: {g} vs {w}"
        );
        if (g - w).abs() > err {
            err = (g - w).abs();
            worst = i;
        }
        scale = scale.max(w.abs());
    }
    let tol = rtol * scale + atol;
    println!("{name:<44} max|want|={scale:.3e} max err={err:.3e} (at {worst}) tol={tol:.3e}");
    assert!(
        err <= tol,
        "{name}: max error {err:e} at {worst} > {tol:e} (got {}, want {})",
        got[worst].into(),
        want[worst].into()
    );
}

/// Compares `analytic` with central differences of `loss` at every element of `x`.
fn gradcheck(name: &str, x: &[f32], loss: impl Fn(&[f32]) -> f64, analytic: &[f32]) {
    assert_eq!(x.len(), analytic.len(), "{name}: gradient shape");
    let mut xp = x.to_vec();
    let fd: Vec<f64> = (0..x.len())
        .map(|i| {
            xp[i] = x[i] + EPS;
            let (hi, lp) = (xp[i], loss(&xp));
            xp[i] = x[i] - EPS;
            let (lo, lm) = (xp[i], loss(&xp));
            xp[i] = x[i];
            (lp - lm) / (hi as f64 - lo as f64)
        })
        .collect();
    let scale = analytic.iter().fold(0f32, |m, g| m.max(g.abs()));
    assert!(
        scale > 1e-2,
        "{name}: gradient ~0 ({scale:e}), the check would be vacuous"
    );
    assert_close(&format!("grad {name}"), analytic, &fd, 2e-2, 1e-3);
}

/// Runs an accumulating backward twice on buffers pre-filled with random values: the second call
/// must add as much again. Returns the first call's increments (the gradients).
fn accumulated(
    name: &str,
    rng: &mut ChaCha8Rng,
    lens: &[usize],
    mut bwd: impl FnMut(&mut [Vec<f32>]),
) -> Vec<Vec<f32>> {
    let bases: Vec<Vec<f32>> = lens.iter().map(|&n| randv(rng, n, 1.0)).collect();
    let mut bufs = bases.clone();
    bwd(&mut bufs);
    let diff = |bufs: &[Vec<f32>]| -> Vec<Vec<f32>> {
        bufs.iter()
            .zip(&bases)
            .map(|(b, base)| b.iter().zip(base).map(|(x, y)| x - y).collect())
            .collect()
    };
    let once = diff(&bufs);
    bwd(&mut bufs);
    for (k, (twice, once)) in diff(&bufs).iter().zip(&once).enumerate() {
        let want: Vec<f32> = once.iter().map(|g| 2.0 * g).collect();
        assert_close(
            &format!("{name}[{k}] accumulates"),
            twice,
            &want,
            1e-5,
            1e-6,
        );
    }
    once
}

/// Runs an overwriting backward on NaN-filled buffers, then again on its own output: both
/// results must be finite and identical.
fn overwritten(name: &str, lens: &[usize], mut bwd: impl FnMut(&mut [Vec<f32>])) -> Vec<Vec<f32>> {
    let mut bufs: Vec<Vec<f32>> = lens.iter().map(|&n| vec![f32::NAN; n]).collect();
    bwd(&mut bufs);
    let first = bufs.clone();
    bwd(&mut bufs);
    for (k, (a, b)) in first.iter().zip(&bufs).enumerate() {
        assert!(
            a.iter().all(|x| x.is_finite()),
            "{name}[{k}]: read the NaN-filled output"
        );
        assert_eq!(a, b, "{name}[{k}]: second call did not overwrite");
    }
    first
}

// ------------------------------------------------------------------------------------------------

fn matmul_naive(x: &[f32], w: &[f32], n: usize, i: usize, o: usize) -> Vec<f64> {
    (0..n * o)
        .map(|idx| {
            let (r, c) = (idx / o, idx % o);
            (0..i)
                .map(|j| x[r * i + j] as f64 * w[c * i + j] as f64)
                .sum()
        })
        .collect()
}

#[test]
fn matmul() {
    let (n, i, o) = (5, 7, 3);
    let mut r = rng(1);
    let (x, w, ry) = (
        randv(&mut r, n * i, 1.0),
        randv(&mut r, o * i, 1.0),
        randv(&mut r, n * o, 1.0),
    );
    let fwd = |x: &[f32], w: &[f32]| {
        let mut y = vec![f32::NAN; n * o];
        ops::matmul_fwd(&mut y, x, w, n, i, o);
        y
    };
    assert_close(
        "matmul_fwd",
        &fwd(&x, &w),
        &matmul_naive(&x, &w, n, i, o),
        1e-6,
        1e-6,
    );

    let dx = overwritten("matmul_bwd_data", &[n * i], |b| {
        ops::matmul_bwd_data(&mut b[0], &ry, &w, n, i, o, false)
    });
    gradcheck("matmul dx", &x, |x| dot(&fwd(x, &w), &ry), &dx[0]);
    let dx = accumulated("matmul_bwd_data(accumulate)", &mut r, &[n * i], |b| {
        ops::matmul_bwd_data(&mut b[0], &ry, &w, n, i, o, true)
    });
    gradcheck(
        "matmul dx (accumulate)",
        &x,
        |x| dot(&fwd(x, &w), &ry),
        &dx[0],
    );
    let dw = accumulated("matmul_bwd_weight", &mut r, &[o * i], |b| {
        ops::matmul_bwd_weight(&mut b[0], &ry, &x, n, i, o)
    });
    gradcheck("matmul dw", &w, |w| dot(&fwd(&x, w), &ry), &dw[0]);
}

/// Large enough (m·n·k >= 2^15) for the parallel GEMM path; checked against f64 formulas.
#[test]
fn matmul_parallel_path() {
    let (n, i, o) = (33, 35, 31);
    let mut r = rng(2);
    let (x, w, dy) = (
        randv(&mut r, n * i, 1.0),
        randv(&mut r, o * i, 1.0),
        randv(&mut r, n * o, 1.0),
    );
    let mut y = vec![0.0; n * o];
    ops::matmul_fwd(&mut y, &x, &w, n, i, o);
    assert_close(
        "matmul_fwd (parallel)",
        &y,
        &matmul_naive(&x, &w, n, i, o),
        1e-6,
        1e-6,
    );
    // dx = dy · w: the naive matmul with w transposed.
    let wt: Vec<f32> = (0..i * o).map(|idx| w[(idx % o) * i + idx / o]).collect();
    let mut dx = vec![f32::NAN; n * i];
    ops::matmul_bwd_data(&mut dx, &dy, &w, n, i, o, false);
    assert_close(
        "matmul_bwd_data (parallel)",
        &dx,
        &matmul_naive(&dy, &wt, n, o, i),
        1e-6,
        1e-6,
    );
    // dw = dyᵀ · x.
    let dyt: Vec<f32> = (0..o * n).map(|idx| dy[(idx % n) * o + idx / n]).collect();
    let xt: Vec<f32> = (0..i * n).map(|idx| x[(idx % n) * i + idx / n]).collect();
    let mut dw = vec![0.0; o * i];
    ops::matmul_bwd_weight(&mut dw, &dy, &x, n, i, o);
    assert_close(
        "matmul_bwd_weight (parallel)",
        &dw,
        &matmul_naive(&dyt, &xt, o, n, i),
        1e-6,
        1e-6,
    );
}

#[test]
fn embedding() {
    let (vocab, h) = (6, 5);
    let ids = [2, 0, 2, 5, 2, 1, 0];
    let n = ids.len();
    let mut r = rng(3);
    let (wte, ry) = (randv(&mut r, vocab * h, 1.0), randv(&mut r, n * h, 1.0));
    let fwd = |wte: &[f32]| {
        let mut y = vec![f32::NAN; n * h];
        ops::embedding_fwd(&mut y, &ids, wte, h);
        y
    };
    let y = fwd(&wte);
    for (t, &id) in ids.iter().enumerate() {
        assert_eq!(
            &y[t * h..(t + 1) * h],
            &wte[id as usize * h..(id as usize + 1) * h]
        );
    }
    let dwte = accumulated("embedding_bwd", &mut r, &[vocab * h], |b| {
        ops::embedding_bwd(&mut b[0], &ry, &ids, h)
    });
    gradcheck("embedding dwte", &wte, |w| dot(&fwd(w), &ry), &dwte[0]);
}

#[test]
fn rmsnorm() {
    // 19 rows: more than one block of rows in the backward's reduction.
    let (n, h, eps) = (19, 7, 1e-5f32);
    let mut r = rng(4);
    let (x, w, ry) = (
        randv(&mut r, n * h, 1.5),
        randv(&mut r, h, 1.5),
        randv(&mut r, n * h, 1.0),
    );
    let fwd = |x: &[f32], w: &[f32]| {
        let (mut y, mut rstd) = (vec![f32::NAN; n * h], vec![f32::NAN; n]);
        ops::rmsnorm_fwd(&mut y, &mut rstd, x, w, h, eps);
        (y, rstd)
    };
    let (y, rstd) = fwd(&x, &w);
    let want_rstd: Vec<f64> = x
        .chunks(h)
        .map(|row| {
            1.0 / (row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / h as f64 + eps as f64)
                .sqrt()
        })
        .collect();
    let want_y: Vec<f64> = (0..n * h)
        .map(|idx| w[idx % h] as f64 * x[idx] as f64 * want_rstd[idx / h])
        .collect();
    assert_close("rmsnorm_fwd rstd", &rstd, &want_rstd, 1e-6, 0.0);
    assert_close("rmsnorm_fwd out", &y, &want_y, 1e-6, 1e-7);

    let g = accumulated("rmsnorm_bwd", &mut r, &[n * h, h], |b| {
        let [dx, dw] = b else { unreachable!() };
        ops::rmsnorm_bwd(dx, dw, &ry, &x, &w, &rstd, h)
    });
    gradcheck("rmsnorm dx", &x, |x| dot(&fwd(x, &w).0, &ry), &g[0]);
    gradcheck("rmsnorm dw", &w, |w| dot(&fwd(&x, w).0, &ry), &g[1]);
}

#[test]
fn rope() {
    let (heads, hd, theta) = (3, 6, 10000.0f32);
    let pos = [0, 1, 7, 300, 2047];
    let n = pos.len();
    let half = hd / 2;
    let inv = ops::rope_inv_freq(hd, theta);
    let want_inv: Vec<f64> = (0..half)
        .map(|i| 1.0 / (theta as f64).powf((2 * i) as f64 / hd as f64))
        .collect();
    assert_close("rope_inv_freq", &inv, &want_inv, 1e-6, 0.0);

    let mut r = rng(5);
    let (x, ry) = (
        randv(&mut r, n * heads * hd, 1.0),
        randv(&mut r, n * heads * hd, 1.0),
    );
    let fwd = |x: &[f32]| {
        let mut y = x.to_vec();
        ops::rope_fwd(&mut y, &pos, heads, hd, theta);
        y
    };
    // Hugging Face: out = x·cos + rotate_half(x)·sin, rotate_half(x) = [-x2, x1]; the angle is
    // the f32 product of position and inverse frequency.
    let mut want = vec![0f64; x.len()];
    for (t, &p) in pos.iter().enumerate() {
        for hh in 0..heads {
            let base = (t * heads + hh) * hd;
            for i in 0..half {
                let ang = (p as f32 * inv[i]) as f64;
                let (a, b) = (x[base + i] as f64, x[base + i + half] as f64);
                want[base + i] = a * ang.cos() - b * ang.sin();
                want[base + i + half] = b * ang.cos() + a * ang.sin();
            }
        }
    }
    let y = fwd(&x);
    assert_close("rope_fwd", &y, &want, 1e-5, 0.0);
    // A rotation: the backward (rotation by minus the angle) undoes the forward.
    let mut back = y.clone();
    ops::rope_bwd(&mut back, &pos, heads, hd, theta);
    assert_close("rope_bwd(rope_fwd(x)) = x", &back, &x, 1e-5, 0.0);

    let mut dx = ry.clone();
    ops::rope_bwd(&mut dx, &pos, heads, hd, theta);
    gradcheck("rope dx", &x, |x| dot(&fwd(x), &ry), &dx);
}

// ------------------------------------------------------------------------------------------------
// Attention

fn attn_fwd(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    doc: Option<&[i32]>,
    d: AttnDims,
) -> (Vec<f32>, Vec<f32>) {
    let (mut out, mut lse) = (
        vec![f32::NAN; d.b * d.t * d.nh * d.hd],
        vec![f32::NAN; d.b * d.t * d.nh],
    );
    ops::attention_fwd(&mut out, &mut lse, q, k, v, doc, d);
    (out, lse)
}

#[allow(clippy::too_many_arguments)]
fn attn_bwd(
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    doc: Option<&[i32]>,
    d: AttnDims,
) -> Vec<Vec<f32>> {
    overwritten("attention_bwd", &[q.len(), k.len(), v.len()], |b| {
        let [dq, dk, dv] = b else { unreachable!() };
        ops::attention_bwd(dq, dk, dv, dout, q, k, v, out, lse, doc, d)
    })
}

/// Causal softmax attention in f64; query head h reads KV head h / (nh / nkv), as HF's repeat_kv.
fn attn_naive(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    doc: Option<&[i32]>,
    d: AttnDims,
) -> (Vec<f64>, Vec<f64>) {
    let (t, nh, nkv, hd) = (d.t, d.nh, d.nkv, d.hd);
    let scale = 1.0 / (hd as f64).sqrt();
    let (mut out, mut lse) = (vec![0f64; d.b * t * nh * hd], vec![0f64; d.b * t * nh]);
    for i in 0..d.b * t {
        let seq0 = i / t * t;
        for h in 0..nh {
            let g = h / (nh / nkv);
            let keys: Vec<usize> = (seq0..=i)
                .filter(|&j| doc.is_none_or(|dd| dd[i] == dd[j]))
                .collect();
            let s: Vec<f64> = keys
                .iter()
                .map(|&j| {
                    scale
                        * (0..hd)
                            .map(|c| {
                                q[(i * nh + h) * hd + c] as f64 * k[(j * nkv + g) * hd + c] as f64
                            })
                            .sum::<f64>()
                })
                .collect();
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
            lse[i * nh + h] = m + z.ln();
            for (&j, sj) in keys.iter().zip(&s) {
                let p = (sj - m).exp() / z;
                for c in 0..hd {
                    out[(i * nh + h) * hd + c] += p * v[(j * nkv + g) * hd + c] as f64;
                }
            }
        }
    }
    (out, lse)
}

fn attention_case(name: &str, d: AttnDims, doc: Option<&[i32]>, seed: u64) {
    let mut r = rng(seed);
    let (nq, nk) = (d.b * d.t * d.nh * d.hd, d.b * d.t * d.nkv * d.hd);
    let (q, k, v) = (
        randv(&mut r, nq, 1.5),
        randv(&mut r, nk, 1.5),
        randv(&mut r, nk, 1.0),
    );
    let ry = randv(&mut r, nq, 1.0);
    let (out, lse) = attn_fwd(&q, &k, &v, doc, d);
    let (want_out, want_lse) = attn_naive(&q, &k, &v, doc, d);
    assert_close(&format!("{name} fwd out"), &out, &want_out, 1e-5, 1e-6);
    assert_close(&format!("{name} fwd lse"), &lse, &want_lse, 1e-5, 1e-6);

    let g = attn_bwd(&ry, &q, &k, &v, &out, &lse, doc, d);
    gradcheck(
        &format!("{name} dq"),
        &q,
        |q| dot(&attn_fwd(q, &k, &v, doc, d).0, &ry),
        &g[0],
    );
    gradcheck(
        &format!("{name} dk"),
        &k,
        |k| dot(&attn_fwd(&q, k, &v, doc, d).0, &ry),
        &g[1],
    );
    gradcheck(
        &format!("{name} dv"),
        &v,
        |v| dot(&attn_fwd(&q, &k, v, doc, d).0, &ry),
        &g[2],
    );
}

#[test]
fn attention_gqa() {
    let d = AttnDims {
        b: 2,
        t: 7,
        nh: 3,
        nkv: 1,
        hd: 6,
    };
    attention_case("attn nh3/nkv1", d, None, 6);
}

/// Two documents in each row of the batch.
const DOC: [i32; 14] = [0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1];

#[test]
fn attention_doc_mask() {
    let d = AttnDims {
        b: 2,
        t: 7,
        nh: 4,
        nkv: 2,
        hd: 5,
    };
    attention_case("attn nh4/nkv2 doc", d, Some(&DOC), 7);
}

/// The doc-masked attention of a packed row equals attention over each document on its own,
/// forward and backward; a mask where every token shares a document equals no mask.
#[test]
fn attention_doc_mask_equals_separate_documents() {
    let d = AttnDims {
        b: 2,
        t: 7,
        nh: 4,
        nkv: 2,
        hd: 5,
    };
    let (qw, kw) = (d.nh * d.hd, d.nkv * d.hd);
    let mut r = rng(8);
    let (q, k, v) = (
        randv(&mut r, 14 * qw, 1.5),
        randv(&mut r, 14 * kw, 1.5),
        randv(&mut r, 14 * kw, 1.0),
    );
    let dout = randv(&mut r, 14 * qw, 1.0);
    let (out, lse) = attn_fwd(&q, &k, &v, Some(&DOC), d);
    let g = attn_bwd(&dout, &q, &k, &v, &out, &lse, Some(&DOC), d);

    // Runs of equal document id within each row: (first global row, length).
    let mut segs = vec![];
    for bi in 0..d.b {
        let mut s = bi * d.t;
        for run in DOC[bi * d.t..(bi + 1) * d.t].chunk_by(|a, b| a == b) {
            segs.push((s, run.len()));
            s += run.len();
        }
    }
    assert_eq!(segs, [(0, 3), (3, 4), (7, 5), (12, 2)]);
    for (s, len) in segs {
        let sd = AttnDims { b: 1, t: len, ..d };
        let rows = |x: &[f32], w: usize| x[s * w..(s + len) * w].to_vec();
        let (sq, sk, sv, sdo) = (rows(&q, qw), rows(&k, kw), rows(&v, kw), rows(&dout, qw));
        let (so, sl) = attn_fwd(&sq, &sk, &sv, None, sd);
        let sg = attn_bwd(&sdo, &sq, &sk, &sv, &so, &sl, None, sd);
        let tag = format!("doc rows {s}..{}", s + len);
        assert_close(&format!("{tag} out"), &rows(&out, qw), &so, 1e-5, 1e-6);
        assert_close(&format!("{tag} lse"), &rows(&lse, d.nh), &sl, 1e-5, 1e-6);
        assert_close(&format!("{tag} dq"), &rows(&g[0], qw), &sg[0], 1e-5, 1e-6);
        assert_close(&format!("{tag} dk"), &rows(&g[1], kw), &sg[1], 1e-5, 1e-6);
        assert_close(&format!("{tag} dv"), &rows(&g[2], kw), &sg[2], 1e-5, 1e-6);
    }

    // Sanity: the packed output really differs from unmasked attention (the mask does something).
    let (plain, _) = attn_fwd(&q, &k, &v, None, d);
    let diff = plain
        .iter()
        .zip(&out)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff > 1e-2, "doc mask had no effect ({diff})");
    let one_doc = [3i32; 14];
    let (same, same_lse) = attn_fwd(&q, &k, &v, Some(&one_doc), d);
    assert_close("single-document mask = no mask", &same, &plain, 0.0, 0.0);
    assert_close(
        "single-document mask = no mask (lse)",
        &same_lse,
        &attn_fwd(&q, &k, &v, None, d).1,
        0.0,
        0.0,
    );
}

// ------------------------------------------------------------------------------------------------

#[test]
fn swiglu() {
    let n = 11;
    let mut r = rng(9);
    let (gate, up, ry) = (
        randv(&mut r, n, 4.0),
        randv(&mut r, n, 2.0),
        randv(&mut r, n, 1.0),
    );
    let fwd = |gate: &[f32], up: &[f32]| {
        let mut y = vec![f32::NAN; n];
        ops::swiglu_fwd(&mut y, gate, up);
        y
    };
    let want: Vec<f64> = gate
        .iter()
        .zip(&up)
        .map(|(&g, &u)| g as f64 / (1.0 + (-g as f64).exp()) * u as f64)
        .collect();
    assert_close("swiglu_fwd", &fwd(&gate, &up), &want, 1e-6, 1e-7);
    let g = overwritten("swiglu_bwd", &[n, n], |b| {
        let [dg, du] = b else { unreachable!() };
        ops::swiglu_bwd(dg, du, &ry, &gate, &up)
    });
    gradcheck("swiglu dgate", &gate, |x| dot(&fwd(x, &up), &ry), &g[0]);
    gradcheck("swiglu dup", &up, |x| dot(&fwd(&gate, x), &ry), &g[1]);
}

#[test]
fn cross_entropy() {
    let v = 7;
    let targets = [3, -100, 0, 6, 2];
    let n = targets.len();
    let scale = 1.0 / 4.0; // 1 / counted targets
    let mut r = rng(10);
    let logits = randv(&mut r, n * v, 3.0);
    let fwd = |x: &[f32]| {
        let mut l = vec![f32::NAN; n];
        ops::cross_entropy_fwd(&mut l, x, &targets, v);
        l
    };
    let bwd = |x: &[f32]| {
        let mut d = x.to_vec();
        ops::cross_entropy_bwd(&mut d, &targets, v, scale);
        d
    };
    let want: Vec<f64> = logits
        .chunks(v)
        .zip(&targets)
        .map(|(row, &tg)| {
            if tg < 0 {
                return 0.0;
            }
            row.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln() - row[tg as usize] as f64
        })
        .collect();
    let losses = fwd(&logits);
    assert_close("cross_entropy_fwd", &losses, &want, 1e-6, 1e-6);
    assert_eq!(losses[1], 0.0, "ignored target must give loss 0");

    let dl = bwd(&logits);
    assert!(
        dl[v..2 * v].iter().all(|&x| x == 0.0),
        "ignored row must have zero gradient"
    );
    gradcheck(
        "cross_entropy dlogits",
        &logits,
        |x| scale as f64 * fwd(x).iter().map(|&l| l as f64).sum::<f64>(),
        &dl,
    );

    // Numerically stable: shifting every logit by a large constant changes nothing.
    let shifted: Vec<f32> = logits.iter().map(|x| x + 80.0).collect();
    assert_close(
        "cross_entropy_fwd shift-invariant",
        &fwd(&shifted),
        &losses,
        0.0,
        1e-4,
    );
    assert_close(
        "cross_entropy_bwd shift-invariant",
        &bwd(&shifted),
        &dl,
        0.0,
        1e-5,
    );
}

#[test]
fn scalar_head() {
    let (n, d) = (6, 5);
    let rows = [0, 3, 3, 5];
    let m = rows.len();
    let mut r = rng(11);
    let (h, w, ry) = (
        randv(&mut r, n * d, 1.0),
        randv(&mut r, d, 1.0),
        randv(&mut r, m, 1.0),
    );
    let fwd = |h: &[f32], w: &[f32]| {
        let mut y = vec![f32::NAN; m];
        ops::scalar_head_fwd(&mut y, h, w, &rows, d);
        y
    };
    let want: Vec<f64> = rows
        .iter()
        .map(|&rr| dot(&h[rr as usize * d..][..d], &w))
        .collect();
    assert_close("scalar_head_fwd", &fwd(&h, &w), &want, 1e-6, 1e-7);
    let g = accumulated("scalar_head_bwd", &mut r, &[n * d, d], |b| {
        let [dh, dw] = b else { unreachable!() };
        ops::scalar_head_bwd(dh, dw, &ry, &h, &w, &rows, d)
    });
    gradcheck("scalar_head dh", &h, |x| dot(&fwd(x, &w), &ry), &g[0]);
    gradcheck("scalar_head dw", &w, |x| dot(&fwd(&h, x), &ry), &g[1]);
}

// ------------------------------------------------------------------------------------------------

/// torch.optim.AdamW's single-tensor step, in f64.
fn adamw_reference(p: &mut [f64], m: &mut [f64], v: &mut [f64], g: &[f32], s: AdamWStep) {
    let (lr, b1, b2, eps, wd) = (
        s.lr as f64,
        s.beta1 as f64,
        s.beta2 as f64,
        s.eps as f64,
        s.weight_decay as f64,
    );
    let bc1 = 1.0 - b1.powi(s.step as i32);
    let bc2 = 1.0 - b2.powi(s.step as i32);
    for i in 0..p.len() {
        let g = g[i] as f64 * s.grad_scale as f64;
        p[i] *= 1.0 - lr * wd;
        m[i] = b1 * m[i] + (1.0 - b1) * g;
        v[i] = b2 * v[i] + (1.0 - b2) * g * g;
        let denom = v[i].sqrt() / bc2.sqrt() + eps;
        p[i] -= lr / bc1 * m[i] / denom;
    }
}

#[test]
fn adamw_matches_torch() {
    let n = 37;
    // The second set has gradients of the order of eps, so eps's placement matters.
    for (set, (lr, beta1, beta2, eps, weight_decay, grad_scale, glim)) in [
        (0.1, 0.9, 0.95, 1e-8, 0.5, 0.5, 1.0),
        (0.05, 0.8, 0.99, 1e-3, 0.2, 0.25, 4e-3),
    ]
    .into_iter()
    .enumerate()
    {
        let mut r = rng(12 + set as u64);
        let p0 = randv(&mut r, n, 1.0);
        let (mut p, mut m, mut v) = (p0.clone(), vec![0f32; n], vec![0f32; n]);
        let mut pr: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
        let (mut mr, mut vr) = (vec![0f64; n], vec![0f64; n]);
        for step in 1..=3 {
            let g = randv(&mut r, n, glim);
            let s = AdamWStep {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
                step,
                grad_scale,
            };
            ops::adamw(&mut p, &mut m, &mut v, &g, s);
            adamw_reference(&mut pr, &mut mr, &mut vr, &g, s);
            assert_close(
                &format!("adamw set {set} step {step} m"),
                &m,
                &mr,
                1e-5,
                0.0,
            );
            assert_close(
                &format!("adamw set {set} step {step} v"),
                &v,
                &vr,
                1e-5,
                0.0,
            );
            // Compare the displacement from the start, so the tolerance is relative to the updates.
            let dp: Vec<f32> = p.iter().zip(&p0).map(|(a, b)| a - b).collect();
            let dpr: Vec<f64> = pr.iter().zip(&p0).map(|(a, &b)| a - b as f64).collect();
            assert_close(
                &format!("adamw set {set} step {step} p - p0"),
                &dp,
                &dpr,
                1e-4,
                0.0,
            );
        }
    }
}

#[test]
fn reductions() {
    let mut r = rng(14);
    // Several of the reductions' 2^16-element chunks.
    let x = randv(&mut r, 3 * (1 << 16) + 17, 2.0);
    let want_sq: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
    let want: f64 = x.iter().map(|&v| v as f64).sum();
    assert_close(
        "sum_squares",
        &[ops::sum_squares(&x)],
        &[want_sq],
        1e-12,
        0.0,
    );
    assert_close("sum", &[ops::sum(&x)], &[want], 1e-12, 1e-9);
    // Accumulates in f64: f32 would lose the 1 next to 1e8.
    assert_eq!(ops::sum(&[1e8, 1.0, -1e8]), 1.0);
    assert_eq!(ops::sum_squares(&[1e4, 1.0, 3.0]), 1e8 + 10.0);
    assert_eq!(ops::sum(&[]), 0.0);
    assert_eq!(ops::sum_squares(&[]), 0.0);
}
