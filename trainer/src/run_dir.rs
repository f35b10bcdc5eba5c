//! The run directory, written the same way by every stage: `config.json`, `metrics.jsonl`, a
//! progress bar (plain lines without a terminal), `checkpoints/<name>/` with `checkpoints/latest`
//! naming the newest, and the reports. Under it: one atomic writer, one JSON and one JSONL
//! reader/writer, one way to resolve "the latest checkpoint" and to publish and prune them, and
//! the collective check that turns one rank's failure into an error on all.
//!
//! Atomic means a temporary sibling, fsync, rename (`engine::checkpoint::write_file_atomic`):
//! a killed run leaves the old file or the new one, never half of one, which is what lets a
//! killed recipe continue where it stopped.

use anyhow::{anyhow, bail, ensure, Context, Result};
use engine::dist::Collective;
use indicatif::{ProgressBar, ProgressStyle};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// Files

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    engine::checkpoint::write_file_atomic(path, bytes)
        .with_context(|| format!("writing {}", path.display()))
}

/// Writes `value` as pretty JSON, atomically (configurations, reports, states).
pub fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .with_context(|| format!("serialising {}", path.display()))?;
    write_atomic(path, text.as_bytes())
}

/// Reads a JSON file into `T`; the error names the file and says whether it is missing or
/// malformed.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: malformed", path.display()))
}

/// Writes the run's configuration as `out/config.json`, creating `out`.
pub fn write_config<T: Serialize + ?Sized>(out: &Path, cfg: &T) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    write_json(&out.join("config.json"), cfg)
}

/// Makes `p` absolute against the working directory (an empty path stays empty), so a path
/// saved in a checkpoint's configuration works from any directory.
pub fn make_absolute(p: &mut PathBuf) -> Result<()> {
    if !p.as_os_str().is_empty() {
        *p = std::path::absolute(&*p).with_context(|| format!("resolving {}", p.display()))?;
    }
    Ok(())
}

/// The serde default of a count or seed that was 1 before its field existed, so older
/// configurations and checkpoints still read (`#[serde(default = "crate::run_dir::one")]`).
pub fn one<T: From<u8>>() -> T {
    T::from(1)
}

// ---------------------------------------------------------------------------------------------
// JSONL

/// The lines of a JSONL file that hold something, numbered from 1, for readers that report
/// `file:line`: a UTF-8 byte-order mark at the start is dropped, and a line that is not UTF-8 is
/// an `Err` of its own (naming the byte), so one bad line does not fail the whole file without
/// a line number, and `--skip-bad` can skip it.
pub fn jsonl_lines(path: &Path) -> Result<Vec<(usize, Result<String>)>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(split_jsonl(&bytes)
        .map(|(n, l)| (n, l.map(str::to_string)))
        .collect())
}

/// [`jsonl_lines`] over bytes in memory.
fn split_jsonl(bytes: &[u8]) -> impl Iterator<Item = (usize, Result<&str>)> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, l)| !l.iter().all(|b| b.is_ascii_whitespace()))
        .map(|(i, l)| {
            let text = std::str::from_utf8(l)
                .map_err(|e| anyhow!("not valid UTF-8 (byte {} of the line)", e.valid_up_to() + 1));
            (i + 1, text)
        })
}

/// Every row of JSONL `files` through `parse` (the line's JSON value and its `file:line`). A
/// line that is not UTF-8, not JSON, or that `parse` rejects is an error naming `file:line`, or
/// with `skip_bad: Some(true)` a warning; `Some(false)` is a command with `--skip-bad` (the error
/// says so), `None` one without. Returns the rows and how many lines were skipped. The record
/// readers of `formats` (dialogues, pairs, prompts, score rows) are `parse` functions over this.
pub fn read_jsonl<T>(
    files: &[PathBuf],
    skip_bad: Option<bool>,
    mut parse: impl FnMut(serde_json::Value, &str) -> Result<T>,
) -> Result<(Vec<T>, usize)> {
    let mut out = Vec::new();
    let mut skipped = 0;
    for f in files {
        for (ln, line) in jsonl_lines(f)? {
            let origin = format!("{}:{ln}", f.display());
            let row = line
                .and_then(|l| {
                    serde_json::from_str::<serde_json::Value>(&l)
                        .map_err(|e| anyhow!("invalid JSON: {e}"))
                })
                .and_then(|v| parse(v, &origin));
            match row {
                Ok(r) => out.push(r),
                Err(e) if skip_bad == Some(true) => {
                    eprintln!("warning: skipped {origin}: {e:#}");
                    skipped += 1;
                }
                Err(e) if skip_bad.is_some() => {
                    bail!("{origin}: {e:#} (pass --skip-bad to skip such lines)")
                }
                Err(e) => bail!("{origin}: {e:#}"),
            }
        }
    }
    Ok((out, skipped))
}

