//! A persistent answer cache, so a job killed with `kill -9` and started again never recomputes
//! an answer it already had.
//!
//! One file per process (two processes must not share one: appends from both would interleave).
//! The key is a 128-bit xxh3 hash of everything that decides the answer: model version, the
//! conversation (role + content), `max_new_tokens` and the sampling settings; the value is the
//! answer text and its token counts.
//!
//! File format: an 8-byte magic, then length-prefixed records with a checksum:
//!
//! ```text
//! magic   b"BFANSWR1"
//! record  len: u32 LE | check: u64 LE = xxh3_64(len bytes ++ payload) | payload: len bytes
//! payload key: u128 LE | prompt_tokens: u64 LE | new_tokens: u64 LE | text: UTF-8 (the rest)
//! ```
//!
//! Why binary records and not JSONL: a kill can cut the last write anywhere, and a filesystem that
//! crashed can leave a tail of zeros or stale bytes. A checksum tells every such tail from a real
//! record (a torn JSON line is usually, but not always, invalid JSON: a line cut inside a number
//! can still parse, with the wrong value), and the text needs no escaping. The file is for
//! this program, not for people; the answers people read are in the job's JSONL outputs.
//!
//! On open, every good record is loaded; from the first bad one on, the rest of the file is
//! dropped (appends only ever go at the end, so the first bad record is where a write was cut)
//! and the file is truncated there, so new records follow the last good one.

use crate::model::chat::Message;
use crate::model::sampling::Sampling;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use thiserror::Error;
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

/// The first bytes of every answer cache file (the digit is the format version).
const MAGIC: &[u8; 8] = b"BFANSWR1";
/// Bytes before a record's payload: length and checksum.
const RECORD_HEADER: usize = 4 + 8;
/// Bytes of a payload before the text: key and the two token counts.
const PAYLOAD_FIXED: usize = 16 + 8 + 8;
/// Largest payload accepted. An answer is a few KiB; a length beyond this is a corrupt record,
/// and refusing it keeps a corrupt length from asking for gigabytes.
const MAX_PAYLOAD: usize = 64 << 20;

/// The key of one answer: see [`answer_key`].
pub type AnswerKey = u128;

/// Why the answer cache could not be opened.
#[derive(Debug, Error)]
pub enum CacheError {
    /// Reading, creating or truncating the file failed.
    #[error("answer cache {path}: {source}")]
    Io {
        /// The cache file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The file exists but is not an answer cache; it is left untouched rather than truncated.
    #[error("{path} is not a backflow answer cache (it does not start with {magic:?})")]
    Foreign {
        /// The file.
        path: PathBuf,
        /// The magic it should start with.
        magic: String,
    },
}

/// A cached answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedAnswer {
    /// The generated text.
    pub text: String,
    /// Prompt length in tokens when it was generated.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub new_tokens: usize,
}

/// The cache key of a request: xxh3-128 over the model version, every message (role and
/// content), `max_new_tokens` and the sampling settings (bit patterns of the floats).
///
/// Every variable-length field is length-prefixed, so no two different requests serialise to
/// the same bytes. Greedy sampling hashes as one value whatever its `top_p` and `seed`: argmax
/// decoding reads neither, so those requests share an answer.
pub fn answer_key(
    version: &str,
    messages: &[Message],
    max_new_tokens: usize,
    sampling: &Sampling,
) -> AnswerKey {
    let mut h = Xxh3::new();
    // A domain tag: a change of what goes into the key must change every key.
    h.update(b"backflow answer key v1\0");
    put_str(&mut h, version);
    h.update(&(messages.len() as u64).to_le_bytes());
    for m in messages {
        put_str(&mut h, m.role.as_str());
        put_str(&mut h, &m.content);
    }
    h.update(&(max_new_tokens as u64).to_le_bytes());
    if sampling.is_greedy() {
        h.update(b"greedy");
    } else {
        h.update(b"sample");
        h.update(&sampling.temperature.to_bits().to_le_bytes());
        h.update(&sampling.top_p.to_bits().to_le_bytes());
        h.update(&sampling.seed.to_le_bytes());
    }
    h.digest128()
}

