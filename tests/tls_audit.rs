//! The listener's TLS against Mozilla's "intermediate" profile, checked by sslyze (from PyPI,
//! installed by tests/run.sh), with a test chain of root, intermediate and a leaf valid for
//! 300 days. Under CI=true a missing sslyze fails the test instead of skipping it.

mod support;

use std::process::Command;

use serde_json::Value;
use sigrelay::tools::pki::TestCa;
use support::*;

fn sslyze() -> Option<String> {
    let found = Command::new("sslyze").arg("--help").output().is_ok_and(|o| o.status.success());
    if !found {
        let why = "the TLS audit needs sslyze on PATH: run tests/run.sh";
        if std::env::var_os("CI").is_some() {
            panic!("{why}");
        }
        eprintln!("SKIPPED: {why}");
        return None;
    }
    Some("sslyze".into())
}

#[tokio::test]
async fn listener_meets_mozilla_intermediate_and_serves_the_full_chain() {
    let Some(sslyze) = sslyze() else { return };
    let dir = tempfile::tempdir().unwrap();
    let root = TestCa::new("audit root CA").unwrap();
    let intermediate = root.intermediate("audit intermediate CA").unwrap();
    let leaf = intermediate.leaf_for_days(&["localhost".into(), "127.0.0.1".into()], 300).unwrap();
    let (chain, key, root_pem) = (dir.path().join("chain.pem"), dir.path().join("key.pem"), dir.path().join("root.pem"));
    std::fs::write(&chain, format!("{}{}", leaf.cert_pem, intermediate.cert_pem)).unwrap();
    std::fs::write(&key, &leaf.key_pem).unwrap();
    std::fs::write(&root_pem, &root.cert_pem).unwrap();
    let config = format!("[server]\ncert = {chain:?}\nkey = {key:?}\n[admin]\nlisten = \"off\"\n");
    let relay = Relay::start_config(sigrelay::Config::parse(&config, "audit.toml").unwrap()).await;

    let out = dir.path().join("sslyze.json");
    let target = format!("localhost:{}{{127.0.0.1}}", relay.addr.port());
    let run = tokio::task::spawn_blocking({
        let (out, root_pem) = (out.clone(), root_pem.clone());
        move || {
            Command::new(sslyze)
                .args(["--mozilla_config=intermediate", "--certinfo_ca_file"])
                .arg(&root_pem)
                .arg("--json_out")
                .arg(&out)
                .arg(&target)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "sslyze says the listener is not Mozilla intermediate compliant:\n{stdout}");
    assert!(stdout.contains("OK - Compliant"), "{stdout}");

    let report: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let result = &report["server_scan_results"][0]["scan_result"];
    for old in ["ssl_2_0_cipher_suites", "ssl_3_0_cipher_suites", "tls_1_0_cipher_suites", "tls_1_1_cipher_suites"] {
        let accepted = &result[old]["result"]["accepted_cipher_suites"];
        assert_eq!(accepted.as_array().map(Vec::len), Some(0), "{old} must be refused: {accepted}");
    }
    for modern in ["tls_1_2_cipher_suites", "tls_1_3_cipher_suites"] {
        let accepted = result[modern]["result"]["accepted_cipher_suites"].as_array().unwrap();
        assert!(!accepted.is_empty(), "{modern} accepted");
        for suite in accepted {
            let name = suite["cipher_suite"]["name"].as_str().unwrap();
            assert!(name.contains("GCM") || name.contains("CHACHA20"), "weak suite {name}");
        }
    }
    let deployment = &result["certificate_info"]["result"]["certificate_deployments"][0];
    let chain = deployment["received_certificate_chain"].as_array().unwrap();
    assert_eq!(chain.len(), 2, "leaf and intermediate are served");
    assert_eq!(deployment["verified_chain_has_sha1_signature"], false);
}
