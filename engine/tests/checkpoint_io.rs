//! Checkpoint I/O: save/load round trips (f32, bf16, sharded, tied, score head), f16-stored
//! weights, the atomic directory write, and bad input that must give an error naming the file
//! and tensor instead of a panic.

use engine::checkpoint::{
    load_model, save_model, write_dir_atomic, SaveDtype, SaveOptions, TensorFiles,
};
use engine::{Cpu, Head, Llama, LlamaConfig};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};

fn tiny_cfg() -> LlamaConfig {
    let mut c = LlamaConfig::preset("tiny").unwrap();
    c.vocab_size = 64;
    c.hidden_size = 16;
    c.intermediate_size = 40;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 4;
    c.num_key_value_heads = Some(2);
    c.max_position_embeddings = 32;
    c
}

fn random_model(cfg: LlamaConfig, head: Head, seed: u64) -> Llama<Cpu> {
    let mut m = Llama::new(Cpu, cfg, head).unwrap();
    m.init_random(seed).unwrap();
    // Norm gains start at exactly 1.0; perturb them so a round trip that dropped them shows.
    let mut p = m.params_to_host().unwrap();
    for (i, x) in p.iter_mut().enumerate() {
        *x += 1e-3 * ((i % 17) as f32 - 8.0);
    }
    m.set_params(&p).unwrap();
    m
}

fn save(m: &Llama<Cpu>, dir: &Path, opts: SaveOptions) {
    save_model(m, dir, opts, |_| Ok(())).unwrap();
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn sorted_dir(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

/// Rewrites a safetensors file through `edit`, which gets (name, dtype, shape, bytes) of every
/// tensor and returns the ones to write.
type Tensor = (String, Dtype, Vec<usize>, Vec<u8>);
fn rewrite(path: &Path, edit: impl FnOnce(Vec<Tensor>) -> Vec<Tensor>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ts: Vec<Tensor> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    write_st(path, &edit(ts));
}

fn write_st(path: &Path, ts: &[Tensor]) {
    let views: Vec<(String, TensorView)> = ts
        .iter()
        .map(|(n, dt, s, b)| (n.clone(), TensorView::new(*dt, s.clone(), b).unwrap()))
        .collect();
    let out = safetensors::serialize(views, None).unwrap();
    std::fs::write(path, out).unwrap();
}

/// The error of loading `dir`, which must fail (and not panic).
fn load_err(dir: &Path, head: Head) -> String {
    match load_model(Cpu, dir, head) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => {
            eprintln!("{e}");
            e.to_string()
        }
    }
}

fn assert_names(msg: &str, file: &Path, tensor: Option<&str>) {
    let f = file.display().to_string();
    assert!(msg.contains(&f), "error does not name {f}: {msg}");
    if let Some(t) = tensor {
        assert!(
            msg.contains(&format!("`{t}`")),
            "error does not name tensor {t}: {msg}"
        );
    }
}

fn saved_tiny(tmp: &Path) -> (Llama<Cpu>, PathBuf) {
    let m = random_model(tiny_cfg(), Head::Lm, 7);
    let dir = tmp.join("ckpt");
    save(&m, &dir, SaveOptions::default());
    (m, dir)
}

// ---- round trips -------------------------------------------------------------------------------

#[test]
fn f32_round_trip_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, dir) = saved_tiny(tmp.path());
    // A causal LM carries generation_config.json for transformers' generate.
    assert_eq!(
        sorted_dir(&dir),
        ["config.json", "generation_config.json", "model.safetensors"]
    );
    let cfg = read_json(&dir.join("config.json"));
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert_eq!(cfg["torch_dtype"], "float32");
    assert_eq!(cfg["num_hidden_layers"], 2);
    let back = load_model(Cpu, &dir, Head::Lm).unwrap();
    // The saved config spells out head_dim, as Hugging Face writes it; otherwise it is the same.
    let mut want_cfg = m.cfg.clone();
    want_cfg.head_dim = Some(m.cfg.head_dim());
    assert_eq!(back.cfg, want_cfg);
    assert_eq!(back.table.total, m.table.total);
    assert_eq!(
        bits(&back.params_to_host().unwrap()),
        bits(&m.params_to_host().unwrap())
    );
    let files = TensorFiles::open(&dir).unwrap();
    assert!(files.contains("lm_head.weight"));
    assert_eq!(files.names().len(), m.table.entries.len());
}

