//! `gpu-sim`: runs a program on simulated GPUs.
//!
//! `gpu-sim run [OPTIONS] -- PROGRAM ARGS...` puts the simulator's library first on
//! `LD_LIBRARY_PATH` under the names cudarc opens (libcuda.so, libcublas.so, libcublasLt.so,
//! libnccl.so), sets `GPU_SIM=1` (so tests can ask whether they run on the simulator) and the
//! model's knobs, and runs the program. `gpu-sim launch --nproc N -- PROGRAM` does the same for N
//! processes of one data-parallel job, with the variables torchrun sets.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::{Command, ExitCode};

#[derive(Parser)]
#[command(
    name = "gpu-sim",
    version,
    about = "Run CUDA programs on simulated GPUs (real PTX on the CPU, with memcheck, synccheck and racecheck)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one program on simulated GPUs.
    Run {
        #[command(flatten)]
        model: Model,
        /// The program and its arguments (after `--`).
        #[arg(last = true, required = true)]
        program: Vec<String>,
    },
    /// Run N processes of one data-parallel job (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    /// MASTER_PORT set as torchrun sets them), each seeing the same N simulated GPUs.
    Launch {
        /// Processes (ranks), one per simulated GPU.
        #[arg(long, default_value_t = 2)]
        nproc: u32,
        #[command(flatten)]
        model: Model,
        #[arg(last = true, required = true)]
        program: Vec<String>,
    },
    /// Print the environment `run` sets, as shell `export` lines.
    Env {
        #[command(flatten)]
        model: Model,
    },
}

/// The GPU being modelled and the checks.
#[derive(Args, Clone)]
struct Model {
    /// Simulated GPUs per process.
    #[arg(long)]
    gpus: Option<u32>,
    /// Streaming multiprocessors per GPU (what the program sizes its grids by).
    #[arg(long, default_value_t = 108)]
    sms: u32,
    /// Device memory per GPU, GiB (backed by host memory as it is used).
    #[arg(long, default_value_t = 16)]
    mem_gib: u64,
    /// Turn off racecheck (shared-memory hazards between warps); memcheck and synccheck stay on.
    #[arg(long)]
    no_racecheck: bool,
    /// A directory of `<module>.ptx` files that replace the PTX of `kernels-cu/<module>.cu`
    /// when the program loads it (runs a mutated kernel without rebuilding the program).
    #[arg(long)]
    ptx_override: Option<PathBuf>,
    /// Plant a host-side fault (comma-separated): skip-event-waits, swap-args:KERNEL:I:J,
    /// lt-flip-transa:N.
    #[arg(long)]
    fault: Option<String>,
    /// Print every launch and library call as it executes.
    #[arg(long)]
    trace: bool,
}

