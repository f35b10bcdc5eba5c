//! `llama2 recipe` on user data only, as a new user would run it: Anthropic HH pairs (the shared
//! file) converted to TRL's conversational form, prompts taken from them, and a model pretrained
//! on Tiny Shakespeare as the base. The recipe runs SFT -> both reward models -> two rounds
//! (rejection sampling, then rejection sampling + PPO) with every stage evaluated by one fixed
//! judge (the recipe's first reward models), then Ghost Attention and context distillation on the
//! example files of `recipes/examples/`: it is the shipped `recipes/user-data.toml` with its
//! placeholders filled. It is killed in the middle of round 2 and finished by a rerun, which
//! skips the steps already done; `recipe plan` says which are done. `llama2 gatt` and
//! `llama2 distill` then run on their own on the same files with the recipe's models.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

mod common;
use common::{llama2, ok};

/// A tiny model pretrained on the start of Tiny Shakespeare, with its own 512-token tokenizer.
fn pretrained(d: &Path, shakespeare: &Path) -> std::path::PathBuf {
    let text: String = std::fs::read_to_string(shakespeare)
        .unwrap()
        .chars()
        .take(100_000)
        .collect();
    std::fs::write(d.join("shakespeare.txt"), text).unwrap();
    ok(llama2()
        .args(["train-tokenizer", "--vocab-size", "512", "--out"])
        .arg(d.join("tok.json"))
        .arg(d.join("shakespeare.txt")));
    ok(llama2()
        .args(["prepare-data", "--val-fraction", "0.1", "--tokenizer"])
        .arg(d.join("tok.json"))
        .arg("--out")
        .arg(d.join("data"))
        .arg(d.join("shakespeare.txt")));
    ok(llama2()
        .args([
            "pretrain",
            "--preset",
            "tiny",
            "--seq-len",
            "64",
            "--batch-size",
            "8",
        ])
        .args(["--steps", "20", "--no-progress", "--data"])
        .arg(d.join("data"))
        .arg("--out")
        .arg(d.join("pt")));
    d.join("pt")
}

