//! A recipe: the Llama 2 training recipe as a TOML file (as torchtitan configures its runs): the
//! base model, each stage's data and settings, and the rounds of RLHF (which stages each round
//! runs: the paper's V1–V3 ran rejection sampling only, PPO came from V4 on), then Ghost
//! Attention and safety context distillation. `llama2 recipe run FILE` runs it, `llama2 recipe
//! plan FILE` prints what would run, and `llama2 pipeline` is the built-in world's recipe
//! (`recipes/world-tiny.toml`).
//!
//! A recipe is planned into steps, each a stage's `run(backend, &Config)` writing one directory
//! under `out`. A step that finishes writes `step.json` (its key and report) there last, atomically;
//! on a rerun a step whose `step.json` holds the same key is skipped, like a build system, so a
//! killed recipe continues where it stopped. The key chains the step's configuration with the
//! previous step's key: changing a stage's settings reruns it and everything after it.
//!
//! Every stage's settings are its config struct's fields (`rs::RsConfig`, `ppo::PpoConfig`,
//! ...), whose defaults are the paper's; a section overrides any of them, a `[[round]]`'s own
//! table (`[round.ppo]`) overrides them for that round, and an unknown name is an error naming
//! the section. Strings starting with `world:` name files of the generated world. Paths are
//! relative to the working directory.
//!
//! The finishing stages take the user's files instead of a world: `[gatt] instructions` and
//! `dialogue_file` (judged by the recipe's helpfulness reward model unless `reward_model` names
//! one), `[distill] categories` and `prompts` (formats: `gatt.rs`, `distill.rs`;
//! `recipes/user-data.toml` is a whole recipe on user files).

