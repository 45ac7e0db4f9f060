//! The `sigrelay` binary: parse arguments, set up logging, load config, bind, run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use sigrelay::{tls, Config};

/// A TLS-terminating WebSocket relay for Twilio Video signalling and insights.
///
/// Point the SDK's `wsServer` and `wsServerInsights` at it. Handshake and close records go to
/// stdout, one JSON object per line; logs go to stderr.
#[derive(Parser)]
#[command(name = "sigrelay", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay (the default when no subcommand is given).
    Run(RunArgs),
    /// Validate a config file: print every problem (file, key, why) and exit non-zero if any.
    CheckConfig {
        #[arg(long, short, env = "SIGRELAY_CONFIG", default_value = "config/sigrelay.toml")]
        config: PathBuf,
    },
    /// Run a stand-in for Twilio's gateways, to try or load-test a relay without Twilio.
    MockGateway(MockArgs),
    /// Load-test a relay deployment (usually with `mock-gateway --mode echo` behind it).
    Loadtest(LoadtestArgs),
    /// Probe every configured gateway phase by phase and decode a token; exit 1 if anything fails.
    Diagnose {
        #[arg(long, short, env = "SIGRELAY_CONFIG", default_value = "config/sigrelay.toml")]
        config: PathBuf,
        /// An access token to decode (identity, room, expiry, region, and the gateway it would get).
        #[arg(long)]
        token: Option<String>,
        /// Only this route (by name).
        #[arg(long)]
        route: Option<String>,
        /// Only this region.
        #[arg(long)]
        region: Option<String>,
        /// Print the diagnosis as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Summarize handshake and close records per route and region (files, or stdin).
    Report {
        /// Record files (JSON lines); none, or `-`, reads stdin.
        files: Vec<PathBuf>,
        /// Only records at or after this RFC 3339 time, or this long ago (e.g. `1h`).
        #[arg(long, value_parser = sigrelay::report::parse_since)]
        since: Option<std::time::SystemTime>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Probe a running relay's /healthz over TLS on loopback; exit 0 when it answers 200.
    /// Made for container HEALTHCHECKs: the image needs no curl or shell.
    Healthcheck {
        #[arg(long, short, env = "SIGRELAY_CONFIG", default_value = "config/sigrelay.toml")]
        config: PathBuf,
        /// The relay's listen address (default: from the config); 0.0.0.0 and :: probe loopback.
        #[arg(long, env = "SIGRELAY_LISTEN")]
        listen: Option<SocketAddr>,
    },
}

#[derive(Args)]
struct LoadtestArgs {
    /// The relay URL, e.g. wss://127.0.0.1:8443/au1/signaling.
    url: String,
    /// idle: hold connections; churn: connect+TLS+upgrade+echo+close in a loop; echo: fixed-rate
    /// numbered messages.
    #[arg(long, value_enum, default_value_t = sigrelay::loadtest::Mode::Echo)]
    mode: sigrelay::loadtest::Mode,
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
    duration: std::time::Duration,
    /// Local source addresses to spread connections over, e.g. 127.0.0.1,127.0.0.2.
    #[arg(long, value_delimiter = ',')]
    source_ip: Vec<std::net::IpAddr>,
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
}

#[derive(Args)]
struct MockArgs {
    /// Listen address; port 0 picks a free port. The bound address is the first line on stdout.
    #[arg(long, default_value = "127.0.0.1:9443")]
    listen: SocketAddr,
    /// Certificate chain (PEM). Without --cert/--key a throwaway CA and a certificate for the
    /// Twilio host names are made, and the CA is written out for sigrelay's `ca_file`.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// Private key (PEM).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Where to write the throwaway CA (default: a new directory under the system temp dir).
    #[arg(long, conflicts_with = "cert")]
    ca_out: Option<PathBuf>,
    /// `twilio` answers like Twilio's gateways; `echo` sends every message back.
    #[arg(long, value_enum, default_value_t = sigrelay::mock_gateway::Mode::Twilio)]
    mode: sigrelay::mock_gateway::Mode,
}

#[derive(Args)]
struct RunArgs {
    /// Configuration file (TOML).
    #[arg(long, short, env = "SIGRELAY_CONFIG", default_value = "config/sigrelay.toml")]
    config: PathBuf,
    /// Listen address, overriding `[server] listen`; port 0 picks a free port.
    #[arg(long, env = "SIGRELAY_LISTEN")]
    listen: Option<SocketAddr>,
    /// Admin listener address (`/metrics`, `/connections`), overriding `[admin] listen`; `off`
    /// turns it off.
    #[arg(long, env = "SIGRELAY_ADMIN_LISTEN")]
    admin_listen: Option<String>,
    /// Log format on stderr.
    #[arg(long, env = "SIGRELAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log filter, e.g. `info` or `sigrelay=debug`.
    #[arg(long, env = "SIGRELAY_LOG", default_value = "info")]
    log: String,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig { config }) => check_config(&config),
        Some(Command::Run(args)) => run(args),
        Some(Command::Loadtest(args)) => match loadtest(args) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(2),
            Err(e) => {
                eprintln!("sigrelay loadtest: {e:#}");
                ExitCode::FAILURE
            }
        },
        Some(Command::Diagnose { config, token, route, region, json }) => match diagnose(&config, token, route, region, json) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("sigrelay diagnose: {e:#}");
                ExitCode::from(2)
            }
        },
        Some(Command::Report { files, since, json }) => match report(files, since, json) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sigrelay report: {e:#}");
                ExitCode::FAILURE
            }
        },
        Some(Command::Healthcheck { config, listen }) => match healthcheck(&config, listen) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sigrelay healthcheck: {e:#}");
                ExitCode::FAILURE
            }
        },
        Some(Command::MockGateway(args)) => match mock_gateway(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sigrelay mock-gateway: {e:#}");
                ExitCode::FAILURE
            }
        },
        None => run(cli.run),
    }
}

