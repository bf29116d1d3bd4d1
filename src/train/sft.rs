//! Supervised finetuning: masked cross-entropy on output tokens, padded micro-batches with
//! gradient accumulation, global-norm gradient clipping, AdamW with decoupled weight decay and
//! a linear learning-rate decay; seeded and resumable.
//!
//! Reproducibility: the example order is a pure function of `(seed, position in the stream)`
//! (one seeded shuffle per epoch), and LoRA dropout's masks are functions of `(seed, step,
//! micro-batch, block, projection)` ([`super::backward::DropoutSeed`]), so a run resumed at
//! step k continues exactly as the uninterrupted run would.

use std::marker::PhantomData;

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::record::{FullPrecisionSettings, Record};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::backward::{self, DropoutSeed};
use super::data::Example;
use super::model::TrainLlama;
use super::TrainError;

/// The autodiff backend `backflow train` uses: the crate's default backend (CPU flex, or CUDA
/// with the `cuda` feature) under burn's autodiff.
pub type TrainBackend = burn::backend::Autodiff<crate::model::device::DefaultBackend>;

/// Optimisation hyper-parameters.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SftConfig {
    /// Learning rate at step 0.
    pub lr: f64,
    /// Learning rate at the last step (linear decay in between).
    pub lr_end: f64,
    /// AdamW decoupled weight decay (paper: 0.1).
    pub weight_decay: f32,
    /// Examples per batch.
    pub batch_size: usize,
    /// Batches per optimizer step (effective batch = `batch_size · grad_accum`).
    pub grad_accum: usize,
    /// Examples per forward/backward pass: a step's examples are computed in pieces this large
    /// (0: a batch at a time). The gradient is the same (the loss is the mean over the step's
    /// target tokens); activation memory scales with it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub micro_batch: usize,
    /// Keep only each block's input in the forward pass and recompute the block in the
    /// backward pass ([`super::backward::recomputed`]): the same gradients in a fraction of
    /// the activation memory, for one more forward pass of compute.
    #[serde(default = "recompute_by_default")]
    pub recompute: bool,
    /// Clip the global gradient norm to this (0: no clipping).
    pub max_grad_norm: f32,
    /// Optimizer steps.
    pub steps: usize,
    /// Seed of data order, adapter init and dropout.
    pub seed: u64,
}

impl SftConfig {
    /// The paper's full-finetuning recipe (lr 1e-5 -> 9e-6, weight decay 0.1, batch 8).
    pub fn paper_full(steps: usize) -> Self {
        SftConfig {
            lr: 1e-5,
            lr_end: 9e-6,
            weight_decay: 0.1,
            batch_size: 8,
            grad_accum: 1,
            micro_batch: DEFAULT_MICRO_BATCH,
            recompute: RECOMPUTE_BY_DEFAULT,
            max_grad_norm: 1.0,
            steps,
            seed: 0,
        }
    }

    /// LoRA defaults: lr 2e-4 -> 2e-5. LoRA trains a low-rank update from `B = 0` with far
    /// fewer parameters, so it needs (and tolerates) a learning rate 10-20x that of full
    /// finetuning (PEFT/QLoRA practice: 1e-4..3e-4); decaying to a tenth settles the end.
    pub fn lora(steps: usize) -> Self {
        SftConfig {
            lr: 2e-4,
            lr_end: 2e-5,
            ..Self::paper_full(steps)
        }
    }

    /// Examples per optimizer step.
    pub fn effective_batch(&self) -> usize {
        self.batch_size.max(1) * self.grad_accum.max(1)
    }

    /// Examples per forward/backward pass.
    pub fn micro_size(&self) -> usize {
        match self.micro_batch {
            0 => self.batch_size.max(1),
            m => m.min(self.batch_size.max(1)),
        }
    }

    /// The learning rate of `step` (0-based): linear from `lr` to `lr_end` over `steps`.
    pub fn lr_at(&self, step: usize) -> f64 {
        if self.steps <= 1 {
            return self.lr;
        }
        let t = (step.min(self.steps - 1)) as f64 / (self.steps - 1) as f64;
        self.lr + (self.lr_end - self.lr) * t
    }
}

/// The example indices of optimizer step `step`: positions `step·E .. (step+1)·E` of an endless
/// stream that visits all examples once per epoch, in a fresh seeded order per epoch
/// ([`epoch_order`]). With `lengths` (one per example) the order is grouped by length
/// ([`group_by_length`]); without, there are `n` examples.
pub fn step_indices(
    n: usize,
    lengths: Option<&[usize]>,
    step: usize,
    effective_batch: usize,
    seed: u64,
) -> Vec<usize> {
    let n = lengths.map_or(n, <[usize]>::len);
    if n == 0 {
        return Vec::new();
    }
    let mut cache: Option<(usize, Vec<usize>)> = None;
    (step * effective_batch..(step + 1) * effective_batch)
        .map(|p| {
            let epoch = p / n;
            if cache.as_ref().map(|c| c.0) != Some(epoch) {
                let mut order = epoch_order(n, seed, epoch);
                if let Some(lengths) = lengths {
                    group_by_length(&mut order, lengths, effective_batch, seed, epoch);
                }
                cache = Some((epoch, order));
            }
            cache.as_ref().map(|c| c.1[p % n]).unwrap_or(0)
        })
        .collect()
}

/// The seeded order of the examples in `epoch`.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    order.shuffle(&mut rng);
    order
}

/// Effective batches per length-sorted window of [`group_by_length`].
pub const GROUP_WINDOW_BATCHES: usize = 8;

