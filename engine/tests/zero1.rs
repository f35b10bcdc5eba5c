//! ZeRO-1 data parallelism on the CPU stand-in: N ranks (threads) with sharded AdamW state give
//! the same losses and weights as one process on the N× batch, within float reassociation.

use engine::dist::{Collective, ShardedAdamW, ThreadGroup};
use engine::model::shift_labels;
use engine::optim::{AdamW, AdamWConfig};
use engine::{Batch, Cpu, Head, Llama, LlamaConfig};
use std::thread;

const B: usize = 2; // sequences per rank
const T: usize = 8;
const STEPS: usize = 3;
const LR: f32 = 1e-2;

/// Hidden 35 with an explicit head_dim 8: every tensor is a multiple of 35, so the parameter
/// count (21455) is divisible by neither 2 nor 3 and the last shard is padded.
fn config() -> LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 64,
        "hidden_size": 35,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "max_position_embeddings": 64,
    }))
    .unwrap()
}

fn model() -> Llama<Cpu> {
    let mut m = Llama::new(Cpu, config(), Head::Lm).unwrap();
    m.init_random(7).unwrap();
    m
}

/// `nb` fixed pseudo-random sequences of T tokens.
fn tokens(nb: usize) -> Vec<i32> {
    let mut s = 0x2545_f491_4f6c_dd1du64;
    (0..nb * T)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % 64) as i32
        })
        .collect()
}

/// Forward, mean loss, and backward of `scale ·` that mean into zeroed gradients.
fn loss_and_grads(m: &mut Llama<Cpu>, ids: &[i32], b: usize, scale: f32) -> f32 {
    m.zero_grads().unwrap();
    m.forward(&Batch::new(ids, b, T)).unwrap();
    let (loss, count) = m.lm_loss(&shift_labels(ids, b, T)).unwrap();
    m.backward_lm(scale / count as f32).unwrap();
    loss
}

fn opt_cfg(clip: Option<f32>) -> AdamWConfig {
    AdamWConfig {
        clip_norm: clip,
        ..AdamWConfig::default()
    }
}

/// What a run records per step (loss, gradient norm) and its final weights.
struct Run {
    losses: Vec<f32>,
    norms: Vec<f32>,
    params: Vec<f32>,
}

/// One process, the full batch of world·B sequences, and whether every step clipped.
fn reference(world: usize, cfg: AdamWConfig) -> (Run, bool) {
    let ids = tokens(world * B);
    let mut m = model();
    let mut opt = AdamW::new(&m, cfg).unwrap();
    let (mut losses, mut norms, mut clipped) = (Vec::new(), Vec::new(), true);
    for _ in 0..STEPS {
        losses.push(loss_and_grads(&mut m, &ids, world * B, 1.0));
        let st = opt.step(&mut m, LR).unwrap();
        norms.push(st.grad_norm);
        clipped &= st.clip_scale < 1.0;
    }
    let params = m.params_to_host().unwrap();
    (
        Run {
            losses,
            norms,
            params,
        },
        clipped,
    )
}

/// `world` ranks, each on its own B sequences: one [`Run`] per rank.
fn data_parallel(world: usize, cfg: AdamWConfig) -> Vec<Run> {
    let ids = tokens(world * B);
    thread::scope(|s| {
        let handles: Vec<_> = ThreadGroup::new(world)
            .into_iter()
            .map(|mut comm| {
                let ids = &ids;
                s.spawn(move || {
                    let r = comm.rank();
                    let local = &ids[r * B * T..(r + 1) * B * T];
                    let mut m = model();
                    let mut opt = ShardedAdamW::new(&m, cfg, r, world).unwrap();
                    // ZeRO-1's memory: each rank keeps 3 × ceil(n/N) optimizer floats.
                    assert_eq!(opt.master.len(), m.num_params().div_ceil(world));
                    assert_eq!(opt.m.len() + opt.v.len(), 2 * opt.master.len());
                    let (mut losses, mut norms) = (Vec::new(), Vec::new());
                    for _ in 0..STEPS {
                        // Scale by 1/world: the reduce-scatter sums, the mean is what we want.
                        losses.push(loss_and_grads(&mut m, local, B, 1.0 / world as f32));
                        norms.push(opt.step(&mut m, &mut comm, LR).unwrap().grad_norm);
                    }
                    let params = m.params_to_host().unwrap();
                    Run {
                        losses,
                        norms,
                        params,
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn check(world: usize, clip: Option<f32>) {
    let cfg = opt_cfg(clip);
    let (want, clipped) = reference(world, cfg);
    let n = want.params.len();
    assert!(n % 2 != 0 && n % 3 != 0, "{n} parameters divide evenly");
    if clip.is_some() {
        assert!(clipped, "the clipped run must actually clip");
    }
    let ranks = data_parallel(world, cfg);
    let rel = |a: f32, b: f32| (a - b).abs() / b.abs();
    for step in 0..STEPS {
        let mean = ranks.iter().map(|r| r.losses[step]).sum::<f32>() / world as f32;
        let e = rel(mean, want.losses[step]);
        assert!(
            e < 1e-5,
            "step {step}: loss {mean} vs {} (rel {e:e})",
            want.losses[step]
        );
        // Clipping and Adam's m/√v both cancel a gradient scale error (a missing 1/N passes
        // the weight check); the norm does not.
        for r in &ranks {
            let e = rel(r.norms[step], want.norms[step]);
            assert!(
                e < 1e-5,
                "step {step}: grad norm {} vs {}",
                r.norms[step],
                want.norms[step]
            );
        }
    }
    let p0 = &ranks[0].params;
    for (r, p) in ranks.iter().map(|r| &r.params).enumerate() {
        assert!(
            p.iter().zip(p0).all(|(a, b)| a.to_bits() == b.to_bits()),
            "rank {r} differs from rank 0"
        );
    }
    let (i, d) = p0
        .iter()
        .zip(&want.params)
        .map(|(a, b)| (a - b).abs())
        .enumerate()
        .fold(
            (0, 0f32),
            |acc, (i, d)| if d > acc.1 { (i, d) } else { acc },
        );
    assert!(d < 1e-5, "max |Δw| {d:e} at parameter {i}");
    // The weights moved, so the comparison means something.
    let init = model().params_to_host().unwrap();
    let moved = init
        .iter()
        .zip(p0)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(moved > 1e-3, "weights barely moved: {moved:e}");
}

#[test]
fn zero1_two_ranks_match_one_process() {
    check(2, Some(1.0));
}

#[test]
fn zero1_three_ranks_match_one_process() {
    check(3, Some(1.0));
}

/// A tight clip, so the global norm from the sharded Σg² changes every update.
#[test]
fn zero1_three_ranks_with_clipping() {
    check(3, Some(0.05));
}
