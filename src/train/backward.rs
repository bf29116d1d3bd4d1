//! The gradients of one micro-batch, two ways with the same result:
//!
//! - [`stored`]: one autodiff graph over the whole model; every block's intermediate tensors
//!   (attention scores and probabilities, the MLP's `ffn`-wide activations, LoRA's inputs) live
//!   until the backward pass. On SmolLM2-135M at 256 tokens that is ~700 MB per example.
//! - [`recomputed`]: activation checkpointing per block (Chen et al. 2016, "Training Deep Nets
//!   with Sublinear Memory Cost"; what PyTorch's `checkpoint` does per layer). A forward pass
//!   without a graph keeps only each block's input (`[b·s, hidden]`); the backward pass then
//!   goes from the top, runs each block once more under autodiff from its kept input, and
//!   backpropagates the gradient arriving at the block's output through it
//!   (`sum(out · upstream)` as the scalar, whose gradient is exactly that vector-Jacobian
//!   product). One block's graph lives at a time: memory is the kept inputs plus one block,
//!   for one more forward pass of compute.
//!
//! LoRA dropout's masks are functions of `(step seed, micro-batch, block, projection)`
//! ([`DropoutSeed`], [`super::lora::dropout_mask`]), not draws from a shared generator, so a
//! block run again draws the masks it drew the first time (whatever else in the process drew
//! random numbers meanwhile), and the two ways give the same gradients.

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};

use super::model::{mix_seed, BlockContext, TrainLlama};
use super::sft::Batch;

/// Where the dropout masks of one block come from: the step's seed, the micro-batch's place in
/// the step, and the block's index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropoutSeed {
    /// Derived from the run's seed and the optimizer step.
    pub step: u64,
    /// The micro-batch's index in the step.
    pub micro: usize,
}

impl DropoutSeed {
    /// The dropout seed of block `block` ([`super::model::Block::forward`]).
    pub fn block(&self, block: usize) -> u64 {
        mix_seed(mix_seed(self.step, self.micro as u64), block as u64)
    }
}

/// The batch's token ids `[rows, len]`, trained positions and their targets on `device`.
fn batch_tensors<B: Backend>(
    batch: &Batch,
    device: &B::Device,
) -> (Tensor<B, 2, Int>, Tensor<B, 1, Int>, Tensor<B, 1, Int>) {
    let n = batch.targets.len();
    let ids = Tensor::from_data(
        TensorData::new(batch.ids.clone(), [batch.rows, batch.len]),
        device,
    );
    let pos = Tensor::from_data(TensorData::new(batch.positions.clone(), [n]), device);
    let tgt = Tensor::from_data(TensorData::new(batch.targets.clone(), [n]), device);
    (ids, pos, tgt)
}

/// The summed loss of `batch` (unscaled) and the gradients of `scale ·` that loss, added to
/// `acc`, from one graph over the whole model.
pub fn stored<B: AutodiffBackend>(
    model: &TrainLlama<B>,
    batch: &Batch,
    scale: f64,
    dropout: DropoutSeed,
    acc: &mut GradientsAccumulator<TrainLlama<B>>,
    device: &B::Device,
) -> f64 {
    let (ids, pos, tgt) = batch_tensors::<B>(batch, device);
    let ctx = model.context(batch.rows, batch.len, device);
    let mut x = model.embed_tokens(ids);
    for (i, blk) in model.blocks.iter().enumerate() {
        x = blk.forward(x, &ctx, &model.cfg, Some(dropout.block(i)));
    }
    let loss = model.head_loss(x, pos, tgt);
    let value = loss.clone().into_scalar().elem::<f64>();
    let grads = loss.mul_scalar(scale).backward();
    acc.accumulate(model, GradientsParams::from_grads(grads, model));
    value
}

/// As [`stored`], recomputing each block in the backward pass instead of keeping its
/// activations (see the module's documentation).
pub fn recomputed<B: AutodiffBackend>(
    model: &TrainLlama<B>,
    batch: &Batch,
    scale: f64,
    dropout: DropoutSeed,
    acc: &mut GradientsAccumulator<TrainLlama<B>>,
    device: &B::Device,
) -> f64 {
    let (ids, pos, tgt) = batch_tensors::<B>(batch, device);
    let ctx = model.context(batch.rows, batch.len, device);
    let plain_ctx = inner_context(&ctx);
    // The embedding lookup stays in the graph: with full finetuning it has a gradient.
    let embedded = model.embed_tokens(ids);

    let mut inputs = Vec::with_capacity(model.blocks.len());
    let mut x = embedded.clone().inner();
    for (i, blk) in model.blocks.iter().enumerate() {
        let seed = Some(dropout.block(i));
        let out = blk.valid().forward(x.clone(), &plain_ctx, &model.cfg, seed);
        inputs.push(x);
        x = out;
    }

    let top = Tensor::<B, 2>::from_inner(x).require_grad();
    let loss = model.head_loss(top.clone(), pos, tgt);
    let value = loss.clone().into_scalar().elem::<f64>();
    let grads = loss.mul_scalar(scale).backward();
    let mut upstream = top.grad(&grads);
    acc.accumulate(model, GradientsParams::from_grads(grads, model));

    for (i, blk) in model.blocks.iter().enumerate().rev() {
        // No gradient reaches the output (no target in the batch): nothing below gets one.
        let (Some(up), Some(input)) = (upstream.take(), inputs.pop()) else {
            return value;
        };
        let input = Tensor::<B, 2>::from_inner(input).require_grad();
        let out = blk.forward(input.clone(), &ctx, &model.cfg, Some(dropout.block(i)));
        let grads = (out * Tensor::from_inner(up)).sum().backward();
        upstream = input.grad(&grads);
        acc.accumulate(model, GradientsParams::from_grads(grads, blk));
    }

    if let (Some(up), true) = (upstream, model.embed.is_trainable()) {
        let grads = (embedded * Tensor::from_inner(up)).sum().backward();
        acc.accumulate(model, GradientsParams::from_grads(grads, model));
    }
    value
}

/// The context's constant tensors outside the autodiff graph.
fn inner_context<B: AutodiffBackend>(ctx: &BlockContext<B>) -> BlockContext<B::InnerBackend> {
    BlockContext {
        b: ctx.b,
        s: ctx.s,
        cos: ctx.cos.clone().inner(),
        sin: ctx.sin.clone().inner(),
        bias: ctx.bias.clone().inner(),
    }
}
