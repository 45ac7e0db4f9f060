//! The Kubernetes manifests in config/kubernetes/: schema-valid (strict, offline) per
//! tests/kubernetes/validate.sh, and a termination grace period long enough for the drain.
//! tests/run.sh installs kubernetes-validate; under CI=true a missing one fails the schema test
//! instead of skipping it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The margin the grace period keeps after preStop + drain_timeout, for the 1012 closes.
const CLOSE_GRACE_SECS: u64 = 10;
/// sigrelay's `[server] drain_timeout` when the config does not set it (README, "Configuration").
const DEFAULT_DRAIN_TIMEOUT: &str = "30s";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn kubernetes_validate_ready() -> bool {
    let ok = Command::new("kubernetes-validate").arg("--version").output().is_ok_and(|o| o.status.success());
    if !ok {
        let why = "the Kubernetes manifest test needs kubernetes-validate on PATH: run tests/run.sh";
        if std::env::var_os("CI").is_some() {
            panic!("{why}");
        }
        eprintln!("SKIPPED: {why}");
    }
    ok
}

#[test]
fn manifests_validate_against_kubernetes_schemas() {
    if !kubernetes_validate_ready() {
        return;
    }
    let out = Command::new("bash")
        .arg("tests/kubernetes/validate.sh")
        .current_dir(root())
        .output()
        .expect("running bash tests/kubernetes/validate.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "tests/kubernetes/validate.sh failed ({}):\n{stdout}{stderr}",
        out.status
    );
}

/// Every YAML document under config/kubernetes/, with the file it came from.
fn documents() -> Vec<(PathBuf, String)> {
    let dir = root().join("config/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let mut doc = String::new();
        for line in text.lines() {
            if line.trim_end() == "---" {
                docs.push((file.clone(), std::mem::take(&mut doc)));
            } else {
                doc.push_str(line);
                doc.push('\n');
            }
        }
        docs.push((file, doc));
    }
    docs
}

/// The one document whose top-level `kind:` is `kind`.
fn document(kind: &str) -> (PathBuf, String) {
    let found: Vec<_> =
        documents().into_iter().filter(|(_, doc)| doc.lines().any(|l| l.trim_end() == format!("kind: {kind}"))).collect();
    assert_eq!(found.len(), 1, "expected exactly one {kind} in config/kubernetes/, found {}", found.len());
    found.into_iter().next().unwrap()
}

/// The value of `key:` on the first non-comment line at or after `from` whose trimmed text starts
/// with it, and that line's index.
fn yaml_value(doc: &str, key: &str, from: usize) -> Option<(usize, String)> {
    let prefix = format!("{key}:");
    doc.lines().enumerate().skip(from).find_map(|(i, line)| {
        let line = line.split(" #").next().unwrap().trim();
        let line = line.strip_prefix("- ").unwrap_or(line);
        line.strip_prefix(&prefix).map(|v| (i, v.trim().trim_matches('"').to_string()))
    })
}

fn secs(what: &str, raw: &str) -> u64 {
    raw.parse().unwrap_or_else(|e| panic!("{what}: {raw:?} is not a whole number of seconds: {e}"))
}

#[test]
fn termination_grace_covers_prestop_and_drain() {
    let (deploy_file, deploy) = document("Deployment");
    let (grace_line, grace) = yaml_value(&deploy, "terminationGracePeriodSeconds", 0)
        .unwrap_or_else(|| panic!("{}: no terminationGracePeriodSeconds", deploy_file.display()));
    let grace = secs("terminationGracePeriodSeconds", &grace);
    assert!(
        yaml_value(&deploy, "terminationGracePeriodSeconds", grace_line + 1).is_none(),
        "{}: more than one terminationGracePeriodSeconds",
        deploy_file.display()
    );

    // lifecycle.preStop.sleep.seconds (absent: no preStop delay).
    let pre_stop = match yaml_value(&deploy, "preStop", 0) {
        None => 0,
        Some((at, _)) => {
            let (sleep_at, _) = yaml_value(&deploy, "sleep", at + 1)
                .unwrap_or_else(|| panic!("{}: preStop without a sleep", deploy_file.display()));
            let (_, seconds) = yaml_value(&deploy, "seconds", sleep_at + 1)
                .unwrap_or_else(|| panic!("{}: preStop sleep without seconds", deploy_file.display()));
            secs("preStop.sleep.seconds", &seconds)
        }
    };

    // [server] drain_timeout in the ConfigMap's sigrelay.toml.
    let (config_file, config) = document("ConfigMap");
    let mut section = String::new();
    let mut drain = None;
    for line in config.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            section = line.to_string();
        } else if let Some(rest) = line.strip_prefix("drain_timeout") {
            if section == "[server]" {
                let value = rest.trim_start().strip_prefix('=').expect("drain_timeout = \"...\"");
                let value = value.split('#').next().unwrap().trim().trim_matches('"').to_string();
                assert!(drain.replace(value).is_none(), "{}: drain_timeout set twice", config_file.display());
            }
        }
    }
    let drain = drain.unwrap_or_else(|| DEFAULT_DRAIN_TIMEOUT.to_string());
    let drain: Duration = humantime::parse_duration(&drain)
        .unwrap_or_else(|e| panic!("{}: drain_timeout {drain:?}: {e}", config_file.display()));
    let drain = drain.as_secs() + u64::from(drain.subsec_nanos() > 0);

    let needed = pre_stop + drain + CLOSE_GRACE_SECS;
    assert!(
        grace >= needed,
        "{}: terminationGracePeriodSeconds {grace} < preStop sleep {pre_stop} + drain_timeout {drain} (in {}) + \
         {CLOSE_GRACE_SECS} for the 1012 closes = {needed}: pods would be killed mid-drain",
        deploy_file.display(),
        config_file.display()
    );
    eprintln!("grace {grace}s >= preStop {pre_stop}s + drain {drain}s + {CLOSE_GRACE_SECS}s");
}
