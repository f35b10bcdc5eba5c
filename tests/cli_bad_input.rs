//! The `llama2` binary on good and bad input: every failure exits non-zero with a message that
//! names what was wrong, and never panics.

use engine::shared_data::or_skip;
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Out {
    fn ok(&self) -> bool {
        self.code == Some(0)
    }
    /// Fails the test unless the run failed cleanly: non-zero exit, no panic.
    fn assert_clean_failure(&self, what: &str) {
        assert!(
            !self.ok() && self.code.is_some(),
            "{what}: expected a non-zero exit, got {:?}\nstdout:\n{}\nstderr:\n{}",
            self.code,
            self.stdout,
            self.stderr
        );
        self.assert_no_panic(what);
    }
    fn assert_no_panic(&self, what: &str) {
        assert!(
            !self.stderr.contains("panicked") && self.code != Some(101),
            "{what}: the binary panicked\n{}",
            self.stderr
        );
    }
    fn assert_success(&self, what: &str) {
        assert!(
            self.ok(),
            "{what}: exit {:?}\nstdout:\n{}\nstderr:\n{}",
            self.code,
            self.stdout,
            self.stderr
        );
        self.assert_no_panic(what);
    }
}

fn llama2(args: &[&str], stdin: &[u8]) -> Out {
    let mut child = Command::new(env!("CARGO_BIN_EXE_llama2"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the llama2 binary");
    {
        let mut si = child.stdin.take().expect("stdin");
        // The binary may exit before reading stdin (e.g. a missing tokenizer); ignore EPIPE.
        let _ = si.write_all(stdin);
    }
    let o = child.wait_with_output().expect("wait for llama2");
    Out {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn p(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// The Llama 2 tokenizer, or `None` (the test skips) where it has not been fetched.
fn llama_tokenizer() -> Option<PathBuf> {
    or_skip("tokenizer/llama2/tokenizer.json")
}

fn tokenize(tok: &Path, extra: &[&str], stdin: &[u8]) -> Out {
    let mut args = vec!["tokenize", "--tokenizer", p(tok)];
    args.extend_from_slice(extra);
    llama2(&args, stdin)
}

// ---- tokenize ----------------------------------------------------------------------------------

#[test]
fn tokenize_hello_world() {
    let Some(tok) = llama_tokenizer() else {
        return;
    };
    let o = tokenize(&tok, &[], b"Hello world");
    o.assert_success("tokenize");
    assert_eq!(o.stdout.trim(), "[15043,3186]");
    let o = tokenize(&tok, &["--bos"], b"Hello world");
    o.assert_success("tokenize --bos");
    assert_eq!(o.stdout.trim(), "[1,15043,3186]");
}

#[test]
fn decode_round_trip() {
    let Some(tok) = llama_tokenizer() else {
        return;
    };
    let o = tokenize(&tok, &["--decode"], b"[15043,3186]");
    o.assert_success("decode");
    assert_eq!(o.stdout.trim_end_matches('\n'), "Hello world");
    // BOS is a special token: decoding drops it.
    let o = tokenize(&tok, &["--decode"], b" [1, 15043, 3186]\n");
    o.assert_success("decode with bos");
    assert_eq!(o.stdout.trim_end_matches('\n'), "Hello world");

    let text = "The quick brown fox — jumps over 13 lazy dogs. ¿Qué tal? 日本語";
    let enc = tokenize(&tok, &[], text.as_bytes());
    enc.assert_success("encode");
    let dec = tokenize(&tok, &["--decode"], enc.stdout.as_bytes());
    dec.assert_success("decode");
    assert_eq!(dec.stdout.trim_end_matches('\n'), text);
}

#[test]
fn tokenize_non_utf8_stdin() {
    let Some(tok) = llama_tokenizer() else {
        return;
    };
    let o = tokenize(&tok, &[], b"Hello \xff\xfe world");
    o.assert_clean_failure("non-UTF-8 stdin");
    assert!(o.stderr.contains("UTF-8"), "{}", o.stderr);
    assert!(o.stdout.is_empty(), "{}", o.stdout);
    let o = tokenize(&tok, &["--decode"], b"[1, \xff]");
    o.assert_clean_failure("non-UTF-8 stdin for --decode");
    assert!(o.stderr.contains("UTF-8"), "{}", o.stderr);
}

#[test]
fn decode_bad_input() {
    let Some(tok) = llama_tokenizer() else {
        return;
    };
    for (input, needle) in [
        (&b"not json"[..], "JSON array"),
        (b"[1, 2", "JSON array"),
        (b"[-1]", "JSON array"),
        (b"{\"ids\": [1]}", "JSON array"),
        (b"[1, 99999]", "99999"),
        (b"[4294967295]", "4294967295"),
    ] {
        let what = format!("--decode {:?}", String::from_utf8_lossy(input));
        let o = tokenize(&tok, &["--decode"], input);
        o.assert_clean_failure(&what);
        assert!(o.stderr.contains(needle), "{what}: {}", o.stderr);
    }
}

#[test]
fn tokenize_empty_stdin() {
    let Some(tok) = llama_tokenizer() else {
        return;
    };
    let o = tokenize(&tok, &[], b"");
    o.assert_success("empty stdin");
    assert_eq!(o.stdout.trim(), "[]");
    let o = tokenize(&tok, &["--bos"], b"");
    o.assert_success("empty stdin --bos");
    assert_eq!(o.stdout.trim(), "[1]");
}

#[test]
fn missing_tokenizer_file() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-tokenizer.json");
    let o = llama2(&["tokenize", "--tokenizer", p(&missing)], b"Hello");
    o.assert_clean_failure("missing tokenizer");
    assert!(o.stderr.contains(p(&missing)), "{}", o.stderr);

    // A file that is not a tokenizer.
    let bad = tmp.path().join("bad.json");
    std::fs::write(&bad, "{\"not\": \"a tokenizer\"}").unwrap();
    let o = llama2(&["tokenize", "--tokenizer", p(&bad)], b"Hello");
    o.assert_clean_failure("not a tokenizer");
    assert!(o.stderr.contains(p(&bad)), "{}", o.stderr);

    // A directory where the file should be.
    let o = llama2(&["tokenize", "--tokenizer", p(tmp.path())], b"Hello");
    o.assert_clean_failure("tokenizer is a directory");
    assert!(o.stderr.contains(p(tmp.path())), "{}", o.stderr);
}

// ---- check -------------------------------------------------------------------------------------

/// The last line of `check`'s output as (passed, failed).
fn summary(out: &str) -> (usize, usize) {
    let last = out.trim_end().lines().last().expect("output");
    let nums: Vec<usize> = last
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    assert!(
        last.starts_with(&format!("{} passed, {} failed", nums[0], nums[1])),
        "last line is not `N passed, M failed`: {last}"
    );
    (nums[0], nums[1])
}

#[test]
fn check_reference_fixture_passes() {
    let Some(dir) = or_skip("fixtures/llama-tiny-gqa") else {
        return;
    };
    let o = llama2(&["check", p(&dir)], b"");
    o.assert_success("check llama-tiny-gqa");
    let (passed, failed) = summary(&o.stdout);
    assert_eq!(failed, 0, "{}", o.stdout);
    assert!(passed > 40, "only {passed} passed:\n{}", o.stdout);
    assert!(
        o.stdout.trim_end().lines().last().unwrap() == format!("{passed} passed, 0 failed"),
        "{}",
        o.stdout
    );
}

#[test]
fn check_missing_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-fixture");
    let o = llama2(&["check", p(&missing)], b"");
    o.assert_clean_failure("check on a missing directory");
    assert!(o.stderr.contains(p(&missing)), "{}", o.stderr);
}

/// A copy of the gqa fixture in a temporary directory (`None`: the test skips).
fn fixture_copy(tmp: &Path) -> Option<PathBuf> {
    let src = or_skip("fixtures/llama-tiny-gqa")?;
    let dst = tmp.join("fixture");
    std::fs::create_dir(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
    Some(dst)
}

fn truncate_half(path: &Path) {
    let b = std::fs::read(path).unwrap();
    std::fs::write(path, &b[..b.len() / 2]).unwrap();
}

/// Rewrites a safetensors file without the tensor `drop`.
fn drop_tensor(path: &Path, drop: &str) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != drop)
        .collect();
    assert!(kept.len() < st.len(), "{drop} not in {}", path.display());
    let out = safetensors::serialize(kept, None).unwrap();
    std::fs::write(path, out).unwrap();
}

fn check_fails_naming(dir: &Path, what: &str, needles: &[&str]) {
    let o = llama2(&["check", p(dir)], b"");
    o.assert_clean_failure(what);
    eprintln!("{what}: {}", o.stderr.trim_end());
    for n in needles {
        assert!(
            o.stderr.contains(n),
            "{what}: stderr does not name {n}:\n{}",
            o.stderr
        );
    }
}

/// Damages a fixture copy in place.
type Corruption<'a> = &'a dyn Fn(&Path);

#[test]
fn check_corrupted_fixture_copies() {
    let tmp = tempfile::tempdir().unwrap();
    // A pristine copy passes, so the failures below come from the corruption.
    let Some(dir) = fixture_copy(tmp.path()) else {
        return;
    };
    llama2(&["check", p(&dir)], b"").assert_success("check on a pristine copy");
    std::fs::remove_dir_all(&dir).unwrap();

    let cases: &[(&str, Corruption, &[&str])] = &[
        (
            "truncated case.safetensors",
            &|d| truncate_half(&d.join("case.safetensors")),
            &["case.safetensors", "truncated"],
        ),
        (
            "truncated model.safetensors",
            &|d| truncate_half(&d.join("model.safetensors")),
            &["model.safetensors", "truncated"],
        ),
        (
            "truncated rm.safetensors",
            &|d| truncate_half(&d.join("rm.safetensors")),
            &["rm.safetensors"],
        ),
        (
            "empty adamw.safetensors",
            &|d| std::fs::write(d.join("adamw.safetensors"), b"").unwrap(),
            &["adamw.safetensors"],
        ),
        (
            "config.json not JSON",
            &|d| std::fs::write(d.join("config.json"), "{ this is not json").unwrap(),
            &["config.json"],
        ),
        (
            "weights missing a tensor",
            &|d| {
                drop_tensor(
                    &d.join("model.safetensors"),
                    "model.layers.0.mlp.up_proj.weight",
                )
            },
            &["model.safetensors", "model.layers.0.mlp.up_proj.weight"],
        ),
        (
            "case missing its logits",
            &|d| drop_tensor(&d.join("case.safetensors"), "logits"),
            &["case.safetensors", "`logits`"],
        ),
        (
            "rm case missing chosen_len",
            &|d| drop_tensor(&d.join("rm.safetensors"), "chosen_len"),
            &["rm.safetensors", "`chosen_len`"],
        ),
        (
            "no weights",
            &|d| std::fs::remove_file(d.join("model.safetensors")).unwrap(),
            &["model.safetensors"],
        ),
    ];
    for (what, corrupt, needles) in cases {
        let dir = fixture_copy(tmp.path()).unwrap();
        corrupt(&dir);
        let mut needles = needles.to_vec();
        needles.push(p(&dir));
        check_fails_naming(&dir, what, &needles);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn check_config_with_fewer_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(dir) = fixture_copy(tmp.path()) else {
        return;
    };
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let layers = cfg["num_hidden_layers"].as_u64().unwrap();
    assert!(layers >= 2);
    cfg["num_hidden_layers"] = (layers - 1).into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    check_fails_naming(
        &dir,
        "config with fewer layers",
        &[
            "model.safetensors",
            &format!("model.layers.{}.", layers - 1),
        ],
    );
}

#[test]
fn bad_arguments_are_usage_errors() {
    for args in [
        &["check"][..],
        &["tokenize"],
        &["no-such-command"],
        &["check", "x", "--atol", "not-a-number"],
    ] {
        let o = llama2(args, b"");
        o.assert_clean_failure(&format!("{args:?}"));
        assert!(o.stderr.contains("error:"), "{args:?}: {}", o.stderr);
    }
}

#[test]
fn rlhf_with_missing_inputs_names_them() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-sft");
    let o = llama2(
        &[
            "rlhf",
            "--sft",
            p(&missing),
            "--world",
            p(&tmp.path().join("no-world")),
            "--out",
            p(&tmp.path().join("out")),
            "--no-progress",
        ],
        b"",
    );
    o.assert_clean_failure("rlhf with missing inputs");
    assert!(o.stderr.contains("no-world"), "{}", o.stderr);
    let o = llama2(
        &[
            "rlhf",
            "--sft",
            p(&missing),
            "--world",
            "w",
            "--rounds",
            "0",
        ],
        b"",
    );
    o.assert_clean_failure("rlhf --rounds 0");
    assert!(o.stderr.contains("--rounds"), "{}", o.stderr);
}

// ---- pretrain/sft --dist ------------------------------------------------------------------------

/// `llama2 ARGS` with the launcher variables `vars` set and every other launcher variable unset.
fn llama2_launched(args: &[&str], vars: &[(&str, &str)]) -> Out {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_llama2"));
    for k in [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "TORCHELASTIC_USE_AGENT_STORE",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "PMI_RANK",
        "PMI_SIZE",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
    ] {
        cmd.env_remove(k);
    }
    let o = cmd
        .args(args)
        .envs(vars.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run the llama2 binary");
    Out {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

#[test]
fn dist_without_a_launch_or_a_gpu_fails_cleanly() {
    let two_ranks = [("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")];
    for cmd in [
        &["pretrain", "--dist", "--data", "nowhere"][..],
        &["sft", "--dist", "--init", "nowhere", "--data", "d.jsonl"],
        &[
            "ppo",
            "--dist",
            "--policy",
            "nowhere",
            "--reward-helpfulness",
            "nowhere",
            "--prompts",
            "p.jsonl",
        ],
    ] {
        // Two ranks and nowhere to meet: an error before any GPU is touched, not a wait.
        let o = llama2_launched(cmd, &two_ranks);
        o.assert_clean_failure(&format!("{cmd:?} without MASTER_ADDR"));
        assert!(o.stderr.contains("MASTER_ADDR"), "{}", o.stderr);
        // One process: without CUDA the error says --dist needs it; with a GPU it gets as
        // far as the missing data. Either way a clean failure.
        let o = llama2_launched(cmd, &[]);
        o.assert_clean_failure(&format!("{cmd:?} in one process"));
        if !engine::backend::cuda::cuda_available() {
            assert!(
                o.stderr.contains("--dist") && o.stderr.contains("cuda:0"),
                "{}",
                o.stderr
            );
        }
    }
    let o = llama2_launched(
        &["pretrain", "--dist", "--device", "cpu", "--data", "x"],
        &[],
    );
    o.assert_clean_failure("--dist with --device");
    assert!(o.stderr.contains("--device"), "{}", o.stderr);
}

// ---- --device cuda without a GPU ----------------------------------------------------------------

#[test]
fn world_commands_on_a_missing_gpu_fail_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("no-model");
    let world = tmp.path().join("no-world");
    let out = tmp.path().join("prefs.jsonl");
    for cmd in [&["world-prefs", "--out", p(&out)][..], &["eval-world"]] {
        let mut args = cmd.to_vec();
        args.extend_from_slice(&["--model", p(&model), "--world", p(&world)]);
        // The device opens first, as in score and generate: without a GPU the error names it;
        // with one the run gets as far as the missing model. Either way a clean failure.
        args.extend_from_slice(&["--device", "cuda"]);
        let o = llama2(&args, b"");
        o.assert_clean_failure(&format!("{args:?}"));
        if !engine::backend::cuda::cuda_available() {
            assert!(
                o.stderr.contains("--device cuda:0") && o.stderr.contains("--device cpu"),
                "{args:?}: {}",
                o.stderr
            );
        }
        assert!(!out.exists(), "{args:?} wrote {}", out.display());
    }
}

/// `bench memory` plans on the CPU with no GPU, writes its JSON, and names a bad world or
/// config instead of panicking.
#[test]
fn bench_memory_plans_and_names_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("plan.json");
    let o = llama2(
        &[
            "bench",
            "memory",
            "--config",
            "tiny",
            "--device",
            "cpu",
            "--world",
            "2",
            "--json",
            p(&json),
        ],
        b"",
    );
    o.assert_success("bench memory");
    assert!(o.stdout.contains("one rank of 2 (ZeRO-1)"), "{}", o.stdout);
    let plans: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let modes: Vec<&str> = plans
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["recompute"].as_str().unwrap())
        .collect();
    assert_eq!(modes, ["none", "attn", "full"]);
    let o = llama2(
        &["bench", "memory", "--config", "nope", "--device", "cpu"],
        b"",
    );
    assert!(
        !o.ok() && o.stderr.contains("unknown preset `nope`"),
        "{}",
        o.stderr
    );
    o.assert_no_panic("unknown preset");
    let o = llama2(
        &[
            "bench", "memory", "--config", "tiny", "--device", "cpu", "--world", "0",
        ],
        b"",
    );
    assert!(
        !o.ok() && o.stderr.contains("at least one rank"),
        "{}",
        o.stderr
    );
    o.assert_no_panic("world 0");
}
