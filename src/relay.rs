//! One relayed WebSocket, after the browser got its 101: read the first message (for the
//! token), decide the route's region, connect to the gateway, then run the frame pump. The
//! records are written by the [`session`](crate::session) owners this module hands them to.

use std::sync::Arc;

use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;

use crate::app::{App, Current};
use crate::config::Route;
use crate::ice;
use crate::outcome::{Ending, Side};
use crate::first_message::{self, FirstMessage};
use crate::limits::Permit;
use crate::outcome::Outcome;
use crate::pump::{self, PumpOptions};
use crate::records::{millis, unix_now, HandshakeRecord};
use crate::route::{self, RouteRequest};
use crate::session::{Closing, OpenSession, PendingHandshake};
use crate::upstream::{Connected, ForwardHeaders, Timings, UpstreamError};

/// A route request the browser got a 101 for, handed over by [`crate::request`].
pub struct Accepted {
    pub pending: PendingHandshake,
    /// The configuration in force when the request arrived; `request.route` indexes its routes.
    pub current: Arc<Current>,
    pub request: RouteRequest,
    pub headers: ForwardHeaders,
    /// The connection's place under the limits, held until it ends.
    pub permit: Permit,
    /// The limit it is over, if any: then it is closed with 1013 once upgraded.
    pub over: Option<Outcome>,
}

type Client = TokioIo<Upgraded>;

/// Runs one relayed connection to its end.
pub fn run(app: Arc<App>, upgrade: OnUpgrade, accepted: Accepted) -> impl std::future::Future<Output = ()> + Send {
    // Two futures, each boxed: the set-up (the 101, the first message, the gateway's TLS and
    // HTTP handshakes, the ICE watch) is large and short-lived, the pump smaller and long-lived.
    // One future holding both would be sized for the first for the life of the connection (and
    // an `async fn` would keep a copy of its arguments for as long).
    let set_up = Box::pin(set_up(app, upgrade, accepted));
    async move {
        if let Some(relaying) = set_up.await {
            relaying.await
        }
    }
}

