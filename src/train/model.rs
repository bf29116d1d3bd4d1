//! The training model: a LLaMA-family decoder as a burn [`Module`], in Hugging Face layout
//! (separate q/k/v/o/gate/up/down weights `[out, in]`, "halves" RoPE, RMSNorm, GQA, SwiGLU),
//! full-sequence causal forward without a KV cache, generic over the backend so that
//! `Autodiff<B>` differentiates it. Loaded from the same [`WeightSource`]s as the inference
//! model (GGUF, HF folder, random weights), so the two share one loading path and layout.
//!
//! Parameter ids are hashes of the HF tensor names ([`crate::train::lora::param_id`]): a saved
//! optimizer state maps back onto a freshly loaded model.

use burn::module::{Module, Param};
use burn::tensor::activation::{log_softmax, silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

// "Halves" RoPE on `[b, s, heads, d]` with `cos`/`sin` `[1, s, 1, d/2]`: the inference model's.
use crate::model::llama::{rope, rope_tables, HostTensor, LayerWeight, WeightName, WeightSource};
use crate::model::{LlamaConfig, ModelError, Precision};

use super::lora::{param, Linear, LoraAdapter, LoraConfig};
use super::table::{blocks_logits, blocks_times, Table};
use crate::model::quant::QuantWeight;

/// One decoder block.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    /// RMSNorm before attention, `[hidden]`.
    pub attn_norm: Param<Tensor<B, 1>>,
    /// Query projection.
    pub q: Linear<B>,
    /// Key projection.
    pub k: Linear<B>,
    /// Value projection.
    pub v: Linear<B>,
    /// Attention output projection.
    pub o: Linear<B>,
    /// RMSNorm before the MLP.
    pub ffn_norm: Param<Tensor<B, 1>>,
    /// SwiGLU gate.
    pub gate: Linear<B>,
    /// SwiGLU up.
    pub up: Linear<B>,
    /// SwiGLU down.
    pub down: Linear<B>,
}

/// The trainable LLaMA.
#[derive(Module, Debug)]
pub struct TrainLlama<B: Backend> {
    /// Token embedding `[vocab, hidden]` (also the output head when tied).
    pub embed: Table<B>,
    /// The decoder blocks.
    pub blocks: Vec<Block<B>>,
    /// Final RMSNorm `[hidden]`.
    pub norm: Param<Tensor<B, 1>>,
    /// Output head `[vocab, hidden]`; `None` when tied to the embedding.
    pub lm_head: Option<Table<B>>,
    /// RoPE cosines `[max_pos, d/2]` (constant).
    pub cos: Tensor<B, 2>,
    /// RoPE sines `[max_pos, d/2]` (constant).
    pub sin: Tensor<B, 2>,
    /// Hyper-parameters.
    #[module(skip)]
    pub cfg: LlamaConfig,
}

/// What is trained.
#[derive(Debug, Clone, PartialEq)]
pub enum TrainMode {
    /// Every weight.
    Full,
    /// LoRA adapters only; the base is frozen.
    Lora(LoraConfig),
}

/// Target rows whose logits [`TrainLlama::head_loss`] computes at once.
pub const HEAD_ROWS: usize = 256;

/// The HF tensor name of a weight.
pub fn hf_name(name: WeightName) -> String {
    match name {
        WeightName::Embedding => "model.embed_tokens.weight".into(),
        WeightName::OutputNorm => "model.norm.weight".into(),
        WeightName::Output => "lm_head.weight".into(),
        WeightName::Layer(l, w) => format!("model.layers.{l}.{}", layer_suffix(w)),
    }
}

/// The HF name of a block weight below `model.layers.{i}.` (the loader's table).
pub use crate::model::safetensors::hf_layer_suffix as layer_suffix;

