//! The state every connection of one running relay shares, and the reload that replaces the
//! parts of the configuration that may change while it runs.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::limits::Limiter;
use crate::metrics::Metrics;
use crate::probe::ProbeCache;
use crate::records::Records;
use crate::registry::Registry;
use crate::route::Router;
use crate::shutdown::Signals;
use crate::tls::{self, CertStore, TlsError};
use crate::upstream::Connector;

/// The parts of the configuration a reload (SIGHUP) replaces: routes, regions, limits, origins,
/// `[turn]`.
pub struct Current {
    pub config: Config,
    pub router: Router,
    /// The `turns:` URL browsers are told in place of the TURN upstream's: `[turn] public_url`,
    /// or one made of the certificate's host name. `None` when TURN is off or no URL is known.
    pub turn_public_url: Option<String>,
}

impl Current {
    fn new(config: Config, certs: &CertStore) -> Current {
        let turn_public_url = turn_public_url(&config, certs);
        Current { router: Router::new(&config), config, turn_public_url }
    }
}

/// What browsers are told to use for TURN, if anything.
fn turn_public_url(config: &Config, certs: &CertStore) -> Option<String> {
    let turn = &config.turn;
    match (&turn.public_url, turn.enabled, config.server.tls) {
        (_, false, _) => None,
        (Some(url), true, _) => Some(url.clone()),
        // Without TLS the certificate says nothing about the name browsers use.
        (None, true, false) => {
            tracing::warn!("[turn] public_url is not set and server.tls is off: the gateway's ICE servers are passed on unchanged");
            None
        }
        (None, true, true) => {
            let derived = certs.host_name().map(|host| format!("turns:{host}:443?transport=tcp"));
            if derived.is_none() {
                tracing::warn!("[turn] public_url is not set and the certificate names no host: the gateway's ICE servers are passed on unchanged");
            }
            derived
        }
    }
}

/// State shared by every connection of one running relay.
pub struct App {
    current: ArcSwap<Current>,
    pub connector: Connector,
    pub records: Records,
    pub metrics: Arc<Metrics>,
    pub registry: Registry,
    pub shutdown: Signals,
    /// Every connection and session task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    pub certs: Arc<CertStore>,
    /// `None` when `[server] tls = false`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// `[server] proxy_protocol` as started: like `tls`, it changes only with a restart.
    pub proxy_protocol: bool,
    pub limiter: Limiter,
    /// The `/diag` page's last gateway probes.
    pub probes: ProbeCache,
    /// The admin listener's bound address, once it is listening.
    pub admin_addr: OnceLock<SocketAddr>,
    /// The admin endpoints' bearer token, from `[admin] token_file`: read at start and again on
    /// every reload, so a leaked token is replaced without a restart.
    pub admin_token: ArcSwapOption<String>,
    /// Set once every thread is accepting.
    accepting: AtomicBool,
    /// What systemd is told (READY, RELOADING, STOPPING), kept in order.
    pub systemd: crate::systemd::Notifier,
}

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("upstream DNS: {0}")]
    Dns(String),
    #[error("binding the admin listener on {addr}: {source}")]
    Admin { addr: SocketAddr, source: std::io::Error },
    #[error("admin.token_file: {0}")]
    AdminToken(std::io::Error),
    #[error("starting the server.threads accept threads: {0}")]
    Threads(std::io::Error),
}

/// Why a reload was refused; the running configuration stays in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("server.proxy_protocol stays on until a restart, and the new server.proxy_protocol_from (or trusted_proxies) lists no balancer: every connection would be refused")]
    NoBalancer,
    #[error("admin.token_file: {0}")]
    AdminToken(String),
}

/// Puts a setting that needs a restart back to its running value, noting `key` if the file
/// changed it.
fn keep<T: PartialEq + Clone>(key: &'static str, running: &T, new: &mut T, changed: &mut Vec<&'static str>) {
    if running != new {
        changed.push(key);
        *new = running.clone();
    }
}

/// File descriptors kept back from `max_connections`, so that near the limit sigrelay can still
/// accept, answer and record instead of failing `accept()`.
const FD_RESERVE: u64 = 64;

