//! The run report: one self-contained HTML page drawn from a run's `metrics.json` (see
//! `backflow run humpback`), with no JavaScript and no external resource, so that it opens from a
//! copied output folder, an e-mail attachment or a CI artifact alike. Its plots are inline SVG.
//!
//! It renders the typed record [`HumpbackMetrics`] (the run's own, or a `metrics.json` read back
//! with serde, older files through its defaults). A figure that cannot be shown (a non-finite
//! loss or rate, the acceptance of a round that rated nothing) reads "n/a" or leaves its bar or
//! curve out, never a panic.
//!
//! # Scales
//! Documented so that a test can compute the expected geometry independently. Every plot draws in
//! an area [`PLOT_W`] × [`PLOT_H`] pixels wide and high, whose top-left corner is at
//! ([`MARGIN_LEFT`], [`MARGIN_TOP`]) in its `<svg>`. Coordinates are written with two decimals.
//! - `scores`: six groups (scores 1 to 5, then unparsed), each `PLOT_W / 6` wide. Inside group `g`
//!   the `n` rounds' bars share the middle 80%: bar `i` is `0.8 * PLOT_W / 6 / n` wide, at
//!   `x = MARGIN_LEFT + (g + 0.1) * PLOT_W / 6 + i * width`. With `m` the largest count of the plot,
//!   a count `c` is a bar `c / m * PLOT_H` high, at `y = MARGIN_TOP + PLOT_H - height`.
//! - `acceptance`: one slot of `PLOT_W / n` per round, the bar 60% of its slot, centred; with `m`
//!   the largest acceptance, acceptance `a` is `a / m * PLOT_H` high.
//! - `loss`: step `i` of a curve is at `x = MARGIN_LEFT + i / (L - 1) * PLOT_W`, `L` the longest
//!   curve's length (the middle when `L` is 1); loss `l` at `y = MARGIN_TOP + (hi - l) / (hi - lo) *
//!   PLOT_H` with `lo`, `hi` the smallest and largest losses of all curves (widened by 0.5 on each
//!   side when they are equal).
//! - `throughput`: horizontal bars in panels of one unit each; a value `v` with `m` the largest of
//!   its panel is `v / m * `[`BAR_W`] long.
//!
//! Why one file of this size: one self-contained page; its tables and plots share the escaping, the
//! number formats and the SVG axis and legend helpers.

use crate::eval::rounds::ModelEval;
use crate::eval::run::PairResult;
use crate::output::atomic_write;
use crate::run_records::{
    HumpbackMetrics, RoundSummary, StageThroughput, Throughput, TrainSummary,
};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The report's file name inside a run's output folder.
pub const REPORT_FILE: &str = "report.html";
/// Width of every plot's drawing area, in SVG pixels.
pub const PLOT_W: f64 = 640.0;
/// Height of every vertical plot's drawing area, in SVG pixels.
pub const PLOT_H: f64 = 220.0;
/// Left margin of every plot (room for the y axis' labels).
pub const MARGIN_LEFT: f64 = 64.0;
/// Top margin of every plot.
pub const MARGIN_TOP: f64 = 24.0;
/// Length of the longest bar of a throughput panel.
pub const BAR_W: f64 = 440.0;

/// Right margin of the vertical plots.
const MARGIN_RIGHT: f64 = 16.0;
/// Room under the drawing area for the x axis' labels and title.
const MARGIN_BOTTOM: f64 = 48.0;
/// Width of a vertical plot's `<svg>`.
const SVG_W: f64 = MARGIN_LEFT + PLOT_W + MARGIN_RIGHT;
/// Throughput plot: the label column left of the bars, and the row and panel-title heights.
const TP_LABEL_W: f64 = 180.0;
const TP_ROW_H: f64 = 24.0;
const TP_TITLE_H: f64 = 26.0;
/// Legend entries under a plot: height of a row of them.
const LEGEND_ROW_H: f64 = 18.0;

/// One colour per series (rounds, models), cycled: colour-blind friendly (Tableau 10).
const PALETTE: [&str; 10] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
];

/// The score histogram's categories, in plot order, and their keys in `score_histogram`.
const SCORE_KEYS: [&str; 6] = ["1", "2", "3", "4", "5", "unparsed"];

/// Shown for any figure the metrics do not hold.
const NA: &str = "n/a";

/// Writing appends to a `String`, which cannot fail: the `fmt::Result` carries nothing.
macro_rules! w {
    ($out:expr, $($arg:tt)*) => {{
        let _ = write!($out, $($arg)*);
    }};
}

/// Why the report could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Writing (or renaming into place) the report file failed.
    #[error("cannot write the report {}", path.display())]
    Write {
        /// The report's path.
        path: PathBuf,
        /// The I/O failure.
        #[source]
        source: anyhow::Error,
    },
}

