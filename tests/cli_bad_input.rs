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

// ---- issue #17: hostile input, one case per bug ---------------------------------------------------

/// The corpus of [`Tiny`]: the first 30,000 characters of Tiny Shakespeare (public domain, from
/// karpathy/char-rnn), carried by the repository so that a clone without `../shared` runs these
/// tests too.
const TINY_CORPUS: &str = include_str!("data/tinyshakespeare-30k.txt");

/// The carried excerpt is the head of the full text, where that has been fetched.
#[test]
fn the_tiny_corpus_is_the_head_of_tiny_shakespeare() {
    assert_eq!(TINY_CORPUS.chars().count(), 30_000);
    let Some(full) = or_skip("data/tinyshakespeare.txt") else {
        return;
    };
    let full = std::fs::read_to_string(full).unwrap();
    assert!(full.starts_with(TINY_CORPUS));
}

/// A tiny training setup: [`TINY_CORPUS`] (30 KB), a 300-token tokenizer trained on it, prepared
/// shards and a config.json small enough that a few steps take milliseconds.
struct Tiny {
    dir: tempfile::TempDir,
}

impl Tiny {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("c.txt"), TINY_CORPUS).unwrap();
        let tok = d.join("tok.json");
        llama2(
            &[
                "train-tokenizer",
                "--vocab-size",
                "300",
                "--out",
                p(&tok),
                p(&d.join("c.txt")),
            ],
            b"",
        )
        .assert_success("train-tokenizer");
        llama2(
            &[
                "prepare-data",
                "--tokenizer",
                p(&tok),
                "--out",
                p(&d.join("data")),
                "--val-fraction",
                "0.1",
                p(&d.join("c.txt")),
            ],
            b"",
        )
        .assert_success("prepare-data");
        std::fs::write(d.join("tiny.json"), Self::config().to_string()).unwrap();
        Tiny { dir }
    }
    fn config() -> serde_json::Value {
        serde_json::json!({"vocab_size": 300, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 64})
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    /// `pretrain` on the tiny setup writing to `out`, with `extra` flags.
    fn pretrain(&self, out: &str, extra: &[&str]) -> Out {
        let (data, cfg, out) = (self.path("data"), self.path("tiny.json"), self.path(out));
        let mut args = vec![
            "pretrain",
            "--data",
            p(&data),
            "--config",
            p(&cfg),
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--out",
            p(&out),
            "--no-progress",
        ];
        args.extend_from_slice(extra);
        llama2(&args, b"")
    }
    /// A random tiny causal-LM checkpoint with the setup's tokenizer; `edit` may change its
    /// weights (by tensor name) before it is saved.
    fn checkpoint(&self, name: &str, edit: &dyn Fn(&str, &mut [f32])) -> PathBuf {
        self.checkpoint_with(name, engine::Head::Lm, edit)
    }
    fn checkpoint_with(
        &self,
        name: &str,
        head: engine::Head,
        edit: &dyn Fn(&str, &mut [f32]),
    ) -> PathBuf {
        self.checkpoint_of(name, head, &self.path("tok.json"), 300, edit)
    }
    /// The same with another tokenizer and vocabulary size.
    fn checkpoint_of(
        &self,
        name: &str,
        head: engine::Head,
        tok: &Path,
        vocab: usize,
        edit: &dyn Fn(&str, &mut [f32]),
    ) -> PathBuf {
        let mut cfg: engine::LlamaConfig = serde_json::from_value(Self::config()).unwrap();
        cfg.vocab_size = vocab;
        let mut m = engine::Llama::new(engine::Cpu, cfg, head).unwrap();
        m.init_random(7).unwrap();
        let mut host = m.params_to_host().unwrap();
        for e in &m.table.entries {
            edit(&e.name, &mut host[e.span.off..e.span.off + e.span.len]);
        }
        m.set_params(&host).unwrap();
        let dir = self.path(name);
        engine::checkpoint::save_model(&m, &dir, Default::default(), |tmp| {
            std::fs::copy(tok, tmp.join("tokenizer.json"))
                .map(|_| ())
                .map_err(|e| engine::Error::io(tok, e))
        })
        .unwrap();
        dir
    }
}

