//! The training loop of `llama2 pretrain` (token shards) and `llama2 sft` (packed dialogues):
//! the Llama 2 paper's recipe on either data source.
//!
//! AdamW (β 0.9/0.95, eps 1e-5, decay 0.1), clip 1.0, cosine schedule with warmup to 10 % of the
//! peak, gradient accumulation to a token batch; validation loss, text samples, JSONL metrics,
//! a progress bar (plain lines without a terminal); atomic checkpoints (HF model + optimizer +
//! loader state) every N steps and on Ctrl-C or SIGTERM; exact resume (on the CPU, the losses of
//! a resumed run equal an uninterrupted run's bit for bit); non-finite losses or gradients stop
//! the run naming the step and the tensor.
//!
//! [`run_dp`] runs the same loop as one rank of a data-parallel job (ZeRO-1, see
//! [`engine::dist`]): N ranks together take exactly the steps of one process with N× the batch.

use crate::data::{val_windows, Loader, TokenData, TokenDtype};
use crate::optimizer::{as_sink, nonfinite_grads, Optim};
use crate::plot::{line_plot, read_series};
use crate::run_dir::{self, say, MetricsWriter};
use crate::schedule::Cosine;
use crate::sft::{PackedSource, SftData};
use anyhow::{bail, ensure, Context, Result};
use engine::checkpoint::{load_model, remove_stale_temporaries, save_model, SaveOptions};
use engine::dist::{save_zero1, Collective, DeviceCollective, ShardedAdamW};
use engine::generate::{generate, SamplingParams};
use engine::optim::{AdamW, AdamWConfig};
use engine::tokenizer::Tokenizer;
use engine::{Backend, Batch, Head, Llama, LlamaConfig, Recompute};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where the model comes from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum ModelSource {
    /// A preset name (tiny, 7b, ...); its vocabulary is set to the data's.
    Preset(String),
    /// An HF `config.json` (random initialisation).
    Config(PathBuf),
    /// An HF checkpoint directory to continue from.
    Init(PathBuf),
}