#[test]
fn bf16_round_trip_equals_bf16_rounded_params() {
    let tmp = tempfile::tempdir().unwrap();
    let m = random_model(tiny_cfg(), Head::Lm, 11);
    let dir = tmp.path().join("bf16");
    save(
        &m,
        &dir,
        SaveOptions {
            dtype: SaveDtype::Bf16,
            ..SaveOptions::default()
        },
    );
    assert_eq!(
        read_json(&dir.join("config.json"))["torch_dtype"],
        "bfloat16"
    );
    let files = TensorFiles::open(&dir).unwrap();
    let st_bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&st_bytes).unwrap();
    assert!(st.iter().all(|(_, v)| v.dtype() == Dtype::BF16));
    drop(files);
    let back = load_model(Cpu, &dir, Head::Lm).unwrap();
    let want: Vec<f32> = m
        .params_to_host()
        .unwrap()
        .iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect();
    assert_eq!(bits(&back.params_to_host().unwrap()), bits(&want));
}

#[test]
fn sharded_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let m = random_model(tiny_cfg(), Head::Lm, 3);
    let dir = tmp.path().join("sharded");
    save(
        &m,
        &dir,
        SaveOptions {
            dtype: SaveDtype::F32,
            max_shard_bytes: 8 * 1024,
        },
    );
    let names = sorted_dir(&dir);
    assert!(
        !names.contains(&"model.safetensors".to_string()),
        "{names:?}"
    );
    let shards: Vec<&String> = names
        .iter()
        .filter(|n| n.starts_with("model-") && n.ends_with(".safetensors"))
        .collect();
    assert!(shards.len() >= 3, "expected ≥3 shards, got {names:?}");
    let n = shards.len();
    for (i, s) in shards.iter().enumerate() {
        assert_eq!(**s, format!("model-{:05}-of-{:05}.safetensors", i + 1, n));
    }
    let index = read_json(&dir.join("model.safetensors.index.json"));
    let wm = index["weight_map"].as_object().expect("weight_map object");
    assert_eq!(wm.len(), m.table.entries.len());
    for e in &m.table.entries {
        let shard = wm[&e.name].as_str().unwrap();
        assert!(dir.join(shard).is_file(), "{} -> {shard}", e.name);
    }
    assert_eq!(
        index["metadata"]["total_size"].as_u64().unwrap() as usize,
        4 * m.table.total
    );
    let back = load_model(Cpu, &dir, Head::Lm).unwrap();
    assert_eq!(
        bits(&back.params_to_host().unwrap()),
        bits(&m.params_to_host().unwrap())
    );
    // Opening the index file directly works the same.
    let files = TensorFiles::open(&dir.join("model.safetensors.index.json")).unwrap();
    assert_eq!(files.names().len(), m.table.entries.len());
}

#[test]
fn tied_embeddings_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = tiny_cfg();
    cfg.tie_word_embeddings = true;
    let m = random_model(cfg, Head::Lm, 5);
    assert!(m.table.get("lm_head.weight").is_none());
    let dir = tmp.path().join("tied");
    save(&m, &dir, SaveOptions::default());
    let files = TensorFiles::open(&dir).unwrap();
    assert!(!files.contains("lm_head.weight"));
    assert!(files.contains("model.embed_tokens.weight"));
    assert_eq!(
        read_json(&dir.join("config.json"))["tie_word_embeddings"],
        true
    );
    let back = load_model(Cpu, &dir, Head::Lm).unwrap();
    assert!(back.cfg.tie_word_embeddings);
    assert_eq!(back.table.lm_head, Some(back.table.embed));
    assert_eq!(
        bits(&back.params_to_host().unwrap()),
        bits(&m.params_to_host().unwrap())
    );
}

