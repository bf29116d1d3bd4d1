//! The HTTP side of a WARC `response` record: status line, headers, and the payload with its
//! transfer and content encodings undone.
//!
//! A lenient hand-written parser rather than `httparse`: crawled headers are often not valid
//! HTTP (bare LF, spaces before the colon, obsolete folding, bytes outside ASCII) and a strict
//! parser would drop pages whose HTML is perfectly usable. We only need the status code and
//! three headers.

use flate2::read::{DeflateDecoder, MultiGzDecoder, ZlibDecoder};
use memchr::memchr;
use std::io::Read;

/// The parsed head of an HTTP response held in a WARC block.
#[derive(Debug)]
pub(crate) struct HttpHead<'a> {
    /// The status code.
    pub status: u16,
    /// Header (name, value) pairs in order, both trimmed; names are not case-folded.
    pub headers: Vec<(&'a [u8], &'a [u8])>,
    /// Offset of the payload in the block.
    pub body_start: usize,
}

impl<'a> HttpHead<'a> {
    /// The first header named `name` (ASCII case-insensitive), as lossy text.
    pub(crate) fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

/// Why a payload could not be decoded.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BodyError {
    /// The decoded payload is larger than the limit.
    TooLarge,
    /// An encoding we cannot undo, or broken encoded data.
    Bad(String),
}

/// Trims ASCII spaces and tabs (and a trailing CR) from both ends.
pub(crate) fn trim(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if matches!(first, b' ' | b'\t' | b'\r') {
            s = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = s {
        if matches!(last, b' ' | b'\t' | b'\r') {
            s = rest;
        } else {
            break;
        }
    }
    s
}

/// Parses the status line and headers at the start of `block`.
pub(crate) fn parse_response(block: &[u8]) -> Result<HttpHead<'_>, String> {
    if !block.starts_with(b"HTTP/") {
        return Err("block does not start with an HTTP status line".to_owned());
    }
    let first_end = memchr(b'\n', block).ok_or("HTTP status line has no end")?;
    let status_line = trim(&block[..first_end]);
    let mut parts = status_line
        .split(|&b| b == b' ' || b == b'\t')
        .filter(|p| !p.is_empty());
    parts.next(); // "HTTP/1.1"
    let code = parts
        .next()
        .and_then(|c| std::str::from_utf8(c).ok())
        .and_then(|c| c.parse::<u16>().ok())
        .filter(|c| (100..1000).contains(c))
        .ok_or_else(|| {
            format!(
                "bad HTTP status line: {:?}",
                String::from_utf8_lossy(&status_line[..status_line.len().min(80)])
            )
        })?;
    let mut headers: Vec<(&[u8], &[u8])> = Vec::with_capacity(24);
    let mut at = first_end + 1;
    loop {
        let Some(nl) = memchr(b'\n', &block[at..]) else {
            return Err("HTTP header has no end (no blank line)".to_owned());
        };
        let line = &block[at..at + nl];
        at += nl + 1;
        let line_trimmed_cr = line.strip_suffix(b"\r").unwrap_or(line);
        if line_trimmed_cr.is_empty() {
            break;
        }
        if matches!(line[0], b' ' | b'\t') {
            // Obsolete line folding: a continuation of the previous value. We keep the first
            // line only; none of the headers we read is ever folded in practice.
            continue;
        }
        if let Some(colon) = memchr(b':', line) {
            headers.push((trim(&line[..colon]), trim(&line[colon + 1..])));
        }
        // A line without a colon is noise; skip it like browsers do.
    }
    Ok(HttpHead {
        status: code,
        headers,
        body_start: at,
    })
}

/// The media type of a Content-Type value: lower case, parameters removed.
pub(crate) fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// The `charset` parameter of a Content-Type value, unquoted, if any.
pub(crate) fn charset_param(content_type: &str) -> Option<String> {
    content_type.split(';').skip(1).find_map(|param| {
        let (name, value) = param.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("charset") {
            return None;
        }
        let value = value.trim().trim_matches(|c| c == '"' || c == '\'').trim();
        (!value.is_empty()).then(|| value.to_owned())
    })
}

/// Whether a media type is an HTML document.
pub(crate) fn is_html_media(media: &str) -> bool {
    media == "text/html" || media == "application/xhtml+xml" || media.ends_with("/html")
}

/// Whether bytes look like the start of an HTML document (for payloads without a Content-Type).
pub(crate) fn looks_like_html(bytes: &[u8]) -> bool {
    let head = &bytes[..bytes.len().min(1024)];
    let head = head.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(head);
    let start = head
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(head.len());
    let head = &head[start..];
    let lower: Vec<u8> = head.iter().map(u8::to_ascii_lowercase).collect();
    lower.starts_with(b"<!doctype html")
        || lower.starts_with(b"<html")
        || memchr::memmem::find(&lower, b"<html").is_some()
}