/// Runs `llama2` in `cwd`.
fn llama2_in(cwd: &Path, args: &[&str]) -> Out {
    let o = Command::new(env!("CARGO_BIN_EXE_llama2"))
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .expect("run the llama2 binary");
    Out {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// `llama2` with its address space capped at 8 GiB, for inputs that used to allocate without
/// bound: a regression then fails fast (an abort) instead of exhausting the machine. Two
/// threads and two malloc arenas keep the reserved address space of a sound run far below the
/// cap on machines with many cores.
#[cfg(unix)]
fn llama2_capped(args: &[&str]) -> Out {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_llama2"));
    cmd.args(args)
        .stdin(Stdio::null())
        .env("RAYON_NUM_THREADS", "2")
        .env("MALLOC_ARENA_MAX", "2");
    // SAFETY: setrlimit is async-signal-safe; called in the child between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 8 << 30,
                rlim_max: 8 << 30,
            };
            libc::setrlimit(libc::RLIMIT_AS, &lim);
            Ok(())
        });
    }
    let o = cmd.output().expect("run the llama2 binary");
    Out {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// Fails unless the run failed cleanly and stderr names every needle.
fn fails_naming(o: &Out, what: &str, needles: &[&str]) {
    o.assert_clean_failure(what);
    for n in needles {
        assert!(
            o.stderr.contains(n),
            "{what}: stderr does not name `{n}`:\n{}",
            o.stderr
        );
    }
}

/// Rewrites a safetensors file with `edit` applied to each f32 tensor's values (by name).
fn edit_f32(path: &Path, edit: &dyn Fn(&str, &mut Vec<f32>)) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in st.tensors() {
        let mut data = t.data().to_vec();
        if t.dtype() == safetensors::Dtype::F32 {
            let mut v: Vec<f32> = data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            edit(&name, &mut v);
            data = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        }
        owned.push((name, t.dtype(), t.shape().to_vec(), data));
    }
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn rewrite_json(path: &Path, edit: &dyn Fn(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

#[cfg(unix)]
#[test]
fn hostile_model_sizes_are_errors_before_anything_is_allocated() {
    let t = Tiny::new();
    let huge = |k: &str, v: serde_json::Value| {
        let mut c = Tiny::config();
        c[k] = v;
        c
    };
    let seven_b = serde_json::json!({"vocab_size": 32000, "hidden_size": 4096,
        "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32});
    let mut seven_b_one_layer = seven_b.clone();
    seven_b_one_layer["num_hidden_layers"] = 1.into();
    let cases = [
        (
            "hidden_size 1e15",
            huge("hidden_size", 1_000_000_000_000_000u64.into()),
            "hidden_size",
        ),
        (
            "num_hidden_layers 1e12",
            huge("num_hidden_layers", 1_000_000_000_000u64.into()),
            "available",
        ),
        ("head_dim 0", huge("head_dim", 0.into()), "head_dim"),
        (
            "intermediate_size 1e10",
            huge("intermediate_size", 10_000_000_000u64.into()),
            "available",
        ),
    ];
    for (what, cfg, needle) in &cases {
        let path = t.path("bad.json");
        std::fs::write(&path, cfg.to_string()).unwrap();
        let (data, out) = (t.path("data"), t.path("run-bad"));
        let o = llama2_capped(&[
            "pretrain",
            "--data",
            p(&data),
            "--config",
            p(&path),
            "--seq-len",
            "16",
            "--out",
            p(&out),
            "--steps",
            "1",
        ]);
        fails_naming(&o, &format!("pretrain --config with {what}"), &[needle]);
    }
    // The same configs (and 7B dimensions) beside tiny weights: checked against the weights'
    // shapes before the model is allocated.
    let ck = t.checkpoint("ck", &|_, _| {});
    for (what, cfg, _) in cases
        .iter()
        .map(|(w, c, n)| (*w, c.clone(), *n))
        .chain([("7B dims", seven_b, "")])
    {
        std::fs::write(ck.join("config.json"), cfg.to_string()).unwrap();
        let o = llama2_capped(&[
            "generate",
            "--model",
            p(&ck),
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "2",
        ]);
        fails_naming(&o, &format!("generate with {what}"), &["config"]);
        assert!(
            !o.stderr.contains("memory allocation"),
            "{what}: {}",
            o.stderr
        );
    }
    std::fs::write(ck.join("config.json"), seven_b_one_layer.to_string()).unwrap();
    let o = llama2_capped(&["generate", "--model", p(&ck), "--prompt", "Hi"]);
    fails_naming(
        &o,
        "7B widths beside tiny weights",
        &["model.embed_tokens.weight", "[32000, 4096]"],
    );
}

#[cfg(unix)]
#[test]
fn a_batch_larger_than_memory_is_an_error_that_says_how_much() {
    let t = Tiny::new();
    let o = llama2_capped(&[
        "pretrain",
        "--data",
        p(&t.path("data")),
        "--config",
        p(&t.path("tiny.json")),
        "--seq-len",
        "16",
        "--batch-size",
        "100000000",
        "--steps",
        "1",
        "--out",
        p(&t.path("run")),
    ]);
    fails_naming(
        &o,
        "pretrain --batch-size 1e8",
        &["--batch-size 100000000", "need", "available"],
    );
}

#[test]
fn check_never_passes_on_nan() {
    let tmp = tempfile::tempdir().unwrap();
    for (file, tensor) in [
        ("case.safetensors", "logits"),
        ("case.safetensors", "loss"),
        ("case.safetensors", "grad.model.norm.weight"),
        ("adamw.safetensors", "p3"),
        ("rm.safetensors", "reward_chosen"),
    ] {
        let Some(dir) = fixture_copy(tmp.path()) else {
            return;
        };
        edit_f32(&dir.join(file), &|n, v| {
            if n == tensor {
                v[0] = f32::NAN;
            }
        });
        let o = llama2(&["check", p(&dir)], b"");
        let what = format!("NaN in the reference's {tensor}");
        o.assert_clean_failure(&what);
        let (_, failed) = summary(&o.stdout);
        assert_eq!(failed, 1, "{what}:\n{}", o.stdout);
        let row = o
            .stdout
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(tensor))
            .unwrap();
        assert!(row.contains("NaN") && row.contains("FAIL"), "{what}: {row}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn check_with_nothing_to_check_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(dir) = fixture_copy(tmp.path()) else {
        return;
    };
    for f in ["case.safetensors", "rm.safetensors", "adamw.safetensors"] {
        std::fs::remove_file(dir.join(f)).unwrap();
    }
    fails_naming(
        &llama2(&["check", p(&dir)], b""),
        "an empty fixture",
        &["nothing to check"],
    );
}

#[test]
fn check_rejects_bounds_that_cannot_be_bounds() {
    let Some(fixture) = or_skip("fixtures/llama-tiny-gqa") else {
        return;
    };
    for flag in [
        "--atol=-1",
        "--rtol=-1e-3",
        "--logits-rtol=nan",
        "--atol=inf",
    ] {
        let name = flag.split('=').next().unwrap();
        fails_naming(&llama2(&["check", p(&fixture), flag], b""), flag, &[name]);
    }
}

/// Logits 16 times larger (weights and reference scaled exactly, a power of two) pass under the
/// default relative bound, where the absolute 2e-5 tuned on random weights failed; a
/// logits-only case (no labels, loss or gradients) is checked, and its missing parts are one
/// summary row each.
#[test]
fn check_bounds_logits_relative_to_their_scale_and_takes_logits_only_cases() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(dir) = fixture_copy(tmp.path()) else {
        return;
    };
    edit_f32(&dir.join("model.safetensors"), &|n, v| {
        if n == "lm_head.weight" {
            v.iter_mut().for_each(|x| *x *= 16.0);
        }
    });
    edit_f32(&dir.join("case.safetensors"), &|n, v| {
        if n == "logits" {
            v.iter_mut().for_each(|x| *x *= 16.0);
        }
    });
    let case = dir.join("case.safetensors");
    let bytes = std::fs::read(&case).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n == "input_ids" || n == "logits")
        .collect();
    let out = safetensors::serialize(kept, None).unwrap();
    std::fs::write(&case, out).unwrap();
    let o = llama2(&["check", p(&dir)], b"");
    o.assert_success("a logits-only case with logits ~16x larger");
    let (passed, failed) = summary(&o.stdout);
    assert!(failed == 0 && passed >= 20, "{}", o.stdout);
    assert!(o.stdout.contains("lm       logits"), "{}", o.stdout);
    let skipped = o.stdout.lines().filter(|l| l.contains("skipped:")).count();
    assert_eq!(
        skipped, 1,
        "one summary row for the lm case's missing parts:\n{}",
        o.stdout
    );
}

#[test]
fn resume_continues_in_the_directory_it_is_pointed_at() {
    let t = Tiny::new();
    let d = t.dir.path();
    // Relative data and out paths, as a user types them.
    let o = llama2_in(
        d,
        &[
            "pretrain",
            "--data",
            "data",
            "--config",
            "tiny.json",
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--steps",
            "6",
            "--stop-after",
            "2",
            "--out",
            "run",
            "--no-progress",
        ],
    );
    o.assert_success("first part");
    std::fs::rename(d.join("run"), d.join("moved")).unwrap();
    let elsewhere = d.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let o = llama2_in(
        &elsewhere,
        &["pretrain", "--resume", "../moved", "--no-progress"],
    );
    o.assert_success("resume of a moved run from another directory");
    assert!(
        !d.join("run").exists(),
        "the resumed run wrote into its old place"
    );
    assert_eq!(
        std::fs::read_dir(&elsewhere).unwrap().count(),
        0,
        "a new partial run appeared"
    );
    let latest = std::fs::read_to_string(d.join("moved/checkpoints/latest")).unwrap();
    assert_eq!(latest.trim(), "step-00000006");
    // A copy continues in the copy; the original stays as it was.
    let o = llama2_in(
        d,
        &[
            "pretrain",
            "--data",
            "data",
            "--config",
            "tiny.json",
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--steps",
            "6",
            "--stop-after",
            "2",
            "--out",
            "orig",
            "--no-progress",
        ],
    );
    o.assert_success("second run");
    copy_tree(&d.join("orig"), &d.join("copy"));
    llama2_in(
        d,
        &[
            "pretrain",
            "--resume",
            "copy/checkpoints/step-00000002",
            "--no-progress",
        ],
    )
    .assert_success("resume of a copied checkpoint");
    let latest = |r: &str| std::fs::read_to_string(d.join(r).join("checkpoints/latest")).unwrap();
    assert_eq!(latest("copy").trim(), "step-00000006");
    assert_eq!(latest("orig").trim(), "step-00000002");
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn resume_rejects_flags_it_would_ignore() {
    let t = Tiny::new();
    t.pretrain("run", &["--steps", "6", "--stop-after", "2"])
        .assert_success("first part");
    let run = t.path("run");
    for (flag, v) in [
        ("--lr", "1e-2"),
        ("--seq-len", "8"),
        ("--batch-size", "4"),
        ("--seed", "3"),
        ("--config", "x.json"),
    ] {
        let o = llama2(&["pretrain", "--resume", p(&run), flag, v], b"");
        fails_naming(&o, &format!("--resume with {flag}"), &[flag, "--resume"]);
    }
}

#[test]
fn resume_takes_a_new_data_path_and_says_what_it_applies() {
    let t = Tiny::new();
    t.pretrain("run", &["--steps", "6", "--stop-after", "2"])
        .assert_success("first part");
    std::fs::rename(t.path("data"), t.path("data2")).unwrap();
    let run = t.path("run");
    let o = llama2(&["pretrain", "--resume", p(&run)], b"");
    fails_naming(&o, "resume with the data moved", &["--data"]);
    let o = llama2(
        &[
            "pretrain",
            "--resume",
            p(&run),
            "--data",
            p(&t.path("data2")),
            "--eval-every",
            "3",
            "--no-progress",
        ],
        b"",
    );
    o.assert_success("resume with --data and --eval-every");
    assert!(
        o.stdout.contains("--eval-every") && o.stdout.contains("--data"),
        "{}",
        o.stdout
    );
    let m = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(
        m.lines()
            .any(|l| l.contains("\"step\":3") && l.contains("val_loss")),
        "{m}"
    );
}

#[cfg(unix)]
#[test]
fn sigterm_saves_a_checkpoint() {
    let t = Tiny::new();
    let run = t.path("run");
    let (data, cfg) = (t.path("data"), t.path("tiny.json"));
    let child = Command::new(env!("CARGO_BIN_EXE_llama2"))
        .args([
            "pretrain",
            "--data",
            p(&data),
            "--config",
            p(&cfg),
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--steps",
            "100000000",
            "--eval-every",
            "0",
            "--ckpt-every",
            "0",
            "--no-progress",
            "--out",
            p(&run),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = child;
    let metrics = run.join("metrics.jsonl");
    while std::fs::read_to_string(&metrics)
        .map(|s| s.lines().count())
        .unwrap_or(0)
        < 3
    {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended before it was signalled: {status}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let o = child.wait_with_output().unwrap();
    let so = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "SIGTERM must end the run cleanly: {so}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(so.contains("stopped early"), "{so}");
    let latest = std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();
    assert!(run
        .join("checkpoints")
        .join(latest.trim())
        .join("model.safetensors")
        .is_file());
}

#[test]
fn partial_checkpoints_of_killed_runs_are_removed() {
    let t = Tiny::new();
    let run = t.path("run");
    t.pretrain("run", &["--steps", "6", "--stop-after", "2"])
        .assert_success("first part");
    // What a kill -9 mid-write leaves (a process id that cannot be alive) goes on the next start.
    let stale = run.join("checkpoints/.step-00000009.tmp-999999999");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("model.safetensors"), b"partial").unwrap();
    std::fs::write(run.join("checkpoints/latest.tmp-999999999"), b"step").unwrap();
    let o = llama2(
        &[
            "pretrain",
            "--resume",
            p(&run),
            "--stop-after",
            "1",
            "--no-progress",
        ],
        b"",
    );
    o.assert_success("resume after SIGTERM");
    assert!(
        !stale.exists() && !run.join("checkpoints/latest.tmp-999999999").exists(),
        "{}",
        o.stdout
    );
}

#[test]
fn training_values_that_make_no_sense_are_rejected_by_name() {
    let t = Tiny::new();
    for (flag, v) in [
        ("--lr", "-1"),
        ("--lr", "nan"),
        ("--lr", "0"),
        ("--final-lr-ratio", "-1"),
        ("--final-lr-ratio", "2"),
        ("--weight-decay", "-1"),
        ("--clip", "-1"),
    ] {
        let arg = format!("{flag}={v}");
        let o = t.pretrain("run", &["--steps", "2", &arg]);
        fails_naming(&o, &arg, &[flag]);
        assert!(!t.path("run/checkpoints").exists(), "{arg} trained anyway");
    }
}

/// `--eval-windows 0` used to be reported as a validation shard too short for the sequence.
#[test]
fn eval_windows_zero_is_named() {
    let t = Tiny::new();
    let o = t.pretrain("run", &["--steps", "2", "--eval-windows", "0"]);
    fails_naming(&o, "--eval-windows 0", &["--eval-windows"]);
    assert!(!o.stderr.contains("fewer than seq_len"), "{}", o.stderr);
}

#[test]
fn sft_values_that_make_no_sense_are_rejected_by_name() {
    let t = Tiny::new();
    let init = t.checkpoint("init", &|_, _| {});
    std::fs::write(
        t.path("d.jsonl"),
        "{\"prompt\": \"Hi\", \"response\": \"Hello\"}\n",
    )
    .unwrap();
    let (d, sft_out) = (t.path("d.jsonl"), t.path("sft"));
    let sft = |extra: &[&str]| {
        let mut args = vec![
            "sft",
            "--init",
            p(&init),
            "--data",
            p(&d),
            "--seq-len",
            "32",
            "--out",
            p(&sft_out),
        ];
        args.extend_from_slice(extra);
        llama2(&args, b"")
    };
    fails_naming(
        &sft(&["--lr=-1", "--epochs", "0", "--steps", "0"]),
        "sft --lr=-1",
        &["--lr"],
    );
    fails_naming(
        &sft(&["--epochs", "0", "--steps", "0"]),
        "sft --epochs 0 --steps 0",
        &["--epochs"],
    );
}

#[test]
fn prepare_data_rejects_empty_shards() {
    let t = Tiny::new();
    fails_naming(
        &llama2(
            &[
                "prepare-data",
                "--tokenizer",
                p(&t.path("tok.json")),
                "--out",
                p(&t.path("d2")),
                "--shard-tokens",
                "0",
                p(&t.path("c.txt")),
            ],
            b"",
        ),
        "--shard-tokens 0",
        &["--shard-tokens"],
    );
}

#[test]
fn sampling_values_that_make_no_sense_are_rejected_by_name() {
    let t = Tiny::new();
    let ck = t.checkpoint("ck", &|_, _| {});
    for (flag, v) in [
        ("--temperature", "nan"),
        ("--temperature", "inf"),
        ("--temperature", "-1"),
        ("--top-p", "nan"),
        ("--top-p", "2"),
        ("--top-p", "0"),
    ] {
        let arg = format!("{flag}={v}");
        let o = llama2(
            &["generate", "--model", p(&ck), "--prompt", "Hi", &arg],
            b"",
        );
        fails_naming(
            &o,
            &arg,
            &[flag.trim_start_matches("--").replace('-', "_").as_str()],
        );
    }
}

#[test]
fn config_values_that_make_no_sense_are_rejected() {
    let t = Tiny::new();
    for (k, v, needle) in [
        ("bos_token_id", serde_json::json!(5000), "bos_token_id"),
        ("eos_token_id", serde_json::json!(300), "eos_token_id"),
        ("model_type", serde_json::json!("bert"), "model_type"),
    ] {
        let mut c = Tiny::config();
        c[k] = v;
        std::fs::write(t.path("bad.json"), c.to_string()).unwrap();
        let o = llama2(
            &[
                "pretrain",
                "--data",
                p(&t.path("data")),
                "--config",
                p(&t.path("bad.json")),
                "--seq-len",
                "16",
                "--steps",
                "1",
                "--out",
                p(&t.path("run")),
            ],
            b"",
        );
        fails_naming(&o, k, &[needle, "bad.json"]);
    }
}

#[test]
fn a_tied_config_beside_an_lm_head_is_rejected() {
    let t = Tiny::new();
    let ck = t.checkpoint("tied", &|_, _| {});
    rewrite_json(&ck.join("config.json"), &|c| {
        c["tie_word_embeddings"] = true.into()
    });
    let o = llama2(&["generate", "--model", p(&ck), "--prompt", "Hi"], b"");
    fails_naming(
        &o,
        "tie_word_embeddings with an lm_head",
        &["lm_head.weight", "tie_word_embeddings"],
    );
}

/// NaN weights: an error naming the tensor, not an empty answer and exit 0.
#[test]
fn nan_weights_make_generate_fail_naming_the_tensor() {
    let t = Tiny::new();
    let ck = t.checkpoint("nan", &|n, v| {
        if n == "model.layers.0.mlp.up_proj.weight" {
            v[3] = f32::NAN;
        }
    });
    let o = llama2(&["generate", "--model", p(&ck), "--prompt", "Hi"], b"");
    fails_naming(&o, "NaN weights", &["model.layers.0.mlp.up_proj.weight"]);
}

#[test]
fn skip_nonfinite_that_skips_every_step_is_a_failure() {
    let t = Tiny::new();
    // Logits that overflow to inf on every step: every step is skipped.
    let init = t.checkpoint("overflow", &|n, v| {
        if n == "lm_head.weight" {
            v.iter_mut().for_each(|x| *x = 3e38);
        }
    });
    let o = llama2(
        &[
            "pretrain",
            "--data",
            p(&t.path("data")),
            "--init",
            p(&init),
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--steps",
            "3",
            "--skip-nonfinite",
            "--out",
            p(&t.path("run")),
        ],
        b"",
    );
    fails_naming(&o, "every step skipped", &["every step", "skipped"]);
    assert!(!t.path("run/checkpoints/latest").exists());
}

#[test]
fn identical_chosen_and_rejected_is_a_bad_line() {
    let t = Tiny::new();
    let init = t.checkpoint("init", &|_, _| {});
    let pairs = t.path("pairs.jsonl");
    std::fs::write(
        &pairs,
        concat!(
            "{\"prompt\": \"Hi\", \"chosen\": \"Hello there\", \"rejected\": \"Go away\"}\n",
            "{\"prompt\": \"Hi\", \"chosen\": \"Same\", \"rejected\": \"Same \"}\n",
            "{\"prompt\": \"Yo\", \"chosen\": \"Hello\", \"rejected\": \"Bye\"}\n",
        ),
    )
    .unwrap();
    let rm_out = t.path("rm");
    let rm = |init: &Path, extra: &[&str]| {
        let mut args = vec![
            "train-rm",
            "--init",
            p(init),
            "--data",
            p(&pairs),
            "--out",
            p(&rm_out),
            "--seq-len",
            "32",
            "--val-fraction",
            "0",
            "--no-progress",
        ];
        args.extend_from_slice(extra);
        llama2(&args, b"")
    };
    let two = ["--batch-size", "2", "--micro-batch", "2"];
    fails_naming(
        &rm(&init, &two),
        "chosen == rejected",
        &["pairs.jsonl:2", "same"],
    );
    rm(&init, &[&two[..], &["--skip-bad"]].concat())
        .assert_success("--skip-bad skips the identical pair");
}

#[test]
fn a_nonfinite_reward_model_gradient_names_its_tensor() {
    let t = Tiny::new();
    let pairs = t.path("pairs.jsonl");
    let rm_out = t.path("rm");
    let rm = |init: &Path, extra: &[&str]| {
        let mut args = vec![
            "train-rm",
            "--init",
            p(init),
            "--data",
            p(&pairs),
            "--out",
            p(&rm_out),
            "--seq-len",
            "32",
            "--val-fraction",
            "0",
            "--no-progress",
        ];
        args.extend_from_slice(extra);
        llama2(&args, b"")
    };
    // Finite rewards and loss, but a gradient that overflows: the final norm's gain tiny and
    // the score head huge (their product is 3: rewards of ±O(10)). Each answer of a pair is
    // once chosen and once rejected, so one of the two steps has d loss / d reward ≈ 1, and
    // the gain's gradient, d reward × score.weight × (x̂ of one answer − the other's), is
    // ~1e38 in every entry.
    let ck = t.checkpoint_with("rm-init", engine::Head::Score, &|n, v| match n {
        "model.norm.weight" => v.iter_mut().for_each(|x| *x = 2e-38),
        "score.weight" => v.iter_mut().for_each(|x| *x = 1.5e38),
        _ => {}
    });
    std::fs::write(
        &pairs,
        concat!(
            "{\"prompt\": \"Hi\", \"chosen\": \"Hello there\", \"rejected\": \"Go away\"}\n",
            "{\"prompt\": \"Hi\", \"chosen\": \"Go away\", \"rejected\": \"Hello there\"}\n",
        ),
    )
    .unwrap();
    let o = rm(&ck, &["--batch-size", "1", "--micro-batch", "1"]);
    fails_naming(
        &o,
        "a non-finite gradient",
        &["gradient", "model.norm.weight"],
    );
}

#[test]
fn a_dialogue_that_starts_with_the_assistant_is_named_and_skippable() {
    let t = Tiny::new();
    let init = t.checkpoint("init", &|_, _| {});
    let data = t.path("d.jsonl");
    std::fs::write(
        &data,
        concat!(
            "{\"prompt\": \"Hi\", \"response\": \"Hello\"}\n",
            "{\"messages\": [{\"role\": \"assistant\", \"content\": \"I start\"}, ",
            "{\"role\": \"user\", \"content\": \"?\"}]}\n",
            "{\"prompt\": \"Yo\", \"response\": \"Hey\"}\n",
        ),
    )
    .unwrap();
    let sft_out = t.path("sft");
    let sft = |extra: &[&str]| {
        let mut args = vec![
            "sft",
            "--init",
            p(&init),
            "--data",
            p(&data),
            "--seq-len",
            "64",
            "--steps",
            "1",
            "--out",
            p(&sft_out),
            "--no-progress",
        ];
        args.extend_from_slice(extra);
        llama2(&args, b"")
    };
    fails_naming(
        &sft(&[]),
        "a dialogue that starts with the assistant",
        &["d.jsonl:2", "`user`"],
    );
    let o = sft(&["--skip-bad"]);
    o.assert_success("--skip-bad skips it");
    assert!(o.stdout.contains("1 skipped"), "{}", o.stdout);
}

#[test]
fn non_utf8_lines_are_named_and_a_bom_is_not_an_error() {
    let t = Tiny::new();
    let init = t.checkpoint("init", &|_, _| {});
    let data = t.path("d.jsonl");
    let mut bytes = b"\xEF\xBB\xBF{\"prompt\": \"Hi\", \"response\": \"Hello\"}\n".to_vec();
    bytes.extend_from_slice(b"{\"messages\": [{\"role\": \"assistant\", \"content\": \"I start\"}, {\"role\": \"user\", \"content\": \"?\"}]}\n");
    bytes.extend_from_slice(b"{\"prompt\": \"Hi \xff\", \"response\": \"Hello\"}\n");
    bytes.extend_from_slice(b"{\"prompt\": \"Yo\", \"response\": \"Hey\"}\n");
    let sft_out = t.path("sft");
    let sft = |extra: &[&str]| {
        let mut args = vec![
            "sft",
            "--init",
            p(&init),
            "--data",
            p(&data),
            "--seq-len",
            "64",
            "--steps",
            "1",
            "--out",
            p(&sft_out),
            "--no-progress",
        ];
        args.extend_from_slice(extra);
        llama2(&args, b"")
    };
    // Without line 2, line 3's bytes are the error (line 1's BOM is not).
    let fixed: Vec<u8> = bytes
        .split_inclusive(|&b| b == b'\n')
        .enumerate()
        .filter(|(i, _)| *i != 1)
        .flat_map(|(_, l)| l.to_vec())
        .collect();
    std::fs::write(&data, &fixed).unwrap();
    fails_naming(&sft(&[]), "a non-UTF-8 line", &["d.jsonl:2", "UTF-8"]);
    std::fs::write(&data, &bytes).unwrap();
    let o = sft(&["--skip-bad"]);
    o.assert_success("--skip-bad skips both");
    assert!(
        o.stderr.contains("d.jsonl:2") && o.stderr.contains("d.jsonl:3"),
        "{}",
        o.stderr
    );
    assert!(o.stdout.contains("2 skipped"), "{}", o.stdout);
}

#[test]
fn tokenizer_errors_say_what_is_wrong() {
    let t = Tiny::new();
    let missing = t.path("no-model");
    let o = llama2(&["generate", "--model", p(&missing), "--prompt", "Hi"], b"");
    fails_naming(&o, "a missing --model", &["no-model", "no such"]);
    assert!(!o.stderr.contains("tokenizer"), "{}", o.stderr);
    let ck = t.checkpoint("ck", &|_, _| {});
    std::fs::write(ck.join("tokenizer.json"), "{ corrupt").unwrap();
    let o = llama2(&["generate", "--model", p(&ck), "--prompt", "Hi"], b"");
    fails_naming(
        &o,
        "a corrupt tokenizer.json",
        &["tokenizer.json", "cannot load"],
    );
    assert!(!o.stderr.contains("has no tokenizer.json"), "{}", o.stderr);
}

#[test]
fn os_errors_are_printed_once() {
    let t = Tiny::new();
    let missing = t.path("no-model");
    let o = llama2(&["check", p(&missing)], b"");
    o.assert_clean_failure("check on a missing directory");
    assert_eq!(o.stderr.matches("os error 2").count(), 1, "{}", o.stderr);
}

#[test]
fn a_sharded_index_cannot_lead_outside_the_checkpoint() {
    let t = Tiny::new();
    let ck = t.checkpoint("ck", &|_, _| {});
    let bytes = std::fs::read(ck.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut map = serde_json::Map::new();
    for n in st.names() {
        map.insert(n.to_string(), "model.safetensors".into());
    }
    map.insert(
        "model.norm.weight".into(),
        "../../../../../../etc/passwd".into(),
    );
    std::fs::rename(
        ck.join("model.safetensors"),
        ck.join("model-00001-of-00001.safetensors"),
    )
    .unwrap();
    for v in map.values_mut() {
        if v == "model.safetensors" {
            *v = "model-00001-of-00001.safetensors".into();
        }
    }
    std::fs::write(
        ck.join("model.safetensors.index.json"),
        serde_json::json!({"weight_map": map}).to_string(),
    )
    .unwrap();
    let o = llama2(&["generate", "--model", p(&ck), "--prompt", "Hi"], b"");
    fails_naming(
        &o,
        "an index path outside the checkpoint",
        &["etc/passwd", "leaves the checkpoint"],
    );
}

#[test]
fn pretrain_logged_to_a_file_prints_progress_lines() {
    let t = Tiny::new();
    let o = t.pretrain("run0", &["--steps", "20", "--eval-every", "10"]);
    o.assert_success("pretrain to a pipe");
    let n = o
        .stdout
        .lines()
        .filter(|l| l.starts_with("step ") && l.contains("/20"))
        .count();
    assert_eq!(n, 2, "a line every 10 steps by default:\n{}", o.stdout);
    let o = t.pretrain(
        "run",
        &["--steps", "20", "--eval-every", "10", "--log-every", "5"],
    );
    o.assert_success("pretrain to a pipe, --log-every 5");
    let lines: Vec<&str> = o
        .stdout
        .lines()
        .filter(|l| l.starts_with("step ") && l.contains("/20"))
        .collect();
    assert_eq!(lines.len(), 4, "a line every 5 steps:\n{}", o.stdout);
    assert!(
        lines[1].starts_with("step 10/20") && lines[1].contains("val loss"),
        "{}",
        o.stdout
    );
}

#[test]
fn pretrain_help_explains_steps_and_shows_its_default() {
    let help = llama2(&["pretrain", "--help"], b"");
    help.assert_success("pretrain --help");
    let steps = help
        .stdout
        .split("--steps <STEPS>")
        .nth(1)
        .unwrap_or_default();
    let steps = &steps[..steps.find("\n  -").unwrap_or(steps.len())];
    assert!(
        steps.contains("[default: 1000]") && steps.contains("steps"),
        "{}",
        help.stdout
    );
}

#[test]
fn generate_takes_and_prints_token_ids() {
    let t = Tiny::new();
    let ck = t.checkpoint("ck", &|_, _| {});
    let tok = t.path("tok.json");
    let ids = |args: &[&str]| -> Vec<u32> {
        let mut a = vec![
            "generate",
            "--model",
            p(&ck),
            "--print-ids",
            "--max-new-tokens",
            "6",
        ];
        a.extend_from_slice(args);
        let o = llama2(&a, b"");
        o.assert_success(&format!("{args:?}"));
        serde_json::from_str(o.stdout.trim()).unwrap()
    };
    let prompt: Vec<u32> = serde_json::from_str(
        tokenize_with(&tok, &["--bos"], b"First Citizen")
            .stdout
            .trim(),
    )
    .unwrap();
    let prompt_s = serde_json::to_string(&prompt).unwrap();
    // The same ids from text and from --ids; --no-bos drops BOS; --stop ends at a token.
    let from_text = ids(&["--prompt", "First Citizen", "--temperature", "0"]);
    assert_eq!(from_text.len(), 6);
    assert_eq!(
        ids(&["--ids", "--prompt", &prompt_s, "--temperature", "0"]),
        from_text
    );
    let stop = from_text[2].to_string();
    let stopped = ids(&[
        "--prompt",
        "First Citizen",
        "--temperature",
        "0",
        "--stop",
        &stop,
    ]);
    assert_eq!(
        stopped,
        from_text[..from_text
            .iter()
            .position(|x| x.to_string() == stop)
            .unwrap()]
    );
    let no_bos = &prompt[1..];
    let mut a = vec![
        "generate",
        "--model",
        p(&ck),
        "--print-ids",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0",
        "--ids",
        "--prompt",
    ];
    let s = serde_json::to_string(no_bos).unwrap();
    a.push(&s);
    let want = llama2(&a, b"").stdout;
    let got = llama2(
        &[
            "generate",
            "--model",
            p(&ck),
            "--print-ids",
            "--max-new-tokens",
            "6",
            "--temperature",
            "0",
            "--no-bos",
            "--prompt",
            "First Citizen",
        ],
        b"",
    )
    .stdout;
    assert_eq!(got, want, "--no-bos is the prompt without BOS");
}

/// With the Llama 2 tokenizer, decoding an answer alone drops the space its first word starts
/// with (SentencePiece strips a leading `▁`): the printed text must be the decoding of the
/// prompt and the answer together.
#[test]
fn generate_prints_the_first_token_separated_from_the_prompt() {
    let Some(tok) = llama_tokenizer() else {
        return;
    };
    let t = Tiny::new();
    let ck = t.checkpoint_of("ck", engine::Head::Lm, &tok, 32000, &|_, _| {});
    let run = |extra: &[&str]| {
        let mut a = vec![
            "generate",
            "--model",
            p(&ck),
            "--max-new-tokens",
            "4",
            "--prompt",
            "Once upon a time",
            "--temperature",
            "1",
            "--top-p",
            "1",
        ];
        a.extend_from_slice(extra);
        let o = llama2(&a, b"");
        o.assert_success(&format!("{extra:?}"));
        o.stdout
    };
    let piece_starts_a_word = |id: u32| {
        let one = tokenize_with(&tok, &["--decode"], format!("[{id}]").as_bytes()).stdout;
        let two = tokenize_with(&tok, &["--decode"], format!("[450, {id}]").as_bytes()).stdout;
        // "The" then the piece: a word-start piece decodes with a space after "The".
        two.trim_end_matches('\n').len() > one.trim_end_matches('\n').len() + 3
    };
    let (seed, gen) = (0..100)
        .map(|s| s.to_string())
        .map(|s| {
            let ids: Vec<u32> =
                serde_json::from_str(run(&["--seed", &s, "--print-ids"]).trim()).unwrap();
            (s, ids)
        })
        .find(|(_, ids)| piece_starts_a_word(ids[0]))
        .expect("a seed whose first token starts a word");
    let prompt: Vec<u32> = serde_json::from_str(
        tokenize_with(&tok, &["--bos"], b"Once upon a time")
            .stdout
            .trim(),
    )
    .unwrap();
    let all: Vec<u32> = prompt.iter().chain(&gen).copied().collect();
    let want = tokenize_with(
        &tok,
        &["--decode"],
        serde_json::to_string(&all).unwrap().as_bytes(),
    )
    .stdout;
    let got = run(&["--seed", &seed]);
    assert_eq!(got.trim_end_matches('\n'), want.trim_end_matches('\n'));
}

fn tokenize_with(tok: &Path, extra: &[&str], stdin: &[u8]) -> Out {
    let mut args = vec!["tokenize", "--tokenizer", p(tok)];
    args.extend_from_slice(extra);
    llama2(&args, stdin)
}

#[test]
fn pretrain_reads_token_id_files_as_they_are() {
    let t = Tiny::new();
    let text = std::fs::read(t.path("c.txt")).unwrap();
    let o = tokenize_with(&t.path("tok.json"), &[], &text);
    o.assert_success("tokenize the corpus");
    let ids: Vec<u32> = serde_json::from_str(o.stdout.trim()).unwrap();
    // nanoGPT's layout: train.bin and val.bin of raw u16.
    let ng = t.path("nanogpt");
    std::fs::create_dir(&ng).unwrap();
    let (tr, va) = ids.split_at(ids.len() * 9 / 10);
    let u16s =
        |x: &[u32]| -> Vec<u8> { x.iter().flat_map(|&i| (i as u16).to_le_bytes()).collect() };
    std::fs::write(ng.join("train.bin"), u16s(tr)).unwrap();
    std::fs::write(ng.join("val.bin"), u16s(va)).unwrap();
    let cfg = t.path("tiny.json");
    let run = |data: &Path, out: &str, extra: &[&str]| {
        let out = t.path(out);
        let mut a = vec![
            "pretrain",
            "--data",
            p(data),
            "--config",
            p(&cfg),
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--steps",
            "2",
            "--out",
            p(&out),
            "--no-progress",
        ];
        a.extend_from_slice(extra);
        llama2(&a, b"")
    };
    let o = run(&ng, "r1", &["--tokenizer", p(&t.path("tok.json"))]);
    o.assert_success("nanoGPT .bin files");
    assert!(
        o.stdout.contains(&format!("{} training tokens", tr.len())),
        "{}",
        o.stdout
    );
    assert!(
        o.stdout
            .contains(&format!("{} validation tokens", va.len())),
        "{}",
        o.stdout
    );
    // One .npy of u32 (as numpy.save writes it), no tokenizer: the tail is held out.
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    let mut h = format!(
        "{{'descr': '<u4', 'fortran_order': False, 'shape': ({},), }}",
        ids.len()
    );
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    npy.extend_from_slice(&(h.len() as u16).to_le_bytes());
    npy.extend_from_slice(h.as_bytes());
    npy.extend(ids.iter().flat_map(|i| i.to_le_bytes()));
    std::fs::write(t.path("tokens.npy"), npy).unwrap();
    let o = run(&t.path("tokens.npy"), "r2", &[]);
    o.assert_success(".npy u32 file");
    let n_val = (ids.len() / 100).max(17);
    assert!(
        o.stdout
            .contains(&format!("{} training tokens", ids.len() - n_val)),
        "{}",
        o.stdout
    );
    // An id beyond the tokenizer's vocabulary is named with its file.
    std::fs::write(ng.join("train.bin"), u16s(&[5, 6, 7, 60000, 8])).unwrap();
    let o = run(&ng, "r3", &["--tokenizer", p(&t.path("tok.json"))]);
    fails_naming(&o, "an id outside the vocabulary", &["train.bin", "60000"]);
}

/// The tokenizers crate panics (an `expect` in its decoder deserializer) on a tokenizer.json
/// that is not valid JSON inside `decoder`: found by `trainer/tests/fuzz_parsers.rs`.
#[test]
fn a_tokenizer_json_that_is_not_json_is_an_error_not_a_panic() {
    let t = Tiny::new();
    let text = std::fs::read_to_string(t.path("tok.json")).unwrap();
    assert!(text.contains("\"decoder\":{"));
    let bad = t.path("bad.json");
    std::fs::write(
        &bad,
        text.replacen("\"decoder\":{", "\"decoder\":{\"x\"},", 1),
    )
    .unwrap();
    let o = llama2(&["tokenize", "--tokenizer", p(&bad)], b"Hello");
    fails_naming(&o, "a malformed tokenizer.json", &["bad.json", "not JSON"]);
}

/// `sft --init` pointing nowhere says so, not that a tokenizer is missing.
#[test]
fn sft_from_a_missing_checkpoint_says_so() {
    let t = Tiny::new();
    std::fs::write(
        t.path("d.jsonl"),
        "{\"prompt\": \"Hi\", \"response\": \"Hello\"}\n",
    )
    .unwrap();
    let o = llama2(
        &[
            "sft",
            "--init",
            p(&t.path("nowhere")),
            "--data",
            p(&t.path("d.jsonl")),
            "--out",
            p(&t.path("sft")),
        ],
        b"",
    );
    fails_naming(&o, "sft --init nowhere", &["nowhere", "no such checkpoint"]);
}
