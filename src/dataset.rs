//! A run's curated sets as a Hugging Face dataset folder: `data/curated-rNN.parquet` for each
//! round (zstd pages, row groups of [`ROW_GROUP`] rows) and a `README.md` dataset card whose YAML
//! `configs` the hub and `datasets.load_dataset(DIR)` read: the default config is the last
//! round's set, `round-NN` each round's.
//!
//! The rows are the curated JSONL lines (`curated-r*-*.jsonl`) read back typed, the provenance
//! flattened into columns; a line that does not parse is skipped and counted, never fatal.
//! Each file appears under its name only when complete.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ::parquet::basic::{Compression, ZstdLevel};
use ::parquet::data_type::{ByteArray, ByteArrayType, DoubleType, Int64Type};
use ::parquet::file::properties::WriterProperties;
use ::parquet::file::writer::SerializedFileWriter;
use ::parquet::schema::parser::parse_message_type;
use serde::Deserialize;

use crate::output::temp_sibling;

/// Rows per row group.
pub const ROW_GROUP: usize = 4096;

/// The Parquet schema of a curated set: Alpaca's three columns, the scores, provenance.
const SCHEMA: &str = "message curated {
    REQUIRED BYTE_ARRAY instruction (UTF8);
    REQUIRED BYTE_ARRAY input (UTF8);
    REQUIRED BYTE_ARRAY output (UTF8);
    OPTIONAL DOUBLE score;
    OPTIONAL DOUBLE graded;
    REQUIRED BYTE_ARRAY model_version (UTF8);
    REQUIRED BYTE_ARRAY passage_id (UTF8);
    REQUIRED BYTE_ARRAY url (UTF8);
    REQUIRED BYTE_ARRAY file (UTF8);
    REQUIRED INT64 offset;
    REQUIRED BYTE_ARRAY augment_version (UTF8);
}";

/// Why the dataset could not be written.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The Parquet writer failed.
    #[error("{path}: {source}")]
    Parquet {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: ::parquet::errors::ParquetError,
    },
    /// The run folder holds no curated file.
    #[error("no curated-r*.jsonl in {0}")]
    NoCurated(PathBuf),
}

/// A curated line read back (the shape [`crate::output::CuratedLine`] writes).
#[derive(Debug, Deserialize)]
struct CuratedRow {
    instruction: String,
    #[serde(default)]
    input: String,
    output: String,
    score: Option<f64>,
    graded: Option<f64>,
    model_version: String,
    source: SourceRow,
}

#[derive(Debug, Deserialize)]
struct SourceRow {
    passage_id: String,
    url: String,
    file: String,
    offset: u64,
    augment_version: String,
}

/// What [`write_dataset`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetSummary {
    /// Each round and the rows of its Parquet file.
    pub rounds: Vec<(u32, usize)>,
    /// Lines skipped because they did not parse (file, line number, why), the first few.
    pub skipped: Vec<(PathBuf, usize, String)>,
    /// Lines skipped in all.
    pub skipped_total: usize,
    /// The dataset folder.
    pub out: PathBuf,
}

/// The round of a `curated-rNN-...jsonl` file name.
fn round_of(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("curated-r")?;
    if !name.ends_with(".jsonl") {
        return None;
    }
    rest.split('-').next()?.parse().ok()
}

/// Writes the curated sets of the run folder `run` as a dataset folder `out`.
pub fn write_dataset(run: &Path, out: &Path) -> Result<DatasetSummary, DatasetError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DatasetError::Io { path, source }
    };
    let mut by_round: BTreeMap<u32, Vec<PathBuf>> = BTreeMap::new();
    for entry in std::fs::read_dir(run).map_err(io(run))? {
        let path = entry.map_err(io(run))?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if let Some(r) = name.as_deref().and_then(round_of) {
            by_round.entry(r).or_default().push(path);
        }
    }
    if by_round.is_empty() {
        return Err(DatasetError::NoCurated(run.to_path_buf()));
    }
    let data = out.join("data");
    std::fs::create_dir_all(&data).map_err(io(&data))?;
    let mut summary = DatasetSummary {
        rounds: Vec::new(),
        skipped: Vec::new(),
        skipped_total: 0,
        out: out.to_path_buf(),
    };
    for (round, mut files) in by_round {
        files.sort();
        let path = data.join(format!("curated-r{round:02}.parquet"));
        let rows = write_round(&files, &path, &mut summary)?;
        summary.rounds.push((round, rows));
    }
    let card = out.join("README.md");
    write_atomic(&card, card_text(&summary).as_bytes()).map_err(io(&card))?;
    Ok(summary)
}

/// The dataset card: the YAML `configs` that `load_dataset` reads, and what the files are.
fn card_text(s: &DatasetSummary) -> String {
    let last = s.rounds.last().map_or(0, |r| r.0);
    let mut y = String::from("---\nconfigs:\n");
    y.push_str(&format!(
        "- config_name: default\n  data_files:\n  - split: train\n    path: data/curated-r{last:02}.parquet\n"
    ));
    for (r, _) in &s.rounds {
        y.push_str(&format!(
            "- config_name: round-{r:02}\n  data_files:\n  - split: train\n    path: data/curated-r{r:02}.parquet\n"
        ));
    }
    y.push_str("task_categories:\n- text-generation\ntags:\n- instruction-backtranslation\n- backflow\n---\n\n");
    y.push_str("# Instruction data curated by backflow\n\n");
    y.push_str(
        "Pairs made by instruction backtranslation (Li et al., \"Self-Alignment with Instruction \
         Backtranslation\"): a backward model wrote each `instruction` for a web passage \
         (`output`), the round's model rated the pair (`score`, and `graded`, the expected score), \
         and the pairs over the threshold were kept. `input` is always empty (Alpaca's format). \
         Provenance: `passage_id`, `url`, `file`, `offset`, `augment_version` (the backward \
         model), `model_version` (the rater).\n\n",
    );
    y.push_str("| config | file | rows |\n|---|---|---:|\n");
    for (r, n) in &s.rounds {
        let name = if *r == last {
            format!("default, round-{r:02}")
        } else {
            format!("round-{r:02}")
        };
        y.push_str(&format!(
            "| {name} | data/curated-r{r:02}.parquet | {n} |\n"
        ));
    }
    y
}

