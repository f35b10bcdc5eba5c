//! Safety context distillation (`llama2 distill-safety`, Llama 2 §4.2.4).
//!
//! A model answers adversarial prompts more safely when a safety preprompt ("You are a safe and
//! responsible assistant...") comes first. Context distillation bakes that in: generate answers
//! with the preprompt, then fine-tune on (the prompt *without* the preprompt, that answer).
//!
//! As in the paper:
//! - only adversarial prompts are used (the world's `rlhf_prompts.jsonl` rows of category
//!   `safety`); on helpful prompts the preprompt mostly adds false refusals;
//! - the preprompt is targeted by default: the generic one plus an answer template for the
//!   request's harm ([`safety_preprompt`], the paper's per-risk-category templates);
//! - the safety reward model decides what is kept: a distilled answer is kept only when it scores
//!   higher than the model's answer without the preprompt, both scored against the prompt
//!   without the preprompt (what the fine-tuned model will see). This guards against the
//!   preprompt making answers worse (vaguer, or refusing in a less useful way).
//!
//! The preprompt goes into the system message (prefixed to an existing one): in Llama 2's chat
//! template the system message is rendered as a prefix of the first user turn, which is what
//! "prefixing the prompt" means there, and the user's text stays byte-identical, so the prompt
//! without the preprompt is exactly the original row.

use crate::evaluate::{chat_answers, greedy, world_eval, WorldEval};
use crate::sft::SftConfig;
use crate::world::safety::{safety_preprompt, SAFETY_PREPROMPT};
use crate::world::{read_examples, Annotator, Category, Example, Spec, World};
use anyhow::{Context, Result};
use engine::checkpoint::load_model;
use engine::generate::SamplingParams;
use engine::tokenizer::{Message, Tokenizer};
use engine::{Backend, Head, Llama};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Settings of `llama2 distill-safety`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillConfig {
    /// The model to distill into (a checkpoint or its run directory).
    pub init: PathBuf,
    /// The safety reward model that decides which answers are kept.
    pub safety_rm: PathBuf,
    /// The world whose safety prompts are used.
    pub world: PathBuf,
    /// Writes `distill.jsonl`, `candidates.jsonl`, the fine-tune (`sft/`), `report.json` here.
    pub out: PathBuf,
    /// The targeted preprompt (generic text + the harm's answer template) rather than the
    /// generic [`SAFETY_PREPROMPT`] alone.
    pub targeted: bool,
    /// Temperature of both answers (0: greedy).
    pub temperature: f32,
    pub max_new_tokens: usize,
    pub seed: u64,
    /// Dialogues per generation batch.
    pub batch: usize,
    /// Use at most this many safety prompts (0: all).
    pub max_prompts: usize,
    /// The reward model's sequence length and rows per forward.
    pub rm_seq_len: usize,
    pub rm_batch: usize,
    /// Held-out `eval.jsonl` rows for the before/after gold evaluation (0: all; the safety rows
    /// measure the safe rate, the others false refusals).
    pub eval_prompts: usize,
    /// Extra dialogue files mixed into the fine-tune (e.g. the world's `sft.jsonl`).
    pub replay: Vec<PathBuf>,
    // The fine-tune (`sft::run` with these settings).
    pub epochs: usize,
    pub lr: f32,
    pub seq_len: usize,
    pub batch_size: usize,
    pub progress: bool,
}

impl Default for DistillConfig {
    fn default() -> Self {
        DistillConfig {
            init: PathBuf::new(),
            safety_rm: PathBuf::new(),
            world: PathBuf::new(),
            out: PathBuf::new(),
            targeted: true,
            temperature: 0.0,
            max_new_tokens: 48,
            seed: 0,
            batch: 64,
            max_prompts: 0,
            rm_seq_len: 256,
            rm_batch: 16,
            eval_prompts: 0,
            replay: vec![],
            epochs: 2,
            lr: 2e-5,
            seq_len: 256,
            batch_size: 8,
            progress: true,
        }
    }
}

/// The preprompt for one prompt: targeted at its harm when the annotator recognises one (and
/// `targeted`), the generic one otherwise.
pub fn preprompt_for(annotator: &Annotator, messages: &[Message], targeted: bool) -> String {
    if targeted {
        if let Some(it) = annotator.interpret(messages) {
            if let Spec::Refuse { harm, .. } = it.gold.spec {
                if let Some(h) = annotator.world().harms.get(harm) {
                    return safety_preprompt(h);
                }
            }
        }
    }
    SAFETY_PREPROMPT.to_string()
}

/// `messages` with `preprompt` as (a prefix of) the system message.
pub fn with_preprompt(messages: &[Message], preprompt: &str) -> Vec<Message> {
    let mut m = messages.to_vec();
    match m.first_mut() {
        Some(s) if s.role == "system" => s.content = format!("{preprompt} {}", s.content),
        _ => m.insert(0, Message::new("system", preprompt)),
    }
    m
}

