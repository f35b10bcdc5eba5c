//! The simulated devices: configuration, contexts, streams as real queues, events, modules.
//!
//! Work is queued per stream and executed in stream order only when something waits for it
//! (a stream or event synchronisation, a device-to-host copy, a context sync), never at the time
//! it is enqueued. So a read that forgot a sync, or a stream that forgot to wait for an event of
//! another stream, sees the data as it was before the other work ran, as a fast GPU may show
//! it, instead of the finished result by luck. Event waits are honoured: executing a
//! `cuStreamWaitEvent` first runs the recording stream up to the record. The legacy default
//! stream (handle 0) orders itself with every blocking stream of its context, as CUDA's does;
//! non-blocking streams (cudarc's `new_stream`/`fork`, NCCL's) are ordered by events alone.
//!
//! A kernel fault (memcheck, synccheck, racecheck) is sticky like a real one: it is printed with
//! where it happened, every later call on the device returns its code, and `cuGetErrorString`
//! returns the details so the engine's error message carries them.

use crate::mem::Memory;
use crate::ptx;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

/// CUresult values used here (CUDA's numbering).
pub mod code {
    pub const SUCCESS: i32 = 0;
    pub const INVALID_VALUE: i32 = 1;
    pub const OUT_OF_MEMORY: i32 = 2;
    pub const NOT_INITIALIZED: i32 = 3;
    pub const NO_DEVICE: i32 = 100;
    pub const INVALID_DEVICE: i32 = 101;
    pub const INVALID_IMAGE: i32 = 200;
    pub const INVALID_CONTEXT: i32 = 201;
    pub const INVALID_PTX: i32 = 218;
    pub const INVALID_HANDLE: i32 = 400;
    pub const NOT_FOUND: i32 = 500;
    pub const NOT_READY: i32 = 600;
    pub const ILLEGAL_ADDRESS: i32 = 700;
    pub const LAUNCH_OUT_OF_RESOURCES: i32 = 701;
    pub const MISALIGNED_ADDRESS: i32 = 716;
    pub const LAUNCH_FAILED: i32 = 719;
    pub const NOT_SUPPORTED: i32 = 801;
    pub const UNKNOWN: i32 = 999;
}

/// An error code with what went wrong.
#[derive(Clone, Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl Failure {
    pub fn new(code: i32, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }
}

pub type Res<T> = Result<T, Failure>;

/// The GPU being modelled and the checks, from `GPU_SIM_*` variables (`gpu-sim run` sets them).
#[derive(Clone, Debug)]
pub struct Config {
    pub gpus: u32,
    pub sms: u32,
    /// Compute capability reported (8, 0): the kernels are compiled for compute_80.
    pub cc: (i32, i32),
    pub mem_bytes: u64,
    /// Shared memory a block may opt in to.
    pub smem_optin: u32,
    pub racecheck: bool,
    /// A directory of `<module>.ptx` files that replace the modules compiled from
    /// `kernels-cu/<module>.cu` (to run a mutated kernel without rebuilding the engine).
    pub ptx_override: Option<std::path::PathBuf>,
    /// Planted host-side faults, for showing that tests catch them (see [`Faults`]).
    pub faults: Faults,
    /// Print every launch and library call as it executes.
    pub trace: bool,
}

/// Faults the simulator plants at the API boundary, each the exact effect of a host-side bug
/// in the caller: `GPU_SIM_FAULT=skip-event-waits,swap-args:KERNEL:I:J,lt-flip-transa:N`.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// cuStreamWaitEvent does nothing (a missing event wait).
    pub skip_event_waits: bool,
    /// Launches of this kernel get parameters I and J swapped (a wrong argument order).
    pub swap_args: Option<(String, usize, usize)>,
    /// The N-th cublasLtMatmul (0-based) of the process uses the other TRANSA (a wrong transpose
    /// flag on one call).
    pub lt_flip_transa: Option<u64>,
}

impl Faults {
    fn parse(s: &str) -> Faults {
        let mut f = Faults::default();
        for item in s.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let parts: Vec<&str> = item.split(':').collect();
            match parts.as_slice() {
                ["skip-event-waits"] => f.skip_event_waits = true,
                ["swap-args", k, i, j] => {
                    f.swap_args = Some((
                        k.to_string(),
                        i.parse().unwrap_or(0),
                        j.parse().unwrap_or(1),
                    ))
                }
                ["lt-flip-transa", n] => f.lt_flip_transa = n.parse().ok(),
                _ => eprintln!("gpu-sim: GPU_SIM_FAULT: unknown fault `{item}` ignored"),
            }
        }
        f
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| {
            eprintln!("gpu-sim: {name}={v:?} is not a number; using {default}");
            default
        }),
        Err(_) => default,
    }
}

