//! SFT data: every format parses, HH transcripts load, bad lines are named, packing learns
//! exactly the assistant tokens, and a pack's loss and gradients equal its documents' run apart.

use engine::model::Batch;
use engine::shared_data::or_skip;
use engine::tokenizer::{Message, Tokenizer};
use engine::{Cpu, Head, Llama, LlamaConfig};
use trainer::formats::{parse_dialogue, parse_hh, read_dialogues};
use trainer::sft::{pack, tokenize, Dialogue, Doc};

fn row_messages(v: &serde_json::Value) -> anyhow::Result<Vec<Message>> {
    parse_dialogue(v).map(|d| d.messages)
}

/// The Llama 2 tokenizer, or `None` (the test skips) where it has not been fetched.
fn llama_tok() -> Option<Tokenizer> {
    or_skip("tokenizer/llama2/tokenizer.json").map(|p| Tokenizer::from_file(&p).unwrap())
}

#[test]
fn formats_parse() {
    let hh = "\n\nHuman: hi there\n\nAssistant: hello!\n\nHuman: how are you?\n\nAssistant: fine, thanks";
    let m = parse_hh(hh).unwrap();
    let roles: Vec<&str> = m.iter().map(|x| x.role.as_str()).collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
    assert_eq!(m[3].content, "fine, thanks");
    let v = serde_json::json!({"prompt": "p", "response": "r"});
    assert_eq!(
        row_messages(&v).unwrap(),
        vec![Message::new("user", "p"), Message::new("assistant", "r")]
    );
    let v = serde_json::json!({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]});
    assert_eq!(row_messages(&v).unwrap().len(), 3);
    let v = serde_json::json!({"messages": [{"role": "robot", "content": "u"}]});
    assert!(row_messages(&v).unwrap_err().to_string().contains("robot"));
    assert!(row_messages(&serde_json::json!({"foo": 1})).is_err());
}

#[test]
fn hh_pairs_load_every_line_and_bad_lines_are_named() {
    let Some(hh) = or_skip("data/hh-harmless-pairs.jsonl") else {
        return;
    };
    let (d, skipped) = read_dialogues(&[hh], false).unwrap();
    assert_eq!((d.len(), skipped), (1800, 0));
    assert!(d.iter().all(|m| m.messages.first().unwrap().role == "user"
        && m.messages.last().unwrap().role == "assistant"
        && !m.last_turn_only));
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.jsonl");
    std::fs::write(&f, "{\"prompt\": \"a\", \"response\": \"b\"}\n{not json\n{\"prompt\": 3, \"response\": \"b\"}\n").unwrap();
    let e = format!("{:#}", read_dialogues(&[f.clone()], false).unwrap_err());
    assert!(
        e.contains("bad.jsonl:2") && e.contains("invalid JSON"),
        "{e}"
    );
    let (d, skipped) = read_dialogues(&[f], true).unwrap();
    assert_eq!((d.len(), skipped), (1, 2));
}

fn docs(tok: &Tokenizer) -> Vec<Doc> {
    let dialogues = vec![
        vec![
            Message::new("user", "What is 2+2?"),
            Message::new("assistant", "4"),
        ],
        vec![
            Message::new("system", "Be brief."),
            Message::new("user", "Name a color."),
            Message::new("assistant", "Blue."),
            Message::new("user", "Another?"),
            Message::new("assistant", "Red."),
        ],
        vec![
            Message::new("user", "Say hi"),
            Message::new("assistant", "Hi there, friend!"),
        ],
    ];
    let dialogues: Vec<Dialogue> = dialogues
        .into_iter()
        .map(|messages| Dialogue {
            messages,
            last_turn_only: false,
        })
        .collect();
    tokenize(tok, &dialogues, 64).unwrap().0
}

#[test]
fn last_turn_only_learns_just_the_final_answer() {
    let Some(tok) = llama_tok() else {
        return;
    };
    let msgs = vec![
        Message::new("system", "Answer in capitals."),
        Message::new("user", "Name a color."),
        Message::new("assistant", "BLUE."),
        Message::new("user", "Another?"),
        Message::new("assistant", "RED."),
    ];
    let all = tokenize(
        &tok,
        &[Dialogue {
            messages: msgs.clone(),
            last_turn_only: false,
        }],
        64,
    )
    .unwrap()
    .0;
    let last = tokenize(
        &tok,
        &[Dialogue {
            messages: msgs,
            last_turn_only: true,
        }],
        64,
    )
    .unwrap()
    .0;
    let learned = |d: &Doc| -> Vec<u32> {
        (0..d.ids.len())
            .filter(|&i| d.learn[i])
            .map(|i| d.ids[i])
            .collect()
    };
    assert!(tok.decode(&learned(&all[0])).unwrap().contains("BLUE"));
    let l = tok.decode(&learned(&last[0])).unwrap();
    assert!(l.contains("RED") && !l.contains("BLUE"), "{l}");
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("g.jsonl");
    std::fs::write(&f, "{\"prompt\": \"a\", \"response\": \"b\", \"learn\": \"last\"}\n{\"prompt\": \"a\", \"response\": \"b\", \"learn\": \"x\"}\n").unwrap();
    let e = format!("{:#}", read_dialogues(&[f], false).unwrap_err());
    assert!(e.contains("g.jsonl:2") && e.contains("learn"), "{e}");
}

