//! Reward models, as section 3.2.2 of the Llama 2 paper trains them: the chat model's transformer
//! with its language-model head replaced by a scalar head read at the last token of
//! (prompt, response), trained on preference pairs with the binary ranking loss
//! −log σ(r_chosen − r_rejected − m(rating)). Two of them, helpfulness and safety, are trained
//! separately; their scores feed rejection sampling and PPO.
//!
//! Checkpoints are Hugging Face's `LlamaForSequenceClassification` (`num_labels` 1,
//! `score.weight` [1, H]), so `transformers` loads what we write and we load what it writes.
//!
//! Pairs are read by [`crate::formats::read_pairs`]: TRL's preference shapes (explicit or implicit
//! prompt, text or messages), HH transcripts, with the paper's `rating`, `chosen_safe`,
//! `rejected_safe` and `is_safety`/`category`.

use crate::formats::check_prompt;
use crate::plot::{histogram_plot, line_plot, read_series};
use crate::run_dir::{say, MetricsWriter};
use crate::schedule::Cosine;
use anyhow::{bail, ensure, Context, Result};
use engine::check::ranking_loss;
use engine::checkpoint::{load_model, load_weights, save_model, SaveOptions, TensorFiles};
use engine::optim::{AdamW, AdamWConfig};
use engine::tokenizer::{Message, Tokenizer};
use engine::{Backend, Batch, Head, Llama, LlamaConfig};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

// ---------------------------------------------------------------------------------------------
// Ratings, margins, kinds

/// How much better the chosen response is, the paper's four-point preference scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Rating {
    #[serde(rename = "significantly better")]
    Significantly,
    #[serde(rename = "better")]
    Better,
    #[serde(rename = "slightly better")]
    Slightly,
    #[serde(rename = "negligibly better/unsure")]
    Negligibly,
}

impl Rating {
    /// Strongest preference first, the column order of the paper's Table 8.
    pub const ALL: [Rating; 4] = [
        Rating::Significantly,
        Rating::Better,
        Rating::Slightly,
        Rating::Negligibly,
    ];

    /// The annotation string, as written in data files.
    pub fn label(self) -> &'static str {
        match self {
            Rating::Significantly => "significantly better",
            Rating::Better => "better",
            Rating::Slightly => "slightly better",
            Rating::Negligibly => "negligibly better/unsure",
        }
    }

    /// The column title in reports (the paper's wording).
    pub fn title(self) -> &'static str {
        match self {
            Rating::Significantly => "Significantly Better",
            Rating::Better => "Better",
            Rating::Slightly => "Slightly Better",
            Rating::Negligibly => "Negligibly Better / Unsure",
        }
    }
}

impl std::str::FromStr for Rating {
    type Err = anyhow::Error;
    /// Case, `_`/`-` for spaces, and spacing around `/` do not matter; "negligibly better" and
    /// "unsure" alone are the last level too.
    fn from_str(s: &str) -> Result<Self> {
        let norm = s.trim().to_lowercase().replace(['_', '-'], " ");
        let norm = norm.split_whitespace().collect::<Vec<_>>().join(" ");
        let norm = norm
            .replace(" / ", "/")
            .replace(" /", "/")
            .replace("/ ", "/");
        Ok(match norm.as_str() {
            "significantly better" => Rating::Significantly,
            "better" => Rating::Better,
            "slightly better" => Rating::Slightly,
            "negligibly better/unsure" | "negligibly better" | "unsure" => Rating::Negligibly,
            _ => bail!(
                "unknown rating `{s}` (expected one of: significantly better, better, slightly better, negligibly better/unsure)"
            ),
        })
    }
}

/// The margin m(rating) subtracted inside the ranking loss (the paper's Table 27): a pair the
/// annotator found clearly separated must be scored further apart.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MarginKind {
    #[default]
    None,
    /// {1, 2/3, 1/3, 0}.
    Small,
    /// {3, 2, 1, 0}.
    Large,
}

impl MarginKind {
    /// m(rating); an unknown rating gets 0, like "negligibly better/unsure".
    pub fn margin(self, rating: Option<Rating>) -> f32 {
        let level = match rating {
            Some(Rating::Significantly) => 3.0,
            Some(Rating::Better) => 2.0,
            Some(Rating::Slightly) => 1.0,
            Some(Rating::Negligibly) | None => 0.0,
        };
        match self {
            MarginKind::None => 0.0,
            MarginKind::Small => level / 3.0,
            MarginKind::Large => level,
        }
    }
}

impl std::str::FromStr for MarginKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.trim().to_lowercase().as_str() {
            "none" | "0" => MarginKind::None,
            "small" => MarginKind::Small,
            "large" => MarginKind::Large,
            _ => bail!("unknown margin `{s}` (expected none, small or large)"),
        })
    }
}

/// Which reward model: the paper trains one for helpfulness and one for safety, each on its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RmKind {
    #[serde(rename = "helpfulness")]
    Helpfulness,
    #[serde(rename = "safety")]
    Safety,
}

impl RmKind {
    pub fn name(self) -> &'static str {
        match self {
            RmKind::Helpfulness => "helpfulness",
            RmKind::Safety => "safety",
        }
    }
}

