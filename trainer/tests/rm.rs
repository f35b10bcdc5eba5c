//! Reward models: the training step's batch, loss and gradients equal Hugging Face's on the
//! fixture; data formats, ratings and the safety rule; HF-layout export and import; a tiny reward
//! model learns a synthetic preference (right vs wrong sums) well above chance, best where the
//! wrong answer is furthest off; the HH harmless pairs load and train.

use engine::checkpoint::{read_params, save_model, SaveOptions, TensorFiles};
use engine::shared_data::or_skip;
use engine::tokenizer::{Message, Tokenizer};
use engine::{Cpu, Head, Llama, LlamaConfig};
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use trainer::formats::{parse_pair, read_pairs, read_scored as read_score_rows};
use trainer::rm::*;

/// The Llama 2 tokenizer, or `None` (the test skips) where it has not been fetched.
fn llama_tok_path() -> Option<PathBuf> {
    or_skip("tokenizer/llama2/tokenizer.json")
}

const FIXTURES: [&str; 2] = ["llama-tiny-gqa", "llama-tiny-mha"];

/// max |a − b| and that over max |b|.
fn diff(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let abs = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    let scale = b.iter().fold(0f32, |m, y| m.max(y.abs()));
    (abs, abs / scale.max(1e-30))
}

/// The fixture's base weights with its reference `score.weight`, and its pairs as `TokPair`s
/// (`None`: the test skips).
fn fixture_model_and_pairs(name: &str) -> Option<(Llama<Cpu>, Vec<TokPair>, TensorFiles)> {
    let dir = or_skip(&format!("fixtures/{name}"))?;
    let cfg = LlamaConfig::from_file(&dir.join("config.json")).unwrap();
    let mut model = Llama::new(Cpu, cfg.clone(), Head::Score).unwrap();
    let weights = TensorFiles::open(&dir).unwrap();
    let (mut host, missing) = read_params(&model.table, &cfg, &weights, &["score.weight"]).unwrap();
    assert_eq!(missing, ["score.weight"]);
    let rm = TensorFiles::open(&dir.join("rm.safetensors")).unwrap();
    let e = model.table.get("score.weight").unwrap().clone();
    let sw = rm.read_f32_shaped("score.weight", &e.shape, "H").unwrap();
    host[e.span.off..e.span.off + e.span.len].copy_from_slice(&sw);
    model.set_params(&host).unwrap();
    let ids = |name: &str| {
        let (s, v) = rm.read_i64(name).unwrap();
        (s, v)
    };
    let (cs, c) = ids("chosen_ids");
    let (_, r) = ids("rejected_ids");
    let (_, cl) = ids("chosen_len");
    let (_, rl) = ids("rejected_len");
    let margin = rm.read_f32("margin").unwrap().1;
    let (n, t) = (cs[0], cs[1]);
    let row = |v: &[i64], i: usize, len: i64| -> Vec<u32> {
        v[i * t..i * t + len as usize]
            .iter()
            .map(|&x| x as u32)
            .collect()
    };
    let pairs = (0..n)
        .map(|i| TokPair {
            chosen: row(&c, i, cl[i]),
            rejected: row(&r, i, rl[i]),
            margin: margin[i],
            rating: None,
            safe: [None, None],
        })
        .collect();
    Some((model, pairs, rm))
}

#[test]
fn training_step_matches_the_fixture_loss_and_gradients() {
    for name in FIXTURES {
        fixture_case(name);
    }
}

