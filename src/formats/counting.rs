//! A buffered reader that counts the bytes it hands out.
//!
//! Readers report progress in input bytes (compressed bytes for gzip), and the gzip member reader
//! needs the exact input offset where each member starts. `std::io::BufReader` does not say how
//! much of its buffer was consumed, so we keep our own buffer and count on `consume`.

use std::io::{self, BufRead, Read};

/// Reads larger than this skip the buffer when it is empty (no double copy for plain files).
const DIRECT_READ_MIN: usize = 64 * 1024;

/// A `BufRead` over `R` that counts consumed bytes. `inner` is an `Option` only so that a
/// placeholder (no reader, no buffer) can be swapped into a gzip decoder while it is reset.
///
/// A *mark* keeps the bytes from a position on in the buffer (as long as they fit), so that a
/// reader can go back to them: the gzip reader marks each member's start and, when the member
/// turns out corrupt, rewinds to look for the next member inside the bytes it already consumed.
pub(crate) struct CountingReader<R> {
    inner: Option<R>,
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
    consumed: u64,
    /// Buffer index and input offset of the mark.
    mark: Option<(usize, u64)>,
    /// The furthest `consumed` has been (it goes back on a rewind; progress must not).
    high: u64,
}

impl<R: Read> CountingReader<R> {
    /// Wraps `inner` with a buffer of `capacity` bytes (at least 16).
    pub(crate) fn with_capacity(capacity: usize, inner: R) -> Self {
        CountingReader {
            inner: Some(inner),
            buf: vec![0u8; capacity.max(16)].into_boxed_slice(),
            pos: 0,
            end: 0,
            consumed: 0,
            mark: None,
            high: 0,
        }
    }

    /// A reader with nothing in it: reads return end of input. Allocates nothing.
    pub(crate) fn placeholder() -> Self {
        CountingReader {
            inner: None,
            buf: Box::new([]),
            pos: 0,
            end: 0,
            consumed: 0,
            mark: None,
            high: 0,
        }
    }

    /// Bytes handed out so far (read or consumed): the offset of the next byte in the input.
    pub(crate) fn consumed(&self) -> u64 {
        self.consumed
    }

    /// The furthest offset ever consumed: progress that never goes back.
    pub(crate) fn progress(&self) -> u64 {
        self.consumed.max(self.high)
    }

    /// Keeps the bytes from the current position on, for [`Self::rewind`].
    pub(crate) fn set_mark(&mut self) {
        self.mark = Some((self.pos, self.consumed));
    }

    /// Forgets the mark.
    pub(crate) fn clear_mark(&mut self) {
        self.mark = None;
    }

    /// Goes back (or forward, within what is buffered) to input `offset` at or after the mark.
    /// False when that is not possible (no mark, or the marked bytes did not fit the buffer).
    pub(crate) fn rewind(&mut self, offset: u64) -> bool {
        let Some((mark_pos, mark_offset)) = self.mark else {
            return false;
        };
        if offset < mark_offset || offset - mark_offset > (self.end - mark_pos) as u64 {
            return false;
        }
        self.high = self.high.max(self.consumed);
        self.pos = mark_pos + (offset - mark_offset) as usize;
        self.consumed = offset;
        true
    }

    /// Moves the bytes to keep (from the mark, else from `pos`) to the front of the buffer.
    /// When the marked bytes fill the whole buffer, the mark is dropped to make room.
    fn compact(&mut self) {
        let mut keep = self.mark.map_or(self.pos, |(m, _)| m);
        if keep == 0 && self.end == self.buf.len() && self.mark.is_some() {
            self.mark = None;
            keep = self.pos;
        }
        if keep > 0 {
            self.buf.copy_within(keep..self.end, 0);
            self.end -= keep;
            self.pos -= keep;
            if let Some((m, _)) = self.mark.as_mut() {
                *m -= keep;
            }
        }
    }

