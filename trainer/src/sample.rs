//! Text sampling for progress reports: a full forward per new token (the KV-cache generator is
//! the chat issue's); temperature and top-k, never NaN on degenerate distributions.

use anyhow::Result;
use engine::{Backend, Batch, Llama};
use rand::Rng;

/// Samples an index from logits with temperature and top-k (0 = all). Temperature 0 is greedy.
/// Non-finite logits are treated as impossible; if nothing is possible, the argmax of the finite
/// ones (or 0) is returned rather than NaN.
pub fn sample_logits(logits: &[f32], temperature: f32, top_k: usize, rng: &mut impl Rng) -> usize {
    let finite = || logits.iter().enumerate().filter(|(_, x)| x.is_finite());
    let argmax = finite()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
        .unwrap_or(0);
    if temperature <= 0.0 {
        return argmax;
    }
    let mut cand: Vec<(usize, f32)> = finite().map(|(i, &x)| (i, x)).collect();
    if top_k > 0 && top_k < cand.len() {
        cand.select_nth_unstable_by(top_k - 1, |a, b| b.1.total_cmp(&a.1));
        cand.truncate(top_k);
    }
    let m = logits[argmax];
    let weights: Vec<f64> = cand
        .iter()
        .map(|&(_, x)| (((x - m) / temperature) as f64).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    if !(total > 0.0) || !total.is_finite() {
        return argmax;
    }
    let mut u = rng.random::<f64>() * total;
    for (w, &(i, _)) in weights.iter().zip(&cand) {
        if u < *w {
            return i;
        }
        u -= w;
    }
    cand.last().map(|c| c.0).unwrap_or(argmax)
}

/// Continues `prompt` by up to `max_new` tokens (stopping at `stop`), within the context window.
pub fn generate<B: Backend>(
    model: &mut Llama<B>,
    prompt: &[u32],
    max_new: usize,
    temperature: f32,
    top_k: usize,
    stop: Option<u32>,
    rng: &mut impl Rng,
) -> Result<Vec<u32>> {
    let ctx = model.cfg.max_position_embeddings;
    let v = model.cfg.vocab_size;
    let mut toks: Vec<i32> = prompt.iter().map(|&x| x as i32).collect();
    let mut out = Vec::new();
    for _ in 0..max_new {
        let start = toks.len().saturating_sub(ctx);
        let window = &toks[start..];
        model.forward(&Batch::new(window, 1, window.len()))?;
        let logits = model.logits_to_host()?;
        let last = &logits[(window.len() - 1) * v..window.len() * v];
        let next = sample_logits(last, temperature, top_k, rng) as u32;
        if Some(next) == stop {
            break;
        }
        out.push(next);
        toks.push(next as i32);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    #[test]
    fn degenerate_logits_never_nan() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let all_inf = [f32::NEG_INFINITY; 4];
        assert_eq!(sample_logits(&all_inf, 1.0, 0, &mut rng), 0);
        let nan = [f32::NAN, 1.0, f32::NAN];
        assert_eq!(sample_logits(&nan, 1.0, 0, &mut rng), 1);
        let huge = [1e30, -1e30, 3e38];
        assert_eq!(sample_logits(&huge, 1e-6, 0, &mut rng), 2);
        assert_eq!(sample_logits(&[0.0, 5.0, 1.0], 0.0, 0, &mut rng), 1);
        // top-1 is greedy.
        assert!((0..20).all(|_| sample_logits(&[0.0, 5.0, 4.9], 1.0, 1, &mut rng) == 1));
    }
}
