//! Tier 2: the whole CPU model against the Hugging Face fixtures, and the tokenizer against
//! SentencePiece's ids. The fixtures come from `../shared` or the checkout's `assets/`; the
//! tokenizer tests skip where the Llama 2 tokenizer has not been fetched.

use engine::check::{check_fixture, Status, Tolerances};
use engine::shared_data::or_skip;
use engine::tokenizer::{Message, Tokenizer};
use engine::Cpu;

fn run_fixture(name: &str) {
    let Some(dir) = or_skip(&format!("fixtures/{name}")) else {
        return;
    };
    let rep = check_fixture(Cpu, &dir, Tolerances::F32).unwrap();
    println!("{}", rep.to_table());
    assert_eq!(rep.failed(), 0, "{name}: failures");
    assert_eq!(
        rep.skipped(),
        0,
        "{name}: every part of the fixture must run"
    );
    // logits, loss, every LM gradient; rewards, loss, every RM gradient; AdamW.
    let lm = rep.rows.iter().filter(|r| r.case == "lm").count();
    let rm = rep.rows.iter().filter(|r| r.case == "rm").count();
    assert!(lm >= 2 + 9 * 2 + 3, "lm rows: {lm}");
    assert!(rm >= 3 + 9 * 2 + 3, "rm rows: {rm}");
    assert!(rep
        .rows
        .iter()
        .any(|r| r.case == "adamw" && r.status == Status::Pass));
}

#[test]
fn fixture_llama_tiny_gqa() {
    run_fixture("llama-tiny-gqa");
}

#[test]
fn fixture_llama_tiny_mha() {
    run_fixture("llama-tiny-mha");
}

#[test]
fn checker_catches_a_wrong_gradient() {
    // The checker itself must be able to fail: perturb one reference weight and re-run.
    let Some(src) = or_skip("fixtures/llama-tiny-gqa") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "case.safetensors", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let files = engine::checkpoint::TensorFiles::open(&src.join("model.safetensors")).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = files
        .names()
        .into_iter()
        .map(|n| {
            let (s, v) = files.read_f32(n).unwrap();
            (n.to_string(), s, v)
        })
        .collect();
    let t = tensors
        .iter_mut()
        .find(|t| t.0 == "model.layers.1.mlp.down_proj.weight")
        .unwrap();
    t.2[5] += 1e-2;
    let views: Vec<(String, Vec<usize>, &[f32])> = tensors
        .iter()
        .map(|(n, s, v)| (n.clone(), s.clone(), v.as_slice()))
        .collect();
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    engine::checkpoint::write_tensors(dir.path(), &views, Default::default()).unwrap();
    let rep = check_fixture(Cpu, dir.path(), Tolerances::F32).unwrap();
    assert!(rep.failed() > 0, "a perturbed weight must fail the check");
    assert!(
        rep.skipped() >= 2,
        "rm and adamw parts are absent and must be reported as skipped"
    );
}

#[test]
fn tokenizer_matches_sentencepiece_cases() {
    let (Some(json), Some(cases)) = (
        or_skip("tokenizer/llama2/tokenizer.json"),
        or_skip("tokenizer/llama2/cases.json"),
    ) else {
        return;
    };
    let tok = Tokenizer::from_file(&json).unwrap();
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cases).unwrap()).unwrap();
    let cases = cases["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text, false).unwrap(), want, "text {text:?}");
        let mut with_bos = vec![1];
        with_bos.extend(&want);
        assert_eq!(tok.encode(text, true).unwrap(), with_bos);
    }
    assert_eq!((tok.bos, tok.eos, tok.vocab_size()), (1, 2, 32000));
}

#[test]
fn chat_template_and_assistant_mask() {
    let Some(json) = or_skip("tokenizer/llama2/tokenizer.json") else {
        return;
    };
    let tok = Tokenizer::from_file(&json).unwrap();
    let msgs = vec![
        Message::new("system", "Answer briefly."),
        Message::new("user", "What is 2+3?"),
        Message::new("assistant", "5"),
        Message::new("user", "And 4+4?"),
    ];
    let (ids, mask) = tok.chat(&msgs).unwrap();
    assert_eq!(ids.len(), mask.len());
    // Meta's reference format, built from the same strings.
    let mut want = tok
        .encode(
            "[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\nWhat is 2+3? [/INST] 5 ",
            true,
        )
        .unwrap();
    want.push(2);
    want.extend(tok.encode("[INST] And 4+4? [/INST]", true).unwrap());
    assert_eq!(ids, want);
    assert_eq!(
        ids.iter().filter(|&&i| i == 1).count(),
        2,
        "one BOS per turn"
    );
    // The mask covers exactly the answer and its EOS.
    let answer: Vec<u32> = ids
        .iter()
        .zip(&mask)
        .filter(|(_, &m)| m)
        .map(|(&i, _)| i)
        .collect();
    assert_eq!(*answer.last().unwrap(), 2);
    assert_eq!(tok.decode(&answer).unwrap().trim(), "5");
    let text = tok.decode(&ids).unwrap();
    assert!(
        text.contains("<<SYS>>") && text.contains("[/INST]"),
        "{text}"
    );
    // Roles out of order are an error, not garbage.
    let bad = vec![Message::new("assistant", "hi")];
    assert!(tok
        .chat(&bad)
        .unwrap_err()
        .to_string()
        .contains("expected role `user`"));
}