/// Groups a shuffled epoch `order` by length, as a "sortish" sampler (HF's `group_by_length`):
/// the order is cut into windows of [`GROUP_WINDOW_BATCHES`] effective batches and each window
/// is sorted by length, longest first or shortest first by a seeded coin. A batch pads to its
/// longest example, so a step of similar lengths wastes little compute on padding (on the seed
/// tasks, a random batch of 8 is mostly padding). Windows stay contiguous rather than cut into
/// shuffled batches because steps need not align with epochs: a step that straddles two
/// batches of a sorted window still gets neighbours in length. The epoch still visits each
/// example once, and which examples share a window is random.
pub fn group_by_length(
    order: &mut [usize],
    lengths: &[usize],
    effective_batch: usize,
    seed: u64,
    epoch: usize,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        !seed ^ (epoch as u64).wrapping_mul(0xD1B5_4A32_D192_ED03),
    );
    let window = (effective_batch.max(1) * GROUP_WINDOW_BATCHES).max(2);
    for w in order.chunks_mut(window) {
        let len = |i: &usize| lengths.get(*i).copied().unwrap_or(0);
        if rng.random_bool(0.5) {
            w.sort_by_key(|i| std::cmp::Reverse(len(i)));
        } else {
            w.sort_by_key(len);
        }
    }
}

/// A padded micro-batch on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `[rows, len]` row-major token ids (right-padded).
    pub ids: Vec<i64>,
    /// Rows.
    pub rows: usize,
    /// Padded length.
    pub len: usize,
    /// Flat positions `row·len + t` whose next token is a target.
    pub positions: Vec<i64>,
    /// The target token at each position.
    pub targets: Vec<i64>,
    /// Real (non-pad) tokens.
    pub tokens: usize,
}

impl Batch {
    /// Pads `examples` to their longest with `pad` (right padding: with the causal mask, no
    /// real token attends to a pad, and pads are never targets).
    pub fn new(examples: &[&Example], pad: u32) -> Batch {
        let rows = examples.len();
        let len = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let mut ids = vec![pad as i64; rows * len];
        let (mut positions, mut targets) = (Vec::new(), Vec::new());
        let mut tokens = 0;
        for (r, e) in examples.iter().enumerate() {
            tokens += e.ids.len();
            for (t, &id) in e.ids.iter().enumerate() {
                ids[r * len + t] = id as i64;
                // Token t is predicted at position t - 1.
                if t > 0 && e.trained.get(t).copied().unwrap_or(false) {
                    positions.push((r * len + t - 1) as i64);
                    targets.push(id as i64);
                }
            }
        }
        Batch {
            ids,
            rows,
            len,
            positions,
            targets,
            tokens,
        }
    }

    /// Target tokens.
    pub fn n_targets(&self) -> usize {
        self.targets.len()
    }

    /// Summed cross-entropy of the batch's targets under `model` (no dropout).
    pub fn loss_sum<B: Backend>(&self, model: &TrainLlama<B>, device: &B::Device) -> Tensor<B, 1> {
        let ids = Tensor::<B, 2, Int>::from_data(
            TensorData::new(self.ids.clone(), [self.rows, self.len]),
            device,
        );
        let n = self.targets.len();
        let pos =
            Tensor::<B, 1, Int>::from_data(TensorData::new(self.positions.clone(), [n]), device);
        let tgt =
            Tensor::<B, 1, Int>::from_data(TensorData::new(self.targets.clone(), [n]), device);
        model.loss_sum(ids, pos, tgt)
    }
}

/// Examples per forward/backward pass by default: on SmolLM2-135M at 256 tokens, LoRA training
/// in passes of 8 peaked at 7.9 GB resident, in passes of 2 at 2.7 GB, in passes of 1 at
/// 1.8 GB, each no slower than the larger (one example is already a matrix of 256 rows).
pub const DEFAULT_MICRO_BATCH: usize = 1;

/// Whether training recomputes blocks by default ([`SftConfig::recompute`]).
pub const RECOMPUTE_BY_DEFAULT: bool = true;

fn recompute_by_default() -> bool {
    RECOMPUTE_BY_DEFAULT
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Splits `examples` (in the given index order) into micro-batches of `batch_size`.
pub fn micro_batches(
    examples: &[Example],
    idx: &[usize],
    batch_size: usize,
    pad: u32,
) -> Vec<Batch> {
    idx.chunks(batch_size.max(1))
        .map(|c| {
            let refs: Vec<&Example> = c.iter().filter_map(|&i| examples.get(i)).collect();
            Batch::new(&refs, pad)
        })
        .filter(|b| b.n_targets() > 0)
        .collect()
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StepMetrics {
    /// 1-based step number.
    pub step: usize,
    /// Mean cross-entropy per target token.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Target tokens.
    pub targets: usize,
    /// All real tokens processed.
    pub tokens: usize,
    /// Token slots computed, padding included (rows x padded length of every micro-batch):
    /// `tokens / padded_tokens` is the share of the compute that was not wasted on padding.
    pub padded_tokens: usize,
    /// Wall seconds of the step.
    pub secs: f64,
}

/// Mean cross-entropy per target token of `examples` under `model` (no dropout, no gradient),
/// and the number of target tokens.
pub fn eval_loss<B: Backend>(
    model: &TrainLlama<B>,
    examples: &[Example],
    batch_size: usize,
    pad: u32,
    device: &B::Device,
) -> (f64, usize) {
    // Shortest first, in passes of like length (as the generator prefills): a pass pads its
    // examples to its longest, and in the given order 40 seed answers padded to 2.5 times
    // their tokens. The loss is a sum over targets, so the order changes rounding only.
    let mut idx: Vec<usize> = (0..examples.len()).collect();
    idx.sort_by_key(|&i| examples[i].ids.len());
    let lens: Vec<usize> = idx.iter().map(|&i| examples[i].ids.len()).collect();
    let (mut sum, mut n) = (0f64, 0usize);
    let mut start = 0;
    for end in crate::model::generate::length_groups(&lens) {
        for b in micro_batches(examples, &idx[start..end], batch_size, pad) {
            sum += b.loss_sum(model, device).into_scalar().elem::<f64>();
            n += b.n_targets();
        }
        start = end;
    }
    (if n > 0 { sum / n as f64 } else { f64::NAN }, n)
}

/// Sums the squared gradients of a module's parameters.
struct GradNormSq<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    sum: f64,
    _b: PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for GradNormSq<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            self.sum += g.powi_scalar(2).sum().into_scalar().elem::<f64>();
        }
    }
}

