//! The browser's first WebSocket message, read before the gateway is chosen: it carries the
//! access token whose `twr` may pick the region. Its bytes are relayed unchanged afterwards.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

use crate::frame::{self, OpCode};
use crate::token::{self, TokenInfo};

/// The first message is scanned for a token only if it is at most this long; the SDK's hello
/// and connect messages are far smaller.
const SCAN_LIMIT: usize = 64 * 1024;

/// The browser's first message as far as it was read.
#[derive(Debug, Default)]
pub struct FirstMessage {
    /// Every byte read so far (the first frame and possibly more); relayed unchanged.
    pub bytes: Vec<u8>,
    /// Whether the first message held a token at `$.body.token` or `$.token`.
    pub token_found: bool,
    /// The token's decoded header and payload, when it could be read.
    pub token: Option<TokenInfo>,
}

/// Reads until the first frame is complete, the stream ends, or `timeout` passes.
pub async fn read<S: AsyncRead + Unpin>(io: &mut S, timeout: Duration) -> FirstMessage {
    let deadline = Instant::now() + timeout;
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 2048];
    loop {
        match frame::parse_header(&bytes) {
            Ok(Some(h)) => {
                let len = h.frame_len();
                if h.opcode != OpCode::Text || !h.fin || len > SCAN_LIMIT as u64 {
                    break;
                }
                if bytes.len() as u64 >= len {
                    let mut payload = bytes[h.header_len..len as usize].to_vec();
                    if let Some(key) = h.mask {
                        frame::apply_mask(&mut payload, key, 0);
                    }
                    let found = token::find_token(&payload);
                    let info = found.as_deref().and_then(|t| token::decode(t).ok());
                    return FirstMessage { bytes, token_found: found.is_some(), token: info };
                }
            }
            Ok(None) => {}
            Err(_) => break,
        }
        match tokio::time::timeout_at(deadline, io.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => bytes.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    FirstMessage { bytes, token_found: false, token: None }
}
