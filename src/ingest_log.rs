//! The ingest logs of a `--follow` job (`_state/ingested.jsonl`: files done; `_state/taken.jsonl`:
//! the index each file was given), and what a restarted job reads back from them: which files to
//! skip, which to read again at their own index, and which passage files it wrote before.

use crate::formats::os_path::PathText;
use crate::formats::InputFile;
use crate::operators::discover::{WorkItem, SUB_EPOCHS};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

/// One line of an ingest log (`_state/ingested.jsonl`, `_state/taken.jsonl`).
#[derive(Debug, Serialize, Deserialize)]
struct Ingested {
    path: PathText,
    index: u64,
}

/// A log of input files with the index each had, appended one synced line at a time: the files a
/// `--follow` job has completely written (`ingested.jsonl`), or taken (`taken.jsonl`), so that a
/// restart reads none of the first again and each of the second exactly once more.
#[derive(Clone, Debug)]
pub struct IngestState {
    path: PathBuf,
}

impl IngestState {
    /// The log of files completely written by the job writing to `out`.
    pub fn new(out: &Path) -> IngestState {
        IngestState {
            path: out.join("_state").join("ingested.jsonl"),
        }
    }

    /// The log of files the job writing to `out` has taken (given an index), done or not.
    pub fn taken(out: &Path) -> IngestState {
        IngestState {
            path: out.join("_state").join("taken.jsonl"),
        }
    }

    /// Every recorded file with its index, in index order (a torn last line is ignored). Paths
    /// are canonical where the file still exists, so a folder spelled `dir`, `./dir` or
    /// `/abs/dir` names one file one way.
    pub fn load_indexed(&self) -> Result<Vec<(PathBuf, u64)>> {
        let file = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.path.display())),
        };
        let mut all = Vec::new();
        for line in std::io::BufReader::new(file).split(b'\n') {
            let line = line.with_context(|| format!("reading {}", self.path.display()))?;
            if let Ok(entry) = serde_json::from_slice::<Ingested>(&line) {
                let path = PathBuf::from(entry.path);
                all.push((path.canonicalize().unwrap_or(path), entry.index));
            }
        }
        all.sort_by_key(|(_, i)| *i);
        Ok(all)
    }

    /// Records `item` (synced before returning).
    pub fn record(&self, item: &WorkItem) {
        let append = || -> Result<()> {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            let mut line = serde_json::to_vec(&Ingested {
                path: PathText::from(item.path.as_path()),
                index: item.index,
            })?;
            line.push(b'\n');
            f.write_all(&line)?;
            f.sync_data()?;
            Ok(())
        };
        if let Err(e) = append() {
            log::warn!(
                "cannot record {} in {}: {e:#}",
                item.path.display(),
                self.path.display()
            );
        }
    }
}

/// Where a `--follow` job writing `{prefix}-e*.jsonl` files to `out` starts again.
#[derive(Debug, Default)]
pub struct Resume {
    /// Files completely written before: never read again.
    pub done: HashSet<PathBuf>,
    /// Files taken but not finished (a Ctrl-C or a kill in their middle), each to be read again
    /// at the index it had, so its epoch files are rewritten whole rather than written twice.
    pub replay: Vec<(InputFile, u64)>,
    /// The index for the next new file: past every index recorded or written.
    pub first_index: u64,
    /// The output files already written (they seed dedup: a passage written before the
    /// restart is not written again).
    pub written: Vec<PathBuf>,
}

/// Reads the state of the `--follow` job in `out`, and removes the epoch files of files that were
/// taken but not finished (the replay writes them again, whole).
pub fn resume_follow(out: &Path, prefix: &str) -> Result<Resume> {
    let done_log = IngestState::new(out).load_indexed()?;
    let taken_log = IngestState::taken(out).load_indexed()?;
    let done_indexes: HashSet<u64> = done_log.iter().map(|(_, i)| *i).collect();
    let unfinished: HashSet<u64> = taken_log
        .iter()
        .map(|(_, i)| *i)
        .filter(|i| !done_indexes.contains(i))
        .collect();
    let mut resume = Resume {
        first_index: done_log
            .iter()
            .chain(&taken_log)
            .map(|(_, i)| i + 1)
            .max()
            .unwrap_or(0),
        ..Resume::default()
    };
    let entries = match std::fs::read_dir(out) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(resume),
        Err(e) => return Err(e).with_context(|| format!("listing {}", out.display())),
    };
    for entry in entries {
        let path = entry
            .with_context(|| format!("listing {}", out.display()))?
            .path();
        let Some(epoch) = epoch_of_output(&path, prefix) else {
            continue;
        };
        let index = epoch / SUB_EPOCHS;
        resume.first_index = resume.first_index.max(index + 1);
        if unfinished.contains(&index) {
            std::fs::remove_file(&path)
                .with_context(|| format!("removing the unfinished {}", path.display()))?;
            log::info!("{} was not finished: it is written again", path.display());
        } else {
            resume.written.push(path);
        }
    }
    resume.written.sort();
    resume.done = done_log.into_iter().map(|(p, _)| p).collect();
    resume.replay = still_readable(
        taken_log
            .into_iter()
            .filter(|(_, index)| unfinished.contains(index)),
    );
    Ok(resume)
}

/// The files of an ingest log that can still be read, each with its index; a file gone since
/// (or no longer an input) is skipped with a warning.
pub fn still_readable(taken: impl IntoIterator<Item = (PathBuf, u64)>) -> Vec<(InputFile, u64)> {
    let mut files = Vec::new();
    for (path, index) in taken {
        // An object is not asked for here: if it is gone, reading it is a counted drop.
        let readable = crate::formats::remote::is_url(&path) || path.is_file();
        match crate::formats::detect_kind(&path) {
            Some(kind) if readable => files.push((InputFile { path, kind }, index)),
            _ => log::warn!(
                "{} was taken by an earlier run but is gone: not read again",
                path.display()
            ),
        }
    }
    files
}

/// The `--follow` folder, canonical: files are known by canonical paths across restarts, so
/// `dir`, `./dir/` and `/abs/dir` are one folder. An object store prefix is listed once here, so
/// that a wrong URL or missing credentials fail the job at its start.
pub fn follow_dir(dir: Option<&Path>) -> Result<Option<PathBuf>> {
    dir.map(|d| {
        if crate::formats::remote::is_url(d) {
            crate::formats::remote::list(&d.to_string_lossy())
                .with_context(|| format!("--follow {}", d.display()))?;
            return Ok(d.to_path_buf());
        }
        d.canonicalize()
            .with_context(|| format!("--follow {}", d.display()))
    })
    .transpose()
}

/// The epoch of an output file named `{prefix}-e{epoch:016x}-p…-w….jsonl`.
fn epoch_of_output(path: &Path, prefix: &str) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    let rest = name.strip_prefix(prefix)?.strip_prefix("-e")?;
    if !name.ends_with(".jsonl") {
        return None;
    }
    u64::from_str_radix(rest.get(..16)?, 16).ok()
}
