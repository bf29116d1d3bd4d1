//! `backflow run humpback`: instruction backtranslation (Li et al., "Self-Alignment with
//! Instruction Backtranslation") as one streaming dataflow, round after round.
//!
//! ```text
//! step 0 (process 0, before the dataflow): M_yx <- seed reversed, M_0 <- seed   (or given)
//!
//! discover -> read -> extract -> segment -> dedup/keep -> limit -> await M_yx -> augment
//!   -> candidates -> rerate (store; every round's M_r rates them all) -> rate -> curate
//!   -> train_sink (worker 0: M_{r+1} <- base on seed (S_a) + curated (S_w))
//!   -> feedback edge: ModelUpdate broadcast to every worker -> rerate ...
//! ```
//!
//! Round `r` owns a span of dataflow time (see `humpback::rounds`): ratings of round `r` are made
//! by `M_r`, and the sink trains `M_{r+1}` once round `r`'s frontier has passed, so "the round's
//! curated set is complete" is a frontier, not a guess.

mod setup;

use self::setup::{
    evaluate_base, evaluate_m0, loop_evaluator, read_seed, show_model_answers, step0, throughput,
    train_template,
};
use super::harness;
use super::ingest::{ingest, Ingest, IngestFlags, IngestOptions};
use crate::cli::flags::{AugmentFlags, JobFlags, RatingFlags, ServerFlags, TrainFlags};
use crate::formats;
use crate::humpback::assets::{or_default, MODEL, PAGES, SEED};
use crate::humpback::rounds::{install, round_of, Installer, ModelBook, ModelUpdate};
use crate::ingest_log;
use crate::operators::augment::{augment, AugmentOptions};
use crate::operators::await_model::await_model;
use crate::operators::curate::{curate, CurateOptions};
use crate::operators::discover::{DiscoverConfig, WorkItem};
use crate::operators::limit::limit;
use crate::operators::model_call::Backlog;
use crate::operators::rate::{rate, RateOptions};
use crate::operators::rerate::rerate;
use crate::operators::train_sink::{train_sink, RatingMark, SinkConfig, SinkOutput};
use crate::operators::write::{write, WriteTarget};
use crate::operators::write_jsonl::{write_jsonl, JsonlFiles, Tally};
use crate::operators::{Time, WorkerStats};
use crate::output::{atomic_write, CandidateLine, CuratedLine, RatingLine};
use crate::progress::{Progress, Reporter};
use crate::run_records::{HumpbackMetrics, RoundSummary, Step0Summary};
use crate::serve::ModelServer;
use crate::stats::Stats;
use crate::train::data::Record;
use crate::train::TrainJob;
use anyhow::{bail, Context, Result};
use clap::Parser;
use std::cell::RefCell;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use timely::dataflow::operators::capture::Event;
use timely::dataflow::operators::vec::{Broadcast, Map};
use timely::dataflow::operators::{
    Capture, Concat, ConnectLoop, Exchange, Feedback, Probe, ToStream,
};
use timely::dataflow::{ProbeHandle, StreamVec};

