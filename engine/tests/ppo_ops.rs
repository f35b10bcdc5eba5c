//! The policy-gradient op pair (`logprob_fwd` / `logprob_bwd`) and the model methods on it
//! (`token_logprobs` / `backward_logprobs`): forward against f64 formulas, backward against
//! central differences, and the whole-model backward against `backward_lm`, which computes the
//! same gradient by another path when every weight is −1/count.

use engine::model::shift_labels;
use engine::ops;
use engine::{Batch, Cpu, Head, Llama, LlamaConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn randv(rng: &mut ChaCha8Rng, n: usize, lim: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-lim..lim)).collect()
}

fn max_err(a: &[f32], b: &[f64]) -> (f64, f64) {
    assert_eq!(a.len(), b.len());
    let err = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y).abs())
        .fold(0.0, f64::max);
    let scale = b.iter().fold(0f64, |m, y| m.max(y.abs()));
    (err, scale)
}

const V: usize = 7;
const TARGETS: [i32; 5] = [3, -100, 0, 6, 2];

fn fwd(x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let n = TARGETS.len();
    let (mut lp, mut ent) = (vec![f32::NAN; n], vec![f32::NAN; n]);
    ops::logprob_fwd(&mut lp, &mut ent, x, &TARGETS, V);
    (lp, ent)
}

#[test]
fn logprob_fwd_matches_f64_formulas() {
    let mut r = ChaCha8Rng::seed_from_u64(3);
    let logits = randv(&mut r, TARGETS.len() * V, 3.0);
    let (lp, ent) = fwd(&logits);
    let (mut want_lp, mut want_ent) = (vec![], vec![]);
    for (row, &tg) in logits.chunks(V).zip(&TARGETS) {
        if tg < 0 {
            want_lp.push(0.0);
            want_ent.push(0.0);
            continue;
        }
        let lse = row.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
        want_lp.push(row[tg as usize] as f64 - lse);
        let h: f64 = row
            .iter()
            .map(|&x| {
                let lp = x as f64 - lse;
                -lp.exp() * lp
            })
            .sum();
        want_ent.push(h);
    }
    let (e1, _) = max_err(&lp, &want_lp);
    let (e2, _) = max_err(&ent, &want_ent);
    println!("logp err {e1:.2e}, entropy err {e2:.2e}");
    assert!(e1 < 1e-5 && e2 < 1e-5);
    assert_eq!((lp[1], ent[1]), (0.0, 0.0), "ignored target gives 0");
    // Uniform row: entropy ln V, log-prob −ln V; stable under a large shift.
    let u = vec![80.0f32; TARGETS.len() * V];
    let (lpu, entu) = fwd(&u);
    assert!((entu[0] - (V as f32).ln()).abs() < 1e-5);
    assert!((lpu[0] + (V as f32).ln()).abs() < 1e-5);
    let shifted: Vec<f32> = logits.iter().map(|x| x + 80.0).collect();
    let (lps, ents) = fwd(&shifted);
    let to64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    assert!(max_err(&lps, &to64(&lp)).0 < 1e-4 && max_err(&ents, &to64(&ent)).0 < 1e-4);
}

#[test]
fn logprob_bwd_matches_finite_differences() {
    let n = TARGETS.len();
    let mut r = ChaCha8Rng::seed_from_u64(4);
    let logits = randv(&mut r, n * V, 3.0);
    // A zero weight on row 2 must zero the row even with a valid target.
    let weights = [0.7f32, 5.0, 0.0, -1.3, 0.4];
    let loss = |x: &[f32]| -> f64 {
        let (lp, _) = fwd(x);
        lp.iter()
            .zip(&weights)
            .map(|(&l, &w)| l as f64 * w as f64)
            .sum()
    };
    let mut d = vec![f32::NAN; n * V];
    d.copy_from_slice(&logits);
    ops::logprob_bwd(&mut d, &TARGETS, &weights, V);
    assert!(
        d[V..3 * V].iter().all(|&x| x == 0.0),
        "ignored/zero-weight rows"
    );
    let eps = 1e-2f32;
    let mut xp = logits.clone();
    let fd: Vec<f64> = (0..logits.len())
        .map(|i| {
            xp[i] = logits[i] + eps;
            let (hi, lp) = (xp[i], loss(&xp));
            xp[i] = logits[i] - eps;
            let (lo, lm) = (xp[i], loss(&xp));
            xp[i] = logits[i];
            (lp - lm) / (hi as f64 - lo as f64)
        })
        .collect();
    let (err, scale) = max_err(&d, &fd);
    println!("logprob_bwd: max|fd| {scale:.3e}, max err {err:.3e}");
    assert!(scale > 0.1 && err <= 2e-2 * scale + 1e-3);
    // Each row's gradient sums to zero (softmax − onehot is a difference of distributions).
    for row in d.chunks(V) {
        assert!(row.iter().sum::<f32>().abs() < 1e-5);
    }
    // With every weight −w it is cross_entropy_bwd with scale w (the gradient of Σ w·CE_n).
    let w = 0.25f32;
    let mut a = logits.clone();
    ops::logprob_bwd(&mut a, &TARGETS, &[-w; 5], V);
    let mut b = logits.clone();
    ops::cross_entropy_bwd(&mut b, &TARGETS, V, w);
    let (e, _) = max_err(&a, &b.iter().map(|&x| x as f64).collect::<Vec<_>>());
    assert!(e < 1e-6, "vs cross_entropy_bwd: {e}");
}

