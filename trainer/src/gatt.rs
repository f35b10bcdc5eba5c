//! Ghost Attention (`llama2 gatt`, Llama 2 §3.3): teach a chat model to keep following an
//! instruction given once, at the start of a dialogue, through every later turn.
//!
//! The recipe, as the paper gives it:
//! 1. Take multi-turn dialogues `[u1, a1, ..., un, an]` and an instruction `inst` (here: a set of
//!    one or two of the world's combinable instructions, [`InstructionSet`]).
//! 2. Concatenate `inst` to *every* user message and sample the assistant turns with the latest
//!    model: reminded at every turn, it follows the instruction throughout.
//! 3. Drop `inst` from every user message but the first (written in a shortened form half of the
//!    time, so short instructions work too) and fine-tune with the loss zeroed on every token of
//!    the earlier turns, assistant turns included. The model then has to produce instruction-
//!    following answers at turn k with the instruction visible only at turn 1: the attention to
//!    the "ghost" first turn is what gets learned.
//!
//! Here the user turns are single-turn helpfulness questions of the world's training prompts
//! (`rlhf_prompts.jsonl`), N of them chained into one conversation; the instruction goes into
//! the first user turn, before the question (the paper's final form; in Llama 2's template the
//! system prompt is itself a prefix of the first user turn; [`GattConfig::system`] puts it in a
//! system message instead). Adherence is measured the same way on the held-out `eval.jsonl`
//! questions, per turn, with the world's instruction checkers.

use crate::evaluate::{chat_answers, greedy};
use crate::sft::SftConfig;
use crate::world::instructions::word_count;
use crate::world::{read_examples, Annotator, Category, Example, InstructionSet, World};
use anyhow::{ensure, Context, Result};
use engine::checkpoint::load_model;
use engine::generate::SamplingParams;
use engine::tokenizer::{Message, Tokenizer};
use engine::{Backend, Head, Llama};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Settings of `llama2 gatt`: the synthetic data, the evaluation and the fine-tune.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GattConfig {
    /// The model to teach (a checkpoint or its run directory).
    pub init: PathBuf,
    /// The world whose prompts, instructions and checkers GAtt uses.
    pub world: PathBuf,
    /// Writes `gatt.jsonl`, the fine-tune (`sft/`) and `report.json` here.
    pub out: PathBuf,
    /// User turns per synthetic dialogue (and turns measured by the adherence evaluation).
    pub turns: usize,
    /// Synthetic dialogues to sample.
    pub dialogues: usize,
    /// How often the training instruction is written in its short form (the paper: half).
    pub shorten_prob: f64,
    /// Sampling temperature of the assistant turns.
    pub temperature: f32,
    /// Samples drawn per assistant turn; the best instruction-following one is kept (see
    /// [`build_data`]).
    pub candidates: usize,
    pub max_new_tokens: usize,
    pub seed: u64,
    /// Dialogues per generation batch.
    pub batch: usize,
    /// Held-out dialogues of the before/after adherence evaluation.
    pub eval_dialogues: usize,
    /// Put the instruction into a system message instead of the first user turn (Llama 2's
    /// template renders both inside the first `[INST]`; the world's SFT data puts instructions
    /// in system messages). Applies to sampling, training and evaluation.
    pub system: bool,
    /// Extra dialogue files mixed into the fine-tune (e.g. the world's `sft.jsonl`), so the model
    /// does not drift on everything else; empty: GAtt data only, as the paper's rows.
    pub replay: Vec<PathBuf>,
    // The fine-tune (`sft::run` with these settings).
    pub epochs: usize,
    pub lr: f32,
    pub seq_len: usize,
    pub batch_size: usize,
    pub progress: bool,
}

impl Default for GattConfig {
    fn default() -> Self {
        GattConfig {
            init: PathBuf::new(),
            world: PathBuf::new(),
            out: PathBuf::new(),
            turns: 4,
            dialogues: 400,
            shorten_prob: 0.5,
            temperature: 0.8,
            candidates: 4,
            max_new_tokens: 40,
            seed: 0,
            batch: 64,
            eval_dialogues: 100,
            system: false,
            replay: vec![],
            epochs: 2,
            lr: 2e-5,
            seq_len: 256,
            batch_size: 8,
            progress: true,
        }
    }
}

