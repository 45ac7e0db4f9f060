#!/usr/bin/env python3
"""TURN over TLS through sigrelay, side by side with nginx's stream module doing the same job
(TLS in, TLS out to the same upstream), and straight to the upstream. The upstream is
`sigrelay mock-gateway --mode echo`, which echoes STUN-framed messages; the load is
`sigrelay loadtest --turn` (TLS streams of STUN Send indications, every echo checked for loss,
order and duplicates). Loopback only, bounded in connections and time.

Scenarios, each against each target in alternating order over several rounds, fresh processes
each round:
- turn_idle: held TURN sessions (one echo each), RSS per session;
- turn_echo: 50 sessions, messages of --size bytes (4 KiB) at a fixed rate each way: latency, and proxy CPU per
  MiB relayed (both directions counted);
- turn_max: the same with 40,000 msg/s offered, more than this machine's load generator and echo
  sustain even direct: the throughput each reaches and the proxy CPU per MiB at that load.

Run through benches/compare.sh --turn, which installs nginx and its stream module and builds
sigrelay. Writes results.jsonl and results.md into target/bench-turn/ (or --out).

    python3 benches/turn.py [--quick] [--rounds N] [--out DIR]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import compare
from common import ROOT, SIGRELAY, free_port, wait_port

NGINX_STREAM = """
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes auto;
worker_rlimit_nofile 20000;
pid {d}/nginx-stream.pid;
error_log {d}/nginx-stream-error.log warn;
events {{ worker_connections 20000; }}
stream {{
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {d}/leaf.pem;
    ssl_certificate_key {d}/leaf.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    proxy_pass 127.0.0.1:{upstream_port};
    proxy_ssl on;
    proxy_ssl_protocols TLSv1.2 TLSv1.3;
    proxy_timeout 1h;
  }}
}}
"""

TARGETS = ["direct", "nginx-stream", "sigrelay"]
MIB = 1024 * 1024


def start_targets(d, upstream_port):
    targets = [compare.Target("direct", upstream_port)]
    devnull = subprocess.DEVNULL
    port = free_port()
    with open(f"{d}/nginx-stream.conf", "w") as f:
        f.write(NGINX_STREAM.format(d=d, port=port, upstream_port=upstream_port))
    nginx = subprocess.Popen(["nginx", "-c", f"{d}/nginx-stream.conf", "-p", d, "-g", "daemon off;"], stdout=devnull, stderr=devnull)
    targets.append(compare.Target("nginx-stream", port, nginx))
    port = free_port()
    with open(f"{d}/sigrelay.toml", "w") as f:
        f.write(f"""
