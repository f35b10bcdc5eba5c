//! The CPU reference ops: f32, multi-threaded with rayon, one forward/backward pair per op.
//!
//! These are the maths every CUDA kernel is tested against, so they favour clarity over speed,
//! except for matmuls (a real GEMM) and the obvious row parallelism. Argument order follows
//! llm.c: outputs, inputs, weights, then dimensions. Backward ops that produce weight gradients
//! accumulate (`+=`) so gradient accumulation over micro-batches needs no extra buffer.

use rayon::prelude::*;

/// Rows per rayon task for elementwise and row-wise work: large enough to amortise scheduling.
const ROWS_PER_TASK: usize = 16;

// ------------------------------------------------------------------------------------------------
// Matmul: y = x · Wᵀ with Hugging Face's [out, in] weight layout.

#[allow(clippy::too_many_arguments)]
fn gemm_raw(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    assert!(dst.len() >= (m - 1) * dst_rs + n, "gemm: dst too small");
    assert!(
        lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs,
        "gemm: lhs too small"
    );
    assert!(
        rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs,
        "gemm: rhs too small"
    );
    let par = if m * n * k >= 1 << 15 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every strided access of the three matrices inside their
    // slices; dst is exclusively borrowed and cannot alias lhs or rhs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// out[n, o] = x[n, i] · w[o, i]ᵀ
pub fn matmul_fwd(out: &mut [f32], x: &[f32], w: &[f32], n: usize, i: usize, o: usize) {
    gemm_raw(n, o, i, out, o, false, x, (i, 1), w, (1, i));
}

/// dx[n, i] (+)= dy[n, o] · w[o, i]
#[allow(clippy::too_many_arguments)]
pub fn matmul_bwd_data(
    dx: &mut [f32],
    dy: &[f32],
    w: &[f32],
    n: usize,
    i: usize,
    o: usize,
    accumulate: bool,
) {
    gemm_raw(n, i, o, dx, i, accumulate, dy, (o, 1), w, (i, 1));
}

/// dw[o, i] += dy[n, o]ᵀ · x[n, i]
pub fn matmul_bwd_weight(dw: &mut [f32], dy: &[f32], x: &[f32], n: usize, i: usize, o: usize) {
    gemm_raw(o, i, n, dw, i, true, dy, (1, o), x, (i, 1));
}

// ------------------------------------------------------------------------------------------------
// Embedding

/// out[n, h] = wte[ids[n], h]. Ids are validated by the caller (the model checks the batch).
pub fn embedding_fwd(out: &mut [f32], ids: &[i32], wte: &[f32], h: usize) {
    out.par_chunks_mut(h)
        .zip(ids.par_iter())
        .for_each(|(row, &id)| {
            let id = id as usize;
            row.copy_from_slice(&wte[id * h..(id + 1) * h]);
        });
}

/// dwte[ids[n], h] += dout[n, h]. Sequential over tokens so repeated ids sum deterministically.
pub fn embedding_bwd(dwte: &mut [f32], dout: &[f32], ids: &[i32], h: usize) {
    for (row, &id) in dout.chunks(h).zip(ids) {
        let d = &mut dwte[id as usize * h..(id as usize + 1) * h];
        for (a, b) in d.iter_mut().zip(row) {
            *a += *b;
        }
    }
}

// ------------------------------------------------------------------------------------------------
// RMSNorm: out = w ⊙ x · rstd, rstd = 1/sqrt(mean(x²) + eps), per row of width h.

/// out[n, h], rstd[n] from x[n, h], w[h].
pub fn rmsnorm_fwd(out: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], h: usize, eps: f32) {
    out.par_chunks_mut(h)
        .zip(rstd.par_iter_mut())
        .zip(x.par_chunks(h))
        .for_each(|((o, r), xr)| {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / h as f32;
            let rs = 1.0 / (ms + eps).sqrt();
            *r = rs;
            for j in 0..h {
                o[j] = w[j] * (xr[j] * rs);
            }
        });
}