/// Renders `metrics` (a run's `metrics.json`) into `dir/report.html`, atomically (a reader never
/// sees half a report), and returns its path.
pub fn write_report(dir: &Path, metrics: &HumpbackMetrics) -> Result<PathBuf, ReportError> {
    let path = dir.join(REPORT_FILE);
    let html = render(metrics);
    atomic_write(&path, |out| {
        out.write_all(html.as_bytes())?;
        Ok(())
    })
    .map_err(|source| ReportError::Write {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Renders the report of a run from its `metrics.json`: a complete HTML page with a header of key
/// figures, four inline SVG plots (ids `scores`, `acceptance`, `loss`, `throughput`) and tables of
/// rounds, models, throughput and drops (id `drops`). Every string from the input is escaped.
pub fn render(metrics: &HumpbackMetrics) -> String {
    let rounds = Round::all(metrics);
    let models = trained_models(metrics, &rounds);
    let pipeline = if metrics.pipeline.is_empty() {
        "humpback"
    } else {
        &metrics.pipeline
    };

    let mut out = String::with_capacity(64 * 1024);
    w!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>backflow {} run report</title>\n<style>{}</style>\n</head>\n<body>\n",
        escape(pipeline),
        CSS
    );
    header(&mut out, metrics, pipeline, &rounds);

    out.push_str("<h2>Scores per round</h2>\n");
    scores_plot(&mut out, &rounds);
    out.push_str("<h2>Acceptance per round</h2>\n");
    acceptance_plot(&mut out, &rounds);
    out.push_str("<h2>Training loss</h2>\n");
    loss_plot(&mut out, &models);
    out.push_str("<h2>Throughput</h2>\n");
    throughput_plot(&mut out, metrics, &models);

    let evals = model_evals(metrics);
    if !evals.is_empty() {
        out.push_str("<h2>Evaluation</h2>\n");
        eval_plots(&mut out, &evals);
        eval_table(&mut out, &evals);
    }

    out.push_str("<h2>Rounds</h2>\n");
    rounds_table(&mut out, &rounds);
    out.push_str("<h2>Trained models</h2>\n");
    models_table(&mut out, &models);
    out.push_str("<h2>Generation</h2>\n");
    generation_table(&mut out, metrics);
    out.push_str("<h2>Dropped</h2>\n");
    drops_table(&mut out, metrics);
    out.push_str("</body>\n</html>\n");
    out
}

/// Plain and readable: system font, light grid lines, tabular numbers.
const CSS: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',\
sans-serif;color:#222;background:#fff;max-width:980px;margin:2rem auto;padding:0 1rem;\
line-height:1.4}h1{font-size:1.6rem;margin:0 0 .2rem}h2{font-size:1.15rem;margin:2rem 0 .6rem;\
border-bottom:1px solid #ddd;padding-bottom:.2rem}.sub{color:#555;margin:0;overflow-wrap:anywhere}\
.figures{display:flex;flex-wrap:wrap;gap:.6rem;margin:1rem 0;padding:0}.figures div{border:1px \
solid #ddd;border-radius:4px;padding:.4rem .8rem;min-width:7.5rem}dt{font-size:.8rem;color:#666}\
dd{margin:0;font-size:1.3rem;font-weight:600;font-variant-numeric:tabular-nums}table{border-collapse:\
collapse;font-size:.9rem}th,td{border-bottom:1px solid #e5e5e5;padding:.3rem .7rem;text-align:left}\
th{font-weight:600;color:#444}td.n{text-align:right;font-variant-numeric:tabular-nums}\
svg{display:block;max-width:100%;height:auto}svg text{font-family:inherit;font-size:12px;fill:#333}\
svg .grid{stroke:#e8e8e8;stroke-width:1}svg .axis{stroke:#999;stroke-width:1}\
svg .muted{fill:#777}svg .title{font-size:13px;font-weight:600}";

// ---------------------------------------------------------------------------------------------
// Reading the metrics

/// A finite number, or nothing (a non-finite loss or rate draws nothing and reads "n/a").
fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// One round of the metrics.
struct Round<'a> {
    /// Its number.
    number: String,
    summary: &'a RoundSummary,
    /// Counts per [`SCORE_KEYS`] category (`None`: no such key); `None` when nothing was rated.
    histogram: Option<[Option<f64>; 6]>,
    /// Curated / rated (the record's); `None` when nothing was rated.
    acceptance: Option<f64>,
}

impl<'a> Round<'a> {
    fn all(metrics: &'a HumpbackMetrics) -> Vec<Round<'a>> {
        metrics
            .rounds
            .iter()
            .map(|summary| {
                let h = &summary.score_histogram;
                let histogram = (h.total() > 0).then(|| {
                    let mut counts = [None; 6];
                    for (slot, key) in counts.iter_mut().zip(SCORE_KEYS) {
                        *slot = h.0.get(key).map(|&n| n as f64);
                    }
                    // The unparsed count may live beside the histogram only.
                    if counts[5].is_none() && summary.unparsed > 0 {
                        counts[5] = Some(summary.unparsed as f64);
                    }
                    counts
                });
                let acceptance = (summary.rated > 0)
                    .then_some(summary.acceptance)
                    .and_then(finite);
                Round {
                    number: summary.round.to_string(),
                    summary,
                    histogram,
                    acceptance,
                }
            })
            .collect()
    }
}

/// A trained model: step 0's backward and forward models, then each round's.
struct Model<'a> {
    name: String,
    train: &'a TrainSummary,
    /// The loss curve: `None` for a step whose loss is not finite.
    losses: Vec<Option<f64>>,
}

/// Step 0's models, then each round's that has one (a round cut short has no training).
fn trained_models<'a>(metrics: &'a HumpbackMetrics, rounds: &[Round<'a>]) -> Vec<Model<'a>> {
    let step0 = [
        ("backward", metrics.step0.backward.as_ref()),
        ("forward", metrics.step0.forward.as_ref()),
    ];
    let step0 = step0
        .into_iter()
        .filter_map(|(which, train)| Some((format!("step 0 {which}"), train?)));
    let rounds = rounds
        .iter()
        .map(|r| (format!("round {}", r.number), &r.summary.train))
        .filter(|(_, t)| !t.version.is_empty() || !t.losses.is_empty());
    step0
        .chain(rounds)
        .map(|(name, train)| Model {
            name,
            train,
            losses: train.losses.iter().map(|&l| finite(l)).collect(),
        })
        .collect()
}

/// A version, or `None` when the record has none.
fn version_of(v: &str) -> Option<&str> {
    (!v.is_empty()).then_some(v)
}

// ---------------------------------------------------------------------------------------------
// Formatting

/// Escapes text for HTML (element content and quoted attribute values alike).
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A number as people read it: integers whole, others with fewer decimals as they grow.
fn fmt_num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else if x.abs() >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

fn fmt_opt(x: Option<f64>) -> String {
    x.map(fmt_num).unwrap_or_else(|| NA.to_string())
}

/// A fraction as a percentage with one decimal.
fn fmt_pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

/// A duration in seconds, rounded to the second: "45.2 s", "13 min 33 s", "2 h 05 min".
fn fmt_secs(secs: f64) -> String {
    if secs < 60.0 {
        return format!("{secs:.1} s");
    }
    // Saturating float-to-int cast: an absurd duration prints large, not wrapped.
    let total = secs.round() as u64;
    let (h, m, s) = (total / 3600, total / 60 % 60, total % 60);
    if h == 0 {
        format!("{m} min {s:02} s")
    } else {
        format!("{h} h {m:02} min")
    }
}

/// A model version (a content hash) shortened for display; the full one goes in a tooltip.
fn short_version(v: &str) -> String {
    v.chars().take(12).collect()
}

/// A version cell: the short form, the full one as its title, or "n/a".
fn version_cell(v: Option<&str>) -> String {
    match v {
        Some(v) => format!(
            "<code title=\"{}\">{}</code>",
            escape(v),
            escape(&short_version(v))
        ),
        None => NA.to_string(),
    }
}

/// A coordinate, with two decimals (see the module's scales).
fn c(x: f64) -> String {
    format!("{x:.2}")
}

/// The 1-2-5 step between ticks that splits `lo..hi` into about five intervals (0 if empty).
fn tick_step(lo: f64, hi: f64) -> f64 {
    let span = hi - lo;
    if span.is_nan() || span <= 0.0 || !span.is_finite() {
        return 0.0;
    }
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|k| k * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag)
}

/// Tick values from `lo` to `hi`, multiples of [`tick_step`].
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let step = tick_step(lo, hi);
    if step <= 0.0 {
        return vec![lo];
    }
    let first = (lo / step).ceil() * step;
    (0..)
        .map(|k| first + k as f64 * step)
        .take_while(|t| *t <= hi + step * 1e-9)
        .take(50)
        .collect()
}

/// Decimals that tell ticks `step` apart: none for 1, 2, 5, 10..., one for 0.5, and so on.
fn decimals(step: f64) -> usize {
    if step > 0.0 && step.is_finite() {
        (-step.log10().floor()).clamp(0.0, 9.0) as usize
    } else {
        0
    }
}

/// A tick's label, as precise as its step: 0, 0.5, 1.0, 1.5 (never 1, 1.50).
fn tick_label(t: f64, step: f64) -> String {
    format!("{:.*}", decimals(step), t)
}

/// A tick's label as a percentage: 0.0%, 5.0%... for a 0.05 step.
fn tick_label_pct(t: f64, step: f64) -> String {
    format!("{:.*}%", decimals(step * 100.0).max(1), t * 100.0)
}

// ---------------------------------------------------------------------------------------------
// Header and tables

