//! `llama2`: train and align Llama 2 models. The CLI only maps arguments to the library's configs.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use engine::check::{check_fixture, Tolerances};
use engine::tokenizer::Tokenizer;
use engine::Cpu;
use std::io::Read;
use std::path::PathBuf;
use trainer::device::Device;

/// Runs `$body` with `$be` bound to the backend `--device` names: the model and trainer code is
/// generic over the backend, so each command is compiled once per backend.
macro_rules! on_device {
    ($dev:expr, |$be:ident| $body:expr) => {
        match $dev {
            Device::Cpu => {
                let $be = engine::Cpu;
                $body
            }
            Device::Cuda(n) => {
                let $be = trainer::device::open_cuda(n)?;
                $body
            }
        }
    };
}

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
        /// Absolute bound for logits, loss and rewards (default 2e-5 on the CPU, the bf16 bound
        /// of engine::check::Tolerances::BF16 on CUDA).
        #[arg(long)]
        atol: Option<f32>,
        /// Bound for gradients, relative to each tensor's largest reference entry (default 1e-4
        /// on the CPU, Tolerances::BF16 on CUDA).
        #[arg(long)]
        rtol: Option<f32>,
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
    /// Supervised fine-tuning on dialogues (messages, prompt/response or HH transcripts), packed,
    /// with the loss on assistant tokens only.
    Sft(SftArgs),
    /// Generate text from a checkpoint, streaming.
    Generate(GenerateArgs),
    /// Chat with a checkpoint in the terminal (Llama 2 chat template, multi-turn).
    Chat(ChatArgs),
    /// Write the built-in assistant world: corpus, SFT dialogues, RLHF prompts, evaluation sets,
    /// GAtt instructions and the knowledge base its gold annotator uses.
    World {
        #[arg(long, default_value = "runs/world")]
        out: PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// small (~200 KB corpus), default (~1 MB) or large (~5 MB).
        #[arg(long, default_value = "default")]
        size: String,
    },
    /// Sample two answers per world prompt from a chat model and label the pair with the gold
    /// annotator (preference JSONL for train-rm).
    WorldPrefs {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        world: PathBuf,
        /// Which prompts of the world to answer.
        #[arg(long, default_value = "rlhf_prompts.jsonl")]
        split: String,
        #[arg(long)]
        out: PathBuf,
        /// Temperatures the two answers are drawn at (cycled per prompt).
        #[arg(long, value_delimiter = ',', default_value = "0.7,1.0,1.3")]
        temperatures: Vec<f32>,
        #[arg(long, default_value_t = 48)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Independent pairs per prompt.
        #[arg(long, default_value_t = 1)]
        pairs_per_prompt: usize,
        /// Chance per prompt of one more pair: an answer against the model's answer to another
        /// prompt, so the reward model learns that an answer must fit its prompt (0 for held-out
        /// pairs).
        #[arg(long, default_value_t = 0.5)]
        off_topic: f64,
    },
    /// Evaluate a chat model on world prompts with the gold annotator.
    EvalWorld {
        #[arg(long)]
        model: PathBuf,
        /// The world directory (from `llama2 world`).
        #[arg(long)]
        world: PathBuf,
        /// Which file of the world to use.
        #[arg(long, default_value = "eval.jsonl")]
        split: String,
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        #[arg(long, default_value_t = 48)]
        max_new_tokens: usize,
        /// Write the report (and every answer) as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Train a reward model (helpfulness or safety) with the margin ranking loss.
    TrainRm(TrainRmArgs),
    /// Evaluate a reward model on preference pairs: accuracy overall and by rating.
    EvalRm(EvalRmArgs),
    /// Score (prompt, response) rows with a reward model; prints JSONL with a `score` field.
    Score(ScoreArgs),
    /// Rejection-sampling fine-tuning: K samples per prompt, the best by the reward models kept
    /// (pooled over rounds), then fine-tuning on the pool.
    RejectionSample {
        /// The model to start from (SFT or an earlier round).
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        rm_helpfulness: PathBuf,
        #[arg(long)]
        rm_safety: PathBuf,
        /// Prompt JSONL: rows with `messages` ending in a user turn; `category: "safety"` tags
        /// safety prompts.
        #[arg(long)]
        prompts: PathBuf,
        #[arg(long, default_value = "runs/rs")]
        out: PathBuf,
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        #[arg(long, default_value_t = 8)]
        k: usize,
        #[arg(long, default_value_t = 1.2)]
        temperature: f32,
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
    },
    /// PPO with the piecewise safety/helpfulness reward and a KL penalty to the reference policy.
    Ppo(PpoArgs),
    /// Ghost Attention: synthetic multi-turn data with the instruction kept in the first turn
    /// only and loss on the last answer, then fine-tuning; adherence per turn before and after.
    Gatt {
        #[arg(long)]
        init: PathBuf,
        #[arg(long)]
        world: PathBuf,
        #[arg(long, default_value = "runs/gatt")]
        out: PathBuf,
        #[arg(long, default_value_t = 4)]
        turns: usize,
        #[arg(long, default_value_t = 400)]
        dialogues: usize,
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
    },
    /// Safety context distillation: answers under a safety preprompt, kept when the safety
    /// reward model prefers them, fine-tuned without the preprompt.
    DistillSafety {
        #[arg(long)]
        init: PathBuf,
        #[arg(long)]
        safety_rm: PathBuf,
        #[arg(long)]
        world: PathBuf,
        #[arg(long, default_value = "runs/distill")]
        out: PathBuf,
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
    },
    /// Iterative RLHF on the built-in world: each round labels new pairs sampled from the latest
    /// model, retrains both reward models on all labels so far, runs rejection sampling, and
    /// from --ppo-from on PPO (out/rlhf_report.json, per-round directories).
    Rlhf {
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
    },
    /// The whole recipe on the built-in world: pretrain, SFT, rounds of reward models, rejection
    /// sampling and PPO, Ghost Attention, safety context distillation, with a report
    /// (runs/<name>/report.json, report.md, plots).
    Pipeline {
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
    },
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
        /// Activation recomputation: none, attn (rebuild the attention half of each layer in the
        /// backward) or full (keep only each layer's input and re-run its forward).
        #[arg(long, default_value = "none")]
        recompute: engine::Recompute,
        /// Write the report as JSON too.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Every CUDA kernel on Llama 2 7B and ~1B shapes: time, GB/s or TFLOP/s, and the fraction
    /// of this run's copy bandwidth and bf16 GEMM TFLOP/s.
    Kernels {
        #[arg(long, default_value = "cuda")]
        device: Device,
        /// Which shapes: 7b, 1b or all.
        #[arg(long, default_value = "all")]
        config: String,
        /// Timed repetitions per kernel (after one warm-up call).
        #[arg(long, default_value_t = 20)]
        reps: usize,
        /// Also time PyTorch's equivalents (scripts/torch_kernel_bench.py; python from
        /// $LLAMA2_PYTHON or python3).
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
            recompute,
            json,
        } => {
            let model = if std::path::Path::new(&config).is_file() {
                engine::LlamaConfig::from_file(std::path::Path::new(&config))?
            } else {
                engine::LlamaConfig::preset(&config)?
            };
            let rep = on_device!(device, |be| {
                let cfg = trainer::bench::BenchConfig {
                    model,
                    seq_len,
                    batch_size,
                    steps,
                    warmup,
                    vs_torch,
                    device_name: engine::Backend::name(&be),
                    recompute,
                };
                trainer::bench::run(be, &cfg)?
            });
            rep.print();
            if let Some(p) = json {
                std::fs::write(&p, serde_json::to_string_pretty(&rep)?)
                    .with_context(|| format!("writing {}", p.display()))?;
            }
        }
        BenchCmd::Kernels {
            device,
            config,
            reps,
            vs_torch,
            json,
        } => {
            use trainer::kernel_bench::{Config, Shapes};
            let n = match device {
                Device::Cuda(n) => n,
                Device::Cpu => bail!("bench kernels times the CUDA kernels: use --device cuda[:N]"),
            };
            let cx = trainer::device::open_cuda(n)?;
            let shapes = match config.as_str() {
                "7b" => vec![Shapes::llama2_7b()],
                "1b" => vec![Shapes::llama_1b()],
                "all" => vec![Shapes::llama2_7b(), Shapes::llama_1b()],
                other => bail!("--config {other}: expected 7b, 1b or all"),
            };
            let rep = trainer::kernel_bench::run(
                &cx,
                &Config {
                    shapes,
                    reps,
                    vs_torch,
                },
            )?;
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
struct TrainRmArgs {
    /// The checkpoint to start from: an SFT/chat model (as the paper does), or a reward model.
    #[arg(long)]
    init: PathBuf,
    /// Preference JSONL: {prompt|messages, chosen, rejected, rating?, chosen_safe?, rejected_safe?,
    /// category?} or HH transcripts {chosen, rejected}.
    #[arg(long = "data", num_args = 1.., required = true)]
    data: Vec<PathBuf>,
    #[arg(long, default_value = "runs/rm")]
    out: PathBuf,
    /// helpfulness or safety (safety drops pairs whose chosen answer is unsafe and rejected safe).
    #[arg(long, default_value = "helpfulness")]
    kind: String,
    /// Rating margin: none, small {1, 2/3, 1/3, 0} or large {3, 2, 1, 0}.
    #[arg(long, default_value = "small")]
    margin: String,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Peak learning rate (default 1e-5; 5e-6 for 70B shapes).
    #[arg(long)]
    lr: Option<f32>,
    /// Pairs per optimizer step.
    #[arg(long, default_value_t = 512)]
    batch_size: usize,
    /// Pairs per forward (gradient accumulation up to --batch-size).
    #[arg(long, default_value_t = 8)]
    micro_batch: usize,
    #[arg(long)]
    seq_len: Option<usize>,
    #[arg(long, default_value_t = 0.05)]
    val_fraction: f64,
    #[arg(long)]
    max_steps: Option<usize>,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    #[arg(long)]
    skip_bad: bool,
    /// The other reward model's pairs mixed in, as a ratio to this model's own (default: 1/9
    /// for safety, the paper's 90/10; 1 for helpfulness, its "equal parts").
    #[arg(long)]
    mix_other: Option<f64>,
    /// Weight of the calibration term that makes σ(score) read as P(safe) from the safety
    /// meta-labels (default: 1 for safety, 0 for helpfulness).
    #[arg(long)]
    calibration: Option<f32>,
    /// Activation recomputation in the backward: none, attn or full (same gradients, less memory).
    #[arg(long, default_value = "none")]
    recompute: engine::Recompute,
    #[arg(long, default_value = "cpu")]
    device: Device,
    #[arg(long)]
    no_progress: bool,
}

#[derive(clap::Args)]
struct EvalRmArgs {
    /// A reward-model directory (from train-rm).
    #[arg(long)]
    rm: PathBuf,
    #[arg(long = "data", num_args = 1.., required = true)]
    data: Vec<PathBuf>,
    /// Which pairs: the kind's selection rules apply.
    #[arg(long, default_value = "helpfulness")]
    kind: String,
    /// Evaluate on the held-out split train-rm made with this fraction (0: all pairs).
    #[arg(long, default_value_t = 0.05)]
    val_fraction: f64,
    #[arg(long)]
    seq_len: Option<usize>,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Where eval.json, eval.md and scores.svg go.
    #[arg(long, default_value = "runs/eval-rm")]
    out: PathBuf,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: Device,
}

#[derive(clap::Args)]
struct ScoreArgs {
    #[arg(long)]
    rm: PathBuf,
    /// JSONL rows: {prompt, response}, {messages} ending with the response, or HH transcripts.
    #[arg(long, num_args = 1.., required = true)]
    input: Vec<PathBuf>,
    #[arg(long)]
    seq_len: Option<usize>,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: Device,
}

fn train_rm(a: TrainRmArgs) -> Result<()> {
    use trainer::rm::{train, RmConfig};
    let kind = a.kind.parse().map_err(anyhow::Error::msg)?;
    let mut c = RmConfig::new(a.init, a.data, a.out, kind);
    c.margin = a.margin.parse().map_err(anyhow::Error::msg)?;
    c.epochs = a.epochs;
    c.lr = a.lr;
    c.batch_size = a.batch_size;
    c.micro_batch = a.micro_batch;
    c.seq_len = a.seq_len;
    c.val_fraction = a.val_fraction;
    c.max_steps = a.max_steps;
    c.seed = a.seed;
    c.skip_bad = a.skip_bad;
    if let Some(m) = a.mix_other {
        c.mix_other = m;
    }
    if let Some(w) = a.calibration {
        c.calibration = w;
    }
    c.recompute = a.recompute;
    c.progress = !a.no_progress;
    let rep = on_device!(a.device, |be| train(be, &c)?);
    println!(
        "{} reward model: {} steps on {} pairs ({} held out), last loss {:.4}, batch accuracy {:.3}",
        rep.kind.name(),
        rep.steps,
        rep.train_pairs,
        rep.val_pairs,
        rep.final_loss,
        rep.final_acc
    );
    if let Some(e) = &rep.eval {
        println!("{}", e.to_markdown());
    }
    println!("model: {}", rep.model_dir.display());
    Ok(())
}

fn eval_rm(a: EvalRmArgs) -> Result<()> {
    on_device!(a.device, |be| eval_rm_on(be, a))
}

fn eval_rm_on<B: engine::Backend>(be: B, a: EvalRmArgs) -> Result<()> {
    use trainer::rm::{
        evaluate, load_rm, read_pairs, select_pairs, split_pairs, write_eval, RmKind,
    };
    let kind: RmKind = a.kind.parse().map_err(anyhow::Error::msg)?;
    let (mut model, tok) = load_rm(be, &a.rm)?;
    let (pairs, _) = read_pairs(&a.data, false)?;
    let sel = select_pairs(pairs, kind);
    let pairs = if a.val_fraction > 0.0 {
        split_pairs(sel.pairs, a.val_fraction).1
    } else {
        sel.pairs
    };
    let seq_len = a.seq_len.unwrap_or(model.cfg.max_position_embeddings);
    let rep = evaluate(&mut model, &tok, &pairs, seq_len, a.batch_size)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    write_eval(&a.out, &rep, &format!("{} reward model", kind.name()))?;
    println!("{}", rep.to_markdown());
    println!(
        "written: {}/eval.json, eval.md, scores.svg",
        a.out.display()
    );
    Ok(())
}

fn score_cmd(a: ScoreArgs) -> Result<()> {
    on_device!(a.device, |be| score_on(be, a))
}

fn score_on<B: engine::Backend>(be: B, a: ScoreArgs) -> Result<()> {
    use trainer::rm::{load_rm, read_score_rows, score};
    let (mut model, tok) = load_rm(be, &a.rm)?;
    let rows = read_score_rows(&a.input)?;
    let seq_len = a.seq_len.unwrap_or(model.cfg.max_position_embeddings);
    let scores = score(&mut model, &tok, &rows, seq_len, a.batch_size)?;
    for ((p, r), s) in rows.iter().zip(scores) {
        println!(
            "{}",
            serde_json::json!({"messages": p, "response": r, "score": s})
        );
    }
    Ok(())
}

#[derive(clap::Args)]
struct PpoArgs {
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
    /// Prompt JSONL (`messages` ending with a user turn; `category: "safety"` tags safety prompts).
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
    /// Where the ranks exchange the NCCL id: file:PATH (shared filesystem) or HOST:PORT
    /// (default MASTER_ADDR:MASTER_PORT, as torchrun sets them).
    #[arg(long, requires = "dist")]
    rendezvous: Option<String>,
    #[arg(long, default_value = "cpu")]
    device: Device,
    #[arg(long)]
    no_progress: bool,
}

fn ppo_cmd(a: PpoArgs) -> Result<()> {
    use engine::dist::Collective;
    use trainer::ppo::{resume_config, train, train_dp, PpoConfig};
    // The launch first: a rank without a place to meet fails before reading anything.
    let mut dist = if a.dist {
        Some(trainer::device::open_dist(a.rendezvous.as_deref())?)
    } else {
        None
    };
    let cfg = if let Some(r) = &a.resume {
        let mut c = resume_config(r, a.iterations)?;
        c.progress = !a.no_progress;
        c.recompute = a.recompute.unwrap_or(c.recompute);
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
        c.progress = !a.no_progress;
        c
    };
    let rep = match &mut dist {
        None => on_device!(a.device, |be| train(be, &cfg)?),
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
struct SftArgs {
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
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
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
    /// Activation recomputation: none, attn or full (less memory, more time, the same
    /// gradients). Default none, or the resumed run's setting.
    #[arg(long)]
    recompute: Option<engine::Recompute>,
    /// Run as one rank of a data-parallel job launched by torchrun, mpirun or srun: each rank
    /// drives cuda:LOCAL_RANK, NCCL sums the gradients and ZeRO-1 shards the optimizer state;
    /// --batch-size is per rank.
    #[arg(long, conflicts_with = "device")]
    dist: bool,
    /// Where the ranks exchange the NCCL id: file:PATH (shared filesystem) or HOST:PORT
    /// (default MASTER_ADDR:MASTER_PORT, as torchrun sets them).
    #[arg(long, requires = "dist")]
    rendezvous: Option<String>,
    #[arg(long, default_value = "cpu")]
    device: Device,
    #[arg(long)]
    no_progress: bool,
}

#[derive(clap::Args)]
struct SamplingArgs {
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplingArgs {
    fn params(&self, eos: u32) -> engine::generate::SamplingParams {
        engine::generate::SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            max_new_tokens: self.max_new_tokens,
            seed: self.seed,
            stop: vec![eos],
        }
    }
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// An HF checkpoint directory (with tokenizer.json, or pass --tokenizer).
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the Llama 2 chat template.
    #[arg(long)]
    chat: bool,
    /// System prompt (with --chat).
    #[arg(long)]
    system: Option<String>,
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: Device,
}

#[derive(clap::Args)]
struct ChatArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    system: Option<String>,
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: Device,
}

fn load_for_generation<B: engine::Backend>(
    be: B,
    model: &std::path::Path,
    tokenizer: Option<&std::path::Path>,
) -> Result<(engine::Llama<B>, Tokenizer)> {
    let tok_path = tokenizer
        .map(PathBuf::from)
        .unwrap_or_else(|| model.join("tokenizer.json"));
    let tok = Tokenizer::from_file(&tok_path)
        .with_context(|| "the checkpoint has no tokenizer.json: pass --tokenizer")?;
    let m = engine::checkpoint::load_model(be, model, engine::Head::Lm)?;
    Ok((m, tok))
}

/// Streams decoded text: prints what decoding the tokens so far adds (byte-fallback pieces only
/// become text once complete).
struct Streamer {
    ids: Vec<u32>,
    printed: usize,
}

impl Streamer {
    fn push(&mut self, tok: &Tokenizer, id: u32) {
        use std::io::Write;
        self.ids.push(id);
        if let Ok(text) = tok.decode(&self.ids) {
            if text.len() > self.printed
                && text.is_char_boundary(self.printed)
                && !text.ends_with('\u{fffd}')
            {
                print!("{}", &text[self.printed..]);
                let _ = std::io::stdout().flush();
                self.printed = text.len();
            }
        }
    }
}

fn generate_cmd(a: GenerateArgs) -> Result<()> {
    on_device!(a.device, |be| generate_on(be, a))
}

fn generate_on<B: engine::Backend>(be: B, a: GenerateArgs) -> Result<()> {
    use engine::tokenizer::Message;
    let (mut model, tok) = load_for_generation(be, &a.model, a.tokenizer.as_deref())?;
    let prompt = if a.chat {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(Message::new("system", s));
        }
        msgs.push(Message::new("user", &a.prompt));
        tok.chat(&msgs)?.0
    } else {
        tok.encode(&a.prompt, true)?
    };
    let mut st = Streamer {
        ids: vec![],
        printed: 0,
    };
    if !a.chat {
        print!("{}", a.prompt);
    }
    engine::generate::generate(
        &mut model,
        &[prompt],
        &a.sampling.params(tok.eos),
        &mut |_, t| st.push(&tok, t),
    )?;
    println!();
    Ok(())
}

fn chat_cmd(a: ChatArgs) -> Result<()> {
    on_device!(a.device, |be| chat_on(be, a))
}

fn chat_on<B: engine::Backend>(be: B, a: ChatArgs) -> Result<()> {
    use engine::tokenizer::Message;
    use std::io::{BufRead, Write};
    let (mut model, tok) = load_for_generation(be, &a.model, a.tokenizer.as_deref())?;
    let mut msgs: Vec<Message> = a.system.iter().map(|s| Message::new("system", s)).collect();
    println!(
        "chatting with {} ({} parameters); /reset starts over, /exit or Ctrl-D ends",
        a.model.display(),
        model.num_params()
    );
    let stdin = std::io::stdin();
    let mut turn = 0u64;
    loop {
        print!("you> ");
        std::io::stdout().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            println!();
            break;
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                msgs.retain(|m| m.role == "system");
                println!("(conversation reset)");
                continue;
            }
            _ => {}
        }
        msgs.push(Message::new("user", line));
        let ids = tok.chat(&msgs)?.0;
        let room = model.cfg.max_position_embeddings.saturating_sub(ids.len());
        if room < 2 {
            msgs.pop();
            println!(
                "(the conversation fills the model's context of {} tokens: /reset)",
                model.cfg.max_position_embeddings
            );
            continue;
        }
        let mut p = a.sampling.params(tok.eos);
        p.max_new_tokens = p.max_new_tokens.min(room - 1);
        p.seed = a.sampling.seed.wrapping_add(turn);
        turn += 1;
        print!("assistant> ");
        let mut st = Streamer {
            ids: vec![],
            printed: 0,
        };
        let g = engine::generate::generate(&mut model, &[ids], &p, &mut |_, t| st.push(&tok, t))?;
        println!();
        msgs.push(Message::new("assistant", tok.decode(&g[0].tokens)?.trim()));
    }
    Ok(())
}

