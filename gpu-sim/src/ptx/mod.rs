//! PTX: the module's real text, parsed, pre-decoded and executed warp by warp.
//!
//! [`Module::parse`] lexes ([`lex`]) and parses ([`parse`]) the text, then decodes every kernel
//! ([`decode`]) into instructions whose operands are register indices, constants and offsets
//! ([`code`]); [`launch`] runs the CTAs of a grid in parallel ([`exec`]) with memcheck and
//! synccheck always on and racecheck on request.
//!
//! Where the ISA leaves a result open, gpu-sim picks one and keeps it: `.approx` functions
//! (ex2, rcp, sqrt, rsqrt, lg2, sin, cos) are computed in f64 and rounded (within the ISA's
//! error bounds; `.ftz` flushes inputs and results); mma sums C and the exact products in f64
//! and rounds once; integer `div` by zero gives all ones and `rem` by zero the dividend; NaN
//! converted to bf16/f16 is the canonical 0x7fff. Fresh shared and local memory is 0xff bytes
//! (NaN as floats); registers are undefined until written, as on a GPU.

mod code;
mod decode;
mod exec;
pub mod float;
mod lex;
mod mma;
mod parse;

use crate::mem::MemView;
use rayon::prelude::*;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub use exec::{LOCAL_WINDOW, SHARED_WINDOW};
pub use mma::mma_m16n8k16_bf16;

/// A module-scope `.global`/`.const` variable that needs device memory.
#[derive(Clone, Debug)]
pub struct GlobalVar {
    pub name: String,
    pub size: u64,
    pub align: u64,
    /// Initial bytes (`size` long; zeros where the PTX gives no initialiser).
    pub init: Vec<u8>,
}

/// A PTX text that cannot be loaded: the line (1-based) and what is wrong, e.g. an instruction
/// the simulator does not support.
#[derive(Clone, Debug)]
pub struct LoadError {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PTX line {}: {}", self.line, self.message)
    }
}

/// One kernel parameter's place in the parameter buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamInfo {
    pub size: u32,
    pub align: u32,
    pub offset: u32,
}

/// A parsed module: every kernel decoded, every `.func` checked.
pub struct Module {
    kernels: Vec<Arc<decode::Program>>,
    globals: Vec<GlobalVar>,
    addrs: Option<Vec<u64>>,
}

impl Module {
    /// Parses and decodes `text`; every instruction is checked to be supported.
    pub fn parse(text: &str) -> Result<Module, LoadError> {
        let toks = lex::lex(text)?;
        let pm = parse::parse(&toks)?;
        let mut kernels = Vec::new();
        for (i, f) in pm.funcs.iter().enumerate() {
            if f.body.is_none() {
                continue;
            }
            let prog = decode::build(&pm, i)?;
            if f.is_entry {
                kernels.push(Arc::new(prog));
            }
        }
        let globals = decode::module_globals(&pm)
            .into_iter()
            .map(|v| {
                let size = v.size.unwrap_or(0);
                let mut init = v.init.clone().unwrap_or_default();
                init.resize(size as usize, 0);
                GlobalVar {
                    name: v.name.clone(),
                    size,
                    align: v.align,
                    init,
                }
            })
            .collect();
        Ok(Module {
            kernels,
            globals,
            addrs: None,
        })
    }
    /// Module-scope variables that need device memory, in a fixed order.
    pub fn globals(&self) -> Vec<GlobalVar> {
        self.globals.clone()
    }
    /// Their device addresses (allocated and initialised by the driver), in `globals()` order.
    pub fn bind_globals(&mut self, addrs: &[u64]) {
        assert_eq!(
            addrs.len(),
            self.globals.len(),
            "bind_globals: one address per global variable"
        );
        self.addrs = Some(addrs.to_vec());
    }
    pub fn kernel_names(&self) -> Vec<String> {
        self.kernels.iter().map(|k| k.name.clone()).collect()
    }
    /// The kernel `name`, with the module's global addresses as bound so far.
    pub fn kernel(&self, name: &str) -> Option<Kernel> {
        let prog = self.kernels.iter().find(|k| k.name == name)?.clone();
        let mut consts = prog.consts.clone();
        let bound = self.addrs.is_some() || prog.global_refs.is_empty();
        if let Some(a) = &self.addrs {
            for &(k, gi, add) in &prog.global_refs {
                consts[k as usize] = a[gi].wrapping_add(add as u64);
            }
        }
        Some(Kernel {
            prog,
            consts: Arc::new(consts),
            bound,
        })
    }
}