impl std::str::FromStr for RmKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.trim().to_lowercase().as_str() {
            "helpfulness" | "helpful" => RmKind::Helpfulness,
            "safety" | "safe" => RmKind::Safety,
            _ => bail!("unknown reward model kind `{s}` (expected helpfulness or safety)"),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Data

/// One preference pair: two responses to the same prompt, `chosen` preferred.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pair {
    /// The dialogue so far, ending with a user turn.
    pub prompt: Vec<Message>,
    pub chosen: String,
    pub rejected: String,
    /// `None`: not annotated (margin 0; reported as "unknown").
    pub rating: Option<Rating>,
    pub chosen_safe: Option<bool>,
    pub rejected_safe: Option<bool>,
    /// Which reward model the pair is for; `None`: both.
    pub category: Option<RmKind>,
    /// Where the pair came from (`file:line`), for messages.
    pub origin: String,
}

impl Pair {
    /// A single-turn pair with no metadata.
    pub fn new(prompt: &str, chosen: &str, rejected: &str) -> Self {
        Pair {
            prompt: vec![Message::new("user", prompt)],
            chosen: chosen.into(),
            rejected: rejected.into(),
            rating: None,
            chosen_safe: None,
            rejected_safe: None,
            category: None,
            origin: String::new(),
        }
    }
}

/// The pairs one reward model trains on, and what was set aside.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    pub pairs: Vec<Pair>,
    /// The other reward model's pairs (for mixing, as the paper's data mix does).
    pub others: Vec<Pair>,
    /// Pairs whose `category` is the other reward model's.
    pub other_category: usize,
    /// Safety RM only: pairs with an unsafe chosen and a safe rejected response, which the paper
    /// leaves out ("safer responses will also be better/preferred by humans").
    pub unsafe_chosen: usize,
}

/// Keeps the pairs for `kind`: its category or none, and for safety the paper's metadata rule.
pub fn select_pairs(pairs: Vec<Pair>, kind: RmKind) -> Selection {
    let mut s = Selection::default();
    for p in pairs {
        if kind == RmKind::Safety && p.chosen_safe == Some(false) && p.rejected_safe == Some(true) {
            s.unsafe_chosen += 1;
        } else if p.category.is_some_and(|c| c != kind) {
            s.other_category += 1;
            s.others.push(p);
        } else {
            s.pairs.push(p);
        }
    }
    s
}

/// Every k-th of `others`, about `ratio` × `own` of them: the other reward model's pairs mixed
/// in (the paper trains the safety RM on safety data mixed 90/10 with helpfulness data, and the
/// helpfulness RM on helpfulness data with equal parts of the rest).
pub fn mix_in(others: Vec<Pair>, own: usize, ratio: f64) -> Vec<Pair> {
    let want = ((own as f64 * ratio).round() as usize).min(others.len());
    if want == 0 {
        return vec![];
    }
    let every = others.len() as f64 / want as f64;
    (0..want)
        .map(|i| others[(i as f64 * every) as usize].clone())
        .collect()
}

/// Splits off every k-th pair (k = 1/fraction) as the held-out set; fraction 0 holds none out.
pub fn split_pairs(pairs: Vec<Pair>, val_fraction: f64) -> (Vec<Pair>, Vec<Pair>) {
    if val_fraction.is_nan() || val_fraction <= 0.0 || pairs.len() < 2 {
        return (pairs, Vec::new());
    }
    let every = (1.0 / val_fraction).round().max(2.0) as usize;
    let (mut tr, mut va) = (Vec::new(), Vec::new());
    for (i, p) in pairs.into_iter().enumerate() {
        if i % every == every - 1 {
            va.push(p);
        } else {
            tr.push(p);
        }
    }
    if va.is_empty() {
        va.push(tr.pop().expect("at least two pairs"));
    }
    (tr, va)
}

// ---------------------------------------------------------------------------------------------
// Tokenization and batches

/// Ids of `prompt` followed by the assistant's `response`, in the chat template; the last id is
/// the EOS closing the response, where the score is read. Longer than `seq_len`: cut from the
/// left (the prompt goes first; BOS is kept) so the scored response survives. Returns whether
/// it was cut.
pub fn encode_response(
    tok: &Tokenizer,
    prompt: &[Message],
    response: &str,
    seq_len: usize,
) -> Result<(Vec<u32>, bool)> {
    ensure!(seq_len >= 2, "seq_len must be at least 2");
    let mut msgs = prompt.to_vec();
    msgs.push(Message::new("assistant", response));
    let (ids, _) = tok.chat(&msgs)?;
    if ids.len() <= seq_len {
        return Ok((ids, false));
    }
    let mut cut = Vec::with_capacity(seq_len);
    cut.push(tok.bos);
    cut.extend_from_slice(&ids[ids.len() - (seq_len - 1)..]);
    Ok((cut, true))
}

/// A tokenized pair, ready to batch.
#[derive(Clone, Debug, PartialEq)]
pub struct TokPair {
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    pub margin: f32,
    pub rating: Option<Rating>,
    /// The safety meta-labels of the two responses, where annotated.
    pub safe: [Option<bool>; 2],
}

