//! Prefill and decode throughput of the burn LLaMA at batch 1, 8 and 32, printed as a table.
//!
//! `cargo bench --bench model_throughput` (the bench profile inherits release). Uses
//! SmolLM2-135M-Instruct from ~/.cache/backflow/model when present, random weights of the same
//! shape otherwise (throughput does not depend on the values). Knobs (environment):
//! `BENCH_BATCHES` (default `1,8,32`), `BENCH_PROMPT` prompt tokens (128), `BENCH_NEW` new tokens
//! per sequence (32), `BENCH_MODEL` another GGUF file or HF folder, `BENCH_SHARED` tokens of
//! prefix shared by all prompts of a batch (0; with N > 0 the prefix cache computes it once per
//! batch, as for the rating template), `BENCH_REPEAT` runs per batch size, best of (1),
//! `BENCH_DTYPE` `f32` (default), `f16`, `bf16`, `q8` or `native`: the model's weight format (on
//! flex the half types run without the CPU fast paths, they are there for CUDA, built with
//! `--features cuda`; q8 and native are block formats, CPU only: README "Weight formats").
//! `BENCH_LORA` a rank r > 0: every projection gets a random rank-r LoRA update applied unmerged
//! (what a served adapter version costs over its shared base; `Llama::with_low_rank`).
//! `BENCH_VERSIONS` N >= 2: after the table, a second one for N adapter versions over the model
//! (random rank-`BENCH_LORA` updates, 8 by default), each decoding a batch of the table's sizes:
//! every decode step run per version ("apart", one forward pass each, as the server did before)
//! against all versions in one pass (`Generator::advance_jointly`, as the server steps the
//! versions of one base now), alternating `BENCH_REPEAT` times, best of.
//! `BENCH_SHAPE` `smollm2-135m` or `llama3-8b`: random weights of that shape whatever the cache
//! holds (not with `BENCH_MODEL`; Llama-3-8B in bf16 is the GPU check of README "CUDA").
//! The resident memory with the model loaded is printed too, beside the bytes the model's
//! weights hold (`Llama::weight_bytes`; the rest is the process: binary, allocator, thread
//! stacks, tables), and for the dense formats the
//! weight bytes one decode step reads over its time (`weights GB/s`): against the memory's
//! bandwidth, how far decode is from its roofline.
//!
//! One `generate` call per batch size, timed by the generator itself
//! ([`backflow::model::generate::GenerateTiming`]): prefill is the forward pass over every
//! prompt (batch × prompt tokens, one pass); decode is the `BENCH_NEW - 1` later steps, each one
//! token for every sequence of the batch. The first line is the backend's f32 matmul GFLOP/s on
//! a `[1024,576]x[576,1536]` product, the ceiling the forward pass works against.
//! `BENCH_JSON=1` prints one JSON object per line instead of the table
//! (for `benches/model_vs_llamacpp.py`).

use std::path::PathBuf;
use std::time::Instant;

use backflow::model::config::LlamaConfig;
use backflow::model::device::{backend_name, default_device, DefaultBackend};
use backflow::model::llama::{HostTensor, LayerWeight, LowRank, RandomWeights};
use backflow::model::{load_checkpoint, Generator, Llama, Precision, Request};
use rand::{Rng, SeedableRng};

type B = DefaultBackend;

