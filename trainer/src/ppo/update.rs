//! The PPO update: one policy step on the clipped surrogate and one critic step on the clipped
//! value loss per minibatch, each rank backpropagating its contiguous part of the minibatch and
//! the optimizers summing the ranks' gradients (ZeRO-1 on several ranks).

use super::maths::{clipped_surrogate, clipped_value_loss};
use super::rollout::{mix, stream_order, Padded, Sample};
use super::{PpoConfig, Trainer};
use crate::optimizer::as_sink;
use anyhow::{anyhow, Result};
use engine::optim::AdamWConfig;
use engine::Backend;

/// AdamW as in pretraining, with the run's weight decay and gradient clip.
pub(super) fn adamw_cfg(cfg: &PpoConfig) -> AdamWConfig {
    AdamWConfig {
        weight_decay: cfg.weight_decay,
        clip_norm: (cfg.grad_clip > 0.0).then_some(cfg.grad_clip),
        ..AdamWConfig::default()
    }
}

/// What an iteration's updates sum up for the logs (over every rank once `update` returns).
#[derive(Default)]
pub(super) struct UpdateSums {
    pub(super) pg_sum: f64,
    pub(super) clip_n: usize,
    pub(super) vl_sum: f64,
    pub(super) vclip_n: usize,
    pub(super) akl_sum: f64,
    /// Response tokens updated (each minibatch's, over all ranks).
    pub(super) tok_n: usize,
    /// Sums of the policy's and the critic's gradient norms, and the steps they were taken over.
    pub(super) pgn: f64,
    pub(super) cgn: f64,
    pub(super) steps: usize,
}

impl<B: Backend> Trainer<'_, B> {
    /// Iteration `it`'s updates (0-based) on the whole batch `samples`: `ppo_epochs` passes over
    /// it in minibatches of (seed, iteration, epoch) order; the policy stays frozen during the
    /// critic warm-up.
    pub(super) fn update(&mut self, it: usize, samples: &[Sample]) -> Result<UpdateSums> {
        let cfg = &self.cfg;
        let (rank, world, pad) = (self.rank, self.world, self.pad);
        let mut u = UpdateSums::default();
        for epoch in 0..cfg.ppo_epochs {
            let order = stream_order(samples.len(), mix(cfg.seed, it, 2), epoch as u64);
            for mb in order.chunks(cfg.minibatch) {
                // The minibatch's token count over all ranks: each rank's backward is scaled by
                // it, so the ranks' gradients sum to the minibatch mean.
                let ntok: usize = mb.iter().map(|&i| samples[i].len()).sum();
                // This rank's contiguous part of the minibatch (possibly empty).
                let part = mb.len().div_ceil(world);
                let lo = (rank * part).min(mb.len());
                let hi = (lo + part).min(mb.len());
                let batch: Vec<&Sample> = mb[lo..hi].iter().map(|&i| &samples[i]).collect();
                let pb = Padded::new(&batch, pad);
                let active = !batch.is_empty();
                // Policy: the clipped surrogate, mean over the minibatch's response tokens.
                let train_policy = it >= cfg.critic_warmup;
                if train_policy && active {
                    self.policy.forward(&pb.batch())?;
                    let (lp, _) = self.policy.token_logprobs(&pb.targets)?;
                    let mut w = vec![0f32; pb.b * pb.t];
                    let mut k = 0;
                    for s in &batch {
                        for j in 0..s.len() {
                            let r = pb.rows[k] as usize;
                            let ratio = (lp[r] - s.logp_old[j]).exp();
                            let (l, d, c) = clipped_surrogate(ratio, s.adv[j], cfg.clip);
                            u.pg_sum += l as f64;
                            u.clip_n += usize::from(c);
                            u.akl_sum += 0.5 * ((lp[r] - s.logp_old[j]) as f64).powi(2);
                            w[r] = d / ntok as f32;
                            k += 1;
                        }
                    }
                    let mut sink = self.opt_p.overlap(self.comm.as_deref_mut(), cfg.bucket_mb);
                    self.policy.backward_logprobs_with(&w, as_sink(&mut sink))?;
                } else if train_policy {
                    // An empty part: the same buckets as the ranks that ran a backward.
                    if let Some(s) =
                        as_sink(&mut self.opt_p.overlap(self.comm.as_deref_mut(), cfg.bucket_mb))
                    {
                        self.policy.report_grads(s)?;
                    }
                }
                if train_policy {
                    let st = self
                        .opt_p
                        .step(&mut self.policy, self.comm.as_deref_mut(), cfg.lr)
                        .map_err(|e| anyhow!("iteration {}: policy step: {e}", it + 1))?;
                    self.policy.zero_grads()?;
                    u.pgn += st.grad_norm as f64;
                }
                // Critic: the clipped value loss at the same positions.
                if active {
                    self.critic.forward(&pb.batch())?;
                    let v = self.critic.scores(&pb.rows)?;
                    let mut dv = vec![0f32; v.len()];
                    let mut k = 0;
                    for s in &batch {
                        for j in 0..s.len() {
                            let (l, d) =
                                clipped_value_loss(v[k], s.values[j], s.ret[j], cfg.value_clip);
                            u.vl_sum += l as f64;
                            u.vclip_n += usize::from((v[k] - s.values[j]).abs() > cfg.value_clip);
                            dv[k] = d / ntok as f32;
                            k += 1;
                        }
                    }
                    let mut sink = self.opt_c.overlap(self.comm.as_deref_mut(), cfg.bucket_mb);
                    self.critic.backward_scores_with(&dv, as_sink(&mut sink))?;
                } else if let Some(s) =
                    as_sink(&mut self.opt_c.overlap(self.comm.as_deref_mut(), cfg.bucket_mb))
                {
                    self.critic.report_grads(s)?;
                }
                let st = self
                    .opt_c
                    .step(&mut self.critic, self.comm.as_deref_mut(), self.critic_lr)
                    .map_err(|e| anyhow!("iteration {}: critic step: {e}", it + 1))?;
                self.critic.zero_grads()?;
                u.cgn += st.grad_norm as f64;
                u.tok_n += ntok;
                u.steps += 1;
            }
        }
        if let Some(c) = self.comm.as_deref_mut() {
            // The ranks' shares of the loss sums (each rank's is in f64; the sum in f32).
            let mut sums = [
                u.pg_sum as f32,
                u.clip_n as f32,
                u.vl_sum as f32,
                u.vclip_n as f32,
                u.akl_sum as f32,
            ];
            c.all_reduce_sum(&mut sums)?;
            u.pg_sum = sums[0] as f64;
            u.clip_n = sums[1] as usize;
            u.vl_sum = sums[2] as f64;
            u.vclip_n = sums[3] as usize;
            u.akl_sum = sums[4] as f64;
        }
        Ok(u)
    }
}