/// dx[n, h] += d/dx, dw[h] += d/dw, from dout[n, h], x[n, h], w[h], rstd[n].
/// dw is reduced per fixed block of rows then summed in order, so it is deterministic.
pub fn rmsnorm_bwd(
    dx: &mut [f32],
    dw: &mut [f32],
    dout: &[f32],
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    h: usize,
) {
    let chunk = ROWS_PER_TASK * h;
    let partial: Vec<Vec<f32>> = dx
        .par_chunks_mut(chunk)
        .zip(dout.par_chunks(chunk))
        .zip(x.par_chunks(chunk))
        .zip(rstd.par_chunks(ROWS_PER_TASK))
        .map(|(((dxc, dc), xc), rc)| {
            let mut dwp = vec![0f32; h];
            for (r, &rs) in rc.iter().enumerate() {
                let (dxr, dr, xr) = (
                    &mut dxc[r * h..(r + 1) * h],
                    &dc[r * h..(r + 1) * h],
                    &xc[r * h..(r + 1) * h],
                );
                let mut dot = 0f32;
                for j in 0..h {
                    let xhat = xr[j] * rs;
                    dwp[j] += dr[j] * xhat;
                    dot += dr[j] * w[j] * xhat;
                }
                let mean = dot / h as f32;
                for j in 0..h {
                    let xhat = xr[j] * rs;
                    dxr[j] += rs * (dr[j] * w[j] - xhat * mean);
                }
            }
            dwp
        })
        .collect();
    for p in partial {
        for (a, b) in dw.iter_mut().zip(p) {
            *a += b;
        }
    }
}

// ------------------------------------------------------------------------------------------------
// RoPE, Hugging Face's rotate_half layout: within each head the pairs are (i, i + hd/2).

/// The inverse frequencies, computed as transformers does (f32 after the power).
pub fn rope_inv_freq(hd: usize, theta: f32) -> Vec<f32> {
    (0..hd / 2)
        .map(|i| (1.0 / (theta as f64).powf((2 * i) as f64 / hd as f64)) as f32)
        .collect()
}

fn rope_rotate(x: &mut [f32], pos: &[i32], heads: usize, hd: usize, theta: f32, sign: f32) {
    let inv = rope_inv_freq(hd, theta);
    let half = hd / 2;
    x.par_chunks_mut(heads * hd)
        .zip(pos.par_iter())
        .for_each(|(row, &p)| {
            for i in 0..half {
                let ang = p as f32 * inv[i];
                let (s, c) = (ang.sin() * sign, ang.cos());
                for hh in 0..heads {
                    let base = hh * hd;
                    let (a, b) = (row[base + i], row[base + i + half]);
                    row[base + i] = a * c - b * s;
                    row[base + i + half] = b * c + a * s;
                }
            }
        });
}

/// x[n, heads, hd] rotated in place by the angle of pos[n].
pub fn rope_fwd(x: &mut [f32], pos: &[i32], heads: usize, hd: usize, theta: f32) {
    rope_rotate(x, pos, heads, hd, theta, 1.0);
}

/// dx[n, heads, hd] in place: the transpose of a rotation is the rotation by minus the angle.
pub fn rope_bwd(dx: &mut [f32], pos: &[i32], heads: usize, hd: usize, theta: f32) {
    rope_rotate(dx, pos, heads, hd, theta, -1.0);
}

// ------------------------------------------------------------------------------------------------
// Causal grouped-query attention.
//
// One task per (sequence, KV head): it owns the query heads sharing that KV head, so it is the
// only writer of their rows of out/lse/dq and of its dk/dv columns. Scores go through the GEMM
// (a t×t tile per head), with the causal and document masks applied to the tile.

