//! The collectives over NCCL (cudarc's `nccl` module, libnccl loaded at run time): one process
//! per GPU, one communicator per job. Every operation runs on the communicator's own stream,
//! ordered after the kernels that wrote its input (and, except bucket reductions, before the
//! kernels that read its output) by events, without a host synchronisation.
//!
//! NOT RUN YET: this was written and compiled on machines with neither a GPU nor libnccl (CI
//! has neither). The sharding logic it serves is checked on the CPU with the thread stand-in
//! ([`super::ThreadComm`], same trait); the test `nccl_world_of_one_runs_the_real_path` runs
//! this file's code on a machine that has both, and skips (with a message) elsewhere.
//!
//! Two ways in: the [`DeviceCollective`] trait on the CUDA backend's views (what
//! [`super::ShardedAdamW`] steps with: NCCL reads and writes the model's and the optimizer's
//! device buffers directly, no staging), and the host-slice [`Collective`] trait (staged
//! through a device buffer; for checkpoint agreement and logged scalars only).

use super::{
    bucket_in_piece, check_cover, check_len, check_part, piece_of, Collective, DeviceCollective,
    DistEnv, Rendezvous,
};
use crate::backend::cuda::{probe_driver, Cuda, DBuf, DMut, DRef};
use crate::backend::Backend;
use crate::elem::Elem;
use crate::error::{Error, Result};
use cudarc::driver::{CudaEvent, CudaStream};
use cudarc::nccl::{result, sys};
use std::ffi::{c_char, c_int, CStr};
use std::sync::Arc;
use std::time::Duration;

/// Bytes in an NCCL unique id (what the rendezvous carries).
pub const ID_BYTES: usize = 128;

/// Element types the collectives move: f32 gradients and master weights, bf16 compute weights.
pub trait NcclElem: Elem {
    const DTYPE: sys::ncclDataType_t;
}
impl NcclElem for f32 {
    const DTYPE: sys::ncclDataType_t = sys::ncclDataType_t::ncclFloat32;
}
impl NcclElem for half::bf16 {
    const DTYPE: sys::ncclDataType_t = sys::ncclDataType_t::ncclBfloat16;
}

/// Whether NCCL can be used here: libnccl loads and a CUDA driver with a GPU is present. Must
/// pass before any other call into cudarc's nccl module, which panics on a missing library.
pub fn probe() -> Result<()> {
    // SAFETY: only tries to dlopen libnccl under cudarc's candidate names; resolves no symbol.
    if !unsafe { sys::is_culib_present() } {
        // cudarc looks for unversioned names (libnccl.so); NCCL's runtime package and its pip
        // wheel ship only the soname, libnccl.so.2. Say so when that is the case.
        // SAFETY: dlopen of NCCL's soname to name the fix; unloaded on drop, no symbol is used.
        let soname_only = unsafe { libloading::Library::new("libnccl.so.2") }.is_ok();
        let msg = if soname_only {
            "NCCL not found: libnccl.so.2 is installed but cudarc loads only the unversioned \
             libnccl.so; add a symlink `libnccl.so -> libnccl.so.2` in a directory on \
             LD_LIBRARY_PATH (the libnccl-dev package has it)"
        } else {
            "NCCL not found: libnccl could not be loaded; install NCCL (the distribution's \
             libnccl2 + libnccl-dev, or `pip install nvidia-nccl-cu13` plus a libnccl.so symlink) \
             and put its lib directory on LD_LIBRARY_PATH"
        };
        return Err(Error::Dist(msg.into()));
    }
    probe_driver()
        .map(|_| ())
        .map_err(|e| Error::Dist(format!("NCCL needs a CUDA GPU: {e}")))
}

/// The NCCL version as an integer (e.g. 22703 for 2.27.3).
pub fn version() -> Result<i32> {
    probe()?;
    result::get_nccl_version().map_err(|e| nccl_error("ncclGetVersion", e, std::ptr::null_mut()))
}

