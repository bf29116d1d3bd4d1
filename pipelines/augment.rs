//! `backflow run augment`: the paper's self-augmentation on its own. Crawl dumps become
//! passages, and a backward model M_yx (a GGUF, Hugging Face folder or adapter folder, such as
//! a Humpback run's `models/backward`) writes the instruction each passage answers:
//!
//! ```text
//! ingest (discover -> read -> extract -> segment -> dedup -> keep) -> limit -> augment -> write
//! ```
//!
//! The candidates (`candidates-*.jsonl`, as `run humpback` writes them) are what `run rate`
//! or a training reads next. Answers are cached in the output folder, so a run killed and
//! started again generates nothing twice.

use super::harness;
use super::ingest::{ingest, Ingest, IngestFlags};
use crate::cli::flags::{AugmentFlags, JobFlags, ServerFlags};
use crate::formats;
use crate::humpback::rounds::ModelBook;
use crate::operators::augment::augment;
use crate::operators::discover::{DiscoverConfig, WorkItem};
use crate::operators::limit::limit;
use crate::operators::write_jsonl::{epoch_files, write_jsonl};
use crate::operators::Time;
use crate::output::{atomic_write, count_jsonl_rows, CandidateLine};
use crate::progress::{Progress, Reporter};
use crate::run_records::{AugmentSummary, ProcessThroughput, StageThroughput};
use crate::serve::ModelServer;
use crate::stats::{DropReason, Stats};
use anyhow::{bail, Context, Result};
use clap::Parser;
use std::cell::RefCell;
use std::ffi::OsString;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use timely::dataflow::operators::{Exchange, Probe};
use timely::dataflow::ProbeHandle;

/// `backflow run augment`: an instruction for every passage of crawl dumps.
#[derive(Parser, Debug, Clone)]
#[command(name = "backflow run augment", disable_help_flag = true)]
pub struct AugmentArgs {
    /// Input files, folders (read recursively) or glob patterns: WARC/WET (.warc, .warc.gz,
    /// .wet.gz), JSONL (.jsonl, .jsonl.gz) with a text field, or .html pages.
    #[arg(value_name = "INPUT", required = true)]
    pub inputs: Vec<String>,
    /// The backward model M_yx: GGUF file, Hugging Face folder or LoRA adapter folder.
    #[arg(long, value_name = "PATH", env = "BACKFLOW_MODEL")]
    pub model: PathBuf,
    /// Output folder: `candidates-*.jsonl` and `summary.json`.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Take at most this many passages (the first, in a deterministic order).
    #[arg(value_parser = crate::cli::values::at_least_one, long)]
    pub limit: Option<usize>,
    /// Seed of sampling, mixed with each passage's id.
    #[arg(long, default_value_t = 0)]
    pub random_seed: u64,
    /// How M_yx writes instructions (shared with `run humpback`).
    #[command(flatten)]
    pub augment: AugmentFlags,
    /// How dumps become passages (shared with `segment` and `run humpback`).
    #[command(flatten)]
    pub ingest: IngestFlags,
    /// The model server (shared with `run rate` and `run humpback`).
    #[command(flatten)]
    pub server: ServerFlags,
    /// The processes and threads of the job, and its output on the terminal.
    #[command(flatten)]
    pub job: JobFlags,
}

/// Entry point for `backflow run augment`.
pub fn main(argv: Vec<OsString>) -> Result<()> {
    run(AugmentArgs::try_parse_from(argv)?)
}