fn fixture_case(name: &str) {
    let Some((mut model, pairs, rm)) = fixture_model_and_pairs(name) else {
        return;
    };
    assert!(pairs.len() >= 2, "the fixture has several pairs");
    let refs: Vec<&TokPair> = pairs.iter().collect();
    // Padding with a token the fixture does not use after the lengths: it must not matter.
    let batch = PairBatch::new(&refs, 7);
    assert_eq!(batch.ids.len(), 2 * pairs.len() * batch.t);
    model.zero_grads().unwrap();
    let out = forward_backward(&mut model, &batch, 1.0).unwrap();
    let read = |name: &str, shape: &[usize]| rm.read_f32_shaped(name, shape, "fixture").unwrap();
    let n = pairs.len();
    let (a, _) = diff(&out.chosen, &read("reward_chosen", &[n]));
    assert!(a <= 1e-5, "{name}: reward_chosen differs by {a}");
    let (a, _) = diff(&out.rejected, &read("reward_rejected", &[n]));
    assert!(a <= 1e-5, "{name}: reward_rejected differs by {a}");
    let ref_loss = read("loss", &[])[0];
    assert!(
        (out.loss - ref_loss).abs() <= 1e-5,
        "{name}: loss {} vs {ref_loss}",
        out.loss
    );
    let grads = model.grads_to_host().unwrap();
    let table = model.table.clone();
    let check = |grads: &[f32], what: &str| {
        for e in &table.entries {
            let gname = format!("grad.{}", e.name);
            let r = read(&gname, &e.shape);
            let (abs, rel) = diff(&grads[e.span.off..e.span.off + e.span.len], &r);
            assert!(
                abs <= 1e-5 || rel <= 1e-4,
                "{name}, {what}: {gname}: max abs {abs:.3e}, rel {rel:.3e}"
            );
        }
    };
    check(&grads, "one batch");

    // Gradient accumulation over micro-batches (scale = their share of the pairs) gives the same.
    model.zero_grads().unwrap();
    let (first, second) = refs.split_at(1);
    let mut loss = 0f64;
    for part in [first, second] {
        let b = PairBatch::new(part, 2);
        let o = forward_backward(&mut model, &b, part.len() as f32 / n as f32).unwrap();
        loss += o.loss as f64 * part.len() as f64 / n as f64;
    }
    assert!((loss as f32 - ref_loss).abs() <= 1e-5);
    check(&model.grads_to_host().unwrap(), "accumulated micro-batches");
}

/// The calibration term (σ(r) against the safety meta-labels) enters the gradient as its own
/// loss does: the gradient's dot product with a random direction matches the central difference
/// of ranking loss + calibration · mean Σ BCE.
#[test]
fn calibration_term_matches_finite_differences() {
    let Some((mut model, mut pairs, _)) = fixture_model_and_pairs(FIXTURES[0]) else {
        return;
    };
    let labels = [
        [Some(true), Some(false)],
        [Some(true), None],
        [None, Some(true)],
    ];
    for (p, l) in pairs.iter_mut().zip(labels.iter().cycle()) {
        p.safe = *l;
    }
    let refs: Vec<&TokPair> = pairs.iter().collect();
    let mut batch = PairBatch::new(&refs, 7);
    batch.calibration = 0.7;
    let total = |m: &mut Llama<Cpu>| -> f64 {
        m.forward(&batch.batch()).unwrap();
        let r = m.scores(&batch.rows).unwrap();
        let (rc, rr) = r.split_at(batch.pairs);
        let rank = engine::check::ranking_loss(rc, rr, &batch.margins).0 as f64;
        let bce: f64 = r
            .iter()
            .zip(&batch.safe)
            .filter(|(_, y)| !y.is_nan())
            .map(|(&x, &y)| {
                let s = 1.0 / (1.0 + (-(x as f64)).exp());
                -(y as f64 * s.ln() + (1.0 - y as f64) * (1.0 - s).ln())
            })
            .sum();
        rank + 0.7 * bce / batch.pairs as f64
    };
    model.zero_grads().unwrap();
    forward_backward(&mut model, &batch, 1.0).unwrap();
    let g = model.grads_to_host().unwrap();
    let p0 = model.params_to_host().unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let dir: Vec<f32> = (0..p0.len()).map(|_| rng.random_range(-1.0..1.0)).collect();
    let analytic: f64 = g.iter().zip(&dir).map(|(a, b)| (a * b) as f64).sum();
    let h = 1e-3f32;
    let at = |m: &mut Llama<Cpu>, s: f32| {
        let p: Vec<f32> = p0.iter().zip(&dir).map(|(a, d)| a + s * d).collect();
        m.set_params(&p).unwrap();
        total(m)
    };
    let numeric = (at(&mut model, h) - at(&mut model, -h)) / (2.0 * h as f64);
    assert!(
        (analytic - numeric).abs() <= 2e-2 * numeric.abs().max(1e-2),
        "directional derivative {analytic} vs finite difference {numeric}"
    );
    // And the term is really there: without it the gradient differs.
    batch.calibration = 0.0;
    model.set_params(&p0).unwrap();
    model.zero_grads().unwrap();
    forward_backward(&mut model, &batch, 1.0).unwrap();
    let g0 = model.grads_to_host().unwrap();
    let plain: f64 = g0.iter().zip(&dir).map(|(a, b)| (a * b) as f64).sum();
    assert!((plain - analytic).abs() > 1e-3, "{plain} vs {analytic}");
}