#[test]
fn untied_config_without_lm_head_names_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, dir) = saved_tiny(tmp.path());
    let st = dir.join("model.safetensors");
    rewrite(&st, |ts| {
        ts.into_iter().filter(|t| t.0 != "lm_head.weight").collect()
    });
    let msg = load_err(&dir, Head::Lm);
    assert_names(&msg, &st, Some("lm_head.weight"));
    assert!(msg.contains("tie_word_embeddings"), "{msg}");
}

#[test]
fn score_head_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let m = random_model(tiny_cfg(), Head::Score, 9);
    let dir = tmp.path().join("rm");
    save(&m, &dir, SaveOptions::default());
    let files = TensorFiles::open(&dir).unwrap();
    assert!(files.contains("score.weight"));
    assert!(!files.contains("lm_head.weight"));
    let (shape, _) = files.read_f32("score.weight").unwrap();
    assert_eq!(shape, [1, 16]);
    drop(files);
    let cfg = read_json(&dir.join("config.json"));
    assert_eq!(cfg["architectures"][0], "LlamaForSequenceClassification");
    assert_eq!(cfg["num_labels"], 1);
    let back = load_model(Cpu, &dir, Head::Score).unwrap();
    assert_eq!(back.head, Head::Score);
    assert_eq!(
        bits(&back.params_to_host().unwrap()),
        bits(&m.params_to_host().unwrap())
    );
    // A reward checkpoint has no LM head: loading it as a causal LM says so.
    let msg = load_err(&dir, Head::Lm);
    assert_names(&msg, &dir.join("model.safetensors"), Some("lm_head.weight"));
}

// ---- stored dtypes -----------------------------------------------------------------------------

#[test]
fn f16_stored_weights_load() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("half.safetensors");
    let vals = [0.0f32, 1.0, -2.5, 0.333, 65504.0, -1e-4, 3.25];
    let bytes: Vec<u8> = vals
        .iter()
        .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
        .collect();
    write_st(
        &path,
        &[("w".to_string(), Dtype::F16, vec![vals.len()], bytes)],
    );
    let files = TensorFiles::open(&path).unwrap();
    let (shape, got) = files.read_f32("w").unwrap();
    assert_eq!(shape, [vals.len()]);
    let want: Vec<f32> = vals
        .iter()
        .map(|&x| half::f16::from_f32(x).to_f32())
        .collect();
    assert_eq!(bits(&got), bits(&want));
    assert_eq!(got[4], 65504.0);
}

#[test]
fn whole_model_stored_as_f16_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, dir) = saved_tiny(tmp.path());
    rewrite(&dir.join("model.safetensors"), |ts| {
        ts.into_iter()
            .map(|(n, _, s, b)| {
                let h: Vec<u8> = b
                    .chunks_exact(4)
                    .flat_map(|c| {
                        half::f16::from_f32(f32::from_le_bytes(c.try_into().unwrap())).to_le_bytes()
                    })
                    .collect();
                (n, Dtype::F16, s, h)
            })
            .collect()
    });
    let back = load_model(Cpu, &dir, Head::Lm).unwrap();
    let want: Vec<f32> = m
        .params_to_host()
        .unwrap()
        .iter()
        .map(|&x| half::f16::from_f32(x).to_f32())
        .collect();
    assert_eq!(bits(&back.params_to_host().unwrap()), bits(&want));
}

#[test]
fn non_float_weight_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, dir) = saved_tiny(tmp.path());
    let st = dir.join("model.safetensors");
    let name = "model.norm.weight";
    rewrite(&st, |ts| {
        ts.into_iter()
            .map(|t| {
                if t.0 == name {
                    (t.0, Dtype::I32, t.2, t.3)
                } else {
                    t
                }
            })
            .collect()
    });
    let msg = load_err(&dir, Head::Lm);
    assert_names(&msg, &st, Some(name));
    assert!(msg.contains("I32"), "{msg}");
}

// ---- atomic write ------------------------------------------------------------------------------

fn no_temp_siblings(parent: &Path) {
    for n in sorted_dir(parent) {
        assert!(
            !n.contains(".tmp-") && !n.contains(".old-"),
            "leftover {n} in {}",
            parent.display()
        );
    }
}

