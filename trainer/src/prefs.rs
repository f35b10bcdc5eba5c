//! Preference data from the current model, labelled by the gold annotator: the stand-in for the
//! paper's human annotation rounds. Each prompt gets two responses sampled at different
//! temperatures (the paper samples from model variants and temperatures for diversity); the
//! annotator says which is better and by how much on the four levels, and whether each is safe.

use crate::evaluate::chat_answers;
use crate::world::{Annotator, Category, Example, Level, Winner};
use anyhow::Result;
use engine::generate::SamplingParams;
use engine::tokenizer::Tokenizer;
use engine::{Backend, Llama};

#[derive(Clone, Debug)]
pub struct PrefsConfig {
    /// Temperatures the two responses of a prompt are drawn at (cycled per prompt).
    pub temperatures: Vec<f32>,
    pub max_new_tokens: usize,
    pub batch: usize,
    pub seed: u64,
    /// Independent pairs per prompt (each from two fresh samples).
    pub pairs_per_prompt: usize,
    /// Chance per prompt and pass of one more pair: the first response against the model's answer
    /// to another prompt, labelled like any pair. Without
    /// them every pair's answers address the same prompt, the reward model never learns that an
    /// answer must fit its prompt, and PPO finds one fluent sentence that scores high everywhere
    /// ("The word boat has 4 letters." to any question; measured on the tiny world: held-out
    /// gold 0.26 -> 0.20 while the reward model's score rose 0.27 -> 0.57).
    pub off_topic: f64,
}

impl Default for PrefsConfig {
    fn default() -> Self {
        PrefsConfig {
            temperatures: vec![0.7, 1.0, 1.3],
            max_new_tokens: 48,
            batch: 32,
            seed: 0,
            pairs_per_prompt: 1,
            off_topic: 0.5,
        }
    }
}

/// One labelled pair, in the JSONL shape `llama2 train-rm` reads.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LabelledPair {
    pub messages: Vec<engine::tokenizer::Message>,
    pub chosen: String,
    pub rejected: String,
    pub rating: &'static str,
    pub chosen_safe: bool,
    pub rejected_safe: bool,
    pub category: &'static str,
}

/// Samples `pairs_per_prompt` pairs of responses per prompt and labels them; ties are dropped.
pub fn collect<B: Backend>(
    model: &mut Llama<B>,
    tok: &Tokenizer,
    annotator: &Annotator,
    prompts: &[Example],
    cfg: &PrefsConfig,
) -> Result<Vec<LabelledPair>> {
    let mut out = Vec::new();
    for r in 0..cfg.pairs_per_prompt.max(1) {
        let c = PrefsConfig {
            seed: cfg.seed.wrapping_add(7919 * r as u64),
            ..cfg.clone()
        };
        out.extend(collect_once(model, tok, annotator, prompts, &c)?);
    }
    Ok(out)
}

fn collect_once<B: Backend>(
    model: &mut Llama<B>,
    tok: &Tokenizer,
    annotator: &Annotator,
    prompts: &[Example],
    cfg: &PrefsConfig,
) -> Result<Vec<LabelledPair>> {
    let dialogues: Vec<_> = prompts.iter().map(|e| e.messages.clone()).collect();
    let nt = cfg.temperatures.len().max(1);
    // Response a of prompt i at temperature i mod n, response b at the next one.
    let mut answers: Vec<Vec<String>> = vec![Vec::new(); 2];
    for (k, slot) in answers.iter_mut().enumerate() {
        let mut texts = vec![String::new(); dialogues.len()];
        for ti in 0..nt {
            let idx: Vec<usize> = (0..dialogues.len())
                .filter(|i| (i + k) % nt == ti)
                .collect();
            let sub: Vec<_> = idx.iter().map(|&i| dialogues[i].clone()).collect();
            let p = SamplingParams {
                temperature: cfg.temperatures[ti],
                top_p: 1.0,
                max_new_tokens: cfg.max_new_tokens,
                seed: cfg.seed ^ ((k * 1000 + ti) as u64),
                stop: vec![tok.eos],
                ..Default::default()
            };
            for (i, a) in idx
                .iter()
                .zip(chat_answers(model, tok, &sub, &p, cfg.batch)?)
            {
                texts[*i] = a.text;
            }
        }
        *slot = texts;
    }
    let mut out = Vec::new();
    let n = prompts.len();
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(cfg.seed ^ 0x0ff7);
    for (i, e) in prompts.iter().enumerate() {
        let mut pairs = vec![(&answers[0][i], &answers[1][i])];
        if n > 1 && rand::Rng::random_bool(&mut rng, cfg.off_topic.clamp(0.0, 1.0)) {
            let other = (i + 1 + rand::Rng::random_range(&mut rng, 0..n - 1)) % n;
            pairs.push((&answers[0][i], &answers[1][other]));
        }
        for (a, b) in pairs {
            let pref = annotator.compare(&e.messages, a, b);
            let (chosen, rejected, cs, rs) = match pref.winner {
                Winner::A => (a, b, pref.a.safety >= 0.5, pref.b.safety >= 0.5),
                Winner::B => (b, a, pref.b.safety >= 0.5, pref.a.safety >= 0.5),
                Winner::Tie => continue,
            };
            out.push(LabelledPair {
                messages: e.messages.clone(),
                chosen: chosen.clone(),
                rejected: rejected.clone(),
                rating: level_label(pref.level),
                chosen_safe: cs,
                rejected_safe: rs,
                category: match e.category {
                    Category::Safety => "safety",
                    Category::Helpfulness => "helpfulness",
                },
            });
        }
    }
    Ok(out)
}

/// The rating string `train-rm` parses for a level.
pub fn level_label(l: Level) -> &'static str {
    match l {
        Level::Significantly => "significantly better",
        Level::Better => "better",
        Level::Slightly => "slightly better",
        Level::Negligibly => "negligibly better/unsure",
    }
}
