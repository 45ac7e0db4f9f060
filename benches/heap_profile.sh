#!/usr/bin/env bash
# Where an idle relayed connection's heap goes, by heaptrack (Debian's heaptrack): sigrelay in
# front of `sigrelay mock-gateway --mode echo`, N idle relayed connections (each has relayed one
# message) held for a few seconds, then the relay is stopped and heaptrack_print lists the
# allocation sites holding the most at the peak. Loopback only; bounded in connections and time.
#   bash benches/heap_profile.sh [CONNECTIONS] [BINARY]      (default 1000)
# Writes target/bench/heap.* and prints the peak heap per connection and the top sites.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-1000}
bin=${2:-target/release/sigrelay}
command -v heaptrack >/dev/null || { echo "heap_profile.sh needs heaptrack: apt-get install heaptrack" >&2; exit 1; }
[ -x "$bin" ] || cargo build --release --locked --bin sigrelay
mkdir -p target/bench
out=$PWD/target/bench/heap
rm -f "$out".*
source benches/relay_env.sh
heaptrack -o "$out" "$bin" run --config "$d/sigrelay.toml" --log warn >/dev/null 2>&1 &
relay=$!
python3 -c "import sys; sys.path.insert(0, 'benches'); from common import wait_port; wait_port($listen, 30)"
# The baseline: a relay that has served one connection (its pools and caches warmed).
"$bin" loadtest "wss://127.0.0.1:$listen/au1/signaling" --ca-file "$d/ca.pem" --json --mode idle -n 1 -c 1 -d 1s >/dev/null
"$bin" loadtest "wss://127.0.0.1:$listen/au1/signaling" --ca-file "$d/ca.pem" --json --mode idle -n "$n" -c 200 -d 4s \
    --source-ip 127.0.0.1,127.0.0.2,127.0.0.3,127.0.0.4 > "$out.loadtest.json"
# heaptrack's wrapper runs the relay as a child: stop the relay itself, so heaptrack writes out.
pkill -TERM -f "run --config $d/sigrelay.toml" || true
wait "$relay" || true
data=$(ls "$out".zst "$out".gz "$out".*.zst "$out".*.gz 2>/dev/null | head -1 || true)
heaptrack_print -f "$data" --print-peaks 1 --peak-limit 12 --print-allocators 0 --print-temporary 0 \
    --print-leaks 0 --print-histogram "" > "$out.txt" 2>/dev/null || true
held=$(python3 -c "import json; print(json.load(open('$out.loadtest.json'))['completed'])")
peak=$(grep -E '^peak heap memory consumption' "$out.txt" | sed 's/.*: //')
echo "connections held: $held; peak heap: $peak (heaptrack's units; divide by $held for per connection)"
sed -n '/PEAK MEMORY CONSUMERS/,/^$/p;/PEAK MEMORY CONSUMERS/,$p' "$out.txt" | grep -E '^[0-9.]+[KMG]?B? peak memory consumed over|^  [a-zA-Z_<]' | head -60