impl Config {
    pub fn from_env() -> Config {
        let gib = env_u64("GPU_SIM_MEM_GIB", 16);
        Config {
            gpus: env_u64("GPU_SIM_GPUS", 1).clamp(1, 64) as u32,
            sms: env_u64("GPU_SIM_SMS", 108).clamp(1, 1024) as u32,
            cc: (8, 0),
            mem_bytes: gib << 30,
            smem_optin: env_u64("GPU_SIM_SMEM_OPTIN", 163 * 1024) as u32,
            racecheck: std::env::var("GPU_SIM_RACECHECK").map_or(true, |v| v != "0"),
            ptx_override: std::env::var_os("GPU_SIM_PTX_OVERRIDE").map(Into::into),
            faults: Faults::parse(&std::env::var("GPU_SIM_FAULT").unwrap_or_default()),
            trace: std::env::var("GPU_SIM_TRACE").is_ok_and(|v| v != "0"),
        }
    }

    /// The name every simulated device reports, so no result can be mistaken for a GPU's.
    pub fn device_name(&self) -> String {
        format!(
            "gpu-sim (simulated sm_{}{}, {} SMs, not a GPU)",
            self.cc.0, self.cc.1, self.sms
        )
    }
}

/// One queued piece of work.
enum Op {
    Job(String, Job),
    /// Run stream `stream` up to and including its op number `seq` first.
    Wait {
        stream: u64,
        seq: u64,
    },
    Record(u64),
}

/// A job on a device's stream.
pub type Job = Box<dyn FnOnce(&Device) -> Res<()> + Send>;

struct StreamQ {
    blocking: bool,
    /// (global sequence number, op), in stream order.
    q: VecDeque<(u64, Op)>,
}

/// The queues of one device, locked while work executes.
struct Exec {
    streams: HashMap<u64, StreamQ>,
}

/// One simulated GPU.
pub struct Device {
    pub ordinal: u32,
    pub mem: Memory,
    exec: Mutex<Exec>,
    /// The first kernel fault, sticky.
    sticky: Mutex<Option<Failure>>,
    launches: AtomicU64,
    warp_instructions: AtomicU64,
    /// One thread runs a device's queues at a time (re-entrant: running one stream runs the
    /// streams it waits for).
    runner: Mutex<(Option<std::thread::ThreadId>, u32)>,
    runner_free: std::sync::Condvar,
}

/// The legacy default stream's handle.
pub const LEGACY: u64 = 0;
/// `CU_STREAM_LEGACY` and `CU_STREAM_PER_THREAD` handles (both the default stream here).
const LEGACY_ALIAS: u64 = 1;
const PER_THREAD: u64 = 2;

struct Event {
    device: u32,
    /// (stream, seq) of the last record, if recorded.
    last: Option<(u64, u64)>,
    /// When the last executed record ran.
    time: Option<Instant>,
    /// The seq of the last executed record.
    done_seq: u64,
}

pub struct Loaded {
    pub device: u32,
    pub module: ptx::Module,
    /// Device memory of the module's globals, freed on unload.
    globals: Vec<u64>,
    pub name: String,
}

pub struct Func {
    pub device: u32,
    pub module: u64,
    pub kernel: ptx::Kernel,
    /// CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES.
    pub max_dyn_smem: Mutex<u32>,
}

/// Process-wide state.
pub struct Sim {
    pub cfg: Config,
    pub devices: Vec<Device>,
    next_handle: AtomicU64,
    next_seq: AtomicU64,
    /// Stream handle -> device, for created streams.
    streams: Mutex<HashMap<u64, u32>>,
    events: Mutex<HashMap<u64, Event>>,
    pub modules: Mutex<HashMap<u64, Arc<Loaded>>>,
    pub funcs: Mutex<HashMap<u64, Arc<Func>>>,
    /// The latest message per error code, for cuGetErrorString.
    details: Mutex<HashMap<i32, std::ffi::CString>>,
}

