//! Accepting connections: the accept loops (one per thread), and per connection the PROXY
//! header, the TLS handshake (under `handshake_timeout`) and the HTTP/1.1 server with upgrades,
//! whose requests [`crate::request`] answers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use prometheus_client::metrics::gauge::Gauge;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::field::Empty;
use tracing::Instrument;

use crate::app::App;
use crate::limits::ThreadHeld;
use crate::metrics::{Metrics, ThreadLabel};
use crate::outcome::Outcome;
use crate::prefixed::Prefixed;
use crate::records::millis;
use crate::request;
use crate::session::{ConnContext, PendingHandshake, Peer};

/// Largest request head (request line and headers) accepted.
const MAX_HEAD: usize = 64 * 1024;

/// The accept loops, one per thread (`server.threads`): one on the caller's runtime and one on
/// each extra thread's own single-threaded runtime, all accepting on the same port. A connection
/// lives on one thread (the one that accepted it, or the least-loaded one: [`Placement`]), so its
/// reads, writes and wake-ups never cross threads: on two cores this cut the relay's CPU per
/// handshake cycle by a fifth against one work-stealing runtime, where tasks hop between
/// threads. This is nginx's worker model.
pub struct Acceptors {
    main: tokio::task::JoinHandle<()>,
    extra: Vec<ExtraThread>,
    _stop: StopOnDrop,
}

/// An extra thread's signals: it stopped accepting; it ended.
struct ExtraThread {
    stopped: Option<oneshot::Receiver<()>>,
    ended: oneshot::Receiver<()>,
}

/// How long `join` waits for the extra threads after shutdown has run.
const JOIN_GRACE: Duration = Duration::from_secs(3);

/// Stops every thread accepting, and lets each end once its connections have, if the
/// acceptors are dropped before shutdown ran (a start that failed half-way, or a `serve`
/// future dropped); after shutdown it does nothing new.
struct StopOnDrop(Arc<App>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.shutdown.drain.cancel();
        self.0.tracker.close();
    }
}

impl Acceptors {
    /// Starts the loops; they stop accepting when shutdown's drain stage starts.
    pub async fn start(listener: TcpListener, app: Arc<App>, threads: usize) -> std::io::Result<Acceptors> {
        let stop = StopOnDrop(app.clone());
        let (placement, mut inboxes) = Placement::new(threads.max(1), &app.metrics);
        let mut extra = Vec::new();
        for (i, inbox) in inboxes.drain(1..).enumerate() {
            extra.push(ExtraThread::start(&listener, &app, i + 1, placement.clone(), inbox).await?);
        }
        let inbox = inboxes.pop().expect("one inbox per thread");
        let main = app.tracker.spawn(accept_loop(listener, app.clone(), Thread { index: 0, placement, inbox }));
        Ok(Acceptors { main, extra, _stop: stop })
    }

    /// Waits until every loop has stopped accepting.
    pub async fn stopped(&mut self) {
        let _ = (&mut self.main).await;
        for t in &mut self.extra {
            if let Some(rx) = t.stopped.take() {
                let _ = rx.await;
            }
        }
    }

    /// Waits, briefly, for the extra threads to end: each does once its connections have, or
    /// once the forced close's grace has run out, dropping whatever is still stuck.
    pub async fn join(mut self) {
        let ended = futures_util::future::join_all(self.extra.drain(..).map(|t| t.ended));
        if tokio::time::timeout(JOIN_GRACE, ended).await.is_err() {
            tracing::warn!("an accept thread did not end in time");
        }
    }
}

