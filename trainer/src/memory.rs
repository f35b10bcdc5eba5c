//! What one training process holds on its device, from the engine's own allocations: the model
//! and optimizer buffers and the activations of a `batch` × `seq` step per recompute setting,
//! single-process or as one rank of a ZeRO-1 run. On CUDA it runs on a dry-run backend (buffers
//! with fake addresses, no GPU), so a 70B plan costs nothing and needs no GPU; the figures are
//! exactly what the engine asks the driver for, before the CUDA context, cuBLAS's workspace,
//! NCCL's buffers and the allocator's rounding.

use anyhow::Result;
use engine::dist::ShardedAdamW;
use engine::optim::{AdamW, AdamWConfig};
use engine::{ActBytes, Backend, Head, Llama, LlamaConfig, Recompute};
use serde::Serialize;

/// One process's device bytes for one recompute setting.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryPlan {
    pub recompute: Recompute,
    /// Ranks the optimizer state is sharded over (1: whole AdamW in one process).
    pub world: usize,
    pub params: usize,
    /// The weights the ops read: bf16 on CUDA (none apart from the master on the CPU).
    pub compute_weights: usize,
    /// The full fp32 master: released to the optimizer under ZeRO-1 where there is a compute copy.
    pub master: usize,
    pub grads: usize,
    /// AdamW's moments, plus under ZeRO-1 this rank's master and summed-gradient shards.
    pub optimizer: usize,
    pub activations: ActBytes,
}

impl MemoryPlan {
    pub fn total(&self) -> usize {
        self.compute_weights + self.master + self.grads + self.optimizer + self.activations.total()
    }
}

/// The plan for every recompute setting, with the allocations of `be` (a dry-run CUDA backend
/// for CUDA figures): a model of `cfg` with an LM head, its optimizer (ZeRO-1 rank 0 of `world`
/// when `world` > 1), and the activations of `batch` sequences of `seq` tokens.
pub fn plan<B: Backend>(
    be: B,
    cfg: &LlamaConfig,
    world: usize,
    batch: usize,
    seq: usize,
) -> Result<Vec<MemoryPlan>> {
    anyhow::ensure!(world >= 1, "a world of at least one rank");
    let act = std::mem::size_of::<B::Act>();
    let mut model = Llama::new(be, cfg.clone(), Head::Lm)?;
    let n = model.num_params();
    let optimizer = if world > 1 {
        let o = ShardedAdamW::new(&mut model, AdamWConfig::default(), 0, world)?;
        // master, m, v and the gradient shard.
        4 * 4 * o.shard.len
    } else {
        let o = AdamW::new(&model, AdamWConfig::default())?;
        4 * (B::len(&o.m) + B::len(&o.v))
    };
    let base = |recompute, activations| MemoryPlan {
        recompute,
        world,
        params: n,
        compute_weights: act * B::len(&model.shadow),
        master: 4 * model.master.len(),
        grads: 4 * B::len(&model.grads),
        optimizer,
        activations,
    };
    let mut out = Vec::new();
    for r in Recompute::ALL {
        let mut m = Llama::new(model.be.clone(), cfg.clone(), Head::Lm)?;
        m.set_recompute(r);
        let a = m.reserve_activations(batch, seq)?;
        drop(m);
        out.push(base(r, a));
    }
    Ok(out)
}

/// The plans as a table (GiB, or MiB for small models); `capacity` (bytes) adds a column
/// saying whether each fits.
pub fn table(plans: &[MemoryPlan], capacity: Option<u64>) -> String {
    let big = plans.iter().any(|p| p.total() >= 1 << 30);
    let (unit, div) = if big { ("GiB", 30) } else { ("MiB", 20) };
    let g = |b: usize| format!("{:.2}", b as f64 / (1u64 << div) as f64);
    let mut s = format!(
        "recompute | weights {unit} | fp32 master | grads | optimizer | activations | total {unit}"
    );
    if capacity.is_some() {
        s += " | fits";
    }
    s.push('\n');
    for p in plans {
        s += &format!(
            "{:<9} | {:>11} | {:>11} | {:>5} | {:>9} | {:>11} | {:>9}",
            p.recompute.to_string(),
            g(p.compute_weights),
            g(p.master),
            g(p.grads),
            g(p.optimizer),
            g(p.activations.total()),
            g(p.total())
        );
        if let Some(c) = capacity {
            s += if p.total() as u64 <= c {
                " | yes"
            } else {
                " | no"
            };
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::Cpu;

    fn tiny() -> LlamaConfig {
        LlamaConfig::preset("tiny").unwrap()
    }

    /// On the CPU (the master is the compute weights): 4 + 4 bytes per parameter for the model,
    /// 8 for whole AdamW, 16 · ceil(n/N) for a ZeRO-1 rank; activations shrink with recompute.
    #[test]
    fn cpu_plan_counts_the_buffers() {
        let single = plan(Cpu, &tiny(), 1, 2, 64).unwrap();
        let n = single[0].params;
        for p in &single {
            assert_eq!(
                (p.compute_weights, p.master, p.grads, p.optimizer),
                (0, 4 * n, 4 * n, 8 * n)
            );
        }
        let (none, attn, full) = (&single[0], &single[1], &single[2]);
        assert!(none.activations.total() > attn.activations.total());
        assert!(attn.activations.total() > full.activations.total());
        let sharded = plan(Cpu, &tiny(), 3, 2, 64).unwrap();
        assert_eq!(sharded[0].optimizer, 16 * n.div_ceil(3));
        assert_eq!(sharded[0].master, 4 * n);
        assert_eq!(sharded[0].activations, none.activations);
    }

    /// The bar, from the CUDA backend's own allocations (a dry run): Llama 2 7B does not
    /// train in one 80 GB GPU as one process at sequence 4096 with any recompute setting, but
    /// as one of 8 ZeRO-1 ranks (master released, 6 + 16/8 bytes per parameter) it fits with
    /// `full` recompute; a 1B-class model fits alone at sequence 4096.
    #[test]
    fn llama2_7b_fits_an_80gb_gpu_under_zero1() {
        let be = match engine::backend::cuda::Cuda::dry_run(132, true) {
            Ok(b) => b,
            Err(e) => {
                println!("skipped: {e}");
                return;
            }
        };
        let cap = 80_000_000_000usize;
        let cfg = LlamaConfig::preset("7b").unwrap();
        let one = plan(be.clone(), &cfg, 1, 1, 4096).unwrap();
        let n = one[0].params;
        assert_eq!(one[0].compute_weights, 2 * n);
        assert_eq!(
            (one[0].master, one[0].grads, one[0].optimizer),
            (4 * n, 4 * n, 8 * n)
        );
        assert!(one.iter().all(|p| p.total() > cap), "{}", table(&one, None));
        let eight = plan(be.clone(), &cfg, 8, 1, 4096).unwrap();
        assert_eq!(eight[0].master, 0, "ZeRO-1 must release the full master");
        assert_eq!(eight[0].optimizer, 16 * n.div_ceil(8));
        let full = eight
            .iter()
            .find(|p| p.recompute == Recompute::Full)
            .unwrap();
        assert!(full.total() < cap, "{}", table(&eight, None));
        let one_b = LlamaConfig::from_file(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../bench/configs/llama-1b.json"),
        )
        .unwrap();
        let p = plan(be, &one_b, 1, 1, 4096).unwrap();
        let full = p.iter().find(|p| p.recompute == Recompute::Full).unwrap();
        assert!(full.total() < cap, "{}", table(&p, None));
    }
}
