//! The run report opened in a real headless browser: Debian's chromium, unpacked without root by
//! `scripts/fetch-assets.sh chromium` into the assets cache. The browser parses the page as any
//! reader's would: the DOM it dumps must hold the four plots and the key figures, strings from the
//! metrics must stay text (no element injected), and its screenshot must show the bars' colours.
//!
//! Without the browser the tests skip with a message, unless `BACKFLOW_REQUIRE_ASSETS` is set
//! (scripts/test.sh sets it): then they fail.

mod common;

use backflow::report::{render, write_report};
use serde_json::{json, Value};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The first two colours of the report's palette (Tableau 10 blue and orange): rounds 1 and 2.
const ROUND1_RGB: [u8; 3] = [0x4e, 0x79, 0xa7];
const ROUND2_RGB: [u8; 3] = [0xf2, 0x8e, 0x2b];

/// The unpacked browser's wrapper, or `None` (then the test says so and passes vacuously, only
/// when assets are not required).
fn browser() -> Option<PathBuf> {
    let dir = common::cache_dir().join("chromium");
    let wrapper = dir.join("run-chromium");
    if dir.join(".complete").exists() && wrapper.exists() {
        return Some(wrapper);
    }
    let required =
        std::env::var("BACKFLOW_REQUIRE_ASSETS").is_ok_and(|v| !v.is_empty() && v != "0");
    if required {
        panic!(
            "{} missing: run scripts/fetch-assets.sh chromium",
            wrapper.display()
        );
    }
    eprintln!(
        "skipping: {} missing (run scripts/fetch-assets.sh chromium)",
        wrapper.display()
    );
    None
}

/// A run's metrics as `backflow run humpback` writes them, read back as the typed record.
fn metrics() -> backflow::run_records::HumpbackMetrics {
    serde_json::from_value(metrics_json()).expect("a metrics.json")
}

/// A run's `metrics.json`: three rounds, realistic loss curves, and strings that would be
/// markup if the report did not escape them.
fn metrics_json() -> Value {
    // A decaying loss with some noise from a fixed recurrence: a real curve's shape.
    let curve = |start: f64, end: f64, steps: usize, seed: u64| -> Vec<f64> {
        let mut x = seed;
        (0..steps)
            .map(|i| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let noise = ((x >> 33) as f64 / (1u64 << 31) as f64 - 0.5) * 0.15;
                let t = i as f64 / (steps - 1) as f64;
                end + (start - end) * (-4.0 * t).exp() + noise
            })
            .collect()
    };
    json!({
        "pipeline": "humpback",
        "model": "/models/<script>alert('x')</script>/SmolLM2-135M-Instruct.Q4_1.gguf",
        "elapsed_secs": 812.5,
        "passages": 48,
        "passages_per_hour": 212.6,
        "step0": {
            "backward": {"version": "ab12c0ffee5511aa", "reused": false,
                         "losses": curve(3.1, 1.2, 120, 1), "tokens_per_sec": 40.1, "secs": 300.2},
            "forward": {"version": "cd34c0ffee5511bb", "reused": false,
                        "losses": curve(3.0, 1.0, 120, 2), "tokens_per_sec": 41.0, "secs": 290.0}
        },
        "rounds": [
            {"round": 1, "rating_model": "cd34c0ffee5511bb", "rated": 48, "curated": 5,
             "acceptance": 0.104, "unparsed": 12,
             "score_histogram": {"1": 3, "2": 10, "3": 12, "4": 6, "5": 5, "unparsed": 12},
             "train": {"version": "ef56c0ffee5511cc", "reused": false, "losses": curve(1.4, 0.9, 60, 3),
                       "tokens_per_sec": 40.0, "secs": 100.0,
                       "examples": {"seed": 175, "augmented": 5}}},
            {"round": 2, "rating_model": "ef56c0ffee5511cc", "rated": 47, "curated": 9,
             "acceptance": 0.1915, "unparsed": 6,
             "score_histogram": {"1": 2, "2": 8, "3": 11, "4": 12, "5": 9, "unparsed": 6},
             "train": {"version": "0a1bc0ffee5511dd", "reused": true, "losses": curve(1.3, 0.8, 60, 4),
                       "tokens_per_sec": 39.5, "secs": 98.0,
                       "examples": {"seed": 175, "augmented": 9}}},
            {"round": 3, "rating_model": "0a1bc0ffee5511dd", "rated": 48, "curated": 11,
             "acceptance": 0.229, "unparsed": 3,
             "score_histogram": {"1": 1, "2": 7, "3": 12, "4": 14, "5": 11, "unparsed": 3}}
        ],
        "throughput": {
            "augment": {"prompts": 48, "prompts_per_sec": 0.5, "new_tokens_per_sec": 30.0, "cache_hits": 0},
            "rate": {"prompts": 144, "prompts_per_sec": 0.7, "new_tokens_per_sec": 50.0, "cache_hits": 48}
        },
        "dropped": {"too_short": 31, "near_duplicate": 12, "<img src=x onerror=alert(1)>": 1}
    })
}

/// Runs the browser with `args` (a 60 s limit), stdout into `stdout`; panics with its stderr on
/// failure.
fn run_browser(wrapper: &Path, args: &[String], stdout: &Path) {
    let err_path = stdout.with_extension("stderr");
    let mut child = Command::new(wrapper)
        .args(args)
        .stdin(Stdio::null())
        .stdout(File::create(stdout).expect("stdout file"))
        .stderr(File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("starting chromium");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting on chromium") {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium ran over 60 s: {}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "chromium failed ({status}): {}",
        std::fs::read_to_string(&err_path).unwrap_or_default()
    );
}