/// Undoes `Transfer-Encoding: chunked`. A body whose first line is not a chunk size was stored
/// de-chunked already (Common Crawl renames the header, other crawlers do not): it is returned
/// as is. A chunk stream cut short (crawlers stop at a size limit) keeps what was complete.
pub(crate) fn dechunk(body: &[u8], max: u64) -> Result<Vec<u8>, BodyError> {
    let mut out = Vec::with_capacity(body.len());
    let mut at = 0usize;
    let mut first = true;
    while let Some(nl) = memchr(b'\n', &body[at..]) {
        let line = trim(&body[at..at + nl]);
        let size_text = line.split(|&b| b == b';').next().unwrap_or(b"");
        let size = std::str::from_utf8(trim(size_text))
            .ok()
            .filter(|s| !s.is_empty())
            .and_then(|s| usize::from_str_radix(s, 16).ok());
        let Some(size) = size else {
            if first {
                return Ok(body.to_vec());
            }
            break;
        };
        first = false;
        at += nl + 1;
        if size == 0 {
            break;
        }
        let end = at.saturating_add(size).min(body.len());
        if (out.len() + (end - at)) as u64 > max {
            return Err(BodyError::TooLarge);
        }
        out.extend_from_slice(&body[at..end]);
        if end < at + size {
            break;
        }
        at = end;
        // The CRLF after the chunk data.
        if body[at..].starts_with(b"\r\n") {
            at += 2;
        } else if body[at..].starts_with(b"\n") {
            at += 1;
        }
    }
    if first {
        return Ok(body.to_vec());
    }
    Ok(out)
}

/// Reads a decoder to the end, failing once more than `max` bytes come out.
fn read_limited(mut r: impl Read, max: u64, what: &str) -> Result<Vec<u8>, BodyError> {
    let mut out = Vec::new();
    r.by_ref()
        .take(max.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| BodyError::Bad(format!("bad {what} payload: {e}")))?;
    if out.len() as u64 > max {
        return Err(BodyError::TooLarge);
    }
    Ok(out)
}

/// The payload of a response with transfer and content encodings undone, at most `max` bytes.
pub(crate) fn decode_payload(
    head: &HttpHead<'_>,
    block: &[u8],
    max: u64,
) -> Result<Vec<u8>, BodyError> {
    let raw = &block[head.body_start.min(block.len())..];
    let chunked = head
        .header("Transfer-Encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        dechunk(raw, max)?
    } else {
        if raw.len() as u64 > max {
            return Err(BodyError::TooLarge);
        }
        raw.to_vec()
    };
    let encoding = head
        .header("Content-Encoding")
        .map(|e| e.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let decoded = match encoding.as_str() {
        "" | "identity" | "none" => return Ok(body),
        "gzip" | "x-gzip" => read_limited(MultiGzDecoder::new(&body[..]), max, "gzip"),
        "deflate" => read_limited(ZlibDecoder::new(&body[..]), max, "deflate")
            .or_else(|_| read_limited(DeflateDecoder::new(&body[..]), max, "deflate")),
        other => Err(BodyError::Bad(format!(
            "unsupported Content-Encoding: {other}"
        ))),
    };
    match decoded {
        // Many crawlers store the decoded payload but keep the Content-Encoding header.
        Err(BodyError::Bad(_)) if looks_like_html(&body) => Ok(body),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use std::io::Write;

    #[test]
    fn parses_lenient_headers() {
        let block = b"HTTP/1.1 404 Not Found\r\nContent-Type : text/html; charset=\"ISO-8859-1\"\nX-Bad header\r\n folded\r\n\r\nbody";
        let head = parse_response(block).unwrap();
        assert_eq!(head.status, 404);
        let ct = head.header("content-type").unwrap();
        assert_eq!(ct, "text/html; charset=\"ISO-8859-1\"");
        assert_eq!(media_type(&ct), "text/html");
        assert_eq!(charset_param(&ct).as_deref(), Some("ISO-8859-1"));
        assert_eq!(&block[head.body_start..], b"body");
        assert!(parse_response(b"HTTP/1.1 abc\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nA: b\r\n").is_err());
    }

    #[test]
    fn dechunks_and_keeps_unchunked_bodies() {
        let chunked = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n";
        assert_eq!(dechunk(chunked, 100).unwrap(), b"hello, world");
        // Cut short in the middle of the second chunk: keep what arrived.
        assert_eq!(
            dechunk(b"5\r\nhello\r\n7\r\n, wo", 100).unwrap(),
            b"hello, wo"
        );
        // Not chunked at all although the header said so.
        assert_eq!(dechunk(b"<html>x</html>", 100).unwrap(), b"<html>x</html>");
        assert_eq!(dechunk(chunked, 8), Err(BodyError::TooLarge));
    }

    #[test]
    fn gunzips_content_encoding_with_a_limit() {
        let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(b"<html>hello</html>").unwrap();
        let body = gz.finish().unwrap();
        let mut block = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n\r\n".to_vec();
        block.extend_from_slice(&body);
        let head = parse_response(&block).unwrap();
        assert_eq!(
            decode_payload(&head, &block, 1000).unwrap(),
            b"<html>hello</html>"
        );
        assert_eq!(decode_payload(&head, &block, 10), Err(BodyError::TooLarge));
        // Header says gzip, payload is plain HTML: keep it.
        let plain = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n\r\n<html>x</html>";
        let head = parse_response(plain).unwrap();
        assert_eq!(
            decode_payload(&head, plain, 1000).unwrap(),
            b"<html>x</html>"
        );
        let br = b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\n\r\n\x0b\x02\x80";
        let head = parse_response(br).unwrap();
        assert!(matches!(
            decode_payload(&head, br, 1000),
            Err(BodyError::Bad(_))
        ));
    }

    #[test]
    fn recognises_html() {
        assert!(is_html_media("text/html"));
        assert!(is_html_media("application/xhtml+xml"));
        assert!(!is_html_media("application/pdf"));
        assert!(looks_like_html(b"\xEF\xBB\xBF  <!DOCTYPE html><p>"));
        assert!(!looks_like_html(b"%PDF-1.4"));
    }
}
