//! `backflow warc-pack DIR --out FILE.warc.gz`: a folder of HTML pages as a real WARC/1.0 file.

use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;

/// Flags of `backflow warc-pack`.
#[derive(Args, Debug)]
pub struct WarcPackArgs {
    /// The folder of .html/.htm pages (read recursively, in name order).
    pub dir: PathBuf,
    /// The WARC file to write (gzip, one member per record, when it ends in .gz).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// Runs `warc-pack`.
pub fn run(args: WarcPackArgs) -> Result<()> {
    let summary = crate::formats::warc_writer::pack_html_dir(&args.dir, &args.out)
        .with_context(|| format!("packing {} into {}", args.dir.display(), args.out.display()))?;
    eprintln!(
        "packed {} pages ({:.1} MB of HTML) into {} ({:.1} MB)",
        summary.pages,
        summary.input_bytes as f64 / 1e6,
        summary.output.display(),
        summary.output_bytes as f64 / 1e6
    );
    Ok(())
}
