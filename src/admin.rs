//! The admin listener (`[admin] listen`, loopback by default): `/healthz`, `/readyz`,
//! `/metrics`, `GET /connections` and `DELETE /connections/{id}`. With `token_file` set, every
//! endpoint but the two probes wants `Authorization: Bearer <token>`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{header, Method, Request, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::config::AdminSettings;
use crate::request::readyz;
use crate::respond::{self, response as respond, text, Resp};

/// Admin connections open at once, at most; more are closed as they are accepted.
const MAX_CONNECTIONS: usize = 64;
/// Bound on reading each request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on a request head, and on what is buffered of a connection's input: no admin request
/// needs more, and no admin endpoint takes a body.
const MAX_HEAD: usize = 16 * 1024;
/// Bound on a connection's whole life (a scraper reconnects; a silent client cannot stay).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Serves the admin endpoints until `stop` fires.
pub async fn serve(listener: TcpListener, app: Arc<App>, settings: AdminSettings, stop: CancellationToken) {
    let host_names: Arc<[String]> = settings.host_names.into();
    let gate = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let Ok(permit) = gate.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max = MAX_CONNECTIONS, "admin connection refused: too many open");
            continue;
        };
        let (app, host_names, stop) = (app.clone(), host_names.clone(), stop.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req| handle(req, app.clone(), host_names.clone()));
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT).max_header_size(MAX_HEAD).max_buf_size(MAX_HEAD);
            tokio::select! {
                _ = http.serve_connection(TokioIo::new(tcp), svc) => {}
                _ = tokio::time::sleep(CONNECTION_LIFETIME) => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// Whether the request's Host is one the admin listener answers to: an IP literal, `localhost`,
/// or a configured name. A page on another site that rebinds its own name to this address
/// sends its own name, and is turned away.
fn host_allowed(headers: &http::HeaderMap, names: &[String]) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else { return false };
    let Ok(authority) = host.parse::<http::uri::Authority>() else { return false };
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    host.parse::<std::net::IpAddr>().is_ok() || host.eq_ignore_ascii_case("localhost") || names.iter().any(|n| n.eq_ignore_ascii_case(host))
}

async fn handle(req: Request<Incoming>, app: Arc<App>, host_names: Arc<[String]>) -> Result<Resp, Infallible> {
    let path = req.uri().path();
    let method = req.method();
    if !host_allowed(req.headers(), &host_names) {
        return Ok(text(StatusCode::MISDIRECTED_REQUEST, "this Host is not served here: add it to [admin] host_names\n"));
    }
    // Nothing here reads a body; refusing one (and closing) keeps hyper from draining it.
    if !hyper::body::Body::is_end_stream(req.body()) {
        let mut resp = text(StatusCode::PAYLOAD_TOO_LARGE, "admin endpoints take no request body\n");
        resp.headers_mut().insert(header::CONNECTION, http::HeaderValue::from_static("close"));
        return Ok(resp);
    }
    if method == Method::GET && path == "/healthz" {
        return Ok(text(StatusCode::OK, "ok\n"));
    }
    if method == Method::GET && path == "/readyz" {
        return Ok(readyz(&app));
    }
    // The token in force now: a reload may have replaced it.
    if let Some(token) = app.admin_token.load_full() {
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let ok = given.and_then(|v| v.strip_prefix("Bearer ")).is_some_and(|t| constant_time_eq(t.as_bytes(), token.as_bytes()));
        if !ok {
            let mut resp = text(StatusCode::UNAUTHORIZED, "a bearer token is required\n");
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
            return Ok(resp);
        }
    }
    Ok(match (method, path) {
        (&Method::GET, "/metrics") => {
            // Prometheus asks for OpenMetrics; curl and `promtool check metrics` read the
            // classic text format.
            let accept = req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
            let open_metrics = app.metrics_text();
            if accept.contains("application/openmetrics-text") {
                respond(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", open_metrics)
            } else {
                respond(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", crate::metrics::classic_text(&open_metrics))
            }
        }
        (&Method::GET, "/connections") => {
            let body = serde_json::to_vec(&app.registry.list()).expect("JSON values serialize");
            respond(StatusCode::OK, "application/json", body)
        }
        (&Method::DELETE, p) if p.starts_with("/connections/") => {
            let id = &p["/connections/".len()..];
            if app.registry.close(id) {
                respond::empty(StatusCode::NO_CONTENT)
            } else {
                text(StatusCode::NOT_FOUND, "no live connection with that id\n")
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
