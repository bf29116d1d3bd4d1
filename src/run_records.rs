//! The records a run leaves behind for people and tools: `metrics.json` of the Humpback loop
//! with its round summaries, the `summary.json` of `segment` and `run rate`. One type per
//! record, written with serde and read back the same way; every field that a later version
//! added has a default, so files of older runs still read.

use crate::eval::rounds::ModelEval;
use crate::stats::Stats;
use crate::train::job::TrainOutcome;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Ratings by score: `"1"` .. `"5"` (a mean of several samples rounded to the nearest) and
/// `"unparsed"` for a rating with no score.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ScoreHistogram(pub BTreeMap<String, u64>);

impl ScoreHistogram {
    /// The key of a rating that has no score.
    pub const UNPARSED: &'static str = "unparsed";

    /// Counts one rating.
    pub fn add(&mut self, score: Option<f64>) {
        let key = match score {
            Some(s) => format!("{}", s.round() as i64),
            None => Self::UNPARSED.to_owned(),
        };
        *self.0.entry(key).or_insert(0) += 1;
    }

    /// Ratings with no score.
    pub fn unparsed(&self) -> u64 {
        self.0.get(Self::UNPARSED).copied().unwrap_or(0)
    }

    /// Every rating counted.
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

/// Examples of a training, by source.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExampleCounts {
    /// Seed pairs (S_a).
    pub seed: usize,
    /// Curated pairs (S_w).
    pub augmented: usize,
}

/// One model of the loop: trained (its figures), or given on the command line.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainSummary {
    /// The checkpoint's version (content hash), or the given model's.
    pub version: String,
    /// The path the model was given as (`--backward-model`, `--seed-model`); not trained.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub given: Option<PathBuf>,
    /// An identical finished job was found and reused.
    pub reused: bool,
    /// Optimizer steps.
    pub steps: usize,
    /// Training loss of every step.
    pub losses: Vec<f64>,
    /// Training tokens per second.
    pub tokens_per_sec: f64,
    /// Wall seconds.
    pub secs: f64,
    /// Examples by source (round trainings).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub examples: Option<ExampleCounts>,
}

impl TrainSummary {
    /// A model given on the command line.
    pub fn given(version: String, path: PathBuf) -> Self {
        TrainSummary {
            version,
            given: Some(path),
            ..TrainSummary::default()
        }
    }

    /// A training's figures.
    pub fn trained(outcome: &TrainOutcome) -> Self {
        TrainSummary {
            version: outcome.version.clone(),
            given: None,
            reused: outcome.reused,
            steps: outcome.steps,
            losses: outcome.losses.clone(),
            tokens_per_sec: outcome.tokens_per_sec,
            secs: outcome.secs,
            examples: None,
        }
    }
}

/// A model's evaluation inside the loop: its figures, or why there are none (a failed
/// evaluation is reported and the loop goes on).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EvalOutcome {
    /// The figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval: Option<ModelEval>,
    /// Why there are none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_error: Option<String>,
}

impl EvalOutcome {
    /// Neither figures nor an error: nothing was evaluated.
    pub fn is_empty(&self) -> bool {
        self.eval.is_none() && self.eval_error.is_none()
    }

    /// From the evaluator's result (`None`: no evaluator).
    pub fn from_result(result: Option<Result<ModelEval, String>>) -> Self {
        match result {
            None => EvalOutcome::default(),
            Some(Ok(e)) => EvalOutcome {
                eval: Some(e),
                eval_error: None,
            },
            Some(Err(e)) => EvalOutcome {
                eval: None,
                eval_error: Some(e),
            },
        }
    }
}

/// Step 0: the backward model M_yx and the seed model M_0.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Step0Summary {
    /// M_yx.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backward: Option<TrainSummary>,
    /// M_0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward: Option<TrainSummary>,
    /// M_0's evaluation.
    #[serde(flatten)]
    pub evaluation: EvalOutcome,
    /// The base model's evaluation (`--model` before any finetuning), judged against M_0.
    #[serde(skip_serializing_if = "EvalOutcome::is_empty")]
    pub base: EvalOutcome,
}

/// One round of the loop: what its model rated and curated, and the model trained on it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RoundSummary {
    /// 1 for the first round.
    pub round: u64,
    /// The version(s) that rated (comma-separated when several did).
    pub rating_model: String,
    /// Candidates rated.
    pub rated: u64,
    /// Of those, curated.
    pub curated: u64,
    /// `curated / rated` (0 when nothing was rated).
    pub acceptance: f64,
    /// Ratings with no score.
    pub unparsed: u64,
    /// Ratings whose score was a forced choice (the answer had none).
    pub forced: u64,
    /// Ratings by score.
    pub score_histogram: ScoreHistogram,
    /// M_{round}, trained on the seed and this round's curated pairs.
    pub train: TrainSummary,
    /// Its evaluation.
    #[serde(flatten)]
    pub evaluation: EvalOutcome,
}