/// Attention dimensions. q/out are [b, t, nh, hd]; k/v are [b, t, nkv, hd]; lse is [b, t, nh].
#[derive(Clone, Copy, Debug)]
pub struct AttnDims {
    pub b: usize,
    pub t: usize,
    pub nh: usize,
    pub nkv: usize,
    pub hd: usize,
}

impl AttnDims {
    fn scale(&self) -> f32 {
        1.0 / (self.hd as f32).sqrt()
    }
}

/// A raw pointer that may cross threads: each task writes a disjoint set of strided rows.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: used only to hand disjoint (sequence, head) regions of one buffer to different tasks.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// A method (not field access) so closures capture the whole Send wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// dst[m, n] (strided rows) = alpha·dst + beta·lhs·rhs, serial (the caller is one parallel task).
///
/// # Safety
/// Every strided element of dst, lhs and rhs must be in bounds of live allocations, and no other
/// thread may access dst's elements during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    beta: f32,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0,
        beta,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// Sets masked entries of the t×t tile (j > i, or another document) to -inf.
fn mask_scores(s: &mut [f32], t: usize, doc: Option<&[i32]>) {
    for i in 0..t {
        let row = &mut s[i * t..(i + 1) * t];
        row[i + 1..].fill(f32::NEG_INFINITY);
        if let Some(d) = doc {
            for j in 0..=i {
                if d[j] != d[i] {
                    row[j] = f32::NEG_INFINITY;
                }
            }
        }
    }
}

/// out, lse from q, k, v; `doc` (per-token document id, [b, t]) restricts attention to tokens of
/// the same document, so packed sequences do not see each other.
pub fn attention_fwd(
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    doc: Option<&[i32]>,
    d: AttnDims,
) {
    let (b, t, nh, nkv, hd) = (d.b, d.t, d.nh, d.nkv, d.hd);
    assert!(out.len() == b * t * nh * hd && q.len() == out.len() && lse.len() == b * t * nh);
    assert!(k.len() == b * t * nkv * hd && v.len() == k.len());
    let group = nh / nkv;
    let scale = d.scale();
    let (outp, lsep) = (SendPtr(out.as_mut_ptr()), SendPtr(lse.as_mut_ptr()));
    (0..b * nkv).into_par_iter().for_each_init(
        || vec![0f32; t * t],
        |s, task| {
            let (bi, g) = (task / nkv, task % nkv);
            let docb = doc.map(|dd| &dd[bi * t..(bi + 1) * t]);
            let kb = &k[bi * t * nkv * hd + g * hd..];
            let vb = &v[bi * t * nkv * hd + g * hd..];
            for h in g * group..(g + 1) * group {
                let qb = &q[bi * t * nh * hd + h * hd..];
                // SAFETY: q/k rows are in bounds (asserted lengths); s is this task's own tile.
                unsafe {
                    gemm_strided(
                        t,
                        t,
                        hd,
                        s.as_mut_ptr(),
                        t,
                        false,
                        qb.as_ptr(),
                        (nh * hd, 1),
                        kb.as_ptr(),
                        (1, nkv * hd),
                        scale,
                    );
                }
                mask_scores(s, t, docb);
                for i in 0..t {
                    let row = &mut s[i * t..(i + 1) * t];
                    let m = row[..=i].iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0f32;
                    for x in row[..=i].iter_mut() {
                        *x = (*x - m).exp();
                        sum += *x;
                    }
                    let inv = 1.0 / sum;
                    row[..=i].iter_mut().for_each(|x| *x *= inv);
                    row[i + 1..].fill(0.0);
                    // SAFETY: lse[bi, i, h] belongs to this task's (sequence, head).
                    unsafe { *lsep.get().add((bi * t + i) * nh + h) = m + sum.ln() };
                }
                // SAFETY: out[bi, :, h, :] is written by this task only; v rows are in bounds.
                unsafe {
                    let o = outp.get().add(bi * t * nh * hd + h * hd);
                    gemm_strided(
                        t,
                        hd,
                        t,
                        o,
                        nh * hd,
                        false,
                        s.as_ptr(),
                        (t, 1),
                        vb.as_ptr(),
                        (nkv * hd, 1),
                        1.0,
                    );
                }
            }
        },
    );
}

