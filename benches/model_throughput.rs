//! Prefill and decode throughput of the burn LLaMA at batch 1, 8 and 32, printed as a table.
//!
//! `cargo bench --bench model_throughput` (the bench profile inherits release). Uses
//! SmolLM2-135M-Instruct from ~/.cache/backflow/model when present, random weights of the same
//! shape otherwise (throughput does not depend on the values). Knobs (environment):
//! `BENCH_BATCHES` (default `1,8,32`), `BENCH_PROMPT` prompt tokens (128), `BENCH_NEW` new tokens
//! per sequence (32), `BENCH_MODEL` another GGUF file or HF folder, `BENCH_SHARED` tokens of
//! prefix shared by all prompts of a batch (0; with N > 0 the prefix cache computes it once per
//! batch, as for the rating template).
//!
//! Prefill: every prompt in one forward pass, distinct prompts (no shared prefix).
//! Decode: `generate` of `BENCH_NEW` tokens with no stop token, minus the prefill time, over the
//! `BENCH_NEW - 1` decode steps; tokens/s counts every sequence of the batch.

use std::path::PathBuf;
use std::time::Instant;

use backflow::model::config::{Architecture, LlamaConfig};
use backflow::model::device::{backend_name, default_device, DefaultBackend};
use backflow::model::llama::RandomWeights;
use backflow::model::{load_checkpoint, Generator, Llama, Request};
use rand::{Rng, SeedableRng};

type B = DefaultBackend;

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn smollm2_shape() -> LlamaConfig {
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

fn main() {
    let device = default_device();
    let path = std::env::var_os("BENCH_MODEL")
        .map(PathBuf::from)
        .or_else(|| {
            let p = PathBuf::from(std::env::var_os("HOME")?)
                .join(".cache/backflow/model/SmolLM2-135M-Instruct.Q4_1.gguf");
            p.exists().then_some(p)
        });
    let (model, what): (Llama<B>, String) = match &path {
        Some(p) => match load_checkpoint::<B>(p, &device) {
            Ok(ck) => (ck.model, p.display().to_string()),
            Err(e) => {
                eprintln!("cannot load {}: {e}", p.display());
                std::process::exit(1);
            }
        },
        None => {
            let cfg = smollm2_shape();
            match Llama::load(cfg.clone(), &mut RandomWeights::new(cfg, 0), &device) {
                Ok(m) => (m, "random weights, SmolLM2-135M shape".into()),
                Err(e) => {
                    eprintln!("cannot build random model: {e}");
                    std::process::exit(1);
                }
            }
        }
    };
    let batches: Vec<usize> = std::env::var("BENCH_BATCHES")
        .unwrap_or_else(|_| "1,8,32".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let prompt_len = env_usize("BENCH_PROMPT", 128).max(1);
    let new_tokens = env_usize("BENCH_NEW", 32).max(2);
    let shared = env_usize("BENCH_SHARED", 0).min(prompt_len - 1);
    let vocab = model.config().vocab as u32;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());

    println!(
        "model: {what}\nbackend: {}, {threads} threads; prompt {prompt_len} tokens ({shared} shared), {new_tokens} new tokens",
        backend_name()
    );
    println!(
        "| batch | prefill tok/s | prefill s | decode tok/s | decode ms/step |\n|------:|--------------:|----------:|-------------:|---------------:|"
    );
    let mut gen = Generator::new(model, Vec::new());
    gen.min_shared_prefix = if shared > 0 { 1 } else { usize::MAX };
    gen.max_batch = batches.iter().copied().max().unwrap_or(1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // Warm-up: first-touch allocations and thread-pool start-up.
    if let Err(e) = gen.next_token_logits(&[vec![1, 2, 3]]) {
        eprintln!("warm-up failed: {e}");
        std::process::exit(1);
    }
    for &b in &batches {
        let common: Vec<u32> = (0..shared).map(|_| rng.random_range(3..vocab)).collect();
        let prompts: Vec<Vec<u32>> = (0..b)
            .map(|_| {
                let mut p = common.clone();
                p.extend((shared..prompt_len).map(|_| rng.random_range(3..vocab)));
                p
            })
            .collect();
        gen.clear_prefix();
        let t = Instant::now();
        if let Err(e) = gen.next_token_logits(&prompts) {
            eprintln!("prefill failed: {e}");
            std::process::exit(1);
        }
        let prefill = t.elapsed().as_secs_f64();
        let requests: Vec<Request> = prompts
            .iter()
            .map(|p| Request::greedy(p.clone(), new_tokens))
            .collect();
        // Same start as the prefill measurement: the shared prefix is computed again.
        gen.clear_prefix();
        let t = Instant::now();
        match gen.generate(&requests) {
            Ok(c) if c.iter().all(|c| c.ids.len() == new_tokens) => {}
            Ok(_) => eprintln!("warning: some sequence stopped early"),
            Err(e) => {
                eprintln!("generate failed: {e}");
                std::process::exit(1);
            }
        }
        let total = t.elapsed().as_secs_f64();
        let decode = (total - prefill).max(1e-9);
        let steps = (new_tokens - 1) as f64;
        println!(
            "| {b:>5} | {:>13.1} | {prefill:>9.2} | {:>12.1} | {:>14.1} |",
            (b * prompt_len) as f64 / prefill,
            b as f64 * steps / decode,
            decode * 1000.0 / steps
        );
    }
}
