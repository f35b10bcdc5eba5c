//! gpu-sim's NCCL, called as the engine calls it through cudarc: ranks as threads of this
//! process (each on its own simulated GPU) and as processes (this test binary re-executed as
//! child ranks), every collective and type against values computed here, in-place forms,
//! grouped uneven reduce/broadcast, calls out of step, a missing event wait, dead peers.
//!
//! Every test takes GPUs no other test uses (a failing collective leaves its GPU's context
//! faulted, and two tests sharing GPUs would share their queues).

use gpu_sim::driver::*;
use gpu_sim::nccl::*;
use std::ffi::{c_void, CStr};
use std::fmt::Debug;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;

type Handle = *mut c_void;

const SUM: i32 = 0;
const PROD: i32 = 1;
const MAX: i32 = 2;
const MIN: i32 = 3;
const AVG: i32 = 4;
const F32: i32 = 7;
const F16: i32 = 6;
const BF16: i32 = 9;
const I64: i32 = 4;

/// The environment every test (and child rank) runs with: 64 GPUs, a rendezvous directory for
/// the tests (checked for files left behind), a timeout that bounds a broken test.
fn setup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::env::set_var("GPU_SIM_GPUS", "64");
        if std::env::var_os("GPU_SIM_NCCL_DIR").is_none() {
            let d = std::env::temp_dir().join("gpu-sim-nccl-tests");
            std::fs::create_dir_all(&d).unwrap();
            std::env::set_var("GPU_SIM_NCCL_DIR", &d);
        }
        if std::env::var_os("GPU_SIM_NCCL_TIMEOUT").is_none() {
            std::env::set_var("GPU_SIM_NCCL_TIMEOUT", "120");
        }
    });
}

fn nccl_dir() -> PathBuf {
    std::env::var_os("GPU_SIM_NCCL_DIR").unwrap().into()
}

/// `n` GPUs no other test of this process uses.
fn devices(n: usize) -> Vec<u32> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let first = NEXT.fetch_add(n as u32, Ordering::Relaxed);
    assert!(first + n as u32 <= 64, "out of simulated GPUs");
    (first..first + n as u32).collect()
}

fn cu_detail(rc: i32) -> String {
    let mut p: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: `p` is a valid out-pointer; the string returned is NUL-terminated and static or
    // kept by the simulator.
    unsafe {
        cuGetErrorString(rc, &mut p);
        if p.is_null() {
            String::new()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

fn ck(rc: i32, what: &str) {
    assert_eq!(rc, 0, "{what}: CUresult {rc}: {}", cu_detail(rc));
}

fn last_error(comm: ncclComm_t) -> String {
    // SAFETY: ncclGetLastError returns a NUL-terminated string kept by the library.
    unsafe { CStr::from_ptr(ncclGetLastError(comm)) }
        .to_string_lossy()
        .into_owned()
}

fn nk(rc: i32, comm: ncclComm_t, what: &str) {
    assert_eq!(rc, 0, "{what}: ncclResult {rc}: {}", last_error(comm));
}

fn new_id() -> ncclUniqueId {
    let mut id = ncclUniqueId {
        internal: [0; ID_BYTES],
    };
    // SAFETY: `id` is a valid out-pointer.
    assert_eq!(unsafe { ncclGetUniqueId(&mut id) }, 0);
    id
}

fn id_hex(id: &ncclUniqueId) -> String {
    id.internal
        .iter()
        .map(|&c| format!("{:02x}", c as u8))
        .collect()
}

fn id_from_hex(s: &str) -> ncclUniqueId {
    let mut id = ncclUniqueId {
        internal: [0; ID_BYTES],
    };
    for (i, d) in id.internal.iter_mut().enumerate() {
        *d = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap() as _;
    }
    id
}

/// Files of this id's rendezvous still present.
fn leftovers(id: &ncclUniqueId) -> Vec<String> {
    let token: String = id.internal[16..32]
        .iter()
        .map(|&c| format!("{:02x}", c as u8))
        .collect();
    std::fs::read_dir(nccl_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(&token))
        .collect()
}

/// One rank: its GPU made current on this thread, its communicator, a non-blocking stream
/// (as the engine's side stream). Aborts the communicator when dropped undestroyed (a panicking
/// rank then fails its peers at once instead of leaving them to time out).
struct Rank {
    rank: usize,
    world: usize,
    dev: u32,
    comm: ncclComm_t,
    stream: Handle,
}

impl Rank {
    fn bind(dev: u32) {
        let mut ctx: Handle = std::ptr::null_mut();
        // SAFETY: `ctx` is a valid out-pointer.
        ck(
            unsafe { cuDevicePrimaryCtxRetain(&mut ctx, dev as i32) },
            "retain",
        );
        ck(cuCtxSetCurrent(ctx), "set current");
    }

    fn join(dev: u32, rank: usize, world: usize, id: ncclUniqueId) -> Rank {
        Self::try_join(dev, rank, world, id).unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_join(dev: u32, rank: usize, world: usize, id: ncclUniqueId) -> Result<Rank, String> {
        Self::bind(dev);
        let mut comm: ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer.
        let rc = unsafe { ncclCommInitRank(&mut comm, world as i32, id, rank as i32) };
        if rc != 0 {
            return Err(format!("init rank {rank}: {rc}: {}", last_error(comm)));
        }
        let mut stream: Handle = std::ptr::null_mut();
        // SAFETY: `stream` is a valid out-pointer; flags 1 = CU_STREAM_NON_BLOCKING.
        ck(unsafe { cuStreamCreate(&mut stream, 1) }, "stream");
        Ok(Rank {
            rank,
            world,
            dev,
            comm,
            stream,
        })
    }

    fn alloc(&self, bytes: usize) -> u64 {
        let mut p = 0u64;
        // SAFETY: `p` is a valid out-pointer.
        ck(unsafe { cuMemAlloc_v2(&mut p, bytes.max(1)) }, "alloc");
        p
    }

    fn upload(&self, data: &[u8]) -> u64 {
        let p = self.alloc(data.len());
        self.write(p, data);
        p
    }

    fn write(&self, p: u64, data: &[u8]) {
        // SAFETY: `data` holds data.len() readable bytes.
        ck(
            unsafe { cuMemcpyHtoD_v2(p, data.as_ptr() as *const c_void, data.len()) },
            "upload",
        );
    }

    /// Runs this rank's NCCL stream, then copies `n` bytes back.
    fn read(&self, p: u64, n: usize) -> Vec<u8> {
        self.sync();
        let mut out = vec![0u8; n];
        // SAFETY: `out` has room for n bytes.
        ck(
            unsafe { cuMemcpyDtoH_v2(out.as_mut_ptr() as *mut c_void, p, n) },
            "download",
        );
        out
    }

    fn sync(&self) {
        ck(cuStreamSynchronize(self.stream), "stream sync");
    }

    fn destroy(mut self) {
        nk(ncclCommDestroy(self.comm), self.comm, "destroy");
        self.comm = std::ptr::null_mut();
    }
}

impl Drop for Rank {
    fn drop(&mut self) {
        if !self.comm.is_null() {
            ncclCommAbort(self.comm);
        }
    }
}

/// Runs `f` on `n` ranks, each a thread on its own GPU, then destroys the communicators and
/// checks the rendezvous files are gone.
fn threads(n: usize, f: impl Fn(&Rank) + Sync) {
    setup();
    let devs = devices(n);
    let id = new_id();
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|r| {
                let (f, dev) = (&f, devs[r]);
                s.spawn(move || {
                    let rk = Rank::join(dev, r, n, id);
                    f(&rk);
                    rk.destroy();
                })
            })
            .collect();
        for (r, h) in hs.into_iter().enumerate() {
            if let Err(p) = h.join() {
                eprintln!("rank {r} failed");
                std::panic::resume_unwind(p);
            }
        }
    });
    assert_eq!(
        leftovers(&id),
        Vec::<String>::new(),
        "rendezvous files left"
    );
}

// ---------------------------------------------------------------- element types

/// An NCCL element type with the reference semantics: inputs reduced in rank order, f16 and
/// bf16 accumulated in f32 and rounded once, integers wrapping in their own width, avg = the
/// sum divided by the ranks (integers truncating).
trait El: Copy + Debug + Send + Sync + 'static {
    const DT: i32;
    const SIZE: usize;
    fn gen(rank: usize, i: usize) -> Self;
    fn reduce(op: i32, v: &[Self]) -> Self;
    fn put(self, out: &mut Vec<u8>);
    fn get(b: &[u8]) -> Self;
    fn bits(self) -> u64;
}

