//! The flat parameter layout: every tensor is a named view (Hugging Face name and shape) into one
//! buffer, so AdamW, the gradient norm, sharding and checkpoint I/O each see one contiguous array.

use crate::config::LlamaConfig;
use std::collections::HashMap;

/// Which head sits on top of the final norm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Head {
    /// `LlamaForCausalLM`: `lm_head.weight` [V, H] (or the embedding when tied).
    Lm,
    /// `LlamaForSequenceClassification` with one label: `score.weight` [1, H] (reward / value).
    Score,
}

impl Head {
    pub fn architecture(self) -> &'static str {
        match self {
            Head::Lm => "LlamaForCausalLM",
            Head::Score => "LlamaForSequenceClassification",
        }
    }
}

/// A contiguous range of the flat buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub off: usize,
    pub len: usize,
}

#[derive(Clone, Debug)]
pub struct ParamEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub span: Span,
    /// In the weight-decay group (matrices) or not (norm gains), as llm.c and nanoGPT split them.
    pub decay: bool,
}

/// Offsets of one transformer block's tensors.
#[derive(Clone, Copy, Debug)]
pub struct LayerSpans {
    pub ln1: Span,
    pub q: Span,
    pub k: Span,
    pub v: Span,
    pub o: Span,
    pub ln2: Span,
    pub gate: Span,
    pub up: Span,
    pub down: Span,
}

#[derive(Clone, Debug)]
pub struct ParamTable {
    pub entries: Vec<ParamEntry>,
    pub total: usize,
    pub embed: Span,
    pub layers: Vec<LayerSpans>,
    pub norm: Span,
    /// The LM head's weights: `lm_head.weight`, or the embedding's span when tied.
    pub lm_head: Option<Span>,
    pub score: Option<Span>,
    index: HashMap<String, usize>,
}

impl ParamTable {
    /// The layout in Hugging Face's order: embedding, blocks (q, k, v, o adjacent), norm, head.
    pub fn llama(cfg: &LlamaConfig, head: Head) -> Self {
        let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let mut t = ParamTable {
            entries: Vec::new(),
            total: 0,
            embed: Span { off: 0, len: 0 },
            layers: Vec::new(),
            norm: Span { off: 0, len: 0 },
            lm_head: None,
            score: None,
            index: HashMap::new(),
        };
        t.embed = t.push("model.embed_tokens.weight", &[v, h]);
        for l in 0..cfg.num_hidden_layers {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            let ln1 = t.push(&p("input_layernorm.weight"), &[h]);
            let q = t.push(&p("self_attn.q_proj.weight"), &[qd, h]);
            let k = t.push(&p("self_attn.k_proj.weight"), &[kvd, h]);
            let vv = t.push(&p("self_attn.v_proj.weight"), &[kvd, h]);
            let o = t.push(&p("self_attn.o_proj.weight"), &[h, qd]);
            let ln2 = t.push(&p("post_attention_layernorm.weight"), &[h]);
            let gate = t.push(&p("mlp.gate_proj.weight"), &[i, h]);
            let up = t.push(&p("mlp.up_proj.weight"), &[i, h]);
            let down = t.push(&p("mlp.down_proj.weight"), &[h, i]);
            t.layers.push(LayerSpans {
                ln1,
                q,
                k,
                v: vv,
                o,
                ln2,
                gate,
                up,
                down,
            });
        }
        t.norm = t.push("model.norm.weight", &[h]);
        match head {
            Head::Lm if cfg.tie_word_embeddings => t.lm_head = Some(t.embed),
            Head::Lm => t.lm_head = Some(t.push("lm_head.weight", &[v, h])),
            Head::Score => t.score = Some(t.push("score.weight", &[1, h])),
        }
        t
    }

    fn push(&mut self, name: &str, shape: &[usize]) -> Span {
        let len = shape.iter().product();
        let span = Span {
            off: self.total,
            len,
        };
        self.index.insert(name.to_string(), self.entries.len());
        self.entries.push(ParamEntry {
            name: name.to_string(),
            shape: shape.to_vec(),
            span,
            decay: shape.len() >= 2,
        });
        self.total += len;
        span
    }

    pub fn get(&self, name: &str) -> Option<&ParamEntry> {
        self.index.get(name).map(|&i| &self.entries[i])
    }

    /// The first tensor (in layout order) whose values in `flat` (parameters or gradients in
    /// this layout) are not all finite: what an error about a NaN names.
    pub fn first_nonfinite(&self, flat: &[f32]) -> Option<&str> {
        self.entries
            .iter()
            .find(|e| {
                flat.get(e.span.off..e.span.off + e.span.len)
                    .is_some_and(|x| x.iter().any(|v| !v.is_finite()))
            })
            .map(|e| e.name.as_str())
    }
}
