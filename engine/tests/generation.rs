//! KV-cache generation against the full forward: logits agree at every step of a 50-token
//! decode, batched over prompts of different lengths, for multi-head and grouped-query models;
//! greedy generation equals the argmax of the full forward at every step.

use engine::generate::{generate, SamplingParams};
use engine::model::KvCache;
use engine::{Batch, Cpu, Head, Llama, LlamaConfig};
use rand::{Rng, SeedableRng};

fn model(n_heads: usize, n_kv: usize) -> Llama<Cpu> {
    let mut c = LlamaConfig::preset("tiny").unwrap();
    c.vocab_size = 97;
    c.hidden_size = 48;
    c.intermediate_size = 72;
    c.num_hidden_layers = 2;
    c.num_attention_heads = n_heads;
    c.num_key_value_heads = Some(n_kv);
    c.max_position_embeddings = 80;
    let mut m = Llama::new(Cpu, c, Head::Lm).unwrap();
    m.init_random(5).unwrap();
    // Sharper than the 0.02 init, so the logits are far from uniform and argmax is meaningful.
    let p: Vec<f32> = m
        .params_to_host()
        .unwrap()
        .iter()
        .map(|x| if *x == 1.0 { 1.0 } else { x * 6.0 })
        .collect();
    m.set_params(&p).unwrap();
    m
}

fn full_last_logits(m: &mut Llama<Cpu>, seq: &[i32]) -> Vec<f32> {
    m.forward(&Batch::new(seq, 1, seq.len())).unwrap();
    let v = m.cfg.vocab_size;
    let l = m.logits_to_host().unwrap();
    l[(seq.len() - 1) * v..].to_vec()
}

fn argmax(x: &[f32]) -> usize {
    x.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0
}

fn check_cached_decode(n_heads: usize, n_kv: usize) {
    let mut m = model(n_heads, n_kv);
    let v = m.cfg.vocab_size;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let lens = [5usize, 11, 1];
    let mut seqs: Vec<Vec<i32>> = lens
        .iter()
        .map(|&l| (0..l).map(|_| rng.random_range(0..97)).collect())
        .collect();
    let b = seqs.len();
    let longest = *lens.iter().max().unwrap();
    let mut cache = KvCache::new(&m, b, 70).unwrap();
    let mut ids = vec![0i32; b * longest];
    let mut pos = vec![0i32; b * longest];
    for s in 0..b {
        for j in 0..longest {
            ids[s * longest + j] = seqs[s].get(j).copied().unwrap_or(3);
            pos[s * longest + j] = j as i32;
        }
    }
    let rows: Vec<i32> = (0..b).map(|s| (s * longest + lens[s] - 1) as i32).collect();
    let mut logits = m
        .forward_cached(&mut cache, &ids, &pos, b, longest, &rows)
        .unwrap();
    let mut worst = 0f32;
    for step in 0..50 {
        let mut next = vec![0i32; b];
        let mut p = vec![0i32; b];
        for s in 0..b {
            let cached = &logits[s * v..(s + 1) * v];
            let full = full_last_logits(&mut m, &seqs[s]);
            let err = cached
                .iter()
                .zip(&full)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let scale = full.iter().map(|x| x.abs()).fold(0f32, f32::max);
            worst = worst.max(err);
            assert!(
                err <= 1e-4 * scale.max(1.0),
                "step {step} seq {s}: max abs {err} (logit scale {scale})"
            );
            next[s] = argmax(cached) as i32;
            p[s] = seqs[s].len() as i32;
            seqs[s].push(next[s]);
        }
        logits = m
            .forward_cached(&mut cache, &next, &p, b, 1, &[0, 1, 2])
            .unwrap();
    }
    println!("{n_heads} heads over {n_kv}: worst |cached - full| = {worst:.2e}");
}

#[test]
fn cached_decode_equals_full_forward_mha() {
    check_cached_decode(4, 4);
}

#[test]
fn cached_decode_equals_full_forward_gqa() {
    check_cached_decode(6, 2);
}

#[test]
fn greedy_generation_is_the_argmax_of_the_full_forward() {
    let mut m = model(6, 2);
    let prompts = vec![
        vec![1u32, 17, 40],
        vec![1u32, 5, 6, 7, 8, 9, 10, 11],
        vec![1u32],
    ];
    let p = SamplingParams {
        temperature: 0.0,
        max_new_tokens: 30,
        stop: vec![],
        ..Default::default()
    };
    let mut streamed = vec![Vec::new(); 3];
    let gens = generate(&mut m, &prompts, &p, &mut |s, t| streamed[s].push(t)).unwrap();
    for (s, g) in gens.iter().enumerate() {
        assert_eq!(g.tokens.len(), 30);
        assert_eq!(streamed[s], g.tokens, "streaming sees every token in order");
        let mut seq: Vec<i32> = prompts[s].iter().map(|&x| x as i32).collect();
        for (k, &t) in g.tokens.iter().enumerate() {
            let full = full_last_logits(&mut m, &seq);
            assert_eq!(argmax(&full), t as usize, "sequence {s}, token {k}");
            let lp = engine::generate::log_prob(&full, t as usize);
            assert!(
                (lp - g.logprobs[k]).abs() < 1e-4,
                "log-prob {} vs {}",
                g.logprobs[k],
                lp
            );
            seq.push(t as i32);
        }
    }
}

#[test]
fn sampling_is_seeded_and_stops() {
    let mut m = model(4, 2);
    let prompts = vec![vec![1u32, 2, 3], vec![1u32, 9]];
    let mut p = SamplingParams {
        temperature: 1.0,
        top_k: 20,
        top_p: 0.95,
        max_new_tokens: 40,
        seed: 7,
        stop: vec![],
    };
    let a = generate(&mut m, &prompts, &p, &mut |_, _| {}).unwrap();
    assert_eq!(a, generate(&mut m, &prompts, &p, &mut |_, _| {}).unwrap());
    p.seed = 8;
    assert_ne!(a, generate(&mut m, &prompts, &p, &mut |_, _| {}).unwrap());
    // Stop at the first token sampled by seed 7 in sequence 0: it ends there, marked stopped.
    p.seed = 7;
    p.stop = vec![a[0].tokens[0]];
    let b = generate(&mut m, &prompts, &p, &mut |_, _| {}).unwrap();
    assert!(b[0].tokens.is_empty() && b[0].stopped);
    assert!(b
        .iter()
        .all(|g| g.logprobs.iter().all(|x| x.is_finite() && *x <= 0.0)));
    // The context limit ends generation without error.
    p.stop = vec![];
    p.max_new_tokens = 500;
    let c = generate(&mut m, &prompts, &p, &mut |_, _| {}).unwrap();
    assert_eq!(c[0].tokens.len(), 80 - 3);
    assert!(!c[0].stopped);
}
