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

/// Which published judge prompt asks for the verdict. Both are asked in both orders and feed
/// both rules; they differ in wording and in the verdict's tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum JudgePrompt {
    /// MT-Bench's pairwise prompt ("pair-v2"): reasoning, then `[[A]]`, `[[B]]` or `[[C]]`
    /// (tie); the prob rule opens the judge's turn with `[[`.
    MtBench,
    /// AlpacaEval's ranking prompt (`alpaca_eval_gpt4`): the judge ranks two outputs named `m`
    /// and `M` (AlpacaEval 2's one-token names) in a Python list; no tie. The prob rule opens
    /// the list (`[\n    {'model': '`) and reads the probabilities of `m` and `M`. Measured
    /// with the small judges that run here (README, "Is the judge valid?"), it tells good answers
    /// from poor ones far more often than MT-Bench's prompt: the default.
    #[default]
    AlpacaEval,
    /// AlpacaEval's ranking prompt, the same conversation, but the prob rule reads the *rank*
    /// the judge gives the first-shown answer rather than which name it lists first: the turn
    /// is opened with `[\n    {'model': 'm', 'rank': ` and the probabilities of `1` and `2` are
    /// read. A small judge tends to list the models in the order shown and put its judgement in
    /// the ranks, which the `m`/`M` choice of [`JudgePrompt::AlpacaEval`] does not see. The text
    /// rule reads the written ranking exactly as for [`JudgePrompt::AlpacaEval`].
    AlpacaEvalRank,
}

/// AlpacaEval's ranking judge: its system prompt.
pub const ALPACA_EVAL_SYSTEM: &str =
    "You are a helpful assistant, that ranks models by the quality of their answers.";

impl JudgePrompt {
    /// Its name in `eval.json` and the flags.
    pub fn name(self) -> &'static str {
        match self {
            JudgePrompt::MtBench => "mt-bench",
            JudgePrompt::AlpacaEval => "alpaca-eval",
            JudgePrompt::AlpacaEvalRank => "alpaca-eval-rank",
        }
    }

    /// The conversation that asks the judge about `question` with answers `a` then `b`.
    pub fn messages(self, question: &str, a: &str, b: &str) -> Vec<Message> {
        match self {
            JudgePrompt::MtBench => judge_messages(question, a, b),
            JudgePrompt::AlpacaEval | JudgePrompt::AlpacaEvalRank => vec![
                Message::system(ALPACA_EVAL_SYSTEM),
                Message::user(format!(
                    "I want you to create a leaderboard of different large-language models. To do so, I will give you the instructions (prompts) given to the models, and the responses of two models. Please rank the models based on which responses would be preferred by humans. All inputs and outputs should be python dictionaries.\n\nHere is the prompt:\n{{\n    \"instruction\": \"\"\"{}\"\"\",\n}}\n\nHere are the outputs of the models:\n[\n    {{\n        \"model\": \"m\",\n        \"answer\": \"\"\"{}\"\"\"\n    }},\n    {{\n        \"model\": \"M\",\n        \"answer\": \"\"\"{}\"\"\"\n    }}\n]\n\nNow please rank the models by the quality of their answers, so that the model with rank 1 has the best output. Then return a list of the model names and ranks, i.e., produce the following output:\n[\n    {{'model': <model-name>, 'rank': <model-rank>}},\n    {{'model': <model-name>, 'rank': <model-rank>}}\n]\n\nYour response must be a valid Python dictionary and should contain nothing else because we will directly execute it in Python. Please provide the ranking that the majority of humans would give.",
                    question.trim(),
                    a.trim(),
                    b.trim()
                )),
            ],
        }
    }

    /// What the prob rule's forced choice writes before the verdict token.
    pub fn prefill(self) -> &'static str {
        match self {
            JudgePrompt::MtBench => VERDICT_PREFILL,
            JudgePrompt::AlpacaEval => "[\n    {'model': '",
            JudgePrompt::AlpacaEvalRank => "[\n    {'model': 'm', 'rank': ",
        }
    }

    /// The verdict tokens, first shown, second shown, then the tie when the prompt has one.
    pub fn options(self) -> &'static [&'static str] {
        match self {
            JudgePrompt::MtBench => &VERDICT_OPTIONS,
            JudgePrompt::AlpacaEval => &["m", "M"],
            // Rank 1 for `m` (the first shown) is a verdict for A, rank 2 one for B.
            JudgePrompt::AlpacaEvalRank => &["1", "2"],
        }
    }

    /// The verdict a forced choice's option names.
    pub fn verdict_of_option(self, option: &str) -> Option<Verdict> {
        match self.options().iter().position(|o| *o == option)? {
            0 => Some(Verdict::A),
            1 => Some(Verdict::B),
            _ => Some(Verdict::Tie),
        }
    }

    /// Reads the verdict of a written judgment.
    pub fn parse(self, answer: &str) -> Result<Verdict, VerdictError> {
        match self {
            JudgePrompt::MtBench => parse_verdict(answer),
            JudgePrompt::AlpacaEval | JudgePrompt::AlpacaEvalRank => parse_ranking(answer),
        }
    }
}