fn nccl_error(what: &str, e: result::NcclError, comm: sys::ncclComm_t) -> Error {
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string for every code.
    let s = unsafe { CStr::from_ptr(sys::ncclGetErrorString(e.0)) }.to_string_lossy();
    // SAFETY: ncclGetLastError takes a live communicator or NULL and returns a NUL-terminated
    // string owned by NCCL (copied out at once) or NULL.
    let last = unsafe {
        let p = sys::ncclGetLastError(comm);
        if p.is_null() {
            String::new()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    let last = if last.is_empty() {
        String::new()
    } else {
        format!(": {last}")
    };
    Error::Dist(format!("NCCL {what}: {:?} ({s}){last}", e.0))
}

/// One rank's NCCL communicator, bound to one GPU's [`Cuda`] backend. Its calls run on a
/// stream of their own, ordered against the backend's with two events: as if on the backend's
/// stream, except bucket reductions, which the backend's stream waits for only at
/// [`DeviceCollective::wait_reduced`], so they overlap the backward.
pub struct NcclComm {
    cuda: Cuda,
    comm: sys::ncclComm_t,
    /// Every NCCL call of this communicator, in issue order (one stream, so calls never race
    /// each other across streams).
    side: Arc<CudaStream>,
    /// Recorded on the backend's stream before a call; the side stream waits on it.
    inputs_ready: CudaEvent,
    /// Recorded on the side stream after calls; the backend's stream waits on it.
    outputs_ready: CudaEvent,
    rank: usize,
    world: usize,
    /// Device staging (send, receive) for the host-slice [`Collective`] methods; each grows to
    /// the largest call.
    stage: [Option<DBuf<f32>>; 2],
}

// SAFETY: an NCCL communicator may be used from any thread as long as one thread at a time
// does; every method takes `&mut self`, and the raw pointer is never shared.
unsafe impl Send for NcclComm {}

impl NcclComm {
    /// A fresh unique id: rank 0 makes it, the rendezvous hands it to the others.
    pub fn unique_id() -> Result<[u8; ID_BYTES]> {
        probe()?;
        let id = result::get_uniqueid()
            .map_err(|e| nccl_error("ncclGetUniqueId", e, std::ptr::null_mut()))?;
        Ok(id.internal.map(|c| c as u8))
    }

    /// Joins the job as `rank` of `world` on `cuda`'s GPU. Blocks until every rank has called
    /// it with the same `id`.
    pub fn new(cuda: &Cuda, rank: usize, world: usize, id: &[u8]) -> Result<Self> {
        probe()?;
        if id.len() != ID_BYTES {
            return Err(Error::Dist(format!(
                "NCCL unique id: {} bytes, expected {ID_BYTES}",
                id.len()
            )));
        }
        if rank >= world {
            return Err(Error::Dist(format!(
                "rank {rank} is not below world {world}"
            )));
        }
        let mut internal = [0 as c_char; ID_BYTES];
        internal
            .iter_mut()
            .zip(id)
            .for_each(|(d, &s)| *d = s as c_char);
        // NCCL picks the GPU from the current CUDA context.
        cuda.bind()?;
        let dev = |e: cudarc::driver::DriverError| {
            Error::Dist(format!("NCCL's stream on cuda:{}: {e}", cuda.ordinal()))
        };
        let side = cuda.stream().fork().map_err(dev)?;
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DISABLE_TIMING);
        let inputs_ready = cuda.context().new_event(flags).map_err(dev)?;
        let outputs_ready = cuda.context().new_event(flags).map_err(dev)?;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; the id is rank 0's 128 bytes; rank < world
        // (checked) and both fit in c_int for any real job.
        unsafe {
            result::comm_init_rank(
                &mut comm,
                world as c_int,
                sys::ncclUniqueId { internal },
                rank as c_int,
            )
        }
        .map_err(|e| {
            nccl_error(
                &format!(
                    "ncclCommInitRank (rank {rank} of {world}, cuda:{})",
                    cuda.ordinal()
                ),
                e,
                std::ptr::null_mut(),
            )
        })?;
        Ok(NcclComm {
            cuda: cuda.clone(),
            comm,
            side,
            inputs_ready,
            outputs_ready,
            rank,
            world,
            stage: [None, None],
        })
    }

    /// The whole start-up from the launch environment: probe, rank 0 makes the id, the
    /// rendezvous hands it out, every rank joins. `cuda` is this rank's GPU (normally
    /// `Cuda::new(env.local_rank)`).
    pub fn init(cuda: &Cuda, env: &DistEnv, rdv: &Rendezvous, timeout: Duration) -> Result<Self> {
        // Before the rendezvous, so a rank without NCCL fails at once, not after the others wait.
        probe()?;
        let id = if env.rank == 0 {
            Some(Self::unique_id()?)
        } else {
            None
        };
        let blob = rdv.share(env.rank, env.world, id.as_ref().map(|i| &i[..]), timeout)?;
        Self::new(cuda, env.rank, env.world, &blob)
    }

    /// The stream every NCCL call is enqueued on: this communicator's own.
    fn stream(&self) -> sys::cudaStream_t {
        self.side.cu_stream() as sys::cudaStream_t
    }

    /// Makes the side stream wait for the backend's work so far (the kernels that wrote the
    /// next call's input).
    fn enter(&self) -> Result<()> {
        self.cuda.bind()?;
        self.inputs_ready
            .record(self.cuda.stream())
            .and_then(|()| self.side.wait(&self.inputs_ready))
            .map_err(|e| Error::Dist(format!("ordering NCCL after the backend's stream: {e}")))
    }

    /// Makes the backend's later work wait for the side stream's so far (the calls that wrote
    /// outputs it will read).
    fn leave(&self) -> Result<()> {
        self.outputs_ready
            .record(&self.side)
            .and_then(|()| self.cuda.stream().wait(&self.outputs_ready))
            .map_err(|e| Error::Dist(format!("ordering the backend's stream after NCCL: {e}")))
    }

    /// Runs `f`'s NCCL calls on the side stream, between the backend's work before and after:
    /// to the backend's stream it is as if they ran on it.
    fn ordered(&mut self, f: impl FnOnce(&mut Self) -> Result<()>) -> Result<()> {
        self.enter()?;
        let r = f(self);
        self.leave().and(r)
    }

    /// `buf` ← Σ over ranks of `buf`, in place, ordered on the backend's stream.
    pub fn all_reduce_sum_device<T: NcclElem>(&mut self, buf: DMut<'_, T>) -> Result<()> {
        self.ordered(|me| me.all_reduce_raw(buf))
    }

    /// `out` ← Σ over ranks of `input[rank·s .. (rank+1)·s]` with `s = out.len()`.
    pub fn reduce_scatter_sum_device<T: NcclElem>(
        &mut self,
        input: DRef<'_, T>,
        out: DMut<'_, T>,
    ) -> Result<()> {
        self.ordered(|me| me.reduce_scatter_raw(input, out))
    }

    /// `out[r·s .. (r+1)·s]` ← rank r's `shard`, with `s = shard.len()`.
    pub fn all_gather_device<T: NcclElem>(
        &mut self,
        shard: DRef<'_, T>,
        out: DMut<'_, T>,
    ) -> Result<()> {
        self.ordered(|me| me.all_gather_raw(shard, out))
    }

    /// `out` ← Σ over ranks of this rank's piece of `input`: see [`Self::reduce_scatter_v_raw`].
    pub fn reduce_scatter_v_device<T: NcclElem>(
        &mut self,
        input: DRef<'_, T>,
        out: DMut<'_, T>,
        piece: usize,
    ) -> Result<()> {
        self.ordered(|me| me.reduce_scatter_v_raw(input, out, piece))
    }

    /// In place over `buf`: see [`Self::all_gather_v_raw`].
    pub fn all_gather_v_device<T: NcclElem>(
        &mut self,
        buf: DMut<'_, T>,
        piece: usize,
    ) -> Result<()> {
        self.ordered(|me| me.all_gather_v_raw(buf, piece))
    }

    /// One bucket of a reduce-scatter (see [`DeviceCollective::reduce_scatter_part`]): one
    /// ncclReduce onto each rank whose piece the bucket touches, grouped, on the side stream
    /// after the backend's work so far. The backend's stream does not wait for it:
    /// [`Self::wait_reduced_device`] orders it.
    pub fn reduce_scatter_part_device<T: NcclElem>(
        &mut self,
        part: DRef<'_, T>,
        lo: usize,
        n: usize,
        out: DMut<'_, T>,
        piece: usize,
    ) -> Result<()> {
        let (world, rank) = (self.world, self.rank);
        check_part(lo, part.len(), n, piece, world, rank, out.len())?;
        if part.is_empty() {
            return Ok(());
        }
        self.enter()?;
        let size = std::mem::size_of::<T>() as u64;
        self.grouped(|me| {
            for r in 0..world {
                let (a, b) = bucket_in_piece(lo, lo + part.len(), n, piece, r);
                if a == b {
                    continue;
                }
                let send = part.ptr() + (a - lo) as u64 * size;
                let own = piece_of(n, piece, r).0;
                let recv = if r == rank {
                    out.ptr() + (a - own) as u64 * size
                } else {
                    send
                };
                // SAFETY: [a, b) lies inside the bucket, so the send range is inside the live
                // buffer `part` borrows; on the root it also lies in its piece, so the receive
                // range is inside `out` (its length checked against the piece); r < world
                // fits in c_int.
                unsafe {
                    result::reduce(
                        send as *const _,
                        recv as *mut _,
                        b - a,
                        T::DTYPE,
                        sys::ncclRedOp_t::ncclSum,
                        r as c_int,
                        me.comm,
                        me.stream(),
                    )
                }
                .map_err(|e| me.err("ncclReduce (bucket)", e))?;
            }
            Ok(())
        })
    }

    /// Orders the backend's later work after every bucket reduced so far.
    pub fn wait_reduced_device(&mut self) -> Result<()> {
        self.cuda.bind()?;
        self.leave()
    }

    fn err(&self, what: &str, e: result::NcclError) -> Error {
        nccl_error(
            &format!("{what} (rank {} of {})", self.rank, self.world),
            e,
            self.comm,
        )
    }

    fn all_reduce_raw<T: NcclElem>(&mut self, buf: DMut<'_, T>) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        // SAFETY: `buf` borrows a live device buffer of `buf.len()` elements of T (the view
        // keeps it alive past this call; the op is ordered before any later free on the same
        // stream); in-place all-reduce is allowed.
        unsafe {
            result::all_reduce(
                buf.ptr() as *const _,
                buf.ptr() as *mut _,
                buf.len(),
                T::DTYPE,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                self.stream(),
            )
        }
        .map(drop)
        .map_err(|e| self.err("ncclAllReduce", e))
    }

    fn reduce_scatter_raw<T: NcclElem>(
        &mut self,
        input: DRef<'_, T>,
        out: DMut<'_, T>,
    ) -> Result<()> {
        check_len("reduce_scatter input", input.len(), self.world * out.len())?;
        if out.is_empty() {
            return Ok(());
        }
        // SAFETY: both views borrow live device buffers; input holds world·s elements and out
        // s (checked); they are distinct borrows, so they do not overlap.
        unsafe {
            result::reduce_scatter(
                input.ptr() as *const _,
                out.ptr() as *mut _,
                out.len(),
                T::DTYPE,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                self.stream(),
            )
        }
        .map(drop)
        .map_err(|e| self.err("ncclReduceScatter", e))
    }

    fn all_gather_raw<T: NcclElem>(&mut self, shard: DRef<'_, T>, out: DMut<'_, T>) -> Result<()> {
        check_len("all_gather output", out.len(), self.world * shard.len())?;
        if shard.is_empty() {
            return Ok(());
        }
        // SAFETY: both views borrow live device buffers; shard holds s elements and out
        // world·s (checked); distinct borrows, so no overlap.
        unsafe {
            result::all_gather(
                shard.ptr() as *const _,
                out.ptr() as *mut _,
                shard.len(),
                T::DTYPE,
                self.comm,
                self.stream(),
            )
        }
        .map(drop)
        .map_err(|e| self.err("ncclAllGather", e))
    }

    /// Runs `f`'s NCCL calls as one group (ncclGroupStart/End), so per-rank operations of a
    /// collective proceed together; the group is closed even when `f` fails.
    fn grouped(&mut self, f: impl FnOnce(&mut Self) -> Result<()>) -> Result<()> {
        result::group_start().map_err(|e| self.err("ncclGroupStart", e))?;
        let r = f(self);
        let end = result::group_end().map_err(|e| self.err("ncclGroupEnd", e));
        r.and(end.map(drop))
    }

    /// `out` ← Σ over ranks of this rank's piece of `input` (pieces of `piece` elements, the
    /// last ones short): one ncclReduceScatter when the pieces are equal, else one ncclReduce
    /// per rank onto its owner, grouped.
    fn reduce_scatter_v_raw<T: NcclElem>(
        &mut self,
        input: DRef<'_, T>,
        out: DMut<'_, T>,
        piece: usize,
    ) -> Result<()> {
        let n = input.len();
        check_cover("reduce_scatter_v", n, piece, self.world)?;
        check_len(
            "reduce_scatter_v output",
            out.len(),
            piece_of(n, piece, self.rank).1,
        )?;
        if n == self.world * piece {
            return self.reduce_scatter_raw(input, out);
        }
        let size = std::mem::size_of::<T>() as u64;
        self.grouped(|me| {
            for r in 0..me.world {
                let (off, len) = piece_of(n, piece, r);
                if len == 0 {
                    continue;
                }
                let send = input.ptr() + off as u64 * size;
                // Only the root's receive buffer is used; the others pass their send pointer.
                let recv = if r == me.rank { out.ptr() } else { send };
                // SAFETY: `input` borrows a live device buffer of n elements and [off, off+len)
                // lies inside it (piece_of); on the root `out` borrows a distinct live buffer of
                // len elements (check_len); r < world fits in c_int for any real job.
                unsafe {
                    result::reduce(
                        send as *const _,
                        recv as *mut _,
                        len,
                        T::DTYPE,
                        sys::ncclRedOp_t::ncclSum,
                        r as c_int,
                        me.comm,
                        me.stream(),
                    )
                }
                .map_err(|e| me.err("ncclReduce", e))?;
            }
            Ok(())
        })
    }

    /// In place over `buf`: every rank's piece is copied to the others. One in-place
    /// ncclAllGather when the pieces are equal, else one ncclBroadcast per rank from its owner,
    /// grouped.
    fn all_gather_v_raw<T: NcclElem>(&mut self, buf: DMut<'_, T>, piece: usize) -> Result<()> {
        let (n, world, rank) = (buf.len(), self.world, self.rank);
        check_cover("all_gather_v", n, piece, world)?;
        if n == 0 {
            return Ok(());
        }
        let size = std::mem::size_of::<T>() as u64;
        if n == world * piece {
            let send = buf.ptr() + (rank * piece) as u64 * size;
            // SAFETY: `buf` borrows a live device buffer of world·piece elements; the send
            // pointer is this rank's piece inside it, the in-place form NCCL allows
            // (sendbuff == recvbuff + rank·sendcount).
            return unsafe {
                result::all_gather(
                    send as *const _,
                    buf.ptr() as *mut _,
                    piece,
                    T::DTYPE,
                    self.comm,
                    self.stream(),
                )
            }
            .map(drop)
            .map_err(|e| self.err("ncclAllGather (in place)", e));
        }
        self.grouped(|me| {
            for r in 0..world {
                let (off, len) = piece_of(n, piece, r);
                if len == 0 {
                    continue;
                }
                let p = buf.ptr() + off as u64 * size;
                // SAFETY: [off, off+len) lies inside the live buffer `buf` borrows; in-place
                // broadcast (sendbuff == recvbuff) is allowed.
                unsafe {
                    result::broadcast(
                        p as *const _,
                        p as *mut _,
                        len,
                        T::DTYPE,
                        r as c_int,
                        me.comm,
                        me.stream(),
                    )
                }
                .map_err(|e| me.err("ncclBroadcast", e))?;
            }
            Ok(())
        })
    }

    /// Staging buffer `i` (0: send, 1: receive) with room for `len` f32, taken out of `self`
    /// while in use (two buffers, so a send view and a receive view never alias).
    fn take_stage(&mut self, i: usize, len: usize) -> Result<DBuf<f32>> {
        match self.stage[i].take() {
            Some(s) if s.len() >= len => Ok(s),
            _ => self.cuda.alloc(len.max(1024)),
        }
    }
}

/// Host slices staged through device memory: each call uploads, runs the collective and
/// downloads (which synchronises), so it returns with the result on the host, as the trait
/// promises.
impl Collective for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        let n = buf.len();
        let mut st = self.take_stage(1, n)?;
        self.cuda.from_host(st.slice_mut(0, n), buf)?;
        self.all_reduce_sum_device(st.slice_mut(0, n))?;
        self.cuda.to_host(buf, st.slice(0, n))?;
        self.stage[1] = Some(st);
        Ok(())
    }

    fn reduce_scatter_sum(&mut self, input: &[f32], out_shard: &mut [f32]) -> Result<()> {
        check_len(
            "reduce_scatter input",
            input.len(),
            self.world * out_shard.len(),
        )?;
        let (n, s) = (input.len(), out_shard.len());
        let (mut send, mut recv) = (self.take_stage(0, n)?, self.take_stage(1, s)?);
        self.cuda.from_host(send.slice_mut(0, n), input)?;
        self.reduce_scatter_sum_device(send.slice(0, n), recv.slice_mut(0, s))?;
        self.cuda.to_host(out_shard, recv.slice(0, s))?;
        self.stage = [Some(send), Some(recv)];
        Ok(())
    }

    fn all_gather(&mut self, shard: &[f32], out: &mut [f32]) -> Result<()> {
        check_len("all_gather output", out.len(), self.world * shard.len())?;
        let (s, n) = (shard.len(), out.len());
        let (mut send, mut recv) = (self.take_stage(0, s)?, self.take_stage(1, n)?);
        self.cuda.from_host(send.slice_mut(0, s), shard)?;
        self.all_gather_device(send.slice(0, s), recv.slice_mut(0, n))?;
        self.cuda.to_host(out, recv.slice(0, n))?;
        self.stage = [Some(send), Some(recv)];
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        let mut one = [0f32];
        self.all_reduce_sum(&mut one)
    }
}

