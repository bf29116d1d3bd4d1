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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operators::test_passage as passage;
    use crate::stats::Stats;
    use std::cell::RefCell;
    use std::rc::Rc;
    use timely::dataflow::operators::capture::Extract;
    use timely::dataflow::operators::vec::Input;
    use timely::dataflow::operators::{Capture, Probe};
    use timely::dataflow::InputHandleVec;

    /// Epoch 0 brings ids 5, 3, 9, epoch 1 brings 2, 1; with a limit of 4 the first epoch passes
    /// whole in id order, the second gives its least id, the other is counted over the limit,
    /// and `reached` is set.
    #[test]
    fn takes_the_first_passages_by_epoch_then_id() {
        let (out, stats, reached) = timely::execute_directly(|worker| {
            let stats = Rc::new(RefCell::new(Stats::default()));
            let reached = Arc::new(AtomicBool::new(false));
            let mut input: InputHandleVec<Time, Passage> = InputHandleVec::new();
            let (probe, captured) = worker.dataflow(|scope| {
                let limited = limit(
                    scope.input_from(&mut input),
                    4,
                    reached.clone(),
                    stats.clone(),
                );
                let (probe, limited) = limited.probe();
                (probe, limited.capture())
            });
            for id in [5, 3, 9] {
                input.send(passage(id));
            }
            input.advance_to(1);
            for id in [2, 1] {
                input.send(passage(id));
            }
            input.close();
            worker.step_while(|| !probe.done());
            let stats = stats.borrow().clone();
            (captured, stats, reached.load(Ordering::SeqCst))
        });
        let out: Vec<(Time, Vec<u64>)> = out
            .extract()
            .into_iter()
            .map(|(t, ps)| (t, ps.iter().map(|p| p.id).collect()))
            .collect();
        assert_eq!(out, vec![(0, vec![3, 5, 9]), (1, vec![1])]);
        assert_eq!(stats.dropped(DropReason::OverLimit), 1);
        assert!(reached);
    }
}
