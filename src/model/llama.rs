//! The LLaMA decoder in burn: RMSNorm, RoPE ("halves" convention), grouped-query attention over
//! a KV cache, SwiGLU MLP, generic over the backend.
//!
//! Layout choices, all for speed on a CPU backend:
//! - q/k/v are one fused `[hidden, (h + 2·kv_h)·d]` matmul and gate/up one `[hidden, 2·ffn]`
//!   matmul: fewer, larger GEMMs parallelize better than many small ones.
//! - Linear weights are stored transposed (`[in, out]`, contiguous), so `x.matmul(w)` needs no
//!   stride games.
//! - GQA without copying K/V: the `n_rep` query heads sharing a kv head are folded into the
//!   query-row axis (`[b, kv_h, n_rep·s, d]`), so attention runs on `kv_h` heads against the
//!   cache as it is, and the mask is repeated per folded row.
//! - Only the last position's hidden state goes through the output head.
//!
//! [`Llama::forward`] reads as the model: embed, then per layer `x += attention(norm(x))` and
//! `x += mlp(norm(x))`, then the head. What depends on the backend sits behind functions named
//! for it: `Llama::qkv` (the CPU kernel's one-pass split/RoPE/fold, or burn ops),
//! `Llama::attend` (the CPU kernel, burn's fused attention, or decode matmuls) and
//! `Llama::merge_heads`; the kernels themselves are in the `cpu` module below.
//!
//! Why one file of this size: the model (weights, the forward pass) and, in the `cpu` module, the
//! flex kernels it dispatches to, which the tests here check against the same model's burn ops.

use burn::tensor::activation::{silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Int, Tensor, TensorData};

use super::config::LlamaConfig;
use super::device::Precision;
use super::kv_cache::{host_values, AppendPlan, KvCache, LayerKv, OwnKv, SpareBuffers};
use super::quant::arena::WeightArena;
use super::quant::{Q8Matrix, QuantWeight};
use super::ModelError;
use std::sync::Arc;

/// A weight as it comes from a checkpoint: `f32`, row-major, Hugging Face layout.
#[derive(Debug, Clone)]
pub struct HostTensor {
    /// Row-major values.
    pub data: Vec<f32>,
    /// Shape (PyTorch order: `[out, in]` for linear weights).
    pub shape: Vec<usize>,
}

/// The weights of one decoder block, by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerWeight {
    /// RMSNorm before attention.
    AttnNorm,
    /// Query projection `[h·d, hidden]`.
    Q,
    /// Key projection `[kv_h·d, hidden]`.
    K,
    /// Value projection `[kv_h·d, hidden]`.
    V,
    /// Query bias (Qwen2).
    QBias,
    /// Key bias (Qwen2).
    KBias,
    /// Value bias (Qwen2).
    VBias,
    /// Attention output projection `[hidden, h·d]`.
    O,
    /// RMSNorm before the MLP.
    FfnNorm,
    /// SwiGLU gate `[ffn, hidden]`.
    Gate,
    /// SwiGLU up `[ffn, hidden]`.
    Up,
    /// SwiGLU down `[hidden, ffn]`.
    Down,
}

/// A weight of the model, by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightName {
    /// Token embedding `[vocab, hidden]`.
    Embedding,
    /// Final RMSNorm.
    OutputNorm,
    /// Output head `[vocab, hidden]` (absent when tied to the embedding).
    Output,
    /// A block's weight.
    Layer(usize, LayerWeight),
}

/// The seven projections of a block, in a fixed order.
pub const PROJECTIONS: [LayerWeight; 7] = [
    LayerWeight::Q,
    LayerWeight::K,
    LayerWeight::V,
    LayerWeight::O,
    LayerWeight::Gate,
    LayerWeight::Up,
    LayerWeight::Down,
];

impl WeightName {
    /// Every weight a checkpoint of `cfg` holds, in checkpoint order: the output head only when
    /// it is not tied, the q/k/v biases only for an architecture with them (Qwen2).
    pub fn all(cfg: &LlamaConfig) -> Vec<WeightName> {
        let mut names = vec![WeightName::Embedding, WeightName::OutputNorm];
        if !cfg.tie_embeddings {
            names.push(WeightName::Output);
        }
        for l in 0..cfg.n_layers {
            let mut layer = vec![LayerWeight::AttnNorm, LayerWeight::FfnNorm];
            layer.extend(PROJECTIONS);
            if cfg.qkv_bias {
                layer.extend([LayerWeight::QBias, LayerWeight::KBias, LayerWeight::VBias]);
            }
            names.extend(layer.into_iter().map(|w| WeightName::Layer(l, w)));
        }
        names
    }

    /// The weight's shape under `cfg`, in Hugging Face layout (`[out, in]` for a matrix).
    pub fn shape(self, cfg: &LlamaConfig) -> Vec<usize> {
        let (h, q, kv) = (
            cfg.hidden,
            cfg.n_heads * cfg.head_dim,
            cfg.n_kv_heads * cfg.head_dim,
        );
        match self {
            WeightName::Embedding | WeightName::Output => vec![cfg.vocab, h],
            WeightName::OutputNorm => vec![h],
            WeightName::Layer(_, w) => match w {
                LayerWeight::AttnNorm | LayerWeight::FfnNorm => vec![h],
                LayerWeight::Q => vec![q, h],
                LayerWeight::K | LayerWeight::V => vec![kv, h],
                LayerWeight::QBias => vec![q],
                LayerWeight::KBias | LayerWeight::VBias => vec![kv],
                LayerWeight::O => vec![h, q],
                LayerWeight::Gate | LayerWeight::Up => vec![cfg.ffn, h],
                LayerWeight::Down => vec![h, cfg.ffn],
            },
        }
    }
}

/// Where weights come from (a GGUF file, a Hugging Face folder, random init for benchmarks).
///
/// Implementations return weights in Hugging Face layout: `[out, in]` linear weights and q/k
/// rows ordered for "halves" RoPE.
pub trait WeightSource {
    /// The weight, or `Ok(None)` when the checkpoint does not have it (optional weights only:
    /// biases and a tied output head).
    fn load(&mut self, name: WeightName) -> Result<Option<HostTensor>, ModelError>;

    /// A matrix weight (`[out, in]`) in a block format, or `Ok(None)` when absent: the
    /// source's own 4- or 5-bit blocks when `keep_native` and it has them, else 8-bit blocks. The
    /// default quantizes what [`WeightSource::load`] gives to 8 bits; a source that can read a
    /// few rows at a time (GGUF) overrides it so that no tensor is ever held whole as `f32`.
    fn load_quant(
        &mut self,
        name: WeightName,
        _keep_native: bool,
    ) -> Result<Option<QuantWeight>, ModelError> {
        Ok(self.load(name)?.map(|t| {
            let rows = t.shape.first().copied().unwrap_or(0);
            QuantWeight::Q8(Q8Matrix::quantize(
                &t.data,
                rows,
                t.data.len() / rows.max(1),
            ))
        }))
    }
}

/// Off the CPU fast paths, forward steps of at most this many tokens per sequence use the
/// matmul attention path, longer ones burn's fused attention.
const DECODE_MAX_S: usize = 4;

/// The attention mask of one forward step, in the form its attention path wants.
enum AttnMask<B: Backend> {
    /// `[b, 1, rows, cap]`, true = masked, for the fused attention kernel.
    Bool(Tensor<B, 4, Bool>),
    /// `[b, kv_h, rows, cap]`, 0 or -inf, added to the scores.
    Bias(Tensor<B, 4>),
    /// `[b, rows, cols]` on the host, true = masked, for the CPU attention kernel
    /// ([`cpu::attention`]), prefill and decode.
    Host(Vec<bool>),
}

/// What every layer of one forward step shares (see [`Llama::forward`]).
struct Step<B: Backend> {
    /// Sequences in the batch.
    b: usize,
    /// New tokens per sequence.
    s: usize,
    /// The first cache slot this step writes.
    start: usize,
    /// RoPE position of every new token, `b × s` row-major.
    positions: Vec<i64>,
    /// Slots of the shared prefix before the batch's own.
    prefix_len: usize,
    /// The mask, in the form the attention path wants.
    mask: AttnMask<B>,
    /// RoPE angles `[b, s, 1, d/2]` (cos, sin) for the burn-ops path; `None` on flex, whose
    /// kernel reads the host tables.
    angles: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
}

/// Random weights of a given shape (N(0, 0.02), norms at 1), for benchmarks and GPU runs
/// where a real checkpoint cannot travel.
#[derive(Debug)]
pub struct RandomWeights {
    cfg: LlamaConfig,
    rng: rand::rngs::StdRng,
}

impl RandomWeights {
    /// Weights for `cfg`, reproducible from `seed`.
    pub fn new(cfg: LlamaConfig, seed: u64) -> Self {
        use rand::SeedableRng;
        RandomWeights {
            cfg,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }
}

impl WeightSource for RandomWeights {
    fn load(&mut self, name: WeightName) -> Result<Option<HostTensor>, ModelError> {
        use rand::Rng;
        let c = &self.cfg;
        let (qd, kd) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let (shape, ones) = match name {
            WeightName::Embedding | WeightName::Output => (vec![c.vocab, c.hidden], false),
            WeightName::OutputNorm => (vec![c.hidden], true),
            WeightName::Layer(_, w) => match w {
                LayerWeight::AttnNorm | LayerWeight::FfnNorm => (vec![c.hidden], true),
                LayerWeight::Q => (vec![qd, c.hidden], false),
                LayerWeight::K | LayerWeight::V => (vec![kd, c.hidden], false),
                LayerWeight::QBias => (vec![qd], false),
                LayerWeight::KBias | LayerWeight::VBias => (vec![kd], false),
                LayerWeight::O => (vec![c.hidden, qd], false),
                LayerWeight::Gate | LayerWeight::Up => (vec![c.ffn, c.hidden], false),
                LayerWeight::Down => (vec![c.hidden, c.ffn], false),
            },
        };
        let n: usize = shape.iter().product();
        let data = if ones {
            vec![1.0; n]
        } else {
            // Uniform with the standard deviation 0.02 of the usual init: cheap and bounded.
            let a = 0.02 * 3f32.sqrt();
            (0..n).map(|_| self.rng.random_range(-a..a)).collect()
        };
        Ok(Some(HostTensor { data, shape }))
    }
}

/// One decoder block's tensors on the device.
#[derive(Debug, Clone)]
struct Block<B: Backend> {
    attn_norm: Tensor<B, 2>,
    /// `hidden → (h + 2·kv_h)·d`
    wqkv: Projection<B>,
    /// `[1, (h + 2·kv_h)·d]`
    bqkv: Option<Tensor<B, 2>>,
    /// `h·d → hidden`
    wo: Projection<B>,
    ffn_norm: Tensor<B, 2>,
    /// `hidden → 2·ffn`
    w_gate_up: Projection<B>,
    /// `ffn → hidden`
    w_down: Projection<B>,
}

/// A block's linear map: its weight, and a LoRA adapter's update kept apart from it, so that
/// model versions trained as adapters share one copy of the base weights (S-LoRA's and vLLM's
/// multi-LoRA serving) and a block-format base keeps its blocks exact under the update.
#[derive(Debug, Clone)]
struct Projection<B: Backend> {
    weight: Linear<B>,
    low_rank: Option<LowRankUpdate<B>>,
}

/// `x ↦ (x·down)·up`, `down` `[in, R]`, `up` `[R, out]` with the adapter's scale folded in; a
/// fused projection (q/k/v, gate/up) stacks its parts' ranks into `R`, `up` block diagonal.
#[derive(Debug, Clone)]
enum LowRankUpdate<B: Backend> {
    /// Beside a dense weight, on its device in its float type.
    Device(Tensor<B, 2>, Tensor<B, 2>),
    /// Beside a block weight, on the host, `(A [R, in], up [R, out])` (`A = downᵀ`): added to
    /// the block product's output before it becomes a tensor (no extra tensor ops).
    Host(Arc<(HostTensor, HostTensor)>),
}

impl<B: Backend> Projection<B> {
    fn new(weight: Linear<B>) -> Self {
        Projection {
            weight,
            low_rank: None,
        }
    }

    /// `x·W`, plus the low-rank update when there is one.
    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        if let (Linear::Quant(w), Some(LowRankUpdate::Host(u))) = (&self.weight, &self.low_rank) {
            let rows = x.dims()[0];
            return cpu::quant_product_segments(&x, w, &[(rows, Some((&u.0, &u.1)))]);
        }
        match self.update(x.clone()) {
            Some(update) => self.weight.forward(x) + update,
            None => self.weight.forward(x),
        }
    }

    /// The low-rank update's share of `x`'s product, `(x·down)·up`, when there is one.
    fn update(&self, x: Tensor<B, 2>) -> Option<Tensor<B, 2>> {
        match self.low_rank.as_ref()? {
            LowRankUpdate::Device(down, up) => Some(x.matmul(down.clone()).matmul(up.clone())),
            // Not built by `with_low_rank` (host updates go with block weights), but correct.
            LowRankUpdate::Host(u) => {
                let dev = |t: &HostTensor| -> Tensor<B, 2> {
                    let shape = [t.shape[0], t.shape[1]];
                    Tensor::from_data(TensorData::new(t.data.clone(), shape), &x.device())
                };
                Some(x.clone().matmul(dev(&u.0).transpose()).matmul(dev(&u.1)))
            }
        }
    }

