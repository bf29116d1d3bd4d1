//! A training run as a library call: [`super::run_job`] trains a [`TrainJob`] (base model, tagged data
//! groups, knobs) into a checkpoint folder and reports a [`TrainOutcome`]. `backflow train` is a
//! thin wrapper over it; the Humpback pipeline's training sink calls it directly.
//!
//! Finished work is reused: every checkpoint records a fingerprint of the job that made it
//! (`job_fingerprint` in `backflow.json`: the base model's path and content, every record and
//! its group's tag in order, every knob that changes the weights). When the output folder
//! already holds a finished checkpoint of an identical job, [`super::run_job`] returns its outcome
//! (`reused: true`) without training, so a pipeline killed after a training step resumes
//! without redoing it.

use std::path::PathBuf;

use super::data::{DataSource, DataStats, Record};
use super::lora::LoraConfig;
use super::model::TrainMode;
use super::sft::{SftConfig, StepMetrics};
use super::TrainError;
use crate::model::Precision;

/// Epochs over the data when neither `steps` nor `epochs` is given.
pub const DEFAULT_EPOCHS: f64 = 3.0;

/// One group of training records and the tag (system prompt) they get.
#[derive(Debug, Clone, PartialEq)]
pub struct DataGroup {
    /// Decides the system-prompt tag of every record of the group (seed: S_a, augmented: S_w).
    pub source: DataSource,
    /// The records, in order.
    pub records: Vec<Record>,
}

/// What to train. [`TrainJob::new`] gives `backflow train`'s defaults.
#[derive(Debug, Clone)]
pub struct TrainJob {
    /// Base model: a GGUF file or a Hugging Face folder.
    pub model: PathBuf,
    /// Training data, encoded in this order (each group with its own tag) into one training set
    /// that the seeded step order then shuffles; e.g. seed (S_a) + curated web data (S_w).
    pub data: Vec<DataGroup>,
    /// Describes the data in `backflow.json` ("data"); the CLI gives the file path.
    pub data_label: String,
    /// Input items the caller could not parse into records: only reported, in
    /// [`DataStats::malformed`].
    pub malformed: usize,
    /// Output checkpoint folder (replaced atomically at each save).
    pub out: PathBuf,
    /// LoRA (with its hyper-parameters) or full finetuning.
    pub mode: TrainMode,
    /// The format the base's projections are kept in while training ([`TrainJob::base_format`]
    /// when `None`): `f32`, or under LoRA `native` / `q8` blocks, frozen and dequantized for
    /// each product (QLoRA's way).
    pub base_dtype: Option<Precision>,
    /// Peak learning rate (default: 1e-5 full, as the paper; 2e-4 LoRA).
    pub lr: Option<f64>,
    /// Final learning rate of the linear decay (default: 9e-6 full; lr/10 LoRA).
    pub lr_end: Option<f64>,
    /// AdamW weight decay (paper: 0.1).
    pub weight_decay: f32,
    /// Examples per batch.
    pub batch_size: usize,
    /// Batches per optimizer step.
    pub grad_accum: usize,
    /// Examples per forward/backward pass ([`crate::train::sft::SftConfig::micro_batch`]).
    pub micro_batch: usize,
    /// Recompute each block in the backward pass instead of keeping its activations
    /// ([`crate::train::sft::SftConfig::recompute`]).
    pub recompute: bool,
    /// Clip the global gradient norm (0: off).
    pub max_grad_norm: f32,
    /// Optimizer steps; wins over `epochs`.
    pub steps: Option<usize>,
    /// Epochs over the training examples (default [`DEFAULT_EPOCHS`]) when `steps` is `None`.
    pub epochs: Option<f64>,
    /// Max tokens per example (capped by the model's context): longer outputs are truncated,
    /// prompts this long are dropped.
    pub max_len: usize,
    /// Seed of data order, LoRA init, dropout and the held-out split.
    pub seed: u64,
    /// Train the backward model M_yx on reversed pairs (output -> instruction).
    pub backward: bool,
    /// Hold out this fraction of the examples (in `[0, 1)`); their output loss is reported
    /// before and after training.
    pub eval_frac: f64,
    /// Held-out data of its own (tagged and reversed like `data`), never trained on; its output
    /// loss is reported before and after training. Exclusive with `eval_frac`.
    pub eval_data: Vec<DataGroup>,
    /// Group each step's examples by length ([`crate::train::sft::group_by_length`]): far
    /// less padding, so faster steps, at the price of batches less mixed in length.
    pub group_by_length: bool,
    /// Save a checkpoint every N steps (0: only at the end).
    pub save_every: usize,
    /// Continue from the (unfinished) checkpoint of this same job in `out`.
    pub resume: bool,
    /// No progress bar: one log line per step instead.
    pub quiet: bool,
}

