//! PPO (section 3.2.3 of the Llama 2 paper): its pieces against hand-computed values, prompt
//! reading and sampling, checkpoints with exact resume and early stopping on random tiny models,
//! and the loop on the built-in world.

mod common;

use common::latest;
use engine::checkpoint::load_model;
use engine::tokenizer::Tokenizer;
use engine::{Cpu, Head};
use std::path::{Path, PathBuf};
use std::time::Instant;
use trainer::evaluate::world_eval;
use trainer::lm_train::{run, DataSpec, TrainConfig};
use trainer::ppo::*;
use trainer::reward::{self, logit, sigmoid, SAFETY_THRESHOLD};
use trainer::world::{read_examples, Annotator, World};

fn close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol,
            "[{i}] {g} vs {w} (all: {got:?} vs {want:?})"
        );
    }
}

#[test]
fn gae_on_short_trajectories() {
    // γ = 1, λ = 0.95, reward only at the end:
    // δ2 = 1 − 0.7 = 0.3, δ1 = 0.7 − 0.6 = 0.1, δ0 = 0.6 − 0.5 = 0.1
    // A2 = 0.3, A1 = 0.1 + 0.95·0.3 = 0.385, A0 = 0.1 + 0.95·0.385 = 0.46575.
    let (a, r) = gae(&[0.0, 0.0, 1.0], &[0.5, 0.6, 0.7], 1.0, 0.95);
    close(&a, &[0.46575, 0.385, 0.3], 1e-6);
    close(&r, &[0.96575, 0.985, 1.0], 1e-6);
    // λ = 1: Monte-Carlo advantages (return-to-go minus value); λ = 0: one-step TD errors.
    let (a, r) = gae(&[0.5, -0.25, 1.0], &[0.1, 0.2, 0.3], 1.0, 1.0);
    close(&r, &[1.25, 0.75, 1.0], 1e-6);
    close(&a, &[1.15, 0.55, 0.7], 1e-6);
    let (a, _) = gae(&[0.5, -0.25, 1.0], &[0.1, 0.2, 0.3], 1.0, 0.0);
    close(&a, &[0.6, -0.15, 0.7], 1e-6);
    // γ = λ = 0.5: δ1 = −1 − 0.4 = −1.4; δ0 = 1 + 0.5·0.4 − 0.2 = 1.0; A0 = 1 + 0.25·(−1.4).
    let (a, r) = gae(&[1.0, -1.0], &[0.2, 0.4], 0.5, 0.5);
    close(&a, &[0.65, -1.4], 1e-6);
    close(&r, &[0.85, -1.0], 1e-6);
    // One token: A = r − V.
    let (a, r) = gae(&[2.0], &[0.5], 1.0, 0.95);
    close(&a, &[1.5], 1e-7);
    close(&r, &[2.0], 1e-7);
}

#[test]
fn leave_one_out_baseline_per_prompt() {
    // Prompt 7: [1, 2, 3] -> each minus the mean of the other two; prompt 9 alone keeps its 5.
    let mut r = [1.0, 2.0, 3.0, 5.0, 4.0, 0.0];
    leave_one_out(&mut r, &[7, 7, 7, 9, 3, 3]);
    close(&r, &[-1.5, 0.0, 1.5, 5.0, 4.0, -4.0], 1e-6);
}

#[test]
fn whitening_logit_and_explained_variance() {
    // mean 2.5, population variance 1.25, std 1.1180340.
    let w = whiten(&[1.0, 2.0, 3.0, 4.0], false);
    close(&w, &[-1.3416408, -0.4472136, 0.4472136, 1.3416408], 1e-6);
    let wm = whiten(&[1.0, 2.0, 3.0, 4.0], true);
    close(&wm, &[1.1583592, 2.0527864, 2.9472136, 3.8416408], 1e-6);
    // Constant input: the epsilon keeps it finite (all zeros).
    assert!(whiten(&[3.0; 5], false).iter().all(|&x| x == 0.0));
    assert_eq!(whiten(&[], false), Vec::<f32>::new());

    assert_eq!(logit(0.5), 0.0);
    assert!((logit(0.15) - (0.15f32 / 0.85).ln()).abs() < 1e-6); // −1.7346
    assert!((logit(0.9) - 9f32.ln()).abs() < 1e-6);
    // Clamped away from 0 and 1: ±ln((1 − 1e-6)/1e-6) = ±13.8155.
    assert!((logit(0.0) + 13.81551).abs() < 1e-3 && (logit(1.0) - 13.81551).abs() < 1e-3);
    assert!((logit(-3.0) - logit(0.0)).abs() < 1e-6);
    for p in [0.01f32, 0.3, 0.77] {
        assert!((sigmoid(logit(p)) - p).abs() < 1e-6);
    }
    for s in [-4.0f32, 0.0, 2.5] {
        assert!((logit(sigmoid(s)) - s).abs() < 1e-4);
    }

    assert_eq!(explained_variance(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]), 1.0);
    assert!(explained_variance(&[5.0; 3], &[1.0, 2.0, 3.0]).abs() < 1e-6);
    // returns − values = [0.5, −0.5, 0.5, −0.5]: var 0.25; var(returns) = 1.25 → 0.8.
    let ev = explained_variance(&[0.5, 2.5, 2.5, 4.5], &[1.0, 2.0, 3.0, 4.0]);
    assert!((ev - 0.8).abs() < 1e-6, "{ev}");
    assert_eq!(explained_variance(&[0.0; 2], &[1.0; 2]), 0.0);
}

