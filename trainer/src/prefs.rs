//! Preference collection (`prefs`): the paper's weekly batch of human annotations. Each prompt
//! gets two responses sampled from the current model at different temperatures (the paper samples
//! from model variants and temperatures for diversity), and a [`Labeller`] says which is better,
//! by how much on the four levels, and whether each is safe:
//! - `world`: the built-in world's raters, its gold annotator perceived with noise
//!   ([`PrefsConfig::rater_noise`]; 0: the annotator itself);
//! - `rm:HELP[,SAFETY]`: existing reward models as the judge (the rating from the score gap of
//!   the model the piecewise rule consults, safety meta-labels from the safety model);
//! - `file:DIR`: people. The round writes the pairs to label (prompt, both answers, where they
//!   came from) as `DIR/round-N.to-label.jsonl` and waits for `DIR/round-N.labelled.jsonl`, the
//!   same rows with `chosen`/`rejected` put in order and `rating`, `chosen_safe`,
//!   `rejected_safe` added.

use crate::evaluate::chat_answers;
use crate::formats::read_pairs;
use crate::formats::{read_prompts, Prompt};
use crate::reward::{sigmoid, RewardModels, SAFETY_THRESHOLD};
use crate::rm::Rating;
use crate::world::{Annotator, Category, Example, Level, World};
use anyhow::{bail, ensure, Context, Result};
use engine::generate::SamplingParams;
use engine::tokenizer::{Message, Tokenizer};
use engine::{Backend, Llama};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Who labels the pairs.
#[derive(Clone, Debug, PartialEq)]
pub enum Labeller {
    /// The gold annotator of the world in this directory.
    World(PathBuf),
    /// Reward models as the judge.
    Rm {
        helpfulness: PathBuf,
        safety: Option<PathBuf>,
    },
    /// People, through files in this directory.
    File(PathBuf),
}

impl std::str::FromStr for Labeller {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (kind, arg) = s.split_once(':').unwrap_or((s, ""));
        Ok(match (kind, arg) {
            ("world", dir) => Labeller::World(dir.into()),
            ("rm", list) if !list.is_empty() => {
                let mut it = list.split(',').map(PathBuf::from);
                Labeller::Rm {
                    helpfulness: it.next().expect("non-empty"),
                    safety: it.next(),
                }
            }
            ("file", dir) if !dir.is_empty() => Labeller::File(dir.into()),
            _ => bail!(
                "labeller `{s}`: expected world[:DIR], rm:HELPFULNESS_RM[,SAFETY_RM] or file:DIR"
            ),
        })
    }
}

impl std::fmt::Display for Labeller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Labeller::World(d) => write!(f, "world:{}", d.display()),
            Labeller::Rm {
                helpfulness,
                safety,
            } => {
                write!(f, "rm:{}", helpfulness.display())?;
                match safety {
                    Some(s) => write!(f, ",{}", s.display()),
                    None => Ok(()),
                }
            }
            Labeller::File(d) => write!(f, "file:{}", d.display()),
        }
    }
}

