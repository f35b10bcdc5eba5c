//! A recipe's report: `report.json` (every stage's evaluation, the reward models' accuracy by
//! rating, each round's rejection-sampling and PPO numbers, GAtt's adherence per turn),
//! `report.md` and the plots, gathered from the steps' own reports.

use crate::evaluate::StageEval;
use crate::plot::{histogram_plot, line_plot, read_series};
use crate::recipe::RecipeReport;
use anyhow::Result;
use serde_json::{json, Value};
use std::path::Path;

/// Writes `report.json`, `report.md` and the plots into the recipe's output directory; returns
/// the report.
pub fn write(rep: &RecipeReport, device: &str) -> Result<Value> {
    let out = &rep.out;
    let evals = rep.evals();
    let step_seconds: f64 = rep.steps.iter().map(|d| d.seconds).sum();
    let rounds: Vec<usize> = rep
        .steps
        .iter()
        .filter_map(|d| {
            d.step
                .strip_prefix("round-")?
                .split('/')
                .next()?
                .parse()
                .ok()
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let per_round = |k: usize, stage: &str| rep.report(&format!("round-{k}/{stage}")).cloned();
    let round_rows: Vec<Value> = rounds
        .iter()
        .map(|&k| {
            json!({"round": k, "prefs": per_round(k, "prefs"), "rm": per_round(k, "rm").map(|r| rm_accuracy(&r)),
                   "rs": per_round(k, "rs"), "ppo": per_round(k, "ppo")})
        })
        .collect();
    // The last reward models trained: their held-out accuracy by rating.
    let last_rm = rep
        .steps
        .iter()
        .rev()
        .find(|d| d.step.ends_with("rm"))
        .map(|d| rm_accuracy(&d.report))
        .unwrap_or(Value::Null);
    let mut report = json!({
        "name": out.file_name().map(|s| s.to_string_lossy().to_string()),
        "device": device,
        "seconds": step_seconds,
        "rm": last_rm,
        "rounds": round_rows,
        "rs_rounds": rounds.iter().filter_map(|&k| per_round(k, "rs")).collect::<Vec<_>>(),
        "ppo_runs": rounds.iter().filter_map(|&k| per_round(k, "ppo")).collect::<Vec<_>>(),
        "stages": evals.iter().map(|e| e.stage.clone()).collect::<Vec<_>>(),
    });
    if let Some(p) = rep.report("pretrain") {
        report["pretrain"] = json!({"final_val_loss": p["final_val_loss"]});
    }
    if let Some(d) = rep.report("distill") {
        report["distill_run"] = json!({
            "prompts": d["prompts"], "kept": d["kept"],
            "mean_score_with": d["mean_score_with"], "mean_score_without": d["mean_score_without"],
        });
        // User data: the kept fraction per risk category.
        if d["by_category"].is_object() {
            report["distill_run"]["by_category"] = d["by_category"].clone();
        }
    }
    for e in &evals {
        report[&e.stage] = serde_json::to_value(e)?;
    }
    // `ppo` is the last PPO round's model; `rs_round_k`/`ppo_round_k` hold every round.
    if let Some(last) = evals
        .iter()
        .rev()
        .find(|e| e.stage.starts_with("ppo_round_"))
    {
        report["ppo"] = serde_json::to_value(last)?;
    }
    if let Some(g) = rep.report("gatt").filter(|g| g["user_after"].is_object()) {
        // User data: the helpfulness RM's score per turn, instruction present and absent, and
        // sample dialogues to read.
        let (b, a) = (&g["user_before"], &g["user_after"]);
        report["gatt"]["reward_by_turn"] = json!({
            "before_with": b["score_with"], "before_without": b["score_without"],
            "after_with": a["score_with"], "after_without": a["score_without"],
            "measured": a["measured"],
        });
        report["gatt"]["samples_after"] = a["samples"].clone();
        report["gatt"]["rows"] = g["rows"].clone();
    } else if let Some(g) = rep.report("gatt") {
        report["gatt"]["adherence_by_turn"] = json!({
            "without": g["adherence_before"]["follow"],
            "with": g["adherence_after"]["follow"],
            "measured": g["adherence_after"]["measured"],
        });
        report["gatt"]["rows"] = g["rows"].clone();
        gatt_plot(out, g)?;
    }
    if let Some(f) = rep.report(crate::recipe::FINAL_STEP) {
        report["final_eval"] = f.clone();
    }
    crate::run_dir::write_json(&out.join("report.json"), &report)?;
    std::fs::write(out.join("report.md"), markdown(&report, &evals))?;
    plots(out, &report, &evals)?;
    Ok(report)
}

/// A reward-model step's held-out accuracy by rating, per model: on the round's held-out
/// prompts' pairs where there are some, else on the model's own held-out split; with noisy world
/// raters also against the gold annotator's labels of the same pairs (`… (gold labels)`).
fn rm_accuracy(r: &Value) -> Value {
    let pick = |m: &Value| {
        if m["heldout"].is_object() {
            m["heldout"].clone()
        } else {
            m["eval"].clone()
        }
    };
    let mut v = json!({"helpfulness": pick(&r["helpfulness"]), "safety": pick(&r["safety"])});
    for k in ["helpfulness", "safety"] {
        if r[k]["heldout_gold"].is_object() {
            v[format!("{k} (gold labels)")] = r[k]["heldout_gold"].clone();
        }
    }
    v
}

fn markdown(report: &Value, evals: &[StageEval]) -> String {
    let mut md = format!(
        "# Recipe report\n\nDevice: {}. Time in the steps: {:.0} s.\n\n",
        report["device"].as_str().unwrap_or("?"),
        report["seconds"].as_f64().unwrap_or(0.0)
    );
    md += "## Every stage on held-out prompts\n\n`judge`: the mean piecewise reward R_c of one fixed pair of reward models (the \
           first the recipe trained, unless the recipe names its judge), of greedy answers and of answers sampled at \
           temperature 1. With a world, `gold` columns: its annotator's R_c (sampled, greedy), accuracy, \
           helpfulness, safety, safe rate and false refusals of the greedy answers.\n\n";
    let gold = evals.iter().any(|e| e.gold.is_some());
    md += "| stage | judge sampled | judge greedy |";
    if gold {
        md += " gold sampled R_c | gold greedy R_c | accuracy | helpfulness | safety | safe rate | false refusals |";
    }
    md += " KL to SFT |\n| --- | ---: | ---: |";
    if gold {
        md += " ---: | ---: | ---: | ---: | ---: | ---: | ---: |";
    }
    md += " ---: |\n";
    let f = |x: Option<f32>| x.map_or("-".to_string(), |v| format!("{v:.3}"));
    for e in evals {
        md += &format!(
            "| {} | {} | {} |",
            e.stage,
            f(e.judge.as_ref().map(|j| j.sampled)),
            f(e.judge.as_ref().map(|j| j.greedy))
        );
        if gold {
            let g = e.gold.clone().unwrap_or_default();
            md += &format!(
                " {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
                f(e.sampled_reward),
                f(e.reward),
                g.accuracy,
                g.helpfulness,
                g.safety,
                g.safe_rate,
                g.false_refusal_rate
            );
        }
        md += &format!(" {:.2} |\n", e.kl_to_sft);
    }
    md += "\n## Reward models (held-out pairs)\n\n| model | accuracy | significantly better | better | slightly better | negligibly better/unsure |\n| --- | ---: | ---: | ---: | ---: | ---: |\n";
    if let Some(rm) = report["rm"].as_object() {
        for (k, v) in rm {
            let lv = |name: &str| {
                v["accuracy_by_rating"][name]["accuracy"]
                    .as_f64()
                    .map(|a| format!("{a:.3}"))
                    .unwrap_or("-".into())
            };
            md += &format!(
                "| {k} | {} | {} | {} | {} | {} |\n",
                v["accuracy"]
                    .as_f64()
                    .map_or("-".into(), |a| format!("{a:.3}")),
                lv("significantly better"),
                lv("better"),
                lv("slightly better"),
                lv("negligibly better/unsure")
            );
        }
        if rm.keys().any(|k| k.ends_with("(gold labels)")) {
            md += "\nThe plain rows score the model against its raters' labels (the paper's Table 8); the \
                   world's raters perceive each answer's gold score with noise (`[prefs] rater_noise`), so \
                   their labels of similar answers are partly coin flips. The `gold labels` rows score it \
                   on the same pairs as the noise-free gold annotator orders and rates them.\n";
        }
    }
    let agreement: Vec<String> = report["rounds"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| {
            let a = r["prefs"]["rater_agreement"].as_f64()?;
            Some(format!("round {}: {:.1} %", r["round"], 100.0 * a))
        })
        .collect();
    if !agreement.is_empty() {
        md += &format!(
            "\nRaters' agreement (a second rater picks the same answer of a labelled pair): {}.\n",
            agreement.join(", ")
        );
    }
    if let Some(rs) = report["rs_rounds"].as_array().filter(|a| !a.is_empty()) {
        md += "\n## Rejection sampling\n\nThe mean over prompts of the best and the median reward of K samples (the \
               gap is Figure 7), the temperature sampled at (Figure 8's pick when swept: mean best-of-K \
               on held-out prompts per temperature), and the pool's answers re-scored by the round's \
               reward models and displaced by new ones.\n\n\
               | round | prompts x K | temperature | mean max | mean median | pool | re-scored | displaced | sweep (T: best-of-K) |\n\
               | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n";
        for r in rs {
            let n = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
            let sweep: Vec<String> = r["sweep"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    format!(
                        "{}: {:.3}",
                        s["temperature"],
                        s["mean_max"].as_f64().unwrap_or(f64::NAN)
                    )
                })
                .collect();
            md += &format!(
                "| {} | {} x {} | {} | {:.3} | {:.3} | {} | {} | {} | {} |\n",
                r["round"],
                r["prompts"],
                r["k"],
                r["temperature"],
                n("mean_max"),
                n("mean_median"),
                r["pool"],
                r["rescored"],
                r["displaced"],
                if sweep.is_empty() {
                    "-".into()
                } else {
                    sweep.join(", ")
                }
            );
        }
    }
    if let (Some(w), Some(wo)) = (
        report["gatt"]["adherence_by_turn"]["with"].as_array(),
        report["gatt"]["adherence_by_turn"]["without"].as_array(),
    ) {
        md += "\n## Ghost Attention: instruction adherence per turn (held-out)\n\n| turn | without GAtt | with GAtt |\n| ---: | ---: | ---: |\n";
        for (i, (a, b)) in wo.iter().zip(w).enumerate() {
            md += &format!(
                "| {} | {:.3} | {:.3} |\n",
                i + 1,
                a.as_f64().unwrap_or(0.0),
                b.as_f64().unwrap_or(0.0)
            );
        }
    }
    md += &final_markdown(&report["final_eval"]);
    let r = &report["gatt"]["reward_by_turn"];
    if let (Some(bw), Some(bo), Some(aw), Some(ao)) = (
        r["before_with"].as_array(),
        r["before_without"].as_array(),
        r["after_with"].as_array(),
        r["after_without"].as_array(),
    ) {
        md += "\n## Ghost Attention on your data: reward-model score per turn, instruction present / absent\n\n| turn | before GAtt | after GAtt |\n| ---: | ---: | ---: |\n";
        let f = |v: &Value| v.as_f64().unwrap_or(0.0);
        for (i, (((x, y), z), w)) in bw.iter().zip(bo).zip(aw).zip(ao).enumerate() {
            md += &format!(
                "| {} | {:.3} / {:.3} | {:.3} / {:.3} |\n",
                i + 1,
                f(x),
                f(y),
                f(z),
                f(w)
            );
        }
    }
    let d = &report["distill_run"];
    if let (Some(n), Some(kept)) = (d["prompts"].as_u64(), d["kept"].as_u64()) {
        md += &format!(
            "\n## Context distillation\n\n{kept} of {n} answers under a safety preprompt kept (the safety reward model scored them above the plain answer; its mean score {:.2} with the preprompt, {:.2} without).{}\n",
            d["mean_score_with"].as_f64().unwrap_or(f64::NAN),
            d["mean_score_without"].as_f64().unwrap_or(f64::NAN),
            if kept == 0 {
                " None kept: the stage fine-tuned nothing, and its model is the previous stage's."
            } else {
                ""
            }
        );
    }
    if let Some(c) = report["distill_run"]["by_category"].as_object() {
        md += "\n## Context distillation: answers kept per risk category\n\n| category | prompts | kept |\n| --- | ---: | ---: |\n";
        for (name, k) in c {
            md += &format!("| {name} | {} | {} |\n", k["prompts"], k["kept"]);
        }
    }
    md += "\nPlots: `loss.svg` (pretraining and SFT), `reward_by_stage.svg` (the judge's reward per stage), `rs_rewards.svg` (max vs median of K per round), `fig7.svg` (max and median reward among N samples, per round), `fig8-round-*.svg` (best-of-N per swept temperature), `ppo_gold_vs_proxy.svg` (reward hacking shows as the curves diverging), `gatt_adherence.svg`, `rm_accuracy_by_rating.svg`, `round-*/rm-*/scores.svg`.\n";
    md
}

/// The final step's numbers: win rate of the final model against SFT, refusals, Figure 20.
fn final_markdown(f: &Value) -> String {
    let Ok(r) = serde_json::from_value::<crate::user_eval::UserEvalReport>(f.clone()) else {
        return String::new();
    };
    format!(
        "\n## Final model against SFT, refusals and every stage's reward (Figure 20)\n\nThe last stage's \
         model against the SFT model on the same prompts under one judge (win rate: wins / (wins + \
         losses), 95 % Wilson interval); refusals by the refusal rule; the judge's R_c of every \
         stage's greedy answers (`eval/final/fig20.svg`, `fig20.jsonl`, `fig20.csv`).\n\n```\n{}```\n",
        crate::user_eval::table(&r)
    )
}

fn plots(out: &Path, report: &Value, evals: &[StageEval]) -> Result<()> {
    let series = |p: &Path| read_series(p, "step", &["loss", "val_loss"]).unwrap_or_default();
    let (p, s) = (
        series(&out.join("pretrain/metrics.jsonl")),
        series(&out.join("sft/metrics.jsonl")),
    );
    let get = |v: &Vec<Vec<(f64, f64)>>, i: usize| v.get(i).cloned().unwrap_or_default();
    line_plot(
        &out.join("loss.svg"),
        "loss curves",
        "step",
        "cross-entropy (nats/token)",
        &[
            ("pretrain", &get(&p, 0)),
            ("pretrain val", &get(&p, 1)),
            ("sft", &get(&s, 0)),
            ("sft val", &get(&s, 1)),
        ],
    )?;
    let hist: Vec<(&str, &[f64])> = evals
        .iter()
        .filter(|e| !e.rewards.is_empty())
        .map(|e| (e.stage.as_str(), e.rewards.as_slice()))
        .collect();
    if !hist.is_empty() {
        histogram_plot(
            &out.join("reward_by_stage.svg"),
            "the judge's reward of each stage's answers",
            "piecewise reward (sigmoid)",
            &hist,
            20,
        )?;
    }
    if report["rm"].is_object() {
        rm_accuracy_plot(out, &report["rm"])?;
    }
    let rs: Vec<crate::rs::RoundStats> = report["rs_rounds"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| serde_json::from_value(v.clone()).ok())
                .collect()
        })
        .unwrap_or_default();
    if !rs.is_empty() {
        crate::rs::write_report(out, &rs)?;
    }
    if let Some(last) = report["rounds"]
        .as_array()
        .and_then(|r| r.iter().rev().find(|r| r["ppo"].is_object()))
    {
        let k = last["round"].as_u64().unwrap_or(0);
        let src = out.join(format!("round-{k}/ppo/metrics.jsonl"));
        gold_vs_proxy_plot(&src, &out.join("ppo_gold_vs_proxy.svg"))?;
    }
    Ok(())
}

