//! Configuration: TOML read into a raw struct, then validated into a typed [`Config`], with every
//! problem reported at once as `file: key: why`.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use serde::Deserialize;

/// Region codes Twilio's SDK knows (`region` option), allowed unless `[routing] regions` says otherwise.
pub const DEFAULT_REGIONS: &[&str] =
    &["gll", "au1", "br1", "de1", "ie1", "in1", "jp1", "sg1", "us1", "us2"];

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerSettings,
    pub upstream: UpstreamSettings,
    pub admin: AdminSettings,
    pub diag: DiagSettings,
    pub limits: Limits,
    pub turn: TurnSettings,
    /// The allow-list of region codes (`[routing] regions`).
    pub regions: Vec<String>,
    pub routes: Vec<Route>,
}

/// `[turn]`: TURN over TLS on the main listener, for the call's media.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnSettings {
    /// Relay TURN-over-TLS connections on the main listener (default true).
    pub enabled: bool,
    /// Where TURN connections go (`upstream`, default `global.turn.twilio.com:443`), as a TLS
    /// target with SNI and full verification.
    pub upstream: UpstreamTarget,
    /// What browsers are told in place of the upstream's `turns:` URLs; `None` until derived from
    /// the certificate's first DNS name that is not a wildcard when unset.
    pub public_url: Option<String>,
    /// Close a TURN connection after this long without a byte either way (default 60 s: a live
    /// one carries ICE consent checks every few seconds). `None`: never.
    pub idle_timeout: Option<Duration>,
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// How long to wait for the browser's first message (which carries the token).
    pub first_message_timeout: Duration,
    /// Largest message, in bytes, relayed in either direction.
    pub max_message_size: u64,
    /// Close connections whose token has expired with 1008 instead of relaying them.
    pub reject_expired_tokens: bool,
    /// Bound on the TLS handshake plus reading the request headers.
    pub handshake_timeout: Duration,
    /// How long live connections may go on after a shutdown signal before they are closed.
    pub drain_timeout: Duration,
    /// The closes after `drain_timeout` are spread at random over this long.
    pub drain_jitter: Duration,
    /// How often the relay pings both sides; a side that answers nothing between two pings is
    /// closed. `None` turns pings off.
    pub ping_interval: Option<Duration>,
    /// Close a connection after this long without a data message either way. `None`: never.
    pub idle_timeout: Option<Duration>,
    /// Expect a PROXY protocol (v1 or v2) header before TLS on every connection.
    pub proxy_protocol: bool,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Peers whose PROXY protocol header is believed (default: `trusted_proxies`); others are
    /// refused when `proxy_protocol` is on.
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
    /// Origins allowed to open WebSockets; empty allows all.
    pub allowed_origins: Vec<OriginPattern>,
    /// Terminate TLS (the default). `false` serves plain HTTP behind a TLS-terminating balancer.
    pub tls: bool,
    /// Extra certificates, chosen by SNI, beside the default `cert`/`key`.
    pub certs: Vec<CertPair>,
    /// Threads accepting and serving connections, each with its own runtime; a connection stays
    /// on one thread, the least-loaded when it arrived. Default: the CPUs available to the process.
    pub threads: usize,
}

/// A certificate chain and its key (`[[server.certs]]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `[diag]`.
#[derive(Debug, Clone)]
pub struct DiagSettings {
    /// Serve the `/diag` page and its endpoints on the main listener (default true).
    pub enabled: bool,
}

/// Paths under this prefix belong to the diagnostics page while `[diag] enabled` is on.
pub const DIAG_PREFIX: &str = "/diag";

/// `[admin]`.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminSettings {
    /// `None` when set to `"off"`.
    pub listen: Option<SocketAddr>,
    /// A file holding the bearer token the admin endpoints require.
    pub token_file: Option<PathBuf>,
    /// Host names the admin listener answers to, beside IP literals and `localhost` (which is
    /// all a DNS-rebinding page cannot send).
    pub host_names: Vec<String>,
    /// Serve a non-loopback admin address without `token_file`: only behind a network policy.
    pub allow_unauthenticated: bool,
}

/// `[limits]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Relayed connections in total; `None` derives it from the file-descriptor limit.
    pub max_connections: Option<usize>,
    pub max_connections_per_ip: usize,
    pub handshakes_per_ip_per_s: f64,
    pub handshake_burst: f64,
    /// IPv6 clients are counted by this prefix (a host usually gets a whole /64).
    pub ipv6_prefix: u8,
}

/// An `allowed_origins` entry: `https://app.example.com`, `https://*.example.com` or `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPattern {
    scheme: String,
    /// Lowercase host; with `wildcard`, the suffix after `*.`.
    host: String,
    wildcard: bool,
    port: Option<u16>,
    any: bool,
}