/// `backflow run humpback`: the whole method, from crawl dumps and a seed set to curated data and
/// checkpoints.
#[derive(Parser, Debug, Clone)]
#[command(name = "backflow run humpback", disable_help_flag = true)]
pub struct HumpbackArgs {
    /// Crawl dumps: WARC/WET, JSONL or HTML files, folders or globs (default: the cached sample
    /// of real pages fetched by scripts/fetch-assets.sh).
    #[arg(long, value_name = "PATH", num_args = 1..)]
    pub corpus: Vec<String>,
    /// Seed data (Self-Instruct seed tasks, Alpaca or conversations; default: the cached seed tasks).
    #[arg(long, value_name = "FILE")]
    pub seed: Option<PathBuf>,
    /// Base model, GGUF or HF folder (default: the cached SmolLM2-135M-Instruct GGUF).
    #[arg(long, value_name = "PATH", env = "BACKFLOW_MODEL")]
    pub model: Option<PathBuf>,
    /// Output folder.
    #[arg(long, value_name = "DIR", default_value = "humpback-out")]
    pub out: PathBuf,
    /// Rounds of self-curation (the paper: 2). With --follow, at least this many, then one more
    /// per batch of new dumps, until Ctrl-C.
    #[arg(long, default_value_t = 2)]
    pub rounds: u64,
    /// Take at most this many passages.
    #[arg(value_parser = crate::cli::values::at_least_one, long)]
    pub limit: Option<usize>,
    /// Watch this folder for new complete dumps; each batch of new dumps opens a new round.
    #[arg(long, value_name = "DIR")]
    pub follow: Option<PathBuf>,
    /// Use this backward model M_yx instead of training it from the seed.
    #[arg(long, value_name = "PATH")]
    pub backward_model: Option<PathBuf>,
    /// Use this seed model M_0 instead of training it from the seed.
    #[arg(long, value_name = "PATH")]
    pub seed_model: Option<PathBuf>,
    /// Optimizer steps of each training (step 0 and every round).
    #[arg(value_parser = crate::cli::values::at_least_one, long, default_value_t = 24)]
    pub train_steps: usize,
    /// LoRA rank of every training.
    #[arg(value_parser = crate::cli::values::at_least_one, long, default_value_t = 8)]
    pub lora_rank: usize,
    /// How M_yx writes instructions (shared with `run augment`).
    #[command(flatten)]
    pub augment: AugmentFlags,
    /// Seed of sampling, data order and LoRA initialisation (`--seed` is the seed data here).
    #[arg(long, default_value_t = 0)]
    pub random_seed: u64,
    /// The optimisation knobs of every training (shared with `backflow train`).
    #[command(flatten)]
    pub train: TrainFlags,
    /// How candidates are rated and which are curated (shared with `run rate`).
    #[command(flatten)]
    pub rating: RatingFlags,
    /// The model server (shared with `run rate`).
    #[command(flatten)]
    pub server: ServerFlags,
    /// How dumps become passages (shared with `segment`).
    #[command(flatten)]
    pub ingest: IngestFlags,
    /// Evaluate every forward model as it is trained (M_0, M_1, ...) on these prompts (JSON or
    /// JSONL rows with `instruction`, optional `input` and reference `output`): reference NLL,
    /// and with --judge the win rate against M_0. Figures in metrics.json and the report.
    #[arg(long, value_name = "FILE", conflicts_with = "eval_holdout")]
    pub eval_prompts: Option<PathBuf>,
    /// Hold out the last N seed pairs from every training and evaluate on them (as
    /// --eval-prompts would): the reference NLL of each round's model needs no extra model.
    #[arg(long, value_name = "N")]
    pub eval_holdout: Option<usize>,
    /// Judge model for the in-loop win rates against M_0 (e.g. a Qwen2.5 1.5B Instruct GGUF).
    #[arg(long, value_name = "PATH")]
    pub judge: Option<PathBuf>,
    /// How the judge's two orders make a verdict (see `backflow eval --help`).
    #[arg(long, value_enum, default_value_t = crate::eval::run::JudgeRule::Prob)]
    pub judge_rule: crate::eval::run::JudgeRule,
    /// The judge prompt (see `backflow eval --help`).
    #[arg(long, value_enum, default_value_t = crate::eval::judge::JudgePrompt::AlpacaEval)]
    pub judge_prompt: crate::eval::judge::JudgePrompt,
    /// A selector dev set (`backflow selector-devset`): each model's precision and recall.
    #[arg(long, value_name = "FILE")]
    pub selector_dev: Option<PathBuf>,
    /// Most tokens of each evaluation answer (with --judge).
    #[arg(value_parser = crate::cli::values::at_least_one, long, default_value_t = 128)]
    pub eval_max_tokens: usize,
    /// The processes and threads of the job, and its output on the terminal.
    #[command(flatten)]
    pub job: JobFlags,
}

