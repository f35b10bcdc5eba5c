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
//!
//! The loop ([`train_dp`]) reads as the steps of an iteration, each a method of [`Trainer`] (the
//! state that lives across iterations) in its own file: `rollout.rs` (prompts, sampling,
//! rewards, log-probs, values, advantages), `update.rs` (the policy and critic minibatch steps),
//! `eval.rs` (held-out evaluation, early stopping), `checkpoint.rs` (saving and resuming);
//! `maths.rs` holds the pure functions (GAE, whitening, KL, the clipped losses).

mod checkpoint;
mod eval;
mod maths;
mod rollout;
mod update;

pub use checkpoint::{resolve_checkpoint, resume_config, PpoState, STATE};
pub use maths::{
    clipped_surrogate, clipped_value_loss, explained_variance, gae, kl_per_token, leave_one_out,
    whiten, WHITEN_EPS,
};
pub use rollout::iteration_prompts;

use crate::formats::Prompt;
use crate::optimizer::Optim;
use crate::plot::{line_plot, read_series};
use crate::reward::{self, RewardModels};
use crate::rm::load_rm;
use crate::run_dir::{self, MetricsWriter};
use crate::world::{Annotator, World};
use anyhow::{bail, ensure, Context, Result};
use engine::checkpoint::load_model;
use engine::dist::DeviceCollective;
use engine::tokenizer::Tokenizer;
use engine::{Backend, Head, Llama};
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Instant;

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
    #[serde(default = "crate::run_dir::one")]
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
    #[serde(default = "crate::optimizer::default_bucket_mb")]
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
            bucket_mb: crate::optimizer::default_bucket_mb(),
        }
    }
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

// ---------------------------------------------------------------------------------------------
// The loop

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
    let t_start = Instant::now();
    let mut t = Trainer::new(be, cfg, comm)?;
    if t.start == 0 {
        t.baseline_eval()?;
    }
    let mut it = t.start;
    while it < t.cfg.iterations {
        let t_it = Instant::now();
        let batch = t.rollout(it)?;
        let sums = t.update(it, &batch.samples)?;
        it += 1;
        t.log(it, &batch, &sums, t_it)?;
        t.maybe_eval(it)?;
        t.maybe_checkpoint(it)?;
        if t.stopped_early {
            break;
        }
    }
    t.finish(it, t_start)
}

/// Everything that lives across iterations: the models and their optimizers, the prompts, the
/// logs, the early-stopping state and the ranks.
struct Trainer<'c, B: Backend> {
    /// Absolute paths; the policy and the reference resolved to checkpoints.
    cfg: PpoConfig,
    comm: Option<&'c mut dyn DeviceCollective<B>>,
    rank: usize,
    world: usize,
    /// Rank 0: it evaluates, prints and writes.
    lead: bool,
    /// Iterations done before this invocation (a resumed run's).
    start: usize,
    tok: Tokenizer,
    tok_path: PathBuf,
    /// The policy's checkpoint directory (the resumed checkpoint on a resume).
    policy_dir: PathBuf,
    policy: Llama<B>,
    reference: Llama<B>,
    critic: Llama<B>,
    critic_tok: PathBuf,
    rewards: RewardModels<B>,
    ann: Option<Annotator>,
    opt_p: Optim<B>,
    opt_c: Optim<B>,
    beta: f32,
    critic_lr: f32,
    /// Padding token of the padded batches (the EOS).
    pad: u32,
    train_p: Vec<Prompt>,
    eval_p: Vec<Prompt>,
    metrics: Option<MetricsWriter>,
    bar: ProgressBar,
    ckpt_root: PathBuf,
    best_dir: PathBuf,
    history: Vec<IterStats>,
    evals: Vec<EvalStats>,
    best: Option<EvalStats>,
    best_eval: Option<f32>,
    since_best: usize,
    stopped_early: bool,
    last_ckpt: Option<PathBuf>,
}

