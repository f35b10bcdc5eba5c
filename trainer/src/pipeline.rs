//! `llama2 pipeline`: the whole Llama 2 recipe on the built-in world, on one machine:
//! world → tokenizer → pretraining → SFT → helpfulness and safety reward models (on pairs sampled
//! from the SFT model and labelled by the gold annotator) → rounds of rejection sampling →
//! report. Every stage writes its own directory under `runs/<name>/`; the report gathers the gold
//! annotator's verdict per stage (helpfulness, safety, false refusals, KL to the SFT model), the
//! reward models' accuracy by rating, and plots.

use crate::data::{prepare, PrepareConfig};
use crate::evaluate::{chat_answers, world_eval, WorldEval};
use crate::metrics::{histogram_plot, line_plot, read_series};
use crate::prefs::{collect, write_jsonl, PrefsConfig};
use crate::pretrain::{run as train_run, DataSpec, ModelSource, TrainConfig};
use crate::rm::{
    evaluate as rm_evaluate, load_rm, read_pairs, score, EvalReport, RmConfig, RmKind,
};
use crate::rs::{piecewise, run_round, Pool, RoundStats, RsConfig, RsPrompt};
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
    pub rs_rounds: usize,
    pub rs_k: usize,
    pub rs_prompts: usize,
    pub pairs_per_prompt: usize,
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
            rs_rounds: 2,
            rs_k: 8,
            rs_prompts: 500,
            pairs_per_prompt: 3,
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
    /// Piecewise reward-model scores of the stage's greedy answers (for the distribution plot).
    #[serde(skip)]
    pub rewards: Vec<f64>,
}

fn latest(run_dir: &Path) -> Result<PathBuf> {
    let l = run_dir.join("checkpoints/latest");
    let name = std::fs::read_to_string(&l).with_context(|| format!("reading {}", l.display()))?;
    Ok(run_dir.join("checkpoints").join(name.trim()))
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

#[allow(clippy::too_many_arguments)]
fn evaluate_stage<B: Backend>(
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
    // KL to the SFT model on samples from this model (temperature 1).
    let dialogues: Vec<_> = eval.iter().map(|e| e.messages.clone()).collect();
    let p = SamplingParams {
        temperature: 1.0,
        max_new_tokens: 40,
        seed,
        stop: vec![tok.eos],
        ..Default::default()
    };
    let sampled = chat_answers(&mut model, tok, &dialogues, &p, 32)?;
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
        rewards,
    })
}

