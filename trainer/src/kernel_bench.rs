//! `llama2 bench kernels`: each CUDA kernel's time on Llama 2 shapes, its achieved GB/s or
//! TFLOP/s, and the fraction of two ceilings measured in the same run: a device-to-device copy's
//! bandwidth (memory-bound kernels) and a cuBLAS bf16 GEMM's TFLOP/s (matmuls, attention).
//! With `--vs-torch`, PyTorch's equivalents on the same shapes (`scripts/torch_kernel_bench.py`)
//! and our time over theirs.
//!
//! Bytes are the minimum each kernel must move (every input read once, every output written
//! once), as the header comment of each `.cu` file states; FLOPs count 2 per multiply-add, with
//! causal attention counting the half of the score matrix it computes.

use anyhow::{bail, Context, Result};
use engine::backend::cuda::Cuda;
use engine::backend::{AdamWStep, AttnDims};
use engine::Backend;
use half::bf16;
use serde::Serialize;
use std::path::Path;

/// One benchmark configuration: a model's shapes and the tokens of one micro-batch.
#[derive(Clone, Debug, Serialize)]
pub struct Shapes {
    pub name: String,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub batch: usize,
    pub seq: usize,
}

impl Shapes {
    /// Llama 2 7B (MHA) at its 4096-token context, one sequence.
    pub fn llama2_7b() -> Shapes {
        Shapes {
            name: "7b".into(),
            hidden: 4096,
            heads: 32,
            kv_heads: 32,
            head_dim: 128,
            ffn: 11008,
            vocab: 32000,
            batch: 1,
            seq: 4096,
        }
    }
    /// A ~1.1B Llama (TinyLlama's shape: 2048 wide, 32 heads of 64 over 4 KV heads, GQA).
    pub fn llama_1b() -> Shapes {
        Shapes {
            name: "1b".into(),
            hidden: 2048,
            heads: 32,
            kv_heads: 4,
            head_dim: 64,
            ffn: 5632,
            vocab: 32000,
            batch: 2,
            seq: 2048,
        }
    }
    fn tokens(&self) -> usize {
        self.batch * self.seq
    }
    /// Parameters of one transformer block (the AdamW and gradient-norm run).
    fn layer_params(&self) -> usize {
        let (h, q, kv) = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
        );
        h * q + 2 * h * kv + q * h + 3 * h * self.ffn + 2 * h
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub config: String,
    pub kernel: String,
    pub shape: String,
    pub ms: f64,
    /// Minimum bytes moved (memory-bound kernels), else 0.
    pub bytes: f64,
    /// FLOPs (compute-bound kernels), else 0.
    pub flops: f64,
    pub gb_per_s: Option<f64>,
    pub tflop_per_s: Option<f64>,
    /// Achieved over the same run's ceiling (copy bandwidth or GEMM TFLOP/s).
    pub fraction_of_ceiling: f64,
    pub torch_ms: Option<f64>,
    /// Our time over PyTorch's (below 1: we are faster).
    pub ours_over_torch: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub device: String,
    /// Device-to-device copy: (read + written bytes) / s.
    pub copy_gb_per_s: f64,
    /// cuBLAS bf16 GEMM (8192³, f32 accumulation).
    pub gemm_tflop_per_s: f64,
    pub rows: Vec<Row>,
    pub torch_device: Option<String>,
    pub torch_error: Option<String>,
}

pub struct Config {
    pub shapes: Vec<Shapes>,
    pub reps: usize,
    pub vs_torch: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            shapes: vec![Shapes::llama2_7b(), Shapes::llama_1b()],
            reps: 20,
            vs_torch: false,
        }
    }
}

fn zeros16(cx: &Cuda, len: usize) -> Result<engine::backend::cuda::DBuf<bf16>> {
    Ok(cx.alloc::<bf16>(len)?)
}

