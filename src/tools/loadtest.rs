//! `sigrelay loadtest`: a load-test client for a relay deployment, usually with the mock gateway
//! in echo mode behind it.
//!
//! - `idle`: open N connections (each relays one message), hold them, report connect times;
//! - `churn`: C workers loop connect + TLS + upgrade + one echo + close, report cycles per second;
//! - `echo`: N connections send numbered messages at a fixed total rate, open loop (latency counts
//!   from each message's intended send time, less at most the timer's 1 ms resolution, so a stall
//!   is not hidden), every echo checked for loss, reordering and duplication.
//!
//! Runs are bounded in connections and time, and only loopback targets are allowed unless
//! `--allow-non-loopback` says otherwise.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use rustls_pki_types::ServerName;
use serde::Serialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// `sigrelay loadtest`'s arguments.
#[derive(clap::Args)]
pub struct Args {
    /// The relay URL, e.g. wss://127.0.0.1:8443/au1/signaling.
    url: String,
    /// idle: hold connections; churn: connect+TLS+upgrade+echo+close in a loop; echo: fixed-rate
    /// numbered messages.
    #[arg(long, value_enum, default_value_t = Mode::Echo)]
    mode: Mode,
    /// Connections (idle, echo), at most 100000.
    #[arg(long, short = 'n', default_value_t = 100)]
    connections: usize,
    /// Connections opened at once (idle, echo) or workers (churn).
    #[arg(long, short = 'c', default_value_t = 32)]
    concurrency: usize,
    /// Messages per second over all connections (echo).
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Message size in bytes (echo, at least 16).
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// How long to run (churn, echo) or hold (idle); at most 10 minutes.
    #[arg(long, short = 'd', default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Local source addresses to spread connections over, e.g. 127.0.0.1,127.0.0.2.
    #[arg(long, value_delimiter = ',')]
    source_ip: Vec<IpAddr>,
    /// PEM CA to trust for the relay's certificate (default: the public web roots).
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Do not verify the relay's certificate.
    #[arg(long, short = 'k')]
    insecure: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Allow a target that is not on loopback: you are load-testing a deployment you run.
    #[arg(long)]
    allow_non_loopback: bool,
    /// Speak TURN over TLS instead of WebSocket: STUN-framed messages on a TLS stream, as a
    /// browser's TURN client sends them, to load the relay's TURN relay (the URL's path is not
    /// used). The upstream must echo them, as `mock-gateway` does.
    #[arg(long)]
    turn: bool,
}

/// Runs `sigrelay loadtest`: exit 0 for a clean run (no errors, nothing lost, reordered or
/// duplicated), 1 for a run that was not clean, 2 when it could not run.
pub fn main(args: Args) -> ExitCode {
    super::exit("loadtest", cli(args))
}

fn cli(args: Args) -> anyhow::Result<bool> {
    use crate::tls;
    target(&args.url, args.allow_non_loopback).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(args.connections <= MAX_CONNECTIONS, "--connections is at most {MAX_CONNECTIONS}");
    anyhow::ensure!(args.duration <= MAX_DURATION, "--duration is at most 10m");
    anyhow::ensure!(args.rate <= MAX_RATE, "--rate is at most {MAX_RATE}");
    let tls = if args.insecure {
        tls::probe_client_config()
    } else {
        let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        if let Some(ca) = &args.ca_file {
            for cert in tls::load_certs("--ca-file", ca)? {
                roots.add(cert)?;
            }
        }
        tls::client_config_with_roots(roots)?
    };
    let plan = Plan {
        url: args.url,
        mode: args.mode,
        connections: args.connections,
        concurrency: args.concurrency,
        rate: args.rate,
        size: args.size,
        duration: args.duration,
        source_ips: args.source_ip,
        tls,
        progress: !args.json && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        turn: args.turn,
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let report = rt.block_on(run(plan, |n| eprintln!("loadtest: holding {n} connections")));
    let report = report.map_err(anyhow::Error::msg)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(report.clean())
}

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Idle,
    Churn,
    Echo,
}

/// Upper bounds that keep a run from turning into a flood.
pub const MAX_CONNECTIONS: usize = 100_000;
pub const MAX_DURATION: Duration = Duration::from_secs(600);
pub const MAX_RATE: u64 = 1_000_000;

