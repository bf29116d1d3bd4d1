//! Hostile inputs and faults (issue 14), each a crafted file on disk run through the binary: a
//! bounded skip counted under its reason with everything after it kept, or a clear error before
//! any work. Each test names the case it guards.

mod common;
use common::*;
use std::path::Path;

/// A page with one header and a long paragraph of `word`s: one passage when segmented.
fn page(title: &str, word: &str) -> String {
    let body = vec![word; 140].join(" ");
    format!("<html><head><title>{title}</title></head><body><h2>{title}</h2><p>{body}.</p></body></html>")
}

/// A good response record whose page holds the word `good{i}`.
fn good(i: usize) -> Vec<u8> {
    response_record(
        &format!("http://good.test/{i}"),
        "text/html; charset=utf-8",
        page(&format!("Good page {i}"), &format!("good{i} beta gamma")).as_bytes(),
    )
}

/// A record whose header claims `declared` bytes of block but whose block is short.
fn lying(i: usize, declared: &str) -> Vec<u8> {
    let r = String::from_utf8(response_record(
        &format!("http://liar.test/{i}"),
        "text/html",
        page(&format!("Lie {i}"), &format!("lie{i}")).as_bytes(),
    ))
    .unwrap();
    let start = r.find("Content-Length: ").unwrap() + "Content-Length: ".len();
    let end = start + r[start..].find("\r\n").unwrap();
    format!("{}{declared}{}", &r[..start], &r[end..]).into_bytes()
}

/// Runs `segment` on `input` and returns the output folder's summary and passage texts.
fn segment(input: &Path, out: &Path) -> (serde_json::Value, Vec<String>) {
    run_ok(
        backflow()
            .arg("segment")
            .arg(input)
            .arg("--out")
            .arg(out)
            .arg("-q"),
    );
    (summary(out), passage_texts(out).into_iter().collect())
}

/// Case 1: a Content-Length of 10^15, 2^31 + 5, u64::MAX or 17 MiB on a short body costs that one
/// record, counted as `content_length_mismatch`; every record after it is read.
#[test]
fn huge_content_length_costs_one_record() {
    let tmp = tempfile::tempdir().unwrap();
    let lies = [
        "1000000000000000",
        "2147483653",
        "18446744073709551615",
        "17825792",
    ];
    let mut records = Vec::new();
    let mut goods = Vec::new();
    for i in 0..60 {
        if i % 15 == 7 {
            records.push(lying(i, lies[i / 15]));
        } else {
            records.push(good(i));
            goods.push(i);
        }
    }
    let plain = tmp.path().join("plain.warc");
    std::fs::write(&plain, records.concat()).unwrap();
    let gz = tmp.path().join("members.warc.gz");
    std::fs::write(&gz, warc_gz(&records).0).unwrap();
    let one_member = tmp.path().join("one-member.warc.gz");
    std::fs::write(&one_member, gzip(&records.concat())).unwrap();

    for (n, input) in [plain, gz, one_member].iter().enumerate() {
        let (s, texts) = segment(input, &tmp.path().join(format!("out{n}")));
        for i in &goods {
            let word = format!("good{i} beta");
            assert!(
                texts.iter().any(|t| t.contains(&word)),
                "{}: record {i} lost\n{s:#}",
                input.display()
            );
        }
        assert_eq!(
            dropped(&s, "content_length_mismatch"),
            4,
            "{}: {s:#}",
            input.display()
        );
        assert_eq!(s["records_read"], 60, "{}: {s:#}", input.display());
        assert!(
            texts.iter().all(|t| !t.contains("lie")),
            "a lying record kept"
        );
    }
}

/// Case 2: a file in an input folder whose name is not UTF-8 is read by its OS name, and its
/// drops name it (lossily).
#[cfg(unix)]
#[test]
fn non_utf8_file_name_is_read() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("in");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("plain.warc"), good(1)).unwrap();
    let latin1 = dir.join(std::ffi::OsStr::from_bytes(b"caf\xe9.warc"));
    std::fs::write(&latin1, [good(2), lying(3, "99")].concat()).unwrap();
    let (s, texts) = segment(&dir, &tmp.path().join("out"));
    assert_eq!(s["files"], 2, "{s:#}");
    assert!(texts.iter().any(|t| t.contains("good2 beta")), "{s:#}");
    let example = &s["dropped"]["content_length_mismatch"]["examples"][0];
    assert_eq!(example["file"], latin1.to_string_lossy().as_ref(), "{s:#}");
}
