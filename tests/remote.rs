//! Remote inputs against a real S3-protocol server: moto's server mode (`scripts/fetch-assets.sh
//! s3`), started on loopback by each test, objects put with boto3 (not with backflow's client).
//! Listing a prefix reads every kind of input as the same files read locally do; `--follow` on a
//! prefix reads an object uploaded after the start, once, and never a temporary name; a
//! connection cut mid-object loses nothing; a missing bucket is a clear error.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn s3_venv() -> Option<PathBuf> {
    pip_venv("venv-s3", "s3")
}

/// moto's S3 server on a free loopback port, stopped when dropped.
struct S3Server {
    child: Child,
    venv: PathBuf,
    endpoint: String,
}

impl S3Server {
    fn start(venv: PathBuf) -> S3Server {
        let port = free_ports(1)[0];
        let child = Command::new(venv.join("bin/moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server starts");
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto_server never listened");
            std::thread::sleep(Duration::from_millis(100));
        }
        S3Server {
            child,
            venv,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Creates `bucket` (if new) and uploads each `(local file, key)` with boto3.
    fn put(&self, bucket: &str, files: &[(&Path, &str)]) {
        let mut args = vec![self.endpoint.clone(), bucket.to_owned()];
        for (file, key) in files {
            args.push(format!("{}={key}", file.display()));
        }
        let out = Command::new(self.venv.join("bin/python"))
            .arg("-c")
            .arg(PUT_PY)
            .args(&args)
            .output()
            .expect("python runs");
        assert!(
            out.status.success(),
            "boto3 put: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `backflow` with the credentials and endpoint of this server (or of `endpoint`).
    fn backflow(&self, endpoint: Option<&str>) -> Command {
        let mut cmd = backflow();
        cmd.env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ENDPOINT_URL", endpoint.unwrap_or(&self.endpoint))
            .env("AWS_ALLOW_HTTP", "true");
        cmd
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const PUT_PY: &str = r#"
import sys, boto3
endpoint, bucket = sys.argv[1], sys.argv[2]
s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test",
                  aws_secret_access_key="test", region_name="us-east-1")
if bucket not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
    s3.create_bucket(Bucket=bucket)
for spec in sys.argv[3:]:
    path, key = spec.split("=", 1)
    s3.upload_file(path, bucket, key)
"#;

/// A page of `words` pseudo-random words (so a dump of many pages stays large once gzipped).
fn page(i: usize, words: usize) -> Vec<u8> {
    let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let body: Vec<String> = (0..words)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            format!("w{:x}", x % 1_000_003)
        })
        .collect();
    let html = format!(
        "<html><body><h2>Page {i} heading</h2><p>page{i} marker {}.</p></body></html>",
        body.join(" ")
    );
    response_record(
        &format!("http://remote.test/{i}"),
        "text/html; charset=utf-8",
        html.as_bytes(),
    )
}

fn write_warc(path: &Path, pages: std::ops::Range<usize>, words: usize) {
    let records: Vec<_> = pages.map(|i| page(i, words)).collect();
    std::fs::write(path, warc_gz(&records).0).unwrap();
}

/// A folder with one input of each kind the readers know, as a crawl would ship them.
fn crawl_folder(dir: &Path) -> Vec<(PathBuf, String)> {
    std::fs::create_dir_all(dir).unwrap();
    write_warc(&dir.join("a.warc.gz"), 0..6, 300);
    let lines: String = (0..5)
        .map(|i| {
            let text = format!(
                "Jsonl document {i}\n\n{}",
                vec![format!("jsonl{i} sentence goes on"); 30].join(" ")
            );
            format!(
                "{}\n",
                serde_json::json!({"text": text, "id": format!("doc{i}")})
            )
        })
        .collect();
    let zst = zstd::encode_all(lines.as_bytes(), 3).unwrap();
    std::fs::write(dir.join("b.jsonl.zst"), zst).unwrap();
    let html = format!(
        "<html><body><h1>A remote page</h1><p>{}.</p></body></html>",
        vec!["htmlpage text runs long enough"; 30].join(" ")
    );
    std::fs::write(dir.join("c.html"), html).unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fineweb-sample.parquet"),
        dir.join("d.parquet"),
    )
    .unwrap();
    // Skipped in a listing, as in a folder.
    std::fs::write(dir.join(".hidden.jsonl"), "{\"text\": \"never\"}\n").unwrap();
    [
        "a.warc.gz",
        "b.jsonl.zst",
        "c.html",
        "d.parquet",
        ".hidden.jsonl",
    ]
    .iter()
    .map(|n| (dir.join(n), format!("crawl/{n}")))
    .collect()
}

/// The counts of a summary that do not depend on where the files were.
fn counts(s: &serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "files": s["files"], "records_read": s["records_read"], "pages_kept": s["pages_kept"],
        "passages_written": s["passages_written"], "dropped": s["dropped"].as_object().map(|d| {
            d.iter().map(|(k, v)| (k.clone(), v["count"].clone())).collect::<serde_json::Map<_, _>>()
        }),
    })
}

