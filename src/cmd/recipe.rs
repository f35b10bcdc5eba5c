//! `llama2 recipe run FILE` and `llama2 recipe plan FILE`: a recipe file (`recipes/*.toml`) run
//! step by step, finished steps skipped.

use super::common::on_device;
use anyhow::Result;
use std::path::PathBuf;
use trainer::device::Device;
use trainer::recipe::{default_out, describe, plan, run_file, Recipe};

#[derive(clap::Subcommand)]
pub enum RecipeCmd {
    /// Runs the recipe; a step whose outputs are complete (its `step.json` has the same
    /// settings) is skipped, so a killed run continues where it stopped. Writes report.json,
    /// report.md and plots into the output directory.
    Run(RecipeArgs),
    /// Prints the steps, their directories, and which are done or would run.
    Plan(RecipeArgs),
}

#[derive(clap::Args)]
pub struct RecipeArgs {
    /// The recipe (TOML; `recipes/world-tiny.toml` is `llama2 pipeline`'s).
    file: PathBuf,
    /// Output directory (default: the recipe's `out`, else runs/<file name>).
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long, default_value = "auto")]
    device: Device,
    #[arg(long)]
    no_progress: bool,
}

pub fn recipe(c: RecipeCmd) -> Result<()> {
    match c {
        RecipeCmd::Plan(a) => {
            let mut r = Recipe::load(&a.file)?;
            if a.out.is_some() {
                r.out = a.out;
            }
            print!("{}", describe(&plan(&r, default_out(&a.file))?));
            Ok(())
        }
        RecipeCmd::Run(a) => {
            let t0 = std::time::Instant::now();
            let quiet = a.no_progress;
            let say = |m: &str| {
                if !quiet {
                    eprintln!("[{:>7.1}s] {m}", t0.elapsed().as_secs_f64());
                }
            };
            let rep = on_device!(a.device, |be| run_file(be, &a.file, a.out.clone(), &say)?);
            println!(
                "{}",
                std::fs::read_to_string(rep.out.join("report.md")).unwrap_or_default()
            );
            println!(
                "{} step(s) run, {} already done; report: {}/report.json (in {:.0} s)",
                rep.ran.len(),
                rep.steps.len() - rep.ran.len(),
                rep.out.display(),
                rep.seconds
            );
            Ok(())
        }
    }
}