/// Tokenizes pairs in parallel; returns them and how many sequences were cut to `seq_len`.
pub fn tokenize_pairs(
    tok: &Tokenizer,
    pairs: &[Pair],
    seq_len: usize,
    margin: MarginKind,
) -> Result<(Vec<TokPair>, usize)> {
    let out: Vec<Result<(TokPair, usize)>> = pairs
        .par_iter()
        .map(|p| {
            let ctx = || format!("pair {}", p.origin);
            let (c, cc) = encode_response(tok, &p.prompt, &p.chosen, seq_len).with_context(ctx)?;
            let (r, rc) =
                encode_response(tok, &p.prompt, &p.rejected, seq_len).with_context(ctx)?;
            Ok((
                TokPair {
                    chosen: c,
                    rejected: r,
                    margin: margin.margin(p.rating),
                    rating: p.rating,
                    safe: [p.chosen_safe, p.rejected_safe],
                },
                usize::from(cc) + usize::from(rc),
            ))
        })
        .collect();
    let mut pairs_out = Vec::with_capacity(out.len());
    let mut cut = 0;
    for r in out {
        let (p, c) = r?;
        cut += c;
        pairs_out.push(p);
    }
    Ok((pairs_out, cut))
}

/// b pairs as 2b rows (chosen rows, then rejected rows) padded to the longest, so chosen and
/// rejected go through one forward as the paper trains them. Padding follows the scored token,
/// and attention is causal, so it never changes a score.
#[derive(Clone, Debug, Default)]
pub struct PairBatch {
    pub ids: Vec<i32>,
    /// Pairs (the forward runs 2·pairs rows).
    pub pairs: usize,
    pub t: usize,
    /// Flat row of each sequence's last token: chosen ones, then rejected ones.
    pub rows: Vec<i32>,
    pub margins: Vec<f32>,
    /// Per row (chosen rows, then rejected rows): 1 safe, 0 unsafe, NaN not annotated.
    pub safe: Vec<f32>,
    /// Weight of the calibration term (see [`forward_backward`]); 0: the ranking loss alone.
    pub calibration: f32,
}

impl PairBatch {
    pub fn new(pairs: &[&TokPair], pad: u32) -> Self {
        let seqs: Vec<&[u32]> = pairs
            .iter()
            .map(|p| p.chosen.as_slice())
            .chain(pairs.iter().map(|p| p.rejected.as_slice()))
            .collect();
        let (ids, t, rows) = pad_rows(&seqs, pad);
        let label = |x: Option<bool>| x.map_or(f32::NAN, |b| if b { 1.0 } else { 0.0 });
        PairBatch {
            ids,
            pairs: pairs.len(),
            t,
            rows,
            margins: pairs.iter().map(|p| p.margin).collect(),
            safe: pairs
                .iter()
                .map(|p| label(p.safe[0]))
                .chain(pairs.iter().map(|p| label(p.safe[1])))
                .collect(),
            calibration: 0.0,
        }
    }

    pub fn batch(&self) -> Batch<'_> {
        Batch::new(&self.ids, 2 * self.pairs, self.t)
    }
}

/// Rows padded to the longest with `pad`, and the flat index of each row's last real token.
fn pad_rows(seqs: &[&[u32]], pad: u32) -> (Vec<i32>, usize, Vec<i32>) {
    let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
    let mut ids = Vec::with_capacity(seqs.len() * t);
    let mut rows = Vec::with_capacity(seqs.len());
    for (i, s) in seqs.iter().enumerate() {
        ids.extend(s.iter().map(|&x| x as i32));
        ids.extend(std::iter::repeat_n(pad as i32, t - s.len()));
        rows.push((i * t + s.len().max(1) - 1) as i32);
    }
    (ids, t, rows)
}

/// What one forward/backward of a pair batch gave.
#[derive(Clone, Debug)]
pub struct BatchOut {
    /// Mean ranking loss over the batch's pairs (unscaled).
    pub loss: f32,
    pub chosen: Vec<f32>,
    pub rejected: Vec<f32>,
}

impl BatchOut {
    /// Pairs scored the right way round.
    pub fn correct(&self) -> usize {
        self.chosen
            .iter()
            .zip(&self.rejected)
            .filter(|(c, r)| c > r)
            .count()
    }
}

/// Forward, ranking loss and backward of `scale` · loss; gradients accumulate into the model's
/// (scale = micro-batch pairs / step pairs makes accumulation give the step's mean).
pub fn forward_backward<B: Backend>(
    model: &mut Llama<B>,
    batch: &PairBatch,
    scale: f32,
) -> Result<BatchOut> {
    model.forward(&batch.batch())?;
    let r = model.scores(&batch.rows)?;
    let (rc, rr) = r.split_at(batch.pairs);
    let (loss, dz) = ranking_loss(rc, rr, &batch.margins);
    // d loss / d r_rejected is the negative of d loss / d r_chosen.
    let mut d: Vec<f32> = dz
        .iter()
        .map(|x| x * scale)
        .chain(dz.iter().map(|x| -x * scale))
        .collect();
    // The ranking loss fixes score differences only; the piecewise reward reads σ(R_s) against
    // an absolute threshold (0.15), so the safety model also learns σ(r) ≈ P(safe) from the
    // meta-labels: calibration · mean over pairs of Σ BCE(σ(r), safe).
    if batch.calibration > 0.0 {
        let per = batch.calibration * scale / batch.pairs.max(1) as f32;
        for ((di, &ri), &y) in d.iter_mut().zip(r.iter()).zip(&batch.safe) {
            if !y.is_nan() {
                *di += per * (1.0 / (1.0 + (-ri).exp()) - y);
            }
        }
    }
    let out = BatchOut {
        loss,
        chosen: rc.to_vec(),
        rejected: rr.to_vec(),
    };
    if loss.is_finite() {
        model.backward_scores(&d)?;
    }
    Ok(out)
}