/// The model server's work for one stage of the loop (this process only).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StageThroughput {
    /// Prompts answered.
    pub prompts: u64,
    /// Of those, from the answer cache.
    pub cache_hits: u64,
    /// Tokens generated.
    pub new_tokens: u64,
    /// Seconds the model was busy with them.
    pub busy_secs: f64,
    /// Prompts per second of model time.
    pub prompts_per_sec: f64,
    /// Generated tokens per second of model time.
    pub new_tokens_per_sec: f64,
    /// Prompts per second of the loop's wall time.
    pub prompts_per_sec_wall: f64,
    /// Prompt tokens the model ran a forward pass over, per second of model time.
    pub prefill_tokens_per_sec: f64,
    /// Seconds of model time in prefill forward passes.
    pub prefill_secs: f64,
    /// Seconds of model time in decode forward passes.
    pub decode_secs: f64,
    /// Prompt tokens per second of prefill passes: the loop's prefill speed, to set beside
    /// the model bench's (`benches/model_throughput.rs`).
    pub prefill_pass_tokens_per_sec: f64,
    /// Rows decoded per second of decode passes (a token each): the loop's decode speed, to
    /// set beside the model bench's.
    pub decode_pass_tokens_per_sec: f64,
    /// Rows of the running batch per decode step (continuous batching), or, for a stage that
    /// decodes nothing (forced choices alone), requests the model answered per batch it ran.
    pub mean_batch: f64,
    /// Share of prompt tokens the prefix cache did not recompute (a batch's shared prefix counts
    /// once, a prefix kept from an earlier batch not at all).
    pub prefix_saved: f64,
    /// Share of the loop's wall time the model spent on this stage.
    pub busy_fraction: f64,
    /// Share of this stage's decode steps run in one forward pass with another batch's rows
    /// (another version's over the same base, or the same version's of another prefix: the
    /// base weights read once for both).
    pub joint_step_share: f64,
}

impl StageThroughput {
    /// The figures of counters `t` over `wall_secs` of the loop.
    pub fn from_stats(t: &crate::serve::VersionStats, wall_secs: f64) -> Self {
        let busy_secs = t.busy_us as f64 / 1e6;
        let per_busy = |n: u64| n as f64 / busy_secs.max(1e-9);
        let answered = t.requests.saturating_sub(t.cache_hits + t.errors);
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        StageThroughput {
            prompts: t.requests,
            cache_hits: t.cache_hits,
            new_tokens: t.new_tokens,
            busy_secs,
            prompts_per_sec: per_busy(t.requests),
            new_tokens_per_sec: per_busy(t.new_tokens),
            prompts_per_sec_wall: ratio(t.requests as f64, wall_secs),
            prefill_tokens_per_sec: per_busy(t.prefill_tokens),
            prefill_secs: t.prefill_us as f64 / 1e6,
            decode_secs: t.decode_us as f64 / 1e6,
            prefill_pass_tokens_per_sec: ratio(t.prefill_tokens as f64 * 1e6, t.prefill_us as f64),
            decode_pass_tokens_per_sec: ratio(t.decode_rows as f64 * 1e6, t.decode_us as f64),
            mean_batch: if t.decode_steps > 0 {
                ratio(t.decode_rows as f64, t.decode_steps as f64)
            } else {
                ratio(answered as f64, t.batches as f64)
            },
            prefix_saved: ratio(
                t.prompt_tokens.saturating_sub(t.prefill_tokens) as f64,
                t.prompt_tokens as f64,
            ),
            busy_fraction: ratio(busy_secs, wall_secs),
            joint_step_share: ratio(t.joint_steps as f64, t.decode_steps as f64),
        }
    }
}

/// Augmentation (M_yx) and rating (M_0, M_1, ...) throughput.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Throughput {
    /// Instructions written by the backward model.
    pub augment: StageThroughput,
    /// Ratings by the forward models.
    pub rate: StageThroughput,
    /// The most KV cache the server's running batches held together (MiB, projected for
    /// every row running to its longest; bounded by `--kv-cache-mb`).
    pub kv_cache_peak_mb: f64,
    /// What the figures cover.
    pub note: String,
}

