//! GPT-2's byte <-> unicode table: byte-level BPE vocabularies store every byte as a printable
//! code point, so that token strings are valid text.
//!
//! Printable Latin-1 bytes (`!`..`~`, `¡`..`¬`, `®`..`ÿ`) map to themselves; the other 68 bytes
//! (controls, space, DEL, NBSP, soft hyphen) map, in byte order, to U+0100, U+0101, ...
//! (so the space 0x20 is `Ġ` U+0120 and the newline 0x0A is `Ċ` U+010A).

use std::sync::OnceLock;

/// Whether GPT-2 keeps this byte as its own code point.
fn is_kept(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// The code point that stands for each byte.
pub fn byte_to_char() -> &'static [char; 256] {
    static TABLE: OnceLock<[char; 256]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = ['\0'; 256];
        let mut next = 256u32;
        for b in 0..=255u8 {
            table[b as usize] = if is_kept(b) {
                char::from(b)
            } else {
                let c = char::from_u32(next).unwrap_or('\u{FFFD}');
                next += 1;
                c
            };
        }
        table
    })
}

/// The byte a code point stands for, if it is one of the 256 in the table.
pub fn char_to_byte(c: char) -> Option<u8> {
    let cp = c as u32;
    if cp < 256 {
        let b = cp as u8;
        return is_kept(b).then_some(b);
    }
    // The remapped bytes are U+0100.. in byte order: index them by rank among the non-kept bytes.
    let rank = cp.checked_sub(256)?;
    (0..=255u8).filter(|&b| !is_kept(b)).nth(rank as usize)
}

/// Decodes a byte-level token string to its bytes; `None` if a code point is not in the table
/// (a token that is not byte-level, e.g. a user-defined token stored as plain text).
pub fn decode_token(token: &str) -> Option<Vec<u8>> {
    token.chars().map(char_to_byte).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_points_of_the_table() {
        let t = byte_to_char();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[0], '\u{100}');
        assert_eq!(t[0xAD], '\u{143}');
    }

    #[test]
    fn table_round_trips_every_byte() {
        let t = byte_to_char();
        for b in 0..=255u8 {
            assert_eq!(char_to_byte(t[b as usize]), Some(b));
        }
        assert_eq!(char_to_byte('日'), None);
    }
}
