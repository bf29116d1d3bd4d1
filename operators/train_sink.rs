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
use crate::run_records::{EvalOutcome, ExampleCounts, RoundSummary, ScoreHistogram, TrainSummary};
use crate::train::data::{DataSource, Record};
use crate::train::{run_job, DataGroup, TrainJob, TrainOutcome};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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

impl RatingMark {
    /// The mark of a rating.
    pub fn of(r: &Rating) -> Self {
        RatingMark {
            score: r.score,
            forced: r
                .samples
                .iter()
                .any(|s| s.score.is_err() && s.forced.is_some()),
            model: r.model_version.clone(),
        }
    }
}

/// What the sink emits: each new model (into the loop's feedback edge) and each finished
/// round's summary (for the metrics and the report), both at the round's last time.
#[derive(Clone, Debug)]
pub enum SinkOutput {
    /// A model for the next round.
    Model(ModelUpdate),
    /// A round finished: what it rated and curated, the model trained on it.
    Round(Box<RoundSummary>),
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

/// What the sink keeps of a round: its curated pairs, as training records (by passage id, for a
/// data order that does not depend on arrival), and its ratings counted, not kept.
#[derive(Default)]
struct RoundData {
    curated: Vec<(u64, Record)>,
    histogram: ScoreHistogram,
    rated: u64,
    forced: u64,
    models: std::collections::BTreeSet<String>,
}

impl RoundData {
    fn mark(&mut self, m: RatingMark) {
        self.histogram.add(m.score);
        self.rated += 1;
        self.forced += u64::from(m.forced);
        self.models.insert(m.model);
    }
}

/// The operator. Only worker 0 trains; its output carries the new versions and the round
/// summaries.
pub fn train_sink<'s>(
    curated: StreamVec<'s, Time, Rating>,
    marks: StreamVec<'s, Time, RatingMark>,
    config: SinkConfig,
) -> StreamVec<'s, Time, SinkOutput> {
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
                    for r in d.flat_map(|batch| batch.drain(..)) {
                        let id = r.candidate.passage.id;
                        entry.curated.push((
                            id,
                            Record::Pair {
                                instruction: r.candidate.instruction,
                                output: r.candidate.passage.text,
                            },
                        ));
                    }
                });
                marks.for_each_stamp(|c, d| {
                    let r = c.least().map_or(0, |t| round_of(*t));
                    let entry = data.entry(r).or_default();
                    for m in d.flat_map(|batch| batch.drain(..)) {
                        entry.mark(m);
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
                    let evaluation = EvalOutcome::from_result(evaluation);
                    if let Some(e) = &evaluation.eval {
                        eprintln!("{}", crate::eval::rounds::describe(e));
                    }
                    if let Some(e) = &evaluation.eval_error {
                        log::error!("{e}");
                    }
                    let summary = round_summary(round, &finished, &outcome, evaluation);
                    eprintln!(
                        "round {}: {} rated, {} curated; trained M{} (version {}) in {:.0}s",
                        round + 1,
                        finished.rated,
                        finished.curated.len(),
                        round + 1,
                        outcome.version,
                        outcome.secs
                    );
                    output
                        .session(&*c)
                        .give(SinkOutput::Round(Box::new(summary)));
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
                    output.session(&*c).give(SinkOutput::Model(ModelUpdate {
                        role: ModelRole::Forward,
                        round,
                        version: outcome.version,
                        path: out,
                        files,
                    }));
                    c.downgrade(&(round_start(round + 1) - 1));
                    // The next round may be complete already (its inputs closed while this
                    // one trained): look again rather than wait for a frontier change.
                    activator.activate();
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
                let mut pairs: Vec<&(u64, Record)> = data
                    .get(&round)
                    .map(|d| d.curated.iter().collect())
                    .unwrap_or_default();
                pairs.sort_by_key(|(id, _)| *id);
                let augmented: Vec<Record> = pairs.iter().map(|(_, r)| r.clone()).collect();
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
fn round_summary(
    round: u64,
    data: &RoundData,
    outcome: &TrainOutcome,
    evaluation: EvalOutcome,
) -> RoundSummary {
    let score_histogram = data.histogram.clone();
    let (rated, curated) = (data.rated, data.curated.len() as u64);
    let models: Vec<&str> = data.models.iter().map(String::as_str).collect();
    let mut train = TrainSummary::trained(outcome);
    train.examples = Some(ExampleCounts {
        seed: outcome.examples.saturating_sub(data.curated.len()),
        augmented: data.curated.len(),
    });
    RoundSummary {
        round: round + 1,
        rating_model: models.join(","),
        rated,
        curated,
        acceptance: if rated > 0 {
            curated as f64 / rated as f64
        } else {
            0.0
        },
        unparsed: score_histogram.unparsed(),
        forced: data.forced,
        score_histogram,
        train,
        evaluation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::humpback::rounds::round_start;
    use crate::records::{Candidate, RatingSample};
    use timely::dataflow::operators::capture::Event;
    use timely::dataflow::operators::vec::Input;
    use timely::dataflow::operators::{Capture, Probe};
    use timely::dataflow::InputHandleVec;

    fn mark(score: Option<f64>, forced: bool) -> RatingMark {
        RatingMark {
            score,
            forced,
            model: "m0".into(),
        }
    }

    /// Two rounds on a tiny random model, one training step each. Round 1 curated one pair of
    /// three rated (one unparsed, one forced): M1 is trained on the 2 seed pairs + 1 curated,
    /// published for the next round, and summarised; round 2 got nothing: M2 is trained on the
    /// seed alone, summarised, and not published (no round 3). Both summaries and the model
    /// come out at their round's last time.
    #[test]
    fn each_complete_round_is_trained_summarised_and_fed_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base");
        crate::train::tiny_base(&base);
        let mut template = TrainJob::new(base, Vec::new(), PathBuf::new());
        template.steps = Some(1);
        template.batch_size = 2;
        let config = SinkConfig {
            rounds: 2,
            follow: false,
            limit_reached: Arc::default(),
            template,
            seed: vec![
                Record::pair("say hi.", "hi."),
                Record::pair("count to two.", "one, two."),
            ],
            checkpoints: dir.path().join("checkpoints"),
            stop: Arc::default(),
            progress: Arc::default(),
            evaluator: None,
        };
        let progress = config.progress.clone();
        let curated_pair = crate::operators::rate::rating_of(
            Candidate::given("f", 0, "name a colour.", "blue."),
            "m0".into(),
            vec![RatingSample {
                raw: "Score: 5".into(),
                score: Ok(5),
                forced: None,
                forced_probs: None,
            }],
        );
        let captured = timely::execute_directly(move |worker| {
            let mut curated: InputHandleVec<Time, Rating> = InputHandleVec::new();
            let mut marks: InputHandleVec<Time, RatingMark> = InputHandleVec::new();
            let (probe, captured) = worker.dataflow(|scope| {
                let out = train_sink(
                    scope.input_from(&mut curated),
                    scope.input_from(&mut marks),
                    config,
                );
                let (probe, out) = out.probe();
                (probe, out.capture())
            });
            curated.send(curated_pair);
            for m in [
                mark(Some(5.0), false),
                mark(None, false),
                mark(Some(1.0), true),
            ] {
                marks.send(m);
            }
            curated.close();
            marks.close();
            worker.step_while(|| !probe.done());
            captured
        });
        assert!(!progress.failed(), "the sink reported a failure");
        let mut rounds = Vec::new();
        let mut models = Vec::new();
        for event in captured.try_iter() {
            if let Event::Messages(stamp, outputs) = event {
                let time = *stamp.expect_singleton();
                for o in outputs {
                    match o {
                        SinkOutput::Round(r) => rounds.push((time, *r)),
                        SinkOutput::Model(u) => models.push((time, u)),
                    }
                }
            }
        }
        assert_eq!(rounds.len(), 2, "one summary per round");
        let (t1, r1) = &rounds[0];
        assert_eq!(*t1, round_start(1) - 1);
        assert_eq!(
            (r1.round, r1.rated, r1.curated, r1.unparsed, r1.forced),
            (1, 3, 1, 1, 1)
        );
        assert_eq!(r1.rating_model, "m0");
        assert!((r1.acceptance - 1.0 / 3.0).abs() < 1e-12);
        let histogram: Vec<(&str, u64)> = (r1.score_histogram.0.iter())
            .map(|(k, v)| (k.as_str(), *v))
            .collect();
        assert_eq!(histogram, vec![("1", 1), ("5", 1), ("unparsed", 1)]);
        assert_eq!(
            r1.train.examples,
            Some(ExampleCounts {
                seed: 2,
                augmented: 1
            })
        );
        assert_eq!(r1.train.steps, 1);
        let (t2, r2) = &rounds[1];
        assert_eq!(*t2, round_start(2) - 1);
        assert_eq!((r2.round, r2.rated, r2.curated), (2, 0, 0));
        assert_eq!(
            r2.train.examples,
            Some(ExampleCounts {
                seed: 2,
                augmented: 0
            })
        );
        assert_ne!(r1.train.version, r2.train.version, "M2 is a new training");
        assert_eq!(models.len(), 1, "M1 is fed back; no round 3 needs M2");
        let (tm, m1) = &models[0];
        assert_eq!(*tm, round_start(1) - 1);
        assert_eq!((m1.role, m1.round), (ModelRole::Forward, 1));
        assert_eq!(m1.version, r1.train.version);
        assert!(m1.path.ends_with("round-1") && !m1.files.is_empty());
    }
}