/// What the loop trains on.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum DataSpec {
    /// A directory from `llama2 prepare-data`: random windows of the token stream.
    Shards(PathBuf),
    /// Token-id files (`.bin`/`.npy`, as llama2.c and nanoGPT write them), one or a directory
    /// of them, read as they are ([`TokenData::open_ids`]); `dtype` is that of headerless `.bin`
    /// files, and the tokenizer (optional: samples and checkpoints' `tokenizer.json` need it)
    /// defaults to a `tokenizer.json` beside the files.
    Tokens {
        path: PathBuf,
        dtype: TokenDtype,
        tokenizer: Option<PathBuf>,
    },
    /// Dialogue JSONL files, packed with loss on assistant tokens only.
    Sft {
        files: Vec<PathBuf>,
        /// The tokenizer; default: the `--init` checkpoint's `tokenizer.json`.
        tokenizer: Option<PathBuf>,
        val_fraction: f64,
        epochs: usize,
        skip_bad: bool,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainConfig {
    pub data: DataSpec,
    pub out: PathBuf,
    pub model: ModelSource,
    pub seq_len: usize,
    /// Sequences per micro-batch (one forward/backward).
    pub batch_size: usize,
    /// Micro-batches per optimizer step (the token batch is their product with seq_len).
    pub grad_accum: usize,
    pub steps: usize,
    pub lr: f32,
    pub warmup: usize,
    pub final_lr_ratio: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub clip: f32,
    pub eval_every: usize,
    pub eval_windows: usize,
    pub sample_every: usize,
    pub sample_tokens: usize,
    pub ckpt_every: usize,
    pub keep_checkpoints: usize,
    pub seed: u64,
    pub skip_nonfinite: bool,
    /// Stop (with a checkpoint) after this many steps of this invocation, as an interruption would.
    pub stop_after: Option<usize>,
    pub progress: bool,
    /// Activation recomputation: memory for time, the same gradients (absent in old checkpoints).
    #[serde(default)]
    pub recompute: Recompute,
    /// Data-parallel ranks the run was launched with; `batch_size` is per rank. Set by
    /// [`run_dp`]; a resume on another world size keeps the global batch `world × batch_size`.
    #[serde(default = "crate::run_dir::one")]
    pub world: usize,
    /// Data-parallel gradient buckets, MiB of f32: reduce-scattered while the backward runs
    /// (0: all at once after it).
    #[serde(default = "crate::optimizer::default_bucket_mb")]
    pub bucket_mb: f64,
    /// Where no progress bar is drawn (output to a file or pipe, or `progress` off), a plain
    /// line every this many steps, and at every evaluation (0: at evaluations only).
    #[serde(default = "default_log_every")]
    pub log_every: usize,
}

fn default_log_every() -> usize {
    10
}

impl TrainConfig {
    /// The paper's defaults for a model size: peak LR 3e-4 (1.5e-4 for 34B/70B; 1e-3 for the tiny
    /// preset, which is small enough to take it), warmup 2000 steps (a tenth of a shorter run).
    pub fn defaults(data: PathBuf, out: PathBuf, model: ModelSource, steps: usize) -> Self {
        let lr = match &model {
            ModelSource::Preset(p) if p == "34b" || p == "70b" => 1.5e-4,
            ModelSource::Preset(p) if p == "tiny" => 1e-3,
            _ => 3e-4,
        };
        TrainConfig {
            data: DataSpec::Shards(data),
            out,
            model,
            seq_len: 256,
            batch_size: 8,
            grad_accum: 1,
            steps,
            lr,
            warmup: 2000.min(steps / 10).max(1),
            final_lr_ratio: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-5,
            weight_decay: 0.1,
            clip: 1.0,
            eval_every: 100,
            eval_windows: 64,
            sample_every: 0,
            sample_tokens: 64,
            ckpt_every: 500,
            keep_checkpoints: 3,
            seed: 1337,
            skip_nonfinite: false,
            stop_after: None,
            progress: true,
            recompute: Recompute::None,
            world: 1,
            bucket_mb: crate::optimizer::default_bucket_mb(),
            log_every: default_log_every(),
        }
    }

    /// The paper's SFT settings: cosine schedule from 2e-5 (no warmup), weight decay 0.1, two
    /// epochs; `steps` 0 means "as many as the epochs need", decided when the data is packed.
    pub fn sft_defaults(files: Vec<PathBuf>, out: PathBuf, init: PathBuf) -> Self {
        let mut c = Self::defaults(PathBuf::new(), out, ModelSource::Init(init), 0);
        c.data = DataSpec::Sft {
            files,
            tokenizer: None,
            val_fraction: 0.05,
            epochs: 2,
            skip_bad: false,
        };
        c.lr = 2e-5;
        c.warmup = 0;
        c.eval_every = 50;
        c.ckpt_every = 200;
        c
    }

    pub fn kind(&self) -> &'static str {
        match self.data {
            DataSpec::Shards(_) | DataSpec::Tokens { .. } => "pretrain",
            DataSpec::Sft { .. } => "sft",
        }
    }

    /// Rejects values that make no sense, in the CLI's flag names, before anything is loaded:
    /// a learning rate that is not positive (a negative one climbs the loss), a final ratio
    /// outside [0, 1], negative decay or clip, sizes that are zero or overflow.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.lr > 0.0 && self.lr.is_finite(),
            "--lr {}: expected a positive learning rate",
            self.lr
        );
        ensure!(
            (0.0..=1.0).contains(&self.final_lr_ratio),
            "--final-lr-ratio {}: expected a fraction of the peak in [0, 1]",
            self.final_lr_ratio
        );
        ensure!(
            self.weight_decay >= 0.0 && self.weight_decay.is_finite(),
            "--weight-decay {}: expected a number >= 0",
            self.weight_decay
        );
        ensure!(
            self.clip >= 0.0 && self.clip.is_finite(),
            "--clip {}: expected a gradient-norm bound >= 0 (0 disables clipping)",
            self.clip
        );
        ensure!(
            self.batch_size > 0 && self.grad_accum > 0 && self.seq_len > 0,
            "--batch-size, --seq-len and the accumulation must be > 0"
        );
        ensure!(
            self.eval_windows > 0,
            "--eval-windows must be at least 1 (validation batches per evaluation)"
        );
        let tokens = self
            .batch_size
            .checked_mul(self.seq_len)
            .and_then(|x| x.checked_mul(self.grad_accum))
            .and_then(|x| x.checked_mul(self.world.max(1)));
        ensure!(
            tokens.is_some(),
            "--batch-size {} x --seq-len {} x accumulation {} overflows",
            self.batch_size,
            self.seq_len,
            self.grad_accum
        );
        if let DataSpec::Sft { epochs, .. } = self.data {
            ensure!(
                epochs > 0 || self.steps > 0,
                "--epochs 0 with --steps 0: nothing to train (give --epochs or --steps)"
            );
        }
        Ok(())
    }

    /// Makes the run's paths absolute, so a checkpoint's configuration still finds its data
    /// when the run is resumed from another working directory.
    pub fn absolutize(&mut self) -> Result<()> {
        let abs = run_dir::make_absolute;
        match &mut self.data {
            DataSpec::Shards(d) => abs(d)?,
            DataSpec::Tokens {
                path, tokenizer, ..
            } => {
                abs(path)?;
                if let Some(t) = tokenizer {
                    abs(t)?;
                }
            }
            DataSpec::Sft {
                files, tokenizer, ..
            } => {
                for f in files {
                    abs(f)?;
                }
                if let Some(t) = tokenizer {
                    abs(t)?;
                }
            }
        }
        match &mut self.model {
            ModelSource::Config(p) | ModelSource::Init(p) => abs(p)?,
            ModelSource::Preset(_) => {}
        }
        abs(&mut self.out)
    }

    pub fn schedule(&self) -> Cosine {
        Cosine {
            peak: self.lr,
            warmup: self.warmup,
            total: self.steps,
            final_ratio: self.final_lr_ratio,
        }
    }
}

/// The file that makes a directory a training checkpoint.
pub const STATE: &str = "trainer_state.json";

