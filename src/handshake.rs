//! The browser's HTTP request: health checks, routing, WebSocket upgrade validation and the 101.
//! Failures before the upgrade answer with a status (one mapping, in `outcome.rs`) and a record.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::outcome::Outcome;
use crate::records::HandshakeRecord;
use crate::relay::{self, Session};
use crate::routing::{PathMatch, Router};
use crate::Current;
use crate::upstream::ForwardHeaders;
use crate::App;

/// What the listener knows about the connection a request arrived on.
pub struct ConnContext {
    pub app: Arc<App>,
    /// The TCP peer, or the address a PROXY protocol header gave.
    pub client_addr: SocketAddr,
    pub sni: Option<String>,
    /// `None` on a plain (no TLS) listener.
    pub tls_ms: Option<f64>,
    /// Set once a request arrives, so a connection that never sends one still gets a record.
    pub saw_request: AtomicBool,
}

impl ConnContext {
    /// The context of a connection whose TLS handshake (if any) took `tls`.
    pub fn new(app: &Arc<App>, client_addr: SocketAddr, sni: Option<String>, tls: std::time::Duration) -> ConnContext {
        ConnContext {
            app: app.clone(),
            client_addr,
            tls_ms: app.tls.is_some().then(|| crate::records::millis(tls)),
            sni,
            saw_request: AtomicBool::new(false),
        }
    }
}

/// A new connection id: a ULID, unique across a fleet without coordination.
pub fn new_conn_id() -> String {
    ulid::Ulid::new().to_string()
}

/// Longest header value copied into a record.
const MAX_RECORDED_HEADER: usize = 256;

fn header_text(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    let v = headers.get(name)?;
    Some(String::from_utf8_lossy(v.as_bytes()).chars().take(MAX_RECORDED_HEADER).collect())
}

