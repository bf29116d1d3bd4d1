//! A streaming WARC/1.0 and WARC/1.1 reader over plain or gzip input.
//!
//! # Why not the `warc` crate
//! The `warc` crate (crates.io) reads well-formed files, but we need three things it does not
//! give: the compressed offset of each record's gzip member (Common Crawl's `.warc.gz` is one
//! member per record, and that offset is how a user finds a record again), recovery from bad
//! input (resynchronise on the next `WARC/1.` line or gzip member instead of failing the file),
//! and bounded memory for huge records (skip a 2 GB video without buffering it). So we read the
//! format ourselves; it is small.
//!
//! # How it reads
//! A `Source` turns the input into a buffer of decoded bytes. For gzip it decodes one member at
//! a time (a `flate2` `bufread::GzDecoder` over a counting reader, reset at each member end) and
//! remembers where each member started in the compressed input, so a record knows its member.
//! Anything that stops decoding (end of input, a truncated member, bytes that are not gzip)
//! becomes a *barrier*: the parser sees no bytes past it until it has reported the record the
//! barrier cut, then decoding resumes at the next good member.
//!
//! [`WarcReader`] parses records from those bytes: the header up to its blank line, a block of
//! exactly `Content-Length` bytes, then `\r\n\r\n`. Blocks up to the page limit are buffered
//! whole (we need them anyway); larger ones are classified from their first 64 KiB and skipped
//! as they stream by, up to any whole WARC header that starts a line inside them (so a
//! Content-Length of 10^15 on a short body costs one record, not the rest of the file). When a record does not end where its Content-Length says, it is dropped
//! and the reader scans from the start of its block for the next line beginning `WARC/1.`
//! (a record whose length was too long swallowed the start of the next one).
//!
//! Why one file of this size: the reader is one streaming state machine (gzip members, header,
//! block, skip, resynchronisation) over one buffer; splitting it would expose that buffer's
//! invariants across files.

use super::counting::CountingReader;
use super::http::{self, trim};
use super::ReadOptions;
use crate::records::{Body, Origin, RawRecord};
use crate::stats::{Drop, DropReason};
use flate2::bufread::GzDecoder;
use memchr::{memchr, memmem};
use std::collections::VecDeque;
use std::io::{self, Read};

/// Decoded bytes asked from the input per read, at least.
const MIN_READ: usize = 64 * 1024;
/// A WARC header longer than this is not a header.
const MAX_HEADER: usize = 1 << 20;
/// How much of an oversized block is read to tell what it is before skipping it.
const CLASSIFY_PREFIX: usize = 64 * 1024;
/// Every record starts with this (WARC/1.0 and WARC/1.1).
const MAGIC: &[u8] = b"WARC/1.";
/// Whether `at` starts a whole version line (`WARC/1.0` or `WARC/1.1` then CRLF): a record
/// start even where garbage without a line break runs right up to it.
fn is_version_line(at: &[u8]) -> bool {
    at.len() >= MAGIC.len() + 3
        && matches!(at[MAGIC.len()], b'0' | b'1')
        && &at[MAGIC.len() + 1..MAGIC.len() + 3] == b"\r\n"
}

/// A record's block is followed by this.
const TRAILER: &[u8] = b"\r\n\r\n";

/// Why no more decoded bytes are available for now.
#[derive(Debug)]
enum Barrier {
    /// End of input.
    Eof,
    /// The gzip member starting at `member` ends before its end: the file was cut.
    Truncated { member: u64, detail: String },
    /// Bytes from `offset` that are not a valid gzip member; decoding goes on at the next member.
    Corrupt { offset: u64, detail: String },
    /// The input could not be read.
    Io(String),
}

/// The raw input: plain, or gzip with the member being decoded (`None` between members).
enum Input<R> {
    Plain(CountingReader<R>),
    Gzip {
        dec: Box<GzDecoder<CountingReader<R>>>,
        member: Option<u64>,
    },
}

/// Is this the start of a gzip member (magic, deflate method, reserved flag bits clear)?
fn is_gzip_start(b: &[u8]) -> bool {
    b.len() >= 3 && b[..3] == [0x1f, 0x8b, 0x08] && (b.len() < 4 || b[3] & 0xE0 == 0)
}

/// Resets the decoder for the member that starts at the reader's position. `GzDecoder::reset`
/// swaps readers, so a placeholder goes in and straight back out; the inflate state is reused
/// rather than allocated per member.
fn restart<R: Read>(dec: &mut GzDecoder<CountingReader<R>>) {
    let raw = dec.reset(CountingReader::placeholder());
    dec.reset(raw);
}

