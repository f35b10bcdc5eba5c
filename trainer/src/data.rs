//! Pretraining data: documents from text files, directories and JSONL, tokenized in parallel into
//! memory-mapped token shards, and the loader that reads random windows from them.
//!
//! Shard format (little-endian): a 32-byte header — magic `LL2TOKS\0`, version u32, bytes per
//! token u32 (2 when the vocabulary fits in u16, else 4), vocab size u64, token count u64 —
//! followed by the tokens. A directory holds `train-NNNNN.bin`, `val.bin`, `tokenizer.json` and
//! `meta.json`.

use crate::run_dir::{write_atomic, write_json};
use anyhow::{anyhow, bail, ensure, Context, Result};
use engine::tokenizer::Tokenizer;
use indicatif::{ProgressBar, ProgressStyle};
use memmap2::Mmap;
use rayon::prelude::*;
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

/// A memory-mapped token shard, or a range of tokens of one file.
pub struct Shard {
    pub path: PathBuf,
    mmap: std::sync::Arc<Mmap>,
    /// Byte offset of the first token (past the header).
    offset: usize,
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
            mmap: std::sync::Arc::new(mmap),
            offset: HEADER,
            bytes_per_token: bpt,
            vocab_size,
            len,
        })
    }

    /// A file of bare token ids as llama2.c and nanoGPT write them: `.npy` (a 1-D array of
    /// dtype `<u2` or `<u4`), or `.bin` of little-endian `raw` ids without a header (a `.bin`
    /// that starts with this project's shard magic is read as a shard). Ids are used as they
    /// are: nothing is appended. `vocab_size` is 0 until the caller sets it.
    pub fn open_ids(path: &Path, raw: TokenDtype) -> Result<Self> {
        let f = std::fs::File::open(path)
            .with_context(|| format!("opening token file {}", path.display()))?;
        // SAFETY: a read-only map of an input file this process does not modify.
        let mmap =
            unsafe { Mmap::map(&f) }.with_context(|| format!("mapping {}", path.display()))?;
        if mmap.starts_with(MAGIC) {
            drop(mmap);
            return Self::open(path);
        }
        let (offset, dtype) = if path.extension().is_some_and(|e| e == "npy") {
            npy_header(&mmap)
                .map_err(|m| anyhow!("{}: not a 1-D u16/u32 .npy: {m}", path.display()))?
        } else {
            (0, raw)
        };
        let bpt = dtype.bytes();
        let body = mmap.len() - offset;
        ensure!(
            body % bpt == 0,
            "{}: {body} bytes of ids is not a whole number of {dtype} tokens (is --token-dtype right?)",
            path.display()
        );
        Ok(Shard {
            path: path.to_path_buf(),
            mmap: std::sync::Arc::new(mmap),
            offset,
            bytes_per_token: bpt,
            vocab_size: 0,
            len: body / bpt,
        })
    }

    /// Tokens `[start, start + len)` of this shard as a shard of their own (sharing the map).
    pub fn range(&self, start: usize, len: usize) -> Shard {
        assert!(start + len <= self.len, "range inside the shard");
        Shard {
            path: self.path.clone(),
            mmap: self.mmap.clone(),
            offset: self.offset + start * self.bytes_per_token,
            bytes_per_token: self.bytes_per_token,
            vocab_size: self.vocab_size,
            len,
        }
    }

    /// The largest id and its position (`None` when empty), read in parallel.
    fn max_id(&self) -> Option<(u32, usize)> {
        (0..self.len)
            .into_par_iter()
            .map(|i| (self.get(i), usize::MAX - i))
            .max()
            .map(|(id, r)| (id, usize::MAX - r))
    }

    #[inline]
    pub fn get(&self, i: usize) -> u32 {
        let o = self.offset + i * self.bytes_per_token;
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

/// How the ids of a headerless `.bin` token file are stored (llama2.c and nanoGPT write u16).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    #[default]
    U16,
    U32,
}