impl OriginPattern {
    /// Parses a pattern; the error says why it is not one.
    pub fn parse(s: &str) -> Result<OriginPattern, String> {
        if s == "*" {
            return Ok(OriginPattern { scheme: String::new(), host: String::new(), wildcard: false, port: None, any: true });
        }
        let (scheme, rest) = s.split_once("://").ok_or("must look like https://app.example.com")?;
        if rest.is_empty() || rest.contains(['/', '?', '#', '@']) {
            return Err("must be scheme://host[:port] without a path".into());
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p.parse::<u16>().map_err(|_| format!("{p:?} is not a port"))?)),
            None => (rest, None),
        };
        let (wildcard, host) = match host.strip_prefix("*.") {
            Some(h) => (true, h),
            None => (false, host),
        };
        if host.is_empty() || host.contains('*') {
            return Err("only a leading \"*.\" wildcard is allowed".into());
        }
        Ok(OriginPattern {
            scheme: scheme.to_ascii_lowercase(),
            host: host.to_ascii_lowercase(),
            wildcard,
            port,
            any: false,
        })
    }

    /// Whether an `Origin` header value matches.
    pub fn matches(&self, origin: &str) -> bool {
        if self.any {
            return true;
        }
        let origin = origin.to_ascii_lowercase();
        let Some((scheme, rest)) = origin.split_once("://") else { return false };
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => match p.parse::<u16>() {
                Ok(p) => (h, Some(p)),
                Err(_) => return false,
            },
            None => (rest, None),
        };
        let host_ok = if self.wildcard {
            host.strip_suffix(&self.host).is_some_and(|prefix| prefix.len() > 1 && prefix.ends_with('.'))
        } else {
            host == self.host
        };
        scheme == self.scheme && host_ok && port == self.port
    }
}

/// `[upstream]`.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSettings {
    /// Extra PEM trust anchors, added to the public web roots.
    pub ca_file: Option<PathBuf>,
    /// Bound on DNS, TCP, TLS and the WebSocket handshake together.
    pub connect_timeout: Duration,
    /// Host name to address overrides, like curl's `--resolve`.
    pub resolve: BTreeMap<String, SocketAddr>,
    /// Whether hosts missing from `resolve` are looked up in DNS.
    pub system_dns: bool,
    /// The DNS servers to ask; empty: the system's (`/etc/resolv.conf`).
    pub dns_servers: Vec<SocketAddr>,
    /// An HTTP CONNECT proxy for gateway connections: `(host, port)`.
    pub proxy: Option<(String, u16)>,
}

/// One `[[routes]]` entry.
#[derive(Debug, Clone)]
pub struct Route {
    /// The name written to records (`route`); defaults to the path.
    pub name: String,
    /// The path the route answers on, e.g. `/signaling`; `/<region>/signaling` matches too.
    pub path: String,
    /// The `wss://` URL template, containing `{region}`.
    pub upstream: String,
    /// Where the region comes from, in order of precedence.
    pub region_from: Vec<RegionSource>,
    pub default_region: String,
    /// Region code to host label, e.g. `gll = "global"`.
    pub region_alias: BTreeMap<String, String>,
    /// The upstream for every allowed region, parsed from `upstream` once, at validation.
    pub targets: BTreeMap<String, Arc<UpstreamTarget>>,
    /// Point the TURN servers in the gateway's `iced` at the relay (`[turn]`), default true.
    pub rewrite_ice: bool,
}

impl Route {
    /// The host label a region code is written as in the upstream URL.
    pub fn host_label<'a>(&'a self, region: &'a str) -> &'a str {
        self.region_alias.get(region).map(String::as_str).unwrap_or(region)
    }
}

/// Where a connection's region code comes from (`region_from`, plus the implied default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionSource {
    Path,
    Query,
    Token,
    Default,
}

impl RegionSource {
    /// Parses a `region_from` entry (`default` is implied, not listed).
    pub fn parse(s: &str) -> Option<RegionSource> {
        match s {
            "path" => Some(RegionSource::Path),
            "query" => Some(RegionSource::Query),
            "token" => Some(RegionSource::Token),
            _ => None,
        }
    }

    /// The word written to records (`region_source`).
    pub fn as_str(self) -> &'static str {
        match self {
            RegionSource::Path => "path",
            RegionSource::Query => "query",
            RegionSource::Token => "token",
            RegionSource::Default => "default",
        }
    }
}

/// A resolved upstream: a `wss://` URL split into what the connector needs. The host always
/// comes from a route's template, never from a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTarget {
    pub url: String,
    pub host: String,
    pub port: u16,
    pub path_and_query: String,
    pub server_name: ServerName<'static>,
}