fn sft(a: SftArgs) -> Result<()> {
    use trainer::pretrain::{resume_config, DataSpec, TrainConfig};
    let cfg = if let Some(r) = &a.resume {
        let mut c = resume_config(r, a.steps)?;
        c.progress = !a.no_progress;
        c.recompute = a.recompute.unwrap_or(c.recompute);
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
        c.eval_every = a.eval_every;
        c.ckpt_every = a.ckpt_every;
        c.seed = a.seed;
        c.progress = !a.no_progress;
        c.recompute = a.recompute.unwrap_or_default();
        c
    };
    let (rep, lead) = train_loop(
        a.dist,
        a.rendezvous.as_deref(),
        a.device,
        &cfg,
        a.resume.as_deref(),
        |_, _| {},
    )?;
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
    /// Activation recomputation: none, attn or full (less memory, more time, the same
    /// gradients). Default none, or the resumed run's setting.
    #[arg(long)]
    recompute: Option<engine::Recompute>,
    /// Run as one rank of a data-parallel job launched by torchrun, mpirun or srun: each rank
    /// drives cuda:LOCAL_RANK, NCCL sums the gradients and ZeRO-1 shards the optimizer state;
    /// --batch-size is per rank.
    #[arg(long, conflicts_with = "device")]
    dist: bool,
    /// Where the ranks exchange the NCCL id: file:PATH (shared filesystem) or HOST:PORT
    /// (default MASTER_ADDR:MASTER_PORT, as torchrun sets them).
    #[arg(long, requires = "dist")]
    rendezvous: Option<String>,
    #[arg(long, default_value = "cpu")]
    device: Device,
    #[arg(long)]
    no_progress: bool,
}