/// Scores of token sequences, `rows` per forward. Sequences are batched by length so padding
/// stays small; the scores come back in the input order.
pub fn score_sequences<B: Backend>(
    model: &mut Llama<B>,
    seqs: &[&[u32]],
    rows: usize,
    pad: u32,
) -> Result<Vec<f32>> {
    ensure!(rows > 0, "rows per batch must be > 0");
    ensure!(
        seqs.iter().all(|s| !s.is_empty()),
        "an empty sequence has no token to score"
    );
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].len()));
    let mut out = vec![0f32; seqs.len()];
    for chunk in order.chunks(rows) {
        let batch: Vec<&[u32]> = chunk.iter().map(|&i| seqs[i]).collect();
        let (ids, t, score_rows) = pad_rows(&batch, pad);
        model.forward(&Batch::new(&ids, batch.len(), t))?;
        let s = model.scores(&score_rows)?;
        for (&i, v) in chunk.iter().zip(s) {
            out[i] = v;
        }
    }
    Ok(out)
}

/// Reward scores of (prompt, response) rows, `batch` rows per forward: what rejection sampling
/// and PPO consume. A row longer than `seq_len` is cut from the left, as in training.
pub fn score<B: Backend>(
    model: &mut Llama<B>,
    tok: &Tokenizer,
    rows: &[(Vec<Message>, String)],
    seq_len: usize,
    batch: usize,
) -> Result<Vec<f32>> {
    let seqs: Vec<Vec<u32>> = rows
        .par_iter()
        .enumerate()
        .map(|(i, (p, r))| {
            check_prompt(p).with_context(|| format!("row {i}"))?;
            Ok(encode_response(tok, p, r, seq_len)?.0)
        })
        .collect::<Result<_>>()?;
    let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
    score_sequences(model, &refs, batch, tok.eos)
}

// ---------------------------------------------------------------------------------------------
// Model

/// The paper's peak learning rate for the model's size: 5e-6 for the 70B, 1e-5 otherwise.
pub fn default_lr(cfg: &LlamaConfig) -> f32 {
    crate::paper::for_model(cfg).rm_lr
}

/// A reward model to train from checkpoint `dir`: a score model loads whole (continued
/// training); a causal-LM (chat/SFT or pretrained) checkpoint gives the trunk, and the new head
/// is drawn from N(0, 1/(H+1)), so the first rewards are of unit scale (the final norm's output
/// has unit RMS per dimension), as OpenAI's and TRL's value heads start.
pub fn init_rm<B: Backend>(be: B, dir: &Path, seed: u64) -> Result<Llama<B>> {
    let cfg = LlamaConfig::from_file(&dir.join("config.json"))
        .with_context(|| format!("reading the --init checkpoint {}", dir.display()))?;
    let files = TensorFiles::open(dir)?;
    let (mut model, missing) = load_weights(be, cfg, Head::Score, &files, &["score.weight"])
        .with_context(|| format!("loading the --init checkpoint {}", dir.display()))?;
    if !missing.is_empty() {
        let mut host = model.params_to_host()?;
        let e = model.table.get("score.weight").expect("score head").clone();
        let std = 1.0 / (model.cfg.hidden_size as f64 + 1.0).sqrt();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        for x in &mut host[e.span.off..e.span.off + e.span.len] {
            // Box–Muller: one standard normal from two uniforms in (0, 1].
            let (u1, u2): (f64, f64) = (1.0 - rng.random::<f64>(), rng.random::<f64>());
            let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            *x = (z * std) as f32;
        }
        model.set_params(&host)?;
    }
    model.zero_grads()?;
    Ok(model)
}

/// Saves a reward model as an HF `LlamaForSequenceClassification` checkpoint with its tokenizer,
/// atomically.
pub fn save_rm<B: Backend>(model: &Llama<B>, dir: &Path, tokenizer: &Path) -> Result<()> {
    ensure!(model.head == Head::Score, "not a reward (score-head) model");
    save_model(model, dir, SaveOptions::default(), |tmp| {
        std::fs::copy(tokenizer, tmp.join("tokenizer.json"))
            .map(|_| ())
            .map_err(|e| engine::Error::io(tokenizer, e))
    })
    .with_context(|| format!("saving the reward model to {}", dir.display()))
}

/// Loads a reward model checkpoint (`score.weight`), given as itself or as its `train-rm` run
/// directory (which holds it in `model/`), and its tokenizer.
pub fn load_rm<B: Backend>(be: B, dir: &Path) -> Result<(Llama<B>, Tokenizer)> {
    let dir = &crate::run_dir::model_dir(dir)?;
    let model = load_model(be, dir, Head::Score)
        .with_context(|| format!("loading reward model {}", dir.display()))?;
    let tp = dir.join("tokenizer.json");
    ensure!(
        tp.is_file(),
        "{}: no tokenizer.json beside the reward model",
        dir.display()
    );
    Ok((model, Tokenizer::from_file(&tp)?))
}

// ---------------------------------------------------------------------------------------------
// Evaluation

/// Accuracy on the pairs of one rating level.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LevelAccuracy {
    /// The level's label, or "unknown" for unrated pairs.
    pub rating: String,
    pub pairs: usize,
    pub correct: usize,
    /// `None` when the level has no pairs.
    pub accuracy: Option<f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ScoreStats {
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
}

