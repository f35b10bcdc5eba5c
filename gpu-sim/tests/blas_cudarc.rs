//! The engine's cuBLAS/cuBLASLt call sequence through cudarc 0.19.10's own bindings (dynamic
//! loading, CUDA 13.0), against the shared library as `gpu-sim run` installs it: the symbol
//! names, argument widths, enum values and the heuristic result's layout are cudarc's, not
//! this crate's, so a mismatch in any of them fails here.
//!
//! The test re-runs itself in a child process whose LD_LIBRARY_PATH finds libcuda.so,
//! libcublas.so and libcublasLt.so (links to the libgpu_sim.so cargo built next to it), as
//! `gpu-sim run` arranges; the dynamic loader reads that variable only at process start.

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublaslt::sys as lt;
use cudarc::driver::{CudaContext, DevicePtr};
use std::ffi::c_void;
use std::path::PathBuf;
use std::process::Command;

const CHILD: &str = "GPU_SIM_BLAS_CUDARC_CHILD";
const TEST: &str = "the_engine_sequence_through_cudarc_bindings";

#[test]
fn the_engine_sequence_through_cudarc_bindings() {
    if std::env::var_os(CHILD).is_some() {
        child();
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    let so = gpu_sim::shared_library_near(dir)
        .unwrap_or_else(|| panic!("libgpu_sim.so not found near {}", exe.display()));
    let lib = std::env::temp_dir().join(format!("gpu-sim-blas-cudarc-{}", std::process::id()));
    std::fs::create_dir_all(&lib).unwrap();
    for name in ["libcuda.so", "libcublas.so", "libcublasLt.so"] {
        let link: PathBuf = lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&so, &link).unwrap();
    }
    let path = match std::env::var("LD_LIBRARY_PATH") {
        Ok(p) if !p.is_empty() => format!("{}:{p}", lib.display()),
        _ => lib.display().to_string(),
    };
    let out = Command::new(&exe)
        .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env("LD_LIBRARY_PATH", path)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&lib);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child failed:\n{text}");
    assert!(
        text.contains("cudarc sequence: ok"),
        "child did not run:\n{text}"
    );
}

