//! Evaluation inside `backflow run humpback`: each forward model, as it is trained (M_0 after
//! step 0, then M_1, M_2, ...), and the base model it started from get the figures of `backflow
//! eval`: the reference NLL of the held-out prompts, and with a judge its pairwise win rate
//! against M_0, and with a dev set its precision and recall as a selector. Files go to
//! `OUT/eval/` (`answers-M1.jsonl`, `judgments-M1.jsonl`, `selector-M1.jsonl`, `...-base.jsonl`);
//! the figures into `metrics.json` and the report.

use super::data::{DevPair, EvalPrompt};
use super::nll::{reference_nll, ReferenceNll};
use super::run::{
    answer_lengths, generate_answers, judge_entry, model_version, selector, write_answers,
    EvalConfig, PairResult, SelectorResult,
};
use crate::output::atomic_write_jsonl;
use crate::serve::ModelClient;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The figures of one model of the loop.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelEval {
    /// `base`, `M0`, `M1`, ...
    pub model: String,
    /// Its version.
    pub version: String,
    /// Reference NLL of the held-out prompts.
    pub reference: Option<ReferenceNll>,
    /// Answers written (with a judge).
    pub answers: usize,
    /// Their mean length in characters.
    pub mean_length: Option<f64>,
    /// Win rates against M_0, per judge rule (empty for M_0 itself and without a judge).
    pub pairs: Vec<PairResult>,
    /// Selector quality on the dev set.
    pub selector: Option<SelectorResult>,
    /// Seconds the evaluation took.
    pub seconds: f64,
}

/// The loop's evaluator (process 0): the prompts, the judge, the dev set, and M_0's answers
/// once it has them.
pub struct LoopEval {
    cfg: EvalConfig,
    prompts: Vec<EvalPrompt>,
    dev: Option<Vec<DevPair>>,
    client: ModelClient,
    judge: Option<String>,
    baseline: Mutex<Option<Vec<Option<String>>>>,
}

impl LoopEval {
    /// An evaluator writing to `cfg.out`; loads the judge (`cfg.judge`) into the server.
    pub fn new(
        cfg: EvalConfig,
        prompts: Vec<EvalPrompt>,
        dev: Option<Vec<DevPair>>,
        client: ModelClient,
    ) -> Result<LoopEval> {
        std::fs::create_dir_all(&cfg.out)
            .with_context(|| format!("creating {}", cfg.out.display()))?;
        let judge = match &cfg.judge {
            Some(path) => {
                let version = model_version("judge", path)?;
                client
                    .load(&version, path)
                    .with_context(|| format!("loading the judge {}", path.display()))?;
                Some(version)
            }
            None => None,
        };
        Ok(LoopEval {
            cfg,
            prompts,
            dev,
            client,
            judge,
            baseline: Mutex::new(None),
        })
    }

    /// Where its files go.
    pub fn out(&self) -> &PathBuf {
        &self.cfg.out
    }

    /// Evaluates forward model `index` (0 for M_0, the baseline of the others), loaded from
    /// `path` as `version`.
    pub fn evaluate(&self, index: u64, version: &str, path: &Path) -> Result<ModelEval> {
        let role = if index == 0 {
            Role::Baseline
        } else {
            Role::Judged
        };
        self.evaluate_as(&format!("M{index}"), role, version, path)
    }

    /// Evaluates the base model the loop starts from (`--model`, before any finetuning) as
    /// `base`, judged against M_0 when M_0's answers are in (call it after M_0's evaluation):
    /// the paper's comparison of the seed model with the model it was made from.
    pub fn evaluate_base(&self, version: &str, path: &Path) -> Result<ModelEval> {
        self.evaluate_as(BASE, Role::Judged, version, path)
    }

    fn evaluate_as(&self, name: &str, role: Role, version: &str, path: &Path) -> Result<ModelEval> {
        let started = std::time::Instant::now();
        let reference = reference_nll(
            path,
            &self.prompts,
            self.cfg.system.as_deref(),
            self.cfg.max_len,
            8,
        )?;
        // Answers and ratings come from the model server (where the loop's own models already
        // are); the NLL alone does not need the model there.
        if self.judge.is_some() || self.dev.is_some() {
            self.client
                .load(version, path)
                .with_context(|| format!("loading {name} from {}", path.display()))?;
        }
        let mut pairs = Vec::new();
        let mut answers = Vec::new();
        if let Some(judge) = &self.judge {
            answers = generate_answers(&self.client, &self.cfg, version, name, &self.prompts)?;
            write_answers(
                &self.cfg.out.join(format!("answers-{name}.jsonl")),
                name,
                &self.prompts,
                &answers,
            )?;
            let mut baseline = self.baseline.lock().unwrap_or_else(|e| e.into_inner());
            match (role, baseline.as_ref()) {
                (Role::Baseline, _) => *baseline = Some(answers.clone()),
                (Role::Judged, Some(m0)) => {
                    let (p, lines) = judge_entry(
                        &self.client,
                        judge,
                        &self.cfg,
                        &self.prompts,
                        (name, &answers),
                        ("M0", m0),
                    )?;
                    atomic_write_jsonl(
                        &self.cfg.out.join(format!("judgments-{name}.jsonl")),
                        &lines,
                    )?;
                    pairs = p;
                }
                // M_0's evaluation failed (reported with it): nothing to judge against, and
                // another model's answers must not stand in for M_0's.
                (Role::Judged, None) => {
                    log::warn!("{name} not judged: M0 has no answers to judge against")
                }
            }
        }
        let selector = match &self.dev {
            Some(dev) => Some(selector(&self.client, version, name, dev, &self.cfg)?),
            None => None,
        };
        let (n, mean_length) = answer_lengths(&answers);
        let e = ModelEval {
            model: name.to_owned(),
            version: version.to_owned(),
            reference,
            answers: n,
            mean_length,
            pairs,
            selector,
            seconds: started.elapsed().as_secs_f64(),
        };
        log::info!("{}", describe(&e));
        Ok(e)
    }
}

/// The name of the base model's evaluation (`metrics.json`, the report, the files in `eval/`).
pub const BASE: &str = "base";

/// What an evaluated model's answers are to the judging.
#[derive(Clone, Copy)]
enum Role {
    /// M_0: the answers every other model is judged against.
    Baseline,
    /// Judged against M_0.
    Judged,
}

/// One line for the log and the progress display.
pub fn describe(e: &ModelEval) -> String {
    let mut s = format!("eval {}:", e.model);
    if let Some(r) = &e.reference {
        s += &format!(" reference NLL {:.4} ({} tokens)", r.nll, r.tokens);
    }
    for p in &e.pairs {
        if let (Some(w), Some((lo, hi))) = (p.win_rate, p.ci95) {
            s += &format!(
                "; win rate vs {} ({}) {:.1}% [{:.1}, {:.1}]",
                p.baseline,
                p.rule,
                100.0 * w,
                100.0 * lo,
                100.0 * hi
            );
        }
    }
    if let Some(sel) = &e.selector {
        s += &format!(
            "; selector precision {} recall {}",
            fmt_opt(sel.precision),
            fmt_opt(sel.recall)
        );
    }
    s
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into())
}
