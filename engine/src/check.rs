//! The reference checker: runs a fixture directory (the format of `shared/fixtures/README.md`,
//! made by Hugging Face transformers from any Llama checkpoint) through the engine and compares
//! every tensor: logits, loss, every gradient, the reward-model case and the AdamW case.

use crate::backend::Backend;
use crate::checkpoint::{load_weights, TensorFiles};
use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::model::{shift_labels, Batch};
use crate::optim::{AdamW, AdamWConfig, DecayPolicy};
use crate::params::Head;
use std::path::Path;

/// Pass bounds. `abs` applies to the loss and rewards (max |ours − ref|); `logits_rel` to the
/// logits and `rel` to gradients and parameters, as max |ours − ref| / max |ref| over the
/// tensor (so real weights, whose logits reach ~20, are held to the same relative precision as
/// the random fixtures, whose logits stay near 1).
#[derive(Clone, Copy, Debug)]
pub struct Tolerances {
    pub abs: f32,
    pub rel: f32,
    pub logits_rel: f32,
}

impl Tolerances {
    /// A correct f32 implementation: the fixture README's ~1e-5 absolute, ~1e-4 of each
    /// tensor's max; logits 1e-5 of their largest magnitude (the shared fixtures measure
    /// 1.2e-6 and 1.6e-6).
    pub const F32: Tolerances = Tolerances {
        abs: 2e-5,
        rel: 1e-4,
        logits_rel: 1e-5,
    };
    /// bf16 compute (the CUDA backend): activations and compute weights carry 8 bits of
    /// mantissa, a relative rounding error of 2^-9 ≈ 2e-3 per value, and the fixtures' logits
    /// are O(1)–O(10) after a few layers whose errors add up. The loss gets 5e-2 absolute
    /// (≈ 10 roundings of a magnitude-2 value), the logits 2e-2 of their largest magnitude
    /// (≈ 5e-2 at the fixtures' scale); gradients 3e-2 of each tensor's largest entry (bf16
    /// activations in both passes, f32 accumulation in every reduction). These are estimates
    /// from that arithmetic, not measurements (no GPU has run the fixtures yet): tighten or
    /// widen them only with a measured reason.
    pub const BF16: Tolerances = Tolerances {
        abs: 5e-2,
        rel: 3e-2,
        logits_rel: 2e-2,
    };

    /// Every bound must be a finite number >= 0: a negative or NaN bound would pass or fail
    /// everything regardless of the numbers.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("atol", self.abs),
            ("rtol", self.rel),
            ("logits-rtol", self.logits_rel),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(Error::Input(format!(
                    "tolerance --{name} {v}: expected a finite number >= 0"
                )));
            }
        }
        Ok(())
    }
}

/// Which bound decides a comparison.
#[derive(Clone, Copy, Debug)]
enum Bound {
    Abs(f32),
    Rel(f32),
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
    /// Why a row failed beyond the bound (non-finite values, a length mismatch).
    pub note: String,
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

    fn skip(&mut self, case: &str, tensor: &str, why: String) {
        self.rows.push(Row {
            case: case.into(),
            tensor: tensor.into(),
            max_abs: 0.0,
            max_rel: 0.0,
            tol: "-".into(),
            status: Status::Skip(why),
            note: String::new(),
        });
    }

    /// One row for the gradients a case file does not hold, instead of one row each.
    fn skip_grads(&mut self, case: &str, file: &str, missing: &[String], of: usize) {
        if missing.is_empty() {
            return;
        }
        let tensor = format!("grad.* ({} of {of})", missing.len());
        let why = if missing.len() == of {
            format!("no gradients in {file}")
        } else {
            format!("not in {file}: {}", missing.join(", "))
        };
        self.skip(case, &tensor, why);
    }

