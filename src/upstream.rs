//! Connecting to a gateway: DNS, TCP, TLS and the WebSocket upgrade, each phase timed, all of
//! them together bounded by `connect_timeout`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderValue;
use thiserror::Error;
use hickory_resolver::TokioResolver;
use tokio::net::TcpStream;
use tokio::time::Instant;
use crate::tls_stream::{self, GatewayTls};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::config::Config;
use crate::outcome::Outcome;
use crate::config::UpstreamTarget;

/// The phase of a gateway connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Dns,
    Connect,
    Proxy,
    Tls,
    WebSocket,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Dns => "dns",
            Phase::Connect => "connect",
            Phase::Proxy => "proxy",
            Phase::Tls => "tls",
            Phase::WebSocket => "websocket",
        })
    }
}

/// Why the gateway could not be reached. Every variant is the upstream's side.
#[derive(Debug, Error)]
pub enum UpstreamError {
    #[error("dns: {host}: {why}")]
    Dns { host: String, why: String },
    #[error("connect: {}", .0.iter().map(|(a, e)| format!("{a}: {e}")).collect::<Vec<_>>().join("; "))]
    Connect(Vec<(SocketAddr, String)>),
    #[error("proxy: {0}")]
    Proxy(String),
    #[error("timeout in the {phase} phase after {}", humantime::format_duration(*.after))]
    Timeout { phase: Phase, after: Duration },
    #[error("tls: {detail}")]
    Tls { detail: String, public: &'static str },
    #[error("gateway answered the upgrade with HTTP {status}")]
    Rejected { status: u16 },
    #[error("websocket handshake: {0}")]
    Protocol(String),
}

impl UpstreamError {
    /// The handshake record's outcome.
    pub fn outcome(&self) -> Outcome {
        match self {
            UpstreamError::Dns { .. } => Outcome::UpstreamDnsError,
            UpstreamError::Connect(_) => Outcome::UpstreamConnectError,
            UpstreamError::Proxy(_) => Outcome::UpstreamProxyError,
            UpstreamError::Timeout { .. } => Outcome::UpstreamTimeout,
            UpstreamError::Tls { .. } => Outcome::UpstreamTlsError,
            UpstreamError::Rejected { .. } => Outcome::UpstreamRejected,
            UpstreamError::Protocol(_) => Outcome::UpstreamProtocolError,
        }
    }

    /// The error as anyone may read it (the `/diag` page): without the addresses a name resolved
    /// to, the `[upstream.resolve]` overrides, the egress proxy or a certificate's names. Records,
    /// logs, the admin API and `sigrelay diagnose` keep the full text.
    pub fn public(&self) -> String {
        match self {
            UpstreamError::Dns { host, .. } => format!("dns: {host} did not resolve"),
            UpstreamError::Connect(errors) => {
                let mut kinds: Vec<&str> = errors.iter().map(|(_, e)| e.as_str()).collect();
                kinds.dedup();
                format!("connect: {}", kinds.join("; "))
            }
            UpstreamError::Proxy(_) => "proxy: the egress proxy refused or failed".into(),
            UpstreamError::Tls { public, .. } => format!("tls: {public}"),
            UpstreamError::Timeout { .. } | UpstreamError::Rejected { .. } | UpstreamError::Protocol(_) => self.to_string(),
        }
    }

    fn tls(e: std::io::Error) -> UpstreamError {
        use rustls::CertificateError as C;
        let rustls = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>());
        let public = match rustls {
            Some(rustls::Error::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. })) => {
                "the gateway's certificate is not valid for its name"
            }
            Some(rustls::Error::InvalidCertificate(C::UnknownIssuer)) => "the gateway's certificate is from an untrusted issuer",
            Some(rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. })) => "the gateway's certificate has expired",
            Some(rustls::Error::InvalidCertificate(_)) => "the gateway's certificate was refused",
            _ => "the TLS handshake failed",
        };
        UpstreamError::Tls { detail: e.to_string(), public }
    }
}

/// How long each finished phase took.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    pub dns: Option<Duration>,
    pub proxy: Option<Duration>,
    pub connect: Option<Duration>,
    pub tls: Option<Duration>,
    pub websocket: Option<Duration>,
}

/// Browser headers passed on to the gateway. Cookie and Authorization never are.
#[derive(Debug, Clone, Default)]
pub struct ForwardHeaders {
    pub user_agent: Option<HeaderValue>,
    pub origin: Option<HeaderValue>,
    pub forwarded_for: Option<HeaderValue>,
}