fn to_bytes<T: El>(v: &[T]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * T::SIZE);
    v.iter().for_each(|x| x.put(&mut out));
    out
}

fn from_bytes<T: El>(b: &[u8]) -> Vec<T> {
    b.chunks_exact(T::SIZE).map(T::get).collect()
}

fn mix(rank: usize, i: usize) -> u64 {
    (rank as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (i as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9)
}

macro_rules! int_el {
    ($t:ty, $dt:expr) => {
        impl El for $t {
            const DT: i32 = $dt;
            const SIZE: usize = std::mem::size_of::<$t>();
            fn gen(rank: usize, i: usize) -> Self {
                mix(rank, i) as $t
            }
            fn reduce(op: i32, v: &[Self]) -> Self {
                let mut a = v[0];
                for &x in &v[1..] {
                    a = match op {
                        SUM | AVG => a.wrapping_add(x),
                        PROD => a.wrapping_mul(x),
                        MAX => a.max(x),
                        _ => a.min(x),
                    };
                }
                if op == AVG {
                    a / v.len() as $t
                } else {
                    a
                }
            }
            fn put(self, out: &mut Vec<u8>) {
                out.extend(self.to_le_bytes());
            }
            fn get(b: &[u8]) -> Self {
                <$t>::from_le_bytes(b.try_into().unwrap())
            }
            fn bits(self) -> u64 {
                self as u64
            }
        }
    };
}
int_el!(i8, 0);
int_el!(u8, 1);
int_el!(i32, 2);
int_el!(u32, 3);
int_el!(i64, 4);
int_el!(u64, 5);

/// Multiples of 1/4 in [-2, 3.5]: exact in every float type, products of three stay small.
fn fgen(rank: usize, i: usize) -> f32 {
    ((i * 7 + rank * 13 + 3) % 23) as f32 / 4.0 - 2.0
}

fn fred(op: i32, v: &[f32]) -> f32 {
    let mut a = v[0];
    for &x in &v[1..] {
        a = match op {
            SUM | AVG => a + x,
            PROD => a * x,
            MAX if a.is_nan() || x.is_nan() => f32::NAN,
            MIN if a.is_nan() || x.is_nan() => f32::NAN,
            MAX => a.max(x),
            _ => a.min(x),
        };
    }
    if op == AVG {
        a / v.len() as f32
    } else {
        a
    }
}

impl El for f32 {
    const DT: i32 = F32;
    const SIZE: usize = 4;
    fn gen(rank: usize, i: usize) -> Self {
        // Not only quarters: sums that round, so the order of the sum matters.
        fgen(rank, i) + (mix(rank, i) % 1000) as f32 * 1e-3
    }
    fn reduce(op: i32, v: &[Self]) -> Self {
        fred(op, v)
    }
    fn put(self, out: &mut Vec<u8>) {
        out.extend(self.to_le_bytes());
    }
    fn get(b: &[u8]) -> Self {
        f32::from_le_bytes(b.try_into().unwrap())
    }
    fn bits(self) -> u64 {
        self.to_bits() as u64
    }
}

impl El for f64 {
    const DT: i32 = 8;
    const SIZE: usize = 8;
    fn gen(rank: usize, i: usize) -> Self {
        fgen(rank, i) as f64 + (mix(rank, i) % 1000) as f64 * 1e-7
    }
    fn reduce(op: i32, v: &[Self]) -> Self {
        let mut a = v[0];
        for &x in &v[1..] {
            a = match op {
                SUM | AVG => a + x,
                PROD => a * x,
                MAX => a.max(x),
                _ => a.min(x),
            };
        }
        if op == AVG {
            a / v.len() as f64
        } else {
            a
        }
    }
    fn put(self, out: &mut Vec<u8>) {
        out.extend(self.to_le_bytes());
    }
    fn get(b: &[u8]) -> Self {
        f64::from_le_bytes(b.try_into().unwrap())
    }
    fn bits(self) -> u64 {
        self.to_bits()
    }
}

macro_rules! half_el {
    ($t:ty, $dt:expr) => {
        impl El for $t {
            const DT: i32 = $dt;
            const SIZE: usize = 2;
            fn gen(rank: usize, i: usize) -> Self {
                // Quarters plus a bit that the narrow type must round away.
                <$t>::from_f32(fgen(rank, i) + (mix(rank, i) % 7) as f32 / 64.0)
            }
            fn reduce(op: i32, v: &[Self]) -> Self {
                let w: Vec<f32> = v.iter().map(|x| x.to_f32()).collect();
                <$t>::from_f32(fred(op, &w))
            }
            fn put(self, out: &mut Vec<u8>) {
                out.extend(self.to_le_bytes());
            }
            fn get(b: &[u8]) -> Self {
                <$t>::from_le_bytes(b.try_into().unwrap())
            }
            fn bits(self) -> u64 {
                self.to_bits() as u64
            }
        }
    };
}
half_el!(half::f16, F16);
half_el!(half::bf16, BF16);

fn same<T: El>(got: &[T], want: &[T], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i].bits() != want[i].bits()) {
        panic!(
            "{what}: element {i} is {:?}, expected {:?}",
            got[i], want[i]
        );
    }
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| 0xA0 ^ (i as u8)).collect()
}

