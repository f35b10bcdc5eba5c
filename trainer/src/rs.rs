//! Rejection-sampling fine-tuning (Llama 2 §3.2.3): for each prompt sample K answers, score them
//! with the reward models, keep the best, pool the best answers of every round so far (the
//! paper's fix for capability regressions), and fine-tune on the pool.
//!
//! As the paper does it:
//! - the pool is a file (`pool.jsonl`) that persists across rounds and runs; before each
//!   prompt's best is chosen, every pooled answer is re-scored by this round's reward models, so
//!   an old answer competes on the same scale as the new ones (stale scores would keep it);
//! - the samples may come from a larger `teacher` while a smaller policy is fine-tuned on the pool
//!   (the paper samples with 70B only and distils into the smaller models);
//! - Figure 7: the mean over prompts of the max and the median reward among the first N of the
//!   K samples, N = 1..K (their gap is what rejection sampling harvests);
//! - Figure 8: the temperature is re-tuned each round on held-out prompts, keeping the one with
//!   the best mean best-of-K reward.

use crate::evaluate::chat_answers;
use crate::formats::Prompt;
use crate::plot::line_plot;
use crate::reward::{RcScorer, RewardModels};
use crate::sft::SftConfig;
use anyhow::{bail, ensure, Context, Result};
use engine::generate::SamplingParams;
use engine::tokenizer::{Message, Tokenizer};
use engine::{Backend, Llama};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RsConfig {
    /// The model fine-tuned on the pool (a checkpoint or its run directory); it also samples
    /// unless `teacher` is given.
    pub policy: PathBuf,
    /// Samples instead of the policy (the paper samples with its largest model); it must use
    /// the policy's tokenizer.
    pub teacher: Option<PathBuf>,
    pub reward_helpfulness: PathBuf,
    /// Default: the helpfulness model serves as both.
    pub reward_safety: Option<PathBuf>,
    /// Prompt JSONL (any format `formats::read_prompts` reads).
    pub prompts: Vec<PathBuf>,
    /// Use the first N prompts (0: all; after the sweep's held-out prompts are set aside).
    pub max_prompts: usize,
    /// An earlier `pool.jsonl` (a previous round's or run's): its answers are re-scored and
    /// stay unless beaten.
    pub pool: Option<PathBuf>,
    pub round: usize,
    /// Writes `pool.jsonl` and the fine-tune (`sft/`) here.
    pub out: PathBuf,
    /// Samples per prompt.
    pub k: usize,
    /// The paper found 1.2–1.3 best for 10–100 samples; used when `temperatures` is empty.
    pub temperature: f32,
    /// Figure 8: before sampling, sweep these temperatures on held-out prompts and sample the
    /// round at the one with the highest mean best-of-K reward (empty: no sweep).
    pub temperatures: Vec<f32>,
    /// The sweep's held-out prompts: the last N of the prompt list, never trained on this round
    /// (earlier prompts that repeat one are left out of training too).
    pub sweep_prompts: usize,
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
            teacher: None,
            reward_helpfulness: PathBuf::new(),
            reward_safety: None,
            prompts: vec![],
            max_prompts: 0,
            pool: None,
            round: 1,
            out: PathBuf::new(),
            k: p.rs_k,
            temperature: p.rs_temperature,
            temperatures: vec![],
            sweep_prompts: 32,
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

/// Figure 7's point at N: the mean over prompts of the max and the median reward among the
/// first N samples.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BestOfN {
    pub n: usize,
    pub mean_max: f32,
    pub mean_median: f32,
}

