//! The metrics log of a checkpoint folder (`metrics.jsonl`, one line per optimizer step):
//! appended as training goes, cut back to the checkpoint's step on resume, read for losses.

use std::io::Write;
use std::path::Path;

use serde_json::Value;

use super::checkpoint;
use super::save::json_err;
use super::sft::StepMetrics;
use super::{io_err, TrainError};

/// The `(step, line)` of every well-formed line of the metrics log of `out`, in file order.
pub(super) fn metrics_lines(out: &Path) -> Result<Vec<(usize, f64, String)>, TrainError> {
    let p = out.join(checkpoint::METRICS);
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(&p)(e)),
    };
    Ok(text
        .lines()
        .filter_map(|l| {
            let v: Value = serde_json::from_str(l).ok()?;
            Some((
                v["step"].as_u64()? as usize,
                v["loss"].as_f64()?,
                l.to_string(),
            ))
        })
        .collect())
}

/// Per-step losses from the metrics log of `out`, in step order; a step logged twice (run
/// again after a resume) counts with its last line.
pub fn read_losses(out: &Path) -> Result<Vec<f64>, TrainError> {
    let by_step: std::collections::BTreeMap<usize, f64> = metrics_lines(out)?
        .into_iter()
        .map(|(s, l, _)| (s, l))
        .collect();
    Ok(by_step.into_values().collect())
}

/// Keeps only the metrics lines of steps `<= step` (rewritten atomically); returns their losses.
pub(super) fn truncate_metrics(out: &Path, step: usize) -> Result<Vec<f64>, TrainError> {
    let keep: Vec<(usize, f64, String)> = metrics_lines(out)?
        .into_iter()
        .filter(|(s, _, _)| *s <= step)
        .collect();
    let p = out.join(checkpoint::METRICS);
    let tmp = out.join(format!(".{}.tmp", checkpoint::METRICS));
    let mut text = String::new();
    for (_, _, l) in &keep {
        text.push_str(l);
        text.push('\n');
    }
    std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &p).map_err(io_err(&p))?;
    let by_step: std::collections::BTreeMap<usize, f64> =
        keep.into_iter().map(|(s, l, _)| (s, l)).collect();
    Ok(by_step.into_values().collect())
}

/// Appends one step's metrics to the log in `out`.
pub(super) fn append_metrics(out: &Path, m: &StepMetrics) -> Result<(), TrainError> {
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let p = out.join(checkpoint::METRICS);
    let line = serde_json::to_string(m).map_err(json_err("step metrics"))?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p)
        .map_err(io_err(&p))?;
    writeln!(f, "{line}").map_err(io_err(&p))
}
