//! Decoding HTML bytes to text: which charset, and why.
//!
//! Order (close to the WHATWG "encoding sniffing" algorithm, with a check the browsers don't make):
//! 1. a byte order mark (UTF-8, UTF-16LE/BE) wins;
//! 2. the charset the HTTP `Content-Type` header declared;
//! 3. a `<meta charset>` or `<meta http-equiv="content-type" content="...; charset=...">` in the
//!    first [`META_SCAN_BYTES`] bytes (comments skipped; UTF-16 labels mean UTF-8 there, as in browsers);
//! 4. nothing usable declared: UTF-8 if the bytes are valid UTF-8, else `chardetng`'s guess.
//!
//! A declaration is *checked*: if the bytes are invalid in the declared encoding (typically a
//! latin-1 page declared UTF-8), it is rejected and the charset detected instead. And since crawls
//! are full of UTF-8 pages mislabelled with a legacy charset, a declared legacy encoding is also
//! rejected when the bytes are valid UTF-8 and contain non-ASCII: multi-byte UTF-8 sequences almost
//! never arise by chance in legacy-encoded text. Decoding itself never fails: the last resort is
//! lossy decoding (U+FFFD for invalid sequences), flagged in [`Decoded::had_errors`].

use chardetng::EncodingDetector;
use encoding_rs::{Encoding, UTF_16BE, UTF_16LE, UTF_8, WINDOWS_1252, X_USER_DEFINED};

/// How many leading bytes are searched for a `<meta>` charset declaration. The standard says 1024;
/// real pages often put a long `<head>` first, so we look a little further.
pub const META_SCAN_BYTES: usize = 4096;

/// How many bytes `chardetng` sees at most: enough for a confident guess, bounded cost.
const DETECT_BYTES: usize = 256 * 1024;

/// Where the charset used came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CharsetSource {
    /// A byte order mark.
    Bom,
    /// The HTTP `Content-Type` header.
    HttpHeader,
    /// A `<meta>` declaration in the document.
    MetaTag,
    /// Nothing usable declared, and the bytes are valid UTF-8.
    ValidUtf8,
    /// Guessed by `chardetng` from the bytes.
    Detected,
}

impl CharsetSource {
    /// A stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            CharsetSource::Bom => "bom",
            CharsetSource::HttpHeader => "http_header",
            CharsetSource::MetaTag => "meta_tag",
            CharsetSource::ValidUtf8 => "valid_utf8",
            CharsetSource::Detected => "detected",
        }
    }
}

