//! The backend abstraction: device buffers and the ops over them.
//!
//! The model's forward and backward are written once against this trait (llm.c writes its model
//! twice; we don't). `Buf<T>` owns device memory; `Ref`/`Mut` are borrowed views into it, so the
//! flat parameter buffer can hand out one view per tensor. Every op follows llm.c's argument
//! order: outputs, inputs, weights, dims. Weight-gradient outputs are f32 and accumulate.

pub mod cpu;
pub mod cuda;

use crate::elem::{Elem, Float};
use crate::error::{Error, Result};
pub use crate::ops::{AdamWStep, AttnDims, CacheDims};

pub trait Backend: Clone + Send + Sync + 'static {
    /// The activation and compute-weight type: f32 on the CPU, bf16 on CUDA.
    type Act: Float;
    type Buf<T: Elem>: Send + Sync;
    type Ref<'a, T: Elem>: Copy;
    type Mut<'a, T: Elem>;

    fn name(&self) -> String;

    // ---- memory ------------------------------------------------------------------------------
    /// A zeroed buffer of `len` elements.
    fn alloc<T: Elem>(&self, len: usize) -> Result<Self::Buf<T>>;
    fn upload<T: Elem>(&self, src: &[T]) -> Result<Self::Buf<T>>;
    fn len<T: Elem>(buf: &Self::Buf<T>) -> usize;
    fn all<T: Elem>(buf: &Self::Buf<T>) -> Self::Ref<'_, T>;
    fn all_mut<T: Elem>(buf: &mut Self::Buf<T>) -> Self::Mut<'_, T>;
    fn slice<T: Elem>(buf: &Self::Buf<T>, off: usize, len: usize) -> Self::Ref<'_, T>;
    fn slice_mut<T: Elem>(buf: &mut Self::Buf<T>, off: usize, len: usize) -> Self::Mut<'_, T>;
    /// A sub-view of a view (a weight inside the flat parameter view).
    fn sub<'a, T: Elem>(view: Self::Ref<'a, T>, off: usize, len: usize) -> Self::Ref<'a, T>;
    /// A mutable sub-view, reborrowed from a mutable view for as long as it lives.
    fn sub_mut<'b, T: Elem>(
        view: &'b mut Self::Mut<'_, T>,
        off: usize,
        len: usize,
    ) -> Self::Mut<'b, T>;
    fn to_host<T: Elem>(&self, dst: &mut [T], src: Self::Ref<'_, T>) -> Result<()>;
    fn from_host<T: Elem>(&self, dst: Self::Mut<'_, T>, src: &[T]) -> Result<()>;
    fn copy<T: Elem>(&self, dst: Self::Mut<'_, T>, src: Self::Ref<'_, T>) -> Result<()>;
    fn zero<T: Elem>(&self, dst: Self::Mut<'_, T>) -> Result<()>;
    fn synchronize(&self) -> Result<()>;
    /// Device memory in use and the device's total, in bytes, where the backend has a device
    /// (the engine allocates its buffers up front, so after a step this is the step's peak).
    fn device_memory(&self) -> Result<Option<(u64, u64)>> {
        Ok(None)
    }
    /// Bytes this device can still allocate, where the backend can tell (`None`: unknown, so
    /// nothing is checked): what [`check_fits`] compares a request with. Default: the device's
    /// free memory.
    fn available_memory(&self) -> Option<u64> {
        let (used, total) = self.device_memory().ok().flatten()?;
        Some(total.saturating_sub(used))
    }

    /// The compute copy of the fp32 master weights: an empty buffer where the master itself
    /// is used for compute (CPU), a bf16 shadow on CUDA. (A model can still give itself a
    /// separate copy on the CPU, [`crate::Llama::separate_compute_copy`], to run CUDA's data
    /// flow there.)
    fn alloc_shadow(&self, len: usize) -> Result<Self::Buf<Self::Act>>;
    /// The weights the ops read: the shadow where it is not empty (CUDA), else the master.
    fn compute_weights<'a>(
        &self,
        master: &'a Self::Buf<f32>,
        shadow: &'a Self::Buf<Self::Act>,
    ) -> Self::Ref<'a, Self::Act>;
    /// The compute weights for writing in place: the shadow where it is not empty, else the
    /// master (the same rule as [`Backend::compute_weights`]). ZeRO-1 updates its shard of them
    /// and all-gathers them in their own dtype (bf16 on CUDA: half the bytes of fp32).
    fn compute_weights_mut<'a>(
        &self,
        master: &'a mut Self::Buf<f32>,
        shadow: &'a mut Self::Buf<Self::Act>,
    ) -> Self::Mut<'a, Self::Act>;
    /// Refresh the shadow from the master after the master was written outside AdamW.
    fn sync_shadow(&self, shadow: &mut Self::Buf<Self::Act>, master: &Self::Buf<f32>)
        -> Result<()>;
    /// `dst` ← `src` rounded to the compute dtype (a copy on the CPU).
    fn to_compute(&self, dst: Self::Mut<'_, Self::Act>, src: Self::Ref<'_, f32>) -> Result<()>;

    /// Downloads a float buffer as f32.
    fn to_host_f32(&self, src: Self::Ref<'_, Self::Act>, len: usize) -> Result<Vec<f32>> {
        let mut tmp = vec![Self::Act::default(); len];
        self.to_host(&mut tmp, src)?;
        Ok(tmp.into_iter().map(|x| x.to_f32()).collect())
    }

    // ---- ops (shapes in the CPU reference, crate::ops) -----------------------------------------
    fn add(
        &self,
        out: Self::Mut<'_, Self::Act>,
        a: Self::Ref<'_, Self::Act>,
        b: Self::Ref<'_, Self::Act>,
    ) -> Result<()>;

    fn matmul_fwd(
        &self,
        out: Self::Mut<'_, Self::Act>,
        x: Self::Ref<'_, Self::Act>,
        w: Self::Ref<'_, Self::Act>,
        n: usize,
        i: usize,
        o: usize,
    ) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn matmul_bwd_data(
        &self,
        dx: Self::Mut<'_, Self::Act>,
        dy: Self::Ref<'_, Self::Act>,
        w: Self::Ref<'_, Self::Act>,
        n: usize,
        i: usize,
        o: usize,
        accumulate: bool,
    ) -> Result<()>;
    fn matmul_bwd_weight(
        &self,
        dw: Self::Mut<'_, f32>,
        dy: Self::Ref<'_, Self::Act>,
        x: Self::Ref<'_, Self::Act>,
        n: usize,
        i: usize,
        o: usize,
    ) -> Result<()>;

    fn embedding_fwd(
        &self,
        out: Self::Mut<'_, Self::Act>,
        ids: Self::Ref<'_, i32>,
        wte: Self::Ref<'_, Self::Act>,
        h: usize,
    ) -> Result<()>;
    /// `ids_host` holds the same ids as `ids`, on the host (the caller uploaded them): a
    /// backend that groups tokens by id to sum deterministically does it there, with no
    /// device-to-host copy or sync.
    fn embedding_bwd(
        &self,
        dwte: Self::Mut<'_, f32>,
        dout: Self::Ref<'_, Self::Act>,
        ids: Self::Ref<'_, i32>,
        ids_host: &[i32],
        h: usize,
    ) -> Result<()>;

    fn rmsnorm_fwd(
        &self,
        out: Self::Mut<'_, Self::Act>,
        rstd: Self::Mut<'_, f32>,
        x: Self::Ref<'_, Self::Act>,
        w: Self::Ref<'_, Self::Act>,
        h: usize,
        eps: f32,
    ) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_bwd(
        &self,
        dx: Self::Mut<'_, Self::Act>,
        dw: Self::Mut<'_, f32>,
        dout: Self::Ref<'_, Self::Act>,
        x: Self::Ref<'_, Self::Act>,
        w: Self::Ref<'_, Self::Act>,
        rstd: Self::Ref<'_, f32>,
        h: usize,
    ) -> Result<()>;

    fn rope_fwd(
        &self,
        x: Self::Mut<'_, Self::Act>,
        pos: Self::Ref<'_, i32>,
        heads: usize,
        hd: usize,
        theta: f32,
    ) -> Result<()>;
    fn rope_bwd(
        &self,
        dx: Self::Mut<'_, Self::Act>,
        pos: Self::Ref<'_, i32>,
        heads: usize,
        hd: usize,
        theta: f32,
    ) -> Result<()>;

    #[allow(clippy::too_many_arguments)]
    fn attention_fwd(
        &self,
        out: Self::Mut<'_, Self::Act>,
        lse: Self::Mut<'_, f32>,
        q: Self::Ref<'_, Self::Act>,
        k: Self::Ref<'_, Self::Act>,
        v: Self::Ref<'_, Self::Act>,
        doc: Option<Self::Ref<'_, i32>>,
        d: AttnDims,
    ) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd(
        &self,
        dq: Self::Mut<'_, Self::Act>,
        dk: Self::Mut<'_, Self::Act>,
        dv: Self::Mut<'_, Self::Act>,
        dout: Self::Ref<'_, Self::Act>,
        q: Self::Ref<'_, Self::Act>,
        k: Self::Ref<'_, Self::Act>,
        v: Self::Ref<'_, Self::Act>,
        out: Self::Ref<'_, Self::Act>,
        lse: Self::Ref<'_, f32>,
        doc: Option<Self::Ref<'_, i32>>,
        d: AttnDims,
    ) -> Result<()>;

    /// Attention of new queries against a KV cache (inference only).
    fn attention_cached(
        &self,
        out: Self::Mut<'_, Self::Act>,
        q: Self::Ref<'_, Self::Act>,
        kcache: Self::Ref<'_, Self::Act>,
        vcache: Self::Ref<'_, Self::Act>,
        qpos: Self::Ref<'_, i32>,
        d: CacheDims,
    ) -> Result<()>;
    /// dst[rows[i], :] = src[i, :], rows of width `w`.
    fn scatter_rows(
        &self,
        dst: Self::Mut<'_, Self::Act>,
        src: Self::Ref<'_, Self::Act>,
        rows: Self::Ref<'_, i32>,
        w: usize,
    ) -> Result<()>;
    /// dst[i, :] = src[rows[i], :], rows of width `w`.
    fn gather_rows(
        &self,
        dst: Self::Mut<'_, Self::Act>,
        src: Self::Ref<'_, Self::Act>,
        rows: Self::Ref<'_, i32>,
        w: usize,
    ) -> Result<()>;

    fn swiglu_fwd(
        &self,
        out: Self::Mut<'_, Self::Act>,
        gate: Self::Ref<'_, Self::Act>,
        up: Self::Ref<'_, Self::Act>,
    ) -> Result<()>;
    fn swiglu_bwd(
        &self,
        dgate: Self::Mut<'_, Self::Act>,
        dup: Self::Mut<'_, Self::Act>,
        dout: Self::Ref<'_, Self::Act>,
        gate: Self::Ref<'_, Self::Act>,
        up: Self::Ref<'_, Self::Act>,
    ) -> Result<()>;

    fn cross_entropy_fwd(
        &self,
        losses: Self::Mut<'_, f32>,
        logits: Self::Ref<'_, Self::Act>,
        targets: Self::Ref<'_, i32>,
        v: usize,
    ) -> Result<()>;
    fn cross_entropy_bwd(
        &self,
        dlogits: Self::Mut<'_, Self::Act>,
        targets: Self::Ref<'_, i32>,
        v: usize,
        scale: f32,
    ) -> Result<()>;

    fn scalar_head_fwd(
        &self,
        out: Self::Mut<'_, f32>,
        h: Self::Ref<'_, Self::Act>,
        w: Self::Ref<'_, Self::Act>,
        rows: Self::Ref<'_, i32>,
        d: usize,
    ) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn scalar_head_bwd(
        &self,
        dh: Self::Mut<'_, Self::Act>,
        dw: Self::Mut<'_, f32>,
        dout: Self::Ref<'_, f32>,
        h: Self::Ref<'_, Self::Act>,
        w: Self::Ref<'_, Self::Act>,
        rows: Self::Ref<'_, i32>,
        d: usize,
    ) -> Result<()>;

    /// Fused AdamW over one contiguous run of parameters; writes the shadow too where there is one.
    #[allow(clippy::too_many_arguments)]
    fn adamw(
        &self,
        master: Self::Mut<'_, f32>,
        shadow: Option<Self::Mut<'_, Self::Act>>,
        m: Self::Mut<'_, f32>,
        v: Self::Mut<'_, f32>,
        g: Self::Ref<'_, f32>,
        s: AdamWStep,
    ) -> Result<()>;

    /// Σ x² (the global gradient norm's reduction), read back as one scalar.
    fn sum_squares(&self, x: Self::Ref<'_, f32>) -> Result<f64>;
    /// Σ x (the loss), read back as one scalar.
    fn sum(&self, x: Self::Ref<'_, f32>) -> Result<f64>;

    /// Per-token log-probability of the target and entropy of the row (policy gradients).
    fn logprob_fwd(
        &self,
        out_logp: Self::Mut<'_, f32>,
        out_entropy: Self::Mut<'_, f32>,
        logits: Self::Ref<'_, Self::Act>,
        targets: Self::Ref<'_, i32>,
        v: usize,
    ) -> Result<()>;
    /// In place over the logits: the gradient of Σ weights[n] · logp_n.
    fn logprob_bwd(
        &self,
        dlogits: Self::Mut<'_, Self::Act>,
        targets: Self::Ref<'_, i32>,
        weights: Self::Ref<'_, f32>,
        v: usize,
    ) -> Result<()>;
}

/// Fails, saying how much is needed and how much there is, when `need` bytes do not fit in what
/// `be` can still allocate. Called before large allocations: a failed host allocation aborts the
/// process, and an overcommitted one gets it killed later by the OOM killer, both without a word.
pub fn check_fits<B: Backend>(be: &B, need: u128, what: impl FnOnce() -> String) -> Result<()> {
    match be.available_memory() {
        Some(avail) if need > avail as u128 => Err(Error::OutOfMemory(format!(
            "{} need {}, but {} is available on {}",
            what(),
            fmt_bytes(need),
            fmt_bytes(avail as u128),
            be.name()
        ))),
        _ => Ok(()),
    }
}

/// Bytes in binary units with three significant digits, e.g. `1.50 GiB`.
pub fn fmt_bytes(b: u128) -> String {
    const UNITS: [&str; 7] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut x = b as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} bytes")
    } else {
        format!("{x:.3} {}", UNITS[u])
    }
}
