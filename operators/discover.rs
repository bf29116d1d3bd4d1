//! `discover`: the job's source. Worker 0 lists the inputs (and, with `--follow`, watches a folder)
//! and emits one [`WorkItem`] per input file at that file's own epoch, so that every file is a
//! coarse timestamp of its own. Ingestion waits on a probe: at most `max_open_files` files are in
//! flight at once, so memory stays bounded however fast files arrive.

use super::Time;
use crate::formats::{InputFile, InputKind};
use serde::{Deserialize, Serialize};
use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use timely::dataflow::operators::generic::source;
use timely::dataflow::{ProbeHandle, Scope, StreamVec};

/// Epochs reserved for each input file: a file can advance through this many sub-epochs.
pub const SUB_EPOCHS: u64 = 1 << 20;

/// The first epoch of input file `index`.
pub fn file_epoch(index: u64) -> Time {
    index * SUB_EPOCHS
}

/// One input file to read, with its position in the job (which fixes its epochs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkItem {
    /// The file's index in the job: its epochs start at `file_epoch(index)`.
    pub index: u64,
    /// The file to read, by its OS name (which need not be UTF-8).
    #[serde(with = "crate::formats::os_path")]
    pub path: PathBuf,
    /// Its format.
    pub kind: InputKind,
}

/// What to discover.
#[derive(Clone, Debug)]
pub struct DiscoverConfig {
    /// Inputs given on the command line, already expanded and sorted.
    pub inputs: Vec<InputFile>,
    /// A folder to watch for new complete files, until `stop` is set.
    pub follow: Option<PathBuf>,
    /// How often the followed folder is listed.
    pub poll: Duration,
    /// At most this many files in flight.
    pub max_open_files: u64,
    /// Files already ingested by an earlier run of the same job (never read again).
    pub already_ingested: HashSet<PathBuf>,
    /// The index to give the first file (after those of an earlier run).
    pub first_index: u64,
    /// Set when the job has taken enough passages (`--limit`): no new file is read.
    pub limit_reached: Arc<AtomicBool>,
    /// Files to read first, each at the index an earlier run of the same job gave it (the Humpback
    /// loop's `--follow` restart: the same file lands in the same round again).
    pub replay: Vec<(InputFile, u64)>,
    /// Where to record the index given to each new file as it is emitted, for [`Self::replay`].
    pub assignments: Option<crate::ingest_log::IngestState>,
    /// With `--follow`, start a new round of `files_per_round` file indexes each time every file
    /// seen so far is done and the folder has nothing new (the Humpback loop's rounds).
    pub files_per_round: Option<u64>,
}

/// Whether a file in a followed folder is complete. The convention: writers write to a name that
/// ends in `.part`, `.tmp` or `.partial`, or starts with `.`, and rename it into place when done
/// (a rename is atomic on POSIX file systems), so a file under its final name is never half written.
pub fn is_complete_name(path: &Path) -> bool {
    let Some(name) = path.file_name().map(|n| n.to_string_lossy()) else {
        return false;
    };
    !(name.starts_with('.')
        || name.ends_with(".part")
        || name.ends_with(".tmp")
        || name.ends_with(".partial")
        || name.ends_with(".done"))
}

/// Called by worker 0 when every file up to `index` is fully written.
pub type OnFileDone = Box<dyn FnMut(&WorkItem)>;

