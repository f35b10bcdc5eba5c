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
    #[arg(long, conflicts_with = "chat")]
    decode: bool,
    /// Read a JSON list of `{"role", "content"}` messages from stdin and print the ids of its
    /// Llama 2 chat rendering, exactly what SFT trains on (BOS included; `--bos` is implied).
    /// `--mask` also prints which ids carry the loss.
    #[arg(long, conflicts_with = "bos")]
    chat: bool,
    /// With --chat: print `{"ids": [...], "mask": [...]}`, the mask true on learned (assistant)
    /// tokens.
    #[arg(long, requires = "chat")]
    mask: bool,
}

pub fn tokenize(a: TokenizeArgs) -> Result<()> {
    let TokenizeArgs {
        tokenizer,
        bos,
        decode,
        chat,
        mask,
    } = a;
    let tok = Tokenizer::from_file(&tokenizer)?;
    let mut input = Vec::new();
    std::io::stdin()
        .read_to_end(&mut input)
        .context("reading stdin")?;
    if chat {
        let text = String::from_utf8(input).context("stdin is not UTF-8")?;
        let v: serde_json::Value = serde_json::from_str(text.trim())
            .context("--chat expects a JSON list of {\"role\", \"content\"} messages on stdin")?;
        // The same message reader as the data files, so roles and fields are checked alike.
        let msgs = trainer::formats::messages(&serde_json::json!({ "messages": v }), "messages")
            .context("--chat expects a JSON list of {\"role\", \"content\"} messages on stdin")?;
        let (ids, learn) = tok.chat(&msgs)?;
        if mask {
            println!("{}", serde_json::json!({"ids": ids, "mask": learn}));
        } else {
            println!("{}", serde_json::to_string(&ids)?);
        }
    } else if decode {
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
pub struct ConvertArgs {
    /// What the input holds: dialogues (SFT), pairs (reward models) or prompts (RS, PPO).
    #[arg(long)]
    kind: trainer::formats::Kind,
    /// The JSONL file to write.
    #[arg(long)]
    out: PathBuf,
    /// JSONL files in any shape `sft`, `train-rm` or `ppo` read.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Skip (and report) bad lines instead of stopping at the first.
    #[arg(long)]
    skip_bad: bool,
}

pub fn convert(a: ConvertArgs) -> Result<()> {
    let (n, skipped) = trainer::formats::convert(a.kind, &a.inputs, &a.out, a.skip_bad)?;
    println!(
        "{}: {n} records in TRL's conversational form ({skipped} bad lines skipped)",
        a.out.display()
    );
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
