//! One relayed WebSocket, after the browser got its 101: read the first message (for the
//! token), pick the region, connect to the gateway, write the handshake record, run the frame
//! pump, write the close record.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tracing::Instrument;

use crate::frame::{self, OpCode};
use crate::outcome::Outcome;
use crate::pump::{self, Counters, PumpOptions};
use crate::records::{millis, CloseRecord, HandshakeRecord};
use crate::registry::LiveConn;
use crate::routing::{Chosen, RouteEntry};
use crate::token::{self, TokenInfo};
use crate::upstream::{Connected, ForwardHeaders, Timings, UpstreamError};
use crate::limits::Permit;
use crate::metrics::RouteRegion;
use crate::{App, Current};
use tokio_util::sync::CancellationToken;

/// The first message is scanned for a token only if it is at most this long; the SDK's hello
/// and connect messages are far smaller.
const FIRST_MESSAGE_SCAN_LIMIT: usize = 64 * 1024;

/// What the handshake learned before the 101, handed to the session.
pub struct Session {
    pub record: HandshakeRecord,
    /// The configuration in force when the request arrived; `route` indexes its routes.
    pub current: Arc<Current>,
    pub route: usize,
    pub path_region: Option<String>,
    pub query_region: Option<String>,
    pub headers: ForwardHeaders,
    /// When the request arrived; `total_ms` counts from here.
    pub started: Instant,
    /// This connection's place under the limits, held until it ends.
    pub permit: Option<Permit>,
    /// The limit this connection is over: it is closed with 1013 once upgraded.
    pub refused: Option<Outcome>,
}

/// Runs one relayed connection to its end. Every path writes exactly one handshake record.
pub async fn run(app: Arc<App>, upgrade: OnUpgrade, mut s: Session) {
    let span = tracing::info_span!("ws", conn_id = %s.record.conn_id, route = s.record.route.as_deref().unwrap_or(""));
    async move {
        // The 101 must reach the browser within handshake_timeout: a client that stops reading
        // would otherwise hold this task and its limit permit forever.
        let limit = s.current.config.server.handshake_timeout;
        let client = match tokio::time::timeout(limit, upgrade).await {
            Ok(Ok(u)) => TokioIo::new(u),
            failed => {
                let (outcome, why) = match failed {
                    Ok(Err(e)) => (Outcome::ClientGone, format!("upgrade failed: {e}")),
                    _ => (Outcome::ClientTimeout, "the 101 could not be delivered within handshake_timeout".into()),
                };
                s.record.outcome = Some(outcome);
                s.record.error = Some(why);
                s.record.total_ms = Some(millis(s.started.elapsed()));
                app.records.handshake(s.record);
                return;
            }
        };
        let mut client = client;
        if let Some(outcome) = s.refused {
            fail(&app, &mut client, &mut s, outcome, format!("limit reached: {outcome}")).await;
            return;
        }
        let shutdown = app.shutdown.close.clone();
        // Boxed so its state (TLS and HTTP handshakes) is freed once connected, instead of
        // sizing the long-lived task for it.
        let connected = tokio::select! {
            c = Box::pin(connect(&app, &mut client, &mut s)) => Some(c),
            _ = shutdown.cancelled() => None,
        };
        match connected {
            Some(Some((upstream, first))) => relay(&app, client, upstream, first, &mut s).await,
            Some(None) => {}
            // The pump watches for shutdown itself; this is only the connecting phase. If the
            // record was already written (a failure was being reported), there is nothing to add.
            None if !s.record.conn_id.is_empty() => {
                fail(&app, &mut client, &mut s, Outcome::Shutdown, "relay is shutting down".into()).await
            }
            None => {}
        }
    }
    .instrument(span)
    .await
}

