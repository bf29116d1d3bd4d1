//! A training run as a library call: [`run_job`] trains a [`TrainJob`] (base model, tagged data
//! groups, knobs) into a checkpoint folder and reports a [`TrainOutcome`]. `backflow train` is a
//! thin wrapper over it; the Humpback pipeline's training sink calls it directly.
//!
//! Finished work is reused: every checkpoint records a fingerprint of the job that made it
//! (`job_fingerprint` in `backflow.json`: the base model's path and content, every record and
//! its group's tag in order, every knob that changes the weights). When the output folder
//! already holds a finished checkpoint of an identical job, [`run_job`] returns its outcome
//! (`reused: true`) without training, so a pipeline killed after a training step resumes
//! without redoing it.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::backend::Backend;
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::{json, Value};

use crate::model::chat::{ChatTemplate, Role};
use crate::model::device::default_device;
use crate::model::tokenizer::Tokenizer;
use crate::model::{LlamaConfig, TokenizerSource};

use super::checkpoint::{self, Adapter, BaseModel};
use super::data::{self, DataSource, DataStats, Example, Record};
use super::lora::LoraConfig;
use super::model::{TrainLlama, TrainMode};
use super::sft::{
    eval_loss, micro_batches, step_indices, SftConfig, StepMetrics, TrainBackend, Trainer,
};
use super::{io_err, TrainError};

