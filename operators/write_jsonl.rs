//! `write_jsonl`: writes each epoch's records of a stream as one JSONL file per worker,
//! atomically, once the epoch is complete; emits `(epoch, count)` for the job's probe.

use super::Time;
use crate::output::atomic_write_jsonl;
use crate::progress::Progress;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::{Capability, Operator};
use timely::dataflow::StreamVec;

/// The operator: files `DIR/{prefix}-e{epoch}-p{process}-w{worker}.jsonl`.
pub fn write_jsonl<'s, D, L, F>(
    records: StreamVec<'s, Time, D>,
    dir: PathBuf,
    prefix: String,
    process: usize,
    progress: Arc<Progress>,
    to_line: F,
) -> StreamVec<'s, Time, (Time, u64)>
where
    D: Clone + 'static,
    L: Serialize,
    F: Fn(&D) -> L + 'static,
{
    let worker = records.scope().index();
    records.unary_frontier(Pipeline, "WriteJsonl", move |_cap, _info| {
        let mut held: BTreeMap<Time, (Capability<Time>, Vec<D>)> = BTreeMap::new();
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
                let Some((cap, records)) = held.remove(&time) else {
                    break;
                };
                if !records.is_empty() {
                    let name = format!("{prefix}-e{time:016x}-p{process:03}-w{worker:03}.jsonl");
                    if let Err(e) =
                        atomic_write_jsonl(&dir.join(&name), records.iter().map(&to_line))
                    {
                        progress.fail(format!("cannot write {name}: {e:#}"));
                    }
                }
                progress.add_passages(records.len() as u64);
                output.session(&cap).give((time, records.len() as u64));
            }
        }
    })
}