/// The pump's future, ready to run once the gateway is connected.
type Relaying = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Everything before the pump: returns it, or `None` when the connection already ended (its
/// records written).
async fn set_up(app: Arc<App>, upgrade: OnUpgrade, accepted: Accepted) -> Option<Relaying> {
    let Accepted { pending, current, request, headers, permit, over } = accepted;
    // The 101 must reach the browser within handshake_timeout: a client that stops reading
    // would otherwise hold this task and its limit permit forever.
    let (mut pending, mut client) = pending.upgraded(upgrade, current.config.server.handshake_timeout).await?;
    if let Some(outcome) = over {
        pending.reject(&mut client, outcome, format!("limit reached: {outcome}")).await;
        return None;
    }
    let connected = tokio::select! {
        c = connect(&app, &mut client, pending.record_mut(), &current, &request, headers) => Some(c),
        // The pump watches for shutdown itself; this is only the connecting phase.
        _ = app.shutdown.close.cancelled() => None,
    };
    match connected {
        Some(Ok((mut upstream, mut first))) => {
            // Not raced against shutdown: bounded on its own, and cut short it could leave half
            // a frame in the browser's stream.
            let route = current.router.route(request.route);
            let watched = rewrite_ice(&current, route, &mut client, &mut upstream, &mut first, pending.record_mut()).await;
            let session = pending.open(true, Some(permit));
            // What passed before the pump (the hello, the gateway's answer up to its iced).
            for (side, msgs, bytes) in watched.early {
                session.counters().add(side, msgs, bytes);
                app.metrics.count_messages(side, msgs, bytes);
            }
            if let Some((ending, error)) = watched.ended {
                end_before_pump(session, ending, error, client, upstream).await;
                return None;
            }
            Some(Box::pin(pump_until_closed(app, client, upstream, first.bytes, session, current)))
        }
        Some(Err((outcome, why))) => {
            pending.reject(&mut client, outcome, why).await;
            None
        }
        None => {
            pending.reject(&mut client, Outcome::Shutdown, "relay is shutting down").await;
            None
        }
    }
}

/// What passed before the pump started, and whether the browser stopped reading meanwhile.
struct Watched {
    /// Messages and bytes relayed from each side.
    early: [(Side, u64, u64); 2],
    /// How the connection ended before the pump started, with a stream that may hold part of
    /// a frame (a side stopped reading, or failed, mid-write), and why.
    ended: Option<(Ending, &'static str)>,
}

/// Reads the first message, decides the region and connects upstream, filling the record as it
/// learns. On failure, returns the outcome and why.
async fn connect(
    app: &Arc<App>,
    client: &mut Client,
    record: &mut HandshakeRecord,
    current: &Current,
    request: &RouteRequest,
    headers: ForwardHeaders,
) -> Result<(Connected, FirstMessage), (Outcome, String)> {
    let route = current.router.route(request.route);
    let server = &current.config.server;
    let mut timings = Timings::default();

    // Connect at once when the path or query already chose the region; otherwise the token in
    // the first message decides, so wait for it.
    let early = route::early(route, request).filter(|_| !server.reject_expired_tokens);
    let (first, decision, upstream) = match early {
        Some((region, target)) => {
            let (first, upstream) = tokio::join!(
                first_message::read(client, server.first_message_timeout),
                app.connector.connect(&target, &headers, &mut timings),
            );
            let decision = route::decide(route, request, first.token_found, first.token.as_ref(), unix_now());
            debug_assert_eq!(decision.region, region, "the token cannot change an early decision");
            (first, decision, upstream)
        }
        None => {
            let first = first_message::read(client, server.first_message_timeout).await;
            let decision = route::decide(route, request, first.token_found, first.token.as_ref(), unix_now());
            if server.reject_expired_tokens && decision.token.expired == Some(true) {
                note_decision(record, &decision);
                return Err((Outcome::TokenExpired, "token has expired".into()));
            }
            let upstream = app.connector.connect(&decision.target, &headers, &mut timings).await;
            (first, decision, upstream)
        }
    };
    note_decision(record, &decision);
    record.upstream_dns_ms = timings.dns.map(millis);
    record.upstream_proxy_ms = timings.proxy.map(millis);
    record.upstream_connect_ms = timings.connect.map(millis);
    record.upstream_tls_ms = timings.tls.map(millis);
    record.upstream_ws_ms = timings.websocket.map(millis);
    record.first_message = first.kind.clone();
    match upstream {
        Ok(c) => {
            record.upstream_addr = Some(c.addr);
            // A connected gateway is one that answered 101.
            record.upstream_status = Some(101);
            Ok((c, first))
        }
        Err(e) => {
            if let UpstreamError::Rejected { status } = e {
                record.upstream_status = Some(status);
            }
            tracing::info!(error = %e, "gateway unreachable");
            Err((e.outcome(), e.to_string()))
        }
    }
}

/// When the hello asks for ICE servers (body `ice`) on a route that rewrites them and the relay
/// has a TURN URL to give: sends the hello now and watches the gateway's answer for its `iced`,
/// whose TURN servers then point at the relay ([`ice::watch`]). Returns what passed meanwhile.
async fn rewrite_ice(current: &Current, route: &Route, client: &mut Client, upstream: &mut Connected, first: &mut FirstMessage, record: &mut HandshakeRecord) -> Watched {
    let mut watched = Watched { early: [(Side::Client, 0, 0), (Side::Upstream, 0, 0)], ended: None };
    let (Some(public_url), Some(hello_len)) = (current.turn_public_url.as_deref(), first.frame_len) else { return watched };
    // A hello over max_message_size is the pump's to refuse (1009).
    let max = current.config.server.max_message_size;
    if !route.rewrite_ice || first.kind.as_deref() != Some("ice") || hello_len as u64 > max {
        return watched;
    }
    let mut taken = 0;
    let sent = async {
        while taken < hello_len {
            match upstream.io.write(&first.bytes[taken..hello_len]).await? {
                0 => return Err(std::io::ErrorKind::WriteZero.into()),
                n => taken += n,
            }
        }
        upstream.io.flush().await
    };
    let sent = tokio::time::timeout(HELLO_WRITE, sent).await;
    // What the stream took is the gateway's: handing it to the pump again would send it twice.
    if taken == hello_len {
        first.bytes.drain(..hello_len);
        watched.early[0] = (Side::Client, 1, hello_len as u64);
    } else if taken > 0 {
        watched.ended = Some(match sent {
            Err(_) => (Ending::Silent(Side::Upstream), "the gateway did not take the browser's first message"),
            Ok(_) => (Ending::Gone(Side::Upstream), "the gateway's stream failed while taking the browser's first message"),
        });
        return watched;
    }
    // A failed write is the pump's to find, with everything else; one that does not finish
    // is a gateway that stopped reading, which the pump's pings find.
    if !matches!(sent, Ok(Ok(()))) {
        return watched;
    }
    let rule = ice::Rule { upstream_host: &current.config.turn.upstream.host, public_url };
    let (done, rest) = ice::watch(&mut upstream.io, client, std::mem::take(&mut upstream.leftover), &rule, max).await;
    upstream.leftover = rest;
    watched.early[1] = (Side::Upstream, done.msgs, done.bytes);
    watched.ended = done.client_stalled.then_some((Ending::Silent(Side::Client), "the browser did not read the gateway's first answer"));
    record.ice_rewritten = Some(done.servers_rewritten > 0);
    record.ice_servers_rewritten = Some(done.servers_rewritten);
    if !done.iced_seen {
        tracing::debug!("the gateway's answer to an ice hello held no iced within the watch");
    }
    watched
}

/// How long writing the hello to a connected gateway may take.
const HELLO_WRITE: std::time::Duration = std::time::Duration::from_secs(2);

/// Ends a connection before the pump started, one side's stream perhaps holding part of a
/// frame: that side's socket is dropped as it is, and the other side gets the ending's close.
async fn end_before_pump(session: OpenSession, ending: Ending, error: &str, mut client: Client, mut upstream: Connected) {
    // The other side hears of it.
    let other = match ending {
        Ending::Silent(Side::Client) | Ending::Gone(Side::Client) => Side::Upstream,
        _ => Side::Client,
    };
    let code = ending.close_code_for(other).unwrap_or(crate::outcome::close_code::GOING_AWAY);
    let reason = format!("{} conn={}", ending.outcome(), session.conn_id());
    let _ = tokio::time::timeout(HELLO_WRITE, async {
        match other {
            Side::Upstream => {
                upstream.io.write_all(&crate::frame::close_frame(code, &reason, Some(rand::random()))).await?;
                upstream.io.shutdown().await
            }
            _ => {
                client.write_all(&crate::frame::close_frame(code, &reason, None)).await?;
                client.shutdown().await
            }
        }
    })
    .await;
    session.finish(Closing {
        outcome: ending.outcome(),
        closed_by: ending.closed_by(),
        close_code: Some(code),
        close_reason: Some(reason),
        error: Some(error.into()),
    });
}

/// Records where the connection goes and what its token said.
fn note_decision(r: &mut HandshakeRecord, decision: &route::Decision) {
    r.region = Some(decision.region.clone());
    r.region_source = Some(decision.source.as_str());
    r.upstream_url = Some(decision.target.url.clone());
    let t = &decision.token;
    r.token_present = t.present;
    r.token_region = t.region.clone();
    r.token_exp = t.exp;
    r.token_expired = t.expired;
    r.region_mismatch = t.region_mismatch;
}

/// Runs the pump until the connection ends, then writes the close record. Not an `async fn`:
/// an `async fn` keeps a second copy of its arguments for the life of its future, and this one
/// lives as long as the connection.
#[allow(clippy::manual_async_fn)]
fn pump_until_closed(app: Arc<App>, client: Client, upstream: Connected, first: Vec<u8>, session: OpenSession, current: Arc<Current>) -> impl std::future::Future<Output = ()> {
    async move {
        let server = &current.config.server;
        let opts = PumpOptions {
            max_message_size: server.max_message_size,
            conn_id: session.conn_id(),
            ping_interval: server.ping_interval,
            idle_timeout: server.idle_timeout,
            drain_jitter: server.drain_jitter,
            metrics: Some(&app.metrics),
        };
        let end = pump::run(
            tokio::io::split(client),
            tokio::io::split(upstream.io),
            pump::Initial { client: first, upstream: upstream.leftover },
            &opts,
            session.counters(),
            &app.shutdown.close,
            session.operator(),
        )
        .await;
        tracing::debug!(outcome = %end.ending.outcome(), "relay ended");
        let closing = Closing {
            outcome: end.ending.outcome(),
            closed_by: end.ending.closed_by(),
            close_code: end.close_code,
            close_reason: end.close_reason,
            error: end.error,
        };
        session.finish(closing);
    }
}
