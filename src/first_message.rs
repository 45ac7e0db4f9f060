//! The browser's first WebSocket message, read before the gateway is chosen: it carries the
//! access token whose `twr` may pick the region. Its bytes are relayed unchanged afterwards.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

use crate::frame::{self, OpCode};
use crate::token::{self, TokenInfo};

/// The first message is scanned for a token only if its frame is at most this long. The SDK's
/// hello is about 600 bytes and the insights `connect` about 800 (twilio-video 2.36.0, with a
/// 400-byte token); a longer token or a reconnect's `sync` stays far below this. A longer first
/// frame is relayed without being scanned, so no connection holds more than this for it.
pub const SCAN_LIMIT: usize = 16 * 1024;

/// Bytes read at a time while the first frame's header is not known yet.
const READ_CHUNK: usize = 2048;

/// The browser's first message as far as it was read.
#[derive(Debug, Default)]
pub struct FirstMessage {
    /// Every byte read so far (the first frame and possibly more); relayed unchanged.
    pub bytes: Vec<u8>,
    /// Whether the first message held a token at `$.body.token` or `$.token`.
    pub token_found: bool,
    /// What the message is: the hello's body type (`ice` for a fresh connect, `sync` for a
    /// reconnect, `connect`), or the message's type (`connect` on the insights socket).
    pub kind: Option<String>,
    /// The length of the first frame at the start of `bytes`, when it was read whole, masked,
    /// valid UTF-8 and parsed as JSON: a frame that may go to the gateway before the pump starts.
    pub frame_len: Option<usize>,
    /// The token's decoded header and payload, when it could be read.
    pub token: Option<TokenInfo>,
}

/// Reads until the first frame is complete, the stream ends, or `timeout` passes. The buffer
/// is sized from the frame header: it never holds more than the frame (or the first read, if
/// that was longer), and a frame that will not be scanned is not read to its end.
pub async fn read<S: AsyncRead + Unpin>(io: &mut S, timeout: Duration) -> FirstMessage {
    let deadline = Instant::now() + timeout;
    let mut bytes = Vec::new();
    let mut chunk = [0u8; READ_CHUNK];
    loop {
        let mut want = READ_CHUNK;
        match frame::parse_header(&bytes) {
            Ok(Some(h)) => {
                let len = h.frame_len();
                if h.opcode != OpCode::Text || !h.fin || len > SCAN_LIMIT as u64 {
                    break;
                }
                let len = len as usize;
                if bytes.len() >= len {
                    let mut payload = bytes[h.header_len..len].to_vec();
                    if let Some(key) = h.mask {
                        frame::apply_mask(&mut payload, key, 0);
                    }
                    let facts = token::read_first(&payload).unwrap_or_default();
                    let info = facts.token.as_deref().and_then(|t| token::decode(t).ok());
                    // serde_json checks UTF-8 only in what it keeps; a hello sent ahead of the
                    // pump skips the pump's check, so it must pass the same one here.
                    let early = h.mask.is_some() && facts.kind.is_some() && crate::utf8::is_valid(&payload);
                    let frame_len = early.then_some(len);
                    return FirstMessage { bytes, token_found: facts.token.is_some(), kind: facts.kind, frame_len, token: info };
                }
                bytes.reserve_exact(len - bytes.len());
                want = (len - bytes.len()).min(READ_CHUNK);
            }
            Ok(None) => {}
            Err(_) => break,
        }
        match tokio::time::timeout_at(deadline, io.read(&mut chunk[..want])).await {
            Ok(Ok(n)) if n > 0 => bytes.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    FirstMessage { bytes, token_found: false, kind: None, frame_len: None, token: None }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::encode_frame;
    use tokio::io::AsyncWriteExt;

    async fn first_of(frame: Vec<u8>) -> FirstMessage {
        let (mut browser, mut relay) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            for piece in frame.chunks(1000) {
                let _ = browser.write_all(piece).await;
                tokio::task::yield_now().await;
            }
            // Held open: the reader must stop at the frame's end, not the stream's.
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        read(&mut relay, Duration::from_secs(2)).await
    }

    #[tokio::test]
    async fn the_buffer_is_the_frame_not_a_doubling_of_it() {
        let mut frame = Vec::new();
        let text = format!(r#"{{"type":"connect","token":"a.b.c","pad":"{}"}}"#, "x".repeat(12_000));
        encode_frame(&mut frame, OpCode::Text, text.as_bytes(), Some([1, 2, 3, 4]));
        let first = first_of(frame.clone()).await;
        assert!(first.token_found);
        assert_eq!(first.bytes, frame);
        assert_eq!(first.bytes.capacity(), frame.len(), "sized from the header");
    }

    #[tokio::test]
    async fn a_frame_over_the_scan_limit_is_not_buffered() {
        let mut frame = Vec::new();
        encode_frame(&mut frame, OpCode::Text, &vec![b'x'; 60_000], Some([1, 2, 3, 4]));
        let first = first_of(frame).await;
        assert!(!first.token_found);
        assert!(first.bytes.capacity() <= READ_CHUNK, "held {} bytes", first.bytes.capacity());
    }
}
