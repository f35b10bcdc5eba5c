//! Supervised fine-tuning, as the Llama 2 paper does it: dialogues rendered with the chat
//! template, packed back to back to fill the sequence length, the loss only on assistant tokens,
//! and no attention across the documents of a pack (per-document positions and masks). The
//! stage ([`run`], [`SftConfig`]) is the fine-tune every later stage that learns from dialogues
//! uses too: rejection sampling on its pool, Ghost Attention and context distillation on theirs.
//!
//! Rows are read by [`crate::formats`] (messages, prompt/completion, pairs' chosen answers, HH
//! transcripts).

use crate::lm_train::{DataSpec, TrainConfig, TrainReport};
use anyhow::{ensure, Result};
use engine::tokenizer::{Message, Tokenizer};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A dialogue to learn from. `last_turn_only` (JSONL `"learn": "last"`) zeroes the loss on every
/// earlier turn, assistant turns included: Ghost Attention's synthetic dialogues need it.
#[derive(Clone, Debug, PartialEq)]
pub struct Dialogue {
    pub messages: Vec<Message>,
    pub last_turn_only: bool,
}

/// One tokenized dialogue: ids and which of them are learned (assistant tokens).
#[derive(Clone, Debug)]
pub struct Doc {
    pub ids: Vec<u32>,
    pub learn: Vec<bool>,
}

/// Tokenizes dialogues with the chat template; dialogues longer than `max_len` are cut (their
/// count is returned) and ones left with nothing to learn are dropped.
pub fn tokenize(
    tok: &Tokenizer,
    dialogues: &[Dialogue],
    max_len: usize,
) -> Result<(Vec<Doc>, usize)> {
    let docs: Vec<Result<Option<(Doc, bool)>>> = dialogues
        .par_iter()
        .map(|d| {
            let (mut ids, mut learn) = tok.chat(&d.messages)?;
            if d.last_turn_only {
                // Keep only the final run of learned tokens (the last assistant answer).
                if let Some(end) = learn.iter().rposition(|&l| l) {
                    let start = learn[..end].iter().rposition(|&l| !l).map_or(0, |i| i + 1);
                    learn
                        .iter_mut()
                        .enumerate()
                        .for_each(|(i, l)| *l = *l && i >= start);
                }
            }
            let cut = ids.len() > max_len;
            ids.truncate(max_len);
            learn.truncate(max_len);
            Ok(learn
                .iter()
                .skip(1)
                .any(|&l| l)
                .then_some((Doc { ids, learn }, cut)))
        })
        .collect();
    let mut out = Vec::new();
    let mut cut = 0;
    for d in docs {
        if let Some((d, c)) = d? {
            cut += usize::from(c);
            out.push(d);
        }
    }
    Ok((out, cut))
}

/// Packed rows of `seq_len` tokens: ids, shifted targets (-100 where not learned), per-token
/// positions (restarting in every document) and document ids (-1 on padding).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Packed {
    pub seq_len: usize,
    pub ids: Vec<i32>,
    pub targets: Vec<i32>,
    pub pos: Vec<i32>,
    pub doc: Vec<i32>,
}

impl Packed {
    pub fn rows(&self) -> usize {
        self.ids.len() / self.seq_len.max(1)
    }
}

/// Greedy packing in order: a document goes into the current row if it fits, else starts the
/// next. Token t's target is token t+1 of the same document when that token is learned.
pub fn pack(docs: &[Doc], seq_len: usize, pad: u32) -> Packed {
    let mut p = Packed {
        seq_len,
        ..Default::default()
    };
    let mut row_len = 0usize;
    let mut doc_in_row = 0i32;
    let close_row = |p: &mut Packed, row_len: &mut usize| {
        while *row_len < seq_len {
            p.ids.push(pad as i32);
            p.targets.push(-100);
            p.pos.push(0);
            p.doc.push(-1);
            *row_len += 1;
        }
        *row_len = 0;
    };
    for d in docs {
        let n = d.ids.len().min(seq_len);
        if row_len + n > seq_len {
            close_row(&mut p, &mut row_len);
            doc_in_row = 0;
        }
        for i in 0..n {
            p.ids.push(d.ids[i] as i32);
            p.targets.push(if i + 1 < n && d.learn[i + 1] {
                d.ids[i + 1] as i32
            } else {
                -100
            });
            p.pos.push(i as i32);
            p.doc.push(doc_in_row);
        }
        doc_in_row += 1;
        row_len += n;
    }
    if row_len > 0 {
        close_row(&mut p, &mut row_len);
    }
    p
}

/// The SFT batch source: packed rows, reshuffled every epoch; row k of the stream is a pure
/// function of (seed, k), so the position is the whole state.
pub struct PackedSource {
    pub packed: Packed,
    seed: u64,
    pub position: u64,
}

fn permutation(n: usize, seed: u64) -> Vec<usize> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut v: Vec<usize> = (0..n).collect();
    v.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    v
}

impl PackedSource {
    pub fn new(packed: Packed, seed: u64) -> Self {
        PackedSource {
            packed,
            seed,
            position: 0,
        }
    }

