//! `llama2 rejection-sample` run twice, the second starting from the first's pool (`--pool`)
//! with a per-round temperature sweep (`--temperatures`): the pool carries on across runs with
//! every answer's round and model, old answers are re-scored and counted when displaced, and
//! Figures 7 and 8 are written as data and plots. Tiny random models over a word tokenizer.

mod common;
use common::*;
use engine::checkpoint::{save_model, SaveOptions};
use engine::tokenizer::Tokenizer;
use engine::{Cpu, Head, Llama, LlamaConfig};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

/// Under `d`: a word tokenizer, a random tiny LM (`lm/`), a reward model from it (`rm/`) and 24
/// prompts, every 4th tagged safety.
fn setup(d: &Path) {
    let words = ["red", "fox", "sun", "moon", "tree", "bird", "sings", "runs"];
    let text: String = (0..400)
        .map(|i| {
            format!(
                "the {} {} {}.\n",
                words[i % 8],
                words[(i * 3) % 8],
                words[(i * 5) % 8]
            )
        })
        .collect();
    std::fs::write(d.join("corpus.txt"), text).unwrap();
    let tok = d.join("tok.json");
    trainer::tokenizer_train::train_on(&d.join("corpus.txt"), 300, &tok).unwrap();
    let mut c = LlamaConfig::preset("tiny").unwrap();
    c.vocab_size = Tokenizer::from_file(&tok).unwrap().vocab_size();
    c.hidden_size = 32;
    c.intermediate_size = 64;
    c.num_hidden_layers = 1;
    c.max_position_embeddings = 64;
    let mut m = Llama::new(Cpu, c, Head::Lm).unwrap();
    m.init_random(5).unwrap();
    save_model(&m, &d.join("lm"), SaveOptions::default(), |tmp| {
        std::fs::copy(&tok, tmp.join("tokenizer.json")).unwrap();
        Ok(())
    })
    .unwrap();
    let rm = trainer::rm::init_rm(Cpu, &d.join("lm"), 6).unwrap();
    trainer::rm::save_rm(&rm, &d.join("rm"), &tok).unwrap();
    let rows: String = (0..24)
        .map(|i| {
            let cat = if i % 4 == 0 { "safety" } else { "helpfulness" };
            json!({"prompt": format!("the {} {} {i}", words[i % 8], words[(i * 3) % 8]), "category": cat})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(d.join("prompts.jsonl"), rows).unwrap();
}

fn rs(d: &Path, model: &Path, out: &str) -> Command {
    let mut c = llama2();
    c.args([
        "rejection-sample",
        "--k",
        "3",
        "--epochs",
        "1",
        "--seq-len",
        "64",
    ])
    .args(["--max-new-tokens", "6", "--temperature", "1.0", "--model"])
    .arg(model)
    .arg("--rm-helpfulness")
    .arg(d.join("rm"))
    .arg("--rm-safety")
    .arg(d.join("rm"))
    .arg("--prompts")
    .arg(d.join("prompts.jsonl"))
    .arg("--out")
    .arg(d.join(out));
    c
}

fn pool_rows(p: &Path) -> Vec<Value> {
    trainer::run_dir::read_jsonl_values(p).unwrap()
}

/// The number after `word` in `line` (`... 16 pooled answers re-scored, 3 displaced)`).
fn number_before(line: &str, word: &str) -> usize {
    let head = &line[..line
        .find(word)
        .unwrap_or_else(|| panic!("no {word:?} in {line}"))];
    head.split_whitespace()
        .last()
        .unwrap()
        .trim_start_matches('(')
        .parse()
        .unwrap()
}

#[test]
fn a_second_run_carries_the_pool_on_re_scores_it_and_sweeps_the_temperature() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    // Run 1: the first 16 prompts, no pool.
    let so = ok(rs(d, &d.join("lm"), "one").args(["--max-prompts", "16"]));
    assert!(
        so.contains("round 1: 16 prompts x 3 at temperature 1"),
        "{so}"
    );
    assert!(
        so.contains("(0 pooled answers re-scored, 0 displaced)"),
        "{so}"
    );
    let pool1 = d.join("one/round-1/pool.jsonl");
    let rows1 = pool_rows(&pool1);
    assert!(!rows1.is_empty() && rows1.len() <= 16);
    let lm = d.join("lm").display().to_string();
    for r in &rows1 {
        assert_eq!(
            (r["round"].as_u64(), r["model"].as_str()),
            (Some(1), Some(lm.as_str())),
            "{r}"
        );
        let m = r["messages"].as_array().unwrap();
        assert_eq!(m.last().unwrap()["role"], "assistant");
        assert!(r["reward"].as_f64().is_some() && r["is_safety"].is_boolean());
    }
    // Run 2: from run 1's pool and model, sweeping two temperatures on the last 4 prompts; its
    // round is numbered on from the pool's.
    let model1 = d.join("one/round-1/sft");
    let so = ok(rs(d, &model1, "two").arg("--pool").arg(&pool1).args([
        "--temperatures",
        "0.7,1.4",
        "--sweep-prompts",
        "4",
    ]));
    println!("{so}");
    let line = so
        .lines()
        .find(|l| l.starts_with("round 2: 20 prompts x 3 at temperature"))
        .unwrap_or_else(|| panic!("{so}"));
    assert!(
        so.contains("round 2: temperature sweep on 4 held-out prompts: 0.7: max"),
        "{so}"
    );
    let rescored = number_before(line, "pooled answers re-scored");
    let displaced = number_before(line, "displaced");
    assert_eq!(rescored, rows1.len(), "{line}");
    let rows2 = pool_rows(&d.join("two/round-2/pool.jsonl"));
    // Every pooled prompt of run 1 is still in the pool; prompts 16..20 joined it.
    let key = |r: &Value| {
        let mut m = r["messages"].as_array().unwrap().clone();
        m.pop();
        Value::Array(m).to_string()
    };
    for r in &rows1 {
        assert!(rows2.iter().any(|x| key(x) == key(r)), "{r}");
    }
    let new2 = rows2.iter().filter(|r| r["round"] == 2).count();
    let joined = rows2.len() - rows1.len();
    assert!(joined <= 4 && rows2.len() <= 20, "{}", rows2.len());
    // The round-2 answers are the new prompts plus the pooled ones a new sample displaced.
    assert_eq!(new2, joined + displaced, "{line}");
    let model1 = std::fs::canonicalize(trainer::run_dir::model_dir(&model1).unwrap()).unwrap();
    for r in rows2.iter().filter(|r| r["round"] == 2) {
        let m = std::fs::canonicalize(r["model"].as_str().unwrap()).unwrap();
        assert_eq!(m, model1, "{r}");
    }
    // The report: the swept temperatures, the chosen one, and Figures 7 and 8 as data and plots.
    let rep: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("two/rs_report.json")).unwrap())
            .unwrap();
    let r = &rep[0];
    assert_eq!(r["round"], 2);
    let temps: Vec<f64> = r["sweep"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["temperature"].as_f64().unwrap())
        .collect();
    assert_eq!(temps.len(), 2);
    assert!((temps[0] - 0.7).abs() < 1e-6 && (temps[1] - 1.4).abs() < 1e-6);
    assert!(temps
        .iter()
        .any(|&t| (t - r["temperature"].as_f64().unwrap()).abs() < 1e-6));
    assert_eq!(r["curve"].as_array().unwrap().len(), 3);
    for out in ["two", "two/round-2"] {
        for f in ["fig7.jsonl", "fig7.svg", "fig8.jsonl", "fig8-round-2.svg"] {
            assert!(d.join(out).join(f).is_file(), "{out}/{f}");
        }
    }
    let fig7 = pool_rows(&d.join("two/fig7.jsonl"));
    assert_eq!(
        fig7.iter()
            .map(|v| v["n"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2, 3]
    );
    // A bad pool line is named file:line.
    std::fs::write(
        d.join("bad.jsonl"),
        std::fs::read_to_string(&pool1).unwrap() + "{\"reward\": 1}\n",
    )
    .unwrap();
    let out = rs(d, &d.join("lm"), "three")
        .arg("--pool")
        .arg(d.join("bad.jsonl"))
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains(&format!("bad.jsonl:{}", rows1.len() + 1)),
        "{e}"
    );
}
