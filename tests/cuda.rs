//! The model on CUDA against the model on flex (the CPU backend, itself checked against the
//! numpy reference in tests/model.rs): random weights of SmolLM2-135M's shape (a real checkpoint
//! does not travel to the GPU machine), f32, f16 and bf16, prompts of different lengths in one
//! batch, the shared-prefix cache. Built only with `--features cuda`; run on a GPU with
//! `scripts/gpu-check.sh` (`build` here, then `run` on the GPU machine).

#![cfg(feature = "cuda")]

use backflow::model::config::LlamaConfig;
use backflow::model::llama::RandomWeights;
use backflow::model::{Generator, Llama, Precision};
use burn::backend::{Cuda, Flex};
use burn::tensor::backend::Backend;

/// Prompts of 1 to 200 tokens; the first three share a 40-token prefix.
fn prompts() -> Vec<Vec<u32>> {
    let tok = |i: usize| (i * 7919 % 49000) as u32 + 10;
    let shared: Vec<u32> = (0..40).map(tok).collect();
    let mut out = Vec::new();
    for extra in [3usize, 17, 60] {
        let mut p = shared.clone();
        p.extend((100..100 + extra).map(tok));
        out.push(p);
    }
    out.push(vec![tok(5)]);
    out.push((300..500).map(tok).collect());
    out
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0f32, f32::max)
}

/// The same random weights (seed 7) on backend `B` in `precision`.
fn model<B: Backend>(precision: Precision) -> Llama<B> {
    let cfg = LlamaConfig::smollm2_135m();
    Llama::load(
        cfg.clone(),
        &mut RandomWeights::new(cfg, 7),
        &Default::default(),
        precision,
    )
    .expect("random model")
}

/// Next-token logits on CUDA agree with flex, batched and from the prefix cache: f32 within
/// 5e-3 of the logits' spread, f16 and bf16 within their precision. cubecl's matmul runs f32 on
/// the tensor cores as TF32 (cubek-matmul 0.2's `adjust_dtypes` stages f32 operands as `tf32`
/// wherever the device has it), whose inputs keep 10 bits of mantissa (f16's): on an H200
/// (2026-12-04) the f32 logits were 1.1e-3 of the spread from flex's, over a 1e-3 bound set
/// before any GPU run. A wrong mask, RoPE or cache slot moves them by the spread itself.
/// (Greedy tokens are not compared: random weights give near-uniform logits whose top two
/// can sit closer than f32 rounding.)
#[test]
fn cuda_agrees_with_flex() {
    let prompts = prompts();
    let mut cpu = Generator::new(model::<Flex>(Precision::F32), vec![]);
    let want = cpu.next_token_logits(&prompts).expect("flex logits");
    let spread = want
        .iter()
        .flatten()
        .fold(0f32, |m, &x| m.max(x.abs()))
        .max(1e-3);
    for (precision, rel_tol) in [
        (Precision::F32, 5e-3),
        (Precision::F16, 2e-2),
        (Precision::Bf16, 4e-2),
    ] {
        let mut gpu = Generator::new(model::<Cuda>(precision), vec![]);
        let got = gpu.next_token_logits(&prompts).expect("cuda logits");
        let diff = max_diff(&want, &got);
        eprintln!("{precision}: max |cuda - flex| {diff:.3e} on logits up to {spread:.3}");
        assert!(
            diff <= rel_tol * spread,
            "{precision}: {diff} > {rel_tol} x {spread}"
        );
        // Prefix cache on CUDA: the same logits with the shared 40 tokens computed once.
        gpu.cache_prefix(&prompts[0][..40]).expect("prefix");
        let cached = gpu.next_token_logits(&prompts[..3]).expect("cached logits");
        let diff = max_diff(&want[..3], &cached);
        assert!(diff <= rel_tol * spread, "{precision} prefix: {diff}");
    }
}