/// The handshake record of a request on the main listener, before anything is decided: a new
/// connection id, the TLS time, and the path, Origin and User-Agent as received.
pub(crate) fn request_record(req: &Request<Incoming>, conn: &ConnContext, client_addr: SocketAddr) -> HandshakeRecord {
    let mut record = HandshakeRecord::new(new_conn_id(), client_addr, conn.sni.clone());
    record.tls_ms = conn.tls_ms;
    record.path = Some(req.uri().path().chars().take(MAX_RECORDED_HEADER).collect());
    record.origin = header_text(req.headers(), header::ORIGIN);
    record.user_agent = header_text(req.headers(), header::USER_AGENT);
    record
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

type Resp = Response<Full<Bytes>>;

fn text(status: StatusCode, body: String) -> Resp {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// Why a request is refused before the upgrade.
pub(crate) struct Refusal {
    pub outcome: Outcome,
    pub why: &'static str,
}

fn refuse(outcome: Outcome, why: &'static str) -> Refusal {
    Refusal { outcome, why }
}

/// Answers one request on the main listener.
pub async fn handle(mut req: Request<Incoming>, conn: Arc<ConnContext>) -> Result<Resp, Infallible> {
    conn.saw_request.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let app = conn.app.clone();
    if req.method() == Method::GET {
        match req.uri().path() {
            "/healthz" => return Ok(text(StatusCode::OK, "ok\n".into())),
            "/readyz" => {
                let (status, body) = crate::admin::readyz(&app);
                return Ok(text(status, body.into()));
            }
            _ => {}
        }
    }
    let current = app.current();
    let client_addr = client_addr(&req, conn.client_addr, &current.config.server.trusted_proxies);
    if current.config.diag.enabled && crate::diag::owns(req.uri().path()) {
        return Ok(crate::diag::handle(req, &conn, current, client_addr).await);
    }
    let mut record = request_record(&req, &conn, client_addr);

    let accepted = check(&req, &conn, &current, &mut record);
    let (route, path_region, query_region) = match accepted {
        Ok(ok) => ok,
        Err(refusal) => return Ok(refuse_request(&app, record, &refusal, started)),
    };

    // Copied, not cloned: a cloned HeaderValue shares hyper's whole read buffer, which would then
    // live as long as the connection.
    let copy = |name| req.headers().get(name).and_then(|v: &HeaderValue| HeaderValue::from_bytes(v.as_bytes()).ok());
    let headers = ForwardHeaders {
        user_agent: copy(header::USER_AGENT),
        origin: copy(header::ORIGIN),
        forwarded_for: HeaderValue::from_str(&client_addr.ip().to_string()).ok(),
    };
    // Over a limit the WebSocket is still accepted, then closed with 1013 and a reason naming
    // the limit: browsers hide HTTP statuses from scripts, but not close codes.
    let (permit, refused) = match app.limiter.admit(client_addr.ip()) {
        Ok(p) => (Some(p), None),
        Err(outcome) if outcome.refused_before_upgrade() => {
            let refusal = refuse(outcome, LIMIT_REACHED);
            return Ok(refuse_request(&app, record, &refusal, started));
        }
        Err(outcome) => (None, Some(outcome)),
    };
    let session = Session { record, current, route, path_region, query_region, headers, started, permit, refused };
    let upgrade = hyper::upgrade::on(&mut req);
    app.tracker.spawn(relay::run(app.clone(), upgrade, session));

    Ok(switching_protocols(&req))
}

const WRONG_VERSION: &str = "Sec-WebSocket-Version must be 13";

/// The client's address: the connection's, unless it comes from a trusted proxy, in which case
/// the right-most `X-Forwarded-For` entry that is not itself a trusted proxy.
fn client_addr(req: &Request<Incoming>, peer: SocketAddr, trusted: &[ipnet::IpNet]) -> SocketAddr {
    let is_trusted = |ip: &std::net::IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer.ip()) {
        return peer;
    }
    let entries: Vec<&str> = req
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    // From the right: each trusted hop vouches for the entry before it. An entry that does not
    // parse ends the walk; skipping it would let a client's own entry through.
    for entry in entries.iter().rev() {
        match forwarded_ip(entry) {
            Some(ip) if is_trusted(&ip) => continue,
            Some(ip) => return SocketAddr::new(ip, 0),
            None => return peer,
        }
    }
    peer
}

/// An `X-Forwarded-For` entry: `203.0.113.7`, `203.0.113.7:51234`, `2001:db8::1` or
/// `[2001:db8::1]:51234`.
fn forwarded_ip(entry: &str) -> Option<std::net::IpAddr> {
    entry
        .parse()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| entry.strip_prefix('[')?.strip_suffix(']')?.parse().ok())
}

/// Validates the request; on success returns the route index and the regions from path and query.
fn check(
    req: &Request<Incoming>,
    conn: &ConnContext,
    current: &Current,
    record: &mut HandshakeRecord,
) -> Result<(usize, Option<String>, Option<String>), Refusal> {
    let router = &current.router;
    if req.method() == Method::CONNECT {
        return Err(refuse(Outcome::BadRequest, "CONNECT is not supported"));
    }
    // An absolute URI must name the host the client reached; it never chooses the upstream.
    if let Some(authority) = req.uri().authority() {
        let reached = conn.sni.clone().or_else(|| {
            let host = req.headers().get(header::HOST)?.to_str().ok()?;
            Some(host.parse::<http::uri::Authority>().ok()?.host().to_string())
        });
        if reached.is_none_or(|h| !h.eq_ignore_ascii_case(authority.host())) {
            return Err(refuse(Outcome::BadRequest, "absolute URI names another host"));
        }
    }
    let (route_index, path_region) = match router.match_path(req.uri().path()) {
        PathMatch::NotFound => return Err(refuse(Outcome::NotFound, "no route for this path")),
        PathMatch::BadRegion => return Err(refuse(Outcome::BadRegion, "region in the path is not allowed")),
        PathMatch::Route { index, region, .. } => (index, region.map(str::to_string)),
    };
    let entry = router.entry(route_index);
    record.route = Some(entry.route.name.clone());
    let query_region = if entry.uses(crate::routing::RegionSource::Query) {
        match Router::query_region(req.uri().query()) {
            Some(r) if !router.is_allowed(r) => {
                return Err(refuse(Outcome::BadRegion, "region in the query is not allowed"))
            }
            r => r.map(str::to_string),
        }
    } else {
        None
    };
    validate_upgrade(req, &current.config.server.allowed_origins)?;
    Ok((route_index, path_region, query_region))
}