impl ScoreStats {
    fn of(x: impl Iterator<Item = f64> + Clone) -> Self {
        let n = x.clone().count();
        if n == 0 {
            return ScoreStats::default();
        }
        let mean = x.clone().sum::<f64>() / n as f64;
        let var = x.clone().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64;
        ScoreStats {
            mean,
            std: var.sqrt(),
            min: x.clone().fold(f64::INFINITY, f64::min),
            max: x.fold(f64::NEG_INFINITY, f64::max),
        }
    }
}

/// Held-out reward-model quality: accuracy overall and per rating level (the paper's Table 8),
/// and the score distributions of chosen and rejected responses.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EvalReport {
    pub pairs: usize,
    pub correct: usize,
    /// Fraction of pairs with r_chosen > r_rejected (ties count as wrong).
    pub accuracy: f64,
    /// The four levels in Table 8's order, then "unknown".
    pub by_rating: Vec<LevelAccuracy>,
    /// Mean −log σ(r_c − r_r), without margins, so runs with different margins compare.
    pub loss: f64,
    pub chosen: ScoreStats,
    pub rejected: ScoreStats,
    /// r_chosen − r_rejected.
    pub difference: ScoreStats,
    /// Sequences cut from the left to fit seq_len.
    pub truncated: usize,
    pub chosen_scores: Vec<f32>,
    pub rejected_scores: Vec<f32>,
    pub ratings: Vec<Option<Rating>>,
}

impl EvalReport {
    pub fn from_scores(
        chosen: Vec<f32>,
        rejected: Vec<f32>,
        ratings: Vec<Option<Rating>>,
        truncated: usize,
    ) -> Self {
        assert!(chosen.len() == rejected.len() && chosen.len() == ratings.len());
        let levels: Vec<Option<Rating>> = Rating::ALL
            .iter()
            .map(|&r| Some(r))
            .chain(std::iter::once(None))
            .collect();
        let by_rating = levels
            .iter()
            .map(|&lv| {
                let (mut n, mut ok) = (0, 0);
                for i in 0..chosen.len() {
                    if ratings[i] == lv {
                        n += 1;
                        ok += usize::from(chosen[i] > rejected[i]);
                    }
                }
                LevelAccuracy {
                    rating: lv.map_or("unknown", Rating::label).to_string(),
                    pairs: n,
                    correct: ok,
                    accuracy: (n > 0).then(|| ok as f64 / n as f64),
                }
            })
            .collect();
        let n = chosen.len();
        let correct = chosen.iter().zip(&rejected).filter(|(c, r)| c > r).count();
        let margins: Vec<f32> = vec![0.0; n];
        let loss = if n > 0 {
            ranking_loss(&chosen, &rejected, &margins).0 as f64
        } else {
            0.0
        };
        EvalReport {
            pairs: n,
            correct,
            accuracy: correct as f64 / n.max(1) as f64,
            by_rating,
            loss,
            chosen: ScoreStats::of(chosen.iter().map(|&x| x as f64)),
            rejected: ScoreStats::of(rejected.iter().map(|&x| x as f64)),
            difference: ScoreStats::of(chosen.iter().zip(&rejected).map(|(c, r)| (c - r) as f64)),
            truncated,
            chosen_scores: chosen,
            rejected_scores: rejected,
            ratings,
        }
    }

    /// Accuracy overall and by rating, as the reports show it.
    pub fn summary(&self) -> serde_json::Value {
        let by: serde_json::Map<String, serde_json::Value> = self
            .by_rating
            .iter()
            .map(|l| {
                (
                    l.rating.clone(),
                    serde_json::json!({"accuracy": l.accuracy, "pairs": l.pairs}),
                )
            })
            .collect();
        serde_json::json!({"accuracy": self.accuracy, "pairs": self.pairs, "accuracy_by_rating": by})
    }

    /// The accuracy line of one level (`None`: unrated pairs).
    pub fn level(&self, rating: Option<Rating>) -> &LevelAccuracy {
        let i = rating.map_or(4, |r| {
            Rating::ALL.iter().position(|&x| x == r).expect("level")
        });
        &self.by_rating[i]
    }

    /// Table 8's shape (levels as columns, then the average) and the score distributions.
    pub fn to_markdown(&self) -> String {
        let pct = |a: Option<f64>| a.map_or("–".to_string(), |a| format!("{:.1}", 100.0 * a));
        let unknown = self.level(None);
        let mut cols: Vec<&LevelAccuracy> = self.by_rating[..4].iter().collect();
        let mut titles: Vec<&str> = Rating::ALL.iter().map(|r| r.title()).collect();
        if unknown.pairs > 0 {
            cols.push(unknown);
            titles.push("Unrated");
        }
        let mut s = format!(
            "## Reward model accuracy ({} held-out pairs)\n\n",
            self.pairs
        );
        s += &format!("| | {} | Avg |\n", titles.join(" | "));
        s += &format!("| --- |{}\n", " ---: |".repeat(titles.len() + 1));
        s += &format!(
            "| accuracy (%) | {} | {} |\n",
            cols.iter()
                .map(|c| pct(c.accuracy))
                .collect::<Vec<_>>()
                .join(" | "),
            pct((self.pairs > 0).then_some(self.accuracy))
        );
        s += &format!(
            "| pairs | {} | {} |\n",
            cols.iter()
                .map(|c| c.pairs.to_string())
                .collect::<Vec<_>>()
                .join(" | "),
            self.pairs
        );
        s += "\n## Scores\n\n| | mean | std | min | max |\n| --- | ---: | ---: | ---: | ---: |\n";
        for (name, st) in [
            ("chosen", &self.chosen),
            ("rejected", &self.rejected),
            ("chosen − rejected", &self.difference),
        ] {
            s += &format!(
                "| {name} | {:.4} | {:.4} | {:.4} | {:.4} |\n",
                st.mean, st.std, st.min, st.max
            );
        }
        s += &format!(
            "\nRanking loss without margin: {:.4}. Sequences cut to fit: {}.\n",
            self.loss, self.truncated
        );
        s
    }
}