/// The module path of a projection (`model.layers.3.self_attn.q_proj`) and its PEFT short name.
pub fn projection_path(layer: usize, w: LayerWeight) -> Option<(String, &'static str)> {
    let short = match w {
        LayerWeight::Q => "q_proj",
        LayerWeight::K => "k_proj",
        LayerWeight::V => "v_proj",
        LayerWeight::O => "o_proj",
        LayerWeight::Gate => "gate_proj",
        LayerWeight::Up => "up_proj",
        LayerWeight::Down => "down_proj",
        _ => return None,
    };
    let full = layer_suffix(w).trim_end_matches(".weight");
    Some((format!("model.layers.{layer}.{full}"), short))
}

/// The seven projections of a block, in a fixed order.
pub const PROJECTION_WEIGHTS: [LayerWeight; 7] = crate::model::llama::PROJECTIONS;

fn fetch(
    src: &mut dyn WeightSource,
    name: WeightName,
    want: &[usize],
) -> Result<HostTensor, ModelError> {
    let t = src.load(name)?.ok_or_else(|| ModelError::Weight {
        name: hf_name(name),
        problem: "missing".into(),
    })?;
    if t.shape != want {
        return Err(ModelError::Weight {
            name: hf_name(name),
            problem: format!("shape {:?}, expected {want:?}", t.shape),
        });
    }
    Ok(t)
}

fn tensor<B: Backend, const D: usize>(t: HostTensor, dev: &B::Device) -> Tensor<B, D> {
    let shape: [usize; D] = std::array::from_fn(|i| t.shape.get(i).copied().unwrap_or(1));
    Tensor::from_data(TensorData::new(t.data, shape), dev)
}

impl<B: Backend> Block<B> {
    /// The projection of role `w` (one of [`PROJECTION_WEIGHTS`]).
    pub fn projection(&self, w: LayerWeight) -> Option<&Linear<B>> {
        Some(match w {
            LayerWeight::Q => &self.q,
            LayerWeight::K => &self.k,
            LayerWeight::V => &self.v,
            LayerWeight::O => &self.o,
            LayerWeight::Gate => &self.gate,
            LayerWeight::Up => &self.up,
            LayerWeight::Down => &self.down,
            _ => return None,
        })
    }

    /// The adapter of projection `w`, when it has one.
    pub fn projection_lora_mut(&mut self, w: LayerWeight) -> Option<&mut LoraAdapter<B>> {
        self.projection_mut(w).and_then(|l| l.lora.as_mut())
    }

    fn projection_mut(&mut self, w: LayerWeight) -> Option<&mut Linear<B>> {
        Some(match w {
            LayerWeight::Q => &mut self.q,
            LayerWeight::K => &mut self.k,
            LayerWeight::V => &mut self.v,
            LayerWeight::O => &mut self.o,
            LayerWeight::Gate => &mut self.gate,
            LayerWeight::Up => &mut self.up,
            LayerWeight::Down => &mut self.down,
            _ => return None,
        })
    }
}

/// What the blocks of one forward pass over `[b, s]` tokens share ([`TrainLlama::context`]).
#[derive(Debug, Clone)]
pub struct BlockContext<B: Backend> {
    /// Rows.
    pub b: usize,
    /// Positions per row.
    pub s: usize,
    /// RoPE cosines `[1, s, 1, d/2]`.
    pub cos: Tensor<B, 4>,
    /// RoPE sines `[1, s, 1, d/2]`.
    pub sin: Tensor<B, 4>,
    /// The causal mask as an additive bias `[1, 1, s, s]`.
    pub bias: Tensor<B, 4>,
}

