//! Data parallelism with ZeRO-1: the collectives as a trait, a CPU stand-in built on threads,
//! and an AdamW whose fp32 master weights and moments are sharded across ranks.
//!
//! Every rank holds a full model replica (compute weights and gradients) but only its shard of
//! the optimizer state: 3 × ceil(n/N) floats instead of 3 × n. A step is reduce-scatter of the
//! gradients, AdamW on the owned shard, all-gather of the updated shards, all on backend
//! buffers: nothing parameter-sized crosses between host and device.
//!
//! Around it: [`env`] reads the launch environment (torchrun, mpirun), [`rendezvous`] hands
//! rank 0's NCCL id to the others (TCP or a shared file), [`nccl`] implements the collectives
//! over NCCL, and the ZeRO-1 checkpoints ([`save_zero1`], [`ShardedAdamW::load`]) write one
//! optimizer shard per rank and re-shard on a resume with another world size.

mod ckpt;
pub mod env;
pub mod nccl;
pub mod rendezvous;

pub use ckpt::{
    read_shard_state, save_zero1, shard_file_name, ShardEntry, Zero1Manifest, MANIFEST,
};
pub use env::{DistEnv, Launcher};
pub use nccl::NcclComm;
pub use rendezvous::Rendezvous;

use crate::backend::cpu::Cpu;
use crate::backend::{AdamWStep, Backend};
use crate::error::{Error, Result};
use crate::model::{GradReady, Llama};
use crate::optim::{check_lr, clip_scale, decay_groups, AdamWConfig, StepStats};
use crate::params::Span;
use std::sync::{Arc, Barrier, Mutex};

/// The collectives ZeRO-1 needs, with NCCL's semantics: every rank calls the same operation in
/// the same order with the same lengths, and the call returns once this rank's output is ready.
/// These work on host f32 slices (checkpoint agreement, logged scalars); [`DeviceCollective`]
/// has the same operations on a backend's buffers for the per-step path.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// `buf` ← Σ over ranks of `buf` (ncclAllReduce, ncclSum), identical on every rank.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()>;
    /// `out_shard` ← Σ over ranks of `input[rank·s .. (rank+1)·s]`, with `input.len() == world·s`
    /// (ncclReduceScatter, ncclSum).
    fn reduce_scatter_sum(&mut self, input: &[f32], out_shard: &mut [f32]) -> Result<()>;
    /// `out[r·s .. (r+1)·s]` ← rank r's `shard`, with `out.len() == world·s` (ncclAllGather).
    fn all_gather(&mut self, shard: &[f32], out: &mut [f32]) -> Result<()>;
    fn barrier(&mut self) -> Result<()>;
}

/// The per-step collectives on backend `B`'s buffers, so the ZeRO-1 step never moves its
/// buffers through the host: NCCL on CUDA buffers ([`NcclComm`]), the thread stand-in on the
/// CPU backend's (host) buffers ([`ThreadComm`]). Ordered after earlier work on `B`'s stream.
///
/// The sharded ones cut a vector of `n` elements into pieces of `piece` elements, rank r
/// owning `[r·piece, min(n, (r+1)·piece))` ([`Shard`]'s split; the last pieces may be short or
/// empty), and work in place on the unpadded vector: no padded scratch copy when `n` does not
/// split evenly.
pub trait DeviceCollective<B: Backend>: Collective {
    /// `buf` ← Σ over ranks of `buf`, in place.
    fn all_reduce_sum_buf(&mut self, buf: B::Mut<'_, f32>) -> Result<()>;
    /// `out` ← Σ over ranks of this rank's piece of `input` (`out.len()` = the piece's length).
    fn reduce_scatter_v(
        &mut self,
        input: B::Ref<'_, f32>,
        out: B::Mut<'_, f32>,
        piece: usize,
    ) -> Result<()>;
    /// In place: every rank's piece of `buf`, in the compute dtype (bf16 on CUDA), is copied
    /// into the others' `buf`.
    fn all_gather_v(&mut self, buf: B::Mut<'_, B::Act>, piece: usize) -> Result<()>;
    /// One bucket of a reduce-scatter issued over several calls: `part` is elements
    /// `[lo, lo + part.len())` of an `n`-element vector cut into pieces of `piece`, and the
    /// elements of this rank's piece `out` that fall in the bucket ← Σ over ranks (the others
    /// are left alone). The same sums as [`DeviceCollective::reduce_scatter_v`], bucket by
    /// bucket. It may run behind later work on B's stream (NCCL: on its own stream, so it
    /// overlaps the rest of the backward): read `out` only after
    /// [`DeviceCollective::wait_reduced`].
    fn reduce_scatter_part(
        &mut self,
        part: B::Ref<'_, f32>,
        lo: usize,
        n: usize,
        out: B::Mut<'_, f32>,
        piece: usize,
    ) -> Result<()>;
    /// Orders later work on B's stream after every `reduce_scatter_part` issued so far.
    fn wait_reduced(&mut self) -> Result<()>;
}

/// The part of rank `rank`'s piece that bucket `[lo, hi)` covers: `(start, end)` as global
/// indices, empty when `start == end`.
pub(crate) fn bucket_in_piece(
    lo: usize,
    hi: usize,
    n: usize,
    piece: usize,
    rank: usize,
) -> (usize, usize) {
    let (off, len) = piece_of(n, piece, rank);
    let (a, b) = (lo.max(off), hi.min(off + len));
    (a, b.max(a))
}

/// Checks a bucket `[lo, lo + len)` of an `n`-element vector and the output piece's length.
pub(crate) fn check_part(
    lo: usize,
    len: usize,
    n: usize,
    piece: usize,
    world: usize,
    rank: usize,
    out: usize,
) -> Result<()> {
    check_cover("reduce_scatter_part", n, piece, world)?;
    if lo + len > n {
        return Err(Error::Shape(format!(
            "reduce_scatter_part: bucket [{lo}, {}) outside {n} elements",
            lo + len
        )));
    }
    check_len(
        "reduce_scatter_part output",
        out,
        piece_of(n, piece, rank).1,
    )
}

/// Rank `rank`'s piece `[off, off + len)` of `n` elements cut into pieces of `piece`.
pub(crate) fn piece_of(n: usize, piece: usize, rank: usize) -> (usize, usize) {
    let off = (rank * piece).min(n);
    (off, (n - off).min(piece))
}

/// Checks that pieces of `piece` elements over `world` ranks cover all `n` (the last ones may
/// be short or empty).
pub(crate) fn check_cover(what: &str, n: usize, piece: usize, world: usize) -> Result<()> {
    if piece * world < n {
        return Err(Error::Shape(format!(
            "{what}: pieces of {piece} over {world} ranks do not cover {n} elements"
        )));
    }
    Ok(())
}

/// A collective call as the ranks must agree on it: its name and its sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
struct Call {
    name: &'static str,
    sizes: [usize; 4],
}

impl std::fmt::Display for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{:?}", self.name, self.sizes)
    }
}

