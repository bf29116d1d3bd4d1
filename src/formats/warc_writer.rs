//! A WARC/1.0 writer, and `pack_html_dir`: a folder of HTML pages as a crawl dump
//! (`backflow warc-pack DIR --out FILE`).
//!
//! With gzip on, every record is its own gzip member, as Common Crawl writes them, so a reader
//! can seek to any record's offset and decode just that member.

use super::file_url;
use super::html_dir::{walk_sorted, InputError};
use flate2::write::GzEncoder;
use flate2::Compression;
use memchr::{memchr, memmem};
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Counts the bytes written through it.
struct CountingWriter<W> {
    inner: W,
    written: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// RFC 4648 base32 (the WARC digest encoding), without padding for 20-byte SHA-1 digests.
pub fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
        acc &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(ALPHABET[((acc << (5 - bits)) & 31) as usize] as char);
    }
    while !out.len().is_multiple_of(8) {
        out.push('=');
    }
    out
}

/// `sha1:<base32>` of `bytes`, the form of WARC-Block-Digest and WARC-Payload-Digest.
pub fn sha1_digest(bytes: &[u8]) -> String {
    format!(
        "sha1:{}",
        base32(&sha1_smol::Sha1::from(bytes).digest().bytes())
    )
}

/// A time as a WARC-Date (`2024-01-31T12:00:00Z`, UTC, second precision).
pub fn format_warc_date(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A name-based (version 5 layout) UUID from a SHA-1 of `parts`: records written twice from
/// the same input get the same id.
fn record_uuid(parts: &[&[u8]]) -> String {
    let mut h = sha1_smol::Sha1::new();
    for p in parts {
        h.update(p);
        h.update(&[0]);
    }
    let mut b = [0u8; 16];
    b.copy_from_slice(&h.digest().bytes()[..16]);
    b[6] = (b[6] & 0x0f) | 0x50;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Writes WARC/1.0 records to `W`, plain or one gzip member per record.
pub struct WarcWriter<W: Write> {
    out: CountingWriter<W>,
    gzip: bool,
    records: u64,
}

impl<W: Write> WarcWriter<W> {
    /// A writer over `out`; `gzip` makes each record its own gzip member.
    pub fn new(out: W, gzip: bool) -> Self {
        WarcWriter {
            out: CountingWriter {
                inner: out,
                written: 0,
            },
            gzip,
            records: 0,
        }
    }

    /// Bytes written so far: the offset the next record will start at.
    pub fn bytes_written(&self) -> u64 {
        self.out.written
    }

    /// Records written so far.
    pub fn records_written(&self) -> u64 {
        self.records
    }

    /// Writes one record of type `warc_type` with the given block and returns its offset.
    ///
    /// Writes WARC-Type, WARC-Record-ID (deterministic from type, URL, date and block),
    /// WARC-Date, WARC-Target-URI (when `url` is given), the `extra` fields, Content-Type,
    /// WARC-Block-Digest and Content-Length. Field values with line breaks are refused.
    pub fn write_record(
        &mut self,
        warc_type: &str,
        url: Option<&str>,
        date: SystemTime,
        content_type: &str,
        extra: &[(&str, &str)],
        block: &[u8],
    ) -> io::Result<u64> {
        let date = format_warc_date(date);
        let block_digest = sha1_digest(block);
        let id = record_uuid(&[
            warc_type.as_bytes(),
            url.unwrap_or("").as_bytes(),
            date.as_bytes(),
            block_digest.as_bytes(),
        ]);
        let mut head = String::with_capacity(512);
        head.push_str("WARC/1.0\r\n");
        let mut field = |name: &str, value: &str| -> io::Result<()> {
            if value.contains(['\r', '\n']) || name.contains(['\r', '\n', ':']) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("WARC field {name} has a line break or colon in it: {value:?}"),
                ));
            }
            head.push_str(name);
            head.push_str(": ");
            head.push_str(value);
            head.push_str("\r\n");
            Ok(())
        };
        field("WARC-Type", warc_type)?;
        field("WARC-Record-ID", &format!("<urn:uuid:{id}>"))?;
        field("WARC-Date", &date)?;
        if let Some(url) = url {
            field("WARC-Target-URI", url)?;
        }
        for (name, value) in extra {
            field(name, value)?;
        }
        field("Content-Type", content_type)?;
        field("WARC-Block-Digest", &block_digest)?;
        field("Content-Length", &block.len().to_string())?;
        head.push_str("\r\n");

        let offset = self.out.written;
        if self.gzip {
            let mut gz = GzEncoder::new(&mut self.out, Compression::default());
            gz.write_all(head.as_bytes())?;
            gz.write_all(block)?;
            gz.write_all(b"\r\n\r\n")?;
            gz.finish()?;
        } else {
            self.out.write_all(head.as_bytes())?;
            self.out.write_all(block)?;
            self.out.write_all(b"\r\n\r\n")?;
        }
        self.records += 1;
        Ok(offset)
    }

    /// Writes a `warcinfo` record naming the file and listing `fields` (`name: value` lines,
    /// `application/warc-fields`). Returns its offset.
    pub fn write_warcinfo(
        &mut self,
        filename: &str,
        date: SystemTime,
        fields: &[(&str, &str)],
    ) -> io::Result<u64> {
        let mut block = String::new();
        for (name, value) in fields {
            block.push_str(name);
            block.push_str(": ");
            block.push_str(value);
            block.push_str("\r\n");
        }
        self.write_record(
            "warcinfo",
            None,
            date,
            "application/warc-fields",
            &[("WARC-Filename", filename)],
            block.as_bytes(),
        )
    }

    /// Writes a `response` record for `url` whose block is an HTTP response (status line,
    /// headers, blank line, payload). Adds WARC-Payload-Digest when the payload can be found.
    /// Returns the record's offset.
    pub fn write_response(&mut self, url: &str, date: SystemTime, http: &[u8]) -> io::Result<u64> {
        let payload = memmem::find(http, b"\r\n\r\n")
            .map(|i| &http[i + 4..])
            .or_else(|| memmem::find(http, b"\n\n").map(|i| &http[i + 2..]));
        let digest = payload.map(sha1_digest);
        let extra: Vec<(&str, &str)> = digest
            .as_deref()
            .map(|d| ("WARC-Payload-Digest", d))
            .into_iter()
            .collect();
        self.write_record(
            "response",
            Some(url),
            date,
            "application/http; msgtype=response",
            &extra,
            http,
        )
    }

    /// Flushes and returns the underlying writer.
    pub fn into_inner(mut self) -> io::Result<W> {
        self.out.flush()?;
        Ok(self.out.inner)
    }
}

