//! Safety context distillation (`llama2 distill-safety`, Llama 2 §4.2.4).
//!
//! A model answers adversarial prompts more safely when a safety preprompt ("You are a safe and
//! responsible assistant...") comes first. Context distillation bakes that in: generate answers
//! with the preprompt, then fine-tune on (the prompt *without* the preprompt, that answer).
//!
//! As in the paper:
//! - only adversarial prompts are used (the world's `rlhf_prompts.jsonl` rows of category
//!   `safety`); on helpful prompts the preprompt mostly adds false refusals;
//! - the preprompt is targeted by default: the generic one plus an answer template for the
//!   request's harm ([`safety_preprompt`], the paper's per-risk-category templates);
//! - the safety reward model decides what is kept: a distilled answer is kept only when it scores
//!   higher than the model's answer without the preprompt, both scored against the prompt
//!   without the preprompt (what the fine-tuned model will see). This guards against the
//!   preprompt making answers worse (vaguer, or refusing in a less useful way).
//!
//! The preprompt goes into the system message (prefixed to an existing one): in Llama 2's chat
//! template the system message is rendered as a prefix of the first user turn, which is what
//! "prefixing the prompt" means there, and the user's text stays byte-identical, so the prompt
//! without the preprompt is exactly the original row.

use crate::evaluate::{chat_answers, greedy, world_eval, WorldEval};
use crate::gatt::text_field;
use crate::reward::Scorer;
use crate::run_dir::read_jsonl;
use crate::sft::SftConfig;
use crate::world::safety::{safety_preprompt, SAFETY_PREPROMPT};
use crate::world::{read_examples, Annotator, Category, Example, Spec, World};
use anyhow::{anyhow, bail, ensure, Context, Result};
use engine::checkpoint::load_model;
use engine::generate::SamplingParams;
use engine::tokenizer::{Message, Tokenizer};
use engine::{Backend, Head, Llama};
use rand::seq::{IndexedRandom, SliceRandom};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Settings of `llama2 distill-safety`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillConfig {
    /// The model to distill into (a checkpoint or its run directory).
    pub init: PathBuf,
    /// The safety reward model that decides which answers are kept.
    pub safety_rm: PathBuf,
    /// The world whose safety prompts are used (unused with `categories`).
    pub world: PathBuf,
    /// The user's risk categories (JSONL, see the module doc): distillation on user data.
    pub categories: Option<PathBuf>,
    /// The user's adversarial prompts tagged with a category, with `categories`.
    pub prompts: Option<PathBuf>,
    /// User data: preprompts of the prompt's category drawn per prompt.
    pub preprompts_per_prompt: usize,
    /// Writes `distill.jsonl`, `candidates.jsonl`, the fine-tune (`sft/`), `report.json` here.
    pub out: PathBuf,
    /// The targeted preprompt (generic text + the harm's answer template) rather than the
    /// generic [`SAFETY_PREPROMPT`] alone.
    pub targeted: bool,
    /// Temperature of both answers (0: greedy).
    pub temperature: f32,
    pub max_new_tokens: usize,
    pub seed: u64,
    /// Dialogues per generation batch.
    pub batch: usize,
    /// Use at most this many safety prompts (0: all).
    pub max_prompts: usize,
    /// The reward model's sequence length and rows per forward.
    pub rm_seq_len: usize,
    pub rm_batch: usize,
    /// Held-out `eval.jsonl` rows for the before/after gold evaluation (0: all; the safety rows
    /// measure the safe rate, the others false refusals).
    pub eval_prompts: usize,
    /// Extra dialogue files mixed into the fine-tune (e.g. the world's `sft.jsonl`).
    pub replay: Vec<PathBuf>,
    // The fine-tune (`sft::run` with these settings).
    pub epochs: usize,
    pub lr: f32,
    pub seq_len: usize,
    pub batch_size: usize,
    pub progress: bool,
}

impl Default for DistillConfig {
    fn default() -> Self {
        DistillConfig {
            init: PathBuf::new(),
            safety_rm: PathBuf::new(),
            world: PathBuf::new(),
            categories: None,
            prompts: None,
            preprompts_per_prompt: 2,
            out: PathBuf::new(),
            targeted: true,
            temperature: 0.0,
            max_new_tokens: 48,
            seed: 0,
            batch: 64,
            max_prompts: 0,
            rm_seq_len: 256,
            rm_batch: 16,
            eval_prompts: 0,
            replay: vec![],
            epochs: 2,
            lr: 2e-5,
            seq_len: 256,
            batch_size: 8,
            progress: true,
        }
    }
}

