//! websocat 1.x, the tool operators load-test with, through sigrelay to the mock gateway in echo
//! mode. tests/run.sh installs it (`cargo install --locked websocat`); under CI=true a missing
//! websocat fails the test instead of skipping it.

mod support;

use std::process::Stdio;
use std::time::Duration;

use sigrelay::tools::mock_gateway::Mode;
use support::*;
use tokio::io::AsyncWriteExt;

fn websocat_ready() -> bool {
    let ok = std::process::Command::new("websocat")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).starts_with("websocat 1."));
    if !ok {
        let why = "the websocat test needs websocat 1.x on PATH: run tests/run.sh";
        if std::env::var_os("CI").is_some() {
            panic!("{why}");
        }
        eprintln!("SKIPPED: {why}");
    }
    ok
}

/// Runs websocat in line mode, feeding `input`, and returns what it printed.
async fn websocat(pki: &Pki, url: &str, input: &str) -> String {
    let mut child = tokio::process::Command::new("websocat")
        .args(["--text", url])
        // websocat 1.x verifies with OpenSSL, which reads the trust store from here.
        .env("SSL_CERT_FILE", &pki.ca_file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("websocat runs");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await.unwrap().unwrap();
    assert!(out.status.success(), "websocat failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn websocat_lines_come_back_through_the_relay() {
    if !websocat_ready() {
        return;
    }
    let pki = Pki::new();
    let mut gw = Gateway::start(&pki, Mode::Echo).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "").await;
    let url = format!("wss://localhost:{}/au1/signaling", relay.addr.port());
    let input: String = (0..100).map(|i| format!("line {i}\n")).collect();
    assert_eq!(websocat(&pki, &url, &input).await, input);

    assert_eq!(gw.event("connection").await["host"], "au1.vss.twilio.com");
    let r = relay.record("handshake").await;
    assert_eq!((r["outcome"].as_str(), r["region"].as_str()), (Some("ok"), Some("au1")));
    let c = relay.record("close").await;
    assert_eq!((c["msgs_up"].as_u64(), c["msgs_down"].as_u64()), (Some(100), Some(100)));
    assert_eq!(c["closed_by"], "client");

    // The same through the query form, and a few connections at once as a load test would.
    let url = format!("wss://localhost:{}/signaling?region=de1", relay.addr.port());
    let runs: Vec<_> = (0..8).map(|i| {
        let (pki, url) = (&pki, url.clone());
        async move { websocat(pki, &url, &format!("conn {i}\n")).await }
    }).collect();
    let outputs = futures_util::future::join_all(runs).await;
    for (i, out) in outputs.iter().enumerate() {
        assert_eq!(out, &format!("conn {i}\n"));
    }
    for _ in 0..8 {
        let r = relay.record("handshake").await;
        assert_eq!((r["region"].as_str(), r["region_source"].as_str()), (Some("de1"), Some("query")));
    }
}