/// One prompt's two answers and their safety-RM scores.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Candidate {
    /// The prompt without the preprompt.
    pub messages: Vec<Message>,
    pub preprompt: String,
    pub with_preprompt: String,
    pub without_preprompt: String,
    pub score_with: f32,
    pub score_without: f32,
}

impl Candidate {
    /// Whether distillation keeps it: the preprompted answer must score higher.
    pub fn kept(&self) -> bool {
        self.score_with > self.score_without
    }

    /// The SFT row: the prompt without the preprompt and the preprompted answer, only that
    /// answer learned; the scores ride along for inspection (the SFT reader ignores them).
    pub fn row(&self) -> serde_json::Value {
        let mut m = self.messages.clone();
        m.push(Message::new("assistant", &self.with_preprompt));
        serde_json::json!({
            "messages": m,
            "learn": "last",
            "score_with": self.score_with,
            "score_without": self.score_without,
            "answer_without": self.without_preprompt,
        })
    }
}

/// What [`build_data`] made.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DistillData {
    pub candidates: Vec<Candidate>,
    /// Rows of the kept candidates (`distill.jsonl`).
    pub rows: Vec<serde_json::Value>,
    pub mean_score_with: f32,
    pub mean_score_without: f32,
}

/// The adversarial prompts of a prompt file: category `safety` (at most `max`, 0: all).
pub fn safety_prompts(prompts: &[Example], max: usize) -> Vec<Example> {
    let it = prompts
        .iter()
        .filter(|e| e.category == Category::Safety)
        .cloned();
    if max == 0 {
        it.collect()
    } else {
        it.take(max).collect()
    }
}

/// Answers every prompt with and without its preprompt, scores both answers with the safety
/// reward model `rm` against the prompt without the preprompt, and keeps the preprompted answers
/// that score higher.
#[allow(clippy::too_many_arguments)]
pub fn build_data<B: Backend>(
    model: &mut Llama<B>,
    tok: &Tokenizer,
    rm: &mut Llama<B>,
    rm_tok: &Tokenizer,
    annotator: &Annotator,
    prompts: &[Example],
    cfg: &DistillConfig,
) -> Result<DistillData> {
    let plain: Vec<Vec<Message>> = prompts.iter().map(|e| e.messages.clone()).collect();
    let pre: Vec<String> = plain
        .iter()
        .map(|m| preprompt_for(annotator, m, cfg.targeted))
        .collect();
    let prefixed: Vec<Vec<Message>> = plain
        .iter()
        .zip(&pre)
        .map(|(m, p)| with_preprompt(m, p))
        .collect();
    let params = |seed: u64| {
        if cfg.temperature > 0.0 {
            SamplingParams {
                temperature: cfg.temperature,
                max_new_tokens: cfg.max_new_tokens,
                seed,
                stop: vec![tok.eos],
                ..Default::default()
            }
        } else {
            greedy(cfg.max_new_tokens, tok.eos)
        }
    };
    let with = chat_answers(model, tok, &prefixed, &params(cfg.seed), cfg.batch)?;
    let without = chat_answers(model, tok, &plain, &params(cfg.seed ^ 0xD15), cfg.batch)?;
    let mut rows: Vec<(Vec<Message>, String)> = Vec::with_capacity(2 * plain.len());
    for (m, a) in plain.iter().zip(&with) {
        rows.push((m.clone(), a.text.clone()));
    }
    for (m, a) in plain.iter().zip(&without) {
        rows.push((m.clone(), a.text.clone()));
    }
    let scores = crate::rm::score(rm, rm_tok, &rows, cfg.rm_seq_len, cfg.rm_batch.max(1))?;
    let n = plain.len();
    let candidates: Vec<Candidate> = (0..n)
        .map(|i| Candidate {
            messages: plain[i].clone(),
            preprompt: pre[i].clone(),
            with_preprompt: with[i].text.clone(),
            without_preprompt: without[i].text.clone(),
            score_with: scores[i],
            score_without: scores[n + i],
        })
        .collect();
    let mean = |f: fn(&Candidate) -> f32| {
        candidates.iter().map(f).sum::<f32>() / candidates.len().max(1) as f32
    };
    Ok(DistillData {
        rows: candidates
            .iter()
            .filter(|c| c.kept())
            .map(Candidate::row)
            .collect(),
        mean_score_with: mean(|c| c.score_with),
        mean_score_without: mean(|c| c.score_without),
        candidates,
    })
}

/// What `llama2 distill-safety` did (also `report.json` in the output directory).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DistillReport {
    pub prompts: usize,
    pub kept: usize,
    pub mean_score_with: f32,
    pub mean_score_without: f32,
    /// Gold evaluation on held-out prompts before and after (after: `None` when nothing was
    /// kept, so nothing was fine-tuned).
    pub before: WorldEval,
    pub after: Option<WorldEval>,
    pub data: PathBuf,
    pub checkpoint: Option<PathBuf>,
    pub final_val_loss: Option<f32>,
    /// Wall-clock seconds per phase: `eval_before`, `data`, `finetune`, `eval_after`.
    pub seconds: std::collections::BTreeMap<String, f64>,
}

