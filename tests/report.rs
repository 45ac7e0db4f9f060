//! `sigrelay report` on a recorded file (with malformed lines, which are counted, not fatal),
//! on stdin, as JSON, and with `--since`.

use std::process::Command;

mod support;

const BIN: &str = env!("CARGO_BIN_EXE_sigrelay");

const RECORDS: &str = r#"{"ts":"2026-11-24T03:00:00.000Z","event":"handshake","conn_id":"A","route":"signaling","region":"au1","outcome":"ok","tls_ms":1.5,"total_ms":4.0}
{"ts":"2026-11-24T03:00:01.000Z","event":"handshake","conn_id":"B","route":"signaling","region":"au1","outcome":"ok","tls_ms":2.5,"total_ms":6.0}
this line is not a record
{"ts":"2026-11-24T03:00:02.000Z","event":"handshake","conn_id":"C","route":"signaling","region":"de1","outcome":"upstream_timeout","error":"timeout in the tls phase after 4s","total_ms":4000.0}
{"ts":"2026-11-24T03:00:03.000Z","event":"handshake","conn_id":"D","client_addr":"127.0.0.1:1","outcome":"client_tls_error","error":"received corrupt message"}
{"ts":"2026-11-24T03:05:00.000Z","event":"close","conn_id":"A","route":"signaling","region":"au1","outcome":"client_closed","close_code":1000}
{"ts":"2026-11-24T03:06:00.000Z","event":"close","conn_id":"B","route":"signaling","region":"au1","outcome":"upstream_gone","close_code":1014}
{"truncated": 
"#;

fn run(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let out = support::output_with_stdin(Command::new(BIN).arg("report").args(args), stdin.unwrap_or(""));
    (out.status.success(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

#[test]
fn summarizes_a_recorded_file_counting_malformed_lines() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("records.jsonl");
    std::fs::write(&file, RECORDS).unwrap();
    let (ok, text, err) = run(&[file.to_str().unwrap()], None);
    assert!(ok, "{err}");
    assert!(text.starts_with("8 lines, 6 records, 2 malformed"), "{text}");
    assert!(text.contains("route signaling  region au1: 2 handshakes, 2 closes"), "{text}");
    assert!(text.contains("outcomes       ok 2"), "{text}");
    assert!(text.contains("route signaling  region de1: 1 handshakes, 0 closes"), "{text}");
    assert!(text.contains("upstream_timeout: timeout in the tls phase after 4s"), "{text}");
    assert!(text.contains("client_tls_error: received corrupt message"), "{text}");
    assert!(text.contains("connections that ended abnormally: 1"), "{text}");
    assert!(text.contains("B  signaling au1  upstream_gone  code 1014"), "{text}");

    let (ok, json, _) = run(&["--json", "-"], Some(RECORDS));
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!((v["records"].as_u64(), v["malformed"].as_u64()), (Some(6), Some(2)));
    let au1 = v["groups"].as_array().unwrap().iter().find(|g| g["region"] == "au1").unwrap();
    assert_eq!(au1["phases"]["tls_ms"]["p50"], 1.5);
    assert_eq!(au1["phases"]["tls_ms"]["p99"], 2.5);
    assert_eq!(au1["close_codes"]["1014"], 1);

    let (ok, json, _) = run(&["--json", "--since", "2026-11-24T03:00:02Z"], Some(RECORDS));
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!((v["records"].as_u64(), v["skipped_before_since"].as_u64()), (Some(4), Some(2)));

    let (ok, _, err) = run(&["/does/not/exist.jsonl"], None);
    assert!(!ok && err.contains("/does/not/exist.jsonl"), "{err}");
}
