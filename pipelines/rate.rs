//! `backflow run rate`: rate an existing instruction dataset with a given model, the paper's
//! self-curation on its own. A small pipeline that shows how to write one:
//!
//! ```text
//! dataset (worker 0, epochs of --epoch-size pairs) -> exchange -> rate -> curate -> write
//!                                                                  \-> write ratings
//! ```

use super::harness;
use crate::cli::flags::{JobFlags, RatingFlags, ServerFlags};
use crate::operators::curate::curate;
use crate::operators::model_call::Backlog;
use crate::operators::rate::{rate, RateJob};
use crate::operators::write_jsonl::{epoch_files, write_jsonl};
use crate::operators::{Time, WorkerStats};
use crate::output::{atomic_write, count_jsonl_rows, jsonl_files, CuratedLine, RatingLine};
use crate::progress::{Progress, Reporter};
use crate::records::Candidate;
use crate::run_records::{ProcessThroughput, RateSummary, ScoreHistogram, StageThroughput};
use crate::serve::ModelServer;
use crate::stats::Stats;
use crate::train::data::{read_records, DataStats, Record};
use anyhow::{bail, Context, Result};
use clap::Parser;
use std::cell::RefCell;
use std::ffi::OsString;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::source;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::{Operator, Probe};
use timely::dataflow::{ProbeHandle, StreamVec};

/// `backflow run rate`: rate (instruction, output) pairs with a model.
#[derive(Parser, Debug, Clone)]
#[command(name = "backflow run rate", disable_help_flag = true)]
pub struct RateArgs {
    /// The dataset: Alpaca JSON/JSONL, Self-Instruct seed tasks or ChatML conversations.
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// The rating model: GGUF file, Hugging Face folder or LoRA adapter folder.
    #[arg(long, value_name = "PATH", env = "BACKFLOW_MODEL")]
    pub model: PathBuf,
    /// Output folder: `ratings-*.jsonl`, `curated-*.jsonl` (Alpaca format) and `summary.json`.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// How pairs are rated and which are curated (shared with `run humpback`).
    #[command(flatten)]
    pub rating: RatingFlags,
    /// Rate only the first N pairs.
    #[arg(value_parser = crate::cli::values::at_least_one, long)]
    pub limit: Option<usize>,
    /// Pairs per epoch.
    #[arg(value_parser = crate::cli::values::at_least_one, long, default_value_t = 32)]
    pub epoch_size: usize,
    /// The model server (shared with `run humpback`).
    #[command(flatten)]
    pub server: ServerFlags,
    /// The processes and threads of the job, and its output on the terminal.
    #[command(flatten)]
    pub job: JobFlags,
}

/// Entry point for `backflow run rate`.
pub fn main(argv: Vec<OsString>) -> Result<()> {
    run(RateArgs::try_parse_from(argv)?)
}

