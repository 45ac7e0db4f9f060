//! `sigrelay diagnose`: probes every configured gateway (each route, each allowed region) the way
//! the relay connects to it, phase by phase, and decodes a token to say where it would route.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::io::AsyncWriteExt;

use crate::config::Config;
use crate::records::millis;
use crate::routing::Router;
use crate::upstream::{Connector, ForwardHeaders, Timings};

/// One gateway probe.
#[derive(Debug, Serialize)]
pub struct Probe {
    pub route: String,
    pub region: String,
    pub url: String,
    pub ok: bool,
    pub outcome: String,
    pub error: Option<String>,
    pub dns_ms: Option<f64>,
    pub proxy_ms: Option<f64>,
    pub connect_ms: Option<f64>,
    pub tls_ms: Option<f64>,
    pub websocket_ms: Option<f64>,
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

/// Probes every route and region (at most 8 at once), or only those matching the filters.
pub async fn probe_all(config: &Config, connector: &Connector, route: Option<&str>, region: Option<&str>) -> Vec<Probe> {
    let router = Router::new(config);
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(8));
    let mut tasks = tokio::task::JoinSet::new();
    let mut order = 0usize;
    for (i, r) in config.routes.iter().enumerate() {
        if route.is_some_and(|name| name != r.name) {
            continue;
        }
        for code in &config.regions {
            if region.is_some_and(|want| want != code) {
                continue;
            }
            let target = router.entry(i).target(code).expect("allowed regions have targets");
            let (connector, gate, name, code) = (connector.clone(), gate.clone(), r.name.clone(), code.clone());
            let at = order;
            order += 1;
            tasks.spawn(async move {
                let _permit = gate.acquire_owned().await.expect("semaphore open");
                let mut t = Timings::default();
                let result = connector.connect(&target, &ForwardHeaders::default(), &mut t).await;
                let (ok, outcome, error) = match result {
                    Ok(mut c) => {
                        let frame = crate::frame::close_frame(1000, "sigrelay diagnose", Some(rand::random()));
                        let _ = c.io.write_all(&frame).await;
                        let _ = c.io.shutdown().await;
                        (true, "ok".to_string(), None)
                    }
                    Err(e) => (false, e.outcome().to_string(), Some(e.to_string())),
                };
                let probe = Probe {
                    route: name,
                    region: code,
                    url: target.url.clone(),
                    ok,
                    outcome,
                    error,
                    dns_ms: t.dns.map(millis),
                    proxy_ms: t.proxy.map(millis),
                    connect_ms: t.connect.map(millis),
                    tls_ms: t.tls.map(millis),
                    websocket_ms: t.websocket.map(millis),
                };
                (at, probe)
            });
        }
    }
    let mut probes: Vec<(usize, Probe)> = Vec::new();
    while let Some(r) = tasks.join_next().await {
        probes.push(r.expect("probe task"));
    }
    probes.sort_by_key(|(at, _)| *at);
    probes.into_iter().map(|(_, p)| p).collect()
}

/// Decodes a token and says where the relay would route it.
pub fn token_report(config: &Config, token: &str) -> Result<TokenReport, String> {
    let info = crate::token::decode(token.trim()).map_err(|e| e.to_string())?;
    let router = Router::new(config);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let region_allowed = info.region.as_deref().map(|r| router.is_allowed(r));
    let gateway = config.routes.iter().position(|r| r.region_from.contains(&crate::routing::RegionSource::Token)).and_then(|i| {
        let entry = router.entry(i);
        let chosen = entry.choose(None, None, Some(info.region.as_deref()))?;
        entry.target(&chosen.region).map(|t| t.url.clone())
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
            "route", "region", "dns ms", "proxy", "tcp ms", "tls ms", "ws ms"
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
                ms(p.websocket_ms)
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
