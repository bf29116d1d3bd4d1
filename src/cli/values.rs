//! Value parsers for flags whose type admits nonsense: a NaN temperature samples gibberish, a
//! batch of 0 quietly becomes 1, a threshold of 6 curates nothing. Each is rejected when the
//! command line is parsed, before any work, with the flag's name and the accepted range.

/// A sampling temperature: finite, `>= 0` (0 is greedy).
pub fn temperature(s: &str) -> Result<f32, String> {
    let v: f32 = s.parse().map_err(|e| format!("{e}"))?;
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(format!(
            "{v} is not a temperature: a finite number >= 0 (0 is greedy)"
        ))
    }
}

/// A nucleus mass: in `(0, 1]`.
pub fn top_p(s: &str) -> Result<f32, String> {
    let v: f32 = s.parse().map_err(|e| format!("{e}"))?;
    if v > 0.0 && v <= 1.0 {
        Ok(v)
    } else {
        Err(format!("{v} is not a top-p: a number in (0, 1]"))
    }
}

/// A count that must be at least 1 (sizes, steps, samples, token budgets).
pub fn at_least_one(s: &str) -> Result<usize, String> {
    let v: usize = s.parse().map_err(|e| format!("{e}"))?;
    if v >= 1 {
        Ok(v)
    } else {
        Err("must be at least 1".into())
    }
}

/// A `u64` count that must be at least 1 (megabytes per chunk, files in flight).
pub fn at_least_one_u64(s: &str) -> Result<u64, String> {
    at_least_one(s).map(|v| v as u64)
}

/// A score threshold on the paper's 5-point scale: finite, in `[1, 5]`.
pub fn score_threshold(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (1.0..=5.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!(
            "{v} is not a threshold on the 1-5 scale: a number in [1, 5]"
        ))
    }
}

/// A learning rate: finite, `> 0`.
pub fn learning_rate(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(format!("{v} is not a learning rate: a finite number > 0"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonsense_is_rejected_and_sense_kept() {
        for bad in ["NaN", "inf", "-1", "x"] {
            assert!(temperature(bad).is_err(), "{bad}");
            assert!(learning_rate(bad).is_err(), "{bad}");
        }
        assert_eq!(temperature("0"), Ok(0.0));
        assert_eq!(temperature("0.7"), Ok(0.7));
        for bad in ["2", "-1", "NaN", "0"] {
            assert!(top_p(bad).is_err(), "{bad}");
        }
        assert_eq!(top_p("1"), Ok(1.0));
        assert!(at_least_one("0").is_err());
        assert_eq!(at_least_one("3"), Ok(3));
        for bad in ["5.5", "0", "-3", "NaN", "inf"] {
            assert!(score_threshold(bad).is_err(), "{bad}");
        }
        assert_eq!(score_threshold("4.5"), Ok(4.5));
        assert!(learning_rate("0").is_err());
        assert_eq!(learning_rate("2e-4"), Ok(2e-4));
    }
}