/// The preprompt for one prompt: targeted at its harm when the annotator recognises one (and
/// `targeted`), the generic one otherwise.
pub fn preprompt_for(annotator: &Annotator, messages: &[Message], targeted: bool) -> String {
    if targeted {
        if let Some(it) = annotator.interpret(messages) {
            if let Spec::Refuse { harm, .. } = it.gold.spec {
                if let Some(h) = annotator.world().harms.get(harm) {
                    return safety_preprompt(h);
                }
            }
        }
    }
    SAFETY_PREPROMPT.to_string()
}

/// `messages` with `preprompt` as (a prefix of) the system message.
pub fn with_preprompt(messages: &[Message], preprompt: &str) -> Vec<Message> {
    let mut m = messages.to_vec();
    match m.first_mut() {
        Some(s) if s.role == "system" => s.content = format!("{preprompt} {}", s.content),
        _ => m.insert(0, Message::new("system", preprompt)),
    }
    m
}

/// One prompt's two answers and their safety-RM scores.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Candidate {
    /// The prompt without the preprompt.
    pub messages: Vec<Message>,
    pub preprompt: String,
    pub with_preprompt: String,
    pub without_preprompt: String,
    pub score_with: f32,
    pub score_without: f32,
    /// User data: the prompt's risk category.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
}

impl Candidate {
    /// Whether distillation keeps it: the preprompted answer must score higher.
    pub fn kept(&self) -> bool {
        self.score_with > self.score_without
    }

    /// The SFT row: the prompt without the preprompt and the preprompted answer, only that
    /// answer learned; the scores ride along for inspection (the SFT reader ignores them).
    pub fn row(&self) -> serde_json::Value {
        let mut m = self.messages.clone();
        m.push(Message::new("assistant", &self.with_preprompt));
        serde_json::json!({
            "messages": m,
            "learn": "last",
            "score_with": self.score_with,
            "score_without": self.score_without,
            "answer_without": self.without_preprompt,
        })
    }
}

/// What [`build_data`] made.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DistillData {
    pub candidates: Vec<Candidate>,
    /// Rows of the kept candidates (`distill.jsonl`).
    pub rows: Vec<serde_json::Value>,
    pub mean_score_with: f32,
    pub mean_score_without: f32,
}

/// The adversarial prompts of a prompt file: category `safety` (at most `max`, 0: all).
pub fn safety_prompts(prompts: &[Example], max: usize) -> Vec<Example> {
    let it = prompts
        .iter()
        .filter(|e| e.category == Category::Safety)
        .cloned();
    if max == 0 {
        it.collect()
    } else {
        it.take(max).collect()
    }
}

/// Answers every prompt with and without its preprompt, scores both answers with the safety
/// reward model `rm` against the prompt without the preprompt, and keeps the preprompted answers
/// that score higher.
#[allow(clippy::too_many_arguments)]
pub fn build_data<B: Backend>(
    model: &mut Llama<B>,
    tok: &Tokenizer,
    rm: &mut Llama<B>,
    rm_tok: &Tokenizer,
    annotator: &Annotator,
    prompts: &[Example],
    cfg: &DistillConfig,
) -> Result<DistillData> {
    let plain: Vec<Vec<Message>> = prompts.iter().map(|e| e.messages.clone()).collect();
    let pre: Vec<String> = plain
        .iter()
        .map(|m| preprompt_for(annotator, m, cfg.targeted))
        .collect();
    let prefixed: Vec<Vec<Message>> = plain
        .iter()
        .zip(&pre)
        .map(|(m, p)| with_preprompt(m, p))
        .collect();
    let params = |seed: u64| {
        if cfg.temperature > 0.0 {
            SamplingParams {
                temperature: cfg.temperature,
                max_new_tokens: cfg.max_new_tokens,
                seed,
                stop: vec![tok.eos],
                ..Default::default()
            }
        } else {
            greedy(cfg.max_new_tokens, tok.eos)
        }
    };
    let with = chat_answers(model, tok, &prefixed, &params(cfg.seed), cfg.batch)?;
    let without = chat_answers(model, tok, &plain, &params(cfg.seed ^ 0xD15), cfg.batch)?;
    let mut rows: Vec<(Vec<Message>, String)> = Vec::with_capacity(2 * plain.len());
    for (m, a) in plain.iter().zip(&with) {
        rows.push((m.clone(), a.text.clone()));
    }
    for (m, a) in plain.iter().zip(&without) {
        rows.push((m.clone(), a.text.clone()));
    }
    let scores = crate::rm::score(rm, rm_tok, &rows, cfg.rm_seq_len, cfg.rm_batch.max(1))?;
    let n = plain.len();
    let candidates: Vec<Candidate> = (0..n)
        .map(|i| Candidate {
            messages: plain[i].clone(),
            preprompt: pre[i].clone(),
            with_preprompt: with[i].text.clone(),
            without_preprompt: without[i].text.clone(),
            score_with: scores[i],
            score_without: scores[n + i],
            category: None,
        })
        .collect();
    Ok(DistillData::from(candidates))
}