/// Skips input up to the next gzip member start at or after `min_offset` (or the end of input).
/// Returns how many bytes were skipped. Read errors stop the scan; the next read reports them.
fn scan_to_gzip_start<R: Read>(raw: &mut CountingReader<R>, min_offset: u64) -> u64 {
    let start = raw.consumed();
    loop {
        let base = raw.consumed();
        let (advance, stop) = match raw.fill_at_least(4) {
            Err(_) => (0, true),
            Ok([]) => (0, true),
            Ok(b) => {
                let mut i = (min_offset.saturating_sub(base)).min(b.len() as u64) as usize;
                let mut result = (b.len(), false);
                while let Some(j) = memchr(0x1f, &b[i..]) {
                    let k = i + j;
                    if k + 4 > b.len() && b.len() >= 4 {
                        // Too close to the end of the buffer to tell: refill from here.
                        result = (k, false);
                        break;
                    }
                    if is_gzip_start(&b[k..]) {
                        result = (k, true);
                        break;
                    }
                    i = k + 1;
                }
                result
            }
        };
        raw.consume_counted(advance);
        if stop {
            return raw.consumed() - start;
        }
    }
}

impl<R: Read> CountingReader<R> {
    /// `BufRead::consume` under a name that does not need the trait in scope.
    fn consume_counted(&mut self, n: usize) {
        io::BufRead::consume(self, n);
    }
}

/// Decoded bytes of the input in a sliding buffer, with the gzip member map and the barrier.
struct Source<R> {
    input: Input<R>,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    /// Offset in the decoded stream of `buf[pos]`.
    abs: u64,
    /// The byte before `buf[pos]` (for "is this a line start").
    prev: Option<u8>,
    /// (decoded offset where a member's bytes start, compressed offset of the member), in order.
    members: VecDeque<(u64, u64)>,
    barrier: Option<Barrier>,
    /// The buffer size we shrink back to after a huge record.
    base_capacity: usize,
}

impl<R: Read> Source<R> {
    fn new(reader: R, gzip_hint: bool, buffer_bytes: usize) -> Self {
        let mut raw = CountingReader::with_capacity(buffer_bytes, reader);
        let (gzip, barrier) = match raw.fill_at_least(4) {
            Ok(b) => (gzip_hint || is_gzip_start(b), None),
            Err(e) => (gzip_hint, Some(Barrier::Io(e.to_string()))),
        };
        let input = if gzip {
            let mut dec = Box::new(GzDecoder::new(CountingReader::placeholder()));
            dec.reset(raw);
            Input::Gzip { dec, member: None }
        } else {
            Input::Plain(raw)
        };
        let base_capacity = buffer_bytes.max(2 * MIN_READ);
        Source {
            input,
            buf: vec![0u8; base_capacity],
            pos: 0,
            end: 0,
            abs: 0,
            prev: None,
            members: VecDeque::new(),
            barrier,
            base_capacity,
        }
    }

    fn is_gzip(&self) -> bool {
        matches!(self.input, Input::Gzip { .. })
    }

    /// Input bytes consumed so far (compressed bytes for gzip); never goes back.
    fn raw_consumed(&self) -> u64 {
        match &self.input {
            Input::Plain(r) => r.progress(),
            Input::Gzip { dec, .. } => dec.get_ref().progress(),
        }
    }

    /// The decoded bytes available.
    fn avail(&self) -> &[u8] {
        &self.buf[self.pos..self.end]
    }

    /// Makes at least `n` decoded bytes available; false when a barrier comes first.
    fn ensure(&mut self, n: usize) -> bool {
        while self.end - self.pos < n {
            if self.barrier.is_some() {
                return false;
            }
            self.read_more(n);
        }
        true
    }

    /// Compacts or grows the buffer so `want` bytes from `pos` fit with room to read into.
    fn make_room(&mut self, want: usize) {
        let have = self.end - self.pos;
        let target = want.max(have) + MIN_READ;
        if self.buf.len() - self.pos >= target && self.buf.len() - self.end >= MIN_READ {
            return;
        }
        if self.pos > 0 {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end = have;
            self.pos = 0;
        }
        if self.buf.len() < target {
            self.buf.resize(target, 0);
        } else if self.buf.len() > 4 * self.base_capacity && target <= self.base_capacity {
            // Give back the memory of a huge record once it is gone.
            self.buf.truncate(self.base_capacity);
            self.buf.shrink_to_fit();
        }
    }

