//! What the CLI tests share: running the `llama2` binary and a small random checkpoint. Each
//! file under tests/ is a crate of its own that includes this with `mod common;` and uses a part.
#![allow(dead_code)]

use engine::checkpoint::{save_model, SaveOptions};
use engine::{Cpu, Head, Llama, LlamaConfig};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The binary under test.
pub fn llama2() -> Command {
    Command::new(env!("CARGO_BIN_EXE_llama2"))
}

/// Runs `cmd` with `stdin` as its input, capturing its output.
pub fn run(cmd: &mut Command, stdin: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Runs `cmd` (no input) and returns its stdout; a failure shows the command and both outputs.
pub fn ok(cmd: &mut Command) -> String {
    let out = run(cmd, "");
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "{cmd:?} failed\nstdout:\n{so}\nstderr:\n{se}"
    );
    so.to_string()
}

/// A small random checkpoint over the Llama 2 tokenizer `tok`: a causal LM or a reward model.
pub fn checkpoint(dir: &Path, head: Head, seed: u64, tok: &Path) -> PathBuf {
    let mut c = LlamaConfig::preset("tiny").unwrap();
    c.vocab_size = 32000;
    c.hidden_size = 32;
    c.intermediate_size = 48;
    c.num_hidden_layers = 1;
    c.num_attention_heads = 4;
    c.num_key_value_heads = Some(2);
    let mut m = Llama::new(Cpu, c, head).unwrap();
    m.init_random(seed).unwrap();
    save_model(&m, dir, SaveOptions::default(), |tmp| {
        std::fs::copy(tok, tmp.join("tokenizer.json"))
            .map(|_| ())
            .map_err(|e| engine::Error::io(tok, e))
    })
    .unwrap();
    dir.to_path_buf()
}
