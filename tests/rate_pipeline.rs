//! `backflow run rate` end to end with the real SmolLM2 on real seed tasks, on two workers:
//! every pair is accounted for (rated, with its raw answers and the model version), every
//! unparsable rating is counted, and curated pairs are exactly the rated ones at the threshold.

mod common;
use common::*;

fn model() -> Option<std::path::PathBuf> {
    model_and_seed()
}

#[test]
fn every_pair_is_rated_and_accounted_for() {
    let Some(model) = model() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let n = 6;
    run_ok(
        backflow()
            .args(["run", "rate", "--data"])
            .arg(cache_dir().join("seed/seed_tasks.jsonl"))
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(&out)
            .args([
                "--limit",
                &n.to_string(),
                "--threshold",
                "3",
                "--max-new-tokens",
                "24",
            ])
            .args(["--epoch-size", "4", "-w", "2", "-q"]),
    );
    let ratings = jsonl_lines(&out, "ratings-");
    assert_eq!(ratings.len(), n, "every pair rated exactly once");
    let mut indices: Vec<u64> = ratings
        .iter()
        .map(|r| r["source"]["offset"].as_u64().unwrap())
        .collect();
    indices.sort_unstable();
    assert_eq!(indices, (0..n as u64).collect::<Vec<_>>());
    let mut unparsed = 0;
    for r in &ratings {
        assert_eq!(r["model_version"].as_str(), model.to_str());
        let samples = r["samples"].as_array().unwrap();
        assert_eq!(samples.len(), 1);
        assert!(
            !samples[0]["raw"].as_str().unwrap().is_empty(),
            "raw rating text kept"
        );
        let sample = &samples[0];
        if sample["score"].is_null() {
            // No readable `Score: N`: counted, kept raw, and scored by the forced choice.
            unparsed += 1;
            assert!(sample["error"]["kind"].is_string());
            let forced = sample["forced"].as_u64().expect("a forced score");
            assert!((1..=5).contains(&forced), "{sample}");
            assert_eq!(r["score"].as_f64(), Some(forced as f64));
        } else {
            assert_eq!(r["score"].as_f64(), sample["score"].as_f64());
        }
        if let Some(s) = r["score"].as_f64() {
            assert!((1.0..=5.0).contains(&s) && s.fract() == 0.0);
        }
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(
        summary["stats"]["dropped"]["rating_unparsed"]["count"]
            .as_u64()
            .unwrap_or(0),
        unparsed
    );
    // Curated = rated at or above the threshold, in Alpaca format.
    let curated = jsonl_lines(&out, "curated-");
    let expected = ratings
        .iter()
        .filter(|r| r["score"].as_f64().is_some_and(|s| s >= 3.0))
        .count();
    assert_eq!(curated.len(), expected);
    for c in &curated {
        assert!(c["instruction"].is_string() && c["output"].is_string() && c["input"] == "");
    }
}