/// State shared by the ranks of a [`ThreadGroup`]: one posting slot per rank (the call it
/// made and its data).
struct Shared {
    barrier: Barrier,
    slots: Vec<Mutex<(Call, Vec<f32>)>>,
}

/// A CPU stand-in for NCCL: ranks are threads of one process.
pub struct ThreadGroup;

impl ThreadGroup {
    /// One communicator per rank, each to be moved into its own thread. Every rank must take
    /// part in every collective (as with NCCL), or the others wait forever.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(world: usize) -> Vec<ThreadComm> {
        assert!(world > 0, "a group needs at least one rank");
        let shared = Arc::new(Shared {
            barrier: Barrier::new(world),
            slots: (0..world)
                .map(|_| Mutex::new((Call::default(), Vec::new())))
                .collect(),
        });
        (0..world)
            .map(|rank| ThreadComm {
                rank,
                world,
                shared: shared.clone(),
            })
            .collect()
    }
}

/// One rank of a [`ThreadGroup`]. A collective posts this rank's call and data, waits for
/// every rank, reads what it needs, and waits again so no slot is overwritten while another
/// rank reads it. Sums run in rank order, so every rank gets the same bits on every run.
///
/// Where NCCL would hang or mix up data, ranks that make different calls at the same point
/// (another collective, other sizes, other bucket edges) all get an error naming both calls.
pub struct ThreadComm {
    rank: usize,
    world: usize,
    shared: Arc<Shared>,
}

impl ThreadComm {
    /// Posts `call` and `data` and waits for every rank. `Ok` when every rank made the same
    /// call: read the slots, then [`ThreadComm::done`] either way.
    fn post(&self, call: Call, data: &[f32]) -> std::result::Result<(), (usize, Call)> {
        {
            let mut slot = self.shared.slots[self.rank].lock().expect("slot lock");
            slot.0 = call;
            slot.1.clear();
            slot.1.extend_from_slice(data);
        }
        self.shared.barrier.wait();
        match (0..self.world)
            .map(|r| (r, self.shared.slots[r].lock().expect("slot lock").0))
            .find(|(_, c)| *c != call)
        {
            None => Ok(()),
            Some(other) => Err(other),
        }
    }

    /// Waits until every rank has read, then names a mismatch `post` found.
    fn done(&self, call: Call, posted: std::result::Result<(), (usize, Call)>) -> Result<()> {
        self.shared.barrier.wait();
        posted.map_err(|(r, c)| {
            Error::Dist(format!(
                "collectives out of step: rank {} called {call} while rank {r} called {c}",
                self.rank
            ))
        })
    }

    /// The first `out.len()` values rank `r` posted, copied into `out`.
    fn read_slot(&self, r: usize, out: &mut [f32]) {
        let slot = self.shared.slots[r].lock().expect("slot lock");
        out.copy_from_slice(&slot.1[..out.len()]);
    }

    /// out[i] = Σ_r slot_r[off + i], summed from rank 0 up.
    fn sum_slots(&self, off: usize, out: &mut [f32]) {
        for (r, slot) in self.shared.slots.iter().enumerate() {
            let slot = slot.lock().expect("slot lock");
            let src = &slot.1[off..off + out.len()];
            if r == 0 {
                out.copy_from_slice(src);
            } else {
                out.iter_mut().zip(src).for_each(|(o, &x)| *o += x);
            }
        }
    }
}

fn call(name: &'static str, sizes: [usize; 4]) -> Call {
    Call { name, sizes }
}

fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::Shape(format!(
            "{what}: {got} values, expected {want}"
        )));
    }
    Ok(())
}

