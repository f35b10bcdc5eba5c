//! `Backend for Cuda`: memory through the driver, every op a kernel launch (or cuBLAS) after a
//! host-side check of the views' lengths against the dimensions, so no kernel can be handed a
//! view shorter than what it will touch.

use super::guards::{check, len_at_least, len_is};
use super::{attention, blas, launch, Cuda, DBuf, DMut, DRef};
use crate::backend::{AdamWStep, AttnDims, Backend, CacheDims};
use crate::elem::Elem;
use crate::error::{Error, Result};
use half::bf16;

/// Threads per block of the elementwise and row kernels (their `__launch_bounds__`).
const BLOCK: u32 = 256;
/// Threads per block of the softmax-row kernels (cross-entropy, log-probs).
const ROW_BLOCK: u32 = 1024;
/// Largest grid for row kernels (they grid-stride over rows).
const MAX_ROW_GRID: usize = 1 << 20;
/// RMSNorm backward's row blocks: a constant so the weight gradient's summation order, and so
/// its bits, do not depend on the GPU.
const RMSNORM_BWD_PARTS: usize = 512;
/// Static shared memory of rmsnorm_bwd_bf16 (`__shared__ float sh[32]`; the launch check reads
/// the same from the PTX).
const RMSNORM_BWD_STATIC_SMEM: usize = 128;
/// Reductions' first-pass blocks at most (the partials buffer holds 1024).
const REDUCE_PARTS: usize = 1024;

fn rows_of(op: &str, len: usize, w: usize) -> Result<usize> {
    check(w > 0 && len.is_multiple_of(w), || {
        format!("{op}: length {len} is not a multiple of the row width {w}")
    })?;
    Ok(len / w)
}

fn row_grid(rows: usize) -> u32 {
    rows.clamp(1, MAX_ROW_GRID) as u32
}

impl Cuda {
    fn elementwise_grid(&self, n: usize) -> u32 {
        // 8 elements per thread per iteration on the vector path.
        self.grid_for(n.div_ceil(8), BLOCK as usize)
    }

    /// Σ x or Σ x² in f64, in a fixed order: per-block partials, then one block over them.
    fn reduce(&self, x: DRef<'_, f32>, square: bool) -> Result<f64> {
        let n = x.len();
        if n == 0 {
            return Ok(0.0);
        }
        let parts = n.div_ceil(BLOCK as usize * 16).clamp(1, REDUCE_PARTS);
        let out = self.reduce_ptr();
        let partials = out + 8;
        launch!(self, "reduce", "reduce_sum_f32", parts as u32, BLOCK, 0; partials, x, n, square as i32)?;
        launch!(self, "reduce", "reduce_finish_f64", 1, 1024, 0; out, partials, parts)?;
        let mut host = [0f64; 1];
        // SAFETY: `out` is the backend's own 1025-element f64 buffer; the copy is ordered after
        // the kernels on the same stream and has completed when dtoh_raw returns.
        unsafe { self.dtoh_raw(&mut host[..], out) }?;
        Ok(host[0])
    }
}

impl Backend for Cuda {
    type Act = bf16;
    type Buf<T: Elem> = DBuf<T>;
    type Ref<'a, T: Elem> = DRef<'a, T>;
    type Mut<'a, T: Elem> = DMut<'a, T>;

    fn name(&self) -> String {
        self.display_name().to_string()
    }

