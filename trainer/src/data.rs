//! Pretraining data: documents from text files, directories and JSONL, tokenized in parallel into
//! memory-mapped token shards, and the loader that reads random windows from them.
//!
//! Shard format (little-endian): a 32-byte header — magic `LL2TOKS\0`, version u32, bytes per
//! token u32 (2 when the vocabulary fits in u16, else 4), vocab size u64, token count u64 —
//! followed by the tokens. A directory holds `train-NNNNN.bin`, `val.bin`, `tokenizer.json` and
//! `meta.json`.

use anyhow::{anyhow, bail, ensure, Context, Result};
use engine::tokenizer::Tokenizer;
use indicatif::{ProgressBar, ProgressStyle};
use memmap2::Mmap;
use rayon::prelude::*;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"LL2TOKS\0";
pub const VERSION: u32 = 1;
const HEADER: usize = 32;

// ---------------------------------------------------------------------------------------------
// Shards

/// Writes a token shard atomically (temp file, fsync, rename).
pub fn write_shard(path: &Path, tokens: &[u32], vocab_size: usize) -> Result<()> {
    let bpt: u32 = if vocab_size <= 1 << 16 { 2 } else { 4 };
    let mut buf = Vec::with_capacity(HEADER + tokens.len() * bpt as usize);
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&VERSION.to_le_bytes());
    buf.extend_from_slice(&bpt.to_le_bytes());
    buf.extend_from_slice(&(vocab_size as u64).to_le_bytes());
    buf.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    for &t in tokens {
        ensure!(
            (t as usize) < vocab_size,
            "{}: token {t} outside vocabulary {vocab_size}",
            path.display()
        );
        if bpt == 2 {
            buf.extend_from_slice(&(t as u16).to_le_bytes());
        } else {
            buf.extend_from_slice(&t.to_le_bytes());
        }
    }
    write_atomic(path, &buf)
}

/// Writes a file atomically: a temporary sibling, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.sync_all()
        .with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// A memory-mapped token shard.
pub struct Shard {
    pub path: PathBuf,
    mmap: Mmap,
    pub bytes_per_token: usize,
    pub vocab_size: usize,
    pub len: usize,
}