/// A decoded document.
#[derive(Clone, Debug)]
pub struct Decoded {
    /// The text (without any BOM).
    pub text: String,
    /// The encoding used to decode.
    pub encoding: &'static Encoding,
    /// Where that encoding came from.
    pub source: CharsetSource,
    /// A declared encoding that was rejected because the bytes did not fit it, with where it was
    /// declared.
    pub rejected: Option<(&'static Encoding, CharsetSource)>,
    /// Whether some bytes were invalid in the encoding used and were replaced by U+FFFD.
    pub had_errors: bool,
}

impl Decoded {
    /// One line saying which charset was used and why (for logs and drop details).
    pub fn reason(&self) -> String {
        let mut s = format!("{} from {}", self.encoding.name(), self.source.as_str());
        if let Some((enc, src)) = self.rejected {
            s.push_str(&format!(
                " (declared {} in {} rejected: bytes do not fit it)",
                enc.name(),
                src.as_str()
            ));
        }
        if self.had_errors {
            s.push_str(" (lossy)");
        }
        s
    }
}

/// Decodes an HTML document. `http_charset` is the HTTP `Content-Type` header value, or just its
/// charset label (`"text/html; charset=ISO-8859-1"` and `"ISO-8859-1"` both work). Never panics.
pub fn decode_html(bytes: &[u8], http_charset: Option<&str>) -> Decoded {
    // 1. BOM.
    if let Some((encoding, bom_len)) = Encoding::for_bom(bytes) {
        let rest = bytes.get(bom_len..).unwrap_or_default();
        let (text, had_errors) = encoding.decode_without_bom_handling(rest);
        return Decoded {
            text: text.into_owned(),
            encoding,
            source: CharsetSource::Bom,
            rejected: None,
            had_errors,
        };
    }

    // 2., 3. Declarations, each checked against the bytes; a rejected HTTP charset still lets a
    // fitting <meta> one win before detection.
    let mut rejected = None;
    let http = http_charset
        .and_then(charset_from_content_type)
        .and_then(|label| Encoding::for_label(label.as_bytes()))
        .map(|e| (e, CharsetSource::HttpHeader));
    let meta = || meta_charset(bytes).map(|e| (e, CharsetSource::MetaTag));
    for (encoding, source) in http.into_iter().chain(std::iter::from_fn(meta).take(1)) {
        if let Some(text) = decode_strict(encoding, bytes) {
            let mislabelled_utf8 =
                encoding != UTF_8 && encoding.is_ascii_compatible() && is_non_ascii_utf8(bytes);
            if !mislabelled_utf8 {
                return Decoded {
                    text,
                    encoding,
                    source,
                    rejected,
                    had_errors: false,
                };
            }
        }
        rejected.get_or_insert((encoding, source));
    }

    // 4. Detection.
    if let Ok(text) = std::str::from_utf8(bytes) {
        return Decoded {
            text: text.to_owned(),
            encoding: UTF_8,
            source: CharsetSource::ValidUtf8,
            rejected,
            had_errors: false,
        };
    }
    let mut detector = EncodingDetector::new();
    let sample = bytes.get(..DETECT_BYTES).unwrap_or(bytes);
    detector.feed(sample, true);
    // The bytes are not valid UTF-8 (checked above): do not let the detector say UTF-8.
    let encoding = detector.guess(None, false);
    let (text, had_errors) = encoding.decode_without_bom_handling(bytes);
    Decoded {
        text: text.into_owned(),
        encoding,
        source: CharsetSource::Detected,
        rejected,
        had_errors,
    }
}

/// Decodes without replacement: `None` if some bytes are invalid in `encoding`.
fn decode_strict(encoding: &'static Encoding, bytes: &[u8]) -> Option<String> {
    if encoding == UTF_8 {
        return std::str::from_utf8(bytes).ok().map(str::to_owned);
    }
    encoding
        .decode_without_bom_handling_and_without_replacement(bytes)
        .map(|c| c.into_owned())
}

/// Valid UTF-8 with at least one non-ASCII byte.
fn is_non_ascii_utf8(bytes: &[u8]) -> bool {
    !bytes.is_ascii() && std::str::from_utf8(bytes).is_ok()
}

/// The charset label in a `Content-Type` value (`text/html; charset="utf-8"`), or the value itself
/// when it is a bare label (no `/`, `;` or `=`).
pub fn charset_from_content_type(value: &str) -> Option<&str> {
    let lower = value.to_ascii_lowercase();
    if let Some(pos) = lower.find("charset") {
        let rest = value.get(pos + "charset".len()..)?.trim_start();
        let rest = rest.strip_prefix('=')?.trim_start();
        let (quoted, rest) = match rest.chars().next() {
            Some(q @ ('"' | '\'')) => (Some(q), &rest[1..]),
            _ => (None, rest),
        };
        let end = rest
            .find(|c: char| match quoted {
                Some(q) => c == q,
                None => c == ';' || c == ',' || c.is_whitespace() || c == '"' || c == '\'',
            })
            .unwrap_or(rest.len());
        let label = rest[..end].trim();
        return (!label.is_empty()).then_some(label);
    }
    let bare = value.trim();
    let is_bare = !bare.is_empty() && !bare.contains(['/', ';', '=']);
    is_bare.then_some(bare)
}

/// The encoding declared by a `<meta>` tag in the first [`META_SCAN_BYTES`] bytes, if any is
/// recognised. UTF-16 labels become UTF-8 and x-user-defined becomes windows-1252, as the standard
/// prescribes for `<meta>` (a document that can declare itself in ASCII is not UTF-16).
pub fn meta_charset(bytes: &[u8]) -> Option<&'static Encoding> {
    let head = bytes.get(..META_SCAN_BYTES).unwrap_or(bytes);
    let mut i = 0;
    while i < head.len() {
        let Some(off) = memchr_lt(&head[i..]) else {
            break;
        };
        i += off;
        let rest = &head[i..];
        if rest.starts_with(b"<!--") {
            // Skip the comment (a commented-out meta does not count).
            match find(&rest[4..], b"-->") {
                Some(end) => i += 4 + end + 3,
                None => break,
            }
            continue;
        }
        if rest.len() > 6
            && rest[..5].eq_ignore_ascii_case(b"<meta")
            && matches!(rest[5], b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' | b'/')
        {
            let (attrs, consumed) = parse_attributes(&rest[5..]);
            i += 5 + consumed;
            if let Some(enc) = meta_declaration(&attrs) {
                return Some(match enc {
                    e if e == UTF_16BE || e == UTF_16LE => UTF_8,
                    e if e == X_USER_DEFINED => WINDOWS_1252,
                    e => e,
                });
            }
            continue;
        }
        i += 1;
    }
    None
}

/// The encoding a `<meta>`'s attributes declare.
fn meta_declaration(attrs: &[(String, String)]) -> Option<&'static Encoding> {
    let get = |name: &str| {
        attrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    if let Some(label) = get("charset") {
        if let Some(e) = Encoding::for_label(label.trim().as_bytes()) {
            return Some(e);
        }
    }
    let is_content_type =
        get("http-equiv").is_some_and(|v| v.trim().eq_ignore_ascii_case("content-type"));
    if is_content_type {
        let content = get("content")?;
        // Only `charset=` inside content counts here, never a bare value.
        if content.to_ascii_lowercase().contains("charset") {
            let label = charset_from_content_type(content)?;
            return Encoding::for_label(label.as_bytes());
        }
    }
    None
}

/// Parses `name=value` attributes up to the closing `>`; returns them (names lower-cased) and how
/// many bytes were consumed.
fn parse_attributes(s: &[u8]) -> (Vec<(String, String)>, usize) {
    let mut attrs = Vec::new();
    let mut i = 0;
    let is_space = |b: u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b'\x0c');
    loop {
        while i < s.len() && (is_space(s[i]) || s[i] == b'/') {
            i += 1;
        }
        if i >= s.len() {
            return (attrs, i);
        }
        if s[i] == b'>' {
            return (attrs, i + 1);
        }
        let name_start = i;
        while i < s.len() && !is_space(s[i]) && !matches!(s[i], b'=' | b'>' | b'/') {
            i += 1;
        }
        let name = String::from_utf8_lossy(&s[name_start..i]).to_ascii_lowercase();
        while i < s.len() && is_space(s[i]) {
            i += 1;
        }
        let mut value = String::new();
        if i < s.len() && s[i] == b'=' {
            i += 1;
            while i < s.len() && is_space(s[i]) {
                i += 1;
            }
            if i < s.len() && (s[i] == b'"' || s[i] == b'\'') {
                let q = s[i];
                i += 1;
                let start = i;
                while i < s.len() && s[i] != q {
                    i += 1;
                }
                value = String::from_utf8_lossy(&s[start..i]).into_owned();
                i = (i + 1).min(s.len());
            } else {
                let start = i;
                while i < s.len() && !is_space(s[i]) && s[i] != b'>' {
                    i += 1;
                }
                value = String::from_utf8_lossy(&s[start..i]).into_owned();
            }
        }
        if !name.is_empty() {
            attrs.push((name, value));
        }
    }
}

