//! WebSocket upgrade requests on the main listener, below both the relayed routes and the
//! `/diag` echo: the RFC 6455 checks, the refusals (each a [`Refusal`], mapped to an outcome, a
//! status and headers here), and the 101.

use std::net::SocketAddr;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Version};
use hyper::body::Incoming;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::app::App;
use crate::config::OriginPattern;
use crate::limits::Permit;
use crate::outcome::Outcome;
use crate::respond::{self, Resp};
use crate::route::RouteError;
use crate::session::{ConnContext, PendingHandshake, Peer};

/// Why a request is refused before the upgrade. Every one is the client's doing, except
/// [`Refusal::AtCapacity`], which is the relay's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("CONNECT is not supported")]
    Connect,
    #[error("absolute URI names another host")]
    ForeignHost,
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("Origin is not in allowed_origins")]
    Origin,
    #[error("this path only accepts WebSocket upgrades")]
    NotWebsocket,
    #[error("a WebSocket upgrade must be an HTTP/1.1 GET")]
    NotGet,
    #[error("an upgrade needs exactly one non-empty Host header")]
    Host,
    #[error("an upgrade request carries no body")]
    Body,
    #[error("Connection header lacks Upgrade")]
    NoConnectionUpgrade,
    #[error("Sec-WebSocket-Version must be 13, given once")]
    Version,
    #[error("Sec-WebSocket-Key is missing, repeated or not 16 bytes of base64")]
    Key,
    #[error("the relay is at its connection limit")]
    AtCapacity,
    #[error("too many handshakes from this address")]
    Rate,
}

impl Refusal {
    /// The handshake record's outcome (whose status the answer carries).
    pub fn outcome(self) -> Outcome {
        match self {
            Refusal::Route(e) => e.outcome(),
            Refusal::Origin => Outcome::ForbiddenOrigin,
            Refusal::NotWebsocket => Outcome::NotWebsocket,
            Refusal::AtCapacity => Outcome::OverMaxConnections,
            Refusal::Rate => Outcome::OverHandshakeRate,
            Refusal::Connect
            | Refusal::ForeignHost
            | Refusal::NotGet
            | Refusal::Host
            | Refusal::Body
            | Refusal::NoConnectionUpgrade
            | Refusal::Version
            | Refusal::Key => Outcome::BadRequest,
        }
    }
}

/// Longest header value copied into a record.
const MAX_RECORDED_HEADER: usize = 256;

fn header_text(headers: &HeaderMap, name: HeaderName) -> Option<String> {
    let v = headers.get(name)?;
    Some(String::from_utf8_lossy(v.as_bytes()).chars().take(MAX_RECORDED_HEADER).collect())
}

/// The pending handshake record of a request on the main listener: a new connection id, the
/// TLS time, and the path, Origin and User-Agent as received. `client_addr` is the client's
/// address as records carry it (see [`crate::forwarded`]).
pub fn pending(app: &Arc<App>, peer: &Peer, client_addr: SocketAddr, req: &Request<Incoming>, started: Instant) -> PendingHandshake {
    let mut pending = PendingHandshake::new(app, &Peer { client_addr, ..peer.clone() }, started);
    let record = pending.record_mut();
    record.path = Some(req.uri().path().chars().take(MAX_RECORDED_HEADER).collect());
    record.origin = header_text(req.headers(), header::ORIGIN);
    record.user_agent = header_text(req.headers(), header::USER_AGENT);
    pending
}

/// Whether a comma-separated header (`Connection`, `Upgrade`) lists `value`, case-insensitively.
pub fn header_lists(headers: &HeaderMap, name: HeaderName, value: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(value))
}

/// The request target's checks: no CONNECT, and an absolute URI must name the host the client
/// reached (`sni`, else the Host header); it never chooses the upstream.
pub fn check_target(req: &Request<Incoming>, sni: Option<&str>) -> Result<(), Refusal> {
    if req.method() == Method::CONNECT {
        return Err(Refusal::Connect);
    }
    if let Some(authority) = req.uri().authority() {
        let reached = sni.map(str::to_string).or_else(|| {
            let host = req.headers().get(header::HOST)?.to_str().ok()?;
            Some(host.parse::<http::uri::Authority>().ok()?.host().to_string())
        });
        if reached.is_none_or(|h| !h.eq_ignore_ascii_case(authority.host())) {
            return Err(Refusal::ForeignHost);
        }
    }
    Ok(())
}