use crate::distill::DistillConfig;
use crate::evaluate::{EvalConfig, StageEval};
use crate::gatt::GattConfig;
use crate::lm_train::{ModelSource, TrainConfig};
use crate::ppo::PpoConfig;
use crate::prefs::{Labeller, PrefsConfig};
use crate::rm::{RmConfig, RmKind};
use crate::rs::RsConfig;
use crate::run_dir;
use crate::sft::SftConfig;
use crate::world::text::fnv1a;
use crate::world::WorldConfig;
use anyhow::{anyhow, bail, ensure, Context, Result};
use engine::Backend;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The recipe file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Where the run goes (default `runs/<file name without .toml>`).
    pub out: Option<PathBuf>,
    #[serde(default = "crate::run_dir::one")]
    pub seed: u64,
    /// The model to start from, when the recipe does not pretrain one.
    #[serde(default)]
    pub model: ModelSection,
    /// Generate the built-in world into `out/world` (its files are `world:NAME`).
    pub world: Option<WorldSection>,
    /// Train a tokenizer and prepare token shards (for `pretrain`).
    pub tokenizer: Option<TokenizerSection>,
    pub pretrain: Option<PretrainSection>,
    pub sft: Option<toml::Table>,
    pub rm: Option<toml::Table>,
    pub prefs: Option<toml::Table>,
    pub rs: Option<toml::Table>,
    pub ppo: Option<toml::Table>,
    pub gatt: Option<toml::Table>,
    pub distill: Option<toml::Table>,
    #[serde(default)]
    pub eval: EvalSection,
    #[serde(default)]
    pub round: Vec<RoundSection>,
    #[serde(default)]
    pub finish: FinishSection,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A checkpoint or a training run directory.
    pub base: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorldSection {
    /// Generate the world at this size into `out/world`...
    pub size: Option<crate::world::Size>,
    /// ...or use one already generated (`llama2 world`) here.
    pub dir: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerSection {
    pub vocab_size: usize,
    /// Text to train on and tokenize (default: `world:corpus.txt`).
    #[serde(default)]
    pub inputs: Vec<String>,
    #[serde(default = "val_fraction")]
    pub val_fraction: f64,
}

fn val_fraction() -> f64 {
    0.05
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainSection {
    pub preset: String,
    pub steps: usize,
    pub seq_len: Option<usize>,
    pub batch_size: Option<usize>,
    pub lr: Option<f32>,
    pub warmup: Option<usize>,
    pub eval_every: Option<usize>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Held-out prompts every model is evaluated on (none: no evaluation).
    #[serde(default)]
    pub prompts: Vec<String>,
    #[serde(default)]
    pub max_prompts: usize,
    /// Score with the world's gold annotator too.
    #[serde(default)]
    pub gold: bool,
    /// The fixed judge: `rm:HELP[,SAFETY]`, or `first` (default): the first reward models the
    /// recipe trains.
    #[serde(default = "first")]
    pub judge: String,
    #[serde(default = "samples")]
    pub samples: usize,
    #[serde(default = "forty")]
    pub max_new_tokens: usize,
    /// The final step `eval/final` (after the rounds and GAtt/distillation): every stage's
    /// reward distribution under the judge on the same prompts (Figure 20), the final model's
    /// win rate against the SFT model, and refusals on `borderline`/`adversarial` prompts.
    #[serde(default = "yes")]
    pub compare: bool,
    /// Prompts the final step answers: the first of `prompts`, at most `max_prompts` (0: no
    /// cap of its own).
    #[serde(default = "hundred")]
    pub compare_prompts: usize,
    /// Benign prompts that look risky: any refusal is a false refusal (Figure 33).
    #[serde(default)]
    pub borderline: Vec<String>,
    /// Harmful prompts: refusal and violation rates.
    #[serde(default)]
    pub adversarial: Vec<String>,
    /// A phrase file replacing the default refusal rule (`recipes/refusal-phrases.txt`).
    #[serde(default)]
    pub refusal_rule: Option<String>,
    #[serde(default = "tie_margin")]
    pub tie_margin: f32,
}

fn yes() -> bool {
    true
}
fn hundred() -> usize {
    100
}
fn tie_margin() -> f32 {
    crate::user_eval::DEFAULT_TIE_MARGIN
}

fn first() -> String {
    "first".into()
}
fn samples() -> usize {
    crate::evaluate::SAMPLES
}
fn forty() -> usize {
    40
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection {
            prompts: vec![],
            max_prompts: 0,
            gold: false,
            judge: first(),
            samples: samples(),
            max_new_tokens: forty(),
            compare: yes(),
            compare_prompts: hundred(),
            borderline: vec![],
            adversarial: vec![],
            refusal_rule: None,
            tie_margin: tie_margin(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct RoundSection {
    /// In order, any of `prefs`, `rm`, `rs`, `ppo`.
    pub stages: Vec<String>,
    /// Per-round overrides: `[round.rs]`, `[round.ppo]`, ...
    #[serde(flatten)]
    pub overrides: toml::Table,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinishSection {
    /// After the rounds, any of `gatt`, `distill`.
    #[serde(default)]
    pub stages: Vec<String>,
    /// Rows of the last rejection-sampling pool mixed into the GAtt and distillation
    /// fine-tunes (0: none), so they do not forget the rest of the assistant's job.
    #[serde(default)]
    pub replay_pool_rows: usize,
}

impl Recipe {
    /// Reads a recipe file; errors name the file and the setting.
    pub fn load(path: &Path) -> Result<Recipe> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Recipe::parse(&text).with_context(|| format!("recipe {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Recipe> {
        Ok(toml::from_str(text)?)
    }
}

// ---------------------------------------------------------------------------------------------
// Steps

/// The held-out pairs a reward-model step is evaluated on: as labelled (people, the world's
/// raters or reward models), and, with noisy world raters, the same pairs by the gold annotator.
#[derive(Clone, Debug, Default)]
struct Heldout {
    labelled: Option<PathBuf>,
    gold: Option<PathBuf>,
}

/// What one step runs.
#[derive(Clone, Debug)]
enum Kind {
    World(PathBuf, crate::world::Size, u64),
    Tokenizer {
        vocab_size: usize,
        inputs: Vec<PathBuf>,
        val_fraction: f64,
    },
    Pretrain(TrainConfig),
    Sft(SftConfig),
    /// Both reward models, and their held-out evaluation.
    Rm(Vec<RmConfig>, Heldout),
    Prefs(PrefsConfig),
    /// With the FNV-1a digest of the pool file it starts from when that comes from outside the
    /// recipe (an earlier run's `pool.jsonl`): a changed file reruns the round.
    Rs(RsConfig, Option<String>),
    Ppo(PpoConfig),
    Replay {
        pool: PathBuf,
        rows: usize,
    },
    Gatt(GattConfig),
    Distill(DistillConfig),
    /// With the model to evaluate instead when the first is missing (distillation that kept
    /// nothing fine-tunes nothing).
    Eval(EvalConfig, Option<PathBuf>),
    /// The final comparison, with (checkpoint, stand-in) for checkpoints that may be missing.
    Final(crate::user_eval::UserEvalConfig, Vec<(PathBuf, PathBuf)>),
}

/// One step of a planned recipe.
#[derive(Clone, Debug)]
pub struct Step {
    /// `sft`, `round-2/rs`, `eval/ppo_round_2`, ...
    pub name: String,
    pub dir: PathBuf,
    kind: Kind,
}

impl Step {
    fn config(&self) -> Value {
        let v = |x: &dyn erased::Ser| x.to_json();
        match &self.kind {
            Kind::World(out, size, seed) => json!({"out": out, "size": size, "seed": seed}),
            Kind::Tokenizer {
                vocab_size,
                inputs,
                val_fraction,
            } => json!({"vocab_size": vocab_size, "inputs": inputs, "val_fraction": val_fraction}),
            Kind::Pretrain(c) => v(c),
            Kind::Sft(c) => v(c),
            Kind::Rm(c, h) => {
                let mut j = json!({"models": c.iter().map(|c| v(c)).collect::<Vec<_>>(), "heldout": h.labelled});
                if let Some(g) = &h.gold {
                    j["heldout_gold"] = json!(g);
                }
                j
            }
            Kind::Prefs(c) => v(c),
            Kind::Rs(c, pool) => match pool {
                None => v(c),
                Some(d) => json!({"rs": v(c), "pool_digest": d}),
            },
            Kind::Ppo(c) => v(c),
            Kind::Replay { pool, rows } => json!({"pool": pool, "rows": rows}),
            Kind::Gatt(c) => v(c),
            Kind::Distill(c) => v(c),
            Kind::Eval(c, f) => json!({"eval": v(c), "fallback": f}),
            Kind::Final(c, f) => json!({"final": v(c), "fallbacks": f}),
        }
    }
}

mod erased {
    /// Any config as JSON (the step's configuration, hashed into its key).
    pub trait Ser {
        fn to_json(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Ser for T {
        fn to_json(&self) -> serde_json::Value {
            serde_json::to_value(self).expect("configs serialise")
        }
    }
}

/// A config `base` with `section`'s settings (then `round`'s) put over it; an unknown setting is
/// an error naming the section and the settings it has.
fn merged<T: Serialize + DeserializeOwned>(
    base: &T,
    sections: &[(&str, Option<&toml::Table>)],
) -> Result<T> {
    let mut v = serde_json::to_value(base)?;
    for (what, section) in sections {
        let Some(section) = section else { continue };
        let obj = v.as_object_mut().expect("configs are structs");
        for (k, x) in section.iter() {
            ensure!(
                obj.contains_key(k),
                "[{what}]: unknown setting `{k}` (settings: {})",
                obj.keys().cloned().collect::<Vec<_>>().join(", ")
            );
            obj.insert(k.clone(), serde_json::to_value(x)?);
        }
    }
    serde_json::from_value(v).with_context(|| {
        let names: Vec<&str> = sections.iter().map(|s| s.0).collect();
        format!("[{}]", names.join("] / ["))
    })
}

/// `world:NAME` → the generated world's file; other strings stay.
fn resolve_world(table: &toml::Table, world: &Path) -> toml::Table {
    fn walk(v: &toml::Value, world: &Path) -> toml::Value {
        match v {
            toml::Value::String(s) => match s.strip_prefix("world:") {
                Some(rest) => toml::Value::String(world.join(rest).display().to_string()),
                None => v.clone(),
            },
            toml::Value::Array(a) => toml::Value::Array(a.iter().map(|x| walk(x, world)).collect()),
            toml::Value::Table(t) => toml::Value::Table(resolve_world(t, world)),
            other => other.clone(),
        }
    }
    table
        .iter()
        .map(|(k, v)| (k.clone(), walk(v, world)))
        .collect()
}

fn world_path(s: &str, world: &Path) -> PathBuf {
    match s.strip_prefix("world:") {
        Some(rest) => world.join(rest),
        None => PathBuf::from(s),
    }
}

/// A recipe planned into steps, in order.
pub struct Plan {
    pub out: PathBuf,
    pub steps: Vec<Step>,
}

/// Plans `recipe` (from the file `path`, which names the default output directory).
pub fn plan(recipe: &Recipe, default_out: PathBuf) -> Result<Plan> {
    let out = recipe.out.clone().unwrap_or(default_out);
    let seed = recipe.seed;
    let wdir = match recipe.world.as_ref().and_then(|w| w.dir.clone()) {
        Some(d) => d,
        None => out.join("world"),
    };
    let section = |t: &Option<toml::Table>| t.as_ref().map(|t| resolve_world(t, &wdir));
    let (sft_s, rm_s, prefs_s, rs_s, ppo_s, gatt_s, distill_s) = (
        section(&recipe.sft),
        section(&recipe.rm),
        section(&recipe.prefs),
        section(&recipe.rs),
        section(&recipe.ppo),
        section(&recipe.gatt),
        section(&recipe.distill),
    );
    let mut steps: Vec<Step> = Vec::new();
    let mut push = |name: String, kind: Kind| {
        let dir = out.join(&name);
        steps.push(Step { name, dir, kind });
    };
    if let Some(w) = &recipe.world {
        match (w.size, &w.dir) {
            (Some(size), None) => push("world".into(), Kind::World(wdir.clone(), size, seed)),
            (None, Some(d)) => ensure!(
                d.join("world.json").is_file(),
                "[world] dir = {}: not a world (`llama2 world` writes world.json there)",
                d.display()
            ),
            _ => {
                bail!("[world]: give `size` (generate one) or `dir` (an existing world), not both")
            }
        }
    }
    let mut base = recipe.model.base.clone();
    if let Some(t) = &recipe.tokenizer {
        let inputs = if t.inputs.is_empty() {
            vec![wdir.join("corpus.txt")]
        } else {
            t.inputs.iter().map(|s| world_path(s, &wdir)).collect()
        };
        push(
            "tokenizer".into(),
            Kind::Tokenizer {
                vocab_size: t.vocab_size,
                inputs,
                val_fraction: t.val_fraction,
            },
        );
    }
    if let Some(p) = &recipe.pretrain {
        ensure!(
            recipe.tokenizer.is_some(),
            "[pretrain] needs a [tokenizer] section (the token shards it trains on)"
        );
        let mut c = TrainConfig::defaults(
            out.join("tokenizer/data"),
            out.join("pretrain"),
            ModelSource::Preset(p.preset.clone()),
            p.steps,
        );
        c.seq_len = p.seq_len.unwrap_or(c.seq_len);
        c.batch_size = p.batch_size.unwrap_or(c.batch_size);
        c.lr = p.lr.unwrap_or(c.lr);
        c.warmup = p.warmup.unwrap_or((p.steps / 10).max(1));
        c.eval_every = p.eval_every.unwrap_or(c.eval_every);
        c.seed = seed;
        c.progress = false;
        push("pretrain".into(), Kind::Pretrain(c));
        base = Some(out.join("pretrain"));
    }
    let base =
        base.context("no model: give [model] base = \"CHECKPOINT\" or a [pretrain] section")?;
    let mut evals: Vec<(String, PathBuf, Option<PathBuf>)> = Vec::new();
    if recipe.pretrain.is_some() {
        evals.push(("pretrain".into(), base.clone(), None));
    }
    let sft = if let Some(s) = &sft_s {
        let mut c = SftConfig::new(base.clone(), vec![], out.join("sft"));
        c.seed = seed;
        c.progress = false;
        let c: SftConfig = merged(&c, &[("sft", Some(s))])?;
        ensure!(
            !c.data.is_empty(),
            "[sft]: give `data`, dialogue JSONL files"
        );
        push("sft".into(), Kind::Sft(c));
        out.join("sft")
    } else {
        base.clone()
    };
    evals.push(("sft".into(), sft.clone(), None));

    // Reward models: trained from the SFT model on `[rm] data` plus every round's labels so far.
    let rm_base: Vec<PathBuf> = rm_s
        .as_ref()
        .and_then(|t| t.get("data"))
        .map(|d| serde_json::from_value(serde_json::to_value(d)?))
        .transpose()
        .context("[rm] data: a list of preference JSONL files")?
        .unwrap_or_default();
    let rm_step = |dir: &Path,
                   files: Vec<PathBuf>,
                   heldout: Heldout,
                   round: usize,
                   over: Option<&toml::Table>|
     -> Result<Kind> {
        let mut models = Vec::new();
        for kind in [RmKind::Helpfulness, RmKind::Safety] {
            let mut c = RmConfig::new(
                sft.clone(),
                files.clone(),
                dir.join(format!("rm-{}", kind.name())),
                kind,
            );
            c.seed = seed ^ round as u64;
            c.progress = false;
            let mut c: RmConfig = merged(&c, &[("rm", rm_s.as_ref()), ("round.rm", over)])?;
            c.data = files.clone();
            c.kind = kind;
            models.push(c);
        }
        Ok(Kind::Rm(models, heldout))
    };
    let mut rms: Option<(PathBuf, PathBuf)> = None;
    let mut judge: Option<(PathBuf, PathBuf)> = match recipe.eval.judge.as_str() {
        "first" => None,
        s => match s.parse::<Labeller>()? {
            Labeller::Rm {
                helpfulness,
                safety,
            } => Some((helpfulness.clone(), safety.unwrap_or(helpfulness))),
            _ => bail!("[eval] judge = `{s}`: expected `first` or rm:HELP[,SAFETY]"),
        },
    };
    let mut pending: Vec<(String, PathBuf, Option<PathBuf>)> = Vec::new();
    let eval_prompts: Vec<PathBuf> = recipe
        .eval
        .prompts
        .iter()
        .map(|s| world_path(s, &wdir))
        .collect();
    let eval_step = |stage: &str,
                     model: PathBuf,
                     fallback: Option<PathBuf>,
                     judge: &Option<(PathBuf, PathBuf)>| {
        let mut c = EvalConfig::new(stage, model, eval_prompts.clone());
        c.reference = Some(sft.clone());
        c.max_prompts = recipe.eval.max_prompts;
        c.world = recipe.eval.gold.then(|| wdir.clone());
        c.judge_helpfulness = judge.as_ref().map(|j| j.0.clone());
        c.judge_safety = judge.as_ref().map(|j| j.1.clone());
        c.samples = recipe.eval.samples;
        c.max_new_tokens = recipe.eval.max_new_tokens;
        c.seed = seed;
        Kind::Eval(c, fallback)
    };
    let evaluate = !eval_prompts.is_empty();
    // Evaluations wait for the judge when the recipe will train one.
    let trains_rm = !rm_base.is_empty()
        || recipe
            .round
            .iter()
            .any(|r| r.stages.iter().any(|s| s == "rm"));
    let flush = |steps_push: &mut dyn FnMut(String, Kind),
                 pending: &mut Vec<(String, PathBuf, Option<PathBuf>)>,
                 judge: &Option<(PathBuf, PathBuf)>,
                 ready: bool| {
        if !evaluate || !ready {
            return;
        }
        for (stage, model, fallback) in pending.drain(..) {
            steps_push(
                format!("eval/{stage}"),
                eval_step(&stage, model, fallback, judge),
            );
        }
    };
    pending.append(&mut evals);
    let mut pushed: Vec<(String, Kind)> = Vec::new();
    {
        let mut sp = |n: String, k: Kind| pushed.push((n, k));
        if !rm_base.is_empty() {
            let k = rm_step(
                &out.join("rm"),
                rm_base.clone(),
                Heldout::default(),
                0,
                None,
            )?;
            sp("rm".into(), k);
            let d = (out.join("rm/rm-helpfulness"), out.join("rm/rm-safety"));
            judge.get_or_insert(d.clone());
            rms = Some(d);
        }
        flush(&mut sp, &mut pending, &judge, judge.is_some() || !trains_rm);
        let mut current = sft.clone();
        let mut pairs: Vec<PathBuf> = rm_base.clone();
        let mut last_pool: Option<PathBuf> = None;
        for (i, r) in recipe.round.iter().enumerate() {
            let k = i + 1;
            let rdir = out.join(format!("round-{k}"));
            let over = |name: &str| {
                r.overrides
                    .get(name)
                    .and_then(|v| v.as_table())
                    .map(|t| resolve_world(t, &wdir))
            };
            for key in r.overrides.keys() {
                ensure!(
                    ["prefs", "rm", "rs", "ppo"].contains(&key.as_str()),
                    "[[round]] {k}: unknown setting `{key}` (stages, prefs, rm, rs, ppo)"
                );
            }
            let mut heldout = Heldout::default();
            for stage in &r.stages {
                match stage.as_str() {
                    "prefs" => {
                        let mut c = PrefsConfig {
                            model: current.clone(),
                            round: k,
                            out: rdir.join("prefs"),
                            seed: seed ^ (k as u64) << 8,
                            labeller: Labeller::World(wdir.clone()),
                            ..Default::default()
                        };
                        c = merged(
                            &c,
                            &[
                                ("prefs", prefs_s.as_ref()),
                                ("round.prefs", over("prefs").as_ref()),
                            ],
                        )?;
                        if let Labeller::World(d) = &c.labeller {
                            if d.as_os_str().is_empty() {
                                c.labeller = Labeller::World(wdir.clone());
                            }
                        }
                        c.model = current.clone();
                        pairs.push(rdir.join("prefs/prefs.jsonl"));
                        if !c.heldout.is_empty()
                            && matches!(c.labeller, Labeller::World(_) | Labeller::Rm { .. })
                        {
                            heldout.labelled = Some(rdir.join("prefs/prefs_heldout.jsonl"));
                            heldout.gold = (matches!(c.labeller, Labeller::World(_))
                                && c.rater_noise > 0.0)
                                .then(|| rdir.join("prefs/prefs_heldout_gold.jsonl"));
                        }
                        sp(format!("round-{k}/prefs"), Kind::Prefs(c));
                    }
                    "rm" => {
                        ensure!(!pairs.is_empty(), "round {k}: `rm` needs preference pairs: [rm] data or a `prefs` stage before it");
                        let kind = rm_step(
                            &rdir,
                            pairs.clone(),
                            heldout.clone(),
                            k,
                            over("rm").as_ref(),
                        )?;
                        sp(format!("round-{k}/rm"), kind);
                        let d = (rdir.join("rm-helpfulness"), rdir.join("rm-safety"));
                        judge.get_or_insert(d.clone());
                        rms = Some(d);
                        flush(&mut sp, &mut pending, &judge, true);
                    }
                    "rs" => {
                        let (h, s) = rms.clone().with_context(|| {
                            format!(
                                "round {k}: `rs` needs reward models ([rm] data or an `rm` stage)"
                            )
                        })?;
                        let mut c = RsConfig {
                            reward_helpfulness: h,
                            reward_safety: Some(s),
                            round: k,
                            out: rdir.join("rs"),
                            seed: seed ^ k as u64,
                            ..RsConfig::for_policy(current.clone())
                        };
                        c = merged(
                            &c,
                            &[("rs", rs_s.as_ref()), ("round.rs", over("rs").as_ref())],
                        )?;
                        // The first round may start from an earlier run's pool ([rs] pool);
                        // later rounds chain this run's.
                        let mut digest = None;
                        match &last_pool {
                            Some(p) => c.pool = Some(p.clone()),
                            None => {
                                if let Some(p) = &c.pool {
                                    let bytes = std::fs::read(p).with_context(|| {
                                        format!("[rs] pool: {}: cannot read this pool file (a pool.jsonl of an earlier run)", p.display())
                                    })?;
                                    digest = Some(format!("{:016x}", fnv1a(&bytes)));
                                }
                            }
                        }
                        c.policy = current.clone();
                        ensure!(
                            !c.prompts.is_empty(),
                            "[rs]: give `prompts`, prompt JSONL files"
                        );
                        last_pool = Some(rdir.join("rs/pool.jsonl"));
                        current = rdir.join("rs/sft");
                        sp(format!("round-{k}/rs"), Kind::Rs(c, digest));
                        pending.push((format!("rs_round_{k}"), current.clone(), None));
                        flush(&mut sp, &mut pending, &judge, judge.is_some() || !trains_rm);
                    }
                    "ppo" => {
                        let (h, s) = rms
                            .clone()
                            .with_context(|| format!("round {k}: `ppo` needs reward models"))?;
                        let mut c = PpoConfig::new(current.clone(), h, vec![], rdir.join("ppo"));
                        c.reward_safety = Some(s);
                        c.world = recipe.eval.gold.then(|| wdir.clone());
                        c.seed = seed ^ (k as u64) << 16;
                        c.progress = false;
                        c = merged(
                            &c,
                            &[("ppo", ppo_s.as_ref()), ("round.ppo", over("ppo").as_ref())],
                        )?;
                        ensure!(
                            !c.prompts.is_empty(),
                            "[ppo]: give `prompts`, prompt JSONL files"
                        );
                        current = rdir.join("ppo");
                        sp(format!("round-{k}/ppo"), Kind::Ppo(c));
                        pending.push((format!("ppo_round_{k}"), current.clone(), None));
                        flush(&mut sp, &mut pending, &judge, judge.is_some() || !trains_rm);
                    }
                    other => bail!("round {k}: unknown stage `{other}` (prefs, rm, rs, ppo)"),
                }
            }
        }
        let mut replay = Vec::new();
        if recipe.finish.replay_pool_rows > 0 {
            let pool = last_pool
                .clone()
                .context("[finish] replay_pool_rows: no rejection-sampling round made a pool")?;
            sp(
                "replay".into(),
                Kind::Replay {
                    pool,
                    rows: recipe.finish.replay_pool_rows,
                },
            );
            replay.push(out.join("replay/replay.jsonl"));
        }
        for stage in &recipe.finish.stages {
            match stage.as_str() {
                "gatt" => {
                    let mut c = GattConfig {
                        init: current.clone(),
                        world: wdir.clone(),
                        out: out.join("gatt"),
                        seed,
                        progress: false,
                        ..Default::default()
                    };
                    c = merged(&c, &[("gatt", gatt_s.as_ref())])?;
                    if c.instructions.is_some() || c.dialogue_file.is_some() {
                        // The user's files: no world; the recipe's helpfulness reward model
                        // judges the samples unless `reward_model` names another.
                        c.world = PathBuf::new();
                        if c.reward_model.is_none() {
                            c.reward_model = rms.as_ref().map(|r| r.0.clone());
                        }
                    }
                    c.replay.extend(replay.iter().cloned());
                    current = out.join("gatt/sft");
                    sp("gatt".into(), Kind::Gatt(c));
                    pending.push(("gatt".into(), current.clone(), None));
                }
                "distill" => {
                    let (_, s) = rms
                        .clone()
                        .context("`distill` needs a safety reward model")?;
                    let mut c = DistillConfig {
                        init: current.clone(),
                        safety_rm: s,
                        world: wdir.clone(),
                        out: out.join("distill"),
                        seed,
                        progress: false,
                        ..Default::default()
                    };
                    c = merged(&c, &[("distill", distill_s.as_ref())])?;
                    if c.categories.is_some() || c.prompts.is_some() {
                        c.world = PathBuf::new();
                    }
                    c.replay.extend(replay.iter().cloned());
                    let before = current.clone();
                    current = out.join("distill/sft");
                    sp("distill".into(), Kind::Distill(c));
                    pending.push(("distill".into(), current.clone(), Some(before)));
                }
                other => bail!("[finish] unknown stage `{other}` (gatt, distill)"),
            }
            flush(&mut sp, &mut pending, &judge, true);
        }
        flush(&mut sp, &mut pending, &judge, true);
    }
    if evaluate && recipe.eval.compare {
        if let Some(k) = final_step(recipe, &pushed, &judge, &wdir, &eval_prompts, &out)? {
            pushed.push((format!("eval/{}", crate::user_eval::FINAL), k));
        }
    }
    for (n, k) in pushed {
        push(n, k);
    }
    Ok(Plan { out, steps })
}

/// The final evaluation step over the stages evaluated so far (the pretrained base left out):
/// the recipe's judge (or the world's annotator when the recipe has no reward models), the last
/// stage against the SFT model. `None` without a judge.
fn final_step(
    recipe: &Recipe,
    pushed: &[(String, Kind)],
    judge: &Option<(PathBuf, PathBuf)>,
    wdir: &Path,
    prompts: &[PathBuf],
    out: &Path,
) -> Result<Option<Kind>> {
    let e = &recipe.eval;
    let spec = match judge {
        Some((h, s)) => Labeller::Rm {
            helpfulness: h.clone(),
            safety: Some(s.clone()),
        },
        None if e.gold => Labeller::World(wdir.to_path_buf()),
        None => return Ok(None),
    };
    let mut stages = Vec::new();
    let mut fallbacks = Vec::new();
    for (_, k) in pushed {
        if let Kind::Eval(c, f) = k {
            if c.stage != "pretrain" {
                stages.push((c.stage.clone(), c.model.clone()));
                if let Some(f) = f {
                    fallbacks.push((c.model.clone(), f.clone()));
                }
            }
        }
    }
    let (Some(first), Some(last)) = (stages.first().cloned(), stages.last().cloned()) else {
        return Ok(None);
    };
    let files = |v: &[String]| v.iter().map(|s| world_path(s, wdir)).collect::<Vec<_>>();
    let mut c = crate::user_eval::UserEvalConfig::new(
        spec,
        prompts.to_vec(),
        out.join("eval").join(crate::user_eval::FINAL),
    );
    if stages.len() > 1 {
        c.model = Some(last.1);
        c.baseline = Some(first.1);
    }
    c.stages = stages;
    // The first `compare_prompts` of the prompts every stage is evaluated on.
    c.max_prompts = match (e.compare_prompts, e.max_prompts) {
        (0, m) => m,
        (n, 0) => n,
        (n, m) => n.min(m),
    };
    c.borderline = files(&e.borderline);
    c.adversarial = files(&e.adversarial);
    c.refusal_rule = e.refusal_rule.as_deref().map(|s| world_path(s, wdir));
    c.max_new_tokens = e.max_new_tokens;
    c.tie_margin = e.tie_margin;
    c.seed = recipe.seed;
    Ok(Some(Kind::Final(c, fallbacks)))
}

// ---------------------------------------------------------------------------------------------
// Running

/// What `step.json` holds: the step's key and its stage's report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Done {
    pub step: String,
    pub key: String,
    pub seconds: f64,
    pub report: Value,
}

/// The file a finished step writes last.
pub const DONE: &str = "step.json";
/// Written when a step starts: its key.
const STARTED: &str = "started.json";

/// The step's key: FNV-1a (64 bits) over the previous step's key and this step's configuration,
/// stable across builds (std's hasher is not), so a rebuilt binary still skips finished steps.
fn key(prev: &str, config: &Value) -> String {
    let bytes: Vec<u8> = prev.bytes().chain(config.to_string().bytes()).collect();
    format!("{:016x}", fnv1a(&bytes))
}

/// The step's state: its key, and its `step.json` when that holds the same key.
pub struct Status {
    pub step: Step,
    pub key: String,
    pub done: Option<Done>,
}

/// Each step with its key and, where it finished with the same key, its report.
pub fn status(plan: &Plan) -> Vec<Status> {
    let mut prev = String::new();
    plan.steps
        .iter()
        .map(|s| {
            let k = key(&prev, &s.config());
            prev = k.clone();
            let done = run_dir::read_json::<Done>(&s.dir.join(DONE))
                .ok()
                .filter(|d| d.key == k);
            Status {
                step: s.clone(),
                key: k,
                done,
            }
        })
        .collect()
}

/// The lines `llama2 recipe plan` prints.
pub fn describe(plan: &Plan) -> String {
    let mut s = format!("recipe → {}\n", plan.out.display());
    for st in status(plan) {
        let state = match (&st.done, st.step.dir.exists()) {
            (Some(_), _) => "done",
            (None, true) => "partial: reruns",
            (None, false) => "to run",
        };
        s += &format!(
            "  {:<22} {:<16} {}\n",
            st.step.name,
            state,
            st.step.dir.display()
        );
    }
    s
}

/// The recipe's results: every step's report, by step name.
#[derive(Clone, Debug, Serialize)]
pub struct RecipeReport {
    pub out: PathBuf,
    pub steps: Vec<Done>,
    /// Steps run by this invocation (the others were complete).
    pub ran: Vec<String>,
    pub seconds: f64,
}

impl RecipeReport {
    pub fn report(&self, step: &str) -> Option<&Value> {
        self.steps
            .iter()
            .find(|d| d.step == step)
            .map(|d| &d.report)
    }

    /// The evaluations, in the order the stages ran.
    pub fn evals(&self) -> Vec<StageEval> {
        self.steps
            .iter()
            .filter(|d| d.step.starts_with("eval/") && d.step != FINAL_STEP)
            .filter_map(|d| serde_json::from_value(d.report.clone()).ok())
            .collect()
    }
}

/// The final comparison's step name.
pub const FINAL_STEP: &str = "eval/final";

/// Runs the plan's steps, skipping those already done; `say` reports each step.
pub fn run<B: Backend>(be: B, plan: &Plan, say: &dyn Fn(&str)) -> Result<RecipeReport> {
    let t0 = Instant::now();
    std::fs::create_dir_all(&plan.out)
        .with_context(|| format!("creating {}", plan.out.display()))?;
    let mut steps = Vec::new();
    let mut ran = Vec::new();
    let all = status(plan);
    let n = all.len();
    crate::interrupt::install();
    for (i, st) in all.into_iter().enumerate() {
        if let Some(d) = st.done {
            say(&format!("[{}/{n}] {}: done, skipped", i + 1, st.step.name));
            steps.push(d);
            continue;
        }
        // Before the line, so a step that was started shows as `partial` whenever it stops;
        // `started.json` says with which settings, so a rerun may continue its checkpoints.
        let started = st.step.dir.join(STARTED);
        let resumable = run_dir::read_json::<Value>(&started)
            .is_ok_and(|v| v["key"].as_str() == Some(st.key.as_str()));
        std::fs::create_dir_all(&st.step.dir)
            .with_context(|| format!("creating {}", st.step.dir.display()))?;
        run_dir::write_json(&started, &json!({"key": st.key}))?;
        say(&format!("[{}/{n}] {}", i + 1, st.step.name));
        let t = Instant::now();
        crate::interrupt::set_step(Some(&st.step.name));
        let report = run_step(&be, &st.step, resumable)
            .with_context(|| format!("recipe step {}", st.step.name))?;
        crate::interrupt::set_step(None);
        // A training loop stopped by Ctrl-C/SIGTERM returns normally after its checkpoint: the
        // stage is not done (a rerun continues pretraining and SFT from it, redoes the others),
        // and the steps after it must not start from its half-trained model.
        ensure!(
            !crate::interrupt::ever(),
            "interrupted during recipe step {}: it is not marked done; run the recipe again to \
             go on (pretraining and SFT continue from their last checkpoint, other steps start \
             again)",
            st.step.name
        );
        let done = Done {
            step: st.step.name.clone(),
            key: st.key,
            seconds: t.elapsed().as_secs_f64(),
            report,
        };
        std::fs::create_dir_all(&st.step.dir)?;
        run_dir::write_json(&st.step.dir.join(DONE), &done)?;
        ran.push(done.step.clone());
        steps.push(done);
    }
    Ok(RecipeReport {
        out: plan.out.clone(),
        steps,
        ran,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

fn to_json<T: Serialize>(x: &T) -> Result<Value> {
    Ok(serde_json::to_value(x)?)
}

/// Where an unfinished pretraining or SFT step continues from: its run directory, when an earlier
/// run of the same settings (`resumable`) left a checkpoint there (a preemption checkpoints).
/// A step starting afresh first drops the directory's `latest` pointer: its checkpoints are of
/// other settings, and a run of these killed before its first checkpoint must not resume them.
fn resume_from(out: &Path, resumable: bool) -> Result<Option<PathBuf>> {
    let latest = out.join("checkpoints").join(run_dir::LATEST);
    if !resumable {
        match std::fs::remove_file(&latest) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", latest.display()))
            }
            _ => return Ok(None),
        }
    }
    if !latest.is_file() {
        return Ok(None);
    }
    println!("resuming {} from its last checkpoint", out.display());
    Ok(Some(out.to_path_buf()))
}

/// `resumable`: the step was started before with the same settings and did not finish.
fn run_step<B: Backend>(be: &B, step: &Step, resumable: bool) -> Result<Value> {
    let be = be.clone();
    match &step.kind {
        Kind::World(out, size, seed) => {
            let r = crate::world::run(&WorldConfig {
                out: out.clone(),
                seed: *seed,
                size: *size,
            })?;
            to_json(&r)
        }
        Kind::Tokenizer {
            vocab_size,
            inputs,
            val_fraction,
        } => {
            std::fs::create_dir_all(&step.dir)?;
            let tok = step.dir.join("tokenizer.json");
            ensure!(inputs.len() == 1, "[tokenizer] trains on one input file");
            crate::tokenizer_train::train_on(&inputs[0], *vocab_size, &tok)?;
            let meta = crate::data::prepare(&crate::data::PrepareConfig {
                tokenizer: tok,
                out: step.dir.join("data"),
                inputs: inputs.clone(),
                val_fraction: *val_fraction,
                shard_tokens: 1 << 24,
                skip_bad: false,
                progress: false,
            })?;
            to_json(&meta)
        }
        Kind::Pretrain(c) => {
            let from = resume_from(&c.out, resumable)?;
            let r = crate::lm_train::run(be, c.clone(), from.as_deref())?;
            to_json(&r)
        }
        Kind::Sft(c) => {
            let from = resume_from(&c.out, resumable)?;
            to_json(&crate::sft::run_resuming(be, c, from.as_deref())?)
        }
        Kind::Rm(models, heldout) => {
            let mut reps = serde_json::Map::new();
            for c in models {
                let rep = crate::rm::run(be.clone(), c)?;
                let mut v = to_json(&rep)?;
                let files = [
                    ("heldout", &heldout.labelled),
                    ("heldout_gold", &heldout.gold),
                ];
                let files: Vec<(&str, &PathBuf)> = files
                    .iter()
                    .filter_map(|(k, f)| Some((*k, f.as_ref()?)))
                    .collect();
                if !files.is_empty() {
                    let (mut m, tok) = crate::rm::load_rm(be.clone(), &rep.model_dir)?;
                    for (key, h) in files {
                        let (pairs, _) =
                            crate::formats::read_pairs(std::slice::from_ref(h), false)?;
                        let sel = crate::rm::select_pairs(pairs, c.kind);
                        if sel.pairs.is_empty() {
                            continue;
                        }
                        let ev = crate::rm::evaluate(&mut m, &tok, &sel.pairs, 256, 16)?;
                        if key == "heldout" {
                            crate::rm::write_eval(
                                &c.out,
                                &ev,
                                &format!("{} reward model (held-out prompts)", c.kind.name()),
                            )?;
                        }
                        v[key] = ev.summary();
                    }
                }
                if let Some(e) = &rep.eval {
                    v["eval"] = e.summary();
                }
                reps.insert(c.kind.name().into(), v);
            }
            Ok(Value::Object(reps))
        }
        Kind::Prefs(c) => to_json(&crate::prefs::run(be, c)?),
        Kind::Rs(c, _) => {
            let r = crate::rs::run(be, c)?;
            crate::rs::write_report(&c.out, std::slice::from_ref(&r))?;
            to_json(&r)
        }
        Kind::Ppo(c) => {
            let r = crate::ppo::run(be, c)?;
            Ok(ppo_summary(&r))
        }
        Kind::Replay { pool, rows } => {
            let all = run_dir::read_jsonl_values(pool)?;
            let stride = (all.len() / rows).max(1);
            let kept: Vec<Value> = all.into_iter().step_by(stride).take(*rows).collect();
            std::fs::create_dir_all(&step.dir)?;
            run_dir::write_jsonl(&step.dir.join("replay.jsonl"), &kept)?;
            Ok(json!({"rows": kept.len()}))
        }
        Kind::Gatt(c) => to_json(&crate::gatt::run(be, c)?),
        Kind::Distill(c) => to_json(&crate::distill::run(be, c)?),
        Kind::Eval(c, fallback) => {
            let mut c = c.clone();
            if let Some(f) = fallback {
                if !c.model.exists() {
                    c.model = f.clone();
                }
            }
            to_json(&crate::evaluate::run(be, &c)?)
        }
        Kind::Final(c, fallbacks) => {
            let mut c = c.clone();
            let stand_in = |p: &mut PathBuf| {
                if let Some((_, f)) = fallbacks.iter().find(|(m, _)| m == p && !m.exists()) {
                    *p = f.clone();
                }
            };
            c.model
                .iter_mut()
                .chain(c.baseline.iter_mut())
                .for_each(stand_in);
            c.stages.iter_mut().for_each(|(_, p)| stand_in(p));
            to_json(&crate::user_eval::run(be, &c)?)
        }
    }
}

/// What the report keeps of a PPO run.
pub fn ppo_summary(r: &crate::ppo::PpoReport) -> Value {
    let first = r.evals.first();
    let last = r.evals.last();
    json!({
        "iterations": r.iterations,
        "stopped_early": r.stopped_early,
        "beta": r.beta,
        "held_out_reward_before": first.map(|e| e.reward),
        "held_out_reward_after": last.map(|e| e.reward),
        "held_out_gold_before": first.and_then(|e| e.gold_reward),
        "held_out_gold_after": last.and_then(|e| e.gold_reward),
        "kl_last": r.history.last().map(|h| h.kl),
        "checkpoint": r.checkpoint,
        "seconds": r.seconds,
    })
}

/// Loads, plans and runs a recipe file; writes `report.json` and `report.md` into its output.
pub fn run_file<B: Backend>(
    be: B,
    path: &Path,
    out: Option<PathBuf>,
    say: &dyn Fn(&str),
) -> Result<RecipeReport> {
    let mut recipe = Recipe::load(path)?;
    if out.is_some() {
        recipe.out = out;
    }
    check_base(&recipe)?;
    let p = plan(&recipe, default_out(path))?;
    let rep = run(be.clone(), &p, say)?;
    crate::report::write(&rep, &be.name())?;
    Ok(rep)
}

/// `runs/<file name without extension>`.
pub fn default_out(path: &Path) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "recipe".into());
    PathBuf::from("runs").join(stem)
}

/// A recipe's error on a missing model is worth a hint.
pub fn check_base(recipe: &Recipe) -> Result<()> {
    if let Some(b) = &recipe.model.base {
        if !b.exists() {
            return Err(anyhow!(
                "[model] base = {}: no such checkpoint or run directory",
                b.display()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rerun of the same settings resumes from the step's checkpoint; a fresh start drops the
    /// `latest` pointer, so checkpoints of other settings are never resumed.
    #[test]
    fn only_a_rerun_of_the_same_settings_resumes_a_training_step() {
        let d = tempfile::tempdir().unwrap();
        let ck = d.path().join("checkpoints");
        std::fs::create_dir_all(&ck).unwrap();
        assert_eq!(
            resume_from(d.path(), true).unwrap(),
            None,
            "no checkpoint yet"
        );
        std::fs::write(ck.join(run_dir::LATEST), "step-00000003").unwrap();
        assert_eq!(
            resume_from(d.path(), true).unwrap().as_deref(),
            Some(d.path())
        );
        assert_eq!(resume_from(d.path(), false).unwrap(), None);
        assert!(!ck.join(run_dir::LATEST).exists(), "stale pointer dropped");
        assert_eq!(resume_from(d.path(), true).unwrap(), None);
    }

    #[test]
    fn unknown_settings_and_stages_are_named() {
        let r =
            Recipe::parse("[model]\nbase = \"m\"\n[sft]\ndata = [\"d.jsonl\"]\nlrr = 1\n").unwrap();
        let e = format!("{:#}", plan(&r, "o".into()).err().unwrap());
        assert!(e.contains("[sft]: unknown setting `lrr`"), "{e}");
        let r = Recipe::parse("[model]\nbase = \"m\"\n[[round]]\nstages = [\"dpo\"]\n").unwrap();
        let e = format!("{:#}", plan(&r, "o".into()).err().unwrap());
        assert!(e.contains("unknown stage `dpo`"), "{e}");
        assert!(Recipe::parse("[modle]\nbase = \"m\"\n").is_err());
    }

    #[test]
    fn a_changed_setting_reruns_its_step_and_every_later_one() {
        let text =
            "[model]\nbase = \"m\"\n[sft]\ndata = [\"d.jsonl\"]\n[rm]\ndata = [\"p.jsonl\"]\n\
                    [rs]\nprompts = [\"q.jsonl\"]\n[[round]]\nstages = [\"rs\"]\n";
        let a = plan(&Recipe::parse(text).unwrap(), "o".into()).unwrap();
        let names: Vec<&str> = a.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["sft", "rm", "round-1/rs"]);
        let b = plan(
            &Recipe::parse(&text.replace("[rm]\n", "[rm]\nlr = 1e-4\n")).unwrap(),
            "o".into(),
        )
        .unwrap();
        let (ka, kb) = (status(&a), status(&b));
        assert_eq!(ka[0].key, kb[0].key);
        assert_ne!(ka[1].key, kb[1].key);
        assert_ne!(ka[2].key, kb[2].key);
    }

    #[test]
    fn an_earlier_runs_pool_starts_the_first_round_and_later_rounds_chain() {
        let dir = tempfile::tempdir().unwrap();
        let pool = dir.path().join("old-pool.jsonl");
        std::fs::write(&pool, "{}\n").unwrap();
        let text = format!(
            "[model]\nbase = \"m\"\n[sft]\ndata = [\"d.jsonl\"]\n[rm]\ndata = [\"p.jsonl\"]\n\
             [rs]\nprompts = [\"q.jsonl\"]\npool = {:?}\nteacher = \"big\"\ntemperatures = [0.8, 1.2]\n\
             [[round]]\nstages = [\"rs\"]\n[[round]]\nstages = [\"rs\"]\n",
            pool.display().to_string()
        );
        let a = plan(&Recipe::parse(&text).unwrap(), "o".into()).unwrap();
        let rs: Vec<&RsConfig> = a
            .steps
            .iter()
            .filter_map(|s| match &s.kind {
                Kind::Rs(c, _) => Some(c),
                _ => None,
            })
            .collect();
        assert_eq!(rs[0].pool.as_deref(), Some(pool.as_path()));
        assert_eq!(
            rs[1].pool.as_deref(),
            Some(Path::new("o/round-1/rs/pool.jsonl"))
        );
        assert_eq!(rs[1].teacher.as_deref(), Some(Path::new("big")));
        assert_eq!(rs[1].temperatures, [0.8, 1.2]);
        // The pool is a file outside the recipe: a changed file reruns the round and what follows.
        std::fs::write(&pool, "{}\n{}\n").unwrap();
        let b = plan(&Recipe::parse(&text).unwrap(), "o".into()).unwrap();
        let (ka, kb) = (status(&a), status(&b));
        assert_eq!(ka[1].key, kb[1].key);
        assert_ne!(ka[2].key, kb[2].key);
        assert_ne!(ka[3].key, kb[3].key);
        std::fs::remove_file(&pool).unwrap();
        let e = format!(
            "{:#}",
            plan(&Recipe::parse(&text).unwrap(), "o".into())
                .err()
                .unwrap()
        );
        assert!(
            e.contains("[rs] pool") && e.contains("old-pool.jsonl"),
            "{e}"
        );
    }

    #[test]
    fn section_settings_reach_the_stage_config() {
        let r = Recipe::parse(
            "[model]\nbase = \"m\"\n[sft]\ndata = [\"d.jsonl\"]\ngrad_accum = 4\nepochs = 3\n",
        )
        .unwrap();
        let p = plan(&r, "o".into()).unwrap();
        let Kind::Sft(c) = &p.steps[0].kind else {
            panic!("the first step is SFT")
        };
        assert_eq!((c.grad_accum, c.epochs), (4, 3));
        let t = c.train_config().unwrap();
        assert_eq!(t.grad_accum, 4);
        // `[world] dir` must be a world; `size` and `dir` together are refused.
        let r = Recipe::parse("[model]\nbase = \"m\"\n[world]\ndir = \"/nonexistent\"\n").unwrap();
        let e = format!("{:#}", plan(&r, "o".into()).err().unwrap());
        assert!(e.contains("not a world"), "{e}");
        let r = Recipe::parse("[model]\nbase = \"m\"\n[world]\ndir = \"w\"\nsize = \"small\"\n")
            .unwrap();
        assert!(plan(&r, "o".into()).is_err());
    }

    /// The final step comes after GAtt and distillation, judges every stage but the pretrained
    /// base with the recipe's fixed judge, and is keyed by its settings like any step.
    #[test]
    fn the_final_evaluation_covers_every_stage_after_the_finish_stages() {
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../recipes/world-tiny.toml");
        let text = std::fs::read_to_string(file).unwrap();
        let p = plan(&Recipe::parse(&text).unwrap(), "o".into()).unwrap();
        let last = p.steps.last().unwrap();
        assert_eq!(last.name, FINAL_STEP);
        let Kind::Final(c, fallbacks) = &last.kind else {
            panic!("the last step is the final evaluation")
        };
        let names: Vec<&str> = c.stages.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "sft",
                "rs_round_1",
                "rs_round_2",
                "ppo_round_2",
                "gatt",
                "distill"
            ]
        );
        assert_eq!(c.baseline.as_deref(), Some(Path::new("o/sft")));
        assert_eq!(c.model.as_deref(), Some(Path::new("o/distill/sft")));
        assert_eq!(fallbacks, &[("o/distill/sft".into(), "o/gatt/sft".into())]);
        assert_eq!(
            c.judge,
            Labeller::Rm {
                helpfulness: "o/round-1/rm-helpfulness".into(),
                safety: Some("o/round-1/rm-safety".into())
            }
        );
        assert_eq!(
            (c.max_prompts, c.out.as_path()),
            (100, Path::new("o/eval/final"))
        );
        // Borderline prompts change the final step's key only; `compare = false` drops it.
        let more = text.replace("[eval]", "[eval]\nborderline = [\"b.jsonl\"]");
        let q = plan(&Recipe::parse(&more).unwrap(), "o".into()).unwrap();
        let (a, b) = (status(&p), status(&q));
        assert_eq!(a.len(), b.len());
        let n = a.len();
        assert_eq!(a[n - 2].key, b[n - 2].key);
        assert_ne!(a[n - 1].key, b[n - 1].key);
        let off = text.replace("[eval]", "[eval]\ncompare = false");
        let r = plan(&Recipe::parse(&off).unwrap(), "o".into()).unwrap();
        assert!(r.steps.iter().all(|s| s.name != FINAL_STEP));
    }

    #[test]
    fn the_shipped_user_data_recipe_finishes_with_gatt_and_distillation_on_its_files() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let r = Recipe::load(&root.join("recipes/user-data.toml")).unwrap();
        let p = plan(&r, "o".into()).unwrap();
        let names: Vec<&str> = p.steps.iter().map(|s| s.name.as_str()).collect();
        for want in [
            "sft",
            "rm",
            "round-2/ppo",
            "gatt",
            "distill",
            "eval/distill",
        ] {
            assert!(names.contains(&want), "{want}: {names:?}");
        }
        let step = |n: &str| &p.steps.iter().find(|s| s.name == n).unwrap().kind;
        let Kind::Gatt(g) = step("gatt") else {
            panic!("gatt")
        };
        assert!(g.world.as_os_str().is_empty());
        assert_eq!(g.init, PathBuf::from("o/round-2/ppo"));
        assert_eq!(g.reward_model, Some(PathBuf::from("o/rm/rm-helpfulness")));
        let Kind::Distill(c) = step("distill") else {
            panic!("distill")
        };
        assert!(c.world.as_os_str().is_empty());
        assert_eq!(c.init, PathBuf::from("o/gatt/sft"));
        assert_eq!(c.safety_rm, PathBuf::from("o/rm/rm-safety"));
        for f in [&g.instructions, &g.dialogue_file, &c.categories, &c.prompts] {
            let f = root.join(f.as_ref().expect("a user file"));
            assert!(f.is_file(), "{} ships", f.display());
        }
        // The shipped files read cleanly.
        let instrs =
            crate::gatt::read_instructions(&root.join(g.instructions.as_ref().unwrap())).unwrap();
        let cats: std::collections::BTreeSet<_> =
            instrs.iter().filter_map(|i| i.category.clone()).collect();
        assert!(instrs.len() >= 20 && cats.len() >= 4, "{cats:?}");
        assert!(
            crate::gatt::read_user_dialogues(&root.join(g.dialogue_file.as_ref().unwrap()))
                .unwrap()
                .len()
                >= 20
        );
        let risk =
            crate::distill::read_categories(&root.join(c.categories.as_ref().unwrap())).unwrap();
        let prompts =
            crate::distill::read_tagged_prompts(&root.join(c.prompts.as_ref().unwrap()), &risk)
                .unwrap();
        assert!(risk.len() >= 3 && prompts.len() >= 20);
    }
}
