//! One optimizer for a training loop run as one process or as one rank of N: whole AdamW, or
//! its ZeRO-1 shard (`engine::dist::ShardedAdamW`). Pretraining, SFT and PPO share it.

use anyhow::Result;
use engine::checkpoint::TensorFiles;
use engine::dist::{read_shard_state, DeviceCollective, Overlap, ShardedAdamW, MANIFEST};
use engine::optim::{AdamW, AdamWConfig, StepStats};
use engine::{Backend, GradReady, Llama};
use std::path::Path;

pub(crate) enum Optim<B: Backend> {
    Whole(AdamW<B>),
    Sharded(ShardedAdamW<B>),
}

impl<B: Backend> Optim<B> {
    /// A fresh optimizer for `model`: sharded when there is a communicator.
    pub(crate) fn new(
        model: &mut Llama<B>,
        cfg: AdamWConfig,
        comm: Option<&mut (dyn DeviceCollective<B> + '_)>,
    ) -> Result<Self> {
        Ok(match comm {
            Some(c) => Optim::Sharded(ShardedAdamW::new(model, cfg, c.rank(), c.world())?),
            None => Optim::Whole(AdamW::new(model, cfg)?),
        })
    }

    /// The optimizer state of a checkpoint, for this process's place in the run. A ZeRO-1 one
    /// (`zero1_dir` has a manifest, written by any world size) is re-sharded, and the model's
    /// weights are set from its fp32 masters; a single-process one (`whole`'s
    /// `optimizer.safetensors`, tensors `[prefix.]adamw.m/v`, at AdamW step `step`) is used whole
    /// or split into shards.
    pub(crate) fn load(
        model: &mut Llama<B>,
        cfg: AdamWConfig,
        zero1_dir: &Path,
        whole: &Path,
        prefix: &str,
        step: u64,
        comm: Option<&mut (dyn DeviceCollective<B> + '_)>,
    ) -> Result<Self> {
        let n = model.table.total;
        let zero1 = zero1_dir.join(MANIFEST).is_file();
        let read_whole = || -> Result<(Vec<f32>, Vec<f32>)> {
            let f = TensorFiles::open(&whole.join("optimizer.safetensors"))?;
            let dot = if prefix.is_empty() { "" } else { "." };
            let [m, v] = ["m", "v"].map(|x| {
                f.read_f32_shaped(
                    &format!("{prefix}{dot}adamw.{x}"),
                    &[n],
                    "the model's parameter count",
                )
            });
            Ok((m?, v?))
        };
        match comm {
            Some(c) => {
                let (rank, world) = (c.rank(), c.world());
                if zero1 {
                    let mut o = ShardedAdamW::load(model, cfg, rank, world, zero1_dir)?;
                    o.gather_params(model, c)?;
                    Ok(Optim::Sharded(o))
                } else {
                    let mut o = ShardedAdamW::new(model, cfg, rank, world)?;
                    let (m, v) = read_whole()?;
                    let (lo, k) = (o.shard.off.min(n), o.shard.valid());
                    o.set_moments(&m[lo..lo + k], &v[lo..lo + k])?;
                    o.step = step;
                    Ok(Optim::Sharded(o))
                }
            }
            None => {
                let mut opt = AdamW::new(model, cfg)?;
                let (m, v, step) = if zero1 {
                    let (st, [master, m, v]) = read_shard_state(zero1_dir, n, 0, 1)?;
                    model.set_params(&master)?;
                    (m, v, st)
                } else {
                    let (m, v) = read_whole()?;
                    (m, v, step)
                };
                model.be.from_host(B::all_mut(&mut opt.m), &m)?;
                model.be.from_host(B::all_mut(&mut opt.v), &v)?;
                opt.step = step;
                Ok(Optim::Whole(opt))
            }
        }
    }

    /// AdamW steps taken.
    pub(crate) fn steps(&self) -> u64 {
        match self {
            Optim::Whole(o) => o.step,
            Optim::Sharded(o) => o.step,
        }
    }

    /// The gradient sink for the last backward before [`Optim::step`]: under ZeRO-1 with
    /// `bucket_mb` > 0, the gradients are reduce-scattered in buckets of that many MiB while
    /// the backward runs (on NCCL, overlapping it); otherwise none, and the step reduces them
    /// all at once. Use it on the last micro-batch of an accumulated step only.
    pub(crate) fn overlap<'a, 'c>(
        &'a mut self,
        comm: Option<&'a mut (dyn DeviceCollective<B> + 'c)>,
        bucket_mb: f64,
    ) -> Option<Overlap<'a, B, dyn DeviceCollective<B> + 'c>> {
        match (self, comm) {
            (Optim::Sharded(o), Some(c)) if bucket_mb > 0.0 => {
                Some(o.overlap(c, bucket_elems(bucket_mb)))
            }
            _ => None,
        }
    }

    pub(crate) fn step(
        &mut self,
        model: &mut Llama<B>,
        comm: Option<&mut (dyn DeviceCollective<B> + '_)>,
        lr: f32,
    ) -> engine::Result<StepStats> {
        match (self, comm) {
            (Optim::Whole(o), _) => o.step(model, lr),
            (Optim::Sharded(o), Some(c)) => o.step(model, c, lr),
            (Optim::Sharded(_), None) => unreachable!("a sharded optimizer has a communicator"),
        }
    }
}

/// A bucket size the loops accept: finite and ≥ 0 (0: no buckets).
pub(crate) fn check_bucket_mb(mb: f64) -> Result<()> {
    anyhow::ensure!(
        mb.is_finite() && mb >= 0.0,
        "bucket size (--bucket-mb) must be a finite number of MiB ≥ 0, got {mb}"
    );
    Ok(())
}

/// PyTorch DDP's default bucket size; any layer of a 1B-class model or larger is a bucket
/// of its own.
pub(crate) fn default_bucket_mb() -> f64 {
    25.0
}

/// f32 gradients in a bucket of `mb` MiB (at least one).
pub(crate) fn bucket_elems(mb: f64) -> usize {
    ((mb * (1 << 20) as f64 / 4.0) as usize).max(1)
}

/// A backward's optional sink as the model's backward takes it.
pub(crate) fn as_sink<B: Backend, S: GradReady<B>>(
    s: &mut Option<S>,
) -> Option<&mut dyn GradReady<B>> {
    s.as_mut().map(|s| s as &mut dyn GradReady<B>)
}

/// What a step whose gradient norm is not finite reports: `msg` (the optimizer's) and the first
/// gradient tensor holding a non-finite value, or, when every value is finite but the norm
/// overflows f32, the tensor with the largest gradient. Pretraining, SFT and reward-model
/// training share it.
pub(crate) fn nonfinite_grads<B: Backend>(model: &Llama<B>, msg: &str) -> Result<String> {
    let g = model.grads_to_host()?;
    if let Some(name) = model.table.first_nonfinite(&g) {
        return Ok(format!("{msg}; first non-finite gradient: {name}"));
    }
    let largest = model
        .table
        .entries
        .iter()
        .map(|e| {
            let m = g[e.span.off..e.span.off + e.span.len]
                .iter()
                .fold(0f32, |m, x| m.max(x.abs()));
            (m, e.name.as_str())
        })
        .max_by(|a, b| a.0.total_cmp(&b.0));
    Ok(match largest {
        Some((m, name)) => format!(
            "{msg}; every gradient is finite but their norm overflows: the largest is {name} (max |g| {m:e})"
        ),
        None => msg.to_string(),
    })
}
