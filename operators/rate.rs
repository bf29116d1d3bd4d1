//! `rate` (paper step 2): the current forward model scores each candidate with the paper's
//! prompt, `samples` times (averaged when more than one). Every answer is kept with its raw text;
//! one that does not parse is counted by reason, never dropped silently.

use super::model_call::{model_call, Ask};
use super::{Time, WorkerStats};
use crate::humpback::prompts::rating_messages;
use crate::humpback::score::{mean_score, parse_score};
use crate::model::sampling::Sampling;
use crate::records::{Candidate, Rating, RatingSample};
use crate::serve::ModelClient;
use crate::stats::{Drop, DropReason};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::rc::Rc;
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
}

impl Default for RateOptions {
    fn default() -> Self {
        RateOptions {
            samples: 1,
            temperature: 0.7,
            max_new_tokens: 96,
            seed: 0,
            max_in_flight: 64,
        }
    }
}

/// The operator. `model` holds the current forward model's version.
pub fn rate<'s>(
    candidates: StreamVec<'s, Time, Candidate>,
    client: ModelClient,
    model: Rc<RefCell<String>>,
    options: RateOptions,
    stats: WorkerStats,
) -> StreamVec<'s, Time, Rating> {
    let ask_model = model.clone();
    let opts = options.clone();
    model_call(
        candidates,
        "Rate",
        client,
        options.max_in_flight,
        move |c: &Candidate| {
            let version = ask_model.borrow().clone();
            let messages = rating_messages(&c.instruction, &c.passage.text);
            (0..opts.samples.max(1))
                .map(|i| Ask {
                    model: version.clone(),
                    messages: messages.clone(),
                    max_new_tokens: opts.max_new_tokens,
                    sampling: if opts.samples <= 1 {
                        Sampling::greedy()
                    } else {
                        Sampling {
                            temperature: opts.temperature,
                            top_p: 1.0,
                            seed: opts.seed
                                ^ c.passage.id
                                ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                        }
                    },
                })
                .collect()
        },
        move |c: Candidate, answers| {
            let mut s = stats.borrow_mut();
            let samples: Vec<RatingSample> = answers
                .into_iter()
                .map(|a| match a.result {
                    Ok(raw) => {
                        let score = parse_score(&raw);
                        RatingSample { raw, score }
                    }
                    Err(e) => RatingSample {
                        raw: String::new(),
                        score: Err(crate::humpback::score::ScoreError::NotANumber(format!(
                            "model error: {e}"
                        ))),
                    },
                })
                .collect();
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
            let scores: Vec<_> = samples.iter().map(|x| x.score.clone()).collect();
            Some(Rating {
                score: mean_score(&scores),
                model_version: model.borrow().clone(),
                samples,
                candidate: c,
            })
        },
    )
}