/// Every line of a JSONL file as a JSON value; a malformed line is an error naming file and line.
pub fn read_jsonl_values(path: &Path) -> Result<Vec<serde_json::Value>> {
    jsonl_lines(path)?
        .into_iter()
        .map(|(n, l)| {
            l.and_then(|l| Ok(serde_json::from_str(&l)?))
                .with_context(|| format!("{}:{n}: not a JSON object", path.display()))
        })
        .collect()
}

/// Writes `rows` as JSONL, one compact JSON value a line, atomically.
pub fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let mut buf = Vec::new();
    for r in rows {
        serde_json::to_writer(&mut buf, r)
            .with_context(|| format!("serialising a row of {}", path.display()))?;
        buf.push(b'\n');
    }
    write_atomic(path, &buf)
}

// ---------------------------------------------------------------------------------------------
// Progress and metrics

/// A progress bar labelled `label` over `len` steps, hidden when `show` is false (then [`say`]
/// prints plain lines).
pub fn progress(label: &str, len: u64, show: bool) -> ProgressBar {
    let bar = if show {
        ProgressBar::new(len)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{label} {{bar:30}} {{pos}}/{{len}} [{{elapsed_precise}}<{{eta_precise}}] {{msg}}"
        ))
        .expect("template"),
    );
    bar
}

/// Prints above the progress bar, or plainly when it is hidden.
pub fn say(bar: &ProgressBar, msg: impl AsRef<str>) {
    if bar.is_hidden() {
        println!("{}", msg.as_ref());
    } else {
        bar.println(msg.as_ref());
    }
}

