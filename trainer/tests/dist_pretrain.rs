//! Data-parallel pretraining: the real training loop on N ranks (threads of this process, the
//! CPU stand-in for NCCL) takes the same steps as one process with N× the batch, to float
//! reassociation, and a ZeRO-1 checkpoint resumes on another world size to the same result.

use engine::checkpoint::{load_model, save_model, SaveOptions};
use engine::dist::{shard_file_name, ThreadGroup, MANIFEST};
use engine::shared_data::or_skip;
use engine::{Cpu, Head};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::thread;
use trainer::data::{prepare, Loader, PrepareConfig, TokenData};
use trainer::lm_train::{
    build_model, resume_config, run, run_dp, ModelSource, TrainConfig, TrainReport,
};
use trainer::tokenizer_train::train_on;

/// The global batch: 6 rows = 1 × 6 = 2 × 3 = 3 × 2.
const GLOBAL: usize = 6;
const STEPS: usize = 4;
/// Relative bound on a step's loss and gradient norm against one process's (measured: ≤ 1e-7
/// for the loss, ≤ 3e-7 for the norm).
const RTOL: f32 = 2e-6;
/// Bound on any weight's difference from one process's after all steps (measured: ≤ 3.4e-7;
/// the weights move by up to ~4e-2).
const WEIGHT_ATOL: f32 = 3e-6;

/// Shards of a slice of Tiny Shakespeare with a 300-token tokenizer, and a model config whose
/// parameter count (37975) is divisible by neither 2 nor 3, so the last ZeRO-1 shard is padded.
/// Made once for the whole file; `None` (each test skips) where Tiny Shakespeare has not been
/// fetched.
fn setup() -> Option<&'static (tempfile::TempDir, PathBuf, PathBuf)> {
    static S: OnceLock<(tempfile::TempDir, PathBuf, PathBuf)> = OnceLock::new();
    let corpus = or_skip("data/tinyshakespeare.txt")?;
    Some(S.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let text: String = std::fs::read_to_string(corpus)
            .unwrap()
            .chars()
            .take(40_000)
            .collect();
        let corpus = dir.path().join("corpus.txt");
        std::fs::write(&corpus, text).unwrap();
        train_on(&corpus, 300, &dir.path().join("tok.json")).unwrap();
        let data = dir.path().join("data");
        prepare(&PrepareConfig {
            tokenizer: dir.path().join("tok.json"),
            out: data.clone(),
            inputs: vec![corpus],
            val_fraction: 0.1,
            shard_tokens: 20_000,
            skip_bad: false,
            progress: false,
        })
        .unwrap();
        let config = dir.path().join("config.json");
        let json = serde_json::json!({
            "vocab_size": 300,
            "hidden_size": 35,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "max_position_embeddings": 64,
        });
        std::fs::write(&config, json.to_string()).unwrap();
        (dir, data, config)
    }))
}

/// `world` ranks of `GLOBAL / world` rows each, two micro-batches per step, a high learning
/// rate so the weights move, evaluation every other step.
fn cfg(out: &Path, world: usize) -> TrainConfig {
    let (_, data, config) = setup().expect("the test checked setup()");
    let mut c = TrainConfig::defaults(
        data.clone(),
        out.to_path_buf(),
        ModelSource::Config(config.clone()),
        STEPS,
    );
    c.seq_len = 16;
    c.batch_size = GLOBAL / world;
    c.grad_accum = 2;
    c.lr = 1e-2;
    c.warmup = 1;
    c.eval_every = 2;
    c.eval_windows = 4;
    c.ckpt_every = 0;
    c.progress = false;
    // 1 KiB buckets: the last micro-batch's backward reduces at every layer edge.
    c.bucket_mb = 1.0 / 1024.0;
    c
}

