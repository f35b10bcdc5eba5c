//! The ecosystem's formats from the command line: `tokenize --chat` prints the ids the engine
//! trains on, checkpoints carry what transformers reads, `convert` writes TRL's conversational
//! form, `rejection-sample` takes `--device`, `--max-new-tokens` and prompts in any shape, and
//! `sft --batch-tokens` accumulates to the gradient of one big batch.

use engine::checkpoint::{save_model, SaveOptions};
use engine::tokenizer::{chat_template, Message, Tokenizer};
use engine::{Cpu, Head, Llama, LlamaConfig};
use serde_json::{json, Value};
use std::path::Path;

mod common;
use common::{checkpoint, llama2, ok, run};

/// Llama 2's tokenizer, or `None` (the test skips, naming it and how to get it).
fn llama2_tokenizer() -> Option<std::path::PathBuf> {
    engine::shared_data::or_skip("tokenizer/llama2/tokenizer.json")
}

fn json_file(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn tokenize_chat_prints_the_ids_the_engine_trains_on() {
    let Some(tok_path) = llama2_tokenizer() else {
        return;
    };
    let tok = Tokenizer::from_file(&tok_path).unwrap();
    let msgs = vec![
        Message::new("system", "Be brief."),
        Message::new("user", "Name a colour."),
        Message::new("assistant", "Blue."),
        Message::new("user", "Another?"),
    ];
    let stdin = serde_json::to_string(&msgs).unwrap();
    let (ids, mask) = tok.chat(&msgs).unwrap();
    let tokenize = |extra: &[&str], stdin: &str| {
        run(
            llama2()
                .args(["tokenize", "--chat", "--tokenizer"])
                .arg(&tok_path)
                .args(extra),
            stdin,
        )
    };
    let out = tokenize(&[], &stdin);
    assert!(out.status.success(), "{out:?}");
    let got: Vec<u32> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got, ids);
    assert_eq!(got[0], tok.bos, "BOS leads");
    let out = tokenize(&["--mask"], &stdin);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v, json!({"ids": ids, "mask": mask}));
    for (input, want) in [
        (
            r#"[{"role": "assistant", "content": "hi"}]"#,
            "message 0: expected role `user`",
        ),
        (r#"{"role": "user", "content": "hi"}"#, "JSON list"),
        (
            r#"[{"role": "robot", "content": "hi"}]"#,
            "unknown role `robot`",
        ),
        (r#"[{"role": "user"}]"#, "no text `content`"),
    ] {
        let out = tokenize(&[], input);
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && e.contains(want), "{input}: {e}");
    }
}

#[test]
fn checkpoints_carry_what_transformers_reads() {
    let Some(tok) = llama2_tokenizer() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (lm, rm) = (dir.path().join("lm"), dir.path().join("rm"));
    checkpoint(&lm, Head::Lm, 1, &tok);
    checkpoint(&rm, Head::Score, 2, &tok);
    let gen = json_file(&lm.join("generation_config.json"));
    assert_eq!(
        gen,
        json!({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    );
    assert!(
        !rm.join("generation_config.json").exists(),
        "a reward model does not generate"
    );
    assert_eq!(json_file(&rm.join("config.json"))["pad_token_id"], 0);
    for d in [&lm, &rm] {
        let map = json_file(&d.join("special_tokens_map.json"));
        assert_eq!(
            map,
            json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"})
        );
        let tc = json_file(&d.join("tokenizer_config.json"));
        for (k, v) in map.as_object().unwrap() {
            assert_eq!(&tc[k], v, "{k}");
        }
        assert_eq!(tc["chat_template"], chat_template());
        assert_eq!(tc["added_tokens_decoder"]["1"]["content"], "<s>");
        assert_eq!(tc["added_tokens_decoder"]["2"]["special"], true);
        assert_eq!(tc["model_max_length"], 256);
    }
    // No tokenizer, no tokenizer files.
    let bare = dir.path().join("bare");
    let m = Llama::new(Cpu, LlamaConfig::preset("tiny").unwrap(), Head::Lm).unwrap();
    save_model(&m, &bare, SaveOptions::default(), |_| Ok(())).unwrap();
    assert!(bare.join("generation_config.json").is_file());
    assert!(!bare.join("tokenizer_config.json").exists());
}

#[test]
fn convert_writes_hh_pairs_in_trls_conversational_form() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hh-trl.jsonl");
    let Some(hh) = engine::shared_data::or_skip("data/hh-harmless-pairs.jsonl") else {
        return;
    };
    let so = ok(llama2()
        .args(["convert", "--kind", "pairs", "--out"])
        .arg(&out)
        .arg(&hh));
    assert!(so.contains("1800 records"), "{so}");
    let first: Value = serde_json::from_str(
        std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(first["prompt"][0]["role"], "user");
    assert_eq!(first["chosen"][0]["role"], "assistant");
    assert_eq!(first["rejected"].as_array().unwrap().len(), 1);
    // What it wrote reads back as the same pairs.
    let strip = |p: Vec<trainer::rm::Pair>| -> Vec<(Vec<Message>, String, String)> {
        p.into_iter()
            .map(|p| (p.prompt, p.chosen, p.rejected))
            .collect()
    };
    let a = trainer::formats::read_pairs(&[hh], false).unwrap().0;
    let b = trainer::formats::read_pairs(&[out], false).unwrap().0;
    assert_eq!(strip(a), strip(b));
}

#[test]
fn rejection_sample_takes_device_max_new_tokens_and_trl_prompts() {
    let Some(tok) = llama2_tokenizer() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    checkpoint(&d.join("policy"), Head::Lm, 3, &tok);
    checkpoint(&d.join("rm"), Head::Score, 4, &tok);
    let prompts = d.join("prompts.jsonl");
    std::fs::write(
        &prompts,
        [
            json!({"prompt": [{"role": "user", "content": "Tell me a story."}]}),
            json!({"prompt": "Describe a llama.", "completion": "It is woolly."}),
            json!({"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
                   "chosen": [{"role": "assistant", "content": "Hello"}],
                   "rejected": [{"role": "assistant", "content": "Go away"}], "is_safety": true}),
        ]
        .map(|v| v.to_string() + "\n")
        .concat(),
    )
    .unwrap();
    let rs = |max_new: &str, device: &str, out: &str| {
        let mut c = llama2();
        c.args([
            "rejection-sample",
            "--k",
            "2",
            "--epochs",
            "1",
            "--seq-len",
            "64",
        ])
        .args([
            "--max-new-tokens",
            max_new,
            "--device",
            device,
            "--temperature",
            "1.5",
        ])
        .arg("--model")
        .arg(d.join("policy"))
        .arg("--rm-helpfulness")
        .arg(d.join("rm"))
        .arg("--rm-safety")
        .arg(d.join("rm"))
        .arg("--prompts")
        .arg(&prompts)
        .arg("--out")
        .arg(d.join(out));
        c
    };
    let answers = |out: &str| -> Vec<String> {
        std::fs::read_to_string(d.join(out).join("round-1/pool.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                let m = v["messages"].as_array().unwrap();
                assert_eq!(m[m.len() - 1]["role"], "assistant");
                m[m.len() - 1]["content"].as_str().unwrap().to_string()
            })
            .collect()
    };
    let so = ok(&mut rs("1", "cpu", "one"));
    assert!(so.contains("round 1: 3 prompts x 2"), "{so}");
    // One token is at most one vocabulary piece (Llama 2's longest is 16 bytes); twelve from a
    // random model are more.
    let one = answers("one");
    assert!(
        !one.is_empty() && one.iter().all(|a| a.len() <= 16),
        "{one:?}"
    );
    ok(&mut rs("12", "cpu", "twelve"));
    let twelve = answers("twelve");
    assert!(twelve.iter().any(|a| a.len() > 16), "{twelve:?}");
    // --device is parsed and dispatched: a bad one is refused by name; CUDA runs where there is
    // a GPU, and elsewhere says why not instead of running on the CPU.
    let out = run(&mut rs("1", "tpu", "x"), "");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tpu"),
        "{out:?}"
    );
    let out = run(&mut rs("1", "cuda", "x"), "");
    let e = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(out.status.success() || e.contains("cuda"), "{e}");
    // A bad prompt line is named, and --skip-bad skips it.
    std::fs::write(&prompts, "{\"prompt\": \"Hi\"}\n{\"completion\": \"x\"}\n").unwrap();
    let out = run(&mut rs("1", "cpu", "bad"), "");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("prompts.jsonl:2") && e.contains("--skip-bad"),
        "{e}"
    );
    let so = ok(rs("1", "cpu", "skip").arg("--skip-bad"));
    assert!(so.contains("1 bad prompt line(s) skipped"), "{so}");
}

