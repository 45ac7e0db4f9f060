//! `sigrelay report`: a summary of handshake and close records, per route and region.
//!
//! Reads JSON lines (files or stdin); lines that are not records are counted, not fatal.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// `sigrelay report`'s arguments.
#[derive(clap::Args)]
pub struct Args {
    /// Record files (JSON lines); none, or `-`, reads stdin.
    files: Vec<PathBuf>,
    /// Only records at or after this RFC 3339 time, or this long ago (e.g. `1h`).
    #[arg(long, value_parser = parse_since)]
    since: Option<SystemTime>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `sigrelay report`.
pub fn main(args: Args) -> ExitCode {
    super::exit("report", report(args).map(|()| true))
}

fn report(args: Args) -> anyhow::Result<()> {
    let mut builder = Builder::new(args.since);
    if args.files.is_empty() || args.files.iter().any(|f| f.as_os_str() == "-") {
        builder.read(std::io::stdin().lock()).context("reading stdin")?;
    }
    for file in args.files.iter().filter(|f| f.as_os_str() != "-") {
        let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
        builder.read(BufReader::with_capacity(1 << 20, f)).with_context(|| format!("reading {}", file.display()))?;
    }
    let report = builder.finish();
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.text());
    }
    Ok(())
}

/// The handshake phase times a report gives percentiles for.
const PHASES: [&str; 6] = ["tls_ms", "upstream_dns_ms", "upstream_connect_ms", "upstream_tls_ms", "upstream_ws_ms", "total_ms"];

/// Close outcomes that are somebody deciding to end, not something breaking.
const ORDERLY: [&str; 5] = ["client_closed", "upstream_closed", "shutdown", "idle_timeout", "closed_by_operator"];

#[derive(Deserialize)]
struct Line<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow, default)]
    ts: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    conn_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    route: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    region: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    outcome: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    error: Option<Cow<'a, str>>,
    #[serde(default)]
    close_code: Option<u16>,
    #[serde(default)]
    tls_ms: Option<f64>,
    #[serde(default)]
    upstream_dns_ms: Option<f64>,
    #[serde(default)]
    upstream_connect_ms: Option<f64>,
    #[serde(default)]
    upstream_tls_ms: Option<f64>,
    #[serde(default)]
    upstream_ws_ms: Option<f64>,
    #[serde(default)]
    total_ms: Option<f64>,
}

/// p50, p95 and p99 of one phase, in ms.
#[derive(Debug, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

/// One route and region.
#[derive(Debug, Default, Serialize)]
pub struct Group {
    pub route: String,
    pub region: String,
    pub handshakes: u64,
    pub outcomes: BTreeMap<String, u64>,
    pub closes: u64,
    pub close_outcomes: BTreeMap<String, u64>,
    pub close_codes: BTreeMap<String, u64>,
    pub phases: BTreeMap<String, Percentiles>,
    #[serde(skip)]
    samples: BTreeMap<&'static str, Vec<f64>>,
}

/// A connection that ended abnormally.
#[derive(Debug, Serialize)]
pub struct Abnormal {
    pub conn_id: String,
    pub ts: String,
    pub route: String,
    pub region: String,
    pub outcome: String,
    pub close_code: Option<u16>,
}

/// The summary.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub lines: u64,
    pub records: u64,
    pub malformed: u64,
    pub skipped_before_since: u64,
    pub groups: Vec<Group>,
    /// The most frequent error reasons, most frequent first.
    pub top_errors: Vec<(String, u64)>,
    pub abnormal_total: u64,
    /// The most recent abnormal endings (at most 50).
    pub abnormal: Vec<Abnormal>,
}

/// Builds a report from lines of records; `since` drops records stamped before it.
#[derive(Default)]
pub struct Builder {
    since: Option<SystemTime>,
    lines: u64,
    records: u64,
    malformed: u64,
    skipped: u64,
    groups: HashMap<(String, String), Group>,
    errors: HashMap<String, u64>,
    abnormal_total: u64,
    abnormal: std::collections::VecDeque<Abnormal>,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// An error reason without its variable parts (addresses, ids), so like errors count together.
fn error_kind(error: &str) -> String {
    let mut out = String::with_capacity(error.len().min(120));
    for word in error.split_whitespace().take(16) {
        let variable = word.chars().any(|c| c.is_ascii_digit()) && word.chars().any(|c| c == '.' || c == ':');
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(if variable { "…" } else { word });
    }
    out
}

impl Builder {
    /// A builder that keeps records stamped at or after `since`.
    pub fn new(since: Option<SystemTime>) -> Builder {
        Builder { since, ..Default::default() }
    }