/// A relayed gateway connection, after its 101.
pub struct Connected {
    /// Boxed: a TLS stream is large, and inline it would be copied into several states of every
    /// connection task's future, costing kilobytes per idle connection.
    pub io: Box<GatewayTls>,
    /// What the gateway sent after its 101, not yet relayed.
    pub leftover: Vec<u8>,
    pub addr: SocketAddr,
}

/// Opens gateway connections.
#[derive(Clone)]
pub struct Connector {
    tls: Arc<rustls::ClientConfig>,
    /// The same trust, without ALPN: for the TURN upstream.
    tls_no_alpn: Arc<rustls::ClientConfig>,
    resolve: Arc<BTreeMap<String, SocketAddr>>,
    /// `None` when `system_dns` is off: only `resolve` and IP literals are reachable.
    dns: Option<TokioResolver>,
    timeout: Duration,
    proxy: Option<(String, u16)>,
}

impl Connector {
    /// A connector with the config's trust anchors, overrides, name servers and timeout. Fails
    /// when DNS is on and its configuration cannot be read.
    pub fn new(config: &Config, tls: Arc<rustls::ClientConfig>) -> Result<Connector, String> {
        let u = &config.upstream;
        let mut no_alpn = (*tls).clone();
        no_alpn.alpn_protocols.clear();
        Ok(Connector {
            tls,
            tls_no_alpn: Arc::new(no_alpn),
            resolve: Arc::new(u.resolve.clone()),
            dns: if u.system_dns { Some(resolver(u)?) } else { None },
            timeout: u.connect_timeout,
            proxy: u.proxy.clone(),
        })
    }

    /// Connects and upgrades, recording each finished phase in `timings`.
    pub async fn connect(
        &self,
        target: &UpstreamTarget,
        headers: &ForwardHeaders,
        timings: &mut Timings,
    ) -> Result<Connected, UpstreamError> {
        let started = Instant::now();
        let mut phase = Phase::Dns;
        let attempt = self.phases(target, headers, &mut phase, timings);
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(UpstreamError::Timeout { phase, after: started.elapsed() }),
        }
    }

    async fn phases(
        &self,
        target: &UpstreamTarget,
        headers: &ForwardHeaders,
        phase: &mut Phase,
        timings: &mut Timings,
    ) -> Result<Connected, UpstreamError> {
        let key = tokio_tungstenite::tungstenite::handshake::client::generate_key();
        let request = upgrade_request(target, headers, &key);
        let (mut io, addr) = self.tls_phases(&self.tls, target, phase, timings, &request).await?;
        *phase = Phase::WebSocket;
        let t = Instant::now();
        let leftover = read_upgrade_answer(&mut io, &key).await?;
        timings.websocket = Some(t.elapsed());
        Ok(Connected { io: Box::new(io), leftover, addr })
    }

    /// A TLS connection to `target` with no ALPN, as Chromium's TURN-over-TLS client opens one
    /// (the TURN relay's upstream), `first` sent in the same write as the TLS Finished; each
    /// phase timed, all within `connect_timeout`.
    pub async fn connect_tls(&self, target: &UpstreamTarget, first: &[u8], timings: &mut Timings) -> Result<(GatewayTls, SocketAddr), UpstreamError> {
        let started = Instant::now();
        let mut phase = Phase::Dns;
        let attempt = self.tls_phases(&self.tls_no_alpn, target, &mut phase, timings, first);
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(UpstreamError::Timeout { phase, after: started.elapsed() }),
        }
    }

    /// DNS, TCP, the CONNECT proxy if any, and TLS with `target`'s name; `early` is queued to
    /// leave with the client's Finished (one segment and one wake-up fewer per connection).
    async fn tls_phases(
        &self,
        tls: &Arc<rustls::ClientConfig>,
        target: &UpstreamTarget,
        phase: &mut Phase,
        timings: &mut Timings,
        early: &[u8],
    ) -> Result<(GatewayTls, SocketAddr), UpstreamError> {
        // Through a proxy, DNS and TCP are for the proxy; the proxy resolves the gateway.
        let (host, port) = match &self.proxy {
            Some((h, p)) => (h.as_str(), *p),
            None => (target.host.as_str(), target.port),
        };
        *phase = Phase::Dns;
        let t = Instant::now();
        let addrs = self.resolve(host, port).await?;
        timings.dns = Some(t.elapsed());

        *phase = Phase::Connect;
        let t = Instant::now();
        let (mut tcp, mut addr) = connect_any(&addrs).await?;
        timings.connect = Some(t.elapsed());

        if self.proxy.is_some() {
            *phase = Phase::Proxy;
            let t = Instant::now();
            // A resolve override still names where the gateway is.
            let authority = match self.resolve.get(&target.host) {
                Some(a) => a.to_string(),
                None => format!("{}:{}", target.host, target.port),
            };
            connect_through_proxy(&mut tcp, &authority).await?;
            if let Some(a) = self.resolve.get(&target.host) {
                addr = *a;
            }
            timings.proxy = Some(t.elapsed());
        }

        *phase = Phase::Tls;
        let t = Instant::now();
        let io = tls_stream::connect(tls.clone(), target.server_name.clone(), tcp, early).await.map_err(UpstreamError::tls)?;
        timings.tls = Some(t.elapsed());
        Ok((io, addr))
    }

    async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, UpstreamError> {
        if let Some(addr) = self.resolve.get(host) {
            return Ok(vec![*addr]);
        }
        if let Ok(ip) = host.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let dns_error = |why: String| UpstreamError::Dns { host: host.to_string(), why };
        let Some(dns) = &self.dns else {
            return Err(dns_error("not in [upstream.resolve] and upstream.system_dns is off".into()));
        };
        // A fully qualified name: no search domains are tried for a gateway's name.
        let fqdn = format!("{}.", host.trim_end_matches('.'));
        let found = dns.lookup_ip(fqdn).await.map_err(|e| dns_error(e.to_string()))?;
        let addrs: Vec<SocketAddr> = found.iter().map(|ip| SocketAddr::new(ip, port)).collect();
        if addrs.is_empty() {
            return Err(dns_error("no addresses".into()));
        }
        Ok(addrs)
    }
}

