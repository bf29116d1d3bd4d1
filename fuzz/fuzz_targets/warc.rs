//! The WARC reader on arbitrary bytes, as plain text and as gzip: it must never panic or hang,
//! must consume no more than it was given, and every record or drop must lie inside the input.
#![no_main]
use backflow::formats::{ReadOptions, WarcReader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Small pages and buffers so that the oversized-block and refill paths are reached.
    let opts = ReadOptions {
        max_page_bytes: 512,
        buffer_bytes: 256,
        ..ReadOptions::default()
    };
    for name in ["fuzz.warc", "fuzz.warc.gz"] {
        let mut reader = WarcReader::new(data, name, &opts);
        let mut items = 0usize;
        for item in reader.by_ref() {
            let offset = match &item {
                Ok(r) => r.origin.offset,
                Err(d) => d.offset,
            };
            assert!(offset <= data.len() as u64, "offset {offset} past the input");
            items += 1;
            // Every item consumes at least one byte of input: no endless stream.
            assert!(items <= data.len() + 1, "more items than input bytes");
        }
        assert!(reader.bytes_consumed() <= data.len() as u64);
    }
});