/// Bumped when the fingerprint's inputs or encoding change, so that checkpoints fingerprinted
/// differently are never taken for the same job.
const FINGERPRINT_FORMAT: u32 = 1;

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
    /// Peak learning rate (default: 1e-5 full, as the paper; 2e-4 LoRA).
    pub lr: Option<f64>,
    /// Final learning rate of the linear decay (default: 9e-6 full; lr/10 LoRA).
    pub lr_end: Option<f64>,
    /// AdamW weight decay (paper: 0.1).
    pub weight_decay: f32,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
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
    /// dropout 0.05), default learning rates, weight decay 0.1, batch 8, no accumulation, clip
    /// 1.0, [`DEFAULT_EPOCHS`] epochs, 512 tokens, seed 0, forward model, nothing held out.
    pub fn new(model: PathBuf, data: Vec<DataGroup>, out: PathBuf) -> Self {
        TrainJob {
            model,
            data,
            data_label: String::new(),
            malformed: 0,
            out,
            mode: TrainMode::Lora(LoraConfig::all_projections(8)),
            lr: None,
            lr_end: None,
            weight_decay: 0.1,
            batch_size: 8,
            grad_accum: 1,
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

    /// The job's fingerprint (hex xxh3-128): the base model's canonical path and content, every
    /// record and its group's tag in order, and every knob that changes the trained weights.
    /// Not covered: `out`, `data_label`, `malformed`, `save_every`, `resume` (a resumed run
    /// continues exactly as the uninterrupted one) and `quiet`.
    pub fn fingerprint(&self) -> Result<String, TrainError> {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let sft = self.sft_config();
        let knobs = json!({
            "format": FINGERPRINT_FORMAT,
            "base": canonical(&self.model),
            "mode": match &self.mode {
                TrainMode::Full => Value::from("full"),
                TrainMode::Lora(lc) => serde_json::to_value(lc).map_err(json_err("LoRA config"))?,
            },
            "sft": sft,
            "steps": self.steps,
            "epochs": self.steps.is_none().then(|| self.epochs.unwrap_or(DEFAULT_EPOCHS)),
            "max_len": self.max_len,
            "backward": self.backward,
            "eval_frac": self.eval_frac,
            "group_by_length": self.group_by_length,
        });
        put(&mut h, knobs.to_string().as_bytes());
        hash_base(&mut h, &self.model)?;
        // The held-out data does not change the weights, but it changes the recorded losses.
        for groups in [&self.data, &self.eval_data] {
            put(&mut h, &(groups.len() as u64).to_le_bytes());
            for g in groups {
                put(&mut h, source_name(g.source).as_bytes());
                put(&mut h, &(g.records.len() as u64).to_le_bytes());
                for r in &g.records {
                    hash_record(&mut h, r);
                }
            }
        }
        Ok(format!("{:032x}", h.digest128()))
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

/// What [`run_job_with`] reports while it runs.
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

/// Trains `job` (or reuses its finished checkpoint in `job.out`), logging the held-out losses.
pub fn run_job(job: &TrainJob) -> Result<TrainOutcome, TrainError> {
    run_job_with(job, &mut |e| match e {
        TrainEvent::EvalBefore { loss, tokens } => {
            log::info!("held-out loss before training: {loss:.4} ({tokens} output tokens)")
        }
        TrainEvent::EvalAfter { loss, tokens } => {
            log::info!("held-out loss after training:  {loss:.4} ({tokens} output tokens)")
        }
        _ => {}
    })
}

/// [`run_job`], reporting held-out losses, steps and saves to `on_event` (which does its own
/// logging). Per-step log lines (`quiet`) and the progress bar are shown either way.
pub fn run_job_with(
    job: &TrainJob,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<TrainOutcome, TrainError> {
    let t0 = Instant::now();
    job.validate()?;
    let fingerprint = job.fingerprint()?;
    if let Some(done) = finished_outcome(job, &fingerprint)? {
        log::info!(
            "{}: finished checkpoint of this job (version {}), not retrained",
            job.out.display(),
            done.version
        );
        return Ok(done);
    }
    let resume_state = job.out.join(checkpoint::TRAINER_STATE);
    if job.resume {
        if !resume_state.exists() {
            return Err(TrainError::Config(format!(
                "resume: no {} in {}",
                checkpoint::TRAINER_STATE,
                job.out.display()
            )));
        }
        // Resuming another job's checkpoint would silently mix two trainings.
        if let Some(fp) = read_meta(&job.out)
            .as_ref()
            .and_then(|m| m["job_fingerprint"].as_str())
        {
            if fp != fingerprint {
                return Err(TrainError::Config(format!(
                    "resume: the checkpoint in {} was written by a different job (data, base or knobs changed)",
                    job.out.display()
                )));
            }
        }
    }
    let device = default_device();
    TrainBackend::seed(&device, job.seed);
    let full = matches!(job.mode, TrainMode::Full);

    // A full-finetuning resume continues from the saved weights; LoRA re-reads the base.
    let weights_path = if job.resume && full {
        job.out.clone()
    } else {
        job.model.clone()
    };
    let mut base = BaseModel::open(&weights_path)?;
    let cfg = base.config().clone();
    let (tok_src, stop_ids) = base.tokenizer();
    let tokenizer = tok_src.load()?;
    let template = ChatTemplate::for_tokenizer(&tokenizer)?;

    // Data.
    let mut stats = DataStats {
        malformed: job.malformed,
        ..DataStats::default()
    };
    let max_len = job.max_len.min(cfg.max_seq_len);
    let mut examples = encode_groups(
        &job.data,
        &template,
        &tokenizer,
        job.backward,
        max_len,
        &mut stats,
    );
    if examples.is_empty() {
        return Err(TrainError::Data(format!("no usable examples: {stats:?}")));
    }
    let mut held_out: Vec<Example> = Vec::new();
    if !job.eval_data.is_empty() {
        let mut eval_stats = DataStats::default();
        held_out = encode_groups(
            &job.eval_data,
            &template,
            &tokenizer,
            job.backward,
            max_len,
            &mut eval_stats,
        );
        log::info!(
            "held-out data: {} records, {} kept, {} truncated to {max_len}, {} dropped (prompt too long), {} empty",
            eval_stats.records, eval_stats.kept, eval_stats.truncated, eval_stats.prompt_too_long, eval_stats.empty
        );
        if held_out.is_empty() {
            return Err(TrainError::Data(format!(
                "no usable held-out examples: {eval_stats:?}"
            )));
        }
    } else if job.eval_frac > 0.0 {
        if examples.len() < 2 {
            return Err(TrainError::Config(format!(
                "cannot hold out a fraction of {} example(s)",
                examples.len()
            )));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(job.seed ^ 0x5EED);
        examples.shuffle(&mut rng);
        let n =
            ((examples.len() as f64 * job.eval_frac).round() as usize).clamp(1, examples.len() - 1);
        held_out = examples.split_off(examples.len() - n);
    }
    log::info!(
        "data: {} records, {} kept ({} train, {} held out), {} truncated to {max_len}, {} dropped (prompt too long), {} empty, {} malformed",
        stats.records, stats.kept, examples.len(), held_out.len(), stats.truncated, stats.prompt_too_long, stats.empty, stats.malformed
    );

    let mut sft = job.sft_config();
    sft.steps = job.steps_for(&sft, examples.len());

    let mut model: TrainLlama<TrainBackend> =
        base.with_source(|src| TrainLlama::load(cfg.clone(), src, &job.mode, &device))?;
    let mut start_step = 0;
    let mut losses = Vec::new();
    let opt_state = if job.resume {
        let text = std::fs::read_to_string(&resume_state).map_err(io_err(&resume_state))?;
        let st: Value = serde_json::from_str(&text).map_err(json_err("trainer state"))?;
        start_step = st["step"]
            .as_u64()
            .ok_or_else(|| TrainError::Checkpoint(format!("{}: no step", resume_state.display())))?
            as usize;
        if !full {
            Adapter::read(&job.out)?.attach(&mut model, &device)?;
        }
        // Steps logged after the checkpoint was saved are run again: drop their lines.
        losses = truncate_metrics(&job.out, start_step)?;
        let p = job.out.join(checkpoint::OPTIMIZER);
        Some(std::fs::read(&p).map_err(io_err(&p))?)
    } else {
        // A fresh run starts a fresh metrics log.
        let m = job.out.join(checkpoint::METRICS);
        if m.exists() {
            std::fs::remove_file(&m).map_err(io_err(&m))?;
        }
        None
    };
    let pad = tokenizer.pad_id().or(tokenizer.eos_id()).unwrap_or(0);
    let mut trainer = Trainer::new(model, sft.clone(), device);
    if let Some(state) = opt_state {
        trainer.restore(&state, start_step)?;
    }
    log::info!(
        "{} on {} ({} layers), {:?}; {} steps x {} examples, lr {:.2e} -> {:.2e}; loaded in {:.1}s",
        job.model.display(),
        crate::model::device::backend_name(),
        cfg.n_layers,
        job.mode,
        sft.steps,
        sft.effective_batch(),
        sft.lr,
        sft.lr_end,
        t0.elapsed().as_secs_f64()
    );

    let eval = |t: &Trainer<TrainBackend>| -> Option<(f64, usize)> {
        (!held_out.is_empty()).then(|| {
            eval_loss(
                &t.valid(),
                &held_out,
                sft.batch_size,
                pad,
                &default_device(),
            )
        })
    };
    let eval_before = if start_step == 0 {
        eval(&trainer)
    } else {
        None
    };
    if let Some((loss, tokens)) = eval_before {
        on_event(&TrainEvent::EvalBefore { loss, tokens });
    }

    let bar = if job.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(sft.steps as u64)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .map_err(|e| TrainError::Config(format!("progress bar: {e}")))?,
    );
    bar.set_position(start_step as u64);
    let saver = Saver {
        job,
        cfg: &cfg,
        tokenizer: &tokenizer,
        tok_src: &tok_src,
        stop_ids: &stop_ids,
        stats: &stats,
        fingerprint: &fingerprint,
        examples: examples.len(),
    };
    let (mut tok_total, mut secs_total) = (0usize, 0f64);
    let lengths: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
    while trainer.step < sft.steps {
        let idx = step_indices(
            examples.len(),
            job.group_by_length.then_some(&lengths[..]),
            trainer.step,
            sft.effective_batch(),
            sft.seed,
        );
        let micro = micro_batches(&examples, &idx, sft.batch_size, pad);
        let m = trainer.train_step(&micro);
        if !(m.loss.is_finite() && m.grad_norm.is_finite()) {
            // Nothing of this step is logged or saved: the last save stays the checkpoint,
            // unfinished, and the same command with a smaller --lr can resume from it.
            return Err(TrainError::Diverged {
                step: m.step,
                loss: m.loss,
                grad_norm: m.grad_norm,
            });
        }
        tok_total += m.tokens;
        secs_total += m.secs;
        losses.push(m.loss);
        bar.set_message(format!(
            "loss {:.4} lr {:.2e} {:.0} tok/s",
            m.loss,
            m.lr,
            tok_total as f64 / secs_total.max(1e-9)
        ));
        bar.inc(1);
        append_metrics(&job.out, &m)?;
        if job.quiet {
            log::info!(
                "step {} loss {:.4} grad_norm {:.3} {:.0} tok/s, {:.0}% padding",
                m.step,
                m.loss,
                m.grad_norm,
                m.tokens as f64 / m.secs.max(1e-9),
                100.0 * (1.0 - m.tokens as f64 / m.padded_tokens.max(1) as f64)
            );
        }
        on_event(&TrainEvent::Step(m));
        if job.save_every > 0
            && trainer.step.is_multiple_of(job.save_every)
            && trainer.step < sft.steps
        {
            let version = saver.save(&trainer, json!({"finished": false}))?;
            on_event(&TrainEvent::Saved {
                step: trainer.step,
                version,
            });
        }
    }
    bar.finish();
    let eval_after = eval(&trainer);
    if let Some((loss, tokens)) = eval_after {
        on_event(&TrainEvent::EvalAfter { loss, tokens });
    }
    let tokens_per_sec = tok_total as f64 / secs_total.max(1e-9);
    let secs = t0.elapsed().as_secs_f64();
    let version = saver.save(
        &trainer,
        json!({
            "finished": true,
            "train_secs": secs,
            "tokens_per_sec": tokens_per_sec,
            "eval": {
                "held_out_examples": held_out.len(),
                "loss_before": eval_before.map(|e| e.0),
                "loss_after": eval_after.map(|e| e.0),
                "output_tokens": eval_after.map(|e| e.1),
            },
        }),
    )?;
    Ok(TrainOutcome {
        version,
        out: job.out.clone(),
        steps: trainer.step,
        losses,
        tokens_per_sec,
        secs,
        examples: examples.len(),
        data_stats: stats,
        eval_before: eval_before.map(|e| e.0),
        eval_after: eval_after.map(|e| e.0),
        reused: false,
    })
}

/// Encodes every group with its own tag, in order, into one list of examples; counts records,
/// drops and truncations in `stats`.
pub fn encode_groups(
    groups: &[DataGroup],
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    backward: bool,
    max_len: usize,
    stats: &mut DataStats,
) -> Vec<Example> {
    let mut out = Vec::new();
    for g in groups {
        stats.records += g.records.len();
        out.extend(data::encode_all(
            &g.records, template, tokenizer, g.source, backward, max_len, stats,
        ));
    }
    out
}

/// The weight file a checkpoint of `mode` holds.
fn weights_file(mode: &TrainMode) -> &'static str {
    match mode {
        TrainMode::Full => checkpoint::WEIGHTS,
        TrainMode::Lora(_) => checkpoint::ADAPTER_WEIGHTS,
    }
}

/// `backflow.json` of `out`, if readable.
fn read_meta(out: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(out.join(checkpoint::META)).ok()?;
    serde_json::from_str(&text).ok()
}

/// The outcome recorded in `job.out` when it holds a finished checkpoint of the job
/// fingerprinted `fingerprint` whose weights still hash to its version.
fn finished_outcome(job: &TrainJob, fingerprint: &str) -> Result<Option<TrainOutcome>, TrainError> {
    let Some(meta) = read_meta(&job.out) else {
        return Ok(None);
    };
    if meta["job_fingerprint"].as_str() != Some(fingerprint) || meta["finished"] != json!(true) {
        return Ok(None);
    }
    let Some(version) = meta["version"].as_str() else {
        return Ok(None);
    };
    let wp = job.out.join(weights_file(&job.mode));
    let Ok(bytes) = std::fs::read(&wp) else {
        return Ok(None);
    };
    // The weights are what is reused: a damaged or replaced file means training again.
    if checkpoint::content_hash(&bytes) != version {
        log::warn!(
            "{}: weights do not match version {version}; retraining",
            wp.display()
        );
        return Ok(None);
    }
    let data_stats: DataStats = serde_json::from_value(meta["data_stats"].clone())
        .map_err(json_err("backflow.json data_stats"))?;
    Ok(Some(TrainOutcome {
        version: version.to_string(),
        out: job.out.clone(),
        steps: meta["step"].as_u64().unwrap_or(0) as usize,
        losses: read_losses(&job.out)?,
        tokens_per_sec: meta["tokens_per_sec"].as_f64().unwrap_or(f64::NAN),
        secs: meta["train_secs"].as_f64().unwrap_or(f64::NAN),
        examples: meta["examples"].as_u64().unwrap_or(0) as usize,
        data_stats,
        eval_before: meta["eval"]["loss_before"].as_f64(),
        eval_after: meta["eval"]["loss_after"].as_f64(),
        reused: true,
    }))
}

/// The `(step, line)` of every well-formed line of the metrics log of `out`, in file order.
fn metrics_lines(out: &Path) -> Result<Vec<(usize, f64, String)>, TrainError> {
    let p = out.join(checkpoint::METRICS);
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(&p)(e)),
    };
    Ok(text
        .lines()
        .filter_map(|l| {
            let v: Value = serde_json::from_str(l).ok()?;
            Some((
                v["step"].as_u64()? as usize,
                v["loss"].as_f64()?,
                l.to_string(),
            ))
        })
        .collect())
}

/// Per-step losses from the metrics log of `out`, in step order; a step logged twice (run
/// again after a resume) counts with its last line.
pub fn read_losses(out: &Path) -> Result<Vec<f64>, TrainError> {
    let by_step: std::collections::BTreeMap<usize, f64> = metrics_lines(out)?
        .into_iter()
        .map(|(s, l, _)| (s, l))
        .collect();
    Ok(by_step.into_values().collect())
}

/// Keeps only the metrics lines of steps `<= step` (rewritten atomically); returns their losses.
fn truncate_metrics(out: &Path, step: usize) -> Result<Vec<f64>, TrainError> {
    let keep: Vec<(usize, f64, String)> = metrics_lines(out)?
        .into_iter()
        .filter(|(s, _, _)| *s <= step)
        .collect();
    let p = out.join(checkpoint::METRICS);
    let tmp = out.join(format!(".{}.tmp", checkpoint::METRICS));
    let mut text = String::new();
    for (_, _, l) in &keep {
        text.push_str(l);
        text.push('\n');
    }
    std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &p).map_err(io_err(&p))?;
    let by_step: std::collections::BTreeMap<usize, f64> =
        keep.into_iter().map(|(s, l, _)| (s, l)).collect();
    Ok(by_step.into_values().collect())
}