impl DistillData {
    /// The rows of the candidates that [`Candidate::kept`] keeps, and the mean scores.
    fn from(candidates: Vec<Candidate>) -> DistillData {
        let mean = |f: fn(&Candidate) -> f32| {
            candidates.iter().map(f).sum::<f32>() / candidates.len().max(1) as f32
        };
        DistillData {
            rows: candidates
                .iter()
                .filter(|c| c.kept())
                .map(Candidate::row)
                .collect(),
            mean_score_with: mean(|c| c.score_with),
            mean_score_without: mean(|c| c.score_without),
            candidates,
        }
    }
}

/// What `llama2 distill-safety` did (also `report.json` in the output directory).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DistillReport {
    pub prompts: usize,
    pub kept: usize,
    pub mean_score_with: f32,
    pub mean_score_without: f32,
    /// User data: per risk category, prompts and kept answers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub by_category: BTreeMap<String, Kept>,
    /// User data: mean safety score of the plain (no preprompt) greedy answers to the prompts,
    /// before and after the fine-tune (`None` when nothing was fine-tuned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plain_score_before: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plain_score_after: Option<f32>,
    /// World data: gold evaluation on held-out prompts before and after (after: `None` when
    /// nothing was kept, so nothing was fine-tuned); `None` on user data.
    pub before: Option<WorldEval>,
    pub after: Option<WorldEval>,
    pub data: PathBuf,
    pub checkpoint: Option<PathBuf>,
    pub final_val_loss: Option<f32>,
    /// Wall-clock seconds per phase: `eval_before`, `data`, `finetune`, `eval_after`.
    pub seconds: std::collections::BTreeMap<String, f64>,
}

