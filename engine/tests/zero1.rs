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
                    let mut opt = ShardedAdamW::new(&mut m, cfg, r, world).unwrap();
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

// ---- ZeRO-1 checkpoints: save with one world size, resume with another ----------------------

use engine::checkpoint::{load_model, SaveOptions};
use engine::dist::{save_zero1, shard_file_name};
use std::path::Path;

/// Sequences per step, shared out evenly by world sizes 1, 2 and 3.
const GLOBAL: usize = 6;
const SAVE_AT: usize = 3;
const TOTAL: usize = 5;

/// Step `step`'s global batch: GLOBAL fresh sequences (a new batch every step).
fn step_tokens(step: usize) -> Vec<i32> {
    let all = tokens(GLOBAL * (step + 1));
    all[GLOBAL * step * T..].to_vec()
}

/// One process on the whole batch, TOTAL steps without interruption.
fn uninterrupted() -> Vec<f32> {
    let cfg = opt_cfg(Some(1.0));
    let mut m = model();
    let mut opt = AdamW::new(&m, cfg).unwrap();
    for step in 0..TOTAL {
        loss_and_grads(&mut m, &step_tokens(step), GLOBAL, 1.0);
        opt.step(&mut m, LR).unwrap();
    }
    m.params_to_host().unwrap()
}

/// `world` ranks run steps `steps`, starting fresh or from the checkpoint `from`, and save to
/// `to` at the end if given. Returns rank 0's weights (every rank's must be the same bits).
fn run_ranks(
    world: usize,
    steps: std::ops::Range<usize>,
    from: Option<&Path>,
    to: Option<&Path>,
) -> Vec<f32> {
    run_ranks_as(world, steps, from, to, false)
}

