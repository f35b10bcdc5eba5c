//! Inference: `generate`, `chat`, `score`.

use super::common::{load_for_generation, on_device};
use anyhow::Result;
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
    #[arg(long)]
    prompt: String,
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
/// become text once complete).
struct Streamer {
    ids: Vec<u32>,
    printed: usize,
}

impl Streamer {
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

pub fn generate_cmd(a: GenerateArgs) -> Result<()> {
    on_device!(a.device, |be| generate_on(be, a))
}

fn generate_on<B: engine::Backend>(be: B, a: GenerateArgs) -> Result<()> {
    use engine::tokenizer::Message;
    let (mut model, tok) = load_for_generation(be, &a.model, a.tokenizer.as_deref())?;
    let prompt = if a.chat {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(Message::new("system", s));
        }
        msgs.push(Message::new("user", &a.prompt));
        tok.chat(&msgs)?.0
    } else {
        tok.encode(&a.prompt, true)?
    };
    let mut st = Streamer {
        ids: vec![],
        printed: 0,
    };
    if !a.chat {
        print!("{}", a.prompt);
    }
    engine::generate::generate(
        &mut model,
        &[prompt],
        &a.sampling.params(tok.eos),
        &mut |_, t| st.push(&tok, t),
    )?;
    println!();
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
        println!();
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
