//! JSON Lines reader (plain, gzip or zstd): one object per line with a text field (`text` unless
//! configured), and optional `url` and `id`.
//!
//! Offsets in origins and drops are the byte offset of the line in the decoded stream (for a
//! plain file, its offset in the file): `.jsonl.gz` files are usually one gzip member, so a member
//! offset would say nothing.
//!
//! Lines are parsed with a `serde` seed that looks only at the three fields we want and skips
//! the rest without building values for them (other fields can be large: HTML, metadata).

use super::counting::CountingReader;
use super::{derived_id, ReadOptions};
use crate::records::{Body, Origin, RawRecord};
use crate::stats::{Drop, DropReason};
use flate2::bufread::MultiGzDecoder;
use memchr::memchr;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read};

/// The decoded input, line by line.
enum Lines<R> {
    Plain(CountingReader<R>),
    Gzip(BufReader<MultiGzDecoder<CountingReader<R>>>),
    Zstd(BufReader<zstd::stream::read::Decoder<'static, CountingReader<R>>>),
    /// A decoder that could not start: its error on the first read, then nothing.
    Broken(Option<io::Error>),
}

/// The first bytes of a zstd frame.
pub const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

impl<R: Read> Lines<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        match self {
            Lines::Plain(r) => r.fill_buf(),
            Lines::Gzip(r) => r.fill_buf(),
            Lines::Zstd(r) => r.fill_buf(),
            Lines::Broken(e) => match e.take() {
                Some(e) => Err(e),
                None => Ok(&[]),
            },
        }
    }

    fn consume(&mut self, n: usize) {
        match self {
            Lines::Plain(r) => r.consume(n),
            Lines::Gzip(r) => r.consume(n),
            Lines::Zstd(r) => r.consume(n),
            Lines::Broken(_) => {}
        }
    }

    fn consumed(&self) -> u64 {
        match self {
            Lines::Plain(r) => r.consumed(),
            Lines::Gzip(r) => r.get_ref().get_ref().consumed(),
            Lines::Zstd(r) => r.get_ref().get_ref().consumed(),
            Lines::Broken(_) => 0,
        }
    }
}

/// What one line read gave.
enum LineRead {
    /// A line is in the line buffer.
    Line,
    /// A line longer than the limit (its bytes were skipped): its length.
    TooLong(u64),
    /// No more lines.
    Eof,
}

/// Which of our fields a key is.
enum Key {
    Text,
    Url,
    Id,
    Other,
}

/// Deserializes a key into a [`Key`] without allocating it.
struct KeySeed<'a>(&'a str);

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Key;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Key, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for KeySeed<'_> {
    type Value = Key;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
        Ok(if v == self.0 {
            Key::Text
        } else if v == "url" {
            Key::Url
        } else if v == "id" {
            Key::Id
        } else {
            Key::Other
        })
    }
}

/// The fields of one line that we keep.
#[derive(Default)]
struct Fields {
    text: Option<Value>,
    url: Option<Value>,
    id: Option<Value>,
}

/// Deserializes one line's object into [`Fields`], skipping other fields.
struct LineSeed<'a>(&'a str);

impl<'de> DeserializeSeed<'de> for LineSeed<'_> {
    type Value = Fields;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Fields, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for LineSeed<'_> {
    type Value = Fields;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
        let mut fields = Fields::default();
        while let Some(key) = map.next_key_seed(KeySeed(self.0))? {
            match key {
                Key::Text => fields.text = Some(map.next_value()?),
                Key::Url => fields.url = Some(map.next_value()?),
                Key::Id => fields.id = Some(map.next_value()?),
                Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(fields)
    }
}

