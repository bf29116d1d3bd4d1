//! Inputs in object stores: `s3://bucket/key`, `gs://bucket/key`, `az://container/key` (and
//! `abfs(s)://`, `azure://`), `http(s)://host/path`, read through the `object_store` crate.
//!
//! A remote input travels through the job as its URL (in [`super::InputFile::path`] and the
//! work items that cross processes), so the dataflow, the ingest logs and `--follow` treat it
//! like a file: every process that reads one opens its store itself. Credentials come from the
//! environment each store's own tools use (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_REGION`, `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, `GOOGLE_SERVICE_ACCOUNT`,
//! `AZURE_STORAGE_ACCOUNT_NAME`, ...: see `object_store`'s `from_env` builders).
//!
//! Reads are ranged GETs of the version seen when the object was opened (`If-Match` its ETag): an
//! object replaced while being read fails its next range (a counted `unreadable_file` drop after
//! the records already read) rather than mixing two versions. `object_store` retries what fails
//! on the way (a refused or reset connection, a 5xx, a body cut mid-transfer, which it resumes at
//! the byte where it stopped), so a dropped connection costs a request, never a record.
//!
//! Streams (WARC, JSONL) are read with one GET each, as the bytes arrive; Parquet, whose reader
//! asks for page headers and pages here and there, through a few cached windows of
//! [`CHUNK_BYTES`] (one per column being read), which needs a server that answers ranged GETs
//! (every object store does; a plain HTTP server may not).

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, ObjectStoreScheme};
use std::collections::HashMap;
use std::io::{self, Read};
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use url::Url;

/// The size of a Parquet window: one ranged GET.
pub const CHUNK_BYTES: u64 = 8 << 20;

/// Parquet windows kept per open file: enough for the text, url and id columns of a row group
/// to be read side by side without refetching.
const PARQUET_WINDOWS: usize = 6;

/// The URL schemes read as remote inputs.
const SCHEMES: &[&str] = &[
    "s3", "s3a", "gs", "az", "azure", "abfs", "abfss", "adl", "http", "https",
];

/// Why a remote input could not be listed or opened.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// Not a URL `object_store` can address.
    #[error("bad URL {url:?}: {detail}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        detail: String,
    },
    /// The store answered with an error (after its retries).
    #[error("{url}: {source}")]
    Store {
        /// The object or prefix.
        url: String,
        /// The store's error.
        source: object_store::Error,
    },
    /// The runtime that drives the stores' clients could not start.
    #[error("cannot start the object store client: {0}")]
    Runtime(String),
}

/// Whether `path` is a URL this module reads (`s3://…`, `https://…`) rather than a local path.
pub fn is_url(path: &Path) -> bool {
    path.to_str()
        .and_then(|s| s.split_once("://"))
        .is_some_and(|(scheme, _)| SCHEMES.contains(&scheme.to_ascii_lowercase().as_str()))
}

/// The process's client: one small I/O runtime, and one store per bucket (or HTTP origin), built
/// on first use from the environment.
struct Client {
    runtime: tokio::runtime::Runtime,
    stores: Mutex<HashMap<String, Arc<dyn ObjectStore>>>,
}

fn client() -> Result<&'static Client, RemoteError> {
    static CLIENT: OnceLock<Result<Client, String>> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            // rustls is built without a default provider (ring instead of aws-lc-rs): install
            // ring's. An error means one is installed already, which is as good.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("backflow-object-store")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            Ok(Client {
                runtime,
                stores: Mutex::new(HashMap::new()),
            })
        })
        .as_ref()
        .map_err(|e| RemoteError::Runtime(e.clone()))
}

/// Where a URL points: its store, the path in it, and the URL every object there is named by.
struct Located {
    store: Arc<dyn ObjectStore>,
    path: ObjectPath,
    /// The URL of the store's root (`s3://bucket/`, `https://host/`): an object's URL is this
    /// plus its path.
    base: Url,
}

impl Located {
    /// The URL naming `path` in this store.
    fn url_of(&self, path: &ObjectPath) -> String {
        let mut url = self.base.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty();
            segments.extend(path.parts().map(|p| p.as_ref().to_owned()));
        }
        url.into()
    }
}

