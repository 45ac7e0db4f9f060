#!/usr/bin/env python3
"""Side-by-side benchmark: direct, nginx, HAProxy and sigrelay in front of the same TLS echo
upstream (sigrelay mock-gateway --mode echo), driven by `sigrelay loadtest`, loopback only;
two more nginx configurations (see NGINX_VARIANTS) run the handshake scenario.

Every scenario runs against every target in alternating order over several rounds; each proxy's
RSS and CPU are sampled from /proc. Writes results.jsonl, results.md (medians and ratios to
nginx) and an SVG plot into the output directory. Run through benches/compare.sh, which installs
nginx and HAProxy from Debian if missing and builds sigrelay.

    python3 benches/compare.py [--quick] [--rounds N] [--out DIR]
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from common import ROOT, SIGRELAY, free_port, wait_port
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")






def children(pid):
    """pid and its descendants (nginx's workers)."""
    out = [pid]
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [c for p in f.read().split() for c in children(int(p))]
    except OSError:
        pass
    return sorted(set(out))


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / TICK


def thread_cpu(pids):
    """CPU seconds per thread name (`comm`) across pids: sigrelay's accept threads are
    `sigrelay` (the main one) and `sigrelay-<n>`."""
    out = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat.rsplit(")", 1)[1].split()
            out[name] = out.get(name, 0) + (int(fields[11]) + int(fields[12])) / TICK
    return out


def split(before, after):
    """Each busy thread's share of the CPU used between two thread_cpu() readings, busiest
    first, as percentages."""
    used = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    total = sum(used.values()) or 1
    return {k: round(100 * v / total) for k, v in sorted(used.items(), key=lambda kv: -kv[1]) if v / total >= 0.02}


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * PAGE // 1024
        except OSError:
            pass
    return total


def make_pki(d):
    def run(*args):
        subprocess.run(args, check=True, capture_output=True)
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.pem", "-days", "2", "-subj", "/CN=bench CA")
    with open(f"{d}/ext.cnf", "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1,DNS:au1.vss.twilio.com,DNS:global.turn.twilio.com\n")
    run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{d}/leaf.key", "-out", f"{d}/leaf.csr", "-subj", "/CN=localhost")
    run("openssl", "x509", "-req", "-in", f"{d}/leaf.csr", "-CA", f"{d}/ca.pem", "-CAkey", f"{d}/ca.key",
        "-CAcreateserial", "-out", f"{d}/leaf.pem", "-days", "2", "-extfile", f"{d}/ext.cnf")
    with open(f"{d}/combined.pem", "w") as f:
        f.write(open(f"{d}/leaf.pem").read() + open(f"{d}/leaf.key").read())


class Target:
    def __init__(self, name, port, proc=None):
        self.name, self.port, self.proc = name, port, proc

    def pids(self):
        return children(self.proc.pid) if self.proc else []


# nginx 1.22 (Debian 12) offers TLS 1.3 only when told to, on either hop. "nginx" is it as
# usually deployed, with Mozilla's intermediate listener (TLS 1.2 and 1.3) and the default
# upstream protocols (up to TLS 1.2): this reproduces the reference figures in the performance
# issue. Two variants run the handshake scenario only: TLS 1.3 on both hops (nginx >= 1.23.4's
# defaults, and what sigrelay speaks), and 1.22's defaults on both hops (TLS 1.2 only), whose
# resumed handshakes skip key exchange altogether.
NGINX_VARIANTS = [
    ("nginx", "TLSv1.2 TLSv1.3", "TLSv1 TLSv1.1 TLSv1.2"),
    ("nginx-tls13", "TLSv1.2 TLSv1.3", "TLSv1.2 TLSv1.3"),
    ("nginx-tls12", "TLSv1 TLSv1.1 TLSv1.2", "TLSv1 TLSv1.1 TLSv1.2"),
]
CHURN_ONLY = {"nginx-tls13", "nginx-tls12"}
# The floor for latency through any proxy on this machine: nginx's stream module passing TCP
# through, so the client's TLS runs end to end to the upstream and the proxy does no TLS, HTTP or
# WebSocket work at all, only the extra hop (two more wake-ups per echo). Echo scenario only.
PASS = "tcp-pass"
NGINX_PASS_CONF = """
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes auto;
worker_rlimit_nofile 20000;
pid {d}/tcp-pass.pid;
error_log {d}/tcp-pass-error.log warn;
events {{ worker_connections 20000; }}
stream {{
  server {{
    listen 127.0.0.1:{port};
    proxy_pass 127.0.0.1:{upstream_port};
    proxy_timeout 1h;
  }}
}}
"""
NGINX_CONF = """
worker_processes auto;
worker_rlimit_nofile 20000;
pid {d}/{name}.pid;
error_log {d}/{name}-error.log warn;
events {{ worker_connections 20000; }}
http {{
  access_log off;
  client_body_temp_path {d}/{name}-body;
  proxy_temp_path {d}/{name}-proxy;
  fastcgi_temp_path {d}/{name}-fcgi;
  uwsgi_temp_path {d}/{name}-uwsgi;
  scgi_temp_path {d}/{name}-scgi;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {d}/leaf.pem;
    ssl_certificate_key {d}/leaf.key;
    ssl_protocols {listen_protocols};
    location / {{
      proxy_pass https://127.0.0.1:{upstream_port};
      proxy_ssl_protocols {upstream_protocols};
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection "upgrade";
      proxy_read_timeout 3600s;
      proxy_send_timeout 3600s;
      proxy_buffering off;
    }}
  }}
}}
"""


def start_targets(d, upstream_port, only=None):
    """Starts the proxies to measure: all, or those named in `only` (so that a run of one
    does not need the others installed)."""
    def wanted(name):
        return only is None or name in only

    targets = [Target("direct", upstream_port)]
    devnull = subprocess.DEVNULL

    for name, listen_protocols, upstream_protocols in NGINX_VARIANTS:
        if not wanted(name):
            continue
        port = free_port()
        with open(f"{d}/{name}.conf", "w") as f:
            f.write(NGINX_CONF.format(d=d, name=name, port=port, upstream_port=upstream_port,
                                      listen_protocols=listen_protocols, upstream_protocols=upstream_protocols))
        nginx = subprocess.Popen(["nginx", "-c", f"{d}/{name}.conf", "-p", d, "-g", "daemon off;"],
                                 stdout=devnull, stderr=devnull)
        targets.append(Target(name, port, nginx))

    if wanted(PASS):
        port = free_port()
        with open(f"{d}/tcp-pass.conf", "w") as f:
            f.write(NGINX_PASS_CONF.format(d=d, port=port, upstream_port=upstream_port))
        passthrough = subprocess.Popen(["nginx", "-c", f"{d}/tcp-pass.conf", "-p", d, "-g", "daemon off;"],
                                       stdout=devnull, stderr=devnull)
        targets.append(Target(PASS, port, passthrough))

    if wanted("haproxy"):
        port = free_port()
        with open(f"{d}/haproxy.cfg", "w") as f:
            f.write(f"""
global
  maxconn 9950
  nbthread 2
defaults
  mode http
  timeout connect 5s
  timeout client 1h
  timeout server 1h
  timeout tunnel 1h
frontend fe
  bind 127.0.0.1:{port} ssl crt {d}/combined.pem
  default_backend be
backend be
  server up 127.0.0.1:{upstream_port} ssl verify none
""")
        haproxy = subprocess.Popen(["haproxy", "-f", f"{d}/haproxy.cfg", "-db"], stdout=devnull, stderr=devnull)
        targets.append(Target("haproxy", port, haproxy))

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
"au1.vss.twilio.com" = "127.0.0.1:{upstream_port}"
[admin]
listen = "off"
[limits]
handshakes_per_ip_per_s = 1000000
handshake_burst = 1000000
""")
    relay = subprocess.Popen([SIGRELAY, "run", "--config", f"{d}/sigrelay.toml", "--log", "warn"],
                             stdout=devnull, stderr=devnull)
    targets.append(Target("sigrelay", port, relay))
    for t in targets:
        wait_port(t.port)
    return targets


def stop_targets(targets):
    for t in targets:
        if t.proc:
            t.proc.send_signal(signal.SIGINT if t.name == "sigrelay" else signal.SIGTERM)
    for t in targets:
        if t.proc:
            try:
                t.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                t.proc.kill()


def loadtest(t, ca, args, on_held=None):
    url = f"wss://127.0.0.1:{t.port}/au1/signaling"
    cmd = [SIGRELAY, "loadtest", url, "--ca-file", ca, "--json",
           "--source-ip", ",".join(f"127.0.0.{i}" for i in range(1, 9))] + args
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    held = None
    if on_held:
        for line in p.stderr:
            if "holding" in line:
                held = on_held()
                break
    out, err = p.communicate(timeout=900)
    if not out.strip():
        raise RuntimeError(f"loadtest failed: {err}")
    return json.loads(out), held


def integrity(row, rep):
    """Copies a load-test report's errors and message-integrity counts into a result row."""
    row["errors"] = rep["errors"]
    row["lost"] = rep.get("lost", 0)
    row["reordered"] = rep.get("reordered", 0)
    row["duplicated"] = rep.get("duplicated", 0)
    return row


def scenario(name, t, ca, cfg):
    pids = t.pids()
    base_rss = rss_kib(pids)
    c0 = cpu_seconds(pids)
    row = {"scenario": name, "target": t.name}
    if name == "idle":
        n = cfg["idle"]
        rep, held_rss = loadtest(t, ca, ["--mode", "idle", "-n", str(n), "-c", "200", "-d", "3s"],
                                 on_held=lambda: (time.sleep(1.0), rss_kib(pids))[1])
        row["held"] = rep["completed"]
        if pids and rep["completed"]:
            row["rss_per_conn_kib"] = (held_rss - base_rss) / rep["completed"]
    elif name == "churn":
        rep, _ = loadtest(t, ca, ["--mode", "churn", "-c", "32", "-d", cfg["duration"]])
        row["cycles_per_s"] = rep["per_second"]
        if pids and rep["completed"]:
            row["cpu_ms_per_cycle"] = (cpu_seconds(pids) - c0) * 1000 / rep["completed"]
    elif name in ("echo", "saturation"):
        n, rate = (1000, cfg["rate"]) if name == "echo" else (100, 100000)
        threads0 = thread_cpu(pids)
        rep, _ = loadtest(t, ca, ["--mode", "echo", "-n", str(n), "--rate", str(rate), "--size", "256",
                                  "-d", cfg["duration"], "-c", "200"])
        row["rate"] = rate
        row["per_s"] = rep["per_second"]
        row["p50_us"] = rep["latency"]["p50_us"]
        row["p99_us"] = rep["latency"]["p99_us"]
        row["p999_us"] = rep["latency"]["p999_us"]
        if pids and rep["received"]:
            row["cpu_us_per_echo"] = (cpu_seconds(pids) - c0) * 1e6 / rep["received"]
        if t.name == "sigrelay":
            row["thread_cpu_pct"] = split(threads0, thread_cpu(pids))
    return integrity(row, rep)


FIGURES = [
    ("idle", "rss_per_conn_kib", "RSS per idle relayed connection (KiB)", "lower"),
    ("churn", "cycles_per_s", "handshake cycles/s (32 concurrent)", "higher"),
    ("churn", "cpu_ms_per_cycle", "proxy CPU per handshake cycle (ms)", "lower"),
    ("echo", "p50_us", "echo p50 below saturation, 1,000 conns (µs)", "lower"),
    ("echo", "p99_us", "echo p99 below saturation, 1,000 conns (µs)", "lower"),
    ("echo", "cpu_us_per_echo", "proxy CPU per echo below saturation (µs)", "lower"),
    ("saturation", "per_s", "echoes/s, 100 conns offered 100k msg/s", "higher"),
    ("saturation", "cpu_us_per_echo", "proxy CPU per echo at saturation (µs)", "lower"),
    ("saturation", "p99_us", "saturation p99 (µs)", "lower"),
    ("saturation", "p999_us", "saturation p99.9 (µs)", "lower"),
]
TARGETS = ["direct", PASS, "nginx", "nginx-tls13", "nginx-tls12", "haproxy", "sigrelay"]


def calibrate(d, up_port):
    """The echo scenario's rate: half the rate at which nginx would use one whole core, from a
    short run at a rate every proxy here carries. Below saturation for every target on this
    machine, so the latency figures measure latency rather than queueing (machines of one kind
    differ by 3x from day to day, so a fixed rate cannot be right on all of them). The probe's
    100 handshakes count in its CPU, which errs on the side of a lower rate."""
    targets = start_targets(d, up_port, ["nginx"])
    probe = 5000
    try:
        nginx = next(t for t in targets if t.name == "nginx")
        pids = nginx.pids()
        c0 = cpu_seconds(pids)
        rep, _ = loadtest(nginx, f"{d}/ca.pem", ["--mode", "echo", "-n", "100", "--rate", str(probe), "--size", "256",
                                                 "-d", "4s", "-c", "100"])
        us_per_echo = (cpu_seconds(pids) - c0) * 1e6 / max(rep["received"], 1)
    finally:
        stop_targets(targets)
    one_core = 1e6 / max(us_per_echo, 1)
    rate = int(max(1000, min(one_core / 2, 50000)) // 500 * 500)
    print(f"calibration: nginx used {us_per_echo:.1f} µs of CPU per echo at {probe} msg/s: "
          f"one core at about {one_core:,.0f} msg/s", flush=True)
    return rate


def medians(rows):
    out = {}
    for scen, key, _, _ in FIGURES:
        for t in TARGETS:
            vals = [r[key] for r in rows if r["scenario"] == scen and r["target"] == t and key in r]
            if vals:
                out[(scen, key, t)] = statistics.median(vals)
    return out


def paired(rows, scen, key):
    """sigrelay / nginx within each round: the two ran minutes apart, so these show how much of
    a difference is the machine drifting between rounds."""
    ratios = []
    for rnd in sorted({r["round"] for r in rows}):
        v = {r["target"]: r.get(key) for r in rows if r["scenario"] == scen and r["round"] == rnd}
        if v.get("sigrelay") and v.get("nginx"):
            ratios.append(f"{v['sigrelay'] / v['nginx']:.2f}")
    return " / ".join(ratios) or "–"


def markdown(rows, med, meta):
    lines = [f"Run: {meta}", "",
             "| figure | " + " | ".join(TARGETS) + " | sigrelay / nginx | per round |",
             "|---|" + "---|" * (len(TARGETS) + 2)]
    for scen, key, label, better in FIGURES:
        cells = []
        for t in TARGETS:
            v = med.get((scen, key, t))
            cells.append("–" if v is None else (f"{v:,.0f}" if v >= 100 else f"{v:,.2f}"))
        s, n = med.get((scen, key, "sigrelay")), med.get((scen, key, "nginx"))
        ratio = "–" if not s or not n else f"{s / n:.2f}× ({better} is better)"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio} | {paired(rows, scen, key)} |")
    lines += ["", "Handshake figures against the nginx variants (sigrelay / variant):"]
    for variant in sorted(CHURN_ONLY):
        ratios = []
        for key, label in [("cycles_per_s", "cycles/s"), ("cpu_ms_per_cycle", "CPU per cycle")]:
            s, v = med.get(("churn", key, "sigrelay")), med.get(("churn", key, variant))
            ratios.append(f"{label} {s / v:.2f}×" if s and v else f"{label} –")
        lines.append(f"- {variant}: " + ", ".join(ratios))
    rates = sorted({r["rate"] for r in rows if r["scenario"] == "echo" and "rate" in r})
    lines += ["", f"Echo scenario rate: {', '.join(f'{r:,}' for r in rates)} msg/s over 1,000 connections."]
    for scen in ("echo", "saturation"):
        splits = [r["thread_cpu_pct"] for r in rows if r["scenario"] == scen and r.get("thread_cpu_pct")]
        if splits:
            shown = "; ".join(", ".join(f"{k} {v}%" for k, v in sp.items()) for sp in splits)
            lines.append(f"sigrelay's CPU by thread, {scen} (per round): {shown}")
    bad = [r for r in rows if r["errors"] or r["lost"] or r["reordered"] or r["duplicated"]]
    lines += ["", f"Runs with errors or lost/reordered/duplicated messages: {len(bad)}"]
    for r in bad:
        lines.append(f"- {r['scenario']} / {r['target']}: errors {r['errors']}, lost {r['lost']}, "
                     f"reordered {r['reordered']}, duplicated {r['duplicated']}")
    return "\n".join(lines) + "\n"


def svg(med, path):
    """Two bar groups: echo p50/p99 latency and RSS per idle connection, one bar per target."""
    colors = {"direct": "#999999", PASS: "#cccccc", "nginx": "#2b8a3e", "haproxy": "#1c7ed6", "sigrelay": "#e8590c"}
    panels = [("echo latency below saturation (µs)", [("p50", ("echo", "p50_us")), ("p99", ("echo", "p99_us"))]),
              ("RSS per idle connection (KiB)", [("KiB", ("idle", "rss_per_conn_kib"))])]
    shown = [t for t in TARGETS if any(med.get((s, k, t)) for _, g in panels for _, (s, k) in g)]
    w, h, pw = 760, 300, 360
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           '<rect width="100%" height="100%" fill="white"/>']
    for pi, (title, groups) in enumerate(panels):
        x0 = 20 + pi * (pw + 20)
        out.append(f'<text x="{x0}" y="20" font-weight="bold">{title}</text>')
        vals = [med.get((s, k, t)) for _, (s, k) in groups for t in shown]
        top = max([v for v in vals if v] or [1])
        gw = (pw - 20) / len(groups)
        for gi, (glabel, (s, k)) in enumerate(groups):
            for ti, t in enumerate(shown):
                v = med.get((s, k, t))
                if v is None:
                    continue
                bh = (h - 80) * v / top
                bx = x0 + gi * gw + ti * (gw / len(shown))
                out.append(f'<rect x="{bx:.1f}" y="{h - 40 - bh:.1f}" width="{gw / len(shown) - 4:.1f}" '
                           f'height="{bh:.1f}" fill="{colors[t]}"/>')
                out.append(f'<text x="{bx:.1f}" y="{h - 44 - bh:.1f}" font-size="10">{v:,.0f}</text>')
            out.append(f'<text x="{x0 + gi * gw + gw / 2 - 10:.1f}" y="{h - 22}">{glabel}</text>')
    for ti, t in enumerate(shown):
        out.append(f'<rect x="{20 + ti * 110}" y="{h - 14}" width="10" height="10" fill="{colors[t]}"/>'
                   f'<text x="{34 + ti * 110}" y="{h - 5}">{t}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a few minutes: fewer connections, shorter runs, one round")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--idle", type=int, metavar="N", help="idle connections to hold (default 9,800; 2,000 with --quick)")
    ap.add_argument("--rate", type=int, help="the echo scenario's rate (default: calibrated, see calibrate())")
    ap.add_argument("--out", default=os.path.join(ROOT, "target", "bench"))
    ap.add_argument("--only", metavar="NAMES", help="comma-separated targets to run (e.g. sigrelay,nginx); default all")
    ap.add_argument("--scenarios", metavar="NAMES", default="idle,churn,echo,saturation",
                    help="comma-separated scenarios to run (default: all four)")
    ap.add_argument("--render", metavar="JSONL", help="only rewrite results.md and the plot from a results.jsonl")
    args = ap.parse_args()
    if args.render:
        with open(args.render) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        meta = open(os.path.join(os.path.dirname(args.render), "results.md")).readline().removeprefix("Run: ").strip()
        return write_results(rows, meta, args.out)
    cfg = ({"idle": 2000, "duration": "5s", "rounds": 1} if args.quick
           else {"idle": 9800, "duration": "15s", "rounds": 3})
    cfg["idle"] = args.idle or cfg["idle"]
    rounds = args.rounds or cfg["rounds"]
    os.makedirs(args.out, exist_ok=True)
    d = tempfile.mkdtemp(prefix="sigrelay-bench-")
    make_pki(d)
    up_port = free_port()
    upstream = subprocess.Popen([SIGRELAY, "mock-gateway", "--mode", "echo", "--listen", f"127.0.0.1:{up_port}",
                                 "--cert", f"{d}/leaf.pem", "--key", f"{d}/leaf.key"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(up_port)
    rows = []
    try:
        if "echo" in args.scenarios.split(","):
            cfg["rate"] = args.rate or calibrate(d, up_port)
            print(f"echo scenario rate: {cfg['rate']} msg/s over 1,000 connections"
                  f"{' (given)' if args.rate else ' (calibrated)'}", flush=True)
        for rnd in range(rounds):
            # Fresh proxies every round: an allocator keeps freed memory, so a second idle
            # measurement in the same process would read near zero.
            targets = start_targets(d, up_port, args.only.split(",") if args.only else None)
            try:
                for scen in args.scenarios.split(","):
                    order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
                    for t in order:
                        if t.name in CHURN_ONLY and scen != "churn":
                            continue
                        if t.name == PASS and scen != "echo":
                            continue
                        if args.only and t.name not in args.only.split(","):
                            continue
                        row = scenario(scen, t, f"{d}/ca.pem", cfg)
                        row["round"] = rnd
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                        time.sleep(1)
            finally:
                stop_targets(targets)
    finally:
        upstream.terminate()
    meta = (f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, {'quick' if args.quick else 'full'} mode, "
            f"{rounds} round(s), medians; nginx {subprocess.run(['nginx', '-v'], capture_output=True, text=True).stderr.strip()}")
    write_results(rows, meta, args.out)


def write_results(rows, meta, out):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    med = medians(rows)
    md = markdown(rows, med, meta)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    svg(med, os.path.join(out, "results.svg"))
    print(md)


if __name__ == "__main__":
    sys.exit(main())
