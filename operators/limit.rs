//! `limit`: takes the first `limit` passages of the job, in a deterministic order (by epoch, then
//! by passage id), whatever the number of workers or processes. Every passage goes to worker 0,
//! which releases each epoch once it is complete; the passages past the limit are counted as
//! `over_limit`, and `reached` is set so the source stops reading new files.

use super::{Time, WorkerStats};
use crate::records::Passage;
use crate::stats::{Drop, DropReason};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::{Capability, Operator};
use timely::dataflow::StreamVec;

/// The operator.
pub fn limit<'s>(
    passages: StreamVec<'s, Time, Passage>,
    limit: usize,
    reached: Arc<AtomicBool>,
    stats: WorkerStats,
) -> StreamVec<'s, Time, Passage> {
    passages.unary_frontier(Exchange::new(|_: &Passage| 0), "Limit", move |_, _| {
        let mut held: BTreeMap<Time, (Capability<Time>, Vec<Passage>)> = BTreeMap::new();
        let mut left = limit;
        move |(input, frontier), output| {
            input.for_each_stamp(|cap, data| {
                let Some(&time) = cap.least() else { return };
                let Some(c) = cap.retain_least(output.output_index()) else {
                    return;
                };
                let entry = held.entry(time).or_insert_with(|| (c, Vec::new()));
                for d in data {
                    entry.1.append(d);
                }
            });
            while let Some((&time, _)) = held.iter().next() {
                if frontier.less_equal(&time) {
                    break;
                }
                let Some((cap, mut passages)) = held.remove(&time) else {
                    break;
                };
                passages.sort_unstable_by_key(|p| p.id);
                let rest = passages.split_off(passages.len().min(left));
                left -= passages.len();
                output.session(&cap).give_iterator(passages.into_iter());
                let mut s = stats.borrow_mut();
                for p in rest {
                    s.drop(Drop {
                        reason: DropReason::OverLimit,
                        file: p.origin.file,
                        offset: p.origin.offset,
                        detail: format!("limit {limit}"),
                    });
                }
                if left == 0 {
                    reached.store(true, Ordering::SeqCst);
                }
            }
        }
    })
}
