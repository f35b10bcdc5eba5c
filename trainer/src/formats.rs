//! Data files in the shapes the ecosystem writes them, detected line by line, and the readers of
//! the three kinds of records the stages consume: dialogues (SFT), preference pairs (reward
//! models) and prompts (rejection sampling, PPO). One place, so every stage takes every shape
//! that makes sense for it and a bad line is named the same way everywhere (`file:line: why`).
//!
//! Shapes of one JSONL line (fields that are `null` count as absent):
//!
//! | fields | what it is |
//! | --- | --- |
//! | `messages` | a conversation: `[{"role", "content"}...]`, roles system/user/assistant (TRL conversational language modeling) |
//! | `prompt` | a prompt alone: text (a user turn) or messages (TRL prompt-only) |
//! | `prompt` + `completion` (or `response`) | text or messages each (TRL prompt-completion, standard or conversational) |
//! | `chosen` + `rejected` (+ `prompt` or `messages`) | a preference pair. With a prompt: the answers are text or one assistant message each (TRL explicit prompt). Without: two HH transcripts, or two message lists, that differ only in their last assistant turn (TRL implicit prompt) |
//! | `chosen` alone, or `text` | an Anthropic HH transcript (`\n\nHuman: ...\n\nAssistant: ...`); `chosen` may also be messages |
//!
//! A line with fields of two shapes (`messages` and `prompt`, `completion` and `response`) is
//! rejected as ambiguous rather than read one way. Optional fields: `learn` ("all" or "last") on
//! dialogues; on pairs the paper's `rating` (its four levels), `chosen_safe`/`rejected_safe`,
//! `is_safety` and `category`; on prompts `category: "safety"` or `is_safety: true`.
//! Where a kind needs only part of a record, it takes that part: SFT learns a pair's chosen
//! answer, prompts drop a trailing answer. Unpaired preference rows (KTO's `label`) are
//! rejected: nothing here learns from them.

use crate::rm::{Pair, RmKind};
use crate::sft::Dialogue;
use anyhow::{anyhow, bail, ensure, Context, Result};
use engine::tokenizer::{check_roles, Message};
use serde_json::Value;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// One record

/// One line's content, whatever its shape.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    /// A conversation; it ends with an assistant answer (to learn or score) or a user turn.
    Dialogue(Vec<Message>),
    /// A prompt and two answers to it, `chosen` preferred.
    Pair {
        prompt: Vec<Message>,
        chosen: String,
        rejected: String,
    },
}

/// A field that is present and not `null`.
fn field<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

/// Text or a message list, as TRL's standard and conversational forms hold a field.
enum Turns {
    Text(String),
    Messages(Vec<Message>),
}

fn turns(v: &Value, key: &str) -> Result<Turns> {
    match field(v, key) {
        Some(Value::String(s)) => Ok(Turns::Text(s.clone())),
        Some(Value::Array(_)) => Ok(Turns::Messages(messages(v, key)?)),
        Some(other) => bail!(
            "`{key}` must be text or a list of {{role, content}} messages, not {}",
            kind(other)
        ),
        None => bail!("missing `{key}`"),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "true/false",
        Value::Number(_) => "a number",
        Value::String(_) => "text",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A list of `{role, content}` messages; roles are system, user and assistant.
pub fn messages(v: &Value, key: &str) -> Result<Vec<Message>> {
    let list = field(v, key)
        .ok_or_else(|| anyhow!("missing `{key}`"))?
        .as_array()
        .ok_or_else(|| anyhow!("`{key}` must be a list of {{role, content}} messages"))?;
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let get = |k: &str| {
                m.get(k)
                    .and_then(Value::as_str)
                    .ok_or_else(|| anyhow!("`{key}[{i}]` has no text `{k}`"))
            };
            let (role, content) = (get("role")?, get("content")?);
            ensure!(
                matches!(role, "system" | "user" | "assistant"),
                "`{key}[{i}]`: unknown role `{role}` (system, user or assistant)"
            );
            Ok(Message::new(role, content))
        })
        .collect()
}

/// A prompt field: text is one user turn.
fn prompt_turns(v: &Value, key: &str) -> Result<Vec<Message>> {
    Ok(match turns(v, key)? {
        Turns::Text(t) => vec![Message::new("user", &t)],
        Turns::Messages(m) => m,
    })
}