fn init_logging(args: &RunArgs) {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log).unwrap_or_else(|e| {
        eprintln!("sigrelay: ignoring --log {:?}: {e}", args.log);
        tracing_subscriber::EnvFilter::new("info")
    });
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match args.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

fn check_config(path: &std::path::Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let mut problems = Vec::new();
    let dev_pending = !config.server.cert.exists() && sigrelay::config::is_dev_cert_path(&config.server.cert);
    if !dev_pending {
        if let Err(e) = tls::CertStore::load(&config) {
            problems.push(e.to_string());
        }
    }
    if let Err(e) = tls::client_config(&config) {
        problems.push(e.to_string());
    }
    if !problems.is_empty() {
        eprintln!("{}: {} problem(s)", path.display(), problems.len());
        for p in problems {
            eprintln!("  {}: {p}", path.display());
        }
        return ExitCode::FAILURE;
    }
    let note = if dev_pending { " (a self-signed dev certificate will be generated at start)" } else { "" };
    println!(
        "{}: ok: {} route(s), {} region(s){note}",
        path.display(),
        config.routes.len(),
        config.regions.len()
    );
    ExitCode::SUCCESS
}

fn run(args: RunArgs) -> ExitCode {
    init_logging(&args);
    // One thread of `server.threads`; the library starts the others, each with its own runtime.
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
        .and_then(|rt| {
            let served = rt.block_on(serve(args));
            // A task stuck past the forced close, or a records flush that timed out, must not
            // keep the process alive: dropping the runtime would wait for them.
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
            served
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sigrelay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: RunArgs) -> anyhow::Result<()> {
    let mut config = Config::load(&args.config)?;
    apply_overrides(&mut config, args.listen, args.admin_listen.as_deref())?;
    if tls::ensure_dev_cert(&config.server.cert, &config.server.key)? {
        tracing::warn!(
            cert = %config.server.cert.display(),
            "GENERATED A SELF-SIGNED CERTIFICATE FOR localhost. Browsers will not trust it. \
             For anything but local testing, set [server] cert and key to a real certificate."
        );
    }
    if !config.server.tls {
        tracing::warn!(
            "TLS IS OFF ([server] tls = false): serving plain HTTP. Only do this behind a load \
             balancer that terminates TLS, on a network nobody else can reach."
        );
    }
    // Each relayed connection holds two descriptors; take all the kernel allows.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(nofile = n, "file-descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the file-descriptor limit"),
    }
    let listener = sigrelay::listener::bind(config.server.listen)
        .with_context(|| format!("binding {}", config.server.listen))?;
    let addr = listener.local_addr()?;
    let (records, writer) = sigrelay::Records::stdout();
    let app = sigrelay::App::new(config, records)?;
    let reloader = tokio::spawn(reload_on_sighup(app.clone(), args.config.clone(), args.listen, args.admin_listen));
    let served = sigrelay::serve(app.clone(), listener, shutdown_signal());
    eprintln!("sigrelay {} listening on {addr}", env!("CARGO_PKG_VERSION"));
    served.await?;
    reloader.abort();
    let _ = reloader.await;
    drop(app);
    // The writer ends once every Records handle is gone; a task stuck past the forced close must
    // not keep the process alive.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), tokio::task::spawn_blocking(|| writer.finish())).await;
    tracing::info!("stopped");
    Ok(())
}

/// Command-line settings win over the file's.
fn apply_overrides(config: &mut Config, listen: Option<SocketAddr>, admin_listen: Option<&str>) -> anyhow::Result<()> {
    if let Some(l) = listen {
        config.server.listen = l;
    }
    match admin_listen {
        None => {}
        Some("off") => config.admin.listen = None,
        Some(a) => config.admin.listen = Some(a.parse().with_context(|| format!("--admin-listen {a:?}"))?),
    }
    Ok(())
}

/// On SIGHUP, re-reads the config file: routes, regions, limits, origins and certificates. A
/// file with problems is rejected whole, every problem logged, and the running config kept.
async fn reload_on_sighup(
    app: std::sync::Arc<sigrelay::App>,
    path: PathBuf,
    listen: Option<SocketAddr>,
    admin_listen: Option<String>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else { return };
    while hup.recv().await.is_some() {
        // File reads and parsing stay off this thread, which also serves connections.
        let (app, file, admin_listen) = (app.clone(), path.clone(), admin_listen.clone());
        let result = tokio::task::spawn_blocking(move || {
            Config::load(&file).map_err(anyhow::Error::from).and_then(|mut c| {
                apply_overrides(&mut c, listen, admin_listen.as_deref())?;
                app.reload(c).map_err(anyhow::Error::from)
            })
        })
        .await
        .unwrap_or_else(|e| Err(anyhow::anyhow!("reload: {e}")));
        match result {
            Ok(()) => tracing::info!(config = %path.display(), "configuration reloaded"),
            Err(e) => tracing::error!(config = %path.display(), "reload rejected, running configuration kept: {e:#}"),
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT; a second one exits at once.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing the SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutdown signal received; draining (send it again to exit at once)");
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        eprintln!("sigrelay: second signal, exiting now");
        std::process::exit(130);
    });
}

fn mock_gateway(args: MockArgs) -> anyhow::Result<()> {
    use sigrelay::mock_gateway::{self, Events};
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter("warn").init();
    let (certs, key) = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => (tls::load_certs("--cert", cert)?, tls::load_key("--key", key)?),
        _ => {
            let ca = sigrelay::pki::TestCa::new("sigrelay mock-gateway CA")?;
            let leaf = ca.leaf(&sigrelay::pki::twilio_names())?;
            let ca_path = match args.ca_out.clone() {
                Some(p) => p,
                None => {
                    let dir = std::env::temp_dir().join(format!("sigrelay-mock-gateway-{}", std::process::id()));
                    std::fs::create_dir_all(&dir)?;
                    dir.join("ca.pem")
                }
            };
            std::fs::write(&ca_path, &ca.cert_pem).with_context(|| format!("writing {}", ca_path.display()))?;
            eprintln!("mock-gateway: wrote its CA to {}; set [upstream] ca_file to it", ca_path.display());
            use rustls_pki_types::pem::PemObject;
            let certs = rustls_pki_types::CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
            let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes())?;
            (certs, key)
        }
    };
    let tls = rustls::ServerConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
        println!("{}", listener.local_addr()?);
        let shutdown = tokio_util::sync::CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            stop.cancel();
        });
        mock_gateway::serve(listener, std::sync::Arc::new(tls), args.mode, Events::Stdout, shutdown).await;
        anyhow::Ok(())
    })
}