    /// `x·W` for the weight every projection of `segments` shares (model versions over one
    /// base), plus, for each segment of `x`'s rows (`(rows, projection)`, in order, covering
    /// every row), that projection's own low-rank update: one read of the base weight for every
    /// version of a joint pass, each adapter applied to its own rows only (S-LoRA's and vLLM's
    /// multi-LoRA batches).
    fn forward_segments(segments: &[(usize, &Projection<B>)], x: Tensor<B, 2>) -> Tensor<B, 2> {
        let [(_, first), rest @ ..] = segments else {
            return x; // no segment: no rows to project (never called so)
        };
        if rest.iter().all(|(_, p)| first.same_update(p)) {
            return first.forward(x);
        }
        if let Linear::Quant(w) = &first.weight {
            let host: Option<Vec<(usize, Option<cpu::HostUpdate<'_>>)>> = (segments.iter())
                .map(|(n, p)| match &p.low_rank {
                    None => Some((*n, None)),
                    Some(LowRankUpdate::Host(u)) => Some((*n, Some((&u.0, &u.1)))),
                    Some(LowRankUpdate::Device(..)) => None,
                })
                .collect();
            if let Some(host) = host {
                return cpu::quant_product_segments(&x, w, &host);
            }
        }
        let y = first.weight.forward(x.clone());
        let [_, out] = y.dims();
        let mut updates = Vec::with_capacity(segments.len());
        let mut row = 0;
        for &(n, p) in segments {
            let part = x.clone().narrow(0, row, n);
            updates.push(
                p.update(part)
                    .unwrap_or_else(|| Tensor::zeros([n, out], (&y.device(), y.dtype()))),
            );
            row += n;
        }
        y + Tensor::cat(updates, 0)
    }

    /// Whether `other` adds the same update as `self` (both none, or one shared host update);
    /// two device updates are taken as different (telling needs reading them).
    fn same_update(&self, other: &Projection<B>) -> bool {
        match (&self.low_rank, &other.low_rank) {
            (None, None) => true,
            (Some(LowRankUpdate::Host(a)), Some(LowRankUpdate::Host(b))) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// One projection's LoRA update as an adapter stores it (PEFT layout): `ΔW = scale·B·A`, with
/// `a` `[r, in]` and `b` `[out, r]`.
#[derive(Debug, Clone, Copy)]
pub struct LowRank<'a> {
    /// `A`, `[r, in]`.
    pub a: &'a HostTensor,
    /// `B`, `[out, r]`.
    pub b: &'a HostTensor,
    /// `alpha / r`.
    pub scale: f32,
}

/// The `down` `[inner, R]` and `up` `[R, Σ out]` host matrices of the updates of a fused projection's
/// `parts` (`(role, out)` in stacking order), or `None` when none of them has one.
fn fused_low_rank<'a>(
    layer: usize,
    parts: &[(LayerWeight, usize)],
    inner: usize,
    update: &impl Fn(usize, LayerWeight) -> Option<LowRank<'a>>,
) -> Result<Option<(HostTensor, HostTensor)>, ModelError> {
    let total_out: usize = parts.iter().map(|p| p.1).sum();
    let mut found = Vec::new();
    let mut offset = 0;
    for &(role, out) in parts {
        if let Some(u) = update(layer, role) {
            let r = u.a.shape.first().copied().unwrap_or(0);
            if r == 0 || u.a.shape != [r, inner] || u.b.shape != [out, r] {
                return Err(ModelError::Weight {
                    name: format!("{:?}", WeightName::Layer(layer, role)),
                    problem: format!(
                        "adapter A {:?} and B {:?} do not fit a [{out}, {inner}] weight",
                        u.a.shape, u.b.shape
                    ),
                });
            }
            found.push((u, r, offset, out));
        }
        offset += out;
    }
    if found.is_empty() {
        return Ok(None);
    }
    let rank: usize = found.iter().map(|f| f.1).sum();
    let mut down = vec![0f32; inner * rank];
    let mut up = vec![0f32; rank * total_out];
    let mut col = 0;
    for (u, r, offset, out) in found {
        for k in 0..r {
            for i in 0..inner {
                down[i * rank + col + k] = u.a.data[k * inner + i];
            }
            for o in 0..out {
                up[(col + k) * total_out + offset + o] = u.scale * u.b.data[o * r + k];
            }
        }
        col += r;
    }
    let down = HostTensor {
        data: down,
        shape: vec![inner, rank],
    };
    let up = HostTensor {
        data: up,
        shape: vec![rank, total_out],
    };
    Ok(Some((down, up)))
}

/// The weight of a linear map `x ↦ x·W`, in the form the model's [`Precision`] keeps it.
#[derive(Debug, Clone)]
enum Linear<B: Backend> {
    /// `[in, out]` on the device, in the model's float type.
    Dense(Tensor<B, 2>),
    /// `[out, in]` blocks on the host, multiplied by the CPU kernels of [`super::quant`].
    Quant(Arc<QuantWeight>),
}

impl<B: Backend> Linear<B> {
    /// Puts `[out, in]` weights (Hugging Face layout, `out` rows of `inner` values) on the
    /// device in the float type of `precision` (block formats load through
    /// [`WeightSource::load_quant`] instead).
    fn dense(
        data: Vec<f32>,
        out: usize,
        inner: usize,
        precision: Precision,
        device: &B::Device,
    ) -> Self {
        let t = transpose_host(&data, out, inner);
        Linear::Dense(Tensor::from_data(
            TensorData::new(t, [inner, out]),
            (device, precision.dtype()),
        ))
    }

    /// `x·W` for `x` `[rows, in]`.
    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match self {
            Linear::Dense(w) => x.matmul(w.clone()),
            Linear::Quant(w) => cpu::quant_product(&x, w),
        }
    }

    /// Bytes the weight holds.
    fn bytes(&self) -> usize {
        match self {
            Linear::Dense(w) => dense_bytes(w),
            Linear::Quant(w) => w.bytes(),
        }
    }
}

/// Bytes a dense tensor holds in its float type.
fn dense_bytes<B: Backend, const D: usize>(t: &Tensor<B, D>) -> usize {
    t.shape().num_elements() * t.dtype().size()
}

/// The token embedding `[vocab, hidden]`, dense on the device or as blocks on the host.
#[derive(Debug, Clone)]
enum Embedding<B: Backend> {
    /// On the device, looked up with `select`.
    Dense(Tensor<B, 2>),
    /// On the host; looked-up rows are dequantized.
    Quant(Arc<QuantWeight>),
}

/// A LLaMA-family decoder with its weights on a device.
#[derive(Debug, Clone)]
pub struct Llama<B: Backend> {
    cfg: LlamaConfig,
    device: B::Device,
    /// The float type of weights, activations and the KV cache.
    dtype: DType,
    /// `[vocab, hidden]`
    embed: Embedding<B>,
    blocks: Vec<Block<B>>,
    /// `[1, hidden]`
    norm: Tensor<B, 2>,
    /// `hidden → vocab` (the embedding's own storage when tied).
    output: Linear<B>,
    /// RoPE tables `(cos, sin)`, `[max_pos, d/2]` each, on the device for the burn-ops path;
    /// `None` on flex, whose CPU path reads `rope_host` (a copy there would be 17 MB
    /// of a Qwen2.5's 32k positions, never read).
    rope_device: Option<(Tensor<B, 2>, Tensor<B, 2>)>,
    /// The same tables on the host, for the CPU fast path ([`cpu::split_rope_fold`]).
    rope_host: std::sync::Arc<(Vec<f32>, Vec<f32>)>,
    /// Host KV buffers of finished sequences, for the next ones of this model.
    kv_spare: Arc<SpareBuffers>,
}

fn shape_err(name: WeightName, want: &[usize], got: &[usize]) -> ModelError {
    ModelError::Weight {
        name: format!("{name:?}"),
        problem: format!("shape {got:?}, expected {want:?}"),
    }
}

fn required(
    src: &mut dyn WeightSource,
    name: WeightName,
    want: &[usize],
) -> Result<HostTensor, ModelError> {
    let t = src.load(name)?.ok_or_else(|| ModelError::Weight {
        name: format!("{name:?}"),
        problem: "missing".into(),
    })?;
    if t.shape != want {
        return Err(shape_err(name, want, &t.shape));
    }
    Ok(t)
}

/// Transposes a row-major `[rows, cols]` matrix.
fn transpose_host(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; data.len()];
    // Blocked so both sides stay in cache for the large matrices.
    const T: usize = 32;
    for r0 in (0..rows).step_by(T) {
        for c0 in (0..cols).step_by(T) {
            for r in r0..(r0 + T).min(rows) {
                for c in c0..(c0 + T).min(cols) {
                    out[c * rows + r] = data[r * cols + c];
                }
            }
        }
    }
    out
}

/// A required matrix weight `[out, inner]` in the block format `precision` asks for (the
/// source's own 4- or 5-bit blocks under `native` where it has them, else 8-bit).
fn required_quant(
    src: &mut dyn WeightSource,
    name: WeightName,
    out: usize,
    inner: usize,
    precision: Precision,
) -> Result<QuantWeight, ModelError> {
    let keep_native = precision == Precision::Native;
    let q = src
        .load_quant(name, keep_native)?
        .ok_or_else(|| ModelError::Weight {
            name: format!("{name:?}"),
            problem: "missing".into(),
        })?;
    if (q.rows(), q.cols()) != (out, inner) {
        return Err(shape_err(name, &[out, inner], &[q.rows(), q.cols()]));
    }
    Ok(q)
}

/// A linear map from the `[out_i, inner]` weights `parts`, stacked along `out` (one fused
/// projection: q/k/v, gate/up), in the form `precision` keeps it. In a block format each part is
/// read as blocks directly ([`WeightSource::load_quant`]).
fn load_linear<B: Backend>(
    src: &mut dyn WeightSource,
    parts: &[(WeightName, usize)],
    inner: usize,
    precision: Precision,
    device: &B::Device,
    arena: &WeightArena,
) -> Result<Linear<B>, ModelError> {
    if precision.quantized() {
        let mut mats = Vec::with_capacity(parts.len());
        for &(name, out) in parts {
            mats.push(required_quant(src, name, out, inner, precision)?);
        }
        return Ok(Linear::Quant(Arc::new(
            QuantWeight::stack(mats).laid_out_in(arena),
        )));
    }
    let mut tensors = Vec::with_capacity(parts.len());
    for &(name, out) in parts {
        tensors.push(required(src, name, &[out, inner])?);
    }
    let (data, out) = stack_rows(&tensors);
    drop(tensors);
    Ok(Linear::dense(data, out, inner, precision, device))
}

/// Concatenates `[out_i, in]` matrices along `out` (one fused projection): the values and
/// `Σ out_i`.
fn stack_rows(parts: &[HostTensor]) -> (Vec<f32>, usize) {
    let total_out: usize = parts.iter().map(|p| p.shape[0]).sum();
    let mut stacked = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
    for p in parts {
        stacked.extend_from_slice(&p.data);
    }
    (stacked, total_out)
}

impl<B: Backend> Llama<B> {
    /// Loads every weight from `src` onto `device` in `precision` (converted one tensor at a
    /// time as it is uploaded), checking shapes against `cfg`.
    pub fn load(
        cfg: LlamaConfig,
        src: &mut dyn WeightSource,
        device: &B::Device,
        precision: Precision,
    ) -> Result<Self, ModelError> {
        if !precision.supported_on::<B>(device) {
            return Err(ModelError::Config(format!(
                "{precision} is not supported by the {} backend on this device",
                B::name(device)
            )));
        }
        if precision.quantized() && !cpu::is_flex(&Tensor::<B, 2>::zeros([1, 1], device)) {
            return Err(ModelError::Config(format!(
                "{precision} weights run on the CPU backend only, not on {}; use bf16 or f16 there",
                B::name(device)
            )));
        }
        let dtype = precision.dtype();
        // The block weights' memory, on huge pages (see `quant::arena`).
        let arena = WeightArena::new();
        let (h, d, kvh) = (cfg.hidden, cfg.head_dim, cfg.n_kv_heads);
        let to_dev = |data: Vec<f32>, shape: [usize; 2]| -> Tensor<B, 2> {
            Tensor::from_data(TensorData::new(data, shape), (device, dtype))
        };
        let (embed, tied_output) = if precision.quantized() {
            let q = required_quant(src, WeightName::Embedding, cfg.vocab, h, precision)?;
            let q = Arc::new(q.laid_out_in(&arena));
            (Embedding::Quant(q.clone()), Linear::Quant(q))
        } else {
            let embed = required(src, WeightName::Embedding, &[cfg.vocab, h])?;
            let e = to_dev(embed.data, [cfg.vocab, h]);
            (Embedding::Dense(e.clone()), Linear::Dense(e.transpose()))
        };
        let norm = required(src, WeightName::OutputNorm, &[h])?;
        let norm = to_dev(norm.data, [1, h]);
        // A checkpoint that declares an untied head but lacks it falls back to tying, which is
        // what HF does when `lm_head` is absent.
        let output = if cfg.tie_embeddings {
            tied_output
        } else if precision.quantized() {
            match src.load_quant(WeightName::Output, precision == Precision::Native)? {
                Some(q) if (q.rows(), q.cols()) == (cfg.vocab, h) => {
                    Linear::Quant(Arc::new(q.laid_out_in(&arena)))
                }
                Some(q) => {
                    let got = [q.rows(), q.cols()];
                    return Err(shape_err(WeightName::Output, &[cfg.vocab, h], &got));
                }
                None => tied_output,
            }
        } else {
            match src.load(WeightName::Output)? {
                Some(t) if t.shape == [cfg.vocab, h] => {
                    Linear::dense(t.data, cfg.vocab, h, precision, device)
                }
                Some(t) => return Err(shape_err(WeightName::Output, &[cfg.vocab, h], &t.shape)),
                None => tied_output,
            }
        };
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        let qd = cfg.n_heads * d;
        let kd = kvh * d;
        for l in 0..cfg.n_layers {
            let w = |lw| WeightName::Layer(l, lw);
            let attn_norm = required(src, w(LayerWeight::AttnNorm), &[h])?;
            // In the checkpoint's order (q, k, v, biases, o, norm, gate, up, down), which
            // `RandomWeights` draws in.
            let linear = |src: &mut dyn WeightSource, parts: &[(LayerWeight, usize)], inner| {
                let parts: Vec<_> = parts.iter().map(|&(lw, out)| (w(lw), out)).collect();
                load_linear::<B>(src, &parts, inner, precision, device, &arena)
            };
            let qkv_parts = [
                (LayerWeight::Q, qd),
                (LayerWeight::K, kd),
                (LayerWeight::V, kd),
            ];
            let wqkv = Projection::new(linear(src, &qkv_parts, h)?);
            let bqkv = if cfg.qkv_bias {
                let bq = required(src, w(LayerWeight::QBias), &[qd])?;
                let bk = required(src, w(LayerWeight::KBias), &[kd])?;
                let bv = required(src, w(LayerWeight::VBias), &[kd])?;
                let mut b = bq.data;
                b.extend_from_slice(&bk.data);
                b.extend_from_slice(&bv.data);
                Some(to_dev(b, [1, qd + 2 * kd]))
            } else {
                None
            };
            let wo = Projection::new(linear(src, &[(LayerWeight::O, h)], qd)?);
            let ffn_norm = required(src, w(LayerWeight::FfnNorm), &[h])?;
            let gate_up = [(LayerWeight::Gate, cfg.ffn), (LayerWeight::Up, cfg.ffn)];
            let w_gate_up = Projection::new(linear(src, &gate_up, h)?);
            let w_down = Projection::new(linear(src, &[(LayerWeight::Down, h)], cfg.ffn)?);
            blocks.push(Block {
                attn_norm: to_dev(attn_norm.data, [1, h]),
                wqkv,
                bqkv,
                wo,
                ffn_norm: to_dev(ffn_norm.data, [1, h]),
                w_gate_up,
                w_down,
            });
        }
        let rope_host = std::sync::Arc::new(rope_tables(cfg.max_seq_len, d, cfg.rope_theta));
        let half = d / 2;
        let rope_device = (!cpu::is_flex(&norm)).then(|| {
            (
                to_dev(rope_host.0.clone(), [cfg.max_seq_len, half]),
                to_dev(rope_host.1.clone(), [cfg.max_seq_len, half]),
            )
        });
        // Loading freed about as much as it kept (rows read, parts stacked, panels laid out):
        // hand those pages back now rather than when this thread next goes idle (11 MB of the
        // 135M's 153 MB resident).
        crate::memory::release_free_memory();
        Ok(Llama {
            cfg,
            device: device.clone(),
            dtype,
            embed,
            blocks,
            norm,
            output,
            rope_device,
            rope_host,
            kv_spare: Arc::default(),
        })
    }

