//! Text: decoding HTML bytes ([`charset`]), extracting structured text ([`html`]), cutting it into
//! self-contained passages ([`segment()`], Humpback §2.1) and the hashing primitives of dedup
//! ([`minhash`]).

pub mod charset;
pub mod html;
pub mod minhash;
pub mod segment;

pub use charset::{decode_html, CharsetSource, Decoded};
pub use html::{extract, ExtractOptions, ExtractedPage, Extractor};
pub use minhash::{content_hash, estimated_jaccard, exact_jaccard, normalize, MinHasher};
pub use segment::{segment, Segment, SegmentOptions, SegmentOutcome, Segmenter};
