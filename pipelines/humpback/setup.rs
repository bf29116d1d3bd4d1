//! Before the dataflow and after it: the seed read and held out, the training settings, step 0
//! (M_yx and M_0), the loop's evaluator, the model server's answers on the progress line, and
//! the throughput figures of the metrics.

use super::HumpbackArgs;
use crate::eval::rounds::LoopEval;
use crate::humpback::rounds::{checkpoint_files, given_version, ModelRole, ModelUpdate};
use crate::progress::Progress;
use crate::run_records::{
    EvalOutcome, RoundSummary, StageThroughput, Step0Summary, Throughput, TrainSummary,
};
use crate::serve::ModelServer;
use crate::train::data::{read_records, DataSource, DataStats, Record};
use crate::train::{run_job, DataGroup, TrainJob};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

/// The loop's evaluator, when evaluation prompts are given (`--eval-prompts`) or held out of
/// the seed (`--eval-holdout`).
pub(super) fn loop_evaluator(
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
        judge_prompt: args.judge_prompt,
        judge_tokens: 256,
        selector_dev: args.selector_dev.clone(),
        threshold: args.rating.threshold,
        rate_tokens: args.rating.rate_tokens,
        limit: None,
        max_tokens: args.eval_max_tokens,
        temperature: 0.7,
        top_p: 0.9,
        seed: args.random_seed,
        system: Some(crate::cli::eval::paper_system_prompt()),
        max_len: args.train.max_len,
        precision: args.server.dtype,
        max_batch: args.server.max_batch,
    };
    Ok(Some(crate::eval::rounds::LoopEval::new(
        cfg, prompts, dev, client,
    )?))
}

/// M_0's evaluation (none without an M_0 among `updates`).
pub(super) fn evaluate_m0(ev: &LoopEval, updates: &[ModelUpdate]) -> EvalOutcome {
    let Some(m0) = updates.iter().find(|u| u.role == ModelRole::Forward) else {
        return EvalOutcome::default();
    };
    eprintln!("step 0: evaluating M_0");
    reported("M0", ev.evaluate(0, &m0.version, &m0.path))
}

/// The base model's evaluation, after M_0's (against whose answers it is judged); none when
/// M_0 is the base itself (`--seed-model` given as the base).
pub(super) fn evaluate_base(ev: &LoopEval, base: &Path, updates: &[ModelUpdate]) -> EvalOutcome {
    let version = given_version(base);
    if updates
        .iter()
        .any(|u| u.role == ModelRole::Forward && u.version == version)
    {
        return EvalOutcome::default();
    }
    eprintln!("step 0: evaluating the base model");
    reported("the base model", ev.evaluate_base(&version, base))
}

/// An evaluation's figures, shown, or its error, logged: a failed evaluation is reported and
/// the method goes on without its figures.
fn reported(what: &str, result: Result<crate::eval::rounds::ModelEval>) -> EvalOutcome {
    match &result {
        Ok(e) => eprintln!("{}", crate::eval::rounds::describe(e)),
        Err(e) => log::error!("evaluating {what}: {e:#}"),
    }
    EvalOutcome::from_result(Some(result.map_err(|e| format!("{e:#}"))))
}

/// The seed pairs to train on, and the last `holdout` of them held out for evaluation.
pub(super) fn read_seed(path: &Path, holdout: Option<usize>) -> Result<(Vec<Record>, Vec<Record>)> {
    let mut stats = DataStats::default();
    let mut seed = read_records(path, &mut stats)
        .with_context(|| format!("reading the seed {}", path.display()))?;
    let held_out = match holdout {
        Some(n) if n >= seed.len() => bail!(
            "--eval-holdout {n}: the seed has only {} pairs, and training needs some",
            seed.len()
        ),
        Some(n) => seed.split_off(seed.len() - n),
        None => Vec::new(),
    };
    if seed.is_empty() {
        bail!("no seed pairs in {}", path.display());
    }
    Ok((seed, held_out))
}

/// Shows the model server's answers (and cache hits) on the progress line until dropped: the
/// model is where the time goes, and an epoch's files are only written once it is complete.
pub(super) fn show_model_answers(
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
pub(super) struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The training settings every training of the job shares; data and output are set per model.
pub(super) fn train_template(args: &HumpbackArgs, base: &Path) -> TrainJob {
    let mut t = TrainJob::new(base.to_path_buf(), Vec::new(), PathBuf::new());
    t.mode = args.train.lora(args.lora_rank);
    args.train.apply(&mut t);
    t.steps = Some(args.train_steps);
    t.seed = args.random_seed;
    t.quiet = true;
    t
}

/// Step 0: the backward model M_yx (seed pairs reversed) and the seed model M_0 (seed pairs,
/// tagged S_a), trained, or loaded when given. Returns their updates and figures.
pub(super) fn step0(
    args: &HumpbackArgs,
    train: &TrainJob,
    seed: &[Record],
) -> Result<(Vec<ModelUpdate>, Step0Summary)> {
    let mut updates = Vec::new();
    let mut summary = Step0Summary::default();
    for (role, given, name) in [
        (ModelRole::Backward, &args.backward_model, "backward"),
        (ModelRole::Forward, &args.seed_model, "round-0"),
    ] {
        let slot = match role {
            ModelRole::Backward => &mut summary.backward,
            ModelRole::Forward => &mut summary.forward,
        };
        if let Some(path) = given {
            let version = given_version(path);
            *slot = Some(TrainSummary::given(version.clone(), path.clone()));
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
        job.quiet = args.job.quiet;
        let what = match role {
            ModelRole::Backward => "the backward model M_yx",
            ModelRole::Forward => "the seed model M_0",
        };
        eprintln!(
            "step 0: training {what} on {} seed pairs ({} steps)",
            seed.len(),
            args.train_steps
        );
        let outcome = run_job(&job).with_context(|| format!("step 0: training {what}"))?;
        *slot = Some(TrainSummary::trained(&outcome));
        let files = checkpoint_files(&job.out)?;
        updates.push(ModelUpdate {
            role,
            round: 0,
            version: outcome.version,
            path: job.out,
            files,
        });
    }
    Ok((updates, summary))
}

/// Prompts/s of augmentation and rating in this process, from the server's per-version counters.
pub(super) fn throughput(
    server: &ModelServer,
    step0: &Step0Summary,
    rounds: &[RoundSummary],
    secs: f64,
) -> Throughput {
    let backward: Vec<&str> = step0.backward.iter().map(|t| t.version.as_str()).collect();
    let forward: Vec<&str> = (step0.forward.iter())
        .chain(rounds.iter().map(|r| &r.train))
        .map(|t| t.version.as_str())
        .collect();
    let sum = |versions: &[&str]| {
        let mut t = crate::serve::VersionStats::default();
        for v in versions {
            t.add(&server.stats().version(v));
        }
        StageThroughput::from_stats(&t, secs)
    };
    Throughput {
        augment: sum(&backward),
        rate: sum(&forward),
        kv_cache_peak_mb: (server.stats().kv_bytes_peak).load(std::sync::atomic::Ordering::Relaxed)
            as f64
            / (1u64 << 20) as f64,
        note: "this process only; prompts_per_sec is per second of model time".into(),
    }
}
