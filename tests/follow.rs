//! `--follow`: new complete files are processed exactly once, files still being written (under a
//! temporary name) never, Ctrl-C ends cleanly with everything accepted written, and a restart
//! does not read a file again.

mod common;
use common::*;
use std::path::Path;
use std::process::{Child, Stdio};

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
    wait_for_passage(out, needle, 60);
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

/// A dump of `n` pages starting at `first`, written in place under `name` (complete at once).
fn big_dump(dir: &Path, name: &str, first: usize, n: usize) {
    let records: Vec<_> = (first..first + n).map(page_record).collect();
    let part = dir.join(format!("{name}.part"));
    std::fs::write(&part, warc_gz(&records).0).unwrap();
    std::fs::rename(&part, dir.join(name)).unwrap();
}

/// Every `tokenN follows` in the output, with how many times it was written.
fn token_counts(out: &Path) -> std::collections::BTreeMap<usize, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for p in passages(out) {
        let text = p["text"].as_str().unwrap();
        let i: usize = text
            .split("token")
            .nth(1)
            .and_then(|t| t.split(' ').next())
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("no token in {text}"));
        *counts.entry(i).or_insert(0) += 1;
    }
    counts
}

fn start_chunked(watch: &Path, out: &Path) -> Child {
    backflow()
        .arg("segment")
        .arg("--follow")
        .arg(watch)
        .arg("--out")
        .arg(out)
        .args(["--chunk-mb", "1", "-q"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Issue 14, case 3: a Ctrl-C in the middle of a file finishes it and records it, and a kill -9
/// in the middle of one leaves it to be read again whole: either way, after a restart every
/// passage is written exactly once.
#[test]
fn follow_is_exactly_once_across_ctrl_c_and_kill() {
    const N: usize = 30_000;
    for kill in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let watch = tmp.path().join("watch");
        let out = tmp.path().join("out");
        std::fs::create_dir(&watch).unwrap();
        big_dump(&watch, "big.warc.gz", 0, N);
        let mut job = start_chunked(&watch, &out);
        // The first sub-epoch of the file is written: it is in flight.
        wait_for(&out, "token1 follows");
        if kill {
            job.kill().unwrap();
            job.wait().unwrap();
        } else {
            interrupt(&mut job);
        }
        let before = token_counts(&out);
        eprintln!(
            "kill={kill}: {} of {N} passages written before the restart",
            before.len()
        );
        assert!(
            before.values().all(|&c| c == 1),
            "a passage written twice before the restart"
        );
        let mut job = start_chunked(&watch, &out);
        drop_dump(&watch, "after.warc.gz", &[N + 1]);
        wait_for(&out, &format!("token{} follows", N + 1));
        interrupt(&mut job);
        let after = token_counts(&out);
        let wrong: Vec<_> = (0..N)
            .chain([N + 1])
            .filter(|i| after.get(i) != Some(&1))
            .take(5)
            .map(|i| (i, after.get(&i).copied().unwrap_or(0)))
            .collect();
        assert!(
            wrong.is_empty(),
            "kill={kill}: passages not written exactly once (token, times): {wrong:?}; \
             {} before the restart",
            before.len()
        );
        assert_eq!(after.len(), N + 1, "kill={kill}");
    }
}

/// Issue 14, cases 4 and 5: after a restart, dedup remembers what was written (a file repeating
/// earlier passages writes none of them), and the followed folder spelled another way
/// (`./watch/` from its parent) is the same folder (nothing is read again).
#[test]
fn follow_restart_keeps_dedup_state_and_folder_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let watch = tmp.path().join("watch");
    let out = tmp.path().join("out");
    std::fs::create_dir(&watch).unwrap();
    let mut job = start(&watch, &out);
    drop_dump(&watch, "a.warc.gz", &[1, 2, 3]);
    wait_for(&out, "token3 follows");
    interrupt(&mut job);

    // The same folder, spelled relative to its parent with a trailing slash.
    let mut job = backflow()
        .current_dir(tmp.path())
        .args(["segment", "--follow", "./watch/", "--out", "out", "-q"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop_dump(&watch, "b.warc.gz", &[1, 2, 3, 4]);
    wait_for(&out, "token4 follows");
    interrupt(&mut job);
    let s = summary(&out);
    assert_eq!(s["files"].as_u64(), Some(1), "a.warc.gz read again: {s:#}");
    assert_eq!(dropped(&s, "exact_duplicate"), 3, "{s:#}");
    let counts = token_counts(&out);
    assert_eq!(
        counts,
        [(1, 1), (2, 1), (3, 1), (4, 1)].into_iter().collect(),
        "each passage once"
    );
}

/// Issue 14, case 8: in a two-process `--follow` job, killing process 1 ends process 0 with a
/// clear message and a non-zero exit (no panic) within a bounded time, and the same two
/// commands started again go on: every passage written exactly once.
#[test]
fn a_lost_peer_ends_the_job_cleanly_and_a_restart_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let watch = tmp.path().join("watch");
    let out = tmp.path().join("out");
    std::fs::create_dir(&watch).unwrap();
    let hostfile = localhost_hostfile(tmp.path(), 2);
    let start_both = || -> Vec<Child> {
        (0..2)
            .map(|p| {
                backflow()
                    .arg("segment")
                    .arg("--follow")
                    .arg(&watch)
                    .arg("--out")
                    .arg(&out)
                    .args(["-q", "-n", "2", "-p", &p.to_string(), "-h"])
                    .arg(&hostfile)
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect()
    };
    let mut jobs = start_both();
    drop_dump(&watch, "a.warc.gz", &[1, 2, 3, 4]);
    wait_for(&out, "token4 follows");
    jobs[1].kill().unwrap();
    jobs[1].wait().unwrap();
    // Within 30 s of its peer's death.
    let (status, stderr) = exits_within(&mut jobs[0], 30);
    assert!(
        !status.success(),
        "process 0 exited 0 after losing its peer"
    );
    assert!(stderr.contains("lost its connection"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let mut jobs = start_both();
    drop_dump(&watch, "b.warc.gz", &[5, 6]);
    wait_for(&out, "token6 follows");
    interrupt(&mut jobs[0]);
    let exit = jobs[1].wait().unwrap();
    assert!(exit.success(), "process 1 after the job stopped: {exit:?}");
    let counts = token_counts(&out);
    assert_eq!(
        counts,
        (1..=6).map(|i| (i, 1)).collect(),
        "each passage exactly once"
    );
}
