//! Rollouts: which prompts an iteration samples, the samples and their padded batches, the
//! policy's answers, their rewards, the log-probs under the policy and the reference and the
//! critic's values, the exchange of rollouts between ranks, and the per-token rewards and
//! advantages computed on the whole batch.

use super::maths::{explained_variance, gae, kl_per_token, leave_one_out, whiten};
use super::Trainer;
use crate::evaluate::chat_answers;
use crate::reward::{self, logit};
use anyhow::Result;
use engine::dist::Collective;
use engine::generate::SamplingParams;
use engine::tokenizer::Message;
use engine::{Backend, Batch, Llama};
use rand::SeedableRng;

/// Prompt `k` of the training stream: epoch `k / n` is a fresh permutation of (seed, epoch).
pub(super) fn stream_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    use rand::seq::SliceRandom;
    let mut v: Vec<usize> = (0..n).collect();
    v.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(
        seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15),
    ));
    v
}

/// The prompts of iteration `it` (0-based): `batch` consecutive entries of the stream.
pub fn iteration_prompts(n: usize, batch: usize, seed: u64, it: usize) -> Vec<usize> {
    let mut out = Vec::with_capacity(batch);
    let mut cached: Option<(u64, Vec<usize>)> = None;
    for k in it * batch..(it + 1) * batch {
        let epoch = (k / n) as u64;
        if cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
            cached = Some((epoch, stream_order(n, seed, epoch)));
        }
        out.push(cached.as_ref().expect("set").1[k % n]);
    }
    out
}

/// Per-iteration seed mixing: a distinct stream per (seed, iteration, purpose).
pub(super) fn mix(seed: u64, it: usize, purpose: u64) -> u64 {
    seed ^ (it as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ purpose.wrapping_mul(0xD1B5_4A32_D192_ED03)
}

/// One rollout: the prompt and response tokens and everything PPO computes about them.
#[derive(Clone, Debug, Default)]
pub(super) struct Sample {
    pub(super) prompt: usize,
    /// Prompt ids then response ids (the response includes the EOS when generation stopped).
    pub(super) ids: Vec<u32>,
    /// Prompt length: action j is ids[p + j], predicted at row p − 1 + j.
    pub(super) p: usize,
    pub(super) text: String,
    pub(super) logp_old: Vec<f32>,
    pub(super) logp_ref: Vec<f32>,
    pub(super) entropy: Vec<f32>,
    pub(super) values: Vec<f32>,
    pub(super) adv: Vec<f32>,
    pub(super) ret: Vec<f32>,
    /// R_c (probability-like) and R̃_c (whitened logit).
    pub(super) rc: f32,
    pub(super) reward: f32,
    pub(super) gold: Option<(f32, f32, f32)>,
}

impl Sample {
    pub(super) fn len(&self) -> usize {
        self.ids.len() - self.p
    }
}

/// Sequences padded right to the longest, targets −100 outside the responses, and the flat row
/// predicting each response token (sequence by sequence).
pub(super) struct Padded {
    pub(super) ids: Vec<i32>,
    pub(super) targets: Vec<i32>,
    pub(super) b: usize,
    pub(super) t: usize,
    pub(super) rows: Vec<i32>,
}

impl Padded {
    pub(super) fn new(samples: &[&Sample], pad: u32) -> Padded {
        let t = samples.iter().map(|s| s.ids.len()).max().unwrap_or(1);
        let b = samples.len();
        let mut ids = vec![pad as i32; b * t];
        let mut targets = vec![-100i32; b * t];
        let mut rows = Vec::new();
        for (bi, s) in samples.iter().enumerate() {
            for (j, &x) in s.ids.iter().enumerate() {
                ids[bi * t + j] = x as i32;
            }
            for j in 0..s.len() {
                let r = bi * t + s.p - 1 + j;
                targets[r] = s.ids[s.p + j] as i32;
                rows.push(r as i32);
            }
        }
        Padded {
            ids,
            targets,
            b,
            t,
            rows,
        }
    }

    pub(super) fn batch(&self) -> Batch<'_> {
        Batch::new(&self.ids, self.b, self.t)
    }

    /// Splits per-position values [b·t] into per-sample response vectors.
    fn gather(&self, x: &[f32], samples: &[&Sample]) -> Vec<Vec<f32>> {
        let mut k = 0;
        samples
            .iter()
            .map(|s| {
                let v = self.rows[k..k + s.len()]
                    .iter()
                    .map(|&r| x[r as usize])
                    .collect();
                k += s.len();
                v
            })
            .collect()
    }
}

