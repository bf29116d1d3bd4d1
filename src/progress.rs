//! Progress of one process: counters shared by its workers, shown as a progress bar on a
//! terminal (indicatif) or as plain log lines otherwise. Also carries the process's fatal error,
//! if any, so that an operator can end the job cleanly instead of panicking.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Counters of one process.
#[derive(Debug, Default)]
pub struct Progress {
    bytes: AtomicU64,
    files: AtomicU64,
    passages: AtomicU64,
    written: Mutex<Vec<(String, u64)>>,
    status: Mutex<String>,
    fatal: Mutex<Option<String>>,
    failed: AtomicBool,
}

impl Progress {
    /// Input bytes consumed.
    pub fn add_bytes(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }
    /// One input file finished.
    pub fn file_done(&self) {
        self.files.fetch_add(1, Ordering::Relaxed);
    }
    /// Passages written.
    pub fn add_passages(&self, n: u64) {
        self.passages.fetch_add(n, Ordering::Relaxed);
    }
    /// Records of `kind` written (candidates, ratings...), shown after the passages.
    pub fn add_written(&self, kind: &str, n: u64) {
        self.update_count(kind, |c| *c += n);
    }
    /// Sets the count of `kind` (a figure polled from elsewhere, such as the model's answers).
    pub fn set_count(&self, kind: &str, n: u64) {
        self.update_count(kind, |c| *c = n);
    }
    /// Applies `f` to the count of `kind` (starting at 0), keeping kinds in first-seen order.
    fn update_count(&self, kind: &str, f: impl FnOnce(&mut u64)) {
        if let Ok(mut w) = self.written.lock() {
            match w.iter_mut().find(|(k, _)| k == kind) {
                Some(e) => f(&mut e.1),
                None => {
                    let mut c = 0;
                    f(&mut c);
                    w.push((kind.to_owned(), c));
                }
            }
        }
    }
    /// What the job is doing now (e.g. "training M1"), shown at the end of the progress line.
    pub fn set_status(&self, status: String) {
        if let Ok(mut s) = self.status.lock() {
            *s = status;
        }
    }
    /// The progress line's message: files, passages, other records written, and the status.
    pub fn message(&self) -> String {
        let (_, files, passages) = self.snapshot();
        let mut m = format!("{files} files, {passages} passages");
        if let Ok(w) = self.written.lock() {
            for (k, n) in w.iter() {
                m.push_str(&format!(", {n} {k}"));
            }
        }
        if let Ok(s) = self.status.lock() {
            if !s.is_empty() {
                m.push_str(&format!("; {s}"));
            }
        }
        m
    }
    /// Records a fatal error (the first one wins); ingestion stops and the job fails at the end.
    pub fn fail(&self, message: String) {
        log::error!("{message}");
        if let Ok(mut slot) = self.fatal.lock() {
            slot.get_or_insert(message);
        }
        self.failed.store(true, Ordering::SeqCst);
    }
    /// Whether a fatal error happened.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }
    /// The fatal error, if any.
    pub fn fatal(&self) -> Option<String> {
        self.fatal.lock().ok().and_then(|s| s.clone())
    }
    /// (bytes, files, passages) so far.
    pub fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.bytes.load(Ordering::Relaxed),
            self.files.load(Ordering::Relaxed),
            self.passages.load(Ordering::Relaxed),
        )
    }
}

/// Shows progress until dropped.
pub struct Reporter {
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Reporter {
    /// Starts showing `progress` of a job reading `total_bytes` (0 when unknown, as with `--follow`).
    pub fn start(label: &str, progress: Arc<Progress>, total_bytes: u64, quiet: bool) -> Reporter {
        let done = Arc::new(AtomicBool::new(false));
        let thread = (!quiet).then(|| {
            let done = done.clone();
            let label = label.to_owned();
            std::thread::spawn(move || report(&label, &progress, total_bytes, &done))
        });
        Reporter { done, thread }
    }
}

impl std::ops::Drop for Reporter {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn report(label: &str, progress: &Progress, total: u64, done: &AtomicBool) {
    let started = Instant::now();
    if std::io::stderr().is_terminal() {
        let bar = if total > 0 {
            ProgressBar::new(total)
        } else {
            ProgressBar::new_spinner()
        };
        let template = if total > 0 {
            "{prefix} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}"
        } else {
            "{prefix} [{elapsed_precise}] {spinner} {bytes} {binary_bytes_per_sec} {msg}"
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style);
        }
        bar.set_prefix(label.to_owned());
        while !done.load(Ordering::SeqCst) {
            bar.set_position(progress.snapshot().0);
            bar.set_message(progress.message());
            std::thread::sleep(Duration::from_millis(100));
        }
        bar.set_position(progress.snapshot().0);
        bar.finish_with_message(progress.message());
    } else {
        let mut last = Instant::now();
        while !done.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
            if last.elapsed() >= Duration::from_secs(5) {
                last = Instant::now();
                let (bytes, _, _) = progress.snapshot();
                let secs = started.elapsed().as_secs_f64().max(1e-9);
                log::info!(
                    "{label} [{secs:.0}s]: {:.1} MB read ({:.1} MB/s){}, {}",
                    bytes as f64 / 1e6,
                    bytes as f64 / 1e6 / secs,
                    if total > 0 {
                        format!(" of {:.1} MB", total as f64 / 1e6)
                    } else {
                        String::new()
                    },
                    progress.message(),
                );
            }
        }
    }
}
