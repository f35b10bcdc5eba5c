//! AdamW with decoupled weight decay and bias correction (torch.optim.AdamW's maths), parameter
//! groups for decay, and global gradient-norm clipping folded into the update as a scale.

use crate::backend::{AdamWStep, Backend};
use crate::error::{Error, Result};
use crate::model::{Llama, Master};
use crate::params::{ParamTable, Span};

/// Which parameters get weight decay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DecayPolicy {
    /// Matrices (embeddings, projections, heads) decay; norm gains do not (llm.c, nanoGPT).
    #[default]
    Matrices,
    /// Every parameter decays (what a single torch param group does).
    All,
    None,
}

#[derive(Clone, Copy, Debug)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Clip the global gradient L2 norm to this value; `None` disables clipping.
    pub clip_norm: Option<f32>,
    pub decay: DecayPolicy,
}

impl Default for AdamWConfig {
    /// The Llama 2 paper's settings: β = (0.9, 0.95), eps 1e-5, weight decay 0.1, clip 1.0.
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-5,
            weight_decay: 0.1,
            clip_norm: Some(1.0),
            decay: DecayPolicy::Matrices,
        }
    }
}

impl AdamWConfig {
    /// Rejects settings that make no sense (a negative decay or clip, β outside [0, 1), a
    /// non-positive eps), naming the setting, before any state is allocated.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, v: f32, want: &str| {
            Err(Error::Config(format!("{what} is {v}: expected {want}")))
        };
        for (what, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(what, b, "a number in [0, 1)");
            }
        }
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return bad("eps", self.eps, "a positive number");
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad("weight decay", self.weight_decay, "a number >= 0");
        }
        if let Some(c) = self.clip_norm.filter(|c| !(*c >= 0.0 && c.is_finite())) {
            return bad("the gradient clip", c, "a number >= 0 (0 disables it)");
        }
        Ok(())
    }
}

/// A step's learning rate must be a finite number >= 0 (a negative one ascends the loss).
pub(crate) fn check_lr(lr: f32) -> Result<()> {
    if lr >= 0.0 && lr.is_finite() {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "learning rate {lr}: expected a finite number >= 0"
        )))
    }
}

#[derive(Clone, Copy, Debug)]
pub struct StepStats {
    pub grad_norm: f32,
    pub clip_scale: f32,
}

pub struct AdamW<B: Backend> {
    pub cfg: AdamWConfig,
    pub m: B::Buf<f32>,
    pub v: B::Buf<f32>,
    pub step: u64,
    /// Contiguous runs of parameters sharing a decay flag: one fused launch each.
    groups: Vec<(Span, bool)>,
}

/// Merges the table's tensors into maximal contiguous runs with the same decay flag.
pub fn decay_groups(table: &ParamTable, policy: DecayPolicy) -> Vec<(Span, bool)> {
    let mut out: Vec<(Span, bool)> = Vec::new();
    for e in &table.entries {
        let decay = match policy {
            DecayPolicy::Matrices => e.decay,
            DecayPolicy::All => true,
            DecayPolicy::None => false,
        };
        match out.last_mut() {
            Some((s, d)) if *d == decay && s.off + s.len == e.span.off => s.len += e.span.len,
            _ => out.push((e.span, decay)),
        }
    }
    out
}

impl<B: Backend> AdamW<B> {
    pub fn new(model: &Llama<B>, cfg: AdamWConfig) -> Result<Self> {
        Self::with_groups(&model.be, decay_groups(&model.table, cfg.decay), cfg)
    }

    /// An optimizer over a flat buffer described by `groups` (spans covering it, decay flags).
    pub fn with_groups(be: &B, groups: Vec<(Span, bool)>, cfg: AdamWConfig) -> Result<Self> {
        cfg.validate()?;
        let n = groups.iter().map(|(s, _)| s.off + s.len).max().unwrap_or(0);
        Ok(AdamW {
            cfg,
            m: be.alloc(n)?,
            v: be.alloc(n)?,
            step: 0,
            groups,
        })
    }

    /// The global L2 norm of the model's gradients (one reduction, one scalar read back).
    pub fn grad_norm(model: &Llama<B>) -> Result<f32> {
        Ok(model.be.sum_squares(B::all(&model.grads))?.sqrt() as f32)
    }

    /// One optimizer step at learning rate `lr`. A non-finite gradient norm is an error and leaves
    /// the weights untouched, so the caller can name the step and stop or skip.
    pub fn step(&mut self, model: &mut Llama<B>, lr: f32) -> Result<StepStats> {
        let Master::Held(master) = &mut model.master else {
            return Err(Error::Config(
                "whole AdamW on a model whose fp32 master a ZeRO-1 optimizer holds".into(),
            ));
        };
        let shadow = (B::len(&model.shadow) > 0).then_some(&mut model.shadow);
        self.step_buffers(&model.be, master, shadow, &model.grads, lr)
    }

    /// The step on raw buffers: master weights (and their compute shadow) updated from grads.
    pub fn step_buffers(
        &mut self,
        be: &B,
        master: &mut B::Buf<f32>,
        mut shadow: Option<&mut B::Buf<B::Act>>,
        grads: &B::Buf<f32>,
        lr: f32,
    ) -> Result<StepStats> {
        check_lr(lr)?;
        let grad_norm = be.sum_squares(B::all(grads))?.sqrt() as f32;
        let clip_scale = clip_scale(self.cfg.clip_norm, grad_norm)?;
        self.step += 1;
        for &(span, decay) in &self.groups {
            let s = AdamWStep {
                lr,
                beta1: self.cfg.beta1,
                beta2: self.cfg.beta2,
                eps: self.cfg.eps,
                weight_decay: if decay { self.cfg.weight_decay } else { 0.0 },
                step: self.step,
                grad_scale: clip_scale,
            };
            let sh = shadow
                .as_deref_mut()
                .map(|b| B::slice_mut(b, span.off, span.len));
            be.adamw(
                B::slice_mut(master, span.off, span.len),
                sh,
                B::slice_mut(&mut self.m, span.off, span.len),
                B::slice_mut(&mut self.v, span.off, span.len),
                B::slice(grads, span.off, span.len),
                s,
            )?;
        }
        Ok(StepStats {
            grad_norm,
            clip_scale,
        })
    }
}

/// The factor gradients are scaled by before the update, as torch.nn.utils.clip_grad_norm_:
/// max_norm / (norm + 1e-6), clamped to 1; a non-finite norm is an error, not a silent NaN step.
pub(crate) fn clip_scale(clip_norm: Option<f32>, grad_norm: f32) -> Result<f32> {
    if !grad_norm.is_finite() {
        return Err(Error::NonFinite(format!("gradient norm is {grad_norm}")));
    }
    Ok(match clip_norm {
        Some(c) if c > 0.0 => (c / (grad_norm + 1e-6)).min(1.0),
        _ => 1.0,
    })
}