    /// This model with LoRA updates applied unmerged: every weight stays shared with `self` (a
    /// clone of a tensor or block matrix is a reference), and each projection `update` names
    /// gets `x·W + scale·(x·Aᵀ)·Bᵀ`, in the model's float type. Gives the merged model's outputs
    /// (up to rounding) at the cost of the adapter's memory instead of a copy of the weights;
    /// updates already on `self` are replaced.
    pub fn with_low_rank<'a>(
        &self,
        update: impl Fn(usize, LayerWeight) -> Option<LowRank<'a>>,
    ) -> Result<Llama<B>, ModelError> {
        let cfg = &self.cfg;
        let (h, qd, kd) = (
            cfg.hidden,
            cfg.n_heads * cfg.head_dim,
            cfg.n_kv_heads * cfg.head_dim,
        );
        let to_dev = |data: Vec<f32>, shape: [usize; 2]| -> Tensor<B, 2> {
            Tensor::from_data(TensorData::new(data, shape), (&self.device, self.dtype))
        };
        let mut out = self.clone();
        for (l, blk) in out.blocks.iter_mut().enumerate() {
            let qkv = [
                (LayerWeight::Q, qd),
                (LayerWeight::K, kd),
                (LayerWeight::V, kd),
            ];
            let gate_up = [(LayerWeight::Gate, cfg.ffn), (LayerWeight::Up, cfg.ffn)];
            for (proj, parts, inner) in [
                (&mut blk.wqkv, &qkv[..], h),
                (&mut blk.wo, &[(LayerWeight::O, h)][..], qd),
                (&mut blk.w_gate_up, &gate_up[..], h),
                (&mut blk.w_down, &[(LayerWeight::Down, h)][..], cfg.ffn),
            ] {
                let found = fused_low_rank(l, parts, inner, &update)?;
                proj.low_rank = found.map(|(down, up)| match proj.weight {
                    Linear::Quant(_) => {
                        // The host product wants A's rows: `down` transposed, `[R, inner]`.
                        let (inner, rank) = (down.shape[0], down.shape[1]);
                        let a = HostTensor {
                            data: transpose_host(&down.data, inner, rank),
                            shape: vec![rank, inner],
                        };
                        LowRankUpdate::Host(Arc::new((a, up)))
                    }
                    Linear::Dense(_) => {
                        let dev = |t: HostTensor| to_dev(t.data, [t.shape[0], t.shape[1]]);
                        LowRankUpdate::Device(dev(down), dev(up))
                    }
                });
            }
        }
        Ok(out)
    }

    /// Whether the two models hold the same block matrices (not copies): true for a model and
    /// what [`Llama::with_low_rank`] made of it in a block format.
    #[cfg(test)]
    pub(crate) fn shares_block_weights_with(&self, other: &Llama<B>) -> bool {
        let same = |a: &Linear<B>, b: &Linear<B>| match (a, b) {
            (Linear::Quant(x), Linear::Quant(y)) => Arc::ptr_eq(x, y),
            _ => false,
        };
        self.blocks.len() == other.blocks.len()
            && same(&self.output, &other.output)
            && self.blocks.iter().zip(&other.blocks).all(|(x, y)| {
                same(&x.wqkv.weight, &y.wqkv.weight)
                    && same(&x.wo.weight, &y.wo.weight)
                    && same(&x.w_gate_up.weight, &y.w_gate_up.weight)
                    && same(&x.w_down.weight, &y.w_down.weight)
            })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Bytes the base model's weights hold in memory (embedding, every block's weights and
    /// biases, norms, an untied output head; not a LoRA version's update, not the RoPE
    /// tables, not a KV cache): what a process serving it pays for the model before anything
    /// runs, to set beside its file's size and the process's resident memory.
    pub fn weight_bytes(&self) -> usize {
        let dense = dense_bytes::<B, 2>;
        let embed = match &self.embed {
            Embedding::Dense(t) => dense(t),
            Embedding::Quant(q) => q.bytes(),
        };
        let tied = match (&self.embed, &self.output) {
            (Embedding::Quant(e), Linear::Quant(o)) => Arc::ptr_eq(e, o),
            // A dense tied head is the embedding's transpose, the same storage.
            (Embedding::Dense(_), Linear::Dense(_)) => self.cfg.tie_embeddings,
            _ => false,
        };
        let output = if tied { 0 } else { self.output.bytes() };
        let blocks: usize = (self.blocks.iter())
            .map(|b| {
                dense(&b.attn_norm)
                    + dense(&b.ffn_norm)
                    + b.bqkv.as_ref().map_or(0, dense)
                    + [&b.wqkv, &b.wo, &b.w_gate_up, &b.w_down]
                        .iter()
                        .map(|p| p.weight.bytes())
                        .sum::<usize>()
            })
            .sum();
        embed + output + blocks + dense(&self.norm)
    }

    /// How many of the model's block matrices (the embedding, every projection, an untied
    /// head) are in a weight arena, on its huge pages, and how many it has: loaded in a block
    /// format on a CPU with panels, all of them (see `quant::arena`).
    pub fn block_matrices_in_arena(&self) -> (usize, usize) {
        let mut matrices: Vec<&Arc<QuantWeight>> = Vec::new();
        if let Embedding::Quant(q) = &self.embed {
            matrices.push(q);
        }
        let linears = (self.blocks.iter())
            .flat_map(|b| [&b.wqkv, &b.wo, &b.w_gate_up, &b.w_down].map(|p| &p.weight))
            .chain([&self.output]);
        for l in linears {
            // A tied head is the embedding's own matrix, counted once.
            if let Linear::Quant(q) = l {
                if !matrices.iter().any(|m| Arc::ptr_eq(m, q)) {
                    matrices.push(q);
                }
            }
        }
        let placed = matrices.iter().filter(|q| q.placed()).count();
        (placed, matrices.len())
    }

    /// The device the weights live on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// The float type of the weights, activations and KV cache (logits are always `f32`).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Gives back the KV blocks kept for this model's next batches (shared by every version
    /// made from the same base by [`Llama::with_low_rank`]).
    pub fn release_kv_spare(&self) {
        self.kv_spare.clear();
    }

    /// An empty KV cache for this model: `batch` sequences, room for `capacity` slots.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> KvCache<B> {
        KvCache::new(
            &self.cfg,
            (batch, capacity),
            &self.device,
            self.dtype,
            &self.kv_spare,
        )
    }

    /// Runs `s` new tokens per sequence through the model, appending their K/V to `cache`
    /// at slots `cache.len()..cache.len() + s`, and returns the logits of the last slot,
    /// `[batch, vocab]`.
    ///
    /// `tokens` is `batch × s` row-major; `None` marks padding (used to right-align prompts of
    /// different lengths, so every sequence's last real token sits in the last slot). Padding
    /// slots are never attended to and do not advance a sequence's position.
    pub fn forward(
        &self,
        tokens: &[Option<u32>],
        s: usize,
        cache: &mut KvCache<B>,
    ) -> Result<Tensor<B, 2>, ModelError> {
        // On the CPU every product of a layer fans out over rayon's pool. From a thread outside
        // the pool (the caller's, the server's), each of the ~10 fan-outs per layer injects a
        // job and parks this thread on a futex until the pool has run it, the workers falling
        // asleep and being woken in between: at batch 1 on SmolLM2 that cost a third of every
        // decode step (perf: sched_yield, futex wake-ups). Run the whole pass on a worker
        // instead: one hand-off per pass, and the fan-outs inside it are rayon joins. (Already
        // on a worker, `scope` runs in place.)
        let mut pass = [Pass {
            model: self,
            tokens,
            s,
            cache,
        }];
        let logits = rayon::scope(|_| Self::forward_on_worker(&mut pass))?;
        logits
            .into_iter()
            .next()
            .ok_or_else(|| ModelError::Request("a forward pass lost its logits".into()))
    }

    /// [`Llama::forward`] for several model versions over the same base weights (LoRA
    /// adapters over one base, [`Llama::with_low_rank`]) in one pass: each pass's rows go
    /// through its own version (its adapters, its cache, its positions and mask), but every
    /// product reads the base weights once for all of them, as one batch would: what a decode
    /// step of every version being served costs a memory-bound machine is one step's weights,
    /// not one per version. Returns each pass's logits, `[its batch, vocab]`, in order. Every
    /// version must share `passes[0]`'s base ([`Llama::shares_base_with`]).
    pub fn forward_jointly(passes: &mut [Pass<'_, B>]) -> Result<Vec<Tensor<B, 2>>, ModelError> {
        let Some(first) = passes.first() else {
            return Ok(Vec::new());
        };
        if let Some(i) = passes
            .iter()
            .position(|p| !p.model.shares_base_with(first.model))
        {
            return Err(ModelError::Request(format!(
                "pass {i} is over other base weights than pass 0: versions of one joint pass \
                 must share their base"
            )));
        }
        rayon::scope(|_| Self::forward_on_worker(passes))
    }

    /// Whether the two are versions of the same base weights (one loaded model, or what
    /// [`Llama::with_low_rank`] made of it): they can run in one [`Llama::forward_jointly`].
    pub fn shares_base_with(&self, other: &Llama<B>) -> bool {
        Arc::ptr_eq(&self.kv_spare, &other.kv_spare)
    }

    /// [`Llama::forward_jointly`]'s pass, on whatever thread calls it. The passes' rows are
    /// stacked (pass 0's first) for the products and the norms; attention runs per pass, over
    /// its own cache.
    fn forward_on_worker(passes: &mut [Pass<'_, B>]) -> Result<Vec<Tensor<B, 2>>, ModelError> {
        let Some(base) = passes.first().map(|p| p.model) else {
            return Ok(Vec::new());
        };
        let (cfg, eps) = (&base.cfg, base.cfg.rms_eps);
        // Every pass's tokens checked before any cache is touched.
        let mut ids = Vec::with_capacity(passes.len());
        for p in passes.iter() {
            ids.push(base.token_ids(p.tokens, p.cache.batch(), p.s)?);
        }
        let mut steps = Vec::with_capacity(passes.len());
        for p in passes.iter_mut() {
            let (b, s) = (p.cache.batch(), p.s);
            let plan = p.cache.append(p.tokens, s, cfg.max_seq_len)?;
            steps.push(base.step(plan, p.cache, b, s));
        }
        // Each pass's rows in the stacked activations, `b·s`.
        let rows: Vec<usize> = steps.iter().map(|st| st.b * st.s).collect();
        let embedded = ids.iter().map(|ids| base.embed_tokens(ids)).collect();
        let mut x = cat_rows(embedded); // [Σ b·s, hidden]
        for layer in 0..base.blocks.len() {
            // The block of every pass's version: one base weight, each its own update.
            let blocks: Vec<&Block<B>> = passes.iter().map(|p| &p.model.blocks[layer]).collect();
            let shared = blocks[0];
            let h = rms_norm(x.clone(), shared.attn_norm.clone(), eps);
            x = x + base.self_attention(&blocks, layer, h, &steps, &rows, passes)?;
            let h = rms_norm(x.clone(), shared.ffn_norm.clone(), eps);
            x = x + base.mlp(&blocks, h, &rows);
        }
        Ok(base.logits_of_last(x, &steps))
    }

    /// The embeddings `[ids, hidden]` of the tokens.
    fn embed_tokens(&self, ids: &[u32]) -> Tensor<B, 2> {
        let h = self.cfg.hidden;
        match &self.embed {
            Embedding::Dense(e) => {
                let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
                let n = ids.len();
                let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [n]), &self.device);
                e.clone().select(0, ids)
            }
            Embedding::Quant(q) => {
                let mut rows = vec![0f32; ids.len() * h];
                for (row, &id) in rows.chunks_exact_mut(h).zip(ids) {
                    q.dequantize_row(id as usize, row);
                }
                Tensor::from_data(TensorData::new(rows, [ids.len(), h]), &self.device)
            }
        }
    }

    /// The token ids (padding as id 0: it is masked), or an error for an id outside the
    /// vocabulary or a count that is not `b × s`.
    fn token_ids(
        &self,
        tokens: &[Option<u32>],
        b: usize,
        s: usize,
    ) -> Result<Vec<u32>, ModelError> {
        if s == 0 || tokens.len() != b * s {
            return Err(ModelError::Request(format!(
                "{} tokens for a batch of {b} × {s}",
                tokens.len()
            )));
        }
        let mut ids = Vec::with_capacity(b * s);
        for t in tokens {
            let id = t.unwrap_or(0);
            if id as usize >= self.cfg.vocab {
                return Err(ModelError::Request(format!(
                    "token id {id} outside the vocabulary of {}",
                    self.cfg.vocab
                )));
            }
            ids.push(id);
        }
        Ok(ids)
    }

    /// What every layer of one forward step shares: positions, the mask in the form the
    /// backend's attention path wants, and (burn-ops path) the RoPE angles.
    fn step(&self, plan: AppendPlan, cache: &KvCache<B>, b: usize, s: usize) -> Step<B> {
        let (d, kvh) = (self.cfg.head_dim, self.cfg.n_kv_heads);
        let flex = cpu::is_flex(&self.norm);
        // Present exactly off flex (see `rope_device`).
        let angles = self.rope_device.as_ref().map(|(cos, sin)| {
            let pos = Tensor::<B, 1, Int>::from_data(
                TensorData::new(plan.positions.clone(), [b * s]),
                &self.device,
            );
            let half = d / 2;
            let cos = cos.clone().select(0, pos.clone());
            let sin = sin.clone().select(0, pos);
            (cos.reshape([b, s, 1, half]), sin.reshape([b, s, 1, half]))
        });
        // Mask columns: the shared prefix (if any), then the batch's own slots.
        let prefix_len = cache.prefix_len();
        let (rows, cols) = (self.cfg.n_rep() * s, prefix_len + cache.capacity());
        let mask = if flex {
            AttnMask::Host(plan.mask)
        } else if s <= DECODE_MAX_S {
            // Additive bias for the matmul path, expanded over kv heads on the host so the
            // device add needs no broadcasting.
            let mut bias = Vec::with_capacity(b * kvh * rows * cols);
            for chunk in plan.mask.chunks(rows * cols) {
                for _ in 0..kvh {
                    bias.extend(
                        chunk
                            .iter()
                            .map(|&m| if m { f32::NEG_INFINITY } else { 0.0 }),
                    );
                }
            }
            AttnMask::Bias(Tensor::from_data(
                TensorData::new(bias, [b, kvh, rows, cols]),
                (&self.device, self.dtype),
            ))
        } else {
            AttnMask::Bool(Tensor::from_data(
                TensorData::new(plan.mask, [b, 1, rows, cols]),
                &self.device,
            ))
        };
        Step {
            b,
            s,
            start: plan.start,
            positions: plan.positions,
            prefix_len,
            mask,
            angles,
        }
    }

    /// Grouped-query self-attention of one layer over each pass's cache, `[Σ b·s, h·d]` after
    /// the output projection: q/k/v (every pass's rows at once, each under its version's
    /// update), then per pass RoPE, its new K/V into its cache, attention and the heads merged.
    fn self_attention(
        &self,
        blocks: &[&Block<B>],
        layer: usize,
        h: Tensor<B, 2>,
        steps: &[Step<B>],
        rows: &[usize],
        passes: &mut [Pass<'_, B>],
    ) -> Result<Tensor<B, 2>, ModelError> {
        let shared = blocks[0];
        let mut qkv = Projection::forward_segments(&segments(rows, blocks, |b| &b.wqkv), h);
        if let Some(bias) = &shared.bqkv {
            qkv = qkv + bias.clone();
        }
        let mut merged = Vec::with_capacity(passes.len());
        for ((qkv, step), pass) in split_rows(qkv, rows).into_iter().zip(steps).zip(passes) {
            let (q, k, v) = self.qkv(qkv, step)?;
            // [b, kv_h, s, d] into the cache slots of this step.
            pass.cache.write(layer, step.start, k, v)?;
            let att = self.attend(q, pass.cache, layer, step)?;
            merged.push(self.merge_heads(att, step));
        }
        let wo = segments(rows, blocks, |b| &b.wo);
        Ok(Projection::forward_segments(&wo, cat_rows(merged)))
    }

    /// The fused q/k/v projection split into queries `[b, kv_h, n_rep·s, d]` (the query heads
    /// sharing a kv head folded into rows) and keys and values `[b, kv_h, s, d]`, RoPE applied:
    /// one pass of the CPU kernel on flex, burn ops elsewhere.
    #[allow(clippy::type_complexity)]
    fn qkv(
        &self,
        qkv: Tensor<B, 2>,
        step: &Step<B>,
    ) -> Result<(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>), ModelError> {
        let cfg = &self.cfg;
        let (b, s, d, kvh) = (step.b, step.s, cfg.head_dim, cfg.n_kv_heads);
        let Some((cos, sin)) = &step.angles else {
            return cpu::split_rope_fold(&qkv, &step.positions, &self.rope_host, b, cfg)
                .ok_or_else(|| {
                    ModelError::Request("CPU RoPE kernel got tensors it cannot read".into())
                });
        };
        let (qd, kd) = (cfg.n_heads * d, kvh * d);
        let q = qkv.clone().narrow(1, 0, qd).reshape([b, s, cfg.n_heads, d]);
        let k = qkv.clone().narrow(1, qd, kd).reshape([b, s, kvh, d]);
        let v = qkv.narrow(1, qd + kd, kd).reshape([b, s, kvh, d]);
        let q = rope(q, cos.clone(), sin.clone());
        let k = rope(k, cos.clone(), sin.clone());
        Ok((
            fold_query_heads(q, kvh),
            k.swap_dims(1, 2),
            v.swap_dims(1, 2),
        ))
    }

    /// softmax(q·kᵀ/√d + mask)·v over `[shared prefix, own slots]`, by the path the backend and
    /// step want: the CPU kernel on flex (prefill and decode), burn's fused attention for a
    /// prefill elsewhere, batched matmuls for a decode elsewhere.
    fn attend(
        &self,
        q: Tensor<B, 4>,
        cache: &KvCache<B>,
        layer: usize,
        step: &Step<B>,
    ) -> Result<Tensor<B, 4>, ModelError> {
        let scale = 1.0 / (self.cfg.head_dim as f64).sqrt();
        let prefix = cache.prefix_kv(layer);
        let unreadable =
            || ModelError::Request("CPU attention kernel got tensors it cannot read".into());
        if let AttnMask::Host(m) = &step.mask {
            // More than one query token per sequence: a prefill (or a choice's tokens).
            let prefill = q.dims()[2] > self.cfg.n_rep();
            let held;
            let own = match cache.layer(layer) {
                LayerKv::Host(own) => own,
                LayerKv::Tensors(k, v) => {
                    held = (host_values(&k), host_values(&v));
                    let (Some(k), Some(v)) = (&held.0, &held.1) else {
                        return Err(unreadable());
                    };
                    OwnKv::dense(k, v, cache.capacity())
                }
            };
            return cpu::attention(&q, own, prefix, m, scale as f32, prefill)
                .ok_or_else(unreadable);
        }
        let (k_all, v_all) = cache.layer_tensors(layer);
        match &step.mask {
            AttnMask::Host(_) => Err(unreadable()),
            AttnMask::Bool(m) => {
                let (b, kvh, d, p) = (
                    step.b,
                    self.cfg.n_kv_heads,
                    self.cfg.head_dim,
                    step.prefix_len,
                );
                let (k_all, v_all) = match prefix {
                    Some((pk, pv)) => (
                        Tensor::cat(vec![pk.expand([b, kvh, p, d]), k_all], 2),
                        Tensor::cat(vec![pv.expand([b, kvh, p, d]), v_all], 2),
                    ),
                    None => (k_all, v_all),
                };
                let options = AttentionModuleOptions::default();
                Ok(attention(q, k_all, v_all, Some(m.clone()), None, options))
            }
            AttnMask::Bias(bias) => {
                Ok(self.decode_attention(q, k_all, v_all, prefix, bias, scale, step))
            }
        }
    }

    /// Decode attention as batched matmuls (a few query rows per sequence and kv head: batched
    /// matmuls parallelize over the batch, a fused kernel does not). A shared prefix is read
    /// once for the whole batch: every sequence's query rows are stacked into one matmul per
    /// kv head.
    #[allow(clippy::too_many_arguments)]
    fn decode_attention(
        &self,
        q: Tensor<B, 4>,
        k_all: Tensor<B, 4>,
        v_all: Tensor<B, 4>,
        prefix: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
        bias: &Tensor<B, 4>,
        scale: f64,
        step: &Step<B>,
    ) -> Tensor<B, 4> {
        let own = q.clone().matmul(k_all.swap_dims(2, 3));
        let Some((pk, pv)) = prefix else {
            let scores = own.mul_scalar(scale) + bias.clone();
            return softmax(scores, 3).matmul(v_all);
        };
        let (b, kvh, d, p_len) = (
            step.b,
            self.cfg.n_kv_heads,
            self.cfg.head_dim,
            step.prefix_len,
        );
        let rows = self.cfg.n_rep() * step.s;
        let stacked = q.permute([1, 0, 2, 3]).reshape([1, kvh, b * rows, d]);
        let shared = stacked
            .matmul(pk.swap_dims(2, 3))
            .reshape([kvh, b, rows, p_len])
            .permute([1, 0, 2, 3]);
        let scores = Tensor::cat(vec![shared, own], 3).mul_scalar(scale) + bias.clone();
        let probs = softmax(scores, 3);
        let own_cols = probs.dims()[3] - p_len;
        let p_shared = probs
            .clone()
            .narrow(3, 0, p_len)
            .permute([1, 0, 2, 3])
            .reshape([1, kvh, b * rows, p_len]);
        let from_prefix = p_shared
            .matmul(pv)
            .reshape([kvh, b, rows, d])
            .permute([1, 0, 2, 3]);
        probs.narrow(3, p_len, own_cols).matmul(v_all) + from_prefix
    }

    /// Attention output `[b, kv_h, n_rep·s, d]` back to `[b·s, h·d]` (heads side by side).
    fn merge_heads(&self, att: Tensor<B, 4>, step: &Step<B>) -> Tensor<B, 2> {
        let cfg = &self.cfg;
        let n_rep = cfg.n_rep();
        if matches!(step.mask, AttnMask::Host(_)) {
            if let Some(merged) = cpu::unfold_heads(&att, n_rep) {
                return merged;
            }
        }
        att.reshape([step.b, cfg.n_kv_heads, n_rep, step.s, cfg.head_dim])
            .permute([0, 3, 1, 2, 4])
            .reshape([step.b * step.s, cfg.n_heads * cfg.head_dim])
    }

    /// The SwiGLU MLP: `down(silu(gate(h)) · up(h))`, gate and up as one fused product.
    /// Each pass's `rows` under its version's updates.
    fn mlp(&self, blocks: &[&Block<B>], h: Tensor<B, 2>, rows: &[usize]) -> Tensor<B, 2> {
        let ffn = self.cfg.ffn;
        let gu = Projection::forward_segments(&segments(rows, blocks, |b| &b.w_gate_up), h);
        let act = cpu::silu_mul(&gu, ffn).unwrap_or_else(|| {
            let gate = gu.clone().narrow(1, 0, ffn);
            let up = gu.narrow(1, ffn, ffn);
            silu(gate) * up
        });
        Projection::forward_segments(&segments(rows, blocks, |b| &b.w_down), act)
    }

    /// Each pass's logits `[b, vocab]` (f32) of each sequence's last slot: only those rows go
    /// through the final norm and the output head (every pass's at once).
    fn logits_of_last(&self, x: Tensor<B, 2>, steps: &[Step<B>]) -> Vec<Tensor<B, 2>> {
        let hidden = self.cfg.hidden;
        let rows: Vec<usize> = steps.iter().map(|st| st.b * st.s).collect();
        let last = split_rows(x, &rows).into_iter().zip(steps).map(|(x, st)| {
            let (b, s) = (st.b, st.s);
            if s == 1 {
                return x;
            }
            x.reshape([b, s, hidden])
                .narrow(1, s - 1, 1)
                .reshape([b, hidden])
        });
        let last = rms_norm(
            cat_rows(last.collect()),
            self.norm.clone(),
            self.cfg.rms_eps,
        );
        let logits = self.output.forward(last);
        let logits = match self.dtype {
            DType::F32 => logits,
            _ => logits.cast(DType::F32),
        };
        let batches: Vec<usize> = steps.iter().map(|st| st.b).collect();
        split_rows(logits, &batches)
    }
}

