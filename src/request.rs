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
use crate::outcome::Outcome;
use crate::relay::{self, Accepted};
use crate::respond::{self, Resp};
use crate::session::ConnContext;
use crate::upgrade::{self, Refusal};
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

/// Answers one request on the main listener.
pub async fn handle(mut req: Request<Incoming>, conn: Arc<ConnContext>) -> Result<Resp, Infallible> {
    conn.note_request();
    let started = Instant::now();
    let app = &conn.app;
    if req.method() == Method::GET {
        match req.uri().path() {
            "/healthz" => return Ok(respond::text(StatusCode::OK, "ok\n")),
            "/readyz" => return Ok(readyz(app)),
            _ => {}
        }
    }
    let current = app.current();
    let client_addr = forwarded::client_addr(req.headers(), conn.peer.client_addr, &current.config.server.trusted_proxies);
    if current.config.diag.enabled && crate::diag::owns(req.uri().path()) {
        return Ok(crate::diag::handle(req, &conn, current, client_addr).await);
    }
    let mut pending = upgrade::pending(app, &conn.peer, client_addr, &req, started);
    // Every request that writes a record takes a handshake token, refused or not.
    let rate_ok = app.limiter.handshake(client_addr.ip());

    let checked = upgrade::check_target(&req, conn.peer.sni.as_deref()).and_then(|()| {
        let request = current.router.match_request(req.uri().path(), req.uri().query())?;
        pending.record_mut().route = Some(current.router.route(request.route).name.clone());
        upgrade::validate(&req, &current.config.server.allowed_origins)?;
        Ok(request)
    });
    let request = match checked {
        Ok(r) => r,
        Err(_) if !rate_ok => return Ok(upgrade::refuse(pending, Refusal::Rate)),
        Err(refusal) => return Ok(upgrade::refuse(pending, refusal)),
    };
    let (permit, over) = match conn.admit(client_addr, rate_ok) {
        (_, Some(Outcome::OverMaxConnections)) => return Ok(upgrade::refuse(pending, Refusal::AtCapacity)),
        admitted => admitted,
    };

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
    Ok(upgrade::switching_protocols(&req))
}
