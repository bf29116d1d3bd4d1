//! Writing a checkpoint folder (weights, tokenizer, `backflow.json`, optimizer state), and
//! finding a finished checkpoint of the same job to reuse instead of training.

use std::path::Path;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::model::tokenizer::Tokenizer;
use crate::model::{LlamaConfig, TokenizerSource};

use super::checkpoint;
use super::data::{DataSource, DataStats};
use super::fingerprint::canonical;
use super::job::{TrainJob, TrainOutcome};
use super::lora::LoraConfig;
use super::metrics_log::read_losses;
use super::model::TrainMode;
use super::sft::{SftConfig, TrainBackend, Trainer};
use super::TrainError;

/// The weight file a checkpoint of `mode` holds.
pub(super) fn weights_file(mode: &TrainMode) -> &'static str {
    match mode {
        TrainMode::Full => checkpoint::WEIGHTS,
        TrainMode::Lora(_) => checkpoint::ADAPTER_WEIGHTS,
    }
}

/// A checkpoint's `backflow.json`: what it is (kind, base, version), how it was trained
/// (hyper-parameters, data, job fingerprint) and how it went (steps, speed, held-out losses).
/// Written by `Saver::save` (and by `export` with `kind = "export"`); read by reuse, resume and
/// the loop. Every field has a default and the nested records read leniently (one that no longer
/// parses reads as absent), so a file of an older version, or one cut short, reads as "not
/// finished" rather than failing.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct CheckpointMeta {
    /// Content hash of the weights.
    pub version: Option<String>,
    /// `full`, `lora` or `export`.
    pub kind: String,
    /// The base model (canonical path); for an adapter, what it applies to.
    pub base_model: Option<PathBuf>,
    /// Optimizer steps.
    pub step: usize,
    /// The optimisation hyper-parameters.
    #[serde(deserialize_with = "lenient")]
    pub sft: Option<SftConfig>,
    /// LoRA's hyper-parameters (`None`: full finetuning).
    #[serde(deserialize_with = "lenient")]
    pub lora: Option<LoraConfig>,
    /// Trained on reversed pairs (the backward model M_yx).
    pub backward: bool,
    /// The data's source when every group has the same one.
    #[serde(deserialize_with = "lenient")]
    pub source: Option<DataSource>,
    /// The data's groups, in training order.
    pub groups: Vec<GroupMeta>,
    /// Describes the data (the CLI: its file path).
    pub data: String,
    /// The data pipeline's counts.
    #[serde(deserialize_with = "lenient")]
    pub data_stats: Option<DataStats>,
    /// Examples trained on.
    pub examples: usize,
    /// Max tokens per example.
    pub max_len: usize,
    /// The fingerprint of the job that wrote it.
    pub job_fingerprint: Option<String>,
    /// Whether the job ran to its end.
    pub finished: bool,
    /// Wall seconds of the run (finished jobs).
    pub train_secs: Option<f64>,
    /// Training tokens per second (finished jobs).
    pub tokens_per_sec: Option<f64>,
    /// Held-out losses (finished jobs).
    #[serde(deserialize_with = "lenient")]
    pub eval: Option<MetaEval>,
    /// Exports: the model folder or file exported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exported_from: Option<PathBuf>,
    /// Exports: an adapter was merged into its base.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merged_adapter: Option<bool>,
}

/// One group of a checkpoint's training data.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GroupMeta {
    /// Its tag.
    pub source: Option<DataSource>,
    /// Records in it.
    pub records: usize,
}

/// The held-out losses of a finished checkpoint.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MetaEval {
    /// Held-out examples.
    pub held_out_examples: usize,
    /// Loss per output token before training.
    pub loss_before: Option<f64>,
    /// Loss per output token after training.
    pub loss_after: Option<f64>,
    /// Output tokens the losses are over.
    pub output_tokens: Option<usize>,
}

/// Reads a nested record, or `None` when it is absent, null or no longer of this shape.
fn lenient<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let value = Value::deserialize(d)?;
    Ok(serde_json::from_value(value).ok())
}

/// How a save ended, for `backflow.json`.
pub(super) enum SaveKind {
    /// A periodic save of a job still running.
    Partial,
    /// The job's last save.
    Finished {
        /// Wall seconds of the run.
        secs: f64,
        /// Training tokens per second.
        tokens_per_sec: f64,
        /// Held-out losses.
        eval: MetaEval,
    },
}

/// `backflow.json` of `out`, if readable.
pub fn read_meta(out: &Path) -> Option<CheckpointMeta> {
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
    /// Writes the checkpoint folder atomically, `backflow.json` saying how the save ended.
    /// Returns the version (content hash of the weights).
    pub(super) fn save(
        &self,
        trainer: &Trainer<TrainBackend>,
        kind_of_save: SaveKind,
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
                Some(first.source)
            }
            _ => None,
        };
        let (finished, train_secs, tokens_per_sec, eval) = match kind_of_save {
            SaveKind::Partial => (false, None, None, None),
            SaveKind::Finished {
                secs,
                tokens_per_sec,
                eval,
            } => (true, Some(secs), Some(tokens_per_sec), Some(eval)),
        };
        let meta = CheckpointMeta {
            version: Some(version.clone()),
            kind: kind.to_owned(),
            base_model: Some(base),
            step: trainer.step,
            sft: Some(trainer.cfg.clone()),
            lora: match &job.mode {
                TrainMode::Lora(lc) => Some(lc.clone()),
                TrainMode::Full => None,
            },
            backward: job.backward,
            source,
            groups: job
                .data
                .iter()
                .map(|g| GroupMeta {
                    source: Some(g.source),
                    records: g.records.len(),
                })
                .collect(),
            data: job.data_label.clone(),
            data_stats: Some(self.stats.clone()),
            examples: self.examples,
            max_len: job.max_len,
            job_fingerprint: Some(self.fingerprint.to_owned()),
            finished,
            train_secs,
            tokens_per_sec,
            eval,
            exported_from: None,
            merged_adapter: None,
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of an older version (an export's `source` was its path; a nested record of
    /// another shape) reads, what no longer parses as absent, the rest as written.
    #[test]
    fn older_and_odd_files_read_leniently() {
        let text = r#"{"version": "v1", "finished": true, "step": 3, "kind": "lora",
            "source": "/models/base.gguf", "sft": {"lr": "high"}, "lora": null,
            "groups": [{"source": "Augmented", "records": 4}],
            "eval": {"loss_after": 1.5}, "job_fingerprint": "fp"}"#;
        let m: CheckpointMeta = serde_json::from_str(text).expect("reads");
        assert_eq!(m.version.as_deref(), Some("v1"));
        assert_eq!((m.finished, m.step, m.kind.as_str()), (true, 3, "lora"));
        assert!(m.source.is_none() && m.sft.is_none() && m.lora.is_none());
        assert_eq!(m.groups[0].source, Some(DataSource::Augmented));
        assert_eq!(m.groups[0].records, 4);
        let eval = m.eval.expect("eval");
        assert_eq!((eval.loss_before, eval.loss_after), (None, Some(1.5)));
        assert_eq!(m.job_fingerprint.as_deref(), Some("fp"));
        // A file cut short reads as a checkpoint that did not finish.
        let empty: CheckpointMeta = serde_json::from_str("{}").expect("reads");
        assert!(!empty.finished && empty.version.is_none());
    }
}
