//! Device selection for the CLI: `cpu`, `cuda[:N]` or `auto`.

use anyhow::{bail, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "auto" => Ok(resolve_auto()),
            "cuda" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(n)) => Ok(Device::Cuda(n)),
                _ => bail!("unknown device `{s}` (expected cpu, cuda, cuda:N or auto)"),
            },
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// `auto` picks CUDA (GPU 0) when a driver with a GPU is present and this build has compiled
/// kernels, else the CPU.
fn resolve_auto() -> Device {
    if engine::backend::cuda::KERNELS_COMPILED && engine::backend::cuda::cuda_available() {
        Device::Cuda(0)
    } else {
        Device::Cpu
    }
}

/// Opens the CUDA backend on GPU `n`, with a message that says what to do when it cannot.
pub fn open_cuda(n: usize) -> Result<engine::Cuda> {
    engine::Cuda::new(n).map_err(|e| anyhow::anyhow!("--device cuda:{n}: {e}"))
}

/// Fails with a message that says what to do when a command runs only on the CPU.
pub fn require_cpu(d: Device) -> Result<()> {
    match d {
        Device::Cpu => Ok(()),
        Device::Cuda(n) => {
            bail!("--device cuda:{n}: this command runs on the CPU only; use --device cpu")
        }
    }
}