/// The reward models' held-out accuracy by the annotators' rating (the paper's Table 8).
fn rm_accuracy_plot(out: &Path, rm: &Value) -> Result<()> {
    let ratings = [
        "significantly better",
        "better",
        "slightly better",
        "negligibly better/unsure",
    ];
    let series: Vec<(&str, Vec<Option<f64>>)> = [
        "helpfulness",
        "safety",
        "helpfulness (gold labels)",
        "safety (gold labels)",
    ]
    .iter()
    .filter(|k| !k.ends_with("(gold labels)") || rm[**k].is_object())
    .map(|k| {
        let v = ratings
            .iter()
            .map(|r| rm[*k]["accuracy_by_rating"][*r]["accuracy"].as_f64())
            .collect();
        (*k, v)
    })
    .collect();
    crate::plot::bar_plot(
        &out.join("rm_accuracy_by_rating.svg"),
        "reward-model accuracy by rating (held-out pairs)",
        "accuracy",
        &ratings,
        &series,
    )
}

/// Instruction adherence per turn with and without Ghost Attention.
fn gatt_plot(out: &Path, g: &Value) -> Result<()> {
    let pts = |v: &Value| -> Vec<(f64, f64)> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .enumerate()
                    .map(|(i, x)| ((i + 1) as f64, x.as_f64().unwrap_or(0.0)))
                    .collect()
            })
            .unwrap_or_default()
    };
    line_plot(
        &out.join("gatt_adherence.svg"),
        "instruction adherence per turn (instruction given at turn 1)",
        "turn",
        "share of answers following the instruction",
        &[
            ("without GAtt", &pts(&g["adherence_before"]["follow"])),
            ("with GAtt", &pts(&g["adherence_after"]["follow"])),
        ],
    )
}