// ---------------------------------------------------------------- the collectives, per rank

fn all_reduce<T: El>(rk: &Rank, n: usize) {
    let (r, w) = (rk.rank, rk.world);
    let mine: Vec<T> = (0..n).map(|i| T::gen(r, i)).collect();
    let send = rk.upload(&to_bytes(&mine));
    for op in [SUM, PROD, MAX, MIN, AVG] {
        let want: Vec<T> = (0..n)
            .map(|i| T::reduce(op, &(0..w).map(|p| T::gen(p, i)).collect::<Vec<_>>()))
            .collect();
        let recv = rk.alloc(n * T::SIZE);
        nk(
            ncclAllReduce(send as _, recv as _, n, T::DT, op, rk.comm, rk.stream),
            rk.comm,
            "all-reduce",
        );
        let what = format!(
            "rank {r}: all-reduce {} op {op}",
            std::any::type_name::<T>()
        );
        same(&from_bytes::<T>(&rk.read(recv, n * T::SIZE)), &want, &what);
        // In place.
        let buf = rk.upload(&to_bytes(&mine));
        nk(
            ncclAllReduce(buf as _, buf as _, n, T::DT, op, rk.comm, rk.stream),
            rk.comm,
            "all-reduce in place",
        );
        same(
            &from_bytes::<T>(&rk.read(buf, n * T::SIZE)),
            &want,
            &format!("{what} in place"),
        );
    }
    // The input is left alone.
    same(
        &from_bytes::<T>(&rk.read(send, n * T::SIZE)),
        &mine,
        "all-reduce input",
    );
}

fn reduce_scatter<T: El>(rk: &Rank, n: usize, op: i32) {
    let (r, w) = (rk.rank, rk.world);
    let input: Vec<T> = (0..n * w).map(|i| T::gen(r, i)).collect();
    let want: Vec<T> = (0..n)
        .map(|i| {
            T::reduce(
                op,
                &(0..w).map(|p| T::gen(p, r * n + i)).collect::<Vec<_>>(),
            )
        })
        .collect();
    let send = rk.upload(&to_bytes(&input));
    let recv = rk.alloc(n * T::SIZE);
    nk(
        ncclReduceScatter(send as _, recv as _, n, T::DT, op, rk.comm, rk.stream),
        rk.comm,
        "reduce-scatter",
    );
    let what = format!("rank {r}: reduce-scatter {}", std::any::type_name::<T>());
    same(&from_bytes::<T>(&rk.read(recv, n * T::SIZE)), &want, &what);
    // In place: the output is this rank's chunk of the input.
    let buf = rk.upload(&to_bytes(&input));
    let own = buf + (r * n * T::SIZE) as u64;
    nk(
        ncclReduceScatter(buf as _, own as _, n, T::DT, op, rk.comm, rk.stream),
        rk.comm,
        "reduce-scatter in place",
    );
    same(
        &from_bytes::<T>(&rk.read(own, n * T::SIZE)),
        &want,
        &format!("{what} in place"),
    );
}

fn all_gather<T: El>(rk: &Rank, n: usize) {
    let (r, w) = (rk.rank, rk.world);
    let mine: Vec<T> = (0..n).map(|i| T::gen(r, i)).collect();
    let want: Vec<T> = (0..w * n).map(|j| T::gen(j / n, j % n)).collect();
    let send = rk.upload(&to_bytes(&mine));
    let recv = rk.upload(&pattern(w * n * T::SIZE));
    nk(
        ncclAllGather(send as _, recv as _, n, T::DT, rk.comm, rk.stream),
        rk.comm,
        "all-gather",
    );
    let what = format!("rank {r}: all-gather {}", std::any::type_name::<T>());
    same(
        &from_bytes::<T>(&rk.read(recv, w * n * T::SIZE)),
        &want,
        &what,
    );
    // In place: the input is this rank's chunk of the output.
    let buf = rk.upload(&pattern(w * n * T::SIZE));
    let own = buf + (r * n * T::SIZE) as u64;
    rk.write(own, &to_bytes(&mine));
    nk(
        ncclAllGather(own as _, buf as _, n, T::DT, rk.comm, rk.stream),
        rk.comm,
        "all-gather in place",
    );
    same(
        &from_bytes::<T>(&rk.read(buf, w * n * T::SIZE)),
        &want,
        &format!("{what} in place"),
    );
}

fn reduce<T: El>(rk: &Rank, n: usize, op: i32) {
    let (r, w) = (rk.rank, rk.world);
    let mine: Vec<T> = (0..n).map(|i| T::gen(r, i)).collect();
    let want: Vec<T> = (0..n)
        .map(|i| T::reduce(op, &(0..w).map(|p| T::gen(p, i)).collect::<Vec<_>>()))
        .collect();
    let send = rk.upload(&to_bytes(&mine));
    for root in 0..w {
        let recv = rk.upload(&pattern(n * T::SIZE));
        nk(
            ncclReduce(
                send as _,
                recv as _,
                n,
                T::DT,
                op,
                root as i32,
                rk.comm,
                rk.stream,
            ),
            rk.comm,
            "reduce",
        );
        let got = rk.read(recv, n * T::SIZE);
        if r == root {
            same(
                &from_bytes::<T>(&got),
                &want,
                &format!("rank {r}: reduce to {root}"),
            );
        } else {
            assert_eq!(
                got,
                pattern(n * T::SIZE),
                "rank {r}: reduce to {root} wrote a non-root's recvbuff"
            );
        }
    }
    same(
        &from_bytes::<T>(&rk.read(send, n * T::SIZE)),
        &mine,
        "reduce input",
    );
}