fn header(out: &mut String, metrics: &HumpbackMetrics, pipeline: &str, rounds: &[Round]) {
    let model = metrics.model.display().to_string();
    w!(
        out,
        "<header>\n<h1>backflow run report: {}</h1>\n<p class=\"sub\">model <code>{}</code></p>\n",
        escape(pipeline),
        escape(if model.is_empty() { NA } else { &model })
    );
    let last = rounds.last();
    let dropped: u64 = metrics.dropped.values().sum();
    let figures: [(&str, String); 10] = [
        (
            "Elapsed",
            finite(metrics.elapsed_secs)
                .filter(|s| *s >= 0.0)
                .map(fmt_secs)
                .unwrap_or_else(|| NA.into()),
        ),
        ("Passages", fmt_num(metrics.passages as f64)),
        (
            "Passages / hour",
            fmt_opt(finite(metrics.passages_per_hour)),
        ),
        ("Rounds", rounds.len().to_string()),
        (
            "Rated (last round)",
            fmt_opt(last.map(|r| r.summary.rated as f64)),
        ),
        (
            "Curated (last round)",
            fmt_opt(last.map(|r| r.summary.curated as f64)),
        ),
        (
            "Acceptance (last round)",
            last.and_then(|r| r.acceptance)
                .map(fmt_pct)
                .unwrap_or_else(|| NA.into()),
        ),
        ("Dropped", fmt_num(dropped as f64)),
        (
            "Peak memory (MB)",
            fmt_opt(metrics.peak_rss_mb.and_then(finite)),
        ),
        (
            "Peak KV cache (MB)",
            fmt_opt(finite(metrics.throughput.kv_cache_peak_mb)),
        ),
    ];
    out.push_str("<dl class=\"figures\">\n");
    for (name, value) in figures {
        w!(
            out,
            "<div><dt>{name}</dt><dd>{}</dd></div>\n",
            escape(&value)
        );
    }
    out.push_str("</dl>\n</header>\n");
}

/// The evaluation of the base model and every forward model (step 0's for the base and M_0,
/// then each round's).
fn model_evals(metrics: &HumpbackMetrics) -> Vec<&ModelEval> {
    [&metrics.step0.base, &metrics.step0.evaluation]
        .into_iter()
        .chain(metrics.rounds.iter().map(|r| &r.evaluation))
        .filter_map(|e| e.eval.as_ref())
        .collect()
}

/// The win rate (and its interval) of an evaluated model under `rule`.
fn eval_pair<'a>(e: &'a ModelEval, rule: &str) -> Option<&'a PairResult> {
    e.pairs.iter().find(|p| p.rule == rule)
}

/// A win rate and its interval, when finite.
fn win_point(p: &PairResult) -> Point {
    (
        p.win_rate.and_then(finite),
        p.ci95.filter(|(lo, hi)| lo.is_finite() && hi.is_finite()),
    )
}

/// A point per model: the value and, if any, its interval.
type Point = (Option<f64>, Option<(f64, f64)>);
/// A named series of points.
type Series = (String, Vec<Point>);

/// Two plots: reference NLL per model (`eval-nll`), and win rate against M_0 with its 95%
/// interval per judge rule (`eval-win`).
fn eval_plots(out: &mut String, evals: &[&ModelEval]) {
    let names: Vec<String> = evals.iter().map(|e| e.model.clone()).collect();
    let nll: Vec<Point> = evals
        .iter()
        .map(|e| (e.reference.as_ref().and_then(|r| finite(r.nll)), None))
        .collect();
    points_plot(
        out,
        "eval-nll",
        "Reference NLL per model",
        "Mean negative log-likelihood per token of the held-out reference answers (lower is better).",
        "NLL (nats/token)",
        &names,
        &[("reference NLL".to_owned(), nll)],
        None,
        None,
    );
    let rules: Vec<String> = ["prob", "text"]
        .iter()
        .filter(|r| evals.iter().any(|e| eval_pair(e, r).is_some()))
        .map(|r| (*r).to_owned())
        .collect();
    let series: Vec<Series> = rules
        .iter()
        .map(|rule| {
            (
                format!("win rate vs M0 ({rule})"),
                evals
                    .iter()
                    .map(|e| eval_pair(e, rule).map(win_point).unwrap_or((None, None)))
                    .collect(),
            )
        })
        .collect();
    if !series.is_empty() {
        points_plot(
            out,
            "eval-win",
            "Win rate against M0",
            "Pairwise win rate judged in both orders (ties count half), with its Wilson 95% interval.",
            "win rate",
            &names,
            &series,
            Some((0.0, 1.0)),
            // M_0 against itself: where a model no better and no worse than M_0 lies.
            Some((0.5, "M0 itself: 50%")),
        );
    }
}

/// Points per model (x: the models in order), one colour per series, with error bars where an
/// interval is given. `fixed`: the y range, else the data's with a margin; `level`: a dashed
/// horizontal line at that value, titled, to read the points against.
#[allow(clippy::too_many_arguments)]
fn points_plot(
    out: &mut String,
    id: &str,
    title: &str,
    desc: &str,
    y_title: &str,
    xs: &[String],
    series: &[Series],
    fixed: Option<(f64, f64)>,
    level: Option<(f64, &str)>,
) {
    let height = MARGIN_TOP + PLOT_H + MARGIN_BOTTOM + LEGEND_ROW_H;
    svg_open(out, id, height, title, desc);
    let values: Vec<f64> = series
        .iter()
        .flat_map(|(_, pts)| {
            pts.iter().flat_map(|(v, ci)| {
                v.iter()
                    .copied()
                    .chain(ci.iter().flat_map(|(lo, hi)| [*lo, *hi]))
            })
        })
        .filter(|v| v.is_finite())
        .collect();
    if values.is_empty() || xs.is_empty() {
        no_data(out, height);
        out.push_str("</svg>\n");
        return;
    }
    let (lo, hi) = fixed.unwrap_or_else(|| {
        let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let pad = ((hi - lo) * 0.1).max(0.01);
        ((lo - pad).max(0.0), hi + pad)
    });
    y_axis(out, lo, hi, tick_label, y_title);
    let span = if hi > lo { hi - lo } else { 1.0 };
    let y_of = |v: f64| MARGIN_TOP + (hi - v.clamp(lo, hi)) / span * PLOT_H;
    if let Some((v, label)) = level.filter(|(v, _)| (lo..=hi).contains(v)) {
        w!(
            out,
            "<line class=\"level\" x1=\"{}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"#888\" \
             stroke-dasharray=\"4 4\"><title>{}</title></line>\n",
            c(MARGIN_LEFT),
            c(MARGIN_LEFT + PLOT_W),
            escape(label),
            y = c(y_of(v)),
        );
    }
    let slot = PLOT_W / xs.len() as f64;
    for (i, x) in xs.iter().enumerate() {
        w!(
            out,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
            c(MARGIN_LEFT + (i as f64 + 0.5) * slot),
            c(MARGIN_TOP + PLOT_H + 18.0),
            escape(x)
        );
    }
    let offset = |k: usize| (k as f64 - (series.len() as f64 - 1.0) / 2.0) * 10.0;
    for (k, (name, pts)) in series.iter().enumerate() {
        let colour = PALETTE[k % PALETTE.len()];
        let mut path = String::new();
        for (i, (v, interval)) in pts.iter().enumerate() {
            let Some(v) = v.filter(|v| v.is_finite()) else {
                continue;
            };
            let x = MARGIN_LEFT + (i as f64 + 0.5) * slot + offset(k);
            if let Some((a, b)) = interval {
                w!(
                    out,
                    "<line x1=\"{x}\" y1=\"{}\" x2=\"{x}\" y2=\"{}\" stroke=\"{colour}\" stroke-width=\"2\"/>\n",
                    c(y_of(*a)),
                    c(y_of(*b)),
                    x = c(x)
                );
            }
            path += &format!(
                "{}{} {} ",
                if path.is_empty() { "M" } else { "L" },
                c(x),
                c(y_of(v))
            );
            w!(
                out,
                "<circle cx=\"{}\" cy=\"{}\" r=\"4\" fill=\"{colour}\"><title>{} {}: {}{}</title></circle>\n",
                c(x),
                c(y_of(v)),
                escape(name),
                escape(&xs[i]),
                fmt_num(v),
                interval
                    .map(|(a, b)| format!(" [{}, {}]", fmt_num(a), fmt_num(b)))
                    .unwrap_or_default()
            );
        }
        if !path.is_empty() {
            w!(
                out,
                "<path d=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-opacity=\"0.5\"/>\n",
                path.trim_end()
            );
        }
    }
    let names: Vec<String> = series.iter().map(|(n, _)| n.clone()).collect();
    legend(out, &names, 220.0);
    out.push_str("</svg>\n");
}