/// Bytes per second of a device-to-device copy of 1 GiB, counting read and write.
pub fn copy_gbps(cx: &Cuda) -> Result<f64> {
    let n = 1usize << 29; // bf16 elements: 1 GiB
    let src = zeros16(cx, n)?;
    let mut dst = zeros16(cx, n)?;
    let ms = cx.time_ms(10, || cx.copy(Cuda::all_mut(&mut dst), Cuda::all(&src)))?;
    Ok(2.0 * (n * 2) as f64 / (ms * 1e-3) / 1e9)
}

/// TFLOP/s of a bf16 m = n = k = 8192 GEMM through cuBLAS.
pub fn gemm_tflops(cx: &Cuda) -> Result<f64> {
    let s = 8192;
    let a = zeros16(cx, s * s)?;
    let b = zeros16(cx, s * s)?;
    let mut c = zeros16(cx, s * s)?;
    let ms = cx.time_ms(10, || {
        cx.matmul_fwd(Cuda::all_mut(&mut c), Cuda::all(&a), Cuda::all(&b), s, s, s)
    })?;
    Ok(2.0 * (s as f64).powi(3) / (ms * 1e-3) / 1e12)
}

struct Case {
    kernel: &'static str,
    shape: String,
    bytes: f64,
    flops: f64,
    ms: f64,
}

