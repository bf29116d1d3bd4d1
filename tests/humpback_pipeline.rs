//! `backflow run humpback` end to end with the real SmolLM2 on real pages and the real seed
//! tasks: step 0 trains M_yx and M_0, every passage is accounted for, round 2 is rated by the
//! model the training sink published; two processes give what one gives; a job killed with
//! kill -9 and started again loses nothing, repeats nothing, and recomputes no cached answer.

mod common;
use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn assets() -> Option<(PathBuf, PathBuf, PathBuf)> {
    let model = cache_dir().join("model/SmolLM2-135M-Instruct.Q4_1.gguf");
    let seed = cache_dir().join("seed/seed_tasks.jsonl");
    let pages = cache_dir().join("pages/python3.11/tutorial");
    if model.exists() && seed.exists() && pages.exists() {
        Some((model, seed, pages))
    } else if std::env::var_os("BACKFLOW_REQUIRE_ASSETS").is_some() {
        panic!("assets missing: run scripts/fetch-assets.sh model seed pages");
    } else {
        eprintln!("skipping: model, seed tasks or pages not cached");
        None
    }
}

/// Two real pages of the Python tutorial as the crawl.
fn corpus(dir: &Path, pages: &Path) -> PathBuf {
    let c = dir.join("corpus");
    std::fs::create_dir_all(&c).unwrap();
    for name in ["controlflow.html", "datastructures.html"] {
        std::fs::copy(pages.join(name), c.join(name)).unwrap();
    }
    c
}

/// The command, small enough for CI: few passages, short answers, two optimizer steps.
fn humpback(model: &Path, seed: &Path, corpus: &Path, out: &Path) -> Command {
    let mut cmd = backflow();
    cmd.args(["run", "humpback", "--corpus"])
        .arg(corpus)
        .arg("--seed")
        .arg(seed)
        .arg("--model")
        .arg(model)
        .arg("--out")
        .arg(out)
        .args(["--limit", "5", "--rounds", "2", "--train-steps", "2"])
        .args(["--train-batch", "2", "--train-max-len", "96"])
        .args(["--augment-tokens", "24", "--rate-tokens", "32", "-q"]);
    cmd
}

fn lines(out: &Path, prefix: &str) -> Vec<(String, serde_json::Value)> {
    let mut all = Vec::new();
    let Ok(entries) = std::fs::read_dir(out) else {
        return all; // not created yet
    };
    let mut names: Vec<_> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix) && n.ends_with(".jsonl"))
        .collect();
    names.sort();
    for name in names {
        for l in std::fs::read_to_string(out.join(&name)).unwrap().lines() {
            all.push((name.clone(), serde_json::from_str(l).unwrap()));
        }
    }
    all
}

/// `rNN` of a file name such as `ratings-r02-e...`.
fn round_of(name: &str) -> u64 {
    name.split('-').nth(1).unwrap()[1..].parse().unwrap()
}

fn metrics(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap()
}

