//! ZeRO-1: an AdamW whose fp32 master weights and moments are sharded across ranks, stepping
//! on backend buffers (reduce-scatter, AdamW on the owned shard, all-gather).

use super::{check_len, DeviceCollective};
use crate::backend::{AdamWStep, Backend};
use crate::error::{Error, Result};
use crate::model::{GradReady, Llama};
use crate::optim::{check_lr, clip_scale, decay_groups, AdamWConfig, StepStats};
use crate::params::Span;

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
            B::slice(model.master.held()?, lo, valid),
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
        let mut weights = model.master.compute_mut(be, &mut model.shadow);
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
        let mut weights = model.master.compute_mut(be, &mut model.shadow);
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
    use super::super::thread::{on_ranks, ThreadComm, ThreadGroup};
    use super::super::Collective;
    use super::*;
    use crate::backend::cpu::Cpu;

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
                    let w = m.master.compute(&Cpu, &m.shadow).to_vec();
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
                        .zip(reference.master.held().unwrap())
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
                        let w = m.master.compute(&Cpu, &m.shadow).to_vec();
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
}
