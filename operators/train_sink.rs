//! `train_sink`: the end of the loop (paper step 2, "self-curation" then training). On worker 0 it
//! gathers each round's curated pairs and a mark of every rating; when the round is complete (the
//! frontier of both inputs has passed the round's end) it trains `M_{r+1}` from the base model on
//! the seed data (tagged S_a) plus the round's curated pairs (tagged S_w), on a thread of its own
//! so the worker keeps stepping, and publishes the new version as a [`ModelUpdate`] at the last
//! time of the round. Through the loop's feedback edge it arrives at the next round's first time,
//! where every candidate is rated again by it.

use super::Time;
use crate::humpback::rounds::{checkpoint_files, round_of, round_start, ModelRole, ModelUpdate};
use crate::progress::Progress;
use crate::records::Rating;
use crate::train::data::{DataSource, Record};
use crate::train::job::{run_job, DataGroup, TrainJob, TrainOutcome};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::{Capability, Operator};
use timely::dataflow::StreamVec;

/// What the sink learns of every rating: enough for the round's score histogram.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RatingMark {
    /// The (mean) score, if any sample parsed.
    pub score: Option<f64>,
    /// Whether a sample's score was a forced choice (its answer had none).
    pub forced: bool,
    /// The rating model's version.
    pub model: String,
}

/// How the sink trains.
pub struct SinkConfig {
    /// Models to train at least: `M_1 .. M_rounds`.
    pub rounds: u64,
    /// With `--follow`: keep training a model per round while input may still come (no Ctrl-C,
    /// no `--limit` reached), past `rounds`.
    pub follow: bool,
    /// Set when `--limit` passages were taken: no new input will come.
    pub limit_reached: Arc<AtomicBool>,
    /// The training job of every round: base model and knobs (`data` and `out` are set per round).
    pub template: TrainJob,
    /// The seed pairs (tagged S_a).
    pub seed: Vec<Record>,
    /// Where `round-N` checkpoints go.
    pub checkpoints: PathBuf,
    /// Ctrl-C: train no further round.
    pub stop: Arc<AtomicBool>,
    /// A failed training ends the job through it.
    pub progress: Arc<Progress>,
    /// One JSON object per finished round, for the metrics and the report.
    pub rounds_done: Arc<Mutex<Vec<serde_json::Value>>>,
    /// Evaluates each new model on the training thread, right after it is trained (its
    /// figures go into the round's summary).
    pub evaluator: Option<Arc<crate::eval::rounds::LoopEval>>,
}

/// What the training thread hands back: the training and, with an evaluator, its figures or
/// why there are none (an evaluation that fails is reported; the loop goes on).
type Trained = (
    TrainOutcome,
    Option<Result<crate::eval::rounds::ModelEval, String>>,
);

#[derive(Default)]
struct RoundData {
    curated: Vec<Rating>,
    marks: Vec<RatingMark>,
}

