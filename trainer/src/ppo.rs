//! PPO, as section 3.2.3 of the Llama 2 paper runs it (`llama2 ppo`).
//!
//! Four models share the device: the policy π_θ (initialised from the rejection-sampling or SFT
//! checkpoint; it both samples the rollouts and is trained, so there are no weight copies between
//! a sampler and a trainer), the frozen reference π_0 (a second copy of the initial policy), the
//! critic (a score-head model initialised from the helpfulness reward model; its score at every
//! response position is the value) and the frozen reward models (helpfulness and safety; one
//! model serves as both when only one is given).
//!
//! Each iteration samples `batch` prompts, generates one response per prompt with the policy
//! through the KV cache, and rewards it with
//!
//! R(g | p) = R̃_c(g | p) − β · KL(π_θ(g | p) ‖ π_0(g | p)),
//! R_c = R_s if the prompt is tagged safety or R_s < 0.15, else R_h,
//! R̃_c = WHITEN(LOGIT(R_c)) over the batch.
//!
//! Our reward models output unbounded scores s (trained with the ranking loss on score
//! differences); the paper's R is the probability σ(s), so the 0.15 threshold applies to σ(s_s)
//! and LOGIT(σ(s)) gives back s (clamped away from 0 and 1). The KL is estimated per token as
//! log π_θ − log π_0 and enters every token's reward as −β·KL_t; the score term goes on the last
//! token (the EOS when the response ended, else its last token). Advantages come from GAE
//! (γ = 1, λ = 0.95, bootstrap 0 after the last token) and are whitened over the batch's tokens;
//! the policy takes one AdamW step per minibatch on the clipped surrogate (ε = 0.2, mean over the
//! minibatch's response tokens), the critic one on the clipped value loss.
//!
//! Outputs under `out`: `config.json`, `metrics.jsonl` (one line per iteration, plus held-out
//! evaluations), `reward.svg`, `checkpoints/iter-NNNNNN/` and `checkpoints/latest`, `best/`
//! (the policy with the best held-out reward, which early stopping selects). A checkpoint is the
//! policy as a Hugging Face checkpoint with `tokenizer.json` (so `generate`, `chat`, `sft` and
//! `ppo` load it directly), the critic in `critic/` (an HF sequence-classification checkpoint),
//! both AdamW states in `optimizer.safetensors` and `ppo_state.json` (iteration, optimizer
//! steps, early-stopping state, the configuration). Prompt sampling, generation seeds and
//! minibatch order are pure functions of (seed, iteration), so on the CPU a resumed run
//! continues exactly as an uninterrupted one.

use crate::evaluate::chat_answers;
use crate::formats::Prompt;
use crate::optimizer::{as_sink, Optim};
use crate::plot::{line_plot, read_series};
use crate::reward::{self, logit, RewardModels};
use crate::rm::load_rm;
use crate::run_dir::{self, MetricsWriter};
use crate::world::{Annotator, World};
use anyhow::{anyhow, bail, ensure, Context, Result};
use engine::checkpoint::{load_model, save_model, SaveOptions};
use engine::dist::{save_zero1, Collective, DeviceCollective, ShardedAdamW};
use engine::generate::SamplingParams;
use engine::optim::{AdamW, AdamWConfig};
use engine::tokenizer::{Message, Tokenizer};
use engine::{Backend, Batch, Head, Llama};
use indicatif::ProgressBar;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

// ---------------------------------------------------------------------------------------------
// The pieces, as pure functions

/// Added to the variance before the square root when whitening.
pub const WHITEN_EPS: f32 = 1e-8;

/// Generalized advantage estimation over one trajectory of T tokens: δ_t = r_t + γ·V_{t+1} − V_t
/// with V_T = 0 (nothing follows the last token), A_t = δ_t + γλ·A_{t+1}; returns A_t + V_t
/// (the critic's targets). Returns (advantages, returns).
pub fn gae(rewards: &[f32], values: &[f32], gamma: f32, lam: f32) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(rewards.len(), values.len(), "gae: one value per reward");
    let t = rewards.len();
    let mut adv = vec![0f32; t];
    let mut next_adv = 0f32;
    let mut next_v = 0f32;
    for i in (0..t).rev() {
        let delta = rewards[i] + gamma * next_v - values[i];
        next_adv = delta + gamma * lam * next_adv;
        adv[i] = next_adv;
        next_v = values[i];
    }
    let ret = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, ret)
}

/// Mean and population variance, in f64.
fn mean_var(x: &[f32]) -> (f64, f64) {
    if x.is_empty() {
        return (0.0, 0.0);
    }
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, var)
}

/// (x − mean) / sqrt(var + 1e-8) with the population variance; `keep_mean` adds the mean back
/// (whitening the scale only).
pub fn whiten(x: &[f32], keep_mean: bool) -> Vec<f32> {
    let (mean, var) = mean_var(x);
    let inv = 1.0 / (var + WHITEN_EPS as f64).sqrt();
    x.iter()
        .map(|&v| {
            let w = (v as f64 - mean) * inv;
            (if keep_mean { w + mean } else { w }) as f32
        })
        .collect()
}

/// The per-token KL estimator log π_θ(y_t) − log π_0(y_t) (its expectation under π_θ is the KL;
/// summed over a response it is the sequence's log-ratio).
pub fn kl_per_token(logp_policy: &[f32], logp_ref: &[f32]) -> Vec<f32> {
    assert_eq!(logp_policy.len(), logp_ref.len(), "kl: same lengths");
    logp_policy
        .iter()
        .zip(logp_ref)
        .map(|(a, b)| a - b)
        .collect()
}

/// Subtracts from each reward the mean reward of the other answers to the same prompt (`prompt`
/// gives each answer's prompt; answers to one prompt are adjacent). Answers alone with their
/// prompt keep their reward.
pub fn leave_one_out(rewards: &mut [f32], prompt: &[usize]) {
    let mut i = 0;
    while i < rewards.len() {
        let mut j = i;
        while j < rewards.len() && prompt[j] == prompt[i] {
            j += 1;
        }
        let k = j - i;
        if k > 1 {
            let sum: f32 = rewards[i..j].iter().sum();
            for r in &mut rewards[i..j] {
                *r -= (sum - *r) / (k - 1) as f32;
            }
        }
        i = j;
    }
}

