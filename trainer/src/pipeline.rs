//! `llama2 pipeline`: the built-in world's recipe, `recipes/world-tiny.toml` (compiled in, and
//! shipped as a file users can copy), run by [`crate::recipe`] like any other recipe: world →
//! tokenizer → pretraining → SFT → rounds of preference labels, both reward models, rejection
//! sampling (and PPO from `ppo_from`) → GAtt → context distillation → report. A rerun skips the
//! steps already done.

use crate::recipe::{self, Recipe, RoundSection};
use anyhow::{Context, Result};
use engine::Backend;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use std::path::PathBuf;
use std::time::Instant;

/// The built-in world's recipe.
pub const WORLD_TINY: &str = include_str!("../../recipes/world-tiny.toml");

/// What `llama2 pipeline`'s flags change in [`WORLD_TINY`].
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    pub out: PathBuf,
    pub seed: u64,
    /// RLHF rounds (each: new labels, reward models, rejection sampling).
    pub rounds: usize,
    /// The first round that adds PPO. The paper ran PPO from RLHF-V4; the recipe compresses
    /// the schedule to round 2 so every stage runs within the ten-minute budget.
    pub ppo_from: usize,
    pub progress: bool,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            out: PathBuf::from("runs/pipeline"),
            seed: 1,
            rounds: 2,
            ppo_from: 2,
            progress: true,
        }
    }
}

/// `stages` for rounds 1..=`rounds`: labels, reward models and rejection sampling, PPO added
/// from round `ppo_from` on.
pub fn rounds(rounds: usize, ppo_from: usize) -> Vec<RoundSection> {
    (1..=rounds)
        .map(|k| {
            let mut stages: Vec<String> = ["prefs", "rm", "rs"].map(String::from).to_vec();
            if k >= ppo_from {
                stages.push("ppo".into());
            }
            RoundSection {
                stages,
                overrides: Default::default(),
            }
        })
        .collect()
}

/// The built-in recipe with `cfg`'s settings.
pub fn recipe(cfg: &PipelineConfig) -> Result<Recipe> {
    let mut r = Recipe::parse(WORLD_TINY).context("recipes/world-tiny.toml")?;
    r.out = Some(cfg.out.clone());
    r.seed = cfg.seed;
    r.round = rounds(cfg.rounds, cfg.ppo_from);
    Ok(r)
}

/// Runs the built-in recipe; returns the report (`report.json`, also written with `report.md`
/// and the plots into `cfg.out`).
pub fn run<B: Backend>(be: B, cfg: &PipelineConfig) -> Result<Value> {
    let t0 = Instant::now();
    let plan = recipe::plan(&recipe(cfg)?, cfg.out.clone())?;
    let bar = if cfg.progress {
        ProgressBar::new(plan.steps.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("pipeline {bar:30} {pos}/{len} [{elapsed_precise}] {msg}")
            .expect("template"),
    );
    let say = |msg: &str| {
        bar.set_message(msg.to_string());
        bar.set_position(
            msg.trim_start_matches('[')
                .split('/')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0),
        );
        crate::run_dir::say(
            &bar,
            format!("[{:>6.1}s] {msg}", t0.elapsed().as_secs_f64()),
        );
    };
    let rep = recipe::run(be.clone(), &plan, &say)?;
    bar.finish_and_clear();
    crate::report::write(&rep, &be.name())
}