/// One model version's share of [`Llama::forward_jointly`]: `s` new tokens for each sequence of
/// `cache` (`tokens` as [`Llama::forward`] takes them), through `model`.
pub struct Pass<'a, B: Backend> {
    /// The version these rows go through.
    pub model: &'a Llama<B>,
    /// `batch × s` tokens, row-major, `None` for padding.
    pub tokens: &'a [Option<u32>],
    /// New tokens per sequence.
    pub s: usize,
    /// The sequences' cache, appended to.
    pub cache: &'a mut KvCache<B>,
}

/// Each pass's rows beside the projection its version applies to them (`weight` of its
/// block): the segments [`Projection::forward_segments`] takes.
fn segments<'a, B: Backend>(
    rows: &[usize],
    blocks: &[&'a Block<B>],
    weight: fn(&'a Block<B>) -> &'a Projection<B>,
) -> Vec<(usize, &'a Projection<B>)> {
    (rows.iter().copied())
        .zip(blocks.iter().map(|b| weight(b)))
        .collect()
}

/// `t`'s rows cut into consecutive parts of `rows` each (`t` itself for one part).
fn split_rows<B: Backend>(t: Tensor<B, 2>, rows: &[usize]) -> Vec<Tensor<B, 2>> {
    if rows.len() == 1 {
        return vec![t];
    }
    let mut first = 0;
    rows.iter()
        .map(|&n| {
            let part = t.clone().narrow(0, first, n);
            first += n;
            part
        })
        .collect()
}

/// The parts' rows stacked in order (the part itself when there is one).
fn cat_rows<B: Backend>(mut parts: Vec<Tensor<B, 2>>) -> Tensor<B, 2> {
    if parts.len() == 1 {
        if let Some(t) = parts.pop() {
            return t;
        }
    }
    Tensor::cat(parts, 0)
}

/// Fast paths for burn's `flex` CPU backend, where a few of the model's steps cost far more
/// as burn ops than as plain loops over the tensors' memory (measured on SmolLM2-135M, batch 32):
/// - `silu(gate) * up` on the two halves of the fused gate/up product: burn-flex runs unary and
///   binary ops on the strided `narrow` views element by element through `StridedIter`
///   (about 14 ns an element, 14% of a batch-32 prefill);
/// - decode attention: as burn ops it is two batched matmuls of `batch × kv_heads` tiny
///   matrices (`[n_rep, d] x [d, cap]`), each a separate `gemm` call with its own set-up, plus a
///   softmax and a mask add: about 60 ms of a 320 ms batch-32 decode step; prefill attention:
///   burn-flex's dense kernel computes the masked half of a causal mask too;
/// - splitting q/k/v, RoPE and the GQA head fold: three `narrow`s, eight strided element-wise
///   ops, a `cat` and two permutes (~17% of a prefill), one pass here.
///
/// Each function returns `None` when the tensors are not flex `f32` tensors, and the caller
/// runs the burn ops instead (CUDA, other float types). The model module's tests check each
/// against those burn ops.
mod cpu {
    use burn::backend::flex::FlexTensor;
    use burn::tensor::backend::Backend;
    use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
    use rayon::prelude::*;
    use std::any::Any;

    /// The flex tensor behind `t`, contiguous (copied only when it is not), if `t` is a flex
    /// `f32` tensor.
    fn flex<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Option<FlexTensor> {
        let TensorPrimitive::Float(p) = t.clone().into_primitive() else {
            return None;
        };
        let ft = (&p as &dyn Any).downcast_ref::<FlexTensor>()?;
        if ft.dtype() != DType::F32 {
            return None;
        }
        Some(if ft.as_slice::<f32>().is_some() {
            ft.clone()
        } else {
            ft.to_contiguous()
        })
    }

    /// `x·Wᵀ` for `x` `[rows, in]` and the 8-bit `w` `[out, in]`, as `[rows, out]` `f32`: on
    /// flex straight from and into the tensors' memory; elsewhere through a host copy (loading
    /// refuses 8-bit weights off the CPU, so that path serves only tests and odd callers).
    pub(super) fn quant_product<B: Backend>(
        x: &Tensor<B, 2>,
        w: &super::QuantWeight,
    ) -> Tensor<B, 2> {
        let rows = x.dims()[0];
        quant_product_segments(x, w, &[(rows, None)])
    }

    /// A low-rank update on the host: `A` `[R, in]` and `up` `[R, out]`, row-major.
    pub(super) type HostUpdate<'a> = (&'a super::HostTensor, &'a super::HostTensor);

    /// `x·W` for block weights `w`, plus, for each segment of `x`'s rows (`(rows, update)`, in
    /// order, covering every row), `(x·Aᵀ)·up` of that segment's low-rank update when it has
    /// one: the base weights are read once for every segment (every model version of a joint
    /// pass), each version's adapter only for its own rows.
    pub(super) fn quant_product_segments<B: Backend>(
        x: &Tensor<B, 2>,
        w: &super::QuantWeight,
        segments: &[(usize, Option<HostUpdate<'_>>)],
    ) -> Tensor<B, 2> {
        let [rows, inner] = x.dims();
        let flex_x = flex(x);
        let owned;
        let xs: &[f32] = match flex_x.as_ref().and_then(|f| f.as_slice::<f32>()) {
            Some(s) => s,
            None => {
                owned = x.to_data().iter::<f32>().collect::<Vec<_>>();
                &owned
            }
        };
        let out = w.rows();
        let mut y = w.matmul_t(xs, rows);
        let mut first = 0;
        for &(n, update) in segments {
            let (lo, hi) = (first, first + n);
            first = hi;
            let Some((a, up)) = update else { continue };
            let (Some(ys), Some(xs)) = (
                y.get_mut(lo * out..hi * out),
                xs.get(lo * inner..hi * inner),
            ) else {
                continue;
            };
            add_low_rank(ys, xs, (&a.data, &up.data), inner, a.shape[0]);
        }
        debug_assert_eq!(first, rows, "segments must cover every row");
        Tensor::from_data(TensorData::new(y, [rows, out]), &x.device())
    }

    /// `y += (x·Aᵀ)·up`, `x` `[rows, inner]`, `a` `[rank, inner]`, `up` `[rank, out]`, `y`
    /// `[rows, out]`, all row-major: row by row at decode (the rank is small: a GEMM's packing
    /// would cost more than the product), by two GEMMs for prefill.
    fn add_low_rank(
        y: &mut [f32],
        x: &[f32],
        (a, up): (&[f32], &[f32]),
        inner: usize,
        rank: usize,
    ) {
        let out = up.len().checked_div(rank).unwrap_or(0);
        let rows = y.len().checked_div(out).unwrap_or(0);
        let fits = x.len() >= rows * inner && a.len() >= rank * inner;
        debug_assert!(fits, "low-rank update shapes do not fit");
        if out == 0 || inner == 0 || !fits {
            return;
        }
        if rows < LOW_RANK_GEMM_ROWS {
            low_rank_rows(y, x, (a, up), inner, out);
            return;
        }
        // Prefill: two GEMMs, `t = x·Aᵀ` `[rows, rank]`, then `y += t·up`.
        let mut t = vec![0f32; rows * rank];
        // SAFETY: t, x and a hold rows·rank, rows·inner and rank·inner values (the caller's
        // shapes: `y` has rows·out, `x` rows·inner, `up` rank·out, `a` rank·inner); strides
        // describe row-major storage, Aᵀ read with column stride `inner`.
        unsafe {
            gemm::gemm(
                rows,
                rank,
                inner,
                t.as_mut_ptr(),
                1,
                rank as isize,
                false,
                x.as_ptr(),
                1,
                inner as isize,
                a.as_ptr(),
                inner as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(0),
            );
            gemm::gemm(
                rows,
                out,
                rank,
                y.as_mut_ptr(),
                1,
                out as isize,
                true,
                t.as_ptr(),
                1,
                rank as isize,
                up.as_ptr(),
                1,
                out as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(0),
            );
        }
    }

    /// `y += (x·Aᵀ)·up` a row at a time: `rank` dot products and multiply-adds per row,
    /// compiled for AVX-512 and AVX2 besides the baseline, as the attention kernel.
    #[multiversion::multiversion(targets(
        "x86_64+avx512f+avx512vl+avx2+fma",
        "x86_64+avx2+fma",
        "aarch64+neon"
    ))]
    fn low_rank_rows(
        y: &mut [f32],
        x: &[f32],
        (a, up): (&[f32], &[f32]),
        inner: usize,
        out: usize,
    ) {
        for (y_row, x_row) in y.chunks_mut(out).zip(x.chunks(inner)) {
            for (a_row, u) in a.chunks_exact(inner).zip(up.chunks_exact(out)) {
                let t = dot(x_row, a_row);
                for (yv, &uv) in y_row.iter_mut().zip(u) {
                    *yv += t * uv;
                }
            }
        }
    }

    /// From this many rows on (prefill) the low-rank update is computed by GEMM, below by the
    /// row loop (a GEMM's packing costs more than a decode step's product).
    const LOW_RANK_GEMM_ROWS: usize = 16;

    /// Whether the model runs on flex in `f32` (the fast paths apply).
    pub(super) fn is_flex<B: Backend, const D: usize>(t: &Tensor<B, D>) -> bool {
        let TensorPrimitive::Float(p) = t.clone().into_primitive() else {
            return false;
        };
        (&p as &dyn Any)
            .downcast_ref::<FlexTensor>()
            .is_some_and(|f| f.dtype() == DType::F32)
    }

    /// `silu(gu[:, ..ffn]) * gu[:, ffn..]` for `gu` `[rows, 2·ffn]`, as `[rows, ffn]`.
    pub(super) fn silu_mul<B: Backend>(gu: &Tensor<B, 2>, ffn: usize) -> Option<Tensor<B, 2>> {
        let [rows, w] = gu.dims();
        if w != 2 * ffn || ffn == 0 {
            return None;
        }
        let f = flex(gu)?;
        let src = f.as_slice::<f32>()?;
        let mut out = vec![0f32; rows * ffn];
        out.par_chunks_mut(ffn)
            .zip(src.par_chunks(w))
            .for_each(|(o, row)| {
                let (gate, up) = row.split_at(ffn);
                silu_mul_row(o, gate, up);
            });
        Some(Tensor::from_data(
            TensorData::new(out, [rows, ffn]),
            &gu.device(),
        ))
    }

    /// `o = silu(g)·u` value by value, with `silu(g) = g·σ(g)` and `σ` from `t = e^-|g|`
    /// (never above 1, so [`exp_nonpositive`] applies and nothing overflows): `σ(g) = 1/(1+t)`
    /// for `g >= 0`, `t/(1+t)` below. Branch-free, so it runs in vector lanes; libm's scalar
    /// `exp` per value was ~10% of a prefill's time.
    #[multiversion::multiversion(targets(
        "x86_64+avx512f+avx512vl+avx2+fma",
        "x86_64+avx2+fma",
        "aarch64+neon"
    ))]
    fn silu_mul_row(o: &mut [f32], gate: &[f32], up: &[f32]) {
        for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
            let t = exp_nonpositive(-g.abs());
            let num = if g >= 0.0 { 1.0 } else { t };
            *o = g * (num / (1.0 + t)) * u;
        }
    }

    /// `Σ a·b` over equal-length rows, in 16 lanes so the compiler vectorizes it (one AVX-512
    /// register, two AVX2 ones; inlined into its multiversioned callers, so it takes their
    /// vector width).
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        const L: usize = 16;
        // Fixed-size chunks: with slices of unknown length LLVM split the lanes into 2-wide
        // vectors.
        let (ac, at) = a.as_chunks::<L>();
        let (bc, bt) = b.as_chunks::<L>();
        let mut acc = [0f32; L];
        for (x, y) in ac.iter().zip(bc) {
            for i in 0..L {
                acc[i] += x[i] * y[i];
            }
        }
        let tail: f32 = at.iter().zip(bt).map(|(x, y)| x * y).sum();
        sum_lanes(acc) + tail
    }

    /// The sum of 16 lanes as a tree (halves added pairwise): four vector adds where a sum in
    /// lane order is fifteen dependent scalar ones, the bulk of a decode step's attention
    /// scores at a 64-wide head. Same order every call, so a score's bits do not depend on
    /// where it is computed.
    #[inline(always)]
    fn sum_lanes(mut acc: [f32; 16]) -> f32 {
        let mut width = 8;
        while width > 0 {
            for i in 0..width {
                acc[i] += acc[i + width];
            }
            width /= 2;
        }
        acc[0]
    }

    /// One (sequence, kv head) of [`attention`]: its query rows `[rows, d]`, keys and values
    /// as (shared prefix `[p, d]`, own slots in slices of `span` slots from batch slot
    /// `first` on), and its mask rows `[rows, cols]` (`cols` = `p` + the batch's slots). Own
    /// slots outside the stored ones are masked in every row (the cache's mask guarantees it).
    #[derive(Clone, Copy)]
    struct Block<'a> {
        q: &'a [f32],
        k: (&'a [f32], &'a [&'a [f32]]),
        v: (&'a [f32], &'a [&'a [f32]]),
        first: isize,
        span: usize,
        cols: usize,
        mask: &'a [bool],
        d: usize,
        scale: f32,
    }

    impl<'a> Block<'a> {
        /// Key columns: the shared prefix's, then the batch's slots.
        fn cols(&self) -> usize {
            self.cols
        }

        /// Columns of the shared prefix.
        fn prefix_cols(&self) -> usize {
            self.k.0.len() / self.d
        }

        /// The column where own slice `i` starts (it may lie before the batch's first slot).
        fn slice_start(&self, i: usize) -> isize {
            self.prefix_cols() as isize + self.first + (i * self.span) as isize
        }

        /// The end of the contiguous run of columns that column `j` starts: the prefix's end,
        /// or the end of the own slice holding `j`, at most `limit`.
        fn run_end(&self, j: usize, limit: usize) -> usize {
            let p = self.prefix_cols();
            if j < p {
                return p.min(limit);
            }
            let local = j as isize - self.slice_start(0);
            let next = self.slice_start(local.max(0) as usize / self.span + 1);
            (next.max(j as isize + 1) as usize).min(limit)
        }

        /// Columns `[a, z)` of `(prefix, own)` (keys or values), `[z - a, d]`: the range lies
        /// in the prefix or in one stored own slice (see [`Block::run_end`]).
        #[inline(always)]
        fn columns(
            &self,
            (prefix, own): (&'a [f32], &'a [&'a [f32]]),
            a: usize,
            z: usize,
        ) -> &'a [f32] {
            let (d, p) = (self.d, self.prefix_cols());
            debug_assert!(a >= p || z <= p, "a run across the prefix's end");
            if a < p {
                return &prefix[a * d..z * d];
            }
            let local = (a as isize - self.slice_start(0)).max(0) as usize;
            let (i, off) = (local / self.span, local % self.span);
            debug_assert!(
                a as isize >= self.slice_start(0),
                "a visible column before the stored slots"
            );
            own.get(i)
                .and_then(|slice| slice.get(off * d..(off + z - a) * d))
                .unwrap_or(&[])
        }
    }

    /// Softmax attention of one [`Block`] into `out` `[rows, d]`, compiled for AVX-512 and
    /// AVX2 besides the baseline (the crate is built for plain x86-64, where these loops would
    /// run 4 lanes wide). A row that sees nothing stays zero, as burn's kernel gives.
    ///
    /// A decode step's rows (the query heads of one kv head) share one mask, so they go through
    /// the visible columns together: a key or value is loaded once for all of them, and the
    /// columns come in runs of contiguous slots (no mask test or prefix/own branch per column).
    #[multiversion::multiversion(targets(
        "x86_64+avx512f+avx512vl+avx2+fma",
        "x86_64+avx2+fma",
        "aarch64+neon"
    ))]
    fn attend_block(blk: Block<'_>, out: &mut [f32]) {
        let (d, cols) = (blk.d, blk.cols());
        let rows = out.len() / d;
        if rows == 0 || cols == 0 {
            return;
        }
        let mut scores = vec![0f32; rows * cols];
        let mut r0 = 0;
        while r0 < rows {
            let mask = &blk.mask[r0 * cols..(r0 + 1) * cols];
            let same = blk.mask[(r0 + 1) * cols..rows * cols]
                .chunks_exact(cols)
                .take_while(|m| *m == mask)
                .count();
            let n = 1 + same;
            let runs = visible_runs(&blk, mask);
            let group = &mut scores[r0 * cols..(r0 + n) * cols];
            let q = &blk.q[r0 * d..(r0 + n) * d];
            for &(a, z) in &runs {
                let keys = blk.columns(blk.k, a, z);
                for (j, key) in (a..z).zip(keys.chunks_exact(d)) {
                    for (i, qrow) in q.chunks_exact(d).enumerate() {
                        group[i * cols + j] = dot(qrow, key) * blk.scale;
                    }
                }
            }
            for srow in group.chunks_exact_mut(cols) {
                softmax_runs(srow, &runs);
            }
            for (srow, orow) in group
                .chunks_exact(cols)
                .zip(out[r0 * d..(r0 + n) * d].chunks_exact_mut(d))
            {
                for &(a, z) in &runs {
                    let vals = blk.columns(blk.v, a, z);
                    add_weighted_run(orow, &srow[a..z], vals);
                }
            }
            r0 += n;
        }
    }

    /// The runs `[a, z)` of visible (`false`) columns of `mask`, cut where the shared prefix
    /// and each own slice of `blk` end, so that each run's keys and values are contiguous.
    fn visible_runs(blk: &Block<'_>, mask: &[bool]) -> Vec<(usize, usize)> {
        let mut runs = Vec::new();
        for (a, z) in MaskRuns::of(mask) {
            let mut j = a;
            while j < z {
                let end = blk.run_end(j, z);
                runs.push((j, end));
                j = end;
            }
        }
        runs
    }

    /// Query rows per tile of [`attend_block_tiled`]: a tile's scores (`[64, cols]`, 256 KiB
    /// at 1024 columns) stay in cache between the two GEMMs and the softmax.
    const ATTN_TILE: usize = 64;

    /// [`attend_block`] for many query rows, tiled as flash attention is: per tile of
    /// [`ATTN_TILE`] rows, the scores over the columns any of its rows sees (a causal mask
    /// leaves the tile's future out, so a prefill does about half the dense work) are one GEMM
    /// `q·kᵀ`, the masked softmax runs on them in place, and the weighted values are added row
    /// by row. Row by row, the scores were a dot product each (a horizontal sum per score) and a
    /// 1024-token prefill ran at half the speed of a 128-token one; as a GEMM they run at the
    /// matrix kernels' speed. Tiles run in parallel. A row that sees nothing stays zero.
    fn attend_block_tiled(blk: Block<'_>, out: &mut [f32]) {
        let d = blk.d;
        // Own slots in several slices (host blocks) are laid end to end once here, so that
        // no tile gathers them again for its GEMM.
        let own: (Vec<f32>, Vec<f32>);
        let (own_k, own_v): ([&[f32]; 1], [&[f32]; 1]);
        let blk = match blk.k.1.len() > 1 {
            true => {
                own = (blk.k.1.concat(), blk.v.1.concat());
                (own_k, own_v) = ([own.0.as_slice()], [own.1.as_slice()]);
                Block {
                    k: (blk.k.0, &own_k),
                    v: (blk.v.0, &own_v),
                    span: (own.0.len() / d).max(1),
                    ..blk
                }
            }
            false => blk,
        };
        out.par_chunks_mut(ATTN_TILE * d)
            .enumerate()
            .for_each(|(t, tile)| {
                let r0 = t * ATTN_TILE;
                let rows = tile.len() / d;
                let sub = Block {
                    q: &blk.q[r0 * d..(r0 + rows) * d],
                    mask: &blk.mask[r0 * blk.cols()..(r0 + rows) * blk.cols()],
                    ..blk
                };
                attend_tile(sub, tile);
            });
    }

    /// One tile of [`attend_block_tiled`]: `blk` holds the tile's query and mask rows.
    fn attend_tile(blk: Block<'_>, out: &mut [f32]) {
        let Block { mask, d, .. } = blk;
        let cols = blk.cols();
        let rows = out.len() / d;
        if cols == 0 {
            return;
        }
        // The columns any row of the tile sees.
        let (mut lo, mut hi) = (cols, 0);
        for mrow in mask_bytes(mask).chunks_exact(cols) {
            if let Some(first) = memchr::memchr(0, mrow) {
                let last = memchr::memrchr(0, mrow).unwrap_or(first);
                (lo, hi) = (lo.min(first), hi.max(last + 1));
            }
        }
        if lo >= hi {
            return;
        }
        // The scores as one GEMM for the prefix's columns and one for the own slots' (laid
        // end to end by the caller): GEMMs of other widths can round a score differently, and
        // a token's scores must not depend on where its batch's host blocks happen to end (the
        // prefix cache on or off must give the same answers). Own columns before the first
        // stored slot are masked in every row: no scores. The two parts sit side by side in a
        // score row, without the gap between them (a newcomer prefilled into a long-running
        // batch sees the prefix and its own few slots of a wide batch: zeroing and walking the
        // gap cost more than the softmax itself).
        debug_assert!(blk.k.1.len() <= 1, "own slots in one slice");
        let p = blk.prefix_cols();
        let own_start = blk.slice_start(0).max(p as isize) as usize;
        let parts = [
            (lo.min(p), hi.min(p)),
            (lo.max(own_start), hi.max(own_start)),
        ];
        let at = [0, parts[0].1 - parts[0].0];
        let width = at[1] + (parts[1].1 - parts[1].0);
        thread_local! {
            /// The tile's scores, reused by every tile on this thread: every value is written
            /// (by the GEMMs, then the softmax), so neither a fresh allocation nor zeroing is
            /// needed per tile (both showed in a prefill's profile, the zeroing at 3.5%).
            static SCORES: std::cell::RefCell<Vec<f32>> =
                const { std::cell::RefCell::new(Vec::new()) };
        }
        SCORES.with_borrow_mut(|buf| {
            if buf.len() < rows * width {
                buf.resize(rows * width, 0.0);
            }
            attend_tile_scores(&blk, parts, at, width, &mut buf[..rows * width], out);
        });
    }

    /// The rest of [`attend_tile`] on its score buffer `scores` (`[rows, width]`, any values
    /// on entry): the two score GEMMs, the masked softmax and the weighted values.
    fn attend_tile_scores(
        blk: &Block<'_>,
        parts: [(usize, usize); 2],
        at: [usize; 2],
        width: usize,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let Block {
            q, mask, d, scale, ..
        } = *blk;
        let cols = blk.cols();
        let rows = out.len() / d;
        for ((a, z), at) in parts.into_iter().zip(at) {
            if z <= a {
                continue;
            }
            let keys = blk.columns(blk.k, a, z);
            if keys.len() < (z - a) * d {
                debug_assert!(false, "visible columns past the stored slots");
                for srow in scores.chunks_exact_mut(width) {
                    srow[at..at + z - a].fill(0.0);
                }
                continue;
            }
            // SAFETY: `scores` holds rows·width values and columns at..at+z-a of each of its
            // rows are in range (at + z - a <= width); `q` holds rows·d, `keys` (z-a)·d
            // (checked above). Kᵀ is read from row-major keys with column stride d.
            unsafe {
                gemm::gemm(
                    rows,
                    z - a,
                    d,
                    scores.as_mut_ptr().add(at),
                    1,
                    width as isize,
                    false,
                    q.as_ptr(),
                    1,
                    d as isize,
                    keys.as_ptr(),
                    d as isize,
                    1,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
        // Each row's mask over the same two parts side by side: the softmax sees the same
        // visible scores in the same order, so the same weights, bit for bit.
        let mut part_mask = vec![true; width];
        for (srow, mrow) in scores.chunks_exact_mut(width).zip(mask.chunks_exact(cols)) {
            for ((a, z), at) in parts.into_iter().zip(at) {
                if z > a {
                    part_mask[at..at + z - a].copy_from_slice(&mrow[a..z]);
                }
            }
            softmax_masked(srow, &part_mask);
        }
        for (orow, srow) in out.chunks_exact_mut(d).zip(scores.chunks_exact(width)) {
            for ((a, z), at) in parts.into_iter().zip(at) {
                if z > a {
                    add_weighted_run(orow, &srow[at..at + z - a], blk.columns(blk.v, a, z));
                }
            }
        }
    }

    /// `out += Σ_j w[j]·vals[j]` over the nonzero weights, in column order, `vals` `[w.len(),
    /// d]`: the weighted sum of values of one query row, for both paths, so a token's output
    /// does not depend on which path, tile or layout (shared prefix apart or not) computed it
    /// (a GEMM would split the sum by its own blocking, and greedy answers could flip on a near
    /// tie between the prefix cache on and off). The common head sizes keep `out` in registers
    /// for the whole run (a loop over a slice of unknown length loads and stores it per column);
    /// each element's sum is the same multiply-then-add sequence either way. Compiled for
    /// AVX-512 and AVX2 as the attention kernel.
    #[multiversion::multiversion(targets(
        "x86_64+avx512f+avx512vl+avx2+fma",
        "x86_64+avx2+fma",
        "aarch64+neon"
    ))]
    fn add_weighted_run(out: &mut [f32], w: &[f32], vals: &[f32]) {
        match out.len() {
            64 => add_weighted_fixed::<64>(out, w, vals),
            128 => add_weighted_fixed::<128>(out, w, vals),
            d => {
                for (&wj, v) in w.iter().zip(vals.chunks_exact(d)) {
                    if wj == 0.0 {
                        continue;
                    }
                    for (o, &x) in out.iter_mut().zip(v) {
                        *o += wj * x;
                    }
                }
            }
        }
    }

    /// [`add_weighted_run`] for `D`-wide rows, the sum held in a local array.
    #[inline(always)]
    fn add_weighted_fixed<const D: usize>(out: &mut [f32], w: &[f32], vals: &[f32]) {
        let mut acc = [0f32; D];
        acc.copy_from_slice(&out[..D]);
        for (&wj, v) in w.iter().zip(vals.as_chunks::<D>().0) {
            if wj == 0.0 {
                continue;
            }
            for i in 0..D {
                acc[i] += wj * v[i];
            }
        }
        out[..D].copy_from_slice(&acc);
    }

    /// Lanes of the softmax's maximum and sum: one AVX-512 register, two AVX2 ones (as [`dot`]).
    const SOFTMAX_LANES: usize = 16;

    /// Softmax of one row of scores in place, masked columns (`true`) at zero; a row with
    /// every column masked becomes all zeros. Compiled for AVX-512 and AVX2 like the kernels
    /// that call it (see [`softmax_over_runs`]).
    #[multiversion::multiversion(targets(
        "x86_64+avx512f+avx512vl+avx2+fma",
        "x86_64+avx2+fma",
        "aarch64+neon"
    ))]
    pub(super) fn softmax_masked(scores: &mut [f32], mask: &[bool]) {
        if !softmax_over_runs(scores, MaskRuns::of(mask)) {
            scores.fill(0.0);
            return;
        }
        // The masked columns are the gaps between the runs.
        let mut end = 0;
        for (a, z) in MaskRuns::of(mask) {
            scores[end..a].fill(0.0);
            end = z;
        }
        scores[end..].fill(0.0);
    }

    /// Softmax of the columns of `runs` (`[a, z)`, in column order, not overlapping) in
    /// place: the same weights, bit for bit, as [`softmax_masked`] under the mask that hides
    /// every other column, which it leaves as they are (a decode step's row sees a few runs of
    /// a wide batch's columns, and the rest is never read). No runs, or nothing finite in
    /// them: zeros.
    #[multiversion::multiversion(targets(
        "x86_64+avx512f+avx512vl+avx2+fma",
        "x86_64+avx2+fma",
        "aarch64+neon"
    ))]
    pub(super) fn softmax_runs(scores: &mut [f32], runs: &[(usize, usize)]) {
        if !softmax_over_runs(scores, runs.iter().copied()) {
            for &(a, z) in runs {
                scores[a..z].fill(0.0);
            }
        }
    }

    /// The runs of visible (`false`) columns of a mask, in order.
    #[derive(Clone)]
    struct MaskRuns<'a> {
        mask: &'a [bool],
        at: usize,
    }

    impl<'a> MaskRuns<'a> {
        fn of(mask: &'a [bool]) -> Self {
            MaskRuns { mask, at: 0 }
        }
    }

    impl Iterator for MaskRuns<'_> {
        type Item = (usize, usize);

        fn next(&mut self) -> Option<(usize, usize)> {
            let bytes = mask_bytes(self.mask);
            let rest = bytes.get(self.at..)?;
            let a = self.at + memchr::memchr(0, rest)?;
            let z = memchr::memchr(1, &bytes[a..]).map_or(bytes.len(), |n| a + n);
            self.at = z;
            Some((a, z))
        }
    }

    /// A mask's bytes (`false` is 0, `true` 1), for `memchr`'s vector search: a prefill tile
    /// walked each row's mask a byte at a time several times (its bounds, its runs, the zeros
    /// between them); with the vectorized activation quantization, prefill ran 13-20% faster.
    fn mask_bytes(mask: &[bool]) -> &[u8] {
        // SAFETY: a `bool` is one byte holding 0 or 1, so its slice reads as `u8`s of the same
        // length and lifetime.
        unsafe { std::slice::from_raw_parts(mask.as_ptr().cast::<u8>(), mask.len()) }
    }

    /// The softmax of [`softmax_masked`] and [`softmax_runs`] over the columns of `runs`,
    /// which alone it reads and writes; false (and nothing written) when no column is finite.
    /// The maximum and the sum run in [`SOFTMAX_LANES`] lanes (a scalar running sum is one
    /// dependent add per score) and `e^x` is [`exp_nonpositive`], inlined, where libm's `expf`
    /// was a call per score (1024-token prefill 1.2x faster at batch 1 for it).
    ///
    /// The sum's lanes follow each visible column's rank among the visible ones, not its
    /// index: a sequence's weights are then the same bits whatever its padding, prefix gap, tile
    /// or cut into runs (alone or in a batch, in one process or two), as a scalar sum in column
    /// order gave.
    #[inline(always)]
    fn softmax_over_runs<R>(scores: &mut [f32], runs: R) -> bool
    where
        R: Iterator<Item = (usize, usize)> + Clone,
    {
        const L: usize = SOFTMAX_LANES;
        // The maximum is exact in any order.
        let mut maxes = [f32::NEG_INFINITY; L];
        for (a, z) in runs.clone() {
            let mut chunks = scores[a..z].chunks_exact(L);
            for c in &mut chunks {
                for i in 0..L {
                    maxes[i] = if c[i] > maxes[i] { c[i] } else { maxes[i] };
                }
            }
            for &s in chunks.remainder() {
                maxes[0] = maxes[0].max(s);
            }
        }
        let max = maxes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        if max == f32::NEG_INFINITY {
            return false;
        }
        let mut sums = [0f32; L];
        let mut rank = 0usize;
        for (a, z) in runs.clone() {
            let run = &mut scores[a..z];
            for s in run.iter_mut() {
                *s = exp_nonpositive(*s - max);
            }
            // The run's first values fill the lanes up to the next multiple of L in rank; its
            // whole chunks then start at lane 0.
            let head = ((L - rank % L) % L).min(run.len());
            for (i, &e) in run[..head].iter().enumerate() {
                sums[(rank + i) % L] += e;
            }
            let mut chunks = run[head..].chunks_exact(L);
            for c in &mut chunks {
                for i in 0..L {
                    sums[i] += c[i];
                }
            }
            for (i, &e) in chunks.remainder().iter().enumerate() {
                sums[i] += e;
            }
            rank += run.len();
        }
        let inv = 1.0 / sums.iter().sum::<f32>();
        for (a, z) in runs {
            scores[a..z].iter_mut().for_each(|s| *s *= inv);
        }
        true
    }

    /// `e^x` for `x <= 0` (a score less its row's maximum), Cephes' `expf`: `x = n·ln 2 + r`
    /// with `|r| <= ln 2 / 2`, `e^r` by a degree-6 polynomial, times `2^n` written into the
    /// exponent bits; within 2 ulp of `e^x`. Branch-free and inlined, so the loops that call it
    /// run it in vector lanes. `0` below `ln 2^-126` (no longer a normal float) and at `-inf`
    /// (a masked score), so masked columns weigh exactly nothing.
    #[inline(always)]
    pub(super) fn exp_nonpositive(x: f32) -> f32 {
        const MIN: f32 = -87.336_55;
        // 1.5·2^23: added to a float under 2^22 in magnitude, it leaves that float rounded to
        // an integer in the low bits of the sum's mantissa.
        const SHIFTER: f32 = 12_582_912.0;
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        let xc = if x > MIN { x } else { MIN };
        let k = xc * std::f32::consts::LOG2_E + SHIFTER;
        let n = k - SHIFTER;
        let r = (xc - n * LN2_HI) - n * LN2_LO;
        let mut y = 1.987_569_2e-4f32;
        y = y * r + 1.398_199_9e-3;
        y = y * r + 8.333_452e-3;
        y = y * r + 4.166_579_6e-2;
        y = y * r + 1.666_666_5e-1;
        y = y * r + 0.5; // Cephes writes 5.0000001e-1, the same f32
        let p = y * r * r + r + 1.0;
        // n (in -126..=0) as an integer is k's bits less the shifter's; 2^n's bits are
        // (n + 127) << 23.
        let n_bits = k.to_bits().wrapping_sub(SHIFTER.to_bits());
        let pow2n = f32::from_bits(n_bits.wrapping_add(127) << 23);
        if x > MIN {
            p * pow2n
        } else {
            0.0
        }
    }

    /// Attention on the host, prefill or decode: `q` `[b, kv_h, rows, d]` (query heads folded
    /// into rows), the batch's own cache `k`/`v` `[b, kv_h, cap, d]`, an optional shared prefix
    /// `[1, kv_h, p, d]` visible to every row (read in place, never copied per sequence), and
    /// `mask` `[b, rows, p + cap]` (true = masked; prefix columns first). Masked columns cost
    /// nothing, so a causal prefill does half the work of burn-flex's dense attention.
    /// `prefill` (more than one query token per sequence) runs in tiles of GEMMs
    /// ([`attend_block_tiled`]), a decode step's few rows per kv head row by row
    /// ([`attend_block`]): the choice goes by the step, not by the row count, so a token is
    /// computed the same way whether its prompt came with a cached prefix or not.
    /// Returns `[b, kv_h, rows, d]`; `None` off flex.
    pub(super) fn attention<B: Backend>(
        q: &Tensor<B, 4>,
        own: super::OwnKv<'_>,
        prefix: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
        mask: &[bool],
        scale: f32,
        prefill: bool,
    ) -> Option<Tensor<B, 4>> {
        let [b, kvh, rows, d] = q.dims();
        let qf = flex(q)?;
        let qs = qf.as_slice::<f32>()?;
        let pre = match &prefix {
            Some((pk, pv)) => Some((flex(pk)?, flex(pv)?)),
            None => None,
        };
        let (pks, pvs, p) = match &pre {
            Some((pk, pv)) => (
                pk.as_slice::<f32>()?,
                pv.as_slice::<f32>()?,
                pk.layout().shape()[2],
            ),
            None => (&[][..], &[][..], 0),
        };
        let cols = mask.len().checked_div(b * rows)?;
        let cap = cols.checked_sub(p)?;
        if d == 0
            || !own.fits(b, kvh, d, cap)
            || mask.len() != b * rows * cols
            || pks.len() != kvh * p * d
        {
            return None;
        }
        let mut out = vec![0f32; b * kvh * rows * d];
        // One task per (sequence, kv head): its rows share the K/V they read. The tasks run
        // kv head by kv head (every sequence of head 0, then of head 1, ...), so that a thread
        // reads a head's shared prefix from its cache for one sequence after another: in
        // sequence order the other heads' prefixes and slots came between, and a decode step
        // of a rating batch waited on loads of the template's keys and values.
        let mut tasks: Vec<(usize, &mut [f32])> = out.chunks_mut(rows * d).enumerate().collect();
        tasks.sort_by_key(|&(bh, _)| (bh % kvh, bh / kvh));
        tasks.into_par_iter().for_each(|(bh, o)| {
            let (bi, h) = (bh / kvh, bh % kvh);
            let own = own.rows(bh, kvh, d);
            let pre = h * p * d..(h + 1) * p * d;
            let blk = Block {
                q: &qs[bh * rows * d..(bh + 1) * rows * d],
                k: (&pks[pre.clone()], &own.k),
                v: (&pvs[pre], &own.v),
                first: own.first,
                span: own.span,
                cols,
                mask: &mask[bi * rows * cols..(bi + 1) * rows * cols],
                d,
                scale,
            };
            match prefill {
                true => attend_block_tiled(blk, o),
                false => attend_block(blk, o),
            }
        });
        Some(Tensor::from_data(
            TensorData::new(out, [b, kvh, rows, d]),
            &q.device(),
        ))
    }

    /// Splits the fused projection `qkv` `[b·s, (h + 2·kv_h)·d]` into q, k and v, rotates q
    /// and k (RoPE, "halves" convention, angles from the host tables `[max_pos, d/2]` at
    /// `positions`, `b·s` of them) and lays them out for attention in one pass over memory:
    /// q `[b, kv_h, n_rep·s, d]` with the query heads of each kv head folded into rows
    /// (row = r·s + t), k and v `[b, kv_h, s, d]`. As burn ops this is three `narrow`s, eight
    /// strided element-wise ops, a `cat` and two permutes (~20% of a batch-32 prefill on flex).
    pub(super) fn split_rope_fold<B: Backend>(
        qkv: &Tensor<B, 2>,
        positions: &[i64],
        tables: &(Vec<f32>, Vec<f32>),
        b: usize,
        cfg: &crate::model::LlamaConfig,
    ) -> Option<(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>)> {
        let (h, kvh, d) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let (n_rep, half) = (cfg.n_rep(), d / 2);
        let [n, w] = qkv.dims();
        if b == 0 || n % b != 0 || w != (h + 2 * kvh) * d || positions.len() != n || d % 2 != 0 {
            return None;
        }
        let s = n / b;
        let (cos, sin) = (&tables.0, &tables.1);
        if positions
            .iter()
            .any(|&p| p < 0 || (p as usize + 1) * half > cos.len())
        {
            return None;
        }
        let f = flex(qkv)?;
        let src = f.as_slice::<f32>()?;
        let rotate = |x: &[f32], out: &mut [f32], pos: i64| {
            let at = pos as usize * half;
            let (c, sn) = (&cos[at..at + half], &sin[at..at + half]);
            let (x1, x2) = x.split_at(half);
            let (o1, o2) = out.split_at_mut(half);
            for i in 0..half {
                o1[i] = x1[i] * c[i] - x2[i] * sn[i];
                o2[i] = x2[i] * c[i] + x1[i] * sn[i];
            }
        };
        let mut q = vec![0f32; b * h * s * d];
        let mut k = vec![0f32; b * kvh * s * d];
        let mut v = vec![0f32; b * kvh * s * d];
        // One task per (sequence, kv head): its q rows, k and v rows are contiguous outputs.
        q.par_chunks_mut(n_rep * s * d)
            .zip(k.par_chunks_mut(s * d))
            .zip(v.par_chunks_mut(s * d))
            .enumerate()
            .for_each(|(bg, ((qo, ko), vo))| {
                let (bi, g) = (bg / kvh, bg % kvh);
                for t in 0..s {
                    let row = &src[(bi * s + t) * w..(bi * s + t + 1) * w];
                    let pos = positions[bi * s + t];
                    for r in 0..n_rep {
                        let head = g * n_rep + r;
                        let out = &mut qo[(r * s + t) * d..(r * s + t + 1) * d];
                        rotate(&row[head * d..(head + 1) * d], out, pos);
                    }
                    let kin = &row[(h + g) * d..(h + g + 1) * d];
                    rotate(kin, &mut ko[t * d..(t + 1) * d], pos);
                    let vin = &row[(h + kvh + g) * d..(h + kvh + g + 1) * d];
                    vo[t * d..(t + 1) * d].copy_from_slice(vin);
                }
            });
        let dev = qkv.device();
        Some((
            Tensor::from_data(TensorData::new(q, [b, kvh, n_rep * s, d]), &dev),
            Tensor::from_data(TensorData::new(k, [b, kvh, s, d]), &dev),
            Tensor::from_data(TensorData::new(v, [b, kvh, s, d]), &dev),
        ))
    }

    /// The inverse of the fold: attention output `[b, kv_h, n_rep·s, d]` back to one row per
    /// token, `[b·s, h·d]` with heads in order, as the output projection wants it.
    pub(super) fn unfold_heads<B: Backend>(
        att: &Tensor<B, 4>,
        n_rep: usize,
    ) -> Option<Tensor<B, 2>> {
        let [b, kvh, rows, d] = att.dims();
        if n_rep == 0 || rows % n_rep != 0 {
            return None;
        }
        let s = rows / n_rep;
        let f = flex(att)?;
        let src = f.as_slice::<f32>()?;
        let qd = kvh * n_rep * d;
        let mut out = vec![0f32; b * s * qd];
        out.par_chunks_mut(s * qd).enumerate().for_each(|(bi, o)| {
            for g in 0..kvh {
                let block = &src[(bi * kvh + g) * rows * d..(bi * kvh + g + 1) * rows * d];
                for r in 0..n_rep {
                    let head = g * n_rep + r;
                    for t in 0..s {
                        let from = &block[(r * s + t) * d..(r * s + t + 1) * d];
                        o[t * qd + head * d..t * qd + (head + 1) * d].copy_from_slice(from);
                    }
                }
            }
        });
        Some(Tensor::from_data(
            TensorData::new(out, [b * s, qd]),
            &att.device(),
        ))
    }
}