/// The directory holding the simulator's library under the names cudarc opens, made next to
/// this executable's `libgpu_sim.so` on first use.
fn lib_dir() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("locating gpu-sim: {e}"))?;
    let dir = exe.parent().ok_or("gpu-sim has no parent directory")?;
    let so = gpu_sim::shared_library_near(dir).ok_or_else(|| {
        format!(
            "libgpu_sim.so not found next to {} (build it: cargo build --release -p gpu-sim)",
            exe.display()
        )
    })?;
    let so = so
        .canonicalize()
        .map_err(|e| format!("{}: {e}", so.display()))?;
    let lib = dir.join("gpu-sim-lib");
    std::fs::create_dir_all(&lib).map_err(|e| format!("creating {}: {e}", lib.display()))?;
    for name in [
        "libcuda.so",
        "libcuda.so.1",
        "libcublas.so",
        "libcublasLt.so",
        "libnccl.so",
        "libnccl.so.2",
    ] {
        let link = lib.join(name);
        if std::fs::read_link(&link).ok().as_deref() == Some(so.as_path()) {
            continue;
        }
        // Replace atomically: a concurrent gpu-sim may be making the same link.
        let tmp = lib.join(format!(".{name}.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&so, &tmp)
            .and_then(|_| std::fs::rename(&tmp, &link))
            .map_err(|e| format!("linking {}: {e}", link.display()))?;
    }
    Ok(lib)
}

fn env_for(model: &Model, gpus: u32) -> Result<Vec<(String, String)>, String> {
    let lib = lib_dir()?;
    let ld = match std::env::var("LD_LIBRARY_PATH") {
        Ok(p) if !p.is_empty() => format!("{}:{p}", lib.display()),
        _ => lib.display().to_string(),
    };
    let mut v = vec![
        ("LD_LIBRARY_PATH".to_string(), ld),
        ("GPU_SIM".into(), "1".into()),
        ("GPU_SIM_GPUS".into(), gpus.to_string()),
        ("GPU_SIM_SMS".into(), model.sms.to_string()),
        ("GPU_SIM_MEM_GIB".into(), model.mem_gib.to_string()),
        (
            "GPU_SIM_RACECHECK".into(),
            if model.no_racecheck { "0" } else { "1" }.into(),
        ),
    ];
    if let Some(d) = &model.ptx_override {
        let d = d
            .canonicalize()
            .map_err(|e| format!("--ptx-override {}: {e}", d.display()))?;
        v.push(("GPU_SIM_PTX_OVERRIDE".into(), d.display().to_string()));
    }
    if let Some(f) = &model.fault {
        v.push(("GPU_SIM_FAULT".into(), f.clone()));
    }
    if model.trace {
        v.push(("GPU_SIM_TRACE".into(), "1".into()));
    }
    Ok(v)
}

fn command(program: &[String], env: &[(String, String)]) -> Command {
    let mut c = Command::new(&program[0]);
    c.args(&program[1..]);
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn exit_of(status: std::process::ExitStatus) -> ExitCode {
    match status.code() {
        Some(c) => ExitCode::from(c.clamp(0, 255) as u8),
        None => ExitCode::from(128 + 9),
    }
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    match cli.cmd {
        Cmd::Run { model, program } => {
            let env = env_for(&model, model.gpus.unwrap_or(1))?;
            let status = command(&program, &env)
                .status()
                .map_err(|e| format!("running {}: {e}", program[0]))?;
            Ok(exit_of(status))
        }
        Cmd::Launch {
            nproc,
            model,
            program,
        } => {
            if nproc == 0 {
                return Err("--nproc must be at least 1".into());
            }
            let env = env_for(&model, model.gpus.unwrap_or(nproc))?;
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| format!("finding a free port: {e}"))?
                .port();
            let mut children = Vec::new();
            for rank in 0..nproc {
                let mut c = command(&program, &env);
                c.env("RANK", rank.to_string())
                    .env("LOCAL_RANK", rank.to_string())
                    .env("WORLD_SIZE", nproc.to_string())
                    .env("LOCAL_WORLD_SIZE", nproc.to_string())
                    .env("MASTER_ADDR", "127.0.0.1")
                    .env("MASTER_PORT", port.to_string());
                children.push(
                    c.spawn()
                        .map_err(|e| format!("starting rank {rank}: {}: {e}", program[0]))?,
                );
            }
            let mut worst = ExitCode::SUCCESS;
            let mut failed = Vec::new();
            for (rank, mut ch) in children.into_iter().enumerate() {
                let st = ch
                    .wait()
                    .map_err(|e| format!("waiting for rank {rank}: {e}"))?;
                if !st.success() {
                    failed.push(format!("rank {rank}: {st}"));
                    worst = exit_of(st);
                }
            }
            if !failed.is_empty() {
                eprintln!("gpu-sim launch: {}", failed.join("; "));
            }
            Ok(worst)
        }
        Cmd::Env { model } => {
            for (k, v) in env_for(&model, model.gpus.unwrap_or(1))? {
                println!("export {k}={}", shell_quote(&v));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-:=,".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gpu-sim: {e}");
            ExitCode::from(2)
        }
    }
}