#[test]
fn saving_over_a_checkpoint_replaces_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, dir) = saved_tiny(tmp.path());
    std::fs::write(dir.join("stale.txt"), "from the old checkpoint").unwrap();
    let m2 = random_model(tiny_cfg(), Head::Lm, 99);
    save_model(&m2, &dir, SaveOptions::default(), |d| {
        std::fs::write(d.join("extra.txt"), "new").map_err(|e| engine::Error::io(d, e))
    })
    .unwrap();
    assert_eq!(
        sorted_dir(&dir),
        [
            "config.json",
            "extra.txt",
            "generation_config.json",
            "model.safetensors"
        ]
    );
    no_temp_siblings(tmp.path());
    assert_eq!(sorted_dir(tmp.path()), ["ckpt"]);
    let back = load_model(Cpu, &dir, Head::Lm).unwrap();
    assert_eq!(
        bits(&back.params_to_host().unwrap()),
        bits(&m2.params_to_host().unwrap())
    );
}

#[test]
fn failing_extra_leaves_the_old_checkpoint_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, dir) = saved_tiny(tmp.path());
    let before: Vec<(String, Vec<u8>)> = sorted_dir(&dir)
        .into_iter()
        .map(|n| {
            let b = std::fs::read(dir.join(&n)).unwrap();
            (n, b)
        })
        .collect();
    let m2 = random_model(tiny_cfg(), Head::Lm, 100);
    let err = save_model(&m2, &dir, SaveOptions::default(), |_| {
        Err(engine::Error::Input("extra failed on purpose".into()))
    })
    .unwrap_err();
    assert!(err.to_string().contains("extra failed on purpose"), "{err}");
    let after: Vec<(String, Vec<u8>)> = sorted_dir(&dir)
        .into_iter()
        .map(|n| {
            let b = std::fs::read(dir.join(&n)).unwrap();
            (n, b)
        })
        .collect();
    assert_eq!(before, after, "old checkpoint changed");
    no_temp_siblings(tmp.path());
    let back = load_model(Cpu, &dir, Head::Lm).unwrap();
    assert_eq!(
        bits(&back.params_to_host().unwrap()),
        bits(&m.params_to_host().unwrap())
    );
}

#[test]
fn failing_first_save_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("never");
    let r = write_dir_atomic(&dir, |_| Err(engine::Error::Input("no".into())));
    assert!(r.is_err());
    assert!(!dir.exists());
    assert!(
        sorted_dir(tmp.path()).is_empty(),
        "{:?}",
        sorted_dir(tmp.path())
    );
}

#[test]
fn save_creates_missing_parents() {
    let tmp = tempfile::tempdir().unwrap();
    let m = random_model(tiny_cfg(), Head::Lm, 1);
    let dir = tmp.path().join("a/b/c");
    save(&m, &dir, SaveOptions::default());
    load_model(Cpu, &dir, Head::Lm).unwrap();
}

// ---- bad input ---------------------------------------------------------------------------------

#[test]
fn missing_tensor_names_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, dir) = saved_tiny(tmp.path());
    let st = dir.join("model.safetensors");
    let name = "model.layers.1.self_attn.v_proj.weight";
    rewrite(&st, |ts| ts.into_iter().filter(|t| t.0 != name).collect());
    let msg = load_err(&dir, Head::Lm);
    assert_names(&msg, &st, Some(name));
    assert!(msg.contains("missing"), "{msg}");
}

#[test]
fn missing_tensor_in_shards_names_the_index() {
    let tmp = tempfile::tempdir().unwrap();
    let m = random_model(tiny_cfg(), Head::Lm, 2);
    let dir = tmp.path().join("sharded");
    save(
        &m,
        &dir,
        SaveOptions {
            dtype: SaveDtype::F32,
            max_shard_bytes: 8 * 1024,
        },
    );
    let name = "model.layers.0.mlp.up_proj.weight";
    let index_path = dir.join("model.safetensors.index.json");
    let mut index = read_json(&index_path);
    let shard = index["weight_map"][name].as_str().unwrap().to_string();
    index["weight_map"].as_object_mut().unwrap().remove(name);
    std::fs::write(&index_path, index.to_string()).unwrap();
    rewrite(&dir.join(&shard), |ts| {
        ts.into_iter().filter(|t| t.0 != name).collect()
    });
    let msg = load_err(&dir, Head::Lm);
    assert_names(&msg, &index_path, Some(name));
}