/// The pretrain/SFT loop on `--device`, or with `--dist` as this process's rank of a launched
/// job. `header(place, world)` prints once, on rank 0. Returns the report and whether this
/// process is rank 0 (the one that prints).
fn train_loop(
    dist: bool,
    rendezvous: Option<&str>,
    device: Device,
    cfg: &trainer::pretrain::TrainConfig,
    resume: Option<&std::path::Path>,
    header: impl FnOnce(&str, usize),
) -> Result<(trainer::pretrain::PretrainReport, bool)> {
    use engine::dist::Collective;
    use trainer::pretrain::{run, run_dp};
    if !dist {
        header(&device.to_string(), 1);
        return Ok((on_device!(device, |be| run(be, cfg.clone(), resume)?), true));
    }
    let (cuda, mut comm) = trainer::device::open_dist(rendezvous)?;
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

fn pretrain(a: PretrainArgs) -> Result<()> {
    use trainer::pretrain::{resume_config, ModelSource, PretrainConfig};
    let cfg = if let Some(r) = &a.resume {
        let mut c = resume_config(r, a.steps)?;
        c.progress = !a.no_progress;
        c.recompute = a.recompute.unwrap_or(c.recompute);
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
        c.recompute = a.recompute.unwrap_or_default();
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
    let (rep, lead) = train_loop(
        a.dist,
        a.rendezvous.as_deref(),
        a.device,
        &cfg,
        a.resume.as_deref(),
        header,
    )?;
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
            // bf16 compute needs the wider bounds unless they are given explicitly.
            let base = match device {
                Device::Cpu => Tolerances::F32,
                Device::Cuda(_) => Tolerances::BF16,
            };
            let tol = Tolerances {
                abs: atol.unwrap_or(base.abs),
                rel: rtol.unwrap_or(base.rel),
            };
            let rep = on_device!(device, |be| {
                println!(
                    "checking {} on {} (atol {:e}, rtol {:e})",
                    dir.display(),
                    engine::Backend::name(&be),
                    tol.abs,
                    tol.rel
                );
                check_fixture(be, &dir, tol)
                    .with_context(|| format!("fixture {}", dir.display()))?
            });
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
        Cmd::Sft(a) => sft(a)?,
        Cmd::Gatt {
            init,
            world,
            out,
            turns,
            dialogues,
            replay,
            epochs,
            lr,
            seed,
            device,
        } => {
            let cfg = trainer::gatt::GattConfig {
                turns,
                dialogues,
                replay,
                epochs,
                lr,
                seed,
                ..Default::default()
            };
            let r = on_device!(device, |be| trainer::gatt::run_gatt(
                be, &init, &world, &out, &cfg
            )?);
            println!(
                "adherence per turn before GAtt: {:?}",
                r.adherence_before.follow
            );
            println!(
                "adherence per turn after GAtt:  {:?}",
                r.adherence_after.follow
            );
            println!(
                "{} training rows from {} dialogues; model: {}",
                r.rows,
                r.dialogues,
                r.checkpoint.display()
            );
        }
        Cmd::DistillSafety {
            init,
            safety_rm,
            world,
            out,
            replay,
            epochs,
            lr,
            seed,
            device,
        } => {
            let cfg = trainer::distill::DistillConfig {
                replay,
                epochs,
                lr,
                seed,
                ..Default::default()
            };
            let r = on_device!(device, |be| {
                trainer::distill::run_distill(be, &init, &safety_rm, &world, &out, &cfg)?
            });
            println!(
                "{} safety prompts, {} answers kept (mean safety-RM score {:.3} with the preprompt, {:.3} without); model: {}",
                r.prompts, r.kept, r.mean_score_with, r.mean_score_without, r.checkpoint.as_deref().map(|p| p.display().to_string()).unwrap_or_else(|| "none (no answer kept)".into())
            );
        }
        Cmd::Ppo(a) => ppo_cmd(a)?,
        Cmd::RejectionSample {
            model,
            rm_helpfulness,
            rm_safety,
            prompts,
            out,
            rounds,
            k,
            temperature,
            max_prompts,
            lr,
            epochs,
            seq_len,
            seed,
        } => {
            use trainer::rs::{run_round, write_report, Pool, RsConfig, RsPrompt};
            let text = std::fs::read_to_string(&prompts)
                .with_context(|| format!("reading {}", prompts.display()))?;
            let mut ps = Vec::new();
            for (i, line) in text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                let v: serde_json::Value = serde_json::from_str(line)
                    .with_context(|| format!("{}:{}", prompts.display(), i + 1))?;
                let messages: Vec<engine::tokenizer::Message> =
                    serde_json::from_value(v["messages"].clone()).with_context(|| {
                        format!(
                            "{}:{}: `messages` must be a list of {{role, content}}",
                            prompts.display(),
                            i + 1
                        )
                    })?;
                if messages.last().is_none_or(|m| m.role != "user") {
                    bail!(
                        "{}:{}: the dialogue must end with a user turn",
                        prompts.display(),
                        i + 1
                    );
                }
                ps.push(RsPrompt {
                    messages,
                    safety: v["category"] == "safety",
                });
            }
            if max_prompts > 0 {
                ps.truncate(max_prompts);
            }
            let cfg = RsConfig {
                k,
                temperature,
                lr,
                epochs,
                seq_len,
                seed,
                ..Default::default()
            };
            let mut pool = Pool::default();
            let mut current = model;
            let mut stats = Vec::new();
            for r in 1..=rounds {
                let st = run_round(
                    Cpu,
                    &current,
                    &rm_helpfulness,
                    &rm_safety,
                    &ps,
                    &cfg,
                    r,
                    &mut pool,
                    &out,
                )?;
                println!(
                    "round {r}: {} prompts x {k}: mean max reward {:.4}, mean median {:.4} (delta {:.4}); pool {}",
                    st.prompts, st.mean_max, st.mean_median, st.mean_max - st.mean_median, st.pool
                );
                current = st.checkpoint.clone().context("no checkpoint written")?;
                stats.push(st);
            }
            write_report(&out, &stats)?;
            println!(
                "model: {}\nreport: {}/rs_report.json, rs_rewards.svg",
                current.display(),
                out.display()
            );
        }
        Cmd::Rlhf {
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
        } => {
            let sft = trainer::rlhf::checkpoint_of(&sft)?;
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
            println!("| stage | sampled R_c | greedy R_c | accuracy | helpfulness | safety | false refusals | KL to SFT |");
            println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
            for e in &rep.stages {
                println!(
                    "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} |",
                    e.stage,
                    e.sampled_reward,
                    e.reward,
                    e.gold.accuracy,
                    e.gold.helpfulness,
                    e.gold.safety,
                    e.gold.false_refusal_rate,
                    e.kl_to_sft
                );
            }
            println!(
                "model: {}\nreport: {}/rlhf_report.json, rs_rewards.svg (in {:.0} s)",
                rep.checkpoint.display(),
                out.display(),
                rep.seconds
            );
        }
        Cmd::Pipeline {
            name,
            config,
            device,
            seed,
            rounds,
            ppo_from,
            no_progress,
        } => {
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
        }
        Cmd::World { out, seed, size } => {
            let size = size.parse()?;
            let s = trainer::world::run(&trainer::world::WorldConfig { out, seed, size })?;
            println!("{s}");
        }
        Cmd::WorldPrefs {
            model,
            world,
            split,
            out,
            temperatures,
            max_new_tokens,
            seed,
            pairs_per_prompt,
            off_topic,
        } => {
            let (mut m, tok) = load_for_generation(Cpu, &model, None)?;
            let ann = trainer::world::Annotator::new(trainer::world::World::load(&world)?);
            let ex = trainer::world::read_examples(&world.join(&split))?;
            let cfg = trainer::prefs::PrefsConfig {
                temperatures,
                max_new_tokens,
                seed,
                pairs_per_prompt,
                off_topic,
                ..Default::default()
            };
            let pairs = trainer::prefs::collect(&mut m, &tok, &ann, &ex, &cfg)?;
            trainer::prefs::write_jsonl(&out, &pairs)?;
            let mut by: std::collections::BTreeMap<&str, usize> = Default::default();
            for p in &pairs {
                *by.entry(p.rating).or_default() += 1;
            }
            println!(
                "{}: {} labelled pairs from {} prompts ({} ties dropped): {by:?}",
                out.display(),
                pairs.len(),
                ex.len(),
                ex.len() * pairs_per_prompt - pairs.len()
            );
        }
        Cmd::EvalWorld {
            model,
            world,
            split,
            batch_size,
            max_new_tokens,
            json,
        } => {
            let (mut m, tok) = load_for_generation(Cpu, &model, None)?;
            let ann = trainer::world::Annotator::new(trainer::world::World::load(&world)?);
            let ex = trainer::world::read_examples(&world.join(&split))?;
            let (ev, answers) =
                trainer::evaluate::world_eval(&mut m, &tok, &ann, &ex, batch_size, max_new_tokens)?;
            println!(
                "{} prompts: accuracy {:.3}, safe {:.3}, false refusals {:.3}, mean helpfulness {:.3}, mean safety {:.3}",
                ev.prompts, ev.accuracy, ev.safe_rate, ev.false_refusal_rate, ev.helpfulness, ev.safety
            );
            for (t, a) in &ev.by_task {
                println!("  {t:<12} {a:.3}");
            }
            if let Some(p) = json {
                let rows: Vec<_> = ex
                    .iter()
                    .zip(&answers)
                    .map(|(e, a)| serde_json::json!({"messages": e.messages, "task": e.task, "answer": a, "reference": e.answer}))
                    .collect();
                std::fs::write(
                    &p,
                    serde_json::to_string_pretty(
                        &serde_json::json!({"report": ev, "answers": rows}),
                    )?,
                )
                .with_context(|| format!("writing {}", p.display()))?;
            }
        }
        Cmd::TrainRm(a) => train_rm(a)?,
        Cmd::EvalRm(a) => eval_rm(a)?,
        Cmd::Score(a) => score_cmd(a)?,
        Cmd::Generate(a) => generate_cmd(a)?,
        Cmd::Chat(a) => chat_cmd(a)?,
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
