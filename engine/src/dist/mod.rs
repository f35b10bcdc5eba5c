//! Data parallelism with ZeRO-1: the collectives as a trait, a CPU stand-in built on threads,
//! and an AdamW whose fp32 master weights and moments are sharded across ranks.
//!
//! Every rank holds a full model replica (compute weights and gradients) but only its shard of
//! the optimizer state: 3 × ceil(n/N) floats instead of 3 × n. A step is reduce-scatter of the
//! gradients, AdamW on the owned shard, all-gather of the updated shards, all on backend
//! buffers: nothing parameter-sized crosses between host and device.
//!
//! Around it: [`env`] reads the launch environment (torchrun, mpirun), [`rendezvous`] hands
//! rank 0's NCCL id to the others (TCP or a shared file), [`nccl`] implements the collectives
//! over NCCL, and the ZeRO-1 checkpoints ([`save_zero1`], [`ShardedAdamW::load`]) write one
//! optimizer shard per rank and re-shard on a resume with another world size.

mod ckpt;
pub mod env;
pub mod nccl;
pub mod rendezvous;
mod thread;
mod zero1;

pub use ckpt::{
    read_shard_state, save_zero1, shard_file_name, ShardEntry, Zero1Manifest, MANIFEST,
};
pub use env::{DistEnv, Launcher};
pub use nccl::NcclComm;
pub use rendezvous::Rendezvous;
pub use thread::{ThreadComm, ThreadGroup};
pub use zero1::{Overlap, Shard, ShardedAdamW};

use crate::backend::Backend;
use crate::error::{Error, Result};

/// The collectives ZeRO-1 needs, with NCCL's semantics: every rank calls the same operation in
/// the same order with the same lengths, and the call returns once this rank's output is ready.
/// These work on host f32 slices (checkpoint agreement, logged scalars); [`DeviceCollective`]
/// has the same operations on a backend's buffers for the per-step path.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// `buf` ← Σ over ranks of `buf` (ncclAllReduce, ncclSum), identical on every rank.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()>;
    /// `out_shard` ← Σ over ranks of `input[rank·s .. (rank+1)·s]`, with `input.len() == world·s`
    /// (ncclReduceScatter, ncclSum).
    fn reduce_scatter_sum(&mut self, input: &[f32], out_shard: &mut [f32]) -> Result<()>;
    /// `out[r·s .. (r+1)·s]` ← rank r's `shard`, with `out.len() == world·s` (ncclAllGather).
    fn all_gather(&mut self, shard: &[f32], out: &mut [f32]) -> Result<()>;
    fn barrier(&mut self) -> Result<()>;
}

/// The per-step collectives on backend `B`'s buffers, so the ZeRO-1 step never moves its
/// buffers through the host: NCCL on CUDA buffers ([`NcclComm`]), the thread stand-in on the
/// CPU backend's (host) buffers ([`ThreadComm`]). Ordered after earlier work on `B`'s stream.
///
/// The sharded ones cut a vector of `n` elements into pieces of `piece` elements, rank r
/// owning `[r·piece, min(n, (r+1)·piece))` ([`Shard`]'s split; the last pieces may be short or
/// empty), and work in place on the unpadded vector: no padded scratch copy when `n` does not
/// split evenly.
pub trait DeviceCollective<B: Backend>: Collective {
    /// `buf` ← Σ over ranks of `buf`, in place.
    fn all_reduce_sum_buf(&mut self, buf: B::Mut<'_, f32>) -> Result<()>;
    /// `out` ← Σ over ranks of this rank's piece of `input` (`out.len()` = the piece's length).
    fn reduce_scatter_v(
        &mut self,
        input: B::Ref<'_, f32>,
        out: B::Mut<'_, f32>,
        piece: usize,
    ) -> Result<()>;
    /// In place: every rank's piece of `buf`, in the compute dtype (bf16 on CUDA), is copied
    /// into the others' `buf`.
    fn all_gather_v(&mut self, buf: B::Mut<'_, B::Act>, piece: usize) -> Result<()>;
    /// One bucket of a reduce-scatter issued over several calls: `part` is elements
    /// `[lo, lo + part.len())` of an `n`-element vector cut into pieces of `piece`, and the
    /// elements of this rank's piece `out` that fall in the bucket ← Σ over ranks (the others
    /// are left alone). The same sums as [`DeviceCollective::reduce_scatter_v`], bucket by
    /// bucket. It may run behind later work on B's stream (NCCL: on its own stream, so it
    /// overlaps the rest of the backward): read `out` only after
    /// [`DeviceCollective::wait_reduced`].
    fn reduce_scatter_part(
        &mut self,
        part: B::Ref<'_, f32>,
        lo: usize,
        n: usize,
        out: B::Mut<'_, f32>,
        piece: usize,
    ) -> Result<()>;
    /// Orders later work on B's stream after every `reduce_scatter_part` issued so far.
    fn wait_reduced(&mut self) -> Result<()>;
}

/// The part of rank `rank`'s piece that bucket `[lo, hi)` covers: `(start, end)` as global
/// indices, empty when `start == end`.
pub(crate) fn bucket_in_piece(
    lo: usize,
    hi: usize,
    n: usize,
    piece: usize,
    rank: usize,
) -> (usize, usize) {
    let (off, len) = piece_of(n, piece, rank);
    let (a, b) = (lo.max(off), hi.min(off + len));
    (a, b.max(a))
}

/// Checks a bucket `[lo, lo + len)` of an `n`-element vector and the output piece's length.
pub(crate) fn check_part(
    lo: usize,
    len: usize,
    n: usize,
    piece: usize,
    world: usize,
    rank: usize,
    out: usize,
) -> Result<()> {
    check_cover("reduce_scatter_part", n, piece, world)?;
    if lo + len > n {
        return Err(Error::Shape(format!(
            "reduce_scatter_part: bucket [{lo}, {}) outside {n} elements",
            lo + len
        )));
    }
    check_len(
        "reduce_scatter_part output",
        out,
        piece_of(n, piece, rank).1,
    )
}

/// Rank `rank`'s piece `[off, off + len)` of `n` elements cut into pieces of `piece`.
pub(crate) fn piece_of(n: usize, piece: usize, rank: usize) -> (usize, usize) {
    let off = (rank * piece).min(n);
    (off, (n - off).min(piece))
}

/// Checks that pieces of `piece` elements over `world` ranks cover all `n` (the last ones may
/// be short or empty).
pub(crate) fn check_cover(what: &str, n: usize, piece: usize, world: usize) -> Result<()> {
    if piece * world < n {
        return Err(Error::Shape(format!(
            "{what}: pieces of {piece} over {world} ranks do not cover {n} elements"
        )));
    }
    Ok(())
}

/// A length that must match: the error names what and both counts.
pub(crate) fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::Shape(format!(
            "{what}: {got} values, expected {want}"
        )));
    }
    Ok(())
}
