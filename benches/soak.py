#!/usr/bin/env python3
"""Soak: sigrelay under hours-like load for a bounded few minutes, loopback only.

Holds thousands of idle relayed connections for the whole run while handshake churn and echo
traffic come and go, samples the relay's RSS and open descriptors every few seconds, and fails
if either drifts upward, if descriptors are not released at the end, or if any loadtest run or
record shows an unexpected ending.

    python3 benches/soak.py [--minutes 3] [--idle 2000] [--out DIR]
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

from common import ROOT, SIGRELAY, free_port, wait_port






def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--idle", type=int, default=2000)
    ap.add_argument("--out", default=os.path.join(ROOT, "target", "soak"))
    args = ap.parse_args()
    assert 0 < args.minutes <= 60, "a soak here is bounded: at most 60 minutes"
    os.makedirs(args.out, exist_ok=True)
    d = tempfile.mkdtemp(prefix="sigrelay-soak-")
    up = free_port()
    gw = subprocess.Popen([SIGRELAY, "mock-gateway", "--mode", "echo", "--listen", f"127.0.0.1:{up}",
                           "--ca-out", f"{d}/ca.pem"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(up)
    port = free_port()
    with open(f"{d}/sigrelay.toml", "w") as f:
        f.write(f"""
[server]
listen = "127.0.0.1:{port}"
cert = "{d}/certs/dev/cert.pem"
key = "{d}/certs/dev/key.pem"
ping_interval = "5s"
[upstream]
ca_file = "{d}/ca.pem"
system_dns = false
[upstream.resolve]
"au1.vss.twilio.com" = "127.0.0.1:{up}"
[admin]
listen = "off"
[limits]
handshakes_per_ip_per_s = 1000000
handshake_burst = 1000000
""")
    records = open(os.path.join(args.out, "records.jsonl"), "w")
    log = open(f"{d}/relay.log", "w")
    relay = subprocess.Popen([SIGRELAY, "run", "--config", f"{d}/sigrelay.toml", "--log", "warn"],
                             cwd=d, stdout=records, stderr=log)
    # Wait for the address line rather than probing the port: a probe would be a record too.
    for _ in range(400):
        if "listening on" in open(f"{d}/relay.log").read():
            break
        time.sleep(0.05)
    time.sleep(0.5)
    base_fds = fd_count(relay.pid)
    url = f"wss://localhost:{port}/au1/signaling"
    sources = ",".join(f"127.0.0.{i}" for i in range(1, 9))
    common = ["--ca-file", f"{d}/certs/dev/cert.pem", "--json", "--source-ip", sources]
    end = time.time() + args.minutes * 60
    reports, failures = [], []

    def loadtest(extra):
        p = subprocess.run([SIGRELAY, "loadtest", url] + common + extra, capture_output=True, text=True)
        try:
            rep = json.loads(p.stdout)
        except json.JSONDecodeError:
            failures.append(f"loadtest {extra}: {p.stderr.strip()[-300:]}")
            return
        reports.append(rep)
        if rep["errors"] or rep.get("lost") or rep.get("reordered") or rep.get("duplicated"):
            failures.append(f"loadtest {rep['mode']}: errors {rep['errors']}, lost {rep.get('lost')}")

    hold = max(10, int(end - time.time()) - 5)
    idle = threading.Thread(target=loadtest, args=(["--mode", "idle", "-n", str(args.idle), "-c", "200", "-d", f"{hold}s"],))
    idle.start()

    def traffic():
        while time.time() < end - 25:
            loadtest(["--mode", "churn", "-c", "8", "-d", "10s"])
            loadtest(["--mode", "echo", "-n", "200", "--rate", "2000", "-d", "10s"])

    busy = threading.Thread(target=traffic)
    busy.start()
    samples = []
    started = time.time()
    while idle.is_alive() or busy.is_alive():
        samples.append({"t": round(time.time() - started, 1), "rss_kib": rss_kib(relay.pid), "fds": fd_count(relay.pid)})
        time.sleep(5)
    idle.join()
    busy.join()
    time.sleep(3)
    end_fds = fd_count(relay.pid)
    end_rss = rss_kib(relay.pid)
    relay.send_signal(signal.SIGTERM)
    relay.wait(timeout=120)
    gw.terminate()
    records.close()

    # Drift: RSS over the steady middle of the run (after the idle set is open, before it closes).
    steady = [s for s in samples if 30 <= s["t"] <= hold - 10] or samples
    third = max(1, len(steady) // 3)
    first = sorted(s["rss_kib"] for s in steady[:third])[third // 2]
    last = sorted(s["rss_kib"] for s in steady[-third:])[third // 2]
    if last > first * 1.10 + 4096:
        failures.append(f"RSS drifted upward: {first} KiB -> {last} KiB")
    fds_first = sorted(s["fds"] for s in steady[:third])[third // 2]
    fds_last = sorted(s["fds"] for s in steady[-third:])[third // 2]
    if fds_last > fds_first + 50:
        failures.append(f"descriptors drifted upward: {fds_first} -> {fds_last}")
    if end_fds > base_fds + 5:
        failures.append(f"descriptors not released: {base_fds} at start, {end_fds} after the load")
    outcomes = {}
    with open(os.path.join(args.out, "records.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            outcomes[(r["event"], r["outcome"])] = outcomes.get((r["event"], r["outcome"]), 0) + 1
    expected = {("handshake", "ok"), ("close", "client_closed"), ("close", "shutdown")}
    unexpected = {k: v for k, v in outcomes.items() if k not in expected}
    if unexpected:
        failures.append(f"unexpected record outcomes: {unexpected}")

    summary = {
        "minutes": args.minutes,
        "idle_held": next((r["completed"] for r in reports if r["mode"] == "idle"), 0),
        "churn_cycles": sum(r["completed"] for r in reports if r["mode"] == "churn"),
        "echo_messages": sum(r["received"] for r in reports if r["mode"] == "echo"),
        "handshakes": outcomes.get(("handshake", "ok"), 0),
        "rss_kib_steady_first_last": [first, last],
        "rss_kib_end": end_rss,
        "fds_start_steady_end": [base_fds, fds_first, fds_last, end_fds],
        "failures": failures,
    }
    with open(os.path.join(args.out, "samples.json"), "w") as f:
        json.dump({"samples": samples, "summary": summary}, f, indent=1)
    print(json.dumps(summary, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