impl UpstreamTarget {
    /// A TURN-over-TLS target, `host:port` (port 443 when left out): the URL it is written as
    /// is `turns:host:port`.
    pub fn turn(authority: &str) -> Result<UpstreamTarget, String> {
        let parsed: http::uri::Authority = authority.parse().map_err(|_| "not host:port".to_string())?;
        if authority.contains('@') {
            return Err("must not carry user info".into());
        }
        let host = parsed.host().trim_matches(['[', ']']).to_ascii_lowercase();
        let server_name = ServerName::try_from(host.clone()).map_err(|_| format!("{host:?} is not a valid host name"))?;
        let port = parsed.port_u16().unwrap_or(443);
        Ok(UpstreamTarget { url: format!("turns:{host}:{port}"), host, port, path_and_query: String::new(), server_name })
    }

    /// Fills `{region}` in a template with a host label and checks the result is a usable
    /// `wss://` URL.
    pub fn from_template(template: &str, label: &str) -> Result<UpstreamTarget, String> {
        let url = template.replace("{region}", label);
        let uri: http::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
        if uri.scheme_str() != Some("wss") {
            return Err("must start with wss://".into());
        }
        let authority = uri.authority().ok_or("has no host")?;
        if authority.as_str().contains('@') {
            return Err("must not carry user info".into());
        }
        let host = authority.host().to_ascii_lowercase();
        let server_name = ServerName::try_from(host.clone()).map_err(|_| format!("{host:?} is not a valid host name"))?;
        let path_and_query = uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
        Ok(UpstreamTarget { port: authority.port_u16().unwrap_or(443), url, host, path_and_query, server_name })
    }
}

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

