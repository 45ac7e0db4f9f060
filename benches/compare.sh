#!/usr/bin/env bash
# Side-by-side benchmark of sigrelay against nginx and HAProxy (see benches/compare.py).
#   bash benches/compare.sh --quick    # a few minutes
#   bash benches/compare.sh            # full: 9,800 idle connections, 15 s runs, 3 rounds
#   bash benches/compare.sh --turn     # TURN over TLS against nginx's stream module (benches/turn.py)
# Loopback only; every run is bounded in connections and time. Results in target/bench/.
set -euo pipefail
cd "$(dirname "$0")/.."
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
missing=()
command -v nginx >/dev/null || missing+=(nginx-light)
[ -f /usr/lib/nginx/modules/ngx_stream_module.so ] || missing+=(libnginx-mod-stream)
command -v haproxy >/dev/null || missing+=(haproxy)
command -v openssl >/dev/null || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# Debian starts the packaged services; the benchmark runs its own instances.
$sudo systemctl stop nginx haproxy 2>/dev/null || true
cargo build --release --locked --bin sigrelay
if [ "${1:-}" = --turn ]; then
    shift
    exec python3 benches/turn.py "$@"
fi
exec python3 benches/compare.py "$@"