/// The allocator of the `backflow` binary (see its `main.rs`), so the bench measures what runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let device = default_device();
    let dtype = match std::env::var("BENCH_DTYPE") {
        Ok(v) => match <Precision as clap::ValueEnum>::from_str(&v, true) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("BENCH_DTYPE: {e}");
                std::process::exit(2);
            }
        },
        Err(_) => Precision::F32,
    };
    let shape = match std::env::var("BENCH_SHAPE").as_deref() {
        Err(_) => None,
        Ok("smollm2-135m") => Some(("SmolLM2-135M", LlamaConfig::smollm2_135m())),
        Ok("llama3-8b") => Some(("Llama-3-8B", LlamaConfig::llama3_8b())),
        Ok(other) => {
            eprintln!("BENCH_SHAPE: {other:?} is not smollm2-135m or llama3-8b");
            std::process::exit(2);
        }
    };
    if shape.is_some() && std::env::var_os("BENCH_MODEL").is_some() {
        eprintln!("BENCH_SHAPE and BENCH_MODEL: give one (random weights of a shape, or a model)");
        std::process::exit(2);
    }
    let path = std::env::var_os("BENCH_MODEL")
        .map(PathBuf::from)
        .or_else(|| {
            let p = PathBuf::from(std::env::var_os("HOME")?)
                .join(".cache/backflow/model/SmolLM2-135M-Instruct.Q4_1.gguf");
            (shape.is_none() && p.exists()).then_some(p)
        });
    let (model, what): (Llama<B>, String) = match &path {
        Some(p) => match load_checkpoint::<B>(p, &device, dtype) {
            Ok(ck) => (ck.model, p.display().to_string()),
            Err(e) => {
                eprintln!("cannot load {}: {e}", p.display());
                std::process::exit(1);
            }
        },
        None => {
            let (name, cfg) = shape.unwrap_or(("SmolLM2-135M", LlamaConfig::smollm2_135m()));
            match Llama::load(cfg.clone(), &mut RandomWeights::new(cfg, 0), &device, dtype) {
                Ok(m) => (m, format!("random weights, {name} shape")),
                Err(e) => {
                    eprintln!("cannot build random model: {e}");
                    std::process::exit(1);
                }
            }
        }
    };
    let lora_rank = env_usize("BENCH_LORA", 0);
    let base = model.clone();
    let (model, what) = if lora_rank > 0 {
        match with_random_lora(&model, lora_rank, 1) {
            Ok(m) => (m, format!("{what}, rank-{lora_rank} LoRA unmerged")),
            Err(e) => {
                eprintln!("cannot apply a LoRA update: {e}");
                std::process::exit(1);
            }
        }
    } else {
        (model, what)
    };
    let batches: Vec<usize> = std::env::var("BENCH_BATCHES")
        .unwrap_or_else(|_| "1,8,32".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let prompt_len = env_usize("BENCH_PROMPT", 128).max(1);
    let new_tokens = env_usize("BENCH_NEW", 32).max(2);
    let shared = env_usize("BENCH_SHARED", 0).min(prompt_len - 1);
    let repeat = env_usize("BENCH_REPEAT", 1).max(1);
    let vocab = model.config().vocab as u32;
    // Bytes of weights one decode step reads, for the dense formats (the block formats' size
    // depends on the file's mix of types).
    let weight_bytes = match dtype {
        Precision::F32 => Some(4),
        Precision::F16 | Precision::Bf16 => Some(2),
        Precision::Q8 | Precision::Native => None,
    }
    .map(|b: usize| (b * model.config().weights_read_per_step()) as f64);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());

    let json = std::env::var("BENCH_JSON").is_ok_and(|v| !v.is_empty() && v != "0");
    // Resident memory with the model loaded (before the matmul probe allocates anything).
    let rss_loaded = proc_status_mb("VmRSS");
    // The model's own share of it (the base's weights, whatever their format).
    let weights_mb = base.weight_bytes() as f64 / (1024.0 * 1024.0);
    let gflops = matmul_gflops(&device);
    if json {
        println!(
            "{}",
            serde_json::json!({"kind": "setup", "model": what, "backend": backend_name(),
                "threads": threads, "dtype": dtype.as_str(), "prompt": prompt_len, "shared": shared, "new": new_tokens,
                "matmul": "[1024,576]x[576,1536]", "matmul_gflops": gflops, "rss_loaded_mb": rss_loaded,
                "weights_mb": weights_mb})
        );
    } else {
        println!(
            "model: {what} ({dtype})\nbackend: {}, {threads} threads; prompt {prompt_len} tokens ({shared} shared), {new_tokens} new tokens\nf32 matmul [1024,576]x[576,1536]: {gflops:.1} GFLOP/s\nresident memory with the model loaded: {} MB (the model's weights {weights_mb:.0} MB)",
            backend_name(),
            rss_loaded.map_or("?".into(), |m| format!("{m:.0}")),
        );
        println!(
            "| batch | prefill tok/s | prefill s | decode tok/s | decode ms/step | weights GB/s |\n|------:|--------------:|----------:|-------------:|---------------:|-------------:|"
        );
    }
    let mut gen = Generator::new(model, Vec::new());
    gen.min_shared_prefix = if shared > 0 { 1 } else { usize::MAX };
    gen.max_batch = batches.iter().copied().max().unwrap_or(1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // Warm-up: first-touch allocations and thread-pool start-up.
    if let Err(e) = gen.generate(&[Request::greedy(vec![1, 2, 3], 4)]) {
        eprintln!("warm-up failed: {e}");
        std::process::exit(1);
    }
    for &b in &batches {
        let common: Vec<u32> = (0..shared).map(|_| rng.random_range(3..vocab)).collect();
        let requests: Vec<Request> = (0..b)
            .map(|_| {
                let mut p = common.clone();
                p.extend((shared..prompt_len).map(|_| rng.random_range(3..vocab)));
                Request::greedy(p, new_tokens)
            })
            .collect();
        let (mut prefill_s, mut decode_s, mut t) = (f64::INFINITY, f64::INFINITY, None);
        for _ in 0..repeat {
            // Every batch computes its shared prefix (if any) itself, as a fresh rating batch
            // would.
            gen.clear_prefix();
            match gen.generate(&requests) {
                Ok(c) if c.iter().all(|c| c.ids.len() == new_tokens) => {}
                Ok(_) => eprintln!("warning: some sequence stopped early"),
                Err(e) => {
                    eprintln!("generate failed: {e}");
                    std::process::exit(1);
                }
            }
            let run = gen.last_timing();
            // Best of the runs, phase by phase: the machine is shared, noise only slows.
            prefill_s = prefill_s.min(run.prefill_s);
            decode_s = decode_s.min(run.decode_s);
            t = Some(run);
        }
        let Some(t) = t else { continue };
        // Prefill counts every prompt token, the shared ones included, as llama.cpp's does.
        let prefill_tps = (b * prompt_len) as f64 / prefill_s.max(1e-9);
        let decode_tps = t.decode_tokens as f64 / decode_s.max(1e-9);
        let ms_step = decode_s * 1000.0 / t.decode_steps.max(1) as f64;
        let weights_gb_s = weight_bytes.map(|w| w / (ms_step / 1000.0).max(1e-12) / 1e9);
        if json {
            println!(
                "{}",
                serde_json::json!({"kind": "row", "batch": b, "prefill_tok_s": prefill_tps,
                    "prefill_s": prefill_s, "decode_tok_s": decode_tps, "decode_ms_step": ms_step,
                    "weights_gb_s": weights_gb_s, "peak_rss_mb": proc_status_mb("VmHWM")})
            );
        } else {
            println!(
                "| {b:>5} | {prefill_tps:>13.1} | {prefill_s:>9.2} | {decode_tps:>12.1} | {ms_step:>14.1} | {:>12} |",
                weights_gb_s.map_or("-".into(), |g| format!("{g:.0}"))
            );
        }
    }
    let versions = env_usize("BENCH_VERSIONS", 1);
    if versions >= 2 {
        let rank = if lora_rank > 0 { lora_rank } else { 8 };
        let shape = (prompt_len, new_tokens, repeat, json);
        if let Err(e) = versions_table(&base, versions, rank, &batches, shape) {
            eprintln!("versions bench failed: {e}");
            std::process::exit(1);
        }
    }
}

