//! The `backflow eval` job: answers of every model (generated through the model server, cached,
//! or read from files), pairwise judgments against a baseline in both orders, reference NLL and
//! selector quality, written as `answers-NAME.jsonl`, `judgments.jsonl`, `selector-NAME.jsonl`
//! and `eval.json`.
//!
//! Why one file of this size: the job's four stages share its config, answer cache and output
//! files; each stage is a function of its own (`answers_of`, judging, `reference_nll`, the
//! selector). To split when evaluation grows a stage.

use super::data::{
    answers_by_instruction, read_answers, read_dev_set, read_prompts, AnswerRow, DevPair,
    EvalPrompt, Label,
};
use super::judge::{
    combine_prob, combine_text, outcome_of, JudgePrompt, Order, Outcome, Verdict, VerdictError,
};
use super::nll::{reference_nll, ReferenceNll};
use super::stats::{Confusion, Tally};
use crate::model::chat::Message;
use crate::model::device::Precision;
use crate::model::sampling::Sampling;
use crate::operators::rate::{rate_samples_of, rating_asks, RateOptions};
use crate::output::atomic_write_jsonl;
use crate::records::Candidate;
use crate::serve::Ask;
use crate::serve::{Choice, GenAnswer, GenRequest, ModelClient, ModelServer, ServerConfig};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Which rule(s) turn the judge's two answers into a verdict (see [`super::judge`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum JudgeRule {
    /// Verdict tokens' probabilities, averaged over both orders (one forward pass per order).
    Prob,
    /// The judge's written verdict, a win only when both orders agree (generation).
    Text,
    /// Both, each reported.
    Both,
}

/// An entry to evaluate: a model to generate answers with, or answers made elsewhere.
#[derive(Clone, Debug, PartialEq)]
pub enum Entry {
    /// `--model NAME=PATH`.
    Model {
        /// Its name in the outputs.
        name: String,
        /// GGUF file, HF folder or adapter folder.
        path: PathBuf,
    },
    /// `--answers NAME=FILE`.
    Answers {
        /// Its name in the outputs.
        name: String,
        /// JSON/JSONL rows with `instruction` and `output`.
        file: PathBuf,
    },
}

impl Entry {
    /// Its name.
    pub fn name(&self) -> &str {
        match self {
            Entry::Model { name, .. } | Entry::Answers { name, .. } => name,
        }
    }
}

/// Everything `backflow eval` needs.
#[derive(Clone, Debug)]
pub struct EvalConfig {
    /// The prompts file.
    pub prompts: PathBuf,
    /// The output folder.
    pub out: PathBuf,
    /// Models and answer files, in the order given.
    pub entries: Vec<Entry>,
    /// The entry every other is judged against (default: the first).
    pub baseline: Option<String>,
    /// The judge model; no judging without one.
    pub judge: Option<PathBuf>,
    /// Which judge rules to run.
    pub judge_rule: JudgeRule,
    /// Which judge prompt asks for the verdicts.
    pub judge_prompt: JudgePrompt,
    /// Most tokens of a written judgment (text rule).
    pub judge_tokens: usize,
    /// A labelled dev set for selector precision/recall.
    pub selector_dev: Option<PathBuf>,
    /// A pair is selected when its score is at least this.
    pub threshold: f64,
    /// Most tokens of a rating answer (selector).
    pub rate_tokens: usize,
    /// Use the first N prompts (and dev pairs).
    pub limit: Option<usize>,
    /// Most tokens of a model's answer.
    pub max_tokens: usize,
    /// Sampling temperature of answers (0: greedy).
    pub temperature: f32,
    /// Nucleus of answers.
    pub top_p: f32,
    /// Seed of answers' sampling (mixed with each prompt).
    pub seed: u64,
    /// The system prompt answers are asked and references scored under (`None`: the chat
    /// template's default).
    pub system: Option<String>,
    /// Longest example of the reference NLL, in tokens.
    pub max_len: usize,
    /// Float type of generation (answers, judge, ratings).
    pub precision: Precision,
    /// Most sequences per model batch.
    pub max_batch: usize,
}