static SIM: OnceLock<Sim> = OnceLock::new();

pub fn sim() -> &'static Sim {
    SIM.get_or_init(|| {
        let cfg = Config::from_env();
        let devices = (0..cfg.gpus)
            .map(|d| {
                let mut streams = HashMap::new();
                streams.insert(
                    LEGACY,
                    StreamQ {
                        blocking: true,
                        q: VecDeque::new(),
                    },
                );
                Device {
                    ordinal: d,
                    mem: Memory::new(d, cfg.mem_bytes),
                    exec: Mutex::new(Exec { streams }),
                    sticky: Mutex::new(None),
                    launches: AtomicU64::new(0),
                    warp_instructions: AtomicU64::new(0),
                    runner: Mutex::new((None, 0)),
                    runner_free: std::sync::Condvar::new(),
                }
            })
            .collect();
        Sim {
            cfg,
            devices,
            // Handles are small tagged integers, never valid host or device addresses.
            next_handle: AtomicU64::new(0x51_0000),
            next_seq: AtomicU64::new(1),
            streams: Mutex::new(HashMap::new()),
            events: Mutex::new(HashMap::new()),
            modules: Mutex::new(HashMap::new()),
            funcs: Mutex::new(HashMap::new()),
            details: Mutex::new(HashMap::new()),
        }
    })
}

thread_local! {
    /// The device whose (primary) context is current on this thread.
    static CURRENT: std::cell::Cell<Option<u32>> = const { std::cell::Cell::new(None) };
}

/// Context handles: a tag plus the ordinal (never dereferenced by callers).
const CTX_TAG: u64 = 0xC7C7_0000;

pub fn ctx_handle(dev: u32) -> u64 {
    CTX_TAG + dev as u64 + 1
}

pub fn ctx_device(ctx: u64) -> Option<u32> {
    ctx.checked_sub(CTX_TAG + 1)
        .map(|d| d as u32)
        .filter(|&d| (d as usize) < sim().devices.len() && ctx > CTX_TAG)
}

pub fn set_current(dev: Option<u32>) {
    CURRENT.with(|c| c.set(dev));
}

pub fn current() -> Option<u32> {
    CURRENT.with(|c| c.get())
}

impl Sim {
    pub fn handle(&self) -> u64 {
        self.next_handle.fetch_add(16, Ordering::Relaxed)
    }

    pub fn device(&self, ordinal: u32) -> Res<&Device> {
        self.devices.get(ordinal as usize).ok_or_else(|| {
            Failure::new(
                code::INVALID_DEVICE,
                format!(
                    "device {ordinal} does not exist: the simulator has {} (GPU_SIM_GPUS)",
                    self.devices.len()
                ),
            )
        })
    }

    /// The device of the calling thread's current context.
    pub fn current_device(&self) -> Res<&Device> {
        let d = current().ok_or_else(|| {
            Failure::new(
                code::INVALID_CONTEXT,
                "no CUDA context is current on this thread",
            )
        })?;
        self.device(d)
    }

    /// The device a stream handle belongs to (the default streams: the current context's).
    pub fn stream_device(&self, stream: u64) -> Res<&Device> {
        if matches!(stream, LEGACY | LEGACY_ALIAS | PER_THREAD) {
            return self.current_device();
        }
        let d = *self.streams.lock().unwrap().get(&stream).ok_or_else(|| {
            Failure::new(
                code::INVALID_HANDLE,
                format!("stream {stream:#x} does not exist (destroyed, or never created)"),
            )
        })?;
        self.device(d)
    }

    /// Records `detail` for `code`, returned by cuGetErrorString, and prints it.
    pub fn note(&self, f: &Failure) {
        let Ok(c) = std::ffi::CString::new(f.message.replace('\0', " ")) else {
            return;
        };
        let mut details = self.details.lock().unwrap();
        // A sticky fault comes back from every later call: print it once.
        if f.code != code::NOT_READY && details.get(&f.code) != Some(&c) {
            eprintln!("gpu-sim: {}", f.message);
        }
        details.insert(f.code, c);
    }

    /// The latest detail recorded for `code`.
    pub fn detail(&self, code: i32) -> Option<*const std::ffi::c_char> {
        // The CString stays in the map (replaced only by a later error of the same code), which
        // is what CUDA promises for its static strings for as long as callers look.
        self.details.lock().unwrap().get(&code).map(|c| c.as_ptr())
    }

