//! The `sigrelay` binary: parse arguments, set up logging, load config, bind, run. Everything
//! else is the library's.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use sigrelay::Config;

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
    /// Probe a running relay's /healthz over TLS on loopback; exit 0 when it answers 200.
    /// Made for container HEALTHCHECKs: the image needs no curl or shell.
    Healthcheck {
        #[arg(long, short, env = "SIGRELAY_CONFIG", default_value = "config/sigrelay.toml")]
        config: PathBuf,
        /// The relay's listen address (default: from the config); 0.0.0.0 and :: probe loopback.
        #[arg(long, env = "SIGRELAY_LISTEN")]
        listen: Option<SocketAddr>,
    },
    /// Run a stand-in for Twilio's gateways, to try or load-test a relay without Twilio.
    #[cfg(feature = "tools")]
    MockGateway(sigrelay::tools::mock_gateway::Args),
    /// Load-test a relay deployment (usually with `mock-gateway --mode echo` behind it); exit 0
    /// for a clean run, 1 for one with errors or lost messages, 2 when it cannot run.
    #[cfg(feature = "tools")]
    Loadtest(sigrelay::tools::loadtest::Args),
    /// Probe every configured gateway phase by phase and decode a token; exit 0 when every
    /// check passes, 1 when one fails, 2 when it cannot run.
    #[cfg(feature = "tools")]
    Diagnose(sigrelay::tools::diagnose::Args),
    /// Summarize handshake and close records per route and region (files, or stdin).
    #[cfg(feature = "tools")]
    Report(sigrelay::tools::report::Args),
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
        None => run(cli.run),
        Some(Command::Run(args)) => run(args),
        Some(Command::CheckConfig { config }) => check_config(&config),
        Some(Command::Healthcheck { config, listen }) => {
            let probed = listen.map_or_else(|| Config::load(&config).map(|c| c.server.listen).map_err(Into::into), Ok);
            match probed.and_then(sigrelay::healthcheck::probe) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sigrelay healthcheck: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        #[cfg(feature = "tools")]
        Some(Command::MockGateway(args)) => sigrelay::tools::mock_gateway::main(args),
        #[cfg(feature = "tools")]
        Some(Command::Loadtest(args)) => sigrelay::tools::loadtest::main(args),
        #[cfg(feature = "tools")]
        Some(Command::Diagnose(args)) => sigrelay::tools::diagnose::main(args),
        #[cfg(feature = "tools")]
        Some(Command::Report(args)) => sigrelay::tools::report::main(args),
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
    let checked = Config::load(path).map_err(|e| e.to_string()).map(|c| sigrelay::server::check(&c));
    match checked {
        Err(e) => eprintln!("{e}"),
        Ok(Err(problems)) => {
            eprintln!("{}: {} problem(s)", path.display(), problems.len());
            for p in problems {
                eprintln!("  {}: {p}", path.display());
            }
        }
        Ok(Ok(summary)) => {
            println!("{}: ok: {summary}", path.display());
            return ExitCode::SUCCESS;
        }
    }
    ExitCode::FAILURE
}

/// The config file with the command line's settings over it, validated together.
fn load(path: &std::path::Path, listen: Option<SocketAddr>, admin_listen: Option<&str>) -> anyhow::Result<Config> {
    let overrides = sigrelay::config::Overrides { listen, admin_listen: admin_listen.map(str::to_string) };
    Ok(Config::load_with(path, &overrides)?)
}

fn run(args: RunArgs) -> ExitCode {
    init_logging(&args);
    // One thread of `server.threads`; the library starts the others, each with its own runtime.
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
        .and_then(|rt| {
            let served = rt.block_on(async {
                let config = load(&args.config, args.listen, args.admin_listen.as_deref())?;
                sigrelay::server::prepare(&config)?;
                let listener = sigrelay::listener::bind(config.server.listen)
                    .with_context(|| format!("binding {}", config.server.listen))?;
                let (path, listen, admin) = (args.config.clone(), args.listen, args.admin_listen.clone());
                let reloads = sigrelay::shutdown::reload_on_sighup(move || {
                    load(&path, listen, admin.as_deref()).map_err(|e| format!("{}: {e:#}", path.display()))
                });
                eprintln!("sigrelay {} listening on {}", env!("CARGO_PKG_VERSION"), listener.local_addr()?);
                sigrelay::run(config, listener, sigrelay::shutdown::terminate_signal(), reloads).await?;
                tracing::info!("stopped");
                anyhow::Ok(())
            });
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