/// Training state saved beside the model in every checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainerState {
    pub kind: String,
    /// Optimizer steps completed.
    pub step: usize,
    pub loader_position: u64,
    pub adamw_step: u64,
    pub seed: u64,
    pub config: TrainConfig,
}

#[derive(Clone, Debug, Serialize)]
pub struct StepLog {
    pub step: usize,
    pub lr: f32,
    pub loss: f32,
    pub grad_norm: f32,
    pub val_loss: Option<f32>,
}

#[derive(Debug, Serialize)]
pub struct TrainReport {
    pub steps_done: usize,
    pub last_step: usize,
    pub logs: Vec<StepLog>,
    pub final_val_loss: Option<f32>,
    pub tokens_per_s: f64,
    pub checkpoint: Option<PathBuf>,
    pub interrupted: bool,
}

/// Builds the model for a run, matching the data's vocabulary.
pub fn build_model<B: Backend>(
    be: B,
    src: &ModelSource,
    data_vocab: usize,
    seed: u64,
) -> Result<Llama<B>> {
    let mut model = match src {
        ModelSource::Preset(p) => {
            let mut cfg = LlamaConfig::preset(p)?;
            cfg.vocab_size = data_vocab;
            let mut m =
                Llama::new(be, cfg, Head::Lm).with_context(|| format!("the `{p}` preset"))?;
            m.init_random(seed)?;
            m
        }
        ModelSource::Config(path) => {
            let cfg = LlamaConfig::from_file(path)?;
            let mut m = Llama::new(be, cfg, Head::Lm)
                .with_context(|| format!("the model of {}", path.display()))?;
            m.init_random(seed)?;
            m
        }
        ModelSource::Init(dir) => load_model(be, dir, Head::Lm)
            .with_context(|| format!("loading --init checkpoint {}", dir.display()))?,
    };
    ensure!(
        model.cfg.vocab_size >= data_vocab,
        "the model's vocab_size ({}) is smaller than the data's tokenizer ({data_vocab})",
        model.cfg.vocab_size
    );
    model.zero_grads()?;
    Ok(model)
}

struct Ckpt<'a> {
    out: &'a Path,
    keep: usize,
    /// Copied into every checkpoint; token-id data may have none.
    tokenizer: Option<&'a Path>,
}

impl Ckpt<'_> {
    fn dir(&self, state: &TrainerState) -> PathBuf {
        self.out
            .join("checkpoints")
            .join(format!("step-{:08}", state.step))
    }

    /// The files beside the model that resuming needs: the tokenizer and the trainer state.
    fn write_extra(&self, tmp: &Path, state: &TrainerState) -> engine::Result<()> {
        if let Some(t) = self.tokenizer {
            std::fs::copy(t, tmp.join("tokenizer.json")).map_err(|e| engine::Error::io(t, e))?;
        }
        let text = serde_json::to_string_pretty(state).expect("json");
        std::fs::write(tmp.join(STATE), text).map_err(|e| engine::Error::io(tmp, e))
    }

    fn save<B: Backend>(
        &self,
        model: &Llama<B>,
        opt: &AdamW<B>,
        state: &TrainerState,
    ) -> Result<PathBuf> {
        let dir = self.dir(state);
        let n = model.table.total;
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        model.be.to_host(&mut m, B::all(&opt.m))?;
        model.be.to_host(&mut v, B::all(&opt.v))?;
        save_model(model, &dir, SaveOptions::default(), |tmp| {
            run_dir::write_optimizer(
                &tmp.join("optimizer.safetensors"),
                &[("adamw.m", &m), ("adamw.v", &v)],
            )?;
            self.write_extra(tmp, state)
        })?;
        self.publish(&dir)?;
        Ok(dir)
    }

    /// A ZeRO-1 checkpoint, called by every rank: the model once (rank 0), one optimizer shard
    /// per rank. `latest` moves (rank 0) only once every shard is durable, and every rank
    /// returns only then, so no rank ever resumes from a half-written checkpoint.
    fn save_sharded<B: Backend>(
        &self,
        model: &Llama<B>,
        opt: &ShardedAdamW<B>,
        comm: &mut (dyn Collective + '_),
        state: &TrainerState,
    ) -> Result<PathBuf> {
        let dir = self.dir(state);
        save_zero1(&dir, model, opt, comm, SaveOptions::default(), |tmp| {
            self.write_extra(tmp, state)
        })?;
        let mine = if comm.rank() == 0 {
            self.publish(&dir)
        } else {
            Ok(())
        };
        run_dir::agree(comm, mine, "publishing the checkpoint")?;
        Ok(dir)
    }

    /// Points `checkpoints/latest` at `dir` and keeps the newest `keep` checkpoints.
    fn publish(&self, dir: &Path) -> Result<()> {
        let name = dir.file_name().expect("step-N").to_string_lossy();
        run_dir::publish(&self.out.join("checkpoints"), &name, self.keep)
    }
}

/// A batch of rows in host memory; `pos`/`doc` are empty for plain (unpacked) rows.
#[derive(Clone, Debug, Default)]
pub struct Rows {
    pub b: usize,
    pub ids: Vec<i32>,
    pub targets: Vec<i32>,
    pub pos: Vec<i32>,
    pub doc: Vec<i32>,
}