    /// One read of decoded bytes (or a barrier).
    fn read_more(&mut self, want: usize) {
        self.make_room(want);
        let start_abs = self.abs + (self.end - self.pos) as u64;
        match &mut self.input {
            Input::Plain(raw) => match raw.read(&mut self.buf[self.end..]) {
                Ok(0) => self.barrier = Some(Barrier::Eof),
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => self.barrier = Some(Barrier::Io(e.to_string())),
            },
            Input::Gzip { dec, member } => loop {
                if let Some(m) = *member {
                    match dec.read(&mut self.buf[self.end..]) {
                        Ok(0) => {
                            *member = None;
                            dec.get_mut().clear_mark();
                        }
                        Ok(n) => {
                            self.end += n;
                            return;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            // A damaged member can decode "validly" past its own end and into
                            // the members after it. So go back to just after its start (its
                            // bytes are still buffered unless it is huge) and look for the next
                            // member from there. It is only a truncation if none follows.
                            *member = None;
                            let raw = dec.get_mut();
                            let rewound = raw.rewind(m + 1);
                            raw.clear_mark();
                            let eof = e.kind() == io::ErrorKind::UnexpectedEof;
                            if rewound || !eof {
                                scan_to_gzip_start(raw, m + 1);
                            }
                            let more = matches!(raw.fill_at_least(1), Ok(b) if !b.is_empty());
                            self.barrier = Some(if eof && !more {
                                Barrier::Truncated {
                                    member: m,
                                    detail: format!("gzip member at offset {m} is cut short: {e}"),
                                }
                            } else {
                                Barrier::Corrupt {
                                    offset: m,
                                    detail: format!("corrupt gzip member at offset {m}: {e}"),
                                }
                            });
                            return;
                        }
                    }
                } else {
                    let raw = dec.get_mut();
                    let off = raw.consumed();
                    let start = match raw.fill_at_least(4) {
                        Err(e) => {
                            self.barrier = Some(Barrier::Io(e.to_string()));
                            return;
                        }
                        Ok([]) => {
                            self.barrier = Some(Barrier::Eof);
                            return;
                        }
                        // A member start, or the first bytes of one cut off by the end of input
                        // (the decoder then reports the truncation).
                        Ok(b) => {
                            is_gzip_start(b) || (b.len() < 3 && [0x1f, 0x8b, 0x08].starts_with(b))
                        }
                    };
                    if start {
                        restart(dec);
                        dec.get_mut().set_mark();
                        *member = Some(off);
                        self.members.push_back((start_abs, off));
                    } else {
                        let skipped = scan_to_gzip_start(dec.get_mut(), off);
                        self.barrier = Some(Barrier::Corrupt {
                            offset: off,
                            detail: format!(
                                "{skipped} bytes at offset {off} that are not gzip data"
                            ),
                        });
                        return;
                    }
                }
            },
        }
    }

    /// Consumes `n` available bytes.
    fn consume(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        self.prev = Some(self.buf[self.pos + n - 1]);
        self.pos += n;
        self.abs += n as u64;
        if self.pos == self.end {
            self.pos = 0;
            self.end = 0;
        }
        while self.members.len() >= 2 && self.members[1].0 <= self.abs {
            self.members.pop_front();
        }
    }

    /// Drops every available byte.
    fn discard(&mut self) {
        self.consume(self.end - self.pos);
    }

    /// The record offset of decoded position `abs`: the member's compressed offset for gzip.
    fn origin_of(&self, abs: u64) -> u64 {
        if !self.is_gzip() {
            return abs;
        }
        self.members
            .iter()
            .rev()
            .find(|(start, _)| *start <= abs)
            .map_or(0, |m| m.1)
    }

    /// Whether available byte `i` starts a line (or a gzip member).
    fn is_line_start(&self, i: usize) -> bool {
        let abs = self.abs + i as u64;
        if self.is_gzip() && self.members.iter().any(|(start, _)| *start == abs) {
            return true;
        }
        if i == 0 {
            matches!(self.prev, None | Some(b'\n'))
        } else {
            self.buf[self.pos + i - 1] == b'\n'
        }
    }
}

