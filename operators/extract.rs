//! `extract`: raw records to [`Page`]s of headers and text blocks. HTML is decoded (declared or
//! detected charset) and stripped of boilerplate; text records are split into paragraphs.
//! Pages with no text left are dropped as `no_text`.

use super::{Time, WorkerStats};
use crate::records::{Block, Body, Page, RawRecord};
use crate::stats::{Drop, DropReason};
use crate::text::charset;
use crate::text::html::{ExtractOptions, ExtractedPage, Extractor};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::Operator;
use timely::dataflow::StreamVec;

/// The operator.
pub fn extract<'s>(
    records: StreamVec<'s, Time, RawRecord>,
    options: ExtractOptions,
    stats: WorkerStats,
) -> StreamVec<'s, Time, Page> {
    let extractor = Extractor::new(&options);
    records.unary(Pipeline, "Extract", move |_cap, _info| {
        move |input, output| {
            input.for_each_stamp(|cap, data| {
                let mut session = output.session(&cap);
                for record in data.flat_map(|d| d.drain(..)) {
                    match extract_page(record, &extractor) {
                        Ok(page) => {
                            stats.borrow_mut().pages_kept += 1;
                            session.give(page);
                        }
                        Err(drop) => stats.borrow_mut().drop(drop),
                    }
                }
            });
        }
    })
}

/// Extracts one record; a page with no text is a [`DropReason::NoText`].
pub fn extract_page(record: RawRecord, extractor: &Extractor) -> Result<Page, Drop> {
    let RawRecord {
        origin,
        url,
        record_id,
        body,
    } = record;
    let content = match body {
        Body::Html { bytes, charset } => {
            let decoded = charset::decode_html(&bytes, charset.as_deref());
            extractor.extract(&decoded.text)
        }
        Body::Text(text) => ExtractedPage::from_plain_text(&text),
    };
    let has_text = content.blocks.iter().any(|b| match b {
        Block::Text(t) => !t.trim().is_empty(),
        Block::Heading { .. } => false,
    });
    if !has_text {
        return Err(Drop {
            reason: DropReason::NoText,
            file: origin.file,
            offset: origin.offset,
            detail: url,
        });
    }
    Ok(Page {
        origin,
        url,
        record_id,
        content,
    })
}
