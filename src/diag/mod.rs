//! The `/diag` page on the main listener (`[diag] enabled`, on by default): one link a support
//! engineer sends a user, answering "why did the WebSocket fail?" from the user's own browser.
//!
//! Everything it needs is served from here, embedded in the binary, under a strict
//! Content-Security-Policy:
//! - `GET /diag` with `diag.js` and `diag.css`: the page (src/diag/);
//! - `GET /diag/echo`: a WebSocket answered by sigrelay itself (no gateway), with a handshake and
//!   a close record, whose first message tells the page its connection id;
//! - `GET /diag/api/info`: server time (for clock skew), routes and allowed regions;
//! - `GET /diag/api/route?path=…&region=…`: the route, region and gateway sigrelay would pick for
//!   a `wsServer` path and a token's region (the token itself never leaves the page);
//! - `POST /diag/api/probes`: the server-side probes of every configured gateway, run at most
//!   once per [`PROBE_INTERVAL`] whoever asks; nothing in the request can name a host.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderValue, Method, Request, StatusCode};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::Instrument;

use crate::app::{App, Current};
use crate::outcome::{close_code, Outcome, Side};
use crate::records::unix_now;
use crate::respond::{self, Resp};
use crate::route::{self, RouteRequest, Router};
use crate::session::{Closing, ConnContext};
use crate::upgrade::{self, Admitted};

const INDEX_HTML: &str = include_str!("index.html");
const DIAG_JS: &str = include_str!("diag.js");
const DIAG_CSS: &str = include_str!("diag.css");

/// The page may talk to sigrelay and, for the direct-path check, to Twilio's two default
/// gateways; nothing else, and nothing inline.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
     connect-src 'self' wss://global.vss.twilio.com wss://sdkgw.us1.twilio.com; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Server-side probes run at most this often; requests in between get the last results.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(10);
/// The echo endpoint's bounds: a diagnostic, not a free WebSocket service.
const ECHO_MAX_MESSAGES: u64 = 64;
/// Control frames (pings, pongs) a client may send in one echo session: a browser sends none
/// unasked, and each one costs the relay a reply.
const ECHO_MAX_CONTROL_FRAMES: u32 = 64;
const ECHO_MAX_MESSAGE_SIZE: usize = 4096;
const ECHO_LIFETIME: Duration = Duration::from_secs(30);

/// The route name the echo endpoint's records carry.
pub const ECHO_ROUTE: &str = "diag";

/// Whether a path belongs to the diagnostics page.
pub fn owns(path: &str) -> bool {
    path == crate::config::DIAG_PREFIX || path.starts_with("/diag/")
}

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Resp {
    let mut resp = respond::response(status, content_type, body);
    let h = resp.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::HeaderName::from_static("cross-origin-resource-policy"), "same-origin"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    resp
}

fn json_response(status: StatusCode, value: &Value) -> Resp {
    respond(status, "application/json", value.to_string())
}

/// Answers a request under `/diag`. `client_addr` is the address records carry.
pub async fn handle(req: Request<Incoming>, conn: &ConnContext, current: Arc<Current>, client_addr: SocketAddr, started: Instant) -> Resp {
    let app = &conn.app;
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/diag" | "/diag/") => respond(StatusCode::OK, "text/html; charset=utf-8", INDEX_HTML),
        (&Method::GET, "/diag/diag.js") => respond(StatusCode::OK, "text/javascript; charset=utf-8", DIAG_JS),
        (&Method::GET, "/diag/diag.css") => respond(StatusCode::OK, "text/css; charset=utf-8", DIAG_CSS),
        (&Method::GET, "/diag/api/info") => json_response(StatusCode::OK, &info(&current)),
        (&Method::GET, "/diag/api/route") => {
            let query = req.uri().query().unwrap_or("");
            let param = |name: &str| form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned());
            match param("path") {
                Some(path) => json_response(StatusCode::OK, &route_for(&current.router, &path, param("region").as_deref())),
                None => json_response(StatusCode::BAD_REQUEST, &json!({"error": "path is required"})),
            }
        }
        (&Method::POST, "/diag/api/probes") => {
            // A custom header makes a cross-site POST need a CORS preflight, which is never granted.
            if !req.headers().contains_key("x-sigrelay-diag") {
                return json_response(StatusCode::FORBIDDEN, &json!({"error": "X-Sigrelay-Diag header required"}));
            }
            let (age, probes) = app.probes.probes(&current.config, &app.connector, PROBE_INTERVAL).await;
            // The page is for anyone: no resolved address, override or egress proxy in its errors.
            let probes: Vec<_> = probes.iter().map(|p| p.redacted()).collect();
            json_response(StatusCode::OK, &json!({"ran_s_ago": age.as_secs_f64(), "probes": probes}))
        }
        (&Method::GET, "/diag/echo") => echo_upgrade(req, conn, &current, client_addr, started),
        _ => respond(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "not found\n"),
    }
}