/// The WARC header fields we use.
#[derive(Debug, Default)]
struct WarcHead {
    warc_type: Option<String>,
    content_length: Option<u64>,
    target_uri: Option<String>,
    record_id: Option<String>,
    content_type: Option<String>,
    payload_type: Option<String>,
}

/// Parses the header lines (after the `WARC/1.x` line) up to the blank line.
fn parse_head(bytes: &[u8]) -> WarcHead {
    let mut head = WarcHead::default();
    for line in bytes.split(|&b| b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if matches!(line[0], b' ' | b'\t') {
            continue; // folded continuation of a field we do not need whole
        }
        let Some(colon) = memchr(b':', line) else {
            continue;
        };
        let name = trim(&line[..colon]);
        let value = trim(&line[colon + 1..]);
        let text = || Some(String::from_utf8_lossy(value).into_owned());
        if name.eq_ignore_ascii_case(b"WARC-Type") {
            head.warc_type = text();
        } else if name.eq_ignore_ascii_case(b"Content-Length") {
            head.content_length = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
        } else if name.eq_ignore_ascii_case(b"WARC-Target-URI") {
            head.target_uri = text();
        } else if name.eq_ignore_ascii_case(b"WARC-Record-ID") {
            head.record_id = text();
        } else if name.eq_ignore_ascii_case(b"Content-Type") {
            head.content_type = text();
        } else if name.eq_ignore_ascii_case(b"WARC-Identified-Payload-Type") {
            head.payload_type = text();
        }
    }
    head
}

/// Strips the angle brackets some writers put around URIs and record ids.
fn unbracket(s: &str) -> &str {
    s.strip_prefix('<')
        .and_then(|s| s.strip_suffix('>'))
        .unwrap_or(s)
}

/// The first bytes of `b`, escaped, for a drop's detail.
fn preview(b: &[u8]) -> String {
    b[..b.len().min(24)].escape_ascii().to_string()
}

/// Where the header of the record at the start of the buffer ends.
enum HeadEnd {
    Found(usize),
    Barrier,
    TooLong,
}

/// How skipping an oversized block ended.
enum BlockSkip {
    /// All of it went by.
    Whole,
    /// A barrier came first.
    Cut,
    /// A record starts this many bytes into the block (its Content-Length lied).
    RecordInside(u64),
}

/// A record in progress when a barrier came: what to report if the barrier is the end of input.
struct Cut {
    origin: u64,
    reason: DropReason,
    detail: String,
}

/// Streams WARC records from a plain or gzip reader; see the module documentation.
pub struct WarcReader<R> {
    src: Source<R>,
    file: String,
    max_page: u64,
    out: VecDeque<Result<RawRecord, Drop>>,
    done: bool,
}

impl<R: Read> WarcReader<R> {
    /// Reads WARC records from `reader`; `file` names it in origins and drops. Gzip is detected
    /// from the first bytes, or assumed when `file` ends in `.gz` (so that garbage before the
    /// first member is skipped rather than read as plain text).
    pub fn new(reader: R, file: impl Into<String>, opts: &ReadOptions) -> Self {
        let file = file.into();
        let gzip_hint = file.to_ascii_lowercase().ends_with(".gz");
        WarcReader {
            src: Source::new(reader, gzip_hint, opts.buffer_bytes),
            file,
            max_page: opts.max_page_bytes,
            out: VecDeque::new(),
            done: false,
        }
    }

    /// Input bytes consumed so far (compressed bytes for gzip): for progress and epoch chunking.
    pub fn bytes_consumed(&self) -> u64 {
        self.src.raw_consumed()
    }

    fn drop_at(&self, reason: DropReason, offset: u64, detail: impl Into<String>) -> Drop {
        Drop {
            reason,
            file: self.file.clone(),
            offset,
            detail: detail.into(),
        }
    }

    fn push_drop(&mut self, reason: DropReason, offset: u64, detail: impl Into<String>) {
        let d = self.drop_at(reason, offset, detail);
        self.out.push_back(Err(d));
    }