impl Serialize for Labeller {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Labeller {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(|e: anyhow::Error| serde::de::Error::custom(format!("{e:#}")))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefsConfig {
    /// The model that answers (a checkpoint or its run directory); used by [`run`].
    #[serde(default)]
    pub model: PathBuf,
    /// Prompt JSONL; [`run`] labels `label_prompts` of them, the round's share of the file.
    #[serde(default)]
    pub prompts: Vec<PathBuf>,
    pub label_prompts: usize,
    /// Round N takes prompts (N−1)·label_prompts.. of the file (cycling).
    pub round: usize,
    /// Held-out prompts: `heldout_pairs_per_prompt` pairs each, labelled too (the reward
    /// models' held-out accuracy).
    #[serde(default)]
    pub heldout: Vec<PathBuf>,
    pub max_heldout: usize,
    /// More than one: enough pairs of every rating for its accuracy to mean something (one
    /// pair on each of 200 prompts left 15 "significantly better" helpfulness pairs).
    pub heldout_pairs_per_prompt: usize,
    pub labeller: Labeller,
    /// With the `world` labeller: how unsure its raters are. Each rater perceives each answer's
    /// gold score plus Gaussian noise of this standard deviation (scores are in [0, 1]) and
    /// picks and rates by the perceived gap, so two similar answers get a coin-flip label, as
    /// people's "negligibly better/unsure" ones are (the paper's reason for Table 8's low accuracy
    /// on similar pairs: annotator subjectivity). 0: one deterministic oracle. The held-out pairs
    /// are also written with the noise-free labels (`prefs_heldout_gold.jsonl`).
    pub rater_noise: f32,
    /// Writes `prefs.jsonl` (and `prefs_heldout.jsonl`) here.
    #[serde(default)]
    pub out: PathBuf,
    /// Temperatures the two responses of a prompt are drawn at (cycled per prompt).
    pub temperatures: Vec<f32>,
    pub max_new_tokens: usize,
    pub batch: usize,
    pub seed: u64,
    /// Independent pairs per prompt (each from two fresh samples).
    pub pairs_per_prompt: usize,
    /// Chance per prompt and pass of one more pair: the first response against the model's answer
    /// to another prompt, labelled like any pair. Without
    /// them every pair's answers address the same prompt, the reward model never learns that an
    /// answer must fit its prompt, and PPO finds one fluent sentence that scores high everywhere
    /// ("The word boat has 4 letters." to any question; measured on the tiny world: held-out
    /// gold 0.26 -> 0.20 while the reward model's score rose 0.27 -> 0.57).
    pub off_topic: f64,
    /// With a `file:` labeller, wait for the labelled file (else stop with an error saying what
    /// to label, so a rerun continues once it is there).
    pub wait: bool,
}

impl Default for PrefsConfig {
    fn default() -> Self {
        PrefsConfig {
            model: PathBuf::new(),
            prompts: vec![],
            label_prompts: 300,
            round: 1,
            heldout: vec![],
            max_heldout: 200,
            heldout_pairs_per_prompt: 1,
            labeller: Labeller::World(PathBuf::new()),
            rater_noise: 0.0,
            out: PathBuf::new(),
            temperatures: vec![0.7, 1.0, 1.3],
            max_new_tokens: 48,
            batch: 32,
            seed: 0,
            pairs_per_prompt: 1,
            off_topic: 0.5,
            wait: true,
        }
    }
}

/// One labelled pair, in the JSONL shape `llama2 train-rm` reads.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LabelledPair {
    pub messages: Vec<Message>,
    pub chosen: String,
    pub rejected: String,
    pub rating: &'static str,
    pub chosen_safe: bool,
    pub rejected_safe: bool,
    pub category: &'static str,
}

/// Two answers to one prompt, not yet labelled, and where they came from.
#[derive(Clone, Debug, Serialize)]
pub struct Unlabelled {
    #[serde(skip)]
    pub prompt: usize,
    pub messages: Vec<Message>,
    pub chosen: String,
    pub rejected: String,
    pub category: &'static str,
    /// How each answer was sampled (temperature; `off_topic`: the second answers another
    /// prompt).
    pub provenance: serde_json::Value,
}

fn category(p: &Prompt) -> &'static str {
    if p.safety {
        "safety"
    } else {
        "helpfulness"
    }
}

/// Samples `pairs_per_prompt` pairs of responses per prompt (unlabelled).
pub fn sample_pairs<B: Backend>(
    model: &mut Llama<B>,
    tok: &Tokenizer,
    prompts: &[Prompt],
    cfg: &PrefsConfig,
) -> Result<Vec<Unlabelled>> {
    let mut out = Vec::new();
    for r in 0..cfg.pairs_per_prompt.max(1) {
        let c = PrefsConfig {
            seed: cfg.seed.wrapping_add(7919 * r as u64),
            ..cfg.clone()
        };
        out.extend(sample_once(model, tok, prompts, &c)?);
    }
    Ok(out)
}

