//! `--follow`: new complete files are processed exactly once, files still being written (under a
//! temporary name) never, Ctrl-C ends cleanly with everything accepted written, and a restart
//! does not read a file again.

mod common;
use common::*;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

fn page_record(i: usize) -> Vec<u8> {
    let body = vec![format!("token{i} follows along"); 60].join(" ");
    let html = format!("<html><body><h2>Section {i}</h2><p>{body}.</p></body></html>");
    response_record(
        &format!("http://follow.test/{i}"),
        "text/html; charset=utf-8",
        html.as_bytes(),
    )
}

/// Writes a dump the way the convention asks: under a `.part` name, then renamed into place.
fn drop_dump(dir: &Path, name: &str, pages: &[usize]) {
    let records: Vec<_> = pages.iter().map(|&i| page_record(i)).collect();
    let part = dir.join(format!("{name}.part"));
    std::fs::write(&part, warc_gz(&records).0).unwrap();
    std::fs::rename(&part, dir.join(name)).unwrap();
}

fn start(watch: &Path, out: &Path) -> Child {
    backflow()
        .arg("segment")
        .arg("--follow")
        .arg(watch)
        .arg("--out")
        .arg(out)
        .arg("-q")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_for(out: &Path, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if out.exists() && passage_texts(out).iter().any(|t| t.contains(needle)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{needle} never written under {}", out.display());
}

fn count(out: &Path, needle: &str) -> usize {
    passages(out)
        .iter()
        .filter(|p| p["text"].as_str().unwrap().contains(needle))
        .count()
}

#[test]
fn follow_processes_each_complete_file_once_and_stops_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let watch = tmp.path().join("watch");
    let out = tmp.path().join("out");
    std::fs::create_dir(&watch).unwrap();

    let mut job = start(&watch, &out);
    drop_dump(&watch, "a.warc.gz", &[1, 2]);
    wait_for(&out, "token2 follows");
    // A file still being written is never read.
    std::fs::write(watch.join("b.warc.gz.part"), warc_gz(&[page_record(3)]).0).unwrap();
    drop_dump(&watch, "c.warc.gz", &[4]);
    wait_for(&out, "token4 follows");
    interrupt(&mut job);
    let s = summary(&out);
    assert_eq!(s["files"].as_u64(), Some(2), "{s:#}");
    assert_eq!(count(&out, "token3 follows"), 0, "a .part file was read");

    // Restarted with the same command: only the newly completed file is read.
    std::fs::rename(watch.join("b.warc.gz.part"), watch.join("b.warc.gz")).unwrap();
    let mut job = start(&watch, &out);
    wait_for(&out, "token3 follows");
    interrupt(&mut job);
    for needle in [
        "token1 follows",
        "token2 follows",
        "token3 follows",
        "token4 follows",
    ] {
        assert_eq!(
            count(&out, needle),
            1,
            "{needle} written {} times",
            count(&out, needle)
        );
    }
    assert_eq!(summary(&out)["files"].as_u64(), Some(1));
}
