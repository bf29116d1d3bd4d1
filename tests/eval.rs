//! `backflow eval` with the real SmolLM2: reference NLL against the numpy reference and against
//! `backflow train`'s held-out loss; the whole job on real seed tasks (answers, judgments in both
//! orders and both rules, selector ratings), identical answers judged even, and a second run
//! answered entirely from the cache.

mod common;
use backflow::eval::nll::nll_of_examples;
use backflow::train::data::Example;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn model() -> Option<PathBuf> {
    model_and_seed()
}

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json")
}

/// The numpy float64 forward pass (tests/reference/llama_ref.py) over one chat gives the mean
/// NLL of its assistant tokens; backflow's reference NLL over the same ids and mask agrees.
#[test]
fn reference_nll_matches_the_numpy_reference() {
    let Some(model) = model() else { return };
    let r: Value = serde_json::from_str(include_str!("reference/smollm2_nll.json")).expect("ref");
    let ids = ids(&r["ids"]);
    let trained: Vec<bool> = r["target"]
        .as_array()
        .expect("target")
        .iter()
        .map(|v| v.as_bool().expect("bool"))
        .collect();
    let device = Default::default();
    let (m, _) = backflow::train::checkpoint::load_for_loss::<burn::backend::Flex>(&model, &device)
        .expect("load");
    // The GGUF's projections stay in its blocks (no f32 copy), exact as dequantized.
    assert!(m.blocks[0].q.weight.is_none() && m.blocks[0].q.blocks.is_some());
    let got = nll_of_examples(&m, &[Example { ids, trained }], 1, 0, &device, 0);
    let want = r["nll"].as_f64().expect("nll");
    assert_eq!(got.tokens as u64, r["tokens"].as_u64().expect("tokens"));
    assert!(
        (got.nll - want).abs() < 1e-4,
        "backflow {} vs numpy {want}",
        got.nll
    );
}

/// A prompts file of seed tasks with their outputs, the first `n` of the seed.
fn seed_prompts(dir: &Path, n: usize, skip: usize) -> PathBuf {
    let text =
        std::fs::read_to_string(cache_dir().join("seed/seed_tasks.jsonl")).expect("seed tasks");
    let lines: Vec<&str> = text.lines().skip(skip).take(n).collect();
    let p = dir.join("prompts.jsonl");
    std::fs::write(&p, lines.join("\n") + "\n").expect("write");
    p
}

/// `backflow train --eval-data FILE` measures the held-out loss before and after training with
/// the training code; `backflow eval`'s reference NLL of the same file under the same system
/// prompt (the seed tag) and max length is the same number, for the base and for the trained
/// adapter (loaded over the base's own blocks, unmerged, as training holds it).
#[test]
fn reference_nll_equals_the_training_held_out_loss() {
    let Some(model) = model() else { return };
    let tmp = tempfile::tempdir().expect("tmp");
    let prompts = seed_prompts(tmp.path(), 6, 100);
    let train_data = tmp.path().join("train.jsonl");
    std::fs::write(
        &train_data,
        "{\"instruction\": \"Say hi.\", \"output\": \"Hi!\"}\n",
    )
    .expect("write");
    let ck = tmp.path().join("m");
    run_ok(
        backflow()
            .arg("train")
            .arg("--model")
            .arg(&model)
            .arg("--data")
            .arg(&train_data)
            .arg("--eval-data")
            .arg(&prompts)
            .arg("--out")
            .arg(&ck)
            .args(["--steps", "1", "--batch-size", "1"]),
    );
    let meta = json(&ck.join("backflow.json"));
    let before = meta["eval"]["loss_before"]
        .as_f64()
        .unwrap_or_else(|| panic!("no held-out loss before training in {meta}"));
    let out = tmp.path().join("ev");
    run_ok(
        backflow()
            .arg("eval")
            .arg("--prompts")
            .arg(&prompts)
            .arg("--out")
            .arg(&out)
            .arg("--model")
            .arg(format!("base={}", model.display()))
            .arg("--model")
            .arg(format!("trained={}", ck.display()))
            .args(["--system", "Answer in the style of an AI Assistant."])
            .args(["--max-tokens", "4", "--temperature", "0"]),
    );
    let ev = json(&out.join("eval.json"));
    let nll = |name: &str| {
        ev["models"][name]["reference_nll"]
            .as_f64()
            .unwrap_or_else(|| panic!("no reference_nll for {name} in {ev}"))
    };
    let after = meta["eval"]["loss_after"]
        .as_f64()
        .unwrap_or_else(|| panic!("no held-out loss after training in {meta}"));
    // Batches of different shapes sum in a different order: f32 rounding only.
    let (base, trained) = (nll("base"), nll("trained"));
    assert!(
        (base - before).abs() < 1e-4,
        "eval {base} vs train {before}"
    );
    assert!(
        (trained - after).abs() < 1e-4,
        "eval {trained} vs train {after}"
    );
    // One step moved the loss by more than the tolerance: the adapter was applied.
    assert!(
        (after - before).abs() > 1e-3,
        "before {before}, after {after}"
    );
}