/// Log-probs and entropies of every sample's response under `model`, `chunk` sequences a forward.
pub(super) fn response_logprobs<B: Backend>(
    model: &mut Llama<B>,
    samples: &[&Sample],
    chunk: usize,
    pad: u32,
) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
    let mut out = Vec::with_capacity(samples.len());
    for c in samples.chunks(chunk.max(1)) {
        let pb = Padded::new(c, pad);
        model.forward(&pb.batch())?;
        let (lp, ent) = model.token_logprobs(&pb.targets)?;
        out.extend(pb.gather(&lp, c).into_iter().zip(pb.gather(&ent, c)));
    }
    Ok(out)
}

/// The critic's values at every response position.
pub(super) fn response_values<B: Backend>(
    critic: &mut Llama<B>,
    samples: &[&Sample],
    chunk: usize,
    pad: u32,
) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(samples.len());
    for c in samples.chunks(chunk.max(1)) {
        let pb = Padded::new(c, pad);
        critic.forward(&pb.batch())?;
        let v = critic.scores(&pb.rows)?;
        let mut k = 0;
        for s in c {
            out.push(v[k..k + s.len()].to_vec());
            k += s.len();
        }
    }
    Ok(out)
}

/// Every rank's `local` values, concatenated in rank order (lengths may differ).
fn gather_var<C: Collective + ?Sized>(comm: &mut C, local: &[f32]) -> Result<Vec<f32>> {
    let w = comm.world();
    let mut lens = vec![0f32; w];
    comm.all_gather(&[local.len() as f32], &mut lens)?;
    let max = lens.iter().fold(0f32, |a, &b| a.max(b)) as usize;
    let mut padded = local.to_vec();
    padded.resize(max, 0.0);
    let mut all = vec![0f32; max * w];
    comm.all_gather(&padded, &mut all)?;
    let mut out = Vec::new();
    for (r, &l) in lens.iter().enumerate() {
        out.extend_from_slice(&all[r * max..r * max + l as usize]);
    }
    Ok(out)
}

impl Sample {
    /// What the other ranks need of a rollout, as f32 (token ids are exact below 2^24):
    /// [ids, p, prompt, rc, has gold, gold×3, ids…, logp_old…, logp_ref…, entropy…, values…].
    fn encode(&self, out: &mut Vec<f32>) {
        let g = self.gold.unwrap_or_default();
        out.extend([
            self.ids.len() as f32,
            self.p as f32,
            self.prompt as f32,
            self.rc,
            f32::from(u8::from(self.gold.is_some())),
            g.0,
            g.1,
            g.2,
        ]);
        out.extend(self.ids.iter().map(|&x| x as f32));
        for v in [&self.logp_old, &self.logp_ref, &self.entropy, &self.values] {
            out.extend_from_slice(v);
        }
    }

    fn decode(x: &[f32]) -> Vec<Sample> {
        let mut out = Vec::new();
        let mut k = 0;
        while k < x.len() {
            let (n, p) = (x[k] as usize, x[k + 1] as usize);
            let mut s = Sample {
                prompt: x[k + 2] as usize,
                p,
                rc: x[k + 3],
                gold: (x[k + 4] != 0.0).then_some((x[k + 5], x[k + 6], x[k + 7])),
                ..Default::default()
            };
            k += 8;
            s.ids = x[k..k + n].iter().map(|&v| v as u32).collect();
            k += n;
            let r = n - p;
            let mut take = || {
                let v = x[k..k + r].to_vec();
                k += r;
                v
            };
            s.logp_old = take();
            s.logp_ref = take();
            s.entropy = take();
            s.values = take();
            out.push(s);
        }
        out
    }
}