/// One row per evaluated model (id `eval`).
fn eval_table(out: &mut String, evals: &[&ModelEval]) {
    out.push_str(
        "<table id=\"eval\">\n<tr><th>Model</th><th>Reference NLL</th><th>Tokens</th>\
         <th>Win rate vs M0 (prob)</th><th>Win rate vs M0 (text)</th>\
         <th>Selector precision</th><th>Selector recall</th><th>Mean answer chars</th></tr>\n",
    );
    let win = |e: &ModelEval, rule: &str| match eval_pair(e, rule) {
        Some(p) => match win_point(p) {
            (Some(w), Some((a, b))) => format!("{} [{}, {}]", fmt_pct(w), fmt_pct(a), fmt_pct(b)),
            (Some(w), None) => fmt_pct(w),
            _ => NA.into(),
        },
        None => NA.into(),
    };
    for e in evals {
        let reference = e.reference.as_ref();
        let selector = e.selector.as_ref();
        w!(
            out,
            "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>\n",
            escape(&e.model),
            reference
                .and_then(|r| finite(r.nll))
                .map(|v| format!("{v:.4}"))
                .unwrap_or_else(|| NA.into()),
            fmt_opt(reference.map(|r| r.tokens as f64)),
            win(e, "prob"),
            win(e, "text"),
            fmt_opt(selector.and_then(|s| s.precision)),
            fmt_opt(selector.and_then(|s| s.recall)),
            fmt_opt(e.mean_length),
        );
    }
    out.push_str("</table>\n");
}

fn rounds_table(out: &mut String, rounds: &[Round]) {
    if rounds.is_empty() {
        out.push_str("<p>No round was run.</p>\n");
        return;
    }
    out.push_str(
        "<table id=\"rounds\">\n<tr><th>Round</th><th>Rating model</th><th>Rated</th>\
         <th>Curated</th><th>Acceptance</th><th>Unparsed</th><th>Trained model</th>\
         <th>Seed examples</th><th>Augmented examples</th></tr>\n",
    );
    for r in rounds {
        let examples = r.summary.train.examples.as_ref();
        w!(
            out,
            "<tr><td>{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td></tr>\n",
            escape(&r.number),
            version_cell(version_of(&r.summary.rating_model)),
            fmt_num(r.summary.rated as f64),
            fmt_num(r.summary.curated as f64),
            r.acceptance.map(fmt_pct).unwrap_or_else(|| NA.into()),
            fmt_num(r.summary.unparsed as f64),
            version_cell(version_of(&r.summary.train.version)),
            fmt_opt(examples.map(|e| e.seed as f64)),
            fmt_opt(examples.map(|e| e.augmented as f64)),
        );
    }
    out.push_str("</table>\n");
}

fn models_table(out: &mut String, models: &[Model]) {
    if models.is_empty() {
        out.push_str("<p>No model was trained.</p>\n");
        return;
    }
    out.push_str(
        "<table id=\"models\">\n<tr><th>Model</th><th>Version</th><th>Reused</th><th>Steps</th>\
         <th>First loss</th><th>Last loss</th><th>Tokens / s</th><th>Time</th></tr>\n",
    );
    for m in models {
        let first = m.losses.iter().flatten().next().copied();
        let last = m.losses.iter().flatten().next_back().copied();
        w!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>\n",
            escape(&m.name),
            version_cell(version_of(&m.train.version)),
            match (&m.train.given, m.train.reused) {
                (Some(_), _) => "given",
                (None, true) => "yes",
                (None, false) => "no",
            },
            m.losses.len(),
            fmt_opt(first),
            fmt_opt(last),
            fmt_opt(finite(m.train.tokens_per_sec)),
            finite(m.train.secs)
                .map(fmt_secs)
                .unwrap_or_else(|| NA.into()),
        );
    }
    out.push_str("</table>\n");
}

fn generation_table(out: &mut String, metrics: &HumpbackMetrics) {
    out.push_str(
        "<table id=\"generation\">\n<tr><th>Stage</th><th>Prompts</th><th>Prompts / s</th>\
         <th>New tokens / s</th><th>Prefill tokens / s</th><th>Prefill passes: tokens / s</th>\
         <th>Decode passes: tokens / s</th><th>Mean batch</th>\
         <th>Prefix reused</th><th>Model busy</th><th>Steps shared</th><th>Cache hits</th></tr>\n",
    );
    for (stage, t) in stages(&metrics.throughput) {
        w!(
            out,
            "<tr><td>{stage}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>\n",
            fmt_num(t.prompts as f64),
            fmt_opt(finite(t.prompts_per_sec)),
            fmt_opt(finite(t.new_tokens_per_sec)),
            fmt_opt(finite(t.prefill_tokens_per_sec)),
            // The passes' own speeds, to set beside the model bench's.
            fmt_opt(finite(t.prefill_pass_tokens_per_sec)),
            fmt_opt(finite(t.decode_pass_tokens_per_sec)),
            fmt_opt(finite(t.mean_batch)),
            finite(t.prefix_saved)
                .map(fmt_pct)
                .unwrap_or_else(|| NA.into()),
            finite(t.busy_fraction)
                .map(fmt_pct)
                .unwrap_or_else(|| NA.into()),
            // Decode steps run in one pass with another version's rows.
            finite(t.joint_step_share)
                .map(fmt_pct)
                .unwrap_or_else(|| NA.into()),
            fmt_num(t.cache_hits as f64),
        );
    }
    out.push_str("</table>\n");
}

