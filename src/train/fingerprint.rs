//! A training job's fingerprint: what makes two jobs the same (base model content, data and
//! tags in order, every knob that changes the weights), so finished work is found and reused.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::model::chat::Role;

use super::checkpoint;
use super::data::{DataSource, Record};
use super::job::{TrainJob, DEFAULT_EPOCHS};
use super::model::TrainMode;
use super::save::json_err;
use super::{io_err, TrainError};

/// Bumped when the fingerprint's inputs or encoding change, so that checkpoints fingerprinted
/// differently are never taken for the same job.
/// 2: dropout masks seeded per (step, micro-batch, block), not drawn in one stream per step.
/// 3: the base's format (LoRA over blocks).
const FINGERPRINT_FORMAT: u32 = 3;

/// The job's fingerprint (hex xxh3-128); see [`TrainJob::fingerprint`].
pub(super) fn fingerprint(job: &TrainJob) -> Result<String, TrainError> {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut sft = job.sft_config();
    // How a batch is split into passes is how the work is done, not what is learned (the same
    // gradient, up to rounding): a job finished in other passes is the same job.
    sft.micro_batch = 0;
    // Recomputing blocks gives the same gradients too (the dropout masks are seeded per block).
    sft.recompute = false;
    let knobs = json!({
        "format": FINGERPRINT_FORMAT,
        "base": canonical(&job.model),
        "mode": match &job.mode {
            TrainMode::Full => Value::from("full"),
            TrainMode::Lora(lc) => serde_json::to_value(lc).map_err(json_err("LoRA config"))?,
        },
        // A base kept as blocks is the same weights for a file's own blocks, but rounds
        // differently, and `q8` of a float checkpoint is other weights.
        "base_dtype": job.base_format().as_str(),
        "sft": sft,
        "steps": job.steps,
        "epochs": job.steps.is_none().then(|| job.epochs.unwrap_or(DEFAULT_EPOCHS)),
        "max_len": job.max_len,
        "backward": job.backward,
        "eval_frac": job.eval_frac,
        "group_by_length": job.group_by_length,
    });
    put(&mut h, knobs.to_string().as_bytes());
    hash_base(&mut h, &job.model)?;
    // The held-out data does not change the weights, but it changes the recorded losses.
    for groups in [&job.data, &job.eval_data] {
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

/// The absolute path of `p` when it exists, else `p`.
pub(super) fn canonical(p: &Path) -> PathBuf {
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