/// A load test's settings.
#[derive(Debug, Clone)]
pub struct Plan {
    pub url: String,
    pub mode: Mode,
    pub connections: usize,
    pub concurrency: usize,
    pub rate: u64,
    pub size: usize,
    pub duration: Duration,
    pub source_ips: Vec<IpAddr>,
    pub tls: Arc<rustls::ClientConfig>,
    pub progress: bool,
    /// TURN over TLS (STUN-framed messages) instead of WebSocket.
    pub turn: bool,
}

/// Errors counted by cause.
#[derive(Default)]
struct Errors(Mutex<BTreeMap<String, u64>>);

impl Errors {
    fn add(&self, cause: impl Into<String>) {
        *self.0.lock().unwrap().entry(cause.into()).or_insert(0) += 1;
    }
}

/// Latency percentiles, in microseconds.
#[derive(Debug, Serialize, Default)]
pub struct Percentiles {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Percentiles {
        Percentiles {
            count: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

/// What a run found.
#[derive(Debug, Serialize)]
pub struct Report {
    pub mode: Mode,
    pub url: String,
    pub seconds: f64,
    /// Connections established (idle, echo) or full cycles completed (churn).
    pub completed: u64,
    /// Cycles per second (churn), messages echoed per second (echo).
    pub per_second: f64,
    /// Connect-to-first-echo times (idle, churn) or echo latencies (echo).
    pub latency: Percentiles,
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub reordered: u64,
    pub duplicated: u64,
    pub errors: BTreeMap<String, u64>,
}

impl Report {
    /// Whether the run saw no error and no lost, reordered or duplicated message.
    pub fn clean(&self) -> bool {
        self.errors.is_empty() && self.lost == 0 && self.reordered == 0 && self.duplicated == 0
    }

    /// A table for a terminal.
    pub fn table(&self) -> String {
        let l = &self.latency;
        let what = match self.mode {
            Mode::Idle => "connections held",
            Mode::Churn => "handshake cycles",
            Mode::Echo => "messages echoed",
        };
        let mut out = format!(
            "mode       {:?}\nurl        {}\nseconds    {:.1}\n{what:<10} {} ({:.0}/s)\n",
            self.mode, self.url, self.seconds, self.completed, self.per_second
        );
        out += &format!(
            "latency    p50 {} µs  p90 {} µs  p99 {} µs  p99.9 {} µs  max {} µs  (n={})\n",
            l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us, l.count
        );
        if self.mode == Mode::Echo {
            out += &format!(
                "messages   sent {}  received {}  lost {}  reordered {}  duplicated {}\n",
                self.sent, self.received, self.lost, self.reordered, self.duplicated
            );
        }
        if self.errors.is_empty() {
            out += "errors     none\n";
        } else {
            for (cause, n) in &self.errors {
                out += &format!("error      {n:>8}  {cause}\n");
            }
        }
        out
    }
}

/// Checks the target is on loopback (unless allowed otherwise) and returns its address.
pub fn target(url: &str, allow_non_loopback: bool) -> Result<(SocketAddr, ServerName<'static>, http::Uri), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    if uri.scheme_str() != Some("wss") {
        return Err("the URL must be wss://".into());
    }
    let host = uri.host().ok_or("the URL has no host")?.trim_matches(['[', ']']).to_string();
    let port = uri.port_u16().unwrap_or(443);
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
        .map_err(|e| format!("{host}: {e}"))?
        .next()
        .ok_or(format!("{host}: no address"))?;
    if !addr.ip().is_loopback() && !allow_non_loopback {
        return Err(format!(
            "{addr} is not a loopback address; pass --allow-non-loopback to load-test a deployment you run"
        ));
    }
    let name = ServerName::try_from(host).map_err(|e| e.to_string())?;
    Ok((addr, name, uri))
}

type Ws = WebSocketStream<TlsStream<TcpStream>>;

struct Client {
    addr: SocketAddr,
    name: ServerName<'static>,
    url: String,
    tls: TlsConnector,
    source_ips: Vec<IpAddr>,
    next_source: AtomicU64,
    turn: bool,
}

/// One load connection: a WebSocket, or a TLS stream carrying STUN-framed messages.
enum Conn {
    Ws(Box<Ws>),
    Turn(Box<TlsStream<TcpStream>>),
}

/// A connection's sending half.
enum Tx {
    Ws(futures_util::stream::SplitSink<Ws, Message>),
    Turn(tokio::io::WriteHalf<TlsStream<TcpStream>>),
}

/// A connection's receiving half.
enum Rx {
    Ws(futures_util::stream::SplitStream<Ws>),
    Turn(tokio::io::ReadHalf<TlsStream<TcpStream>>),
}

/// A STUN Send indication (RFC 5766 §10) carrying `payload` (padded to four bytes): the shape of
/// a TURN client's messages, which the echo upstream sends back as they are.
fn stun_framed(payload: &[u8]) -> Vec<u8> {
    let len = payload.len().div_ceil(4) * 4;
    let mut m = Vec::with_capacity(20 + len);
    m.extend_from_slice(&[0x00, 0x16]);
    m.extend_from_slice(&(len as u16).to_be_bytes());
    m.extend_from_slice(&[0x21, 0x12, 0xA4, 0x42]);
    m.extend_from_slice(&[0x5a; 12]);
    m.extend_from_slice(payload);
    m.resize(20 + len, 0);
    m
}

impl Tx {
    async fn send(&mut self, payload: Vec<u8>) -> Result<(), String> {
        match self {
            Tx::Ws(sink) => sink.send(Message::binary(payload)).await.map_err(|e| format!("send: {e}")),
            Tx::Turn(w) => {
                use tokio::io::AsyncWriteExt;
                w.write_all(&stun_framed(&payload)).await.map_err(|e| format!("send: {e}"))
            }
        }
    }

