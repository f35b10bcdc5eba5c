//! `llama2 bench train`: training throughput (tokens/s) after warm-up, the model FLOPs it implies,
//! and their fraction of a dense matmul measured in the same run; optionally PyTorch's figure on
//! the same shapes (`--vs-torch`).

use anyhow::{bail, Context, Result};
use engine::optim::{AdamW, AdamWConfig};
use engine::{ActBytes, Backend, Batch, Head, Llama, LlamaConfig, Recompute};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub model: LlamaConfig,
    pub seq_len: usize,
    pub batch_size: usize,
    pub steps: usize,
    pub warmup: usize,
    pub vs_torch: bool,
    pub device_name: String,
    pub recompute: Recompute,
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub device: String,
    pub params: usize,
    pub seq_len: usize,
    pub batch_size: usize,
    pub steps: usize,
    pub recompute: Recompute,
    /// The training activations the model held (as allocated): what `--recompute` changes.
    pub activation_bytes: ActBytes,
    /// Device memory in use after the timed steps (every process on the device, the CUDA
    /// context included) and the device's total; None on the CPU.
    pub device_memory: Option<(u64, u64)>,
    pub step_s: f64,
    pub tokens_per_s: f64,
    /// 6·N + 12·L·H·T per token, N = parameters that take part in matmuls (all but the
    /// embedding table, which is a lookup), H = n_heads·head_dim, T = seq_len.
    pub flops_per_token: f64,
    pub achieved_tflops: f64,
    /// A dense f32/bf16 matmul's TFLOP/s measured in this run: the practical ceiling.
    pub gemm_tflops: f64,
    pub fraction_of_gemm: f64,
    pub torch_tokens_per_s: Option<f64>,
    pub torch_device: Option<String>,
}

pub fn flops_per_token(cfg: &LlamaConfig, seq_len: usize) -> f64 {
    let n =
        cfg.num_params() - cfg.vocab_size * cfg.hidden_size * usize::from(!cfg.tie_word_embeddings);
    6.0 * n as f64 + 12.0 * (cfg.num_hidden_layers * cfg.q_dim() * seq_len) as f64
}

/// TFLOP/s of an m=n=k matmul through the backend's own matmul.
pub fn gemm_tflops<B: Backend>(be: &B, size: usize) -> Result<f64> {
    let a = be.upload(&vec![B::Act::default(); size * size])?;
    let w = be.upload(&vec![B::Act::default(); size * size])?;
    let mut c = be.alloc::<B::Act>(size * size)?;
    be.matmul_fwd(B::all_mut(&mut c), B::all(&a), B::all(&w), size, size, size)?;
    be.synchronize()?;
    let reps = 5;
    let t0 = Instant::now();
    for _ in 0..reps {
        be.matmul_fwd(B::all_mut(&mut c), B::all(&a), B::all(&w), size, size, size)?;
    }
    be.synchronize()?;
    Ok(2.0 * (size as f64).powi(3) * reps as f64 / t0.elapsed().as_secs_f64() / 1e12)
}

pub fn run<B: Backend>(be: B, cfg: &BenchConfig) -> Result<BenchReport> {
    let mut model = Llama::new(be.clone(), cfg.model.clone(), Head::Lm)?;
    if cfg.seq_len > cfg.model.max_position_embeddings {
        bail!(
            "--seq-len {} exceeds the model's max_position_embeddings ({})",
            cfg.seq_len,
            cfg.model.max_position_embeddings
        );
    }
    model.init_random(0)?;
    model.set_recompute(cfg.recompute);
    let activation_bytes = model.reserve_activations(cfg.batch_size, cfg.seq_len)?;
    let mut opt = AdamW::new(&model, AdamWConfig::default())?;
    let n = cfg.batch_size * cfg.seq_len;
    let ids: Vec<i32> = (0..n)
        .map(|i| ((i * 2654435761) % cfg.model.vocab_size) as i32)
        .collect();
    let targets: Vec<i32> = (0..n).map(|i| ids[(i + 1) % n]).collect();
    let mut step = |model: &mut Llama<B>| -> Result<()> {
        model.forward(&Batch::new(&ids, cfg.batch_size, cfg.seq_len))?;
        let (_, count) = model.lm_loss(&targets)?;
        model.backward_lm(1.0 / count as f32)?;
        opt.step(model, 1e-4)?;
        model.zero_grads()?;
        Ok(())
    };
    for _ in 0..cfg.warmup {
        step(&mut model)?;
    }
    be.synchronize()?;
    let t0 = Instant::now();
    for _ in 0..cfg.steps {
        step(&mut model)?;
    }
    be.synchronize()?;
    let dt = t0.elapsed().as_secs_f64() / cfg.steps.max(1) as f64;
    let device_memory = be.device_memory()?;
    let tps = n as f64 / dt;
    let fpt = flops_per_token(&cfg.model, cfg.seq_len);
    let achieved = tps * fpt / 1e12;
    let gemm = gemm_tflops(&be, 1024)?;
    let (torch_tps, torch_dev) = if cfg.vs_torch {
        let (t, d) = torch_bench(cfg)?;
        (Some(t), Some(d))
    } else {
        (None, None)
    };
    Ok(BenchReport {
        device: cfg.device_name.clone(),
        params: model.num_params(),
        seq_len: cfg.seq_len,
        batch_size: cfg.batch_size,
        steps: cfg.steps,
        recompute: cfg.recompute,
        activation_bytes,
        device_memory,
        step_s: dt,
        tokens_per_s: tps,
        flops_per_token: fpt,
        achieved_tflops: achieved,
        gemm_tflops: gemm,
        fraction_of_gemm: achieved / gemm,
        torch_tokens_per_s: torch_tps,
        torch_device: torch_dev,
    })
}

