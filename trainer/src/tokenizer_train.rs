//! `llama2 train-tokenizer`: a byte-fallback BPE in Llama 2's shape, trained with the
//! `tokenizers` crate, for small models where the 32k Llama vocabulary would dwarf the network.
//!
//! Layout as Llama's: `<unk>` 0, `<s>` 1, `</s>` 2, the 256 byte tokens `<0x00>`..`<0xFF>` at
//! 3..258 (so no text is ever unknown), then the learned pieces. Spaces become `▁` attached to the
//! following word, as in SentencePiece; the pre-tokenizer also splits after every newline, so a
//! long text can be tokenized in pieces cut after newlines with exactly the same ids.

use crate::data::{expand_inputs, read_documents};
use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::BpeTrainerBuilder;
use tokenizers::models::TrainerWrapper;
use tokenizers::AddedToken;

pub struct TrainTokenizerConfig {
    pub inputs: Vec<PathBuf>,
    pub vocab_size: usize,
    pub out: PathBuf,
    pub min_frequency: u64,
    pub skip_bad: bool,
    pub progress: bool,
}

const SPECIALS: [&str; 3] = ["<unk>", "<s>", "</s>"];

fn skeleton() -> Value {
    let added: Vec<Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"String": "\n"}, "behavior": "MergedWithPrevious", "invert": false},
            {"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "never", "split": true}
        ]},
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"}
        ]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": {}, "merges": []}
    })
}

/// Trains and writes the tokenizer; returns its final vocabulary size.
pub fn train(cfg: &TrainTokenizerConfig) -> Result<usize> {
    ensure!(
        cfg.vocab_size >= 300,
        "--vocab-size {} is too small: 3 special and 256 byte tokens come first (use at least 300)",
        cfg.vocab_size
    );
    let files = expand_inputs(&cfg.inputs)?;
    let mut texts = Vec::new();
    for f in &files {
        let mut warn = |m: String| eprintln!("warning: skipped {m}");
        texts.extend(
            read_documents(f, cfg.skip_bad, &mut warn)?
                .into_iter()
                .map(|d| d.text),
        );
    }
    ensure!(texts.iter().any(|t| !t.is_empty()), "the corpus is empty");
    let mut tok: tokenizers::Tokenizer =
        skeleton().to_string().parse().map_err(anyhow::Error::msg)?;
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(cfg.vocab_size - 256)
        .min_frequency(cfg.min_frequency)
        .limit_alphabet(((cfg.vocab_size - 259) / 2).min(150))
        .special_tokens(
            SPECIALS
                .iter()
                .map(|s| AddedToken::from(*s, true))
                .collect(),
        )
        .show_progress(cfg.progress)
        .build();
    let mut trainer = TrainerWrapper::from(trainer);
    tok.train(&mut trainer, texts.iter())
        .map_err(anyhow::Error::msg)?;
    let mut v: Value = serde_json::from_str(&tok.to_string(false).map_err(anyhow::Error::msg)?)?;

    // Renumber: specials, then the 256 byte-fallback tokens, then the learned pieces in order.
    let old = v["model"]["vocab"]
        .as_object()
        .context("trained vocab")?
        .clone();
    let mut learned: Vec<(&String, u64)> = old
        .iter()
        .filter(|(k, _)| !SPECIALS.contains(&k.as_str()))
        .map(|(k, id)| (k, id.as_u64().unwrap_or(u64::MAX)))
        .collect();
    learned.sort_by_key(|&(_, id)| id);
    let mut vocab = serde_json::Map::new();
    for s in SPECIALS {
        vocab.insert(s.to_string(), json!(vocab.len()));
    }
    for b in 0..=255u8 {
        vocab.insert(format!("<0x{b:02X}>"), json!(vocab.len()));
    }
    for (k, _) in learned {
        if !vocab.contains_key(k) {
            vocab.insert(k.clone(), json!(vocab.len()));
        }
    }
    let size = vocab.len();
    ensure!(
        size <= cfg.vocab_size,
        "trained {size} tokens, more than the requested {}",
        cfg.vocab_size
    );
    v["model"]["vocab"] = Value::Object(vocab);
    let text = serde_json::to_string(&v)?;
    // Validate by loading what we are about to write.
    let check: tokenizers::Tokenizer = text.parse().map_err(anyhow::Error::msg)?;
    ensure!(
        check.get_vocab_size(true) == size,
        "vocabulary size mismatch after renumbering"
    );
    if let Some(p) = cfg.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
    }
    crate::run_dir::write_atomic(&cfg.out, text.as_bytes())?;
    Ok(size)
}

/// Convenience for tests and the pipeline: train on one file.
pub fn train_on(file: &Path, vocab_size: usize, out: &Path) -> Result<usize> {
    train(&TrainTokenizerConfig {
        inputs: vec![file.to_path_buf()],
        vocab_size,
        out: out.to_path_buf(),
        min_frequency: 2,
        skip_bad: false,
        progress: false,
    })
}
