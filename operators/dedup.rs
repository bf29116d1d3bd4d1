//! `dedup`: exact and near-duplicate removal in differential dataflow, across all workers and
//! processes and across epochs (so `--follow` keeps deduplicating as new dumps arrive).
//!
//! Only small keys enter differential; the passage text stays on the worker that made it, waiting
//! in `write` for its verdict:
//!
//! 1. exact: passages grouped by the hash of their normalised text; the representative is the one
//!    with the least rank `(epoch, id)`. Ranks start with the epoch, so a passage that arrives later
//!    never displaces one already written: verdicts are never retracted.
//! 2. near: each survivor's MinHash signature cut into LSH bands; within a band bucket every member
//!    is a candidate duplicate of the bucket's least-ranked member; a candidate is a near duplicate
//!    when the estimated Jaccard similarity of the two signatures reaches the threshold.
//!
//! Output: one [`Verdict`] per surviving passage (`Keep`) or near duplicate (`Near`), at the
//! passage's time, routed to the worker that holds its text. A passage with no `Keep` verdict
//! once its time is complete is an exact duplicate.

use super::Time;
use crate::records::Passage;
use crate::text::minhash::{estimated_jaccard, MinHashError, MinHasher};
use differential_dataflow::collection::AsCollection;
use differential_dataflow::VecCollection;
use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::{Concat, Operator};
use timely::dataflow::StreamVec;

/// Dedup settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DedupOptions {
    /// Remove near duplicates (exact duplicates are always removed).
    pub near: bool,
    /// Estimated Jaccard similarity at or above which two passages are near duplicates.
    pub threshold: f64,
    /// LSH bands (the signature has `bands * rows` values).
    pub bands: usize,
    /// Rows per band.
    pub rows: usize,
    /// Words per shingle.
    pub ngram: usize,
    /// Seed of the MinHash permutations (the same on every process).
    pub seed: u64,
}

impl Default for DedupOptions {
    fn default() -> Self {
        // 14 x 8 as datatrove: a band collision is likely from a similarity of about 0.7 up.
        DedupOptions {
            near: true,
            threshold: 0.8,
            bands: 14,
            rows: 8,
            ngram: 5,
            seed: 1,
        }
    }
}

/// What dedup decided about one passage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Verdict {
    /// The passage survived exact dedup (and is written unless also `Near`).
    Keep,
    /// The passage is a near duplicate of an earlier-ranked passage.
    Near,
}

/// A verdict for passage `id`, held by worker `home`.
pub type VerdictUpdate = ((u64, u32, Verdict), Time, isize);

/// `(epoch, id)`: the least rank is the representative.
type Rank = (Time, u64);

/// The `home` of passages written by an earlier run: they rank first and get no verdict.
const WRITTEN_BEFORE: u32 = u32::MAX;