/// Runs `scripts/torch_train_bench.py` (python from `$LLAMA2_PYTHON`, else `python3`).
fn torch_bench(cfg: &BenchConfig) -> Result<(f64, String)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/torch_train_bench.py");
    let script = if script.is_file() {
        script
    } else {
        Path::new("scripts/torch_train_bench.py").to_path_buf()
    };
    let dir = std::env::temp_dir().join(format!("llama2-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let cfg_path = dir.join("config.json");
    std::fs::write(
        &cfg_path,
        serde_json::to_string(&cfg.model.to_hf_json("LlamaForCausalLM"))?,
    )?;
    let python = std::env::var("LLAMA2_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(&python)
        .arg(&script)
        .args(["--config", &cfg_path.to_string_lossy()])
        .args([
            "--seq-len",
            &cfg.seq_len.to_string(),
            "--batch-size",
            &cfg.batch_size.to_string(),
        ])
        .args([
            "--steps",
            &cfg.steps.to_string(),
            "--warmup",
            &cfg.warmup.to_string(),
        ])
        .args(["--threads", &rayon::current_num_threads().to_string()])
        .output()
        .with_context(|| format!("running {python} {}", script.display()))?;
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(last).with_context(|| {
        format!(
            "{} printed no JSON result; stderr:\n{}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(e) = v.get("error") {
        bail!("--vs-torch: {}", e.as_str().unwrap_or_default());
    }
    let tps = v["tokens_per_s"].as_f64().context("tokens_per_s missing")?;
    Ok((
        tps,
        format!(
            "{} torch {} {}",
            v["device"].as_str().unwrap_or("?"),
            v["torch"].as_str().unwrap_or("?"),
            v["dtype"].as_str().unwrap_or("")
        ),
    ))
}

impl BenchReport {
    pub fn print(&self) {
        println!("device            {}", self.device);
        println!(
            "parameters        {} ({:.2}M)",
            self.params,
            self.params as f64 / 1e6
        );
        println!(
            "batch             {} x {} tokens, {} timed steps after warm-up",
            self.batch_size, self.seq_len, self.steps
        );
        println!("step time         {:.4} s", self.step_s);
        println!("tokens/s          {:.1}", self.tokens_per_s);
        let a = &self.activation_bytes;
        let mib = |x: usize| x as f64 / (1 << 20) as f64;
        println!(
            "activations       {:.2} MiB with --recompute {} (layer sets {:.2}, residual inputs {:.2}, logits and scratch {:.2})",
            mib(a.total()),
            self.recompute,
            mib(a.layers),
            mib(a.resid),
            mib(a.other)
        );
        if let Some((used, total)) = self.device_memory {
            let gib = |x: u64| x as f64 / (1u64 << 30) as f64;
            println!(
                "device memory     {:.2} GiB in use of {:.2} GiB (after the timed steps)",
                gib(used),
                gib(total)
            );
        }
        println!("FLOPs/token       {:.3e}  (6·N + 12·L·H·T; N = matmul parameters, H = heads·head_dim, T = seq_len)", self.flops_per_token);
        println!("achieved          {:.4} TFLOP/s", self.achieved_tflops);
        println!(
            "matmul ceiling    {:.4} TFLOP/s (1024³ matmul, this run) -> {:.1} % of it",
            self.gemm_tflops,
            100.0 * self.fraction_of_gemm
        );
        if let (Some(t), Some(d)) = (self.torch_tokens_per_s, &self.torch_device) {
            println!("pytorch           {t:.1} tokens/s on {d}");
            println!("ours / pytorch    {:.2}x", self.tokens_per_s / t);
        }
    }
}