/// The checks every WebSocket upgrade on the main listener passes, relayed or not: the Origin
/// allow-list (empty allows all), then a well-formed RFC 6455 upgrade with no body.
pub fn validate(req: &Request<Incoming>, origins: &[OriginPattern]) -> Result<(), Refusal> {
    let h = req.headers();
    // Cross-site WebSocket hijacking: a page on another site must not ride the user's network.
    // Requests without Origin (websocat, servers) are not from a browser page and pass.
    if let Some(origin) = h.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        if !origins.is_empty() && !origins.iter().any(|p| p.matches(origin)) {
            return Err(Refusal::Origin);
        }
    }
    if !header_lists(h, header::UPGRADE, "websocket") {
        return Err(Refusal::NotWebsocket);
    }
    if req.method() != Method::GET || req.version() != Version::HTTP_11 {
        return Err(Refusal::NotGet);
    }
    // RFC 9112 §3.2: an HTTP/1.1 request without Host, or with more than one, is a 400. A body
    // on an upgrade request is a smuggling attempt, not a browser.
    if only_one(h, header::HOST).is_none_or(|v| v.is_empty()) {
        return Err(Refusal::Host);
    }
    let content_length = h.get(header::CONTENT_LENGTH).map(|v| v.as_bytes() != b"0").unwrap_or(false);
    if content_length || h.contains_key(header::TRANSFER_ENCODING) {
        return Err(Refusal::Body);
    }
    if !header_lists(h, header::CONNECTION, "upgrade") {
        return Err(Refusal::NoConnectionUpgrade);
    }
    // RFC 6455 §11.3.1, §11.3.5: each of these appears once; a second one is not a browser's.
    if only_one(h, header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        return Err(Refusal::Version);
    }
    let key_ok = only_one(h, header::SEC_WEBSOCKET_KEY)
        .and_then(|k| STANDARD.decode(k.as_bytes()).ok())
        .is_some_and(|k| k.len() == 16);
    if !key_ok {
        return Err(Refusal::Key);
    }
    Ok(())
}

/// The header's value when it appears exactly once.
fn only_one(h: &http::HeaderMap, name: header::HeaderName) -> Option<&http::HeaderValue> {
    let mut values = h.get_all(name).iter();
    values.next().filter(|_| values.next().is_none())
}

/// An upgrade the limits let through: its pending record, the connection's permit, and the limit
/// it is over (per address, or the handshake rate), if any: then it is accepted all the same and
/// closed with 1013 once upgraded, since a page can read a close code but not an HTTP status.
pub struct Admitted {
    pub pending: PendingHandshake,
    pub permit: Permit,
    pub over: Option<Outcome>,
}

/// What every upgrade on the main listener passes after the caller's own checks (`checked`: the
/// route's, say): a handshake token for `client` (every request takes one, refused or not), the
/// RFC 6455 checks with `origins`, then the limits. A refusal is answered here, its record
/// written.
// The refusal is the answer itself, handed straight back to hyper: boxing it would gain nothing.
#[allow(clippy::result_large_err)]
pub fn admit(
    conn: &ConnContext,
    pending: PendingHandshake,
    req: &Request<Incoming>,
    client: SocketAddr,
    origins: &[OriginPattern],
    checked: Result<(), Refusal>,
) -> Result<Admitted, Resp> {
    let rate_ok = conn.app.limiter.handshake(client.ip());
    if let Err(refusal) = checked.and_then(|()| validate(req, origins)) {
        return Err(refuse(pending, if rate_ok { refusal } else { Refusal::Rate }));
    }
    match conn.over_limit(client, rate_ok) {
        // The permit stays with the connection, counted until the 503 is sent and it closes.
        Some(Outcome::OverMaxConnections) => Err(refuse(pending, Refusal::AtCapacity)),
        over => Ok(Admitted { pending, permit: conn.take_permit(), over }),
    }
}

/// The 101 that accepts a validated upgrade.
pub fn switching_protocols(req: &Request<Incoming>) -> Resp {
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).map(|k| k.as_bytes()).unwrap_or_default();
    let mut resp = respond::empty(StatusCode::SWITCHING_PROTOCOLS);
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, HeaderValue::from_str(&derive_accept_key(key)).expect("base64 is a valid header value"));
    resp
}

/// Refuses a request before the upgrade: writes its record and returns the answer, whose body
/// names the outcome, the reason and the connection id.
pub fn refuse(pending: PendingHandshake, refusal: Refusal) -> Resp {
    let outcome = refusal.outcome();
    let conn_id = pending.fail(outcome, refusal.to_string());
    let mut resp = respond::text(outcome.http_status(), format!("{outcome}: {refusal} (conn={conn_id})\n"));
    let h = resp.headers_mut();
    match refusal {
        // Every refusal closes its connection: an attempt that failed has no reason to keep it,
        // and a client must pay a new connection for each record it makes the relay write.
        Refusal::NotWebsocket => {
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade, close"));
        }
        Refusal::Version => {
            h.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        Refusal::AtCapacity | Refusal::Rate => {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
            h.insert(header::RETRY_AFTER, HeaderValue::from_static(if refusal == Refusal::Rate { "1" } else { "5" }));
        }
        _ => {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }
    resp
}
