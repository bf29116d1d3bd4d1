//! `read`: opens each [`WorkItem`] on the worker its index hashes to (work is shared across all
//! workers and processes by file) and streams its records. A large file advances through its
//! sub-epochs every `chunk_bytes` of input, and waits on the probe rather than running more than
//! `max_chunks_ahead` sub-epochs ahead of what has been written.

use super::discover::{file_epoch, WorkItem, SUB_EPOCHS};
use super::{Time, WorkerStats};
use crate::formats::{self, InputFile, ReadOptions, RecordReader};
use crate::progress::Progress;
use crate::records::RawRecord;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::{Capability, Operator};
use timely::dataflow::{ProbeHandle, StreamVec};

/// How the reader paces itself.
#[derive(Clone, Debug)]
pub struct ReadPacing {
    /// Bytes of input per sub-epoch.
    pub chunk_bytes: u64,
    /// Sub-epochs a file may run ahead of the probe.
    pub max_chunks_ahead: u64,
    /// Time spent reading per activation before yielding to the rest of the dataflow.
    pub slice: Duration,
}

impl Default for ReadPacing {
    fn default() -> Self {
        ReadPacing {
            chunk_bytes: 64 << 20,
            max_chunks_ahead: 2,
            slice: Duration::from_millis(20),
        }
    }
}

struct OpenFile {
    cap: Capability<Time>,
    item: WorkItem,
    reader: Option<RecordReader>,
    /// Bytes already reported to the progress counters.
    reported: u64,
}

/// The operator.
pub fn read<'s>(
    items: StreamVec<'s, Time, WorkItem>,
    options: ReadOptions,
    pacing: ReadPacing,
    probe: ProbeHandle<Time>,
    stats: WorkerStats,
    progress: Arc<Progress>,
) -> StreamVec<'s, Time, RawRecord> {
    let scope = items.scope();
    items.unary(
        Exchange::new(|w: &WorkItem| w.index),
        "Read",
        move |_cap, info| {
            let activator = scope.activator_for(info.address);
            let mut queue: VecDeque<OpenFile> = VecDeque::new();
            move |input, output| {
                input.for_each_stamp(|cap, data| {
                    for item in data.flat_map(|d| d.drain(..)) {
                        if let Some(cap) = cap.retain_least(output.output_index()) {
                            queue.push_back(OpenFile {
                                cap,
                                item,
                                reader: None,
                                reported: 0,
                            });
                        }
                    }
                });
                let started = Instant::now();
                let mut blocked = false;
                let mut batch: Vec<RawRecord> = Vec::new();
                while let Some(file) = queue.front_mut() {
                    let reader = file.reader.get_or_insert_with(|| {
                        let input = InputFile {
                            path: file.item.path.clone(),
                            kind: file.item.kind,
                        };
                        formats::open(&input, &options)
                    });
                    let base = file_epoch(file.item.index);
                    let mut finished = false;
                    loop {
                        let chunk = (reader.bytes_consumed() / pacing.chunk_bytes.max(1))
                            .min(SUB_EPOCHS - 1);
                        let time = base + chunk;
                        if time > *file.cap.time() {
                            flush(output, &file.cap, &mut batch);
                            // Wait for the dataflow to catch up before opening a new sub-epoch.
                            if chunk > pacing.max_chunks_ahead
                                && probe.less_than(&(time - pacing.max_chunks_ahead))
                            {
                                blocked = true;
                                break;
                            }
                            file.cap.downgrade(&time);
                        }
                        match reader.next() {
                            Some(Ok(record)) => {
                                stats.borrow_mut().records_read += 1;
                                batch.push(record);
                                if batch.len() >= 64 {
                                    flush(output, &file.cap, &mut batch);
                                }
                            }
                            Some(Err(drop)) => {
                                let mut s = stats.borrow_mut();
                                if drop.reason.is_record() {
                                    s.records_read += 1;
                                }
                                s.drop(drop);
                            }
                            None => {
                                finished = true;
                                break;
                            }
                        }
                        if started.elapsed() >= pacing.slice {
                            break;
                        }
                    }
                    flush(output, &file.cap, &mut batch);
                    let consumed = reader.bytes_consumed();
                    progress.add_bytes(consumed.saturating_sub(file.reported));
                    file.reported = consumed;
                    if !finished {
                        break;
                    }
                    let mut s = stats.borrow_mut();
                    s.files += 1;
                    s.bytes_read += consumed;
                    progress.file_done();
                    queue.pop_front();
                }
                if !queue.is_empty() {
                    if blocked {
                        activator.activate_after(Duration::from_millis(1));
                    } else {
                        activator.activate();
                    }
                }
            }
        },
    )
}

fn flush(
    output: &mut timely::dataflow::operators::generic::OutputBuilderSession<
        '_,
        Time,
        timely::container::CapacityContainerBuilder<Vec<RawRecord>>,
    >,
    cap: &Capability<Time>,
    batch: &mut Vec<RawRecord>,
) {
    if !batch.is_empty() {
        output.session(cap).give_iterator(batch.drain(..));
    }
}