/// One line of `judgments.jsonl`: one judge answer about one pair in one order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Judgment {
    /// Index of the prompt in the prompts file (after `--limit`).
    pub prompt: usize,
    /// The instruction judged.
    pub instruction: String,
    /// The entry judged.
    pub model: String,
    /// What it is judged against.
    pub baseline: String,
    /// Which answer was shown first.
    pub order: Order,
    /// `text` or `prob`.
    pub rule: String,
    /// The judge's whole answer (text rule).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw: Option<String>,
    /// The verdict about positions, when it could be read.
    pub verdict: Option<Verdict>,
    /// Why it could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<VerdictError>,
    /// The probabilities of `A`, `B`, `C` after `[[` (prob rule).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probs: Option<Vec<f32>>,
    /// The outcome for the model in this order alone.
    pub outcome: Option<Outcome>,
}

/// One line of `eval.json`'s `pairs`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PairResult {
    /// The entry judged.
    pub model: String,
    /// What it was judged against.
    pub baseline: String,
    /// The rule (`prob` or `text`).
    pub rule: String,
    /// Wins of the model.
    pub wins: u64,
    /// Losses.
    pub losses: u64,
    /// Ties.
    pub ties: u64,
    /// Pairs without a readable verdict (in `judgments.jsonl`, out of the rate).
    pub unparsed: u64,
    /// (wins + ties / 2) / (wins + losses + ties).
    pub win_rate: Option<f64>,
    /// Wilson 95% interval of `win_rate`.
    pub ci95: Option<(f64, f64)>,
    /// Prob rule: the mean over pairs of the model's probability of being better.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_p: Option<f64>,
    /// Prompts left out because one of the two had no answer.
    pub missing: u64,
    /// The judge prompt (`mt-bench`, `alpaca-eval`; absent in files of older versions).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub judge_prompt: Option<String>,
}

/// A selector's figures.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SelectorResult {
    /// tp / (tp + fp).
    pub precision: Option<f64>,
    /// tp / (tp + fn).
    pub recall: Option<f64>,
    /// Their harmonic mean.
    pub f1: Option<f64>,
    /// The confusion counts.
    pub confusion: Confusion,
    /// The threshold.
    pub threshold: f64,
    /// Pairs with no score at all (counted as not selected).
    pub unrated: u64,
    /// Ratings whose answer had no readable `Score: N` (the forced choice scored them).
    pub unparsed: u64,
    /// The same, selecting by the graded score (G-Eval's expected value).
    pub graded: Confusion,
}

/// One model's figures in `eval.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
pub struct ModelResult {
    /// Prompts answered.
    pub answers: usize,
    /// Mean answer length in characters.
    pub mean_length: Option<f64>,
    /// Mean NLL per token of the reference answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference_nll: Option<f64>,
    /// Its token and example counts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<ReferenceNll>,
    /// Selector quality on the dev set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<SelectorResult>,
}

/// `eval.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Every judged entry against the baseline, per rule.
    pub pairs: Vec<PairResult>,
    /// Per entry.
    pub models: BTreeMap<String, ModelResult>,
    /// The baseline's name.
    pub baseline: String,
    /// The judge model, if any.
    pub judge: Option<String>,
    /// Prompts used.
    pub prompts: usize,
    /// Prompt rows not usable.
    pub prompts_malformed: usize,
    /// How answers were sampled (`seed` is the configured one; each prompt mixes its text in).
    pub sampling: Sampling,
    /// The model server's counters over the whole evaluation: a run repeated over the same
    /// folder answers everything from the cache (`cache_hits == requests`).
    pub server: crate::serve::VersionStats,
    /// Seconds the evaluation took.
    pub seconds: f64,
}

/// A model's version for the server and the answer cache: its name and a hash of its files
/// (an adapter's base included), so a changed checkpoint is never answered from the cache.
pub fn model_version(name: &str, path: &Path) -> Result<String> {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    hash_files(path, &mut h)?;
    if crate::train::checkpoint::is_adapter(path) {
        let adapter = crate::train::checkpoint::Adapter::read(path)?;
        hash_files(&adapter.base, &mut h)?;
    }
    Ok(format!("{name}@{:016x}", h.digest()))
}