    async fn close(&mut self) {
        match self {
            Tx::Ws(sink) => {
                let _ = sink.close().await;
            }
            Tx::Turn(w) => {
                let _ = tokio::io::AsyncWriteExt::shutdown(w).await;
            }
        }
    }
}

impl Rx {
    /// The next message's payload; `Ok(None)` at an orderly end.
    async fn recv(&mut self) -> Result<Option<Vec<u8>>, String> {
        match self {
            Rx::Ws(stream) => loop {
                match stream.next().await {
                    Some(Ok(Message::Binary(d))) => return Ok(Some(d.to_vec())),
                    Some(Ok(Message::Text(t))) => return Ok(Some(t.as_bytes().to_vec())),
                    Some(Ok(Message::Close(frame))) => {
                        return Err(format!("closed: {}", frame.map(|f| u16::from(f.code)).unwrap_or(1005)))
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(format!("read: {e}")),
                    None => return Ok(None),
                }
            },
            Rx::Turn(r) => {
                use tokio::io::AsyncReadExt;
                let mut header = [0u8; 20];
                match r.read_exact(&mut header).await {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
                    Err(e) => return Err(format!("read: {e}")),
                }
                let mut payload = vec![0u8; u16::from_be_bytes([header[2], header[3]]) as usize];
                r.read_exact(&mut payload).await.map_err(|e| format!("read: {e}"))?;
                Ok(Some(payload))
            }
        }
    }
}

impl Conn {
    fn split(self) -> (Tx, Rx) {
        match self {
            Conn::Ws(ws) => {
                let (sink, stream) = (*ws).split();
                (Tx::Ws(sink), Rx::Ws(stream))
            }
            Conn::Turn(tls) => {
                let (r, w) = tokio::io::split(*tls);
                (Tx::Turn(w), Rx::Turn(r))
            }
        }
    }

    /// Sends one message and waits for its echo.
    async fn echo_one(self, payload: Vec<u8>) -> Result<Conn, String> {
        let (mut tx, mut rx) = self.split();
        tx.send(payload).await?;
        match rx.recv().await? {
            Some(_) => Ok(Conn::join(tx, rx)),
            None => Err("read: connection ended".into()),
        }
    }

    fn join(tx: Tx, rx: Rx) -> Conn {
        match (tx, rx) {
            (Tx::Ws(sink), Rx::Ws(stream)) => Conn::Ws(Box::new(stream.reunite(sink).expect("the halves of one socket"))),
            (Tx::Turn(w), Rx::Turn(r)) => Conn::Turn(Box::new(r.unsplit(w))),
            _ => unreachable!("the halves of one connection"),
        }
    }

