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
    let s = summary(out);
    check_ingest_accounting(&s, rows(out, "segment-"));
    (s, passage_texts(out).into_iter().collect())
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

/// Runs a command that must fail; returns its stderr.
fn run_fails(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().expect("spawn backflow");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{cmd:?} succeeded, but must fail:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{cmd:?} panicked:\n{stderr}");
    stderr
}

/// Cases 6, 10 and 12: every invalid value is a clear error naming its flag, before any work
/// (no output folder made).
#[test]
fn invalid_values_fail_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let input = tmp.path().join("one.warc");
    std::fs::write(&input, good(1)).unwrap();
    let data = tmp.path().join("pairs.jsonl");
    std::fs::write(
        &data,
        "{\"instruction\": \"Say hi.\", \"output\": \"Hi.\"}\n",
    )
    .unwrap();
    let (input, data, out_s) = (
        input.to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let generate = |flag: &str, v: &str| -> Vec<String> {
        let fv = format!("{flag}={v}");
        ["generate", "--model", data, "--prompt", "hi", &fv]
            .map(String::from)
            .to_vec()
    };
    let train = |flag: &str, v: &str| -> Vec<String> {
        let fv = format!("{flag}={v}");
        [
            "train", "--model", data, "--data", data, "--out", out_s, &fv,
        ]
        .map(String::from)
        .to_vec()
    };
    let rate = |flag: &str, v: &str| -> Vec<String> {
        let fv = format!("{flag}={v}");
        [
            "run", "rate", "--model", data, "--data", data, "--out", out_s, &fv,
        ]
        .map(String::from)
        .to_vec()
    };
    let humpback = |flag: &str, v: &str| -> Vec<String> {
        let fv = format!("{flag}={v}");
        ["run", "humpback", "--out", out_s, &fv]
            .map(String::from)
            .to_vec()
    };
    let segment = |flag: &str, v: &str| -> Vec<String> {
        ["segment", input, "--out", out_s, flag, v]
            .map(String::from)
            .to_vec()
    };
    let mut cases: Vec<(Vec<String>, &str)> = Vec::new();
    for v in ["NaN", "inf", "-1"] {
        cases.push((generate("--temperature", v), "--temperature"));
        cases.push((train("--lr", v), "--lr"));
        cases.push((humpback("--lr", v), "--lr"));
        cases.push((humpback("--temperature", v), "--temperature"));
    }
    for v in ["2", "-1", "NaN"] {
        cases.push((generate("--top-p", v), "--top-p"));
    }
    for flag in ["--steps", "--batch-size", "--grad-accum"] {
        cases.push((train(flag, "0"), flag));
    }
    for flag in ["--samples", "--rate-tokens", "--max-batch", "--epoch-size"] {
        cases.push((rate(flag, "0"), flag));
    }
    for v in ["5.5", "6", "-3", "NaN"] {
        cases.push((rate("--threshold", v), "--threshold"));
        cases.push((humpback("--threshold", v), "--threshold"));
    }
    for v in ["1000", "100000"] {
        cases.push((segment("-w", v), "workers"));
    }
    for (args, flag) in &cases {
        let stderr = run_fails(backflow().args(args));
        assert!(
            stderr.contains(flag),
            "{args:?}: the error does not name {flag}:\n{stderr}"
        );
        assert!(
            !out.exists(),
            "{args:?} made its output folder before failing"
        );
    }
}

/// Case 6: training that diverges (a learning rate of 1e30 makes step 2's loss NaN) stops with an
/// error and never marks its checkpoint finished.
#[test]
fn diverging_training_stops_and_is_never_finished() {
    let Some(model) = model_and_seed() else {
        return;
    };
    let seed = cache_dir().join("seed/seed_tasks.jsonl");
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    let stderr = run_fails(
        backflow()
            .arg("train")
            .arg("--model")
            .arg(&model)
            .arg("--data")
            .arg(&seed)
            .arg("--out")
            .arg(&ck)
            .args(["--steps", "4", "--lr", "1e30", "--batch-size", "2"])
            .args(["--max-len", "128", "--quiet"]),
    );
    assert!(stderr.contains("not finite"), "{stderr}");
    let meta = std::fs::read_to_string(ck.join("backflow.json")).unwrap_or_default();
    assert!(
        !meta.contains("\"finished\": true") && !meta.contains("\"finished\":true"),
        "a diverged run marked finished: {meta}"
    );
    // Nothing after the last finite step is logged.
    let metrics = std::fs::read_to_string(ck.join("metrics.jsonl")).unwrap();
    for line in metrics.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["loss"].as_f64().is_some_and(f64::is_finite), "{line}");
    }
}

/// Case 7: `run rate`'s summary counts the rows of the files it describes (rated = rows of
/// `ratings-*`, curated = rows of `curated-*`), every rated pair is curated or dropped under a
/// reason, and a pair with an empty output is never curated, even at threshold 1.
#[test]
fn rate_summary_counts_the_rows_written() {
    let Some(model) = model_and_seed() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("pairs.jsonl");
    let pairs = [
        ("Name three primary colors.", "Red, yellow and blue."),
        ("Hi?", "Hello! How can I help you today?"),
        ("Explain what a noun is.", ""),
        ("Explain what a verb is.", "   "),
        (
            "What is the capital of France?",
            "Paris is the capital of France.",
        ),
    ];
    let text: String = pairs
        .iter()
        .map(|(i, o)| serde_json::json!({"instruction": i, "output": o}).to_string() + "\n")
        .collect();
    std::fs::write(&data, text).unwrap();
    let out = tmp.path().join("out");
    run_ok(
        backflow()
            .args(["run", "rate", "--data"])
            .arg(&data)
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(&out)
            .args(["--threshold", "1", "--max-new-tokens", "8", "-q"]),
    );
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let (rated, curated) = (rows(&out, "ratings-"), rows(&out, "curated-"));
    assert_eq!(rated, 5, "{s:#}");
    assert_eq!(s["rated"].as_u64(), Some(rated), "{s:#}");
    assert_eq!(s["curated"].as_u64(), Some(curated), "{s:#}");
    // Threshold 1: every score passes; the short instruction and the two empty outputs do not.
    assert_eq!(curated, 2, "{s:#}");
    let d = &s["stats"];
    assert_eq!(dropped(d, "empty_output"), 2, "{s:#}");
    assert_eq!(dropped(d, "instruction_length"), 1, "{s:#}");
    let curate_drops: u64 = [
        "unrated",
        "below_threshold",
        "instruction_length",
        "empty_output",
    ]
    .iter()
    .map(|r| dropped(d, r))
    .sum();
    assert_eq!(rated, curated + curate_drops, "{s:#}");
}