    /// Handles the barrier that stopped us, with the record it cut, if any.
    fn at_barrier(&mut self, cut: Option<Cut>) {
        match self.src.barrier.take().unwrap_or(Barrier::Eof) {
            Barrier::Eof => {
                if let Some(c) = cut {
                    self.push_drop(c.reason, c.origin, c.detail);
                } else if self.src.raw_consumed() == 0 {
                    self.push_drop(DropReason::EmptyFile, 0, "the file has no bytes");
                }
                self.src.barrier = Some(Barrier::Eof);
                self.done = true;
            }
            Barrier::Truncated { member, detail } => {
                let offset = cut.map_or(member, |c| c.origin);
                self.push_drop(DropReason::TruncatedGzip, offset, detail);
                self.src.barrier = Some(Barrier::Eof);
                self.done = true;
            }
            Barrier::Corrupt { offset, detail } => {
                match cut {
                    Some(c) => self.push_drop(
                        DropReason::MalformedRecord,
                        c.origin,
                        format!("record cut short: {detail}"),
                    ),
                    None => self.push_drop(DropReason::MalformedRecord, offset, detail),
                }
                // The bytes before the corruption belong to the record just reported.
                self.src.discard();
            }
            Barrier::Io(e) => {
                let at = self.src.raw_consumed();
                self.push_drop(DropReason::UnreadableFile, at, e);
                self.src.barrier = Some(Barrier::Io(String::new()));
                self.done = true;
            }
        }
    }

    /// Reads one record (or one stretch of bad input) and queues what came of it.
    fn step(&mut self) {
        // CR/LF between records is tolerated (some writers emit extra).
        loop {
            let a = self.src.avail();
            let k = a
                .iter()
                .position(|&b| b != b'\r' && b != b'\n')
                .unwrap_or(a.len());
            let rest = a.len() - k;
            self.src.consume(k);
            if rest > 0 {
                break;
            }
            if !self.src.ensure(1) {
                self.at_barrier(None);
                return;
            }
        }
        let origin = self.src.origin_of(self.src.abs);
        if !self.src.ensure(MAGIC.len()) {
            let n = self.src.avail().len();
            self.at_barrier(Some(Cut {
                origin,
                reason: DropReason::MalformedRecord,
                detail: format!("{n} bytes at the end that are not a WARC record"),
            }));
            return;
        }
        if !self.src.avail().starts_with(MAGIC) {
            self.resync(Some(origin));
            return;
        }
        let hlen = match self.find_header_end() {
            HeadEnd::Found(h) => h,
            HeadEnd::Barrier => {
                self.at_barrier(Some(Cut {
                    origin,
                    reason: DropReason::MalformedRecord,
                    detail: "WARC header cut off by the end of the input".to_owned(),
                }));
                return;
            }
            HeadEnd::TooLong => {
                self.push_drop(
                    DropReason::MalformedRecord,
                    origin,
                    format!("WARC header longer than {MAX_HEADER} bytes"),
                );
                self.src.consume(MAGIC.len());
                self.resync(None);
                return;
            }
        };
        let head = parse_head(&self.src.avail()[..hlen]);
        let Some(len) = head.content_length else {
            self.push_drop(
                DropReason::MalformedRecord,
                origin,
                "WARC header without a valid Content-Length",
            );
            self.src.consume(hlen);
            self.resync(None);
            return;
        };
        if len <= self.max_page {
            self.buffered_record(&head, origin, hlen, len as usize);
        } else {
            self.oversized_record(&head, origin, hlen, len);
        }
    }

    /// Finds the blank line that ends the header at the start of the buffer.
    fn find_header_end(&mut self) -> HeadEnd {
        let mut line_start = 0;
        loop {
            let a = self.src.avail();
            while let Some(nl) = memchr(b'\n', &a[line_start..]) {
                let line = &a[line_start..line_start + nl];
                if line.is_empty() || line == b"\r" {
                    return HeadEnd::Found(line_start + nl + 1);
                }
                line_start += nl + 1;
            }
            let have = a.len();
            if have >= MAX_HEADER {
                return HeadEnd::TooLong;
            }
            if !self.src.ensure(have + 1) {
                return HeadEnd::Barrier;
            }
        }
    }

    /// The length of the record trailer at `at` (4, or 2 for a bare-LF writer), or 0 if absent.
    fn trailer_len(&self, at: usize) -> usize {
        let a = &self.src.avail()[at..];
        if a.starts_with(TRAILER) {
            4
        } else if a.starts_with(b"\n\n") {
            2
        } else {
            0
        }
    }

    /// Whether the input ends after `at` with nothing but line breaks (a last record written
    /// without its full trailer).
    fn only_breaks_to_eof(&self, at: usize) -> bool {
        matches!(self.src.barrier, Some(Barrier::Eof))
            && self
                .src
                .avail()
                .get(at..)
                .is_some_and(|rest| rest.iter().all(|&b| b == b'\r' || b == b'\n'))
    }

