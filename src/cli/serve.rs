//! `backflow serve --model [NAME=]PATH... [--host 127.0.0.1] [--port 8080]`: the OpenAI-compatible
//! HTTP API ([`crate::serve::openai`]) until Ctrl-C or SIGTERM.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::model::Precision;
use crate::serve::openai::{ApiConfig, ApiServer};
use crate::serve::ServerConfig;

/// Flags of `backflow serve`.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// A model to serve: a GGUF file, an HF folder or an adapter folder (served over its base,
    /// which adapters share), as PATH (its id: the file or folder name) or NAME=PATH. Repeat
    /// for several.
    #[arg(long = "model", value_name = "[NAME=]PATH", required = true)]
    pub models: Vec<String>,
    /// The address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// The port (0: any free one, printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Requests answered at once; more get 503 with Retry-After until one finishes.
    #[arg(long, default_value_t = 64, value_parser = crate::cli::values::at_least_one)]
    pub max_in_flight: usize,
    /// Most requests in one model batch.
    #[arg(long, default_value_t = 32, value_parser = crate::cli::values::at_least_one)]
    pub max_batch: usize,
    /// How long (ms) the first request of a batch waits for others to join it.
    #[arg(long, default_value_t = 20)]
    pub batch_window_ms: u64,
    /// `max_tokens` of a chat request that does not say.
    #[arg(long, default_value_t = 1024, value_parser = crate::cli::values::at_least_one)]
    pub max_tokens: usize,
    /// Weight format (see `backflow generate --help`).
    #[arg(long, value_enum, default_value_t = Precision::backend_default())]
    pub dtype: Precision,
}

/// `NAME=PATH`, or `PATH` named by its file or folder name (without `.gguf`).
fn named(s: &str) -> Result<(String, PathBuf)> {
    if let Some((name, path)) = s.split_once('=') {
        if !name.is_empty() && !path.is_empty() && !PathBuf::from(s).exists() {
            return Ok((name.to_string(), PathBuf::from(path)));
        }
    }
    let path = PathBuf::from(s);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().trim_end_matches(".gguf").to_string())
        .filter(|n| !n.is_empty());
    match name {
        Some(n) => Ok((n, path)),
        None => bail!("--model {s:?}: expected [NAME=]PATH"),
    }
}

/// Runs `backflow serve`.
pub fn run(args: ServeArgs) -> Result<()> {
    let models = args
        .models
        .iter()
        .map(|m| named(m))
        .collect::<Result<Vec<_>>>()?;
    let config = ApiConfig {
        addr: format!("{}:{}", args.host, args.port),
        models,
        max_in_flight: args.max_in_flight,
        default_max_tokens: args.max_tokens,
        server: ServerConfig {
            max_batch: args.max_batch,
            batch_window: Duration::from_millis(args.batch_window_ms),
            precision: args.dtype,
            ..ServerConfig::default()
        },
    };
    let names: Vec<String> = config.models.iter().map(|(n, _)| n.clone()).collect();
    let server = ApiServer::start(config).context("starting the API server")?;
    let stop = server.stopper();
    let pressed = std::sync::atomic::AtomicBool::new(false);
    ctrlc::set_handler(move || {
        // A second press does not wait: a client that never sends its body would hold the
        // first one's wait forever.
        if pressed.swap(true, Ordering::SeqCst) {
            eprintln!("stopped without waiting for the requests in flight");
            std::process::exit(130);
        }
        eprintln!("stopping: answering the requests in flight, then exiting (again: now)");
        stop();
    })
    .context("installing the Ctrl-C handler")?;
    eprintln!(
        "serving {} on http://{}/v1 (OpenAI API: /v1/models, /v1/chat/completions, /v1/completions); Ctrl-C stops",
        names.join(", "),
        server.addr()
    );
    let stats = server.stats();
    server.wait();
    eprintln!(
        "stopped: {} answered, {} refused (busy), {} failed",
        stats.answered.load(Ordering::Relaxed),
        stats.refused.load(Ordering::Relaxed),
        stats.failed.load(Ordering::Relaxed)
    );
    Ok(())
}
