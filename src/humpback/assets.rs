//! The loop's default assets: what `scripts/fetch-assets.sh` caches, found where it caches them
//! (`$BACKFLOW_CACHE`, else `~/.cache/backflow`), so that `backflow run humpback` with no flags
//! runs the method on real data.

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// The base model: SmolLM2-135M-Instruct.
pub const MODEL: &str = "model/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The seed data: Self-Instruct's 175 human-written seed tasks.
pub const SEED: &str = "seed/seed_tasks.jsonl";
/// The corpus: the Python 3.11 documentation's HTML pages.
pub const PAGES: &str = "pages/python3.11";

/// The folder of cached assets.
pub fn asset_cache() -> PathBuf {
    std::env::var_os("BACKFLOW_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/backflow")))
        .unwrap_or_else(|| PathBuf::from(".cache/backflow"))
}

/// `given`, or the cached asset `default` (one of the constants above), or an error that says
/// how to fetch it; `flag` names the flag that would have given it.
pub fn or_default(given: Option<PathBuf>, default: &str, flag: &str) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p);
    }
    let p = asset_cache().join(default);
    if !p.exists() {
        bail!(
            "no {flag} given and the default {} is missing: run scripts/fetch-assets.sh first",
            p.display()
        );
    }
    Ok(p)
}
