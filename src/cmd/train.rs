//! Pretraining and supervised fine-tuning: `pretrain`, `sft` and the loop they share.

use super::common::{on_device, resume_flags};
use anyhow::{bail, Context, Result};
use clap::parser::ValueSource;
use clap::ArgMatches;
use std::path::PathBuf;
use trainer::device::Device;

#[derive(clap::Args)]
pub struct PretrainArgs {
    /// A directory written by `llama2 prepare-data`, or token-id files as llama2.c and nanoGPT
    /// write them: a `.bin` (raw ids, see --token-dtype) or `.npy` (u16/u32) file, or a
    /// directory of them (`val*` files are the validation split, else the last 1 %). Ids are
    /// read as they are: no EOS is added. With --resume: where the run's data now is.
    #[arg(long)]
    data: Option<PathBuf>,
    /// With token files: the tokenizer (default: a tokenizer.json beside them, if any), for
    /// samples and the checkpoints' tokenizer.json; without one the vocabulary is the largest
    /// id + 1.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// How the ids of a headerless `.bin` token file are stored (llama2.c and nanoGPT: u16).
    #[arg(long, default_value = "u16")]
    token_dtype: trainer::data::TokenDtype,
    /// The run directory: metrics.jsonl, loss.svg, checkpoints/.
    #[arg(long, default_value = "runs/pretrain")]
    out: PathBuf,
    /// Model preset (tiny, 7b, 13b, 34b, 70b); its vocabulary is set to the data's.
    #[arg(long, conflicts_with_all = ["config", "init"])]
    preset: Option<String>,
    /// An HF config.json to initialise randomly.
    #[arg(long, conflicts_with = "init")]
    config: Option<PathBuf>,
    /// An HF checkpoint directory to continue pretraining from.
    #[arg(long)]
    init: Option<PathBuf>,
    /// Continue an interrupted run: a run directory or one of its checkpoints, continued in
    /// that run directory (or --out). The checkpoint's configuration decides the model, batch,
    /// schedule and optimizer; --steps, --data, --out, the evaluation, logging and checkpoint
    /// intervals and the --device/--recompute options may change (others are an error).
    #[arg(long)]
    resume: Option<PathBuf>,
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Tokens per optimizer step (a multiple of batch-size x seq-len; the rest is accumulation).
    #[arg(long)]
    batch_tokens: Option<usize>,
    /// Optimizer steps in the whole run (with --resume: the new total).
    #[arg(long, default_value_t = 1000)]
    steps: usize,
    /// Peak learning rate (default: 3e-4; 1.5e-4 for 34b/70b; 1e-3 for tiny).
    #[arg(long)]
    lr: Option<f32>,
    /// Warmup steps (default: 2000, or a tenth of a shorter run).
    #[arg(long)]
    warmup: Option<usize>,
    #[arg(long, default_value_t = 0.1)]
    final_lr_ratio: f32,
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f32,
    /// Global gradient-norm clip (0 disables).
    #[arg(long, default_value_t = 1.0)]
    clip: f32,
    #[arg(long, default_value_t = 100)]
    eval_every: usize,
    /// Validation windows per evaluation.
    #[arg(long, default_value_t = 64)]
    eval_windows: usize,
    /// Print a text sample every N steps (0: never).
    #[arg(long, default_value_t = 0)]
    sample_every: usize,
    #[arg(long, default_value_t = 500)]
    ckpt_every: usize,
    /// Checkpoints kept (oldest removed first).
    #[arg(long, default_value_t = 3)]
    keep: usize,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// Skip steps with a non-finite loss or gradient instead of stopping.
    #[arg(long)]
    skip_nonfinite: bool,
    /// Stop with a checkpoint after this many steps, as an interruption would.
    #[arg(long)]
    stop_after: Option<usize>,
    #[command(flatten)]
    run: RunArgs,
}

/// Where and how the pretrain/SFT loop runs: the options `pretrain` and `sft` share.
#[derive(clap::Args)]
pub struct RunArgs {
    /// Activation recomputation: none, attn or full (less memory, more time, the same
    /// gradients). Default none, or the resumed run's setting.
    #[arg(long)]
    recompute: Option<engine::Recompute>,
    /// Run as one rank of a data-parallel job launched by torchrun, mpirun or srun: each rank
    /// drives cuda:LOCAL_RANK, NCCL sums the gradients and ZeRO-1 shards the optimizer state;
    /// --batch-size is per rank.
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
    /// No progress bar (without a terminal there is none anyway).
    #[arg(long)]
    no_progress: bool,
    /// Without a progress bar (output to a file or pipe, or --no-progress), print a plain line
    /// every N steps and at each evaluation (0: at evaluations only).
    #[arg(long, default_value_t = 10)]
    log_every: usize,
}