fn broadcast<T: El>(rk: &Rank, n: usize) {
    let (r, w) = (rk.rank, rk.world);
    let mine: Vec<T> = (0..n).map(|i| T::gen(r, i)).collect();
    for root in 0..w {
        let want: Vec<T> = (0..n).map(|i| T::gen(root, i)).collect();
        // Out of place; a non-root's sendbuff is not used (NULL here).
        let send = if r == root {
            rk.upload(&to_bytes(&mine))
        } else {
            0
        };
        let recv = rk.upload(&pattern(n * T::SIZE));
        nk(
            ncclBroadcast(
                send as _,
                recv as _,
                n,
                T::DT,
                root as i32,
                rk.comm,
                rk.stream,
            ),
            rk.comm,
            "broadcast",
        );
        let what = format!("rank {r}: broadcast from {root}");
        same(&from_bytes::<T>(&rk.read(recv, n * T::SIZE)), &want, &what);
        // In place, and the old in-place entry point.
        let buf = rk.upload(&to_bytes(&mine));
        nk(
            ncclBroadcast(
                buf as _,
                buf as _,
                n,
                T::DT,
                root as i32,
                rk.comm,
                rk.stream,
            ),
            rk.comm,
            "broadcast in place",
        );
        same(
            &from_bytes::<T>(&rk.read(buf, n * T::SIZE)),
            &want,
            &format!("{what} in place"),
        );
        let buf = rk.upload(&to_bytes(&mine));
        nk(
            ncclBcast(buf as _, n, T::DT, root as i32, rk.comm, rk.stream),
            rk.comm,
            "bcast",
        );
        same(
            &from_bytes::<T>(&rk.read(buf, n * T::SIZE)),
            &want,
            &format!("{what} (ncclBcast)"),
        );
    }
}

/// Rank r's piece of an n-element vector cut into pieces of `piece` (the engine's split).
fn piece_of(n: usize, piece: usize, rank: usize) -> (usize, usize) {
    let off = (rank * piece).min(n);
    (off, (n - off).min(piece))
}

/// The engine's uneven reduce-scatter: one ncclReduce per rank onto its piece's owner,
/// grouped, non-roots passing their send pointer as recvbuff; the buckets of an overlapped
/// backward (tail first); the uneven all-gather: one in-place ncclBroadcast per piece from its
/// owner, grouped.
fn grouped_uneven(rk: &Rank, n: usize, piece: usize) {
    let (r, w) = (rk.rank, rk.world);
    let input: Vec<f32> = (0..n).map(|i| f32::gen(r, i)).collect();
    let send = rk.upload(&to_bytes(&input));
    let (own, len) = piece_of(n, piece, r);
    let want: Vec<f32> = (own..own + len)
        .map(|i| fred(SUM, &(0..w).map(|p| f32::gen(p, i)).collect::<Vec<_>>()))
        .collect();
    // The buckets [lo, hi) in the order the backward issues them; one bucket = the whole
    // reduce-scatter.
    let cut = n * 3 / 5;
    for buckets in [vec![(0, n)], vec![(cut, n), (0, cut)]] {
        let out = rk.upload(&pattern(len * 4));
        for &(lo, hi) in &buckets {
            assert_eq!(ncclGroupStart(), 0);
            for root in 0..w {
                let (off, l) = piece_of(n, piece, root);
                let (a, b) = (lo.max(off), hi.min(off + l));
                if a >= b {
                    continue;
                }
                let s = send + (a * 4) as u64;
                let d = if root == r {
                    out + ((a - own) * 4) as u64
                } else {
                    s
                };
                nk(
                    ncclReduce(
                        s as _,
                        d as _,
                        b - a,
                        F32,
                        SUM,
                        root as i32,
                        rk.comm,
                        rk.stream,
                    ),
                    rk.comm,
                    "grouped reduce",
                );
            }
            nk(ncclGroupEnd(), rk.comm, "group end");
        }
        let what =
            format!("rank {r}: uneven reduce-scatter n {n} piece {piece} buckets {buckets:?}");
        same(&from_bytes::<f32>(&rk.read(out, len * 4)), &want, &what);
        same(
            &from_bytes::<f32>(&rk.read(send, n * 4)),
            &input,
            &format!("{what}: input"),
        );
    }
    // All-gather of bf16 pieces in place.
    let mut buf = pattern(n * 2);
    let mine: Vec<half::bf16> = (own..own + len).map(|i| half::bf16::gen(r, i)).collect();
    buf[own * 2..(own + len) * 2].copy_from_slice(&to_bytes(&mine));
    let dbuf = rk.upload(&buf);
    assert_eq!(ncclGroupStart(), 0);
    for root in 0..w {
        let (off, l) = piece_of(n, piece, root);
        if l == 0 {
            continue;
        }
        let p = dbuf + (off * 2) as u64;
        nk(
            ncclBroadcast(p as _, p as _, l, BF16, root as i32, rk.comm, rk.stream),
            rk.comm,
            "grouped broadcast",
        );
    }
    nk(ncclGroupEnd(), rk.comm, "group end");
    let want: Vec<half::bf16> = (0..n).map(|i| half::bf16::gen(i / piece, i)).collect();
    same(
        &from_bytes::<half::bf16>(&rk.read(dbuf, n * 2)),
        &want,
        &format!("rank {r}: uneven all-gather n {n} piece {piece}"),
    );
}

/// Sums whose answer depends on the rules: in rank order, f16/bf16 rounded once (3 ranks).
fn rounding_rules(rk: &Rank) {
    assert_eq!(rk.world, 3);
    let r = rk.rank;
    let run = |dt: i32, bytes: Vec<u8>, op: i32| {
        let b = rk.upload(&bytes);
        nk(
            ncclAllReduce(
                b as _,
                b as _,
                bytes.len() / if dt == F32 { 4 } else { 2 },
                dt,
                op,
                rk.comm,
                rk.stream,
            ),
            rk.comm,
            "rounding",
        );
        rk.read(b, bytes.len())
    };
    // 1 + 2^-8 + 2^-8: 1.0078125 rounded once; step by step in bf16 each add rounds back to 1.
    let v = [1.0f32, 2f32.powi(-8), 2f32.powi(-8)][r];
    let got = from_bytes::<half::bf16>(&run(BF16, to_bytes(&[half::bf16::from_f32(v)]), SUM));
    assert_eq!(
        got[0].to_f32(),
        1.0078125,
        "bf16 sum must accumulate in f32"
    );
    let v = [1.0f32, 2f32.powi(-11), 2f32.powi(-11)][r];
    let got = from_bytes::<half::f16>(&run(F16, to_bytes(&[half::f16::from_f32(v)]), SUM));
    assert_eq!(
        got[0].to_f32(),
        1.0 + 2f32.powi(-10),
        "f16 sum must accumulate in f32"
    );
    // (1e8 + 1) - 1e8 = 0 in f32, in rank order; 1 in any other.
    let v = [1e8f32, 1.0, -1e8][r];
    let got = from_bytes::<f32>(&run(F32, to_bytes(&[v]), SUM));
    assert_eq!(got[0], 0.0, "f32 sum must be in rank order");
    // A NaN on one rank is not hidden by max or min.
    let v = [1.0f32, f32::NAN, 2.0][r];
    assert!(
        from_bytes::<f32>(&run(F32, to_bytes(&[v]), MAX))[0].is_nan(),
        "max hid a NaN"
    );
    assert!(
        from_bytes::<f32>(&run(F32, to_bytes(&[v]), MIN))[0].is_nan(),
        "min hid a NaN"
    );
}