/// Decode tokens/s of `n` adapter versions over `base`, each with a batch of `b` rows (for `b`
/// in `batches`): each step's forward pass per version ("apart") and one for all
/// ("jointly"), alternating, best of `repeat`.
fn versions_table(
    base: &Llama<B>,
    n: usize,
    rank: usize,
    batches: &[usize],
    (prompt_len, new_tokens, repeat, json): (usize, usize, usize, bool),
) -> Result<(), backflow::model::ModelError> {
    let mut gens = Vec::with_capacity(n);
    for v in 0..n {
        let mut g = Generator::new(with_random_lora(base, rank, 1 + v as u64)?, Vec::new());
        g.min_shared_prefix = usize::MAX;
        g.max_batch = batches.iter().copied().max().unwrap_or(1);
        gens.push(g);
    }
    if !json {
        println!(
            "\n{n} rank-{rank} adapter versions over the model, decode, each version a batch of `rows`:\n| rows each | apart tok/s | jointly tok/s | jointly / apart |\n|----------:|------------:|--------------:|----------------:|"
        );
    }
    let vocab = base.config().vocab as u32;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for &b in batches {
        let requests: Vec<Vec<(u64, Request)>> = (0..n)
            .map(|_| {
                (0..b as u64)
                    .map(|k| {
                        let p = (0..prompt_len)
                            .map(|_| rng.random_range(3..vocab))
                            .collect();
                        (k, Request::greedy(p, new_tokens))
                    })
                    .collect()
            })
            .collect();
        let (mut apart, mut jointly) = (f64::INFINITY, f64::INFINITY);
        let mut tokens = 0;
        for _ in 0..repeat {
            for joint in [false, true] {
                let mut running = Vec::with_capacity(n);
                for (g, r) in gens.iter_mut().zip(&requests) {
                    let (batch, _) = g.start(r.clone())?;
                    running.extend(batch);
                }
                let (t0, mut made) = (Instant::now(), 0);
                while running.iter().any(|b| !b.is_empty()) {
                    for (g, batch) in gens.iter_mut().zip(running.iter_mut()) {
                        g.pick(batch, &mut |_, _| made += 1)?;
                    }
                    if joint {
                        let mut pairs: Vec<_> = (gens.iter_mut())
                            .zip(running.iter_mut())
                            .map(|(g, b)| (g, vec![b]))
                            .collect();
                        Generator::advance_jointly(&mut pairs)?;
                    } else {
                        for (g, batch) in gens.iter_mut().zip(running.iter_mut()) {
                            g.advance(batch)?;
                        }
                    }
                }
                let s = t0.elapsed().as_secs_f64();
                tokens = made;
                if joint {
                    jointly = jointly.min(s);
                } else {
                    apart = apart.min(s);
                }
            }
        }
        let (apart_tps, joint_tps) = (tokens as f64 / apart, tokens as f64 / jointly);
        if json {
            println!(
                "{}",
                serde_json::json!({"kind": "versions", "versions": n, "rank": rank, "rows_each": b,
                    "apart_tok_s": apart_tps, "jointly_tok_s": joint_tps})
            );
        } else {
            println!(
                "| {b:>9} | {apart_tps:>11.1} | {joint_tps:>13.1} | {:>15.2} |",
                joint_tps / apart_tps
            );
        }
    }
    Ok(())
}