/// Dialogues whose answers differ in length, so packed rows carry different numbers of learned
/// tokens: a mean of micro-batch means would differ from the mean over the whole batch.
fn sft_data(path: &Path) {
    let mut text = String::new();
    for i in 0..24 {
        let answer = "The answer is yes. ".repeat(1 + i % 5);
        let q = format!("Question number {i}?");
        text += &json!({"prompt": q, "completion": answer.trim()}).to_string();
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

fn first_step(run_dir: &Path) -> (f64, f64) {
    let m = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let v: Value = serde_json::from_str(m.lines().next().unwrap()).unwrap();
    assert_eq!(v["step"], 1);
    (
        v["loss"].as_f64().unwrap(),
        v["grad_norm"].as_f64().unwrap(),
    )
}

#[test]
fn sft_batch_tokens_accumulates_to_the_gradient_of_one_batch() {
    let Some(tok) = llama2_tokenizer() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    checkpoint(&d.join("init"), Head::Lm, 5, &tok);
    sft_data(&d.join("sft.jsonl"));
    let sft = |out: &str, extra: &[&str]| {
        let so = ok(llama2()
            .args([
                "sft",
                "--seq-len",
                "64",
                "--steps",
                "1",
                "--eval-every",
                "0",
            ])
            .args(["--no-progress", "--init"])
            .arg(d.join("init"))
            .arg("--data")
            .arg(d.join("sft.jsonl"))
            .arg("--out")
            .arg(d.join(out))
            .args(extra));
        (so, first_step(&d.join(out)))
    };
    let (_, big) = sft("big", &["--batch-size", "4"]);
    let (so, acc) = sft("acc", &["--batch-size", "2", "--batch-tokens", "256"]);
    assert!(so.contains("x accum 2"), "{so}");
    let (_, acc4) = sft("acc4", &["--batch-size", "1", "--batch-tokens", "256"]);
    for (name, (loss, norm)) in [("2 x 2", acc), ("4 x 1", acc4)] {
        assert!(
            (loss - big.0).abs() <= 1e-5 * big.0 && (norm - big.1).abs() <= 1e-4 * big.1,
            "{name}: loss {loss} grad norm {norm}, one batch of 4: loss {} grad norm {}",
            big.0,
            big.1
        );
    }
    let out = run(
        llama2()
            .args([
                "sft",
                "--seq-len",
                "64",
                "--batch-size",
                "2",
                "--batch-tokens",
                "100",
                "--init",
            ])
            .arg(d.join("init"))
            .arg("--data")
            .arg(d.join("sft.jsonl")),
        "",
    );
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("--batch-tokens 100 is not a multiple"), "{e}");
}
