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

use crate::cluster::ClusterArgs;
use crate::formats::{self, ReadOptions};
use crate::humpback::rounds::{
    checkpoint_files, given_version, install, round_of, Installer, ModelBook, ModelRole,
    ModelUpdate,
};
use crate::model::Precision;
use crate::operators::augment::{augment, AugmentOptions};
use crate::operators::await_model::await_model;
use crate::operators::curate::{curate, CurateOptions};
use crate::operators::dedup::{dedup, DedupOptions};
use crate::operators::discover::{discover, DiscoverConfig};
use crate::operators::extract::extract;
use crate::operators::limit::limit;
use crate::operators::rate::{rate, RateOptions};
use crate::operators::read::{read, ReadPacing};
use crate::operators::rerate::rerate;
use crate::operators::segment::segment;
use crate::operators::train_sink::{train_sink, RatingMark, SinkConfig};
use crate::operators::write::keep;
use crate::operators::write_jsonl::write_jsonl;
use crate::operators::Time;
use crate::output::{atomic_write, candidate_line, curated_line, rating_line, PassageLine};
use crate::progress::{Progress, Reporter};
use crate::serve::{ModelServer, ServerConfig};
use crate::stats::Stats;
use crate::text::html::ExtractOptions;
use crate::text::segment::SegmentOptions;
use crate::train::data::{read_records, DataSource, DataStats, Record};
use crate::train::job::{run_job, DataGroup, TrainJob};
use crate::train::lora::LoraConfig;
use crate::train::model::TrainMode;
use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::json;
use std::cell::RefCell;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use timely::dataflow::operators::vec::{Broadcast, Map};
use timely::dataflow::operators::{
    Concat, ConnectLoop, Exchange, Feedback, Inspect, Probe, ToStream,
};
use timely::dataflow::ProbeHandle;

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
    /// Curate pairs whose (mean) score is at least this (the paper's A5: 5).
    #[arg(value_parser = crate::cli::values::score_threshold, long, default_value_t = 5.0)]
    pub threshold: f64,
    /// Curate by the graded score: the parsed `Score: N` where the model wrote one, else the
    /// expected value of its forced choice over 1..5 (G-Eval), instead of the forced pick. For
    /// models too small to write a score; pair it with a threshold such as 3.5.
    #[arg(long)]
    pub graded: bool,
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
    /// Examples per optimizer step.
    #[arg(value_parser = crate::cli::values::at_least_one, long, default_value_t = 8)]
    pub train_batch: usize,
    /// Most tokens of a training example (longer outputs are truncated).
    #[arg(value_parser = crate::cli::values::at_least_one, long, default_value_t = 384)]
    pub train_max_len: usize,
    /// LoRA rank of every training.
    #[arg(value_parser = crate::cli::values::at_least_one, long, default_value_t = 8)]
    pub lora_rank: usize,
    /// Peak learning rate (default: backflow train's LoRA default).
    #[arg(value_parser = crate::cli::values::learning_rate, long)]
    pub lr: Option<f64>,
    /// Sampling temperature of augmentation (paper: 0.7).
    #[arg(value_parser = crate::cli::values::temperature, long, default_value_t = 0.7)]
    pub temperature: f32,
    /// Nucleus mass of augmentation (paper: 0.9).
    #[arg(value_parser = crate::cli::values::top_p, long, default_value_t = 0.9)]
    pub top_p: f32,
    /// Most tokens of a generated instruction.
    #[arg(value_parser = crate::cli::values::at_least_one, long, default_value_t = 64)]
    pub augment_tokens: usize,
    /// Ratings per candidate (more than one are sampled and averaged).
    #[arg(value_parser = crate::cli::values::at_least_one, long, default_value_t = 1)]
    pub samples: usize,
    /// Most tokens of a rating answer.
    #[arg(value_parser = crate::cli::values::at_least_one, long, default_value_t = 128)]
    pub rate_tokens: usize,
    /// Seed of sampling, data order and LoRA initialisation.
    #[arg(long, default_value_t = 0)]
    pub random_seed: u64,
    /// Most sequences per model batch.
    #[arg(value_parser = crate::cli::values::at_least_one, long, default_value_t = 32)]
    pub max_batch: usize,
    /// Compute shared prompt prefixes once (the rating template); off for comparison.
    #[arg(long)]
    pub no_prefix_cache: bool,
    /// Float type the model server loads models in (training stays f32).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub dtype: Precision,
    /// Shortest passage in characters.
    #[arg(long, default_value_t = 600)]
    pub min_chars: usize,
    /// Longest passage in characters.
    #[arg(long, default_value_t = 3000)]
    pub max_chars: usize,
    /// Read scores only from the answers' `Score: N` lines (the paper's parse alone): no forced
    /// choice among 1..5 for answers without one.
    #[arg(long)]
    pub no_forced_score: bool,
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
    /// A selector dev set (`backflow selector-devset`): each model's precision and recall.
    #[arg(long, value_name = "FILE")]
    pub selector_dev: Option<PathBuf>,
    /// Most tokens of each evaluation answer (with --judge).
    #[arg(value_parser = crate::cli::values::at_least_one, long, default_value_t = 128)]
    pub eval_max_tokens: usize,
    /// Cluster flags (-w, -n, -p, -h).
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// No progress lines.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// Print help.
    #[arg(long, action = clap::ArgAction::Help)]
    pub help: Option<bool>,
}