/// Short HH pairs (their dialogues fit the tiny model's 256 positions with room for answers),
/// converted to TRL's conversational form: `train.jsonl` (pairs), `prompts.jsonl` (their
/// prompts) and `eval.jsonl` (prompts of other pairs).
fn user_data(d: &Path, hh: &Path) {
    let hh = std::fs::read_to_string(hh).unwrap();
    let short: Vec<&str> = hh.lines().filter(|l| l.len() < 500).take(72).collect();
    assert_eq!(short.len(), 72, "the shared HH file has short pairs");
    std::fs::write(d.join("hh-train.jsonl"), short[..60].join("\n")).unwrap();
    std::fs::write(d.join("hh-eval.jsonl"), short[60..].join("\n")).unwrap();
    let convert = |kind: &str, from: &str, to: &str| {
        ok(llama2()
            .args(["convert", "--kind", kind, "--out"])
            .arg(d.join(to))
            .arg(d.join(from)));
    };
    convert("pairs", "hh-train.jsonl", "train.jsonl");
    convert("prompts", "train.jsonl", "prompts.jsonl");
    convert("prompts", "hh-eval.jsonl", "eval.jsonl");
    let first: Value = serde_json::from_str(
        std::fs::read_to_string(d.join("train.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert!(
        first["prompt"].is_array() && first["chosen"].is_array(),
        "{first}"
    );
}

/// The shipped `recipes/user-data.toml`: SFT, reward models, two rounds, then GAtt and context
/// distillation on the example files of `recipes/examples/` (placeholders replaced by the test).
const RECIPE: &str = include_str!("../recipes/user-data.toml");

#[test]
fn a_recipe_on_user_data_is_killed_midway_and_finished_by_a_rerun() {
    use engine::shared_data::or_skip;
    let Some(shakespeare) = or_skip("data/tinyshakespeare.txt") else {
        return;
    };
    let Some(hh) = or_skip("data/hh-harmless-pairs.jsonl") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = pretrained(d, &shakespeare);
    user_data(d, &hh);
    let out = d.join("run");
    let recipe = d.join("hh.toml");
    std::fs::write(
        &recipe,
        RECIPE
            .replace("BASE", &base.display().to_string())
            .replace("data/", &format!("{}/", d.display()))
            .replace("recipes/examples/", &format!("{}/", examples().display())),
    )
    .unwrap();
    let plan = |want: &[(&str, &str)]| {
        let p = ok(llama2()
            .args(["recipe", "plan"])
            .arg(&recipe)
            .arg("--out")
            .arg(&out));
        for (step, state) in want {
            assert!(
                p.lines()
                    .any(|l| l.split_whitespace().next() == Some(step) && l.contains(state)),
                "`{step}` should be `{state}`:\n{p}"
            );
        }
        p
    };
    plan(&[
        ("sft", "to run"),
        ("rm", "to run"),
        ("round-2/ppo", "to run"),
    ]);

    // Preempted as a scheduler does (SIGTERM): while SFT trains, and twice in round 2's rejection
    // sampling: while it samples, where there is nothing to checkpoint, the process stops at
    // once; while it fine-tunes, the training loop checkpoints and returns. Either way the recipe
    // must not mark the step done or go on.
    // Runs the recipe and sends SIGTERM at the first line of stderr (`on_stderr`) or stdout that
    // `at` accepts; reads both streams to the end (one on a thread, so neither pipe fills) and
    // returns them, once the run has failed.
    let preempt = |on_stderr: bool, at: &dyn Fn(&str) -> bool| -> (String, String) {
        let mut child = llama2()
            .args(["recipe", "run", "--device", "cpu"])
            .arg(&recipe)
            .arg("--out")
            .arg(&out)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let so: Box<dyn std::io::Read + Send> = Box::new(child.stdout.take().unwrap());
        let se: Box<dyn std::io::Read + Send> = Box::new(child.stderr.take().unwrap());
        let (watched, rest) = if on_stderr { (se, so) } else { (so, se) };
        let rest = std::thread::spawn(move || std::io::read_to_string(rest).unwrap());
        let mut lines = Vec::new();
        let mut sent = false;
        for line in BufReader::new(watched).lines() {
            let line = line.unwrap();
            if !sent && at(&line) {
                sent = true;
                assert!(Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status()
                    .unwrap()
                    .success());
            }
            lines.push(line);
        }
        let (watched, rest) = (lines.join("\n"), rest.join().unwrap());
        let (so, se) = if on_stderr {
            (rest, watched)
        } else {
            (watched, rest)
        };
        assert!(
            sent && !child.wait().unwrap().success(),
            "not preempted:\n{so}\n{se}"
        );
        (so, se)
    };

    // First while SFT trains: its loop checkpoints; the rerun continues from that checkpoint.
    let (so, se) = preempt(false, &|l| l.starts_with("sft data:"));
    assert!(
        se.contains("interrupted during recipe step sft (Ctrl-C or SIGTERM): saving a checkpoint")
            && se.contains("interrupted during recipe step sft: it is not marked done"),
        "{so}\n{se}"
    );
    plan(&[("sft", "partial"), ("rm", "to run")]);

    let (so, se) = preempt(true, &|l| l.ends_with("] round-2/rs"));
    assert!(
        so.contains(&format!(
            "resuming {} from its last checkpoint",
            out.join("sft").display()
        )),
        "{so}\n{se}"
    );
    assert!(
        se.contains(
            "interrupted during recipe step round-2/rs (Ctrl-C or SIGTERM): nothing to checkpoint \
             here, stopping now; the step is not marked done"
        ),
        "{so}\n{se}"
    );
    let partial = [
        ("sft", "done"),
        ("rm", "done"),
        ("round-1/rs", "done"),
        ("round-2/rs", "partial"),
        ("round-2/ppo", "to run"),
    ];
    plan(&partial);

    // The rerun starts round 2's rejection sampling again; its fine-tune's first line on stdout.
    let (so, se) = preempt(false, &|l| l.starts_with("sft data:"));
    assert!(
        !se.contains("round-2/rs: done, skipped")
            && se.contains("saving a checkpoint after this step")
            && se.contains("interrupted during recipe step round-2/rs: it is not marked done"),
        "{so}\n{se}"
    );
    plan(&partial);

    // The rerun skips what is done and finishes.
    let o = llama2()
        .args(["recipe", "run", "--device", "cpu"])
        .arg(&recipe)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let (so, se) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "rerun failed\n{so}\n{se}");
    for step in ["sft", "rm", "round-1/rs", "eval/sft", "eval/rs_round_1"] {
        assert!(
            se.contains(&format!("] {step}: done, skipped")),
            "{step} rerun:\n{se}"
        );
    }
    for step in [
        "round-2/rs",
        "round-2/ppo",
        "eval/ppo_round_2",
        "gatt",
        "eval/gatt",
        "distill",
        "eval/distill",
    ] {
        assert!(
            se.lines().any(|l| l.ends_with(&format!("] {step}"))),
            "{step} not run:\n{se}"
        );
    }
    plan(&[("round-2/ppo", "done"), ("eval/ppo_round_2", "done")]);

    // Every stage's reward under the one fixed judge: the recipe's first reward models.
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let stages: Vec<&str> = report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(
        stages,
        [
            "sft",
            "rs_round_1",
            "rs_round_2",
            "ppo_round_2",
            "gatt",
            "distill"
        ]
    );
    for s in &stages {
        let j = &report[*s]["judge"];
        assert!(
            j["greedy"]
                .as_f64()
                .is_some_and(|r| (0.0..=1.0).contains(&r)),
            "{s}: {j}"
        );
        assert!(
            report[*s]["gold"].is_null() && report[*s]["accuracy"].is_null(),
            "no world here"
        );
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    println!("{md}");
    assert!(md.contains("| ppo_round_2 |"), "{md}");
    assert!(
        md.contains("reward-model score per turn") && md.contains("| illicit | 5 |"),
        "{md}"
    );
    assert_eq!(
        report["gatt"]["reward_by_turn"]["after_with"]
            .as_array()
            .map(Vec::len),
        Some(3),
        "{report}"
    );
    let judge: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("eval/ppo_round_2/step.json")).unwrap(),
    )
    .unwrap();
    assert!(judge["key"].is_string());

    // The final step: every stage's reward distribution under the same judge (Figure 20) and
    // the last model against SFT on the same 8 prompts; skipped on a further rerun.
    let f = &report["final_eval"];
    let w = &f["win"];
    let n = |v: &Value| v.as_u64().unwrap();
    assert_eq!(n(&w["wins"]) + n(&w["ties"]) + n(&w["losses"]), 8, "{f}");
    let fig: Vec<&str> = f["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(fig, stages);
    assert!(out.join("eval/final/fig20.svg").is_file());
    assert!(md.contains("Figure 20"), "{md}");
    let again = llama2()
        .args(["recipe", "run", "--device", "cpu"])
        .arg(&recipe)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let se = String::from_utf8_lossy(&again.stderr);
    assert!(
        again.status.success() && se.contains("] eval/final: done, skipped"),
        "{se}"
    );
    // GAtt on the example files, judged by the recipe's helpfulness reward model.
    let gatt: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("gatt/report.json")).unwrap())
            .unwrap();
    assert!(gatt["rows"].as_u64().unwrap() > 0, "{gatt}");
    for when in ["user_before", "user_after"] {
        let u = &gatt[when];
        assert_eq!(u["score_with"].as_array().unwrap().len(), 3, "{when}: {u}");
        assert_eq!(u["samples"].as_array().unwrap().len(), 3, "{when}: {u}");
    }
    let rows = std::fs::read_to_string(out.join("gatt/gatt.jsonl")).unwrap();
    let first: Value = serde_json::from_str(rows.lines().next().unwrap()).unwrap();
    assert_eq!(first["learn"], "last");
    // Context distillation on the example risk categories: every category reported.
    let dist: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("distill/report.json")).unwrap())
            .unwrap();
    assert_eq!(dist["prompts"], 20);
    let cats: Vec<&String> = dist["by_category"].as_object().unwrap().keys().collect();
    assert_eq!(
        cats,
        ["illicit", "privacy", "self-harm", "violence"],
        "{dist}"
    );
    assert!(dist["plain_score_before"].is_number(), "{dist}");
    // Sampled answers differ, so some are kept and fine-tuned on.
    assert!(dist["kept"].as_u64().unwrap() > 0, "{dist}");
    assert!(
        dist["plain_score_after"].is_number() && dist["checkpoint"].is_string(),
        "{dist}"
    );

    // The two commands on their own, with the recipe's models.
    let ex = examples();
    let so = ok(llama2()
        .args(["gatt", "--model"])
        .arg(out.join("round-2/ppo"))
        .arg("--instructions")
        .arg(ex.join("gatt-instructions.jsonl"))
        .arg("--dialogues")
        .arg(ex.join("gatt-dialogues.jsonl"))
        .args([
            "--num-dialogues",
            "4",
            "--eval-dialogues",
            "2",
            "--turns",
            "2",
        ])
        .args(["--max-new-tokens", "8", "--seq-len", "128", "--epochs", "1"])
        .arg("--out")
        .arg(d.join("gatt-cli")));
    assert!(
        so.contains("no reward model: read the sample dialogues"),
        "{so}"
    );
    let g: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("gatt-cli/report.json")).unwrap())
            .unwrap();
    assert_eq!(
        g["user_after"]["samples"].as_array().unwrap().len(),
        2,
        "{g}"
    );
    let so = ok(llama2()
        .args(["distill", "--model"])
        .arg(out.join("gatt/sft"))
        .arg("--reward-safety")
        .arg(out.join("rm/rm-safety"))
        .arg("--categories")
        .arg(ex.join("risk-categories.jsonl"))
        .arg("--prompts")
        .arg(ex.join("adversarial-prompts.jsonl"))
        .args(["--preprompts-per-prompt", "1", "--max-new-tokens", "8"])
        .args(["--temperature", "1.0"])
        .args(["--seq-len", "128", "--epochs", "1"])
        .arg("--out")
        .arg(d.join("distill-cli")));
    println!("{so}");
    assert!(
        so.contains("20 safety prompts") && so.contains("illicit:"),
        "{so}"
    );
    // A bad line of a user file is named before any model loads.
    std::fs::write(
        d.join("bad.jsonl"),
        "{\"instruction\": \"Be brief.\"}\n{\"instruction\": 3}\n",
    )
    .unwrap();
    let o = llama2()
        .args(["gatt", "--model"])
        .arg(out.join("round-2/ppo"))
        .arg("--instructions")
        .arg(d.join("bad.jsonl"))
        .arg("--dialogues")
        .arg(ex.join("gatt-dialogues.jsonl"))
        .arg("--out")
        .arg(d.join("gatt-bad"))
        .output()
        .unwrap();
    let se = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && se.contains("bad.jsonl:2") && se.contains("`instruction`"),
        "{se}"
    );
}

fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/examples")
}
