//! Rounds and model versions of the loop. Dataflow time is split into rounds: round `r` owns the
//! times `round_start(r) .. round_start(r + 1)`; the passages ingested during round `r` carry times
//! in its span, and every candidate is re-rated at `round_start(r)` by the forward model of round
//! `r` (`M_r`: `M_0` is trained from the seed at step 0, `M_{r+1}` by the training sink once round
//! `r`'s curated set is complete). New model versions travel as [`ModelUpdate`] records along a
//! dataflow edge to every worker of every process, which install them into their process's model
//! server.

use crate::operators::discover::file_epoch;
use crate::operators::Time;
use crate::serve::ModelClient;
use crate::train::checkpoint;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Input files per round: round `r` starts at the epoch of file `r * FILES_PER_ROUND`.
pub const FILES_PER_ROUND: u64 = 1 << 20;

/// The first time of round `round` (0-based).
pub fn round_start(round: u64) -> Time {
    file_epoch(round.saturating_mul(FILES_PER_ROUND))
}

/// The round a time belongs to.
pub fn round_of(time: Time) -> u64 {
    time / round_start(1)
}

/// Which model of the method a version is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelRole {
    /// The backward model `M_yx`, which writes instructions for passages.
    Backward,
    /// A forward model `M_r`, which rates candidates in round `r`.
    Forward,
}

/// A model version published to every worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelUpdate {
    /// Backward or forward.
    pub role: ModelRole,
    /// For a forward model, the round it rates (0 for `M_0`).
    pub round: u64,
    /// The version: the content hash of the weights (or the given model's name).
    pub version: String,
    /// Where the publishing process has it.
    pub path: PathBuf,
    /// The checkpoint's files (a LoRA adapter is a few MB), for processes that cannot read
    /// `path`; empty for a model every process is given by path.
    pub files: Vec<(String, Vec<u8>)>,
}

/// Why a model could not be installed.
#[derive(Debug, Error)]
pub enum InstallError {
    /// Writing the received checkpoint failed.
    #[error("writing model {version} to {path}: {message}")]
    Write {
        /// The version.
        version: String,
        /// Where.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The model server could not load it.
    #[error(transparent)]
    Load(#[from] crate::serve::ServeError),
}

/// The versions a worker knows.
#[derive(Clone, Debug, Default)]
pub struct ModelBook {
    /// The backward model.
    pub backward: Option<String>,
    /// The forward model of each round.
    pub forward: BTreeMap<u64, String>,
}

impl ModelBook {
    /// Records an installed update.
    pub fn record(&mut self, update: &ModelUpdate) {
        match update.role {
            ModelRole::Backward => self.backward = Some(update.version.clone()),
            ModelRole::Forward => {
                self.forward.insert(update.round, update.version.clone());
            }
        }
    }
}

/// The version recorded in a checkpoint folder's `backflow.json`, if any.
pub fn folder_version(dir: &Path) -> Option<String> {
    crate::train::save::read_meta(dir)?.version
}

/// The version of a model given by path: its checkpoint version when it has one, else its file
/// name and size (the same on every machine that has the same file).
pub fn given_version(path: &Path) -> String {
    if let Some(v) = folder_version(path) {
        return v;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => format!("{name}@{:x}", m.len()),
        _ => name,
    }
}

/// Loads `update` into this process's model server. The publisher's folder is used when this
/// process can read it (one machine, or a shared file system); otherwise the received files are
/// written under `models_dir/VERSION`, with the adapter's base pointed at this process's `base`.
pub fn install(
    update: &ModelUpdate,
    client: &ModelClient,
    models_dir: &Path,
    base: &Path,
) -> Result<(), InstallError> {
    let path = if update.files.is_empty()
        || folder_version(&update.path).as_deref() == Some(&update.version)
    {
        update.path.clone()
    } else {
        let dir = models_dir.join(&update.version);
        if folder_version(&dir).as_deref() != Some(&update.version) {
            let files: Vec<(String, Vec<u8>)> = update
                .files
                .iter()
                .map(|(name, bytes)| (name.clone(), rebase(name, bytes, base)))
                .collect();
            checkpoint::write_folder_atomic(&dir, &files, &[]).map_err(|e| {
                InstallError::Write {
                    version: update.version.clone(),
                    path: dir.clone(),
                    message: e.to_string(),
                }
            })?;
        }
        dir
    };
    client.load(&update.version, &path)?;
    Ok(())
}

/// An adapter config with its base model replaced by this process's copy.
fn rebase(name: &str, bytes: &[u8], base: &Path) -> Vec<u8> {
    if name != checkpoint::ADAPTER_CONFIG {
        return bytes.to_vec();
    }
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(mut v) => {
            v["base_model_name_or_path"] = serde_json::Value::String(
                std::fs::canonicalize(base)
                    .unwrap_or_else(|_| base.to_path_buf())
                    .to_string_lossy()
                    .into_owned(),
            );
            serde_json::to_vec_pretty(&v).unwrap_or_else(|_| bytes.to_vec())
        }
        Err(_) => bytes.to_vec(),
    }
}

/// The files of a checkpoint folder worth sending to other processes (weights, configs,
/// tokenizer, the version record; not the optimizer state).
pub fn checkpoint_files(dir: &Path) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::new();
    for name in [
        checkpoint::ADAPTER_CONFIG,
        checkpoint::ADAPTER_WEIGHTS,
        checkpoint::CONFIG,
        checkpoint::WEIGHTS,
        checkpoint::META,
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        let p = dir.join(name);
        if p.exists() {
            files.push((name.to_owned(), std::fs::read(&p)?));
        }
    }
    Ok(files)
}

