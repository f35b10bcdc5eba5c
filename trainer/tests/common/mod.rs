//! The tiny-world setup the behaviour tests share: world, tokenizer, shards, pretraining.
#![allow(dead_code)] // each test binary uses its own subset

use engine::checkpoint::{save_model, SaveOptions};
use engine::tokenizer::Tokenizer;
use engine::{Cpu, Head, Llama, LlamaConfig};
use std::path::{Path, PathBuf};
use trainer::data::{prepare, PrepareConfig};
use trainer::lm_train::{run, ModelSource, TrainConfig};
use trainer::world::{Size, WorldConfig};

/// Under `d`: the small world of seed 1 (`world/`), a 512-token byte-fallback BPE trained on its
/// corpus (`tok.json`), the corpus as token shards (`data/`), and the tiny preset pretrained on them
/// for `steps` steps (`pt/`, sequences of 128, batches of 16, a tenth of the steps as warmup,
/// validation every `eval_every` steps, 0: never). Returns the world directory and the checkpoint.
pub fn pretrained_world(d: &Path, steps: usize, eval_every: usize) -> (PathBuf, PathBuf) {
    let w = d.join("world");
    trainer::world::run(&WorldConfig {
        out: w.clone(),
        seed: 1,
        size: Size::Small,
    })
    .unwrap();
    trainer::tokenizer_train::train_on(&w.join("corpus.txt"), 512, &d.join("tok.json")).unwrap();
    prepare(&PrepareConfig {
        tokenizer: d.join("tok.json"),
        out: d.join("data"),
        inputs: vec![w.join("corpus.txt")],
        val_fraction: 0.05,
        shard_tokens: 1 << 24,
        skip_bad: false,
        progress: false,
    })
    .unwrap();
    let mut pc = TrainConfig::defaults(
        d.join("data"),
        d.join("pt"),
        ModelSource::Preset("tiny".into()),
        steps,
    );
    pc.seq_len = 128;
    pc.batch_size = 16;
    pc.warmup = steps / 10;
    pc.eval_every = eval_every;
    pc.progress = false;
    let pt = run(Cpu, pc, None).unwrap().checkpoint.unwrap();
    (w, pt)
}

/// The latest checkpoint of a training run directory.
pub fn latest(run_dir: &Path) -> PathBuf {
    trainer::run_dir::model_dir(run_dir).unwrap()
}

/// A word corpus, its 300-token tokenizer, a random tiny Llama (`lm/`), a reward model
/// initialised from it (`rm/`) and 24 one-turn prompts, every 4th tagged safety: the PPO loop's
/// smallest setup. Returns (policy, reward model, prompts).
pub fn tiny_ppo_setup(d: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let words = [
        "red", "fox", "sun", "moon", "tree", "bird", "sings", "runs", "the", "a",
    ];
    let mut text = String::new();
    for i in 0..400 {
        text += &format!(
            "{} {} {}.\n",
            words[i % 10],
            words[(i * 7) % 10],
            words[(i * 3) % 10]
        );
    }
    std::fs::write(d.join("corpus.txt"), &text).unwrap();
    let (lm, rm) = tiny_lm_and_rm(d, &d.join("corpus.txt"), 300, 64);
    let prompts = d.join("prompts.jsonl");
    let rows: String = (0..24)
        .map(|i| {
            let cat = if i % 4 == 0 { "safety" } else { "helpfulness" };
            format!(
                "{}\n",
                serde_json::json!({"messages": [{"role": "user", "content": format!("the {} {}", words[i % 10], words[(i * 3) % 10])}], "category": cat})
            )
        })
        .collect();
    std::fs::write(&prompts, rows).unwrap();
    (lm, rm, prompts)
}

/// Under `d`: a `vocab`-token tokenizer trained on `corpus` (`tok.json`), a random tiny Llama
/// with that vocabulary and `max_pos` positions (`lm/`, the tokenizer beside it) and a reward
/// model initialised from it (`rm/`). Returns (policy, reward model).
pub fn tiny_lm_and_rm(d: &Path, corpus: &Path, vocab: usize, max_pos: usize) -> (PathBuf, PathBuf) {
    let tok = d.join("tok.json");
    trainer::tokenizer_train::train_on(corpus, vocab, &tok).unwrap();
    let mut c = LlamaConfig::preset("tiny").unwrap();
    c.vocab_size = Tokenizer::from_file(&tok).unwrap().vocab_size();
    c.hidden_size = 32;
    c.intermediate_size = 64;
    c.num_hidden_layers = 2;
    c.max_position_embeddings = max_pos;
    let mut m = Llama::new(Cpu, c, Head::Lm).unwrap();
    m.init_random(3).unwrap();
    let lm = d.join("lm");
    save_model(&m, &lm, SaveOptions::default(), |tmp| {
        std::fs::copy(&tok, tmp.join("tokenizer.json")).unwrap();
        Ok(())
    })
    .unwrap();
    let rm = trainer::rm::init_rm(Cpu, &lm, 4).unwrap();
    trainer::rm::save_rm(&rm, &d.join("rm"), &tok).unwrap();
    (lm, d.join("rm"))
}
