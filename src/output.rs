//! Output files: JSONL written atomically, and the JSON lines users read.

use crate::records::{Candidate, Passage, Rating, RatingSample};
use serde::Serialize;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// One passage as a line of the segment output: flat, with the provenance users grep for.
#[derive(Debug, Serialize)]
pub struct PassageLine<'a> {
    /// The passage text.
    pub text: &'a str,
    /// The page's URL.
    pub url: &'a str,
    /// The page's record id.
    pub record_id: &'a str,
    /// The input file.
    pub file: &'a str,
    /// Byte offset of the record in the input file.
    pub offset: u64,
    /// Headers from the page's top to the passage's.
    pub header_path: &'a [String],
    /// Hash of the normalised text (hex).
    pub content_hash: String,
    /// The passage's id (hex).
    pub id: String,
}

impl<'a> From<&'a Passage> for PassageLine<'a> {
    fn from(p: &'a Passage) -> Self {
        PassageLine {
            text: &p.text,
            url: &p.url,
            record_id: &p.record_id,
            file: &p.origin.file,
            offset: p.origin.offset,
            header_path: &p.header_path,
            content_hash: format!("{:016x}", p.content_hash),
            id: format!("{:016x}", p.id),
        }
    }
}

/// What dedup needs of a passage line read back (see [`PassageLine`]).
#[derive(Debug, serde::Deserialize)]
pub struct WrittenPassage {
    /// The passage text.
    pub text: String,
    /// Hash of the normalised text (hex).
    pub content_hash: String,
    /// The passage's id (hex).
    pub id: String,
}

/// Where a candidate's passage came from, as the output lines give it.
#[derive(Debug, Serialize)]
pub struct SourceLine<'a> {
    /// The passage's id (hex).
    pub passage_id: String,
    /// The page's URL.
    pub url: &'a str,
    /// The input file.
    pub file: &'a str,
    /// Byte offset of the record in the input file.
    pub offset: u64,
    /// The backward model that wrote the instruction.
    pub augment_version: &'a str,
}

impl<'a> From<&'a Candidate> for SourceLine<'a> {
    fn from(c: &'a Candidate) -> Self {
        SourceLine {
            passage_id: format!("{:016x}", c.passage.id),
            url: &c.passage.url,
            file: &c.passage.origin.file,
            offset: c.passage.origin.offset,
            augment_version: &c.augment_version,
        }
    }
}

/// One candidate (a line of `candidates-*.jsonl`): the generated instruction and its passage.
#[derive(Debug, Serialize)]
pub struct CandidateLine<'a> {
    /// The passage's id (hex).
    pub passage_id: String,
    /// The instruction M_yx wrote.
    pub instruction: &'a str,
    /// The passage: the answer.
    pub output: &'a str,
    /// Provenance.
    pub source: SourceLine<'a>,
}

impl<'a> From<&'a Candidate> for CandidateLine<'a> {
    fn from(c: &'a Candidate) -> Self {
        CandidateLine {
            passage_id: format!("{:016x}", c.passage.id),
            instruction: &c.instruction,
            output: &c.passage.text,
            source: SourceLine::from(c),
        }
    }
}

/// Why a sampled rating answer has no score.
#[derive(Debug, Serialize)]
pub struct ScoreErrorLine<'a> {
    /// `no_score`, `not_a_number` or `out_of_range`.
    pub kind: &'static str,
    /// What was read where the score should be.
    pub value: Option<&'a str>,
}

/// One sampled rating answer: its raw text, the score read from it or why none was (then the
/// forced score, `null` when there was no room for the choice), and the forced choice's
/// probabilities with their expected value.
#[derive(Debug, Serialize)]
pub struct SampleLine<'a> {
    /// The model's whole answer.
    pub raw: &'a str,
    /// The score read from it.
    pub score: Option<u8>,
    /// Why no score could be read (absent when one was).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ScoreErrorLine<'a>>,
    /// The forced score, for an answer without one (absent when the answer had a score).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forced: Option<Option<u8>>,
    /// The probabilities of `1`..`5` after the answer.
    pub forced_probs: Option<&'a [f32]>,
    /// Their expected value.
    pub expected: Option<f64>,
}

impl<'a> From<&'a RatingSample> for SampleLine<'a> {
    fn from(s: &'a RatingSample) -> Self {
        let (score, error, forced) = match &s.score {
            Ok(v) => (Some(*v), None, None),
            Err(e) => (
                None,
                Some(ScoreErrorLine {
                    kind: e.as_str(),
                    value: e.detail(),
                }),
                Some(s.forced),
            ),
        };
        SampleLine {
            raw: &s.raw,
            score,
            error,
            forced,
            forced_probs: s.forced_probs.as_deref(),
            expected: s.expected(),
        }
    }
}