/// Scores held-out tokenized pairs, `batch` pairs (2·batch rows) per forward: no more activation
/// memory than a training step.
pub fn evaluate_tokenized<B: Backend>(
    model: &mut Llama<B>,
    pairs: &[TokPair],
    batch: usize,
    pad: u32,
    truncated: usize,
) -> Result<EvalReport> {
    let seqs: Vec<&[u32]> = pairs
        .iter()
        .map(|p| p.chosen.as_slice())
        .chain(pairs.iter().map(|p| p.rejected.as_slice()))
        .collect();
    let mut s = score_sequences(model, &seqs, 2 * batch.max(1), pad)?;
    let rejected = s.split_off(pairs.len());
    Ok(EvalReport::from_scores(
        s,
        rejected,
        pairs.iter().map(|p| p.rating).collect(),
        truncated,
    ))
}

/// Accuracy and score distributions of a reward model on `pairs`.
pub fn evaluate<B: Backend>(
    model: &mut Llama<B>,
    tok: &Tokenizer,
    pairs: &[Pair],
    seq_len: usize,
    batch: usize,
) -> Result<EvalReport> {
    ensure!(!pairs.is_empty(), "no pairs to evaluate");
    let (tp, cut) = tokenize_pairs(tok, pairs, seq_len, MarginKind::None)?;
    evaluate_tokenized(model, &tp, batch, tok.eos, cut)
}

/// Writes `eval.json`, `eval.md` and `scores.svg` (histograms of chosen vs rejected scores)
/// into `dir`.
pub fn write_eval(dir: &Path, rep: &EvalReport, title: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    crate::run_dir::write_json(&dir.join("eval.json"), rep)?;
    crate::run_dir::write_atomic(&dir.join("eval.md"), rep.to_markdown().as_bytes())?;
    let c: Vec<f64> = rep.chosen_scores.iter().map(|&x| x as f64).collect();
    let r: Vec<f64> = rep.rejected_scores.iter().map(|&x| x as f64).collect();
    histogram_plot(
        &dir.join("scores.svg"),
        title,
        "reward score",
        &[("chosen", &c), ("rejected", &r)],
        40,
    )
}

// ---------------------------------------------------------------------------------------------
// Training

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RmConfig {
    /// The checkpoint to start from (HF layout): chat/SFT or pretrained, or a reward model; or
    /// a training run directory (its latest checkpoint).
    pub init: PathBuf,
    /// Default: `init/tokenizer.json`.
    pub tokenizer: Option<PathBuf>,
    pub data: Vec<PathBuf>,
    pub out: PathBuf,
    pub kind: RmKind,
    pub margin: MarginKind,
    pub epochs: usize,
    /// Default: the paper's for the model size (`default_lr`).
    pub lr: Option<f32>,
    pub final_lr_ratio: f32,
    /// Warmup as a fraction of the steps, at least `min_warmup` steps (capped at the steps).
    pub warmup_fraction: f64,
    pub min_warmup: usize,
    /// Pairs per optimizer step.
    pub batch_size: usize,
    /// Pairs per forward (gradients accumulate to `batch_size`); 0 means `batch_size`.
    pub micro_batch: usize,
    /// Default: the model's max_position_embeddings.
    pub seq_len: Option<usize>,
    pub val_fraction: f64,
    /// Evaluate on the held-out pairs every N steps (0: only at the end).
    pub eval_every: usize,
    /// Stop after this many steps (the schedule spans them); `None`: the epochs' worth.
    pub max_steps: Option<usize>,
    pub weight_decay: f32,
    pub clip: f32,
    pub seed: u64,
    pub skip_bad: bool,
    pub progress: bool,
    /// The other reward model's pairs mixed in, as a ratio to this model's own pairs.
    pub mix_other: f64,
    /// Weight of the calibration term on the safety meta-labels (BCE of σ(r) against safe).
    pub calibration: f32,
    /// Activation recomputation in the backward (`--recompute`): memory for time, same gradients.
    #[serde(default)]
    pub recompute: engine::Recompute,
}

impl RmConfig {
    /// The paper's recipe: one epoch, peak LR 1e-5 (5e-6 for 70B) with cosine decay to 10 % and
    /// 3 % warmup (at least 5 steps), 512 pairs per step, AdamW as in pretraining, and the small
    /// rating margin (Table 28: margins help on clearly separated pairs; the large one costs
    /// accuracy on similar ones).
    pub fn new(init: PathBuf, data: Vec<PathBuf>, out: PathBuf, kind: RmKind) -> Self {
        RmConfig {
            init,
            tokenizer: None,
            data,
            out,
            kind,
            margin: MarginKind::Small,
            epochs: 1,
            lr: None,
            final_lr_ratio: 0.1,
            warmup_fraction: 0.03,
            min_warmup: 5,
            batch_size: 512,
            micro_batch: 8,
            seq_len: None,
            val_fraction: 0.05,
            eval_every: 0,
            max_steps: None,
            weight_decay: 0.1,
            clip: 1.0,
            seed: 1337,
            skip_bad: false,
            progress: true,
            // The paper's mixes: the safety model sees helpfulness data 90/10, the helpfulness
            // model "equal parts" of the rest (without it, it has never seen a refusal or a
            // harmful request scored and PPO's policy finds that out). The safety model is
            // calibrated so that the piecewise reward's 0.15 threshold means "probably unsafe".
            mix_other: if kind == RmKind::Safety {
                1.0 / 9.0
            } else {
                1.0
            },
            calibration: if kind == RmKind::Safety { 1.0 } else { 0.0 },
            recompute: engine::Recompute::None,
        }
    }
}

