//! Prometheus metrics, kept by prometheus-client and served on the admin listener.
//!
//! Handshake and close counts are taken from the records (one place decides an outcome); live
//! connections from the registry's guards; messages and bytes from the frame pump; the state
//! gauges (open connections, `max_connections`, readiness) when scraped; certificate expiry
//! when the certificates are loaded.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteRegion {
    pub route: String,
    pub region: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteOutcome {
    pub route: String,
    pub outcome: String,
}

/// Handshakes by route, region (an allowed region code, or `-` before one was chosen) and outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub route: String,
    pub region: String,
    pub outcome: String,
}

/// Closes by route, outcome and the side that ended the connection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    pub route: String,
    pub outcome: String,
    pub closed_by: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
}

/// A name the listener's certificates answer to (a DNS name, possibly a wildcard).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SniLabel {
    pub sni: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ThreadLabel {
    pub thread: String,
}

fn seconds_histogram() -> Histogram {
    // 0.5 ms to ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Every metric sigrelay exports.
pub struct Metrics {
    registry: Registry,
    pub live: Family<RouteRegion, Gauge>,
    pub handshakes: Family<HandshakeLabels, Counter>,
    /// Handshakes whose token had expired, whatever their outcome (relayed unless
    /// `reject_expired_tokens` is on).
    pub expired_tokens: Family<RouteLabel, Counter>,
    pub closes: Family<CloseLabels, Counter>,
    pub messages: Family<DirectionLabel, Counter>,
    pub bytes: Family<DirectionLabel, Counter>,
    pub handshake_seconds: Family<RouteOutcome, Histogram>,
    pub upstream_phase_seconds: Family<PhaseLabel, Histogram>,
    /// Records not written because their address had used up its handshake tokens.
    pub records_suppressed: Counter,
    /// TURN-over-TLS bytes relayed, by direction (up: browser to TURN server).
    pub turn_bytes_up: Counter,
    pub turn_bytes_down: Counter,
    /// Connections each accept thread is serving, by thread index.
    pub thread_connections: Family<ThreadLabel, Gauge>,
    /// `messages{direction="up"}` and the like, resolved once so the pump adds without a lookup.
    pub msgs_up: Counter,
    pub msgs_down: Counter,
    pub bytes_up: Counter,
    pub bytes_down: Counter,
    /// Connections counted against `max_connections` (from accept to close), set when scraped.
    pub connections_open: Gauge,
    /// `limits.max_connections` in force, set when scraped.
    pub max_connections: Gauge,
    /// 1 while `/readyz` says ready, set when scraped.
    pub ready: Gauge,
    /// The `notAfter` of the certificate served for each name, set when certificates load.
    pub certificate_not_after: Family<SniLabel, Gauge>,
}

impl Metrics {
    /// Every metric, with `records_dropped` counting the records the queue had to drop.
    pub fn new(records_dropped: Counter) -> Self {
        let mut registry = Registry::with_prefix("sigrelay");
        let live = Family::<RouteRegion, Gauge>::default();
        let handshakes = Family::<HandshakeLabels, Counter>::default();
        let expired_tokens = Family::<RouteLabel, Counter>::default();
        let closes = Family::<CloseLabels, Counter>::default();
        let messages = Family::<DirectionLabel, Counter>::default();
        let bytes = Family::<DirectionLabel, Counter>::default();
        let handshake_seconds = Family::<RouteOutcome, Histogram>::new_with_constructor(seconds_histogram as fn() -> Histogram);
        let upstream_phase_seconds = Family::<PhaseLabel, Histogram>::new_with_constructor(seconds_histogram as fn() -> Histogram);
        registry.register("connections_live", "Relayed connections now open, by route and region", live.clone());
        registry.register("handshakes", "Handshake records, by route, region and outcome", handshakes.clone());
        registry.register(
            "expired_tokens",
            "Handshakes whose token had expired, by route, whatever the outcome",
            expired_tokens.clone(),
        );
        registry.register("closes", "Close records, by route, outcome and the side that ended the connection", closes.clone());
        registry.register("messages", "Data messages relayed, by direction (up: browser to gateway)", messages.clone());
        registry.register("bytes", "WebSocket frame bytes relayed, by direction", bytes.clone());
        registry.register("handshake_duration_seconds", "Time from request to handshake outcome", handshake_seconds.clone());
        registry.register("upstream_phase_duration_seconds", "Time of each gateway connection phase", upstream_phase_seconds.clone());
        registry.register("records_dropped", "Records dropped because stdout was not read fast enough", records_dropped);
        let turn_bytes = Family::<DirectionLabel, Counter>::default();
        registry.register("turn_bytes", "TURN-over-TLS bytes relayed, by direction (up: browser to TURN server)", turn_bytes.clone());
        let turn_bytes_up = turn_bytes.get_or_create(&DirectionLabel { direction: "up" }).clone();
        let turn_bytes_down = turn_bytes.get_or_create(&DirectionLabel { direction: "down" }).clone();
        let records_suppressed = Counter::default();
        registry.register(
            "records_suppressed",
            "Records of connections that failed before a request, not written because their address was over its handshake rate (still counted in handshakes)",
            records_suppressed.clone(),
        );
        let thread_connections = Family::<ThreadLabel, Gauge>::default();
        registry.register(
            "thread_connections",
            "Connections each accept thread is serving (new ones go to the least-loaded thread)",
            thread_connections.clone(),
        );
        let connections_open = Gauge::default();
        registry.register("connections_open", "Connections counted against max_connections, from accept to close", connections_open.clone());
        let max_connections = Gauge::default();
        registry.register("max_connections", "The limits.max_connections in force", max_connections.clone());
        let ready = Gauge::default();
        registry.register("ready", "1 while every accept thread is accepting and no shutdown has started", ready.clone());
        let certificate_not_after = Family::<SniLabel, Gauge>::default();
        registry.register_with_unit(
            "certificate_not_after_timestamp",
            "When the certificate served for a name expires (its notAfter), in Unix time",
            prometheus_client::registry::Unit::Seconds,
            certificate_not_after.clone(),
        );
        let dir = |d| DirectionLabel { direction: d };
        let msgs_up = messages.get_or_create(&dir("up")).clone();
        let msgs_down = messages.get_or_create(&dir("down")).clone();
        let bytes_up = bytes.get_or_create(&dir("up")).clone();
        let bytes_down = bytes.get_or_create(&dir("down")).clone();
        Metrics {
            msgs_up,
            msgs_down,
            bytes_up,
            bytes_down,
            registry,
            live,
            handshakes,
            expired_tokens,
            closes,
            messages,
            bytes,
            handshake_seconds,
            upstream_phase_seconds,
            records_suppressed,
            turn_bytes_up,
            turn_bytes_down,
            thread_connections,
            connections_open,
            max_connections,
            ready,
            certificate_not_after,
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }

    /// Counts a handshake record.
    pub fn handshake(&self, r: &crate::records::HandshakeRecord) {
        let label = RouteOutcome {
            route: r.route.clone().unwrap_or_else(|| "-".into()),
            outcome: r.outcome.map(|o| o.as_str()).unwrap_or("-").to_string(),
        };
        // A record's region is only ever an allowed one (the routing decision's), so the label
        // stays bounded by the allow-list.
        let region = r.region.clone().unwrap_or_else(|| "-".into());
        self.handshakes
            .get_or_create(&HandshakeLabels { route: label.route.clone(), region, outcome: label.outcome.clone() })
            .inc();
        if r.token_expired == Some(true) {
            self.expired_tokens.get_or_create(&RouteLabel { route: label.route.clone() }).inc();
        }
        if let Some(ms) = r.total_ms {
            self.handshake_seconds.get_or_create(&label).observe(ms / 1000.0);
        }
        for (phase, ms) in [
            ("dns", r.upstream_dns_ms),
            ("proxy", r.upstream_proxy_ms),
            ("connect", r.upstream_connect_ms),
            ("tls", r.upstream_tls_ms),
            ("websocket", r.upstream_ws_ms),
        ] {
            if let Some(ms) = ms {
                self.upstream_phase_seconds.get_or_create(&PhaseLabel { phase }).observe(ms / 1000.0);
            }
        }
    }

    /// Counts data messages and frame bytes relayed from `side` outside the pump.
    pub fn count_messages(&self, side: crate::outcome::Side, msgs: u64, bytes: u64) {
        let (m, b) = match side {
            crate::outcome::Side::Upstream => (&self.msgs_down, &self.bytes_down),
            _ => (&self.msgs_up, &self.bytes_up),
        };
        m.inc_by(msgs);
        b.inc_by(bytes);
    }

    /// Counts a close record.
    pub fn close(&self, r: &crate::records::CloseRecord) {
        let label = CloseLabels {
            route: r.route.clone().unwrap_or_else(|| "-".into()),
            outcome: r.outcome.map(|o| o.as_str()).unwrap_or("-").to_string(),
            closed_by: r.closed_by.map(|s| s.word()).unwrap_or("-"),
        };
        self.closes.get_or_create(&label).inc();
    }

    /// Replaces the certificate expiry gauges: one per name, with that name's certificate's
    /// `notAfter` (Unix seconds). Names no longer served disappear.
    pub fn set_certificates(&self, not_after: &[(String, i64)]) {
        self.certificate_not_after.clear();
        for (sni, t) in not_after {
            self.certificate_not_after.get_or_create(&SniLabel { sni: sni.clone() }).set(*t);
        }
    }
}

/// The classic Prometheus text format (version 0.0.4) of an OpenMetrics exposition, for
/// clients that do not ask for OpenMetrics: a counter's HELP and TYPE name its `_total`
/// samples, and there is no `# UNIT` or `# EOF` line.
pub fn classic_text(open_metrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = open_metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len());
    for line in open_metrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "].into_iter().find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) { "_total" } else { "" };
                out.push_str(&format!("{prefix}{name}{suffix} {tail}\n"));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_classic_format_names_counters_by_their_samples() {
        let m = Metrics::new(Counter::default());
        m.set_certificates(&[("relay.example.com".into(), 1_800_000_000)]);
        let open = m.encode();
        assert!(open.contains("# TYPE sigrelay_messages counter\n") && open.ends_with("# EOF\n"), "{open}");
        let classic = classic_text(&open);
        assert!(classic.contains("# HELP sigrelay_messages_total Data messages relayed"), "{classic}");
        // Samples within a family come in hash order.
        assert!(classic.contains("# TYPE sigrelay_messages_total counter\nsigrelay_messages_total{direction="), "{classic}");
        assert!(classic.contains("\nsigrelay_messages_total{direction=\"up\"} 0\n"), "{classic}");
        assert!(classic.contains("# TYPE sigrelay_max_connections gauge\n"), "{classic}");
        assert!(classic.contains("# TYPE sigrelay_certificate_not_after_timestamp_seconds gauge\n"), "{classic}");
        assert!(classic.contains("sigrelay_certificate_not_after_timestamp_seconds{sni=\"relay.example.com\"} 1800000000\n"), "{classic}");
        assert!(!classic.contains("# EOF") && !classic.contains("# UNIT"), "{classic}");
    }
}