/// Case 9: a hostfile line that is not a resolvable `host:port` is an error naming the line, at
/// once, in every process; and processes that never all connect give up after
/// `--connect-timeout` with a clear message rather than retrying forever.
#[test]
fn bad_hostfile_or_missing_peer_fails_in_bounded_time() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("one.warc");
    std::fs::write(&input, good(1)).unwrap();
    let port = free_ports(1)[0];
    let hostfile = tmp.path().join("hosts");
    for bad in [
        "localhost",
        "localhost:99999",
        "localhost:0",
        ":2101",
        "no-such-host.invalid:2101",
    ] {
        std::fs::write(&hostfile, format!("127.0.0.1:{port}\n{bad}\n")).unwrap();
        for p in ["0", "1"] {
            let mut child = backflow()
                .arg("segment")
                .arg(&input)
                .arg("--out")
                .arg(tmp.path().join("out"))
                .args(["-q", "-n", "2", "-p", p, "-h"])
                .arg(&hostfile)
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let (status, stderr) = exits_within(&mut child, 30);
            assert!(!status.success(), "{bad}: -p {p} succeeded");
            assert!(
                stderr.contains("process 1") && stderr.contains(bad),
                "{bad}: -p {p}: {stderr}"
            );
            assert!(!stderr.contains("panicked"), "{stderr}");
        }
    }
    // A good hostfile, but process 1 never starts.
    let hostfile = localhost_hostfile(tmp.path(), 2);
    for p in ["0", "1"] {
        let mut child = backflow()
            .arg("segment")
            .arg(&input)
            .arg("--out")
            .arg(tmp.path().join("out"))
            .args(["-q", "-n", "2", "-p", p, "--connect-timeout", "2", "-h"])
            .arg(&hostfile)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (status, stderr) = exits_within(&mut child, 30);
        assert!(!status.success());
        assert!(stderr.contains("--connect-timeout 2s"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// Case 11: a FIFO given as an input, or inside an input folder under an input's name, is
/// skipped and counted (`unreadable_file`); the job does not block on it and reads the rest.
#[cfg(unix)]
#[test]
fn a_fifo_is_skipped_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("in");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("good.warc"), good(1)).unwrap();
    let in_folder = dir.join("pipe.warc");
    let named = tmp.path().join("named-pipe");
    for fifo in [&in_folder, &named] {
        let status = std::process::Command::new("mkfifo")
            .arg(fifo)
            .status()
            .unwrap();
        assert!(status.success());
    }
    let out = tmp.path().join("out");
    let mut child = backflow()
        .arg("segment")
        .arg(&dir)
        .arg(&named)
        .arg("--out")
        .arg(&out)
        .arg("-q")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (status, stderr) = exits_within(&mut child, 30);
    assert!(status.success(), "{stderr}");
    let s = summary(&out);
    assert_eq!(dropped(&s, "unreadable_file"), 2, "{s:#}");
    let examples = s["dropped"]["unreadable_file"]["examples"].to_string();
    assert!(examples.contains("a FIFO"), "{s:#}");
    assert!(passage_texts(&out).iter().any(|t| t.contains("good1 beta")));
}

/// `run rate` stops on Ctrl-C like the other pipelines: no new pairs are taken, the ones in flight
/// are rated and written, and the summary counts what was written.
#[test]
fn rate_stops_cleanly_on_ctrl_c() {
    let Some(model) = model_and_seed() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let mut child = backflow()
        .args(["run", "rate", "--data"])
        .arg(cache_dir().join("seed/seed_tasks.jsonl"))
        .arg("--model")
        .arg(&model)
        .arg("--out")
        .arg(&out)
        .args(["--epoch-size", "1", "--max-new-tokens", "8", "-q"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !(out.exists() && rows(&out, "ratings-") > 0) {
        assert!(std::time::Instant::now() < deadline, "no rating written");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    interrupt(&mut child);
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let rated = rows(&out, "ratings-");
    assert!(rated < 175, "stopped early: {rated} of 175 rated");
    assert_eq!(s["rated"].as_u64(), Some(rated), "{s:#}");
    assert_eq!(s["curated"].as_u64(), Some(rows(&out, "curated-")), "{s:#}");
}

/// What the fuzzers found (scripts/fuzz.sh), kept as files: each GGUF panicked the loader
/// (a dims product that overflowed; an embedding tensor with no dims); each is now a clear error.
#[test]
fn fuzzer_findings_are_clear_errors() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz");
    for name in [
        "gguf-dims-overflow.gguf",
        "gguf-embedding-without-dims.gguf",
    ] {
        let stderr = run_fails(
            backflow()
                .arg("generate")
                .arg("--model")
                .arg(dir.join(name))
                .args(["--prompt", "hi", "--max-tokens", "1"]),
        );
        assert!(stderr.contains("error:"), "{name}: {stderr}");
    }
}