#[test]
fn packing_learns_exactly_the_assistant_tokens() {
    let Some(tok) = llama_tok() else {
        return;
    };
    let ds = docs(&tok);
    let total: usize = ds.iter().map(|d| d.ids.len()).sum();
    let p = pack(&ds, 48, tok.eos);
    assert_eq!(p.ids.len() % 48, 0);
    assert!(
        p.rows() >= 2,
        "three dialogues of {total} tokens do not fit one 48-token row"
    );
    // Walk the pack, rebuilding each document from its positions.
    let mut seen = 0;
    for r in 0..p.rows() {
        let row = r * 48..(r + 1) * 48;
        let mut t = row.start;
        while t < row.end && p.doc[t] >= 0 {
            let d = &ds[seen];
            let n = d.ids.len();
            for i in 0..n {
                assert_eq!(
                    p.pos[t + i],
                    i as i32,
                    "positions restart in every document"
                );
                assert_eq!(p.doc[t + i], p.doc[t], "one document id per document");
                assert_eq!(p.ids[t + i], d.ids[i] as i32);
                let want = if i + 1 < n && d.learn[i + 1] {
                    d.ids[i + 1] as i32
                } else {
                    -100
                };
                assert_eq!(p.targets[t + i], want);
            }
            // What is learned decodes to the assistant answers and their EOS.
            let learned: Vec<u32> = (0..n).filter(|&i| d.learn[i]).map(|i| d.ids[i]).collect();
            let text = tok.decode(&learned).unwrap();
            assert!(
                !text.contains("[INST]") && !text.contains("Name a color"),
                "{text}"
            );
            assert_eq!(
                learned.iter().filter(|&&x| x == tok.eos).count(),
                d.ids.iter().filter(|&&x| x == tok.eos).count()
            );
            t += n;
            seen += 1;
        }
        assert!(
            p.targets[t..row.end].iter().all(|&x| x == -100),
            "padding is never learned"
        );
    }
    assert_eq!(seen, ds.len());
}

#[test]
fn a_packs_loss_and_gradients_equal_its_documents_run_apart() {
    let Some(tok) = llama_tok() else {
        return;
    };
    let ds = docs(&tok);
    let total: usize = ds.iter().map(|d| d.ids.len()).sum();
    let mut c = LlamaConfig::preset("tiny").unwrap();
    c.vocab_size = 32000;
    c.hidden_size = 32;
    c.intermediate_size = 48;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 4;
    c.num_key_value_heads = Some(2);
    c.max_position_embeddings = 128;
    let mut m = Llama::new(Cpu, c, Head::Lm).unwrap();
    m.init_random(9).unwrap();
    let p = pack(&ds, total + 5, tok.eos);
    assert_eq!(p.rows(), 1);
    let t = p.seq_len;
    let mut batch = Batch::new(&p.ids, 1, t);
    batch.pos = Some(&p.pos);
    batch.doc = Some(&p.doc);
    m.forward(&batch).unwrap();
    let (mean, count) = m.lm_loss(&p.targets).unwrap();
    m.zero_grads().unwrap();
    m.backward_lm(1.0).unwrap();
    let g_pack = m.grads_to_host().unwrap();
    let packed_sum = mean as f64 * count as f64;

    m.zero_grads().unwrap();
    let mut sum = 0f64;
    let mut off = 0;
    for d in &ds {
        let n = d.ids.len();
        let ids: Vec<i32> = p.ids[off..off + n].to_vec();
        let tg: Vec<i32> = p.targets[off..off + n].to_vec();
        m.forward(&Batch::new(&ids, 1, n)).unwrap();
        let (l, c) = m.lm_loss(&tg).unwrap();
        sum += l as f64 * c as f64;
        m.backward_lm(1.0).unwrap();
        off += n;
    }
    let g_apart = m.grads_to_host().unwrap();
    assert!(
        (packed_sum - sum).abs() <= 1e-4 * sum.abs(),
        "pack {packed_sum} vs apart {sum}"
    );
    let scale = g_apart.iter().fold(0f32, |a, x| a.max(x.abs()));
    let err = g_pack
        .iter()
        .zip(&g_apart)
        .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
    assert!(
        err <= 1e-4 * scale,
        "gradients differ: max abs {err} (scale {scale})"
    );
    // Without the document mask the pack is a different computation: the test can fail.
    let unmasked = Batch::new(&p.ids, 1, t);
    m.forward(&unmasked).unwrap();
    let (l2, _) = m.lm_loss(&p.targets).unwrap();
    assert!(
        (l2 as f64 * count as f64 - sum).abs() > 1e-3,
        "masking must matter"
    );
}
