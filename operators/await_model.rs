//! `await_model`: installs the backward model when its update arrives and holds passages until
//! it is installed (a process other than the one that trained it learns of it only through the
//! dataflow), so `augment` always knows which version to ask for.

use super::Time;
use crate::humpback::rounds::{Installer, ModelRole, ModelUpdate};
use crate::records::Passage;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::{Capability, Operator};
use timely::dataflow::StreamVec;

/// The operator. `updates` must already be broadcast to every worker.
pub fn await_model<'s>(
    passages: StreamVec<'s, Time, Passage>,
    updates: StreamVec<'s, Time, ModelUpdate>,
    installer: Installer,
) -> StreamVec<'s, Time, Passage> {
    passages.binary(updates, Pipeline, Pipeline, "AwaitModel", move |_, _| {
        let mut waiting: Vec<(Capability<Time>, Vec<Passage>)> = Vec::new();
        move |input, updates, output| {
            updates.for_each_stamp(|_, data| {
                for u in data.flat_map(|d| d.drain(..)) {
                    if u.role == ModelRole::Backward {
                        installer.accept(&u);
                    }
                }
            });
            let ready = installer.book.borrow().backward.is_some();
            input.for_each_stamp(|cap, data| {
                let Some(cap) = cap.retain_least(output.output_index()) else {
                    return;
                };
                let batch: Vec<Passage> = data.flat_map(|d| d.drain(..)).collect();
                if ready {
                    output.session(&cap).give_iterator(batch.into_iter());
                } else {
                    waiting.push((cap, batch));
                }
            });
            if ready {
                for (cap, batch) in waiting.drain(..) {
                    output.session(&cap).give_iterator(batch.into_iter());
                }
            }
        }
    })
}
