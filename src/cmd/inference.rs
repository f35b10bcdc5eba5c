//! Inference: `generate`, `chat`, `score`.

use super::common::{check_model_dir, check_vocab, load_for_generation, load_tokenizer, on_device};
use anyhow::{bail, Result};
use engine::tokenizer::Tokenizer;
use std::path::PathBuf;
use trainer::device::Device;

#[derive(clap::Args)]
struct SamplingArgs {
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplingArgs {
    fn params(&self, eos: u32) -> engine::generate::SamplingParams {
        engine::generate::SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            max_new_tokens: self.max_new_tokens,
            seed: self.seed,
            stop: vec![eos],
        }
    }
}

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// An HF checkpoint directory (with tokenizer.json, or pass --tokenizer).
    #[arg(long)]
    model: PathBuf,
    /// The prompt: text, or with --ids token ids (`1,450,4996` or a JSON array).
    #[arg(long)]
    prompt: String,
    /// Read --prompt as token ids, used as given (no BOS added), without the tokenizer.
    #[arg(long, conflicts_with_all = ["chat", "no_bos"])]
    ids: bool,
    /// Print the generated token ids as a JSON array instead of the text (with --ids, no
    /// tokenizer is needed).
    #[arg(long)]
    print_ids: bool,
    /// Do not start a text prompt with BOS.
    #[arg(long, conflicts_with = "chat")]
    no_bos: bool,
    /// Also stop at these tokens (ids, or token strings such as `<0x0A>`; comma-separated or
    /// repeated). EOS always stops.
    #[arg(long, value_delimiter = ',')]
    stop: Vec<String>,
    /// Wrap the prompt in the Llama 2 chat template.
    #[arg(long)]
    chat: bool,
    /// System prompt (with --chat).
    #[arg(long)]
    system: Option<String>,
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: Device,
}

#[derive(clap::Args)]
pub struct ChatArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    system: Option<String>,
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: Device,
}

/// Streams decoded text: prints what decoding the tokens so far adds (byte-fallback pieces only
/// become text once complete). Seeded with the prompt, so the first token's leading space (a
/// SentencePiece `▁`) is printed after the prompt instead of being stripped as a text start.
struct Streamer {
    ids: Vec<u32>,
    printed: usize,
}

impl Streamer {
    /// A streamer after `prompt`, whose text it prints.
    fn after(tok: &Tokenizer, prompt: &[u32]) -> Result<Self> {
        use std::io::Write;
        let text = tok.decode(prompt)?;
        print!("{text}");
        let _ = std::io::stdout().flush();
        Ok(Streamer {
            ids: prompt.to_vec(),
            printed: text.len(),
        })
    }

    /// Prints what is still held back (an incomplete byte sequence at the very end), so the
    /// output is always the decoding of every token.
    fn finish(&mut self, tok: &Tokenizer) {
        if let Ok(text) = tok.decode(&self.ids) {
            if text.len() > self.printed && text.is_char_boundary(self.printed) {
                print!("{}", &text[self.printed..]);
            }
        }
        println!();
    }

    fn push(&mut self, tok: &Tokenizer, id: u32) {
        use std::io::Write;
        self.ids.push(id);
        if let Ok(text) = tok.decode(&self.ids) {
            if text.len() > self.printed
                && text.is_char_boundary(self.printed)
                && !text.ends_with('\u{fffd}')
            {
                print!("{}", &text[self.printed..]);
                let _ = std::io::stdout().flush();
                self.printed = text.len();
            }
        }
    }
}

/// Token ids as `1,450,4996`, `1 450 4996` or a JSON array.
fn parse_ids(s: &str) -> Result<Vec<u32>> {
    let inner = s.trim().trim_start_matches('[').trim_end_matches(']');
    inner
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|x| !x.is_empty())
        .map(|x| {
            x.parse::<u32>()
                .map_err(|_| anyhow::anyhow!("--prompt with --ids: `{x}` is not a token id"))
        })
        .collect()
}

pub fn generate_cmd(a: GenerateArgs) -> Result<()> {
    on_device!(a.device, |be| generate_on(be, a))
}