/// Figure 8: one temperature of the sweep on the held-out prompts.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SweepPoint {
    pub temperature: f32,
    /// Mean over the held-out prompts of the best and the median of K samples.
    pub mean_max: f32,
    pub mean_median: f32,
    pub curve: Vec<BestOfN>,
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
    /// The temperature the round sampled at (the sweep's pick when there was one).
    #[serde(default)]
    pub temperature: f32,
    /// The model that sampled (the teacher, or the policy).
    #[serde(default)]
    pub sampler: PathBuf,
    /// Pooled answers re-scored by this round's reward models, and how many of them a fresh
    /// sample beat.
    #[serde(default)]
    pub rescored: usize,
    #[serde(default)]
    pub displaced: usize,
    /// Figure 7: N = 1..K.
    #[serde(default)]
    pub curve: Vec<BestOfN>,
    /// Figure 8: every temperature swept (empty: no sweep), and the held-out prompts it used.
    #[serde(default)]
    pub sweep: Vec<SweepPoint>,
    #[serde(default)]
    pub sweep_prompts: usize,
}

/// One pooled answer: the prompt, its best answer so far, the R_c it last scored, and the
/// round and model that made it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PoolEntry {
    pub messages: Vec<Message>,
    pub safety: bool,
    pub answer: String,
    pub reward: f32,
    pub round: usize,
    pub model: PathBuf,
}

/// The pool of best answers so far, keyed by the prompt's rendering.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Pool {
    pub best: BTreeMap<String, PoolEntry>,
}

fn key(m: &[Message]) -> String {
    serde_json::to_string(m).expect("messages serialize")
}

/// K samples per prompt: their texts and R_c, indexed [prompt][sample].
#[derive(Clone, Debug, Default)]
pub struct Samples {
    pub texts: Vec<Vec<String>>,
    pub rewards: Vec<Vec<f32>>,
}

/// The median of a sorted slice (the mean of the middle two for an even length).
fn median_sorted(s: &[f32]) -> f32 {
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    }
}

/// Figure 7 from K scores per prompt: for N = 1..K, the mean over prompts of the max and the
/// median of the first N (no extra sampling: the K samples are i.i.d., so their first N are N
/// samples).
pub fn best_of_n(rewards: &[Vec<f32>]) -> Vec<BestOfN> {
    let k = rewards.iter().map(Vec::len).min().unwrap_or(0);
    let np = rewards.len().max(1) as f64;
    let mut prefix = Vec::with_capacity(k);
    (1..=k)
        .map(|n| {
            let (mut smax, mut smed) = (0f64, 0f64);
            for r in rewards {
                prefix.clear();
                prefix.extend_from_slice(&r[..n]);
                prefix.sort_by(f32::total_cmp);
                smax += prefix[n - 1] as f64;
                smed += median_sorted(&prefix) as f64;
            }
            BestOfN {
                n,
                mean_max: (smax / np) as f32,
                mean_median: (smed / np) as f32,
            }
        })
        .collect()
}

/// Samples K answers per prompt at `temperature` and scores them (sample `s` of every prompt
/// shares one seed, so two temperatures see the same random numbers).
#[allow(clippy::too_many_arguments)]
pub fn sample_k<B: Backend>(
    model: &mut Llama<B>,
    tok: &Tokenizer,
    scorer: &mut dyn RcScorer,
    prompts: &[Prompt],
    k: usize,
    temperature: f32,
    seed: u64,
    cfg: &RsConfig,
) -> Result<Samples> {
    let dialogues: Vec<Vec<Message>> = prompts.iter().map(|p| p.messages.clone()).collect();
    let safety: Vec<bool> = prompts.iter().map(|p| p.safety).collect();
    let mut out = Samples {
        texts: vec![Vec::with_capacity(k); prompts.len()],
        rewards: vec![Vec::with_capacity(k); prompts.len()],
    };
    for s in 0..k {
        let p = SamplingParams {
            temperature,
            max_new_tokens: cfg.max_new_tokens,
            seed: seed ^ (s as u64).wrapping_mul(0x9E37_79B9),
            stop: vec![tok.eos],
            ..Default::default()
        };
        let answers = chat_answers(model, tok, &dialogues, &p, cfg.batch)?;
        let rows: Vec<(Vec<Message>, String)> = dialogues
            .iter()
            .cloned()
            .zip(answers.iter().map(|a| a.text.clone()))
            .collect();
        let rc = scorer.rc(&rows, &safety)?;
        ensure!(
            rc.len() == rows.len(),
            "the scorer returned {} rewards for {} rows",
            rc.len(),
            rows.len()
        );
        for (i, a) in answers.into_iter().enumerate() {
            out.rewards[i].push(rc[i]);
            out.texts[i].push(a.text);
        }
    }
    Ok(out)
}