/// A `/proc/self/status` figure (`VmRSS`, `VmHWM`) in MB; `None` off Linux.
fn proc_status_mb(key: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// f32 matmul throughput of the backend on one of the model's shapes (the MLP's gate/up
/// projection of 1024 tokens), in GFLOP/s: the ceiling the forward pass works against.
fn matmul_gflops(device: &burn::tensor::Device<B>) -> f64 {
    use burn::tensor::{Distribution, Tensor};
    let (m, k, n) = (1024usize, 576usize, 1536usize);
    let a = Tensor::<B, 2>::random([m, k], Distribution::Default, device);
    let w = Tensor::<B, 2>::random([k, n], Distribution::Default, device);
    // Warm-up, then enough repetitions for about a second.
    let _ = a.clone().matmul(w.clone()).into_data();
    let reps = 20;
    let t = Instant::now();
    for _ in 0..reps {
        let _ = a.clone().matmul(w.clone()).into_data();
    }
    2.0 * (m * k * n * reps) as f64 / t.elapsed().as_secs_f64() / 1e9
}

/// `model` with a random rank-`r` update on every projection, applied unmerged.
fn with_random_lora(
    model: &Llama<B>,
    r: usize,
    seed: u64,
) -> Result<Llama<B>, backflow::model::ModelError> {
    let c = model.config();
    let (qd, kd) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
    let roles = [
        (LayerWeight::Q, qd, c.hidden),
        (LayerWeight::K, kd, c.hidden),
        (LayerWeight::V, kd, c.hidden),
        (LayerWeight::O, c.hidden, qd),
        (LayerWeight::Gate, c.ffn, c.hidden),
        (LayerWeight::Up, c.ffn, c.hidden),
        (LayerWeight::Down, c.hidden, c.ffn),
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut random = |rows: usize, cols: usize| HostTensor {
        data: (0..rows * cols)
            .map(|_| rng.random_range(-0.02..0.02))
            .collect(),
        shape: vec![rows, cols],
    };
    let updates: Vec<Vec<(LayerWeight, HostTensor, HostTensor)>> = (0..c.n_layers)
        .map(|_| {
            let per_role = roles.iter();
            per_role
                .map(|&(role, out, inp)| (role, random(r, inp), random(out, r)))
                .collect()
        })
        .collect();
    model.with_low_rank(|layer, role| {
        let (_, a, b) = updates.get(layer)?.iter().find(|u| u.0 == role)?;
        Some(LowRank { a, b, scale: 2.0 })
    })
}
