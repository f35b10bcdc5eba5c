//! The built-in assistant world: `world`, `world-prefs`, `eval-world`.

use super::common::{load_for_generation, on_device};
use anyhow::{Context, Result};
use std::path::PathBuf;
use trainer::device::Device;

#[derive(clap::Args)]
pub struct WorldArgs {
    #[arg(long, default_value = "runs/world")]
    out: PathBuf,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// small (~200 KB corpus), default (~1 MB) or large (~5 MB).
    #[arg(long, default_value = "default")]
    size: String,
}

pub fn world(a: WorldArgs) -> Result<()> {
    let WorldArgs { out, seed, size } = a;
    let size = size.parse()?;
    let s = trainer::world::run(&trainer::world::WorldConfig { out, seed, size })?;
    println!("{s}");
    Ok(())
}

#[derive(clap::Args)]
pub struct WorldPrefsArgs {
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
    /// How unsure the raters are: each perceives each answer's gold score (in [0, 1]) plus
    /// Gaussian noise of this standard deviation, so similar answers get coin-flip labels as
    /// people's do (0: the deterministic gold annotator).
    #[arg(long, default_value_t = 0.0)]
    rater_noise: f32,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: Device,
}

pub fn world_prefs(a: WorldPrefsArgs) -> Result<()> {
    on_device!(a.device, |be| world_prefs_on(be, a))
}

fn world_prefs_on<B: engine::Backend>(be: B, a: WorldPrefsArgs) -> Result<()> {
    let WorldPrefsArgs {
        model,
        world,
        split,
        out,
        temperatures,
        max_new_tokens,
        seed,
        pairs_per_prompt,
        off_topic,
        rater_noise,
        ..
    } = a;
    let (mut m, tok) = load_for_generation(be, &model, None)?;
    let ann = trainer::world::Annotator::new(trainer::world::World::load(&world)?);
    let ex = trainer::world::read_examples(&world.join(&split))?;
    let cfg = trainer::prefs::PrefsConfig {
        temperatures,
        max_new_tokens,
        seed,
        pairs_per_prompt,
        off_topic,
        rater_noise,
        ..Default::default()
    };
    let pairs = trainer::prefs::collect(&mut m, &tok, &ann, &ex, &cfg)?;
    trainer::run_dir::write_jsonl(&out, &pairs)?;
    let mut by: std::collections::BTreeMap<&str, usize> = Default::default();
    for p in &pairs {
        *by.entry(p.rating).or_default() += 1;
    }
    println!(
        "{}: {} labelled pairs from {} prompts (identical answers and ties dropped): {by:?}",
        out.display(),
        pairs.len(),
        ex.len(),
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct EvalWorldArgs {
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
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: Device,
}

pub fn eval_world(a: EvalWorldArgs) -> Result<()> {
    on_device!(a.device, |be| eval_world_on(be, a))
}

fn eval_world_on<B: engine::Backend>(be: B, a: EvalWorldArgs) -> Result<()> {
    let EvalWorldArgs {
        model,
        world,
        split,
        batch_size,
        max_new_tokens,
        json,
        ..
    } = a;
    let (mut m, tok) = load_for_generation(be, &model, None)?;
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
            serde_json::to_string_pretty(&serde_json::json!({"report": ev, "answers": rows}))?,
        )
        .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