fn healthcheck(config: &std::path::Path, listen: Option<SocketAddr>) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let mut addr = match listen {
        Some(a) => a,
        None => Config::load(config)?.server.listen,
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
    }
    let tls = sigrelay::tls::probe_client_config();
    let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
    let mut conn = rustls::ClientConnection::new(tls, name)?;
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3))
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(3)))?;
    let mut stream = rustls::Stream::new(&mut conn, &mut tcp);
    write!(stream, "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).context("reading the response")?;
    anyhow::ensure!(&head == b"HTTP/1.1 200", "{addr}/healthz answered {:?}", String::from_utf8_lossy(&head));
    Ok(())
}

/// Returns whether the run was clean (no errors, nothing lost, reordered or duplicated).
fn loadtest(args: LoadtestArgs) -> anyhow::Result<bool> {
    use sigrelay::loadtest::{self, Plan};
    loadtest::target(&args.url, args.allow_non_loopback).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(args.connections <= loadtest::MAX_CONNECTIONS, "--connections is at most {}", loadtest::MAX_CONNECTIONS);
    anyhow::ensure!(args.duration <= loadtest::MAX_DURATION, "--duration is at most 10m");
    anyhow::ensure!(args.rate <= loadtest::MAX_RATE, "--rate is at most {}", loadtest::MAX_RATE);
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
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let report = rt.block_on(loadtest::run(plan, |n| eprintln!("loadtest: holding {n} connections")));
    let report = report.map_err(anyhow::Error::msg)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(report.clean())
}