fn put_str(h: &mut Xxh3, s: &str) {
    h.update(&(s.len() as u64).to_le_bytes());
    h.update(s.as_bytes());
}

/// The answers of earlier runs and this one, kept in memory and appended to a file.
pub struct AnswerCache {
    path: PathBuf,
    entries: HashMap<AnswerKey, CachedAnswer>,
    /// `None` once a write failed: appending after a half-written record would put good
    /// records behind a bad one, where the next start would drop them.
    writer: Option<BufWriter<File>>,
    loaded: usize,
    dropped_bytes: u64,
}

impl std::fmt::Debug for AnswerCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnswerCache")
            .field("path", &self.path)
            .field("entries", &self.entries.len())
            .field("writing", &self.writer.is_some())
            .finish()
    }
}

impl AnswerCache {
    /// Opens (or creates, with its parent folders) the cache file at `path`, loads every complete
    /// record, drops a torn or corrupt tail (truncating the file to the last good record) and
    /// gets ready to append. Fails on I/O errors and on a file that is not an answer cache.
    pub fn open(path: &Path) -> Result<AnswerCache, CacheError> {
        let io = |source| CacheError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;

        let (entries, loaded, good_end) = if bytes.len() < MAGIC.len() {
            // Empty, or a kill cut the very first write: start afresh. Anything else this
            // short is someone else's file.
            if !MAGIC.starts_with(&bytes) {
                return Err(foreign(path));
            }
            file.set_len(0).map_err(io)?;
            file.seek(SeekFrom::Start(0)).map_err(io)?;
            file.write_all(MAGIC).map_err(io)?;
            (HashMap::new(), 0, MAGIC.len())
        } else if &bytes[..MAGIC.len()] != MAGIC {
            return Err(foreign(path));
        } else {
            parse(&bytes)
        };
        let dropped_bytes = bytes.len().saturating_sub(good_end) as u64;
        if dropped_bytes > 0 {
            file.set_len(good_end as u64).map_err(io)?;
            log::warn!(
                "answer cache {}: dropped {dropped_bytes} bytes of a torn or corrupt tail",
                path.display()
            );
        }
        file.seek(SeekFrom::Start(good_end as u64)).map_err(io)?;
        log::info!(
            "answer cache {}: loaded {loaded} answers ({} distinct), dropped {dropped_bytes} bytes",
            path.display(),
            entries.len()
        );
        Ok(AnswerCache {
            path: path.to_owned(),
            entries,
            writer: Some(BufWriter::new(file)),
            loaded,
            dropped_bytes,
        })
    }

    /// The cache file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The answer stored under `key`, if any.
    pub fn get(&self, key: AnswerKey) -> Option<&CachedAnswer> {
        self.entries.get(&key)
    }

    /// Distinct answers held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no answer is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Records read from the file when it was opened (duplicates included).
    pub fn loaded(&self) -> usize {
        self.loaded
    }

    /// Bytes of torn or corrupt tail dropped when the file was opened.
    pub fn dropped_bytes(&self) -> u64 {
        self.dropped_bytes
    }

    /// Whether new answers still reach the file (false after a write error).
    pub fn is_persisting(&self) -> bool {
        self.writer.is_some()
    }

    /// Keeps `answer` under `key` and appends it to the file's write buffer (see
    /// [`AnswerCache::flush`]). A key already held is neither replaced nor written again; returns
    /// whether the answer was new. A write error is logged and stops later writes; the answer
    /// is still kept in memory, and the job goes on.
    pub fn insert(&mut self, key: AnswerKey, answer: CachedAnswer) -> bool {
        if self.entries.contains_key(&key) {
            return false;
        }
        if let Some(w) = self.writer.as_mut() {
            match encode(key, &answer) {
                Some(record) => {
                    if let Err(e) = w.write_all(&record) {
                        self.write_failed(&e);
                    }
                }
                None => log::warn!(
                    "answer cache {}: an answer of {} bytes is too long to store",
                    self.path.display(),
                    answer.text.len()
                ),
            }
        }
        self.entries.insert(key, answer);
        true
    }

