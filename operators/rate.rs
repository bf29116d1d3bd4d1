//! `rate` (paper step 2): the current forward model scores each candidate with the paper's
//! prompt, `samples` times (averaged when more than one). Every answer is kept with its raw text;
//! one that does not parse is counted by reason, never dropped silently.

use super::model_call::{model_call, Ask, Backlog};
use super::{Time, WorkerStats};
use crate::humpback::prompts::rating_messages;
use crate::humpback::score::parse_score;
use crate::model::sampling::Sampling;
use crate::records::{Candidate, Rating, RatingSample};
use crate::serve::{Choice, GenAnswer, ModelClient};
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
            max_new_tokens: 128,
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

/// The operator. `backlog` counts the jobs waiting for the model server (see
/// [`super::rerate`], which holds back a re-rating by it).
pub fn rate<'s>(
    jobs: StreamVec<'s, Time, RateJob>,
    client: ModelClient,
    options: RateOptions,
    stats: WorkerStats,
    backlog: Backlog,
) -> StreamVec<'s, Time, Rating> {
    model_call(
        jobs,
        "Rate",
        client,
        options.max_in_flight,
        backlog,
        move |job: &RateJob| {
            let c = &job.candidate;
            rating_asks(
                &c.instruction,
                &c.passage.text,
                &job.model,
                c.passage.id,
                &options,
            )
        },
        move |job: RateJob, answers| {
            let RateJob {
                candidate: c,
                model,
            } = job;
            let samples = read_samples(answers);
            let mut s = stats.borrow_mut();
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
            Some(rating_of(c, model, samples))
        },
    )
}

/// The requests that rate the pair (`instruction`, `output`) with model `version`: the paper's
/// prompt, `options.samples` times, each followed by the forced choice when asked for. `id`
/// seeds the sampling (a passage id: the same pair gets the same ratings anywhere).
pub fn rating_asks(
    instruction: &str,
    output: &str,
    version: &str,
    id: u64,
    options: &RateOptions,
) -> Vec<Ask> {
    let messages = rating_messages(instruction, output);
    (0..options.samples.max(1))
        .map(|i| Ask {
            model: version.to_owned(),
            messages: messages.clone(),
            max_new_tokens: options.max_new_tokens,
            choose: None,
            // Cheap enough to ask always: its probabilities make the graded score, and its
            // pick is the score of an answer that has none.
            raw_prompt: None,
            choose_after: options.forced_fallback.then(forced_choice),
            sampling: if options.samples <= 1 {
                Sampling::greedy()
            } else {
                Sampling {
                    temperature: options.temperature,
                    top_p: 1.0,
                    seed: options.seed ^ id ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                }
            },
        })
        .collect()
}

/// The rating samples read from the answers to [`rating_asks`]: each answer's parsed score or
/// why it has none, the forced pick when it has none, and the forced choice's probabilities.
pub fn read_samples(answers: Vec<GenAnswer>) -> Vec<RatingSample> {
    answers
        .into_iter()
        .map(|a| match a.result {
            Ok(raw) => {
                let score = parse_score(&raw);
                let forced = match score {
                    Ok(_) => None,
                    Err(_) => a.choice.and_then(|t| t.parse::<u8>().ok()),
                };
                RatingSample {
                    raw,
                    score,
                    forced,
                    forced_probs: a.choice_probs,
                }
            }
            Err(e) => RatingSample {
                raw: String::new(),
                score: Err(crate::humpback::score::ScoreError::ModelError(
                    e.to_string(),
                )),
                forced: None,
                forced_probs: None,
            },
        })
        .collect()
}

/// A candidate's rating from the answers to its [`rating_asks`].
pub fn rate_samples_of(
    candidate: Candidate,
    model_version: String,
    answers: Vec<GenAnswer>,
) -> Rating {
    rating_of(candidate, model_version, read_samples(answers))
}

/// A candidate's rating from its samples: the mean of their scores (parsed, else forced) and
/// the mean of their graded scores.
pub fn rating_of(
    candidate: Candidate,
    model_version: String,
    samples: Vec<RatingSample>,
) -> Rating {
    let mean = |values: Vec<f64>| {
        (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
    };
    Rating {
        score: mean(
            samples
                .iter()
                .filter_map(|x| x.value())
                .map(f64::from)
                .collect(),
        ),
        graded: mean(samples.iter().filter_map(RatingSample::graded).collect()),
        model_version,
        samples,
        candidate,
    }
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
