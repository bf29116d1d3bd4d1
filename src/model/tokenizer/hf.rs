//! Reads a Hugging Face `tokenizer.json` (and the `tokenizer_config.json` beside it) into the
//! same parts a GGUF vocabulary gives.
//!
//! Supported: a `BPE` model whose pre-tokenizer is byte-level, in the shapes the LLaMA family
//! uses: `ByteLevel` alone (GPT-2), `Sequence[Digits(individual), ByteLevel]` (SmolLM2,
//! StarCoder), `Sequence[Split(<llama3 or qwen2 regex>), ByteLevel(use_regex=false)]`.
//! Anything else is refused rather than tokenized differently from the checkpoint's own.

use std::path::Path;

use serde_json::Value;

use super::{Parts, PartsModel, PreTokenizer, TokenKind, TokenizerError};

/// The Llama 3 pre-tokenizer regex as Hugging Face stores it.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The Qwen2 pre-tokenizer regex as Hugging Face stores it.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn read_json(path: &Path) -> Result<Value, TokenizerError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| TokenizerError::Json {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Loads `tokenizer.json` at `path` (plus `tokenizer_config.json` next to it, if present).
pub(super) fn load(path: &Path) -> Result<Parts, TokenizerError> {
    let bad = |reason: String| TokenizerError::Json {
        path: path.to_path_buf(),
        reason,
    };
    let root = read_json(path)?;
    let model = &root["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(TokenizerError::Unsupported(format!(
            "tokenizer.json model type {} (only BPE)",
            model["type"]
        )));
    }
    let pre = pre_tokenizer(&root["pre_tokenizer"])?;

    // Ids: the BPE vocab plus added tokens (which may extend past it).
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| bad("model.vocab is not an object".into()))?;
    let added = root["added_tokens"].as_array().cloned().unwrap_or_default();
    let mut entries: Vec<(u32, String, TokenKind)> = Vec::with_capacity(vocab.len() + added.len());
    for (text, id) in vocab {
        let id = id
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| bad(format!("bad id for {text:?}")))?;
        entries.push((id, text.clone(), TokenKind::Normal));
    }
    for a in &added {
        let id = a["id"]
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| bad("added token without id".into()))?;
        let content = a["content"]
            .as_str()
            .ok_or_else(|| bad(format!("added token {id} without content")))?;
        let kind = if a["special"].as_bool().unwrap_or(false) {
            TokenKind::Control
        } else {
            TokenKind::UserDefined
        };
        entries.push((id, content.to_string(), kind));
    }
    let n = entries.iter().map(|e| e.0 as usize + 1).max().unwrap_or(0);
    let mut tokens = vec![String::new(); n];
    let mut kinds = vec![TokenKind::Unused; n];
    // Added tokens come last, so their kind overrides the vocab entry of the same id.
    for (id, text, kind) in entries {
        tokens[id as usize] = text;
        kinds[id as usize] = kind;
    }

    let merges = model["merges"]
        .as_array()
        .ok_or_else(|| bad("model.merges is not an array".into()))?
        .iter()
        .map(|m| match m {
            Value::String(s) => super::split_merge(s),
            Value::Array(pair) => match (pair.first(), pair.get(1)) {
                (Some(Value::String(l)), Some(Value::String(r))) if pair.len() == 2 => {
                    Ok((l.clone(), r.clone()))
                }
                _ => Err(bad(format!("bad merge {m}"))),
            },
            _ => Err(bad(format!("bad merge {m}"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ignore_merges = model["ignore_merges"].as_bool().unwrap_or(false);

    let id_of = |v: &Value| -> Option<u32> {
        let text = v.as_str().or_else(|| v["content"].as_str())?;
        tokens.iter().position(|t| t == text).map(|i| i as u32)
    };
    let config_path = path.with_file_name("tokenizer_config.json");
    let config = if config_path.exists() {
        read_json(&config_path)?
    } else {
        Value::Null
    };
    let unk = id_of(&model["unk_token"]).or_else(|| id_of(&config["unk_token"]));
    let bos = id_of(&config["bos_token"]);
    let add_bos = config["add_bos_token"]
        .as_bool()
        .unwrap_or_else(|| post_processor_adds_bos(&root["post_processor"]));
    let chat_template = match &config["chat_template"] {
        Value::String(s) => Some(s.clone()),
        // A list of named templates: the "default" one.
        Value::Array(list) => list
            .iter()
            .find(|t| t["name"].as_str() == Some("default"))
            .and_then(|t| t["template"].as_str())
            .map(str::to_string),
        _ => None,
    };
    Ok(Parts {
        model: PartsModel::Bpe {
            pre,
            merges,
            ignore_merges,
        },
        bos,
        eos: id_of(&config["eos_token"]),
        pad: id_of(&config["pad_token"]),
        unk,
        add_bos,
        chat_template,
        tokens,
        kinds,
    })
}

/// Whether a `TemplateProcessing` post-processor puts a special token before the text.
fn post_processor_adds_bos(pp: &Value) -> bool {
    let single = match pp["type"].as_str() {
        Some("TemplateProcessing") => &pp["single"],
        Some("Sequence") => {
            return pp["processors"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(post_processor_adds_bos))
        }
        _ => return false,
    };
    single
        .as_array()
        .and_then(|s| s.first())
        .is_some_and(|first| first.get("SpecialToken").is_some())
}

/// The pre-tokenizer of a `tokenizer.json` `pre_tokenizer` value.
fn pre_tokenizer(v: &Value) -> Result<PreTokenizer, TokenizerError> {
    let unsupported = || TokenizerError::Unsupported(format!("pre_tokenizer {v}"));
    let byte_level_ok = |b: &Value, regex: bool| {
        b["type"].as_str() == Some("ByteLevel")
            && !b["add_prefix_space"].as_bool().unwrap_or(false)
            && b["use_regex"].as_bool().unwrap_or(true) == regex
    };
    match v["type"].as_str() {
        Some("ByteLevel") if byte_level_ok(v, true) => Ok(PreTokenizer::Gpt2),
        Some("Sequence") => {
            let steps = v["pretokenizers"].as_array().ok_or_else(unsupported)?;
            match steps.as_slice() {
                [d, b]
                    if d["type"].as_str() == Some("Digits")
                        && d["individual_digits"].as_bool() == Some(true)
                        && byte_level_ok(b, true) =>
                {
                    Ok(PreTokenizer::DigitsThenGpt2)
                }
                [s, b] if s["type"].as_str() == Some("Split") && byte_level_ok(b, false) => {
                    match s["pattern"]["Regex"].as_str() {
                        Some(LLAMA3_REGEX) => Ok(PreTokenizer::Llama3),
                        Some(QWEN2_REGEX) => Ok(PreTokenizer::Qwen2),
                        _ => Err(unsupported()),
                    }
                }
                [b] if byte_level_ok(b, true) => Ok(PreTokenizer::Gpt2),
                _ => Err(unsupported()),
            }
        }
        _ => Err(unsupported()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_tokenizer_shapes() {
        let smollm: Value = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]});
        assert_eq!(
            pre_tokenizer(&smollm).ok(),
            Some(PreTokenizer::DigitsThenGpt2)
        );
        let llama3: Value = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]});
        assert_eq!(pre_tokenizer(&llama3).ok(), Some(PreTokenizer::Llama3));
        let metaspace: Value = serde_json::json!({"type": "Metaspace", "replacement": "▁"});
        assert!(pre_tokenizer(&metaspace).is_err());
    }
}
