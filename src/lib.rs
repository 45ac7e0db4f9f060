//! sigrelay: a TLS-terminating WebSocket relay for Twilio Video's signalling and insights
//! sockets. It accepts the browser's WebSocket on the company's own domain, forwards it to the
//! region-correct Twilio gateway, and writes one handshake record (and one close record) per
//! connection.
//!
//! Where things happen:
//! - [`listener`]: accepts TCP, runs the TLS handshake, serves HTTP/1.1;
//! - [`handshake`]: routes the request, validates the upgrade, answers 101;
//! - [`relay`]: reads the first message's token, connects upstream ([`upstream`]), runs the
//!   frame [`pump`];
//! - [`records`]: the handshake and close records; [`outcome`]: their outcome words;
//! - [`diag`]: the `/diag` page that tells a user why their WebSocket fails.

pub mod admin;
pub mod config;
pub mod diag;
pub mod diagnose;
pub mod frame;
#[doc(hidden)]
pub mod fuzz_checks;
pub mod handshake;
pub mod limits;
pub mod listener;
pub mod loadtest;
pub mod metrics;
pub mod mock_gateway;
pub mod outcome;
pub mod pki;
pub mod proxy_protocol;
pub mod pump;
pub mod records;
pub mod registry;
pub mod relay;
pub mod report;
pub mod routing;
pub mod shutdown;
pub mod tls;
pub mod token;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;
pub use records::Records;

/// The parts of the configuration a reload (SIGHUP) replaces: routes, regions, limits, origins.
pub struct Current {
    pub config: Config,
    pub router: routing::Router,
}

/// State shared by every connection of one running relay.
pub struct App {
    current: ArcSwap<Current>,
    pub connector: upstream::Connector,
    pub records: Records,
    pub registry: registry::Registry,
    pub shutdown: shutdown::Signals,
    /// Every connection and session task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    pub certs: Arc<tls::CertStore>,
    /// `None` when `[server] tls = false`.
    pub tls: Option<TlsAcceptor>,
    /// `[server] proxy_protocol` as started: like `tls`, it changes only with a restart.
    pub proxy_protocol: bool,
    pub limiter: limits::Limiter,
    /// The `/diag` page's shared state (its last gateway probes).
    pub diag: diag::Diag,
    /// The admin listener's bound address, once it is listening.
    pub admin_addr: OnceLock<SocketAddr>,
    /// Set once every thread is accepting.
    accepting: std::sync::atomic::AtomicBool,
}

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("binding the admin listener on {addr}: {source}")]
    Admin { addr: SocketAddr, source: std::io::Error },
    #[error("admin.token_file: {0}")]
    AdminToken(std::io::Error),
    #[error("starting the server.threads accept threads: {0}")]
    Threads(std::io::Error),
}

/// File descriptors kept back from `max_connections`, so that near the limit sigrelay can still
/// accept, answer and record instead of failing `accept()`.
const FD_RESERVE: u64 = 64;

impl App {
    /// Builds the shared state: TLS on both hops, routes, connector, limits.
    pub fn new(config: Config, records: Records) -> Result<Arc<App>, StartError> {
        let certs = Arc::new(tls::CertStore::load(&config)?);
        let server_tls = tls::server_config(certs.clone())?;
        let client_tls = tls::client_config(&config)?;
        // Each relayed connection holds two descriptors.
        let nofile = rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft).unwrap_or(1024);
        // Each extra thread holds its own epoll, waker and copy of the listening socket.
        let reserve = FD_RESERVE + 4 * (config.server.threads as u64 - 1);
        let derived_max = (nofile.saturating_sub(reserve) / 2).max(1) as usize;
        Ok(Arc::new(App {
            connector: upstream::Connector::new(&config, client_tls),
            records,
            registry: registry::Registry::default(),
            shutdown: shutdown::Signals::default(),
            tracker: TaskTracker::new(),
            tls: config.server.tls.then(|| TlsAcceptor::from(server_tls)),
            proxy_protocol: config.server.proxy_protocol,
            certs,
            limiter: limits::Limiter::new(config.limits.clone(), derived_max),
            diag: diag::Diag::default(),
            admin_addr: OnceLock::new(),
            accepting: Default::default(),
            current: ArcSwap::from_pointee(Current { router: routing::Router::new(&config), config }),
        }))
    }

    /// The configuration in force now. A connection keeps the one it started with.
    pub fn current(&self) -> Arc<Current> {
        self.current.load_full()
    }

    /// The metrics, fed by records, the registry and the pump.
    pub fn metrics(&self) -> &metrics::Metrics {
        self.records.metrics()
    }

    /// Puts a new configuration's routes, regions, limits, origins and certificates in force.
    /// Listener settings (address, TLS on/off, PROXY protocol, admin) need a restart. On error
    /// nothing changes.
    pub fn reload(&self, config: Config) -> Result<(), StartError> {
        let old = self.current();
        let (was, now) = (&old.config, &config);
        let restart_only = [
            ("server.listen", was.server.listen != now.server.listen),
            ("server.tls", was.server.tls != now.server.tls),
            ("server.proxy_protocol", was.server.proxy_protocol != now.server.proxy_protocol),
            ("server.threads", was.server.threads != now.server.threads),
            ("admin.listen", was.admin.listen != now.admin.listen),
            ("upstream", format!("{:?}", was.upstream) != format!("{:?}", now.upstream)),
        ];
        for (key, changed) in restart_only {
            if changed {
                tracing::warn!(key, "changed in the file but takes effect only after a restart");
            }
        }
        self.certs.reload(&config)?;
        self.limiter.update(config.limits.clone());
        self.current.store(Arc::new(Current { router: routing::Router::new(&config), config }));
        Ok(())
    }

    /// Whether `/readyz` says ready: every thread accepting, and not draining.
    pub fn ready(&self) -> bool {
        self.accepting.load(std::sync::atomic::Ordering::Acquire) && !self.shutdown.drain.is_cancelled()
    }
}

