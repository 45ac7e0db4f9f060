//! `sigrelay diagnose`: prints the core's gateway probes ([`crate::probe`]) phase by phase,
//! and decodes a token to say where the relay would route it.

use std::path::PathBuf;
use std::process::ExitCode;

use serde::Serialize;

use crate::config::{Config, RegionSource};
use crate::probe::{probe_all, Probe};
use crate::records::unix_now;
use crate::route::{self, RouteRequest, Router};
use crate::upstream::Connector;

/// `sigrelay diagnose`'s arguments.
#[derive(clap::Args)]
pub struct Args {
    #[arg(long, short, env = "SIGRELAY_CONFIG", default_value = "config/sigrelay.toml")]
    config: PathBuf,
    /// An access token to decode (identity, room, expiry, region, and the gateway it would get);
    /// `-` reads it from stdin, which keeps it out of the process list and shell history.
    #[arg(long, env = "SIGRELAY_TOKEN", hide_env_values = true)]
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
}

/// Runs `sigrelay diagnose`: exit 0 when every check passes, 1 when one fails, 2 on bad
/// arguments or configuration.
pub fn main(args: Args) -> ExitCode {
    super::exit("diagnose", diagnose(args))
}

fn diagnose(args: Args) -> anyhow::Result<bool> {
    let config = Config::load(&args.config)?;
    let tls = crate::tls::client_config(&config)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let probes = rt.block_on(async {
        let connector = Connector::new(&config, tls).map_err(anyhow::Error::msg)?;
        anyhow::Ok(probe_all(&config, &connector, args.route.as_deref(), args.region.as_deref()).await)
    })?;
    anyhow::ensure!(!probes.is_empty(), "no route or region matches the filters");
    let token = match args.token.as_deref() {
        Some("-") => {
            let mut t = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut t).map_err(|e| anyhow::anyhow!("reading the token from stdin: {e}"))?;
            Some(t)
        }
        t => t.map(str::to_string),
    };
    let (token, token_error) = match token.as_deref().map(|t| token_report(&config, t)) {
        Some(Ok(t)) => (Some(t), None),
        Some(Err(e)) => (None, Some(e)),
        None => (None, None),
    };
    let ok = probes.iter().all(|p| p.ok) && token_error.is_none() && !token.as_ref().is_some_and(|t| t.expired);
    let d = Diagnosis { ok, probes, token, token_error };
    if args.json {
        println!("{}", serde_json::to_string(&d)?);
    } else {
        print!("{}", d.text());
    }
    Ok(ok)
}

/// What a token says, and where the relay would send it.
#[derive(Debug, Serialize)]
pub struct TokenReport {
    pub identity: Option<String>,
    pub room: Option<String>,
    pub region: Option<String>,
    pub region_allowed: Option<bool>,
    pub exp: Option<i64>,
    pub nbf: Option<i64>,
    pub expired: bool,
    /// Seconds until `exp` (negative: since it expired).
    pub expires_in_s: Option<i64>,
    /// The signalling gateway the relay would pick for it on the first route that routes by token.
    pub gateway: Option<String>,
}

/// Everything `diagnose` found.
#[derive(Debug, Serialize)]
pub struct Diagnosis {
    pub ok: bool,
    pub probes: Vec<Probe>,
    pub token: Option<TokenReport>,
    pub token_error: Option<String>,
}

/// Decodes a token and says where the relay would route it.
pub fn token_report(config: &Config, token: &str) -> Result<TokenReport, String> {
    let info = crate::token::decode(token.trim()).map_err(|e| e.to_string())?;
    let router = Router::new(config);
    let now = unix_now();
    let region_allowed = info.region.as_deref().map(|r| router.is_allowed(r));
    let gateway = config.routes.iter().position(|r| r.region_from.contains(&RegionSource::Token)).map(|i| {
        let request = RouteRequest { route: i, path_region: None, query_region: None };
        route::decide(router.route(i), &request, true, Some(&info), now).target.url.clone()
    });
    Ok(TokenReport {
        expired: info.expired_at(now),
        expires_in_s: info.exp.map(|e| e - now),
        identity: info.identity,
        room: info.room,
        region: info.region,
        region_allowed,
        exp: info.exp,
        nbf: info.nbf,
        gateway,
    })
}

impl Diagnosis {
    /// The diagnosis as a table for a terminal.
    pub fn text(&self) -> String {
        let ms = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
        let mut out = format!(
            "{:<12} {:<6} {:>8} {:>8} {:>8} {:>8} {:>8}  result\n",
            "route", "region", "dns ms", "proxy", "tcp ms", "tls ms", "ws/stun"
        );
        for p in &self.probes {
            let result = match &p.error {
                None => "ok".to_string(),
                Some(e) => format!("FAIL {}: {e}", p.outcome),
            };
            out += &format!(
                "{:<12} {:<6} {:>8} {:>8} {:>8} {:>8} {:>8}  {result}\n",
                p.route,
                p.region,
                ms(p.dns_ms),
                ms(p.proxy_ms),
                ms(p.connect_ms),
                ms(p.tls_ms),
                ms(p.websocket_ms.or(p.stun_ms))
            );
        }
        if let Some(t) = &self.token {
            out += "\ntoken\n";
            out += &format!("  identity   {}\n  room       {}\n", t.identity.as_deref().unwrap_or("-"), t.room.as_deref().unwrap_or("-"));
            let when = match t.expires_in_s {
                Some(s) if s > 0 => format!("valid for {}", humantime::format_duration(std::time::Duration::from_secs(s as u64))),
                Some(s) => format!("EXPIRED {} ago", humantime::format_duration(std::time::Duration::from_secs((-s) as u64))),
                None => "no exp".into(),
            };
            out += &format!("  exp        {} ({when})\n", t.exp.map(|e| e.to_string()).unwrap_or_else(|| "-".into()));
            let region = match (&t.region, t.region_allowed) {
                (Some(r), Some(true)) => r.clone(),
                (Some(r), _) => format!("{r} (NOT in the allow-list: the default region is used)"),
                (None, _) => "none (the default region is used)".into(),
            };
            out += &format!("  region     {region}\n  gateway    {}\n", t.gateway.as_deref().unwrap_or("-"));
        }
        if let Some(e) = &self.token_error {
            out += &format!("\ntoken      UNREADABLE: {e}\n");
        }
        out += if self.ok { "\nall checks passed\n" } else { "\nsome checks FAILED\n" };
        out
    }
}