/// The asynchronous resolver for gateway names: the system's name servers (`/etc/resolv.conf`)
/// or `[upstream] dns_servers`, answers cached for their TTL, and each lookup abandoned when the
/// connect it serves gives up (nothing is left running, unlike a blocking `getaddrinfo`).
fn resolver(settings: &crate::config::UpstreamSettings) -> Result<TokioResolver, String> {
    use hickory_resolver::config::{NameServerConfig, NameServerConfigGroup, ResolverConfig};
    use hickory_resolver::name_server::TokioConnectionProvider;
    use hickory_resolver::proto::xfer::Protocol;
    let mut builder = if settings.dns_servers.is_empty() {
        hickory_resolver::Resolver::builder_tokio().map_err(|e| format!("reading the system's DNS configuration: {e}"))?
    } else {
        let servers: Vec<NameServerConfig> = settings
            .dns_servers
            .iter()
            .flat_map(|a| [NameServerConfig::new(*a, Protocol::Udp), NameServerConfig::new(*a, Protocol::Tcp)])
            .collect();
        let config = ResolverConfig::from_parts(None, Vec::new(), NameServerConfigGroup::from(servers));
        hickory_resolver::Resolver::builder_with_config(config, TokioConnectionProvider::default())
    };
    let opts = builder.options_mut();
    // Two tries of a server take at most half of connect_timeout, leaving the rest for TCP and
    // TLS. Each server is listed for UDP and for TCP (used when an answer is truncated).
    opts.timeout = (settings.connect_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(2));
    opts.attempts = 2;
    opts.cache_size = 256;
    Ok(builder.build())
}

/// Asks an HTTP proxy to open a tunnel (`CONNECT`) and reads its answer, no further.
async fn connect_through_proxy(tcp: &mut TcpStream, authority: &str) -> Result<(), UpstreamError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = |e: std::io::Error| UpstreamError::Proxy(e.to_string());
    tcp.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .map_err(io)?;
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    // Byte by byte: nothing after the answer's blank line may be consumed, it is the tunnel's.
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8192 {
            return Err(UpstreamError::Proxy("answer head too long".into()));
        }
        if tcp.read(&mut byte).await.map_err(io)? == 0 {
            return Err(UpstreamError::Proxy("closed the connection before answering CONNECT".into()));
        }
        head.push(byte[0]);
    }
    let status_line = String::from_utf8_lossy(&head[..head.iter().position(|&b| b == b'\r').unwrap_or(0)]).into_owned();
    let ok = status_line.split_whitespace().nth(1).is_some_and(|code| code.starts_with('2'));
    if !ok {
        return Err(UpstreamError::Proxy(format!("CONNECT {authority} answered {status_line:?}")));
    }
    Ok(())
}

