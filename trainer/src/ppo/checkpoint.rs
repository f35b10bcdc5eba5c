//! PPO checkpoints: the state file, resuming from it, and the two ways of saving (one process's
//! AdamW states in `optimizer.safetensors`, or ZeRO-1 shards written by every rank).

use super::{PpoConfig, Trainer};
use crate::optimizer::Optim;
use crate::run_dir;
use anyhow::{ensure, Context, Result};
use engine::checkpoint::{save_model, SaveOptions};
use engine::dist::{save_zero1, DeviceCollective, ShardedAdamW};
use engine::optim::AdamW;
use engine::{Backend, Llama};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The state saved beside every checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PpoState {
    pub kind: String,
    /// Iterations completed.
    pub iteration: usize,
    pub policy_adamw_step: u64,
    pub critic_adamw_step: u64,
    pub best_eval: Option<f32>,
    pub evals_since_best: usize,
    pub config: PpoConfig,
}

/// The configuration a resumed run continues with: the checkpoint's own, `resume` set to it,
/// writing into the run directory it is in, and `iterations` optionally changed.
pub fn resume_config(path: &Path, iterations: Option<usize>) -> Result<PpoConfig> {
    let dir = resolve_checkpoint(path)?;
    let st = read_state(&dir)?;
    let mut cfg = st.config;
    // The run continues where its checkpoint now is (a moved or copied run directory).
    if let Some(run) = run_dir::run_dir_of(&dir) {
        cfg.out = run;
    }
    cfg.resume = Some(dir);
    if let Some(i) = iterations {
        cfg.iterations = i;
    }
    Ok(cfg)
}

pub(super) fn read_state(dir: &Path) -> Result<PpoState> {
    let p = dir.join(STATE);
    let st: PpoState = run_dir::read_json(&p)?;
    ensure!(
        st.kind == "ppo",
        "{}: a `{}` checkpoint, not a PPO one",
        p.display(),
        st.kind
    );
    Ok(st)
}

/// The file that makes a directory a PPO checkpoint.
pub const STATE: &str = "ppo_state.json";

/// A PPO checkpoint itself, or a run directory whose `checkpoints/latest` names one.
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf> {
    run_dir::resolve_checkpoint(path, STATE, "PPO")
}

#[allow(clippy::too_many_arguments)]
fn save_checkpoint<B: Backend>(
    dir: &Path,
    policy: &Llama<B>,
    critic: &Llama<B>,
    opt_p: &AdamW<B>,
    opt_c: &AdamW<B>,
    tokenizer: &Path,
    critic_tokenizer: &Path,
    state: &PpoState,
) -> Result<()> {
    let host = |m: &Llama<B>, buf: &B::Buf<f32>| -> Result<Vec<f32>> {
        let mut v = vec![0f32; m.table.total];
        m.be.to_host(&mut v, B::all(buf))?;
        Ok(v)
    };
    let (pm, pv) = (host(policy, &opt_p.m)?, host(policy, &opt_p.v)?);
    let (cm, cv) = (host(critic, &opt_c.m)?, host(critic, &opt_c.v)?);
    save_model(policy, dir, SaveOptions::default(), |tmp| {
        std::fs::copy(tokenizer, tmp.join("tokenizer.json"))
            .map_err(|e| engine::Error::io(tokenizer, e))?;
        save_model(critic, &tmp.join("critic"), SaveOptions::default(), |c| {
            std::fs::copy(critic_tokenizer, c.join("tokenizer.json"))
                .map(|_| ())
                .map_err(|e| engine::Error::io(critic_tokenizer, e))
        })?;
        run_dir::write_optimizer(
            &tmp.join("optimizer.safetensors"),
            &[
                ("policy.adamw.m", &pm),
                ("policy.adamw.v", &pv),
                ("critic.adamw.m", &cm),
                ("critic.adamw.v", &cv),
            ],
        )?;
        let text = serde_json::to_string_pretty(state).expect("json");
        std::fs::write(tmp.join(STATE), text).map_err(|e| engine::Error::io(tmp, e))
    })
    .with_context(|| format!("saving the checkpoint {}", dir.display()))
}

/// A ZeRO-1 PPO checkpoint, written by every rank: the policy's (with `tokenizer.json`), then
/// the critic's in `critic/`, then rank 0 writes `ppo_state.json`, which makes it a checkpoint.
#[allow(clippy::too_many_arguments)]
fn save_zero1_checkpoint<B: Backend>(
    dir: &Path,
    policy: &Llama<B>,
    critic: &Llama<B>,
    opt_p: &ShardedAdamW<B>,
    opt_c: &ShardedAdamW<B>,
    comm: &mut dyn DeviceCollective<B>,
    tokenizer: &Path,
    critic_tokenizer: &Path,
    state: &PpoState,
) -> Result<()> {
    let copy = |from: &Path, tmp: &Path| -> engine::Result<()> {
        std::fs::copy(from, tmp.join("tokenizer.json"))
            .map(|_| ())
            .map_err(|e| engine::Error::io(from, e))
    };
    save_zero1(dir, policy, opt_p, comm, SaveOptions::default(), |tmp| {
        copy(tokenizer, tmp)
    })
    .with_context(|| format!("saving the policy of checkpoint {}", dir.display()))?;
    save_zero1(
        &dir.join("critic"),
        critic,
        opt_c,
        comm,
        SaveOptions::default(),
        |tmp| copy(critic_tokenizer, tmp),
    )
    .with_context(|| format!("saving the critic of checkpoint {}", dir.display()))?;
    let mine = if comm.rank() == 0 {
        let text = serde_json::to_string_pretty(state).expect("json");
        run_dir::write_atomic(&dir.join(STATE), text.as_bytes())
    } else {
        Ok(())
    };
    run_dir::agree(comm, mine, &format!("writing {}", dir.display()))
}

impl<B: Backend> Trainer<'_, B> {
    /// Checkpoints after iteration `it` when it is the last one, early stopping ended the run, or
    /// `ckpt_every` says so.
    pub(super) fn maybe_checkpoint(&mut self, it: usize) -> Result<()> {
        let cfg = &self.cfg;
        let last = it == cfg.iterations || self.stopped_early;
        if !(last || (cfg.ckpt_every > 0 && it % cfg.ckpt_every == 0)) {
            return Ok(());
        }
        let name = format!("iter-{it:06}");
        let dir = self.ckpt_root.join(&name);
        let st = PpoState {
            kind: "ppo".into(),
            iteration: it,
            policy_adamw_step: self.opt_p.steps(),
            critic_adamw_step: self.opt_c.steps(),
            best_eval: self.best_eval,
            evals_since_best: self.since_best,
            config: PpoConfig {
                resume: None,
                ..cfg.clone()
            },
        };
        let (policy, critic) = (&self.policy, &self.critic);
        let (tok, critic_tok) = (&self.tok_path, &self.critic_tok);
        match (&self.opt_p, &self.opt_c, self.comm.as_deref_mut()) {
            (Optim::Whole(op), Optim::Whole(oc), _) => {
                save_checkpoint(&dir, policy, critic, op, oc, tok, critic_tok, &st)?
            }
            (Optim::Sharded(op), Optim::Sharded(oc), Some(c)) => {
                save_zero1_checkpoint(&dir, policy, critic, op, oc, c, tok, critic_tok, &st)?;
            }
            _ => unreachable!("both optimizers are sharded or neither"),
        }
        if self.lead {
            run_dir::publish(&self.ckpt_root, &name, cfg.keep_checkpoints)?;
        }
        self.last_ckpt = Some(dir);
        Ok(())
    }
}
