//! The non-attention CUDA kernels' real source, compiled for the CPU with g++ under the host
//! emulation (`kernels-cu/ops_emu.cuh`: one fiber per CUDA thread, real barriers and warp
//! shuffles) and checked against ports of `engine::ops` (`kernels-cu/ops_emu_test.cuh`). This is
//! how the kernels' indexing, vector paths, reductions and grid-stride loops are tested where no
//! GPU is at hand. Skips with a message when g++ is not installed.

use std::path::Path;
use std::process::Command;

/// Compiles `kernels-cu/<test>` for the CPU with g++ (`define` selects the emulation), runs it with
/// `args` and fails unless it exits cleanly and prints `success`. Skips without g++.
fn run_emulated(test: &str, define: &str, extra: &[&str], args: &[&str], success: &str) {
    if Command::new("g++").arg("--version").output().is_err() {
        println!("skipped: g++ not found (the emulation test compiles the kernels with it)");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let src = root.join("kernels-cu").join(test);
    let exe = std::env::temp_dir().join(format!(
        "llama2_{}_{}",
        test.trim_end_matches(".cuh"),
        std::process::id()
    ));
    let out = Command::new("g++")
        .args(["-std=c++20", "-O2"])
        .args(extra)
        .arg(define)
        .args(["-x", "c++"])
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
        .args(args)
        .output()
        .expect("running the emulation test");
    let _ = std::fs::remove_file(&exe);
    let text = String::from_utf8_lossy(&run.stdout);
    println!("{text}");
    assert!(
        run.status.success() && text.contains(success),
        "{test} failed under emulation:\n{text}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

#[test]
fn kernels_match_the_cpu_reference_under_emulation() {
    run_emulated(
        "ops_emu_test.cuh",
        "-DLLAMA2_HOST_EMU",
        &["-ffp-contract=off"],
        &[],
        " 0 failed",
    );
}

/// The launch-time signature check parses each kernel's PTX parameter list; with compiled kernels,
/// every entry point the CUDA backend launches must parse to the kinds its Rust call passes
/// (q: 64-bit, f: f32, i: i32). This mirrors the calls in engine/src/backend/cuda/ops.rs.
#[test]
fn kernel_signatures_match_the_launches() {
    use engine::backend::cuda::{module_ptx, ptx_params, KERNELS_COMPILED};
    if !KERNELS_COMPILED {
        println!("skipped: this build has no compiled kernels (nvcc was not found)");
        return;
    }
    let expect: &[(&str, &str, &str)] = &[
        ("elementwise", "add_bf16", "qqqq"),
        ("elementwise", "swiglu_fwd_bf16", "qqqq"),
        ("elementwise", "swiglu_bwd_bf16", "qqqqqq"),
        ("elementwise", "f32_to_bf16", "qqq"),
        ("elementwise", "gather_rows_bf16", "qqqqq"),
        ("elementwise", "scatter_rows_bf16", "qqqqq"),
        ("rmsnorm", "rmsnorm_fwd_bf16", "qqqqqqf"),
        ("rmsnorm", "rmsnorm_bwd_bf16", "qqqqqqqqq"),
        ("rmsnorm", "rmsnorm_dw_reduce", "qqqq"),
        ("rope", "rope_fwd_bf16", "qqqqqf"),
        ("rope", "rope_bwd_bf16", "qqqqqf"),
        ("softmax_xent", "cross_entropy_fwd_bf16", "qqqqq"),
        ("softmax_xent", "cross_entropy_bwd_bf16", "qqqqf"),
        ("softmax_xent", "logprob_fwd_bf16", "qqqqqq"),
        ("softmax_xent", "logprob_bwd_bf16", "qqqqq"),
        ("scalar_head", "scalar_head_fwd_bf16", "qqqqqq"),
        ("scalar_head", "scalar_head_bwd_bf16", "qqqqqqqq"),
        ("adamw", "adamw_f32", "qqqqqqfffffffff"),
        ("reduce", "reduce_sum_f32", "qqqi"),
        ("reduce", "reduce_finish_f64", "qqq"),
        ("embedding", "embedding_bwd_bf16", "qqqqqqq"),
    ];
    for (module, name, kinds) in expect {
        let ptx = module_ptx(module).unwrap_or_else(|| panic!("module {module} not embedded"));
        let got = ptx_params(ptx, name).unwrap_or_else(|| panic!("{module}: no entry {name}"));
        assert_eq!(
            String::from_utf8_lossy(&got),
            *kinds,
            "{module}::{name} parameter kinds"
        );
    }
}

/// The attention kernels' real source (flash forward and backward on mma.sync/ldmatrix/cp.async,
/// the fallback path and the KV-cache kernel) under the same emulation, against a double-precision
/// port of `engine::ops` attention: head_dim 64 and 128, query-head groups of 1, 2 and 4, document
/// masks with padding and one-token runs, T from 1 to 260 (`quick`: without the runs that issue
/// cp.async copies early, which the full `attention_emu_test` binary adds). Skips without g++.
#[test]
fn attention_kernels_match_the_cpu_reference_under_emulation() {
    run_emulated(
        "attention_emu_test.cuh",
        "-DATTN_HOST_EMU",
        &[],
        &["quick"],
        "all checks passed",
    );
}
