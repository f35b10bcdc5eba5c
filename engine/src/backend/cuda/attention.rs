//! Attention on the CUDA backend: launches the kernels of `kernels-cu/attention.cu`.
//!
//! Two paths with the semantics of `ops::attention_fwd` / `attention_bwd` / `attention_cached`:
//! - fast (head dim 64 or 128): FlashAttention-2 style tensor-core kernels;
//! - naive (`LLAMA2_ATTN=naive`, any other head dim ≤ 256, or operands not 16-byte aligned):
//!   simple fp32 kernels, one CTA per (row, head), for cross-checking the fast path.
//!
//! The KV-cache kernel has one path (any head dim ≤ 256).

use std::sync::OnceLock;

use half::bf16;

use super::guards::len_is;

use super::{launch, Cuda, DMut, DRef};
use crate::backend::{AttnDims, CacheDims};
use crate::error::{Error, Result};

const MODULE: &str = "attention";
/// Largest head dim of the naive and KV-cache kernels (two dims per thread of 128 / 32 lanes × 8).
const MAX_HD: usize = 256;
/// Query rows per CTA and keys per tile of the fast forward; keys per CTA of the fast backward
/// (attention.cu `fwd::BM`, `fwd::BN`, `bwd::BN`).
const FWD_BM: usize = 64;
const FWD_BN: usize = 64;
const BWD_BN: usize = 128;

/// Dynamic shared memory of the fast forward; must equal `fwd::Smem<HD>::BYTES` in attention.cu
/// (static_asserted there with these numbers).
fn fwd_smem_bytes(hd: usize) -> u32 {
    let ld = hd + 8;
    // Q [BM][ld] + K, V [2][BN][ld] bf16 + key doc ids [2][BN] i32
    (FWD_BM * ld * 2 + 4 * FWD_BN * ld * 2 + 2 * FWD_BN * 4) as u32
}

/// Dynamic shared memory of the fast backward; must equal `bwd::Smem<HD>::BYTES`.
fn bwd_smem_bytes(hd: usize) -> u32 {
    let ld = hd + 8;
    let bm = if hd >= 128 { 32 } else { 64 };
    let lds = bm + 8;
    // K, V [128][ld] + Q, dO [2][bm][ld] bf16 + dSᵀ [128][lds] bf16 + lse, D, query doc [2][bm]
    // + key doc [128]
    (2 * BWD_BN * ld * 2 + 4 * bm * ld * 2 + BWD_BN * lds * 2 + 3 * 2 * bm * 4 + BWD_BN * 4) as u32
}

/// `LLAMA2_ATTN=naive` selects the naive kernels (read once per process).
pub(super) fn naive_forced() -> bool {
    static NAIVE: OnceLock<bool> = OnceLock::new();
    *NAIVE.get_or_init(|| {
        std::env::var("LLAMA2_ATTN")
            .map(|v| v.trim().eq_ignore_ascii_case("naive"))
            .unwrap_or(false)
    })
}

fn i64_of(x: usize) -> i64 {
    x as i64 // every dim is bounded by a slice length, far below i64::MAX
}

fn grid_u32(what: &str, n: usize, max: usize) -> Result<u32> {
    if n == 0 || n > max {
        return Err(Error::Shape(format!(
            "attention: grid dimension {what} = {n} outside 1..={max}"
        )));
    }
    Ok(n as u32)
}

/// Common checks of `AttnDims`: GQA grouping, head dim, sequence length within i32 (the kernels
/// index positions inside a sequence as i32; offsets are 64-bit).
fn check_attn_dims(d: &AttnDims) -> Result<()> {
    if d.nkv == 0 || d.nh == 0 || !d.nh.is_multiple_of(d.nkv) {
        return Err(Error::Shape(format!(
            "attention: nh = {} must be a positive multiple of nkv = {}",
            d.nh, d.nkv
        )));
    }
    if d.hd == 0 || d.hd > MAX_HD {
        return Err(Error::Shape(format!(
            "attention: head dim {} not supported (1..={MAX_HD})",
            d.hd
        )));
    }
    if d.t > i32::MAX as usize {
        return Err(Error::Shape(format!(
            "attention: sequence length {} exceeds i32",
            d.t
        )));
    }
    Ok(())
}

/// Whether the fast kernels apply: head dim 64/128, not forced naive, and every bf16 operand
/// 16-byte aligned (cp.async moves 16-byte chunks; rows are hd·2 bytes, a multiple of 16).
fn use_fast(hd: usize, ptrs: &[u64]) -> bool {
    !naive_forced() && (hd == 64 || hd == 128) && ptrs.iter().all(|p| p % 16 == 0)
}