/// Figure 8: scores K samples per held-out prompt at each temperature (`sample(t)` gives the
/// [prompt][sample] rewards) and returns the temperature with the highest mean best-of-K reward
/// (the first on a tie) with every temperature's numbers.
pub fn pick_temperature(
    temperatures: &[f32],
    mut sample: impl FnMut(f32) -> Result<Vec<Vec<f32>>>,
) -> Result<(f32, Vec<SweepPoint>)> {
    ensure!(!temperatures.is_empty(), "no temperatures to sweep");
    let mut points = Vec::with_capacity(temperatures.len());
    for &t in temperatures {
        let curve = best_of_n(&sample(t)?);
        let last = curve.last().copied().unwrap_or_default();
        points.push(SweepPoint {
            temperature: t,
            mean_max: last.mean_max,
            mean_median: last.mean_median,
            curve,
        });
    }
    let best = points
        .iter()
        .fold(None::<&SweepPoint>, |b, p| match b {
            Some(b) if b.mean_max >= p.mean_max => Some(b),
            _ => Some(p),
        })
        .expect("at least one temperature");
    Ok((best.temperature, points))
}

/// Re-scores every pooled answer with `scorer` (batched by the scorer, with the same piecewise
/// rule as fresh samples), then puts each prompt's best fresh sample in the pool where it beats
/// the pooled one. Returns (pooled answers re-scored, pooled answers displaced).
pub fn update_pool(
    pool: &mut Pool,
    scorer: &mut dyn RcScorer,
    prompts: &[Prompt],
    samples: &Samples,
    round: usize,
    model: &Path,
) -> Result<(usize, usize)> {
    let rows: Vec<(Vec<Message>, String)> = pool
        .best
        .values()
        .map(|e| (e.messages.clone(), e.answer.clone()))
        .collect();
    let rescored = rows.len();
    if !rows.is_empty() {
        let safety: Vec<bool> = pool.best.values().map(|e| e.safety).collect();
        let r = scorer.rc(&rows, &safety)?;
        ensure!(
            r.len() == rows.len(),
            "the scorer returned {} rewards for {} pooled answers",
            r.len(),
            rows.len()
        );
        for (e, r) in pool.best.values_mut().zip(r) {
            e.reward = r;
        }
    }
    // Only answers pooled before this round count as displaced (a prompt listed twice may beat
    // its own first sample).
    let mut pooled: std::collections::BTreeSet<String> = pool.best.keys().cloned().collect();
    let mut displaced = 0;
    for (i, p) in prompts.iter().enumerate() {
        let Some((bi, &best)) = samples.rewards[i]
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
        else {
            continue;
        };
        if samples.texts[i][bi].is_empty() {
            continue;
        }
        let k = key(&p.messages);
        match pool.best.get(&k) {
            Some(old) if old.reward >= best => continue,
            _ => displaced += pooled.remove(&k) as usize,
        }
        pool.best.insert(
            k,
            PoolEntry {
                messages: p.messages.clone(),
                safety: p.safety,
                answer: samples.texts[i][bi].clone(),
                reward: best,
                round,
                model: model.to_path_buf(),
            },
        );
    }
    Ok((rescored, displaced))
}

