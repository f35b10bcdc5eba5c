//! Data parallelism with ZeRO-1: the collectives as a trait, a CPU stand-in built on threads,
//! and an AdamW whose fp32 master weights and moments are sharded across ranks.
//!
//! Every rank holds a full model replica (compute weights and gradients) but only its shard of
//! the optimizer state: 3 × ceil(n/N) floats instead of 3 × n. A step is reduce-scatter of the
//! gradients, AdamW on the owned shard, all-gather of the updated shards.
//!
//! Around it: [`env`] reads the launch environment (torchrun, mpirun), [`rendezvous`] hands
//! rank 0's NCCL id to the others (TCP or a shared file), [`nccl`] implements the collectives
//! over NCCL, and the ZeRO-1 checkpoints ([`save_zero1`], [`ShardedAdamW::load`]) write one
//! optimizer shard per rank and re-shard on a resume with another world size.

mod ckpt;
pub mod env;
pub mod nccl;
pub mod rendezvous;

pub use ckpt::{save_zero1, shard_file_name, ShardEntry, Zero1Manifest, MANIFEST};
pub use env::{DistEnv, Launcher};
pub use nccl::NcclComm;
pub use rendezvous::Rendezvous;

use crate::backend::{AdamWStep, Backend};
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::ops;
use crate::optim::{clip_scale, decay_groups, AdamWConfig, StepStats};
use crate::params::Span;
use std::sync::{Arc, Barrier, Mutex};

/// The collectives ZeRO-1 needs, with NCCL's semantics: every rank calls the same operation in
/// the same order with the same lengths, and the call returns once this rank's output is ready.
/// This version works on host f32 slices; an NCCL implementation will provide the same
/// operations on device buffers.
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

/// State shared by the ranks of a [`ThreadGroup`]: one posting slot per rank.
struct Shared {
    barrier: Barrier,
    slots: Vec<Mutex<Vec<f32>>>,
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
            slots: (0..world).map(|_| Mutex::new(Vec::new())).collect(),
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

/// One rank of a [`ThreadGroup`]. A collective posts this rank's data, waits for every rank,
/// reads what it needs, and waits again so no slot is overwritten while another rank reads it.
/// Sums run in rank order, so every rank gets the same bits on every run.
pub struct ThreadComm {
    rank: usize,
    world: usize,
    shared: Arc<Shared>,
}

impl ThreadComm {
    fn post(&self, data: &[f32]) {
        let mut slot = self.shared.slots[self.rank].lock().expect("slot lock");
        slot.clear();
        slot.extend_from_slice(data);
    }

    /// out[i] = Σ_r slot_r[off + i], summed from rank 0 up.
    fn sum_slots(&self, off: usize, out: &mut [f32]) {
        for (r, slot) in self.shared.slots.iter().enumerate() {
            let slot = slot.lock().expect("slot lock");
            let src = &slot[off..off + out.len()];
            if r == 0 {
                out.copy_from_slice(src);
            } else {
                out.iter_mut().zip(src).for_each(|(o, &x)| *o += x);
            }
        }
    }
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
        self.post(buf);
        self.shared.barrier.wait();
        self.sum_slots(0, buf);
        self.shared.barrier.wait();
        Ok(())
    }

    fn reduce_scatter_sum(&mut self, input: &[f32], out_shard: &mut [f32]) -> Result<()> {
        check_len(
            "reduce_scatter input",
            input.len(),
            self.world * out_shard.len(),
        )?;
        self.post(input);
        self.shared.barrier.wait();
        self.sum_slots(self.rank * out_shard.len(), out_shard);
        self.shared.barrier.wait();
        Ok(())
    }