/// A user message carrying an instruction: the instruction first, as a system prompt precedes the
/// user text in Llama 2's template. The annotator reads instructions from user turns as well.
pub fn with_instruction(instruction: &str, user: &str) -> String {
    format!("{} {}", instruction.trim(), user.trim())
}

/// A question usable as one user turn: a single-turn helpfulness prompt without a system message
/// (harmful requests are left out: their answer is a refusal, which the instruction should not
/// decorate). `core_words`: length of the bare answer, to skip word limits it cannot meet.
#[derive(Clone, Debug)]
pub struct Question {
    pub text: String,
    pub core_words: usize,
}

/// The questions of `prompts` (prompt rows, or whole single-turn dialogues) that can serve as
/// user turns.
pub fn questions(annotator: &Annotator, prompts: &[Example]) -> Vec<Question> {
    prompts
        .iter()
        .filter(|e| {
            e.turns == 1
                && e.category == Category::Helpfulness
                && e.messages.iter().all(|m| m.role != "system")
        })
        .filter_map(|e| {
            let u = e.messages.iter().position(|m| m.role == "user")?;
            let it = annotator.interpret(&e.messages[..=u])?;
            Some(Question {
                text: e.messages[u].content.clone(),
                core_words: word_count(&it.gold.core),
            })
        })
        .collect()
}

/// One planned dialogue: an instruction set and the questions of its turns.
#[derive(Clone, Debug)]
struct Plan {
    set: InstructionSet,
    questions: Vec<String>,
}

/// Draws `n` dialogue plans: the set is a single instruction half of the time and a pair
/// otherwise (as the world's own instructed data), the questions distinct, and only questions
/// whose bare answer fits when the set limits the length.
fn plans(
    qs: &[Question],
    sets: &[InstructionSet],
    max_words: usize,
    turns: usize,
    n: usize,
    seed: u64,
) -> Result<Vec<Plan>> {
    ensure!(!sets.is_empty(), "no instruction sets");
    ensure!(
        qs.len() >= turns,
        "{} usable questions, fewer than --turns {turns}",
        qs.len()
    );
    let singles: Vec<&InstructionSet> = sets.iter().filter(|s| s.0.len() == 1).collect();
    let pairs: Vec<&InstructionSet> = sets.iter().filter(|s| s.0.len() > 1).collect();
    let fitting: Vec<&Question> = qs.iter().filter(|q| q.core_words <= max_words).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let pool = if pairs.is_empty() || (!singles.is_empty() && rng.random_bool(0.5)) {
            &singles
        } else {
            &pairs
        };
        let mut set = pool[rng.random_range(0..pool.len())];
        if set.brief() && fitting.len() < turns {
            // Not enough short-answer questions for a word limit: take a set without one.
            match sets.iter().find(|s| !s.brief()) {
                Some(s) => set = s,
                None => continue,
            }
        }
        let chosen: Vec<String> = if set.brief() {
            fitting
                .choose_multiple(&mut rng, turns)
                .map(|q| q.text.clone())
                .collect()
        } else {
            qs.choose_multiple(&mut rng, turns)
                .map(|q| q.text.clone())
                .collect()
        };
        out.push(Plan {
            set: set.clone(),
            questions: chosen,
        });
    }
    Ok(out)
}

/// The conversation so far: `questions[..=k]` as user turns (with `first` prefixed to the first
/// and `every` to every later one) and `answers[..k]` between them.
fn dialogue(
    questions: &[String],
    answers: &[String],
    first: &str,
    every: &str,
    system: bool,
) -> Vec<Message> {
    let mut m = Vec::with_capacity(2 * answers.len() + 2);
    if system && !first.is_empty() {
        m.push(Message::new("system", first));
    }
    for (i, q) in questions.iter().take(answers.len() + 1).enumerate() {
        let instr = match (i, system) {
            (0, true) => "",
            (0, false) => first,
            _ => every,
        };
        let text = if instr.is_empty() {
            q.clone()
        } else {
            with_instruction(instr, q)
        };
        m.push(Message::new("user", &text));
        if let Some(a) = answers.get(i) {
            m.push(Message::new("assistant", a));
        }
    }
    m
}

