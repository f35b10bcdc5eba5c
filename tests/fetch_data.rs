//! `scripts/fetch_data.py` without the network: its arguments, the tokenizer's licence gate, a
//! fetch from a local copy of the upstream repository, the checksum that refuses anything else,
//! the "already present" path that fetches nothing, and the token's way over HTTP (servers on
//! the loopback).

use engine::shared_data::{how_to_get, or_skip};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};

/// `python3 scripts/fetch_data.py ARGS` in the checkout, with no Hugging Face token in sight;
/// `None` (the test skips) where python3 is missing.
fn fetch(args: &[&str], home: &Path) -> Option<Output> {
    fetch_with_token(args, home, None)
}

/// [`fetch`] with `HF_TOKEN` set to `token`, and no proxy between it and the loopback.
fn fetch_with_token(args: &[&str], home: &Path, token: Option<&str>) -> Option<Output> {
    let mut c = Command::new("python3");
    c.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fetch_data.py"))
        .args(args)
        .env("HF_HOME", home);
    for v in [
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "http_proxy",
        "HTTP_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ] {
        c.env_remove(v);
    }
    if let Some(t) = token {
        c.env("HF_TOKEN", t);
    }
    match c.output() {
        Ok(o) => Some(o),
        Err(e) => {
            let _ = std::io::stderr().write_all(format!("skipped: python3: {e}\n").as_bytes());
            None
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The item the skip line's command fetches `rel` with: the word after `fetch_data.py`.
fn item_for(rel: &str) -> String {
    let cmd = how_to_get(rel);
    let mut words = cmd.split_whitespace();
    words.find(|w| w.ends_with("scripts/fetch_data.py"));
    words
        .next()
        .unwrap_or_else(|| panic!("no fetch command for {rel}: {cmd}"))
        .to_string()
}

/// Files under `dir`, recursively (to show that a refused fetch wrote nothing, not even a part).
fn files(dir: &Path) -> Vec<String> {
    let mut out = vec![];
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                out.extend(files(&e.path()));
            } else {
                out.push(e.path().display().to_string());
            }
        }
    }
    out
}

#[test]
fn every_item_a_skip_line_names_is_one_the_script_knows() {
    let t = tempfile::tempdir().unwrap();
    let Some(help) = fetch(&["--help"], t.path()) else {
        return;
    };
    assert!(help.status.success());
    let help = text(&help.stdout);
    for rel in [
        "data/tinyshakespeare.txt",
        "data/hh-harmless-pairs.jsonl",
        "tokenizer/llama2/tokenizer.json",
    ] {
        let item = item_for(rel);
        assert!(
            help.contains(&format!("  {item} ")),
            "{item} not in --help:\n{help}"
        );
    }
    let o = fetch(&["tinyshakespeare"], t.path()).unwrap();
    assert_eq!(o.status.code(), Some(2), "an unknown item is a usage error");
    let e = text(&o.stderr);
    assert!(
        e.contains("shakespeare") && e.contains("llama2-tokenizer"),
        "{e}"
    );
}

#[test]
fn the_tokenizer_without_a_token_explains_the_licence_and_fetches_nothing() {
    let t = tempfile::tempdir().unwrap();
    let dest = t.path().join("assets");
    let item = item_for("tokenizer/llama2/tokenizer.json");
    let Some(o) = fetch(&[&item, "--dest", dest.to_str().unwrap()], t.path()) else {
        return;
    };
    assert_eq!(o.status.code(), Some(1));
    let e = text(&o.stderr);
    for needle in [
        "Llama 2 Community License",
        "https://huggingface.co/meta-llama/Llama-2-7b-hf",
        "HF_TOKEN=",
        "--from",
    ] {
        assert!(e.contains(needle), "{needle:?} not in: {e}");
    }
    assert!(files(&dest).is_empty());
}