/// Reads the first message and connects upstream. On failure the record is written and the
/// browser closed, and `None` is returned.
async fn connect(
    app: &Arc<App>,
    client: &mut TokioIo<hyper::upgrade::Upgraded>,
    s: &mut Session,
) -> Option<(Connected, FirstMessage)> {
    let current = s.current.clone();
    let entry = current.router.entry(s.route);
    let server = &current.config.server;
    let (path_region, query_region) = (s.path_region.as_deref(), s.query_region.as_deref());
    let mut timings = Timings::default();

    // Connect at once when the path or query already chose the region; otherwise the token in
    // the first message decides, so wait for it.
    let early = entry.choose(path_region, query_region, None).filter(|_| !server.reject_expired_tokens);
    let (first, chosen, upstream) = match early {
        Some(chosen) => {
            let target = entry.target(&chosen.region).expect("chosen regions are allowed");
            let (first, upstream) = tokio::join!(
                read_first_message(client, server.first_message_timeout),
                app.connector.connect(&target, &s.headers, &mut timings),
            );
            (first, chosen, upstream)
        }
        None => {
            let first = read_first_message(client, server.first_message_timeout).await;
            let token_region = first.token.as_ref().and_then(|t| t.region.as_deref());
            let chosen = entry.choose(path_region, query_region, Some(token_region)).expect("token is known");
            fill_token(&mut s.record, &first, entry, &chosen);
            if server.reject_expired_tokens && s.record.token_expired == Some(true) {
                fail(app, client, s, Outcome::TokenExpired, "token has expired".into()).await;
                return None;
            }
            let target = entry.target(&chosen.region).expect("chosen regions are allowed");
            let upstream = app.connector.connect(&target, &s.headers, &mut timings).await;
            (first, chosen, upstream)
        }
    };
    fill_token(&mut s.record, &first, entry, &chosen);
    s.headers = ForwardHeaders::default();
    let r = &mut s.record;
    r.upstream_dns_ms = timings.dns.map(millis);
    r.upstream_proxy_ms = timings.proxy.map(millis);
    r.upstream_connect_ms = timings.connect.map(millis);
    r.upstream_tls_ms = timings.tls.map(millis);
    r.upstream_ws_ms = timings.websocket.map(millis);
    let upstream = match upstream {
        Ok(c) => c,
        Err(e) => {
            if let UpstreamError::Rejected { status } = e {
                s.record.upstream_status = Some(status);
            }
            tracing::info!(error = %e, "gateway unreachable");
            fail(app, client, s, e.outcome(), e.to_string()).await;
            return None;
        }
    };
    Some((upstream, first))
}

/// Records how the token routed the connection.
fn fill_token(r: &mut HandshakeRecord, first: &FirstMessage, entry: &RouteEntry, chosen: &Chosen) {
    r.region = Some(chosen.region.clone());
    r.region_source = Some(chosen.source.as_str());
    r.upstream_url = entry.target(&chosen.region).map(|t| t.url.clone());
    r.token_present = first.token_found;
    if let Some(t) = &first.token {
        // A token region is attacker-controlled text; keep it short in records.
        r.token_region = t.region.as_ref().map(|s| s.chars().take(32).collect());
        r.token_exp = t.exp;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
        r.token_expired = t.exp.map(|_| t.expired_at(now));
    }
    r.region_mismatch = entry.region_mismatch(first.token.as_ref().and_then(|t| t.region.as_deref()), &chosen.region);
}

/// Ends an accepted WebSocket that will not be relayed: a record, then a close frame saying why.
async fn fail<S: AsyncWrite + Unpin>(app: &App, client: &mut S, s: &mut Session, outcome: Outcome, error: String) {
    let r = &mut s.record;
    r.outcome = Some(outcome);
    r.error = Some(error);
    r.total_ms = Some(millis(s.started.elapsed()));
    let reason = format!("{outcome} conn={}", r.conn_id);
    app.records.handshake(std::mem::take(r));
    let frame = frame::close_frame(outcome.client_close_code(), &reason, None);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        client.write_all(&frame).await?;
        client.shutdown().await
    })
    .await;
}

