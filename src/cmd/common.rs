//! What the command modules share: the `--device` dispatch and loading a chat model.

use anyhow::{Context, Result};
use engine::tokenizer::Tokenizer;
use std::path::PathBuf;

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
pub fn load_for_generation<B: engine::Backend>(
    be: B,
    model: &std::path::Path,
    tokenizer: Option<&std::path::Path>,
) -> Result<(engine::Llama<B>, Tokenizer)> {
    let tok_path = tokenizer
        .map(PathBuf::from)
        .unwrap_or_else(|| model.join("tokenizer.json"));
    let tok = Tokenizer::from_file(&tok_path)
        .with_context(|| "the checkpoint has no tokenizer.json: pass --tokenizer")?;
    let m = engine::checkpoint::load_model(be, model, engine::Head::Lm)?;
    Ok((m, tok))
}