/// The operator group. `passages` stays where it is; the returned stream carries verdicts.
/// `history`, when given, holds passages an earlier run of the job already wrote (at time 0):
/// they are never written again, and a new passage that repeats one is a duplicate.
pub fn dedup<'s>(
    passages: StreamVec<'s, Time, Passage>,
    history: Option<StreamVec<'s, Time, Passage>>,
    options: DedupOptions,
) -> Result<StreamVec<'s, Time, VerdictUpdate>, MinHashError> {
    let home = passages.scope().index() as u32;
    let hasher = MinHasher::new(
        options.bands * options.rows,
        options.bands,
        options.ngram,
        options.seed,
    )?;
    let mut keys = dedup_keys(passages, home, hasher.clone(), options.near);
    if let Some(history) = history {
        keys = keys.concat(dedup_keys(history, WRITTEN_BEFORE, hasher, options.near));
    }
    let keys = keys.map_updates();

    // 1. exact: the least rank per content hash survives.
    let survivors: VecCollection<'s, Time, (u64, (Time, u32)), isize> = keys
        .clone()
        .map(|k| (k.content_hash, (k.rank, k.home)))
        .reduce(|_hash, group, out| out.push((*group[0].0, 1)))
        .map(|(_hash, ((time, id), home))| (id, (time, home)));

    let mut verdicts = survivors
        .clone()
        .map(|(id, (_time, home))| (id, home, Verdict::Keep));

    // 2. near: band buckets over the survivors, verified on signatures.
    if options.near {
        let survivor_ids = survivors.clone().map(|(id, _)| id);
        let signatures = keys
            .clone()
            .map(|k| (k.rank.1, k.signature))
            .semijoin(survivor_ids.clone());
        let banded = keys
            .flat_map(|k| k.bands.into_iter().map(move |b| (k.rank.1, (b, k.rank))))
            .semijoin(survivor_ids)
            .map(|(_id, (band, rank))| (band, rank));
        let candidates = banded
            .reduce(
                |_band, group: &[(&Rank, isize)], out: &mut Vec<((u64, u64), isize)>| {
                    let representative = group[0].0 .1;
                    for (rank, _) in &group[1..] {
                        out.push(((rank.1, representative), 1));
                    }
                },
            )
            .map(|(_band, pair)| pair)
            .distinct();
        let threshold = options.threshold;
        let near = candidates
            .join(signatures.clone())
            .map(|(dup, (rep, dup_sig))| (rep, (dup, dup_sig)))
            .join(signatures)
            .filter(move |(_rep, ((_dup, dup_sig), rep_sig))| {
                estimated_jaccard(dup_sig, rep_sig) >= threshold
            })
            .map(|(_rep, ((dup, _), _))| dup)
            .distinct()
            .map(|id| (id, ()))
            .join(survivors)
            .map(|(id, ((), (_time, home)))| (id, home, Verdict::Near));
        verdicts = verdicts.concat(near);
    }
    Ok(verdicts
        .filter(|(_id, home, _verdict)| *home != WRITTEN_BEFORE)
        .inner)
}

/// Small keys for each passage: exact key, LSH band keys, signature.
fn dedup_keys<'s>(
    passages: StreamVec<'s, Time, Passage>,
    home: u32,
    hasher: MinHasher,
    near: bool,
) -> StreamVec<'s, Time, Key> {
    passages.unary(Pipeline, "DedupKeys", move |_cap, _info| {
        move |input, output| {
            input.for_each_stamp(|cap, data| {
                let Some(&time) = cap.least() else { return };
                let mut session = output.session(&cap);
                for p in data.flat_map(|d| d.iter()) {
                    let signature = if near {
                        hasher.signature(&p.text)
                    } else {
                        Vec::new()
                    };
                    let bands = if near {
                        hasher.band_keys(&signature)
                    } else {
                        Vec::new()
                    };
                    session.give(Key {
                        rank: (time, p.id),
                        home,
                        content_hash: p.content_hash,
                        signature,
                        bands,
                    });
                }
            });
        }
    })
}

/// The dedup keys of one passage.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct Key {
    rank: Rank,
    home: u32,
    content_hash: u64,
    signature: Vec<u32>,
    bands: Vec<u64>,
}

/// Turns a stream of records into a differential collection of insertions at their own times.
trait MapUpdates<'s, D> {
    fn map_updates(self) -> VecCollection<'s, Time, D, isize>;
}

impl<'s, D: Clone + 'static> MapUpdates<'s, D> for StreamVec<'s, Time, D> {
    fn map_updates(self) -> VecCollection<'s, Time, D, isize> {
        self.unary(Pipeline, "AsUpdates", |_cap, _info| {
            move |input, output| {
                input.for_each_stamp(|cap, data| {
                    let Some(&time) = cap.least() else { return };
                    let mut session = output.session(&cap);
                    for d in data.flat_map(|d| d.drain(..)) {
                        session.give((d, time, 1isize));
                    }
                });
            }
        })
        .as_collection()
    }
}