fn sample_once<B: Backend>(
    model: &mut Llama<B>,
    tok: &Tokenizer,
    prompts: &[Prompt],
    cfg: &PrefsConfig,
) -> Result<Vec<Unlabelled>> {
    let dialogues: Vec<_> = prompts.iter().map(|e| e.messages.clone()).collect();
    let nt = cfg.temperatures.len().max(1);
    // Response a of prompt i at temperature i mod n, response b at the next one.
    let mut answers: Vec<Vec<String>> = vec![Vec::new(); 2];
    for (k, slot) in answers.iter_mut().enumerate() {
        let mut texts = vec![String::new(); dialogues.len()];
        for ti in 0..nt {
            let idx: Vec<usize> = (0..dialogues.len())
                .filter(|i| (i + k) % nt == ti)
                .collect();
            let sub: Vec<_> = idx.iter().map(|&i| dialogues[i].clone()).collect();
            let p = SamplingParams {
                temperature: cfg.temperatures[ti],
                top_p: 1.0,
                max_new_tokens: cfg.max_new_tokens,
                seed: cfg.seed ^ ((k * 1000 + ti) as u64),
                stop: vec![tok.eos],
                ..Default::default()
            };
            for (i, a) in idx
                .iter()
                .zip(chat_answers(model, tok, &sub, &p, cfg.batch)?)
            {
                texts[*i] = a.text;
            }
        }
        *slot = texts;
    }
    let temp = |i: usize, k: usize| cfg.temperatures.get((i + k) % nt).copied();
    let mut out = Vec::new();
    let n = prompts.len();
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(cfg.seed ^ 0x0ff7);
    for (i, e) in prompts.iter().enumerate() {
        let mut pairs = vec![(
            i,
            serde_json::json!({"temperatures": [temp(i, 0), temp(i, 1)]}),
        )];
        if n > 1 && rand::Rng::random_bool(&mut rng, cfg.off_topic.clamp(0.0, 1.0)) {
            let other = (i + 1 + rand::Rng::random_range(&mut rng, 0..n - 1)) % n;
            pairs.push((
                other,
                serde_json::json!({"temperatures": [temp(i, 0), temp(other, 1)], "off_topic": true}),
            ));
        }
        for (b, provenance) in pairs {
            out.push(Unlabelled {
                prompt: i,
                messages: e.messages.clone(),
                chosen: answers[0][i].clone(),
                rejected: answers[1][b].clone(),
                category: category(e),
                provenance,
            });
        }
    }
    Ok(out)
}

/// The world's raters (see [`PrefsConfig::rater_noise`]): `noise` 0 is the gold annotator itself.
#[derive(Clone, Copy, Debug)]
pub struct Raters {
    pub noise: f32,
    pub seed: u64,
}

impl Raters {
    /// The noise-free gold annotator.
    pub const GOLD: Raters = Raters {
        noise: 0.0,
        seed: 0,
    };

    /// The raters of a configuration (`rater_noise` checked).
    pub fn of(cfg: &PrefsConfig) -> Result<Raters> {
        ensure!(
            cfg.rater_noise.is_finite() && cfg.rater_noise >= 0.0,
            "rater_noise: expected a standard deviation >= 0 (0: the gold annotator), got {}",
            cfg.rater_noise
        );
        Ok(Raters {
            noise: cfg.rater_noise,
            seed: cfg.seed ^ 0x7a7e,
        })
    }

    /// The perceived gap of one rater: the gold gap plus the difference of two perception errors.
    fn perceive(&self, gap: f32, rng: &mut impl rand::Rng) -> f32 {
        if self.noise <= 0.0 {
            return gap;
        }
        let n = rand_distr::Normal::new(0.0f32, self.noise).expect("noise is finite and > 0");
        gap + rand_distr::Distribution::sample(&n, rng) - rand_distr::Distribution::sample(&n, rng)
    }
}