#[test]
fn other_category_pairs_are_mixed_in_by_ratio() {
    let pair = |i: usize| Pair {
        origin: format!("f:{i}"),
        ..Pair::new("q", "a", "b")
    };
    let others: Vec<Pair> = (0..100).map(pair).collect();
    let m = mix_in(others.clone(), 90, 1.0 / 9.0);
    assert_eq!(m.len(), 10);
    // Spread over the whole list, not its head.
    assert_eq!(m[0].origin, "f:0");
    assert_eq!(m[9].origin, "f:90");
    assert_eq!(mix_in(others.clone(), 500, 1.0).len(), 100);
    assert!(mix_in(others, 90, 0.0).is_empty());
}

#[test]
fn ratings_margins_and_kinds_parse() {
    use Rating::*;
    for (s, r) in [
        ("significantly better", Significantly),
        ("Significantly Better", Significantly),
        ("better", Better),
        ("slightly_better", Slightly),
        ("negligibly better/unsure", Negligibly),
        ("Negligibly Better / Unsure", Negligibly),
        ("negligibly better", Negligibly),
        ("unsure", Negligibly),
    ] {
        assert_eq!(s.parse::<Rating>().unwrap(), r, "{s}");
    }
    assert!("much better".parse::<Rating>().is_err());
    let m = |k: MarginKind| Rating::ALL.map(|r| k.margin(Some(r)));
    assert_eq!(m(MarginKind::Large), [3.0, 2.0, 1.0, 0.0]);
    assert_eq!(m(MarginKind::Small), [1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0]);
    assert_eq!(m(MarginKind::None), [0.0; 4]);
    assert_eq!(
        MarginKind::Large.margin(None),
        0.0,
        "unknown rating: margin 0"
    );
    assert_eq!("small".parse::<MarginKind>().unwrap(), MarginKind::Small);
    assert_eq!("safety".parse::<RmKind>().unwrap(), RmKind::Safety);
    // Ratings round-trip through JSON as the data's strings.
    let j = serde_json::to_string(&Negligibly).unwrap();
    assert_eq!(j, "\"negligibly better/unsure\"");
}

#[test]
fn pair_formats_parse_and_bad_lines_are_named() {
    let p = parse_pair(
        &serde_json::json!({"prompt": "q", "chosen": "a", "rejected": "b",
        "rating": "better", "chosen_safe": true, "rejected_safe": false, "category": "safety"}),
    )
    .unwrap();
    assert_eq!(p.prompt, vec![Message::new("user", "q")]);
    assert_eq!((p.chosen.as_str(), p.rejected.as_str()), ("a", "b"));
    assert_eq!(p.rating, Some(Rating::Better));
    assert_eq!((p.chosen_safe, p.rejected_safe), (Some(true), Some(false)));
    assert_eq!(p.category, Some(RmKind::Safety));
    let p = parse_pair(&serde_json::json!({"messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}],
        "chosen": "x", "rejected": "y", "rating": null}))
    .unwrap();
    assert_eq!((p.prompt.len(), p.rating), (4, None));
    let hh = |last: &str| {
        format!("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me\n\nAssistant: {last}")
    };
    let p = parse_pair(&serde_json::json!({"chosen": hh("sure"), "rejected": hh("no")})).unwrap();
    assert_eq!(p.prompt.len(), 3);
    assert_eq!(p.prompt[2], Message::new("user", "help me"));
    assert_eq!((p.chosen.as_str(), p.rejected.as_str()), ("sure", "no"));
    let bad = [
        (
            serde_json::json!({"chosen": hh("a"), "rejected": "\n\nHuman: other\n\nAssistant: b"}),
            "differ before",
        ),
        (
            serde_json::json!({"prompt": "q", "chosen": "a", "rejected": "b", "rating": "great"}),
            "unknown rating",
        ),
        (
            serde_json::json!({"prompt": "q", "chosen": "a", "rejected": "b", "category": "fun"}),
            "category",
        ),
        (
            serde_json::json!({"prompt": "q", "chosen": "a"}),
            "missing `rejected`",
        ),
        (
            serde_json::json!({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}], "chosen": "x", "rejected": "y"}),
            "end with a user turn",
        ),
    ];
    for (v, want) in bad {
        let e = format!("{:#}", parse_pair(&v).unwrap_err());
        assert!(e.contains(want), "{v}: {e}");
    }

    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.jsonl");
    std::fs::write(
        &f,
        "{\"prompt\": \"q\", \"chosen\": \"a\", \"rejected\": \"b\"}\n\n{\"prompt\": \"q\", \"chosen\": \"a\", \"rejected\": \"b\", \"rating\": \"meh\"}\n{oops\n",
    )
    .unwrap();
    let e = format!(
        "{:#}",
        read_pairs(std::slice::from_ref(&f), false).unwrap_err()
    );
    assert!(e.contains("bad.jsonl:3") && e.contains("meh"), "{e}");
    let (pairs, skipped) = read_pairs(&[f], true).unwrap();
    assert_eq!((pairs.len(), skipped), (1, 2));
    assert!(pairs[0].origin.ends_with("bad.jsonl:1"));
}