/// [`run_ranks`], where `separate` gives each replica a compute copy apart from its master, so
/// the optimizer releases the master (CUDA's data flow, run on the CPU).
fn run_ranks_as(
    world: usize,
    steps: std::ops::Range<usize>,
    from: Option<&Path>,
    to: Option<&Path>,
    separate: bool,
) -> Vec<f32> {
    let cfg = opt_cfg(Some(1.0));
    let b = GLOBAL / world;
    let out: Vec<Vec<f32>> = thread::scope(|s| {
        let hs: Vec<_> = ThreadGroup::new(world)
            .into_iter()
            .map(|mut comm| {
                let steps = steps.clone();
                s.spawn(move || {
                    let r = comm.rank();
                    let (mut m, mut opt) = match from {
                        None => {
                            let mut m = model();
                            if separate {
                                m.separate_compute_copy().unwrap();
                            }
                            let opt = ShardedAdamW::new(&mut m, cfg, r, world).unwrap();
                            (m, opt)
                        }
                        Some(dir) => {
                            let mut m = load_model(Cpu, dir, Head::Lm).unwrap();
                            if separate {
                                m.separate_compute_copy().unwrap();
                            }
                            let mut opt = ShardedAdamW::load(&mut m, cfg, r, world, dir).unwrap();
                            opt.gather_params(&mut m, &mut comm).unwrap();
                            (m, opt)
                        }
                    };
                    for step in steps {
                        let ids = step_tokens(step);
                        let local = &ids[r * b * T..(r + 1) * b * T];
                        loss_and_grads(&mut m, local, b, 1.0 / world as f32);
                        opt.step(&mut m, &mut comm, LR).unwrap();
                    }
                    if let Some(dir) = to {
                        save_zero1(dir, &m, &opt, &mut comm, SaveOptions::default(), |_| Ok(()))
                            .unwrap();
                    }
                    m.params_to_host().unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (r, p) in out.iter().enumerate() {
        assert!(
            p.iter()
                .zip(&out[0])
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "rank {r} differs from rank 0"
        );
    }
    out.into_iter().next().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Train 3 steps on 2 ranks, save, resume on 3 ranks and on 1, train 2 more: the weights match
/// an uninterrupted single-process run within float reassociation (the sums' order changes
/// with the world size); resuming on 2 ranks matches an uninterrupted 2-rank run bit for bit.
#[test]
fn zero1_checkpoint_resumes_with_another_world_size() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("step-3");
    run_ranks(2, 0..SAVE_AT, None, Some(&ckpt));
    let mut files: Vec<String> = std::fs::read_dir(&ckpt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            &shard_file_name(0, 2),
            &shard_file_name(1, 2),
            "zero1.json",
        ]
    );

    let want = uninterrupted();
    let init = model().params_to_host().unwrap();
    let moved = max_abs_diff(&init, &want);
    assert!(moved > 1e-3, "weights barely moved: {moved:e}");
    for world in [3, 1] {
        let got = run_ranks(world, SAVE_AT..TOTAL, Some(&ckpt), None);
        let d = max_abs_diff(&got, &want);
        eprintln!("2 ranks -> {world}: max |Δw| vs one uninterrupted process = {d:e}");
        assert!(d < 1e-5, "resumed on {world} ranks: max |Δw| {d:e}");
    }
    let straight = run_ranks(2, 0..TOTAL, None, None);
    let resumed = run_ranks(2, SAVE_AT..TOTAL, Some(&ckpt), None);
    assert_eq!(
        max_abs_diff(&straight, &resumed),
        0.0,
        "same world size: bit-exact"
    );
}

/// With the master released to the optimizer (each replica computing from its own copy, as on
/// CUDA) the run is the same bits as with the master as the compute weights; its checkpoint
/// stores the model in bf16, yet a resume on 3 ranks or 1 takes the fp32 masters from the
/// shards and lands where an uninterrupted process does.
#[test]
fn zero1_with_a_released_master_trains_saves_and_resumes_alike() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("step-3");
    let plain = run_ranks(3, 0..SAVE_AT, None, None);
    let released = run_ranks_as(3, 0..SAVE_AT, None, Some(&ckpt), true);
    assert_eq!(max_abs_diff(&plain, &released), 0.0);
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg_json["torch_dtype"], "bfloat16");
    let file = load_model(Cpu, &ckpt, Head::Lm)
        .unwrap()
        .params_to_host()
        .unwrap();
    let rounding = max_abs_diff(&file, &released);
    assert!(rounding > 0.0, "the model file should hold bf16 values");

    let want = uninterrupted();
    for world in [3, 1] {
        let got = run_ranks_as(world, SAVE_AT..TOTAL, Some(&ckpt), None, true);
        let d = max_abs_diff(&got, &want);
        eprintln!(
            "3 ranks (released master) -> {world}: max |Δw| = {d:e} (bf16 file: {rounding:e})"
        );
        assert!(
            d < 1e-5 && d < rounding / 10.0,
            "resumed on {world} ranks: max |Δw| {d:e}"
        );
    }
}

/// A missing or foreign shard file is an error naming that file.
#[test]
fn zero1_checkpoint_names_a_missing_or_mismatched_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("ckpt");
    run_ranks(2, 0..1, None, Some(&ckpt));
    let cfg = opt_cfg(Some(1.0));
    let load = |rank, world| {
        ShardedAdamW::load(&mut model(), cfg, rank, world, &ckpt)
            .err()
            .map(|e| e.to_string())
    };
    assert_eq!(load(0, 1), None);

    let one = ckpt.join(shard_file_name(1, 2));
    let saved = std::fs::read(&one).unwrap();
    std::fs::remove_file(&one).unwrap();
    let e = load(0, 1).expect("a missing shard must fail");
    assert!(
        e.contains(&shard_file_name(1, 2)) && e.contains("no such file"),
        "{e}"
    );
    // Rank 0 of 2 needs only the first old shard: the missing second one does not matter.
    assert_eq!(load(0, 2), None);

    // Rank 0's file under rank 1's name: its metadata gives it away.
    std::fs::copy(ckpt.join(shard_file_name(0, 2)), &one).unwrap();
    let e = load(1, 2).expect("a foreign shard must fail");
    assert!(
        e.contains(&shard_file_name(1, 2)) && e.contains("metadata rank = 0"),
        "{e}"
    );

    // A truncated file.
    std::fs::write(&one, &saved[..saved.len() / 2]).unwrap();
    let e = load(0, 1).expect("a truncated shard must fail");
    assert!(e.contains(&shard_file_name(1, 2)), "{e}");

    // A shard of another checkpoint (different step).
    std::fs::write(&one, &saved).unwrap();
    assert_eq!(load(0, 1), None);
    let other = tmp.path().join("other");
    run_ranks(2, 0..2, None, Some(&other));
    std::fs::copy(other.join(shard_file_name(1, 2)), &one).unwrap();
    let e = load(0, 1).expect("a shard of another step must fail");
    assert!(
        e.contains(&shard_file_name(1, 2)) && e.contains("step = 2"),
        "{e}"
    );

    let e = ShardedAdamW::load(&mut model(), cfg, 0, 1, tmp.path())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("zero1.json") && e.contains("missing"), "{e}");
}