    fn all_gather(&mut self, shard: &[f32], out: &mut [f32]) -> Result<()> {
        check_len("all_gather output", out.len(), self.world * shard.len())?;
        self.post(shard);
        self.shared.barrier.wait();
        for (r, dst) in out.chunks_mut(shard.len().max(1)).enumerate() {
            dst.copy_from_slice(&self.shared.slots[r].lock().expect("slot lock")[..dst.len()]);
        }
        self.shared.barrier.wait();
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        self.shared.barrier.wait();
        Ok(())
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
/// the flat parameters; the update is exactly [`crate::optim::AdamW`]'s on those elements.
///
/// The collectives sum gradients: each rank must scale its backward by 1/world (e.g.
/// `backward_lm(1 / (world · local_count))`) so the sum is the mean over the global batch.
///
/// The state lives on the host and the new weights go in through `set_params`, which on CUDA
/// refreshes the bf16 shadow; an NCCL version keeps the shard on the device and all-gathers
/// straight into the shadow.
pub struct ShardedAdamW {
    pub cfg: AdamWConfig,
    pub shard: Shard,
    /// This rank's slice of the fp32 master weights, m and v: `shard.len` each.
    pub master: Vec<f32>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub step: u64,
    /// The decay groups of the unsharded optimizer, cut to this shard (shard-local offsets).
    groups: Vec<(Span, bool)>,
    /// Communication scratch: the padded full gradient / parameter vector and the gradient shard.
    full: Vec<f32>,
    gshard: Vec<f32>,
}

impl ShardedAdamW {
    /// Takes this rank's shard of the model's current weights. Replicas must start identical
    /// (same seed or checkpoint), as with any data-parallel launch.
    pub fn new<B: Backend>(
        model: &Llama<B>,
        cfg: AdamWConfig,
        rank: usize,
        world: usize,
    ) -> Result<Self> {
        let n = model.num_params();
        let shard = Shard::new(n, rank, world);
        let params = model.params_to_host()?;
        let mut master = vec![0f32; shard.len];
        let lo = shard.off.min(n);
        master[..shard.valid()].copy_from_slice(&params[lo..lo + shard.valid()]);
        Ok(ShardedAdamW {
            cfg,
            shard,
            master,
            m: vec![0f32; shard.len],
            v: vec![0f32; shard.len],
            step: 0,
            groups: shard.local_groups(&decay_groups(&model.table, cfg.decay)),
            full: vec![0f32; shard.padded()],
            gshard: vec![0f32; shard.len],
        })
    }

    /// One data-parallel step at learning rate `lr`: reduce-scatter of the gradients, global
    /// norm and clip, AdamW on this shard, all-gather of the new weights into `model`. Every
    /// rank sees the same norm, so a non-finite one fails on all ranks together.
    pub fn step<B: Backend, C: Collective + ?Sized>(
        &mut self,
        model: &mut Llama<B>,
        comm: &mut C,
        lr: f32,
    ) -> Result<StepStats> {
        let (n, valid) = (self.shard.n, self.shard.valid());
        check_len("model parameters", model.num_params(), n)?;
        check_len("world", comm.world(), self.shard.world)?;
        self.full[..n].copy_from_slice(&model.grads_to_host()?);
        self.full[n..].fill(0.0);
        comm.reduce_scatter_sum(&self.full, &mut self.gshard)?;

        // Each shard's Σg² in f64 (as AdamW), summed across ranks in f32: the norm agrees with
        // the single-process one to f32 rounding, and is the same bits on every rank.
        let mut ss = [ops::sum_squares(&self.gshard[..valid]) as f32];
        comm.all_reduce_sum(&mut ss)?;
        let grad_norm = ss[0].sqrt();
        let clip_scale = clip_scale(self.cfg.clip_norm, grad_norm)?;
        self.step += 1;
        for &(s, decay) in &self.groups {
            let r = s.off..s.off + s.len;
            ops::adamw(
                &mut self.master[r.clone()],
                &mut self.m[r.clone()],
                &mut self.v[r.clone()],
                &self.gshard[r],
                AdamWStep {
                    lr,
                    beta1: self.cfg.beta1,
                    beta2: self.cfg.beta2,
                    eps: self.cfg.eps,
                    weight_decay: if decay { self.cfg.weight_decay } else { 0.0 },
                    step: self.step,
                    grad_scale: clip_scale,
                },
            );
        }

        comm.all_gather(&self.master, &mut self.full)?;
        model.set_params(&self.full[..n])?;
        Ok(StepStats {
            grad_norm,
            clip_scale,
        })
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

    #[test]
    fn length_mismatch_is_an_error() {
        let mut c = ThreadGroup::new(1).pop().unwrap();
        assert!(c.reduce_scatter_sum(&[1.0; 3], &mut [0.0; 2]).is_err());
        assert!(c.all_gather(&[1.0; 2], &mut [0.0; 3]).is_err());
    }
}
