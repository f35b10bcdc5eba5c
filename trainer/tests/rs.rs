//! Rejection sampling as the paper does it, on tiny random models: a teacher samples (with a
//! per-round temperature sweep on held-out prompts) and a smaller student with the same
//! tokenizer is fine-tuned on the pool; a student with another tokenizer is refused by name.

mod common;

use engine::checkpoint::{save_model, SaveOptions};
use engine::tokenizer::Tokenizer;
use engine::{Cpu, Head, Llama, LlamaConfig};
use std::path::{Path, PathBuf};
use trainer::rs::{run, write_report, Pool, RsConfig};

/// A random causal LM of `hidden` width and `layers` layers over the tokenizer `tok`, at `dir`.
fn model(dir: &Path, tok: &Path, hidden: usize, layers: usize, seed: u64) -> PathBuf {
    let mut c = LlamaConfig::preset("tiny").unwrap();
    c.vocab_size = Tokenizer::from_file(tok).unwrap().vocab_size();
    c.hidden_size = hidden;
    c.intermediate_size = 2 * hidden;
    c.num_hidden_layers = layers;
    c.max_position_embeddings = 64;
    let mut m = Llama::new(Cpu, c, Head::Lm).unwrap();
    m.init_random(seed).unwrap();
    save_model(&m, dir, SaveOptions::default(), |tmp| {
        std::fs::copy(tok, tmp.join("tokenizer.json")).unwrap();
        Ok(())
    })
    .unwrap();
    dir.to_path_buf()
}

fn weights(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

#[test]
fn a_teacher_samples_and_a_smaller_student_is_fine_tuned_on_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The teacher: 2 layers of 32; the student: 1 layer of 16, same tokenizer.
    let (teacher, rm, prompts) = common::tiny_ppo_setup(d);
    let student = model(&d.join("student"), &d.join("tok.json"), 16, 1, 9);
    let (t0, s0) = (weights(&teacher), weights(&student));
    let cfg = RsConfig {
        policy: student.clone(),
        teacher: Some(teacher.clone()),
        reward_helpfulness: rm.clone(),
        reward_safety: Some(rm.clone()),
        prompts: vec![prompts.clone()],
        out: d.join("rs"),
        k: 3,
        temperature: 1.0,
        temperatures: vec![0.7, 1.3],
        sweep_prompts: 4,
        max_new_tokens: 8,
        batch: 32,
        seq_len: 64,
        epochs: 1,
        lr: 1e-3,
        sft_batch: 8,
        ..Default::default()
    };
    let st = run(Cpu, &cfg).unwrap();
    write_report(&cfg.out, std::slice::from_ref(&st)).unwrap();
    // The teacher sampled and is untouched; the student was fine-tuned.
    assert_eq!(st.sampler, teacher);
    assert_eq!(weights(&teacher), t0);
    let ck = st.checkpoint.clone().unwrap();
    let s1 = weights(&ck);
    assert_eq!(s1.len(), s0.len(), "the fine-tune is the student's shape");
    assert_ne!(s1, s0, "the student's weights changed");
    let pool = Pool::read(&cfg.out.join("pool.jsonl")).unwrap();
    assert!(!pool.best.is_empty());
    assert!(pool
        .best
        .values()
        .all(|e| e.model == teacher && e.round == 1));
    // The sweep ran on the last 4 prompts, which the pool (the fine-tune's data) never holds,
    // even where an earlier prompt repeats one (this prompt list has repeats).
    let all = trainer::formats::read_prompts(&[prompts], None).unwrap().0;
    let held = &all[all.len() - 4..];
    let trained = all[..all.len() - 4]
        .iter()
        .filter(|p| held.iter().all(|h| h.messages != p.messages))
        .count();
    assert!(trained < all.len() - 4, "the setup's prompts repeat");
    assert_eq!(st.prompts, trained);
    assert_eq!(st.sweep_prompts, 4);
    for p in held {
        assert!(pool.best.values().all(|e| e.messages != p.messages));
    }
    let temps: Vec<f32> = st.sweep.iter().map(|s| s.temperature).collect();
    assert_eq!(temps, [0.7, 1.3]);
    let best = st
        .sweep
        .iter()
        .max_by(|a, b| a.mean_max.total_cmp(&b.mean_max))
        .unwrap();
    assert_eq!(st.temperature, best.temperature);
    // Figure 7: N = 1..K, the max never falls, and N = K is the round's fixed-K numbers.
    assert_eq!(st.curve.len(), 3);
    for w in st.curve.windows(2) {
        assert!(w[1].mean_max >= w[0].mean_max, "{:?}", st.curve);
    }
    let last = st.curve.last().unwrap();
    assert!((last.mean_max - st.mean_max).abs() < 1e-6);
    assert!((last.mean_median - st.mean_median).abs() < 1e-6);
    for f in [
        "fig7.jsonl",
        "fig7.svg",
        "fig8.jsonl",
        "fig8-round-1.svg",
        "rs_report.json",
    ] {
        assert!(cfg.out.join(f).is_file(), "{f}");
    }
    let fig8 = trainer::run_dir::read_jsonl_values(&cfg.out.join("fig8.jsonl")).unwrap();
    assert_eq!(fig8.len(), 2 * 3);
    assert_eq!(fig8.iter().filter(|v| v["chosen"] == true).count(), 3);

    // A student over another tokenizer is refused, naming both tokenizers.
    std::fs::create_dir_all(d.join("other")).unwrap();
    let text: String = (0..300).map(|i| format!("zebra {i} quartz.\n")).collect();
    std::fs::write(d.join("other/corpus.txt"), text).unwrap();
    trainer::tokenizer_train::train_on(&d.join("other/corpus.txt"), 300, &d.join("other/tok.json"))
        .unwrap();
    let other = model(&d.join("other/lm"), &d.join("other/tok.json"), 16, 1, 9);
    let bad = RsConfig {
        policy: other.clone(),
        out: d.join("rs-bad"),
        ..cfg.clone()
    };
    let e = format!("{:#}", run(Cpu, &bad).unwrap_err());
    assert!(
        e.contains("tokenizers differ")
            && e.contains(&teacher.join("tokenizer.json").display().to_string())
            && e.contains(&other.join("tokenizer.json").display().to_string()),
        "{e}"
    );
}
