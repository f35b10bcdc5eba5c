//! `llama2`: train and align Llama 2 models. The CLI only maps arguments to the library's configs.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use engine::check::{check_fixture, Tolerances};
use engine::tokenizer::Tokenizer;
use engine::Cpu;
use std::io::Read;
use std::path::PathBuf;
use trainer::device::{require_cpu, Device};

#[derive(Parser)]
#[command(
    name = "llama2",
    version,
    about = "Train and align Llama 2 models on hand-written kernels"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Compare the engine with a Hugging Face reference dump (logits, loss, every gradient,
    /// reward-model case, AdamW case); ends with `N passed, M failed`.
    Check {
        /// A fixture directory: config.json, model.safetensors, case/rm/adamw.safetensors.
        dir: PathBuf,
        #[arg(long, default_value = "cpu")]
        device: Device,
        /// Absolute bound for logits, loss and rewards.
        #[arg(long, default_value_t = Tolerances::F32.abs)]
        atol: f32,
        /// Bound for gradients, relative to each tensor's largest reference entry.
        #[arg(long, default_value_t = Tolerances::F32.rel)]
        rtol: f32,
    },
    /// Tokenize stdin and print the ids as a JSON array (or decode a JSON array with --decode).
    Tokenize {
        #[arg(long)]
        tokenizer: PathBuf,
        /// Prepend the BOS token.
        #[arg(long)]
        bos: bool,
        /// Read a JSON array of ids from stdin and print the text.
        #[arg(long)]
        decode: bool,
    },
    /// Tokenize text files, directories and JSONL (`text` field) into memory-mapped shards.
    PrepareData {
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Text files, directories of them, or .jsonl files.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Fraction of the corpus held out for validation.
        #[arg(long, default_value_t = 0.01)]
        val_fraction: f64,
        /// Tokens per training shard.
        #[arg(long, default_value_t = 100_000_000)]
        shard_tokens: usize,
        /// Skip (and report) bad documents instead of stopping at the first.
        #[arg(long)]
        skip_bad: bool,
    },
    /// Train a byte-fallback BPE tokenizer (Llama 2's layout) on text files or JSONL.
    TrainTokenizer {
        #[arg(long)]
        vocab_size: usize,
        #[arg(long)]
        out: PathBuf,
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        #[arg(long, default_value_t = 2)]
        min_frequency: u64,
        #[arg(long)]
        skip_bad: bool,
    },
    /// Pretrain a Llama on prepared token shards (see prepare-data).
    Pretrain(PretrainArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// A self-contained check of the engine: random tiny model, backward against finite
    /// differences, an optimizer step, save and reload through safetensors.
    Selftest {
        /// Where the round-trip checkpoint is written.
        #[arg(long, default_value = "runs/selftest")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Training throughput: tokens/s after warm-up, model FLOP/s, fraction of a same-run matmul.
    Train {
        /// A preset name (tiny, 7b, 13b, 34b, 70b) or an HF config.json.
        #[arg(long, default_value = "tiny")]
        config: String,
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        #[arg(long, default_value_t = 5)]
        steps: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        #[arg(long, default_value = "cpu")]
        device: Device,
        /// Also time transformers' LlamaForCausalLM on the same shapes (needs torch).
        #[arg(long)]
        vs_torch: bool,
        /// Write the report as JSON too.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn bench(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Train {
            config,
            seq_len,
            batch_size,
            steps,
            warmup,
            device,
            vs_torch,
            json,
        } => {
            require_cpu(device)?;
            let model = if std::path::Path::new(&config).is_file() {
                engine::LlamaConfig::from_file(std::path::Path::new(&config))?
            } else {
                engine::LlamaConfig::preset(&config)?
            };
            let cfg = trainer::bench::BenchConfig {
                model,
                seq_len,
                batch_size,
                steps,
                warmup,
                vs_torch,
                device_name: engine::Backend::name(&Cpu),
            };
            let rep = trainer::bench::run(Cpu, &cfg)?;
            rep.print();
            if let Some(p) = json {
                std::fs::write(&p, serde_json::to_string_pretty(&rep)?)
                    .with_context(|| format!("writing {}", p.display()))?;
            }
        }
    }
    Ok(())
}

#[derive(clap::Args)]
struct PretrainArgs {
    /// A directory written by `llama2 prepare-data`.
    #[arg(long)]
    data: Option<PathBuf>,
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
    /// Continue an interrupted run: a run directory or one of its checkpoints. The checkpoint's
    /// own configuration is used; only --steps may change.
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
    #[arg(long)]
    steps: Option<usize>,
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
    #[arg(long, default_value = "cpu")]
    device: Device,
    #[arg(long)]
    no_progress: bool,
}

fn pretrain(a: PretrainArgs) -> Result<()> {
    use trainer::pretrain::{resume_config, run, ModelSource, PretrainConfig};
    require_cpu(a.device)?;
    let cfg = if let Some(r) = &a.resume {
        let mut c = resume_config(r, a.steps)?;
        c.progress = !a.no_progress;
        c
    } else {
        let data = a
            .data
            .clone()
            .context("--data is required (a directory from `llama2 prepare-data`)")?;
        let model = match (&a.preset, &a.config, &a.init) {
            (_, Some(c), _) => ModelSource::Config(c.clone()),
            (_, _, Some(i)) => ModelSource::Init(i.clone()),
            (p, _, _) => ModelSource::Preset(p.clone().unwrap_or_else(|| "tiny".into())),
        };
        let steps = a.steps.unwrap_or(1000);
        let mut c = PretrainConfig::defaults(data, a.out.clone(), model, steps);
        c.seq_len = a.seq_len;
        c.batch_size = a.batch_size;
        if let Some(bt) = a.batch_tokens {
            let micro = a.batch_size * a.seq_len;
            if bt % micro != 0 || bt == 0 {
                bail!("--batch-tokens {bt} is not a multiple of batch-size x seq-len = {micro}");
            }
            c.grad_accum = bt / micro;
        }
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
        c.progress = !a.no_progress;
        c
    };
    println!(
        "pretrain on {}: {} steps of {} tokens (batch {} x seq {} x accum {}), peak lr {:.2e}, warmup {}",
        engine::Backend::name(&Cpu),
        cfg.steps,
        cfg.batch_size * cfg.seq_len * cfg.grad_accum,
        cfg.batch_size,
        cfg.seq_len,
        cfg.grad_accum,
        cfg.lr,
        cfg.warmup
    );
    let rep = run(Cpu, cfg.clone(), a.resume.as_deref())?;
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

fn main() {
    // Die quietly on a closed pipe (`llama2 check DIR | head`) as Unix tools do, instead of
    // panicking inside println!.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Check {
            dir,
            device,
            atol,
            rtol,
        } => {
            require_cpu(device)?;
            println!(
                "checking {} on {}",
                dir.display(),
                engine::Backend::name(&Cpu)
            );
            let rep = check_fixture(
                Cpu,
                &dir,
                Tolerances {
                    abs: atol,
                    rel: rtol,
                },
            )
            .with_context(|| format!("fixture {}", dir.display()))?;
            println!("{}", rep.to_table());
            if rep.failed() > 0 {
                std::process::exit(1);
            }
        }
        Cmd::Tokenize {
            tokenizer,
            bos,
            decode,
        } => {
            let tok = Tokenizer::from_file(&tokenizer)?;
            let mut input = Vec::new();
            std::io::stdin()
                .read_to_end(&mut input)
                .context("reading stdin")?;
            if decode {
                let text = String::from_utf8(input).context("stdin is not UTF-8")?;
                let ids: Vec<u32> = serde_json::from_str(text.trim())
                    .context("--decode expects a JSON array of token ids on stdin")?;
                if let Some(bad) = ids.iter().find(|&&i| i as usize >= tok.vocab_size()) {
                    bail!(
                        "id {bad} is outside the vocabulary (size {})",
                        tok.vocab_size()
                    );
                }
                println!("{}", tok.decode(&ids)?);
            } else {
                let text = match String::from_utf8(input) {
                    Ok(t) => t,
                    Err(e) => bail!(
                        "stdin is not valid UTF-8 (first bad byte at offset {})",
                        e.utf8_error().valid_up_to()
                    ),
                };
                let ids = tok.encode(&text, bos)?;
                println!("{}", serde_json::to_string(&ids)?);
            }
        }
        Cmd::PrepareData {
            tokenizer,
            out,
            inputs,
            val_fraction,
            shard_tokens,
            skip_bad,
        } => {
            let meta = trainer::data::prepare(&trainer::data::PrepareConfig {
                tokenizer,
                out: out.clone(),
                inputs,
                val_fraction,
                shard_tokens,
                skip_bad,
                progress: true,
            })?;
            println!(
                "{}: {} documents ({} skipped), {} train tokens in {} shard(s), {} validation tokens ({})",
                out.display(),
                meta.documents,
                meta.skipped_documents,
                meta.train_tokens,
                meta.train_shards.len(),
                meta.val_tokens,
                meta.val_split
            );
        }
        Cmd::TrainTokenizer {
            vocab_size,
            out,
            inputs,
            min_frequency,
            skip_bad,
        } => {
            let n =
                trainer::tokenizer_train::train(&trainer::tokenizer_train::TrainTokenizerConfig {
                    inputs,
                    vocab_size,
                    out: out.clone(),
                    min_frequency,
                    skip_bad,
                    progress: true,
                })?;
            println!("{}: byte-fallback BPE with {n} tokens", out.display());
        }
        Cmd::Pretrain(a) => pretrain(a)?,
        Cmd::Bench(b) => bench(b)?,
        Cmd::Selftest { out } => {
            println!("llama2 selftest on {}", engine::Backend::name(&Cpu));
            let s = trainer::selftest::run(&out)?;
            for l in s.lines {
                println!("  {l}");
            }
            println!("selftest passed");
        }
    }
    Ok(())
}