/// The charset a page declares in a `<meta>` tag (`<meta charset=...>` or the `http-equiv`
/// Content-Type form) in its first 4 KiB, lower case.
pub fn meta_charset(html: &[u8]) -> Option<String> {
    let head: Vec<u8> = html[..html.len().min(4096)]
        .iter()
        .map(u8::to_ascii_lowercase)
        .collect();
    let mut at = 0;
    while let Some(i) = memmem::find(&head[at..], b"<meta") {
        let start = at + i;
        let end = memchr(b'>', &head[start..]).map_or(head.len(), |j| start + j);
        let tag = &head[start..end];
        if let Some(c) = memmem::find(tag, b"charset") {
            let rest = &tag[c + b"charset".len()..];
            let rest = rest.trim_ascii_start();
            if let Some(rest) = rest.strip_prefix(b"=") {
                let rest = rest.trim_ascii_start();
                let rest = rest
                    .strip_prefix(b"\"")
                    .or_else(|| rest.strip_prefix(b"'"))
                    .unwrap_or(rest);
                let len = rest
                    .iter()
                    .position(|b| !(b.is_ascii_alphanumeric() || b"-_.:".contains(b)))
                    .unwrap_or(rest.len());
                if len > 0 {
                    return Some(String::from_utf8_lossy(&rest[..len]).into_owned());
                }
            }
        }
        at = end;
    }
    None
}

/// What `pack_html_dir` wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackSummary {
    /// The WARC file written.
    pub output: PathBuf,
    /// Pages packed (one `response` record each, after one `warcinfo` record).
    pub pages: u64,
    /// Bytes of HTML read.
    pub input_bytes: u64,
    /// Bytes of WARC written.
    pub output_bytes: u64,
}

/// Why packing failed.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// The folder could not be listed.
    #[error(transparent)]
    Input(#[from] InputError),
    /// A page could not be read or the output written.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The folder has no `.html`/`.htm` file.
    #[error("no .html or .htm file under {0}")]
    NoPages(PathBuf),
}

/// Whether a file is an HTML page by its extension.
fn is_page(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("html") || e.eq_ignore_ascii_case("htm"))
}