/// The whole job on real seed tasks. The model answers; two answer files with identical
/// content are judged by the same small model in both orders under both rules, which must never
/// call a win or a loss (the two orders are then the same prompt); every file's row count
/// matches what eval.json says; run again over the same folder, nothing is generated again.
#[test]
fn eval_end_to_end_identical_answers_even_and_cached_rerun() {
    let Some(model) = model() else { return };
    let tmp = tempfile::tempdir().expect("tmp");
    let n = 3;
    let prompts = seed_prompts(tmp.path(), n, 0);
    let answers = tmp.path().join("answers.jsonl");
    let prompt_rows = jsonl(&prompts);
    let mut lines = String::new();
    for p in &prompt_rows {
        let inst = &p["instances"][0];
        let input = inst["input"].as_str().unwrap_or("").trim();
        let mut instruction = p["instruction"]
            .as_str()
            .expect("instruction")
            .trim()
            .to_owned();
        if !input.is_empty() {
            instruction = format!("{instruction}\n\n{input}");
        }
        lines +=
            &serde_json::json!({"instruction": instruction, "output": inst["output"]}).to_string();
        lines.push('\n');
    }
    std::fs::write(&answers, lines).expect("answers");
    // A dev set: the seed pairs, and as many bad ones.
    let dev = tmp.path().join("dev.jsonl");
    run_ok(
        backflow()
            .arg("selector-devset")
            .arg("--data")
            .arg(&prompts)
            .arg("--out")
            .arg(&dev),
    );
    let dev_rows = jsonl(&dev);
    assert_eq!(dev_rows.len(), 2 * n);
    let out = tmp.path().join("ev");
    let eval = || {
        let o = run_ok(
            backflow()
                .arg("eval")
                .arg("--prompts")
                .arg(&prompts)
                .arg("--out")
                .arg(&out)
                .arg("--answers")
                .arg(format!("human={}", answers.display()))
                .arg("--answers")
                .arg(format!("same={}", answers.display()))
                .arg("--model")
                .arg(format!("base={}", model.display()))
                .arg("--judge")
                .arg(&model)
                .arg("--selector-dev")
                .arg(&dev)
                .args(["--max-tokens", "16", "--judge-tokens", "8"])
                .args(["--rate-tokens", "8", "--threshold", "4"]),
        );
        assert!(!o.stdout.is_empty(), "the report is printed");
        json(&out.join("eval.json"))
    };
    let first = eval();
    assert_eq!(first["baseline"], "human");
    assert_eq!(first["prompts"].as_u64(), Some(n as u64));
    let pairs = first["pairs"].as_array().expect("pairs");
    // Two judged entries (same, base) x two rules.
    assert_eq!(pairs.len(), 4);
    for p in pairs.iter().filter(|p| p["model"] == "same") {
        // The same prompt in both orders gets the same verdict about positions: never a win or
        // a loss. The prob rule always reads a verdict; the 135M judge rarely writes one.
        assert_eq!(
            (p["wins"].as_u64(), p["losses"].as_u64()),
            (Some(0), Some(0)),
            "identical answers are even under the {} rule: {p}",
            p["rule"]
        );
        if p["rule"] == "prob" {
            assert_eq!(p["ties"].as_u64(), Some(n as u64), "{p}");
            assert_eq!(p["win_rate"].as_f64(), Some(0.5));
            let ci = p["ci95"].as_array().expect("ci");
            assert!(ci[0].as_f64().expect("lo") < 0.5 && ci[1].as_f64().expect("hi") > 0.5);
        }
    }
    for p in pairs {
        let counted = ["wins", "losses", "ties", "unparsed"]
            .iter()
            .map(|k| p[*k].as_u64().expect("count"))
            .sum::<u64>();
        assert_eq!(counted, n as u64, "every pair counted once: {p}");
    }
    let judgments = jsonl(&out.join("judgments.jsonl"));
    // Per judged entry, per rule, per prompt: both orders.
    assert_eq!(judgments.len(), 2 * 2 * n * 2);
    for order in ["model_first", "baseline_first"] {
        assert_eq!(
            judgments.iter().filter(|j| j["order"] == order).count(),
            2 * 2 * n
        );
    }
    for j in judgments.iter().filter(|j| j["rule"] == "prob") {
        let p = floats(&j["probs"]);
        // The default prompt (AlpacaEval's) has two verdict tokens, `m` and `M`, no tie.
        assert_eq!(p.len(), 2);
        assert!(p.iter().all(|x| (0.0..=1.0).contains(x)) && p.iter().sum::<f64>() <= 1.0 + 1e-5);
    }
    for j in judgments.iter().filter(|j| j["rule"] == "text") {
        assert!(
            j["raw"].is_string(),
            "text judgments keep the raw answer: {j}"
        );
    }
    let base_answers = jsonl(&out.join("answers-base.jsonl"));
    assert_eq!(base_answers.len(), n);
    assert!(base_answers.iter().all(|a| a["generator"] == "base"));
    let models = &first["models"];
    assert_eq!(models["base"]["answers"].as_u64(), Some(n as u64));
    assert_eq!(models["human"]["answers"].as_u64(), Some(n as u64));
    assert!(models["base"]["reference_nll"].as_f64().expect("nll") > 0.0);
    assert!(models["human"].get("reference_nll").is_none());
    // The selector: every dev pair rated, with the forced choice's probabilities kept.
    let rated = jsonl(&out.join("selector-base.jsonl"));
    assert_eq!(rated.len(), 2 * n);
    let sel = &models["base"]["selector"];
    let c = &sel["confusion"];
    let total: u64 = ["tp", "fp", "fn_", "tn"]
        .iter()
        .map(|k| c[*k].as_u64().expect("count"))
        .sum();
    assert_eq!(total, 2 * n as u64);
    for r in &rated {
        let s = &r["samples"][0];
        let probs = floats(&s["forced_probs"]);
        assert_eq!(probs.len(), 5);
        let total: f64 = probs.iter().sum();
        let expected: f64 = probs
            .iter()
            .enumerate()
            .map(|(i, p)| (i + 1) as f64 * p)
            .sum::<f64>()
            / total;
        assert!((s["expected"].as_f64().expect("expected") - expected).abs() < 1e-4);
    }
    let tp = rated
        .iter()
        .filter(|r| r["label"] == "good" && r["score"].as_f64().is_some_and(|v| v >= 4.0))
        .count() as u64;
    assert_eq!(c["tp"].as_u64(), Some(tp));

    let server = &first["server"];
    assert!(server["new_tokens"].as_u64().expect("new tokens") > 0);
    let second = eval();
    let s = &second["server"];
    assert_eq!(
        s["cache_hits"], s["requests"],
        "a second run is answered from the cache: {s}"
    );
    assert_eq!(s["new_tokens"].as_u64(), Some(0));
    assert_eq!(second["pairs"], first["pairs"]);
}