/// Whether the fast kernel `name` may take `smem` bytes of dynamic shared memory (opting it in
/// where that is over the 48 KiB default). False, with a one-time warning, when the device
/// cannot give that much per block: the caller then takes the naive path.
fn fast_kernel(cx: &Cuda, name: &str, smem: u32) -> Result<bool> {
    if let Some(why) = cx.opt_in_smem(MODULE, name, smem)? {
        static WARNED: OnceLock<()> = OnceLock::new();
        WARNED.get_or_init(|| {
            eprintln!(
                "warning: attention: {name} needs {smem} bytes of shared memory per block \
                 ({why}); using the naive attention kernels"
            )
        });
        return Ok(false);
    }
    Ok(true)
}

/// out [b, t, nh, hd], lse [b, t, nh] from q [b, t, nh, hd], k, v [b, t, nkv, hd] and optional
/// per-token document ids doc [b, t] (see `ops::attention_fwd`).
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_fwd(
    cx: &Cuda,
    out: DMut<'_, bf16>,
    lse: DMut<'_, f32>,
    q: DRef<'_, bf16>,
    k: DRef<'_, bf16>,
    v: DRef<'_, bf16>,
    doc: Option<DRef<'_, i32>>,
    d: AttnDims,
) -> Result<()> {
    check_attn_dims(&d)?;
    let (b, t, nh, nkv, hd) = (d.b, d.t, d.nh, d.nkv, d.hd);
    len_is("attention", "out", out.len(), b * t * nh * hd)?;
    len_is("attention", "q", q.len(), b * t * nh * hd)?;
    len_is("attention", "lse", lse.len(), b * t * nh)?;
    len_is("attention", "k", k.len(), b * t * nkv * hd)?;
    len_is("attention", "v", v.len(), b * t * nkv * hd)?;
    if let Some(dc) = doc {
        len_is("attention", "doc", dc.len(), b * t)?;
    }
    if b * t == 0 {
        return Ok(());
    }
    let (o_p, l_p, q_p, k_p, v_p) = (out.ptr(), lse.ptr(), q.ptr(), k.ptr(), v.ptr());
    let doc_p: u64 = doc.map_or(0, |dc| dc.ptr());
    let (bi, ti, nhi, nkvi, hdi) = (i64_of(b), i64_of(t), i64_of(nh), i64_of(nkv), i64_of(hd));
    let scale = 1.0f32 / (hd as f32).sqrt();

    let name = if hd == 64 {
        "attention_fwd_bf16_hd64"
    } else {
        "attention_fwd_bf16_hd128"
    };
    let smem = fwd_smem_bytes(hd);
    if use_fast(hd, &[o_p, q_p, k_p, v_p]) && fast_kernel(cx, name, smem)? {
        // attention_fwd_bf16_hd{64,128}(bf16* out, float* lse, const bf16* q, k, v,
        // const int* doc, i64 b, t, nh, nkv, float scale): every buffer's length was checked
        // against the dims above (doc may be null: the kernel tests it); the grid covers exactly
        // the b·nh·⌈t/64⌉ query blocks and the kernel bounds every row by t.
        let grid = (
            grid_u32("query blocks", t.div_ceil(FWD_BM), i32::MAX as usize)?,
            grid_u32("nh", nh, 65535)?,
            grid_u32("b", b, 65535)?,
        );
        launch!(cx, MODULE, name, grid, 128, smem;
            o_p, l_p, q_p, k_p, v_p, doc_p, bi, ti, nhi, nkvi, scale)?;
    } else {
        // attention_fwd_naive_bf16(out, lse, q, k, v, doc, b, t, nh, nkv, hd, scale): lengths
        // checked above, hd ≤ 256 as the kernel's shared arrays require; one CTA per (row, head,
        // batch).
        let name = "attention_fwd_naive_bf16";
        let grid = (
            grid_u32("t", t, i32::MAX as usize)?,
            grid_u32("nh", nh, 65535)?,
            grid_u32("b", b, 65535)?,
        );
        launch!(cx, MODULE, name, grid, 128, 0;
            o_p, l_p, q_p, k_p, v_p, doc_p, bi, ti, nhi, nkvi, hdi, scale)?;
    }
    Ok(())
}

