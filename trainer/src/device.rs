//! Device selection for the CLI: `cpu`, `cuda[:N]` or `auto`.

use anyhow::{bail, Context, Result};
use engine::dist::{rendezvous, DistEnv, NcclComm};

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

/// The start-up of `--dist`: this process's rank from the launcher's variables (torchrun,
/// mpirun, srun), its GPU `cuda:LOCAL_RANK`, and an NCCL communicator whose id rank 0 hands to
/// the others through the rendezvous (`spec`, or `MASTER_ADDR:MASTER_PORT`). Where CUDA or
/// NCCL is missing it fails with a message, before the other ranks wait on this one.
pub fn open_dist(spec: Option<&str>) -> Result<(engine::Cuda, NcclComm)> {
    let env = DistEnv::from_env().context("--dist: reading the launch environment")?;
    let rdv = env.rendezvous(spec).context("--dist")?;
    let cuda = open_cuda(env.local_rank).with_context(|| {
        format!(
            "--dist: rank {} of {} drives cuda:{} (LOCAL_RANK); data parallelism runs on GPUs \
             over NCCL (leave out --dist to train in one process)",
            env.rank, env.world, env.local_rank
        )
    })?;
    let comm =
        NcclComm::init(&cuda, &env, &rdv, rendezvous::DEFAULT_TIMEOUT).with_context(|| {
            format!(
                "--dist: joining the NCCL group as rank {} of {} (rendezvous {rdv:?})",
                env.rank, env.world
            )
        })?;
    Ok((cuda, comm))
}