#[test]
fn safety_rule_and_categories_select_pairs() {
    let mk = |cat: Option<RmKind>, cs: Option<bool>, rs: Option<bool>| Pair {
        category: cat,
        chosen_safe: cs,
        rejected_safe: rs,
        ..Pair::new("q", "a", "b")
    };
    let pairs = vec![
        mk(None, None, None),
        mk(Some(RmKind::Helpfulness), None, None),
        mk(Some(RmKind::Safety), Some(true), Some(false)),
        mk(Some(RmKind::Safety), Some(false), Some(true)), // dropped for safety
        mk(Some(RmKind::Safety), Some(false), Some(false)),
        mk(None, Some(false), Some(true)), // dropped for safety
    ];
    let s = select_pairs(pairs.clone(), RmKind::Safety);
    assert_eq!(
        (s.pairs.len(), s.other_category, s.unsafe_chosen),
        (3, 1, 2)
    );
    let h = select_pairs(pairs, RmKind::Helpfulness);
    assert_eq!(
        (h.pairs.len(), h.other_category, h.unsafe_chosen),
        (3, 3, 0)
    );
}

#[test]
fn truncation_keeps_the_response_and_the_score_row_is_its_eos() {
    let Some(tok_path) = llama_tok_path() else {
        return;
    };
    let tok = Tokenizer::from_file(&tok_path).unwrap();
    let long = "word ".repeat(200);
    let prompt = vec![Message::new("user", &long)];
    let (full, cut) = encode_response(&tok, &prompt, "The answer.", 4096).unwrap();
    assert!(!cut);
    assert_eq!(*full.last().unwrap(), tok.eos);
    let (ids, cut) = encode_response(&tok, &prompt, "The answer.", 32).unwrap();
    assert!(cut);
    assert_eq!(ids.len(), 32);
    assert_eq!(ids[0], tok.bos);
    assert_eq!(ids[1..], full[full.len() - 31..], "the tail is kept");
    assert!(tok.decode(&ids).unwrap().contains("The answer."));
}

/// A random tiny causal LM saved as an HF checkpoint with `tokenizer`, as an SFT model would be.
fn tiny_lm(dir: &Path, tokenizer: &Path, vocab: usize, hidden: usize, seed: u64) -> PathBuf {
    let mut c = LlamaConfig::preset("tiny").unwrap();
    c.vocab_size = vocab;
    c.hidden_size = hidden;
    c.intermediate_size = 2 * hidden;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 4;
    c.num_key_value_heads = Some(2);
    c.max_position_embeddings = 128;
    let mut m = Llama::new(Cpu, c, Head::Lm).unwrap();
    m.init_random(seed).unwrap();
    let out = dir.join("lm");
    save_model(&m, &out, SaveOptions::default(), |tmp| {
        std::fs::copy(tokenizer, tmp.join("tokenizer.json")).unwrap();
        Ok(())
    })
    .unwrap();
    out
}

