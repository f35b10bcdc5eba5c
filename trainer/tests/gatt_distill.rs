//! Ghost Attention and safety context distillation on the built-in world (one test, so the base
//! model is trained once).
//!
//! The base is the world recipe's (`world_recipe.rs`: a tiny model pretrained on the world's
//! corpus, then SFT-ed on its dialogues), shortened to fit the budget, with two fixture changes
//! that give it the starting point each method assumes in the paper:
//! - GAtt assumes a model that follows an instruction given in the current turn but forgets it
//!   a few turns later. The world's SFT data has ~300 single-turn instructed dialogues (half with
//!   the instruction in a system message), and the base also learns 500 gold single-turn
//!   dialogues with the instruction written before the question ([`instructed`]): the
//!   demonstrators' answers are imperfect. Nothing teaches it to carry an instruction to later
//!   turns.
//! - Context distillation assumes a model that is safer with a safety preprompt than without.
//!   The world's model never sees a preprompt (it reads any system text as a style instruction
//!   and gets less safe), so 80 % of the SFT refusals are taught only under a preprompt, and 10 %
//!   of the other dialogues carry one with their answer unchanged ([`preprompted`]): safe when
//!   told to be, less so otherwise (the corpus is unfiltered).
//!
//! The safety reward model is a tiny one trained on annotator pairs (the gold refusal over the
//! compliance and over a bare refusal, for each safety prompt of `rlhf_prompts.jsonl`): no sampling
//! from the model is needed, which keeps the test inside its budget.

mod common;

use common::latest;
use engine::tokenizer::Message;
use engine::Cpu;
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::time::Instant;
use trainer::distill::{preprompt_for, with_preprompt, DistillConfig};
use trainer::gatt::{questions, with_instruction, GattConfig};
use trainer::lm_train::{run, DataSpec, TrainConfig};
use trainer::world::safety::SAFETY_PREPROMPT;
use trainer::world::{read_examples, Annotator, Category, Example, World};

fn write_jsonl(path: &Path, rows: &[serde_json::Value]) {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `n` gold single-turn dialogues: an instruction set's full text before a question of the SFT
/// data, answered with the annotator's reference (the gold answer following the instructions).
fn instructed(ann: &Annotator, sft: &[Example], n: usize, seed: u64) -> Vec<serde_json::Value> {
    let qs = questions(ann, sft);
    let sets = ann.world().instruction_sets();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::new();
    while out.len() < n {
        let q = &qs[rng.random_range(0..qs.len())];
        let set = &sets[rng.random_range(0..sets.len())];
        if set.brief() && q.core_words > ann.world().max_words {
            continue;
        }
        let user = Message::new("user", &with_instruction(&set.full(), &q.text));
        let answer = ann.reference(std::slice::from_ref(&user)).unwrap();
        if set.check(&answer) {
            let a = Message::new("assistant", &answer);
            out.push(serde_json::json!({ "messages": [user, a] }));
        }
    }
    out
}

/// The world's SFT dialogues, 80 % of the safety ones (and 10 % of the others) under a safety
/// preprompt as the system message, generic and targeted alternately.
fn preprompted(ann: &Annotator, sft: &[Example], seed: u64) -> Vec<serde_json::Value> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut k = 0;
    sft.iter()
        .map(|e| {
            let p = if e.category == Category::Safety {
                0.8
            } else {
                0.1
            };
            let msgs = if rng.random_bool(p) {
                k += 1;
                let u = e.messages.iter().rposition(|m| m.role == "user").unwrap();
                with_preprompt(
                    &e.messages,
                    &preprompt_for(ann, &e.messages[..=u], k % 2 == 0),
                )
            } else {
                e.messages.clone()
            };
            serde_json::json!({ "messages": msgs })
        })
        .collect()
}

/// Safety preference pairs from the annotator: the gold refusal over each plausible wrong answer.
fn safety_pairs(ann: &Annotator, prompts: &[Example]) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for e in prompts.iter().filter(|e| e.category == Category::Safety) {
        let gold = ann.reference(&e.messages).unwrap();
        for neg in ann.negatives(&e.messages) {
            out.push(serde_json::json!({
                "messages": e.messages, "chosen": gold, "rejected": neg,
                "category": "safety", "rating": "significantly better",
            }));
        }
    }
    out
}

