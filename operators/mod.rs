//! The timely operators of backflow, one per file. Each is a small function from stream to stream
//! that owns its state in its closure and reports what it dropped, and why, into the worker's
//! [`WorkerStats`].

use crate::stats::Stats;
use std::cell::RefCell;
use std::rc::Rc;

pub mod augment;
pub mod await_model;
pub mod curate;
pub mod dedup;
pub mod discover;
pub mod epochs;
pub mod extract;
pub mod limit;
pub mod model_call;
pub mod rate;
pub mod read;
pub mod rerate;
pub mod segment;
pub mod train_sink;
pub mod write;
pub mod write_jsonl;
pub mod written_before;

/// Dataflow time: coarse epochs. Input file `i` owns the epochs `i * SUB_EPOCHS ..
/// (i + 1) * SUB_EPOCHS`; a large file advances through them every `--chunk-mb` of its bytes.
pub type Time = u64;

/// Counters of one worker, shared by its operators (a worker is one thread: no locking).
pub type WorkerStats = Rc<RefCell<Stats>>;

/// A passage with only an id (its text, hash and offset derived from it), for operator tests.
#[cfg(test)]
pub(crate) fn test_passage(id: u64) -> crate::records::Passage {
    crate::records::Passage {
        id,
        content_hash: id,
        text: format!("passage {id}"),
        url: String::new(),
        record_id: String::new(),
        origin: crate::records::Origin {
            file: "f".into(),
            offset: id,
        },
        header_path: Vec::new(),
    }
}
