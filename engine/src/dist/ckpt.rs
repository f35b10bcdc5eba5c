//! ZeRO-1 checkpoints: the model once, in Hugging Face layout, by rank 0, and each rank's
//! optimizer shard (fp32 master slice, m, v, step) in a file of its own, so no rank ever holds
//! the whole optimizer state. A manifest written with the model records the world size and every
//! shard's `[start, end)` of the flat parameter vector; on a resume with another world size each
//! new rank reads only the slices of the old shard files that overlap its new shard.
//!
//! Layout of a checkpoint directory:
//! `config.json`, `model.safetensors` (rank 0, the existing [`save_model`]; bf16 where the
//! model's master was released to the optimizer, as on CUDA), `zero1.json` (the
//! manifest), `optimizer-zero1-RRRRR-of-WWWWW.safetensors` (one per rank: tensors `master`, `m`,
//! `v` of the shard's real elements; metadata `rank`, `world`, `start`, `end`, `n`, `step`).

use super::{Collective, Shard, ShardedAdamW};
use crate::backend::Backend;
use crate::checkpoint::TensorFiles;
use crate::checkpoint::{
    save_model, write_file_atomic, write_safetensors_atomic, SaveDtype, SaveOptions,
};
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::optim::AdamWConfig;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The manifest's file name inside a checkpoint directory.
pub const MANIFEST: &str = "zero1.json";
const FORMAT: &str = "llama2-zero1/1";

/// The file name of rank `rank`'s optimizer shard in a `world`-rank checkpoint.
pub fn shard_file_name(rank: usize, world: usize) -> String {
    format!("optimizer-zero1-{rank:05}-of-{world:05}.safetensors")
}

/// What a ZeRO-1 checkpoint holds: the world size it was written with and where each shard is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Zero1Manifest {
    pub format: String,
    pub world: usize,
    /// Parameters in the flat vector.
    pub n: usize,
    /// AdamW steps taken (the bias correction's t).
    pub step: u64,
    pub shards: Vec<ShardEntry>,
}

/// One rank's shard: elements `[start, end)` of the flat parameters, stored in `file`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub rank: usize,
    pub file: String,
    pub start: usize,
    pub end: usize,
}

impl Zero1Manifest {
    pub fn new(n: usize, world: usize, step: u64) -> Self {
        let shards = (0..world)
            .map(|r| {
                let s = Shard::new(n, r, world);
                let start = s.off.min(n);
                ShardEntry {
                    rank: r,
                    file: shard_file_name(r, world),
                    start,
                    end: start + s.valid(),
                }
            })
            .collect();
        Zero1Manifest {
            format: FORMAT.into(),
            world,
            n,
            step,
            shards,
        }
    }

    /// Reads and checks `dir/zero1.json`: the shards must tile `[0, n)` in rank order under
    /// their canonical names (which also keeps a hand-edited manifest inside `dir`).
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::file(
                    &path,
                    "missing: not a ZeRO-1 checkpoint (a single-process checkpoint keeps its \
                     optimizer in optimizer.safetensors)",
                ))
            }
            Err(e) => return Err(Error::io(&path, e)),
        };
        let m: Zero1Manifest = serde_json::from_str(&text)
            .map_err(|e| Error::file(&path, format!("invalid manifest: {e}")))?;
        if m.format != FORMAT {
            return Err(Error::file(
                &path,
                format!("format {:?}, expected {FORMAT:?}", m.format),
            ));
        }
        if m.world == 0 || m.shards.len() != m.world {
            return Err(Error::file(
                &path,
                format!("world {} but {} shards listed", m.world, m.shards.len()),
            ));
        }
        if m != Zero1Manifest::new(m.n, m.world, m.step) {
            return Err(Error::file(
                &path,
                format!(
                    "the shards are not the even split of {} parameters over {} ranks that \
                     save_zero1 writes",
                    m.n, m.world
                ),
            ));
        }
        Ok(m)
    }
}