    /// Appends the next `b` rows to the four buffers.
    pub fn next_batch(
        &mut self,
        b: usize,
        ids: &mut Vec<i32>,
        tg: &mut Vec<i32>,
        pos: &mut Vec<i32>,
        doc: &mut Vec<i32>,
    ) {
        let (n, t) = (self.packed.rows(), self.packed.seq_len);
        let mut perm_epoch = u64::MAX;
        let mut perm = Vec::new();
        for _ in 0..b {
            let epoch = self.position / n as u64;
            if epoch != perm_epoch {
                perm = permutation(n, self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                perm_epoch = epoch;
            }
            let r = perm[(self.position % n as u64) as usize];
            self.position += 1;
            let s = r * t..(r + 1) * t;
            ids.extend_from_slice(&self.packed.ids[s.clone()]);
            tg.extend_from_slice(&self.packed.targets[s.clone()]);
            pos.extend_from_slice(&self.packed.pos[s.clone()]);
            doc.extend_from_slice(&self.packed.doc[s]);
        }
    }
}

/// SFT data as the training loop uses it: packed training rows and validation rows.
pub struct SftData {
    pub train: Packed,
    pub val: Packed,
    pub dialogues: usize,
    pub truncated: usize,
    pub skipped: usize,
}

/// Reads, tokenizes, splits (every k-th dialogue to validation) and packs.
pub fn load(
    files: &[PathBuf],
    tok: &Tokenizer,
    seq_len: usize,
    val_fraction: f64,
    skip_bad: bool,
) -> Result<SftData> {
    let (dialogues, skipped) = crate::formats::read_dialogues(files, skip_bad)?;
    let (docs, truncated) = tokenize(tok, &dialogues, seq_len)?;
    ensure!(
        !docs.is_empty(),
        "no dialogue has an assistant token within --seq-len {seq_len}"
    );
    let every = if val_fraction > 0.0 {
        (1.0 / val_fraction).round().max(2.0) as usize
    } else {
        usize::MAX
    };
    let (mut tr, mut va) = (Vec::new(), Vec::new());
    for (i, d) in docs.into_iter().enumerate() {
        if every != usize::MAX && i % every == every - 1 {
            va.push(d);
        } else {
            tr.push(d);
        }
    }
    if va.is_empty() {
        va.push(tr.last().cloned().expect("non-empty"));
    }
    Ok(SftData {
        train: pack(&tr, seq_len, tok.eos),
        val: pack(&va, seq_len, tok.eos),
        dialogues: dialogues.len(),
        truncated,
        skipped,
    })
}

/// The tokenizer a fine-tuning run uses: the checkpoint's own unless one is given.
pub fn tokenizer_for(model_dir: &Path, explicit: Option<&Path>) -> Result<PathBuf> {
    ensure!(
        model_dir.is_dir(),
        "{}: no such checkpoint directory",
        model_dir.display()
    );
    let p = explicit
        .map(Path::to_path_buf)
        .unwrap_or_else(|| model_dir.join("tokenizer.json"));
    ensure!(
        p.is_file(),
        "{}: no tokenizer (pass --tokenizer)",
        p.display()
    );
    Ok(p)
}

// ---------------------------------------------------------------------------------------------
// The stage

/// A fine-tune from `init` on dialogue files, with the paper's SFT settings unless overridden.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftConfig {
    /// The checkpoint to start from (or a training run directory: its latest checkpoint).
    pub init: PathBuf,
    pub data: Vec<PathBuf>,
    pub out: PathBuf,
    pub epochs: usize,
    pub lr: f32,
    pub warmup: usize,
    pub seq_len: usize,
    /// Sequences per forward.
    pub batch_size: usize,
    /// Forwards accumulated per optimizer step (`sft --batch-tokens` = batch_size × seq_len ×
    /// grad_accum): the gradient of one batch that large.
    pub grad_accum: usize,
    /// Every k-th dialogue (k = 1/fraction) is held out for the validation loss.
    pub val_fraction: f64,
    pub seed: u64,
    pub progress: bool,
}

impl SftConfig {
    /// The paper's SFT settings for the size of `init` (`paper::for_checkpoint`): cosine from
    /// 2e-5, two epochs; sequences of 256 tokens, 8 a step (what a CPU fits; the paper packs 64
    /// of 4096).
    pub fn new(init: PathBuf, data: Vec<PathBuf>, out: PathBuf) -> Self {
        let p = crate::paper::for_checkpoint(&init);
        SftConfig {
            init,
            data,
            out,
            epochs: p.sft_epochs,
            lr: p.sft_lr,
            warmup: 0,
            seq_len: 256,
            batch_size: 8,
            grad_accum: 1,
            val_fraction: 0.05,
            seed: 1337,
            progress: true,
        }
    }

    /// The training loop's configuration for this fine-tune.
    pub fn train_config(&self) -> Result<TrainConfig> {
        let init = crate::run_dir::model_dir(&self.init)?;
        let mut c = TrainConfig::sft_defaults(self.data.clone(), self.out.clone(), init);
        if let DataSpec::Sft {
            epochs,
            val_fraction,
            ..
        } = &mut c.data
        {
            *epochs = self.epochs;
            *val_fraction = self.val_fraction;
        }
        c.lr = self.lr;
        c.warmup = self.warmup;
        c.seq_len = self.seq_len;
        c.batch_size = self.batch_size;
        c.grad_accum = self.grad_accum;
        c.seed = self.seed;
        c.progress = self.progress;
        Ok(c)
    }
}

/// `sft`: fine-tunes and returns the loop's report (its `checkpoint` is the model).
pub fn run<B: engine::Backend>(be: B, cfg: &SftConfig) -> Result<TrainReport> {
    run_resuming(be, cfg, None)
}

/// [`run`], continuing from the run directory or checkpoint `resume` (the same settings).
pub fn run_resuming<B: engine::Backend>(
    be: B,
    cfg: &SftConfig,
    resume: Option<&std::path::Path>,
) -> Result<TrainReport> {
    let rep = crate::lm_train::run(be, cfg.train_config()?, resume)?;
    ensure!(
        rep.checkpoint.is_some(),
        "the fine-tune in {} saved no checkpoint",
        cfg.out.display()
    );
    Ok(rep)
}
