//! The engine's build script: compiles every `kernels-cu/*.cu` to PTX with nvcc and embeds it.
//!
//! nvcc is looked up in `$NVCC`, `$CUDA_HOME/bin`, `$CUDA_PATH/bin`, `PATH`, `/usr/local/cuda/bin`,
//! then a pip-installed toolkit (`<site-packages>/nvidia/cu13/bin/nvcc`) in `$LLAMA2_CUDA_VENV`,
//! `$VIRTUAL_ENV` or python3's site directories. Without nvcc the crate still builds (one
//! `cargo:warning`); the CUDA backend then reports at run time that kernels were not compiled.
//! With nvcc, a compile error in any `.cu` fails the build.
//!
//! Output: `$OUT_DIR/<name>.ptx` per kernel file and `$OUT_DIR/ptx_registry.rs`, which defines
//! `PTX: &[(&str, &str)]` (module name, PTX text) and `PTX_SM90A` (the same for files that ask for
//! a Hopper-only build), and the cfg `llama2_ptx` when kernels were compiled.
//!
//! Per-file switches, as comment lines anywhere in a `.cu` file:
//! - `// ptx-build: fast-math` compiles that file with `--use_fast_math` (only where the
//!   approximate exp/div/sqrt are within the kernel's tolerance);
//! - `// ptx-build: sm_90a` also builds a `compute_90a` variant, which the runtime loads instead
//!   on compute capability 9.0 devices (wgmma, TMA and other Hopper-only instructions).

use std::path::{Path, PathBuf};
use std::process::Command;

const ENV_VARS: &[&str] = &[
    "NVCC",
    "CUDA_HOME",
    "CUDA_PATH",
    "CUDA_COMPUTE_CAP",
    "LLAMA2_CUDA_VENV",
    "VIRTUAL_ENV",
    "PATH",
];