impl ExtraThread {
    /// Starts extra thread `i`, accepting from a duplicate of `listener`'s socket. Its runtime is
    /// built on the thread itself, which reports whether it came up.
    async fn start(listener: &TcpListener, app: &Arc<App>, i: usize, placement: Arc<Placement>, inbox: Inbox) -> std::io::Result<ExtraThread> {
        let socket = socket2::SockRef::from(listener);
        let shared = if socket.reuse_port().unwrap_or(false) {
            // A socket of its own on the same port: the kernel spreads new connections over the
            // threads' sockets by a hash, where a shared one goes to whichever thread woke first.
            bind_std(listener.local_addr()?)?
        } else {
            std::net::TcpListener::from(socket.try_clone()?)
        };
        let (started_tx, started) = oneshot::channel::<std::io::Result<()>>();
        let (stopped_tx, stopped) = oneshot::channel();
        let (ended_tx, ended) = oneshot::channel();
        let app = app.clone();
        std::thread::Builder::new().name(format!("sigrelay-{i}")).spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => return drop(started_tx.send(Err(e))),
            };
            runtime.block_on(async move {
                let listener = match TcpListener::from_std(shared) {
                    Ok(l) => l,
                    Err(e) => return drop(started_tx.send(Err(e))),
                };
                let _ = started_tx.send(Ok(()));
                accept_loop(listener, app.clone(), Thread { index: i, placement, inbox }).await;
                let _ = stopped_tx.send(());
                // This thread's connections run to their end: the tracker empties once shutdown
                // has closed it and every connection, on any thread, is gone. Past the forced
                // close's grace, what is left is stuck and is dropped with the runtime.
                tokio::select! {
                    _ = app.tracker.wait() => {}
                    _ = async {
                        app.shutdown.close.cancelled().await;
                        tokio::time::sleep(crate::shutdown::FORCE_GRACE + Duration::from_secs(1)).await;
                    } => {}
                }
            });
            runtime.shutdown_timeout(Duration::from_secs(1));
            let _ = ended_tx.send(());
        })?;
        match started.await {
            Ok(result) => result?,
            Err(_) => return Err(std::io::Error::other("the thread ended before it started accepting")),
        }
        Ok(ExtraThread { stopped: Some(stopped), ended })
    }
}

/// Binds the listening socket with `SO_REUSEPORT`, so that each of `server.threads` can have a
/// socket of its own on the same port (see [`Acceptors`]); only processes of the same user can
/// join the port. Call it inside a tokio runtime.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    // With SO_REUSEPORT alone a second sigrelay of the same user would quietly share a port
    // already in use. A plain bind first fails with "address in use" as it always did.
    let addr = std::net::TcpListener::bind(addr)?.local_addr()?;
    TcpListener::from_std(bind_std(addr)?)
}

