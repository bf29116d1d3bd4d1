//! Supervised finetuning of the LLaMA (full or LoRA) on instruction data: the engine of the
//! Humpback training sink and of `backflow train`.
//!
//! - [`data`]: reading Alpaca / Self-Instruct / conversation data, paper tags, reversed pairs
//!   for the backward model, chat-template tokenization with output-only labels.
//! - [`model`]: the trainable decoder (HF layout, burn `Module`), [`lora`]: its adapters.
//! - [`sft`]: masked cross-entropy, batching, gradient accumulation, AdamW, LR decay, clipping.
//! - [`checkpoint`]: HF-layout checkpoints and PEFT adapters, written atomically, resumable.
//! - [`job`]: a whole training run as one call ([`run_job`]), reusing finished identical runs.

pub mod checkpoint;
pub mod data;
pub mod job;
pub mod lora;
pub mod model;
pub mod sft;
pub mod tokenizer_json;

pub use job::{run_job, run_job_with, DataGroup, TrainEvent, TrainJob, TrainOutcome};

use std::path::PathBuf;

/// Errors of training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Loading or shaping the model failed.
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    /// The tokenizer could not be built.
    #[error(transparent)]
    Tokenizer(#[from] crate::model::tokenizer::TokenizerError),
    /// The model has no usable chat template.
    #[error(transparent)]
    Chat(#[from] crate::model::chat::ChatError),
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Unusable training data.
    #[error("data: {0}")]
    Data(String),
    /// A checkpoint that cannot be read or written.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// Inconsistent options.
    #[error("config: {0}")]
    Config(String),
}

/// `Io` error constructor for `map_err`.
pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The tiny model of the training tests: 2 layers, hidden 32, GQA 4/2, vocab 64.
#[cfg(test)]
pub(crate) fn tiny_config() -> crate::model::LlamaConfig {
    crate::model::LlamaConfig {
        arch: crate::model::Architecture::Llama,
        n_layers: 2,
        hidden: 32,
        ffn: 64,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 8,
        rope_theta: 10_000.0,
        rms_eps: 1e-5,
        vocab: 64,
        max_seq_len: 64,
        tie_embeddings: true,
        qkv_bias: false,
    }
}