/// Runs the job.
pub fn run(args: AugmentArgs) -> Result<()> {
    let options = args.ingest.options()?;
    let config = args.job.cluster.timely_config()?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating output folder {}", args.out.display()))?;
    let inputs = formats::expand_inputs(&args.inputs)?;
    if inputs.is_empty() {
        bail!("no input files found in {:?}", args.inputs);
    }
    let process = args.job.cluster.process;
    let cache = (args.out.join("_cache")).join(format!("answers-p{process:03}.bin"));
    let server = ModelServer::start(args.server.config(Some(cache)));
    let version = args.model.to_string_lossy().into_owned();
    let t0 = Instant::now();
    server.load(&version, &args.model)?;
    log::info!(
        "loaded {} in {:.1}s",
        args.model.display(),
        t0.elapsed().as_secs_f64()
    );
    let client = server.client()?;
    let stop = harness::stop_flag();
    let ingest_job = Ingest {
        options,
        discover: DiscoverConfig {
            inputs: inputs.clone(),
            follow: None,
            poll: Duration::from_millis(500),
            max_open_files: args.ingest.max_open_files,
            already_ingested: Default::default(),
            first_index: 0,
            limit_reached: Default::default(),
            replay: Vec::new(),
            assignments: None,
            files_per_round: None,
        },
        written_before: Vec::new(),
        stop: stop.clone(),
    };
    let total_bytes = if process == 0 && !inputs.iter().any(|f| formats::remote::is_url(&f.path)) {
        (inputs.iter())
            .filter_map(|f| std::fs::metadata(&f.path).ok())
            .map(|m| m.len())
            .sum()
    } else {
        0
    };
    let progress = Arc::new(Progress::default());
    let reporter = Reporter::start("augment", progress.clone(), total_bytes, args.job.quiet);
    let started = Instant::now();
    let (out, limit_to) = (args.out.clone(), args.limit);
    let augment_options = args.augment.options(args.random_seed);
    let worker_progress = progress.clone();
    let backward = version.clone();

    let guards = args
        .job
        .cluster
        .execute(config, move |worker| {
            let stats = Rc::new(RefCell::new(Stats::default()));
            let probe: ProbeHandle<Time> = ProbeHandle::new();
            let progress = worker_progress.clone();
            let book = Rc::new(RefCell::new(ModelBook {
                backward: Some(backward.clone()),
                ..ModelBook::default()
            }));
            worker.dataflow::<Time, _, _>(|scope| {
                let no_callback = Box::new(|_: &WorkItem| {});
                let mut passages =
                    ingest(scope, &ingest_job, no_callback, &probe, &stats, &progress);
                if let Some(n) = limit_to {
                    let reached = ingest_job.discover.limit_reached.clone();
                    passages = limit(passages, n, reached, stats.clone());
                }
                let passages = passages.exchange(|p| p.id);
                let candidates = augment(
                    passages,
                    client.clone(),
                    book,
                    augment_options.clone(),
                    stats.clone(),
                );
                let files = epoch_files(out.clone(), "candidates", process);
                write_jsonl(candidates, files, progress.clone(), |c, out| {
                    serde_json::to_writer(out, &CandidateLine::from(c))
                })
                .probe_with(&probe);
            });
            harness::run_worker(worker, &probe, &stop, &progress, &stats)
        })
        .map_err(|e| anyhow::anyhow!("starting the timely job: {e}"))?;
    let merged = harness::finish(guards, &progress);
    drop(reporter);
    let Some(stats) = merged? else {
        return Ok(());
    };
    let elapsed = started.elapsed().as_secs_f64().max(1e-9);
    let s = server.stats();
    let requests = s.requests.load(Ordering::Relaxed);
    let new_tokens = s.new_tokens.load(Ordering::Relaxed);
    // The count from the rows on disk: the summary describes the files.
    let candidates = count_jsonl_rows(&args.out, "candidates-")
        .with_context(|| format!("counting the candidates in {}", args.out.display()))?;
    let summary = AugmentSummary {
        pipeline: "augment".into(),
        model: args.model.clone(),
        elapsed_secs: elapsed,
        candidates,
        passages_per_hour: candidates as f64 * 3600.0 / elapsed,
        model_server: StageThroughput::from_stats(&s.version(&version), elapsed),
        this_process: ProcessThroughput {
            requests,
            prompt_tokens: s.prompt_tokens.load(Ordering::Relaxed),
            new_tokens,
            prompts_per_sec: requests as f64 / elapsed,
            generated_tokens_per_sec: new_tokens as f64 / elapsed,
        },
        stats,
    };
    let path = args.out.join("summary.json");
    atomic_write(&path, |f| Ok(serde_json::to_writer_pretty(f, &summary)?))?;
    eprintln!(
        "read {} files, {} records; {} passages made; {} candidates in {elapsed:.1}s ({:.0} passages/hour); augment failed {}; summary: {}",
        summary.stats.files,
        summary.stats.records_read,
        summary.stats.segments_made,
        summary.candidates,
        summary.passages_per_hour,
        summary.stats.dropped(DropReason::AugmentFailed),
        path.display()
    );
    Ok(())
}
