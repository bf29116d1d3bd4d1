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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::humpback::rounds::{round_start, ModelBook};
    use crate::serve::ModelClient;
    use std::cell::RefCell;
    use std::path::PathBuf;
    use std::rc::Rc;
    use std::sync::Arc;
    use timely::dataflow::operators::capture::Extract;
    use timely::dataflow::operators::vec::{Input, Map};
    use timely::dataflow::operators::{Capture, Probe};
    use timely::dataflow::InputHandleVec;

    fn forward(round: u64, version: &str) -> ModelUpdate {
        ModelUpdate {
            role: ModelRole::Forward,
            round,
            version: version.into(),
            path: PathBuf::from("/nonexistent"),
            files: Vec::new(),
        }
    }

    /// Round 0: M0 is there before candidates 1 and 2, which are rated by it at once. Round 1:
    /// candidate 3 arrives before M1 and waits; when M1 arrives (at the round's start, as
    /// along the feedback edge), it rates the earlier rounds' candidates again and the one that
    /// waited, each at that candidate's own time.
    #[test]
    fn each_round_model_rates_its_round_and_every_earlier_candidate_again() {
        let captured = timely::execute_directly(move |worker| {
            let mut candidates: InputHandleVec<Time, Candidate> = InputHandleVec::new();
            let mut updates: InputHandleVec<Time, ModelUpdate> = InputHandleVec::new();
            let installer = Installer {
                client: ModelClient::answering(|_| Ok(String::new())),
                models_dir: PathBuf::from("/nonexistent"),
                base: PathBuf::from("/nonexistent"),
                book: Rc::new(RefCell::new(ModelBook::default())),
                progress: Arc::default(),
            };
            let (probe, captured) = worker.dataflow(|scope| {
                let jobs = rerate(
                    scope.input_from(&mut candidates),
                    scope.input_from(&mut updates),
                    installer,
                )
                .map(|j| (j.candidate.instruction, j.model));
                let (probe, jobs) = jobs.probe();
                (probe, jobs.capture())
            });
            updates.send(forward(0, "m0"));
            updates.advance_to(1);
            for id in [1, 2] {
                candidates.send(Candidate::given("f", id, &format!("c{id}"), "a"));
            }
            let later = round_start(1) + 5;
            candidates.advance_to(later);
            candidates.send(Candidate::given("f", 3, "c3", "a"));
            candidates.close();
            // Candidate 3 reaches the store, and has no model to be rated by yet.
            for _ in 0..20 {
                worker.step();
            }
            updates.advance_to(round_start(1));
            updates.send(forward(1, "m1"));
            updates.close();
            worker.step_while(|| !probe.done());
            captured
        });
        let m = |id: u64, v: &str| (format!("c{id}"), v.to_owned());
        assert_eq!(
            captured.extract(),
            vec![
                (0, vec![m(1, "m0"), m(2, "m0")]),
                (round_start(1), vec![m(1, "m1"), m(2, "m1")]),
                (round_start(1) + 5, vec![m(3, "m1")]),
            ]
        );
    }
}
