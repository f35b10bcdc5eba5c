//! The reward, as the Llama 2 paper combines its two reward models (§3.2.2, §3.2.3): one place
//! for the threshold, the sigmoid and logit between scores and probabilities, the piecewise rule,
//! and the helpfulness and safety reward models that rejection sampling, PPO, the labellers and
//! the evaluation score with.
//!
//! Our reward models output unbounded scores s (trained with the ranking loss on score
//! differences); the paper's R is the probability σ(s), so the threshold applies to σ(s_safety)
//! and LOGIT(σ(s)) gives back s (clamped away from 0 and 1).

use crate::rm::{load_rm, score};
use anyhow::Result;
use engine::tokenizer::{Message, Tokenizer};
use engine::{Backend, Llama};
use std::path::Path;

/// The paper's safety threshold: below this safety probability the safety reward decides.
pub const SAFETY_THRESHOLD: f32 = 0.15;
/// Probabilities are clamped to [P_EPS, 1 − P_EPS] before the logit.
pub const P_EPS: f32 = 1e-6;

/// σ(s): a reward model's score as the paper's probability-like reward.
pub fn sigmoid(s: f32) -> f32 {
    (1.0 / (1.0 + (-(s as f64)).exp())) as f32
}

/// log(p / (1 − p)), with p clamped to [1e-6, 1 − 1e-6] so 0 and 1 stay finite.
pub fn logit(p: f32) -> f32 {
    let p = (p as f64).clamp(P_EPS as f64, 1.0 - P_EPS as f64);
    (p / (1.0 - p)).ln() as f32
}

/// The paper's R_c on probabilities: the safety reward on safety prompts or when it is below
/// `threshold` (the response is probably unsafe whatever the prompt), else the helpfulness
/// reward.
pub fn piecewise(r_safety: f32, r_help: f32, is_safety_prompt: bool, threshold: f32) -> f32 {
    if is_safety_prompt || r_safety < threshold {
        r_safety
    } else {
        r_help
    }
}

/// R_c of two reward-model scores (logits): [`piecewise`] on their sigmoids.
pub fn piecewise_scores(
    safety_score: f32,
    help_score: f32,
    is_safety_prompt: bool,
    threshold: f32,
) -> f32 {
    piecewise(
        sigmoid(safety_score),
        sigmoid(help_score),
        is_safety_prompt,
        threshold,
    )
}

/// The gold R_c of a response to a world prompt: the same rule on the annotator's scores.
/// Returns (R_c, helpfulness, safety).
pub fn gold(
    ann: &crate::world::Annotator,
    messages: &[Message],
    is_safety_prompt: bool,
    text: &str,
    threshold: f32,
) -> (f32, f32, f32) {
    let s = ann.scores(messages, text);
    (
        piecewise(s.safety, s.helpfulness, is_safety_prompt, threshold),
        s.helpfulness,
        s.safety,
    )
}

/// What gives (prompt, response) rows their R_c (both reward models through the piecewise
/// rule), or a stand-in where a test needs scores it chose (rejection sampling's pool and
/// temperature sweep take this). [`Scorer`] is the one-model seam of GAtt and distillation.
pub trait RcScorer {
    /// R_c of each row; `safety` tags the safety prompts.
    fn rc(&mut self, rows: &[(Vec<Message>, String)], safety: &[bool]) -> Result<Vec<f32>>;
}

impl<B: Backend> RcScorer for RewardModels<B> {
    fn rc(&mut self, rows: &[(Vec<Message>, String)], safety: &[bool]) -> Result<Vec<f32>> {
        RewardModels::rc(self, rows, safety)
    }
}

/// The helpfulness and the safety reward model, loaded together (one serves as both when no
/// safety model is given), and what scores with them.
pub struct RewardModels<B: Backend> {
    pub help: (Llama<B>, Tokenizer),
    pub safety: Option<(Llama<B>, Tokenizer)>,
    pub threshold: f32,
    /// Rows per scoring forward.
    pub batch: usize,
    /// Rows are cut from the left to this many tokens (`None`: each model's context).
    pub seq_len: Option<usize>,
}

impl<B: Backend> RewardModels<B> {
    /// Loads the reward models (model or `train-rm` run directories).
    pub fn load(be: B, help: &Path, safety: Option<&Path>) -> Result<Self> {
        Ok(RewardModels {
            help: load_rm(be.clone(), help)?,
            safety: safety.map(|s| load_rm(be, s)).transpose()?,
            threshold: SAFETY_THRESHOLD,
            batch: 32,
            seq_len: None,
        })
    }

    /// The raw scores (helpfulness, safety) of (prompt, response) rows.
    pub fn scores(&mut self, rows: &[(Vec<Message>, String)]) -> Result<(Vec<f32>, Vec<f32>)> {
        let (batch, len) = (self.batch.max(1), self.seq_len);
        let seq = |m: &Llama<B>| len.unwrap_or(m.cfg.max_position_embeddings);
        let (m, t) = &mut self.help;
        let h = score(m, t, rows, seq(m), batch)?;
        let s = match &mut self.safety {
            Some((m, t)) => score(m, t, rows, seq(m), batch)?,
            None => h.clone(),
        };
        Ok((h, s))
    }

    /// R_c of each (prompt, response) row; `safety` tags the safety prompts.
    pub fn rc(&mut self, rows: &[(Vec<Message>, String)], safety: &[bool]) -> Result<Vec<f32>> {
        let (h, s) = self.scores(rows)?;
        Ok(h.iter()
            .zip(&s)
            .zip(safety)
            .map(|((&h, &s), &is_s)| piecewise_scores(s, h, is_s, self.threshold))
            .collect())
    }
}

/// Scores (prompt, response) rows with one reward model: the seam GAtt and context distillation
/// judge their samples through, so their keep/select rules are testable with a fake scorer.
pub trait Scorer {
    fn score(&mut self, rows: &[(Vec<Message>, String)]) -> Result<Vec<f32>>;
}

/// One reward model as a [`Scorer`]: rows cut from the left to `seq_len` tokens, `batch` rows per
/// forward.
pub struct RmScorer<B: Backend> {
    pub model: Llama<B>,
    pub tok: Tokenizer,
    pub seq_len: usize,
    pub batch: usize,
}

impl<B: Backend> RmScorer<B> {
    /// Loads a reward model (model or `train-rm` run directory).
    pub fn load(be: B, dir: &Path, seq_len: usize, batch: usize) -> Result<Self> {
        let (model, tok) = load_rm(be, dir)?;
        Ok(RmScorer {
            model,
            tok,
            seq_len,
            batch: batch.max(1),
        })
    }
}

impl<B: Backend> Scorer for RmScorer<B> {
    fn score(&mut self, rows: &[(Vec<Message>, String)]) -> Result<Vec<f32>> {
        score(&mut self.model, &self.tok, rows, self.seq_len, self.batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_safety_reward_decides_below_the_threshold_and_on_safety_prompts() {
        assert_eq!(piecewise(0.9, 0.3, false, 0.15), 0.3);
        assert_eq!(piecewise(0.1, 0.8, false, 0.15), 0.1);
        assert_eq!(piecewise(0.9, 0.3, true, 0.15), 0.9);
        // Scores: σ(−2) ≈ 0.12 is under 0.15.
        assert!((piecewise_scores(-2.0, 3.0, false, 0.15) - sigmoid(-2.0)).abs() < 1e-7);
        assert!((logit(sigmoid(1.5)) - 1.5).abs() < 1e-5);
        assert!(logit(0.0).is_finite() && logit(1.0).is_finite());
    }
}
