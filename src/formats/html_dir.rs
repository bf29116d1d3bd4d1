//! Input discovery (files, folders, glob patterns) and single HTML files as inputs.

use super::remote::{self, RemoteError, RemoteObject};
use super::{file_url, ReadOptions};
use crate::records::{Body, Origin, RawRecord};
use crate::stats::{Drop, DropReason};
use flate2::read::GzDecoder;
use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What kind of input a file is.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum InputKind {
    /// WARC or WET, plain or gzip.
    Warc,
    /// JSON Lines, plain, gzip or zstd.
    Jsonl,
    /// One HTML page.
    Html,
    /// Parquet (a text column).
    Parquet,
}

/// One input file and its kind.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InputFile {
    /// The path, as given or as found under a folder or pattern.
    pub path: PathBuf,
    /// Its format.
    pub kind: InputKind,
}

/// Why the input arguments could not be expanded.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// An argument that is no file, no folder, and no pattern matching anything.
    #[error("no such file or folder, and no file matches the pattern: {0}")]
    NotFound(String),
    /// A glob pattern that does not parse.
    #[error("bad glob pattern {pattern:?}: {source}")]
    BadPattern {
        /// The pattern.
        pattern: String,
        /// The parse error.
        source: glob::PatternError,
    },
    /// A named file whose format could not be told from its name or its first bytes.
    #[error("cannot tell the format of {0} (expected WARC/WET, JSONL or HTML)")]
    UnknownKind(PathBuf),
    /// A remote input that could not be listed or opened.
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// A remote prefix under which no object's name says it is an input.
    #[error("no object under {0} whose name says WARC/WET, JSONL, HTML or Parquet")]
    NothingUnder(String),
    /// A file or folder that could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// The kind of a file from its name: `.warc`, `.wet`, `.wat` (each optionally `.gz`) are WARC;
/// `.jsonl`, `.ndjson`, `.json` (optionally `.gz`, `.zst` or `.zstd`) are JSON Lines; `.html`,
/// `.htm`, `.xhtml` are pages; `.parquet` is Parquet.
pub fn kind_from_name(path: &Path) -> Option<InputKind> {
    // Lossy: a name that is not UTF-8 still tells its kind by its (ASCII) extension.
    let name = path.file_name()?.to_string_lossy().to_ascii_lowercase();
    let zstd = name.ends_with(".zst") || name.ends_with(".zstd");
    let full_len = name.len();
    let name = [".gz", ".zst", ".zstd"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(&name);
    let ext = name.rsplit_once('.')?.1;
    match ext {
        // The WARC reader reads gzip only.
        "warc" | "wet" | "wat" if zstd => None,
        "warc" | "wet" | "wat" => Some(InputKind::Warc),
        "jsonl" | "ndjson" | "json" => Some(InputKind::Jsonl),
        "html" | "htm" | "xhtml" => Some(InputKind::Html),
        "parquet" if name.len() == full_len => Some(InputKind::Parquet),
        _ => None,
    }
}

/// Raw bytes read from the start of a file to tell its kind (enough to decompress the first KiB
/// of a gzip or zstd member).
const SNIFF_BYTES: u64 = 16 << 10;

/// The kind of a file from its first bytes (decompressed when gzip).
pub fn sniff_kind(path: &Path) -> io::Result<Option<InputKind>> {
    let mut head = Vec::with_capacity(SNIFF_BYTES as usize);
    File::open(path)?.take(SNIFF_BYTES).read_to_end(&mut head)?;
    Ok(sniff_head(&head))
}

/// The kind of an input from its first bytes (its first 16 KiB are plenty).
pub fn sniff_head(head: &[u8]) -> Option<InputKind> {
    if head.starts_with(b"PAR1") {
        return Some(InputKind::Parquet);
    }
    let mut plain = Vec::with_capacity(1024);
    let head = if head.starts_with(&[0x1f, 0x8b]) {
        // A gzip error here (the head ends mid-stream) just means we learnt less: sniff what
        // came out.
        let _ = GzDecoder::new(head).take(1024).read_to_end(&mut plain);
        &plain[..]
    } else if head.starts_with(&super::jsonl::ZSTD_MAGIC) {
        if let Ok(d) = zstd::stream::read::Decoder::new(head) {
            let _ = d.take(1024).read_to_end(&mut plain);
        }
        // Only JSON Lines are read from zstd: anything else stays unknown.
        return plain
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .filter(|&&b| b == b'{')
            .map(|_| InputKind::Jsonl);
    } else {
        head
    };
    let text = head.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(head);
    let start = text
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(text.len());
    let text = &text[start..];
    if text.starts_with(b"WARC/") {
        Some(InputKind::Warc)
    } else if text.starts_with(b"{") {
        Some(InputKind::Jsonl)
    } else if super::http::looks_like_html(text) {
        Some(InputKind::Html)
    } else {
        None
    }
}

/// The kind of a file from its name, else from its first bytes; `None` when neither tells (or
/// the file cannot be read). Only a regular file is sniffed: opening a FIFO blocks. A remote
/// object is known by its name only (telling it from its bytes costs a request).
pub fn detect_kind(path: &Path) -> Option<InputKind> {
    kind_from_name(path).or_else(|| {
        if remote::is_url(path) {
            return None;
        }
        let regular = std::fs::metadata(path).is_ok_and(|m| m.is_file());
        regular.then(|| sniff_kind(path).ok().flatten()).flatten()
    })
}

/// What a path that is not a regular file is, for a drop's detail.
pub fn file_type_name(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_socket() {
            return "a socket";
        }
        if t.is_block_device() || t.is_char_device() {
            return "a device";
        }
    }
    if t.is_dir() {
        "a folder"
    } else {
        "not a regular file"
    }
}