impl TrainJob {
    /// A job with `backflow train`'s defaults: LoRA rank 8 on all projections (alpha 16,
    /// dropout 0.05), default learning rates, weight decay 0.1, batch 8 in passes of one example (blocks recomputed), no accumulation, clip
    /// 1.0, [`DEFAULT_EPOCHS`] epochs, 512 tokens, seed 0, forward model, nothing held out.
    pub fn new(model: PathBuf, data: Vec<DataGroup>, out: PathBuf) -> Self {
        TrainJob {
            model,
            data,
            data_label: String::new(),
            malformed: 0,
            out,
            mode: TrainMode::Lora(LoraConfig::all_projections(8)),
            base_dtype: None,
            lr: None,
            lr_end: None,
            weight_decay: 0.1,
            batch_size: 8,
            grad_accum: 1,
            micro_batch: crate::train::sft::DEFAULT_MICRO_BATCH,
            recompute: crate::train::sft::RECOMPUTE_BY_DEFAULT,
            max_grad_norm: 1.0,
            steps: None,
            epochs: None,
            max_len: 512,
            seed: 0,
            backward: false,
            eval_frac: 0.0,
            eval_data: Vec::new(),
            group_by_length: true,
            save_every: 0,
            resume: false,
            quiet: true,
        }
    }

    /// The optimisation hyper-parameters with the defaults of the mode filled in; `steps` is 0
    /// here (it depends on the number of examples: see [`TrainJob::steps_for`]).
    pub fn sft_config(&self) -> SftConfig {
        let full = matches!(self.mode, TrainMode::Full);
        let defaults = if full {
            SftConfig::paper_full(0)
        } else {
            SftConfig::lora(0)
        };
        let lr = self.lr.unwrap_or(defaults.lr);
        SftConfig {
            lr,
            // An explicit LoRA lr decays to a tenth, as the LoRA default does; otherwise the
            // mode's end rate, never above the start.
            lr_end: self.lr_end.unwrap_or(if self.lr.is_some() && !full {
                lr / 10.0
            } else {
                defaults.lr_end.min(lr)
            }),
            weight_decay: self.weight_decay,
            batch_size: self.batch_size.max(1),
            grad_accum: self.grad_accum.max(1),
            micro_batch: self.micro_batch,
            recompute: self.recompute,
            max_grad_norm: self.max_grad_norm,
            steps: 0,
            seed: self.seed,
        }
    }

    /// Optimizer steps for `n_train` training examples: `steps`, or enough effective batches
    /// for `epochs` passes; at least 1.
    pub fn steps_for(&self, sft: &SftConfig, n_train: usize) -> usize {
        match self.steps {
            Some(s) => s,
            None => {
                let epochs = self.epochs.unwrap_or(DEFAULT_EPOCHS);
                ((n_train as f64 * epochs) / sft.effective_batch() as f64).ceil() as usize
            }
        }
        .max(1)
    }

    /// The base's format: `base_dtype`, else under LoRA the backend's block default on the CPU
    /// (`native`: a GGUF's own blocks, the model server's format) and f32 on CUDA, and f32 for
    /// full finetuning (its master weights).
    pub fn base_format(&self) -> Precision {
        match (self.base_dtype, &self.mode) {
            (Some(p), _) => p,
            (None, TrainMode::Full) => Precision::F32,
            (None, TrainMode::Lora(_)) => Precision::backend_default(),
        }
    }

    /// The job's fingerprint (hex xxh3-128): the base model's canonical path and content, every
    /// record and its group's tag in order, and every knob that changes the trained weights.
    /// Not covered: `out`, `data_label`, `malformed`, `save_every`, `resume` (a resumed run
    /// continues exactly as the uninterrupted one) and `quiet`.
    pub fn fingerprint(&self) -> Result<String, TrainError> {
        super::fingerprint::fingerprint(self)
    }