/// Appends one step's metrics to the log in `out`.
fn append_metrics(out: &Path, m: &StepMetrics) -> Result<(), TrainError> {
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let p = out.join(checkpoint::METRICS);
    let line = serde_json::to_string(m).map_err(json_err("step metrics"))?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p)
        .map_err(io_err(&p))?;
    writeln!(f, "{line}").map_err(io_err(&p))
}

/// Everything a checkpoint save needs besides the trainer.
struct Saver<'a> {
    job: &'a TrainJob,
    cfg: &'a LlamaConfig,
    tokenizer: &'a Tokenizer,
    tok_src: &'a TokenizerSource,
    stop_ids: &'a [u32],
    stats: &'a DataStats,
    fingerprint: &'a str,
    examples: usize,
}

impl Saver<'_> {
    /// Writes the checkpoint folder atomically; `extra` (an object) is merged into
    /// `backflow.json`. Returns the version (content hash of the weights).
    fn save(&self, trainer: &Trainer<TrainBackend>, extra: Value) -> Result<String, TrainError> {
        let job = self.job;
        let model = trainer.valid();
        let mut files: Vec<(String, Vec<u8>)> = checkpoint::tokenizer_files(self.tok_src)?;
        let base = canonical(&job.model);
        let (kind, weights) = match &job.mode {
            TrainMode::Full => {
                let bytes = checkpoint::safetensors_bytes(&checkpoint::export_weights(&model)?)?;
                files.push(checkpoint::hf_config_file(
                    self.cfg,
                    self.tokenizer,
                    self.stop_ids,
                )?);
                ("full", (checkpoint::WEIGHTS, bytes))
            }
            TrainMode::Lora(lc) => {
                let bytes = checkpoint::safetensors_bytes(&checkpoint::export_adapter(&model)?)?;
                files.push((
                    checkpoint::ADAPTER_CONFIG.into(),
                    serde_json::to_vec_pretty(&checkpoint::adapter_config(lc, &base))
                        .map_err(json_err("adapter_config.json"))?,
                ));
                ("lora", (checkpoint::ADAPTER_WEIGHTS, bytes))
            }
        };
        let version = checkpoint::content_hash(&weights.1);
        files.push((weights.0.into(), weights.1));
        // One source for single-group data, as before groups existed; `groups` has them all.
        let source = match job.data.as_slice() {
            [first, rest @ ..] if rest.iter().all(|g| g.source == first.source) => {
                json!(first.source)
            }
            _ => Value::Null,
        };
        let groups: Vec<Value> = job
            .data
            .iter()
            .map(|g| json!({"source": g.source, "records": g.records.len()}))
            .collect();
        let mut meta = json!({
            "version": version,
            "kind": kind,
            "base_model": base,
            "step": trainer.step,
            "sft": trainer.cfg,
            "lora": match &job.mode {
                TrainMode::Lora(lc) => serde_json::to_value(lc).map_err(json_err("LoRA config"))?,
                TrainMode::Full => Value::Null,
            },
            "backward": job.backward,
            "source": source,
            "groups": groups,
            "data": job.data_label,
            "data_stats": self.stats,
            "examples": self.examples,
            "max_len": job.max_len,
            "eval": Value::Null,
            "job_fingerprint": self.fingerprint,
        });
        if let (Some(m), Value::Object(extra)) = (meta.as_object_mut(), extra) {
            m.extend(extra);
        }
        files.push((
            checkpoint::META.into(),
            serde_json::to_vec_pretty(&meta).map_err(json_err("backflow.json"))?,
        ));
        files.push((
            checkpoint::TRAINER_STATE.into(),
            serde_json::to_vec_pretty(&json!({"step": trainer.step}))
                .map_err(json_err("trainer state"))?,
        ));
        files.push((checkpoint::OPTIMIZER.into(), trainer.optimizer_state()?));
        checkpoint::write_folder_atomic(&job.out, &files, &[checkpoint::METRICS])?;
        Ok(version)
    }
}

