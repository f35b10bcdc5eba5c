//! The Llama 2 model, written once over any [`Backend`]: forward to logits (or scalar scores) and
//! a hand-written backward, layer by layer, accumulating into the flat gradient buffer.
//!
//! Data flow per block (pre-norm): x → RMSNorm → q,k,v → RoPE → causal GQA attention → o → +x →
//! RMSNorm → gate,up → SwiGLU → down → +. Saved activations are allocated for the largest batch
//! seen and reused; a step allocates nothing once that size is reached. [`Recompute`] trades
//! saved activations for a second forward of each layer inside the backward.

use crate::backend::{check_fits, AttnDims, Backend, CacheDims};
use crate::config::LlamaConfig;
use crate::elem::{Elem, Float};
use crate::error::{Error, Result};
use crate::params::{Head, LayerSpans, ParamTable, Span};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

/// Told during a backward as the tail of the flat gradient buffer becomes final:
/// `grads[from..]` will not be written again by this backward. Parameters are laid out
/// embedding, layers, final norm, head, so the backward finishes them from the end: `from`
/// falls layer by layer and reaches 0 last. Data-parallel training reduces a finished bucket
/// here while the backward goes on ([`crate::dist::ShardedAdamW::overlap`]).
pub trait GradReady<B: Backend> {
    fn ready(&mut self, grads: B::Ref<'_, f32>, from: usize) -> Result<()>;
}

/// One batch of token rows, [b, t] row-major.
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    pub ids: &'a [i32],
    pub b: usize,
    pub t: usize,
    /// RoPE position of every token; default 0..t in every row. Packed and KV-cached sequences
    /// pass their own.
    pub pos: Option<&'a [i32]>,
    /// Document id of every token: tokens attend only within their document (packing).
    pub doc: Option<&'a [i32]>,
}

impl<'a> Batch<'a> {
    pub fn new(ids: &'a [i32], b: usize, t: usize) -> Self {
        Batch {
            ids,
            b,
            t,
            pos: None,
            doc: None,
        }
    }
}

/// How much of each layer's forward the backward re-runs instead of keeping (issue 8): memory
/// for time. Every mode runs the same ops on the same inputs, so the gradients are identical.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// Keep every layer's activations: the fastest backward, O(L) activation sets.
    #[default]
    None,
    /// Keep the MLP half per layer; rebuild the attention half (RMSNorm, q/k/v, RoPE, attention
    /// output and softmax statistics) from the layer input into one shared set.
    Attn,
    /// Keep only each layer's input (the residual stream); re-run the whole layer's forward into
    /// one shared set just before its backward: O(1) activation sets + L residual inputs.
    Full,
}

impl Recompute {
    pub const ALL: [Recompute; 3] = [Recompute::None, Recompute::Attn, Recompute::Full];
}

impl std::fmt::Display for Recompute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Recompute::None => "none",
            Recompute::Attn => "attn",
            Recompute::Full => "full",
        })
    }
}

impl std::str::FromStr for Recompute {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Recompute::None),
            "attn" => Ok(Recompute::Attn),
            "full" => Ok(Recompute::Full),
            _ => Err(Error::Input(format!(
                "recompute mode `{s}`: expected none, attn or full"
            ))),
        }
    }
}

/// Bytes of the training activations a model holds, summed from the buffers as allocated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ActBytes {
    /// Per-layer saved sets (L of each half, or one shared set of what is recomputed).
    pub layers: usize,
    /// The L+1 residual-stream tensors (each layer's input, and the last one's output).
    pub resid: usize,
    /// Everything else: ids, positions, the final norm, the logits, the backward's scratch.
    pub other: usize,
}

impl ActBytes {
    pub fn total(&self) -> usize {
        self.layers + self.resid + self.other
    }
}

/// The attention half of one layer's saved activations (what `attn` and `full` rebuild).
struct AttnActs<B: Backend> {
    ln1: B::Buf<B::Act>, // [n, h]
    rstd1: B::Buf<f32>,  // [n]
    q: B::Buf<B::Act>,   // [n, qd] after RoPE
    k: B::Buf<B::Act>,   // [n, kvd] after RoPE
    v: B::Buf<B::Act>,   // [n, kvd]
    att: B::Buf<B::Act>, // [n, qd] attention output, before o_proj
    lse: B::Buf<f32>,    // [n, nh] softmax log-sum-exp
}

/// The MLP half of one layer's saved activations (what `full` rebuilds).
struct MlpActs<B: Backend> {
    xmid: B::Buf<B::Act>, // [n, h] residual after attention
    ln2: B::Buf<B::Act>,  // [n, h]
    rstd2: B::Buf<f32>,   // [n]
    gate: B::Buf<B::Act>, // [n, im]
    up: B::Buf<B::Act>,   // [n, im]
    hmlp: B::Buf<B::Act>, // [n, im] SwiGLU output
}

impl<B: Backend> AttnActs<B> {
    fn alloc(al: &mut Counted<'_, B>, d: &Dims) -> Result<Self> {
        let n = d.n;
        Ok(AttnActs {
            ln1: al.alloc(n * d.h)?,
            rstd1: al.alloc(n)?,
            q: al.alloc(n * d.qd)?,
            k: al.alloc(n * d.kvd)?,
            v: al.alloc(n * d.kvd)?,
            att: al.alloc(n * d.qd)?,
            lse: al.alloc(n * d.nh)?,
        })
    }
}

impl<B: Backend> MlpActs<B> {
    fn alloc(al: &mut Counted<'_, B>, d: &Dims) -> Result<Self> {
        let n = d.n;
        Ok(MlpActs {
            xmid: al.alloc(n * d.h)?,
            ln2: al.alloc(n * d.h)?,
            rstd2: al.alloc(n)?,
            gate: al.alloc(n * d.im)?,
            up: al.alloc(n * d.im)?,
            hmlp: al.alloc(n * d.im)?,
        })
    }
}

/// Allocates through the backend and counts the bytes, so the memory report is what was allocated.
struct Counted<'a, B: Backend> {
    be: &'a B,
    bytes: usize,
}

impl<B: Backend> Counted<'_, B> {
    fn alloc<T: Elem>(&mut self, len: usize) -> Result<B::Buf<T>> {
        self.bytes += len * std::mem::size_of::<T>();
        self.be.alloc(len)
    }
    /// The bytes counted since the last call.
    fn take(&mut self) -> usize {
        std::mem::take(&mut self.bytes)
    }
}

/// Activations saved by the forward and scratch for the backward, for `cap` token rows.
struct Acts<B: Backend> {
    cap: usize,
    mode: Recompute,
    bytes: ActBytes,
    /// The layer whose activations the shared sets hold (the forward leaves the last layer's
    /// there, so its backward needs no recompute); `None` when unknown.
    held: Option<usize>,
    ids: B::Buf<i32>,
    /// The batch's ids and positions on the host, kept from the forward (capacity reused): the
    /// embedding backward groups ids there without reading them back from the device.
    ids_host: Vec<i32>,
    pos_host: Vec<i32>,
    pos: B::Buf<i32>,
    doc: B::Buf<i32>,
    targets: B::Buf<i32>,
    rows: B::Buf<i32>,
    losses: B::Buf<f32>,
    scores: B::Buf<f32>,
    resid: Vec<B::Buf<B::Act>>,
    /// L sets (`none`) or one shared set (`attn`, `full`).
    attn: Vec<AttnActs<B>>,
    /// L sets (`none`, `attn`) or one shared set (`full`).
    mlp: Vec<MlpActs<B>>,
    lnf: B::Buf<B::Act>,
    rstdf: B::Buf<f32>,
    logits: B::Buf<B::Act>,
    tmp: B::Buf<B::Act>,
    dres: B::Buf<B::Act>,
    dln: B::Buf<B::Act>,
    dq: B::Buf<B::Act>,
    dk: B::Buf<B::Act>,
    dv: B::Buf<B::Act>,
    datt: B::Buf<B::Act>,
    dh: B::Buf<B::Act>,
    dgate: B::Buf<B::Act>,
    dup: B::Buf<B::Act>,
}