/// The per-step path: each call enqueues one NCCL operation on the backend's stream (after the
/// kernels that wrote its input, before those that read its output) and returns without
/// synchronising.
impl DeviceCollective<Cuda> for NcclComm {
    fn all_reduce_sum_buf(&mut self, buf: DMut<'_, f32>) -> Result<()> {
        self.all_reduce_sum_device(buf)
    }
    fn reduce_scatter_v(
        &mut self,
        input: DRef<'_, f32>,
        out: DMut<'_, f32>,
        piece: usize,
    ) -> Result<()> {
        self.reduce_scatter_v_device(input, out, piece)
    }
    fn all_gather_v(&mut self, buf: DMut<'_, half::bf16>, piece: usize) -> Result<()> {
        self.all_gather_v_device(buf, piece)
    }
    fn reduce_scatter_part(
        &mut self,
        part: DRef<'_, f32>,
        lo: usize,
        n: usize,
        out: DMut<'_, f32>,
        piece: usize,
    ) -> Result<()> {
        self.reduce_scatter_part_device(part, lo, n, out, piece)
    }
    fn wait_reduced(&mut self) -> Result<()> {
        self.wait_reduced_device()
    }
}

impl Drop for NcclComm {
    /// Abort, not destroy: it never waits on peers, so a rank leaving on an error does not hang
    /// here. Work still queued is cut short, so drop the communicator after its results were
    /// read back (a read-back synchronises the backend's stream, which waits for this one's
    /// calls; bucket reductions after the step's `wait_reduced`).
    fn drop(&mut self) {
        let _ = self.cuda.bind();
        // SAFETY: `comm` came from ncclCommInitRank and is released exactly once, here.
        let _ = unsafe { result::comm_abort(self.comm) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Here (no libnccl, no GPU) every entry point fails with the probe's message instead of
    /// cudarc's panic.
    #[test]
    fn missing_nccl_is_an_error_not_a_panic() {
        let Err(e) = probe() else {
            eprintln!("NCCL and a GPU are present: nothing to check here");
            return;
        };
        let m = e.to_string();
        assert!(
            m.contains("NCCL not found") || m.contains("NCCL needs a CUDA GPU"),
            "{m}"
        );
        assert_eq!(NcclComm::unique_id().unwrap_err().to_string(), m);
        assert_eq!(version().unwrap_err().to_string(), m);
    }

    /// GPU 0 and a communicator for a world of one, through the real launch path (rendezvous,
    /// unique id, init); `None`, with a printed reason, where there is no GPU or no NCCL.
    fn world_of_one() -> Option<(Cuda, NcclComm)> {
        let cuda = match probe().and_then(|()| Cuda::new(0)) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("skipped: {e}");
                return None;
            }
        };
        let env = DistEnv::single();
        let rdv = env.rendezvous(None).unwrap();
        let c = NcclComm::init(&cuda, &env, &rdv, Duration::from_secs(30)).unwrap();
        Some((cuda, c))
    }