/// (round, passage id) -> (model version, raw answers, score) of every rating.
fn ratings_by_round(out: &Path) -> BTreeMap<(u64, String), (String, Vec<String>, String)> {
    let mut by = BTreeMap::new();
    for (name, r) in lines(out, "ratings-") {
        let key = (
            round_of(&name),
            r["passage_id"].as_str().unwrap().to_owned(),
        );
        let raw = r["samples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["raw"].as_str().unwrap().to_owned())
            .collect();
        let value = (
            r["model_version"].as_str().unwrap().to_owned(),
            raw,
            r["score"].to_string(),
        );
        assert!(
            by.insert(key.clone(), value).is_none(),
            "{key:?} rated twice"
        );
    }
    by
}

fn instructions(out: &Path) -> BTreeMap<String, String> {
    let mut by = BTreeMap::new();
    for (_, c) in lines(out, "candidates-") {
        let id = c["passage_id"].as_str().unwrap().to_owned();
        let text = c["instruction"].as_str().unwrap().to_owned();
        assert!(
            by.insert(id.clone(), text).is_none(),
            "{id} augmented twice"
        );
    }
    by
}

fn curated(out: &Path) -> BTreeSet<(u64, String, String)> {
    lines(out, "curated-")
        .into_iter()
        .map(|(name, c)| {
            (
                round_of(&name),
                c["instruction"].as_str().unwrap().to_owned(),
                c["output"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Every passage taken is augmented (or counted as failed), rated in every round, and each
/// rating says which model made it.
fn check_accounting(out: &Path) {
    let passages = lines(out, "passages-");
    assert_eq!(passages.len(), 5, "--limit 5 passages taken");
    let m = metrics(out);
    check_ingest_accounting(&m["stats"], passages.len() as u64);
    assert_eq!(m["passages"].as_u64(), Some(passages.len() as u64));
    let failed = m["dropped"]["augment_failed"].as_u64().unwrap_or(0) as usize;
    let cands = instructions(out);
    assert_eq!(cands.len() + failed, passages.len(), "augmented or counted");
    let ratings = ratings_by_round(out);
    for round in [1, 2] {
        let ids: BTreeSet<&String> = ratings
            .keys()
            .filter(|(r, _)| *r == round)
            .map(|(_, id)| id)
            .collect();
        assert_eq!(
            ids,
            cands.keys().collect(),
            "round {round} rates every candidate once"
        );
    }
    let version = |round: u64| -> BTreeSet<String> {
        ratings
            .iter()
            .filter(|((r, _), _)| *r == round)
            .map(|(_, v)| v.0.clone())
            .collect()
    };
    let rounds = m["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2);
    let m0 = m["step0"]["forward"]["version"].as_str().unwrap();
    let m1 = rounds[0]["train"]["version"].as_str().unwrap();
    assert_eq!(version(1), BTreeSet::from([m0.to_owned()]), "round 1 by M0");
    assert_eq!(version(2), BTreeSet::from([m1.to_owned()]), "round 2 by M1");
    assert_ne!(m0, m1, "M1 is a new version");
    // Unparsed ratings are counted, kept and reported per round.
    for (i, r) in rounds.iter().enumerate() {
        let unparsed = ratings
            .iter()
            .filter(|((rd, _), v)| *rd == i as u64 + 1 && v.2 == "null")
            .count() as u64;
        assert_eq!(r["unparsed"].as_u64(), Some(unparsed));
        assert_eq!(r["rated"].as_u64(), Some(cands.len() as u64));
    }
    // Every rating of every round is curated or dropped under a curation reason.
    let curate_drops: u64 = [
        "unrated",
        "below_threshold",
        "instruction_length",
        "empty_output",
    ]
    .iter()
    .map(|r| dropped(&m["stats"], r))
    .sum();
    assert_eq!(
        ratings.len() as u64,
        rows(out, "curated-") + curate_drops,
        "ratings = curated + curation drops: {:#}",
        m["stats"]
    );
    // The dataset folder holds each round's curated rows as Parquet (read back by the Parquet
    // reader, counting rows of the instruction column).
    for round in 1..=rounds.len() {
        let want = lines(out, &format!("curated-r{round:02}-")).len();
        let path = out.join(format!("dataset/data/curated-r{round:02}.parquet"));
        if want == 0 && !path.exists() {
            continue;
        }
        let opts = backflow::formats::ReadOptions {
            text_field: "instruction".into(),
            ..Default::default()
        };
        let file = std::fs::File::open(&path).expect("dataset parquet");
        let got = backflow::formats::parquet_file::ParquetReader::new(file, "d", &opts)
            .filter(Result::is_ok)
            .count();
        assert_eq!(got, want, "round {round}: parquet rows = curated lines");
    }
    // A run that curated nothing has no curated file, and no dataset.
    assert_eq!(
        out.join("dataset/README.md").exists(),
        !lines(out, "curated-").is_empty()
            || std::fs::read_dir(out).is_ok_and(|d| d
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("curated-")))
    );
    assert!(out.join("report.html").exists());
    assert!(out
        .join("checkpoints/round-1/adapter_model.safetensors")
        .exists());
}

/// The run's own report, opened in headless Chromium (scripts/fetch-assets.sh chromium): the DOM
/// the browser built has the four plots and names the round-1 model.
fn report_in_a_browser(out: &Path, m: &serde_json::Value) {
    let wrapper = cache_dir().join("chromium/run-chromium");
    if !wrapper.exists() {
        assert!(
            std::env::var_os("BACKFLOW_REQUIRE_ASSETS").is_none(),
            "chromium missing: scripts/fetch-assets.sh chromium"
        );
        eprintln!("skipping the browser check: chromium not cached");
        return;
    }
    let url = format!("file://{}", out.join("report.html").display());
    let dom = Command::new(&wrapper)
        .args(["--dump-dom", &url])
        .stderr(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(dom.status.success(), "chromium failed");
    let dom = String::from_utf8_lossy(&dom.stdout);
    for id in ["scores", "acceptance", "loss", "throughput"] {
        assert!(
            dom.contains(&format!("id=\"{id}\"")),
            "plot {id} missing in the DOM"
        );
    }
    let m1 = m["rounds"][0]["train"]["version"].as_str().unwrap();
    assert!(dom.contains(&m1[..12]), "the report names M1 ({m1})");
}

/// The in-loop evaluation of a run with `--eval-holdout 4 --judge`: M_0 after step 0, the base
/// model and each round's model, with the reference NLL of the 4 held-out pairs, and each model
/// but M_0 judged against M_0 on them in both orders; the files hold what metrics.json counts.
fn check_evaluation(out: &Path, m: &serde_json::Value) {
    let m0 = &m["step0"]["eval"];
    assert_eq!(m0["model"], "M0", "{m0}");
    let r = &m0["reference"];
    assert_eq!(
        r["examples"].as_u64().unwrap() + r["skipped"].as_u64().unwrap(),
        4,
        "{r}"
    );
    assert!(r["nll"].as_f64().unwrap() > 0.0);
    assert!(
        m0["pairs"].as_array().unwrap().is_empty(),
        "M0 is the baseline"
    );
    // The base model, as given, before the seed finetuning: its own likelihoods, not M_0's.
    let base = &m["step0"]["base"]["eval"];
    assert_eq!(base["model"], "base", "{base}");
    assert!(
        base["version"]
            .as_str()
            .unwrap()
            .starts_with("SmolLM2-135M-Instruct"),
        "{base}"
    );
    assert_eq!(
        base["reference"]["tokens"], r["tokens"],
        "the same references"
    );
    let (nll_base, nll_m0) = (
        base["reference"]["nll"].as_f64().unwrap(),
        r["nll"].as_f64().unwrap(),
    );
    assert!(nll_base > 0.0 && nll_base != nll_m0, "{nll_base} {nll_m0}");
    let rounds = m["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2);
    let judged = std::iter::once(("base".to_owned(), base)).chain(
        rounds
            .iter()
            .enumerate()
            .map(|(i, round)| (format!("M{}", i + 1), &round["eval"])),
    );
    for (i, (name, e)) in judged.enumerate() {
        assert_eq!(e["model"], name.as_str(), "{e}");
        if i > 0 {
            assert_eq!(e["version"], rounds[i - 1]["train"]["version"]);
        }
        assert!(e["reference"]["nll"].as_f64().unwrap() > 0.0);
        let pairs = e["pairs"].as_array().unwrap();
        assert_eq!(pairs.len(), 1, "the prob rule by default: {e}");
        let p = &pairs[0];
        assert_eq!(
            (p["rule"].as_str(), p["baseline"].as_str()),
            (Some("prob"), Some("M0"))
        );
        let counted: u64 = ["wins", "losses", "ties", "unparsed"]
            .iter()
            .map(|k| p[*k].as_u64().unwrap())
            .sum();
        assert_eq!(counted, 4);
        let answers =
            std::fs::read_to_string(out.join(format!("eval/answers-{name}.jsonl"))).unwrap();
        assert_eq!(
            answers.lines().count() as u64,
            e["answers"].as_u64().unwrap()
        );
        let judgments =
            std::fs::read_to_string(out.join(format!("eval/judgments-{name}.jsonl"))).unwrap();
        assert_eq!(
            judgments.lines().count(),
            2 * 4,
            "both orders of every prompt"
        );
    }
    let report = std::fs::read_to_string(out.join("report.html")).unwrap();
    for id in ["eval-nll", "eval-win", "eval"] {
        assert!(
            report.contains(&format!("id=\"{id}\"")),
            "report section {id}"
        );
    }
}

#[test]
fn the_loop_runs_end_to_end_and_two_processes_agree_with_one() {
    let Some((model, seed, pages)) = assets() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    corpus(tmp.path(), &pages);
    // The corpus by a relative path from the temporary folder: passage ids hash the input's
    // path, so they, and which process each passage goes to, are the same in every run.
    let corpus = Path::new("corpus");
    let one = tmp.path().join("one");
    // Every forward model evaluated on 4 seed pairs held out of training, judged against M_0 by
    // the same small model (the flags of both runs, so their trainings match).
    let evaluated = |cmd: &mut Command| {
        cmd.args(["--eval-holdout", "4", "--eval-max-tokens", "8", "--judge"])
            .arg(&model);
    };
    let mut cmd = humpback(&model, &seed, corpus, &one);
    cmd.current_dir(tmp.path());
    evaluated(&mut cmd);
    run_ok(&mut cmd);
    check_accounting(&one);
    let m = metrics(&one);
    check_evaluation(&one, &m);
    assert_eq!(
        m["step0"]["backward"]["reused"], false,
        "step 0 trained M_yx"
    );
    report_in_a_browser(&one, &m);
    let myx = m["step0"]["backward"]["version"].as_str().unwrap();
    for (_, c) in lines(&one, "candidates-") {
        assert_eq!(c["source"]["augment_version"].as_str(), Some(myx));
    }

    // Two processes on localhost, each with one worker, the same flags.
    let two = tmp.path().join("two");
    let hostfile = localhost_hostfile(tmp.path(), 2);
    let children: Vec<_> = (0..2)
        .map(|p| {
            let mut cmd = humpback(&model, &seed, corpus, &two);
            cmd.current_dir(tmp.path());
            evaluated(&mut cmd);
            cmd.args(["-w", "1", "-n", "2", "-p", &p.to_string(), "-h"])
                .arg(&hostfile)
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success(), "a process failed");
    }
    check_accounting(&two);
    assert_eq!(instructions(&one), instructions(&two), "same instructions");
    assert_eq!(
        ratings_by_round(&one),
        ratings_by_round(&two),
        "same ratings, by the same versions"
    );
    assert_eq!(curated(&one), curated(&two), "same curated set");
    // Both processes rated their share.
    let by_process: BTreeSet<String> = lines(&two, "ratings-")
        .into_iter()
        .map(|(n, _)| n.split("-p").nth(1).unwrap()[..3].to_owned())
        .collect();
    assert_eq!(by_process.len(), 2, "ratings from both processes");
}

#[test]
fn killed_and_started_again_it_goes_on() {
    let Some((model, seed, pages)) = assets() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path(), &pages);
    let out = tmp.path().join("out");
    // Given models skip step 0 here (the other test trains it).
    let given = |cmd: &mut Command| {
        cmd.arg("--backward-model")
            .arg(&model)
            .arg("--seed-model")
            .arg(&model);
    };
    let mut first = humpback(&model, &seed, &corpus, &out);
    given(&mut first);
    let mut child = first.spawn().unwrap();
    // Kill -9 once the first round's ratings are on disk: mid-job, with answers cached.
    let started = Instant::now();
    loop {
        let rated = out.exists() && !lines(&out, "ratings-r01").is_empty();
        if rated || started.elapsed() > Duration::from_secs(600) {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("finished before it could be killed: {status}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let rated_before = lines(&out, "ratings-r01").len() as u64;
    assert!(!out.join("metrics.json").exists(), "killed before the end");

    let mut again = humpback(&model, &seed, &corpus, &out);
    given(&mut again);
    run_ok(&mut again);
    check_accounting(&out);
    let m = metrics(&out);
    let hits = m["throughput"]["augment"]["cache_hits"].as_u64().unwrap()
        + m["throughput"]["rate"]["cache_hits"].as_u64().unwrap();
    // The round-1 ratings on disk before the kill, and the augmentations before them, were
    // answered from the cache.
    assert!(
        rated_before > 0 && hits >= 2 * rated_before,
        "answers computed before the kill were not reused: {hits} hits, {rated_before} rated"
    );
}

/// A page with one passage of its own (a header and ~900 characters under it).
fn one_passage_page(dir: &Path, name: &str, topic: &str) {
    let body = vec![format!("The {topic} keeps its own notes on this subject"); 20].join(", and ");
    let html = format!("<html><body><h2>About the {topic}</h2><p>{body}.</p></body></html>");
    // Written under a temporary name, then renamed into place, as the convention asks.
    let part = dir.join(format!(".{name}"));
    std::fs::write(&part, html).unwrap();
    std::fs::rename(&part, dir.join(name)).unwrap();
}

#[test]
fn with_follow_a_new_dump_joins_the_round_of_the_newest_model() {
    let Some((model, seed, _)) = assets() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let watch = tmp.path().join("watch");
    std::fs::create_dir_all(&watch).unwrap();
    let out = tmp.path().join("out");
    one_passage_page(&watch, "a.html", "lighthouse keeper");
    let mut cmd = backflow();
    cmd.args(["run", "humpback", "--follow"])
        .arg(&watch)
        .arg("--seed")
        .arg(&seed)
        .arg("--model")
        .arg(&model)
        .arg("--backward-model")
        .arg(&model)
        .arg("--seed-model")
        .arg(&model)
        .arg("--out")
        .arg(&out)
        .args(["--train-steps", "1", "--batch-size", "2", "--max-len", "96"])
        .args(["--augment-tokens", "16", "--rate-tokens", "16", "-q"]);
    // Killed if the test fails before it is interrupted.
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Reap(cmd.spawn().unwrap());
    let wait = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(600);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    // Round 1 ends once the first dump is done and nothing new came: M1 is trained, and the
    // first passage is rated again by it in round 2.
    wait("round 2 ratings", &|| {
        !lines(&out, "ratings-r02").is_empty()
    });
    // A new dump now belongs to round 2: augmented, then rated by M1.
    one_passage_page(&watch, "b.html", "beekeeper");
    wait("the new passage rated", &|| {
        lines(&out, "ratings-r02").len() == 2
    });
    interrupt(&mut child.0);

    let m1 = std::fs::read_to_string(out.join("checkpoints/round-1/backflow.json")).unwrap();
    let m1: serde_json::Value = serde_json::from_str(&m1).unwrap();
    let m1 = m1["version"].as_str().unwrap().to_owned();
    let ratings = ratings_by_round(&out);
    let in_round = |round: u64| -> Vec<&(String, Vec<String>, String)> {
        ratings
            .iter()
            .filter(|((r, _), _)| *r == round)
            .map(|(_, v)| v)
            .collect()
    };
    assert_eq!(in_round(1).len(), 1, "round 1: the first passage");
    assert!(in_round(2).len() == 2 && in_round(2).iter().all(|v| v.0 == m1));
    // The second passage's candidate was made in round 2.
    let cands = lines(&out, "candidates-");
    assert_eq!(cands.len(), 2);
    assert!(cands
        .iter()
        .any(|(n, c)| round_of(n) == 2 && c["output"].as_str().unwrap().contains("beekeeper")));
    assert!(
        out.join("metrics.json").exists(),
        "metrics written on Ctrl-C"
    );

    // Started again, it takes both dumps in the rounds they had: nothing lands twice. (Round 3's
    // ratings, if the first run got that far, are removed so that waiting for them waits for
    // this run.)
    for (name, _) in lines(&out, "ratings-r03") {
        let _ = std::fs::remove_file(out.join(name));
    }
    let mut child = Reap(cmd.spawn().unwrap());
    wait("round 3 ratings after the restart", &|| {
        lines(&out, "ratings-r03").len() == 2
    });
    interrupt(&mut child.0);
    let cands = lines(&out, "candidates-");
    assert_eq!(cands.len(), 2, "no candidate twice after the restart");
    assert!(cands
        .iter()
        .any(|(n, c)| round_of(n) == 2 && c["output"].as_str().unwrap().contains("beekeeper")));
    let ratings = ratings_by_round(&out);
    assert_eq!(ratings.keys().filter(|(r, _)| *r == 1).count(), 1);
    assert_eq!(ratings.keys().filter(|(r, _)| *r == 2).count(), 2);
    let m = metrics(&out);
    assert!(
        m["throughput"]["augment"]["cache_hits"].as_u64().unwrap() >= 2,
        "augmentations answered from the cache"
    );
}

/// Issue 14, case 8: in a two-process loop, killing process 1 mid-round ends process 0 with a
/// clear message and a non-zero exit within a bounded time (no panic in timely), and the same two
/// commands started again finish the job with every passage accounted for.
#[test]
fn a_lost_peer_ends_the_loop_and_the_same_commands_go_on() {
    let Some((model, seed, pages)) = assets() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path(), &pages);
    let out = tmp.path().join("out");
    let hostfile = localhost_hostfile(tmp.path(), 2);
    let start_both = || -> Vec<std::process::Child> {
        (0..2)
            .map(|p| {
                let mut cmd = humpback(&model, &seed, &corpus, &out);
                cmd.arg("--backward-model")
                    .arg(&model)
                    .arg("--seed-model")
                    .arg(&model)
                    .args(["-w", "1", "-n", "2", "-p", &p.to_string(), "-h"])
                    .arg(&hostfile)
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect()
    };
    let mut procs = start_both();
    let started = Instant::now();
    while !out.exists() || lines(&out, "candidates-").is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "no candidate written"
        );
        if let Some(status) = procs[0].try_wait().unwrap() {
            panic!("finished before its peer could be killed: {status}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    procs[1].kill().unwrap();
    procs[1].wait().unwrap();
    // Within 60 s of its peer's death.
    let (status, stderr) = exits_within(&mut procs[0], 60);
    assert!(
        !status.success(),
        "process 0 exited 0 after losing its peer"
    );
    assert!(stderr.contains("lost its connection"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    for mut p in start_both() {
        let status = p.wait().unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(&mut p.stderr.take().unwrap(), &mut err).unwrap();
        assert!(status.success(), "after the restart: {status}\n{err}");
    }
    check_accounting(&out);
}