/// An answer beside a prompt: text, or exactly one assistant message.
fn answer(v: &Value, key: &str) -> Result<String> {
    match turns(v, key)? {
        Turns::Text(t) => Ok(t),
        Turns::Messages(m) => match m.as_slice() {
            [a] if a.role == "assistant" => Ok(a.content.clone()),
            _ => bail!(
                "`{key}` beside a prompt must be one assistant message (it has {}: {})",
                m.len(),
                m.iter()
                    .map(|x| x.role.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
    }
}

/// Parses an HH transcript (`\n\nHuman: ...\n\nAssistant: ...`) into alternating messages;
/// consecutive turns of one speaker are merged.
pub fn parse_hh(text: &str) -> Result<Vec<Message>> {
    let mut msgs = Vec::new();
    let mut rest = text;
    let tags = [("\n\nHuman:", "user"), ("\n\nAssistant:", "assistant")];
    let next_tag = |s: &str| {
        tags.iter()
            .filter_map(|(t, r)| s.find(t).map(|i| (i, *t, *r)))
            .min_by_key(|x| x.0)
    };
    let Some((first, _, _)) = next_tag(rest) else {
        bail!("no `\\n\\nHuman:` / `\\n\\nAssistant:` turns");
    };
    rest = &rest[first..];
    while let Some((i, tag, role)) = next_tag(rest) {
        debug_assert_eq!(i, 0);
        let body = &rest[tag.len()..];
        let end = next_tag(body).map(|x| x.0).unwrap_or(body.len());
        msgs.push(Message::new(role, body[..end].trim()));
        rest = &body[end..];
    }
    let mut merged: Vec<Message> = Vec::new();
    for m in msgs {
        match merged.last_mut() {
            Some(l) if l.role == m.role => {
                l.content.push('\n');
                l.content.push_str(&m.content);
            }
            _ => merged.push(m),
        }
    }
    Ok(merged)
}

/// A whole conversation given as one field: an HH transcript or a message list.
fn transcript(v: &Value, key: &str) -> Result<Vec<Message>> {
    match turns(v, key)? {
        Turns::Text(t) => parse_hh(&t).with_context(|| format!("`{key}` (an HH transcript)")),
        Turns::Messages(m) => Ok(m),
    }
}

/// Splits a conversation before its last turn, which must be the assistant's.
fn split_last_answer(mut m: Vec<Message>, key: &str) -> Result<(Vec<Message>, String)> {
    match m.pop() {
        Some(a) if a.role == "assistant" => Ok((m, a.content)),
        _ => bail!("`{key}` must end with an assistant turn (the answer the pair compares)"),
    }
}

fn pair(v: &Value) -> Result<Record> {
    let (prompt, chosen, rejected) = match (field(v, "messages"), field(v, "prompt")) {
        (Some(_), Some(_)) => {
            bail!("both `messages` and `prompt` beside `chosen`/`rejected`: which is the prompt?")
        }
        (Some(_), None) => (
            messages(v, "messages")?,
            answer(v, "chosen")?,
            answer(v, "rejected")?,
        ),
        (None, Some(_)) => (
            prompt_turns(v, "prompt")?,
            answer(v, "chosen")?,
            answer(v, "rejected")?,
        ),
        (None, None) => {
            // Implicit prompt: two whole conversations sharing everything before the answer.
            let (c, r) = match (turns(v, "chosen")?, turns(v, "rejected")?) {
                (Turns::Text(c), Turns::Text(r)) => (
                    parse_hh(&c).context(
                        "`chosen` (an HH transcript, as there is no `prompt`; or pass `prompt`)",
                    )?,
                    parse_hh(&r).context("`rejected` (an HH transcript)")?,
                ),
                (Turns::Messages(c), Turns::Messages(r)) => (c, r),
                _ => bail!(
                    "without a `prompt`, `chosen` and `rejected` must both be transcripts or both message lists"
                ),
            };
            let (pc, c) = split_last_answer(c, "chosen")?;
            let (pr, r) = split_last_answer(r, "rejected")?;
            ensure!(
                pc == pr,
                "`chosen` and `rejected` differ before their last assistant turn (a pair compares two answers to one dialogue)"
            );
            (pc, c, r)
        }
    };
    Ok(Record::Pair {
        prompt,
        chosen,
        rejected,
    })
}

/// Detects the shape of one JSONL value and reads it (see the module doc for the shapes).
pub fn parse_record(v: &Value) -> Result<Record> {
    ensure!(v.is_object(), "expected a JSON object, got {}", kind(v));
    let has = |k: &str| field(v, k).is_some();
    if has("label") && !has("rejected") {
        bail!(
            "unpaired preference data (`label`, as KTO uses it) is not supported: give pairs of `chosen` and `rejected`"
        );
    }
    if has("chosen") && has("rejected") {
        return pair(v);
    }
    if has("rejected") {
        bail!("missing `chosen` beside `rejected`");
    }
    if has("chosen") {
        ensure!(
            !has("prompt") && !has("messages"),
            "missing `rejected` (a pair needs both answers)"
        );
        return Ok(Record::Dialogue(transcript(v, "chosen")?));
    }
    let answer_key = match (has("completion"), has("response")) {
        (true, true) => bail!("both `completion` and `response`: which is the answer?"),
        (true, false) => Some("completion"),
        (false, true) => Some("response"),
        (false, false) => None,
    };
    if has("messages") {
        if let Some(k) = ["prompt", "completion", "response", "text"]
            .into_iter()
            .find(|k| has(k))
        {
            bail!("both `messages` and `{k}`: which is the dialogue?");
        }
        return Ok(Record::Dialogue(messages(v, "messages")?));
    }
    if has("prompt") {
        let mut m = prompt_turns(v, "prompt")?;
        if let Some(k) = answer_key {
            match turns(v, k)? {
                Turns::Text(t) => m.push(Message::new("assistant", &t)),
                Turns::Messages(more) => m.extend(more),
            }
        }
        return Ok(Record::Dialogue(m));
    }
    if let Some(k) = answer_key {
        bail!("`{k}` without a `prompt`");
    }
    if has("text") {
        let t = field(v, "text")
            .and_then(Value::as_str)
            .context("`text` is not text")?;
        return parse_hh(t).map(Record::Dialogue).context(
            "`text` is not an HH transcript (plain text is pretraining data: `llama2 prepare-data`)",
        );
    }
    let keys: Vec<&str> = v
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    bail!(
        "no known shape (fields: {}): expected `messages`, `prompt` (+ `completion`), `chosen` + `rejected` (+ `prompt`), or an HH transcript in `text`",
        if keys.is_empty() {
            "none".to_string()
        } else {
            keys.join(", ")
        }
    )
}

// ---------------------------------------------------------------------------------------------
// Lines

/// Reads every line of `files` through `parse`, each result with its `file:line`. A bad line
/// (not UTF-8, not JSON, or refused by `parse`) is an error naming it; with `skip` set to
/// `Some(true)` it is a warning and counted instead. `None`: the command has no `--skip-bad`.
fn read_lines<T>(
    files: &[PathBuf],
    skip: Option<bool>,
    mut parse: impl FnMut(&Value) -> Result<T>,
) -> Result<(Vec<(String, T)>, usize)> {
    crate::run_dir::read_jsonl(files, skip, |v, origin| {
        Ok((origin.to_string(), parse(&v)?))
    })
}

fn names(files: &[PathBuf]) -> String {
    files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------------
// Dialogues (SFT)

/// One line as a dialogue to learn from: a pair gives its prompt and chosen answer.
pub fn parse_dialogue(v: &Value) -> Result<Dialogue> {
    let m = match parse_record(v)? {
        Record::Dialogue(m) => m,
        Record::Pair {
            mut prompt, chosen, ..
        } => {
            prompt.push(Message::new("assistant", &chosen));
            prompt
        }
    };
    // The chat template's role order, checked here where the line is known.
    check_roles(&m)?;
    ensure!(
        m.iter().any(|x| x.role == "assistant"),
        "no assistant turn to learn from"
    );
    let last_turn_only = match field(v, "learn") {
        None => false,
        Some(l) => match l.as_str() {
            Some("all") => false,
            Some("last") => true,
            _ => bail!("`learn` is {l}: expected \"all\" or \"last\""),
        },
    };
    Ok(Dialogue {
        messages: m,
        last_turn_only,
    })
}

/// Dialogues from JSONL files, and how many bad lines `skip_bad` skipped.
pub fn read_dialogues(files: &[PathBuf], skip_bad: bool) -> Result<(Vec<Dialogue>, usize)> {
    let (rows, skipped) = read_lines(files, Some(skip_bad), parse_dialogue)?;
    ensure!(!rows.is_empty(), "no dialogues in {}", names(files));
    Ok((rows.into_iter().map(|(_, d)| d).collect(), skipped))
}

// ---------------------------------------------------------------------------------------------
// Preference pairs (reward models)

/// The prompt must be something a response answers: optional system, then user/assistant
/// alternating, ending with a user turn.
pub fn check_prompt(msgs: &[Message]) -> Result<()> {
    ensure!(!msgs.is_empty(), "the prompt is empty");
    check_roles(msgs).context("the prompt")?;
    ensure!(
        msgs.last().is_some_and(|m| m.role == "user"),
        "the prompt must end with a user turn (the responses answer it)"
    );
    Ok(())
}

fn bool_field(v: &Value, key: &str) -> Result<Option<bool>> {
    field(v, key)
        .map(|x| {
            x.as_bool()
                .ok_or_else(|| anyhow!("`{key}` is not true/false"))
        })
        .transpose()
}

/// `category` (helpfulness or safety) and `is_safety`, which must agree when both are given.
fn category(v: &Value) -> Result<Option<RmKind>> {
    let cat = match field(v, "category") {
        None => None,
        Some(x) => Some(
            x.as_str()
                .and_then(|s| s.parse::<RmKind>().ok())
                .ok_or_else(|| {
                    anyhow!("`category` must be \"helpfulness\" or \"safety\", got {x}")
                })?,
        ),
    };
    let flag = bool_field(v, "is_safety")?.map(|s| {
        if s {
            RmKind::Safety
        } else {
            RmKind::Helpfulness
        }
    });
    match (cat, flag) {
        (Some(c), Some(f)) if c != f => {
            bail!("`category` \"{}\" and `is_safety` disagree", c.name())
        }
        (c, f) => Ok(c.or(f)),
    }
}

/// One line as a preference pair (without its origin).
pub fn parse_pair(v: &Value) -> Result<Pair> {
    let (prompt, chosen, rejected) = match parse_record(v)? {
        Record::Pair {
            prompt,
            chosen,
            rejected,
        } => (prompt, chosen, rejected),
        Record::Dialogue(_) => {
            bail!("a dialogue, not a preference pair: `chosen` and `rejected` answers are needed")
        }
    };
    check_prompt(&prompt)?;
    ensure!(
        chosen.trim() != rejected.trim(),
        "`chosen` and `rejected` are the same answer: the pair ranks nothing"
    );
    let rating = match field(v, "rating") {
        None => None,
        Some(x) => Some(
            x.as_str()
                .ok_or_else(|| anyhow!("`rating` is not text"))?
                .parse()?,
        ),
    };
    Ok(Pair {
        prompt,
        chosen,
        rejected,
        rating,
        chosen_safe: bool_field(v, "chosen_safe")?,
        rejected_safe: bool_field(v, "rejected_safe")?,
        category: category(v)?,
        origin: String::new(),
    })
}

/// Preference pairs from JSONL files (each with its `file:line` origin), and how many bad lines
/// `skip_bad` skipped.
pub fn read_pairs(files: &[PathBuf], skip_bad: bool) -> Result<(Vec<Pair>, usize)> {
    let (rows, skipped) = read_lines(files, Some(skip_bad), parse_pair)?;
    let pairs = rows
        .into_iter()
        .map(|(origin, mut p)| {
            p.origin = origin;
            p
        })
        .collect();
    Ok((pairs, skipped))
}

// ---------------------------------------------------------------------------------------------
// Prompts (rejection sampling, PPO) and scored rows

/// One prompt for the stages that sample from the policy (rejection sampling, PPO): the dialogue
/// so far, ending with a user turn, and whether it is a safety prompt (the piecewise reward
/// needs it).
#[derive(Clone, Debug, PartialEq)]
pub struct Prompt {
    pub messages: Vec<Message>,
    pub safety: bool,
}

/// One line as a prompt: a dialogue's trailing answer and a pair's answers are dropped.
pub fn parse_prompt(v: &Value) -> Result<Prompt> {
    let mut m = match parse_record(v)? {
        Record::Dialogue(m) => m,
        Record::Pair { prompt, .. } => prompt,
    };
    if m.last().is_some_and(|x| x.role == "assistant") {
        m.pop();
    }
    check_roles(&m)?;
    ensure!(
        m.last().is_some_and(|x| x.role == "user"),
        "the prompt must end with a user turn"
    );
    Ok(Prompt {
        messages: m,
        safety: category(v)? == Some(RmKind::Safety),
    })
}

/// Prompts from JSONL files (`skip_bad: None` where the command has no `--skip-bad`), and how
/// many bad lines were skipped.
pub fn read_prompts(files: &[PathBuf], skip_bad: Option<bool>) -> Result<(Vec<Prompt>, usize)> {
    let (rows, skipped) = read_lines(files, skip_bad, parse_prompt)?;
    Ok((rows.into_iter().map(|(_, p)| p).collect(), skipped))
}

/// One line as a (prompt, response) row to score: a dialogue ending with the response.
pub fn parse_scored(v: &Value) -> Result<(Vec<Message>, String)> {
    let mut m = match parse_record(v)? {
        Record::Dialogue(m) => m,
        Record::Pair { .. } => {
            bail!("a preference pair: a row to score holds one response (`prompt` + `completion`)")
        }
    };
    let last = m.pop().filter(|x| x.role == "assistant");
    let last =
        last.ok_or_else(|| anyhow!("the dialogue must end with the assistant response to score"))?;
    check_prompt(&m)?;
    Ok((m, last.content))
}

/// (prompt, response) rows from JSONL files; a bad line is an error naming `file:line`.
pub fn read_scored(files: &[PathBuf]) -> Result<Vec<(Vec<Message>, String)>> {
    Ok(read_lines(files, None, parse_scored)?
        .0
        .into_iter()
        .map(|(_, r)| r)
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Writing TRL's conversational form

/// The record kinds `llama2 convert` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Dialogues,
    Pairs,
    Prompts,
}

impl std::str::FromStr for Kind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "dialogues" | "sft" => Kind::Dialogues,
            "pairs" | "preference" => Kind::Pairs,
            "prompts" => Kind::Prompts,
            o => bail!("unknown kind `{o}` (expected dialogues, pairs or prompts)"),
        })
    }
}

/// Reads `files` as `kind` (any shape above) and writes them to `out` in TRL's conversational
/// form: dialogues as `{"messages"}`, pairs as `{"prompt": [...], "chosen": [assistant],
/// "rejected": [assistant]}` with their metadata, prompts as `{"prompt": [...]}` (plus
/// `is_safety: true` where tagged). Returns the records written and the lines skipped.
pub fn convert(
    kind: Kind,
    files: &[PathBuf],
    out: &Path,
    skip_bad: bool,
) -> Result<(usize, usize)> {
    let assistant = |t: &str| serde_json::json!([{"role": "assistant", "content": t}]);
    let (rows, skipped): (Vec<Value>, usize) = match kind {
        Kind::Dialogues => {
            let (d, s) = read_dialogues(files, skip_bad)?;
            let rows = d
                .into_iter()
                .map(|d| {
                    let mut v = serde_json::json!({"messages": d.messages});
                    if d.last_turn_only {
                        v["learn"] = "last".into();
                    }
                    v
                })
                .collect();
            (rows, s)
        }
        Kind::Pairs => {
            let (p, s) = read_pairs(files, skip_bad)?;
            let rows = p
                .into_iter()
                .map(|p| {
                    let mut v = serde_json::json!({"prompt": p.prompt,
                        "chosen": assistant(&p.chosen), "rejected": assistant(&p.rejected)});
                    if let Some(r) = p.rating {
                        v["rating"] = r.label().into();
                    }
                    if let Some(s) = p.chosen_safe {
                        v["chosen_safe"] = s.into();
                    }
                    if let Some(s) = p.rejected_safe {
                        v["rejected_safe"] = s.into();
                    }
                    if let Some(c) = p.category {
                        v["is_safety"] = (c == RmKind::Safety).into();
                    }
                    v
                })
                .collect();
            (rows, s)
        }
        Kind::Prompts => {
            let (p, s) = read_prompts(files, Some(skip_bad))?;
            let rows = p
                .into_iter()
                .map(|p| {
                    let mut v = serde_json::json!({"prompt": p.messages});
                    if p.safety {
                        v["is_safety"] = true.into();
                    }
                    v
                })
                .collect();
            (rows, s)
        }
    };
    let mut text = String::new();
    for r in &rows {
        text += &r.to_string();
        text.push('\n');
    }
    if let Some(p) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
    }
    crate::run_dir::write_atomic(out, text.as_bytes())?;
    Ok((rows.len(), skipped))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msgs(pairs: &[(&str, &str)]) -> Vec<Message> {
        pairs.iter().map(|(r, c)| Message::new(r, c)).collect()
    }
    fn err(r: Result<impl std::fmt::Debug>) -> String {
        format!("{:#}", r.unwrap_err())
    }
    const HH: &str = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me\n\nAssistant: ";

    #[test]
    fn every_dialogue_shape_reads() {
        let want = msgs(&[("user", "q"), ("assistant", "a")]);
        let conv = json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]);
        let shapes = [
            json!({"messages": conv}),
            json!({"prompt": "q", "response": "a"}),
            json!({"prompt": "q", "completion": "a"}),
            json!({"prompt": [{"role": "user", "content": "q"}],
                   "completion": [{"role": "assistant", "content": "a"}]}),
            json!({"chosen": "\n\nHuman: q\n\nAssistant: a"}),
            json!({"text": "\n\nHuman: q\n\nAssistant: a"}),
            json!({"chosen": conv}),
            // A pair teaches its chosen answer, in every pair shape.
            json!({"prompt": "q", "chosen": "a", "rejected": "b"}),
            json!({"prompt": [{"role": "user", "content": "q"}],
                   "chosen": [{"role": "assistant", "content": "a"}],
                   "rejected": [{"role": "assistant", "content": "b"}]}),
            json!({"chosen": conv, "rejected": [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": "b"}]}),
            json!({"messages": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}),
            json!({"prompt": "q", "completion": "a", "id": 7, "rejected": null}),
        ];
        for v in shapes {
            let d = parse_dialogue(&v).unwrap_or_else(|e| panic!("{v}: {e:#}"));
            assert_eq!(d.messages, want, "{v}");
            assert!(!d.last_turn_only);
        }
        let v = json!({"prompt": "q", "response": "a", "learn": "last"});
        assert!(parse_dialogue(&v).unwrap().last_turn_only);
    }

    #[test]
    fn bad_dialogues_say_why() {
        let bad = [
            (
                json!({"messages": [{"role": "robot", "content": "u"}]}),
                "robot",
            ),
            (
                json!({"messages": [{"role": "user", "content": "u"}], "prompt": "p"}),
                "both `messages` and `prompt`",
            ),
            (
                json!({"prompt": "p", "completion": "a", "response": "b"}),
                "both `completion` and `response`",
            ),
            (json!({"completion": "a"}), "without a `prompt`"),
            (json!({"prompt": "p"}), "no assistant turn"),
            (
                json!({"prompt": 3, "response": "b"}),
                "`prompt` must be text",
            ),
            (json!({"text": "Just some prose."}), "prepare-data"),
            (json!({"foo": 1, "bar": 2}), "fields: bar, foo"),
            (json!([1, 2]), "JSON object"),
            (
                json!({"prompt": "p", "completion": "a", "label": true}),
                "KTO",
            ),
            (
                json!({"prompt": "p", "response": "a", "learn": "x"}),
                "learn",
            ),
            (
                json!({"messages": [{"role": "assistant", "content": "a"}]}),
                "expected role `user`",
            ),
            (
                json!({"messages": [{"role": "user", "content": 1}]}),
                "`messages[0]` has no text `content`",
            ),
            (json!({"rejected": "r"}), "missing `chosen`"),
        ];
        for (v, want) in bad {
            let e = err(parse_dialogue(&v));
            assert!(e.contains(want), "{v}: {e}");
        }
    }

    #[test]
    fn every_pair_shape_reads() {
        let p1 = msgs(&[("user", "q")]);
        let conv = |a: &str| json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": a}]);
        let shapes = [
            json!({"prompt": "q", "chosen": "a", "rejected": "b"}),
            json!({"prompt": [{"role": "user", "content": "q"}],
                   "chosen": [{"role": "assistant", "content": "a"}],
                   "rejected": [{"role": "assistant", "content": "b"}]}),
            json!({"chosen": conv("a"), "rejected": conv("b")}),
            json!({"messages": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}),
            json!({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}),
        ];
        for v in shapes {
            let p = parse_pair(&v).unwrap_or_else(|e| panic!("{v}: {e:#}"));
            assert_eq!(
                (p.prompt.clone(), p.chosen.as_str(), p.rejected.as_str()),
                (p1.clone(), "a", "b"),
                "{v}"
            );
            assert_eq!((p.rating, p.category, p.chosen_safe), (None, None, None));
        }
        let p = parse_pair(&json!({"chosen": format!("{HH}sure"), "rejected": format!("{HH}no")}))
            .unwrap();
        assert_eq!(p.prompt.len(), 3);
        assert_eq!(p.prompt[2], Message::new("user", "help me"));
        // The paper's metadata.
        let p = parse_pair(&json!({"prompt": "q", "chosen": "a", "rejected": "b",
            "rating": "significantly better", "chosen_safe": true, "rejected_safe": false,
            "is_safety": true}))
        .unwrap();
        assert_eq!(p.rating, Some(crate::rm::Rating::Significantly));
        assert_eq!((p.chosen_safe, p.rejected_safe), (Some(true), Some(false)));
        assert_eq!(p.category, Some(RmKind::Safety));
        let p = parse_pair(
            &json!({"prompt": "q", "chosen": "a", "rejected": "b", "is_safety": false,
            "category": "helpfulness"}),
        )
        .unwrap();
        assert_eq!(p.category, Some(RmKind::Helpfulness));
    }

    #[test]
    fn bad_pairs_say_why() {
        let conv = |q: &str, a: &str| json!([{"role": "user", "content": q}, {"role": "assistant", "content": a}]);
        let bad = [
            (
                json!({"chosen": format!("{HH}a"), "rejected": "\n\nHuman: other\n\nAssistant: b"}),
                "differ before",
            ),
            (
                json!({"chosen": conv("q", "a"), "rejected": conv("other", "b")}),
                "differ before",
            ),
            (
                json!({"chosen": conv("q", "a"), "rejected": "\n\nHuman: q\n\nAssistant: b"}),
                "both be transcripts or both message lists",
            ),
            (json!({"chosen": "a", "rejected": "b"}), "HH transcript"),
            (json!({"prompt": "q", "chosen": "a"}), "missing `rejected`"),
            (
                json!({"prompt": "q", "messages": [], "chosen": "a", "rejected": "b"}),
                "which is the prompt",
            ),
            (
                json!({"prompt": "q", "chosen": conv("q", "a"), "rejected": "b"}),
                "one assistant message",
            ),
            (
                json!({"prompt": "q", "chosen": "a", "rejected": "a "}),
                "same answer",
            ),
            (
                json!({"prompt": "q", "chosen": "a", "rejected": "b", "rating": "great"}),
                "unknown rating",
            ),
            (
                json!({"prompt": "q", "chosen": "a", "rejected": "b", "rating": 3}),
                "`rating` is not text",
            ),
            (
                json!({"prompt": "q", "chosen": "a", "rejected": "b", "category": "fun"}),
                "category",
            ),
            (
                json!({"prompt": "q", "chosen": "a", "rejected": "b", "is_safety": "yes"}),
                "`is_safety` is not true/false",
            ),
            (
                json!({"prompt": "q", "chosen": "a", "rejected": "b", "is_safety": true, "category": "helpfulness"}),
                "disagree",
            ),
            (
                json!({"prompt": "q", "chosen": "a", "rejected": "b", "chosen_safe": 1}),
                "chosen_safe",
            ),
            (
                json!({"messages": conv("u", "a"), "chosen": "x", "rejected": "y"}),
                "end with a user turn",
            ),
            (
                json!({"prompt": "q", "completion": "a"}),
                "not a preference pair",
            ),
            (
                json!({"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "user", "content": "q"}]}),
                "must end with an assistant turn",
            ),
        ];
        for (v, want) in bad {
            let e = err(parse_pair(&v));
            assert!(e.contains(want), "{v}: {e}");
        }
    }

    #[test]
    fn every_prompt_shape_reads() {
        let q = msgs(&[("user", "q")]);
        let shapes = [
            json!({"prompt": "q"}),
            json!({"prompt": [{"role": "user", "content": "q"}]}),
            json!({"messages": [{"role": "user", "content": "q"}]}),
            json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
            json!({"prompt": "q", "completion": "a"}),
            json!({"prompt": "q", "response": "a"}),
            json!({"prompt": "q", "chosen": "a", "rejected": "b"}),
            json!({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}),
            json!({"text": "\n\nHuman: q\n\nAssistant: a"}),
        ];
        for v in shapes {
            let p = parse_prompt(&v).unwrap_or_else(|e| panic!("{v}: {e:#}"));
            assert_eq!((p.messages.clone(), p.safety), (q.clone(), false), "{v}");
        }
        assert!(
            parse_prompt(&json!({"prompt": "q", "category": "safety"}))
                .unwrap()
                .safety
        );
        assert!(
            parse_prompt(&json!({"prompt": "q", "is_safety": true}))
                .unwrap()
                .safety
        );
        let sys = parse_prompt(&json!({"prompt": [{"role": "system", "content": "s"},
            {"role": "user", "content": "q"}]}))
        .unwrap();
        assert_eq!(sys.messages.len(), 2);
        for (v, want) in [
            (
                json!({"messages": [{"role": "assistant", "content": "x"}]}),
                "end with a user turn",
            ),
            (
                json!({"prompt": [{"role": "system", "content": "s"}]}),
                "followed by a user",
            ),
            (json!({"prompt": "q", "is_safety": 1}), "is_safety"),
        ] {
            let e = err(parse_prompt(&v));
            assert!(e.contains(want), "{v}: {e}");
        }
    }

    #[test]
    fn readers_name_file_and_line_and_skip_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("d.jsonl");
        // A BOM, a good line, a blank line, bad JSON, a bad shape, invalid UTF-8, a good line.
        let mut bytes = b"\xEF\xBB\xBF{\"prompt\": \"q\", \"completion\": \"a\"}\n\n{oops\n{\"completion\": \"a\"}\n".to_vec();
        bytes.extend_from_slice(b"{\"prompt\": \"\xFF\", \"completion\": \"a\"}\n{\"prompt\": \"q\", \"chosen\": \"a\", \"rejected\": \"b\"}\n");
        std::fs::write(&f, &bytes).unwrap();
        let files = [f.clone()];
        let e = err(read_dialogues(&files, false));
        assert!(
            e.contains("d.jsonl:3: invalid JSON") && e.contains("--skip-bad"),
            "{e}"
        );
        let (d, skipped) = read_dialogues(&files, true).unwrap();
        assert_eq!((d.len(), skipped), (2, 3));
        let (p, skipped) = read_prompts(&files, Some(true)).unwrap();
        assert_eq!((p.len(), skipped), (2, 3));
        let e = err(read_prompts(&files, None));
        assert!(e.contains("d.jsonl:3") && !e.contains("--skip-bad"), "{e}");
        let (pairs, skipped) = read_pairs(&files, true).unwrap();
        assert_eq!((pairs.len(), skipped), (1, 4));
        assert!(
            pairs[0].origin.ends_with("d.jsonl:6"),
            "{}",
            pairs[0].origin
        );
        let e = err(read_pairs(&files, false));
        assert!(
            e.contains("d.jsonl:1") && e.contains("not a preference pair"),
            "{e}"
        );
        std::fs::write(
            &f,
            "{\"prompt\": \"q\", \"completion\": \"a\"}\n{\"prompt\": \"q\"}\n",
        )
        .unwrap();
        let e = err(read_scored(&files));
        assert!(
            e.contains("d.jsonl:2") && e.contains("assistant response"),
            "{e}"
        );
        std::fs::write(&f, "\n").unwrap();
        assert!(err(read_dialogues(&files, false)).contains("no dialogues"));
    }

    #[test]
    fn converted_files_read_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("in.jsonl");
        std::fs::write(
            &src,
            format!(
                "{}\n{}\n",
                json!({"chosen": format!("{HH}sure"), "rejected": format!("{HH}no")}),
                json!({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
                    "chosen": "a", "rejected": "b", "rating": "better", "chosen_safe": true,
                    "rejected_safe": false, "category": "safety"})
            ),
        )
        .unwrap();
        let out = dir.path().join("trl.jsonl");
        for kind in [Kind::Pairs, Kind::Dialogues, Kind::Prompts] {
            assert_eq!(convert(kind, &[src.clone()], &out, false).unwrap(), (2, 0));
            let (a, b) = (vec![src.clone()], vec![out.clone()]);
            match kind {
                Kind::Pairs => {
                    let strip = |v: Vec<Pair>| -> Vec<Pair> {
                        v.into_iter()
                            .map(|p| Pair {
                                origin: String::new(),
                                ..p
                            })
                            .collect()
                    };
                    assert_eq!(
                        strip(read_pairs(&a, false).unwrap().0),
                        strip(read_pairs(&b, false).unwrap().0)
                    );
                    let line: Value = serde_json::from_str(
                        std::fs::read_to_string(&out)
                            .unwrap()
                            .lines()
                            .next()
                            .unwrap(),
                    )
                    .unwrap();
                    assert_eq!(
                        line["chosen"],
                        json!([{"role": "assistant", "content": "sure"}])
                    );
                    assert_eq!(
                        line["prompt"][2],
                        json!({"role": "user", "content": "help me"})
                    );
                }
                Kind::Dialogues => assert_eq!(
                    read_dialogues(&a, false).unwrap().0,
                    read_dialogues(&b, false).unwrap().0
                ),
                Kind::Prompts => assert_eq!(
                    read_prompts(&a, None).unwrap().0,
                    read_prompts(&b, None).unwrap().0
                ),
            }
        }
    }
}