/// Every collective, type and operation, from one rank.
fn suite(rk: &Rank) {
    let (mut c, mut d, mut u) = (0, 0, 0);
    // SAFETY: valid out-pointers.
    unsafe {
        nk(ncclCommCount(rk.comm, &mut c), rk.comm, "count");
        nk(ncclCommCuDevice(rk.comm, &mut d), rk.comm, "device");
        nk(ncclCommUserRank(rk.comm, &mut u), rk.comm, "rank");
    }
    assert_eq!((c, d, u), (rk.world as i32, rk.dev as i32, rk.rank as i32));
    all_reduce::<f32>(rk, 37);
    all_reduce::<half::bf16>(rk, 37);
    all_reduce::<half::f16>(rk, 37);
    all_reduce::<f64>(rk, 37);
    all_reduce::<i8>(rk, 37);
    all_reduce::<u8>(rk, 37);
    all_reduce::<i32>(rk, 37);
    all_reduce::<u32>(rk, 37);
    all_reduce::<i64>(rk, 37);
    all_reduce::<u64>(rk, 37);
    reduce_scatter::<f32>(rk, 5, SUM);
    reduce_scatter::<half::bf16>(rk, 5, SUM);
    reduce_scatter::<i32>(rk, 5, MAX);
    reduce_scatter::<f64>(rk, 5, AVG);
    all_gather::<f32>(rk, 7);
    all_gather::<half::bf16>(rk, 7);
    all_gather::<u8>(rk, 7);
    reduce::<f32>(rk, 9, SUM);
    reduce::<i64>(rk, 9, PROD);
    broadcast::<half::bf16>(rk, 11);
    broadcast::<i32>(rk, 11);
    // A count of 0 is no call at all (the next call still pairs with the peers' next).
    nk(
        ncclAllReduce(0 as _, 0 as _, 0, F32, SUM, rk.comm, rk.stream),
        rk.comm,
        "count 0",
    );
    // Uneven pieces: the last one short, and (n < world·piece) the last one empty.
    let w = rk.world;
    grouped_uneven(rk, 10, 10usize.div_ceil(w));
    grouped_uneven(rk, 3 * w - 1, 3);
    grouped_uneven(rk, 8, 8usize.div_ceil(w - 1));
    if w == 3 {
        rounding_rules(rk);
    }
}

#[test]
fn threads_2_ranks_every_collective_and_type() {
    threads(2, suite);
}

#[test]
fn threads_3_ranks_every_collective_and_type() {
    threads(3, suite);
}

/// A rank's calls run when its stream runs, reading device memory then: the send buffer's new
/// data is queued on the default stream, the collective on a non-blocking stream. Without an
/// event wait the collective runs first and sums the old data; with the engine's ordering
/// (record on the default stream, the NCCL stream waits) it sums the new.
#[test]
fn a_missing_event_wait_reads_the_old_data() {
    threads(2, |rk| {
        let n = 16;
        let vals = |k: f32| {
            to_bytes(
                &(0..n)
                    .map(|i| k * (rk.rank as f32 + 1.0) + i as f32)
                    .collect::<Vec<_>>(),
            )
        };
        let sum = |k: f32| {
            (0..n)
                .map(|i| k * 3.0 + 2.0 * i as f32)
                .collect::<Vec<f32>>()
        };
        let send = rk.upload(&vals(1.0));
        let recv = rk.alloc(n * 4);
        let new = vals(100.0);
        // SAFETY: `new` outlives the call (the copy stages it at once).
        ck(
            unsafe { cuMemcpyHtoDAsync_v2(send, new.as_ptr() as _, n * 4, std::ptr::null_mut()) },
            "async upload",
        );
        nk(
            ncclAllReduce(send as _, recv as _, n, F32, SUM, rk.comm, rk.stream),
            rk.comm,
            "all-reduce",
        );
        rk.sync();
        let mut got = vec![0u8; n * 4];
        // SAFETY: `got` has room for n·4 bytes. (This copy also runs the default stream.)
        ck(
            unsafe { cuMemcpyDtoH_v2(got.as_mut_ptr() as _, recv, n * 4) },
            "download",
        );
        same(
            &from_bytes::<f32>(&got),
            &sum(1.0),
            "without the event wait: the old data",
        );

        let newer = vals(10000.0);
        let mut ev: Handle = std::ptr::null_mut();
        // SAFETY: `newer` outlives the call; `ev` is a valid out-pointer.
        unsafe {
            ck(
                cuMemcpyHtoDAsync_v2(send, newer.as_ptr() as _, n * 4, std::ptr::null_mut()),
                "async upload",
            );
            ck(cuEventCreate(&mut ev, 0), "event");
        }
        ck(cuEventRecord(ev, std::ptr::null_mut()), "record");
        ck(cuStreamWaitEvent(rk.stream, ev, 0), "wait");
        nk(
            ncclAllReduce(send as _, recv as _, n, F32, SUM, rk.comm, rk.stream),
            rk.comm,
            "all-reduce",
        );
        same(
            &from_bytes::<f32>(&rk.read(recv, n * 4)),
            &sum(10000.0),
            "with the event wait: the new data",
        );
    });
}

/// Runs `f` on `n` thread ranks on fresh GPUs whose contexts it may leave faulted; `f` returns
/// the error text it saw; the communicators are aborted.
fn failing_threads(n: usize, f: impl Fn(&Rank) -> String + Sync) -> Vec<String> {
    setup();
    let devs = devices(n);
    let id = new_id();
    let out = std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|r| {
                let (f, dev) = (&f, devs[r]);
                s.spawn(move || f(&Rank::join(dev, r, n, id)))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        leftovers(&id),
        Vec::<String>::new(),
        "rendezvous files left"
    );
    out
}

/// The error a rank's stream gives, with the communicator's state after it.
fn stream_error(rk: &Rank) -> String {
    let rc = cuStreamSynchronize(rk.stream);
    assert_ne!(rc, 0, "rank {}: the stream ran without an error", rk.rank);
    let mut a = 0;
    // SAFETY: valid out-pointer.
    nk(
        unsafe { ncclCommGetAsyncError(rk.comm, &mut a) },
        rk.comm,
        "async error",
    );
    assert_ne!(a, 0, "rank {}: no async error recorded", rk.rank);
    let detail = cu_detail(rc);
    let last = last_error(rk.comm);
    assert!(
        detail.contains(&last) || last.contains("NCCL"),
        "cuGetErrorString {detail:?} vs ncclGetLastError {last:?}"
    );
    last
}

