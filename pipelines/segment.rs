//! The ingest-only pipeline: crawl dumps to deduplicated, self-contained passages.
//!
//! ```text
//! discover -> read -> extract -> segment -> dedup -> write
//!                                    \________________/   (text waits in write for its verdict)
//! ```

use crate::cluster::ClusterArgs;
use crate::formats::{self, ReadOptions};
use crate::operators::dedup::{dedup, DedupOptions};
use crate::operators::discover::{discover, DiscoverConfig, WorkItem};
use crate::operators::extract::extract;
use crate::operators::read::{read, ReadPacing};
use crate::operators::segment::segment;
use crate::operators::write::{write, WriteTarget};
use crate::operators::written_before;
use crate::operators::Time;
use crate::progress::{Progress, Reporter};
use crate::stats::Stats;
use crate::text::html::ExtractOptions;
use crate::text::segment::SegmentOptions;
use crate::{job, output};
use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Serialize;
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
    /// Cluster flags (-w, -n, -p, -h).
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Minimum passage length in characters.
    #[arg(long, default_value_t = 600)]
    pub min_chars: usize,
    /// Maximum passage length in characters.
    #[arg(long, default_value_t = 3000)]
    pub max_chars: usize,
    /// File with extra navigation headers to drop, one per line (added to the built-in list).
    #[arg(long, value_name = "FILE")]
    pub nav_headers: Option<PathBuf>,
    /// Near-duplicate threshold: estimated Jaccard similarity of 5-word shingles.
    #[arg(long, default_value_t = 0.8)]
    pub near_threshold: f64,
    /// Keep near duplicates (exact duplicates are always removed).
    #[arg(long)]
    pub no_near_dedup: bool,
    /// The text field of JSONL inputs.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// Pages larger than this (MiB) are skipped and counted as page_too_large.
    #[arg(long, default_value_t = 16)]
    pub max_page_mb: u64,
    /// A large input advances to a new epoch every this many MiB.
    #[arg(long, default_value_t = 64)]
    pub chunk_mb: u64,
    /// At most this many input files in flight (backpressure).
    #[arg(long, default_value_t = 4)]
    pub max_open_files: u64,
    /// No progress bar or progress lines.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// Print help.
    #[arg(long, action = clap::ArgAction::Help)]
    pub help: Option<bool>,
}

/// Entry point for `backflow run segment`.
pub fn main(argv: Vec<OsString>) -> Result<()> {
    run(SegmentArgs::try_parse_from(argv)?)
}

/// What the job did, written to `summary.json` by process 0.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// The pipeline's name.
    pub pipeline: &'static str,
    /// Workers per process and processes.
    pub workers: usize,
    /// Processes in the job.
    pub processes: usize,
    /// Wall time of the job in seconds.
    pub elapsed_secs: f64,
    /// Input megabytes per second.
    pub mb_per_sec: f64,
    /// Records per second.
    pub records_per_sec: f64,
    /// Duplicates removed (exact + near).
    pub duplicates_removed: u64,
    /// Everything counted, merged over all workers.
    #[serde(flatten)]
    pub stats: Stats,
}

