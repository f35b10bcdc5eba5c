//! The Llama 2 paper's hyperparameters by model size, in one table: every stage's configuration
//! takes its defaults from here (a recipe or a flag overrides them). Sizes below 7B (the `tiny`
//! preset, other small configs) use the 7B row, except where the `tiny` row says otherwise.
//!
//! Sources: pretraining §2.2 (AdamW β 0.9/0.95, eps 1e-5, decay 0.1, clip 1.0, cosine to 10 %,
//! 2000 warmup steps, peak 3e-4, 1.5e-4 for 34B/70B); SFT §3.1 (2e-5, decay 0.1, batch 64, two
//! epochs); reward models §3.2.2 (one epoch, 1e-5, 5e-6 for 70B, 3 % warmup, 512 pairs);
//! rejection sampling §3.2.3 (temperature 1.2–1.3 for 10–100 samples); PPO §3.2.3 (1e-6
//! constant, batch 512, minibatch 64, clip 0.2, β 0.01, 0.005 for 34B/70B, 200–400 iterations).

use engine::LlamaConfig;
use serde::{Deserialize, Serialize};

/// A model size the paper gives settings for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    /// The CPU preset: the 7B row, except a pretraining peak that a 1M-parameter model takes.
    Tiny,
    #[serde(rename = "7b")]
    B7,
    #[serde(rename = "13b")]
    B13,
    #[serde(rename = "34b")]
    B34,
    #[serde(rename = "70b")]
    B70,
}

impl Size {
    /// The size of a preset name (`tiny`, `7b`, ...); `None` for another name.
    pub fn of_preset(name: &str) -> Option<Size> {
        Some(match name {
            "tiny" => Size::Tiny,
            "7b" => Size::B7,
            "13b" => Size::B13,
            "34b" => Size::B34,
            "70b" => Size::B70,
            _ => return None,
        })
    }

    /// The size of a model by its shape: 80 layers is the 70B, 48 layers with grouped-query
    /// attention the 34B, 40 layers the 13B; anything else is treated as the 7B.
    pub fn of(cfg: &LlamaConfig) -> Size {
        let gqa = cfg.n_kv_heads() < cfg.num_attention_heads;
        match cfg.num_hidden_layers {
            l if l >= 80 => Size::B70,
            l if l >= 48 && gqa => Size::B34,
            l if l >= 40 => Size::B13,
            _ => Size::B7,
        }
    }

    /// The size of the model at `path` (a checkpoint, or a run directory: its latest one, by
    /// its `config.json`); the 7B row when there is none yet (a recipe plans its stages before
    /// the models they start from exist) or it is unreadable (loading it will say why).
    pub fn of_checkpoint(path: &std::path::Path) -> Size {
        let dir = crate::run_dir::model_dir(path).unwrap_or_else(|_| path.to_path_buf());
        LlamaConfig::from_file(&dir.join("config.json"))
            .map(|c| Size::of(&c))
            .unwrap_or(Size::B7)
    }
}

/// One row of the table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Paper {
    pub pretrain_lr: f32,
    pub pretrain_warmup: usize,
    pub sft_lr: f32,
    pub sft_epochs: usize,
    /// Sequences per SFT step.
    pub sft_batch: usize,
    pub rm_lr: f32,
    pub rm_epochs: usize,
    /// Preference pairs per reward-model step.
    pub rm_batch: usize,
    pub rs_k: usize,
    pub rs_temperature: f32,
    pub ppo_lr: f32,
    pub ppo_batch: usize,
    pub ppo_minibatch: usize,
    pub ppo_beta: f32,
    pub ppo_iterations: usize,
    pub ppo_clip: f32,
}

/// The paper's settings for `size`.
pub fn defaults(size: Size) -> Paper {
    let big = matches!(size, Size::B34 | Size::B70);
    Paper {
        pretrain_lr: match size {
            Size::Tiny => 1e-3,
            _ if big => 1.5e-4,
            _ => 3e-4,
        },
        pretrain_warmup: 2000,
        sft_lr: 2e-5,
        sft_epochs: 2,
        sft_batch: 64,
        rm_lr: if size == Size::B70 { 5e-6 } else { 1e-5 },
        rm_epochs: 1,
        rm_batch: 512,
        rs_k: 8,
        rs_temperature: 1.2,
        ppo_lr: 1e-6,
        ppo_batch: 512,
        ppo_minibatch: 64,
        ppo_beta: if big { 0.005 } else { 0.01 },
        ppo_iterations: 200,
        ppo_clip: 0.2,
    }
}

/// The paper's settings for a model of this shape.
pub fn for_model(cfg: &LlamaConfig) -> Paper {
    defaults(Size::of(cfg))
}

/// The paper's settings for the model at `path` (see [`Size::of_checkpoint`]).
pub fn for_checkpoint(path: &std::path::Path) -> Paper {
    defaults(Size::of_checkpoint(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_by_preset_and_shape_agree() {
        for name in LlamaConfig::PRESETS {
            let by_name = Size::of_preset(name).unwrap();
            let by_shape = Size::of(&LlamaConfig::preset(name).unwrap());
            let expect = if by_name == Size::Tiny {
                Size::B7
            } else {
                by_name
            };
            assert_eq!(by_shape, expect, "{name}");
        }
        assert_eq!(defaults(Size::B70).rm_lr, 5e-6);
        assert_eq!(defaults(Size::B34).ppo_beta, 0.005);
        assert_eq!(defaults(Size::B13).pretrain_lr, 3e-4);
    }

    /// What SFT and rejection sampling start from decides their row: a 70B-shaped checkpoint,
    /// given as itself or as its run directory, gets the 70B row; a model not there yet, 7B.
    #[test]
    fn a_70b_checkpoint_or_run_gets_the_70b_row() {
        let d = tempfile::tempdir().unwrap();
        let ckpt = d.path().join("run/checkpoints/step-00000001");
        std::fs::create_dir_all(&ckpt).unwrap();
        let cfg = LlamaConfig::preset("70b").unwrap();
        std::fs::write(
            ckpt.join("config.json"),
            serde_json::to_string(&cfg).unwrap(),
        )
        .unwrap();
        std::fs::write(d.path().join("run/checkpoints/latest"), "step-00000001").unwrap();
        for path in [ckpt.clone(), d.path().join("run")] {
            let row = for_checkpoint(&path);
            assert_eq!(
                (row.rm_lr, row.ppo_beta),
                (5e-6, 0.005),
                "{}",
                path.display()
            );
            let sft = crate::sft::SftConfig::new(path.clone(), vec![], d.path().join("o"));
            assert_eq!((sft.lr, sft.epochs), (row.sft_lr, row.sft_epochs));
            let rs = crate::rs::RsConfig::for_policy(path.clone());
            assert_eq!((rs.k, rs.temperature), (row.rs_k, row.rs_temperature));
        }
        assert_eq!(Size::of_checkpoint(&d.path().join("nowhere")), Size::B7);
    }
}
