//! Fuzzing of every parser of user files, bounded by an iteration count and seeded (the same
//! inputs on every run, no timing): safetensors headers, config.json, the sharded index,
//! tokenizer.json, every JSONL shape (SFT dialogues, preference pairs, score rows, prompts, world
//! examples, pretraining documents), `.npy` and shard headers, a run's trainer_state.json. Each
//! input starts from a valid file, mutated in its structure (a JSON node replaced by a hostile
//! value) or its bytes (flips, splices, truncation, a BOM, invalid UTF-8). An error is fine;
//! a panic fails the test and prints the input that caused it.

use engine::checkpoint::{load_model, save_model, SaveOptions, TensorFiles};
use engine::tokenizer::{Message, Tokenizer};
use engine::{Batch, Cpu, Head, Llama, LlamaConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// Inputs per parser: enough to reach every branch the mutations can, in a few seconds.
const ITERS: usize = 250;

/// Values that have broken parsers: zero, negative, huge, fractional, wrong types, paths that
/// leave a directory, control characters.
fn hostile_values() -> Vec<Value> {
    vec![
        json!(0),
        json!(1),
        json!(-1),
        json!(1_000_000_000_000_000u64),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(4_294_967_296u64),
        json!(1e308),
        json!(-1e308),
        json!(0.5),
        json!(""),
        json!("x".repeat(5000)),
        Value::Null,
        json!(true),
        json!([]),
        json!({}),
        json!("../../../../etc/passwd"),
        json!("/etc/passwd"),
        json!("\u{0}\u{fffd}"),
        json!([[[[[[1]]]]]]),
        json!("NaN"),
        json!(["user", "assistant"]),
    ]
}

fn hostile(rng: &mut ChaCha8Rng) -> Value {
    let v = hostile_values();
    v[rng.random_range(0..v.len())].clone()
}

/// Every object of `seed` down to `depth` levels with each of `keys` set to each hostile value
/// in turn: the single-field changes, all of them, before the random ones.
fn sweep(seed: &Value, keys: &[&str], depth: usize) -> Vec<Value> {
    let mut out = Vec::new();
    if let Value::Object(o) = seed {
        for k in keys {
            for h in hostile_values() {
                let mut v = seed.clone();
                v[*k] = h;
                out.push(v);
            }
        }
        if depth > 0 {
            for (k, child) in o {
                for c in sweep(child, keys, depth - 1) {
                    let mut v = seed.clone();
                    v[k] = c;
                    out.push(v);
                }
            }
        }
    }
    if let (Value::Array(a), true) = (seed, depth > 0) {
        for (i, child) in a.iter().enumerate() {
            for c in sweep(child, keys, depth - 1) {
                let mut v = seed.clone();
                v[i] = c;
                out.push(v);
            }
        }
    }
    out
}

/// Replaces one node (chosen uniformly over the tree) with a hostile value, sets one of the
/// format's own `keys` on an object to one, deletes a key or shortens an array; 1–3 times.
fn mutate_json(rng: &mut ChaCha8Rng, v: &Value, keys: &[&str]) -> Value {
    fn count(v: &Value) -> usize {
        1 + match v {
            Value::Array(a) => a.iter().map(count).sum(),
            Value::Object(o) => o.values().map(count).sum(),
            _ => 0,
        }
    }
    fn edit(v: &mut Value, k: &mut usize, rng: &mut ChaCha8Rng, keys: &[&str]) {
        if *k == 0 {
            match (rng.random_range(0..10), &mut *v) {
                (0..=3, Value::Object(o)) => {
                    let key = keys[rng.random_range(0..keys.len())];
                    o.insert(key.into(), hostile(rng));
                }
                (4, Value::Object(o)) if !o.is_empty() => {
                    let key = o.keys().nth(rng.random_range(0..o.len())).unwrap().clone();
                    o.remove(&key);
                }
                (5, Value::Array(a)) if !a.is_empty() => {
                    a.truncate(rng.random_range(0..a.len()));
                }
                _ => *v = hostile(rng),
            }
            *k = usize::MAX;
            return;
        }
        *k -= 1;
        match v {
            Value::Array(a) => a.iter_mut().for_each(|x| edit(x, k, rng, keys)),
            Value::Object(o) => o.values_mut().for_each(|x| edit(x, k, rng, keys)),
            _ => {}
        }
    }
    let mut out = v.clone();
    for _ in 0..rng.random_range(1..4) {
        // Objects first, half the time: the format's keys are where parsers go wrong.
        let mut k = if rng.random_bool(0.5) {
            0
        } else {
            rng.random_range(0..count(&out))
        };
        edit(&mut out, &mut k, rng, keys);
    }
    out
}

/// Byte-level damage: flips, inserted junk, a deleted or duplicated range, truncation, a BOM.
fn mutate_bytes(rng: &mut ChaCha8Rng, b: &[u8]) -> Vec<u8> {
    let mut v = b.to_vec();
    for _ in 0..rng.random_range(1..4) {
        let n = v.len().max(1);
        match rng.random_range(0..7) {
            0 if !v.is_empty() => {
                let i = rng.random_range(0..v.len());
                v[i] ^= 1 << rng.random_range(0..8);
            }
            1 => {
                let i = rng.random_range(0..=v.len());
                let junk: &[u8] = [
                    &b"\xff\xfe"[..],
                    b"\xef\xbb\xbf",
                    b"\n",
                    b"\"",
                    b"{",
                    b"]",
                    b"\\u0000",
                    b"1e999",
                ][rng.random_range(0..8)];
                v.splice(i..i, junk.iter().copied());
            }
            2 if !v.is_empty() => {
                let i = rng.random_range(0..v.len());
                let j = (i + rng.random_range(1..64)).min(v.len());
                v.drain(i..j);
            }
            3 if !v.is_empty() => {
                let i = rng.random_range(0..v.len());
                let j = (i + rng.random_range(1..64)).min(v.len());
                let dup: Vec<u8> = v[i..j].to_vec();
                v.splice(i..i, dup);
            }
            4 => v.truncate(rng.random_range(0..n)),
            5 => {
                v.splice(0..0, *b"\xef\xbb\xbf");
            }
            _ => {
                let i = rng.random_range(0..=v.len());
                v.splice(i..i, (0..8).map(|_| rng.random::<u8>()));
            }
        }
    }
    v
}

/// Damage a safetensors header keeps parsing through: a tensor's dtype swapped for one of the
/// same width, its shape refolded over the same number of elements, its name made hostile, its
/// data range made to overlap another's, or hostile metadata.
fn mutate_header(rng: &mut ChaCha8Rng, h: &Value) -> Value {
    let mut h = h.clone();
    let o = h.as_object_mut().unwrap();
    let names: Vec<String> = o.keys().filter(|k| *k != "__metadata__").cloned().collect();
    let name = names[rng.random_range(0..names.len())].clone();
    let t = o[&name].clone();
    let n: u64 = t["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .product();
    match rng.random_range(0..6) {
        0 => o[&name]["dtype"] = json!(["I32", "U32", "F32"][rng.random_range(0..3)]),
        1 => {
            let shape = match rng.random_range(0..4) {
                0 => json!([n]),
                1 => json!([1, n]),
                2 => json!([n, 1, 1]),
                _ => json!([]),
            };
            o[&name]["shape"] = shape;
        }
        2 => {
            let to = [
                "model.layers.999999999999.input_layernorm.weight",
                "model.layers.-1.mlp.up_proj.weight",
                "model.layers..x",
                "",
                "lm_head.weight",
            ][rng.random_range(0..5)];
            o.remove(&name);
            o.insert(to.into(), t);
        }
        3 => {
            let other = &names[rng.random_range(0..names.len())];
            let offs = o[other]["data_offsets"].clone();
            o[&name]["data_offsets"] = offs;
        }
        4 => {
            o.insert("__metadata__".into(), json!({"format": hostile(rng)}));
        }
        _ => {
            o[&name]["dtype"] = json!(["BF16", "F16", "I64", "BOOL", "U8"][rng.random_range(0..5)])
        }
    }
    h
}

/// A `.npy` whose header says something hostile (dtype, shape, order, version, length field)
/// over 12 bytes of data.
fn npy_variant(rng: &mut ChaCha8Rng) -> Vec<u8> {
    let descr = ["'<u2'", "'<u4'", "'<i8'", "'>u2'", "'|u1'", "''", "<u2"][rng.random_range(0..7)];
    let shape = [
        "(6,)",
        "(0,)",
        "(7,)",
        "(3, 2)",
        "(18446744073709551615,)",
        "()",
        "(3,",
    ][rng.random_range(0..7)];
    let order = ["False", "True", "0"][rng.random_range(0..3)];
    let h = format!("{{'descr': {descr}, 'fortran_order': {order}, 'shape': {shape}, }}\n");
    let version = [1u8, 2, 3, 9][rng.random_range(0..4)];
    let mut b = b"\x93NUMPY".to_vec();
    b.extend([version, 0]);
    let len = if rng.random_bool(0.8) {
        h.len() as u32
    } else {
        rng.random()
    };
    if version == 1 {
        b.extend((len as u16).to_le_bytes());
    } else {
        b.extend(len.to_le_bytes());
    }
    b.extend(h.as_bytes());
    b.extend([1u8, 0, 2, 0, 3, 0, 43, 1, 4, 0, 5, 0]);
    b
}

/// Two inputs in three mutated as JSON (when the seed is JSON), the rest as bytes.
fn mutate(rng: &mut ChaCha8Rng, seed: &[u8], keys: &[&str]) -> Vec<u8> {
    match serde_json::from_slice::<Value>(seed) {
        Ok(v) if rng.random_bool(0.67) => serde_json::to_vec(&mutate_json(rng, &v, keys)).unwrap(),
        _ => mutate_bytes(rng, seed),
    }
}

/// The fields of the JSONL shapes the readers know.
const JSONL_KEYS: [&str; 19] = [
    "messages",
    "completion",
    "is_safety",
    "label",
    "role",
    "content",
    "prompt",
    "response",
    "chosen",
    "rejected",
    "rating",
    "category",
    "text",
    "learn",
    "chosen_safe",
    "rejected_safe",
    "answer",
    "id",
    "kind",
];

/// JSONL: each line mutated with some probability.
fn mutate_lines(rng: &mut ChaCha8Rng, lines: &[Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in lines {
        let line = serde_json::to_vec(l).unwrap();
        if rng.random_bool(0.5) {
            let m = mutate(rng, &line, &JSONL_KEYS);
            out.extend(m.into_iter().filter(|&b| b != b'\n'));
        } else {
            out.extend(line);
        }
        out.push(b'\n');
    }
    if rng.random_bool(0.2) {
        out = mutate_bytes(rng, &out);
    }
    out
}

/// Runs `parse` on `input`; a panic fails the test naming the parser and the input.
fn no_panic(what: &str, input: &[u8], parse: impl FnOnce()) {
    if catch_unwind(AssertUnwindSafe(parse)).is_err() {
        panic!(
            "{what} panicked on this input:\n{}",
            String::from_utf8_lossy(&input[..input.len().min(4000)])
        );
    }
}

/// LlamaConfig's fields (and `model_type`), as config.json spells them.
const CONFIG_KEYS: [&str; 19] = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "max_position_embeddings",
    "tie_word_embeddings",
    "hidden_act",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "rope_scaling",
    "attention_bias",
    "mlp_bias",
    "model_type",
];

fn tiny_cfg() -> LlamaConfig {
    serde_json::from_value(
        json!({"vocab_size": 300, "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 32}),
    )
    .unwrap()
}

/// A tokenizer trained on a small built-in text, and a tiny checkpoint that uses it.
fn setup(d: &Path) -> (PathBuf, PathBuf) {
    let text = "First Citizen: Before we proceed any further, hear me speak.\n\
                All: Speak, speak. You are all resolved rather to die than to famish?\n"
        .repeat(40);
    std::fs::write(d.join("c.txt"), text).unwrap();
    let tok = d.join("tok.json");
    trainer::tokenizer_train::train(&trainer::tokenizer_train::TrainTokenizerConfig {
        inputs: vec![d.join("c.txt")],
        vocab_size: 300,
        out: tok.clone(),
        min_frequency: 2,
        skip_bad: false,
        progress: false,
    })
    .unwrap();
    let mut m = Llama::new(Cpu, tiny_cfg(), Head::Lm).unwrap();
    m.init_random(1).unwrap();
    let ck = d.join("ck");
    save_model(&m, &ck, SaveOptions::default(), |_| Ok(())).unwrap();
    (tok, ck)
}

/// Every tensor of an opened file read every way a caller reads one.
fn read_all(f: &TensorFiles) {
    for name in f.names() {
        let _ = f.read_f32(name);
        let _ = f.read_i64(name);
        let _ = f.shape(name);
        let _ = f.read_f32_range(name, 0, 1);
    }
    let _ = f.metadata();
}

#[test]
fn no_parser_panics_on_hostile_files() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (tok_path, ck) = setup(d);
    let tok = Tokenizer::from_file(&tok_path).unwrap();
    load_model(Cpu, &ck, Head::Lm).expect("the seed checkpoint loads");
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let file = d.join("input");

    // ---- safetensors: the header as JSON, and the whole file as bytes ---------------------------
    let st = std::fs::read(ck.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&st[8..8 + n]).unwrap();
    for i in 0..ITERS {
        let bytes = if i % 3 < 2 {
            let h = if i % 3 == 0 {
                mutate_json(
                    &mut rng,
                    &header,
                    &["dtype", "shape", "data_offsets", "__metadata__"],
                )
            } else {
                mutate_header(&mut rng, &header)
            };
            let h = serde_json::to_vec(&h).unwrap();
            let mut b = (h.len() as u64).to_le_bytes().to_vec();
            b.extend(h);
            b.extend_from_slice(&st[8 + n..]);
            b
        } else {
            mutate_bytes(&mut rng, &st)
        };
        let dir = d.join("st");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("model.safetensors"), &bytes).unwrap();
        std::fs::copy(ck.join("config.json"), dir.join("config.json")).unwrap();
        no_panic("safetensors", &bytes, || {
            if let Ok(f) = TensorFiles::open(&dir.join("model.safetensors")) {
                read_all(&f);
            }
            let _ = load_model(Cpu, &dir, Head::Lm);
        });
    }

    // ---- config.json beside fixed weights, and a forward when it loads --------------------------
    let cfg = std::fs::read(ck.join("config.json")).unwrap();
    let dir = d.join("cfg");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(ck.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    let cfg_json: Value = serde_json::from_slice(&cfg).unwrap();
    let swept = sweep(&cfg_json, &CONFIG_KEYS, 0);
    for i in 0..swept.len() + ITERS {
        let bytes = match swept.get(i) {
            Some(v) => serde_json::to_vec(v).unwrap(),
            None => mutate(&mut rng, &cfg, &CONFIG_KEYS),
        };
        std::fs::write(dir.join("config.json"), &bytes).unwrap();
        no_panic("config.json", &bytes, || {
            // A model of the config itself (small ones: the harness bounds its own memory).
            if let Ok(c) = LlamaConfig::from_file(&dir.join("config.json")) {
                if c.checked_num_params().is_some_and(|n| n < 1 << 20) {
                    if let Ok(mut m) = Llama::new(Cpu, c, Head::Lm) {
                        let _ = m.init_random(1);
                        let _ = m.forward(&Batch::new(&[1, 5], 1, 2));
                    }
                }
            }
            for head in [Head::Lm, Head::Score] {
                if let Ok(mut m) = load_model(Cpu, &dir, head) {
                    let _ = m.forward(&Batch::new(&[1, 5], 1, 2));
                }
            }
        });
    }

    // ---- the sharded index -------------------------------------------------------------------
    let dir = d.join("sharded");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        ck.join("model.safetensors"),
        dir.join("model-00001-of-00001.safetensors"),
    )
    .unwrap();
    let names: Vec<String> = TensorFiles::open(&ck)
        .unwrap()
        .names()
        .iter()
        .map(|s| s.to_string())
        .collect();
    let index = json!({"metadata": {"total_size": 1},
        "weight_map": names.iter().map(|n| (n.clone(), json!("model-00001-of-00001.safetensors")))
            .collect::<serde_json::Map<_, _>>()});
    let index = serde_json::to_vec(&index).unwrap();
    std::fs::write(dir.join("model.safetensors.index.json"), &index).unwrap();
    TensorFiles::open(&dir).expect("the seed index opens");
    for _ in 0..ITERS {
        let bytes = mutate(
            &mut rng,
            &index,
            &["weight_map", "metadata", "model.norm.weight"],
        );
        std::fs::write(dir.join("model.safetensors.index.json"), &bytes).unwrap();
        no_panic("model.safetensors.index.json", &bytes, || {
            if let Ok(f) = TensorFiles::open(&dir) {
                read_all(&f);
            }
        });
    }

    // ---- tokenizer.json, used as the readers use it ------------------------------------------
    let tj = std::fs::read(&tok_path).unwrap();
    let chat = [
        Message::new("user", "Hi"),
        Message::new("assistant", "Speak."),
    ];
    for _ in 0..ITERS / 2 {
        let keys = [
            "model",
            "vocab",
            "merges",
            "added_tokens",
            "normalizer",
            "pre_tokenizer",
            "decoder",
            "type",
            "id",
            "content",
            "byte_fallback",
            "unk_token",
        ];
        let bytes = mutate(&mut rng, &tj, &keys);
        std::fs::write(&file, &bytes).unwrap();
        no_panic("tokenizer.json", &bytes, || {
            if let Ok(t) = Tokenizer::from_file(&file) {
                if let Ok(ids) = t.encode("First Citizen: speak", true) {
                    let _ = t.decode(&ids);
                }
                let _ = t.chat(&chat);
                let _ = t.decode(&[0, 1, 2, 299, 100_000]);
            }
        });
    }

    // ---- every JSONL shape -------------------------------------------------------------------
    let sft = [
        json!({"messages": [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}),
        json!({"prompt": "Hi", "response": "Hello", "learn": "last"}),
        json!({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello"}),
        json!({"prompt": [{"role": "user", "content": "Hi"}],
            "completion": [{"role": "assistant", "content": "Hello"}]}),
    ];
    let pairs = [
        json!({"prompt": "Hi", "chosen": "Hello", "rejected": "Go", "rating": "better",
            "chosen_safe": true, "rejected_safe": false, "category": "safety"}),
        json!({"messages": [{"role": "user", "content": "Hi"}], "chosen": "A", "rejected": "B"}),
        json!({"chosen": "\n\nHuman: Hi\n\nAssistant: A", "rejected": "\n\nHuman: Hi\n\nAssistant: B"}),
        json!({"prompt": [{"role": "user", "content": "Hi"}], "is_safety": true,
            "chosen": [{"role": "assistant", "content": "A"}],
            "rejected": [{"role": "assistant", "content": "B"}]}),
        json!({"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A"}],
            "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "B"}]}),
    ];
    let prompts = [
        json!({"messages": [{"role": "user", "content": "Hi"}], "category": "safety"}),
        json!({"prompt": "Hi"}),
        json!({"prompt": "Hi", "response": "Hello"}),
        json!({"prompt": [{"role": "user", "content": "Hi"}], "is_safety": true}),
    ];
    let examples = [json!({"id": "x", "category": "helpfulness", "kind": "fact",
        "messages": [{"role": "user", "content": "Hi"}], "answer": "A"})];
    let docs = [
        json!({"text": "First Citizen: speak."}),
        json!({"text": "All: speak."}),
    ];
    let margin: trainer::rm::MarginKind = "small".parse().unwrap();
    let files = [file.clone()];
    // The seeds themselves are valid, so the mutations start from what the readers accept.
    let lines = |v: &[Value]| v.iter().map(|l| format!("{l}\n")).collect::<String>();
    std::fs::write(&file, lines(&sft)).unwrap();
    assert_eq!(
        trainer::sft::load(&files, &tok, 64, 0.5, false)
            .unwrap()
            .dialogues,
        4
    );
    std::fs::write(&file, lines(&pairs)).unwrap();
    assert_eq!(
        trainer::formats::read_pairs(&files, false).unwrap().0.len(),
        5
    );
    std::fs::write(&file, lines(&prompts)).unwrap();
    assert_eq!(
        trainer::formats::read_prompts(&files, None)
            .unwrap()
            .0
            .len(),
        4
    );
    std::fs::write(d.join("docs.jsonl"), lines(&docs)).unwrap();
    let docs_read = trainer::data::read_documents(&d.join("docs.jsonl"), false, &mut |_| {});
    assert_eq!(docs_read.unwrap().len(), 2);
    let shapes: [(&str, &[Value]); 5] = [
        ("SFT dialogues", &sft),
        ("preference pairs", &pairs),
        ("prompts", &prompts),
        ("world examples", &examples),
        ("documents", &docs),
    ];
    let swept: Vec<(&str, Vec<u8>)> = shapes
        .iter()
        .flat_map(|(what, seeds)| {
            seeds.iter().flat_map(move |l| {
                sweep(l, &JSONL_KEYS, 2)
                    .into_iter()
                    .map(move |v| (*what, format!("{v}\n").into_bytes()))
            })
        })
        .collect();
    for i in 0..swept.len() + ITERS {
        let (what, bytes) = match (swept.get(i), i % 5) {
            (Some((what, b)), _) => (*what, b.clone()),
            (None, 0) => ("SFT dialogues", mutate_lines(&mut rng, &sft)),
            (None, 1) => ("preference pairs", mutate_lines(&mut rng, &pairs)),
            (None, 2) => ("prompts", mutate_lines(&mut rng, &prompts)),
            (None, 3) => ("world examples", mutate_lines(&mut rng, &examples)),
            _ => ("documents", mutate_lines(&mut rng, &docs)),
        };

        std::fs::write(&file, &bytes).unwrap();
        let jsonl = d.join("input.jsonl");
        std::fs::write(&jsonl, &bytes).unwrap();
        no_panic(what, &bytes, || {
            for skip in [false, true] {
                let _ = trainer::sft::load(&files, &tok, 64, 0.5, skip);
                if let Ok((p, _)) = trainer::formats::read_pairs(&files, skip) {
                    let _ = trainer::rm::tokenize_pairs(&tok, &p, 64, margin);
                }
                let _ = trainer::data::read_documents(&jsonl, skip, &mut |_| {});
                let _ = trainer::formats::read_prompts(&files, Some(skip));
            }
            let _ = trainer::formats::read_scored(&files);
            let _ = trainer::world::read_examples(&file);
            let _ = trainer::run_dir::read_jsonl_values(&file);
        });
    }

    // ---- token files: .npy and shard headers, raw ids ------------------------------------------
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    let h = "{'descr': '<u2', 'fortran_order': False, 'shape': (6,), }          \n";
    npy.extend_from_slice(&(h.len() as u16).to_le_bytes());
    npy.extend_from_slice(h.as_bytes());
    npy.extend([1u16, 2, 3, 299, 4, 5].iter().flat_map(|x| x.to_le_bytes()));
    let shard = d.join("shard.bin");
    trainer::data::write_shard(&shard, &[1, 2, 3, 4, 5, 6], 300).unwrap();
    let shard = std::fs::read(&shard).unwrap();
    assert_eq!(trainer::data::npy_header(&npy).unwrap().0, npy.len() - 12);
    for i in 0..ITERS {
        let (name, bytes) = match i % 3 {
            0 => ("t.npy", npy_variant(&mut rng)),
            1 => ("t.npy", mutate_bytes(&mut rng, &npy)),
            _ => ("t.bin", mutate_bytes(&mut rng, &shard)),
        };
        let dir = d.join(format!("tokens{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), &bytes).unwrap();
        no_panic(name, &bytes, || {
            let _ = trainer::data::npy_header(&bytes);
            if let Ok(s) = trainer::data::Shard::open_ids(&dir.join(name), Default::default()) {
                let _ = s.tokens();
            }
            let _ = trainer::data::TokenData::open_ids(&dir, Default::default(), Some(&tok), 2);
            let _ = trainer::data::TokenData::open_ids(&dir, Default::default(), None, 1);
        });
        std::fs::remove_dir_all(&dir).unwrap();
    }

    // ---- a run's trainer_state.json ----------------------------------------------------------
    let model = trainer::lm_train::ModelSource::Preset("tiny".into());
    let c = trainer::lm_train::TrainConfig::defaults(d.join("data"), d.join("run"), model, 10);
    let state = serde_json::to_vec(&json!({"kind": "pretrain", "step": 3, "loader_position": 7,
        "adamw_step": 3, "seed": 1, "config": c}))
    .unwrap();
    let ckd = d.join("run/checkpoints/step-00000003");
    std::fs::create_dir_all(&ckd).unwrap();
    std::fs::write(ckd.join("trainer_state.json"), &state).unwrap();
    trainer::lm_train::resume_config(&ckd, None).expect("the seed state resumes");
    for _ in 0..ITERS / 2 {
        let keys = [
            "kind",
            "step",
            "loader_position",
            "config",
            "steps",
            "lr",
            "seq_len",
            "batch_size",
            "grad_accum",
            "world",
            "data",
            "out",
            "eval_windows",
        ];
        let bytes = mutate(&mut rng, &state, &keys);
        std::fs::write(ckd.join("trainer_state.json"), &bytes).unwrap();
        no_panic("trainer_state.json", &bytes, || {
            if let Ok(c) = trainer::lm_train::resume_config(&ckd, Some(5)) {
                let _ = c.validate();
            }
        });
    }
}
