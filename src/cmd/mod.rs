//! The subcommands, one module per family; `main.rs` holds the command enum and dispatch.

pub mod check;
mod common;
pub mod data;
pub mod eval;
pub mod inference;
pub mod recipe;
pub mod reward;
pub mod rlhf;
pub mod train;
pub mod world;