/// Times every kernel on one configuration.
fn bench_shapes(cx: &Cuda, s: &Shapes, reps: usize) -> Result<Vec<Case>> {
    let n = s.tokens();
    let (h, im, v) = (s.hidden, s.ffn, s.vocab);
    let (qd, kvd) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    let mut out = Vec::new();
    let mut push = |kernel, shape: String, bytes: f64, flops: f64, ms: f64| {
        out.push(Case {
            kernel,
            shape,
            bytes,
            flops,
            ms,
        })
    };
    let t = |f: &mut dyn FnMut() -> engine::Result<()>| cx.time_ms(reps, f);

    // Activations (bf16) sized for the largest use.
    let x = zeros16(cx, n * h)?;
    let w = cx.upload(&vec![bf16::ONE; h])?;
    let mut y = zeros16(cx, n * h)?;
    let mut dx = zeros16(cx, n * h)?;
    let mut rstd = cx.alloc::<f32>(n)?;
    let mut dw = cx.alloc::<f32>(h)?;
    let sh = format!("[{n}, {h}]");
    let nh2 = (n * h * 2) as f64;

    let ms = t(&mut || cx.add(Cuda::all_mut(&mut y), Cuda::all(&x), Cuda::all(&dx)))?;
    push("add (residual)", sh.clone(), 3.0 * nh2, 0.0, ms);
    let ms = t(&mut || {
        cx.rmsnorm_fwd(
            Cuda::all_mut(&mut y),
            Cuda::all_mut(&mut rstd),
            Cuda::all(&x),
            Cuda::all(&w),
            h,
            1e-5,
        )
    })?;
    push(
        "rmsnorm_fwd",
        sh.clone(),
        2.0 * nh2 + 4.0 * n as f64,
        0.0,
        ms,
    );
    let ms = t(&mut || {
        cx.rmsnorm_bwd(
            Cuda::all_mut(&mut dx),
            Cuda::all_mut(&mut dw),
            Cuda::all(&y),
            Cuda::all(&x),
            Cuda::all(&w),
            Cuda::all(&rstd),
            h,
        )
    })?;
    push("rmsnorm_bwd (+residual)", sh.clone(), 4.0 * nh2, 0.0, ms);

    let ids: Vec<i32> = (0..n).map(|i| ((i * 7919) % v) as i32).collect();
    let pos: Vec<i32> = (0..n).map(|i| (i % s.seq) as i32).collect();
    let dids = cx.upload(&ids)?;
    let dpos = cx.upload(&pos)?;
    let wte = zeros16(cx, v * h)?;
    let mut dwte = cx.alloc::<f32>(v * h)?;
    let ms =
        t(&mut || cx.embedding_fwd(Cuda::all_mut(&mut y), Cuda::all(&dids), Cuda::all(&wte), h))?;
    push("embedding_fwd", sh.clone(), 2.0 * nh2, 0.0, ms);
    let ms = t(&mut || {
        cx.embedding_bwd(
            Cuda::all_mut(&mut dwte),
            Cuda::all(&x),
            Cuda::all(&dids),
            &ids,
            h,
        )
    })?;
    push(
        "embedding_bwd",
        sh.clone(),
        nh2 + 8.0 * (n.min(v) * h) as f64,
        0.0,
        ms,
    );
    drop((wte, dwte));

    let mut q = zeros16(cx, n * qd)?;
    let ms = t(&mut || {
        cx.rope_fwd(
            Cuda::all_mut(&mut q),
            Cuda::all(&dpos),
            s.heads,
            s.head_dim,
            10000.0,
        )
    })?;
    push(
        "rope_fwd (q)",
        format!("[{n}, {}, {}]", s.heads, s.head_dim),
        (4 * n * qd) as f64,
        0.0,
        ms,
    );

    let gate = zeros16(cx, n * im)?;
    let up = zeros16(cx, n * im)?;
    let mut hm = zeros16(cx, n * im)?;
    let mut dg = zeros16(cx, n * im)?;
    let mut du = zeros16(cx, n * im)?;
    let shf = format!("[{n}, {im}]");
    let ni2 = (n * im * 2) as f64;
    let ms = t(&mut || cx.swiglu_fwd(Cuda::all_mut(&mut hm), Cuda::all(&gate), Cuda::all(&up)))?;
    push("swiglu_fwd", shf.clone(), 3.0 * ni2, 0.0, ms);
    let ms = t(&mut || {
        cx.swiglu_bwd(
            Cuda::all_mut(&mut dg),
            Cuda::all_mut(&mut du),
            Cuda::all(&hm),
            Cuda::all(&gate),
            Cuda::all(&up),
        )
    })?;
    push("swiglu_bwd", shf.clone(), 5.0 * ni2, 0.0, ms);

    // Matmuls: the MLP's up projection, forward and both backward products.
    let wu = zeros16(cx, im * h)?;
    let mut dwu = cx.alloc::<f32>(im * h)?;
    let fl = 2.0 * (n * h * im) as f64;
    let shm = format!("[{n}, {h}] x [{im}, {h}]");
    let ms = t(&mut || {
        cx.matmul_fwd(
            Cuda::all_mut(&mut hm),
            Cuda::all(&x),
            Cuda::all(&wu),
            n,
            h,
            im,
        )
    })?;
    push("matmul_fwd (up)", shm.clone(), 0.0, fl, ms);
    let ms = t(&mut || {
        cx.matmul_bwd_data(
            Cuda::all_mut(&mut dx),
            Cuda::all(&hm),
            Cuda::all(&wu),
            n,
            h,
            im,
            false,
        )
    })?;
    push("matmul_bwd_data (up)", shm.clone(), 0.0, fl, ms);
    let ms = t(&mut || {
        cx.matmul_bwd_weight(
            Cuda::all_mut(&mut dwu),
            Cuda::all(&hm),
            Cuda::all(&x),
            n,
            h,
            im,
        )
    })?;
    push("matmul_bwd_weight (up)", shm, 0.0, fl, ms);
    drop((gate, up, hm, dg, du, wu, dwu));

    // Attention (causal, no document mask).
    let d = AttnDims {
        b: s.batch,
        t: s.seq,
        nh: s.heads,
        nkv: s.kv_heads,
        hd: s.head_dim,
    };
    let k = zeros16(cx, n * kvd)?;
    let vv = zeros16(cx, n * kvd)?;
    let mut o = zeros16(cx, n * qd)?;
    let mut lse = cx.alloc::<f32>(n * s.heads)?;
    let mut dq = zeros16(cx, n * qd)?;
    let mut dk = zeros16(cx, n * kvd)?;
    let mut dv = zeros16(cx, n * kvd)?;
    let att_fl =
        4.0 * (s.batch * s.heads * s.head_dim) as f64 * (s.seq as f64 * s.seq as f64) / 2.0;
    let sha = format!(
        "b {} t {} {}q/{}kv hd {}",
        s.batch, s.seq, s.heads, s.kv_heads, s.head_dim
    );
    let ms = t(&mut || {
        cx.attention_fwd(
            Cuda::all_mut(&mut o),
            Cuda::all_mut(&mut lse),
            Cuda::all(&q),
            Cuda::all(&k),
            Cuda::all(&vv),
            None,
            d,
        )
    })?;
    push("attention_fwd", sha.clone(), 0.0, att_fl, ms);
    let ms = t(&mut || {
        cx.attention_bwd(
            Cuda::all_mut(&mut dq),
            Cuda::all_mut(&mut dk),
            Cuda::all_mut(&mut dv),
            Cuda::all(&o),
            Cuda::all(&q),
            Cuda::all(&k),
            Cuda::all(&vv),
            Cuda::all(&o),
            Cuda::all(&lse),
            None,
            d,
        )
    })?;
    push("attention_bwd", sha, 0.0, 2.5 * att_fl, ms);
    drop((q, k, vv, o, lse, dq, dk, dv));

    // Cross-entropy over the vocabulary (the logits are the largest activation).
    let mut logits = zeros16(cx, n * v)?;
    let targets: Vec<i32> = (0..n).map(|i| ((i * 31) % v) as i32).collect();
    let dt = cx.upload(&targets)?;
    let mut losses = cx.alloc::<f32>(n)?;
    let shv = format!("[{n}, {v}]");
    let nv2 = (n * v * 2) as f64;
    let ms = t(&mut || {
        cx.cross_entropy_fwd(
            Cuda::all_mut(&mut losses),
            Cuda::all(&logits),
            Cuda::all(&dt),
            v,
        )
    })?;
    push("cross_entropy_fwd", shv.clone(), nv2, 0.0, ms);
    // In place: each call turns the logits into gradients; the values do not matter here.
    let ms = t(&mut || cx.cross_entropy_bwd(Cuda::all_mut(&mut logits), Cuda::all(&dt), v, 1e-4))?;
    push("cross_entropy_bwd (in place)", shv, 3.0 * nv2, 0.0, ms);
    drop((logits, losses));

    // Optimizer over one block's parameters.
    let p = s.layer_params();
    let mut master = cx.alloc::<f32>(p)?;
    let mut shadow = zeros16(cx, p)?;
    let mut m = cx.alloc::<f32>(p)?;
    let mut vs = cx.alloc::<f32>(p)?;
    let g = cx.alloc::<f32>(p)?;
    let step = AdamWStep {
        lr: 3e-4,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-5,
        weight_decay: 0.1,
        step: 10,
        grad_scale: 1.0,
    };
    let ms = t(&mut || {
        cx.adamw(
            Cuda::all_mut(&mut master),
            Some(Cuda::all_mut(&mut shadow)),
            Cuda::all_mut(&mut m),
            Cuda::all_mut(&mut vs),
            Cuda::all(&g),
            step,
        )
    })?;
    push(
        "adamw (fused, +bf16 shadow)",
        format!("[{p}]"),
        30.0 * p as f64,
        0.0,
        ms,
    );
    let ms = t(&mut || cx.sum_squares(Cuda::all(&g)).map(|_| ()))?;
    push(
        "sum_squares (grad norm)",
        format!("[{p}]"),
        4.0 * p as f64,
        0.0,
        ms,
    );
    Ok(out)
}

