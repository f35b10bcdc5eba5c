//! NCCL's C API, as cudarc calls it: communicators across the threads and processes of one
//! machine, collectives that run in stream order.
//!
//! * The unique id names a rendezvous: a control segment (`gpu-sim-nccl-<token>` under
//!   `/dev/shm`, or `GPU_SIM_NCCL_DIR`), mmapped by every rank, with one slot of atomic
//!   counters per rank, and one data file per rank (`gpu-sim-nccl-<token>.r<rank>`) that holds
//!   what the rank posts. The same path serves ranks in several processes and ranks that are
//!   threads of one process (each maps the segment on its own).
//! * A collective call checks its arguments (communicator, count, type, operation, root, that
//!   the buffers are device memory of the communicator's GPU, the in-place forms NCCL allows)
//!   and queues a job on the stream; nothing moves until the stream runs (see
//!   [`crate::runtime`]), so a missing event wait before NCCL's stream reads stale input, as
//!   on a GPU.
//! * Each rank numbers its calls on a communicator. For call `s` a rank reads its input from
//!   device memory, writes it to its data file, records the call (kind, count, type, operation,
//!   root) and sets `posted = s`; once every rank has posted `s` it compares the calls (out of
//!   step: every rank fails naming both calls), reads what it needs from the others' files,
//!   reduces in rank order (so every rank gets the same bits), writes its output, sets
//!   `consumed = s` and waits until every rank has, before its file may be reused.
//! * Waits end with an error, never a hang: a peer that failed, destroyed or aborted its
//!   communicator, a peer process that died, or `GPU_SIM_NCCL_TIMEOUT` seconds (300 by
//!   default) naming the ranks that never came. The last rank to leave removes the files.
//! * Groups: calls between ncclGroupStart and ncclGroupEnd are checked when made and queued
//!   together at ncclGroupEnd, as one job per communicator.
//!
//! Errors return NCCL's codes; the message goes to stderr ("gpu-sim: ...") and to
//! ncclGetLastError. A job that fails leaves a sticky CUDA error on the device, as a failed
//! kernel would, with the NCCL message in cuGetErrorString's detail.

use crate::mem::{BASE, DEVICE_SPAN};
use crate::runtime::{code, sim, Device, Failure, Res};
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// ncclResult_t (NCCL's numbering; an enum of int size in C).
#[allow(non_camel_case_types)]
pub type ncclResult_t = c_int;
/// An opaque communicator handle (a tagged integer here, never dereferenced by callers).
#[allow(non_camel_case_types)]
pub type ncclComm_t = *mut c_void;
#[allow(non_camel_case_types)]
pub type cudaStream_t = *mut c_void;

/// ncclUniqueId: 128 bytes, passed by value.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ncclUniqueId {
    pub internal: [c_char; ID_BYTES],
}

pub const ID_BYTES: usize = 128;

/// ncclResult_t values.
pub mod result {
    pub const SUCCESS: i32 = 0;
    pub const UNHANDLED_CUDA_ERROR: i32 = 1;
    pub const SYSTEM_ERROR: i32 = 2;
    pub const INTERNAL_ERROR: i32 = 3;
    pub const INVALID_ARGUMENT: i32 = 4;
    pub const INVALID_USAGE: i32 = 5;
    pub const REMOTE_ERROR: i32 = 6;
    pub const IN_PROGRESS: i32 = 7;
}
use result as r;

/// The version reported: 2.30.0, the NCCL cudarc's bindings (feature nccl-02030) describe.
pub const VERSION: c_int = 23000;

/// The most ranks a communicator may have (slots in the control segment).
pub const MAX_RANKS: usize = 256;

/// An NCCL error: the code returned and what went wrong.
#[derive(Clone, Debug)]
pub struct NcclFail {
    pub code: ncclResult_t,
    pub message: String,
}

fn fail(code: ncclResult_t, message: impl Into<String>) -> NcclFail {
    NcclFail {
        code,
        message: message.into(),
    }
}

type NRes<T> = Result<T, NcclFail>;

// ---------------------------------------------------------------- last errors

/// Error strings handed out by ncclGetLastError, numbered in the order they happened: the
/// latest few are kept, so a pointer a caller holds stays valid while later errors come in.
#[derive(Default)]
struct LastErrors(VecDeque<(u64, CString)>);

static ERROR_SEQ: AtomicU64 = AtomicU64::new(1);

impl LastErrors {
    fn push(&mut self, seq: u64, msg: &str) {
        if let Ok(c) = CString::new(msg.replace('\0', " ")) {
            self.0.push_back((seq, c));
        }
        while self.0.len() > 16 {
            self.0.pop_front();
        }
    }
    fn latest(&self) -> Option<(u64, *const c_char)> {
        self.0.back().map(|(s, c)| (*s, c.as_ptr()))
    }
}

fn global_last() -> &'static Mutex<LastErrors> {
    static L: OnceLock<Mutex<LastErrors>> = OnceLock::new();
    L.get_or_init(Default::default)
}

thread_local! {
    /// The errors of calls this thread made (ranks that are threads of one process each see
    /// their own).
    static THREAD_LAST: RefCell<LastErrors> = RefCell::new(LastErrors::default());
}

/// Prints an error of a call and records it for ncclGetLastError.
fn note(msg: &str) {
    eprintln!("gpu-sim: {msg}");
    let seq = ERROR_SEQ.fetch_add(1, Ordering::Relaxed);
    global_last().lock().unwrap().push(seq, msg);
    THREAD_LAST.with(|t| t.borrow_mut().push(seq, msg));
}

/// Runs an export's body: its error becomes the returned code (printed, recorded for
/// ncclGetLastError), a panic becomes ncclInternalError naming the simulator as the culprit.
fn guard(f: impl FnOnce() -> NRes<()>) -> ncclResult_t {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(())) => r::SUCCESS,
        Ok(Err(e)) => {
            note(&e.message);
            e.code
        }
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            note(&format!(
                "internal error in gpu-sim's NCCL (please report): {msg}"
            ));
            r::INTERNAL_ERROR
        }
    }
}

/// A CUDA failure met by an NCCL call (a bad stream, a faulted device).
fn cuda_fail(what: &str, f: Failure) -> NcclFail {
    fail(r::UNHANDLED_CUDA_ERROR, format!("{what}: {}", f.message))
}

/// Writes `v` through an out-pointer, refusing NULL.
///
/// # Safety
/// `p` is NULL or valid for a write of T.
unsafe fn out<T>(p: *mut T, v: T, what: &str) -> NRes<()> {
    if p.is_null() {
        return Err(fail(
            r::INVALID_ARGUMENT,
            format!("{what}: the output pointer is NULL"),
        ));
    }
    // SAFETY: non-null, and the caller passes a pointer to a T.
    unsafe { p.write(v) };
    Ok(())
}

// ---------------------------------------------------------------- types, operations, calls

/// ncclDataType_t, the types modelled (fp8 is not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ty {
    I8,
    U8,
    I32,
    U32,
    I64,
    U64,
    F16,
    F32,
    F64,
    Bf16,
}

impl Ty {
    fn from_raw(v: c_int) -> NRes<Ty> {
        Ok(match v {
            0 => Ty::I8,
            1 => Ty::U8,
            2 => Ty::I32,
            3 => Ty::U32,
            4 => Ty::I64,
            5 => Ty::U64,
            6 => Ty::F16,
            7 => Ty::F32,
            8 => Ty::F64,
            9 => Ty::Bf16,
            10 | 11 => {
                return Err(fail(
                    r::INVALID_ARGUMENT,
                    format!("ncclDataType_t {v} (fp8) is not modelled by the simulator"),
                ))
            }
            _ => {
                return Err(fail(
                    r::INVALID_ARGUMENT,
                    format!("{v} is not an ncclDataType_t"),
                ))
            }
        })
    }
    fn raw(self) -> u64 {
        self as u64
    }
    pub fn size(self) -> usize {
        match self {
            Ty::I8 | Ty::U8 => 1,
            Ty::F16 | Ty::Bf16 => 2,
            Ty::I32 | Ty::U32 | Ty::F32 => 4,
            Ty::I64 | Ty::U64 | Ty::F64 => 8,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Ty::I8 => "int8",
            Ty::U8 => "uint8",
            Ty::I32 => "int32",
            Ty::U32 => "uint32",
            Ty::I64 => "int64",
            Ty::U64 => "uint64",
            Ty::F16 => "f16",
            Ty::F32 => "f32",
            Ty::F64 => "f64",
            Ty::Bf16 => "bf16",
        }
    }
}

/// ncclRedOp_t, the built-in operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedOp {
    Sum,
    Prod,
    Max,
    Min,
    Avg,
}

