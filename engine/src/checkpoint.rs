//! Hugging Face checkpoints: safetensors read through `memmap2` (single file or sharded with
//! `model.safetensors.index.json`; f32, bf16 and f16 stored), and written in the same layout
//! (config.json + model.safetensors, sharded above a size) atomically: a crash never leaves a
//! half-written directory under the final name.

use crate::backend::Backend;
use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::params::{Head, ParamTable};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A set of memory-mapped safetensors files and which file holds each tensor.
pub struct TensorFiles {
    files: Vec<(PathBuf, Mmap)>,
    owner: HashMap<String, usize>,
    /// What to name in errors about a missing tensor: the index file, the file, or the directory.
    pub origin: PathBuf,
}

impl TensorFiles {
    /// Opens a `.safetensors` file, a `model.safetensors.index.json`, or a directory holding
    /// either `model.safetensors` or the index.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            let single = path.join("model.safetensors");
            let index = path.join("model.safetensors.index.json");
            if single.is_file() {
                return Self::open(&single);
            }
            if index.is_file() {
                return Self::open(&index);
            }
            return Err(Error::file(
                path,
                "no model.safetensors or model.safetensors.index.json in this directory",
            ));
        }
        if !path.exists() {
            return Err(Error::file(path, "no such file"));
        }
        if path.to_string_lossy().ends_with(".json") {
            return Self::open_index(path);
        }
        let mut tf = TensorFiles {
            files: Vec::new(),
            owner: HashMap::new(),
            origin: path.to_path_buf(),
        };
        tf.add_file(path)?;
        Ok(tf)
    }

    fn open_index(index: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(index, format!("invalid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::file(index, "no `weight_map` object"))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        if let Some((name, v)) = map.iter().find(|(_, v)| !v.is_string()) {
            return Err(Error::tensor(
                index,
                name,
                format!("weight_map entry {v} is not a file name"),
            ));
        }
        // Shards sit beside the index: a name with a directory part could lead anywhere
        // (`../../etc/passwd`, an absolute path), so only plain file names are followed.
        if let Some((name, shard)) = map.iter().find_map(|(n, v)| {
            let s = v.as_str().unwrap_or_default();
            let mut c = Path::new(s).components();
            let plain = matches!(
                (c.next(), c.next()),
                (Some(std::path::Component::Normal(_)), None)
            ) && !s.contains(['/', '\\']);
            (!plain).then_some((n, s))
        }) {
            return Err(Error::tensor(
                index,
                name,
                format!(
                    "weight_map names the file `{shard}`, which is not a plain file name beside \
                     the index: refusing a path that leaves the checkpoint directory"
                ),
            ));
        }
        let mut shard_names: Vec<&str> = map.values().filter_map(|s| s.as_str()).collect();
        shard_names.sort();
        shard_names.dedup();
        let mut tf = TensorFiles {
            files: Vec::new(),
            owner: HashMap::new(),
            origin: index.to_path_buf(),
        };
        for s in shard_names {
            tf.add_file(&dir.join(s))?;
        }
        for (name, shard) in map {
            let shard = shard.as_str().unwrap_or_default();
            let fi = tf.files.iter().position(|(p, _)| *p == dir.join(shard));
            if fi.is_none() || tf.owner.get(name) != fi.as_ref() {
                return Err(Error::file(
                    index,
                    format!(
                        "weight_map says `{name}` is in {shard}, but that file does not hold it"
                    ),
                ));
            }
        }
        Ok(tf)
    }

    fn add_file(&mut self, path: &Path) -> Result<()> {
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is opened read-only and the map lives as long as `self`. A file that is
        // truncated underneath us by another process is outside what any mmap reader can defend.
        let mm = unsafe { Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
        let st = SafeTensors::deserialize(&mm).map_err(|e| match truncated_tensor(&mm) {
            Some((name, end, have)) => Error::tensor(
                path,
                &name,
                format!("file is truncated: the tensor's data ends at byte {end} of the data section, but the file holds only {have} bytes of data"),
            ),
            None => Error::file(
                path,
                format!("not a valid safetensors file (truncated or corrupt?): {e}"),
            ),
        })?;
        let idx = self.files.len();
        for name in st.names() {
            if let Some(&prev) = self.owner.get(name) {
                return Err(Error::file(
                    path,
                    format!(
                        "tensor `{name}` also appears in {}",
                        self.files[prev].0.display()
                    ),
                ));
            }
            self.owner.insert(name.to_string(), idx);
        }
        drop(st);
        self.files.push((path.to_path_buf(), mm));
        Ok(())
    }

    /// The `__metadata__` strings of the first file (empty when it has none).
    pub fn metadata(&self) -> Result<HashMap<String, String>> {
        let Some((path, mm)) = self.files.first() else {
            return Ok(HashMap::new());
        };
        let (_, meta) =
            SafeTensors::read_metadata(mm).map_err(|e| Error::file(path, e.to_string()))?;
        Ok(meta.metadata().clone().unwrap_or_default())
    }

    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.owner.keys().map(|s| s.as_str()).collect();
        v.sort();
        v
    }

    pub fn contains(&self, name: &str) -> bool {
        self.owner.contains_key(name)
    }

    /// The file that holds `name` (or the origin if none does).
    pub fn file_of(&self, name: &str) -> &Path {
        self.owner
            .get(name)
            .map(|&i| self.files[i].0.as_path())
            .unwrap_or(&self.origin)
    }

    pub(crate) fn view(&self, name: &str) -> Result<(Dtype, Vec<usize>, &[u8])> {
        let &i = self
            .owner
            .get(name)
            .ok_or_else(|| Error::tensor(&self.origin, name, "missing"))?;
        let (path, mm) = &self.files[i];
        let st = SafeTensors::deserialize(mm).map_err(|e| Error::file(path, e.to_string()))?;
        let t = st
            .tensor(name)
            .map_err(|e| Error::tensor(path, name, e.to_string()))?;
        Ok((t.dtype(), t.shape().to_vec(), t.data()))
    }

    /// A float tensor (f32, bf16 or f16 stored) as f32 with its shape.
    pub fn read_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let (dt, shape, data) = self.view(name)?;
        let v: Vec<f32> = match dt {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(Error::tensor(
                    self.file_of(name),
                    name,
                    format!("dtype {other:?} is not a float type (expected F32, BF16 or F16)"),
                ))
            }
        };
        Ok((shape, v))
    }

    /// An integer tensor (i64 or i32 stored) as i64 with its shape.
    pub fn read_i64(&self, name: &str) -> Result<(Vec<usize>, Vec<i64>)> {
        let (dt, shape, data) = self.view(name)?;
        let v = match dt {
            Dtype::I64 => data
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect(),
            Dtype::I32 => data
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")) as i64)
                .collect(),
            other => {
                return Err(Error::tensor(
                    self.file_of(name),
                    name,
                    format!("dtype {other:?} is not an integer type (expected I64 or I32)"),
                ))
            }
        };
        Ok((shape, v))
    }

    /// A tensor's shape, without reading its data.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        self.view(name).map(|(_, shape, _)| shape)
    }

    /// Elements `[start, end)` of a 1-D f32 tensor, decoding only those bytes (a resharding
    /// rank touches only the pages of the slice it needs).
    pub fn read_f32_range(&self, name: &str, start: usize, end: usize) -> Result<Vec<f32>> {
        let (dt, shape, data) = self.view(name)?;
        let file = self.file_of(name);
        if dt != Dtype::F32 || shape.len() != 1 {
            return Err(Error::tensor(
                file,
                name,
                format!("{dt:?} {shape:?}, expected a 1-D F32 tensor"),
            ));
        }
        if start > end || end > shape[0] {
            return Err(Error::tensor(
                file,
                name,
                format!(
                    "range [{start}, {end}) is outside its {} elements",
                    shape[0]
                ),
            ));
        }
        Ok(data[start * 4..end * 4]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// A float tensor that must have `shape`.
    pub fn read_f32_shaped(&self, name: &str, shape: &[usize], why: &str) -> Result<Vec<f32>> {
        let (s, v) = self.read_f32(name)?;
        if s != shape {
            return Err(Error::tensor(
                self.file_of(name),
                name,
                format!("shape {s:?}, but {why} implies {shape:?}"),
            ));
        }
        Ok(v)
    }
}

/// For a safetensors file whose header is intact but whose data is cut short: the first tensor
/// (by offset) that lost data, where its data ends, and how many data bytes the file holds.
fn truncated_tensor(buf: &[u8]) -> Option<(String, u64, u64)> {
    let n = u64::from_le_bytes(buf.get(..8)?.try_into().ok()?);
    let header = buf.get(8..usize::try_from(n).ok()?.checked_add(8)?)?;
    let v: serde_json::Value = serde_json::from_slice(header).ok()?;
    let have = (buf.len() as u64).checked_sub(8 + n)?;
    v.as_object()?
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .filter_map(|(k, t)| {
            let end = t.get("data_offsets")?.get(1)?.as_u64()?;
            (end > have).then(|| (k.clone(), end))
        })
        .min_by_key(|&(_, end)| end)
        .map(|(k, end)| (k, end, have))
}

/// Reads every parameter of `table` from `files` into a flat host array. Names in `optional`
/// may be missing (left zero and returned), e.g. `score.weight` when a reward model starts from
/// a chat checkpoint. A tensor of a layer the config does not have means the checkpoint is from
/// another config, and is an error.
pub fn read_params(
    table: &ParamTable,
    cfg: &LlamaConfig,
    files: &TensorFiles,
    optional: &[&str],
) -> Result<(Vec<f32>, Vec<String>)> {
    let missing = check_params(table, cfg, files, optional)?;
    let mut host = vec![0f32; table.total];
    for e in &table.entries {
        if missing.contains(&e.name) {
            continue;
        }
        let v = files.read_f32_shaped(&e.name, &e.shape, "config.json")?;
        host[e.span.off..e.span.off + e.span.len].copy_from_slice(&v);
    }
    Ok((host, missing))
}

/// Checks `files` against the layout `table` of `cfg` from the headers alone, before anything
/// is allocated: every tensor present (those in `optional` may be missing and are returned),
/// with the shape and a float dtype the config implies, no layer the config does not have, and
/// no `lm_head.weight` a tied config would silently drop.
pub fn check_params(
    table: &ParamTable,
    cfg: &LlamaConfig,
    files: &TensorFiles,
    optional: &[&str],
) -> Result<Vec<String>> {
    check_layers(cfg, files)?;
    if cfg.tie_word_embeddings && table.lm_head.is_some() && files.contains("lm_head.weight") {
        return Err(Error::tensor(
            files.file_of("lm_head.weight"),
            "lm_head.weight",
            "present, but config.json says tie_word_embeddings = true, which would use the \
             embedding instead and ignore it: set tie_word_embeddings to false",
        ));
    }
    let mut missing = Vec::new();
    for e in &table.entries {
        if !files.contains(&e.name) {
            if optional.contains(&e.name.as_str()) {
                missing.push(e.name.clone());
                continue;
            }
            let hint = match e.name.as_str() {
                "lm_head.weight" if files.contains("score.weight") => {
                    " (this is a reward/value checkpoint with score.weight: load it with a score head)"
                }
                "lm_head.weight" => " (config.json says tie_word_embeddings = false)",
                "score.weight" if files.contains("lm_head.weight") => {
                    " (this is a causal-LM checkpoint: a reward model starts from it with a new score head)"
                }
                _ => "",
            };
            return Err(Error::tensor(
                &files.origin,
                &e.name,
                format!("missing{hint}"),
            ));
        }
        let (dt, shape, _) = files.view(&e.name)?;
        if shape != e.shape {
            return Err(Error::tensor(
                files.file_of(&e.name),
                &e.name,
                format!("shape {shape:?}, but config.json implies {:?}", e.shape),
            ));
        }
        if !matches!(dt, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
            return Err(Error::tensor(
                files.file_of(&e.name),
                &e.name,
                format!("dtype {dt:?} is not a float type (expected F32, BF16 or F16)"),
            ));
        }
    }
    Ok(missing)
}

/// The config's layer count against the layers the weights hold, before a table of that many
/// layers is built: a config.json with 10^12 layers beside a 2-layer checkpoint is an error
/// naming the first missing layer, not a process that grows without end.
fn check_layers(cfg: &LlamaConfig, files: &TensorFiles) -> Result<()> {
    let layer_of = |name: &str| -> Option<usize> {
        name.strip_prefix("model.layers.")?
            .split('.')
            .next()?
            .parse()
            .ok()
    };
    let mut held = 0;
    for name in files.names() {
        if let Some(l) = layer_of(name) {
            if l >= cfg.num_hidden_layers {
                return Err(Error::tensor(
                    files.file_of(name),
                    name,
                    format!(
                        "layer {l} exists in the checkpoint but config.json has num_hidden_layers = {}",
                        cfg.num_hidden_layers
                    ),
                ));
            }
            held = held.max(l + 1);
        }
    }
    if cfg.num_hidden_layers > held {
        return Err(Error::tensor(
            &files.origin,
            &format!("model.layers.{held}.input_layernorm.weight"),
            format!(
                "missing: config.json has num_hidden_layers = {}, the weights hold {held} layer(s)",
                cfg.num_hidden_layers
            ),
        ));
    }
    Ok(())
}

/// A model of `cfg` with `head`, its weights read from `files`: sizes and shapes are checked
/// against the files' headers before the model is allocated (so a config.json of another size
/// beside the weights is an error naming a tensor, not a failed multi-GB allocation). Returns
/// the names in `optional` that were missing (left zero).
pub fn load_weights<B: Backend>(
    be: B,
    cfg: LlamaConfig,
    head: Head,
    files: &TensorFiles,
    optional: &[&str],
) -> Result<(Llama<B>, Vec<String>)> {
    cfg.validate()?;
    check_layers(&cfg, files)?;
    check_params(&ParamTable::llama(&cfg, head), &cfg, files, optional)?;
    let mut model = Llama::new(be, cfg, head)?;
    let (host, missing) = read_params(&model.table, &model.cfg, files, optional)?;
    model.set_params(&host)?;
    Ok((model, missing))
}

/// Loads `config.json` and the weights of a Hugging Face checkpoint directory.
pub fn load_model<B: Backend>(be: B, dir: &Path, head: Head) -> Result<Llama<B>> {
    if !dir.is_dir() {
        return Err(Error::file(dir, "no such checkpoint directory"));
    }
    let cfg = LlamaConfig::from_file(&dir.join("config.json"))?;
    let files = TensorFiles::open(dir)?;
    Ok(load_weights(be, cfg, head, &files, &[])?.0)
}

/// How to store weights on save.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveDtype {
    F32,
    Bf16,
}