impl Shard {
    pub fn open(path: &Path) -> Result<Self> {
        let f = std::fs::File::open(path)
            .with_context(|| format!("opening shard {}", path.display()))?;
        // SAFETY: read-only map of a file this process does not modify; shards are written
        // atomically, so a complete file is never changed in place.
        let mmap =
            unsafe { Mmap::map(&f) }.with_context(|| format!("mapping {}", path.display()))?;
        let bad = |m: &str| anyhow!("{}: not a token shard: {m}", path.display());
        if mmap.len() < HEADER || &mmap[..8] != MAGIC {
            return Err(bad(
                "bad magic (expected LL2TOKS; was it written by `llama2 prepare-data`?)",
            ));
        }
        let u32_at = |o: usize| u32::from_le_bytes(mmap[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(mmap[o..o + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != VERSION {
            return Err(bad(&format!(
                "version {version}, this build reads {VERSION}"
            )));
        }
        let bpt = u32_at(12) as usize;
        if bpt != 2 && bpt != 4 {
            return Err(bad(&format!("{bpt} bytes per token")));
        }
        let (vocab_size, len) = (u64_at(16) as usize, u64_at(24) as usize);
        if mmap.len() != HEADER + len * bpt {
            return Err(bad(&format!(
                "header says {len} tokens ({} bytes) but the file has {} bytes (truncated?)",
                HEADER + len * bpt,
                mmap.len()
            )));
        }
        Ok(Shard {
            path: path.to_path_buf(),
            mmap,
            bytes_per_token: bpt,
            vocab_size,
            len,
        })
    }

    #[inline]
    pub fn get(&self, i: usize) -> u32 {
        let o = HEADER + i * self.bytes_per_token;
        if self.bytes_per_token == 2 {
            u16::from_le_bytes([self.mmap[o], self.mmap[o + 1]]) as u32
        } else {
            u32::from_le_bytes(self.mmap[o..o + 4].try_into().expect("4 bytes"))
        }
    }

    pub fn tokens(&self) -> Vec<u32> {
        (0..self.len).map(|i| self.get(i)).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Documents

/// A document and where it came from (`file` or `file:line`), for error messages.
pub struct Document {
    pub source: String,
    pub text: String,
}

/// Text files, directories of them (recursively, sorted), and `.jsonl` files.
pub fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in inputs {
        if p.is_dir() {
            let mut found = Vec::new();
            walk(p, &mut found)?;
            found.sort();
            if found.is_empty() {
                bail!(
                    "{}: directory has no .txt, .md or .jsonl files",
                    p.display()
                );
            }
            out.extend(found);
        } else if p.is_file() {
            out.push(p.clone());
        } else {
            bail!("{}: no such file or directory", p.display());
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in
        std::fs::read_dir(dir).with_context(|| format!("reading directory {}", dir.display()))?
    {
        let p = e?.path();
        if p.is_dir() {
            walk(&p, out)?;
        } else if matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("txt" | "md" | "text" | "jsonl")
        ) {
            out.push(p);
        }
    }
    Ok(())
}

fn is_jsonl(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "jsonl")
}

/// Reads one input file's documents: the whole file for text, one per line for JSONL (the
/// `text` field). A bad document is an error naming the file and line; with `skip_bad` it is
/// reported through `warn` and skipped instead.
pub fn read_documents(
    path: &Path,
    skip_bad: bool,
    warn: &mut dyn FnMut(String),
) -> Result<Vec<Document>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut handle = |msg: String| -> Result<()> {
        if skip_bad {
            warn(msg);
            Ok(())
        } else {
            Err(anyhow!("{msg} (pass --skip-bad to skip such documents)"))
        }
    };
    if !is_jsonl(path) {
        return match String::from_utf8(bytes) {
            Ok(text) => Ok(vec![Document {
                source: path.display().to_string(),
                text,
            }]),
            Err(e) => {
                let at = e.utf8_error().valid_up_to();
                let line = 1 + e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count();
                handle(format!(
                    "{}:{line}: not valid UTF-8 (byte offset {at})",
                    path.display()
                ))?;
                Ok(vec![])
            }
        };
    }
    let mut docs = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let ln = i + 1;
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let src = format!("{}:{ln}", path.display());
        let line = match std::str::from_utf8(line) {
            Ok(l) => l,
            Err(_) => {
                handle(format!("{src}: not valid UTF-8"))?;
                continue;
            }
        };
        let v: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                handle(format!("{src}: invalid JSON: {e}"))?;
                continue;
            }
        };
        match v.get("text").map(|t| t.as_str()) {
            Some(Some(t)) => docs.push(Document {
                source: src,
                text: t.to_string(),
            }),
            Some(None) => handle(format!("{src}: field `text` is not a string"))?,
            None => handle(format!("{src}: no `text` field"))?,
        }
    }
    Ok(docs)
}

// ---------------------------------------------------------------------------------------------
// prepare-data

pub struct PrepareConfig {
    pub tokenizer: PathBuf,
    pub out: PathBuf,
    pub inputs: Vec<PathBuf>,
    /// Fraction of the corpus held out for validation.
    pub val_fraction: f64,
    /// Tokens per training shard.
    pub shard_tokens: usize,
    pub skip_bad: bool,
    pub progress: bool,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct DataMeta {
    pub format: String,
    pub vocab_size: usize,
    pub eos_id: u32,
    pub documents: usize,
    pub skipped_documents: usize,
    pub train_tokens: usize,
    pub val_tokens: usize,
    pub train_shards: Vec<String>,
    pub val_split: String,
    pub sources: Vec<String>,
}

/// Splits text into pieces that tokenize independently (after newlines), when the tokenizer is
/// known to give the same ids piecewise as whole; otherwise one piece.
fn pieces(text: &str, splittable: bool) -> Vec<&str> {
    const PIECE: usize = 1 << 16;
    if !splittable || text.len() <= PIECE {
        return vec![text];
    }
    let mut out = Vec::new();
    let mut start = 0;
    while start < text.len() {
        let mut end = (start + PIECE).min(text.len());
        if end < text.len() {
            match text[end..].find('\n') {
                Some(k) => end += k + 1,
                None => end = text.len(),
            }
        }
        out.push(&text[start..end]);
        start = end;
    }
    out
}

/// True when encoding a text in pieces split after newlines gives the same ids as whole.
fn tokenizer_splits_at_newlines(tok: &Tokenizer) -> Result<bool> {
    let (a, b) = (
        "First Citizen:\nBefore we proceed any further, hear me speak.\n",
        "All:\nSpeak, speak.\n",
    );
    let whole = tok.encode(&format!("{a}{b}"), false)?;
    let mut parts = tok.encode(a, false)?;
    parts.extend(tok.encode(b, false)?);
    Ok(whole == parts)
}

pub fn prepare(cfg: &PrepareConfig) -> Result<DataMeta> {
    let tok = Tokenizer::from_file(&cfg.tokenizer)?;
    let vocab = tok.vocab_size();
    let files = expand_inputs(&cfg.inputs)?;
    ensure!(
        (0.0..1.0).contains(&cfg.val_fraction) && cfg.val_fraction > 0.0,
        "--val-fraction must be in (0, 1), got {}",
        cfg.val_fraction
    );
    let mut docs = Vec::new();
    let mut skipped = 0usize;
    for f in &files {
        let mut warn = |m: String| {
            eprintln!("warning: skipped {m}");
            skipped += 1;
        };
        docs.extend(read_documents(f, cfg.skip_bad, &mut warn)?);
    }
    let total_bytes: usize = docs.iter().map(|d| d.text.len()).sum();
    ensure!(
        total_bytes > 0,
        "the corpus is empty: no text in {} input file(s)",
        files.len()
    );
    let splittable = tokenizer_splits_at_newlines(&tok)?;
    let bar = if cfg.progress {
        ProgressBar::new(total_bytes as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "tokenizing {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("template"),
    );
    let encoded: Vec<Vec<u32>> = docs
        .par_iter()
        .map(|d| -> Result<Vec<u32>> {
            let parts: Vec<&str> = pieces(&d.text, splittable);
            let mut ids = Vec::new();
            for p in parts {
                ids.extend(tok.encode(p, false).with_context(|| d.source.clone())?);
                bar.inc(p.len() as u64);
            }
            ids.push(tok.eos);
            Ok(ids)
        })
        .collect::<Result<_>>()?;
    bar.finish_and_clear();

    // Hold out whole documents when there are enough of them, else the tail of the stream.
    let mut train: Vec<u32> = Vec::new();
    let mut val: Vec<u32> = Vec::new();
    let val_split;
    let every = (1.0 / cfg.val_fraction).round().max(2.0) as usize;
    if encoded.len() >= 2 * every {
        for (i, d) in encoded.iter().enumerate() {
            if i % every == every - 1 {
                val.extend(d);
            } else {
                train.extend(d);
            }
        }
        val_split = format!("every {every}th document");
    } else {
        let all: Vec<u32> = encoded.concat();
        let n_val = ((all.len() as f64 * cfg.val_fraction).ceil() as usize).max(1);
        ensure!(
            all.len() > n_val + 1,
            "the corpus has only {} tokens: too few to split",
            all.len()
        );
        train.extend_from_slice(&all[..all.len() - n_val]);
        val.extend_from_slice(&all[all.len() - n_val..]);
        val_split = format!("last {n_val} tokens of the stream");
    }
    std::fs::create_dir_all(&cfg.out).with_context(|| format!("creating {}", cfg.out.display()))?;
    let mut shards = Vec::new();
    for (i, chunk) in train.chunks(cfg.shard_tokens.max(1)).enumerate() {
        let name = format!("train-{i:05}.bin");
        write_shard(&cfg.out.join(&name), chunk, vocab)?;
        shards.push(name);
    }
    write_shard(&cfg.out.join("val.bin"), &val, vocab)?;
    std::fs::copy(&cfg.tokenizer, cfg.out.join("tokenizer.json"))
        .with_context(|| format!("copying {}", cfg.tokenizer.display()))?;
    let meta = DataMeta {
        format: format!("llama2 token shards v{VERSION}"),
        vocab_size: vocab,
        eos_id: tok.eos,
        documents: docs.len(),
        skipped_documents: skipped,
        train_tokens: train.len(),
        val_tokens: val.len(),
        train_shards: shards,
        val_split,
        sources: files.iter().map(|f| f.display().to_string()).collect(),
    };
    write_atomic(
        &cfg.out.join("meta.json"),
        serde_json::to_string_pretty(&meta)?.as_bytes(),
    )?;
    Ok(meta)
}

// ---------------------------------------------------------------------------------------------
// The loader

/// A prepared data directory: training shards, the validation shard, its metadata.
pub struct TokenData {
    pub dir: PathBuf,
    pub meta: DataMeta,
    pub train: Vec<Shard>,
    pub val: Shard,
}

impl TokenData {
    pub fn open(dir: &Path) -> Result<Self> {
        let meta_path = dir.join("meta.json");
        let text = std::fs::read_to_string(&meta_path).with_context(|| {
            format!(
                "{}: not a prepared data directory (run `llama2 prepare-data` first)",
                dir.display()
            )
        })?;
        let meta: DataMeta = serde_json::from_str(&text)
            .with_context(|| format!("{}: malformed", meta_path.display()))?;
        ensure!(
            !meta.train_shards.is_empty(),
            "{}: lists no training shards",
            meta_path.display()
        );
        let train = meta
            .train_shards
            .iter()
            .map(|s| Shard::open(&dir.join(s)))
            .collect::<Result<Vec<_>>>()?;
        let val = Shard::open(&dir.join("val.bin"))?;
        for s in train.iter().chain(std::iter::once(&val)) {
            ensure!(
                s.vocab_size == meta.vocab_size,
                "{}: vocab size {} differs from meta.json's {}",
                s.path.display(),
                s.vocab_size,
                meta.vocab_size
            );
        }
        Ok(TokenData {
            dir: dir.to_path_buf(),
            meta,
            train,
            val,
        })
    }
}

#[inline]
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Random windows of `seq_len + 1` tokens. Window k is a pure function of (seed, k), so the
/// loader's whole state is `position` (windows consumed), which checkpoints save.
pub struct Loader {
    seq_len: usize,
    seed: u64,
    pub position: u64,
    /// Cumulative count of window starts per shard.
    cum: Vec<u64>,
}

impl Loader {
    pub fn new(data: &TokenData, seq_len: usize, seed: u64) -> Result<Self> {
        let mut cum = Vec::with_capacity(data.train.len());
        let mut total = 0u64;
        for s in &data.train {
            total += s.len.saturating_sub(seq_len) as u64;
            cum.push(total);
        }
        ensure!(
            total > 0,
            "{}: the training shards have {} tokens, fewer than seq_len + 1 = {}",
            data.dir.display(),
            data.meta.train_tokens,
            seq_len + 1
        );
        Ok(Loader {
            seq_len,
            seed,
            position: 0,
            cum,
        })
    }

    /// Fills `ids` and `targets` ([b, seq_len] each) with the next `b` windows.
    pub fn next_batch(
        &mut self,
        data: &TokenData,
        b: usize,
        ids: &mut Vec<i32>,
        targets: &mut Vec<i32>,
    ) {
        let t = self.seq_len;
        ids.clear();
        targets.clear();
        let total = *self.cum.last().expect("non-empty");
        for _ in 0..b {
            let r = splitmix64(self.seed ^ splitmix64(self.position)) % total;
            self.position += 1;
            let si = self.cum.partition_point(|&c| c <= r);
            let start = (r - if si == 0 { 0 } else { self.cum[si - 1] }) as usize;
            let s = &data.train[si];
            for j in 0..t {
                ids.push(s.get(start + j) as i32);
                targets.push(s.get(start + j + 1) as i32);
            }
        }
    }
}

/// Consecutive non-overlapping validation windows, at most `max_windows`, grouped in batches.
pub fn val_windows(
    data: &TokenData,
    seq_len: usize,
    max_windows: usize,
) -> Result<Vec<(Vec<i32>, Vec<i32>)>> {
    let n = (data.val.len.saturating_sub(1) / seq_len).min(max_windows);
    ensure!(
        n > 0,
        "{}: the validation shard has {} tokens, fewer than seq_len + 1 = {}",
        data.val.path.display(),
        data.val.len,
        seq_len + 1
    );
    Ok((0..n)
        .map(|w| {
            let s = w * seq_len;
            let ids = (s..s + seq_len).map(|i| data.val.get(i) as i32).collect();
            let tg = (s + 1..s + seq_len + 1)
                .map(|i| data.val.get(i) as i32)
                .collect();
            (ids, tg)
        })
        .collect())
}

/// Unigram entropy (nats/token) of the training tokens: the loss of the best model that ignores
/// context, the bar a language model must clear.
pub fn unigram_entropy(data: &TokenData) -> f64 {
    let mut counts = vec![0u64; data.meta.vocab_size];
    let mut n = 0u64;
    for s in &data.train {
        for i in 0..s.len {
            counts[s.get(i) as usize] += 1;
            n += 1;
        }
    }
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n as f64;
            -p * p.ln()
        })
        .sum()
}

/// Every line of a JSONL file as a JSON value; a malformed line is an error naming file and line.
pub fn read_jsonl_values(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}:{}: not a JSON object", path.display(), i + 1))
        })
        .collect()
}
