//! Writing a checkpoint folder (weights, tokenizer, `backflow.json`, optimizer state), and
//! finding a finished checkpoint of the same job to reuse instead of training.

use std::path::Path;

use serde_json::{json, Value};

use crate::model::tokenizer::Tokenizer;
use crate::model::{LlamaConfig, TokenizerSource};

use super::checkpoint;
use super::data::DataStats;
use super::fingerprint::canonical;
use super::job::{TrainJob, TrainOutcome};
use super::metrics_log::read_losses;
use super::model::TrainMode;
use super::sft::{TrainBackend, Trainer};
use super::TrainError;

/// The weight file a checkpoint of `mode` holds.
pub(super) fn weights_file(mode: &TrainMode) -> &'static str {
    match mode {
        TrainMode::Full => checkpoint::WEIGHTS,
        TrainMode::Lora(_) => checkpoint::ADAPTER_WEIGHTS,
    }
}

/// What reuse and resume read of a checkpoint's `backflow.json` (written by [`Saver::save`]);
/// every field has a default, so a file of an older version, or one cut short, reads as "not
/// finished" rather than failing.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct CheckpointMeta {
    /// Content hash of the weights.
    pub version: Option<String>,
    /// The fingerprint of the job that wrote it.
    pub job_fingerprint: Option<String>,
    /// Whether the job ran to its end.
    pub finished: bool,
    /// Optimizer steps.
    pub step: usize,
    /// Training tokens per second (finished jobs).
    pub tokens_per_sec: Option<f64>,
    /// Wall seconds of the run (finished jobs).
    pub train_secs: Option<f64>,
    /// Examples trained on.
    pub examples: usize,
    /// The data pipeline's counts.
    pub data_stats: Option<DataStats>,
    /// Held-out losses (finished jobs).
    pub eval: Option<MetaEval>,
}

/// The held-out losses of a finished checkpoint.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct MetaEval {
    /// Loss per output token before training.
    pub loss_before: Option<f64>,
    /// Loss per output token after training.
    pub loss_after: Option<f64>,
}

/// `backflow.json` of `out`, if readable.
pub(super) fn read_meta(out: &Path) -> Option<CheckpointMeta> {
    let text = std::fs::read_to_string(out.join(checkpoint::META)).ok()?;
    serde_json::from_str(&text).ok()
}

/// The outcome recorded in `job.out` when it holds a finished checkpoint of the job
/// fingerprinted `fingerprint` whose weights still hash to its version.
pub(super) fn finished_outcome(
    job: &TrainJob,
    fingerprint: &str,
) -> Result<Option<TrainOutcome>, TrainError> {
    let Some(meta) = read_meta(&job.out) else {
        return Ok(None);
    };
    if meta.job_fingerprint.as_deref() != Some(fingerprint) || !meta.finished {
        return Ok(None);
    }
    let Some(version) = meta.version.as_deref() else {
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
    let Some(data_stats) = meta.data_stats.clone() else {
        return Err(TrainError::Checkpoint(
            "backflow.json of a finished checkpoint has no data_stats".into(),
        ));
    };
    let eval = meta.eval.unwrap_or_default();
    Ok(Some(TrainOutcome {
        version: version.to_string(),
        out: job.out.clone(),
        steps: meta.step,
        losses: read_losses(&job.out)?,
        tokens_per_sec: meta.tokens_per_sec.unwrap_or(f64::NAN),
        secs: meta.train_secs.unwrap_or(f64::NAN),
        examples: meta.examples,
        data_stats,
        eval_before: eval.loss_before,
        eval_after: eval.loss_after,
        reused: true,
    }))
}

/// Everything a checkpoint save needs besides the trainer.
pub(super) struct Saver<'a> {
    pub(super) job: &'a TrainJob,
    pub(super) cfg: &'a LlamaConfig,
    pub(super) tokenizer: &'a Tokenizer,
    pub(super) tok_src: &'a TokenizerSource,
    pub(super) stop_ids: &'a [u32],
    pub(super) stats: &'a DataStats,
    pub(super) fingerprint: &'a str,
    pub(super) examples: usize,
}

impl Saver<'_> {
    /// Writes the checkpoint folder atomically; `extra` (an object) is merged into
    /// `backflow.json`. Returns the version (content hash of the weights).
    pub(super) fn save(
        &self,
        trainer: &Trainer<TrainBackend>,
        extra: Value,
    ) -> Result<String, TrainError> {
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
pub(super) fn json_err(what: &'static str) -> impl FnOnce(serde_json::Error) -> TrainError {
    move |e| TrainError::Checkpoint(format!("{what}: {e}"))
}