/// Entry point for `backflow run humpback`.
pub fn main(argv: Vec<OsString>) -> Result<()> {
    run(HumpbackArgs::try_parse_from(argv)?)
}

/// The dataflow of one worker: the method, operator by operator.
#[allow(clippy::too_many_arguments)]
fn humpback<'s>(
    scope: timely::dataflow::Scope<'s, Time>,
    job: &Job,
    step0: Vec<ModelUpdate>,
    installer: Installer,
    stats: crate::operators::WorkerStats,
    progress: &Arc<Progress>,
    ingest_probe: &ProbeHandle<Time>,
    done_probe: &ProbeHandle<Time>,
) {
    let write =
        |kind: &'static str| move |t: Time| format!("{kind}-r{:02}-e{t:016x}", round_of(t) + 1);
    let (out, process) = (job.out.clone(), job.process);

    // Model versions: step 0's at time 0, each round's from the training sink (feedback edge).
    let (feedback, new_models) = scope.feedback::<Vec<ModelUpdate>>(1);
    let updates = step0
        .to_stream(scope)
        .container::<Vec<_>>()
        .concat(new_models)
        .broadcast();

    // Ingest: crawl dumps to deduplicated, self-contained passages.
    let items = discover(
        scope,
        job.discover.clone(),
        ingest_probe.clone(),
        job.stop.clone(),
        Box::new(|_| {}),
    );
    let records = read(
        items,
        ReadOptions::default(),
        ReadPacing::default(),
        ingest_probe.clone(),
        stats.clone(),
        progress.clone(),
    );
    let pages = extract(records, ExtractOptions::default(), stats.clone());
    let segments = segment(pages, job.segment.clone(), stats.clone());
    let verdicts = dedup(segments.clone(), None, DedupOptions::default())
        .expect("the default dedup options are valid");
    let mut passages = keep(segments, verdicts, stats.clone());
    if let Some(n) = job.limit {
        passages = limit(
            passages,
            n,
            job.discover.limit_reached.clone(),
            stats.clone(),
        );
    }
    let passages = passages.exchange(|p| p.id);
    write_jsonl(
        passages.clone(),
        out.clone(),
        write("passages"),
        process,
        progress.clone(),
        |p, out| serde_json::to_writer(out, &PassageLine::from(p)),
    )
    .inspect({
        let stats = stats.clone();
        move |(_, n)| stats.borrow_mut().passages_written += n
    })
    .probe_with(done_probe);

    // Step 1, self-augmentation: M_yx writes an instruction for every passage.
    let passages = await_model(passages, updates.clone(), installer.clone());
    let candidates = augment(
        passages,
        installer.client.clone(),
        installer.book.clone(),
        job.augment.clone(),
        stats.clone(),
    );
    write_jsonl(
        candidates.clone(),
        out.clone(),
        write("candidates"),
        process,
        progress.clone(),
        |x, out| serde_json::to_writer(out, &candidate_line(x)),
    )
    .probe_with(ingest_probe)
    .probe_with(done_probe);

    // Step 2, self-curation: the round's model rates every candidate; the best are kept.
    let jobs = rerate(candidates, updates, installer.clone());
    let ratings = rate(
        jobs,
        installer.client.clone(),
        job.rate.clone(),
        stats.clone(),
    );
    write_jsonl(
        ratings.clone(),
        out.clone(),
        write("ratings"),
        process,
        progress.clone(),
        |x, out| serde_json::to_writer(out, &rating_line(x)),
    )
    .probe_with(done_probe);
    let marks = ratings.clone().map(|r| RatingMark {
        score: r.score,
        forced: r
            .samples
            .iter()
            .any(|s| s.score.is_err() && s.forced.is_some()),
        model: r.model_version,
    });
    let curated = curate(ratings, job.curate.clone(), stats.clone());
    write_jsonl(
        curated.clone(),
        out.clone(),
        write("curated"),
        process,
        progress.clone(),
        |x, out| serde_json::to_writer(out, &curated_line(x)),
    )
    .probe_with(done_probe);

    // Training: M_{r+1} from the base on seed + curated, back into the loop.
    train_sink(curated, marks, job.sink_config(progress)).connect_loop(feedback);
}