/// What [`build_data`] made.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GattData {
    /// Training rows: `{"messages", "learn": "last", "instructions": ID, "turn": K}`.
    pub rows: Vec<serde_json::Value>,
    pub dialogues: usize,
    /// `reached[k]`: dialogues whose first k+1 assistant turns all followed the instruction.
    pub reached: Vec<usize>,
}

/// Builds Ghost Attention training rows from `prompts` with `model` (the latest model).
///
/// Each dialogue samples its assistant turns with the instruction (full form) concatenated to
/// every user turn. A tiny model follows instructions less reliably than the paper's RLHF model,
/// so each turn draws `cfg.candidates` samples and keeps the instruction-following one the gold
/// annotator (the world's stand-in for a reward model) rates most helpful: rejection sampling,
/// which the paper gets implicitly from its RLHF model. A dialogue stops at the first turn where
/// no sample follows the instruction; its earlier turns are still used.
///
/// A dialogue of m kept turns gives m rows (fewer when a prefix is longer than `cfg.seq_len`), the prefixes ending at assistant turn k, each with
/// `"learn": "last"` and the instruction only in the first user turn (full or, with probability
/// `shorten_prob`, short). One row per prefix is how "loss zero on every token of earlier turns"
/// still teaches every assistant turn: turn k is learned in its own row, with turns before it as
/// loss-free context. (One row per dialogue with only its last turn learned would waste the
/// earlier samples; one row with all turns learned would learn turn 1 with the instruction in the
/// same message, which is not the skill.)
pub fn build_data<B: Backend>(
    model: &mut Llama<B>,
    tok: &Tokenizer,
    annotator: &Annotator,
    prompts: &[Example],
    cfg: &GattConfig,
) -> Result<GattData> {
    let world = annotator.world();
    let qs = questions(annotator, prompts);
    let sets = world.instruction_sets();
    let plans = plans(
        &qs,
        &sets,
        world.max_words,
        cfg.turns,
        cfg.dialogues,
        cfg.seed,
    )?;
    let k = cfg.candidates.max(1);
    let mut answers: Vec<Vec<String>> = vec![Vec::new(); plans.len()];
    let mut live: Vec<usize> = (0..plans.len()).collect();
    let mut reached = vec![0usize; cfg.turns];
    for (turn, reached_t) in reached.iter_mut().enumerate() {
        if live.is_empty() {
            break;
        }
        let contexts: Vec<Vec<Message>> = live
            .iter()
            .map(|&d| {
                let full = plans[d].set.full();
                dialogue(&plans[d].questions, &answers[d], &full, &full, cfg.system)
            })
            .collect();
        // Every context `k` times in a row; a batch's rows are sampled independently.
        let expanded: Vec<Vec<Message>> = contexts
            .iter()
            .flat_map(|c| std::iter::repeat_n(c.clone(), k))
            .collect();
        let p = SamplingParams {
            temperature: cfg.temperature,
            max_new_tokens: cfg.max_new_tokens,
            seed: cfg.seed ^ (0x6A77 + turn as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            stop: vec![tok.eos],
            ..Default::default()
        };
        let samples = chat_answers(model, tok, &expanded, &p, cfg.batch.max(1) * k)?;
        let mut next = Vec::with_capacity(live.len());
        for (i, &d) in live.iter().enumerate() {
            let best = samples[i * k..(i + 1) * k]
                .iter()
                .filter(|a| plans[d].set.check(&a.text))
                .map(|a| (annotator.helpfulness(&contexts[i], &a.text), &a.text))
                .max_by(|x, y| x.0.total_cmp(&y.0));
            if let Some((_, text)) = best {
                answers[d].push(text.clone());
                next.push(d);
            }
        }
        *reached_t = next.len();
        live = next;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x0053_484F_5254);
    let mut rows = Vec::new();
    for (plan, ans) in plans.iter().zip(&answers) {
        if ans.is_empty() {
            continue;
        }
        let instr = if rng.random_bool(cfg.shorten_prob.clamp(0.0, 1.0)) {
            plan.set.short()
        } else {
            plan.set.full()
        };
        let msgs = dialogue(&plan.questions, ans, &instr, "", cfg.system);
        let sys = usize::from(cfg.system);
        for turn in 1..=ans.len() {
            if tok.chat(&msgs[..sys + 2 * turn])?.0.len() > cfg.seq_len {
                break; // it would be cut, and its learned answer with it
            }
            rows.push(serde_json::json!({
                "messages": &msgs[..sys + 2 * turn],
                "learn": "last",
                "instructions": plan.set.id(),
                "turn": turn,
            }));
        }
    }
    Ok(GattData {
        rows,
        dialogues: plans.len(),
        reached,
    })
}

/// Per-turn instruction following and helpfulness of a model.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Adherence {
    pub dialogues: usize,
    /// Dialogues still measured at turn 1..N: a dialogue stops once it no longer fits the
    /// model's context with room for the answer (a cut prompt would lose the first turn, and the
    /// instruction with it, so its answer says nothing about remembering it).
    pub measured: Vec<usize>,
    /// Share of the measured answers at turn 1..N that follow every instruction of the set.
    pub follow: Vec<f32>,
    /// Mean gold helpfulness at turn 1..N (halved per broken instruction, as the annotator does).
    pub helpfulness: Vec<f32>,
    /// Per kind of instruction (`upper`, `lower`, `start`, `end`, `persona`, `max_words`): the
    /// share of measured answers at turn 1..N that follow that instruction, over the dialogues
    /// having it.
    pub by_kind: std::collections::BTreeMap<String, Vec<f32>>,
}

