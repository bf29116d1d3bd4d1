//! Crawl dumps in and out: WARC/WET (plain or gzip), JSON Lines (plain, gzip, zstd), Parquet,
//! single HTML pages, local or in object stores ([`remote`]: S3, GCS, Azure, HTTP), and a WARC
//! writer.
//!
//! The dataflow calls [`expand_inputs`] to list its input files and [`open`] to read each one
//! as a stream of `Result<RawRecord, Drop>`: every record either comes out or is counted as a
//! drop with its file, offset and reason; bad input never panics and never stops a file early
//! when the reader can find the next record. All readers stream with bounded memory.

pub mod html_dir;
pub mod jsonl;
pub mod os_path;
pub mod parquet_file;
pub mod remote;
pub mod warc;
pub mod warc_writer;

mod counting;
mod http;

pub use html_dir::{
    detect_kind, expand_inputs, kind_from_name, sniff_kind, HtmlFileReader, InputError, InputFile,
    InputKind,
};
pub use jsonl::JsonlReader;
pub use warc::WarcReader;
pub use warc_writer::{
    format_warc_date, meta_charset, pack_html_dir, PackError, PackSummary, WarcWriter,
};

use crate::records::RawRecord;
use crate::stats::{Drop, DropReason};
use std::io::Read;
use std::sync::Arc;

/// The bytes of a WARC or JSONL input: a local file or a remote object's ranges.
type InputStream = Box<dyn Read + Send>;

/// How inputs are read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadOptions {
    /// A page (WARC block, decoded HTTP payload, JSONL line, HTML file) larger than this is
    /// dropped as `page_too_large` without being buffered whole. Default 16 MiB.
    pub max_page_bytes: u64,
    /// The JSONL field holding the text. Default `text`.
    pub text_field: String,
    /// Read buffer size in bytes. Default 1 MiB.
    pub buffer_bytes: usize,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            max_page_bytes: 16 << 20,
            text_field: "text".to_owned(),
            buffer_bytes: 1 << 20,
        }
    }
}

/// The id of a record that has none of its own: `<file>@<offset>`.
pub fn derived_id(file: &str, offset: u64) -> String {
    format!("{file}@{offset}")
}

/// A `file://` URL for an absolute path (`/` separators), percent-encoding what a URL cannot
/// hold as is.
pub fn file_url(path: &str) -> String {
    let mut url = String::with_capacity(path.len() + 8);
    url.push_str("file://");
    for &b in path.replace('\\', "/").as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/!$&'()*+,;=:@".contains(&b) {
            url.push(b as char);
        } else {
            url.push_str(&format!("%{b:02X}"));
        }
    }
    url
}

/// The reader behind a [`RecordReader`].
enum Inner {
    Warc(Box<WarcReader<InputStream>>),
    Jsonl(Box<JsonlReader<InputStream>>),
    Parquet(Box<parquet_file::ParquetReader>),
    Html(HtmlFileReader),
    /// The file could not be opened: one drop, then nothing.
    Failed(Option<Drop>),
}

/// The records of one input file, with progress in input bytes.
pub struct RecordReader {
    inner: Inner,
    file_len: Option<u64>,
}

impl RecordReader {
    /// Input bytes consumed so far (compressed bytes for gzip inputs): for progress bars and
    /// for cutting epochs every N bytes.
    pub fn bytes_consumed(&self) -> u64 {
        match &self.inner {
            Inner::Warc(r) => r.bytes_consumed(),
            Inner::Jsonl(r) => r.bytes_consumed(),
            Inner::Parquet(r) => r.bytes_consumed(),
            Inner::Html(r) => r.bytes_consumed(),
            Inner::Failed(_) => 0,
        }
    }

    /// The file's size in bytes, when known: the total for a progress bar.
    pub fn file_len(&self) -> Option<u64> {
        self.file_len
    }
}

impl Iterator for RecordReader {
    type Item = Result<RawRecord, Drop>;

    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.inner {
            Inner::Warc(r) => r.next(),
            Inner::Jsonl(r) => r.next(),
            Inner::Parquet(r) => r.next(),
            Inner::Html(r) => r.next(),
            Inner::Failed(d) => d.take().map(Err),
        }
    }
}