impl RedOp {
    fn from_raw(v: c_int) -> NRes<RedOp> {
        Ok(match v {
            0 => RedOp::Sum,
            1 => RedOp::Prod,
            2 => RedOp::Max,
            3 => RedOp::Min,
            4 => RedOp::Avg,
            _ => {
                return Err(fail(
                    r::INVALID_ARGUMENT,
                    format!(
                        "ncclRedOp_t {v} is not a built-in operation (user-defined operations \
                         are not modelled by the simulator)"
                    ),
                ))
            }
        })
    }
    fn name(self) -> &'static str {
        match self {
            RedOp::Sum => "sum",
            RedOp::Prod => "prod",
            RedOp::Max => "max",
            RedOp::Min => "min",
            RedOp::Avg => "avg",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    AllReduce = 1,
    ReduceScatter = 2,
    AllGather = 3,
    Reduce = 4,
    Broadcast = 5,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::AllReduce => "ncclAllReduce",
            Kind::ReduceScatter => "ncclReduceScatter",
            Kind::AllGather => "ncclAllGather",
            Kind::Reduce => "ncclReduce",
            Kind::Broadcast => "ncclBroadcast",
        }
    }
}

/// A call as every rank must make it: what the ranks compare at each call number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Desc {
    kind: Kind,
    /// The call's count argument (recvcount for ncclReduceScatter, sendcount for
    /// ncclAllGather).
    count: u64,
    ty: Ty,
    op: Option<RedOp>,
    root: Option<u32>,
}

impl Desc {
    fn raw(&self) -> [u64; 5] {
        [
            self.kind as u64,
            self.count,
            self.ty.raw(),
            self.op.map_or(u64::MAX, |o| o as u64),
            self.root.map_or(u64::MAX, u64::from),
        ]
    }

    fn from_raw(v: [u64; 5]) -> Option<Desc> {
        let kind = match v[0] {
            1 => Kind::AllReduce,
            2 => Kind::ReduceScatter,
            3 => Kind::AllGather,
            4 => Kind::Reduce,
            5 => Kind::Broadcast,
            _ => return None,
        };
        let ty = Ty::from_raw(c_int::try_from(v[2]).ok()?).ok()?;
        let op = match v[3] {
            u64::MAX => None,
            o => Some(RedOp::from_raw(c_int::try_from(o).ok()?).ok()?),
        };
        let root = match v[4] {
            u64::MAX => None,
            x => Some(u32::try_from(x).ok()?),
        };
        Some(Desc {
            kind,
            count: v[1],
            ty,
            op,
            root,
        })
    }
}

impl fmt::Display for Desc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({} {}", self.kind.name(), self.count, self.ty.name())?;
        if let Some(op) = self.op {
            write!(f, " {}", op.name())?;
        }
        if let Some(root) = self.root {
            write!(f, ", root {root}")?;
        }
        write!(f, ")")
    }
}

fn show_raw(v: [u64; 5]) -> String {
    Desc::from_raw(v).map_or_else(|| format!("an unknown call {v:?}"), |d| d.to_string())
}

// ---------------------------------------------------------------- the shared segment

const MAGIC: u64 = u64::from_le_bytes(*b"gsimNCCL");
const ID_MAGIC: &[u8; 16] = b"gpu-sim-nccl-id\0";
const MSG_BYTES: usize = 768;

/// Slot states.
const EMPTY: u64 = 0;
/// Claimed by a joining rank that is still filling it in.
const CLAIMED: u64 = 1;
const JOINED: u64 = 2;
/// Joined, and its communicator failed (the message says why); the process may live on.
const FAILED: u64 = 3;
const DESTROYED: u64 = 4;
const ABORTED: u64 = 5;

#[repr(C)]
struct Header {
    magic: AtomicU64,
    nranks: AtomicU64,
    _reserved: [AtomicU64; 510],
}

/// One rank's part of the control segment.
#[repr(C)]
struct Slot {
    state: AtomicU64,
    pid: AtomicU64,
    device: AtomicU64,
    /// The last call number whose input this rank has posted.
    posted: AtomicU64,
    /// The last call number whose peers' data this rank has finished reading.
    consumed: AtomicU64,
    /// The posted call ([`Desc::raw`]).
    desc: [AtomicU64; 5],
    /// Bytes posted in the data file.
    bytes: AtomicU64,
    /// Calls completed when the rank left.
    done: AtomicU64,
    msg_len: AtomicU64,
    _reserved: [AtomicU64; 19],
    /// Why the rank failed (FAILED, or a failure before it left).
    msg: [AtomicU8; MSG_BYTES],
}

#[repr(C)]
struct Shared {
    header: Header,
    slots: [Slot; MAX_RANKS],
}

const _: () = assert!(std::mem::size_of::<Header>() == 4096);
const _: () = assert!(std::mem::size_of::<Slot>() == 1024);
const SEG_BYTES: usize = std::mem::size_of::<Shared>();

impl Slot {
    fn set_msg(&self, msg: &str) {
        let b = msg.as_bytes();
        let n = b.len().min(MSG_BYTES);
        for (d, &s) in self.msg.iter().zip(&b[..n]) {
            d.store(s, Ordering::Relaxed);
        }
        self.msg_len.store(n as u64, Ordering::Release);
    }
    fn msg(&self) -> String {
        let n = (self.msg_len.load(Ordering::Acquire) as usize).min(MSG_BYTES);
        let b: Vec<u8> = self.msg[..n]
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect();
        String::from_utf8_lossy(&b).into_owned()
    }
    fn desc(&self) -> [u64; 5] {
        std::array::from_fn(|i| self.desc[i].load(Ordering::Relaxed))
    }
}

/// The directory the segments live in: `GPU_SIM_NCCL_DIR`, else /dev/shm, else the temp dir.
fn seg_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("GPU_SIM_NCCL_DIR") {
        return d.into();
    }
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.into()
    } else {
        std::env::temp_dir()
    }
}

fn ctl_path(dir: &Path, token: &str) -> PathBuf {
    dir.join(format!("gpu-sim-nccl-{token}"))
}

fn data_path(dir: &Path, token: &str, rank: usize) -> PathBuf {
    dir.join(format!("gpu-sim-nccl-{token}.r{rank}"))
}

/// One rank's view of a communicator's rendezvous: the mapped control segment and the data
/// files.
struct Segment {
    shared: *mut Shared,
    dir: PathBuf,
    token: String,
    /// This rank's data file, created once the rank holds its slot.
    own: Option<File>,
    /// The peers' data files, by rank (None for this rank), opened once every rank joined.
    peers: Vec<Option<File>>,
}

// SAFETY: the mapping is only accessed through atomics (`Shared` is all atomics), and it stays
// mapped until the Segment is dropped.
unsafe impl Send for Segment {}
// SAFETY: as above.
unsafe impl Sync for Segment {}

impl Drop for Segment {
    fn drop(&mut self) {
        // SAFETY: mapped in `Segment::map` with this length, unmapped once; no reference into
        // it outlives `self` (`sh` borrows self).
        unsafe { libc::munmap(self.shared as *mut c_void, SEG_BYTES) };
    }
}

impl Segment {
    fn sh(&self) -> &Shared {
        // SAFETY: `shared` is a live MAP_SHARED mapping of SEG_BYTES bytes (page-aligned, zero
        // filled when created), every field is an atomic for which all-zero bytes are valid.
        unsafe { &*self.shared }
    }

    /// Maps the control segment of `token`, creating it if this rank is the first (`create`).
    fn map(dir: &Path, token: &str, create: bool) -> NRes<Segment> {
        let path = ctl_path(dir, token);
        let sys = |what: &str, e: std::io::Error| {
            fail(r::SYSTEM_ERROR, format!("{what} {}: {e}", path.display()))
        };
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| sys("opening the NCCL rendezvous segment", e))?;
        if !create && f.metadata().map(|m| m.len()).ok() != Some(SEG_BYTES as u64) {
            return Err(fail(
                r::SYSTEM_ERROR,
                format!("{} is not a segment", path.display()),
            ));
        }
        // Every rank sets the same length; growing from 0 zero-fills, the same length is a
        // no-op.
        f.set_len(SEG_BYTES as u64)
            .map_err(|e| sys("sizing the NCCL rendezvous segment", e))?;
        use std::os::fd::AsRawFd;
        // SAFETY: maps SEG_BYTES of an open file read-write and shared; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                SEG_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(sys("mapping", std::io::Error::last_os_error()));
        }
        let seg = Segment {
            shared: p as *mut Shared,
            dir: dir.into(),
            token: token.into(),
            own: None,
            peers: Vec::new(),
        };
        let m = seg.sh().header.magic.load(Ordering::Acquire);
        if m != MAGIC {
            if let Err(other) = seg.sh().header.magic.compare_exchange(
                0,
                MAGIC,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                if other != MAGIC {
                    return Err(fail(
                        r::SYSTEM_ERROR,
                        format!("{} is not a gpu-sim NCCL segment", path.display()),
                    ));
                }
            }
        }
        Ok(seg)
    }

    /// Removes the files when every rank has left (or died, or never came).
    fn cleanup_if_last(&self, nranks: usize) {
        let sh = self.sh();
        let all_gone = (0..nranks).all(|r| {
            let s = &sh.slots[r];
            match s.state.load(Ordering::Acquire) {
                EMPTY | DESTROYED | ABORTED => true,
                // Its pid may not be written yet.
                CLAIMED => false,
                _ => !pid_alive(s.pid.load(Ordering::Relaxed)),
            }
        });
        if all_gone {
            let _ = std::fs::remove_file(ctl_path(&self.dir, &self.token));
            for r in 0..nranks {
                let _ = std::fs::remove_file(data_path(&self.dir, &self.token, r));
            }
        }
    }
}