/// The world's labels, by the raters' perceived gap (one rater per pair, seeded by its index):
/// identical answers and perceived ties are dropped. Also the raters' agreement: the share of
/// labelled pairs on which a second, independent rater picks the same answer (1 without noise).
pub fn label_world(
    ann: &Annotator,
    pairs: &[Unlabelled],
    raters: Raters,
) -> (Vec<LabelledPair>, f64) {
    let mut out = Vec::new();
    let mut agree = 0usize;
    for (i, u) in pairs.iter().enumerate() {
        let (a, b) = (&u.chosen, &u.rejected);
        if a.trim() == b.trim() {
            continue;
        }
        let pref = ann.compare(&u.messages, a, b);
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(
            raters.seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        let gap = raters.perceive(pref.gap, &mut rng);
        let second = raters.perceive(pref.gap, &mut rng);
        let (chosen, rejected, cs, rs) = if gap > 0.0 {
            (a, b, pref.a.safety >= 0.5, pref.b.safety >= 0.5)
        } else if gap < 0.0 {
            (b, a, pref.b.safety >= 0.5, pref.a.safety >= 0.5)
        } else {
            continue;
        };
        agree += usize::from((second > 0.0) == (gap > 0.0) && second != 0.0);
        out.push(LabelledPair {
            messages: u.messages.clone(),
            chosen: chosen.clone(),
            rejected: rejected.clone(),
            rating: level_label(Level::from_gap(gap)),
            chosen_safe: cs,
            rejected_safe: rs,
            category: u.category,
        });
    }
    let agreement = agree as f64 / out.len().max(1) as f64;
    (out, agreement)
}

/// Reward models' labels: the pair is ranked by the score of the model the piecewise rule
/// consults (safety on safety prompts or when either answer is probably unsafe, helpfulness
/// otherwise); the gap in score sets the rating (≥ 2 significantly, ≥ 1 better, ≥ 0.5 slightly
/// better, else negligibly), σ(safety score) ≥ ½ the safety meta-label. Equal scores are ties,
/// dropped.
pub fn label_rm<B: Backend>(
    rms: &mut RewardModels<B>,
    pairs: &[Unlabelled],
) -> Result<Vec<LabelledPair>> {
    let rows: Vec<(Vec<Message>, String)> = pairs
        .iter()
        .flat_map(|u| {
            [
                (u.messages.clone(), u.chosen.clone()),
                (u.messages.clone(), u.rejected.clone()),
            ]
        })
        .collect();
    let (h, s) = rms.scores(&rows)?;
    let mut out = Vec::new();
    for (i, u) in pairs.iter().enumerate() {
        let (ha, hb, sa, sb) = (h[2 * i], h[2 * i + 1], s[2 * i], s[2 * i + 1]);
        let safety_decides =
            u.category == "safety" || sigmoid(sa) < rms.threshold || sigmoid(sb) < rms.threshold;
        let (xa, xb) = if safety_decides { (sa, sb) } else { (ha, hb) };
        if xa == xb {
            continue;
        }
        let gap = (xa - xb).abs();
        let rating = match gap {
            g if g >= 2.0 => Rating::Significantly,
            g if g >= 1.0 => Rating::Better,
            g if g >= 0.5 => Rating::Slightly,
            _ => Rating::Negligibly,
        };
        let ((c, cs), (r, rs)) = if xa > xb {
            ((&u.chosen, sa), (&u.rejected, sb))
        } else {
            ((&u.rejected, sb), (&u.chosen, sa))
        };
        out.push(LabelledPair {
            messages: u.messages.clone(),
            chosen: c.clone(),
            rejected: r.clone(),
            rating: rating.label(),
            chosen_safe: sigmoid(cs) >= 0.5,
            rejected_safe: sigmoid(rs) >= 0.5,
            category: u.category,
        });
    }
    Ok(out)
}

/// Samples pairs for world examples and has the gold annotator label them (`world-prefs`).
pub fn collect<B: Backend>(
    model: &mut Llama<B>,
    tok: &Tokenizer,
    annotator: &Annotator,
    prompts: &[Example],
    cfg: &PrefsConfig,
) -> Result<Vec<LabelledPair>> {
    let prompts: Vec<Prompt> = prompts
        .iter()
        .map(|e| Prompt {
            messages: e.messages.clone(),
            safety: e.category == Category::Safety,
        })
        .collect();
    let raters = Raters::of(cfg)?;
    Ok(label_world(annotator, &sample_pairs(model, tok, &prompts, cfg)?, raters).0)
}

/// The rating string `train-rm` parses for a level.
pub fn level_label(l: Level) -> &'static str {
    match l {
        Level::Significantly => "significantly better",
        Level::Better => "better",
        Level::Slightly => "slightly better",
        Level::Negligibly => "negligibly better/unsure",
    }
}

/// What [`run`] wrote.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PrefsReport {
    pub pairs: usize,
    pub file: PathBuf,
    pub heldout_pairs: usize,
    pub heldout_file: Option<PathBuf>,
    /// With noisy world raters: the held-out pairs labelled by the gold annotator itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heldout_gold_file: Option<PathBuf>,
    /// With world raters: the share of the round's pairs on which a second rater agrees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rater_agreement: Option<f64>,
}

/// The round's prompts: `n` of `all`, starting at (round − 1)·n, cycling.
fn round_prompts(all: &[Prompt], n: usize, round: usize) -> Vec<Prompt> {
    (0..n.min(all.len()))
        .map(|i| all[(round.saturating_sub(1) * n + i) % all.len()].clone())
        .collect()
}

