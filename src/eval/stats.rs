//! The arithmetic of an evaluation: win rates with their 95% interval, and a selector's
//! precision and recall.

use serde::{Deserialize, Serialize};

/// z for a two-sided 95% interval.
const Z95: f64 = 1.959_963_984_540_054;

/// Wins, losses and ties of one model against a baseline, under one rule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    /// Pairs where the model's answer was judged better.
    pub wins: u64,
    /// Pairs where the baseline's was.
    pub losses: u64,
    /// Pairs judged even.
    pub ties: u64,
    /// Pairs whose verdict could not be read (kept in `judgments.jsonl`, left out of the rate).
    pub unparsed: u64,
}

impl Tally {
    /// Pairs with a verdict.
    pub fn decided(&self) -> u64 {
        self.wins + self.losses + self.ties
    }

    /// The win rate, a tie counting as half a win (AlpacaEval's convention); `None` with no
    /// verdict at all.
    pub fn win_rate(&self) -> Option<f64> {
        let n = self.decided();
        (n > 0).then(|| (self.wins as f64 + 0.5 * self.ties as f64) / n as f64)
    }

    /// The Wilson score interval (95%) of the win rate, ties as half a win. Wilson rather than
    /// the normal approximation: it stays inside [0, 1] and is honest at the small n (tens of
    /// prompts) a CPU evaluation runs.
    pub fn ci95(&self) -> Option<(f64, f64)> {
        Some(wilson(self.win_rate()?, self.decided() as f64))
    }
}

/// The Wilson score interval of a proportion `p` observed over `n` trials, at 95%.
pub fn wilson(p: f64, n: f64) -> (f64, f64) {
    if n <= 0.0 {
        return (0.0, 1.0);
    }
    let z2 = Z95 * Z95;
    let denom = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denom;
    let half = Z95 * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denom;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// A selector's confusion counts against labels: positive = "good", predicted positive =
/// score at or above the threshold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Confusion {
    /// Good pairs selected.
    pub tp: u64,
    /// Bad pairs selected.
    pub fp: u64,
    /// Good pairs not selected.
    pub fn_: u64,
    /// Bad pairs not selected.
    pub tn: u64,
}

impl Confusion {
    /// Adds one labelled prediction.
    pub fn add(&mut self, good: bool, selected: bool) {
        match (good, selected) {
            (true, true) => self.tp += 1,
            (false, true) => self.fp += 1,
            (true, false) => self.fn_ += 1,
            (false, false) => self.tn += 1,
        }
    }

    /// tp / (tp + fp); `None` when nothing was selected.
    pub fn precision(&self) -> Option<f64> {
        let d = self.tp + self.fp;
        (d > 0).then(|| self.tp as f64 / d as f64)
    }

    /// tp / (tp + fn); `None` when no pair is good.
    pub fn recall(&self) -> Option<f64> {
        let d = self.tp + self.fn_;
        (d > 0).then(|| self.tp as f64 / d as f64)
    }

    /// The harmonic mean of precision and recall; `None` when either is undefined, 0 when both
    /// are 0.
    pub fn f1(&self) -> Option<f64> {
        let (p, r) = (self.precision()?, self.recall()?);
        Some(if p + r > 0.0 {
            2.0 * p * r / (p + r)
        } else {
            0.0
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 5e-4
    }

    #[test]
    fn win_rate_counts_a_tie_as_half_and_leaves_out_unparsed() {
        let t = Tally {
            wins: 6,
            losses: 2,
            ties: 2,
            unparsed: 5,
        };
        assert_eq!(t.decided(), 10);
        assert_eq!(t.win_rate(), Some(0.7));
        assert_eq!(Tally::default().win_rate(), None);
        assert_eq!(Tally::default().ci95(), None);
    }

    /// Hand-computed Wilson intervals (z = 1.96): p = 0.7, n = 10:
    /// centre = (0.7 + 0.19208) / 1.38415 = 0.64450, half = 1.96 · sqrt(0.021 + 0.0096040) /
    /// 1.38415 = 0.24773 -> [0.3968, 0.8922]; p = 0.5, n = 100: centre 0.5, half =
    /// 1.96 · sqrt(0.0025 + 0.00009604) / 1.038415 = 0.09617 -> [0.4038, 0.5962];
    /// p = 1, n = 16: [0.8063, 1].
    #[test]
    fn wilson_matches_hand_computed_intervals() {
        let (lo, hi) = wilson(0.7, 10.0);
        assert!(close(lo, 0.3968) && close(hi, 0.8922), "{lo} {hi}");
        let (lo, hi) = wilson(0.5, 100.0);
        assert!(close(lo, 0.4038) && close(hi, 0.5962), "{lo} {hi}");
        let (lo, hi) = wilson(1.0, 16.0);
        assert!(close(lo, 0.8063) && hi == 1.0, "{lo} {hi}");
        assert_eq!(wilson(0.3, 0.0), (0.0, 1.0));
    }

    /// A hand-labelled toy: 4 good, 4 bad; the selector takes 3 good and 1 bad.
    #[test]
    fn selector_precision_and_recall_on_a_toy() {
        let mut c = Confusion::default();
        let labelled = [
            (true, true),
            (true, true),
            (true, true),
            (true, false),
            (false, true),
            (false, false),
            (false, false),
            (false, false),
        ];
        for (good, selected) in labelled {
            c.add(good, selected);
        }
        assert_eq!((c.tp, c.fp, c.fn_, c.tn), (3, 1, 1, 3));
        assert_eq!(c.precision(), Some(0.75));
        assert_eq!(c.recall(), Some(0.75));
        assert_eq!(c.f1(), Some(0.75));
        let none = Confusion {
            fn_: 2,
            tn: 2,
            ..Confusion::default()
        };
        assert_eq!(none.precision(), None);
        assert_eq!(none.recall(), Some(0.0));
        assert_eq!(none.f1(), None);
    }
}