#[test]
fn calls_out_of_step_fail_on_every_rank_naming_both() {
    let errs = failing_threads(2, |rk| {
        let buf = rk.alloc(1000 * 4);
        let out = rk.alloc(1000 * 4);
        if rk.rank == 0 {
            nk(
                ncclAllReduce(buf as _, out as _, 1000, F32, SUM, rk.comm, rk.stream),
                rk.comm,
                "ar",
            );
        } else {
            nk(
                ncclReduceScatter(buf as _, out as _, 500, F32, SUM, rk.comm, rk.stream),
                rk.comm,
                "rs",
            );
        }
        let e = stream_error(rk);
        // Later calls on the communicator fail at once.
        let rc = ncclAllReduce(buf as _, out as _, 1, F32, SUM, rk.comm, rk.stream);
        assert_ne!(rc, 0, "a call on a failed communicator was accepted");
        e
    });
    for (r, e) in errs.iter().enumerate() {
        assert!(
            e.contains("rank 0 called ncclAllReduce(1000 f32 sum) while rank 1 called ncclReduceScatter(500 f32 sum)"),
            "rank {r}: {e}"
        );
    }
    // Grouped reduces to roots in another order on one rank: the root differs.
    let errs = failing_threads(3, |rk| {
        let buf = rk.alloc(64);
        assert_eq!(ncclGroupStart(), 0);
        let roots: Vec<i32> = if rk.rank == 2 { vec![1, 0] } else { vec![0, 1] };
        for root in roots {
            nk(
                ncclReduce(buf as _, buf as _, 4, F32, SUM, root, rk.comm, rk.stream),
                rk.comm,
                "reduce",
            );
        }
        nk(ncclGroupEnd(), rk.comm, "group end");
        stream_error(rk)
    });
    for (r, e) in errs.iter().enumerate() {
        assert!(
            e.contains("at call 1 on the communicator rank 0 called ncclReduce(4 f32 sum, root 0) while rank 2 called ncclReduce(4 f32 sum, root 1)"),
            "rank {r}: {e}"
        );
    }
}

#[test]
fn a_rank_that_aborts_fails_its_peers() {
    let errs = failing_threads(3, |rk| {
        if rk.rank == 2 {
            nk(ncclCommAbort(rk.comm), rk.comm, "abort");
            // (The Rank's drop aborts again: an unknown communicator, reported, not a crash.)
            return String::new();
        }
        let buf = rk.alloc(64);
        nk(
            ncclAllReduce(buf as _, buf as _, 16, F32, SUM, rk.comm, rk.stream),
            rk.comm,
            "all-reduce",
        );
        stream_error(rk)
    });
    for e in &errs[..2] {
        assert!(
            e.contains("rank 2 aborted its communicator after 0 calls"),
            "{e}"
        );
    }
}

/// Checks made when the call is made: a world of one, no peers needed.
#[test]
fn bad_arguments_are_refused_at_the_call() {
    setup();
    let devs = devices(2);
    let other = {
        Rank::bind(devs[1]);
        let mut p = 0u64;
        // SAFETY: valid out-pointer.
        ck(unsafe { cuMemAlloc_v2(&mut p, 4096) }, "alloc");
        p
    };
    let rk = Rank::join(devs[0], 0, 1, new_id());
    let (c, s) = (rk.comm, rk.stream);
    let buf = rk.alloc(4096);
    let host = [0f32; 16];
    let expect = |rc: i32, code: i32, text: &str| {
        assert_eq!(rc, code, "{}", last_error(c));
        let e = last_error(c);
        assert!(e.contains(text), "{e:?} should say {text:?}");
    };
    expect(
        ncclAllReduce(host.as_ptr() as _, buf as _, 16, F32, SUM, c, s),
        4,
        "not a device address",
    );
    expect(
        ncclAllReduce(other as _, buf as _, 16, F32, SUM, c, s),
        4,
        &format!("is memory of cuda:{}", devs[1]),
    );
    expect(
        ncclAllReduce(buf as _, buf as _, 2000, F32, SUM, c, s),
        4,
        "past the end",
    );
    expect(
        ncclAllReduce(buf as _, (buf + 4) as _, 16, F32, SUM, c, s),
        4,
        "in-place form",
    );
    expect(
        ncclAllReduce(buf as _, buf as _, 16, 42, SUM, c, s),
        4,
        "not an ncclDataType_t",
    );
    expect(
        ncclAllReduce(buf as _, buf as _, 16, F32, 9, c, s),
        4,
        "not a built-in operation",
    );
    expect(
        ncclReduce(buf as _, buf as _, 16, F32, SUM, 1, c, s),
        4,
        "root 1 is not a rank",
    );
    expect(
        ncclAllReduce(buf as _, buf as _, 16, F32, SUM, 0x1234 as _, s),
        4,
        "not a communicator",
    );
    expect(ncclGroupEnd(), 5, "without a matching ncclGroupStart");
    // A group with a bad call is not issued.
    assert_eq!(ncclGroupStart(), 0);
    assert_eq!(ncclAllReduce(buf as _, buf as _, 4, F32, SUM, c, s), 0);
    assert_ne!(ncclAllReduce(buf as _, buf as _, 4, 42, SUM, c, s), 0);
    expect(
        ncclGroupEnd(),
        4,
        "the group was not issued (1 calls dropped)",
    );
    // SAFETY: ncclGetErrorString returns a static string.
    let text = unsafe { CStr::from_ptr(ncclGetErrorString(4)) };
    assert!(text.to_string_lossy().contains("invalid argument"));
    let mut v = 0;
    // SAFETY: valid out-pointer.
    assert_eq!(unsafe { ncclGetVersion(&mut v) }, 0);
    assert!(v >= 22700, "{v}");
    // Still a working communicator: a world of one copies.
    let x = rk.upload(&to_bytes(&[1.5f32, 2.5]));
    let y = rk.alloc(8);
    nk(
        ncclAllReduce(x as _, y as _, 2, F32, SUM, c, s),
        c,
        "world of one",
    );
    same(
        &from_bytes::<f32>(&rk.read(y, 8)),
        &[1.5, 2.5],
        "world of one",
    );
    rk.destroy();
    // Destroyed: the handle is gone.
    assert_eq!(ncclCommDestroy(c), 4);
}