/// Entry point for `backflow run humpback`.
pub fn main(argv: Vec<OsString>) -> Result<()> {
    run(HumpbackArgs::try_parse_from(argv)?)
}

/// The dataflow of one worker: the method, operator by operator.
fn humpback<'s>(scope: timely::dataflow::Scope<'s, Time>, job: &Job, w: Worker) {
    let files = RoundFiles {
        out: job.out.clone(),
        process: job.process,
        progress: w.progress.clone(),
        done: w.done_probe.clone(),
    };
    let (client, stats) = (&w.installer.client, &w.stats);

    // Model versions: step 0's at time 0, each round's from the training sink (feedback edge).
    let (feedback, new_models) = scope.feedback::<Vec<ModelUpdate>>(1);
    let updates = (w.step0.to_stream(scope).container::<Vec<_>>())
        .concat(new_models)
        .broadcast();

    // Ingest: crawl dumps to deduplicated, self-contained passages.
    let no_callback = Box::new(|_: &WorkItem| {});
    let mut passages = ingest(
        scope,
        &job.ingest,
        no_callback,
        &w.ingest_probe,
        stats,
        &w.progress,
    );
    if let Some(n) = job.limit {
        let reached = job.ingest.discover.limit_reached.clone();
        passages = limit(passages, n, reached, stats.clone());
    }
    let passages = passages.exchange(|p| p.id);
    let target = WriteTarget {
        dir: job.out.clone(),
        name: round_file_name("passages"),
        process: job.process,
    };
    write(passages.clone(), target, stats.clone(), w.progress.clone()).probe_with(&w.done_probe);

    // Step 1, self-augmentation: M_yx writes an instruction for every passage.
    let passages = await_model(passages, updates.clone(), w.installer.clone());
    let book = w.installer.book.clone();
    let candidates = augment(
        passages,
        client.clone(),
        book,
        job.augment.clone(),
        stats.clone(),
    );
    files
        .write(&candidates, "candidates", |x, out| {
            serde_json::to_writer(out, &CandidateLine::from(x))
        })
        .probe_with(&w.ingest_probe);

    // Step 2, self-curation: the round's model rates every candidate; the best are kept.
    // Every candidate is kept on disk (re-rated each round), read back as the rater keeps up.
    let backlog = Backlog::default();
    let store = (job.out.join("_spill")).join(format!(
        "candidates-p{}-w{}.bin",
        job.process,
        scope.index()
    ));
    let jobs = rerate(
        candidates,
        updates,
        w.installer.clone(),
        store,
        backlog.clone(),
    );
    let ratings = rate(
        jobs,
        client.clone(),
        job.rate.clone(),
        stats.clone(),
        backlog,
    );
    files.write(&ratings, "ratings", |x, out| {
        serde_json::to_writer(out, &RatingLine::from(x))
    });
    let marks = ratings.clone().map(|r| RatingMark::of(&r));
    let curated = curate(ratings, job.curate.clone(), stats.clone());
    files.write(&curated, "curated", |x, out| {
        serde_json::to_writer(out, &CuratedLine::from(x))
    });

    // Training: M_{r+1} from the base on seed + curated, back into the loop.
    let sink = train_sink(curated, marks, job.sink_config(&w.progress));
    let models = sink.clone().flat_map(|o| match o {
        SinkOutput::Model(update) => Some(update),
        SinkOutput::Round(_) => None,
    });
    models.connect_loop(feedback);
    let summaries = sink.flat_map(|o| match o {
        SinkOutput::Round(summary) => Some(*summary),
        SinkOutput::Model(_) => None,
    });
    summaries.capture_into(w.rounds);
}