fn memchr_lt(s: &[u8]) -> Option<usize> {
    s.iter().position(|&b| b == b'<')
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use encoding_rs::{SHIFT_JIS, WINDOWS_1252};

    #[test]
    fn content_type_parsing() {
        assert_eq!(
            charset_from_content_type("text/html; charset=ISO-8859-1"),
            Some("ISO-8859-1")
        );
        assert_eq!(
            charset_from_content_type("text/html;charset=\"utf-8\""),
            Some("utf-8")
        );
        assert_eq!(charset_from_content_type("Shift_JIS"), Some("Shift_JIS"));
        assert_eq!(charset_from_content_type("text/html"), None);
        assert_eq!(charset_from_content_type("text/html; charset="), None);
    }

    #[test]
    fn bom_wins_over_declarations() {
        let mut bytes = vec![0xEF, 0xBB, 0xBF];
        bytes.extend_from_slice("<meta charset=latin1>café".as_bytes());
        let d = decode_html(&bytes, Some("windows-1252"));
        assert_eq!(d.source, CharsetSource::Bom);
        assert_eq!(d.encoding, UTF_8);
        assert!(d.text.ends_with("café"));
        assert!(!d.text.starts_with('\u{feff}'));
    }

    #[test]
    fn meta_variants() {
        assert_eq!(
            meta_charset(b"<html><head><META CHARSET='Shift_JIS'>"),
            Some(SHIFT_JIS)
        );
        assert_eq!(
            meta_charset(
                b"<meta http-equiv=\"Content-Type\" content=\"text/html; charset=windows-1252\">"
            ),
            Some(WINDOWS_1252)
        );
        assert_eq!(meta_charset(b"<!-- <meta charset=shift_jis> --><p>x"), None);
        assert_eq!(meta_charset(b"<meta charset=utf-16le>"), Some(UTF_8));
        assert_eq!(meta_charset(b"<metadata charset=shift_jis>"), None);
        assert_eq!(meta_charset(b"<meta charset=nonsense>"), None);
    }

    #[test]
    fn http_header_is_honoured_when_bytes_fit() {
        // "café" in windows-1252: 0xE9 is é.
        let d = decode_html(b"<p>caf\xe9</p>", Some("text/html; charset=windows-1252"));
        assert_eq!(d.source, CharsetSource::HttpHeader);
        assert_eq!(d.text, "<p>café</p>");
        assert!(d.rejected.is_none());
    }

    #[test]
    fn utf8_mislabelled_as_latin1_is_read_as_utf8() {
        let d = decode_html("<meta charset=iso-8859-1><p>café</p>".as_bytes(), None);
        assert_eq!(d.encoding, UTF_8);
        assert_eq!(d.rejected.map(|r| r.0), Some(WINDOWS_1252));
        assert!(d.text.contains("café"));
    }

    #[test]
    fn rejected_http_charset_falls_back_to_meta() {
        let d = decode_html(
            b"<meta charset=windows-1252><p>caf\xe9",
            Some("text/html; charset=utf-8"),
        );
        assert_eq!(d.source, CharsetSource::MetaTag);
        assert_eq!(d.encoding, WINDOWS_1252);
        assert_eq!(d.rejected, Some((UTF_8, CharsetSource::HttpHeader)));
        assert!(d.text.ends_with("café"));
    }

    #[test]
    fn garbage_never_panics() {
        let bytes: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
        let d = decode_html(&bytes, Some("charset=\"unterminated"));
        assert!(!d.text.is_empty());
        let d = decode_html(b"<meta charset=\"", None);
        assert_eq!(d.source, CharsetSource::ValidUtf8);
        let d = decode_html(b"", None);
        assert_eq!(d.text, "");
    }
}