/// How often certificate files are checked for changes.
const CERT_POLL: Duration = Duration::from_secs(1);

/// Serves on an already-bound listener until `shutdown` resolves, then drains: stops accepting
/// (`/readyz` turns 503), gives live connections `drain_timeout`, closes the rest with 1012
/// spread over `drain_jitter`, and returns.
pub async fn serve(app: Arc<App>, listener: TcpListener, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let background = CancellationToken::new();
    let mut helpers = Vec::new();
    let current = app.current();
    if let Some(addr) = current.config.admin.listen {
        let admin = TcpListener::bind(addr).await.map_err(|source| StartError::Admin { addr, source })?;
        let bound = admin.local_addr().map_err(|source| StartError::Admin { addr, source })?;
        let _ = app.admin_addr.set(bound);
        tracing::info!(admin = %bound, "admin listener up (/metrics, /connections, /readyz)");
        let token = match &current.config.admin.token_file {
            Some(f) => Some(std::fs::read_to_string(f).map_err(StartError::AdminToken)?.trim().to_string()),
            None => None,
        };
        helpers.push(tokio::spawn(admin::serve(admin, app.clone(), token, background.clone())));
    }
    helpers.push(tokio::spawn(background_chores(app.clone(), background.clone())));
    let threads = current.config.server.threads;
    let mut accepting = match listener::Acceptors::start(listener, app.clone(), threads).await {
        Ok(a) => a,
        Err(e) => {
            background.cancel();
            return Err(StartError::Threads(e));
        }
    };
    app.accepting.store(true, std::sync::atomic::Ordering::Release);
    shutdown.await;
    shutdown::drain(&app, &mut accepting).await;
    accepting.join().await;
    background.cancel();
    for h in helpers {
        let _ = h.await;
    }
    Ok(())
}

/// Certificate files checked for changes; idle rate-limit buckets forgotten.
async fn background_chores(app: Arc<App>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(CERT_POLL);
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        ticks += 1;
        // File reads and key parsing stay off this thread, which also serves connections.
        let (certs, config) = (app.certs.clone(), app.current());
        match tokio::task::spawn_blocking(move || certs.reload(&config.config)).await.expect("the reload check does not panic") {
            Ok(true) => tracing::info!("certificate files changed; new handshakes use the new certificates"),
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "certificate files changed but cannot be used; keeping the ones in service"),
        }
        if ticks % 60 == 0 {
            app.limiter.sweep();
        }
    }
}

/// Runs the relay with records on stdout: the entry point `main` uses.
pub async fn run(config: Config, listener: TcpListener, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let (records, writer) = Records::stdout();
    let app = App::new(config, records)?;
    serve(app, listener, shutdown).await?;
    // The writer thread ends once every Records handle is gone; a task still stuck after the
    // forced close must not keep the process alive.
    let _ = tokio::time::timeout(Duration::from_secs(5), tokio::task::spawn_blocking(|| writer.finish())).await;
    Ok(())
}