/// One worker's share of the run: its counters, probes, models and where round summaries go.
struct Worker {
    stats: WorkerStats,
    progress: Arc<Progress>,
    /// Paces reading: a file runs ahead of its candidates by a few chunks at most.
    ingest_probe: ProbeHandle<Time>,
    /// Every file written: the run is over when it passes everything.
    done_probe: ProbeHandle<Time>,
    installer: Installer,
    /// Step 0's models (worker 0 of process 0 only).
    step0: Vec<ModelUpdate>,
    rounds: mpsc::Sender<Event<Time, Vec<RoundSummary>>>,
}

/// Where a round's records go: `DIR/{kind}-r{round}-e{epoch}-p{process}-w{worker}.jsonl`,
/// each file watched by the run's done probe.
struct RoundFiles {
    out: PathBuf,
    process: usize,
    progress: Arc<Progress>,
    done: ProbeHandle<Time>,
}

impl RoundFiles {
    /// Writes `records` of `kind` (counted under that name), each as the line `to_line` writes;
    /// returns `(epoch, rows)` per file.
    fn write<'s, D: Clone + 'static>(
        &self,
        records: &StreamVec<'s, Time, D>,
        kind: &'static str,
        to_line: impl Fn(&D, &mut dyn std::io::Write) -> serde_json::Result<()> + 'static,
    ) -> StreamVec<'s, Time, (Time, u64)> {
        let files = JsonlFiles {
            dir: self.out.clone(),
            name: round_file_name(kind),
            process: self.process,
            tally: Tally::Rows(kind),
        };
        write_jsonl(records.clone(), files, self.progress.clone(), to_line).probe_with(&self.done)
    }
}

/// The file name of an epoch's records of `kind`: `{kind}-r{round}-e{epoch}`.
fn round_file_name(kind: &'static str) -> impl Fn(Time) -> String + Clone {
    move |t| format!("{kind}-r{:02}-e{t:016x}", round_of(t) + 1)
}

/// Everything a worker needs to build its dataflow (cloned into every worker).
#[derive(Clone)]
struct Job {
    out: PathBuf,
    process: usize,
    limit: Option<usize>,
    stop: Arc<AtomicBool>,
    ingest: Ingest,
    augment: AugmentOptions,
    rate: RateOptions,
    curate: CurateOptions,
    rounds: u64,
    train: TrainJob,
    seed: Vec<Record>,
    evaluator: Option<Arc<crate::eval::rounds::LoopEval>>,
}

impl Job {
    fn sink_config(&self, progress: &Arc<Progress>) -> SinkConfig {
        SinkConfig {
            rounds: self.rounds,
            follow: self.ingest.discover.follow.is_some(),
            limit_reached: self.ingest.discover.limit_reached.clone(),
            template: self.train.clone(),
            seed: self.seed.clone(),
            checkpoints: self.out.join("checkpoints"),
            stop: self.stop.clone(),
            progress: progress.clone(),
            evaluator: self.evaluator.clone(),
        }
    }
}

/// What the flags name, checked before anything runs: the base model, the seed (split into
/// training and held-out pairs), the input files and the training every model gets.
struct Inputs {
    base: PathBuf,
    seed_path: PathBuf,
    seed: Vec<Record>,
    held_out: Vec<Record>,
    files: Vec<formats::InputFile>,
    ingest: IngestOptions,
    train: TrainJob,
}

impl Inputs {
    fn read(args: &HumpbackArgs) -> Result<Inputs> {
        let base = or_default(args.model.clone(), MODEL, "--model")?;
        let seed_path = or_default(args.seed.clone(), SEED, "--seed")?;
        let corpus = if args.corpus.is_empty() && args.follow.is_none() {
            vec![or_default(None, PAGES, "--corpus")?
                .to_string_lossy()
                .into_owned()]
        } else {
            args.corpus.clone()
        };
        if args.rounds == 0 {
            bail!("--rounds must be at least 1");
        }
        let ingest = args.ingest.options()?;
        let train = train_template(args, &base);
        train
            .validate()
            .context("the training flags (--lr, --lora-rank, --train-steps, --batch-size)")?;
        let files = formats::expand_inputs(&corpus)?;
        if files.is_empty() && args.follow.is_none() {
            bail!("no input files found in {corpus:?}");
        }
        let (seed, held_out) = read_seed(&seed_path, args.eval_holdout)?;
        Ok(Inputs {
            base,
            seed_path,
            seed,
            held_out,
            files,
            ingest,
            train,
        })
    }
}

