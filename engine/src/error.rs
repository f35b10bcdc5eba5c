//! Typed errors of the engine: every message names the file, tensor or field and what was expected.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The OS error is part of the message and deliberately not a `source()`: anyhow's `{:#}`
    /// would print it a second time.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("{file}: tensor `{tensor}`: {msg}")]
    Tensor {
        file: PathBuf,
        tensor: String,
        msg: String,
    },
    #[error("config: {0}")]
    Config(String),
    #[error("shape: {0}")]
    Shape(String),
    #[error("input: {0}")]
    Input(String),
    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    #[error("device: {0}")]
    Device(String),
    /// A request larger than the memory the device has left (checked before allocating).
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    #[error("non-finite value: {0}")]
    NonFinite(String),
    /// Launch environment, rendezvous, NCCL and sharded-checkpoint problems.
    #[error("distributed: {0}")]
    Dist(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err,
        }
    }
    pub fn file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::File {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn tensor(file: impl Into<PathBuf>, tensor: &str, msg: impl Into<String>) -> Self {
        Error::Tensor {
            file: file.into(),
            tensor: tensor.to_string(),
            msg: msg.into(),
        }
    }
}
