//! The model configuration, read from and written as Hugging Face's `config.json`.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}
fn default_max_pos() -> usize {
    2048
}
fn default_act() -> String {
    "silu".into()
}
fn default_bos() -> Option<u32> {
    Some(1)
}
fn default_eos() -> Option<u32> {
    Some(2)
}

/// Hugging Face `LlamaConfig` fields the engine uses. Unknown fields are ignored on read; fields
/// that would change the maths (rope scaling, biases, another activation) are rejected by
/// [`LlamaConfig::validate`] rather than silently dropped.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_bos")]
    pub bos_token_id: Option<u32>,
    #[serde(default = "default_eos")]
    pub eos_token_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
}

impl LlamaConfig {
    pub fn n_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }
    /// Width of the query projection (n_heads * head_dim).
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim()
    }
    /// Width of the key and value projections (n_kv_heads * head_dim).
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads() * self.head_dim()
    }

    pub fn validate(&self) -> Result<()> {
        let e = |m: String| Err(Error::Config(m));
        if self.vocab_size == 0
            || self.hidden_size == 0
            || self.intermediate_size == 0
            || self.num_hidden_layers == 0
            || self.num_attention_heads == 0
        {
            return e("vocab_size, hidden_size, intermediate_size, num_hidden_layers and num_attention_heads must all be > 0".into());
        }
        let kv = self.n_kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return e(format!(
                "num_key_value_heads ({kv}) must divide num_attention_heads ({})",
                self.num_attention_heads
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return e(format!(
                "hidden_size ({}) is not divisible by num_attention_heads ({})",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.head_dim == Some(0) {
            return e("head_dim must be > 0".into());
        }
        if !self.head_dim().is_multiple_of(2) {
            return e(format!(
                "head_dim ({}) must be even for RoPE",
                self.head_dim()
            ));
        }
        if self.hidden_act != "silu" {
            return e(format!(
                "hidden_act `{}` is not supported (Llama uses silu)",
                self.hidden_act
            ));
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return e("rope_scaling is not supported (Llama 2 uses none)".into());
        }
        if self.attention_bias || self.mlp_bias {
            return e("attention_bias / mlp_bias are not supported (Llama 2 has no biases)".into());
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite())
            || !(self.rope_theta > 0.0 && self.rope_theta.is_finite())
        {
            return e("rms_norm_eps and rope_theta must be positive and finite".into());
        }
        if self.max_position_embeddings == 0 {
            return e("max_position_embeddings must be > 0".into());
        }
        for (name, id) in [
            ("bos_token_id", self.bos_token_id),
            ("eos_token_id", self.eos_token_id),
            ("pad_token_id", self.pad_token_id),
        ] {
            if let Some(id) = id.filter(|&id| id as usize >= self.vocab_size) {
                return e(format!(
                    "{name} {id} is outside the vocabulary (vocab_size {})",
                    self.vocab_size
                ));
            }
        }
        if self.checked_num_params().is_none() {
            return e(format!(
                "the parameter count overflows: vocab_size {}, hidden_size {}, \
                 intermediate_size {}, num_hidden_layers {}, {} heads of {}",
                self.vocab_size,
                self.hidden_size,
                self.intermediate_size,
                self.num_hidden_layers,
                self.num_attention_heads,
                self.head_dim()
            ));
        }
        Ok(())
    }

    /// [`LlamaConfig::num_params`] with every product checked (with a score head's `H` too, and
    /// room for 16 bytes per parameter), so sizes from a hostile config.json cannot wrap or
    /// overflow an allocation; `None` when they would.
    pub fn checked_num_params(&self) -> Option<usize> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let hd = self.head_dim();
        let qd = self.num_attention_heads.checked_mul(hd)?;
        let kvd = self.n_kv_heads().checked_mul(hd)?;
        let per_layer = h
            .checked_mul(2)?
            .checked_add(h.checked_mul(qd)?.checked_mul(2)?)?
            .checked_add(h.checked_mul(kvd)?.checked_mul(2)?)?
            .checked_add(h.checked_mul(i)?.checked_mul(3)?)?;
        let emb = v.checked_mul(h)?;
        let total = emb
            .checked_mul(2)?
            .checked_add(self.num_hidden_layers.checked_mul(per_layer)?)?
            .checked_add(h.checked_mul(2)?)?;
        total.checked_mul(16)?;
        Some(total)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let bad = |e: String| Error::file(path, format!("not a Llama config.json: {e}"));
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        // Hugging Face's architecture family: another family's config would be read as a
        // Llama with whatever fields happen to match.
        if let Some(t) = v.get("model_type").filter(|t| t.as_str() != Some("llama")) {
            return Err(Error::file(
                path,
                format!("model_type {t} is not a Llama config (expected \"llama\")"),
            ));
        }
        // Parsed again from the text on failure, for an error with its line and column.
        let cfg: Self = serde_json::from_value(v).map_err(|e| {
            bad(serde_json::from_str::<Self>(&text)
                .err()
                .map_or(e.to_string(), |e| e.to_string()))
        })?;
        cfg.validate()
            .map_err(|e| Error::file(path, e.to_string()))?;
        Ok(cfg)
    }

    /// The config as Hugging Face writes it, with the architecture named so `transformers` loads it.
    pub fn to_hf_json(&self, architecture: &str) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("config serializes");
        let o = v.as_object_mut().expect("object");
        o.insert("num_key_value_heads".into(), self.n_kv_heads().into());
        o.insert("head_dim".into(), self.head_dim().into());
        o.insert("architectures".into(), serde_json::json!([architecture]));
        o.insert("model_type".into(), "llama".into());
        o.insert("torch_dtype".into(), "float32".into());
        o.insert("attention_dropout".into(), 0.0.into());
        o.insert("initializer_range".into(), 0.02.into());
        o.insert("pretraining_tp".into(), 1.into());
        o.insert("use_cache".into(), true.into());
        if architecture == "LlamaForSequenceClassification" {
            o.insert("num_labels".into(), 1.into());
            o.insert("id2label".into(), serde_json::json!({"0": "LABEL_0"}));
            o.insert("label2id".into(), serde_json::json!({"LABEL_0": 0}));
            if self.pad_token_id.is_none() {
                o.insert("pad_token_id".into(), 0.into());
            }
        }
        v
    }

    /// Parameters of the causal LM (embedding, blocks, final norm, untied head).
    pub fn num_params(&self) -> usize {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let per_layer = 2 * h + h * self.q_dim() * 2 + 2 * h * self.kv_dim() + 3 * h * i;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_hidden_layers * per_layer + h + head
    }

    /// A named preset: `tiny` for CPU work, and the Llama 2 paper's shapes (34B as Code Llama's,
    /// the paper's unreleased size; 34B and 70B use grouped-query attention with 8 KV heads).
    pub fn preset(name: &str) -> Result<Self> {
        let base = |v, h, i, l, nh, nkv, ctx| LlamaConfig {
            vocab_size: v,
            hidden_size: h,
            intermediate_size: i,
            num_hidden_layers: l,
            num_attention_heads: nh,
            num_key_value_heads: Some(nkv),
            head_dim: None,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            max_position_embeddings: ctx,
            tie_word_embeddings: false,
            hidden_act: "silu".into(),
            bos_token_id: Some(1),
            eos_token_id: Some(2),
            pad_token_id: None,
            rope_scaling: None,
            attention_bias: false,
            mlp_bias: false,
        };
        Ok(match name {
            "tiny" => base(512, 128, 384, 4, 4, 2, 256),
            "7b" => base(32000, 4096, 11008, 32, 32, 32, 4096),
            "13b" => base(32000, 5120, 13824, 40, 40, 40, 4096),
            "34b" => base(32000, 8192, 22016, 48, 64, 8, 4096),
            "70b" => base(32000, 8192, 28672, 80, 64, 8, 4096),
            other => {
                return Err(Error::Config(format!(
                    "unknown preset `{other}` (known: tiny, 7b, 13b, 34b, 70b)"
                )))
            }
        })
    }

    pub const PRESETS: [&'static str; 5] = ["tiny", "7b", "13b", "34b", "70b"];
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn preset_sizes_match_the_paper() {
        let p = |n| LlamaConfig::preset(n).unwrap().num_params() as f64 / 1e9;
        assert!((p("7b") - 6.74).abs() < 0.01, "{}", p("7b"));
        assert!((p("13b") - 13.02).abs() < 0.01, "{}", p("13b"));
        assert!((p("70b") - 68.98).abs() < 0.05, "{}", p("70b"));
        assert!((p("34b") - 33.7).abs() < 0.3, "{}", p("34b"));
    }
    #[test]
    fn rejects_bad_gqa() {
        let mut c = LlamaConfig::preset("tiny").unwrap();
        c.num_key_value_heads = Some(3);
        assert!(c.validate().unwrap_err().to_string().contains("divide"));
    }
}
