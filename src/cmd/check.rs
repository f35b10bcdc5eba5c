//! Checks and benchmarks: `check` against a reference dump, `bench`, `selftest`.

use super::common::on_device;
use anyhow::{bail, Context, Result};
use clap::Subcommand;
use engine::check::{check_fixture, Tolerances};
use engine::Cpu;
use std::path::PathBuf;
use trainer::device::Device;

#[derive(clap::Args)]
pub struct CheckArgs {
    /// A fixture directory: config.json, model.safetensors, case/rm/adamw.safetensors.
    dir: PathBuf,
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Absolute bound for the loss and rewards (default 2e-5 on the CPU, the bf16 bound of
    /// engine::check::Tolerances::BF16 on CUDA).
    #[arg(long)]
    atol: Option<f32>,
    /// Bound for gradients, relative to each tensor's largest reference entry (default 1e-4
    /// on the CPU, Tolerances::BF16 on CUDA).
    #[arg(long)]
    rtol: Option<f32>,
    /// Bound for the logits, relative to the reference logits' largest magnitude, so checkpoints
    /// with large logits are held to the same precision as small ones (default 1e-5 on the
    /// CPU, Tolerances::BF16 on CUDA).
    #[arg(long)]
    logits_rtol: Option<f32>,
}

pub fn check(a: CheckArgs) -> Result<()> {
    let CheckArgs {
        dir,
        device,
        atol,
        rtol,
        logits_rtol,
    } = a;
    // bf16 compute needs the wider bounds unless they are given explicitly.
    let base = match device {
        Device::Cpu => Tolerances::F32,
        Device::Cuda(_) => Tolerances::BF16,
    };
    let tol = Tolerances {
        abs: atol.unwrap_or(base.abs),
        rel: rtol.unwrap_or(base.rel),
        logits_rel: logits_rtol.unwrap_or(base.logits_rel),
    };
    tol.validate()?; // before the device opens or anything is read
    let rep = on_device!(device, |be| {
        println!(
            "checking {} on {} (atol {:e}, rtol {:e}, logits rtol {:e})",
            dir.display(),
            engine::Backend::name(&be),
            tol.abs,
            tol.rel,
            tol.logits_rel
        );
        check_fixture(be, &dir, tol).with_context(|| format!("fixture {}", dir.display()))?
    });
    println!("{}", rep.to_table());
    if rep.failed() > 0 {
        std::process::exit(1);
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Training throughput: tokens/s after warm-up, model FLOP/s, fraction of a same-run matmul.
    Train {
        /// A preset name (tiny, 7b, 13b, 34b, 70b) or an HF config.json.
        #[arg(long, default_value = "tiny")]
        config: String,
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        #[arg(long, default_value_t = 5)]
        steps: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        #[arg(long, default_value = "cpu")]
        device: Device,
        /// Also time transformers' LlamaForCausalLM on the same shapes (needs torch).
        #[arg(long)]
        vs_torch: bool,
        /// Activation recomputation: none, attn (rebuild the attention half of each layer in the
        /// backward) or full (keep only each layer's input and re-run its forward).
        #[arg(long, default_value = "none")]
        recompute: engine::Recompute,
        /// Write the report as JSON too.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Device memory of one training process per recompute setting (weights, fp32 master,
    /// gradients, optimizer, activations), from the engine's own allocations on a dry-run
    /// backend: no GPU needed. `--world N` plans one rank of a ZeRO-1 run.
    Memory {
        /// A preset name (tiny, 7b, 13b, 34b, 70b) or an HF config.json.
        #[arg(long, default_value = "7b")]
        config: String,
        #[arg(long, default_value_t = 4096)]
        seq_len: usize,
        #[arg(long, default_value_t = 1)]
        batch_size: usize,
        /// Ranks the optimizer state is sharded over (ZeRO-1); 1 is one process, whole AdamW.
        #[arg(long, default_value_t = 1)]
        world: usize,
        /// cuda (bf16 compute weights, the default) or cpu (f32, the master is the weights).
        #[arg(long, default_value = "cuda")]
        device: Device,
        /// The GPU's memory in GB (10^9 bytes), for the `fits` column.
        #[arg(long, default_value_t = 80.0)]
        gpu_gb: f64,
        /// Write the plans as JSON too.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Every CUDA kernel on Llama 2 7B and ~1B shapes: time, GB/s or TFLOP/s, and the fraction
    /// of this run's copy bandwidth and bf16 GEMM TFLOP/s.
    Kernels {
        #[arg(long, default_value = "cuda")]
        device: Device,
        /// Which shapes: 7b, 1b or all.
        #[arg(long, default_value = "all")]
        config: String,
        /// Timed repetitions per kernel (after one warm-up call).
        #[arg(long, default_value_t = 20)]
        reps: usize,
        /// Also time PyTorch's equivalents (scripts/torch_kernel_bench.py; python from
        /// $LLAMA2_PYTHON or python3).
        #[arg(long)]
        vs_torch: bool,
        /// Write the report as JSON too.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

/// `--config`: an HF config.json if such a file exists, else a preset name.
fn model_config(config: &str) -> Result<engine::LlamaConfig> {
    let path = std::path::Path::new(config);
    Ok(if path.is_file() {
        engine::LlamaConfig::from_file(path)?
    } else {
        engine::LlamaConfig::preset(config)?
    })
}

/// Writes a report as pretty JSON where `--json` asked for it.
fn write_json(path: Option<PathBuf>, report: &impl serde::Serialize) -> Result<()> {
    if let Some(p) = path {
        std::fs::write(&p, serde_json::to_string_pretty(report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

pub fn bench(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Train {
            config,
            seq_len,
            batch_size,
            steps,
            warmup,
            device,
            vs_torch,
            recompute,
            json,
        } => {
            let model = model_config(&config)?;
            let rep = on_device!(device, |be| {
                let cfg = trainer::bench::BenchConfig {
                    model,
                    seq_len,
                    batch_size,
                    steps,
                    warmup,
                    vs_torch,
                    device_name: engine::Backend::name(&be),
                    recompute,
                };
                trainer::bench::run(be, &cfg)?
            });
            rep.print();
            write_json(json, &rep)?;
        }
        BenchCmd::Memory {
            config,
            seq_len,
            batch_size,
            world,
            device,
            gpu_gb,
            json,
        } => {
            let model = model_config(&config)?;
            let plans = match device {
                // The dry run models an H100 (132 SMs); the allocations do not depend on it.
                Device::Cuda(_) => trainer::memory::plan(
                    engine::Cuda::dry_run(132, true)?,
                    &model,
                    world,
                    batch_size,
                    seq_len,
                )?,
                Device::Cpu => trainer::memory::plan(Cpu, &model, world, batch_size, seq_len)?,
            };
            println!(
                "{} parameters on {}, batch {batch_size} x seq {seq_len}, {}",
                plans[0].params,
                if matches!(device, Device::Cpu) {
                    "the CPU (f32)"
                } else {
                    "CUDA (bf16 compute, fp32 master and moments)"
                },
                if world > 1 {
                    format!("one rank of {world} (ZeRO-1)")
                } else {
                    "one process".to_string()
                }
            );
            print!(
                "{}",
                trainer::memory::table(&plans, Some((gpu_gb * 1e9) as u64))
            );
            println!(
                "(the engine's own buffers; add the CUDA context, cuBLAS's 32 MiB workspace and NCCL's buffers)"
            );
            write_json(json, &plans)?;
        }
        BenchCmd::Kernels {
            device,
            config,
            reps,
            vs_torch,
            json,
        } => {
            use trainer::kernel_bench::{Config, Shapes};
            let n = match device {
                Device::Cuda(n) => n,
                Device::Cpu => bail!("bench kernels times the CUDA kernels: use --device cuda[:N]"),
            };
            let cx = trainer::device::open_cuda(n)?;
            let shapes = match config.as_str() {
                "7b" => vec![Shapes::llama2_7b()],
                "1b" => vec![Shapes::llama_1b()],
                "all" => vec![Shapes::llama2_7b(), Shapes::llama_1b()],
                other => bail!("--config {other}: expected 7b, 1b or all"),
            };
            let rep = trainer::kernel_bench::run(
                &cx,
                &Config {
                    shapes,
                    reps,
                    vs_torch,
                },
            )?;
            rep.print();
            write_json(json, &rep)?;
        }
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct SelftestArgs {
    /// Where the round-trip checkpoint is written.
    #[arg(long, default_value = "runs/selftest")]
    out: PathBuf,
}

pub fn selftest(a: SelftestArgs) -> Result<()> {
    let SelftestArgs { out } = a;
    println!("llama2 selftest on {}", engine::Backend::name(&Cpu));
    let s = trainer::selftest::run(&out)?;
    for l in s.lines {
        println!("  {l}");
    }
    println!("selftest passed");
    Ok(())
}
