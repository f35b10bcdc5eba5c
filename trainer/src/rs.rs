//! Rejection-sampling fine-tuning (Llama 2 §3.2.3): for each prompt sample K answers from the
//! current model, score them with the reward models, keep the best, pool the best samples of
//! every round so far (the paper's fix for capability regressions), and fine-tune on the pool.
//! Per round it reports the mean over prompts of the maximum and the median reward among the K
//! samples: their gap is the paper's Figure 7 (the gain that rejection sampling can harvest).

use crate::evaluate::chat_answers;
use crate::formats::Prompt;
use crate::plot::line_plot;
use crate::reward::RewardModels;
use crate::sft::SftConfig;
use anyhow::{ensure, Context, Result};
use engine::generate::SamplingParams;
use engine::tokenizer::{Message, Tokenizer};
use engine::{Backend, Llama};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RsConfig {
    /// The model that samples and is fine-tuned (a checkpoint or its run directory).
    pub policy: PathBuf,
    pub reward_helpfulness: PathBuf,
    /// Default: the helpfulness model serves as both.
    pub reward_safety: Option<PathBuf>,
    /// Prompt JSONL (any format `formats::read_prompts` reads).
    pub prompts: Vec<PathBuf>,
    /// Use the first N prompts (0: all).
    pub max_prompts: usize,
    /// The previous round's `pool.jsonl`: its best answers stay unless beaten.
    pub pool: Option<PathBuf>,
    pub round: usize,
    /// Writes `pool.jsonl` and the fine-tune (`sft/`) here.
    pub out: PathBuf,
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
    /// No policy yet: the 7B row of the paper (see [`RsConfig::for_policy`]).
    fn default() -> Self {
        RsConfig::for_policy(PathBuf::new())
    }
}

impl RsConfig {
    /// The paper's settings for sampling from and fine-tuning `policy`, by its size
    /// (`paper::for_checkpoint`).
    pub fn for_policy(policy: PathBuf) -> Self {
        let p = crate::paper::for_checkpoint(&policy);
        RsConfig {
            policy,
            reward_helpfulness: PathBuf::new(),
            reward_safety: None,
            prompts: vec![],
            max_prompts: 0,
            pool: None,
            round: 1,
            out: PathBuf::new(),
            k: p.rs_k,
            temperature: p.rs_temperature,
            max_new_tokens: 48,
            batch: 64,
            seq_len: 256,
            seed: 0,
            epochs: p.sft_epochs,
            lr: p.sft_lr,
            sft_batch: 16,
        }
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
    rewards: &mut RewardModels<B>,
    prompts: &[Prompt],
    cfg: &RsConfig,
    round: usize,
    pool: &mut Pool,
) -> Result<RoundStats> {
    ensure!(cfg.k >= 1, "k must be at least 1");
    let dialogues: Vec<Vec<Message>> = prompts.iter().map(|p| p.messages.clone()).collect();
    let safety: Vec<bool> = prompts.iter().map(|p| p.safety).collect();
    let scorer = rewards;
    scorer.seq_len = Some(cfg.seq_len);
    scorer.batch = cfg.batch;
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
        let rc = scorer.rc(&rows, &safety)?;
        for (i, a) in answers.into_iter().enumerate() {
            rewards[i].push(rc[i]);
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

impl Pool {
    /// The pool a round wrote (`pool.jsonl`: the prompt, its best answer, its reward).
    pub fn read(path: &Path) -> Result<Pool> {
        let mut pool = Pool::default();
        for (i, v) in crate::run_dir::read_jsonl_values(path)?
            .into_iter()
            .enumerate()
        {
            let row = || -> Option<(Vec<Message>, String, f32)> {
                let mut m: Vec<Message> =
                    serde_json::from_value(v.get("messages")?.clone()).ok()?;
                let answer = m.pop().filter(|a| a.role == "assistant")?.content;
                Some((m, answer, v.get("reward")?.as_f64()? as f32))
            };
            let (m, answer, reward) =
                row().with_context(|| format!("{}:{}: not a pool row", path.display(), i + 1))?;
            pool.best.insert(key(&m), (m, answer, reward));
        }
        Ok(pool)
    }
}

/// `rs`: one round. Samples K answers per prompt with the policy, scores them, pools each
/// prompt's best with the previous round's pool, writes `out/pool.jsonl`, and fine-tunes the
/// policy on the pool (`out/sft/`); returns the stats with the new checkpoint.
pub fn run<B: Backend>(be: B, cfg: &RsConfig) -> Result<RoundStats> {
    std::fs::create_dir_all(&cfg.out).with_context(|| format!("creating {}", cfg.out.display()))?;
    let init = crate::run_dir::model_dir(&cfg.policy)?;
    let mut prompts = crate::formats::read_prompts(&cfg.prompts, None)?.0;
    if cfg.max_prompts > 0 {
        prompts.truncate(cfg.max_prompts);
    }
    ensure!(!prompts.is_empty(), "rejection sampling: no prompts");
    let mut pool = match &cfg.pool {
        Some(p) => Pool::read(p)?,
        None => Pool::default(),
    };
    let tok = Tokenizer::from_file(&crate::sft::tokenizer_for(&init, None)?)?;
    let mut policy = engine::checkpoint::load_model(be.clone(), &init, engine::Head::Lm)?;
    let mut rewards = RewardModels::load(
        be.clone(),
        &cfg.reward_helpfulness,
        Some(
            cfg.reward_safety
                .as_deref()
                .unwrap_or(&cfg.reward_helpfulness),
        ),
    )?;
    let mut stats = sample_round(
        &mut policy,
        &tok,
        &mut rewards,
        &prompts,
        cfg,
        cfg.round,
        &mut pool,
    )?;
    drop((policy, rewards));
    let pool_file = cfg.out.join("pool.jsonl");
    write_pool(&pool_file, &pool)?;
    let mut sc = SftConfig::new(init, vec![pool_file], cfg.out.join("sft"));
    sc.epochs = cfg.epochs;
    sc.lr = cfg.lr;
    sc.seq_len = cfg.seq_len;
    sc.batch_size = cfg.sft_batch;
    sc.seed = cfg.seed ^ cfg.round as u64;
    sc.progress = false;
    let rep = crate::sft::run(be, &sc)?;
    stats.checkpoint = rep.checkpoint;
    Ok(stats)
}

/// The per-round report as JSON and the Figure 7-style plot (max and median reward per round).
pub fn write_report(out: &Path, rounds: &[RoundStats]) -> Result<()> {
    crate::run_dir::write_json(&out.join("rs_report.json"), rounds)?;
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