impl<'c, B: Backend> Trainer<'c, B> {
    /// Checks the configuration, loads the models (from the checkpoint on a resume) and the
    /// prompts, opens the run directory and says what the run will do.
    fn new(be: B, cfg: &PpoConfig, comm: Option<&'c mut dyn DeviceCollective<B>>) -> Result<Self> {
        let mut comm = comm.filter(|c| c.world() > 1);
        let (rank, world) = comm.as_ref().map_or((0, 1), |c| (c.rank(), c.world()));
        let lead = rank == 0;
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

        // ---- models
        let resume = cfg.resume.as_deref().map(resolve_checkpoint).transpose()?;
        let state = resume.as_deref().map(checkpoint::read_state).transpose()?;
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
        let reference = load_model(be.clone(), &ref_dir, Head::Lm)
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
        let (opt_p, opt_c);
        if let (Some(dir), Some(st)) = (&resume, &state) {
            opt_p = Optim::load(
                &mut policy,
                update::adamw_cfg(&cfg),
                dir,
                dir,
                "policy",
                st.policy_adamw_step,
                comm.as_deref_mut(),
            )?;
            opt_c = Optim::load(
                &mut critic,
                update::adamw_cfg(&cfg),
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
            opt_p = Optim::new(&mut policy, update::adamw_cfg(&cfg), comm.as_deref_mut())?;
            opt_c = Optim::new(&mut critic, update::adamw_cfg(&cfg), comm.as_deref_mut())?;
        }

        // ---- prompts
        let (train_p, eval_p) = read_prompts(&cfg)?;

        let metrics = if lead {
            run_dir::write_config(&cfg.out, &cfg)?;
            Some(MetricsWriter::open(
                &cfg.out.join("metrics.jsonl"),
                resume.as_ref().map(|_| start as u64),
            )?)
        } else {
            None
        };
        let bar = crate::run_dir::progress("ppo", cfg.iterations as u64, cfg.progress && lead);
        bar.set_position(start as u64);
        let ckpt_root = cfg.out.join("checkpoints");
        let best_dir = cfg.out.join("best");
        if start == 0 && lead {
            let _ = std::fs::remove_dir_all(&best_dir); // a previous run's
        }
        let t = Trainer {
            comm,
            rank,
            world,
            lead,
            start,
            pad: tok.eos,
            tok,
            tok_path,
            policy_dir,
            policy,
            reference,
            critic,
            critic_tok,
            rewards,
            ann,
            opt_p,
            opt_c,
            beta,
            critic_lr,
            train_p,
            eval_p,
            metrics,
            bar,
            ckpt_root,
            best_dir,
            history: Vec::new(),
            evals: Vec::new(),
            best: None,
            best_eval,
            since_best,
            stopped_early: false,
            last_ckpt: None,
            cfg,
        };
        t.say_plan();
        Ok(t)
    }

    /// Prints on rank 0 only.
    fn say(&self, msg: String) {
        if self.lead {
            run_dir::say(&self.bar, msg)
        }
    }

    fn say_plan(&self) {
        let (cfg, world, start) = (&self.cfg, self.world, self.start);
        self.say(format!(
            "ppo: {} training / {} held-out prompts; {}batch {}, minibatch {}, lr {:.1e} (critic {:.1e}), β {}, clip {}, γ {}, λ {}, temperature {}, ≤{} new tokens{}{}",
            self.train_p.len(),
            self.eval_p.len(),
            if world > 1 { format!("{world} ranks; ") } else { String::new() },
            cfg.batch,
            cfg.minibatch,
            cfg.lr,
            self.critic_lr,
            self.beta,
            cfg.clip,
            cfg.gamma,
            cfg.lam,
            cfg.temperature,
            cfg.max_new_tokens,
            if self.ann.is_some() { "; gold annotator on" } else { "" },
            if start > 0 { format!("; resumed at iteration {start}") } else { String::new() },
        ));
    }

    /// Iteration `it`'s line of `metrics.jsonl` (1-based), the progress bar, and a stop on a
    /// non-finite reward or KL.
    fn log(
        &mut self,
        it: usize,
        batch: &rollout::Rollout,
        u: &update::UpdateSums,
        t_it: Instant,
    ) -> Result<()> {
        let samples = &batch.samples;
        let n = samples.len() as f32;
        let ntok_all: usize = samples.iter().map(|s| s.len()).sum();
        let mean_g = |f: fn(&(f32, f32, f32)) -> f32| -> Option<f32> {
            self.ann.as_ref().map(|_| {
                samples
                    .iter()
                    .filter_map(|s| s.gold.as_ref().map(f))
                    .sum::<f32>()
                    / n
            })
        };
        let tok_n = u.tok_n.max(1);
        let stats = IterStats {
            iteration: it,
            reward: batch.rc.iter().sum::<f32>() / n,
            score: batch.logits.iter().sum::<f32>() / n,
            gold_reward: mean_g(|g| g.0),
            gold_helpfulness: mean_g(|g| g.1),
            gold_safety: mean_g(|g| g.2),
            kl: (batch.kl_sum / n as f64) as f32,
            entropy: samples
                .iter()
                .flat_map(|s| s.entropy.iter())
                .map(|&x| x as f64)
                .sum::<f64>() as f32
                / ntok_all.max(1) as f32,
            clip_frac: u.clip_n as f32 / tok_n as f32,
            pg_loss: (u.pg_sum / tok_n as f64) as f32,
            value_loss: (u.vl_sum / tok_n as f64) as f32,
            value_clip_frac: u.vclip_n as f32 / tok_n as f32,
            explained_variance: batch.explained_variance,
            approx_kl: (u.akl_sum / tok_n as f64) as f32,
            response_len: ntok_all as f32 / n,
            stopped: batch.n_stopped as f32 / n,
            policy_grad_norm: (u.pgn / u.steps.max(1) as f64) as f32,
            critic_grad_norm: (u.cgn / u.steps.max(1) as f64) as f32,
            seconds: t_it.elapsed().as_secs_f64(),
        };
        let mut rec = serde_json::to_value(&stats)?;
        rec["step"] = it.into(); // what MetricsWriter keeps on resume
        if let Some(m) = &mut self.metrics {
            m.write(&rec)?;
        }
        self.bar.set_position(it as u64);
        self.bar.set_message(format!(
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
        self.history.push(stats);
        Ok(())
    }

    /// The reward plot and the report, after `iterations` iterations in all.
    fn finish(self, iterations: usize, t_start: Instant) -> Result<PpoReport> {
        let cfg = &self.cfg;
        self.bar.finish_and_clear();
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
        let checkpoint = match self.last_ckpt {
            Some(d) => d,
            None => resolve_checkpoint(&cfg.out).unwrap_or_else(|_| self.policy_dir.clone()),
        };
        Ok(PpoReport {
            iterations,
            stopped_early: self.stopped_early,
            history: self.history,
            evals: self.evals,
            best: self.best,
            checkpoint,
            best_dir: self.best_dir.is_dir().then_some(self.best_dir),
            beta: self.beta,
            seconds: t_start.elapsed().as_secs_f64(),
        })
    }
}

/// The training prompts and the held-out ones (`eval_prompts`, or every 20th training prompt),
/// at most `eval_size` of those.
fn read_prompts(cfg: &PpoConfig) -> Result<(Vec<Prompt>, Vec<Prompt>)> {
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
    Ok((train_p, eval_p))
}
