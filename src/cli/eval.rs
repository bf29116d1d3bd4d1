//! `backflow eval` and `backflow selector-devset`.

use crate::eval::devset;
use crate::eval::judge::JudgePrompt;
use crate::eval::run::{run as run_eval, Entry, EvalConfig, JudgeRule};
use crate::humpback::prompts::{AUGMENTED_TAG, SEED_TAG};
use crate::model::device::Precision;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;

/// Flags of `backflow eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Prompts: JSON or JSONL rows with `instruction` (optional `input`; optional `output`, a
    /// reference answer), or Self-Instruct seed tasks.
    #[arg(long, value_name = "FILE")]
    pub prompts: PathBuf,
    /// Output folder: answers-NAME.jsonl, judgments.jsonl, selector-NAME.jsonl, eval.json.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// A model to answer the prompts (GGUF, HF folder, adapter folder), as NAME=PATH.
    #[arg(long = "model", value_name = "NAME=PATH")]
    pub models: Vec<String>,
    /// Answers made elsewhere, as NAME=FILE (JSON/JSONL rows with `instruction`, `output`).
    #[arg(long = "answers", value_name = "NAME=FILE")]
    pub answers: Vec<String>,
    /// The entry every other is judged against (default: the first given).
    #[arg(long, value_name = "NAME")]
    pub baseline: Option<String>,
    /// The judge model (e.g. Qwen2.5-1.5B Instruct GGUF); without one, nothing is judged.
    #[arg(long, value_name = "PATH")]
    pub judge: Option<PathBuf>,
    /// How the two orders' judgments make a verdict: prob (verdict-token probabilities), text
    /// (written verdicts that must agree), or both.
    #[arg(long, value_enum, default_value_t = JudgeRule::Both)]
    pub judge_rule: JudgeRule,
    /// The judge prompt: alpaca-eval (AlpacaEval's ranking of outputs `m` and `M`; the prob rule
    /// reads which name is listed first), alpaca-eval-rank (the same prompt; the prob rule reads
    /// the rank given to `m`) or mt-bench (MT-Bench's pairwise `[[A]]`/`[[B]]`/`[[C]]`).
    #[arg(long, value_enum, default_value_t = JudgePrompt::AlpacaEval)]
    pub judge_prompt: JudgePrompt,
    /// Most tokens of a written judgment (text rule).
    #[arg(value_parser = crate::cli::values::at_least_one, long, default_value_t = 256)]
    pub judge_tokens: usize,
    /// A dev set of pairs labelled "good"/"bad" (`backflow selector-devset` makes one): each
    /// model's precision and recall as a selector.
    #[arg(long, value_name = "FILE")]
    pub selector_dev: Option<PathBuf>,
    /// A dev pair is selected when its score is at least this (the paper's A5: 5).
    #[arg(value_parser = crate::cli::values::score_threshold, long, default_value_t = 5.0)]
    pub threshold: f64,
    /// Most tokens of a rating answer (selector).
    #[arg(value_parser = crate::cli::values::at_least_one, long, default_value_t = 96)]
    pub rate_tokens: usize,
    /// Use the first N prompts (and dev pairs).
    #[arg(value_parser = crate::cli::values::at_least_one, long)]
    pub limit: Option<usize>,
    /// Most tokens of each answer.
    #[arg(value_parser = crate::cli::values::at_least_one, long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Sampling temperature of answers (the paper evaluates with 0.7; 0 is greedy).
    #[arg(value_parser = crate::cli::values::temperature, long, default_value_t = 0.7)]
    pub temperature: f32,
    /// Nucleus of answers (the paper: 0.9).
    #[arg(value_parser = crate::cli::values::top_p, long, default_value_t = 0.9)]
    pub top_p: f32,
    /// Seed of answers' sampling (mixed with each prompt's text).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// System prompt for answers and reference NLL. Default: the paper's inference prompt, both
    /// tags (S_a then S_w); "" for the model template's own default.
    #[arg(long)]
    pub system: Option<String>,
    /// Longest example of the reference NLL, in tokens (`backflow train`'s --max-len).
    #[arg(value_parser = crate::cli::values::at_least_one, long, default_value_t = 512)]
    pub max_len: usize,
    /// Weight format of the answering and judging models (native on CPU, f32 on CUDA by
    /// default; see `backflow generate --help`).
    #[arg(long, value_enum, default_value_t = Precision::backend_default())]
    pub dtype: Precision,
    /// Most sequences per model batch.
    #[arg(value_parser = crate::cli::values::at_least_one, long, default_value_t = 32)]
    pub max_batch: usize,
    /// Threads the model computes with (default: every core).
    #[arg(value_parser = crate::cli::values::at_least_one, short = 'w', long = "workers")]
    pub workers: Option<usize>,
}

/// `NAME=VALUE` split, or why not.
fn named(flag: &str, s: &str) -> Result<(String, PathBuf)> {
    match s.split_once('=') {
        Some((n, v)) if !n.is_empty() && !v.is_empty() => Ok((n.to_owned(), PathBuf::from(v))),
        _ => bail!("{flag} {s:?}: expected NAME=PATH"),
    }
}

/// The default system prompt of evaluation: the paper's best inference prompt, both tags.
pub fn paper_system_prompt() -> String {
    format!("{SEED_TAG} {AUGMENTED_TAG}")
}

