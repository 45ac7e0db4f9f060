//! The tools around the relay, kept apart from it and behind the `tools` cargo feature (on by
//! default), so a relay-only build (`--no-default-features`) links none of their dependencies:
//! the mock gateway, the load tester, the record report, `diagnose`'s front end, throwaway
//! certificate authorities, and the properties the fuzz targets check.

pub mod diagnose;
#[doc(hidden)]
pub mod fuzz_checks;
pub mod loadtest;
pub mod mock_gateway;
pub mod pki;
pub mod report;

use std::process::ExitCode;

/// The exit status every tool uses: 0 when all it checked is good, 1 when something it checked
/// failed, 2 when it could not run (bad arguments, configuration or input).
fn exit(tool: &str, result: anyhow::Result<bool>) -> ExitCode {
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("sigrelay {tool}: {e:#}");
            ExitCode::from(2)
        }
    }
}