    fn alloc<T: Elem>(&self, len: usize) -> Result<DBuf<T>> {
        self.alloc_buf(len)
    }
    fn upload<T: Elem>(&self, src: &[T]) -> Result<DBuf<T>> {
        let mut b = self.alloc_buf::<T>(src.len())?;
        self.from_host(b.view_mut(), src)?;
        Ok(b)
    }
    fn len<T: Elem>(buf: &DBuf<T>) -> usize {
        buf.len()
    }
    fn all<T: Elem>(buf: &DBuf<T>) -> DRef<'_, T> {
        buf.view()
    }
    fn all_mut<T: Elem>(buf: &mut DBuf<T>) -> DMut<'_, T> {
        buf.view_mut()
    }
    fn slice<T: Elem>(buf: &DBuf<T>, off: usize, len: usize) -> DRef<'_, T> {
        buf.slice(off, len)
    }
    fn slice_mut<T: Elem>(buf: &mut DBuf<T>, off: usize, len: usize) -> DMut<'_, T> {
        buf.slice_mut(off, len)
    }
    fn sub<'a, T: Elem>(view: Self::Ref<'a, T>, off: usize, len: usize) -> Self::Ref<'a, T> {
        view.sub(off, len)
    }
    fn sub_mut<'b, T: Elem>(view: &'b mut DMut<'_, T>, off: usize, len: usize) -> DMut<'b, T> {
        view.sub_mut(off, len)
    }

    fn to_host<T: Elem>(&self, dst: &mut [T], src: DRef<'_, T>) -> Result<()> {
        len_at_least("to_host", "src", src.len(), dst.len())?;
        if dst.is_empty() {
            return Ok(());
        }
        // SAFETY: src holds at least dst.len() elements of T (checked); the copy is complete
        // when dtoh_raw returns, before dst can be used again.
        unsafe { self.dtoh_raw(dst, src.ptr()) }
    }
    fn from_host<T: Elem>(&self, dst: DMut<'_, T>, src: &[T]) -> Result<()> {
        len_at_least("from_host", "dst", dst.len(), src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        // SAFETY: dst holds at least src.len() elements (checked).
        unsafe { self.htod_raw(dst.ptr(), src) }
    }
    fn copy<T: Elem>(&self, dst: DMut<'_, T>, src: DRef<'_, T>) -> Result<()> {
        len_is("copy", "dst", dst.len(), src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        // SAFETY: both views hold src.len() elements of T (checked).
        unsafe { self.dtod_raw(dst.ptr(), src.ptr(), src.len() * std::mem::size_of::<T>()) }
    }
    fn zero<T: Elem>(&self, dst: DMut<'_, T>) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        // SAFETY: writes exactly the view's bytes.
        unsafe { self.memset_raw(dst.ptr(), dst.len() * std::mem::size_of::<T>()) }
    }
    fn synchronize(&self) -> Result<()> {
        self.sync_stream()
    }

    fn device_memory(&self) -> Result<Option<(u64, u64)>> {
        if self.is_dry_run() {
            return Ok(None);
        }
        self.bind()?;
        let (free, total) =
            cudarc::driver::result::mem_get_info().map_err(|e| self.dev_err("cuMemGetInfo", e))?;
        Ok(Some(((total - free) as u64, total as u64)))
    }

    fn alloc_shadow(&self, len: usize) -> Result<DBuf<bf16>> {
        self.alloc_buf(len)
    }
    fn compute_weights<'a>(
        &self,
        _master: &'a DBuf<f32>,
        shadow: &'a DBuf<bf16>,
    ) -> DRef<'a, bf16> {
        shadow.view()
    }
    fn compute_weights_mut<'a>(
        &self,
        _master: &'a mut DBuf<f32>,
        shadow: &'a mut DBuf<bf16>,
    ) -> DMut<'a, bf16> {
        shadow.view_mut()
    }
    fn sync_shadow(&self, shadow: &mut DBuf<bf16>, master: &DBuf<f32>) -> Result<()> {
        len_is("sync_shadow", "shadow", shadow.len(), master.len())?;
        self.to_compute(shadow.view_mut(), master.view())
    }
    fn to_compute(&self, dst: DMut<'_, bf16>, src: DRef<'_, f32>) -> Result<()> {
        let n = src.len();
        len_is("to_compute", "dst", dst.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        launch!(self, "elementwise", "f32_to_bf16", self.elementwise_grid(n), BLOCK, 0;
            &dst, src, n)
    }

    fn add(&self, out: DMut<'_, bf16>, a: DRef<'_, bf16>, b: DRef<'_, bf16>) -> Result<()> {
        let n = out.len();
        len_is("add", "a", a.len(), n)?;
        len_is("add", "b", b.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        launch!(self, "elementwise", "add_bf16", self.elementwise_grid(n), BLOCK, 0; &out, a, b, n)
    }

    fn matmul_fwd(
        &self,
        out: DMut<'_, bf16>,
        x: DRef<'_, bf16>,
        w: DRef<'_, bf16>,
        n: usize,
        i: usize,
        o: usize,
    ) -> Result<()> {
        len_at_least("matmul_fwd", "out", out.len(), n * o)?;
        len_at_least("matmul_fwd", "x", x.len(), n * i)?;
        len_at_least("matmul_fwd", "w", w.len(), o * i)?;
        blas::matmul_fwd(self, out.ptr(), x.ptr(), w.ptr(), n, i, o)
    }
    fn matmul_bwd_data(
        &self,
        dx: DMut<'_, bf16>,
        dy: DRef<'_, bf16>,
        w: DRef<'_, bf16>,
        n: usize,
        i: usize,
        o: usize,
        accumulate: bool,
    ) -> Result<()> {
        len_at_least("matmul_bwd_data", "dx", dx.len(), n * i)?;
        len_at_least("matmul_bwd_data", "dy", dy.len(), n * o)?;
        len_at_least("matmul_bwd_data", "w", w.len(), o * i)?;
        blas::matmul_bwd_data(self, dx.ptr(), dy.ptr(), w.ptr(), n, i, o, accumulate)
    }
    fn matmul_bwd_weight(
        &self,
        dw: DMut<'_, f32>,
        dy: DRef<'_, bf16>,
        x: DRef<'_, bf16>,
        n: usize,
        i: usize,
        o: usize,
    ) -> Result<()> {
        len_at_least("matmul_bwd_weight", "dw", dw.len(), o * i)?;
        len_at_least("matmul_bwd_weight", "dy", dy.len(), n * o)?;
        len_at_least("matmul_bwd_weight", "x", x.len(), n * i)?;
        blas::matmul_bwd_weight(self, dw.ptr(), dy.ptr(), x.ptr(), n, i, o)
    }

    fn embedding_fwd(
        &self,
        out: DMut<'_, bf16>,
        ids: DRef<'_, i32>,
        wte: DRef<'_, bf16>,
        h: usize,
    ) -> Result<()> {
        let n = ids.len();
        len_is("embedding_fwd", "out", out.len(), n * h)?;
        rows_of("embedding_fwd", wte.len(), h)?;
        if n == 0 {
            return Ok(());
        }
        // Ids are validated by the model against the vocabulary before upload.
        launch!(self, "elementwise", "gather_rows_bf16", row_grid(n), BLOCK, 0; &out, wte, ids, n, h)
    }
    fn embedding_bwd(
        &self,
        dwte: DMut<'_, f32>,
        dout: DRef<'_, bf16>,
        ids: DRef<'_, i32>,
        ids_host: &[i32],
        h: usize,
    ) -> Result<()> {
        let n = ids.len();
        len_is("embedding_bwd", "dout", dout.len(), n * h)?;
        len_is("embedding_bwd", "ids_host", ids_host.len(), n)?;
        let vocab = rows_of("embedding_bwd", dwte.len(), h)?;
        if n == 0 {
            return Ok(());
        }
        // Group the token indices by id on the host copy the caller kept (the host buffers are
        // reused), so the kernel sums each id's rows in token order without atomics; the plan
        // goes up with an async copy, and nothing is read back.
        let mut guard = self.embed_plan();
        let p = &mut *guard;
        p.ids.clear();
        p.ids.extend_from_slice(ids_host);
        if let Some((t, &bad)) = p
            .ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id < 0 || id as usize >= vocab)
        {
            return Err(Error::Input(format!(
                "embedding_bwd: token id {bad} at position {t} is outside the vocabulary (0..{vocab})"
            )));
        }
        let u = p.build();
        let plan = &p.plan;
        let dev = self.scratch_i32(plan.len())?;
        // SAFETY: the scratch buffer holds at least plan.len() i32; the host data is staged by
        // the driver before the call returns.
        unsafe { self.htod_raw(dev, &plan[..]) }?;
        let (tok, segp, segid) = (dev, dev + 4 * n as u64, dev + 4 * (n + u + 1) as u64);
        launch!(self, "embedding", "embedding_bwd_bf16", row_grid(u), BLOCK, 0;
            &dwte, dout, tok, segp, segid, u, h)
    }

    fn rmsnorm_fwd(
        &self,
        out: DMut<'_, bf16>,
        rstd: DMut<'_, f32>,
        x: DRef<'_, bf16>,
        w: DRef<'_, bf16>,
        h: usize,
        eps: f32,
    ) -> Result<()> {
        let n = rows_of("rmsnorm_fwd", x.len(), h)?;
        len_is("rmsnorm_fwd", "out", out.len(), n * h)?;
        len_is("rmsnorm_fwd", "rstd", rstd.len(), n)?;
        len_is("rmsnorm_fwd", "w", w.len(), h)?;
        if n == 0 {
            return Ok(());
        }
        launch!(self, "rmsnorm", "rmsnorm_fwd_bf16", row_grid(n), BLOCK, 0;
            &out, &rstd, x, w, n, h, eps)
    }
    fn rmsnorm_bwd(
        &self,
        dx: DMut<'_, bf16>,
        dw: DMut<'_, f32>,
        dout: DRef<'_, bf16>,
        x: DRef<'_, bf16>,
        w: DRef<'_, bf16>,
        rstd: DRef<'_, f32>,
        h: usize,
    ) -> Result<()> {
        let n = rows_of("rmsnorm_bwd", x.len(), h)?;
        len_is("rmsnorm_bwd", "dx", dx.len(), n * h)?;
        len_is("rmsnorm_bwd", "dout", dout.len(), n * h)?;
        len_is("rmsnorm_bwd", "dw", dw.len(), h)?;
        len_is("rmsnorm_bwd", "w", w.len(), h)?;
        len_is("rmsnorm_bwd", "rstd", rstd.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        // The per-block dw row in dynamic shared memory, beside the kernel's static 128 bytes:
        // together within the 48 KiB a block gets without opting in.
        let smem = h * 4;
        check(smem + RMSNORM_BWD_STATIC_SMEM <= 48 * 1024, || {
            format!(
                "rmsnorm_bwd: hidden size {h} exceeds the kernel's {} (48 KiB of shared memory)",
                (48 * 1024 - RMSNORM_BWD_STATIC_SMEM) / 4
            )
        })?;
        let per = n.div_ceil(RMSNORM_BWD_PARTS);
        let parts = n.div_ceil(per);
        let part = self.scratch_f32(parts * h)?;
        launch!(self, "rmsnorm", "rmsnorm_bwd_bf16", parts as u32, BLOCK, smem as u32;
            &dx, part, dout, x, w, rstd, n, h, per)?;
        launch!(self, "rmsnorm", "rmsnorm_dw_reduce", h.div_ceil(BLOCK as usize) as u32, BLOCK, 0;
            &dw, part, parts, h)
    }

    fn rope_fwd(
        &self,
        x: DMut<'_, bf16>,
        pos: DRef<'_, i32>,
        heads: usize,
        hd: usize,
        theta: f32,
    ) -> Result<()> {
        self.rope("rope_fwd_bf16", x, pos, heads, hd, theta)
    }
    fn rope_bwd(
        &self,
        dx: DMut<'_, bf16>,
        pos: DRef<'_, i32>,
        heads: usize,
        hd: usize,
        theta: f32,
    ) -> Result<()> {
        self.rope("rope_bwd_bf16", dx, pos, heads, hd, theta)
    }

    fn attention_fwd(
        &self,
        out: DMut<'_, bf16>,
        lse: DMut<'_, f32>,
        q: DRef<'_, bf16>,
        k: DRef<'_, bf16>,
        v: DRef<'_, bf16>,
        doc: Option<DRef<'_, i32>>,
        d: AttnDims,
    ) -> Result<()> {
        check_attn(
            "attention_fwd",
            &d,
            q.len(),
            k.len(),
            v.len(),
            doc.map(|x| x.len()),
        )?;
        len_is("attention_fwd", "out", out.len(), q.len())?;
        len_is("attention_fwd", "lse", lse.len(), d.b * d.t * d.nh)?;
        attention::attention_fwd(self, out, lse, q, k, v, doc, d)
    }
    fn attention_bwd(
        &self,
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
        check_attn(
            "attention_bwd",
            &d,
            q.len(),
            k.len(),
            v.len(),
            doc.map(|x| x.len()),
        )?;
        for (name, len) in [("dq", dq.len()), ("dout", dout.len()), ("out", out.len())] {
            len_is("attention_bwd", name, len, q.len())?;
        }
        len_is("attention_bwd", "dk", dk.len(), k.len())?;
        len_is("attention_bwd", "dv", dv.len(), k.len())?;
        len_is("attention_bwd", "lse", lse.len(), d.b * d.t * d.nh)?;
        attention::attention_bwd(self, dq, dk, dv, dout, q, k, v, out, lse, doc, d)
    }
    fn attention_cached(
        &self,
        out: DMut<'_, bf16>,
        q: DRef<'_, bf16>,
        kcache: DRef<'_, bf16>,
        vcache: DRef<'_, bf16>,
        qpos: DRef<'_, i32>,
        d: CacheDims,
    ) -> Result<()> {
        check(d.nkv > 0 && d.nh.is_multiple_of(d.nkv), || {
            format!("attention_cached: {} heads over {} KV heads", d.nh, d.nkv)
        })?;
        len_is("attention_cached", "q", q.len(), d.b * d.tq * d.nh * d.hd)?;
        len_is("attention_cached", "out", out.len(), q.len())?;
        len_is("attention_cached", "qpos", qpos.len(), d.b * d.tq)?;
        len_at_least(
            "attention_cached",
            "kcache",
            kcache.len(),
            d.b * d.tmax * d.nkv * d.hd,
        )?;
        len_is("attention_cached", "vcache", vcache.len(), kcache.len())?;
        attention::attention_cached(self, out, q, kcache, vcache, qpos, d)
    }

    fn scatter_rows(
        &self,
        dst: DMut<'_, bf16>,
        src: DRef<'_, bf16>,
        rows: DRef<'_, i32>,
        w: usize,
    ) -> Result<()> {
        let n = rows.len();
        len_is("scatter_rows", "src", src.len(), n * w)?;
        rows_of("scatter_rows", dst.len(), w)?;
        if n == 0 {
            return Ok(());
        }
        launch!(self, "elementwise", "scatter_rows_bf16", row_grid(n), BLOCK, 0; &dst, src, rows, n, w)
    }
    fn gather_rows(
        &self,
        dst: DMut<'_, bf16>,
        src: DRef<'_, bf16>,
        rows: DRef<'_, i32>,
        w: usize,
    ) -> Result<()> {
        let n = rows.len();
        len_is("gather_rows", "dst", dst.len(), n * w)?;
        rows_of("gather_rows", src.len(), w)?;
        if n == 0 {
            return Ok(());
        }
        launch!(self, "elementwise", "gather_rows_bf16", row_grid(n), BLOCK, 0; &dst, src, rows, n, w)
    }

    fn swiglu_fwd(
        &self,
        out: DMut<'_, bf16>,
        gate: DRef<'_, bf16>,
        up: DRef<'_, bf16>,
    ) -> Result<()> {
        let n = out.len();
        len_is("swiglu_fwd", "gate", gate.len(), n)?;
        len_is("swiglu_fwd", "up", up.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        launch!(self, "elementwise", "swiglu_fwd_bf16", self.elementwise_grid(n), BLOCK, 0;
            &out, gate, up, n)
    }
    fn swiglu_bwd(
        &self,
        dgate: DMut<'_, bf16>,
        dup: DMut<'_, bf16>,
        dout: DRef<'_, bf16>,
        gate: DRef<'_, bf16>,
        up: DRef<'_, bf16>,
    ) -> Result<()> {
        let n = dout.len();
        for (name, len) in [
            ("dgate", dgate.len()),
            ("dup", dup.len()),
            ("gate", gate.len()),
            ("up", up.len()),
        ] {
            len_is("swiglu_bwd", name, len, n)?;
        }
        if n == 0 {
            return Ok(());
        }
        launch!(self, "elementwise", "swiglu_bwd_bf16", self.elementwise_grid(n), BLOCK, 0;
            &dgate, &dup, dout, gate, up, n)
    }

    fn cross_entropy_fwd(
        &self,
        losses: DMut<'_, f32>,
        logits: DRef<'_, bf16>,
        targets: DRef<'_, i32>,
        v: usize,
    ) -> Result<()> {
        let n = targets.len();
        len_is("cross_entropy_fwd", "losses", losses.len(), n)?;
        len_is("cross_entropy_fwd", "logits", logits.len(), n * v)?;
        if n == 0 {
            return Ok(());
        }
        launch!(self, "softmax_xent", "cross_entropy_fwd_bf16", row_grid(n), ROW_BLOCK, 0;
            &losses, logits, targets, n, v)
    }
    fn cross_entropy_bwd(
        &self,
        dlogits: DMut<'_, bf16>,
        targets: DRef<'_, i32>,
        v: usize,
        scale: f32,
    ) -> Result<()> {
        let n = targets.len();
        len_is("cross_entropy_bwd", "dlogits", dlogits.len(), n * v)?;
        if n == 0 {
            return Ok(());
        }
        launch!(self, "softmax_xent", "cross_entropy_bwd_bf16", row_grid(n), ROW_BLOCK, 0;
            &dlogits, targets, n, v, scale)
    }

    fn scalar_head_fwd(
        &self,
        out: DMut<'_, f32>,
        h: DRef<'_, bf16>,
        w: DRef<'_, bf16>,
        rows: DRef<'_, i32>,
        d: usize,
    ) -> Result<()> {
        let m = rows.len();
        len_is("scalar_head_fwd", "out", out.len(), m)?;
        len_is("scalar_head_fwd", "w", w.len(), d)?;
        rows_of("scalar_head_fwd", h.len(), d)?;
        if m == 0 {
            return Ok(());
        }
        launch!(self, "scalar_head", "scalar_head_fwd_bf16", row_grid(m), BLOCK, 0;
            &out, h, w, rows, m, d)
    }
    fn scalar_head_bwd(
        &self,
        dh: DMut<'_, bf16>,
        dw: DMut<'_, f32>,
        dout: DRef<'_, f32>,
        h: DRef<'_, bf16>,
        w: DRef<'_, bf16>,
        rows: DRef<'_, i32>,
        d: usize,
    ) -> Result<()> {
        let m = rows.len();
        len_is("scalar_head_bwd", "dout", dout.len(), m)?;
        len_is("scalar_head_bwd", "w", w.len(), d)?;
        len_is("scalar_head_bwd", "dw", dw.len(), d)?;
        len_is("scalar_head_bwd", "dh", dh.len(), h.len())?;
        rows_of("scalar_head_bwd", h.len(), d)?;
        if m == 0 || d == 0 {
            return Ok(());
        }
        launch!(self, "scalar_head", "scalar_head_bwd_bf16", d.div_ceil(BLOCK as usize) as u32, BLOCK, 0;
            &dh, &dw, dout, h, w, rows, m, d)
    }

    fn adamw(
        &self,
        master: DMut<'_, f32>,
        shadow: Option<DMut<'_, bf16>>,
        m: DMut<'_, f32>,
        v: DMut<'_, f32>,
        g: DRef<'_, f32>,
        s: AdamWStep,
    ) -> Result<()> {
        let n = master.len();
        len_is("adamw", "m", m.len(), n)?;
        len_is("adamw", "v", v.len(), n)?;
        len_is("adamw", "g", g.len(), n)?;
        if let Some(sh) = &shadow {
            len_is("adamw", "shadow", sh.len(), n)?;
        }
        if n == 0 {
            return Ok(());
        }
        // The host-side constants exactly as ops::adamw computes them.
        let bc1 = 1.0 - (s.beta1 as f64).powi(s.step as i32);
        let bc2 = 1.0 - (s.beta2 as f64).powi(s.step as i32);
        let step_size = (s.lr as f64 / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let decay = 1.0 - s.lr * s.weight_decay;
        let sh = shadow.as_ref().map(|x| x.ptr()).unwrap_or(0);
        launch!(self, "adamw", "adamw_f32", self.grid_for(n.div_ceil(4), BLOCK as usize), BLOCK, 0;
            &master, sh, &m, &v, g, n,
            s.beta1, 1.0 - s.beta1, s.beta2, 1.0 - s.beta2, s.eps, decay, step_size, bc2_sqrt,
            s.grad_scale)
    }

    fn sum_squares(&self, x: DRef<'_, f32>) -> Result<f64> {
        self.reduce(x, true)
    }
    fn sum(&self, x: DRef<'_, f32>) -> Result<f64> {
        self.reduce(x, false)
    }

    fn logprob_fwd(
        &self,
        out_logp: DMut<'_, f32>,
        out_entropy: DMut<'_, f32>,
        logits: DRef<'_, bf16>,
        targets: DRef<'_, i32>,
        v: usize,
    ) -> Result<()> {
        let n = targets.len();
        len_is("logprob_fwd", "out_logp", out_logp.len(), n)?;
        len_is("logprob_fwd", "out_entropy", out_entropy.len(), n)?;
        len_is("logprob_fwd", "logits", logits.len(), n * v)?;
        if n == 0 {
            return Ok(());
        }
        launch!(self, "softmax_xent", "logprob_fwd_bf16", row_grid(n), ROW_BLOCK, 0;
            &out_logp, &out_entropy, logits, targets, n, v)
    }
    fn logprob_bwd(
        &self,
        dlogits: DMut<'_, bf16>,
        targets: DRef<'_, i32>,
        weights: DRef<'_, f32>,
        v: usize,
    ) -> Result<()> {
        let n = targets.len();
        len_is("logprob_bwd", "dlogits", dlogits.len(), n * v)?;
        len_is("logprob_bwd", "weights", weights.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        launch!(self, "softmax_xent", "logprob_bwd_bf16", row_grid(n), ROW_BLOCK, 0;
            &dlogits, targets, weights, n, v)
    }
}

impl Cuda {
    fn rope(
        &self,
        kernel: &str,
        x: DMut<'_, bf16>,
        pos: DRef<'_, i32>,
        heads: usize,
        hd: usize,
        theta: f32,
    ) -> Result<()> {
        let n = pos.len();
        len_is(kernel, "x", x.len(), n * heads * hd)?;
        check(hd.is_multiple_of(2) && hd <= 1024, || {
            format!("{kernel}: head_dim {hd} must be even and at most 1024")
        })?;
        if n == 0 || heads == 0 {
            return Ok(());
        }
        launch!(self, "rope", kernel, row_grid(n), BLOCK, 0; &x, pos, n, heads, hd, theta)
    }
}

/// Shapes shared by the attention ops: q [b,t,nh,hd], k/v [b,t,nkv,hd], doc [b,t].
fn check_attn(
    op: &str,
    d: &AttnDims,
    q: usize,
    k: usize,
    v: usize,
    doc: Option<usize>,
) -> Result<()> {
    check(d.nkv > 0 && d.nh.is_multiple_of(d.nkv), || {
        format!(
            "{op}: {} query heads are not a multiple of {} KV heads",
            d.nh, d.nkv
        )
    })?;
    len_is(op, "q", q, d.b * d.t * d.nh * d.hd)?;
    len_is(op, "k", k, d.b * d.t * d.nkv * d.hd)?;
    len_is(op, "v", v, k)?;
    if let Some(doc) = doc {
        len_is(op, "doc", doc, d.b * d.t)?;
    }
    Ok(())
}

impl super::EmbedPlan {
    /// Groups the token indices of `self.ids` by id: `plan` = [tok (n) | seg (U + 1) | seg_id
    /// (U)], tokens in order within a group, groups by ascending id. Returns U.
    pub(crate) fn build(&mut self) -> usize {
        let n = self.ids.len();
        self.order.clear();
        self.order.extend(0..n as i32);
        let idv = &self.ids;
        // Keys are unique (id, token), so the unstable sort keeps token order within an id.
        self.order.sort_unstable_by_key(|&t| (idv[t as usize], t));
        self.seg.clear();
        self.seg_id.clear();
        for (k, &t) in self.order.iter().enumerate() {
            let id = self.ids[t as usize];
            if self.seg_id.last() != Some(&id) {
                self.seg.push(k as i32);
                self.seg_id.push(id);
            }
        }
        self.seg.push(n as i32);
        self.plan.clear();
        self.plan.extend_from_slice(&self.order);
        self.plan.extend_from_slice(&self.seg);
        self.plan.extend_from_slice(&self.seg_id);
        self.seg_id.len()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn embedding_plan_groups_tokens_by_id_in_order() {
        let mut p = super::super::EmbedPlan {
            ids: vec![5, 2, 5, 9, 2, 5],
            ..Default::default()
        };
        let u = p.build();
        assert_eq!(u, 3);
        // tok: id 2 at tokens 1, 4; id 5 at 0, 2, 5; id 9 at 3
        assert_eq!(&p.plan[..6], &[1, 4, 0, 2, 5, 3]);
        assert_eq!(&p.plan[6..10], &[0, 2, 5, 6]); // seg
        assert_eq!(&p.plan[10..], &[2, 5, 9]); // seg_id
    }
}
