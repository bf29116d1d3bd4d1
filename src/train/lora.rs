//! LoRA (Hu et al., 2021) on a linear projection: `y = x·Wᵀ + (α/r)·dropout(x)·Aᵀ·Bᵀ`.
//!
//! The base weight stays frozen (a [`Param`] without gradient); `A` (`[r, in]`, Kaiming-uniform)
//! and `B` (`[out, r]`, zeros, so training starts from the base model exactly) are trained.
//! Shapes and names follow PEFT, so adapters export as `lora_A.weight` / `lora_B.weight` as they
//! are. [`Linear::merged_weight`] folds the adapter into the weight for inference.

use burn::module::{Module, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use std::sync::Arc;

use crate::model::quant::QuantWeight;

/// LoRA hyper-parameters.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    /// Rank `r` of the update.
    pub rank: usize,
    /// `lora_alpha`: the update is scaled by `alpha / rank`.
    pub alpha: f64,
    /// Dropout probability on the adapter's input (training only).
    pub dropout: f64,
    /// The projections that get an adapter (PEFT names: `q_proj`, ..., `down_proj`).
    pub target_modules: Vec<String>,
}

impl LoraConfig {
    /// All seven projections of attention and MLP, `alpha = 2·rank`, dropout 0.05: the common
    /// QLoRA-style recipe (alpha/r = 2 keeps the update scale independent of the rank choice).
    pub fn all_projections(rank: usize) -> Self {
        LoraConfig {
            rank,
            alpha: 2.0 * rank as f64,
            dropout: 0.05,
            target_modules: PROJECTIONS.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank.max(1) as f64
    }

    /// Whether `module` (a PEFT projection name) gets an adapter.
    pub fn targets(&self, module: &str) -> bool {
        self.target_modules.iter().any(|m| m == module)
    }
}

/// The PEFT names of the seven LLaMA projections.
pub const PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// A trainable low-rank update.
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    /// `[r, in]`
    pub a: Param<Tensor<B, 2>>,
    /// `[out, r]`
    pub b: Param<Tensor<B, 2>>,
    /// `alpha / r`.
    pub scale: f64,
    /// Dropout probability on the input.
    pub dropout: f64,
}

/// A linear projection, HF layout `[out, in]` for the weight, with an optional bias and an
/// optional LoRA adapter. The base weight is either an f32 [`Param`] (frozen under LoRA, trained
/// in full finetuning) or, for LoRA over a quantized base as QLoRA does (Dettmers et al. 2023),
/// the frozen weight kept as blocks and dequantized for each product: the model then holds the
/// blocks, and f32 copies live only while one block's forward and backward need them.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// `[out, in]` in f32; `None` when the base is kept as [`Linear::blocks`].
    pub weight: Option<Param<Tensor<B, 2>>>,
    /// The frozen base `[out, in]` as blocks (`--base-dtype native|q8`); never trained.
    #[module(skip)]
    pub blocks: Option<Arc<QuantWeight>>,
    /// `[out]` (Qwen2 q/k/v).
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// The adapter, when LoRA targets this projection.
    pub lora: Option<LoraAdapter<B>>,
}

/// A weight held as an f32 param or as frozen blocks, in f32 on `device` (the blocks
/// dequantized: a constant, no gradient reaches it). Every constructor of the two holders sets
/// one of the two.
pub(super) fn param_or_blocks<B: Backend>(
    dense: Option<&Param<Tensor<B, 2>>>,
    blocks: Option<&QuantWeight>,
    device: &B::Device,
) -> Tensor<B, 2> {
    match (dense, blocks) {
        (Some(w), _) => w.val(),
        (None, Some(q)) => Tensor::from_data(
            TensorData::new(q.dequantize(), [q.rows(), q.cols()]),
            device,
        ),
        (None, None) => unreachable!("a weight with neither f32 values nor blocks"),
    }
}

/// A parameter id derived from the parameter's checkpoint name: stable across runs, so a saved
/// optimizer state finds its parameters again on resume.
pub fn param_id(name: &str) -> ParamId {
    ParamId::from(xxhash_rust::xxh3::xxh3_64(name.as_bytes()))
}

/// A parameter named `name` holding `value`, trainable or frozen.
pub fn param<B: Backend, const D: usize>(
    name: &str,
    value: Tensor<B, D>,
    trainable: bool,
) -> Param<Tensor<B, D>> {
    let value = if trainable {
        value.require_grad()
    } else {
        value
    };
    Param::initialized(param_id(name), value).set_require_grad(trainable)
}

impl<B: Backend> LoraAdapter<B> {
    /// A fresh adapter for a `[out, in]` weight named `name` (`....q_proj`): `A` Kaiming-uniform
    /// with `a = √5` as PEFT (bound `1/√in`), `B` zeros. Uses the backend's seeded RNG.
    pub fn init(name: &str, out: usize, inp: usize, cfg: &LoraConfig, device: &B::Device) -> Self {
        let bound = 1.0 / (inp as f64).sqrt();
        let a = Tensor::random(
            [cfg.rank, inp],
            Distribution::Uniform(-bound, bound),
            device,
        );
        let b = Tensor::zeros([out, cfg.rank], device);
        Self::from_tensors(name, a, b, cfg)
    }

