//! What every pipeline runs its dataflow with: the Ctrl-C stop flag, the one run loop of a
//! worker (steps until done, turns a fatal error into a stop), the stats of every worker gathered
//! on worker 0, the join of the workers, and a few lines about the finished job.

use crate::operators::{Time, WorkerStats};
use crate::progress::Progress;
use crate::stats::Stats;
use anyhow::Result;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use timely::dataflow::operators::{Exchange, Inspect, Probe, ToStream};
use timely::dataflow::ProbeHandle;
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

/// Runs a worker's dataflows to the end: steps until `probe` is done, turns a fatal error any
/// operator reported into the stop flag (the sources stop taking input, the work in flight
/// finishes), then gathers every worker's stats on worker 0 (see [`gather_stats`]). The one
/// run loop of every pipeline.
pub fn run_worker(
    worker: &mut Worker,
    probe: &ProbeHandle<Time>,
    stop: &AtomicBool,
    progress: &Progress,
    stats: &WorkerStats,
) -> Option<Stats> {
    while !probe.done() {
        if progress.failed() {
            stop.store(true, Ordering::SeqCst);
        }
        worker.step_or_park(Some(std::time::Duration::from_millis(50)));
    }
    let local = stats.borrow().clone();
    gather_stats(worker, local)
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
    progress: &Progress,
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
