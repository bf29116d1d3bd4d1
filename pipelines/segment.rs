//! The ingest-only pipeline: crawl dumps to deduplicated, self-contained passages.
//!
//! ```text
//! ingest (discover -> read -> extract -> segment -> dedup -> keep) -> write
//! ```

use super::harness;
use super::ingest::{ingest, Ingest, IngestFlags};
use crate::cli::flags::JobFlags;
use crate::formats;
use crate::operators::discover::{DiscoverConfig, WorkItem};
use crate::operators::write::{write, WriteTarget};
use crate::operators::Time;
use crate::progress::{Progress, Reporter};
use crate::run_records::SegmentSummary;
use crate::stats::Stats;
use crate::{ingest_log, output};
use anyhow::{bail, Context, Result};
use clap::Parser;
use std::cell::RefCell;
use std::ffi::OsString;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use timely::dataflow::operators::Probe;
use timely::dataflow::ProbeHandle;

/// `backflow segment`: crawl dumps to deduplicated passages.
#[derive(Parser, Debug, Clone)]
#[command(name = "segment", disable_help_flag = true)]
pub struct SegmentArgs {
    /// Input files, folders (read recursively) or glob patterns: WARC/WET (.warc, .warc.gz, .wet.gz),
    /// JSONL (.jsonl, .jsonl.gz) with a text field, or .html pages.
    #[arg(value_name = "INPUT")]
    pub inputs: Vec<String>,
    /// Output folder: passages as `segment-*.jsonl`, plus `summary.json`.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Watch this folder and process each new complete file exactly once, until Ctrl-C.
    /// Writers must create files under a temporary name (ending in .part, .tmp or .partial, or
    /// starting with a dot) and rename them into place when complete.
    #[arg(long, value_name = "DIR")]
    pub follow: Option<PathBuf>,
    /// How dumps become passages (shared with `run humpback`).
    #[command(flatten)]
    pub ingest: IngestFlags,
    /// The processes and threads of the job, and its output on the terminal.
    #[command(flatten)]
    pub job: JobFlags,
}

/// Entry point for `backflow run segment`.
pub fn main(argv: Vec<OsString>) -> Result<()> {
    run(SegmentArgs::try_parse_from(argv)?)
}

/// Runs the job.
pub fn run(args: SegmentArgs) -> Result<()> {
    let options = args.ingest.options()?;
    let config = args.job.cluster.timely_config()?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating output folder {}", args.out.display()))?;
    let inputs = formats::expand_inputs(&args.inputs)?;
    if inputs.is_empty() && args.follow.is_none() {
        bail!("no input files found in {:?}", args.inputs);
    }
    let state = ingest_log::IngestState::new(&args.out);
    let follow_dir = ingest_log::follow_dir(args.follow.as_deref())?;
    // A restarted --follow job: files finished before are skipped, files cut off are read again
    // at their own index (their epoch files rewritten whole), and the passages written before
    // seed dedup. Process 0 owns the state (it discovers).
    let resume = if follow_dir.is_some() && args.job.cluster.process == 0 {
        ingest_log::resume_follow(&args.out, "segment")?
    } else {
        ingest_log::Resume::default()
    };
    let stop = harness::stop_flag();
    let ingest_job = Ingest {
        options,
        discover: DiscoverConfig {
            inputs: inputs.clone(),
            follow: follow_dir.clone(),
            poll: Duration::from_millis(500),
            max_open_files: args.ingest.max_open_files,
            already_ingested: resume.done,
            first_index: resume.first_index,
            limit_reached: Default::default(),
            replay: resume.replay,
            assignments: follow_dir
                .is_some()
                .then(|| ingest_log::IngestState::taken(&args.out)),
            files_per_round: None,
        },
        written_before: resume.written,
        stop: stop.clone(),
    };
    // Objects in a store are sized by a request each: their bytes show as read, without a total.
    let any_remote = inputs.iter().any(|f| formats::remote::is_url(&f.path));
    let total_bytes = if args.follow.is_none() && !any_remote && args.job.cluster.process == 0 {
        inputs
            .iter()
            .filter_map(|f| std::fs::metadata(&f.path).ok())
            .map(|m| m.len())
            .sum()
    } else {
        0
    };
    let progress = Arc::new(Progress::default());
    let reporter = Reporter::start("segment", progress.clone(), total_bytes, args.job.quiet);
    let started = Instant::now();
    let target = WriteTarget {
        dir: args.out.clone(),
        name: |t: Time| format!("segment-e{t:016x}"),
        process: args.job.cluster.process,
    };
    let (workers, processes) = (args.job.cluster.workers, args.job.cluster.processes);
    let out_dir = args.out.clone();
    let follow = args.follow.is_some();
    let worker_progress = progress.clone();

    let guards = args
        .job
        .cluster
        .execute(config, move |worker| {
            let stats = Rc::new(RefCell::new(Stats::default()));
            let probe: ProbeHandle<Time> = ProbeHandle::new();
            let state = state.clone();
            let progress = worker_progress.clone();
            let on_file_done: Box<dyn FnMut(&WorkItem)> = if follow {
                let progress = progress.clone();
                Box::new(move |item: &WorkItem| {
                    // After a fatal error (a write that failed) a file's epochs still complete,
                    // but its passages may not be on disk: it stays unfinished, and the
                    // restart reads it again.
                    if !progress.failed() {
                        state.record(item)
                    }
                })
            } else {
                Box::new(|_: &WorkItem| {})
            };
            worker.dataflow::<Time, _, _>(|scope| {
                let passages = ingest(scope, &ingest_job, on_file_done, &probe, &stats, &progress);
                write(passages, target.clone(), stats.clone(), progress.clone()).probe_with(&probe);
            });
            harness::run_worker(worker, &probe, &stop, &progress, &stats)
        })
        .map_err(|e| anyhow::anyhow!("starting the timely job: {e}"))?;

    let merged = harness::finish(guards, &progress);
    drop(reporter);
    let merged = merged?;
    if let Some(stats) = merged {
        let elapsed = started.elapsed().as_secs_f64().max(1e-9);
        let summary = SegmentSummary {
            pipeline: "segment".into(),
            workers,
            processes,
            elapsed_secs: elapsed,
            mb_per_sec: stats.bytes_read as f64 / 1e6 / elapsed,
            records_per_sec: stats.records_read as f64 / elapsed,
            duplicates_removed: stats.dropped(crate::stats::DropReason::ExactDuplicate)
                + stats.dropped(crate::stats::DropReason::NearDuplicate),
            stats,
        };
        let path = out_dir.join("summary.json");
        output::atomic_write(&path, |out| {
            serde_json::to_writer_pretty(&mut *out, &summary)?;
            Ok(())
        })?;
        eprintln!("{}", harness::describe(&summary.stats, elapsed));
        eprintln!("summary: {}", path.display());
    }
    Ok(())
}
