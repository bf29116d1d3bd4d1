//! The LLaMA-family language model in burn: checkpoint loading (GGUF, Hugging Face folders),
//! the forward pass, the KV cache, sampling and batched generation.
//!
//! Weights load in the chosen [`Precision`]: kept as blocks on the host (`native`: a GGUF's
//! own 4- and 5-bit blocks where [`quant`] has a kernel for them, else 8-bit blocks; `q8`), or
//! dequantized and converted to f32, f16 or bf16 as they go to the device. Both checkpoint
//! formats are brought to one layout, Hugging Face's: linear weights `[out, in]`, and q/k
//! projection rows in the "halves" RoPE order (GGUF's llama q/k rows are un-permuted at load,
//! see [`gguf::GgufWeights`]), so a single RoPE implementation serves both.

pub mod chat;
pub mod config;
pub mod device;
pub mod generate;
pub mod gguf;
pub mod gguf_writer;
pub mod kv_cache;
pub mod llama;
pub mod quant;
pub mod safetensors;
pub mod sampling;
pub mod tokenizer;

pub use config::{Architecture, LlamaConfig};
pub use device::Precision;
pub use generate::{ChoiceAfter, Completion, Generator, Request, StopReason};
pub use gguf::{GgufFile, GgufTokenizerMeta};
pub use llama::{Llama, WeightSource};
pub use sampling::Sampling;

/// Errors of model loading and generation.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The GGUF file could not be read.
    #[error(transparent)]
    Gguf(#[from] gguf::GgufError),
    /// A safetensors file or Hugging Face folder could not be read.
    #[error("safetensors: {0}")]
    Safetensors(String),
    /// An I/O error on a named file.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A model family this crate does not run.
    #[error("unsupported architecture {0:?} (supported: llama, mistral, qwen2)")]
    UnsupportedArchitecture(String),
    /// Hyper-parameters that are missing or inconsistent.
    #[error("bad model config: {0}")]
    Config(String),
    /// A weight is missing or has the wrong shape.
    #[error("weight {name}: {problem}")]
    Weight {
        /// The weight's name in the checkpoint.
        name: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A request that cannot be served (empty prompt, longer than the context, bad token id).
    #[error("bad request: {0}")]
    Request(String),
}

/// Where the tokenizer of a checkpoint comes from.
#[derive(Debug, Clone)]
pub enum TokenizerSource {
    /// The GGUF file's `tokenizer.*` metadata.
    Gguf(Box<GgufTokenizerMeta>),
    /// A Hugging Face `tokenizer.json`.
    TokenizerJson(std::path::PathBuf),
    /// The checkpoint has none.
    Missing,
}

impl TokenizerSource {
    /// Builds the tokenizer; a checkpoint without one is an error.
    pub fn load(&self) -> Result<tokenizer::Tokenizer, tokenizer::TokenizerError> {
        match self {
            TokenizerSource::Gguf(meta) => tokenizer::Tokenizer::from_gguf_metadata(meta),
            TokenizerSource::TokenizerJson(path) => tokenizer::Tokenizer::from_tokenizer_json(path),
            TokenizerSource::Missing => Err(tokenizer::TokenizerError::Invalid(
                "the checkpoint has no tokenizer".into(),
            )),
        }
    }
}

/// A loaded checkpoint: the model on its device, its tokenizer data and its stop tokens.
#[derive(Debug, Clone)]
pub struct Checkpoint<B: burn::tensor::backend::Backend> {
    /// The model.
    pub model: Llama<B>,
    /// The tokenizer data.
    pub tokenizer: TokenizerSource,
    /// Tokens that end a generation (EOS and the chat end-of-turn tokens the vocabulary has).
    pub stop_ids: Vec<u32>,
}

/// End-of-turn tokens of the common chat templates, stopped at when the vocabulary has them
/// (llama.cpp keeps the same kind of list for its end-of-generation set).
const END_OF_TURN: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|endoftext|>",
    "<|end|>",
    "</s>",
];

/// Loads a GGUF file or a Hugging Face folder (`config.json` + safetensors) onto `device`,
/// in `precision`.
pub fn load_checkpoint<B: burn::tensor::backend::Backend>(
    path: &std::path::Path,
    device: &B::Device,
    precision: Precision,
) -> Result<Checkpoint<B>, ModelError> {
    let loaded = read_checkpoint(path, device, precision);
    // What the load freed goes back now, on every thread that freed it: the file's tables
    // (its vocabulary is read twice, once for the tokenizer kept) and the rows read and parts
    // stacked on rayon's threads: 7 MB of the 135M's 142 MB resident, 18 of the 1.5B's 1214.
    crate::memory::release_free_memory_everywhere();
    loaded
}

/// [`load_checkpoint`] without the memory hand-back.
fn read_checkpoint<B: burn::tensor::backend::Backend>(
    path: &std::path::Path,
    device: &B::Device,
    precision: Precision,
) -> Result<Checkpoint<B>, ModelError> {
    if path.is_dir() {
        let mut hf = safetensors::HfFolder::open(path)?;
        let cfg = hf.config.clone();
        let model = Llama::load(cfg, &mut hf, device, precision)?;
        let tokenizer = match hf.tokenizer_json() {
            Some(p) => TokenizerSource::TokenizerJson(p),
            None => TokenizerSource::Missing,
        };
        return Ok(Checkpoint {
            model,
            tokenizer,
            stop_ids: hf.eos_ids(),
        });
    }
    let file = GgufFile::open(path)?;
    let cfg = LlamaConfig::from_gguf(&file)?;
    let model = Llama::load(
        cfg.clone(),
        &mut gguf::GgufWeights::new(&file, &cfg),
        device,
        precision,
    )?;
    let (tokenizer, stop_ids) = match file.tokenizer_meta() {
        Ok(meta) => {
            let mut stops: Vec<u32> = meta.eos_id.into_iter().collect();
            for (id, tok) in meta.tokens.iter().enumerate() {
                if END_OF_TURN.contains(&tok.as_str()) && !stops.contains(&(id as u32)) {
                    stops.push(id as u32);
                }
            }
            (TokenizerSource::Gguf(Box::new(meta)), stops)
        }
        Err(_) => (TokenizerSource::Missing, Vec::new()),
    };
    Ok(Checkpoint {
        model,
        tokenizer,
        stop_ids,
    })
}
