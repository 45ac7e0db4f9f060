//! RFC 6455 conformance under the Autobahn|Testsuite fuzzing client (../shared/tools/autobahn,
//! installed by tests/run.sh): cases 1–7 and 10 through sigrelay to `mock-gateway --mode echo`,
//! and, for comparison, straight against the same echo.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use sigrelay::tools::mock_gateway::Mode;
use support::*;

fn tools() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/tools/autobahn"))
}

/// Whether wstest is installed; in CI its absence is a failure.
fn autobahn_ready() -> bool {
    let ready = std::path::Path::new("/opt/autobahn/venv/bin/wstest").exists() && tools().join("run.sh").exists();
    tool_ready(ready, "the Autobahn test needs wstest (../shared/tools/autobahn/setup.sh): run tests/run.sh")
}

/// Each case's behaviour in a finished run's report.
fn behaviours(out: &std::path::Path) -> BTreeMap<String, String> {
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("index.json")).unwrap()).unwrap();
    let (_, cases) = index.as_object().unwrap().iter().next().unwrap();
    cases.as_object().unwrap().iter().map(|(id, c)| (id.clone(), c["behavior"].as_str().unwrap().to_string())).collect()
}

/// Runs the default selection (every case but 9.*, 12.*, 13.*) against `url`; returns the counts
/// from run.sh's summary line, and the ids of the cases that did not pass (from stderr).
async fn run_suite(url: String, out: &std::path::Path) -> (BTreeMap<String, u32>, String) {
    let run = tools().join("run.sh");
    let (out, target) = (out.to_path_buf(), url.clone());
    let output = tokio::task::spawn_blocking(move || {
        Command::new("bash").arg(run).arg(&target).env("AUTOBAHN_OUTDIR", out).env("AUTOBAHN_TIMEOUT", "600").output().unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let line = stdout.lines().find(|l| l.starts_with("autobahn: ")).unwrap_or_else(|| panic!("no summary line:\n{stdout}\n{stderr}"));
    assert!(!line.contains("ERROR"), "{line}\n{stderr}");
    println!("{url}: {line}");
    let counts = line["autobahn: ".len()..]
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.parse().unwrap()))
        .collect();
    (counts, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autobahn_cases_1_to_7_and_10_pass_through_the_relay() {
    if !autobahn_ready() {
        return;
    }
    let pki = Pki::new();
    let gw = Gateway::start(&pki, Mode::Echo).await;
    let relay = Relay::to_gateway(&pki, &gw, "").await;
    let reports = tempfile::tempdir().unwrap();

    let (direct, _) = run_suite(format!("wss://127.0.0.1:{}/", gw.addr.port()), &reports.path().join("direct")).await;
    let (through, why) = run_suite(format!("wss://127.0.0.1:{}/au1/signaling", relay.addr.port()), &reports.path().join("relay")).await;
    let n = |counts: &BTreeMap<String, u32>, k: &str| counts.get(k).copied().unwrap_or(0);
    let total: u32 = through.values().sum();
    assert_eq!(total, 247, "every selected case ran: {through:?}");
    assert_eq!(n(&through, "FAILED"), 0, "{through:?}\n{why}");
    assert_eq!(n(&through, "MISSING") + n(&through, "OTHER"), 0, "{through:?}\n{why}");
    // A byte pipe (nginx) in front of the same echo gets 242 OK; the relay must do no worse.
    assert!(n(&through, "OK") >= 242, "{through:?}\n{why}");
    // The echo itself must answer invalid UTF-8 with 1007 and the like, not drop the socket.
    assert_eq!(n(&direct, "FAILED"), 0, "mock-gateway --mode echo: {direct:?}");
    // Where the echo checks UTF-8 only frame by frame (NON-STRICT on the fail-fast cases), the
    // relay, which checks byte by byte, fails the sender in time itself.
    let (echo, relayed) = (behaviours(&reports.path().join("direct")), behaviours(&reports.path().join("relay")));
    let slow: Vec<&String> = echo.iter().filter(|(_, b)| *b == "NON-STRICT").map(|(id, _)| id).collect();
    for id in &slow {
        assert_eq!(relayed[*id], "OK", "case {id} through the relay");
    }
    println!("fail-fast cases the echo alone is late on, and the relay is not: {slow:?}");
    let not_ok: Vec<(&String, &String)> = relayed.iter().filter(|(_, b)| *b != "OK").collect();
    println!("through the relay, not OK: {not_ok:?}");
}
