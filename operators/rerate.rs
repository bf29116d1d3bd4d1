//! `rerate`: the candidate store of the loop. It keeps every candidate (exchanged by passage id,
//! so each worker keeps its share) and turns it into a [`RateJob`] for the forward model of its
//! round; when the next round's model `M_r` arrives along the feedback edge (at `round_start(r)`),
//! it installs it and sends every candidate of the earlier rounds to be rated again by it (the
//! paper re-rates the whole augmented set with each new model). Candidates that arrive during a
//! round whose model is not yet trained wait here.
//!
//! The store is on disk ([`SpillLog`], one file per worker), not in memory: it grows with every
//! passage the run reads. A re-rating reads it back a few hundred candidates at a time, and only
//! while the rate operator downstream has fewer than [`REPLAY_AHEAD`] of them waiting for the
//! model server ([`Backlog`], which wakes it when they fall under): a round's re-rating never
//! holds the whole set in memory either.

use super::model_call::Backlog;
use super::rate::RateJob;
use super::Time;
use crate::humpback::rounds::{round_of, Installer, ModelRole, ModelUpdate};
use crate::records::Candidate;
use crate::spill::{SpillCursor, SpillLog};
use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::{Capability, Operator};
use timely::dataflow::StreamVec;

/// Most candidates of a re-rating emitted and not yet sent to the model server.
pub const REPLAY_AHEAD: usize = 256;

/// A re-rating in progress: the stored candidates of rounds before `round`, read back in order.
struct Replay {
    cap: Capability<Time>,
    round: u64,
    model: String,
    cursor: SpillCursor<(u64, Candidate)>,
}

