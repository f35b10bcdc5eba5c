//! The training loops and tools built on the engine. Each stage is a module with a config struct
//! and a `run` function; the CLI maps arguments to configs and nothing more.

pub mod bench;
pub mod data;
pub mod device;
pub mod distill;
pub mod evaluate;
pub mod formats;
pub mod gatt;
pub mod interrupt;
pub mod kernel_bench;
pub mod lm_train;
pub mod memory;
mod optimizer;
pub mod paper;
pub mod pipeline;
pub mod plot;
pub mod ppo;
pub mod prefs;
pub mod recipe;
pub mod report;
pub mod reward;
pub mod rlhf;
pub mod rm;
pub mod rs;
pub mod run_dir;
pub mod schedule;
pub mod selftest;
pub mod sft;
pub mod tokenizer_train;
pub mod user_eval;
pub mod world;