/// Every problem found in a configuration file.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub file: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(f, "{}: {n} problem{}", self.file, if n == 1 { "" } else { "s" })?;
        for p in &self.problems {
            write!(f, "\n  {}: {}: {}", self.file, p.key, p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawConfig {
    server: RawServer,
    upstream: RawUpstream,
    admin: RawAdmin,
    diag: RawDiag,
    limits: RawLimits,
    turn: RawTurn,
    routing: RawRouting,
    routes: Option<Vec<RawRoute>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawTurn {
    enabled: Option<bool>,
    upstream: Option<String>,
    public_url: Option<String>,
    idle_timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawServer {
    listen: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    first_message_timeout: Option<String>,
    max_message_size: Option<i64>,
    reject_expired_tokens: Option<bool>,
    handshake_timeout: Option<String>,
    drain_timeout: Option<String>,
    drain_jitter: Option<String>,
    ping_interval: Option<String>,
    idle_timeout: Option<String>,
    proxy_protocol: Option<bool>,
    proxy_protocol_from: Option<Vec<String>>,
    trusted_proxies: Vec<String>,
    allowed_origins: Vec<String>,
    tls: Option<bool>,
    certs: Vec<RawCertPair>,
    threads: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawCertPair {
    cert: Option<String>,
    key: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawAdmin {
    listen: Option<String>,
    token_file: Option<String>,
    host_names: Vec<String>,
    allow_unauthenticated: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawDiag {
    enabled: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawLimits {
    max_connections: Option<i64>,
    max_connections_per_ip: Option<i64>,
    handshakes_per_ip_per_s: Option<f64>,
    handshake_burst: Option<f64>,
    ipv6_prefix: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawUpstream {
    ca_file: Option<String>,
    connect_timeout: Option<String>,
    resolve: BTreeMap<String, String>,
    system_dns: Option<bool>,
    dns_servers: Vec<String>,
    proxy: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawRouting {
    regions: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawRoute {
    name: Option<String>,
    path: Option<String>,
    upstream: Option<String>,
    region_from: Option<Vec<String>>,
    default_region: Option<String>,
    region_alias: BTreeMap<String, String>,
    rewrite_ice: Option<bool>,
}

/// The two routes that apply when a config has no `[[routes]]`.
fn default_routes() -> Vec<RawRoute> {
    vec![
        RawRoute {
            name: Some("signaling".into()),
            path: Some("/signaling".into()),
            upstream: Some("wss://{region}.vss.twilio.com/signaling".into()),
            region_from: Some(vec!["path".into(), "query".into(), "token".into()]),
            default_region: Some("gll".into()),
            region_alias: BTreeMap::from([("gll".into(), "global".into())]),
            rewrite_ice: None,
        },
        RawRoute {
            name: Some("insights".into()),
            path: Some("/v1/VideoEvents".into()),
            upstream: Some("wss://sdkgw.{region}.twilio.com/v1/VideoEvents".into()),
            region_from: Some(vec!["path".into(), "query".into()]),
            default_region: Some("us1".into()),
            // There is no sdkgw.global: the insights gateway for the global region is us1's.
            region_alias: BTreeMap::from([("gll".into(), "us1".into())]),
            rewrite_ice: None,
        },
    ]
}

/// Settings from the command line (or their environment variables) that take the place of the
/// file's. They go in before the file is validated, so every check applies to them as well:
/// `--admin-listen 0.0.0.0:9090` without a token is refused as the same line in the file is.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen` (`SIGRELAY_LISTEN`), for `[server] listen`.
    pub listen: Option<SocketAddr>,
    /// `--admin-listen` (`SIGRELAY_ADMIN_LISTEN`), for `[admin] listen`; `off` turns it off.
    pub admin_listen: Option<String>,
}

impl Overrides {
    fn apply(&self, raw: &mut RawConfig) {
        if let Some(l) = self.listen {
            raw.server.listen = Some(l.to_string());
        }
        if let Some(a) = &self.admin_listen {
            raw.admin.listen = Some(a.clone());
        }
    }

    /// A problem with an overridden key names the flag it came from, not only the file's key.
    fn name(&self, problem: &mut Problem) {
        let flag = match problem.key.as_str() {
            "server.listen" if self.listen.is_some() => "--listen or SIGRELAY_LISTEN",
            "admin.listen" if self.admin_listen.is_some() => "--admin-listen or SIGRELAY_ADMIN_LISTEN",
            _ => return,
        };
        problem.key = format!("{} (from {flag})", problem.key);
    }
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with(path, &Overrides::default())
    }

    /// Reads a configuration file, puts the command line's settings over it, and validates the
    /// result.
    pub fn load_with(path: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            problems: vec![Problem { key: "-".into(), message: format!("cannot read: {e}") }],
        })?;
        Config::parse_with(&text, &file, overrides)
    }

    /// Validates configuration text; `file` names it in problems.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        Config::parse_with(text, file, &Overrides::default())
    }

    /// Validates configuration text with the command line's settings over it.
    pub fn parse_with(text: &str, file: &str, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let fail = |problems: Vec<Problem>| ConfigError { file: file.to_string(), problems };
        let de = toml::Deserializer::parse(text).map_err(|e| {
            fail(vec![Problem { key: "-".into(), message: one_line(&e.to_string()) }])
        })?;
        let mut raw: RawConfig = serde_ignored::deserialize(de, |path| {
            problems.push(Problem { key: path.to_string(), message: "unknown key".into() });
        })
        .map_err(|e| fail(vec![Problem { key: "-".into(), message: one_line(&e.to_string()) }]))?;
        overrides.apply(&mut raw);
        let config = validate(raw, &mut problems);
        problems.iter_mut().for_each(|p| overrides.name(p));
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(fail(problems))
        }
    }

    /// A configuration with every default, as if the file held nothing.
    pub fn defaults() -> Config {
        Config::parse("", "<defaults>").expect("the defaults are valid")
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

struct Checker<'a> {
    problems: &'a mut Vec<Problem>,
}

impl Checker<'_> {
    fn problem(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem { key: key.into(), message: message.into() });
    }

    fn duration(&mut self, key: &str, raw: Option<&str>, default: Duration, min: Duration) -> Duration {
        let Some(raw) = raw else { return default };
        match humantime::parse_duration(raw) {
            Ok(d) if d < min => {
                self.problem(key, format!("{raw:?} is shorter than {}", humantime::format_duration(min)));
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.problem(key, format!("{raw:?} is not a duration like \"4s\" or \"500ms\": {e}"));
                default
            }
        }
    }

    /// A duration where `"off"` (or `"0s"`) means none.
    fn optional_duration(&mut self, key: &str, raw: Option<&str>, default: Option<Duration>) -> Option<Duration> {
        match raw {
            None => default,
            Some("off") => None,
            Some(r) => Some(self.duration(key, Some(r), Duration::ZERO, Duration::ZERO)).filter(|d| !d.is_zero()),
        }
    }

    fn existing_file(&mut self, key: &str, path: &Path) {
        if !path.exists() {
            self.problem(key, format!("{} does not exist", path.display()));
        }
    }

    fn addr(&mut self, key: &str, raw: &str) -> Option<SocketAddr> {
        match raw.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.problem(key, format!("{raw:?} is not an address like \"127.0.0.1:8443\""));
                None
            }
        }
    }
}

/// True when `path` lives in a `certs/dev` directory, the only place sigrelay may generate a
/// throwaway certificate.
pub fn is_dev_cert_path(path: &Path) -> bool {
    path.parent().is_some_and(|dir| dir.ends_with("certs/dev"))
}

fn validate(raw: RawConfig, problems: &mut Vec<Problem>) -> Config {
    let mut c = Checker { problems };
    let s = raw.server;
    let listen = s.listen.as_deref().unwrap_or("127.0.0.1:8443");
    let listen = c.addr("server.listen", listen).unwrap_or_else(|| ([127, 0, 0, 1], 8443).into());
    let cert = PathBuf::from(s.cert.as_deref().unwrap_or("certs/dev/cert.pem"));
    let key = PathBuf::from(s.key.as_deref().unwrap_or("certs/dev/key.pem"));
    for (name, path) in [("server.cert", &cert), ("server.key", &key)] {
        if !path.exists() && !is_dev_cert_path(path) {
            c.problem(name, format!("{} does not exist", path.display()));
        }
    }
    let max_message_size = match s.max_message_size {
        None => 1 << 20,
        Some(n) if (1024..=(1 << 30)).contains(&n) => n as u64,
        Some(n) => {
            c.problem("server.max_message_size", format!("{n} is outside 1024..=1073741824 bytes"));
            1 << 20
        }
    };
    let server = ServerSettings {
        listen,
        cert,
        key,
        first_message_timeout: c.duration(
            "server.first_message_timeout",
            s.first_message_timeout.as_deref(),
            Duration::from_secs(2),
            Duration::ZERO,
        ),
        max_message_size,
        reject_expired_tokens: s.reject_expired_tokens.unwrap_or(false),
        handshake_timeout: c.duration(
            "server.handshake_timeout",
            s.handshake_timeout.as_deref(),
            Duration::from_secs(10),
            Duration::from_millis(100),
        ),
        drain_timeout: c.duration(
            "server.drain_timeout",
            s.drain_timeout.as_deref(),
            Duration::from_secs(30),
            Duration::ZERO,
        ),
        drain_jitter: c.duration("server.drain_jitter", s.drain_jitter.as_deref(), Duration::from_secs(5), Duration::ZERO),
        ping_interval: c.optional_duration("server.ping_interval", s.ping_interval.as_deref(), Some(Duration::from_secs(20))),
        idle_timeout: c.optional_duration("server.idle_timeout", s.idle_timeout.as_deref(), None),
        proxy_protocol: s.proxy_protocol.unwrap_or(false),
        trusted_proxies: cidrs(&mut c, "server.trusted_proxies", &s.trusted_proxies),
        proxy_protocol_from: match &s.proxy_protocol_from {
            Some(list) => cidrs(&mut c, "server.proxy_protocol_from", list),
            None => cidrs(&mut Checker { problems: &mut Vec::new() }, "", &s.trusted_proxies),
        },
        allowed_origins: s
            .allowed_origins
            .iter()
            .enumerate()
            .filter_map(|(i, o)| match OriginPattern::parse(o) {
                Ok(p) => Some(p),
                Err(why) => {
                    c.problem(format!("server.allowed_origins[{i}]"), format!("{o:?}: {why}"));
                    None
                }
            })
            .collect(),
        tls: s.tls.unwrap_or(true),
        threads: match s.threads {
            None => std::thread::available_parallelism().map(usize::from).unwrap_or(1),
            Some(n) if (1..=1024).contains(&n) => n as usize,
            Some(n) => {
                c.problem("server.threads", format!("{n} is outside 1..=1024"));
                1
            }
        },
        certs: s
            .certs
            .iter()
            .enumerate()
            .filter_map(|(i, pair)| {
                let (Some(cert), Some(key)) = (&pair.cert, &pair.key) else {
                    c.problem(format!("server.certs[{i}]"), "needs both cert and key");
                    return None;
                };
                let pair = CertPair { cert: PathBuf::from(cert), key: PathBuf::from(key) };
                c.existing_file(&format!("server.certs[{i}].cert"), &pair.cert);
                c.existing_file(&format!("server.certs[{i}].key"), &pair.key);
                Some(pair)
            })
            .collect(),
    };

    // Connections get FORCE_GRACE from the drain timeout to finish; a 1012 sent late in it
    // would leave its close handshake too little of that time.
    let jitter_max = crate::shutdown::FORCE_GRACE / 2;
    if server.drain_jitter > jitter_max {
        c.problem(
            "server.drain_jitter",
            format!(
                "{} is longer than {}: after drain_timeout connections get {} to close, and a 1012 sent later than half-way has too little of it",
                humantime::format_duration(server.drain_jitter),
                humantime::format_duration(jitter_max),
                humantime::format_duration(crate::shutdown::FORCE_GRACE),
            ),
        );
    }
    if server.proxy_protocol && server.proxy_protocol_from.is_empty() {
        c.problem(
            "server.proxy_protocol_from",
            "proxy_protocol is on but no balancer is listed: set proxy_protocol_from (or trusted_proxies) to the load balancers' addresses or CIDRs, e.g. [\"10.0.0.0/8\"]",
        );
    }
    let admin = RawAdmin::validate(raw.admin, &mut c);
    let diag = DiagSettings { enabled: raw.diag.enabled.unwrap_or(true) };
    let turn = RawTurn::validate(raw.turn, &mut c);
    let limits = RawLimits::validate(raw.limits, &mut c);

    let u = raw.upstream;
    let ca_file = u.ca_file.map(PathBuf::from);
    if let Some(ca) = &ca_file {
        if !ca.exists() {
            c.problem("upstream.ca_file", format!("{} does not exist", ca.display()));
        }
    }
    let mut resolve = BTreeMap::new();
    for (host, addr) in &u.resolve {
        let key = format!("upstream.resolve.\"{host}\"");
        if !is_host_name(host) {
            c.problem(&key, "not a host name");
        }
        if let Some(a) = c.addr(&key, addr) {
            resolve.insert(host.to_ascii_lowercase(), a);
        }
    }
    let upstream = UpstreamSettings {
        ca_file,
        connect_timeout: c.duration(
            "upstream.connect_timeout",
            u.connect_timeout.as_deref(),
            Duration::from_secs(4),
            Duration::from_millis(10),
        ),
        resolve,
        system_dns: u.system_dns.unwrap_or(true),
        dns_servers: u
            .dns_servers
            .iter()
            .enumerate()
            .filter_map(|(i, d)| match d.parse::<SocketAddr>().or_else(|_| d.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, 53))) {
                Ok(a) => Some(a),
                Err(_) => {
                    c.problem(format!("upstream.dns_servers[{i}]"), format!("{d:?} is not an address like \"10.0.0.2\" or \"10.0.0.2:53\""));
                    None
                }
            })
            .collect(),
        proxy: u.proxy.as_deref().and_then(|p| match parse_proxy(p) {
            Ok(hp) => Some(hp),
            Err(why) => {
                c.problem("upstream.proxy", format!("{p:?}: {why}"));
                None
            }
        }),
    };

    let regions: Vec<String> = match raw.routing.regions {
        None => DEFAULT_REGIONS.iter().map(|r| r.to_string()).collect(),
        Some(list) => {
            if list.is_empty() {
                c.problem("routing.regions", "must list at least one region code");
            }
            let mut seen = HashSet::new();
            for (i, r) in list.iter().enumerate() {
                if !is_region_code(r) {
                    c.problem(format!("routing.regions[{i}]"), format!("{r:?} is not a region code (a-z, 0-9, '-', up to 32)"));
                }
                if !seen.insert(r) {
                    c.problem(format!("routing.regions[{i}]"), format!("{r:?} is listed twice"));
                }
            }
            list
        }
    };

    let raw_routes = match raw.routes {
        None => default_routes(),
        Some(r) if r.is_empty() => {
            c.problem("routes", "an empty list leaves nothing to relay; remove it to get the two default routes");
            Vec::new()
        }
        Some(r) => r,
    };
    let mut routes = Vec::new();
    let mut paths = HashSet::new();
    let mut names = HashSet::new();
    for (i, r) in raw_routes.into_iter().enumerate() {
        let k = |field: &str| format!("routes[{i}].{field}");
        let path = r.path.unwrap_or_default();
        if path.is_empty() {
            c.problem(k("path"), "missing");
        } else if !path.starts_with('/') || path.contains(['?', '#', ' ']) || path.contains("//") || path == "/" {
            c.problem(k("path"), format!("{path:?} must be an absolute path like \"/signaling\", without query"));
        } else if !paths.insert(path.clone()) {
            c.problem(k("path"), format!("{path:?} is used by another route"));
        } else if diag.enabled && (path == DIAG_PREFIX || path.starts_with("/diag/")) {
            c.problem(k("path"), format!("{path:?} is taken by the diagnostics page; pick another path or set [diag] enabled = false"));
        }
        let name = r.name.unwrap_or_else(|| path.clone());
        if !names.insert(name.clone()) {
            c.problem(k("name"), format!("{name:?} is used by another route"));
        }
        let mut region_from = Vec::new();
        for (j, src) in r.region_from.unwrap_or_else(|| vec!["path".into(), "query".into()]).iter().enumerate() {
            match RegionSource::parse(src) {
                Some(s) if region_from.contains(&s) => c.problem(format!("routes[{i}].region_from[{j}]"), format!("{src:?} is listed twice")),
                Some(s) => region_from.push(s),
                None => c.problem(format!("routes[{i}].region_from[{j}]"), format!("{src:?} is not one of path, query, token")),
            }
        }
        let default_region = r.default_region.unwrap_or_else(|| regions.first().cloned().unwrap_or_default());
        if !regions.contains(&default_region) {
            c.problem(k("default_region"), format!("{default_region:?} is not in routing.regions"));
        }
        for (code, label) in &r.region_alias {
            if !regions.contains(code) {
                c.problem(format!("routes[{i}].region_alias.{code}"), "not in routing.regions");
            }
            if !is_region_code(label) {
                c.problem(format!("routes[{i}].region_alias.{code}"), format!("{label:?} is not a host label"));
            }
        }
        let upstream = r.upstream.unwrap_or_default();
        let mut targets = BTreeMap::new();
        if upstream.is_empty() {
            c.problem(k("upstream"), "missing");
        } else if !upstream.contains("{region}") {
            c.problem(k("upstream"), format!("{upstream:?} must contain {{region}}"));
        } else {
            // Every allowed region yields a usable URL, so nothing is left to fail per connection.
            for region in &regions {
                let label = r.region_alias.get(region).map(String::as_str).unwrap_or(region);
                match UpstreamTarget::from_template(&upstream, label) {
                    Ok(t) => {
                        targets.insert(region.clone(), Arc::new(t));
                    }
                    Err(why) => {
                        c.problem(k("upstream"), format!("{upstream:?}: {why}"));
                        break;
                    }
                }
            }
        }
        let rewrite_ice = r.rewrite_ice.unwrap_or(true);
        let route = Route { name, path, upstream, region_from, default_region, region_alias: r.region_alias, targets, rewrite_ice };
        routes.push(route);
    }

    Config { server, upstream, admin, diag, limits, turn, regions, routes }
}