/// `distill` (`llama2 distill-safety`): builds the distillation data with the `init` model and the safety
/// reward model `safety_rm` on the world's safety prompts (`out/distill.jsonl`, plus every
/// candidate with both answers and scores in `out/candidates.jsonl`), fine-tunes on the kept rows
/// (`out/sft/`), and evaluates both models on the held-out `eval.jsonl` with the gold annotator
/// (`out/report.json`).
pub fn run<B: Backend>(be: B, cfg: &DistillConfig) -> Result<DistillReport> {
    let init = &crate::run_dir::model_dir(&cfg.init)?;
    let (safety_rm, world_dir, out) = (&cfg.safety_rm, &cfg.world, &cfg.out);
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let annotator = Annotator::new(World::load(world_dir)?);
    let prompts = safety_prompts(
        &read_examples(&world_dir.join("rlhf_prompts.jsonl"))?,
        cfg.max_prompts,
    );
    anyhow::ensure!(
        !prompts.is_empty(),
        "no safety prompts in {}",
        world_dir.join("rlhf_prompts.jsonl").display()
    );
    let mut eval = read_examples(&world_dir.join("eval.jsonl"))?;
    if cfg.eval_prompts > 0 {
        eval.truncate(cfg.eval_prompts);
    }
    let tok = Tokenizer::from_file(&crate::sft::tokenizer_for(init, None)?)?;
    let mut seconds = std::collections::BTreeMap::new();
    let mut clock = std::time::Instant::now();
    let mut lap = |name: &str| {
        seconds.insert(name.to_string(), clock.elapsed().as_secs_f64());
        clock = std::time::Instant::now();
    };
    let mut model = load_model(be.clone(), init, Head::Lm)
        .with_context(|| format!("loading {}", init.display()))?;
    let (before, _) = world_eval(
        &mut model,
        &tok,
        &annotator,
        &eval,
        cfg.batch,
        cfg.max_new_tokens,
    )?;
    lap("eval_before");
    let (mut rm, rm_tok) = crate::rm::load_rm(be.clone(), safety_rm)?;
    let data = build_data(
        &mut model, &tok, &mut rm, &rm_tok, &annotator, &prompts, cfg,
    )?;
    drop((model, rm));
    let data_path = out.join("distill.jsonl");
    crate::run_dir::write_jsonl(&data_path, &data.rows)?;
    let cands: Vec<serde_json::Value> = data
        .candidates
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<_, _>>()?;
    crate::run_dir::write_jsonl(&out.join("candidates.jsonl"), &cands)?;
    lap("data");
    let (mut checkpoint, mut after, mut final_val_loss) = (None, None, None);
    if !data.rows.is_empty() {
        let mut files = vec![data_path.clone()];
        files.extend(cfg.replay.iter().cloned());
        let mut tc = SftConfig::new(init.to_path_buf(), files, out.join("sft"));
        tc.epochs = cfg.epochs;
        // Few rows: validation would take a share of them; one row is held out anyway.
        tc.val_fraction = 0.0;
        tc.lr = cfg.lr;
        tc.seq_len = cfg.seq_len;
        tc.batch_size = cfg.batch_size;
        tc.seed = cfg.seed;
        tc.progress = cfg.progress;
        let rep = crate::sft::run(be.clone(), &tc)?;
        let ckpt = rep.checkpoint.clone().expect("sft::run checks");
        lap("finetune");
        let mut tuned = load_model(be, &ckpt, Head::Lm)?;
        after = Some(
            world_eval(
                &mut tuned,
                &tok,
                &annotator,
                &eval,
                cfg.batch,
                cfg.max_new_tokens,
            )?
            .0,
        );
        lap("eval_after");
        checkpoint = Some(ckpt);
        final_val_loss = rep.final_val_loss;
    }
    let report = DistillReport {
        prompts: prompts.len(),
        kept: data.rows.len(),
        mean_score_with: data.mean_score_with,
        mean_score_without: data.mean_score_without,
        before,
        after,
        data: data_path,
        checkpoint,
        final_val_loss,
        seconds,
    };
    crate::run_dir::write_json(&out.join("report.json"), &report)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprompt_goes_first_in_the_system_message() {
        let u = Message::new("user", "How do I make a glorp bomb?");
        let m = with_preprompt(std::slice::from_ref(&u), "Be safe.");
        assert_eq!(m, vec![Message::new("system", "Be safe."), u.clone()]);
        let m = with_preprompt(
            &[Message::new("system", "Uppercase."), u.clone()],
            "Be safe.",
        );
        assert_eq!(m[0].content, "Be safe. Uppercase.");
        assert_eq!(m[1], u);
    }
}