fn report(files: Vec<PathBuf>, since: Option<std::time::SystemTime>, json: bool) -> anyhow::Result<()> {
    use std::io::BufReader;
    let mut builder = sigrelay::report::Builder::new(since);
    if files.is_empty() || files.iter().any(|f| f.as_os_str() == "-") {
        builder.read(std::io::stdin().lock()).context("reading stdin")?;
    }
    for file in files.iter().filter(|f| f.as_os_str() != "-") {
        let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
        builder.read(BufReader::with_capacity(1 << 20, f)).with_context(|| format!("reading {}", file.display()))?;
    }
    let report = builder.finish();
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.text());
    }
    Ok(())
}

/// Returns whether every check passed.
fn diagnose(path: &std::path::Path, token: Option<String>, route: Option<String>, region: Option<String>, json: bool) -> anyhow::Result<bool> {
    use sigrelay::diagnose::{self, Diagnosis};
    let config = Config::load(path)?;
    let connector = sigrelay::upstream::Connector::new(&config, tls::client_config(&config)?);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let probes = rt.block_on(diagnose::probe_all(&config, &connector, route.as_deref(), region.as_deref()));
    anyhow::ensure!(!probes.is_empty(), "no route or region matches the filters");
    let (token, token_error) = match token.as_deref().map(|t| diagnose::token_report(&config, t)) {
        Some(Ok(t)) => (Some(t), None),
        Some(Err(e)) => (None, Some(e)),
        None => (None, None),
    };
    let ok = probes.iter().all(|p| p.ok) && token_error.is_none() && !token.as_ref().is_some_and(|t| t.expired);
    let d = Diagnosis { ok, probes, token, token_error };
    if json {
        println!("{}", serde_json::to_string(&d)?);
    } else {
        print!("{}", d.text());
    }
    Ok(ok)
}