/// Multiplies every gradient by a factor.
struct GradScale<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    factor: f64,
    _b: PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for GradScale<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            self.grads.register(param.id, g.mul_scalar(self.factor));
        }
    }
}

/// The global L2 norm of `grads` over `model`'s parameters.
pub fn grad_norm<B: AutodiffBackend>(model: &TrainLlama<B>, grads: &GradientsParams) -> f64 {
    let mut v = GradNormSq::<B> {
        grads,
        sum: 0.0,
        _b: PhantomData,
    };
    model.visit(&mut v);
    v.sum.sqrt()
}

/// Model, optimizer and step counter.
pub struct Trainer<B: AutodiffBackend> {
    /// The model being trained.
    pub model: TrainLlama<B>,
    optim: OptimizerAdaptor<AdamW, TrainLlama<B>, B>,
    /// Optimizer steps done.
    pub step: usize,
    /// Hyper-parameters.
    pub cfg: SftConfig,
    device: B::Device,
}

impl<B: AutodiffBackend> Trainer<B> {
    /// A trainer at step 0. AdamW: betas (0.9, 0.999), eps 1e-8 (PyTorch's defaults).
    pub fn new(model: TrainLlama<B>, cfg: SftConfig, device: B::Device) -> Self {
        let optim = AdamWConfig::new()
            .with_weight_decay(cfg.weight_decay)
            .with_epsilon(1e-8)
            .init();
        Trainer {
            model,
            optim,
            step: 0,
            cfg,
            device,
        }
    }

    /// One optimizer step over `micro` (the micro-batches of one effective batch): the loss is
    /// the mean over all their target tokens, so accumulation equals one big batch.
    pub fn train_step(&mut self, micro: &[Batch]) -> StepMetrics {
        // On a rayon worker, as the model's forward pass: the many products of a step fan out
        // over the pool as joins, not as one futex hand-off each from the caller's thread.
        rayon::scope(|_| self.train_step_on_worker(micro))
    }

    /// [`Trainer::train_step`] on whatever thread calls it.
    fn train_step_on_worker(&mut self, micro: &[Batch]) -> StepMetrics {
        let t0 = std::time::Instant::now();
        let total: usize = micro.iter().map(Batch::n_targets).sum();
        let lr = self.cfg.lr_at(self.step);
        // Dropout masks depend on (seed, step) only: resumed runs repeat them.
        let step_seed = self
            .cfg
            .seed
            .wrapping_add(1 + self.step as u64)
            .wrapping_mul(0x2545_F491_4F6C_DD1D);
        let mut acc = GradientsAccumulator::<TrainLlama<B>>::new();
        let mut loss_sum = 0f64;
        let (mut tokens, mut padded) = (0, 0);
        let scale = 1.0 / total.max(1) as f64;
        for (m, b) in micro.iter().enumerate().filter(|(_, b)| b.n_targets() > 0) {
            let dropout = DropoutSeed {
                step: step_seed,
                micro: m,
            };
            let grads_of = if self.cfg.recompute {
                backward::recomputed
            } else {
                backward::stored
            };
            loss_sum += grads_of(&self.model, b, scale, dropout, &mut acc, &self.device);
            tokens += b.tokens;
            padded += b.rows * b.len;
        }
        let mut grads = acc.grads();
        let norm = grad_norm(&self.model, &grads);
        let max = self.cfg.max_grad_norm as f64;
        if max > 0.0 && norm > max {
            let mut s = GradScale::<B> {
                grads: &mut grads,
                factor: max / (norm + 1e-6),
                _b: PhantomData,
            };
            self.model.visit(&mut s);
        }
        let model = self.model.clone();
        self.model = self.optim.step(lr, model, grads);
        self.step += 1;
        StepMetrics {
            step: self.step,
            loss: loss_sum / total.max(1) as f64,
            lr,
            grad_norm: norm,
            targets: total,
            tokens,
            padded_tokens: padded,
            secs: t0.elapsed().as_secs_f64(),
        }
    }

    /// The model without autodiff, for evaluation and export.
    pub fn valid(&self) -> TrainLlama<B::InnerBackend> {
        self.model.valid()
    }

    /// The optimizer state (AdamW moments, keyed by parameter id) as bytes.
    pub fn optimizer_state(&self) -> Result<Vec<u8>, TrainError> {
        let item = self.optim.to_record().into_item::<FullPrecisionSettings>();
        bincode::serialize(&item)
            .map_err(|e| TrainError::Checkpoint(format!("optimizer state: {e}")))
    }

