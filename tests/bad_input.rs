//! Bad input, each a real file on disk, all in one job: the job goes on, every bad record is
//! counted under its reason with its file and offset, and nothing already accepted is lost.

mod common;
use common::*;
use std::path::Path;

/// A page with one header and a long paragraph of `word`s: one passage when segmented.
fn page(title: &str, word: &str) -> String {
    let body = vec![word; 140].join(" ");
    format!("<html><head><title>{title}</title></head><body><h2>{title}</h2><p>{body}.</p></body></html>")
}

fn example_offsets(summary: &serde_json::Value, reason: &str, file: &Path) -> Vec<u64> {
    summary["dropped"][reason]["examples"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|e| e["file"].as_str() == file.to_str())
                .map(|e| e["offset"].as_u64().unwrap())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_bad_input_is_counted_and_good_records_survive() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("in");
    std::fs::create_dir(&dir).unwrap();
    let html = "text/html; charset=utf-8";
    let good = |i: usize| {
        response_record(
            &format!("http://good.test/{i}"),
            html,
            page(&format!("Good page {i}"), &format!("alpha{i} beta gamma")).as_bytes(),
        )
    };

    // Truncated gzip: three records, the fourth member cut in half.
    let (bytes, offsets) = warc_gz(&[good(1), good(2), good(3), good(4)]);
    let cut = offsets[3] as usize + (bytes.len() - offsets[3] as usize) / 2;
    let truncated = dir.join("truncated.warc.gz");
    std::fs::write(&truncated, &bytes[..cut]).unwrap();

    // Garbage between two records of a plain WARC, and a file of nothing but garbage.
    let mut garbage_bytes = good(5);
    let garbage_at = garbage_bytes.len() as u64;
    garbage_bytes.extend((0..5000u32).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8));
    garbage_bytes.extend(good(6));
    let garbage = dir.join("garbage.warc");
    std::fs::write(&garbage, &garbage_bytes).unwrap();

    // Content-Length that lies: too long (swallows into the next record), then too short.
    let mut lying_bytes = Vec::new();
    let mut long = good(7);
    let long_text = String::from_utf8_lossy(&long).into_owned();
    let declared: usize = long_text
        .split("Content-Length: ")
        .nth(1)
        .unwrap()
        .split("\r\n")
        .next()
        .unwrap()
        .parse()
        .unwrap();
    long = long_text
        .replacen(
            &format!("Content-Length: {declared}\r\n\r\nHTTP"),
            &format!("Content-Length: {}\r\n\r\nHTTP", declared + 700),
            1,
        )
        .into_bytes();
    lying_bytes.extend(&long);
    let after_long = lying_bytes.len();
    lying_bytes.extend(good(8));
    let short_at = lying_bytes.len() as u64;
    let short_text = String::from_utf8_lossy(&good(9)).into_owned();
    lying_bytes.extend(
        short_text
            .replacen(
                &format!("Content-Length: {}\r\n\r\nHTTP", declared),
                &format!("Content-Length: {}\r\n\r\nHTTP", declared - 300),
                1,
            )
            .into_bytes(),
    );
    lying_bytes.extend(good(10));
    let lying = dir.join("lying.warc");
    std::fs::write(&lying, &lying_bytes).unwrap();
    assert!(after_long > 0);

    // Non-HTML responses.
    let pdf = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n";
    let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x02\0\0\0\x90wS\xde";
    let (nonhtml_bytes, nonhtml_offsets) = warc_gz(&[
        response_record("http://files.test/a.pdf", "application/pdf", pdf),
        good(11),
        response_record("http://files.test/b.png", "image/png", png),
    ]);
    let nonhtml = dir.join("nonhtml.warc.gz");
    std::fs::write(&nonhtml, nonhtml_bytes).unwrap();

    // Charsets: latin-1 bytes declared as utf-8, and windows-1252 with no declaration at all.
    let latin = page("Déjà vu", "café naïve façade");
    let latin1: Vec<u8> = latin.chars().map(|c| c as u32 as u8).collect();
    let cp1252: Vec<u8> = page("Smart quotes", "“résumé” élan")
        .chars()
        .map(|c| match c {
            '“' => 0x93,
            '”' => 0x94,
            c => c as u32 as u8,
        })
        .collect();
    let (charset_bytes, _) = warc_gz(&[
        response_record(
            "http://charset.test/latin1",
            "text/html; charset=utf-8",
            &latin1,
        ),
        response_record("http://charset.test/cp1252", "text/html", &cp1252),
    ]);
    let charsets = dir.join("charsets.warc.gz");
    std::fs::write(&charsets, charset_bytes).unwrap();

    // A 50 MB page, and a page nested 100,000 levels deep.
    let mut big_body = page("Big", "huge");
    big_body.push_str(&"<p>filler filler filler filler</p>".repeat(50 * 1024 * 1024 / 34));
    let (huge_bytes, huge_offsets) = warc_gz(&[
        response_record("http://big.test/", html, big_body.as_bytes()),
        good(12),
    ]);
    let huge = dir.join("huge.warc.gz");
    std::fs::write(&huge, huge_bytes).unwrap();
    let deep_html = format!(
        "<html><body>{}{}</body></html>",
        "<div>".repeat(100_000),
        page("Deep", "abyss")
    );
    let (deep_bytes, _) = warc_gz(&[response_record(
        "http://deep.test/",
        html,
        deep_html.as_bytes(),
    )]);
    let deep = dir.join("deep.warc.gz");
    std::fs::write(&deep, deep_bytes).unwrap();

    // An empty file, and JSONL with a line that is not JSON.
    let empty = dir.join("empty.warc.gz");
    std::fs::write(&empty, b"").unwrap();
    let text = |w: &str| format!("{}.", vec![w; 120].join(" "));
    let line1 =
        serde_json::json!({"text": text("first"), "url": "http://jsonl.test/1"}).to_string();
    let bad_line = "{\"text\": \"unterminated";
    let line3 =
        serde_json::json!({"text": text("third"), "url": "http://jsonl.test/3"}).to_string();
    let jsonl = dir.join("bad.jsonl");
    std::fs::write(&jsonl, format!("{line1}\n{bad_line}\n{line3}\n")).unwrap();

    let out = tmp.path().join("out");
    run_ok(
        backflow()
            .arg("segment")
            .arg(&dir)
            .arg("--out")
            .arg(&out)
            .arg("-q"),
    );
    let s = summary(&out);
    check_ingest_accounting(&s, rows(&out, "segment-"));
    let texts = passage_texts(&out);
    let has = |needle: &str| texts.iter().any(|t| t.contains(needle));

    // Every good record survived, whatever surrounded it.
    for i in [1, 2, 3, 5, 6, 8, 10, 11, 12] {
        assert!(has(&format!("alpha{i} beta")), "good record {i} lost");
    }
    assert!(
        has("first first") && has("third third"),
        "good JSONL lines lost"
    );
    // Each bad thing under its own reason, with file and offset.
    assert_eq!(
        example_offsets(&s, "truncated_gzip", &truncated),
        vec![offsets[3]]
    );
    assert!(!example_offsets(&s, "malformed_record", &garbage).is_empty());
    assert!(example_offsets(&s, "malformed_record", &garbage)
        .iter()
        .all(|&o| o >= garbage_at));
    assert_eq!(dropped(&s, "content_length_mismatch"), 2, "{s:#}");
    assert!(example_offsets(&s, "content_length_mismatch", &lying).contains(&0));
    assert!(example_offsets(&s, "content_length_mismatch", &lying).contains(&short_at));
    assert_eq!(
        example_offsets(&s, "not_html", &nonhtml),
        vec![nonhtml_offsets[0], nonhtml_offsets[2]]
    );
    assert_eq!(
        example_offsets(&s, "page_too_large", &huge),
        vec![huge_offsets[0]]
    );
    assert_eq!(dropped(&s, "empty_file"), 1);
    let jsonl_bad_offset = line1.len() as u64 + 1;
    assert_eq!(
        example_offsets(&s, "invalid_json", &jsonl),
        vec![jsonl_bad_offset]
    );
    // Charsets decoded right: declared-wrong latin-1 and undeclared windows-1252.
    assert!(has("café naïve façade"), "latin-1 page mis-decoded");
    assert!(has("“résumé” élan"), "windows-1252 page mis-decoded");
    // The deep page is read, not fatal.
    assert!(has("abyss abyss"), "deeply nested page lost");
}
