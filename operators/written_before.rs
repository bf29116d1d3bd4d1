//! `written_before`: the passages an earlier run of a `--follow` job wrote, read back from its
//! output files at time 0 so that dedup knows them (a restarted job never writes a passage
//! twice). Worker 0 reads one file per activation; the others emit nothing.

use super::Time;
use crate::output::WrittenPassage;
use crate::progress::Progress;
use crate::records::{Origin, Passage};
use std::io::BufRead;
use std::path::PathBuf;
use std::sync::Arc;
use timely::dataflow::operators::generic::source;
use timely::dataflow::{Scope, StreamVec};

/// The source over `files` (the `segment-*.jsonl` files of the earlier run). A file that cannot be
/// read back fails the job: dedup would otherwise let its passages through again.
pub fn written_before<'s>(
    scope: Scope<'s, Time>,
    files: Vec<PathBuf>,
    progress: Arc<Progress>,
) -> StreamVec<'s, Time, Passage> {
    let leader = scope.index() == 0;
    source(scope, "WrittenBefore", move |cap, info| {
        let activator = scope.activator_for(info.address);
        let mut cap = leader.then_some(cap);
        let mut files = files.into_iter();
        if leader {
            activator.activate();
        }
        move |output| {
            let Some(c) = cap.as_ref() else { return };
            let Some(file) = files.next() else {
                cap = None;
                return;
            };
            match read_passages(&file) {
                Ok(passages) => output.session(c).give_iterator(passages.into_iter()),
                Err(e) => {
                    progress.fail(format!("reading back {}: {e:#}", file.display()));
                    cap = None;
                    return;
                }
            }
            activator.activate();
        }
    })
}

/// The passages of one output file.
fn read_passages(file: &std::path::Path) -> anyhow::Result<Vec<Passage>> {
    let reader = std::io::BufReader::new(std::fs::File::open(file)?);
    let mut out = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line?;
        let w: WrittenPassage =
            serde_json::from_str(&line).map_err(|e| anyhow::anyhow!("line {}: {e}", n + 1))?;
        let parse = |hex: &str| {
            u64::from_str_radix(hex, 16)
                .map_err(|e| anyhow::anyhow!("line {}: {hex:?}: {e}", n + 1))
        };
        out.push(Passage {
            id: parse(&w.id)?,
            content_hash: parse(&w.content_hash)?,
            text: w.text,
            url: String::new(),
            record_id: String::new(),
            origin: Origin {
                file: file.to_string_lossy().into_owned(),
                offset: 0,
            },
            header_path: Vec::new(),
        });
    }
    Ok(out)
}