/// Runs the whole table on `cx`.
pub fn run(cx: &Cuda, cfg: &Config) -> Result<Report> {
    let copy = copy_gbps(cx).context("copy bandwidth")?;
    let gemm = gemm_tflops(cx).context("GEMM ceiling")?;
    let mut rows = Vec::new();
    for s in &cfg.shapes {
        for c in bench_shapes(cx, s, cfg.reps).with_context(|| format!("config {}", s.name))? {
            let secs = c.ms * 1e-3;
            let (gbps, tflops, frac) = if c.flops > 0.0 {
                let tf = c.flops / secs / 1e12;
                (None, Some(tf), tf / gemm)
            } else {
                let gb = c.bytes / secs / 1e9;
                (Some(gb), None, gb / copy)
            };
            rows.push(Row {
                config: s.name.clone(),
                kernel: c.kernel.to_string(),
                shape: c.shape,
                ms: c.ms,
                bytes: c.bytes,
                flops: c.flops,
                gb_per_s: gbps,
                tflop_per_s: tflops,
                fraction_of_ceiling: frac,
                torch_ms: None,
                ours_over_torch: None,
            });
        }
    }
    let mut rep = Report {
        device: cx.name(),
        copy_gb_per_s: copy,
        gemm_tflop_per_s: gemm,
        rows,
        torch_device: None,
        torch_error: None,
    };
    if cfg.vs_torch {
        match torch_side(cfg) {
            Ok((dev, times)) => {
                rep.torch_device = Some(dev);
                for r in &mut rep.rows {
                    if let Some(&tm) = times.get(&format!("{}/{}", r.config, r.kernel)) {
                        r.torch_ms = Some(tm);
                        r.ours_over_torch = Some(r.ms / tm);
                    }
                }
            }
            Err(e) => rep.torch_error = Some(format!("{e:#}")),
        }
    }
    Ok(rep)
}