impl Adherence {
    /// The share of all measured answers at turns `from..=N` (1-based) that follow the
    /// instruction: the turns pooled, each weighted by its measured dialogues.
    pub fn pooled(&self, from: usize) -> f32 {
        let skip = from.saturating_sub(1);
        let (hits, n) = self
            .follow
            .iter()
            .zip(&self.measured)
            .skip(skip)
            .fold((0.0f32, 0usize), |(h, n), (&f, &m)| {
                (h + f * m as f32, n + m)
            });
        hits / n.max(1) as f32
    }
}

/// How [`adherence_eval`] measures.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AdherenceOpts {
    pub turns: usize,
    pub dialogues: usize,
    pub seed: u64,
    pub max_new_tokens: usize,
    pub batch: usize,
    /// The instruction in a system message rather than the first user turn.
    pub system: bool,
}

impl Default for AdherenceOpts {
    fn default() -> Self {
        AdherenceOpts {
            turns: 4,
            dialogues: 100,
            seed: 0,
            max_new_tokens: 40,
            batch: 64,
            system: false,
        }
    }
}

/// Measures instruction adherence per turn: `opts.dialogues` conversations of `opts.turns`
/// questions from `prompts`, each under a set drawn from `sets` written (in full) into the first
/// user turn only (or the system message), answered greedily with the model's own answers fed
/// back as the conversation goes on, and checked with the world's instruction checkers.
pub fn adherence_eval<B: Backend>(
    model: &mut Llama<B>,
    tok: &Tokenizer,
    annotator: &Annotator,
    prompts: &[Example],
    sets: &[InstructionSet],
    opts: &AdherenceOpts,
) -> Result<Adherence> {
    use std::collections::BTreeMap;
    let turns = opts.turns;
    let qs = questions(annotator, prompts);
    let plans = plans(
        &qs,
        sets,
        annotator.world().max_words,
        turns,
        opts.dialogues,
        opts.seed,
    )?;
    // What `chat_answers` keeps of a prompt.
    let ctx = model.cfg.max_position_embeddings;
    let keep = ctx.saturating_sub(opts.max_new_tokens.min(ctx / 2)).max(2);
    let kind = |i: &crate::world::Instruction| {
        let id = i.id();
        id.split(':').next().unwrap_or_default().to_string()
    };
    // Per kind and turn: (followed, measured).
    let mut kinds: BTreeMap<String, Vec<(usize, usize)>> = BTreeMap::new();
    let mut answers: Vec<Vec<String>> = vec![Vec::new(); plans.len()];
    let mut live: Vec<usize> = (0..plans.len()).collect();
    let mut out = Adherence {
        dialogues: plans.len(),
        measured: vec![0; turns],
        follow: vec![0.0; turns],
        helpfulness: vec![0.0; turns],
        by_kind: BTreeMap::new(),
    };
    for t in 0..turns {
        let mut contexts = Vec::with_capacity(live.len());
        let mut fits = Vec::with_capacity(live.len());
        for &d in &live {
            let p = &plans[d];
            let c = dialogue(&p.questions, &answers[d], &p.set.full(), "", opts.system);
            if tok.chat(&c)?.0.len() <= keep {
                contexts.push(c);
                fits.push(d);
            }
        }
        live = fits;
        let got = chat_answers(
            model,
            tok,
            &contexts,
            &greedy(opts.max_new_tokens, tok.eos),
            opts.batch,
        )?;
        for ((&d, c), g) in live.iter().zip(&contexts).zip(got) {
            let set = &plans[d].set;
            out.follow[t] += f32::from(u8::from(set.check(&g.text)));
            out.helpfulness[t] += annotator.helpfulness(c, &g.text);
            for i in &set.0 {
                let e = kinds.entry(kind(i)).or_insert_with(|| vec![(0, 0); turns]);
                e[t].0 += usize::from(i.check(&g.text));
                e[t].1 += 1;
            }
            answers[d].push(g.text);
        }
        out.measured[t] = live.len();
        let m = live.len().max(1) as f32;
        out.follow[t] /= m;
        out.helpfulness[t] /= m;
    }
    out.by_kind = kinds
        .into_iter()
        .map(|(k, v)| {
            let rates = v.iter().map(|&(h, n)| h as f32 / n.max(1) as f32).collect();
            (k, rates)
        })
        .collect();
    Ok(out)
}