#[test]
fn bad_shard_index_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let m = random_model(tiny_cfg(), Head::Lm, 2);
    let dir = tmp.path().join("sharded");
    save(
        &m,
        &dir,
        SaveOptions {
            dtype: SaveDtype::F32,
            max_shard_bytes: 8 * 1024,
        },
    );
    let index_path = dir.join("model.safetensors.index.json");
    let good = read_json(&index_path);
    let name = "model.norm.weight";

    // The index points a tensor at a shard that does not hold it.
    let mut idx = good.clone();
    let first = good["weight_map"]["model.embed_tokens.weight"].clone();
    assert_ne!(good["weight_map"][name], first);
    idx["weight_map"][name] = first;
    std::fs::write(&index_path, idx.to_string()).unwrap();
    let msg = load_err(&dir, Head::Lm);
    assert_names(&msg, &index_path, Some(name));

    // A shard file named by the index is missing.
    let mut idx = good.clone();
    idx["weight_map"][name] = "model-99999-of-99999.safetensors".into();
    std::fs::write(&index_path, idx.to_string()).unwrap();
    let msg = load_err(&dir, Head::Lm);
    assert!(msg.contains("model-99999-of-99999.safetensors"), "{msg}");

    // A weight_map value that is not a string.
    let mut idx = good.clone();
    idx["weight_map"][name] = 3.into();
    std::fs::write(&index_path, idx.to_string()).unwrap();
    let msg = load_err(&dir, Head::Lm);
    assert_names(&msg, &index_path, Some(name));

    // No weight_map at all.
    std::fs::write(&index_path, r#"{"metadata": {}}"#).unwrap();
    let msg = load_err(&dir, Head::Lm);
    assert_names(&msg, &index_path, None);
    assert!(msg.contains("weight_map"), "{msg}");

    // Not JSON.
    std::fs::write(&index_path, "{ not json").unwrap();
    let msg = load_err(&dir, Head::Lm);
    assert_names(&msg, &index_path, None);
}

#[test]
fn wrong_shape_names_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, dir) = saved_tiny(tmp.path());
    let st = dir.join("model.safetensors");
    let name = "model.layers.0.mlp.gate_proj.weight";
    rewrite(&st, |ts| {
        ts.into_iter()
            .map(|mut t| {
                if t.0 == name {
                    assert_eq!(t.2, [40, 16]);
                    t.2 = vec![16, 40];
                }
                t
            })
            .collect()
    });
    let msg = load_err(&dir, Head::Lm);
    assert_names(&msg, &st, Some(name));
    assert!(
        msg.contains("[16, 40]") && msg.contains("[40, 16]"),
        "{msg}"
    );
}

#[test]
fn truncated_file_names_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, dir) = saved_tiny(tmp.path());
    let st = dir.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let msg = load_err(&dir, Head::Lm);
    assert_names(&msg, &st, None);
    assert!(msg.contains("truncated"), "{msg}");
    // The header survives the cut, so the message names the first tensor that lost data.
    assert!(msg.contains("tensor `"), "{msg}");

    // Cut inside the header, and an empty file: still errors naming the file.
    std::fs::write(&st, &bytes[..20]).unwrap();
    assert_names(&load_err(&dir, Head::Lm), &st, None);
    std::fs::write(&st, &bytes[..3]).unwrap();
    assert_names(&load_err(&dir, Head::Lm), &st, None);
    std::fs::write(&st, b"").unwrap();
    assert_names(&load_err(&dir, Head::Lm), &st, None);
    // Garbage of the right length.
    std::fs::write(&st, vec![0xffu8; bytes.len()]).unwrap();
    assert_names(&load_err(&dir, Head::Lm), &st, None);
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v = read_json(&p);
    f(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

#[test]
fn config_with_fewer_layers_than_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, dir) = saved_tiny(tmp.path());
    edit_config(&dir, |v| v["num_hidden_layers"] = 1.into());
    let msg = load_err(&dir, Head::Lm);
    assert_names(&msg, &dir.join("model.safetensors"), None);
    assert!(msg.contains("tensor `model.layers.1."), "{msg}");
    assert!(msg.contains("num_hidden_layers = 1"), "{msg}");
}