/// The report of [`metrics`] written into a fresh folder, and its `file://` URL.
fn report() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_report(dir.path(), &metrics()).expect("writing the report");
    let url = format!("file://{}", path.display());
    (dir, url)
}

#[test]
fn report_dom_in_a_headless_browser() {
    let Some(wrapper) = browser() else { return };
    let (dir, url) = report();
    let dom_path = dir.path().join("dom.html");
    run_browser(&wrapper, &["--dump-dom".into(), url], &dom_path);
    let dom = std::fs::read_to_string(&dom_path).expect("reading the dumped DOM");

    // The browser serialises what it parsed: its DOM differs from our text (self-closed SVG
    // elements come back with end tags), so a match below is the browser's reading, not ours.
    assert!(
        dom.contains("</rect>"),
        "not a DOM serialisation: {dom:.300}"
    );
    for id in ["scores", "acceptance", "loss", "throughput"] {
        let at = dom
            .find(&format!("<svg id=\"{id}\""))
            .unwrap_or_else(|| panic!("no svg #{id} in the DOM"));
        let svg = &dom[at..at + dom[at..].find("</svg>").expect("svg closed")];
        assert!(svg.contains("<title>"), "svg #{id} has no title");
    }
    // The scores plot: 3 rounds x 6 categories (no zero count) + 3 legend swatches, all parsed as
    // SVG rectangles; the loss plot: 4 trained models, 4 curves.
    let section = |id: &str| {
        let at = dom.find(&format!("<svg id=\"{id}\"")).unwrap_or_default();
        &dom[at..at + dom[at..].find("</svg>").unwrap_or_default()]
    };
    assert_eq!(section("scores").matches("<rect ").count(), 21);
    assert_eq!(section("loss").matches("<polyline ").count(), 4);

    // Key figures, as rendered text.
    for text in [
        "<dd>13 min 33 s</dd>",
        "<dd>48</dd>",
        "<dd>212.6</dd>",
        "<dd>3</dd>",
        "<dd>22.9%</dd>",
        "<dd>44</dd>",
        ">10.4%</text>",
        ">19.1%</text>",
        "<td>too_short</td>",
    ] {
        assert!(dom.contains(text), "the DOM lacks {text}");
    }

    // Strings from the metrics stayed text: the browser created no script or img element.
    assert!(!dom.contains("<script"), "a script element was injected");
    assert!(!dom.contains("<img"), "an img element was injected");
    assert!(dom.contains("/models/&lt;script&gt;alert('x')&lt;/script&gt;/SmolLM2"));
    assert!(dom.contains("&lt;img src=x onerror=alert(1)&gt;"));
}

#[test]
fn report_screenshot_in_a_headless_browser() {
    let Some(wrapper) = browser() else { return };
    let (dir, url) = report();
    let png_path = dir.path().join("report.png");
    let (width, height) = (1000u32, 1400u32);
    run_browser(
        &wrapper,
        &[
            format!("--screenshot={}", png_path.display()),
            format!("--window-size={width},{height}"),
            url,
        ],
        &dir.path().join("screenshot.out"),
    );
    // To look at them: BACKFLOW_REPORT_KEEP=<folder> keeps the page and its screenshot there.
    if let Some(keep) = std::env::var_os("BACKFLOW_REPORT_KEEP") {
        let keep = PathBuf::from(keep);
        std::fs::create_dir_all(&keep).expect("keep folder");
        std::fs::copy(dir.path().join("report.html"), keep.join("report.html")).expect("keep page");
        std::fs::copy(&png_path, keep.join("report.png")).expect("keep screenshot");
    }
    let bytes = std::fs::read(&png_path).expect("no screenshot written");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");

    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .expect("PNG header");
    let mut buf = vec![0; reader.output_buffer_size().expect("buffer size")];
    let frame = reader.next_frame(&mut buf).expect("PNG data");
    assert_eq!((frame.width, frame.height), (width, height));
    let channels = match frame.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("unexpected colour type {other:?}"),
    };
    assert_eq!(frame.bit_depth, png::BitDepth::Eight);
    let pixels: Vec<[u8; 3]> = buf[..frame.buffer_size()]
        .chunks_exact(channels)
        .map(|p| [p[0], p[1], p[2]])
        .collect();
    let count = |rgb: [u8; 3]| pixels.iter().filter(|p| **p == rgb).count();
    let white = count([255, 255, 255]);
    let total = pixels.len();
    // A page, not a blank: mostly white background, but far from all of it.
    assert!(
        white > total / 2 && white < total * 97 / 100,
        "white {white} of {total}"
    );
    let mut distinct: Vec<[u8; 3]> = pixels.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert!(distinct.len() > 20, "only {} colours", distinct.len());
    // The bars are drawn in the rounds' colours (both plots lie in the first 1400 px of the page).
    // Round 1's score bars: 48 passages / 14 (the largest count) * 220 px high in all, 0.8 * 640/6
    // / 3 = 28.4 px wide: 21,500 px; its acceptance bar 0.104/0.229 * 220 px x 128 px: 12,800 px.
    // Round 2's: 48/14 * 220 x 28.4 = 21,500 px and 0.1915/0.229 * 220 x 128 = 23,500 px. Less
    // the anti-aliased edges, and with room for a font's or layout's difference, more than 25,000.
    let round1 = count(ROUND1_RGB);
    let round2 = count(ROUND2_RGB);
    assert!(round1 > 25_000, "round 1's colour on {round1} pixels");
    assert!(round2 > 25_000, "round 2's colour on {round2} pixels");
}

/// The page the browser shows is the one [`render`] returns: the test above reads the same file.
#[test]
fn report_file_is_the_rendered_page() {
    let (dir, _) = report();
    let written = std::fs::read_to_string(dir.path().join("report.html")).expect("report");
    assert_eq!(written, render(&metrics()));
}
