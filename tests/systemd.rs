//! config/systemd/sigrelay.service as systemd reads it: `systemd-analyze verify` on a copy whose
//! ExecStart is the binary just built, the exposure score of `systemd-analyze security`, and the
//! settings the README promises (capabilities, stop timeout against the drain, descriptors for
//! the connection target). tests/run.sh needs nothing extra for it (systemd ships
//! systemd-analyze); under CI=true a missing systemd-analyze fails the test instead of skipping.
//! That sigrelay sends READY=1, RELOADING=1 and STOPPING=1 is tests/cli.rs's.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/systemd/sigrelay.service");
const BIN: &str = env!("CARGO_BIN_EXE_sigrelay");

/// The exposure score the README states, and the systemd it was measured with (Debian 12's).
/// Under that systemd the test fails when the unit's score moves from it; other versions weigh
/// the settings differently, so there only the `< 2.0` gate applies.
const README_SCORE: &str = "1.5";
const README_SYSTEMD: &str = "252";

fn analyze_ready() -> bool {
    let found = Command::new("systemd-analyze").arg("--version").output().is_ok_and(|o| o.status.success());
    support::tool_ready(found, "the systemd unit tests need systemd-analyze (Debian's systemd package)")
}

/// Every value the unit gives `key`, in order.
fn values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines().filter_map(|l| l.strip_prefix(key)?.strip_prefix('=')).map(str::trim).collect()
}

fn one<'a>(unit: &'a str, key: &str) -> &'a str {
    match values(unit, key).as_slice() {
        [v] => v,
        other => panic!("{key} is set {} times in the unit", other.len()),
    }
}

/// The unit with ExecStart pointing at the binary under test, in a directory of its own.
fn unit_for_this_build(dir: &Path) -> std::path::PathBuf {
    let unit = std::fs::read_to_string(UNIT).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/sigrelay "), "the unit starts /usr/local/bin/sigrelay");
    let path = dir.join("sigrelay.service");
    std::fs::write(&path, unit.replace("ExecStart=/usr/local/bin/sigrelay ", &format!("ExecStart={BIN} "))).unwrap();
    path
}

#[test]
fn the_unit_verifies_and_scores_below_2() {
    if !analyze_ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_for_this_build(dir.path());

    let verify = Command::new("systemd-analyze").arg("verify").arg(&unit).output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&verify.stdout), String::from_utf8_lossy(&verify.stderr));
    assert!(verify.status.success(), "systemd-analyze verify failed:\n{said}");
    // Any warning about the unit (an unknown key, a bad value) is a finding too.
    let about_unit: Vec<&str> = said.lines().filter(|l| l.contains("sigrelay.service")).collect();
    assert!(about_unit.is_empty(), "systemd-analyze verify warned:\n{said}");

    let security = Command::new("systemd-analyze").args(["security", "--offline=true"]).arg(&unit).output().unwrap();
    let report = String::from_utf8_lossy(&security.stdout);
    assert!(security.status.success(), "{report}{}", String::from_utf8_lossy(&security.stderr));
    let overall = report
        .lines()
        .find_map(|l| l.split("Overall exposure level for sigrelay.service: ").nth(1))
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{report}"));
    let mut words = overall.split_whitespace();
    let score: f64 = words.next().unwrap().parse().unwrap();
    let verdict = words.next().unwrap();
    eprintln!("systemd-analyze security: exposure {score} {verdict}");
    assert!(score < 2.0 && verdict == "OK", "exposure {score} {verdict}:\n{report}");
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let stated = format!("exposure level {README_SCORE} (\"OK\") under Debian 12's systemd {README_SYSTEMD}");
    assert!(readme.contains(&stated), "the README states the score and the systemd it is for: {stated:?}");
    let version = Command::new("systemd-analyze").arg("--version").output().unwrap();
    let version = String::from_utf8_lossy(&version.stdout);
    let major = version.split_whitespace().nth(1).unwrap_or_else(|| panic!("no version in {version:?}"));
    if major == README_SYSTEMD {
        assert_eq!(format!("{score:.1}"), README_SCORE, "update the score in the README and README_SCORE");
    } else {
        eprintln!("systemd {major}, not {README_SYSTEMD}: the README's {README_SCORE} is not compared");
    }
}

#[test]
fn the_unit_holds_what_the_readme_promises() {
    let unit = std::fs::read_to_string(UNIT).unwrap();
    assert_eq!(one(&unit, "Type"), "notify");
    assert_eq!(one(&unit, "AmbientCapabilities"), "CAP_NET_BIND_SERVICE");
    assert_eq!(one(&unit, "CapabilityBoundingSet"), "CAP_NET_BIND_SERVICE");
    assert_eq!(one(&unit, "NoNewPrivileges"), "yes");
    assert_eq!(one(&unit, "ProtectSystem"), "strict");
    assert_eq!(one(&unit, "PrivateTmp"), "yes");
    assert_eq!(one(&unit, "DynamicUser"), "yes");
    assert_eq!(one(&unit, "Restart"), "on-failure");
    assert_eq!(one(&unit, "ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(one(&unit, "KillSignal"), "SIGTERM", "SIGTERM starts the drain");

    // systemd must not SIGKILL a drain that runs its default course: drain_timeout, then the
    // forced close's grace, then the records flush (5 s) and the runtime's last second.
    let defaults = sigrelay::Config::defaults();
    let needed = defaults.server.drain_timeout + sigrelay::shutdown::FORCE_GRACE + Duration::from_secs(6);
    let stop: u64 = one(&unit, "TimeoutStopSec").parse().unwrap();
    assert!(Duration::from_secs(stop) >= needed, "TimeoutStopSec={stop} is shorter than a default drain ({needed:?})");

    // Two descriptors per relayed connection and a reserve: room for 50,000 connections.
    let nofile: u64 = one(&unit, "LimitNOFILE").parse().unwrap();
    assert!((nofile - 64 - 4 * 15) / 2 >= 50_000, "LimitNOFILE={nofile}");
}