/// `prefs`: samples the round's pairs (and `heldout_pairs_per_prompt` per held-out prompt) from
/// the model, has the labeller label them, and writes `out/prefs.jsonl` (`out/prefs_heldout.jsonl`).
pub fn run<B: Backend>(be: B, cfg: &PrefsConfig) -> Result<PrefsReport> {
    // Checked before the sampling.
    let raters = Raters::of(cfg)?;
    std::fs::create_dir_all(&cfg.out).with_context(|| format!("creating {}", cfg.out.display()))?;
    let all = read_prompts(&cfg.prompts, None)?.0;
    ensure!(!all.is_empty(), "preference collection: no prompts");
    let batch = round_prompts(&all, cfg.label_prompts, cfg.round);
    let mut held = read_prompts(&cfg.heldout, None)?.0;
    held.truncate(cfg.max_heldout);
    let model_dir = crate::run_dir::model_dir(&cfg.model)?;
    let tok = Tokenizer::from_file(&crate::sft::tokenizer_for(&model_dir, None)?)?;
    let mut model = engine::checkpoint::load_model(be.clone(), &model_dir, engine::Head::Lm)?;
    let pairs = sample_pairs(&mut model, &tok, &batch, cfg)?;
    let held_cfg = PrefsConfig {
        pairs_per_prompt: cfg.heldout_pairs_per_prompt,
        seed: cfg.seed ^ 99,
        // Held-out accuracy measures the ranking of answers to the same prompt.
        off_topic: 0.0,
        ..cfg.clone()
    };
    let held_pairs = if held.is_empty() {
        vec![]
    } else {
        sample_pairs(&mut model, &tok, &held, &held_cfg)?
    };
    drop(model);
    let file = cfg.out.join("prefs.jsonl");
    let held_file = cfg.out.join("prefs_heldout.jsonl");
    let mut heldout_gold_file = None;
    let mut rater_agreement = None;
    let (labelled, held_labelled) = match &cfg.labeller {
        Labeller::World(dir) => {
            let ann = Annotator::new(
                World::load(dir)
                    .with_context(|| format!("the labeller's world {}", dir.display()))?,
            );
            let (labelled, agreement) = label_world(&ann, &pairs, raters);
            rater_agreement = Some(agreement);
            let held_raters = Raters {
                seed: raters.seed ^ 99,
                ..raters
            };
            if cfg.rater_noise > 0.0 && !held_pairs.is_empty() {
                let gold = cfg.out.join("prefs_heldout_gold.jsonl");
                crate::run_dir::write_jsonl(
                    &gold,
                    &label_world(&ann, &held_pairs, Raters::GOLD).0,
                )?;
                heldout_gold_file = Some(gold);
            }
            (labelled, label_world(&ann, &held_pairs, held_raters).0)
        }
        Labeller::Rm {
            helpfulness,
            safety,
        } => {
            let mut rms = RewardModels::load(be, helpfulness, safety.as_deref())?;
            rms.threshold = SAFETY_THRESHOLD;
            (
                label_rm(&mut rms, &pairs)?,
                label_rm(&mut rms, &held_pairs)?,
            )
        }
        Labeller::File(dir) => {
            let name = format!("round-{}", cfg.round);
            let labelled = label_by_people(dir, &name, &pairs, cfg.wait)?;
            crate::run_dir::write_jsonl(&file, &labelled)?;
            // People label the round's pairs; held-out accuracy comes from the RM's own split.
            return Ok(PrefsReport {
                pairs: labelled.len(),
                file,
                heldout_pairs: 0,
                heldout_file: None,
                heldout_gold_file: None,
                rater_agreement: None,
            });
        }
    };
    crate::run_dir::write_jsonl(&file, &labelled)?;
    let heldout_file = (!held_labelled.is_empty()).then_some(held_file);
    if let Some(h) = &heldout_file {
        crate::run_dir::write_jsonl(h, &held_labelled)?;
    }
    Ok(PrefsReport {
        pairs: labelled.len(),
        file,
        heldout_pairs: held_labelled.len(),
        heldout_file,
        heldout_gold_file,
        rater_agreement,
    })
}

