//! The WebSocket frame-header codec (RFC 6455 §5.2) used by the frame pump.
//!
//! The pump forwards frames as they arrived, so this module only reads headers, validates them,
//! unmasks the small payloads it must look into (close frames, the first message) and builds the
//! close frames sigrelay sends itself.

use thiserror::Error;

/// Longest reason a close frame can carry: 125 bytes of payload minus the 2-byte code.
pub const MAX_CLOSE_REASON: usize = 123;
/// Longest possible frame header: 2 + 8 (64-bit length) + 4 (mask).
pub const MAX_HEADER_LEN: usize = 14;

/// A frame's opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    /// Control frames (close, ping, pong) may interleave with fragments and are at most 125 bytes.
    pub fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }

    fn from_bits(bits: u8) -> Option<OpCode> {
        Some(match bits {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    pub opcode: OpCode,
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
    /// Bytes the header itself takes on the wire.
    pub header_len: usize,
}

impl FrameHeader {
    /// Header plus payload, on the wire.
    pub fn frame_len(&self) -> u64 {
        self.header_len as u64 + self.payload_len
    }
}

/// A frame that breaks RFC 6455; the pump closes the connection with 1002.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    #[error("reserved bits set without a negotiated extension")]
    ReservedBits,
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    #[error("control frame is fragmented or longer than 125 bytes")]
    BadControlFrame,
    #[error("payload length has the most significant bit set")]
    LengthOverflow,
    #[error("payload length {0} not encoded in the fewest bytes")]
    LengthNotMinimal(u64),
    #[error("frame masked from the server or unmasked from the client")]
    Masking,
    #[error("data frame out of sequence (continuation without a start, or a new message inside one)")]
    Sequence,
    #[error("close frame with a 1-byte payload")]
    CloseLength,
    #[error("close code {0} is not one an endpoint may send")]
    CloseCode(u16),
    #[error("close reason is not valid UTF-8")]
    CloseReason,
}

/// Whether an endpoint may send `code` in a close frame (RFC 6455 §7.4, and the IANA registry
/// for 1012–1014): 1000–1003, 1007–1014 and 3000–4999. 1004–1006 and 1015 are reserved or only
/// for reporting, the rest of 1000–2999 is unassigned, and nothing else is a close code.
pub fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Checks an (already unmasked) close payload: empty, or a code an endpoint may send followed
/// by a UTF-8 reason.
pub fn check_close_payload(payload: &[u8]) -> Result<(), FrameError> {
    match payload.len() {
        0 => Ok(()),
        1 => Err(FrameError::CloseLength),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !close_code_allowed(code) {
                return Err(FrameError::CloseCode(code));
            }
            if !crate::utf8::is_valid(&payload[2..]) {
                return Err(FrameError::CloseReason);
            }
            Ok(())
        }
    }
}

/// Parses the frame header at the start of `buf`. `Ok(None)` means more bytes are needed.
pub fn parse_header(buf: &[u8]) -> Result<Option<FrameHeader>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(FrameError::ReservedBits);
    }
    let opcode = OpCode::from_bits(b0 & 0x0F).ok_or(FrameError::UnknownOpcode(b0 & 0x0F))?;
    let fin = b0 & 0x80 != 0;
    let masked = b1 & 0x80 != 0;
    let (payload_len, mut pos) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            let len = u16::from_be_bytes([buf[2], buf[3]]) as u64;
            // RFC 6455 §5.2: "the minimal number of bytes MUST be used to encode the length".
            if len < 126 {
                return Err(FrameError::LengthNotMinimal(len));
            }
            (len, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut len = [0u8; 8];
            len.copy_from_slice(&buf[2..10]);
            let len = u64::from_be_bytes(len);
            if len >> 63 != 0 {
                return Err(FrameError::LengthOverflow);
            }
            if len <= u16::MAX as u64 {
                return Err(FrameError::LengthNotMinimal(len));
            }
            (len, 10)
        }
        n => (n as u64, 2),
    };
    if opcode.is_control() && (!fin || payload_len > 125) {
        return Err(FrameError::BadControlFrame);
    }
    let mask = if masked {
        if buf.len() < pos + 4 {
            return Ok(None);
        }
        let mut key = [0u8; 4];
        key.copy_from_slice(&buf[pos..pos + 4]);
        pos += 4;
        Some(key)
    } else {
        None
    };
    Ok(Some(FrameHeader { fin, opcode, mask, payload_len, header_len: pos }))
}

/// XORs `data` with the masking key; `offset` is the position of `data[0]` within the payload.
pub fn apply_mask(data: &mut [u8], key: [u8; 4], offset: usize) {
    let mut key = key;
    key.rotate_left(offset & 3);
    // Eight bytes at a time: the key repeats every four, so every word sees it from its start.
    let word = u64::from_ne_bytes([key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3]]);
    let mut words = data.chunks_exact_mut(8);
    for w in &mut words {
        let v = u64::from_ne_bytes(<[u8; 8]>::try_from(&*w).expect("chunks of 8")) ^ word;
        w.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in words.into_remainder().iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

/// Appends a frame (header and payload) to `out`, masking the payload when `mask` is given.
pub fn encode_frame(out: &mut Vec<u8>, opcode: OpCode, payload: &[u8], mask: Option<[u8; 4]>) {
    out.push(0x80 | opcode.bits());
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= u16::MAX as usize => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let start = out.len();
    if let Some(key) = mask {
        out.extend_from_slice(&key);
        out.extend_from_slice(payload);
        apply_mask(&mut out[start + 4..], key, 0);
    } else {
        out.extend_from_slice(payload);
    }
}

/// A close frame without a code (answering a close that had none).
pub fn empty_close_frame(mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_HEADER_LEN);
    encode_frame(&mut out, OpCode::Close, &[], mask);
    out
}

