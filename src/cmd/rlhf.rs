//! The RLHF stages: `rejection-sample`, `ppo`, `gatt`, `distill-safety`, and `rlhf` and
//! `pipeline` that chain them.

use super::common::on_device;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use trainer::device::Device;

#[derive(clap::Args)]
pub struct RejectionSampleArgs {
    /// The model to start from (SFT or an earlier round).
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    rm_helpfulness: PathBuf,
    #[arg(long)]
    rm_safety: PathBuf,
    /// Prompt JSONL in any shape (`prompt` as text or messages, `messages`, prompt/completion,
    /// preference pairs, HH transcripts; a trailing answer is dropped); `category: "safety"` or
    /// `is_safety: true` tags safety prompts.
    #[arg(long)]
    prompts: PathBuf,
    /// Skip (and report) bad prompt lines instead of stopping at the first.
    #[arg(long)]
    skip_bad: bool,
    #[arg(long, default_value = "runs/rs")]
    out: PathBuf,
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    #[arg(long, default_value_t = 8)]
    k: usize,
    #[arg(long, default_value_t = 1.2)]
    temperature: f32,
    /// Re-tune the temperature every round (the paper's Figure 8): sample --k answers per
    /// held-out prompt at each of these (comma-separated) and use the one with the best mean
    /// best-of-K reward. Default: --temperature.
    #[arg(long, value_delimiter = ',')]
    temperatures: Vec<f32>,
    /// The sweep's held-out prompts: the last N of --prompts, never trained on.
    #[arg(long, default_value_t = 32)]
    sweep_prompts: usize,
    /// An earlier run's pool.jsonl: its answers are re-scored by these reward models and stay
    /// unless a new sample beats them; rounds are numbered on from the pool's last.
    #[arg(long)]
    pool: Option<PathBuf>,
    /// Sample with this model and fine-tune --model on the pool (the paper samples with its
    /// largest model); both must use one tokenizer.
    #[arg(long)]
    teacher: Option<PathBuf>,
    /// Prompts per round (0: all).
    #[arg(long, default_value_t = 0)]
    max_prompts: usize,
    #[arg(long, default_value_t = 2e-5)]
    lr: f32,
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The longest answer sampled, in tokens.
    #[arg(long, default_value_t = 48)]
    max_new_tokens: usize,
    /// Samples generated and scored per forward.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Where the policy, the reward models and the fine-tuning run: cpu, cuda[:N] or auto.
    #[arg(long, default_value = "cpu")]
    device: Device,
}