impl Collective for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        let c = call("all_reduce_sum", [buf.len(), 0, 0, 0]);
        let posted = self.post(c, buf);
        if posted.is_ok() {
            self.sum_slots(0, buf);
        }
        self.done(c, posted)
    }

    fn reduce_scatter_sum(&mut self, input: &[f32], out_shard: &mut [f32]) -> Result<()> {
        check_len(
            "reduce_scatter input",
            input.len(),
            self.world * out_shard.len(),
        )?;
        let c = call("reduce_scatter_sum", [input.len(), 0, 0, 0]);
        let posted = self.post(c, input);
        if posted.is_ok() {
            self.sum_slots(self.rank * out_shard.len(), out_shard);
        }
        self.done(c, posted)
    }

    fn all_gather(&mut self, shard: &[f32], out: &mut [f32]) -> Result<()> {
        check_len("all_gather output", out.len(), self.world * shard.len())?;
        let c = call("all_gather", [shard.len(), 0, 0, 0]);
        let posted = self.post(c, shard);
        if posted.is_ok() {
            for (r, dst) in out.chunks_mut(shard.len().max(1)).enumerate() {
                self.read_slot(r, dst);
            }
        }
        self.done(c, posted)
    }

    fn barrier(&mut self) -> Result<()> {
        let c = call("barrier", [0; 4]);
        let posted = self.post(c, &[]);
        self.done(c, posted)
    }
}

/// The CPU backend's buffers are host memory: the collectives read other ranks' posted data.
impl DeviceCollective<Cpu> for ThreadComm {
    fn all_reduce_sum_buf(&mut self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce_sum(buf)
    }
    fn reduce_scatter_v(&mut self, input: &[f32], out: &mut [f32], piece: usize) -> Result<()> {
        let (n, world, rank) = (input.len(), self.world, self.rank);
        check_cover("reduce_scatter_v", n, piece, world)?;
        let (off, len) = piece_of(n, piece, rank);
        check_len("reduce_scatter_v output", out.len(), len)?;
        let c = call("reduce_scatter_v", [n, piece, 0, 0]);
        let posted = self.post(c, input);
        if posted.is_ok() {
            self.sum_slots(off, out);
        }
        self.done(c, posted)
    }
    fn reduce_scatter_part(
        &mut self,
        part: &[f32],
        lo: usize,
        n: usize,
        out: &mut [f32],
        piece: usize,
    ) -> Result<()> {
        let (world, rank) = (self.world, self.rank);
        check_part(lo, part.len(), n, piece, world, rank, out.len())?;
        let c = call("reduce_scatter_part", [lo, part.len(), n, piece]);
        let (a, b) = bucket_in_piece(lo, lo + part.len(), n, piece, rank);
        let off = piece_of(n, piece, rank).0;
        // Summed in rank order, as the whole reduce-scatter: the same bits, bucket by bucket.
        let posted = self.post(c, part);
        if posted.is_ok() && a < b {
            self.sum_slots(a - lo, &mut out[a - off..b - off]);
        }
        self.done(c, posted)
    }
    fn wait_reduced(&mut self) -> Result<()> {
        Ok(())
    }
    fn all_gather_v(&mut self, buf: &mut [f32], piece: usize) -> Result<()> {
        let (n, world, rank) = (buf.len(), self.world, self.rank);
        check_cover("all_gather_v", n, piece, world)?;
        let (off, len) = piece_of(n, piece, rank);
        let c = call("all_gather_v", [n, piece, 0, 0]);
        let posted = self.post(c, &buf[off..off + len]);
        if posted.is_ok() {
            for r in (0..world).filter(|&r| r != rank) {
                let (o, l) = piece_of(n, piece, r);
                self.read_slot(r, &mut buf[o..o + l]);
            }
        }
        self.done(c, posted)
    }
}

/// Rank `rank`'s contiguous piece `[off, off + len)` of a flat vector of `n` elements split
/// `world` ways. Every shard has the same length ceil(n/world) (reduce-scatter and all-gather
/// want equal pieces), so the vector is padded with zeros to `world · len`; the padding sits
/// at the end of the last shards and the optimizer never touches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
    pub n: usize,
    pub off: usize,
    pub len: usize,
}

impl Shard {
    pub fn new(n: usize, rank: usize, world: usize) -> Self {
        assert!(rank < world, "rank {rank} out of a world of {world}");
        let len = n.div_ceil(world);
        Shard {
            rank,
            world,
            n,
            off: rank * len,
            len,
        }
    }

    /// The padded length of the whole vector: world · len ≥ n.
    pub fn padded(&self) -> usize {
        self.world * self.len
    }

    /// How many of this shard's elements are real (not padding).
    pub fn valid(&self) -> usize {
        self.n.saturating_sub(self.off).min(self.len)
    }

    /// `spans` (over the full vector) intersected with this shard, in shard-local offsets;
    /// empty intersections are dropped.
    pub fn local_groups(&self, spans: &[(Span, bool)]) -> Vec<(Span, bool)> {
        let (lo, hi) = (self.off, self.off + self.valid());
        spans
            .iter()
            .filter_map(|&(s, flag)| {
                let (a, b) = (s.off.max(lo), (s.off + s.len).min(hi));
                (a < b).then_some((
                    Span {
                        off: a - lo,
                        len: b - a,
                    },
                    flag,
                ))
            })
            .collect()
    }
}