#[test]
fn export_import_in_the_hf_sequence_classification_layout() {
    let Some(tok_path) = llama_tok_path() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let lm = tiny_lm(dir.path(), &tok_path, 32000, 32, 3);
    let mut rm = init_rm(Cpu, &lm, 5).unwrap();
    assert_eq!(rm.head, Head::Score);
    // The trunk is the LM's; the new head is N(0, 1/(H+1)).
    let lm_files = TensorFiles::open(&lm).unwrap();
    let host = rm.params_to_host().unwrap();
    let emb = rm.table.get("model.embed_tokens.weight").unwrap();
    let (_, want) = lm_files.read_f32("model.embed_tokens.weight").unwrap();
    assert_eq!(&host[emb.span.off..emb.span.off + emb.span.len], &want[..]);
    let sw = rm.table.get("score.weight").unwrap().span;
    let w = &host[sw.off..sw.off + sw.len];
    let std = (w.iter().map(|x| x * x).sum::<f32>() / w.len() as f32).sqrt();
    let want = 1.0 / (33f32).sqrt();
    assert!((std - want).abs() < 0.5 * want, "score std {std} vs {want}");

    let out = dir.path().join("rm");
    save_rm(&rm, &out, &tok_path).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        cfg["architectures"],
        serde_json::json!(["LlamaForSequenceClassification"])
    );
    assert_eq!(cfg["num_labels"], 1);
    let files = TensorFiles::open(&out).unwrap();
    assert!(files.contains("score.weight") && !files.contains("lm_head.weight"));
    assert_eq!(files.read_f32("score.weight").unwrap().0, vec![1, 32]);
    assert!(out.join("tokenizer.json").is_file());

    let (mut back, tok) = load_rm(Cpu, &out).unwrap();
    let rows = vec![
        (
            vec![Message::new("user", "What is 2 + 2?")],
            "4".to_string(),
        ),
        (
            vec![Message::new("user", "Tell me a long story about a llama.")],
            "Once upon a time there was a llama who lived on a hill.".to_string(),
        ),
    ];
    let a = score(&mut rm, &tok, &rows, 64, 2).unwrap();
    let b = score(&mut back, &tok, &rows, 64, 2).unwrap();
    assert_eq!(a, b, "identical scores after save and load");
    // Batching and padding do not change a score.
    let alone = score(&mut rm, &tok, &rows[..1], 64, 1).unwrap();
    assert!((alone[0] - a[0]).abs() < 1e-5, "{} vs {}", alone[0], a[0]);
    // `score` input rows: prompt/response and messages ending with the response; bad lines named.
    let f = dir.path().join("rows.jsonl");
    std::fs::write(
        &f,
        "{\"prompt\": \"What is 2 + 2?\", \"response\": \"4\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"Tell me a long story about a llama.\"}, {\"role\": \"assistant\", \"content\": \"Once upon a time there was a llama who lived on a hill.\"}]}\n",
    )
    .unwrap();
    assert_eq!(read_score_rows(std::slice::from_ref(&f)).unwrap(), rows);
    std::fs::write(&f, "{\"prompt\": \"q\", \"response\": \"r\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"u\"}]}\n").unwrap();
    let e = format!("{:#}", read_score_rows(&[f]).unwrap_err());
    assert!(
        e.contains("rows.jsonl:2") && e.contains("assistant response"),
        "{e}"
    );
    // A reward model loads whole as an init (continued training keeps its head).
    let again = init_rm(Cpu, &out, 99).unwrap();
    assert_eq!(
        again.params_to_host().unwrap(),
        rm.params_to_host().unwrap()
    );
}

/// Synthetic preferences: "What is a + b?" answered with the right sum (chosen) or a wrong one
/// (rejected), rated by how far off the wrong one is.
fn arithmetic_pairs(n: usize, seed: u64) -> Vec<serde_json::Value> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let (a, b) = (rng.random_range(0..10i32), rng.random_range(0..10i32));
            let c = a + b;
            let (rating, d) = match rng.random_range(0..4) {
                0 => ("significantly better", rng.random_range(10..40)),
                1 => ("better", rng.random_range(5..10)),
                2 => ("slightly better", rng.random_range(2..5)),
                _ => ("negligibly better/unsure", 1),
            };
            let w = if c - d >= 0 && rng.random_bool(0.5) {
                c - d
            } else {
                c + d
            };
            serde_json::json!({
                "prompt": format!("What is {a} + {b}?"),
                "chosen": format!("{a} + {b} = {c}"),
                "rejected": format!("{a} + {b} = {w}"),
                "rating": rating,
                "category": "helpfulness",
            })
        })
        .collect()
}

