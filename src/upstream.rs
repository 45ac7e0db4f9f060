//! Connecting to a gateway: DNS, TCP, TLS and the WebSocket upgrade, each phase timed, all of
//! them together bounded by `connect_timeout`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderValue;
use thiserror::Error;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
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
    #[error("dns: {0}")]
    Dns(String),
    #[error("connect: {0}")]
    Connect(String),
    #[error("proxy: {0}")]
    Proxy(String),
    #[error("timeout in the {phase} phase after {}", humantime::format_duration(*.after))]
    Timeout { phase: Phase, after: Duration },
    #[error("tls: {0}")]
    Tls(String),
    #[error("gateway answered the upgrade with HTTP {status}")]
    Rejected { status: u16 },
    #[error("websocket handshake: {0}")]
    Protocol(String),
}

impl UpstreamError {
    /// The handshake record's outcome.
    pub fn outcome(&self) -> Outcome {
        match self {
            UpstreamError::Dns(_) => Outcome::UpstreamDnsError,
            UpstreamError::Connect(_) => Outcome::UpstreamConnectError,
            UpstreamError::Proxy(_) => Outcome::UpstreamProxyError,
            UpstreamError::Timeout { .. } => Outcome::UpstreamTimeout,
            UpstreamError::Tls(_) => Outcome::UpstreamTlsError,
            UpstreamError::Rejected { .. } => Outcome::UpstreamRejected,
            UpstreamError::Protocol(_) => Outcome::UpstreamProtocolError,
        }
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
    pub io: Box<TlsStream<TcpStream>>,
    /// What the gateway sent after its 101, not yet relayed.
    pub leftover: Vec<u8>,
    pub addr: SocketAddr,
}

/// Opens gateway connections.
#[derive(Clone)]
pub struct Connector {
    tls: TlsConnector,
    resolve: Arc<BTreeMap<String, SocketAddr>>,
    system_dns: bool,
    timeout: Duration,
    proxy: Option<(String, u16)>,
}

impl Connector {
    /// A connector with the config's trust anchors, overrides and timeout.
    pub fn new(config: &Config, tls: Arc<rustls::ClientConfig>) -> Connector {
        Connector {
            tls: TlsConnector::from(tls),
            resolve: Arc::new(config.upstream.resolve.clone()),
            system_dns: config.upstream.system_dns,
            timeout: config.upstream.connect_timeout,
            proxy: config.upstream.proxy.clone(),
        }
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
        // Through a proxy, DNS and TCP are for the proxy; the proxy resolves the gateway.
        let (host, port) = match &self.proxy {
            Some((h, p)) => (h.as_str(), *p),
            None => (target.host.as_str(), target.port),
        };
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
        let key = tokio_tungstenite::tungstenite::handshake::client::generate_key();
        let request = upgrade_request(target, headers, &key);
        // Queued before the handshake, the request leaves in the same write as the client's
        // Finished: one segment and one wake-up fewer per connection.
        let mut queued = Ok(());
        let mut io = self
            .tls
            .connect_with(target.server_name.clone(), tcp, |conn| {
                queued = std::io::Write::write_all(&mut conn.writer(), &request);
            })
            .await
            .map_err(|e| UpstreamError::Tls(e.to_string()))?;
        // Only a request past rustls's 64 KiB plaintext buffer could fail to queue.
        queued.map_err(|e| UpstreamError::Protocol(format!("upgrade request not sent: {e}")))?;
        timings.tls = Some(t.elapsed());

        *phase = Phase::WebSocket;
        let t = Instant::now();
        let leftover = read_upgrade_answer(&mut io, &key).await?;
        timings.websocket = Some(t.elapsed());
        Ok(Connected { io: Box::new(io), leftover, addr })
    }

    async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, UpstreamError> {
        if let Some(addr) = self.resolve.get(host) {
            return Ok(vec![*addr]);
        }
        if let Ok(ip) = host.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        if !self.system_dns {
            return Err(UpstreamError::Dns(format!(
                "{host} is not in [upstream.resolve] and upstream.system_dns is off"
            )));
        }
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| UpstreamError::Dns(format!("{host}: {e}")))?
            .collect();
        if addrs.is_empty() {
            return Err(UpstreamError::Dns(format!("{host}: no addresses")));
        }
        Ok(addrs)
    }
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
            Err(e) => errors.push(format!("{addr}: {e}")),
        }
    }
    Err(UpstreamError::Connect(errors.join("; ")))
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
                let header = |name: &str| answer.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value);
                let is = |name: &str, want: &str| header(name).is_some_and(|v| v.eq_ignore_ascii_case(want.as_bytes()));
                match answer.code.unwrap_or(0) {
                    101 => {}
                    status => return Err(UpstreamError::Rejected { status }),
                }
                if !is("upgrade", "websocket") {
                    return protocol("101 without Upgrade: websocket");
                }
                if !is("sec-websocket-accept", &derive_accept_key(key.as_bytes())) {
                    return protocol("wrong Sec-WebSocket-Accept");
                }
                if header("sec-websocket-extensions").is_some() {
                    return protocol("gateway chose an extension that was not offered");
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