    pub fn create_stream(&self, blocking: bool) -> Res<u64> {
        let dev = self.current_device()?;
        let h = self.handle();
        dev.exec.lock().unwrap().streams.insert(
            h,
            StreamQ {
                blocking,
                q: VecDeque::new(),
            },
        );
        self.streams.lock().unwrap().insert(h, dev.ordinal);
        Ok(h)
    }

    /// Destroys a stream: its queued work still runs (now, as a GPU would get to it).
    pub fn destroy_stream(&self, stream: u64) -> Res<()> {
        let dev = self.stream_device(stream)?;
        if matches!(stream, LEGACY | LEGACY_ALIAS | PER_THREAD) {
            return Err(Failure::new(
                code::INVALID_HANDLE,
                "the default stream cannot be destroyed",
            ));
        }
        let r = dev.sync_stream(stream);
        dev.exec.lock().unwrap().streams.remove(&stream);
        self.streams.lock().unwrap().remove(&stream);
        r
    }

    fn norm(stream: u64) -> u64 {
        if matches!(stream, LEGACY_ALIAS | PER_THREAD) {
            LEGACY
        } else {
            stream
        }
    }

    /// Queues `job` on `stream`; it runs in stream order when something waits for it.
    pub fn enqueue(&self, stream: u64, label: impl Into<String>, job: Job) -> Res<()> {
        let dev = self.stream_device(stream)?;
        dev.check_sticky()?;
        dev.push(Self::norm(stream), Op::Job(label.into(), job));
        Ok(())
    }

    pub fn create_event(&self) -> Res<u64> {
        let dev = self.current_device()?;
        let h = self.handle();
        self.events.lock().unwrap().insert(
            h,
            Event {
                device: dev.ordinal,
                last: None,
                time: None,
                done_seq: 0,
            },
        );
        Ok(h)
    }

    pub fn destroy_event(&self, ev: u64) -> Res<()> {
        self.events
            .lock()
            .unwrap()
            .remove(&ev)
            .map(|_| ())
            .ok_or_else(|| {
                Failure::new(
                    code::INVALID_HANDLE,
                    format!("event {ev:#x} does not exist"),
                )
            })
    }

    pub fn record_event(&self, ev: u64, stream: u64) -> Res<()> {
        let dev = self.stream_device(stream)?;
        dev.check_sticky()?;
        let stream = Self::norm(stream);
        let mut evs = self.events.lock().unwrap();
        let e = evs.get_mut(&ev).ok_or_else(|| {
            Failure::new(
                code::INVALID_HANDLE,
                format!("event {ev:#x} does not exist"),
            )
        })?;
        if e.device != dev.ordinal {
            return Err(Failure::new(
                code::INVALID_CONTEXT,
                format!(
                    "event of device {} recorded on a stream of device {}",
                    e.device, dev.ordinal
                ),
            ));
        }
        let seq = dev.push(stream, Op::Record(ev));
        e.last = Some((stream, seq));
        Ok(())
    }

    pub fn wait_event(&self, stream: u64, ev: u64) -> Res<()> {
        let dev = self.stream_device(stream)?;
        dev.check_sticky()?;
        let last = {
            let evs = self.events.lock().unwrap();
            let e = evs.get(&ev).ok_or_else(|| {
                Failure::new(
                    code::INVALID_HANDLE,
                    format!("event {ev:#x} does not exist"),
                )
            })?;
            e.last.filter(|_| e.device == dev.ordinal)
        };
        if self.cfg.faults.skip_event_waits {
            return Ok(());
        }
        if let Some((s, seq)) = last {
            dev.push(Self::norm(stream), Op::Wait { stream: s, seq });
        }
        Ok(())
    }

    pub fn sync_event(&self, ev: u64) -> Res<()> {
        let (device, last) = {
            let evs = self.events.lock().unwrap();
            let e = evs.get(&ev).ok_or_else(|| {
                Failure::new(
                    code::INVALID_HANDLE,
                    format!("event {ev:#x} does not exist"),
                )
            })?;
            (e.device, e.last)
        };
        let dev = self.device(device)?;
        if let Some((s, seq)) = last {
            dev.run_until(s, seq)?;
        }
        dev.check_sticky()
    }

