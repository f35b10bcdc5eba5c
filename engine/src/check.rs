//! The reference checker: runs a fixture directory (the format of `shared/fixtures/README.md`,
//! made by Hugging Face transformers from any Llama checkpoint) through the engine and compares
//! every tensor: logits, loss, every gradient, the reward-model case and the AdamW case.

use crate::backend::Backend;
use crate::checkpoint::{read_params, TensorFiles};
use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::model::{shift_labels, Batch, Llama};
use crate::optim::{AdamW, AdamWConfig, DecayPolicy};
use crate::params::Head;
use std::path::Path;

/// Pass bounds. `abs` applies to logits, loss and rewards (max |ours − ref|); `rel` to gradients
/// and parameters, as max |ours − ref| / max |ref| over the tensor.
#[derive(Clone, Copy, Debug)]
pub struct Tolerances {
    pub abs: f32,
    pub rel: f32,
}

impl Tolerances {
    /// A correct f32 implementation: the fixture README's ~1e-5 absolute, ~1e-4 of each tensor's max.
    pub const F32: Tolerances = Tolerances {
        abs: 2e-5,
        rel: 1e-4,
    };
    /// bf16 compute (the CUDA backend): activations and compute weights carry 8 bits of
    /// mantissa, a relative rounding error of 2^-9 ≈ 2e-3 per value, and the fixtures' logits
    /// are O(1)–O(10) after a few layers whose errors add up. Logits and the loss get 5e-2
    /// absolute (≈ 10 roundings of a magnitude-2 value); gradients 3e-2 of each tensor's
    /// largest entry (bf16 activations in both passes, f32 accumulation in every reduction).
    /// These are estimates from that arithmetic, not measurements (no GPU has run the fixtures
    /// yet): tighten or widen them only with a measured reason.
    pub const BF16: Tolerances = Tolerances {
        abs: 5e-2,
        rel: 3e-2,
    };
}

#[derive(Clone, Debug, PartialEq)]
pub enum Status {
    Pass,
    Fail,
    Skip(String),
}

#[derive(Clone, Debug)]
pub struct Row {
    pub case: String,
    pub tensor: String,
    pub max_abs: f32,
    /// max |ours − ref| / max |ref|.
    pub max_rel: f32,
    pub tol: String,
    pub status: Status,
}

#[derive(Clone, Debug, Default)]
pub struct Report {
    pub rows: Vec<Row>,
}

impl Report {
    pub fn passed(&self) -> usize {
        self.rows
            .iter()
            .filter(|r| r.status == Status::Pass)
            .count()
    }
    pub fn failed(&self) -> usize {
        self.rows
            .iter()
            .filter(|r| r.status == Status::Fail)
            .count()
    }
    pub fn skipped(&self) -> usize {
        self.rows
            .iter()
            .filter(|r| matches!(r.status, Status::Skip(_)))
            .count()
    }

    fn skip(&mut self, case: &str, why: String) {
        self.rows.push(Row {
            case: case.into(),
            tensor: "-".into(),
            max_abs: 0.0,
            max_rel: 0.0,
            tol: "-".into(),
            status: Status::Skip(why),
        });
    }

    /// Compares `ours` with `reference`; `absolute` picks which bound decides.
    fn compare(
        &mut self,
        case: &str,
        tensor: &str,
        ours: &[f32],
        reference: &[f32],
        absolute: bool,
        tol: Tolerances,
    ) {
        let mut max_abs = 0f32;
        let mut scale = 0f32;
        let mut nonfinite = ours.len() != reference.len();
        for (a, b) in ours.iter().zip(reference) {
            if !a.is_finite() {
                nonfinite = true;
            }
            max_abs = max_abs.max((a - b).abs());
            scale = scale.max(b.abs());
        }
        let max_rel = if scale > 0.0 {
            max_abs / scale
        } else {
            max_abs
        };
        let (ok, tol_s) = if absolute {
            (max_abs <= tol.abs, format!("abs {:.0e}", tol.abs))
        } else {
            (max_rel <= tol.rel, format!("rel {:.0e}", tol.rel))
        };
        self.rows.push(Row {
            case: case.into(),
            tensor: tensor.into(),
            max_abs,
            max_rel,
            tol: tol_s,
            status: if ok && !nonfinite {
                Status::Pass
            } else {
                Status::Fail
            },
        });
    }

    /// The table as printed by `llama2 check`, ending with `N passed, M failed`.
    pub fn to_table(&self) -> String {
        let mut s = format!(
            "{:<8} {:<55} {:>10} {:>10} {:>9}  {}\n",
            "case", "tensor", "max_abs", "max_rel", "bound", "status"
        );
        for r in &self.rows {
            let st = match &r.status {
                Status::Pass => "ok".to_string(),
                Status::Fail => "FAIL".to_string(),
                Status::Skip(w) => format!("skipped: {w}"),
            };
            s += &format!(
                "{:<8} {:<55} {:>10.3e} {:>10.3e} {:>9}  {}\n",
                r.case, r.tensor, r.max_abs, r.max_rel, r.tol, st
            );
        }
        let sk = self.skipped();
        s += &format!("{} passed, {} failed", self.passed(), self.failed());
        if sk > 0 {
            s += &format!(", {sk} skipped");
        }
        s
    }
}

