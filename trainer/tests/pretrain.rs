//! Pretraining behaviour: the loss falls below the unigram entropy on Tiny Shakespeare, resume is
//! bit-exact, the shard format and the loader are sound, and bad input gets clear errors.

use engine::checkpoint::{load_model, save_model, SaveOptions, TensorFiles};
use engine::shared_data::or_skip;
use engine::{Cpu, Head};
use std::path::{Path, PathBuf};
use trainer::data::{
    prepare, unigram_entropy, write_shard, Loader, PrepareConfig, Shard, TokenData,
};
use trainer::lm_train::{run, ModelSource, TrainConfig};
use trainer::tokenizer_train::train_on;

/// Tokenizer + prepared shards for `text` in `dir`.
fn prepared(dir: &Path, text: &str, vocab: usize) -> PathBuf {
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, text).unwrap();
    train_on(&corpus, vocab, &dir.join("tok.json")).unwrap();
    let out = dir.join("data");
    prepare(&PrepareConfig {
        tokenizer: dir.join("tok.json"),
        out: out.clone(),
        inputs: vec![corpus],
        val_fraction: 0.1,
        shard_tokens: 20_000,
        skip_bad: false,
        progress: false,
    })
    .unwrap();
    out
}

fn small_cfg(data: PathBuf, out: PathBuf, steps: usize) -> TrainConfig {
    let mut c = TrainConfig::defaults(data, out, ModelSource::Preset("tiny".into()), steps);
    c.seq_len = 32;
    c.batch_size = 4;
    c.grad_accum = 2;
    c.eval_every = 5;
    c.eval_windows = 8;
    c.ckpt_every = 4;
    c.progress = false;
    c
}

#[test]
fn trained_tokenizer_has_the_requested_size_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let Some(text) = shakespeare() else {
        return;
    };
    let text: String = text.chars().take(50_000).collect();
    let corpus = dir.path().join("c.txt");
    std::fs::write(&corpus, &text).unwrap();
    for vocab in [300, 700] {
        let out = dir.path().join(format!("t{vocab}.json"));
        assert_eq!(train_on(&corpus, vocab, &out).unwrap(), vocab);
        let tok = engine::tokenizer::Tokenizer::from_file(&out).unwrap();
        assert_eq!((tok.vocab_size(), tok.bos, tok.eos), (vocab, 1, 2));
        // Byte fallback: text never seen in training still round-trips exactly.
        for s in [
            "To be, or not to be",
            "naïve café — 日本語 🦙\n  spaces  ",
            &text[..2000],
        ] {
            let ids = tok.encode(s, false).unwrap();
            assert!(!ids.contains(&0), "no <unk> with byte fallback: {s:?}");
            assert_eq!(tok.decode(&ids).unwrap(), s);
        }
    }
    assert!(
        train_on(&corpus, 100, &dir.path().join("x.json")).is_err(),
        "too small a vocabulary is an error"
    );
}

/// Tiny Shakespeare, or `None` (the test skips) where it has not been fetched.
fn shakespeare() -> Option<String> {
    or_skip("data/tinyshakespeare.txt").map(|p| std::fs::read_to_string(p).unwrap())
}

#[test]
fn shakespeare_validation_loss_falls_well_below_unigram_entropy() {
    let Some(text) = shakespeare() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = prepared(dir.path(), &text, 512);
    let entropy = unigram_entropy(&TokenData::open(&data).unwrap()) as f32;
    let mut c = TrainConfig::defaults(
        data,
        dir.path().join("run"),
        ModelSource::Preset("tiny".into()),
        250,
    );
    c.seq_len = 64;
    c.batch_size = 8;
    c.warmup = 20;
    c.eval_every = 50;
    c.eval_windows = 32;
    c.progress = false;
    let rep = run(Cpu, c, None).unwrap();
    let first = rep.logs.first().unwrap().loss;
    let val = rep.final_val_loss.unwrap();
    println!("unigram entropy {entropy:.3}, first loss {first:.3}, final val {val:.3}");
    assert!(
        first > entropy,
        "an untrained model starts above the unigram entropy"
    );
    assert!(
        val < entropy - 0.5,
        "val loss {val} is not clearly below the unigram entropy {entropy}"
    );
    assert!(dir.path().join("run/loss.svg").is_file());
    assert!(dir.path().join("run/metrics.jsonl").is_file());
}

