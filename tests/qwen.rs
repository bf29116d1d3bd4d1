//! The real Qwen2.5-Coder 0.5B and 1.5B Instruct GGUFs (Q4_K_M mixes: Q5_0, Q4_K, Q6_K, Q8_0,
//! F32; the Qwen2 architecture: q/k/v biases, NEOX RoPE) against llama.cpp on the same files
//! (tests/reference/qwen_llamacpp_ref.py): the prompt ids of llama.cpp's tokenizer in the chat
//! template, the next-token logits and the greedy continuation.
//!
//! These models are fetched only on request (`scripts/fetch-assets.sh qwen05 qwen15`), never by
//! default: a model not fetched is skipped, even in CI (and the whole check when the reference
//! has not been written).

use backflow::model::chat::{ChatTemplate, Message};
use backflow::model::tokenizer::Tokenizer;
mod common;
use backflow::model::{load_checkpoint, Generator, Precision, Request, TokenizerSource};
use burn::backend::Flex;
use common::{floats, ids as id_list};
use serde_json::Value;
use std::path::PathBuf;

/// Largest |backflow − llama.cpp| allowed on a top-20 logit (logits span ~±30). llama.cpp
/// multiplies the quantized weights by activations rounded to 8 bits per block (Q8_K / Q8_0)
/// where backflow multiplies the dequantized weights in f32: measured worst 0.24 (1.5B,
/// "france"), 0.19 on the 0.5B (2026-11-29).
const LOGIT_TOL: f64 = 0.5;

fn model(name: &str) -> Option<PathBuf> {
    let p = common::cache_dir().join("model").join(name);
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "skipped: {} not fetched (scripts/fetch-assets.sh qwen05 qwen15)",
            p.display()
        );
        None
    }
}

#[test]
fn qwen_models_match_llamacpp() {
    // Written by qwen_llamacpp_ref.py where llama.cpp runs; read at run time so the test builds
    // before it exists.
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/qwen_llamacpp.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        eprintln!(
            "skipped: {} not written yet (tests/reference/qwen_llamacpp_ref.py)",
            path.display()
        );
        return;
    };
    let reference: Value = serde_json::from_str(&text).expect("json");
    let models = reference["models"].as_object().expect("models");
    assert!(!models.is_empty(), "the reference has no model");
    // f32, and the CPU default (`native`: these Q4_K_M files' Q4_K and Q5_0 matrices on the 4-
    // and 5-bit kernels as the file holds them, Q6_K and Q8_0 requantized to 8-bit blocks).
    let runs = models
        .iter()
        .flat_map(|m| [Precision::F32, Precision::Native].map(|p| (m, p)));
    for ((name, r), precision) in runs {
        let Some(path) = model(name) else { continue };
        let ck = load_checkpoint::<Flex>(&path, &Default::default(), precision)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let name = &format!("{name} {precision}");
        let tokenizer = match &ck.tokenizer {
            TokenizerSource::Gguf(meta) => Tokenizer::from_gguf_metadata(meta).expect("tokenizer"),
            _ => panic!("{name}: no GGUF tokenizer"),
        };
        let template = ChatTemplate::for_tokenizer(&tokenizer).expect("template");
        let mut gen = Generator::new(ck.model, ck.stop_ids.clone());
        let mut worst = 0f64;
        for p in r["prompts"].as_array().expect("prompts") {
            let ids = id_list(&p["ids"]);
            let question = match p["name"].as_str() {
                Some("france") => Some("What is the capital of France?"),
                _ => None,
            };
            // backflow's own tokenizer and template give llama.cpp's ids (the system prompt is
            // the template's default when none is given).
            if let Some(q) = question {
                let ours = template.encode(&tokenizer, &[Message::user(q)], true);
                assert_eq!(ours, ids, "{name}: prompt ids");
            }
            let logits = gen
                .next_token_logits(std::slice::from_ref(&ids))
                .expect("logits");
            let row = &logits[0];
            let top: Vec<usize> = id_list(&p["top20_ids"])
                .into_iter()
                .map(|i| i as usize)
                .collect();
            let want = floats(&p["top20_values"]);
            let diff = top
                .iter()
                .zip(&want)
                .map(|(&i, w)| (row[i] as f64 - w).abs())
                .fold(0f64, f64::max);
            worst = worst.max(diff);
            let argmax = row
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i)
                .expect("argmax");
            assert_eq!(argmax, top[0], "{name} {}: argmax", p["name"]);
            let greedy = id_list(&p["greedy_ids"]);
            let out = gen
                .generate(&[Request::greedy(ids, greedy.len())])
                .expect("generate");
            // llama.cpp's list ends with the stop token where it stopped; ours leaves it out.
            let want_ids: Vec<u32> = greedy
                .iter()
                .copied()
                .take_while(|t| !ck.stop_ids.contains(t))
                .collect();
            assert_eq!(
                out[0].ids,
                want_ids,
                "{name} {}: greedy text {:?} vs llama.cpp's {:?}",
                p["name"],
                tokenizer.decode(&out[0].ids),
                p["greedy_text"]
            );
            eprintln!("{name} {}: max |logit diff| {diff:.3}", p["name"]);
        }
        assert!(worst <= LOGIT_TOL, "{name}: worst logit difference {worst}");
    }
}