/// `distill` (`llama2 distill-safety`): builds the distillation data with the `init` model and the safety
/// reward model `safety_rm` on the world's safety prompts (`out/distill.jsonl`, plus every
/// candidate with both answers and scores in `out/candidates.jsonl`), fine-tunes on the kept rows
/// (`out/sft/`), and evaluates both models on the held-out `eval.jsonl` with the gold annotator
/// (`out/report.json`).
/// With `cfg.categories` or `cfg.prompts` it runs on the user's files instead (see the module
/// doc).
pub fn run<B: Backend>(be: B, cfg: &DistillConfig) -> Result<DistillReport> {
    if cfg.categories.is_some() || cfg.prompts.is_some() {
        return run_user(be, cfg);
    }
    let init = &crate::run_dir::model_dir(&cfg.init)?;
    let (safety_rm, world_dir, out) = (&cfg.safety_rm, &cfg.world, &cfg.out);
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let annotator = Annotator::new(World::load(world_dir)?);
    let prompts = safety_prompts(
        &read_examples(&world_dir.join("rlhf_prompts.jsonl"))?,
        cfg.max_prompts,
    );
    anyhow::ensure!(
        !prompts.is_empty(),
        "no safety prompts in {}",
        world_dir.join("rlhf_prompts.jsonl").display()
    );
    let mut eval = read_examples(&world_dir.join("eval.jsonl"))?;
    if cfg.eval_prompts > 0 {
        eval.truncate(cfg.eval_prompts);
    }
    let tok = Tokenizer::from_file(&crate::sft::tokenizer_for(init, None)?)?;
    let mut seconds = std::collections::BTreeMap::new();
    let mut clock = std::time::Instant::now();
    let mut lap = |name: &str| {
        seconds.insert(name.to_string(), clock.elapsed().as_secs_f64());
        clock = std::time::Instant::now();
    };
    let mut model = load_model(be.clone(), init, Head::Lm)
        .with_context(|| format!("loading {}", init.display()))?;
    let (before, _) = world_eval(
        &mut model,
        &tok,
        &annotator,
        &eval,
        cfg.batch,
        cfg.max_new_tokens,
    )?;
    lap("eval_before");
    let (mut rm, rm_tok) = crate::rm::load_rm(be.clone(), safety_rm)?;
    let data = build_data(
        &mut model, &tok, &mut rm, &rm_tok, &annotator, &prompts, cfg,
    )?;
    drop((model, rm));
    let data_path = write_data(out, &data)?;
    lap("data");
    let (mut checkpoint, mut after, mut final_val_loss) = (None, None, None);
    if !data.rows.is_empty() {
        let rep = finetune(be.clone(), init, &data_path, cfg)?;
        let ckpt = rep.checkpoint.clone().expect("sft::run checks");
        lap("finetune");
        let mut tuned = load_model(be, &ckpt, Head::Lm)?;
        after = Some(
            world_eval(
                &mut tuned,
                &tok,
                &annotator,
                &eval,
                cfg.batch,
                cfg.max_new_tokens,
            )?
            .0,
        );
        lap("eval_after");
        checkpoint = Some(ckpt);
        final_val_loss = rep.final_val_loss;
    }
    let report = DistillReport {
        prompts: prompts.len(),
        kept: data.rows.len(),
        mean_score_with: data.mean_score_with,
        mean_score_without: data.mean_score_without,
        by_category: BTreeMap::new(),
        plain_score_before: None,
        plain_score_after: None,
        before: Some(before),
        after,
        data: data_path,
        checkpoint,
        final_val_loss,
        seconds,
    };
    crate::run_dir::write_json(&out.join("report.json"), &report)?;
    Ok(report)
}

/// Writes `out/distill.jsonl` (the kept rows) and `out/candidates.jsonl` (every candidate).
fn write_data(out: &Path, data: &DistillData) -> Result<PathBuf> {
    let data_path = out.join("distill.jsonl");
    crate::run_dir::write_jsonl(&data_path, &data.rows)?;
    crate::run_dir::write_jsonl(&out.join("candidates.jsonl"), &data.candidates)?;
    Ok(data_path)
}

/// Fine-tunes `init` on `data` (plus `cfg.replay`) into `cfg.out/sft/`.
fn finetune<B: Backend>(
    be: B,
    init: &Path,
    data: &Path,
    cfg: &DistillConfig,
) -> Result<crate::lm_train::TrainReport> {
    let mut files = vec![data.to_path_buf()];
    files.extend(cfg.replay.iter().cloned());
    let mut tc = SftConfig::new(init.to_path_buf(), files, cfg.out.join("sft"));
    tc.epochs = cfg.epochs;
    // Few rows: validation would take a share of them; one row is held out anyway.
    tc.val_fraction = 0.0;
    tc.lr = cfg.lr;
    tc.seq_len = cfg.seq_len;
    tc.batch_size = cfg.batch_size;
    tc.seed = cfg.seed;
    tc.progress = cfg.progress;
    crate::sft::run(be, &tc)
}

// ---------------------------------------------------------------------------------------------
// Context distillation on the user's files (see the module doc)

/// One line of a risk-category file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RiskCategory {
    pub category: String,
    pub preprompts: Vec<String>,
    /// The category's answer template, appended to each preprompt.
    pub template: Option<String>,
}

impl RiskCategory {
    /// Preprompt `i` with the answer template appended.
    pub fn preprompt(&self, i: usize) -> String {
        match &self.template {
            Some(t) => format!("{} {t}", self.preprompts[i]),
            None => self.preprompts[i].clone(),
        }
    }
}