    /// An adapter from given `A` `[r, in]` and `B` `[out, r]` (a saved adapter).
    pub fn from_tensors(name: &str, a: Tensor<B, 2>, b: Tensor<B, 2>, cfg: &LoraConfig) -> Self {
        LoraAdapter {
            a: param(&format!("{name}.lora_A.weight"), a, true),
            b: param(&format!("{name}.lora_B.weight"), b, true),
            scale: cfg.scale(),
            dropout: cfg.dropout,
        }
    }

    /// `(α/r)·dropout(x)·Aᵀ·Bᵀ` for `x` `[n, in]`; dropout only when training, its mask drawn
    /// from `dropout_seed` (see [`dropout_mask`]).
    pub fn forward(&self, x: Tensor<B, 2>, dropout_seed: Option<u64>) -> Tensor<B, 2> {
        let x = match dropout_seed {
            Some(seed) if self.dropout > 0.0 => {
                let [n, inp] = x.dims();
                let mask = dropout_mask(seed, n * inp, self.dropout);
                let mask = Tensor::from_data(TensorData::new(mask, [n, inp]), &x.device());
                x * mask
            }
            _ => x,
        };
        x.matmul(self.a.val().transpose())
            .matmul(self.b.val().transpose())
            .mul_scalar(self.scale)
    }

    /// `(α/r)·B·A`, `[out, in]`.
    pub fn delta(&self) -> Tensor<B, 2> {
        self.b.val().matmul(self.a.val()).mul_scalar(self.scale)
    }
}

/// An inverted-dropout mask of `n` values: `0` with probability `p`, else `1 / (1 − p)`, drawn
/// from a generator seeded with `seed` alone. The mask is a function of the seed, not of a
/// shared generator's state: a block recomputed in the backward pass draws the masks of its
/// forward pass again, whatever else in the process drew random numbers in between.
pub fn dropout_mask(seed: u64, n: usize, p: f64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let kept = (1.0 / (1.0 - p)) as f32;
    (0..n)
        .map(|_| if rng.random::<f64>() < p { 0.0 } else { kept })
        .collect()
}

impl<B: Backend> Linear<B> {
    /// `x·Wᵀ (+ b) (+ LoRA)` for `x` `[n, in]`; LoRA dropout when training (`dropout_seed`).
    pub fn forward(&self, x: Tensor<B, 2>, dropout_seed: Option<u64>) -> Tensor<B, 2> {
        let mut y = x.clone().matmul(self.base_weight(&x.device()).transpose());
        if let Some(b) = &self.bias {
            y = y + b.val().unsqueeze::<2>();
        }
        if let Some(l) = &self.lora {
            y = y + l.forward(x, dropout_seed);
        }
        y
    }

    /// A projection over an f32 weight (trainable or frozen, as the param says).
    pub fn dense(weight: Param<Tensor<B, 2>>) -> Self {
        Linear {
            weight: Some(weight),
            blocks: None,
            bias: None,
            lora: None,
        }
    }

    /// A projection over a frozen base kept as blocks.
    pub fn frozen_blocks(blocks: Arc<QuantWeight>) -> Self {
        Linear {
            weight: None,
            blocks: Some(blocks),
            bias: None,
            lora: None,
        }
    }

    /// The base weight `[out, in]` in f32: the param, or the blocks dequantized on `device`
    /// (a constant: no gradient reaches it).
    pub fn base_weight(&self, device: &B::Device) -> Tensor<B, 2> {
        param_or_blocks(self.weight.as_ref(), self.blocks.as_deref(), device)
    }

    /// The weight with the adapter folded in, `[out, in]`: what inference runs.
    pub fn merged_weight(&self, device: &B::Device) -> Tensor<B, 2> {
        let base = self.base_weight(device);
        match &self.lora {
            Some(l) => base + l.delta(),
            None => base,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::dropout_mask;

    #[test]
    fn dropout_masks_are_functions_of_their_seed() {
        let p = 0.25;
        let m = dropout_mask(7, 20_000, p);
        // Every value is 0 or 1 / (1 - p); about a quarter are 0 (binomial sd ~0.003).
        assert!(m.iter().all(|&v| v == 0.0 || v == (1.0 / (1.0 - p)) as f32));
        let dropped = m.iter().filter(|&&v| v == 0.0).count() as f64 / m.len() as f64;
        assert!((dropped - p).abs() < 0.015, "dropped {dropped}");
        // The same seed draws the same mask; another seed, another one.
        assert_eq!(dropout_mask(7, 20_000, p), m);
        assert_ne!(dropout_mask(8, 20_000, p), m);
        assert!(dropout_mask(9, 100, 0.0).iter().all(|&v| v == 1.0));
    }
}