/// RMSNorm over the last axis: `x / sqrt(mean(x²) + eps) * w`. A half-precision `x` is
/// normalized in `f32` and cast back before the weight (Hugging Face's `LlamaRMSNorm`): the
/// squares of a residual stream in the hundreds overflow f16.
pub(crate) fn rms_norm<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>, eps: f64) -> Tensor<B, 2> {
    let dtype = x.dtype();
    if dtype != DType::F32 && dtype.is_float() {
        return rms_norm_f32(x.cast(DType::F32), eps).cast(dtype) * w;
    }
    rms_norm_f32(x, eps) * w
}

/// `x / sqrt(mean(x²) + eps)` over the last axis.
fn rms_norm_f32<B: Backend>(x: Tensor<B, 2>, eps: f64) -> Tensor<B, 2> {
    let inv = x
        .clone()
        .powi_scalar(2)
        .mean_dim(1)
        .add_scalar(eps)
        .sqrt()
        .recip();
    x * inv
}

/// GQA without copying K/V: `q` `[b, s, h, d]` to `[b, kv_h, n_rep·s, d]`, the `n_rep` query
/// heads of each kv head folded into its row axis (row = r·s + t), so attention runs on `kv_h`
/// heads against K/V as they are.
pub(crate) fn fold_query_heads<B: Backend>(q: Tensor<B, 4>, kv_heads: usize) -> Tensor<B, 4> {
    let [b, s, h, d] = q.dims();
    let n_rep = h / kv_heads.max(1);
    q.reshape([b, s, kv_heads, n_rep, d])
        .permute([0, 2, 3, 1, 4])
        .reshape([b, kv_heads, n_rep * s, d])
}