fn one() -> usize {
    1
}

/// PPO's clipped surrogate for one token, as a loss to minimise:
/// L = max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)) with ρ = exp(logp − logp_old). Returns (L, dL/dlogp,
/// clipped): when the clipped term is the larger one (ρ > 1 + ε with A > 0, or ρ < 1 − ε with
/// A < 0) the gradient is 0 and `clipped` is true; otherwise dL/dlogp = −A·ρ.
pub fn clipped_surrogate(ratio: f32, adv: f32, eps: f32) -> (f32, f32, bool) {
    let unclipped = -adv * ratio;
    let clipped = -adv * ratio.clamp(1.0 - eps, 1.0 + eps);
    if clipped > unclipped {
        (clipped, 0.0, true)
    } else {
        (unclipped, -adv * ratio, false)
    }
}

/// The clipped value loss for one token: L = ½·max((v − R)², (v_c − R)²) with
/// v_c = v_old + clip(v − v_old, −ε, ε). Returns (L, dL/dv); the clipped branch has no gradient
/// where the clip is active.
pub fn clipped_value_loss(v: f32, v_old: f32, ret: f32, eps: f32) -> (f32, f32) {
    let d = v - v_old;
    let vc = v_old + d.clamp(-eps, eps);
    let (l1, l2) = ((v - ret).powi(2), (vc - ret).powi(2));
    if l1 >= l2 {
        (0.5 * l1, v - ret)
    } else {
        let active = d.abs() < eps;
        (0.5 * l2, if active { vc - ret } else { 0.0 })
    }
}

/// 1 − Var(returns − values) / Var(returns): how much of the return the critic explains
/// (1 perfect, 0 no better than a constant, negative worse). 0 when the returns are constant.
pub fn explained_variance(values: &[f32], returns: &[f32]) -> f32 {
    let (_, var_r) = mean_var(returns);
    if var_r <= 0.0 {
        return 0.0;
    }
    let diff: Vec<f32> = returns.iter().zip(values).map(|(r, v)| r - v).collect();
    (1.0 - mean_var(&diff).1 / var_r) as f32
}

// ---------------------------------------------------------------------------------------------
// Configuration

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PpoConfig {
    /// The initial policy (rejection-sampling or SFT checkpoint, HF layout, with tokenizer.json).
    pub policy: PathBuf,
    /// The frozen reference π_0; default: `policy`.
    pub reference: Option<PathBuf>,
    /// The helpfulness reward model (an `llama2 train-rm` model directory).
    pub reward_helpfulness: PathBuf,
    /// The safety reward model; default: the helpfulness one serves as both.
    pub reward_safety: Option<PathBuf>,
    /// The critic's initialisation (a score-head checkpoint); default: `reward_helpfulness`.
    pub critic: Option<PathBuf>,
    /// Prompt JSONL: world rows (`messages` ending with a user turn, `category`) or any
    /// `{"messages"}` / `{"prompt"}` row; `"category": "safety"` tags safety prompts.
    pub prompts: Vec<PathBuf>,
    /// Held-out prompts for early stopping; default: every 20th training prompt is held out.
    pub eval_prompts: Vec<PathBuf>,
    /// At most this many held-out prompts are evaluated.
    pub eval_size: usize,
    /// A world directory: its gold annotator scores every rollout and evaluation (logged only).
    pub world: Option<PathBuf>,
    pub out: PathBuf,
    /// Continue from this checkpoint (a `checkpoints/iter-N` directory or a run directory).
    pub resume: Option<PathBuf>,
    pub iterations: usize,
    /// Prompts (rollouts) per iteration; the paper's 512.
    pub batch: usize,
    /// Rollouts per gradient step; the paper's 64.
    pub minibatch: usize,
    /// Passes over each batch (the paper: one gradient step per minibatch, so 1).
    pub ppo_epochs: usize,
    /// Constant learning rate of the policy; the paper's 1e-6.
    pub lr: f32,
    /// The critic's learning rate; default: `lr`.
    pub critic_lr: Option<f32>,
    /// KL coefficient; default: the paper's for the policy's size (`paper::defaults`).
    pub beta: Option<f32>,
    pub gamma: f32,
    pub lam: f32,
    /// Clip threshold of the surrogate.
    pub clip: f32,
    /// Clip threshold of the value loss (in reward units).
    pub value_clip: f32,
    pub safety_threshold: f32,
    /// Whiten the advantages over the batch's tokens.
    pub whiten_advantages: bool,
    pub temperature: f32,
    pub top_p: f32,
    pub max_new_tokens: usize,
    /// Sequences per generation or scoring forward.
    pub gen_batch: usize,
    pub weight_decay: f32,
    /// Global gradient-norm clip of each model (0: off).
    pub grad_clip: f32,
    /// Evaluate the held-out prompts every N iterations (0: never; then no early stopping).
    pub eval_every: usize,
    /// Stop after this many evaluations without a new best held-out reward (0: never stop).
    pub patience: usize,
    /// Checkpoint every N iterations (and always at the end; 0: only at the end).
    pub ckpt_every: usize,
    pub keep_checkpoints: usize,
    pub seed: u64,
    pub progress: bool,
    /// Reward the rollouts with the world's gold annotator instead of the reward models (an
    /// upper-bound ablation on the built-in world; needs `world`).
    #[serde(default)]
    pub oracle: bool,
    /// Iterations at the start that train only the critic (the policy samples but is not
    /// updated), so the first policy steps see values of the right scale.
    #[serde(default)]
    pub critic_warmup: usize,
    /// Answers sampled per prompt in a batch (1: the paper's one). With k > 1 each reward is
    /// measured against the mean of the other k − 1 answers to its prompt before whitening, a
    /// per-prompt baseline (RLOO) that removes prompt difficulty from the advantages, which a small
    /// critic cannot.
    #[serde(default = "one")]
    pub samples_per_prompt: usize,
    /// Held-out evaluation draws this many answers per prompt at the rollout temperature (the
    /// policy's expected reward, what PPO maximises); 0 evaluates greedy answers.
    #[serde(default)]
    pub eval_samples: usize,
    /// Activation recomputation for the policy's and the critic's backward (`--recompute`).
    #[serde(default)]
    pub recompute: engine::Recompute,
    /// Data-parallel gradient buckets, MiB of f32, reduce-scattered while each backward runs
    /// (0: all at once after it).
    #[serde(default = "crate::pretrain::default_bucket_mb")]
    pub bucket_mb: f64,
}