/// The page's path under `dir` with `/` separators.
fn relative_url_path(dir: &Path, page: &Path) -> String {
    let rel = page.strip_prefix(dir).unwrap_or(page);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

/// Packs every `.html`/`.htm` file under `dir` (recursive, sorted by path) into a WARC/1.0 file
/// at `out_path` (gzip, one member per record, when it ends in `.gz`): a `warcinfo` record,
/// then one `response` record per page with an `HTTP/1.1 200` header whose Content-Type
/// charset is the one the page's `<meta>` declares (else `utf-8`), and URL
/// `file:///<relative path>`. Dates are the files' modification times, so packing the same
/// folder twice gives the same bytes. Written to `<out_path>.tmp` and renamed when complete.
pub fn pack_html_dir(dir: &Path, out_path: &Path) -> Result<PackSummary, PackError> {
    // Regular files only: a FIFO named like a page would block the packer.
    let pages = walk_sorted(dir, &|p| {
        is_page(p) && std::fs::metadata(p).is_ok_and(|m| m.is_file())
    })?;
    if pages.is_empty() {
        return Err(PackError::NoPages(dir.to_path_buf()));
    }
    let mut tmp = out_path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let result = write_pack(dir, &pages, out_path, &tmp);
    if result.is_err() {
        // Best effort: the error being reported matters more than a leftover temporary file.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn write_pack(
    dir: &Path,
    pages: &[PathBuf],
    out_path: &Path,
    tmp: &Path,
) -> Result<PackSummary, PackError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PackError::Io { path, source }
    };
    let mtime = |p: &Path| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .map_err(io_err(p))
    };
    let mut newest = UNIX_EPOCH;
    for p in pages {
        newest = newest.max(mtime(p)?);
    }
    let gzip = out_path
        .to_string_lossy()
        .to_ascii_lowercase()
        .ends_with(".gz");
    let file = File::create(tmp).map_err(io_err(tmp))?;
    let mut w = WarcWriter::new(BufWriter::with_capacity(1 << 20, file), gzip);
    let filename = out_path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let description = format!("{} HTML pages packed by backflow warc-pack", pages.len());
    w.write_warcinfo(
        &filename,
        newest,
        &[
            ("software", concat!("backflow/", env!("CARGO_PKG_VERSION"))),
            ("format", "WARC File Format 1.0"),
            ("description", &description),
        ],
    )
    .map_err(io_err(tmp))?;
    let mut input_bytes = 0u64;
    for page in pages {
        let html = std::fs::read(page).map_err(io_err(page))?;
        input_bytes += html.len() as u64;
        let charset = meta_charset(&html).unwrap_or_else(|| "utf-8".to_owned());
        let mut http = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset={charset}\r\nContent-Length: {}\r\n\r\n",
            html.len()
        )
        .into_bytes();
        http.extend_from_slice(&html);
        let url = file_url(&format!("/{}", relative_url_path(dir, page)));
        w.write_response(&url, mtime(page)?, &http)
            .map_err(io_err(tmp))?;
    }
    let output_bytes = w.bytes_written();
    let file = w
        .into_inner()
        .map_err(io_err(tmp))?
        .into_inner()
        .map_err(|e| PackError::Io {
            path: tmp.to_path_buf(),
            source: e.into_error(),
        })?;
    file.sync_all().map_err(io_err(tmp))?;
    drop(file);
    std::fs::rename(tmp, out_path).map_err(io_err(out_path))?;
    Ok(PackSummary {
        output: out_path.to_path_buf(),
        pages: pages.len() as u64,
        input_bytes,
        output_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn base32_and_sha1_match_published_values() {
        // RFC 4648 section 10 test vectors.
        assert_eq!(base32(b""), "");
        assert_eq!(base32(b"f"), "MY======");
        assert_eq!(base32(b"fooba"), "MZXW6YTB");
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI======");
        // SHA-1 of the empty string, as WARC tools print it.
        assert_eq!(sha1_digest(b""), "sha1:3I42H3S6NNFQ2MSVX7XZKYAYSCX5QBYJ");
    }

    #[test]
    fn warc_dates() {
        assert_eq!(format_warc_date(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(format_warc_date(t), "2001-09-09T01:46:40Z");
        // A leap day.
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(format_warc_date(t), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn meta_charsets() {
        assert_eq!(
            meta_charset(b"<head><meta charset=\"utf-8\" />").as_deref(),
            Some("utf-8")
        );
        assert_eq!(
            meta_charset(
                b"<META http-equiv=\"Content-Type\" content=\"text/html; charset=ISO-8859-1\">"
            )
            .as_deref(),
            Some("iso-8859-1")
        );
        assert_eq!(
            meta_charset(b"<meta name=\"viewport\" content=\"x\"><p>charset=x</p>"),
            None
        );
    }

    #[test]
    fn record_layout_and_refused_fields() {
        let mut w = WarcWriter::new(Vec::new(), false);
        let http = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n<p>hi</p>";
        assert_eq!(w.write_response("http://x/", UNIX_EPOCH, http).unwrap(), 0);
        let second = w.bytes_written();
        assert_eq!(
            w.write_response("http://y/", UNIX_EPOCH, http).unwrap(),
            second
        );
        assert!(w
            .write_response("http://x/\r\nEvil: 1", UNIX_EPOCH, http)
            .is_err());
        let out = w.into_inner().unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("WARC/1.0\r\nWARC-Type: response\r\nWARC-Record-ID: <urn:uuid:"));
        assert!(text.contains(&format!("Content-Length: {}\r\n\r\n", http.len())));
        assert!(text.contains(&format!(
            "WARC-Payload-Digest: {}\r\n",
            sha1_digest(b"<p>hi</p>")
        )));
        let first_end = second as usize;
        assert!(out[..first_end].ends_with(b"<p>hi</p>\r\n\r\n"));
    }
}
