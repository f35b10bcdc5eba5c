//! The non-attention CUDA kernels' real source, compiled for the CPU with g++ under the host
//! emulation (`kernels-cu/ops_emu.cuh`: one fiber per CUDA thread, real barriers and warp
//! shuffles) and checked against ports of `engine::ops` (`kernels-cu/ops_emu_test.cuh`). This is
//! how the kernels' indexing, vector paths, reductions and grid-stride loops are tested where no
//! GPU is at hand. Skips with a message when g++ is not installed.

use std::path::Path;
use std::process::Command;

#[test]
fn kernels_match_the_cpu_reference_under_emulation() {
    if Command::new("g++").arg("--version").output().is_err() {
        println!("skipped: g++ not found (the emulation test compiles the kernels with it)");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let src = root.join("kernels-cu/ops_emu_test.cuh");
    let exe = std::env::temp_dir().join(format!("llama2_ops_emu_{}", std::process::id()));
    let out = Command::new("g++")
        .args([
            "-std=c++20",
            "-O2",
            "-ffp-contract=off",
            "-DLLAMA2_HOST_EMU",
            "-x",
            "c++",
        ])
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("running g++");
    assert!(
        out.status.success(),
        "compiling {} failed:\n{}",
        src.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe)
        .output()
        .expect("running the emulation test");
    let _ = std::fs::remove_file(&exe);
    let text = String::from_utf8_lossy(&run.stdout);
    println!("{text}");
    assert!(
        run.status.success(),
        "kernel emulation test failed:\n{text}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
}