/// [`adherence_eval`]'s per-turn instruction-following rates (turn 1..N), instruction in the
/// first user turn, greedy answers of up to 40 tokens.
#[allow(clippy::too_many_arguments)]
pub fn adherence<B: Backend>(
    model: &mut Llama<B>,
    tok: &Tokenizer,
    annotator: &Annotator,
    prompts: &[Example],
    sets: &[InstructionSet],
    turns: usize,
    n_dialogues: usize,
    seed: u64,
) -> Result<Vec<f32>> {
    let opts = AdherenceOpts {
        turns,
        dialogues: n_dialogues,
        seed,
        ..Default::default()
    };
    Ok(adherence_eval(model, tok, annotator, prompts, sets, &opts)?.follow)
}

/// What `llama2 gatt` did (also `report.json` in the output directory).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GattReport {
    pub adherence_before: Adherence,
    pub adherence_after: Adherence,
    /// Synthetic dialogues sampled, and how many kept 1..N instruction-following turns.
    pub dialogues: usize,
    pub reached: Vec<usize>,
    pub rows: usize,
    pub data: PathBuf,
    pub checkpoint: PathBuf,
    pub final_val_loss: Option<f32>,
    /// Wall-clock seconds per phase: `eval_before`, `data`, `finetune`, `eval_after`.
    pub seconds: std::collections::BTreeMap<String, f64>,
}

