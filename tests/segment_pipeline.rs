//! The segment pipeline end to end, on real pages (the Python docs packed as WARC/1.0), through
//! the real binary: planted duplicates, worker and process counts, bad input, --follow.

mod common;
use common::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Packs the real pages into `dir/docs.warc.gz` with `backflow warc-pack`.
fn packed_docs(dir: &Path) -> Option<PathBuf> {
    let docs = python_docs()?;
    let warc = dir.join("docs.warc.gz");
    run_ok(
        backflow()
            .arg("warc-pack")
            .arg(&docs)
            .arg("--out")
            .arg(&warc),
    );
    Some(warc)
}

fn segment(inputs: &[&Path], out: &Path, extra: &[&str]) {
    let mut cmd = backflow();
    cmd.arg("segment")
        .args(inputs)
        .arg("--out")
        .arg(out)
        .arg("-q")
        .args(extra);
    run_ok(&mut cmd);
}

/// A page's body text with one word changed in every paragraph: a near duplicate.
fn perturb(html: &str) -> String {
    html.replace("<p>", "<p>Indeed ")
}

#[test]
fn planted_duplicates_are_removed_and_distinct_passages_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(warc) = packed_docs(tmp.path()) else {
        return;
    };
    let docs = python_docs().unwrap();
    let pages = html_files(&docs);

    // Baseline: the real pages alone.
    let base = tmp.path().join("base");
    segment(&[&warc], &base, &["-w", "2"]);
    let base_summary = summary(&base);
    check_ingest_accounting(&base_summary, rows(&base, "segment-"));
    let base_texts = passage_texts(&base);
    // Every page was read as a record; real docs give many passages.
    // One record per page, plus the warcinfo record warc-pack writes first.
    assert_eq!(
        base_summary["records_read"].as_u64().unwrap(),
        pages.len() as u64 + 1
    );
    assert_eq!(dropped(&base_summary, "other_record_type"), 1);
    assert!(
        base_texts.len() > 1000,
        "only {} passages",
        base_texts.len()
    );
    // Passages respect the length bounds and carry provenance.
    for p in passages(&base) {
        let n = p["text"].as_str().unwrap().chars().count();
        assert!((600..=3000).contains(&n), "passage of {n} chars");
        assert!(p["url"].as_str().unwrap().starts_with("file:///"));
        assert_eq!(p["file"].as_str().unwrap(), warc.to_str().unwrap());
    }
    let written = passages(&base).len();
    assert_eq!(
        written,
        base_texts.len(),
        "exact duplicates left in the output"
    );

    // Plant exact and near copies of three content-rich pages in a later file.
    let planted: Vec<&PathBuf> = [
        "tutorial/controlflow.html",
        "library/json.html",
        "library/re.html",
    ]
    .iter()
    .map(|rel| {
        pages
            .iter()
            .find(|p| p.ends_with(rel))
            .expect("page present")
    })
    .collect();
    let mut records = Vec::new();
    for (i, page) in planted.iter().enumerate() {
        let html = std::fs::read_to_string(page).unwrap();
        records.push(response_record(
            &format!("http://mirror.test/exact{i}"),
            "text/html; charset=utf-8",
            html.as_bytes(),
        ));
        records.push(response_record(
            &format!("http://mirror.test/near{i}"),
            "text/html; charset=utf-8",
            perturb(&html).as_bytes(),
        ));
    }
    let plants = tmp.path().join("plants.warc.gz");
    std::fs::write(&plants, warc_gz(&records).0).unwrap();
    let with = tmp.path().join("with");
    segment(&[&warc, &plants], &with, &["-w", "2"]);
    let s = summary(&with);
    check_ingest_accounting(&s, rows(&with, "segment-"));
    let with_texts = passage_texts(&with);
    assert!(
        base_texts.is_subset(&with_texts),
        "planted copies displaced distinct passages"
    );
    assert_eq!(
        s["records_read"].as_u64().unwrap(),
        pages.len() as u64 + 1 + 6
    );
    // The exact copies removed every passage of their page.
    assert!(dropped(&s, "exact_duplicate") >= dropped(&base_summary, "exact_duplicate") + 3);

    // Without near dedup, the perturbed copies come through. Each is judged by its true 5-word
    // shingle Jaccard to the closest original passage, computed here independently.
    let exact_only = tmp.path().join("exact_only");
    segment(&[&warc, &plants], &exact_only, &["--no-near-dedup"]);
    let copies: Vec<String> = passages(&exact_only)
        .iter()
        .filter(|p| {
            p["url"]
                .as_str()
                .unwrap()
                .starts_with("http://mirror.test/near")
        })
        .map(|p| p["text"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        copies.iter().all(|t| t.contains("Indeed ")),
        "unexpected new passages"
    );
    let originals: Vec<BTreeSet<String>> = base_texts.iter().map(|t| shingles(t)).collect();
    let (mut near, mut far) = (0, 0);
    for copy in &copies {
        let sh = shingles(copy);
        let best = originals
            .iter()
            .map(|o| jaccard(&sh, o))
            .fold(0.0, f64::max);
        if best >= 0.9 {
            near += 1;
            assert!(
                !with_texts.contains(copy),
                "near duplicate (J={best:.2}) kept: {}",
                &copy[..80]
            );
        } else if best <= 0.6 {
            far += 1;
            assert!(
                with_texts.contains(copy),
                "distinct passage (J={best:.2}) removed: {}",
                &copy[..80]
            );
        }
    }
    assert!(near >= 3, "only {near} planted near duplicates");
    assert!(dropped(&s, "near_duplicate") >= dropped(&base_summary, "near_duplicate") + near);
    eprintln!(
        "{} perturbed passages: {near} near (J >= 0.9, removed), {far} far (J <= 0.6, kept)",
        copies.len()
    );
}