/// A string field, or a number written as text (ids often are numbers).
fn as_text(v: Option<Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Streams [`RawRecord`]s (`Body::Text`) from a JSON Lines input.
pub struct JsonlReader<R> {
    lines: Lines<R>,
    file: String,
    text_field: String,
    max_line: u64,
    line: Vec<u8>,
    /// Decoded offset of the next line.
    offset: u64,
    done: bool,
}

impl<R: Read> JsonlReader<R> {
    /// Reads `reader`; gzip and zstd are detected from its first bytes. `file` names it in
    /// origins.
    pub fn new(reader: R, file: impl Into<String>, opts: &ReadOptions) -> Self {
        let mut raw = CountingReader::with_capacity(opts.buffer_bytes, reader);
        // A read error here comes back on the first line read.
        let head = raw.fill_at_least(4).map(<[u8]>::to_vec).unwrap_or_default();
        let buffer = opts.buffer_bytes.max(4096);
        let lines = if head.starts_with(&[0x1f, 0x8b]) {
            Lines::Gzip(BufReader::with_capacity(buffer, MultiGzDecoder::new(raw)))
        } else if head.starts_with(&ZSTD_MAGIC) {
            match zstd::stream::read::Decoder::with_buffer(raw) {
                Ok(d) => Lines::Zstd(BufReader::with_capacity(buffer, d)),
                // Only setting up the decoder's context can fail here: the file is then
                // reported unreadable on the first line read.
                Err(e) => Lines::Broken(Some(e)),
            }
        } else {
            Lines::Plain(raw)
        };
        JsonlReader {
            lines,
            file: file.into(),
            text_field: opts.text_field.clone(),
            max_line: opts.max_page_bytes,
            line: Vec::new(),
            offset: 0,
            done: false,
        }
    }

    /// Input bytes consumed so far (compressed bytes for gzip).
    pub fn bytes_consumed(&self) -> u64 {
        self.lines.consumed()
    }

    fn drop_at(&self, reason: DropReason, offset: u64, detail: impl Into<String>) -> Drop {
        Drop {
            reason,
            file: self.file.clone(),
            offset,
            detail: detail.into(),
        }
    }

    /// Reads the next line into `self.line` (without its line break), skipping lines over the
    /// limit without buffering them.
    fn read_line(&mut self) -> io::Result<LineRead> {
        self.line.clear();
        let mut len: u64 = 0;
        let mut any = false;
        loop {
            let buf = self.lines.fill_buf()?;
            if buf.is_empty() {
                return Ok(if !any {
                    LineRead::Eof
                } else if len > self.max_line {
                    LineRead::TooLong(len)
                } else {
                    LineRead::Line
                });
            }
            any = true;
            let (take, line_end) = match memchr(b'\n', buf) {
                Some(i) => (i, true),
                None => (buf.len(), false),
            };
            if len + take as u64 <= self.max_line {
                self.line.extend_from_slice(&buf[..take]);
            }
            len += take as u64;
            let used = take + usize::from(line_end);
            self.lines.consume(used);
            self.offset += used as u64;
            if line_end {
                return Ok(if len > self.max_line {
                    LineRead::TooLong(len)
                } else {
                    LineRead::Line
                });
            }
        }
    }

    /// Turns the line in the buffer into a record or a drop; `None` for a blank line.
    fn parse_line(&self, start: u64) -> Option<Result<RawRecord, Drop>> {
        let mut line = &self.line[..];
        if start == 0 {
            line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            return None;
        }
        let mut de = serde_json::Deserializer::from_slice(line);
        let parsed = LineSeed(&self.text_field)
            .deserialize(&mut de)
            .and_then(|fields| de.end().map(|()| fields));
        let fields = match parsed {
            Ok(f) => f,
            Err(e) => {
                return Some(Err(self.drop_at(
                    DropReason::InvalidJson,
                    start,
                    e.to_string(),
                )))
            }
        };
        let text = match fields.text {
            Some(Value::String(s)) => s,
            Some(_) => {
                return Some(Err(self.drop_at(
                    DropReason::MissingText,
                    start,
                    format!("field `{}` is not a string", self.text_field),
                )))
            }
            None => {
                return Some(Err(self.drop_at(
                    DropReason::MissingText,
                    start,
                    format!("no field `{}`", self.text_field),
                )))
            }
        };
        Some(Ok(RawRecord {
            origin: Origin {
                file: self.file.clone(),
                offset: start,
            },
            url: as_text(fields.url).unwrap_or_default(),
            record_id: as_text(fields.id).unwrap_or_else(|| derived_id(&self.file, start)),
            body: Body::Text(text),
        }))
    }
}

impl<R: Read> Iterator for JsonlReader<R> {
    type Item = Result<RawRecord, Drop>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            let start = self.offset;
            match self.read_line() {
                Ok(LineRead::Line) => {
                    if let Some(item) = self.parse_line(start) {
                        return Some(item);
                    }
                }
                Ok(LineRead::TooLong(len)) => {
                    return Some(Err(self.drop_at(
                        DropReason::PageTooLarge,
                        start,
                        format!("{len}-byte line, over the {}-byte limit", self.max_line),
                    )))
                }
                Ok(LineRead::Eof) => {
                    self.done = true;
                    if self.lines.consumed() == 0 {
                        return Some(Err(self.drop_at(
                            DropReason::EmptyFile,
                            0,
                            "the file has no bytes",
                        )));
                    }
                }
                Err(e) => {
                    self.done = true;
                    let reason = match (&self.lines, e.kind()) {
                        (Lines::Gzip(_), io::ErrorKind::UnexpectedEof) => DropReason::TruncatedGzip,
                        (Lines::Zstd(_), io::ErrorKind::UnexpectedEof) => DropReason::TruncatedZstd,
                        (
                            Lines::Gzip(_) | Lines::Zstd(_),
                            io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData,
                        ) => DropReason::MalformedRecord,
                        // zstd reports a frame cut short as "incomplete frame", kind Other.
                        (Lines::Zstd(_), _) if e.to_string().contains("ncomplete") => {
                            DropReason::TruncatedZstd
                        }
                        _ => DropReason::UnreadableFile,
                    };
                    return Some(Err(self.drop_at(reason, start, e.to_string())));
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(data: &[u8], field: &str) -> Vec<Result<RawRecord, Drop>> {
        let opts = ReadOptions {
            text_field: field.to_owned(),
            ..ReadOptions::default()
        };
        JsonlReader::new(data, "t.jsonl", &opts).collect()
    }

    #[test]
    fn reads_fields_and_reports_bad_lines_with_offsets() {
        let l0 =
            "{\"text\": \"hello\", \"url\": \"http://a/\", \"id\": 7, \"meta\": {\"x\": [1,2]}}\n";
        let l1 = "\n";
        let l2 = "not json\n";
        let l3 = "{\"url\": \"http://b/\"}\r\n";
        let l4 = "{\"text\": 5}\n";
        let l5 = "[1, 2]\n";
        let l6 = "{\"text\": \"last, no newline\"}";
        let data = [l0, l1, l2, l3, l4, l5, l6].concat();
        let out = read_all(data.as_bytes(), "text");
        assert_eq!(out.len(), 6);
        let r0 = out[0].as_ref().unwrap();
        assert_eq!(r0.body, Body::Text("hello".into()));
        assert_eq!((r0.url.as_str(), r0.record_id.as_str()), ("http://a/", "7"));
        let off2 = (l0.len() + l1.len()) as u64;
        let e = out[1].as_ref().unwrap_err();
        assert_eq!((e.reason, e.offset), (DropReason::InvalidJson, off2));
        let off3 = off2 + l2.len() as u64;
        let e = out[2].as_ref().unwrap_err();
        assert_eq!((e.reason, e.offset), (DropReason::MissingText, off3));
        let e = out[3].as_ref().unwrap_err();
        assert_eq!(e.reason, DropReason::MissingText);
        let e = out[4].as_ref().unwrap_err();
        assert_eq!(e.reason, DropReason::InvalidJson);
        let off6 = (data.len() - l6.len()) as u64;
        let r6 = out[5].as_ref().unwrap();
        assert_eq!(r6.body, Body::Text("last, no newline".into()));
        assert_eq!(r6.origin.offset, off6);
        assert_eq!(r6.record_id, format!("t.jsonl@{off6}"));
    }

    /// zstd (`.jsonl.zst`, compressed by the reference library's encoder) reads as the plain
    /// lines do, offsets in the decoded stream; a file cut short keeps every line before the cut
    /// and reports `truncated_zstd`.
    #[test]
    fn zstd_reads_as_plain_and_a_cut_keeps_what_came_before() {
        // Enough varied text for several zstd blocks (128 KiB each), so a cut falls after some.
        let mut x = 7u64;
        let lines: Vec<String> = (0..20_000)
            .map(|i| {
                let words: Vec<String> = (0..8)
                    .map(|_| {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        format!("{:x}", x >> 40)
                    })
                    .collect();
                format!("{{\"text\": \"{}\", \"id\": {i}}}\n", words.join(" "))
            })
            .collect();
        let data = lines.concat();
        let plain = read_all(data.as_bytes(), "text");
        let packed = zstd::encode_all(data.as_bytes(), 3).expect("encode");
        let got = read_all(&packed, "text");
        assert_eq!(got.len(), lines.len());
        for (a, b) in plain.iter().zip(&got) {
            let (a, b) = (a.as_ref().expect("plain"), b.as_ref().expect("zstd"));
            assert_eq!(
                (&a.body, &a.record_id, a.origin.offset),
                (&b.body, &b.record_id, b.origin.offset)
            );
        }
        let cut = &packed[..packed.len() / 2];
        // What the reference decoder gets out of the cut file: the lines complete in it survive.
        let mut decoded = Vec::new();
        let _ = zstd::stream::read::Decoder::new(cut)
            .expect("decoder")
            .read_to_end(&mut decoded);
        let complete = decoded.iter().filter(|&&b| b == b'\n').count();
        assert!(complete > 0 && complete < lines.len(), "{complete}");
        let got = read_all(cut, "text");
        assert_eq!(
            got.len(),
            complete + 1,
            "every complete line, then the drop"
        );
        for (i, r) in got[..complete].iter().enumerate() {
            assert_eq!(r.as_ref().expect("kept").record_id, i.to_string());
        }
        let last = got[complete].as_ref().expect_err("the cut");
        assert_eq!(last.reason, DropReason::TruncatedZstd, "{}", last.detail);
    }

    #[test]
    fn configurable_text_field() {
        let out = read_all(b"{\"content\": \"c\", \"text\": 1}\n", "content");
        assert_eq!(out[0].as_ref().unwrap().body, Body::Text("c".into()));
    }

    #[test]
    fn long_lines_are_skipped_without_losing_the_next() {
        let opts = ReadOptions {
            max_page_bytes: 20,
            ..ReadOptions::default()
        };
        let long = format!("{{\"text\": \"{}\"}}\n", "x".repeat(100));
        let data = format!("{long}{{\"text\": \"ok\"}}\n");
        let out: Vec<_> = JsonlReader::new(data.as_bytes(), "t", &opts).collect();
        assert_eq!(
            out[0].as_ref().unwrap_err().reason,
            DropReason::PageTooLarge
        );
        let ok = out[1].as_ref().unwrap();
        assert_eq!(
            (ok.origin.offset, &ok.body),
            (long.len() as u64, &Body::Text("ok".into()))
        );
    }
}