    /// A record whose block fits the page limit: buffer it whole, check its trailer, classify.
    fn buffered_record(&mut self, head: &WarcHead, origin: u64, hlen: usize, len: usize) {
        let total = hlen + len;
        let tlen = if self.src.ensure(total + TRAILER.len()) {
            let tlen = self.trailer_len(total);
            if tlen == 0 {
                let after = preview(&self.src.avail()[total..]);
                self.push_drop(
                    DropReason::ContentLengthMismatch,
                    origin,
                    format!("the {len}-byte block is followed by \"{after}\", not CRLF CRLF"),
                );
                self.src.consume(hlen);
                self.resync(None);
                return;
            }
            tlen
        } else if self.src.avail().len() >= total && self.only_breaks_to_eof(total) {
            self.src.avail().len() - total
        } else if matches!(self.src.barrier, Some(Barrier::Eof)) {
            let left = self.src.avail().len() - hlen;
            self.push_drop(
                DropReason::ContentLengthMismatch,
                origin,
                format!("Content-Length {len} runs past the end of the input ({left} bytes left)"),
            );
            // A length that is too long swallowed the records after it: look for them.
            self.src.consume(hlen);
            self.resync(None);
            return;
        } else {
            self.block_cut(origin, len as u64);
            return;
        };
        let item = self.classify(head, &self.src.avail()[hlen..total], origin);
        self.out.push_back(item);
        self.src.consume(total + tlen);
    }

    /// A record larger than the page limit: tell what it is from its first bytes, then skip it
    /// as it streams by.
    fn oversized_record(&mut self, head: &WarcHead, origin: u64, hlen: usize, len: u64) {
        let peek = (CLASSIFY_PREFIX as u64).min(len) as usize;
        // Short of `peek` at a barrier: skipping tells whether the block is cut or lied about.
        self.src.ensure(hlen + peek);
        let peek = peek.min(self.src.avail().len() - hlen);
        let (reason, detail) =
            self.classify_oversized(head, &self.src.avail()[hlen..hlen + peek], len);
        self.src.consume(hlen);
        match self.skip_block(len) {
            BlockSkip::Whole => {}
            BlockSkip::Cut => {
                self.block_cut(origin, len);
                return;
            }
            BlockSkip::RecordInside(at) => {
                // The length lied: the records after this one are not lost with it.
                self.push_drop(
                    DropReason::ContentLengthMismatch,
                    origin,
                    format!("a WARC record starts {at} bytes into this record's {len}-byte block"),
                );
                return;
            }
        }
        let trailer_ok = if self.src.ensure(TRAILER.len()) {
            let tlen = self.trailer_len(0);
            self.src.consume(tlen);
            tlen > 0
        } else if self.only_breaks_to_eof(0) {
            // The last record, written without its full trailer.
            self.src.discard();
            true
        } else {
            self.block_cut(origin, len);
            return;
        };
        if !trailer_ok {
            // The bytes of this record are gone; resynchronise from here.
            self.push_drop(
                DropReason::ContentLengthMismatch,
                origin,
                format!("the {len}-byte block is not followed by CRLF CRLF"),
            );
            self.resync(None);
            return;
        }
        self.push_drop(reason, origin, detail);
    }

    /// Skips an oversized block of `len` bytes as it streams by, stopping early where a whole
    /// WARC header starts a line inside it: a Content-Length of 10^15 or 2^31 on a short body
    /// would otherwise swallow every record after it. The block's bytes are not buffered; at most
    /// one header is looked at ahead.
    fn skip_block(&mut self, len: u64) -> BlockSkip {
        // A version line is `WARC/1.x` CRLF: keep that many bytes back until more are read so a
        // record start split across two reads is still seen.
        const LOOKAHEAD: usize = MAGIC.len() + 3;
        let mut left = len;
        while left > 0 {
            let have = self.src.avail().len();
            let window = left.min(have as u64) as usize;
            // Enough bytes after the window to tell whether a record starts at its end.
            self.src.ensure(window + LOOKAHEAD);
            let a = self.src.avail();
            if a.is_empty() {
                return BlockSkip::Cut;
            }
            let window = left.min(a.len() as u64) as usize;
            let hit = memmem::find_iter(&a[..window], MAGIC)
                .find(|&i| is_version_line(&a[i..]) && self.src.is_line_start(i));
            match hit {
                Some(i) => {
                    self.src.consume(i);
                    left -= i as u64;
                    if self.record_starts_here() {
                        return BlockSkip::RecordInside(len - left);
                    }
                    self.src.consume(1);
                    left -= 1;
                }
                None => {
                    let more_to_come = self.src.barrier.is_none();
                    let take = if more_to_come && a.len() < window + LOOKAHEAD {
                        window.saturating_sub(LOOKAHEAD)
                    } else {
                        window
                    };
                    if take == 0 {
                        // Too few bytes to decide: read more (a barrier ends the block).
                        if !self.src.ensure(a.len() + 1) {
                            let rest = left.min(self.src.avail().len() as u64) as usize;
                            self.src.consume(rest);
                            left -= rest as u64;
                            if left > 0 {
                                return BlockSkip::Cut;
                            }
                        }
                        continue;
                    }
                    self.src.consume(take);
                    left -= take as u64;
                }
            }
        }
        BlockSkip::Whole
    }