[server]
listen = "127.0.0.1:{port}"
cert = "{d}/leaf.pem"
key = "{d}/leaf.key"
[upstream]
ca_file = "{d}/ca.pem"
system_dns = false
[upstream.resolve]
"global.turn.twilio.com" = "127.0.0.1:{upstream_port}"
[admin]
listen = "off"
[limits]
handshakes_per_ip_per_s = 1000000
handshake_burst = 1000000
""")
    relay = subprocess.Popen([SIGRELAY, "run", "--config", f"{d}/sigrelay.toml", "--log", "warn"], stdout=devnull, stderr=devnull)
    targets.append(compare.Target("sigrelay", port, relay))
    for t in targets:
        wait_port(t.port)
    return targets


def scenario(name, t, ca, cfg):
    pids = t.pids()
    base_rss = compare.rss_kib(pids)
    c0 = compare.cpu_seconds(pids)
    row = {"scenario": name, "target": t.name}
    if name == "turn_idle":
        n = cfg["idle"]
        rep, held_rss = compare.loadtest(t, ca, ["--turn", "--mode", "idle", "-n", str(n), "-c", "200", "-d", "3s"],
                                         on_held=lambda: (time.sleep(1.0), compare.rss_kib(pids))[1])
        row["held"] = rep["completed"]
        if pids and rep["completed"]:
            row["rss_per_session_kib"] = (held_rss - base_rss) / rep["completed"]
    else:
        rate = cfg["rate"] if name == "turn_echo" else cfg["max_rate"]
        rep, _ = compare.loadtest(t, ca, ["--turn", "--mode", "echo", "-n", "50", "--rate", str(rate), "--size", str(cfg["size"]),
                                          "-d", cfg["duration"], "-c", "50"])
        mib = rep["received"] * cfg["size"] * 2 / MIB
        row["mib_per_s"] = mib / rep["seconds"] if rep["seconds"] else 0
        row["p50_us"] = rep["latency"]["p50_us"]
        row["p99_us"] = rep["latency"]["p99_us"]
        if pids and mib:
            row["cpu_ms_per_mib"] = (compare.cpu_seconds(pids) - c0) * 1000 / mib
    return compare.integrity(row, rep)


FIGURES = [
    ("turn_idle", "rss_per_session_kib", "RSS per held TURN session (KiB)", "lower"),
    ("turn_echo", "cpu_ms_per_mib", "proxy CPU per MiB relayed (ms), 50 sessions, 2,000 msg/s", "lower"),
    ("turn_echo", "p50_us", "echo p50 (µs)", "lower"),
    ("turn_echo", "p99_us", "echo p99 (µs)", "lower"),
    ("turn_max", "mib_per_s", "throughput with 40,000 msg/s offered (MiB/s, both ways; direct is the load generator's own ceiling)", "higher"),
    ("turn_max", "cpu_ms_per_mib", "proxy CPU per MiB at that load (ms)", "lower"),
]


def markdown(rows, meta):
    med = {}
    for scen, key, _, _ in FIGURES:
        for t in TARGETS:
            vals = [r[key] for r in rows if r["scenario"] == scen and r["target"] == t and key in r]
            if vals:
                med[(scen, key, t)] = statistics.median(vals)
    lines = [f"Run: {meta}", "", "| figure | " + " | ".join(TARGETS) + " | sigrelay / nginx-stream | per round |",
             "|---|" + "---|" * (len(TARGETS) + 2)]
    for scen, key, label, better in FIGURES:
        cells = ["–" if med.get((scen, key, t)) is None else f"{med[(scen, key, t)]:,.2f}" for t in TARGETS]
        s, n = med.get((scen, key, "sigrelay")), med.get((scen, key, "nginx-stream"))
        ratio = "–" if not s or not n else f"{s / n:.2f}× ({better} is better)"
        per_round = []
        for rnd in sorted({r["round"] for r in rows}):
            v = {r["target"]: r.get(key) for r in rows if r["scenario"] == scen and r["round"] == rnd}
            if v.get("sigrelay") and v.get("nginx-stream"):
                per_round.append(f"{v['sigrelay'] / v['nginx-stream']:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio} | {' / '.join(per_round) or '–'} |")
    bad = [r for r in rows if r["errors"] or r["lost"] or r["reordered"] or r["duplicated"]]
    lines += ["", f"Runs with errors or lost/reordered/duplicated messages: {len(bad)}"]
    for r in bad:
        lines.append(f"- {r['scenario']} / {r['target']}: errors {r['errors']}, lost {r['lost']}, "
                     f"reordered {r['reordered']}, duplicated {r['duplicated']}")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one round, shorter runs")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--size", type=int, default=4096, help="message size in bytes (media packets are about 1200)")
    ap.add_argument("--out", default=os.path.join(ROOT, "target", "bench-turn"))
    args = ap.parse_args()
    cfg = {"idle": 1000, "duration": "5s" if args.quick else "10s", "size": args.size, "rate": 2000, "max_rate": 40000,
           "rounds": 1 if args.quick else 3}
    rounds = args.rounds or cfg["rounds"]
    os.makedirs(args.out, exist_ok=True)
    d = tempfile.mkdtemp(prefix="sigrelay-bench-turn-")
    compare.make_pki(d)
    up_port = free_port()
    upstream = subprocess.Popen([SIGRELAY, "mock-gateway", "--mode", "echo", "--listen", f"127.0.0.1:{up_port}",
                                 "--cert", f"{d}/leaf.pem", "--key", f"{d}/leaf.key"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(up_port)
    rows = []
    try:
        for rnd in range(rounds):
            targets = start_targets(d, up_port)
            try:
                for scen in ["turn_idle", "turn_echo", "turn_max"]:
                    order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
                    for t in order:
                        row = scenario(scen, t, f"{d}/ca.pem", cfg)
                        row["round"] = rnd
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                        time.sleep(1)
            finally:
                compare.stop_targets(targets)
    finally:
        upstream.terminate()
    meta = (f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, {'quick' if args.quick else 'full'} mode, {rounds} round(s), "
            f"medians; {cfg['size']} B messages; nginx {subprocess.run(['nginx', '-v'], capture_output=True, text=True).stderr.strip()}")
    with open(os.path.join(args.out, "results.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    md = markdown(rows, meta)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    sys.exit(main())
