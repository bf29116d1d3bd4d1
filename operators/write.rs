//! `write`: holds each passage until dedup's verdicts for its epoch are complete, then writes the
//! survivors of that epoch as one JSONL file, atomically (written to a `.tmp` name, synced, then
//! renamed), so a crash never leaves a half-written record under a final name.

use super::dedup::{Verdict, VerdictUpdate};
use super::{Time, WorkerStats};
use crate::output::{atomic_write_jsonl, PassageLine};
use crate::progress::Progress;
use crate::records::Passage;
use crate::stats::{Drop, DropReason};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::{Capability, Operator};
use timely::dataflow::StreamVec;

/// Where and under which name a worker writes.
#[derive(Clone, Debug)]
pub struct WriteTarget {
    /// The output folder.
    pub dir: PathBuf,
    /// The file name prefix (`segment` for the segment pipeline).
    pub prefix: String,
    /// This process's index (part of the file name).
    pub process: usize,
}

/// An epoch written: `(epoch, passages written)`.
pub type Written = (Time, u64);

/// The operator. Emits one [`Written`] per epoch it completes (the job's probe watches it).
pub fn write<'s>(
    passages: StreamVec<'s, Time, Passage>,
    verdicts: StreamVec<'s, Time, VerdictUpdate>,
    target: WriteTarget,
    stats: WorkerStats,
    progress: Arc<Progress>,
) -> StreamVec<'s, Time, Written> {
    let worker = passages.scope().index();
    passages.binary_frontier(
        verdicts,
        Pipeline,
        Exchange::new(|v: &VerdictUpdate| (v.0).1 as u64),
        "Write",
        move |_cap, _info| {
            let mut held: BTreeMap<Time, (Capability<Time>, Vec<Passage>)> = BTreeMap::new();
            let mut decided: HashMap<u64, (isize, isize)> = HashMap::new();
            move |(input1, frontier1), (input2, frontier2), output| {
                input1.for_each_stamp(|cap, data| {
                    let Some(&time) = cap.least() else { return };
                    let entry = held.entry(time).or_insert_with(|| {
                        (
                            cap.retain_least(output.output_index())
                                .expect("stamp has a time"),
                            Vec::new(),
                        )
                    });
                    for d in data {
                        entry.1.append(d);
                    }
                });
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
                while let Some((&time, _)) = held.iter().next() {
                    if frontier1.less_equal(&time) || frontier2.less_equal(&time) {
                        break;
                    }
                    let Some((cap, passages)) = held.remove(&time) else {
                        break;
                    };
                    let mut keep = Vec::with_capacity(passages.len());
                    let mut s = stats.borrow_mut();
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
                            None => keep.push(p),
                            Some(reason) => s.drop(Drop {
                                reason,
                                file: p.origin.file,
                                offset: p.origin.offset,
                                detail: p.header_path.last().cloned().unwrap_or_default(),
                            }),
                        }
                    }
                    let name = format!(
                        "{}-e{:016x}-p{:03}-w{:03}.jsonl",
                        target.prefix, time, target.process, worker
                    );
                    let n = keep.len() as u64;
                    if n > 0 {
                        let lines = keep.iter().map(PassageLine::from);
                        if let Err(e) = atomic_write_jsonl(&target.dir.join(&name), lines) {
                            // An output that cannot be written (disk full, permissions) ends the
                            // job with an error; files already written stay intact.
                            progress.fail(format!("cannot write {name}: {e:#}"));
                        }
                    }
                    s.passages_written += n;
                    progress.add_passages(n);
                    output.session(&cap).give((time, n));
                }
            }
        },
    )
}