/// `metrics.jsonl`: one JSON object per line, appended as the run goes.
pub struct MetricsWriter {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsWriter {
    /// Opens `path` for appending; `keep_until_step` first drops lines of later steps (a resumed
    /// run rewrites what the interrupted one logged after its checkpoint); `None` starts afresh.
    pub fn open(path: &Path, keep_until_step: Option<u64>) -> Result<Self> {
        if let Some(last) = keep_until_step {
            if let Ok(text) = std::fs::read_to_string(path) {
                let kept: Vec<&str> = text
                    .lines()
                    .filter(|l| {
                        serde_json::from_str::<serde_json::Value>(l)
                            .ok()
                            .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                            .is_some_and(|s| s <= last)
                    })
                    .collect();
                let mut body = kept.join("\n");
                if !body.is_empty() {
                    body.push('\n');
                }
                write_atomic(path, body.as_bytes())?;
            }
        } else {
            let _ = std::fs::remove_file(path);
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(MetricsWriter {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn write(&mut self, v: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}").with_context(|| format!("writing {}", self.path.display()))
    }
}

// ---------------------------------------------------------------------------------------------
// Checkpoints

/// The file in a checkpoint directory that names the newest checkpoint: `checkpoints/latest`.
pub const LATEST: &str = "latest";

/// The `kind` checkpoint (`training`, `PPO`) `path` names: `path` itself when it holds `marker`
/// (the stage's state file, e.g. `trainer_state.json`), else the one that
/// `path/checkpoints/latest` (a run directory) or `path/latest` (its `checkpoints/`) names,
/// which must hold `marker`.
pub fn resolve_checkpoint(path: &Path, marker: &str, kind: &str) -> Result<PathBuf> {
    if path.join(marker).is_file() {
        return Ok(path.to_path_buf());
    }
    for latest in [path.join("checkpoints").join(LATEST), path.join(LATEST)] {
        if let Some(dir) = read_latest(&latest)? {
            ensure!(
                dir.join(marker).is_file(),
                "{} names {}, which is not a {kind} checkpoint (no {marker})",
                latest.display(),
                dir.display()
            );
            return Ok(dir);
        }
    }
    bail!(
        "{}: no {kind} checkpoint here (expected {marker} or checkpoints/latest)",
        path.display()
    )
}

/// The directory a `latest` file names, beside it; `None` when there is no such file.
fn read_latest(latest: &Path) -> Result<Option<PathBuf>> {
    match std::fs::read_to_string(latest) {
        Ok(name) => Ok(Some(latest.parent().expect("a parent").join(name.trim()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", latest.display())),
    }
}

/// A model given as its checkpoint directory (holding `config.json`), as a training run's
/// directory (its `checkpoints/latest`), or as a reward-model run's directory (its `model/`).
pub fn model_dir(path: &Path) -> Result<PathBuf> {
    // A run directory holds a `config.json` too (the run's): its checkpoints are looked for
    // first.
    if let Some(dir) = read_latest(&path.join("checkpoints").join(LATEST))? {
        return Ok(dir);
    }
    let rm = path.join("model");
    if rm.join("config.json").is_file() {
        return Ok(rm);
    }
    Ok(path.to_path_buf())
}

/// The run directory a checkpoint belongs to: `RUN` for `RUN/checkpoints/NAME`.
pub fn run_dir_of(checkpoint: &Path) -> Option<PathBuf> {
    let dir = std::fs::canonicalize(checkpoint)
        .or_else(|_| std::path::absolute(checkpoint))
        .ok()?;
    let parent = dir.parent()?;
    (parent.file_name()? == "checkpoints").then(|| parent.parent().map(Path::to_path_buf))?
}

/// The number of a checkpoint directory named `PREFIX-N` (`step-00000300`, `iter-000010`).
fn checkpoint_number(name: &str, prefix: &str) -> Option<usize> {
    name.strip_prefix(prefix)?.strip_prefix('-')?.parse().ok()
}

/// Makes `root/name` (a checkpoint `PREFIX-N` just written) the latest: `root/latest` names it
/// (atomically), every `PREFIX-M` with M > N is removed (left by the interrupted run a resume
/// continues, or by an earlier run in the same directory), and of the rest the newest `keep`
/// stay. So `latest` always names the newest checkpoint kept.
pub fn publish(root: &Path, name: &str, keep: usize) -> Result<()> {
    let (prefix, current) = name
        .rsplit_once('-')
        .and_then(|(p, _)| Some((p, checkpoint_number(name, p)?)))
        .ok_or_else(|| anyhow!("{name}: a checkpoint name is PREFIX-N"))?;
    write_atomic(&root.join(LATEST), name.as_bytes())?;
    let mut all: Vec<(usize, PathBuf)> = std::fs::read_dir(root)
        .with_context(|| format!("listing {}", root.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .filter_map(|p| Some((checkpoint_number(p.file_name()?.to_str()?, prefix)?, p)))
        .collect();
    all.sort();
    let (mut mine, later): (Vec<_>, Vec<_>) = all.into_iter().partition(|(n, _)| *n <= current);
    for (_, p) in later {
        let _ = std::fs::remove_dir_all(p);
    }
    while mine.len() > keep.max(1) {
        let _ = std::fs::remove_dir_all(mine.remove(0).1);
    }
    Ok(())
}

/// Writes optimizer moments (flat f32 tensors, named) as one safetensors file, atomically.
pub fn write_optimizer(path: &Path, tensors: &[(&str, &[f32])]) -> engine::Result<()> {
    let meta = [("format".to_string(), "pt".to_string())].into();
    engine::checkpoint::write_safetensors_atomic(path, tensors, meta)
}

/// Turns one rank's failure into an error on every rank (its own error on the rank that
/// failed), so none is left waiting in the next collective.
pub fn agree<C: Collective + ?Sized>(comm: &mut C, mine: Result<()>, what: &str) -> Result<()> {
    let mut failed = [if mine.is_err() { 1.0f32 } else { 0.0 }];
    comm.all_reduce_sum(&mut failed)?;
    mine?;
    ensure!(
        failed[0] == 0.0,
        "{what}: {} other rank(s) failed (their own errors say why)",
        failed[0]
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_keeps_the_newest_and_drops_later_ones() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        for n in [1, 2, 3, 4, 9] {
            std::fs::create_dir_all(root.join(format!("iter-{n:06}"))).unwrap();
        }
        std::fs::create_dir_all(root.join("other-000002")).unwrap();
        publish(root, "iter-000004", 2).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["iter-000003", "iter-000004", "latest", "other-000002"]
        );
        assert_eq!(
            resolve_checkpoint(root.parent().unwrap(), "nothing", "test").is_err(),
            true
        );
        std::fs::write(root.join("iter-000004/state.json"), "{}").unwrap();
        assert_eq!(
            resolve_checkpoint(root, "state.json", "test").unwrap(),
            root.join("iter-000004")
        );
    }

    #[test]
    fn jsonl_rows_name_file_and_line() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("x.jsonl");
        std::fs::write(&f, "\u{feff}{\"a\": 1}\n\n{\"a\": \"no\"}\n{oops\n").unwrap();
        let parse = |v: serde_json::Value, _: &str| -> Result<i64> {
            v["a"]
                .as_i64()
                .ok_or_else(|| anyhow!("`a` is not a number"))
        };
        let e = read_jsonl(std::slice::from_ref(&f), Some(false), parse).unwrap_err();
        assert!(
            format!("{e:#}").contains("x.jsonl:3: `a` is not a number"),
            "{e:#}"
        );
        let (rows, skipped) = read_jsonl(std::slice::from_ref(&f), Some(true), parse).unwrap();
        assert_eq!((rows, skipped), (vec![1], 2));
    }
}
