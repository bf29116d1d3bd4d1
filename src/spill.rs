//! An append-only log of records on disk, read back in order: state that grows with the input
//! (the loop's candidates, rated again by every round's model) kept out of memory. Records are
//! bincode, each after its length (u32, little-endian). The log is the process's scratch state,
//! not an output: it is truncated when created and removed when dropped (a run started again
//! rebuilds it from its inputs and the answer cache).

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Why the log could not be written or read.
#[derive(Debug, Error)]
pub enum SpillError {
    /// The file could not be created, written or read.
    #[error("spill file {}: {source}", path.display())]
    Io {
        /// The log's file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// A record could not be encoded or decoded.
    #[error("spill file {}: record {index}: {source}", path.display())]
    Codec {
        /// The log's file.
        path: PathBuf,
        /// The record's position in the log.
        index: u64,
        /// What went wrong.
        #[source]
        source: bincode::Error,
    },
    /// A record is larger than a length prefix can say (4 GiB).
    #[error("spill file {}: a record of {len} bytes is too large", path.display())]
    TooLarge {
        /// The log's file.
        path: PathBuf,
        /// Its encoded size.
        len: u64,
    },
}

/// The writing end of a log of `T`s.
pub struct SpillLog<T> {
    path: PathBuf,
    writer: BufWriter<File>,
    records: u64,
    bytes: u64,
    _records: PhantomData<fn(T)>,
}

impl<T: Serialize + DeserializeOwned> SpillLog<T> {
    /// Creates (or truncates) the log at `path`, creating its folder.
    pub fn create(path: &Path) -> Result<Self, SpillError> {
        let io = |source| SpillError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let file = File::create(path).map_err(io)?;
        Ok(SpillLog {
            path: path.to_path_buf(),
            writer: BufWriter::with_capacity(1 << 16, file),
            records: 0,
            bytes: 0,
            _records: PhantomData,
        })
    }

    /// Appends `record`.
    pub fn push(&mut self, record: &T) -> Result<(), SpillError> {
        let codec = |source| SpillError::Codec {
            path: self.path.clone(),
            index: self.records,
            source,
        };
        let bytes = bincode::serialize(record).map_err(codec)?;
        let len = u32::try_from(bytes.len()).map_err(|_| SpillError::TooLarge {
            path: self.path.clone(),
            len: bytes.len() as u64,
        })?;
        let io = |source| SpillError::Io {
            path: self.path.clone(),
            source,
        };
        self.writer.write_all(&len.to_le_bytes()).map_err(io)?;
        self.writer.write_all(&bytes).map_err(io)?;
        self.records += 1;
        self.bytes += 4 + bytes.len() as u64;
        Ok(())
    }

    /// Records appended so far.
    pub fn len(&self) -> u64 {
        self.records
    }

    /// Whether nothing was appended.
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Bytes on disk (once flushed).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// A reader of the records appended so far, in order; records appended after this call are
    /// not part of it.
    pub fn cursor(&mut self) -> Result<SpillCursor<T>, SpillError> {
        let io = |source| SpillError::Io {
            path: self.path.clone(),
            source,
        };
        self.writer.flush().map_err(io)?;
        let file = File::open(&self.path).map_err(io)?;
        Ok(SpillCursor {
            path: self.path.clone(),
            reader: BufReader::with_capacity(1 << 16, file),
            next: 0,
            end: self.records,
            _records: PhantomData,
        })
    }
}

impl<T> Drop for SpillLog<T> {
    fn drop(&mut self) {
        // Scratch state: nothing reads it once its writer is gone.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads a log's records in the order they were appended, up to the end it was made at.
pub struct SpillCursor<T> {
    path: PathBuf,
    reader: BufReader<File>,
    next: u64,
    end: u64,
    _records: PhantomData<fn() -> T>,
}

impl<T> SpillCursor<T> {
    /// Records left to read.
    pub fn remaining(&self) -> u64 {
        self.end - self.next
    }
}

impl<T: DeserializeOwned> Iterator for SpillCursor<T> {
    type Item = Result<T, SpillError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.end {
            return None;
        }
        let index = self.next;
        self.next += 1;
        let io = |source| SpillError::Io {
            path: self.path.clone(),
            source,
        };
        let mut len = [0u8; 4];
        if let Err(e) = self.reader.read_exact(&mut len) {
            self.next = self.end; // a short file ends the reading
            return Some(Err(io(e)));
        }
        let mut bytes = vec![0u8; u32::from_le_bytes(len) as usize];
        if let Err(e) = self.reader.read_exact(&mut bytes) {
            self.next = self.end;
            return Some(Err(io(e)));
        }
        Some(
            bincode::deserialize(&bytes).map_err(|source| SpillError::Codec {
                path: self.path.clone(),
                index,
                source,
            }),
        )
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.remaining() as usize;
        (n, Some(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Row {
        round: u64,
        text: String,
    }

    fn row(round: u64, text: &str) -> Row {
        Row {
            round,
            text: text.into(),
        }
    }

    /// Records come back in order and equal; a cursor reads what was there when it was made,
    /// not what is appended while it reads; the length prefix counts in the file's size.
    #[test]
    fn records_come_back_in_order_up_to_the_cursor_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/log.bin");
        let mut log = SpillLog::create(&path).unwrap();
        let first = [row(0, "a"), row(0, "héllo"), row(1, "")];
        for r in &first {
            log.push(r).unwrap();
        }
        let mut cursor = log.cursor().unwrap();
        assert_eq!(cursor.remaining(), 3);
        assert_eq!(cursor.next().unwrap().unwrap(), first[0]);
        log.push(&row(2, "later")).unwrap();
        let rest: Vec<Row> = cursor.map(Result::unwrap).collect();
        assert_eq!(rest, first[1..]);
        let all: Vec<Row> = log.cursor().unwrap().map(Result::unwrap).collect();
        assert_eq!(all.len(), 4);
        assert_eq!(all[3], row(2, "later"));
        // bincode: u64 round, then the string's u64 length and bytes; plus our u32 prefix.
        let expected: u64 = all.iter().map(|r| 4 + 8 + 8 + r.text.len() as u64).sum();
        assert_eq!(log.bytes(), expected);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), expected);
    }

    /// A log made again starts empty; a dropped log leaves no file.
    #[test]
    fn created_again_it_is_empty_and_dropped_it_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.bin");
        let mut log = SpillLog::create(&path).unwrap();
        log.push(&row(0, "a")).unwrap();
        log.cursor().unwrap();
        drop(log);
        assert!(!path.exists());
        std::fs::write(&path, b"stale bytes").unwrap();
        let mut log = SpillLog::<Row>::create(&path).unwrap();
        assert!(log.is_empty());
        assert_eq!(log.cursor().unwrap().count(), 0);
    }

    /// A file cut short is an error (once), not a wrong record, and the reading ends there.
    #[test]
    fn a_truncated_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.bin");
        let mut log = SpillLog::create(&path).unwrap();
        log.push(&row(0, "abcdef")).unwrap();
        log.push(&row(1, "ghijkl")).unwrap();
        let mut cursor = log.cursor().unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        assert_eq!(cursor.next().unwrap().unwrap(), row(0, "abcdef"));
        let err = cursor.next().unwrap().unwrap_err();
        assert!(matches!(err, SpillError::Io { .. }), "{err}");
        assert!(cursor.next().is_none());
    }
}