/// dq [b, t, nh, hd], dk, dv [b, t, nkv, hd] (overwritten; dk/dv sum over the query heads of a
/// KV head) from dout, the forward's q, k, v, out and lse (see `ops::attention_bwd`).
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_bwd(
    cx: &Cuda,
    dq: DMut<'_, bf16>,
    dk: DMut<'_, bf16>,
    dv: DMut<'_, bf16>,
    dout: DRef<'_, bf16>,
    q: DRef<'_, bf16>,
    k: DRef<'_, bf16>,
    v: DRef<'_, bf16>,
    out: DRef<'_, bf16>,
    lse: DRef<'_, f32>,
    doc: Option<DRef<'_, i32>>,
    d: AttnDims,
) -> Result<()> {
    check_attn_dims(&d)?;
    let (b, t, nh, nkv, hd) = (d.b, d.t, d.nh, d.nkv, d.hd);
    let nq = b * t * nh * hd;
    let nk = b * t * nkv * hd;
    len_is("attention", "dq", dq.len(), nq)?;
    len_is("attention", "dout", dout.len(), nq)?;
    len_is("attention", "q", q.len(), nq)?;
    len_is("attention", "out", out.len(), nq)?;
    len_is("attention", "dk", dk.len(), nk)?;
    len_is("attention", "dv", dv.len(), nk)?;
    len_is("attention", "k", k.len(), nk)?;
    len_is("attention", "v", v.len(), nk)?;
    len_is("attention", "lse", lse.len(), b * t * nh)?;
    if let Some(dc) = doc {
        len_is("attention", "doc", dc.len(), b * t)?;
    }
    if b * t == 0 {
        return Ok(());
    }
    let (dq_p, dk_p, dv_p) = (dq.ptr(), dk.ptr(), dv.ptr());
    let (do_p, q_p, k_p, v_p, o_p, l_p) =
        (dout.ptr(), q.ptr(), k.ptr(), v.ptr(), out.ptr(), lse.ptr());
    let doc_p: u64 = doc.map_or(0, |dc| dc.ptr());
    let (bi, ti, nhi, nkvi, hdi) = (i64_of(b), i64_of(t), i64_of(nh), i64_of(nkv), i64_of(hd));
    let scale = 1.0f32 / (hd as f32).sqrt();

    // Scratch from the backend's f32 workspace (valid for this call's work on the stream):
    // D = rowsum(dout ∘ out) [b·t·nh] at the start, then on the fast path the f32 dQ accumulator
    // [b·t·nh·hd] at a 16-byte aligned offset, zeroed here in stream order.
    let rows = b * t * nh;
    let acc_off = rows.next_multiple_of(4);
    let name = if hd == 64 {
        "attention_bwd_bf16_hd64"
    } else {
        "attention_bwd_bf16_hd128"
    };
    let smem = bwd_smem_bytes(hd);
    let fast =
        use_fast(hd, &[dq_p, dk_p, dv_p, do_p, q_p, k_p, v_p]) && fast_kernel(cx, name, smem)?;
    let scratch = cx.scratch_f32(acc_off + if fast { nq } else { 0 })?;
    let dsum_p = scratch;
    let acc_p = scratch + (acc_off * 4) as u64;

    // D[row] = Σ_d dout·out, one warp per row: attention_bwd_preprocess_bf16(float* D,
    // const bf16* dout, const bf16* out, i64 rows, i64 hd); the scratch holds ≥ `rows` f32 at D,
    // dout and out have rows·hd elements (checked); the kernel returns for warps past `rows`.
    {
        let name = "attention_bwd_preprocess_bf16";
        let grid = grid_u32("preprocess", rows.div_ceil(8), i32::MAX as usize)?;
        launch!(cx, MODULE, name, grid, 256, 0; dsum_p, do_p, o_p, i64_of(rows), hdi)?;
    }

    if fast {
        // SAFETY: zeroes nq·4 bytes at acc_p, inside the scratch of acc_off + nq f32 obtained
        // above, asynchronously on the stream every kernel of this op runs on.
        unsafe { cx.memset_raw(acc_p, nq * 4) }?;
        // attention_bwd_bf16_hd{64,128}(float* dq_accum, bf16* dk, dv, const bf16* dout, q, k,
        // v, const float* lse, D, const int* doc, i64 b, t, nh, nkv, float scale); dq_accum
        // (zeroed) and D lie in the scratch with b·t·nh·hd and b·t·nh f32, every other length
        // was checked; the kernel bounds every key and query by t.
        let grid = (
            grid_u32("key blocks", t.div_ceil(BWD_BN), i32::MAX as usize)?,
            grid_u32("nkv", nkv, 65535)?,
            grid_u32("b", b, 65535)?,
        );
        launch!(cx, MODULE, name, grid, 256, smem;
            acc_p, dk_p, dv_p, do_p, q_p, k_p, v_p, l_p, dsum_p, doc_p, bi, ti, nhi, nkvi, scale)?;
        // attention_bwd_dq_convert_bf16(bf16* dq, const float* acc, i64 n, float scale) with dq
        // and acc of n elements each (checked / in the scratch); grid-stride loop bounded by n.
        let name = "attention_bwd_dq_convert_bf16";
        let grid = nq.div_ceil(256).min(1 << 20) as u32;
        launch!(cx, MODULE, name, grid, 256, 0; dq_p, acc_p, i64_of(nq), scale)?;
    } else {
        // attention_bwd_naive_dq_bf16(dq, dout, q, k, v, lse, D, doc, b, t, nh, nkv, hd, scale);
        // lengths checked, D in the scratch with b·t·nh f32, hd ≤ 256; one CTA per (query row,
        // head, batch).
        let name = "attention_bwd_naive_dq_bf16";
        let grid = (
            grid_u32("t", t, i32::MAX as usize)?,
            grid_u32("nh", nh, 65535)?,
            grid_u32("b", b, 65535)?,
        );
        launch!(cx, MODULE, name, grid, 128, 0;
            dq_p, do_p, q_p, k_p, v_p, l_p, dsum_p, doc_p, bi, ti, nhi, nkvi, hdi, scale)?;
        // attention_bwd_naive_dkdv_bf16(dk, dv, dout, q, k, v, lse, D, doc, b, t, nh, nkv, hd,
        // scale); lengths checked, hd ≤ 256; one CTA per (key, kv head, batch).
        let name = "attention_bwd_naive_dkdv_bf16";
        let grid = (
            grid_u32("t", t, i32::MAX as usize)?,
            grid_u32("nkv", nkv, 65535)?,
            grid_u32("b", b, 65535)?,
        );
        launch!(cx, MODULE, name, grid, 128, 0;
            dk_p, dv_p, do_p, q_p, k_p, v_p, l_p, dsum_p, doc_p, bi, ti, nhi, nkvi, hdi, scale)?;
    }
    Ok(())
}

