//! Gateway probes: connect to every configured gateway (each route, each allowed region) the way
//! the relay does, phase by phase. `/diag` shows them to users; `sigrelay diagnose` prints them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::Config;
use crate::records::millis;
use crate::upstream::{Connector, ForwardHeaders, Timings};

/// One gateway probe.
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    pub route: String,
    pub region: String,
    pub url: String,
    pub ok: bool,
    pub outcome: String,
    pub error: Option<String>,
    /// `error` as anyone may read it (see [`crate::upstream::UpstreamError::public`]).
    #[serde(skip)]
    pub public_error: Option<String>,
    pub dns_ms: Option<f64>,
    pub proxy_ms: Option<f64>,
    pub connect_ms: Option<f64>,
    pub tls_ms: Option<f64>,
    pub websocket_ms: Option<f64>,
    /// For the TURN upstream: how long its answer to a STUN Binding request took.
    pub stun_ms: Option<f64>,
}

/// Probes at most this many gateways at once.
const CONCURRENCY: usize = 8;

/// Probes every route and region, or only those matching the filters, in config order.
pub async fn probe_all(config: &Config, connector: &Connector, route: Option<&str>, region: Option<&str>) -> Vec<Probe> {
    let gate = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    let mut order = 0usize;
    for r in &config.routes {
        if route.is_some_and(|name| name != r.name) {
            continue;
        }
        for code in &config.regions {
            if region.is_some_and(|want| want != code) {
                continue;
            }
            let target = r.targets[code].clone();
            let (connector, gate, name, code) = (connector.clone(), gate.clone(), r.name.clone(), code.clone());
            let at = order;
            order += 1;
            tasks.spawn(async move {
                let _permit = gate.acquire_owned().await.expect("semaphore open");
                let mut t = Timings::default();
                let result = connector.connect(&target, &ForwardHeaders::default(), &mut t).await;
                let (ok, outcome, error, public_error) = match result {
                    Ok(mut c) => {
                        let frame = crate::frame::close_frame(1000, "sigrelay diagnose", Some(rand::random()));
                        let _ = c.io.write_all(&frame).await;
                        let _ = c.io.shutdown().await;
                        (true, "ok".to_string(), None, None)
                    }
                    Err(e) => (false, e.outcome().to_string(), Some(e.to_string()), Some(e.public())),
                };
                let probe = Probe::new(name, code, target.url.clone(), (ok, outcome, error, public_error), &t);
                (at, probe)
            });
        }
    }
    if config.turn.enabled && route.is_none_or(|r| r == crate::turn::ROUTE) && region.is_none() {
        let (config, connector, at) = (config.clone(), connector.clone(), order);
        tasks.spawn(async move { (at, probe_turn(&config, &connector).await) });
    }
    let mut probes: Vec<(usize, Probe)> = Vec::new();
    while let Some(r) = tasks.join_next().await {
        probes.push(r.expect("probe task"));
    }
    probes.sort_by_key(|(at, _)| *at);
    probes.into_iter().map(|(_, p)| p).collect()
}

/// A STUN Binding request (RFC 5389 §6) with transaction id `tid`: a header, no attributes.
fn binding_request(tid: [u8; 12]) -> Vec<u8> {
    let mut m = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
    m.extend_from_slice(&tid);
    m
}

