//! What the command modules share: the `--device` dispatch, loading a chat model, and which
//! flags a resumed run may change.

use anyhow::{bail, Result};
use clap::parser::ValueSource;
use clap::ArgMatches;
use engine::tokenizer::Tokenizer;
use std::path::Path;

/// Runs `$body` with `$be` bound to the backend `--device` names: the model and trainer code is
/// generic over the backend, so each command is compiled once per backend.
macro_rules! on_device {
    ($dev:expr, |$be:ident| $body:expr) => {
        match $dev {
            trainer::device::Device::Cpu => {
                let $be = engine::Cpu;
                $body
            }
            trainer::device::Device::Cuda(n) => {
                let $be = trainer::device::open_cuda(n)?;
                $body
            }
        }
    };
}
// Exported by path, so each command module imports it like any other item.
pub(crate) use on_device;

/// A checkpoint with its LM head and a tokenizer (the checkpoint's own unless one is given).
/// Each failure says which: no such model directory, no tokenizer.json in it, or a tokenizer
/// that exists but does not load.
pub fn load_for_generation<B: engine::Backend>(
    be: B,
    model: &Path,
    tokenizer: Option<&Path>,
) -> Result<(engine::Llama<B>, Tokenizer)> {
    check_model_dir(model)?;
    let tok = load_tokenizer(model, tokenizer)?;
    let m = engine::checkpoint::load_model(be, model, engine::Head::Lm)?;
    check_vocab(&m, &tok)?;
    Ok((m, tok))
}

/// `--model` must be a directory: said first, so its absence is not reported as a missing
/// tokenizer.json.
pub fn check_model_dir(model: &Path) -> Result<()> {
    if !model.is_dir() {
        bail!("--model {}: no such checkpoint directory", model.display());
    }
    Ok(())
}

/// `--tokenizer`, or the checkpoint's own tokenizer.json.
pub fn load_tokenizer(model: &Path, tokenizer: Option<&Path>) -> Result<Tokenizer> {
    let path = match tokenizer {
        Some(t) => t.to_path_buf(),
        None => {
            let p = model.join("tokenizer.json");
            if !p.exists() {
                bail!(
                    "{}: the checkpoint has no tokenizer.json: pass --tokenizer",
                    model.display()
                );
            }
            p
        }
    };
    Ok(Tokenizer::from_file(&path)?)
}

/// Ids the tokenizer produces must exist in the model's embedding.
pub fn check_vocab<B: engine::Backend>(m: &engine::Llama<B>, tok: &Tokenizer) -> Result<()> {
    if tok.vocab_size() > m.cfg.vocab_size {
        bail!(
            "the tokenizer {} has {} tokens but the model's vocab_size is {}: they do not belong together",
            tok.path.display(),
            tok.vocab_size(),
            m.cfg.vocab_size
        );
    }
    Ok(())
}

/// With `--resume` the checkpoint's configuration decides the run, so a flag given on the
/// command line that is not in `may_change` (clap ids, e.g. `eval_every`) is an error naming
/// it, instead of being silently ignored. Returns the flags given that may change, for the
/// caller to apply and report.
pub fn resume_flags<A: clap::Args>(given: &ArgMatches, may_change: &[&str]) -> Result<Vec<String>> {
    let cmd = A::augment_args(clap::Command::new("resume"));
    let mut applied = Vec::new();
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        if id == "resume" || !matches!(given.value_source(id), Some(ValueSource::CommandLine)) {
            continue;
        }
        let flag = format!("--{}", arg.get_long().unwrap_or(id));
        if !may_change.contains(&id) {
            bail!(
                "{flag} cannot change on --resume: the checkpoint's configuration decides it \
                 (to change it, start a new run from the checkpoint with --init)"
            );
        }
        applied.push(flag);
    }
    Ok(applied)
}