/// An iteration's batch of rollouts, on every rank, with what the logs need of it.
pub(super) struct Rollout {
    pub(super) samples: Vec<Sample>,
    /// R_c of each rollout.
    pub(super) rc: Vec<f32>,
    /// LOGIT(R_c) (or the oracle's score), after the leave-one-out baseline.
    pub(super) logits: Vec<f32>,
    /// Σ over the batch of each response's Σ_t KL_t.
    pub(super) kl_sum: f64,
    /// Responses that ended with an EOS.
    pub(super) n_stopped: usize,
    pub(super) explained_variance: f32,
}

impl<B: Backend> Trainer<'_, B> {
    /// Iteration `it`'s rollouts (0-based): this rank samples, rewards and scores its share, then
    /// every rank gets the whole batch and computes its rewards and advantages identically.
    pub(super) fn rollout(&mut self, it: usize) -> Result<Rollout> {
        let cfg = &self.cfg;
        let (rank, world) = (self.rank, self.world);
        let (tok, train_p) = (&self.tok, &self.train_p);
        let group = cfg.samples_per_prompt.clamp(1, cfg.batch.max(1));
        let idx: Vec<usize> =
            iteration_prompts(train_p.len(), cfg.batch.div_ceil(group), cfg.seed, it)
                .into_iter()
                .flat_map(|i| std::iter::repeat_n(i, group))
                .take(cfg.batch)
                .collect();
        // This rank's share: whole generation chunks, seeded as one process seeds them.
        let per_rank = cfg.batch / world;
        let mine = &idx[rank * per_rank..(rank + 1) * per_rank];
        let first_chunk = (rank * per_rank / cfg.gen_batch.max(1)) as u64;
        let dialogues: Vec<Vec<Message>> =
            mine.iter().map(|&i| train_p[i].messages.clone()).collect();
        let params = SamplingParams {
            temperature: cfg.temperature,
            top_p: cfg.top_p,
            max_new_tokens: cfg.max_new_tokens,
            seed: mix(cfg.seed, it, 1).wrapping_add(first_chunk),
            stop: vec![tok.eos],
            ..Default::default()
        };
        let answers = chat_answers(&mut self.policy, tok, &dialogues, &params, cfg.gen_batch)?;
        let mut samples: Vec<Sample> = mine
            .iter()
            .zip(answers)
            .map(|(&pi, a)| {
                let mut ids = a.prompt_ids.clone();
                ids.extend(&a.gen.tokens);
                if a.gen.stopped || a.gen.tokens.is_empty() {
                    ids.push(tok.eos);
                }
                Sample {
                    prompt: pi,
                    p: a.prompt_ids.len(),
                    ids,
                    text: a.text,
                    ..Default::default()
                }
            })
            .collect();
        // ---- rewards: R_c (whitened over the whole batch in `advantages`)
        let rows: Vec<(Vec<Message>, String)> = samples
            .iter()
            .map(|s| (train_p[s.prompt].messages.clone(), s.text.clone()))
            .collect();
        let safety: Vec<bool> = samples.iter().map(|s| train_p[s.prompt].safety).collect();
        let rc = match (&self.ann, cfg.oracle) {
            (Some(ann), true) => samples
                .iter()
                .map(|s| {
                    let p = &train_p[s.prompt];
                    reward::gold(ann, &p.messages, p.safety, &s.text, cfg.safety_threshold).0
                })
                .collect(),
            _ => self.rewards.rc(&rows, &safety)?,
        };
        for (s, &r) in samples.iter_mut().zip(&rc) {
            s.rc = r;
            if let Some(ann) = &self.ann {
                let p = &train_p[s.prompt];
                s.gold = Some(reward::gold(
                    ann,
                    &p.messages,
                    p.safety,
                    &s.text,
                    cfg.safety_threshold,
                ));
            }
        }

        // ---- old log-probs, reference log-probs, values
        {
            let pad = self.pad;
            let refs: Vec<&Sample> = samples.iter().collect();
            let old = response_logprobs(&mut self.policy, &refs, cfg.minibatch, pad)?;
            let rf = response_logprobs(&mut self.reference, &refs, cfg.minibatch, pad)?;
            let vals = response_values(&mut self.critic, &refs, cfg.minibatch, pad)?;
            for (s, (((lp, ent), (lr, _)), v)) in
                samples.iter_mut().zip(old.into_iter().zip(rf).zip(vals))
            {
                s.logp_old = lp;
                s.entropy = ent;
                s.logp_ref = lr;
                s.values = v;
            }
        }

        // ---- every rank's rollouts on every rank: the rest sees the whole batch
        if let Some(c) = self.comm.as_deref_mut() {
            let mut enc = Vec::new();
            for s in &samples {
                s.encode(&mut enc);
            }
            samples = Sample::decode(&gather_var(c, &enc)?);
        }
        Ok(self.advantages(samples, idx, group))
    }

    /// The batch-wide part, the same on every rank: WHITEN(LOGIT(R_c)) (after the leave-one-out
    /// baseline with several answers per prompt), the per-token rewards −β·KL_t with the score on
    /// the last token, GAE, and the advantages whitened over the batch's tokens.
    fn advantages(&self, mut samples: Vec<Sample>, idx: Vec<usize>, group: usize) -> Rollout {
        let cfg = &self.cfg;
        let rc: Vec<f32> = samples.iter().map(|s| s.rc).collect();
        let n_stopped = samples
            .iter()
            .filter(|s| s.ids.last() == Some(&self.tok.eos))
            .count();

        // The gold annotator's scores are not probabilities: the oracle whitens them as they are.
        let mut logits: Vec<f32> = if cfg.oracle {
            rc.clone()
        } else {
            rc.iter().map(|&r| logit(r)).collect()
        };
        if group > 1 {
            leave_one_out(&mut logits, &idx);
        }
        let white = whiten(&logits, false);
        for (s, &w) in samples.iter_mut().zip(&white) {
            s.reward = w;
        }

        // ---- per-token rewards and GAE
        let mut kl_sum = 0f64;
        for s in samples.iter_mut() {
            let kl = kl_per_token(&s.logp_old, &s.logp_ref);
            kl_sum += kl.iter().map(|&x| x as f64).sum::<f64>();
            let mut r: Vec<f32> = kl.iter().map(|k| -self.beta * k).collect();
            *r.last_mut().expect("non-empty response") += s.reward;
            let (a, ret) = gae(&r, &s.values, cfg.gamma, cfg.lam);
            s.adv = a;
            s.ret = ret;
        }
        if cfg.whiten_advantages {
            let all: Vec<f32> = samples.iter().flat_map(|s| s.adv.iter().copied()).collect();
            let w = whiten(&all, false);
            let mut k = 0;
            for s in samples.iter_mut() {
                let n = s.adv.len();
                s.adv.copy_from_slice(&w[k..k + n]);
                k += n;
            }
        }
        let all_v: Vec<f32> = samples
            .iter()
            .flat_map(|s| s.values.iter().copied())
            .collect();
        let all_r: Vec<f32> = samples.iter().flat_map(|s| s.ret.iter().copied()).collect();
        let explained_variance = explained_variance(&all_v, &all_r);
        Rollout {
            samples,
            rc,
            logits,
            kl_sum,
            n_stopped,
            explained_variance,
        }
    }
}
