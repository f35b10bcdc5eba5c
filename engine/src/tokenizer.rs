//! The tokenizer: the `tokenizers` crate over a `tokenizer.json`, BOS/EOS handling, and Llama 2's
//! chat template built from token ids (BOS/EOS are ids, never text to tokenize).

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub path: PathBuf,
    pub bos: u32,
    pub eos: u32,
}

/// A chat message, as in the `{"role", "content"}` JSONL used by SFT data.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

const B_INST: &str = "[INST]";
const E_INST: &str = "[/INST]";
const B_SYS: &str = "<<SYS>>\n";
const E_SYS: &str = "\n<</SYS>>\n\n";

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let err = |msg: String| Error::Tokenizer {
            path: path.to_path_buf(),
            msg,
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            err(if path.exists() {
                format!("cannot load: {e}")
            } else {
                "no such file".into()
            })
        })?;
        // The tokenizers crate panics on some malformed JSON (an `expect` in its decoder's
        // deserializer): the file is checked as JSON first, and a panic that gets through
        // anyway is an error about this file, not a crash.
        serde_json::from_str::<serde::de::IgnoredAny>(&text)
            .map_err(|e| err(format!("cannot load: not JSON: {e}")))?;
        let inner = std::panic::catch_unwind(|| text.parse::<tokenizers::Tokenizer>())
            .map_err(|_| {
                err("cannot load: not a tokenizer.json the tokenizers crate reads".into())
            })?
            .map_err(|e| err(format!("cannot load: {e}")))?;
        let id = |t: &str, default: u32| inner.token_to_id(t).unwrap_or(default);
        let (bos, eos) = (id("<s>", 1), id("</s>", 2));
        let n = inner.get_vocab_size(true);
        if bos as usize >= n || eos as usize >= n {
            return Err(Error::Tokenizer {
                path: path.to_path_buf(),
                msg: format!(
                    "no <s>/</s> tokens, and the default ids 1/2 are outside its {n} tokens"
                ),
            });
        }
        Ok(Tokenizer {
            inner,
            path: path.to_path_buf(),
            bos,
            eos,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        Error::Tokenizer {
            path: self.path.clone(),
            msg: e.to_string(),
        }
    }

    /// Ids of `text` with no special tokens; `bos` prepends BOS.
    pub fn encode(&self, text: &str, bos: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| self.err(e))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if bos {
            ids.push(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// The id of a token given as its string (e.g. `</s>` or `▁the`), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id (e.g. `<unk>` for 0 in Llama 2's layout).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| self.err(e))
    }

    /// Llama 2's chat format, as Meta's reference code builds it: the system prompt is folded
    /// into the first user turn; every completed (user, assistant) pair is
    /// `<s>[INST] {user} [/INST] {assistant} </s>`; a final user turn is `<s>[INST] {user} [/INST]`.
    /// Returns the ids and a mask that is true on assistant tokens (and their EOS), which is what
    /// SFT learns.
    pub fn chat(&self, messages: &[Message]) -> Result<(Vec<u32>, Vec<bool>)> {
        check_roles(messages)?;
        let mut msgs: Vec<Message> = messages.to_vec();
        if msgs.first().is_some_and(|m| m.role == "system") {
            let sys = msgs.remove(0);
            let first = msgs
                .first_mut()
                .filter(|m| m.role == "user")
                .ok_or_else(|| {
                    Error::Input("a system message must be followed by a user message".into())
                })?;
            first.content = format!("{B_SYS}{}{E_SYS}{}", strip(&sys.content), first.content);
        }
        let mut ids = Vec::new();
        let mut mask = Vec::new();
        let mut i = 0;
        while i < msgs.len() {
            let u = &msgs[i];
            if u.role != "user" {
                return Err(Error::Input(format!(
                    "message {i}: expected role `user`, got `{}` (roles must alternate user/assistant after an optional system)",
                    u.role
                )));
            }
            let prompt = self.encode(&format!("{B_INST} {} {E_INST}", strip(&u.content)), true)?;
            match msgs.get(i + 1) {
                None => {
                    mask.extend(std::iter::repeat_n(false, prompt.len()));
                    ids.extend(prompt);
                }
                Some(a) if a.role == "assistant" => {
                    // Meta encodes "[INST] u [/INST] a " as one string; the answer's tokens are
                    // what follows the longest prefix shared with the prompt's encoding.
                    let text = format!(
                        "{B_INST} {} {E_INST} {} ",
                        strip(&u.content),
                        strip(&a.content)
                    );
                    let mut full = self.encode(&text, true)?;
                    full.push(self.eos);
                    let shared = full.iter().zip(&prompt).take_while(|(x, y)| x == y).count();
                    mask.extend((0..full.len()).map(|j| j >= shared));
                    ids.extend(full);
                }
                Some(a) => {
                    return Err(Error::Input(format!(
                        "message {}: expected role `assistant`, got `{}`",
                        i + 1,
                        a.role
                    )))
                }
            }
            i += 2;
        }
        Ok((ids, mask))
    }
}

/// Whitespace as Python's `str.strip()` (and so Jinja's `trim` filter in transformers) sees it:
/// Unicode whitespace plus the ASCII separators U+001C..U+001F, which Rust's `trim` keeps. The
/// chat template must cut exactly what [`chat_template`] cuts.
fn strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// Llama 2's chat format as a Jinja template for `tokenizer_config.json`, built from the same
/// pieces as [`Tokenizer::chat`]: transformers' `apply_chat_template` renders text whose ids
/// (`<s>`/`</s>` as special tokens, nothing added) are `chat`'s, and rejects the role orders
/// `chat` rejects. One line, with whitespace control on every tag, so no layout option of the
/// Jinja environment (`trim_blocks`, `lstrip_blocks`) changes the output.
pub fn chat_template() -> String {
    // Jinja string literals: the newlines of the system block as `\n` escapes.
    let lit = |s: &str| {
        format!(
            "'{}'",
            s.replace('\\', "\\\\")
                .replace('\'', "\\'")
                .replace('\n', "\\n")
        )
    };
    let roles = "roles must alternate user/assistant after an optional system";
    [
        "{%- set system = (messages[0]['content'] | trim) if (messages and messages[0]['role'] == 'system') else none -%}".to_string(),
        "{%- set loop_messages = messages[1:] if system is not none else messages -%}".to_string(),
        "{%- if system is not none and not loop_messages -%}{{ raise_exception('a system message must be followed by a user message') }}{%- endif -%}".to_string(),
        "{%- for message in loop_messages -%}".to_string(),
        "{%- set expected = 'user' if loop.index0 % 2 == 0 else 'assistant' -%}".to_string(),
        format!(
            "{{%- if message['role'] != expected -%}}{{{{ raise_exception('message ' ~ (loop.index0 + (1 if system is not none else 0)) ~ ': expected role `' ~ expected ~ '`, got `' ~ message['role'] ~ '` ({roles})') }}}}{{%- endif -%}}"
        ),
        "{%- if message['role'] == 'user' -%}".to_string(),
        format!(
            "{{%- set content = ({} ~ system ~ {} ~ message['content']) if (loop.first and system is not none) else message['content'] -%}}",
            lit(B_SYS),
            lit(E_SYS)
        ),
        format!("{{{{- bos_token ~ {} ~ (content | trim) ~ {} -}}}}", lit(&format!("{B_INST} ")), lit(&format!(" {E_INST}"))),
        "{%- else -%}".to_string(),
        "{{- ' ' ~ (message['content'] | trim) ~ ' ' ~ eos_token -}}".to_string(),
        "{%- endif -%}".to_string(),
        "{%- endfor -%}".to_string(),
    ]
    .concat()
}

/// The order of roles [`Tokenizer::chat`] renders: an optional system message, then user and
/// assistant alternating, starting with a user. Readers of dialogue files call it to reject a
/// bad row at its line, before tokenizing.
pub fn check_roles(messages: &[Message]) -> Result<()> {
    let start = usize::from(messages.first().is_some_and(|m| m.role == "system"));
    if start == 1 && messages.len() == 1 {
        return Err(Error::Input(
            "a system message must be followed by a user message".into(),
        ));
    }
    for (i, m) in messages.iter().enumerate().skip(start) {
        let want = if (i - start) % 2 == 0 {
            "user"
        } else {
            "assistant"
        };
        if m.role != want {
            return Err(Error::Input(format!(
                "message {i}: expected role `{want}`, got `{}` (roles must alternate user/assistant after an optional system)",
                m.role
            )));
        }
    }
    Ok(())
}