/// `metrics.json` of `run humpback`: the whole run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HumpbackMetrics {
    /// `humpback`.
    pub pipeline: String,
    /// The base model.
    pub model: PathBuf,
    /// The seed data.
    pub seed: PathBuf,
    /// Wall seconds of the run, step 0 included.
    pub elapsed_secs: f64,
    /// Wall seconds of the dataflow (after step 0).
    pub loop_secs: f64,
    /// Passages written.
    pub passages: u64,
    /// Passages per hour of the whole run.
    pub passages_per_hour: f64,
    /// Step 0.
    pub step0: Step0Summary,
    /// Every round finished.
    pub rounds: Vec<RoundSummary>,
    /// The model server's throughput.
    pub throughput: Throughput,
    /// Drops by reason.
    pub dropped: BTreeMap<String, u64>,
    /// Peak resident memory of this process (MB; Linux's `VmHWM`), training included.
    pub peak_rss_mb: Option<f64>,
    /// Everything counted, merged over the workers.
    pub stats: Stats,
}

/// `summary.json` of `backflow segment`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SegmentSummary {
    /// `segment`.
    pub pipeline: String,
    /// Workers per process.
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

/// The model server's work in one process of `run rate`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProcessThroughput {
    /// Prompts answered.
    pub requests: u64,
    /// Prompt tokens processed.
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub new_tokens: u64,
    /// Prompts per second of wall time.
    pub prompts_per_sec: f64,
    /// Generated tokens per second of wall time.
    pub generated_tokens_per_sec: f64,
}

/// `summary.json` of `run augment`. The count of candidates is read back from the files
/// written.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AugmentSummary {
    /// `augment`.
    pub pipeline: String,
    /// The backward model.
    pub model: PathBuf,
    /// Wall seconds, model loading excluded.
    pub elapsed_secs: f64,
    /// Rows of `candidates-*.jsonl`.
    pub candidates: u64,
    /// Candidates per hour of wall time.
    pub passages_per_hour: f64,
    /// The backward model's work in the model server of process 0: model-busy time, prefill
    /// and decode tokens/s of model time, mean running batch, prefix-cache savings.
    pub model_server: StageThroughput,
    /// The model server of process 0.
    pub this_process: ProcessThroughput,
    /// Everything counted, merged over the workers.
    pub stats: Stats,
}

