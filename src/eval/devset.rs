//! A selector dev set from data a user has (`backflow selector-devset`). The recipe:
//! - **good**: the human-written pairs (e.g. the seed), as they are;
//! - **bad**, one per good pair, in turn:
//!   - `mismatched`: the instruction with another pair's output (off-topic, the rating
//!     prompt's score 1);
//!   - `truncated`: the output cut to its first third at a word boundary (incomplete; only
//!     outputs of 120 characters or more, else a mismatched pair instead);
//!   - `web`: the instruction with a passage of crawled text (`--passages`: `backflow segment`
//!     output or any JSONL with `text`), the kind of unrelated page text curation must reject.
//!
//! Seeded: the same inputs and seed give the same file.

use super::data::{DevPair, Label};
use crate::train::data::Record;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// Shortest output that is cut for a `truncated` pair, in characters.
pub const MIN_TRUNCATED_CHARS: usize = 120;

/// The dev set of `pairs` (instruction, output), with web `passages` if any.
pub fn build(pairs: &[(String, String)], passages: &[String], seed: u64) -> Vec<DevPair> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let good: Vec<&(String, String)> = pairs
        .iter()
        .filter(|(i, o)| !i.trim().is_empty() && !o.trim().is_empty())
        .collect();
    let mut out = Vec::with_capacity(2 * good.len());
    let kinds: &[&str] = if passages.is_empty() {
        &["mismatched", "truncated"]
    } else {
        &["mismatched", "truncated", "web"]
    };
    for (n, (instruction, output)) in good.iter().enumerate() {
        out.push(DevPair {
            instruction: instruction.clone(),
            input: String::new(),
            output: output.clone(),
            label: Label::Good,
            kind: "seed".into(),
        });
        let mut kind = kinds[n % kinds.len()];
        if kind == "truncated" && output.chars().count() < MIN_TRUNCATED_CHARS {
            kind = "mismatched";
        }
        let bad_output = match kind {
            "truncated" => truncate_third(output),
            "web" => passages[rng.random_range(0..passages.len())].clone(),
            _ => match other_output(&good, n, &mut rng) {
                Some(o) => o,
                None => continue,
            },
        };
        out.push(DevPair {
            instruction: instruction.clone(),
            input: String::new(),
            output: bad_output,
            label: Label::Bad,
            kind: kind.into(),
        });
    }
    out
}

/// Another pair's output, different from pair `n`'s; `None` when every output is the same.
fn other_output(good: &[&(String, String)], n: usize, rng: &mut impl Rng) -> Option<String> {
    let mut order: Vec<usize> = (0..good.len()).filter(|&j| j != n).collect();
    order.shuffle(rng);
    order
        .into_iter()
        .map(|j| &good[j].1)
        .find(|o| o.trim() != good[n].1.trim())
        .cloned()
}

/// The first third of `text`, cut at the last whitespace before it.
pub fn truncate_third(text: &str) -> String {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let third = chars.len() / 3;
    let cut = chars[..third]
        .iter()
        .rev()
        .find(|(_, c)| c.is_whitespace())
        .map(|(at, _)| *at)
        .unwrap_or_else(|| chars.get(third).map(|(at, _)| *at).unwrap_or(text.len()));
    text[..cut].trim_end().to_owned()
}

/// The (instruction, output) pairs of training records (seed tasks, Alpaca, conversations:
/// their first exchange).
pub fn pairs_of(records: &[Record]) -> Vec<(String, String)> {
    records
        .iter()
        .filter_map(|r| match r {
            Record::Pair {
                instruction,
                output,
            } => Some((instruction.clone(), output.clone())),
            Record::Chat(m) => {
                use crate::model::chat::Role;
                let u = m.iter().position(|m| m.role == Role::User)?;
                let a = m[u..].iter().find(|m| m.role == Role::Assistant)?;
                Some((m[u].content.clone(), a.content.clone()))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs() -> Vec<(String, String)> {
        (0..6)
            .map(|i| {
                (
                    format!("Instruction {i}?"),
                    format!("Answer {i}: {}", "word ".repeat(10 + 20 * i)),
                )
            })
            .collect()
    }

    #[test]
    fn one_bad_pair_per_good_pair_in_turn() {
        let web = vec!["Home | About | Contact".to_owned()];
        let set = build(&pairs(), &web, 7);
        assert_eq!(set.len(), 12);
        let good: Vec<&DevPair> = set.iter().filter(|p| p.label == Label::Good).collect();
        assert_eq!(good.len(), 6);
        let kinds: Vec<&str> = set
            .iter()
            .filter(|p| p.label == Label::Bad)
            .map(|p| p.kind.as_str())
            .collect();
        // Pair 1's output is 224 chars, so it is truncated; pair 4's too; 0 and 3 mismatched.
        assert_eq!(
            kinds,
            [
                "mismatched",
                "truncated",
                "web",
                "mismatched",
                "truncated",
                "web"
            ]
        );
        for w in set.chunks(2) {
            let (g, b) = (&w[0], &w[1]);
            assert_eq!(g.instruction, b.instruction);
            assert_ne!(g.output, b.output);
            match b.kind.as_str() {
                "truncated" => {
                    assert!(g.output.starts_with(&b.output));
                    assert!(b.output.len() * 3 <= g.output.len());
                }
                "web" => assert_eq!(b.output, web[0]),
                _ => assert!(pairs().iter().any(|(_, o)| *o == b.output)),
            }
        }
        assert_eq!(build(&pairs(), &web, 7), set, "seeded");
    }

    #[test]
    fn short_outputs_are_mismatched_instead_of_truncated() {
        let short = vec![
            ("A?".to_owned(), "yes".to_owned()),
            ("B?".to_owned(), "no".to_owned()),
        ];
        let set = build(&short, &[], 1);
        let kinds: Vec<&str> = set.iter().map(|p| p.kind.as_str()).collect();
        assert_eq!(kinds, ["seed", "mismatched", "seed", "mismatched"]);
        assert_eq!(set[1].output, "no");
        assert_eq!(set[3].output, "yes");
    }

    #[test]
    fn truncation_cuts_at_a_word() {
        assert_eq!(truncate_third("aaa bbb ccc ddd eee fff"), "aaa");
        assert_eq!(truncate_third("abcdefghi"), "abc");
        assert_eq!(truncate_third("ééé ééé ééé"), "ééé");
    }
}