#[test]
fn a_file_that_is_not_upstreams_is_refused_and_nothing_is_written() {
    let t = tempfile::tempdir().unwrap();
    let (up, dest) = (t.path().join("char-rnn"), t.path().join("assets"));
    std::fs::create_dir_all(up.join("data/tinyshakespeare")).unwrap();
    std::fs::write(
        up.join("data/tinyshakespeare/input.txt"),
        "not Shakespeare\n",
    )
    .unwrap();
    let item = item_for("data/tinyshakespeare.txt");
    let args = [
        &item,
        "--dest",
        dest.to_str().unwrap(),
        "--from",
        up.to_str().unwrap(),
    ];
    let Some(o) = fetch(&args, t.path()) else {
        return;
    };
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stdout));
    let e = text(&o.stderr);
    assert!(e.contains("sha256") && e.contains("nothing written"), "{e}");
    assert!(files(&dest).is_empty(), "{:?}", files(&dest));
    // A corrupt download of the HH split (not gzip) is refused the same way.
    std::fs::create_dir_all(up.join("harmless-base")).unwrap();
    std::fs::write(up.join("harmless-base/test.jsonl.gz"), "{}\n").unwrap();
    let item = item_for("data/hh-harmless-pairs.jsonl");
    let args = [
        &item,
        "--dest",
        dest.to_str().unwrap(),
        "--from",
        up.to_str().unwrap(),
    ];
    let o = fetch(&args, t.path()).unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("harmless-base/test.jsonl.gz"));
    assert!(files(&dest).is_empty(), "{:?}", files(&dest));
}

#[test]
fn shakespeare_from_a_local_copy_then_already_present() {
    let Some(real) = or_skip("data/tinyshakespeare.txt") else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let (up, dest) = (t.path().join("char-rnn"), t.path().join("assets"));
    std::fs::create_dir_all(up.join("data/tinyshakespeare")).unwrap();
    std::fs::copy(&real, up.join("data/tinyshakespeare/input.txt")).unwrap();
    let item = item_for("data/tinyshakespeare.txt");
    let args = [
        &item,
        "--dest",
        dest.to_str().unwrap(),
        "--from",
        up.to_str().unwrap(),
    ];
    let Some(o) = fetch(&args, t.path()) else {
        return;
    };
    assert!(o.status.success(), "{}", text(&o.stderr));
    let got = dest.join("data/tinyshakespeare.txt");
    assert_eq!(std::fs::read(&got).unwrap(), std::fs::read(&real).unwrap());
    // Present: nothing is read from upstream (it is gone now), the file is left as it is.
    std::fs::remove_dir_all(&up).unwrap();
    let o = fetch(&args, t.path()).unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("already present"),
        "{}",
        text(&o.stdout)
    );
    // Another file under that name is not taken for it, nor overwritten.
    std::fs::write(&got, "edited").unwrap();
    let o = fetch(&args, t.path()).unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("--force"), "{}", text(&o.stderr));
    assert_eq!(std::fs::read_to_string(&got).unwrap(), "edited");
}

#[test]
fn the_tokenizer_from_a_local_copy_then_already_present() {
    let (Some(model), Some(json)) = (
        or_skip("tokenizer/llama2/tokenizer.model"),
        or_skip("tokenizer/llama2/tokenizer.json"),
    ) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let (up, dest) = (t.path().join("Llama-2-7b-hf"), t.path().join("assets"));
    std::fs::create_dir_all(&up).unwrap();
    std::fs::copy(&model, up.join("tokenizer.model")).unwrap();
    std::fs::write(
        up.join("tokenizer.json"),
        r#"{"model": {"type": "BPE", "vocab": {}}}"#,
    )
    .unwrap();
    let item = item_for("tokenizer/llama2/tokenizer.json");
    let args = [
        &item,
        "--dest",
        dest.to_str().unwrap(),
        "--from",
        up.to_str().unwrap(),
    ];
    let Some(o) = fetch(&args, t.path()) else {
        return;
    };
    assert_eq!(
        o.status.code(),
        Some(1),
        "a tokenizer.json of another shape is refused"
    );
    assert!(text(&o.stderr).contains("32,000"), "{}", text(&o.stderr));
    std::fs::copy(&json, up.join("tokenizer.json")).unwrap();
    let o = fetch(&args, t.path()).unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    for (f, src) in [("tokenizer.model", &model), ("tokenizer.json", &json)] {
        let got = std::fs::read(dest.join("tokenizer/llama2").join(f)).unwrap();
        assert_eq!(got, std::fs::read(src).unwrap(), "{f}");
    }
    let o = fetch(&args, t.path()).unwrap();
    assert!(o.status.success());
    assert_eq!(text(&o.stdout).matches("already present").count(), 2);
}

