//! Where the tests find the reference material (fixtures, the Llama 2 tokenizer, Tiny
//! Shakespeare, the HH pairs), in `../shared`'s layout (`fixtures/NAME/`, `tokenizer/llama2/`,
//! `data/`). Every test looks through [`or_skip`], so a clone with nothing beside it skips what it
//! lacks, naming it and the command that gets it, instead of failing.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Set to `1` where nothing may be skipped (CI's run beside `../shared`): a missing item then
/// fails its test.
pub const REQUIRED_VAR: &str = "LLAMA2_SHARED_REQUIRED";

/// The folders looked in, in order: `$LLAMA2_SHARED` when set, else `../shared` beside the
/// checkout (CI's layout); then the checkout's `assets/`, which carries the small fixtures and
/// receives what `scripts/fetch_data.py` fetches.
pub fn roots() -> [PathBuf; 2] {
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the engine crate sits in the checkout");
    let shared = match std::env::var_os("LLAMA2_SHARED") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => checkout.join("..").join("shared"),
    };
    [shared, checkout.join("assets")]
}

/// `rel` under the first of `roots` that has it.
pub fn find_in(roots: &[PathBuf], rel: &str) -> Option<PathBuf> {
    roots.iter().map(|r| r.join(rel)).find(|p| p.exists())
}

/// `rel` under the first of [`roots`] that has it.
pub fn find(rel: &str) -> Option<PathBuf> {
    find_in(&roots(), rel)
}

/// The command, run in the checkout, that puts `rel` into `assets/`.
pub fn how_to_get(rel: &str) -> String {
    match rel {
        "data/tinyshakespeare.txt" => "python3 scripts/fetch_data.py shakespeare".into(),
        "data/hh-harmless-pairs.jsonl" => "python3 scripts/fetch_data.py hh".into(),
        "tokenizer/llama2/tokenizer.json" | "tokenizer/llama2/tokenizer.model" => {
            "HF_TOKEN=<your token> python3 scripts/fetch_data.py llama2-tokenizer (Meta's \
             licence: see its --help)"
                .into()
        }
        _ => match rel.strip_prefix("fixtures/") {
            Some(name) => format!(
                "git checkout -- assets/fixtures, or python3 scripts/make_fixtures.py --preset \
                 {name} --out assets/fixtures (needs torch and transformers)"
            ),
            None => format!("git checkout -- assets/{rel}"),
        },
    }
}

/// The line a test prints when `rel` is in none of `roots`.
pub fn missing_line(test: &str, rel: &str, roots: &[PathBuf]) -> String {
    let looked: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
    format!(
        "skipped {test}: {rel} not found in {}; get it with: {}",
        looked.join(" or "),
        how_to_get(rel)
    )
}

/// For tests: `rel`'s path, or `None` after printing [`missing_line`] to stderr. The line is
/// written past the test harness's capture, so `cargo test` shows it for a passing test. Under
/// `LLAMA2_SHARED_REQUIRED=1` a missing item panics with that line instead.
pub fn or_skip(rel: &str) -> Option<PathBuf> {
    let roots = roots();
    if let Some(p) = find_in(&roots, rel) {
        return Some(p);
    }
    let thread = std::thread::current();
    let line = missing_line(thread.name().unwrap_or("test"), rel, &roots);
    if std::env::var_os(REQUIRED_VAR).is_some_and(|v| v == "1") {
        panic!("{REQUIRED_VAR}=1, so nothing may be skipped: {line}");
    }
    // One write, so that lines of tests running in parallel do not interleave.
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_root_that_has_it_wins_and_each_item_is_looked_up_alone() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::fs::create_dir_all(a.join("data")).unwrap();
        std::fs::create_dir_all(b.join("data")).unwrap();
        std::fs::write(a.join("data/x.txt"), "a").unwrap();
        std::fs::write(b.join("data/x.txt"), "b").unwrap();
        std::fs::write(b.join("data/y.txt"), "b").unwrap();
        let roots = [a.clone(), b.clone()];
        assert_eq!(find_in(&roots, "data/x.txt"), Some(a.join("data/x.txt")));
        assert_eq!(find_in(&roots, "data/y.txt"), Some(b.join("data/y.txt")));
        assert_eq!(find_in(&roots, "data/z.txt"), None);
    }

    #[test]
    fn the_checkout_assets_are_always_looked_in() {
        let [_, assets] = roots();
        assert!(
            assets.join("fixtures/llama-tiny-gqa/config.json").is_file(),
            "{}",
            assets.display()
        );
    }

    #[test]
    fn a_missing_line_names_the_item_the_folders_and_the_command() {
        let roots = [PathBuf::from("/s"), PathBuf::from("/c/assets")];
        let l = missing_line("t", "data/tinyshakespeare.txt", &roots);
        assert_eq!(
            l,
            "skipped t: data/tinyshakespeare.txt not found in /s or /c/assets; get it with: \
             python3 scripts/fetch_data.py shakespeare"
        );
        assert!(!l.contains('\n'));
        for (rel, cmd) in [
            ("data/hh-harmless-pairs.jsonl", "fetch_data.py hh"),
            (
                "tokenizer/llama2/tokenizer.json",
                "fetch_data.py llama2-tokenizer",
            ),
            ("fixtures/llama-tiny-mha", "--preset llama-tiny-mha"),
            (
                "tokenizer/llama2/cases.json",
                "git checkout -- assets/tokenizer/llama2/cases.json",
            ),
        ] {
            assert!(missing_line("t", rel, &roots).contains(cmd), "{rel}");
        }
    }
}
