//! Helpers shared by the root package's integration tests (`mod common;` in each test file).
#![allow(dead_code)]

use std::path::PathBuf;

/// The shared assets directory (fixtures, tokenizer, data): `$LLAMA2_SHARED` if set, else
/// `../shared` next to this repository. Panics with instructions when it is missing, since CI
/// always provides it.
pub fn shared_dir() -> PathBuf {
    let dir = match std::env::var_os("LLAMA2_SHARED") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"),
    };
    if !dir.is_dir() {
        panic!(
            "shared assets directory {} not found: set LLAMA2_SHARED to the directory holding \
             fixtures/ and tokenizer/",
            dir.display()
        );
    }
    dir
}

/// A path under the shared directory that must exist.
pub fn shared(rel: &str) -> PathBuf {
    let p = shared_dir().join(rel);
    assert!(
        p.exists(),
        "{} is missing from the shared assets (set LLAMA2_SHARED to a complete copy)",
        p.display()
    );
    p
}

/// The Llama 2 tokenizer.json from the shared assets.
pub fn tokenizer_json() -> PathBuf {
    shared("tokenizer/llama2/tokenizer.json")
}

/// A reference fixture directory by name, e.g. `llama-tiny-gqa`.
pub fn fixture(name: &str) -> PathBuf {
    shared(&format!("fixtures/{name}"))
}