pub fn rejection_sample(a: RejectionSampleArgs) -> Result<()> {
    let RejectionSampleArgs {
        model,
        rm_helpfulness,
        rm_safety,
        prompts,
        out,
        rounds,
        k,
        temperature,
        temperatures,
        sweep_prompts,
        pool,
        teacher,
        max_prompts,
        lr,
        epochs,
        seq_len,
        seed,
        skip_bad,
        max_new_tokens,
        batch,
        device,
    } = a;
    use trainer::formats::{convert, Kind};
    use trainer::rs::{write_report, Pool, RsConfig};
    if max_new_tokens == 0 || batch == 0 {
        bail!("--max-new-tokens and --batch must be at least 1");
    }
    // The prompts in TRL's conversational form, read once (file:line errors, roles checked, a
    // trailing answer dropped; bad lines skipped with --skip-bad); every round reads this file.
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let clean = out.join("prompts.jsonl");
    let (n, skipped) = convert(
        Kind::Prompts,
        std::slice::from_ref(&prompts),
        &clean,
        skip_bad,
    )?;
    if n == 0 {
        bail!("{}: no prompts", prompts.display());
    }
    if skipped > 0 {
        println!("{skipped} bad prompt line(s) skipped");
    }
    let mut current = model;
    // Rounds continue the numbering of the pool they start from.
    let first = match &pool {
        Some(p) => Pool::read(p)?.last_round() + 1,
        None => 1,
    };
    let mut pool = pool;
    let mut stats = Vec::new();
    for r in first..first + rounds {
        let cfg = RsConfig {
            teacher: teacher.clone(),
            temperatures: temperatures.clone(),
            sweep_prompts,
            reward_helpfulness: rm_helpfulness.clone(),
            reward_safety: Some(rm_safety.clone()),
            prompts: vec![clean.clone()],
            max_prompts,
            pool: pool.clone(),
            round: r,
            out: out.join(format!("round-{r}")),
            k,
            temperature,
            max_new_tokens,
            batch,
            seq_len,
            seed,
            epochs,
            lr,
            ..RsConfig::for_policy(current.clone())
        };
        let st = on_device!(device, |be| trainer::rs::run(be, &cfg))?;
        if !st.sweep.is_empty() {
            let each: Vec<String> = st
                .sweep
                .iter()
                .map(|s| {
                    format!(
                        "{}: max {:.4} median {:.4}",
                        s.temperature, s.mean_max, s.mean_median
                    )
                })
                .collect();
            println!(
                "round {r}: temperature sweep on {} held-out prompts: {}; chose {}",
                st.sweep_prompts,
                each.join(", "),
                st.temperature
            );
        }
        println!(
            "round {r}: {} prompts x {k} at temperature {}: mean max reward {:.4}, mean median {:.4} (delta {:.4}); pool {} ({} pooled answers re-scored, {} displaced)",
            st.prompts, st.temperature, st.mean_max, st.mean_median, st.mean_max - st.mean_median, st.pool, st.rescored, st.displaced
        );
        write_report(&cfg.out, std::slice::from_ref(&st))?;
        current = st.checkpoint.clone().context("no checkpoint written")?;
        pool = Some(cfg.out.join("pool.jsonl"));
        stats.push(st);
    }
    write_report(&out, &stats)?;
    println!(
        "model: {}\nreport: {}/rs_report.json, rs_rewards.svg, fig7.jsonl/svg (max and median reward vs N), fig8.jsonl (temperature sweep)",
        current.display(),
        out.display()
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct PpoArgs {
    /// The policy to train (RS or SFT checkpoint with tokenizer.json).
    #[arg(long)]
    policy: Option<PathBuf>,
    /// The frozen reference π0 (default: the policy).
    #[arg(long)]
    reference: Option<PathBuf>,
    #[arg(long)]
    reward_helpfulness: Option<PathBuf>,
    /// Default: the helpfulness reward model.
    #[arg(long)]
    reward_safety: Option<PathBuf>,
    /// The critic's initialisation (default: the helpfulness reward model).
    #[arg(long)]
    critic: Option<PathBuf>,
    /// Prompt JSONL in any shape (`prompt` as text or messages, `messages`, prompt/completion,
    /// preference pairs, HH transcripts); `category: "safety"` or `is_safety: true` tags safety
    /// prompts.
    #[arg(long, num_args = 1..)]
    prompts: Vec<PathBuf>,
    /// Held-out prompts for early stopping (default: every 20th prompt).
    #[arg(long, num_args = 1..)]
    eval_prompts: Vec<PathBuf>,
    /// A world directory: logs the gold annotator's reward too.
    #[arg(long)]
    world: Option<PathBuf>,
    #[arg(long, default_value = "runs/ppo")]
    out: PathBuf,
    /// Continue a run (run directory or checkpoint).
    #[arg(long)]
    resume: Option<PathBuf>,
    #[arg(long)]
    iterations: Option<usize>,
    /// Rollouts per iteration (paper: 512).
    #[arg(long, default_value_t = 512)]
    batch: usize,
    /// Rollouts per gradient step (paper: 64).
    #[arg(long, default_value_t = 64)]
    minibatch: usize,
    /// Constant learning rate (paper: 1e-6).
    #[arg(long, default_value_t = 1e-6)]
    lr: f32,
    /// KL coefficient (default 0.01; 0.005 for 34B/70B shapes).
    #[arg(long)]
    beta: Option<f32>,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Iterations that train only the critic first.
    #[arg(long, default_value_t = 0)]
    critic_warmup: usize,
    /// The critic's learning rate (default: --lr).
    #[arg(long)]
    critic_lr: Option<f32>,
    /// Passes over each batch of rollouts (paper: 1).
    #[arg(long, default_value_t = 1)]
    ppo_epochs: usize,
    /// Evaluate the held-out prompts every N iterations (0: never).
    #[arg(long, default_value_t = 10)]
    eval_every: usize,
    /// Held-out answers sampled per prompt at the rollout temperature (0: greedy).
    #[arg(long, default_value_t = 0)]
    eval_samples: usize,
    /// Stop after this many evaluations without a better held-out reward (0: never).
    #[arg(long, default_value_t = 3)]
    patience: usize,
    /// Answers sampled per prompt; with k > 1 rewards are taken against the other answers'
    /// mean (a per-prompt baseline).
    #[arg(long, default_value_t = 1)]
    samples_per_prompt: usize,
    /// Reward rollouts with the world's gold annotator instead of the reward models (an
    /// upper-bound ablation; needs --world).
    #[arg(long)]
    oracle: bool,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// Activation recomputation for the policy's and the critic's backward: none, attn or full.
    #[arg(long)]
    recompute: Option<engine::Recompute>,
    /// Run as one rank of a data-parallel job launched by torchrun, mpirun or srun: each rank
    /// drives cuda:LOCAL_RANK, generates and scores its share of each batch (whole --gen-batch
    /// chunks), NCCL sums the policy's and the critic's gradients and ZeRO-1 shards their
    /// optimizer states; --batch and --minibatch stay global (the run equals one process's).
    #[arg(long, conflicts_with = "device")]
    dist: bool,
    /// With --dist: gradients are reduce-scattered in buckets of this many MiB while the
    /// backward runs, overlapping it (0: all at once after the backward). Default 25, or the
    /// resumed run's.
    #[arg(long, requires = "dist")]
    bucket_mb: Option<f64>,
    /// Where the ranks exchange the NCCL id: file:PATH (shared filesystem) or HOST:PORT
    /// (default MASTER_ADDR:MASTER_PORT, as torchrun sets them).
    #[arg(long, requires = "dist")]
    rendezvous: Option<String>,
    #[arg(long, default_value = "cpu")]
    device: Device,
    #[arg(long)]
    no_progress: bool,
}

pub fn ppo_cmd(a: PpoArgs, given: &clap::ArgMatches) -> Result<()> {
    use engine::dist::Collective;
    use trainer::ppo::{resume_config, train_dp, PpoConfig};
    // The launch first: a rank without a place to meet fails before reading anything.
    let mut dist = if a.dist {
        Some(trainer::device::open_dist(a.rendezvous.as_deref())?)
    } else {
        None
    };
    let cfg = if let Some(r) = &a.resume {
        super::common::resume_flags::<PpoArgs>(
            given,
            &[
                "iterations",
                "recompute",
                "dist",
                "bucket_mb",
                "rendezvous",
                "device",
                "no_progress",
            ],
        )?;
        let mut c = resume_config(r, a.iterations)?;
        c.progress = !a.no_progress;
        c.recompute = a.recompute.unwrap_or(c.recompute);
        c.bucket_mb = a.bucket_mb.unwrap_or(c.bucket_mb);
        c
    } else {
        let policy = a.policy.clone().context("--policy DIR is required")?;
        let rh = a
            .reward_helpfulness
            .clone()
            .context("--reward-helpfulness DIR is required")?;
        if a.prompts.is_empty() {
            bail!("--prompts FILE... is required");
        }
        let mut c = PpoConfig::new(policy, rh, a.prompts.clone(), a.out.clone());
        c.reference = a.reference.clone();
        c.reward_safety = a.reward_safety.clone();
        c.critic = a.critic.clone();
        c.eval_prompts = a.eval_prompts.clone();
        c.world = a.world.clone();
        if let Some(i) = a.iterations {
            c.iterations = i;
        }
        c.batch = a.batch;
        c.minibatch = a.minibatch;
        c.lr = a.lr;
        c.beta = a.beta;
        c.max_new_tokens = a.max_new_tokens;
        c.critic_warmup = a.critic_warmup;
        c.critic_lr = a.critic_lr;
        c.ppo_epochs = a.ppo_epochs;
        c.eval_every = a.eval_every;
        c.eval_samples = a.eval_samples;
        c.patience = a.patience;
        c.oracle = a.oracle;
        c.samples_per_prompt = a.samples_per_prompt;
        c.seed = a.seed;
        c.recompute = a.recompute.unwrap_or_default();
        c.bucket_mb = a.bucket_mb.unwrap_or(c.bucket_mb);
        c.progress = !a.no_progress;
        c
    };
    let rep = match &mut dist {
        None => on_device!(a.device, |be| trainer::ppo::run(be, &cfg)?),
        Some((cuda, comm)) => {
            let lead = comm.rank() == 0;
            let rep = train_dp(cuda.clone(), &cfg, Some(comm))?;
            if !lead {
                return Ok(());
            }
            rep
        }
    };
    println!(
        "ppo: {} iterations{} in {:.0} s, beta {}; checkpoint {}",
        rep.iterations,
        if rep.stopped_early {
            " (stopped early on held-out reward)"
        } else {
            ""
        },
        rep.seconds,
        rep.beta,
        rep.checkpoint.display()
    );
    if let Some(b) = &rep.best_dir {
        println!("best policy: {}", b.display());
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct GattArgs {
    /// The model to teach (a checkpoint or its run directory).
    #[arg(long, visible_alias = "model")]
    init: PathBuf,
    /// A world (`llama2 world`): its prompts, instructions and checkers. Or give
    /// --instructions and --dialogues (the user's files).
    #[arg(long, required_unless_present_all = ["instructions", "dialogues"], conflicts_with_all = ["instructions", "dialogues"])]
    world: Option<PathBuf>,
    /// JSONL of instructions, `{"instruction": TEXT, "category": NAME}` (category optional).
    #[arg(long, requires = "dialogues")]
    instructions: Option<PathBuf>,
    /// JSONL of multi-turn dialogues, `{"turns": [TEXT...]}` or `{"messages": [...]}` (their
    /// user turns are used).
    #[arg(long, requires = "instructions")]
    dialogues: Option<PathBuf>,
    /// With --instructions: a helpfulness reward model that picks the best of --candidates
    /// samples per turn and scores adherence (without one, the report's samples are to read).
    #[arg(long)]
    reward_model: Option<PathBuf>,
    /// With --instructions: at most this many instructions, of different categories, combined.
    #[arg(long, default_value_t = 2)]
    max_combine: usize,
    #[arg(long, default_value = "runs/gatt")]
    out: PathBuf,
    /// User turns per dialogue (at most).
    #[arg(long, default_value_t = 4)]
    turns: usize,
    /// Synthetic dialogues to sample.
    #[arg(long, default_value_t = 400)]
    num_dialogues: usize,
    /// Dialogues of the before/after adherence evaluation.
    #[arg(long, default_value_t = 100)]
    eval_dialogues: usize,
    /// Samples per assistant turn (the best is kept).
    #[arg(long, default_value_t = 4)]
    candidates: usize,
    /// Sampling temperature of the assistant turns.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Put the instruction in a system message instead of the first user turn (the world's SFT
    /// data has both).
    #[arg(long)]
    system: bool,
    #[arg(long, default_value_t = 40)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Extra SFT JSONL mixed into the fine-tune.
    #[arg(long, num_args = 1..)]
    replay: Vec<PathBuf>,
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    #[arg(long, default_value_t = 2e-5)]
    lr: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "cpu")]
    device: Device,
}

pub fn gatt(a: GattArgs) -> Result<()> {
    let cfg = trainer::gatt::GattConfig {
        init: a.init,
        world: a.world.unwrap_or_default(),
        instructions: a.instructions,
        dialogue_file: a.dialogues,
        reward_model: a.reward_model,
        max_combine: a.max_combine,
        out: a.out,
        turns: a.turns,
        dialogues: a.num_dialogues,
        eval_dialogues: a.eval_dialogues,
        candidates: a.candidates,
        temperature: a.temperature,
        system: a.system,
        max_new_tokens: a.max_new_tokens,
        seq_len: a.seq_len,
        batch_size: a.batch_size,
        replay: a.replay,
        epochs: a.epochs,
        lr: a.lr,
        seed: a.seed,
        ..Default::default()
    };
    let device = a.device;
    let r = on_device!(device, |be| trainer::gatt::run(be, &cfg)?);
    if let (Some(b), Some(af)) = (&r.user_before, &r.user_after) {
        if b.score_with.is_empty() {
            println!("no reward model: read the sample dialogues in the report");
        } else {
            println!(
                "reward-model score per turn before GAtt, instruction present: {:?}, absent: {:?}",
                b.score_with, b.score_without
            );
            println!(
                "reward-model score per turn after GAtt,  instruction present: {:?}, absent: {:?}",
                af.score_with, af.score_without
            );
        }
    } else {
        println!(
            "adherence per turn before GAtt: {:?}",
            r.adherence_before.follow
        );
        println!(
            "adherence per turn after GAtt:  {:?}",
            r.adherence_after.follow
        );
    }
    println!(
        "{} training rows from {} dialogues; model: {}; report: {}",
        r.rows,
        r.dialogues,
        r.checkpoint.display(),
        cfg.out.join("report.json").display()
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct DistillSafetyArgs {
    /// The model to distill into (a checkpoint or its run directory).
    #[arg(long, visible_alias = "model")]
    init: PathBuf,
    /// The safety reward model that decides which answers are kept.
    #[arg(long, visible_alias = "reward-safety")]
    safety_rm: PathBuf,
    /// A world (`llama2 world`): its safety prompts. Or give --categories and --prompts.
    #[arg(long, required_unless_present_all = ["categories", "prompts"], conflicts_with_all = ["categories", "prompts"])]
    world: Option<PathBuf>,
    /// JSONL of risk categories, `{"category", "preprompts": [...], "template"}`.
    #[arg(long, requires = "prompts")]
    categories: Option<PathBuf>,
    /// JSONL of adversarial prompts, `{"prompt": TEXT, "category": NAME}` (category optional).
    #[arg(long, requires = "categories")]
    prompts: Option<PathBuf>,
    /// With --categories: preprompts of the prompt's category drawn per prompt.
    #[arg(long, default_value_t = 2)]
    preprompts_per_prompt: usize,
    /// Temperature of both answers (0: greedy; a small model's greedy answer may not change
    /// with the preprompt, leaving nothing to keep).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value = "runs/distill")]
    out: PathBuf,
    #[arg(long, default_value_t = 48)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Extra SFT JSONL mixed into the fine-tune (keeps helpfulness; limits false refusals).
    #[arg(long, num_args = 1..)]
    replay: Vec<PathBuf>,
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    #[arg(long, default_value_t = 2e-5)]
    lr: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "cpu")]
    device: Device,
}

pub fn distill_safety(a: DistillSafetyArgs) -> Result<()> {
    let cfg = trainer::distill::DistillConfig {
        init: a.init,
        safety_rm: a.safety_rm,
        world: a.world.unwrap_or_default(),
        categories: a.categories,
        prompts: a.prompts,
        preprompts_per_prompt: a.preprompts_per_prompt,
        temperature: a.temperature,
        out: a.out,
        max_new_tokens: a.max_new_tokens,
        seq_len: a.seq_len,
        batch_size: a.batch_size,
        replay: a.replay,
        epochs: a.epochs,
        lr: a.lr,
        seed: a.seed,
        ..Default::default()
    };
    let device = a.device;
    let r = on_device!(device, |be| trainer::distill::run(be, &cfg)?);
    println!(
        "{} safety prompts, {} answers kept (mean safety-RM score {:.3} with the preprompt, {:.3} without); model: {}",
        r.prompts, r.kept, r.mean_score_with, r.mean_score_without, r.checkpoint.as_deref().map(|p| p.display().to_string()).unwrap_or_else(|| "none (no answer kept)".into())
    );
    for (c, k) in &r.by_category {
        println!(
            "  {c}: {}/{} kept ({:.0}%)",
            k.kept,
            k.prompts,
            100.0 * k.fraction
        );
    }
    if let Some(b) = r.plain_score_before {
        let after = r
            .plain_score_after
            .map(|a| format!("{a:.3}"))
            .unwrap_or_else(|| "-".into());
        println!("mean safety-RM score of the plain answers: {b:.3} before, {after} after");
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct RlhfArgs {
    /// The SFT checkpoint (or its training run directory).
    #[arg(long)]
    sft: PathBuf,
    /// The world directory (`llama2 world`): prompts and the gold annotator.
    #[arg(long)]
    world: PathBuf,
    #[arg(long, default_value = "runs/rlhf")]
    out: PathBuf,
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// The first round that adds PPO after rejection sampling (the paper: V4).
    #[arg(long, default_value_t = 4)]
    ppo_from: usize,
    /// Prompts labelled per round.
    #[arg(long, default_value_t = 300)]
    label_prompts: usize,
    /// Rejection-sampling samples per prompt.
    #[arg(long, default_value_t = 8)]
    k: usize,
    /// Rejection-sampling temperature (the paper: 1.2-1.3 for 70B; 1.0 suits the tiny preset).
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    #[arg(long, default_value_t = 10)]
    ppo_iterations: usize,
    #[arg(long, default_value = "auto")]
    device: Device,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long)]
    no_progress: bool,
}

pub fn rlhf(a: RlhfArgs) -> Result<()> {
    let RlhfArgs {
        sft,
        world,
        out,
        rounds,
        ppo_from,
        label_prompts,
        k,
        temperature,
        ppo_iterations,
        device,
        seed,
        no_progress,
    } = a;
    let sft = trainer::run_dir::model_dir(&sft)?;
    let mut cfg = trainer::rlhf::RlhfConfig::new(sft, world, out.clone(), rounds);
    cfg.ppo_from = ppo_from;
    cfg.label_prompts = label_prompts;
    cfg.rs_k = k;
    cfg.rs_temperature = temperature;
    cfg.ppo_iterations = ppo_iterations;
    cfg.seed = seed;
    let t0 = std::time::Instant::now();
    let quiet = no_progress;
    let say = |m: &str| {
        if !quiet {
            eprintln!("[{:>6.1}s] {m}", t0.elapsed().as_secs_f64());
        }
    };
    let rep = on_device!(device, |be| trainer::rlhf::run(be, &cfg, &say)?);
    let f = |x: Option<f32>| x.map_or("-".to_string(), |x| format!("{x:.3}"));
    println!("| stage | sampled R_c | greedy R_c | accuracy | helpfulness | safety | false refusals | judge R_c | KL to SFT |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for e in &rep.stages {
        let g = e.gold.as_ref();
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.2} |",
            e.stage,
            f(e.sampled_reward),
            f(e.reward),
            f(g.map(|g| g.accuracy)),
            f(g.map(|g| g.helpfulness)),
            f(g.map(|g| g.safety)),
            f(g.map(|g| g.false_refusal_rate)),
            f(e.judge.as_ref().map(|j| j.greedy)),
            e.kl_to_sft
        );
    }
    println!(
        "model: {}\nreport: {}/rlhf_report.json, rs_rewards.svg (in {:.0} s)",
        rep.checkpoint.display(),
        out.display(),
        rep.seconds
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct PipelineArgs {
    /// The run's name: everything goes to runs/<name>/.
    #[arg(long, default_value = "pipeline")]
    name: String,
    /// The size preset of the run (tiny is the only one sized for a CPU).
    #[arg(long, default_value = "tiny")]
    config: String,
    #[arg(long, default_value = "auto")]
    device: Device,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// RLHF rounds (each: new labels, reward models, rejection sampling).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// The first round that adds PPO (the paper: 4; compressed to 2 by default here).
    #[arg(long, default_value_t = 2)]
    ppo_from: usize,
    #[arg(long)]
    no_progress: bool,
}

pub fn pipeline(a: PipelineArgs) -> Result<()> {
    let PipelineArgs {
        name,
        config,
        device,
        seed,
        rounds,
        ppo_from,
        no_progress,
    } = a;
    if config != "tiny" {
        bail!("--config {config}: only `tiny` is sized for the pipeline on a CPU (larger presets need the CUDA backend)");
    }
    let cfg = trainer::pipeline::PipelineConfig {
        out: PathBuf::from("runs").join(&name),
        seed,
        rounds,
        ppo_from,
        progress: !no_progress,
        ..Default::default()
    };
    let rep = on_device!(device, |be| {
        println!(
            "llama2 pipeline `{name}` on {}: writing {}",
            engine::Backend::name(&be),
            cfg.out.display()
        );
        trainer::pipeline::run(be, &cfg)?
    });
    println!(
        "{}",
        std::fs::read_to_string(cfg.out.join("report.md")).unwrap_or_default()
    );
    println!(
        "report: {}/report.json (in {:.0} s)",
        cfg.out.display(),
        rep["seconds"].as_f64().unwrap_or(0.0)
    );
    Ok(())
}
