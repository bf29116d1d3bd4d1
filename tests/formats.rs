//! The crawl-dump readers and the WARC writer on real files: pages of the Python docs packed
//! into WARC, hand-built WARC/WET/JSONL files, and every kind of bad input written to disk.
//!
//! Expected counts and offsets come from how each file is built here (record lengths summed by
//! the test), never from the reader's output.

use backflow::formats::{self, InputFile, InputKind, ReadOptions, WarcWriter};
use backflow::records::{Body, RawRecord};
use backflow::stats::{Drop, DropReason};
use flate2::write::GzEncoder;
use flate2::Compression;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

type Item = Result<RawRecord, Drop>;

fn cache_pages_dir() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let dir = Path::new(&home).join(".cache/backflow/pages/python3.11");
    if dir.is_dir() {
        Some(dir)
    } else {
        println!(
            "skipping the real-page part: {} is absent (run scripts/fetch-assets.sh)",
            dir.display()
        );
        None
    }
}

/// Every .html file under `dir`, sorted, found with std only (independent of the crate).
fn html_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "html" || x == "htm") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// `n` HTML bodies: real pages from the cache when present, else small synthetic pages.
fn page_bodies(n: usize) -> Vec<Vec<u8>> {
    match cache_pages_dir() {
        Some(dir) => html_files(&dir)
            .into_iter()
            .take(n)
            .map(|p| std::fs::read(p).unwrap())
            .collect(),
        None => (0..n)
            .map(|i| {
                format!(
                    "<!DOCTYPE html><html><body><h1>Page {i}</h1><p>Text {i}.</p></body></html>\n"
                )
                .into_bytes()
            })
            .collect(),
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A WARC record built by hand, declaring `declared` as its Content-Length.
fn record_declaring(
    wtype: &str,
    uri: Option<&str>,
    content_type: &str,
    block: &[u8],
    declared: usize,
) -> Vec<u8> {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let mut h = format!(
        "WARC/1.0\r\nWARC-Type: {wtype}\r\nWARC-Record-ID: <urn:uuid:00000000-0000-0000-0000-{id:012}>\r\nWARC-Date: 2024-01-01T00:00:00Z\r\n"
    );
    if let Some(u) = uri {
        h.push_str(&format!("WARC-Target-URI: {u}\r\n"));
    }
    h.push_str(&format!(
        "Content-Type: {content_type}\r\nContent-Length: {declared}\r\n\r\n"
    ));
    let mut r = h.into_bytes();
    r.extend_from_slice(block);
    r.extend_from_slice(b"\r\n\r\n");
    r
}

fn record(wtype: &str, uri: Option<&str>, content_type: &str, block: &[u8]) -> Vec<u8> {
    record_declaring(wtype, uri, content_type, block, block.len())
}

/// An HTTP response block.
fn http(status: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut h = format!("HTTP/1.1 {status}\r\n");
    for (k, v) in headers {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    h.push_str("\r\n");
    let mut b = h.into_bytes();
    b.extend_from_slice(body);
    b
}

fn html_response(uri: &str, body: &[u8]) -> Vec<u8> {
    let block = http(
        "200 OK",
        &[("Content-Type", "text/html; charset=UTF-8")],
        body,
    );
    record(
        "response",
        Some(uri),
        "application/http; msgtype=response",
        &block,
    )
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Records concatenated plain, with each record's offset.
fn plain_file(records: &[Vec<u8>]) -> (Vec<u8>, Vec<u64>) {
    let mut out = Vec::new();
    let mut offsets = Vec::new();
    for r in records {
        offsets.push(out.len() as u64);
        out.extend_from_slice(r);
    }
    (out, offsets)
}

/// Records as one gzip member each, with each member's offset.
fn member_file(records: &[Vec<u8>]) -> (Vec<u8>, Vec<u64>) {
    let members: Vec<Vec<u8>> = records.iter().map(|r| gz(r)).collect();
    plain_file(&members)
}

fn read_file(path: &Path, opts: &ReadOptions) -> Vec<Item> {
    let kind = formats::kind_from_name(path).unwrap();
    formats::open(
        &InputFile {
            path: path.to_path_buf(),
            kind,
        },
        opts,
    )
    .collect()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// What a read gave, in order: `Ok(url, offset)` or `Err(reason, offset)`.
fn outline(items: &[Item]) -> Vec<Result<(String, u64), (DropReason, u64)>> {
    items
        .iter()
        .map(|i| match i {
            Ok(r) => Ok((r.url.clone(), r.origin.offset)),
            Err(d) => Err((d.reason, d.offset)),
        })
        .collect()
}

fn html_bytes(r: &RawRecord) -> &[u8] {
    match &r.body {
        Body::Html { bytes, .. } => bytes,
        Body::Text(_) => panic!("expected HTML, got text for {}", r.url),
    }
}

#[test]
fn packs_real_pages_and_reads_them_back_byte_for_byte() {
    let Some(pages_dir) = cache_pages_dir() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("python-docs.warc.gz");
    let summary = formats::pack_html_dir(&pages_dir, &out).unwrap();
    let files = html_files(&pages_dir);
    assert_eq!(summary.pages, files.len() as u64);
    assert!(!tmp.path().join("python-docs.warc.gz.tmp").exists());
    let data = std::fs::read(&out).unwrap();
    assert_eq!(summary.output_bytes, data.len() as u64);

    let items = read_file(&out, &ReadOptions::default());
    // One warcinfo, then one response per page, in path order.
    assert_eq!(items.len(), files.len() + 1);
    let info = items[0].as_ref().unwrap_err();
    assert_eq!(
        (info.reason, info.offset, info.detail.as_str()),
        (DropReason::OtherRecordType, 0, "warcinfo")
    );
    let mut last_offset = 0;
    for (item, file) in items[1..].iter().zip(&files) {
        let r = item.as_ref().unwrap();
        let rel = file
            .strip_prefix(&pages_dir)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        assert_eq!(r.url, format!("file:///{rel}"));
        assert_eq!(
            html_bytes(r),
            std::fs::read(file).unwrap().as_slice(),
            "{rel}"
        );
        assert!(matches!(&r.body, Body::Html { charset: Some(c), .. } if c == "utf-8"));
        assert!(r.origin.offset > last_offset);
        last_offset = r.origin.offset;
        // The offset is where the record's own gzip member starts: it decodes alone.
        let mut member = Vec::new();
        flate2::read::GzDecoder::new(&data[r.origin.offset as usize..])
            .read_to_end(&mut member)
            .unwrap();
        assert!(member.starts_with(b"WARC/1.0\r\nWARC-Type: response\r\n"));
        assert!(member.ends_with(b"\r\n\r\n"));
    }

    // Packing again gives the same bytes (dates are file times, ids derived from content).
    let again = tmp.path().join("again.warc.gz");
    formats::pack_html_dir(&pages_dir, &again).unwrap();
    // Only the WARC-Filename in the warcinfo differs; compare from the first response on.
    let first = items[1].as_ref().unwrap().origin.offset as usize;
    let data2 = std::fs::read(&again).unwrap();
    let first2 = data2.len() - (data.len() - first);
    assert_eq!(&data[first..], &data2[first2..]);
}

#[test]
fn plain_pack_of_a_small_folder_with_meta_charset_and_subfolders() {
    let pages = page_bodies(3);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("site");
    std::fs::create_dir_all(src.join("sub dir")).unwrap();
    std::fs::write(src.join("a.html"), &pages[0]).unwrap();
    std::fs::write(src.join("sub dir/b.htm"), &pages[1]).unwrap();
    let latin = b"<html><head><meta http-equiv=\"Content-Type\" content=\"text/html; charset=ISO-8859-1\"></head><body><p>caf\xe9</p></body></html>";
    std::fs::write(src.join("c.html"), latin).unwrap();
    std::fs::write(src.join("style.css"), b"p {}").unwrap();
    let out = tmp.path().join("site.warc");
    let summary = formats::pack_html_dir(&src, &out).unwrap();
    assert_eq!(summary.pages, 3);
    let items = read_file(&out, &ReadOptions::default());
    assert_eq!(items.len(), 4);
    let got: Vec<(&str, &[u8], Option<&str>)> = items[1..]
        .iter()
        .map(|i| {
            let r = i.as_ref().unwrap();
            match &r.body {
                Body::Html { bytes, charset } => {
                    (r.url.as_str(), bytes.as_slice(), charset.as_deref())
                }
                Body::Text(_) => panic!("text"),
            }
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("file:///a.html", pages[0].as_slice(), Some("utf-8")),
            ("file:///c.html", latin.as_slice(), Some("iso-8859-1")),
            (
                "file:///sub%20dir/b.htm",
                pages[1].as_slice(),
                Some("utf-8")
            ),
        ]
    );
    assert!(formats::pack_html_dir(
        &tmp.path().join("site/sub dir/none"),
        &tmp.path().join("x.warc")
    )
    .is_err());
}

/// warcinfo, request, response (HTML), metadata, chunked+gzip response, resource (HTML),
/// revisit: 3 pages and 4 records of other types.
fn mixed_records() -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let pages = page_bodies(3);
    let info = record(
        "warcinfo",
        None,
        "application/warc-fields",
        b"software: test\r\n",
    );
    let request = record(
        "request",
        Some("http://example.com/a"),
        "application/http; msgtype=request",
        b"GET /a HTTP/1.1\r\nHost: example.com\r\n\r\n",
    );
    let response = html_response("http://example.com/a", &pages[0]);
    let metadata = record(
        "metadata",
        Some("http://example.com/a"),
        "application/warc-fields",
        b"fetchTimeMs: 12\r\n",
    );
    // Chunked transfer encoding around a gzip content encoding, as a server sends it.
    let gzipped = gz(&pages[1]);
    let mut chunked = Vec::new();
    for part in gzipped.chunks(1000) {
        chunked.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        chunked.extend_from_slice(part);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let block = http(
        "200 OK",
        &[
            ("Content-Type", "text/html"),
            ("Transfer-Encoding", "chunked"),
            ("Content-Encoding", "gzip"),
        ],
        &chunked,
    );
    let response2 = record(
        "response",
        Some("http://example.com/b"),
        "application/http; msgtype=response",
        &block,
    );
    let resource = record(
        "resource",
        Some("http://example.com/c"),
        "text/html; charset=windows-1252",
        &pages[2],
    );
    let revisit = record(
        "revisit",
        Some("http://example.com/a"),
        "application/http; msgtype=response",
        b"",
    );
    (
        vec![
            info, request, response, metadata, response2, resource, revisit,
        ],
        pages,
    )
}

fn check_mixed(items: &[Item], offsets: &[u64], pages: &[Vec<u8>]) {
    use DropReason::OtherRecordType as Other;
    assert_eq!(
        outline(items),
        vec![
            Err((Other, offsets[0])),
            Err((Other, offsets[1])),
            Ok(("http://example.com/a".to_owned(), offsets[2])),
            Err((Other, offsets[3])),
            Ok(("http://example.com/b".to_owned(), offsets[4])),
            Ok(("http://example.com/c".to_owned(), offsets[5])),
            Err((Other, offsets[6])),
        ]
    );
    let details: Vec<&str> = items
        .iter()
        .filter_map(|i| i.as_ref().err())
        .map(|d| d.detail.as_str())
        .collect();
    assert_eq!(details, ["warcinfo", "request", "metadata", "revisit"]);
    let r = items[2].as_ref().unwrap();
    assert_eq!(
        r.body,
        Body::Html {
            bytes: pages[0].clone(),
            charset: Some("UTF-8".into())
        }
    );
    assert_eq!(
        r.record_id.len(),
        "urn:uuid:00000000-0000-0000-0000-000000000000".len()
    );
    assert_eq!(html_bytes(items[4].as_ref().unwrap()), pages[1].as_slice());
    assert_eq!(
        items[5].as_ref().unwrap().body,
        Body::Html {
            bytes: pages[2].clone(),
            charset: Some("windows-1252".into())
        }
    );
}

#[test]
fn multi_record_warc_gz_with_request_response_and_metadata() {
    let (records, pages) = mixed_records();
    let tmp = tempfile::tempdir().unwrap();
    let (data, offsets) = member_file(&records);
    let p = write(tmp.path(), "mixed.warc.gz", &data);
    let items = read_file(&p, &ReadOptions::default());
    check_mixed(&items, &offsets, &pages);

    // The same records plain: offsets are those of the `WARC/1.0` lines.
    let (data, offsets) = plain_file(&records);
    let p = write(tmp.path(), "mixed.warc", &data);
    check_mixed(&read_file(&p, &ReadOptions::default()), &offsets, &pages);

    // The same records in ONE gzip member: every record is in the member at offset 0.
    let (plain, _) = plain_file(&records);
    let p = write(tmp.path(), "one-member.warc.gz", &gz(&plain));
    check_mixed(&read_file(&p, &ReadOptions::default()), &[0; 7], &pages);

    // WARC/1.1 is read the same.
    let v11: Vec<Vec<u8>> = records
        .iter()
        .map(|r| {
            let mut r = r.clone();
            r[7] = b'1';
            r
        })
        .collect();
    let (data, offsets) = member_file(&v11);
    let p = write(tmp.path(), "v11.warc.gz", &data);
    check_mixed(&read_file(&p, &ReadOptions::default()), &offsets, &pages);
}

#[test]
fn wet_conversion_records_are_text() {
    let tmp = tempfile::tempdir().unwrap();
    let text = "Python documentation\nThe os module provides ... é ü\n";
    let records = vec![
        record("warcinfo", None, "application/warc-fields", b"x: y\r\n"),
        record(
            "conversion",
            Some("http://example.com/os"),
            "text/plain",
            text.as_bytes(),
        ),
        record(
            "conversion",
            Some("http://example.com/b"),
            "text/plain",
            b"second",
        ),
    ];
    let (data, offsets) = member_file(&records);
    let p = write(tmp.path(), "x.warc.wet.gz", &data);
    let items = read_file(&p, &ReadOptions::default());
    assert_eq!(items.len(), 3);
    let r = items[1].as_ref().unwrap();
    assert_eq!(
        (r.url.as_str(), r.origin.offset),
        ("http://example.com/os", offsets[1])
    );
    assert_eq!(r.body, Body::Text(text.to_owned()));
    assert_eq!(
        items[2].as_ref().unwrap().body,
        Body::Text("second".to_owned())
    );
}

#[test]
fn truncated_gzip_keeps_every_record_before_the_cut() {
    let pages = page_bodies(6);
    let records: Vec<Vec<u8>> = pages
        .iter()
        .enumerate()
        .map(|(i, p)| html_response(&format!("http://x/{i}"), p))
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let (data, offsets) = member_file(&records);
    // Cut in the middle of member 4.
    let member_len = offsets[5] - offsets[4];
    let cut = (offsets[4] + member_len / 2) as usize;
    let p = write(tmp.path(), "cut.warc.gz", &data[..cut]);
    let items = read_file(&p, &ReadOptions::default());
    let mut want: Vec<_> = (0..4)
        .map(|i| Ok((format!("http://x/{i}"), offsets[i])))
        .collect();
    want.push(Err((DropReason::TruncatedGzip, offsets[4])));
    assert_eq!(outline(&items), want);
    for (i, item) in items[..4].iter().enumerate() {
        assert_eq!(html_bytes(item.as_ref().unwrap()), pages[i].as_slice());
    }

    // Cut inside the 10-byte gzip header of member 2.
    let p = write(
        tmp.path(),
        "cut-header.warc.gz",
        &data[..offsets[2] as usize + 5],
    );
    let items = read_file(&p, &ReadOptions::default());
    let mut want: Vec<_> = (0..2)
        .map(|i| Ok((format!("http://x/{i}"), offsets[i])))
        .collect();
    want.push(Err((DropReason::TruncatedGzip, offsets[2])));
    assert_eq!(outline(&items), want);

    // One big member cut at 60%: the records whose bytes (and trailer) decode before the cut
    // survive. Which those are is worked out with flate2 directly, from record lengths.
    let (plain, plain_offsets) = plain_file(&records);
    let whole = gz(&plain);
    let cut = whole.len() * 6 / 10;
    let mut decoded = Vec::new();
    let mut dec = flate2::read::GzDecoder::new(&whole[..cut]);
    let mut buf = [0u8; 4096];
    while let Ok(n) = dec.read(&mut buf) {
        if n == 0 {
            break;
        }
        decoded.extend_from_slice(&buf[..n]);
    }
    let complete = (0..records.len())
        .filter(|&i| plain_offsets[i] as usize + records[i].len() <= decoded.len())
        .count();
    assert!(complete >= 1 && complete < records.len());
    let p = write(tmp.path(), "big-member-cut.warc.gz", &whole[..cut]);
    let items = read_file(&p, &ReadOptions::default());
    let mut want: Vec<_> = (0..complete)
        .map(|i| Ok((format!("http://x/{i}"), 0)))
        .collect();
    want.push(Err((DropReason::TruncatedGzip, 0)));
    assert_eq!(outline(&items), want);
}

#[test]
fn truncated_plain_warc_reports_the_cut_record() {
    let pages = page_bodies(3);
    let records: Vec<Vec<u8>> = pages
        .iter()
        .enumerate()
        .map(|(i, p)| html_response(&format!("http://x/{i}"), p))
        .collect();
    let (data, offsets) = plain_file(&records);
    let tmp = tempfile::tempdir().unwrap();
    let p = write(tmp.path(), "cut.warc", &data[..offsets[2] as usize + 300]);
    let items = read_file(&p, &ReadOptions::default());
    assert_eq!(
        outline(&items),
        vec![
            Ok(("http://x/0".to_owned(), offsets[0])),
            Ok(("http://x/1".to_owned(), offsets[1])),
            Err((DropReason::ContentLengthMismatch, offsets[2])),
        ]
    );
}

#[test]
fn garbage_is_reported_and_skipped_plain() {
    let pages = page_bodies(3);
    let records: Vec<Vec<u8>> = pages
        .iter()
        .enumerate()
        .map(|(i, p)| html_response(&format!("http://x/{i}"), p))
        .collect();
    let g0 = b"this is not a WARC file\nreally not\n".to_vec();
    let g1 = b"\x00\x01\x02 binary junk WARC/1.0 not at a line start\xff\xfe\n".to_vec();
    let g2 = b"trailing junk".to_vec();
    let parts = vec![
        g0.clone(),
        records[0].clone(),
        records[1].clone(),
        g1.clone(),
        records[2].clone(),
        g2.clone(),
    ];
    let (data, off) = plain_file(&parts);
    let tmp = tempfile::tempdir().unwrap();
    let p = write(tmp.path(), "garbage.warc", &data);
    let items = read_file(&p, &ReadOptions::default());
    use DropReason::MalformedRecord as Bad;
    assert_eq!(
        outline(&items),
        vec![
            Err((Bad, off[0])),
            Ok(("http://x/0".to_owned(), off[1])),
            Ok(("http://x/1".to_owned(), off[2])),
            Err((Bad, off[3])),
            Ok(("http://x/2".to_owned(), off[4])),
            Err((Bad, off[5])),
        ]
    );
    let first = items[0].as_ref().unwrap_err();
    assert!(
        first.detail.starts_with(&format!("{} bytes", g0.len())),
        "{}",
        first.detail
    );
    for (i, j) in [(1, 0), (2, 1), (4, 2)] {
        assert_eq!(html_bytes(items[i].as_ref().unwrap()), pages[j].as_slice());
    }
}

#[test]
fn garbage_and_corruption_in_gzip_are_reported_and_skipped() {
    let pages = page_bodies(4);
    let records: Vec<Vec<u8>> = pages
        .iter()
        .enumerate()
        .map(|(i, p)| html_response(&format!("http://x/{i}"), p))
        .collect();
    let members: Vec<Vec<u8>> = records.iter().map(|r| gz(r)).collect();
    let g0 = b"junk before the first member".to_vec();
    let g1 = b"\x1f junk between members \x1f\x8b".to_vec();
    // Member 2 with its first deflate block type set to the reserved value 3: the decoder
    // fails at once.
    let mut bad = gz(b"WARC/1.0\r\nWARC-Type: response\r\n");
    bad[10] |= 0b110;
    let parts = vec![
        g0.clone(),
        members[0].clone(),
        members[1].clone(),
        g1.clone(),
        bad,
        members[2].clone(),
        members[3].clone(),
    ];
    let (data, off) = plain_file(&parts);
    let tmp = tempfile::tempdir().unwrap();
    let p = write(tmp.path(), "garbage.warc.gz", &data);
    let items = read_file(&p, &ReadOptions::default());
    use DropReason::MalformedRecord as Bad;
    assert_eq!(
        outline(&items),
        vec![
            Err((Bad, off[0])),
            Ok(("http://x/0".to_owned(), off[1])),
            Ok(("http://x/1".to_owned(), off[2])),
            Err((Bad, off[3])),
            Err((Bad, off[4])),
            Ok(("http://x/2".to_owned(), off[5])),
            Ok(("http://x/3".to_owned(), off[6])),
        ]
    );
    for (i, j) in [(1, 0), (2, 1), (5, 2), (6, 3)] {
        assert_eq!(html_bytes(items[i].as_ref().unwrap()), pages[j].as_slice());
    }
}

#[test]
fn content_length_that_lies_either_way_is_caught_and_neighbours_survive() {
    let pages = page_bodies(6);
    let block = |i: usize| http("200 OK", &[("Content-Type", "text/html")], &pages[i]);
    let uri = |i: usize| format!("http://x/{i}");
    let ct = "application/http; msgtype=response";
    let records = vec![
        record("response", Some(&uri(0)), ct, &block(0)),
        // Too long: runs 10 bytes into the next record.
        record_declaring(
            "response",
            Some(&uri(1)),
            ct,
            &block(1),
            block(1).len() + 10,
        ),
        record("response", Some(&uri(2)), ct, &block(2)),
        // Too short: ends 10 bytes before its block does.
        record_declaring(
            "response",
            Some(&uri(3)),
            ct,
            &block(3),
            block(3).len() - 10,
        ),
        record("response", Some(&uri(4)), ct, &block(4)),
        // Too long, last record: runs past the end of the input.
        record_declaring(
            "response",
            Some(&uri(5)),
            ct,
            &block(5),
            block(5).len() + 1000,
        ),
    ];
    use DropReason::ContentLengthMismatch as Lie;
    let tmp = tempfile::tempdir().unwrap();
    for gzip in [false, true] {
        let (data, off) = if gzip {
            member_file(&records)
        } else {
            plain_file(&records)
        };
        let p = write(
            tmp.path(),
            if gzip { "lies.warc.gz" } else { "lies.warc" },
            &data,
        );
        let items = read_file(&p, &ReadOptions::default());
        assert_eq!(
            outline(&items),
            vec![
                Ok((uri(0), off[0])),
                Err((Lie, off[1])),
                Ok((uri(2), off[2])),
                Err((Lie, off[3])),
                Ok((uri(4), off[4])),
                Err((Lie, off[5])),
            ],
            "gzip: {gzip}"
        );
        for i in [0, 2, 4] {
            assert_eq!(html_bytes(items[i].as_ref().unwrap()), pages[i].as_slice());
        }
    }
}

#[test]
fn non_html_and_non_2xx_responses_are_dropped_with_their_reason() {
    let pages = page_bodies(2);
    let pdf = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << >>\n%%EOF\n";
    let png =
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00";
    let ct = "application/http; msgtype=response";
    let records = vec![
        html_response("http://x/first", &pages[0]),
        record(
            "response",
            Some("http://x/doc.pdf"),
            ct,
            &http("200 OK", &[("Content-Type", "application/pdf")], pdf),
        ),
        record(
            "response",
            Some("http://x/img.png"),
            ct,
            &http("200 OK", &[("Content-Type", "image/png")], png),
        ),
        record(
            "response",
            Some("http://x/gone"),
            ct,
            &http(
                "404 Not Found",
                &[("Content-Type", "text/html")],
                b"<html>no</html>",
            ),
        ),
        record(
            "response",
            Some("http://x/moved"),
            ct,
            &http("301 Moved Permanently", &[("Location", "/y")], b""),
        ),
        html_response("http://x/last", &pages[1]),
    ];
    let (data, off) = member_file(&records);
    let tmp = tempfile::tempdir().unwrap();
    let p = write(tmp.path(), "mixed.warc.gz", &data);
    let items = read_file(&p, &ReadOptions::default());
    assert_eq!(
        outline(&items),
        vec![
            Ok(("http://x/first".to_owned(), off[0])),
            Err((DropReason::NotHtml, off[1])),
            Err((DropReason::NotHtml, off[2])),
            Err((DropReason::HttpStatus, off[3])),
            Err((DropReason::HttpStatus, off[4])),
            Ok(("http://x/last".to_owned(), off[5])),
        ]
    );
    let details: Vec<&str> = items[1..5]
        .iter()
        .map(|i| i.as_ref().unwrap_err().detail.as_str())
        .collect();
    assert_eq!(details, ["application/pdf", "image/png", "404", "301"]);
}

#[test]
fn empty_files_are_one_drop_each() {
    let tmp = tempfile::tempdir().unwrap();
    for name in [
        "empty.warc.gz",
        "empty.warc",
        "empty.jsonl",
        "empty.jsonl.gz",
        "empty.html",
    ] {
        let p = write(tmp.path(), name, b"");
        let items = read_file(&p, &ReadOptions::default());
        assert_eq!(
            outline(&items),
            vec![Err((DropReason::EmptyFile, 0))],
            "{name}"
        );
    }
}

#[test]
fn a_50_mb_page_is_skipped_and_the_next_records_survive() {
    let pages = page_bodies(2);
    let mut huge = b"<!DOCTYPE html><html><body><p>".to_vec();
    huge.resize(50 << 20, b'a');
    huge.extend_from_slice(b"</p></body></html>");
    let ct = "application/http; msgtype=response";
    let big_pdf = {
        let mut b = b"%PDF-1.4\n".to_vec();
        b.resize(20 << 20, b'0');
        b
    };
    let records = vec![
        html_response("http://x/before", &pages[0]),
        html_response("http://x/huge", &huge),
        record(
            "response",
            Some("http://x/big.pdf"),
            ct,
            &http("200 OK", &[("Content-Type", "application/pdf")], &big_pdf),
        ),
        html_response("http://x/after", &pages[1]),
    ];
    let tmp = tempfile::tempdir().unwrap();
    for gzip in [true, false] {
        let (data, off) = if gzip {
            member_file(&records)
        } else {
            plain_file(&records)
        };
        let p = write(
            tmp.path(),
            if gzip { "huge.warc.gz" } else { "huge.warc" },
            &data,
        );
        let items = read_file(&p, &ReadOptions::default());
        assert_eq!(
            outline(&items),
            vec![
                Ok(("http://x/before".to_owned(), off[0])),
                Err((DropReason::PageTooLarge, off[1])),
                Err((DropReason::NotHtml, off[2])),
                Ok(("http://x/after".to_owned(), off[3])),
            ],
            "gzip: {gzip}"
        );
        assert_eq!(html_bytes(items[3].as_ref().unwrap()), pages[1].as_slice());
    }
    // A smaller configured limit applies to small pages too.
    let (data, off) = plain_file(&records[..1]);
    let p = write(tmp.path(), "limit.warc", &data);
    let opts = ReadOptions {
        max_page_bytes: 100,
        ..ReadOptions::default()
    };
    assert_eq!(
        outline(&read_file(&p, &opts)),
        vec![Err((DropReason::PageTooLarge, off[0]))]
    );
}

#[test]
fn jsonl_with_a_non_json_line_plain_and_gzip() {
    let lines = [
        "{\"text\": \"first passage\", \"url\": \"http://a/\", \"id\": \"a1\"}\n",
        "this line is not JSON\n",
        "{\"text\": \"second\", \"extra\": {\"nested\": [1, 2, {\"x\": null}]}}\n",
        "{\"url\": \"http://no-text/\"}\n",
        "   \n",
        "{\"text\": \"third \\u00e9\"}\n",
    ];
    let data = lines.concat();
    let off = |i: usize| lines[..i].iter().map(|l| l.len() as u64).sum::<u64>();
    let tmp = tempfile::tempdir().unwrap();
    for (name, bytes) in [
        ("p.jsonl", data.as_bytes().to_vec()),
        ("p.jsonl.gz", gz(data.as_bytes())),
    ] {
        let p = write(tmp.path(), name, &bytes);
        let items = read_file(&p, &ReadOptions::default());
        assert_eq!(
            outline(&items),
            vec![
                Ok(("http://a/".to_owned(), off(0))),
                Err((DropReason::InvalidJson, off(1))),
                Ok((String::new(), off(2))),
                Err((DropReason::MissingText, off(3))),
                Ok((String::new(), off(5))),
            ],
            "{name}"
        );
        let texts: Vec<&Body> = items
            .iter()
            .filter_map(|i| i.as_ref().ok())
            .map(|r| &r.body)
            .collect();
        assert_eq!(
            texts,
            [
                &Body::Text("first passage".into()),
                &Body::Text("second".into()),
                &Body::Text("third é".into())
            ]
        );
        assert_eq!(items[0].as_ref().unwrap().record_id, "a1");
    }
    // A truncated .jsonl.gz keeps the lines before the cut.
    let z = gz(data.as_bytes());
    let p = write(tmp.path(), "cut.jsonl.gz", &z[..z.len() - 12]);
    let items = read_file(&p, &ReadOptions::default());
    assert_eq!(
        items.last().unwrap().as_ref().unwrap_err().reason,
        DropReason::TruncatedGzip
    );
    assert_eq!(items[0].as_ref().unwrap().url, "http://a/");
}

#[test]
fn writer_records_read_back_and_offsets_match() {
    let pages = page_bodies(3);
    let tmp = tempfile::tempdir().unwrap();
    for gzip in [true, false] {
        let mut w = WarcWriter::new(Vec::new(), gzip);
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let mut offsets = vec![w
            .write_warcinfo("t.warc", t, &[("software", "test")])
            .unwrap()];
        for (i, p) in pages.iter().enumerate() {
            let block = http("200 OK", &[("Content-Type", "text/html; charset=utf-8")], p);
            offsets.push(
                w.write_response(&format!("http://w/{i}"), t, &block)
                    .unwrap(),
            );
        }
        let data = w.into_inner().unwrap();
        let name = if gzip { "w.warc.gz" } else { "w.warc" };
        let p = write(tmp.path(), name, &data);
        let items = read_file(&p, &ReadOptions::default());
        let mut want = vec![Err((DropReason::OtherRecordType, offsets[0]))];
        want.extend((0..3).map(|i| Ok((format!("http://w/{i}"), offsets[i + 1]))));
        assert_eq!(outline(&items), want, "{name}");
        if !gzip {
            let text = String::from_utf8_lossy(&data);
            assert!(text.contains("WARC-Date: 2023-11-14T22:13:20Z\r\n"));
            assert!(text.contains("Content-Type: application/http; msgtype=response\r\n"));
        }
    }
}

#[test]
fn inputs_from_a_folder_are_read_through_one_entry_point() {
    let pages = page_bodies(2);
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::create_dir_all(d.join("pages")).unwrap();
    std::fs::write(d.join("pages/one.html"), &pages[0]).unwrap();
    std::fs::write(d.join("b.jsonl"), "{\"text\": \"t\"}\n").unwrap();
    let (w, _) = member_file(&[html_response("http://x/0", &pages[1])]);
    std::fs::write(d.join("a.warc.gz"), &w).unwrap();
    let inputs = formats::expand_inputs(&[d.to_string_lossy().into_owned()]).unwrap();
    let kinds: Vec<InputKind> = inputs.iter().map(|i| i.kind).collect();
    assert_eq!(kinds, [InputKind::Warc, InputKind::Jsonl, InputKind::Html]);
    let mut total = 0;
    for input in &inputs {
        let mut reader = formats::open(input, &ReadOptions::default());
        assert_eq!(
            reader.file_len(),
            Some(std::fs::metadata(&input.path).unwrap().len())
        );
        let items: Vec<Item> = reader.by_ref().collect();
        assert_eq!(
            reader.bytes_consumed(),
            reader.file_len().unwrap(),
            "{:?}",
            input.path
        );
        total += items.iter().filter(|i| i.is_ok()).count();
        if input.kind == InputKind::Html {
            let r = items[0].as_ref().unwrap();
            assert_eq!(html_bytes(r), pages[0].as_slice());
            assert!(r.url.starts_with("file:///") && r.url.ends_with("/pages/one.html"));
        }
    }
    assert_eq!(total, 3);
}

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n
    }
}

#[test]
fn one_damaged_byte_costs_at_most_the_record_holding_it() {
    let pages = page_bodies(5);
    let records: Vec<Vec<u8>> = pages
        .iter()
        .enumerate()
        .map(|(i, p)| html_response(&format!("http://x/{i}"), p))
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for gzip in [false, true] {
        let (data, off) = if gzip {
            member_file(&records)
        } else {
            plain_file(&records)
        };
        let name = if gzip { "flip.warc.gz" } else { "flip.warc" };
        for _ in 0..300 {
            let at = rng.below(data.len());
            let mut bad = data.clone();
            bad[at] ^= 1 << rng.below(8);
            // The record (or member) the damaged byte is in.
            let hit = off.iter().rposition(|&o| o as usize <= at).unwrap();
            let p = write(tmp.path(), name, &bad);
            let items = read_file(&p, &ReadOptions::default());
            let intact: Vec<(String, u64, &[u8])> = items
                .iter()
                .filter_map(|i| i.as_ref().ok())
                .filter(|r| r.origin.offset != off[hit])
                .map(|r| (r.url.clone(), r.origin.offset, html_bytes(r)))
                .collect();
            let seen = outline(&items);
            let want: Vec<(String, u64, &[u8])> = (0..records.len())
                .filter(|&j| j != hit)
                .map(|j| (format!("http://x/{j}"), off[j], pages[j].as_slice()))
                .collect();
            assert_eq!(
                intact, want,
                "{name}: byte {at} flipped (record {hit}); read: {seen:?}"
            );
        }
    }
}