/// One round's sampling: the temperature sweep on `sweep` (when `cfg.temperatures` is set),
/// K samples per prompt at the chosen temperature from `sampler` (named `model` in the pool),
/// the pool re-scored and updated, and the round's statistics with Figure 7's curve.
#[allow(clippy::too_many_arguments)]
pub fn sample_round<B: Backend>(
    sampler: &mut Llama<B>,
    tok: &Tokenizer,
    scorer: &mut dyn RcScorer,
    prompts: &[Prompt],
    sweep: &[Prompt],
    cfg: &RsConfig,
    round: usize,
    model: &Path,
    pool: &mut Pool,
) -> Result<RoundStats> {
    ensure!(cfg.k >= 1, "k must be at least 1");
    let seed = cfg.seed ^ ((round as u64) << 32);
    let (temperature, sweep_points) = if cfg.temperatures.is_empty() {
        (cfg.temperature, vec![])
    } else {
        ensure!(
            !sweep.is_empty(),
            "the temperature sweep has no held-out prompts"
        );
        pick_temperature(&cfg.temperatures, |t| {
            let s = sample_k(
                sampler,
                tok,
                scorer,
                sweep,
                cfg.k,
                t,
                seed ^ 0x5EE9_0000,
                cfg,
            )?;
            Ok(s.rewards)
        })?
    };
    let samples = sample_k(sampler, tok, scorer, prompts, cfg.k, temperature, seed, cfg)?;
    let (mut sum_max, mut sum_med) = (0f64, 0f64);
    let mut sorted = Vec::with_capacity(cfg.k);
    for r in &samples.rewards {
        sorted.clear();
        sorted.extend_from_slice(r);
        sorted.sort_by(f32::total_cmp);
        sum_max += sorted[sorted.len() - 1] as f64;
        sum_med += median_sorted(&sorted) as f64;
    }
    let (rescored, displaced) = update_pool(pool, scorer, prompts, &samples, round, model)?;
    let n = prompts.len().max(1) as f64;
    Ok(RoundStats {
        round,
        prompts: prompts.len(),
        k: cfg.k,
        mean_max: (sum_max / n) as f32,
        mean_median: (sum_med / n) as f32,
        pool: pool.best.len(),
        checkpoint: None,
        temperature,
        sampler: model.to_path_buf(),
        rescored,
        displaced,
        curve: best_of_n(&samples.rewards),
        sweep: sweep_points,
        sweep_prompts: sweep.len(),
    })
}

/// Writes the pool as SFT JSONL: `{"messages": [..., {"role": "assistant", ...}], "is_safety",
/// "reward", "round", "model"}` (SFT and the prompt readers take it as it is).
pub fn write_pool(path: &Path, pool: &Pool) -> Result<()> {
    let rows: Vec<serde_json::Value> = pool
        .best
        .values()
        .map(|e| {
            let mut msgs = e.messages.clone();
            msgs.push(Message::new("assistant", &e.answer));
            json!({"messages": msgs, "is_safety": e.safety, "reward": e.reward,
                   "round": e.round, "model": e.model})
        })
        .collect();
    crate::run_dir::write_jsonl(path, &rows)
}

/// A `pool.jsonl` line as written by [`write_pool`]; `round`, `model` and `is_safety` may be
/// missing (pools written before they were recorded).
fn parse_pool_row(v: serde_json::Value) -> Result<PoolEntry> {
    #[derive(Deserialize)]
    struct Row {
        messages: Vec<Message>,
        reward: f32,
        #[serde(default)]
        is_safety: bool,
        #[serde(default)]
        round: usize,
        #[serde(default)]
        model: PathBuf,
    }
    let r: Row = serde_json::from_value(v).context(
        "not a pool row: expected {\"messages\": [..., the answer as the last, assistant turn], \"reward\": number, \"round\", \"model\", \"is_safety\"}",
    )?;
    let mut m = r.messages;
    let Some(answer) = m.pop().filter(|a| a.role == "assistant") else {
        bail!("not a pool row: the last message must be the assistant's answer");
    };
    engine::tokenizer::check_roles(&m)?;
    ensure!(
        m.last().is_some_and(|x| x.role == "user"),
        "not a pool row: the prompt must end with a user turn"
    );
    ensure!(
        r.reward.is_finite(),
        "not a pool row: `reward` is {}",
        r.reward
    );
    Ok(PoolEntry {
        messages: m,
        safety: r.is_safety,
        answer: answer.content,
        reward: r.reward,
        round: r.round,
        model: r.model,
    })
}