#[test]
fn config_with_more_layers_than_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, dir) = saved_tiny(tmp.path());
    edit_config(&dir, |v| v["num_hidden_layers"] = 3.into());
    let msg = load_err(&dir, Head::Lm);
    assert_names(&msg, &dir.join("model.safetensors"), None);
    assert!(msg.contains("tensor `model.layers.2."), "{msg}");
    assert!(msg.contains("missing"), "{msg}");
}

#[test]
fn config_with_other_hidden_size() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, dir) = saved_tiny(tmp.path());
    edit_config(&dir, |v| {
        v["hidden_size"] = 32.into();
        v["head_dim"] = 8.into();
    });
    let msg = load_err(&dir, Head::Lm);
    assert_names(
        &msg,
        &dir.join("model.safetensors"),
        Some("model.embed_tokens.weight"),
    );
    assert!(
        msg.contains("[64, 16]") && msg.contains("[64, 32]"),
        "{msg}"
    );
}

#[test]
fn config_that_is_not_json() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, dir) = saved_tiny(tmp.path());
    let p = dir.join("config.json");
    std::fs::write(&p, "{\"vocab_size\": 64, oops").unwrap();
    assert_names(&load_err(&dir, Head::Lm), &p, None);
    // Valid JSON but not a config, and a config the engine rejects.
    std::fs::write(&p, "[1, 2, 3]").unwrap();
    assert_names(&load_err(&dir, Head::Lm), &p, None);
    std::fs::write(&p, "").unwrap();
    assert_names(&load_err(&dir, Head::Lm), &p, None);
    let (m, dir2) = {
        let d = tmp.path().join("other");
        let m = random_model(tiny_cfg(), Head::Lm, 4);
        save(&m, &d, SaveOptions::default());
        (m, d)
    };
    drop(m);
    edit_config(&dir2, |v| v["num_attention_heads"] = 0.into());
    let msg = load_err(&dir2, Head::Lm);
    assert_names(&msg, &dir2.join("config.json"), None);
    edit_config(&dir2, |v| {
        v["num_attention_heads"] = 4.into();
        v["num_key_value_heads"] = 3.into();
    });
    let msg = load_err(&dir2, Head::Lm);
    assert_names(&msg, &dir2.join("config.json"), None);
    assert!(msg.contains("num_key_value_heads"), "{msg}");
}

#[test]
fn missing_directory_and_files() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("does-not-exist");
    assert_names(&load_err(&missing, Head::Lm), &missing, None);
    assert_names(
        &TensorFiles::open(&missing).err().unwrap().to_string(),
        &missing,
        None,
    );
    // A directory with a config but no weights.
    let (_, dir) = saved_tiny(tmp.path());
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let msg = load_err(&dir, Head::Lm);
    assert_names(&msg, &dir, None);
    assert!(msg.contains("model.safetensors"), "{msg}");
    // Weights but no config.
    let (_, dir) = {
        let d = tmp.path().join("noconfig");
        let m = random_model(tiny_cfg(), Head::Lm, 6);
        save(&m, &d, SaveOptions::default());
        (m, d)
    };
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert_names(&load_err(&dir, Head::Lm), &dir.join("config.json"), None);
}

#[test]
fn unknown_tensor_reads_name_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, dir) = saved_tiny(tmp.path());
    let files = TensorFiles::open(&dir).unwrap();
    let msg = files.read_f32("no.such.tensor").unwrap_err().to_string();
    assert_names(&msg, &dir.join("model.safetensors"), Some("no.such.tensor"));
    let msg = files.read_i64("model.norm.weight").unwrap_err().to_string();
    assert_names(
        &msg,
        &dir.join("model.safetensors"),
        Some("model.norm.weight"),
    );
    let msg = files
        .read_f32_shaped("model.norm.weight", &[17], "the test")
        .unwrap_err()
        .to_string();
    assert_names(
        &msg,
        &dir.join("model.safetensors"),
        Some("model.norm.weight"),
    );
}
