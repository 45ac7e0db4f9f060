#!/usr/bin/env bash
# Where sigrelay's CPU goes, by perf's cpu-clock sampling (Debian's linux-perf; this machine kind
# has no hardware counters): sigrelay in front of `sigrelay mock-gateway --mode echo`, under
# `sigrelay loadtest` in the echo scenario (1,000 connections at RATE msg/s, 256 B), the
# saturation scenario (100 connections offered 100,000 msg/s) or the handshake scenario (32
# concurrent cycles), 8 s of samples taken from the middle of the run,
# grouped by benches/profile_groups.py. Loopback only; bounded in time.
#   bash benches/profile.sh echo [BINARY] [RATE]
#   bash benches/profile.sh saturation [BINARY]
#   bash benches/profile.sh churn [BINARY]
# Writes target/bench/profile-<mode>.data (for `perf report -i`) and prints the groups.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?echo, saturation or churn}
bin=${2:-target/release/sigrelay}
rate=${3:-8500}
command -v perf >/dev/null || { echo "profile.sh needs perf: apt-get install linux-perf" >&2; exit 1; }
[ -x "$bin" ] || cargo build --release --locked --bin sigrelay
mkdir -p target/bench
out=target/bench/profile-$mode
source benches/relay_env.sh
"$bin" run --config "$d/sigrelay.toml" --log warn >/dev/null 2>&1 &
relay=$!
python3 -c "import sys; sys.path.insert(0, 'benches'); from common import wait_port; wait_port($listen)"
case $mode in
    echo) load=(--mode echo -n 1000 --rate "$rate" --size 256 -d 14s -c 200) ;;
    saturation) load=(--mode echo -n 100 --rate 100000 --size 256 -d 14s -c 100) ;;
    churn) load=(--mode churn -c 32 -d 12s) ;;
    *) echo "mode: echo, saturation or churn" >&2; exit 2 ;;
esac
"$bin" loadtest "wss://127.0.0.1:$listen/au1/signaling" --ca-file "$d/ca.pem" --json "${load[@]}" \
    --source-ip 127.0.0.1,127.0.0.2,127.0.0.3,127.0.0.4 > "$out.loadtest.json" 2>/dev/null &
load_pid=$!
sleep 4
perf record -e cpu-clock -F 1999 -g -p "$relay" -o "$out.data" -- sleep 8 >/dev/null 2>&1
wait "$load_pid"
python3 benches/profile_groups.py "$out.data"
