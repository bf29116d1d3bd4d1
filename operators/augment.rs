//! `augment` (paper step 1): the backward model M_yx writes one instruction per passage, with
//! nucleus sampling (paper: T = 0.7, p = 0.9) seeded by the passage's id, so the same passage gets
//! the same instruction on any worker or process.

use super::model_call::{model_call, Ask, Backlog};
use super::{Time, WorkerStats};
use crate::humpback::prompts::augment_messages;
use crate::humpback::rounds::ModelBook;
use crate::model::sampling::Sampling;
use crate::records::{Candidate, Passage};
use crate::serve::ModelClient;
use crate::stats::{Drop, DropReason};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::rc::Rc;
use timely::dataflow::StreamVec;

/// Augmentation settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AugmentOptions {
    /// Sampling temperature.
    pub temperature: f32,
    /// Nucleus mass.
    pub top_p: f32,
    /// Most tokens of an instruction.
    pub max_new_tokens: usize,
    /// Seed mixed with each passage's id.
    pub seed: u64,
    /// Most passages in flight per worker.
    pub max_in_flight: usize,
}

impl Default for AugmentOptions {
    fn default() -> Self {
        AugmentOptions {
            temperature: 0.7,
            top_p: 0.9,
            max_new_tokens: 64,
            seed: 0,
            max_in_flight: 64,
        }
    }
}

/// The operator. `book` holds the backward model's version (see `await_model`).
pub fn augment<'s>(
    passages: StreamVec<'s, Time, Passage>,
    client: ModelClient,
    book: Rc<RefCell<ModelBook>>,
    options: AugmentOptions,
    stats: WorkerStats,
) -> StreamVec<'s, Time, Candidate> {
    let ask_book = book.clone();
    let opts = options.clone();
    model_call(
        passages,
        "Augment",
        client,
        options.max_in_flight,
        Backlog::default(),
        move |p: &Passage| {
            vec![Ask {
                model: ask_book.borrow().backward.clone().unwrap_or_default(),
                choose: None,
                raw_prompt: None,
                choose_after: None,
                messages: augment_messages(&p.text),
                max_new_tokens: opts.max_new_tokens,
                sampling: Sampling {
                    temperature: opts.temperature,
                    top_p: opts.top_p,
                    seed: opts.seed ^ p.id,
                },
            }]
        },
        move |p: Passage, answers| {
            let version = book.borrow().backward.clone().unwrap_or_default();
            let failure = |detail: String| Drop {
                reason: DropReason::AugmentFailed,
                file: p.origin.file.clone(),
                offset: p.origin.offset,
                detail,
            };
            match answers.into_iter().next().map(|a| a.result) {
                Some(Ok(text)) if !text.trim().is_empty() => Some(Candidate {
                    instruction: text.trim().to_owned(),
                    passage: p,
                    augment_version: version,
                }),
                Some(Ok(_)) => {
                    stats.borrow_mut().drop(failure("empty instruction".into()));
                    None
                }
                Some(Err(e)) => {
                    stats.borrow_mut().drop(failure(e.to_string()));
                    None
                }
                None => {
                    stats.borrow_mut().drop(failure("no answer".into()));
                    None
                }
            }
        },
    )
}