/// ZeRO-1 AdamW: this rank owns the fp32 master weights and both moments of its [`Shard`] of
/// the flat parameters, in backend buffers; the update is exactly [`crate::optim::AdamW`]'s on
/// those elements.
///
/// Where the model computes from a separate copy (CUDA's bf16 shadow), creating this frees the
/// model's full fp32 master ([`Llama::release_master`]): each rank keeps the compute weights,
/// fp32 gradients and 3 × ceil(n/N) floats of optimizer state, 6 + 12/N bytes per parameter.
/// The step updates this rank's shard of the compute weights in the AdamW pass and all-gathers
/// them in their own dtype. Where the master is the compute weights (the CPU) it is updated
/// the same way, in place.
///
/// The collectives sum gradients: each rank must scale its backward by 1/world (e.g.
/// `backward_lm(1 / (world · local_count))`) so the sum is the mean over the global batch.
///
/// Every buffer is allocated here, once; a step reads the model's gradients and writes its
/// weights on the device, reading back only the norm's scalar.
pub struct ShardedAdamW<B: Backend> {
    pub cfg: AdamWConfig,
    pub shard: Shard,
    /// This rank's slice of the fp32 master weights, m and v: `shard.len` each; the padding
    /// past `shard.valid()` stays zero.
    pub master: B::Buf<f32>,
    pub m: B::Buf<f32>,
    pub v: B::Buf<f32>,
    pub step: u64,
    be: B,
    /// The decay groups of the unsharded optimizer, cut to this shard (shard-local offsets).
    groups: Vec<(Span, bool)>,
    /// This rank's summed gradient shard.
    gshard: B::Buf<f32>,
    /// Gradients `[unreduced, n)` were reduced into `gshard` by an [`ShardedAdamW::overlap`]
    /// during the backward; `n` when none were.
    unreduced: usize,
}

impl<B: Backend> ShardedAdamW<B> {
    /// Takes this rank's shard of the model's current weights and releases the model's full
    /// master where it can. Replicas must start identical (same seed or checkpoint), as with any
    /// data-parallel launch.
    pub fn new(model: &mut Llama<B>, cfg: AdamWConfig, rank: usize, world: usize) -> Result<Self> {
        cfg.validate()?;
        if model.master_released() {
            return Err(Error::Config(
                "this model's fp32 master is already held by a ZeRO-1 optimizer".into(),
            ));
        }
        let n = model.num_params();
        let shard = Shard::new(n, rank, world);
        let be = model.be.clone();
        let mut master = be.alloc(shard.len)?;
        let (lo, valid) = (shard.off.min(n), shard.valid());
        be.copy(
            B::slice_mut(&mut master, 0, valid),
            B::slice(&model.master, lo, valid),
        )?;
        model.release_master()?;
        Ok(ShardedAdamW {
            cfg,
            shard,
            master,
            m: be.alloc(shard.len)?,
            v: be.alloc(shard.len)?,
            step: 0,
            groups: shard.local_groups(&decay_groups(&model.table, cfg.decay)),
            gshard: be.alloc(shard.len)?,
            unreduced: n,
            be,
        })
    }

    /// A [`GradReady`] for the last backward before [`ShardedAdamW::step`] (with gradient
    /// accumulation, the last micro-batch's only: earlier ones still change every gradient).
    /// It reduce-scatters the gradients in buckets of at least `bucket` elements as the
    /// backward finishes them, so on NCCL the communication overlaps the rest of the backward;
    /// the step then reduces only what is left and waits. Bucket edges fall on layer edges and
    /// are the same on every rank; the sums are the same as one reduce-scatter's.
    pub fn overlap<'a, C: DeviceCollective<B> + ?Sized>(
        &'a mut self,
        comm: &'a mut C,
        bucket: usize,
    ) -> Overlap<'a, B, C> {
        Overlap {
            opt: self,
            comm,
            bucket,
        }
    }

    /// One data-parallel step at learning rate `lr`: reduce-scatter of the gradients, global
    /// norm and clip, AdamW on this shard (writing its compute weights too), all-gather of the
    /// compute weights. Every rank sees the same norm, so a non-finite one fails on all ranks
    /// together (before any weight changes).
    pub fn step<C: DeviceCollective<B> + ?Sized>(
        &mut self,
        model: &mut Llama<B>,
        comm: &mut C,
        lr: f32,
    ) -> Result<StepStats> {
        // Every rank has the same lr, so a bad one fails on all of them before any collective.
        check_lr(lr)?;
        let (n, valid, off) = (self.shard.n, self.shard.valid(), self.shard.off);
        check_len("model parameters", model.num_params(), n)?;
        check_len("world", comm.world(), self.shard.world)?;
        let be = &self.be;
        // What the backward's buckets left (all of it without an `overlap`), then wait for them.
        match std::mem::replace(&mut self.unreduced, n) {
            rest if rest == n => comm.reduce_scatter_v(
                B::all(&model.grads),
                B::slice_mut(&mut self.gshard, 0, valid),
                self.shard.len,
            )?,
            rest => {
                if rest > 0 {
                    comm.reduce_scatter_part(
                        B::slice(&model.grads, 0, rest),
                        0,
                        n,
                        B::slice_mut(&mut self.gshard, 0, valid),
                        self.shard.len,
                    )?;
                }
                comm.wait_reduced()?;
            }
        }

        // Each shard's Σg² in f64 (as AdamW), summed across ranks in f32: the norm agrees with
        // the single-process one to f32 rounding, and is the same bits on every rank.
        let mut ss = [be.sum_squares(B::slice(&self.gshard, 0, valid))? as f32];
        comm.all_reduce_sum(&mut ss)?;
        let grad_norm = ss[0].sqrt();
        let clip_scale = clip_scale(self.cfg.clip_norm, grad_norm)?;
        self.step += 1;
        let mut weights = be.compute_weights_mut(&mut model.master, &mut model.shadow);
        for &(s, decay) in &self.groups {
            be.adamw(
                B::slice_mut(&mut self.master, s.off, s.len),
                Some(B::sub_mut(&mut weights, off + s.off, s.len)),
                B::slice_mut(&mut self.m, s.off, s.len),
                B::slice_mut(&mut self.v, s.off, s.len),
                B::slice(&self.gshard, s.off, s.len),
                AdamWStep {
                    lr,
                    beta1: self.cfg.beta1,
                    beta2: self.cfg.beta2,
                    eps: self.cfg.eps,
                    weight_decay: if decay { self.cfg.weight_decay } else { 0.0 },
                    step: self.step,
                    grad_scale: clip_scale,
                },
            )?;
        }
        comm.all_gather_v(weights, self.shard.len)?;
        Ok(StepStats {
            grad_norm,
            clip_scale,
        })
    }

    /// Sets the model's weights from the sharded fp32 masters (this shard rounded into the
    /// compute weights, then an all-gather), so after a resume the compute weights come from
    /// the masters, not from a possibly bf16 model file.
    pub fn gather_params<C: DeviceCollective<B> + ?Sized>(
        &mut self,
        model: &mut Llama<B>,
        comm: &mut C,
    ) -> Result<()> {
        let (n, valid, off) = (
            self.shard.n,
            self.shard.valid(),
            self.shard.off.min(self.shard.n),
        );
        check_len("model parameters", model.num_params(), n)?;
        let be = &self.be;
        let mut weights = be.compute_weights_mut(&mut model.master, &mut model.shadow);
        be.to_compute(
            B::sub_mut(&mut weights, off, valid),
            B::slice(&self.master, 0, valid),
        )?;
        comm.all_gather_v(weights, self.shard.len)
    }

    /// This shard's real elements of (master, m, v) on the host: for checkpoints, not steps.
    pub fn state_to_host(&self) -> Result<[Vec<f32>; 3]> {
        let valid = self.shard.valid();
        let get = |b: &B::Buf<f32>| -> Result<Vec<f32>> {
            let mut h = vec![0f32; valid];
            self.be.to_host(&mut h, B::slice(b, 0, valid))?;
            Ok(h)
        };
        Ok([get(&self.master)?, get(&self.m)?, get(&self.v)?])
    }

    /// Sets the moments' real elements (`shard.valid()` each) from the host, e.g. this shard
    /// of a single-process checkpoint's moments.
    pub fn set_moments(&mut self, m: &[f32], v: &[f32]) -> Result<()> {
        let valid = self.shard.valid();
        check_len("m", m.len(), valid)?;
        check_len("v", v.len(), valid)?;
        self.be.from_host(B::slice_mut(&mut self.m, 0, valid), m)?;
        self.be.from_host(B::slice_mut(&mut self.v, 0, valid), v)
    }
}