/// dq, dk, dv (overwritten) from dout and the forward's q, k, v, out, lse; dk and dv sum over
/// the query heads sharing a KV head.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    doc: Option<&[i32]>,
    d: AttnDims,
) {
    let (b, t, nh, nkv, hd) = (d.b, d.t, d.nh, d.nkv, d.hd);
    assert!(
        dq.len() == b * t * nh * hd
            && q.len() == dq.len()
            && dout.len() == dq.len()
            && out.len() == dq.len()
    );
    assert!(
        dk.len() == b * t * nkv * hd
            && dv.len() == dk.len()
            && k.len() == dk.len()
            && v.len() == dk.len()
    );
    assert!(lse.len() == b * t * nh);
    let group = nh / nkv;
    let scale = d.scale();
    let (dqp, dkp, dvp) = (
        SendPtr(dq.as_mut_ptr()),
        SendPtr(dk.as_mut_ptr()),
        SendPtr(dv.as_mut_ptr()),
    );
    (0..b * nkv).into_par_iter().for_each_init(
        || (vec![0f32; t * t], vec![0f32; t * t]),
        |(p, dp), task| {
            let (bi, g) = (task / nkv, task % nkv);
            let docb = doc.map(|dd| &dd[bi * t..(bi + 1) * t]);
            let kb = &k[bi * t * nkv * hd + g * hd..];
            let vb = &v[bi * t * nkv * hd + g * hd..];
            for (hi, h) in (g * group..(g + 1) * group).enumerate() {
                let off = bi * t * nh * hd + h * hd;
                let (qb, dob, ob) = (&q[off..], &dout[off..], &out[off..]);
                // SAFETY (all blocks below): inputs are in bounds by the asserted lengths; p/dp
                // are this task's tiles; dq[bi, :, h, :], dk[bi, :, g, :], dv[bi, :, g, :] are
                // written by this task only.
                unsafe {
                    gemm_strided(
                        t,
                        t,
                        hd,
                        p.as_mut_ptr(),
                        t,
                        false,
                        qb.as_ptr(),
                        (nh * hd, 1),
                        kb.as_ptr(),
                        (1, nkv * hd),
                        scale,
                    );
                }
                mask_scores(p, t, docb);
                for i in 0..t {
                    let l = lse[(bi * t + i) * nh + h];
                    let row = &mut p[i * t..(i + 1) * t];
                    row[..=i].iter_mut().for_each(|x| *x = (*x - l).exp());
                    row[i + 1..].fill(0.0);
                }
                // dV_g (+)= Pᵀ dO_h
                unsafe {
                    let dvg = dvp.get().add(bi * t * nkv * hd + g * hd);
                    gemm_strided(
                        t,
                        hd,
                        t,
                        dvg,
                        nkv * hd,
                        hi > 0,
                        p.as_ptr(),
                        (1, t),
                        dob.as_ptr(),
                        (nh * hd, 1),
                        1.0,
                    );
                }
                // dP = dO_h V_gᵀ
                unsafe {
                    gemm_strided(
                        t,
                        t,
                        hd,
                        dp.as_mut_ptr(),
                        t,
                        false,
                        dob.as_ptr(),
                        (nh * hd, 1),
                        vb.as_ptr(),
                        (1, nkv * hd),
                        1.0,
                    );
                }
                // dS = P ∘ (dP − D), D_i = rowsum(dO_i ∘ O_i); stored in dp.
                for i in 0..t {
                    let (doi, oi) = (
                        &dob[i * nh * hd..i * nh * hd + hd],
                        &ob[i * nh * hd..i * nh * hd + hd],
                    );
                    let di: f32 = doi.iter().zip(oi).map(|(a, b)| a * b).sum();
                    let (pr, dr) = (&p[i * t..(i + 1) * t], &mut dp[i * t..(i + 1) * t]);
                    for j in 0..t {
                        dr[j] = pr[j] * (dr[j] - di);
                    }
                }
                // dQ_h = scale · dS K_g ; dK_g (+)= scale · dSᵀ Q_h
                unsafe {
                    let dqh = dqp.get().add(off);
                    gemm_strided(
                        t,
                        hd,
                        t,
                        dqh,
                        nh * hd,
                        false,
                        dp.as_ptr(),
                        (t, 1),
                        kb.as_ptr(),
                        (nkv * hd, 1),
                        scale,
                    );
                    let dkg = dkp.get().add(bi * t * nkv * hd + g * hd);
                    gemm_strided(
                        t,
                        hd,
                        t,
                        dkg,
                        nkv * hd,
                        hi > 0,
                        dp.as_ptr(),
                        (1, t),
                        qb.as_ptr(),
                        (nh * hd, 1),
                        scale,
                    );
                }
            }
        },
    );
}

