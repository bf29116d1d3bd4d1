//! The tokenizer and chat templates against independent references:
//!
//! - llama.cpp's own tokenizer test vectors (`ggml-vocab-*.gguf` with `.inp`/`.out`, from
//!   `scripts/fetch-assets.sh tokvec`): GPT-2, the smollm-style digit splitting (refact,
//!   starcoder), Llama 3, Qwen2 and the Llama SentencePiece vocabulary;
//! - SmolLM2-135M-Instruct's own vocabulary run through Hugging Face `tokenizers` and its chat
//!   template through `jinja2` (`tests/reference/smollm2_tokens.json`, written by
//!   `tests/reference/tokenizer_ref.py`).
//!
//! Tests whose cached assets are missing print why and pass.

use std::path::{Path, PathBuf};

use backflow::model::chat::{ChatFormat, ChatTemplate, Message};
use backflow::model::gguf::GgufFile;
use backflow::model::tokenizer::{StreamDecoder, Tokenizer};
use serde_json::Value;

fn cache() -> PathBuf {
    std::env::var_os("BACKFLOW_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/backflow")
        })
}

fn smollm2_gguf() -> Option<PathBuf> {
    let p = cache().join("model/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        Some(p)
    } else {
        println!(
            "skipped: {} is absent (scripts/fetch-assets.sh model)",
            p.display()
        );
        None
    }
}

fn load_gguf_tokenizer(path: &Path) -> Tokenizer {
    let file = GgufFile::open(path).expect("open GGUF");
    let meta = file.tokenizer_meta().expect("tokenizer metadata");
    Tokenizer::from_gguf_metadata(&meta).expect("build tokenizer")
}

fn reference() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/smollm2_tokens.json");
    let text = std::fs::read_to_string(&path).expect("checked-in reference file");
    serde_json::from_str(&text).expect("reference JSON")
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// llama.cpp's test-tokenizer-0 input format: cases separated by `\n__ggml_vocab_test__\n`,
/// one line of ids per case in the `.out` file.
fn read_vectors(gguf: &Path) -> Vec<(String, Vec<u32>)> {
    let inp = std::fs::read_to_string(gguf.with_extension("gguf.inp")).expect(".inp");
    let out = std::fs::read_to_string(gguf.with_extension("gguf.out")).expect(".out");
    let sep = "\n__ggml_vocab_test__\n";
    let mut texts = Vec::new();
    let mut pos = 0;
    while pos < inp.len() {
        match inp[pos..].find(sep) {
            Some(i) => {
                texts.push(inp[pos..pos + i].to_string());
                pos += i + sep.len();
            }
            None => {
                texts.push(inp[pos..].to_string());
                break;
            }
        }
    }
    let ids: Vec<Vec<u32>> = out
        .lines()
        .map(|l| {
            l.split_whitespace()
                .map(|t| t.parse().expect("id"))
                .collect()
        })
        .collect();
    assert_eq!(
        texts.len(),
        ids.len(),
        "{}: cases and answers",
        gguf.display()
    );
    texts.into_iter().zip(ids).collect()
}

fn check_llama_cpp_vectors(name: &str, round_trip: bool) {
    let path = cache().join(format!("tokvec/ggml-vocab-{name}.gguf"));
    if !path.exists() {
        println!(
            "skipped: {} is absent (scripts/fetch-assets.sh tokvec)",
            path.display()
        );
        return;
    }
    let tok = load_gguf_tokenizer(&path);
    let cases = read_vectors(&path);
    let mut failures = Vec::new();
    for (text, want) in &cases {
        let got = tok.encode(text, false);
        if &got != want {
            failures.push(format!("{text:?}\n   want {want:?}\n    got {got:?}"));
        }
        if round_trip && tok.decode(&got) != *text {
            failures.push(format!("{text:?} decodes to {:?}", tok.decode(&got)));
        }
    }
    assert!(
        failures.is_empty(),
        "{name}: {} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    println!("{name}: {} llama.cpp cases match", cases.len());
}

#[test]
fn llama_cpp_vectors_gpt2() {
    check_llama_cpp_vectors("gpt-2", true);
}

#[test]
fn llama_cpp_vectors_refact_digits_then_gpt2() {
    // refact's pre-tokenizer is llama.cpp's smollm one: digits alone, then the GPT-2 regex.
    check_llama_cpp_vectors("refact", true);
}

#[test]
fn llama_cpp_vectors_starcoder() {
    check_llama_cpp_vectors("starcoder", true);
}

#[test]
fn llama_cpp_vectors_llama3() {
    check_llama_cpp_vectors("llama-bpe", true);
}

#[test]
fn llama_cpp_vectors_qwen2() {
    check_llama_cpp_vectors("qwen2", true);
}

#[test]
fn llama_cpp_vectors_llama_spm() {
    check_llama_cpp_vectors("llama-spm", true);
}

fn check_smollm2_cases(tok: &Tokenizer, origin: &str) {
    let reference = reference();
    let cases = reference["cases"].as_array().expect("cases");
    assert!(cases.len() >= 20);
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let plain = tok.encode(text, false);
        assert_eq!(plain, ids_of(&case["ids"]), "{origin}: {text:?}");
        let special = tok.encode(text, true);
        assert_eq!(
            special,
            ids_of(&case["ids_parse_special"]),
            "{origin}, parse_special: {text:?}"
        );
        assert_eq!(tok.decode(&plain), text, "{origin}: round trip");
        assert_eq!(
            tok.decode(&special),
            text,
            "{origin}: round trip (specials)"
        );
    }
}