#[test]
fn resume_reproduces_the_uninterrupted_run_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let Some(text) = shakespeare() else {
        return;
    };
    let text: String = text.chars().take(120_000).collect();
    let data = prepared(dir.path(), &text, 400);
    let full = run(Cpu, small_cfg(data.clone(), dir.path().join("a"), 11), None).unwrap();
    let mut part = small_cfg(data.clone(), dir.path().join("b"), 11);
    part.stop_after = Some(5);
    let first = run(Cpu, part, None).unwrap();
    assert!(first.interrupted && first.last_step == 5);
    let cfg = trainer::lm_train::resume_config(&dir.path().join("b"), None).unwrap();
    let rest = run(Cpu, cfg, Some(&dir.path().join("b"))).unwrap();
    let resumed: Vec<(usize, u32, Option<u32>)> = first
        .logs
        .iter()
        .chain(&rest.logs)
        .map(|l| (l.step, l.loss.to_bits(), l.val_loss.map(f32::to_bits)))
        .collect();
    let whole: Vec<(usize, u32, Option<u32>)> = full
        .logs
        .iter()
        .map(|l| (l.step, l.loss.to_bits(), l.val_loss.map(f32::to_bits)))
        .collect();
    assert_eq!(resumed, whole);
    // The final weights agree bit for bit too.
    let wa = TensorFiles::open(&full.checkpoint.unwrap()).unwrap();
    let wb = TensorFiles::open(&rest.checkpoint.unwrap()).unwrap();
    for name in wa.names() {
        assert_eq!(
            wa.read_f32(name).unwrap(),
            wb.read_f32(name).unwrap(),
            "{name}"
        );
    }
    // The metrics file of the resumed run has each step once.
    let text = std::fs::read_to_string(dir.path().join("b/metrics.jsonl")).unwrap();
    let steps: Vec<u64> = text
        .lines()
        .filter_map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()?
                .get("step")?
                .as_u64()
        })
        .collect();
    assert_eq!(steps, (1..=11).collect::<Vec<_>>());
}

#[test]
fn shard_format_round_trip_and_corruption() {
    let dir = tempfile::tempdir().unwrap();
    for (vocab, bpt) in [(1000usize, 2usize), (70_000, 4)] {
        let toks: Vec<u32> = (0..777).map(|i| (i * 7919) % vocab as u32).collect();
        let p = dir.path().join(format!("s{vocab}.bin"));
        write_shard(&p, &toks, vocab).unwrap();
        let s = Shard::open(&p).unwrap();
        assert_eq!((s.len, s.vocab_size, s.bytes_per_token), (777, vocab, bpt));
        assert_eq!(s.tokens(), toks);
        // Truncation and a foreign file are named errors.
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
        let e = Shard::open(&p).err().unwrap().to_string();
        assert!(
            e.contains("truncated") && e.contains(&p.display().to_string()),
            "{e}"
        );
        std::fs::write(&p, b"not a shard at all, just some text......").unwrap();
        assert!(Shard::open(&p)
            .err()
            .unwrap()
            .to_string()
            .contains("bad magic"));
    }
    assert!(
        write_shard(&dir.path().join("x.bin"), &[5, 1000], 1000).is_err(),
        "token outside vocab"
    );
}

#[test]
fn loader_is_deterministic_and_resumable() {
    let dir = tempfile::tempdir().unwrap();
    let Some(text) = shakespeare() else {
        return;
    };
    let text: String = text.chars().take(60_000).collect();
    let data = TokenData::open(&prepared(dir.path(), &text, 300)).unwrap();
    let batches = |seed: u64, skip: u64, n: usize| {
        let mut l = Loader::new(&data, 16, seed).unwrap();
        l.position = skip;
        let (mut ids, mut tg) = (vec![], vec![]);
        (0..n)
            .map(|_| {
                l.next_batch(&data, 3, &mut ids, &mut tg);
                (ids.clone(), tg.clone())
            })
            .collect::<Vec<_>>()
    };
    let a = batches(7, 0, 6);
    assert_eq!(a, batches(7, 0, 6));
    // Restarting at a saved position continues the same stream.
    assert_eq!(&a[2..], &batches(7, 6, 4)[..]);
    assert_ne!(a, batches(8, 0, 6));
    // Targets are the ids shifted by one token.
    for (ids, tg) in &a {
        for r in 0..3 {
            assert_eq!(
                &ids[r * 16 + 1..(r + 1) * 16],
                &tg[r * 16..(r + 1) * 16 - 1]
            );
        }
    }
}