/// What a worker needs to install the updates it receives: its process's model server, where
/// received checkpoints go, the local base model, and the worker's [`ModelBook`].
#[derive(Clone)]
pub struct Installer {
    /// The process's model server.
    pub client: ModelClient,
    /// Where checkpoints received from other processes are written.
    pub models_dir: PathBuf,
    /// This process's copy of the base model.
    pub base: PathBuf,
    /// The versions this worker has installed.
    pub book: std::rc::Rc<std::cell::RefCell<ModelBook>>,
    /// Where an installation failure is reported (it ends the job).
    pub progress: std::sync::Arc<crate::progress::Progress>,
}

impl Installer {
    /// Installs `update` (once per worker) and records it in the book.
    pub fn accept(&self, update: &ModelUpdate) {
        let known = match update.role {
            ModelRole::Backward => self.book.borrow().backward.clone(),
            ModelRole::Forward => self.book.borrow().forward.get(&update.round).cloned(),
        };
        if known.as_deref() == Some(update.version.as_str()) {
            return;
        }
        match install(update, &self.client, &self.models_dir, &self.base) {
            Ok(()) => self.book.borrow_mut().record(update),
            Err(e) => self.progress.fail(format!("{e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_partition_time_after_the_file_epochs() {
        // Round 1 starts after 2^20 files of 2^20 sub-epochs each.
        assert_eq!(round_start(0), 0);
        assert_eq!(round_start(1), 1u64 << 40);
        assert_eq!(round_of(0), 0);
        assert_eq!(round_of((1u64 << 40) - 1), 0);
        assert_eq!(round_of(1u64 << 40), 1);
        assert_eq!(round_of(file_epoch(3 * FILES_PER_ROUND + 7) + 5), 3);
    }

    #[test]
    fn rebase_points_the_adapter_at_the_local_base() {
        let cfg = br#"{"peft_type":"LORA","base_model_name_or_path":"/elsewhere/m.gguf","r":8}"#;
        let out = rebase(
            checkpoint::ADAPTER_CONFIG,
            cfg,
            Path::new("/nonexistent/local.gguf"),
        );
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["base_model_name_or_path"], "/nonexistent/local.gguf");
        assert_eq!(v["r"], 8);
        // Other files pass unchanged.
        assert_eq!(
            rebase("adapter_model.safetensors", b"xyz", Path::new("/b")),
            b"xyz"
        );
    }
}