#[test]
fn smollm2_gguf_matches_hf_tokenizers() {
    let Some(path) = smollm2_gguf() else { return };
    let tok = load_gguf_tokenizer(&path);
    assert_eq!(
        tok.vocab_size(),
        reference()["vocab_size"].as_u64().unwrap() as usize
    );
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    check_smollm2_cases(&tok, "gguf");
}

#[test]
fn smollm2_tokenizer_json_matches_hf_tokenizers() {
    let path = cache().join("tokvec/smollm2/tokenizer.json");
    if !path.exists() {
        println!(
            "skipped: {} is absent (run tests/reference/tokenizer_ref.py)",
            path.display()
        );
        return;
    }
    let tok = Tokenizer::from_tokenizer_json(&path).expect("tokenizer.json");
    assert_eq!(tok.eos_id(), Some(2));
    check_smollm2_cases(&tok, "tokenizer.json");
    let tmpl = ChatTemplate::for_tokenizer(&tok).expect("chat template");
    assert_eq!(tmpl.format(), ChatFormat::ChatMl);
}

#[test]
fn smollm2_chat_template_matches_jinja() {
    let Some(path) = smollm2_gguf() else { return };
    let tok = load_gguf_tokenizer(&path);
    let tmpl = ChatTemplate::for_tokenizer(&tok).expect("chat template");
    assert_eq!(tmpl.format(), ChatFormat::ChatMl);
    assert_eq!(
        tmpl.default_system(),
        Some("You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    );
    let reference = reference();
    for chat in reference["chats"].as_array().expect("chats") {
        let messages: Vec<Message> =
            serde_json::from_value(chat["messages"].clone()).expect("messages");
        let gen = chat["add_generation_prompt"].as_bool().expect("flag");
        assert_eq!(
            tmpl.render(&messages, gen),
            chat["rendered"].as_str().expect("rendered")
        );
        assert_eq!(tmpl.encode(&tok, &messages, gen), ids_of(&chat["ids"]));
    }
    // <|im_end|> ends a turn; <|endoftext|> (id 0) is SmolLM2's EOS.
    assert_eq!(tmpl.stop_tokens(&tok), [0, 2]);
}

#[test]
fn stream_decoding_equals_whole_decoding() {
    let Some(path) = smollm2_gguf() else { return };
    let tok = load_gguf_tokenizer(&path);
    for case in reference()["cases"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        let ids = tok.encode(text, true);
        let mut dec = StreamDecoder::new();
        let mut streamed = String::new();
        for &id in &ids {
            let piece = dec.push(&tok, id);
            // Nothing half-decoded ever comes out.
            assert!(!piece.contains('\u{FFFD}'), "{text:?}");
            streamed.push_str(&piece);
        }
        streamed.push_str(&dec.finish());
        assert_eq!(streamed, text);
    }
}

/// A tokenizer written back as GGUF metadata (what `backflow export --format gguf` stores) is
/// the file's own metadata: every vocabulary of llama.cpp's test set and SmolLM2's, field by
/// field, and rebuilt from it the tokenizer still passes llama.cpp's test vectors.
#[test]
fn gguf_metadata_written_back_is_the_files_own() {
    use backflow::model::tokenizer::{PreTokenizer, TokenKind};
    let mut paths: Vec<PathBuf> = [
        "gpt-2",
        "refact",
        "starcoder",
        "llama-bpe",
        "qwen2",
        "llama-spm",
    ]
    .iter()
    .map(|n| cache().join(format!("tokvec/ggml-vocab-{n}.gguf")))
    .collect();
    paths.extend(smollm2_gguf());
    let mut checked = 0;
    for path in paths.iter().filter(|p| p.exists()) {
        let name = path.file_name().expect("name").to_string_lossy();
        let meta = GgufFile::open(path)
            .expect("open")
            .tokenizer_meta()
            .expect("meta");
        let tok = Tokenizer::from_gguf_metadata(&meta).expect("tokenizer");
        let back = tok.gguf_metadata();
        assert_eq!(back.model, meta.model, "{name}");
        let pre = |p: &Option<String>| p.as_deref().and_then(PreTokenizer::from_gguf_name);
        if meta.model == "gpt2" {
            assert_eq!(pre(&back.pre), pre(&meta.pre), "{name}: pre-tokenizer");
        }
        assert_eq!(back.tokens, meta.tokens, "{name}: tokens");
        let kinds = |t: &[i32]| {
            t.iter()
                .map(|&c| TokenKind::from_gguf(c))
                .collect::<Vec<_>>()
        };
        assert_eq!(kinds(&back.token_types), kinds(&meta.token_types), "{name}");
        assert_eq!(back.merges, meta.merges, "{name}: merges");
        assert_eq!(back.scores, meta.scores, "{name}: scores");
        assert_eq!(
            (
                back.bos_id,
                back.eos_id,
                back.pad_id,
                back.unk_id,
                back.add_bos
            ),
            (
                meta.bos_id,
                meta.eos_id,
                meta.pad_id,
                meta.unk_id,
                meta.add_bos
            ),
            "{name}: special ids"
        );
        assert_eq!(back.chat_template, meta.chat_template, "{name}");
        if path.with_extension("gguf.inp").exists() {
            let again = Tokenizer::from_gguf_metadata(&back).expect("rebuilt");
            for (text, want) in read_vectors(path) {
                assert_eq!(again.encode(&text, false), want, "{name}: {text:?}");
            }
        }
        checked += 1;
    }
    if checked == 0 {
        println!("skipped: no vocabulary cached (scripts/fetch-assets.sh tokvec model)");
    }
}