fn hash_files(path: &Path, h: &mut xxhash_rust::xxh3::Xxh3) -> Result<()> {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("reading {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for e in entries {
            h.update(e.file_name().map(|n| n.as_encoded_bytes()).unwrap_or(b""));
            hash_files(&e, h)?;
        }
        return Ok(());
    }
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // Safety of the mapping: read-only, and a file changed underneath only changes the hash.
    let map = unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("mapping {}", path.display()))?;
    h.update(&map);
    Ok(())
}

/// Sends every request at once (the server batches them) and collects the answers in order,
/// logging progress every 15 s.
pub fn ask_all(client: &ModelClient, asks: Vec<Ask>, what: &str) -> Result<Vec<GenAnswer>> {
    let n = asks.len();
    let (reply, answers) = crossbeam_channel::unbounded();
    for (ticket, a) in asks.into_iter().enumerate() {
        client.send(GenRequest {
            ticket: ticket as u64,
            ask: a,
            reply: reply.clone(),
            wake: None,
            stream: None,
        })?;
    }
    drop(reply);
    let mut out: Vec<Option<GenAnswer>> = vec![None; n];
    let (started, mut shown) = (Instant::now(), Instant::now());
    for got in 0..n {
        let a = answers
            .recv()
            .context("the model server stopped before answering")?;
        let at = a.ticket as usize;
        if let Some(slot) = out.get_mut(at) {
            *slot = Some(a);
        }
        if shown.elapsed() > Duration::from_secs(15) {
            shown = Instant::now();
            log::info!(
                "{what}: {}/{n} ({:.0} s)",
                got + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    out.into_iter()
        .enumerate()
        .map(|(i, a)| a.with_context(|| format!("{what}: no answer to request {i}")))
        .collect()
}

/// The sampling of the answer to prompt `i`: the configured one, seeded by the prompt's text.
fn answer_sampling(cfg: &EvalConfig, p: &EvalPrompt) -> Sampling {
    let s = configured_sampling(cfg);
    if s.temperature <= 0.0 {
        return s;
    }
    Sampling {
        seed: s.seed ^ xxhash_rust::xxh3::xxh3_64(p.user_text().as_bytes()),
        ..s
    }
}

/// The sampling of answers as configured (greedy at temperature 0), before a prompt's seed.
fn configured_sampling(cfg: &EvalConfig) -> Sampling {
    if cfg.temperature <= 0.0 {
        return Sampling::greedy();
    }
    Sampling {
        temperature: cfg.temperature,
        top_p: cfg.top_p,
        seed: cfg.seed,
    }
}

fn answer_messages(cfg: &EvalConfig, p: &EvalPrompt) -> Vec<Message> {
    let mut m: Vec<Message> = cfg
        .system
        .as_deref()
        .map(Message::system)
        .into_iter()
        .collect();
    m.push(Message::user(p.user_text()));
    m
}

/// Runs the evaluation; returns the report (also written to `out/eval.json`).
pub fn run(cfg: &EvalConfig) -> Result<EvalReport> {
    let started = Instant::now();
    if cfg.entries.is_empty() {
        bail!("nothing to evaluate: give at least one --model NAME=PATH or --answers NAME=FILE");
    }
    let mut names: Vec<&str> = cfg.entries.iter().map(Entry::name).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        bail!("two entries are named {:?}", w[0]);
    }
    for n in &names {
        if n.is_empty() || n.contains(['/', '\\', '\0']) {
            bail!("entry name {n:?} cannot name a file");
        }
    }
    let baseline = cfg
        .baseline
        .clone()
        .unwrap_or_else(|| cfg.entries[0].name().to_owned());
    if !names.contains(&baseline.as_str()) {
        bail!("--baseline {baseline:?} is none of the entries ({names:?})");
    }
    std::fs::create_dir_all(&cfg.out).with_context(|| format!("creating {}", cfg.out.display()))?;
    let read = read_prompts(&cfg.prompts)?;
    let mut prompts = read.rows;
    prompts.truncate(cfg.limit.unwrap_or(usize::MAX));
    log::info!(
        "{} prompts from {} ({} rows not usable)",
        prompts.len(),
        cfg.prompts.display(),
        read.malformed
    );
    let dev = match &cfg.selector_dev {
        Some(path) => {
            let d = read_dev_set(path)?;
            log::info!(
                "{} selector dev pairs from {} ({} rows not usable)",
                d.rows.len(),
                path.display(),
                d.malformed
            );
            let mut rows = d.rows;
            rows.truncate(cfg.limit.unwrap_or(usize::MAX));
            Some(rows)
        }
        None => None,
    };

    // Every answer (models', judge's, ratings) is kept: run again, nothing is generated twice.
    let server = ModelServer::try_start(ServerConfig {
        max_batch: cfg.max_batch,
        precision: cfg.precision,
        cache: Some(cfg.out.join("_cache").join("answers.bin")),
        ..ServerConfig::default()
    })?;
    let client = server.client()?;
    let sampling = configured_sampling(cfg);

    // Answers and per-model figures.
    let mut models: BTreeMap<String, ModelResult> = BTreeMap::new();
    let mut answers: BTreeMap<String, Vec<Option<String>>> = BTreeMap::new();
    for entry in &cfg.entries {
        let name = entry.name().to_owned();
        let mut result = ModelResult::default();
        let got: Vec<Option<String>> = match entry {
            Entry::Answers { file, .. } => {
                let rows = read_answers(file)?;
                let (by_text, dups) = answers_by_instruction(&rows.rows);
                let matched: Vec<Option<String>> = prompts
                    .iter()
                    .map(|p| by_text.get(p.user_text().trim()).cloned())
                    .collect();
                log::info!(
                    "{name}: {} of {} prompts answered in {} ({} rows not usable, {} duplicates)",
                    matched.iter().filter(|a| a.is_some()).count(),
                    prompts.len(),
                    file.display(),
                    rows.malformed,
                    dups
                );
                matched
            }
            Entry::Model { path, .. } => {
                let t = Instant::now();
                result.reference =
                    reference_nll(path, &prompts, cfg.system.as_deref(), cfg.max_len, 8)?;
                result.reference_nll = result.reference.map(|r| r.nll);
                if let Some(r) = &result.reference {
                    log::info!(
                        "{name}: reference NLL {:.4} over {} tokens of {} answers ({:.1} s)",
                        r.nll,
                        r.tokens,
                        r.examples,
                        t.elapsed().as_secs_f64()
                    );
                }
                let version = model_version(&name, path)?;
                server
                    .load(&version, path)
                    .with_context(|| format!("loading {name} from {}", path.display()))?;
                let texts = generate_answers(&client, cfg, &version, &name, &prompts)?;
                write_answers(
                    &cfg.out.join(format!("answers-{name}.jsonl")),
                    &name,
                    &prompts,
                    &texts,
                )?;
                if let Some(dev) = &dev {
                    result.selector = Some(selector(&client, &version, &name, dev, cfg)?);
                }
                texts
            }
        };
        let lengths: Vec<usize> = got.iter().flatten().map(|a| a.chars().count()).collect();
        result.answers = lengths.len();
        result.mean_length = (!lengths.is_empty())
            .then(|| lengths.iter().sum::<usize>() as f64 / lengths.len() as f64);
        models.insert(name.clone(), result);
        answers.insert(name, got);
    }

    // Judgments.
    let mut pairs = Vec::new();
    let mut judgments: Vec<Judgment> = Vec::new();
    if let Some(judge) = &cfg.judge {
        let version = model_version("judge", judge)?;
        server
            .load(&version, judge)
            .with_context(|| format!("loading the judge {}", judge.display()))?;
        let base_answers = &answers[&baseline];
        for entry in &cfg.entries {
            let name = entry.name();
            if name == baseline {
                continue;
            }
            let (p, j) = judge_entry(
                &client,
                &version,
                cfg,
                &prompts,
                (name, &answers[name]),
                (&baseline, base_answers),
            )?;
            pairs.extend(p);
            judgments.extend(j);
        }
        atomic_write_jsonl(&cfg.out.join("judgments.jsonl"), &judgments)?;
    }

    let mut totals = crate::serve::VersionStats::default();
    for (_, v) in server.stats().snapshot() {
        totals.add(&v);
    }
    let report = EvalReport {
        server: totals,
        pairs,
        models,
        baseline,
        judge: cfg.judge.as_ref().map(|j| j.display().to_string()),
        prompts: prompts.len(),
        prompts_malformed: read.malformed,
        sampling,
        seconds: started.elapsed().as_secs_f64(),
    };
    crate::output::atomic_write(&cfg.out.join("eval.json"), |out| {
        serde_json::to_writer_pretty(&mut *out, &report)?;
        Ok(())
    })?;
    Ok(report)
}

/// How many answers there are and their mean length in characters.
pub fn answer_lengths(answers: &[Option<String>]) -> (usize, Option<f64>) {
    let lengths: Vec<usize> = answers
        .iter()
        .flatten()
        .map(|a| a.chars().count())
        .collect();
    let mean =
        (!lengths.is_empty()).then(|| lengths.iter().sum::<usize>() as f64 / lengths.len() as f64);
    (lengths.len(), mean)
}

/// The answers of model `version` to every prompt (`None` where the model failed, logged),
/// through the server: batched, sampled as configured, cached.
pub fn generate_answers(
    client: &ModelClient,
    cfg: &EvalConfig,
    version: &str,
    name: &str,
    prompts: &[EvalPrompt],
) -> Result<Vec<Option<String>>> {
    let asks: Vec<Ask> = prompts
        .iter()
        .map(|p| Ask {
            model: version.to_owned(),
            messages: answer_messages(cfg, p),
            max_new_tokens: cfg.max_tokens,
            sampling: answer_sampling(cfg, p),
            choose: None,
            raw_prompt: None,
            choose_after: None,
        })
        .collect();
    let got = ask_all(client, asks, &format!("{name} answers"))?;
    let mut failed = 0;
    let texts: Vec<Option<String>> = got
        .into_iter()
        .map(|a| match a.result {
            Ok(t) => Some(t.trim().to_owned()),
            Err(e) => {
                failed += 1;
                log::warn!("{name}: no answer: {e}");
                None
            }
        })
        .collect();
    if failed > 0 {
        log::warn!("{name}: {failed} prompts got no answer (left out)");
    }
    Ok(texts)
}

/// Writes a model's answers as `AnswerRow`s (prompts it failed on left out).
pub fn write_answers(
    path: &Path,
    name: &str,
    prompts: &[EvalPrompt],
    texts: &[Option<String>],
) -> Result<()> {
    let rows: Vec<AnswerRow> = prompts
        .iter()
        .zip(texts)
        .filter_map(|(p, t)| {
            Some(AnswerRow {
                instruction: p.user_text(),
                output: t.clone()?,
                generator: name.to_owned(),
            })
        })
        .collect();
    atomic_write_jsonl(path, &rows)
}

/// Judges `model`'s answers against `baseline`'s, prompt by prompt, in both orders.
pub fn judge_entry(
    client: &ModelClient,
    judge: &str,
    cfg: &EvalConfig,
    prompts: &[EvalPrompt],
    (model, mine): (&str, &[Option<String>]),
    (baseline, theirs): (&str, &[Option<String>]),
) -> Result<(Vec<PairResult>, Vec<Judgment>)> {
    // Prompts with both answers: (prompt index, model-first messages, baseline-first messages).
    let mut missing = 0u64;
    let mut shown = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        match (&mine[i], &theirs[i]) {
            (Some(a), Some(b)) => shown.push((
                i,
                cfg.judge_prompt.messages(&p.user_text(), a, b),
                cfg.judge_prompt.messages(&p.user_text(), b, a),
            )),
            _ => missing += 1,
        }
    }
    let orders = [Order::ModelFirst, Order::BaselineFirst];
    let conversation = |s: &(usize, Vec<Message>, Vec<Message>), o: Order| match o {
        Order::ModelFirst => s.1.clone(),
        Order::BaselineFirst => s.2.clone(),
    };
    let mut results = Vec::new();
    let mut lines = Vec::new();
    let judgment = |i: usize, order: Order, rule: &str| Judgment {
        prompt: i,
        instruction: prompts[i].user_text(),
        model: model.to_owned(),
        baseline: baseline.to_owned(),
        order,
        rule: rule.to_owned(),
        raw: None,
        verdict: None,
        error: None,
        probs: None,
        outcome: None,
    };
    // Both orders of every shown pair, as judge requests (greedy).
    let asks = |max_new_tokens: usize, choose: Option<Choice>| -> Vec<Ask> {
        shown
            .iter()
            .flat_map(|s| orders.map(|o| conversation(s, o)))
            .map(|messages| Ask {
                model: judge.to_owned(),
                messages,
                max_new_tokens,
                sampling: Sampling::greedy(),
                choose: choose.clone(),
                raw_prompt: None,
                choose_after: None,
            })
            .collect()
    };
    if matches!(cfg.judge_rule, JudgeRule::Prob | JudgeRule::Both) {
        let asks = asks(
            1,
            Some(Choice {
                prefill: cfg.judge_prompt.prefill().to_owned(),
                options: cfg
                    .judge_prompt
                    .options()
                    .iter()
                    .map(|o| (*o).to_owned())
                    .collect(),
            }),
        );
        let got = ask_all(client, asks, &format!("judge {model} vs {baseline} (prob)"))?;
        let mut tally = Tally::default();
        let mut p_sum = 0.0;
        for (s, pair) in shown.iter().zip(got.chunks(2)) {
            let mut probs: Vec<Option<Vec<f32>>> = Vec::new();
            for (order, a) in orders.iter().zip(pair) {
                let mut j = judgment(s.0, *order, "prob");
                match (&a.result, &a.choice_probs) {
                    (Ok(_), Some(p)) => {
                        j.probs = Some(p.clone());
                        j.verdict = a
                            .choice
                            .as_deref()
                            .and_then(|o| cfg.judge_prompt.verdict_of_option(o));
                        j.outcome = j.verdict.map(|v| outcome_of(*order, v));
                        probs.push(Some(p.clone()));
                    }
                    (Err(e), _) => {
                        j.error = Some(VerdictError::Model(e.to_string()));
                        probs.push(None);
                    }
                    (Ok(_), None) => {
                        j.error = Some(VerdictError::Missing);
                        probs.push(None);
                    }
                }
                lines.push(j);
            }
            match (&probs[..], probs.len()) {
                ([Some(a), Some(b)], 2) => match combine_prob(a, b) {
                    Some((p, o)) => {
                        p_sum += p;
                        count(&mut tally, o);
                    }
                    None => tally.unparsed += 1,
                },
                _ => tally.unparsed += 1,
            }
        }
        let decided = tally.decided();
        results.push(
            pair_result(model, baseline, "prob", tally, missing)
                .with_mean_p((decided > 0).then(|| p_sum / decided as f64))
                .asked_with(cfg.judge_prompt),
        );
    }
    if matches!(cfg.judge_rule, JudgeRule::Text | JudgeRule::Both) {
        let asks = asks(cfg.judge_tokens, None);
        let got = ask_all(client, asks, &format!("judge {model} vs {baseline} (text)"))?;
        let mut tally = Tally::default();
        for (s, pair) in shown.iter().zip(got.chunks(2)) {
            let mut verdicts = Vec::new();
            for (order, a) in orders.iter().zip(pair) {
                let mut j = judgment(s.0, *order, "text");
                match &a.result {
                    Ok(raw) => {
                        match cfg.judge_prompt.parse(raw) {
                            Ok(v) => {
                                j.verdict = Some(v);
                                j.outcome = Some(outcome_of(*order, v));
                                verdicts.push(Some(v));
                            }
                            Err(e) => {
                                j.error = Some(e);
                                verdicts.push(None);
                            }
                        }
                        j.raw = Some(raw.clone());
                    }
                    Err(e) => {
                        j.error = Some(VerdictError::Model(e.to_string()));
                        verdicts.push(None);
                    }
                }
                lines.push(j);
            }
            match verdicts[..] {
                [Some(a), Some(b)] => count(&mut tally, combine_text(a, b)),
                _ => tally.unparsed += 1,
            }
        }
        results.push(
            pair_result(model, baseline, "text", tally, missing).asked_with(cfg.judge_prompt),
        );
    }
    for r in &results {
        log::info!(
            "{} vs {} ({}): {} wins, {} losses, {} ties, {} unparsed; win rate {} {}",
            r.model,
            r.baseline,
            r.rule,
            r.wins,
            r.losses,
            r.ties,
            r.unparsed,
            r.win_rate
                .map(|w| format!("{:.1}%", 100.0 * w))
                .unwrap_or_else(|| "-".into()),
            r.ci95
                .map(|(lo, hi)| format!("[{:.1}, {:.1}]", 100.0 * lo, 100.0 * hi))
                .unwrap_or_default()
        );
    }
    Ok((results, lines))
}

fn count(t: &mut Tally, o: Outcome) {
    match o {
        Outcome::Win => t.wins += 1,
        Outcome::Loss => t.losses += 1,
        Outcome::Tie => t.ties += 1,
    }
}

fn pair_result(model: &str, baseline: &str, rule: &str, t: Tally, missing: u64) -> PairResult {
    PairResult {
        model: model.to_owned(),
        baseline: baseline.to_owned(),
        rule: rule.to_owned(),
        wins: t.wins,
        losses: t.losses,
        ties: t.ties,
        unparsed: t.unparsed,
        win_rate: t.win_rate(),
        ci95: t.ci95(),
        mean_p: None,
        missing,
        judge_prompt: None,
    }
}

impl PairResult {
    fn with_mean_p(mut self, p: Option<f64>) -> Self {
        self.mean_p = p;
        self
    }

    fn asked_with(mut self, prompt: JudgePrompt) -> Self {
        self.judge_prompt = Some(prompt.name().to_owned());
        self
    }
}

/// The model as a selector: it rates every dev pair with the paper's prompt (the `rate`
/// operator's requests and parsing, forced score included); a pair is selected when its score
/// reaches the threshold. Ratings go to `selector-NAME.jsonl`.
pub fn selector(
    client: &ModelClient,
    version: &str,
    name: &str,
    dev: &[DevPair],
    cfg: &EvalConfig,
) -> Result<SelectorResult> {
    let options = RateOptions {
        max_new_tokens: cfg.rate_tokens,
        ..RateOptions::default()
    };
    let file = cfg
        .selector_dev
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let written = cfg.out.join(format!("selector-{name}.jsonl"));
    let candidates: Vec<Candidate> = dev
        .iter()
        .enumerate()
        .map(|(i, d)| {
            Candidate::given(
                &file,
                i as u64,
                &super::data::join_input(&d.instruction, &d.input),
                &d.output,
            )
        })
        .collect();
    let mut asks = Vec::new();
    for c in &candidates {
        let a = rating_asks(
            &c.instruction,
            &c.passage.text,
            version,
            c.passage.id,
            &options,
        );
        asks.extend(a);
    }
    let per = options.samples.max(1);
    let got = ask_all(client, asks, &format!("{name} selector ratings"))?;
    let mut confusion = Confusion::default();
    let mut graded = Confusion::default();
    let (mut unrated, mut unparsed) = (0, 0);
    let mut rated = Vec::new();
    for ((c, d), answers) in candidates.into_iter().zip(dev).zip(got.chunks(per)) {
        let rating = rate_samples_of(c, version.to_owned(), answers.to_vec());
        unparsed += rating.samples.iter().filter(|s| s.score.is_err()).count() as u64;
        let good = d.label == Label::Good;
        if rating.score.is_none() {
            unrated += 1;
        }
        confusion.add(good, rating.score.is_some_and(|s| s >= cfg.threshold));
        graded.add(good, rating.graded.is_some_and(|s| s >= cfg.threshold));
        rated.push((rating, d));
    }
    /// A dev-set rating as written: the rating's line with the pair's label and kind.
    #[derive(serde::Serialize)]
    struct DevRatingLine<'a, L: serde::Serialize, K: serde::Serialize> {
        #[serde(flatten)]
        rating: crate::output::RatingLine<'a>,
        label: &'a L,
        kind: &'a K,
    }
    let lines = rated.iter().map(|(rating, d)| DevRatingLine {
        rating: crate::output::RatingLine::from(rating),
        label: &d.label,
        kind: &d.kind,
    });
    atomic_write_jsonl(&written, lines)?;
    let r = SelectorResult {
        precision: confusion.precision(),
        recall: confusion.recall(),
        f1: confusion.f1(),
        confusion,
        threshold: cfg.threshold,
        unrated,
        unparsed,
        graded,
    };
    log::info!(
        "{name} as a selector (score >= {}): precision {:?}, recall {:?} ({} of {} ratings without a readable score)",
        cfg.threshold,
        r.precision,
        r.recall,
        unparsed,
        dev.len() * per
    );
    Ok(r)
}