/// Everything a worker needs to build its dataflow (cloned into every worker).
#[derive(Clone)]
struct Job {
    out: PathBuf,
    process: usize,
    limit: Option<usize>,
    stop: Arc<AtomicBool>,
    discover: DiscoverConfig,
    segment: SegmentOptions,
    augment: AugmentOptions,
    rate: RateOptions,
    curate: CurateOptions,
    rounds: u64,
    train: TrainJob,
    seed: Vec<Record>,
    rounds_done: Arc<Mutex<Vec<serde_json::Value>>>,
    evaluator: Option<Arc<crate::eval::rounds::LoopEval>>,
}

impl Job {
    fn sink_config(&self, progress: &Arc<Progress>) -> SinkConfig {
        SinkConfig {
            rounds: self.rounds,
            follow: self.discover.follow.is_some(),
            limit_reached: self.discover.limit_reached.clone(),
            template: self.train.clone(),
            seed: self.seed.clone(),
            checkpoints: self.out.join("checkpoints"),
            stop: self.stop.clone(),
            progress: progress.clone(),
            rounds_done: self.rounds_done.clone(),
            evaluator: self.evaluator.clone(),
        }
    }
}

/// The loop's evaluator, when evaluation prompts are given (`--eval-prompts`) or held out of
/// the seed (`--eval-holdout`).
fn loop_evaluator(
    args: &HumpbackArgs,
    held_out: &[Record],
    client: crate::serve::ModelClient,
) -> Result<Option<crate::eval::rounds::LoopEval>> {
    use crate::eval::data::{read_dev_set, read_prompts, EvalPrompt};
    let prompts: Vec<EvalPrompt> = match &args.eval_prompts {
        Some(path) => read_prompts(path)?.rows,
        None => crate::eval::devset::pairs_of(held_out)
            .into_iter()
            .map(|(instruction, output)| EvalPrompt {
                instruction,
                input: String::new(),
                output: Some(output),
            })
            .collect(),
    };
    if prompts.is_empty() {
        if args.judge.is_some() || args.selector_dev.is_some() {
            bail!("--judge and --selector-dev need --eval-prompts FILE or --eval-holdout N");
        }
        return Ok(None);
    }
    let dev = match &args.selector_dev {
        Some(p) => Some(read_dev_set(p)?.rows),
        None => None,
    };
    let cfg = crate::eval::run::EvalConfig {
        prompts: args.eval_prompts.clone().unwrap_or_default(),
        out: args.out.join("eval"),
        entries: Vec::new(),
        baseline: None,
        judge: args.judge.clone(),
        judge_rule: args.judge_rule,
        judge_tokens: 256,
        selector_dev: args.selector_dev.clone(),
        threshold: args.threshold,
        rate_tokens: args.rate_tokens,
        limit: None,
        max_tokens: args.eval_max_tokens.max(1),
        temperature: 0.7,
        top_p: 0.9,
        seed: args.random_seed,
        system: Some(crate::cli::eval::paper_system_prompt()),
        max_len: args.train_max_len,
        precision: args.dtype,
        max_batch: args.max_batch.max(1),
    };
    Ok(Some(crate::eval::rounds::LoopEval::new(
        cfg, prompts, dev, client,
    )?))
}

/// The folder of cached assets (scripts/fetch-assets.sh).
fn asset_cache() -> PathBuf {
    std::env::var_os("BACKFLOW_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/backflow")))
        .unwrap_or_else(|| PathBuf::from(".cache/backflow"))
}

/// `path`, or the cached default asset, or an error that says how to fetch it.
fn or_default(given: Option<PathBuf>, default: &str, what: &str) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p);
    }
    let p = asset_cache().join(default);
    if !p.exists() {
        bail!(
            "no {what} given and the default {} is missing: run scripts/fetch-assets.sh first",
            p.display()
        );
    }
    Ok(p)
}