/// `gatt` (`llama2 gatt`): builds the synthetic data with the `init` model from the world's
/// `rlhf_prompts.jsonl` (writing `out/gatt.jsonl`), fine-tunes on it (`out/sft/`, the paper's SFT
/// loop), and measures adherence per turn before and after on the held-out `eval.jsonl`
/// questions (`out/report.json`).
pub fn run<B: Backend>(be: B, cfg: &GattConfig) -> Result<GattReport> {
    let init = &crate::run_dir::model_dir(&cfg.init)?;
    let (world_dir, out) = (&cfg.world, &cfg.out);
    ensure!(cfg.turns >= 1, "--turns must be at least 1");
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let annotator = Annotator::new(World::load(world_dir)?);
    let prompts = read_examples(&world_dir.join("rlhf_prompts.jsonl"))?;
    let eval = read_examples(&world_dir.join("eval.jsonl"))?;
    let sets = annotator.world().instruction_sets();
    let tok = Tokenizer::from_file(&crate::sft::tokenizer_for(init, None)?)?;
    let opts = AdherenceOpts {
        turns: cfg.turns,
        dialogues: cfg.eval_dialogues,
        seed: cfg.seed ^ 0xE7A1,
        max_new_tokens: cfg.max_new_tokens,
        batch: cfg.batch,
        system: cfg.system,
    };
    let measure = |m: &mut Llama<B>| adherence_eval(m, &tok, &annotator, &eval, &sets, &opts);
    let mut seconds = std::collections::BTreeMap::new();
    let mut clock = std::time::Instant::now();
    let mut lap = |name: &str| {
        seconds.insert(name.to_string(), clock.elapsed().as_secs_f64());
        clock = std::time::Instant::now();
    };
    let mut model = load_model(be.clone(), init, Head::Lm)
        .with_context(|| format!("loading {}", init.display()))?;
    let before = measure(&mut model)?;
    lap("eval_before");
    let data = build_data(&mut model, &tok, &annotator, &prompts, cfg)?;
    drop(model);
    lap("data");
    ensure!(
        !data.rows.is_empty(),
        "no sampled answer followed its instruction: nothing to fine-tune on"
    );
    let data_path = out.join("gatt.jsonl");
    crate::run_dir::write_jsonl(&data_path, &data.rows)?;
    let mut files = vec![data_path.clone()];
    files.extend(cfg.replay.iter().cloned());
    let mut tc = SftConfig::new(init.to_path_buf(), files, out.join("sft"));
    tc.epochs = cfg.epochs;
    tc.lr = cfg.lr;
    tc.seq_len = cfg.seq_len;
    tc.batch_size = cfg.batch_size;
    tc.seed = cfg.seed;
    tc.progress = cfg.progress;
    let rep = crate::sft::run(be.clone(), &tc)?;
    let ckpt = rep.checkpoint.clone().expect("sft::run checks");
    lap("finetune");
    let mut tuned = load_model(be, &ckpt, Head::Lm)?;
    let after = measure(&mut tuned)?;
    lap("eval_after");
    let report = GattReport {
        adherence_before: before,
        adherence_after: after,
        dialogues: data.dialogues,
        reached: data.reached,
        rows: data.rows.len(),
        data: data_path,
        checkpoint: ckpt,
        final_val_loss: rep.final_val_loss,
        seconds,
    };
    crate::run_dir::write_json(&out.join("report.json"), &report)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instruction_placement() {
        let q = ["What is 2 + 3?".to_string(), "How old is Zorb?".to_string()];
        let a = ["5.".to_string()];
        // Sampling: the instruction before every question.
        let m = dialogue(&q, &a, "Uppercase.", "Uppercase.", false);
        let texts: Vec<&str> = m.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(
            texts,
            [
                "Uppercase. What is 2 + 3?",
                "5.",
                "Uppercase. How old is Zorb?"
            ]
        );
        // Training: the first turn only.
        let m = dialogue(&q, &a, "Uppercase.", "", false);
        assert_eq!(m[2].content, "How old is Zorb?");
        // System placement: a system message, no user turn carries it.
        let m = dialogue(&q, &a, "Uppercase.", "", true);
        assert_eq!(m.len(), 4);
        assert_eq!(
            (m[0].role.as_str(), m[1].content.as_str()),
            ("system", "What is 2 + 3?")
        );
    }
}