/// The `RunArgs` flags a resumed run may change (they decide where and how it runs, not what).
const RUN_MAY_CHANGE: [&str; 7] = [
    "recompute",
    "dist",
    "bucket_mb",
    "rendezvous",
    "device",
    "no_progress",
    "log_every",
];

impl RunArgs {
    /// Sets what these options decide in a run's configuration: on a resumed one only what
    /// was given (the rest stays the checkpoint's), on a new one with the defaults.
    fn apply(&self, c: &mut trainer::lm_train::TrainConfig, resumed: bool, given: &ArgMatches) {
        c.progress = !self.no_progress;
        if !resumed || explicit(given, "log_every") {
            c.log_every = self.log_every;
        }
        c.recompute = match self.recompute {
            Some(r) => r,
            None if resumed => c.recompute,
            None => Default::default(),
        };
        c.bucket_mb = self.bucket_mb.unwrap_or(c.bucket_mb);
    }

    /// The loop on `--device`, or with `--dist` as this process's rank of a launched job.
    /// `header(place, world)` prints once, on rank 0. Returns the report and whether this
    /// process is rank 0 (the one that prints).
    fn train(
        &self,
        cfg: &trainer::lm_train::TrainConfig,
        resume: Option<&std::path::Path>,
        header: impl FnOnce(&str, usize),
    ) -> Result<(trainer::lm_train::TrainReport, bool)> {
        use engine::dist::Collective;
        use trainer::lm_train::{run, run_dp};
        if !self.dist {
            header(&self.device.to_string(), 1);
            return Ok((
                on_device!(self.device, |be| run(be, cfg.clone(), resume)?),
                true,
            ));
        }
        let (cuda, mut comm) = trainer::device::open_dist(self.rendezvous.as_deref())?;
        let lead = comm.rank() == 0;
        if lead {
            header(
                &format!("{} ranks (cuda:LOCAL_RANK each, ZeRO-1)", comm.world()),
                comm.world(),
            );
        }
        let rep = run_dp(cuda, cfg.clone(), resume, Some(&mut comm))?;
        Ok((rep, lead))
    }
}

/// Micro-batches per step for `--batch-tokens` (1 without it).
fn grad_accum(batch_tokens: Option<usize>, batch_size: usize, seq_len: usize) -> Result<usize> {
    let Some(bt) = batch_tokens else {
        return Ok(1);
    };
    let micro = batch_size.saturating_mul(seq_len);
    if micro == 0 || bt % micro != 0 || bt == 0 {
        bail!("--batch-tokens {bt} is not a multiple of batch-size x seq-len = {micro}");
    }
    Ok(bt / micro)
}

/// Whether `id` was given on the command line (not a default).
fn explicit(given: &ArgMatches, id: &str) -> bool {
    matches!(given.value_source(id), Some(ValueSource::CommandLine))
}

/// Where `--data` points for pretraining: a prepared directory (its meta.json), else token
/// files (a `.bin`/`.npy` file or a directory of them).
fn pretrain_data(a: &PretrainArgs) -> Result<trainer::lm_train::DataSpec> {
    use trainer::lm_train::DataSpec;
    let data = a
        .data
        .clone()
        .context("--data is required (a directory from `llama2 prepare-data`, or token files)")?;
    let token_file = matches!(
        data.extension().and_then(|e| e.to_str()),
        Some("bin" | "npy")
    );
    Ok(
        if data.join("meta.json").is_file() || !(data.is_dir() || token_file) {
            if let Some(t) = &a.tokenizer {
                bail!(
                    "--tokenizer {}: a prepared data directory has its own tokenizer.json",
                    t.display()
                );
            }
            DataSpec::Shards(data)
        } else {
            DataSpec::Tokens {
                path: data,
                dtype: a.token_dtype,
                tokenizer: a.tokenizer.clone(),
            }
        },
    )
}