impl Rows {
    fn clear(&mut self) {
        self.b = 0;
        self.ids.clear();
        self.targets.clear();
        self.pos.clear();
        self.doc.clear();
    }
    pub fn batch(&self, t: usize) -> Batch<'_> {
        let mut bt = Batch::new(&self.ids, self.b, t);
        if !self.pos.is_empty() {
            bt.pos = Some(&self.pos);
            bt.doc = Some(&self.doc);
        }
        bt
    }
}

/// Where batches come from: random windows of token shards, or packed dialogue rows.
enum Source {
    Shards { data: TokenData, loader: Loader },
    Packed(PackedSource),
}

impl Source {
    fn next(&mut self, b: usize, rows: &mut Rows) {
        rows.clear();
        rows.b = b;
        match self {
            Source::Shards { data, loader } => {
                loader.next_batch(data, b, &mut rows.ids, &mut rows.targets)
            }
            Source::Packed(p) => p.next_batch(
                b,
                &mut rows.ids,
                &mut rows.targets,
                &mut rows.pos,
                &mut rows.doc,
            ),
        }
    }
    /// Rank `rank`'s `b` rows of the next `world · b`: positions count rows, so skipping the
    /// other ranks' rows leaves every rank where one process drawing `world · b` would be, and
    /// the ranks together train on exactly its rows.
    fn next_for_rank(&mut self, b: usize, rank: usize, world: usize, rows: &mut Rows) {
        let p = self.position();
        self.set_position(p + (rank * b) as u64);
        self.next(b, rows);
        self.set_position(p + (world * b) as u64);
    }
    fn position(&self) -> u64 {
        match self {
            Source::Shards { loader, .. } => loader.position,
            Source::Packed(p) => p.position,
        }
    }
    fn set_position(&mut self, pos: u64) {
        match self {
            Source::Shards { loader, .. } => loader.position = pos,
            Source::Packed(p) => p.position = pos,
        }
    }
}

/// Mean validation loss (per counted target) over fixed validation batches.
pub fn evaluate<B: Backend>(model: &mut Llama<B>, batches: &[Rows], t: usize) -> Result<f32> {
    let mut sum = 0f64;
    let mut count = 0usize;
    for r in batches {
        model.forward(&r.batch(t))?;
        let (l, c) = model.lm_loss(&r.targets)?;
        sum += l as f64 * c as f64;
        count += c;
    }
    Ok((sum / count.max(1) as f64) as f32)
}

fn chunk_rows(
    ids: &[i32],
    tg: &[i32],
    pos: &[i32],
    doc: &[i32],
    t: usize,
    b: usize,
    max_rows: usize,
) -> Vec<Rows> {
    let n = (ids.len() / t).min(max_rows);
    (0..n)
        .step_by(b.max(1))
        .map(|r0| {
            let r1 = (r0 + b).min(n);
            let s = r0 * t..r1 * t;
            Rows {
                b: r1 - r0,
                ids: ids[s.clone()].to_vec(),
                targets: tg[s.clone()].to_vec(),
                pos: if pos.is_empty() {
                    vec![]
                } else {
                    pos[s.clone()].to_vec()
                },
                doc: if doc.is_empty() {
                    vec![]
                } else {
                    doc[s].to_vec()
                },
            }
        })
        .collect()
}

/// Trains in one process.
pub fn run<B: Backend>(be: B, cfg: TrainConfig, resume: Option<&Path>) -> Result<TrainReport> {
    run_dp(be, cfg, resume, None)
}

