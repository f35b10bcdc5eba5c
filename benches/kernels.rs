//! Criterion benches of the CUDA kernels on Llama 2 7B shapes, timed with CUDA events (the host
//! only enqueues), reported as bytes/s (memory-bound kernels) or as elements/s of FLOPs for the
//! matmul (criterion's "elements" are FLOPs there: read Gelem/s as GFLOP/s).
//! `cargo bench --bench kernels`; without a GPU it prints why and exits.
//! The full table with ceilings and PyTorch side by side is `llama2 bench kernels`.

use criterion::{Criterion, Throughput};
use engine::backend::cuda::{self, Cuda};
use engine::Backend;
use half::bf16;
use std::time::Duration;

/// Criterion's custom timing: `iters` calls timed on the GPU.
fn gpu_time(cx: &Cuda, iters: u64, f: &mut dyn FnMut() -> engine::Result<()>) -> Duration {
    let ms = cx.time_ms(iters as usize, f).expect("kernel launch");
    Duration::from_secs_f64(ms * 1e-3 * iters as f64)
}

fn main() {
    if let Err(e) = cuda::probe_driver() {
        println!("skipped: no CUDA driver/GPU ({e})");
        return;
    }
    let cx = match Cuda::new(0) {
        Ok(c) => c,
        Err(e) => {
            println!("skipped: {e}");
            return;
        }
    };
    let mut c = Criterion::default()
        .configure_from_args()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let (n, h, im, v) = (4096usize, 4096usize, 11008usize, 32000usize);
    let x = cx.alloc::<bf16>(n * h).unwrap();
    let w = cx.upload(&vec![bf16::ONE; h]).unwrap();
    let mut y = cx.alloc::<bf16>(n * h).unwrap();
    let mut rstd = cx.alloc::<f32>(n).unwrap();
    let gate = cx.alloc::<bf16>(n * im).unwrap();
    let up = cx.alloc::<bf16>(n * im).unwrap();
    let mut hm = cx.alloc::<bf16>(n * im).unwrap();
    let logits = cx.alloc::<bf16>(n * v).unwrap();
    let targets = cx.upload(&(0..n as i32).collect::<Vec<_>>()).unwrap();
    let mut losses = cx.alloc::<f32>(n).unwrap();
    let wu = cx.alloc::<bf16>(im * h).unwrap();

    let mut g = c.benchmark_group("cuda-7b");
    g.throughput(Throughput::Bytes((3 * n * h * 2) as u64));
    g.bench_function("add [4096,4096]", |b| {
        b.iter_custom(|it| {
            gpu_time(&cx, it, &mut || {
                cx.add(Cuda::all_mut(&mut y), Cuda::all(&x), Cuda::all(&x))
            })
        })
    });
    g.throughput(Throughput::Bytes((2 * n * h * 2 + 4 * n) as u64));
    g.bench_function("rmsnorm_fwd [4096,4096]", |b| {
        b.iter_custom(|it| {
            gpu_time(&cx, it, &mut || {
                cx.rmsnorm_fwd(
                    Cuda::all_mut(&mut y),
                    Cuda::all_mut(&mut rstd),
                    Cuda::all(&x),
                    Cuda::all(&w),
                    h,
                    1e-5,
                )
            })
        })
    });
    g.throughput(Throughput::Bytes((3 * n * im * 2) as u64));
    g.bench_function("swiglu_fwd [4096,11008]", |b| {
        b.iter_custom(|it| {
            gpu_time(&cx, it, &mut || {
                cx.swiglu_fwd(Cuda::all_mut(&mut hm), Cuda::all(&gate), Cuda::all(&up))
            })
        })
    });
    g.throughput(Throughput::Bytes((n * v * 2) as u64));
    g.bench_function("cross_entropy_fwd [4096,32000]", |b| {
        b.iter_custom(|it| {
            gpu_time(&cx, it, &mut || {
                cx.cross_entropy_fwd(
                    Cuda::all_mut(&mut losses),
                    Cuda::all(&logits),
                    Cuda::all(&targets),
                    v,
                )
            })
        })
    });
    g.throughput(Throughput::Elements((2 * n * h * im) as u64));
    g.bench_function("matmul_fwd 4096x4096x11008 (elements = FLOPs)", |b| {
        b.iter_custom(|it| {
            gpu_time(&cx, it, &mut || {
                cx.matmul_fwd(
                    Cuda::all_mut(&mut hm),
                    Cuda::all(&x),
                    Cuda::all(&wu),
                    n,
                    h,
                    im,
                )
            })
        })
    });
    g.finish();
    c.final_summary();
}