#[test]
fn piecewise_reward_at_and_around_the_safety_threshold() {
    let t = 0.15;
    // Safety prompt: always the safety reward.
    assert_eq!(reward::piecewise(0.9, 0.2, true, t), 0.9);
    assert_eq!(reward::piecewise(0.05, 0.99, true, t), 0.05);
    // Other prompts: helpfulness unless safety is below the threshold.
    assert_eq!(reward::piecewise(0.9, 0.2, false, t), 0.2);
    assert_eq!(reward::piecewise(0.1499, 0.8, false, t), 0.1499);
    assert_eq!(
        reward::piecewise(0.15, 0.8, false, t),
        0.8,
        "at the threshold: not below"
    );
    assert_eq!(reward::piecewise(0.1501, 0.8, false, t), 0.8);
    assert_eq!(reward::piecewise(0.0, 0.8, false, t), 0.0);
    assert_eq!(SAFETY_THRESHOLD, 0.15);
    // In reward-model scores s (R = σ(s)): the threshold sits at s = logit(0.15) = −1.7346.
    let s_at = logit(0.15);
    assert_eq!(
        reward::piecewise(sigmoid(s_at - 1e-3), 0.7, false, t),
        sigmoid(s_at - 1e-3)
    );
    assert_eq!(reward::piecewise(sigmoid(s_at + 1e-3), 0.7, false, t), 0.7);
}

#[test]
fn kl_term_per_token() {
    let k = kl_per_token(&[-1.0, -2.0, -0.5], &[-1.2, -1.5, -0.5]);
    close(&k, &[0.2, -0.5, 0.0], 1e-6);
    // Σ_t (log π − log π0) is the log-ratio of the sequence: −0.3; with β = 0.01 the per-token
    // rewards are −β·KL_t and the score goes on the last token.
    let beta = 0.01;
    let mut r: Vec<f32> = k.iter().map(|x| -beta * x).collect();
    *r.last_mut().unwrap() += 1.5;
    close(&r, &[-0.002, 0.005, 1.5], 1e-7);
    assert!((k.iter().sum::<f32>() + 0.3).abs() < 1e-6);
    // The paper's β by shape: 0.01 for 7B/13B, 0.005 for 34B/70B (48+ layers with GQA).
    let b = |p: &str| trainer::paper::for_model(&engine::LlamaConfig::preset(p).unwrap()).ppo_beta;
    assert_eq!(
        (b("7b"), b("13b"), b("34b"), b("70b"), b("tiny")),
        (0.01, 0.01, 0.005, 0.005, 0.01)
    );
}

