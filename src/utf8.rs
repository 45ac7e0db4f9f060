//! UTF-8 validation of text messages as their bytes stream through the pump: chunk by chunk,
//! across frames, fragments and read boundaries, failing at the first byte that cannot start or
//! continue a valid sequence (RFC 6455 §8.1 asks for fail-fast). Nothing is buffered but the up to
//! three bytes of a sequence split between chunks.

/// Whether a complete byte string (a close reason, say) is UTF-8.
pub fn is_valid(bytes: &[u8]) -> bool {
    simdutf8::basic::from_utf8(bytes).is_ok()
}

/// The state of one text message's validation.
#[derive(Debug, Default, Clone)]
pub struct Utf8Stream {
    /// The start of a sequence that the last chunk ended in the middle of.
    partial: [u8; 4],
    len: u8,
}

/// How many bytes the sequence led by `lead` takes (`lead` is a valid lead byte).
fn width(lead: u8) -> usize {
    match lead {
        0xF0..=0xF4 => 4,
        0xE0..=0xEF => 3,
        _ => 2,
    }
}

impl Utf8Stream {
    /// Validates the next chunk of the message; `false` at the first invalid byte. A sequence cut
    /// by the chunk's end is checked as far as it goes and completed by the next chunk.
    pub fn feed(&mut self, mut chunk: &[u8]) -> bool {
        if self.len > 0 {
            let have = self.len as usize;
            let take = (width(self.partial[0]) - have).min(chunk.len());
            self.partial[have..have + take].copy_from_slice(&chunk[..take]);
            let now = have + take;
            chunk = &chunk[take..];
            match simdutf8::compat::from_utf8(&self.partial[..now]) {
                Ok(_) => self.len = 0,
                // Still cut short (the chunk ran out), but valid as far as it goes.
                Err(e) if e.error_len().is_none() => {
                    self.len = now as u8;
                    return true;
                }
                Err(_) => return false,
            }
        }
        match simdutf8::compat::from_utf8(chunk) {
            Ok(_) => true,
            Err(e) if e.error_len().is_none() => {
                let rest = &chunk[e.valid_up_to()..];
                self.partial[..rest.len()].copy_from_slice(rest);
                self.len = rest.len() as u8;
                true
            }
            Err(_) => false,
        }
    }

    /// Whether the message may end here: no sequence is left unfinished.
    pub fn complete(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn streamed(bytes: &[u8], cuts: &[usize]) -> Option<bool> {
        let mut s = Utf8Stream::default();
        let mut at = 0;
        for &cut in cuts.iter().chain(std::iter::once(&bytes.len())) {
            if !s.feed(&bytes[at..cut]) {
                return None;
            }
            at = cut;
        }
        Some(s.complete())
    }

    #[test]
    fn agrees_with_std_at_every_cut() {
        let samples: [&[u8]; 8] = [
            "κόσμε".as_bytes(),
            "Hello-µ@ßöäüàá-UTF-8!!".as_bytes(),
            b"\xf0\x90\x80\x80",
            b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80\x65\x64\x69\x74\x65\x64",
            b"\xf4\x90\x80\x80",
            b"\xc0\xaf",
            b"\xe0\x80\xaf",
            b"ab\xf0\x90\x80",
        ];
        for bytes in samples {
            let valid = std::str::from_utf8(bytes).is_ok();
            for a in 0..=bytes.len() {
                for b in a..=bytes.len() {
                    let result = streamed(bytes, &[a, b]);
                    assert_eq!(result == Some(true), valid, "{bytes:x?} cut at {a} and {b}");
                }
            }
        }
    }

    #[test]
    fn fails_at_the_first_invalid_byte() {
        let mut s = Utf8Stream::default();
        assert!(s.feed("κόσμε".as_bytes()));
        // F4 90 is past U+10FFFF: invalid already, before the sequence could end.
        assert!(!s.clone().feed(b"\xf4\x90"));
        assert!(s.feed(b"\xf4\x8f"));
        assert!(!s.complete());
        assert!(s.feed(b"\xbf\xbf"));
        assert!(s.complete());
        // A surrogate (ED A0 80) fails at its second byte.
        assert!(!Utf8Stream::default().feed(b"\xed\xa0"));
    }
}
