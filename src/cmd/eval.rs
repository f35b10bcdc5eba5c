//! `llama2 eval`: a model against a baseline under one fixed judge (win/tie/loss with a 95 %
//! interval), false refusals on borderline prompts, refusals and violations on adversarial ones,
//! and every stage's reward distribution (the paper's Figure 20).

use super::common::on_device;
use anyhow::Result;
use std::path::PathBuf;
use trainer::device::Device;
use trainer::prefs::Labeller;
use trainer::user_eval::{parse_stages, table, UserEvalConfig, DEFAULT_TIE_MARGIN};

#[derive(clap::Args)]
pub struct EvalArgs {
    /// The model evaluated (a checkpoint or a run directory).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The model it is compared with: win/tie/loss per prompt under the judge.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// rm:HELPFULNESS_RM[,SAFETY_RM] (the piecewise rule with a safety model) or world:DIR
    /// (a world's gold annotator).
    #[arg(long)]
    judge: Labeller,
    /// Prompt JSONL in any accepted shape (messages, prompt, HH transcripts, pairs).
    #[arg(long, num_args = 1.., required = true)]
    prompts: Vec<PathBuf>,
    /// At most this many prompts (0: all).
    #[arg(long, default_value_t = 0)]
    max_prompts: usize,
    /// Benign prompts that look risky: any refusal is a false refusal.
    #[arg(long, num_args = 1..)]
    borderline: Vec<PathBuf>,
    /// Harmful prompts: refusal rate, and violations (safety judged below the threshold).
    #[arg(long, num_args = 1..)]
    adversarial: Vec<PathBuf>,
    /// Refusal phrases replacing the default (recipes/refusal-phrases.txt): one per line, or a
    /// JSON list of strings in a `.json` file.
    #[arg(long)]
    refusal_rule: Option<PathBuf>,
    /// Figure 20: NAME=CKPT,NAME=CKPT... or a recipe run directory (each stage it evaluated).
    #[arg(long)]
    stages: Option<String>,
    /// Judge gaps (R_c, model minus baseline) with |gap| below this are ties.
    #[arg(long, default_value_t = DEFAULT_TIE_MARGIN)]
    tie_margin: f32,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0: greedy answers; above: sampled at this temperature with --seed.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: Device,
    /// Writes eval.json, answers.jsonl and, with --stages, fig20.{jsonl,csv,svg} here.
    #[arg(long)]
    out: PathBuf,
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let mut c = UserEvalConfig::new(a.judge, a.prompts, a.out);
    c.model = a.model;
    c.baseline = a.baseline;
    c.max_prompts = a.max_prompts;
    c.borderline = a.borderline;
    c.adversarial = a.adversarial;
    c.refusal_rule = a.refusal_rule;
    c.stages = a
        .stages
        .as_deref()
        .map(parse_stages)
        .transpose()?
        .unwrap_or_default();
    c.tie_margin = a.tie_margin;
    c.max_new_tokens = a.max_new_tokens;
    c.temperature = a.temperature;
    c.seed = a.seed;
    c.batch = a.batch_size.max(1);
    let rep = on_device!(a.device, |be| trainer::user_eval::run(be, &c)?);
    print!("{}", table(&rep));
    println!("wrote {}/eval.json", c.out.display());
    Ok(())
}