impl PpoConfig {
    /// The configuration with every path absolute against the working directory.
    pub fn absolutized(&self) -> Result<Self> {
        use crate::run_dir::make_absolute as abs;
        let mut c = self.clone();
        abs(&mut c.policy)?;
        abs(&mut c.reward_helpfulness)?;
        abs(&mut c.out)?;
        for p in [
            &mut c.reference,
            &mut c.reward_safety,
            &mut c.critic,
            &mut c.world,
            &mut c.resume,
        ]
        .into_iter()
        .flatten()
        {
            abs(p)?;
        }
        for p in c.prompts.iter_mut().chain(c.eval_prompts.iter_mut()) {
            abs(p)?;
        }
        Ok(c)
    }

    /// The paper's settings: constant LR 1e-6, batch 512, minibatch 64 with one gradient step
    /// each, clip 0.2, γ 1, λ 0.95, β by model shape, AdamW as in pretraining (β 0.9/0.95, eps
    /// 1e-5, weight decay 0.1, gradient clipping 1.0), 200 iterations (the paper trains 200-400
    /// and stops early on held-out reward), temperature 1.
    pub fn new(
        policy: PathBuf,
        reward_helpfulness: PathBuf,
        prompts: Vec<PathBuf>,
        out: PathBuf,
    ) -> Self {
        PpoConfig {
            policy,
            reference: None,
            reward_helpfulness,
            reward_safety: None,
            critic: None,
            prompts,
            eval_prompts: vec![],
            eval_size: 256,
            world: None,
            out,
            resume: None,
            iterations: 200,
            batch: 512,
            minibatch: 64,
            ppo_epochs: 1,
            lr: 1e-6,
            critic_lr: None,
            beta: None,
            gamma: 1.0,
            lam: 0.95,
            clip: 0.2,
            value_clip: 0.2,
            safety_threshold: reward::SAFETY_THRESHOLD,
            whiten_advantages: true,
            temperature: 1.0,
            top_p: 1.0,
            max_new_tokens: 128,
            gen_batch: 64,
            weight_decay: 0.1,
            grad_clip: 1.0,
            eval_every: 10,
            patience: 3,
            ckpt_every: 25,
            keep_checkpoints: 2,
            seed: 1337,
            progress: true,
            oracle: false,
            critic_warmup: 0,
            eval_samples: 0,
            samples_per_prompt: 1,
            recompute: engine::Recompute::None,
            bucket_mb: crate::pretrain::default_bucket_mb(),
        }
    }
}

/// The state saved beside every checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PpoState {
    pub kind: String,
    /// Iterations completed.
    pub iteration: usize,
    pub policy_adamw_step: u64,
    pub critic_adamw_step: u64,
    pub best_eval: Option<f32>,
    pub evals_since_best: usize,
    pub config: PpoConfig,
}

/// The configuration a resumed run continues with: the checkpoint's own, `resume` set to it,
/// writing into the run directory it is in, and `iterations` optionally changed.
pub fn resume_config(path: &Path, iterations: Option<usize>) -> Result<PpoConfig> {
    let dir = resolve_checkpoint(path)?;
    let st = read_state(&dir)?;
    let mut cfg = st.config;
    // The run continues where its checkpoint now is (a moved or copied run directory).
    if let Some(run) = run_dir::run_dir_of(&dir) {
        cfg.out = run;
    }
    cfg.resume = Some(dir);
    if let Some(i) = iterations {
        cfg.iterations = i;
    }
    Ok(cfg)
}

fn read_state(dir: &Path) -> Result<PpoState> {
    let p = dir.join(STATE);
    let st: PpoState = run_dir::read_json(&p)?;
    ensure!(
        st.kind == "ppo",
        "{}: a `{}` checkpoint, not a PPO one",
        p.display(),
        st.kind
    );
    Ok(st)
}

/// The file that makes a directory a PPO checkpoint.
pub const STATE: &str = "ppo_state.json";

/// A PPO checkpoint itself, or a run directory whose `checkpoints/latest` names one.
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf> {
    run_dir::resolve_checkpoint(path, STATE, "PPO")
}

/// Prompt `k` of the training stream: epoch `k / n` is a fresh permutation of (seed, epoch).
fn stream_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
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

// ---------------------------------------------------------------------------------------------
// Rollouts

/// One rollout: the prompt and response tokens and everything PPO computes about them.
#[derive(Clone, Debug, Default)]
struct Sample {
    prompt: usize,
    /// Prompt ids then response ids (the response includes the EOS when generation stopped).
    ids: Vec<u32>,
    /// Prompt length: action j is ids[p + j], predicted at row p − 1 + j.
    p: usize,
    text: String,
    logp_old: Vec<f32>,
    logp_ref: Vec<f32>,
    entropy: Vec<f32>,
    values: Vec<f32>,
    adv: Vec<f32>,
    ret: Vec<f32>,
    /// R_c (probability-like) and R̃_c (whitened logit).
    rc: f32,
    reward: f32,
    gold: Option<(f32, f32, f32)>,
}

impl Sample {
    fn len(&self) -> usize {
        self.ids.len() - self.p
    }
}

/// Sequences padded right to the longest, targets −100 outside the responses, and the flat row
/// predicting each response token (sequence by sequence).
struct Padded {
    ids: Vec<i32>,
    targets: Vec<i32>,
    b: usize,
    t: usize,
    rows: Vec<i32>,
}