/// The source. Only worker 0 emits; the others release their capability at once.
pub fn discover<'s>(
    scope: Scope<'s, Time>,
    config: DiscoverConfig,
    probe: ProbeHandle<Time>,
    stop: Arc<AtomicBool>,
    mut on_file_done: OnFileDone,
) -> StreamVec<'s, Time, WorkItem> {
    let leader = scope.index() == 0;
    source(scope, "Discover", move |cap, info| {
        let activator = scope.activator_for(info.address);
        let mut cap = if leader { Some(cap) } else { None };
        if leader {
            activator.activate();
        }
        // Files are known by their canonical paths (as the ingest logs record them).
        let mut seen: HashSet<PathBuf> = config.already_ingested.clone();
        // Each pending file with the index it must have, if an earlier run gave it one.
        let mut pending: VecDeque<(InputFile, Option<u64>)> = VecDeque::new();
        for (input, index) in &config.replay {
            if seen.insert(canonical(&input.path)) {
                pending.push_back((input.clone(), Some(*index)));
            }
        }
        for input in &config.inputs {
            if seen.insert(canonical(&input.path)) {
                pending.push_back((input.clone(), None));
            }
        }
        // Set once a stop is asked: no new file is taken, the ones in flight are finished and
        // reported done (so a restart does not read them again).
        let mut stopping = false;
        let mut next_index = config.first_index;
        let mut in_flight: VecDeque<WorkItem> = VecDeque::new();
        let mut last_poll: Option<Instant> = None;
        let mut round_has_files = false;
        move |output| {
            // Report files whose epochs are complete, in order.
            while let Some(item) = in_flight.front() {
                if probe.less_than(&file_epoch(item.index + 1)) {
                    break;
                }
                on_file_done(item);
                in_flight.pop_front();
            }
            let Some(c) = cap.as_mut() else { return };
            if !stopping
                && (stop.load(Ordering::SeqCst) || config.limit_reached.load(Ordering::SeqCst))
            {
                log::info!(
                    "discover: stop requested or limit reached, finishing the files in flight"
                );
                pending.clear();
                stopping = true;
            }
            if stopping {
                // Hold the next file's epoch (it blocks nothing in flight) until every file in
                // flight is reported done.
                if in_flight.is_empty() {
                    cap = None;
                } else {
                    activator.activate_after(Duration::from_millis(5));
                }
                return;
            }
            if let Some(dir) = &config.follow {
                if pending.is_empty() && last_poll.is_none_or(|t| t.elapsed() >= config.poll) {
                    last_poll = Some(Instant::now());
                    for input in list_complete(dir) {
                        if seen.insert(canonical(&input.path)) {
                            pending.push_back((input, None));
                        }
                    }
                }
            }
            let mut blocked = false;
            while let Some((input, fixed)) = pending.front() {
                if in_flight.len() as u64 >= config.max_open_files {
                    blocked = true;
                    break;
                }
                let index = fixed.map_or(next_index, |i| i.max(next_index));
                let item = WorkItem {
                    index,
                    path: input.path.clone(),
                    kind: input.kind,
                };
                if let (Some(state), None) = (&config.assignments, fixed) {
                    state.record(&item);
                }
                pending.pop_front();
                c.downgrade(&file_epoch(index));
                output.session(&*c).give(item.clone());
                in_flight.push_back(item);
                next_index = index + 1;
                round_has_files = true;
                // Hold only the next file's epoch, so this one can complete.
                c.downgrade(&file_epoch(next_index));
            }
            if pending.is_empty() && config.follow.is_none() {
                cap = None;
                return;
            }
            if let Some(per_round) = config.files_per_round {
                // Idle: everything seen is done and the last listing found nothing new.
                if round_has_files && pending.is_empty() && in_flight.is_empty() {
                    // The round's first epoch is left free: the loop re-rates everything
                    // there, and it must be able to complete while we wait for new files.
                    next_index = (next_index / per_round + 1) * per_round + 1;
                    c.downgrade(&file_epoch(next_index));
                    round_has_files = false;
                    log::info!("discover: all files done, starting a new round");
                }
            }
            let wait = if blocked {
                Duration::from_millis(2)
            } else {
                config.poll
            };
            activator.activate_after(wait.min(config.poll));
        }
    })
}

/// The path a file is known by: canonical when it exists.
fn canonical(path: &Path) -> PathBuf {
    path.canonicalize().unwrap_or_else(|_| path.to_path_buf())
}

/// Complete files in `dir` (recursively; a local folder or an object store prefix), sorted by
/// name so every run orders them alike. A listing that fails is logged and tried again at the
/// next poll.
fn list_complete(dir: &Path) -> Vec<InputFile> {
    if crate::formats::remote::is_url(dir) {
        let listed = match crate::formats::remote::list(&dir.to_string_lossy()) {
            Ok(listed) => listed,
            Err(e) => {
                log::warn!("discover: cannot list {}: {e}", dir.display());
                return Vec::new();
            }
        };
        // Object stores have no rename: a writer that follows the convention uploads under a
        // temporary name and copies it into place, and an upload is visible only once whole.
        return listed
            .into_iter()
            .map(|l| PathBuf::from(l.url))
            .filter(|path| is_complete_name(path))
            .filter_map(|path| {
                let kind = crate::formats::kind_from_name(&path)?;
                Some(InputFile { path, kind })
            })
            .collect();
    }
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            log::warn!("discover: cannot list {}", d.display());
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if is_complete_name(&path) {
                if let Some(kind) = crate::formats::detect_kind(&path) {
                    found.push(InputFile { path, kind });
                }
            }
        }
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    found
}