impl<B: Backend> Block<B> {
    /// The block over hidden states `x` `[b·s, hidden]`: pre-norm attention and SwiGLU MLP,
    /// each added to its input. Training passes a `dropout_seed`: each projection's LoRA
    /// dropout mask is drawn from it and the projection's place in the block.
    pub fn forward(
        &self,
        x: Tensor<B, 2>,
        ctx: &BlockContext<B>,
        cfg: &LlamaConfig,
        dropout_seed: Option<u64>,
    ) -> Tensor<B, 2> {
        // One seed per projection (q, k, v, o, gate, up, down).
        let seed = |i: u64| dropout_seed.map(|s| mix_seed(s, i));
        let (b, s) = (ctx.b, ctx.s);
        let (d, kvh, n_rep, h) = (cfg.head_dim, cfg.n_kv_heads, cfg.n_rep(), cfg.n_heads);
        let scale = 1.0 / (d as f64).sqrt();
        let xn = rms_norm(x.clone(), self.attn_norm.val(), cfg.rms_eps);
        let q = self.q.forward(xn.clone(), seed(0)).reshape([b, s, h, d]);
        let k = self.k.forward(xn.clone(), seed(1)).reshape([b, s, kvh, d]);
        let v = self.v.forward(xn, seed(2)).reshape([b, s, kvh, d]);
        let q = rope(q, ctx.cos.clone(), ctx.sin.clone());
        let k = rope(k, ctx.cos.clone(), ctx.sin.clone());
        let q = crate::model::llama::fold_query_heads(q, kvh);
        let k = k.permute([0, 2, 3, 1]); // [b, kvh, d, s]
        let v = v.permute([0, 2, 1, 3]); // [b, kvh, s, d]
        let scores = q.matmul(k).mul_scalar(scale).reshape([b, h, s, s]) + ctx.bias.clone();
        let probs = softmax(scores, 3).reshape([b, kvh, n_rep * s, s]);
        let att = probs
            .matmul(v)
            .reshape([b, kvh, n_rep, s, d])
            .permute([0, 3, 1, 2, 4])
            .reshape([b * s, h * d]);
        let x = x + self.o.forward(att, seed(3));
        let xn = rms_norm(x.clone(), self.ffn_norm.val(), cfg.rms_eps);
        let gate = self.gate.forward(xn.clone(), seed(4));
        let up = self.up.forward(xn, seed(5));
        x + self.down.forward(silu(gate) * up, seed(6))
    }
}

impl<B: Backend> TrainLlama<B> {
    /// Loads every weight of `cfg` from `src`. With [`TrainMode::Lora`] the base is frozen and
    /// fresh adapters (`B = 0`) are attached to the targeted projections, drawn from the
    /// backend's RNG (seed it first with `B::seed` for reproducible runs).
    pub fn load(
        cfg: LlamaConfig,
        src: &mut dyn WeightSource,
        mode: &TrainMode,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        Self::load_with_base(cfg, src, mode, Precision::F32, device)
    }