fn write_jsonl(path: &Path, rows: &[serde_json::Value]) {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
}

#[test]
fn a_tiny_reward_model_learns_synthetic_preferences() {
    let Some(tok_path) = llama_tok_path() else {
        return;
    };
    let t0 = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pairs.jsonl");
    write_jsonl(&data, &arithmetic_pairs(4000, 11));
    let lm = tiny_lm(dir.path(), &tok_path, 32000, 64, 1);
    let mut cfg = RmConfig::new(lm, vec![data], dir.path().join("rm"), RmKind::Helpfulness);
    cfg.lr = Some(2e-3);
    cfg.batch_size = 16;
    cfg.micro_batch = 16;
    cfg.epochs = 3;
    cfg.seq_len = Some(64);
    cfg.val_fraction = 0.2;
    cfg.margin = MarginKind::Small;
    cfg.progress = false;
    let rep = trainer::rm::run(Cpu, &cfg).unwrap();
    let e = rep.eval.as_ref().unwrap();
    println!("{}", e.to_markdown());
    println!("{:.1} s, {} steps", t0.elapsed().as_secs_f64(), rep.steps);
    let acc = |r| e.level(Some(r)).accuracy.unwrap();
    assert!(e.accuracy > 0.65, "held-out accuracy {}", e.accuracy);
    assert!(
        acc(Rating::Significantly) > acc(Rating::Negligibly) + 0.1,
        "significantly {} vs negligibly {}",
        acc(Rating::Significantly),
        acc(Rating::Negligibly)
    );
    for f in [
        "metrics.jsonl",
        "eval.json",
        "eval.md",
        "scores.svg",
        "loss.svg",
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
    ] {
        assert!(cfg.out.join(f).is_file(), "{f} written");
    }
    // eval-rm on the written model reproduces the held-out numbers.
    let (mut model, tok) = load_rm(Cpu, &rep.model_dir).unwrap();
    let (pairs, _) = read_pairs(&cfg.data, false).unwrap();
    let (_, val) = split_pairs(pairs, cfg.val_fraction);
    let again = evaluate(&mut model, &tok, &val, 64, 8).unwrap();
    assert_eq!(again.pairs, e.pairs);
    assert!((again.accuracy - e.accuracy).abs() < 1e-9);
}

#[test]
fn hh_harmless_pairs_load_and_train() {
    let (Some(hh), Some(tok_path)) = (or_skip("data/hh-harmless-pairs.jsonl"), llama_tok_path())
    else {
        return;
    };
    let (pairs, skipped) = read_pairs(std::slice::from_ref(&hh), false).unwrap();
    assert_eq!((pairs.len(), skipped), (1800, 0));
    assert!(pairs
        .iter()
        .all(|p| p.prompt.last().unwrap().role == "user" && p.rating.is_none()));
    let dir = tempfile::tempdir().unwrap();
    let lm = tiny_lm(dir.path(), &tok_path, 32000, 32, 2);
    let mut cfg = RmConfig::new(lm, vec![hh], dir.path().join("rm"), RmKind::Safety);
    cfg.batch_size = 8;
    cfg.micro_batch = 4;
    cfg.seq_len = Some(96);
    cfg.max_steps = Some(6);
    cfg.val_fraction = 0.02;
    cfg.progress = false;
    let rep = trainer::rm::run(Cpu, &cfg).unwrap();
    assert_eq!(rep.steps, 6);
    assert_eq!(rep.train_pairs + rep.val_pairs, 1800);
    assert!(rep.truncated > 0, "long transcripts are cut to seq_len");
    assert!(rep.final_loss.is_finite());
    let e = rep.eval.unwrap();
    assert_eq!(e.pairs, rep.val_pairs);
    assert_eq!(e.level(None).pairs, e.pairs, "HH pairs are unrated");
    let md = std::fs::read_to_string(cfg.out.join("eval.md")).unwrap();
    assert!(
        md.contains("Significantly Better") && md.contains("Unrated"),
        "{md}"
    );
}