    /// Milliseconds between two executed records.
    pub fn elapsed(&self, start: u64, end: u64) -> Res<f32> {
        self.sync_event(start)?;
        self.sync_event(end)?;
        let evs = self.events.lock().unwrap();
        let t = |h: u64| {
            evs.get(&h).and_then(|e| e.time).ok_or_else(|| {
                Failure::new(
                    code::INVALID_HANDLE,
                    format!("event {h:#x} has not been recorded"),
                )
            })
        };
        let (a, b) = (t(start)?, t(end)?);
        Ok(if b >= a {
            (b - a).as_secs_f32() * 1e3
        } else {
            -((a - b).as_secs_f32() * 1e3)
        })
    }

    fn executed_record(&self, ev: u64, seq: u64) {
        if let Some(e) = self.events.lock().unwrap().get_mut(&ev) {
            e.time = Some(Instant::now());
            e.done_seq = e.done_seq.max(seq);
        }
    }

    /// Whether the event's last record has executed (no flushing).
    pub fn event_done(&self, ev: u64) -> Res<bool> {
        let evs = self.events.lock().unwrap();
        let e = evs.get(&ev).ok_or_else(|| {
            Failure::new(
                code::INVALID_HANDLE,
                format!("event {ev:#x} does not exist"),
            )
        })?;
        Ok(e.last.is_none_or(|(_, s)| e.done_seq >= s))
    }
}

impl Device {
    fn push(&self, stream: u64, op: Op) -> u64 {
        let seq = sim().next_seq.fetch_add(1, Ordering::Relaxed);
        let mut ex = self.exec.lock().unwrap();
        if let Some(s) = ex.streams.get_mut(&stream) {
            s.q.push_back((seq, op));
        }
        seq
    }

    /// The sticky error, if a kernel or job has failed.
    pub fn check_sticky(&self) -> Res<()> {
        match &*self.sticky.lock().unwrap() {
            Some(f) => Err(f.clone()),
            None => Ok(()),
        }
    }

    /// Runs everything queued on `stream`.
    pub fn sync_stream(&self, stream: u64) -> Res<()> {
        self.run_until(Sim::norm(stream), u64::MAX)?;
        self.check_sticky()
    }

    /// Runs every stream of the device.
    pub fn sync_all(&self) -> Res<()> {
        let streams: Vec<u64> = self.exec.lock().unwrap().streams.keys().copied().collect();
        for s in streams {
            self.run_until(s, u64::MAX)?;
        }
        self.check_sticky()
    }

    /// Runs `stream`'s ops with sequence number ≤ `upto`, with the ops they depend on.
    pub fn run_until(&self, stream: u64, upto: u64) -> Res<()> {
        let me = std::thread::current().id();
        {
            let mut r = self.runner.lock().unwrap();
            while r.0.is_some_and(|t| t != me) {
                r = self.runner_free.wait(r).unwrap();
            }
            r.0 = Some(me);
            r.1 += 1;
        }
        let out = self.run_inner(stream, upto);
        let mut r = self.runner.lock().unwrap();
        r.1 -= 1;
        if r.1 == 0 {
            r.0 = None;
            self.runner_free.notify_all();
        }
        out
    }

    fn run_inner(&self, stream: u64, upto: u64) -> Res<()> {
        loop {
            self.check_sticky()?;
            let (seq, op, blocking) = {
                let mut ex = self.exec.lock().unwrap();
                let Some(s) = ex.streams.get_mut(&stream) else {
                    return Ok(());
                };
                match s.q.front() {
                    Some(&(seq, _)) if seq <= upto => {}
                    _ => return Ok(()),
                }
                let blocking = s.blocking;
                let (seq, op) = s.q.pop_front().unwrap();
                (seq, op, blocking)
            };
            // Legacy default stream semantics: it waits for the earlier work of every blocking
            // stream, and a blocking stream waits for its earlier work.
            if blocking {
                if stream == LEGACY {
                    let others: Vec<u64> = {
                        let ex = self.exec.lock().unwrap();
                        ex.streams
                            .iter()
                            .filter(|(h, s)| **h != LEGACY && s.blocking)
                            .map(|(h, _)| *h)
                            .collect()
                    };
                    for o in others {
                        self.run_until(o, seq - 1)?;
                    }
                } else {
                    self.run_until(LEGACY, seq - 1)?;
                }
            }
            match op {
                Op::Wait { stream: s, seq: w } => self.run_until(s, w)?,
                Op::Record(ev) => sim().executed_record(ev, seq),
                Op::Job(label, job) => {
                    let trace = sim().cfg.trace.then(|| (Instant::now(), self.stats().1));
                    let r = job(self);
                    if let Some((t0, w0)) = trace {
                        let w = self.stats().1 - w0;
                        eprintln!(
                            "gpu-sim: cuda:{} stream {stream:#x}: {label}: {:.3} ms{}",
                            self.ordinal,
                            t0.elapsed().as_secs_f64() * 1e3,
                            if w > 0 {
                                format!(", {w} warp-instructions")
                            } else {
                                String::new()
                            }
                        );
                    }
                    if let Err(f) = r {
                        let f = Failure::new(
                            f.code,
                            format!("cuda:{}: {label}: {}", self.ordinal, f.message),
                        );
                        sim().note(&f);
                        *self.sticky.lock().unwrap() = Some(f.clone());
                        // A faulted context runs nothing more.
                        for s in self.exec.lock().unwrap().streams.values_mut() {
                            s.q.clear();
                        }
                        return Err(f);
                    }
                }
            }
        }
    }