/// Parses a URL and finds (or builds) its store.
fn locate(text: &str) -> Result<Located, RemoteError> {
    let bad = |detail: String| RemoteError::BadUrl {
        url: text.to_owned(),
        detail,
    };
    let url = Url::parse(text).map_err(|e| bad(e.to_string()))?;
    let (scheme, path) = ObjectStoreScheme::parse(&url).map_err(|e| bad(e.to_string()))?;
    let base = store_base(&url, &path).ok_or_else(|| bad("no bucket or host".to_owned()))?;
    let client = client()?;
    let mut stores = client
        .stores
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let store = match stores.get(base.as_str()) {
        Some(store) => store.clone(),
        None => {
            let store = build_store(&scheme, &url, &base).map_err(|source| RemoteError::Store {
                url: text.to_owned(),
                source,
            })?;
            stores.insert(base.as_str().to_owned(), store.clone());
            store
        }
    };
    Ok(Located { store, path, base })
}

/// The URL of the store holding `path`: `url` without the segments that make up `path`.
fn store_base(url: &Url, path: &ObjectPath) -> Option<Url> {
    url.host_str()?;
    // `s3://bucket` has an empty path, not `/`: no segments.
    let segments: Vec<&str> = url
        .path_segments()
        .map(|s| s.filter(|s| !s.is_empty()).collect())
        .unwrap_or_default();
    let keep = segments.len().checked_sub(path.parts_count())?;
    let mut base = url.clone();
    base.set_query(None);
    base.set_fragment(None);
    base.path_segments_mut()
        .ok()?
        .clear()
        .extend(&segments[..keep])
        .push("");
    Some(base)
}

fn build_store(
    scheme: &ObjectStoreScheme,
    url: &Url,
    base: &Url,
) -> object_store::Result<Arc<dyn ObjectStore>> {
    use object_store::{aws, azure, gcp, http};
    // object_store's default retries (10 tries within 3 minutes, exponential backoff) are what a
    // crawl read wants: a throttled or flaky store slows the job down, it does not lose files.
    Ok(match scheme {
        ObjectStoreScheme::AmazonS3 => Arc::new(
            aws::AmazonS3Builder::from_env()
                .with_url(url.as_str())
                .build()?,
        ),
        ObjectStoreScheme::GoogleCloudStorage => Arc::new(
            gcp::GoogleCloudStorageBuilder::from_env()
                .with_url(url.as_str())
                .build()?,
        ),
        ObjectStoreScheme::MicrosoftAzure => Arc::new(
            azure::MicrosoftAzureBuilder::from_env()
                .with_url(url.as_str())
                .build()?,
        ),
        ObjectStoreScheme::Http => {
            let options = object_store::ClientOptions::new().with_allow_http(true);
            Arc::new(
                http::HttpBuilder::new()
                    .with_url(base.as_str())
                    .with_client_options(options)
                    .build()?,
            )
        }
        other => {
            return Err(object_store::Error::NotSupported {
                source: format!("{other:?} URLs are local: give the path instead").into(),
            })
        }
    })
}

/// One object found under a prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    /// Its URL.
    pub url: String,
    /// Its size in bytes.
    pub size: u64,
}

/// Every object under the prefix `url` (a "folder": `s3://bucket/crawl/` lists `crawl/…`),
/// sorted by URL. HTTP servers list only if they speak WebDAV.
pub fn list(url: &str) -> Result<Vec<Listed>, RemoteError> {
    let at = locate(url)?;
    let prefix = (at.path.parts_count() > 0).then_some(&at.path);
    let stream = at.store.list(prefix);
    let metas: Vec<object_store::ObjectMeta> = client()?
        .runtime
        .block_on(stream.try_collect())
        .map_err(|source| RemoteError::Store {
            url: url.to_owned(),
            source,
        })?;
    let mut found: Vec<Listed> = metas
        .iter()
        .map(|m| Listed {
            url: at.url_of(&m.location),
            size: m.size,
        })
        .collect();
    found.sort_by(|a, b| a.url.cmp(&b.url));
    Ok(found)
}