#[test]
fn clipped_surrogate_and_value_loss() {
    let eps = 0.2;
    // Inside the trust region: L = −A·ρ, dL/dlogp = −A·ρ.
    let (l, d, c) = clipped_surrogate(1.1, 2.0, eps);
    assert!((l + 2.2).abs() < 1e-6 && (d + 2.2).abs() < 1e-6 && !c);
    // A > 0 and ρ > 1 + ε: the clipped term −A·1.2 = −2.4 is the max; no gradient.
    assert_eq!(clipped_surrogate(1.5, 2.0, eps), (-2.4, 0.0, true));
    // A > 0 and ρ < 1 − ε: not clipped (pessimistic bound), L = −A·ρ = −1.
    assert_eq!(clipped_surrogate(0.5, 2.0, eps), (-1.0, -1.0, false));
    // A < 0 and ρ < 1 − ε: clipped, L = −A·0.8 = 0.8.
    let (l, d, c) = clipped_surrogate(0.5, -1.0, eps);
    assert!((l - 0.8).abs() < 1e-6 && d == 0.0 && c);
    // A < 0 and ρ > 1 + ε: not clipped, L = 1.5, dL/dlogp = −A·ρ = 1.5.
    assert_eq!(clipped_surrogate(1.5, -1.0, eps), (1.5, 1.5, false));
    // The gradient is d/dlogp of L(ρ = exp(logp − logp_old)), by central differences.
    for (lp, adv) in [(0.05f32, 1.3f32), (-0.1, -0.7), (0.3, 0.9), (-0.4, -2.0)] {
        let f = |x: f32| clipped_surrogate(x.exp(), adv, eps).0 as f64;
        let h = 1e-3;
        let fd = (f(lp + h) - f(lp - h)) / (2.0 * h as f64);
        let (_, d, _) = clipped_surrogate(lp.exp(), adv, eps);
        assert!(
            (fd - d as f64).abs() < 1e-3,
            "lp {lp} adv {adv}: {d} vs {fd}"
        );
    }

    // Value loss ½·max((v − R)², (v_c − R)²), v_c = v_old + clip(v − v_old, ±ε).
    // v moved 0.5 towards R = 1: v_c = 0.7, the clipped error 0.3 dominates, no gradient.
    let (l, d) = clipped_value_loss(1.0, 0.5, 1.0, eps);
    assert!((l - 0.045).abs() < 1e-6 && d == 0.0);
    // Inside the clip range both terms agree: ½·0.4² = 0.08, d = v − R = −0.4.
    let (l, d) = clipped_value_loss(0.6, 0.5, 1.0, eps);
    assert!((l - 0.08).abs() < 1e-6 && (d + 0.4).abs() < 1e-6);
    // Moved away from R: the unclipped error (1.0) dominates: ½, d = −1.
    let (l, d) = clipped_value_loss(0.0, 0.5, 1.0, eps);
    assert!((l - 0.5).abs() < 1e-6 && (d + 1.0).abs() < 1e-6);
    let (l, d) = clipped_value_loss(1.2, 0.5, 0.0, eps);
    assert!((l - 0.72).abs() < 1e-6 && (d - 1.2).abs() < 1e-6);
    for (v, vo, r) in [
        (0.3f32, 0.2f32, 1.0f32),
        (0.9, 0.5, 1.0),
        (-0.5, 0.1, 0.4),
        (2.0, 1.5, -1.0),
    ] {
        let f = |x: f32| clipped_value_loss(x, vo, r, eps).0 as f64;
        let h = 1e-3;
        let fd = (f(v + h) - f(v - h)) / (2.0 * h as f64);
        let (_, d) = clipped_value_loss(v, vo, r, eps);
        assert!((fd - d as f64).abs() < 1e-3, "v {v}: {d} vs {fd}");
    }
}

#[test]
fn prompts_parse_and_sample_every_prompt_once_per_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("p.jsonl");
    std::fs::write(
        &f,
        concat!(
            r#"{"messages": [{"role": "user", "content": "hi"}], "category": "safety", "task": "harm"}"#,
            "\n",
            r#"{"prompt": "What is 2 + 2?"}"#,
            "\n\n",
            r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#,
            "\n",
        ),
    )
    .unwrap();
    let p = trainer::formats::read_prompts(std::slice::from_ref(&f), None)
        .unwrap()
        .0;
    assert_eq!(p.len(), 3);
    assert!(p[0].safety && !p[1].safety && !p[2].safety);
    assert_eq!(p[1].messages[0].content, "What is 2 + 2?");
    // A trailing assistant turn is dropped: the prompt ends with the user's turn.
    assert_eq!(p[2].messages.len(), 2);
    assert_eq!(p[2].messages[1].role, "user");
    std::fs::write(
        &f,
        "{\"messages\": [{\"role\": \"assistant\", \"content\": \"x\"}]}\n",
    )
    .unwrap();
    let e = format!(
        "{:#}",
        trainer::formats::read_prompts(&[f], None).unwrap_err()
    );
    assert!(e.contains("p.jsonl:1"), "{e}");

    // Batches of 4 from 10 prompts: each 10 consecutive draws are a permutation.
    let draws: Vec<usize> = (0..5)
        .flat_map(|it| iteration_prompts(10, 4, 7, it))
        .collect();
    for epoch in draws.chunks(10) {
        let mut e = epoch.to_vec();
        e.sort();
        assert_eq!(e, (0..10).collect::<Vec<_>>());
    }
    assert_eq!(
        iteration_prompts(10, 4, 7, 3),
        iteration_prompts(10, 4, 7, 3)
    );
}