/// A kernel of a loaded module (cheap to clone; keeps the module alive).
#[derive(Clone)]
pub struct Kernel {
    prog: Arc<decode::Program>,
    consts: Arc<Vec<u64>>,
    /// Whether the global variables it names have addresses.
    bound: bool,
}

impl Kernel {
    pub fn name(&self) -> &str {
        &self.prog.name
    }
    pub fn params(&self) -> &[ParamInfo] {
        &self.prog.params
    }
    pub fn param_bytes(&self) -> usize {
        self.prog.param_bytes
    }
    pub fn static_smem(&self) -> u32 {
        self.prog.static_smem
    }
    /// Bytes of local memory (stack frames and call parameters) per thread.
    pub fn local_bytes(&self) -> u32 {
        self.prog.local_bytes
    }
    pub fn max_threads(&self) -> Option<u32> {
        self.prog.max_threads
    }
    pub fn req_ntid(&self) -> Option<[u32; 3]> {
        self.prog.req_ntid
    }
    /// Registers per thread in 32-bit units as declared in the PTX (capped at 255; ptxas
    /// would allocate fewer).
    pub fn num_regs(&self) -> u32 {
        self.prog.num_regs
    }
    /// Decoded instructions (the entry and the functions it calls).
    pub fn instruction_count(&self) -> usize {
        self.prog.code.len()
    }
}

/// Grid, block, dynamic shared memory and the packed parameter buffer of one launch.
pub struct LaunchParams<'a> {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub dyn_smem: u32,
    pub params: &'a [u8],
}

/// Which checks run (memcheck and synccheck always do).
#[derive(Clone, Debug)]
pub struct Checks {
    pub racecheck: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    Memcheck,
    Synccheck,
    Racecheck,
    /// trap, a call with no target, and the like.
    Trap,
}

/// Why a launch failed: the first error found, with where.
#[derive(Clone, Debug)]
pub struct KernelFault {
    pub kind: FaultKind,
    pub kernel: String,
    pub block: [u32; 3],
    pub thread: [u32; 3],
    pub ptx_line: usize,
    /// The CUDA source location from `.loc` (file, line), when the PTX has line info.
    pub source: Option<(String, u32)>,
    pub address: Option<u64>,
    pub message: String,
}

impl fmt::Display for KernelFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} in {}: {}", self.kind, self.kernel, self.message)
    }
}

/// What a launch executed.
#[derive(Clone, Copy, Debug, Default)]
pub struct LaunchStats {
    pub warp_instructions: u64,
    pub ctas: u64,
}

