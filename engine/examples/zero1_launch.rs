//! The whole data-parallel path in one small program, launched like any torch job:
//! launch environment → rendezvous → NCCL communicator → ZeRO-1 steps → sharded checkpoint.
//!
//! ```sh
//! cargo build --release --example zero1_launch
//! torchrun --nproc-per-node 8 --no-python target/release/examples/zero1_launch --steps 20
//! target/release/examples/zero1_launch --device cpu --steps 20     # one process, CPU
//! ```
//!
//! A tiny Llama on synthetic sequences (arithmetic progressions mod the vocabulary, so the loss
//! falls): a smoke test of launch and sharding, not a training recipe. With `--device cuda` the
//! collectives are NCCL's, which has NOT RUN YET (written without a GPU); `--device cpu` runs one
//! process with the in-process stand-in.

use anyhow::{bail, Context, Result};
use engine::checkpoint::{load_model, SaveOptions};
use engine::dist::{
    rendezvous, save_zero1, DeviceCollective, DistEnv, NcclComm, ShardedAdamW, ThreadGroup,
};
use engine::model::shift_labels;
use engine::optim::AdamWConfig;
use engine::{Backend, Batch, Cpu, Cuda, Head, Llama, LlamaConfig};
use std::path::PathBuf;
use std::time::Duration;

struct Args {
    device: String,
    gpu: Option<usize>,
    steps: usize,
    batch: usize,
    seq: usize,
    lr: f32,
    rendezvous: Option<String>,
    timeout: Duration,
    save: Option<PathBuf>,
    resume: Option<PathBuf>,
    /// Gradient buckets in elements, reduced while the backward runs (0: after it).
    bucket: usize,
}

const USAGE: &str = "zero1_launch [--device cuda|cpu] [--gpu N] [--steps N] [--batch N] [--seq N] \
[--lr X] [--bucket ELEMS] [--rendezvous file:PATH|HOST:PORT] [--timeout SECS] [--save DIR] \
[--resume DIR]";

fn parse_args() -> Result<Args> {
    let mut a = Args {
        device: "cuda".into(),
        gpu: None,
        steps: 20,
        batch: 4,
        seq: 64,
        lr: 1e-3,
        rendezvous: None,
        timeout: rendezvous::DEFAULT_TIMEOUT,
        save: None,
        resume: None,
        bucket: 1 << 16,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let v = it
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        let num = |v: &str| v.parse::<usize>().with_context(|| format!("{flag} {v:?}"));
        match flag.as_str() {
            "--device" => a.device = v,
            "--gpu" => a.gpu = Some(num(&v)?),
            "--steps" => a.steps = num(&v)?,
            "--batch" => a.batch = num(&v)?,
            "--seq" => a.seq = num(&v)?,
            "--lr" => a.lr = v.parse().with_context(|| format!("--lr {v:?}"))?,
            "--rendezvous" => a.rendezvous = Some(v),
            "--timeout" => a.timeout = Duration::from_secs(num(&v)? as u64),
            "--save" => a.save = Some(v.into()),
            "--resume" => a.resume = Some(v.into()),
            "--bucket" => a.bucket = num(&v)?,
            _ => bail!("unknown flag {flag}\n{USAGE}"),
        }
    }
    Ok(a)
}

fn config() -> LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 256,
        "hidden_size": 128,
        "intermediate_size": 344,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
    }))
    .expect("config")
}

/// Global sequence `g` of step `step`: start and stride from a hash of (step, g).
fn sequence(step: usize, g: usize, t: usize, vocab: usize) -> impl Iterator<Item = i32> {
    let mut h = (step as u64) << 32 | g as u64;
    h = h.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (h >> 29);
    let (a, s) = (h % vocab as u64, 1 + (h >> 17) % 7);
    (0..t as u64).map(move |i| ((a + s * i) % vocab as u64) as i32)
}

fn run<B: Backend>(be: B, comm: &mut dyn DeviceCollective<B>, a: &Args) -> Result<()> {
    let (rank, world) = (comm.rank(), comm.world());
    let cfg = AdamWConfig::default();
    let (mut model, mut opt, first) = match &a.resume {
        None => {
            let mut m = Llama::new(be, config(), Head::Lm)?;
            m.init_random(1234)?; // the same seed on every rank: identical replicas
            let opt = ShardedAdamW::new(&mut m, cfg, rank, world)?;
            (m, opt, 0)
        }
        Some(dir) => {
            let mut m = load_model(be, dir, Head::Lm)?;
            let mut opt = ShardedAdamW::load(&mut m, cfg, rank, world, dir)?;
            opt.gather_params(&mut m, comm)?;
            let first = opt.step as usize;
            (m, opt, first)
        }
    };
    let (b, t) = (a.batch, a.seq);
    let vocab = model.cfg.vocab_size;
    for step in first..first + a.steps {
        let ids: Vec<i32> = (rank * b..(rank + 1) * b)
            .flat_map(|g| sequence(step, g, t, vocab))
            .collect();
        model.zero_grads()?;
        model.forward(&Batch::new(&ids, b, t))?;
        let (loss, count) = model.lm_loss(&shift_labels(&ids, b, t))?;
        // Gradients are summed across ranks: scale so the sum is the global mean. Finished
        // layers' gradients are reduced in buckets while the backward goes on.
        let scale = 1.0 / (world * count) as f32;
        if a.bucket > 0 {
            model.backward_lm_with(scale, Some(&mut opt.overlap(&mut *comm, a.bucket)))?;
        } else {
            model.backward_lm(scale)?;
        }
        let st = opt.step(&mut model, comm, a.lr)?;
        let mut mean = [loss / world as f32];
        comm.all_reduce_sum(&mut mean)?;
        if rank == 0 {
            println!(
                "step {:4}  loss {:.4}  grad_norm {:.4}",
                step + 1,
                mean[0],
                st.grad_norm
            );
        }
    }
    if let Some(dir) = &a.save {
        save_zero1(dir, &model, &opt, comm, SaveOptions::default(), |_| Ok(()))?;
        if rank == 0 {
            println!("saved {} ({} optimizer shards)", dir.display(), world);
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let a = parse_args()?;
    let env = DistEnv::from_env()?;
    match a.device.as_str() {
        "cpu" => {
            if env.is_distributed() {
                bail!(
                    "--device cpu runs one process (WORLD_SIZE is {}): multi-process runs need \
                     NCCL (--device cuda); the CPU stand-in's ranks are threads of one process \
                     (engine/tests/zero1.rs)",
                    env.world
                );
            }
            let mut comm = ThreadGroup::new(1).pop().expect("one rank");
            run(Cpu, &mut comm, &a)
        }
        "cuda" => {
            let rdv = env.rendezvous(a.rendezvous.as_deref())?;
            let cuda = Cuda::new(a.gpu.unwrap_or(env.local_rank))?;
            let mut comm = NcclComm::init(&cuda, &env, &rdv, a.timeout)?;
            if env.rank == 0 {
                println!(
                    "{} ranks ({:?}), rendezvous {rdv:?}, NCCL {}",
                    env.world,
                    env.launcher,
                    engine::dist::nccl::version()?
                );
            }
            run(cuda, &mut comm, &a)
        }
        d => bail!("--device {d}: expected cuda or cpu"),
    }
}
