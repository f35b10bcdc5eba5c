//! The CPU backend: f32 everywhere, buffers are `Vec`s, views are slices, ops are `crate::ops`.

use super::{AdamWStep, AttnDims, Backend, CacheDims};
use crate::elem::Elem;
use crate::error::{Error, Result};
use crate::ops;
use std::cell::Cell;

#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

/// What one thread asked of the CPU backend's memory interface: elements moved by
/// `to_host`/`from_host`/`upload` (the copies a GPU backend pays for) and buffers allocated.
/// Lets tests check that a hot path (the ZeRO-1 step) moves and allocates nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub transferred: usize,
    pub allocs: usize,
}

thread_local! {
    static TRAFFIC: Cell<Traffic> = const {
        Cell::new(Traffic {
            transferred: 0,
            allocs: 0,
        })
    };
}

fn check_same(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::Shape(format!(
            "{what}: {got} elements, expected {want}"
        )));
    }
    Ok(())
}

fn note(transferred: usize, allocs: usize) {
    TRAFFIC.with(|t| {
        let c = t.get();
        t.set(Traffic {
            transferred: c.transferred + transferred,
            allocs: c.allocs + allocs,
        })
    });
}

impl Cpu {
    /// This thread's [`Traffic`] so far (per thread, so each rank of a thread group has its own).
    pub fn traffic() -> Traffic {
        TRAFFIC.with(|t| t.get())
    }
}

/// The host memory this process may still allocate on Linux: `MemAvailable`, capped by the
/// headroom of its cgroup and the cgroups above it (the limits Slurm and Kubernetes enforce);
/// `None` where /proc is not there.
pub fn host_available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some((kib * 1024).min(cgroup_headroom().unwrap_or(u64::MAX)))
}

/// cgroup v2: the smallest `memory.max − (memory.current − inactive_file)` (page cache that can
/// be reclaimed is not in use) from the process's group up to the root.
fn cgroup_headroom() -> Option<u64> {
    let root = std::path::Path::new("/sys/fs/cgroup");
    let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = cg.lines().find_map(|l| l.strip_prefix("0::"))?.trim();
    let mut dir = root.join(rel.trim_start_matches('/'));
    let mut best: Option<u64> = None;
    loop {
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
        // "max" (no limit) does not parse, and leaves this level out.
        if let Some(max) = read("memory.max").and_then(|s| s.trim().parse::<u64>().ok()) {
            let current = read("memory.current")
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(0);
            let cache = read("memory.stat")
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("inactive_file "))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                })
                .unwrap_or(0);
            let room = max.saturating_sub(current.saturating_sub(cache));
            best = Some(best.map_or(room, |b| b.min(room)));
        }
        if dir == root || !dir.pop() || !dir.starts_with(root) {
            return best;
        }
    }
}

impl Backend for Cpu {
    type Act = f32;
    type Buf<T: Elem> = Vec<T>;
    type Ref<'a, T: Elem> = &'a [T];
    type Mut<'a, T: Elem> = &'a mut [T];

    fn name(&self) -> String {
        format!("cpu (f32, {} threads)", rayon::current_num_threads())
    }

