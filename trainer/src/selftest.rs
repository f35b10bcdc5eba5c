//! `llama2 selftest`: proves the engine works on a machine with no other files. A random tiny
//! model (GQA), its backward checked against finite differences of the whole-model loss, one
//! AdamW step that lowers the loss, and a save/reload through safetensors that reproduces the
//! logits bit for bit.

use anyhow::{ensure, Context, Result};
use engine::checkpoint::{load_model, save_model, SaveOptions};
use engine::model::shift_labels;
use engine::optim::{AdamW, AdamWConfig};
use engine::{Batch, Cpu, Head, Llama, LlamaConfig};
use std::path::Path;

pub struct Summary {
    pub lines: Vec<String>,
}

fn tiny_config() -> LlamaConfig {
    let mut c = LlamaConfig::preset("tiny").expect("preset");
    c.vocab_size = 97;
    c.hidden_size = 48;
    c.intermediate_size = 80;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 6;
    c.num_key_value_heads = Some(2);
    c.max_position_embeddings = 32;
    c
}

fn batch_data(cfg: &LlamaConfig, b: usize, t: usize) -> (Vec<i32>, Vec<i32>) {
    let ids: Vec<i32> = (0..b * t)
        .map(|i| ((i * 7919 + 13) % cfg.vocab_size) as i32)
        .collect();
    let mut labels = ids.clone();
    labels[0] = -100;
    (ids.clone(), shift_labels(&labels, b, t))
}

fn loss_of(
    model: &mut Llama<Cpu>,
    ids: &[i32],
    targets: &[i32],
    b: usize,
    t: usize,
) -> Result<f32> {
    model.forward(&Batch::new(ids, b, t))?;
    Ok(model.lm_loss(targets)?.0)
}

pub fn run(out_dir: &Path) -> Result<Summary> {
    let mut lines = Vec::new();
    let cfg = tiny_config();
    let (b, t) = (2, 13);
    let mut model = Llama::new(Cpu, cfg.clone(), Head::Lm)?;
    model.init_random(1234)?;
    lines.push(format!(
        "model: {} parameters, {} layers, {} query heads over {} KV heads, head_dim {}",
        model.num_params(),
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.n_kv_heads(),
        cfg.head_dim()
    ));
    let (ids, targets) = batch_data(&cfg, b, t);

    // Backward against central finite differences of the whole-model loss, at the entry of each
    // tensor with the largest gradient (where f32 differences are well above rounding noise).
    let loss0 = loss_of(&mut model, &ids, &targets, b, t)?;
    let count = targets.iter().filter(|&&x| x >= 0).count();
    model.zero_grads()?;
    model.backward_lm(1.0 / count as f32)?;
    let grads = model.grads_to_host()?;
    let params = model.params_to_host()?;
    let mut worst = 0f32;
    let mut checked = 0;
    let eps = 1e-2f32;
    for e in model.table.entries.clone() {
        let g = &grads[e.span.off..e.span.off + e.span.len];
        let (k, _) = g
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .expect("non-empty tensor");
        let idx = e.span.off + k;
        let mut p = params.clone();
        p[idx] += eps;
        model.set_params(&p)?;
        let lp = loss_of(&mut model, &ids, &targets, b, t)?;
        p[idx] -= 2.0 * eps;
        model.set_params(&p)?;
        let lm = loss_of(&mut model, &ids, &targets, b, t)?;
        let fd = (lp - lm) / (2.0 * eps);
        let rel = (fd - grads[idx]).abs() / grads[idx].abs().max(1e-3);
        worst = worst.max(rel);
        checked += 1;
        ensure!(
            rel < 0.05,
            "gradient check failed for {}[{k}]: backward {:.6e}, finite difference {:.6e}",
            e.name,
            grads[idx],
            fd
        );
    }
    model.set_params(&params)?;
    lines.push(format!(
        "backward vs finite differences: {checked} tensors, worst relative error {worst:.2e}"
    ));

    // One optimizer step lowers the loss on the same batch.
    let mut opt = AdamW::new(&model, AdamWConfig::default())?;
    let stats = opt.step(&mut model, 1e-2)?;
    let loss1 = loss_of(&mut model, &ids, &targets, b, t)?;
    ensure!(
        loss1 < loss0,
        "an AdamW step did not lower the loss ({loss0} -> {loss1})"
    );
    lines.push(format!(
        "AdamW step: loss {loss0:.4} -> {loss1:.4} (grad norm {:.3})",
        stats.grad_norm
    ));

    // Save and reload through safetensors: identical logits.
    model.forward(&Batch::new(&ids, b, t))?;
    let logits = model.logits_to_host()?;
    let dir = out_dir.join("selftest-model");
    save_model(&model, &dir, SaveOptions::default(), |_| Ok(()))
        .with_context(|| format!("saving to {}", dir.display()))?;
    let mut back = load_model(Cpu, &dir, Head::Lm)?;
    back.forward(&Batch::new(&ids, b, t))?;
    ensure!(
        back.logits_to_host()? == logits,
        "reloaded model gives different logits"
    );
    lines.push(format!(
        "save + reload through {}: logits identical",
        dir.display()
    ));
    Ok(Summary { lines })
}