/// The model server's two stages of the loop, by name.
fn stages(t: &Throughput) -> [(&'static str, &StageThroughput); 2] {
    [("augment", &t.augment), ("rate", &t.rate)]
}

fn drops_table(out: &mut String, metrics: &HumpbackMetrics) {
    let mut drops: Vec<(&str, u64)> = metrics
        .dropped
        .iter()
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    // Most frequent first; ties by name, for a stable page.
    drops.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    out.push_str("<table id=\"drops\">\n<tr><th>Reason</th><th>Count</th></tr>\n");
    if drops.is_empty() {
        out.push_str("<tr><td colspan=\"2\">nothing dropped</td></tr>\n");
    }
    for (reason, n) in &drops {
        w!(
            out,
            "<tr><td>{}</td><td class=\"n\">{}</td></tr>\n",
            escape(reason),
            n
        );
    }
    if drops.len() > 1 {
        let total: u64 = drops.iter().map(|d| d.1).sum();
        w!(out, "<tr><th>total</th><td class=\"n\">{total}</td></tr>\n");
    }
    out.push_str("</table>\n");
}

// ---------------------------------------------------------------------------------------------
// Plots

/// Opens a plot's `<svg>` with its id, accessible title and description.
fn svg_open(out: &mut String, id: &str, height: f64, title: &str, desc: &str) {
    w!(
        out,
        "<svg id=\"{id}\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         viewBox=\"0 0 {w} {h}\" role=\"img\">\n<title>{}</title>\n<desc>{}</desc>\n",
        escape(title),
        escape(desc),
        w = c(SVG_W),
        h = c(height),
    );
}

/// A message in the middle of an empty plot.
fn no_data(out: &mut String, height: f64) {
    w!(
        out,
        "<text class=\"muted\" x=\"{}\" y=\"{}\" text-anchor=\"middle\">no data</text>\n",
        c(SVG_W / 2.0),
        c(height / 2.0)
    );
}

/// Horizontal grid lines and labels of a y axis from `lo` to `hi`, and the axis title.
fn y_axis(out: &mut String, lo: f64, hi: f64, label: fn(f64, f64) -> String, title: &str) {
    let span = if hi > lo { hi - lo } else { 1.0 };
    let step = tick_step(lo, hi);
    for t in ticks(lo, hi) {
        let y = MARGIN_TOP + (hi - t) / span * PLOT_H;
        w!(
            out,
            "<line class=\"grid\" x1=\"{}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\"/>\
             <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n",
            c(MARGIN_LEFT),
            c(MARGIN_LEFT + PLOT_W),
            c(MARGIN_LEFT - 6.0),
            c(y + 4.0),
            escape(&label(t, step)),
            y = c(y),
        );
    }
    w!(
        out,
        "<text class=\"muted\" transform=\"translate(14 {}) rotate(-90)\" text-anchor=\"middle\">{}</text>\n",
        c(MARGIN_TOP + PLOT_H / 2.0),
        escape(title)
    );
    // The axes themselves, over the grid.
    w!(
        out,
        "<line class=\"axis\" x1=\"{l}\" y1=\"{t}\" x2=\"{l}\" y2=\"{b}\"/>\
         <line class=\"axis\" x1=\"{l}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\"/>\n",
        l = c(MARGIN_LEFT),
        t = c(MARGIN_TOP),
        b = c(MARGIN_TOP + PLOT_H),
        r = c(MARGIN_LEFT + PLOT_W),
    );
}

/// The x axis' title, under its labels.
fn x_title(out: &mut String, title: &str) {
    w!(
        out,
        "<text class=\"muted\" x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
        c(MARGIN_LEFT + PLOT_W / 2.0),
        c(MARGIN_TOP + PLOT_H + 38.0),
        escape(title)
    );
}

/// Legend rows needed for `n` entries of width `entry_w`.
fn legend_rows(n: usize, entry_w: f64) -> usize {
    let per_row = ((PLOT_W / entry_w).floor() as usize).max(1);
    n.div_ceil(per_row)
}

/// A legend under the x axis: a swatch and a name per series, wrapped in rows.
fn legend(out: &mut String, names: &[String], entry_w: f64) {
    let per_row = ((PLOT_W / entry_w).floor() as usize).max(1);
    for (i, name) in names.iter().enumerate() {
        let x = MARGIN_LEFT + (i % per_row) as f64 * entry_w;
        let y = MARGIN_TOP + PLOT_H + MARGIN_BOTTOM + (i / per_row) as f64 * LEGEND_ROW_H;
        w!(
            out,
            "<rect x=\"{}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{}\"/>\
             <text x=\"{}\" y=\"{}\">{}</text>\n",
            c(x),
            c(y),
            PALETTE[i % PALETTE.len()],
            c(x + 17.0),
            c(y + 10.5),
            escape(name)
        );
    }
}

fn scores_plot(out: &mut String, rounds: &[Round]) {
    // Rounds without a histogram get no colour: the legend lists only what is drawn.
    let with_hist: Vec<&Round> = rounds.iter().filter(|r| r.histogram.is_some()).collect();
    let names: Vec<String> = with_hist
        .iter()
        .map(|r| format!("round {}", r.number))
        .collect();
    let height =
        MARGIN_TOP + PLOT_H + MARGIN_BOTTOM + legend_rows(names.len(), 110.0) as f64 * LEGEND_ROW_H;
    svg_open(
        out,
        "scores",
        height,
        "Score distribution per round",
        "Passages per score the rating model gave (1 to 5, or unparsed), one bar per round.",
    );
    let max = with_hist
        .iter()
        .flat_map(|r| r.histogram.iter().flatten().flatten())
        .fold(0.0f64, |m, &x| m.max(x));
    if with_hist.is_empty() || max <= 0.0 {
        no_data(out, height);
        out.push_str("</svg>\n");
        return;
    }
    y_axis(out, 0.0, max, tick_label, "passages");
    let group_w = PLOT_W / SCORE_KEYS.len() as f64;
    let bar_w = 0.8 * group_w / with_hist.len() as f64;
    for (g, key) in SCORE_KEYS.iter().enumerate() {
        let group_x = MARGIN_LEFT + (g as f64 + 0.1) * group_w;
        for (i, round) in with_hist.iter().enumerate() {
            let Some(count) = round.histogram.and_then(|h| h[g]) else {
                continue;
            };
            if count <= 0.0 {
                continue;
            }
            let h = count / max * PLOT_H;
            w!(
                out,
                "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"{}\">\
                 <title>round {}, score {}: {}</title></rect>\n",
                c(group_x + i as f64 * bar_w),
                c(MARGIN_TOP + PLOT_H - h),
                c(bar_w),
                c(h),
                PALETTE[i % PALETTE.len()],
                escape(&round.number),
                key,
                fmt_num(count)
            );
        }
        w!(
            out,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{key}</text>\n",
            c(MARGIN_LEFT + (g as f64 + 0.5) * group_w),
            c(MARGIN_TOP + PLOT_H + 18.0)
        );
    }
    x_title(out, "score");
    legend(out, &names, 110.0);
    out.push_str("</svg>\n");
}

fn acceptance_plot(out: &mut String, rounds: &[Round]) {
    let height = MARGIN_TOP + PLOT_H + MARGIN_BOTTOM;
    svg_open(
        out,
        "acceptance",
        height,
        "Acceptance per round",
        "Share of the rated passages curated into the round's training set.",
    );
    let max = rounds
        .iter()
        .filter_map(|r| r.acceptance)
        .fold(0.0f64, f64::max);
    if rounds.is_empty() || max <= 0.0 {
        no_data(out, height);
        out.push_str("</svg>\n");
        return;
    }
    y_axis(out, 0.0, max, tick_label_pct, "acceptance");
    let slot = PLOT_W / rounds.len() as f64;
    for (i, round) in rounds.iter().enumerate() {
        let centre = MARGIN_LEFT + (i as f64 + 0.5) * slot;
        let bar_w = 0.6 * slot;
        match round.acceptance {
            Some(a) if a > 0.0 => {
                let h = a / max * PLOT_H;
                let y = MARGIN_TOP + PLOT_H - h;
                w!(
                    out,
                    "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"{}\">\
                     <title>round {}: {}</title></rect>\
                     <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
                    c(centre - bar_w / 2.0),
                    c(y),
                    c(bar_w),
                    c(h),
                    PALETTE[i % PALETTE.len()],
                    escape(&round.number),
                    fmt_pct(a),
                    c(centre),
                    // Inside the bar's top when it reaches the top of the plot, above it otherwise.
                    c(if h > PLOT_H - 16.0 { y + 14.0 } else { y - 5.0 }),
                    fmt_pct(a)
                );
            }
            other => w!(
                out,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
                c(centre),
                c(MARGIN_TOP + PLOT_H - 5.0),
                other.map(fmt_pct).unwrap_or_else(|| NA.into())
            ),
        }
        w!(
            out,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">round {}</text>\n",
            c(centre),
            c(MARGIN_TOP + PLOT_H + 18.0),
            escape(&round.number)
        );
    }
    out.push_str("</svg>\n");
}

fn loss_plot(out: &mut String, models: &[Model]) {
    let curves: Vec<&Model> = models
        .iter()
        .filter(|m| m.losses.iter().any(Option::is_some))
        .collect();
    let names: Vec<String> = curves
        .iter()
        .map(|m| match version_of(&m.train.version) {
            Some(v) => format!("{} ({})", m.name, short_version(v)),
            None => m.name.clone(),
        })
        .collect();
    let height =
        MARGIN_TOP + PLOT_H + MARGIN_BOTTOM + legend_rows(names.len(), 320.0) as f64 * LEGEND_ROW_H;
    svg_open(
        out,
        "loss",
        height,
        "Training loss of every trained model",
        "Loss per optimiser step of step 0's backward and forward models and of each round's model.",
    );
    let all = curves.iter().flat_map(|m| m.losses.iter().flatten());
    let (mut lo, mut hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &l| {
        (lo.min(l), hi.max(l))
    });
    if curves.is_empty() || !lo.is_finite() || !hi.is_finite() {
        no_data(out, height);
        out.push_str("</svg>\n");
        return;
    }
    if hi - lo <= 0.0 {
        lo -= 0.5;
        hi += 0.5;
    }
    let len = curves.iter().map(|m| m.losses.len()).max().unwrap_or(1);
    y_axis(out, lo, hi, tick_label, "loss");
    let x_of = |i: usize| {
        if len > 1 {
            MARGIN_LEFT + i as f64 / (len - 1) as f64 * PLOT_W
        } else {
            MARGIN_LEFT + PLOT_W / 2.0
        }
    };
    let y_of = |l: f64| MARGIN_TOP + (hi - l) / (hi - lo) * PLOT_H;
    // Steps on the x axis, numbered from 1 as trainers print them: the first, then round numbers.
    let mut step_ticks = vec![1.0];
    step_ticks.extend(ticks(1.0, len as f64).into_iter().filter(|t| *t > 1.0));
    for t in step_ticks {
        if t.fract() != 0.0 {
            continue;
        }
        w!(
            out,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
            c(x_of(t as usize - 1)),
            c(MARGIN_TOP + PLOT_H + 18.0),
            t as u64
        );
    }
    x_title(out, "step");
    for (k, m) in curves.iter().enumerate() {
        let colour = PALETTE[k % PALETTE.len()];
        let points: Vec<(f64, f64)> = m
            .losses
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.map(|l| (x_of(i), y_of(l))))
            .collect();
        if let [(x, y)] = points[..] {
            w!(
                out,
                "<circle cx=\"{}\" cy=\"{}\" r=\"3\" fill=\"{colour}\"><title>{}</title></circle>\n",
                c(x),
                c(y),
                escape(&names[k])
            );
        } else {
            let mut pts = String::with_capacity(points.len() * 14);
            for (x, y) in &points {
                w!(pts, "{},{} ", c(*x), c(*y));
            }
            w!(
                out,
                "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" \
                 stroke-linejoin=\"round\" points=\"{}\"><title>{}</title></polyline>\n",
                pts.trim_end(),
                escape(&names[k])
            );
        }
    }
    legend(out, &names, 320.0);
    out.push_str("</svg>\n");
}