fn bind_std(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// A connection accepted on one thread and handed to another, already counted there.
type Handoff = (std::net::TcpStream, SocketAddr, ThreadHeld);
/// A thread's queue of connections handed to it.
type Inbox = mpsc::Receiver<Handoff>;

/// Connections handed over but not yet taken, per thread: a handoff to a full inbox is served
/// where it was accepted instead.
const INBOX: usize = 256;

/// Which thread serves a new connection: the one that accepted it, unless it holds more than
/// another thread does. The kernel's `SO_REUSEPORT` hash spreads connections over the threads'
/// sockets at random (a shared socket, over whichever thread wakes first), and a connection stays
/// where it is served, so 100 long-lived connections can sit 60 to 40; under overload the busier
/// thread's connections then queue while the other thread has CPU to spare. Handing a connection
/// over costs moving its socket to the other thread's reactor once.
pub(crate) struct Placement {
    /// Connections each thread is serving or has been handed (`sigrelay_thread_connections`).
    held: Box<[Gauge]>,
    inboxes: Box<[mpsc::Sender<Handoff>]>,
}

/// One accept loop's place among the threads.
pub(crate) struct Thread {
    index: usize,
    placement: Arc<Placement>,
    inbox: Inbox,
}

impl Placement {
    fn new(threads: usize, metrics: &Metrics) -> (Arc<Placement>, Vec<Inbox>) {
        let (senders, inboxes): (Vec<_>, Vec<_>) = (0..threads).map(|_| mpsc::channel(INBOX)).unzip();
        let held = (0..threads).map(|i| metrics.thread_connections.get_or_create(&ThreadLabel { thread: i.to_string() }).clone()).collect();
        (Arc::new(Placement { held, inboxes: senders.into() }), inboxes)
    }

    /// The thread that should serve a connection `me` accepted, counted there from now on (so a
    /// burst accepted on several threads at once sees each placement): `me`, unless another
    /// holds at least two fewer. The threads stay within two of even, and a connection arriving
    /// at a thread one ahead stays put: half the handoffs of keeping them within one.
    fn pick(&self, me: usize) -> (usize, ThreadHeld) {
        let load = |i: usize| self.held[i].get();
        let (least, fewest) = (0..self.held.len()).map(|i| (i, load(i))).min_by_key(|&(_, n)| n).unwrap_or((me, 0));
        let target = if load(me) >= fewest + 2 { least } else { me };
        (target, ThreadHeld::new(self.held[target].clone()))
    }
}

impl Thread {
    /// Serves `tcp` here, or hands it to a thread holding fewer connections.
    fn place(&self, app: &Arc<App>, tcp: TcpStream, addr: SocketAddr) {
        let (target, held) = self.placement.pick(self.index);
        if target == self.index {
            return serve(app, tcp, addr, held);
        }
        let std = match tcp.into_std() {
            Ok(std) => std,
            Err(e) => return lost(app, addr, format!("cannot hand the connection to another thread: {e}")),
        };
        match self.placement.inboxes[target].try_send((std, addr, held)) {
            Ok(()) => {}
            // Full, or that thread has stopped: serve it here after all.
            Err(e) => {
                let (std, addr, held) = e.into_inner();
                drop(held);
                let held = ThreadHeld::new(self.placement.held[self.index].clone());
                match TcpStream::from_std(std) {
                    Ok(tcp) => serve(app, tcp, addr, held),
                    Err(e) => lost(app, addr, format!("cannot take the connection back: {e}")),
                }
            }
        }
    }

    /// Serves a connection another thread handed over.
    fn take(&self, app: &Arc<App>, (std, addr, held): Handoff) {
        match TcpStream::from_std(std) {
            Ok(tcp) => serve(app, tcp, addr, held),
            Err(e) => lost(app, addr, format!("cannot take over a connection from another thread: {e}")),
        }
    }
}

fn serve(app: &Arc<App>, tcp: TcpStream, addr: SocketAddr, held: ThreadHeld) {
    app.tracker.spawn(serve_connection(app.clone(), tcp, addr, held));
}

/// The record of a connection the relay could not move between its own threads (the socket
/// could not join the other reactor: it has never been seen to happen).
fn lost(app: &Arc<App>, client_addr: SocketAddr, why: String) {
    tracing::error!(error = %why, "connection dropped");
    record_early(app, &Peer { client_addr, sni: None, tls_ms: None }, Instant::now(), Outcome::RelayError, why);
}

/// Accepts until shutdown starts, and serves what other threads hand over. One failed `accept()`
/// never ends the loop; when descriptors run out it backs off briefly instead of spinning.
pub(crate) async fn accept_loop(listener: TcpListener, app: Arc<App>, mut thread: Thread) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            Some(handed) = thread.inbox.recv() => {
                thread.take(&app, handed);
                continue;
            }
            _ = app.shutdown.drain.cancelled() => {
                // What was handed over is served (and drained) like the rest; later handoffs
                // fail and stay where they were accepted.
                thread.inbox.close();
                while let Ok(handed) = thread.inbox.try_recv() {
                    thread.take(&app, handed);
                }
                return;
            }
        };
        match accepted {
            Ok((tcp, addr)) => {
                thread.place(&app, tcp, addr);
                // One connection per turn, as nginx's default (`multi_accept off`): this thread
                // starts the handshake it just took before taking another, so a burst waiting in
                // the backlog spreads over the threads instead of landing on whichever woke first.
                tokio::task::yield_now().await;
            }
            Err(e) => {
                // ENFILE (23) and EMFILE (24): retrying at once would spin.
                let exhausted = matches!(e.raw_os_error(), Some(23 | 24));
                tracing::warn!(error = %e, "accept failed");
                if exhausted {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// Serves one TCP connection: the PROXY header if configured, TLS (unless off), then HTTP
/// requests until the connection upgrades or closes; `thread` counts it on its thread, carried
/// by its permit until it ends. Everything before the upgrade, together,
/// is bounded by `handshake_timeout`, and the connection counts against the limits from here.
async fn serve_connection(app: Arc<App>, tcp: TcpStream, peer: SocketAddr, thread: ThreadHeld) {
    let _ = tcp.set_nodelay(true);
    let span = tracing::info_span!("conn", client = %peer, sni = Empty);
    let started = Instant::now();
    let current = app.current();
    let server = &current.config.server;
    let limit = server.handshake_timeout;
    let deadline = started + limit;
    let trusted = |ip: &std::net::IpAddr, nets: &[ipnet::IpNet]| nets.iter().any(|n| n.contains(ip));
    async {
        let early_failure = |client_addr: SocketAddr, outcome: Outcome, why: String| {
            tracing::debug!(%outcome, error = %why, "connection failed before a request");
            record_early(&app, &Peer { client_addr, sni: None, tls_ms: None }, started, outcome, why);
        };
        // A trusted proxy's own address is not limited per address: its clients are, once its
        // requests name them.
        let by_address = !trusted(&peer.ip(), &server.trusted_proxies) && !app.proxy_protocol;
        let mut permit = match app.limiter.connection(peer.ip(), by_address) {
            Ok(p) => p,
            Err(outcome) => {
                let why = format!("more than {} connections over the limit: closed at accept", crate::limits::OVERSHOOT);
                return early_failure(peer, outcome, why);
            }
        };
        permit.count_on(thread);
        let mut client_addr = peer;
        let io = if app.proxy_protocol {
            if !trusted(&peer.ip(), &server.proxy_protocol_from) {
                let why = format!("PROXY header from {}, which is not in proxy_protocol_from", peer.ip());
                return early_failure(peer, Outcome::BadProxyHeader, why);
            }
            match crate::proxy_protocol::read(tcp, deadline).await {
                Ok((addr, io)) => {
                    // A header without an address is the balancer's own health check.
                    if let Some(addr) = addr {
                        client_addr = addr;
                        tracing::Span::current().record("client", tracing::field::display(addr));
                        if let Err(outcome) = app.limiter.attribute_at_accept(&mut permit, addr.ip()) {
                            let why = format!("more than {} connections over the limit: closed at accept", crate::limits::OVERSHOOT);
                            return early_failure(addr, outcome, why);
                        }
                    }
                    io
                }
                Err(why) => return early_failure(peer, Outcome::BadProxyHeader, why),
            }
        } else {
            Prefixed::new(&[], tcp)
        };
        let Some(tls_config) = &app.tls else {
            // Behind a balancer that terminates TLS and passes the stream on, TURN arrives plain.
            let conn = ConnContext::new(&app, Peer { client_addr, sni: None, tls_ms: None }, started, permit);
            let mut io = io;
            let first = if current.config.turn.enabled { sniff(&mut io, deadline).await } else { Vec::new() };
            if crate::turn::is_stun(&first) {
                return crate::turn::serve(&app, io, first, conn, started).await;
            }
            return serve_http(&app, Prefixed::new(&first, io), conn, deadline, started).await;
        };
        let tls = match tokio::time::timeout_at(deadline, crate::tls_stream::accept(tls_config.clone(), io)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return early_failure(client_addr, Outcome::ClientTlsError, e.to_string()),
            Err(_) => {
                let why = format!("TLS handshake did not finish within {}", humantime::format_duration(limit));
                return early_failure(client_addr, Outcome::ClientTimeout, why);
            }
        };
        let sni = tls.server_name().map(str::to_string);
        if let Some(sni) = &sni {
            tracing::Span::current().record("sni", sni.as_str());
        }
        let conn = ConnContext::new(&app, Peer { client_addr, sni, tls_ms: Some(millis(started.elapsed())) }, started, permit);
        let mut tls = tls;
        // A browser's TURN client starts with a STUN message; anything else is HTTP.
        let first = if current.config.turn.enabled { sniff(&mut tls, deadline).await } else { Vec::new() };
        // What ALPN agreed must be what is spoken (RFC 7301 §3.2; ALPACA): a session for TURN
        // is not served HTTP, and the HTTP handler refuses STUN bytes on its own.
        let (alpn_turn, alpn_http) = (tls.alpn_protocol() == Some(b"stun.turn"), tls.alpn_protocol() == Some(b"http/1.1"));
        if alpn_turn && !crate::turn::is_stun(&first) {
            let why = match current.config.turn.enabled {
                true => "ALPN agreed on stun.turn, and the first bytes are not a STUN message",
                false => "ALPN agreed on stun.turn, and TURN is turned off ([turn] enabled = false)",
            };
            return record_early(&app, &conn.peer, started, Outcome::BadRequest, why.to_string());
        }
        if crate::turn::is_stun(&first) && !alpn_http {
            return crate::turn::serve(&app, tls, first, conn, started).await;
        }
        serve_http(&app, Prefixed::new(&first, tls), conn, deadline, started).await
    }
    .instrument(span)
    .await
}

/// Reads a connection's first bytes, enough to tell a STUN message from an HTTP request, by
/// `deadline`; whatever came (perhaps nothing) is handed on to be read again.
async fn sniff<S: tokio::io::AsyncRead + Unpin>(io: &mut S, deadline: Instant) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut first = [0u8; 512];
    let mut filled = 0;
    while crate::turn::may_be_stun(&first[..filled]) {
        match tokio::time::timeout_at(deadline, io.read(&mut first[filled..])).await {
            Ok(Ok(n)) if n > 0 => filled += n,
            _ => break,
        }
    }
    first[..filled].to_vec()
}

/// Writes the record of a connection that failed before any request. Such records cost a client
/// nothing to cause, so each takes a handshake token from its address; past the rate they are
/// counted in the metrics but not written, and cannot push real records out of the queue.
fn record_early(app: &Arc<App>, peer: &Peer, started: Instant, outcome: Outcome, why: String) {
    let pending = PendingHandshake::new(app, peer, started);
    if app.limiter.handshake(peer.client_addr.ip()) {
        let _ = pending.fail(outcome, why);
    } else {
        pending.suppress(outcome);
    }
}

/// How long a response in flight may still take once the pre-upgrade deadline has passed.
const LAST_RESPONSE: Duration = Duration::from_millis(500);

/// Serves HTTP/1.1 with upgrades until `deadline`; a connection that ends without a request
/// gets its record here.
async fn serve_http<I>(app: &Arc<App>, io: I, conn: ConnContext, deadline: Instant, started: Instant)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::new(conn);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100)))
        .max_header_size(MAX_HEAD)
        .max_buf_size(MAX_HEAD);
    let svc_conn = conn.clone();
    let svc = service_fn(move |req| request::handle(req, svc_conn.clone()));
    let served = http.serve_connection(TokioIo::new(io), svc).with_upgrades();
    tokio::pin!(served);
    // Past the deadline (or on drain), a response in flight may finish; a client that pipelines
    // requests and never reads cannot hold the connection beyond that.
    enum Cut {
        Deadline,
        Drain,
    }
    let (mut result, cut) = tokio::select! {
        r = served.as_mut() => (Some(r), None),
        _ = tokio::time::sleep_until(deadline) => (None, Some(Cut::Deadline)),
        _ = app.shutdown.drain.cancelled() => (None, Some(Cut::Drain)),
    };
    if cut.is_some() {
        served.as_mut().graceful_shutdown();
        result = tokio::time::timeout(LAST_RESPONSE, served).await.ok();
    }
    if !conn.saw_request() {
        let timeout = || (Outcome::ClientTimeout, "request headers did not arrive within handshake_timeout".to_string());
        let (outcome, why) = match (&cut, &result) {
            (Some(Cut::Deadline), _) => timeout(),
            (Some(Cut::Drain), _) => (Outcome::Shutdown, "the relay stopped accepting before a request arrived".to_string()),
            (None, Some(Err(e))) if e.is_timeout() => timeout(),
            (None, Some(Err(e))) if e.is_parse() || e.is_parse_too_large() => (Outcome::BadRequest, e.to_string()),
            (None, Some(Err(e))) => (Outcome::NoRequest, e.to_string()),
            (None, _) => (Outcome::NoRequest, "connection closed before a request".to_string()),
        };
        record_early(app, &conn.peer, started, outcome, why);
    } else {
        match (cut, result) {
            (Some(Cut::Deadline), _) => tracing::debug!("connection closed: no upgrade within handshake_timeout"),
            (_, Some(Err(e))) => tracing::debug!(error = %e, "http connection ended with an error"),
            _ => {}
        }
    }
}
