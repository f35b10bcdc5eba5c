//! Data and tokenizer tools: `tokenize`, `prepare-data`, `train-tokenizer`.

use anyhow::{bail, Context, Result};
use engine::tokenizer::Tokenizer;
use std::io::Read;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct TokenizeArgs {
    #[arg(long)]
    tokenizer: PathBuf,
    /// Prepend the BOS token.
    #[arg(long)]
    bos: bool,
    /// Read a JSON array of ids from stdin and print the text.
    #[arg(long)]
    decode: bool,
}

pub fn tokenize(a: TokenizeArgs) -> Result<()> {
    let TokenizeArgs {
        tokenizer,
        bos,
        decode,
    } = a;
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
    Ok(())
}

#[derive(clap::Args)]
pub struct PrepareDataArgs {
    #[arg(long)]
    tokenizer: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// Text files, directories of them, or .jsonl files.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Fraction of the corpus held out for validation.
    #[arg(long, default_value_t = 0.01)]
    val_fraction: f64,
    /// Tokens per training shard.
    #[arg(long, default_value_t = 100_000_000)]
    shard_tokens: usize,
    /// Skip (and report) bad documents instead of stopping at the first.
    #[arg(long)]
    skip_bad: bool,
}

pub fn prepare_data(a: PrepareDataArgs) -> Result<()> {
    let PrepareDataArgs {
        tokenizer,
        out,
        inputs,
        val_fraction,
        shard_tokens,
        skip_bad,
    } = a;
    let meta = trainer::data::prepare(&trainer::data::PrepareConfig {
        tokenizer,
        out: out.clone(),
        inputs,
        val_fraction,
        shard_tokens,
        skip_bad,
        progress: true,
    })?;
    println!(
        "{}: {} documents ({} skipped), {} train tokens in {} shard(s), {} validation tokens ({})",
        out.display(),
        meta.documents,
        meta.skipped_documents,
        meta.train_tokens,
        meta.train_shards.len(),
        meta.val_tokens,
        meta.val_split
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct TrainTokenizerArgs {
    #[arg(long)]
    vocab_size: usize,
    #[arg(long)]
    out: PathBuf,
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    #[arg(long, default_value_t = 2)]
    min_frequency: u64,
    #[arg(long)]
    skip_bad: bool,
}

pub fn train_tokenizer(a: TrainTokenizerArgs) -> Result<()> {
    let TrainTokenizerArgs {
        vocab_size,
        out,
        inputs,
        min_frequency,
        skip_bad,
    } = a;
    let n = trainer::tokenizer_train::train(&trainer::tokenizer_train::TrainTokenizerConfig {
        inputs,
        vocab_size,
        out: out.clone(),
        min_frequency,
        skip_bad,
        progress: true,
    })?;
    println!("{}: byte-fallback BPE with {n} tokens", out.display());
    Ok(())
}