impl Padded {
    fn new(samples: &[&Sample], pad: u32) -> Padded {
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

    fn batch(&self) -> Batch<'_> {
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
fn response_logprobs<B: Backend>(
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
fn response_values<B: Backend>(
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

// ---------------------------------------------------------------------------------------------
// Logs and reports

/// One iteration's numbers (a line of `metrics.jsonl`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct IterStats {
    pub iteration: usize,
    /// Mean R_c over the batch (the reward models' proxy reward, in (0, 1)).
    pub reward: f32,
    /// Mean LOGIT(R_c) (the raw reward-model score before whitening).
    pub score: f32,
    /// Mean gold R_c, helpfulness and safety by the annotator, where a world is given.
    pub gold_reward: Option<f32>,
    pub gold_helpfulness: Option<f32>,
    pub gold_safety: Option<f32>,
    /// Mean over sequences of Σ_t (log π_θ − log π_0) of the rollout.
    pub kl: f32,
    /// Mean per-token entropy of the policy on its responses.
    pub entropy: f32,
    pub clip_frac: f32,
    pub pg_loss: f32,
    pub value_loss: f32,
    pub value_clip_frac: f32,
    pub explained_variance: f32,
    /// Mean of ½(logp_old − logp)² over the updated tokens (how far the minibatch steps moved).
    pub approx_kl: f32,
    /// Mean response length in tokens (the EOS counts when generated).
    pub response_len: f32,
    /// Share of responses that ended with an EOS (not the token limit).
    pub stopped: f32,
    pub policy_grad_norm: f32,
    pub critic_grad_norm: f32,
    pub seconds: f64,
}

/// A held-out evaluation (greedy answers, or `samples` per prompt).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EvalStats {
    pub iteration: usize,
    pub prompts: usize,
    /// Answers per prompt sampled at the rollout temperature; 0: greedy.
    #[serde(default)]
    pub samples: usize,
    /// Mean R_c of the reward models.
    pub reward: f32,
    /// Mean LOGIT(R_c) (the reward models' raw score; it does not saturate like R_c).
    pub score: f32,
    pub gold_reward: Option<f32>,
    pub gold_helpfulness: Option<f32>,
    pub gold_safety: Option<f32>,
    pub response_len: f32,
}

#[derive(Clone, Debug, Serialize)]
pub struct PpoReport {
    /// Iterations completed (with those before a resume).
    pub iterations: usize,
    pub stopped_early: bool,
    pub history: Vec<IterStats>,
    pub evals: Vec<EvalStats>,
    pub best: Option<EvalStats>,
    /// The last checkpoint written (policy HF checkpoint + critic + optimizer + state).
    pub checkpoint: PathBuf,
    /// The policy with the best held-out reward (`out/best`), if any evaluation ran.
    pub best_dir: Option<PathBuf>,
    pub beta: f32,
    pub seconds: f64,
}

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

// ---------------------------------------------------------------------------------------------
// Checkpoints

#[allow(clippy::too_many_arguments)]
fn save_checkpoint<B: Backend>(
    dir: &Path,
    policy: &Llama<B>,
    critic: &Llama<B>,
    opt_p: &AdamW<B>,
    opt_c: &AdamW<B>,
    tokenizer: &Path,
    critic_tokenizer: &Path,
    state: &PpoState,
) -> Result<()> {
    let host = |m: &Llama<B>, buf: &B::Buf<f32>| -> Result<Vec<f32>> {
        let mut v = vec![0f32; m.table.total];
        m.be.to_host(&mut v, B::all(buf))?;
        Ok(v)
    };
    let (pm, pv) = (host(policy, &opt_p.m)?, host(policy, &opt_p.v)?);
    let (cm, cv) = (host(critic, &opt_c.m)?, host(critic, &opt_c.v)?);
    save_model(policy, dir, SaveOptions::default(), |tmp| {
        std::fs::copy(tokenizer, tmp.join("tokenizer.json"))
            .map_err(|e| engine::Error::io(tokenizer, e))?;
        save_model(critic, &tmp.join("critic"), SaveOptions::default(), |c| {
            std::fs::copy(critic_tokenizer, c.join("tokenizer.json"))
                .map(|_| ())
                .map_err(|e| engine::Error::io(critic_tokenizer, e))
        })?;
        run_dir::write_optimizer(
            &tmp.join("optimizer.safetensors"),
            &[
                ("policy.adamw.m", &pm),
                ("policy.adamw.v", &pv),
                ("critic.adamw.m", &cm),
                ("critic.adamw.v", &cv),
            ],
        )?;
        let text = serde_json::to_string_pretty(state).expect("json");
        std::fs::write(tmp.join(STATE), text).map_err(|e| engine::Error::io(tmp, e))
    })
    .with_context(|| format!("saving the checkpoint {}", dir.display()))
}

/// A ZeRO-1 PPO checkpoint, written by every rank: the policy's (with `tokenizer.json`), then
/// the critic's in `critic/`, then rank 0 writes `ppo_state.json`, which makes it a checkpoint.
#[allow(clippy::too_many_arguments)]
fn save_zero1_checkpoint<B: Backend>(
    dir: &Path,
    policy: &Llama<B>,
    critic: &Llama<B>,
    opt_p: &ShardedAdamW<B>,
    opt_c: &ShardedAdamW<B>,
    comm: &mut dyn DeviceCollective<B>,
    tokenizer: &Path,
    critic_tokenizer: &Path,
    state: &PpoState,
) -> Result<()> {
    let copy = |from: &Path, tmp: &Path| -> engine::Result<()> {
        std::fs::copy(from, tmp.join("tokenizer.json"))
            .map(|_| ())
            .map_err(|e| engine::Error::io(from, e))
    };
    save_zero1(dir, policy, opt_p, comm, SaveOptions::default(), |tmp| {
        copy(tokenizer, tmp)
    })
    .with_context(|| format!("saving the policy of checkpoint {}", dir.display()))?;
    save_zero1(
        &dir.join("critic"),
        critic,
        opt_c,
        comm,
        SaveOptions::default(),
        |tmp| copy(critic_tokenizer, tmp),
    )
    .with_context(|| format!("saving the critic of checkpoint {}", dir.display()))?;
    let mine = if comm.rank() == 0 {
        let text = serde_json::to_string_pretty(state).expect("json");
        run_dir::write_atomic(&dir.join(STATE), text.as_bytes())
    } else {
        Ok(())
    };
    run_dir::agree(comm, mine, &format!("writing {}", dir.display()))
}

// ---------------------------------------------------------------------------------------------
// Data parallelism (`train_dp`)

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

// ---------------------------------------------------------------------------------------------
// The loop

fn adamw_cfg(cfg: &PpoConfig) -> AdamWConfig {
    AdamWConfig {
        weight_decay: cfg.weight_decay,
        clip_norm: (cfg.grad_clip > 0.0).then_some(cfg.grad_clip),
        ..AdamWConfig::default()
    }
}

/// Per-iteration seed mixing: a distinct stream per (seed, iteration, purpose).
fn mix(seed: u64, it: usize, purpose: u64) -> u64 {
    seed ^ (it as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ purpose.wrapping_mul(0xD1B5_4A32_D192_ED03)
}

/// `llama2 ppo`: see the module documentation.
pub fn run<B: Backend>(be: B, cfg: &PpoConfig) -> Result<PpoReport> {
    train_dp(be, cfg, None)
}

/// PPO on `comm.world()` data-parallel ranks (or one process with `None`), doing what one
/// process does with the same configuration: each rank generates, scores and evaluates under
/// the old policy, the reference and the critic its contiguous share of the iteration's
/// `gen_batch` chunks (with the same per-chunk seeds), then every rank all-gathers the rollouts
/// (tokens and per-token numbers, as f32) and computes the batch-wide quantities (leave-one-out
/// baselines, whitening, GAE, logged means) on the whole batch, identically. Each minibatch is
/// cut into `world` contiguous parts, one per rank, whose backward is scaled by the minibatch's
/// global token count, so the summed gradient is one process's; policy and critic step with
/// ZeRO-1 (`ShardedAdamW`). Rank 0 evaluates, logs and writes; the early-stopping decision is
/// sent to every rank; checkpoints are ZeRO-1 ones (`save_zero1`, the critic's in `critic/`),
/// which resume on any world size.
pub fn train_dp<B: Backend>(
    be: B,
    cfg: &PpoConfig,
    comm: Option<&mut dyn DeviceCollective<B>>,
) -> Result<PpoReport> {
    let mut comm = comm.filter(|c| c.world() > 1);
    let (rank, world) = comm.as_ref().map_or((0, 1), |c| (c.rank(), c.world()));
    let lead = rank == 0;
    let say = |bar: &ProgressBar, msg: String| {
        if lead {
            run_dir::say(bar, msg)
        }
    };
    ensure!(
        world == 1
            || (cfg.gen_batch > 0
                && cfg.batch.is_multiple_of(cfg.gen_batch)
                && (cfg.batch / cfg.gen_batch).is_multiple_of(world)),
        "ppo on {world} ranks: the batch ({}) must be a whole number of generation chunks (gen_batch {}) per rank, so each rank samples with one process's seeds",
        cfg.batch,
        cfg.gen_batch
    );
    ensure!(
        cfg.batch > 0 && cfg.minibatch > 0,
        "batch and minibatch must be > 0"
    );
    ensure!(cfg.ppo_epochs > 0, "ppo_epochs must be > 0");
    crate::optimizer::check_bucket_mb(cfg.bucket_mb)?;
    ensure!(cfg.max_new_tokens > 0, "max_new_tokens must be > 0");
    ensure!(!cfg.prompts.is_empty(), "no prompt files given");
    ensure!(
        !cfg.oracle || cfg.world.is_some(),
        "the oracle reward needs a world (its gold annotator)"
    );
    // Absolute paths from here on: the checkpoints' configuration then resumes from anywhere.
    // The policy and the reference may be training run directories: their latest checkpoints.
    let mut cfg = cfg.absolutized()?;
    cfg.policy = run_dir::model_dir(&cfg.policy)?;
    cfg.reference = cfg
        .reference
        .as_deref()
        .map(run_dir::model_dir)
        .transpose()?;
    let cfg = &cfg;
    let t_start = Instant::now();

    // ---- models
    let resume = cfg.resume.as_deref().map(resolve_checkpoint).transpose()?;
    let state = resume.as_deref().map(read_state).transpose()?;
    let policy_dir = resume.clone().unwrap_or_else(|| cfg.policy.clone());
    let tok_path = policy_dir.join("tokenizer.json");
    ensure!(
        tok_path.is_file(),
        "{}: no tokenizer.json beside the policy",
        policy_dir.display()
    );
    let tok = Tokenizer::from_file(&tok_path)?;
    let mut policy = load_model(be.clone(), &policy_dir, Head::Lm)
        .with_context(|| format!("loading the policy {}", policy_dir.display()))?;
    policy.zero_grads()?;
    policy.set_recompute(cfg.recompute);
    let ref_dir = cfg.reference.clone().unwrap_or_else(|| cfg.policy.clone());
    let mut reference = load_model(be.clone(), &ref_dir, Head::Lm)
        .with_context(|| format!("loading the reference policy {}", ref_dir.display()))?;
    ensure!(
        reference.cfg.vocab_size == policy.cfg.vocab_size,
        "the reference policy's vocabulary ({}) differs from the policy's ({})",
        reference.cfg.vocab_size,
        policy.cfg.vocab_size
    );
    ensure!(
        policy.cfg.vocab_size >= tok.vocab_size(),
        "the policy's vocab_size ({}) is smaller than its tokenizer's ({})",
        policy.cfg.vocab_size,
        tok.vocab_size()
    );
    let critic_dir = match &resume {
        Some(d) => d.join("critic"),
        None => cfg
            .critic
            .clone()
            .unwrap_or_else(|| cfg.reward_helpfulness.clone()),
    };
    let (mut critic, _) = load_rm(be.clone(), &critic_dir)
        .with_context(|| format!("loading the critic {}", critic_dir.display()))?;
    critic.zero_grads()?;
    critic.set_recompute(cfg.recompute);
    ensure!(
        critic.cfg.vocab_size >= tok.vocab_size(),
        "the critic reads the policy's tokens: its vocab_size ({}) is smaller than the policy tokenizer's ({})",
        critic.cfg.vocab_size,
        tok.vocab_size()
    );
    let critic_tok = run_dir::model_dir(&critic_dir)?.join("tokenizer.json");
    let mut rewards = RewardModels::load(
        be.clone(),
        &cfg.reward_helpfulness,
        cfg.reward_safety.as_deref(),
    )?;
    rewards.threshold = cfg.safety_threshold;
    rewards.batch = cfg.gen_batch.max(1);
    let ann = cfg
        .world
        .as_deref()
        .map(|w| World::load(w).map(Annotator::new))
        .transpose()
        .context("loading the world for the gold annotator")?;
    let beta = cfg
        .beta
        .unwrap_or_else(|| crate::paper::for_model(&policy.cfg).ppo_beta);
    let critic_lr = cfg.critic_lr.unwrap_or(cfg.lr);
    let (mut start, mut best_eval, mut since_best) = (0usize, None::<f32>, 0usize);
    let (mut opt_p, mut opt_c);
    if let (Some(dir), Some(st)) = (&resume, &state) {
        opt_p = Optim::load(
            &mut policy,
            adamw_cfg(cfg),
            dir,
            dir,
            "policy",
            st.policy_adamw_step,
            comm.as_deref_mut(),
        )?;
        opt_c = Optim::load(
            &mut critic,
            adamw_cfg(cfg),
            &dir.join("critic"),
            dir,
            "critic",
            st.critic_adamw_step,
            comm.as_deref_mut(),
        )?;
        start = st.iteration;
        best_eval = st.best_eval;
        since_best = st.evals_since_best;
    } else {
        opt_p = Optim::new(&mut policy, adamw_cfg(cfg), comm.as_deref_mut())?;
        opt_c = Optim::new(&mut critic, adamw_cfg(cfg), comm.as_deref_mut())?;
    }

    // ---- prompts
    let mut train_p = crate::formats::read_prompts(&cfg.prompts, None)?.0;
    let mut eval_p = if cfg.eval_prompts.is_empty() {
        let all = std::mem::take(&mut train_p);
        let mut held = Vec::new();
        for (i, p) in all.into_iter().enumerate() {
            if i % 20 == 19 {
                held.push(p);
            } else {
                train_p.push(p);
            }
        }
        held
    } else {
        crate::formats::read_prompts(&cfg.eval_prompts, None)?.0
    };
    eval_p.truncate(cfg.eval_size);
    ensure!(!train_p.is_empty(), "no training prompts");

    let mut metrics = if lead {
        std::fs::create_dir_all(&cfg.out)
            .with_context(|| format!("creating {}", cfg.out.display()))?;
        std::fs::write(
            cfg.out.join("config.json"),
            serde_json::to_string_pretty(cfg)?,
        )?;
        Some(MetricsWriter::open(
            &cfg.out.join("metrics.jsonl"),
            resume.as_ref().map(|_| start as u64),
        )?)
    } else {
        None
    };
    let bar = crate::run_dir::progress("ppo", cfg.iterations as u64, cfg.progress && lead);
    bar.set_position(start as u64);
    say(
        &bar,
        format!(
            "ppo: {} training / {} held-out prompts; {}batch {}, minibatch {}, lr {:.1e} (critic {:.1e}), β {beta}, clip {}, γ {}, λ {}, temperature {}, ≤{} new tokens{}{}",
            train_p.len(),
            eval_p.len(),
            if world > 1 { format!("{world} ranks; ") } else { String::new() },
            cfg.batch,
            cfg.minibatch,
            cfg.lr,
            critic_lr,
            cfg.clip,
            cfg.gamma,
            cfg.lam,
            cfg.temperature,
            cfg.max_new_tokens,
            if ann.is_some() { "; gold annotator on" } else { "" },
            if start > 0 { format!("; resumed at iteration {start}") } else { String::new() },
        ),
    );

    let pad = tok.eos;
    let ckpt_root = cfg.out.join("checkpoints");
    let best_dir = cfg.out.join("best");
    if start == 0 && lead {
        let _ = std::fs::remove_dir_all(&best_dir); // a previous run's
    }
    let mut history = Vec::new();
    let mut evals = Vec::new();
    let mut best = None;
    let mut stopped_early = false;
    let mut last_ckpt = None;
    let mut it = start;

    let do_eval = |policy: &mut Llama<B>,
                   rewards: &mut RewardModels<B>,
                   it: usize|
     -> Result<Option<EvalStats>> {
        if eval_p.is_empty() || cfg.eval_every == 0 || !lead {
            return Ok(None);
        }
        Ok(Some(evaluate(
            policy,
            &tok,
            rewards,
            ann.as_ref(),
            &eval_p,
            cfg,
            it,
        )?))
    };

    // The starting point's held-out reward (the SFT baseline on a fresh run).
    if start == 0 {
        if let Some(ev) = do_eval(&mut policy, &mut rewards, 0)? {
            say(&bar, eval_line(&ev));
            if let Some(m) = &mut metrics {
                m.write(&serde_json::json!({"eval": &ev, "step": 0}))?;
            }
            best_eval = Some(ev.reward);
            best = Some(ev.clone());
            evals.push(ev);
        }
    }

    while it < cfg.iterations {
        let t_it = Instant::now();
        // ---- rollouts
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
        let answers = chat_answers(&mut policy, &tok, &dialogues, &params, cfg.gen_batch)?;
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
        // ---- rewards: R_c, then WHITEN(LOGIT(R_c)) over the batch
        let rows: Vec<(Vec<Message>, String)> = samples
            .iter()
            .map(|s| (train_p[s.prompt].messages.clone(), s.text.clone()))
            .collect();
        let safety: Vec<bool> = samples.iter().map(|s| train_p[s.prompt].safety).collect();
        let rc = match (&ann, cfg.oracle) {
            (Some(ann), true) => samples
                .iter()
                .map(|s| {
                    let p = &train_p[s.prompt];
                    reward::gold(ann, &p.messages, p.safety, &s.text, cfg.safety_threshold).0
                })
                .collect(),
            _ => rewards.rc(&rows, &safety)?,
        };
        for (s, &r) in samples.iter_mut().zip(&rc) {
            s.rc = r;
            if let Some(ann) = &ann {
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
            let refs: Vec<&Sample> = samples.iter().collect();
            let old = response_logprobs(&mut policy, &refs, cfg.minibatch, pad)?;
            let rf = response_logprobs(&mut reference, &refs, cfg.minibatch, pad)?;
            let vals = response_values(&mut critic, &refs, cfg.minibatch, pad)?;
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
        if let Some(c) = comm.as_deref_mut() {
            let mut enc = Vec::new();
            for s in &samples {
                s.encode(&mut enc);
            }
            samples = Sample::decode(&gather_var(c, &enc)?);
        }
        let rc: Vec<f32> = samples.iter().map(|s| s.rc).collect();
        let n_stopped = samples
            .iter()
            .filter(|s| s.ids.last() == Some(&tok.eos))
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
            let mut r: Vec<f32> = kl.iter().map(|k| -beta * k).collect();
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
        let ev = explained_variance(&all_v, &all_r);

        // ---- updates: one policy and one critic step per minibatch
        let (mut pg_sum, mut clip_n, mut vl_sum, mut vclip_n, mut akl_sum, mut tok_n) =
            (0f64, 0usize, 0f64, 0usize, 0f64, 0usize);
        let (mut pgn, mut cgn, mut steps) = (0f64, 0f64, 0usize);
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
                    policy.forward(&pb.batch())?;
                    let (lp, _) = policy.token_logprobs(&pb.targets)?;
                    let mut w = vec![0f32; pb.b * pb.t];
                    let mut k = 0;
                    for s in &batch {
                        for j in 0..s.len() {
                            let r = pb.rows[k] as usize;
                            let ratio = (lp[r] - s.logp_old[j]).exp();
                            let (l, d, c) = clipped_surrogate(ratio, s.adv[j], cfg.clip);
                            pg_sum += l as f64;
                            clip_n += usize::from(c);
                            akl_sum += 0.5 * ((lp[r] - s.logp_old[j]) as f64).powi(2);
                            w[r] = d / ntok as f32;
                            k += 1;
                        }
                    }
                    let mut sink = opt_p.overlap(comm.as_deref_mut(), cfg.bucket_mb);
                    policy.backward_logprobs_with(&w, as_sink(&mut sink))?;
                } else if train_policy {
                    // An empty part: the same buckets as the ranks that ran a backward.
                    if let Some(s) = as_sink(&mut opt_p.overlap(comm.as_deref_mut(), cfg.bucket_mb))
                    {
                        policy.report_grads(s)?;
                    }
                }
                if train_policy {
                    let st = opt_p
                        .step(&mut policy, comm.as_deref_mut(), cfg.lr)
                        .map_err(|e| anyhow!("iteration {}: policy step: {e}", it + 1))?;
                    policy.zero_grads()?;
                    pgn += st.grad_norm as f64;
                }
                // Critic: the clipped value loss at the same positions.
                if active {
                    critic.forward(&pb.batch())?;
                    let v = critic.scores(&pb.rows)?;
                    let mut dv = vec![0f32; v.len()];
                    let mut k = 0;
                    for s in &batch {
                        for j in 0..s.len() {
                            let (l, d) =
                                clipped_value_loss(v[k], s.values[j], s.ret[j], cfg.value_clip);
                            vl_sum += l as f64;
                            vclip_n += usize::from((v[k] - s.values[j]).abs() > cfg.value_clip);
                            dv[k] = d / ntok as f32;
                            k += 1;
                        }
                    }
                    let mut sink = opt_c.overlap(comm.as_deref_mut(), cfg.bucket_mb);
                    critic.backward_scores_with(&dv, as_sink(&mut sink))?;
                } else if let Some(s) =
                    as_sink(&mut opt_c.overlap(comm.as_deref_mut(), cfg.bucket_mb))
                {
                    critic.report_grads(s)?;
                }
                let st = opt_c
                    .step(&mut critic, comm.as_deref_mut(), critic_lr)
                    .map_err(|e| anyhow!("iteration {}: critic step: {e}", it + 1))?;
                critic.zero_grads()?;
                cgn += st.grad_norm as f64;
                tok_n += ntok;
                steps += 1;
            }
        }
        it += 1;
        if let Some(c) = comm.as_deref_mut() {
            // The ranks' shares of the loss sums (each rank's is in f64; the sum in f32).
            let mut sums = [
                pg_sum as f32,
                clip_n as f32,
                vl_sum as f32,
                vclip_n as f32,
                akl_sum as f32,
            ];
            c.all_reduce_sum(&mut sums)?;
            pg_sum = sums[0] as f64;
            clip_n = sums[1] as usize;
            vl_sum = sums[2] as f64;
            vclip_n = sums[3] as usize;
            akl_sum = sums[4] as f64;
        }

        // ---- logs
        let n = samples.len() as f32;
        let ntok_all: usize = samples.iter().map(|s| s.len()).sum();
        let mean_g = |f: fn(&(f32, f32, f32)) -> f32| -> Option<f32> {
            ann.as_ref().map(|_| {
                samples
                    .iter()
                    .filter_map(|s| s.gold.as_ref().map(f))
                    .sum::<f32>()
                    / n
            })
        };
        let stats = IterStats {
            iteration: it,
            reward: rc.iter().sum::<f32>() / n,
            score: logits.iter().sum::<f32>() / n,
            gold_reward: mean_g(|g| g.0),
            gold_helpfulness: mean_g(|g| g.1),
            gold_safety: mean_g(|g| g.2),
            kl: (kl_sum / n as f64) as f32,
            entropy: samples
                .iter()
                .flat_map(|s| s.entropy.iter())
                .map(|&x| x as f64)
                .sum::<f64>() as f32
                / ntok_all.max(1) as f32,
            clip_frac: clip_n as f32 / tok_n.max(1) as f32,
            pg_loss: (pg_sum / tok_n.max(1) as f64) as f32,
            value_loss: (vl_sum / tok_n.max(1) as f64) as f32,
            value_clip_frac: vclip_n as f32 / tok_n.max(1) as f32,
            explained_variance: ev,
            approx_kl: (akl_sum / tok_n.max(1) as f64) as f32,
            response_len: ntok_all as f32 / n,
            stopped: n_stopped as f32 / n,
            policy_grad_norm: (pgn / steps.max(1) as f64) as f32,
            critic_grad_norm: (cgn / steps.max(1) as f64) as f32,
            seconds: t_it.elapsed().as_secs_f64(),
        };
        let mut rec = serde_json::to_value(&stats)?;
        rec["step"] = it.into(); // what MetricsWriter keeps on resume
        if let Some(m) = &mut metrics {
            m.write(&rec)?;
        }
        bar.set_position(it as u64);
        bar.set_message(format!(
            "reward {:.3}{} | kl {:.3} | ent {:.2} | clip {:.2} | vloss {:.3} | ev {:.2} | len {:.1}",
            stats.reward,
            stats
                .gold_reward
                .map(|g| format!(" (gold {g:.3})"))
                .unwrap_or_default(),
            stats.kl,
            stats.entropy,
            stats.clip_frac,
            stats.value_loss,
            stats.explained_variance,
            stats.response_len,
        ));
        if !stats.reward.is_finite() || !stats.kl.is_finite() {
            bail!("iteration {it}: non-finite reward or KL ({stats:?})");
        }
        history.push(stats);

        // ---- held-out evaluation and early stopping (rank 0 evaluates and decides)
        if cfg.eval_every > 0 && it % cfg.eval_every == 0 {
            let mut decided = (|| -> Result<bool> {
                let Some(ev) = do_eval(&mut policy, &mut rewards, it)? else {
                    return Ok(false);
                };
                say(&bar, eval_line(&ev));
                let mut rec = serde_json::json!({"eval": &ev});
                rec["step"] = it.into();
                if let Some(m) = &mut metrics {
                    m.write(&rec)?;
                }
                if best_eval.is_none_or(|b| ev.reward > b) {
                    best_eval = Some(ev.reward);
                    since_best = 0;
                    best = Some(ev.clone());
                    save_model(&policy, &best_dir, SaveOptions::default(), |tmp| {
                        std::fs::copy(&tok_path, tmp.join("tokenizer.json"))
                            .map(|_| ())
                            .map_err(|e| engine::Error::io(&tok_path, e))
                    })?;
                } else {
                    since_best += 1;
                }
                evals.push(ev);
                Ok(cfg.patience > 0 && since_best >= cfg.patience)
            })();
            if let Some(c) = comm.as_deref_mut() {
                // Rank 0's decision (or its failure) on every rank.
                let mut x = [0f32; 2];
                if lead {
                    x = match &decided {
                        Ok(stop) => [f32::from(u8::from(*stop)), 0.0],
                        Err(_) => [0.0, 1.0],
                    };
                }
                c.all_reduce_sum(&mut x)?;
                if !lead {
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
                say(
                        &bar,
                        format!(
                            "early stop at iteration {it}: no better held-out reward in {since_best} evaluations (best {:.4})",
                            best_eval.unwrap_or(f32::NAN)
                        ),
                    );
                stopped_early = true;
            }
        }

        // ---- checkpoint
        let last = it == cfg.iterations || stopped_early;
        if last || (cfg.ckpt_every > 0 && it % cfg.ckpt_every == 0) {
            let name = format!("iter-{it:06}");
            let dir = ckpt_root.join(&name);
            let st = PpoState {
                kind: "ppo".into(),
                iteration: it,
                policy_adamw_step: opt_p.steps(),
                critic_adamw_step: opt_c.steps(),
                best_eval,
                evals_since_best: since_best,
                config: PpoConfig {
                    resume: None,
                    ..cfg.clone()
                },
            };
            match (&opt_p, &opt_c, comm.as_deref_mut()) {
                (Optim::Whole(op), Optim::Whole(oc), _) => {
                    save_checkpoint(&dir, &policy, &critic, op, oc, &tok_path, &critic_tok, &st)?
                }
                (Optim::Sharded(op), Optim::Sharded(oc), Some(c)) => {
                    save_zero1_checkpoint(
                        &dir,
                        &policy,
                        &critic,
                        op,
                        oc,
                        c,
                        &tok_path,
                        &critic_tok,
                        &st,
                    )?;
                }
                _ => unreachable!("both optimizers are sharded or neither"),
            }
            if lead {
                run_dir::publish(&ckpt_root, &name, cfg.keep_checkpoints)?;
            }
            last_ckpt = Some(dir);
        }
        if stopped_early {
            break;
        }
    }
    bar.finish_and_clear();
    if let Ok(s) = read_series(
        &cfg.out.join("metrics.jsonl"),
        "iteration",
        &["reward", "gold_reward"],
    ) {
        let _ = line_plot(
            &cfg.out.join("reward.svg"),
            "PPO reward",
            "iteration",
            "mean R_c",
            &[("reward model (proxy)", &s[0]), ("gold", &s[1])],
        );
    }
    let checkpoint = match last_ckpt {
        Some(d) => d,
        None => resolve_checkpoint(&cfg.out).unwrap_or_else(|_| policy_dir.clone()),
    };
    Ok(PpoReport {
        iterations: it,
        stopped_early,
        history,
        evals,
        best,
        checkpoint,
        best_dir: best_dir.is_dir().then_some(best_dir),
        beta,
        seconds: t_start.elapsed().as_secs_f64(),
    })
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