/// A throughput panel: its title and its labelled values.
type Panel<'a> = (&'a str, Vec<(String, Option<f64>)>);

fn throughput_plot(out: &mut String, metrics: &HumpbackMetrics, models: &[Model]) {
    let per_stage = |field: fn(&StageThroughput) -> f64| {
        stages(&metrics.throughput)
            .iter()
            .map(|(name, t)| ((*name).to_string(), finite(field(t))))
            .collect()
    };
    let mut panels: Vec<Panel> = vec![
        ("Prompts per second", per_stage(|t| t.prompts_per_sec)),
        ("New tokens per second", per_stage(|t| t.new_tokens_per_sec)),
    ];
    if !models.is_empty() {
        panels.push((
            "Training tokens per second",
            models
                .iter()
                .map(|m| (m.name.clone(), finite(m.train.tokens_per_sec)))
                .collect(),
        ));
    }
    panels.push((
        "Passages per hour",
        vec![("run".to_string(), finite(metrics.passages_per_hour))],
    ));
    let rows: usize = panels.iter().map(|p| p.1.len()).sum();
    let height = 8.0 + panels.len() as f64 * TP_TITLE_H + rows as f64 * TP_ROW_H + 8.0;
    svg_open(
        out,
        "throughput",
        height,
        "Throughput",
        "Generation and training speed, and passages processed per hour; each panel has its own scale.",
    );
    let mut y = 8.0;
    for (k, (title, entries)) in panels.iter().enumerate() {
        w!(
            out,
            "<text class=\"title\" x=\"8\" y=\"{}\">{}</text>\n",
            c(y + 17.0),
            escape(title)
        );
        y += TP_TITLE_H;
        let max = entries.iter().filter_map(|e| e.1).fold(0.0f64, f64::max);
        for (name, value) in entries {
            w!(
                out,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n",
                c(TP_LABEL_W - 8.0),
                c(y + 16.0),
                escape(name)
            );
            let len = match value {
                Some(v) if *v > 0.0 && max > 0.0 => v / max * BAR_W,
                _ => 0.0,
            };
            if len > 0.0 {
                w!(
                    out,
                    "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"16\" fill=\"{}\"/>\n",
                    c(TP_LABEL_W),
                    c(y + 4.0),
                    c(len),
                    PALETTE[k % PALETTE.len()]
                );
            }
            w!(
                out,
                "<text x=\"{}\" y=\"{}\">{}</text>\n",
                c(TP_LABEL_W + len + 6.0),
                c(y + 16.0),
                fmt_opt(*value)
            );
            y += TP_ROW_H;
        }
    }
    w!(
        out,
        "<line class=\"axis\" x1=\"{x}\" y1=\"8\" x2=\"{x}\" y2=\"{}\"/>\n",
        c(height - 8.0),
        x = c(TP_LABEL_W)
    );
    out.push_str("</svg>\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// `metrics.json` read as the report's caller reads it.
    fn typed(m: &Value) -> HumpbackMetrics {
        serde_json::from_value(m.clone()).expect("a metrics.json")
    }

    /// Renders a `metrics.json` written as JSON.
    fn render_json(m: &Value) -> String {
        render(&typed(m))
    }

    fn sample() -> HumpbackMetrics {
        typed(&sample_json())
    }

    /// Two rounds as `backflow run humpback` writes them. Largest score count: 12; largest
    /// acceptance: 0.2; losses from 1.0 to 4.0, the longest curve 4 steps.
    fn sample_json() -> Value {
        json!({
            "pipeline": "humpback",
            "model": "/models/SmolLM2-135M-Instruct.Q4_1.gguf",
            "elapsed_secs": 812.5, "passages": 48, "passages_per_hour": 212.6,
            "step0": {
                "backward": {"version": "ab12ab12ab12ab12", "reused": false,
                             "losses": [3.0, 2.5, 2.0], "tokens_per_sec": 40.1, "secs": 300.2},
                "forward": {"version": "cd34cd34cd34cd34", "reused": true,
                            "losses": [4.0, 3.0, 2.0, 1.0], "tokens_per_sec": 41.0, "secs": 290.0}
            },
            "rounds": [
                {"round": 1, "rating_model": "cd34cd34cd34cd34", "rated": 48, "curated": 5,
                 "acceptance": 0.104, "unparsed": 12,
                 "score_histogram": {"1": 3, "2": 10, "3": 12, "4": 6, "5": 5, "unparsed": 12},
                 "train": {"version": "ef56ef56ef56ef56", "reused": false, "losses": [2.0, 1.5],
                           "tokens_per_sec": 40.0, "secs": 100.0,
                           "examples": {"seed": 175, "augmented": 5}}},
                {"round": 2, "rating_model": "ef56ef56ef56ef56", "rated": 48, "curated": 10,
                 "acceptance": 0.2, "unparsed": 4,
                 "score_histogram": {"1": 1, "2": 4, "3": 9, "4": 8, "5": 10, "unparsed": 4}}
            ],
            "throughput": {
                "augment": {"prompts": 48, "prompts_per_sec": 0.5, "new_tokens_per_sec": 30.0, "cache_hits": 0},
                "rate": {"prompts": 96, "prompts_per_sec": 0.7, "new_tokens_per_sec": 50.0, "cache_hits": 2}
            },
            "dropped": {"too_short": 7, "duplicate": 3}
        })
    }

    /// The `<svg id="...">` element of `id`, or panics.
    fn svg<'a>(html: &'a str, id: &str) -> &'a str {
        let start = html
            .find(&format!("<svg id=\"{id}\""))
            .unwrap_or_else(|| panic!("no svg {id}"));
        let end = html[start..].find("</svg>").expect("svg not closed") + start;
        &html[start..end]
    }

    #[test]
    fn score_bars_follow_the_documented_scale() {
        let html = render(&sample());
        let scores = svg(&html, "scores");
        // Group width 640/6 = 106.667; two rounds share 80% of it: 42.667 each. Max count 12.
        // Round 1, score 1 (group 0, bar 0), count 3: x = 64 + 0.1*106.667 = 74.67,
        // height 3/12*220 = 55, y = 24 + 220 - 55 = 189.
        assert!(scores.contains(r#"x="74.67" y="189.00" width="42.67" height="55.00""#));
        // Round 2, score 5 (group 4, bar 1), count 10: x = 64 + 4.1*106.667 + 42.667 = 544,
        // height 10/12*220 = 183.33, y = 244 - 183.33 = 60.67.
        assert!(scores.contains(r#"x="544.00" y="60.67" width="42.67" height="183.33""#));
        // Round 1, unparsed (group 5, bar 0), count 12: the full height.
        assert!(scores.contains(r#"x="608.00" y="24.00" width="42.67" height="220.00""#));
        // 12 bars (no zero count) and 2 legend swatches, in the two rounds' colours.
        assert_eq!(scores.matches("<rect ").count(), 14);
        assert_eq!(scores.matches(PALETTE[0]).count(), 7);
        assert_eq!(scores.matches(PALETTE[1]).count(), 7);
        assert!(scores.contains(">round 1</text>") && scores.contains(">round 2</text>"));
        assert!(scores.contains("<title>Score distribution per round</title>"));
    }

    #[test]
    fn acceptance_bars_and_percentages() {
        let html = render(&sample());
        let acc = svg(&html, "acceptance");
        // Two slots of 320; bars 192 wide, centred. Max 0.2: 0.104 is 114.4 high, at y 129.6.
        assert!(acc.contains(r#"x="128.00" y="129.60" width="192.00" height="114.40""#));
        assert!(acc.contains(r#"x="448.00" y="24.00" width="192.00" height="220.00""#));
        assert!(acc.contains(">10.4%</text>") && acc.contains(">20.0%</text>"));
    }

    #[test]
    fn loss_curves_of_every_trained_model() {
        let html = render(&sample());
        let loss = svg(&html, "loss");
        // Longest curve 4 steps: x = 64 + i/3*640; losses 1..4: y = 24 + (4 - l)/3*220.
        assert!(loss.contains(r#"points="64.00,97.33 277.33,134.00 490.67,170.67""#));
        assert!(loss.contains(r#"points="64.00,24.00 277.33,97.33 490.67,170.67 704.00,244.00""#));
        assert!(loss.contains(r#"points="64.00,170.67 277.33,207.33""#));
        assert_eq!(loss.matches("<polyline").count(), 3);
        assert!(loss.contains("step 0 backward (ab12ab12ab12)"));
        assert!(loss.contains("round 1 (ef56ef56ef56)"));
    }

    #[test]
    fn throughput_bars_scale_per_panel() {
        let html = render(&sample());
        let tp = svg(&html, "throughput");
        // Prompts/s: rate 0.7 is the full 440, augment 0.5/0.7*440 = 314.29.
        assert!(tp.contains(r#"width="440.00""#) && tp.contains(r#"width="314.29""#));
        // New tokens/s: 30/50*440 = 264; training: 40/41*440 = 429.27.
        assert!(tp.contains(r#"width="264.00""#) && tp.contains(r#"width="429.27""#));
        assert!(tp.contains(">212.6</text>"));
    }

    #[test]
    fn header_and_tables_show_the_key_figures() {
        let html = render(&sample());
        for figure in [
            "<dt>Elapsed</dt><dd>13 min 33 s</dd>",
            "<dt>Passages</dt><dd>48</dd>",
            "<dt>Passages / hour</dt><dd>212.6</dd>",
            "<dt>Rounds</dt><dd>2</dd>",
            "<dt>Curated (last round)</dt><dd>10</dd>",
            "<dt>Acceptance (last round)</dt><dd>20.0%</dd>",
            "<dt>Dropped</dt><dd>10</dd>",
        ] {
            assert!(html.contains(figure), "missing {figure}");
        }
        // Drops, most frequent first, then the total.
        let too_short = html.find("<td>too_short</td>").expect("too_short row");
        let duplicate = html.find("<td>duplicate</td>").expect("duplicate row");
        assert!(too_short < duplicate);
        assert!(html.contains("<tr><th>total</th><td class=\"n\">10</td></tr>"));
    }

    /// M0's evaluation in step 0, M1's in round 1: the NLL points lie where the scale puts
    /// them, the win rate's interval is drawn, and the table shows the figures.
    #[test]
    fn evaluation_plots_and_table() {
        let mut m = sample_json();
        m["step0"]["eval"] = json!({"model": "M0", "reference": {"nll": 2.0, "tokens": 300},
                                    "pairs": [], "mean_length": 120.0});
        m["rounds"][0]["eval"] = json!({"model": "M1", "reference": {"nll": 1.5, "tokens": 300},
            "pairs": [{"rule": "prob", "win_rate": 0.75, "ci95": [0.5, 0.9]}],
            "selector": {"precision": 0.5, "recall": 0.25}});
        let html = render_json(&m);
        let nll = svg(&html, "eval-nll");
        // Range 1.5..2.0 padded by 0.05 each side: 1.45..2.05 over PLOT_H = 220 from y = 24.
        // M0 (2.0) at 24 + 0.05/0.6*220 = 42.33; M1 (1.5) at 24 + 0.55/0.6*220 = 225.67.
        assert!(nll.contains("cx=\"224.00\" cy=\"42.33\""), "{nll}");
        assert!(nll.contains("cx=\"544.00\" cy=\"225.67\""), "{nll}");
        let win = svg(&html, "eval-win");
        // 0.75 on 0..1: y = 24 + 0.25*220 = 79; interval 0.5..0.9: 134 to 46.
        assert!(win.contains("cy=\"79.00\""), "{win}");
        assert!(
            win.contains("y1=\"134.00\" x2=\"544.00\" y2=\"46.00\""),
            "{win}"
        );
        // M0's own level, 50%: a dashed line across the plot at y = 24 + 0.5*220 = 134.
        assert!(
            win.contains(
                "<line class=\"level\" x1=\"64.00\" y1=\"134.00\" x2=\"704.00\" y2=\"134.00\""
            ),
            "{win}"
        );
        assert!(!nll.contains("class=\"level\""), "no level on the NLL plot");
        assert!(html.contains("<td>M1</td><td class=\"n\">1.5000</td><td class=\"n\">300</td>\
            <td class=\"n\">75.0% [50.0%, 90.0%]</td><td class=\"n\">n/a</td><td class=\"n\">0.500</td>\
            <td class=\"n\">0.250</td>"), "{html}");

        // With the base model evaluated too, it comes first: three slots of 640 / 3 px (the
        // base at x = 64 + 106.67, M0 at 384, M1 at 597.33), the base's NLL 2.1 widening the
        // range to 1.5..2.1, padded by 0.06 each side: 1.44..2.16 (0.72).
        m["step0"]["base"] = json!({"eval": {"model": "base", "reference": {"nll": 2.1, "tokens": 300},
            "pairs": [{"rule": "prob", "win_rate": 0.25, "ci95": [0.1, 0.5]}]}});
        let html = render_json(&m);
        let nll = svg(&html, "eval-nll");
        // base (2.1) at 24 + 0.06/0.72*220 = 42.33; M0 (2.0) at 24 + 0.16/0.72*220 = 72.89.
        assert!(nll.contains("cx=\"170.67\" cy=\"42.33\""), "{nll}");
        assert!(nll.contains("cx=\"384.00\" cy=\"72.89\""), "{nll}");
        let win = svg(&html, "eval-win");
        // base: 0.25 -> y = 24 + 0.75*220 = 189; M1 still at 79, now in the third slot.
        assert!(win.contains("cx=\"170.67\" cy=\"189.00\""), "{win}");
        assert!(win.contains("cx=\"597.33\" cy=\"79.00\""), "{win}");
        let (base_row, m0_row) = (
            html.find("<td>base</td>").expect("base row"),
            html.find("<td>M0</td>").expect("M0 row"),
        );
        assert!(base_row < m0_row, "the base first");
        assert!(
            html.contains(
                "<td>base</td><td class=\"n\">2.1000</td><td class=\"n\">300</td>\
            <td class=\"n\">25.0% [10.0%, 50.0%]</td>"
            ),
            "{html}"
        );
        // No evaluation, no section.
        assert!(!render(&sample()).contains("id=\"eval\""));
    }

    #[test]
    fn strings_from_the_metrics_are_escaped() {
        let mut m = sample_json();
        m["model"] = json!("/tmp/<script>alert(\"x\")</script>&.gguf");
        m["pipeline"] = json!("<i>humpback");
        m["dropped"] = json!({"<img src=x onerror=alert(1)>": 1});
        m["rounds"][0]["rating_model"] = json!("1\"><script>");
        m["step0"]["backward"]["version"] = json!("<b>v</b>");
        m["step0"]["eval"] = json!({"model": "<u>M0"});
        let html = render_json(&m);
        assert!(!html.contains("<script"), "a script element got through");
        assert!(!html.contains("<img"));
        assert!(!html.contains("<b>v"));
        assert!(!html.contains("<i>") && !html.contains("<u>"));
        assert!(html.contains("/tmp/&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;.gguf"));
        assert!(html.contains("&lt;img src=x onerror=alert(1)&gt;"));
        assert!(html.contains("1&quot;&gt;&lt;script&gt;"));
        assert!(html.contains("&lt;u&gt;M0"));
    }

    /// A run cut short (nothing but step 0's first model), numbers that are not finite (a
    /// diverged loss, an unmeasured rate) and a round that rated nothing: the page is complete,
    /// with "n/a" where a figure cannot be shown and nothing drawn for it.
    #[test]
    fn missing_and_non_finite_figures_render_as_na() {
        let empty = HumpbackMetrics::default();
        let html = render(&empty);
        for id in ["scores", "acceptance", "loss", "throughput"] {
            svg(&html, id);
        }
        assert!(html.contains("<code>n/a</code>"), "no model path");
        assert!(html.contains("<dt>Acceptance (last round)</dt><dd>n/a</dd>"));
        assert!(html.contains("No round was run.") && html.contains("No model was trained."));
        assert!(html.ends_with("</html>\n"));

        let mut m = sample();
        m.elapsed_secs = f64::NAN;
        m.passages_per_hour = f64::INFINITY;
        m.step0.backward.as_mut().expect("backward").losses = vec![f64::NAN, 2.0, f64::INFINITY];
        m.rounds[1].rated = 0;
        m.rounds[1].curated = 0;
        let html = render(&m);
        assert!(html.contains("<dt>Elapsed</dt><dd>n/a</dd>"));
        assert!(html.contains("<dt>Passages / hour</dt><dd>n/a</dd>"));
        assert!(html.contains("<dt>Acceptance (last round)</dt><dd>n/a</dd>"));
        // The backward curve keeps its one finite point, drawn as a dot at step 2 of 4.
        let loss = svg(&html, "loss");
        assert_eq!(loss.matches("<polyline").count(), 2, "{loss}");
        assert!(loss.contains("<circle cx=\"277.33\""), "{loss}");
        assert!(!html.contains("NaN") && !html.contains(">inf"));
    }

    /// Older `metrics.json` files read with defaults; a round cut short before its training
    /// lists no trained model.
    #[test]
    fn older_metrics_files_render() {
        let m = json!({"rounds": [{"round": 1, "rated": 40, "curated": 10, "acceptance": 0.25}]});
        let html = render_json(&m);
        assert!(html.contains("<dt>Acceptance (last round)</dt><dd>25.0%</dd>"));
        assert!(html.contains("No model was trained."));
        assert!(html.contains("<dt>Passages</dt><dd>0</dd>"));
    }

    #[test]
    fn no_rounds_renders_empty_plots() {
        let mut m = sample();
        m.rounds.clear();
        let html = render(&m);
        assert!(svg(&html, "scores").contains("no data"));
        assert!(svg(&html, "acceptance").contains("no data"));
        assert!(html.contains("No round was run."));
        assert!(html.contains("<dt>Rounds</dt><dd>0</dd>"));
        // Step 0's models are still plotted.
        assert_eq!(svg(&html, "loss").matches("<polyline").count(), 2);
    }

    #[test]
    fn durations_and_numbers_read_well() {
        assert_eq!(fmt_secs(45.0), "45.0 s");
        assert_eq!(fmt_secs(812.5), "13 min 33 s");
        assert_eq!(fmt_secs(7500.0), "2 h 05 min");
        assert_eq!(fmt_num(48.0), "48");
        assert_eq!(fmt_num(212.64), "212.6");
        assert_eq!(fmt_num(2.34567), "2.35");
        assert_eq!(fmt_num(0.1044), "0.104");
        assert_eq!(ticks(0.0, 12.0), vec![0.0, 5.0, 10.0]);
        assert_eq!(ticks(1.0, 4.0), vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(ticks(0.0, 0.2).len(), 5);
        assert_eq!(ticks(2.0, 2.0), vec![2.0]);
        assert_eq!(tick_label(2.5, 0.5), "2.5");
        assert_eq!(tick_label(3.0, 0.5), "3.0");
        assert_eq!(tick_label(10.0, 5.0), "10");
        assert_eq!(tick_label_pct(0.15, 0.05), "15.0%");
        assert_eq!(tick_label_pct(0.004, 0.002), "0.4%");
    }

    #[test]
    fn write_report_writes_the_rendered_page_atomically() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = sample();
        let path = write_report(dir.path(), &m).expect("write");
        assert_eq!(path, dir.path().join("report.html"));
        assert_eq!(std::fs::read_to_string(&path).expect("read"), render(&m));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("report.html")]);
        let missing = dir.path().join("no/such/dir");
        assert!(matches!(
            write_report(&missing, &m),
            Err(ReportError::Write { .. })
        ));
    }
}
