//! Every engine PTX module parses with no unsupported instruction, and every kernel's launch
//! facts agree with what the engine reads from the same PTX (`kernel_info`).

use engine::backend::cuda::{kernel_info, module_ptx, Dim3};
use gpu_sim::ptx::Module;

const MODULES: &[&str] = &[
    "adamw",
    "attention",
    "elementwise",
    "embedding",
    "reduce",
    "rmsnorm",
    "rope",
    "scalar_head",
    "softmax_xent",
];

#[test]
fn every_engine_module_parses_and_matches_kernel_info() {
    if module_ptx("rmsnorm").is_none() {
        println!("skipped: the engine was built without PTX (set NVCC and rebuild)");
        return;
    }
    let mut kernels = 0;
    for m in MODULES {
        let ptx = module_ptx(m).unwrap_or_else(|| panic!("module {m} missing"));
        let module = Module::parse(ptx).unwrap_or_else(|e| panic!("{m}.ptx: {e}"));
        let names = module.kernel_names();
        let entries = ptx.matches(".entry ").count();
        assert_eq!(names.len(), entries, "{m}: kernels found");
        for name in names {
            let k = module.kernel(&name).unwrap();
            let info = kernel_info(ptx, &name).unwrap();
            assert_eq!(
                k.params().len(),
                info.params.len(),
                "{m}::{name}: parameter count"
            );
            for (p, kind) in k.params().iter().zip(&info.params) {
                let size = match kind {
                    b'q' => 8,
                    b'f' | b'i' => 4,
                    _ => p.size,
                };
                assert_eq!(p.size, size, "{m}::{name}: parameter size");
                assert_eq!(p.offset % p.align, 0, "{m}::{name}: parameter alignment");
            }
            assert_eq!(
                k.static_smem(),
                info.static_smem,
                "{m}::{name}: static smem"
            );
            assert_eq!(
                k.max_threads(),
                info.max_threads,
                "{m}::{name}: max threads"
            );
            assert_eq!(
                k.req_ntid().map(|r| Dim3(r[0], r[1], r[2])),
                info.req_threads,
                "{m}::{name}: reqntid"
            );
            kernels += 1;
        }
    }
    assert!(kernels >= 30, "only {kernels} kernels");
}