/// One rating (a line of `ratings-*.jsonl`): the pair, the score, the model version, and every
/// sampled answer with its raw text (one without a readable score with the reason, and the
/// forced score if one was asked for).
#[derive(Debug, Serialize)]
pub struct RatingLine<'a> {
    /// The passage's id (hex).
    pub passage_id: String,
    /// The instruction.
    pub instruction: &'a str,
    /// The passage.
    pub output: &'a str,
    /// The (mean) score.
    pub score: Option<f64>,
    /// The graded score.
    pub graded: Option<f64>,
    /// The rating model.
    pub model_version: &'a str,
    /// Every sampled answer.
    pub samples: Vec<SampleLine<'a>>,
    /// Provenance.
    pub source: SourceLine<'a>,
}

impl<'a> From<&'a Rating> for RatingLine<'a> {
    fn from(r: &'a Rating) -> Self {
        RatingLine {
            passage_id: format!("{:016x}", r.candidate.passage.id),
            instruction: &r.candidate.instruction,
            output: &r.candidate.passage.text,
            score: r.score,
            graded: r.graded,
            model_version: &r.model_version,
            samples: r.samples.iter().map(SampleLine::from).collect(),
            source: SourceLine::from(&r.candidate),
        }
    }
}

/// One curated pair (a line of `curated-*.jsonl`): Alpaca format with score and provenance.
#[derive(Debug, Serialize)]
pub struct CuratedLine<'a> {
    /// The instruction.
    pub instruction: &'a str,
    /// Alpaca's input: always empty (the instruction stands alone).
    pub input: &'static str,
    /// The passage: the answer.
    pub output: &'a str,
    /// The (mean) score.
    pub score: Option<f64>,
    /// The graded score.
    pub graded: Option<f64>,
    /// The rating model.
    pub model_version: &'a str,
    /// Provenance.
    pub source: SourceLine<'a>,
}

impl<'a> From<&'a Rating> for CuratedLine<'a> {
    fn from(r: &'a Rating) -> Self {
        CuratedLine {
            instruction: &r.candidate.instruction,
            input: "",
            output: &r.candidate.passage.text,
            score: r.score,
            graded: r.graded,
            model_version: &r.model_version,
            source: SourceLine::from(&r.candidate),
        }
    }
}

/// Writes `lines` as JSONL to `path` atomically: to `path.tmp` first, synced, then renamed.
pub fn atomic_write_jsonl<T: Serialize>(
    path: &Path,
    lines: impl IntoIterator<Item = T>,
) -> anyhow::Result<()> {
    atomic_write(path, |out| {
        for line in lines {
            serde_json::to_writer(&mut *out, &line)?;
            out.write_all(b"\n")?;
        }
        Ok(())
    })
}

/// Where a file is written until it is complete: `path` with `.tmp` appended, beside it (so the
/// rename into place is atomic).
pub fn temp_sibling(path: &Path) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    std::path::PathBuf::from(name)
}

/// Writes a file atomically: `fill` writes to `path.tmp`, which is synced and renamed to `path`.
pub fn atomic_write(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<File>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let tmp = temp_sibling(path);
    let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    fill(&mut out)?;
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()
        .with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

/// The `.jsonl` files in `dir` whose names start with `prefix`: what a job wrote of one kind.
pub fn jsonl_files(dir: &Path, prefix: &str) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with(prefix) && name.ends_with(".jsonl") {
            files.push(path);
        }
    }
    Ok(files)
}

/// Rows of the [`jsonl_files`] of `dir` with `prefix`: what a job's summary counts, read back
/// from what it wrote.
pub fn count_jsonl_rows(dir: &Path, prefix: &str) -> std::io::Result<u64> {
    let mut rows = 0;
    for path in jsonl_files(dir, prefix)? {
        rows += std::fs::read_to_string(&path)?.lines().count() as u64;
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_leaves_only_the_final_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        atomic_write_jsonl(
            &path,
            [serde_json::json!({"a": 1}), serde_json::json!({"b": "x"})],
        )
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"a\":1}\n{\"b\":\"x\"}\n"
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("out.jsonl")]);
    }

    #[test]
    fn failed_fill_never_creates_the_final_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let err = atomic_write(&path, |out| {
            out.write_all(b"{\"half\":")?;
            anyhow::bail!("interrupted")
        });
        assert!(err.is_err());
        assert!(!path.exists());
    }
}
