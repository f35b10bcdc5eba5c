//! Activation recomputation (`Recompute::{None, Attn, Full}`) changes memory, not maths: on the
//! CPU the same ops run on the same inputs, so losses, scores, log-probabilities and every
//! gradient are bitwise equal across modes, for the LM head (`backward_lm`, `backward_logprobs`)
//! and the score head (`backward_scores`), over GQA and packed documents, step after step on the
//! same buffers (with AdamW updates in between, a smaller batch, and a second backward).

use engine::model::shift_labels;
use engine::optim::{AdamW, AdamWConfig};
use engine::{ActBytes, Batch, Cpu, Head, Llama, LlamaConfig, Recompute};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const V: usize = 61;
const LAYERS: usize = 3;

/// 8 query heads over 2 KV heads (GQA), head_dim 8, 3 layers.
fn config() -> LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": V,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32,
    }))
    .unwrap()
}

fn model(head: Head, mode: Recompute) -> Llama<Cpu> {
    let mut m = Llama::new(Cpu, config(), head).unwrap();
    m.init_random(11).unwrap();
    // Sharper than the 0.02 init, so attention is far from uniform.
    let p: Vec<f32> = m
        .params_to_host()
        .unwrap()
        .iter()
        .map(|x| if *x == 1.0 { 1.0 } else { x * 5.0 })
        .collect();
    m.set_params(&p).unwrap();
    m.set_recompute(mode);
    m
}

/// One batch: ids, and for packed batches per-token positions and document ids.
struct Data {
    b: usize,
    t: usize,
    ids: Vec<i32>,
    pos: Option<Vec<i32>>,
    doc: Option<Vec<i32>>,
}

impl Data {
    /// `b` rows of `t` tokens; with `packed`, each row holds documents of lengths `docs`
    /// (cycled), positions restarting at 0 in each.
    fn new(seed: u64, b: usize, t: usize, docs: Option<&[usize]>) -> Self {
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        let ids = (0..b * t).map(|_| r.random_range(0..V as i32)).collect();
        let (pos, doc) = match docs {
            None => (None, None),
            Some(lens) => {
                let (mut pos, mut doc) = (Vec::new(), Vec::new());
                let mut id = 0;
                for _ in 0..b {
                    let (mut filled, mut k) = (0, 0);
                    while filled < t {
                        let len = lens[k % lens.len()].min(t - filled);
                        pos.extend((0..len as i32).collect::<Vec<_>>());
                        doc.extend(std::iter::repeat_n(id, len));
                        filled += len;
                        id += 1;
                        k += 1;
                    }
                }
                (Some(pos), Some(doc))
            }
        };
        Data {
            b,
            t,
            ids,
            pos,
            doc,
        }
    }

    fn batch(&self) -> Batch<'_> {
        Batch {
            ids: &self.ids,
            b: self.b,
            t: self.t,
            pos: self.pos.as_deref(),
            doc: self.doc.as_deref(),
        }
    }

    /// Shifted targets that never cross a document boundary.
    fn targets(&self) -> Vec<i32> {
        let mut tg = shift_labels(&self.ids, self.b, self.t);
        if let Some(doc) = &self.doc {
            for i in 0..tg.len() {
                if (i + 1) % self.t == 0 || doc[i + 1] != doc[i] {
                    tg[i] = -100;
                }
            }
        }
        tg
    }
}

/// The batches of a run: packed 2×13, unpacked 2×13, then a smaller packed 1×11 that reuses the
/// larger buffers.
fn batches() -> Vec<Data> {
    vec![
        Data::new(1, 2, 13, Some(&[5, 3, 9])),
        Data::new(2, 2, 13, None),
        Data::new(3, 1, 11, Some(&[4, 7])),
    ]
}

/// Every float a step produced, in order: outputs (loss, scores, log-probs), then gradients.
type Trace = Vec<Vec<f32>>;

/// Runs `step` on each batch with an AdamW update after each, recording what it returns and the
/// gradients.
fn run(head: Head, mode: Recompute, step: impl Fn(&mut Llama<Cpu>, &Data) -> Vec<f32>) -> Trace {
    let mut m = model(head, mode);
    let mut opt = AdamW::new(&m, AdamWConfig::default()).unwrap();
    let mut trace = Vec::new();
    for d in batches() {
        m.zero_grads().unwrap();
        trace.push(step(&mut m, &d));
        trace.push(m.grads_to_host().unwrap());
        opt.step(&mut m, 1e-2).unwrap();
    }
    trace.push(m.params_to_host().unwrap());
    trace
}

fn assert_bitwise(what: &str, mode: Recompute, want: &Trace, got: &Trace) {
    assert_eq!(want.len(), got.len());
    for (k, (w, g)) in want.iter().zip(got).enumerate() {
        assert_eq!(w.len(), g.len(), "{what} {mode}: entry {k} length");
        if let Some(i) = (0..w.len()).find(|&i| w[i].to_bits() != g[i].to_bits()) {
            panic!(
                "{what}, recompute {mode}: entry {k} differs at {i}: {} (none) vs {}",
                w[i], g[i]
            );
        }
        assert!(w.iter().all(|x| x.is_finite()), "{what}: non-finite");
    }
}