#[test]
fn a_listed_prefix_reads_like_the_same_local_folder() {
    let Some(venv) = s3_venv() else { return };
    let s3 = S3Server::start(venv);
    let tmp = tempfile::tempdir().unwrap();
    let local = tmp.path().join("crawl");
    let files = crawl_folder(&local);
    let puts: Vec<(&Path, &str)> = files
        .iter()
        .map(|(p, k)| (p.as_path(), k.as_str()))
        .collect();
    s3.put("dumps", &puts);

    let from_s3 = tmp.path().join("from-s3");
    let out = run_ok(
        s3.backflow(None)
            .args(["segment", "s3://dumps/crawl/", "-q", "--out"])
            .arg(&from_s3),
    );
    let from_disk = tmp.path().join("from-disk");
    run_ok(
        backflow()
            .args(["segment", "-q", "--out"])
            .arg(&from_disk)
            .arg(&local),
    );
    let (remote, disk) = (summary(&from_s3), summary(&from_disk));
    assert_eq!(remote["files"].as_u64(), Some(4), "{remote:#}");
    assert_eq!(counts(&remote), counts(&disk));
    let texts = passage_texts(&from_s3);
    assert_eq!(texts, passage_texts(&from_disk));
    for needle in ["page5 marker", "jsonl4 sentence", "htmlpage text"] {
        assert!(
            texts.iter().any(|t| t.contains(needle)),
            "{needle} missing: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Origins name the objects by URL.
    let origins: std::collections::BTreeSet<String> = passages(&from_s3)
        .iter()
        .map(|p| p["file"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        origins.contains("s3://dumps/crawl/a.warc.gz"),
        "{origins:?}"
    );

    // One object named alone is read alone.
    let one = tmp.path().join("one");
    run_ok(
        s3.backflow(None)
            .args(["segment", "s3://dumps/crawl/b.jsonl.zst", "-q", "--out"])
            .arg(&one),
    );
    assert_eq!(summary(&one)["files"].as_u64(), Some(1));
    assert!(passage_texts(&one).iter().all(|t| t.contains("jsonl")));
}

#[test]
fn a_missing_bucket_or_prefix_is_a_clear_error() {
    let Some(venv) = s3_venv() else { return };
    let s3 = S3Server::start(venv);
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("x.jsonl");
    std::fs::write(&file, "{\"text\": \"x\"}\n").unwrap();
    s3.put("present", &[(&file, "data/x.jsonl")]);
    for (url, says) in [
        ("s3://absent-bucket/crawl/", "absent-bucket"),
        (
            "s3://present/nothing-here/",
            "no object under s3://present/nothing-here/",
        ),
    ] {
        let out = s3
            .backflow(None)
            .args(["segment", url, "-q", "--out"])
            .arg(tmp.path().join("out"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{url} succeeded");
        assert!(stderr.contains(says), "{url}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn follow_on_a_prefix_reads_each_new_object_once() {
    let Some(venv) = s3_venv() else { return };
    let s3 = S3Server::start(venv);
    let tmp = tempfile::tempdir().unwrap();
    let first = tmp.path().join("first.warc.gz");
    write_warc(&first, 0..2, 300);
    s3.put("live", &[(&first, "incoming/first.warc.gz")]);

    let out = tmp.path().join("out");
    let mut job = s3
        .backflow(None)
        .args(["segment", "--follow", "s3://live/incoming/"])
        .arg("--out")
        .arg(&out)
        .arg("-q")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_passage(&out, "page1 marker", 90);
    // Appears after the start; then a temporary name that must never be read.
    let second = tmp.path().join("second.warc.gz");
    write_warc(&second, 10..12, 300);
    let partial = tmp.path().join("partial.warc.gz");
    write_warc(&partial, 20..21, 300);
    s3.put(
        "live",
        &[
            (&partial, "incoming/third.warc.gz.part"),
            (&second, "incoming/second.warc.gz"),
        ],
    );
    wait_for_passage(&out, "page11 marker", 90);
    // Several more polls of an unchanged prefix read nothing again.
    std::thread::sleep(Duration::from_millis(1000));
    interrupt(&mut job);
    let s = summary(&out);
    assert_eq!(s["files"].as_u64(), Some(2), "{s:#}");
    let texts: Vec<_> = passages(&out)
        .iter()
        .map(|p| p["text"].as_str().unwrap().to_owned())
        .collect();
    for i in [0, 1, 10, 11] {
        let needle = format!("page{i} marker");
        assert_eq!(
            texts.iter().filter(|t| t.contains(&needle)).count(),
            1,
            "{needle}"
        );
    }
    assert!(!texts.iter().any(|t| t.contains("page20 marker")));
}

/// A TCP relay to the S3 server that cuts the first connection to carry more than `cut_after`
/// bytes back to the client, once, mid-response.
struct CuttingProxy {
    port: u16,
    cuts: Arc<AtomicUsize>,
}

impl CuttingProxy {
    fn start(upstream: u16, cut_after: usize) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cuts = Arc::new(AtomicUsize::new(0));
        let armed = Arc::new(AtomicBool::new(true));
        let counter = cuts.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                // Requests go up untouched.
                std::thread::spawn(move || relay(c2, s2, usize::MAX, &AtomicBool::new(false)));
                let (armed, counter) = (armed.clone(), counter.clone());
                std::thread::spawn(move || {
                    if relay(server, client, cut_after, &armed) {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
        CuttingProxy { port, cuts }
    }
}

/// Copies `from` to `to` until either end closes; if `armed` is still set once `limit` bytes
/// have passed, disarms it and cuts both connections (returns true).
fn relay(mut from: TcpStream, mut to: TcpStream, limit: usize, armed: &AtomicBool) -> bool {
    let mut buf = [0u8; 16 << 10];
    let mut passed = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if passed + n > limit && armed.swap(false, Ordering::SeqCst) {
            let _ = to.write_all(&buf[..limit - passed]);
            let _ = to.shutdown(Shutdown::Both);
            let _ = from.shutdown(Shutdown::Both);
            return true;
        }
        passed += n;
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    false
}

#[test]
fn a_connection_cut_mid_object_loses_nothing() {
    let Some(venv) = s3_venv() else { return };
    let s3 = S3Server::start(venv);
    let tmp = tempfile::tempdir().unwrap();
    let dump = tmp.path().join("big.warc.gz");
    write_warc(&dump, 0..400, 300);
    let size = std::fs::metadata(&dump).unwrap().len() as usize;
    assert!(size > 256 << 10, "{size} bytes: too small to cut mid-body");
    s3.put("flaky", &[(&dump, "big.warc.gz")]);

    let port: u16 = s3.endpoint.rsplit(':').next().unwrap().parse().unwrap();
    let proxy = CuttingProxy::start(port, size / 3);
    let out = tmp.path().join("out");
    let run = run_ok(
        s3.backflow(Some(&format!("http://127.0.0.1:{}", proxy.port)))
            .args(["segment", "s3://flaky/big.warc.gz", "-q", "--out"])
            .arg(&out),
    );
    assert_eq!(
        proxy.cuts.load(Ordering::SeqCst),
        1,
        "the proxy never cut the object's body"
    );
    let local = tmp.path().join("local");
    run_ok(
        backflow()
            .args(["segment", "-q", "--out"])
            .arg(&local)
            .arg(&dump),
    );
    let s = summary(&out);
    assert_eq!(
        counts(&s),
        counts(&summary(&local)),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(dropped(&s, "unreadable_file"), 0, "{s:#}");
    assert_eq!(passage_texts(&out), passage_texts(&local));
    assert_eq!(s["records_read"].as_u64(), Some(400));
}