/// One `unreadable_file` drop for `file`, then nothing.
fn unreadable(file: String, detail: String) -> RecordReader {
    RecordReader {
        inner: Inner::Failed(Some(Drop {
            reason: DropReason::UnreadableFile,
            file,
            offset: 0,
            detail,
        })),
        file_len: None,
    }
}

/// Opens one input for reading. A file that cannot be opened yields one `unreadable_file` drop.
pub fn open(input: &InputFile, opts: &ReadOptions) -> RecordReader {
    let name = input.path.to_string_lossy().into_owned();
    if remote::is_url(&input.path) {
        return open_remote(input.kind, name, opts);
    }
    // A FIFO, socket or device would block the reader forever (or never end): skipped, counted.
    if let Ok(meta) = std::fs::metadata(&input.path) {
        if !meta.is_file() {
            return RecordReader {
                inner: Inner::Failed(Some(Drop {
                    reason: DropReason::UnreadableFile,
                    file: name,
                    offset: 0,
                    detail: format!(
                        "not a regular file ({}): skipped",
                        html_dir::file_type_name(&meta)
                    ),
                })),
                file_len: None,
            };
        }
    }
    if input.kind == InputKind::Html {
        let file_len = std::fs::metadata(&input.path).ok().map(|m| m.len());
        return RecordReader {
            inner: Inner::Html(HtmlFileReader::new(&input.path, name, opts)),
            file_len,
        };
    }
    let file = match std::fs::File::open(&input.path) {
        Ok(f) => f,
        Err(e) => return unreadable(name, e.to_string()),
    };
    let file_len = file.metadata().ok().map(|m| m.len());
    let inner = match input.kind {
        InputKind::Parquet => {
            Inner::Parquet(Box::new(parquet_file::ParquetReader::new(file, name, opts)))
        }
        kind => stream_reader(kind, Box::new(file), name, opts),
    };
    RecordReader { inner, file_len }
}

/// The reader of a WARC or JSONL stream.
fn stream_reader(kind: InputKind, bytes: InputStream, name: String, opts: &ReadOptions) -> Inner {
    match kind {
        InputKind::Jsonl => Inner::Jsonl(Box::new(JsonlReader::new(bytes, name, opts))),
        _ => Inner::Warc(Box::new(WarcReader::new(bytes, name, opts))),
    }
}

/// Opens an object in a store: `unreadable_file` when it is gone or the store refuses.
fn open_remote(kind: InputKind, name: String, opts: &ReadOptions) -> RecordReader {
    let object = match remote::RemoteObject::open(&name) {
        Ok(Some(object)) => Arc::new(object),
        Ok(None) => return unreadable(name, "no such object".to_owned()),
        Err(e) => return unreadable(name, e.to_string()),
    };
    let file_len = Some(object.size());
    let inner = match kind {
        InputKind::Html => Inner::Html(HtmlFileReader::remote(object, name, opts)),
        InputKind::Parquet => Inner::Parquet(Box::new(parquet_file::ParquetReader::new(
            remote::ParquetSource::new(object),
            name,
            opts,
        ))),
        kind => stream_reader(
            kind,
            Box::new(remote::RemoteReader::new(object)),
            name,
            opts,
        ),
    };
    RecordReader { inner, file_len }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_can_move_between_threads() {
        fn assert_send<T: Send>() {}
        assert_send::<RecordReader>();
    }

    #[test]
    fn file_urls_are_percent_encoded() {
        assert_eq!(file_url("/a/b c/é.html"), "file:///a/b%20c/%C3%A9.html");
        assert_eq!(
            file_url("/x/library/os.path.html"),
            "file:///x/library/os.path.html"
        );
    }

    #[test]
    fn unopenable_file_is_one_drop() {
        let input = InputFile {
            path: "/nonexistent/x.warc.gz".into(),
            kind: InputKind::Warc,
        };
        let out: Vec<_> = open(&input, &ReadOptions::default()).collect();
        assert_eq!(out.len(), 1);
        assert_eq!(
            out[0].as_ref().unwrap_err().reason,
            DropReason::UnreadableFile
        );
    }
}
