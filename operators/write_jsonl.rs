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

/// The progress counter a file's rows are added to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tally {
    /// Passages (the progress line's main count).
    Passages,
    /// Rows of another kind (`candidates`, `ratings`, ...), counted under that name.
    Rows(&'static str),
}

/// Where an epoch's rows go: `DIR/{name(epoch)}-p{process}-w{worker}.jsonl`.
pub struct JsonlFiles<N> {
    /// The output folder.
    pub dir: PathBuf,
    /// The file name of an epoch; unique per epoch (it usually holds the epoch in hex).
    pub name: N,
    /// This process's index.
    pub process: usize,
    /// Which progress counter the rows go to.
    pub tally: Tally,
}

/// `DIR/{kind}-e{epoch}-p{process}-w{worker}.jsonl`, its rows counted as `kind`: the files of
/// a pipeline whose epochs are its only division (`run humpback` names its rounds too).
pub fn epoch_files(
    dir: PathBuf,
    kind: &'static str,
    process: usize,
) -> JsonlFiles<impl Fn(Time) -> String + Clone> {
    JsonlFiles {
        dir,
        name: move |t| format!("{kind}-e{t:016x}"),
        process,
        tally: Tally::Rows(kind),
    }
}

/// The operator: one file per epoch with records (see [`JsonlFiles`]).
pub fn write_jsonl<'s, D, N, F>(
    records: StreamVec<'s, Time, D>,
    files: JsonlFiles<N>,
    progress: Arc<Progress>,
    to_line: F,
) -> StreamVec<'s, Time, (Time, u64)>
where
    D: Clone + 'static,
    N: Fn(Time) -> String + 'static,
    F: Fn(&D, &mut dyn std::io::Write) -> serde_json::Result<()> + 'static,
{
    let worker = records.scope().index();
    let JsonlFiles {
        dir,
        name,
        process,
        tally,
    } = files;
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
                match tally {
                    Tally::Passages => progress.add_passages(records.len() as u64),
                    Tally::Rows(kind) => progress.add_written(kind, records.len() as u64),
                }
                output.session(&cap).give((time, records.len() as u64));
            }
        }
    })
}