impl Pool {
    /// A pool written by [`write_pool`]; a bad line is an error naming `file:line`.
    pub fn read(path: &Path) -> Result<Pool> {
        let (rows, _) =
            crate::run_dir::read_jsonl(&[path.to_path_buf()], None, |v, _| parse_pool_row(v))?;
        let mut pool = Pool::default();
        for e in rows {
            pool.best.insert(key(&e.messages), e);
        }
        Ok(pool)
    }

    /// The latest round that made a pooled answer (0 for an empty pool).
    pub fn last_round(&self) -> usize {
        self.best.values().map(|e| e.round).max().unwrap_or(0)
    }
}

/// Refuses a teacher whose tokenizer differs from the student's: the student learns the
/// teacher's answers as its own token ids, and the pool's text would tokenize differently.
pub fn same_vocabulary(teacher: &Tokenizer, student: &Tokenizer) -> Result<()> {
    let (t, s) = (teacher.path.display(), student.path.display());
    let (nt, ns) = (teacher.vocab_size(), student.vocab_size());
    ensure!(
        nt == ns,
        "teacher and policy tokenizers differ: {t} has {nt} tokens, {s} has {ns} (the teacher must share the policy's tokenizer)"
    );
    for id in 0..nt as u32 {
        let (a, b) = (teacher.id_to_token(id), student.id_to_token(id));
        ensure!(
            a == b,
            "teacher and policy tokenizers differ: token {id} is {a:?} in {t} and {b:?} in {s} (the teacher must share the policy's tokenizer)"
        );
    }
    Ok(())
}

