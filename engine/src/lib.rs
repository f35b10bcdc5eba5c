//! The Llama 2 engine: device buffers, the backend trait with its CPU (and CUDA) implementations,
//! the ops as forward/backward pairs, the model, checkpoint I/O, the tokenizer and the optimizer.

pub mod backend;
pub mod check;
pub mod checkpoint;
pub mod config;
pub mod dist;
pub mod elem;
pub mod error;
pub mod generate;
pub mod model;
pub mod ops;
pub mod optim;
pub mod params;
pub mod shared_data;
pub mod tokenizer;

pub use backend::cpu::Cpu;
pub use backend::cuda::Cuda;
pub use backend::Backend;
pub use config::LlamaConfig;
pub use error::{Error, Result};
pub use model::{ActBytes, Batch, GradReady, Llama, Master, Recompute};
pub use params::{Head, ParamTable};
