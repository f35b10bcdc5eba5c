//! Held-out evaluation: answers to the held-out prompts scored by the reward models (and the
//! gold annotator), the best policy kept in `best/`, and early stopping on the held-out reward.

use super::{EvalStats, PpoConfig, Trainer};
use crate::evaluate::chat_answers;
use crate::formats::Prompt;
use crate::reward::{self, logit, RewardModels};
use crate::world::Annotator;
use anyhow::{anyhow, Result};
use engine::checkpoint::{save_model, SaveOptions};
use engine::generate::SamplingParams;
use engine::tokenizer::{Message, Tokenizer};
use engine::{Backend, Llama};

/// Answers to the held-out prompts (greedy, or `cfg.eval_samples` samples each), scored by the
/// reward models (and the annotator).
#[allow(clippy::too_many_arguments)]
fn evaluate<B: Backend>(
    policy: &mut Llama<B>,
    tok: &Tokenizer,
    rewards: &mut RewardModels<B>,
    ann: Option<&Annotator>,
    prompts: &[Prompt],
    cfg: &PpoConfig,
    iteration: usize,
) -> Result<EvalStats> {
    let k = cfg.eval_samples.max(1);
    let prompts: Vec<&Prompt> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p, k))
        .collect();
    let dialogues: Vec<Vec<Message>> = prompts.iter().map(|p| p.messages.clone()).collect();
    let params = SamplingParams {
        temperature: if cfg.eval_samples == 0 {
            0.0
        } else {
            cfg.temperature
        },
        top_p: cfg.top_p,
        max_new_tokens: cfg.max_new_tokens,
        stop: vec![tok.eos],
        // The same draws at every evaluation, so evaluations differ only by the policy.
        seed: cfg.seed ^ 0x5eed_e7a1,
        ..Default::default()
    };
    let answers = chat_answers(policy, tok, &dialogues, &params, cfg.gen_batch)?;
    let rows: Vec<(Vec<Message>, String)> = prompts
        .iter()
        .zip(&answers)
        .map(|(p, a)| (p.messages.clone(), a.text.clone()))
        .collect();
    let safety: Vec<bool> = prompts.iter().map(|p| p.safety).collect();
    let rc = rewards.rc(&rows, &safety)?;
    let n = prompts.len().max(1) as f32;
    let mut ev = EvalStats {
        iteration,
        prompts: prompts.len() / k,
        samples: cfg.eval_samples,
        reward: rc.iter().sum::<f32>() / n,
        score: rc.iter().map(|&r| logit(r)).sum::<f32>() / n,
        response_len: answers
            .iter()
            .map(|a| a.gen.tokens.len() as f32)
            .sum::<f32>()
            / n,
        ..Default::default()
    };
    if let Some(ann) = ann {
        let (mut g, mut h, mut s) = (0f32, 0f32, 0f32);
        for (p, a) in prompts.iter().zip(&answers) {
            let x = reward::gold(ann, &p.messages, p.safety, &a.text, cfg.safety_threshold);
            g += x.0;
            h += x.1;
            s += x.2;
        }
        ev.gold_reward = Some(g / n);
        ev.gold_helpfulness = Some(h / n);
        ev.gold_safety = Some(s / n);
    }
    Ok(ev)
}

impl<B: Backend> Trainer<'_, B> {
    /// Rank 0's held-out evaluation of the current policy (None elsewhere, or with no held-out
    /// prompts or evaluations off).
    fn eval_now(&mut self, it: usize) -> Result<Option<EvalStats>> {
        if self.eval_p.is_empty() || self.cfg.eval_every == 0 || !self.lead {
            return Ok(None);
        }
        let ann = self.ann.as_ref();
        Ok(Some(evaluate(
            &mut self.policy,
            &self.tok,
            &mut self.rewards,
            ann,
            &self.eval_p,
            &self.cfg,
            it,
        )?))
    }

    /// The starting point's held-out reward (the SFT baseline on a fresh run).
    pub(super) fn baseline_eval(&mut self) -> Result<()> {
        if let Some(ev) = self.eval_now(0)? {
            self.say(eval_line(&ev));
            if let Some(m) = &mut self.metrics {
                m.write(&serde_json::json!({"eval": &ev, "step": 0}))?;
            }
            self.best_eval = Some(ev.reward);
            self.best = Some(ev.clone());
            self.evals.push(ev);
        }
        Ok(())
    }

    /// Every `eval_every` iterations: the held-out evaluation, `best/` on a new best, and early
    /// stopping (rank 0 evaluates and decides; the decision, or its failure, reaches every rank).
    pub(super) fn maybe_eval(&mut self, it: usize) -> Result<()> {
        if !(self.cfg.eval_every > 0 && it % self.cfg.eval_every == 0) {
            return Ok(());
        }
        let mut decided = self.eval_and_decide(it);
        if let Some(c) = self.comm.as_deref_mut() {
            // Rank 0's decision (or its failure) on every rank.
            let mut x = [0f32; 2];
            if self.lead {
                x = match &decided {
                    Ok(stop) => [f32::from(u8::from(*stop)), 0.0],
                    Err(_) => [0.0, 1.0],
                };
            }
            c.all_reduce_sum(&mut x)?;
            if !self.lead {
                decided = if x[1] != 0.0 {
                    Err(anyhow!(
                        "iteration {it}: the held-out evaluation failed on rank 0"
                    ))
                } else {
                    Ok(x[0] != 0.0)
                };
            }
        }
        if decided? {
            self.say(format!(
                "early stop at iteration {it}: no better held-out reward in {} evaluations (best {:.4})",
                self.since_best,
                self.best_eval.unwrap_or(f32::NAN)
            ));
            self.stopped_early = true;
        }
        Ok(())
    }

    /// Evaluates, logs, keeps a new best in `best/`; whether patience has run out.
    fn eval_and_decide(&mut self, it: usize) -> Result<bool> {
        let Some(ev) = self.eval_now(it)? else {
            return Ok(false);
        };
        self.say(eval_line(&ev));
        let mut rec = serde_json::json!({"eval": &ev});
        rec["step"] = it.into();
        if let Some(m) = &mut self.metrics {
            m.write(&rec)?;
        }
        if self.best_eval.is_none_or(|b| ev.reward > b) {
            self.best_eval = Some(ev.reward);
            self.since_best = 0;
            self.best = Some(ev.clone());
            let tok_path = &self.tok_path;
            save_model(
                &self.policy,
                &self.best_dir,
                SaveOptions::default(),
                |tmp| {
                    std::fs::copy(tok_path, tmp.join("tokenizer.json"))
                        .map(|_| ())
                        .map_err(|e| engine::Error::io(tok_path, e))
                },
            )?;
        } else {
            self.since_best += 1;
        }
        self.evals.push(ev);
        Ok(self.cfg.patience > 0 && self.since_best >= self.cfg.patience)
    }
}

fn eval_line(ev: &EvalStats) -> String {
    format!(
        "iteration {}: held-out reward {:.4}{} over {} prompts, mean length {:.1}",
        ev.iteration,
        ev.reward,
        match (ev.gold_reward, ev.gold_helpfulness, ev.gold_safety) {
            (Some(g), Some(h), Some(s)) =>
                format!(" (gold {g:.4}: helpfulness {h:.4}, safety {s:.4})"),
            _ => String::new(),
        },
        ev.prompts,
        ev.response_len
    )
}
