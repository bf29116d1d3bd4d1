//! Model hyper-parameters, read from GGUF metadata or a Hugging Face `config.json`.

use serde::{Deserialize, Serialize};

use super::gguf::{GgufFile, GgufValue};
use super::ModelError;

/// The decoder families this crate runs. Both are pre-norm RMSNorm + RoPE + GQA + SwiGLU;
/// Qwen2 adds biases to the q/k/v projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    /// LLaMA (and Mistral-style, SmolLM) decoders.
    Llama,
    /// Qwen2 / Qwen2.5: LLaMA with q/k/v biases.
    Qwen2,
}

impl Architecture {
    /// Parses `general.architecture` (GGUF) or `model_type` (HF).
    pub fn parse(name: &str) -> Result<Self, ModelError> {
        match name {
            "llama" | "mistral" => Ok(Architecture::Llama),
            "qwen2" => Ok(Architecture::Qwen2),
            other => Err(ModelError::UnsupportedArchitecture(other.to_string())),
        }
    }

    /// The GGUF metadata prefix of this architecture.
    pub fn gguf_prefix(&self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
        }
    }
}

/// Hyper-parameters of a LLaMA-family decoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// The family.
    pub arch: Architecture,
    /// Number of decoder blocks.
    pub n_layers: usize,
    /// Model width (embedding length).
    pub hidden: usize,
    /// Width of the SwiGLU MLP.
    pub ffn: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// Vocabulary size (rows of the embedding).
    pub vocab: usize,
    /// Trained context length.
    pub max_seq_len: usize,
    /// The output head is the token embedding (no separate `output.weight` / `lm_head`).
    pub tie_embeddings: bool,
    /// q/k/v projections have biases (Qwen2).
    pub qkv_bias: bool,
}

impl LlamaConfig {
    /// The shape of SmolLM2-135M (30 layers, width 576, 9 query and 3 kv heads, a 49152-token
    /// vocabulary, tied head, 8192-token context): random weights of it stand in for the real
    /// checkpoint in benchmarks and on machines it cannot travel to.
    pub fn smollm2_135m() -> Self {
        LlamaConfig {
            arch: Architecture::Llama,
            n_layers: 30,
            hidden: 576,
            ffn: 1536,
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
            rope_theta: 100_000.0,
            rms_eps: 1e-5,
            vocab: 49152,
            max_seq_len: 8192,
            tie_embeddings: true,
            qkv_bias: false,
        }
    }

    /// The shape of Meta-Llama-3-8B (32 layers, width 4096, 32 query and 8 kv heads of 128, a
    /// 14336-wide MLP, a 128256-token vocabulary, an untied head, RoPE base 500000): random
    /// weights of it measure a GPU against its memory bandwidth, where the real 16 GB checkpoint
    /// cannot travel.
    pub fn llama3_8b() -> Self {
        LlamaConfig {
            arch: Architecture::Llama,
            n_layers: 32,
            hidden: 4096,
            ffn: 14336,
            n_heads: 32,
            n_kv_heads: 8,
            head_dim: 128,
            rope_theta: 500_000.0,
            rms_eps: 1e-5,
            vocab: 128_256,
            max_seq_len: 8192,
            tie_embeddings: false,
            qkv_bias: false,
        }
    }

    /// The number of weights a decode step reads: every projection, the norms and the output
    /// head, but not the embedding table (a step gathers one row of it per token) unless the
    /// head is tied to it. Times the bytes per weight, the floor of a step's memory traffic.
    pub fn weights_read_per_step(&self) -> usize {
        let (h, qd, kd) = (
            self.hidden,
            self.n_heads * self.head_dim,
            self.n_kv_heads * self.head_dim,
        );
        let bias = if self.qkv_bias { qd + 2 * kd } else { 0 };
        let block = h * (qd + 2 * kd) + bias + qd * h + 3 * h * self.ffn + 2 * h;
        self.n_layers * block + h + self.vocab * h
    }

