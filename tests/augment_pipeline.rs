//! `backflow run augment` end to end: the real SmolLM2 GGUF as the backward model over the real
//! Python docs pages, on two workers. Every passage taken gets one candidate, whose output is a
//! passage `backflow segment` writes from the same pages; the books balance; and the same run
//! again in the same folder answers every prompt from the answer cache, with the same
//! instructions.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::Path;

/// passage id -> instruction, from a run's candidates.
fn instructions(out: &Path) -> BTreeMap<String, String> {
    jsonl_lines(out, "candidates-")
        .iter()
        .map(|c| {
            (
                c["passage_id"].as_str().unwrap().to_owned(),
                c["instruction"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn every_passage_gets_one_instruction_and_none_is_generated_twice() {
    let (Some(model), Some(docs)) = (model_and_seed(), python_docs()) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let n = 5u64;
    let augment = || {
        run_ok(
            backflow()
                .args(["run", "augment"])
                .arg(&docs)
                .arg("--model")
                .arg(&model)
                .arg("--out")
                .arg(&out)
                .args(["--limit", &n.to_string(), "--augment-tokens", "16"])
                .args(["-w", "2", "-q"]),
        )
    };
    augment();
    let candidates = jsonl_lines(&out, "candidates-");
    assert_eq!(
        candidates.len() as u64,
        n,
        "one candidate per passage taken"
    );
    let first = instructions(&out);
    assert_eq!(first.len() as u64, n, "each passage once");
    assert!(first.values().all(|i| !i.trim().is_empty()));

    // Every candidate's answer is a passage of the same pages as `segment` makes them.
    let seg = tmp.path().join("seg");
    run_ok(
        backflow()
            .arg("segment")
            .arg(&docs)
            .arg("--out")
            .arg(&seg)
            .arg("-q"),
    );
    let texts = passage_texts(&seg);
    for c in &candidates {
        let output = c["output"].as_str().unwrap();
        assert!(texts.contains(output), "not a passage of the pages: {c}");
    }

    // The books: every passage made was augmented, failed, a duplicate or over the limit, and
    // the summary counts the rows on disk.
    let first_summary = summary(&out);
    assert_eq!(
        first_summary["candidates"].as_u64(),
        Some(n),
        "{first_summary:#}"
    );
    let stats = &first_summary["stats"];
    let drops: u64 = [
        "augment_failed",
        "exact_duplicate",
        "near_duplicate",
        "over_limit",
    ]
    .iter()
    .map(|r| dropped(stats, r))
    .sum();
    assert_eq!(
        stats["segments_made"].as_u64(),
        Some(n + drops),
        "{stats:#}"
    );
    let server = &first_summary["model_server"];
    assert_eq!(server["prompts"].as_u64(), Some(n));
    assert_eq!(server["cache_hits"].as_u64(), Some(0));

    // Again in the same folder: nothing generated, the same instructions.
    augment();
    let again = summary(&out);
    assert_eq!(
        again["model_server"]["cache_hits"].as_u64(),
        Some(n),
        "{again:#}"
    );
    assert_eq!(again["model_server"]["new_tokens"].as_u64(), Some(0));
    assert_eq!(instructions(&out), first);
}