#[derive(Clone, Copy, Debug)]
pub struct SaveOptions {
    pub dtype: SaveDtype,
    /// Shard above this many bytes of tensor data (transformers' default is 5 GB).
    pub max_shard_bytes: usize,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            dtype: SaveDtype::F32,
            max_shard_bytes: 5_000_000_000,
        }
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

/// Writes one file atomically: a temporary sibling is written and synced, then renamed over
/// `path`, so readers (another rank polling for it, a resume after a crash) see the old file,
/// no file, or the whole new one.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| Error::file(path, "not a file name"))?
        .to_string_lossy();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if let Err(e) = write_synced(&tmp, bytes) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    sync_dir(parent);
    Ok(())
}

/// Writes f32 tensors (1-D, as named) and string metadata as one safetensors file, atomically.
pub fn write_safetensors_atomic(
    path: &Path,
    tensors: &[(&str, &[f32])],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(name, d)| {
            safetensors::tensor::TensorView::new(Dtype::F32, vec![d.len()], bytemuck::cast_slice(d))
                .map(|v| (name.to_string(), v))
                .map_err(|e| Error::tensor(path, name, e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, Some(metadata))
        .map_err(|e| Error::file(path, e.to_string()))?;
    write_file_atomic(path, &bytes)
}

fn sync_dir(dir: &Path) {
    // Directory fsync makes the renames durable; not every filesystem supports it.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Writes a directory atomically: `fill` writes into a temporary sibling, which is synced and
/// then renamed over `dir`. A previous `dir` is moved aside first and removed after.
pub fn write_dir_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let name = dir
        .file_name()
        .ok_or_else(|| Error::file(dir, "not a directory name"))?
        .to_string_lossy()
        .to_string();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    sync_dir(&tmp);
    let had_old = dir.exists();
    if had_old {
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
    sync_dir(parent);
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(())
}

/// Removes what killed writers left in `dir` (and one level down, in checkpoint directories):
/// the temporaries of [`write_dir_atomic`] and [`write_file_atomic`] (`.NAME.tmp-PID`, or
/// `NAME.tmp-PID`) whose process is gone. A `.NAME.old-PID` (a directory moved aside just
/// before its replacement was renamed in) is moved back when `NAME` is missing, else removed.
/// Only where `/proc` tells live processes apart; returns how many entries it removed.
pub fn remove_stale_temporaries(dir: &Path) -> usize {
    let proc = Path::new("/proc");
    if !proc.is_dir() || !dir.is_dir() {
        return 0;
    }
    let me = std::process::id();
    let dead = |pid: &str| {
        pid.parse::<u32>()
            .is_ok_and(|p| p != me && !proc.join(p.to_string()).exists())
    };
    let mut removed = 0;
    let mut subdirs = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        let rm = |p: &Path| {
            if p.is_dir() {
                std::fs::remove_dir_all(p)
            } else {
                std::fs::remove_file(p)
            }
            .is_ok()
        };
        let stale = |suffix: &str| {
            name.rsplit_once(suffix)
                .filter(|(_, pid)| dead(pid))
                .map(|(base, _)| base.trim_start_matches('.').to_string())
        };
        if stale(".tmp-").is_some() {
            removed += usize::from(rm(&path));
        } else if let Some(base) = stale(".old-") {
            let orig = dir.join(base);
            if orig.exists() {
                removed += usize::from(rm(&path));
            } else {
                let _ = std::fs::rename(&path, &orig);
            }
        } else if path.is_dir() && !name.starts_with('.') {
            subdirs.push(path);
        }
    }
    for d in subdirs {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.rsplit_once(".tmp-").is_some_and(|(_, p)| dead(p)) {
                removed += usize::from(std::fs::remove_file(e.path()).is_ok());
            }
        }
    }
    removed
}

/// Writes named tensors (flat host data) as safetensors files into `dir`, one file or shards
/// with an index, as `save_pretrained` does.
pub fn write_tensors(
    dir: &Path,
    tensors: &[(String, Vec<usize>, &[f32])],
    opts: SaveOptions,
) -> Result<()> {
    let elem = match opts.dtype {
        SaveDtype::F32 => 4,
        SaveDtype::Bf16 => 2,
    };
    let encode = |x: &[f32]| -> Vec<u8> {
        match opts.dtype {
            SaveDtype::F32 => bytemuck::cast_slice(x).to_vec(),
            SaveDtype::Bf16 => x
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
        }
    };
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0usize;
    for (i, (_, _, d)) in tensors.iter().enumerate() {
        let bytes = d.len() * elem;
        if size > 0 && size + bytes > opts.max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().expect("one shard").push(i);
        size += bytes;
    }
    let total: usize = tensors.iter().map(|(_, _, d)| d.len() * elem).sum();
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    for (si, shard) in shards.iter().enumerate() {
        let fname = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", si + 1, n)
        };
        let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = shard
            .iter()
            .map(|&i| {
                (
                    tensors[i].0.clone(),
                    tensors[i].1.clone(),
                    encode(tensors[i].2),
                )
            })
            .collect();
        let dtype = match opts.dtype {
            SaveDtype::F32 => Dtype::F32,
            SaveDtype::Bf16 => Dtype::BF16,
        };
        let views = encoded
            .iter()
            .map(|(name, shape, bytes)| {
                safetensors::tensor::TensorView::new(dtype, shape.clone(), bytes)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| Error::tensor(dir.join(&fname), name, e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = safetensors::serialize(views, Some(meta))
            .map_err(|e| Error::file(dir.join(&fname), e.to_string()))?;
        write_synced(&dir.join(&fname), &bytes)?;
        for &i in shard {
            weight_map.insert(tensors[i].0.clone(), fname.clone());
        }
    }
    if n > 1 {
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let text = serde_json::to_string_pretty(&index).expect("json");
        write_synced(&dir.join("model.safetensors.index.json"), text.as_bytes())?;
    }
    Ok(())
}

/// Saves a model as a Hugging Face checkpoint directory (config.json + weights), atomically.
/// `extra` may add files (a tokenizer, training state) inside the same atomic write.
pub fn save_model<B: Backend>(
    model: &Llama<B>,
    dir: &Path,
    opts: SaveOptions,
    extra: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let host = model.params_to_host()?;
    let tensors: Vec<(String, Vec<usize>, &[f32])> = model
        .table
        .entries
        .iter()
        .map(|e| {
            (
                e.name.clone(),
                e.shape.clone(),
                &host[e.span.off..e.span.off + e.span.len],
            )
        })
        .collect();
    let mut cfg_json = model.cfg.to_hf_json(model.head.architecture());
    if opts.dtype == SaveDtype::Bf16 {
        cfg_json["torch_dtype"] = "bfloat16".into();
    }
    write_dir_atomic(dir, |tmp| {
        let text = serde_json::to_string_pretty(&cfg_json).expect("json");
        write_synced(&tmp.join("config.json"), text.as_bytes())?;
        write_tensors(tmp, &tensors, opts)?;
        extra(tmp)?;
        write_hf_extras(tmp, &model.cfg, model.head)
    })
}

/// What transformers reads beside the weights, so that a checkpoint works there as it is: for a
/// causal LM `generation_config.json`, and wherever `extra` put a `tokenizer.json`,
/// `tokenizer_config.json` (BOS/EOS/UNK/pad and Llama 2's chat template, which renders what
/// [`crate::tokenizer::Tokenizer::chat`] tokenizes) and `special_tokens_map.json`. Pad is the
/// config's `pad_token_id` or 0 (`<unk>`, as Meta's release pads), never EOS: a
/// sequence-classification head reads the last non-pad token, which must be the EOS that closes
/// the scored answer.
pub fn write_hf_extras(dir: &Path, cfg: &LlamaConfig, head: Head) -> Result<()> {
    let pad = cfg.pad_token_id.unwrap_or(0);
    if head == Head::Lm {
        let mut g = serde_json::json!({"pad_token_id": pad});
        if let Some(b) = cfg.bos_token_id {
            g["bos_token_id"] = b.into();
        }
        if let Some(e) = cfg.eos_token_id {
            g["eos_token_id"] = e.into();
        }
        let text = serde_json::to_string_pretty(&g).expect("json");
        write_synced(&dir.join("generation_config.json"), text.as_bytes())?;
    }
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.is_file() {
        return Ok(());
    }
    let tok = crate::tokenizer::Tokenizer::from_file(&tok_path)?;
    let name = |id: u32| {
        tok.id_to_token(id).ok_or_else(|| {
            Error::file(
                &tok_path,
                format!("no token with id {id} (needed as a special token)"),
            )
        })
    };
    let (bos, eos, pad_tok) = (name(tok.bos)?, name(tok.eos)?, name(pad)?);
    let unk = tok.token_id("<unk>").map(|_| "<unk>".to_string());
    let mut specials =
        serde_json::json!({"bos_token": bos, "eos_token": eos, "pad_token": pad_tok});
    if let Some(u) = &unk {
        specials["unk_token"] = u.as_str().into();
    }
    // Declared as special tokens here too, so transformers splits `<s>`/`</s>` out of the
    // rendered chat text even for a tokenizer.json that does not list them as added tokens.
    let mut decoder = serde_json::Map::new();
    let mut ids: Vec<u32> = vec![tok.bos, tok.eos, pad];
    ids.extend(unk.as_deref().and_then(|u| tok.token_id(u)));
    ids.sort_unstable();
    ids.dedup();
    for id in ids {
        decoder.insert(
            id.to_string(),
            serde_json::json!({"content": name(id)?, "lstrip": false, "normalized": false,
                "rstrip": false, "single_word": false, "special": true}),
        );
    }
    let mut tc = specials.clone();
    let o = tc.as_object_mut().expect("object");
    o.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
    o.insert(
        "model_max_length".into(),
        cfg.max_position_embeddings.into(),
    );
    o.insert("clean_up_tokenization_spaces".into(), false.into());
    o.insert("add_bos_token".into(), true.into());
    o.insert("add_eos_token".into(), false.into());
    o.insert("added_tokens_decoder".into(), decoder.into());
    o.insert(
        "chat_template".into(),
        crate::tokenizer::chat_template().into(),
    );
    for (file, v) in [
        ("tokenizer_config.json", &tc),
        ("special_tokens_map.json", &specials),
    ] {
        let text = serde_json::to_string_pretty(v).expect("json");
        write_synced(&dir.join(file), text.as_bytes())?;
    }
    Ok(())
}