/// Runs scripts/torch_kernel_bench.py on the same shapes; returns its device and
/// "config/kernel" → ms.
fn torch_side(cfg: &Config) -> Result<(String, std::collections::HashMap<String, f64>)> {
    let python = std::env::var("LLAMA2_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/torch_kernel_bench.py");
    let spec = serde_json::to_string(&serde_json::json!({
        "shapes": cfg.shapes,
        "reps": cfg.reps,
    }))?;
    let out = std::process::Command::new(&python)
        .arg(&script)
        .arg("--spec")
        .arg(&spec)
        .output()
        .with_context(|| format!("running {python} {}", script.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .with_context(|| {
            format!(
                "{} printed no JSON: {}",
                script.display(),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let v: serde_json::Value = serde_json::from_str(line)?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("{e}");
    }
    let dev = v["device"].as_str().unwrap_or("?").to_string();
    let times = v["ms"]
        .as_object()
        .map(|o| {
            o.iter()
                .filter_map(|(k, x)| x.as_f64().map(|f| (k.clone(), f)))
                .collect()
        })
        .unwrap_or_default();
    Ok((dev, times))
}

impl Report {
    pub fn print(&self) {
        println!("kernels on {}", self.device);
        println!(
            "ceilings (this run): copy {:.0} GB/s, bf16 GEMM {:.1} TFLOP/s",
            self.copy_gb_per_s, self.gemm_tflop_per_s
        );
        if let Some(d) = &self.torch_device {
            println!("PyTorch: {d}");
        }
        if let Some(e) = &self.torch_error {
            println!("PyTorch side unavailable: {e}");
        }
        println!(
            "{:<4} {:<30} {:<34} {:>9} {:>12} {:>9} {:>9} {:>8}",
            "cfg", "kernel", "shape", "ms", "achieved", "of ceil", "torch ms", "us/them"
        );
        for r in &self.rows {
            let ach = match (r.gb_per_s, r.tflop_per_s) {
                (Some(g), _) => format!("{g:.0} GB/s"),
                (_, Some(t)) => format!("{t:.1} TF/s"),
                _ => String::new(),
            };
            println!(
                "{:<4} {:<30} {:<34} {:>9.4} {:>12} {:>8.0}% {:>9} {:>8}",
                r.config,
                r.kernel,
                r.shape,
                r.ms,
                ach,
                100.0 * r.fraction_of_ceiling,
                r.torch_ms.map(|t| format!("{t:.4}")).unwrap_or_default(),
                r.ours_over_torch
                    .map(|x| format!("{x:.2}x"))
                    .unwrap_or_default(),
            );
        }
    }
}