/// The warmup length: `fraction` of the steps, at least `min`, never more than the steps.
pub fn warmup_steps(steps: usize, fraction: f64, min: usize) -> usize {
    ((steps as f64 * fraction).round() as usize)
        .max(min)
        .min(steps)
}

#[derive(Clone, Debug, Serialize)]
pub struct RmReport {
    pub kind: RmKind,
    pub steps: usize,
    pub lr: f32,
    pub warmup: usize,
    pub train_pairs: usize,
    pub val_pairs: usize,
    /// Lines skipped as malformed (`skip_bad`).
    pub skipped_lines: usize,
    pub other_category: usize,
    pub unsafe_chosen: usize,
    /// Training sequences cut to fit seq_len.
    pub truncated: usize,
    /// Mean loss and accuracy of the last step.
    pub final_loss: f32,
    pub final_acc: f32,
    pub eval: Option<EvalReport>,
    pub model_dir: PathBuf,
    pub pairs_per_s: f64,
}

/// Pair `k` of the training stream: epoch `k / n` is a fresh permutation, a pure function of
/// (seed, epoch).
fn stream_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    use rand::seq::SliceRandom;
    let mut v: Vec<usize> = (0..n).collect();
    v.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(
        seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15),
    ));
    v
}

/// `llama2 train-rm`: trains one reward model and writes, under `out`, `config.json`,
/// `metrics.jsonl`, `loss.svg`, `model/` (the HF checkpoint with its tokenizer), and the
/// held-out evaluation `eval.json`, `eval.md`, `scores.svg`.
pub fn run<B: Backend>(be: B, cfg: &RmConfig) -> Result<RmReport> {
    ensure!(
        cfg.batch_size > 0 && cfg.epochs > 0,
        "batch size and epochs must be > 0"
    );
    ensure!(!cfg.data.is_empty(), "no preference data given");
    let init = crate::run_dir::model_dir(&cfg.init)?;
    let tok_path = cfg
        .tokenizer
        .clone()
        .unwrap_or_else(|| init.join("tokenizer.json"));
    ensure!(
        tok_path.is_file(),
        "{}: no tokenizer (pass --tokenizer)",
        tok_path.display()
    );
    let tok = Tokenizer::from_file(&tok_path)?;
    let mut model = init_rm(be, &init, cfg.seed)?;
    model.set_recompute(cfg.recompute);
    ensure!(
        model.cfg.vocab_size >= tok.vocab_size(),
        "the model's vocab_size ({}) is smaller than the tokenizer's ({})",
        model.cfg.vocab_size,
        tok.vocab_size()
    );
    let max_pos = model.cfg.max_position_embeddings;
    let seq_len = cfg.seq_len.unwrap_or(max_pos);
    ensure!(
        (2..=max_pos).contains(&seq_len),
        "--seq-len {seq_len} must be in 2..={max_pos} (the model's max_position_embeddings)"
    );

    let (pairs, skipped_lines) = crate::formats::read_pairs(&cfg.data, cfg.skip_bad)?;
    let read = pairs.len();
    let sel = select_pairs(pairs, cfg.kind);
    ensure!(
        !sel.pairs.is_empty(),
        "no pairs for the {} reward model among the {read} read ({} of the other category, {} with an unsafe chosen response)",
        cfg.kind.name(),
        sel.other_category,
        sel.unsafe_chosen
    );
    let own = sel.pairs.len();
    let mut mixed = sel.pairs;
    let n_mixed = if cfg.mix_other > 0.0 {
        let m = mix_in(sel.others, own, cfg.mix_other);
        let k = m.len();
        mixed.extend(m);
        k
    } else {
        0
    };
    let (train_p, val_p) = split_pairs(mixed, cfg.val_fraction);
    ensure!(
        !train_p.is_empty(),
        "no training pairs left after the split"
    );
    let (train_t, truncated) = tokenize_pairs(&tok, &train_p, seq_len, cfg.margin)?;
    let (val_t, val_cut) = tokenize_pairs(&tok, &val_p, seq_len, cfg.margin)?;

    let n = train_t.len();
    let total = n * cfg.epochs;
    let mut steps = total.div_ceil(cfg.batch_size);
    if let Some(m) = cfg.max_steps {
        steps = steps.min(m.max(1));
    }
    let lr_peak = cfg.lr.unwrap_or_else(|| default_lr(&model.cfg));
    let warmup = warmup_steps(steps, cfg.warmup_fraction, cfg.min_warmup);
    let sched = Cosine {
        peak: lr_peak,
        warmup,
        total: steps,
        final_ratio: cfg.final_lr_ratio,
    };
    let micro = if cfg.micro_batch == 0 {
        cfg.batch_size
    } else {
        cfg.micro_batch.min(cfg.batch_size)
    };
    let mut opt = AdamW::new(
        &model,
        AdamWConfig {
            weight_decay: cfg.weight_decay,
            clip_norm: (cfg.clip > 0.0).then_some(cfg.clip),
            ..AdamWConfig::default()
        },
    )?;

    crate::run_dir::write_config(&cfg.out, cfg)?;
    let mut metrics = MetricsWriter::open(&cfg.out.join("metrics.jsonl"), None)?;
    let bar = crate::run_dir::progress("train-rm", steps as u64, cfg.progress);
    say(
        &bar,
        format!(
            "{} reward model: {read} pairs read ({skipped_lines} lines skipped), {} of the other category ({n_mixed} mixed in), {} dropped (unsafe chosen, safe rejected); {n} train / {} held-out pairs; {truncated} training sequences cut to {seq_len} tokens; {steps} steps of {} pairs, lr {lr_peak:.1e}, warmup {warmup}, margin {:?}",
            cfg.kind.name(),
            sel.other_category,
            sel.unsafe_chosen,
            val_t.len(),
            cfg.batch_size,
            cfg.margin
        ),
    );

    let t_start = Instant::now();
    let mut order = Vec::new();
    let mut order_epoch = u64::MAX;
    let (mut final_loss, mut final_acc) = (f32::NAN, f32::NAN);
    let mut pairs_done = 0usize;
    let mut eval = None;
    for step in 0..steps {
        let lr = sched.lr(step);
        let start = step * cfg.batch_size;
        let end = (start + cfg.batch_size).min(total);
        let mut chosen_idx = Vec::with_capacity(end - start);
        for k in start..end {
            let epoch = (k / n) as u64;
            if epoch != order_epoch {
                order = stream_order(n, cfg.seed, epoch);
                order_epoch = epoch;
            }
            chosen_idx.push(order[k % n]);
        }
        let b = chosen_idx.len();
        let (mut loss_sum, mut correct) = (0f64, 0usize);
        for chunk in chosen_idx.chunks(micro) {
            let refs: Vec<&TokPair> = chunk.iter().map(|&i| &train_t[i]).collect();
            let mut pb = PairBatch::new(&refs, tok.eos);
            pb.calibration = cfg.calibration;
            let out = forward_backward(&mut model, &pb, chunk.len() as f32 / b as f32)?;
            if !out.loss.is_finite() {
                bail!(
                    "step {}: the ranking loss is {} (pairs {})",
                    step + 1,
                    out.loss,
                    chunk
                        .iter()
                        .map(|&i| train_p[i].origin.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            loss_sum += out.loss as f64 * chunk.len() as f64;
            correct += out.correct();
        }
        let stats = match opt.step(&mut model, lr) {
            Ok(s) => s,
            Err(engine::Error::NonFinite(m)) => bail!(
                "step {}: {}",
                step + 1,
                crate::optimizer::nonfinite_grads(&model, &m)?
            ),
            Err(e) => return Err(e.into()),
        };
        model.zero_grads()?;
        pairs_done += b;
        final_loss = (loss_sum / b as f64) as f32;
        final_acc = correct as f32 / b as f32;
        let elapsed = t_start.elapsed().as_secs_f64();
        let mut rec = serde_json::json!({
            "step": step + 1, "lr": lr, "loss": final_loss, "acc": final_acc,
            "grad_norm": stats.grad_norm, "pairs": pairs_done,
            "pairs_per_s": pairs_done as f64 / elapsed.max(1e-9), "elapsed_s": elapsed,
        });
        let last = step + 1 == steps;
        if !val_t.is_empty() && (last || (cfg.eval_every > 0 && (step + 1) % cfg.eval_every == 0)) {
            let e = evaluate_tokenized(&mut model, &val_t, micro, tok.eos, val_cut)?;
            rec["val_acc"] = e.accuracy.into();
            rec["val_loss"] = e.loss.into();
            say(
                &bar,
                format!(
                    "step {}: held-out accuracy {:.3}, loss {:.4}",
                    step + 1,
                    e.accuracy,
                    e.loss
                ),
            );
            eval = Some(e);
        }
        metrics.write(&rec)?;
        bar.set_position(step as u64 + 1);
        bar.set_message(format!(
            "loss {final_loss:.4} | acc {final_acc:.2} | lr {lr:.2e}"
        ));
    }
    bar.finish_and_clear();
    let model_dir = cfg.out.join("model");
    save_rm(&model, &model_dir, &tok_path)?;
    if let Some(e) = &eval {
        write_eval(
            &cfg.out,
            e,
            &format!("{} reward model: held-out scores", cfg.kind.name()),
        )?;
    }
    if let Ok(s) = read_series(
        &cfg.out.join("metrics.jsonl"),
        "step",
        &["loss", "val_loss"],
    ) {
        line_plot(
            &cfg.out.join("loss.svg"),
            &format!("{} reward model", cfg.kind.name()),
            "step",
            "ranking loss",
            &[("train", &s[0]), ("held-out (no margin)", &s[1])],
        )?;
    }
    Ok(RmReport {
        kind: cfg.kind,
        steps,
        lr: lr_peak,
        warmup,
        train_pairs: n,
        val_pairs: val_t.len(),
        skipped_lines,
        other_category: sel.other_category,
        unsafe_chosen: sel.unsafe_chosen,
        truncated,
        final_loss,
        final_acc,
        eval,
        model_dir,
        pairs_per_s: pairs_done as f64 / t_start.elapsed().as_secs_f64().max(1e-9),
    })
}