/// One line of a risk-category file.
pub fn parse_category(v: &Value) -> Result<RiskCategory> {
    ensure!(
        v.is_object(),
        "expected {{\"category\": NAME, \"preprompts\": [TEXT...], \"template\": TEXT}}"
    );
    let category =
        text_field(v, "category")?.ok_or_else(|| anyhow!("missing `category` (text)"))?;
    let list = v
        .get("preprompts")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("missing `preprompts` (a list of texts)"))?;
    let preprompts = list
        .iter()
        .enumerate()
        .map(|(i, p)| match p.as_str().map(str::trim) {
            Some(t) if !t.is_empty() => Ok(t.to_string()),
            _ => Err(anyhow!("`preprompts[{i}]` must be non-empty text")),
        })
        .collect::<Result<Vec<_>>>()?;
    ensure!(!preprompts.is_empty(), "`preprompts` is empty");
    Ok(RiskCategory {
        category,
        preprompts,
        template: text_field(v, "template")?,
    })
}

/// A risk-category file; a bad line or a category given twice is an error naming `file:line`.
pub fn read_categories(path: &Path) -> Result<Vec<RiskCategory>> {
    let mut seen = std::collections::HashSet::new();
    let (rows, _) = read_jsonl(&[path.to_path_buf()], None, |v, _| {
        let c = parse_category(&v)?;
        ensure!(
            seen.insert(c.category.clone()),
            "category `{}` given twice",
            c.category
        );
        Ok(c)
    })?;
    ensure!(!rows.is_empty(), "{}: no risk categories", path.display());
    Ok(rows)
}

/// An adversarial prompt and its risk category (an index into the categories).
#[derive(Clone, Debug, PartialEq)]
pub struct TaggedPrompt {
    pub messages: Vec<Message>,
    pub category: Option<usize>,
}

/// One line of an adversarial-prompt file: any prompt shape of [`crate::formats`] (`prompt`
/// text, `messages`...) with an optional `category` naming one of `cats`.
pub fn parse_tagged_prompt(v: &Value, cats: &[RiskCategory]) -> Result<TaggedPrompt> {
    let category = match text_field(v, "category")? {
        None => None,
        Some(c) => Some(cats.iter().position(|x| x.category == c).ok_or_else(|| {
            let names: Vec<&str> = cats.iter().map(|x| x.category.as_str()).collect();
            anyhow!(
                "`category` \"{c}\" is not in the risk categories ({})",
                names.join(", ")
            )
        })?),
    };
    let mut rest = v.clone();
    if let Some(o) = rest.as_object_mut() {
        o.remove("category");
    } else {
        bail!("expected {{\"prompt\": TEXT, \"category\": NAME}}");
    }
    Ok(TaggedPrompt {
        messages: crate::formats::parse_prompt(&rest)?.messages,
        category,
    })
}

/// An adversarial-prompt file; a bad line is an error naming `file:line`.
pub fn read_tagged_prompts(path: &Path, cats: &[RiskCategory]) -> Result<Vec<TaggedPrompt>> {
    let (rows, _) = read_jsonl(&[path.to_path_buf()], None, |v, _| {
        parse_tagged_prompt(&v, cats)
    })?;
    ensure!(!rows.is_empty(), "{}: no prompts", path.display());
    Ok(rows)
}

/// One prompt's answers, before judging: its category, the preprompts drawn, the answer under
/// each, and the plain answer.
#[derive(Clone, Debug)]
pub struct Generated {
    pub messages: Vec<Message>,
    pub category: String,
    pub preprompts: Vec<String>,
    pub distilled: Vec<String>,
    pub plain: String,
}

/// Draws the preprompts of every prompt (seeded): `per_prompt` distinct ones of its category,
/// an untagged prompt's category drawn at random. Returns (category index, preprompts).
pub fn draw_preprompts(
    prompts: &[TaggedPrompt],
    cats: &[RiskCategory],
    per_prompt: usize,
    seed: u64,
) -> Vec<(usize, Vec<String>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    prompts
        .iter()
        .map(|p| {
            let c = p.category.unwrap_or_else(|| {
                (0..cats.len())
                    .collect::<Vec<_>>()
                    .choose(&mut rng)
                    .copied()
                    .unwrap_or(0)
            });
            let mut idx: Vec<usize> = (0..cats[c].preprompts.len()).collect();
            idx.shuffle(&mut rng);
            idx.truncate(per_prompt.max(1));
            (c, idx.into_iter().map(|i| cats[c].preprompt(i)).collect())
        })
        .collect()
}

