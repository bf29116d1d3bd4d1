//! `segment`: pages to self-contained [`Passage`]s (paper §2.1): a header with the content under
//! it, 600..3000 characters, without empty, all-caps, navigation or repetitive headers.

use super::{Time, WorkerStats};
use crate::records::{Origin, Page, Passage};
use crate::stats::Drop;
use crate::text::minhash::content_hash;
use crate::text::segment::{SegmentOptions, Segmenter};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::Operator;
use timely::dataflow::StreamVec;
use xxhash_rust::xxh3::xxh3_64;

/// The operator.
pub fn segment<'s>(
    pages: StreamVec<'s, Time, Page>,
    options: SegmentOptions,
    stats: WorkerStats,
) -> StreamVec<'s, Time, Passage> {
    let segmenter = Segmenter::new(&options);
    pages.unary(Pipeline, "Segment", move |_cap, _info| {
        move |input, output| {
            input.for_each_stamp(|cap, data| {
                let mut session = output.session(&cap);
                for page in data.flat_map(|d| d.drain(..)) {
                    let passages = segment_page(page, &segmenter, &stats);
                    session.give_iterator(passages.into_iter());
                }
            });
        }
    })
}

/// Segments one page, counting drops and passages made in `stats`.
pub fn segment_page(page: Page, segmenter: &Segmenter, stats: &WorkerStats) -> Vec<Passage> {
    let Page {
        origin,
        url,
        record_id,
        content,
    } = page;
    let outcome = segmenter.segment(&content);
    let mut s = stats.borrow_mut();
    for (reason, detail) in outcome.drops {
        s.drop(Drop {
            reason,
            file: origin.file.clone(),
            offset: origin.offset,
            detail,
        });
    }
    s.segments_made += outcome.segments.len() as u64;
    outcome
        .segments
        .into_iter()
        .enumerate()
        .map(|(i, seg)| Passage {
            id: passage_id(&origin, &record_id, i),
            content_hash: content_hash(&seg.text),
            text: seg.text,
            url: url.clone(),
            record_id: record_id.clone(),
            origin: origin.clone(),
            header_path: seg.header_path,
        })
        .collect()
}

/// A passage's id: stable across runs, workers and processes (its file, offset, record and index).
fn passage_id(origin: &Origin, record_id: &str, index: usize) -> u64 {
    let key = format!(
        "{}\u{0}{}\u{0}{}\u{0}{}",
        origin.file, origin.offset, record_id, index
    );
    xxh3_64(key.as_bytes())
}