/// `summary.json` of `run rate`. The counts of rows are read back from the files written.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RateSummary {
    /// `rate`.
    pub pipeline: String,
    /// The rating model.
    pub model: PathBuf,
    /// Pairs read from the dataset (after `--limit`).
    pub pairs: usize,
    /// The curation threshold.
    pub threshold: f64,
    /// Wall seconds.
    pub elapsed_secs: f64,
    /// Rows of `ratings-*.jsonl` by score.
    pub score_histogram: ScoreHistogram,
    /// Rows of `ratings-*.jsonl`.
    pub rated: u64,
    /// Rows of `curated-*.jsonl`.
    pub curated: u64,
    /// The model server of process 0.
    pub this_process: ProcessThroughput,
    /// The rating model's work in the model server of process 0: model-busy time, prefill and
    /// decode tokens/s of model time, mean running batch, prefix-cache savings.
    pub model_server: StageThroughput,
    /// Everything counted, merged over the workers.
    pub stats: Stats,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_rounds_means_and_counts_unparsed() {
        let mut h = ScoreHistogram::default();
        for s in [Some(5.0), Some(4.5), Some(4.4), None, Some(1.0), None] {
            h.add(s);
        }
        let expected: BTreeMap<String, u64> = [("1", 1), ("4", 1), ("5", 2), ("unparsed", 2)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        assert_eq!(h.0, expected);
        assert_eq!((h.unparsed(), h.total()), (2, 6));
    }

    /// The stage figures from counters worked out by hand: 30 requests, 6 from the cache and 4
    /// failed, so 20 answered in 5 batches; 2 s busy in a 10 s loop; 1000 prompt tokens of which
    /// 400 run (600 reused from the prefix cache); 300 new tokens.
    #[test]
    fn stage_figures_from_the_servers_counters() {
        let t = crate::serve::VersionStats {
            requests: 30,
            cache_hits: 6,
            errors: 4,
            prompt_tokens: 1000,
            prefill_tokens: 400,
            new_tokens: 300,
            batches: 5,
            busy_us: 2_000_000,
            ..Default::default()
        };
        let s = StageThroughput::from_stats(&t, 10.0);
        assert_eq!((s.prompts, s.cache_hits, s.new_tokens), (30, 6, 300));
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(s.busy_secs, 2.0) && close(s.busy_fraction, 0.2));
        assert!(close(s.prompts_per_sec, 15.0) && close(s.prompts_per_sec_wall, 3.0));
        assert!(close(s.new_tokens_per_sec, 150.0) && close(s.prefill_tokens_per_sec, 200.0));
        assert!(close(s.mean_batch, 4.0) && close(s.prefix_saved, 0.6));
        // Decoded in 40 steps of 300 rows in all: 7.5 rows running per step; 10 of the steps
        // shared with another version. Of the 2 s busy, 0.5 s in prefill passes (400 tokens:
        // 800 a second) and 1.2 s in decode passes (300 rows: 250 a second).
        let decoded = crate::serve::VersionStats {
            decode_steps: 40,
            decode_rows: 300,
            joint_steps: 10,
            prefill_us: 500_000,
            decode_us: 1_200_000,
            ..t
        };
        let d = StageThroughput::from_stats(&decoded, 10.0);
        assert!(close(d.mean_batch, 7.5) && close(d.joint_step_share, 0.25));
        assert!(close(d.prefill_secs, 0.5) && close(d.decode_secs, 1.2));
        assert!(close(d.prefill_pass_tokens_per_sec, 800.0));
        assert!(close(d.decode_pass_tokens_per_sec, 250.0));
        assert!(
            close(s.prefill_pass_tokens_per_sec, 0.0) && close(s.decode_pass_tokens_per_sec, 0.0),
            "no pass timed: zeros, not infinities"
        );
        assert!(
            close(s.joint_step_share, 0.0),
            "no decode steps, none shared"
        );
        // Nothing run: zeros, not NaN.
        let idle = StageThroughput::from_stats(&Default::default(), 0.0);
        assert_eq!(
            (idle.mean_batch, idle.prefix_saved, idle.busy_fraction),
            (0.0, 0.0, 0.0)
        );
        assert!(idle.prompts_per_sec == 0.0 && idle.prompts_per_sec_wall == 0.0);
    }

    /// A round summary as an earlier version wrote it (no `forced`, no evaluation, a given
    /// model with no training figures) still reads, missing fields at their defaults.
    #[test]
    fn older_files_still_read() {
        let old = r#"{"round": 1, "rating_model": "abc", "rated": 4, "curated": 1,
            "acceptance": 0.25, "unparsed": 2, "score_histogram": {"5": 1, "unparsed": 2},
            "train": {"version": "def", "losses": [2.0, 1.5]}}"#;
        let r: RoundSummary = serde_json::from_str(old).unwrap();
        assert_eq!((r.round, r.rated, r.curated, r.forced), (1, 4, 1, 0));
        assert_eq!(r.train.losses, vec![2.0, 1.5]);
        assert_eq!(r.evaluation, EvalOutcome::default());
        let m: HumpbackMetrics =
            serde_json::from_str(r#"{"pipeline": "humpback", "rounds": []}"#).unwrap();
        assert!(m.step0.forward.is_none() && m.rounds.is_empty());
    }

    /// What is written reads back equal (the report and tools read these files).
    #[test]
    fn round_summary_round_trips() {
        let mut h = ScoreHistogram::default();
        h.add(Some(3.0));
        let r = RoundSummary {
            round: 2,
            rating_model: "v".into(),
            rated: 1,
            curated: 0,
            acceptance: 0.0,
            unparsed: 0,
            forced: 1,
            score_histogram: h,
            train: TrainSummary {
                version: "w".into(),
                examples: Some(ExampleCounts {
                    seed: 3,
                    augmented: 0,
                }),
                ..TrainSummary::default()
            },
            evaluation: EvalOutcome {
                eval: None,
                eval_error: Some("no judge".into()),
            },
        };
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains(r#""eval_error":"no judge""#), "{text}");
        assert_eq!(serde_json::from_str::<RoundSummary>(&text).unwrap(), r);
    }

    /// Step 0's base evaluation sits under `base`, beside M_0's flattened one, and is left out
    /// when there is none (files of earlier versions read with none).
    #[test]
    fn step0_keeps_the_base_evaluation_apart_from_m0s() {
        let eval = |model: &str| ModelEval {
            model: model.into(),
            ..ModelEval::default()
        };
        let s = Step0Summary {
            evaluation: EvalOutcome::from_result(Some(Ok(eval("M0")))),
            base: EvalOutcome::from_result(Some(Err("no model".into()))),
            ..Step0Summary::default()
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["eval"]["model"], "M0");
        assert_eq!(v["base"]["eval_error"], "no model");
        assert_eq!(serde_json::from_value::<Step0Summary>(v).unwrap(), s);
        let none = Step0Summary {
            evaluation: EvalOutcome::from_result(Some(Ok(eval("M0")))),
            ..Step0Summary::default()
        };
        let text = serde_json::to_string(&none).unwrap();
        assert!(!text.contains("\"base\""), "{text}");
        let old: Step0Summary = serde_json::from_str(r#"{"eval": {"model": "M0"}}"#).unwrap();
        assert!(old.base.is_empty() && old.evaluation.eval.is_some());
    }
}