/// Dimensions of attention against a KV cache: q/out [b, tq, nh, hd]; the caches are
/// [b_cache, tmax, nkv, hd] with sequence s of the batch at cache slot s.
#[derive(Clone, Copy, Debug)]
pub struct CacheDims {
    pub b: usize,
    pub tq: usize,
    pub tmax: usize,
    pub nh: usize,
    pub nkv: usize,
    pub hd: usize,
}

/// Inference attention: query row r (sequence r / tq, absolute position qpos[r]) attends cache
/// positions 0..=qpos[r] of its sequence. Forward only; the cache already holds this step's keys.
pub fn attention_cached(
    out: &mut [f32],
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
    qpos: &[i32],
    d: CacheDims,
) {
    let (tq, tmax, nh, nkv, hd) = (d.tq, d.tmax, d.nh, d.nkv, d.hd);
    let group = nh / nkv;
    let scale = 1.0 / (hd as f32).sqrt();
    out.par_chunks_mut(nh * hd).enumerate().for_each_init(
        || vec![0f32; tmax],
        |s, (r, o)| {
            let (seq, p) = (r / tq, qpos[r] as usize);
            let base = seq * tmax * nkv * hd;
            for h in 0..nh {
                let g = h / group;
                let qv = &q[r * nh * hd + h * hd..][..hd];
                let mut m = f32::NEG_INFINITY;
                for (j, sj) in s.iter_mut().enumerate().take(p + 1) {
                    let kv = &kc[base + j * nkv * hd + g * hd..][..hd];
                    *sj = qv.iter().zip(kv).map(|(a, b)| a * b).sum::<f32>() * scale;
                    m = m.max(*sj);
                }
                let mut sum = 0f32;
                for sj in s.iter_mut().take(p + 1) {
                    *sj = (*sj - m).exp();
                    sum += *sj;
                }
                let oh = &mut o[h * hd..(h + 1) * hd];
                oh.fill(0.0);
                for (j, &sj) in s.iter().enumerate().take(p + 1) {
                    let w = sj / sum;
                    let vv = &vc[base + j * nkv * hd + g * hd..][..hd];
                    for (a, b) in oh.iter_mut().zip(vv) {
                        *a += w * b;
                    }
                }
            }
        },
    );
}

/// dst[rows[i], :] = src[i, :] for rows of width w (writing new keys/values into a cache).
pub fn scatter_rows(dst: &mut [f32], src: &[f32], rows: &[i32], w: usize) {
    for (i, &r) in rows.iter().enumerate() {
        dst[r as usize * w..(r as usize + 1) * w].copy_from_slice(&src[i * w..(i + 1) * w]);
    }
}

/// dst[i, :] = src[rows[i], :] for rows of width w.
pub fn gather_rows(dst: &mut [f32], src: &[f32], rows: &[i32], w: usize) {
    dst.par_chunks_mut(w)
        .zip(rows.par_iter())
        .for_each(|(d, &r)| {
            d.copy_from_slice(&src[r as usize * w..(r as usize + 1) * w]);
        });
}

