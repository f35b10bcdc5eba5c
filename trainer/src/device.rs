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

/// `auto` picks CUDA when the engine has a CUDA backend and a driver with a GPU is present;
/// this build has only the CPU backend, so it is the CPU.
fn resolve_auto() -> Device {
    Device::Cpu
}

/// Fails with a message that says what to do when a device is not available in this build.
pub fn require_cpu(d: Device) -> Result<()> {
    match d {
        Device::Cpu => Ok(()),
        Device::Cuda(n) => bail!(
            "--device cuda:{n}: this build has no CUDA backend yet (the CPU backend is the reference); use --device cpu"
        ),
    }
}