/// Writes `bytes` to `path` through its temporary sibling.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = temp_sibling(path);
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// The columns of up to [`ROW_GROUP`] rows.
#[derive(Default)]
struct Columns {
    instruction: Vec<ByteArray>,
    input: Vec<ByteArray>,
    output: Vec<ByteArray>,
    score: Vec<f64>,
    score_def: Vec<i16>,
    graded: Vec<f64>,
    graded_def: Vec<i16>,
    model_version: Vec<ByteArray>,
    passage_id: Vec<ByteArray>,
    url: Vec<ByteArray>,
    file: Vec<ByteArray>,
    offset: Vec<i64>,
    augment_version: Vec<ByteArray>,
}

impl Columns {
    fn push(&mut self, r: CuratedRow) {
        let b = |s: String| ByteArray::from(s.into_bytes());
        self.instruction.push(b(r.instruction));
        self.input.push(b(r.input));
        self.output.push(b(r.output));
        self.score_def.push(i16::from(r.score.is_some()));
        self.score.extend(r.score);
        self.graded_def.push(i16::from(r.graded.is_some()));
        self.graded.extend(r.graded);
        self.model_version.push(b(r.model_version));
        self.passage_id.push(b(r.source.passage_id));
        self.url.push(b(r.source.url));
        self.file.push(b(r.source.file));
        self.offset
            .push(i64::try_from(r.source.offset).unwrap_or(i64::MAX));
        self.augment_version.push(b(r.source.augment_version));
    }

    fn len(&self) -> usize {
        self.instruction.len()
    }

    /// Writes the rows as one row group, in the schema's column order.
    fn flush(
        &mut self,
        w: &mut SerializedFileWriter<File>,
    ) -> Result<(), ::parquet::errors::ParquetError> {
        if self.len() == 0 {
            return Ok(());
        }
        let c = std::mem::take(self);
        let mut rg = w.next_row_group()?;
        let strings = [&c.instruction, &c.input, &c.output];
        for values in strings {
            let mut col = rg.next_column()?.ok_or_else(missing_column)?;
            col.typed::<ByteArrayType>()
                .write_batch(values, None, None)?;
            col.close()?;
        }
        for (values, def) in [(&c.score, &c.score_def), (&c.graded, &c.graded_def)] {
            let mut col = rg.next_column()?.ok_or_else(missing_column)?;
            col.typed::<DoubleType>()
                .write_batch(values, Some(def), None)?;
            col.close()?;
        }
        for values in [&c.model_version, &c.passage_id, &c.url, &c.file] {
            let mut col = rg.next_column()?.ok_or_else(missing_column)?;
            col.typed::<ByteArrayType>()
                .write_batch(values, None, None)?;
            col.close()?;
        }
        let mut col = rg.next_column()?.ok_or_else(missing_column)?;
        col.typed::<Int64Type>()
            .write_batch(&c.offset, None, None)?;
        col.close()?;
        let mut col = rg.next_column()?.ok_or_else(missing_column)?;
        col.typed::<ByteArrayType>()
            .write_batch(&c.augment_version, None, None)?;
        col.close()?;
        rg.close()?;
        Ok(())
    }
}

fn missing_column() -> ::parquet::errors::ParquetError {
    ::parquet::errors::ParquetError::General("the schema has fewer columns than written".into())
}

/// Writes one round's curated files as one Parquet file; returns its rows.
fn write_round(
    files: &[PathBuf],
    path: &Path,
    summary: &mut DatasetSummary,
) -> Result<usize, DatasetError> {
    let pq = |source| DatasetError::Parquet {
        path: path.to_path_buf(),
        source,
    };
    let schema = Arc::new(parse_message_type(SCHEMA).map_err(pq)?);
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .set_created_by("backflow".into())
            .build(),
    );
    let tmp = temp_sibling(path);
    let file = File::create(&tmp).map_err(|source| DatasetError::Io {
        path: tmp.clone(),
        source,
    })?;
    let mut writer = SerializedFileWriter::new(file, schema, props).map_err(pq)?;
    let mut cols = Columns::default();
    let mut rows = 0;
    for f in files {
        let reader = File::open(f).map_err(|source| DatasetError::Io {
            path: f.clone(),
            source,
        })?;
        for (n, line) in BufReader::new(reader).lines().enumerate() {
            let line = line.map_err(|source| DatasetError::Io {
                path: f.clone(),
                source,
            })?;
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<CuratedRow>(&line) {
                Ok(row) => {
                    cols.push(row);
                    rows += 1;
                    if cols.len() >= ROW_GROUP {
                        cols.flush(&mut writer).map_err(pq)?;
                    }
                }
                Err(e) => {
                    summary.skipped_total += 1;
                    if summary.skipped.len() < 5 {
                        summary.skipped.push((f.clone(), n + 1, e.to_string()));
                    }
                }
            }
        }
    }
    cols.flush(&mut writer).map_err(pq)?;
    writer.close().map_err(pq)?;
    std::fs::rename(&tmp, path).map_err(|source| DatasetError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(rows)
}
