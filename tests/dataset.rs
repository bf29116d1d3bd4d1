//! `backflow dataset`: a run's curated sets as a dataset folder that the real Hugging Face
//! `datasets` package (`scripts/fetch-assets.sh datasets`) loads with `load_dataset(DIR)`,
//! every row as it was written, the last round as the default config.

mod common;

use std::process::Command;

fn datasets_python() -> Option<std::path::PathBuf> {
    common::pip_venv("venv-datasets", "datasets").map(|v| v.join("bin/python"))
}

fn row(i: usize, round: usize) -> serde_json::Value {
    serde_json::json!({
        "instruction": format!("Question {i} of round {round}: ¿qué es esto? 🙂"),
        "input": "",
        "output": format!("Answer {i}\nwith two lines"),
        "score": if i.is_multiple_of(3) { None } else { Some(5.0) },
        "graded": 3.5 + i as f64 / 100.0,
        "model_version": format!("m{round}"),
        "source": {"passage_id": format!("{i:016x}"), "url": format!("https://x.org/{i}"),
                   "file": "crawl.warc.gz", "offset": 1000 * i as u64, "augment_version": "myx"},
    })
}

#[test]
fn load_dataset_reads_every_curated_row() {
    let Some(py) = datasets_python() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    let run = dir.path();
    // Round 1 in two workers' files, round 2 in one with a line that does not parse.
    let lines =
        |rows: &[serde_json::Value]| -> String { rows.iter().map(|r| format!("{r}\n")).collect() };
    let r1: Vec<_> = (0..7).map(|i| row(i, 1)).collect();
    let r2: Vec<_> = (0..5).map(|i| row(i, 2)).collect();
    std::fs::write(run.join("curated-r01-e0-p000-w000.jsonl"), lines(&r1[..4])).expect("w");
    std::fs::write(run.join("curated-r01-e0-p000-w001.jsonl"), lines(&r1[4..])).expect("w");
    let mut bad = lines(&r2);
    bad.insert_str(0, "{\"instruction\": 5}\n");
    std::fs::write(run.join("curated-r02-e0-p000-w000.jsonl"), bad).expect("w");
    std::fs::write(run.join("ratings-r01-e0-p000-w000.jsonl"), "{}\n").expect("w");

    let out = Command::new(env!("CARGO_BIN_EXE_backflow"))
        .arg("dataset")
        .arg(run)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("round 1: 7 rows") && stderr.contains("round 2: 5 rows"),
        "{stderr}"
    );
    assert!(stderr.contains("skipped 1 lines"), "{stderr}");

    let script = r#"
import json, sys, datasets
d = sys.argv[1]
out = {"default": datasets.load_dataset(d, split="train").to_list(),
       "round-01": datasets.load_dataset(d, "round-01", split="train").to_list()}
print(json.dumps(out))
"#;
    let got = Command::new(&py)
        .args(["-c", script])
        .arg(run.join("dataset"))
        .output()
        .expect("python");
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&got.stdout).expect("json");
    for (config, want) in [("default", &r2), ("round-01", &r1)] {
        let rows = got[config].as_array().expect("rows");
        assert_eq!(rows.len(), want.len(), "{config}");
        for (g, w) in rows.iter().zip(want.iter()) {
            for key in [
                "instruction",
                "input",
                "output",
                "score",
                "graded",
                "model_version",
            ] {
                assert_eq!(g[key], w[key], "{config} {key}");
            }
            for key in ["passage_id", "url", "file", "offset", "augment_version"] {
                assert_eq!(g[key], w["source"][key], "{config} {key}");
            }
        }
    }
}
