//! One HTTP request on the main listener: the health probes, the `/diag` page, and the routes,
//! whose upgrades are validated here and handed to [`crate::relay`] after the 101.

use std::convert::Infallible;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::Instrument;

use crate::app::App;
use crate::forwarded;
use crate::relay::{self, Accepted};
use crate::respond::{self, Resp};
use crate::session::ConnContext;
use crate::upgrade::{self, Admitted};
use crate::upstream::ForwardHeaders;

/// The answer to a readiness probe: 200 while serving, 503 before every thread accepts and once
/// draining.
pub fn readyz(app: &App) -> Resp {
    if app.ready() {
        respond::text(StatusCode::OK, "ready\n")
    } else {
        respond::text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    }
}

/// Answers one request on the main listener. Past half its pre-upgrade budget
/// (`handshake_timeout` from its accept) a connection's answers say `Connection: close`, so a
/// client's next request opens a fresh connection rather than being cut at the deadline.
pub async fn handle(req: Request<Incoming>, conn: Arc<ConnContext>) -> Result<Resp, Infallible> {
    let budget = conn.app.current().config.server.handshake_timeout;
    let mut resp = answer(req, &conn).await;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS && conn.accepted.elapsed() > budget / 2 {
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(resp)
}

async fn answer(mut req: Request<Incoming>, conn: &Arc<ConnContext>) -> Resp {
    conn.note_request();
    let started = Instant::now();
    let app = &conn.app;
    if req.method() == Method::GET {
        match req.uri().path() {
            "/healthz" => return respond::text(StatusCode::OK, "ok\n"),
            "/readyz" => return readyz(app),
            _ => {}
        }
    }
    let current = app.current();
    let client_addr = forwarded::client_addr(req.headers(), conn.peer.client_addr, &current.config.server.trusted_proxies);
    if current.config.diag.enabled && crate::diag::owns(req.uri().path()) {
        return crate::diag::handle(req, conn, current, client_addr, started).await;
    }
    let mut pending = upgrade::pending(app, &conn.peer, client_addr, &req, started);
    let routed = upgrade::check_target(&req, conn.peer.sni.as_deref())
        .and_then(|()| Ok(current.router.match_request(req.uri().path(), req.uri().query())?));
    if let Ok(request) = &routed {
        pending.record_mut().route = Some(current.router.route(request.route).name.clone());
    }
    let checked = routed.as_ref().map(drop).map_err(|refusal| *refusal);
    let Admitted { pending, permit, over } = match upgrade::admit(conn, pending, &req, client_addr, &current.config.server.allowed_origins, checked) {
        Ok(admitted) => admitted,
        Err(refusal) => return refusal,
    };
    let request = routed.expect("an admitted upgrade was routed");

    // Copied, not cloned: a cloned HeaderValue shares hyper's whole read buffer, which would then
    // live as long as the connection.
    let copy = |name| req.headers().get(name).and_then(|v: &HeaderValue| HeaderValue::from_bytes(v.as_bytes()).ok());
    let headers = ForwardHeaders {
        user_agent: copy(header::USER_AGENT),
        origin: copy(header::ORIGIN),
        forwarded_for: HeaderValue::from_str(&client_addr.ip().to_string()).ok(),
    };
    let span = tracing::info_span!("ws", conn_id = %pending.conn_id(), route = %current.router.route(request.route).name);
    let accepted = Accepted { pending, current, request, headers, permit, over };
    let upgrade = hyper::upgrade::on(&mut req);
    app.tracker.spawn(relay::run(app.clone(), upgrade, accepted).instrument(span));
    upgrade::switching_protocols(&req)
}