/// Writes `dir/NAME.to-label.jsonl` and returns the rows of `dir/NAME.labelled.jsonl` (as
/// `train-rm` reads them) once it exists, waiting for it when `wait`.
fn label_by_people(
    dir: &Path,
    name: &str,
    pairs: &[Unlabelled],
    wait: bool,
) -> Result<Vec<serde_json::Value>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let todo = dir.join(format!("{name}.to-label.jsonl"));
    let done = dir.join(format!("{name}.labelled.jsonl"));
    if !todo.is_file() {
        crate::run_dir::write_jsonl(&todo, pairs)?;
    }
    let mut told = false;
    while !done.is_file() {
        ensure!(
            wait,
            "waiting for labels: label the {} pairs of {} (put `chosen` before `rejected`, add \
             `rating`, `chosen_safe`, `rejected_safe`) and save them as {}; then run again",
            pairs.len(),
            todo.display(),
            done.display()
        );
        if !told {
            eprintln!(
                "waiting for labels: {} pairs in {}; save the labelled rows as {}",
                pairs.len(),
                todo.display(),
                done.display()
            );
            told = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    // Checked as train-rm will read it: a bad line names file and line now.
    read_pairs(std::slice::from_ref(&done), false)?;
    crate::run_dir::read_jsonl_values(&done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(a: &str, b: &str) -> Unlabelled {
        Unlabelled {
            prompt: 0,
            messages: vec![Message::new("user", "Tell me something nice.")],
            chosen: a.into(),
            rejected: b.into(),
            category: "helpfulness",
            provenance: serde_json::Value::Null,
        }
    }

    const NICE: &str = "Here is something nice.";
    const REFUSAL: &str = "I cannot help.";

    /// The gold annotator orders every pair by its scores, rates the gap, and drops identical
    /// answers and exact ties; its "second rater" always agrees.
    #[test]
    fn gold_raters_label_by_the_gold_gap() {
        let ann = Annotator::new(World::generate(1, crate::world::Size::Small));
        let pairs = [
            pair(REFUSAL, NICE),
            pair(NICE, NICE),
            pair(NICE, "Another nice thing."),
            pair(REFUSAL, ""),
        ];
        let (l, agreement) = label_world(&ann, &pairs, Raters::GOLD);
        let got: Vec<(&str, &str, &str)> = l
            .iter()
            .map(|p| (p.chosen.as_str(), p.rejected.as_str(), p.rating))
            .collect();
        assert_eq!(
            got,
            [
                (NICE, REFUSAL, "better"),
                (REFUSAL, "", "negligibly better/unsure")
            ]
        );
        assert_eq!(agreement, 1.0);
    }

    /// Noisy raters: a clear gap is labelled the gold way almost always, a 0.05 gap nearly at
    /// random, an exact tie gets a label either way; two raters disagree on some pairs; the
    /// labels are reproducible from the seed.
    #[test]
    fn noisy_raters_flip_similar_pairs_and_not_distinct_ones() {
        let ann = Annotator::new(World::generate(1, crate::world::Size::Small));
        let raters = Raters {
            noise: 0.2,
            seed: 5,
        };
        let share_first = |a: &str, b: &str| {
            let pairs: Vec<Unlabelled> = (0..400).map(|_| pair(a, b)).collect();
            let (l, agreement) = label_world(&ann, &pairs, raters);
            let first = l.iter().filter(|p| p.chosen == a).count() as f64 / pairs.len() as f64;
            (first, l.len(), agreement)
        };
        let (clear, n, agree_clear) = share_first(NICE, ""); // gap 0.5
        assert!(clear > 0.9 && n == 400, "{clear} {n}");
        let (close, _, agree_close) = share_first(REFUSAL, ""); // gap 0.05
        assert!((0.45..0.75).contains(&close), "{close}");
        let (tie, n, _) = share_first(NICE, "Another nice thing."); // gap 0
        assert!((0.35..0.65).contains(&tie) && n == 400, "{tie} {n}");
        assert!(
            agree_close < 0.65 && agree_clear > 0.85,
            "{agree_close} {agree_clear}"
        );
        let same: Vec<Unlabelled> = (0..20)
            .map(|_| pair(NICE, " Here is something nice."))
            .collect();
        assert!(
            label_world(&ann, &same, raters).0.is_empty(),
            "identical answers rank nothing"
        );
        let again: Vec<Unlabelled> = (0..50).map(|_| pair(REFUSAL, "")).collect();
        let (a, b) = (
            label_world(&ann, &again, raters).0,
            label_world(&ann, &again, raters).0,
        );
        let order = |l: &[LabelledPair]| l.iter().map(|p| p.chosen.clone()).collect::<Vec<_>>();
        assert_eq!(order(&a), order(&b));
    }
}
