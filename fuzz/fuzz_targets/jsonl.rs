//! The JSONL reader on arbitrary bytes: never a panic; every record or drop inside the input.
#![no_main]
use backflow::formats::{JsonlReader, ReadOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let opts = ReadOptions {
        max_page_bytes: 512,
        buffer_bytes: 256,
        ..ReadOptions::default()
    };
    let mut items = 0usize;
    for item in JsonlReader::new(data, "fuzz.jsonl", &opts) {
        let offset = match &item {
            Ok(r) => r.origin.offset,
            Err(d) => d.offset,
        };
        assert!(offset <= data.len() as u64);
        items += 1;
        assert!(items <= data.len() + 1);
    }
});