/// Tries each address in turn.
async fn connect_any(addrs: &[SocketAddr]) -> Result<(TcpStream, SocketAddr), UpstreamError> {
    let mut errors = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        // A black-holed address must not eat the whole connect_timeout while others remain.
        let attempt = TcpStream::connect(addr);
        let result = if i + 1 < addrs.len() {
            tokio::time::timeout(PER_ADDRESS, attempt).await.unwrap_or_else(|_| {
                Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 1s, trying the next address"))
            })
        } else {
            attempt.await
        };
        match result {
            Ok(tcp) => {
                let _ = tcp.set_nodelay(true);
                return Ok((tcp, *addr));
            }
            Err(e) => errors.push((*addr, e.to_string())),
        }
    }
    Err(UpstreamError::Connect(errors))
}

/// How long one of several gateway addresses gets to accept before the next is tried.
const PER_ADDRESS: Duration = Duration::from_secs(1);

/// The upgrade request, sent with the TLS handshake's last flight.
fn upgrade_request(target: &UpstreamTarget, headers: &ForwardHeaders, key: &str) -> Vec<u8> {
    use std::io::Write;
    let mut req = Vec::with_capacity(512);
    let _ = write!(req, "GET {} HTTP/1.1\r\nHost: {}", target.path_and_query, target.host);
    if target.port != 443 {
        let _ = write!(req, ":{}", target.port);
    }
    let _ = write!(
        req,
        "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
    );
    for (name, value) in [
        ("User-Agent", &headers.user_agent),
        ("Origin", &headers.origin),
        ("X-Forwarded-For", &headers.forwarded_for),
    ] {
        // A HeaderValue holds no CR or LF, so it cannot end the header early.
        if let Some(v) = value {
            req.extend_from_slice(name.as_bytes());
            req.extend_from_slice(b": ");
            req.extend_from_slice(v.as_bytes());
            req.extend_from_slice(b"\r\n");
        }
    }
    req.extend_from_slice(b"\r\n");
    req
}

/// The longest upgrade answer head accepted from a gateway.
const MAX_ANSWER_HEAD: usize = 16 * 1024;

/// Reads the gateway's answer to the upgrade request (already sent) and checks the 101. Returns
/// any bytes the gateway sent after the answer's head: they are its first frames.
async fn read_upgrade_answer<T>(io: &mut T, key: &str) -> Result<Vec<u8>, UpstreamError>
where
    T: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let protocol = |why: &str| Err(UpstreamError::Protocol(why.into()));
    let mut buf = Vec::with_capacity(1024);
    let head_len = loop {
        let mut fields = [httparse::EMPTY_HEADER; 32];
        let mut answer = httparse::Response::new(&mut fields);
        match answer.parse(&buf) {
            Ok(httparse::Status::Complete(n)) => {
                let header = |name: &str| answer.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value.trim_ascii());
                let lists = |name: &str, want: &str| {
                    answer.headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name)).any(|h| {
                        h.value.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(want.as_bytes()))
                    })
                };
                match answer.code.unwrap_or(0) {
                    101 => {}
                    status => return Err(UpstreamError::Rejected { status }),
                }
                if !lists("upgrade", "websocket") {
                    return protocol("101 without Upgrade: websocket");
                }
                if !lists("connection", "upgrade") {
                    return protocol("101 without Connection: Upgrade");
                }
                // Base64 is case-sensitive: only the exact key proves the gateway read the request.
                if header("sec-websocket-accept") != Some(derive_accept_key(key.as_bytes()).as_bytes()) {
                    return protocol("wrong Sec-WebSocket-Accept");
                }
                if header("sec-websocket-extensions").is_some() {
                    return protocol("gateway chose an extension that was not offered");
                }
                if header("sec-websocket-protocol").is_some() {
                    return protocol("gateway chose a subprotocol that was not offered");
                }
                break n;
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_ANSWER_HEAD => {}
            Ok(httparse::Status::Partial) => return protocol("answer head too long"),
            Err(e) => return protocol(&format!("unparseable answer: {e}")),
        }
        buf.reserve(1024);
        let n = io.read_buf(&mut buf).await.map_err(|e| UpstreamError::Protocol(e.to_string()))?;
        if n == 0 {
            return protocol("connection closed before the upgrade was answered");
        }
    };
    buf.drain(..head_len);
    buf.shrink_to_fit();
    Ok(buf)
}
