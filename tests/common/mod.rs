//! Helpers shared by the integration tests: the real assets cache, the binary, WARC bytes built by
//! hand (independently of backflow's own writer), and reading a job's outputs.
#![allow(dead_code)]

use flate2::write::GzEncoder;
use flate2::Compression;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};

/// The assets cache (see scripts/fetch-assets.sh).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("BACKFLOW_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/backflow")
        })
}

/// The real HTML pages of the Python docs, or `None` (the test then says so and passes vacuously
/// only when `BACKFLOW_REQUIRE_ASSETS` is unset; CI sets it).
pub fn python_docs() -> Option<PathBuf> {
    let dir = cache_dir().join("pages/python3.11");
    if dir.join(".complete").exists() {
        Some(dir)
    } else if std::env::var_os("BACKFLOW_REQUIRE_ASSETS").is_some() {
        panic!("assets missing: run scripts/fetch-assets.sh");
    } else {
        eprintln!(
            "skipping: {} missing (run scripts/fetch-assets.sh)",
            dir.display()
        );
        None
    }
}

/// The folder of the pinned Python venv `name` that `scripts/fetch-assets.sh WHAT` makes, once
/// complete; `None` with a message otherwise (a panic when `BACKFLOW_REQUIRE_ASSETS` is set).
pub fn pip_venv(name: &str, what: &str) -> Option<PathBuf> {
    let venv = cache_dir().join(name);
    if venv.join(".complete").exists() {
        Some(venv)
    } else if std::env::var_os("BACKFLOW_REQUIRE_ASSETS").is_some() {
        panic!("assets missing: run scripts/fetch-assets.sh {what}");
    } else {
        eprintln!("skipping: {name} is not cached (scripts/fetch-assets.sh {what})");
        None
    }
}

/// The real SmolLM2-135M-Instruct GGUF, when it and the seed tasks are cached; `None` with a
/// message otherwise (a panic when `BACKFLOW_REQUIRE_ASSETS` is set, as in CI).
pub fn model_and_seed() -> Option<PathBuf> {
    let p = cache_dir().join("model/SmolLM2-135M-Instruct.Q4_1.gguf");
    let seed = cache_dir().join("seed/seed_tasks.jsonl");
    if p.exists() && seed.exists() {
        Some(p)
    } else if std::env::var_os("BACKFLOW_REQUIRE_ASSETS").is_some() {
        panic!("assets missing: run scripts/fetch-assets.sh model seed");
    } else {
        eprintln!("skipping: model or seed tasks not cached");
        None
    }
}

/// The numbers of a JSON array (panics on anything else).
pub fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap_or_else(|| panic!("not a number: {x}")))
        .collect()
}

/// The token ids of a JSON array (panics on anything else).
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap_or_else(|| panic!("not an id: {x}")) as u32)
        .collect()
}

/// The backflow binary under test.
pub fn backflow() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_backflow"));
    c.env("RUST_LOG", "warn");
    c
}

/// Runs and asserts success, returning the output.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn backflow");
    assert!(
        out.status.success(),
        "{:?} failed: {}\n{}",
        cmd,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// One WARC/1.0 record, built by hand.
pub fn warc_record(warc_type: &str, uri: &str, content_type: &str, block: &[u8]) -> Vec<u8> {
    let mut r = Vec::new();
    write!(
        r,
        "WARC/1.0\r\nWARC-Type: {warc_type}\r\nWARC-Target-URI: {uri}\r\nWARC-Date: 2026-11-21T00:00:00Z\r\n\
         WARC-Record-ID: <urn:uuid:{:08x}-0000-0000-0000-000000000000>\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\n\r\n",
        xxhash_rust::xxh3::xxh3_64(uri.as_bytes()) as u32,
        block.len()
    )
    .unwrap();
    r.extend_from_slice(block);
    r.extend_from_slice(b"\r\n\r\n");
    r
}

/// An HTTP response block.
pub fn http_response(content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// A response record holding `body` as `content_type`.
pub fn response_record(uri: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    warc_record(
        "response",
        uri,
        "application/http; msgtype=response",
        &http_response(content_type, body),
    )
}

/// Gzip of `bytes` as one member.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Records as a Common-Crawl-style .warc.gz: one gzip member per record. Returns the bytes and
/// the offset of each member.
pub fn warc_gz(records: &[Vec<u8>]) -> (Vec<u8>, Vec<u64>) {
    let mut out = Vec::new();
    let mut offsets = Vec::new();
    for r in records {
        offsets.push(out.len() as u64);
        out.extend(gzip(r));
    }
    (out, offsets)
}

/// The `.html` files under `dir`, sorted.
pub fn html_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "html") {
                found.push(p);
            }
        }
    }
    found.sort();
    found
}