/// Probes the TURN upstream the way the TURN relay connects to it (DNS, TCP, proxy, TLS with
/// no ALPN), then asks it a STUN Binding request and waits for the answer, success or error:
/// either proves a STUN server is there.
pub async fn probe_turn(config: &Config, connector: &Connector) -> Probe {
    use tokio::io::AsyncReadExt;
    let target = &config.turn.upstream;
    let tid: [u8; 12] = rand::random();
    let mut t = Timings::default();
    let mut stun_ms = None;
    // The outcome, the whole error and what anyone may read of it.
    let failed: Option<(String, String, String)> = match connector.connect_tls(target, &binding_request(tid), &mut t).await {
        Ok((mut io, _)) => {
            let asked = Instant::now();
            let mut header = [0u8; 20];
            let answer = tokio::time::timeout(config.upstream.connect_timeout, io.read_exact(&mut header)).await;
            let _ = io.shutdown().await;
            let why = match answer {
                // A success or an error response: either way a STUN server answered.
                Ok(Ok(_)) if header[4..8] == [0x21, 0x12, 0xA4, 0x42] && header[8..20] == tid && matches!(header[..2], [0x01, 0x01] | [0x01, 0x11]) => {
                    stun_ms = Some(millis(asked.elapsed()));
                    None
                }
                Ok(Ok(_)) => Some(("upstream_protocol_error", "stun: the answer to a Binding request is not a Binding response".to_string())),
                Ok(Err(e)) => Some(("upstream_protocol_error", format!("stun: no answer to a Binding request: {e}"))),
                Err(_) => Some(("upstream_timeout", "stun: no answer to a Binding request within connect_timeout".to_string())),
            };
            why.map(|(o, w)| (o.to_string(), w.clone(), w))
        }
        Err(e) => Some((e.outcome().to_string(), e.to_string(), e.public())),
    };
    let (ok, outcome, error, public_error) = match failed {
        None => (true, "ok".to_string(), None, None),
        Some((outcome, error, public)) => (false, outcome, Some(error), Some(public)),
    };
    Probe { stun_ms, ..Probe::new(crate::turn::ROUTE.into(), "-".into(), target.url.clone(), (ok, outcome, error, public_error), &t) }
}

impl Probe {
    /// A probe's result from its outcome (`ok`, outcome word, error, the error fit for the
    /// public page) and the phases `t` timed.
    fn new(route: String, region: String, url: String, result: (bool, String, Option<String>, Option<String>), t: &Timings) -> Probe {
        let (ok, outcome, error, public_error) = result;
        Probe {
            route,
            region,
            url,
            ok,
            outcome,
            error,
            public_error,
            dns_ms: t.dns.map(millis),
            proxy_ms: t.proxy.map(millis),
            connect_ms: t.connect.map(millis),
            tls_ms: t.tls.map(millis),
            websocket_ms: t.websocket.map(millis),
            stun_ms: None,
        }
    }
}

/// Probe runs shared by every asker: a run starts at most once per `interval`, and askers in
/// between get its results.
#[derive(Default)]
pub struct ProbeCache {
    last_run: Mutex<Option<ProbeRun>>,
}

/// A probe run: when it started, and its results (with when it finished) once it has.
struct ProbeRun {
    started: Instant,
    done: watch::Receiver<Option<(Instant, Arc<Vec<Probe>>)>>,
}

impl ProbeRun {
    /// Whether its task is still probing (it has neither sent results nor gone away).
    fn running(&self) -> bool {
        self.done.borrow().is_none() && self.done.has_changed().is_ok()
    }
}

impl Probe {
    /// The probe as anyone may read it: its error without internal addresses.
    pub fn redacted(&self) -> Probe {
        Probe { error: self.public_error.clone(), ..self.clone() }
    }
}

impl ProbeCache {
    /// The results of the run started less than `interval` ago or still going, or of a new one,
    /// and how long ago they were gathered. A run is its own task: an asker that leaves cannot cancel it, so
    /// runs start at most once per interval however requests come and go.
    pub async fn probes(&self, config: &Config, connector: &Connector, interval: Duration) -> (Duration, Arc<Vec<Probe>>) {
        let mut done = {
            let mut last = self.last_run.lock().unwrap();
            match &*last {
                // A run still going is joined however long ago it started: runs never overlap,
                // even when one takes longer than the interval.
                Some(run) if run.started.elapsed() < interval || run.running() => run.done.clone(),
                _ => {
                    let (tx, rx) = watch::channel(None);
                    let (config, connector) = (config.clone(), connector.clone());
                    tokio::spawn(async move {
                        let probes = probe_all(&config, &connector, None, None).await;
                        let _ = tx.send(Some((Instant::now(), Arc::new(probes))));
                    });
                    *last = Some(ProbeRun { started: Instant::now(), done: rx.clone() });
                    rx
                }
            }
        };
        let finished = done.wait_for(Option::is_some).await.ok().and_then(|v| v.clone());
        match finished {
            Some((at, probes)) => (at.elapsed(), probes),
            None => (Duration::ZERO, Arc::new(Vec::new())),
        }
    }
}