    /// Restores an optimizer state written by [`Trainer::optimizer_state`] and the step.
    pub fn restore(&mut self, state: &[u8], step: usize) -> Result<(), TrainError> {
        type Rec<B> =
            <OptimizerAdaptor<AdamW, TrainLlama<B>, B> as Optimizer<TrainLlama<B>, B>>::Record;
        let item: <Rec<B> as Record<B>>::Item<FullPrecisionSettings> = bincode::deserialize(state)
            .map_err(|e| TrainError::Checkpoint(format!("optimizer state: {e}")))?;
        if let Some(bad) = item.keys().find(|k| ParamId::try_deserialize(k).is_none()) {
            return Err(TrainError::Checkpoint(format!(
                "optimizer state: bad parameter id {bad:?}"
            )));
        }
        let rec = Rec::<B>::from_item(item, &self.device);
        self.optim = self.optim.clone().load_record(rec);
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llama::{HostTensor, LayerWeight, RandomWeights, WeightName, WeightSource};
    use crate::model::{LlamaConfig, ModelError};
    use crate::train::lora::{LoraAdapter, LoraConfig};
    use crate::train::model::{hf_name, TrainMode, PROJECTION_WEIGHTS};
    use burn::backend::{Autodiff, Flex};
    use std::collections::HashMap;

    type Inner = Flex;
    type Ad = Autodiff<Flex>;

    use crate::train::tiny_config as tiny_cfg;

    /// All weights of a config by HF name, editable.
    #[derive(Clone)]
    struct Store(HashMap<String, HostTensor>);

    impl Store {
        /// Random weights, scaled up (std ~0.25) so every gradient is well above f32 noise.
        fn random(cfg: &LlamaConfig, seed: u64, scale: f32) -> Store {
            let mut src = RandomWeights::new(cfg.clone(), seed);
            let mut map = HashMap::new();
            let mut names = vec![WeightName::Embedding, WeightName::OutputNorm];
            if !cfg.tie_embeddings {
                names.push(WeightName::Output);
            }
            for l in 0..cfg.n_layers {
                for w in [
                    LayerWeight::AttnNorm,
                    LayerWeight::Q,
                    LayerWeight::K,
                    LayerWeight::V,
                    LayerWeight::O,
                    LayerWeight::FfnNorm,
                    LayerWeight::Gate,
                    LayerWeight::Up,
                    LayerWeight::Down,
                ] {
                    names.push(WeightName::Layer(l, w));
                }
            }
            for n in names {
                let mut t = src.load(n).expect("random").expect("present");
                let is_norm = t.shape.len() == 1;
                // Norm weights arrive as ones: vary them a little so their gradients differ.
                for (i, v) in t.data.iter_mut().enumerate() {
                    *v = if is_norm {
                        1.0 + 0.2 * (i as f32 * 0.7).sin()
                    } else {
                        *v * scale
                    };
                }
                map.insert(hf_name(n), t);
            }
            Store(map)
        }
    }

    impl WeightSource for Store {
        fn load(&mut self, name: WeightName) -> Result<Option<HostTensor>, ModelError> {
            Ok(self.0.get(&hf_name(name)).cloned())
        }
    }

    fn examples() -> Vec<Example> {
        // Token 1 stands for the end of turn; prompts are masked, outputs trained.
        let pairs: [(&[u32], &[u32]); 8] = [
            (&[5, 6, 7], &[20, 21, 22, 1]),
            (&[8, 9], &[23, 24, 25, 26, 1]),
            (&[10, 11, 12, 13], &[27, 28, 1]),
            (&[14, 15], &[29, 30, 31, 32, 1]),
            (&[16, 5, 9], &[33, 34, 35, 1]),
            (&[17, 18], &[36, 37, 38, 39, 1]),
            (&[19, 7, 6], &[40, 41, 42, 1]),
            (&[4, 3], &[43, 44, 45, 46, 1]),
        ];
        pairs
            .iter()
            .map(|(p, o)| Example {
                ids: p.iter().chain(o.iter()).copied().collect(),
                trained: p
                    .iter()
                    .map(|_| false)
                    .chain(o.iter().map(|_| true))
                    .collect(),
            })
            .collect()
    }

    /// More targets than one head pass takes ([`crate::train::model::HEAD_ROWS`]): the chunked
    /// loss equals the cross-entropy computed here in f64 from every position's logits.
    #[test]
    fn loss_over_many_targets_matches_the_full_logits() {
        use crate::train::model::HEAD_ROWS;
        let cfg = tiny_cfg();
        let store = Store::random(&cfg, 5, 4.0);
        let dev = Default::default();
        let model: TrainLlama<Inner> =
            TrainLlama::load(cfg.clone(), &mut store.clone(), &TrainMode::Full, &dev)
                .expect("load");
        // 9 examples of 60 tokens, all but the first 4 trained: 9 x 56 = 504 targets.
        let mut rng = 7u64;
        let examples: Vec<Example> = (0..9)
            .map(|_| Example {
                ids: (0..60)
                    .map(|_| {
                        rng = rng
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        2 + (rng >> 33) as u32 % (cfg.vocab as u32 - 2)
                    })
                    .collect(),
                trained: (0..60).map(|t| t >= 4).collect(),
            })
            .collect();
        let refs: Vec<&Example> = examples.iter().collect();
        let batch = Batch::new(&refs, 0);
        assert!(
            batch.n_targets() > HEAD_ROWS,
            "{} targets",
            batch.n_targets()
        );
        let got = mean_loss(&model, &batch);
        let ids = Tensor::<Inner, 2, Int>::from_data(
            TensorData::new(batch.ids.clone(), [batch.rows, batch.len]),
            &dev,
        );
        let logits = model.forward(ids).into_data().to_vec::<f32>().expect("f32");
        let v = cfg.vocab;
        let mut sum = 0f64;
        for (&p, &t) in batch.positions.iter().zip(&batch.targets) {
            let row = &logits[p as usize * v..(p as usize + 1) * v];
            let max = row.iter().fold(f64::MIN, |m, &x| m.max(x as f64));
            let lse = max
                + row
                    .iter()
                    .map(|&x| (x as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            sum += lse - row[t as usize] as f64;
        }
        let want = sum / batch.n_targets() as f64;
        assert!((got - want).abs() < 1e-4 * want.abs(), "{got} vs {want}");
    }

    fn mean_loss(model: &TrainLlama<Inner>, batch: &Batch) -> f64 {
        let dev = Default::default();
        batch.loss_sum(model, &dev).into_scalar().elem::<f64>() / batch.n_targets() as f64
    }

    fn grad_of(g: &GradientsParams, p: &Param<Tensor<Ad, 2>>) -> Vec<f32> {
        g.get::<Inner, 2>(p.id)
            .expect("gradient present")
            .into_data()
            .to_vec::<f32>()
            .expect("f32")
    }

    fn close(analytic: f64, numeric: f64) -> bool {
        (analytic - numeric).abs() <= 0.03 * numeric.abs().max(analytic.abs()) + 1e-3
    }

    #[test]
    fn full_gradients_match_central_differences() {
        let cfg = tiny_cfg();
        let store = Store::random(&cfg, 7, 12.0);
        let dev = Default::default();
        let ex = examples();
        let refs: Vec<&Example> = ex.iter().take(4).collect();
        let batch = Batch::new(&refs, 0);
        let model: TrainLlama<Ad> =
            TrainLlama::load(cfg.clone(), &mut store.clone(), &TrainMode::Full, &dev)
                .expect("load");
        let loss = batch
            .loss_sum(&model, &dev)
            .div_scalar(batch.n_targets() as f64);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        // (weight name, flat index, analytic gradient)
        let b0 = &model.blocks[0];
        let b1 = &model.blocks[1];
        // The largest entry of each weight's gradient: well above f32 noise in the difference.
        let argmax = |g: Vec<f32>| -> (usize, f32) {
            g.iter()
                .copied()
                .enumerate()
                .max_by(|x, y| x.1.abs().total_cmp(&y.1.abs()))
                .unwrap_or((0, 0.0))
        };
        fn f32_base(l: &crate::train::lora::Linear<Ad>) -> &Param<Tensor<Ad, 2>> {
            l.weight.as_ref().expect("f32 base")
        }
        let named: Vec<(&str, &Param<Tensor<Ad, 2>>)> = vec![
            (
                "model.embed_tokens.weight",
                model.embed.dense.as_ref().expect("f32 embedding"),
            ),
            ("model.layers.0.self_attn.q_proj.weight", f32_base(&b0.q)),
            ("model.layers.0.self_attn.k_proj.weight", f32_base(&b0.k)),
            ("model.layers.1.self_attn.v_proj.weight", f32_base(&b1.v)),
            ("model.layers.0.self_attn.o_proj.weight", f32_base(&b0.o)),
            ("model.layers.1.mlp.gate_proj.weight", f32_base(&b1.gate)),
            ("model.layers.0.mlp.up_proj.weight", f32_base(&b0.up)),
            ("model.layers.1.mlp.down_proj.weight", f32_base(&b1.down)),
        ];
        let mut checks: Vec<(String, usize, f32)> = named
            .into_iter()
            .map(|(n, p)| {
                let (i, g) = argmax(grad_of(&grads, p));
                (n.to_string(), i, g)
            })
            .collect();
        // And one fixed entry, whatever its size.
        checks.push((
            "model.layers.1.mlp.down_proj.weight".into(),
            64 * 3 + 10,
            grad_of(&grads, b1.down.weight.as_ref().expect("f32 base"))[64 * 3 + 10],
        ));
        let eps = 4e-3f32;
        for (name, i, analytic) in checks {
            let f = |delta: f32| {
                let mut s = store.clone();
                s.0.get_mut(&name).expect("weight").data[i] += delta;
                let m: TrainLlama<Inner> =
                    TrainLlama::load(cfg.clone(), &mut s, &TrainMode::Full, &dev).expect("load");
                mean_loss(&m, &batch)
            };
            let numeric = (f(eps) - f(-eps)) / (2.0 * eps as f64);
            assert!(
                close(analytic as f64, numeric),
                "{name}[{i}]: autodiff {analytic} vs finite difference {numeric}"
            );
        }
    }

    /// LoRA over a base kept as 8-bit blocks computes what LoRA over those blocks' own f32
    /// values does: the same loss and the same adapter gradients (the blocks are dequantized
    /// for each product, never trained; the head's backward put in by hand), whole graph or
    /// blocks recomputed, the head tied to the embedding or its own; over the original f32
    /// weights it is close, not equal.
    #[test]
    fn lora_over_blocks_matches_lora_over_their_f32_values() {
        for tie in [true, false] {
            let mut cfg = tiny_cfg();
            cfg.tie_embeddings = tie;
            lora_over_blocks_matches(cfg);
        }
    }

    fn lora_over_blocks_matches(cfg: crate::model::LlamaConfig) {
        use crate::model::quant::Q8Matrix;
        use crate::model::Precision;
        use crate::train::backward::{recomputed, DropoutSeed};
        let store = Store::random(&cfg, 5, 12.0);
        assert_eq!(
            store.0.iter().any(|(n, _)| n == "lm_head.weight"),
            !cfg.tie_embeddings
        );
        // The same weights as the blocks hold them: every projection, the embedding and the
        // head through 8-bit blocks and back.
        let mut rounded = store.clone();
        for (_, t) in rounded.0.iter_mut().filter(|(n, _)| {
            n.starts_with("model.layers.")
                || *n == "model.embed_tokens.weight"
                || *n == "lm_head.weight"
        }) {
            if t.shape.len() != 2 {
                continue;
            }
            let (rows, cols) = (t.shape[0], t.shape[1]);
            t.data = Q8Matrix::quantize(&t.data, rows, cols).dequantize();
        }
        let dev = Default::default();
        // No dropout: the whole graph below runs without, the recomputed blocks with a seed.
        let mut lc = LoraConfig::all_projections(4);
        lc.dropout = 0.0;
        let mode = TrainMode::Lora(lc.clone());
        let ex = examples();
        let refs: Vec<&Example> = ex.iter().take(4).collect();
        let batch = Batch::new(&refs, 0);
        let run = |src: &Store, base: Precision| {
            Ad::seed(&dev, 21);
            let mut m: TrainLlama<Ad> =
                TrainLlama::load_with_base(cfg.clone(), &mut src.clone(), &mode, base, &dev)
                    .expect("load");
            // B nonzero on one projection, so A has a gradient and the adapter moves the loss.
            let b = Tensor::from_data(
                TensorData::new(
                    (0..32 * 4).map(|i| (i as f32 * 0.37).sin()).collect(),
                    [32, 4],
                ),
                &dev,
            );
            let a = m.blocks[1].down.lora.as_ref().expect("adapter").a.val();
            m.set_adapter(
                1,
                LayerWeight::Down,
                LoraAdapter::from_tensors("model.layers.1.mlp.down_proj", a, b, &lc),
            )
            .expect("adapter");
            let loss = batch
                .loss_sum(&m, &dev)
                .div_scalar(batch.n_targets() as f64);
            let value = loss.clone().into_scalar().elem::<f64>();
            let grads = GradientsParams::from_grads(loss.backward(), &m);
            let adapter = m.blocks[1].down.lora.as_ref().expect("adapter");
            let q = m.blocks[0].q.lora.as_ref().expect("adapter");
            (value, grad_of(&grads, &adapter.a), grad_of(&grads, &q.b), m)
        };
        let (l_f32, ga_f32, gb_f32, _) = run(&rounded, Precision::F32);
        let (l_q8, ga_q8, gb_q8, m) = run(&store, Precision::Q8);
        assert!(m.blocks[0].q.weight.is_none() && m.blocks[0].q.blocks.is_some());
        assert!(m.embed.dense.is_none() && m.embed.blocks.is_some());
        assert_eq!(
            m.lm_head.as_ref().map(|h| h.blocks.is_some()),
            (!cfg.tie_embeddings).then_some(true)
        );
        assert!(
            (l_f32 - l_q8).abs() <= 1e-5 * l_f32.abs(),
            "{l_f32} vs {l_q8}"
        );
        let same = |x: &f32, y: &f32| (x - y).abs() <= 1e-4 * x.abs().max(1e-3);
        for (x, y) in ga_f32.iter().zip(&ga_q8).chain(gb_f32.iter().zip(&gb_q8)) {
            assert!(same(x, y), "{x} vs {y}");
        }
        // Blocks recomputed in the backward pass: the head's gradient reaches the top block's
        // output, a tensor of its own, and from there every adapter.
        let mut acc = GradientsAccumulator::<TrainLlama<Ad>>::new();
        let dropout = DropoutSeed { step: 1, micro: 0 };
        let scale = 1.0 / batch.n_targets() as f64;
        let loss = recomputed(&m, &batch, scale, dropout, &mut acc, &dev) * scale;
        assert!((loss - l_q8).abs() <= 1e-5 * l_q8.abs(), "{loss} vs {l_q8}");
        let grads = acc.grads();
        let ga = grad_of(&grads, &m.blocks[1].down.lora.as_ref().expect("adapter").a);
        let gb = grad_of(&grads, &m.blocks[0].q.lora.as_ref().expect("adapter").b);
        // Within 1e-4 of each gradient's largest value (as `recomputed_blocks_give_the_stored_
        // graphs_gradients` compares: the two ways sum in different orders).
        for (whole, again) in [(&ga_q8, &ga), (&gb_q8, &gb)] {
            let scale = whole.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(scale > 0.0);
            for (x, y) in whole.iter().zip(again) {
                assert!(
                    (x - y).abs() <= 1e-4 * scale,
                    "{x} whole graph vs {y} recomputed"
                );
            }
        }
        // Against the unrounded f32 weights: 8-bit rounding moves the loss a little.
        let (l_orig, ..) = run(&store, Precision::F32);
        assert!(
            l_orig != l_q8 && (l_orig - l_q8).abs() < 0.02 * l_orig,
            "{l_orig} vs {l_q8}"
        );
        // Full finetuning trains f32 master weights: blocks are refused, with a reason.
        let err = TrainLlama::<Ad>::load_with_base(
            cfg.clone(),
            &mut store.clone(),
            &TrainMode::Full,
            Precision::Native,
            &dev,
        )
        .expect_err("full finetuning over blocks");
        assert!(err.to_string().contains("full finetuning"), "{err}");
    }

    #[test]
    fn lora_gradients_match_central_differences_and_base_is_frozen() {
        use burn::tensor::Distribution;
        let cfg = tiny_cfg();
        let store = Store::random(&cfg, 3, 12.0);
        let dev = Default::default();
        let lc = LoraConfig::all_projections(4);
        let path = "model.layers.1.self_attn.q_proj";
        // B random (not zero) so that A has a gradient too.
        Inner::seed(&dev, 11);
        let a: Tensor<Inner, 2> = Tensor::random([4, 32], Distribution::Uniform(-0.5, 0.5), &dev);
        let b: Tensor<Inner, 2> = Tensor::random([32, 4], Distribution::Uniform(-0.5, 0.5), &dev);
        let (a_host, b_host) = (
            a.into_data().to_vec::<f32>().expect("f32"),
            b.into_data().to_vec::<f32>().expect("f32"),
        );
        fn build<BB: Backend>(
            cfg: &LlamaConfig,
            store: &Store,
            lc: &LoraConfig,
            a: &[f32],
            b: &[f32],
        ) -> TrainLlama<BB> {
            let dev = Default::default();
            let mut m = TrainLlama::<BB>::load(
                cfg.clone(),
                &mut store.clone(),
                &TrainMode::Lora(lc.clone()),
                &dev,
            )
            .expect("load");
            let a = Tensor::from_data(TensorData::new(a.to_vec(), [4, 32]), &dev);
            let b = Tensor::from_data(TensorData::new(b.to_vec(), [32, 4]), &dev);
            m.set_adapter(
                1,
                LayerWeight::Q,
                LoraAdapter::from_tensors("model.layers.1.self_attn.q_proj", a, b, lc),
            )
            .expect("adapter");
            m
        }
        let ex = examples();
        let refs: Vec<&Example> = ex.iter().skip(2).take(4).collect();
        let batch = Batch::new(&refs, 0);
        let model: TrainLlama<Ad> = build(&cfg, &store, &lc, &a_host, &b_host);
        let loss = batch
            .loss_sum(&model, &dev)
            .div_scalar(batch.n_targets() as f64);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let lora = model.blocks[1].q.lora.as_ref().expect("adapter");
        let ga = grad_of(&grads, &lora.a);
        let gb = grad_of(&grads, &lora.b);
        assert!(
            grads
                .get::<Inner, 2>(model.blocks[1].q.weight.as_ref().expect("f32 base").id)
                .is_none(),
            "base weight got a gradient"
        );
        assert!(
            grads
                .get::<Inner, 2>(model.embed.dense.as_ref().expect("f32 embedding").id)
                .is_none(),
            "embedding got a gradient"
        );
        let eps = 4e-3f32;
        for (which, i) in [("a", 3usize), ("a", 70), ("b", 9), ("b", 100)] {
            let analytic = if which == "a" { ga[i] } else { gb[i] };
            let f = |delta: f32| {
                let (mut a, mut b) = (a_host.clone(), b_host.clone());
                if which == "a" {
                    a[i] += delta
                } else {
                    b[i] += delta
                }
                mean_loss(&build::<Inner>(&cfg, &store, &lc, &a, &b), &batch)
            };
            let numeric = (f(eps) - f(-eps)) / (2.0 * eps as f64);
            assert!(
                close(analytic as f64, numeric),
                "{path} lora_{which}[{i}]: autodiff {analytic} vs finite difference {numeric}"
            );
        }
    }

    #[test]
    fn tiny_model_overfits_eight_pairs() {
        let cfg = tiny_cfg();
        let dev = Default::default();
        Ad::seed(&dev, 1);
        let model: TrainLlama<Ad> = TrainLlama::load(
            cfg.clone(),
            &mut RandomWeights::new(cfg.clone(), 5),
            &TrainMode::Full,
            &dev,
        )
        .expect("load");
        let sft = SftConfig {
            lr: 1e-2,
            lr_end: 1e-3,
            weight_decay: 0.0,
            batch_size: 4,
            grad_accum: 2,
            micro_batch: 0,
            recompute: true,
            max_grad_norm: 1.0,
            steps: 150,
            seed: 9,
        };
        let ex = examples();
        let mut tr = Trainer::new(model, sft.clone(), dev);
        let mut first = None;
        let mut last = f64::NAN;
        for step in 0..sft.steps {
            let idx = step_indices(ex.len(), None, step, sft.effective_batch(), sft.seed);
            let m = tr.train_step(&micro_batches(&ex, &idx, sft.batch_size, 0));
            first.get_or_insert(m.loss);
            last = m.loss;
        }
        let first = first.expect("steps ran");
        assert!(last < 0.05 * first, "loss {first} -> {last}");
        let model = tr.valid();
        for e in &ex {
            let p = e.trained.iter().position(|&t| t).expect("output");
            let out = model.greedy(&e.ids[..p], 10, &[1]);
            assert_eq!(out, e.ids[p..].to_vec(), "prompt {:?}", &e.ids[..p]);
        }
    }

    #[test]
    fn accumulation_equals_one_big_batch_and_resume_is_exact() {
        let cfg = tiny_cfg();
        let dev: burn::tensor::Device<Ad> = Default::default();
        let ex = examples();
        let run = |batch_size: usize,
                   grad_accum: usize,
                   micro_batch: usize,
                   recompute: bool,
                   steps: usize| {
            let model: TrainLlama<Ad> = TrainLlama::load(
                cfg.clone(),
                &mut RandomWeights::new(cfg.clone(), 5),
                &TrainMode::Full,
                &dev,
            )
            .expect("load");
            let sft = SftConfig {
                lr: 1e-2,
                lr_end: 1e-2,
                weight_decay: 0.1,
                batch_size,
                grad_accum,
                micro_batch,
                recompute,
                max_grad_norm: 0.5,
                steps: 4,
                seed: 2,
            };
            let mut tr = Trainer::new(model, sft.clone(), dev);
            let mut losses = Vec::new();
            for step in 0..steps {
                let idx = step_indices(ex.len(), None, step, sft.effective_batch(), sft.seed);
                let micro = micro_batches(&ex, &idx, sft.micro_size(), 0);
                losses.push(tr.train_step(&micro).loss);
            }
            (tr, losses)
        };
        let (_, big) = run(8, 1, 0, false, 4);
        // Accumulated batches, one batch computed in passes of 2 (--micro-batch), and with
        // blocks recomputed.
        for (batch, accum, micro, recompute) in
            [(2, 4, 0, false), (8, 1, 2, false), (8, 1, 0, true)]
        {
            let (_, acc) = run(batch, accum, micro, recompute, 4);
            for (a, b) in big.iter().zip(&acc) {
                assert!((a - b).abs() < 1e-4 * a.abs(), "{big:?} vs {acc:?}");
            }
        }
        // Resume: 2 steps, export weights + optimizer state, rebuild, 2 more steps: the loss
        // of the 4th step depends on the restored AdamW moments.
        let (tr2, _) = run(8, 1, 0, false, 2);
        let state = tr2.optimizer_state().expect("state");
        let mut weights = Store(HashMap::new());
        for (n, t) in crate::train::checkpoint::export_weights(&tr2.valid()).expect("export") {
            weights.0.insert(n, t);
        }
        let model: TrainLlama<Ad> =
            TrainLlama::load(cfg.clone(), &mut weights, &TrainMode::Full, &dev).expect("load");
        let sft = SftConfig {
            lr: 1e-2,
            lr_end: 1e-2,
            weight_decay: 0.1,
            batch_size: 8,
            grad_accum: 1,
            micro_batch: 0,
            recompute: false,
            max_grad_norm: 0.5,
            steps: 4,
            seed: 2,
        };
        let mut tr = Trainer::new(model, sft.clone(), dev);
        tr.restore(&state, 2).expect("restore");
        let mut resumed = Vec::new();
        for step in 2..4 {
            let idx = step_indices(ex.len(), None, step, 8, 2);
            resumed.push(tr.train_step(&micro_batches(&ex, &idx, 8, 0)).loss);
        }
        assert!(
            (resumed[1] - big[3]).abs() < 1e-5 * big[3].abs(),
            "resumed {resumed:?} vs {big:?}"
        );
    }

    /// Every parameter gradient of one micro-batch, the whole graph kept or blocks
    /// recomputed, with LoRA dropout on: the same values (the dropout masks drawn again).
    #[test]
    fn recomputed_blocks_give_the_stored_graphs_gradients() {
        use crate::train::backward::{recomputed, stored, DropoutSeed};
        let cfg = tiny_cfg();
        let dev: burn::tensor::Device<Ad> = Default::default();
        let ex = examples();
        let refs: Vec<&Example> = ex.iter().take(3).collect();
        let batch = Batch::new(&refs, 0);
        let mut lc = LoraConfig::all_projections(4);
        lc.dropout = 0.3;
        for mode in [TrainMode::Full, TrainMode::Lora(lc)] {
            let store = Store::random(&cfg, 13, 12.0);
            Ad::seed(&dev, 5);
            let mut model: TrainLlama<Ad> =
                TrainLlama::load(cfg.clone(), &mut store.clone(), &mode, &dev).expect("load");
            // B = 0 would leave A without a gradient: give every adapter a random B.
            for blk in model.blocks.iter_mut() {
                for w in PROJECTION_WEIGHTS {
                    if let Some(l) = blk.projection_lora_mut(w) {
                        let b =
                            l.b.val()
                                .random_like(burn::tensor::Distribution::Normal(0.0, 0.3));
                        l.b = Param::initialized(l.b.id, b.require_grad());
                    }
                }
            }
            let dropout = DropoutSeed { step: 77, micro: 1 };
            let grads = |recompute: bool| {
                let mut acc = GradientsAccumulator::<TrainLlama<Ad>>::new();
                let f = if recompute { recomputed } else { stored };
                let loss = f(&model, &batch, 0.1, dropout, &mut acc, &dev);
                (loss, acc.grads())
            };
            let ((l1, g1), (l2, g2)) = (grads(false), grads(true));
            assert!(
                (l1 - l2).abs() < 1e-5 * l1.abs(),
                "{mode:?}: loss {l1} vs {l2}"
            );
            let mut ids = Vec::new();
            let mut collect = ParamIds(&mut ids);
            model.visit(&mut collect);
            let mut compared = 0;
            for (id, dims) in ids {
                let get = |g: &GradientsParams| -> Option<Vec<f32>> {
                    let t: Option<Vec<f32>> = match dims {
                        1 => g
                            .get::<Inner, 1>(id)
                            .map(|t| t.into_data().to_vec().expect("f32")),
                        _ => g
                            .get::<Inner, 2>(id)
                            .map(|t| t.into_data().to_vec().expect("f32")),
                    };
                    t
                };
                match (get(&g1), get(&g2)) {
                    (None, None) => {}
                    (Some(a), Some(b)) => {
                        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
                        assert!(scale > 0.0, "{mode:?}: a zero gradient");
                        for (x, y) in a.iter().zip(&b) {
                            assert!(
                                (x - y).abs() <= 1e-4 * scale,
                                "{mode:?}: gradient {x} stored vs {y} recomputed"
                            );
                        }
                        compared += 1;
                    }
                    (a, b) => panic!(
                        "{mode:?}: gradient present stored {} recomputed {}",
                        a.is_some(),
                        b.is_some()
                    ),
                }
            }
            // Full: embedding, final norm and 2 x 9 block weights; LoRA: 2 x 7 x (A, B).
            let want = match mode {
                TrainMode::Full => 2 + 2 * 9,
                TrainMode::Lora(_) => 2 * 7 * 2,
            };
            assert_eq!(compared, want, "{mode:?}");
        }
        // Other masks give other gradients: the dropout is live in this test.
        let mut lc = LoraConfig::all_projections(4);
        lc.dropout = 0.3;
        Ad::seed(&dev, 5);
        let mut model: TrainLlama<Ad> = TrainLlama::load(
            cfg.clone(),
            &mut Store::random(&cfg, 13, 12.0),
            &TrainMode::Lora(lc),
            &dev,
        )
        .expect("load");
        if let Some(l) = model.blocks[0].projection_lora_mut(LayerWeight::Q) {
            let b =
                l.b.val()
                    .random_like(burn::tensor::Distribution::Normal(0.0, 0.3));
            l.b = Param::initialized(l.b.id, b.require_grad());
        }
        let loss = |micro: usize| {
            let mut acc = GradientsAccumulator::<TrainLlama<Ad>>::new();
            stored(
                &model,
                &batch,
                1.0,
                DropoutSeed { step: 77, micro },
                &mut acc,
                &dev,
            )
        };
        assert_ne!(loss(0), loss(1));
    }

    /// The id and rank of every parameter of a module.
    struct ParamIds<'a>(&'a mut Vec<(ParamId, usize)>);

    impl<B: Backend> ModuleVisitor<B> for ParamIds<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.push((param.id, D));
        }
    }

