//! TURN over TLS on the relay's own port, for the call's media. After the TLS handshake, a
//! connection whose first bytes are a STUN message (the top two bits 0, bytes 4–7 the magic
//! cookie) is a browser's TURN client: its bytes go to the configured TURN upstream over TLS, and
//! back, unparsed. TURN's long-term credentials are checked inside its own messages
//! (MESSAGE-INTEGRITY) and bound neither to the TLS session nor to the host name, so a
//! TLS-terminating byte pipe in between works. The client never chooses the upstream.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::app::App;
use crate::outcome::{Ending, Outcome, Side};
use crate::records::millis;
use crate::session::{Closing, ConnContext, OpenSession, PendingHandshake};
use crate::upstream::Timings;

/// The route name TURN connections' records carry.
pub const ROUTE: &str = "turn";
/// A STUN message header's length: what a connection's start must have to be taken for TURN.
pub const SNIFF: usize = 20;
/// STUN's magic cookie (RFC 5389 §6), bytes 4–7 of every STUN message.
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
/// Bytes each direction reads at a time: a TLS record's worth of media at most.
const BUF_SIZE: usize = 8 * 1024;
/// After one side ends its stream, how long the other may take to end its own.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// How long the relay's own TLS close may take to write.
const FINAL_WRITE: Duration = Duration::from_secs(1);

/// Whether a connection's first bytes could still be a STUN message, so more are worth reading
/// (an HTTP request never starts so: its method's first byte has bit 6 set).
pub fn may_be_stun(first: &[u8]) -> bool {
    first.first().is_none_or(|b| b & 0xC0 == 0) && first.len() < SNIFF
}

/// Whether a connection's first bytes are a STUN request or indication header (RFC 5389 §6:
/// the top two bits 0, the magic cookie, a length in whole 4-byte words), as a TURN client's
/// first message is. Anything less costs no connection to the upstream.
pub fn is_stun(first: &[u8]) -> bool {
    if first.len() < SNIFF || first[0] & 0xC0 != 0 || first[4..8] != MAGIC_COOKIE {
        return false;
    }
    let kind = u16::from_be_bytes([first[0], first[1]]);
    // The class bits C1 (0x0100) and C0 (0x0010): 0b00 request, 0b01 indication.
    let response = kind & 0x0100 != 0;
    let length = u16::from_be_bytes([first[2], first[3]]);
    !response && length % 4 == 0
}

/// Relays one TURN-over-TLS connection whose `first` bytes were already read, to its end: the
/// handshake record once the upstream is connected (or not), then the close record.
pub async fn serve<S>(app: &Arc<App>, client: S, first: Vec<u8>, conn: ConnContext, started: Instant)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut client = client;
    let current = app.current();
    let turn = &current.config.turn;
    let mut pending = PendingHandshake::new(app, &conn.peer, started);
    let record = pending.record_mut();
    record.route = Some(ROUTE.into());
    record.upstream_url = Some(turn.upstream.url.clone());
    let client_addr = conn.peer.client_addr;
    // A TURN stream names no client: from a trusted proxy that sends no PROXY header it is
    // limited by the total only, as that proxy's own address is not limited per address (one
    // rate bucket for every client behind it would refuse them all together).
    let rate_ok = !conn.names_a_client() || app.limiter.handshake(client_addr.ip());
    // A TURN client cannot be told why in words: it is refused by closing.
    if let Some(outcome) = conn.over_limit(client_addr, rate_ok) {
        let _ = pending.fail(outcome, format!("limit reached: {outcome}"));
        let _ = tokio::time::timeout(FINAL_WRITE, client.shutdown()).await;
        return;
    }
    let permit = conn.take_permit();
    let mut timings = Timings::default();
    // The client's first bytes leave with the TLS handshake's last flight.
    let connected = tokio::select! {
        c = app.connector.connect_tls(&turn.upstream, &first, &mut timings) => Some(c),
        _ = app.shutdown.close.cancelled() => None,
    };
    let record = pending.record_mut();
    record.upstream_dns_ms = timings.dns.map(millis);
    record.upstream_proxy_ms = timings.proxy.map(millis);
    record.upstream_connect_ms = timings.connect.map(millis);
    record.upstream_tls_ms = timings.tls.map(millis);
    let (upstream, addr) = match connected {
        Some(Ok(c)) => c,
        Some(Err(e)) => {
            tracing::info!(error = %e, "TURN upstream unreachable");
            let _ = pending.fail(e.outcome(), e.to_string());
            let _ = tokio::time::timeout(FINAL_WRITE, client.shutdown()).await;
            return;
        }
        None => {
            let _ = pending.fail(Outcome::Shutdown, "relay is shutting down");
            let _ = tokio::time::timeout(FINAL_WRITE, client.shutdown()).await;
            return;
        }
    };
    pending.record_mut().upstream_addr = Some(addr);
    let session = pending.open(true, Some(permit));
    session.counters().bytes_up.fetch_add(first.len() as u64, Ordering::Relaxed);
    app.metrics.turn_bytes_up.inc_by(first.len() as u64);
    drop(first);
    let (ending, error) = pipe(app, client, upstream, &session, turn.idle_timeout, current.config.server.drain_jitter).await;
    tracing::debug!(outcome = %ending.outcome(), "TURN relay ended");
    session.finish(Closing { outcome: ending.outcome(), closed_by: ending.closed_by(), close_code: None, close_reason: None, error });
}