/// The ingest subgraph's settings: the flags' options, and with `--follow` the files an
/// earlier run of this job took, first, each at the index it had (so in the same round): the
/// restart recomputes them (answers from the cache) and no passage lands in two rounds' files.
fn ingest_config(
    args: &HumpbackArgs,
    files: Vec<formats::InputFile>,
    options: IngestOptions,
    process: usize,
    stop: &Arc<AtomicBool>,
) -> Result<Ingest> {
    let following = args.follow.is_some();
    let replay = if following && process == 0 {
        ingest_log::still_readable(ingest_log::IngestState::new(&args.out).load_indexed()?)
    } else {
        Vec::new()
    };
    Ok(Ingest {
        options,
        discover: DiscoverConfig {
            inputs: files,
            follow: ingest_log::follow_dir(args.follow.as_deref())?,
            poll: Duration::from_millis(500),
            max_open_files: args.ingest.max_open_files,
            already_ingested: Default::default(),
            first_index: 0,
            limit_reached: Arc::new(AtomicBool::new(false)),
            replay,
            assignments: following.then(|| ingest_log::IngestState::new(&args.out)),
            files_per_round: following.then_some(crate::humpback::rounds::FILES_PER_ROUND),
        },
        written_before: Vec::new(),
        stop: stop.clone(),
    })
}