/// Runs the job.
pub fn run(args: RateArgs) -> Result<()> {
    let config = args.job.cluster.timely_config()?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut data_stats = DataStats::default();
    let mut records = read_records(&args.data, &mut data_stats)?;
    records.truncate(args.limit.unwrap_or(usize::MAX));
    let file = args.data.to_string_lossy().into_owned();
    let candidates: Vec<Candidate> = records
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match r {
            Record::Pair {
                instruction,
                output,
            } => Some(Candidate::given(&file, i as u64, instruction, output)),
            Record::Chat(m) => {
                let user = m
                    .iter()
                    .find(|m| m.role == crate::model::chat::Role::User)?;
                let bot = m
                    .iter()
                    .find(|m| m.role == crate::model::chat::Role::Assistant)?;
                Some(Candidate::given(
                    &file,
                    i as u64,
                    &user.content,
                    &bot.content,
                ))
            }
        })
        .collect();
    if candidates.is_empty() {
        bail!("no (instruction, output) pairs in {}", args.data.display());
    }

    let server = ModelServer::start(args.server.config(None));
    let version = args.model.to_string_lossy().into_owned();
    let t0 = Instant::now();
    server.load(&version, &args.model)?;
    log::info!(
        "loaded {} in {:.1}s",
        args.model.display(),
        t0.elapsed().as_secs_f64()
    );
    let client = server.client()?;
    let progress = Arc::new(Progress::default());
    let reporter = Reporter::start("rate", progress.clone(), 0, args.job.quiet);
    let started = Instant::now();
    let (out, process, epoch_size) = (args.out.clone(), args.job.cluster.process, args.epoch_size);
    let rate_options = args.rating.rate_options(0);
    let curate_options = args.rating.curate_options();
    let worker_progress = progress.clone();
    let stop = harness::stop_flag();
    let rating_version = version.clone();

    let guards = args
        .job
        .cluster
        .execute(config, move |worker| {
            let stats: WorkerStats = Rc::new(RefCell::new(Stats::default()));
            let probe: ProbeHandle<Time> = ProbeHandle::new();
            let model = version.clone();
            let progress = worker_progress.clone();
            worker.dataflow::<Time, _, _>(|scope| {
                let pairs = dataset(
                    scope,
                    candidates.clone(),
                    epoch_size,
                    probe.clone(),
                    stop.clone(),
                )
                .unary(
                    Exchange::new(|c: &Candidate| c.passage.id),
                    "Spread",
                    |_, _| {
                        |input, output| {
                            input.for_each_stamp(|cap, data| {
                                output.session(&cap).give_containers(data)
                            })
                        }
                    },
                );
                let jobs = pairs.map(move |candidate| RateJob {
                    candidate,
                    model: model.clone(),
                });
                let ratings = rate(
                    jobs,
                    client.clone(),
                    rate_options.clone(),
                    stats.clone(),
                    Backlog::default(),
                );
                let curated = curate(ratings.clone(), curate_options.clone(), stats.clone());
                let files = epoch_files(out.clone(), "ratings", process);
                write_jsonl(ratings, files, progress.clone(), |r, out| {
                    serde_json::to_writer(out, &RatingLine::from(r))
                })
                .probe_with(&probe);
                let files = epoch_files(out.clone(), "curated", process);
                write_jsonl(curated, files, progress.clone(), |r, out| {
                    serde_json::to_writer(out, &CuratedLine::from(r))
                })
                .probe_with(&probe);
            });
            harness::run_worker(worker, &probe, &stop, &progress, &stats)
        })
        .map_err(|e| anyhow::anyhow!("starting the timely job: {e}"))?;
    let merged = harness::finish(guards, &progress);
    drop(reporter);
    let merged = merged?;
    if let Some(stats) = merged {
        let elapsed = started.elapsed().as_secs_f64().max(1e-9);
        let s = server.stats();
        let (requests, prompt, new) = (
            s.requests.load(Ordering::Relaxed),
            s.prompt_tokens.load(Ordering::Relaxed),
            s.new_tokens.load(Ordering::Relaxed),
        );
        // Every count from the rows on disk: the summary describes the files.
        let written = WrittenRows::read(&args.out)?;
        let histogram = &written.score_histogram.0;
        let summary = RateSummary {
            pipeline: "rate".into(),
            model: args.model.clone(),
            pairs: data_stats.records.min(args.limit.unwrap_or(usize::MAX)),
            threshold: args.rating.threshold,
            elapsed_secs: elapsed,
            score_histogram: written.score_histogram.clone(),
            rated: written.ratings,
            curated: written.curated,
            model_server: StageThroughput::from_stats(
                &server.stats().version(&rating_version),
                elapsed,
            ),
            this_process: ProcessThroughput {
                requests,
                prompt_tokens: prompt,
                new_tokens: new,
                prompts_per_sec: requests as f64 / elapsed,
                generated_tokens_per_sec: new as f64 / elapsed,
            },
            stats,
        };
        atomic_write(&args.out.join("summary.json"), |f| {
            Ok(serde_json::to_writer_pretty(f, &summary)?)
        })?;
        eprintln!(
            "rated {} pairs in {elapsed:.1}s ({:.2} prompts/s); scores {histogram:?}; unparsed {}; \
             curated {}",
            written.ratings,
            requests as f64 / elapsed,
            summary.stats.dropped(crate::stats::DropReason::RatingUnparsed),
            written.curated
        );
    }
    Ok(())
}

/// The dataset as a source on worker 0: `epoch_size` pairs per epoch, at most two epochs ahead of
/// the probe; no new epoch once `stop` is set (Ctrl-C, a fatal error): the epochs in flight are
/// rated and written.
fn dataset<'s>(
    scope: timely::dataflow::Scope<'s, Time>,
    candidates: Vec<Candidate>,
    epoch_size: usize,
    probe: ProbeHandle<Time>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> StreamVec<'s, Time, Candidate> {
    let leader = scope.index() == 0;
    source(scope, "Dataset", move |cap, info| {
        let activator = scope.activator_for(info.address);
        let mut cap = leader.then_some(cap);
        let mut chunks = candidates
            .chunks(epoch_size)
            .map(<[Candidate]>::to_vec)
            .collect::<Vec<_>>()
            .into_iter();
        let mut epoch: Time = 0;
        move |output| {
            let Some(c) = cap.as_mut() else { return };
            if stop.load(Ordering::SeqCst) {
                log::info!("rate: stop requested, finishing the pairs in flight");
                cap = None;
                return;
            }
            if epoch >= 2 && probe.less_than(&(epoch - 1)) {
                activator.activate_after(Duration::from_millis(5));
                return;
            }
            match chunks.next() {
                Some(chunk) => {
                    c.downgrade(&epoch);
                    output.session(&*c).give_iterator(chunk.into_iter());
                    epoch += 1;
                    c.downgrade(&epoch);
                    activator.activate();
                }
                None => cap = None,
            }
        }
    })
}

/// What the histogram reads of a `ratings-*.jsonl` row.
#[derive(serde::Deserialize)]
struct ScoredRow {
    score: Option<f64>,
}

/// What the job wrote, counted from its files (the summary reports what is on disk).
struct WrittenRows {
    /// Rows of `ratings-*.jsonl` by score.
    score_histogram: ScoreHistogram,
    /// Rows of `ratings-*.jsonl`.
    ratings: u64,
    /// Rows of `curated-*.jsonl`.
    curated: u64,
}

impl WrittenRows {
    fn read(out: &std::path::Path) -> Result<WrittenRows> {
        let mut rows = WrittenRows {
            score_histogram: ScoreHistogram::default(),
            ratings: 0,
            curated: 0,
        };
        for path in jsonl_files(out, "ratings-")? {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading back {}", path.display()))?;
            for line in text.lines() {
                let row: ScoredRow = serde_json::from_str(line)
                    .with_context(|| format!("reading back {}", path.display()))?;
                rows.score_histogram.add(row.score);
                rows.ratings += 1;
            }
        }
        rows.curated = count_jsonl_rows(out, "curated-")
            .with_context(|| format!("reading back the curated rows in {}", out.display()))?;
        Ok(rows)
    }
}