impl RawAdmin {
    fn validate(self, c: &mut Checker) -> AdminSettings {
        let listen = match self.listen.as_deref() {
            Some("off") => None,
            Some(l) => c.addr("admin.listen", l),
            None => Some(([127, 0, 0, 1], 9090).into()),
        };
        let token_file = self.token_file.map(PathBuf::from);
        if let Some(f) = &token_file {
            match std::fs::read_to_string(f) {
                Ok(t) if t.trim().is_empty() => c.problem("admin.token_file", format!("{} is empty", f.display())),
                Ok(_) => {}
                Err(e) => c.problem("admin.token_file", format!("{}: {e}", f.display())),
            }
        }
        let host_names: Vec<String> = self.host_names.iter().map(|h| h.to_ascii_lowercase()).collect();
        for (i, h) in host_names.iter().enumerate() {
            if !is_host_name(h) {
                c.problem(format!("admin.host_names[{i}]"), format!("{h:?} is not a host name"));
            }
        }
        let allow_unauthenticated = self.allow_unauthenticated.unwrap_or(false);
        if listen.is_some_and(|a| !a.ip().is_loopback()) && token_file.is_none() && !allow_unauthenticated {
            c.problem(
                "admin.listen",
                format!(
                    "{} is not a loopback address and admin.token_file is not set: anyone who reaches it could list and close connections. Set token_file, or allow_unauthenticated = true if a network policy guards it",
                    listen.expect("checked above")
                ),
            );
        }
        AdminSettings { listen, token_file, host_names, allow_unauthenticated }
    }
}