/// Whether a path is hidden or a temporary file being written (skipped inside folders).
fn skipped_in_folder(path: &Path) -> bool {
    path.file_name()
        .map(|n| n.to_string_lossy())
        .is_some_and(|n| n.starts_with('.') || n.ends_with(".tmp"))
}

/// Every file under `dir` (recursive), sorted by path, for which `keep` is true. Folder links
/// are followed once (a link loop is not walked twice).
pub(crate) fn walk_sorted(
    dir: &Path,
    keep: &dyn Fn(&Path) -> bool,
) -> Result<Vec<PathBuf>, InputError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| InputError::Io { path, source }
    };
    let mut out = Vec::new();
    let mut seen_dirs = HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if !seen_dirs.insert(d.canonicalize().map_err(io_err(&d))?) {
            continue;
        }
        let mut entries = std::fs::read_dir(&d)
            .map_err(io_err(&d))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(io_err(&d))?;
        entries.sort();
        let mut subdirs = Vec::new();
        for path in entries {
            if skipped_in_folder(&path) {
                continue;
            }
            // Follows links; a dangling link is skipped rather than failing the whole folder.
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                subdirs.push(path);
            } else if keep(&path) {
                // A FIFO or device named like an input is kept: reading it is a counted skip.
                out.push(path);
            }
        }
        // Reversed so the stack pops them in order; the final sort makes the order global.
        stack.extend(subdirs.into_iter().rev());
    }
    out.sort();
    Ok(out)
}

/// Expands input arguments into the sorted, deduplicated list of files to read.
///
/// Each argument is a file (its kind from its name, else from its first bytes), a folder
/// (every file under it, recursively, whose name says WARC/WET, JSONL or HTML; hidden and
/// `.tmp` files are skipped), or a glob pattern (`glob` syntax) whose matches are files or
/// folders as above, or an object store URL (see [`remote_inputs`]).
pub fn expand_inputs(args: &[String]) -> Result<Vec<InputFile>, InputError> {
    let mut found: Vec<InputFile> = Vec::new();
    for arg in args {
        let path = Path::new(arg);
        if remote::is_url(path) {
            found.extend(remote_inputs(arg)?);
            continue;
        }
        if path.exists() {
            add_path(path, true, &mut found)?;
            continue;
        }
        if !arg.contains(['*', '?', '[']) {
            return Err(InputError::NotFound(arg.clone()));
        }
        let matches = glob::glob(arg).map_err(|source| InputError::BadPattern {
            pattern: arg.clone(),
            source,
        })?;
        let mut any = false;
        for m in matches {
            let m = m.map_err(|e| InputError::Io {
                path: e.path().to_path_buf(),
                source: io::Error::new(e.error().kind(), e.error().to_string()),
            })?;
            any = true;
            add_path(&m, false, &mut found)?;
        }
        if !any {
            return Err(InputError::NotFound(arg.clone()));
        }
    }
    found.sort();
    // The same file reached twice (two args, a link, `dir` and `dir/x`) is read once.
    let mut seen = HashSet::new();
    found.retain(|f| seen.insert(f.path.canonicalize().unwrap_or_else(|_| f.path.clone())));
    Ok(found)
}

