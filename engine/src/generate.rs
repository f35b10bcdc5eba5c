//! Generation: prefill + decode through a KV cache, batched over prompts of different lengths,
//! with temperature, top-k, top-p, a seed, stop tokens and the log-probabilities of the chosen
//! tokens (what PPO needs).

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::{KvCache, Llama};
use rand::{Rng, SeedableRng};

#[derive(Clone, Debug)]
pub struct SamplingParams {
    /// 0 is greedy decoding.
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1: all).
    pub top_p: f32,
    pub max_new_tokens: usize,
    pub seed: u64,
    /// Generation of a sequence ends at any of these (not included in the output).
    pub stop: Vec<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 128,
            seed: 0,
            stop: vec![2],
        }
    }
}

impl SamplingParams {
    /// Rejects a temperature or top-p that sampling cannot mean (NaN, infinite, negative,
    /// top-p outside (0, 1]), naming the setting.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::Input(format!(
                "temperature {}: expected a finite number >= 0 (0 is greedy)",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Input(format!(
                "top_p {}: expected a number in (0, 1] (1 keeps every token)",
                self.top_p
            )));
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Generation {
    pub tokens: Vec<u32>,
    /// log π(token) under the model's own distribution (temperature 1, no truncation), per token.
    pub logprobs: Vec<f32>,
    /// True when a stop token ended the sequence (false: length or context limit).
    pub stopped: bool,
}

/// log-softmax of one logit row at `idx`, computed stably.
pub fn log_prob(logits: &[f32], idx: usize) -> f32 {
    let m = logits
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    let s: f64 = logits
        .iter()
        .filter(|x| x.is_finite())
        .map(|&x| ((x - m) as f64).exp())
        .sum();
    (logits[idx] - m) - s.ln() as f32
}

/// Samples a token from one logit row. Non-finite logits count as impossible; a row with no
/// possible token, or a distribution that underflows or overflows, falls back to the argmax of
/// the finite logits (or 0), never NaN.
pub fn sample_logits(
    logits: &[f32],
    temperature: f32,
    top_k: usize,
    top_p: f32,
    rng: &mut impl Rng,
) -> usize {
    let finite = || logits.iter().enumerate().filter(|(_, x)| x.is_finite());
    let argmax = finite()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
        .unwrap_or(0);
    if temperature <= 0.0 || !temperature.is_finite() {
        return argmax;
    }
    let mut cand: Vec<(usize, f32)> = finite().map(|(i, &x)| (i, x)).collect();
    cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if top_k > 0 && top_k < cand.len() {
        cand.truncate(top_k);
    }
    let m = logits[argmax];
    let mut w: Vec<f64> = cand
        .iter()
        .map(|&(_, x)| (((x - m) / temperature) as f64).exp())
        .collect();
    let total: f64 = w.iter().sum();
    if !(total > 0.0) || !total.is_finite() {
        return argmax;
    }
    if top_p < 1.0 {
        let mut acc = 0.0;
        let keep = w
            .iter()
            .position(|&x| {
                acc += x / total;
                acc >= top_p as f64
            })
            .map_or(w.len(), |i| i + 1);
        w.truncate(keep.max(1));
        cand.truncate(keep.max(1));
    }
    let total: f64 = w.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (wi, &(i, _)) in w.iter().zip(&cand) {
        if u < *wi {
            return i;
        }
        u -= wi;
    }
    cand.last().map(|c| c.0).unwrap_or(argmax)
}