/// out [b, tq, nh, hd]: query row r (sequence r / tq, absolute position qpos[r]) attends cache
/// positions 0..=qpos[r] of cache slot r / tq; caches [b_cache, tmax, nkv, hd], b_cache ≥ b
/// (see `ops::attention_cached`). qpos beyond the cache is clamped to tmax − 1; a negative qpos
/// gives a zero row.
pub(super) fn attention_cached(
    cx: &Cuda,
    out: DMut<'_, bf16>,
    q: DRef<'_, bf16>,
    kcache: DRef<'_, bf16>,
    vcache: DRef<'_, bf16>,
    qpos: DRef<'_, i32>,
    d: CacheDims,
) -> Result<()> {
    let (b, tq, tmax, nh, nkv, hd) = (d.b, d.tq, d.tmax, d.nh, d.nkv, d.hd);
    if nkv == 0 || nh == 0 || !nh.is_multiple_of(nkv) {
        return Err(Error::Shape(format!(
            "attention_cached: nh = {nh} must be a positive multiple of nkv = {nkv}"
        )));
    }
    if hd == 0 || hd > MAX_HD {
        return Err(Error::Shape(format!(
            "attention_cached: head dim {hd} not supported (1..={MAX_HD})"
        )));
    }
    len_is("attention", "out", out.len(), b * tq * nh * hd)?;
    len_is("attention", "q", q.len(), b * tq * nh * hd)?;
    len_is("attention", "qpos", qpos.len(), b * tq)?;
    let per_seq = tmax * nkv * hd;
    if kcache.len() != vcache.len() || per_seq == 0 || kcache.len() < b * per_seq {
        return Err(Error::Shape(format!(
            "attention_cached: caches of {} and {} elements, expected equal lengths of at least \
             b·tmax·nkv·hd = {b}·{per_seq}",
            kcache.len(),
            vcache.len()
        )));
    }
    if b * tq == 0 {
        return Ok(());
    }
    // attention_cached_bf16(out, q, kcache, vcache, qpos, b, tq, tmax, nh, nkv, hd, scale);
    // out/q/qpos lengths checked, the caches hold ≥ b sequences of tmax·nkv·hd and the kernel
    // clamps positions to tmax − 1; hd ≤ 256; one CTA per (row, head).
    let name = "attention_cached_bf16";
    let grid = (
        grid_u32("b·tq", b * tq, i32::MAX as usize)?,
        grid_u32("nh", nh, 65535)?,
        1,
    );
    let (o_p, q_p, k_p, v_p, p_p) = (out.ptr(), q.ptr(), kcache.ptr(), vcache.ptr(), qpos.ptr());
    let scale = 1.0f32 / (hd as f32).sqrt();
    launch!(cx, MODULE, name, grid, 256, 0;
        o_p, q_p, k_p, v_p, p_p, i64_of(b), i64_of(tq), i64_of(tmax), i64_of(nh), i64_of(nkv),
        i64_of(hd), scale)?;
    Ok(())
}