/// How one direction of the pipe ended.
enum DirEnd {
    /// Its reading side ended its stream (TLS close_notify or FIN): an orderly close.
    Eof,
    ReadFailed(std::io::Error),
    WriteFailed(std::io::Error),
}

/// Copies `from` to `to` until `from` ends (then `to` is shut, passing the close on) or either
/// fails; every chunk written is counted. Each write is awaited before the next read, so a slow
/// side slows its peer instead of filling memory.
async fn copy<R, W>(from: &mut R, to: &mut W, counted: &AtomicU64, metric: &prometheus_client::metrics::counter::Counter, last: &AtomicU64, start: Instant) -> DirEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) => {
                let _ = tokio::time::timeout(FINAL_WRITE, to.shutdown()).await;
                return DirEnd::Eof;
            }
            Ok(n) => n,
            // A TLS stream cut without close_notify is how browsers end a TURN socket; STUN's
            // own framing makes a truncated stream harmless, so it is an orderly end.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                let _ = tokio::time::timeout(FINAL_WRITE, to.shutdown()).await;
                return DirEnd::Eof;
            }
            Err(e) => return DirEnd::ReadFailed(e),
        };
        if let Err(e) = async {
            to.write_all(&buf[..n]).await?;
            to.flush().await
        }
        .await
        {
            return DirEnd::WriteFailed(e);
        }
        counted.fetch_add(n as u64, Ordering::Relaxed);
        metric.inc_by(n as u64);
        last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// Pipes bytes both ways until both sides have ended their streams, one fails, the relay drains
/// (after a random part of `drain_jitter`), an operator closes it, or no byte has passed for
/// `idle_timeout`. Returns how it ended and, for a failure, the error.
async fn pipe<C, U>(app: &App, client: C, upstream: U, session: &OpenSession, idle_timeout: Option<Duration>, drain_jitter: Duration) -> (Ending, Option<String>)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let counters = session.counters();
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let ended = {
        let up = copy(&mut cr, &mut uw, &counters.bytes_up, &app.metrics.turn_bytes_up, &last, start);
        let down = copy(&mut ur, &mut cw, &counters.bytes_down, &app.metrics.turn_bytes_down, &last, start);
        tokio::pin!(up, down);
        let idle = async {
            let Some(timeout) = idle_timeout else { return std::future::pending().await };
            loop {
                let deadline = start + Duration::from_millis(last.load(Ordering::Relaxed)) + timeout;
                if Instant::now() >= deadline {
                    return;
                }
                tokio::time::sleep_until(deadline).await;
            }
        };
        let drain = async {
            app.shutdown.close.cancelled().await;
            tokio::time::sleep(drain_jitter.mul_f64(rand::random::<f64>())).await;
        };
        // The first to end decides; after an orderly end, the other side gets the grace.
        let first = tokio::select! {
            e = &mut up => Err((Side::Client, e)),
            e = &mut down => Err((Side::Upstream, e)),
            _ = drain => Ok(Ending::Shutdown),
            _ = session.operator().cancelled() => Ok(Ending::Operator),
            _ = idle => Ok(Ending::Idle),
        };
        match first {
            Ok(ending) => (ending, None),
            Err((side, DirEnd::Eof)) => {
                let other = async {
                    if side == Side::Client { (&mut down).await } else { (&mut up).await }
                };
                let _ = tokio::time::timeout(CLOSE_GRACE, other).await;
                (Ending::Closed(side), None)
            }
            Err((side, DirEnd::ReadFailed(e))) => (Ending::Gone(side), Some(e.to_string())),
            Err((side, DirEnd::WriteFailed(e))) => (Ending::Gone(side.other()), Some(e.to_string())),
        }
    };
    // The relay ends it: a TLS close to both, bounded so a side that does not read cannot hold it.
    if matches!(ended.0, Ending::Shutdown | Ending::Operator | Ending::Idle) {
        let _ = tokio::time::timeout(FINAL_WRITE, cw.shutdown()).await;
        let _ = tokio::time::timeout(FINAL_WRITE, uw.shutdown()).await;
    }
    ended
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_stun_from_http() {
        // A TURN Allocate request's header: type 0x0003, length 8, cookie, transaction id.
        let allocate = [0x00, 0x03, 0x00, 0x08, 0x21, 0x12, 0xA4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
        assert!(is_stun(&allocate));
        assert!(!is_stun(b"GET /signaling HTTP/1.1\r\nHost: x\r\n"));
        assert!(!is_stun(&allocate[..19]), "too short to tell");
        let with = |i: usize, b: u8| {
            let mut m = allocate;
            m[i] = b;
            m
        };
        assert!(!is_stun(&with(0, 0x80)), "top bits set");
        assert!(!is_stun(&with(0, 0x01)), "a success response (class 0b10)");
        assert!(!is_stun(&with(3, 0x07)), "a length not in whole words");
        assert!(!is_stun(&with(5, 0x00)), "no magic cookie");
        assert!(is_stun(&with(1, 0x16)), "a Send indication");
        // When to stop reading: at once for HTTP, after a header's worth for STUN.
        assert!(may_be_stun(b""));
        assert!(!may_be_stun(b"G"));
        assert!(may_be_stun(&allocate[..8]));
        assert!(!may_be_stun(&allocate));
    }
}