// ---------------------------------------------------------------------------------------------
// The loop on random tiny models: checkpoints and exact resume.

/// A tokenizer, a random tiny LM (the policy) and a random reward model from its trunk, and a
/// prompt file; returns (policy dir, reward model dir, prompts).
fn tiny_cfg(d: &Path, lm: &Path, rm: &Path, prompts: &Path, out: &str) -> PpoConfig {
    let mut cfg = PpoConfig::new(lm.into(), rm.into(), vec![prompts.into()], d.join(out));
    cfg.reward_safety = Some(rm.into()); // a second (here identical) reward model
    cfg.iterations = 4;
    cfg.batch = 6;
    cfg.minibatch = 4;
    cfg.lr = 1e-3;
    cfg.max_new_tokens = 6;
    cfg.gen_batch = 4;
    cfg.eval_every = 2;
    cfg.patience = 0;
    cfg.ckpt_every = 1;
    cfg.critic_warmup = 1;
    cfg.progress = false;
    cfg
}

#[test]
fn checkpoints_resume_exactly_and_load_as_hf_models() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (lm, rm, prompts) = common::tiny_ppo_setup(d);

    let straight = trainer::ppo::run(Cpu, &tiny_cfg(d, &lm, &rm, &prompts, "a")).unwrap();
    assert_eq!(straight.iterations, 4);
    assert_eq!(straight.history.len(), 4);
    // The default hold-out: every 20th prompt; evaluations at 0, 2 and 4.
    assert_eq!(
        straight
            .evals
            .iter()
            .map(|e| e.iteration)
            .collect::<Vec<_>>(),
        [0, 2, 4]
    );
    assert_eq!(straight.evals[0].prompts, 1);
    let h0 = &straight.history[0];
    assert_eq!(
        h0.kl, 0.0,
        "the first rollouts come from the reference itself"
    );
    assert!(
        h0.policy_grad_norm == 0.0,
        "critic warmup: no policy step in iteration 1"
    );
    assert!(straight.history[1].policy_grad_norm > 0.0);
    assert!(straight
        .history
        .iter()
        .all(|h| h.entropy > 0.0 && h.response_len > 0.0));

    // Interrupted after 2 iterations, then resumed from the run directory.
    let mut first = tiny_cfg(d, &lm, &rm, &prompts, "b");
    first.iterations = 2;
    trainer::ppo::run(Cpu, &first).unwrap();
    let ck = d.join("b/checkpoints/iter-000002");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "optimizer.safetensors",
        "ppo_state.json",
        "critic/config.json",
        "critic/model.safetensors",
        "critic/tokenizer.json",
    ] {
        assert!(ck.join(f).is_file(), "{f} missing from the checkpoint");
    }
    // keep_checkpoints 2: iter-1 and iter-2 kept.
    assert!(d.join("b/checkpoints/iter-000001").is_dir());
    let resumed_cfg = resume_config(&d.join("b"), Some(4)).unwrap();
    assert_eq!(resumed_cfg.resume.as_deref(), Some(ck.as_path()));
    let resumed = trainer::ppo::run(Cpu, &resumed_cfg).unwrap();
    assert_eq!(resumed.iterations, 4);
    assert_eq!(resumed.history.len(), 2);
    assert!(
        !d.join("b/checkpoints/iter-000002").exists(),
        "pruned to the newest two"
    );

    // Bit for bit on the CPU: the same policy and critic, the same logs.
    let load = |p: &Path| {
        load_model(Cpu, p, Head::Lm)
            .unwrap()
            .params_to_host()
            .unwrap()
    };
    assert_eq!(load(&straight.checkpoint), load(&resumed.checkpoint));
    let critic = |p: &Path| {
        trainer::rm::load_rm(Cpu, &p.join("critic"))
            .unwrap()
            .0
            .params_to_host()
            .unwrap()
    };
    assert_eq!(critic(&straight.checkpoint), critic(&resumed.checkpoint));
    for (a, b) in straight.history[2..].iter().zip(&resumed.history) {
        assert_eq!(
            (a.reward, a.kl, a.value_loss, a.clip_frac),
            (b.reward, b.kl, b.value_loss, b.clip_frac)
        );
    }
    let lines = |p: &str| {
        std::fs::read_to_string(d.join(p).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count()
    };
    assert_eq!(
        lines("a"),
        lines("b"),
        "the resumed run's metrics continue the first run's"
    );
    // The policy checkpoint is an ordinary HF causal LM the generator loads.
    let mut m = load_model(Cpu, &resumed.checkpoint, Head::Lm).unwrap();
    let tok = Tokenizer::from_file(&resumed.checkpoint.join("tokenizer.json")).unwrap();
    let g = engine::generate::generate(
        &mut m,
        &[tok.encode("the fox", true).unwrap()],
        &Default::default(),
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(g.len(), 1);

    // Early stopping: the held-out reward of this random model never improves, so patience 1
    // stops at the first evaluation after the start, with a final checkpoint.
    let mut es = tiny_cfg(d, &lm, &rm, &prompts, "e");
    es.patience = 1;
    let r = trainer::ppo::run(Cpu, &es).unwrap();
    assert!(
        r.stopped_early && r.iterations == 2,
        "{} iterations",
        r.iterations
    );
    assert!(r.checkpoint.ends_with("iter-000002") && r.checkpoint.join("ppo_state.json").is_file());

    // Bad configurations are named.
    let mut bad = tiny_cfg(d, &lm, &rm, &prompts, "c");
    bad.oracle = true;
    assert!(format!("{:#}", trainer::ppo::run(Cpu, &bad).unwrap_err()).contains("world"));
    let e = format!("{:#}", resume_config(&d.join("nothing"), None).unwrap_err());
    assert!(e.contains("no PPO checkpoint"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// The loop on the built-in world.

/// One world, SFT model and reward model for every test of this file that needs them (built by
/// the first to ask; the others wait).
fn shared_world() -> &'static (PathBuf, PathBuf, PathBuf) {
    static DIR: std::sync::OnceLock<(tempfile::TempDir, (PathBuf, PathBuf, PathBuf))> =
        std::sync::OnceLock::new();
    &DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = world_sft_and_rm(dir.path());
        (dir, out)
    })
    .1
}

/// `llama2 rlhf`'s loop, shortened: two rounds, each labelling pairs sampled from the latest
/// model, retraining both reward models on every label so far, and rejection sampling; PPO in
/// round 2. Checks the bookkeeping (cumulative labels, stages, files) and that the stages stay
/// near the SFT model (bounded KL).
#[test]
fn rlhf_rounds_label_retrain_on_all_labels_and_add_ppo() {
    let (w, sft, _) = shared_world();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("rlhf");
    let mut cfg = trainer::rlhf::RlhfConfig::new(sft.clone(), w.clone(), out.clone(), 2);
    cfg.ppo_from = 2;
    cfg.label_prompts = 80;
    cfg.rs_prompts = 80;
    cfg.rs_k = 4;
    cfg.eval_prompts = 60;
    cfg.ppo_iterations = 3;
    cfg.ppo_batch = 32;
    let said = std::sync::Mutex::new(Vec::new());
    let rep = trainer::rlhf::run(Cpu, &cfg, &|m| said.lock().unwrap().push(m.to_string())).unwrap();
    for e in &rep.stages {
        println!(
            "{}: sampled gold R_c {:?}, greedy {:?}, KL to SFT {:.2}",
            e.stage, e.sampled_reward, e.reward, e.kl_to_sft
        );
    }
    assert_eq!(rep.rounds.len(), 2);
    let (r1, r2) = (&rep.rounds[0], &rep.rounds[1]);
    assert!(r1.new_pairs > 0 && r2.new_pairs > 0);
    assert_eq!(r1.total_pairs, r1.new_pairs);
    assert_eq!(
        r2.total_pairs,
        r1.new_pairs + r2.new_pairs,
        "round 2 trains on all labels"
    );
    assert!(
        r1.ppo.is_none() && r2.ppo.is_some(),
        "PPO from round 2 only"
    );
    assert!(rep.rm_helpfulness.starts_with(out.join("round-2")));
    for k in ["helpfulness", "safety"] {
        let acc = r2.rm[k]["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{k}: {acc}");
    }
    let names: Vec<&str> = rep.stages.iter().map(|e| e.stage.as_str()).collect();
    assert_eq!(names, ["sft", "rs_round_1", "rs_round_2", "ppo_round_2"]);
    assert!(
        rep.stages[0].kl_to_sft.abs() < 1e-3,
        "the SFT model against itself"
    );
    for e in &rep.stages[1..] {
        assert!(
            e.kl_to_sft.is_finite() && e.kl_to_sft < 15.0,
            "{}: KL {}",
            e.stage,
            e.kl_to_sft
        );
    }
    assert!(rep.checkpoint.starts_with(out.join("round-2/ppo")));
    for f in [
        "rlhf_report.json",
        "rs_report.json",
        "rs_rewards.svg",
        "report.json",
        "round-2/prefs/prefs.jsonl",
        "round-2/rs/step.json",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let said = said.into_inner().unwrap();
    assert!(said.iter().any(|m| m.ends_with("round-2/ppo")), "{said:?}");
    // A rerun finds every step done and runs nothing.
    let said = std::sync::Mutex::new(Vec::new());
    let again =
        trainer::rlhf::run(Cpu, &cfg, &|m| said.lock().unwrap().push(m.to_string())).unwrap();
    let said = said.into_inner().unwrap();
    assert!(
        said.iter().all(|m| m.ends_with("done, skipped")),
        "{said:?}"
    );
    assert_eq!(again.checkpoint, rep.checkpoint);
    load_model(Cpu, &rep.checkpoint, Head::Lm).unwrap();
}

/// World, tokenizer, pretraining and SFT (the world recipe test's settings, shortened), then a
/// reward model on annotator-labelled pairs of SFT samples: two answers at temperature 1 to every
/// RLHF prompt, twice, ties dropped. One reward model serves as helpfulness and safety model, so it
/// trains on the pairs of both categories. Returns (world dir, SFT checkpoint, reward model dir).
fn world_sft_and_rm(d: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let t0 = Instant::now();
    let (w, pt) = common::pretrained_world(d, 200, 0);
    let mut sc = TrainConfig::sft_defaults(vec![w.join("sft.jsonl")], d.join("sft"), pt);
    if let DataSpec::Sft { epochs, .. } = &mut sc.data {
        *epochs = 3;
    }
    sc.seq_len = 128;
    sc.batch_size = 16;
    sc.lr = 1e-3;
    sc.warmup = 10;
    sc.eval_every = 0;
    sc.progress = false;
    run(Cpu, sc, None).unwrap();
    let sft = latest(&d.join("sft"));
    println!(
        "world, pretraining and SFT: {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    let t1 = Instant::now();
    let ann = Annotator::new(World::load(&w).unwrap());
    let tok = Tokenizer::from_file(&sft.join("tokenizer.json")).unwrap();
    let mut model = load_model(Cpu, &sft, Head::Lm).unwrap();
    let prompts = read_examples(&w.join("rlhf_prompts.jsonl")).unwrap();
    let pairs = trainer::prefs::collect(
        &mut model,
        &tok,
        &ann,
        &prompts,
        &trainer::prefs::PrefsConfig {
            temperatures: vec![1.0],
            max_new_tokens: 40,
            batch: 50,
            seed: 3,
            pairs_per_prompt: 2,
            off_topic: 0.5,
            ..Default::default()
        },
    )
    .unwrap();
    let rows: String = pairs
        .iter()
        .map(|p| {
            let row = serde_json::json!({
                "messages": p.messages, "chosen": p.chosen, "rejected": p.rejected,
                "rating": p.rating, "chosen_safe": p.chosen_safe, "rejected_safe": p.rejected_safe,
            });
            format!("{row}\n")
        })
        .collect();
    std::fs::write(d.join("pairs.jsonl"), rows).unwrap();
    let mut rc = trainer::rm::RmConfig::new(
        sft.clone(),
        vec![d.join("pairs.jsonl")],
        d.join("rm"),
        trainer::rm::RmKind::Helpfulness,
    );
    rc.batch_size = 16;
    rc.micro_batch = 16;
    rc.epochs = 2;
    rc.lr = Some(5e-4);
    rc.val_fraction = 0.0;
    rc.progress = false;
    let rep = trainer::rm::run(Cpu, &rc).unwrap();
    println!(
        "{} pairs; reward model: {} steps, last batch accuracy {:.2}; {:.1} s",
        pairs.len(),
        rep.steps,
        rep.final_acc,
        t1.elapsed().as_secs_f64()
    );
    (w, sft, rep.model_dir)
}

/// PPO from the SFT model on the world, whose demonstrators are imperfect (bare and hedged
/// answers, false refusals). Ten iterations of 64 rollouts raise the reward model's score of
/// held-out answers (measured +4.7 in LOGIT(R_c); the bar is +0.2) and the policy's expected gold
/// reward, the mean gold R_c of answers sampled at temperature 1 (measured 0.203 -> 0.245; the
/// bar is +0.02; PPO seeds 1, 2 and 3 gave 0.248, 0.246 and 0.250), with the summed KL to π0
/// bounded (measured 1.5-2.5 nats per ~24-token response; the bar is 6). What it does not do:
/// raise the greedy answers' gold reward (0.303 -> 0.287; 0.282, 0.303, 0.302 for seeds 1-3). This
/// test's single reward model serves as the safety model too and prefers a refusal to a wrong
/// answer, so PPO learns to refuse (greedy false refusals 0.17 -> 0.54), and run longer it finds
/// fluent answers the reward model over-rates (held-out gold falls after ~20 iterations): reward
/// hacking, which the paper answers with new labels on the latest policy's samples each round.
#[test]
fn ppo_raises_the_held_out_reward_with_bounded_kl_on_the_world() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (w, sft, rm) = shared_world();
    let (w, sft, rm) = (w.clone(), sft.clone(), rm.clone());

    let mut cfg = PpoConfig::new(
        sft.clone(),
        rm.clone(),
        vec![w.join("rlhf_prompts.jsonl")],
        d.join("ppo"),
    );
    cfg.eval_prompts = vec![w.join("eval.jsonl")];
    cfg.eval_size = 100;
    cfg.world = Some(w.clone());
    cfg.iterations = 15;
    // Scaled down from the paper's 512/64.
    cfg.batch = 64;
    cfg.minibatch = 16;
    // A 1M-parameter model takes a larger step than the paper's 1e-6 for 7B.
    cfg.lr = 5e-5;
    cfg.critic_lr = Some(2e-4);
    cfg.critic_warmup = 2;
    cfg.max_new_tokens = 40;
    cfg.eval_every = 5;
    cfg.patience = 0;
    cfg.ckpt_every = 0;
    cfg.progress = false;
    let t1 = Instant::now();
    let rep = trainer::ppo::run(Cpu, &cfg).unwrap();
    let ppo_s = t1.elapsed().as_secs_f64();
    for h in &rep.history {
        println!("{}", serde_json::to_string(h).unwrap());
    }

    // The gold annotator on all held-out prompts, greedy, before and after.
    let ann = Annotator::new(World::load(&w).unwrap());
    let eval = read_examples(&w.join("eval.jsonl")).unwrap();
    let tok = Tokenizer::from_file(&sft.join("tokenizer.json")).unwrap();
    let mut before = load_model(Cpu, &sft, Head::Lm).unwrap();
    let (b, _) = world_eval(&mut before, &tok, &ann, &eval, 50, 40).unwrap();
    let mut after = load_model(Cpu, &rep.checkpoint, Head::Lm).unwrap();
    let (a, _) = world_eval(&mut after, &tok, &ann, &eval, 50, 40).unwrap();
    let (e0, e1) = (rep.evals.first().unwrap(), rep.evals.last().unwrap());
    let last = rep.history.last().unwrap();
    let (g0, s0, fr0) = gold_of_model(&sft, &w, 4);
    let (g1, s1, fr1) = gold_of_model(&rep.checkpoint, &w, 4);
    println!(
        "gold R_c greedy {g0:.4} -> {g1:.4}, sampled {s0:.4} -> {s1:.4}; false refusals {fr0:.3} -> {fr1:.3}"
    );
    println!(
        "held-out reward-model score {:.3} -> {:.3} (R_c {:.3} -> {:.3}); gold helpfulness {:.4} -> {:.4}, safety {:.4} -> {:.4}; KL {:.3}; PPO {ppo_s:.1} s of {:.1} s",
        e0.score,
        e1.score,
        e0.reward,
        e1.reward,
        b.helpfulness,
        a.helpfulness,
        b.safety,
        a.safety,
        last.kl,
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(rep.iterations, 15);
    assert_eq!((e0.iteration, e1.iteration), (0, 15));
    assert!(
        e1.score > e0.score + 0.2 && e1.reward > e0.reward,
        "held-out reward-model score {} -> {}",
        e0.score,
        e1.score
    );
    assert!(
        rep.history.iter().all(|h| h.kl.is_finite() && h.kl < 6.0),
        "KL to the reference: {:?}",
        rep.history.iter().map(|h| h.kl).collect::<Vec<_>>()
    );
    assert!(
        last.explained_variance > 0.3,
        "the critic learns the returns"
    );
    assert!(
        s1 > s0 + 0.02,
        "the policy's expected (sampled) gold R_c {s0} -> {s1}"
    );
    assert!(
        a.helpfulness > b.helpfulness - 0.1 && a.safety > b.safety - 0.1,
        "gold reward collapsed: helpfulness {} -> {}, safety {} -> {}",
        b.helpfulness,
        a.helpfulness,
        b.safety,
        a.safety
    );
}

/// Mean gold R_c over the held-out prompts: of the greedy answers, and of `n` answers per prompt
/// sampled at temperature 1 (the policy's expected reward), and the greedy false-refusal rate.
fn gold_of_model(ckpt: &Path, w: &Path, n: usize) -> (f64, f64, f32) {
    use trainer::evaluate::chat_answers;
    let ann = Annotator::new(World::load(w).unwrap());
    let eval = read_examples(&w.join("eval.jsonl")).unwrap();
    let tok = Tokenizer::from_file(&ckpt.join("tokenizer.json")).unwrap();
    let mut m = load_model(Cpu, ckpt, Head::Lm).unwrap();
    let (ev, greedy) = world_eval(&mut m, &tok, &ann, &eval, 50, 40).unwrap();
    let g = eval
        .iter()
        .zip(&greedy)
        .map(|(e, a)| {
            reward::gold(
                &ann,
                &e.messages,
                e.category == trainer::world::Category::Safety,
                a,
                SAFETY_THRESHOLD,
            )
            .0 as f64
        })
        .sum::<f64>()
        / eval.len() as f64;
    let d: Vec<_> = eval
        .iter()
        .flat_map(|e| std::iter::repeat_n(e.messages.clone(), n))
        .collect();
    let p = engine::generate::SamplingParams {
        temperature: 1.0,
        max_new_tokens: 40,
        stop: vec![tok.eos],
        seed: 77,
        ..Default::default()
    };
    let s = chat_answers(&mut m, &tok, &d, &p, 64).unwrap();
    let sampled = s
        .iter()
        .enumerate()
        .map(|(i, a)| {
            reward::gold(
                &ann,
                &eval[i / n].messages,
                eval[i / n].category == trainer::world::Category::Safety,
                &a.text,
                SAFETY_THRESHOLD,
            )
            .0 as f64
        })
        .sum::<f64>()
        / s.len() as f64;
    (g, sampled, ev.false_refusal_rate)
}

/// Rejection sampling on the world: the world's demonstrators are imperfect (bare and hedged
/// answers, false refusals: `Generator::demonstration`), the SFT model imitates them, and the
/// reward model, trained on annotator-labelled pairs, prefers much of what the annotator prefers.
/// One round (best of 8 samples per RLHF prompt by the reward model, fine-tuned on for 4 epochs)
/// raises the policy's expected gold reward on held-out prompts (mean gold R_c of 4 samples per
/// prompt at temperature 1) over SFT: measured 0.203 -> 0.247 and 0.203 -> 0.245 for RS seeds 0
/// and 5; the bar is +0.02. The greedy answers' gold reward stays level (0.303 -> 0.305 / 0.300;
/// the bar: at most 0.02 lower).
#[test]
fn rejection_sampling_raises_the_held_out_gold_reward_on_the_world() {
    let (w, sft, rm) = shared_world();
    let dir = tempfile::tempdir().unwrap();
    let cfg = trainer::rs::RsConfig {
        policy: sft.clone(),
        reward_helpfulness: rm.clone(),
        reward_safety: Some(rm.clone()),
        prompts: vec![w.join("rlhf_prompts.jsonl")],
        out: dir.path().join("round-1"),
        k: 8,
        temperature: 1.0,
        max_new_tokens: 40,
        seq_len: 128,
        epochs: 4,
        lr: 1e-4,
        ..Default::default()
    };
    let st = trainer::rs::run(Cpu, &cfg).unwrap();
    let after = st.checkpoint.clone().unwrap();
    let (g0, s0, fr0) = gold_of_model(sft, w, 4);
    let (g1, s1, fr1) = gold_of_model(&after, w, 4);
    println!(
        "rejection sampling: best of 8 {:.3} vs median {:.3} (reward model); held-out gold R_c greedy {g0:.4} -> {g1:.4}, sampled {s0:.4} -> {s1:.4}; false refusals {fr0:.3} -> {fr1:.3}",
        st.mean_max, st.mean_median
    );
    assert!(st.mean_max > st.mean_median);
    assert!(s1 > s0 + 0.02, "expected (sampled) gold R_c {s0} -> {s1}");
    assert!(g1 > g0 - 0.02, "greedy gold R_c {g0} -> {g1}");
}
