//! Writes a Hugging Face `tokenizer.json` (+ `tokenizer_config.json`) for a byte-level BPE
//! vocabulary read from a GGUF file, so that a checkpoint trained from a GGUF base is a complete
//! HF folder (transformers and llama.cpp's converter need the tokenizer files).
//!
//! The pre-tokenizer is mapped from llama.cpp's `tokenizer.ggml.pre` name to the HF pipeline
//! that `src/model/tokenizer/hf.rs` reads back: `smollm`-like -> `Digits(individual)` +
//! `ByteLevel`, `gpt2` -> `ByteLevel`, Llama 3 / Qwen2 -> `Split(regex)` + `ByteLevel(no regex)`.
//! SentencePiece (`llama`) vocabularies are not written (their HF form is a different model).

use serde_json::{json, Map, Value};

use crate::model::tokenizer::PreTokenizer;
use crate::model::GgufTokenizerMeta;

use super::TrainError;

/// The Llama 3 pre-tokenizer regex as Hugging Face stores it.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The Qwen2 pre-tokenizer regex as Hugging Face stores it.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

/// `tokenizer.json` and `tokenizer_config.json` texts for a GGUF byte-level BPE vocabulary.
pub fn from_gguf(meta: &GgufTokenizerMeta) -> Result<(String, String), TrainError> {
    if meta.model != "gpt2" {
        return Err(TrainError::Checkpoint(format!(
            "cannot write tokenizer.json for a {:?} tokenizer (only byte-level BPE)",
            meta.model
        )));
    }
    let pre = match meta.pre.as_deref() {
        None | Some("default") => PreTokenizer::Gpt2,
        Some(name) => PreTokenizer::from_gguf_name(name).ok_or_else(|| {
            TrainError::Checkpoint(format!("pre-tokenizer {name:?} has no tokenizer.json form"))
        })?,
    };
    let pre_tokenizer = match pre {
        PreTokenizer::Gpt2 => byte_level(true),
        PreTokenizer::DigitsThenGpt2 => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        PreTokenizer::Llama3 | PreTokenizer::Qwen2 => {
            let regex = if pre == PreTokenizer::Llama3 {
                LLAMA3_REGEX
            } else {
                QWEN2_REGEX
            };
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
                byte_level(false)]})
        }
    };
    let mut vocab = Map::with_capacity(meta.tokens.len());
    let mut added = Vec::new();
    for (id, tok) in meta.tokens.iter().enumerate() {
        vocab.insert(tok.clone(), json!(id));
        // GGUF token types: 3 control, 4 user-defined -> HF added tokens (special or not).
        match meta.token_types.get(id) {
            Some(3) | Some(4) => added.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false,
                "special": meta.token_types.get(id) == Some(&3),
            })),
            _ => {}
        }
    }
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": byte_level(true),
        "decoder": byte_level(true),
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": pre == PreTokenizer::Llama3,
            "vocab": vocab,
            "merges": meta.merges,
        }
    });
    let tok = |id: Option<u32>| {
        id.and_then(|i| meta.tokens.get(i as usize))
            .map(|t| json!(t))
            .unwrap_or(Value::Null)
    };
    let config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": meta.add_bos,
        "add_eos_token": false,
        "bos_token": tok(meta.bos_id),
        "eos_token": tok(meta.eos_id),
        "pad_token": tok(meta.pad_id),
        "unk_token": tok(meta.unk_id),
        "chat_template": meta.chat_template,
        "clean_up_tokenization_spaces": false,
        "model_max_length": 8192,
    });
    let s = |v: &Value| {
        serde_json::to_string_pretty(v).map_err(|e| TrainError::Checkpoint(e.to_string()))
    };
    Ok((s(&tokenizer)?, s(&config)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tokenizer::Tokenizer;
    use crate::model::GgufFile;

    #[test]
    fn written_tokenizer_json_tokenizes_like_the_gguf_vocabulary() {
        let Some(home) = std::env::var_os("HOME") else {
            return;
        };
        let path = std::path::PathBuf::from(home)
            .join(".cache/backflow/model/SmolLM2-135M-Instruct.Q4_1.gguf");
        if !path.exists() {
            eprintln!("skipped: {} is absent", path.display());
            return;
        }
        let meta = GgufFile::open(&path)
            .expect("gguf")
            .tokenizer_meta()
            .expect("meta");
        let (tj, tc) = from_gguf(&meta).expect("write");
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("tokenizer.json"), tj).expect("w");
        std::fs::write(dir.path().join("tokenizer_config.json"), tc).expect("w");
        let hf =
            Tokenizer::from_tokenizer_json(dir.path().join("tokenizer.json")).expect("read back");
        let gg = Tokenizer::from_gguf_metadata(&meta).expect("gguf tokenizer");
        for text in [
            "Hello world! It's 2024-11-21, 3.14159 and ünïcödé.",
            "<|im_start|>user\nWrite  code:\n\tdef f(x): return x**2<|im_end|>\n",
            "   spaces   and\n\nnewlines 12345",
        ] {
            assert_eq!(hf.encode(text, true), gg.encode(text, true), "{text:?}");
        }
        assert_eq!(hf.eos_id(), gg.eos_id());
        assert_eq!(hf.chat_template(), gg.chat_template());
    }
}
