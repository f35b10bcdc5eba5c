//! Interpreter speed on the engine's real kernels: warp-instructions per second per core.
//!
//! `cargo run --release -p gpu-sim --example ptx_bench [threads]` (default 1 thread, so the
//! rate is per core). memcheck and synccheck are always on; racecheck off, then on for
//! attention forward.

#[path = "../tests/common/mod.rs"]
mod common;
use common::*;
use std::time::Instant;

/// CPU seconds used by the whole process (all threads): the machine may be shared, so the
/// per-core rate is measured against CPU time, not wall time.
fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// The best of three runs (the machine may be busy with other work). `PTX_BENCH=name` runs
/// only the kernels whose name contains it.
fn report(name: &str, threads: usize, f: impl Fn() -> gpu_sim::ptx::LaunchStats) {
    if std::env::var("PTX_BENCH").is_ok_and(|f| !name.contains(f.as_str())) {
        return;
    }
    let (mut s, mut c) = (f64::MAX, f64::MAX);
    let mut st = f();
    for _ in 0..3 {
        let (t0, c0) = (Instant::now(), cpu_seconds());
        st = f();
        s = s.min(t0.elapsed().as_secs_f64());
        c = c.min(cpu_seconds() - c0);
    }
    println!(
        "{name:<34} {:>10} warp-instr {:>7.3} s wall {:>7.3} s cpu {:>6.2} M warp-instr/s/core",
        st.warp_instructions,
        s,
        c,
        st.warp_instructions as f64 / c / 1e6
    );
    let _ = threads;
}

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .unwrap();
    if engine::backend::cuda::module_ptx("attention").is_none() {
        println!("the engine was built without PTX: set NVCC and rebuild");
        return;
    }
    println!("{threads} thread(s); memcheck + synccheck on, racecheck off unless noted");
    let dev = Dev::new();
    let (b, t, nh, nkv) = (2usize, 260usize, 8usize, 2usize);
    for hd in [64usize, 128] {
        let q = rand_vec(b * t * nh * hd, 1);
        let k = rand_vec(b * t * nkv * hd, 2);
        let v = rand_vec(b * t * nkv * hd, 3);
        let dout = rand_vec(b * t * nh * hd, 4);
        let (pq, pk, pv, pdo) = (dev.bf16(&q), dev.bf16(&k), dev.bf16(&v), dev.bf16(&dout));
        let (po, pl) = (dev.alloc(q.len() * 2), dev.alloc(b * t * nh * 4));
        let scale = f(1.0 / (hd as f32).sqrt());
        let ld = hd + 8;
        let fsm = (64 * ld * 2 + 4 * 64 * ld * 2 + 2 * 64 * 4) as u32;
        let fwd = kernel("attention", &format!("attention_fwd_bf16_hd{hd}")).unwrap();
        let fargs = [
            po, pl, pq, pk, pv, 0, b as u64, t as u64, nh as u64, nkv as u64, scale,
        ];
        let fgrid = [t.div_ceil(64) as u32, nh as u32, b as u32];
        for race in [false, true] {
            report(
                &format!(
                    "attention_fwd hd{hd}{}",
                    if race { " (racecheck)" } else { "" }
                ),
                threads,
                || {
                    dev.launch(&fwd, fgrid, [128, 1, 1], fsm, &fargs, race)
                        .unwrap()
                },
            );
        }
        let rows = b * t * nh;
        let pd = dev.alloc(rows * 4);
        let pre = kernel("attention", "attention_bwd_preprocess_bf16").unwrap();
        dev.launch(
            &pre,
            [rows.div_ceil(8) as u32, 1, 1],
            [256, 1, 1],
            0,
            &[pd, pdo, po, rows as u64, hd as u64],
            false,
        )
        .unwrap();
        let acc = dev.zeros(q.len() * 4);
        let (pdk, pdv) = (dev.alloc(k.len() * 2), dev.alloc(k.len() * 2));
        let bm = if hd >= 128 { 32 } else { 64 };
        let bsm =
            (2 * 128 * ld * 2 + 4 * bm * ld * 2 + 128 * (bm + 8) * 2 + 3 * 2 * bm * 4 + 128 * 4)
                as u32;
        let bwd = kernel("attention", &format!("attention_bwd_bf16_hd{hd}")).unwrap();
        report(&format!("attention_bwd hd{hd}"), threads, || {
            dev.launch(
                &bwd,
                [t.div_ceil(128) as u32, nkv as u32, b as u32],
                [256, 1, 1],
                bsm,
                &[
                    acc, pdk, pdv, pdo, pq, pk, pv, pl, pd, 0, b as u64, t as u64, nh as u64,
                    nkv as u64, scale,
                ],
                false,
            )
            .unwrap()
        });
    }
    {
        let (rows, h) = (520usize, 2048usize);
        let x = rand_vec(rows * h, 5);
        let w = rand_vec(h, 6);
        let (px, pw, po, pr) = (
            dev.bf16(&x),
            dev.bf16(&w),
            dev.alloc(rows * h * 2),
            dev.alloc(rows * 4),
        );
        let k = kernel("rmsnorm", "rmsnorm_fwd_bf16").unwrap();
        report("rmsnorm_fwd (520 x 2048)", threads, || {
            dev.launch(
                &k,
                [rows as u32, 1, 1],
                [256, 1, 1],
                0,
                &[po, pr, px, pw, rows as u64, h as u64, f(1e-5)],
                false,
            )
            .unwrap()
        });
    }
    {
        let (n, v) = (64usize, 32000usize);
        let logits = rand_vec(n * v, 7);
        let targets: Vec<i32> = (0..n as i32).map(|i| i * 97 % v as i32).collect();
        let (pl, pt, po) = (dev.bf16(&logits), dev.i32(&targets), dev.alloc(n * 4));
        let k = kernel("softmax_xent", "cross_entropy_fwd_bf16").unwrap();
        report("cross_entropy_fwd (64 x 32000)", threads, || {
            dev.launch(
                &k,
                [n as u32, 1, 1],
                [1024, 1, 1],
                0,
                &[po, pl, pt, n as u64, v as u64],
                false,
            )
            .unwrap()
        });
    }
}
