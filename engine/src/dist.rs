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
use crate::model::Llama;
use crate::optim::{clip_scale, decay_groups, AdamWConfig, StepStats};
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

/// [`Collective`]'s operations on backend `B`'s f32 views, so the ZeRO-1 step never moves its
/// buffers through the host: NCCL on CUDA buffers ([`NcclComm`]), the thread stand-in on the
/// CPU backend's (host) buffers ([`ThreadComm`]). Same semantics and length rules as the host
/// versions; the operation is ordered after earlier work on `B`'s stream.
pub trait DeviceCollective<B: Backend>: Collective {
    /// `buf` ← Σ over ranks of `buf`, in place.
    fn all_reduce_sum_buf(&mut self, buf: B::Mut<'_, f32>) -> Result<()>;
    /// `out` ← Σ over ranks of `input[rank·s .. (rank+1)·s]`, `s = out.len()`.
    fn reduce_scatter_sum_buf(
        &mut self,
        input: B::Ref<'_, f32>,
        out: B::Mut<'_, f32>,
    ) -> Result<()>;
    /// `out[r·s .. (r+1)·s]` ← rank r's `shard`, `s = shard.len()`.
    fn all_gather_buf(&mut self, shard: B::Ref<'_, f32>, out: B::Mut<'_, f32>) -> Result<()>;
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

/// The CPU backend's buffers are host memory: the host-slice collectives are the device ones.
impl DeviceCollective<Cpu> for ThreadComm {
    fn all_reduce_sum_buf(&mut self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce_sum(buf)
    }
    fn reduce_scatter_sum_buf(&mut self, input: &[f32], out: &mut [f32]) -> Result<()> {
        self.reduce_scatter_sum(input, out)
    }
    fn all_gather_buf(&mut self, shard: &[f32], out: &mut [f32]) -> Result<()> {
        self.all_gather(shard, out)
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
/// The collectives sum gradients: each rank must scale its backward by 1/world (e.g.
/// `backward_lm(1 / (world · local_count))`) so the sum is the mean over the global batch.
///
/// Every buffer is allocated here, once; a step reads the model's gradients and writes its
/// weights (and the compute shadow) on the device, reading back only the norm's scalar.
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
    /// The padded full vector (`shard.padded()`), for the gradients in and the gathered weights
    /// out, when `n` does not split evenly; otherwise the collectives use the model's own
    /// buffers and this stays `None`.
    pad: Option<B::Buf<f32>>,
}

impl<B: Backend> ShardedAdamW<B> {
    /// Takes this rank's shard of the model's current weights. Replicas must start identical
    /// (same seed or checkpoint), as with any data-parallel launch.
    pub fn new(model: &Llama<B>, cfg: AdamWConfig, rank: usize, world: usize) -> Result<Self> {
        let n = model.num_params();
        let shard = Shard::new(n, rank, world);
        let be = model.be.clone();
        let mut master = be.alloc(shard.len)?;
        let (lo, valid) = (shard.off.min(n), shard.valid());
        be.copy(
            B::slice_mut(&mut master, 0, valid),
            B::slice(&model.master, lo, valid),
        )?;
        Ok(ShardedAdamW {
            cfg,
            shard,
            master,
            m: be.alloc(shard.len)?,
            v: be.alloc(shard.len)?,
            step: 0,
            groups: shard.local_groups(&decay_groups(&model.table, cfg.decay)),
            gshard: be.alloc(shard.len)?,
            pad: if shard.padded() == n {
                None
            } else {
                Some(be.alloc(shard.padded())?)
            },
            be,
        })
    }

    /// One data-parallel step at learning rate `lr`: reduce-scatter of the gradients, global
    /// norm and clip, AdamW on this shard, all-gather of the new weights into `model`. Every
    /// rank sees the same norm, so a non-finite one fails on all ranks together (before any
    /// weight changes).
    pub fn step<C: DeviceCollective<B> + ?Sized>(
        &mut self,
        model: &mut Llama<B>,
        comm: &mut C,
        lr: f32,
    ) -> Result<StepStats> {
        let (n, valid) = (self.shard.n, self.shard.valid());
        check_len("model parameters", model.num_params(), n)?;
        check_len("world", comm.world(), self.shard.world)?;
        let be = &self.be;
        match &mut self.pad {
            None => {
                comm.reduce_scatter_sum_buf(B::all(&model.grads), B::all_mut(&mut self.gshard))?
            }
            Some(pad) => {
                // The tail [n, padded) is zero: the all-gather fills it from the shards'
                // padding, which AdamW never touches.
                be.copy(B::slice_mut(pad, 0, n), B::all(&model.grads))?;
                comm.reduce_scatter_sum_buf(B::all(pad), B::all_mut(&mut self.gshard))?;
            }
        }

        // Each shard's Σg² in f64 (as AdamW), summed across ranks in f32: the norm agrees with
        // the single-process one to f32 rounding, and is the same bits on every rank.
        let mut ss = [be.sum_squares(B::slice(&self.gshard, 0, valid))? as f32];
        comm.all_reduce_sum(&mut ss)?;
        let grad_norm = ss[0].sqrt();
        let clip_scale = clip_scale(self.cfg.clip_norm, grad_norm)?;
        self.step += 1;
        for &(s, decay) in &self.groups {
            be.adamw(
                B::slice_mut(&mut self.master, s.off, s.len),
                None,
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
        self.gather_params(model, comm)?;
        Ok(StepStats {
            grad_norm,
            clip_scale,
        })
    }

    /// Sets the model's weights from the sharded fp32 masters (an all-gather, then the compute
    /// shadow refreshed on the device), so after a resume the compute weights come from the
    /// masters, not from a possibly bf16 model file.
    pub fn gather_params<C: DeviceCollective<B> + ?Sized>(
        &mut self,
        model: &mut Llama<B>,
        comm: &mut C,
    ) -> Result<()> {
        let n = self.shard.n;
        check_len("model parameters", model.num_params(), n)?;
        match &mut self.pad {
            None => comm.all_gather_buf(B::all(&self.master), B::all_mut(&mut model.master))?,
            Some(pad) => {
                comm.all_gather_buf(B::all(&self.master), B::all_mut(pad))?;
                self.be
                    .copy(B::all_mut(&mut model.master), B::slice(pad, 0, n))?;
            }
        }
        self.be.sync_shadow(&mut model.shadow, &model.master)
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
    /// weights one whole AdamW gives on the summed gradients.
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
        for world in [1, 2, 3, 5] {
            assert_eq!(n.is_multiple_of(world), world == 1 || world == 5);
            let mut reference = tiny_model();
            let mut adamw = AdamW::new(&reference, cfg).unwrap();
            let results = on_ranks(world, |mut c| {
                let r = c.rank();
                let mut m = tiny_model();
                let mut opt = ShardedAdamW::new(&m, cfg, r, world).unwrap();
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
                (m.master, traffic)
            });
            for step in 0..3 {
                let g: Vec<f32> = (0..n)
                    .map(|i| (0..world).map(|r| fake_grads(n, r + step, world)[i]).sum())
                    .collect();
                reference.grads = g;
                adamw.step(&mut reference, 1e-2).unwrap();
            }
            for (r, (w, traffic)) in results.iter().enumerate() {
                assert_eq!(
                    traffic,
                    &vec![Traffic::default(); 3],
                    "world {world} rank {r}"
                );
                assert_eq!(w, &results[0].0, "world {world}: ranks differ");
                let d = w
                    .iter()
                    .zip(&reference.master)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(d < 1e-6, "world {world}: {d} from whole AdamW");
            }
        }
    }

    #[test]
    fn length_mismatch_is_an_error() {
        let mut c = ThreadGroup::new(1).pop().unwrap();
        assert!(c.reduce_scatter_sum(&[1.0; 3], &mut [0.0; 2]).is_err());
        assert!(c.all_gather(&[1.0; 2], &mut [0.0; 3]).is_err());
    }
}