/// fwd as the engine computes it: out[n, o] = x[n, i] w[o, i]ᵀ, i.e. column-major
/// outᵀ (o x n) = op_T(w) (o x i) · xᵀ (i x n), first through cublasGemmEx, then through the
/// cuBLASLt descriptors, the heuristic and cublasLtMatmul over a D full of NaN.
fn child() {
    let ctx = CudaContext::new(0).unwrap();
    // SAFETY: one stream, used in order (as the engine does).
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.default_stream();
    // SAFETY: only dlopens.
    assert!(unsafe { cudarc::cublas::sys::is_culib_present() });
    // SAFETY: as above.
    assert!(unsafe { lt::is_culib_present() });
    let blas = cudarc::cublas::CudaBlas::new(stream.clone()).unwrap();

    let (n, i, o) = (5usize, 7usize, 3usize);
    // Multiples of 1/8: exact in bf16, and every sum is exact in f32.
    let x: Vec<f32> = (0..n * i)
        .map(|j| ((j * 7 % 23) as f32 - 11.0) / 8.0)
        .collect();
    let w: Vec<f32> = (0..o * i)
        .map(|j| ((j * 5 % 19) as f32 - 9.0) / 8.0)
        .collect();
    let mut want = vec![0f32; n * o];
    for r in 0..n {
        for c in 0..o {
            want[r * o + c] = (0..i).map(|p| x[r * i + p] * w[c * i + p]).sum();
        }
    }
    let bf = |v: &[f32]| -> Vec<u16> { v.iter().map(|x| (x.to_bits() >> 16) as u16).collect() };
    let dx = stream.clone_htod(&bf(&x)).unwrap();
    let dw = stream.clone_htod(&bf(&w)).unwrap();
    let dout = stream.alloc_zeros::<f32>(n * o).unwrap();
    let ws = stream.alloc_zeros::<u8>(32 << 20).unwrap();
    let (px, _gx) = dx.device_ptr(&stream);
    let (pw, _gw) = dw.device_ptr(&stream);
    let (po, _go) = dout.device_ptr(&stream);
    let (pws, _gws) = ws.device_ptr(&stream);
    let (alpha, beta) = (1f32, 0f32);
    let alpha_p = &alpha as *const f32 as *const c_void;
    let beta_p = &beta as *const f32 as *const c_void;

    // SAFETY: the buffers hold the described matrices; alpha/beta are host f32s.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *blas.handle(),
            cublasOperation_t::CUBLAS_OP_T,
            cublasOperation_t::CUBLAS_OP_N,
            o as i32,
            n as i32,
            i as i32,
            alpha_p,
            pw as *const c_void,
            cudaDataType::CUDA_R_16BF,
            i as i32,
            px as *const c_void,
            cudaDataType::CUDA_R_16BF,
            i as i32,
            beta_p,
            po as *mut c_void,
            cudaDataType::CUDA_R_32F,
            o as i32,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .unwrap();
    assert_eq!(stream.clone_dtoh(&dout).unwrap(), want, "cublasGemmEx");

    use cudarc::cublaslt::result as r;
    let h = r::create_handle().unwrap();
    let desc = r::create_matmul_desc(
        lt::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        lt::cudaDataType::CUDA_R_32F,
    )
    .unwrap();
    use lt::cublasLtMatmulDescAttributes_t::{
        CUBLASLT_MATMUL_DESC_TRANSA, CUBLASLT_MATMUL_DESC_TRANSB,
    };
    for (attr, v) in [
        (
            CUBLASLT_MATMUL_DESC_TRANSA,
            cublasOperation_t::CUBLAS_OP_T as i32,
        ),
        (
            CUBLASLT_MATMUL_DESC_TRANSB,
            cublasOperation_t::CUBLAS_OP_N as i32,
        ),
    ] {
        // SAFETY: an i32 attribute of the size passed.
        unsafe { r::set_matmul_desc_attribute(desc, attr, &v as *const i32 as *const c_void, 4) }
            .unwrap();
    }
    let layout = |ty, rows: u64, cols: u64, ld: i64| {
        let l = r::create_matrix_layout(ty, rows, cols, ld).unwrap();
        let order = lt::cublasLtOrder_t::CUBLASLT_ORDER_COL as i32;
        let attr = lt::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_ORDER;
        // SAFETY: an i32 attribute of the size passed.
        unsafe {
            r::set_matrix_layout_attribute(l, attr, &order as *const i32 as *const c_void, 4)
        }
        .unwrap();
        l
    };
    let la = layout(lt::cudaDataType::CUDA_R_16BF, i as u64, o as u64, i as i64);
    let lb = layout(lt::cudaDataType::CUDA_R_16BF, i as u64, n as u64, i as i64);
    let lc = layout(lt::cudaDataType::CUDA_R_32F, o as u64, n as u64, o as i64);
    let pref = r::create_matmul_pref().unwrap();
    use lt::cublasLtMatmulPreferenceAttributes_t as P;
    let max_ws = 32u64 << 20;
    // SAFETY: a u64 attribute of the size passed.
    unsafe {
        r::set_matmul_pref_attribute(
            pref,
            P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &max_ws as *const u64 as *const c_void,
            8,
        )
    }
    .unwrap();
    for a in [
        P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
        P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
        P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
    ] {
        let v = 256u32;
        // SAFETY: a u32 attribute of the size passed.
        unsafe { r::set_matmul_pref_attribute(pref, a, &v as *const u32 as *const c_void, 4) }
            .unwrap();
    }
    let mut result = std::mem::MaybeUninit::<lt::cublasLtMatmulHeuristicResult_t>::zeroed();
    let mut count = 0;
    // SAFETY: live descriptors; room for one result.
    let s = unsafe {
        lt::cublasLtMatmulAlgoGetHeuristic(
            h,
            desc,
            la,
            lb,
            lc,
            lc,
            pref,
            1,
            result.as_mut_ptr(),
            &mut count,
        )
    };
    assert_eq!(s, lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS);
    // SAFETY: zeroed, then written by the call.
    let result = unsafe { result.assume_init() };
    assert_eq!(count, 1);
    assert_eq!(result.state, lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS);
    assert!(result.workspaceSize <= max_ws as usize);

    let nan = vec![f32::NAN; n * o];
    // SAFETY: `po` holds n * o f32.
    unsafe { cudarc::driver::result::memcpy_htod_sync(po, &nan) }.unwrap();
    let matmul = |ws_bytes: usize| {
        // SAFETY: as the engine's call: live descriptors built for these buffers, C = D in
        // place with one layout, host alpha/beta, the workspace on this stream.
        unsafe {
            lt::cublasLtMatmul(
                h,
                desc,
                alpha_p,
                pw as *const c_void,
                la,
                px as *const c_void,
                lb,
                beta_p,
                po as *const c_void,
                lc,
                po as *mut c_void,
                lc,
                &result.algo,
                pws as *mut c_void,
                ws_bytes,
                stream.cu_stream() as lt::cudaStream_t,
            )
        }
    };
    assert_eq!(matmul(32 << 20), lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS);
    assert_eq!(stream.clone_dtoh(&dout).unwrap(), want, "cublasLtMatmul");
    if result.workspaceSize > 0 {
        assert_eq!(
            matmul(result.workspaceSize - 1),
            lt::cublasStatus_t::CUBLAS_STATUS_INVALID_VALUE
        );
    }
    // SAFETY: each destroyed once, after its last use.
    unsafe {
        r::destroy_matmul_pref(pref).unwrap();
        for l in [la, lb, lc] {
            r::destroy_matrix_layout(l).unwrap();
        }
        r::destroy_matmul_desc(desc).unwrap();
        r::destroy_handle(h).unwrap();
    }
    drop(blas);
    println!("cudarc sequence: ok");
}