impl App {
    /// Builds the shared state: TLS on both hops, routes, connector, limits.
    pub fn new(config: Config, records: Records) -> Result<Arc<App>, StartError> {
        let certs = Arc::new(CertStore::load(&config)?);
        let server_tls = tls::server_config(certs.clone())?;
        let client_tls = tls::client_config(&config)?;
        // Each relayed connection holds two descriptors.
        let nofile = rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft).unwrap_or(1024);
        // Each extra thread holds its own epoll, waker and copy of the listening socket.
        let reserve = FD_RESERVE + 4 * (config.server.threads as u64 - 1);
        let derived_max = (nofile.saturating_sub(reserve) / 2).max(1) as usize;
        let metrics = Arc::new(Metrics::new(records.dropped_counter()));
        metrics.set_certificates(&certs.expiry());
        let connector = Connector::new(&config, client_tls).map_err(StartError::Dns)?;
        let tls = config.server.tls.then_some(server_tls);
        let proxy_protocol = config.server.proxy_protocol;
        let limiter = Limiter::new(config.limits.clone(), derived_max);
        let current = Current::new(config, &certs);
        Ok(Arc::new(App {
            connector,
            records,
            metrics,
            registry: Registry::default(),
            shutdown: Signals::default(),
            tracker: TaskTracker::new(),
            tls,
            proxy_protocol,
            certs,
            limiter,
            probes: ProbeCache::default(),
            admin_addr: OnceLock::new(),
            admin_token: ArcSwapOption::empty(),
            accepting: AtomicBool::new(false),
            systemd: crate::systemd::Notifier::default(),
            current: ArcSwap::from_pointee(current),
        }))
    }

    /// The configuration in force now. A connection keeps the one it started with.
    pub fn current(&self) -> Arc<Current> {
        self.current.load_full()
    }

    /// Puts a new configuration's routes, regions, limits, origins, `[turn]`, certificates and
    /// admin token in force.
    /// Listener settings (address, TLS on/off, PROXY protocol, threads), the rest of `[admin]` and
    /// `[upstream]` need a restart: the running values stay in the configuration put in force, so
    /// nothing reads a value the listener does not use. On error nothing changes.
    pub fn reload(&self, mut config: Config) -> Result<(), ReloadError> {
        let old = self.current();
        let was = &old.config;
        // Each is compared and put back to its running value in one place, so the two cannot
        // drift apart.
        let mut changed = Vec::new();
        keep("server.listen", &was.server.listen, &mut config.server.listen, &mut changed);
        keep("server.tls", &was.server.tls, &mut config.server.tls, &mut changed);
        keep("server.proxy_protocol", &was.server.proxy_protocol, &mut config.server.proxy_protocol, &mut changed);
        keep("server.threads", &was.server.threads, &mut config.server.threads, &mut changed);
        keep("admin", &was.admin, &mut config.admin, &mut changed);
        keep("upstream", &was.upstream, &mut config.upstream, &mut changed);
        for key in changed {
            tracing::warn!(key, "changed in the file but takes effect only after a restart");
        }
        if config.server.proxy_protocol && config.server.proxy_protocol_from.is_empty() {
            // The file may turn the PROXY protocol off for the next start, but until then every
            // connection brings a header, and with no balancer listed each would be refused.
            return Err(ReloadError::NoBalancer);
        }
        let token = match &config.admin.token_file {
            Some(f) => match std::fs::read_to_string(f) {
                Ok(t) if !t.trim().is_empty() => Some(Arc::new(t.trim().to_string())),
                Ok(_) => return Err(ReloadError::AdminToken(format!("{} is empty", f.display()))),
                Err(e) => return Err(ReloadError::AdminToken(format!("{}: {e}", f.display()))),
            },
            None => None,
        };
        self.certs.reload(&config)?;
        self.metrics.set_certificates(&self.certs.expiry());
        self.limiter.update(config.limits.clone());
        if self.admin_addr.get().is_some() && self.admin_token.load().as_deref() != token.as_deref() {
            tracing::info!("admin token_file changed: the admin endpoints want the new token");
            self.admin_token.store(token);
        }
        self.current.store(Arc::new(Current::new(config, &self.certs)));
        Ok(())
    }

    /// Marks every thread as accepting: `/readyz` turns ready.
    pub(crate) fn set_accepting(&self) {
        self.accepting.store(true, Ordering::Release);
    }

    /// Whether `/readyz` says ready: every thread accepting, and not draining.
    pub fn ready(&self) -> bool {
        self.accepting.load(Ordering::Acquire) && !self.shutdown.drain.is_cancelled()
    }

    /// The `/metrics` text, with the gauges read from the relay's state (open connections,
    /// `max_connections`, readiness) brought up to date first.
    pub fn metrics_text(&self) -> String {
        let m = &self.metrics;
        m.connections_open.set(self.limiter.total() as i64);
        m.max_connections.set(self.limiter.max_connections() as i64);
        m.ready.set(self.ready() as i64);
        m.encode()
    }
}
