//! Pairwise judging: the judge sees an instruction and two answers and says which is better,
//! once in each order (A = model, B = baseline, then swapped) to cancel its position bias.
//!
//! The prompt is MT-Bench's pairwise judge prompt ("pair-v2", Zheng et al. 2023, FastChat's
//! `judge_prompts.jsonl`), the protocol AlpacaEval and MT-Bench use with a strong judge; its
//! instructions are kept, the question and answers framed as there.
//!
//! Two rules turn the two judge answers of a pair into one verdict, both reported:
//! - **text** (MT-Bench's rule): the judge writes its reasoning and a final `[[A]]`, `[[B]]` or
//!   `[[C]]` (tie); a side wins only when both orders name it, any disagreement is a tie, and a
//!   pair with an order whose verdict cannot be read is `unparsed`.
//! - **prob**: the judge's turn is opened with `[[` and the next-token probabilities of `A`, `B`
//!   and `C` are read (as `rate`'s forced score is). The model's probability of being better in
//!   one order is `P(its letter) + P(C)/2`, renormalised over the three; the two orders are
//!   averaged, and the model wins when the average is above 1/2, loses below, ties at 1/2.
//!   Small judges name the same position whatever the answers (measured in the README), which
//!   the text rule turns into ties; their probabilities still move with the answers.

use crate::model::chat::Message;
use serde::{Deserialize, Serialize};

/// The judge's system prompt: MT-Bench's pairwise judge ("pair-v2").
pub const JUDGE_SYSTEM: &str = "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to the user question displayed below. You should choose the assistant that follows the user's instructions and answers the user's question better. Your evaluation should consider factors such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of their responses. Begin your evaluation by comparing the two responses and provide a short explanation. Avoid any position biases and ensure that the order in which the responses were presented does not influence your decision. Do not allow the length of the responses to influence your evaluation. Do not favor certain names of the assistants. Be as objective as possible. After providing your explanation, output your final verdict by strictly following this format: \"[[A]]\" if assistant A is better, \"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie.";

/// What the prob rule's forced choice writes before the verdict letter.
pub const VERDICT_PREFILL: &str = "[[";
/// The verdict letters, in the order the forced choice reports their probabilities.
pub const VERDICT_OPTIONS: [&str; 3] = ["A", "B", "C"];

/// The conversation that asks the judge about `question` with answers `a` then `b`.
pub fn judge_messages(question: &str, a: &str, b: &str) -> Vec<Message> {
    vec![
        Message::system(JUDGE_SYSTEM),
        Message::user(format!(
            "[User Question]\n{}\n\n[The Start of Assistant A's Answer]\n{}\n[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n{}\n[The End of Assistant B's Answer]",
            question.trim(),
            a.trim(),
            b.trim()
        )),
    ]
}

/// One judge verdict about a presented pair: which position was better (`"A"`, `"B"`, `"tie"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// The first answer shown (assistant A).
    A,
    /// The second answer shown (assistant B).
    B,
    /// Neither.
    #[serde(rename = "tie")]
    Tie,
}

/// Why a judge answer gave no verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerdictError {
    /// No `[[A]]`, `[[B]]` or `[[C]]` in the answer.
    Missing,
    /// The model call failed.
    Model(String),
}

/// Reads the verdict of a judge answer: the *last* `[[A]]`, `[[B]]` or `[[C]]` (judges often
/// restate the format before giving theirs), case and inner spaces tolerated (`[[ a ]]`).
pub fn parse_verdict(answer: &str) -> Result<Verdict, VerdictError> {
    let mut found = None;
    let mut rest = answer;
    while let Some(at) = rest.find("[[") {
        let after = &rest[at + 2..];
        if let Some(end) = after.find("]]") {
            let inner = after[..end].trim();
            let v = match inner {
                "A" | "a" => Some(Verdict::A),
                "B" | "b" => Some(Verdict::B),
                "C" | "c" => Some(Verdict::Tie),
                _ => None,
            };
            if v.is_some() {
                found = v;
            }
        }
        rest = after;
    }
    found.ok_or(VerdictError::Missing)
}

/// The order a pair was shown in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// The model's answer as A, the baseline's as B.
    ModelFirst,
    /// The baseline's answer as A, the model's as B.
    BaselineFirst,
}

/// A pair's outcome for the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The model's answer is better.
    Win,
    /// The baseline's is.
    Loss,
    /// Even.
    Tie,
}

/// A verdict about positions, as an outcome for the model in that order.
pub fn outcome_of(order: Order, verdict: Verdict) -> Outcome {
    match (order, verdict) {
        (_, Verdict::Tie) => Outcome::Tie,
        (Order::ModelFirst, Verdict::A) | (Order::BaselineFirst, Verdict::B) => Outcome::Win,
        _ => Outcome::Loss,
    }
}

/// The text rule: both orders must agree for a win or a loss; otherwise a tie.
pub fn combine_text(model_first: Verdict, baseline_first: Verdict) -> Outcome {
    match (
        outcome_of(Order::ModelFirst, model_first),
        outcome_of(Order::BaselineFirst, baseline_first),
    ) {
        (Outcome::Win, Outcome::Win) => Outcome::Win,
        (Outcome::Loss, Outcome::Loss) => Outcome::Loss,
        _ => Outcome::Tie,
    }
}

/// The model's probability of being better in one order, from the judge's probabilities of
/// `A`, `B`, `C` (a tie counts half), renormalised over the three; `None` when they are all 0.
pub fn model_better(order: Order, probs: &[f32]) -> Option<f64> {
    let [a, b, c] = <[f32; 3]>::try_from(probs).ok()?;
    let (a, b, c) = (a as f64, b as f64, c as f64);
    let total = a + b + c;
    if total <= 0.0 || !total.is_finite() {
        return None;
    }
    let mine = match order {
        Order::ModelFirst => a,
        Order::BaselineFirst => b,
    };
    Some((mine + c / 2.0) / total)
}