pub fn pretrain(a: PretrainArgs, given: &ArgMatches) -> Result<()> {
    use trainer::lm_train::{resume_config, ModelSource, TrainConfig};
    let cfg = if let Some(r) = &a.resume {
        let mut may_change = vec![
            "steps",
            "data",
            "tokenizer",
            "token_dtype",
            "out",
            "eval_every",
            "eval_windows",
            "sample_every",
            "ckpt_every",
            "keep",
            "stop_after",
            "skip_nonfinite",
        ];
        may_change.extend(RUN_MAY_CHANGE);
        let applied = resume_flags::<PretrainArgs>(given, &may_change)?;
        let mut c = resume_config(r, explicit(given, "steps").then_some(a.steps))?;
        a.run.apply(&mut c, true, given);
        if explicit(given, "data") {
            use trainer::lm_train::DataSpec::Tokens;
            let mut data = pretrain_data(&a)?;
            // Token files moved: their dtype and tokenizer stay the run's unless given.
            if let (
                Tokens {
                    dtype, tokenizer, ..
                },
                Tokens {
                    dtype: d0,
                    tokenizer: t0,
                    ..
                },
            ) = (&mut data, &c.data)
            {
                if !explicit(given, "token_dtype") {
                    *dtype = *d0;
                }
                if !explicit(given, "tokenizer") {
                    *tokenizer = t0.clone();
                }
            }
            c.data = data;
        }
        if explicit(given, "out") {
            c.out = std::path::absolute(&a.out)?;
        }
        let set = |id: &str| explicit(given, id);
        if set("eval_every") {
            c.eval_every = a.eval_every;
        }
        if set("eval_windows") {
            c.eval_windows = a.eval_windows;
        }
        if set("sample_every") {
            c.sample_every = a.sample_every;
        }
        if set("ckpt_every") {
            c.ckpt_every = a.ckpt_every;
        }
        if set("keep") {
            c.keep_checkpoints = a.keep;
        }
        if set("skip_nonfinite") {
            c.skip_nonfinite = true;
        }
        c.stop_after = a.stop_after;
        say_resumed(r, &c.out, &applied);
        c
    } else {
        let data = pretrain_data(&a)?;
        let model = match (&a.preset, &a.config, &a.init) {
            (_, Some(c), _) => ModelSource::Config(c.clone()),
            (_, _, Some(i)) => ModelSource::Init(i.clone()),
            (p, _, _) => ModelSource::Preset(p.clone().unwrap_or_else(|| "tiny".into())),
        };
        let mut c = TrainConfig::defaults(PathBuf::new(), a.out.clone(), model, a.steps);
        c.data = data;
        c.seq_len = a.seq_len;
        c.batch_size = a.batch_size;
        c.grad_accum = grad_accum(a.batch_tokens, a.batch_size, a.seq_len)?;
        if let Some(lr) = a.lr {
            c.lr = lr;
        }
        if let Some(w) = a.warmup {
            c.warmup = w;
        }
        c.final_lr_ratio = a.final_lr_ratio;
        c.weight_decay = a.weight_decay;
        c.clip = a.clip;
        c.eval_every = a.eval_every;
        c.eval_windows = a.eval_windows;
        c.sample_every = a.sample_every;
        c.ckpt_every = a.ckpt_every;
        c.keep_checkpoints = a.keep;
        c.seed = a.seed;
        c.skip_nonfinite = a.skip_nonfinite;
        c.stop_after = a.stop_after;
        a.run.apply(&mut c, false, given);
        c
    };
    let header = |place: &str, world: usize| {
        println!(
            "pretrain on {place}: {} steps of {} tokens ({world} x batch {} x seq {} x accum {}), peak lr {:.2e}, warmup {}, recompute {}",
            cfg.steps,
            world * cfg.batch_size * cfg.seq_len * cfg.grad_accum,
            cfg.batch_size,
            cfg.seq_len,
            cfg.grad_accum,
            cfg.lr,
            cfg.warmup,
            cfg.recompute
        )
    };
    let (rep, lead) = a.run.train(&cfg, a.resume.as_deref(), header)?;
    if !lead {
        return Ok(());
    }
    if let Some(l) = rep.logs.last() {
        println!(
            "step {}: loss {:.4}{}, {:.0} tok/s",
            l.step,
            l.loss,
            rep.final_val_loss
                .map(|v| format!(", val loss {v:.4}"))
                .unwrap_or_default(),
            rep.tokens_per_s
        );
    }
    if let Some(c) = &rep.checkpoint {
        println!("checkpoint: {}", c.display());
    }
    if rep.interrupted {
        println!(
            "stopped early; continue with: llama2 pretrain --resume {}",
            cfg.out.display()
        );
    }
    println!(
        "metrics: {}, plot: {}",
        cfg.out.join("metrics.jsonl").display(),
        cfg.out.join("loss.svg").display()
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct SftArgs {
    /// The checkpoint to fine-tune (HF directory with tokenizer.json).
    #[arg(long)]
    init: Option<PathBuf>,
    /// Dialogue JSONL files.
    #[arg(long = "data", num_args = 1..)]
    data: Vec<PathBuf>,
    #[arg(long, default_value = "runs/sft")]
    out: PathBuf,
    /// Continue an interrupted run (run directory or checkpoint).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// A tokenizer.json other than the checkpoint's.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    /// Optimizer steps (default: what the epochs need).
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long, default_value_t = 2e-5)]
    lr: f32,
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f32,
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Rows of --seq-len tokens per micro-batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Tokens per optimizer step (a multiple of batch-size x seq-len; the rest is gradient
    /// accumulation, which gives the gradient of one batch that large).
    #[arg(long)]
    batch_tokens: Option<usize>,
    #[arg(long, default_value_t = 0.05)]
    val_fraction: f64,
    #[arg(long, default_value_t = 50)]
    eval_every: usize,
    #[arg(long, default_value_t = 200)]
    ckpt_every: usize,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    #[arg(long)]
    skip_bad: bool,
    #[command(flatten)]
    run: RunArgs,
}

pub fn sft(a: SftArgs, given: &ArgMatches) -> Result<()> {
    use trainer::lm_train::{resume_config, DataSpec, TrainConfig};
    let cfg = if let Some(r) = &a.resume {
        let mut may_change = vec!["steps", "data", "out", "eval_every", "ckpt_every"];
        may_change.extend(RUN_MAY_CHANGE);
        let applied = resume_flags::<SftArgs>(given, &may_change)?;
        let mut c = resume_config(r, a.steps)?;
        a.run.apply(&mut c, true, given);
        if explicit(given, "data") {
            if let DataSpec::Sft { files, .. } = &mut c.data {
                *files = a.data.clone();
            }
        }
        if explicit(given, "out") {
            c.out = std::path::absolute(&a.out)?;
        }
        if explicit(given, "eval_every") {
            c.eval_every = a.eval_every;
        }
        if explicit(given, "ckpt_every") {
            c.ckpt_every = a.ckpt_every;
        }
        say_resumed(r, &c.out, &applied);
        c
    } else {
        let init = a.init.clone().context(
            "--init DIR is required: SFT starts from a checkpoint (e.g. a pretraining one)",
        )?;
        if a.data.is_empty() {
            bail!("--data FILE... is required: dialogue JSONL");
        }
        let mut c = TrainConfig::sft_defaults(a.data.clone(), a.out.clone(), init);
        c.data = DataSpec::Sft {
            files: a.data.clone(),
            tokenizer: a.tokenizer.clone(),
            val_fraction: a.val_fraction,
            epochs: a.epochs,
            skip_bad: a.skip_bad,
        };
        c.steps = a.steps.unwrap_or(0);
        c.lr = a.lr;
        c.warmup = a.warmup;
        c.weight_decay = a.weight_decay;
        c.seq_len = a.seq_len;
        c.batch_size = a.batch_size;
        c.grad_accum = grad_accum(a.batch_tokens, a.batch_size, a.seq_len)?;
        c.eval_every = a.eval_every;
        c.ckpt_every = a.ckpt_every;
        c.seed = a.seed;
        a.run.apply(&mut c, false, given);
        c
    };
    let header = |place: &str, world: usize| {
        println!(
            "sft on {place}: rows of {} tokens, {} per step ({world} x batch {} x accum {}), peak lr {:.2e}",
            cfg.seq_len,
            world * cfg.batch_size * cfg.grad_accum,
            cfg.batch_size,
            cfg.grad_accum,
            cfg.lr
        )
    };
    let (rep, lead) = a.run.train(&cfg, a.resume.as_deref(), header)?;
    if !lead {
        return Ok(());
    }
    if let Some(l) = rep.logs.last() {
        println!(
            "step {}: loss {:.4}{}",
            l.step,
            l.loss,
            rep.final_val_loss
                .map(|v| format!(", val loss {v:.4}"))
                .unwrap_or_default()
        );
    }
    if let Some(c) = &rep.checkpoint {
        println!("checkpoint: {}", c.display());
    }
    if rep.interrupted {
        println!(
            "stopped early; continue with: llama2 sft --resume {}",
            cfg.out.display()
        );
    }
    Ok(())
}

/// What a resumed run prints first: where it continues and which flags it took.
fn say_resumed(from: &std::path::Path, out: &std::path::Path, applied: &[String]) {
    println!(
        "resuming {} in {}{}",
        from.display(),
        out.display(),
        if applied.is_empty() {
            String::new()
        } else {
            format!(
                "; applying {} (the rest is the checkpoint's)",
                applied.join(", ")
            )
        }
    );
}