impl TokenDtype {
    pub fn bytes(self) -> usize {
        match self {
            TokenDtype::U16 => 2,
            TokenDtype::U32 => 4,
        }
    }
}

impl std::fmt::Display for TokenDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TokenDtype::U16 => "u16",
            TokenDtype::U32 => "u32",
        })
    }
}

impl std::str::FromStr for TokenDtype {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "u16" | "uint16" => Ok(TokenDtype::U16),
            "u32" | "uint32" => Ok(TokenDtype::U32),
            o => bail!("token dtype `{o}`: expected u16 or u32"),
        }
    }
}

/// The data offset and dtype of a `.npy` file holding a 1-D little-endian u16 or u32 array
/// (format versions 1–3, as `numpy.save` writes them).
pub fn npy_header(b: &[u8]) -> std::result::Result<(usize, TokenDtype), String> {
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        return Err("no .npy magic".into());
    }
    let (len, start): (usize, usize) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 if b.len() >= 12 => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
        v => return Err(format!("format version {v}")),
    };
    let end = start
        .checked_add(len)
        .filter(|&e| e <= b.len())
        .ok_or("the header runs past the end of the file")?;
    let h = std::str::from_utf8(&b[start..end]).map_err(|_| "the header is not text")?;
    // The header is a Python dict literal: {'descr': '<u2', 'fortran_order': False, 'shape': (N,), }
    let field = |k: &str| -> Option<&str> {
        let at = h.find(&format!("'{k}'"))? + k.len() + 2;
        Some(h[at..].trim_start().strip_prefix(':')?.trim_start())
    };
    let descr = field("descr").ok_or("no 'descr'")?;
    let dtype = if descr.starts_with("'<u2'") || descr.starts_with("'|u2'") {
        TokenDtype::U16
    } else if descr.starts_with("'<u4'") {
        TokenDtype::U32
    } else {
        let d = descr.split(',').next().unwrap_or(descr);
        return Err(format!("dtype {d} (expected '<u2' or '<u4')"));
    };
    if !field("fortran_order").is_some_and(|f| f.starts_with("False")) {
        return Err("fortran_order is not False".into());
    }
    let shape = field("shape").ok_or("no 'shape'")?;
    let dims = shape
        .strip_prefix('(')
        .and_then(|x| x.split(')').next())
        .ok_or("malformed 'shape'")?;
    let dims: Vec<&str> = dims
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    let n: usize = match dims.as_slice() {
        [n] => n.parse().map_err(|_| format!("shape ({n},)"))?,
        _ => return Err(format!("shape ({}) is not 1-D", dims.join(", "))),
    };
    let bytes = n.checked_mul(dtype.bytes()).ok_or("the shape overflows")?;
    if b.len() - end != bytes {
        return Err(format!(
            "the shape says {n} tokens ({bytes} bytes) but {} bytes follow the header (truncated?)",
            b.len() - end
        ));
    }
    Ok((end, dtype))
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
    let mut handle = |msg: String| -> Result<()> {
        if skip_bad {
            warn(msg);
            Ok(())
        } else {
            Err(anyhow!("{msg} (pass --skip-bad to skip such documents)"))
        }
    };
    if !is_jsonl(path) {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
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
    for (ln, line) in crate::run_dir::jsonl_lines(path)? {
        let src = format!("{}:{ln}", path.display());
        let line = match line {
            Ok(l) => l,
            Err(e) => {
                handle(format!("{src}: {e}"))?;
                continue;
            }
        };
        let v: serde_json::Value = match serde_json::from_str(&line) {
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
    ensure!(
        cfg.shard_tokens > 0,
        "--shard-tokens must be at least 1 (tokens per training shard)"
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
    for (i, chunk) in train.chunks(cfg.shard_tokens).enumerate() {
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
    write_json(&cfg.out.join("meta.json"), &meta)?;
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

impl TokenData {
    /// Token-id files as pretraining data (llama2.c's and nanoGPT's `.bin`/`.npy`): `path` is
    /// one file, or a directory of them in name order. Validation is the files named `val*`, or
    /// else the last 1 % of the stream (at least one window of `seq_len + 1`). The vocabulary is
    /// `tokenizer`'s when given, else the largest id + 1; an id outside it is an error naming
    /// its file and position.
    pub fn open_ids(
        path: &Path,
        raw: TokenDtype,
        tokenizer: Option<&Tokenizer>,
        seq_len: usize,
    ) -> Result<Self> {
        let files: Vec<PathBuf> = if path.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("reading directory {}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.is_file()
                        && matches!(p.extension().and_then(|e| e.to_str()), Some("bin" | "npy"))
                })
                .collect();
            v.sort();
            ensure!(
                !v.is_empty(),
                "{}: no meta.json (from `llama2 prepare-data`) and no .bin/.npy token files",
                path.display()
            );
            v
        } else {
            ensure!(
                path.is_file(),
                "{}: no such file or directory",
                path.display()
            );
            vec![path.to_path_buf()]
        };
        let is_val = |p: &Path| {
            p.file_stem()
                .and_then(|s| s.to_str())
                .is_some_and(|s| s.starts_with("val"))
        };
        let mut train = Vec::new();
        let mut val = Vec::new();
        for f in &files {
            let s = Shard::open_ids(f, raw)?;
            if is_val(f) {
                val.push(s)
            } else {
                train.push(s)
            }
        }
        ensure!(
            !train.is_empty(),
            "{}: every token file is a validation file (val*)",
            path.display()
        );
        let mut vocab = 0usize;
        for s in train.iter().chain(&val) {
            if let Some((id, at)) = s.max_id() {
                if let Some(tok) = tokenizer {
                    ensure!(
                        (id as usize) < tok.vocab_size(),
                        "{}: token {at} is id {id}, outside the tokenizer's {} ids ({})",
                        s.path.display(),
                        tok.vocab_size(),
                        tok.path.display()
                    );
                }
                vocab = vocab.max(id as usize + 1);
            }
        }
        if let Some(tok) = tokenizer {
            vocab = tok.vocab_size();
        }
        ensure!(vocab > 0, "{}: the token files are empty", path.display());
        let val_split;
        let val = match val.len() {
            0 => {
                let last = train.last_mut().expect("non-empty");
                let n_val = (last.len / 100).max(seq_len + 1);
                ensure!(
                    last.len > n_val + seq_len,
                    "{}: {} tokens are too few to hold out {n_val} for validation and train on windows of {}",
                    last.path.display(),
                    last.len,
                    seq_len + 1
                );
                let v = last.range(last.len - n_val, n_val);
                *last = last.range(0, last.len - n_val);
                val_split = format!("last {n_val} tokens of {}", last.path.display());
                v
            }
            1 => {
                let v = val.pop().expect("one");
                val_split = v.path.display().to_string();
                v
            }
            _ => bail!(
                "{}: more than one validation file (val*): {}",
                path.display(),
                val.iter()
                    .map(|s| s.path.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let mut val = val;
        val.vocab_size = vocab;
        for s in &mut train {
            s.vocab_size = vocab;
        }
        let meta = DataMeta {
            format: format!("token files ({} bytes per id)", train[0].bytes_per_token),
            vocab_size: vocab,
            eos_id: tokenizer.map_or(2, |t| t.eos),
            documents: 0,
            skipped_documents: 0,
            train_tokens: train.iter().map(|s| s.len).sum(),
            val_tokens: val.len,
            train_shards: train.iter().map(|s| s.path.display().to_string()).collect(),
            val_split,
            sources: files.iter().map(|f| f.display().to_string()).collect(),
        };
        Ok(TokenData {
            dir: path.to_path_buf(),
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
