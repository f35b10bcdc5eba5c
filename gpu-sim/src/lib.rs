//! gpu-sim: the engine's whole CUDA path on a CPU.
//!
//! One shared library exports the C symbols the engine reaches through cudarc (the driver API,
//! cuBLAS, cuBLASLt and NCCL); `gpu-sim run` installs it under the four names cudarc opens and
//! puts it first on `LD_LIBRARY_PATH`, so the production code path runs unmodified. Kernels are
//! the module's real PTX, parsed and executed warp by warp ([`ptx`]), with compute-sanitizer's
//! memcheck, synccheck and racecheck; device memory lives in host memory at addresses no host
//! pointer has ([`mem`]).

pub mod blas;
pub mod driver;
pub mod mem;
pub mod nccl;
pub mod ptx;
pub mod runtime;

/// The simulator's shared library built beside `dir` (an executable's directory): cargo leaves
/// it in `target/<profile>/` for `cargo build` and only in `target/<profile>/deps/` when a test
/// build needed it, so both are looked at.
pub fn shared_library_near(dir: &std::path::Path) -> Option<std::path::PathBuf> {
    [
        dir.join("libgpu_sim.so"),
        dir.join("deps/libgpu_sim.so"),
        dir.join("../libgpu_sim.so"),
    ]
    .into_iter()
    .find(|p| p.exists())
}
