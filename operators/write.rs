//! `keep` and `write`: hold each passage until dedup's verdicts for its epoch are complete, then
//! pass on the survivors of that epoch; write each epoch's passages as one JSONL file,
//! atomically (written to a `.tmp` name, synced, then renamed), so a crash never leaves a
//! half-written record under a final name.

use super::dedup::{Verdict, VerdictUpdate};
use super::epochs::Epochs;
use super::write_jsonl::{write_jsonl, JsonlFiles, Tally};
use super::{Time, WorkerStats};
use crate::output::PassageLine;
use crate::progress::Progress;
use crate::records::Passage;
use crate::stats::{Drop, DropReason};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::{Inspect, Operator};
use timely::dataflow::StreamVec;

/// Where and under which name a worker writes.
#[derive(Clone, Debug)]
pub struct WriteTarget<N> {
    /// The output folder.
    pub dir: PathBuf,
    /// The file name of an epoch (`segment-e{epoch}` for the segment pipeline); unique per epoch.
    pub name: N,
    /// This process's index (part of the file name).
    pub process: usize,
}

/// An epoch written: `(epoch, passages written)`.
pub type Written = (Time, u64);

/// The dedup join: holds each passage until dedup's verdicts for its epoch are complete, then
/// emits the survivors of that epoch (counting every duplicate it drops).
pub fn keep<'s>(
    passages: StreamVec<'s, Time, Passage>,
    verdicts: StreamVec<'s, Time, VerdictUpdate>,
    stats: WorkerStats,
) -> StreamVec<'s, Time, Passage> {
    passages.binary_frontier(
        verdicts,
        Pipeline,
        Exchange::new(|v: &VerdictUpdate| (v.0).1 as u64),
        "Keep",
        move |_cap, _info| {
            let mut held: Epochs<Passage> = Epochs::default();
            let mut decided: HashMap<u64, (isize, isize)> = HashMap::new();
            move |(input1, frontier1), (input2, frontier2), output| {
                input1.for_each_stamp(|stamp, data| held.hold(stamp, data, output.output_index()));
                input2.for_each_stamp(|_cap, data| {
                    for ((id, _home, verdict), _time, diff) in data.flat_map(|d| d.drain(..)) {
                        let e = decided.entry(id).or_insert((0, 0));
                        match verdict {
                            Verdict::Keep => e.0 += diff,
                            Verdict::Near => e.1 += diff,
                        }
                    }
                });
                // Epochs complete on both inputs, in order.
                while let Some((_, cap, passages)) =
                    held.next_complete(|t| frontier1.less_equal(t) || frontier2.less_equal(t))
                {
                    let mut s = stats.borrow_mut();
                    let mut session = output.session(&cap);
                    for p in passages {
                        let (kept, near) = decided.remove(&p.id).unwrap_or((0, 0));
                        let reason = if kept <= 0 {
                            Some(DropReason::ExactDuplicate)
                        } else if near > 0 {
                            Some(DropReason::NearDuplicate)
                        } else {
                            None
                        };
                        match reason {
                            None => session.give(p),
                            Some(reason) => s.drop(Drop {
                                reason,
                                file: p.origin.file,
                                offset: p.origin.offset,
                                detail: p.header_path.last().cloned().unwrap_or_default(),
                            }),
                        }
                    }
                }
            }
        },
    )
}

/// The operator: each epoch's passages (survivors of [`keep`]) as one JSONL file per worker.
/// Emits one [`Written`] per epoch that had passages (the job's probe watches it).
pub fn write<'s, N: Fn(Time) -> String + 'static>(
    passages: StreamVec<'s, Time, Passage>,
    target: WriteTarget<N>,
    stats: WorkerStats,
    progress: Arc<Progress>,
) -> StreamVec<'s, Time, Written> {
    let files = JsonlFiles {
        dir: target.dir,
        name: target.name,
        process: target.process,
        tally: Tally::Passages,
    };
    write_jsonl(passages, files, progress, |p, out| {
        serde_json::to_writer(out, &PassageLine::from(p))
    })
    .inspect(move |(_, n)| stats.borrow_mut().passages_written += n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operators::test_passage as passage;
    use crate::stats::Stats;
    use std::cell::RefCell;
    use std::rc::Rc;
    use timely::dataflow::operators::capture::{Event, Extract};
    use timely::dataflow::operators::vec::Input;
    use timely::dataflow::operators::{Capture, Probe};
    use timely::dataflow::InputHandleVec;

    /// Epoch 0 holds passages 1, 2, 3 and 4. Dedup kept 1; kept 2 but found it near another; gave
    /// 3 no verdict (an exact duplicate); kept 4 and then retracted it (a representative that
    /// arrived with the same text and a lower rank). Only 1 passes; each other is counted under
    /// its reason; and nothing is released before the verdicts of its epoch are complete.
    #[test]
    fn passes_only_what_dedup_kept_once_its_epoch_is_complete() {
        let (out, stats) = timely::execute_directly(|worker| {
            let stats = Rc::new(RefCell::new(Stats::default()));
            let mut passages: InputHandleVec<Time, Passage> = InputHandleVec::new();
            let mut verdicts: InputHandleVec<Time, VerdictUpdate> = InputHandleVec::new();
            let (probe, captured) = worker.dataflow(|scope| {
                let kept = keep(
                    scope.input_from(&mut passages),
                    scope.input_from(&mut verdicts),
                    stats.clone(),
                );
                let (probe, kept) = kept.probe();
                (probe, kept.capture())
            });
            for id in 1..=4 {
                passages.send(passage(id));
            }
            passages.advance_to(1);
            passages.close();
            for (id, verdict, diff) in [
                (1, Verdict::Keep, 1),
                (2, Verdict::Keep, 1),
                (2, Verdict::Near, 1),
                (4, Verdict::Keep, 1),
            ] {
                verdicts.send(((id, 0, verdict), 0, diff));
            }
            // The verdicts of epoch 0 are not complete yet: nothing may pass.
            for _ in 0..10 {
                worker.step();
            }
            let early = captured
                .try_iter()
                .filter(|e| matches!(e, Event::Messages(..)))
                .count();
            assert_eq!(early, 0, "released before its verdicts were complete");
            verdicts.send(((4, 0, Verdict::Keep), 0, -1));
            verdicts.close();
            worker.step_while(|| !probe.done());
            let stats = stats.borrow().clone();
            (captured, stats)
        });
        let out: Vec<(Time, Vec<u64>)> = out
            .extract()
            .into_iter()
            .map(|(t, ps)| (t, ps.iter().map(|p| p.id).collect()))
            .collect();
        assert_eq!(out, vec![(0, vec![1])]);
        assert_eq!(stats.dropped(DropReason::ExactDuplicate), 2);
        assert_eq!(stats.dropped(DropReason::NearDuplicate), 1);
    }
}