/// The inputs an object store URL names: the object itself when one has exactly this name (its
/// kind from its name, else from its first bytes), else every object under it as under a
/// folder (`s3://bucket/crawl/` or `s3://bucket/crawl`: `crawl/…`, recursively; names that say
/// an input kind; hidden and temporary names skipped), sorted.
pub fn remote_inputs(url: &str) -> Result<Vec<InputFile>, InputError> {
    if !url.ends_with('/') {
        if let Some(object) = RemoteObject::open(url)? {
            let path = PathBuf::from(object.url());
            let kind = match kind_from_name(&path) {
                Some(kind) => Some(kind),
                None => {
                    let mut head = Vec::new();
                    remote::RemoteReader::new(Arc::new(object))
                        .take(SNIFF_BYTES)
                        .read_to_end(&mut head)
                        .map_err(|source| InputError::Io {
                            path: path.clone(),
                            source,
                        })?;
                    sniff_head(&head)
                }
            };
            return match kind {
                Some(kind) => Ok(vec![InputFile { path, kind }]),
                None => Err(InputError::UnknownKind(path)),
            };
        }
    }
    let found: Vec<InputFile> = remote::list(url)?
        .into_iter()
        .filter_map(|listed| {
            let path = PathBuf::from(listed.url);
            let kind = kind_from_name(&path)?;
            (!skipped_in_folder(&path)).then_some(InputFile { path, kind })
        })
        .collect();
    if found.is_empty() {
        return Err(InputError::NothingUnder(url.to_owned()));
    }
    Ok(found)
}

/// Adds one existing path: a folder's input files, or the file itself. A file named explicitly
/// must be readable as some input; a pattern's match that is not is skipped.
fn add_path(path: &Path, named: bool, found: &mut Vec<InputFile>) -> Result<(), InputError> {
    if path.is_dir() {
        for p in walk_sorted(path, &|p| kind_from_name(p).is_some())? {
            if let Some(kind) = kind_from_name(&p) {
                found.push(InputFile { path: p, kind });
            }
        }
        return Ok(());
    }
    let regular = std::fs::metadata(path).is_ok_and(|m| m.is_file());
    let kind = match kind_from_name(path) {
        Some(k) => Some(k),
        // Never opened to sniff (a FIFO would block): reading it is a counted skip.
        None if !regular => Some(InputKind::Warc),
        None => sniff_kind(path).map_err(|source| InputError::Io {
            path: path.to_path_buf(),
            source,
        })?,
    };
    match kind {
        Some(kind) => found.push(InputFile {
            path: path.to_path_buf(),
            kind,
        }),
        None if named => return Err(InputError::UnknownKind(path.to_path_buf())),
        None => {}
    }
    Ok(())
}

/// One HTML file as one record (`Body::Html`, charset `None`, URL `file://<absolute path>`, or
/// the object's own URL for a remote page). Gzip-compressed pages (`.html.gz`) are decompressed.
pub struct HtmlFileReader {
    path: PathBuf,
    /// Set for a page in an object store.
    object: Option<Arc<RemoteObject>>,
    file: String,
    max_page: u64,
    consumed: u64,
    done: bool,
}

impl HtmlFileReader {
    /// A reader of the page at `path`; `file` names it in origins and drops.
    pub fn new(path: &Path, file: impl Into<String>, opts: &ReadOptions) -> Self {
        HtmlFileReader {
            path: path.to_path_buf(),
            object: None,
            file: file.into(),
            max_page: opts.max_page_bytes,
            consumed: 0,
            done: false,
        }
    }

    /// A reader of the page stored as `object`.
    pub fn remote(object: Arc<RemoteObject>, file: impl Into<String>, opts: &ReadOptions) -> Self {
        HtmlFileReader {
            path: PathBuf::from(object.url()),
            object: Some(object),
            ..HtmlFileReader::new(Path::new(""), file, opts)
        }
    }

    /// Input bytes read so far.
    pub fn bytes_consumed(&self) -> u64 {
        self.consumed
    }

    fn drop_at(&self, reason: DropReason, detail: impl Into<String>) -> Drop {
        Drop {
            reason,
            file: self.file.clone(),
            offset: 0,
            detail: detail.into(),
        }
    }

    /// The file's bytes as stored, unless it is empty or over the page limit.
    fn stored_bytes(&self) -> Result<Vec<u8>, Drop> {
        let unreadable = |e: io::Error| self.drop_at(DropReason::UnreadableFile, e.to_string());
        // A remote object is fetched only when read, after the size checks.
        let (len, mut source): (u64, Box<dyn Read>) = match &self.object {
            Some(object) => (
                object.size(),
                Box::new(remote::RemoteReader::new(object.clone())),
            ),
            None => {
                let f = File::open(&self.path).map_err(unreadable)?;
                (f.metadata().map_err(unreadable)?.len(), Box::new(f))
            }
        };
        if len == 0 {
            return Err(self.drop_at(DropReason::EmptyFile, "the file has no bytes"));
        }
        if len > self.max_page {
            return Err(self.too_large());
        }
        let mut raw = Vec::with_capacity(len as usize);
        source.read_to_end(&mut raw).map_err(unreadable)?;
        Ok(raw)
    }

    fn too_large(&self) -> Drop {
        self.drop_at(
            DropReason::PageTooLarge,
            format!("page over the {}-byte limit", self.max_page),
        )
    }