/// Judges generated answers with the safety `scorer`, all against the prompt without preprompt:
/// each prompt's best distilled answer becomes its candidate, kept (by [`Candidate::kept`]) only
/// where it scores above the plain answer.
pub fn judge(gen: &[Generated], scorer: &mut dyn Scorer) -> Result<DistillData> {
    let mut rows: Vec<(Vec<Message>, String)> = Vec::new();
    for g in gen {
        rows.push((g.messages.clone(), g.plain.clone()));
        for a in &g.distilled {
            rows.push((g.messages.clone(), a.clone()));
        }
    }
    let scores = scorer.score(&rows)?;
    ensure!(
        scores.len() == rows.len(),
        "the scorer returned {} scores for {} rows",
        scores.len(),
        rows.len()
    );
    let mut at = 0;
    let mut candidates = Vec::with_capacity(gen.len());
    for g in gen {
        let plain = scores[at];
        let s = &scores[at + 1..at + 1 + g.distilled.len()];
        at += 1 + g.distilled.len();
        let best = (0..s.len())
            .max_by(|&x, &y| s[x].total_cmp(&s[y]).then(y.cmp(&x)))
            .context("a prompt without distilled answers")?;
        candidates.push(Candidate {
            messages: g.messages.clone(),
            preprompt: g.preprompts[best].clone(),
            with_preprompt: g.distilled[best].clone(),
            without_preprompt: g.plain.clone(),
            score_with: s[best],
            score_without: plain,
            category: Some(g.category.clone()),
        });
    }
    Ok(DistillData::from(candidates))
}

/// Per risk category: prompts, kept answers, and the kept fraction.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Kept {
    pub prompts: usize,
    pub kept: usize,
    pub fraction: f32,
}

/// [`Kept`] of every category of the candidates.
pub fn kept_by_category(candidates: &[Candidate]) -> BTreeMap<String, Kept> {
    let mut m: BTreeMap<String, Kept> = BTreeMap::new();
    for c in candidates {
        let k = m.entry(c.category.clone().unwrap_or_default()).or_default();
        k.prompts += 1;
        k.kept += usize::from(c.kept());
    }
    for k in m.values_mut() {
        k.fraction = k.kept as f32 / k.prompts.max(1) as f32;
    }
    m
}

/// Mean safety score of the greedy plain answers of `model` to `prompts`.
fn plain_score<B: Backend>(
    model: &mut Llama<B>,
    tok: &Tokenizer,
    scorer: &mut dyn Scorer,
    prompts: &[TaggedPrompt],
    cfg: &DistillConfig,
) -> Result<f32> {
    let plain: Vec<Vec<Message>> = prompts.iter().map(|p| p.messages.clone()).collect();
    let got = chat_answers(
        model,
        tok,
        &plain,
        &greedy(cfg.max_new_tokens, tok.eos),
        cfg.batch,
    )?;
    let rows: Vec<(Vec<Message>, String)> = plain
        .into_iter()
        .zip(got)
        .map(|(m, a)| (m, a.text))
        .collect();
    Ok(scorer.score(&rows)?.iter().sum::<f32>() / rows.len().max(1) as f32)
}