    /// On a machine with a GPU and NCCL: a world of one runs the real code path (init through
    /// the rendezvous, each collective through device staging and on device buffers). Skipped
    /// elsewhere.
    #[test]
    fn nccl_world_of_one_runs_the_real_path() {
        let Some((cuda, mut c)) = world_of_one() else {
            return;
        };
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.1).sin()).collect();
        let mut y = x.clone();
        c.all_reduce_sum(&mut y).unwrap();
        assert_eq!(y, x);
        let mut s = vec![0f32; 1000];
        c.reduce_scatter_sum(&x, &mut s).unwrap();
        assert_eq!(s, x);
        let mut g = vec![0f32; 1000];
        c.all_gather(&x, &mut g).unwrap();
        assert_eq!(g, x);
        c.barrier().unwrap();
        // The device path the ZeRO-1 step takes: NCCL straight on backend buffers.
        let dx = cuda.upload(&x).unwrap();
        let mut dy = cuda.alloc::<f32>(1000).unwrap();
        let mut back = vec![0f32; 1000];
        c.reduce_scatter_v(dx.view(), dy.view_mut(), 1000).unwrap();
        cuda.to_host(&mut back, dy.view()).unwrap();
        assert_eq!(back, x);
        c.all_reduce_sum_buf(dy.view_mut()).unwrap();
        cuda.to_host(&mut back, dy.view()).unwrap();
        assert_eq!(back, x);
        // The uneven forms (grouped reduce / broadcast), as a world of one sees them: a piece
        // larger than the vector.
        let mut dz = cuda.alloc::<f32>(1000).unwrap();
        c.reduce_scatter_v_device(dx.view(), dz.view_mut(), 1024)
            .unwrap();
        cuda.to_host(&mut back, dz.view()).unwrap();
        assert_eq!(back, x);
        let xb: Vec<half::bf16> = x.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let mut db = cuda.upload(&xb).unwrap();
        c.all_gather_v(db.view_mut(), 1000).unwrap();
        c.all_gather_v(db.view_mut(), 1024).unwrap();
        let mut bb = vec![half::bf16::ZERO; 1000];
        cuda.to_host(&mut bb, db.view()).unwrap();
        assert_eq!(bb, xb);
        // Buckets as an overlapped backward issues them (tail first), on the side stream, then
        // the wait that orders the backend's stream after them.
        let mut dp = cuda.alloc::<f32>(1000).unwrap();
        for piece in [1000, 1024] {
            cuda.zero(dp.view_mut()).unwrap();
            c.reduce_scatter_part(dx.slice(600, 400), 600, 1000, dp.view_mut(), piece)
                .unwrap();
            c.reduce_scatter_part(dx.slice(0, 600), 0, 1000, dp.view_mut(), piece)
                .unwrap();
            c.wait_reduced().unwrap();
            cuda.to_host(&mut back, dp.view()).unwrap();
            assert_eq!(back, x, "piece {piece}");
        }
    }

    /// On a machine with a GPU and NCCL: the whole ZeRO-1 step on CUDA buffers over NCCL (a
    /// world of one), the fp32 master released, gradients reduced in per-layer buckets on
    /// NCCL's stream, the fused AdamW writing the bf16 compute weights, the bf16 all-gather,
    /// gives the same bits as whole AdamW on the same gradients. Skipped elsewhere.
    #[test]
    fn nccl_world_of_one_zero1_step_matches_whole_adamw() {
        use crate::dist::ShardedAdamW;
        use crate::model::{shift_labels, Batch, Llama};
        use crate::optim::{AdamW, AdamWConfig};
        let Some((cuda, mut c)) = world_of_one() else {
            return;
        };
        let config: crate::LlamaConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 96, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 2,
            "max_position_embeddings": 64,
        }))
        .unwrap();
        let model = || {
            let mut m = Llama::new(cuda.clone(), config.clone(), crate::Head::Lm).unwrap();
            m.init_random(3).unwrap();
            m
        };
        // No clipping: ZeRO-1 takes the norm's square root in f32, whole AdamW in f64.
        let cfg = AdamWConfig {
            clip_norm: None,
            ..AdamWConfig::default()
        };
        let (mut a, mut b) = (model(), model());
        let mut zero1 = ShardedAdamW::new(&mut a, cfg, 0, 1).unwrap();
        assert!(a.master_released());
        let mut whole = AdamW::new(&b, cfg).unwrap();
        let n = a.num_params();
        let w0 = b.params_to_host().unwrap();
        for step in 0..3 {
            let (bt, t) = (2, 17);
            let ids: Vec<i32> = (0..bt * t)
                .map(|i| ((i * 7 + step * 5) % 96) as i32)
                .collect();
            a.zero_grads().unwrap();
            a.forward(&Batch::new(&ids, bt, t)).unwrap();
            let (_, count) = a.lm_loss(&shift_labels(&ids, bt, t)).unwrap();
            // Buckets of 1000 elements: one per layer edge, reduced while the backward runs.
            let mut sink = zero1.overlap(&mut c, 1000);
            a.backward_lm_with(1.0 / count as f32, Some(&mut sink))
                .unwrap();
            // The same gradients for whole AdamW.
            cuda.copy(b.grads.view_mut(), a.grads.view()).unwrap();
            let sa = zero1.step(&mut a, &mut c, 1e-2).unwrap();
            let sb = whole.step(&mut b, 1e-2).unwrap();
            let rel = (sa.grad_norm - sb.grad_norm).abs() / sb.grad_norm;
            assert!(
                rel < 1e-6,
                "step {step}: grad norm {} vs {}",
                sa.grad_norm,
                sb.grad_norm
            );
        }
        let mut ma = vec![0f32; n];
        let mut mb = vec![0f32; n];
        cuda.to_host(&mut ma, zero1.master.slice(0, n)).unwrap();
        cuda.to_host(&mut mb, b.master.held().unwrap().view())
            .unwrap();
        let diff = ma
            .iter()
            .zip(&mb)
            .position(|(x, y)| x.to_bits() != y.to_bits());
        assert_eq!(diff, None, "fp32 masters differ first at {diff:?}");
        let mut wa = vec![half::bf16::ZERO; n];
        let mut wb = vec![half::bf16::ZERO; n];
        cuda.to_host(&mut wa, a.shadow.view()).unwrap();
        cuda.to_host(&mut wb, b.shadow.view()).unwrap();
        let diff = wa.iter().zip(&wb).position(|(x, y)| x != y);
        assert_eq!(diff, None, "bf16 compute weights differ first at {diff:?}");
        let moved = mb
            .iter()
            .zip(&w0)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(moved > 1e-3, "the weights barely moved: {moved:e}");
    }
}
