//! `write_jsonl`: writes each epoch's records of a stream as one JSONL file per worker,
//! atomically, once the epoch is complete; emits `(epoch, count)` for the job's probe.

use super::epochs::Epochs;
use super::Time;
use crate::output::atomic_write;
use crate::progress::Progress;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::Operator;
use timely::dataflow::StreamVec;

/// The operator: files `DIR/{name(epoch)}-p{process}-w{worker}.jsonl`, one per epoch with
/// records; `name` must be unique per epoch (it usually contains the epoch in hex).
pub fn write_jsonl<'s, D, N, F>(
    records: StreamVec<'s, Time, D>,
    dir: PathBuf,
    name: N,
    process: usize,
    progress: Arc<Progress>,
    to_line: F,
) -> StreamVec<'s, Time, (Time, u64)>
where
    D: Clone + 'static,
    N: Fn(Time) -> String + 'static,
    F: Fn(&D, &mut dyn std::io::Write) -> serde_json::Result<()> + 'static,
{
    let worker = records.scope().index();
    records.unary_frontier(Pipeline, "WriteJsonl", move |_cap, _info| {
        let mut held: Epochs<D> = Epochs::default();
        move |(input, frontier), output| {
            input.for_each_stamp(|stamp, data| held.hold(stamp, data, output.output_index()));
            while let Some((time, cap, records)) = held.next_complete(|t| frontier.less_equal(t)) {
                if !records.is_empty() {
                    let name = format!("{}-p{process:03}-w{worker:03}.jsonl", name(time));
                    let written = atomic_write(&dir.join(&name), |out| {
                        for r in &records {
                            to_line(r, &mut *out)?;
                            out.write_all(b"\n")?;
                        }
                        Ok(())
                    });
                    if let Err(e) = written {
                        progress.fail(format!("cannot write {name}: {e:#}"));
                    }
                }
                // The file kind (`segment`, `candidates`, `ratings`...) is the name's first word.
                let stem = name(time);
                let kind = stem.split('-').next().unwrap_or("records");
                if kind == "segment" || kind == "passages" {
                    progress.add_passages(records.len() as u64);
                } else {
                    progress.add_written(kind, records.len() as u64);
                }
                output.session(&cap).give((time, records.len() as u64));
            }
        }
    })
}
