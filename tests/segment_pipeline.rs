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
    run_ok(backflow().arg("warc-pack").arg(&docs).arg("--out").arg(&warc));
    Some(warc)
}

fn segment(inputs: &[&Path], out: &Path, extra: &[&str]) {
    let mut cmd = backflow();
    cmd.arg("segment").args(inputs).arg("--out").arg(out).arg("-q").args(extra);
    run_ok(&mut cmd);
}

/// A page's body text with one word changed in every paragraph: a near duplicate.
fn perturb(html: &str) -> String {
    html.replace("<p>", "<p>Indeed ")
}

#[test]
fn planted_duplicates_are_removed_and_distinct_passages_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(warc) = packed_docs(tmp.path()) else { return };
    let docs = python_docs().unwrap();
    let pages = html_files(&docs);

    // Baseline: the real pages alone.
    let base = tmp.path().join("base");
    segment(&[&warc], &base, &["-w", "2"]);
    let base_summary = summary(&base);
    let base_texts = passage_texts(&base);
    // Every page was read as a record; real docs give many passages.
    // One record per page, plus the warcinfo record warc-pack writes first.
    assert_eq!(base_summary["records_read"].as_u64().unwrap(), pages.len() as u64 + 1);
    assert_eq!(dropped(&base_summary, "other_record_type"), 1);
    assert!(base_texts.len() > 1000, "only {} passages", base_texts.len());
    // Passages respect the length bounds and carry provenance.
    for p in passages(&base) {
        let n = p["text"].as_str().unwrap().chars().count();
        assert!((600..=3000).contains(&n), "passage of {n} chars");
        assert!(p["url"].as_str().unwrap().starts_with("file:///"));
        assert_eq!(p["file"].as_str().unwrap(), warc.to_str().unwrap());
    }
    let written = passages(&base).len();
    assert_eq!(written, base_texts.len(), "exact duplicates left in the output");

    // Plant exact and near copies of three content-rich pages in a later file.
    let planted: Vec<&PathBuf> = ["tutorial/controlflow.html", "library/json.html", "library/re.html"]
        .iter()
        .map(|rel| pages.iter().find(|p| p.ends_with(rel)).expect("page present"))
        .collect();
    let mut records = Vec::new();
    for (i, page) in planted.iter().enumerate() {
        let html = std::fs::read_to_string(page).unwrap();
        records.push(response_record(&format!("http://mirror.test/exact{i}"), "text/html; charset=utf-8", html.as_bytes()));
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
    assert_eq!(passage_texts(&with), base_texts, "planted copies changed the passages kept");
    assert!(dropped(&s, "exact_duplicate") >= dropped(&base_summary, "exact_duplicate") + 3);
    assert!(dropped(&s, "near_duplicate") >= dropped(&base_summary, "near_duplicate") + 3);
    assert_eq!(s["records_read"].as_u64().unwrap(), pages.len() as u64 + 1 + 6);

    // Without near dedup, the perturbed copies come through (so the check above can fail).
    let exact_only = tmp.path().join("exact_only");
    segment(&[&warc, &plants], &exact_only, &["--no-near-dedup"]);
    let extra: BTreeSet<_> = passage_texts(&exact_only).difference(&base_texts).cloned().collect();
    assert!(extra.iter().any(|t| t.contains("Indeed ")), "near copies never reached dedup");
}

#[test]
fn same_passages_from_one_two_workers_and_two_processes() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(warc) = packed_docs(tmp.path()) else { return };
    // Split the input over several files so work is actually shared.
    let mut inputs = vec![warc.clone()];
    for i in 0..3 {
        let copy = tmp.path().join(format!("copy{i}.warc.gz"));
        std::fs::copy(&warc, &copy).unwrap();
        inputs.push(copy);
    }
    let inputs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
    let one = tmp.path().join("w1");
    segment(&inputs, &one, &["-w", "1"]);
    let two = tmp.path().join("w2");
    segment(&inputs, &two, &["-w", "2"]);

    let procs = tmp.path().join("n2");
    let ports = free_ports(2);
    let hostfile = tmp.path().join("hosts");
    std::fs::write(&hostfile, format!("127.0.0.1:{}\n127.0.0.1:{}\n", ports[0], ports[1])).unwrap();
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
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
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
    assert!(names.iter().any(|n| n.contains("-p000-")) && names.iter().any(|n| n.contains("-p001-")));
    // The copies are exact duplicates: each of the three removed every passage of the original.
    let s = summary(&procs);
    assert_eq!(s["processes"].as_u64(), Some(2));
    assert_eq!(s["files"].as_u64(), Some(4));
    assert!(dropped(&s, "exact_duplicate") >= 3 * a.len() as u64);
}