/// The operator. `updates` must already be broadcast to every worker; `spill` is this worker's
/// store file; `backlog` is the rate operator's (see [`super::rate::rate`]).
pub fn rerate<'s>(
    candidates: StreamVec<'s, Time, Candidate>,
    updates: StreamVec<'s, Time, ModelUpdate>,
    installer: Installer,
    spill: PathBuf,
    backlog: Backlog,
) -> StreamVec<'s, Time, RateJob> {
    let scope = candidates.scope();
    candidates.binary(
        updates,
        Exchange::new(|c: &Candidate| c.passage.id),
        Pipeline,
        "Rerate",
        move |_, info| {
            let activator = scope.activator_for(info.address);
            backlog.wake_under(REPLAY_AHEAD, activator.clone());
            let fail = {
                let progress = installer.progress.clone();
                move |e: crate::spill::SpillError| {
                    progress.fail(format!("the candidate store: {e}"))
                }
            };
            // Every candidate with the round it arrived in, on disk.
            let mut stored = SpillLog::<(u64, Candidate)>::create(&spill)
                .map_err(&fail)
                .ok();
            let mut replays: VecDeque<Replay> = VecDeque::new();
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
                        if let Some(log) = stored.as_mut() {
                            match log.cursor() {
                                Ok(cursor) => replays.push_back(Replay {
                                    cap: cap.clone(),
                                    round: u.round,
                                    model: u.version.clone(),
                                    cursor,
                                }),
                                Err(e) => fail(e),
                            }
                        }
                        for (cap, c) in waiting.remove(&u.round).unwrap_or_default() {
                            backlog.add(1);
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
                        if let Some(log) = stored.as_mut() {
                            if let Err(e) = log.push(&(round, c.clone())) {
                                fail(e);
                                stored = None;
                            }
                        }
                        match &model {
                            Some(m) => {
                                backlog.add(1);
                                output.session(&cap).give(RateJob {
                                    candidate: c,
                                    model: m.clone(),
                                })
                            }
                            None => waiting.entry(round).or_default().push((cap.clone(), c)),
                        }
                    }
                });
                // Re-ratings, oldest first, as fast as the rate operator takes them.
                while let Some(replay) = replays.front_mut() {
                    let room = REPLAY_AHEAD.saturating_sub(backlog.get());
                    if room == 0 {
                        break; // woken by the backlog when the rater has taken some
                    }
                    let mut sent = 0;
                    let mut session = output.session(&replay.cap);
                    while sent < room {
                        match replay.cursor.next() {
                            None => break,
                            Some(Ok((r, candidate))) if r < replay.round => {
                                session.give(RateJob {
                                    candidate,
                                    model: replay.model.clone(),
                                });
                                sent += 1;
                            }
                            Some(Ok(_)) => {} // this round's own: rated when it came
                            Some(Err(e)) => fail(e),
                        }
                    }
                    drop(session);
                    backlog.add(sent);
                    if replay.cursor.remaining() > 0 {
                        activator.activate();
                        break;
                    }
                    replays.pop_front();
                }
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
    use timely::dataflow::operators::capture::Event;
    use timely::dataflow::operators::capture::Extract;
    use timely::dataflow::operators::vec::{Input, Map};
    use timely::dataflow::operators::{Capture, Probe};
    use timely::dataflow::InputHandleVec;

    fn installer() -> Installer {
        Installer {
            client: ModelClient::answering(|_| Ok(String::new())),
            models_dir: PathBuf::from("/nonexistent"),
            base: PathBuf::from("/nonexistent"),
            book: Rc::new(RefCell::new(ModelBook::default())),
            progress: Arc::default(),
        }
    }

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
        let spill = tempfile::tempdir().unwrap();
        let captured = timely::execute_directly(move |worker| {
            let mut candidates: InputHandleVec<Time, Candidate> = InputHandleVec::new();
            let mut updates: InputHandleVec<Time, ModelUpdate> = InputHandleVec::new();
            let installer = installer();
            let (probe, captured) = worker.dataflow(|scope| {
                let jobs = rerate(
                    scope.input_from(&mut candidates),
                    scope.input_from(&mut updates),
                    installer,
                    spill.path().join("store.bin"),
                    Backlog::default(),
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

    /// A re-rating goes out as the rate operator takes it: never more than [`REPLAY_AHEAD`]
    /// waiting for the server, nothing while the line is full, and in the end every earlier
    /// candidate exactly once, in the order stored, at the new round's time; the store is a
    /// file of the worker's, not memory, and is gone when the dataflow is.
    #[test]
    fn a_re_rating_waits_for_the_rater_and_sends_everything_once() {
        let spill = tempfile::tempdir().unwrap();
        let store = spill.path().join("w0.bin");
        let n = 2 * REPLAY_AHEAD + 88;
        let (seen, on_disk) = timely::execute_directly({
            let store = store.clone();
            move |worker| {
                let mut candidates: InputHandleVec<Time, Candidate> = InputHandleVec::new();
                let mut updates: InputHandleVec<Time, ModelUpdate> = InputHandleVec::new();
                let backlog = Backlog::default();
                let (probe, events) = worker.dataflow(|scope| {
                    let jobs = rerate(
                        scope.input_from(&mut candidates),
                        scope.input_from(&mut updates),
                        installer(),
                        store.clone(),
                        backlog.clone(),
                    )
                    .map(|j| (j.candidate.instruction, j.model));
                    let (probe, jobs) = jobs.probe();
                    (probe, jobs.capture())
                });
                let mut seen: Vec<(Time, String, String)> = Vec::new();
                let collect = |seen: &mut Vec<(Time, String, String)>| {
                    for event in events.try_iter() {
                        if let Event::Messages(t, jobs) = event {
                            let t = *t.expect_singleton();
                            seen.extend(jobs.into_iter().map(|(i, m)| (t, i, m)));
                        }
                    }
                    seen.iter().filter(|s| s.2 == "m1").count()
                };
                updates.send(forward(0, "m0"));
                updates.advance_to(1);
                for id in 0..n as u64 {
                    candidates.send(Candidate::given("f", id, &format!("c{id}"), "a"));
                }
                candidates.close();
                for _ in 0..20 {
                    worker.step();
                }
                // Rated by M0 as they came: all of them wait for the server.
                collect(&mut seen);
                assert_eq!(seen.len(), n);
                assert_eq!(backlog.get(), n);
                updates.advance_to(round_start(1));
                updates.send(forward(1, "m1"));
                updates.close();
                for _ in 0..50 {
                    worker.step();
                }
                assert_eq!(collect(&mut seen), 0, "the line is full: nothing goes out");
                // Flushed when the re-rating began: every candidate is in the file.
                let on_disk = std::fs::metadata(&store).map(|m| m.len()).unwrap_or(0);
                let mut sent = 0;
                while !probe.done() {
                    // The rater takes everything waiting; then at most REPLAY_AHEAD come.
                    backlog.sent(backlog.get());
                    let before = collect(&mut seen);
                    for _ in 0..50 {
                        worker.step();
                    }
                    let now = collect(&mut seen);
                    assert!(now - before <= REPLAY_AHEAD, "{} at once", now - before);
                    assert_eq!(backlog.get(), now - before);
                    sent += 1;
                    assert!(sent < 100, "the re-rating does not finish");
                }
                collect(&mut seen);
                (seen, on_disk)
            }
        });
        let one = bincode::serialized_size(&(0u64, Candidate::given("f", 0, "c0", "a"))).unwrap();
        assert!(on_disk >= n as u64 * (4 + one), "{on_disk} bytes on disk");
        assert!(!store.exists(), "the store outlived its dataflow");
        let rerated: Vec<_> = seen.iter().filter(|s| s.2 == "m1").collect();
        assert_eq!(rerated.len(), n);
        for (id, (t, instruction, _)) in rerated.iter().enumerate() {
            assert_eq!(
                (*t, instruction.as_str()),
                (round_start(1), format!("c{id}").as_str())
            );
        }
    }
}