/// One object opened for reading: its size and version as they were when it was opened.
pub struct RemoteObject {
    store: Arc<dyn ObjectStore>,
    path: ObjectPath,
    url: String,
    size: u64,
    etag: Option<String>,
}

impl std::fmt::Debug for RemoteObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteObject")
            .field("url", &self.url)
            .field("size", &self.size)
            .finish()
    }
}

impl RemoteObject {
    /// Opens the object at `url` (a HEAD request). `Ok(None)` when there is no such object.
    pub fn open(url: &str) -> Result<Option<RemoteObject>, RemoteError> {
        let at = locate(url)?;
        if at.path.parts_count() == 0 {
            return Ok(None);
        }
        let head = client()?.runtime.block_on(at.store.head(&at.path));
        match head {
            Ok(meta) => Ok(Some(RemoteObject {
                url: at.url_of(&meta.location),
                store: at.store,
                path: meta.location,
                size: meta.size,
                etag: meta.e_tag,
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(source) => Err(RemoteError::Store {
                url: url.to_owned(),
                source,
            }),
        }
    }

    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Its URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The request for `range` of this version of the object.
    fn fetch(&self, range: Range<u64>) -> impl std::future::Future<Output = io::Result<Bytes>> {
        let store = self.store.clone();
        let path = self.path.clone();
        let options = GetOptions {
            range: Some(GetRange::Bounded(range)),
            if_match: self.etag.clone(),
            ..GetOptions::default()
        };
        async move {
            let got = store.get_opts(&path, options).await?;
            Ok(got.bytes().await?)
        }
    }

    /// Reads `range` (clamped to the object), blocking.
    pub fn read_range(&self, range: Range<u64>) -> io::Result<Bytes> {
        let range = range.start.min(self.size)..range.end.min(self.size);
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        let client = client().map_err(io::Error::other)?;
        client.runtime.block_on(self.fetch(range))
    }
}

/// A stream over one object: one GET of the version opened, read as the bytes arrive (the
/// connection's buffers are the read-ahead, and a slow reader slows the sender). An error is
/// final: every later read repeats it, so a reader never mistakes a failed transfer for the end.
pub struct RemoteReader {
    object: Arc<RemoteObject>,
    body: Option<BoxStream<'static, object_store::Result<Bytes>>>,
    current: Bytes,
    /// Bytes handed out so far.
    read: u64,
    failed: Option<(io::ErrorKind, String)>,
}

impl RemoteReader {
    /// A reader of `object` from its first byte.
    pub fn new(object: Arc<RemoteObject>) -> RemoteReader {
        RemoteReader {
            object,
            body: None,
            current: Bytes::new(),
            read: 0,
            failed: None,
        }
    }

    /// The next piece of the body; empty at its end.
    fn next_piece(&mut self) -> io::Result<Bytes> {
        let client = client().map_err(io::Error::other)?;
        if self.body.is_none() {
            let object = &self.object;
            let options = GetOptions {
                if_match: object.etag.clone(),
                ..GetOptions::default()
            };
            let got = client
                .runtime
                .block_on(object.store.get_opts(&object.path, options))?;
            self.body = Some(got.into_stream());
        }
        let Some(body) = self.body.as_mut() else {
            return Ok(Bytes::new());
        };
        match client.runtime.block_on(body.next()) {
            Some(piece) => Ok(piece?),
            None if self.read < self.object.size => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{}: the body ended at byte {} of {}",
                    self.object.url, self.read, self.object.size
                ),
            )),
            None => Ok(Bytes::new()),
        }
    }
}

impl Read for RemoteReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some((kind, message)) = &self.failed {
            return Err(io::Error::new(*kind, message.clone()));
        }
        while self.current.is_empty() {
            match self.next_piece() {
                Ok(piece) if piece.is_empty() => return Ok(0),
                Ok(piece) => self.current = piece,
                Err(e) => {
                    self.failed = Some((e.kind(), e.to_string()));
                    return Err(e);
                }
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current = self.current.slice(n..);
        self.read += n as u64;
        Ok(n)
    }
}

