//! Supervised finetuning of the LLaMA (full or LoRA) on instruction data: the engine of the
//! Humpback training sink and of `backflow train`.
//!
//! - [`data`]: reading Alpaca / Self-Instruct / conversation data, paper tags, reversed pairs
//!   for the backward model, chat-template tokenization with output-only labels.
//! - [`model`]: the trainable decoder (HF layout, burn `Module`), [`lora`]: its adapters,
//!   [`table`]: its embedding and output head, f32 or frozen blocks.
//! - [`sft`]: masked cross-entropy, batching, gradient accumulation, AdamW, LR decay, clipping;
//!   [`backward`]: one micro-batch's gradients, whole-graph or recomputed block by block.
//! - [`checkpoint`]: HF-layout checkpoints and PEFT adapters, written atomically, resumable.
//! - [`load`]: checkpoints for inference, adapters applied unmerged over a base loaded once.
//! - [`export`]: any loadable model (GGUF, HF folder, merged adapter) as an HF folder.
//! - [`job`]: a training job's spec ([`TrainJob`]) and outcome; [`run`]: the run as one call
//!   ([`run_job`]), reusing finished identical runs ([`fingerprint`], [`save`]) and logging every
//!   step ([`metrics_log`]).

pub mod backward;
pub mod checkpoint;
pub mod data;
pub mod export;
pub mod export_gguf;
pub mod fingerprint;
pub mod job;
pub mod load;
pub mod lora;
pub mod metrics_log;
pub mod model;
pub mod run;
pub mod save;
pub mod sft;
pub mod table;
pub mod tokenizer_json;

pub use job::{DataGroup, TrainEvent, TrainJob, TrainOutcome};
pub use run::{run_job, run_job_with};

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
    /// Training produced a non-finite loss or gradient (a learning rate too high, bad data).
    #[error(
        "step {step}: the loss ({loss}) or gradient norm ({grad_norm}) is not finite: \
         training stopped, nothing of this step saved (try a smaller --lr)"
    )]
    Diverged {
        /// The step (1-based).
        step: usize,
        /// Its loss.
        loss: f64,
        /// Its gradient norm.
        grad_norm: f64,
    },
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

/// Every character of the test data and of the paper's tags (no others are encodable).
#[cfg(test)]
pub(crate) const ALPHABET: &str = "abcdefghijklmnopqrstuvwxyzAIQW .?,:\n";

/// A tiny HF base folder: random weights of the tiny training config (with room for the
/// tagged prompts), and a byte-level BPE vocabulary of [`ALPHABET`] without merges plus
/// ChatML's two control tokens, so that `ChatTemplate::for_tokenizer` picks ChatML.
#[cfg(test)]
pub(crate) fn tiny_base(dir: &std::path::Path) {
    tiny_base_of(
        dir,
        crate::model::LlamaConfig {
            max_seq_len: 256,
            ..crate::train::tiny_config()
        },
    )
}

/// [`tiny_base`] of another shape (`cfg.vocab` must hold [`ALPHABET`] and the two tokens).
#[cfg(test)]
pub(crate) fn tiny_base_of(dir: &std::path::Path, cfg: crate::model::LlamaConfig) {
    use crate::model::llama::RandomWeights;
    use burn::backend::Flex;
    use model::{TrainLlama, TrainMode};
    use serde_json::json;

    let dev = Default::default();
    let m: TrainLlama<Flex> = TrainLlama::load(
        cfg.clone(),
        &mut RandomWeights::new(cfg.clone(), 3),
        &TrainMode::Full,
        &dev,
    )
    .expect("random model");
    let weights = checkpoint::safetensors_bytes(&checkpoint::export_weights(&m).expect("export"))
        .expect("safetensors");
    let mut vocab = serde_json::Map::new();
    for (i, c) in ALPHABET.chars().enumerate() {
        // GPT-2's byte-level spelling of space and newline.
        let tok = match c {
            ' ' => 'Ġ',
            '\n' => 'Ċ',
            c => c,
        };
        vocab.insert(tok.to_string(), json!(i));
    }
    let n = ALPHABET.chars().count();
    assert!(n + 2 <= cfg.vocab, "vocabulary larger than the model's");
    vocab.insert("<|im_start|>".into(), json!(n));
    vocab.insert("<|im_end|>".into(), json!(n + 1));
    let tokenizer = json!({
        "version": "1.0",
        "added_tokens": [
            {"id": n, "content": "<|im_start|>", "special": true},
            {"id": n + 1, "content": "<|im_end|>", "special": true},
        ],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false,
            "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "vocab": vocab, "merges": []},
    });
    let files = vec![
        (
            checkpoint::CONFIG.to_string(),
            serde_json::to_vec(&checkpoint::hf_config(&cfg, None, &[n as u32 + 1])).expect("json"),
        ),
        (checkpoint::WEIGHTS.to_string(), weights),
        (
            "tokenizer.json".to_string(),
            serde_json::to_vec(&tokenizer).expect("json"),
        ),
        (
            "tokenizer_config.json".to_string(),
            serde_json::to_vec(&json!({"eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}))
                .expect("json"),
        ),
    ];
    checkpoint::write_folder_atomic(dir, &files, &[]).expect("write base");
}