/// Calls of one communicator on two streams that no event orders: when the second stream runs
/// first, its call (number 2) would pair with the peers' call 1; it fails instead.
#[test]
fn calls_that_run_out_of_issue_order_fail() {
    setup();
    let rk = Rank::join(devices(1)[0], 0, 1, new_id());
    let mut other: Handle = std::ptr::null_mut();
    // SAFETY: valid out-pointer; flags 1 = non-blocking.
    ck(unsafe { cuStreamCreate(&mut other, 1) }, "stream");
    let buf = rk.alloc(64);
    let (c, s) = (rk.comm, rk.stream);
    nk(
        ncclAllReduce(buf as _, buf as _, 4, F32, SUM, c, s),
        c,
        "first",
    );
    nk(
        ncclAllGather(buf as _, buf as _, 4, F32, c, other),
        c,
        "second",
    );
    assert_ne!(
        cuStreamSynchronize(other),
        0,
        "the second call ran first without an error"
    );
    let e = last_error(c);
    assert!(e.contains("call 2 ran before call 1"), "{e}");
}

// ---------------------------------------------------------------- ranks as processes

const CHILD: &str = "GPU_SIM_NCCL_TEST_CHILD";

/// The child side: this binary re-executed with `CHILD=scenario:rank:world:id` runs one rank.
/// A no-op in a normal run.
#[test]
fn child_rank() {
    let Ok(spec) = std::env::var(CHILD) else {
        return;
    };
    setup();
    let parts: Vec<&str> = spec.split(':').collect();
    let (scenario, rank, world) = (
        parts[0],
        parts[1].parse().unwrap(),
        parts[2].parse().unwrap(),
    );
    let id = id_from_hex(parts[3]);
    let rk = match Rank::try_join(rank as u32, rank, world, id) {
        Ok(rk) => rk,
        Err(e) => {
            println!("RESULT init failed: {e}");
            return;
        }
    };
    match scenario {
        "suite" => {
            suite(&rk);
            rk.destroy();
            println!("RESULT ok");
        }
        "out-of-step" => {
            let buf = rk.alloc(1000 * 4);
            if rank == 0 {
                nk(
                    ncclAllReduce(buf as _, buf as _, 1000, F32, SUM, rk.comm, rk.stream),
                    rk.comm,
                    "ar",
                );
            } else {
                let own = buf + (rank * 500 * 4) as u64;
                nk(
                    ncclReduceScatter(buf as _, own as _, 500, F32, SUM, rk.comm, rk.stream),
                    rk.comm,
                    "rs",
                );
            }
            println!("RESULT {}", stream_error(&rk));
        }
        // Rank 1 dies after joining, without destroying its communicator.
        "crash" if rank == 1 => std::process::exit(3),
        // Rank 1 joins and then never calls (the parent kills it; should the parent die first,
        // it leaves).
        "hang" if rank == 1 => {
            let parent = std::os::unix::process::parent_id();
            for _ in 0..6000 {
                if std::os::unix::process::parent_id() != parent {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
        "crash" | "hang" => {
            let buf = rk.alloc(16 * 8);
            nk(
                ncclAllReduce(buf as _, buf as _, 16, I64, SUM, rk.comm, rk.stream),
                rk.comm,
                "ar",
            );
            println!("RESULT {}", stream_error(&rk));
        }
        s => panic!("unknown scenario {s}"),
    }
}

/// Starts rank `r` of a `world`-rank job as a child process running `scenario`.
fn spawn(scenario: &str, world: usize, r: usize, id: &ncclUniqueId, env: &[(&str, &str)]) -> Child {
    setup();
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["child_rank", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, format!("{scenario}:{r}:{world}:{}", id_hex(id)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn().unwrap()
}

fn spawn_all(scenario: &str, world: usize, id: &ncclUniqueId) -> Vec<Child> {
    (0..world)
        .map(|r| spawn(scenario, world, r, id, &[]))
        .collect()
}

/// What the child printed after "RESULT ", checking it exited cleanly.
fn result(out: Output, rank: usize) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "rank {rank}: {}\n{stdout}\n{stderr}",
        out.status
    );
    stdout
        .lines()
        .find_map(|l| l.split_once("RESULT ").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("rank {rank} printed no result:\n{stdout}\n{stderr}"))
        .to_string()
}

fn processes(world: usize) {
    let id = new_id();
    let kids = spawn_all("suite", world, &id);
    for (r, k) in kids.into_iter().enumerate() {
        assert_eq!(result(k.wait_with_output().unwrap(), r), "ok");
    }
    assert_eq!(
        leftovers(&id),
        Vec::<String>::new(),
        "rendezvous files left"
    );
}

#[test]
fn processes_2_ranks_every_collective_and_type() {
    processes(2);
}

#[test]
fn processes_3_ranks_every_collective_and_type() {
    processes(3);
}

#[test]
fn processes_out_of_step_fail_naming_both_calls() {
    let id = new_id();
    let kids = spawn_all("out-of-step", 2, &id);
    for (r, k) in kids.into_iter().enumerate() {
        let e = result(k.wait_with_output().unwrap(), r);
        assert!(
            e.contains("rank 0 called ncclAllReduce(1000 f32 sum) while rank 1 called ncclReduceScatter(500 f32 sum)"),
            "rank {r}: {e}"
        );
    }
    assert_eq!(
        leftovers(&id),
        Vec::<String>::new(),
        "rendezvous files left"
    );
}

/// A peer process that dies is noticed, long before the timeout, even while it is a zombie
/// (its parent, like `gpu-sim launch`, waits for rank 0 first).
#[test]
fn processes_a_dead_peer_fails_the_others() {
    let id = new_id();
    let mut kids = spawn_all("crash", 2, &id);
    let one = kids.pop().unwrap();
    let e = result(kids.pop().unwrap().wait_with_output().unwrap(), 0);
    assert_eq!(one.wait_with_output().unwrap().status.code(), Some(3));
    assert!(
        e.contains("rank 1 (pid") && e.contains("exited without destroying its communicator"),
        "{e}"
    );
    assert_eq!(
        leftovers(&id),
        Vec::<String>::new(),
        "rendezvous files left"
    );
}

/// A peer that never makes the call, or never joins: the wait ends at GPU_SIM_NCCL_TIMEOUT,
/// naming it. (A 2-second bound, not a speed assertion.)
#[test]
fn processes_a_missing_peer_times_out_naming_it() {
    let env = [("GPU_SIM_NCCL_TIMEOUT", "2")];
    let id = new_id();
    // Rank 1 first, with the generous timeout; rank 0, with the short one, once rank 1 has
    // joined (its data file exists), so only the missing call can time out.
    let mut one = spawn("hang", 2, 1, &id, &[]);
    let joined = || leftovers(&id).iter().any(|f| f.ends_with(".r1"));
    for _ in 0..1200 {
        if joined() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(joined(), "rank 1 never joined");
    let zero = spawn("hang", 2, 0, &id, &env);
    let e = result(zero.wait_with_output().unwrap(), 0);
    one.kill().unwrap();
    one.wait().unwrap();
    assert!(
        e.contains("rank 1 of 2 did not reach call 1 (ncclAllReduce(16 int64 sum))"),
        "{e}"
    );
    assert!(e.contains("GPU_SIM_NCCL_TIMEOUT"), "{e}");
    // A killed job cannot clean up; the next id made sweeps its files.
    new_id();
    assert_eq!(
        leftovers(&id),
        Vec::<String>::new(),
        "stale rendezvous files not swept"
    );

    let id = new_id();
    let e = result(
        spawn("suite", 3, 0, &id, &env).wait_with_output().unwrap(),
        0,
    );
    assert!(e.starts_with("init failed"), "{e}");
    assert!(e.contains("ranks 1, 2 of 3 did not join"), "{e}");
    assert_eq!(
        leftovers(&id),
        Vec::<String>::new(),
        "rendezvous files left"
    );
}

// ---------------------------------------------------------------- the shared library

/// The cdylib opened by path and its symbols looked up by name, as cudarc opens libnccl.so and
/// libcuda.so, with the C signatures of cudarc's bindings (the 128-byte id passed by value): a
/// world of one all-reduce through them. (The library has its own copy of the simulator.)
#[test]
fn the_shared_library_answers_to_nccls_names() {
    use std::ffi::{c_char, c_int, c_uint, CString};
    setup();
    let exe = std::env::current_exe().unwrap();
    let so = gpu_sim::shared_library_near(exe.parent().unwrap())
        .unwrap_or_else(|| panic!("libgpu_sim.so not found near {}", exe.display()));
    let path = CString::new(so.to_str().unwrap()).unwrap();
    // SAFETY: dlopen of the simulator's own library (its initialisers are Rust statics only).
    let lib = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!lib.is_null(), "dlopen {}: {}", so.display(), dlerror());
    macro_rules! sym {
        ($name:literal: $t:ty) => {{
            let n = CString::new($name).unwrap();
            // SAFETY: looks up a symbol of the library opened above.
            let p = unsafe { libc::dlsym(lib, n.as_ptr()) };
            assert!(!p.is_null(), "{} is not exported", $name);
            // SAFETY: the export has this C signature (the one cudarc's bindings declare).
            unsafe { std::mem::transmute::<*mut c_void, $t>(p) }
        }};
    }
    let version = sym!("ncclGetVersion": unsafe extern "C" fn(*mut c_int) -> c_int);
    let get_id = sym!("ncclGetUniqueId": unsafe extern "C" fn(*mut ncclUniqueId) -> c_int);
    let init = sym!("ncclCommInitRank": unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int) -> c_int);
    let all_reduce = sym!("ncclAllReduce": unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, ncclComm_t, Handle) -> c_int);
    let destroy = sym!("ncclCommDestroy": unsafe extern "C" fn(ncclComm_t) -> c_int);
    let err_str = sym!("ncclGetErrorString": unsafe extern "C" fn(c_int) -> *const c_char);
    let cu_init = sym!("cuInit": unsafe extern "C" fn(c_uint) -> c_int);
    let retain =
        sym!("cuDevicePrimaryCtxRetain": unsafe extern "C" fn(*mut Handle, c_int) -> c_int);
    let set_ctx = sym!("cuCtxSetCurrent": unsafe extern "C" fn(Handle) -> c_int);
    let alloc = sym!("cuMemAlloc_v2": unsafe extern "C" fn(*mut u64, usize) -> c_int);
    let htod = sym!("cuMemcpyHtoD_v2": unsafe extern "C" fn(u64, *const c_void, usize) -> c_int);
    let dtoh = sym!("cuMemcpyDtoH_v2": unsafe extern "C" fn(*mut c_void, u64, usize) -> c_int);
    let stream_create = sym!("cuStreamCreate": unsafe extern "C" fn(*mut Handle, c_uint) -> c_int);
    let stream_sync = sym!("cuStreamSynchronize": unsafe extern "C" fn(Handle) -> c_int);
    for name in [
        "ncclCommAbort",
        "ncclReduceScatter",
        "ncclAllGather",
        "ncclReduce",
        "ncclBroadcast",
        "ncclGroupStart",
        "ncclGroupEnd",
        "ncclGetLastError",
    ] {
        let n = CString::new(name).unwrap();
        // SAFETY: a symbol lookup only.
        assert!(
            !unsafe { libc::dlsym(lib, n.as_ptr()) }.is_null(),
            "{name} is not exported"
        );
    }
    let x = [1.0f32, -2.0, 3.5];
    let mut y = [0f32; 3];
    // SAFETY: every pointer below is valid for what the call writes or reads; the device
    // addresses come from the library's own allocator.
    unsafe {
        let mut v = 0;
        assert_eq!(version(&mut v), 0);
        assert_eq!(v, VERSION);
        assert!(!err_str(5).is_null());
        let mut id = ncclUniqueId {
            internal: [0; ID_BYTES],
        };
        assert_eq!(get_id(&mut id), 0);
        assert_eq!(cu_init(0), 0);
        let mut ctx: Handle = std::ptr::null_mut();
        assert_eq!(retain(&mut ctx, 0), 0);
        assert_eq!(set_ctx(ctx), 0);
        let (mut a, mut b) = (0u64, 0u64);
        assert_eq!(alloc(&mut a, 12), 0);
        assert_eq!(alloc(&mut b, 12), 0);
        assert_eq!(htod(a, x.as_ptr() as _, 12), 0);
        let mut s: Handle = std::ptr::null_mut();
        assert_eq!(stream_create(&mut s, 1), 0);
        let mut comm: ncclComm_t = std::ptr::null_mut();
        assert_eq!(init(&mut comm, 1, id, 0), 0);
        assert_eq!(all_reduce(a as _, b as _, 3, F32, SUM, comm, s), 0);
        assert_eq!(stream_sync(s), 0);
        assert_eq!(dtoh(y.as_mut_ptr() as _, b, 12), 0);
        assert_eq!(destroy(comm), 0);
        assert_eq!(leftovers(&id), Vec::<String>::new());
    }
    assert_eq!(y, x);
}

/// The dynamic loader's last error, for a failed dlopen's message.
fn dlerror() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated string owned by the loader.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        String::new()
    } else {
        // SAFETY: non-null, NUL-terminated (above).
        unsafe { std::ffi::CStr::from_ptr(e) }
            .to_string_lossy()
            .into_owned()
    }
}