    /// Hands buffered records to the operating system, so a killed process loses nothing
    /// written before. (Not an fsync: a kill does not lose the OS's buffers, and an fsync per
    /// batch would cost more than the answers are worth; after a power loss the checksums
    /// catch what the disk did not keep.) Errors are logged and stop later writes.
    pub fn flush(&mut self) {
        if let Some(w) = self.writer.as_mut() {
            if let Err(e) = w.flush() {
                self.write_failed(&e);
            }
        }
    }

    fn write_failed(&mut self, e: &std::io::Error) {
        log::error!(
            "answer cache {}: write failed ({e}); new answers are no longer saved",
            self.path.display()
        );
        // Dropping a BufWriter flushes it again; its buffer is discarded instead, since a
        // failed writer has already left the file's tail in an unknown state.
        if let Some(w) = self.writer.take() {
            let _ = w.into_parts();
        }
    }
}

impl Drop for AnswerCache {
    fn drop(&mut self) {
        self.flush();
    }
}

fn foreign(path: &Path) -> CacheError {
    CacheError::Foreign {
        path: path.to_owned(),
        magic: String::from_utf8_lossy(MAGIC).into_owned(),
    }
}

/// One record's bytes, or `None` when the text is too long for a record.
fn encode(key: AnswerKey, answer: &CachedAnswer) -> Option<Vec<u8>> {
    let len = PAYLOAD_FIXED + answer.text.len();
    if len > MAX_PAYLOAD {
        return None;
    }
    let mut out = Vec::with_capacity(RECORD_HEADER + len);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 8]); // the checksum, filled below
    out.extend_from_slice(&key.to_le_bytes());
    out.extend_from_slice(&(answer.prompt_tokens as u64).to_le_bytes());
    out.extend_from_slice(&(answer.new_tokens as u64).to_le_bytes());
    out.extend_from_slice(answer.text.as_bytes());
    let check = checksum(&out[..4], &out[RECORD_HEADER..]);
    out[4..RECORD_HEADER].copy_from_slice(&check.to_le_bytes());
    Some(out)
}

fn checksum(len: &[u8], payload: &[u8]) -> u64 {
    // The length is checked too: a corrupt length that lands on bytes passing as a record
    // would otherwise be believed.
    let mut buf = Vec::with_capacity(len.len() + payload.len());
    buf.extend_from_slice(len);
    buf.extend_from_slice(payload);
    xxh3_64(&buf)
}

/// Reads the records after the magic: the answers, how many records, and where the last good
/// record ends.
fn parse(bytes: &[u8]) -> (HashMap<AnswerKey, CachedAnswer>, usize, usize) {
    let mut entries = HashMap::new();
    let mut count = 0;
    let mut at = MAGIC.len();
    while let Some((key, answer, next)) = record_at(bytes, at) {
        entries.insert(key, answer);
        count += 1;
        at = next;
    }
    (entries, count, at)
}

/// The record starting at `at`, if it is whole and its checksum holds, and where the next starts.
fn record_at(bytes: &[u8], at: usize) -> Option<(AnswerKey, CachedAnswer, usize)> {
    let header = bytes.get(at..at.checked_add(RECORD_HEADER)?)?;
    let len_bytes = &header[..4];
    let len = u32::from_le_bytes(len_bytes.try_into().ok()?) as usize;
    if !(PAYLOAD_FIXED..=MAX_PAYLOAD).contains(&len) {
        return None;
    }
    let check = u64::from_le_bytes(header[4..].try_into().ok()?);
    let start = at + RECORD_HEADER;
    let payload = bytes.get(start..start.checked_add(len)?)?;
    if checksum(len_bytes, payload) != check {
        return None;
    }
    let key = u128::from_le_bytes(payload[..16].try_into().ok()?);
    let prompt_tokens = u64::from_le_bytes(payload[16..24].try_into().ok()?);
    let new_tokens = u64::from_le_bytes(payload[24..32].try_into().ok()?);
    let text = std::str::from_utf8(&payload[PAYLOAD_FIXED..])
        .ok()?
        .to_owned();
    let answer = CachedAnswer {
        text,
        prompt_tokens: usize::try_from(prompt_tokens).ok()?,
        new_tokens: usize::try_from(new_tokens).ok()?,
    };
    Some((key, answer, start + len))
}