/// Generates continuations of every prompt, batched. `on_token(sequence, token)` sees each token
/// as it is chosen (streaming).
pub fn generate<B: Backend>(
    model: &mut Llama<B>,
    prompts: &[Vec<u32>],
    p: &SamplingParams,
    on_token: &mut dyn FnMut(usize, u32),
) -> Result<Vec<Generation>> {
    p.validate()?;
    let b = prompts.len();
    if b == 0 {
        return Ok(vec![]);
    }
    if let Some(i) = prompts.iter().position(|x| x.is_empty()) {
        return Err(Error::Input(format!(
            "prompt {i} is empty (start it with BOS)"
        )));
    }
    let longest = prompts.iter().map(Vec::len).max().expect("non-empty");
    let ctx = model.cfg.max_position_embeddings;
    if longest >= ctx {
        return Err(Error::Input(format!(
            "a prompt of {longest} tokens leaves no room in the context of {ctx}"
        )));
    }
    let tmax = (longest + p.max_new_tokens).min(ctx);
    let mut cache = KvCache::new(model, b, tmax)?;
    let v = model.cfg.vocab_size;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(p.seed);

    // Prefill: prompts right-padded to the longest; a pad's cache entries sit at positions its
    // sequence has not reached, and are overwritten before any query can see them.
    let mut ids = vec![0i32; b * longest];
    let mut pos = vec![0i32; b * longest];
    for (s, pr) in prompts.iter().enumerate() {
        for j in 0..longest {
            ids[s * longest + j] = pr.get(j).copied().unwrap_or(0) as i32;
            pos[s * longest + j] = j as i32;
        }
    }
    let rows: Vec<i32> = prompts
        .iter()
        .enumerate()
        .map(|(s, pr)| (s * longest + pr.len() - 1) as i32)
        .collect();
    let mut logits = model.forward_cached(&mut cache, &ids, &pos, b, longest, &rows)?;
    let mut out = vec![Generation::default(); b];
    let mut len: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let mut done = vec![false; b];
    let (mut step_ids, mut step_pos) = (vec![0i32; b], vec![0i32; b]);
    let all_rows: Vec<i32> = (0..b as i32).collect();
    for _ in 0..p.max_new_tokens {
        for s in 0..b {
            if done[s] {
                continue;
            }
            let row = &logits[s * v..(s + 1) * v];
            if row.iter().any(|x| x.is_nan()) {
                // NaN logits come from NaN weights or an overflow; sampling from them would
                // print nothing useful and call it a success.
                let host = model.params_to_host()?;
                return Err(Error::NonFinite(format!(
                    "the logits of sequence {s} are NaN after {} generated token(s){}",
                    out[s].tokens.len(),
                    match model.table.first_nonfinite(&host) {
                        Some(name) => format!("; parameter {name} holds non-finite values"),
                        None => " (the weights are finite: an overflow in the forward)".into(),
                    }
                )));
            }
            let tok = sample_logits(row, p.temperature, p.top_k, p.top_p, &mut rng);
            if p.stop.contains(&(tok as u32)) {
                done[s] = true;
                out[s].stopped = true;
                continue;
            }
            out[s].tokens.push(tok as u32);
            out[s].logprobs.push(log_prob(row, tok));
            on_token(s, tok as u32);
            if len[s] + 1 >= tmax {
                done[s] = true;
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        for s in 0..b {
            // Finished sequences keep feeding a harmless token at a valid position; ignored.
            let last = out[s].tokens.last().copied().unwrap_or(0);
            step_ids[s] = if done[s] { 0 } else { last as i32 };
            step_pos[s] = if done[s] { 0 } else { len[s] as i32 };
            if !done[s] {
                len[s] += 1;
            }
        }
        logits = model.forward_cached(&mut cache, &step_ids, &step_pos, b, 1, &all_rows)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn degenerate_logits_never_nan() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let all_inf = [f32::NEG_INFINITY; 4];
        assert_eq!(sample_logits(&all_inf, 1.0, 0, 1.0, &mut rng), 0);
        let nan = [f32::NAN, 1.0, f32::NAN];
        assert_eq!(sample_logits(&nan, 1.0, 0, 0.9, &mut rng), 1);
        let huge = [1e30, -1e30, 3e38];
        assert_eq!(sample_logits(&huge, 1e-6, 0, 1.0, &mut rng), 2);
        assert_eq!(sample_logits(&[0.0, 5.0, 1.0], 0.0, 0, 1.0, &mut rng), 1);
        // top-1 and a tiny top-p are greedy.
        assert!((0..20).all(|_| sample_logits(&[0.0, 5.0, 4.9], 1.0, 1, 1.0, &mut rng) == 1));
        assert!((0..20).all(|_| sample_logits(&[0.0, 5.0, 4.9], 1.0, 0, 1e-3, &mut rng) == 1));
        // top-p 0.9 over [0.5, 0.3, 0.15, 0.05] never picks the last.
        let l: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        assert!((0..200).all(|_| sample_logits(&l, 1.0, 0, 0.9, &mut rng) != 3));
        assert!((log_prob(&l, 0) - 0.5f32.ln()).abs() < 1e-6);
    }
}