fn rm_json(e: &EvalReport) -> Value {
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
    let stages = 9 + cfg.rs_rounds;
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
        crate::pretrain::say(
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
    let rlhf = read_examples(&wdir.join("rlhf_prompts.jsonl"))?;
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
    let sft_ckpt = latest(&out.join("sft"))?;
    bar.inc(1);

    step("preferences: SFT samples at several temperatures, labelled by the gold annotator");
    let mut sft_model = load_model(be.clone(), &sft_ckpt, Head::Lm)?;
    let pcfg = PrefsConfig {
        pairs_per_prompt: cfg.pairs_per_prompt,
        seed: cfg.seed,
        ..Default::default()
    };
    let pairs = collect(&mut sft_model, &tok, &ann, &rlhf, &pcfg)?;
    let held = collect(
        &mut sft_model,
        &tok,
        &ann,
        &eval,
        &PrefsConfig {
            pairs_per_prompt: 2,
            seed: cfg.seed ^ 99,
            ..pcfg
        },
    )?;
    drop(sft_model);
    write_jsonl(&out.join("prefs.jsonl"), &pairs)?;
    write_jsonl(&out.join("prefs_heldout.jsonl"), &held)?;
    bar.inc(1);

    let mut rm_reports = serde_json::Map::new();
    let mut rm_dirs = Vec::new();
    for kind in [RmKind::Helpfulness, RmKind::Safety] {
        step(&format!("reward model: {}", kind.name()));
        let mut rc = RmConfig::new(
            sft_ckpt.clone(),
            vec![out.join("prefs.jsonl")],
            out.join(format!("rm-{}", kind.name())),
            kind,
        );
        rc.batch_size = 16;
        rc.micro_batch = 16;
        rc.epochs = 2;
        rc.lr = Some(cfg.rm_lr);
        rc.val_fraction = 0.0;
        rc.seq_len = Some(256);
        rc.seed = cfg.seed;
        rc.progress = false;
        let rep = crate::rm::train(be.clone(), &rc)?;
        let (mut m, rtok) = load_rm(be.clone(), &rep.model_dir)?;
        let (hp, _) = read_pairs(&[out.join("prefs_heldout.jsonl")], false)?;
        let sel = crate::rm::select_pairs(hp, kind);
        let ev = rm_evaluate(&mut m, &rtok, &sel.pairs, 256, 16)?;
        crate::rm::write_eval(
            &out.join(format!("rm-{}", kind.name())),
            &ev,
            &format!("{} reward model (held-out prompts)", kind.name()),
        )?;
        rm_reports.insert(kind.name().to_string(), rm_json(&ev));
        rm_dirs.push(rep.model_dir);
        bar.inc(1);
    }
    let mut rms = Some((
        load_rm(be.clone(), &rm_dirs[0])?.0,
        load_rm(be.clone(), &rm_dirs[1])?.0,
    ));

    let mut evals: Vec<StageEval> = Vec::new();
    step("evaluate: pretrained and SFT models");
    evals.push(evaluate_stage(
        &be, "pretrain", &pt_ckpt, &sft_ckpt, &tok, &ann, &eval, &mut rms, cfg.seed,
    )?);
    evals.push(evaluate_stage(
        &be, "sft", &sft_ckpt, &sft_ckpt, &tok, &ann, &eval, &mut rms, cfg.seed,
    )?);
    bar.inc(1);

    let rs_prompts: Vec<RsPrompt> = rlhf
        .iter()
        .take(cfg.rs_prompts)
        .map(|e| RsPrompt {
            messages: e.messages.clone(),
            safety: e.category == Category::Safety,
        })
        .collect();
    let mut pool = Pool::default();
    let mut rounds: Vec<RoundStats> = Vec::new();
    let mut current = sft_ckpt.clone();
    for r in 1..=cfg.rs_rounds {
        step(&format!(
            "rejection sampling round {r}: K = {} samples per prompt, best kept, pooled",
            cfg.rs_k
        ));
        let rcfg = RsConfig {
            k: cfg.rs_k,
            seq_len: cfg.seq_len,
            seed: cfg.seed ^ r as u64,
            lr: cfg.rs_lr,
            ..Default::default()
        };
        let st = run_round(
            be.clone(),
            &current,
            &rm_dirs[0],
            &rm_dirs[1],
            &rs_prompts,
            &rcfg,
            r,
            &mut pool,
            &out.join("rs"),
        )?;
        current = st
            .checkpoint
            .clone()
            .context("rejection-sampling fine-tune wrote no checkpoint")?;
        evals.push(evaluate_stage(
            &be,
            &format!("rs_round_{r}"),
            &current,
            &sft_ckpt,
            &tok,
            &ann,
            &eval,
            &mut rms,
            cfg.seed,
        )?);
        rounds.push(st);
        bar.inc(1);
    }
    if !rounds.is_empty() {
        crate::rs::write_report(out, &rounds)?;
    }

    step("report");
    let mut report = json!({
        "name": out.file_name().map(|s| s.to_string_lossy().to_string()),
        "device": be.name(),
        "seconds": t0.elapsed().as_secs_f64(),
        "rm": Value::Object(rm_reports),
        "rs_rounds": rounds,
        "pretrain": {"final_val_loss": pre.final_val_loss},
    });
    for e in &evals {
        report[&e.stage] = serde_json::to_value(e)?;
    }
    write_report_files(out, &report, &evals)?;
    bar.inc(1);
    bar.finish_and_clear();
    Ok(report)
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
    md += "## Gold annotator per stage (held-out world prompts)\n\n| stage | accuracy | helpfulness | safety | safe rate | false refusals | KL to SFT |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n";
    for e in evals {
        md += &format!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} |\n",
            e.stage,
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
    md += "\nPlots: `loss.svg` (pretraining and SFT), `reward_by_stage.svg` (reward distribution per stage), `rs_rewards.svg` (max vs median of K per round), `rm-*/scores.svg`.\n";
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