/// What [`Llama::ensure_acts`] allocates through the backend for `n` token rows (what
/// [`Llama::activation_bytes`] then reports), computed without allocating, in u128 so no size
/// wraps. A unit test keeps the two equal.
pub(crate) fn act_bytes(
    c: &LlamaConfig,
    head: Head,
    mode: Recompute,
    n: usize,
    act: usize,
) -> u128 {
    let [n, h, qd, kvd, im, nh, nl, v, a] = [
        n,
        c.hidden_size,
        c.q_dim(),
        c.kv_dim(),
        c.intermediate_size,
        c.num_attention_heads,
        c.num_hidden_layers,
        c.vocab_size,
        act,
    ]
    .map(|x| x as u128);
    let attn_set = n * (h + 2 * qd + 2 * kvd) * a + n * (1 + nh) * 4;
    let mlp_set = n * (2 * h + 3 * im) * a + n * 4;
    let n_attn = if mode == Recompute::None { nl } else { 1 };
    let n_mlp = if mode == Recompute::Full { 1 } else { nl };
    let resid = (nl + 1) * n * h * a;
    let logits = if head == Head::Lm { n * v * a } else { 0 };
    // ids, pos, doc, targets, rows (i32); losses, scores, rstdf (f32); lnf, tmp, dres, dln;
    // dq, datt; dk, dv; dh, dgate, dup.
    let other = n * 8 * 4 + logits + n * (4 * h + 2 * qd + 2 * kvd + 3 * im) * a;
    n_attn * attn_set + n_mlp * mlp_set + resid + other
}

/// Layer `l`'s index into a per-layer vector that is either L long or one shared set.
fn slot<T>(sets: &[T], l: usize) -> usize {
    if sets.len() == 1 {
        0
    } else {
        l
    }
}

/// The sizes every layer op needs, read once from the config.
#[derive(Clone, Copy)]
struct Dims {
    n: usize,
    h: usize,
    qd: usize,
    kvd: usize,
    im: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    eps: f32,
    theta: f32,
    attn: AttnDims,
}

impl Dims {
    fn new(c: &LlamaConfig, b: usize, t: usize) -> Self {
        let (nh, nkv, hd) = (c.num_attention_heads, c.n_kv_heads(), c.head_dim());
        Dims {
            n: b * t,
            h: c.hidden_size,
            qd: c.q_dim(),
            kvd: c.kv_dim(),
            im: c.intermediate_size,
            nh,
            nkv,
            hd,
            eps: c.rms_norm_eps as f32,
            theta: c.rope_theta as f32,
            attn: AttnDims { b, t, nh, nkv, hd },
        }
    }
}

/// What the last forward ran on, so the backward and the loss know the shapes.
#[derive(Clone, Copy, Debug, Default)]
struct Shape {
    b: usize,
    t: usize,
    has_doc: bool,
    n_targets: usize,
    n_rows: usize,
}

/// Where the fp32 master weights are. ZeRO-1 takes them over ([`Llama::release_master`]), one
/// shard per rank; the model then reads and writes only its compute copy, and anything that
/// would write the master behind the optimizer's back must be refused, not silently lost.
pub enum Master<B: Backend> {
    /// In the model, the flat layout's `table.total` values.
    Held(B::Buf<f32>),
    /// Handed to a ZeRO-1 optimizer; the compute copy holds the weights.
    Released,
}

impl<B: Backend> Master<B> {
    /// The master buffer; an error naming who holds it once released.
    pub fn held(&self) -> Result<&B::Buf<f32>> {
        match self {
            Master::Held(m) => Ok(m),
            Master::Released => Err(Self::released_error()),
        }
    }

    pub fn held_mut(&mut self) -> Result<&mut B::Buf<f32>> {
        match self {
            Master::Held(m) => Ok(m),
            Master::Released => Err(Self::released_error()),
        }
    }

    pub fn is_released(&self) -> bool {
        matches!(self, Master::Released)
    }

    /// Values the model holds (0 once released).
    pub fn len(&self) -> usize {
        match self {
            Master::Held(m) => B::len(m),
            Master::Released => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The weights the ops read: the backend's choice between master and compute copy, or
    /// the compute copy once the master is released.
    pub fn compute<'a>(&'a self, be: &B, shadow: &'a B::Buf<B::Act>) -> B::Ref<'a, B::Act> {
        match self {
            Master::Held(m) => be.compute_weights(m, shadow),
            Master::Released => B::all(shadow),
        }
    }

    /// [`Master::compute`] for writing in place (ZeRO-1's all-gather of updated shards).
    pub fn compute_mut<'a>(
        &'a mut self,
        be: &B,
        shadow: &'a mut B::Buf<B::Act>,
    ) -> B::Mut<'a, B::Act> {
        match self {
            Master::Held(m) => be.compute_weights_mut(m, shadow),
            Master::Released => B::all_mut(shadow),
        }
    }

    fn released_error() -> Error {
        Error::Config(
            "the fp32 master weights belong to the ZeRO-1 optimizer (released from the model): \
             set weights before creating it, or load them through it"
                .into(),
        )
    }
}

pub struct Llama<B: Backend> {
    pub be: B,
    pub cfg: LlamaConfig,
    pub head: Head,
    pub table: ParamTable,
    /// fp32 master weights in the flat layout, or where they went (a ZeRO-1 optimizer).
    pub master: Master<B>,
    /// The compute copy of `master` (empty on the CPU, where the master is used directly).
    pub shadow: B::Buf<B::Act>,
    /// Gradients in the same flat layout, f32, accumulated by every backward.
    pub grads: B::Buf<f32>,
    acts: Option<Acts<B>>,
    infer: Option<InferActs<B>>,
    shape: Shape,
    recompute: Recompute,
}

/// A KV cache: per layer, keys and values of `slots` sequences × `tmax` positions × n_kv_heads ×
/// head_dim (GQA stores only the KV heads). Sequence s of a batch uses slot s.
pub struct KvCache<B: Backend> {
    pub slots: usize,
    pub tmax: usize,
    k: Vec<B::Buf<B::Act>>,
    v: Vec<B::Buf<B::Act>>,
}

impl<B: Backend> KvCache<B> {
    pub fn new(model: &Llama<B>, slots: usize, tmax: usize) -> Result<Self> {
        if tmax > model.cfg.max_position_embeddings {
            return Err(Error::Input(format!(
                "KV cache of {tmax} positions exceeds max_position_embeddings ({})",
                model.cfg.max_position_embeddings
            )));
        }
        let len = slots * tmax * model.cfg.kv_dim();
        let l = model.cfg.num_hidden_layers;
        let need = 2 * l as u128 * len as u128 * std::mem::size_of::<B::Act>() as u128;
        check_fits(&model.be, need, || {
            format!("a KV cache of {slots} sequences x {tmax} positions")
        })?;
        Ok(KvCache {
            slots,
            tmax,
            k: (0..l).map(|_| model.be.alloc(len)).collect::<Result<_>>()?,
            v: (0..l).map(|_| model.be.alloc(len)).collect::<Result<_>>()?,
        })
    }