    /// Compares `ours` with `reference` under `bound`. Any non-finite value on either side, or a
    /// length mismatch, fails the row and shows NaN: a NaN must never read as a zero error.
    fn compare(&mut self, case: &str, tensor: &str, ours: &[f32], reference: &[f32], bound: Bound) {
        let mut max_abs = 0f32;
        let mut scale = 0f32;
        for (a, b) in ours.iter().zip(reference) {
            max_abs = max_abs.max((a - b).abs());
            scale = scale.max(b.abs());
        }
        let bad = |x: &[f32]| x.iter().filter(|v| !v.is_finite()).count();
        let note = match (bad(ours), bad(reference)) {
            _ if ours.len() != reference.len() => format!(
                "{} values, the reference has {}",
                ours.len(),
                reference.len()
            ),
            (0, 0) => String::new(),
            (0, r) => format!("the reference holds {r} non-finite value(s)"),
            (o, 0) => format!("ours holds {o} non-finite value(s)"),
            (o, r) => format!("ours holds {o} and the reference {r} non-finite value(s)"),
        };
        let max_rel = if scale > 0.0 {
            max_abs / scale
        } else {
            max_abs
        };
        let (max_abs, max_rel) = if note.is_empty() {
            (max_abs, max_rel)
        } else {
            (f32::NAN, f32::NAN)
        };
        let (ok, tol_s) = match bound {
            Bound::Abs(t) => (max_abs <= t, format!("abs {t:.0e}")),
            Bound::Rel(t) => (max_rel <= t, format!("rel {t:.0e}")),
        };
        self.rows.push(Row {
            case: case.into(),
            tensor: tensor.into(),
            max_abs,
            max_rel,
            tol: tol_s,
            status: if ok && note.is_empty() {
                Status::Pass
            } else {
                Status::Fail
            },
            note,
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
                Status::Fail if r.note.is_empty() => "FAIL".to_string(),
                Status::Fail => format!("FAIL: {}", r.note),
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

/// Runs every case found in `dir` on the backend `be`. A directory with no case at all is an
/// error, so an empty fixture cannot end in `0 passed, 0 failed` and a zero exit status.
pub fn check_fixture<B: Backend>(be: B, dir: &Path, tol: Tolerances) -> Result<Report> {
    tol.validate()?;
    let cfg = LlamaConfig::from_file(&dir.join("config.json"))?;
    let weights = TensorFiles::open(dir)?;
    let mut rep = Report::default();
    let (case_path, rm_path, ad_path) = (
        dir.join("case.safetensors"),
        dir.join("rm.safetensors"),
        dir.join("adamw.safetensors"),
    );
    if !case_path.is_file() && !rm_path.is_file() && !ad_path.is_file() {
        return Err(Error::file(
            dir,
            "nothing to check: no case.safetensors, rm.safetensors or adamw.safetensors",
        ));
    }

    // ---- causal LM: logits, and with labels the loss and every gradient ----------------------
    if case_path.is_file() {
        let case = TensorFiles::open(&case_path)?;
        let (mut model, _) = load_weights(be.clone(), cfg.clone(), Head::Lm, &weights, &[])?;
        let (b, t, ids) = read_2d_ids(&case, "input_ids")?;
        model.forward(&Batch::new(&ids, b, t))?;
        let logits = model.logits_to_host()?;
        let ref_logits = case.read_f32_shaped(
            "logits",
            &[b, t, cfg.vocab_size],
            "input_ids and config.json",
        )?;
        rep.compare(
            "lm",
            "logits",
            &logits,
            &ref_logits,
            Bound::Rel(tol.logits_rel),
        );
        if case.contains("labels") {
            let (lb, lt, labels) = read_2d_ids(&case, "labels")?;
            if (lb, lt) != (b, t) {
                return Err(Error::tensor(
                    &case_path,
                    "labels",
                    format!("shape [{lb}, {lt}], input_ids is [{b}, {t}]"),
                ));
            }
            let targets = shift_labels(&labels, b, t);
            let (loss, count) = model.lm_loss(&targets)?;
            if case.contains("loss") {
                let r = read_scalar(&case, "loss")?;
                rep.compare("lm", "loss", &[loss], &[r], Bound::Abs(tol.abs));
            } else {
                rep.skip("lm", "loss", "no `loss` in case.safetensors".into());
            }
            model.zero_grads()?;
            model.backward_lm(1.0 / count.max(1) as f32)?;
            let grads = model.grads_to_host()?;
            let mut missing = Vec::new();
            for e in &model.table.entries {
                let gname = format!("grad.{}", e.name);
                if !case.contains(&gname) {
                    missing.push(gname);
                    continue;
                }
                let r = case.read_f32_shaped(&gname, &e.shape, "the parameter's shape")?;
                let ours = &grads[e.span.off..e.span.off + e.span.len];
                rep.compare("lm", &gname, ours, &r, Bound::Rel(tol.rel));
            }
            rep.skip_grads(
                "lm",
                "case.safetensors",
                &missing,
                model.table.entries.len(),
            );
        } else {
            rep.skip(
                "lm",
                "loss, grad.*",
                "no `labels` in case.safetensors (a logits-only case)".into(),
            );
        }
    } else {
        rep.skip("lm", "-", "no case.safetensors".into());
    }

    // ---- reward model: rewards, ranking loss, gradients ---------------------------------------
    if rm_path.is_file() {
        let rm = TensorFiles::open(&rm_path)?;
        let (mut model, _) = load_weights(
            be.clone(),
            cfg.clone(),
            Head::Score,
            &weights,
            &["score.weight"],
        )?;
        let score = model.table.get("score.weight").expect("score head").clone();
        let sw = rm.read_f32_shaped("score.weight", &score.shape, "hidden_size")?;
        let mut host = model.params_to_host()?;
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
        let abs = Bound::Abs(tol.abs);
        let ref_c = rm.read_f32_shaped("reward_chosen", &[n], "chosen_ids")?;
        rep.compare("rm", "reward_chosen", rc, &ref_c, abs);
        let ref_r = rm.read_f32_shaped("reward_rejected", &[n], "chosen_ids")?;
        rep.compare("rm", "reward_rejected", rr, &ref_r, abs);
        let (loss, dz) = ranking_loss(rc, rr, &margin);
        rep.compare("rm", "loss", &[loss], &[read_scalar(&rm, "loss")?], abs);
        let d: Vec<f32> = dz.iter().copied().chain(dz.iter().map(|x| -x)).collect();
        model.zero_grads()?;
        model.backward_scores(&d)?;
        let grads = model.grads_to_host()?;
        let mut missing = Vec::new();
        for e in &model.table.entries {
            let gname = format!("grad.{}", e.name);
            if !rm.contains(&gname) {
                missing.push(gname);
                continue;
            }
            let r = rm.read_f32_shaped(&gname, &e.shape, "the parameter's shape")?;
            let ours = &grads[e.span.off..e.span.off + e.span.len];
            rep.compare("rm", &gname, ours, &r, Bound::Rel(tol.rel));
        }
        rep.skip_grads("rm", "rm.safetensors", &missing, model.table.entries.len());
    } else {
        rep.skip("rm", "-", "no rm.safetensors".into());
    }

    // ---- AdamW: three steps of torch.optim.AdamW ----------------------------------------------
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
        rep.compare("adamw", "p3", &out, &p3, Bound::Rel(tol.rel.min(1e-5)));
    } else {
        rep.skip("adamw", "-", "no adamw.safetensors".into());
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

#[cfg(test)]
mod tests {
    use super::*;

    /// NaN on either side fails the row and shows NaN, never a zero error.
    #[test]
    fn nan_never_passes() {
        let mut rep = Report::default();
        let b = Bound::Abs(1e-5);
        rep.compare("lm", "ref", &[1.0, 2.0], &[1.0, f32::NAN], b);
        rep.compare("lm", "ours", &[f32::NAN, 2.0], &[1.0, 2.0], b);
        rep.compare("lm", "inf", &[1.0], &[f32::INFINITY], Bound::Rel(1e-4));
        rep.compare("lm", "len", &[1.0], &[1.0, 2.0], b);
        rep.compare("lm", "fine", &[1.0], &[1.0], b);
        assert_eq!((rep.passed(), rep.failed()), (1, 4));
        for r in &rep.rows[..4] {
            assert!(r.max_abs.is_nan() && !r.note.is_empty(), "{r:?}");
        }
        assert!(rep.to_table().contains("NaN"));
    }

    #[test]
    fn negative_or_nan_tolerances_are_errors() {
        for t in [
            Tolerances {
                abs: -1.0,
                ..Tolerances::F32
            },
            Tolerances {
                rel: f32::NAN,
                ..Tolerances::F32
            },
            Tolerances {
                logits_rel: f32::INFINITY,
                ..Tolerances::F32
            },
        ] {
            assert!(t.validate().is_err(), "{t:?}");
        }
        Tolerances::F32.validate().unwrap();
    }
}
