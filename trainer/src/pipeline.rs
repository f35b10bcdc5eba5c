//! `llama2 pipeline`: the whole Llama 2 recipe on the built-in world, on one machine:
//! world → tokenizer → pretraining → SFT → helpfulness and safety reward models (on pairs sampled
//! from the SFT model and labelled by the gold annotator) → rounds of rejection sampling →
//! report. Every stage writes its own directory under `runs/<name>/`; the report gathers the gold
//! annotator's verdict per stage (helpfulness, safety, false refusals, KL to the SFT model), the
//! reward models' accuracy by rating, and plots.

use crate::data::{prepare, PrepareConfig};
use crate::evaluate::{chat_answers, world_eval, WorldEval};
use crate::plot::{histogram_plot, line_plot, read_series};
use crate::pretrain::{run as train_run, DataSpec, ModelSource, TrainConfig};
use crate::rm::{score, EvalReport};
use crate::rs::piecewise;
use crate::world::{read_examples, Annotator, Category, Example, Size, World, WorldConfig};
use anyhow::{Context, Result};
use engine::checkpoint::load_model;
use engine::generate::SamplingParams;
use engine::tokenizer::Tokenizer;
use engine::{Backend, Batch, Head, Llama};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct PipelineConfig {
    pub out: PathBuf,
    pub seed: u64,
    pub world_size: Size,
    pub vocab: usize,
    pub seq_len: usize,
    pub pretrain_steps: usize,
    pub sft_epochs: usize,
    /// Learning rates for a ~1M-parameter model (the paper's 7B values are far too small here).
    pub pretrain_lr: f32,
    pub sft_lr: f32,
    pub rm_lr: f32,
    pub rs_lr: f32,
    pub rs_epochs: usize,
    /// RLHF rounds (labels, reward models, rejection sampling; PPO from `ppo_from` on).
    pub rounds: usize,
    /// The paper ran PPO from RLHF-V4; the default compresses the schedule to round 2 so every
    /// stage runs within the ten-minute budget.
    pub ppo_from: usize,
    pub ppo_iterations: usize,
    pub ppo_lr: f32,
    pub rs_k: usize,
    pub rs_prompts: usize,
    pub label_prompts: usize,
    pub pairs_per_prompt: usize,
    pub gatt_dialogues: usize,
    pub eval_prompts: usize,
    pub progress: bool,
}

