//! The backward's `GradReady` reports (what data-parallel bucketing overlaps with): each says
//! `grads[from..]` is final, so the tail it names must hold exactly the gradient the whole
//! backward ends with, at every report, for every head, recompute mode and tied embeddings.
//! The reports fall on layer edges, from the end to 0 (`report_grads`, for a rank without data,
//! names the same ones), and the gradients are the same bits as a backward without a sink.

use engine::model::shift_labels;
use engine::{Batch, Cpu, GradReady, Head, Llama, LlamaConfig, Recompute};

fn config(tied: bool) -> LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 53,
        "hidden_size": 32,
        "intermediate_size": 40,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32,
        "tie_word_embeddings": tied,
    }))
    .unwrap()
}

/// Every report, with a copy of the tail it declared final at that moment.
#[derive(Default)]
struct Recorder {
    seen: Vec<(usize, Vec<f32>)>,
}

impl GradReady<Cpu> for Recorder {
    fn ready(&mut self, grads: &[f32], from: usize) -> engine::Result<()> {
        self.seen.push((from, grads[from..].to_vec()));
        Ok(())
    }
}

#[derive(Clone, Copy, Debug)]
enum Loss {
    Lm,
    Logprobs,
    Scores,
}

/// Runs one forward and backward (`sink` or none) on accumulated gradients from an earlier
/// backward (so a tail being "final" means no later write adds to it), returns the gradients.
fn run(loss: Loss, mode: Recompute, tied: bool, mut sink: Option<&mut Recorder>) -> Vec<f32> {
    let head = match loss {
        Loss::Scores => Head::Score,
        _ => Head::Lm,
    };
    let mut m = Llama::new(Cpu, config(tied), head).unwrap();
    m.init_random(5).unwrap();
    m.set_recompute(mode);
    let (b, t) = (2, 9);
    let ids: Vec<i32> = (0..b * t).map(|i| ((i * 17 + 3) % 53) as i32).collect();
    let batch = Batch::new(&ids, b, t);
    let targets = shift_labels(&ids, b, t);
    for pass in 0..2 {
        let sink = match (pass, sink.as_deref_mut()) {
            (1, Some(s)) => Some(s as &mut dyn GradReady<Cpu>),
            _ => None,
        };
        m.forward(&batch).unwrap();
        match loss {
            Loss::Lm => {
                let (_, count) = m.lm_loss(&targets).unwrap();
                m.backward_lm_with(1.0 / count as f32, sink).unwrap();
            }
            Loss::Logprobs => {
                m.token_logprobs(&targets).unwrap();
                let w: Vec<f32> = (0..b * t).map(|i| (i as f32 * 0.37).sin() * 0.1).collect();
                m.backward_logprobs_with(&w, sink).unwrap();
            }
            Loss::Scores => {
                let rows = [t as i32 - 1, 2 * t as i32 - 3];
                m.scores(&rows).unwrap();
                m.backward_scores_with(&[0.7, -1.3], sink).unwrap();
            }
        }
    }
    m.grads_to_host().unwrap()
}

#[test]
fn every_reported_tail_is_final_and_reports_fall_on_layer_edges() {
    for loss in [Loss::Lm, Loss::Logprobs, Loss::Scores] {
        for mode in [Recompute::None, Recompute::Full] {
            for tied in [false, true] {
                if tied && matches!(loss, Loss::Scores) {
                    continue;
                }
                let what = format!("{loss:?}, {mode:?}, tied {tied}");
                let mut rec = Recorder::default();
                let with = run(loss, mode, tied, Some(&mut rec));
                let without = run(loss, mode, tied, None);
                assert_eq!(with, without, "{what}: a sink changed the gradients");

                let m = Llama::new(Cpu, config(tied), Head::Lm).unwrap();
                let tab = &m.table;
                let mut want = vec![tab.norm.off];
                want.extend(tab.layers.iter().rev().map(|l| l.ln1.off));
                want.push(0);
                let got: Vec<usize> = rec.seen.iter().map(|(f, _)| *f).collect();
                assert_eq!(got, want, "{what}: report points");
                // A rank without data reports the same points (its buckets must match).
                let mut idle = Recorder::default();
                m.report_grads(&mut idle).unwrap();
                let idle: Vec<usize> = idle.seen.iter().map(|(f, _)| *f).collect();
                assert_eq!(idle, want, "{what}: report_grads");
                for (from, tail) in &rec.seen {
                    assert_eq!(tail.len(), with.len() - from, "{what}");
                    let changed = tail.iter().zip(&with[*from..]).position(|(a, b)| a != b);
                    assert_eq!(
                        changed,
                        None,
                        "{what}: gradient {} changed after grads[{from}..] was reported final",
                        from + changed.unwrap_or(0)
                    );
                }
            }
        }
    }
}