impl RawTurn {
    fn validate(self, c: &mut Checker) -> TurnSettings {
        let raw = self.upstream.as_deref().unwrap_or("global.turn.twilio.com:443");
        let upstream = match UpstreamTarget::turn(raw) {
            Ok(t) => t,
            Err(why) => {
                c.problem("turn.upstream", format!("{raw:?}: {why}"));
                UpstreamTarget::turn("global.turn.twilio.com:443").expect("the default is valid")
            }
        };
        let public_url = self.public_url.filter(|u| {
            let ok = u.starts_with("turns:") && UpstreamTarget::turn(turn_url_authority(u)).is_ok();
            if !ok {
                c.problem("turn.public_url", format!("{u:?} must look like \"turns:relay.example.com:443?transport=tcp\""));
            }
            ok
        });
        let idle_timeout = c.optional_duration("turn.idle_timeout", self.idle_timeout.as_deref(), Some(Duration::from_secs(60)));
        TurnSettings { enabled: self.enabled.unwrap_or(true), upstream, public_url, idle_timeout }
    }
}

/// The `host:port` of a `turn:` or `turns:` URL (`turns:host:443?transport=tcp`).
pub fn turn_url_authority(url: &str) -> &str {
    let rest = url.split_once(':').map_or("", |(_, r)| r);
    rest.split(['?', '/']).next().unwrap_or("")
}