    fn read(&self) -> Result<RawRecord, Drop> {
        let raw = self.stored_bytes()?;
        let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
            let mut plain = Vec::new();
            GzDecoder::new(&raw[..])
                .take(self.max_page + 1)
                .read_to_end(&mut plain)
                .map_err(|e| {
                    let reason = if e.kind() == io::ErrorKind::UnexpectedEof {
                        DropReason::TruncatedGzip
                    } else {
                        DropReason::MalformedRecord
                    };
                    self.drop_at(reason, e.to_string())
                })?;
            plain
        } else {
            raw
        };
        if bytes.len() as u64 > self.max_page {
            return Err(self.too_large());
        }
        let url = match &self.object {
            Some(object) => object.url().to_owned(),
            None => {
                let abs = self
                    .path
                    .canonicalize()
                    .unwrap_or_else(|_| self.path.clone());
                file_url(&abs.to_string_lossy())
            }
        };
        Ok(RawRecord {
            origin: Origin {
                file: self.file.clone(),
                offset: 0,
            },
            url,
            record_id: super::derived_id(&self.file, 0),
            body: Body::Html {
                bytes,
                charset: None,
            },
        })
    }
}

impl Iterator for HtmlFileReader {
    type Item = Result<RawRecord, Drop>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        self.done = true;
        let item = self.read();
        self.consumed = match &self.object {
            Some(object) => object.size(),
            None => std::fs::metadata(&self.path).map_or(0, |m| m.len()),
        };
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_from_names() {
        let k = |n: &str| kind_from_name(Path::new(n));
        assert_eq!(k("CC-MAIN-1.warc.gz"), Some(InputKind::Warc));
        assert_eq!(k("a.WET.GZ"), Some(InputKind::Warc));
        assert_eq!(k("x.warc"), Some(InputKind::Warc));
        assert_eq!(k("d/x.jsonl.gz"), Some(InputKind::Jsonl));
        assert_eq!(k("d/x.jsonl.zst"), Some(InputKind::Jsonl));
        assert_eq!(k("d/x.json.zstd"), Some(InputKind::Jsonl));
        assert_eq!(k("d/x.warc.zst"), None);
        assert_eq!(k("d/000_00000.parquet"), Some(InputKind::Parquet));
        assert_eq!(k("d/x.parquet.gz"), None);
        assert_eq!(k("x.json"), Some(InputKind::Jsonl));
        assert_eq!(k("index.htm"), Some(InputKind::Html));
        assert_eq!(k("x.arc"), None);
        assert_eq!(k("x.gz"), None);
        assert_eq!(k("README"), None);
    }

    #[test]
    fn expands_folders_files_and_patterns_sorted_and_deduplicated() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("sub/deeper")).unwrap();
        std::fs::write(d.join("b.warc"), b"WARC/1.0\r\n").unwrap();
        std::fs::write(d.join("sub/a.jsonl"), b"{}\n").unwrap();
        std::fs::write(d.join("sub/deeper/p.html"), b"<html></html>").unwrap();
        std::fs::write(d.join("sub/style.css"), b"p {}").unwrap();
        std::fs::write(d.join(".hidden.warc"), b"WARC/1.0\r\n").unwrap();
        std::fs::write(d.join("c.warc.gz.tmp"), b"").unwrap();
        // No telling extension: sniffed.
        std::fs::write(d.join("dump.bin"), b"WARC/1.0\r\n").unwrap();
        std::fs::write(d.join("notes.txt"), b"hello").unwrap();
        let s = |p: &Path| p.to_string_lossy().into_owned();
        let args = vec![
            s(d),
            s(&d.join("b.warc")),
            s(&d.join("dump.bin")),
            format!("{}/sub/*.jsonl", s(d)),
        ];
        let got = expand_inputs(&args).unwrap();
        let want = vec![
            InputFile {
                path: d.join("b.warc"),
                kind: InputKind::Warc,
            },
            InputFile {
                path: d.join("dump.bin"),
                kind: InputKind::Warc,
            },
            InputFile {
                path: d.join("sub/a.jsonl"),
                kind: InputKind::Jsonl,
            },
            InputFile {
                path: d.join("sub/deeper/p.html"),
                kind: InputKind::Html,
            },
        ];
        assert_eq!(got, want);
        assert_eq!(detect_kind(&d.join("dump.bin")), Some(InputKind::Warc));
        assert_eq!(detect_kind(&d.join("notes.txt")), None);
        assert_eq!(detect_kind(&d.join("missing.bin")), None);
        assert!(matches!(
            expand_inputs(&[s(&d.join("notes.txt"))]),
            Err(InputError::UnknownKind(_))
        ));
        assert!(matches!(
            expand_inputs(&[s(&d.join("missing.warc"))]),
            Err(InputError::NotFound(_))
        ));
        assert!(matches!(
            expand_inputs(&[format!("{}/*.nothing", s(d))]),
            Err(InputError::NotFound(_))
        ));
    }
}
