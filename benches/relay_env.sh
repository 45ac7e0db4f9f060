# Sourced by benches/profile.sh and benches/heap_profile.sh, with $bin set: makes a test PKI in a
# temporary directory ($d), starts `$bin mock-gateway --mode echo` on a free loopback port ($gateway
# is its pid) and writes $d/sigrelay.toml for a relay on another ($listen) in front of it, with the
# limits a load test from one machine needs. The caller starts the relay and sets $relay; both
# processes are stopped and $d removed on exit.
d=$(mktemp -d)
relay=
trap 'kill $relay $gateway 2>/dev/null || true; rm -rf "$d"' EXIT
python3 -c "import sys; sys.path.insert(0, 'benches'); import compare; compare.make_pki('$d')"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
up=$(port); listen=$(port)
"$bin" mock-gateway --mode echo --listen "127.0.0.1:$up" --cert "$d/leaf.pem" --key "$d/leaf.key" >/dev/null 2>&1 &
gateway=$!
cat > "$d/sigrelay.toml" <<TOML
[server]
listen = "127.0.0.1:$listen"
cert = "$d/leaf.pem"
key = "$d/leaf.key"
drain_timeout = "1s"
[upstream]
ca_file = "$d/ca.pem"
system_dns = false
[upstream.resolve]
"au1.vss.twilio.com" = "127.0.0.1:$up"
[admin]
listen = "off"
[limits]
handshakes_per_ip_per_s = 1000000
handshake_burst = 1000000
max_connections_per_ip = 100000
TOML