/// Every passage line written under `out` (files whose names contain `segment`).
pub fn passages(out: &Path) -> Vec<serde_json::Value> {
    let mut all = Vec::new();
    for e in std::fs::read_dir(out).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.contains("segment") && name.ends_with(".jsonl") {
            // A file can go between the listing and the read (a restarted --follow job removes
            // the epoch files of a file it reads again).
            let text = match std::fs::read_to_string(e.path()) {
                Ok(t) => t,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => panic!("{}: {err}", e.path().display()),
            };
            for line in text.lines() {
                all.push(serde_json::from_str(line).expect("each output line is JSON"));
            }
        }
    }
    all
}

/// The set of passage texts under `out`.
pub fn passage_texts(out: &Path) -> BTreeSet<String> {
    passages(out)
        .iter()
        .map(|p| p["text"].as_str().unwrap().to_owned())
        .collect()
}

/// Waits up to `secs` for a passage containing `needle` under `out` (a job still running).
pub fn wait_for_passage(out: &Path, needle: &str, secs: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if out.exists() && passage_texts(out).iter().any(|t| t.contains(needle)) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("{needle} never written under {}", out.display());
}

/// The job's summary.
pub fn summary(out: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(out.join("summary.json")).expect("summary.json written");
    serde_json::from_str(&text).unwrap()
}

/// How many were dropped for `reason` in a summary.
pub fn dropped(summary: &serde_json::Value, reason: &str) -> u64 {
    summary["dropped"][reason]["count"].as_u64().unwrap_or(0)
}

/// Two free localhost ports for a two-process job.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// `DIR/hosts`: a hostfile of `n` processes on this machine, each at a free port.
pub fn localhost_hostfile(dir: &Path, n: usize) -> PathBuf {
    let hostfile = dir.join("hosts");
    let lines: String = free_ports(n)
        .iter()
        .map(|p| format!("127.0.0.1:{p}\n"))
        .collect();
    std::fs::write(&hostfile, lines).unwrap();
    hostfile
}

/// Ctrl-C for a running job: sends SIGINT and requires a clean exit (stderr, when piped, is in
/// the failure message).
pub fn interrupt(child: &mut Child) {
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -INT {}", child.id());
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    let exit = child.wait().unwrap();
    assert!(exit.success(), "exit after Ctrl-C: {exit:?}\n{stderr}");
}

/// Every line, parsed, of the `.jsonl` files under `out` whose names start with `prefix`.
pub fn jsonl_lines(out: &Path, prefix: &str) -> Vec<serde_json::Value> {
    let mut all = Vec::new();
    for e in std::fs::read_dir(out).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix) && name.ends_with(".jsonl") {
            for l in std::fs::read_to_string(e.path()).unwrap().lines() {
                all.push(serde_json::from_str(l).unwrap());
            }
        }
    }
    all
}

/// Rows of every `{prefix}*.jsonl` file under `out`.
pub fn rows(out: &Path, prefix: &str) -> u64 {
    std::fs::read_dir(out)
        .unwrap()
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(prefix) && n.ends_with(".jsonl")
        })
        .map(|e| std::fs::read_to_string(e.path()).unwrap().lines().count() as u64)
        .sum()
}

/// The ingest's books balance (issue 14): every record read became a page or was dropped under
/// a record reason, every passage made was written or dropped as a duplicate (or over the
/// limit), and the passages the summary counts are the rows of the files.
pub fn check_ingest_accounting(stats: &serde_json::Value, written_rows: u64) {
    let n = |key: &str| {
        stats[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key}: {stats:#}"))
    };
    let drops = |reasons: &[&str]| -> u64 { reasons.iter().map(|r| dropped(stats, r)).sum() };
    let record_drops = drops(&[
        "malformed_record",
        "content_length_mismatch",
        "other_record_type",
        "not_html",
        "http_status",
        "page_too_large",
        "invalid_json",
        "missing_text",
        "no_text",
    ]);
    assert_eq!(
        n("records_read"),
        n("pages_kept") + record_drops,
        "records read = pages kept + record drops: {stats:#}"
    );
    assert_eq!(
        n("segments_made"),
        n("passages_written") + drops(&["exact_duplicate", "near_duplicate", "over_limit"]),
        "passages made = written + duplicates + over the limit: {stats:#}"
    );
    assert_eq!(
        n("passages_written"),
        written_rows,
        "the summary counts the rows written: {stats:#}"
    );
}

/// Waits for `child` at most `secs` and returns its status and stderr (piped); kills it and fails
/// the test when it runs longer.
pub fn exits_within(child: &mut Child, secs: u64) -> (std::process::ExitStatus, String) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            if let Some(mut e) = child.stderr.take() {
                e.read_to_string(&mut stderr).unwrap();
            }
            return (status, stderr);
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("still running after {secs}s");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