/// Runs `kernel` over the grid (CTAs on rayon's pool), against `mem`.
#[allow(clippy::result_large_err)] // the driver's contract; a fault ends the launch, so rare
pub fn launch(
    kernel: &Kernel,
    lp: &LaunchParams,
    mem: &MemView,
    checks: &Checks,
) -> Result<LaunchStats, KernelFault> {
    let prog = &*kernel.prog;
    let setup_fault = |message: String| KernelFault {
        kind: FaultKind::Trap,
        kernel: prog.name.clone(),
        block: [0; 3],
        thread: [0; 3],
        ptx_line: 0,
        source: None,
        address: None,
        message,
    };
    let [bx, by, bz] = lp.block;
    let threads = bx as u64 * by as u64 * bz as u64;
    if threads == 0 || threads > 1024 || bz > 64 {
        return Err(setup_fault(format!(
            "block {:?} is not a legal CUDA block (1..=1024 threads, z <= 64)",
            lp.block
        )));
    }
    if let Some(max) = prog.max_threads.filter(|&m| threads > m as u64) {
        return Err(setup_fault(format!(
            "a block of {threads} threads exceeds the kernel's .maxntid ({max})"
        )));
    }
    if let Some(r) = prog.req_ntid.filter(|&r| r != lp.block) {
        return Err(setup_fault(format!(
            "block {:?}, the kernel requires .reqntid {r:?}",
            lp.block
        )));
    }
    if lp.grid.contains(&0) {
        return Err(setup_fault(format!(
            "grid {:?} has a zero dimension",
            lp.grid
        )));
    }
    if lp.params.len() < prog.param_bytes {
        return Err(setup_fault(format!(
            "the parameter buffer has {} bytes, the kernel's parameters take {}",
            lp.params.len(),
            prog.param_bytes
        )));
    }
    if prog.dyn_smem_off as u64 + lp.dyn_smem as u64 > MAX_SMEM as u64 {
        return Err(setup_fault(format!(
            "{} bytes of static and {} of dynamic shared memory exceed the {MAX_SMEM} a block \
             can have",
            prog.static_smem, lp.dyn_smem
        )));
    }
    if !kernel.bound {
        return Err(setup_fault(
            "the kernel names module variables whose addresses were never bound \
             (Module::bind_globals before Module::kernel)"
                .into(),
        ));
    }
    let stop = AtomicBool::new(false);
    let first: Mutex<Option<KernelFault>> = Mutex::new(None);
    let instrs = AtomicU64::new(0);
    let l = exec::Launch {
        prog,
        consts: &kernel.consts,
        mem,
        params: lp.params,
        grid: lp.grid,
        block: lp.block,
        dyn_smem: lp.dyn_smem,
        racecheck: checks.racecheck,
        stop: &stop,
    };
    let [gx, gy, gz] = lp.grid;
    let n = gx as u64 * gy as u64 * gz as u64;
    (0..n).into_par_iter().for_each(|i| {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let cta = [
            (i % gx as u64) as u32,
            ((i / gx as u64) % gy as u64) as u32,
            (i / (gx as u64 * gy as u64)) as u32,
        ];
        let mut st = CTA_STATE.with(|c| c.take()).unwrap_or_default();
        let r = st.run(&l, cta);
        CTA_STATE.with(|c| c.set(Some(st)));
        match r {
            Ok(k) => {
                instrs.fetch_add(k, Ordering::Relaxed);
            }
            Err(f) if f.stopped => {}
            Err(f) => {
                stop.store(true, Ordering::Relaxed);
                let mut g = first.lock().unwrap();
                if g.is_none() {
                    *g = Some(to_fault(prog, lp, cta, f));
                }
            }
        }
    });
    if let Some(f) = first.into_inner().unwrap() {
        return Err(f);
    }
    Ok(LaunchStats {
        warp_instructions: instrs.into_inner(),
        ctas: n,
    })
}

/// Shared memory a block can have (sm_90's 227 KiB plus the 1 KiB the system reserves).
const MAX_SMEM: u32 = 228 * 1024;

thread_local! {
    /// Each worker's CTA state, reused from CTA to CTA and launch to launch.
    static CTA_STATE: std::cell::Cell<Option<exec::Cta>> = const { std::cell::Cell::new(None) };
}

fn to_fault(
    prog: &decode::Program,
    lp: &LaunchParams,
    cta: [u32; 3],
    f: exec::Fail,
) -> KernelFault {
    let inst = prog.code.get(f.pc as usize);
    let line = inst.map_or(0, |i| i.line as usize);
    let source = inst
        .and_then(|i| prog.locs.get(i.loc as usize))
        .map(|(p, l)| (p.clone(), *l));
    let t = f.warp * 32 + f.lane;
    let [bx, by, _] = lp.block;
    let thread = [t % bx, (t / bx) % by, t / (bx * by)];
    let mut message = format!(
        "{} (kernel {}, block {:?}, thread {:?}, PTX line {line}",
        f.msg, prog.name, cta, thread
    );
    if let Some((p, l)) = &source {
        let short = p.rsplit('/').next().unwrap_or(p);
        message.push_str(&format!(", {short}:{l}"));
    }
    if let Some(a) = f.addr {
        message.push_str(&format!(", address {a:#x}"));
    }
    message.push(')');
    KernelFault {
        kind: f.kind,
        kernel: prog.name.clone(),
        block: cta,
        thread,
        ptx_line: line,
        source,
        address: f.addr,
        message,
    }
}
