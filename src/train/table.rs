//! The training model's two `[vocab, hidden]` tables: the token embedding and the output head.
//!
//! Each is an f32 [`Param`] (trained in full finetuning, frozen under LoRA) or, under LoRA over
//! a block-format base (`--base-dtype native|q8`, as QLoRA keeps its base), the file's frozen
//! blocks: looked up row by row, and multiplied [`TABLE_ROWS`] rows at a time, dequantized for
//! the product and dropped after it. Over Qwen2.5's 152k-token vocabulary an f32 table is
//! 0.93 GB at the 1.5B's width, the blocks a fifth of that; a chunk of rows is 50 MB.
//!
//! No gradient ever reaches a table kept as blocks (it is frozen), but one must pass through
//! the head to the blocks below it: [`blocks_times`] gives the product that backward pass needs
//! (`g · head` for the logits' gradient `g`), which [`super::model::TrainLlama::head_loss`]
//! applies by hand.

use std::sync::Arc;

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use rayon::prelude::*;

use crate::model::quant::QuantWeight;

/// Rows of a block-format table dequantized at once for a product: 8192 rows of a 1536-wide
/// table are 50 MB of f32.
pub const TABLE_ROWS: usize = 8192;

/// A `[vocab, hidden]` table: an f32 param, or frozen blocks.
#[derive(Module, Debug)]
pub struct Table<B: Backend> {
    /// The table in f32; `None` when it is kept as [`Table::blocks`].
    pub dense: Option<Param<Tensor<B, 2>>>,
    /// The frozen table as blocks; never trained.
    #[module(skip)]
    pub blocks: Option<Arc<QuantWeight>>,
}

impl<B: Backend> Table<B> {
    /// A table held as an f32 param (trainable or frozen, as the param says).
    pub fn dense(weight: Param<Tensor<B, 2>>) -> Self {
        Table {
            dense: Some(weight),
            blocks: None,
        }
    }

    /// A frozen table held as blocks.
    pub fn frozen_blocks(blocks: Arc<QuantWeight>) -> Self {
        Table {
            dense: None,
            blocks: Some(blocks),
        }
    }

    /// Whether the table gets a gradient (an f32 param that requires one).
    pub fn is_trainable(&self) -> bool {
        self.dense.as_ref().is_some_and(|p| p.is_require_grad())
    }

    /// The rows of `ids` `[b, s]`, `[b·s, hidden]`, on their device (blocks: a constant).
    pub fn lookup(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let device = ids.device();
        let [b, s] = ids.dims();
        let ids = ids.reshape([b * s]);
        match (&self.dense, &self.blocks) {
            (Some(w), _) => w.val().select(0, ids),
            (None, Some(q)) => {
                let ids: Vec<usize> = ids.into_data().iter::<i64>().map(|i| i as usize).collect();
                let rows = q.dequantize_rows(ids.into_par_iter());
                Tensor::from_data(TensorData::new(rows, [b * s, q.cols()]), &device)
            }
            (None, None) => unreachable!("a table with neither f32 weights nor blocks"),
        }
    }

    /// `x · tableᵀ`, `[n, vocab]`, for `x` `[n, hidden]`: the logits (over blocks, outside
    /// the autodiff graph: [`blocks_logits`]).
    pub fn logits(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match (&self.dense, &self.blocks) {
            (Some(w), _) => x.matmul(w.val().transpose()),
            (None, Some(q)) => blocks_logits(q, x),
            (None, None) => unreachable!("a table with neither f32 weights nor blocks"),
        }
    }

    /// The whole table in f32 on `device`: the param, or the blocks dequantized (for export).
    pub fn weight(&self, device: &B::Device) -> Tensor<B, 2> {
        super::lora::param_or_blocks(self.dense.as_ref(), self.blocks.as_deref(), device)
    }
}

/// `x · qᵀ`, `[n, rows]`, for `x` `[n, cols]`, [`TABLE_ROWS`] rows of `q` dequantized at a
/// time, outside the autodiff graph (`x` detached): see [`blocks_times`] for its backward.
pub fn blocks_logits<B: Backend>(q: &QuantWeight, x: Tensor<B, 2>) -> Tensor<B, 2> {
    let x = x.detach();
    let device = x.device();
    let parts = (0..q.rows())
        .step_by(TABLE_ROWS)
        .map(|start| {
            let chunk = dequantized_rows::<B>(q, start, &device);
            x.clone().matmul(chunk.transpose())
        })
        .collect();
    Tensor::cat(parts, 1)
}

/// `g · q`, `[n, cols]`, for `g` `[n, rows]`, outside the autodiff graph: the gradient that
/// reaches [`blocks_logits`]'s input from the gradient `g` of its output.
pub fn blocks_times<B: Backend>(q: &QuantWeight, g: Tensor<B, 2>) -> Tensor<B, 2> {
    let g = g.detach();
    let device = g.device();
    let mut out: Tensor<B, 2> = Tensor::zeros([g.dims()[0], q.cols()], &device);
    for start in (0..q.rows()).step_by(TABLE_ROWS) {
        let chunk = dequantized_rows::<B>(q, start, &device);
        let len = chunk.dims()[0];
        out = out + g.clone().narrow(1, start, len).matmul(chunk);
    }
    out
}

/// Rows `start..start + TABLE_ROWS` of `q` (fewer at its end) in f32, `[len, cols]`.
fn dequantized_rows<B: Backend>(q: &QuantWeight, start: usize, device: &B::Device) -> Tensor<B, 2> {
    let len = TABLE_ROWS.min(q.rows() - start);
    let data = q.dequantize_rows((start..start + len).into_par_iter());
    Tensor::from_data(TensorData::new(data, [len, q.cols()]), device)
}