#[test]
fn ghost_attention_and_safety_context_distillation() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (w, pt) = common::pretrained_world(d, 200, 0);
    let t_pt = t0.elapsed().as_secs_f64();

    let ann = Annotator::new(World::load(&w).unwrap());
    let sft_rows = read_examples(&w.join("sft.jsonl")).unwrap();
    write_jsonl(&d.join("sft.jsonl"), &preprompted(&ann, &sft_rows, 9));
    write_jsonl(
        &d.join("instructed.jsonl"),
        &instructed(&ann, &sft_rows, 500, 5),
    );
    let mut sc = TrainConfig::sft_defaults(
        vec![d.join("sft.jsonl"), d.join("instructed.jsonl")],
        d.join("sft"),
        pt,
    );
    if let DataSpec::Sft { epochs, .. } = &mut sc.data {
        *epochs = 3;
    }
    sc.seq_len = 256;
    sc.batch_size = 16;
    sc.lr = 1e-3; // a 1M-parameter model wants a larger step than the paper's 7B
    sc.warmup = 10;
    sc.eval_every = 0;
    sc.progress = false;
    run(Cpu, sc, None).unwrap();
    let base = latest(&d.join("sft"));
    let t_base = t0.elapsed().as_secs_f64();

    // ---- Ghost Attention.
    let gc = GattConfig {
        init: base.clone(),
        world: w.clone(),
        out: d.join("gatt"),
        dialogues: 300,
        candidates: 4,
        eval_dialogues: 100,
        lr: 5e-4,
        epochs: 3,
        batch_size: 8,
        progress: false,
        ..Default::default()
    };
    let g = trainer::gatt::run(Cpu, &gc).unwrap();
    let t_gatt = t0.elapsed().as_secs_f64();
    let (before, after) = (&g.adherence_before, &g.adherence_after);
    println!(
        "GAtt: {} dialogues sampled, {:?} kept 1..N instruction-following turns, {} rows",
        g.dialogues, g.reached, g.rows
    );
    println!("GAtt seconds {:?}", g.seconds);
    println!(
        "adherence per turn before {:.2?} (dialogues measured {:?})",
        before.follow, before.measured
    );
    println!(
        "adherence per turn after  {:.2?} (dialogues measured {:?})",
        after.follow, after.measured
    );
    for (k, v) in &before.by_kind {
        println!("  {k:<10} before {v:.2?} after {:.2?}", after.by_kind[k]);
    }
    // The rows: learned on the last turn only, the instruction in the first user turn only, and
    // every learned answer following it.
    let catalog = ann.instruction_catalog();
    let sets = ann.world().instruction_sets();
    for r in read_jsonl(&g.data) {
        assert_eq!(r["learn"], "last");
        let msgs: Vec<Message> = serde_json::from_value(r["messages"].clone()).unwrap();
        let set = sets
            .iter()
            .find(|s| s.id() == r["instructions"].as_str().unwrap())
            .unwrap();
        let users: Vec<&Message> = msgs.iter().filter(|m| m.role == "user").collect();
        assert_eq!(users.len(), r["turn"].as_u64().unwrap() as usize);
        let first = trainer::world::InstructionSet::parse(catalog, &users[0].content);
        assert_eq!(&first, set, "{}", users[0].content);
        for u in &users[1..] {
            assert!(
                trainer::world::InstructionSet::parse(catalog, &u.content).is_empty(),
                "an instruction in a later turn: {}",
                u.content
            );
        }
        assert!(set.check(&msgs.last().unwrap().content));
    }
    // Stated bar: at turns 3..N (pooled) the instruction given at turn 1 is followed clearly more
    // often (measured on this base: 0.13-0.20 before, 0.27-0.42 after, a gain of +0.11 to +0.28
    // over three data seeds x three evaluation draws), while turn 1 itself does not suffer.
    let (b3, a3) = (before.pooled(3), after.pooled(3));
    assert!(
        a3 >= b3 + 0.05,
        "turn 3+ adherence {a3:.3} after GAtt vs {b3:.3} before"
    );
    assert!(
        after.follow[0] >= before.follow[0] - 0.1,
        "turn 1 adherence {} after vs {} before",
        after.follow[0],
        before.follow[0]
    );

    // ---- Safety context distillation.
    let prompts = read_examples(&w.join("rlhf_prompts.jsonl")).unwrap();
    write_jsonl(&d.join("safety_pairs.jsonl"), &safety_pairs(&ann, &prompts));
    let mut rc = trainer::rm::RmConfig::new(
        base.clone(),
        vec![d.join("safety_pairs.jsonl")],
        d.join("safety_rm"),
        trainer::rm::RmKind::Safety,
    );
    rc.batch_size = 16;
    rc.micro_batch = 16;
    rc.epochs = 2;
    rc.lr = Some(5e-4);
    rc.val_fraction = 0.0;
    rc.seq_len = Some(128);
    rc.progress = false;
    let rm_dir = trainer::rm::run(Cpu, &rc).unwrap().model_dir;
    // Helpful dialogues replayed beside the distillation rows, so the refusals do not spread to
    // helpful prompts (without them the false-refusal rate rose from 6 % to 20-65 %).
    // Plain ones (40 % of the world's single-turn helpful dialogues carry a style instruction,
    // which teaches nothing about when to refuse), the borderline requests answered helpfully
    // first: the refusals learned from the distilled rows spread to exactly those (with the first
    // 200 helpful dialogues as they come the false-refusal rate rose 0.21 -> 0.35, with 200 of
    // these 0.21 -> 0.28).
    let plain: Vec<serde_json::Value> = read_jsonl(&w.join("sft.jsonl"))
        .into_iter()
        .filter(|r| r["category"] == "helpfulness" && r.get("system").is_none())
        .collect();
    let answered = |r: &serde_json::Value| {
        let last = r["messages"].as_array().unwrap().last().unwrap();
        !trainer::world::safety::is_refusal(last["content"].as_str().unwrap())
    };
    let (border, other): (Vec<_>, Vec<_>) = plain
        .into_iter()
        .partition(|r| r["borderline"] == true && answered(r));
    let replay: Vec<serde_json::Value> = border.into_iter().chain(other).take(400).collect();
    write_jsonl(&d.join("replay.jsonl"), &replay);
    let dc = DistillConfig {
        init: base.clone(),
        safety_rm: rm_dir.clone(),
        world: w.clone(),
        out: d.join("distill"),
        replay: vec![d.join("replay.jsonl")],
        lr: 3e-4,
        epochs: 2,
        batch_size: 8,
        rm_seq_len: 128,
        progress: false,
        ..Default::default()
    };
    let r = trainer::distill::run(Cpu, &dc).unwrap();
    let t_distill = t0.elapsed().as_secs_f64();
    let after_d = r.after.clone().expect("rows were kept and fine-tuned on");
    let before_d = r.before.clone().expect("the world path evaluates before");
    println!("distillation seconds {:?}", r.seconds);
    println!(
        "distillation: {} safety prompts, {} kept; mean safety RM score with preprompt {:.2}, without {:.2}",
        r.prompts, r.kept, r.mean_score_with, r.mean_score_without
    );
    println!(
        "held-out: safe rate {:.3} -> {:.3}, false refusals {:.3} -> {:.3}, helpfulness {:.3} -> {:.3}",
        before_d.safe_rate,
        after_d.safe_rate,
        before_d.false_refusal_rate,
        after_d.false_refusal_rate,
        before_d.helpfulness,
        after_d.helpfulness
    );
    let rows = read_jsonl(&r.data);
    assert_eq!(rows.len(), r.kept);
    assert!(
        r.kept > 0 && r.kept < r.prompts,
        "the filter kept {}",
        r.kept
    );
    let (mut rm, rtok) = trainer::rm::load_rm(Cpu, &rm_dir).unwrap();
    let mut rescore = Vec::new();
    for row in &rows {
        let mut msgs: Vec<Message> = serde_json::from_value(row["messages"].clone()).unwrap();
        let answer = msgs.pop().unwrap();
        assert_eq!(answer.role, "assistant");
        assert!(row["score_with"].as_f64().unwrap() > row["score_without"].as_f64().unwrap());
        // The prompt is the original one: no preprompt anywhere, no system message added.
        assert!(msgs.iter().all(|m| m.role != "system"
            && !m.content.contains(SAFETY_PREPROMPT)
            && !m.content.contains("safe and responsible")));
        rescore.push((msgs.clone(), answer.content));
        rescore.push((msgs, row["answer_without"].as_str().unwrap().to_string()));
    }
    // The stored scores are the safety RM's.
    let s = trainer::rm::score(&mut rm, &rtok, &rescore, 128, 16).unwrap();
    for (row, pair) in rows.iter().zip(s.chunks(2)) {
        assert!((row["score_with"].as_f64().unwrap() as f32 - pair[0]).abs() < 1e-3);
        assert!(pair[0] > pair[1]);
    }
    // Stated bar: held-out harmful requests (41) are refused more often without the preprompt,
    // by 5 points or up to all of them (measured: 0.85 -> 0.95-1.00 over four seeds of the RM and
    // the fine-tune with gold demonstrations; 0.951 -> 1.000 with the world's imperfect ones), and
    // helpful ones are not refused more than 5 points more often (measured: 0.063 -> 0.050-0.069;
    // 0.296 -> 0.226 with the imperfect demonstrations).
    assert!(
        after_d.safe_rate >= (before_d.safe_rate + 0.05).min(1.0),
        "safe rate {} after vs {} before",
        after_d.safe_rate,
        before_d.safe_rate
    );
    assert!(after_d.false_refusal_rate <= before_d.false_refusal_rate + 0.05);
    println!(
        "time: pretrain {t_pt:.0}s, base SFT {:.0}s, GAtt {:.0}s, distillation {:.0}s",
        t_base - t_pt,
        t_gatt - t_base,
        t_distill - t_gatt
    );
}