/// Runs the job.
pub fn run(args: HumpbackArgs) -> Result<()> {
    let started = Instant::now();
    let config = args.cluster.timely_config()?;
    let base = or_default(
        args.model.clone(),
        "model/SmolLM2-135M-Instruct.Q4_1.gguf",
        "--model",
    )?;
    let seed_path = or_default(args.seed.clone(), "seed/seed_tasks.jsonl", "--seed")?;
    let corpus = if args.corpus.is_empty() && args.follow.is_none() {
        let p = or_default(None, "pages/python3.11", "--corpus")?;
        vec![p.to_string_lossy().into_owned()]
    } else {
        args.corpus.clone()
    };
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    if args.min_chars >= args.max_chars {
        bail!("--min-chars must be below --max-chars");
    }
    let train = train_template(&args, &base);
    train
        .validate()
        .context("the training flags (--lr, --lora-rank, --train-steps, --train-batch)")?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let inputs = formats::expand_inputs(&corpus)?;
    if inputs.is_empty() && args.follow.is_none() {
        bail!("no input files found in {corpus:?}");
    }
    let mut seed_stats = DataStats::default();
    let mut seed = read_records(&seed_path, &mut seed_stats)
        .with_context(|| format!("reading the seed {}", seed_path.display()))?;
    let held_out = match args.eval_holdout {
        Some(n) if n >= seed.len() => bail!(
            "--eval-holdout {n}: the seed has only {} pairs, and training needs some",
            seed.len()
        ),
        Some(n) => seed.split_off(seed.len() - n),
        None => Vec::new(),
    };
    if seed.is_empty() {
        bail!("no seed pairs in {}", seed_path.display());
    }

    let process = args.cluster.process;
    let server = ModelServer::start(ServerConfig {
        max_batch: args.max_batch.max(1),
        prefix_cache: !args.no_prefix_cache,
        precision: args.dtype,
        cache: Some(
            args.out
                .join("_cache")
                .join(format!("answers-p{process:03}.bin")),
        ),
        ..ServerConfig::default()
    });
    let client = server.client()?;
    let models_dir = args.out.join("_models");

    // Step 0 on process 0; the other processes receive its models along the dataflow.
    let (step0_updates, mut step0_metrics) = if process == 0 {
        let (updates, metrics) = step0(&args, &train, &seed)?;
        for u in &updates {
            install(u, &client, &models_dir, &base)?;
        }
        (updates, metrics)
    } else {
        (Vec::new(), serde_json::Value::Null)
    };
    // Evaluation of each forward model (process 0, where the sink trains), M_0 first.
    let evaluator = if process == 0 {
        loop_evaluator(&args, &held_out, client.clone())?
    } else {
        None
    };
    if let Some(ev) = &evaluator {
        if let Some(m0) = step0_updates.iter().find(|u| u.role == ModelRole::Forward) {
            eprintln!("step 0: evaluating M_0");
            // A failed evaluation is reported; the method goes on without its figures.
            match ev.evaluate(0, &m0.version, &m0.path) {
                Ok(e) => {
                    eprintln!("{}", crate::eval::rounds::describe(&e));
                    step0_metrics["eval"] = serde_json::to_value(&e)?;
                }
                Err(e) => {
                    log::error!("evaluating M0: {e:#}");
                    step0_metrics["eval_error"] = json!(format!("{e:#}"));
                }
            }
        }
    }

    // With --follow, the files an earlier run of this job took come first, each at the index it
    // had (so in the same round): the restart recomputes them (answers from the cache) and no
    // passage lands in two rounds' files.
    let replay = if args.follow.is_some() && process == 0 {
        replay_files(&args.out)?
    } else {
        Vec::new()
    };
    let stop = crate::job::stop_flag();
    let progress = Arc::new(Progress::default());
    let job = Job {
        out: args.out.clone(),
        process,
        limit: args.limit,
        stop: stop.clone(),
        discover: DiscoverConfig {
            inputs,
            follow: crate::job::follow_dir(args.follow.as_deref())?,
            poll: Duration::from_millis(500),
            max_open_files: 2,
            already_ingested: Default::default(),
            first_index: 0,
            limit_reached: Arc::new(AtomicBool::new(false)),
            replay,
            assignments: args
                .follow
                .is_some()
                .then(|| crate::job::IngestState::new(&args.out)),
            files_per_round: args
                .follow
                .is_some()
                .then_some(crate::humpback::rounds::FILES_PER_ROUND),
        },
        segment: SegmentOptions {
            min_chars: args.min_chars,
            max_chars: args.max_chars,
            ..SegmentOptions::default()
        },
        augment: AugmentOptions {
            temperature: args.temperature,
            top_p: args.top_p,
            max_new_tokens: args.augment_tokens,
            seed: args.random_seed,
            ..AugmentOptions::default()
        },
        rate: RateOptions {
            samples: args.samples.max(1),
            max_new_tokens: args.rate_tokens,
            seed: args.random_seed,
            forced_fallback: !args.no_forced_score,
            ..RateOptions::default()
        },
        curate: CurateOptions {
            threshold: args.threshold,
            graded: args.graded,
            ..CurateOptions::default()
        },
        rounds: args.rounds,
        train,
        seed,
        rounds_done: Arc::new(Mutex::new(Vec::new())),
        evaluator: evaluator.map(Arc::new),
    };
    let rounds_done = job.rounds_done.clone();
    let reporter = Reporter::start("humpback", progress.clone(), 0, args.quiet);
    let _answers = show_model_answers(server.shared_stats(), progress.clone());
    let worker_progress = progress.clone();
    let loop_started = Instant::now();
    let base_for_workers = base.clone();
    let guards = args
        .cluster
        .execute(config, move |worker| {
            let stats = Rc::new(RefCell::new(Stats::default()));
            let (ingest_probe, done_probe) = (ProbeHandle::new(), ProbeHandle::new());
            let installer = Installer {
                client: client.clone(),
                models_dir: models_dir.clone(),
                base: base_for_workers.clone(),
                book: Rc::new(RefCell::new(ModelBook::default())),
                progress: worker_progress.clone(),
            };
            let step0 = if worker.index() == 0 {
                step0_updates.clone()
            } else {
                Vec::new()
            };
            worker.dataflow::<Time, _, _>(|scope| {
                humpback(
                    scope,
                    &job,
                    step0,
                    installer,
                    stats.clone(),
                    &worker_progress,
                    &ingest_probe,
                    &done_probe,
                );
            });
            crate::job::run_worker(worker, &done_probe, &job.stop, &worker_progress, &stats)
        })
        .map_err(|e| anyhow::anyhow!("starting the timely job: {e}"))?;
    let merged = crate::job::finish(guards, &progress);
    drop(reporter);
    let merged = merged?;
    let Some(stats) = merged else { return Ok(()) };

    // Metrics and report (process 0).
    let elapsed = started.elapsed().as_secs_f64();
    let loop_secs = loop_started.elapsed().as_secs_f64().max(1e-9);
    let rounds = rounds_done.lock().map(|r| r.clone()).unwrap_or_default();
    let passages = stats.passages_written;
    let throughput = throughput(&server, &step0_metrics, &rounds, loop_secs);
    let metrics = json!({
        "pipeline": "humpback",
        "model": base,
        "seed": seed_path,
        "elapsed_secs": elapsed,
        "loop_secs": loop_secs,
        "passages": passages,
        "passages_per_hour": passages as f64 / elapsed.max(1e-9) * 3600.0,
        "step0": step0_metrics,
        "rounds": rounds,
        "throughput": throughput,
        "dropped": stats.dropped.iter().map(|(r, s)| (r.as_str().to_owned(), s.count)).collect::<std::collections::BTreeMap<_, _>>(),
        "stats": stats,
    });
    atomic_write(&args.out.join("metrics.json"), |f| {
        Ok(serde_json::to_writer_pretty(f, &metrics)?)
    })?;
    let report = crate::report::write_report(&args.out, &metrics)?;
    eprintln!("{}", crate::job::describe(&stats, elapsed));
    eprintln!(
        "metrics: {}  report: {}",
        args.out.join("metrics.json").display(),
        report.display()
    );
    Ok(())
}