/// Checks a shard file's metadata against its manifest entry; a mismatch names the file.
fn check_metadata(
    path: &Path,
    meta: &HashMap<String, String>,
    m: &Zero1Manifest,
    e: &ShardEntry,
) -> Result<()> {
    let want = [
        ("format", FORMAT.to_string()),
        ("rank", e.rank.to_string()),
        ("world", m.world.to_string()),
        ("start", e.start.to_string()),
        ("end", e.end.to_string()),
        ("n", m.n.to_string()),
        ("step", m.step.to_string()),
    ];
    for (k, v) in want {
        match meta.get(k) {
            None => {
                return Err(Error::file(
                    path,
                    format!("no `{k}` in the metadata: not a ZeRO-1 optimizer shard"),
                ))
            }
            Some(got) if *got != v => {
                return Err(Error::file(
                    path,
                    format!(
                        "metadata {k} = {got}, but {MANIFEST} expects {v}: a shard from another \
                         checkpoint or world size?"
                    ),
                ))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Every rank learns whether every rank succeeded, so a failure on one becomes an error on all
/// and none is left waiting in a later collective.
fn agree<C: Collective + ?Sized>(comm: &mut C, mine: Result<()>, what: &str) -> Result<()> {
    let mut flags = vec![0f32; comm.world()];
    flags[comm.rank()] = if mine.is_err() { 1.0 } else { 0.0 };
    comm.all_reduce_sum(&mut flags)?;
    mine?;
    let failed: Vec<usize> = (0..flags.len()).filter(|&r| flags[r] > 0.0).collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Error::Dist(format!(
            "{what}: rank(s) {failed:?} failed (their own errors say why)"
        )))
    }
}

impl<B: Backend> ShardedAdamW<B> {
    /// Writes this rank's shard (only its real elements) as `dir/shard_file_name(..)`,
    /// atomically, and returns the path. Copies the shard to the host (not a per-step path).
    pub fn save_shard(&self, dir: &Path) -> Result<PathBuf> {
        let e =
            &Zero1Manifest::new(self.shard.n, self.shard.world, self.step).shards[self.shard.rank];
        let [master, m, v] = self.state_to_host()?;
        debug_assert_eq!(master.len(), e.end - e.start);
        let path = dir.join(&e.file);
        let meta = HashMap::from(
            [
                ("format", FORMAT.to_string()),
                ("rank", e.rank.to_string()),
                ("world", self.shard.world.to_string()),
                ("start", e.start.to_string()),
                ("end", e.end.to_string()),
                ("n", self.shard.n.to_string()),
                ("step", self.step.to_string()),
            ]
            .map(|(k, v)| (k.to_string(), v)),
        );
        write_safetensors_atomic(
            &path,
            &[("master", &master[..]), ("m", &m[..]), ("v", &v[..])],
            meta,
        )?;
        Ok(path)
    }

    /// This rank's optimizer from a ZeRO-1 checkpoint written with any world size: the slices
    /// of the old shards that overlap the new shard `rank` of `world` ([`read_shard_state`]),
    /// uploaded once. The model's weights are not set (see [`ShardedAdamW::gather_params`]); its
    /// full master is released as by [`ShardedAdamW::new`].
    pub fn load(
        model: &mut Llama<B>,
        cfg: AdamWConfig,
        rank: usize,
        world: usize,
        dir: &Path,
    ) -> Result<Self> {
        let (step, [master, m, v]) = read_shard_state(dir, model.num_params(), rank, world)?;
        let mut opt = Self::new(model, cfg, rank, world)?;
        model
            .be
            .from_host(B::slice_mut(&mut opt.master, 0, master.len()), &master)?;
        opt.set_moments(&m, &v)?;
        opt.step = step;
        Ok(opt)
    }
}

/// The AdamW step count and the real elements of (master, m, v) of shard `rank` of `world`
/// over `n` parameters, from a ZeRO-1 checkpoint written with any world size: only the old
/// shard files that overlap it are read. Host memory only (a single process resuming takes the
/// whole state this way, without a second device copy).
pub fn read_shard_state(
    dir: &Path,
    n: usize,
    rank: usize,
    world: usize,
) -> Result<(u64, [Vec<f32>; 3])> {
    let man = Zero1Manifest::read(dir)?;
    if man.n != n {
        return Err(Error::file(
            dir.join(MANIFEST),
            format!("{} parameters, but the model has {n}", man.n),
        ));
    }
    let shard = Shard::new(n, rank, world);
    let lo = shard.off.min(n);
    let hi = lo + shard.valid();
    let mut state = [
        vec![0f32; hi - lo],
        vec![0f32; hi - lo],
        vec![0f32; hi - lo],
    ];
    let mut covered = 0;
    for e in &man.shards {
        let (a, b) = (e.start.max(lo), e.end.min(hi));
        if a >= b {
            continue;
        }
        let path = dir.join(&e.file);
        let f = TensorFiles::open(&path)?;
        check_metadata(&path, &f.metadata()?, &man, e)?;
        check_lengths(&f, &path, e)?;
        for (name, dst) in ["master", "m", "v"].into_iter().zip(state.iter_mut()) {
            let src = f.read_f32_range(name, a - e.start, b - e.start)?;
            dst[a - lo..b - lo].copy_from_slice(&src);
        }
        covered += b - a;
    }
    debug_assert_eq!(covered, hi - lo, "the manifest tiles [0, n)");
    Ok((man.step, state))
}

/// Every tensor of a shard file holds exactly `end - start` elements.
fn check_lengths(f: &TensorFiles, path: &Path, e: &ShardEntry) -> Result<()> {
    for name in ["master", "m", "v"] {
        let shape = f.shape(name)?;
        if shape != [e.end - e.start] {
            return Err(Error::tensor(
                path,
                name,
                format!(
                    "shape {shape:?}, but the shard [{}, {}) has {} elements",
                    e.start,
                    e.end,
                    e.end - e.start
                ),
            ));
        }
    }
    Ok(())
}

/// Writes a ZeRO-1 checkpoint; every rank calls it. Rank 0 writes the model (Hugging Face
/// layout), the manifest, its own shard and whatever `extra` adds, in one atomic directory
/// write; then the other ranks add their shard files. Returns once every shard is durable, or
/// an error on every rank if any rank failed. `extra` runs on rank 0 only.
pub fn save_zero1<B: Backend, C: Collective + ?Sized>(
    dir: &Path,
    model: &Llama<B>,
    opt: &ShardedAdamW<B>,
    comm: &mut C,
    opts: SaveOptions,
    extra: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    if comm.world() != opt.shard.world || comm.rank() != opt.shard.rank {
        return Err(Error::Dist(format!(
            "save_zero1: the optimizer is shard {} of {}, the communicator rank {} of {}",
            opt.shard.rank,
            opt.shard.world,
            comm.rank(),
            comm.world()
        )));
    }
    // Where the optimizer holds the only fp32 master (CUDA), the model file is the bf16
    // compute weights, stored as what they are; the shards keep the masters a resume uses.
    let opts = if model.master_released() {
        SaveOptions {
            dtype: SaveDtype::Bf16,
            ..opts
        }
    } else {
        opts
    };
    let first = if comm.rank() == 0 {
        let man = Zero1Manifest::new(opt.shard.n, opt.shard.world, opt.step);
        // The directory write replaces an older one wholesale, so the other ranks write only
        // after it (below), never into a directory that is about to be swapped out.
        save_model(model, dir, opts, |tmp| {
            let text = serde_json::to_string_pretty(&man).expect("json");
            write_file_atomic(&tmp.join(MANIFEST), text.as_bytes())?;
            opt.save_shard(tmp)?;
            extra(tmp)
        })
    } else {
        Ok(())
    };
    let what = format!("writing checkpoint {}", dir.display());
    agree(comm, first, &what)?;
    let rest = if comm.rank() != 0 {
        opt.save_shard(dir).map(drop)
    } else {
        Ok(())
    };
    agree(comm, rest, &what)
}
