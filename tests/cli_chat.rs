//! `llama2 generate` and `llama2 chat` on a small random checkpoint with the Llama 2 tokenizer:
//! they stream, keep a multi-turn conversation, and end cleanly.

use engine::Head;

mod common;
use common::{checkpoint, llama2, ok, run};

#[test]
fn generate_and_chat_run_on_a_checkpoint() {
    let Some(tok) = engine::shared_data::or_skip("tokenizer/llama2/tokenizer.json") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("model");
    checkpoint(&ck, Head::Lm, 1, &tok);
    let so = ok(llama2()
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
        .arg(&ck));
    assert!(
        so.starts_with("Once upon a time") && so.len() > "Once upon a time".len(),
        "{so}"
    );

    let out = run(
        llama2()
            .args([
                "chat",
                "--max-new-tokens",
                "8",
                "--system",
                "Be brief.",
                "--model",
            ])
            .arg(&ck),
        "Hello there\nAnd again?\n/reset\nThird\n/exit\n",
    );
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
    let out = run(
        llama2()
            .args(["generate", "--prompt", "x", "--model"])
            .arg(&ck),
        "",
    );
    let se = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && se.contains("tokenizer") && !se.contains("panicked"),
        "{se}"
    );
}
