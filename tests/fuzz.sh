#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 15 s each; FUZZ_SECONDS to change), on the
# stable toolchain via RUSTC_BOOTSTRAP=1. Crashers land in fuzz/artifacts/<target>/; copy them to
# tests/fuzz_regressions/<target>/ so tests/fuzz_regressions.rs replays them on every test run.
#   bash tests/fuzz.sh                 # all targets, 15 s each
#   FUZZ_SECONDS=600 bash tests/fuzz.sh frame_header
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
export RUSTC_BOOTSTRAP=1
seconds="${FUZZ_SECONDS:-15}"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(first_frame_token route_region frame_header proxy_header)
# Built first, so a build failure fails this script instead of passing for a run that never was.
cargo fuzz build
for t in "${targets[@]}"; do
    corpus="corpus/$t"
    mkdir -p "$corpus"
    cp ../tests/fuzz_regressions/"$t"/* "$corpus"/ 2>/dev/null || true
    echo "fuzz: $t for ${seconds}s"
    log="$(mktemp)"
    cargo fuzz run "$t" "$corpus" -- -max_total_time="$seconds" -rss_limit_mb=2048 >"$log" 2>&1 || true
    grep -E "^#[0-9]+ +DONE|Done [0-9]+ runs|ERROR|SUMMARY" "$log" || true
    if ! grep -qE "Done [0-9]+ runs" "$log" && ! ls "artifacts/$t"/crash-* >/dev/null 2>&1; then
        echo "fuzz: $t did not run to its time limit:" >&2
        tail -20 "$log" >&2
        exit 1
    fi
    rm -f "$log"
    if ls "artifacts/$t"/crash-* >/dev/null 2>&1; then
        echo "fuzz: $t found a crash: fuzz/artifacts/$t" >&2
        exit 1
    fi
done
