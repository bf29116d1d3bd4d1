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
    // Whitespace does not make an instruction plausible.
    let n = rating.candidate.instruction.trim().chars().count();
    if rating.candidate.passage.text.trim().is_empty() {
        return Some((DropReason::EmptyOutput, "the output is empty".into()));
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::humpback::score::ScoreError;
    use crate::records::{Candidate, RatingSample};

    /// A rating of a model that wrote no score: forced pick 5, but its probabilities over
    /// 1..5 (0.1, 0.1, 0.2, 0.2, 0.4) give an expected 3.7 = (0.1 + 0.2 + 0.6 + 0.8 + 2.0).
    fn unscored() -> Rating {
        let sample = RatingSample {
            raw: "A fine answer.".into(),
            score: Err(ScoreError::NoScore),
            forced: Some(5),
            forced_probs: Some(vec![0.1, 0.1, 0.2, 0.2, 0.4]),
        };
        crate::operators::rate::rating_of(
            Candidate::given("f", 0, "Explain the tides.", "The moon pulls the sea."),
            "v".into(),
            vec![sample],
        )
    }

    #[test]
    fn graded_curation_uses_the_expected_score() {
        let r = unscored();
        assert_eq!(r.score, Some(5.0));
        assert!((r.graded.expect("graded") - 3.7).abs() < 1e-6);
        let paper = CurateOptions::default();
        assert_eq!(
            verdict(&r, &paper),
            None,
            "the forced pick of 5 is curated at A5"
        );
        let graded = CurateOptions {
            graded: true,
            ..CurateOptions::default()
        };
        assert!(matches!(
            verdict(&r, &graded),
            Some((DropReason::BelowThreshold, _))
        ));
        let graded_35 = CurateOptions {
            threshold: 3.5,
            ..graded
        };
        assert_eq!(verdict(&r, &graded_35), None);
    }

    /// A score the model wrote is the graded score too: the paper's parse stays in charge.
    #[test]
    fn a_written_score_wins_over_the_probabilities() {
        let mut r = unscored();
        r.samples[0].score = Ok(2);
        let r = crate::operators::rate::rating_of(r.candidate, r.model_version, r.samples);
        assert_eq!((r.score, r.graded), (Some(2.0), Some(2.0)));
    }
}