/// RoPE in the "halves" convention (HF `rotate_half`): element `i` of the first half rotates
/// with element `i` of the second half by angle `pos · θ^(-2i/d)`.
/// `x` is `[b, s, heads, d]`, `cos`/`sin` are `[b, s, 1, d/2]`.
pub(crate) fn rope<B: Backend>(
    x: Tensor<B, 4>,
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let half = x.dims()[3] / 2;
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.narrow(3, half, half);
    let r1 = x1.clone() * cos.clone() - x2.clone() * sin.clone();
    let r2 = x2 * cos + x1 * sin;
    Tensor::cat(vec![r1, r2], 3)
}

/// `cos` and `sin` of `pos · θ^(-2i/d)` for `pos < max_pos`, `i < d/2`, row-major.
pub fn rope_tables(max_pos: usize, d: usize, theta: f32) -> (Vec<f32>, Vec<f32>) {
    let half = d / 2;
    let mut cos = Vec::with_capacity(max_pos * half);
    let mut sin = Vec::with_capacity(max_pos * half);
    // f64 for the angle: at position 8000 an f32 product loses ~1e-3 rad.
    let inv: Vec<f64> = (0..half)
        .map(|i| 1.0 / (theta as f64).powf(2.0 * i as f64 / d as f64))
        .collect();
    for p in 0..max_pos {
        for f in &inv {
            let a = p as f64 * f;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    (cos, sin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_roundtrip() {
        let m: Vec<f32> = (0..35 * 70).map(|i| i as f32).collect();
        let t = transpose_host(&m, 35, 70);
        assert_eq!(t[1], m[70]); // (0,1) of the transpose is (1,0) of m
        assert_eq!(transpose_host(&t, 70, 35), m);
    }

    /// The CPU fast paths against the same computation as burn ops (the path CUDA takes).
    #[test]
    fn cpu_kernels_match_burn_ops() {
        use burn::backend::Flex;
        use burn::tensor::Distribution;
        let dev = Default::default();
        let gu = Tensor::<Flex, 2>::random([5, 2 * 7], Distribution::Default, &dev);
        let fast = cpu::silu_mul(&gu, 7).expect("flex tensors");
        let slow = silu(gu.clone().narrow(1, 0, 7)) * gu.narrow(1, 7, 7);
        let diff: f32 = (fast - slow).abs().max().into_scalar();
        assert!(diff < 1e-6, "silu_mul off by {diff}");

        // 2 sequences, 2 kv heads, 3 rows, 4 own slots, a 3-token shared prefix: both paths.
        let (b, rows, cap, p) = (2, 3, 4, 3);
        // Sequence 0 sees own slots 0..2, sequence 1 only slot 3 (plus the prefix).
        let mask: Vec<bool> = (0..b * rows * (p + cap))
            .map(|i| {
                let (seq, j) = (i / (rows * (p + cap)), i % (p + cap));
                j >= p && if seq == 0 { j - p > 1 } else { j - p != 3 }
            })
            .collect();
        for prefill in [false, true] {
            assert_attention_matches_burn(b, 2, rows, cap, p, &mask, prefill, 8);
        }
        // The head sizes with their own weighted-sum kernel (SmolLM2's 64, Qwen2.5's 128).
        for d in [64, 128] {
            assert_attention_matches_burn(b, 2, rows, cap, p, &mask, false, d);
        }

        // A prefill in tiles of GEMMs: 2 query heads per kv head folded into rows (row = r·s
        // + t) over s = 150 own slots (tiles of 64 straddling the heads' boundary and a short
        // last one), a 5-token prefix, causal; sequence 1 left-padded by 7 (its padding rows
        // see nothing, its real rows skip the padding columns). Then the same without prefix.
        let (s_len, n_rep) = (150, 2);
        let rows = n_rep * s_len;
        for p in [5, 0] {
            let cols = p + s_len;
            let mask: Vec<bool> = (0..b * rows * cols)
                .map(|i| {
                    let (seq, r, j) = (i / (rows * cols), (i / cols) % rows, i % cols);
                    let (t, pad) = (r % s_len, if seq == 1 { 7 } else { 0 });
                    if t < pad {
                        return true;
                    }
                    j >= p && (j - p > t || j - p < pad)
                })
                .collect();
            // The row-by-row path too: rows whose masks differ, in groups of equal ones.
            for prefill in [true, false] {
                assert_attention_matches_burn(b, 2, rows, s_len, p, &mask, prefill, 8);
            }
        }
    }

    /// The softmax's `e^x` against f64's `exp` over its whole range (every 1/64 from -90 to 0
    /// and a fine grid near 0): within 2 ulp; exactly 1 at 0; 0 at -inf and below ln 2^-126.
    #[test]
    fn cpu_exp_nonpositive_matches_f64_exp() {
        let mut worst = 0f64;
        for i in 0..=90 * 64 {
            for x in [-(i as f32) / 64.0, -(i as f32) * 1e-6] {
                let got = cpu::exp_nonpositive(x) as f64;
                let want = (x as f64).exp();
                if x > -87.3 {
                    let ulp = (want as f32).to_bits();
                    let ulp = (f32::from_bits(ulp + 1) - f32::from_bits(ulp)) as f64;
                    worst = worst.max((got - want).abs() / ulp);
                } else if x < -87.4 {
                    assert_eq!(got, 0.0, "e^{x}");
                }
            }
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(cpu::exp_nonpositive(0.0), 1.0);
        assert_eq!(cpu::exp_nonpositive(f32::NEG_INFINITY), 0.0);
    }

    /// `silu(g)·u` in vector lanes against `g·u/(1 + e^-g)` in `f64`, over gates from -100 to
    /// 100 (both signs of every magnitude, the saturated tails): within a few `f32` roundings
    /// of the value, and 0 or the value where `e^g` is no longer a normal `f32`; zero, NaN and
    /// infinities as the formula gives them.
    #[test]
    fn cpu_silu_mul_matches_f64() {
        use burn::backend::Flex;
        let ffn = 8001;
        let mut next = uniform_lcg(5);
        let gate: Vec<f32> = (0..ffn)
            .map(|i| (i as f32 - 4000.0) / 40.0 + (next() - 0.5) / 80.0)
            .collect();
        let up: Vec<f32> = (0..ffn).map(|_| 0.5 + next() * 2.0).collect();
        let row = [gate.clone(), up.clone()].concat();
        let gu =
            Tensor::<Flex, 2>::from_data(TensorData::new(row, [1, 2 * ffn]), &Default::default());
        let got = cpu::silu_mul(&gu, ffn).expect("flex tensors");
        let got: Vec<f32> = got.into_data().to_vec().expect("f32");
        let mut worst = 0f64;
        for ((&g, &u), &y) in gate.iter().zip(&up).zip(&got) {
            let (gd, ud) = (g as f64, u as f64);
            let want = gd * ud / (1.0 + (-gd).exp());
            if g < -87.3 {
                // e^g is subnormal or nothing: 0, or the value itself.
                assert!(
                    y == 0.0 || (y as f64 - want).abs() <= 1e-6 * want.abs(),
                    "silu({g})"
                );
            } else if want == 0.0 {
                assert_eq!(y, 0.0, "silu({g})");
            } else {
                assert!(y.is_finite(), "silu({g}) = {y}");
                worst = worst.max((y as f64 - want).abs() / (want.abs() * f32::EPSILON as f64));
            }
        }
        assert!(worst <= 6.0, "worst error {worst} epsilons");
        let odd = [0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN];
        let row = [odd.to_vec(), vec![1.0; 4]].concat();
        let gu = Tensor::<Flex, 2>::from_data(TensorData::new(row, [1, 8]), &Default::default());
        let y: Vec<f32> = cpu::silu_mul(&gu, 4)
            .expect("flex")
            .into_data()
            .to_vec()
            .expect("f32");
        assert_eq!((y[0], y[1]), (0.0, f32::INFINITY));
        assert!(y[2].is_nan() && y[3].is_nan(), "{y:?}");
    }

    /// Uniform values in [0, 1) from a 64-bit LCG (Knuth's MMIX constants): the softmax
    /// tests' scores, reproducible and free of `rand`'s version.
    fn uniform_lcg(seed: u64) -> impl FnMut() -> f32 {
        let mut state = seed;
        move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as f32 / (1u64 << 31) as f32
        }
    }

    /// The masked softmax in lanes against an f64 softmax, on rows shorter and longer than its
    /// lanes and not a multiple of them, masked in patterns, and masked whole (zeros).
    #[test]
    fn cpu_softmax_masked_matches_f64() {
        let mut next = uniform_lcg(7);
        for len in [1usize, 5, 15, 16, 17, 33, 100, 1000] {
            for pattern in 0..3 {
                let scores: Vec<f32> = (0..len).map(|_| (next() - 0.5) * 40.0).collect();
                let mask: Vec<bool> = (0..len)
                    .map(|j| match pattern {
                        0 => false,
                        1 => j % 3 == 1,
                        _ => j + 1 != len && next() < 0.7,
                    })
                    .collect();
                let mut got = scores.clone();
                cpu::softmax_masked(&mut got, &mask);
                let max = (scores.iter().zip(&mask))
                    .filter(|(_, &m)| !m)
                    .map(|(&s, _)| s as f64)
                    .fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = (scores.iter().zip(&mask))
                    .map(|(&s, &m)| if m { 0.0 } else { (s as f64 - max).exp() })
                    .collect();
                let total: f64 = e.iter().sum();
                for (j, (&g, &w)) in got.iter().zip(&e).enumerate() {
                    let want = w / total;
                    assert!(
                        (g as f64 - want).abs() <= 1e-6 * want.max(1e-3),
                        "len {len} pattern {pattern} column {j}: {g} vs {want}"
                    );
                    if mask[j] {
                        assert_eq!(g, 0.0, "a masked column weighs nothing");
                    }
                }
            }
        }
        let mut all_masked = vec![1.0f32; 20];
        cpu::softmax_masked(&mut all_masked, &[true; 20]);
        assert_eq!(all_masked, vec![0.0; 20]);
    }

    /// A row's softmax does not depend on where its visible columns lie: the same scores
    /// behind a different shared prefix gap, padding or tile offset (a sequence alone, in a
    /// batch, or in another tile) weigh bit for bit the same. Sampled answers diverged between
    /// a one-process and a two-process loop when the lanes of the sum followed column indices.
    #[test]
    fn cpu_softmax_masked_does_not_depend_on_the_layout() {
        let mut next = uniform_lcg(11);
        for len in [3usize, 17, 40, 129, 700] {
            let visible: Vec<f32> = (0..len).map(|_| (next() - 0.5) * 30.0).collect();
            // (masked columns before, after the first `split` visible ones, after the rest)
            let layouts = [
                (0, 0, 0, 0),
                (3, len / 3, 7, 5),
                (16, len / 2, 1, 0),
                (21, 1, 40, 9),
            ];
            let mut reference: Option<Vec<f32>> = None;
            for (lead, split, gap, trail) in layouts {
                let split = split.min(len);
                let mut row = vec![123.0f32; lead];
                let mut mask = vec![true; lead];
                row.extend_from_slice(&visible[..split]);
                mask.extend(std::iter::repeat_n(false, split));
                row.extend(std::iter::repeat_n(-5.0f32, gap));
                mask.extend(std::iter::repeat_n(true, gap));
                row.extend_from_slice(&visible[split..]);
                mask.extend(std::iter::repeat_n(false, len - split));
                row.extend(std::iter::repeat_n(9.0f32, trail));
                mask.extend(std::iter::repeat_n(true, trail));
                cpu::softmax_masked(&mut row, &mask);
                let weights: Vec<f32> = (row.iter().zip(&mask))
                    .filter(|(_, &m)| !m)
                    .map(|(&w, _)| w)
                    .collect();
                match &reference {
                    None => reference = Some(weights),
                    Some(want) => assert!(
                        want.iter()
                            .zip(&weights)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "len {len}, layout {:?}: weights differ",
                        (lead, split, gap, trail)
                    ),
                }
            }
        }
    }

    /// The softmax over runs of columns (a decode step's) gives the masked softmax's weights
    /// bit for bit however the visible columns are cut into runs, within 1e-6 of an f64
    /// softmax, and leaves every column outside its runs as it was.
    #[test]
    fn cpu_softmax_runs_matches_the_masked_softmax() {
        let mut next = uniform_lcg(23);
        for len in [1usize, 16, 17, 70, 333] {
            let scores: Vec<f32> = (0..len).map(|_| (next() - 0.5) * 40.0).collect();
            let mask: Vec<bool> = (0..len).map(|j| j + 1 != len && next() < 0.5).collect();
            // The visible columns as runs, each cut again at random points.
            let mut runs = Vec::new();
            let mut j = 0;
            while j < len {
                if mask[j] {
                    j += 1;
                    continue;
                }
                let start = j;
                while j < len && !mask[j] {
                    j += 1;
                    if next() < 0.2 {
                        break;
                    }
                }
                runs.push((start, j));
            }
            let mut masked = scores.clone();
            cpu::softmax_masked(&mut masked, &mask);
            let mut by_runs = scores.clone();
            cpu::softmax_runs(&mut by_runs, &runs);
            let max = (scores.iter().zip(&mask))
                .filter(|(_, &m)| !m)
                .map(|(&s, _)| s as f64)
                .fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = (scores.iter().zip(&mask))
                .filter(|(_, &m)| !m)
                .map(|(&s, _)| (s as f64 - max).exp())
                .sum();
            for c in 0..len {
                if mask[c] {
                    assert_eq!(
                        by_runs[c], scores[c],
                        "len {len}: column {c} outside the runs"
                    );
                    continue;
                }
                assert_eq!(
                    by_runs[c].to_bits(),
                    masked[c].to_bits(),
                    "len {len} column {c}"
                );
                let want = (scores[c] as f64 - max).exp() / total;
                assert!((by_runs[c] as f64 - want).abs() <= 1e-6 * want.max(1e-3));
            }
        }
        let mut none = vec![3.0f32; 8];
        cpu::softmax_runs(&mut none, &[]);
        assert_eq!(none, vec![3.0; 8], "no runs, nothing written");
    }

    /// [`cpu::attention`] against burn's matmul-softmax-matmul on random tensors of `b`
    /// sequences, `kvh` kv heads, `rows` query rows, `cap` own slots and a `p`-token prefix,
    /// under `mask` `[b, rows, p + cap]` (true = masked), by the prefill (tiled) or the decode
    /// (row by row) path, at head size `d`.
    #[allow(clippy::too_many_arguments)]
    fn assert_attention_matches_burn(
        b: usize,
        kvh: usize,
        rows: usize,
        cap: usize,
        p: usize,
        mask: &[bool],
        prefill: bool,
        d: usize,
    ) {
        use burn::backend::Flex;
        use burn::tensor::Distribution;
        let dev = Default::default();
        let q = Tensor::<Flex, 4>::random([b, kvh, rows, d], Distribution::Default, &dev);
        let k = Tensor::<Flex, 4>::random([b, kvh, cap, d], Distribution::Default, &dev);
        let v = Tensor::<Flex, 4>::random([b, kvh, cap, d], Distribution::Default, &dev);
        let prefix = (p > 0).then(|| {
            let pk = Tensor::<Flex, 4>::random([1, kvh, p, d], Distribution::Default, &dev);
            let pv = Tensor::<Flex, 4>::random([1, kvh, p, d], Distribution::Default, &dev);
            (pk, pv)
        });
        let cols = p + cap;
        let scale = 0.5f32;
        let (kh, vh) = (
            host_values(&k).expect("flex"),
            host_values(&v).expect("flex"),
        );
        let own = OwnKv::dense(&kh, &vh, cap);
        let fast =
            cpu::attention(&q, own, prefix.clone(), mask, scale, prefill).expect("flex tensors");
        let bias: Vec<f32> = (0..b * kvh * rows * cols)
            .map(|i| {
                let (seq, rest) = (i / (kvh * rows * cols), i % (rows * cols));
                if mask[seq * rows * cols + rest] {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let bias = Tensor::<Flex, 4>::from_data(TensorData::new(bias, [b, kvh, rows, cols]), &dev);
        let (keys, vals) = match prefix {
            Some((pk, pv)) => (
                Tensor::cat(vec![pk.expand([b, kvh, p, d]), k], 2),
                Tensor::cat(vec![pv.expand([b, kvh, p, d]), v], 2),
            ),
            None => (k, v),
        };
        let scores = q.matmul(keys.swap_dims(2, 3)).mul_scalar(scale) + bias;
        // burn's softmax gives NaN on a row masked whole; the kernel gives zeros there.
        let slow = softmax(scores, 3).matmul(vals);
        let slow = slow.clone().mask_fill(slow.is_nan(), 0.0);
        let diff: f32 = (fast - slow).abs().max().into_scalar();
        assert!(
            diff < 1e-5,
            "attention off by {diff} ({rows} rows, prefix {p}, prefill {prefill})"
        );
    }

    /// The fused split + RoPE + fold (and its inverse) against the burn ops the other backends
    /// run, on a GQA shape with padding-style repeated positions.
    #[test]
    fn cpu_split_rope_fold_matches_burn_ops() {
        use burn::backend::Flex;
        use burn::tensor::Distribution;
        let dev = Default::default();
        let cfg = crate::model::LlamaConfig {
            arch: crate::model::Architecture::Llama,
            n_layers: 1,
            hidden: 48,
            ffn: 8,
            n_heads: 6,
            n_kv_heads: 2,
            head_dim: 8,
            rope_theta: 10_000.0,
            rms_eps: 1e-5,
            vocab: 4,
            max_seq_len: 16,
            tie_embeddings: true,
            qkv_bias: false,
        };
        let (b, s, h, kvh, d, n_rep) = (3, 4, 6, 2, 8, 3);
        let qkv =
            Tensor::<Flex, 2>::random([b * s, (h + 2 * kvh) * d], Distribution::Default, &dev);
        let positions: Vec<i64> = vec![0, 0, 1, 2, 5, 6, 7, 8, 0, 1, 2, 3];
        let tables = rope_tables(cfg.max_seq_len, d, cfg.rope_theta);
        let (q, k, v) = cpu::split_rope_fold(&qkv, &positions, &tables, b, &cfg).expect("flex");

        let half = d / 2;
        let pos = Tensor::<Flex, 1, Int>::from_data(TensorData::new(positions, [b * s]), &dev);
        let cos = Tensor::<Flex, 2>::from_data(TensorData::new(tables.0, [16, half]), &dev);
        let sin = Tensor::<Flex, 2>::from_data(TensorData::new(tables.1, [16, half]), &dev);
        let cos = cos.select(0, pos.clone()).reshape([b, s, 1, half]);
        let sin = sin.select(0, pos).reshape([b, s, 1, half]);
        let rq = rope(
            qkv.clone().narrow(1, 0, h * d).reshape([b, s, h, d]),
            cos.clone(),
            sin.clone(),
        );
        let rk = rope(
            qkv.clone()
                .narrow(1, h * d, kvh * d)
                .reshape([b, s, kvh, d]),
            cos,
            sin,
        );
        let rv = qkv
            .narrow(1, (h + kvh) * d, kvh * d)
            .reshape([b, s, kvh, d]);
        let folded = rq
            .clone()
            .reshape([b, s, kvh, n_rep, d])
            .permute([0, 2, 3, 1, 4])
            .reshape([b, kvh, n_rep * s, d]);
        let max = |t: Tensor<Flex, 4>| -> f32 { t.abs().max().into_scalar() };
        assert!(max(q.clone() - folded) < 1e-6, "q");
        assert!(max(k - rk.swap_dims(1, 2)) < 1e-6, "k");
        assert!(max(v - rv.swap_dims(1, 2)) < 1e-6, "v");
        let back = cpu::unfold_heads(&q, n_rep).expect("flex");
        let want = rq.reshape([b * s, h * d]);
        let diff: f32 = (back - want).abs().max().into_scalar();
        assert!(diff < 1e-6, "unfold off by {diff}");
    }

    #[test]
    fn rope_table_values() {
        let (c, s) = rope_tables(3, 4, 10_000.0);
        // pos 2, i = 1: angle 2 / 10000^(2/4) = 0.02
        assert!((c[2 * 2 + 1] - 0.02f32.cos()).abs() < 1e-7);
        assert!((s[2 * 2 + 1] - 0.02f32.sin()).abs() < 1e-7);
        assert_eq!(c[0], 1.0);
    }
}