impl RawLimits {
    fn validate(self, c: &mut Checker) -> Limits {
        let mut count = |key: &str, v: Option<i64>, default: usize| match v {
            None => default,
            Some(n) if n >= 1 => n as usize,
            Some(n) => {
                c.problem(key, format!("{n} must be at least 1"));
                default
            }
        };
        let max_connections = self.max_connections.map(|n| count("limits.max_connections", Some(n), 1));
        let max_connections_per_ip = count("limits.max_connections_per_ip", self.max_connections_per_ip, 10_000);
        let mut rate = |key: &str, v: Option<f64>, default: f64| match v {
            None => default,
            Some(r) if r > 0.0 && r.is_finite() => r,
            Some(r) => {
                c.problem(key, format!("{r} must be a positive number"));
                default
            }
        };
        Limits {
            max_connections,
            max_connections_per_ip,
            handshakes_per_ip_per_s: rate("limits.handshakes_per_ip_per_s", self.handshakes_per_ip_per_s, 200.0),
            handshake_burst: rate("limits.handshake_burst", self.handshake_burst, 1000.0),
            ipv6_prefix: match self.ipv6_prefix {
                None => 64,
                Some(n) if (1..=128).contains(&n) => n as u8,
                Some(n) => {
                    c.problem("limits.ipv6_prefix", format!("{n} is outside 1..=128"));
                    64
                }
            },
        }
    }
}