    /// Makes at least `n` bytes available (fewer only at the end of input, and never more than
    /// the buffer holds) and returns everything buffered.
    pub(crate) fn fill_at_least(&mut self, n: usize) -> io::Result<&[u8]> {
        let n = n.min(self.buf.len());
        if self.end - self.pos < n {
            if self.buf.len() - self.pos < n {
                self.compact();
            }
            if self.buf.len() - self.pos < n {
                // The mark holds too much: give it up rather than fall short.
                self.mark = None;
                self.compact();
            }
            while self.end - self.pos < n {
                let got = self.read_inner_at_end()?;
                if got == 0 {
                    break;
                }
            }
        }
        Ok(&self.buf[self.pos..self.end])
    }

    /// One read from the inner reader into the free tail of the buffer, retrying interrupts.
    fn read_inner_at_end(&mut self) -> io::Result<usize> {
        let Some(inner) = self.inner.as_mut() else {
            return Ok(0);
        };
        loop {
            match inner.read(&mut self.buf[self.end..]) {
                Ok(n) => {
                    self.end += n;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.end
            && self.mark.is_none()
            && out.len() >= DIRECT_READ_MIN.min(self.buf.len().max(1))
        {
            let Some(inner) = self.inner.as_mut() else {
                return Ok(0);
            };
            let n = inner.read(out)?;
            self.consumed += n as u64;
            return Ok(n);
        }
        let avail = self.fill_buf()?;
        let n = avail.len().min(out.len());
        out[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl<R: Read> BufRead for CountingReader<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.pos == self.end {
            if self.mark.is_none() {
                self.pos = 0;
                self.end = 0;
            } else if self.end == self.buf.len() {
                self.compact();
            }
            self.read_inner_at_end()?;
        }
        Ok(&self.buf[self.pos..self.end])
    }

    fn consume(&mut self, amt: usize) {
        let amt = amt.min(self.end - self.pos);
        self.pos += amt;
        self.consumed += amt as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that returns at most 3 bytes per call, like a slow pipe.
    struct Trickle<'a>(&'a [u8]);
    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = self.0.len().min(out.len()).min(3);
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn counts_consumed_and_fills_across_short_reads() {
        let data: Vec<u8> = (0u8..100).collect();
        let mut r = CountingReader::with_capacity(32, Trickle(&data));
        assert_eq!(r.fill_at_least(10).unwrap()[..10], data[..10]);
        r.consume(7);
        assert_eq!(r.consumed(), 7);
        let mut out = [0u8; 5];
        r.read_exact(&mut out).unwrap();
        assert_eq!(out, [7, 8, 9, 10, 11]);
        assert_eq!(r.consumed(), 12);
        // Asking for more than the buffer holds gives the buffer's worth.
        assert_eq!(r.fill_at_least(1000).unwrap().len(), 32);
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, data[12..]);
        assert_eq!(r.consumed(), 100);
    }

    #[test]
    fn rewinds_to_marked_bytes_while_they_fit() {
        let data: Vec<u8> = (0u8..200).collect();
        let mut r = CountingReader::with_capacity(64, Trickle(&data));
        let n = r.fill_at_least(10).unwrap().len().min(10);
        r.consume(n);
        r.set_mark();
        let mut sink = [0u8; 40];
        r.read_exact(&mut sink).unwrap();
        assert_eq!(r.consumed(), 50);
        assert!(r.rewind(11));
        assert_eq!((r.consumed(), r.progress()), (11, 50));
        assert_eq!(r.fill_at_least(1).unwrap()[0], 11);
        assert!(!r.rewind(5), "before the mark");
        // Reading past what the buffer can keep drops the mark.
        let mut big = [0u8; 100];
        r.read_exact(&mut big).unwrap();
        assert_eq!(big[0], 11);
        assert!(!r.rewind(11));
        r.clear_mark();
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, data[111..]);
    }

    #[test]
    fn placeholder_is_empty() {
        let mut r = CountingReader::<&[u8]>::placeholder();
        assert!(r.fill_buf().unwrap().is_empty());
        assert!(r.fill_at_least(4).unwrap().is_empty());
    }
}
