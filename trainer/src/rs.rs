//! Rejection-sampling fine-tuning (Llama 2 §3.2.3): for each prompt sample K answers from the
//! current model, score them with the reward models, keep the best, pool the best samples of
//! every round so far (the paper's fix for capability regressions), and fine-tune on the pool.
//! Per round it reports the mean over prompts of the maximum and the median reward among the K
//! samples: their gap is the paper's Figure 7 (the gain that rejection sampling can harvest).

use crate::evaluate::chat_answers;
use crate::plot::line_plot;
use crate::pretrain::{run as train_run, DataSpec, TrainConfig};
use crate::rm::{load_rm, score};
use anyhow::{ensure, Context, Result};
use engine::generate::SamplingParams;
use engine::tokenizer::{Message, Tokenizer};
use engine::{Backend, Llama};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A prompt to sample for, with its safety tag (the piecewise reward needs it).
#[derive(Clone, Debug)]
pub struct RsPrompt {
    pub messages: Vec<Message>,
    pub safety: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RsConfig {
    /// Samples per prompt.
    pub k: usize,
    /// The paper found 1.2–1.3 best for 10–100 samples.
    pub temperature: f32,
    pub max_new_tokens: usize,
    pub batch: usize,
    pub seq_len: usize,
    pub seed: u64,
    /// Fine-tuning on the pool: epochs and peak learning rate.
    pub epochs: usize,
    pub lr: f32,
    pub sft_batch: usize,
}

impl Default for RsConfig {
    fn default() -> Self {
        RsConfig {
            k: 8,
            temperature: 1.2,
            max_new_tokens: 48,
            batch: 64,
            seq_len: 256,
            seed: 0,
            epochs: 2,
            lr: 2e-5,
            sft_batch: 16,
        }
    }
}

/// Llama 2's piecewise combination of the two reward models: the safety score decides on
/// safety-tagged prompts and whenever it is low (below `threshold`), helpfulness otherwise.
/// Scores are reward-model logits; the threshold applies to their sigmoid, as in the paper.
pub fn piecewise(
    safety_logit: f32,
    help_logit: f32,
    is_safety_prompt: bool,
    threshold: f32,
) -> f32 {
    let s = 1.0 / (1.0 + (-safety_logit).exp());
    let h = 1.0 / (1.0 + (-help_logit).exp());
    if is_safety_prompt || s < threshold {
        s
    } else {
        h
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RoundStats {
    pub round: usize,
    pub prompts: usize,
    pub k: usize,
    /// Mean over prompts of the best and the median reward among the K samples.
    pub mean_max: f32,
    pub mean_median: f32,
    pub pool: usize,
    pub checkpoint: Option<PathBuf>,
}

/// The pool of best answers so far, keyed by the prompt's rendering.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Pool {
    pub best: BTreeMap<String, (Vec<Message>, String, f32)>,
}

fn key(m: &[Message]) -> String {
    serde_json::to_string(m).expect("messages serialize")
}

/// Samples K answers per prompt, scores them, updates the pool with each prompt's best (a pooled
/// answer is replaced only by a better one), and returns the round's statistics.
#[allow(clippy::too_many_arguments)]
pub fn sample_round<B: Backend>(
    policy: &mut Llama<B>,
    tok: &Tokenizer,
    rm_help: &mut Llama<B>,
    rm_safety: &mut Llama<B>,
    prompts: &[RsPrompt],
    cfg: &RsConfig,
    round: usize,
    pool: &mut Pool,
) -> Result<RoundStats> {
    ensure!(cfg.k >= 1, "k must be at least 1");
    let dialogues: Vec<Vec<Message>> = prompts.iter().map(|p| p.messages.clone()).collect();
    let mut rewards = vec![Vec::with_capacity(cfg.k); prompts.len()];
    let mut texts = vec![Vec::with_capacity(cfg.k); prompts.len()];
    for s in 0..cfg.k {
        let p = SamplingParams {
            temperature: cfg.temperature,
            max_new_tokens: cfg.max_new_tokens,
            seed: cfg.seed ^ ((round as u64) << 32) ^ (s as u64 * 0x9E37_79B9),
            stop: vec![tok.eos],
            ..Default::default()
        };
        let answers = chat_answers(policy, tok, &dialogues, &p, cfg.batch)?;
        let rows: Vec<(Vec<Message>, String)> = dialogues
            .iter()
            .cloned()
            .zip(answers.iter().map(|a| a.text.clone()))
            .collect();
        let h = score(rm_help, tok, &rows, cfg.seq_len, cfg.batch)?;
        let sf = score(rm_safety, tok, &rows, cfg.seq_len, cfg.batch)?;
        for (i, a) in answers.into_iter().enumerate() {
            rewards[i].push(piecewise(sf[i], h[i], prompts[i].safety, 0.15));
            texts[i].push(a.text);
        }
    }
    let (mut sum_max, mut sum_med) = (0f64, 0f64);
    for (i, p) in prompts.iter().enumerate() {
        let r = &rewards[i];
        let (bi, &best) = r
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .expect("k >= 1");
        let mut sorted = r.clone();
        sorted.sort_by(f32::total_cmp);
        let median = if sorted.len() % 2 == 1 {
            sorted[sorted.len() / 2]
        } else {
            0.5 * (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2])
        };
        sum_max += best as f64;
        sum_med += median as f64;
        if texts[i][bi].is_empty() {
            continue;
        }
        let k = key(&p.messages);
        let better = pool.best.get(&k).is_none_or(|(_, _, old)| best > *old);
        if better {
            pool.best
                .insert(k, (p.messages.clone(), texts[i][bi].clone(), best));
        }
    }
    let n = prompts.len().max(1) as f64;
    Ok(RoundStats {
        round,
        prompts: prompts.len(),
        k: cfg.k,
        mean_max: (sum_max / n) as f32,
        mean_median: (sum_med / n) as f32,
        pool: pool.best.len(),
        checkpoint: None,
    })
}

/// Writes the pool as SFT JSONL (`{"messages": [..., {"role": "assistant", ...}]}`).
pub fn write_pool(path: &Path, pool: &Pool) -> Result<()> {
    let rows: Vec<serde_json::Value> = pool
        .best
        .values()
        .map(|(m, answer, reward)| {
            let mut msgs = m.clone();
            msgs.push(Message::new("assistant", answer));
            serde_json::json!({"messages": msgs, "reward": reward})
        })
        .collect();
    crate::run_dir::write_jsonl(path, &rows)
}

/// One full round: sample with the model at `init`, pool, fine-tune on the pool from `init`.
/// Writes `out/round-N/{samples.jsonl, sft/...}` and returns the stats with the new checkpoint.
#[allow(clippy::too_many_arguments)]
pub fn run_round<B: Backend>(
    be: B,
    init: &Path,
    rm_help_dir: &Path,
    rm_safety_dir: &Path,
    prompts: &[RsPrompt],
    cfg: &RsConfig,
    round: usize,
    pool: &mut Pool,
    out: &Path,
) -> Result<RoundStats> {
    let dir = out.join(format!("round-{round}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let tok = Tokenizer::from_file(&init.join("tokenizer.json"))?;
    let mut policy = engine::checkpoint::load_model(be.clone(), init, engine::Head::Lm)?;
    let (mut rh, _) = load_rm(be.clone(), rm_help_dir)?;
    let (mut rsf, _) = load_rm(be.clone(), rm_safety_dir)?;
    let mut stats = sample_round(
        &mut policy,
        &tok,
        &mut rh,
        &mut rsf,
        prompts,
        cfg,
        round,
        pool,
    )?;
    drop((policy, rh, rsf));
    let pool_file = dir.join("pool.jsonl");
    write_pool(&pool_file, pool)?;
    let mut sc = TrainConfig::sft_defaults(vec![pool_file], dir.join("sft"), init.to_path_buf());
    if let DataSpec::Sft {
        epochs,
        val_fraction,
        ..
    } = &mut sc.data
    {
        *epochs = cfg.epochs;
        *val_fraction = 0.05;
    }
    sc.lr = cfg.lr;
    sc.seq_len = cfg.seq_len;
    sc.batch_size = cfg.sft_batch;
    sc.seed = cfg.seed ^ round as u64;
    sc.progress = false;
    let rep = train_run(be, sc, None)?;
    stats.checkpoint = rep.checkpoint;
    Ok(stats)
}

/// The per-round report as JSON and the Figure 7-style plot (max and median reward per round).
pub fn write_report(out: &Path, rounds: &[RoundStats]) -> Result<()> {
    std::fs::write(
        out.join("rs_report.json"),
        serde_json::to_string_pretty(rounds)?,
    )?;
    let max: Vec<(f64, f64)> = rounds
        .iter()
        .map(|r| (r.round as f64, r.mean_max as f64))
        .collect();
    let med: Vec<(f64, f64)> = rounds
        .iter()
        .map(|r| (r.round as f64, r.mean_median as f64))
        .collect();
    line_plot(
        &out.join("rs_rewards.svg"),
        "rejection sampling: reward of the best and the median of K samples",
        "round",
        "reward (piecewise, sigmoid)",
        &[("max over K", &max), ("median over K", &med)],
    )
}