/// A `serde_json` error as a checkpoint error about `what`.
fn json_err(what: &'static str) -> impl FnOnce(serde_json::Error) -> TrainError {
    move |e| TrainError::Checkpoint(format!("{what}: {e}"))
}

/// The absolute path of `p` when it exists, else `p`.
fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// A tag name that does not depend on `Debug` formatting.
fn source_name(s: DataSource) -> &'static str {
    match s {
        DataSource::Seed => "seed",
        DataSource::Augmented => "augmented",
        DataSource::Untagged => "untagged",
    }
}

/// Feeds `bytes` length-prefixed, so that consecutive fields cannot run into each other.
fn put(h: &mut xxhash_rust::xxh3::Xxh3, bytes: &[u8]) {
    h.update(&(bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

fn hash_record(h: &mut xxhash_rust::xxh3::Xxh3, r: &Record) {
    match r {
        Record::Pair {
            instruction,
            output,
        } => {
            put(h, b"pair");
            put(h, instruction.as_bytes());
            put(h, output.as_bytes());
        }
        Record::Chat(messages) => {
            put(h, b"chat");
            put(h, &(messages.len() as u64).to_le_bytes());
            for m in messages {
                put(
                    h,
                    match m.role {
                        Role::System => b"system",
                        Role::User => b"user",
                        Role::Assistant => b"assistant",
                    },
                );
                put(h, m.content.as_bytes());
            }
        }
    }
}

/// Checkpoint bookkeeping that does not change a folder's weights (a base may be an earlier
/// checkpoint, whose metrics and optimizer state are irrelevant to a fresh training from it).
const NOT_WEIGHTS: [&str; 4] = [
    checkpoint::METRICS,
    checkpoint::TRAINER_STATE,
    checkpoint::OPTIMIZER,
    checkpoint::META,
];

/// Hashes the content of the base model: the file, or every regular file of the folder (by
/// name order) except checkpoint bookkeeping. Content, not size and mtime, so that a copied or
/// re-downloaded base is recognised and a replaced one is not.
fn hash_base(h: &mut xxhash_rust::xxh3::Xxh3, path: &Path) -> Result<(), TrainError> {
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    if !meta.is_dir() {
        return hash_file(h, path);
    }
    let mut names: Vec<(String, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(path).map_err(io_err(path))? {
        let entry = entry.map_err(io_err(path))?;
        let name = entry.file_name().to_string_lossy().to_string();
        let p = entry.path();
        if name.starts_with('.') || NOT_WEIGHTS.contains(&name.as_str()) || !p.is_file() {
            continue;
        }
        names.push((name, p));
    }
    names.sort();
    for (name, p) in names {
        put(h, name.as_bytes());
        hash_file(h, &p)?;
    }
    Ok(())
}

/// Streams a file into the hash, length-prefixed.
fn hash_file(h: &mut xxhash_rust::xxh3::Xxh3, path: &Path) -> Result<(), TrainError> {
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        len += n as u64;
    }
    h.update(&len.to_le_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::data::{AUGMENTED_TAG, SEED_TAG};
    use crate::train::tiny_base;
    use std::os::unix::fs::MetadataExt;

    fn pair(i: &str, o: &str) -> Record {
        Record::Pair {
            instruction: i.into(),
            output: o.into(),
        }
    }

    /// Seed pairs (S_a) then web pairs (S_w), four each.
    fn groups() -> Vec<DataGroup> {
        vec![
            DataGroup {
                source: DataSource::Seed,
                records: vec![
                    pair("what is a cat?", "a small animal."),
                    pair("name a color.", "blue."),
                    pair("what is ice?", "frozen water."),
                    pair("say hi.", "hi there."),
                ],
            },
            DataGroup {
                source: DataSource::Augmented,
                records: vec![
                    pair("what is rain?", "water that falls from clouds."),
                    pair("what is a tree?", "a tall plant with a trunk."),
                    pair("what is salt?", "a mineral, sodium chloride."),
                    pair("what is sand?", "small grains of rock."),
                ],
            },
        ]
    }

    fn job(base: &Path, out: &Path) -> TrainJob {
        TrainJob {
            mode: TrainMode::Lora(LoraConfig::all_projections(4)),
            lr: Some(1e-2),
            batch_size: 2,
            steps: Some(3),
            max_len: 256,
            seed: 5,
            eval_frac: 0.25,
            data_label: "test groups".into(),
            ..TrainJob::new(base.to_path_buf(), groups(), out.to_path_buf())
        }
    }

    /// (inode, mtime ns, bytes) of a file: an atomic rewrite changes the inode even when the
    /// content comes out the same.
    fn file_id(p: &Path) -> (u64, i64, i64, Vec<u8>) {
        let m = std::fs::metadata(p).expect("metadata");
        (
            m.ino(),
            m.mtime(),
            m.mtime_nsec(),
            std::fs::read(p).expect("read"),
        )
    }

    fn meta(out: &Path) -> Value {
        read_meta(out).expect("backflow.json")
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * a.abs().max(b.abs())
    }

    #[test]
    fn groups_are_encoded_in_order_with_their_own_tags() {
        let root = tempfile::tempdir().expect("tmp");
        let base = root.path().join("base");
        tiny_base(&base);
        let tok = Tokenizer::from_tokenizer_json(base.join("tokenizer.json")).expect("tokenizer");
        let template = ChatTemplate::for_tokenizer(&tok).expect("chatml");
        let mut stats = DataStats::default();
        let ex = encode_groups(&groups(), &template, &tok, false, 256, &mut stats);
        assert_eq!((stats.records, stats.kept, ex.len()), (8, 8, 8));
        let text: Vec<String> = ex.iter().map(|e| tok.decode(&e.ids)).collect();
        for (i, t) in text.iter().enumerate() {
            let (want, other) = if i < 4 {
                (SEED_TAG, AUGMENTED_TAG)
            } else {
                (AUGMENTED_TAG, SEED_TAG)
            };
            assert!(t.contains(want) && !t.contains(other), "example {i}: {t:?}");
        }
        // In the order given: the first seed record, then the first web record at 4.
        assert!(text[0].contains("what is a cat?") && text[0].contains("a small animal."));
        assert!(text[4].contains("water that falls from clouds."));
        // The backward model gets no tag, whatever the group.
        let mut st = DataStats::default();
        let bwd = encode_groups(&groups(), &template, &tok, true, 256, &mut st);
        let t = tok.decode(&bwd[5].ids);
        assert!(!t.contains(AUGMENTED_TAG) && t.contains("a tall plant with a trunk."));
    }

    #[test]
    fn fingerprint_covers_base_data_tags_and_knobs_not_output_settings() {
        let root = tempfile::tempdir().expect("tmp");
        let base = root.path().join("base.gguf");
        std::fs::write(&base, b"not really a model").expect("write");
        let j = job(&base, &root.path().join("out"));
        let fp = j.fingerprint().expect("fingerprint");
        assert_eq!(fp.len(), 32);
        let same = |f: &dyn Fn(&mut TrainJob)| {
            let mut k = j.clone();
            f(&mut k);
            k.fingerprint().expect("fingerprint")
        };
        // Where and how the result is written does not change it.
        assert_eq!(same(&|k| k.out = PathBuf::from("/elsewhere")), fp);
        assert_eq!(same(&|k| k.quiet = !k.quiet), fp);
        assert_eq!(same(&|k| k.save_every = 7), fp);
        assert_eq!(same(&|k| k.resume = true), fp);
        assert_eq!(same(&|k| k.data_label = "other".into()), fp);
        // `epochs` is moot when `steps` is given.
        assert_eq!(same(&|k| k.epochs = Some(5.0)), fp);
        // Everything that changes the weights does.
        type Change<'a> = (&'a str, Box<dyn Fn(&mut TrainJob)>);
        let changes: Vec<Change> = vec![
            (
                "record text",
                Box::new(|k| k.data[1].records[2] = pair("what is salt?", "a rock.")),
            ),
            (
                "group tag",
                Box::new(|k| k.data[1].source = DataSource::Seed),
            ),
            ("record order", Box::new(|k| k.data[0].records.swap(0, 1))),
            (
                "group split",
                Box::new(|k| {
                    let r = k.data[1].records.remove(0);
                    k.data[0].records.push(r);
                }),
            ),
            ("lr", Box::new(|k| k.lr = Some(2e-2))),
            ("steps", Box::new(|k| k.steps = Some(4))),
            (
                "epochs",
                Box::new(|k| {
                    k.steps = None;
                    k.epochs = Some(2.0)
                }),
            ),
            ("seed", Box::new(|k| k.seed = 6)),
            ("max_len", Box::new(|k| k.max_len = 128)),
            ("backward", Box::new(|k| k.backward = true)),
            ("eval_frac", Box::new(|k| k.eval_frac = 0.5)),
            (
                "eval data",
                Box::new(|k| {
                    k.eval_frac = 0.0;
                    k.eval_data = vec![DataGroup {
                        source: DataSource::Seed,
                        records: vec![pair("what is ice?", "frozen water.")],
                    }];
                }),
            ),
            ("mode", Box::new(|k| k.mode = TrainMode::Full)),
            (
                "lora rank",
                Box::new(|k| k.mode = TrainMode::Lora(LoraConfig::all_projections(8))),
            ),
            ("batch", Box::new(|k| k.batch_size = 4)),
            (
                "group by length",
                Box::new(|k| k.group_by_length = !k.group_by_length),
            ),
        ];
        for (what, f) in changes {
            assert_ne!(same(&*f), fp, "{what} did not change the fingerprint");
        }
        // The base's content, at the same path.
        std::fs::write(&base, b"not really a model!").expect("write");
        assert_ne!(j.fingerprint().expect("fingerprint"), fp, "base content");
    }

    #[test]
    fn held_out_data_is_evaluated_and_never_trained_on() {
        let root = tempfile::tempdir().expect("tmp");
        let base = root.path().join("base");
        tiny_base(&base);
        let held = vec![DataGroup {
            source: DataSource::Seed,
            records: vec![
                pair("what is fog?", "a cloud near the ground."),
                pair("what is steam?", "hot water vapour."),
            ],
        }];
        let with_data = |data: Vec<DataGroup>, out: &str| TrainJob {
            eval_frac: 0.0,
            eval_data: held.clone(),
            data,
            ..job(&base, &root.path().join(out))
        };
        let a = run_job(&with_data(groups(), "a")).expect("train a");
        assert_eq!(a.examples, 8, "every training record is trained on");
        let (before, after) = (a.eval_before.expect("before"), a.eval_after.expect("after"));
        assert!(before.is_finite() && after.is_finite());
        assert_ne!(before, after, "training moved the held-out loss");
        // Before training the model is the base (LoRA's B starts at zero): the held-out loss
        // cannot depend on the training data.
        let b = run_job(&with_data(groups()[1..].to_vec(), "b")).expect("train b");
        assert_eq!(b.examples, 4);
        assert!(close(b.eval_before.expect("before"), before));
        // Both ways of holding out at once are refused.
        let both = TrainJob {
            eval_frac: 0.25,
            ..with_data(groups(), "c")
        };
        assert!(matches!(run_job(&both), Err(TrainError::Config(_))));
    }

    #[test]
    fn identical_finished_job_is_reused_and_a_changed_one_retrains() {
        let root = tempfile::tempdir().expect("tmp");
        let base = root.path().join("base");
        tiny_base(&base);
        let out = root.path().join("out");
        let j = job(&base, &out);
        let first = run_job(&j).expect("train");
        assert!(!first.reused);
        assert_eq!(first.steps, 3);
        assert_eq!(first.examples, 6, "8 examples, 2 held out");
        assert_eq!(first.losses.len(), 3);
        assert!(first.losses.iter().all(|l| l.is_finite() && *l > 0.0));
        assert!(first.eval_before.is_some() && first.eval_after.is_some());
        let weights = out.join(checkpoint::ADAPTER_WEIGHTS);
        let before = file_id(&weights);
        assert_eq!(checkpoint::content_hash(&before.3), first.version);
        assert_eq!(
            meta(&out)["job_fingerprint"].as_str(),
            Some(j.fingerprint().expect("fp").as_str())
        );
        assert_eq!(meta(&out)["groups"][1]["source"], json!("Augmented"));

        // The same job again: nothing is trained or written.
        let again = run_job(&j).expect("reuse");
        assert!(again.reused);
        assert_eq!(file_id(&weights), before, "weights were rewritten");
        assert_eq!(again.version, first.version);
        assert_eq!((again.steps, again.examples), (first.steps, first.examples));
        assert_eq!(again.data_stats, first.data_stats);
        assert_eq!(again.losses.len(), 3);
        for (a, b) in again.losses.iter().zip(&first.losses) {
            assert!(close(*a, *b), "{:?} vs {:?}", again.losses, first.losses);
        }
        let (eb, ea) = (
            again.eval_before.expect("before"),
            again.eval_after.expect("after"),
        );
        assert!(close(eb, first.eval_before.unwrap_or(f64::NAN)));
        assert!(close(ea, first.eval_after.unwrap_or(f64::NAN)));
        // Output-only settings are not part of the job.
        let mut louder = j.clone();
        louder.save_every = 1;
        assert!(run_job(&louder).expect("reuse").reused);
        assert_eq!(file_id(&weights), before);

        // One changed record: trained again, under a new fingerprint.
        let mut edited = j.clone();
        edited.data[0].records[1] = pair("name a color.", "red.");
        let third = run_job(&edited).expect("retrain");
        assert!(!third.reused);
        assert_ne!(file_id(&weights).0, before.0, "weights not rewritten");
        assert_eq!(
            meta(&out)["job_fingerprint"].as_str(),
            Some(edited.fingerprint().expect("fp").as_str())
        );
        // One changed knob: trained again.
        let mut faster = edited.clone();
        faster.lr = Some(3e-2);
        let fourth = run_job(&faster).expect("retrain");
        assert!(!fourth.reused);
        // Resuming someone else's checkpoint is refused.
        let mut other = faster.clone();
        other.seed = 99;
        other.resume = true;
        match run_job(&other) {
            Err(TrainError::Config(m)) => assert!(m.contains("different job"), "{m}"),
            r => panic!("resume of another job's checkpoint: {r:?}"),
        }
        // Damaged weights are not reused.
        std::fs::write(&weights, b"garbage").expect("damage");
        let fifth = run_job(&faster).expect("retrain");
        assert!(!fifth.reused);
        assert_eq!(
            checkpoint::content_hash(&std::fs::read(&weights).expect("read")),
            fifth.version
        );
    }

    /// Copies the files of folder `from` into a new folder `to`.
    fn copy_folder(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("mkdir");
        for e in std::fs::read_dir(from).expect("read_dir") {
            let p = e.expect("entry").path();
            std::fs::copy(&p, to.join(p.file_name().expect("name"))).expect("copy");
        }
    }

    #[test]
    fn a_run_killed_after_a_save_resumes_to_the_same_losses() {
        let root = tempfile::tempdir().expect("tmp");
        let base = root.path().join("base");
        tiny_base(&base);
        let out = root.path().join("out");
        let killed = root.path().join("killed");
        let mut j = job(&base, &out);
        j.steps = Some(4);
        j.save_every = 2;
        // Snapshot `out` as a kill after step 3 leaves it: the step-2 checkpoint, and a metrics
        // log that already has step 3.
        let mut saved_at = Vec::new();
        let whole = run_job_with(&j, &mut |e| match e {
            TrainEvent::Saved { step, .. } => saved_at.push(*step),
            TrainEvent::Step(m) if m.step == 3 => copy_folder(&out, &killed),
            _ => {}
        })
        .expect("train");
        assert_eq!(saved_at, [2]);
        assert_eq!(meta(&killed)["finished"], json!(false));
        assert_eq!(metrics_lines(&killed).expect("metrics").len(), 3);

        let mut resumed_job = j.clone();
        resumed_job.out = killed.clone();
        resumed_job.resume = true;
        let resumed = run_job(&resumed_job).expect("resume");
        assert!(!resumed.reused);
        assert_eq!(resumed.steps, 4);
        assert!(resumed.eval_before.is_none(), "no 'before' loss mid-run");
        assert_eq!(resumed.losses.len(), 4, "{:?}", resumed.losses);
        for (a, b) in resumed.losses.iter().zip(&whole.losses) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs(),
                "{:?} vs {:?}",
                resumed.losses,
                whole.losses
            );
        }
        // Step 3 is logged once, by the resumed run.
        let steps: Vec<usize> = metrics_lines(&killed)
            .expect("metrics")
            .iter()
            .map(|l| l.0)
            .collect();
        assert_eq!(steps, [1, 2, 3, 4]);
        assert_eq!(meta(&killed)["finished"], json!(true));
        // And now it is a finished checkpoint of the job: reused.
        assert!(run_job(&resumed_job).expect("reuse").reused);
    }
}