/// Trains as one rank of a data-parallel job when `comm` spans more than one rank: each rank
/// takes its `batch_size` rows of every global batch of `world × batch_size`, the gradients are
/// scaled so their sum over ranks is the global mean, and [`ShardedAdamW`] steps them. Every
/// rank returns the global mean loss; rank 0 alone prints, evaluates, samples and writes
/// metrics. Checkpoints are ZeRO-1 (the model once, an optimizer shard per rank); resuming
/// re-shards them for any world size, one process included. Every rank must call this with
/// the same configuration and output directory.
pub fn run_dp<B: Backend>(
    be: B,
    cfg: TrainConfig,
    resume: Option<&Path>,
    comm: Option<&mut dyn DeviceCollective<B>>,
) -> Result<TrainReport> {
    let mut cfg = cfg;
    // From here a signal (also one during the set-up) checkpoints after the next step instead of
    // quitting.
    crate::interrupt::install();
    let graceful = crate::interrupt::Graceful::enter();
    // One rank is a plain run: whole AdamW, single-process checkpoints.
    let mut comm = comm.filter(|c| c.world() > 1);
    let (rank, world) = comm.as_ref().map_or((0, 1), |c| (c.rank(), c.world()));
    let lead = rank == 0;
    cfg.validate()?;
    ensure!(
        !cfg.out.as_os_str().is_empty(),
        "no run directory: the checkpoint is not inside one's checkpoints/ (give --out DIR)"
    );
    // Absolute from here on (a resumed run's new --data too), so the checkpoints' configs
    // hold paths that work from any directory.
    cfg.absolutize()?;
    crate::optimizer::check_bucket_mb(cfg.bucket_mb)?;
    if resume.is_some() && cfg.world != world {
        // Same global batch on the new world size, so the run continues as it would have.
        let global = cfg.world.max(1) * cfg.batch_size;
        ensure!(
            global.is_multiple_of(world),
            "the checkpoint's global batch ({} ranks × {} rows) does not split over {world} ranks",
            cfg.world,
            cfg.batch_size
        );
        if lead {
            println!(
                "resuming a {}-rank run on {world}: {} rows per rank keep the global batch of {global}",
                cfg.world,
                global / world
            );
        }
        cfg.batch_size = global / world;
    }
    cfg.world = world;
    let t = cfg.seq_len;
    // A resumed run's data path comes from its checkpoint: say how to point it elsewhere.
    let data_hint = || {
        if resume.is_some() {
            "the resumed run's data (give --data to point it elsewhere)"
        } else {
            "the training data"
        }
    };
    // The tokenizer travels with the data (pretraining) or with the model (fine-tuning);
    // token-id files may come without one.
    let tokenizer_path = match (&cfg.data, resume) {
        (DataSpec::Shards(dir), _) => {
            TokenData::open(dir).with_context(data_hint)?; // the data's error before the tokenizer's
            Some(dir.join("tokenizer.json"))
        }
        (
            DataSpec::Tokens {
                tokenizer: Some(p), ..
            },
            _,
        ) => Some(p.clone()),
        (DataSpec::Tokens { path, .. }, _) => {
            let dir = if path.is_dir() {
                path.as_path()
            } else {
                path.parent().unwrap_or(Path::new("."))
            };
            Some(dir.join("tokenizer.json")).filter(|p| p.is_file())
        }
        (
            DataSpec::Sft {
                tokenizer: Some(p), ..
            },
            _,
        ) => Some(p.clone()),
        (DataSpec::Sft { .. }, Some(r)) => {
            Some(run_dir::resolve_checkpoint(r, STATE, "training")?.join("tokenizer.json"))
        }
        (DataSpec::Sft { .. }, None) => match &cfg.model {
            ModelSource::Init(dir) => Some(crate::sft::tokenizer_for(dir, None)?),
            _ => bail!("fine-tuning starts from a checkpoint: pass --init DIR"),
        },
    };
    let tok = tokenizer_path
        .as_deref()
        .map(Tokenizer::from_file)
        .transpose()?;
    ensure!(
        cfg.sample_every == 0 || tok.is_some(),
        "--sample-every needs a tokenizer to print samples: the token files have no \
         tokenizer.json beside them (pass --tokenizer)"
    );
    let token_data = match &cfg.data {
        DataSpec::Shards(dir) => Some(TokenData::open(dir).with_context(data_hint)?),
        DataSpec::Tokens { path, dtype, .. } => {
            let d = TokenData::open_ids(path, *dtype, tok.as_ref(), t).with_context(data_hint)?;
            if lead {
                println!(
                    "token files: {} training tokens in {} file(s), {} validation tokens ({}), vocabulary {}",
                    d.meta.train_tokens,
                    d.train.len(),
                    d.meta.val_tokens,
                    d.meta.val_split,
                    d.meta.vocab_size
                );
            }
            Some(d)
        }
        DataSpec::Sft { .. } => None,
    };
    let data_vocab = match (&token_data, &tok) {
        (Some(d), _) => d.meta.vocab_size,
        (None, Some(tok)) => tok.vocab_size(),
        (None, None) => unreachable!("fine-tuning has a tokenizer"),
    };
    // A resumed run with nothing left to train reports the checkpoint it resumed from.
    let mut resumed_from = None;
    let (mut model, mut opt, start_step, loader_pos) = match resume {
        None => {
            // The same seed on every rank: identical replicas.
            let mut model = build_model(be, &cfg.model, data_vocab, cfg.seed)?;
            let opt = Optim::new(&mut model, adamw_config(&cfg), comm.as_deref_mut())?;
            (model, opt, 0usize, 0u64)
        }
        Some(p) => {
            let dir = run_dir::resolve_checkpoint(p, STATE, "training")?;
            let st: TrainerState = run_dir::read_json(&dir.join(STATE))?;
            let mut model = load_model(be, &dir, Head::Lm)?;
            ensure!(
                model.cfg.vocab_size >= data_vocab,
                "checkpoint {} has vocab_size {} but the data's tokenizer has {}",
                dir.display(),
                model.cfg.vocab_size,
                data_vocab
            );
            let opt = Optim::load(
                &mut model,
                adamw_config(&cfg),
                &dir,
                &dir,
                "",
                st.adamw_step,
                comm.as_deref_mut(),
            )
            .with_context(|| format!("loading the optimizer state of {}", dir.display()))?;
            resumed_from = Some(dir);
            (model, opt, st.step, st.loader_position)
        }
    };
    ensure!(
        t <= model.cfg.max_position_embeddings,
        "--seq-len {t} exceeds the model's max_position_embeddings ({})",
        model.cfg.max_position_embeddings
    );
    model.set_recompute(cfg.recompute);
    // The activations of a micro-batch, allocated (and checked against the memory left) now,
    // before the loader fills a batch of that size.
    model
        .reserve_activations(cfg.batch_size, t)
        .with_context(|| format!("--batch-size {} x --seq-len {t}", cfg.batch_size))?;
    let (mut source, val) = match (&cfg.data, token_data) {
        (_, Some(data)) => {
            let vw = val_windows(&data, t, cfg.eval_windows)?;
            let ids: Vec<i32> = vw.iter().flat_map(|w| w.0.iter().copied()).collect();
            let tg: Vec<i32> = vw.iter().flat_map(|w| w.1.iter().copied()).collect();
            let val = chunk_rows(&ids, &tg, &[], &[], t, cfg.batch_size, usize::MAX);
            let loader = Loader::new(&data, t, cfg.seed)?;
            (Source::Shards { data, loader }, val)
        }
        (
            DataSpec::Sft {
                files,
                val_fraction,
                epochs,
                skip_bad,
                ..
            },
            None,
        ) => {
            let tok = tok.as_ref().expect("fine-tuning has a tokenizer");
            let d: SftData = crate::sft::load(files, tok, t, *val_fraction, *skip_bad)
                .with_context(data_hint)?;
            let v = &d.val;
            let val = chunk_rows(
                &v.ids,
                &v.targets,
                &v.pos,
                &v.doc,
                t,
                cfg.batch_size,
                cfg.eval_windows.max(1),
            );
            if cfg.steps == 0 {
                let rows_per_step = world * cfg.batch_size * cfg.grad_accum;
                cfg.steps = (d.train.rows() * epochs).div_ceil(rows_per_step).max(1);
            }
            if lead {
                println!(
                "sft data: {} dialogues ({} truncated to {t} tokens, {} skipped) packed into {} rows; {} validation rows; {} steps",
                d.dialogues, d.truncated, d.skipped, d.train.rows(), d.val.rows(), cfg.steps
            );
            }
            (Source::Packed(PackedSource::new(d.train, cfg.seed)), val)
        }
        (_, None) => unreachable!("token data for pretraining"),
    };
    ensure!(cfg.steps > 0, "--steps must be > 0");
    ensure!(
        cfg.warmup <= cfg.steps,
        "--warmup ({}) exceeds --steps ({})",
        cfg.warmup,
        cfg.steps
    );

    ensure!(
        start_step < cfg.steps,
        "the checkpoint is at step {start_step}, already at --steps {}",
        cfg.steps
    );
    source.set_position(loader_pos);
    std::fs::create_dir_all(&cfg.out).with_context(|| format!("creating {}", cfg.out.display()))?;
    let opened = if lead {
        let open = || -> Result<MetricsWriter> {
            run_dir::write_config(&cfg.out, &cfg)?;
            MetricsWriter::open(
                &cfg.out.join("metrics.jsonl"),
                resume.map(|_| start_step as u64),
            )
        };
        open().map(Some)
    } else {
        Ok(None)
    };
    let mut metrics = match comm.as_deref_mut() {
        // Rank 0's failure here stops every rank, not just rank 0.
        Some(c) => {
            let (ok, m) = match opened {
                Ok(m) => (Ok(()), m),
                Err(e) => (Err(e), None),
            };
            run_dir::agree(c, ok, "opening the run directory")?;
            m
        }
        None => opened?,
    };
    if lead {
        // Partial checkpoint directories of killed runs (`.step-N.tmp-PID`) are never a
        // `latest`, but they would pile up.
        let n = remove_stale_temporaries(&cfg.out.join("checkpoints"));
        if n > 0 {
            println!("removed {n} partial checkpoint write(s) left by killed runs");
        }
    }
    let ckpt = Ckpt {
        out: &cfg.out,
        keep: cfg.keep_checkpoints,
        tokenizer: tokenizer_path.as_deref(),
    };
    let sched = cfg.schedule();

    let tokens_per_step = world * cfg.batch_size * cfg.grad_accum * t;
    let bar = run_dir::progress(cfg.kind(), cfg.steps as u64, cfg.progress && lead);
    bar.set_position(start_step as u64);
    let mut micro_rows: Vec<Rows> = (0..cfg.grad_accum).map(|_| Rows::default()).collect();
    let mut logs = Vec::new();
    let mut last_ckpt = resumed_from;
    let mut interrupted = false;
    let t_start = Instant::now();
    let mut tokens_done = 0usize;
    let mut steps_done = 0usize;
    let mut skipped = 0usize;
    let mut step = start_step;
    let mut final_val = None;
    while step < cfg.steps {
        let t0 = Instant::now();
        let lr = sched.lr(step);
        let mut loss_sum = 0f64;
        let mut bad: Option<String> = None;
        // The step's rows come first: every micro-batch's gradient is scaled by the whole step's
        // target count (all ranks'), so accumulation gives the gradient of one batch of all the
        // rows. SFT rows carry different numbers of learned tokens: a mean of micro-batch means
        // would weigh each token by its micro-batch's count.
        for rows in micro_rows.iter_mut() {
            source.next_for_rank(cfg.batch_size, rank, world, rows);
        }
        let mut step_count: usize = micro_rows
            .iter()
            .map(|r| r.targets.iter().filter(|&&x| x >= 0).count())
            .sum();
        if let Some(c) = comm.as_deref_mut() {
            let mut s = [step_count as f32];
            c.all_reduce_sum(&mut s)?;
            step_count = s[0] as usize;
        }
        for (micro, rows) in micro_rows.iter().enumerate() {
            model.forward(&rows.batch(t))?;
            let (mut loss, mut count) = model.lm_loss(&rows.targets)?;
            if let Some(c) = comm.as_deref_mut() {
                // The global mean and count: the logged loss is the global one, and a
                // non-finite loss anywhere is seen (and handled) on every rank.
                let mut s = [(loss as f64 * count as f64) as f32, count as f32];
                c.all_reduce_sum(&mut s)?;
                (loss, count) = (s[0] / s[1].max(1.0), s[1] as usize);
            }
            if !loss.is_finite() {
                let host = model.params_to_host()?;
                bad = Some(match model.table.first_nonfinite(&host) {
                    Some(name) => {
                        format!("loss is {loss}; parameter {name} holds non-finite values")
                    }
                    None => {
                        format!("loss is {loss} (the logits overflowed; parameters are finite)")
                    }
                });
                break;
            }
            loss_sum += loss as f64 * count as f64;
            // The last micro-batch's backward reduces finished buckets as it goes.
            let mut sink = if micro + 1 == cfg.grad_accum {
                opt.overlap(comm.as_deref_mut(), cfg.bucket_mb)
            } else {
                None
            };
            let scale = 1.0 / step_count.max(1) as f32;
            model.backward_lm_with(scale, as_sink(&mut sink))?;
        }
        let loss = (loss_sum / step_count.max(1) as f64) as f32;
        let stats = match bad {
            Some(b) => Err(b),
            None => match opt.step(&mut model, comm.as_deref_mut(), lr) {
                Ok(s) => Ok(s),
                Err(engine::Error::NonFinite(m)) => Err(nonfinite_grads(&model, &m)?),
                Err(e) => return Err(e.into()),
            },
        };
        model.zero_grads()?;
        let stats = match stats {
            Ok(s) => Some(s),
            Err(msg) if cfg.skip_nonfinite => {
                if let Some(mw) = metrics.as_mut() {
                    say(
                        &bar,
                        format!("step {}: {msg}: skipped (--skip-nonfinite)", step + 1),
                    );
                    mw.write(&serde_json::json!({"step": step + 1, "skipped": msg}))?;
                }
                skipped += 1;
                None
            }
            Err(msg) => bail!(
                "step {}: {msg} (pass --skip-nonfinite to skip such steps)",
                step + 1
            ),
        };
        step += 1;
        // A skipped step goes on to the interrupt and checkpoint decisions below.
        let mut lead_work = Ok(());
        if let Some(stats) = stats {
            steps_done += 1;
            let dt = t0.elapsed().as_secs_f64();
            tokens_done += tokens_per_step;
            let tok_s = tokens_per_step as f64 / dt;
            let mut val_loss = None;
            // Rank 0's own work (evaluation, metrics, samples); its error is raised below on
            // every rank, so the others do not wait for it in the next collective.
            lead_work = if lead {
                let mut lead_step = || -> Result<()> {
                    if (cfg.eval_every > 0 && step % cfg.eval_every == 0) || step == cfg.steps {
                        val_loss = Some(evaluate(&mut model, &val, t)?);
                        final_val = val_loss;
                    }
                    let mut rec = serde_json::json!({
                        "step": step, "lr": lr, "loss": loss, "grad_norm": stats.grad_norm,
                        "tok_per_s": tok_s, "tokens": step * tokens_per_step, "elapsed_s": t_start.elapsed().as_secs_f64(),
                    });
                    if let Some(v) = val_loss {
                        rec["val_loss"] = v.into();
                    }
                    let mw = metrics.as_mut().expect("rank 0 writes metrics");
                    mw.write(&rec)?;
                    bar.set_position(step as u64);
                    bar.set_message(format!(
                        "loss {loss:.4}{} | lr {lr:.2e} | {:.0} tok/s",
                        final_val
                            .map(|v| format!(" val {v:.4}"))
                            .unwrap_or_default(),
                        tok_s
                    ));
                    // Without a bar (a log file, a pipe), a plain line per interval and
                    // evaluation, so a run that is logged to a file does not look dead.
                    if bar.is_hidden()
                        && (val_loss.is_some()
                            || step == cfg.steps
                            || (cfg.log_every > 0 && step % cfg.log_every == 0))
                    {
                        let val = val_loss
                            .map(|v| format!(", val loss {v:.4}"))
                            .unwrap_or_default();
                        let (gn, secs) = (stats.grad_norm, t_start.elapsed().as_secs_f64());
                        println!(
                            "step {step}/{}: loss {loss:.4}{val} | lr {lr:.2e} | grad norm \
                             {gn:.3} | {tok_s:.0} tok/s | {secs:.0} s",
                            cfg.steps
                        );
                    }
                    if cfg.sample_every > 0 && step % cfg.sample_every == 0 {
                        let tok = tok
                            .as_ref()
                            .expect("--sample-every has a tokenizer (checked)");
                        let params = SamplingParams {
                            temperature: 0.8,
                            top_k: 40,
                            max_new_tokens: cfg.sample_tokens,
                            seed: cfg.seed ^ step as u64,
                            stop: vec![tok.eos],
                            ..Default::default()
                        };
                        let out = generate(&mut model, &[vec![tok.eos]], &params, &mut |_, _| {})?;
                        let text = tok.decode(&out[0].tokens)?;
                        say(&bar, format!("--- sample at step {step} ---\n{text}\n---"));
                        mw.write(&serde_json::json!({"step": step, "sample": text}))?;
                    }
                    Ok(())
                };
                lead_step()
            } else {
                Ok(())
            };
            logs.push(StepLog {
                step,
                lr,
                loss,
                grad_norm: stats.grad_norm,
                val_loss,
            });
        }
        interrupted = crate::interrupt::take();
        match comm.as_deref_mut() {
            // Ranks stop (and checkpoint) together when any rank was interrupted.
            Some(c) => {
                let mut flags = [f32::from(u8::from(interrupted)), 0.0];
                flags[1] = f32::from(u8::from(lead_work.is_err()));
                c.all_reduce_sum(&mut flags)?;
                lead_work?;
                ensure!(flags[1] == 0.0, "step {step}: rank 0 failed");
                interrupted = flags[0] > 0.0;
            }
            None => lead_work?,
        }
        let stop_now = cfg.stop_after.is_some_and(|k| steps_done >= k);
        // Nothing trained yet in this invocation (every step skipped): nothing new to save.
        if steps_done > 0
            && ((cfg.ckpt_every > 0 && step % cfg.ckpt_every == 0)
                || step == cfg.steps
                || interrupted
                || stop_now)
        {
            let state = TrainerState {
                kind: cfg.kind().into(),
                step,
                loader_position: source.position(),
                adamw_step: opt.steps(),
                seed: cfg.seed,
                config: cfg.clone(),
            };
            last_ckpt = Some(match (&opt, comm.as_deref_mut()) {
                (Optim::Sharded(o), Some(c)) => ckpt.save_sharded(&model, o, c, &state)?,
                (Optim::Whole(o), _) => ckpt.save(&model, o, &state)?,
                (Optim::Sharded(_), None) => unreachable!("a sharded optimizer has a communicator"),
            });
        }
        if interrupted || stop_now {
            interrupted = true;
            break;
        }
    }
    drop(graceful);
    bar.finish_and_clear();
    ensure!(
        steps_done > 0 || skipped == 0,
        "every step run was non-finite and skipped ({skipped} under --skip-nonfinite): nothing \
         was trained and no checkpoint was written (metrics.jsonl names each step's cause)"
    );
    if !lead {
    } else if let Ok(s) = read_series(
        &cfg.out.join("metrics.jsonl"),
        "step",
        &["loss", "val_loss"],
    ) {
        line_plot(
            &cfg.out.join("loss.svg"),
            "pretraining loss",
            "step",
            "cross-entropy (nats/token)",
            &[("train", &s[0]), ("validation", &s[1])],
        )?;
    }
    Ok(TrainReport {
        steps_done,
        last_step: step,
        logs,
        final_val_loss: final_val,
        tokens_per_s: tokens_done as f64 / t_start.elapsed().as_secs_f64().max(1e-9),
        checkpoint: last_ckpt,
        interrupted,
    })
}