fn main() {
    println!("cargo::rustc-check-cfg=cfg(llama2_ptx)");
    for v in ENV_VARS {
        println!("cargo:rerun-if-env-changed={v}");
    }
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let kdir = manifest.join("../kernels-cu");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    println!("cargo:rerun-if-changed={}", kdir.display());

    let mut sources: Vec<PathBuf> = std::fs::read_dir(&kdir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    sources.sort();
    for p in &sources {
        if matches!(ext(p), "cu" | "cuh") {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    }
    let cu: Vec<PathBuf> = sources.into_iter().filter(|p| ext(p) == "cu").collect();

    let registry = out.join("ptx_registry.rs");
    let nvcc = match find_nvcc() {
        Some(n) => n,
        None => {
            println!(
                "cargo:warning=nvcc not found: the CUDA kernels are not compiled (the CPU backend \
                 is unaffected). Set NVCC=/path/to/nvcc or CUDA_HOME, or pip install \
                 nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
                 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 into $LLAMA2_CUDA_VENV, \
                 then rebuild."
            );
            write_registry(&registry, &[], &[]);
            return;
        }
    };
    let arch = compute_arch();

    // One nvcc per file, in parallel (nvcc is single-threaded).
    let jobs: Vec<(String, PathBuf, PathBuf, Vec<String>)> = cu
        .iter()
        .flat_map(|src| {
            let name = src.file_stem().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(src).unwrap_or_default();
            let fast = text.lines().any(|l| l.trim() == "// ptx-build: fast-math");
            let sm90a = text.lines().any(|l| l.trim() == "// ptx-build: sm_90a");
            let mut flags = vec![
                "-ptx".to_string(),
                "-O3".into(),
                "-std=c++17".into(),
                "-lineinfo".into(),
                format!("-I{}", kdir.display()),
            ];
            if fast {
                flags.push("--use_fast_math".into());
            }
            let mut v = vec![(
                name.clone(),
                src.clone(),
                out.join(format!("{name}.ptx")),
                [flags.clone(), vec![format!("-arch={arch}")]].concat(),
            )];
            if sm90a {
                v.push((
                    name.clone(),
                    src.clone(),
                    out.join(format!("{name}.sm90a.ptx")),
                    [flags, vec!["-arch=compute_90a".into()]].concat(),
                ));
            }
            v
        })
        .collect();
    let results: Vec<(String, PathBuf, Result<(), String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|(name, src, dst, flags)| {
                let nvcc = &nvcc;
                s.spawn(move || {
                    let r = Command::new(nvcc)
                        .args(flags)
                        .arg(src)
                        .arg("-o")
                        .arg(dst)
                        .output();
                    let r = match r {
                        Ok(o) if o.status.success() => Ok(()),
                        Ok(o) => Err(format!(
                            "{}{}",
                            String::from_utf8_lossy(&o.stdout),
                            String::from_utf8_lossy(&o.stderr)
                        )),
                        Err(e) => Err(format!("cannot run {}: {e}", nvcc.display())),
                    };
                    (name.clone(), dst.clone(), r)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut failed = Vec::new();
    for (name, _, r) in &results {
        if let Err(e) = r {
            failed.push(format!("kernels-cu/{name}.cu:\n{e}"));
        }
    }
    if !failed.is_empty() {
        panic!(
            "nvcc ({}) failed to compile the CUDA kernels:\n{}",
            nvcc.display(),
            failed.join("\n")
        );
    }
    let mut base = Vec::new();
    let mut hopper = Vec::new();
    for (name, dst, _) in results {
        if dst.to_string_lossy().ends_with(".sm90a.ptx") {
            hopper.push((name, dst));
        } else {
            base.push((name, dst));
        }
    }
    write_registry(&registry, &base, &hopper);
    println!("cargo:rustc-cfg=llama2_ptx");
}

fn ext(p: &Path) -> &str {
    p.extension().and_then(|e| e.to_str()).unwrap_or("")
}

fn write_registry(path: &Path, base: &[(String, PathBuf)], hopper: &[(String, PathBuf)]) {
    let list = |v: &[(String, PathBuf)]| {
        v.iter()
            .map(|(n, p)| {
                format!(
                    "    ({n:?}, include_str!({:?})),\n",
                    p.display().to_string()
                )
            })
            .collect::<String>()
    };
    let text = format!(
        "// Generated by ptx-build.rs: one (module name, PTX) entry per kernels-cu/*.cu.\n\
         pub static PTX: &[(&str, &str)] = &[\n{}];\n\
         /// compute_90a variants of the files that ask for one (`// ptx-build: sm_90a`).\n\
         pub static PTX_SM90A: &[(&str, &str)] = &[\n{}];\n",
        list(base),
        list(hopper)
    );
    std::fs::write(path, text).expect("writing ptx_registry.rs");
}

/// `CUDA_COMPUTE_CAP` as `90`, `9.0` or `sm_90`/`compute_90`; default compute_80 PTX, which the
/// driver JIT-compiles for A100, H100 and H200.
fn compute_arch() -> String {
    match std::env::var("CUDA_COMPUTE_CAP") {
        Ok(v) if !v.trim().is_empty() => {
            let digits: String = v
                .trim()
                .trim_start_matches("compute_")
                .trim_start_matches("sm_")
                .chars()
                .filter(|c| c.is_ascii_alphanumeric())
                .collect();
            if !digits.starts_with(|c: char| c.is_ascii_digit()) {
                panic!("CUDA_COMPUTE_CAP={v}: expected e.g. 80, 9.0 or sm_90");
            }
            format!("compute_{digits}")
        }
        _ => "compute_80".into(),
    }
}

fn is_file(p: &Path) -> bool {
    p.is_file()
}

fn find_nvcc() -> Option<PathBuf> {
    let exe = if cfg!(windows) { "nvcc.exe" } else { "nvcc" };
    if let Some(v) = std::env::var_os("NVCC").filter(|v| !v.is_empty()) {
        let p = PathBuf::from(&v);
        if is_file(&p) {
            return Some(p);
        }
        panic!("NVCC={} does not exist", p.display());
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(h) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            let p = PathBuf::from(h).join("bin").join(exe);
            if is_file(&p) {
                return Some(p);
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            let p = d.join(exe);
            if is_file(&p) {
                return Some(p);
            }
        }
    }
    let p = PathBuf::from("/usr/local/cuda/bin").join(exe);
    if is_file(&p) {
        return Some(p);
    }
    // pip-installed toolkits: <venv>/lib/python3.X/site-packages/nvidia/cu13/bin/nvcc.
    for var in ["LLAMA2_CUDA_VENV", "VIRTUAL_ENV"] {
        if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            let lib = PathBuf::from(v).join("lib");
            if let Ok(rd) = std::fs::read_dir(&lib) {
                for e in rd.flatten() {
                    let p = e.path().join("site-packages/nvidia/cu13/bin").join(exe);
                    if is_file(&p) {
                        return Some(p);
                    }
                }
            }
        }
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import site,sys;print('\\n'.join(site.getsitepackages()+[site.getusersitepackages()]))",
        ])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|d| PathBuf::from(d.trim()).join("nvidia/cu13/bin").join(exe))
        .find(|p| is_file(p))
}