/// An object read by Parquet's reader: ranges served from a few cached windows of
/// [`CHUNK_BYTES`] (least recently used dropped first), so the page headers and pages of a
/// column chunk cost one request per window, not one each.
#[derive(Clone)]
pub struct ParquetSource {
    object: Arc<RemoteObject>,
    windows: Arc<Mutex<Vec<(u64, Bytes)>>>,
}

impl ParquetSource {
    /// The source over `object`.
    pub fn new(object: Arc<RemoteObject>) -> ParquetSource {
        ParquetSource {
            object,
            windows: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Up to `len` bytes at `start` (fewer only at the object's end).
    fn bytes_at(&self, start: u64, len: u64) -> io::Result<Bytes> {
        let end = (start + len).min(self.object.size);
        if start >= end {
            return Ok(Bytes::new());
        }
        let mut windows = self
            .windows
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(i) = windows
            .iter()
            .position(|(at, w)| *at <= start && end <= at + w.len() as u64)
        {
            let (at, window) = windows.remove(i);
            let out = window.slice((start - at) as usize..(end - at) as usize);
            windows.push((at, window));
            return Ok(out);
        }
        // A range larger than a window is fetched as is; a smaller one brings its window.
        let fetch_end = end.max((start + CHUNK_BYTES).min(self.object.size));
        let window = self.object.read_range(start..fetch_end)?;
        if (window.len() as u64) < end - start {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{}: short read at byte {start}", self.object.url),
            ));
        }
        let out = window.slice(..(end - start) as usize);
        if windows.len() >= PARQUET_WINDOWS {
            windows.remove(0);
        }
        windows.push((start, window));
        Ok(out)
    }
}

impl ::parquet::file::reader::Length for ParquetSource {
    fn len(&self) -> u64 {
        self.object.size
    }
}

/// A reader from an offset of a [`ParquetSource`].
pub struct ParquetRangeReader {
    source: ParquetSource,
    pos: u64,
}

impl Read for ParquetRangeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let got = self.source.bytes_at(self.pos, buf.len() as u64)?;
        buf[..got.len()].copy_from_slice(&got);
        self.pos += got.len() as u64;
        Ok(got.len())
    }
}

impl ::parquet::file::reader::ChunkReader for ParquetSource {
    type T = ParquetRangeReader;

    fn get_read(&self, start: u64) -> ::parquet::errors::Result<Self::T> {
        Ok(ParquetRangeReader {
            source: self.clone(),
            pos: start,
        })
    }