/// Reduces a backward's gradients in buckets as they become final: see
/// [`ShardedAdamW::overlap`].
pub struct Overlap<'a, B: Backend, C: ?Sized> {
    opt: &'a mut ShardedAdamW<B>,
    comm: &'a mut C,
    bucket: usize,
}

impl<B: Backend, C: DeviceCollective<B> + ?Sized> GradReady<B> for Overlap<'_, B, C> {
    fn ready(&mut self, grads: B::Ref<'_, f32>, from: usize) -> Result<()> {
        let opt = &mut *self.opt;
        let (n, end) = (opt.shard.n, opt.unreduced);
        if from >= end || (end - from < self.bucket && from > 0) {
            return Ok(());
        }
        let valid = opt.shard.valid();
        self.comm.reduce_scatter_part(
            B::sub(grads, from, end - from),
            from,
            n,
            B::slice_mut(&mut opt.gshard, 0, valid),
            opt.shard.len,
        )?;
        opt.unreduced = from;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    /// Runs `f(comm)` on `world` threads and returns each rank's result in rank order.
    fn on_ranks<T: Send>(world: usize, f: impl Fn(ThreadComm) -> T + Sync) -> Vec<T> {
        thread::scope(|s| {
            let hs: Vec<_> = ThreadGroup::new(world)
                .into_iter()
                .map(|c| s.spawn(|| f(c)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn shard_sizes_and_padding() {
        let n = 10;
        let s: Vec<_> = (0..3).map(|r| Shard::new(n, r, 3)).collect();
        assert_eq!(s.iter().map(|s| s.len).collect::<Vec<_>>(), [4, 4, 4]);
        assert_eq!(s.iter().map(|s| s.off).collect::<Vec<_>>(), [0, 4, 8]);
        assert_eq!(s.iter().map(|s| s.valid()).collect::<Vec<_>>(), [4, 4, 2]);
        assert_eq!(s[0].padded(), 12);
        // More ranks than elements: the last shards are all padding.
        let t: Vec<_> = (0..4).map(|r| Shard::new(2, r, 4).valid()).collect();
        assert_eq!(t, [1, 1, 0, 0]);
        assert_eq!(Shard::new(9, 2, 3).valid(), 3);
    }

    #[test]
    fn local_groups_cover_exactly_the_real_elements() {
        let spans = [
            (Span { off: 0, len: 3 }, true),
            (Span { off: 3, len: 2 }, false),
            (Span { off: 5, len: 6 }, true),
        ];
        let n = 11;
        let flag_of = |i: usize| spans.iter().find(|(s, _)| i >= s.off && i < s.off + s.len);
        for world in 1..=5 {
            let mut seen = vec![0; n];
            for r in 0..world {
                let sh = Shard::new(n, r, world);
                for (s, d) in sh.local_groups(&spans) {
                    for i in s.off..s.off + s.len {
                        let g = sh.off + i;
                        assert_eq!(flag_of(g).unwrap().1, d, "element {g}, world {world}");
                        seen[g] += 1;
                    }
                }
            }
            assert_eq!(seen, vec![1; n], "world {world}");
        }
    }

    #[test]
    fn collectives_match_a_serial_sum() {
        let (world, s) = (3, 5);
        let data = |r: usize| -> Vec<f32> {
            (0..world * s)
                .map(|i| (i as f32 * 0.37 + r as f32).sin())
                .collect()
        };
        let out = on_ranks(world, |mut c| {
            let r = c.rank();
            let mut all = data(r);
            c.all_reduce_sum(&mut all).unwrap();
            let mut shard = vec![0f32; s];
            c.reduce_scatter_sum(&data(r), &mut shard).unwrap();
            let mut gathered = vec![0f32; world * s];
            c.all_gather(&shard, &mut gathered).unwrap();
            c.barrier().unwrap();
            (all, gathered)
        });
        let want: Vec<f32> = (0..world * s)
            .map(|i| (1..world).fold(data(0)[i], |acc, r| acc + data(r)[i]))
            .collect();
        for (all, gathered) in &out {
            // Rank-order sums: the same bits as the serial loop, on every rank.
            assert_eq!(all, &want);
            // reduce-scatter then all-gather is an all-reduce.
            assert_eq!(gathered, &want);
        }
    }

    #[test]
    fn collectives_are_deterministic() {
        let run = || {
            on_ranks(4, |mut c| {
                let mut x: Vec<f32> = (0..1000)
                    .map(|i| 1.0 / (1 + i + 7 * c.rank()) as f32)
                    .collect();
                c.all_reduce_sum(&mut x).unwrap();
                x
            })
        };
        let a = run();
        assert!(a.iter().all(|x| x == &a[0]));
        assert_eq!(a, run());
    }

    /// Hidden 35, head_dim 8: 21455 parameters, divisible by 5 but not by 2 or 3, so both the
    /// padded and the direct (model buffers) collectives run.
    fn tiny_model() -> Llama<Cpu> {
        let cfg = serde_json::from_value(serde_json::json!({
            "vocab_size": 64,
            "hidden_size": 35,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "max_position_embeddings": 64,
        }))
        .unwrap();
        let mut m = Llama::new(Cpu, cfg, crate::Head::Lm).unwrap();
        m.init_random(7).unwrap();
        m
    }

    /// Rank r's gradient: a fixed pattern, so the summed gradient is known.
    fn fake_grads(n: usize, r: usize, world: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7 + r * 13) % 101) as f32 * 1e-3 / world as f32 - 0.05)
            .collect()
    }

    /// The step moves no parameter-sized data between host and backend memory and allocates
    /// no buffer (counted by the CPU backend, per rank thread), and gives every rank the
    /// weights one whole AdamW gives on the summed gradients: with the master as the compute
    /// weights (the CPU) and with a separate compute copy and the master released (CUDA's
    /// data flow), on 1 and 5 ranks (the pieces split n evenly) and 2 and 3 (they do not).
    #[test]
    fn zero1_step_stays_on_the_backend_and_matches_adamw() {
        use crate::backend::cpu::Traffic;
        use crate::optim::AdamW;
        let n = tiny_model().num_params();
        let cfg = AdamWConfig::default();
        // The counter sees what the host-staged step did: a gradient download.
        let probe = tiny_model();
        let before = Cpu::traffic().transferred;
        probe.grads_to_host().unwrap();
        assert_eq!(Cpu::traffic().transferred - before, n);
        for separate in [false, true] {
            for world in [1, 2, 3, 5] {
                assert_eq!(n.is_multiple_of(world), world == 1 || world == 5);
                let mut reference = tiny_model();
                let mut adamw = AdamW::new(&reference, cfg).unwrap();
                let results = on_ranks(world, |mut c| {
                    let r = c.rank();
                    let mut m = tiny_model();
                    if separate {
                        m.separate_compute_copy().unwrap();
                    }
                    let mut opt = ShardedAdamW::new(&mut m, cfg, r, world).unwrap();
                    assert_eq!(m.master_released(), separate);
                    assert_eq!(m.master.len(), if separate { 0 } else { n });
                    let mut traffic = Vec::new();
                    for step in 0..3 {
                        // Gradients written straight into the buffer, as a backward does.
                        m.grads = fake_grads(n, r + step, world);
                        let before = Cpu::traffic();
                        let st = opt.step(&mut m, &mut c, 1e-2).unwrap();
                        let after = Cpu::traffic();
                        traffic.push(Traffic {
                            transferred: after.transferred - before.transferred,
                            allocs: after.allocs - before.allocs,
                        });
                        assert!(st.grad_norm.is_finite());
                    }
                    // What the forward reads.
                    let w = Cpu.compute_weights(&m.master, &m.shadow).to_vec();
                    (w, traffic)
                });
                for step in 0..3 {
                    let g: Vec<f32> = (0..n)
                        .map(|i| (0..world).map(|r| fake_grads(n, r + step, world)[i]).sum())
                        .collect();
                    reference.grads = g;
                    adamw.step(&mut reference, 1e-2).unwrap();
                }
                let what = format!("world {world}, separate compute copy {separate}");
                for (r, (w, traffic)) in results.iter().enumerate() {
                    assert_eq!(traffic, &vec![Traffic::default(); 3], "{what}, rank {r}");
                    assert_eq!(w, &results[0].0, "{what}: ranks differ");
                    let d = w
                        .iter()
                        .zip(&reference.master)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(d < 1e-6, "{what}: {d} from whole AdamW");
                }
            }
        }
    }

    /// Once the optimizer holds the master, the model refuses what would bypass it, and the
    /// weights it reports are the compute copy's.
    #[test]
    fn a_released_master_is_not_written_behind_the_optimizer() {
        let mut m = tiny_model();
        let before = m.params_to_host().unwrap();
        m.separate_compute_copy().unwrap();
        let mut c = ThreadGroup::new(1).pop().unwrap();
        let cfg = AdamWConfig::default();
        let mut opt = ShardedAdamW::new(&mut m, cfg, 0, 1).unwrap();
        assert!(m.master_released());
        assert_eq!(m.params_to_host().unwrap(), before);
        let e = m.set_params(&before).unwrap_err().to_string();
        assert!(e.contains("ZeRO-1"), "{e}");
        let e = crate::optim::AdamW::new(&m, cfg)
            .unwrap()
            .step(&mut m, 1e-3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ZeRO-1"), "{e}");
        assert!(ShardedAdamW::new(&mut m, cfg, 0, 1).is_err());
        // The optimizer still steps it, and gather_params rebuilds the weights from its shard.
        m.grads = fake_grads(m.num_params(), 0, 1);
        opt.step(&mut m, &mut c, 1e-2).unwrap();
        let stepped = m.params_to_host().unwrap();
        assert_ne!(stepped, before);
        m.shadow.fill(0.0);
        opt.gather_params(&mut m, &mut c).unwrap();
        assert_eq!(m.params_to_host().unwrap(), stepped);
    }

    /// The uneven collectives on 3 ranks over 10 elements in pieces of 4: the last rank's
    /// piece is short, and a piece that cannot cover the vector is refused.
    #[test]
    fn uneven_pieces_reduce_and_gather_in_place() {
        let (world, n, piece) = (3, 10, 4);
        let out = on_ranks(world, |mut c| {
            let r = c.rank();
            let input: Vec<f32> = (0..n).map(|i| (i * 10 + r) as f32).collect();
            let (off, len) = piece_of(n, piece, r);
            let mut mine = vec![0f32; len];
            c.reduce_scatter_v(&input, &mut mine, piece).unwrap();
            let mut buf = vec![-1f32; n];
            buf[off..off + len].copy_from_slice(&mine);
            c.all_gather_v(&mut buf, piece).unwrap();
            let short = c.reduce_scatter_v(&input, &mut mine, 3).is_err();
            (buf, short)
        });
        let want: Vec<f32> = (0..n).map(|i| (i * 30 + 3) as f32).collect();
        for (buf, short) in out {
            assert_eq!(buf, want);
            assert!(short);
        }
    }

    /// Buckets issued tail first, of any size (one element, across pieces, inside one), give
    /// every rank the same bits as one reduce-scatter; a bucket past the end is refused on
    /// every rank (before any rank waits for the others).
    #[test]
    fn buckets_reduce_to_the_same_bits_as_one_reduce_scatter() {
        let n: usize = 37;
        let cuts = [37, 36, 30, 29, 12, 11, 10, 0];
        for world in 1..=4 {
            let piece = n.div_ceil(world);
            for (r, (whole, parts, past)) in on_ranks(world, |mut c| {
                let r = c.rank();
                let input: Vec<f32> = (0..n)
                    .map(|i| ((i * 31 + r * 7) % 13) as f32 * 0.1 + 1e-3 * r as f32)
                    .collect();
                let len = piece_of(n, piece, r).1;
                let mut whole = vec![0f32; len];
                c.reduce_scatter_v(&input, &mut whole, piece).unwrap();
                // NaN until written: a bucket that missed an element shows.
                let mut parts = vec![f32::NAN; len];
                for w in cuts.windows(2) {
                    let (hi, lo) = (w[0], w[1]);
                    c.reduce_scatter_part(&input[lo..hi], lo, n, &mut parts, piece)
                        .unwrap();
                }
                c.wait_reduced().unwrap();
                let past = c.reduce_scatter_part(&input[30..], 31, n, &mut parts, piece);
                (whole, parts, past.is_err())
            })
            .into_iter()
            .enumerate()
            {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&parts), bits(&whole), "world {world}, rank {r}");
                assert!(past, "world {world}: a bucket past the end was accepted");
            }
        }
    }

    /// The thread stand-in, recording the buckets a step's gradients were reduced in.
    struct Recording {
        inner: ThreadComm,
        parts: Vec<(usize, usize)>,
    }
    impl Collective for Recording {
        fn rank(&self) -> usize {
            self.inner.rank()
        }
        fn world(&self) -> usize {
            self.inner.world()
        }
        fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
            self.inner.all_reduce_sum(buf)
        }
        fn reduce_scatter_sum(&mut self, input: &[f32], out: &mut [f32]) -> Result<()> {
            self.inner.reduce_scatter_sum(input, out)
        }
        fn all_gather(&mut self, shard: &[f32], out: &mut [f32]) -> Result<()> {
            self.inner.all_gather(shard, out)
        }
        fn barrier(&mut self) -> Result<()> {
            self.inner.barrier()
        }
    }
    impl DeviceCollective<Cpu> for Recording {
        fn all_reduce_sum_buf(&mut self, buf: &mut [f32]) -> Result<()> {
            self.inner.all_reduce_sum_buf(buf)
        }
        fn reduce_scatter_v(&mut self, input: &[f32], out: &mut [f32], piece: usize) -> Result<()> {
            self.parts.push((0, input.len()));
            self.inner.reduce_scatter_v(input, out, piece)
        }
        fn all_gather_v(&mut self, buf: &mut [f32], piece: usize) -> Result<()> {
            self.inner.all_gather_v(buf, piece)
        }
        fn reduce_scatter_part(
            &mut self,
            part: &[f32],
            lo: usize,
            n: usize,
            out: &mut [f32],
            piece: usize,
        ) -> Result<()> {
            self.parts.push((lo, part.len()));
            self.inner.reduce_scatter_part(part, lo, n, out, piece)
        }
        fn wait_reduced(&mut self) -> Result<()> {
            self.inner.wait_reduced()
        }
    }

    /// ZeRO-1 steps after overlapped backwards (gradients reduced in buckets as layers finish)
    /// give every rank the same bits as one reduce-scatter after the backward, whatever the
    /// bucket size, with the master as compute weights or released; the buckets are the
    /// layer edges merged up to the bucket size, tail first.
    #[test]
    fn overlapped_buckets_step_to_the_same_bits() {
        let cfg = AdamWConfig::default();
        let tab = tiny_model().table;
        let n = tab.total;
        let (l0, l1, nf) = (tab.layers[0].ln1.off, tab.layers[1].ln1.off, tab.norm.off);
        assert!(n - nf < 3000 && n - l1 >= 3000 && l1 - l0 >= 3000 && l0 < 3000);
        // (bucket size, the buckets (start, len) each step reduces in, in order)
        type Plan = (Option<usize>, Vec<(usize, usize)>);
        let plans: [Plan; 4] = [
            (None, vec![(0, n)]),
            (
                Some(0),
                vec![(nf, n - nf), (l1, nf - l1), (l0, l1 - l0), (0, l0)],
            ),
            // The head's tail is under 3000: it waits for layer 1's; the embedding is last.
            (Some(3000), vec![(l1, n - l1), (l0, l1 - l0), (0, l0)]),
            (Some(usize::MAX), vec![(0, n)]),
        ];
        for separate in [false, true] {
            for world in [2, 3] {
                let mut first: Option<Vec<Vec<f32>>> = None;
                for (bucket, want) in &plans {
                    let out = on_ranks(world, |c| {
                        let r = c.rank();
                        let mut c = Recording {
                            inner: c,
                            parts: Vec::new(),
                        };
                        let mut m = tiny_model();
                        if separate {
                            m.separate_compute_copy().unwrap();
                        }
                        let mut opt = ShardedAdamW::new(&mut m, cfg, r, world).unwrap();
                        for step in 0..2 {
                            let (b, t) = (2, 7);
                            let ids: Vec<i32> = (0..b * t)
                                .map(|i| ((i * 11 + r * 5 + step * 3) % 64) as i32)
                                .collect();
                            m.forward(&crate::Batch::new(&ids, b, t)).unwrap();
                            let targets = crate::model::shift_labels(&ids, b, t);
                            let (_, count) = m.lm_loss(&targets).unwrap();
                            let scale = 1.0 / (world * count) as f32;
                            c.parts.clear();
                            match bucket {
                                Some(k) => {
                                    let mut sink = opt.overlap(&mut c, *k);
                                    m.backward_lm_with(scale, Some(&mut sink)).unwrap();
                                }
                                None => m.backward_lm(scale).unwrap(),
                            }
                            opt.step(&mut m, &mut c, 1e-2).unwrap();
                            m.zero_grads().unwrap();
                        }
                        let w = Cpu.compute_weights(&m.master, &m.shadow).to_vec();
                        (w, c.parts)
                    });
                    let what = format!("world {world}, bucket {bucket:?}, separate {separate}");
                    for (w, parts) in &out {
                        assert_eq!(parts, want, "{what}: buckets");
                        assert_eq!(w, &out[0].0, "{what}: ranks differ");
                    }
                    let ws: Vec<Vec<f32>> = out.into_iter().map(|(w, _)| w).collect();
                    match &first {
                        None => first = Some(ws),
                        Some(f) => assert_eq!(&ws, f, "{what}: not the unbucketed bits"),
                    }
                }
            }
        }
    }

    /// Ranks that make different calls at the same point (NCCL would hang or mix data) all
    /// get an error naming both calls, and the group goes on working after it.
    #[test]
    fn calls_out_of_step_fail_on_every_rank() {
        let out = on_ranks(2, |mut c| {
            let input = [1f32; 10];
            let mut mine = [0f32; 5];
            let e = if c.rank() == 0 {
                c.reduce_scatter_v(&input, &mut mine, 5)
            } else {
                c.reduce_scatter_part(&input[4..], 4, 10, &mut mine, 5)
            };
            let mut x = [c.rank() as f32 + 1.0];
            c.all_reduce_sum(&mut x).unwrap();
            (e.unwrap_err().to_string(), x[0])
        });
        for (r, (e, x)) in out.into_iter().enumerate() {
            let other = if r == 0 {
                "reduce_scatter_part[4, 6, 10, 5]"
            } else {
                "reduce_scatter_v[10, 5, 0, 0]"
            };
            assert!(
                e.contains("out of step") && e.contains(other),
                "rank {r}: {e}"
            );
            assert_eq!(x, 3.0);
        }
    }

    #[test]
    fn length_mismatch_is_an_error() {
        let mut c = ThreadGroup::new(1).pop().unwrap();
        assert!(c.reduce_scatter_sum(&[1.0; 3], &mut [0.0; 2]).is_err());
        assert!(c.all_gather(&[1.0; 2], &mut [0.0; 3]).is_err());
    }
}