    /// Bytes held (both caches, all layers).
    pub fn bytes(&self) -> usize {
        2 * self.k.len() * self.k.first().map(B::len).unwrap_or(0) * std::mem::size_of::<B::Act>()
    }
}

/// Scratch for inference forwards (no activations saved), for `cap` token rows.
struct InferActs<B: Backend> {
    cap: usize,
    ids: B::Buf<i32>,
    pos: B::Buf<i32>,
    cache_rows: B::Buf<i32>,
    logit_rows: B::Buf<i32>,
    /// Host staging of the cache rows, reused across calls.
    rows_host: Vec<i32>,
    /// The residual stream between layers.
    x: B::Buf<B::Act>,
    tmp: B::Buf<B::Act>,
    /// The layer halves' buffers, as the training forward has them (one set, reused by every
    /// layer; `lse` is unused: cached attention keeps no softmax statistics).
    attn: AttnActs<B>,
    mlp: MlpActs<B>,
    logits: B::Buf<B::Act>,
}

macro_rules! r {
    ($buf:expr, $len:expr) => {
        B::slice(&$buf, 0, $len)
    };
}
macro_rules! m {
    ($buf:expr, $len:expr) => {
        B::slice_mut(&mut $buf, 0, $len)
    };
}

/// The attention half of a block's forward from its input x [n, h], everything its backward
/// reads: ln1 = RMSNorm(x) [n, h]; q [n, qd], k, v [n, kvd] (RoPE on q, k); att [n, qd] and
/// lse [n, nh] from causal GQA attention. Run by the forward and again by `attn`/`full` recompute.
#[allow(clippy::too_many_arguments)]
fn attn_fwd<B: Backend>(
    be: &B,
    s: &mut AttnActs<B>,
    x: &B::Buf<B::Act>,
    pos: B::Ref<'_, i32>,
    doc: Option<B::Ref<'_, i32>>,
    lw: &LayerSpans,
    wall: B::Ref<'_, B::Act>,
    d: &Dims,
) -> Result<()> {
    qkv_fwd(be, s, x, pos, lw, wall, d)?;
    let (n, qd, kvd) = (d.n, d.qd, d.kvd);
    be.attention_fwd(
        m!(s.att, n * qd),
        m!(s.lse, n * d.nh),
        r!(s.q, n * qd),
        r!(s.k, n * kvd),
        r!(s.v, n * kvd),
        doc,
        d.attn,
    )
}

/// The attention half up to the attention itself, shared by the training forward and the
/// KV-cache forward: ln1 = RMSNorm(x), q, k, v projections, RoPE on q and k.
fn qkv_fwd<B: Backend>(
    be: &B,
    s: &mut AttnActs<B>,
    x: &B::Buf<B::Act>,
    pos: B::Ref<'_, i32>,
    lw: &LayerSpans,
    wall: B::Ref<'_, B::Act>,
    d: &Dims,
) -> Result<()> {
    let (n, h, qd, kvd) = (d.n, d.h, d.qd, d.kvd);
    let w = |s: Span| B::sub(wall, s.off, s.len);
    be.rmsnorm_fwd(
        m!(s.ln1, n * h),
        m!(s.rstd1, n),
        r!(x, n * h),
        w(lw.ln1),
        h,
        d.eps,
    )?;
    be.matmul_fwd(m!(s.q, n * qd), r!(s.ln1, n * h), w(lw.q), n, h, qd)?;
    be.matmul_fwd(m!(s.k, n * kvd), r!(s.ln1, n * h), w(lw.k), n, h, kvd)?;
    be.matmul_fwd(m!(s.v, n * kvd), r!(s.ln1, n * h), w(lw.v), n, h, kvd)?;
    be.rope_fwd(m!(s.q, n * qd), pos, d.nh, d.hd, d.theta)?;
    be.rope_fwd(m!(s.k, n * kvd), pos, d.nkv, d.hd, d.theta)
}

/// The MLP half's saved activations from the block input x [n, h] and the attention output
/// att [n, qd]: xmid = x + att·oᵀ [n, h], ln2 = RMSNorm(xmid), gate, up [n, im], hmlp =
/// SwiGLU(gate, up) [n, im]. Stops before the down projection, which the backward never reads.
#[allow(clippy::too_many_arguments)]
fn mlp_fwd<B: Backend>(
    be: &B,
    s: &mut MlpActs<B>,
    tmp: &mut B::Buf<B::Act>,
    x: &B::Buf<B::Act>,
    att: &B::Buf<B::Act>,
    lw: &LayerSpans,
    wall: B::Ref<'_, B::Act>,
    d: &Dims,
) -> Result<()> {
    let (n, h, qd, im) = (d.n, d.h, d.qd, d.im);
    let w = |s: Span| B::sub(wall, s.off, s.len);
    be.matmul_fwd(m!(*tmp, n * h), r!(att, n * qd), w(lw.o), n, qd, h)?;
    be.add(m!(s.xmid, n * h), r!(x, n * h), r!(*tmp, n * h))?;
    be.rmsnorm_fwd(
        m!(s.ln2, n * h),
        m!(s.rstd2, n),
        r!(s.xmid, n * h),
        w(lw.ln2),
        h,
        d.eps,
    )?;
    be.matmul_fwd(m!(s.gate, n * im), r!(s.ln2, n * h), w(lw.gate), n, h, im)?;
    be.matmul_fwd(m!(s.up, n * im), r!(s.ln2, n * h), w(lw.up), n, h, im)?;
    be.swiglu_fwd(m!(s.hmlp, n * im), r!(s.gate, n * im), r!(s.up, n * im))
}

impl<B: Backend> Llama<B> {
    /// A model with zeroed parameters (load or initialise them next).
    pub fn new(be: B, cfg: LlamaConfig, head: Head) -> Result<Self> {
        cfg.validate()?;
        let n = cfg.checked_num_params().unwrap_or(usize::MAX) as u128;
        // f32 master and gradients, a compute copy where the backend computes in a narrower
        // type (CUDA's bf16), and the table's names and shapes (~1 KiB a layer): checked before
        // the table is built, so a config of 10^12 layers is an error, not a growing process.
        let act = std::mem::size_of::<B::Act>() as u128;
        let shadow = if act < 4 { act } else { 0 };
        let need = n * (8 + shadow) + cfg.num_hidden_layers as u128 * 1024;
        check_fits(&be, need, || {
            format!(
                "the model's weights and gradients ({n} parameters, {} layers)",
                cfg.num_hidden_layers
            )
        })?;
        let table = ParamTable::llama(&cfg, head);
        let master = be.alloc::<f32>(table.total)?;
        let shadow = be.alloc_shadow(table.total)?;
        let grads = be.alloc::<f32>(table.total)?;
        Ok(Llama {
            be,
            cfg,
            head,
            table,
            master: Master::Held(master),
            shadow,
            grads,
            acts: None,
            infer: None,
            shape: Shape::default(),
            recompute: Recompute::None,
        })
    }