/// A list of addresses or CIDRs, each problem reported with its index.
fn cidrs(c: &mut Checker, key: &str, list: &[String]) -> Vec<ipnet::IpNet> {
    list.iter()
        .enumerate()
        .filter_map(|(i, cidr)| match parse_cidr(cidr) {
            Ok(net) => Some(net),
            Err(()) => {
                c.problem(format!("{key}[{i}]"), format!("{cidr:?} is not an address or CIDR like 10.0.0.0/8"));
                None
            }
        })
        .collect()
}

/// An address (`10.1.2.3`) or CIDR (`10.0.0.0/8`).
fn parse_cidr(s: &str) -> Result<ipnet::IpNet, ()> {
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| ())
}

/// `http://host:port` of a CONNECT proxy.
fn parse_proxy(s: &str) -> Result<(String, u16), String> {
    let rest = s.strip_prefix("http://").ok_or("must start with http:// (a CONNECT proxy)")?;
    let rest = rest.trim_end_matches('/');
    if rest.contains(['/', '@', '?']) {
        return Err("must be http://host:port, without path or credentials".into());
    }
    let authority: http::uri::Authority = rest.parse().map_err(|_| "not host:port".to_string())?;
    Ok((authority.host().trim_matches(['[', ']']).to_string(), authority.port_u16().unwrap_or(3128)))
}

/// A region code or host label: lowercase letters, digits and '-', 1 to 32 long, not starting with '-'.
pub fn is_region_code(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && !s.starts_with('-')
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_has_the_two_shipped_routes() {
        let c = Config::defaults();
        assert_eq!(c.routes.len(), 2);
        assert_eq!(c.routes[0].path, "/signaling");
        assert_eq!(c.routes[0].host_label("gll"), "global");
        assert_eq!(c.routes[1].default_region, "us1");
        assert_eq!(c.upstream.connect_timeout, Duration::from_secs(4));
        assert_eq!(c.server.max_message_size, 1 << 20);
        assert!(c.admin.listen.unwrap().ip().is_loopback(), "the admin listener is not public by default");
    }

    #[test]
    fn origin_patterns() {
        let p = OriginPattern::parse("https://*.example.com").unwrap();
        assert!(p.matches("https://app.example.com"));
        assert!(p.matches("https://a.b.EXAMPLE.com"));
        assert!(!p.matches("https://example.com"));
        assert!(!p.matches("https://evilexample.com"));
        assert!(!p.matches("http://app.example.com"));
        assert!(!p.matches("https://app.example.com:8443"));
        let exact = OriginPattern::parse("http://127.0.0.1:8080").unwrap();
        assert!(exact.matches("http://127.0.0.1:8080"));
        assert!(!exact.matches("http://127.0.0.1"));
        assert!(OriginPattern::parse("*").unwrap().matches("null"));
        assert!(OriginPattern::parse("https://*").is_err());
        assert!(OriginPattern::parse("example.com").is_err());
    }

    #[test]
    fn reports_every_problem_with_its_key() {
        let text = r#"
            [server]
            listen = "nowhere"
            first_message_timeout = "soon"
            drain_jitter = "8s"
            colour = "blue"
            [upstream]
            ca_file = "/does/not/exist.pem"
            [routing]
            regions = ["au1", "AU1"]
            [[routes]]
            path = "signaling"
            upstream = "ws://{region}.example.com/"
            region_from = ["path", "cookie"]
            default_region = "us1"
        "#;
        let err = Config::parse(text, "test.toml").unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        for key in [
            "server.listen",
            "server.first_message_timeout",
            "server.drain_jitter",
            "server.colour",
            "upstream.ca_file",
            "routing.regions[1]",
            "routes[0].path",
            "routes[0].upstream",
            "routes[0].region_from[1]",
            "routes[0].default_region",
        ] {
            assert!(keys.contains(&key), "{key} missing from {keys:?}");
        }
        assert!(err.to_string().contains("test.toml: server.listen: "));
    }
}
