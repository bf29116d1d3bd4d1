//! `curate` (paper step 2, the filter): keep candidates whose score reaches `k` (the paper's A5 is
//! `k = 5`, A4 `k = 4`; with averaged samples, fractional thresholds such as 4.5 work), and whose
//! instruction length is plausible. Each drop is counted by reason.

use super::{Time, WorkerStats};
use crate::records::Rating;
use crate::stats::{Drop, DropReason};
use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::Operator;
use timely::dataflow::StreamVec;

/// Curation settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CurateOptions {
    /// Keep ratings with a score at or above this.
    pub threshold: f64,
    /// Shortest instruction kept, in characters.
    pub min_instruction_chars: usize,
    /// Longest instruction kept, in characters.
    pub max_instruction_chars: usize,
    /// Compare the graded score ([`Rating::graded`]: the parsed score where the model wrote
    /// one, else the expected value of its forced choice) with the threshold, instead of the
    /// paper's score (parsed, else the forced choice's pick).
    #[serde(default)]
    pub graded: bool,
}

impl Default for CurateOptions {
    fn default() -> Self {
        CurateOptions {
            threshold: 5.0,
            min_instruction_chars: 10,
            max_instruction_chars: 1000,
            graded: false,
        }
    }
}

/// Why a rating is not curated, if it is not.
pub fn verdict(rating: &Rating, options: &CurateOptions) -> Option<(DropReason, String)> {
    let n = rating.candidate.instruction.chars().count();
    let score = if options.graded {
        rating.graded
    } else {
        rating.score
    };
    match score {
        None => Some((DropReason::Unrated, "no rating parsed".into())),
        Some(s) if s < options.threshold => {
            Some((DropReason::BelowThreshold, format!("score {s}")))
        }
        Some(_) if n < options.min_instruction_chars => {
            Some((DropReason::InstructionLength, format!("{n} chars")))
        }
        Some(_) if n > options.max_instruction_chars => {
            Some((DropReason::InstructionLength, format!("{n} chars")))
        }
        Some(_) => None,
    }
}

/// The operator: passes the curated ratings through.
pub fn curate<'s>(
    ratings: StreamVec<'s, Time, Rating>,
    options: CurateOptions,
    stats: WorkerStats,
) -> StreamVec<'s, Time, Rating> {
    ratings.unary(Pipeline, "Curate", move |_cap, _info| {
        move |input, output| {
            input.for_each_stamp(|cap, data| {
                let mut session = output.session(&cap);
                for r in data.flat_map(|d| d.drain(..)) {
                    match verdict(&r, &options) {
                        None => session.give(r),
                        Some((reason, detail)) => stats.borrow_mut().drop(Drop {
                            reason,
                            file: r.candidate.passage.origin.file.clone(),
                            offset: r.candidate.passage.origin.offset,
                            detail,
                        }),
                    }
                }
            });
        }
    })
}