    /// Checks what can be checked before loading anything (a job that fails here never starts).
    pub fn validate(&self) -> Result<(), TrainError> {
        if let TrainMode::Lora(lc) = &self.mode {
            if lc.rank == 0 {
                return Err(TrainError::Config("LoRA rank must be positive".into()));
            }
        }
        if !(0.0..1.0).contains(&self.eval_frac) {
            return Err(TrainError::Config(format!(
                "eval fraction {} is not in [0, 1)",
                self.eval_frac
            )));
        }
        if self.eval_frac > 0.0 && !self.eval_data.is_empty() {
            return Err(TrainError::Config(
                "held-out data and a held-out fraction exclude each other".into(),
            ));
        }
        if let Some(e) = self.epochs {
            if !(e.is_finite() && e > 0.0) {
                return Err(TrainError::Config(format!("epochs {e} must be positive")));
            }
        }
        if self.max_len < 2 {
            return Err(TrainError::Config(format!(
                "max length {} is too short",
                self.max_len
            )));
        }
        // Every knob a NaN, an infinity or a sign would silently turn into something else: a
        // NaN adapter marked finished, gradient ascent, a batch size quietly made 1.
        let positive = |name: &str, v: Option<f64>| match v {
            Some(v) if !(v.is_finite() && v > 0.0) => Err(TrainError::Config(format!(
                "{name} must be a positive finite number, got {v}"
            ))),
            _ => Ok(()),
        };
        let non_negative = |name: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(TrainError::Config(format!(
                    "{name} must be a finite number >= 0, got {v}"
                )))
            }
        };
        positive("learning rate", self.lr)?;
        if let Some(end) = self.lr_end {
            non_negative("final learning rate", end)?;
        }
        non_negative("weight decay", self.weight_decay as f64)?;
        non_negative("max gradient norm", self.max_grad_norm as f64)?;
        for (name, v) in [
            ("batch size", self.batch_size),
            ("gradient accumulation", self.grad_accum),
        ] {
            if v == 0 {
                return Err(TrainError::Config(format!("{name} must be at least 1")));
            }
        }
        if self.steps == Some(0) {
            return Err(TrainError::Config("steps must be at least 1".into()));
        }
        if let TrainMode::Lora(lc) = &self.mode {
            positive("LoRA alpha", Some(lc.alpha))?;
            if !(0.0..1.0).contains(&lc.dropout) {
                return Err(TrainError::Config(format!(
                    "LoRA dropout must be in [0, 1), got {}",
                    lc.dropout
                )));
            }
        }
        Ok(())
    }
}

/// What a training run did (or, when `reused`, what the run that wrote `out` did).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOutcome {
    /// Content hash of the saved weights (the checkpoint's version).
    pub version: String,
    /// The checkpoint folder.
    pub out: PathBuf,
    /// Optimizer steps of the checkpoint.
    pub steps: usize,
    /// Training loss of every step, in step order (from the metrics log when reused or
    /// resumed).
    pub losses: Vec<f64>,
    /// Training tokens per second of the steps run (by the original run when reused).
    pub tokens_per_sec: f64,
    /// Wall seconds of the run, loading and evaluation included (of the original run when
    /// reused).
    pub secs: f64,
    /// Examples trained on (after drops and the held-out split).
    pub examples: usize,
    /// Counts of the data pipeline.
    pub data_stats: DataStats,
    /// Held-out loss per output token before training (none without held-out data or when
    /// resumed).
    pub eval_before: Option<f64>,
    /// Held-out loss per output token after training.
    pub eval_after: Option<f64>,
    /// True when an identical finished job was found in `out` and nothing was trained.
    pub reused: bool,
}

/// What [`super::run_job_with`] reports while it runs.
#[derive(Debug, Clone, PartialEq)]
pub enum TrainEvent {
    /// The held-out loss of the untrained model, over `tokens` output tokens.
    EvalBefore {
        /// Mean cross-entropy per output token.
        loss: f64,
        /// Output tokens evaluated.
        tokens: usize,
    },
    /// One optimizer step done.
    Step(StepMetrics),
    /// An intermediate checkpoint was saved (`save_every`).
    Saved {
        /// The step saved.
        step: usize,
        /// Its version.
        version: String,
    },
    /// The held-out loss of the trained model.
    EvalAfter {
        /// Mean cross-entropy per output token.
        loss: f64,
        /// Output tokens evaluated.
        tokens: usize,
    },
}