fn generate_on<B: engine::Backend>(be: B, a: GenerateArgs) -> Result<()> {
    use engine::tokenizer::Message;
    check_model_dir(&a.model)?;
    // Ids in and ids out need no tokenizer (a model trained on token files may have none).
    let numeric_stops = a.stop.iter().all(|s| s.parse::<u32>().is_ok());
    let tok = if a.ids && a.print_ids && numeric_stops && a.tokenizer.is_none() {
        let p = a.model.join("tokenizer.json");
        p.exists().then(|| Tokenizer::from_file(&p)).transpose()?
    } else {
        Some(load_tokenizer(&a.model, a.tokenizer.as_deref())?)
    };
    let mut model = engine::checkpoint::load_model(be, &a.model, engine::Head::Lm)?;
    if let Some(t) = &tok {
        check_vocab(&model, t)?;
    }
    let vocab = model.cfg.vocab_size;
    let prompt = if a.ids {
        parse_ids(&a.prompt)?
    } else {
        let tok = tok.as_ref().expect("text needs the tokenizer");
        if a.chat {
            let mut msgs = Vec::new();
            if let Some(s) = &a.system {
                msgs.push(Message::new("system", s));
            }
            msgs.push(Message::new("user", &a.prompt));
            tok.chat(&msgs)?.0
        } else {
            tok.encode(&a.prompt, !a.no_bos)?
        }
    };
    if prompt.is_empty() {
        bail!("the prompt has no tokens (with --no-bos an empty text has none)");
    }
    if let Some(bad) = prompt.iter().find(|&&i| i as usize >= vocab) {
        bail!("prompt token {bad} is outside the model's vocabulary (vocab_size {vocab})");
    }
    let mut params = a.sampling.params(0);
    params.stop = tok
        .as_ref()
        .map(|t| t.eos)
        .or(model.cfg.eos_token_id)
        .into_iter()
        .collect();
    for s in &a.stop {
        let id = match (s.parse::<u32>(), &tok) {
            (Ok(id), _) => id,
            (Err(_), Some(t)) => t.token_id(s).ok_or_else(|| {
                anyhow::anyhow!("--stop `{s}`: not a token of {}", t.path.display())
            })?,
            (Err(_), None) => bail!("--stop `{s}`: token strings need a tokenizer"),
        };
        if id as usize >= vocab {
            bail!("--stop {id} is outside the model's vocabulary (vocab_size {vocab})");
        }
        params.stop.push(id);
    }
    if a.print_ids {
        let g = engine::generate::generate(&mut model, &[prompt], &params, &mut |_, _| {})?;
        println!("{}", serde_json::to_string(&g[0].tokens)?);
        return Ok(());
    }
    let tok = tok.as_ref().expect("text output needs the tokenizer");
    // The chat template is not echoed; a plain prompt is, and the answer continues it.
    let mut st = if a.chat {
        Streamer {
            ids: vec![],
            printed: 0,
        }
    } else {
        Streamer::after(tok, &prompt)?
    };
    engine::generate::generate(&mut model, &[prompt], &params, &mut |_, t| st.push(tok, t))?;
    st.finish(tok);
    Ok(())
}

pub fn chat_cmd(a: ChatArgs) -> Result<()> {
    on_device!(a.device, |be| chat_on(be, a))
}

fn chat_on<B: engine::Backend>(be: B, a: ChatArgs) -> Result<()> {
    use engine::tokenizer::Message;
    use std::io::{BufRead, Write};
    let (mut model, tok) = load_for_generation(be, &a.model, a.tokenizer.as_deref())?;
    let mut msgs: Vec<Message> = a.system.iter().map(|s| Message::new("system", s)).collect();
    println!(
        "chatting with {} ({} parameters); /reset starts over, /exit or Ctrl-D ends",
        a.model.display(),
        model.num_params()
    );
    let stdin = std::io::stdin();
    let mut turn = 0u64;
    loop {
        print!("you> ");
        std::io::stdout().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            println!();
            break;
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                msgs.retain(|m| m.role == "system");
                println!("(conversation reset)");
                continue;
            }
            _ => {}
        }
        msgs.push(Message::new("user", line));
        let ids = tok.chat(&msgs)?.0;
        let room = model.cfg.max_position_embeddings.saturating_sub(ids.len());
        if room < 2 {
            msgs.pop();
            println!(
                "(the conversation fills the model's context of {} tokens: /reset)",
                model.cfg.max_position_embeddings
            );
            continue;
        }
        let mut p = a.sampling.params(tok.eos);
        p.max_new_tokens = p.max_new_tokens.min(room - 1);
        p.seed = a.sampling.seed.wrapping_add(turn);
        turn += 1;
        print!("assistant> ");
        let mut st = Streamer {
            ids: vec![],
            printed: 0,
        };
        let g = engine::generate::generate(&mut model, &[ids], &p, &mut |_, t| st.push(&tok, t))?;
        st.finish(&tok);
        msgs.push(Message::new("assistant", tok.decode(&g[0].tokens)?.trim()));
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct ScoreArgs {
    #[arg(long)]
    rm: PathBuf,
    /// JSONL rows: {prompt, response}, {messages} ending with the response, or HH transcripts.
    #[arg(long, num_args = 1.., required = true)]
    input: Vec<PathBuf>,
    #[arg(long)]
    seq_len: Option<usize>,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: Device,
}

pub fn score_cmd(a: ScoreArgs) -> Result<()> {
    on_device!(a.device, |be| score_on(be, a))
}

fn score_on<B: engine::Backend>(be: B, a: ScoreArgs) -> Result<()> {
    use trainer::rm::{load_rm, read_score_rows, score};
    let (mut model, tok) = load_rm(be, &a.rm)?;
    let rows = read_score_rows(&a.input)?;
    let seq_len = a.seq_len.unwrap_or(model.cfg.max_position_embeddings);
    let scores = score(&mut model, &tok, &rows, seq_len, a.batch_size)?;
    for ((p, r), s) in rows.iter().zip(scores) {
        println!(
            "{}",
            serde_json::json!({"messages": p, "response": r, "score": s})
        );
    }
    Ok(())
}
