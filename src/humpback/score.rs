//! Parsing self-ratings. Public reimplementations lost 45% to 67% of pairs here ("Score: 10",
//! "1986", no score at all); we parse the *last* `Score: N` line with N in 1..=5, after removing
//! reasoning blocks, and report every failure with its reason instead of dropping it silently.

use serde::{Deserialize, Serialize};

/// Why a rating could not be read. Serde's default (externally tagged) representation: ratings
/// cross processes with bincode, which cannot read internally or adjacently tagged enums; the
/// JSON outputs spell it `{"kind", "value"}` themselves (`output::ScoreErrorLine`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoreError {
    /// No `Score:` at all.
    NoScore,
    /// A `Score:` whose value is not a number.
    NotANumber(String),
    /// A number outside 1..=5 (e.g. "Score: 10").
    OutOfRange(String),
    /// The model gave no answer to read (the server's error).
    ModelError(String),
}

impl ScoreError {
    /// A stable name for metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            ScoreError::NoScore => "no_score",
            ScoreError::NotANumber(_) => "not_a_number",
            ScoreError::OutOfRange(_) => "out_of_range",
            ScoreError::ModelError(_) => "model_error",
        }
    }

    /// The text that was not a score, if any.
    pub fn detail(&self) -> Option<&str> {
        match self {
            ScoreError::NoScore => None,
            ScoreError::NotANumber(s) | ScoreError::OutOfRange(s) | ScoreError::ModelError(s) => {
                Some(s)
            }
        }
    }
}

/// The score of one rating answer.
pub fn parse_score(answer: &str) -> Result<u8, ScoreError> {
    let text = strip_reasoning(answer);
    let lower = text.to_ascii_lowercase();
    // The last occurrence wins: the paper asks for the score on the last line, and models often
    // quote the scale ("a score of 5 means...") before giving theirs.
    let Some(at) = lower.rfind("score") else {
        return Err(ScoreError::NoScore);
    };
    let rest = &text[at + "score".len()..];
    // Accept "Score: 4", "Score - 4", "**Score:** 4", "score: [4]", "Score: 4/5", "Score: 4.0".
    let rest = rest.trim_start_matches(|c: char| {
        c == ':' || c == '*' || c == '-' || c == '=' || c.is_whitespace()
    });
    let rest = rest.trim_start_matches(['[', '(', '*', '<']);
    let token: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    if token.is_empty() {
        let shown: String = rest.chars().take(20).collect();
        return Err(ScoreError::NotANumber(shown));
    }
    let value: f64 = token
        .trim_end_matches('.')
        .parse()
        .map_err(|_| ScoreError::NotANumber(token.clone()))?;
    if value.fract() != 0.0 || !(1.0..=5.0).contains(&value) {
        return Err(ScoreError::OutOfRange(token));
    }
    Ok(value as u8)
}

/// Removes `<think>...</think>` reasoning blocks (and an unterminated one to the end).
fn strip_reasoning(answer: &str) -> String {
    let mut out = String::with_capacity(answer.len());
    let mut rest = answer;
    while let Some(start) = rest.find("<think>") {
        out.push_str(&rest[..start]);
        match rest[start..].find("</think>") {
            Some(end) => rest = &rest[start + end + "</think>".len()..],
            None => {
                rest = "";
                break;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The mean of `n` sampled ratings, counting only those that parsed; `None` when none did.
pub fn mean_score(scores: &[Result<u8, ScoreError>]) -> Option<f64> {
    let ok: Vec<f64> = scores
        .iter()
        .filter_map(|s| s.as_ref().ok())
        .map(|&s| s as f64)
        .collect();
    (!ok.is_empty()).then(|| ok.iter().sum::<f64>() / ok.len() as f64)
}

#[cfg(test)]
mod tests {
    /// Ratings cross processes with bincode (timely's exchange): every variant must come back.
    #[test]
    fn score_errors_survive_bincode() {
        for e in [
            ScoreError::NoScore,
            ScoreError::NotANumber("ten".into()),
            ScoreError::OutOfRange("10".into()),
        ] {
            let sample = crate::records::RatingSample {
                raw: "It is fine.".into(),
                score: Err(e),
                forced: Some(4),
                forced_probs: Some(vec![0.1, 0.2, 0.3, 0.25, 0.05]),
            };
            let bytes = bincode::serialize(&sample).expect("serialize");
            let back: crate::records::RatingSample =
                bincode::deserialize(&bytes).expect("deserialize");
            assert_eq!(back, sample);
        }
    }

    use super::*;

    #[test]
    fn reads_the_last_score_line() {
        assert_eq!(parse_score("The answer is complete.\nScore: 4"), Ok(4));
        assert_eq!(
            parse_score("A score of 5 means perfect. Mine:\nScore: 3"),
            Ok(3)
        );
        assert_eq!(parse_score("**Score:** 5"), Ok(5));
        assert_eq!(parse_score("score - 2/5"), Ok(2));
        assert_eq!(parse_score("Score: [1]"), Ok(1));
        assert_eq!(parse_score("Score: 4.0"), Ok(4));
        assert_eq!(
            parse_score("<think>Score: 1? no</think>Fine.\nScore: 5\n"),
            Ok(5)
        );
    }

    #[test]
    fn bad_answers_are_reasons_not_panics() {
        assert_eq!(
            parse_score("What a lovely passage about boats."),
            Err(ScoreError::NoScore)
        );
        assert_eq!(parse_score(""), Err(ScoreError::NoScore));
        assert_eq!(
            parse_score("Score: 10"),
            Err(ScoreError::OutOfRange("10".into()))
        );
        assert_eq!(
            parse_score("Score: 0"),
            Err(ScoreError::OutOfRange("0".into()))
        );
        assert_eq!(
            parse_score("Score: 1986"),
            Err(ScoreError::OutOfRange("1986".into()))
        );
        assert_eq!(
            parse_score("Score: 4.5"),
            Err(ScoreError::OutOfRange("4.5".into()))
        );
        assert_eq!(
            parse_score("Score: excellent"),
            Err(ScoreError::NotANumber("excellent".into()))
        );
        assert_eq!(parse_score("<think>Score: 5"), Err(ScoreError::NoScore));
        // Non-ASCII around the score never splits a character.
        assert_eq!(parse_score("Évalué — Score: 3 ✓"), Ok(3));
    }

    #[test]
    fn mean_counts_only_parsed_ratings() {
        assert_eq!(
            mean_score(&[Ok(4), Err(ScoreError::NoScore), Ok(5)]),
            Some(4.5)
        );
        assert_eq!(mean_score(&[Err(ScoreError::NoScore)]), None);
    }
}