/// `rs`: one round. Samples K answers per prompt with the teacher (or the policy), re-scores the
/// earlier pool and pools each prompt's best, writes `out/pool.jsonl`, and fine-tunes the policy
/// on the pool (`out/sft/`); returns the stats with the new checkpoint.
pub fn run<B: Backend>(be: B, cfg: &RsConfig) -> Result<RoundStats> {
    ensure!(cfg.k >= 1, "k must be at least 1");
    for &t in &cfg.temperatures {
        ensure!(
            t.is_finite() && t > 0.0 && t <= 10.0,
            "temperatures: {t} is not a sampling temperature (expected a number in (0, 10])"
        );
    }
    std::fs::create_dir_all(&cfg.out).with_context(|| format!("creating {}", cfg.out.display()))?;
    let init = crate::run_dir::model_dir(&cfg.policy)?;
    let mut prompts = crate::formats::read_prompts(&cfg.prompts, None)?.0;
    ensure!(!prompts.is_empty(), "rejection sampling: no prompts");
    let mut pool = match &cfg.pool {
        Some(p) => Pool::read(p)?,
        None => Pool::default(),
    };
    // The sweep's prompts: the held-out end of the list, less any an earlier round trained on.
    let mut sweep = Vec::new();
    if !cfg.temperatures.is_empty() {
        let n = prompts.len();
        ensure!(
            cfg.sweep_prompts >= 1 && cfg.sweep_prompts < n,
            "sweep_prompts = {}: the temperature sweep holds out the last N of the {n} prompts and needs 1 <= N < {n}",
            cfg.sweep_prompts
        );
        sweep = prompts.split_off(n - cfg.sweep_prompts);
        // A training prompt that repeats a held-out one would be trained on: it goes.
        let held: std::collections::BTreeSet<String> =
            sweep.iter().map(|p| key(&p.messages)).collect();
        prompts.retain(|p| !held.contains(&key(&p.messages)));
        ensure!(
            !prompts.is_empty(),
            "every prompt repeats one of the temperature sweep's held-out prompts (the last {})",
            cfg.sweep_prompts
        );
        sweep.retain(|p| !pool.best.contains_key(&key(&p.messages)));
        ensure!(
            !sweep.is_empty(),
            "the temperature sweep's {} held-out prompts (the end of the prompt list) are all in the pool {}: an earlier round trained on them",
            cfg.sweep_prompts,
            cfg.pool.as_deref().unwrap_or(Path::new("")).display()
        );
    }
    if cfg.max_prompts > 0 {
        prompts.truncate(cfg.max_prompts);
    }
    let sampler_dir = match &cfg.teacher {
        Some(t) => crate::run_dir::model_dir(t)?,
        None => init.clone(),
    };
    let tok = Tokenizer::from_file(&crate::sft::tokenizer_for(&sampler_dir, None)?)?;
    if cfg.teacher.is_some() {
        let student = Tokenizer::from_file(&crate::sft::tokenizer_for(&init, None)?)?;
        same_vocabulary(&tok, &student)?;
    }
    let mut sampler = engine::checkpoint::load_model(be.clone(), &sampler_dir, engine::Head::Lm)?;
    let mut rewards = RewardModels::load(
        be.clone(),
        &cfg.reward_helpfulness,
        Some(
            cfg.reward_safety
                .as_deref()
                .unwrap_or(&cfg.reward_helpfulness),
        ),
    )?;
    rewards.seq_len = Some(cfg.seq_len);
    rewards.batch = cfg.batch;
    let mut stats = sample_round(
        &mut sampler,
        &tok,
        &mut rewards,
        &prompts,
        &sweep,
        cfg,
        cfg.round,
        &sampler_dir,
        &mut pool,
    )?;
    drop((sampler, rewards));
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

/// The per-round report as JSON, the max and median reward per round (`rs_rewards.svg`),
/// Figure 7 (`fig7.jsonl`, `fig7.svg`: reward vs N per round) and, for rounds that swept the
/// temperature, Figure 8 (`fig8.jsonl`, `fig8-round-R.svg`: best-of-N reward per temperature).
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
    )?;
    let pts = |c: &[BestOfN], max: bool| -> Vec<(f64, f64)> {
        c.iter()
            .map(|p| {
                (
                    p.n as f64,
                    if max { p.mean_max } else { p.mean_median } as f64,
                )
            })
            .collect()
    };
    let fig7: Vec<serde_json::Value> = rounds
        .iter()
        .flat_map(|r| {
            r.curve.iter().map(move |p| {
                json!({"round": r.round, "n": p.n, "mean_max": p.mean_max, "mean_median": p.mean_median})
            })
        })
        .collect();
    if !fig7.is_empty() {
        crate::run_dir::write_jsonl(&out.join("fig7.jsonl"), &fig7)?;
        let series: Vec<(String, Vec<(f64, f64)>)> = rounds
            .iter()
            .filter(|r| !r.curve.is_empty())
            .flat_map(|r| {
                [
                    (format!("round {} max", r.round), pts(&r.curve, true)),
                    (format!("round {} median", r.round), pts(&r.curve, false)),
                ]
            })
            .collect();
        let refs: Vec<(&str, &[(f64, f64)])> = series
            .iter()
            .map(|(n, s)| (n.as_str(), s.as_slice()))
            .collect();
        line_plot(
            &out.join("fig7.svg"),
            "rejection sampling: max and median reward among N samples (Figure 7)",
            "N samples",
            "mean reward over prompts",
            &refs,
        )?;
    }
    let mut fig8 = Vec::new();
    for r in rounds.iter().filter(|r| !r.sweep.is_empty()) {
        for s in &r.sweep {
            for p in &s.curve {
                fig8.push(json!({"round": r.round, "temperature": s.temperature,
                    "chosen": s.temperature == r.temperature, "n": p.n,
                    "mean_max": p.mean_max, "mean_median": p.mean_median}));
            }
        }
        let series: Vec<(String, Vec<(f64, f64)>)> = r
            .sweep
            .iter()
            .map(|s| (format!("T = {}", s.temperature), pts(&s.curve, true)))
            .collect();
        let refs: Vec<(&str, &[(f64, f64)])> = series
            .iter()
            .map(|(n, s)| (n.as_str(), s.as_slice()))
            .collect();
        line_plot(
            &out.join(format!("fig8-round-{}.svg", r.round)),
            &format!(
                "round {}: best-of-N reward per temperature on {} held-out prompts (Figure 8)",
                r.round, r.sweep_prompts
            ),
            "N samples",
            "mean max reward over prompts",
            &refs,
        )?;
    }
    if !fig8.is_empty() {
        crate::run_dir::write_jsonl(&out.join("fig8.jsonl"), &fig8)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scores a row by its answer alone.
    struct ByAnswer(fn(&str) -> f32);
    impl RcScorer for ByAnswer {
        fn rc(&mut self, rows: &[(Vec<Message>, String)], _: &[bool]) -> Result<Vec<f32>> {
            Ok(rows.iter().map(|(_, a)| (self.0)(a)).collect())
        }
    }

    fn prompt(q: &str) -> Prompt {
        Prompt {
            messages: vec![Message::new("user", q)],
            safety: false,
        }
    }

    fn entry(q: &str, answer: &str, reward: f32, round: usize) -> PoolEntry {
        PoolEntry {
            messages: prompt(q).messages,
            safety: false,
            answer: answer.into(),
            reward,
            round,
            model: "old-model".into(),
        }
    }

    #[test]
    fn re_scoring_the_pool_lets_a_fresh_answer_displace_a_stale_high_score() {
        // Round 1's reward model gave "stale" 0.99; this round's scores it 0.1 and the fresh
        // "fresh answer" 0.6: without re-scoring, 0.99 would keep the stale answer.
        let mut pool = Pool::default();
        for (q, a, r) in [
            ("q1", "stale", 0.99),
            ("q2", "good old", 0.5),
            ("q3", "stale", 0.2),
        ] {
            pool.best
                .insert(key(&prompt(q).messages), entry(q, a, r, 1));
        }
        fn score(a: &str) -> f32 {
            match a {
                "stale" => 0.1,
                "good old" => 0.9,
                _ => 0.6,
            }
        }
        // q4 is new and listed twice: its second, better sample displaces nothing pooled.
        let prompts = [prompt("q1"), prompt("q2"), prompt("q4"), prompt("q4")];
        let mut samples = Samples {
            texts: vec![vec!["fresh answer".into(), "x".into()]; 4],
            rewards: vec![vec![0.6, 0.3]; 4],
        };
        samples.texts[3][0] = "fresher".into();
        samples.rewards[3][0] = 0.7;
        let (rescored, displaced) = update_pool(
            &mut pool,
            &mut ByAnswer(score),
            &prompts,
            &samples,
            2,
            Path::new("new-model"),
        )
        .unwrap();
        assert_eq!((rescored, displaced), (3, 1));
        let get = |q: &str| pool.best[&key(&prompt(q).messages)].clone();
        let q1 = get("q1");
        assert_eq!(
            (q1.answer.as_str(), q1.reward, q1.round),
            ("fresh answer", 0.6, 2)
        );
        assert_eq!(q1.model, Path::new("new-model"));
        // A pooled answer that still wins keeps its round and model, with its new score.
        let q2 = get("q2");
        assert_eq!(
            (q2.answer.as_str(), q2.reward, q2.round),
            ("good old", 0.9, 1)
        );
        // Pooled prompts not sampled this round are re-scored too; new prompts join the pool.
        assert_eq!(get("q3").reward, 0.1);
        assert_eq!((get("q4").answer.as_str(), get("q4").round), ("fresher", 2));
        assert_eq!(pool.best.len(), 4);
    }

    /// A small deterministic generator of rewards in [0, 1).
    fn rewards(prompts: usize, k: usize, mut seed: u64) -> Vec<Vec<f32>> {
        (0..prompts)
            .map(|_| {
                (0..k)
                    .map(|_| {
                        seed = seed
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        (seed >> 40) as f32 / (1u64 << 24) as f32
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn figure_7_max_grows_with_n_and_ends_at_the_fixed_k_numbers() {
        let r = rewards(9, 8, 7);
        let c = best_of_n(&r);
        assert_eq!(c.len(), 8);
        assert_eq!(
            c.iter().map(|p| p.n).collect::<Vec<_>>(),
            (1..=8).collect::<Vec<_>>()
        );
        for w in c.windows(2) {
            assert!(w[1].mean_max >= w[0].mean_max, "{c:?}");
        }
        // N = 1: the max and the median are the first sample.
        let first = r.iter().map(|x| x[0] as f64).sum::<f64>() / 9.0;
        assert!((c[0].mean_max as f64 - first).abs() < 1e-6);
        assert!((c[0].mean_median as f64 - first).abs() < 1e-6);
        // N = K: the mean max and median over all K, computed here independently.
        let (mut mx, mut md) = (0f64, 0f64);
        for x in &r {
            let mut s = x.clone();
            s.sort_by(|a, b| a.partial_cmp(b).unwrap());
            mx += s[7] as f64;
            md += (s[3] as f64 + s[4] as f64) / 2.0;
        }
        assert!((c[7].mean_max as f64 - mx / 9.0).abs() < 1e-6, "{c:?}");
        assert!((c[7].mean_median as f64 - md / 9.0).abs() < 1e-6, "{c:?}");
        // N = 3: an odd N's median is the middle sample.
        let m3 = r
            .iter()
            .map(|x| {
                let mut s = x[..3].to_vec();
                s.sort_by(|a, b| a.partial_cmp(b).unwrap());
                s[1] as f64
            })
            .sum::<f64>()
            / 9.0;
        assert!((c[2].mean_median as f64 - m3).abs() < 1e-6);
    }

    #[test]
    fn the_temperature_sweep_picks_the_best_mean_best_of_k() {
        // The best-of-K reward peaks at 1.2 while the median keeps falling (as in Figure 8).
        let temps = [0.8, 1.0, 1.2, 1.4];
        let mut seen = Vec::new();
        let (t, pts) = pick_temperature(&temps, |t| {
            seen.push(t);
            let best = 1.0 - (t - 1.2f32).abs();
            Ok(vec![vec![0.0, best, 1.0 - t]; 3])
        })
        .unwrap();
        assert_eq!(seen, temps);
        assert_eq!(t, 1.2);
        assert_eq!(pts.len(), 4);
        for (p, want) in pts.iter().zip(temps) {
            assert_eq!(p.temperature, want);
            assert_eq!(p.curve.len(), 3);
            assert_eq!(p.mean_max, p.curve[2].mean_max);
        }
        assert!((pts[2].mean_max - 1.0).abs() < 1e-6);
        // Ties go to the first temperature.
        let (t, _) = pick_temperature(&temps, |_| Ok(vec![vec![0.5]])).unwrap();
        assert_eq!(t, 0.8);
    }

    #[test]
    fn the_pool_file_round_trips_and_a_bad_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pool.jsonl");
        let mut pool = Pool::default();
        let mut e = entry("q1", "a1", 0.25, 3);
        e.safety = true;
        pool.best.insert(key(&e.messages), e);
        write_pool(&f, &pool).unwrap();
        let back = Pool::read(&f).unwrap();
        assert_eq!(back.best, pool.best);
        assert_eq!(back.last_round(), 3);
        // The pool is SFT data and prompt data as it is.
        let p = crate::formats::read_prompts(std::slice::from_ref(&f), None)
            .unwrap()
            .0;
        assert!(p[0].safety && p[0].messages == pool.best.values().next().unwrap().messages);
        let good = std::fs::read_to_string(&f).unwrap();
        for (bad, says) in [
            (
                r#"{"messages": [{"role": "user", "content": "q"}], "reward": 0.1}"#,
                "assistant",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}"#,
                "reward",
            ),
            ("{not json", "JSON"),
        ] {
            std::fs::write(&f, format!("{good}{bad}\n")).unwrap();
            let e = format!("{:#}", Pool::read(&f).unwrap_err());
            assert!(
                e.contains(&format!("{}:2", f.display())) && e.contains(says),
                "{e}"
            );
        }
    }
}