    /// As [`TrainLlama::load`], the seven projections of every block kept in `base`'s format:
    /// `F32` as params, or (LoRA only) `Native` / `Q8` as frozen blocks read straight from the
    /// source ([`WeightSource::load_quant`]: a GGUF file's own 4/5-bit blocks under `Native`),
    /// dequantized for each product; so are the embedding and the output head ([`Table`]). The
    /// norms stay f32.
    pub fn load_with_base(
        cfg: LlamaConfig,
        src: &mut dyn WeightSource,
        mode: &TrainMode,
        base: Precision,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        let full = matches!(mode, TrainMode::Full);
        let keep_blocks = match base {
            Precision::F32 => false,
            Precision::Native | Precision::Q8 if !full => true,
            other => {
                let why = if full { " with full finetuning" } else { "" };
                return Err(ModelError::Config(format!(
                    "training keeps its base in f32, or (LoRA only) in native or q8 blocks; \
                     not {other}{why}"
                )));
            }
        };
        let (h, d) = (cfg.hidden, cfg.head_dim);
        let (qd, kd) = (cfg.n_heads * d, cfg.n_kv_heads * d);
        let p2 = |name: WeightName, want: [usize; 2], src: &mut dyn WeightSource| {
            fetch(src, name, &want).map(|t| param(&hf_name(name), tensor::<B, 2>(t, device), full))
        };
        let p1 = |name: WeightName, want: usize, src: &mut dyn WeightSource| {
            fetch(src, name, &[want])
                .map(|t| param(&hf_name(name), tensor::<B, 1>(t, device), full))
        };
        // A `[vocab, hidden]` table as blocks (under `keep_blocks`) or as an f32 param; `None`
        // when the source lacks it.
        let table = |name: WeightName, src: &mut dyn WeightSource| {
            let want = [cfg.vocab, h];
            let shape_err = |got: &[usize]| ModelError::Weight {
                name: hf_name(name),
                problem: format!("shape {got:?}, expected {want:?}"),
            };
            if keep_blocks {
                match src.load_quant(name, base == Precision::Native)? {
                    Some(q) if [q.rows(), q.cols()] == want => {
                        Ok(Some(Table::frozen_blocks(std::sync::Arc::new(q))))
                    }
                    Some(q) => Err(shape_err(&[q.rows(), q.cols()])),
                    None => Ok(None),
                }
            } else {
                match src.load(name)? {
                    Some(t) if t.shape == want => Ok(Some(Table::dense(param(
                        &hf_name(name),
                        tensor::<B, 2>(t, device),
                        full,
                    )))),
                    Some(t) => Err(shape_err(&t.shape)),
                    None => Ok(None),
                }
            }
        };
        let embed = table(WeightName::Embedding, src)?.ok_or_else(|| ModelError::Weight {
            name: hf_name(WeightName::Embedding),
            problem: "missing".into(),
        })?;
        let norm = p1(WeightName::OutputNorm, h, src)?;
        // Declared untied but absent: tie, as HF does.
        let lm_head = if cfg.tie_embeddings {
            None
        } else {
            table(WeightName::Output, src)?
        };
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let w = |lw| WeightName::Layer(l, lw);
            let lin = |lw: LayerWeight,
                       out: usize,
                       inp: usize,
                       bias: Option<(LayerWeight, usize)>,
                       src: &mut dyn WeightSource|
             -> Result<Linear<B>, ModelError> {
                let mut linear = if keep_blocks {
                    let q = src
                        .load_quant(w(lw), base == Precision::Native)?
                        .ok_or_else(|| ModelError::Weight {
                            name: hf_name(w(lw)),
                            problem: "missing".into(),
                        })?;
                    if (q.rows(), q.cols()) != (out, inp) {
                        return Err(ModelError::Weight {
                            name: hf_name(w(lw)),
                            problem: format!(
                                "shape {:?}, expected {:?}",
                                [q.rows(), q.cols()],
                                [out, inp]
                            ),
                        });
                    }
                    Linear::frozen_blocks(std::sync::Arc::new(q))
                } else {
                    Linear::dense(p2(w(lw), [out, inp], src)?)
                };
                linear.bias = match bias {
                    Some((bw, n)) if cfg.qkv_bias => Some(p1(w(bw), n, src)?),
                    _ => None,
                };
                linear.lora = match (mode, projection_path(l, lw)) {
                    (TrainMode::Lora(lc), Some((path, short))) if lc.targets(short) => {
                        Some(LoraAdapter::init(&path, out, inp, lc, device))
                    }
                    _ => None,
                };
                Ok(linear)
            };
            let q = lin(LayerWeight::Q, qd, h, Some((LayerWeight::QBias, qd)), src)?;
            let k = lin(LayerWeight::K, kd, h, Some((LayerWeight::KBias, kd)), src)?;
            let v = lin(LayerWeight::V, kd, h, Some((LayerWeight::VBias, kd)), src)?;
            let o = lin(LayerWeight::O, h, qd, None, src)?;
            let gate = lin(LayerWeight::Gate, cfg.ffn, h, None, src)?;
            let up = lin(LayerWeight::Up, cfg.ffn, h, None, src)?;
            let down = lin(LayerWeight::Down, h, cfg.ffn, None, src)?;
            blocks.push(Block {
                attn_norm: p1(w(LayerWeight::AttnNorm), h, src)?,
                q,
                k,
                v,
                o,
                ffn_norm: p1(w(LayerWeight::FfnNorm), h, src)?,
                gate,
                up,
                down,
            });
        }
        let (cos, sin) = rope_tables(cfg.max_seq_len, d, cfg.rope_theta);
        let half = d / 2;
        Ok(TrainLlama {
            embed,
            blocks,
            norm,
            lm_head,
            cos: Tensor::from_data(TensorData::new(cos, [cfg.max_seq_len, half]), device),
            sin: Tensor::from_data(TensorData::new(sin, [cfg.max_seq_len, half]), device),
            cfg,
        })
    }

    /// Replaces the adapter of projection `w` of block `layer` (loading a saved adapter).
    pub fn set_adapter(
        &mut self,
        layer: usize,
        w: LayerWeight,
        adapter: LoraAdapter<B>,
    ) -> Result<(), ModelError> {
        let lin = self
            .blocks
            .get_mut(layer)
            .and_then(|b| b.projection_mut(w))
            .ok_or_else(|| ModelError::Weight {
                name: format!("layer {layer} {w:?}"),
                problem: "no such projection".into(),
            })?;
        lin.lora = Some(adapter);
        Ok(())
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Final hidden states `[b·s, hidden]` of `ids` (`[b, s]`, row-major; right padding is
    /// harmless: with a causal mask no real position ever attends to a later pad).
    /// No dropout: this is the model as it infers (training's passes are in `train::backward`).
    pub fn hidden(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        self.final_norm(self.blocks_output(ids))
    }

    /// The last block's output `[b·s, hidden]` for `ids` `[b, s]` (before the final norm).
    fn blocks_output(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let [b, s] = ids.dims();
        let ctx = self.context(b, s, &ids.device());
        let mut x = self.embed_tokens(ids);
        for blk in &self.blocks {
            x = blk.forward(x, &ctx, &self.cfg, None);
        }
        x
    }

    /// What every block's forward over `[b, s]` tokens shares: RoPE tables and causal mask.
    pub fn context(&self, b: usize, s: usize, device: &B::Device) -> BlockContext<B> {
        let half = self.cfg.head_dim / 2;
        let cos = self.cos.clone().narrow(0, 0, s).reshape([1, s, 1, half]);
        let sin = self.sin.clone().narrow(0, 0, s).reshape([1, s, 1, half]);
        // Causal mask as an additive bias, broadcast over batch and heads.
        let mut bias = vec![0f32; s * s];
        for r in 0..s {
            for c in r + 1..s {
                bias[r * s + c] = f32::NEG_INFINITY;
            }
        }
        let bias = Tensor::from_data(TensorData::new(bias, [1, 1, s, s]), device);
        BlockContext {
            b,
            s,
            cos,
            sin,
            bias,
        }
    }

    /// The embeddings of `ids` `[b, s]`, `[b·s, hidden]`: the first block's input.
    pub fn embed_tokens(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        self.embed.lookup(ids)
    }

    /// The final RMSNorm of the last block's output.
    pub fn final_norm(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        rms_norm(x, self.norm.val(), self.cfg.rms_eps)
    }

    /// The output head: its own table, or the embedding's when tied.
    pub fn head_table(&self) -> &Table<B> {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Logits of the given hidden rows `[n, hidden]` -> `[n, vocab]` (a head kept as blocks:
    /// outside the autodiff graph, see [`Self::head_loss`]).
    pub fn head(&self, hidden: Tensor<B, 2>) -> Tensor<B, 2> {
        self.head_table().logits(hidden)
    }

    /// Logits of every position, `[b·s, vocab]`.
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        self.head(self.hidden(ids))
    }

    /// Sum of the cross-entropy of `targets` predicted at flat positions `positions`
    /// (`row·s + t`) of `ids` `[b, s]`: only the trained positions go through the output
    /// head, which is most of the cost saved for prompt-heavy data.
    pub fn loss_sum(
        &self,
        ids: Tensor<B, 2, Int>,
        positions: Tensor<B, 1, Int>,
        targets: Tensor<B, 1, Int>,
    ) -> Tensor<B, 1> {
        self.head_loss(self.blocks_output(ids), positions, targets)
    }

    /// The loss part of [`Self::loss_sum`] from the last block's output `x` `[b·s, hidden]`:
    /// final norm, the output head at `positions`, the summed cross-entropy of `targets`.
    pub fn head_loss(
        &self,
        x: Tensor<B, 2>,
        positions: Tensor<B, 1, Int>,
        targets: Tensor<B, 1, Int>,
    ) -> Tensor<B, 1> {
        let n = targets.dims()[0];
        let device = x.device();
        // RMSNorm is per row: only the trained rows need it.
        let hidden = self.final_norm(x.select(0, positions));
        // The logits of [`HEAD_ROWS`] targets at a time: a pass of 8 answers has ~1,000, and
        // over a 152k vocabulary (Qwen2.5) each f32 copy of all their logits is 0.6 GB, which
        // log-softmax makes several of.
        let mut total: Option<Tensor<B, 1>> = None;
        for start in (0..n).step_by(HEAD_ROWS) {
            let len = HEAD_ROWS.min(n - start);
            let rows = hidden.clone().narrow(0, start, len);
            let picked = targets.clone().narrow(0, start, len).reshape([len, 1]);
            let part = match self.head_table().blocks.as_deref() {
                Some(head) => blocks_head_loss(head, rows, picked),
                None => {
                    let logp = log_softmax(self.head(rows), 1);
                    logp.gather(1, picked).sum().neg()
                }
            };
            total = Some(match total {
                Some(t) => t + part,
                None => part,
            });
        }
        total.unwrap_or_else(|| Tensor::zeros([1], &device))
    }

    /// Greedy decoding without a cache (the whole sequence is re-run per token): for tests and
    /// small evaluations of the training model itself. Stops at any of `stop` (included).
    pub fn greedy(&self, prompt: &[u32], max_new: usize, stop: &[u32]) -> Vec<u32> {
        let device = self.norm.val().device();
        let mut seq: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
        let mut out = Vec::new();
        for _ in 0..max_new {
            if seq.is_empty() || seq.len() >= self.cfg.max_seq_len {
                break;
            }
            let s = seq.len();
            let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(seq.clone(), [1, s]), &device);
            let last = self.hidden(ids).narrow(0, s - 1, 1);
            let next = self.head(last).argmax(1).into_data();
            let Some(next) = next.iter::<i64>().next() else {
                break;
            };
            out.push(next as u32);
            seq.push(next);
            if stop.contains(&(next as u32)) {
                break;
            }
        }
        out
    }
}

/// [`TrainLlama::head_loss`]'s part for `rows` `[n, hidden]` and their targets `picked`
/// `[n, 1]` through a `head` kept as blocks, whose product is outside the autodiff graph: the
/// loss `L = −Σ log softmax(rows · headᵀ)[target]`, and on a backend that differentiates the
/// gradient `∂L/∂rows = (softmax − onehot(target)) · head` put in by hand, as
/// `L + Σ(rows · ∂L/∂rows) − detach(Σ(rows · ∂L/∂rows))`: the value `L`, the gradient
/// `∂L/∂rows` (the same trick as `train::backward`'s recomputed blocks).
fn blocks_head_loss<B: Backend>(
    head: &QuantWeight,
    rows: Tensor<B, 2>,
    picked: Tensor<B, 2, Int>,
) -> Tensor<B, 1> {
    let device = rows.device();
    let logp = log_softmax(blocks_logits(head, rows.clone()), 1);
    let loss = logp.clone().gather(1, picked.clone()).sum().neg();
    // (`is_require_grad` is true of a graph's leaves only, not of `rows`.)
    if !B::ad_enabled(&device) {
        return loss;
    }
    let [n, vocab] = logp.dims();
    let onehot = Tensor::<B, 2>::zeros([n, vocab], &device).scatter(
        1,
        picked,
        Tensor::ones([n, 1], &device),
        burn::tensor::IndexingUpdateOp::Add,
    );
    let grad = blocks_times(head, logp.exp() - onehot);
    let through = (rows * grad).sum();
    loss + through.clone() - through.detach()
}

/// A seed derived from `seed` and `i` (splitmix64's finaliser over their mix): neighbouring
/// inputs give unrelated seeds.
pub fn mix_seed(seed: u64, i: u64) -> u64 {
    let mut z = seed ^ (i.wrapping_add(1)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// RMSNorm over the last axis: the inference model's, with the weight as a trainable vector.
fn rms_norm<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 1>, eps: f64) -> Tensor<B, 2> {
    crate::model::llama::rms_norm(x, w.unsqueeze::<2>(), eps)
}