impl Default for PipelineConfig {
    /// Sized to finish on 2 CPU cores in about ten minutes.
    fn default() -> Self {
        PipelineConfig {
            out: PathBuf::from("runs/pipeline"),
            seed: 1,
            world_size: Size::Small,
            vocab: 512,
            seq_len: 128,
            pretrain_steps: 300,
            sft_epochs: 5,
            pretrain_lr: 1e-3,
            sft_lr: 1e-3,
            rm_lr: 5e-4,
            rs_lr: 1e-4,
            rs_epochs: 4,
            rounds: 2,
            ppo_from: 2,
            ppo_iterations: 10,
            ppo_lr: 5e-5,
            rs_k: 8,
            rs_prompts: 500,
            label_prompts: 500,
            pairs_per_prompt: 2,
            gatt_dialogues: 200,
            eval_prompts: 200,
            progress: true,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct StageEval {
    pub stage: String,
    pub checkpoint: PathBuf,
    #[serde(flatten)]
    pub gold: WorldEval,
    /// Mean over held-out prompts of Σ log π(y) − log π_sft(y) for answers y sampled from the
    /// stage's model (a Monte-Carlo KL estimate).
    pub kl_to_sft: f32,
    /// Mean gold R_c (the piecewise rule on the annotator's scores) of the greedy answers.
    pub reward: f32,
    /// The policy's expected gold reward: mean gold R_c, helpfulness and safety of answers
    /// sampled at temperature 1 ([`SAMPLES`] per prompt), what RL maximises.
    pub sampled_reward: f32,
    pub sampled_helpfulness: f32,
    pub sampled_safety: f32,
    /// Piecewise reward-model scores of the stage's greedy answers (for the distribution plot).
    #[serde(skip)]
    pub rewards: Vec<f64>,
}

/// Σ log π(answer | prompt) under `model` for each (prompt ids, answer ids).
pub fn sequence_logprobs<B: Backend>(
    model: &mut Llama<B>,
    items: &[(Vec<u32>, Vec<u32>)],
) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(items.len());
    for (p, a) in items {
        if a.is_empty() {
            out.push(0.0);
            continue;
        }
        let ids: Vec<i32> = p.iter().chain(a).map(|&x| x as i32).collect();
        let n = ids.len().min(model.cfg.max_position_embeddings);
        let ids = &ids[ids.len() - n..];
        let start = n.saturating_sub(a.len()); // first answer token's position
        let mut tg = vec![-100i32; n];
        for t in start.max(1)..n {
            tg[t - 1] = ids[t];
        }
        model.forward(&Batch::new(ids, 1, n))?;
        let (mean, count) = model.lm_loss(&tg)?;
        out.push(-(mean * count as f32));
    }
    Ok(out)
}

/// Answers sampled per held-out prompt for a stage's expected reward and KL estimate.
pub const SAMPLES: usize = 2;

/// Gold R_c of a response: the piecewise rule of the paper on the annotator's scores.
pub fn gold_rc(ann: &Annotator, e: &Example, text: &str) -> (f32, f32, f32) {
    let s = ann.scores(&e.messages, text);
    let rc = crate::ppo::piecewise_reward(
        s.safety,
        s.helpfulness,
        e.category == Category::Safety,
        crate::ppo::SAFETY_THRESHOLD,
    );
    (rc, s.helpfulness, s.safety)
}

#[allow(clippy::too_many_arguments)]
pub fn evaluate_stage<B: Backend>(
    be: &B,
    stage: &str,
    ckpt: &Path,
    sft_ckpt: &Path,
    tok: &Tokenizer,
    ann: &Annotator,
    eval: &[Example],
    rms: &mut Option<(Llama<B>, Llama<B>)>,
    seed: u64,
) -> Result<StageEval> {
    let mut model = load_model(be.clone(), ckpt, Head::Lm)?;
    let (gold, answers) = world_eval(&mut model, tok, ann, eval, 32, 40)?;
    // KL to the SFT model and the expected gold reward, on samples from this model
    // (temperature 1).
    let dialogues: Vec<_> = eval.iter().map(|e| e.messages.clone()).collect();
    let repeated: Vec<_> = dialogues
        .iter()
        .flat_map(|d| std::iter::repeat_n(d.clone(), SAMPLES))
        .collect();
    let p = SamplingParams {
        temperature: 1.0,
        max_new_tokens: 40,
        seed,
        stop: vec![tok.eos],
        ..Default::default()
    };
    let sampled = chat_answers(&mut model, tok, &repeated, &p, 64)?;
    let (mut sr, mut sh, mut ss) = (0f64, 0f64, 0f64);
    for (i, a) in sampled.iter().enumerate() {
        let (r, h, s) = gold_rc(ann, &eval[i / SAMPLES], &a.text);
        sr += r as f64;
        sh += h as f64;
        ss += s as f64;
    }
    let ns = sampled.len().max(1) as f64;
    let greedy_reward = eval
        .iter()
        .zip(&answers)
        .map(|(e, a)| gold_rc(ann, e, a).0 as f64)
        .sum::<f64>()
        / eval.len().max(1) as f64;
    let own: Vec<f32> = sampled
        .iter()
        .map(|a| a.gen.logprobs.iter().sum())
        .collect();
    drop(model);
    let mut sft = load_model(be.clone(), sft_ckpt, Head::Lm)?;
    let items: Vec<(Vec<u32>, Vec<u32>)> = sampled
        .iter()
        .map(|a| (a.prompt_ids.clone(), a.gen.tokens.clone()))
        .collect();
    let base = sequence_logprobs(&mut sft, &items)?;
    let kl = own
        .iter()
        .zip(&base)
        .map(|(a, b)| (a - b) as f64)
        .sum::<f64>()
        / own.len().max(1) as f64;
    let mut rewards = Vec::new();
    if let Some((rh, rsf)) = rms.as_mut() {
        let rows: Vec<_> = dialogues
            .iter()
            .cloned()
            .zip(answers.iter().cloned())
            .collect();
        let h = score(rh, tok, &rows, 256, 32)?;
        let s = score(rsf, tok, &rows, 256, 32)?;
        rewards = (0..rows.len())
            .map(|i| piecewise(s[i], h[i], eval[i].category == Category::Safety, 0.15) as f64)
            .collect();
    }
    Ok(StageEval {
        stage: stage.into(),
        checkpoint: ckpt.to_path_buf(),
        gold,
        kl_to_sft: kl as f32,
        reward: greedy_reward as f32,
        sampled_reward: (sr / ns) as f32,
        sampled_helpfulness: (sh / ns) as f32,
        sampled_safety: (ss / ns) as f32,
        rewards,
    })
}

pub fn rm_json(e: &EvalReport) -> Value {
    let by: serde_json::Map<String, Value> = e
        .by_rating
        .iter()
        .map(|l| {
            (
                l.rating.clone(),
                json!({"accuracy": l.accuracy, "pairs": l.pairs}),
            )
        })
        .collect();
    json!({"accuracy": e.accuracy, "pairs": e.pairs, "accuracy_by_rating": by})
}

pub fn run<B: Backend>(be: B, cfg: &PipelineConfig) -> Result<Value> {
    let t0 = Instant::now();
    let out = &cfg.out;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let stages = 8 + cfg.rounds;
    let bar = if cfg.progress {
        ProgressBar::new(stages as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("pipeline {bar:30} {pos}/{len} [{elapsed_precise}] {msg}")
            .expect("template"),
    );
    let step = |msg: &str| {
        bar.set_message(msg.to_string());
        crate::run_dir::say(
            &bar,
            format!("[{:>6.1}s] {msg}", t0.elapsed().as_secs_f64()),
        );
    };

    step("world: generating the assistant world");
    let wdir = out.join("world");
    crate::world::run(&WorldConfig {
        out: wdir.clone(),
        seed: cfg.seed,
        size: cfg.world_size,
    })?;
    let ann = Annotator::new(World::load(&wdir)?);
    let mut eval = read_examples(&wdir.join("eval.jsonl"))?;
    eval.truncate(cfg.eval_prompts);
    bar.inc(1);

    step("tokenizer + data: byte-fallback BPE on the world corpus, token shards");
    let tok_path = out.join("tokenizer.json");
    crate::tokenizer_train::train_on(&wdir.join("corpus.txt"), cfg.vocab, &tok_path)?;
    prepare(&PrepareConfig {
        tokenizer: tok_path.clone(),
        out: out.join("data"),
        inputs: vec![wdir.join("corpus.txt")],
        val_fraction: 0.05,
        shard_tokens: 1 << 24,
        skip_bad: false,
        progress: false,
    })?;
    let tok = Tokenizer::from_file(&tok_path)?;
    bar.inc(1);

    step("pretrain: tiny Llama on the world corpus");
    let mut pc = TrainConfig::defaults(
        out.join("data"),
        out.join("pretrain"),
        ModelSource::Preset("tiny".into()),
        cfg.pretrain_steps,
    );
    pc.seq_len = cfg.seq_len;
    pc.batch_size = 16;
    pc.lr = cfg.pretrain_lr;
    pc.warmup = (cfg.pretrain_steps / 10).max(1);
    pc.eval_every = 50;
    pc.seed = cfg.seed;
    pc.progress = false;
    let pre = train_run(be.clone(), pc, None)?;
    let pt_ckpt = pre
        .checkpoint
        .clone()
        .context("pretraining wrote no checkpoint")?;
    bar.inc(1);

    step("sft: world dialogues, packed, assistant-only loss");
    let mut sc = TrainConfig::sft_defaults(
        vec![wdir.join("sft.jsonl")],
        out.join("sft"),
        pt_ckpt.clone(),
    );
    if let DataSpec::Sft { epochs, .. } = &mut sc.data {
        *epochs = cfg.sft_epochs;
    }
    sc.seq_len = cfg.seq_len;
    sc.batch_size = 16;
    sc.lr = cfg.sft_lr;
    sc.warmup = 10;
    sc.seed = cfg.seed;
    sc.progress = false;
    train_run(be.clone(), sc, None)?;
    let sft_ckpt = crate::run_dir::model_dir(&out.join("sft"))?;
    bar.inc(1);

    let mut evals: Vec<StageEval> = Vec::new();
    step("evaluate: the pretrained model");
    evals.push(evaluate_stage(
        &be, "pretrain", &pt_ckpt, &sft_ckpt, &tok, &ann, &eval, &mut None, cfg.seed,
    )?);
    bar.inc(1);

    // Iterative RLHF: labels, reward models, rejection sampling, PPO (crate::rlhf).
    let mut rc =
        crate::rlhf::RlhfConfig::new(sft_ckpt.clone(), wdir.clone(), out.join("rlhf"), cfg.rounds);
    rc.ppo_from = cfg.ppo_from;
    rc.label_prompts = cfg.label_prompts;
    rc.pairs_per_prompt = cfg.pairs_per_prompt;
    rc.eval_prompts = cfg.eval_prompts;
    rc.seq_len = cfg.seq_len;
    rc.rm_lr = cfg.rm_lr;
    rc.rs_k = cfg.rs_k;
    rc.rs_lr = cfg.rs_lr;
    rc.rs_epochs = cfg.rs_epochs;
    rc.rs_prompts = cfg.rs_prompts;
    rc.ppo_iterations = cfg.ppo_iterations;
    rc.ppo_lr = cfg.ppo_lr;
    rc.seed = cfg.seed;
    let rl = crate::rlhf::run(be.clone(), &rc, &|m| {
        step(m);
        if m.starts_with("rlhf round") && m.contains("preference pairs") {
            bar.inc(1);
        }
    })?;
    evals.extend(rl.stages.iter().cloned());
    let mut current = rl.checkpoint.clone();
    let last_rm = rl
        .rounds
        .last()
        .map(|r| r.rm.clone())
        .unwrap_or(Value::Null);

    // The last rejection-sampling pool (the best answer so far to every RLHF prompt, every
    // category) replayed beside the GAtt and distillation rows, so neither fine-tune forgets the
    // rest of the assistant's job: with helpful rows alone the safe rate fell from 1.0 to 0.6.
    // Not the SFT demonstrations: replaying those pulls the model back to their flaws (false
    // refusals rose from 0 to 0.18 of helpful prompts).
    let replay = out.join("replay.jsonl");
    let pool = out
        .join("rlhf/rs")
        .join(format!("round-{}", cfg.rounds))
        .join("pool.jsonl");
    let all = crate::run_dir::read_jsonl_values(&pool)?;
    let stride = (all.len() / 300).max(1);
    let rows: Vec<Value> = all.into_iter().step_by(stride).take(300).collect();
    crate::run_dir::write_jsonl(&replay, &rows)?;

    step("ghost attention: synthetic multi-turn data, instruction kept in turn 1 only");
    let gc = crate::gatt::GattConfig {
        dialogues: cfg.gatt_dialogues,
        candidates: 4,
        eval_dialogues: 60,
        lr: 2e-4,
        epochs: 3,
        batch_size: 8,
        seq_len: 256,
        seed: cfg.seed,
        replay: vec![replay.clone()],
        progress: false,
        ..Default::default()
    };
    let g = crate::gatt::run_gatt(be.clone(), &current, &wdir, &out.join("gatt"), &gc)?;
    current = g.checkpoint.clone();
    evals.push(evaluate_stage(
        &be, "gatt", &current, &sft_ckpt, &tok, &ann, &eval, &mut None, cfg.seed,
    )?);
    bar.inc(1);

    step("safety context distillation: answers under a safety preprompt, kept when the safety RM prefers them");
    let dc = crate::distill::DistillConfig {
        replay: vec![replay.clone()],
        lr: 1e-4,
        epochs: 2,
        batch_size: 8,
        rm_seq_len: 128,
        seed: cfg.seed,
        eval_prompts: cfg.eval_prompts,
        progress: false,
        ..Default::default()
    };
    let d = crate::distill::run_distill(
        be.clone(),
        &current,
        &rl.rm_safety,
        &wdir,
        &out.join("distill"),
        &dc,
    )?;
    if let Some(c) = &d.checkpoint {
        current = c.clone();
    }
    evals.push(evaluate_stage(
        &be, "distill", &current, &sft_ckpt, &tok, &ann, &eval, &mut None, cfg.seed,
    )?);
    bar.inc(1);

    step("report");
    let ppo_rounds: Vec<&crate::rlhf::RoundReport> =
        rl.rounds.iter().filter(|r| r.ppo.is_some()).collect();
    let mut report = json!({
        "name": out.file_name().map(|s| s.to_string_lossy().to_string()),
        "device": be.name(),
        "seconds": t0.elapsed().as_secs_f64(),
        "rm": last_rm,
        "rounds": rl.rounds,
        "rs_rounds": rl.rounds.iter().map(|r| r.rs.clone()).collect::<Vec<_>>(),
        "pretrain": {"final_val_loss": pre.final_val_loss},
        "ppo_runs": ppo_rounds.iter().map(|r| r.ppo.clone()).collect::<Vec<_>>(),
        "distill_run": {
            "prompts": d.prompts, "kept": d.kept,
            "mean_score_with": d.mean_score_with, "mean_score_without": d.mean_score_without,
        },
    });
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
    report["gatt"]["adherence_by_turn"] = json!({
        "without": g.adherence_before.follow,
        "with": g.adherence_after.follow,
        "measured": g.adherence_after.measured,
    });
    report["gatt"]["rows"] = json!(g.rows);
    write_report_files(out, &report, &evals)?;
    gatt_plot(out, &g)?;
    rm_accuracy_plot(out, &report["rm"])?;
    if let Some(r) = ppo_rounds.last() {
        let src = out.join(format!("rlhf/round-{}/ppo/metrics.jsonl", r.round));
        gold_vs_proxy_plot(&src, &out.join("ppo_gold_vs_proxy.svg"))?;
    }
    bar.inc(1);
    bar.finish_and_clear();
    Ok(report)
}

/// The reward models' held-out accuracy by the annotators' rating (the paper's Table 8).
fn rm_accuracy_plot(out: &Path, rm: &Value) -> Result<()> {
    let ratings = [
        "significantly better",
        "better",
        "slightly better",
        "negligibly better/unsure",
    ];
    let series: Vec<(&str, Vec<Option<f64>>)> = ["helpfulness", "safety"]
        .iter()
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
fn gatt_plot(out: &Path, g: &crate::gatt::GattReport) -> Result<()> {
    let pts = |v: &[f32]| -> Vec<(f64, f64)> {
        v.iter()
            .enumerate()
            .map(|(i, &x)| ((i + 1) as f64, x as f64))
            .collect()
    };
    line_plot(
        &out.join("gatt_adherence.svg"),
        "instruction adherence per turn (instruction given at turn 1)",
        "turn",
        "share of answers following the instruction",
        &[
            ("without GAtt", &pts(&g.adherence_before.follow)),
            ("with GAtt", &pts(&g.adherence_after.follow)),
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

fn write_report_files(out: &Path, report: &Value, evals: &[StageEval]) -> Result<()> {
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(report)?,
    )?;
    let mut md = String::from("# Pipeline report\n\n");
    md += &format!(
        "Device: {}. Wall time: {:.0} s.\n\n",
        report["device"].as_str().unwrap_or("?"),
        report["seconds"].as_f64().unwrap_or(0.0)
    );
    md += "## Gold annotator per stage (held-out world prompts)\n\nGreedy answers, and (`sampled`) the policy's expected gold reward R_c over answers sampled at temperature 1.\n\n| stage | sampled R_c | greedy R_c | accuracy | helpfulness | safety | safe rate | false refusals | KL to SFT |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n";
    for e in evals {
        md += &format!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} |\n",
            e.stage,
            e.sampled_reward,
            e.reward,
            e.gold.accuracy,
            e.gold.helpfulness,
            e.gold.safety,
            e.gold.safe_rate,
            e.gold.false_refusal_rate,
            e.kl_to_sft
        );
    }
    md += "\n## Reward models (held-out prompts' pairs)\n\n| model | accuracy | significantly better | better | slightly better | negligibly better/unsure |\n| --- | ---: | ---: | ---: | ---: | ---: |\n";
    if let Some(rm) = report["rm"].as_object() {
        for (k, v) in rm {
            let lv = |name: &str| {
                v["accuracy_by_rating"][name]["accuracy"]
                    .as_f64()
                    .map(|a| format!("{:.3}", a))
                    .unwrap_or("-".into())
            };
            md += &format!(
                "| {k} | {:.3} | {} | {} | {} | {} |\n",
                v["accuracy"].as_f64().unwrap_or(0.0),
                lv("significantly better"),
                lv("better"),
                lv("slightly better"),
                lv("negligibly better/unsure")
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
    md += "\nPlots: `loss.svg` (pretraining and SFT), `reward_by_stage.svg` (reward distribution per stage), `rlhf/rs_rewards.svg` (max vs median of K per round), `ppo_gold_vs_proxy.svg` (reward hacking shows as the curves diverging), `gatt_adherence.svg`, `rm_accuracy_by_rating.svg`, `rlhf/round-*/rm-*/scores.svg`.\n";
    std::fs::write(out.join("report.md"), md)?;

    // Loss curves of pretraining and SFT.
    let p = read_series(
        &out.join("pretrain/metrics.jsonl"),
        "step",
        &["loss", "val_loss"],
    )
    .unwrap_or_default();
    let s = read_series(
        &out.join("sft/metrics.jsonl"),
        "step",
        &["loss", "val_loss"],
    )
    .unwrap_or_default();
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
    let series: Vec<(&str, &[f64])> = evals
        .iter()
        .filter(|e| !e.rewards.is_empty())
        .map(|e| (e.stage.as_str(), e.rewards.as_slice()))
        .collect();
    if !series.is_empty() {
        histogram_plot(
            &out.join("reward_by_stage.svg"),
            "reward-model score of each stage's answers",
            "piecewise reward (sigmoid)",
            &series,
            20,
        )?;
    }
    Ok(())
}