    /// Reads every line of `input`.
    pub fn read(&mut self, input: impl BufRead) -> std::io::Result<()> {
        for line in input.split(b'\n') {
            self.line(&line?);
        }
        Ok(())
    }

    /// Adds one line.
    pub fn line(&mut self, bytes: &[u8]) {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        self.lines += 1;
        let Ok(line) = serde_json::from_slice::<Line>(bytes) else {
            self.malformed += 1;
            return;
        };
        if line.event != "handshake" && line.event != "close" {
            self.malformed += 1;
            return;
        }
        if let Some(since) = self.since {
            let at = line.ts.as_deref().and_then(|t| humantime::parse_rfc3339_weak(t).ok());
            if at.is_some_and(|at| at < since) {
                self.skipped += 1;
                return;
            }
        }
        self.records += 1;
        let route = line.route.as_deref().unwrap_or("-").to_string();
        let region = line.region.as_deref().unwrap_or("-").to_string();
        let outcome = line.outcome.as_deref().unwrap_or("-");
        let group = self.groups.entry((route.clone(), region.clone())).or_insert_with(|| Group {
            route: route.clone(),
            region: region.clone(),
            ..Default::default()
        });
        if line.event == "handshake" {
            group.handshakes += 1;
            *group.outcomes.entry(outcome.to_string()).or_insert(0) += 1;
            let times = [line.tls_ms, line.upstream_dns_ms, line.upstream_connect_ms, line.upstream_tls_ms, line.upstream_ws_ms, line.total_ms];
            for (phase, ms) in PHASES.iter().zip(times) {
                if let Some(ms) = ms {
                    group.samples.entry(phase).or_default().push(ms);
                }
            }
            if let Some(e) = line.error.as_deref() {
                *self.errors.entry(format!("{outcome}: {}", error_kind(e))).or_insert(0) += 1;
            }
            return;
        }
        group.closes += 1;
        *group.close_outcomes.entry(outcome.to_string()).or_insert(0) += 1;
        let code = line.close_code.map(|c| c.to_string()).unwrap_or_else(|| "none".into());
        *group.close_codes.entry(code).or_insert(0) += 1;
        let orderly = ORDERLY.contains(&outcome) && line.close_code.is_none_or(|c| c == 1000 || c == 1001 || c == 1012);
        if !orderly {
            self.abnormal_total += 1;
            if self.abnormal.len() == 50 {
                self.abnormal.pop_front();
            }
            self.abnormal.push_back(Abnormal {
                conn_id: line.conn_id.as_deref().unwrap_or("-").to_string(),
                ts: line.ts.as_deref().unwrap_or("-").to_string(),
                route,
                region,
                outcome: outcome.to_string(),
                close_code: line.close_code,
            });
        }
    }