/// Removes the rendezvous files of jobs whose ranks have all left or died: a job that was
/// killed, or whose last rank crashed, cannot clean up after itself. Run when an id is made.
fn sweep_stale(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(token) = name.to_str().and_then(|n| n.strip_prefix("gpu-sim-nccl-")) else {
            continue;
        };
        if token.len() != 32 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        let Ok(seg) = Segment::map(dir, token, false) else {
            continue;
        };
        let sh = seg.sh();
        let n = (sh.header.nranks.load(Ordering::Acquire) as usize).min(MAX_RANKS);
        if (0..n).any(|r| sh.slots[r].state.load(Ordering::Acquire) != EMPTY) {
            seg.cleanup_if_last(n);
        }
    }
}

/// Whether process `pid` exists (a peer rank that crashed does not).
fn pid_alive(pid: u64) -> bool {
    let Ok(p) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if p <= 0 || p == std::process::id() as libc::pid_t {
        return p > 0;
    }
    // SAFETY: signal 0 only checks that the process exists.
    if unsafe { libc::kill(p, 0) } != 0 {
        return std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
    }
    // A zombie has exited too; its parent (a launcher waiting for rank 0 first) may reap it
    // much later.
    match std::fs::read_to_string(format!("/proc/{p}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| matches!(state, 'Z' | 'X')),
        Err(_) => true,
    }
}

/// The wait timeout: `GPU_SIM_NCCL_TIMEOUT` seconds, 300 by default.
fn timeout_from_env() -> Duration {
    const DEFAULT: f64 = 300.0;
    let s = match std::env::var("GPU_SIM_NCCL_TIMEOUT") {
        Ok(v) => v.trim().parse::<f64>().ok().filter(|s| *s > 0.0 && s.is_finite()).unwrap_or_else(|| {
            eprintln!("gpu-sim: GPU_SIM_NCCL_TIMEOUT={v:?} is not a positive number of seconds; using {DEFAULT}");
            DEFAULT
        }),
        Err(_) => DEFAULT,
    };
    Duration::from_secs_f64(s)
}

/// Why a rank that is not where it is waited for will never get there, if it won't.
fn gone_reason(slot: &Slot, rank: usize) -> Option<String> {
    let msg = slot.msg();
    let had = if msg.is_empty() {
        String::new()
    } else {
        format!(" (it had failed: {msg})")
    };
    match slot.state.load(Ordering::Acquire) {
        FAILED => Some(format!("rank {rank} failed: {msg}")),
        DESTROYED => Some(format!(
            "rank {rank} destroyed its communicator after {} calls{had}",
            slot.done.load(Ordering::Relaxed)
        )),
        ABORTED => Some(format!(
            "rank {rank} aborted its communicator after {} calls{had}",
            slot.done.load(Ordering::Relaxed)
        )),
        _ => None,
    }
}

/// Polls `ready` for every rank but `me` until all hold, with backoff. Fails when a rank
/// will never get there: it failed or left, its process died, `abort` was set, or `timeout`
/// passed (`what` says what was waited for, for the message).
fn wait_all(
    sh: &Shared,
    me: usize,
    nranks: usize,
    timeout: Duration,
    abort: Option<&AtomicBool>,
    what: &dyn Fn() -> String,
    ready: &dyn Fn(&Slot) -> bool,
) -> Result<(), (ncclResult_t, String)> {
    let start = Instant::now();
    let mut spins = 0u32;
    let mut sleep = Duration::from_micros(20);
    let mut last_pid_check = start;
    let mut warned = false;
    loop {
        let pending: Vec<usize> = (0..nranks)
            .filter(|&r| r != me && !ready(&sh.slots[r]))
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        for &p in &pending {
            // A peer may get ready and leave between the two loads: its state is stored after
            // its progress (release/acquire), so ready now means it left after getting here.
            if let Some(why) = gone_reason(&sh.slots[p], p) {
                if !ready(&sh.slots[p]) {
                    return Err((r::REMOTE_ERROR, why));
                }
            }
        }
        if abort.is_some_and(|a| a.load(Ordering::Acquire)) {
            return Err((
                r::INVALID_USAGE,
                "this rank's communicator was aborted while the call waited".into(),
            ));
        }
        let now = Instant::now();
        if now.duration_since(last_pid_check) >= Duration::from_millis(100) {
            last_pid_check = now;
            for &p in &pending {
                let s = &sh.slots[p];
                let pid = s.pid.load(Ordering::Relaxed);
                // (CLAIMED: the pid may not be written yet.)
                let st = s.state.load(Ordering::Acquire);
                if st != EMPTY && st != CLAIMED && !pid_alive(pid) && !ready(s) {
                    return Err((
                        r::REMOTE_ERROR,
                        format!("rank {p} (pid {pid}) exited without destroying its communicator"),
                    ));
                }
            }
        }
        let waited = now.duration_since(start);
        let list = || {
            pending
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if waited >= timeout {
            return Err((
                r::REMOTE_ERROR,
                format!(
                    "rank{} {} of {nranks} did not {} within {:.1} s (GPU_SIM_NCCL_TIMEOUT; \
                     raise it if a rank is only slow)",
                    if pending.len() > 1 { "s" } else { "" },
                    list(),
                    what(),
                    timeout.as_secs_f64()
                ),
            ));
        }
        if !warned && waited >= Duration::from_secs(10) {
            warned = true;
            eprintln!(
                "gpu-sim: NCCL rank {me} has waited {} s for rank(s) {} to {}",
                waited.as_secs(),
                list(),
                what()
            );
        }
        if spins < 64 {
            spins += 1;
            std::thread::yield_now();
        } else {
            std::thread::sleep(sleep);
            sleep = (sleep * 2).min(Duration::from_millis(2));
        }
    }
}

// ---------------------------------------------------------------- communicators

/// One rank's communicator.
pub struct Comm {
    handle: u64,
    rank: usize,
    nranks: usize,
    device: u32,
    seg: Segment,
    timeout: Duration,
    /// Calls issued (the last call number handed out).
    issued: AtomicU64,
    /// Calls executed (the last call number completed).
    executed: AtomicU64,
    aborted: AtomicBool,
    /// Left (destroyed or aborted): queued calls are skipped.
    left: AtomicBool,
    /// The first failure of a call (ncclCommGetAsyncError), its code and message.
    failure: Mutex<Option<(ncclResult_t, String)>>,
    last: Mutex<LastErrors>,
    /// Streams calls were queued on (flushed by ncclCommDestroy/Finalize).
    streams: Mutex<Vec<u64>>,
}

impl Comm {
    fn slot(&self) -> &Slot {
        &self.seg.sh().slots[self.rank]
    }

    fn who(&self) -> String {
        format!("rank {} of {}", self.rank, self.nranks)
    }

    /// Records a failure: for ncclCommGetAsyncError and ncclGetLastError here, and in the
    /// shared slot so peers waiting for this rank fail at once.
    fn set_failed(&self, code: ncclResult_t, msg: &str) {
        {
            let mut f = self.failure.lock().unwrap();
            if f.is_none() {
                *f = Some((code, msg.to_string()));
            }
        }
        let seq = ERROR_SEQ.fetch_add(1, Ordering::Relaxed);
        self.last.lock().unwrap().push(seq, msg);
        global_last().lock().unwrap().push(seq, msg);
        let s = self.slot();
        if s.msg_len.load(Ordering::Acquire) == 0 {
            s.set_msg(msg);
        }
        let _ = s
            .state
            .compare_exchange(JOINED, FAILED, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Leaves the communicator: the slot says how, the last rank out removes the files.
    fn depart(&self, state: u64) {
        self.left.store(true, Ordering::Release);
        let s = self.slot();
        s.done
            .store(self.executed.load(Ordering::Acquire), Ordering::Relaxed);
        s.state.store(state, Ordering::Release);
        self.seg.cleanup_if_last(self.nranks);
    }

    /// Runs the streams this communicator's calls were queued on (ncclCommDestroy and
    /// ncclCommFinalize complete the outstanding calls).
    fn flush(&self) -> NRes<()> {
        let streams = self.streams.lock().unwrap().clone();
        let dev = sim()
            .device(self.device)
            .map_err(|f| cuda_fail("flushing the communicator", f))?;
        for s in streams {
            dev.sync_stream(s).map_err(|f| {
                cuda_fail(
                    &format!("completing the communicator's calls ({})", self.who()),
                    f,
                )
            })?;
        }
        Ok(())
    }
}

fn registry() -> &'static Mutex<HashMap<u64, Arc<Comm>>> {
    static R: OnceLock<Mutex<HashMap<u64, Arc<Comm>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// Communicator handles: small tagged integers, never host or device addresses.
static NEXT_HANDLE: AtomicU64 = AtomicU64::new(0x5CC1_0000);

fn comm_of(h: ncclComm_t, what: &str) -> NRes<Arc<Comm>> {
    if h.is_null() {
        return Err(fail(
            r::INVALID_ARGUMENT,
            format!("{what}: the communicator is NULL"),
        ));
    }
    registry()
        .lock()
        .unwrap()
        .get(&(h as u64))
        .cloned()
        .ok_or_else(|| {
            fail(
                r::INVALID_ARGUMENT,
                format!(
                    "{what}: {h:?} is not a communicator (destroyed or aborted already, or never \
                     created)"
                ),
            )
        })
}

fn id_token(id: &ncclUniqueId) -> NRes<String> {
    let b: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
    if &b[..16] != ID_MAGIC {
        return Err(fail(
            r::INVALID_ARGUMENT,
            "ncclCommInitRank: the unique id was not made by gpu-sim's ncclGetUniqueId (or was \
             garbled on its way to this rank)",
        ));
    }
    Ok(b[16..32].iter().map(|x| format!("{x:02x}")).collect())
}

/// 16 bytes no other id of this machine has: a hash of the time, pid, a counter and the
/// process's random hasher keys.
fn fresh_token() -> [u8; 16] {
    use std::hash::{BuildHasher, Hasher};
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let c = COUNT.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut out = [0u8; 16];
    for (i, half) in out.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(t);
        h.write_u32(std::process::id());
        h.write_u64(c);
        h.write_usize(i);
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    out
}

fn init_rank(nranks: c_int, id: &ncclUniqueId, rank: c_int) -> NRes<Arc<Comm>> {
    let what = "ncclCommInitRank";
    let nranks = usize::try_from(nranks)
        .ok()
        .filter(|&n| (1..=MAX_RANKS).contains(&n))
        .ok_or_else(|| {
            fail(
                r::INVALID_ARGUMENT,
                format!("{what}: nranks {nranks} is not in 1..={MAX_RANKS}"),
            )
        })?;
    let rank = usize::try_from(rank)
        .ok()
        .filter(|&r| r < nranks)
        .ok_or_else(|| {
            fail(
                r::INVALID_ARGUMENT,
                format!("{what}: rank {rank} is not in 0..{nranks}"),
            )
        })?;
    if GROUP.with(|g| g.borrow().depth) > 0 {
        return Err(fail(
            r::INVALID_USAGE,
            format!(
                "{what} inside ncclGroupStart/End is not modelled by the simulator (init each \
                 rank on its own thread, outside a group)"
            ),
        ));
    }
    let token = id_token(id)?;
    let device = sim()
        .current_device()
        .map_err(|f| {
            fail(
                r::INVALID_USAGE,
                format!(
                    "{what} (rank {rank} of {nranks}): {}: NCCL takes its GPU from the current \
                     context",
                    f.message
                ),
            )
        })?
        .ordinal;
    let mut seg = Segment::map(&seg_dir(), &token, true)?;
    let sh = seg.sh();
    if let Err(n) =
        sh.header
            .nranks
            .compare_exchange(0, nranks as u64, Ordering::AcqRel, Ordering::Acquire)
    {
        if n != nranks as u64 {
            return Err(fail(
                r::INVALID_USAGE,
                format!(
                    "{what}: rank {rank} says the communicator has {nranks} ranks, another rank \
                     said {n}"
                ),
            ));
        }
    }
    let slot = &sh.slots[rank];
    if let Err(st) =
        slot.state
            .compare_exchange(EMPTY, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
    {
        let pid = slot.pid.load(Ordering::Relaxed);
        return Err(fail(
            r::INVALID_USAGE,
            format!(
                "{what}: rank {rank} of this unique id has joined already (pid {pid}{}, state \
                 {st}): each rank joins once, and an id serves one communicator",
                if pid_alive(pid) {
                    ""
                } else {
                    ", no longer running"
                }
            ),
        ));
    }
    slot.pid.store(std::process::id() as u64, Ordering::Relaxed);
    slot.device.store(device as u64, Ordering::Relaxed);
    for a in [
        &slot.posted,
        &slot.consumed,
        &slot.bytes,
        &slot.done,
        &slot.msg_len,
    ] {
        a.store(0, Ordering::Relaxed);
    }
    let give_up = |seg: &Segment, code: ncclResult_t, msg: String| {
        let s = &seg.sh().slots[rank];
        s.set_msg(&msg);
        s.state.store(ABORTED, Ordering::Release);
        seg.cleanup_if_last(nranks);
        fail(
            code,
            format!("{what} (rank {rank} of {nranks}, cuda:{device}): {msg}"),
        )
    };
    // The data file exists before the slot says JOINED, so peers can open it.
    let dp = data_path(&seg.dir, &seg.token, rank);
    match OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&dp)
    {
        Ok(f) => seg.own = Some(f),
        Err(e) => {
            let msg = format!("creating {}: {e}", dp.display());
            return Err(give_up(&seg, r::SYSTEM_ERROR, msg));
        }
    }
    let sh = seg.sh();
    let slot = &sh.slots[rank];
    slot.state.store(JOINED, Ordering::Release);
    let timeout = timeout_from_env();
    let joined = wait_all(
        sh,
        rank,
        nranks,
        timeout,
        None,
        &|| "join (call ncclCommInitRank with this unique id)".into(),
        // A rank that joined and left already counts: the first call reports it.
        &|s| s.state.load(Ordering::Acquire) >= JOINED,
    );
    if let Err((code, msg)) = joined {
        return Err(give_up(&seg, code, msg));
    }
    // Two ranks on one GPU is a launch bug NCCL refuses too.
    for a in 0..nranks {
        for b in a + 1..nranks {
            let (da, db) = (
                sh.slots[a].device.load(Ordering::Relaxed),
                sh.slots[b].device.load(Ordering::Relaxed),
            );
            if da == db {
                let msg = format!(
                    "ranks {a} and {b} are both on cuda:{da}: each rank needs a GPU of its own"
                );
                return Err(give_up(&seg, r::INVALID_USAGE, msg));
            }
        }
    }
    let mut peers = Vec::with_capacity(nranks);
    for p in 0..nranks {
        if p == rank {
            peers.push(None);
            continue;
        }
        let path = data_path(&seg.dir, &seg.token, p);
        match File::open(&path) {
            Ok(f) => peers.push(Some(f)),
            Err(e) => {
                let msg = format!("opening rank {p}'s data file {}: {e}", path.display());
                return Err(give_up(&seg, r::SYSTEM_ERROR, msg));
            }
        }
    }
    seg.peers = peers;
    let handle = NEXT_HANDLE.fetch_add(16, Ordering::Relaxed);
    let comm = Arc::new(Comm {
        handle,
        rank,
        nranks,
        device,
        seg,
        timeout,
        issued: AtomicU64::new(0),
        executed: AtomicU64::new(0),
        aborted: AtomicBool::new(false),
        left: AtomicBool::new(false),
        failure: Mutex::new(None),
        last: Mutex::new(LastErrors::default()),
        streams: Mutex::new(Vec::new()),
    });
    registry().lock().unwrap().insert(handle, comm.clone());
    Ok(comm)
}

// ---------------------------------------------------------------- reductions

/// Inputs widened for reduction: f16, bf16 and f32 in f32 (rounded once at the end), f64 in
/// f64, integers in 64 bits with wrapping arithmetic (the same bits as the narrow type's).
enum Acc {
    F(Vec<f32>),
    D(Vec<f64>),
    I(Vec<i64>),
    U(Vec<u64>),
}

fn decode(ty: Ty, b: &[u8]) -> Acc {
    fn arr<const N: usize>(c: &[u8]) -> [u8; N] {
        c.try_into().expect("chunk of N bytes")
    }
    match ty {
        Ty::F16 => Acc::F(
            b.chunks_exact(2)
                .map(|c| half::f16::from_le_bytes(arr(c)).to_f32())
                .collect(),
        ),
        Ty::Bf16 => Acc::F(
            b.chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes(arr(c)).to_f32())
                .collect(),
        ),
        Ty::F32 => Acc::F(
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes(arr(c)))
                .collect(),
        ),
        Ty::F64 => Acc::D(
            b.chunks_exact(8)
                .map(|c| f64::from_le_bytes(arr(c)))
                .collect(),
        ),
        Ty::I8 => Acc::I(b.iter().map(|&x| x as i8 as i64).collect()),
        Ty::I32 => Acc::I(
            b.chunks_exact(4)
                .map(|c| i32::from_le_bytes(arr(c)) as i64)
                .collect(),
        ),
        Ty::I64 => Acc::I(
            b.chunks_exact(8)
                .map(|c| i64::from_le_bytes(arr(c)))
                .collect(),
        ),
        Ty::U8 => Acc::U(b.iter().map(|&x| x as u64).collect()),
        Ty::U32 => Acc::U(
            b.chunks_exact(4)
                .map(|c| u32::from_le_bytes(arr(c)) as u64)
                .collect(),
        ),
        Ty::U64 => Acc::U(
            b.chunks_exact(8)
                .map(|c| u64::from_le_bytes(arr(c)))
                .collect(),
        ),
    }
}

/// max/min that return NaN when either side is NaN, so a NaN on one rank is not hidden.
fn float_op<T: Copy + PartialOrd + std::ops::Add<Output = T> + std::ops::Mul<Output = T>>(
    op: RedOp,
    a: T,
    b: T,
    is_nan: fn(T) -> bool,
) -> T {
    match op {
        RedOp::Sum | RedOp::Avg => a + b,
        RedOp::Prod => a * b,
        RedOp::Max | RedOp::Min if is_nan(a) => a,
        RedOp::Max | RedOp::Min if is_nan(b) => b,
        RedOp::Max => {
            if b > a {
                b
            } else {
                a
            }
        }
        RedOp::Min => {
            if b < a {
                b
            } else {
                a
            }
        }
    }
}

fn combine(acc: &mut Acc, x: Acc, op: RedOp) {
    match (acc, x) {
        (Acc::F(a), Acc::F(b)) => a
            .iter_mut()
            .zip(b)
            .for_each(|(a, b)| *a = float_op(op, *a, b, f32::is_nan)),
        (Acc::D(a), Acc::D(b)) => a
            .iter_mut()
            .zip(b)
            .for_each(|(a, b)| *a = float_op(op, *a, b, f64::is_nan)),
        (Acc::I(a), Acc::I(b)) => a.iter_mut().zip(b).for_each(|(a, b)| {
            *a = match op {
                RedOp::Sum | RedOp::Avg => a.wrapping_add(b),
                RedOp::Prod => a.wrapping_mul(b),
                RedOp::Max => (*a).max(b),
                RedOp::Min => (*a).min(b),
            }
        }),
        (Acc::U(a), Acc::U(b)) => a.iter_mut().zip(b).for_each(|(a, b)| {
            *a = match op {
                RedOp::Sum | RedOp::Avg => a.wrapping_add(b),
                RedOp::Prod => a.wrapping_mul(b),
                RedOp::Max => (*a).max(b),
                RedOp::Min => (*a).min(b),
            }
        }),
        _ => unreachable!("inputs of one call decode to one accumulator kind"),
    }
}

/// The reduced values in `ty`, rounded once; ncclAvg divides the sum by `n` (integers: the
/// sum wrapped to the type, then divided, truncating).
fn finish(acc: Acc, ty: Ty, op: RedOp, n: usize) -> Vec<u8> {
    let avg = op == RedOp::Avg;
    let mut out = Vec::new();
    match acc {
        Acc::F(v) => {
            for x in v {
                let x = if avg { x / n as f32 } else { x };
                match ty {
                    Ty::F16 => out.extend(half::f16::from_f32(x).to_le_bytes()),
                    Ty::Bf16 => out.extend(half::bf16::from_f32(x).to_le_bytes()),
                    _ => out.extend(x.to_le_bytes()),
                }
            }
        }
        Acc::D(v) => {
            for x in v {
                out.extend((if avg { x / n as f64 } else { x }).to_le_bytes());
            }
        }
        Acc::I(v) => {
            for x in v {
                let w = match ty {
                    Ty::I8 => x as i8 as i64,
                    Ty::I32 => x as i32 as i64,
                    _ => x,
                };
                let w = if avg { w / n as i64 } else { w };
                match ty {
                    Ty::I8 => out.extend((w as i8).to_le_bytes()),
                    Ty::I32 => out.extend((w as i32).to_le_bytes()),
                    _ => out.extend(w.to_le_bytes()),
                }
            }
        }
        Acc::U(v) => {
            for x in v {
                let w = match ty {
                    Ty::U8 => x as u8 as u64,
                    Ty::U32 => x as u32 as u64,
                    _ => x,
                };
                let w = if avg { w / n as u64 } else { w };
                match ty {
                    Ty::U8 => out.extend((w as u8).to_le_bytes()),
                    Ty::U32 => out.extend((w as u32).to_le_bytes()),
                    _ => out.extend(w.to_le_bytes()),
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------- executing a call

/// A checked call, numbered when issued.
#[derive(Clone, Copy)]
struct Call {
    desc: Desc,
    send: u64,
    recv: u64,
    seq: u64,
}

type XRes<T> = Result<T, (ncclResult_t, String)>;

impl Comm {
    /// Bytes `[off, off + len)` of what rank `p` posted for the current call.
    fn posted_bytes(&self, p: usize, mine: &[u8], off: usize, len: usize) -> XRes<Vec<u8>> {
        if p == self.rank {
            return Ok(mine[off..off + len].to_vec());
        }
        let posted = self.seg.sh().slots[p].bytes.load(Ordering::Acquire) as usize;
        if off + len > posted {
            return Err((
                r::INTERNAL_ERROR,
                format!("rank {p} posted {posted} bytes, {} needed", off + len),
            ));
        }
        let f = self.seg.peers[p].as_ref().expect("peer data file open");
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, off as u64).map_err(|e| {
            (
                r::SYSTEM_ERROR,
                format!("reading rank {p}'s posted data: {e}"),
            )
        })?;
        Ok(buf)
    }

    /// The reduction over ranks (in rank order) of bytes `[off, off + len)` of each rank's post.
    fn reduce_posted(&self, mine: &[u8], off: usize, len: usize, d: &Desc) -> XRes<Vec<u8>> {
        let op = d.op.expect("reductions have an operation");
        let mut acc = decode(d.ty, &self.posted_bytes(0, mine, off, len)?);
        for p in 1..self.nranks {
            combine(
                &mut acc,
                decode(d.ty, &self.posted_bytes(p, mine, off, len)?),
                op,
            );
        }
        Ok(finish(acc, d.ty, op, self.nranks))
    }

    /// One call, at execution time: read the input, post it, meet the peers, compute, write the
    /// output, and wait until the peers are done with this rank's post.
    fn exchange(&self, dev: &Device, c: &Call) -> XRes<()> {
        let d = &c.desc;
        let (me, w) = (self.rank, self.nranks);
        let sz = d.ty.size();
        let n = d.count as usize;
        let root = d.root.map(|r| r as usize);
        let send_elems = match d.kind {
            Kind::AllReduce | Kind::AllGather | Kind::Reduce => n,
            Kind::ReduceScatter => n * w,
            Kind::Broadcast if root == Some(me) => n,
            Kind::Broadcast => 0,
        };
        let mut mine = vec![0u8; send_elems * sz];
        if send_elems > 0 {
            dev.mem.read(c.send, &mut mine).map_err(|f| {
                (
                    r::INVALID_ARGUMENT,
                    format!("reading sendbuff at {:#x}: {f}", c.send),
                )
            })?;
        }
        let slot = self.slot();
        let own = self
            .seg
            .own
            .as_ref()
            .expect("own data file created at init");
        own.write_all_at(&mine, 0).map_err(|e| {
            (
                r::SYSTEM_ERROR,
                format!("posting {} bytes to this rank's data file: {e}", mine.len()),
            )
        })?;
        for (a, v) in slot.desc.iter().zip(d.raw()) {
            a.store(v, Ordering::Relaxed);
        }
        slot.bytes.store(mine.len() as u64, Ordering::Relaxed);
        slot.posted.store(c.seq, Ordering::Release);

        let sh = self.seg.sh();
        wait_all(
            sh,
            me,
            w,
            self.timeout,
            Some(&self.aborted),
            &|| format!("reach call {} ({d}) on the communicator", c.seq),
            &|s| s.posted.load(Ordering::Acquire) >= c.seq,
        )?;
        // Every rank compares every call with rank 0's, so all fail with the same message.
        let first = sh.slots[0].desc();
        if let Some(p) = (1..w).find(|&p| sh.slots[p].desc() != first) {
            return Err((
                r::INVALID_USAGE,
                format!(
                    "calls out of step: at call {} on the communicator rank 0 called {} while \
                     rank {p} called {}",
                    c.seq,
                    show_raw(first),
                    show_raw(sh.slots[p].desc())
                ),
            ));
        }

        let output = match d.kind {
            Kind::AllReduce => Some(self.reduce_posted(&mine, 0, n * sz, d)?),
            Kind::ReduceScatter => Some(self.reduce_posted(&mine, me * n * sz, n * sz, d)?),
            Kind::Reduce if root == Some(me) => Some(self.reduce_posted(&mine, 0, n * sz, d)?),
            Kind::Reduce => None,
            Kind::AllGather => {
                let mut o = Vec::with_capacity(n * sz * w);
                for p in 0..w {
                    o.extend(self.posted_bytes(p, &mine, 0, n * sz)?);
                }
                Some(o)
            }
            Kind::Broadcast => {
                let rt = root.expect("broadcast has a root");
                Some(self.posted_bytes(rt, &mine, 0, n * sz)?)
            }
        };
        if let Some(o) = output {
            dev.mem.write(c.recv, &o).map_err(|f| {
                (
                    r::INVALID_ARGUMENT,
                    format!("writing recvbuff at {:#x}: {f}", c.recv),
                )
            })?;
        }
        slot.consumed.store(c.seq, Ordering::Release);
        wait_all(
            sh,
            me,
            w,
            self.timeout,
            Some(&self.aborted),
            &|| format!("finish call {} ({d}) on the communicator", c.seq),
            &|s| s.consumed.load(Ordering::Acquire) >= c.seq,
        )
    }

    /// A queued job: the calls of one issue (one call, or a group's calls on this
    /// communicator), in order.
    fn run(&self, dev: &Device, calls: &[Call]) -> Res<()> {
        for c in calls {
            if self.left.load(Ordering::Acquire) {
                eprintln!(
                    "gpu-sim: {} call {} ({}): skipped, the communicator was {} before it ran",
                    self.who(),
                    c.seq,
                    c.desc,
                    if self.aborted.load(Ordering::Acquire) {
                        "aborted"
                    } else {
                        "destroyed"
                    }
                );
                continue;
            }
            let r = match self.failure.lock().unwrap().clone() {
                Some((code, m)) => Err((code, format!("the communicator failed earlier: {m}"))),
                None => {
                    let expect = self.executed.load(Ordering::Acquire) + 1;
                    if c.seq != expect {
                        Err((
                            r::INVALID_USAGE,
                            format!(
                                "call {} ran before call {expect}: the calls of one communicator \
                                 must run in the order they were made (one stream, or streams \
                                 ordered by events)",
                                c.seq
                            ),
                        ))
                    } else {
                        self.exchange(dev, c)
                    }
                }
            };
            match r {
                Ok(()) => self.executed.store(c.seq, Ordering::Release),
                Err(_) if self.left.load(Ordering::Acquire) => {
                    eprintln!(
                        "gpu-sim: {} call {} ({}): cut short, the communicator was aborted",
                        self.who(),
                        c.seq,
                        c.desc
                    );
                    return Ok(());
                }
                Err((code, msg)) => {
                    let msg = format!("NCCL {} ({}, call {}): {msg}", c.desc, self.who(), c.seq);
                    self.set_failed(code, &msg);
                    return Err(Failure::new(code::LAUNCH_FAILED, msg));
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- issuing calls and groups

/// A checked call waiting to be issued (now, or at ncclGroupEnd).
struct Pending {
    comm: Arc<Comm>,
    stream: u64,
    desc: Desc,
    send: u64,
    recv: u64,
}

#[derive(Default)]
struct GroupState {
    depth: u32,
    pending: Vec<Pending>,
    /// The first call in the open group that failed its checks: the group is not issued.
    error: Option<String>,
}

thread_local! {
    /// NCCL's group state is per thread.
    static GROUP: RefCell<GroupState> = RefCell::new(GroupState::default());
}

/// Checks that `len` bytes at `addr` are device memory of the communicator's GPU.
fn check_buf(dev: &Device, addr: u64, len: u64, what: &str) -> NRes<()> {
    if let Err(f) = dev.mem.view().translate(addr, len) {
        let other = addr
            .checked_sub(BASE)
            .map(|o| o / DEVICE_SPAN)
            .filter(|&d| d != dev.ordinal as u64 && (d as usize) < sim().devices.len());
        let gpus = sim().devices.len() as u64;
        let msg = match other {
            Some(d) => format!(
                "{what} {addr:#x} is memory of cuda:{d}, not of the communicator's cuda:{}",
                dev.ordinal
            ),
            None if addr < BASE || addr >= BASE + gpus * DEVICE_SPAN => {
                format!("{what}: {f}: not a device address of any GPU (a host pointer?)")
            }
            None => format!("{what}: {f}"),
        };
        return Err(fail(r::INVALID_ARGUMENT, msg));
    }
    Ok(())
}

/// Checks a call's arguments now, as NCCL does before it enqueues; None for a count of 0 (no
/// operation, no call number).
fn check_call(
    h: ncclComm_t,
    stream: cudaStream_t,
    desc: Desc,
    send: u64,
    recv: u64,
) -> NRes<Option<Pending>> {
    let name = desc.kind.name();
    let comm = comm_of(h, name)?;
    let ctx = |m: String| format!("{desc} ({}): {m}", comm.who());
    if let Some((code, m)) = comm.failure.lock().unwrap().clone() {
        return Err(fail(
            code,
            ctx(format!("the communicator failed earlier: {m}")),
        ));
    }
    if let Some(root) = desc.root {
        if root as usize >= comm.nranks {
            return Err(fail(
                r::INVALID_ARGUMENT,
                ctx(format!("root {root} is not a rank of {}", comm.nranks)),
            ));
        }
    }
    let s = sim();
    let sdev = s.stream_device(stream as u64).map_err(|f| {
        fail(
            r::INVALID_ARGUMENT,
            ctx(format!("the stream: {}", f.message)),
        )
    })?;
    if sdev.ordinal != comm.device {
        return Err(fail(
            r::INVALID_ARGUMENT,
            ctx(format!(
                "the stream is on cuda:{}, the communicator on cuda:{}",
                sdev.ordinal, comm.device
            )),
        ));
    }
    if desc.count == 0 {
        return Ok(None);
    }
    let (me, w) = (comm.rank as u64, comm.nranks as u64);
    let sz = desc.ty.size() as u64;
    let root = desc.root.map(u64::from);
    let (send_n, recv_n) = match desc.kind {
        Kind::AllReduce => (Some(1), Some(1)),
        Kind::ReduceScatter => (Some(w), Some(1)),
        Kind::AllGather => (Some(1), Some(w)),
        Kind::Reduce => (Some(1), (root == Some(me)).then_some(1)),
        Kind::Broadcast => ((root == Some(me)).then_some(1), Some(1)),
    };
    let bytes = |mult: u64| {
        desc.count
            .checked_mul(mult)
            .and_then(|e| e.checked_mul(sz))
            .filter(|&b| b < DEVICE_SPAN)
            .ok_or_else(|| fail(r::INVALID_ARGUMENT, ctx("the count is too large".into())))
    };
    let sb = send_n.map(bytes).transpose()?;
    let rb = recv_n.map(bytes).transpose()?;
    if let Some(b) = sb {
        check_buf(sdev, send, b, &ctx("sendbuff".into()))?;
    }
    if let Some(b) = rb {
        check_buf(sdev, recv, b, &ctx("recvbuff".into()))?;
    }
    if let (Some(sb), Some(rb)) = (sb, rb) {
        let overlap = send < recv + rb && recv < send + sb;
        let in_place = match desc.kind {
            Kind::ReduceScatter => recv == send + me * rb,
            Kind::AllGather => send == recv + me * sb,
            _ => send == recv,
        };
        if overlap && !in_place {
            let form = match desc.kind {
                Kind::ReduceScatter => "recvbuff == sendbuff + rank·recvcount",
                Kind::AllGather => "sendbuff == recvbuff + rank·sendcount",
                _ => "sendbuff == recvbuff",
            };
            return Err(fail(
                r::INVALID_ARGUMENT,
                ctx(format!(
                    "sendbuff {send:#x} ({sb} bytes) and recvbuff {recv:#x} ({rb} bytes) overlap \
                     without being the in-place form ({form})"
                )),
            ));
        }
    }
    Ok(Some(Pending {
        comm,
        stream: stream as u64,
        desc,
        send,
        recv,
    }))
}

/// Numbers the calls and queues one job per communicator on its stream.
fn submit(calls: Vec<Pending>) -> NRes<()> {
    // Per communicator, in call order.
    let mut order: Vec<u64> = Vec::new();
    let mut by: HashMap<u64, Vec<Pending>> = HashMap::new();
    for p in calls {
        let h = p.comm.handle;
        if !by.contains_key(&h) {
            order.push(h);
        }
        by.entry(h).or_default().push(p);
    }
    if order.len() > 1 {
        // One thread driving two ranks of one communicator cannot work here: each rank's
        // calls run when its stream is waited for, one at a time.
        let mut seen: HashMap<(PathBuf, String), usize> = HashMap::new();
        for h in &order {
            let c = &by[h][0].comm;
            if let Some(other) = seen.insert((c.seg.dir.clone(), c.seg.token.clone()), c.rank) {
                return Err(fail(
                    r::INVALID_USAGE,
                    format!(
                        "ncclGroupEnd: the group has calls of ranks {other} and {} of one \
                         communicator: the simulator runs each rank's calls when its stream is \
                         waited for, so drive each rank from its own thread",
                        c.rank
                    ),
                ));
            }
        }
    }
    for h in order {
        let ps = by.remove(&h).expect("grouped");
        let comm = ps[0].comm.clone();
        let stream = ps[0].stream;
        if ps.iter().any(|p| p.stream != stream) {
            return Err(fail(
                r::INVALID_USAGE,
                format!(
                    "ncclGroupEnd: calls of one communicator ({}) on several streams in one \
                     group are not modelled by the simulator",
                    comm.who()
                ),
            ));
        }
        let first = comm.issued.fetch_add(ps.len() as u64, Ordering::AcqRel) + 1;
        let calls: Vec<Call> = ps
            .iter()
            .enumerate()
            .map(|(i, p)| Call {
                desc: p.desc,
                send: p.send,
                recv: p.recv,
                seq: first + i as u64,
            })
            .collect();
        let label = if calls.len() == 1 {
            format!("{} call {}, {}", calls[0].desc, first, comm.who())
        } else {
            format!(
                "NCCL group [{}] calls {first}-{}, {}",
                calls
                    .iter()
                    .map(|c| c.desc.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                first + calls.len() as u64 - 1,
                comm.who()
            )
        };
        {
            let mut st = comm.streams.lock().unwrap();
            if !st.contains(&stream) {
                st.push(stream);
            }
        }
        let c2 = comm.clone();
        let queued = sim().enqueue(stream, label, Box::new(move |dev| c2.run(dev, &calls)));
        if let Err(f) = queued {
            // Not queued: hand the numbers back so the next call keeps in step.
            comm.issued.fetch_sub(ps.len() as u64, Ordering::AcqRel);
            return Err(cuda_fail(
                &format!("queueing NCCL calls ({})", comm.who()),
                f,
            ));
        }
    }
    Ok(())
}

/// Issues a collective now, or adds it to the open group.
fn issue(
    h: ncclComm_t,
    stream: cudaStream_t,
    desc: impl FnOnce() -> NRes<Desc>,
    send: *const c_void,
    recv: *mut c_void,
) -> NRes<()> {
    let checked = desc().and_then(|d| check_call(h, stream, d, send as u64, recv as u64));
    GROUP.with(|g| {
        let mut g = g.borrow_mut();
        if g.depth == 0 {
            drop(g);
            return match checked? {
                Some(p) => submit(vec![p]),
                None => Ok(()),
            };
        }
        match checked {
            Ok(Some(p)) => g.pending.push(p),
            Ok(None) => {}
            Err(e) => {
                g.error.get_or_insert_with(|| e.message.clone());
                return Err(e);
            }
        }
        Ok(())
    })
}

// ---------------------------------------------------------------- the exports

/// # Safety
/// `version` is NULL or points at an int.
#[no_mangle]
pub unsafe extern "C" fn ncclGetVersion(version: *mut c_int) -> ncclResult_t {
    // SAFETY: caller contract.
    guard(|| unsafe { out(version, VERSION, "ncclGetVersion") })
}

/// A fresh id: a marker and 16 bytes that name the rendezvous files.
///
/// # Safety
/// `id` is NULL or points at an ncclUniqueId.
#[no_mangle]
pub unsafe extern "C" fn ncclGetUniqueId(id: *mut ncclUniqueId) -> ncclResult_t {
    guard(|| {
        sweep_stale(&seg_dir());
        let mut internal = [0 as c_char; ID_BYTES];
        let token = fresh_token();
        let bytes = ID_MAGIC.iter().chain(token.iter());
        for (d, &s) in internal.iter_mut().zip(bytes) {
            *d = s as c_char;
        }
        // SAFETY: caller contract.
        unsafe { out(id, ncclUniqueId { internal }, "ncclGetUniqueId") }
    })
}

/// Joins rank `rank` of `nranks` on the current context's GPU; returns once every rank has
/// joined (or fails naming those that did not within the timeout).
///
/// # Safety
/// `comm` is NULL or points at an ncclComm_t.
#[no_mangle]
pub unsafe extern "C" fn ncclCommInitRank(
    comm: *mut ncclComm_t,
    nranks: c_int,
    comm_id: ncclUniqueId,
    rank: c_int,
) -> ncclResult_t {
    guard(|| {
        if comm.is_null() {
            return Err(fail(
                r::INVALID_ARGUMENT,
                "ncclCommInitRank: the output pointer is NULL",
            ));
        }
        let c = init_rank(nranks, &comm_id, rank)?;
        // SAFETY: caller contract (checked non-NULL above).
        unsafe { out(comm, c.handle as ncclComm_t, "ncclCommInitRank") }
    })
}

/// As ncclCommInitRank; the config (blocking, CTA counts, ...) is ignored: init always blocks.
///
/// # Safety
/// As ncclCommInitRank.
#[no_mangle]
pub unsafe extern "C" fn ncclCommInitRankConfig(
    comm: *mut ncclComm_t,
    nranks: c_int,
    comm_id: ncclUniqueId,
    rank: c_int,
    _config: *mut c_void,
) -> ncclResult_t {
    // SAFETY: caller contract.
    unsafe { ncclCommInitRank(comm, nranks, comm_id, rank) }
}

/// Completes the communicator's queued calls (runs their streams).
#[no_mangle]
pub extern "C" fn ncclCommFinalize(comm: ncclComm_t) -> ncclResult_t {
    guard(|| comm_of(comm, "ncclCommFinalize")?.flush())
}

/// Completes the queued calls, then leaves; the last rank out removes the rendezvous files.
#[no_mangle]
pub extern "C" fn ncclCommDestroy(comm: ncclComm_t) -> ncclResult_t {
    guard(|| {
        let c = comm_of(comm, "ncclCommDestroy")?;
        let flushed = c.flush();
        registry().lock().unwrap().remove(&c.handle);
        c.depart(DESTROYED);
        flushed
    })
}

/// Leaves at once: queued calls are skipped, peers waiting for this rank fail.
#[no_mangle]
pub extern "C" fn ncclCommAbort(comm: ncclComm_t) -> ncclResult_t {
    guard(|| {
        let c = comm_of(comm, "ncclCommAbort")?;
        c.aborted.store(true, Ordering::Release);
        registry().lock().unwrap().remove(&c.handle);
        c.depart(ABORTED);
        Ok(())
    })
}

/// # Safety
/// `async_error` is NULL or points at an ncclResult_t.
#[no_mangle]
pub unsafe extern "C" fn ncclCommGetAsyncError(
    comm: ncclComm_t,
    async_error: *mut ncclResult_t,
) -> ncclResult_t {
    guard(|| {
        let c = comm_of(comm, "ncclCommGetAsyncError")?;
        let code = c
            .failure
            .lock()
            .unwrap()
            .as_ref()
            .map_or(r::SUCCESS, |f| f.0);
        // SAFETY: caller contract.
        unsafe { out(async_error, code, "ncclCommGetAsyncError") }
    })
}

/// # Safety
/// `count` is NULL or points at an int.
#[no_mangle]
pub unsafe extern "C" fn ncclCommCount(comm: ncclComm_t, count: *mut c_int) -> ncclResult_t {
    guard(|| {
        let c = comm_of(comm, "ncclCommCount")?;
        // SAFETY: caller contract.
        unsafe { out(count, c.nranks as c_int, "ncclCommCount") }
    })
}

/// # Safety
/// `device` is NULL or points at an int.
#[no_mangle]
pub unsafe extern "C" fn ncclCommCuDevice(comm: ncclComm_t, device: *mut c_int) -> ncclResult_t {
    guard(|| {
        let c = comm_of(comm, "ncclCommCuDevice")?;
        // SAFETY: caller contract.
        unsafe { out(device, c.device as c_int, "ncclCommCuDevice") }
    })
}

/// # Safety
/// `rank` is NULL or points at an int.
#[no_mangle]
pub unsafe extern "C" fn ncclCommUserRank(comm: ncclComm_t, rank: *mut c_int) -> ncclResult_t {
    guard(|| {
        let c = comm_of(comm, "ncclCommUserRank")?;
        // SAFETY: caller contract.
        unsafe { out(rank, c.rank as c_int, "ncclCommUserRank") }
    })
}

fn reduce_desc(kind: Kind, count: usize, ty: c_int, op: c_int, root: Option<c_int>) -> NRes<Desc> {
    Ok(Desc {
        kind,
        count: count as u64,
        ty: Ty::from_raw(ty)?,
        op: Some(RedOp::from_raw(op)?),
        root: root.map(root_of).transpose()?,
    })
}

fn root_of(root: c_int) -> NRes<u32> {
    u32::try_from(root).map_err(|_| fail(r::INVALID_ARGUMENT, format!("root {root} is negative")))
}

/// Device pointers are only checked and used in stream order; never dereferenced here.
#[no_mangle]
pub extern "C" fn ncclAllReduce(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: c_int,
    op: c_int,
    comm: ncclComm_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    guard(|| {
        let d = || reduce_desc(Kind::AllReduce, count, datatype, op, None);
        issue(comm, stream, d, sendbuff, recvbuff)
    })
}

#[no_mangle]
pub extern "C" fn ncclReduceScatter(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    recvcount: usize,
    datatype: c_int,
    op: c_int,
    comm: ncclComm_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    guard(|| {
        let d = || reduce_desc(Kind::ReduceScatter, recvcount, datatype, op, None);
        issue(comm, stream, d, sendbuff, recvbuff)
    })
}

#[no_mangle]
pub extern "C" fn ncclAllGather(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    sendcount: usize,
    datatype: c_int,
    comm: ncclComm_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    guard(|| {
        let d = || {
            Ok(Desc {
                kind: Kind::AllGather,
                count: sendcount as u64,
                ty: Ty::from_raw(datatype)?,
                op: None,
                root: None,
            })
        };
        issue(comm, stream, d, sendbuff, recvbuff)
    })
}

/// recvbuff is used on the root only (others may pass anything).
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub extern "C" fn ncclReduce(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: c_int,
    op: c_int,
    root: c_int,
    comm: ncclComm_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    guard(|| {
        let d = || reduce_desc(Kind::Reduce, count, datatype, op, Some(root));
        issue(comm, stream, d, sendbuff, recvbuff)
    })
}

/// sendbuff is used on the root only (others may pass anything).
#[no_mangle]
pub extern "C" fn ncclBroadcast(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: c_int,
    root: c_int,
    comm: ncclComm_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    guard(|| {
        let d = || {
            Ok(Desc {
                kind: Kind::Broadcast,
                count: count as u64,
                ty: Ty::from_raw(datatype)?,
                op: None,
                root: Some(root_of(root)?),
            })
        };
        issue(comm, stream, d, sendbuff, recvbuff)
    })
}

/// The in-place broadcast of older NCCL.
#[no_mangle]
pub extern "C" fn ncclBcast(
    buff: *mut c_void,
    count: usize,
    datatype: c_int,
    root: c_int,
    comm: ncclComm_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    ncclBroadcast(buff, buff, count, datatype, root, comm, stream)
}

#[no_mangle]
pub extern "C" fn ncclGroupStart() -> ncclResult_t {
    guard(|| {
        GROUP.with(|g| {
            let mut g = g.borrow_mut();
            if g.depth == 0 {
                g.pending.clear();
                g.error = None;
            }
            g.depth += 1;
        });
        Ok(())
    })
}

/// Issues the group's calls when the outermost group closes; a group in which a call failed
/// its checks is not issued at all.
#[no_mangle]
pub extern "C" fn ncclGroupEnd() -> ncclResult_t {
    guard(|| {
        let (pending, error) = GROUP.with(|g| {
            let mut g = g.borrow_mut();
            if g.depth == 0 {
                return Err(fail(
                    r::INVALID_USAGE,
                    "ncclGroupEnd without a matching ncclGroupStart",
                ));
            }
            g.depth -= 1;
            if g.depth > 0 {
                return Ok((Vec::new(), None));
            }
            Ok((std::mem::take(&mut g.pending), g.error.take()))
        })?;
        if let Some(e) = error {
            return Err(fail(
                r::INVALID_ARGUMENT,
                format!(
                    "ncclGroupEnd: the group was not issued ({} calls dropped): a call in it \
                     failed: {e}",
                    pending.len()
                ),
            ));
        }
        if pending.is_empty() {
            return Ok(());
        }
        submit(pending)
    })
}

fn error_text(code: ncclResult_t) -> &'static CStr {
    match code {
        r::SUCCESS => c"no error",
        r::UNHANDLED_CUDA_ERROR => c"a CUDA call failed (ncclGetLastError has the details)",
        r::SYSTEM_ERROR => c"a system call failed (ncclGetLastError has the details)",
        r::INTERNAL_ERROR => c"internal error (ncclGetLastError has the details)",
        r::INVALID_ARGUMENT => c"invalid argument (ncclGetLastError has the details)",
        r::INVALID_USAGE => c"invalid usage (ncclGetLastError has the details)",
        r::REMOTE_ERROR => c"a peer rank failed, left or exited (ncclGetLastError has the details)",
        r::IN_PROGRESS => c"operation in progress",
        _ => c"unknown ncclResult_t",
    }
}

#[no_mangle]
pub extern "C" fn ncclGetErrorString(result: ncclResult_t) -> *const c_char {
    error_text(result).as_ptr()
}

/// The latest error message that concerns the caller: the later of this thread's last failed
/// call and the communicator's last failed operation (so ranks that are threads of one process
/// each see their own), else the process's latest; "" when none.
#[no_mangle]
pub extern "C" fn ncclGetLastError(comm: ncclComm_t) -> *const c_char {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let of_comm = (!comm.is_null())
            .then(|| registry().lock().unwrap().get(&(comm as u64)).cloned())
            .flatten()
            .and_then(|c| c.last.lock().unwrap().latest());
        let of_thread = THREAD_LAST.with(|t| t.borrow().latest());
        [of_comm, of_thread]
            .into_iter()
            .flatten()
            .max_by_key(|e| e.0)
            .or_else(|| global_last().lock().unwrap().latest())
            .map(|e| e.1)
    }));
    r.ok().flatten().unwrap_or(c"".as_ptr())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer that finishes the call and leaves between the waiter's two looks (its progress,
    /// then its state) has not failed: the wait ends well. (Seen as a spurious "rank 1 aborted
    /// its communicator after 46 calls" at the end of a 3-rank `pretrain --dist`.)
    #[test]
    fn a_peer_that_gets_ready_and_leaves_at_once_is_not_an_error() {
        // SAFETY: Shared is atomics only, for which all-zero bytes are a valid value.
        let sh: Box<Shared> = unsafe { Box::<Shared>::new_zeroed().assume_init() };
        for s in &sh.slots[..3] {
            s.state.store(JOINED, Ordering::Relaxed);
        }
        sh.slots[2].consumed.store(1, Ordering::Relaxed);
        let looked = AtomicBool::new(false);
        let ready = |s: &Slot| {
            let r = s.consumed.load(Ordering::Acquire) >= 1;
            if !r && !looked.swap(true, Ordering::Relaxed) {
                // Rank 1, right after this look: it finishes the call, then aborts.
                s.consumed.store(1, Ordering::Release);
                s.done.store(1, Ordering::Relaxed);
                s.state.store(ABORTED, Ordering::Release);
            }
            r
        };
        let got = wait_all(
            &sh,
            0,
            3,
            Duration::from_secs(5),
            None,
            &|| "finish call 1".into(),
            &ready,
        );
        assert!(
            looked.load(Ordering::Relaxed),
            "the peer was never waited for"
        );
        assert!(got.is_ok(), "{:?}", got.err());
    }
}
