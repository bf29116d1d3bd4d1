//! `rate` (paper step 2): the current forward model scores each candidate with the paper's
//! prompt, `samples` times (averaged when more than one). Every answer is kept with its raw text;
//! one that does not parse is counted by reason, never dropped silently.

use super::model_call::{model_call, Ask};
use super::{Time, WorkerStats};
use crate::humpback::prompts::rating_messages;
use crate::humpback::score::parse_score;
use crate::model::sampling::Sampling;
use crate::records::{Candidate, Rating, RatingSample};
use crate::serve::{Choice, ModelClient};
use crate::stats::{Drop, DropReason};
use serde::{Deserialize, Serialize};
use timely::dataflow::StreamVec;

/// Rating settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RateOptions {
    /// Ratings per candidate; more than one samples with `temperature` and averages.
    pub samples: usize,
    /// Temperature when sampling several ratings (one rating is greedy).
    pub temperature: f32,
    /// Most tokens of a rating answer (reasoning, then the score line).
    pub max_new_tokens: usize,
    /// Seed mixed with each passage's id and the sample index.
    pub seed: u64,
    /// Most candidates in flight per worker.
    pub max_in_flight: usize,
    /// When an answer has no readable score, take one as a forced choice among 1..5 after the
    /// answer and `Score: `, made right after generating it from the same KV cache (a few
    /// decode steps). The failure is still counted.
    pub forced_fallback: bool,
}

impl Default for RateOptions {
    fn default() -> Self {
        RateOptions {
            samples: 1,
            temperature: 0.7,
            max_new_tokens: 96,
            seed: 0,
            max_in_flight: 64,
            forced_fallback: true,
        }
    }
}

/// A candidate to rate, and the forward model version to rate it with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RateJob {
    /// The candidate.
    pub candidate: Candidate,
    /// The rating model's version.
    pub model: String,
}

/// The operator.
pub fn rate<'s>(
    jobs: StreamVec<'s, Time, RateJob>,
    client: ModelClient,
    options: RateOptions,
    stats: WorkerStats,
) -> StreamVec<'s, Time, Rating> {
    model_call(
        jobs,
        "Rate",
        client,
        options.max_in_flight,
        move |job: &RateJob| {
            let (c, version) = (&job.candidate, job.model.clone());
            let messages = rating_messages(&c.instruction, &c.passage.text);
            (0..options.samples.max(1))
                .map(|i| Ask {
                    model: version.clone(),
                    messages: messages.clone(),
                    max_new_tokens: options.max_new_tokens,
                    choose: None,
                    // Cheap enough to ask always; used only when the answer has no score.
                    choose_after: options.forced_fallback.then(forced_choice),
                    sampling: if options.samples <= 1 {
                        Sampling::greedy()
                    } else {
                        Sampling {
                            temperature: options.temperature,
                            top_p: 1.0,
                            seed: options.seed
                                ^ c.passage.id
                                ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                        }
                    },
                })
                .collect()
        },
        move |job: RateJob, answers| {
            let RateJob {
                candidate: c,
                model,
            } = job;
            let mut s = stats.borrow_mut();
            let samples: Vec<RatingSample> = answers
                .into_iter()
                .map(|a| match a.result {
                    Ok(raw) => {
                        let score = parse_score(&raw);
                        let forced = match score {
                            Ok(_) => None,
                            Err(_) => a.choice.and_then(|t| t.parse::<u8>().ok()),
                        };
                        RatingSample { raw, score, forced }
                    }
                    Err(e) => RatingSample {
                        raw: String::new(),
                        score: Err(crate::humpback::score::ScoreError::NotANumber(format!(
                            "model error: {e}"
                        ))),
                        forced: None,
                    },
                })
                .collect::<Vec<_>>();
            for sample in &samples {
                if let Err(e) = &sample.score {
                    s.drop(Drop {
                        reason: DropReason::RatingUnparsed,
                        file: c.passage.origin.file.clone(),
                        offset: c.passage.origin.offset,
                        detail: format!(
                            "{}: {}",
                            e.as_str(),
                            sample.raw.chars().take(80).collect::<String>()
                        ),
                    });
                }
            }
            let values: Vec<f64> = samples
                .iter()
                .filter_map(|x| x.value())
                .map(f64::from)
                .collect();
            Some(Rating {
                score: (!values.is_empty())
                    .then(|| values.iter().sum::<f64>() / values.len() as f64),
                model_version: model,
                samples,
                candidate: c,
            })
        },
    )
}

/// The score options of a forced choice, and the text put before them.
pub const FORCED_OPTIONS: [&str; 5] = ["1", "2", "3", "4", "5"];
/// What follows the model's own answer in a forced choice.
pub const FORCED_PREFILL: &str = "\nScore: ";

/// The forced choice asked after every rating answer: `Score: ` then one of 1..5.
fn forced_choice() -> Choice {
    Choice {
        prefill: FORCED_PREFILL.to_owned(),
        options: FORCED_OPTIONS.iter().map(|o| (*o).to_owned()).collect(),
    }
}