/// Gold vs reward-model reward per PPO iteration: reward hacking shows as the two diverging.
fn gold_vs_proxy_plot(metrics: &Path, svg: &Path) -> Result<()> {
    let s = read_series(metrics, "iteration", &["reward", "gold_reward"])?;
    let get = |i: usize| s.get(i).cloned().unwrap_or_default();
    line_plot(
        svg,
        "PPO: reward-model (proxy) vs gold reward of the rollouts",
        "iteration",
        "mean R_c",
        &[
            ("reward models (proxy)", &get(0)),
            ("gold annotator", &get(1)),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_markdown_has_each_rs_rounds_temperature_sweep_and_displaced_answers() {
        let r = json!({"rs_rounds": [
            {"round": 1, "prompts": 20, "k": 4, "temperature": 1.2, "mean_max": 0.7, "mean_median": 0.5,
             "pool": 20, "rescored": 0, "displaced": 0, "sweep": []},
            {"round": 2, "prompts": 20, "k": 4, "temperature": 0.8, "mean_max": 0.8, "mean_median": 0.6,
             "pool": 20, "rescored": 20, "displaced": 7,
             "sweep": [{"temperature": 0.8, "mean_max": 0.81}, {"temperature": 1.2, "mean_max": 0.75}]},
        ]});
        let md = markdown(&r, &[]);
        assert!(md.contains("## Rejection sampling"), "{md}");
        assert!(!md.contains("## Context distillation"), "{md}");
        assert!(
            md.contains("| 1 | 20 x 4 | 1.2 | 0.700 | 0.500 | 20 | 0 | 0 | - |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| 2 | 20 x 4 | 0.8 | 0.800 | 0.600 | 20 | 20 | 7 | 0.8: 0.810, 1.2: 0.750 |"
            ),
            "{md}"
        );
    }

    #[test]
    fn the_markdown_says_how_many_distilled_answers_were_kept_and_when_none() {
        let r = |kept: u64| {
            json!({"distill_run": {"prompts": 108, "kept": kept,
                "mean_score_with": -0.66, "mean_score_without": 6.18}})
        };
        let md = markdown(&r(0), &[]);
        assert!(md.contains("## Context distillation"), "{md}");
        assert!(md.contains("0 of 108 answers"), "{md}");
        assert!(
            md.contains("-0.66 with the preprompt, 6.18 without"),
            "{md}"
        );
        assert!(md.contains("None kept"), "{md}");
        let md = markdown(&r(19), &[]);
        assert!(
            md.contains("19 of 108 answers") && !md.contains("None kept"),
            "{md}"
        );
    }

    /// With noisy world raters, the gold-label accuracy comes from the RM step's
    /// `heldout_gold`, shows as its own rows, and the raters' agreement is said per round.
    #[test]
    fn noisy_raters_add_gold_label_rows_and_their_agreement() {
        let acc = |a: f64| json!({"accuracy": a, "pairs": 10, "accuracy_by_rating": {"significantly better": {"accuracy": a, "pairs": 10}}});
        let step = json!({"helpfulness": {"heldout": acc(0.6), "heldout_gold": acc(0.7)},
                          "safety": {"heldout": acc(0.9)}});
        let rm = rm_accuracy(&step);
        assert_eq!(rm["helpfulness (gold labels)"]["accuracy"], json!(0.7));
        assert!(rm.get("safety (gold labels)").is_none(), "{rm}");
        let r = json!({"rm": rm, "rounds": [{"round": 1, "prefs": {"rater_agreement": 0.731}}]});
        let md = markdown(&r, &[]);
        assert!(
            md.contains("| helpfulness (gold labels) | 0.700 | 0.700 | - | - | - |"),
            "{md}"
        );
        assert!(md.contains("| helpfulness | 0.600 | 0.600 |"), "{md}");
        assert!(md.contains("round 1: 73.1 %"), "{md}");
        let plain = markdown(
            &json!({"rm": rm_accuracy(&json!({"helpfulness": {"heldout": acc(0.6)}}))}),
            &[],
        );
        assert!(!plain.contains("gold labels"), "{plain}");
    }
}