/// Runs the training loop on `world` ranks (threads) and returns every rank's result.
fn try_on_ranks(
    world: usize,
    cfg: &TrainConfig,
    resume: Option<&Path>,
) -> Vec<anyhow::Result<TrainReport>> {
    thread::scope(|s| {
        let hs: Vec<_> = ThreadGroup::new(world)
            .into_iter()
            .map(|mut comm| {
                let cfg = cfg.clone();
                s.spawn(move || run_dp(Cpu, cfg, resume, Some(&mut comm)))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn on_ranks(world: usize, cfg: &TrainConfig, resume: Option<&Path>) -> Vec<TrainReport> {
    let reps = try_on_ranks(world, cfg, resume).into_iter();
    reps.map(|r| r.unwrap()).collect()
}

/// Every rank's error, in full.
fn errors_on_ranks(world: usize, cfg: &TrainConfig) -> Vec<String> {
    let errs = try_on_ranks(world, cfg, None).into_iter();
    errs.map(|r| format!("{:#}", r.expect_err("an error")))
        .collect()
}

fn losses(r: &TrainReport) -> Vec<(usize, f32)> {
    r.logs.iter().map(|l| (l.step, l.loss)).collect()
}

/// Per step: (step, loss, gradient norm). The norm catches a wrong gradient scale, which
/// AdamW's normalisation and clipping would hide from the weights.
fn trace(r: &TrainReport) -> Vec<(usize, f32, f32)> {
    r.logs
        .iter()
        .map(|l| (l.step, l.loss, l.grad_norm))
        .collect()
}

fn weights(r: &TrainReport) -> Vec<f32> {
    let dir = r.checkpoint.as_ref().expect("a final checkpoint");
    load_model(Cpu, dir, Head::Lm)
        .unwrap()
        .params_to_host()
        .unwrap()
}

/// One process, the global batch: what every data-parallel run must reproduce. Made once.
fn reference() -> &'static TrainReport {
    static R: OnceLock<TrainReport> = OnceLock::new();
    R.get_or_init(|| {
        let dir = &setup().expect("the test checked setup()").0;
        run(Cpu, cfg(&dir.path().join("ref"), 1), None).unwrap()
    })
}

/// Each step's loss and gradient norm within RTOL of the reference's, and the final weights
/// within WEIGHT_ATOL.
fn assert_matches_reference(what: &str, got: &TrainReport) {
    assert_matches(what, got, reference())
}

fn assert_matches(what: &str, got: &TrainReport, want: &TrainReport) {
    let tail = &trace(want)[want.logs.len() - got.logs.len()..];
    let (mut worst_loss, mut worst_norm) = (0f32, 0f32);
    for (&(s, a, ga), &(t, b, gb)) in trace(got).iter().zip(tail) {
        assert_eq!(s, t, "{what}: step numbers");
        let e = (a - b).abs() / b.abs();
        worst_loss = worst_loss.max(e);
        assert!(
            e < RTOL,
            "{what}: step {s} loss {a} vs one process {b} (rel {e:e})"
        );
        let e = (ga - gb).abs() / gb.abs();
        worst_norm = worst_norm.max(e);
        assert!(
            e < RTOL,
            "{what}: step {s} gradient norm {ga} vs one process {gb} (rel {e:e})"
        );
    }
    let (w, v) = (weights(got), weights(want));
    assert_eq!(w.len(), v.len());
    let (i, d) = w
        .iter()
        .zip(&v)
        .map(|(a, b)| (a - b).abs())
        .enumerate()
        .fold((0, 0f32), |m, (i, d)| if d > m.1 { (i, d) } else { m });
    assert!(d < WEIGHT_ATOL, "{what}: max |Δw| {d:e} at parameter {i}");
    println!("{what}: max rel Δloss {worst_loss:e}, max rel Δnorm {worst_norm:e}, max |Δw| {d:e}");
}

fn check_world(world: usize, bucket_mb: f64) {
    let Some(s) = setup() else {
        return;
    };
    let want = reference();
    let n = weights(want).len();
    assert!(
        !n.is_multiple_of(2) && !n.is_multiple_of(3),
        "{n} parameters: the shards should not split evenly"
    );
    let out = s.0.path().join(format!("dp{world}"));
    let mut c = cfg(&out, world);
    c.bucket_mb = bucket_mb;
    let reps = on_ranks(world, &c, None);
    // Every rank reports the same global losses; rank 0 alone evaluates.
    for r in &reps[1..] {
        assert_eq!(losses(r), losses(&reps[0]));
        assert!(r.logs.iter().all(|l| l.val_loss.is_none()));
    }
    assert!(reps[0].final_val_loss.is_some());
    assert_eq!(reps[0].logs.len(), STEPS);
    assert_matches_reference(&format!("{world} ranks, {bucket_mb} MiB buckets"), &reps[0]);
    let (a, b) = (
        reps[0].final_val_loss.unwrap(),
        want.final_val_loss.unwrap(),
    );
    assert!((a - b).abs() < 1e-4 * b, "validation loss {a} vs {b}");
    // The weights moved: the comparison is not of two untrained models.
    let c = cfg(&out, 1);
    let w0 = build_model(Cpu, &c.model, 300, c.seed)
        .unwrap()
        .params_to_host()
        .unwrap();
    let moved = weights(want)
        .iter()
        .zip(&w0)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(moved > 1e-2, "weights barely moved: {moved:e}");
    // Rank 0 alone wrote the metrics: one record per step.
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let records = metrics.lines().filter(|l| l.contains("\"loss\"")).count();
    assert_eq!(records, STEPS, "{metrics}");
    // A ZeRO-1 checkpoint: the model once, a manifest, one optimizer shard per rank.
    let ck = reps[0].checkpoint.clone().unwrap();
    assert!(ck.join("model.safetensors").is_file() && ck.join(MANIFEST).is_file());
    assert!(!ck.join("optimizer.safetensors").exists());
    for r in 0..world {
        assert!(ck.join(shard_file_name(r, world)).is_file(), "shard {r}");
    }
}

#[test]
fn two_ranks_train_like_one_process_with_twice_the_batch() {
    // No buckets: the whole reduce-scatter after the backward.
    check_world(2, 0.0);
}

#[test]
fn three_ranks_train_like_one_process_with_three_times_the_batch() {
    check_world(3, 1.0 / 1024.0);
}

/// Stopped after 2 of 4 steps on 2 ranks, resumed on 3 ranks and on 1: the remaining steps
/// and the final weights are the uninterrupted single process's.
#[test]
fn a_two_rank_checkpoint_resumes_on_three_ranks_and_on_one() {
    let Some(s) = setup() else {
        return;
    };
    let base = s.0.path().join("resume");
    let mut c = cfg(&base.join("two"), 2);
    c.stop_after = Some(2);
    let first = on_ranks(2, &c, None);
    assert!(first[0].interrupted && first[0].last_step == 2);
    let ck = first[0].checkpoint.clone().unwrap();
    for world in [3, 1] {
        // A copy per continuation: each writes its own later checkpoints.
        let run_dir = base.join(format!("on{world}"));
        copy_dir(&base.join("two"), &run_dir);
        let from = run_dir.join("checkpoints").join(ck.file_name().unwrap());
        let mut rc = resume_config(&from, None).unwrap();
        rc.out = run_dir.clone();
        let rep = if world == 1 {
            run(Cpu, rc, Some(&from)).unwrap()
        } else {
            on_ranks(world, &rc, Some(&from)).swap_remove(0)
        };
        assert_eq!(rep.logs.first().map(|l| l.step), Some(3));
        assert_eq!(rep.last_step, STEPS);
        assert_matches_reference(&format!("2 ranks, resumed on {world}"), &rep);
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// SFT through the same loop: packed rows carry different numbers of assistant tokens, so the
/// ranks' token counts differ and only the global count gives one process's mean.
#[test]
fn sft_on_two_and_three_ranks_trains_like_one_process() {
    let Some(s) = setup() else {
        return;
    };
    let base = s.0.path().join("sft");
    let init = reference().checkpoint.clone().unwrap();
    std::fs::create_dir_all(&base).unwrap();
    let data = base.join("dialogues.jsonl");
    let words = [
        "thou", "art", "the", "king", "of", "this", "fair", "land", "and", "sea",
    ];
    let lines: Vec<String> = (0..60)
        .map(|i| {
            let pick = |k: usize| -> String {
                (0..k)
                    .map(|j| words[(i * 7 + j * 3) % words.len()])
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            serde_json::json!({"prompt": pick(1 + i % 4), "response": pick(1 + i % 9)}).to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let cfg = |world: usize| {
        let out = base.join(format!("w{world}"));
        let mut c = TrainConfig::sft_defaults(vec![data.clone()], out, init.clone());
        c.seq_len = 64;
        c.batch_size = GLOBAL / world;
        c.steps = 3;
        c.lr = 1e-2;
        c.eval_every = 0;
        c.eval_windows = 4;
        c.ckpt_every = 0;
        c.progress = false;
        c
    };
    let want = run(Cpu, cfg(1), None).unwrap();
    for world in [2, 3] {
        let reps = on_ranks(world, &cfg(world), None);
        assert_matches(&format!("sft on {world} ranks"), &reps[0], &want);
    }
}

/// A single-process checkpoint (whole AdamW state) continues on 2 ranks, split into shards.
#[test]
fn a_single_process_checkpoint_resumes_on_two_ranks() {
    let Some(s) = setup() else {
        return;
    };
    let base = s.0.path().join("from-one");
    let mut c = cfg(&base, 1);
    c.stop_after = Some(2);
    let first = run(Cpu, c, None).unwrap();
    let ck = first.checkpoint.clone().unwrap();
    assert!(ck.join("optimizer.safetensors").is_file() && !ck.join(MANIFEST).exists());
    let rc = resume_config(&ck, None).unwrap();
    let rep = on_ranks(2, &rc, Some(&ck)).swap_remove(0);
    assert_eq!(rep.logs.first().map(|l| l.step), Some(3));
    assert_matches_reference("1 rank, resumed on 2", &rep);
}

/// A NaN that only rank 1's rows reach (an embedding row of a token only they hold): every
/// rank stops at step 1 naming the tensor (none waits for the others), and with
/// --skip-nonfinite every rank skips exactly the steps one process skips.
#[test]
fn a_nonfinite_loss_on_one_rank_stops_or_skips_on_every_rank() {
    let Some(s) = setup() else {
        return;
    };
    let base = s.0.path().join("nan");
    let c = cfg(&base.join("r"), 2);
    // A token in rank 1's rows of step 1 that no other row of the run holds: step 1 is then
    // non-finite on rank 1 alone, and the later steps are finite.
    let data = TokenData::open(s.1.as_path()).unwrap();
    let mut loader = Loader::new(&data, c.seq_len, c.seed).unwrap();
    let (mut ids, mut tg) = (Vec::new(), Vec::new());
    let (mut rank1, mut others) = (Vec::new(), Vec::new());
    for micro in 0..STEPS * c.grad_accum {
        loader.next_batch(&data, GLOBAL, &mut ids, &mut tg);
        let (a, b) = ids.split_at(3 * c.seq_len);
        others.extend_from_slice(a);
        if micro < c.grad_accum {
            rank1.extend_from_slice(b);
        } else {
            others.extend_from_slice(b);
        }
    }
    let token = rank1
        .iter()
        .copied()
        .find(|t| !others.contains(t))
        .expect("a token only rank 1 sees, only in step 1");
    let mut m = build_model(Cpu, &c.model, 300, c.seed).unwrap();
    let mut p = m.params_to_host().unwrap();
    let e = m.table.get("model.embed_tokens.weight").unwrap().clone();
    p[e.span.off + token as usize * 35] = f32::NAN;
    m.set_params(&p).unwrap();
    let init = base.join("init");
    save_model(&m, &init, SaveOptions::default(), |_| Ok(())).unwrap();

    let mut c = c;
    c.model = ModelSource::Init(init);
    let errs = errors_on_ranks(2, &c);
    for e in &errs {
        assert!(
            e.contains("step 1") && e.contains("model.embed_tokens.weight"),
            "{e}"
        );
    }

    c.skip_nonfinite = true;
    let mut one = c.clone();
    one.batch_size = GLOBAL;
    one.out = base.join("one");
    let want = run(Cpu, one, None).unwrap();
    c.out = base.join("skip");
    let got = on_ranks(2, &c, None);
    assert_eq!(want.steps_done, STEPS - 1, "step 1 alone is skipped");
    assert_eq!(got[0].steps_done, want.steps_done);
    assert_eq!(got[1].steps_done, want.steps_done);
    let skipped = |dir: &Path| {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .matches("skipped")
            .count()
    };
    assert_eq!(skipped(&base.join("skip")), skipped(&base.join("one")));
    let (a, b) = (trace(&got[0]), trace(&want));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.0, y.0, "the same steps are skipped");
        assert!(
            (x.1 - y.1).abs() < RTOL * y.1,
            "step {}: {} vs {}",
            x.0,
            x.1,
            y.1
        );
    }
}

/// Rank 0 alone opens the run's files; when it cannot, every rank stops with an error instead
/// of waiting for rank 0 in the first step.
#[test]
fn rank_zero_failing_to_open_the_run_stops_every_rank() {
    let Some(s) = setup() else {
        return;
    };
    let out = s.0.path().join("unwritable");
    std::fs::create_dir_all(out.join("metrics.jsonl")).unwrap(); // a directory: open fails
    let c = cfg(&out, 2);
    let errs = errors_on_ranks(2, &c);
    assert!(errs[1].contains("opening the run directory"), "{}", errs[1]);
    assert!(
        !errs[0].contains("other rank"),
        "rank 0 reports its own error: {}",
        errs[0]
    );
}