    /// Reads the config from a GGUF file's metadata.
    pub fn from_gguf(f: &GgufFile) -> Result<Self, ModelError> {
        let arch = Architecture::parse(f.architecture()?)?;
        let p = arch.gguf_prefix();
        let key = |k: &str| format!("{p}.{k}");
        let usize_of = |k: &str| -> Result<usize, ModelError> { Ok(f.get_u64(&key(k))? as usize) };
        let hidden = usize_of("embedding_length")?;
        let n_heads = usize_of("attention.head_count")?;
        if n_heads == 0 {
            return Err(ModelError::Config("attention.head_count is 0".into()));
        }
        let n_kv_heads = match f.get(&key("attention.head_count_kv")) {
            Some(v) => v
                .as_u64()
                .ok_or_else(|| ModelError::Config("head_count_kv is not an integer".into()))?
                as usize,
            None => n_heads,
        };
        let head_dim = match f.get(&key("attention.key_length")) {
            Some(v) => v.as_u64().unwrap_or(0) as usize,
            None => hidden / n_heads,
        };
        let vocab = match f.get(&key("vocab_size")).and_then(GgufValue::as_u64) {
            Some(v) => v as usize,
            None => f
                .get("tokenizer.ggml.tokens")
                .and_then(GgufValue::as_array)
                .map(|a| a.len())
                // Found by fuzzing: a tensor with no dims has no first one.
                .or_else(|| {
                    f.tensor_info("token_embd.weight")
                        .and_then(|t| t.shape().first().copied())
                })
                .ok_or_else(|| ModelError::Config("cannot tell the vocabulary size".into()))?,
        };
        let cfg = LlamaConfig {
            arch,
            n_layers: usize_of("block_count")?,
            hidden,
            ffn: usize_of("feed_forward_length")?,
            n_heads,
            n_kv_heads,
            head_dim,
            rope_theta: f
                .get(&key("rope.freq_base"))
                .and_then(GgufValue::as_f64)
                .unwrap_or(10_000.0) as f32,
            rms_eps: f.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
            vocab,
            max_seq_len: f
                .get(&key("context_length"))
                .and_then(GgufValue::as_u64)
                .unwrap_or(4096) as usize,
            tie_embeddings: f.tensor_info("output.weight").is_none(),
            qkv_bias: f.tensor_info("blk.0.attn_q.bias").is_some(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads the config from a Hugging Face `config.json` text.
    pub fn from_hf_json(text: &str) -> Result<Self, ModelError> {
        let j: HfConfig = serde_json::from_str(text)
            .map_err(|e| ModelError::Config(format!("config.json: {e}")))?;
        let arch = Architecture::parse(&j.model_type)?;
        if let Some(scaling) = j.rope_scaling.as_ref().filter(|v| !v.is_null()) {
            return Err(ModelError::Config(format!(
                "rope_scaling {scaling} is not supported"
            )));
        }
        let n_heads = j.num_attention_heads;
        if n_heads == 0 {
            return Err(ModelError::Config("num_attention_heads is 0".into()));
        }
        let cfg = LlamaConfig {
            arch,
            n_layers: j.num_hidden_layers,
            hidden: j.hidden_size,
            ffn: j.intermediate_size,
            n_heads,
            n_kv_heads: j.num_key_value_heads.unwrap_or(n_heads),
            head_dim: j.head_dim.unwrap_or(j.hidden_size / n_heads),
            rope_theta: j.rope_theta.unwrap_or(10_000.0) as f32,
            rms_eps: j.rms_norm_eps.unwrap_or(1e-6),
            vocab: j.vocab_size,
            max_seq_len: j.max_position_embeddings.unwrap_or(4096),
            tie_embeddings: j.tie_word_embeddings.unwrap_or(false),
            qkv_bias: arch == Architecture::Qwen2 || j.attention_bias.unwrap_or(false),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Query heads per key/value head.
    pub fn n_rep(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.n_layers == 0 || self.hidden == 0 || self.ffn == 0 || self.vocab == 0 {
            return bad(format!("empty dimension in {self:?}"));
        }
        if self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "{} query heads cannot be grouped over {} kv heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!("head dim {} must be even", self.head_dim));
        }
        Ok(())
    }
}

/// The fields of a Hugging Face `config.json` that a LLaMA-family decoder needs.
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: String,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rope_theta: Option<f64>,
    rms_norm_eps: Option<f64>,
    vocab_size: usize,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    rope_scaling: Option<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_read_per_step_match_the_published_parameter_counts() {
        // Published totals: SmolLM2-135M 134,515,008 parameters (tied head: a step reads them
        // all, the table as head); Llama-3-8B 8,030,261,248, of which the 128256 x 4096
        // embedding table is only gathered.
        assert_eq!(
            LlamaConfig::smollm2_135m().weights_read_per_step(),
            134_515_008
        );
        assert_eq!(
            LlamaConfig::llama3_8b().weights_read_per_step(),
            8_030_261_248 - 128_256 * 4096
        );
    }

    #[test]
    fn hf_smollm2_config() {
        // The fields of SmolLM2-135M-Instruct's config.json.
        let text = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama",
            "hidden_size":576,"intermediate_size":1536,"num_hidden_layers":30,
            "num_attention_heads":9,"num_key_value_heads":3,"rope_theta":100000,
            "rms_norm_eps":1e-05,"vocab_size":49152,"max_position_embeddings":8192,
            "tie_word_embeddings":true,"rope_scaling":null}"#;
        let c = LlamaConfig::from_hf_json(text).expect("config");
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.n_rep(), 3);
        assert!(c.tie_embeddings);
        assert!(!c.qkv_bias);
        assert_eq!(c.rope_theta, 100_000.0);
    }

    #[test]
    fn rejects_unknown_model_and_bad_heads() {
        let text = r#"{"model_type":"gpt2","hidden_size":8,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":2,"vocab_size":10}"#;
        assert!(matches!(
            LlamaConfig::from_hf_json(text),
            Err(ModelError::UnsupportedArchitecture(_))
        ));
        let text = r#"{"model_type":"llama","hidden_size":8,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":3,"num_key_value_heads":2,"vocab_size":10}"#;
        assert!(matches!(
            LlamaConfig::from_hf_json(text),
            Err(ModelError::Config(_))
        ));
    }
}
