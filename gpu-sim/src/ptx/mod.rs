//! PTX: the module's real text, parsed, pre-decoded and executed warp by warp.
//!
//! STUB: the public API the driver builds on. The interpreter behind it is being written (see
//! the helper's brief); signatures here are the contract.

use crate::mem::MemView;
use std::fmt;

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

/// A parsed module.
pub struct Module {}

impl Module {
    /// Parses and decodes `text`; every instruction is checked to be supported.
    pub fn parse(_text: &str) -> Result<Module, LoadError> {
        unimplemented!("ptx interpreter")
    }
    /// Module-scope variables that need device memory, in a fixed order.
    pub fn globals(&self) -> Vec<GlobalVar> {
        unimplemented!()
    }
    /// Their device addresses (allocated and initialised by the driver), in `globals()` order.
    pub fn bind_globals(&mut self, _addrs: &[u64]) {
        unimplemented!()
    }
    pub fn kernel_names(&self) -> Vec<String> {
        unimplemented!()
    }
    pub fn kernel(&self, _name: &str) -> Option<Kernel> {
        unimplemented!()
    }
}

/// A kernel of a loaded module (cheap to clone; keeps the module alive).
#[derive(Clone)]
pub struct Kernel {}

impl Kernel {
    pub fn name(&self) -> &str {
        unimplemented!()
    }
    pub fn params(&self) -> &[ParamInfo] {
        unimplemented!()
    }
    pub fn param_bytes(&self) -> usize {
        unimplemented!()
    }
    pub fn static_smem(&self) -> u32 {
        unimplemented!()
    }
    pub fn local_bytes(&self) -> u32 {
        unimplemented!()
    }
    pub fn max_threads(&self) -> Option<u32> {
        unimplemented!()
    }
    pub fn req_ntid(&self) -> Option<[u32; 3]> {
        unimplemented!()
    }
    pub fn num_regs(&self) -> u32 {
        unimplemented!()
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
pub fn launch(
    _kernel: &Kernel,
    _lp: &LaunchParams,
    _mem: &MemView,
    _checks: &Checks,
) -> Result<LaunchStats, KernelFault> {
    unimplemented!()
}
