//! `limit`: takes the first `limit` passages of the job, in a deterministic order (by epoch, then
//! by passage id), whatever the number of workers or processes. Every passage goes to worker 0,
//! which releases each epoch once it is complete; the passages past the limit are counted as
//! `over_limit`, and `reached` is set so the source stops reading new files.

use super::epochs::Epochs;
use super::{Time, WorkerStats};
use crate::records::Passage;
use crate::stats::{Drop, DropReason};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::Operator;
use timely::dataflow::StreamVec;

/// The operator.
pub fn limit<'s>(
    passages: StreamVec<'s, Time, Passage>,
    limit: usize,
    reached: Arc<AtomicBool>,
    stats: WorkerStats,
) -> StreamVec<'s, Time, Passage> {
    passages.unary_frontier(Exchange::new(|_: &Passage| 0), "Limit", move |_, _| {
        let mut held: Epochs<Passage> = Epochs::default();
        let mut left = limit;
        move |(input, frontier), output| {
            input.for_each_stamp(|stamp, data| held.hold(stamp, data, output.output_index()));
            while let Some((_, cap, mut passages)) = held.next_complete(|t| frontier.less_equal(t))
            {
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
