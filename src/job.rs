//! What every job shares: the Ctrl-C stop flag, the record of files already ingested (for
//! `--follow` restarts), and gathering every worker's stats on worker 0.

use crate::operators::discover::WorkItem;
use crate::stats::Stats;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use timely::dataflow::operators::{Exchange, Inspect, Probe, ToStream};
use timely::worker::Worker;

/// The process's stop flag, set by the first Ctrl-C (SIGINT/SIGTERM). Jobs stop ingesting and
/// finish the work in flight; a second Ctrl-C exits at once.
pub fn stop_flag() -> Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        let handler_flag = flag.clone();
        let installed = ctrlc::set_handler(move || {
            if handler_flag.swap(true, Ordering::SeqCst) {
                eprintln!("interrupted again: exiting now");
                std::process::exit(130);
            }
            eprintln!("interrupted: finishing the work in flight (Ctrl-C again to exit now)");
        });
        if let Err(e) = installed {
            log::warn!("cannot install the Ctrl-C handler: {e}");
        }
        flag
    })
    .clone()
}

/// One line of `_state/ingested.jsonl`.
#[derive(Debug, Serialize, Deserialize)]
struct Ingested {
    path: String,
    index: u64,
}

/// Files a `--follow` job has completely written, so that a restart reads none of them again.
#[derive(Clone, Debug)]
pub struct IngestState {
    path: PathBuf,
}

impl IngestState {
    /// The state of the job writing to `out`.
    pub fn new(out: &Path) -> IngestState {
        IngestState {
            path: out.join("_state").join("ingested.jsonl"),
        }
    }

    /// Files already ingested, and the index for the next file. A torn last line (a crash while
    /// appending) is ignored: that file is read again, and its epoch file is rewritten whole.
    pub fn load(&self) -> Result<(HashSet<String>, u64)> {
        let mut seen = HashSet::new();
        let mut next = 0;
        let file = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((seen, next)),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.path.display())),
        };
        for line in std::io::BufReader::new(file).lines() {
            let line = line.with_context(|| format!("reading {}", self.path.display()))?;
            if let Ok(entry) = serde_json::from_str::<Ingested>(&line) {
                next = next.max(entry.index + 1);
                seen.insert(entry.path);
            }
        }
        Ok((seen, next))
    }

    /// Every recorded file with its index, in index order (a torn last line is ignored).
    pub fn load_indexed(&self) -> Result<Vec<(String, u64)>> {
        let file = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.path.display())),
        };
        let mut all = Vec::new();
        for line in std::io::BufReader::new(file).lines() {
            let line = line.with_context(|| format!("reading {}", self.path.display()))?;
            if let Ok(entry) = serde_json::from_str::<Ingested>(&line) {
                all.push((entry.path, entry.index));
            }
        }
        all.sort_by_key(|(_, i)| *i);
        Ok(all)
    }

    /// Records that `item` is completely written.
    pub fn record(&self, item: &WorkItem) {
        let append = || -> Result<()> {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            let line = serde_json::to_string(&Ingested {
                path: item.path.clone(),
                index: item.index,
            })?;
            f.write_all(format!("{line}\n").as_bytes())?;
            f.sync_data()?;
            Ok(())
        };
        if let Err(e) = append() {
            log::warn!("cannot record {} as ingested: {e:#}", item.path);
        }
    }
}

/// Sends every worker's stats to worker 0, which returns them merged; the others return `None`.
/// Every worker must call it, after its main dataflow is done.
pub fn gather_stats(worker: &mut Worker, local: Stats) -> Option<Stats> {
    let merged = Rc::new(RefCell::new(Stats::default()));
    let sink = merged.clone();
    let probe = worker.dataflow::<u64, _, _>(|scope| {
        let (probe, _) = vec![local]
            .to_stream(scope)
            .container::<Vec<Stats>>()
            .exchange(|_| 0)
            .inspect(move |s: &Stats| sink.borrow_mut().merge(s))
            .probe();
        probe
    });
    worker.step_while(|| !probe.done());
    (worker.index() == 0).then(|| merged.borrow().clone())
}

/// Waits for every worker of this process; returns the merged stats (on process 0, whose worker 0
/// gathered them) or `None` (other processes), or the first failure: a worker that panicked, or
/// the fatal error an operator reported through `progress`.
pub fn finish(
    guards: timely::communication::WorkerGuards<Option<Stats>>,
    progress: &crate::progress::Progress,
) -> Result<Option<Stats>> {
    let mut merged = None;
    for result in guards.join() {
        match result {
            Ok(Some(stats)) => merged = Some(stats),
            Ok(None) => {}
            Err(e) => anyhow::bail!("a worker failed: {e}"),
        }
    }
    if let Some(fatal) = progress.fatal() {
        anyhow::bail!("the job stopped: {fatal}");
    }
    Ok(merged)
}

/// A few human lines about a finished job.
pub fn describe(stats: &Stats, elapsed_secs: f64) -> String {
    let mut s = format!(
        "read {} files, {:.1} MB, {} records in {:.1}s ({:.1} MB/s); {} pages kept, {} segments, {} passages written",
        stats.files,
        stats.bytes_read as f64 / 1e6,
        stats.records_read,
        elapsed_secs,
        stats.bytes_read as f64 / 1e6 / elapsed_secs.max(1e-9),
        stats.pages_kept,
        stats.segments_made,
        stats.passages_written,
    );
    if !stats.dropped.is_empty() {
        s.push_str("\ndropped:");
        for (reason, r) in &stats.dropped {
            s.push_str(&format!(" {}={}", reason.as_str(), r.count));
        }
    }
    s
}