    /// Whether the available bytes start a whole WARC header with the fields every record has
    /// (type, record id, a numeric Content-Length): the test for a record hidden in a block.
    fn record_starts_here(&mut self) -> bool {
        match self.find_header_end() {
            HeadEnd::Found(h) => {
                let head = parse_head(&self.src.avail()[..h]);
                head.warc_type.is_some()
                    && head.record_id.is_some()
                    && head.content_length.is_some()
            }
            HeadEnd::Barrier | HeadEnd::TooLong => false,
        }
    }

    /// A block cut by a barrier before its end.
    fn block_cut(&mut self, origin: u64, len: u64) {
        self.at_barrier(Some(Cut {
            origin,
            reason: DropReason::ContentLengthMismatch,
            detail: format!("Content-Length {len} runs past the end of the input"),
        }));
    }

    /// Skips to the next line that starts `WARC/1.`. With `report`, the skipped bytes are
    /// reported as one malformed stretch starting at that offset; without, they belong to a
    /// record already reported.
    fn resync(&mut self, report: Option<u64>) {
        let first = preview(self.src.avail());
        let mut skipped: u64 = 0;
        loop {
            let found = {
                let a = self.src.avail();
                match memmem::find_iter(a, MAGIC)
                    .find(|&i| self.src.is_line_start(i) || is_version_line(&a[i..]))
                {
                    Some(i) => Ok(i),
                    // Keep a tail that could be the start of the magic.
                    None => Err(a.len().saturating_sub(MAGIC.len() - 1)),
                }
            };
            match found {
                Ok(i) => {
                    self.src.consume(i);
                    skipped += i as u64;
                    break;
                }
                Err(k) => {
                    self.src.consume(k);
                    skipped += k as u64;
                    let have = self.src.avail().len();
                    if !self.src.ensure(have + 1) {
                        skipped += have as u64;
                        self.src.discard();
                        self.report_garbage(report, skipped, &first);
                        self.at_barrier(None);
                        return;
                    }
                }
            }
        }
        self.report_garbage(report, skipped, &first);
    }

    fn report_garbage(&mut self, report: Option<u64>, skipped: u64, first: &str) {
        if let Some(offset) = report {
            if skipped > 0 {
                self.push_drop(
                    DropReason::MalformedRecord,
                    offset,
                    format!("{skipped} bytes that are not a WARC record (starting \"{first}\")"),
                );
            }
        }
    }

    /// Turns a whole record into a raw record or the reason it is dropped.
    fn classify(&self, head: &WarcHead, block: &[u8], origin: u64) -> Result<RawRecord, Drop> {
        let wtype = head.warc_type.as_deref().unwrap_or("").to_ascii_lowercase();
        let body = match wtype.as_str() {
            "response" if self.is_http(head, block) => self.http_body(head, block, origin)?,
            "response" | "resource" => self.resource_body(head, block, origin)?,
            "conversion" => Body::Text(match String::from_utf8(block.to_vec()) {
                Ok(s) => s,
                Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
            }),
            "" => {
                return Err(self.drop_at(
                    DropReason::MalformedRecord,
                    origin,
                    "WARC header without WARC-Type",
                ))
            }
            other => return Err(self.drop_at(DropReason::OtherRecordType, origin, other)),
        };
        let url = head
            .target_uri
            .as_deref()
            .map(unbracket)
            .unwrap_or("")
            .to_owned();
        let record_id = match head.record_id.as_deref() {
            Some(id) => unbracket(id).to_owned(),
            None => super::derived_id(&self.file, origin),
        };
        Ok(RawRecord {
            origin: Origin {
                file: self.file.clone(),
                offset: origin,
            },
            url,
            record_id,
            body,
        })
    }