    pub fn count_launch(&self, stats: &ptx::LaunchStats) {
        self.launches.fetch_add(1, Ordering::Relaxed);
        self.warp_instructions
            .fetch_add(stats.warp_instructions, Ordering::Relaxed);
    }

    /// (launches, warp-instructions) executed so far.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.launches.load(Ordering::Relaxed),
            self.warp_instructions.load(Ordering::Relaxed),
        )
    }
}

/// Loads a module on the current device: the PTX override, the parse, its globals.
pub fn load_module(text: &str) -> Res<u64> {
    let s = sim();
    let dev = s.current_device()?;
    let name = module_name(text).unwrap_or_else(|| "<module>".into());
    let text: std::borrow::Cow<str> = match override_for(&name) {
        Some(t) => t.into(),
        None => text.into(),
    };
    let mut module = ptx::Module::parse(&text)
        .map_err(|e| Failure::new(code::INVALID_PTX, format!("loading the PTX of {name}: {e}")))?;
    let mut addrs = Vec::new();
    for g in module.globals() {
        let a = dev.mem.alloc(g.size.max(1)).map_err(|e| {
            Failure::new(
                code::OUT_OF_MEMORY,
                format!("{name}: global `{}`: {e}", g.name),
            )
        })?;
        dev.mem
            .write(a, &g.init)
            .map_err(|e| Failure::new(code::UNKNOWN, e.to_string()))?;
        addrs.push(a);
    }
    module.bind_globals(&addrs);
    let h = s.handle();
    s.modules.lock().unwrap().insert(
        h,
        Arc::new(Loaded {
            device: dev.ordinal,
            module,
            globals: addrs,
            name,
        }),
    );
    Ok(h)
}

pub fn unload_module(h: u64) -> Res<()> {
    let s = sim();
    let m = s.modules.lock().unwrap().remove(&h).ok_or_else(|| {
        Failure::new(
            code::INVALID_HANDLE,
            format!("module {h:#x} does not exist"),
        )
    })?;
    let dev = s.device(m.device)?;
    // Work queued with its kernels must finish before its globals go.
    dev.sync_all()?;
    s.funcs.lock().unwrap().retain(|_, f| f.module != h);
    for a in &m.globals {
        let _ = dev.mem.free(*a);
    }
    Ok(())
}

/// `kernels-cu/<name>.cu` from the PTX's `.file` directive.
pub fn module_name(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix(".file"))
        .filter_map(|l| l.split('"').nth(1))
        .find(|p| p.ends_with(".cu"))
        .map(|p| {
            let stem = std::path::Path::new(p)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            format!("kernels-cu/{stem}.cu")
        })
}

fn override_for(name: &str) -> Option<String> {
    let dir = sim().cfg.ptx_override.as_ref()?;
    let stem = std::path::Path::new(name)
        .file_stem()?
        .to_string_lossy()
        .into_owned();
    let p = dir.join(format!("{stem}.ptx"));
    let text = std::fs::read_to_string(&p).ok()?;
    eprintln!(
        "gpu-sim: {name}: using {} (GPU_SIM_PTX_OVERRIDE)",
        p.display()
    );
    Some(text)
}