fn adamw_config(cfg: &TrainConfig) -> AdamWConfig {
    AdamWConfig {
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.eps,
        weight_decay: cfg.weight_decay,
        clip_norm: (cfg.clip > 0.0).then_some(cfg.clip),
        ..AdamWConfig::default()
    }
}

/// The configuration a resumed run continues with: the checkpoint's own, with `steps`
/// optionally extended (a longer schedule changes the cosine, so the run is no longer
/// identical), writing into the run directory the checkpoint is in (not the `out` it was
/// started with: a run directory moved or copied continues where it now is); `out` is empty
/// when the checkpoint is not in a run's `checkpoints/`.
pub fn resume_config(path: &Path, steps: Option<usize>) -> Result<TrainConfig> {
    let dir = run_dir::resolve_checkpoint(path, STATE, "training")?;
    let state_path = dir.join(STATE);
    let st: TrainerState = run_dir::read_json(&state_path)?;
    ensure!(
        st.kind == "pretrain" || st.kind == "sft",
        "{}: a `{}` checkpoint, not a pretraining or SFT one",
        state_path.display(),
        st.kind
    );
    let mut cfg = st.config;
    cfg.stop_after = None;
    // Empty for a checkpoint outside a run directory: the caller must then say where.
    cfg.out = run_dir::run_dir_of(&dir).unwrap_or_default();
    if let Some(s) = steps {
        cfg.steps = s;
        cfg.warmup = cfg.warmup.min(s);
    }
    Ok(cfg)
}