    /// Whether a response record holds an HTTP message (rather than, say, a DNS answer).
    fn is_http(&self, head: &WarcHead, block: &[u8]) -> bool {
        block.starts_with(b"HTTP/")
            || head
                .content_type
                .as_deref()
                .is_some_and(|ct| http::media_type(ct).starts_with("application/http"))
    }

    /// The HTML payload of an HTTP response, or why not.
    fn http_body(&self, head: &WarcHead, block: &[u8], origin: u64) -> Result<Body, Drop> {
        let resp = http::parse_response(block)
            .map_err(|e| self.drop_at(DropReason::MalformedRecord, origin, e))?;
        if !(200..300).contains(&resp.status) {
            return Err(self.drop_at(DropReason::HttpStatus, origin, resp.status.to_string()));
        }
        let ct = resp
            .header("Content-Type")
            .filter(|ct| !ct.trim().is_empty());
        let html = match &ct {
            Some(ct) => http::is_html_media(&http::media_type(ct)),
            None => match &head.payload_type {
                Some(pt) => http::is_html_media(&http::media_type(pt)),
                None => http::looks_like_html(&block[resp.body_start..]),
            },
        };
        if !html {
            let what = ct
                .as_deref()
                .or(head.payload_type.as_deref())
                .map_or_else(|| "no Content-Type".to_owned(), http::media_type);
            return Err(self.drop_at(DropReason::NotHtml, origin, what));
        }
        let bytes = http::decode_payload(&resp, block, self.max_page).map_err(|e| match e {
            http::BodyError::TooLarge => self.drop_at(
                DropReason::PageTooLarge,
                origin,
                format!("decoded payload over {} bytes", self.max_page),
            ),
            http::BodyError::Bad(msg) => self.drop_at(DropReason::MalformedRecord, origin, msg),
        })?;
        Ok(Body::Html {
            bytes,
            charset: ct.as_deref().and_then(http::charset_param),
        })
    }

    /// A `resource` record (or a non-HTTP response): HTML when its WARC Content-Type says so.
    fn resource_body(&self, head: &WarcHead, block: &[u8], origin: u64) -> Result<Body, Drop> {
        let ct = head.content_type.as_deref().unwrap_or("");
        let media = http::media_type(ct);
        if http::is_html_media(&media) {
            Ok(Body::Html {
                bytes: block.to_vec(),
                charset: http::charset_param(ct),
            })
        } else {
            let what = if media.is_empty() {
                "no Content-Type".to_owned()
            } else {
                media
            };
            Err(self.drop_at(DropReason::NotHtml, origin, what))
        }
    }

    /// Why an oversized record is dropped, from the first bytes of its block.
    fn classify_oversized(&self, head: &WarcHead, prefix: &[u8], len: u64) -> (DropReason, String) {
        let too_large = (
            DropReason::PageTooLarge,
            format!(
                "{len}-byte record, over the {}-byte page limit",
                self.max_page
            ),
        );
        let wtype = head.warc_type.as_deref().unwrap_or("").to_ascii_lowercase();
        match wtype.as_str() {
            "response" if self.is_http(head, prefix) => match http::parse_response(prefix) {
                Ok(resp) if !(200..300).contains(&resp.status) => {
                    (DropReason::HttpStatus, resp.status.to_string())
                }
                Ok(resp) => match resp.header("Content-Type") {
                    Some(ct) if !http::is_html_media(&http::media_type(&ct)) => {
                        (DropReason::NotHtml, http::media_type(&ct))
                    }
                    _ => too_large,
                },
                Err(_) => too_large,
            },
            "response" | "resource" => {
                let media = http::media_type(head.content_type.as_deref().unwrap_or(""));
                if http::is_html_media(&media) {
                    too_large
                } else {
                    (DropReason::NotHtml, media)
                }
            }
            "conversion" => too_large,
            "" => (
                DropReason::MalformedRecord,
                "WARC header without WARC-Type".to_owned(),
            ),
            other => (DropReason::OtherRecordType, other.to_owned()),
        }
    }
}

impl<R: Read> Iterator for WarcReader<R> {
    type Item = Result<RawRecord, Drop>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(item) = self.out.pop_front() {
                return Some(item);
            }
            if self.done {
                return None;
            }
            self.step();
        }
    }
}