#[test]
fn bad_data_gets_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let err = |r: anyhow::Result<trainer::lm_train::TrainReport>| {
        format!("{:#}", r.expect_err("must fail"))
    };
    // Not a data directory.
    let e = err(run(Cpu, small_cfg(d.join("nope"), d.join("r"), 2), None));
    assert!(e.contains("prepare-data") && e.contains("nope"), "{e}");

    let Some(text) = shakespeare() else {
        return;
    };
    let text: String = text.chars().take(30_000).collect();
    std::fs::write(d.join("c.txt"), &text).unwrap();
    train_on(&d.join("c.txt"), 300, &d.join("tok.json")).unwrap();
    let prep = |inputs: Vec<PathBuf>, skip_bad: bool| {
        prepare(&PrepareConfig {
            tokenizer: d.join("tok.json"),
            out: d.join("out"),
            inputs,
            val_fraction: 0.1,
            shard_tokens: 1 << 20,
            skip_bad,
            progress: false,
        })
    };
    // Empty corpus.
    std::fs::write(d.join("empty.txt"), "").unwrap();
    let e = format!("{:#}", prep(vec![d.join("empty.txt")], false).unwrap_err());
    assert!(e.contains("empty"), "{e}");
    // A JSONL line without `text`, and one that is not JSON: named by file and line.
    std::fs::write(
        d.join("b.jsonl"),
        "{\"text\": \"fine\"}\n{\"body\": \"x\"}\nnot json\n",
    )
    .unwrap();
    let e = format!("{:#}", prep(vec![d.join("b.jsonl")], false).unwrap_err());
    assert!(
        e.contains("b.jsonl:2") && e.contains("no `text` field"),
        "{e}"
    );
    // Non-UTF-8 text names the file and line.
    std::fs::write(d.join("bin.txt"), b"line one\nline \xff two\n").unwrap();
    let e = format!("{:#}", prep(vec![d.join("bin.txt")], false).unwrap_err());
    assert!(e.contains("bin.txt:2") && e.contains("UTF-8"), "{e}");
    // With --skip-bad the run continues and counts what it skipped.
    let meta = prep(
        vec![d.join("c.txt"), d.join("b.jsonl"), d.join("bin.txt")],
        true,
    )
    .unwrap();
    assert_eq!(meta.skipped_documents, 3);
    assert_eq!(meta.documents, 2);
    // A missing input path.
    let e = format!(
        "{:#}",
        prep(vec![d.join("missing.txt")], false).unwrap_err()
    );
    assert!(e.contains("missing.txt"), "{e}");
    // A sequence longer than the model's context.
    let mut c = small_cfg(d.join("out"), d.join("r2"), 2);
    c.seq_len = 10_000;
    let e = err(run(Cpu, c, None));
    assert!(e.contains("max_position_embeddings"), "{e}");
}

#[test]
fn nonfinite_loss_stops_naming_the_tensor_or_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let Some(text) = shakespeare() else {
        return;
    };
    let text: String = text.chars().take(40_000).collect();
    let data = prepared(dir.path(), &text, 300);
    // A checkpoint with a NaN inside one weight.
    let mut cfg = engine::LlamaConfig::preset("tiny").unwrap();
    cfg.vocab_size = TokenData::open(&data).unwrap().meta.vocab_size;
    let mut m = engine::Llama::new(Cpu, cfg, Head::Lm).unwrap();
    m.init_random(3).unwrap();
    let mut p = m.params_to_host().unwrap();
    let e = m
        .table
        .get("model.layers.2.mlp.up_proj.weight")
        .unwrap()
        .clone();
    p[e.span.off + 10] = f32::NAN;
    m.set_params(&p).unwrap();
    let init = dir.path().join("bad-init");
    save_model(&m, &init, SaveOptions::default(), |_| Ok(())).unwrap();
    assert!(load_model(Cpu, &init, Head::Lm).is_ok());
    let mut c = small_cfg(data.clone(), dir.path().join("r"), 3);
    c.model = ModelSource::Init(init.clone());
    let e = format!("{:#}", run(Cpu, c.clone(), None).err().unwrap());
    assert!(
        e.contains("step 1") && e.contains("model.layers.2.mlp.up_proj.weight"),
        "{e}"
    );
    c.skip_nonfinite = true;
    c.out = dir.path().join("r2");
    // Every step is skipped: an error (nothing was trained), and no checkpoint.
    let e = format!("{:#}", run(Cpu, c, None).err().unwrap());
    assert!(e.contains("every step") && e.contains("skipped"), "{e}");
    assert!(!dir.path().join("r2/checkpoints").exists());
    let log = std::fs::read_to_string(dir.path().join("r2/metrics.jsonl")).unwrap();
    assert_eq!(log.matches("skipped").count(), 3);
}