/// How the answer cache stores an answer with a choice: the choice (no NUL, see
/// `Choice::option_ids`; empty for none), NUL, the options' probabilities (comma-separated,
/// empty for none), NUL, the answer. Keys of such answers carry a tag of their own
/// (`Choice::cache_messages`), so entries written before probabilities were kept are never
/// read in this form.
pub(super) fn pack_choice(choice: Option<&str>, probs: Option<&[f32]>, text: &str) -> String {
    let probs = probs
        .map(|p| p.iter().map(f32::to_string).collect::<Vec<_>>().join(","))
        .unwrap_or_default();
    format!("{}\u{0}{probs}\u{0}{text}", choice.unwrap_or(""))
}

/// The inverse of [`pack_choice`].
pub(super) fn unpack_choice(packed: &str) -> (Option<String>, Option<Vec<f32>>, String) {
    let mut parts = packed.splitn(3, '\u{0}');
    let (Some(choice), Some(probs), Some(text)) = (parts.next(), parts.next(), parts.next()) else {
        return (None, None, packed.to_owned());
    };
    let probs: Option<Vec<f32>> = if probs.is_empty() {
        None
    } else {
        probs.split(',').map(|p| p.parse().ok()).collect()
    };
    let choice = (!choice.is_empty()).then(|| choice.to_owned());
    (choice, probs, text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(i: usize) -> CachedAnswer {
        CachedAnswer {
            // Varying lengths and non-ASCII text, so record boundaries fall everywhere.
            text: format!("answer {i}: {} é ✓", "x".repeat(i * 7)),
            prompt_tokens: 100 + i,
            new_tokens: i,
        }
    }

    fn key(i: usize) -> AnswerKey {
        answer_key(
            "v0",
            &[Message::user(format!("question {i}"))],
            16,
            &Sampling::greedy(),
        )
    }

    #[test]
    fn round_trip_keeps_every_answer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nested/answers.bin");
        {
            let mut c = AnswerCache::open(&path).expect("open new");
            assert!(c.is_empty());
            for i in 0..5 {
                assert!(c.insert(key(i), answer(i)));
            }
            // The same key again is neither replaced nor written.
            assert!(!c.insert(key(0), answer(9)));
            c.flush();
        }
        let c = AnswerCache::open(&path).expect("reopen");
        assert_eq!(c.loaded(), 5, "one record per distinct answer");
        assert_eq!(c.len(), 5);
        assert_eq!(c.dropped_bytes(), 0);
        for i in 0..5 {
            assert_eq!(c.get(key(i)), Some(&answer(i)), "answer {i}");
        }
        assert_eq!(c.get(key(5)), None);
    }

    #[test]
    fn torn_tail_is_dropped_and_appends_follow_the_last_good_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let full = dir.path().join("full.bin");
        // Where each record ends, measured from the file as it grows.
        let mut ends = vec![MAGIC.len() as u64];
        {
            let mut c = AnswerCache::open(&full).expect("open");
            for i in 0..4 {
                c.insert(key(i), answer(i));
                c.flush();
                ends.push(std::fs::metadata(&full).expect("stat").len());
            }
        }
        let bytes = std::fs::read(&full).expect("read");
        assert_eq!(bytes.len() as u64, *ends.last().expect("ends"));
        // Every cut inside the last two records, on and around their boundaries, and inside
        // the magic.
        let mut cuts: Vec<u64> = (ends[2]..=ends[4]).collect();
        cuts.extend([0, 3, 7, 8, 9, ends[1] - 1, ends[1], ends[1] + 5]);
        for cut in cuts {
            let path = dir.path().join(format!("cut-{cut}.bin"));
            std::fs::write(&path, &bytes[..cut as usize]).expect("write cut");
            // Records wholly before the cut.
            let whole = ends[1..].iter().filter(|&&e| e <= cut).count();
            {
                let mut c = AnswerCache::open(&path).expect("open torn");
                assert_eq!(c.loaded(), whole, "cut at {cut}");
                // A cut inside the magic restarts the file; any other drops what follows
                // the last whole record.
                let expect_dropped = if cut < 8 { 0 } else { cut - ends[whole] };
                assert_eq!(c.dropped_bytes(), expect_dropped, "cut at {cut}");
                for i in 0..4 {
                    let want = (i < whole).then(|| answer(i));
                    assert_eq!(c.get(key(i)).cloned(), want, "cut at {cut}, answer {i}");
                }
                assert!(c.insert(key(10), answer(10)), "cut at {cut}");
                c.flush();
            }
            let c = AnswerCache::open(&path).expect("reopen");
            assert_eq!(
                c.dropped_bytes(),
                0,
                "cut at {cut}: appended after a good record"
            );
            assert_eq!(c.loaded(), whole + 1, "cut at {cut}");
            assert_eq!(c.get(key(10)), Some(&answer(10)), "cut at {cut}");
        }
    }

    #[test]
    fn zeroed_or_flipped_tail_is_corrupt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.bin");
        {
            let mut c = AnswerCache::open(&path).expect("open");
            c.insert(key(1), answer(1));
            c.insert(key(2), answer(2));
        }
        let good = std::fs::read(&path).expect("read");
        // A tail of zeros, as a crashed filesystem can leave.
        let mut zeros = good.clone();
        zeros.extend([0u8; 64]);
        std::fs::write(&path, &zeros).expect("write");
        let c = AnswerCache::open(&path).expect("open zeros");
        assert_eq!((c.loaded(), c.dropped_bytes()), (2, 64));
        drop(c);
        // One flipped bit in the last record's text: that record goes, the first stays.
        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x01;
        std::fs::write(&path, &flipped).expect("write");
        let c = AnswerCache::open(&path).expect("open flipped");
        assert_eq!(c.loaded(), 1);
        assert_eq!(c.get(key(1)), Some(&answer(1)));
        assert_eq!(c.get(key(2)), None);
    }

    #[test]
    fn a_foreign_file_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notes.txt");
        let text = b"these are someone's notes, not answers\n";
        std::fs::write(&path, text).expect("write");
        match AnswerCache::open(&path) {
            Err(CacheError::Foreign { .. }) => {}
            other => panic!("expected Foreign, got {other:?}"),
        }
        assert_eq!(std::fs::read(&path).expect("read"), text);
    }

    #[test]
    fn key_depends_on_everything_that_decides_the_answer() {
        let msgs = vec![Message::system("be brief"), Message::user("hello")];
        let hot = Sampling {
            temperature: 0.7,
            top_p: 0.9,
            seed: 1,
        };
        let base = answer_key("v1", &msgs, 32, &hot);
        assert_eq!(base, answer_key("v1", &msgs, 32, &hot), "deterministic");
        let variants = [
            ("version", answer_key("v2", &msgs, 32, &hot)),
            ("max_new_tokens", answer_key("v1", &msgs, 33, &hot)),
            (
                "seed",
                answer_key("v1", &msgs, 32, &Sampling { seed: 2, ..hot }),
            ),
            (
                "temperature",
                answer_key(
                    "v1",
                    &msgs,
                    32,
                    &Sampling {
                        temperature: 0.8,
                        ..hot
                    },
                ),
            ),
            (
                "top_p",
                answer_key("v1", &msgs, 32, &Sampling { top_p: 0.95, ..hot }),
            ),
            ("greedy", answer_key("v1", &msgs, 32, &Sampling::greedy())),
            (
                "role",
                answer_key(
                    "v1",
                    &[Message::user("be brief"), Message::user("hello")],
                    32,
                    &hot,
                ),
            ),
            (
                "content",
                answer_key(
                    "v1",
                    &[Message::system("be brief"), Message::user("hello!")],
                    32,
                    &hot,
                ),
            ),
            (
                // The same characters split differently between messages.
                "boundaries",
                answer_key(
                    "v1",
                    &[Message::system("be brie"), Message::user("fhello")],
                    32,
                    &hot,
                ),
            ),
        ];
        for (what, k) in variants {
            assert_ne!(k, base, "{what} must change the key");
        }
        // Argmax reads neither seed nor top_p: greedy requests share one answer.
        let g = Sampling::greedy();
        assert_eq!(
            answer_key("v1", &msgs, 32, &g),
            answer_key(
                "v1",
                &msgs,
                32,
                &Sampling {
                    seed: 99,
                    top_p: 0.5,
                    ..g
                }
            )
        );
    }
}
