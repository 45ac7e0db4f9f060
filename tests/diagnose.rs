//! `sigrelay diagnose` against a reachable and an unreachable gateway, with tokens.

mod support;

use std::process::Command;

use sigrelay::tools::mock_gateway::Mode;
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_sigrelay");

fn config(pki: &Pki, resolve_to: std::net::SocketAddr) -> std::path::PathBuf {
    let file = pki.dir.path().join(format!("diag-{}.toml", resolve_to.port()));
    let text = format!(
        "[server]\ncert = {:?}\nkey = {:?}\n[upstream]\nca_file = {:?}\nsystem_dns = false\nconnect_timeout = \"1s\"\n{}",
        pki.relay_cert,
        pki.relay_key,
        pki.ca_file,
        resolve_all_to(resolve_to)
    );
    std::fs::write(&file, text).unwrap();
    file
}

fn diagnose(file: &std::path::Path, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(BIN).arg("diagnose").arg("--config").arg(file).args(args).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

#[test]
fn probes_every_gateway_and_decodes_the_token() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pki = Pki::new();
    let gw = rt.block_on(Gateway::start(&pki, Mode::Echo));
    let file = config(&pki, gw.addr);

    let (code, text) = diagnose(&file, &["--token", &token("au1_valid_until_2100")]);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(text.lines().filter(|l| l.trim_end().ends_with(" ok")).count(), 21, "2 routes x 10 regions, and TURN:\n{text}");
    assert!(text.lines().any(|l| l.starts_with("turn ") && l.trim_end().ends_with(" ok")), "the TURN upstream answered a STUN Binding request:\n{text}");
    assert!(text.contains("identity   alice") && text.contains("room       room13"), "{text}");
    assert!(text.contains("gateway    wss://au1.vss.twilio.com/signaling"), "{text}");
    assert!(text.contains("all checks passed"));

    let (code, json) = diagnose(&file, &["--json", "--route", "insights", "--region", "us1"]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let probe = &v["probes"][0];
    assert_eq!((probe["url"].as_str(), probe["ok"].as_bool()), (Some("wss://sdkgw.us1.twilio.com/v1/VideoEvents"), Some(true)));
    for phase in ["dns_ms", "connect_ms", "tls_ms", "websocket_ms"] {
        assert!(probe[phase].as_f64().is_some(), "{phase}: {probe}");
    }

    let (code, text) = diagnose(&file, &["--route", "signaling", "--region", "au1", "--token", &token("au1_expired_2020")]);
    assert_eq!(code, Some(1), "an expired token is a failed check: {text}");
    assert!(text.contains("EXPIRED"), "{text}");

    let (code, text) = diagnose(&file, &["--route", "signaling", "--region", "au1", "--token", "not.a.token"]);
    assert_eq!(code, Some(1));
    assert!(text.contains("UNREADABLE"), "{text}");

    let (code, text) = diagnose(&file, &["--region", "xx9"]);
    assert_eq!(code, Some(2), "{text}");
}

#[test]
fn an_unreachable_gateway_fails_with_its_phase_and_outcome() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pki = Pki::new();
    let closed = rt.block_on(closed_port());
    let file = config(&pki, closed);
    let (code, text) = diagnose(&file, &["--route", "signaling", "--region", "au1"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("FAIL upstream_connect_error"), "{text}");
    assert!(text.contains("some checks FAILED"));
}

/// A token given as `-` is read from stdin, or taken from SIGRELAY_TOKEN: never on the command
/// line, where the process list and shell history would keep it.
#[test]
fn the_token_comes_from_stdin_or_the_environment() {
    use std::io::Write;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pki = Pki::new();
    let gw = rt.block_on(Gateway::start(&pki, Mode::Echo));
    let file = config(&pki, gw.addr);
    let args = ["diagnose", "--config", file.to_str().unwrap(), "--route", "signaling", "--region", "au1"];

    let mut child = Command::new(BIN)
        .args(args)
        .args(["--token", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{}", token("au1_valid_until_2100")).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("identity   alice"), "{text}");

    let out = Command::new(BIN).args(args).env("SIGRELAY_TOKEN", token("au1_expired_2020")).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "an expired token fails the diagnosis: {text}");
    assert!(text.contains("EXPIRED"), "{text}");
}