    /// Hugging Face's initialisation: normal(0, 0.02) for matrices, ones for norm gains.
    pub fn init_random(&mut self, seed: u64) -> Result<()> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let normal = Normal::new(0.0f32, 0.02).expect("valid normal");
        let mut host = vec![0f32; self.table.total];
        for e in &self.table.entries {
            let dst = &mut host[e.span.off..e.span.off + e.span.len];
            if e.shape.len() == 1 {
                dst.fill(1.0);
            } else {
                dst.iter_mut().for_each(|x| *x = normal.sample(&mut rng));
            }
        }
        self.set_params(&host)
    }

    /// Gives the model a compute copy of its weights separate from the fp32 master where the
    /// backend computes from the master itself (the CPU), so the CPU runs CUDA's data flow
    /// (master beside a compute copy; ZeRO-1 releasing the master) in tests. A no-op where there
    /// is one already.
    pub fn separate_compute_copy(&mut self) -> Result<()> {
        if B::len(&self.shadow) == 0 {
            self.shadow = self.be.alloc::<B::Act>(self.table.total)?;
            self.be.sync_shadow(&mut self.shadow, self.master.held()?)?;
        }
        Ok(())
    }

    /// Frees the full fp32 master where the compute weights are a separate copy (CUDA's bf16
    /// shadow), because a ZeRO-1 optimizer now owns the master, one shard per rank: on 8 ranks
    /// that takes a 7B model from 16 to 5.5 bytes per parameter before activations. Returns
    /// whether it did; where the master is the compute weights (the CPU) it stays. Afterwards
    /// the weights are read from the compute copy and may only be set through the optimizer.
    pub fn release_master(&mut self) -> Result<bool> {
        if self.master_released() {
            return Ok(true);
        }
        if B::len(&self.shadow) != self.table.total || self.table.total == 0 {
            return Ok(false);
        }
        self.master = Master::Released;
        Ok(true)
    }

    /// Whether [`Llama::release_master`] freed the fp32 master.
    pub fn master_released(&self) -> bool {
        self.master.is_released()
    }

    /// Replaces every parameter from a host array in the flat layout.
    pub fn set_params(&mut self, host: &[f32]) -> Result<()> {
        if host.len() != self.table.total {
            return Err(Error::Shape(format!(
                "parameter array has {} values, the model needs {}",
                host.len(),
                self.table.total
            )));
        }
        let master = self.master.held_mut()?;
        self.be.from_host(B::all_mut(master), host)?;
        self.be.sync_shadow(&mut self.shadow, master)
    }

    /// The weights in the flat layout: the fp32 master, or, once a ZeRO-1 optimizer holds it
    /// ([`Llama::release_master`]), the compute copy (bf16 values on CUDA).
    pub fn params_to_host(&self) -> Result<Vec<f32>> {
        match &self.master {
            Master::Held(m) => {
                let mut v = vec![0f32; self.table.total];
                self.be.to_host(&mut v, B::all(m))?;
                Ok(v)
            }
            Master::Released => {
                let w = self.master.compute(&self.be, &self.shadow);
                self.be.to_host_f32(w, self.table.total)
            }
        }
    }

    pub fn grads_to_host(&self) -> Result<Vec<f32>> {
        let mut v = vec![0f32; self.table.total];
        self.be.to_host(&mut v, B::all(&self.grads))?;
        Ok(v)
    }

    pub fn zero_grads(&mut self) -> Result<()> {
        self.be.zero(B::all_mut(&mut self.grads))
    }

    pub fn num_params(&self) -> usize {
        self.table.total
    }

    /// Sets how much of each layer the backward recomputes. A different mode frees the saved
    /// activations (the next forward allocates the new layout), so call it between steps.
    pub fn set_recompute(&mut self, mode: Recompute) {
        if mode != self.recompute {
            self.recompute = mode;
            self.acts = None;
            self.shape = Shape::default();
        }
    }

    pub fn recompute(&self) -> Recompute {
        self.recompute
    }

    /// Allocates the training activations for `b`×`t` tokens in the current recompute mode (as
    /// the first forward of that size would) and returns what the model then holds.
    pub fn reserve_activations(&mut self, b: usize, t: usize) -> Result<ActBytes> {
        self.ensure_acts(b * t)?;
        Ok(self.activation_bytes())
    }

    /// Bytes of the training activations held now (zero before the first forward).
    pub fn activation_bytes(&self) -> ActBytes {
        self.acts.as_ref().map(|a| a.bytes).unwrap_or_default()
    }

    fn ensure_acts(&mut self, n: usize) -> Result<()> {
        let mode = self.recompute;
        if self
            .acts
            .as_ref()
            .is_some_and(|a| a.cap >= n && a.mode == mode)
        {
            return Ok(());
        }
        self.acts = None; // free the old set before allocating the larger one
                          // The backend's buffers and the host copies of ids and positions.
        let need = act_bytes(&self.cfg, self.head, mode, n, std::mem::size_of::<B::Act>())
            + 2 * n as u128 * 4;
        check_fits(&self.be, need, || {
            format!("training activations for {n} token rows (recompute {mode})")
        })?;
        let c = &self.cfg;
        let (h, qd, kvd, im) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let nl = c.num_hidden_layers;
        let mut al = Counted {
            be: &self.be,
            bytes: 0,
        };
        // Per-layer sets: L of each half, or one shared set of the half that is recomputed.
        let n_attn = if mode == Recompute::None { nl } else { 1 };
        let n_mlp = if mode == Recompute::Full { 1 } else { nl };
        let dims = Dims::new(c, 1, n);
        let attn = (0..n_attn)
            .map(|_| AttnActs::alloc(&mut al, &dims))
            .collect::<Result<Vec<_>>>()?;
        let mlp = (0..n_mlp)
            .map(|_| MlpActs::alloc(&mut al, &dims))
            .collect::<Result<Vec<_>>>()?;
        let layers = al.take();
        let resid = (0..=nl).map(|_| al.alloc(n * h)).collect::<Result<_>>()?;
        let resid_bytes = al.take();
        let logits_len = if self.head == Head::Lm {
            n * c.vocab_size
        } else {
            0
        };
        let mut acts = Acts {
            cap: n,
            mode,
            bytes: ActBytes::default(),
            held: None,
            ids: al.alloc(n)?,
            ids_host: Vec::with_capacity(n),
            pos_host: Vec::with_capacity(n),
            pos: al.alloc(n)?,
            doc: al.alloc(n)?,
            targets: al.alloc(n)?,
            rows: al.alloc(n)?,
            losses: al.alloc(n)?,
            scores: al.alloc(n)?,
            resid,
            attn,
            mlp,
            lnf: al.alloc(n * h)?,
            rstdf: al.alloc(n)?,
            logits: al.alloc(logits_len)?,
            tmp: al.alloc(n * h)?,
            dres: al.alloc(n * h)?,
            dln: al.alloc(n * h)?,
            dq: al.alloc(n * qd)?,
            dk: al.alloc(n * kvd)?,
            dv: al.alloc(n * kvd)?,
            datt: al.alloc(n * qd)?,
            dh: al.alloc(n * im)?,
            dgate: al.alloc(n * im)?,
            dup: al.alloc(n * im)?,
        };
        acts.bytes = ActBytes {
            layers,
            resid: resid_bytes,
            other: al.take(),
        };
        self.acts = Some(acts);
        Ok(())
    }

    fn check_batch(&self, batch: &Batch) -> Result<()> {
        let n = batch.b * batch.t;
        if n == 0 {
            return Err(Error::Input("empty batch".into()));
        }
        if batch.ids.len() != n {
            return Err(Error::Shape(format!(
                "batch has {} ids, expected b*t = {}*{} = {n}",
                batch.ids.len(),
                batch.b,
                batch.t
            )));
        }
        if batch.t > self.cfg.max_position_embeddings {
            return Err(Error::Input(format!(
                "sequence length {} exceeds the model's max_position_embeddings ({})",
                batch.t, self.cfg.max_position_embeddings
            )));
        }
        let v = self.cfg.vocab_size as i32;
        if let Some((i, &id)) = batch
            .ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id < 0 || id >= v)
        {
            return Err(Error::Input(format!(
                "token id {id} at position {i} is outside the vocabulary (0..{v})"
            )));
        }
        for (what, x) in [("pos", batch.pos), ("doc", batch.doc)] {
            if let Some(x) = x {
                if x.len() != n {
                    return Err(Error::Shape(format!(
                        "batch.{what} has {} values, expected {n}",
                        x.len()
                    )));
                }
            }
        }
        if let Some(p) = batch.pos {
            if let Some(&bad) = p.iter().find(|&&p| p < 0) {
                return Err(Error::Input(format!("negative position {bad}")));
            }
        }
        Ok(())
    }

    /// Runs the forward pass up to the logits (LM head) or the final hidden state (score head).
    pub fn forward(&mut self, batch: &Batch) -> Result<()> {
        self.check_batch(batch)?;
        let (b, t) = (batch.b, batch.t);
        let n = b * t;
        self.ensure_acts(n)?;
        self.shape = Shape {
            b,
            t,
            has_doc: batch.doc.is_some(),
            n_targets: 0,
            n_rows: 0,
        };
        let d = Dims::new(&self.cfg, b, t);
        let (h, im, v) = (d.h, d.im, self.cfg.vocab_size);
        let be = &self.be;
        let tab = &self.table;
        let a = self.acts.as_mut().expect("acts allocated");
        let wall = self.master.compute(be, &self.shadow);
        let w = |s: Span| B::sub(wall, s.off, s.len);

        a.held = None;
        be.from_host(m!(a.ids, n), batch.ids)?;
        a.ids_host.clear();
        a.ids_host.extend_from_slice(batch.ids);
        match batch.pos {
            Some(p) => be.from_host(m!(a.pos, n), p)?,
            None => {
                a.pos_host.clear();
                a.pos_host.extend((0..n).map(|i| (i % t) as i32));
                be.from_host(m!(a.pos, n), &a.pos_host)?
            }
        }
        if let Some(d) = batch.doc {
            be.from_host(m!(a.doc, n), d)?;
        }
        be.embedding_fwd(m!(a.resid[0], n * h), r!(a.ids, n), w(tab.embed), h)?;
        for (l, lw) in tab.layers.iter().enumerate() {
            let (prev, rest) = a.resid.split_at_mut(l + 1);
            let (x, out) = (&prev[l], &mut rest[0]);
            let doc = batch.doc.is_some().then(|| r!(a.doc, n));
            let sa = slot(&a.attn, l);
            let sm = slot(&a.mlp, l);
            let (sa, sm) = (&mut a.attn[sa], &mut a.mlp[sm]);
            attn_fwd(be, sa, x, r!(a.pos, n), doc, lw, wall, &d)?;
            mlp_fwd(be, sm, &mut a.tmp, x, &sa.att, lw, wall, &d)?;
            // out = xmid + hmlp · downᵀ: [n, im] → [n, h]
            be.matmul_fwd(m!(a.tmp, n * h), r!(sm.hmlp, n * im), w(lw.down), n, im, h)?;
            be.add(m!(*out, n * h), r!(sm.xmid, n * h), r!(a.tmp, n * h))?;
        }
        a.held = tab.layers.len().checked_sub(1);
        let last = &a.resid[tab.layers.len()];
        be.rmsnorm_fwd(
            m!(a.lnf, n * h),
            m!(a.rstdf, n),
            r!(last, n * h),
            w(tab.norm),
            h,
            d.eps,
        )?;
        if let Some(lm) = tab.lm_head {
            be.matmul_fwd(m!(a.logits, n * v), r!(a.lnf, n * h), w(lm), n, h, v)?;
        }
        Ok(())
    }

    fn ensure_infer(&mut self, n: usize) -> Result<()> {
        if self.infer.as_ref().is_some_and(|a| a.cap >= n) {
            return Ok(());
        }
        self.infer = None;
        let d = Dims::new(&self.cfg, 1, n);
        let mut al = Counted {
            be: &self.be,
            bytes: 0,
        };
        self.infer = Some(InferActs {
            cap: n,
            ids: al.alloc(n)?,
            pos: al.alloc(n)?,
            cache_rows: al.alloc(n)?,
            logit_rows: al.alloc(n)?,
            rows_host: Vec::with_capacity(n),
            x: al.alloc(n * d.h)?,
            tmp: al.alloc(n * d.h)?,
            attn: AttnActs::alloc(&mut al, &d)?,
            mlp: MlpActs::alloc(&mut al, &d)?,
            logits: al.alloc(n * self.cfg.vocab_size)?,
        });
        Ok(())
    }

    /// An inference forward through a KV cache: `ids` is [b, tq] (sequence s in cache slot s),
    /// `pos` the absolute position of every token. New keys/values are written into the cache,
    /// each query attends its sequence's positions up to its own. Returns the logits of the rows
    /// in `logit_rows` (indices into the b·tq tokens), [len, V] on the host.
    pub fn forward_cached(
        &mut self,
        cache: &mut KvCache<B>,
        ids: &[i32],
        pos: &[i32],
        b: usize,
        tq: usize,
        logit_rows: &[i32],
    ) -> Result<Vec<f32>> {
        let n = b * tq;
        if self.head != Head::Lm {
            return Err(Error::Input(
                "cached generation needs an LM-head model".into(),
            ));
        }
        if ids.len() != n || pos.len() != n || n == 0 {
            return Err(Error::Shape(format!(
                "{} ids and {} positions for b*tq = {n}",
                ids.len(),
                pos.len()
            )));
        }
        if b > cache.slots {
            return Err(Error::Shape(format!(
                "batch of {b} sequences for a cache of {} slots",
                cache.slots
            )));
        }
        let v = self.cfg.vocab_size;
        if let Some(&bad) = ids.iter().find(|&&x| x < 0 || x as usize >= v) {
            return Err(Error::Input(format!(
                "token id {bad} is outside the vocabulary (0..{v})"
            )));
        }
        if let Some(&bad) = pos.iter().find(|&&p| p < 0 || p as usize >= cache.tmax) {
            return Err(Error::Input(format!(
                "position {bad} is outside the KV cache (0..{})",
                cache.tmax
            )));
        }
        let m = logit_rows.len();
        if m == 0 || logit_rows.iter().any(|&r| r < 0 || r as usize >= n) {
            return Err(Error::Input(format!("logit rows must be in 0..{n}")));
        }
        self.ensure_infer(n)?;
        let c = &self.cfg;
        let d = Dims::new(c, b, tq);
        let (h, qd, kvd, im) = (d.h, d.qd, d.kvd, d.im);
        let dims = CacheDims {
            b,
            tq,
            tmax: cache.tmax,
            nh: d.nh,
            nkv: d.nkv,
            hd: d.hd,
        };
        let be = &self.be;
        let tab = &self.table;
        let a = self.infer.as_mut().expect("allocated");
        let wall = self.master.compute(be, &self.shadow);
        let w = |s: Span| B::sub(wall, s.off, s.len);
        a.rows_host.clear();
        a.rows_host
            .extend((0..n).map(|r| ((r / tq) * cache.tmax) as i32 + pos[r]));
        be.from_host(m!(a.ids, n), ids)?;
        be.from_host(m!(a.pos, n), pos)?;
        be.from_host(m!(a.cache_rows, n), &a.rows_host)?;
        be.from_host(m!(a.logit_rows, m), logit_rows)?;
        be.embedding_fwd(m!(a.x, n * h), r!(a.ids, n), w(tab.embed), h)?;
        let (sa, sm) = (&mut a.attn, &mut a.mlp);
        for (l, lw) in tab.layers.iter().enumerate() {
            qkv_fwd(be, sa, &a.x, r!(a.pos, n), lw, wall, &d)?;
            be.scatter_rows(
                B::all_mut(&mut cache.k[l]),
                r!(sa.k, n * kvd),
                r!(a.cache_rows, n),
                kvd,
            )?;
            be.scatter_rows(
                B::all_mut(&mut cache.v[l]),
                r!(sa.v, n * kvd),
                r!(a.cache_rows, n),
                kvd,
            )?;
            be.attention_cached(
                m!(sa.att, n * qd),
                r!(sa.q, n * qd),
                B::all(&cache.k[l]),
                B::all(&cache.v[l]),
                r!(a.pos, n),
                dims,
            )?;
            mlp_fwd(be, sm, &mut a.tmp, &a.x, &sa.att, lw, wall, &d)?;
            // x = xmid + hmlp · downᵀ, as the training forward's residual
            be.matmul_fwd(m!(a.tmp, n * h), r!(sm.hmlp, n * im), w(lw.down), n, im, h)?;
            be.add(m!(a.x, n * h), r!(sm.xmid, n * h), r!(a.tmp, n * h))?;
        }
        // Only the requested rows go through the final norm and the LM head.
        let (rows, ln, rstd) = (&mut sm.xmid, &mut sm.ln2, &mut sm.rstd2);
        be.gather_rows(m!(*rows, m * h), r!(a.x, n * h), r!(a.logit_rows, m), h)?;
        be.rmsnorm_fwd(
            m!(*ln, m * h),
            m!(*rstd, m),
            r!(*rows, m * h),
            w(tab.norm),
            h,
            d.eps,
        )?;
        let lm = tab.lm_head.expect("LM head");
        be.matmul_fwd(m!(a.logits, m * v), r!(*ln, m * h), w(lm), m, h, v)?;
        be.to_host_f32(r!(a.logits, m * v), m * v)
    }

    /// The logits of the last forward, [b, t, V], as f32 on the host.
    pub fn logits_to_host(&self) -> Result<Vec<f32>> {
        let a = self
            .acts
            .as_ref()
            .ok_or_else(|| Error::Input("no forward has run".into()))?;
        if self.head != Head::Lm {
            return Err(Error::Input("a score-head model has no logits".into()));
        }
        let len = self.shape.b * self.shape.t * self.cfg.vocab_size;
        self.be.to_host_f32(r!(a.logits, len), len)
    }

    /// The final hidden state after `model.norm`, [b, t, H], as f32 on the host.
    pub fn hidden_to_host(&self) -> Result<Vec<f32>> {
        let a = self
            .acts
            .as_ref()
            .ok_or_else(|| Error::Input("no forward has run".into()))?;
        let len = self.shape.b * self.shape.t * self.cfg.hidden_size;
        self.be.to_host_f32(r!(a.lnf, len), len)
    }

    /// Per-row cross-entropy of the last forward's logits against `targets` ([b, t], already
    /// shifted: target[t] is the token after position t; negative = ignored). Returns the mean
    /// over counted targets and their number.
    pub fn lm_loss(&mut self, targets: &[i32]) -> Result<(f32, usize)> {
        let n = self.shape.b * self.shape.t;
        if self.head != Head::Lm || self.acts.is_none() || n == 0 {
            return Err(Error::Input(
                "lm_loss needs a forward of an LM-head model first".into(),
            ));
        }
        if targets.len() != n {
            return Err(Error::Shape(format!(
                "{} targets for {n} positions",
                targets.len()
            )));
        }
        let v = self.cfg.vocab_size as i32;
        if let Some((i, &tg)) = targets.iter().enumerate().find(|(_, &x)| x >= v) {
            return Err(Error::Input(format!(
                "target {tg} at position {i} is outside the vocabulary (0..{v})"
            )));
        }
        let count = targets.iter().filter(|&&x| x >= 0).count();
        let a = self.acts.as_mut().expect("checked");
        self.be.from_host(m!(a.targets, n), targets)?;
        self.be.cross_entropy_fwd(
            m!(a.losses, n),
            r!(a.logits, n * v as usize),
            r!(a.targets, n),
            v as usize,
        )?;
        let sum = self.be.sum(r!(a.losses, n))?;
        self.shape.n_targets = n;
        Ok(((sum / count.max(1) as f64) as f32, count))
    }

    /// Backward of `scale · Σ losses` from the last `lm_loss` (scale = 1/count gives the mean).
    /// Overwrites the logits with their gradient. Gradients accumulate into `grads`.
    pub fn backward_lm(&mut self, scale: f32) -> Result<()> {
        self.backward_lm_with(scale, None)
    }

    /// [`Llama::backward_lm`], telling `sink` as gradients become final.
    pub fn backward_lm_with(
        &mut self,
        scale: f32,
        sink: Option<&mut dyn GradReady<B>>,
    ) -> Result<()> {
        let n = self.shape.b * self.shape.t;
        if self.shape.n_targets != n || n == 0 {
            return Err(Error::Input(
                "backward_lm needs forward and lm_loss first".into(),
            ));
        }
        let v = self.cfg.vocab_size;
        {
            let be = &self.be;
            let a = self.acts.as_mut().expect("acts");
            be.cross_entropy_bwd(m!(a.logits, n * v), r!(a.targets, n), v, scale)?;
        }
        self.backward_from_dlogits(sink)
    }

    /// Tells `sink` what a backward would, at the same points, without one: for a
    /// data-parallel rank with nothing to backpropagate this step, so its bucket reductions
    /// stay in step with the other ranks' (its gradients are reduced as they stand).
    pub fn report_grads(&self, sink: &mut dyn GradReady<B>) -> Result<()> {
        let g = B::all(&self.grads);
        sink.ready(g, self.table.norm.off)?;
        for l in self.table.layers.iter().rev() {
            sink.ready(g, l.ln1.off)?;
        }
        sink.ready(g, self.table.embed.off)
    }

    /// Scores w·h[row] of the score head at the given global rows (b·t + position).
    pub fn scores(&mut self, rows: &[i32]) -> Result<Vec<f32>> {
        let n = self.shape.b * self.shape.t;
        let score = self
            .table
            .score
            .ok_or_else(|| Error::Input("scores need a score-head model".into()))?;
        if self.acts.is_none() || n == 0 {
            return Err(Error::Input("scores need a forward first".into()));
        }
        if rows.is_empty() || rows.len() > n {
            return Err(Error::Shape(format!(
                "{} score rows for {n} positions",
                rows.len()
            )));
        }
        if let Some(&bad) = rows.iter().find(|&&r| r < 0 || r as usize >= n) {
            return Err(Error::Input(format!("score row {bad} outside 0..{n}")));
        }
        let h = self.cfg.hidden_size;
        let k = rows.len();
        let be = &self.be;
        let a = self.acts.as_mut().expect("checked");
        let wall = self.master.compute(be, &self.shadow);
        be.from_host(m!(a.rows, k), rows)?;
        be.scalar_head_fwd(
            m!(a.scores, k),
            r!(a.lnf, n * h),
            B::sub(wall, score.off, score.len),
            r!(a.rows, k),
            h,
        )?;
        let mut out = vec![0f32; k];
        be.to_host(&mut out, r!(a.scores, k))?;
        self.shape.n_rows = k;
        Ok(out)
    }

    /// Backward from d(loss)/d(score) at the rows of the last `scores` call.
    pub fn backward_scores(&mut self, dscores: &[f32]) -> Result<()> {
        self.backward_scores_with(dscores, None)
    }

    /// [`Llama::backward_scores`], telling `sink` as gradients become final.
    pub fn backward_scores_with(
        &mut self,
        dscores: &[f32],
        sink: Option<&mut dyn GradReady<B>>,
    ) -> Result<()> {
        let k = self.shape.n_rows;
        if k == 0 || dscores.len() != k {
            return Err(Error::Shape(format!(
                "{} score gradients for {k} scored rows (call scores first)",
                dscores.len()
            )));
        }
        let n = self.shape.b * self.shape.t;
        let h = self.cfg.hidden_size;
        let score = self.table.score.expect("score head");
        {
            let be = &self.be;
            let a = self.acts.as_mut().expect("acts");
            let wall = self.master.compute(be, &self.shadow);
            be.from_host(m!(a.scores, k), dscores)?;
            be.zero(m!(a.dln, n * h))?;
            be.scalar_head_bwd(
                m!(a.dln, n * h),
                B::slice_mut(&mut self.grads, score.off, score.len),
                r!(a.scores, k),
                r!(a.lnf, n * h),
                B::sub(wall, score.off, score.len),
                r!(a.rows, k),
                h,
            )?;
        }
        self.backward_from_dlnf(sink)
    }

    /// The LM head's backward from d(logits), held in the logits buffer, then the trunk's.
    fn backward_from_dlogits(&mut self, sink: Option<&mut dyn GradReady<B>>) -> Result<()> {
        let n = self.shape.b * self.shape.t;
        let (h, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let lm = self.table.lm_head.expect("LM head");
        {
            let be = &self.be;
            let a = self.acts.as_mut().expect("acts");
            let wall = self.master.compute(be, &self.shadow);
            be.matmul_bwd_weight(
                B::slice_mut(&mut self.grads, lm.off, lm.len),
                r!(a.logits, n * v),
                r!(a.lnf, n * h),
                n,
                h,
                v,
            )?;
            be.matmul_bwd_data(
                m!(a.dln, n * h),
                r!(a.logits, n * v),
                B::sub(wall, lm.off, lm.len),
                n,
                h,
                v,
                false,
            )?;
        }
        self.shape.n_targets = 0; // the logits are gone
        self.backward_from_dlnf(sink)
    }

    /// The shared trunk of the backward: from d(final norm output) in `dln` to every parameter.
    /// Layer by layer in reverse; under `attn`/`full` a layer's recomputed half is rebuilt from
    /// its saved input just before its backward reads it.
    fn backward_from_dlnf(&mut self, mut sink: Option<&mut dyn GradReady<B>>) -> Result<()> {
        let (b, t, has_doc) = (self.shape.b, self.shape.t, self.shape.has_doc);
        let d = Dims::new(&self.cfg, b, t);
        let (n, h, qd, kvd, im, nh) = (d.n, d.h, d.qd, d.kvd, d.im, d.nh);
        let be = &self.be;
        let tab = &self.table;
        let a = self.acts.as_mut().expect("acts");
        let wall = self.master.compute(be, &self.shadow);
        let w = |s: Span| B::sub(wall, s.off, s.len);
        let grads = &mut self.grads;
        macro_rules! g {
            ($s:expr) => {
                B::slice_mut(grads, $s.off, $s.len)
            };
        }
        // grads[from..] are final: tell the sink (a data-parallel bucket may start reducing).
        macro_rules! ready {
            ($from:expr) => {
                if let Some(s) = sink.as_deref_mut() {
                    s.ready(B::all(&*grads), $from)?;
                }
            };
        }
        let nl = tab.layers.len();
        be.zero(m!(a.dres, n * h))?;
        be.rmsnorm_bwd(
            m!(a.dres, n * h),
            g!(tab.norm),
            r!(a.dln, n * h),
            r!(a.resid[nl], n * h),
            w(tab.norm),
            r!(a.rstdf, n),
            h,
        )?;
        ready!(tab.norm.off);
        for l in (0..nl).rev() {
            let lw = &tab.layers[l];
            let doc = has_doc.then(|| r!(a.doc, n));
            let (ia, im_) = (slot(&a.attn, l), slot(&a.mlp, l));
            // Rebuild this layer's shared sets from its input resid[l] (`tmp` is free here).
            if a.mode != Recompute::None && a.held != Some(l) {
                let x = &a.resid[l];
                attn_fwd(be, &mut a.attn[ia], x, r!(a.pos, n), doc, lw, wall, &d)?;
                if a.mode == Recompute::Full {
                    let att = &a.attn[ia].att;
                    mlp_fwd(be, &mut a.mlp[im_], &mut a.tmp, x, att, lw, wall, &d)?;
                }
                a.held = Some(l);
            }
            let (la, lm) = (&a.attn[ia], &a.mlp[im_]);
            // MLP block: dres is d(block output) [n, h].
            be.matmul_bwd_weight(
                g!(lw.down),
                r!(a.dres, n * h),
                r!(lm.hmlp, n * im),
                n,
                im,
                h,
            )?;
            be.matmul_bwd_data(
                m!(a.dh, n * im),
                r!(a.dres, n * h),
                w(lw.down),
                n,
                im,
                h,
                false,
            )?;
            be.swiglu_bwd(
                m!(a.dgate, n * im),
                m!(a.dup, n * im),
                r!(a.dh, n * im),
                r!(lm.gate, n * im),
                r!(lm.up, n * im),
            )?;
            be.matmul_bwd_weight(
                g!(lw.gate),
                r!(a.dgate, n * im),
                r!(lm.ln2, n * h),
                n,
                h,
                im,
            )?;
            be.matmul_bwd_weight(g!(lw.up), r!(a.dup, n * im), r!(lm.ln2, n * h), n, h, im)?;
            be.matmul_bwd_data(
                m!(a.dln, n * h),
                r!(a.dgate, n * im),
                w(lw.gate),
                n,
                h,
                im,
                false,
            )?;
            be.matmul_bwd_data(
                m!(a.dln, n * h),
                r!(a.dup, n * im),
                w(lw.up),
                n,
                h,
                im,
                true,
            )?;
            be.rmsnorm_bwd(
                m!(a.dres, n * h),
                g!(lw.ln2),
                r!(a.dln, n * h),
                r!(lm.xmid, n * h),
                w(lw.ln2),
                r!(lm.rstd2, n),
                h,
            )?;
            // Attention block: dres is d(xmid) [n, h].
            be.matmul_bwd_weight(g!(lw.o), r!(a.dres, n * h), r!(la.att, n * qd), n, qd, h)?;
            be.matmul_bwd_data(
                m!(a.datt, n * qd),
                r!(a.dres, n * h),
                w(lw.o),
                n,
                qd,
                h,
                false,
            )?;
            be.attention_bwd(
                m!(a.dq, n * qd),
                m!(a.dk, n * kvd),
                m!(a.dv, n * kvd),
                r!(a.datt, n * qd),
                r!(la.q, n * qd),
                r!(la.k, n * kvd),
                r!(la.v, n * kvd),
                r!(la.att, n * qd),
                r!(la.lse, n * nh),
                doc,
                d.attn,
            )?;
            be.rope_bwd(m!(a.dq, n * qd), r!(a.pos, n), nh, d.hd, d.theta)?;
            be.rope_bwd(m!(a.dk, n * kvd), r!(a.pos, n), d.nkv, d.hd, d.theta)?;
            be.matmul_bwd_weight(g!(lw.q), r!(a.dq, n * qd), r!(la.ln1, n * h), n, h, qd)?;
            be.matmul_bwd_weight(g!(lw.k), r!(a.dk, n * kvd), r!(la.ln1, n * h), n, h, kvd)?;
            be.matmul_bwd_weight(g!(lw.v), r!(a.dv, n * kvd), r!(la.ln1, n * h), n, h, kvd)?;
            be.matmul_bwd_data(m!(a.dln, n * h), r!(a.dq, n * qd), w(lw.q), n, h, qd, false)?;
            be.matmul_bwd_data(
                m!(a.dln, n * h),
                r!(a.dk, n * kvd),
                w(lw.k),
                n,
                h,
                kvd,
                true,
            )?;
            be.matmul_bwd_data(
                m!(a.dln, n * h),
                r!(a.dv, n * kvd),
                w(lw.v),
                n,
                h,
                kvd,
                true,
            )?;
            be.rmsnorm_bwd(
                m!(a.dres, n * h),
                g!(lw.ln1),
                r!(a.dln, n * h),
                r!(a.resid[l], n * h),
                w(lw.ln1),
                r!(la.rstd1, n),
                h,
            )?;
            ready!(lw.ln1.off);
        }
        be.embedding_bwd(
            g!(tab.embed),
            r!(a.dres, n * h),
            r!(a.ids, n),
            &a.ids_host,
            h,
        )?;
        ready!(tab.embed.off);
        Ok(())
    }
}