/// Runs `backflow eval`. `matches` (when parsed from a command line) orders the `--model` and
/// `--answers` entries as given, so that the default baseline is the first one given.
pub fn run(args: EvalArgs, matches: Option<&clap::ArgMatches>) -> Result<()> {
    if !(args.temperature.is_finite() && args.temperature >= 0.0) {
        bail!(
            "--temperature {}: must be a finite number >= 0",
            args.temperature
        );
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("--top-p {}: must be in (0, 1]", args.top_p);
    }
    if !args.threshold.is_finite() {
        bail!("--threshold {}: must be a finite number", args.threshold);
    }
    if args.max_tokens == 0 || args.judge_tokens == 0 || args.max_len == 0 {
        bail!("--max-tokens, --judge-tokens and --max-len must be at least 1");
    }
    if let Some(w) = args.workers {
        let max = crate::cluster::max_workers();
        if w == 0 || w > max {
            bail!("--workers {w}: between 1 and {max} threads on this machine");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(w)
            .build_global()
            .context("setting the model's thread count")?;
    }
    let positions = |id: &str, n: usize| -> Vec<usize> {
        matches
            .and_then(|m| m.indices_of(id))
            .map(|i| i.collect())
            .unwrap_or_else(|| (0..n).collect())
    };
    let mut entries: Vec<(usize, Entry)> = Vec::new();
    for (m, at) in args
        .models
        .iter()
        .zip(positions("models", args.models.len()))
    {
        let (name, path) = named("--model", m)?;
        entries.push((at, Entry::Model { name, path }));
    }
    let after = args.models.len();
    for (a, at) in args.answers.iter().zip(
        positions("answers", args.answers.len())
            .into_iter()
            .map(|i| {
                // Without matches, answers come after the models.
                if matches.is_some() {
                    i
                } else {
                    after + i
                }
            }),
    ) {
        let (name, file) = named("--answers", a)?;
        entries.push((at, Entry::Answers { name, file }));
    }
    entries.sort_by_key(|(at, _)| *at);
    let entries: Vec<Entry> = entries.into_iter().map(|(_, e)| e).collect();
    let system = match args.system {
        None => Some(paper_system_prompt()),
        Some(s) if s.is_empty() => None,
        Some(s) => Some(s),
    };
    let cfg = EvalConfig {
        prompts: args.prompts,
        out: args.out,
        entries,
        baseline: args.baseline,
        judge: args.judge,
        judge_rule: args.judge_rule,
        judge_prompt: args.judge_prompt,
        judge_tokens: args.judge_tokens,
        selector_dev: args.selector_dev,
        threshold: args.threshold,
        rate_tokens: args.rate_tokens,
        limit: args.limit,
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        system,
        max_len: args.max_len,
        precision: args.dtype,
        max_batch: args.max_batch.max(1),
    };
    let report = run_eval(&cfg)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// Flags of `backflow selector-devset`.
#[derive(Args, Debug)]
pub struct DevsetArgs {
    /// Human-written pairs (seed tasks, Alpaca JSON/JSONL, conversations): the good examples.
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// JSONL files of web passages (`backflow segment` output; field `text`) for the `web`
    /// bad pairs: several after one flag (`--passages seg/segment-*.jsonl`), or the flag again.
    #[arg(long, value_name = "FILE", num_args = 1..)]
    pub passages: Vec<PathBuf>,
    /// Where to write the dev set (JSONL).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Use the first N pairs (the same N as a held-out split, e.g. the seed's last ones:
    /// `--skip`).
    #[arg(value_parser = crate::cli::values::at_least_one, long)]
    pub limit: Option<usize>,
    /// Skip the first N pairs (to build the set from pairs a model was not trained on).
    #[arg(long, default_value_t = 0)]
    pub skip: usize,
    /// Seed of the shuffles.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Runs `backflow selector-devset`.
pub fn devset(args: DevsetArgs) -> Result<()> {
    let mut stats = crate::train::data::DataStats::default();
    let records = crate::train::data::read_records(&args.data, &mut stats)?;
    let mut pairs = devset::pairs_of(&records);
    pairs.drain(..args.skip.min(pairs.len()));
    pairs.truncate(args.limit.unwrap_or(usize::MAX));
    let mut passages = Vec::new();
    let mut bad_lines = 0usize;
    for f in &args.passages {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("text")?.as_str().map(str::to_owned))
            {
                Some(t) => passages.push(t),
                None => bad_lines += 1,
            }
        }
    }
    let set = devset::build(&pairs, &passages, args.seed);
    crate::output::atomic_write_jsonl(&args.out, &set)?;
    let count = |k: &str| set.iter().filter(|p| p.kind == k).count();
    eprintln!(
        "{} pairs -> {}: {} good, {} mismatched, {} truncated, {} web ({} passages read, {} lines without text; {} records malformed)",
        set.len(),
        args.out.display(),
        count("seed"),
        count("mismatched"),
        count("truncated"),
        count("web"),
        passages.len(),
        bad_lines,
        stats.malformed
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Devset {
        #[command(flatten)]
        args: DevsetArgs,
    }

    /// A shell glob after one `--passages` gives every file, as does the flag repeated, and the
    /// flags after the list still parse as flags.
    #[test]
    fn passages_take_a_list_or_repeated_flags() {
        let d = Devset::try_parse_from([
            "x",
            "--data",
            "s.jsonl",
            "--passages",
            "a.jsonl",
            "b.jsonl",
            "c.jsonl",
            "--out",
            "dev.jsonl",
            "--passages",
            "d.jsonl",
        ])
        .expect("parse");
        let names: Vec<_> = d.args.passages.iter().map(|p| p.to_str()).collect();
        assert_eq!(
            names,
            [
                Some("a.jsonl"),
                Some("b.jsonl"),
                Some("c.jsonl"),
                Some("d.jsonl")
            ]
        );
        assert_eq!(d.args.out, PathBuf::from("dev.jsonl"));
        // A flag with no file is an error, not an empty list.
        assert!(Devset::try_parse_from(["x", "--data", "s", "--out", "o", "--passages"]).is_err());
    }
}
