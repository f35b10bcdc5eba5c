//! `llama2 generate` and `llama2 chat` on a small random checkpoint with the Llama 2 tokenizer:
//! they stream, keep a multi-turn conversation, and end cleanly.

use engine::checkpoint::{save_model, SaveOptions};
use engine::{Cpu, Head, Llama, LlamaConfig};
use std::io::Write;
use std::process::{Command, Stdio};

fn checkpoint(dir: &std::path::Path, tok: &std::path::Path) {
    let mut c = LlamaConfig::preset("tiny").unwrap();
    c.vocab_size = 32000;
    c.hidden_size = 32;
    c.intermediate_size = 48;
    c.num_hidden_layers = 1;
    c.num_attention_heads = 4;
    c.num_key_value_heads = Some(2);
    let mut m = Llama::new(Cpu, c, Head::Lm).unwrap();
    m.init_random(1).unwrap();
    save_model(&m, dir, SaveOptions::default(), |tmp| {
        std::fs::copy(tok, tmp.join("tokenizer.json"))
            .map(|_| ())
            .map_err(|e| engine::Error::io(tok, e))
    })
    .unwrap();
}

#[test]
fn generate_and_chat_run_on_a_checkpoint() {
    let Some(tok) = engine::shared_data::or_skip("tokenizer/llama2/tokenizer.json") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("model");
    checkpoint(&ck, &tok);
    let bin = env!("CARGO_BIN_EXE_llama2");
    let out = Command::new(bin)
        .args([
            "generate",
            "--prompt",
            "Once upon a time",
            "--max-new-tokens",
            "12",
            "--seed",
            "1",
            "--model",
        ])
        .arg(&ck)
        .output()
        .unwrap();
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{so}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        so.starts_with("Once upon a time") && so.len() > "Once upon a time".len(),
        "{so}"
    );

    let mut child = Command::new(bin)
        .args([
            "chat",
            "--max-new-tokens",
            "8",
            "--system",
            "Be brief.",
            "--model",
        ])
        .arg(&ck)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hello there\nAnd again?\n/reset\nThird\n/exit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{so}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(so.matches("assistant> ").count(), 3, "{so}");
    assert!(so.contains("(conversation reset)"), "{so}");

    // A checkpoint without a tokenizer is a clear error.
    std::fs::remove_file(ck.join("tokenizer.json")).unwrap();
    let out = Command::new(bin)
        .args(["generate", "--prompt", "x", "--model"])
        .arg(&ck)
        .output()
        .unwrap();
    let se = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && se.contains("tokenizer") && !se.contains("panicked"),
        "{se}"
    );
}