/// Builds a close frame; the reason is cut at a character boundary to fit the 123-byte limit.
pub fn close_frame(code: u16, reason: &str, mask: Option<[u8; 4]>) -> Vec<u8> {
    let reason = truncate_reason(reason);
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason.as_bytes());
    let mut out = Vec::with_capacity(MAX_HEADER_LEN + payload.len());
    encode_frame(&mut out, OpCode::Close, &payload, mask);
    out
}

/// Cuts `reason` to at most [`MAX_CLOSE_REASON`] bytes without splitting a character.
pub fn truncate_reason(reason: &str) -> &str {
    if reason.len() <= MAX_CLOSE_REASON {
        return reason;
    }
    let mut end = MAX_CLOSE_REASON;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// Reads the code and reason of an (already unmasked) close payload.
pub fn parse_close_payload(payload: &[u8]) -> (Option<u16>, String) {
    if payload.len() < 2 {
        return (None, String::new());
    }
    let code = u16::from_be_bytes([payload[0], payload[1]]);
    (Some(code), String::from_utf8_lossy(&payload[2..]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_lengths_and_masks() {
        for len in [0usize, 1, 125, 126, 65535, 65536, 70000] {
            for mask in [None, Some([1, 2, 3, 4])] {
                let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
                let mut out = Vec::new();
                encode_frame(&mut out, OpCode::Binary, &payload, mask);
                let h = parse_header(&out).unwrap().unwrap();
                assert_eq!(h.payload_len, len as u64);
                assert_eq!(h.mask, mask);
                assert_eq!(h.frame_len(), out.len() as u64);
                let mut body = out[h.header_len..].to_vec();
                if let Some(k) = h.mask {
                    apply_mask(&mut body, k, 0);
                }
                assert_eq!(body, payload);
                // Every strict prefix of the header asks for more bytes.
                for cut in 0..h.header_len {
                    assert_eq!(parse_header(&out[..cut]), Ok(None));
                }
            }
        }
    }

    #[test]
    fn rejects_protocol_violations() {
        assert_eq!(parse_header(&[0xC1, 0x00]), Err(FrameError::ReservedBits));
        assert_eq!(parse_header(&[0x83, 0x00]), Err(FrameError::UnknownOpcode(3)));
        assert_eq!(parse_header(&[0x09, 0x00]), Err(FrameError::BadControlFrame));
        assert_eq!(parse_header(&[0x89, 126, 0, 200]), Err(FrameError::BadControlFrame));
        let mut huge = vec![0x82, 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(parse_header(&huge), Err(FrameError::LengthOverflow));
        assert_eq!(parse_header(&[0x82, 126, 0, 125]), Err(FrameError::LengthNotMinimal(125)));
        assert_eq!(parse_header(&[0x82, 127, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF]), Err(FrameError::LengthNotMinimal(65535)));
        assert_eq!(parse_header(&[0x82, 126, 0, 126]).map(|h| h.map(|h| h.payload_len)), Ok(Some(126)));
        assert_eq!(parse_header(&[0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]).map(|h| h.map(|h| h.payload_len)), Ok(Some(65536)));
    }

    #[test]
    fn masks_at_any_offset_and_length() {
        let key = [0x12, 0x34, 0x56, 0x78];
        for len in 0..40 {
            for offset in 0..9 {
                let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
                let mut fast = data.clone();
                apply_mask(&mut fast, key, offset);
                let slow: Vec<u8> = data.iter().enumerate().map(|(i, b)| b ^ key[(offset + i) & 3]).collect();
                assert_eq!(fast, slow, "len {len} offset {offset}");
            }
        }
    }

    #[test]
    fn close_payloads_are_checked() {
        assert_eq!(check_close_payload(b""), Ok(()));
        assert_eq!(check_close_payload(b"\x03"), Err(FrameError::CloseLength));
        for ok in [1000u16, 1003, 1007, 1011, 1012, 1014, 3000, 4999] {
            assert_eq!(check_close_payload(&ok.to_be_bytes()), Ok(()), "{ok}");
        }
        for bad in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535] {
            assert_eq!(check_close_payload(&bad.to_be_bytes()), Err(FrameError::CloseCode(bad)), "{bad}");
        }
        assert_eq!(check_close_payload(b"\x03\xe8ok \xce\xba"), Ok(()));
        assert_eq!(check_close_payload(b"\x03\xe8\xed\xa0\x80"), Err(FrameError::CloseReason));
    }

    #[test]
    fn close_reason_is_cut_on_a_char_boundary() {
        let reason = "é".repeat(100);
        let frame = close_frame(1014, &reason, None);
        let h = parse_header(&frame).unwrap().unwrap();
        assert!(h.payload_len <= 125);
        let (code, text) = parse_close_payload(&frame[h.header_len..]);
        assert_eq!(code, Some(1014));
        assert!(reason.starts_with(&text));
        assert_eq!(text.len(), 122);
    }
}