fn info(current: &Current) -> Value {
    let c = &current.config;
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
    let routes: Vec<Value> = c
        .routes
        .iter()
        .map(|r| {
            json!({
                "name": r.name,
                "path": r.path,
                "region_from": r.region_from.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
                "default_region": r.default_region,
            })
        })
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "now_ms": now_ms,
        "regions": c.regions,
        "routes": routes,
        "probe_interval_s": PROBE_INTERVAL.as_secs(),
    })
}

/// What the relay would do with a connection on `path` (which may carry `?region=`) whose token
/// names `token_region`: the same routing calls a real connection goes through.
pub fn route_for(router: &Router, path: &str, token_region: Option<&str>) -> Value {
    let (path, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    let token_region = token_region.filter(|r| !r.is_empty());
    let request: RouteRequest = match router.match_request(path, query) {
        Ok(r) => r,
        Err(route::RouteError::NoRoute) => return json!({"ok": false, "error": format!("no route for {path}")}),
        Err(route::RouteError::PathRegion) => {
            return json!({"ok": false, "error": format!("the region in {path} is not in the relay's allowed regions")})
        }
        Err(route::RouteError::QueryRegion) => {
            let r = route::query_region(query).ok().flatten().unwrap_or_default();
            return json!({"ok": false, "error": format!("region={r} in the query is not in the relay's allowed regions")});
        }
        Err(route::RouteError::SeveralQueryRegions) => {
            return json!({"ok": false, "error": "the query names more than one region"});
        }
    };
    let route = router.route(request.route);
    let token = token_region.map(|r| crate::token::TokenInfo { region: Some(r.to_string()), ..Default::default() });
    let decision = route::decide(route, &request, token.is_some(), token.as_ref(), unix_now());
    json!({
        "ok": true,
        "route": route.name,
        "region": decision.region,
        "source": decision.source.as_str(),
        "gateway": decision.target.url,
        "token_region": token_region,
        "token_region_allowed": token_region.map(|r| router.is_allowed(r)),
        "mismatch": token_region.map(|r| r != decision.region),
    })
}

/// Validates and answers the echo endpoint's upgrade; the session runs in its own task.
fn echo_upgrade(mut req: Request<Incoming>, conn: &ConnContext, current: &Current, client_addr: SocketAddr, started: Instant) -> Resp {
    let app = &conn.app;
    let mut pending = upgrade::pending(app, &conn.peer, client_addr, &req, started);
    pending.record_mut().route = Some(ECHO_ROUTE.into());
    // No Origin allow-list here: the echo relays nothing, and the relay's own page must reach it
    // whatever origins the app is allowed.
    let admitted = match upgrade::admit(conn, pending, &req, client_addr, &[], Ok(())) {
        Ok(admitted) => admitted,
        Err(refusal) => return refusal,
    };
    let span = tracing::info_span!("diag_echo", conn_id = %admitted.pending.conn_id());
    let upgrade = hyper::upgrade::on(&mut req);
    let timeout = current.config.server.handshake_timeout;
    app.tracker.spawn(echo(app.clone(), upgrade, timeout, admitted).instrument(span));
    upgrade::switching_protocols(&req)
}

/// The echo session: hello with the connection id, then every data message back, within
/// [`ECHO_MAX_MESSAGES`], [`ECHO_MAX_CONTROL_FRAMES`] and [`ECHO_LIFETIME`].
async fn echo(app: Arc<App>, upgrade: OnUpgrade, timeout: Duration, admitted: Admitted) {
    let Admitted { pending, permit, over } = admitted;
    let Some((pending, mut io)) = pending.upgraded(upgrade, timeout).await else { return };
    if let Some(outcome) = over {
        return pending.reject(&mut io, outcome, "over a limit").await;
    }
    let session = pending.open(false, Some(permit));
    let conn_id = session.conn_id().to_string();
    let config = WebSocketConfig::default().max_message_size(Some(ECHO_MAX_MESSAGE_SIZE)).max_frame_size(Some(ECHO_MAX_MESSAGE_SIZE));
    let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
    let counters = session.counters();

    let hello = json!({"type": "hello", "conn_id": conn_id}).to_string();
    // Sends are bounded by the deadline too: a client that stops reading cannot hold the task.
    let deadline_at = Instant::now() + ECHO_LIFETIME;
    let deadline = tokio::time::sleep_until(deadline_at);
    tokio::pin!(deadline);
    let time_limit = || Some((Outcome::DiagLimit, Side::Relay, Some(close_code::GOING_AWAY), "diag echo: time limit".to_string()));
    let gone = || Some((Outcome::ClientGone, Side::Client, None, String::new()));
    let mut ending: Option<(Outcome, Side, Option<u16>, String)> = None;
    let mut control_frames = 0u32;
    match tokio::time::timeout_at(deadline_at, ws.send(Message::text(hello))).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => ending = gone(),
        Err(_) => ending = time_limit(),
    }
    while ending.is_none() {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(msg @ (Message::Text(_) | Message::Binary(_)))) => {
                    let n = counters.msgs_up.fetch_add(1, Relaxed) + 1;
                    counters.bytes_up.fetch_add(msg.len() as u64, Relaxed);
                    if n > ECHO_MAX_MESSAGES {
                        ending = Some((Outcome::DiagLimit, Side::Relay, Some(close_code::POLICY), "diag echo: message limit".into()));
                        break;
                    }
                    counters.bytes_down.fetch_add(msg.len() as u64, Relaxed);
                    counters.msgs_down.fetch_add(1, Relaxed);
                    match tokio::time::timeout_at(deadline_at, ws.send(msg)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => ending = gone(),
                        Err(_) => ending = time_limit(),
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = frame.map(|f| (Some(u16::from(f.code)), f.reason.to_string())).unwrap_or((None, String::new()));
                    ending = Some((Outcome::ClientClosed, Side::Client, code, reason));
                    // tungstenite answers the close; flushing sends the answer.
                    let _ = tokio::time::timeout(Duration::from_secs(5), ws.flush()).await;
                }
                Some(Ok(_)) => {
                    control_frames += 1;
                    if control_frames > ECHO_MAX_CONTROL_FRAMES {
                        ending = Some((Outcome::DiagLimit, Side::Relay, Some(close_code::POLICY), "diag echo: control frame limit".into()));
                    }
                }
                Some(Err(tokio_tungstenite::tungstenite::Error::Capacity(_))) => {
                    ending = Some((Outcome::MessageTooBig, Side::Relay, Some(close_code::TOO_BIG), "diag echo: message too big".into()));
                }
                Some(Err(_)) | None => ending = gone(),
            },
            _ = &mut deadline => ending = time_limit(),
            _ = app.shutdown.close.cancelled() => {
                ending = Some((Outcome::Shutdown, Side::Relay, Some(close_code::RESTART), "sigrelay is restarting".into()));
            }
        }
    }
    let (outcome, closed_by, code, reason) = ending.expect("the loop ends with an ending");
    if closed_by == Side::Relay {
        let frame = CloseFrame { code: CloseCode::from(code.unwrap_or(close_code::GOING_AWAY)), reason: reason.clone().into() };
        let _ = tokio::time::timeout(Duration::from_secs(5), ws.close(Some(frame))).await;
    }
    session.finish(Closing { outcome, closed_by, close_code: code, close_reason: (!reason.is_empty()).then_some(reason), error: None });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn route_for_follows_the_router() {
        let router = Router::new(&Config::defaults());
        let v = route_for(&router, "/signaling", Some("au1"));
        assert_eq!(v["region"], "au1");
        assert_eq!(v["source"], "token");
        assert_eq!(v["gateway"], "wss://au1.vss.twilio.com/signaling");
        assert_eq!(v["mismatch"], false);
        // The path wins over the token: the region in use differs from the token's.
        let v = route_for(&router, "/us1/signaling", Some("au1"));
        assert_eq!(v["region"], "us1");
        assert_eq!(v["source"], "path");
        assert_eq!(v["mismatch"], true);
        // A token region outside the allow-list falls back to the default.
        let v = route_for(&router, "/signaling", Some("xx9"));
        assert_eq!(v["source"], "default");
        assert_eq!(v["token_region_allowed"], false);
        assert_eq!(v["mismatch"], true);
        assert_eq!(route_for(&router, "/nowhere", None)["ok"], false);
        assert_eq!(route_for(&router, "/zz9/signaling", None)["ok"], false);
        assert_eq!(route_for(&router, "/signaling?region=zz9", None)["ok"], false);
    }

    #[test]
    fn owns_only_its_prefix() {
        assert!(owns("/diag") && owns("/diag/") && owns("/diag/echo"));
        assert!(!owns("/diagnostics") && !owns("/signaling"));
    }
}