fn check_modes(what: &str, head: Head, step: impl Fn(&mut Llama<Cpu>, &Data) -> Vec<f32> + Copy) {
    let want = run(head, Recompute::None, step);
    // The gradients are not trivially zero.
    assert!(want[1].iter().any(|&g| g != 0.0));
    for mode in [Recompute::Attn, Recompute::Full] {
        assert_bitwise(what, mode, &want, &run(head, mode, step));
    }
}

#[test]
fn lm_loss_and_gradients_are_bitwise_equal_across_modes() {
    check_modes("backward_lm", Head::Lm, |m, d| {
        m.forward(&d.batch()).unwrap();
        let (loss, count) = m.lm_loss(&d.targets()).unwrap();
        m.backward_lm(1.0 / count as f32).unwrap();
        vec![loss]
    });
}

#[test]
fn logprob_gradients_are_bitwise_equal_across_modes() {
    check_modes("backward_logprobs", Head::Lm, |m, d| {
        m.forward(&d.batch()).unwrap();
        let (mut lp, ent) = m.token_logprobs(&d.targets()).unwrap();
        // Advantage-like weights of both signs.
        let w: Vec<f32> = (0..lp.len())
            .map(|i| ((i * 7 % 5) as f32 - 2.0) * 0.1)
            .collect();
        m.backward_logprobs(&w).unwrap();
        lp.extend(ent);
        lp
    });
}

#[test]
fn score_gradients_are_bitwise_equal_across_modes_even_after_a_second_backward() {
    check_modes("backward_scores", Head::Score, |m, d| {
        m.forward(&d.batch()).unwrap();
        // The last token of every row, and one in the middle.
        let mut rows: Vec<i32> = (0..d.b).map(|r| (r * d.t + d.t - 1) as i32).collect();
        rows.push((d.t / 2) as i32);
        let s = m.scores(&rows).unwrap();
        let ds: Vec<f32> = (0..s.len()).map(|i| 1.0 - 0.5 * i as f32).collect();
        m.backward_scores(&ds).unwrap();
        // Again from the same forward: the shared sets now hold layer 0, not the last layer.
        m.backward_scores(&ds).unwrap();
        s
    });
}

#[test]
fn switching_modes_on_one_model_keeps_the_gradients() {
    let d = Data::new(4, 2, 13, Some(&[6, 7]));
    let mut m = model(Head::Lm, Recompute::None);
    let mut grads = Vec::new();
    for mode in [
        Recompute::None,
        Recompute::Full,
        Recompute::Attn,
        Recompute::None,
    ] {
        m.set_recompute(mode);
        m.zero_grads().unwrap();
        m.forward(&d.batch()).unwrap();
        let (_, count) = m.lm_loss(&d.targets()).unwrap();
        m.backward_lm(1.0 / count as f32).unwrap();
        grads.push(m.grads_to_host().unwrap());
    }
    for g in &grads[1..] {
        assert!(g
            .iter()
            .zip(&grads[0])
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
    // A mode change between forward and backward drops the activations: an error, not garbage.
    m.forward(&d.batch()).unwrap();
    m.lm_loss(&d.targets()).unwrap();
    m.set_recompute(Recompute::Full);
    assert!(m.backward_lm(1.0).is_err());
}

#[test]
fn activation_bytes_drop_from_l_layer_sets_to_one() {
    let (b, t) = (2, 13);
    let bytes = |mode| -> ActBytes {
        let mut m = model(Head::Lm, mode);
        assert_eq!(m.activation_bytes(), ActBytes::default());
        let r = m.reserve_activations(b, t).unwrap();
        // A forward of that size reuses what was reserved.
        m.forward(&Data::new(5, b, t, None).batch()).unwrap();
        assert_eq!(m.activation_bytes(), r);
        r
    };
    let [none, attn, full] = Recompute::ALL.map(bytes);
    // The residual stream (L + 1 tensors of [n, h] f32) and the rest are the same in every mode.
    assert_eq!(none.resid, (LAYERS + 1) * b * t * 64 * 4);
    assert_eq!((attn.resid, attn.other), (none.resid, none.other));
    assert_eq!((full.resid, full.other), (none.resid, none.other));
    // `full` keeps one layer's set instead of L; `attn` is in between.
    assert_eq!(none.layers, LAYERS * full.layers);
    assert!(full.layers < attn.layers && attn.layers < none.layers);
    assert!(full.total() < attn.total() && attn.total() < none.total());
}

#[test]
fn recompute_parses_and_prints() {
    for m in Recompute::ALL {
        assert_eq!(m.to_string().parse::<Recompute>().unwrap(), m);
    }
    assert_eq!("full".parse::<Recompute>().unwrap(), Recompute::Full);
    assert!("selective".parse::<Recompute>().is_err());
    assert_eq!(Recompute::default(), Recompute::None);
}
