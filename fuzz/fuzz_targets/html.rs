//! The HTML extractor on arbitrary text (decoded lossily, as the pipeline's charset step would
//! leave it): never a panic, never a hang.
#![no_main]
use backflow::text::html::{extract, ExtractOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let html = String::from_utf8_lossy(data);
    let page = extract(&html, &ExtractOptions::default());
    let _ = page.text_chars();
});