    fn get_bytes(&self, start: u64, length: usize) -> ::parquet::errors::Result<Bytes> {
        let got = self
            .bytes_at(start, length as u64)
            .map_err(|e| ::parquet::errors::ParquetError::External(Box::new(e)))?;
        if got.len() != length {
            return Err(::parquet::errors::ParquetError::EOF(format!(
                "{}: wanted {length} bytes at {start}, the object has {}",
                self.object.url,
                got.len()
            )));
        }
        Ok(got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_told_from_paths() {
        for url in [
            "s3://bucket/crawl/a.warc.gz",
            "S3://bucket/x",
            "gs://b/k.parquet",
            "az://container/k",
            "abfss://c@account.dfs.core.windows.net/k",
            "https://example.org/dump.jsonl.zst",
            "http://127.0.0.1:9000/b/",
        ] {
            assert!(is_url(Path::new(url)), "{url}");
        }
        for path in [
            "crawl/a.warc.gz",
            "/abs/s3/x",
            "s3:/x",
            "file:///tmp/x.jsonl",
            "ftp://host/x",
            "",
        ] {
            assert!(!is_url(Path::new(path)), "{path}");
        }
    }

    fn base_of(url: &str) -> String {
        let url = Url::parse(url).unwrap();
        let (_, path) = ObjectStoreScheme::parse(&url).unwrap();
        store_base(&url, &path).unwrap().to_string()
    }

    #[test]
    fn a_store_is_the_url_without_the_object_path() {
        assert_eq!(base_of("s3://bucket/crawl/a.warc.gz"), "s3://bucket/");
        assert_eq!(base_of("s3://bucket/crawl/"), "s3://bucket/");
        assert_eq!(base_of("s3://bucket"), "s3://bucket/");
        assert_eq!(base_of("gs://b/x/y/z.parquet"), "gs://b/");
        assert_eq!(
            base_of("https://host:8080/a/b.jsonl?x=1"),
            "https://host:8080/"
        );
        // Path-style S3 URLs keep the bucket in the store's URL.
        assert_eq!(
            base_of("https://s3.us-east-1.amazonaws.com/bucket/k/x.warc.gz"),
            "https://s3.us-east-1.amazonaws.com/bucket/"
        );
    }

    #[test]
    fn object_urls_round_trip_through_their_store() {
        let url = "s3://bucket/crawl/2024/a%20b.warc.gz";
        let parsed = Url::parse(url).unwrap();
        let (_, path) = ObjectStoreScheme::parse(&parsed).unwrap();
        let at = Located {
            store: Arc::new(object_store::memory::InMemory::new()),
            base: store_base(&parsed, &path).unwrap(),
            path: path.clone(),
        };
        assert_eq!(path.as_ref(), "crawl/2024/a b.warc.gz");
        assert_eq!(at.url_of(&path), url);
    }

    /// An object of `bytes` in an in-memory store, opened as if its HEAD had said `size`.
    fn in_memory(bytes: Vec<u8>, size: u64) -> Arc<RemoteObject> {
        let store = Arc::new(object_store::memory::InMemory::new());
        let path = ObjectPath::from("x/obj.bin");
        client()
            .unwrap()
            .runtime
            .block_on(store.put(&path, bytes.into()))
            .unwrap();
        Arc::new(RemoteObject {
            store,
            path,
            url: "s3://mem/x/obj.bin".to_owned(),
            size,
            etag: None,
        })
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn a_stream_reads_the_whole_object() {
        let bytes = pattern(100_000);
        let mut out = Vec::new();
        RemoteReader::new(in_memory(bytes.clone(), 100_000))
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, bytes);
    }

    #[test]
    fn a_body_shorter_than_its_object_is_an_error_every_time() {
        let mut reader = RemoteReader::new(in_memory(pattern(1000), 1010));
        let mut out = Vec::new();
        let err = reader.read_to_end(&mut out).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(
            err.to_string().contains("ended at byte 1000 of 1010"),
            "{err}"
        );
        assert_eq!(out.len(), 1000, "the bytes before the end are kept");
        // Never a clean end afterwards: a caller that reads again sees the failure again.
        let again = reader.read(&mut [0u8; 16]).unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn parquet_ranges_come_from_a_bounded_set_of_windows() {
        use ::parquet::file::reader::ChunkReader;
        let n = (CHUNK_BYTES as usize) * 2 + 12_345;
        let bytes = pattern(n);
        let source = ParquetSource::new(in_memory(bytes.clone(), n as u64));
        let cases = [
            (0u64, 10usize),
            (n as u64 - 8, 8),
            (5, 100),
            (CHUNK_BYTES - 3, 10),
            // Larger than a window.
            (1, CHUNK_BYTES as usize + 5),
            (2 * CHUNK_BYTES, 12_345),
        ];
        for (start, len) in cases {
            let got = source.get_bytes(start, len).unwrap();
            assert_eq!(
                &got[..],
                &bytes[start as usize..start as usize + len],
                "{start}+{len}"
            );
            let mut read = vec![0u8; len.min(64)];
            source
                .get_read(start)
                .unwrap()
                .read_exact(&mut read)
                .unwrap();
            assert_eq!(
                &read[..],
                &bytes[start as usize..start as usize + read.len()]
            );
        }
        assert!(source.windows.lock().unwrap().len() <= PARQUET_WINDOWS);
        // Past the end: an error, not short bytes.
        assert!(source.get_bytes(n as u64 - 4, 8).is_err());
    }
}
