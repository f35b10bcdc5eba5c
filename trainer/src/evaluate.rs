//! Answers from a chat model for a list of dialogues, generated in batches through the KV cache:
//! what evaluation, rejection sampling and the GAtt/PPO stages score.

use anyhow::Result;
use engine::generate::{generate, Generation, SamplingParams};
use engine::tokenizer::{Message, Tokenizer};
use engine::{Backend, Llama};

/// One sampled answer with what RL needs: the prompt's ids, the answer's ids and log-probs.
#[derive(Clone, Debug)]
pub struct Answer {
    pub text: String,
    pub prompt_ids: Vec<u32>,
    pub gen: Generation,
}

/// Generates an answer for each dialogue (ending with a user turn), `batch` at a time. Prompts
/// too long for the context are cut from the left, keeping BOS.
pub fn chat_answers<B: Backend>(
    model: &mut Llama<B>,
    tok: &Tokenizer,
    dialogues: &[Vec<Message>],
    params: &SamplingParams,
    batch: usize,
) -> Result<Vec<Answer>> {
    let ctx = model.cfg.max_position_embeddings;
    let keep = ctx
        .saturating_sub(params.max_new_tokens.min(ctx / 2))
        .max(2);
    let mut prompts = Vec::with_capacity(dialogues.len());
    for d in dialogues {
        let (mut ids, _) = tok.chat(d)?;
        if ids.len() > keep {
            let cut = ids.len() - keep + 1;
            ids.drain(1..=cut);
        }
        prompts.push(ids);
    }
    let mut out = Vec::with_capacity(dialogues.len());
    for (ci, chunk) in prompts.chunks(batch.max(1)).enumerate() {
        let mut p = params.clone();
        p.seed = params.seed.wrapping_add(ci as u64);
        let gens = generate(model, chunk, &p, &mut |_, _| {})?;
        for (ids, g) in chunk.iter().zip(gens) {
            out.push(Answer {
                text: tok.decode(&g.tokens)?.trim().to_string(),
                prompt_ids: ids.clone(),
                gen: g,
            });
        }
    }
    Ok(out)
}

/// Greedy decoding settings for evaluation.
pub fn greedy(max_new_tokens: usize, eos: u32) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        max_new_tokens,
        stop: vec![eos],
        ..Default::default()
    }
}