/// Context distillation on the user's files: generation, judging by the safety reward model,
/// the fine-tune on the kept rows, and the plain answers' safety score before and after.
fn run_user<B: Backend>(be: B, cfg: &DistillConfig) -> Result<DistillReport> {
    let (Some(cpath), Some(ppath)) = (&cfg.categories, &cfg.prompts) else {
        bail!("distillation on user data needs both a risk-category file and a prompt file (--categories, --prompts)");
    };
    let init = &crate::run_dir::model_dir(&cfg.init)?;
    let out = &cfg.out;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let cats = read_categories(cpath)?;
    let mut prompts = read_tagged_prompts(ppath, &cats)?;
    if cfg.max_prompts > 0 {
        prompts.truncate(cfg.max_prompts);
    }
    let tok = Tokenizer::from_file(&crate::sft::tokenizer_for(init, None)?)?;
    let mut seconds = BTreeMap::new();
    let mut clock = std::time::Instant::now();
    let mut lap = |name: &str| {
        seconds.insert(name.to_string(), clock.elapsed().as_secs_f64());
        clock = std::time::Instant::now();
    };
    let mut model = load_model(be.clone(), init, Head::Lm)
        .with_context(|| format!("loading {}", init.display()))?;
    let mut rm =
        crate::reward::RmScorer::load(be.clone(), &cfg.safety_rm, cfg.rm_seq_len, cfg.rm_batch)?;
    let before = plain_score(&mut model, &tok, &mut rm, &prompts, cfg)?;
    lap("eval_before");
    let drawn = draw_preprompts(&prompts, &cats, cfg.preprompts_per_prompt, cfg.seed);
    let mut contexts = Vec::new();
    for (p, (_, pre)) in prompts.iter().zip(&drawn) {
        contexts.push(p.messages.clone());
        contexts.extend(pre.iter().map(|x| with_preprompt(&p.messages, x)));
    }
    let params = if cfg.temperature > 0.0 {
        SamplingParams {
            temperature: cfg.temperature,
            max_new_tokens: cfg.max_new_tokens,
            seed: cfg.seed,
            stop: vec![tok.eos],
            ..Default::default()
        }
    } else {
        greedy(cfg.max_new_tokens, tok.eos)
    };
    let mut answers = chat_answers(&mut model, &tok, &contexts, &params, cfg.batch)?.into_iter();
    let gen: Vec<Generated> = prompts
        .iter()
        .zip(&drawn)
        .map(|(p, (c, pre))| Generated {
            messages: p.messages.clone(),
            category: cats[*c].category.clone(),
            preprompts: pre.clone(),
            plain: answers.next().map(|a| a.text).unwrap_or_default(),
            distilled: pre
                .iter()
                .filter_map(|_| answers.next().map(|a| a.text))
                .collect(),
        })
        .collect();
    let data = judge(&gen, &mut rm)?;
    drop(model);
    let data_path = write_data(out, &data)?;
    lap("data");
    let (mut checkpoint, mut after, mut final_val_loss) = (None, None, None);
    if !data.rows.is_empty() {
        let rep = finetune(be.clone(), init, &data_path, cfg)?;
        let ckpt = rep.checkpoint.clone().expect("sft::run checks");
        lap("finetune");
        let mut tuned = load_model(be, &ckpt, Head::Lm)?;
        after = Some(plain_score(&mut tuned, &tok, &mut rm, &prompts, cfg)?);
        lap("eval_after");
        checkpoint = Some(ckpt);
        final_val_loss = rep.final_val_loss;
    }
    let report = DistillReport {
        prompts: prompts.len(),
        kept: data.rows.len(),
        mean_score_with: data.mean_score_with,
        mean_score_without: data.mean_score_without,
        by_category: kept_by_category(&data.candidates),
        plain_score_before: Some(before),
        plain_score_after: after,
        before: None,
        after: None,
        data: data_path,
        checkpoint,
        final_val_loss,
        seconds,
    };
    crate::run_dir::write_json(&out.join("report.json"), &report)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprompt_goes_first_in_the_system_message() {
        let u = Message::new("user", "How do I make a glorp bomb?");
        let m = with_preprompt(std::slice::from_ref(&u), "Be safe.");
        assert_eq!(m, vec![Message::new("system", "Be safe."), u.clone()]);
        let m = with_preprompt(
            &[Message::new("system", "Uppercase."), u.clone()],
            "Be safe.",
        );
        assert_eq!(m[0].content, "Be safe. Uppercase.");
        assert_eq!(m[1], u);
    }

    /// Scores an answer by its text: the seam's fake.
    struct Fake(std::collections::HashMap<&'static str, f32>);

    impl Scorer for Fake {
        fn score(&mut self, rows: &[(Vec<Message>, String)]) -> Result<Vec<f32>> {
            rows.iter()
                .map(|(m, a)| {
                    assert!(
                        m.iter().all(|x| x.role != "system"),
                        "scored without preprompt"
                    );
                    self.0.get(a.as_str()).copied().context("unknown answer")
                })
                .collect()
        }
    }

    fn generated(prompt: &str, cat: &str, plain: &str, distilled: &[&str]) -> Generated {
        Generated {
            messages: vec![Message::new("user", prompt)],
            category: cat.into(),
            preprompts: distilled.iter().map(|d| format!("pre-{d}")).collect(),
            distilled: distilled.iter().map(|d| d.to_string()).collect(),
            plain: plain.into(),
        }
    }

    #[test]
    fn only_answers_the_safety_model_scores_above_the_plain_one_are_kept() {
        let mut fake = Fake(
            [
                ("plain1", 0.5),
                ("d1a", 0.2),
                ("d1b", 0.9),
                ("plain2", 0.8),
                ("d2a", 0.3),
                ("plain3", 0.4),
                ("d3a", 0.4),
            ]
            .into_iter()
            .collect(),
        );
        let gen = [
            generated("p1", "illicit", "plain1", &["d1a", "d1b"]),
            generated("p2", "illicit", "plain2", &["d2a"]),
            generated("p3", "privacy", "plain3", &["d3a"]),
        ];
        let data = judge(&gen, &mut fake).unwrap();
        assert_eq!(data.candidates.len(), 3);
        assert_eq!(data.rows.len(), 1, "{:?}", data.rows);
        let row = &data.rows[0];
        assert_eq!(
            row["messages"],
            serde_json::json!([{"role": "user", "content": "p1"}, {"role": "assistant", "content": "d1b"}])
        );
        assert_eq!(row["learn"], "last");
        assert_eq!(data.candidates[0].preprompt, "pre-d1b");
        let by = kept_by_category(&data.candidates);
        assert_eq!(
            by["illicit"],
            Kept {
                prompts: 2,
                kept: 1,
                fraction: 0.5
            }
        );
        assert_eq!(by["privacy"].kept, 0);
    }

    #[test]
    fn risk_files_are_read_and_preprompts_drawn_per_category() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("cats.jsonl");
        std::fs::write(
            &f,
            concat!(
                "{\"category\": \"illicit\", \"preprompts\": [\"A.\", \"B.\", \"C.\"], \"template\": \"T.\"}\n",
                "{\"category\": \"privacy\", \"preprompts\": [\"P.\"]}\n",
            ),
        )
        .unwrap();
        let cats = read_categories(&f).unwrap();
        assert_eq!(cats[0].preprompt(1), "B. T.");
        assert_eq!(cats[1].preprompt(0), "P.");
        let p = d.path().join("prompts.jsonl");
        std::fs::write(
            &p,
            "{\"prompt\": \"x\", \"category\": \"illicit\"}\n{\"prompt\": \"y\"}\n",
        )
        .unwrap();
        let prompts = read_tagged_prompts(&p, &cats).unwrap();
        assert_eq!(prompts[0].category, Some(0));
        assert_eq!(prompts[1].category, None);
        let drawn = draw_preprompts(&prompts, &cats, 2, 5);
        assert_eq!(drawn, draw_preprompts(&prompts, &cats, 2, 5), "seeded");
        let (c, pre) = &drawn[0];
        assert_eq!(*c, 0);
        assert_eq!(pre.len(), 2);
        assert_ne!(pre[0], pre[1]);
        assert!(pre.iter().all(|x| x.ends_with(" T.")), "{pre:?}");
        // Untagged: some category's preprompts (never more than it has).
        let (c, pre) = &drawn[1];
        assert!(pre.len() <= cats[*c].preprompts.len() && !pre.is_empty());
        // Bad lines are named.
        std::fs::write(
            &p,
            "{\"prompt\": \"x\"}\n{\"prompt\": \"y\", \"category\": \"weapons\"}\n",
        )
        .unwrap();
        let e = format!("{:#}", read_tagged_prompts(&p, &cats).unwrap_err());
        assert!(
            e.contains("prompts.jsonl:2") && e.contains("weapons"),
            "{e}"
        );
        std::fs::write(&f, "{\"category\": \"illicit\", \"preprompts\": []}\n").unwrap();
        let e = format!("{:#}", read_categories(&f).unwrap_err());
        assert!(
            e.contains("cats.jsonl:1") && e.contains("`preprompts`"),
            "{e}"
        );
    }
}