// ------------------------------------------------------------------------------------------------
// SwiGLU: out = silu(gate) ⊙ up

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// out[n] = silu(gate[n]) * up[n]
pub fn swiglu_fwd(out: &mut [f32], gate: &[f32], up: &[f32]) {
    out.par_iter_mut()
        .zip(gate.par_iter().zip(up.par_iter()))
        .for_each(|(o, (&g, &u))| *o = g * sigmoid(g) * u);
}

/// dgate[n], dup[n] (overwritten) from dout[n], gate[n], up[n].
pub fn swiglu_bwd(dgate: &mut [f32], dup: &mut [f32], dout: &[f32], gate: &[f32], up: &[f32]) {
    dgate
        .par_iter_mut()
        .zip(dup.par_iter_mut())
        .zip(dout.par_iter().zip(gate.par_iter().zip(up.par_iter())))
        .for_each(|((dg, du), (&d, (&g, &u)))| {
            let s = sigmoid(g);
            *du = d * g * s;
            *dg = d * u * s * (1.0 + g * (1.0 - s));
        });
}

// ------------------------------------------------------------------------------------------------
// Cross-entropy over the vocabulary, ignore index: any negative target.

/// losses[n] = logsumexp(logits[n, :]) - logits[n, target[n]] (0 where target < 0).
pub fn cross_entropy_fwd(losses: &mut [f32], logits: &[f32], targets: &[i32], v: usize) {
    losses
        .par_iter_mut()
        .zip(logits.par_chunks(v).zip(targets.par_iter()))
        .for_each(|(l, (row, &tg))| {
            if tg < 0 {
                *l = 0.0;
                return;
            }
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let s: f32 = row.iter().map(|x| (x - m).exp()).sum();
            *l = m + s.ln() - row[tg as usize];
        });
}

/// dlogits[n, v] in place (holds the logits on entry): (softmax - onehot(target)) * scale,
/// zero on ignored rows. `scale` is dL/dloss_n, e.g. 1/(number of counted targets).
pub fn cross_entropy_bwd(dlogits: &mut [f32], targets: &[i32], v: usize, scale: f32) {
    dlogits
        .par_chunks_mut(v)
        .zip(targets.par_iter())
        .for_each(|(row, &tg)| {
            if tg < 0 {
                row.fill(0.0);
                return;
            }
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut s = 0f32;
            for x in row.iter_mut() {
                *x = (*x - m).exp();
                s += *x;
            }
            let inv = scale / s;
            for x in row.iter_mut() {
                *x *= inv;
            }
            row[tg as usize] -= scale;
        });
}

// ------------------------------------------------------------------------------------------------
// Scalar head (reward / value): out[m] = w · h[rows[m], :]

/// out[m] from h[n, d], w[d] at the given rows.
pub fn scalar_head_fwd(out: &mut [f32], h: &[f32], w: &[f32], rows: &[i32], d: usize) {
    for (o, &r) in out.iter_mut().zip(rows) {
        let hr = &h[r as usize * d..(r as usize + 1) * d];
        *o = hr.iter().zip(w).map(|(a, b)| a * b).sum();
    }
}