fn tiny_model() -> Llama<Cpu> {
    let mut c = LlamaConfig::preset("tiny").unwrap();
    c.vocab_size = 61;
    c.hidden_size = 32;
    c.intermediate_size = 48;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 4;
    c.num_key_value_heads = Some(2);
    c.max_position_embeddings = 32;
    let mut m = Llama::new(Cpu, c, Head::Lm).unwrap();
    m.init_random(9).unwrap();
    let p: Vec<f32> = m
        .params_to_host()
        .unwrap()
        .iter()
        .map(|x| if *x == 1.0 { 1.0 } else { x * 5.0 })
        .collect();
    m.set_params(&p).unwrap();
    m
}

#[test]
fn model_logprobs_match_the_logits_and_backward_matches_backward_lm() {
    let mut m = tiny_model();
    let (b, t, v) = (3usize, 9usize, 61usize);
    let mut r = ChaCha8Rng::seed_from_u64(5);
    let ids: Vec<i32> = (0..b * t).map(|_| r.random_range(0..v as i32)).collect();
    let mut targets = shift_labels(&ids, b, t);
    // Ignore a prompt-like prefix of each row, as PPO does.
    for bi in 0..b {
        for ti in 0..2 + bi {
            targets[bi * t + ti] = -100;
        }
    }
    let count = targets.iter().filter(|&&x| x >= 0).count();

    // token_logprobs agrees with log-softmax of the logits.
    m.forward(&Batch::new(&ids, b, t)).unwrap();
    let logits = m.logits_to_host().unwrap();
    let (lp, ent) = m.token_logprobs(&targets).unwrap();
    for i in 0..b * t {
        if targets[i] < 0 {
            assert_eq!((lp[i], ent[i]), (0.0, 0.0));
            continue;
        }
        let row = &logits[i * v..(i + 1) * v];
        let want = engine::generate::log_prob(row, targets[i] as usize);
        assert!((lp[i] - want).abs() < 1e-5, "{i}: {} vs {want}", lp[i]);
        assert!(ent[i] > 0.0 && ent[i] <= (v as f32).ln() + 1e-5);
    }
    // Mean cross-entropy from lm_loss is −mean logp.
    let (loss, c) = m.lm_loss(&targets).unwrap();
    assert_eq!(c, count);
    let mean_lp = lp.iter().map(|&x| x as f64).sum::<f64>() / count as f64;
    assert!((loss as f64 + mean_lp).abs() < 1e-5);

    // backward_logprobs with weights −1/count equals backward_lm(1/count).
    m.zero_grads().unwrap();
    m.forward(&Batch::new(&ids, b, t)).unwrap();
    m.lm_loss(&targets).unwrap();
    m.backward_lm(1.0 / count as f32).unwrap();
    let g_lm = m.grads_to_host().unwrap();
    m.zero_grads().unwrap();
    m.forward(&Batch::new(&ids, b, t)).unwrap();
    m.token_logprobs(&targets).unwrap();
    let w: Vec<f32> = targets
        .iter()
        .map(|&x| if x >= 0 { -1.0 / count as f32 } else { 0.0 })
        .collect();
    m.backward_logprobs(&w).unwrap();
    let g_lp = m.grads_to_host().unwrap();
    let scale = g_lm.iter().fold(0f32, |a, x| a.max(x.abs()));
    let err = g_lm
        .iter()
        .zip(&g_lp)
        .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
    println!("backward_logprobs vs backward_lm: max|g| {scale:.3e}, max err {err:.3e}");
    assert!(scale > 1e-3 && err <= 1e-5 * scale + 1e-7);
    // Without a new token_logprobs the backward refuses (the logits were overwritten).
    assert!(m.backward_logprobs(&w).is_err());
}

#[test]
fn model_backward_logprobs_matches_finite_differences() {
    // d/dθ Σ w_n logp_n along a random direction, against central differences of the forward.
    let mut m = tiny_model();
    let (b, t, v) = (2usize, 7usize, 61usize);
    let mut r = ChaCha8Rng::seed_from_u64(6);
    let ids: Vec<i32> = (0..b * t).map(|_| r.random_range(0..v as i32)).collect();
    let mut targets = shift_labels(&ids, b, t);
    targets[0] = -100;
    let w: Vec<f32> = (0..b * t).map(|_| r.random_range(-1.0..1.0)).collect();
    let objective = |m: &mut Llama<Cpu>| -> f64 {
        m.forward(&Batch::new(&ids, b, t)).unwrap();
        let (lp, _) = m.token_logprobs(&targets).unwrap();
        lp.iter().zip(&w).map(|(&l, &x)| l as f64 * x as f64).sum()
    };
    m.zero_grads().unwrap();
    objective(&mut m);
    m.backward_logprobs(&w).unwrap();
    let g = m.grads_to_host().unwrap();
    let p0 = m.params_to_host().unwrap();
    let dir: Vec<f32> = (0..p0.len()).map(|_| r.random_range(-1.0..1.0)).collect();
    let analytic: f64 = g.iter().zip(&dir).map(|(&a, &d)| a as f64 * d as f64).sum();
    let h = 1e-3f32;
    let at = |m: &mut Llama<Cpu>, s: f32| {
        let p: Vec<f32> = p0.iter().zip(&dir).map(|(&x, &d)| x + s * d).collect();
        m.set_params(&p).unwrap();
        objective(m)
    };
    let fd = (at(&mut m, h) - at(&mut m, -h)) / (2.0 * h as f64);
    println!("directional derivative: analytic {analytic:.6}, finite difference {fd:.6}");
    assert!(analytic.abs() > 1e-2);
    assert!((analytic - fd).abs() <= 2e-2 * analytic.abs() + 1e-3);
}