/// Runs the job: step 0 and M_0's evaluation (process 0), the dataflow on every worker, then
/// `metrics.json` and the report (process 0).
pub fn run(args: HumpbackArgs) -> Result<()> {
    let started = Instant::now();
    let config = args.job.cluster.timely_config()?;
    let Inputs {
        base,
        seed_path,
        seed,
        held_out,
        files,
        ingest: ingest_options,
        train,
    } = Inputs::read(&args)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;

    let process = args.job.cluster.process;
    let cache = args
        .out
        .join("_cache")
        .join(format!("answers-p{process:03}.bin"));
    let server = ModelServer::start(args.server.config(Some(cache)));
    let client = server.client()?;
    let models_dir = args.out.join("_models");

    // Step 0 on process 0; the other processes receive its models along the dataflow.
    let (step0_updates, mut step0_summary) = if process == 0 {
        let (updates, summary) = step0(&args, &train, &seed)?;
        for u in &updates {
            install(u, &client, &models_dir, &base)?;
        }
        (updates, summary)
    } else {
        (Vec::new(), Step0Summary::default())
    };
    // Evaluation of each forward model (process 0, where the sink trains), M_0 first, then the
    // base model against it.
    let evaluator = if process == 0 {
        loop_evaluator(&args, &held_out, client.clone())?
    } else {
        None
    };
    if let Some(ev) = &evaluator {
        step0_summary.evaluation = evaluate_m0(ev, &step0_updates);
        step0_summary.base = evaluate_base(ev, &base, &step0_updates);
    }

    let stop = harness::stop_flag();
    let progress = Arc::new(Progress::default());
    let job = Job {
        out: args.out.clone(),
        process,
        limit: args.limit,
        stop: stop.clone(),
        ingest: ingest_config(&args, files, ingest_options, process, &stop)?,
        augment: args.augment.options(args.random_seed),
        rate: args.rating.rate_options(args.random_seed),
        curate: args.rating.curate_options(),
        rounds: args.rounds,
        train,
        seed,
        evaluator: evaluator.map(Arc::new),
    };
    let reporter = Reporter::start("humpback", progress.clone(), 0, args.job.quiet);
    let _answers = show_model_answers(server.shared_stats(), progress.clone());
    let worker_progress = progress.clone();
    let loop_started = Instant::now();
    let (rounds_tx, rounds_rx) = mpsc::channel();
    let base_for_workers = base.clone();
    let guards = args
        .job
        .cluster
        .execute(config, move |worker| {
            let w = Worker {
                stats: Rc::new(RefCell::new(Stats::default())),
                progress: worker_progress.clone(),
                ingest_probe: ProbeHandle::new(),
                done_probe: ProbeHandle::new(),
                installer: Installer {
                    client: client.clone(),
                    models_dir: models_dir.clone(),
                    base: base_for_workers.clone(),
                    book: Rc::new(RefCell::new(ModelBook::default())),
                    progress: worker_progress.clone(),
                },
                step0: if worker.index() == 0 {
                    step0_updates.clone()
                } else {
                    Vec::new()
                },
                rounds: rounds_tx.clone(),
            };
            let (stats, done_probe) = (w.stats.clone(), w.done_probe.clone());
            worker.dataflow::<Time, _, _>(|scope| humpback(scope, &job, w));
            harness::run_worker(worker, &done_probe, &job.stop, &worker_progress, &stats)
        })
        .map_err(|e| anyhow::anyhow!("starting the timely job: {e}"))?;
    let merged = harness::finish(guards, &progress);
    drop(reporter);
    let Some(stats) = merged? else { return Ok(()) };

    // Metrics and report (process 0).
    let elapsed = started.elapsed().as_secs_f64();
    let loop_secs = loop_started.elapsed().as_secs_f64().max(1e-9);
    let mut rounds: Vec<RoundSummary> = (rounds_rx.try_iter())
        .filter_map(|event| match event {
            Event::Messages(_, summaries) => Some(summaries),
            Event::Progress(_) => None,
        })
        .flatten()
        .collect();
    rounds.sort_by_key(|r| r.round);
    let passages = stats.passages_written;
    let metrics = HumpbackMetrics {
        pipeline: "humpback".into(),
        model: base,
        seed: seed_path,
        elapsed_secs: elapsed,
        loop_secs,
        passages,
        passages_per_hour: passages as f64 / elapsed.max(1e-9) * 3600.0,
        throughput: throughput(&server, &step0_summary, &rounds, loop_secs),
        step0: step0_summary,
        rounds,
        dropped: stats
            .dropped
            .iter()
            .map(|(r, s)| (r.as_str().to_owned(), s.count))
            .collect(),
        peak_rss_mb: crate::stats::peak_rss_mb(),
        stats,
    };
    write_metrics(&args.out, &metrics, elapsed)?;
    // The curated sets as a dataset folder (Parquet + card) that `datasets` and the hub load:
    // from the curated files in this process's output folder.
    let folder = args.out.join("dataset");
    match crate::dataset::write_dataset(&args.out, &folder) {
        Ok(s) => {
            let rows: Vec<String> = s.rounds.iter().map(|(r, n)| format!("r{r}: {n}")).collect();
            eprintln!(
                "dataset: {} (curated rows {}; datasets.load_dataset loads the last round)",
                folder.display(),
                rows.join(", ")
            );
            Ok(())
        }
        Err(crate::dataset::DatasetError::NoCurated(_)) => Ok(()),
        Err(e) => Err(anyhow::Error::new(e).context("writing the dataset folder")),
    }
}

/// Writes `metrics.json` and the report, and says where they are.
fn write_metrics(out: &Path, metrics: &HumpbackMetrics, elapsed: f64) -> Result<()> {
    let path = out.join("metrics.json");
    atomic_write(&path, |f| Ok(serde_json::to_writer_pretty(f, metrics)?))?;
    let report = crate::report::write_report(out, metrics)?;
    eprintln!("{}", harness::describe(&metrics.stats, elapsed));
    eprintln!("metrics: {}  report: {}", path.display(), report.display());
    Ok(())
}
