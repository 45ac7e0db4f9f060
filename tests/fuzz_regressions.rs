//! Replays every saved fuzz input (crashers kept as regressions, and seeds) through the same
//! checks the fuzz targets run (src/fuzz_checks.rs).

use std::path::Path;

use sigrelay::tools::fuzz_checks;

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions").join(target);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no saved inputs in {}", dir.display());
    out
}

#[test]
fn first_frame_token() {
    for (name, data) in inputs("first_frame_token") {
        eprintln!("{name}");
        fuzz_checks::first_frame_token(&data);
    }
}

#[test]
fn route_region() {
    let router = sigrelay::route::Router::new(&sigrelay::Config::defaults());
    for (name, data) in inputs("route_region") {
        eprintln!("{name}");
        fuzz_checks::route_region(&router, &data);
    }
}

#[test]
fn frame_header() {
    for (name, data) in inputs("frame_header") {
        eprintln!("{name}");
        fuzz_checks::frame_header(&data);
    }
}

#[test]
fn proxy_header() {
    for (name, data) in inputs("proxy_header") {
        eprintln!("{name}");
        fuzz_checks::proxy_header(&data);
    }
}