/// A server on the loopback that answers `replies`, one connection each, in turn; joining it
/// gives the request heads it read.
fn serve(replies: Vec<String>) -> (u16, std::thread::JoinHandle<Vec<String>>) {
    use std::io::{BufRead, BufReader};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let h = std::thread::spawn(move || {
        let mut heads = vec![];
        for reply in replies {
            let (mut s, _) = l.accept().unwrap();
            let mut head = String::new();
            let mut r = BufReader::new(s.try_clone().unwrap());
            while r.read_line(&mut head).unwrap_or(0) > 2 {}
            heads.push(head);
            let _ = s.write_all(reply.as_bytes());
        }
        heads
    });
    (port, h)
}

/// Joins a [`serve`] thread; a connection of ours first, in case the script made fewer.
fn served(port: u16, h: std::thread::JoinHandle<Vec<String>>) -> Vec<String> {
    let _ = std::net::TcpStream::connect(("127.0.0.1", port));
    h.join().unwrap()
}

#[test]
fn the_token_goes_to_hugging_face_only_and_a_refusal_is_explained() {
    let t = tempfile::tempdir().unwrap();
    let dest = t.path().join("assets");
    let reply = |status: &str, extra: &str, body: &str| {
        format!(
            "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    // The repository redirects to a file host, as Hugging Face does; the file is not Meta's.
    let (cdn, cdn_thread) = serve(vec![reply("200 OK", "", "not a tokenizer")]);
    let location = format!("Location: http://127.0.0.1:{cdn}/blob\r\n");
    let (hub, hub_thread) = serve(vec![reply("302 Found", &location, "")]);
    let base = format!("http://127.0.0.1:{hub}");
    let item = item_for("tokenizer/llama2/tokenizer.json");
    let args = [&item, "--dest", dest.to_str().unwrap(), "--from", &base];
    let Some(o) = fetch_with_token(&args, t.path(), Some("hf_secret")) else {
        return;
    };
    let hub_heads = served(hub, hub_thread);
    let cdn_heads = served(cdn, cdn_thread);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stdout));
    assert!(text(&o.stderr).contains("sha256"), "{}", text(&o.stderr));
    assert!(files(&dest).is_empty());
    assert!(
        hub_heads[0].starts_with("GET /tokenizer.model "),
        "{hub_heads:?}"
    );
    assert!(
        hub_heads[0].contains("Authorization: Bearer hf_secret"),
        "{hub_heads:?}"
    );
    assert!(cdn_heads[0].starts_with("GET /blob "), "{cdn_heads:?}");
    assert!(
        !cdn_heads[0].to_lowercase().contains("authorization"),
        "{cdn_heads:?}"
    );
    assert!(!text(&o.stderr).contains("hf_secret") && !text(&o.stdout).contains("hf_secret"));
    // A refused token: the likely cause is named.
    let (hub, hub_thread) = serve(vec![reply("401 Unauthorized", "", "")]);
    let base = format!("http://127.0.0.1:{hub}");
    let args = [&item, "--dest", dest.to_str().unwrap(), "--from", &base];
    let o = fetch_with_token(&args, t.path(), Some("hf_wrong")).unwrap();
    served(hub, hub_thread);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("accepted the licence"),
        "{}",
        text(&o.stderr)
    );
    assert!(
        !text(&o.stderr).contains("hf_wrong"),
        "the token is not printed"
    );
    assert!(files(&dest).is_empty(), "{:?}", files(&dest));
}