    /// The finished report.
    pub fn finish(self) -> Report {
        let mut groups: Vec<Group> = self.groups.into_values().collect();
        groups.sort_by(|a, b| (&a.route, &a.region).cmp(&(&b.route, &b.region)));
        for g in &mut groups {
            for (phase, mut values) in std::mem::take(&mut g.samples) {
                values.sort_by(f64::total_cmp);
                let p = Percentiles {
                    count: values.len(),
                    p50: percentile(&values, 0.50),
                    p95: percentile(&values, 0.95),
                    p99: percentile(&values, 0.99),
                };
                g.phases.insert(phase.to_string(), p);
            }
        }
        let mut top_errors: Vec<(String, u64)> = self.errors.into_iter().collect();
        top_errors.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        top_errors.truncate(10);
        Report {
            lines: self.lines,
            records: self.records,
            malformed: self.malformed,
            skipped_before_since: self.skipped,
            groups,
            top_errors,
            abnormal_total: self.abnormal_total,
            abnormal: self.abnormal.into(),
        }
    }
}

impl Report {
    /// The report as text for a terminal.
    pub fn text(&self) -> String {
        let mut out = format!(
            "{} lines, {} records, {} malformed{}\n",
            self.lines,
            self.records,
            self.malformed,
            if self.skipped_before_since > 0 { format!(", {} before --since", self.skipped_before_since) } else { String::new() }
        );
        let counts = |m: &BTreeMap<String, u64>| m.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ");
        for g in &self.groups {
            out += &format!("\nroute {}  region {}: {} handshakes, {} closes\n", g.route, g.region, g.handshakes, g.closes);
            if !g.outcomes.is_empty() {
                out += &format!("  outcomes       {}\n", counts(&g.outcomes));
            }
            for phase in PHASES {
                if let Some(p) = g.phases.get(phase) {
                    out += &format!("  {phase:<20} p50 {:>9.3}  p95 {:>9.3}  p99 {:>9.3} ms  (n={})\n", p.p50, p.p95, p.p99, p.count);
                }
            }
            if !g.close_outcomes.is_empty() {
                out += &format!("  close outcomes {}\n", counts(&g.close_outcomes));
                out += &format!("  close codes    {}\n", counts(&g.close_codes));
            }
        }
        if !self.top_errors.is_empty() {
            out += "\nmost frequent errors\n";
            for (e, n) in &self.top_errors {
                out += &format!("  {n:>8}  {e}\n");
            }
        }
        out += &format!("\nconnections that ended abnormally: {}\n", self.abnormal_total);
        for a in &self.abnormal {
            let code = a.close_code.map(|c| c.to_string()).unwrap_or_else(|| "-".into());
            out += &format!("  {}  {}  {} {}  {}  code {code}\n", a.ts, a.conn_id, a.route, a.region, a.outcome);
        }
        out
    }
}

/// `--since`: an RFC 3339 time, or a duration back from now such as `1h` or `30m`.
pub fn parse_since(s: &str) -> Result<SystemTime, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t);
    }
    let d = humantime::parse_duration(s).map_err(|_| format!("{s:?} is neither an RFC 3339 time nor a duration like 1h"))?;
    SystemTime::now().checked_sub(d).ok_or_else(|| format!("{s:?} reaches before the epoch"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarizes_counts_percentiles_and_abnormal_endings() {
        let mut b = Builder::new(None);
        for i in 1..=100 {
            let line = format!(r#"{{"ts":"2026-11-24T03:00:00.000Z","event":"handshake","conn_id":"C{i}","route":"signaling","region":"au1","outcome":"ok","total_ms":{i}.0}}"#);
            b.line(line.as_bytes());
        }
        b.line(br#"{"event":"handshake","route":"signaling","region":"au1","outcome":"upstream_connect_error","error":"connect: 10.0.0.1:443: Connection refused"}"#);
        b.line(br#"{"event":"handshake","route":"signaling","region":"au1","outcome":"upstream_connect_error","error":"connect: 10.0.0.2:443: Connection refused"}"#);
        b.line(br#"{"event":"close","conn_id":"C1","route":"signaling","region":"au1","outcome":"client_closed","close_code":1000}"#);
        b.line(br#"{"event":"close","conn_id":"C2","route":"signaling","region":"au1","outcome":"upstream_gone","close_code":1014}"#);
        b.line(br#"{"event":"close","conn_id":"C3","route":"signaling","region":"au1","outcome":"client_closed","close_code":3001}"#);
        b.line(b"not json");
        b.line(br#"{"event":"something else"}"#);
        b.line(b"");
        let r = b.finish();
        assert_eq!((r.lines, r.records, r.malformed), (107, 105, 2));
        let g = &r.groups[0];
        assert_eq!((g.handshakes, g.closes), (102, 3));
        assert_eq!(g.outcomes["ok"], 100);
        assert_eq!(g.phases["total_ms"], Percentiles { count: 100, p50: 50.0, p95: 95.0, p99: 99.0 });
        assert_eq!(r.top_errors, vec![("upstream_connect_error: connect: … Connection refused".to_string(), 2)]);
        assert_eq!(r.abnormal_total, 2);
        assert_eq!(r.abnormal.iter().map(|a| a.conn_id.as_str()).collect::<Vec<_>>(), ["C2", "C3"]);
        assert!(r.text().contains("route signaling  region au1: 102 handshakes, 3 closes"));
    }

    #[test]
    fn since_drops_older_records() {
        let since = parse_since("2026-11-24T03:00:00Z").unwrap();
        let mut b = Builder::new(Some(since));
        b.line(br#"{"ts":"2026-11-24T02:59:59.000Z","event":"handshake","outcome":"ok"}"#);
        b.line(br#"{"ts":"2026-11-24T03:00:01.000Z","event":"handshake","outcome":"ok"}"#);
        let r = b.finish();
        assert_eq!((r.records, r.skipped_before_since), (1, 1));
        assert!(parse_since("1h").is_ok());
        assert!(parse_since("yesterday").is_err());
    }
}
