//! Data parallelism on simulated GPUs: `llama2 pretrain --dist` as 2 and 3 processes, NCCL
//! and CUDA through gpu-sim, trains like one process with the global batch.
//!
//! Runs only under the simulator with at least 3 GPUs (`gpu-sim run --gpus 3 -- cargo test
//! --release --test sim_dist`); elsewhere it prints why it skipped. The ranks are started the
//! way torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

use std::path::Path;
use std::process::{Child, Command};

mod common;
use common::{llama2, ok};

const GLOBAL_BATCH: usize = 6;
const STEPS: usize = 6;

/// GPUs the simulator models in this process's environment, or None (with the reason printed)
/// when this is not the simulator.
fn simulated_gpus() -> Option<usize> {
    if std::env::var_os("GPU_SIM").is_none_or(|v| v != "1") {
        println!("skipped: not running under gpu-sim (gpu-sim run --gpus 3 -- cargo test ...)");
        return None;
    }
    let n = std::env::var("GPU_SIM_GPUS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    Some(n)
}

/// A deterministic made-up corpus (no shared data needed): sentences over a small vocabulary.
fn corpus() -> String {
    const WORDS: [&str; 24] = [
        "the", "king", "speaks", "to", "a", "river", "and", "night", "falls", "on", "old", "stone",
        "while", "birds", "sing", "of", "gold", "in", "green", "fields", "where", "children",
        "play", "quietly",
    ];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut s = String::new();
    for i in 0..12_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(WORDS[(x % WORDS.len() as u64) as usize]);
        s.push(if i % 11 == 10 { '\n' } else { ' ' });
    }
    s
}

/// A pretraining run on CUDA: `--device cuda` in one process, or `--dist` (each rank drives
/// cuda:LOCAL_RANK).
fn pretrain(data: &Path, out: &Path, batch: usize, dist: bool) -> Command {
    let mut c = llama2();
    c.arg("pretrain")
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .arg("--config")
        .arg(out.parent().unwrap().join("config.json"))
        .args(["--seq-len", "32", "--batch-size"])
        .arg(batch.to_string())
        .args([
            "--steps",
            &STEPS.to_string(),
            "--lr",
            "3e-3",
            "--warmup",
            "1",
        ])
        .args([
            "--eval-every",
            "1000",
            "--eval-windows",
            "2",
            "--ckpt-every",
            "0",
        ])
        .arg("--no-progress");
    if dist {
        c.arg("--dist");
    } else {
        c.args(["--device", "cuda"]);
    }
    c
}

/// (loss, grad_norm) per step from a run's metrics.
fn trace(run: &Path) -> Vec<(f64, f64)> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("loss").is_some())
        .map(|v| {
            (
                v["loss"].as_f64().unwrap(),
                v["grad_norm"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn pretrain_dist_on_two_and_three_simulated_gpus_matches_one_process() {
    let Some(gpus) = simulated_gpus() else { return };
    assert!(
        gpus >= 3,
        "run with gpu-sim run --gpus 3 (GPU_SIM_GPUS={gpus})"
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("c.txt"), corpus()).unwrap();
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

    // head_dim 64: the attention's mma path (the naive fallback is slow to simulate).
    let config = serde_json::json!({
        "model_type": "llama", "vocab_size": 512, "hidden_size": 128,
        "intermediate_size": 344, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
    });
    std::fs::write(d.join("config.json"), config.to_string()).unwrap();
    let one = d.join("one");
    ok(&mut pretrain(&d.join("data"), &one, GLOBAL_BATCH, false));
    let want = trace(&one);
    assert_eq!(want.len(), STEPS);

    for world in [2usize, 3] {
        let run = d.join(format!("dp{world}"));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let ranks: Vec<Child> = (0..world)
            .map(|r| {
                let mut c = pretrain(&d.join("data"), &run, GLOBAL_BATCH / world, true);
                c.env("RANK", r.to_string())
                    .env("LOCAL_RANK", r.to_string())
                    .env("WORLD_SIZE", world.to_string())
                    .env("MASTER_ADDR", "127.0.0.1")
                    .env("MASTER_PORT", port.to_string());
                c.spawn().unwrap()
            })
            .collect();
        for (r, mut ch) in ranks.into_iter().enumerate() {
            assert!(
                ch.wait().unwrap().success(),
                "{world} ranks: rank {r} failed"
            );
        }
        let got = trace(&run);
        assert_eq!(got.len(), STEPS, "{world} ranks: steps logged");
        let mut worst = (0f64, 0f64);
        for (s, ((l, g), (wl, wg))) in got.iter().zip(&want).enumerate() {
            let (el, eg) = ((l - wl).abs() / wl.abs(), (g - wg).abs() / wg.abs());
            worst = (worst.0.max(el), worst.1.max(eg));
            // bf16 compute: the ranks sum their gradients in another order than one backward.
            assert!(
                el < 1e-3 && eg < 1e-3,
                "{world} ranks: step {s}: loss {l} vs {wl}, grad norm {g} vs {wg}"
            );
        }
        println!(
            "{world} simulated GPUs: max rel Δloss {:.2e}, max rel Δgrad-norm {:.2e} over {STEPS} steps",
            worst.0, worst.1
        );
    }
}