/// The operator. Only worker 0 trains; its output carries the new versions.
pub fn train_sink<'s>(
    curated: StreamVec<'s, Time, Rating>,
    marks: StreamVec<'s, Time, RatingMark>,
    config: SinkConfig,
) -> StreamVec<'s, Time, ModelUpdate> {
    let scope = curated.scope();
    let leader = scope.index() == 0;
    curated.binary_frontier(
        marks,
        Exchange::new(|_: &Rating| 0),
        Exchange::new(|_: &RatingMark| 0),
        "TrainSink",
        move |cap, info| {
            let activator = scope.activator_for(info.address);
            // The round being rated, and the capability to publish its model at its last time.
            let mut round: u64 = 0;
            let mut cap: Option<Capability<Time>> = (leader && config.rounds > 0).then(|| {
                let mut c = cap;
                c.downgrade(&(round_start(1) - 1));
                c
            });
            let mut data: BTreeMap<u64, RoundData> = BTreeMap::new();
            let mut training: Option<(JoinHandle<Result<Trained, String>>, PathBuf)> = None;
            move |(curated, frontier1), (marks, frontier2), output| {
                curated.for_each_stamp(|c, d| {
                    let r = c.least().map_or(0, |t| round_of(*t));
                    let entry = data.entry(r).or_default();
                    for batch in d {
                        entry.curated.append(batch);
                    }
                });
                marks.for_each_stamp(|c, d| {
                    let r = c.least().map_or(0, |t| round_of(*t));
                    let entry = data.entry(r).or_default();
                    for batch in d {
                        entry.marks.append(batch);
                    }
                });
                let Some(c) = cap.as_mut() else { return };
                if let Some((handle, out)) = training.take() {
                    if !handle.is_finished() {
                        training = Some((handle, out));
                        activator.activate_after(Duration::from_millis(200));
                        return;
                    }
                    let result = handle
                        .join()
                        .unwrap_or_else(|_| Err("the training thread panicked".into()));
                    let (outcome, evaluation) = match result {
                        Ok(o) => o,
                        Err(e) => {
                            config
                                .progress
                                .fail(format!("training M{}: {e}", round + 1));
                            cap = None;
                            return;
                        }
                    };
                    config.progress.set_status(String::new());
                    let finished = data.remove(&round).unwrap_or_default();
                    let mut summary = round_summary(round, &finished, &outcome);
                    match evaluation {
                        Some(Ok(e)) => {
                            eprintln!("{}", crate::eval::rounds::describe(&e));
                            summary["eval"] = serde_json::to_value(&e).unwrap_or_default();
                        }
                        Some(Err(e)) => {
                            log::error!("{e}");
                            summary["eval_error"] = json!(e);
                        }
                        None => {}
                    }
                    eprintln!(
                        "round {}: {} rated, {} curated; trained M{} (version {}) in {:.0}s",
                        round + 1,
                        finished.marks.len(),
                        finished.curated.len(),
                        round + 1,
                        outcome.version,
                        outcome.secs
                    );
                    if let Ok(mut rounds) = config.rounds_done.lock() {
                        rounds.push(summary);
                    }
                    round += 1;
                    let input_may_come = config.follow
                        && !config.limit_reached.load(Ordering::SeqCst)
                        && !config.stop.load(Ordering::SeqCst);
                    if (round >= config.rounds && !input_may_come)
                        || config.stop.load(Ordering::SeqCst)
                    {
                        cap = None;
                        return;
                    }
                    let files = match checkpoint_files(&out) {
                        Ok(f) => f,
                        Err(e) => {
                            config
                                .progress
                                .fail(format!("reading checkpoint {}: {e}", out.display()));
                            cap = None;
                            return;
                        }
                    };
                    output.session(&*c).give(ModelUpdate {
                        role: ModelRole::Forward,
                        round,
                        version: outcome.version,
                        path: out,
                        files,
                    });
                    c.downgrade(&(round_start(round + 1) - 1));
                    return;
                }
                let end = round_start(round + 1);
                if frontier1.less_than(&end) || frontier2.less_than(&end) {
                    return;
                }
                if config.stop.load(Ordering::SeqCst) {
                    cap = None;
                    return;
                }
                // The round is complete: train M_{round+1} from the base.
                let mut pairs: Vec<&Rating> = data
                    .get(&round)
                    .map(|d| d.curated.iter().collect())
                    .unwrap_or_default();
                pairs.sort_by_key(|r| r.candidate.passage.id);
                let augmented: Vec<Record> = pairs
                    .iter()
                    .map(|r| Record::Pair {
                        instruction: r.candidate.instruction.clone(),
                        output: r.candidate.passage.text.clone(),
                    })
                    .collect();
                let out = config.checkpoints.join(format!("round-{}", round + 1));
                let mut job = config.template.clone();
                job.data = vec![
                    DataGroup {
                        source: DataSource::Seed,
                        records: config.seed.clone(),
                    },
                    DataGroup {
                        source: DataSource::Augmented,
                        records: augmented,
                    },
                ];
                job.data_label = format!("seed + curated round {}", round + 1);
                // A seed of its own per round: M_{r+1} is a new training run even when the
                // round curated nothing new (its data order and LoRA init differ from M_r's).
                job.seed = job.seed.wrapping_add(round + 1);
                job.out = out.clone();
                config
                    .progress
                    .set_status(format!("training M{}", round + 1));
                eprintln!(
                    "round {} complete: training M{} on {} seed + {} curated pairs",
                    round + 1,
                    round + 1,
                    config.seed.len(),
                    pairs.len()
                );
                let evaluator = config.evaluator.clone();
                let index = round + 1;
                let handle = std::thread::Builder::new()
                    .name(format!("train-M{index}"))
                    .spawn(move || {
                        let outcome = run_job(&job).map_err(|e| format!("{e:#}"))?;
                        let evaluation = evaluator.map(|ev| {
                            ev.evaluate(index, &outcome.version, &job.out)
                                .map_err(|e| format!("evaluating M{index}: {e:#}"))
                        });
                        Ok((outcome, evaluation))
                    });
                match handle {
                    Ok(h) => {
                        training = Some((h, out));
                        activator.activate_after(Duration::from_millis(200));
                    }
                    Err(e) => {
                        config
                            .progress
                            .fail(format!("cannot start the training thread: {e}"));
                        cap = None;
                    }
                }
            }
        },
    )
}

/// One round's figures, as the metrics file and the report show them.
fn round_summary(round: u64, data: &RoundData, outcome: &TrainOutcome) -> serde_json::Value {
    let mut histogram: BTreeMap<String, u64> = BTreeMap::new();
    for m in &data.marks {
        let key = m.score.map_or_else(
            || "unparsed".to_owned(),
            |s| format!("{}", s.round() as i64),
        );
        *histogram.entry(key).or_insert(0) += 1;
    }
    let rated = data.marks.len();
    let models: std::collections::BTreeSet<&str> =
        data.marks.iter().map(|m| m.model.as_str()).collect();
    json!({
        "round": round + 1,
        "rating_model": models.into_iter().collect::<Vec<_>>().join(","),
        "rated": rated,
        "curated": data.curated.len(),
        "acceptance": if rated > 0 { data.curated.len() as f64 / rated as f64 } else { 0.0 },
        "unparsed": histogram.get("unparsed").copied().unwrap_or(0),
        "forced": data.marks.iter().filter(|m| m.forced).count(),
        "score_histogram": histogram,
        "train": {
            "version": outcome.version,
            "reused": outcome.reused,
            "steps": outcome.steps,
            "losses": outcome.losses,
            "tokens_per_sec": outcome.tokens_per_sec,
            "secs": outcome.secs,
            "examples": {"seed": outcome.examples.saturating_sub(data.curated.len()), "augmented": data.curated.len()},
        },
    })
}
