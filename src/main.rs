//! `llama2`: train and align Llama 2 models. The CLI only maps arguments to the library's configs.

mod cmd;

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use cmd::{check, data, eval, inference, recipe, reward, rlhf, train, world};

#[derive(Parser)]
#[command(
    name = "llama2",
    version,
    about = "Train and align Llama 2 models on hand-written kernels"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Compare the engine with a Hugging Face reference dump (logits, loss, every gradient,
    /// reward-model case, AdamW case); ends with `N passed, M failed`.
    Check(check::CheckArgs),
    /// Tokenize stdin and print the ids as a JSON array (or decode a JSON array with --decode,
    /// or render a JSON list of chat messages with --chat).
    Tokenize(data::TokenizeArgs),
    /// Rewrite dialogues, preference pairs or prompts (any accepted shape) in TRL's
    /// conversational form.
    Convert(data::ConvertArgs),
    /// Tokenize text files, directories and JSONL (`text` field) into memory-mapped shards.
    PrepareData(data::PrepareDataArgs),
    /// Train a byte-fallback BPE tokenizer (Llama 2's layout) on text files or JSONL.
    TrainTokenizer(data::TrainTokenizerArgs),
    /// Pretrain a Llama on prepared token shards (see prepare-data).
    Pretrain(train::PretrainArgs),
    /// Supervised fine-tuning on dialogues (messages, prompt/response or HH transcripts), packed,
    /// with the loss on assistant tokens only.
    Sft(train::SftArgs),
    /// Generate text from a checkpoint, streaming.
    Generate(inference::GenerateArgs),
    /// Chat with a checkpoint in the terminal (Llama 2 chat template, multi-turn).
    Chat(inference::ChatArgs),
    /// Write the built-in assistant world: corpus, SFT dialogues, RLHF prompts, evaluation sets,
    /// GAtt instructions and the knowledge base its gold annotator uses.
    World(world::WorldArgs),
    /// Sample two answers per world prompt from a chat model and label the pair with the gold
    /// annotator (preference JSONL for train-rm).
    WorldPrefs(world::WorldPrefsArgs),
    /// Evaluate a chat model on world prompts with the gold annotator.
    EvalWorld(world::EvalWorldArgs),
    /// A model against a baseline under one fixed judge (reward models or a world's annotator):
    /// win/tie/loss with a 95 % interval, false refusals on borderline prompts, refusals and
    /// violations on adversarial ones, and every stage's reward distribution (--stages; Figure 20).
    Eval(eval::EvalArgs),
    /// Train a reward model (helpfulness or safety) with the margin ranking loss.
    TrainRm(reward::TrainRmArgs),
    /// Evaluate a reward model on preference pairs: accuracy overall and by rating.
    EvalRm(reward::EvalRmArgs),
    /// Score (prompt, response) rows with a reward model; prints JSONL with a `score` field.
    Score(inference::ScoreArgs),
    /// Rejection-sampling fine-tuning: K samples per prompt, the best by the reward models kept
    /// (pooled over rounds), then fine-tuning on the pool.
    RejectionSample(rlhf::RejectionSampleArgs),
    /// PPO with the piecewise safety/helpfulness reward and a KL penalty to the reference policy.
    Ppo(rlhf::PpoArgs),
    /// Ghost Attention: synthetic multi-turn data with the instruction kept in the first turn
    /// only and loss on the last answer, then fine-tuning; adherence per turn before and after.
    Gatt(rlhf::GattArgs),
    /// Safety context distillation: answers under a safety preprompt, kept when the safety
    /// reward model prefers them, fine-tuned without the preprompt (`distill` for short).
    #[command(visible_alias = "distill")]
    DistillSafety(rlhf::DistillSafetyArgs),
    /// Iterative RLHF on the built-in world: each round labels new pairs sampled from the latest
    /// model, retrains both reward models on all labels so far, runs rejection sampling, and
    /// from --ppo-from on PPO (out/rlhf_report.json, per-round directories).
    Rlhf(rlhf::RlhfArgs),
    /// A recipe file: the model, each stage's data and settings, the rounds (`recipe run FILE`,
    /// `recipe plan FILE`); a rerun skips the steps already done.
    #[command(subcommand)]
    Recipe(recipe::RecipeCmd),
    /// The whole recipe on the built-in world (recipes/world-tiny.toml): pretrain, SFT, rounds of reward models, rejection
    /// sampling and PPO, Ghost Attention, safety context distillation, with a report
    /// (runs/<name>/report.json, report.md, plots).
    Pipeline(rlhf::PipelineArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(check::BenchCmd),
    /// A self-contained check of the engine: random tiny model, backward against finite
    /// differences, an optimizer step, save and reload through safetensors.
    Selftest(check::SelftestArgs),
}

fn main() {
    // Die quietly on a closed pipe (`llama2 check DIR | head`) as Unix tools do, instead of
    // panicking inside println!.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    // The matches too, not only the parsed values: `--resume` needs to know which flags were
    // given on the command line (a default and an explicit value look alike once parsed).
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let given = matches.subcommand().map(|(_, m)| m).expect("a subcommand");
    match cli.cmd {
        Cmd::Check(a) => check::check(a),
        Cmd::Tokenize(a) => data::tokenize(a),
        Cmd::Convert(a) => data::convert(a),
        Cmd::PrepareData(a) => data::prepare_data(a),
        Cmd::TrainTokenizer(a) => data::train_tokenizer(a),
        Cmd::Pretrain(a) => train::pretrain(a, given),
        Cmd::Sft(a) => train::sft(a, given),
        Cmd::Generate(a) => inference::generate_cmd(a),
        Cmd::Chat(a) => inference::chat_cmd(a),
        Cmd::World(a) => world::world(a),
        Cmd::WorldPrefs(a) => world::world_prefs(a),
        Cmd::EvalWorld(a) => world::eval_world(a),
        Cmd::Eval(a) => eval::eval(a),
        Cmd::TrainRm(a) => reward::train_rm(a),
        Cmd::EvalRm(a) => reward::eval_rm(a),
        Cmd::Score(a) => inference::score_cmd(a),
        Cmd::RejectionSample(a) => rlhf::rejection_sample(a),
        Cmd::Ppo(a) => rlhf::ppo_cmd(a, given),
        Cmd::Gatt(a) => rlhf::gatt(a),
        Cmd::DistillSafety(a) => rlhf::distill_safety(a),
        Cmd::Rlhf(a) => rlhf::rlhf(a),
        Cmd::Recipe(c) => recipe::recipe(c),
        Cmd::Pipeline(a) => rlhf::pipeline(a),
        Cmd::Bench(a) => check::bench(a),
        Cmd::Selftest(a) => check::selftest(a),
    }
}