/// dh[rows[m], :] += dout[m] * w, dw += Σ dout[m] * h[rows[m], :].
pub fn scalar_head_bwd(
    dh: &mut [f32],
    dw: &mut [f32],
    dout: &[f32],
    h: &[f32],
    w: &[f32],
    rows: &[i32],
    d: usize,
) {
    for (&g, &r) in dout.iter().zip(rows) {
        let r = r as usize;
        for j in 0..d {
            dh[r * d + j] += g * w[j];
            dw[j] += g * h[r * d + j];
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Optimizer and reductions

/// One AdamW step's hyper-parameters, as torch.optim.AdamW applies them.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step number, for bias correction.
    pub step: u64,
    /// Multiplies the gradient first (the clip scale from the global norm).
    pub grad_scale: f32,
}

/// Decoupled weight decay, then bias-corrected Adam moments, matching torch.optim.AdamW.
pub fn adamw(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], s: AdamWStep) {
    let bc1 = 1.0 - (s.beta1 as f64).powi(s.step as i32);
    let bc2 = 1.0 - (s.beta2 as f64).powi(s.step as i32);
    let step_size = (s.lr as f64 / bc1) as f32;
    let bc2_sqrt = bc2.sqrt() as f32;
    let decay = 1.0 - s.lr * s.weight_decay;
    p.par_iter_mut()
        .zip(m.par_iter_mut().zip(v.par_iter_mut()))
        .zip(g.par_iter())
        .for_each(|((p, (m, v)), &g)| {
            let g = g * s.grad_scale;
            *p *= decay;
            *m = s.beta1 * *m + (1.0 - s.beta1) * g;
            *v = s.beta2 * *v + (1.0 - s.beta2) * g * g;
            let denom = v.sqrt() / bc2_sqrt + s.eps;
            *p -= step_size * *m / denom;
        });
}

/// Σ x² in f64 over fixed chunks, so the result does not depend on the thread count.
pub fn sum_squares(x: &[f32]) -> f64 {
    x.par_chunks(1 << 16)
        .map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>())
        .collect::<Vec<_>>()
        .into_iter()
        .sum()
}

/// Σ x in f64 over fixed chunks.
pub fn sum(x: &[f32]) -> f64 {
    x.par_chunks(1 << 16)
        .map(|c| c.iter().map(|&v| v as f64).sum::<f64>())
        .collect::<Vec<_>>()
        .into_iter()
        .sum()
}

// ------------------------------------------------------------------------------------------------
// Per-token log-probabilities (policy gradients): logp_n = log softmax(logits[n])[target[n]].

/// out_logp[n] = log softmax(logits[n, :])[target[n]], out_entropy[n] = −Σ_v p log p of the row,
/// from logits[n, V] and targets[n]; both 0 where target < 0.
pub fn logprob_fwd(
    out_logp: &mut [f32],
    out_entropy: &mut [f32],
    logits: &[f32],
    targets: &[i32],
    v: usize,
) {
    out_logp
        .par_iter_mut()
        .zip(out_entropy.par_iter_mut())
        .zip(logits.par_chunks(v).zip(targets.par_iter()))
        .for_each(|((lp, ent), (row, &tg))| {
            if tg < 0 {
                *lp = 0.0;
                *ent = 0.0;
                return;
            }
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let (mut s, mut sx) = (0f32, 0f32);
            for &x in row {
                let e = (x - m).exp();
                s += e;
                sx += e * (x - m);
            }
            let lse = s.ln(); // relative to m
            *lp = row[tg as usize] - m - lse;
            // H = lse − E_p[x − m]
            *ent = lse - sx / s;
        });
}

/// dlogits[n, V] in place (holds the logits on entry): weights[n] · (onehot(target[n]) −
/// softmax(logits[n])), the gradient of Σ_n weights[n] · logp_n; zero rows where target < 0 or
/// the weight is 0.
pub fn logprob_bwd(dlogits: &mut [f32], targets: &[i32], weights: &[f32], v: usize) {
    dlogits
        .par_chunks_mut(v)
        .zip(targets.par_iter().zip(weights.par_iter()))
        .for_each(|(row, (&tg, &w))| {
            if tg < 0 || w == 0.0 {
                row.fill(0.0);
                return;
            }
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut s = 0f32;
            for x in row.iter_mut() {
                *x = (*x - m).exp();
                s += *x;
            }
            let inv = -w / s;
            for x in row.iter_mut() {
                *x *= inv;
            }
            row[tg as usize] += w;
        });
}
