//! Choosing the next token from logits: greedy, or temperature + nucleus (top-p) sampling with
//! a per-request seeded RNG, so a request samples the same tokens whatever batch it is in.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// How to pick tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// Softmax temperature; `0` (or below) means greedy (argmax).
    pub temperature: f32,
    /// Nucleus: sample among the most likely tokens whose probabilities sum to `top_p`
    /// (`1.0` keeps all).
    pub top_p: f32,
    /// Seed of this request's RNG.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling::greedy()
    }
}

impl Sampling {
    /// Argmax decoding.
    pub fn greedy() -> Self {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }

    /// Whether this is argmax decoding.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// A request's token chooser: its settings and its RNG.
#[derive(Debug, Clone)]
pub struct Sampler {
    cfg: Sampling,
    rng: StdRng,
}

impl Sampler {
    /// A sampler seeded from `cfg.seed`.
    pub fn new(cfg: Sampling) -> Self {
        Sampler {
            cfg,
            rng: StdRng::seed_from_u64(cfg.seed),
        }
    }

    /// The settings.
    pub fn config(&self) -> &Sampling {
        &self.cfg
    }

    /// Picks a token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.cfg.is_greedy() {
            return argmax(logits);
        }
        let t = self.cfg.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // Candidates sorted by probability, descending; NaN logits are dropped.
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.is_nan())
            .map(|(i, &l)| (i as u32, ((l - max) / t).exp()))
            .collect();
        if probs.is_empty() {
            return 0;
        }
        probs.sort_by(|a, b| b.1.total_cmp(&a.1));
        let total: f32 = probs.iter().map(|p| p.1).sum();
        let top_p = self.cfg.top_p.clamp(0.0, 1.0);
        // Keep the smallest prefix whose mass reaches top_p (at least one token).
        let mut kept = probs.len();
        if top_p < 1.0 {
            let mut acc = 0.0;
            for (n, p) in probs.iter().enumerate() {
                acc += p.1 / total;
                if acc >= top_p {
                    kept = n + 1;
                    break;
                }
            }
        }
        let probs = &probs[..kept];
        let mass: f32 = probs.iter().map(|p| p.1).sum();
        let mut r = self.rng.random::<f32>() * mass;
        for &(id, p) in probs {
            if r < p {
                return id;
            }
            r -= p;
        }
        probs[probs.len() - 1].0
    }
}

/// Index of the largest logit (the first on ties; NaN never wins).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(Sampling::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, f32::NAN, 2.0]), 1);
    }

    #[test]
    fn tiny_top_p_keeps_only_the_best() {
        let mut s = Sampler::new(Sampling {
            temperature: 1.0,
            top_p: 0.01,
            seed: 7,
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&[1.0, 5.0, 4.9, 0.0]), 1);
        }
    }

    #[test]
    fn sampling_follows_the_distribution_and_the_seed() {
        // p = softmax([0, ln 3]) = [0.25, 0.75]
        let logits = [0.0, 3f32.ln()];
        let cfg = Sampling {
            temperature: 1.0,
            top_p: 1.0,
            seed: 42,
        };
        let mut s = Sampler::new(cfg);
        let draws: Vec<u32> = (0..4000).map(|_| s.sample(&logits)).collect();
        let ones = draws.iter().filter(|&&d| d == 1).count() as f64 / 4000.0;
        assert!((ones - 0.75).abs() < 0.03, "frequency {ones}");
        let mut again = Sampler::new(cfg);
        let replay: Vec<u32> = (0..4000).map(|_| again.sample(&logits)).collect();
        assert_eq!(draws, replay);
    }
}