async fn relay(
    app: &Arc<App>,
    client: TokioIo<hyper::upgrade::Upgraded>,
    upstream: Connected,
    first: FirstMessage,
    s: &mut Session,
) {
    let r = &mut s.record;
    r.upstream_addr = Some(upstream.addr);
    // A connected gateway is one that answered 101.
    r.upstream_status = Some(101);
    r.outcome = Some(Outcome::Ok);
    r.total_ms = Some(millis(s.started.elapsed()));
    let record = std::mem::take(r);
    let mut close = CloseRecord {
        conn_id: record.conn_id.clone(),
        client_addr: record.client_addr,
        route: record.route.clone(),
        region: record.region.clone(),
        upstream_url: record.upstream_url.clone(),
        ..Default::default()
    };
    app.records.handshake(record);

    let counters = Arc::new(Counters::default());
    let operator = CancellationToken::new();
    let gauge = app.metrics().live.get_or_create(&RouteRegion {
        route: close.route.clone().unwrap_or_default(),
        region: close.region.clone().unwrap_or_default(),
    }).clone();
    let live = app.registry.insert(
        LiveConn {
            conn_id: close.conn_id.clone(),
            client_addr: close.client_addr,
            route: close.route.clone(),
            region: close.region.clone(),
            upstream: close.upstream_url.clone(),
            started: Instant::now(),
            counters: counters.clone(),
            operator: operator.clone(),
        },
        gauge,
    );
    let relayed_at = Instant::now();
    let server = &s.current.config.server;
    let opts = PumpOptions {
        max_message_size: server.max_message_size,
        conn_id: &close.conn_id,
        ping_interval: server.ping_interval,
        idle_timeout: server.idle_timeout,
        drain_jitter: server.drain_jitter,
        metrics: Some(app.metrics()),
    };
    let end = pump::relay(
        tokio::io::split(client),
        tokio::io::split(upstream.io),
        pump::Initial { client: first.bytes, upstream: upstream.leftover },
        &opts,
        &counters,
        &app.shutdown.close,
        &operator,
    )
    .await;
    tracing::debug!(outcome = %end.ending.outcome(), "relay ended");
    close.outcome = Some(end.ending.outcome());
    close.closed_by = Some(end.ending.closed_by());
    close.close_code = end.close_code;
    close.close_reason = end.close_reason;
    close.duration_ms = millis(relayed_at.elapsed());
    close.msgs_up = counters.msgs_up.load(std::sync::atomic::Ordering::Relaxed);
    close.msgs_down = counters.msgs_down.load(std::sync::atomic::Ordering::Relaxed);
    close.bytes_up = counters.bytes_up.load(std::sync::atomic::Ordering::Relaxed);
    close.bytes_down = counters.bytes_down.load(std::sync::atomic::Ordering::Relaxed);
    // Off /connections and the live gauge before the close record says the connection ended.
    drop(live);
    app.records.close(close);
}

/// The browser's first message as far as it was read.
pub struct FirstMessage {
    /// Every byte read so far (the first frame and possibly more); relayed unchanged.
    pub bytes: Vec<u8>,
    /// Whether the first message held a token at `$.body.token` or `$.token`.
    pub token_found: bool,
    /// The token's decoded header and payload, when it could be read.
    pub token: Option<TokenInfo>,
}

/// Reads until the first frame is complete, the stream ends, or `timeout` passes.
pub async fn read_first_message<S: AsyncRead + Unpin>(io: &mut S, timeout: Duration) -> FirstMessage {
    let deadline = Instant::now() + timeout;
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 2048];
    loop {
        match frame::parse_header(&bytes) {
            Ok(Some(h)) => {
                let len = h.frame_len();
                if h.opcode != OpCode::Text || !h.fin || len > FIRST_MESSAGE_SCAN_LIMIT as u64 {
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