/// Runs the job.
pub fn run(args: SegmentArgs) -> Result<()> {
    if args.min_chars >= args.max_chars {
        bail!(
            "--min-chars ({}) must be below --max-chars ({})",
            args.min_chars,
            args.max_chars
        );
    }
    if !(0.0..=1.0).contains(&args.near_threshold) {
        bail!(
            "--near-threshold must be within 0..1, got {}",
            args.near_threshold
        );
    }
    let config = args.cluster.timely_config()?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating output folder {}", args.out.display()))?;
    let inputs = formats::expand_inputs(&args.inputs)?;
    if inputs.is_empty() && args.follow.is_none() {
        bail!("no input files found in {:?}", args.inputs);
    }
    let mut segment_options = SegmentOptions {
        min_chars: args.min_chars,
        max_chars: args.max_chars,
        ..SegmentOptions::default()
    };
    if let Some(path) = &args.nav_headers {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --nav-headers {}", path.display()))?;
        segment_options.navigation_headers.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_lowercase),
        );
    }
    let read_options = ReadOptions {
        text_field: args.text_field.clone(),
        max_page_bytes: args.max_page_mb << 20,
        ..ReadOptions::default()
    };
    let dedup_options = DedupOptions {
        near: !args.no_near_dedup,
        threshold: args.near_threshold,
        ..DedupOptions::default()
    };
    // Validate the MinHash settings here, before any worker starts.
    crate::text::minhash::MinHasher::new(
        dedup_options.bands * dedup_options.rows,
        dedup_options.bands,
        dedup_options.ngram,
        dedup_options.seed,
    )?;
    let pacing = ReadPacing {
        chunk_bytes: args.chunk_mb.max(1) << 20,
        ..ReadPacing::default()
    };
    let state = job::IngestState::new(&args.out);
    let follow_dir = job::follow_dir(args.follow.as_deref())?;
    // A restarted --follow job: files finished before are skipped, files cut off are read again
    // at their own index (their epoch files rewritten whole), and the passages written before
    // seed dedup. Process 0 owns the state (it discovers).
    let resume = if follow_dir.is_some() && args.cluster.process == 0 {
        job::resume_follow(&args.out, "segment")?
    } else {
        job::Resume::default()
    };
    let written_before = resume.written.clone();
    let discover_config = DiscoverConfig {
        inputs: inputs.clone(),
        follow: follow_dir.clone(),
        poll: Duration::from_millis(500),
        max_open_files: args.max_open_files.max(1),
        already_ingested: resume.done,
        first_index: resume.first_index,
        limit_reached: Default::default(),
        replay: resume.replay,
        assignments: follow_dir
            .is_some()
            .then(|| job::IngestState::taken(&args.out)),
        files_per_round: None,
    };
    let total_bytes = if args.follow.is_none() && args.cluster.process == 0 {
        inputs
            .iter()
            .filter_map(|f| std::fs::metadata(&f.path).ok())
            .map(|m| m.len())
            .sum()
    } else {
        0
    };
    let stop = job::stop_flag();
    let progress = Arc::new(Progress::default());
    let reporter = Reporter::start("segment", progress.clone(), total_bytes, args.quiet);
    let started = Instant::now();
    let target = WriteTarget {
        dir: args.out.clone(),
        prefix: "segment".into(),
        process: args.cluster.process,
    };
    let (workers, processes) = (args.cluster.workers, args.cluster.processes);
    let out_dir = args.out.clone();
    let follow = args.follow.is_some();
    let worker_progress = progress.clone();

    let guards = args
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
                let items = discover(
                    scope,
                    discover_config.clone(),
                    probe.clone(),
                    stop.clone(),
                    on_file_done,
                );
                let records = read(
                    items,
                    read_options.clone(),
                    pacing.clone(),
                    probe.clone(),
                    stats.clone(),
                    progress.clone(),
                );
                let pages = extract(records, ExtractOptions::default(), stats.clone());
                let passages = segment(pages, segment_options.clone(), stats.clone());
                let history = (!written_before.is_empty()).then(|| {
                    written_before::written_before(scope, written_before.clone(), progress.clone())
                });
                let verdicts = dedup(passages.clone(), history, dedup_options.clone())
                    .expect("dedup options validated before the job started");
                write(
                    passages,
                    verdicts,
                    target.clone(),
                    stats.clone(),
                    progress.clone(),
                )
                .probe_with(&probe);
            });
            job::run_worker(worker, &probe, &stop, &progress, &stats)
        })
        .map_err(|e| anyhow::anyhow!("starting the timely job: {e}"))?;

    let merged = crate::job::finish(guards, &progress);
    drop(reporter);
    let merged = merged?;
    if let Some(stats) = merged {
        let elapsed = started.elapsed().as_secs_f64().max(1e-9);
        let summary = Summary {
            pipeline: "segment",
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
        eprintln!("{}", job::describe(&summary.stats, elapsed));
        eprintln!("summary: {}", path.display());
    }
    Ok(())
}