fn to_i32(v: Vec<i64>, file: &Path, name: &str) -> Result<Vec<i32>> {
    v.into_iter()
        .map(|x| {
            i32::try_from(x)
                .map_err(|_| Error::tensor(file, name, format!("value {x} does not fit i32")))
        })
        .collect()
}

fn read_2d_ids(f: &TensorFiles, name: &str) -> Result<(usize, usize, Vec<i32>)> {
    let (shape, v) = f.read_i64(name)?;
    if shape.len() != 2 {
        return Err(Error::tensor(
            f.file_of(name),
            name,
            format!("shape {shape:?}, expected [batch, seq]"),
        ));
    }
    Ok((shape[0], shape[1], to_i32(v, f.file_of(name), name)?))
}

fn read_scalar(f: &TensorFiles, name: &str) -> Result<f32> {
    let (_, v) = f.read_f32(name)?;
    v.first()
        .copied()
        .ok_or_else(|| Error::tensor(f.file_of(name), name, "empty, expected a scalar"))
}

/// Runs every case found in `dir` on the backend `be`.
pub fn check_fixture<B: Backend>(be: B, dir: &Path, tol: Tolerances) -> Result<Report> {
    let cfg = LlamaConfig::from_file(&dir.join("config.json"))?;
    let weights = TensorFiles::open(dir)?;
    let mut rep = Report::default();

    // ---- causal LM: logits, loss, every gradient ----------------------------------------------
    let case_path = dir.join("case.safetensors");
    if case_path.is_file() {
        let case = TensorFiles::open(&case_path)?;
        let mut model = Llama::new(be.clone(), cfg.clone(), Head::Lm)?;
        let (host, _) = read_params(&model.table, &cfg, &weights, &[])?;
        model.set_params(&host)?;
        let (b, t, ids) = read_2d_ids(&case, "input_ids")?;
        let (lb, lt, labels) = read_2d_ids(&case, "labels")?;
        if (lb, lt) != (b, t) {
            return Err(Error::tensor(
                &case_path,
                "labels",
                format!("shape [{lb}, {lt}], input_ids is [{b}, {t}]"),
            ));
        }
        model.forward(&Batch::new(&ids, b, t))?;
        let logits = model.logits_to_host()?;
        let ref_logits = case.read_f32_shaped(
            "logits",
            &[b, t, cfg.vocab_size],
            "input_ids and config.json",
        )?;
        rep.compare("lm", "logits", &logits, &ref_logits, true, tol);
        let targets = shift_labels(&labels, b, t);
        let (loss, count) = model.lm_loss(&targets)?;
        rep.compare(
            "lm",
            "loss",
            &[loss],
            &[read_scalar(&case, "loss")?],
            true,
            tol,
        );
        model.zero_grads()?;
        model.backward_lm(1.0 / count.max(1) as f32)?;
        let grads = model.grads_to_host()?;
        for e in &model.table.entries {
            let gname = format!("grad.{}", e.name);
            if !case.contains(&gname) {
                rep.skip("lm", format!("{gname} not in case.safetensors"));
                continue;
            }
            let r = case.read_f32_shaped(&gname, &e.shape, "the parameter's shape")?;
            rep.compare(
                "lm",
                &gname,
                &grads[e.span.off..e.span.off + e.span.len],
                &r,
                false,
                tol,
            );
        }
    } else {
        rep.skip("lm", "no case.safetensors".into());
    }

    // ---- reward model: rewards, ranking loss, gradients ---------------------------------------
    let rm_path = dir.join("rm.safetensors");
    if rm_path.is_file() {
        let rm = TensorFiles::open(&rm_path)?;
        let mut model = Llama::new(be.clone(), cfg.clone(), Head::Score)?;
        let (mut host, _) = read_params(&model.table, &cfg, &weights, &["score.weight"])?;
        let score = model.table.get("score.weight").expect("score head").clone();
        let sw = rm.read_f32_shaped("score.weight", &score.shape, "hidden_size")?;
        host[score.span.off..score.span.off + score.span.len].copy_from_slice(&sw);
        model.set_params(&host)?;
        let (n, t, chosen) = read_2d_ids(&rm, "chosen_ids")?;
        let (n2, t2, rejected) = read_2d_ids(&rm, "rejected_ids")?;
        if (n2, t2) != (n, t) {
            return Err(Error::tensor(
                &rm_path,
                "rejected_ids",
                format!("shape [{n2}, {t2}], chosen_ids is [{n}, {t}]"),
            ));
        }
        let lens = |name: &str| -> Result<Vec<i32>> {
            let (s, v) = rm.read_i64(name)?;
            let v = to_i32(v, &rm_path, name)?;
            if s != [n] || v.iter().any(|&l| l < 1 || l as usize > t) {
                return Err(Error::tensor(
                    &rm_path,
                    name,
                    format!("expected [{n}] lengths in 1..={t}"),
                ));
            }
            Ok(v)
        };
        let (cl, rl) = (lens("chosen_len")?, lens("rejected_len")?);
        let margin = rm.read_f32_shaped("margin", &[n], "chosen_ids")?;
        // Chosen and rejected go through in one batch, as reward-model training does.
        let ids: Vec<i32> = chosen.iter().chain(&rejected).copied().collect();
        let rows: Vec<i32> = (0..n)
            .map(|i| (i * t) as i32 + cl[i] - 1)
            .chain((0..n).map(|i| ((n + i) * t) as i32 + rl[i] - 1))
            .collect();
        model.forward(&Batch::new(&ids, 2 * n, t))?;
        let r = model.scores(&rows)?;
        let (rc, rr) = r.split_at(n);
        rep.compare(
            "rm",
            "reward_chosen",
            rc,
            &rm.read_f32_shaped("reward_chosen", &[n], "chosen_ids")?,
            true,
            tol,
        );
        rep.compare(
            "rm",
            "reward_rejected",
            rr,
            &rm.read_f32_shaped("reward_rejected", &[n], "chosen_ids")?,
            true,
            tol,
        );
        let (loss, dz) = ranking_loss(rc, rr, &margin);
        rep.compare(
            "rm",
            "loss",
            &[loss],
            &[read_scalar(&rm, "loss")?],
            true,
            tol,
        );
        let d: Vec<f32> = dz.iter().copied().chain(dz.iter().map(|x| -x)).collect();
        model.zero_grads()?;
        model.backward_scores(&d)?;
        let grads = model.grads_to_host()?;
        for e in &model.table.entries {
            let gname = format!("grad.{}", e.name);
            if !rm.contains(&gname) {
                rep.skip("rm", format!("{gname} not in rm.safetensors"));
                continue;
            }
            let r = rm.read_f32_shaped(&gname, &e.shape, "the parameter's shape")?;
            rep.compare(
                "rm",
                &gname,
                &grads[e.span.off..e.span.off + e.span.len],
                &r,
                false,
                tol,
            );
        }
    } else {
        rep.skip("rm", "no rm.safetensors".into());
    }

    // ---- AdamW: three steps of torch.optim.AdamW ----------------------------------------------
    let ad_path = dir.join("adamw.safetensors");
    if ad_path.is_file() {
        let ad = TensorFiles::open(&ad_path)?;
        let (shape, p0) = ad.read_f32("p0")?;
        let p3 = ad.read_f32_shaped("p3", &shape, "p0")?;
        let n = p0.len();
        let mut p = be.upload(&p0)?;
        let c = AdamWConfig {
            clip_norm: None,
            decay: DecayPolicy::All,
            ..AdamWConfig::default()
        };
        let mut opt =
            AdamW::<B>::with_groups(&be, vec![(crate::params::Span { off: 0, len: n }, true)], c)?;
        for step in 1..=3u64 {
            let g = be.upload(&ad.read_f32_shaped(&format!("g{step}"), &shape, "p0")?)?;
            opt.step_buffers(&be, &mut p, None, &g, 3e-4)?;
        }
        let mut out = vec![0f32; n];
        be.to_host(&mut out, B::all(&p))?;
        rep.compare(
            "adamw",
            "p3",
            &out,
            &p3,
            false,
            Tolerances {
                abs: tol.abs,
                rel: tol.rel.min(1e-5),
            },
        );
    } else {
        rep.skip("adamw", "no adamw.safetensors".into());
    }
    Ok(rep)
}

/// The reward model's ranking loss mean(−log σ(r_c − r_r − m)) and d loss / d r_c per pair
/// (d/d r_r is its negative).
pub fn ranking_loss(rc: &[f32], rr: &[f32], margin: &[f32]) -> (f32, Vec<f32>) {
    let n = rc.len() as f64;
    let mut loss = 0f64;
    let mut d = Vec::with_capacity(rc.len());
    for i in 0..rc.len() {
        let z = (rc[i] - rr[i] - margin[i]) as f64;
        // −log σ(z) = softplus(−z), computed stably.
        loss += if z > 0.0 {
            (-z).exp().ln_1p()
        } else {
            -z + z.exp().ln_1p()
        };
        let sig_neg = 1.0 / (1.0 + z.exp());
        d.push((-sig_neg / n) as f32);
    }
    ((loss / n) as f32, d)
}