/// Word 5-gram shingles of lowercased alphanumeric words (the test's own reference).
fn shingles(text: &str) -> BTreeSet<String> {
    let lower = text.to_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    words.windows(5).map(|w| w.join(" ")).collect()
}

fn jaccard(a: &BTreeSet<String>, b: &BTreeSet<String>) -> f64 {
    let inter = a.intersection(b).count() as f64;
    let union = (a.len() + b.len()) as f64 - inter;
    if union == 0.0 {
        0.0
    } else {
        inter / union
    }
}

#[test]
fn same_passages_from_one_two_workers_and_two_processes() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(docs) = python_docs() else { return };
    // Several distinct files (so work is shared by file), and a copy of one (cross-file dedup).
    let mut inputs = Vec::new();
    for part in ["library", "c-api", "howto", "reference"] {
        let warc = tmp.path().join(format!("{part}.warc.gz"));
        run_ok(
            backflow()
                .arg("warc-pack")
                .arg(docs.join(part))
                .arg("--out")
                .arg(&warc),
        );
        inputs.push(warc);
    }
    let copy = tmp.path().join("zz-copy-of-howto.warc.gz");
    std::fs::copy(&inputs[2], &copy).unwrap();
    inputs.push(copy);
    let inputs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
    let one = tmp.path().join("w1");
    segment(&inputs, &one, &["-w", "1"]);
    let two = tmp.path().join("w2");
    segment(&inputs, &two, &["-w", "2"]);

    let procs = tmp.path().join("n2");
    let hostfile = localhost_hostfile(tmp.path(), 2);
    let children: Vec<_> = (0..2)
        .map(|p| {
            backflow()
                .arg("segment")
                .args(&inputs)
                .arg("--out")
                .arg(&procs)
                .args(["-q", "-w", "1", "-n", "2", "-p", &p.to_string(), "-h"])
                .arg(&hostfile)
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let a = passage_texts(&one);
    assert!(!a.is_empty());
    assert_eq!(a, passage_texts(&two), "-w 2 differs from -w 1");
    assert_eq!(a, passage_texts(&procs), "-n 2 differs from -w 1");
    // Both processes wrote their share, and process 0 the merged summary.
    let names: Vec<String> = std::fs::read_dir(&procs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().any(|n| n.contains("-p000-")) && names.iter().any(|n| n.contains("-p001-"))
    );
    // The copy is read last and every one of its passages is an exact duplicate.
    let s = summary(&procs);
    check_ingest_accounting(&s, rows(&procs, "segment-"));
    assert_eq!(s["processes"].as_u64(), Some(2));
    assert_eq!(s["files"].as_u64(), Some(5));
    assert!(passages(&procs)
        .iter()
        .all(|p| !p["file"].as_str().unwrap().contains("zz-copy")));
    let howto = passages(&one)
        .iter()
        .filter(|p| p["file"].as_str().unwrap().contains("howto"))
        .count();
    assert!(howto > 0 && dropped(&s, "exact_duplicate") >= howto as u64);
}