/// HF's shift: the target of position t is the label at t+1; the last position predicts nothing.
pub fn shift_labels(labels: &[i32], b: usize, t: usize) -> Vec<i32> {
    let mut out = vec![-100; b * t];
    for bi in 0..b {
        for ti in 0..t.saturating_sub(1) {
            out[bi * t + ti] = labels[bi * t + ti + 1];
        }
    }
    out
}

/// For tests and tools: the element type of the backend's activations.
pub fn act_name<B: Backend>() -> &'static str {
    <B::Act as crate::elem::Elem>::NAME
}

#[allow(dead_code)]
fn _assert_float<F: Float>() {}

/// Policy-gradient heads over the last forward's logits (PPO): per-token log-probabilities of
/// given targets, and the backward of a weighted sum of them.
impl<B: Backend> Llama<B> {
    /// Log-probability of every target under the last forward's logits, and the entropy of each
    /// position's distribution. `targets` is [b, t], already shifted as in [`Llama::lm_loss`]
    /// (target[t] is the token after position t); negative targets give 0 for both. Keeps the
    /// targets for [`Llama::backward_logprobs`].
    pub fn token_logprobs(&mut self, targets: &[i32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let n = self.shape.b * self.shape.t;
        if self.head != Head::Lm || self.acts.is_none() || n == 0 {
            return Err(Error::Input(
                "token_logprobs needs a forward of an LM-head model first".into(),
            ));
        }
        if targets.len() != n {
            return Err(Error::Shape(format!(
                "{} targets for {n} positions",
                targets.len()
            )));
        }
        let v = self.cfg.vocab_size;
        if let Some((i, &tg)) = targets.iter().enumerate().find(|(_, &x)| x >= v as i32) {
            return Err(Error::Input(format!(
                "target {tg} at position {i} is outside the vocabulary (0..{v})"
            )));
        }
        let be = &self.be;
        let a = self.acts.as_mut().expect("checked");
        be.from_host(m!(a.targets, n), targets)?;
        // `losses` and `scores` are free scratch on an LM-head model between steps.
        be.logprob_fwd(
            m!(a.losses, n),
            m!(a.scores, n),
            r!(a.logits, n * v),
            r!(a.targets, n),
            v,
        )?;
        let (mut logp, mut ent) = (vec![0f32; n], vec![0f32; n]);
        be.to_host(&mut logp, r!(a.losses, n))?;
        be.to_host(&mut ent, r!(a.scores, n))?;
        self.shape.n_targets = n;
        Ok((logp, ent))
    }

    /// Backward of `Σ_n weights[n] · logp_n` for the targets of the last `token_logprobs`
    /// (weights [b, t]; a policy-gradient loss passes −advantage-like weights). Overwrites the
    /// logits with their gradient; gradients accumulate into `grads`. With every counted weight
    /// −1/count this is `backward_lm(1/count)`.
    pub fn backward_logprobs(&mut self, weights: &[f32]) -> Result<()> {
        self.backward_logprobs_with(weights, None)
    }

    /// [`Llama::backward_logprobs`], telling `sink` as gradients become final.
    pub fn backward_logprobs_with(
        &mut self,
        weights: &[f32],
        sink: Option<&mut dyn GradReady<B>>,
    ) -> Result<()> {
        let n = self.shape.b * self.shape.t;
        if self.shape.n_targets != n || n == 0 {
            return Err(Error::Input(
                "backward_logprobs needs forward and token_logprobs first".into(),
            ));
        }
        if weights.len() != n {
            return Err(Error::Shape(format!(
                "{} weights for {n} positions",
                weights.len()
            )));
        }
        let v = self.cfg.vocab_size;
        {
            let be = &self.be;
            let a = self.acts.as_mut().expect("acts");
            be.from_host(m!(a.losses, n), weights)?;
            be.logprob_bwd(m!(a.logits, n * v), r!(a.targets, n), r!(a.losses, n), v)?;
        }
        self.backward_from_dlogits(sink)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cpu;

    /// The size checked before allocating activations is what the allocations then count.
    #[test]
    fn act_bytes_matches_the_allocations() {
        let mut c = LlamaConfig::preset("tiny").unwrap();
        c.vocab_size = 97;
        for head in [Head::Lm, Head::Score] {
            for mode in Recompute::ALL {
                let mut m = Llama::new(Cpu, c.clone(), head).unwrap();
                m.set_recompute(mode);
                let got = m.reserve_activations(3, 7).unwrap().total() as u128;
                assert_eq!(act_bytes(&c, head, mode, 21, 4), got, "{head:?} {mode}");
            }
        }
    }

    /// A model or a batch larger than the memory left is an error that says how much is
    /// needed, before anything is allocated.
    #[test]
    fn sizes_beyond_memory_are_errors_not_aborts() {
        let mut c = LlamaConfig::preset("tiny").unwrap();
        c.num_hidden_layers = 1_000_000_000_000;
        let e = Llama::new(Cpu, c, Head::Lm).err().expect("too big");
        assert!(e.to_string().contains("available"), "{e}");
        let mut m = Llama::new(Cpu, LlamaConfig::preset("tiny").unwrap(), Head::Lm).unwrap();
        let e = m.reserve_activations(1 << 30, 256).unwrap_err().to_string();
        assert!(e.contains("activations") && e.contains("available"), "{e}");
    }
}