/// How close to 1/2 the prob rule's mean must be to call a tie.
pub const TIE_EPSILON: f64 = 1e-6;

/// The prob rule: the mean of the two orders' [`model_better`], and the outcome it gives.
pub fn combine_prob(model_first: &[f32], baseline_first: &[f32]) -> Option<(f64, Outcome)> {
    let p = (model_better(Order::ModelFirst, model_first)?
        + model_better(Order::BaselineFirst, baseline_first)?)
        / 2.0;
    // Two identical answers give the same prompt in both orders, so p is 1/2 up to rounding:
    // a tie, not a coin flip on the last bit.
    let outcome = if (p - 0.5).abs() <= TIE_EPSILON {
        Outcome::Tie
    } else if p > 0.5 {
        Outcome::Win
    } else {
        Outcome::Loss
    };
    Some((p, outcome))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_read_from_text() {
        assert_eq!(parse_verdict("A is more precise. [[A]]"), Ok(Verdict::A));
        assert_eq!(parse_verdict("[[B]]"), Ok(Verdict::B));
        assert_eq!(parse_verdict("Both are fine: [[C]]"), Ok(Verdict::Tie));
        assert_eq!(parse_verdict("verdict: [[ b ]]."), Ok(Verdict::B));
        // The format restated first, the verdict last.
        assert_eq!(
            parse_verdict("Output \"[[A]]\" if A is better... My verdict: [[B]]"),
            Ok(Verdict::B)
        );
    }

    #[test]
    fn garbage_and_missing_verdicts_are_errors() {
        for bad in [
            "",
            "Assistant A is better.",
            "[[D]]",
            "[[A]",
            "[[]]",
            "[[AB]]",
            "[A]",
            "[[ünïcode]] ✓",
        ] {
            assert_eq!(parse_verdict(bad), Err(VerdictError::Missing), "{bad:?}");
        }
        // A valid verdict survives garbage after it.
        assert_eq!(parse_verdict("[[A]] [[Z]] [["), Ok(Verdict::A));
    }

    #[test]
    fn each_order_maps_positions_to_the_model() {
        assert_eq!(outcome_of(Order::ModelFirst, Verdict::A), Outcome::Win);
        assert_eq!(outcome_of(Order::ModelFirst, Verdict::B), Outcome::Loss);
        assert_eq!(outcome_of(Order::BaselineFirst, Verdict::A), Outcome::Loss);
        assert_eq!(outcome_of(Order::BaselineFirst, Verdict::B), Outcome::Win);
        assert_eq!(outcome_of(Order::BaselineFirst, Verdict::Tie), Outcome::Tie);
    }

    #[test]
    fn text_rule_needs_both_orders_to_agree() {
        // The model's answer named in both orders.
        assert_eq!(combine_text(Verdict::A, Verdict::B), Outcome::Win);
        assert_eq!(combine_text(Verdict::B, Verdict::A), Outcome::Loss);
        // Position bias: the judge always says A.
        assert_eq!(combine_text(Verdict::A, Verdict::A), Outcome::Tie);
        assert_eq!(combine_text(Verdict::Tie, Verdict::B), Outcome::Tie);
    }

    #[test]
    fn prob_rule_averages_the_orders() {
        // Order 1: model is A with P(A) = 0.6, P(B) = 0.3, P(C) = 0.1 -> 0.65.
        // Order 2: model is B with P(A) = 0.7, P(B) = 0.2, P(C) = 0.1 -> 0.25.
        // Mean 0.45: a loss, though the text rule would call this position bias a tie.
        let (p, o) = combine_prob(&[0.6, 0.3, 0.1], &[0.7, 0.2, 0.1]).expect("probs");
        assert!((p - 0.45).abs() < 1e-6, "{p}");
        assert_eq!(o, Outcome::Loss);
        // Probabilities that leave mass outside A/B/C are renormalised: 0.3/(0.3+0.1) = 0.75,
        // and 0.2/(0.2+0.2) = 0.5 -> 0.625.
        let (p, o) = combine_prob(&[0.3, 0.1, 0.0], &[0.2, 0.2, 0.0]).expect("probs");
        assert!((p - 0.625).abs() < 1e-6, "{p}");
        assert_eq!(o, Outcome::Win);
        let (p, o) = combine_prob(&[0.5, 0.5, 0.0], &[0.0, 0.0, 1.0]).expect("probs");
        assert_eq!((p, o), (0.5, Outcome::Tie));
        // Identical answers: the same prompt twice, so the same probabilities in both orders.
        let same = [0.41f32, 0.47, 0.12];
        let (p, o) = combine_prob(&same, &same).expect("probs");
        assert!((p - 0.5).abs() < 1e-9, "{p}");
        assert_eq!(o, Outcome::Tie);
        assert_eq!(combine_prob(&[0.0, 0.0, 0.0], &[0.5, 0.5, 0.0]), None);
        assert_eq!(combine_prob(&[0.5, 0.5], &[0.5, 0.5, 0.0]), None);
    }

    #[test]
    fn the_judge_sees_both_answers_in_the_order_given() {
        let m = judge_messages("Q?", "first", "second");
        assert_eq!(m.len(), 2);
        let u = &m[1].content;
        let (a, b) = (u.find("first").expect("a"), u.find("second").expect("b"));
        assert!(a < b);
        assert!(u.starts_with("[User Question]\nQ?"));
    }
}