    #[test]
    fn grouping_by_length_keeps_epochs_whole_and_cuts_padding() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let lengths: Vec<usize> = (0..100).map(|_| rng.random_range(10..400)).collect();
        let (e, steps) = (10, 10); // one epoch of 100
        let padded = |grouped: bool| -> usize {
            let mut seen = vec![0; lengths.len()];
            let mut total = 0;
            for step in 0..steps {
                let idx = step_indices(100, grouped.then_some(&lengths[..]), step, e, 7);
                assert_eq!(idx.len(), e);
                for &i in &idx {
                    seen[i] += 1;
                }
                total += e * idx.iter().map(|&i| lengths[i]).max().unwrap_or(0);
            }
            assert!(
                seen.iter().all(|&c| c == 1),
                "epoch not visited once: {seen:?}"
            );
            total
        };
        let real: usize = lengths.iter().sum();
        let (plain, grouped) = (padded(false), padded(true));
        assert!(
            grouped * 10 < plain * 7,
            "padded tokens: grouped {grouped}, plain {plain}, real {real}"
        );
        // Seeded: the same step gives the same examples; another epoch another order.
        let at = |step| step_indices(100, Some(&lengths), step, e, 7);
        assert_eq!(at(3), at(3));
        assert_ne!(at(3), at(13));
        // Within a window the lengths are monotone.
        let w: Vec<usize> = (0..8).flat_map(at).map(|i| lengths[i]).collect();
        assert!(
            w.windows(2).all(|p| p[0] <= p[1]) || w.windows(2).all(|p| p[0] >= p[1]),
            "{w:?}"
        );
    }
}
