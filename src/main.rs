//! `llama2`: train and align Llama 2 models. The CLI only maps arguments to the library's configs.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use engine::check::{check_fixture, Tolerances};
use engine::tokenizer::Tokenizer;
use engine::Cpu;
use std::io::Read;
use std::path::PathBuf;
use trainer::device::{require_cpu, Device};

#[derive(Parser)]
#[command(
    name = "llama2",
    version,
    about = "Train and align Llama 2 models on hand-written kernels"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Compare the engine with a Hugging Face reference dump (logits, loss, every gradient,
    /// reward-model case, AdamW case); ends with `N passed, M failed`.
    Check {
        /// A fixture directory: config.json, model.safetensors, case/rm/adamw.safetensors.
        dir: PathBuf,
        #[arg(long, default_value = "cpu")]
        device: Device,
        /// Absolute bound for logits, loss and rewards.
        #[arg(long, default_value_t = Tolerances::F32.abs)]
        atol: f32,
        /// Bound for gradients, relative to each tensor's largest reference entry.
        #[arg(long, default_value_t = Tolerances::F32.rel)]
        rtol: f32,
    },
    /// Tokenize stdin and print the ids as a JSON array (or decode a JSON array with --decode).
    Tokenize {
        #[arg(long)]
        tokenizer: PathBuf,
        /// Prepend the BOS token.
        #[arg(long)]
        bos: bool,
        /// Read a JSON array of ids from stdin and print the text.
        #[arg(long)]
        decode: bool,
    },
    /// A self-contained check of the engine: random tiny model, backward against finite
    /// differences, an optimizer step, save and reload through safetensors.
    Selftest {
        /// Where the round-trip checkpoint is written.
        #[arg(long, default_value = "runs/selftest")]
        out: PathBuf,
    },
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Check {
            dir,
            device,
            atol,
            rtol,
        } => {
            require_cpu(device)?;
            println!(
                "checking {} on {}",
                dir.display(),
                engine::Backend::name(&Cpu)
            );
            let rep = check_fixture(
                Cpu,
                &dir,
                Tolerances {
                    abs: atol,
                    rel: rtol,
                },
            )
            .with_context(|| format!("fixture {}", dir.display()))?;
            println!("{}", rep.to_table());
            if rep.failed() > 0 {
                std::process::exit(1);
            }
        }
        Cmd::Tokenize {
            tokenizer,
            bos,
            decode,
        } => {
            let tok = Tokenizer::from_file(&tokenizer)?;
            let mut input = Vec::new();
            std::io::stdin()
                .read_to_end(&mut input)
                .context("reading stdin")?;
            if decode {
                let text = String::from_utf8(input).context("stdin is not UTF-8")?;
                let ids: Vec<u32> = serde_json::from_str(text.trim())
                    .context("--decode expects a JSON array of token ids on stdin")?;
                if let Some(bad) = ids.iter().find(|&&i| i as usize >= tok.vocab_size()) {
                    bail!(
                        "id {bad} is outside the vocabulary (size {})",
                        tok.vocab_size()
                    );
                }
                println!("{}", tok.decode(&ids)?);
            } else {
                let text = match String::from_utf8(input) {
                    Ok(t) => t,
                    Err(e) => bail!(
                        "stdin is not valid UTF-8 (first bad byte at offset {})",
                        e.utf8_error().valid_up_to()
                    ),
                };
                let ids = tok.encode(&text, bos)?;
                println!("{}", serde_json::to_string(&ids)?);
            }
        }
        Cmd::Selftest { out } => {
            println!("llama2 selftest on {}", engine::Backend::name(&Cpu));
            let s = trainer::selftest::run(&out)?;
            for l in s.lines {
                println!("  {l}");
            }
            println!("selftest passed");
        }
    }
    Ok(())
}