/// Shows the model server's answers (and cache hits) on the progress line until dropped: the
/// model is where the time goes, and an epoch's files are only written once it is complete.
fn show_model_answers(
    stats: Arc<crate::serve::ServerStats>,
    progress: Arc<Progress>,
) -> StopOnDrop {
    let stop = Arc::new(AtomicBool::new(false));
    let done = stop.clone();
    std::thread::spawn(move || {
        use std::sync::atomic::Ordering::Relaxed;
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            progress.set_count("model answers", stats.requests.load(Relaxed));
            progress.set_count("from cache", stats.cache_hits.load(Relaxed));
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    StopOnDrop(stop)
}

/// Sets its flag when dropped (ends a polling thread).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The files (and their indices) an earlier `--follow` run of the job in `out` took; files gone
/// since are skipped with a warning.
fn replay_files(out: &Path) -> Result<Vec<(formats::InputFile, u64)>> {
    Ok(crate::job::still_readable(
        crate::job::IngestState::new(out).load_indexed()?,
    ))
}

/// The training settings every training of the job shares; data and output are set per model.
fn train_template(args: &HumpbackArgs, base: &Path) -> TrainJob {
    let mut t = TrainJob::new(base.to_path_buf(), Vec::new(), PathBuf::new());
    t.mode = TrainMode::Lora(LoraConfig::all_projections(args.lora_rank));
    t.steps = Some(args.train_steps);
    t.batch_size = args.train_batch;
    t.max_len = args.train_max_len;
    t.seed = args.random_seed;
    t.lr = args.lr;
    t.quiet = true;
    t
}

/// Step 0: the backward model M_yx (seed pairs reversed) and the seed model M_0 (seed pairs,
/// tagged S_a), trained, or loaded when given. Returns their updates and metrics.
fn step0(
    args: &HumpbackArgs,
    train: &TrainJob,
    seed: &[Record],
) -> Result<(Vec<ModelUpdate>, serde_json::Value)> {
    let mut updates = Vec::new();
    let mut metrics = serde_json::Map::new();
    for (role, given, name) in [
        (ModelRole::Backward, &args.backward_model, "backward"),
        (ModelRole::Forward, &args.seed_model, "round-0"),
    ] {
        let key = if role == ModelRole::Backward {
            "backward"
        } else {
            "forward"
        };
        if let Some(path) = given {
            let version = given_version(path);
            metrics.insert(key.into(), json!({"version": version, "given": path}));
            updates.push(ModelUpdate {
                role,
                round: 0,
                version,
                path: path.clone(),
                files: Vec::new(),
            });
            continue;
        }
        let mut job = train.clone();
        job.out = args.out.join("checkpoints").join(name);
        job.backward = role == ModelRole::Backward;
        job.data = vec![DataGroup {
            source: DataSource::Seed,
            records: seed.to_vec(),
        }];
        job.data_label = "seed".into();
        job.quiet = args.quiet;
        eprintln!(
            "step 0: training {} on {} seed pairs ({} steps)",
            if job.backward {
                "the backward model M_yx"
            } else {
                "the seed model M_0"
            },
            seed.len(),
            args.train_steps
        );
        let outcome = run_job(&job).with_context(|| format!("step 0: training {key}"))?;
        metrics.insert(
            key.into(),
            json!({
                "version": outcome.version, "reused": outcome.reused, "losses": outcome.losses,
                "tokens_per_sec": outcome.tokens_per_sec, "secs": outcome.secs,
            }),
        );
        let files = checkpoint_files(&job.out)?;
        updates.push(ModelUpdate {
            role,
            round: 0,
            version: outcome.version,
            path: job.out,
            files,
        });
    }
    Ok((updates, serde_json::Value::Object(metrics)))
}

/// Prompts/s of augmentation and rating in this process, from the server's per-version counters.
fn throughput(
    server: &ModelServer,
    step0: &serde_json::Value,
    rounds: &[serde_json::Value],
    secs: f64,
) -> serde_json::Value {
    let backward = step0["backward"]["version"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let mut forward: Vec<String> = step0["forward"]["version"]
        .as_str()
        .map(str::to_owned)
        .into_iter()
        .collect();
    forward.extend(
        rounds
            .iter()
            .filter_map(|r| r["train"]["version"].as_str().map(str::to_owned)),
    );
    let sum = |versions: &[String]| {
        let mut t = crate::serve::VersionStats::default();
        for v in versions {
            t.add(&server.stats().version(v));
        }
        let busy = (t.busy_us as f64 / 1e6).max(1e-9);
        json!({
            "prompts": t.requests,
            "cache_hits": t.cache_hits,
            "new_tokens": t.new_tokens,
            "busy_secs": t.busy_us as f64 / 1e6,
            "prompts_per_sec": t.requests as f64 / busy,
            "new_tokens_per_sec": t.new_tokens as f64 / busy,
            "prompts_per_sec_wall": t.requests as f64 / secs,
        })
    };
    json!({"augment": sum(&[backward]), "rate": sum(&forward), "note": "this process only; prompts_per_sec is per second of model time"})
}