    /// Closes properly (a close handshake, or a TLS close), waiting briefly for the end.
    async fn close(self) {
        let (mut tx, mut rx) = self.split();
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            tx.close().await;
            while let Ok(Some(_)) = rx.recv().await {}
        })
        .await;
    }
}

impl Client {
    async fn connect(&self) -> Result<Conn, String> {
        let socket = if self.addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(|e| format!("socket: {e}"))?;
        if !self.source_ips.is_empty() {
            // Spread over several source addresses: one has only ~28k ephemeral ports.
            let i = self.next_source.fetch_add(1, Ordering::Relaxed) as usize % self.source_ips.len();
            socket.bind(SocketAddr::new(self.source_ips[i], 0)).map_err(|e| format!("bind: {e}"))?;
        }
        let tcp = socket.connect(self.addr).await.map_err(|e| format!("connect: {}", e.kind()))?;
        let _ = tcp.set_nodelay(true);
        let tls = self.tls.connect(self.name.clone(), tcp).await.map_err(|e| format!("tls: {e}"))?;
        if self.turn {
            return Ok(Conn::Turn(Box::new(tls)));
        }
        let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
        let (ws, _) = tokio_tungstenite::client_async_with_config(self.url.as_str(), tls, Some(config))
            .await
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Http(resp) => format!("upgrade: HTTP {}", resp.status().as_u16()),
                other => format!("upgrade: {other}"),
            })?;
        Ok(Conn::Ws(Box::new(ws)))
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

fn progress(plan: &Plan, len: u64, what: &str) -> indicatif::ProgressBar {
    if !plan.progress {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::with_draw_target(Some(len), indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!("{{elapsed_precise}} [{{bar:40}}] {{pos}}/{{len}} {what} {{msg}}"))
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

/// Runs a plan. `on_held` is called once every idle connection is open.
pub async fn run(plan: Plan, on_held: impl FnOnce(usize)) -> Result<Report, String> {
    let (addr, name, uri) = target(&plan.url, true)?;
    let client = Arc::new(Client {
        addr,
        name,
        url: uri.to_string(),
        tls: TlsConnector::from(plan.tls.clone()),
        source_ips: plan.source_ips.clone(),
        next_source: AtomicU64::new(0),
        turn: plan.turn,
    });
    let errors = Arc::new(Errors::default());
    let started = Instant::now();
    let mut report = match plan.mode {
        Mode::Idle => idle(&plan, client, errors.clone(), on_held).await,
        Mode::Churn => churn(&plan, client, errors.clone()).await,
        Mode::Echo => echo(&plan, client, errors.clone()).await,
    };
    report.seconds = started.elapsed().as_secs_f64();
    report.errors = std::mem::take(&mut *errors.0.lock().unwrap());
    Ok(report)
}

fn empty_report(plan: &Plan) -> Report {
    Report {
        mode: plan.mode,
        url: plan.url.clone(),
        seconds: 0.0,
        completed: 0,
        per_second: 0.0,
        latency: Percentiles::default(),
        sent: 0,
        received: 0,
        lost: 0,
        reordered: 0,
        duplicated: 0,
        errors: BTreeMap::new(),
    }
}

async fn idle(plan: &Plan, client: Arc<Client>, errors: Arc<Errors>, on_held: impl FnOnce(usize)) -> Report {
    let bar = progress(plan, plan.connections as u64, "connections");
    let gate = Arc::new(tokio::sync::Semaphore::new(plan.concurrency.max(1)));
    let hist = Arc::new(Mutex::new(histogram()));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..plan.connections {
        let (client, gate, hist, errors, bar) = (client.clone(), gate.clone(), hist.clone(), errors.clone(), bar.clone());
        tasks.spawn(async move {
            let permit = gate.acquire_owned().await.expect("semaphore open");
            let t = Instant::now();
            let result = async {
                let conn = client.connect().await?;
                conn.echo_one(format!("idle {i:08}").into_bytes()).await
            }
            .await;
            drop(permit);
            bar.inc(1);
            match result {
                Ok(ws) => {
                    let _ = hist.lock().unwrap().record(t.elapsed().as_micros() as u64);
                    Some(ws)
                }
                Err(e) => {
                    errors.add(e);
                    None
                }
            }
        });
    }
    let mut held = Vec::with_capacity(plan.connections);
    while let Some(r) = tasks.join_next().await {
        if let Ok(Some(ws)) = r {
            held.push(ws);
        }
    }
    bar.finish_and_clear();
    let opened = Instant::now();
    on_held(held.len());
    // Hold, answering pings, until the duration is over; then close each one properly.
    let done = tokio_util::sync::CancellationToken::new();
    let holding = held.len();
    let mut readers = tokio::task::JoinSet::new();
    for conn in held.drain(..) {
        let (errors, done) = (errors.clone(), done.clone());
        readers.spawn(async move {
            let (tx, mut rx) = conn.split();
            loop {
                tokio::select! {
                    msg = rx.recv() => match msg {
                        Ok(Some(_)) => {}
                        Ok(None) => return,
                        Err(e) => {
                            errors.add(format!("{e} while held"));
                            return;
                        }
                    },
                    _ = done.cancelled() => {
                        Conn::join(tx, rx).close().await;
                        return;
                    }
                }
            }
        });
    }
    tokio::time::sleep(plan.duration).await;
    done.cancel();
    while readers.join_next().await.is_some() {}
    let mut report = empty_report(plan);
    report.completed = holding as u64;
    report.per_second = holding as f64 / opened.elapsed().as_secs_f64().max(1e-9);
    report.latency = Percentiles::of(&hist.lock().unwrap());
    report
}

async fn churn(plan: &Plan, client: Arc<Client>, errors: Arc<Errors>) -> Report {
    let deadline = Instant::now() + plan.duration;
    let hist = Arc::new(Mutex::new(histogram()));
    let cycles = Arc::new(AtomicU64::new(0));
    let bar = progress(plan, plan.duration.as_secs().max(1), "s");
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..plan.concurrency.max(1) {
        let (client, errors, hist, cycles) = (client.clone(), errors.clone(), hist.clone(), cycles.clone());
        tasks.spawn(async move {
            let mut local = histogram();
            while Instant::now() < deadline {
                let t = Instant::now();
                let result = async {
                    let conn = client.connect().await?;
                    conn.echo_one(format!("churn {w:08}").into_bytes()).await?.close().await;
                    Ok::<_, String>(())
                }
                .await;
                match result {
                    Ok(()) => {
                        cycles.fetch_add(1, Ordering::Relaxed);
                        let _ = local.record(t.elapsed().as_micros() as u64);
                    }
                    Err(e) => errors.add(e),
                }
            }
            hist.lock().unwrap().add(&local).expect("same bounds");
        });
    }
    let started = Instant::now();
    let ticker = async {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            bar.set_position(started.elapsed().as_secs());
            bar.set_message(format!("{} cycles", cycles.load(Ordering::Relaxed)));
        }
    };
    tokio::select! {
        _ = async { while tasks.join_next().await.is_some() {} } => {}
        _ = ticker => {}
    }
    bar.finish_and_clear();
    let mut report = empty_report(plan);
    report.completed = cycles.load(Ordering::Relaxed);
    report.per_second = report.completed as f64 / started.elapsed().as_secs_f64();
    report.latency = Percentiles::of(&hist.lock().unwrap());
    report
}

/// Per-connection message accounting for the echo mode.
#[derive(Default)]
struct Tally {
    sent: u64,
    received: u64,
    lost: u64,
    reordered: u64,
    duplicated: u64,
}

async fn echo(plan: &Plan, client: Arc<Client>, errors: Arc<Errors>) -> Report {
    let n = plan.connections.max(1);
    // Each connection sends at rate/n, staggered so sends are spread evenly.
    let interval = Duration::from_secs_f64(n as f64 / plan.rate.max(1) as f64);
    let size = plan.size.max(16);
    let bar = progress(plan, plan.duration.as_secs().max(1), "s");
    let gate = Arc::new(tokio::sync::Semaphore::new(plan.concurrency.max(1)));
    let mut conns = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (client, gate, errors) = (client.clone(), gate.clone(), errors.clone());
        conns.spawn(async move {
            let _permit = gate.acquire_owned().await.expect("semaphore open");
            match client.connect().await {
                Ok(ws) => Some(ws),
                Err(e) => {
                    errors.add(e);
                    None
                }
            }
        });
    }
    let mut sockets = Vec::new();
    while let Some(r) = conns.join_next().await {
        if let Ok(Some(ws)) = r {
            sockets.push(ws);
        }
    }
    let start = Instant::now() + Duration::from_millis(100);
    let end = start + plan.duration;
    let hist = Arc::new(Mutex::new(histogram()));
    let totals = Arc::new(Mutex::new(Tally::default()));
    let live = sockets.len();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, ws) in sockets.into_iter().enumerate() {
        let (errors, hist, totals) = (errors.clone(), hist.clone(), totals.clone());
        let offset = interval.mul_f64(i as f64 / live as f64);
        tasks.spawn(async move {
            let (mut sink, mut stream) = ws.split();
            let size = if matches!(sink, Tx::Turn(_)) { size.div_ceil(4) * 4 } else { size };
            let first = start + offset;
            let sender = async {
                let mut seq = 0u64;
                let mut payload = vec![0u8; size];
                loop {
                    let intended = first + interval.mul_f64(seq as f64);
                    if intended >= end {
                        break;
                    }
                    tokio::time::sleep_until(intended.into()).await;
                    // tokio's timer fires on the first millisecond tick at or after `intended`:
                    // that wait is the client's own, not the target's, so latency counts from the
                    // wake-up, but never from later than 1 ms after the intended time (a client
                    // that falls behind its schedule still has its backlog counted).
                    let stamp = Instant::now().min(intended + Duration::from_millis(1));
                    payload[..8].copy_from_slice(&seq.to_be_bytes());
                    payload[8..16].copy_from_slice(&(stamp.duration_since(start).as_nanos() as u64).to_be_bytes());
                    if let Err(e) = sink.send(payload.clone()).await {
                        errors.add(e);
                        break;
                    }
                    seq += 1;
                }
                seq
            };
            let receiver = async {
                let mut local = histogram();
                let mut t = Tally::default();
                let mut expected = 0u64;
                let mut seen = std::collections::HashSet::new();
                let grace = end + Duration::from_secs(2);
                loop {
                    let msg = tokio::time::timeout_at(grace.into(), stream.recv()).await;
                    let data = match msg {
                        Ok(Ok(Some(d))) => d,
                        Ok(Err(e)) => {
                            errors.add(e);
                            break;
                        }
                        Ok(Ok(None)) | Err(_) => break,
                    };
                    if data.len() < 16 {
                        errors.add("short echo");
                        continue;
                    }
                    let seq = u64::from_be_bytes(data[..8].try_into().expect("8 bytes"));
                    let intended_ns = u64::from_be_bytes(data[8..16].try_into().expect("8 bytes"));
                    let latency = (Instant::now().duration_since(start).as_nanos() as u64).saturating_sub(intended_ns);
                    let _ = local.record((latency / 1000).max(1));
                    t.received += 1;
                    if !seen.insert(seq) {
                        t.duplicated += 1;
                    } else if seq < expected {
                        t.reordered += 1;
                    } else {
                        expected = seq + 1;
                    }
                }
                (local, t, seen)
            };
            let (sent, (local, mut t, seen)) = tokio::join!(sender, receiver);
            t.sent = sent;
            t.lost = (0..sent).filter(|s| !seen.contains(s)).count() as u64;
            sink.close().await;
            hist.lock().unwrap().add(&local).expect("same bounds");
            let mut total = totals.lock().unwrap();
            total.sent += t.sent;
            total.received += t.received;
            total.lost += t.lost;
            total.reordered += t.reordered;
            total.duplicated += t.duplicated;
        });
    }
    let ticker = async {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            bar.set_position(Instant::now().saturating_duration_since(start).as_secs());
        }
    };
    tokio::select! {
        _ = async { while tasks.join_next().await.is_some() {} } => {}
        _ = ticker => {}
    }
    bar.finish_and_clear();
    let t = totals.lock().unwrap();
    let mut report = empty_report(plan);
    report.completed = t.received;
    report.per_second = t.received as f64 / plan.duration.as_secs_f64();
    report.latency = Percentiles::of(&hist.lock().unwrap());
    report.sent = t.sent;
    report.received = t.received;
    report.lost = t.lost;
    report.reordered = t.reordered;
    report.duplicated = t.duplicated;
    report
}

