//! Prompts for the stages that sample from the policy (rejection sampling, PPO): the dialogue so
//! far, ending with a user turn, and whether it is a safety prompt (the piecewise reward needs
//! it). Read from any dialogue JSONL: a trailing assistant turn is dropped, so SFT rows,
//! preference transcripts and world rows all serve.

use anyhow::{ensure, Result};
use engine::tokenizer::Message;
use std::path::PathBuf;

/// One prompt: the dialogue so far (ending with a user turn) and whether it is a safety prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct Prompt {
    pub messages: Vec<Message>,
    pub safety: bool,
}

/// Reads prompt JSONL: `{"messages": [...], "category"?}` (a trailing assistant turn is dropped,
/// so SFT rows work too), `{"prompt": "..."}`, or an HH transcript; `"category": "safety"` tags a
/// safety prompt. Errors name `file:line`.
pub fn read_prompts(files: &[PathBuf]) -> Result<Vec<Prompt>> {
    let parse = |v: serde_json::Value, _: &str| -> Result<Prompt> {
        let mut msgs = match (v.get("prompt").and_then(|p| p.as_str()), v.get("response")) {
            (Some(p), None) if v.get("messages").is_none() => vec![Message::new("user", p)],
            _ => crate::sft::row_messages(&v)?,
        };
        if msgs.last().is_some_and(|m| m.role == "assistant") {
            msgs.pop();
        }
        engine::tokenizer::check_roles(&msgs)?;
        ensure!(
            msgs.last().is_some_and(|m| m.role == "user"),
            "the prompt must end with a user turn"
        );
        let safety = v.get("category").and_then(|c| c.as_str()) == Some("safety");
        Ok(Prompt {
            messages: msgs,
            safety,
        })
    };
    Ok(crate::run_dir::read_jsonl(files, false, parse)?.0)
}