    fn alloc<T: Elem>(&self, len: usize) -> Result<Vec<T>> {
        note(0, 1);
        Ok(vec![T::default(); len])
    }
    fn upload<T: Elem>(&self, src: &[T]) -> Result<Vec<T>> {
        note(src.len(), 1);
        Ok(src.to_vec())
    }
    fn len<T: Elem>(buf: &Vec<T>) -> usize {
        buf.len()
    }
    fn all<T: Elem>(buf: &Vec<T>) -> &[T] {
        buf
    }
    fn all_mut<T: Elem>(buf: &mut Vec<T>) -> &mut [T] {
        buf
    }
    fn slice<T: Elem>(buf: &Vec<T>, off: usize, len: usize) -> &[T] {
        &buf[off..off + len]
    }
    fn slice_mut<T: Elem>(buf: &mut Vec<T>, off: usize, len: usize) -> &mut [T] {
        &mut buf[off..off + len]
    }
    fn sub<'a, T: Elem>(view: Self::Ref<'a, T>, off: usize, len: usize) -> Self::Ref<'a, T> {
        &view[off..off + len]
    }
    fn sub_mut<'b, T: Elem>(view: &'b mut &mut [T], off: usize, len: usize) -> &'b mut [T] {
        &mut view[off..off + len]
    }
    fn to_host<T: Elem>(&self, dst: &mut [T], src: &[T]) -> Result<()> {
        note(dst.len(), 0);
        dst.copy_from_slice(&src[..dst.len()]);
        Ok(())
    }
    fn from_host<T: Elem>(&self, dst: &mut [T], src: &[T]) -> Result<()> {
        note(src.len(), 0);
        dst[..src.len()].copy_from_slice(src);
        Ok(())
    }
    fn copy<T: Elem>(&self, dst: &mut [T], src: &[T]) -> Result<()> {
        dst.copy_from_slice(src);
        Ok(())
    }
    fn zero<T: Elem>(&self, dst: &mut [T]) -> Result<()> {
        dst.fill(T::default());
        Ok(())
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn available_memory(&self) -> Option<u64> {
        host_available_memory()
    }
    fn alloc_shadow(&self, _len: usize) -> Result<Vec<f32>> {
        Ok(Vec::new())
    }
    fn compute_weights<'a>(&self, master: &'a Vec<f32>, shadow: &'a Vec<f32>) -> &'a [f32] {
        if shadow.is_empty() {
            master
        } else {
            shadow
        }
    }
    fn compute_weights_mut<'a>(
        &self,
        master: &'a mut Vec<f32>,
        shadow: &'a mut Vec<f32>,
    ) -> &'a mut [f32] {
        if shadow.is_empty() {
            master
        } else {
            shadow
        }
    }
    fn sync_shadow(&self, shadow: &mut Vec<f32>, master: &Vec<f32>) -> Result<()> {
        if !shadow.is_empty() {
            check_same("sync_shadow", shadow.len(), master.len())?;
            shadow.copy_from_slice(master);
        }
        Ok(())
    }
    fn to_compute(&self, dst: &mut [f32], src: &[f32]) -> Result<()> {
        check_same("to_compute", dst.len(), src.len())?;
        dst.copy_from_slice(src);
        Ok(())
    }

    fn add(&self, out: &mut [f32], a: &[f32], b: &[f32]) -> Result<()> {
        use rayon::prelude::*;
        out.par_iter_mut()
            .zip(a.par_iter().zip(b.par_iter()))
            .for_each(|(o, (x, y))| *o = x + y);
        Ok(())
    }
    fn matmul_fwd(
        &self,
        out: &mut [f32],
        x: &[f32],
        w: &[f32],
        n: usize,
        i: usize,
        o: usize,
    ) -> Result<()> {
        ops::matmul_fwd(out, x, w, n, i, o);
        Ok(())
    }
    fn matmul_bwd_data(
        &self,
        dx: &mut [f32],
        dy: &[f32],
        w: &[f32],
        n: usize,
        i: usize,
        o: usize,
        accumulate: bool,
    ) -> Result<()> {
        ops::matmul_bwd_data(dx, dy, w, n, i, o, accumulate);
        Ok(())
    }
    fn matmul_bwd_weight(
        &self,
        dw: &mut [f32],
        dy: &[f32],
        x: &[f32],
        n: usize,
        i: usize,
        o: usize,
    ) -> Result<()> {
        ops::matmul_bwd_weight(dw, dy, x, n, i, o);
        Ok(())
    }
    fn embedding_fwd(&self, out: &mut [f32], ids: &[i32], wte: &[f32], h: usize) -> Result<()> {
        ops::embedding_fwd(out, ids, wte, h);
        Ok(())
    }
    fn embedding_bwd(
        &self,
        dwte: &mut [f32],
        dout: &[f32],
        ids: &[i32],
        _ids_host: &[i32],
        h: usize,
    ) -> Result<()> {
        ops::embedding_bwd(dwte, dout, ids, h);
        Ok(())
    }
    fn rmsnorm_fwd(
        &self,
        out: &mut [f32],
        rstd: &mut [f32],
        x: &[f32],
        w: &[f32],
        h: usize,
        eps: f32,
    ) -> Result<()> {
        ops::rmsnorm_fwd(out, rstd, x, w, h, eps);
        Ok(())
    }
    fn rmsnorm_bwd(
        &self,
        dx: &mut [f32],
        dw: &mut [f32],
        dout: &[f32],
        x: &[f32],
        w: &[f32],
        rstd: &[f32],
        h: usize,
    ) -> Result<()> {
        ops::rmsnorm_bwd(dx, dw, dout, x, w, rstd, h);
        Ok(())
    }
    fn rope_fwd(
        &self,
        x: &mut [f32],
        pos: &[i32],
        heads: usize,
        hd: usize,
        theta: f32,
    ) -> Result<()> {
        ops::rope_fwd(x, pos, heads, hd, theta);
        Ok(())
    }
    fn rope_bwd(
        &self,
        dx: &mut [f32],
        pos: &[i32],
        heads: usize,
        hd: usize,
        theta: f32,
    ) -> Result<()> {
        ops::rope_bwd(dx, pos, heads, hd, theta);
        Ok(())
    }
    fn attention_fwd(
        &self,
        out: &mut [f32],
        lse: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        doc: Option<&[i32]>,
        d: AttnDims,
    ) -> Result<()> {
        ops::attention_fwd(out, lse, q, k, v, doc, d);
        Ok(())
    }
    fn attention_bwd(
        &self,
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
    ) -> Result<()> {
        ops::attention_bwd(dq, dk, dv, dout, q, k, v, out, lse, doc, d);
        Ok(())
    }
    fn attention_cached(
        &self,
        out: &mut [f32],
        q: &[f32],
        kcache: &[f32],
        vcache: &[f32],
        qpos: &[i32],
        d: CacheDims,
    ) -> Result<()> {
        ops::attention_cached(out, q, kcache, vcache, qpos, d);
        Ok(())
    }
    fn scatter_rows(&self, dst: &mut [f32], src: &[f32], rows: &[i32], w: usize) -> Result<()> {
        ops::scatter_rows(dst, src, rows, w);
        Ok(())
    }
    fn gather_rows(&self, dst: &mut [f32], src: &[f32], rows: &[i32], w: usize) -> Result<()> {
        ops::gather_rows(dst, src, rows, w);
        Ok(())
    }
    fn swiglu_fwd(&self, out: &mut [f32], gate: &[f32], up: &[f32]) -> Result<()> {
        ops::swiglu_fwd(out, gate, up);
        Ok(())
    }
    fn swiglu_bwd(
        &self,
        dgate: &mut [f32],
        dup: &mut [f32],
        dout: &[f32],
        gate: &[f32],
        up: &[f32],
    ) -> Result<()> {
        ops::swiglu_bwd(dgate, dup, dout, gate, up);
        Ok(())
    }
    fn cross_entropy_fwd(
        &self,
        losses: &mut [f32],
        logits: &[f32],
        targets: &[i32],
        v: usize,
    ) -> Result<()> {
        ops::cross_entropy_fwd(losses, logits, targets, v);
        Ok(())
    }
    fn cross_entropy_bwd(
        &self,
        dlogits: &mut [f32],
        targets: &[i32],
        v: usize,
        scale: f32,
    ) -> Result<()> {
        ops::cross_entropy_bwd(dlogits, targets, v, scale);
        Ok(())
    }
    fn scalar_head_fwd(
        &self,
        out: &mut [f32],
        h: &[f32],
        w: &[f32],
        rows: &[i32],
        d: usize,
    ) -> Result<()> {
        ops::scalar_head_fwd(out, h, w, rows, d);
        Ok(())
    }
    fn scalar_head_bwd(
        &self,
        dh: &mut [f32],
        dw: &mut [f32],
        dout: &[f32],
        h: &[f32],
        w: &[f32],
        rows: &[i32],
        d: usize,
    ) -> Result<()> {
        ops::scalar_head_bwd(dh, dw, dout, h, w, rows, d);
        Ok(())
    }
    fn adamw(
        &self,
        master: &mut [f32],
        shadow: Option<&mut [f32]>,
        m: &mut [f32],
        v: &mut [f32],
        g: &[f32],
        s: AdamWStep,
    ) -> Result<()> {
        ops::adamw(master, m, v, g, s);
        // A separate compute copy (Llama::separate_compute_copy) or ZeRO-1's shard of the
        // compute weights; the empty shadow of a model computing from its master is skipped.
        if let Some(sh) = shadow.filter(|sh| !sh.is_empty()) {
            check_same("adamw shadow", sh.len(), master.len())?;
            sh.copy_from_slice(master);
        }
        Ok(())
    }
    fn sum_squares(&self, x: &[f32]) -> Result<f64> {
        Ok(ops::sum_squares(x))
    }
    fn sum(&self, x: &[f32]) -> Result<f64> {
        Ok(ops::sum(x))
    }
    fn logprob_fwd(
        &self,
        out_logp: &mut [f32],
        out_entropy: &mut [f32],
        logits: &[f32],
        targets: &[i32],
        v: usize,
    ) -> Result<()> {
        ops::logprob_fwd(out_logp, out_entropy, logits, targets, v);
        Ok(())
    }
    fn logprob_bwd(
        &self,
        dlogits: &mut [f32],
        targets: &[i32],
        weights: &[f32],
        v: usize,
    ) -> Result<()> {
        ops::logprob_bwd(dlogits, targets, weights, v);
        Ok(())
    }
}
