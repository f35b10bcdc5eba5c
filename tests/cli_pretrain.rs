//! The pretraining CLI end to end: tokenizer, shards, a run stopped by Ctrl-C that saves a
//! checkpoint, and its resumption.

use std::process::Stdio;
use std::time::{Duration, Instant};

mod common;
use common::{llama2, ok};

#[cfg(unix)]
#[test]
fn ctrl_c_saves_a_checkpoint_and_resume_finishes_the_run() {
    let Some(corpus) = engine::shared_data::or_skip("data/tinyshakespeare.txt") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let text: String = std::fs::read_to_string(corpus)
        .unwrap()
        .chars()
        .take(200_000)
        .collect();
    std::fs::write(d.join("c.txt"), text).unwrap();
    ok(llama2()
        .args(["train-tokenizer", "--vocab-size", "512", "--out"])
        .arg(d.join("tok.json"))
        .arg(d.join("c.txt")));
    ok(llama2()
        .args(["prepare-data", "--tokenizer"])
        .arg(d.join("tok.json"))
        .arg("--out")
        .arg(d.join("data"))
        .arg(d.join("c.txt")));
    let run = d.join("run");
    let child = llama2()
        .args([
            "pretrain",
            "--no-progress",
            "--seq-len",
            "32",
            "--batch-size",
            "4",
            "--steps",
            "100000",
        ])
        .args(["--eval-every", "1000", "--ckpt-every", "1000", "--data"])
        .arg(d.join("data"))
        .arg("--out")
        .arg(&run)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until a few steps are logged, then interrupt as a user would.
    let metrics = run.join("metrics.jsonl");
    let t0 = Instant::now();
    while std::fs::read_to_string(&metrics)
        .map(|s| s.lines().count())
        .unwrap_or(0)
        < 3
    {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no progress from the training process"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "interrupted run must exit cleanly: {so}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        so.contains("stopped early") && so.contains("--resume"),
        "{so}"
    );
    let latest = std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();
    let ckpt = run.join("checkpoints").join(latest.trim());
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("trainer_state.json")).unwrap())
            .unwrap();
    let step = state["step"].as_u64().unwrap();
    assert!(step >= 3, "checkpoint at step {step}");
    for f in [
        "config.json",
        "model.safetensors",
        "optimizer.safetensors",
        "tokenizer.json",
    ] {
        assert!(ckpt.join(f).is_file(), "{f} missing from the checkpoint");
    }
    // Resume with a shorter total: it continues from the checkpoint to the new end.
    let end = (step + 2).to_string();
    let so = ok(llama2()
        .args(["pretrain", "--no-progress", "--resume"])
        .arg(&run)
        .args(["--steps", &end]));
    assert!(so.contains(&format!("step {end}:")), "{so}");
    // A missing resume path is a clear error.
    let out = llama2()
        .args(["pretrain", "--resume"])
        .arg(d.join("nowhere"))
        .output()
        .unwrap();
    let se = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && se.contains("nowhere") && !se.contains("panicked"),
        "{se}"
    );
}
