//! Reward models: `train-rm`, `eval-rm`.

use super::common::on_device;
use anyhow::{Context, Result};
use std::path::PathBuf;
use trainer::device::Device;

#[derive(clap::Args)]
pub struct TrainRmArgs {
    /// The checkpoint to start from: an SFT/chat model (as the paper does), or a reward model.
    #[arg(long)]
    init: PathBuf,
    /// Preference JSONL in any accepted shape (TRL's `chosen`/`rejected` with or without
    /// `prompt`, as text or messages; HH transcripts), with optional `rating`, `chosen_safe`,
    /// `rejected_safe`, `is_safety`/`category`.
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
pub struct EvalRmArgs {
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

pub fn train_rm(a: TrainRmArgs) -> Result<()> {
    use trainer::rm::RmConfig;
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
    let rep = on_device!(a.device, |be| trainer::rm::run(be, &c)?);
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

pub fn eval_rm(a: EvalRmArgs) -> Result<()> {
    on_device!(a.device, |be| eval_rm_on(be, a))
}

fn eval_rm_on<B: engine::Backend>(be: B, a: EvalRmArgs) -> Result<()> {
    use trainer::rm::{evaluate, load_rm, select_pairs, split_pairs, write_eval, RmKind};
    let kind: RmKind = a.kind.parse().map_err(anyhow::Error::msg)?;
    let (mut model, tok) = load_rm(be, &a.rm)?;
    let (pairs, _) = trainer::formats::read_pairs(&a.data, false)?;
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
