//! `rerate`: the candidate store of the loop. It keeps every candidate (exchanged by passage id,
//! so each worker keeps its share) and turns it into a [`RateJob`] for the forward model of its
//! round; when the next round's model `M_r` arrives along the feedback edge (at `round_start(r)`),
//! it installs it and sends every candidate of the earlier rounds to be rated again by it (the
//! paper re-rates the whole augmented set with each new model). Candidates that arrive during a
//! round whose model is not yet trained wait here.

use super::rate::RateJob;
use super::Time;
use crate::humpback::rounds::{round_of, Installer, ModelRole, ModelUpdate};
use crate::records::Candidate;
use std::collections::BTreeMap;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::{Capability, Operator};
use timely::dataflow::StreamVec;

/// The operator. `updates` must already be broadcast to every worker.
pub fn rerate<'s>(
    candidates: StreamVec<'s, Time, Candidate>,
    updates: StreamVec<'s, Time, ModelUpdate>,
    installer: Installer,
) -> StreamVec<'s, Time, RateJob> {
    candidates.binary(
        updates,
        Exchange::new(|c: &Candidate| c.passage.id),
        Pipeline,
        "Rerate",
        move |_, _| {
            // Every candidate with the round it arrived in.
            let mut stored: Vec<(u64, Candidate)> = Vec::new();
            let mut waiting: BTreeMap<u64, Vec<(Capability<Time>, Candidate)>> = BTreeMap::new();
            move |input, updates, output| {
                updates.for_each_stamp(|cap, data| {
                    for u in data.flat_map(|d| d.drain(..)) {
                        if u.role != ModelRole::Forward {
                            continue;
                        }
                        installer.accept(&u);
                        if installer.book.borrow().forward.get(&u.round) != Some(&u.version) {
                            continue; // not installed: the failure ends the job
                        }
                        let Some(cap) = cap.retain_least(output.output_index()) else {
                            continue;
                        };
                        let mut session = output.session(&cap);
                        for (_, c) in stored.iter().filter(|(r, _)| *r < u.round) {
                            session.give(RateJob {
                                candidate: c.clone(),
                                model: u.version.clone(),
                            });
                        }
                        drop(session);
                        for (cap, c) in waiting.remove(&u.round).unwrap_or_default() {
                            output.session(&cap).give(RateJob {
                                candidate: c,
                                model: u.version.clone(),
                            });
                        }
                    }
                });
                input.for_each_stamp(|cap, data| {
                    let Some(&time) = cap.least() else { return };
                    let round = round_of(time);
                    let Some(cap) = cap.retain_least(output.output_index()) else {
                        return;
                    };
                    let model = installer.book.borrow().forward.get(&round).cloned();
                    for c in data.flat_map(|d| d.drain(..)) {
                        stored.push((round, c.clone()));
                        match &model {
                            Some(m) => output.session(&cap).give(RateJob {
                                candidate: c,
                                model: m.clone(),
                            }),
                            None => waiting.entry(round).or_default().push((cap.clone(), c)),
                        }
                    }
                });
            }
        },
    )
}