/// Reads AlpacaEval's ranking: the entries `{'model': 'm' | 'M', 'rank': N}` (either quote);
/// the verdict is the one model ranked 1. Two models ranked 1, or none, is no verdict.
pub fn parse_ranking(answer: &str) -> Result<Verdict, VerdictError> {
    static ENTRY: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let entry = ENTRY.get_or_init(|| {
        regex::Regex::new(r#"['"]model['"]\s*:\s*['"]([mM])['"]\s*,\s*['"]rank['"]\s*:\s*(\d+)"#)
            .expect("a valid pattern")
    });
    let firsts: Vec<Verdict> = entry
        .captures_iter(answer)
        .filter(|c| &c[2] == "1")
        .map(|c| if &c[1] == "m" { Verdict::A } else { Verdict::B })
        .collect();
    match firsts[..] {
        [v] => Ok(v),
        [a, b] if a == b => Ok(a),
        _ => Err(VerdictError::Missing),
    }
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
/// the first shown, the second shown and (when the prompt has one) the tie, a tie counting
/// half, renormalised over the options; `None` when they are all 0 or not two or three.
pub fn model_better(order: Order, probs: &[f32]) -> Option<f64> {
    let (a, b, c) = match *probs {
        [a, b] => (a, b, 0.0),
        [a, b, c] => (a, b, c),
        _ => return None,
    };
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
        assert_eq!(combine_prob(&[0.5], &[0.5, 0.5, 0.0]), None);
        assert_eq!(combine_prob(&[0.2, 0.2, 0.2, 0.4], &[0.5, 0.5]), None);
        // A prompt with no tie (AlpacaEval's): model first with P(m) = 0.8, P(M) = 0.2 -> 0.8;
        // baseline first with P(m) = 0.6, P(M) = 0.2 -> 0.2 / 0.8 = 0.25. Mean 0.525: a win.
        let (p, o) = combine_prob(&[0.8, 0.2], &[0.6, 0.2]).expect("probs");
        assert!((p - 0.525).abs() < 1e-6, "{p}");
        assert_eq!(o, Outcome::Win);
    }

    #[test]
    fn rankings_read_from_text() {
        let ranked = |first: &str, second: &str| {
            format!("[\n    {{'model': '{first}', 'rank': 1}},\n    {{'model': '{second}', 'rank': 2}}\n]")
        };
        assert_eq!(parse_ranking(&ranked("m", "M")), Ok(Verdict::A));
        assert_eq!(parse_ranking(&ranked("M", "m")), Ok(Verdict::B));
        // Rank 1 listed second, double quotes, no spaces.
        assert_eq!(
            parse_ranking(r#"[{"model":"m","rank":2},{"model":"M","rank":1}]"#),
            Ok(Verdict::B)
        );
        for bad in [
            "",
            "M is better.",
            "[{'model': 'm', 'rank': 1}, {'model': 'M', 'rank': 1}]",
            "[{'model': 'x', 'rank': 1}]",
            "[{'model': 'm', 'rank': 2}, {'model': 'M', 'rank': 3}]",
            "[{'model': 'm', 'rank': 10}]",
        ] {
            assert_eq!(parse_ranking(bad), Err(VerdictError::Missing), "{bad:?}");
        }
    }

    #[test]
    fn each_prompt_names_its_options_in_the_order_shown() {
        for prompt in [
            JudgePrompt::MtBench,
            JudgePrompt::AlpacaEval,
            JudgePrompt::AlpacaEvalRank,
        ] {
            let m = prompt.messages("Q?", "first answer", "second answer");
            let u = &m[1].content;
            let (a, b) = (
                u.find("first answer").expect("a"),
                u.find("second answer").expect("b"),
            );
            assert!(a < b, "{prompt:?}");
            let opts = prompt.options();
            assert_eq!(prompt.verdict_of_option(opts[0]), Some(Verdict::A));
            assert_eq!(prompt.verdict_of_option(opts[1]), Some(Verdict::B));
            assert_eq!(prompt.verdict_of_option("zz"), None);
        }
        assert_eq!(
            JudgePrompt::MtBench.verdict_of_option("C"),
            Some(Verdict::Tie)
        );
        // AlpacaEval's answer `m` is the first shown: its prefill ends where the name goes.
        let u = JudgePrompt::AlpacaEval.messages("Q?", "a", "b")[1]
            .content
            .clone();
        assert!(u.find("\"model\": \"m\"").expect("m") < u.find("\"model\": \"M\"").expect("M"));
        assert!(JudgePrompt::AlpacaEval.prefill().ends_with("'model': '"));
        // The rank variant asks the same question and fixes the first-listed name to `m`, the
        // first shown, so rank `1` is a verdict for A.
        assert_eq!(
            JudgePrompt::AlpacaEvalRank.messages("Q?", "a", "b"),
            JudgePrompt::AlpacaEval.messages("Q?", "a", "b")
        );
        assert!(JudgePrompt::AlpacaEvalRank
            .prefill()
            .ends_with("{'model': 'm', 'rank': "));
        assert_eq!(
            JudgePrompt::AlpacaEvalRank.verdict_of_option("1"),
            Some(Verdict::A)
        );
        assert_eq!(
            JudgePrompt::AlpacaEvalRank.verdict_of_option("2"),
            Some(Verdict::B)
        );
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