/// The checks every WebSocket upgrade on the main listener passes, relayed or not: the Origin
/// allow-list, then a well-formed RFC 6455 upgrade with no body.
pub(crate) fn validate_upgrade(req: &Request<Incoming>, origins: &[crate::config::OriginPattern]) -> Result<(), Refusal> {
    let h = req.headers();
    // Cross-site WebSocket hijacking: a page on another site must not ride the user's network.
    // Requests without Origin (websocat, servers) are not from a browser page and pass.
    if let Some(origin) = h.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        if !origins.is_empty() && !origins.iter().any(|p| p.matches(origin)) {
            return Err(refuse(Outcome::ForbiddenOrigin, "Origin is not in allowed_origins"));
        }
    }
    if !has_token(h, header::UPGRADE, "websocket") {
        return Err(refuse(Outcome::NotWebsocket, "this path only accepts WebSocket upgrades"));
    }
    if req.method() != Method::GET || req.version() != Version::HTTP_11 {
        return Err(refuse(Outcome::BadRequest, "a WebSocket upgrade must be an HTTP/1.1 GET"));
    }
    // RFC 9112 §3.2: more than one Host is a 400. A body on an upgrade request is a smuggling
    // attempt, not a browser.
    if h.get_all(header::HOST).iter().count() > 1 {
        return Err(refuse(Outcome::BadRequest, "more than one Host header"));
    }
    let content_length = h.get(header::CONTENT_LENGTH).map(|v| v.as_bytes() != b"0").unwrap_or(false);
    if content_length || h.contains_key(header::TRANSFER_ENCODING) {
        return Err(refuse(Outcome::BadRequest, "an upgrade request carries no body"));
    }
    if !has_token(h, header::CONNECTION, "upgrade") {
        return Err(refuse(Outcome::BadRequest, "Connection header lacks Upgrade"));
    }
    if h.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        return Err(refuse(Outcome::BadRequest, WRONG_VERSION));
    }
    let key_ok = h
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|k| STANDARD.decode(k.as_bytes()).ok())
        .is_some_and(|k| k.len() == 16);
    if !key_ok {
        return Err(refuse(Outcome::BadRequest, "Sec-WebSocket-Key is missing or not 16 bytes of base64"));
    }
    Ok(())
}

/// The 101 that accepts a validated upgrade.
pub(crate) fn switching_protocols(req: &Request<Incoming>) -> Resp {
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).map(|k| k.as_bytes()).unwrap_or_default();
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(header::SEC_WEBSOCKET_ACCEPT, derive_accept_key(key))
        .body(Full::new(Bytes::new()))
        .expect("static response parts are valid")
}

/// Why a request over the total connection cap is refused.
pub(crate) const LIMIT_REACHED: &str = "the relay is at its connection limit";

/// Refuses a request before the upgrade: writes its record and returns the answer.
pub(crate) fn refuse_request(app: &App, mut record: HandshakeRecord, refusal: &Refusal, started: Instant) -> Resp {
    record.outcome = Some(refusal.outcome);
    record.error = Some(refusal.why.to_string());
    record.total_ms = Some(crate::records::millis(started.elapsed()));
    let resp = refusal_response(refusal, &record.conn_id);
    app.records.handshake(record);
    resp
}

/// The answer to a request refused before the upgrade: the outcome's status and a body naming
/// the outcome, the reason and the connection id.
fn refusal_response(refusal: &Refusal, conn_id: &str) -> Resp {
    let body = format!("{}: {} (conn={})\n", refusal.outcome, refusal.why, conn_id);
    let mut resp = text(refusal.outcome.http_status(), body);
    match refusal.outcome {
        Outcome::NotWebsocket => {
            resp.headers_mut().insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        }
        Outcome::BadRequest if refusal.why == WRONG_VERSION => {
            resp.headers_mut().insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        _ => {
            // A refused upgrade attempt has no reason to keep its connection.
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            if refusal.outcome.refused_before_upgrade() {
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
        }
    }
    resp
}
